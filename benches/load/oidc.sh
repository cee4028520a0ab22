#!/usr/bin/env bash
# The `oidc` mode (issue 16): the harness's `fixed` request (one path, so one cached Apple
# token) authenticated three ways, side by side in one run with the shared harness's pinning
# (the proxy alone on CPU 0; wrk, the upstream and the OIDC issuer on CPU 1), audit and
# metrics on: an `aap_` client secret, an RS256 identity token (GitHub, GitLab and Kubernetes
# sign with RSA) and an ES256 one, both from the stand-in's OIDC issuer (examples/oidc_issuer.rs,
# over its own TLS). The proxy remembers a verified token until it expires, so after the first
# request an identity token costs a lookup of its own text more than a secret.
# Target: CPU per request with an identity token within 10 % of the secret's.
# Run by scripts/loadtest.sh after the harness (OIDC=0 skips it), or by hand:
#   WORK_DIR=/tmp/proxybench.XXXXXX benches/load/oidc.sh     # a harness run's work dir
# ROUNDS (default 3) windows of DURATION (default 8) seconds per credential, the three
# alternating within each round; figures are medians. Uses only 127.0.0.1; every process it
# starts is stopped on exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
: "${WORK_DIR:?set WORK_DIR to the work dir of a harness run, which holds the CA, certificates and key}"
LISTEN_PORT=${LISTEN_PORT:-18080} UPSTREAM_PORT=${UPSTREAM_PORT:-18443}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-8}
KEY_FILE="$WORK_DIR/AuthKey_BENCHKEY01.p8" KEY_ID=BENCHKEY01 ISSUER_ID=57246542-96fe-1a63-e053-0824d011072a
SECRET=${BENCH_AUTH:-aap_benchsecret}
TAG=oidc
# shellcheck source=benches/load/common.sh
. "$HERE/common.sh"

echo "== oidc: 1. the stand-in's OIDC issuer and its tokens"
cargo build --release --example oidc_issuer
coproc ISSUER { taskset -c 1 ./target/release/examples/oidc_issuer "$WORK_DIR/oidc-ca.pem"; }
PIDS+=("$ISSUER_PID")
declare -A token
for _ in 1 2 3 4; do
  read -r what value <&"${ISSUER[0]}"
  token[$what]=$value
done
[[ -n ${token[RS256]:-} && -n ${token[ES256]:-} ]] || { echo "oidc: the issuer printed no tokens" >&2; exit 1; }
echo "issuer ${token[ISSUER]}, keys from ${token[JWKS]}"

hash=$(printf '%s' "$SECRET" | sha256sum | cut -d' ' -f1)
cat >"$WORK_DIR/oidc-proxy.toml" <<TOML
[server]
listen = "127.0.0.1:$LISTEN_PORT"
admin_listen = "off"

[audit]
path = "$WORK_DIR/oidc-audit.jsonl"

[upstream]
ca_file = "$WORK_DIR/ca.crt"

[apis.app-store-connect]
base_url = "https://127.0.0.1:$UPSTREAM_PORT"

[[identity_providers]]
name = "ci"
issuer = "${token[ISSUER]}"
audience = "apple-api-proxy"
jwks_url = "${token[JWKS]}"
ca_file = "$WORK_DIR/oidc-ca.pem"

[[keys]]
name = "bench"
kind = "team"
key_id = "$KEY_ID"
issuer_id = "$ISSUER_ID"
private_key_file = "$KEY_FILE"
apis = ["app-store-connect"]
token_lifetime = "20m"

[[clients]]
name = "bench"
secret_sha256 = "$hash"
allow = ["GET /v1/*"]

[[clients]]
name = "release-ci"
identity = { provider = "ci", claims = { repository = "example/app", ref = "refs/heads/main" } }
allow = ["GET /v1/*"]
TOML

