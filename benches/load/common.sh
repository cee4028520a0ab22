# Sourced by benches/load/extras.sh, sign.sh and hsm.sh: the checks and process helpers both use.
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
median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
# wrk against the proxy port: pid script connections delay_ms seconds [mode]; measures pid's
# CPU. mode is the scripts' BENCH_MODE (fixed: one path; unique: a new path per request).
# -> "rps cpu_us_per_request p50_ms p99_ms errors"
window() {
  local pid=$1 script=$2 conns=$3 delay=$4 secs=$5 mode=${6:-fixed} t0 t1 out
  t0=$(ticks "$pid")
  out=$(BENCH_MODE=$mode DELAY_MS=$delay timeout $((secs + 30)) taskset -c 1 \
    wrk -t2 -c"$conns" -d"${secs}s" -s "$script" "http://127.0.0.1:$LISTEN_PORT/" | sed -n 's/^WRK //p')
  t1=$(ticks "$pid")
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); n=max(d["requests"],1); t=(int(sys.argv[2]))*1e6/int(sys.argv[3])
print("%.0f %.1f %.2f %.2f %d" % (d["requests"]*1e6/d["duration_us"], t/n, d["p50_us"]/1000, d["p99_us"]/1000, d["errors"]+d["non2xx"]))' \
    "$out" "$((t1 - t0))" "$(getconf CLK_TCK)"
}
# A row of scripts/loadtest.sh's one table (benches/load/table.py reads $WORK_DIR/modes.jsonl):
#   row MODE WHO RPS CPU_US P50_MS P99_MS ERRORS [TARGET_US TARGET_TEXT]
# and a figure beside it (RSS, throughput, the raw sign): fact NAME VALUE [TEXT]
row() {
  python3 -c 'import json,sys
a=sys.argv[1:]
r={"mode":a[0],"who":a[1],"rps":float(a[2]),"cpu_us":float(a[3]),"p50_ms":float(a[4]),"p99_ms":float(a[5]),"errors":int(float(a[6]))}
if len(a)>8: r.update(target_us=float(a[7]),target=a[8])
print(json.dumps(r))' "$@" >>"$WORK_DIR/modes.jsonl"
}
fact() {
  python3 -c 'import json,sys; a=sys.argv[1:]; print(json.dumps({"fact":a[0],"value":a[1],"text":a[2] if len(a)>2 else ""}))' \
    "$@" >>"$WORK_DIR/modes.jsonl"
}
