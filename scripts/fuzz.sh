#!/usr/bin/env bash
# Runs each fuzz target (src/fuzz.rs) for FUZZ_SECONDS (default 60) in a release build and
# prints its executions. Targets: path, framing, config, explain, audit-lines, apple-errors,
# signing-body, client-key-jwt, audit-report.
#
#   scripts/fuzz.sh                         # every target, 60 s each
#   FUZZ_SECONDS=10 scripts/fuzz.sh framing # one target
#   FUZZ_SEED=42 scripts/fuzz.sh            # another mutation sequence
#
# Seeds live in fuzz/corpus/<target>/; an input that fails is saved to
# target/fuzz-crashes/<target>-<hash> and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZ_SECONDS=${FUZZ_SECONDS:-60}
targets=("$@")
((${#targets[@]})) || targets=(path framing config explain audit-lines apple-errors signing-body client-key-jwt audit-report)
status=0
for t in "${targets[@]}"; do
  test_name="fuzz::fuzz_$(case $t in
    path) echo path_check ;; framing) echo framing_guard ;; config) echo config_parser ;;
    explain) echo explain_jwt ;; audit-lines) echo audit_verify_lines ;;
    apple-errors) echo apple_error_bodies ;; signing-body) echo signing_bodies ;;
    client-key-jwt) echo client_key_jwts ;; audit-report) echo audit_report_lines ;; *) echo "unknown target $t" >&2; exit 2 ;;
  esac)"
  log=$(mktemp)
  if cargo test --release --quiet --lib "$test_name" -- --exact --nocapture --test-threads=1 >"$log" 2>&1; then
    grep -E '^fuzz ' "$log"
  else
    grep -E '^fuzz |panicked|saved as' "$log" || tail -20 "$log"
    status=1
  fi
  rm -f "$log"
done
exit "$status"
