#!/usr/bin/env bash
# The figures of issue 7 the shared harness does not take, measured with the same pinning
# (proxy alone on CPU 0; load and upstream on CPU 1), certificates and key as a harness run:
#   1. idle RSS of the release binary, and RSS with 1,000 and with 10,000 (the default
#      max_connections) open keep-alive client connections;
#   2. latency at half of the proxy's peak load (wrk paced with delay()), compared with wrk
#      straight to the upstream and with the nginx reference proxy at the same pacing;
#   3. a 1 GiB response streamed through the proxy (throughput, RSS before/peak/after), and
#      a 1 GiB request body (an upload) the same way.
# Run by scripts/loadtest.sh after the harness (EXTRAS=0 skips it), or by hand:
#   WORK_DIR=/tmp/proxybench.XXXXXX benches/load/extras.sh    # a harness run's work dir
# Uses only 127.0.0.1; every process it starts is stopped on exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
: "${WORK_DIR:?set WORK_DIR to the work dir of a harness run, which holds the CA, certificates and key}"
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
LISTEN_PORT=${LISTEN_PORT:-18080} UPSTREAM_PORT=${UPSTREAM_PORT:-18443} BIG_PORT=${BIG_PORT:-18444}
export WORK_DIR LISTEN_PORT CA_FILE="$WORK_DIR/ca.crt" KEY_FILE="$WORK_DIR/AuthKey_BENCHKEY01.p8" \
  KEY_ID=BENCHKEY01 ISSUER_ID=57246542-96fe-1a63-e053-0824d011072a
export UPSTREAM_URL="https://127.0.0.1:$UPSTREAM_PORT" BENCH_AUTH=${BENCH_AUTH:-aap_benchsecret}
TAG=extras
# shellcheck source=benches/load/common.sh
. "$HERE/common.sh"
start_upstream() { start 1 upstream nginx -p "$WORK_DIR" -e "$WORK_DIR/upstream.err" -c "$WORK_DIR/upstream.conf"
  UP=$PID; wait_port "$UPSTREAM_PORT"; }
start_project() { start 0 project "$BENCH_DIR/project-cmd.sh"; PX=$PID; wait_port "$LISTEN_PORT"; }
status_kb() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
wrkrun() { # mode connections delay_ms seconds url [DIRECT_AUTH] -> "rps p50_ms p99_ms errors"
  local out
  out=$(BENCH_MODE=$1 DELAY_MS=$3 DIRECT_AUTH=${6:-} timeout $(($4 + 30)) taskset -c 1 \
    wrk -t2 -c"$2" -d"$4s" -s "$HERE/paced.lua" "$5" | sed -n 's/^WRK //p')
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print("%.0f %.2f %.2f %d" % (d["requests"]*1e6/d["duration_us"], d["p50_us"]/1000, d["p99_us"]/1000, d["errors"]+d["non2xx"]))' "$out"
}

# 10,000 client connections need as many descriptors, in the proxy and in the client.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "== 1. RSS (release binary, pinned to CPU 0 as in the harness)"
start_upstream
start_project
sleep 2
idle=$(status_kb "$PX" VmRSS)
echo "idle: VmRSS $idle kB, threads $(status_kb "$PX" Threads)"
fact rss_idle_kb "$idle" "idle, after start"
for n in 1000 10000; do
  # A fresh process each time, so each figure is its own.
  stop "$PX"; start_project; sleep 1
  out=$(python3 "$HERE/open_connections.py" "$n" "$PX" "$LISTEN_PORT")
  grep -v '^OPEN ' <<<"$out"
  read -r ok rss < <(sed -n 's/^OPEN //p' <<<"$out")
  fact "rss_${n}_kb" "$rss" "$ok of $n connections open, each served one request"
done

echo "== 2. latency at half of peak load (wrk paced: each connection waits DELAY_MS between requests)"
stop "$PX"; start_project
BENCH_MODE=unique DELAY_MS=0 timeout 30 taskset -c 1 wrk -t2 -c32 -d3s -s "$HERE/paced.lua" \
  "http://127.0.0.1:$LISTEN_PORT/" >/dev/null  # warm-up
declare -A conns
for mode in fixed unique; do
  read -r peak _ _ _ < <(wrkrun "$mode" 32 0 5 "http://127.0.0.1:$LISTEN_PORT/")
  # rate ≈ connections / (delay + latency): 2 ms delay + ~0.4 ms latency
  conns[$mode]=$(python3 -c "print(max(2, round($peak / 2 * 0.0024)))")
  echo "$mode: project peak (closed loop, 32 connections) $peak req/s -> $((peak / 2)) req/s offered with ${conns[$mode]} connections x 2 ms delay"
