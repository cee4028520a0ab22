#!/usr/bin/env bash
# The `hsm` mode (issue 15): the same key in memory (ring, from the .p8) and in SoftHSM2
# (PKCS#11, `key import`ed), measured side by side in one run with the shared harness's
# pinning (the proxy alone on CPU 0; wrk and the upstream on CPU 1), audit and metrics on:
#   - `unique` (a new scope, so a fresh signature, per request): CPU per request and p50/p99,
#     closed loop with 32 connections. SoftHSM2 runs inside the proxy's process, so its CPU
#     is in the figure;
#   - `fixed` (one scope: every request after the first is served a cached token): the cache
#     must hide the HSM entirely, i.e. the same CPU per request as the file key, within noise.
# Run by scripts/loadtest.sh after the harness (HSM=0 skips it), or by hand:
#   WORK_DIR=/tmp/proxybench.XXXXXX benches/load/hsm.sh     # a harness run's work dir
# ROUNDS (default 3) windows of DURATION (default 8) seconds per backend and mode, the two
# backends alternating; figures are medians. Needs SoftHSM2 (Debian softhsm2); uses only
# 127.0.0.1; every process it starts is stopped on exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
: "${WORK_DIR:?set WORK_DIR to the work dir of a harness run, which holds the CA, certificates and key}"
LISTEN_PORT=${LISTEN_PORT:-18080} UPSTREAM_PORT=${UPSTREAM_PORT:-18443}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-8}
MODULE=${MODULE:-/usr/lib/softhsm/libsofthsm2.so}
KEY_FILE="$WORK_DIR/AuthKey_BENCHKEY01.p8" KEY_ID=BENCHKEY01 ISSUER_ID=57246542-96fe-1a63-e053-0824d011072a
export BENCH_AUTH=${BENCH_AUTH:-aap_benchsecret}
TAG=hsm
# shellcheck source=benches/load/common.sh
. "$HERE/common.sh"
[[ -e $MODULE ]] && command -v softhsm2-util >/dev/null ||
  { echo "hsm: SoftHSM2 is not installed (apt-get install softhsm2)" >&2; exit 2; }

echo "== hsm: 1. a SoftHSM2 token holding the bench key (key import)"
HSM_DIR="$WORK_DIR/hsm"
rm -rf "$HSM_DIR"; mkdir -p "$HSM_DIR/tokens"
export SOFTHSM2_CONF="$HSM_DIR/softhsm2.conf" HSM_PIN=bench-pin-1234
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$HSM_DIR/tokens" >"$SOFTHSM2_CONF"
softhsm2-util --init-token --free --label bench --pin "$HSM_PIN" --so-pin bench-so-5678 >/dev/null
./target/release/apple-api-proxy key import "$KEY_FILE" --module "$MODULE" --token-label bench \
  --key-label AuthKey_BENCHKEY01 --pin-env HSM_PIN | grep '^pkcs11 = ' >"$HSM_DIR/line"
echo "$(cat "$HSM_DIR/line")"

hash=$(printf '%s' "$BENCH_AUTH" | sha256sum | cut -d' ' -f1)
config() { # backend -> the proxy.toml of project-cmd.sh, with the key in memory or in the HSM
  local source
  if [[ $1 == hsm ]]; then source=$(cat "$HSM_DIR/line"); else source="private_key_file = \"$KEY_FILE\""; fi
  cat >"$WORK_DIR/hsm-$1.toml" <<TOML
[server]
listen = "127.0.0.1:$LISTEN_PORT"
admin_listen = "off"

[audit]
path = "$WORK_DIR/hsm-$1-audit.jsonl"

[upstream]
ca_file = "$WORK_DIR/ca.crt"

[apis.app-store-connect]
base_url = "https://127.0.0.1:$UPSTREAM_PORT"

[[keys]]
name = "bench"
kind = "team"
key_id = "$KEY_ID"
issuer_id = "$ISSUER_ID"
$source
apis = ["app-store-connect"]
token_lifetime = "20m"

[[clients]]
name = "bench"
secret_sha256 = "$hash"
allow = ["GET /v1/*"]
TOML
}
config file; config hsm