echo "== oidc: 2. secret vs RS256 vs ES256 identity token, fixed, $ROUNDS rounds x ${DURATION}s each"
start 1 upstream nginx -p "$WORK_DIR" -e "$WORK_DIR/oidc-upstream.err" -c "$WORK_DIR/upstream.conf"
wait_port "$UPSTREAM_PORT"
start 0 project ./target/release/apple-api-proxy serve --config "$WORK_DIR/oidc-proxy.toml"
PX=$PID; wait_port "$LISTEN_PORT"
declare -A cred=([secret]=$SECRET [rs256]=${token[RS256]} [es256]=${token[ES256]})
declare -A cpu rps p50 p99 err
for round in $(seq "$ROUNDS"); do
  for c in secret rs256 es256; do
    BENCH_AUTH=${cred[$c]} window "$PX" "$HERE/paced.lua" 32 0 2 fixed >/dev/null   # warm-up
    read -r r u a b e < <(BENCH_AUTH=${cred[$c]} window "$PX" "$HERE/paced.lua" 32 0 "$DURATION" fixed)
    echo "round $round: $c $r req/s, $u µs CPU/request, p50 $a ms, p99 $b ms, errors $e"
    cpu[$c]+="$u " rps[$c]+="$r " p50[$c]+="$a " p99[$c]+="$b " err[$c]+="$e "
  done
done
stop "$PX"
# Every credential was audited as what it is.
audited=$(python3 -c 'import json,sys,collections
n=collections.Counter(json.loads(l).get("client_auth") for l in open(sys.argv[1]))
print(" ".join(f"{k}={v}" for k,v in sorted(n.items(), key=str)))' "$WORK_DIR/oidc-audit.jsonl")

echo
echo "| oidc mode, fixed (median of $ROUNDS) | req/s | CPU/request | vs secret | p50 | p99 | errors |"
echo "|---|--:|--:|--:|--:|--:|--:|"
# shellcheck disable=SC2086
base=$(median ${cpu[secret]})
for c in secret rs256 es256; do
  # shellcheck disable=SC2086
  printf '| %s | %.0f | %.1f µs | %+.1f %% | %.2f ms | %.2f ms | %s |\n' \
    "$(case $c in secret) echo "aap_ client secret";; rs256) echo "identity token, RS256";; es256) echo "identity token, ES256";; esac)" \
    "$(median ${rps[$c]})" "$(median ${cpu[$c]})" \
    "$(python3 -c 'import sys; print((float(sys.argv[1]) / float(sys.argv[2]) - 1) * 100)' "$(median ${cpu[$c]})" "$base")" \
    "$(median ${p50[$c]})" "$(median ${p99[$c]})" \
    "$(python3 -c 'import sys; print(sum(int(x) for x in sys.argv[1:]))' ${err[$c]})"
done
for c in secret rs256 es256; do
  target=()
  [[ $c != secret ]] && target=("$(python3 -c "print(1.1 * $base)")" "≤ 1.1 × the secret's")
  # shellcheck disable=SC2086
  row oidc "project, $(case $c in secret) echo "aap_ secret";; rs256) echo "RS256 identity token";; es256) echo "ES256 identity token";; esac)" \
    "$(median ${rps[$c]})" "$(median ${cpu[$c]})" "$(median ${p50[$c]})" "$(median ${p99[$c]})" \
    "$(python3 -c 'import sys; print(sum(int(x) for x in sys.argv[1:]))' ${err[$c]})" "${target[@]}"
done
# shellcheck disable=SC2086
python3 - "$base" "$(median ${cpu[rs256]})" "$(median ${cpu[es256]})" <<'PY'
import sys
s, r, e = map(float, sys.argv[1:])
worst = max(r, e)
print()
print(f"target: identity token within 10 % of the secret's CPU per request: worst {(worst / s - 1) * 100:+.1f} % -> {'met' if worst <= 1.1 * s else 'NOT met'}")
PY
echo "audit records by client_auth: $audited"
