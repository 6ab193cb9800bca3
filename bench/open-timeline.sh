#!/usr/bin/env bash
# Where a stream's time to first event goes inside each proxy, beside nginx: one stream tier
# of bench/peers.sh (streams opened at its usual 2,000 a second) with the kernel's syscall
# tracepoints recorded in each proxy for 3 s from when it listens (the ramp included).
# Every stream's path is then split at the proxy's own system calls:
#
#   accept > request    accepted until its request head is read
#   request > connect   the request head read until the origin connect starts
#   connect > send      the connect until the request goes to the origin
#   send > answer       the request sent until the origin's answer is read
#   answer > first      the answer read until the head and first event go to the client
#
# Tracing slows every proxy (each system call is recorded), so compare the rows of one
# run, not its figures with the harness's.
#
#   bench/open-timeline.sh                      # 9,000 streams, streamgate and nginx
#   CONNS=1000 PEERS="streamgate haproxy nginx" bench/open-timeline.sh
#   PEERS="streamgate old=/path/to/older/streamgate nginx" bench/open-timeline.sh
#
# Needs root, perf (apt-get install linux-perf) and python3, and the release binaries
# (BUILD=0 is passed on: run bench/peers.sh or cargo build --release first). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-9000}
PEERS=${PEERS:-"streamgate nginx"}
OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}/streamgate-timeline-$(date +%Y%m%d-%H%M%S)}
command -v perf >/dev/null || { echo "open-timeline: needs perf (apt-get install linux-perf)" >&2; exit 1; }
mkdir -p "$OUT_DIR"

source bench/peers/ports.sh
events=syscalls:sys_exit_accept4,syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom
events+=,syscalls:sys_enter_read,syscalls:sys_exit_read,syscalls:sys_enter_connect
events+=,syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_write

# Waits for PORT to be listened on (by the executable EXE, when given), then records its
# processes for 3 s: the harness starts the ramp half a second after the proxy listens,
# so even a short ramp (1,000 streams take half a second) is inside.
record() {
  local port=$1 name=$2 exe=${3:-} pids="" pid
  for _ in $(seq 1 2400); do
    pids=$(ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u | paste -sd, - || true)
    if [ -n "$pids" ] && [ -n "$exe" ]; then
      pid=${pids%%,*}
      [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$exe")" ] || pids=""
    fi
    [ -n "$pids" ] && break
    sleep 0.05
  done
  [ -n "$pids" ] || return 0
  perf record -q -e "$events" -p "$pids" -o "$OUT_DIR/$name.perf" -- sleep 3 >/dev/null 2>&1 || true
}

watchers=()
names=()
for peer in $PEERS; do
  case $peer in
    *=*) record "${PEER_PORTS[streamgate]}" "${peer%%=*}" "${peer#*=}" & names+=("${peer%%=*}") ;;
    streamgate) record "${PEER_PORTS[streamgate]}" streamgate "$PWD/target/release/streamgate" & names+=(streamgate) ;;
    *)
      port=${PEER_PORTS[$peer]:-}
      [ -n "$port" ] || { echo "open-timeline: unknown peer $peer" >&2; exit 2; }
      record "$port" "$peer" &
      names+=("$peer")
      ;;
  esac
  watchers+=($!)
done
CONNS=$CONNS ROUNDS=1 DURATION=3 BURST=0 PLAIN_SECONDS=0 OPENS=0 BUILD=0 PEERS="$PEERS" \
  OUT_DIR="$OUT_DIR/peers" bench/peers.sh >"$OUT_DIR/peers.log" 2>&1
wait "${watchers[@]}" || true

for name in "${names[@]}"; do
  [ -f "$OUT_DIR/$name.perf" ] || { echo "$name: nothing recorded"; continue; }
  perf script -F pid,tid,time,event,trace -i "$OUT_DIR/$name.perf" 2>/dev/null |
    python3 bench/open-timeline.py "$name"
done
