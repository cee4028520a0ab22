#!/usr/bin/env bash
# Instructions per request, the stable figure for comparing two builds (README
# "Performance"): the proxy under callgrind in front of the shared harness's nginx upstream,
# instrumentation on only while wrk drives `fixed` mode after a warm-up, total Ir divided by
# the requests wrk counted. Wall-clock figures on this VM move ±10 %; this moves ±0.4 %.
#
#   scripts/callgrind.sh [BIN] [TAG]     # BIN defaults to target/release/apple-api-proxy
#   DURATION=15 WARMUP=5 WORK_DIR=/tmp/cgbench scripts/callgrind.sh OLD_BIN old
#   MODE=sign scripts/callgrind.sh       # in-app signatures (benches/load/sign.lua) instead
#   MODE=unique scripts/callgrind.sh     # a new path, so a fresh ES256 signature, per request
#   MODE=oidc-rs256 scripts/callgrind.sh # `fixed` with an RS256 identity token instead of the
#                                        # secret (oidc-es256: ES256), from examples/oidc_issuer
#
# Build both sides the same way first, e.g.
#   RUSTFLAGS="-C force-frame-pointers=yes" cargo build --release --bin apple-api-proxy
# Needs valgrind, nginx, wrk, openssl (installed if missing, Debian/Ubuntu); the harness in
# ../shared/bench (BENCH_DIR overrides). Only 127.0.0.1. Don't run it beside builds.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release/apple-api-proxy}
TAG=${2:-run}
DURATION=${DURATION:-15} WARMUP=${WARMUP:-5}
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
W=${WORK_DIR:-/tmp/cgbench}
UPSTREAM_PORT=${UPSTREAM_PORT:-18443} LISTEN_PORT=${LISTEN_PORT:-18080}
[[ -x $BIN ]] || { echo "callgrind: no binary at $BIN (build it first)" >&2; exit 2; }
[[ -f $BENCH_DIR/load.lua && -f $BENCH_DIR/conf/upstream.conf ]] ||
  { echo "callgrind: the harness is not at $BENCH_DIR (set BENCH_DIR)" >&2; exit 2; }

need=()
for p in valgrind:valgrind nginx:nginx-light wrk:wrk openssl:openssl taskset:util-linux; do
  command -v "${p%%:*}" >/dev/null || need+=("${p#*:}")
