#!/bin/sh
# Soak: one million event streams opened and closed through the release binary, at most
# 2,000 at once, over loopback; then resident memory, the stream registry and the open
# descriptors are compared with what they were after a warm-up (see examples/soak.rs for
# the pass criteria). Not part of CI: it runs for minutes.
#
#   bench/soak.sh                                   # 1,000,000 streams, 15 minutes at most
#   bench/soak.sh --streams 200000 --budget 5m      # any option of examples/soak.rs
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bin streamgate --example soak
exec target/release/examples/soak --proxy target/release/streamgate "$@"
