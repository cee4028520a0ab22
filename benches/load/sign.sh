#!/usr/bin/env bash
# The `sign` mode (issue 14): in-app signatures (POST /proxy/v1/signatures/promotional-offer)
# measured side by side, in one run, with the same pinning as the shared harness (the
# measured process alone on CPU 0; wrk and the upstream on CPU 1):
#   - ring's raw ES256 sign and the signing endpoint's own work (criterion, `cargo bench`);
#   - nginx's CPU per request (the floor: a proxy that signs nothing, `fixed` mode);
#   - the proxy's CPU per signature, closed loop, 32 connections (audit and metrics on);
#   - p50/p99 at half of the proxy's peak signature rate (wrk paced with delay()).
# Target: CPU per signature ≤ nginx + 1.3 × raw sign; p99 at half of peak < 5 ms.
# Run by scripts/loadtest.sh after the harness (SIGN=0 skips it), or by hand:
#   WORK_DIR=/tmp/proxybench.XXXXXX benches/load/sign.sh     # a harness run's work dir
# ROUNDS (default 3) windows of DURATION (default 8) seconds each; figures are medians.
# Uses only 127.0.0.1; every process it starts is stopped on exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
: "${WORK_DIR:?set WORK_DIR to the work dir of a harness run, which holds the CA, certificates and key}"
LISTEN_PORT=${LISTEN_PORT:-18080} UPSTREAM_PORT=${UPSTREAM_PORT:-18443}
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}   # its load.lua drives nginx's `fixed` floor
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-8}
KEY_FILE="$WORK_DIR/AuthKey_BENCHKEY01.p8" KEY_ID=BENCHKEY01 ISSUER_ID=57246542-96fe-1a63-e053-0824d011072a
export BENCH_AUTH=${BENCH_AUTH:-aap_benchsecret}
TAG=sign
# shellcheck source=benches/load/common.sh
. "$HERE/common.sh"
echo "== sign: 1. raw ES256 sign and the endpoint's own work (criterion, pinned to CPU 0)"
bench_exe=$(cargo bench --bench hot_path --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="hot_path": print(m["executable"])' | tail -n1)
[[ -x $bench_exe ]] || { echo "sign: cannot build the hot_path benchmark" >&2; exit 1; }
micro() { # criterion filter -> mean in µs
  taskset -c 0 "$bench_exe" --bench "$1" 2>/dev/null | python3 -c '
import re,sys
for line in sys.stdin:
    m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) ", line)
    if m:
        v, u = float(m.group(1)), m.group(2)
        print({"ns": v/1000, "µs": v, "us": v, "ms": v*1000}[u]); break'
}
raw=$(micro '^ring/p256_sign$')
endpoint=$(micro '^signing/promotional_offer_signed$')
policy=$(micro '^signing/promotional_offer_parse_and_policy$')
echo "ring/p256_sign ${raw} µs; signing/promotional_offer_signed ${endpoint} µs (parse + policy + nonce + sign + JSON); parse + policy alone ${policy} µs"

echo "== sign: 2. nginx's floor (fixed mode) and the proxy's signatures, $ROUNDS rounds x ${DURATION}s"
hash=$(printf '%s' "$BENCH_AUTH" | sha256sum | cut -d' ' -f1)
cat >"$WORK_DIR/sign-proxy.toml" <<TOML
[server]
listen = "127.0.0.1:$LISTEN_PORT"
admin_listen = "off"

[audit]
path = "$WORK_DIR/sign-audit.jsonl"

[[keys]]
name = "iap"
kind = "in-app-purchase"
key_id = "$KEY_ID"
issuer_id = "$ISSUER_ID"
bundle_id = "com.example.app"
private_key_file = "$KEY_FILE"
apis = ["in-app-signing"]