done
if ((${#need[@]})); then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

mkdir -p "$W/tmp"
cd "$W"
KEY_FILE=$W/AuthKey_BENCHKEY01.p8
if [[ ! -s $KEY_FILE ]]; then
  ec='-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes'
  openssl req -x509 $ec -keyout ca.key -out ca.crt -days 30 -subj '/CN=callgrind test CA' 2>/dev/null
  openssl req $ec -keyout server.key -out server.csr -subj '/CN=localhost' 2>/dev/null
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -out server.crt \
    -extfile <(printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'extendedKeyUsage=serverAuth') 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$KEY_FILE"
fi
sed -e "s|@WORK@|$W|g; s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" "$BENCH_DIR/conf/upstream.conf" >upstream.conf
secret=aap_benchsecret
cat >proxy.toml <<TOML
[server]
listen = "127.0.0.1:$LISTEN_PORT"
admin_listen = "127.0.0.1:$((LISTEN_PORT + 10))"
[audit]
path = "$W/audit.jsonl"
[upstream]
ca_file = "$W/ca.crt"
[apis.app-store-connect]
base_url = "https://127.0.0.1:$UPSTREAM_PORT"
[[keys]]
name = "bench"
kind = "team"
key_id = "BENCHKEY01"
issuer_id = "57246542-96fe-1a63-e053-0824d011072a"
private_key_file = "$KEY_FILE"
apis = ["app-store-connect"]
token_lifetime = "20m"
[[keys]]
name = "iap"
kind = "in-app-purchase"
key_id = "BENCHKEY02"
issuer_id = "57246542-96fe-1a63-e053-0824d011072a"
bundle_id = "com.example.app"
private_key_file = "$KEY_FILE"
apis = ["in-app-signing"]
[[clients]]
name = "bench"
secret_sha256 = "$(printf '%s' "$secret" | sha256sum | cut -d' ' -f1)"
allow = ["GET /v1/*", "POST /proxy/v1/signatures/*"]
[clients.signing]
products = ["com.example.pro.*"]
offers = ["winback-*"]
TOML

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_open "$LISTEN_PORT" && { echo "callgrind: port $LISTEN_PORT is busy" >&2; exit 1; }
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' EXIT
auth=$secret
if [[ ${MODE:-fixed} == oidc-* ]]; then
  # An identity token (DESIGN §17) from the stand-in's issuer, for a client of its own.
  issuer_bin=$ROOT/target/release/examples/oidc_issuer
  [[ -x $issuer_bin ]] || { echo "callgrind: build it first: cargo build --release --example oidc_issuer" >&2; exit 2; }
  coproc ISSUER { taskset -c 1 "$issuer_bin" "$W/oidc-ca.pem"; }
  pids+=("$ISSUER_PID")
  declare -A said
  for _ in 1 2 3 4; do read -r what value <&"${ISSUER[0]}"; said[$what]=$value; done
  alg=${MODE#oidc-}
  auth=${said[${alg^^}]:?the issuer printed no ${alg^^} token}
  cat >>proxy.toml <<TOML
[[identity_providers]]
name = "ci"
issuer = "${said[ISSUER]}"
audience = "apple-api-proxy"
jwks_url = "${said[JWKS]}"
ca_file = "$W/oidc-ca.pem"
[[clients]]
name = "release-ci"
identity = { provider = "ci", claims = { repository = "example/app", ref = "refs/heads/main" } }
allow = ["GET /v1/*"]
TOML
fi
if ! port_open "$UPSTREAM_PORT"; then
  taskset -c 1 nginx -c "$W/upstream.conf" >"$W/nginx.out" 2>&1 &
  pids+=($!)
fi
rm -f audit.jsonl audit.jsonl.chain "cg.$TAG.out"*
taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$W/cg.$TAG.out" \
  "$BIN" serve --config "$W/proxy.toml" >"$W/proxy.$TAG.log" 2>&1 &
vg=$!
pids+=("$vg")
for _ in $(seq 600); do port_open "$LISTEN_PORT" && break; kill -0 "$vg" || { cat "proxy.$TAG.log"; exit 1; }; sleep 0.2; done
export BENCH_MODE=fixed BENCH_AUTH=$auth
[[ ${MODE:-fixed} == unique ]] && BENCH_MODE=unique   # a fresh signature per request
url=http://127.0.0.1:$LISTEN_PORT/
script=$BENCH_DIR/load.lua
[[ ${MODE:-fixed} == sign ]] && script=$ROOT/benches/load/sign.lua
timeout 120 taskset -c 1 wrk -t2 -c32 -d"${WARMUP}s" -s "$script" "$url" >/dev/null
callgrind_control -i on "$vg" >/dev/null 2>&1
out=$(timeout 120 taskset -c 1 wrk -t2 -c32 -d"${DURATION}s" -s "$script" "$url")
callgrind_control -i off "$vg" >/dev/null 2>&1
callgrind_control -d measured "$vg" >/dev/null 2>&1
sleep 1
kill -TERM "$vg"; wait "$vg" || true
grep -E "Non-2xx|Socket errors" <<<"$out" && { echo "callgrind: wrk saw errors:" >&2; grep -E "Non-2xx|Socket errors" <<<"$out" >&2; exit 1; }
reqs=$(sed -n 's/^WRK {"requests":\([0-9]*\).*/\1/p' <<<"$out")
dump=$(ls "$W/cg.$TAG.out".* | head -n1)
ir=$(sed -n 's/^totals: //p' "$dump" | head -n1 | awk '{print $1}')
echo "tag=$TAG requests=$reqs Ir=$ir Ir/request=$((ir / reqs)) profile=$dump"
