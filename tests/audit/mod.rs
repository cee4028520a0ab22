//! The audit log, metrics and admin listener end to end (issue 5): one chained JSON line per
//! request whatever its outcome, fail-closed when the log cannot be written, Prometheus text
//! read by a real parser, readiness, and no secret in the log for any generated request.
//!
//! Audit records are written by a writer thread when a response body ends, so tests poll the
//! log for the expected number of lines (short sleeps, bounded) instead of sleeping long.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apple_api_proxy::proxy::codes;
use apple_standin::Faults;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use proptest::prelude::*;
use serde_json::Value;

use crate::support::*;

/// Every field DESIGN §8 lists, plus the record's `version`.
const FIELDS: &[&str] = &[
    "version",
    "seq",
    "time",
    "request_id",
    "client",
    "client_auth",
    "client_addr",
    "method",
    "path",
    "query",
    "api",
    "environment",
    "key",
    "key_id",
    "token_sha256",
    "decision",
    "status",
    "upstream_status",
    "diagnosis",
    "apple_request_id",
    "rate_limit_remaining",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "prev_sha256",
];

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// Where the harness config writes the audit log.
fn audit_log(world: &World) -> PathBuf {
    world.dir.path().join("audit.jsonl")
}

/// The complete (newline-terminated) lines of the log; none while it does not exist.
fn read_lines(path: &Path) -> Vec<String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => panic!("{}: {e}", path.display()),
    };
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    lines.pop(); // after the last newline: empty, or a line still being written
    lines
}

/// Polls until the log holds at least `n` lines (10 s at most), and returns them.
async fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = read_lines(path);
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} audit lines in {}, found {}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for `n` lines, then a moment more, and asserts there are exactly `n`.
async fn exactly_lines(path: &Path, n: usize) -> Vec<String> {
    wait_lines(path, n).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let lines = read_lines(path);
    assert_eq!(
        lines.len(),
        n,
        "exactly {n} audit lines:\n{}",
        lines.join("\n")
    );
    lines
}

/// Checks the chain (seq from 1, `prev_sha256` = SHA-256 of the previous line's bytes, the
/// first one 64 zeros), the version and that every §8 field is present on every line.
fn assert_chain(lines: &[String]) -> Vec<Value> {
    let mut prev = "0".repeat(64);
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("line {} is not JSON ({e}): {line}", i + 1));
            for field in FIELDS {
                assert!(
                    v.get(field).is_some(),
                    "line {}: no `{field}`: {line}",
                    i + 1
                );
            }
            assert_eq!(v["version"], 1, "line {}", i + 1);
            assert_eq!(v["seq"], (i + 1) as u64, "line {}: seq", i + 1);
            assert_eq!(v["prev_sha256"], prev.as_str(), "line {}: chain", i + 1);
            prev = apple_api_proxy::hex(&apple_api_proxy::sha256(line.as_bytes()));
            v
        })
        .collect()
}

fn bearer(received: &apple_standin::Received) -> String {
    received.headers["authorization"]
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_string()
}

fn request_id(r: &Reply) -> String {
    r.headers["x-request-id"].to_str().unwrap().to_string()
}

/// A GET on the admin listener.
async fn admin_get(addr: SocketAddr, path: &str) -> Reply {
    send(
        http::Request::get(format!("http://{addr}{path}"))
            .body(empty())
            .unwrap(),
    )
    .await
}

