#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind (repeatable, unlike timings on a
# shared machine): with an empty middleware chain and the access log off, with five typical
# middlewares (request_id, headers, ip_filter, rate_limit, cors), and with the access log
# written (metrics are always recorded).
# The floor (examples/floor.rs, Pingora with no features) is counted the same way.
#   cargo build --release --bin streamgate --example floor && bench/chain-instructions.sh [REQUESTS]
# Needs valgrind and python3 (apt-get install -y valgrind). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
bin=target/release/streamgate
floor=target/release/examples/floor
[ -x "$bin" ] && [ -x "$floor" ] || { echo "run cargo build --release --bin streamgate --example floor first" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 1; }
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
origin_port=$(port)
cat > "$dir/origin.py" <<PY
import asyncio
async def handle(r, w):
    try:
        while True:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
            await w.drain()
    except Exception:
        w.close()
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", $origin_port)
    await s.serve_forever()
asyncio.run(main())
PY
cat > "$dir/client.py" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for i in range(int(sys.argv[2])):
    c.request("GET", "/bench", headers={"origin": "https://app.test"})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
python3 "$dir/origin.py" & sleep 0.5
chain='middleware_services:
  - { name: ids, type: request_id }
  - { name: hdr, type: headers, config: { request: { set: { x-edge: bench } }, response: { set: { x-content-type-options: nosniff } } } }
  - { name: ipf, type: ip_filter, config: { allow: [127.0.0.0/8], deny: [10.0.0.0/8] } }
  - { name: rl, type: rate_limit, config: { rate: 1000000000, burst: 1000000000 } }
  - { name: cors, type: cors }
middlewares: [ids, hdr, ipf, rl, cors]'
# Instructions for `warm + count` requests minus those for `warm` alone, per request.
measure() { # name config-extra [RUST_LOG]
  local total=()
  for count in 0 "$n"; do
    local p; p=$(port)
    printf 'threads: 1\npid_file: %s/pid\nupgrade_sock: %s/sock\ngrace_period_seconds: 0\ngraceful_shutdown_timeout_seconds: 0\nlisten: ["127.0.0.1:%s"]\nservices:\n  origin: { url: "http://127.0.0.1:%s" }\nhost_rules:\n  - { pattern: "*", target: origin }\n%s\n' \
      "$dir" "$dir" "$p" "$origin_port" "$2" > "$dir/$1.yaml"
    local cmd=("$bin" -c "$dir/$1.yaml")
    [ "$1" = floor ] && cmd=("$floor" --listen "127.0.0.1:$p" --upstream "127.0.0.1:$origin_port" --threads 1)
    RUST_LOG=${3:-off} valgrind --tool=callgrind --callgrind-out-file="$dir/$1-$count.out" "${cmd[@]}" >/dev/null 2>&1 &
    local vg=$!
    for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$p))" 2>/dev/null && break; sleep 0.2; done
    python3 "$dir/client.py" "$p" 200
    [ "$count" -gt 0 ] && python3 "$dir/client.py" "$p" "$count"
    kill -INT $vg; wait $vg 2>/dev/null || true
    total+=("$(callgrind_annotate "$dir/$1-$count.out" 2>/dev/null | awk '/PROGRAM TOTALS/{gsub(",","",$1); print $1}')")
  done
  echo $(( (total[1] - total[0]) / n ))
}
quiet='access_log: { enabled: false }'
floor_count=$(measure floor "")
empty=$(measure empty "$quiet")
full=$(measure chain "$quiet
$chain")
logged=$(measure logged 'access_log: { enabled: true, format: combined }' 'off,streamgate::access=info')
echo "instructions per request: the floor (Pingora, no features) $floor_count, streamgate $empty ($(( (empty - floor_count) * 100 / floor_count ))% more)"
echo "instructions per request: empty chain $empty, five middlewares $full ($(( (full - empty) * 100 / empty ))% more)"
echo "instructions per request: access log off $empty, on $logged ($(( (logged - empty) * 100 / empty ))% more)"
