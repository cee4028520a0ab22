#!/usr/bin/env bash
# The `apns` mode (issue 20): pushes (POST of a 1 KiB payload with APNs' headers) through the
# proxy's APNs mount to an HTTP/2 upstream, one cached provider token, against nginx's floor
# (the same POST proxied by nginx with a static token), in one run with the shared harness's
# pinning (the measured process alone on CPU 0; wrk and the upstream on CPU 1), audit and
# metrics on. Target: CPU per push ≤ 1.1 × nginx's (no signature is involved).
# Run by scripts/loadtest.sh after the harness (APNS=0 skips it), or by hand:
#   WORK_DIR=/tmp/proxybench.XXXXXX benches/load/apns.sh     # a harness run's work dir
# ROUNDS (default 3) windows of DURATION (default 8) seconds each, nginx and the proxy
# alternating; figures are medians. Uses only 127.0.0.1; every process it starts is stopped.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
: "${WORK_DIR:?set WORK_DIR to the work dir of a harness run, which holds the CA, certificates and key}"
LISTEN_PORT=${LISTEN_PORT:-18080} UPSTREAM_PORT=${UPSTREAM_PORT:-18443}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-8}
KEY_FILE="$WORK_DIR/AuthKey_BENCHKEY01.p8"
export BENCH_AUTH=${BENCH_AUTH:-aap_benchsecret}
TAG=apns
# shellcheck source=benches/load/common.sh
. "$HERE/common.sh"

hash=$(printf '%s' "$BENCH_AUTH" | sha256sum | cut -d' ' -f1)
cat >"$WORK_DIR/apns-proxy.toml" <<TOML
[server]
listen = "127.0.0.1:$LISTEN_PORT"
admin_listen = "off"

[audit]
path = "$WORK_DIR/apns-audit.jsonl"

[upstream]
ca_file = "$WORK_DIR/ca.crt"

[apis.apns]
base_url = "https://127.0.0.1:$UPSTREAM_PORT"

[[keys]]
name = "push"
kind = "developer"
key_id = "BENCHKEY01"
team_id = "BENCHTEAM1"
private_key_file = "$KEY_FILE"
apis = ["apns"]

[[clients]]
name = "bench"
secret_sha256 = "$hash"
allow = ["POST /apns/*"]
TOML

start 1 upstream nginx -p "$WORK_DIR" -e "$WORK_DIR/apns-upstream.err" -c "$WORK_DIR/upstream.conf"
wait_port "$UPSTREAM_PORT"
ng_cpu=() px_cpu=() px_rps=() px_p50=() px_p99=() ng_rps=() ng_p50=() ng_p99=() ng_err=() px_err=()
for round in $(seq "$ROUNDS"); do
  start 0 nginx nginx -p "$WORK_DIR" -e "$WORK_DIR/apns-nginx.err" -c "$WORK_DIR/nginx-proxy.conf"
  NG=$PID; wait_port "$LISTEN_PORT"
  BENCH_AUTH="" PUSH_PATH=/3/device/a1b2c3d4 window "$NG" "$HERE/push.lua" 32 0 2 >/dev/null   # warm-up
  read -r rps cpu p50 p99 err < <(BENCH_AUTH="" PUSH_PATH=/3/device/a1b2c3d4 window "$NG" "$HERE/push.lua" 32 0 "$DURATION")
  echo "round $round: nginx $rps pushes/s, $cpu µs CPU/push, errors $err"
  ng_cpu+=("$cpu") ng_rps+=("$rps") ng_p50+=("$p50") ng_p99+=("$p99") ng_err+=("$err"); stop "$NG"
  start 0 project ./target/release/apple-api-proxy serve --config "$WORK_DIR/apns-proxy.toml"
  PX=$PID; wait_port "$LISTEN_PORT"
  window "$PX" "$HERE/push.lua" 32 0 2 >/dev/null   # warm-up
  read -r rps cpu p50 p99 err < <(window "$PX" "$HERE/push.lua" 32 0 "$DURATION")
  echo "round $round: proxy $rps pushes/s, $cpu µs CPU/push, p50 $p50 ms, p99 $p99 ms, errors $err"
  px_cpu+=("$cpu") px_rps+=("$rps") px_p50+=("$p50") px_p99+=("$p99") px_err+=("$err")
  tokens=$(grep -c '"api":"apns"' "$WORK_DIR/apns-audit.jsonl" || true)
  stop "$PX"
done
sum() { python3 -c 'import sys; print(sum(int(x) for x in sys.argv[1:]))' "$@"; }
ng=$(median "${ng_cpu[@]}")
row apns "nginx (the same POST, static token)" "$(median "${ng_rps[@]}")" "$ng" "$(median "${ng_p50[@]}")" \
  "$(median "${ng_p99[@]}")" "$(sum "${ng_err[@]}")"
row apns "project" "$(median "${px_rps[@]}")" "$(median "${px_cpu[@]}")" "$(median "${px_p50[@]}")" \
  "$(median "${px_p99[@]}")" "$(sum "${px_err[@]}")" "$(python3 -c "print(1.1 * $ng)")" "≤ 1.1 × nginx"
distinct=$(python3 -c 'import json,sys
seen=set()
for line in open(sys.argv[1]):
    r=json.loads(line)
    if r.get("api")=="apns" and r.get("token_sha256"): seen.add(r["token_sha256"])
print(len(seen))' "$WORK_DIR/apns-audit.jsonl")
python3 - "$(median "${ng_cpu[@]}")" "$(median "${px_cpu[@]}")" "$(median "${px_rps[@]}")" "$(median "${px_p50[@]}")" "$(median "${px_p99[@]}")" "$(median "${ng_rps[@]}")" "$tokens" "$distinct" <<'PY'
import sys
ng, px, rps, p50, p99, ngrps = map(float, sys.argv[1:7])
audited, distinct = sys.argv[7], sys.argv[8]
print()
print("| apns mode (median) | value | target | met |")
print("|---|--:|--:|---|")
print(f"| CPU per push (proxy, closed loop, 32 connections, audit on) | {px:.1f} µs | ≤ 1.1 × nginx {ng:.1f} = {1.1*ng:.1f} µs | {'yes' if px <= 1.1*ng else 'no'} (×{px/ng:.2f}) |")
print(f"| pushes/s per core (1e6 / CPU per push) | {1e6/px:,.0f} | — | |")
print(f"| pushes/s reached, one core | {rps:,.0f} (nginx {ngrps:,.0f}) | — | |")
print(f"| p50 / p99 | {p50:.2f} / {p99:.2f} ms | — | |")
print(f"| provider tokens used (audit, all rounds) | {distinct} distinct over {audited} records of the last round | 1 per proxy start | |")
PY
