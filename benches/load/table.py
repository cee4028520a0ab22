"""scripts/loadtest.sh's one table: every mode of one run side by side.

    python3 benches/load/table.py WORK_DIR

Reads the shared harness's `RESULT json=` line (saved as WORK_DIR/harness.out: `fixed` and
`unique` for nginx, node and the project) and the rows and figures the mode scripts appended
to WORK_DIR/modes.jsonl (benches/load/common.sh `row` and `fact`), and prints one Markdown
table with each target and whether it was met, then the scale figures (RSS, streaming).
A mode that did not run is listed as not run, never left out silently.
"""
import json
import os
import sys

work = sys.argv[1]
rows, facts = [], {}

harness = None
try:
    with open(os.path.join(work, "harness.out")) as f:
        for line in f:
            if line.startswith("RESULT json="):
                harness = json.loads(line[len("RESULT json="):])
except OSError:
    pass
try:
    with open(os.path.join(work, "modes.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if "fact" in d:
                facts[d["fact"]] = d
            else:
                rows.append(d)
except OSError:
    pass

raw = float(facts["raw_sign_us"]["value"]) if "raw_sign_us" in facts else None
first = []
if harness:
    by = {(r["proxy"], r["mode"]): r for r in harness["results"] if "cpu_us_per_req" in r}
    for mode in ("fixed", "unique"):
        for proxy in ("nginx", "node", "project"):
            r = by.get((proxy, mode))
            if not r:
                continue
            row = {"mode": mode, "who": proxy, "rps": r["rps"], "cpu_us": r["cpu_us_per_req"],
                   "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["errors"]}
            ng = by.get(("nginx", mode))
            if proxy == "project" and ng:
                if mode == "fixed":
                    row.update(target_us=ng["cpu_us_per_req"], target="≤ 1.0 × nginx")
                elif raw is not None:
                    row.update(target_us=ng["cpu_us_per_req"] + 1.2 * raw,
                               target=f"≤ nginx + 1.2 × raw sign ({raw:.1f} µs)")
                else:
                    row.update(target="≤ nginx + 1.2 × raw sign (raw sign not measured: SIGN=0)")
            first.append(row)
rows = first + rows

order = ["fixed", "unique", "sign", "apns", "oidc", "hsm unique", "hsm fixed"]
print("| mode | proxy | req/s | req/s per core | CPU µs/req | p50 ms | p99 ms | errors | target CPU µs/req | met |")
print("|---|---|--:|--:|--:|--:|--:|--:|---|---|")
for mode in order:
    these = [r for r in rows if r["mode"] == mode]
    if not these:
        print(f"| {mode} | (not run) | | | | | | | | |")
    for r in these:
        if "target_us" in r:
            met = "yes" if r["cpu_us"] <= r["target_us"] else f"no (×{r['cpu_us'] / r['target_us']:.2f})"
            target = f"{r['target']} = {r['target_us']:.1f}"
        else:
            met, target = "", r.get("target", "—")
        print(f"| {mode} | {r['who']} | {r['rps']:,.0f} | {1e6 / r['cpu_us']:,.0f} | {r['cpu_us']:.1f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} | {target} | {met} |")

labels = [
    ("rss_idle_kb", "RSS idle"),
    ("rss_1000_kb", "RSS, 1,000 open client connections"),
    ("rss_10000_kb", "RSS, 10,000 open client connections"),
    ("download_gib_s", "1 GiB download through the proxy, GiB/s"),
    ("download_rss_kb", "… its RSS kB"),
    ("upload_gib_s", "1 GiB upload through the proxy, GiB/s"),
    ("upload_rss_kb", "… its RSS kB"),
    ("half_peak_p99_ms_fixed", "p99 ms at half of peak, fixed"),
    ("half_peak_direct_p99_ms_fixed", "… straight to the upstream"),
    ("half_peak_p99_ms_unique", "p99 ms at half of peak, unique"),
    ("half_peak_direct_p99_ms_unique", "… straight to the upstream"),
    ("raw_sign_us", "ring's raw ES256 sign, µs"),
]
print()
print("| figure | value | how |")
print("|---|--:|---|")
for key, label in labels:
    f = facts.get(key)
    value = f["value"] if f else "(not run)"
    if f and key.startswith("rss_") and key.endswith("_kb"):
        value = f"{int(f['value']) / 1024:.1f} MiB"
    print(f"| {label} | {value} | {f['text'] if f else ''} |")
