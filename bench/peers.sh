#!/usr/bin/env bash
# streamgate side by side with its peers in one run: no proxy (direct), the floor (a Pingora
# proxy with no features, examples/floor.rs), streamgate, HAProxy, nginx and Caddy, each started
# fresh for every measurement and stopped by its PID, in interleaved rounds. Measures
# stream tiers (memory and CPU per stream, latency, time to first event, lost events), a
# burst, and plain requests; prints one table per scenario and writes JSON lines.
#
#   bench/peers.sh
#   CONNS="200" DURATION=5 ROUNDS=1 bench/peers.sh            # a quick look
#   PEERS="direct streamgate haproxy" BUILD=0 bench/peers.sh
#
# Settings (environment, defaults in brackets):
#   CONNS ["1000 9000"]  stream tiers (one connection per stream; at most about 9,900;
#                        set and empty: no stream tiers)
#   DURATION [15]        steady seconds measured per stream run
#   ROUNDS [2]           interleaved rounds; tables show the median and each round
#   PEERS ["direct floor streamgate haproxy nginx caddy"]; also floor-ns: the floor with
#                        Pingora's work_stealing off, as streamgate has it by default; and
#                        NAME=PATH: another streamgate binary (an older commit's, say) run
#                        like streamgate, to compare builds in one run
#   BUILD [1]            0: use the release binaries already built
#   RATE_INTERVAL [1s]   time between two events of a stream
#   SIZE [256]           bytes per event
#   RAMP [2000]          new streams a second
#   WARMUP [2s]          after every stream is open, before the steady window
#   BURST [500000]       events per burst stream (0: no burst); BURST_STREAMS [4]; BURST_SIZE [512]
#   PLAIN_CONNS [50]     keep-alive connections for plain requests; PLAIN_SECONDS [10] (0: none)
#   POST [0]             1: every stream (tiers, burst, opens) is asked for with a POST and a
#                        JSON body, as LLM clients do; ACCEPT [text/event-stream] its Accept
#   OPENS [3000]         streams opened one after another, each closed at its first event:
#                        the proxy's CPU and context switches per stream (0: none)
#   OUT_DIR [${TMPDIR:-/tmp}/streamgate-peers-DATE]  results.jsonl, table.txt, each process's log
#
# Ports on 127.0.0.1: bench/peers/ports.sh (the configs in bench/peers/ name them). HAProxy, nginx,
# Caddy and wrk are installed with
# apt-get when missing and this runs as root; a peer still missing is skipped. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/peers/ports.sh

CONNS=${CONNS-"1000 9000"}
DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-2}
PEERS=${PEERS:-"direct floor streamgate haproxy nginx caddy"}
BUILD=${BUILD:-1}
OUT_DIR=${OUT_DIR:-${TMPDIR:-/tmp}/streamgate-peers-$(date +%Y%m%d-%H%M%S)}

# Both sides of 9,000 streams do not fit in one process's files, so the origin and the
# client are separate processes, each under this limit (the most this machine allows).
ulimit -n 20000 2>/dev/null || echo "peers: cannot raise ulimit -n to 20000 (it is $(ulimit -n))" >&2

missing=()
for peer in $PEERS; do
  case $peer in
    haproxy) command -v haproxy >/dev/null || missing+=(haproxy) ;;
    nginx) command -v nginx >/dev/null || missing+=(nginx-light) ;;
    caddy) command -v caddy >/dev/null || missing+=(caddy) ;;
  esac
done
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "peers: installing ${missing[*]}" >&2
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null ||
      echo "peers: apt-get install ${missing[*]} failed" >&2
  else
    echo "peers: not installed: ${missing[*]} (apt-get install -y ${missing[*]})" >&2
  fi
fi

if [ "$BUILD" != 0 ]; then
  cargo build --release --bin streamgate --example floor --example bench
fi
for bin in target/release/streamgate target/release/examples/floor target/release/examples/bench; do
  [ -x "$bin" ] || { echo "peers: $bin is missing; run without BUILD=0" >&2; exit 1; }
done

mkdir -p "$OUT_DIR/nginx/tmp" "$OUT_DIR/caddy"
peers=()
for peer in $PEERS; do
  case $peer in
    direct) peers+=(--peer direct) ;;
    streamgate) peers+=(--peer "streamgate=${PEER_PORTS[streamgate]}:target/release/streamgate -c bench/peers/streamgate.yaml") ;;
    floor) peers+=(--peer "floor=${PEER_PORTS[floor]}:target/release/examples/floor --listen 127.0.0.1:${PEER_PORTS[floor]} --upstream 127.0.0.1:${PEER_PORTS[origin]} --threads 2") ;;
    floor-ns) peers+=(--peer "floor-ns=${PEER_PORTS[floor-ns]}:target/release/examples/floor --listen 127.0.0.1:${PEER_PORTS[floor-ns]} --upstream 127.0.0.1:${PEER_PORTS[origin]} --threads 2 --work-stealing false") ;;
    haproxy | nginx | caddy)
      if ! command -v "$peer" >/dev/null; then
        echo "peers: $peer is not installed: skipped" >&2
        continue
      fi
      if [ "$peer" = haproxy ]; then
        peers+=(--peer "haproxy=${PEER_PORTS[haproxy]}:haproxy -db -f bench/peers/haproxy.cfg")
      elif [ "$peer" = caddy ]; then
        scratch=$(printf %q "$OUT_DIR/caddy")
        peers+=(--peer "caddy=${PEER_PORTS[caddy]}:env HOME=$scratch XDG_CONFIG_HOME=$scratch XDG_DATA_HOME=$scratch caddy run --config bench/peers/Caddyfile --adapter caddyfile")
      else
        peers+=(--peer "nginx=${PEER_PORTS[nginx]}:nginx -p $(printf %q "$OUT_DIR/nginx/") -e stderr -c $(printf %q "$PWD/bench/peers/nginx.conf") -g 'daemon off;'")
      fi
      ;;
    *=*)
      [ -x "${peer#*=}" ] || { echo "peers: ${peer#*=} is not an executable" >&2; exit 2; }
      peers+=(--peer "${peer%%=*}=${PEER_PORTS[streamgate]}:${peer#*=} -c bench/peers/streamgate.yaml")
      ;;
    *) echo "peers: unknown peer $peer (direct floor floor-ns streamgate haproxy nginx caddy NAME=PATH)" >&2; exit 2 ;;
  esac
done

echo "peers: results in $OUT_DIR" >&2
exec target/release/examples/bench --scenario peers --out "$OUT_DIR" "${peers[@]}" \
  --tiers "$CONNS" --seconds "$DURATION" --rounds "$ROUNDS" \
  --interval "${RATE_INTERVAL:-1s}" --size "${SIZE:-256}" --ramp "${RAMP:-2000}" \
  --warmup "${WARMUP:-2s}" --burst "${BURST:-500000}" --burst-streams "${BURST_STREAMS:-4}" \
  --burst-size "${BURST_SIZE:-512}" --conns "${PLAIN_CONNS:-50}" \
  --plain-seconds "${PLAIN_SECONDS:-10}" --opens "${OPENS:-3000}" \
  --accept "${ACCEPT:-text/event-stream}" $([ "${POST:-0}" = 1 ] && echo --post)
