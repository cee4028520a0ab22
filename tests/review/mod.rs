//! DESIGN §19, what security reviewers read, through the real binary: `audit report` against
//! counts computed from the log itself (rotation, replicas, period bounds, tampering), the
//! anchored head (`GET /audit/head`, the operational log, `audit verify --head`), and the
//! dashboard and alert rules in `deploy/monitoring` against the metrics the proxy exports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::Value;

use crate::second_round::{binary_audit, Binary};
use crate::support::*;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn get(b: &Binary, secret: Option<&str>, method: &str, path: &str) -> StatusCode {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", b.addr));
    if let Some(s) = secret {
        req = req.header("authorization", format!("Bearer {s}"));
    }
    send(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .status
}

/// A mix: forwarded by two clients and keys, denied, unauthenticated, unrouted.
async fn traffic(b: &Binary) -> usize {
    let (tester, reader) = (b.world.secret.clone(), b.world.reader_secret.clone());
    let mut n = 0;
    for _ in 0..3 {
        assert_eq!(
            get(b, Some(&tester), "GET", "/v1/apps").await,
            StatusCode::OK
        );
        n += 1;
    }
    assert_eq!(
        get(b, Some(&tester), "GET", "/inApps/v1/transactions/1").await,
        StatusCode::OK
    );
    assert_eq!(
        get(b, Some(&reader), "GET", "/v1/apps").await,
        StatusCode::OK
    );
    assert_eq!(
        get(b, Some(&reader), "POST", "/v1/apps").await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(b, None, "GET", "/v1/apps").await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(b, Some(&tester), "GET", "/nope").await,
        StatusCode::NOT_FOUND
    );
    n + 5
}

fn report(files: &[PathBuf], extra: &[&str]) -> (bool, String) {
    let out = bin()
        .args(["audit", "report"])
        .args(extra)
        .args(files)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// (client, key, API) → (requests, by decision, by status).
type Rows = BTreeMap<(String, String, String), (u64, BTreeMap<String, u64>, BTreeMap<String, u64>)>;

/// What the report's rows should say, computed from the records themselves.
fn expected_rows(records: &[Value], since: Option<&str>) -> Rows {
    let mut rows = BTreeMap::new();
    for r in records.iter().filter(|r| r.get("event").is_none()) {
        let time = r["time"].as_str().unwrap();
        if since.is_some_and(|s| time < s) {
            continue;
        }
        let name = |v: &Value, default: &str| v.as_str().unwrap_or(default).to_string();
        let id = (
            name(&r["client"], "(unauthenticated)"),
            name(&r["key"], "-"),
            name(&r["api"], "-"),
        );
        let row: &mut (u64, BTreeMap<String, u64>, BTreeMap<String, u64>) =
            rows.entry(id).or_default();
        row.0 += 1;
        *row.1.entry(name(&r["decision"], "-")).or_default() += 1;
        *row.2.entry(r["status"].to_string()).or_default() += 1;
    }
    rows
}

fn rows_of(report: &Value) -> Rows {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let counts = |v: &Value| -> BTreeMap<String, u64> {
                v.as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
                    .collect()
            };
            (
                (
                    r["client"].as_str().unwrap().to_string(),
                    r["key"].as_str().unwrap().to_string(),
                    r["api"].as_str().unwrap().to_string(),
                ),
                (
                    r["requests"].as_u64().unwrap(),
                    counts(&r["by_decision"]),
                    counts(&r["by_status"]),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_over_a_rotated_series_and_two_replicas_counts_what_the_logs_hold() {
    let a = Binary::start(Setup::default(), |t| t).await;
    let b = Binary::start(Setup::default(), |t| t).await;
    let first = traffic(&a).await;
    binary_audit(&a, first).await;
    // Rotate replica A's log, as logrotate does: rename, then SIGHUP to reopen.
    let dir = a.world.dir.path();
    std::fs::rename(dir.join("audit.jsonl"), dir.join("audit.jsonl.1")).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &a.child.id().to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = traffic(&a).await;
    binary_audit(&a, second).await;
    let third = traffic(&b).await;
    binary_audit(&b, third).await;

    let a1 = dir.join("audit.jsonl.1");
    let a2 = dir.join("audit.jsonl");
    let b1 = b.world.dir.path().join("audit.jsonl");
    let mut all: Vec<Value> = lines(&a1);
    all.extend(lines(&a2));
    all.extend(lines(&b1));
    // Files in a scrambled order: the report puts each replica's series in order itself.
    let files = vec![a2.clone(), b1.clone(), a1.clone()];
    let (ok, out) = report(&files, &["--format", "json"]);
    assert!(ok, "{out}");
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["chain"], "ok");
    assert_eq!(json["records"], (first + second + third) as u64);
    assert_eq!(rows_of(&json), expected_rows(&all, None));
    let chains = json["chains"].as_array().unwrap();
    assert_eq!(chains.len(), 2, "two replicas: {chains:?}");
    let series = chains
        .iter()
        .find(|c| c["files"].as_array().unwrap().len() == 2)
        .unwrap();
    assert_eq!(
        series["files"],
        serde_json::json!([a1.display().to_string(), a2.display().to_string()]),
        "the rotated series in order"
    );
    assert!(chains
        .iter()
        .all(|c| c["from_genesis"] == true && c["status"] == "ok"));
    assert_eq!(json["markers"]["records_lost"], 0);

    // --since: only what came after the rotation.
    let since = lines(&a2)[0]["time"].as_str().unwrap().to_string();
    let (ok, out) = report(
        &[a1.clone(), a2.clone()],
        &["--format", "json", "--since", &since],
    );
    assert!(ok, "{out}");
    let json: Value = serde_json::from_str(&out).unwrap();
    let mut a_only = lines(&a1);
    a_only.extend(lines(&a2));
    assert_eq!(rows_of(&json), expected_rows(&a_only, Some(&since)));
    assert_eq!(json["from"].as_str().unwrap(), since);
    // --until (exclusive): only what came before it.
    let (ok, out) = report(
        &[a1.clone(), a2.clone()],
        &["--format", "json", "--until", &since],
    );
    assert!(ok, "{out}");
    let json: Value = serde_json::from_str(&out).unwrap();
    let before: Vec<Value> = a_only
        .iter()
        .filter(|r| r["time"].as_str().unwrap() < since.as_str())
        .cloned()
        .collect();
    assert_eq!(rows_of(&json), expected_rows(&before, None));
    assert_eq!(json["records"], before.len() as u64);
    // The last line of the older file removed: the seam no longer links, and the report
    // says so rather than taking the files for two replicas.
    let text = std::fs::read_to_string(&a1).unwrap();
    let kept: Vec<&str> = text.lines().collect();
    let cut = dir.join("cut.jsonl.1");
    std::fs::write(&cut, kept[..kept.len() - 1].join("\n") + "\n").unwrap();
    let (ok, out) = report(&[a2.clone(), cut.clone()], &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("lines or files are missing"), "{out}");
    // The same cut with a line edited instead: the seq follows on, the hash does not.
    let edited = dir.join("edited.jsonl.1");
    let mut lines_a1: Vec<String> = kept.iter().map(|l| l.to_string()).collect();
    let n = lines_a1.len();
    lines_a1[n - 1] = lines_a1[n - 1].replace("\"status\":404", "\"status\":200");
    std::fs::write(&edited, lines_a1.join("\n") + "\n").unwrap();
    let (ok, out) = report(&[a2.clone(), edited.clone()], &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("a line at the seam was edited or removed"),
        "{out}"
    );
    // A bound that is not a time is refused, naming the flag.
    let (ok, out) = report(std::slice::from_ref(&a1), &["--since", "last tuesday"]);
    assert!(!ok && out.contains("--since"), "{out}");

    // The text and CSV forms.
    let (ok, text) = report(&files, &[]);
    assert!(ok);
    assert!(
        text.contains("chain ok") && text.contains("tester") && text.contains("reader"),
        "{text}"
    );
    let (ok, csv) = report(&files, &["--format", "csv"]);
    assert!(ok);
    assert_eq!(
        csv.lines().count(),
        1 + expected_rows(&all, None).len(),
        "{csv}"
    );
    assert!(csv.starts_with("client,key,api,requests,"));

    // Nothing secret in any form: no client secret, no token fingerprint.
    for secret in [&a.world.secret, &a.world.reader_secret] {
        assert!(!text.contains(secret.as_str()) && !csv.contains(secret.as_str()));
    }
    let fingerprint = all.iter().find_map(|r| r["token_sha256"].as_str()).unwrap();
    assert!(!out.contains(fingerprint) && !text.contains(fingerprint));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_log_is_reported_with_its_line_and_a_non_zero_exit() {
    let a = Binary::start(Setup::default(), |t| t).await;
    let n = traffic(&a).await;
    binary_audit(&a, n).await;
    let path = a.world.dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let tampered = a.world.dir.path().join("tampered.jsonl");
    // Line 3 says 403 where it said 200; line 4's prev_sha256 no longer matches.
    let edited: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == 2 {
                l.replace("\"status\":200", "\"status\":403")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&tampered, edited.join("\n") + "\n").unwrap();
    let (ok, out) = report(std::slice::from_ref(&tampered), &["--format", "json"]);
    assert!(!ok);
    let json: Value = serde_json::from_str(
        out.lines()
            .take_while(|l| !l.starts_with("error:"))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )
    .unwrap();
    let chain = json["chain"].as_str().unwrap();
    assert!(chain.contains("tampered.jsonl line 4"), "{chain}");
    assert!(out.contains("error: the audit chain is broken"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_is_served_logged_and_catches_a_cut_or_rewritten_tail() {
    let a = Binary::start(
        Setup {
            rust_log: Some("info"),
            ..Setup::default()
        },
        |t| t,
    )
    .await;
    let n = traffic(&a).await;
    binary_audit(&a, n).await;
    let r = send(
        http::Request::get(format!("http://{}/audit/head", a.admin))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let head = r.json();
    let path = a.world.dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let last = text.lines().last().unwrap();
    assert_eq!(head["seq"], text.lines().count() as u64);
    assert_eq!(head["sha256"], sha_hex(last));
    assert!(head["time"].is_string());
    let anchor = format!("{}:{}", head["seq"], head["sha256"].as_str().unwrap());

    let verify = |file: &Path| {
        let out = bin()
            .args(["audit", "verify", "--head", &anchor])
            .arg(file)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = verify(&path);
    assert!(ok, "{out}");
    assert!(out.contains("is in the log"), "{out}");
    // Cut the last line: the chain still verifies, the head does not.
    let cut = a.world.dir.path().join("cut.jsonl");
    let kept: Vec<&str> = text.lines().collect();
    std::fs::write(&cut, kept[..kept.len() - 1].join("\n") + "\n").unwrap();
    let (ok, out) = verify(&cut);
    assert!(!ok);
    assert!(
        out.starts_with("OK:") && out.contains("head missing"),
        "{out}"
    );
    // Rewrite the last line: the chain still verifies, the head does not.
    let rewritten = a.world.dir.path().join("rewritten.jsonl");
    let mut edited: Vec<String> = kept.iter().map(|l| l.to_string()).collect();
    let n = edited.len();
    edited[n - 1] = edited[n - 1].replace("\"status\":404", "\"status\":200");
    assert_ne!(edited[n - 1], kept[n - 1], "the last record is the 404");
    std::fs::write(&rewritten, edited.join("\n") + "\n").unwrap();
    let (ok, out) = verify(&rewritten);
    assert!(!ok);
    assert!(out.contains("head mismatch"), "{out}");

    // At shutdown the head goes to the operational log.
    std::process::Command::new("kill")
        .args(["-TERM", &a.child.id().to_string()])
        .status()
        .unwrap();
    let log = a.world.dir.path().join("stderr.log");
    let mut logged = String::new();
    for _ in 0..100 {
        logged = std::fs::read_to_string(&log).unwrap_or_default();
        if logged.contains("audit head at shutdown") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged.contains("audit head at shutdown"), "{logged}");
    assert!(
        logged.contains(head["sha256"].as_str().unwrap()),
        "{logged}"
    );
}

/// `aap_…` metric names in a text.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("aap_") {
        let start = i + at;
        let end = start
            + text[start..]
                .bytes()
                .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
                .count();
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if boundary {
            names.push(text[start..end].to_string());
        }
        i = end;
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_name_only_metrics_the_proxy_exports() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring");
    let dashboard = std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap();
    let rules = std::fs::read_to_string(dir.join("alerts.rules.yaml")).unwrap();
    let crd = std::fs::read_to_string(dir.join("prometheusrule.yaml")).unwrap();

    // The dashboard is Grafana JSON whose every panel queries something.
    let dash: Value = serde_json::from_str(&dashboard).unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "{}",
            p["title"]
        );
    }
    // The plain rules file and the PrometheusRule hold the same rules.
    let plain: Value = serde_norway::from_str(&rules).unwrap();
    let operator: Value = serde_norway::from_str(&crd).unwrap();
    assert_eq!(operator["kind"], "PrometheusRule");
    assert_eq!(operator["spec"], plain);
    let alerts: Vec<&str> = plain["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for want in [
        "AuthFailures",
        "RateBudgetLow",
        "AuditUnhealthy",
        "SignerDown",
        "Unavailable",
    ] {
        assert!(
            alerts.iter().any(|a| a.contains(want)),
            "{want}: {alerts:?}"
        );
    }

    // Every metric they name is in /metrics (families show their TYPE line before any
    // sample: `_total`, `_bucket`, `_sum`, `_count` are a family's samples).
    let a = Binary::start(Setup::default(), |t| t).await;
    traffic(&a).await;
    let exposition = a.metrics().await;
    for name in metric_names(&format!("{dashboard}\n{rules}")) {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            exposition.contains(&format!("# TYPE {family} ")),
            "{name} is not exported:\n{exposition}"
        );
    }

    // promtool, where it is installed, accepts the rules.
    match std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(dir.join("alerts.rules.yaml"))
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(_) => {
            eprintln!("promtool is not installed: the rules were parsed and their metrics checked")
        }
    }
}
