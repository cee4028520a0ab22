#!/usr/bin/env bash
# Side-by-side load test (issue 7): apple-api-proxy against nginx (the floor: a proxy that
# signs nothing) and a hand-written Node.js proxy (the peer: signs per request), all in one
# run against the same local HTTPS upstream, using the shared harness in ../shared/bench
# (see its README). Prints the table the README's "Performance" section quotes, then the
# figures the harness does not take (benches/load/extras.sh: idle RSS and RSS with 1,000
# client connections, latency at half of peak load, a 1 GiB streamed response), then the
# `sign` mode (benches/load/sign.sh: in-app signatures against nginx's floor and ring's raw
# sign, signatures/s per core, p99 at half of peak), then the `hsm` mode (benches/load/hsm.sh:
# the same key in memory and in SoftHSM2, `unique` and `fixed`), the `apns` mode
# (benches/load/apns.sh: pushes against nginx's floor), and the `oidc` mode
# (benches/load/oidc.sh: `fixed` with an aap_ secret vs RS256 and ES256 identity tokens),
# and last one table of every mode with its target (benches/load/table.py), the one the README
# quotes.
#
#   scripts/loadtest.sh                   # every mode, 3 rounds each (~20 min), then the table
#   ROUNDS=1 EXTRAS=0 scripts/loadtest.sh # a quicker look (~8 min), noisier
#   SIGN=0 HSM=0 scripts/loadtest.sh      # without the sign and hsm modes (~2 min with 3 rounds)
#   (APNS=0, OIDC=0 likewise skip the apns and oidc modes)
#
# Passed through to the harness: ROUNDS, DURATION, WARMUP, START_WARMUP, CONNECTIONS,
# THREADS, MODES, PROXIES, UPSTREAM_PORT, LISTEN_PORT, WORK_DIR (see its README).
# BENCH_DIR overrides where the harness is (default: ../shared/bench beside the repo).
# The harness installs what it lacks (Debian nginx-light and wrk, npm packages) and uses
# only 127.0.0.1. Policy, audit and metrics stay on, as in production (project-cmd.sh).
# Don't run it beside builds or tests: the machine's other load shows up as noise.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-$ROOT/../shared/bench}
if [[ ! -x $BENCH_DIR/run.sh || ! -f $BENCH_DIR/project-cmd.sh ]]; then
  echo "loadtest: the benchmark harness is not at $BENCH_DIR (expected run.sh and project-cmd.sh)." >&2
  echo "loadtest: it lives in the shared/ folder beside this repository; set BENCH_DIR=/path/to/bench to point elsewhere." >&2
  exit 2
fi
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
export BENCH_DIR

cd "$ROOT"
echo "loadtest: building the release binary" >&2
cargo build --release --bin apple-api-proxy

echo "loadtest: machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -n1)" >&2
export ROUNDS=${ROUNDS:-3}
export WORK_DIR=${WORK_DIR:-$(mktemp -d /tmp/proxybench.XXXXXX)}
export BENCH_AUTH=${BENCH_AUTH:-aap_benchsecret}
# project-cmd.sh writes the proxy's config (client secret, allow rule, audit log on) and
# execs ./target/release/apple-api-proxy, so it runs from the repository root.
status=0
rm -f "$WORK_DIR/modes.jsonl"
PROJECT_CMD="exec $(printf '%q' "$BENCH_DIR/project-cmd.sh")" "$BENCH_DIR/run.sh" | tee "$WORK_DIR/harness.out" ||
  status=$?
if [[ ${EXTRAS:-1} != 0 ]]; then
  echo
  "$ROOT/benches/load/extras.sh" || status=$?
fi
if [[ ${SIGN:-1} != 0 ]]; then
  echo
  "$ROOT/benches/load/sign.sh" || status=$?
fi
if [[ ${APNS:-1} != 0 ]]; then
  echo
  "$ROOT/benches/load/apns.sh" || status=$?
fi
if [[ ${HSM:-1} != 0 ]]; then
  echo
  "$ROOT/benches/load/hsm.sh" || status=$?
fi
if [[ ${OIDC:-1} != 0 ]]; then
  echo
  "$ROOT/benches/load/oidc.sh" || status=$?
fi
echo
echo "== the one table: every mode of this run (benches/load/table.py $WORK_DIR), at $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + uncommitted changes')"
python3 "$ROOT/benches/load/table.py" "$WORK_DIR" || status=$?
exit "$status"