/// Polls `path` on the admin listener until it answers `want` (10 s at most).
async fn wait_admin_status(addr: SocketAddr, path: &str, want: StatusCode) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin_get(addr, path).await;
        if r.status == want {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still {} ({:?}), wanted {want}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `/metrics`, parsed by a real Prometheus text-format parser, with the raw text.
async fn scrape(addr: SocketAddr) -> (prometheus_parse::Scrape, String) {
    let r = admin_get(addr, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    (parsed, text)
}

/// The value of the scalar sample `metric` whose labels include `labels`.
fn sample(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .find_map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    sample(scrape, metric, labels)
        .unwrap_or_else(|| panic!("no sample {metric}{labels:?} in the scrape"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_leaves_exactly_one_chained_audit_line_with_the_right_decision() {
    let h = Harness::start().await;
    let log = audit_log(&h.world);

    let ok = h.get("/v1/apps?limit=5").await;
    assert_eq!(ok.status, StatusCode::OK);
    wait_lines(&log, 1).await;
    let unauthenticated = send(http::Request::get(h.url("/v1/apps")).body(empty()).unwrap()).await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    wait_lines(&log, 2).await;
    let denied = send(
        http::Request::delete(h.url("/v1/apps/1"))
            .header("authorization", format!("Bearer {}", h.world.reader_secret))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    wait_lines(&log, 3).await;
    let unrouted = h.get("/nope").await;
    assert_eq!(unrouted.status, StatusCode::NOT_FOUND);

    let lines = exactly_lines(&log, 4).await;
    let records = assert_chain(&lines);
    let replies = [&ok, &unauthenticated, &denied, &unrouted];
    let expected = [
        ("forwarded", 200, "GET", "/v1/apps"),
        ("unauthenticated", 401, "GET", "/v1/apps"),
        ("denied", 403, "DELETE", "/v1/apps/1"),
        ("no_route", 404, "GET", "/nope"),
    ];
    for ((rec, reply), (decision, status, method, path)) in
        records.iter().zip(replies).zip(expected)
    {
        assert_eq!(rec["decision"], decision, "{rec}");
        assert_eq!(rec["status"], status, "{rec}");
        assert_eq!(rec["method"], method, "{rec}");
        assert_eq!(rec["path"], path, "{rec}");
        assert_eq!(rec["request_id"], request_id(reply).as_str(), "{rec}");
        assert_eq!(rec["bytes_out"], reply.body.len() as u64, "{rec}");
        assert_eq!(rec["bytes_in"], 0, "{rec}");
        assert!(rec["completed"].is_boolean(), "{rec}");
        assert!(rec["duration_ms"].is_u64(), "{rec}");
        assert!(rec["time"].as_str().unwrap().ends_with('Z'), "{rec}");
        rec["client_addr"]
            .as_str()
            .unwrap()
            .parse::<SocketAddr>()
            .expect("client_addr is the peer address");
    }

    // Forwarded: who, which key, which token (by fingerprint), Apple's answer.
    let received = h.standin().received();
    assert_eq!(
        received.len(),
        1,
        "only the forwarded request reached Apple"
    );
    let jwt = bearer(&received[0]);
    let fwd = &records[0];
    assert_eq!(fwd["client"], "tester");
    assert_eq!(fwd["client_auth"], "secret");
    assert_eq!(fwd["query"], "limit=5");
    assert_eq!(fwd["api"], "app-store-connect");
    assert_eq!(fwd["environment"], "production");
    assert_eq!(fwd["key"], "connect");
    assert_eq!(fwd["key_id"], TEAM_KID);
    assert_eq!(fwd["token_sha256"], sha_hex(&jwt).as_str());
    assert_eq!(fwd["upstream_status"], 200);
    assert_eq!(fwd["retried"], false);
    assert!(fwd["diagnosis"].is_null());
    assert!(fwd["error"].is_null());
    assert!(
        fwd["rate_limit_remaining"].is_u64(),
        "App Store Connect's X-Rate-Limit is recorded: {fwd}"
    );
    let apple_id = ok.headers["x-apple-request-uuid"].to_str().unwrap();
    assert_eq!(fwd["apple_request_id"], apple_id);

    // Refused ones: no token minted, nothing from Apple.
    let unauth = &records[1];
    assert!(unauth["client"].is_null(), "{unauth}");
    assert_eq!(unauth["client_auth"], "none");
    assert_eq!(unauth["error"], "unauthenticated");
    let den = &records[2];
    assert_eq!(den["client"], "reader");
    assert_eq!(den["api"], "app-store-connect");
    assert_eq!(den["error"], "forbidden");
    assert!(records[3]["api"].is_null());
    for rec in &records[1..] {
        for field in ["token_sha256", "upstream_status", "apple_request_id", "key"] {
            assert!(rec[field].is_null(), "{field}: {rec}");
        }
    }
    h.stop().await;

    // Error: Apple unreachable (a closed port) → 502, audited as `error`.
    let closed = free_port();
    let h = Harness::with(Setup {
        connect_base_url: Some(format!("https://127.0.0.1:{closed}")),
        ..Setup::default()
    })
    .await;
    let failed = h.get("/v1/apps").await;
    assert_eq!(
        (failed.status, failed.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, codes::UPSTREAM_UNAVAILABLE)
    );
    let lines = exactly_lines(&audit_log(&h.world), 1).await;
    let rec = &assert_chain(&lines)[0];
    assert_eq!(rec["decision"], "error");
    assert_eq!(rec["status"], 502);
    assert_eq!(rec["error"], "upstream_unavailable");
    assert_eq!(rec["request_id"], request_id(&failed).as_str());
    assert_eq!(rec["bytes_out"], failed.body.len() as u64);
    assert!(rec["upstream_status"].is_null());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_sent_to_its_end_is_recorded_as_completed() {
    let h = Harness::start().await;
    let log = audit_log(&h.world);
    let mut replies = vec![h.get("/v1/apps").await];
    wait_lines(&log, 1).await;
    replies.push(h.get("/v1/salesReports?standin_bytes=100000").await);
    wait_lines(&log, 2).await;
    replies.push(send(http::Request::get(h.url("/v1/apps")).body(empty()).unwrap()).await);
    wait_lines(&log, 3).await;
    replies.push(h.get("/nope").await);
    let lines = exactly_lines(&log, 4).await;
    let records = assert_chain(&lines);
    let mut wrong = Vec::new();
    for (rec, reply) in records.iter().zip(&replies) {
        assert_eq!(rec["request_id"], request_id(reply).as_str());
        assert_eq!(
            rec["bytes_out"],
            reply.body.len() as u64,
            "the client got it all"
        );
        if rec["completed"] != true {
            wrong.push(format!(
                "{} {} -> {}",
                rec["method"], rec["path"], rec["status"]
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "fully sent, yet recorded completed: false: {wrong:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_transient_401_shows_in_the_audit_and_in_the_metrics() {
    let h = Harness::start().await;
    h.standin().set_faults(Faults {
        transient_401s: 1,
        ..Default::default()
    });
    let r = h.get("/v1/apps").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-proxy-diagnosis"], "APPLE_TRANSIENT_401");
    let lines = exactly_lines(&audit_log(&h.world), 1).await;
    let rec = &assert_chain(&lines)[0];
    assert_eq!(rec["decision"], "forwarded");
    assert_eq!(rec["retried"], true);
    assert_eq!(rec["diagnosis"], "APPLE_TRANSIENT_401");
    assert_eq!(rec["upstream_status"], 200);
    let received = h.standin().received();
    assert_eq!(received.len(), 2, "the first try and the retry");
    assert_eq!(
        rec["token_sha256"],
        sha_hex(&bearer(&received[1])).as_str(),
        "the fingerprint is of the token that was accepted"
    );
    assert_ne!(bearer(&received[0]), bearer(&received[1]), "re-minted");

    let (metrics, _) = scrape(h.admin_addr).await;
    assert_eq!(
        value(
            &metrics,
            "aap_upstream_retries_total",
            &[("api", "app-store-connect"), ("outcome", "succeeded")]
        ),
        1.0
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_mid_body_is_recorded_as_not_completed() {
    const SIZE: u64 = 200_000_000;
    let h = Harness::start().await;
    let client = http1_client();
    let response = client
        .request(
            h.request("GET", &format!("/v1/salesReports?standin_bytes={SIZE}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let mut body = response.into_body();
    let mut read = 0u64;
    while read < 256 * 1024 {
        let frame = body.frame().await.expect("more body").unwrap();
        if let Ok(data) = frame.into_data() {
            read += data.len() as u64;
        }
    }
    drop(body);
    drop(client);

    let lines = exactly_lines(&audit_log(&h.world), 1).await;
    let rec = &assert_chain(&lines)[0];
    assert_eq!(rec["request_id"], id.as_str());
    assert_eq!(rec["decision"], "forwarded");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["completed"], false, "{rec}");
    let out = rec["bytes_out"].as_u64().unwrap();
    assert!(
        (read..SIZE).contains(&out),
        "bytes_out {out}: at least what the client read ({read}), less than {SIZE}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_audit_log_refuses_requests_until_it_can_write_again() {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let log = audit_log(&world);
    // The sandbox runs as root, so read-only directories do not fail writes: a full disk does.
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    let h = Harness::from_world(world).await;
    let admin = h.admin_addr;
    wait_admin_status(admin, "/readyz", StatusCode::OK).await;

    // Served: the sink was healthy when it arrived. Its record cannot be written.
    let first = h.get("/v1/apps").await;
    assert_eq!(first.status, StatusCode::OK);
    let not_ready = wait_admin_status(admin, "/readyz", StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(
        String::from_utf8_lossy(&not_ready.body).contains("audit"),
        "{:?}",
        not_ready.body
    );

    const REFUSED: usize = 5;
    let mut ids = vec![request_id(&first)];
    for _ in 0..REFUSED {
        let r = h.get("/v1/apps").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, codes::AUDIT_UNAVAILABLE)
        );
        assert!(r.headers.contains_key("retry-after"));
        ids.push(request_id(&r));
    }
    assert_eq!(
        h.standin().received().len(),
        1,
        "nothing reaches Apple while the audit log cannot be written"
    );
    let (metrics, _) = scrape(admin).await;
    assert_eq!(value(&metrics, "aap_audit_healthy", &[]), 0.0);
    let refused = value(&metrics, "aap_audit_refused_requests_total", &[]);
    assert!(refused >= REFUSED as f64, "{refused}");
    assert!(value(&metrics, "aap_audit_write_failures_total", &[]) >= 1.0);

    // The disk comes back: the writer re-opens the path and writes its backlog.
    std::fs::remove_file(&log).unwrap();
    wait_admin_status(admin, "/readyz", StatusCode::OK).await;
    let last = h.get("/v1/apps").await;
    assert_eq!(last.status, StatusCode::OK);
    assert_eq!(h.standin().received().len(), 2);
    ids.push(request_id(&last));

    let lines = exactly_lines(&log, REFUSED + 2).await;
    let records = assert_chain(&lines);
    let logged: Vec<&str> = records
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        logged, ids,
        "the first request, the refusals and the last, in order"
    );
    for rec in [&records[0], &records[REFUSED + 1]] {
        assert_eq!(
            (rec["decision"].as_str(), rec["status"].as_u64()),
            (Some("forwarded"), Some(200))
        );
    }
    for rec in &records[1..=REFUSED] {
        assert_eq!(rec["status"], 503, "{rec}");
        assert_eq!(rec["error"], "audit_unavailable", "{rec}");
    }
    let (metrics, _) = scrape(admin).await;
    assert_eq!(value(&metrics, "aap_audit_healthy", &[]), 1.0);
    let written = value(&metrics, "aap_audit_records_written_total", &[]);
    assert_eq!(written, (REFUSED + 2) as f64);
    assert_eq!(value(&metrics, "aap_audit_records_lost_total", &[]), 0.0);
    eprintln!(
        "fail-closed: {refused} requests refused while the disk was full, 0 served unaudited; \
         {written} records written in order after recovery (seq 1..={}), chain valid",
        lines.len()
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_count_requests_with_fixed_labels() {
    let h = Harness::start().await;
    let log = audit_log(&h.world);
    let (before, _) = scrape(h.admin_addr).await;
    let requests_of = |s: &prometheus_parse::Scrape, client: &str, class: &str| {
        sample(
            s,
            "aap_requests_total",
            &[
                ("api", "app-store-connect"),
                ("client", client),
                ("status_class", class),
            ],
        )
        .unwrap_or(0.0)
    };
    let duration_count = |s: &prometheus_parse::Scrape| {
        sample(
            s,
            "aap_request_duration_seconds_count",
            &[("api", "app-store-connect")],
        )
        .unwrap_or(0.0)
    };

    assert_eq!(h.get("/v1/apps?filter[x]=y").await.status, StatusCode::OK);
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    let unauthenticated = send(
        http::Request::get(h.url("/v1/apps?token=aap_notasecret"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
    // Metrics are counted when a response ends, with the audit record: wait for those.
    wait_lines(&log, 3).await;
    let (after, text) = scrape(h.admin_addr).await;

    assert_eq!(
        requests_of(&after, "tester", "2xx") - requests_of(&before, "tester", "2xx"),
        2.0
    );
    // Authentication comes before routing: the unauthenticated request counts under api="none".
    let unauth = |s: &prometheus_parse::Scrape| {
        sample(
            s,
            "aap_requests_total",
            &[
                ("api", "none"),
                ("client", "unauthenticated"),
                ("status_class", "4xx"),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(unauth(&after) - unauth(&before), 1.0);

    let minted = |s| value(s, "aap_tokens_minted_total", &[]);
    let hits = |s| value(s, "aap_token_cache_hits_total", &[]);
    assert!(minted(&after) >= minted(&before) && hits(&after) >= hits(&before));
    assert!(
        minted(&after) + hits(&after) >= minted(&before) + hits(&before) + 2.0,
        "each forwarded request minted a token or used a cached one"
    );
    assert!(duration_count(&after) - duration_count(&before) >= 2.0);
    let histogram = after
        .samples
        .iter()
        .find(|s| {
            s.metric == "aap_request_duration_seconds"
                && s.labels.get("api") == Some("app-store-connect")
        })
        .expect("the latency histogram");
    match &histogram.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert!(buckets.len() > 2);
            assert!(buckets
                .iter()
                .any(|b| b.less_than.is_infinite() && b.count >= 2.0));
        }
        other => panic!("not a histogram: {other:?}"),
    }
    assert_eq!(value(&after, "aap_in_flight_requests", &[]), 0.0);

    // Fixed label sets only: no label value carries a path, a secret or a query — checked on
    // the parsed samples and, since the parser splits naively on ',' and '=', on the raw text.
    for s in &after.samples {
        for (k, v) in s.labels.iter() {
            for bad in ["/", "aap_", "?", "=", "&", "filter", "token"] {
                assert!(
                    !v.contains(bad),
                    "{}{{{k}={v:?}}} carries {bad:?}",
                    s.metric
                );
            }
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if let Some((_, labels)) = line.split_once('{') {
            let labels = labels.rsplit_once('}').map_or(labels, |(l, _)| l);
            for bad in [
                "/",
                "aap_",
                "?",
                "&",
                "filter",
                "token",
                h.world.secret.as_str(),
            ] {
                assert!(!labels.contains(bad), "label carries {bad:?}: {line}");
            }
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_before_start_up_completes_while_healthz_answers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(apple_api_proxy::admin::State::default());
    let task = tokio::spawn(apple_api_proxy::admin::serve(
        listener,
        state,
        std::future::pending::<()>(),
    ));
    assert_eq!(admin_get(addr, "/healthz").await.status, StatusCode::OK);
    let ready = admin_get(addr, "/readyz").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        String::from_utf8_lossy(&ready.body).contains("starting"),
        "{:?}",
        ready.body
    );
    assert_eq!(admin_get(addr, "/nope").await.status, StatusCode::NOT_FOUND);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_proxy_is_ready_and_requests_to_the_admin_listener_are_not_audited() {
    let h = Harness::start().await;
    let log = audit_log(&h.world);
    let admin = h.admin_addr;
    wait_admin_status(admin, "/readyz", StatusCode::OK).await;
    assert_eq!(admin_get(admin, "/healthz").await.status, StatusCode::OK);
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    wait_lines(&log, 1).await;

    for path in ["/metrics", "/healthz", "/readyz", "/nope", "/v1/apps"] {
        let r = admin_get(admin, path).await;
        let want = match path {
            "/nope" | "/v1/apps" => StatusCode::NOT_FOUND,
            _ => StatusCode::OK,
        };
        assert_eq!(r.status, want, "{path}");
    }
    let post = send(
        http::Request::post(format!("http://{admin}/metrics"))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);

    // A proxy request after them: its line is the second, and there is no other.
    let r = h.get("/v1/apps").await;
    let lines = exactly_lines(&log, 2).await;
    let records = assert_chain(&lines);
    assert_eq!(records[1]["request_id"], request_id(&r).as_str());
    assert!(records.iter().all(|r| r["path"] == "/v1/apps"));
    assert!(
        h.standin().received().len() == 2,
        "the admin listener never proxies"
    );
    h.stop().await;
}

/// Where a generated secret goes in a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Authorization,
    CustomHeader,
    PathSegment,
    QueryValue,
}

/// One generated request, remembered for the checks after the run.
#[derive(Debug)]
struct Sent {
    request_id: String,
    secrets: Vec<String>,
    expected_path: String,
    expected_query: String,
}

fn secret_request(
    h: &Harness,
    with_client_secret: bool,
    secrets: &[(String, Place)],
) -> (http::Request<Full<Bytes>>, String, String) {
    let mut path = "/v1/apps".to_string();
    let mut expected_path = path.clone();
    let mut query = Vec::new();
    let mut expected_query = Vec::new();
    let mut headers: Vec<(&str, String)> = Vec::new();
    for (i, (secret, place)) in secrets.iter().enumerate() {
        match place {
            Place::Authorization => headers.push(("authorization", format!("Bearer {secret}"))),
            Place::CustomHeader => headers.push(("x-custom", secret.clone())),
            Place::PathSegment => {
                path.push_str(&format!("/{secret}"));
                expected_path.push_str("/REDACTED");
            }
            Place::QueryValue => {
                query.push(format!("token{i}={secret}"));
                expected_query.push(format!("token{i}=REDACTED"));
            }
        }
    }
    query.push("filter[x]=y".to_string());
    expected_query.push("filter[x]=y".to_string());
    let target = format!("{path}?{}", query.join("&"));
    let mut req = http::Request::get(h.url(&target));
    if with_client_secret {
        req = req.header("proxy-authorization", format!("Bearer {}", h.world.secret));
    }
    for (name, v) in headers {
        req = req.header(name, v);
    }
    (
        req.body(empty()).unwrap(),
        expected_path,
        expected_query.join("&"),
    )
}

#[test]
fn no_generated_secret_or_token_ever_reaches_the_audit_log() {
    // The safe form: a path segment or query value that looks like a secret (a client secret
    // `aap_…`, a JWT `eyJ….….…`, a long base64/hex run; see `audit::looks_secret`) is
    // recorded as the literal `REDACTED`, keeping the rest of the path and query; headers
    // are never recorded, and tokens only as their SHA-256 (`token_sha256`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h = rt.block_on(Harness::start());
    let log = audit_log(&h.world);
    let place = prop::sample::select(vec![
        Place::Authorization,
        Place::CustomHeader,
        Place::PathSegment,
        Place::QueryValue,
    ]);
    let client_secret = "[A-Za-z0-9_-]{20,40}".prop_map(|s| format!("aap_{s}"));
    let segment = "[A-Za-z0-9_-]{16,40}";
    let jwt = (segment, segment, segment).prop_map(|(a, b, c)| format!("eyJ{a}.{b}.{c}"));
    let strategy = (
        prop::bool::weighted(0.8),
        (client_secret, place.clone()),
        (jwt, place),
    );
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        failure_persistence: None,
        ..proptest::test_runner::Config::with_cases(64)
    });
    let sent = RefCell::new(Vec::<Sent>::new());
    let result = runner.run(&strategy, |(with_client_secret, aap, jwt)| {
        let secrets = [aap, jwt];
        let (req, expected_path, expected_query) = secret_request(&h, with_client_secret, &secrets);
        let r = rt.block_on(send(req));
        prop_assert!(r.headers.contains_key("x-request-id"));
        prop_assert!(
            !r.status.is_server_error(),
            "{} for {:?}",
            r.status,
            secrets
        );
        sent.borrow_mut().push(Sent {
            request_id: request_id(&r),
            secrets: secrets.into_iter().map(|(s, _)| s).collect(),
            expected_path,
            expected_query,
        });
        Ok(())
    });
    let sent = sent.into_inner();
    let lines = rt.block_on(exactly_lines(&log, sent.len()));
    let received = h.standin().received();
    let mut forbidden: Vec<String> = vec![h.world.secret.clone(), h.world.reader_secret.clone()];
    rt.block_on(h.stop());
    result.unwrap();

    let records = assert_chain(&lines);
    let text = lines.join("\n");
    for s in &sent {
        for secret in &s.secrets {
            forbidden.push(secret.clone());
            // A JWT's segments, one by one (`eyJ` + ≥ 16 random characters each).
            forbidden.extend(
                secret
                    .split('.')
                    .filter(|p| p.len() >= 16)
                    .map(str::to_string),
            );
        }
    }
    for r in &received {
        let token = bearer(r);
        forbidden.extend(token.split('.').map(str::to_string));
        forbidden.push(token);
    }
    for needle in &forbidden {
        assert!(
            !text.contains(needle.as_str()),
            "{needle:?} appears in the audit log"
        );
    }
    let mut redacted = 0;
    for s in &sent {
        let rec = records
            .iter()
            .find(|r| r["request_id"] == s.request_id.as_str())
            .unwrap_or_else(|| panic!("no audit line for {}", s.request_id));
        assert_eq!(rec["path"], s.expected_path.as_str(), "{rec}");
        assert_eq!(rec["query"], s.expected_query.as_str(), "{rec}");
        redacted += rec.to_string().matches("REDACTED").count();
    }
    eprintln!(
        "audit redaction: {} generated requests, {} audit lines, {} values redacted, {} secrets/tokens absent",
        sent.len(),
        records.len(),
        redacted,
        forbidden.len()
    );
}
