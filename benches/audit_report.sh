#!/usr/bin/env bash
# `audit report` over a generated log (issue 18's speed figure): RECORDS (default 1,000,000)
# records in one valid hash chain, shaped as the proxy writes them (several clients, keys,
# APIs, decisions, statuses, a few Apple 401 causes and in-app signatures), then the report
# timed with its peak RSS. Target: ≥ 200k records/s, RSS under 50 MB.
#   benches/audit_report.sh              # builds the release binary first
# Writes only under WORK_DIR (default a new /tmp dir); uses no network.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RECORDS=${RECORDS:-1000000}
WORK_DIR=${WORK_DIR:-$(mktemp -d /tmp/auditreport.XXXXXX)}
cd "$ROOT"
cargo build --release --bin apple-api-proxy >&2
python3 - "$RECORDS" "$WORK_DIR/audit.jsonl" <<'PY'
import hashlib, json, sys
n, path = int(sys.argv[1]), sys.argv[2]
clients = [("ci", "connect", "app-store-connect"), ("billing", "storekit", "app-store-server"),
           ("shop", "storekit", "in-app-signing"), ("reader", "me", "app-store-connect")]
prev = "0" * 64
with open(path, "wb") as out:
    for seq in range(1, n + 1):
        client, key, api = clients[seq % len(clients)]
        signed = api == "in-app-signing"
        status = 401 if seq % 997 == 0 else (403 if seq % 499 == 0 else 200)
        rec = {"version": 1, "seq": seq,
               "time": "2026-11-%02dT%02d:%02d:%02d.%03dZ" % (1 + seq * 30 // n, seq % 24, seq % 60, seq % 60, seq % 1000),
               "request_id": "%012x-%08x" % (seq, seq), "client": client, "client_auth": "secret",
               "client_addr": "10.0.0.%d:%d" % (seq % 250, 40000 + seq % 20000), "method": "GET",
               "path": "/v1/apps/%d" % seq, "query": None, "api": api, "environment": "production",
               "key": key, "key_id": "2X9R4HXF34", "token_sha256": None if signed else hashlib.sha256(str(seq).encode()).hexdigest(),
               "decision": "signed" if signed else "forwarded", "status": status,
               "upstream_status": None if signed else status,
               "diagnosis": "KEY_REVOKED" if status == 401 else ("MISSING_ROLE" if status == 403 else None),
               "retried": False, "connect_retries": 0, "sandbox_fallback": False,
               "apple_request_id": None, "rate_limit_remaining": 3000, "bytes_in": 0, "bytes_out": 230,
               "duration_ms": 3, "completed": True, "error": None}
        if signed:
            rec["signing"] = {"kind": "promotional-offer", "bundle_id": "com.example.app",
                              "product_id": "com.example.pro.%d" % (seq % 5), "offer_id": "winback-1",
                              "transaction_id": None, "nonce": "00000000-0000-4000-8000-%012x" % seq,
                              "sha256": hashlib.sha256(b"s%d" % seq).hexdigest()}
        rec["prev_sha256"] = prev
        line = json.dumps(rec, separators=(",", ":")).encode()
        prev = hashlib.sha256(line).hexdigest()
        out.write(line + b"\n")
PY
ls -l "$WORK_DIR/audit.jsonl" >&2
# Warm the page cache, then measure.
cat "$WORK_DIR/audit.jsonl" >/dev/null
/usr/bin/time -f 'elapsed %e s, peak RSS %M KiB' ./target/release/apple-api-proxy audit report \
  --format json "$WORK_DIR/audit.jsonl" >"$WORK_DIR/report.json" 2>"$WORK_DIR/time.txt" || true
cat "$WORK_DIR/time.txt"
python3 - "$WORK_DIR/report.json" "$WORK_DIR/time.txt" "$RECORDS" <<'PY'
import json, re, sys
report = json.load(open(sys.argv[1]))
t = open(sys.argv[2]).read()
secs = float(re.search(r"elapsed ([0-9.]+) s", t).group(1))
rss = int(re.search(r"peak RSS ([0-9]+) KiB", t).group(1))
n = int(sys.argv[3])
print(f"records {report['records']} (generated {n}), chain {report['chain']}, rows {len(report['rows'])}")
print(f"{n / secs:,.0f} records/s ({secs:.2f} s), peak RSS {rss / 1024:.1f} MiB (targets: >= 200,000/s, < 50 MB)")
PY
