# Sourced by benches/load/extras.sh and sign.sh: the checks and process helpers both use.
# The caller sets TAG (its name in messages and log files), WORK_DIR and ROOT first.
# Every process started with `start` is tracked and stopped (TERM, then KILL) on exit.
for f in ca.crt server.crt server.key upstream.conf nginx-proxy.conf "AuthKey_BENCHKEY01.p8"; do
  [[ -s $WORK_DIR/$f ]] || { echo "$TAG: $WORK_DIR/$f is missing (run the harness first)" >&2; exit 2; }
done
cd "$ROOT"

PIDS=()
stop() { kill -TERM "$1" 2>/dev/null || true
  for _ in {1..50}; do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cleanup() { local p; for p in "${PIDS[@]}"; do stop "$p"; done; }
trap cleanup EXIT; trap 'exit 130' INT TERM
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "$TAG: nothing listens on :$1" >&2; return 1; }
start() { # cpu logname command... -> $PID
  local cpu=$1 log=$2; shift 2
  taskset -c "$cpu" "$@" >"$WORK_DIR/$TAG-$log.log" 2>&1 &
  PID=$!; PIDS+=("$PID"); }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
