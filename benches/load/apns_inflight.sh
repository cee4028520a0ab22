#!/usr/bin/env bash
# The `apns` mode's memory figure (issue 20): the release proxy's RSS with 10,000 pushes in
# flight at once over HTTP/2 multiplexing from clients (h2load: 40 connections × 250
# concurrent streams, each push held 3 s by the stand-in's APNs role,
# `?standin_delay_ms=3000`), against its idle RSS. The proxy carries them to APNs on its one
# connection for the key, as many at a time as the upstream's SETTINGS_MAX_CONCURRENT_STREAMS
# allows (the stand-in's hyper default, 200); the rest wait in the proxy, so the figure is
# the cost of a push the proxy holds. The stand-in (examples/apns_standin.rs) writes the proxy's config; the proxy is pinned
# to CPU 0, h2load and the stand-in to CPU 1. Needs h2load (Debian nghttp2-client).
# Run by benches/load/apns.sh, or by hand. Uses only 127.0.0.1; stops what it starts.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
LISTEN_PORT=${LISTEN_PORT:-18080}
command -v h2load >/dev/null || { echo "apns_inflight: h2load is not installed (apt-get install nghttp2-client)" >&2; exit 2; }
cargo build --release --bin apple-api-proxy --example apns_standin >/dev/null 2>&1
WORK=$(mktemp -d /tmp/apns-inflight.XXXXXX)
mkfifo "$WORK/stdin"
taskset -c 1 ./target/release/examples/apns_standin "127.0.0.1:$LISTEN_PORT" <"$WORK/stdin" >"$WORK/standin.out" 2>&1 &
SI=$!
exec 3>"$WORK/stdin"   # the stand-in serves while this stays open
PX=""
cleanup() { exec 3>&- || true; [[ -n $PX ]] && kill "$PX" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
for _ in $(seq 100); do grep -q '^SECRET ' "$WORK/standin.out" && break; sleep 0.1; done
CONFIG=$(sed -n 's/^CONFIG //p' "$WORK/standin.out") SECRET=$(sed -n 's/^SECRET //p' "$WORK/standin.out")
[[ -n $CONFIG ]] || { cat "$WORK/standin.out" >&2; exit 1; }
RUST_LOG=warn taskset -c 0 ./target/release/apple-api-proxy serve --config "$CONFIG" >"$WORK/proxy.log" 2>&1 &
PX=$!
for _ in $(seq 100); do (exec 4<>"/dev/tcp/127.0.0.1/$LISTEN_PORT") 2>/dev/null && break; sleep 0.1; done
kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
path="/apns/3/device/a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90?standin_delay_ms=3000"
body="$WORK/push.json"; python3 -c 'print("{\"aps\":{\"alert\":\"" + "x"*1000 + "\"}}", end="")' >"$body"
h2() { taskset -c 1 h2load -n "$1" -c "$2" -m "$3" -d "$body" -H "authorization: Bearer $SECRET" \
  -H 'apns-topic: com.example.app' -H 'content-type: application/json' "http://127.0.0.1:$LISTEN_PORT$path"; }
h2 200 4 50 >/dev/null   # warm-up: pools, the token
sleep 1
idle=$(kb "$PX" VmRSS)
echo "idle (after a warm-up of 200 pushes): VmRSS $idle kB, threads $(kb "$PX" Threads)"
h2 10000 40 250 >"$WORK/h2load.out" &
H=$!
peak=0 inflight=0
while kill -0 "$H" 2>/dev/null; do
  r=$(kb "$PX" VmRSS); ((r > peak)) && peak=$r
  sleep 0.05
done
wait "$H" || true
grep -E "^requests:|^status codes:|^finished in" "$WORK/h2load.out" || { cat "$WORK/h2load.out"; tail -5 "$WORK/proxy.log"; }
sleep 1
echo "10,000 pushes in flight (40 h2 connections x 250 streams, each held 3 s): peak VmRSS $peak kB (+$((peak - idle)) kB, $(( (peak - idle) * 1024 / 10000 )) bytes per push in flight); after: $(kb "$PX" VmRSS) kB; high-water $(kb "$PX" VmHWM) kB"