[[clients]]
name = "bench"
secret_sha256 = "$hash"
allow = ["POST /proxy/v1/signatures/*"]
[clients.signing]
products = ["com.example.pro.*"]
offers = ["winback-*"]
TOML
start 1 upstream nginx -p "$WORK_DIR" -e "$WORK_DIR/sign-upstream.err" -c "$WORK_DIR/upstream.conf"
wait_port "$UPSTREAM_PORT"
ng_cpu=() ng_rps=() ng_p50=() ng_p99=() ng_err=() px_cpu=() px_rps=() px_p50=() px_p99=() px_err=()
for round in $(seq "$ROUNDS"); do
  start 0 nginx nginx -p "$WORK_DIR" -e "$WORK_DIR/sign-nginx.err" -c "$WORK_DIR/nginx-proxy.conf"
  NG=$PID; wait_port "$LISTEN_PORT"
  window "$NG" "$BENCH_DIR/load.lua" 32 0 2 >/dev/null   # warm-up
  read -r rps cpu p50 p99 err < <(window "$NG" "$BENCH_DIR/load.lua" 32 0 "$DURATION")
  echo "round $round: nginx fixed $rps req/s, $cpu µs CPU/request, errors $err"
  ng_cpu+=("$cpu") ng_rps+=("$rps") ng_p50+=("$p50") ng_p99+=("$p99") ng_err+=("$err"); stop "$NG"
  start 0 project ./target/release/apple-api-proxy serve --config "$WORK_DIR/sign-proxy.toml"
  PX=$PID; wait_port "$LISTEN_PORT"
  window "$PX" "$HERE/sign.lua" 32 0 2 >/dev/null   # warm-up
  read -r rps cpu p50 p99 err < <(window "$PX" "$HERE/sign.lua" 32 0 "$DURATION")
  echo "round $round: proxy sign $rps signatures/s, $cpu µs CPU/signature, errors $err"
  px_cpu+=("$cpu") px_rps+=("$rps") px_p50+=("$p50") px_p99+=("$p99") px_err+=("$err")
  [[ $round == "$ROUNDS" ]] || stop "$PX"
done
ng=$(median "${ng_cpu[@]}") px=$(median "${px_cpu[@]}") rps=$(median "${px_rps[@]}")
sum() { python3 -c 'import sys; print(sum(int(x) for x in sys.argv[1:]))' "$@"; }
fact raw_sign_us "$raw" "ring/p256_sign (criterion, CPU 0)"
row sign "nginx (fixed GET, the floor)" "$(median "${ng_rps[@]}")" "$ng" "$(median "${ng_p50[@]}")" \
  "$(median "${ng_p99[@]}")" "$(sum "${ng_err[@]}")"
row sign "project" "$rps" "$px" "$(median "${px_p50[@]}")" "$(median "${px_p99[@]}")" "$(sum "${px_err[@]}")" \
  "$(python3 -c "print($ng + 1.3 * $raw)")" "≤ nginx + 1.3 × raw sign"

echo "== sign: 3. latency at half of the proxy's peak (wrk paced, 2 ms between requests per connection)"
conns=$(python3 -c "print(max(2, round($rps / 2 * 0.0024)))")
read -r hrps _ p50 p99 herr < <(window "$PX" "$HERE/sign.lua" "$conns" 2 "$DURATION")
echo "proxy, offered ~$((${rps%.*} / 2))/s with $conns connections: $hrps signatures/s, p50 $p50 ms, p99 $p99 ms, errors $herr"
stop "$PX"
# The machine's own floor at the same pacing: nginx proxying `fixed` GETs (no signing).
start 0 nginx nginx -p "$WORK_DIR" -e "$WORK_DIR/sign-nginx.err" -c "$WORK_DIR/nginx-proxy.conf"
NG=$PID; wait_port "$LISTEN_PORT"
window "$NG" "$BENCH_DIR/load.lua" 32 0 2 >/dev/null   # warm-up
read -r nrps _ np50 np99 nerr < <(window "$NG" "$HERE/paced.lua" "$conns" 2 "$DURATION")
echo "nginx fixed, same pacing: $nrps req/s, p50 $np50 ms, p99 $np99 ms, errors $nerr"
stop "$NG"

python3 - "$raw" "$ng" "$px" "$rps" "$p99" "$endpoint" "$np99" <<'PY'
import sys
raw, ng, px, rps, p99, endpoint, np99 = map(float, sys.argv[1:])
target = ng + 1.3 * raw
print()
print("| sign mode (median) | value | target | met |")
print("|---|--:|--:|---|")
print(f"| CPU per signature (proxy, closed loop, audit on) | {px:.1f} µs | ≤ nginx {ng:.1f} + 1.3 × raw {raw:.1f} = {target:.1f} µs | {'yes' if px <= target else 'no'} |")
print(f"| signatures/s per core (1e6 / CPU per signature) | {1e6/px:,.0f} | — | |")
print(f"| signatures/s, one core, 32 connections | {rps:,.0f} | — | |")
print(f"| p99 at half of peak | {p99:.2f} ms | < 5 ms | {'yes' if p99 < 5 else 'no'} |")
print(f"| (the machine's floor: nginx, no signing, same pacing, p99) | {np99:.2f} ms | — | |")
print(f"| endpoint's own work in process (criterion) | {endpoint:.1f} µs | — | |")
PY