done
report() { printf '| %-8s | %-6s | %6s | %6s | %6s | %6s |\n' "$@"; }
report target mode req/s "p50 ms" "p99 ms" errors
report -------- ------ ------ ------ ------ ------
for mode in fixed unique; do
  read -r r p50 p99 e < <(wrkrun "$mode" "${conns[$mode]}" 2 8 "http://127.0.0.1:$LISTEN_PORT/")
  report project "$mode" "$r" "$p50" "$p99" "$e"
  fact "half_peak_p99_ms_$mode" "$p99" "project, $mode, $r req/s reached (wrk paced at half of peak)"
done
stop "$PX"
for mode in fixed unique; do
  read -r r p50 p99 e < <(wrkrun "$mode" "${conns[$mode]}" 2 8 "https://127.0.0.1:$UPSTREAM_PORT/" static-bench-token)
  report direct "$mode" "$r" "$p50" "$p99" "$e"
  fact "half_peak_direct_p99_ms_$mode" "$p99" "wrk straight to the upstream, same pacing"
done
start 0 nginx nginx -p "$WORK_DIR" -e "$WORK_DIR/extras-nginx.err" -c "$WORK_DIR/nginx-proxy.conf"
NG=$PID; wait_port "$LISTEN_PORT"
for mode in fixed unique; do
  read -r r p50 p99 e < <(wrkrun "$mode" "${conns[$mode]}" 2 8 "http://127.0.0.1:$LISTEN_PORT/")
  report nginx "$mode" "$r" "$p50" "$p99" "$e"
done
stop "$NG"; stop "$UP"
echo "(direct = wrk over TLS straight to the upstream; the proxies add their hop on top of it)"

echo "== 3. a 1 GiB response streamed through the proxy"
mkdir -p "$WORK_DIR/big/www/v1" "$WORK_DIR/big/tmp"
truncate -s 1G "$WORK_DIR/big/www/v1/big"   # sparse: costs no disk
cat >"$WORK_DIR/big/nginx.conf" <<CONF
master_process off;
daemon off;
pid $WORK_DIR/big/nginx.pid;
error_log $WORK_DIR/big/nginx.err warn;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $WORK_DIR/big/tmp;
    server {
        listen 127.0.0.1:$BIG_PORT ssl http2;
        ssl_certificate     $WORK_DIR/server.crt;
        ssl_certificate_key $WORK_DIR/server.key;
        root $WORK_DIR/big/www;
        default_type application/octet-stream;
        location / { if (\$http_authorization !~ "^Bearer .") { return 401; } }
        # The upload: nginx reads the whole body (into client_body_temp_path), and only then
        # passes it to the sink below, whose answer comes back: the answer follows the body.
        location = /v1/upload {
            client_max_body_size 0;
            if (\$http_authorization !~ "^Bearer .") { return 401; }
            proxy_pass http://127.0.0.1:$((BIG_PORT + 1))/sink;
        }
    }
    server {
        listen 127.0.0.1:$((BIG_PORT + 1));
        client_max_body_size 0;
        location / { return 200 "stored\n"; }
    }
}
CONF
start 1 big nginx -p "$WORK_DIR/big" -c "$WORK_DIR/big/nginx.conf"; BIG=$PID; wait_port "$BIG_PORT"
fetch() { # url [header] -> "seconds bytes"
  taskset -c 1 curl -sS --fail -o /dev/null --cacert "$CA_FILE" ${2:+-H "$2"} -w '%{time_total} %{size_download}\n' "$1"; }
fetch "https://127.0.0.1:$BIG_PORT/v1/big" "Authorization: Bearer x" >/dev/null  # warm: page cache
for v in 1 2; do
  read -r s b < <(fetch "https://127.0.0.1:$BIG_PORT/v1/big" "Authorization: Bearer x")
  echo "direct (curl -> nginx, both on CPU 1, no proxy) #$v: $b bytes in ${s}s = $(python3 -c "print(round($b/$s/2**30, 2))") GiB/s"
