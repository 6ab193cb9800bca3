#!/usr/bin/env bash
# Instructions (user space, counted by callgrind: repeatable, unlike timings on a shared
# machine) that an event stream costs each proxy, on one worker thread:
#   per steady event: STREAMS streams [100], one 256-byte event each 100 ms, counted over
#                     COUNT_SECONDS [10] once every stream is open;
#   per stream opened: OPENS [300] streams opened one after another, each closed once its
#                     first event is in.
# Proxies (PROXIES, all by default): streamgate (STREAMGATE, the release build by default)
# and the floor (examples/floor.rs, Pingora with no features), and HAProxy and nginx when
# installed (steady events only for HAProxy: under valgrind each of its opens took about
# 0.17 s, the others' a few ms, and the count would take in whatever it does meanwhile).
#   cargo build --release --bin streamgate --example floor --example bench && bench/stream-instructions.sh
#   PROXIES="streamgate" STREAMGATE=/path/to/another/build bench/stream-instructions.sh
# Needs valgrind and python3 (apt-get install -y valgrind). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
STREAMS=${STREAMS:-100}
SECONDS_COUNTED=${COUNT_SECONDS:-10}
OPENS=${OPENS:-300}
STREAMGATE=${STREAMGATE:-target/release/streamgate}
for bin in target/release/streamgate target/release/examples/floor target/release/examples/bench; do
  [ -x "$bin" ] || { echo "run cargo build --release --bin streamgate --example floor --example bench first" >&2; exit 1; }
done
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null || { echo "needs valgrind" >&2; exit 1; }
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
origin=$(port)
target/release/examples/bench --scenario origin --origin "127.0.0.1:$origin" --interval 100ms >/dev/null 2>&1 &

# The client: opens the streams (or one stream after another), says `zero` when the
# counted part starts (after the first line on stdin), `done N` when it ends.
cat > "$dir/client.py" <<'PY'
import asyncio, socket, sys
mode, port, n, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
REQ = b"GET /events?size=256 HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n"
def first_event():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(REQ)
    buf = b""
    while b"\n\n" not in buf.partition(b"\r\n\r\n")[2]:
        d = s.recv(65536)
        if not d:
            raise SystemExit("the stream ended before its first event")
        buf += d
    s.close()
if mode == "opens":
    for _ in range(20):
        first_event()
    print("zero", flush=True); sys.stdin.readline()
    for _ in range(n):
        first_event()
    print("done", n, flush=True); sys.stdin.readline()
    raise SystemExit
counting, events = False, 0
async def stream():
    global events
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(REQ)
    await w.drain()
    while True:
        data = await r.read(65536)
        if not data:
            raise SystemExit("a stream ended")
        if counting:
            events += data.count(b"\n\n")
async def main():
    global counting
    tasks = [asyncio.create_task(stream()) for _ in range(n)]
    await asyncio.sleep(3)
    print("zero", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    counting = True
    await asyncio.sleep(secs)
    counting = False
    print("done", events, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
PY

# count PROXY MODE N: instructions per unit (event or stream) through PROXY.
count() {
  local p; p=$(port)
  local cmd
  case $1 in
    streamgate)
      printf 'threads: 1\npid_file: %s/pid\nupgrade_sock: %s/sock\ngrace_period_seconds: 0\ngraceful_shutdown_timeout_seconds: 0\nlisten: ["127.0.0.1:%s"]\naccess_log: { enabled: false }\nservices:\n  origin: { url: "http://127.0.0.1:%s" }\nhost_rules:\n  - { pattern: "*", target: origin }\n' \
        "$dir" "$dir" "$p" "$origin" > "$dir/sg.yaml"
      cmd=("$STREAMGATE" -c "$dir/sg.yaml") ;;
    floor) cmd=(target/release/examples/floor --listen "127.0.0.1:$p" --upstream "127.0.0.1:$origin" --threads 1) ;;
    haproxy)
      printf 'global\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\nfrontend f\n  bind 127.0.0.1:%s\n  default_backend b\nbackend b\n  server o 127.0.0.1:%s\n' "$p" "$origin" > "$dir/haproxy.cfg"
      cmd=(haproxy -db -f "$dir/haproxy.cfg") ;;
    nginx)
      mkdir -p "$dir/nginx/logs"
      printf 'daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log stderr;\nevents { worker_connections 4096; }\nhttp { access_log off; proxy_buffering off;\n  upstream o { server 127.0.0.1:%s; keepalive 32; }\n  server { listen 127.0.0.1:%s; location / { proxy_pass http://o; proxy_http_version 1.1; proxy_set_header Connection ""; } } }\n' "$origin" "$p" > "$dir/nginx.conf"
      cmd=(nginx -p "$dir/nginx/" -c "$dir/nginx.conf") ;;
  esac
  rm -f "$dir"/cg.out*
  RUST_LOG=${RUST_LOG:-info} valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "${cmd[@]}" >/dev/null 2>&1 &
  local vg=$!
  for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$p))" 2>/dev/null && break; sleep 0.2; done
  coproc CLIENT { python3 "$dir/client.py" "$2" "$p" "$3" "$SECONDS_COUNTED"; }
  local line
  read -r -u "${CLIENT[0]}" line
  callgrind_control -z "$vg" >/dev/null 2>&1
  echo go >&"${CLIENT[1]}"
  read -r -u "${CLIENT[0]}" line
  callgrind_control -d "$vg" >/dev/null 2>&1
  echo end >&"${CLIENT[1]}"
  wait "$CLIENT_PID" 2>/dev/null || true
  kill "$vg"; wait "$vg" 2>/dev/null || true
  local units=${line#done }
  local total
  total=$(cat "$dir"/cg.out.* | awk '/^summary:/{s+=$2} END {print s}')
  echo $(( total / units ))
}

proxies=()
for proxy in ${PROXIES:-streamgate floor haproxy nginx}; do
  case $proxy in
    streamgate | floor) proxies+=("$proxy") ;;
    haproxy | nginx) command -v "$proxy" >/dev/null && proxies+=("$proxy") ;;
    *) echo "unknown proxy $proxy (streamgate floor haproxy nginx)" >&2; exit 2 ;;
  esac
done
for proxy in "${proxies[@]}"; do
  echo "$proxy: $(count "$proxy" steady "$STREAMS") instructions per steady event"
done
for proxy in "${proxies[@]}"; do
  [ "$proxy" = haproxy ] && continue
  echo "$proxy: $(count "$proxy" opens "$OPENS") instructions per stream opened"
done
