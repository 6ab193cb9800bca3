# streamgate container image.
#
#   docker build -t streamgate .
#   docker run --rm -p 8080:8080 streamgate                      # conf/streamgate.yaml
#   docker run --rm -p 8080:8080 -v $PWD/my-conf:/etc/streamgate:ro streamgate
#
# Upgrading a running container: streamgate is PID 1 here, so a container is upgraded by
# replacing it, not by `-u` inside it (the old PID 1 exiting would end the container).
# Start the new container behind your load balancer (or let the orchestrator's rolling
# update do it), then `docker stop --time 45 OLD`. SIGTERM (the STOPSIGNAL) makes the old
# process stop accepting, end its event streams with `retry:` hints spread over
# `sse.drain_period` (clients reconnect to the new container with Last-Event-ID), and let
# open requests finish for `grace_period_seconds` (30 s in conf/streamgate.yaml), then
# `graceful_shutdown_timeout_seconds` (10 s): keep docker's stop timeout above their sum. In-place `-u` upgrades (new binary, same sockets) are for hosts
# and VMs, see README.md "Zero-downtime upgrade".

FROM rust:1-slim-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends cmake make g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY conf ./conf
COPY tests ./tests
COPY examples ./examples
RUN cargo build --release --locked --bin streamgate \
    && strip target/release/streamgate

FROM debian:bookworm-slim
# The system trust store: https services without a `ca_file` verify their origins with it.
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin streamgate
COPY --from=build /src/target/release/streamgate /usr/local/bin/streamgate
COPY conf/ /etc/streamgate/
# The repo's conf/ works unchanged: it listens on 0.0.0.0:8080 and keeps its pid file and
# upgrade socket under /tmp, which the non-root user can write.
USER streamgate
EXPOSE 8080
STOPSIGNAL SIGTERM
ENV RUST_LOG=info
ENTRYPOINT ["/usr/local/bin/streamgate"]
CMD ["-c", "/etc/streamgate/streamgate.yaml"]