done
direct_down=$(python3 -c "print(round($b/$s/2**30, 2))")
UPSTREAM_URL="https://127.0.0.1:$BIG_PORT" start_project
fetch "http://127.0.0.1:$LISTEN_PORT/v1/big" "Proxy-Authorization: Bearer $BENCH_AUTH" >/dev/null  # warm: pool, TLS
for v in 1 2 3; do
  before=$(status_kb "$PX" VmRSS) peak=0 t0=$(ticks "$PX")
  fetch "http://127.0.0.1:$LISTEN_PORT/v1/big" "Proxy-Authorization: Bearer $BENCH_AUTH" >"$WORK_DIR/big/fetch.out" &
  C=$!
  while kill -0 "$C" 2>/dev/null; do r=$(status_kb "$PX" VmRSS); ((r > peak)) && peak=$r; sleep 0.05; done
  wait "$C"; read -r s b <"$WORK_DIR/big/fetch.out"
  echo "via proxy #$v: $b bytes in ${s}s = $(python3 -c "print(round($b/$s/2**30, 2))") GiB/s, proxy CPU $(( ($(ticks "$PX") - t0) * 1000 / $(getconf CLK_TCK) )) ms; RSS before $before kB, peak sampled $peak kB, after $(status_kb "$PX" VmRSS) kB"
done
echo "proxy high-water RSS since start: $(status_kb "$PX" VmHWM) kB"
fact download_gib_s "$(python3 -c "print(round($b/$s/2**30, 2))")" "last of 3; without the proxy (curl straight to nginx) $direct_down GiB/s"
fact download_rss_kb "$before/$peak/$(status_kb "$PX" VmHWM)" "before / peak sampled / high-water"

echo "== 4. a 1 GiB request body (an upload) streamed through the proxy"
sparse=$WORK_DIR/big/www/v1/big   # the same sparse file, read from the page cache
upload() { # url [header] -> "seconds bytes status"
  taskset -c 1 curl -sS --fail -o /dev/null --cacert "$CA_FILE" ${2:+-H "$2"} -H 'Content-Type: application/octet-stream' \
    -X POST -T "$sparse" -w '%{time_total} %{size_upload} %{http_code}\n' "$1"; }
for v in 1 2; do
  read -r s b c < <(upload "https://127.0.0.1:$BIG_PORT/v1/upload" "Authorization: Bearer x")
  echo "direct (curl -> nginx, no proxy) #$v: $b bytes up in ${s}s = $(python3 -c "print(round($b/$s/2**30, 2))") GiB/s, status $c"
done
direct_up=$(python3 -c "print(round($b/$s/2**30, 2))")
cat >"$WORK_DIR/big/upload.toml" <<TOML
[server]
listen = "127.0.0.1:$LISTEN_PORT"
admin_listen = "off"
max_request_body = "2GiB"
[audit]
path = "$WORK_DIR/big/upload-audit.jsonl"
[upstream]
ca_file = "$CA_FILE"
[apis.app-store-connect]
base_url = "https://127.0.0.1:$BIG_PORT"
[[keys]]
name = "bench"
kind = "team"
key_id = "$KEY_ID"
issuer_id = "$ISSUER_ID"
private_key_file = "$KEY_FILE"
apis = ["app-store-connect"]
[[clients]]
name = "bench"
secret_sha256 = "$(printf '%s' "$BENCH_AUTH" | sha256sum | cut -d' ' -f1)"
allow = ["POST /v1/upload"]
TOML
stop "$PX"
start 0 upload ./target/release/apple-api-proxy serve --config "$WORK_DIR/big/upload.toml"; PX=$PID; wait_port "$LISTEN_PORT"
for v in 1 2 3; do
  before=$(status_kb "$PX" VmRSS) peak=0 t0=$(ticks "$PX")
  upload "http://127.0.0.1:$LISTEN_PORT/v1/upload" "Proxy-Authorization: Bearer $BENCH_AUTH" >"$WORK_DIR/big/upload.out" &
  C=$!
  while kill -0 "$C" 2>/dev/null; do r=$(status_kb "$PX" VmRSS); ((r > peak)) && peak=$r; sleep 0.05; done
  wait "$C"; read -r s b c <"$WORK_DIR/big/upload.out"
  echo "via proxy #$v: $b bytes up in ${s}s = $(python3 -c "print(round($b/$s/2**30, 2))") GiB/s, status $c, proxy CPU $(( ($(ticks "$PX") - t0) * 1000 / $(getconf CLK_TCK) )) ms; RSS before $before kB, peak sampled $peak kB, after $(status_kb "$PX" VmRSS) kB"
done
echo "proxy high-water RSS since start: $(status_kb "$PX" VmHWM) kB"
fact upload_gib_s "$(python3 -c "print(round($b/$s/2**30, 2))")" "last of 3, status $c; without the proxy $direct_up GiB/s (nginx spools the body to disk, then answers)"
fact upload_rss_kb "$before/$peak/$(status_kb "$PX" VmHWM)" "before / peak sampled / high-water"