echo "== hsm: 2. file key vs HSM key, $ROUNDS rounds x ${DURATION}s per backend and mode"
start 1 upstream nginx -p "$WORK_DIR" -e "$WORK_DIR/hsm-upstream.err" -c "$WORK_DIR/upstream.conf"
wait_port "$UPSTREAM_PORT"
declare -A cpu rps p50 p99 err
for round in $(seq "$ROUNDS"); do
  for backend in file hsm; do
    start 0 "project-$backend" ./target/release/apple-api-proxy serve --config "$WORK_DIR/hsm-$backend.toml"
    PX=$PID; wait_port "$LISTEN_PORT"
    for mode in fixed unique; do
      window "$PX" "$HERE/paced.lua" 32 0 2 "$mode" >/dev/null   # warm-up
      read -r r c a b e < <(window "$PX" "$HERE/paced.lua" 32 0 "$DURATION" "$mode")
      echo "round $round: $backend $mode $r req/s, $c µs CPU/request, p50 $a ms, p99 $b ms, errors $e"
      cpu[$backend-$mode]+="$c " rps[$backend-$mode]+="$r " p50[$backend-$mode]+="$a "
      p99[$backend-$mode]+="$b " err[$backend-$mode]+="$e "
    done
    stop "$PX"
  done
done

echo
echo "| hsm mode (median of $ROUNDS) | key | req/s | CPU/request | p50 | p99 | errors |"
echo "|---|---|--:|--:|--:|--:|--:|"
for mode in unique fixed; do
  for backend in file hsm; do
    k=$backend-$mode
    # shellcheck disable=SC2086
    printf '| %s | %s | %.0f | %.1f µs | %.2f ms | %.2f ms | %s |\n' "$mode" \
      "$([[ $backend == hsm ]] && echo "SoftHSM2 (PKCS#11)" || echo "memory (ring)")" \
      "$(median ${rps[$k]})" "$(median ${cpu[$k]})" "$(median ${p50[$k]})" "$(median ${p99[$k]})" \
      "$(python3 -c 'import sys; print(sum(int(x) for x in sys.argv[1:]))' ${err[$k]})"
  done
done
for mode in unique fixed; do
  for backend in file hsm; do
    k=$backend-$mode
    target=()
    # shellcheck disable=SC2086
    [[ $k == hsm-fixed ]] && target=("$(python3 -c "print(1.1 * $(median ${cpu[file-fixed]}))")" "≤ 1.1 × the file key's (the cache hides the HSM)")
    # shellcheck disable=SC2086
    row "hsm $mode" "project, $([[ $backend == hsm ]] && echo "SoftHSM2 key" || echo "file key")" \
      "$(median ${rps[$k]})" "$(median ${cpu[$k]})" "$(median ${p50[$k]})" "$(median ${p99[$k]})" \
      "$(python3 -c 'import sys; print(sum(int(x) for x in sys.argv[1:]))' ${err[$k]})" "${target[@]}"
  done
done
# shellcheck disable=SC2086
python3 - "$(median ${cpu[file-unique]})" "$(median ${cpu[hsm-unique]})" "$(median ${cpu[file-fixed]})" "$(median ${cpu[hsm-fixed]})" <<'PY'
import sys
fu, hu, ff, hf = map(float, sys.argv[1:])
print()
print(f"unique: the HSM adds {hu - fu:.1f} µs CPU per fresh signature (x{hu / fu:.2f} the file key's request)")
print(f"fixed: HSM key {hf:.1f} µs vs file key {ff:.1f} µs CPU per request ({(hf - ff) / ff * 100:+.1f} %): the cache hides the HSM")
PY
