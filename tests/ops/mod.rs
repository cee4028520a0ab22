//! Operations under faults: upstream timeouts and stalls, connection failures and retries,
//! hot reload (applied, rejected, under load), the egress CONNECT proxy, overload, and
//! SIGTERM under load. Each fault shows the client a clear answer and leaves the proxy
//! healthy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::support::*;

pub(crate) fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// How the bad "Apple" behaves after reading a request head.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Accepts TCP and never speaks TLS.
    NoHandshake,
    /// Reads the request, never answers.
    StallBeforeHeaders,
    /// Sends headers for 1,000,000 bytes, 1,000 of them, then nothing.
    StallMidBody,
    /// Sends headers and 1,000 bytes, then closes the connection.
    ResetMidBody,
    /// Sends 10 chunks of 100 bytes, one every 150 ms.
    Drip,
}

/// A misbehaving upstream over TLS (HTTP/1.1 only), certified by `ca`.
async fn bad_apple(ca: &TestCa, behaviour: Behaviour) -> SocketAddr {
    let acceptor = tls_acceptor(ca, "bad apple", &[b"http/1.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Behaviour::NoHandshake = behaviour {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(tcp);
                    return;
                }
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 16384];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                match behaviour {
                    Behaviour::NoHandshake => {}
                    Behaviour::StallBeforeHeaders => {
                        tokio::time::sleep(Duration::from_secs(30)).await
                    }
                    Behaviour::StallMidBody => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
                            .await;
                        let _ = s.write_all(&[b'x'; 1000]).await;
                        let _ = s.flush().await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    Behaviour::ResetMidBody => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
                            .await;
                        let _ = s.write_all(&[b'x'; 1000]).await;
                        let _ = s.flush().await;
                    }
                    Behaviour::Drip => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                            .await;
                        for _ in 0..10 {
                            let _ = s.write_all(&[b'd'; 100]).await;
                            let _ = s.flush().await;
                            tokio::time::sleep(Duration::from_millis(150)).await;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            });
        }
    });
    addr
}

/// A harness whose App Store Connect upstream is `bad`, trusting `ca` as well as the
/// stand-in, with short timeouts.
async fn harness_with_bad_apple(ca: &TestCa, bad: SocketAddr) -> Harness {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let ca_path = world.dir.path().join("standin-ca.pem");
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&ca_path).unwrap(),
        ca.cert.pem()
    );
    std::fs::write(&ca_path, both).unwrap();
    let connect = world.standin.url(apple_standin::Role::AppStoreConnect);
    let text = std::fs::read_to_string(&world.config_path)
        .unwrap()
        .replace(
            &format!("base_url = \"{connect}\"\n[apis.notary]"),
            &format!(
                "base_url = \"https://127.0.0.1:{}\"\n[apis.notary]",
                bad.port()
            ),
        )
        .replace(
            "request_timeout = \"20s\"",
            "request_timeout = \"1s\"\nbody_idle_timeout = \"700ms\"",
        )
        .replace("connect_timeout = \"2s\"", "connect_timeout = \"500ms\"");
    std::fs::write(&world.config_path, text).unwrap();
    Harness::from_world(world).await
}

/// POSTs `{}` to `path` once over HTTP/1.1 and once over HTTP/2, and gives up on each after
/// 300 ms: the HTTP/1.1 connection is closed, the HTTP/2 request's future dropped (which
/// resets its stream).
pub(crate) async fn post_and_abandon_on_h1_and_h2(addr: SocketAddr, secret: &str, path: &str) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {secret}"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_millis(300), http2_client().request(request)).await;
}

pub(crate) async fn audit_lines(h: &Harness, n: usize) -> Vec<serde_json::Value> {
    audit_lines_in(h.world.dir.path(), n).await
}

/// The audit lines in `dir/audit.jsonl`, once there are at least `n` (waits up to 5 s).
pub(crate) async fn audit_lines_in(dir: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let path = dir.join("audit.jsonl");
    for _ in 0..200 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the audit log never reached {n} lines");
}

/// After a fault, the proxy still serves the healthy APIs.
async fn still_healthy(h: &Harness) {
    assert_eq!(
        h.get("/inApps/v1/transactions/1").await.status,
        StatusCode::OK,
        "the proxy is healthy afterwards"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_gets_a_504_after_request_timeout() {
    let ca = TestCa::new("bad apple CA");
    let h = harness_with_bad_apple(&ca, bad_apple(&ca, Behaviour::StallBeforeHeaders).await).await;
    let started = Instant::now();
    let r = h.get("/v1/apps").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "PROXY_UPSTREAM_TIMEOUT")
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    still_healthy(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_cut_at_the_connect_timeout() {
    let ca = TestCa::new("bad apple CA");
    let h = harness_with_bad_apple(&ca, bad_apple(&ca, Behaviour::NoHandshake).await).await;
    let started = Instant::now();
    let r = h.get("/v1/apps").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "PROXY_UPSTREAM_TIMEOUT")
    );
    assert!(
        r.json()["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("connecting"),
        "{:?}",
        r.json()
    );
    assert!(
        started.elapsed() < Duration::from_millis(950),
        "the 500 ms connect timeout, not the 1 s request timeout: {:?}",
        started.elapsed()
    );
    still_healthy(&h).await;
    h.stop().await;
}

/// Reads a response body to its end or its error; returns (bytes, whether it ended cleanly).
async fn drain(response: http::Response<hyper::body::Incoming>) -> (usize, bool) {
    let mut body = response.into_body();
    let mut n = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the stream ends or fails in time")
        {
            None => return (n, true),
            Some(Err(_)) => return (n, false),
            Some(Ok(frame)) => n += frame.data_ref().map_or(0, |d| d.len()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_stalls_mid_body_is_cut_after_the_idle_timeout_and_audited_incomplete() {
    let ca = TestCa::new("bad apple CA");
    let h = harness_with_bad_apple(&ca, bad_apple(&ca, Behaviour::StallMidBody).await).await;
    let started = Instant::now();
    let response = http1_client()
        .request(h.request("GET", "/v1/apps").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (n, clean) = drain(response).await;
    assert!(
        !clean && n == 1000,
        "the stream is closed after the bytes that came: {n}, clean {clean}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let lines = audit_lines(&h, 1).await;
    assert_eq!(lines[0]["completed"], false);
    assert_eq!(lines[0]["bytes_out"], 1000);
    still_healthy(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_reset_mid_body_ends_the_clients_stream_and_the_proxy_stays_up() {
    let ca = TestCa::new("bad apple CA");
    let h = harness_with_bad_apple(&ca, bad_apple(&ca, Behaviour::ResetMidBody).await).await;
    // The proxy aborts the client's stream when Apple's breaks; depending on timing the
    // client sees that on the body or already on the head — never a clean end.
    match http1_client()
        .request(h.request("GET", "/v1/apps").body(empty()).unwrap())
        .await
    {
        Ok(response) => {
            let (n, clean) = drain(response).await;
            assert!(!clean && n <= 1000, "{n} {clean}");
        }
        Err(e) => assert!(format!("{e:?}").contains("IncompleteMessage"), "{e:?}"),
    }
    still_healthy(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_drip_within_the_idle_timeout_streams_through_completely() {
    let ca = TestCa::new("bad apple CA");
    let h = harness_with_bad_apple(&ca, bad_apple(&ca, Behaviour::Drip).await).await;
    let response = http1_client()
        .request(h.request("GET", "/v1/apps").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(drain(response).await, (1000, true));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_twice_for_a_get_and_the_audit_says_so() {
    let closed = free_port();
    let h = Harness::with(Setup {
        connect_base_url: Some(format!("https://127.0.0.1:{closed}")),
        ..Setup::default()
    })
    .await;
    let r = h.get("/v1/apps").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let post = send(
        h.request("POST", "/v1/bundleIds")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::BAD_GATEWAY);
    let lines = audit_lines(&h, 2).await;
    assert_eq!(lines[0]["connect_retries"], 2, "GET: retried, bounded");
    assert_eq!(
        lines[1]["connect_retries"], 0,
        "a request with a body is never replayed"
    );
    assert_eq!(lines[0]["decision"], "error");
    h.stop().await;
}

pub(crate) fn edit_config(h: &Harness, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(&h.world.config_path).unwrap();
    std::fs::write(&h.world.config_path, edit(text)).unwrap();
}

pub(crate) async fn scrape(h: &Harness) -> String {
    let r = send(
        http::Request::get(format!("http://{}/metrics", h.admin_addr))
            .body(empty())
            .unwrap(),
    )
    .await;
    String::from_utf8_lossy(&r.body).to_string()
}

pub(crate) async fn until(
    mut check: impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
) -> bool {
    for _ in 0..100 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_config_is_reloaded_and_a_broken_one_is_rejected_while_the_old_keeps_serving() {
    let h = Arc::new(Harness::start().await);
    assert_eq!(
        send(
            h.request("POST", "/inApps/v1/notifications/test")
                .body(empty())
                .unwrap()
        )
        .await
        .status,
        StatusCode::OK
    );
    // Narrow the tester's rules: applied by the file watch without a restart.
    edit_config(&h, |t| {
        t.replace("allow = [\"* /*\"]", "allow = [\"GET /v1/*\"]")
    });
    let hh = h.clone();
    assert!(
        until(move || {
            let h = hh.clone();
            Box::pin(async move {
                send(
                    h.request("POST", "/inApps/v1/notifications/test")
                        .body(empty())
                        .unwrap(),
                )
                .await
                .status
                    == StatusCode::FORBIDDEN
            })
        })
        .await,
        "the new rules apply"
    );
    assert!(scrape(&h)
        .await
        .contains("aap_config_reloads_total{result=\"applied\"} 1"));
    // A broken config (a typo'd field) is rejected; the previous one keeps serving.
    edit_config(&h, |t| t.replace("request_timeout", "request_timout"));
    let hh = h.clone();
    assert!(
        until(move || {
            let h = hh.clone();
            Box::pin(async move {
                scrape(&h)
                    .await
                    .contains("aap_config_reloads_total{result=\"rejected\"} 1")
            })
        })
        .await
    );
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    assert_eq!(
        send(
            h.request("POST", "/inApps/v1/notifications/test")
                .body(empty())
                .unwrap()
        )
        .await
        .status,
        StatusCode::FORBIDDEN
    );
    Arc::try_unwrap(h).ok().expect("one owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request() {
    let h = Arc::new(Harness::start().await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (h, stop, ok, failed) = (h.clone(), stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = h.get("/v1/apps").await;
                if r.status == StatusCode::OK {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.lock().unwrap().push(r.status);
                }
            }
        }));
    }
    for i in 0..4 {
        edit_config(&h, |t| {
            t.replace(&format!("cache_capacity_marker_{i}"), "")
                .replace("[audit]", &format!("# reload {i}\n[audit]"))
        });
        tokio::time::sleep(Duration::from_millis(2300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let reloads = scrape(&h).await;
    assert!(
        reloads.contains("aap_config_reloads_total{result=\"applied\"}"),
        "reloads happened"
    );
    assert!(
        failed.lock().unwrap().is_empty(),
        "failed: {:?}",
        failed.lock().unwrap()
    );
    assert!(
        ok.load(Ordering::Relaxed) > 20,
        "{}",
        ok.load(Ordering::Relaxed)
    );
    Arc::try_unwrap(h).ok().expect("one owner").stop().await;
}

/// A minimal HTTP CONNECT proxy recording the targets it tunnelled to.
async fn connect_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let Some(target) = line
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split(' ').next())
                    .map(str::to_string)
                else {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                };
                record.lock().unwrap().push(target.clone());
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_egress_proxy_apple_is_reached_through_a_connect_tunnel() {
    let (egress, seen) = connect_proxy().await;
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let text = std::fs::read_to_string(&world.config_path)
        .unwrap()
        .replace(
            "connect_timeout = \"2s\"",
            &format!("connect_timeout = \"2s\"\negress_proxy = \"http://{egress}\""),
        );
    std::fs::write(&world.config_path, text).unwrap();
    let h = Harness::from_world(world).await;
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    assert_eq!(
        h.get("/inApps/v1/transactions/1").await.status,
        StatusCode::OK
    );
    let targets = seen.lock().unwrap().clone();
    let connect_port = h
        .standin()
        .url(apple_standin::Role::AppStoreConnect)
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert!(
        targets
            .iter()
            .any(|t| t == &format!("127.0.0.1:{connect_port}")),
        "{targets:?}"
    );
    assert_eq!(
        targets.len(),
        2,
        "one tunnel per upstream, pooled: {targets:?}"
    );
    // The token still reached "Apple" inside the tunnel.
    assert!(h.standin().received().iter().all(|r| r.verdict.is_ok()));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_gets_fast_503s_and_the_proxy_recovers() {
    let h = Arc::new(
        Harness::with(Setup {
            server_toml: "max_concurrent_requests = 4".into(),
            ..Setup::default()
        })
        .await,
    );
    // Hold 4 slots with responses nobody reads.
    let mut held = Vec::new();
    for _ in 0..4 {
        let r = http1_client()
            .request(
                h.request("GET", "/v1/salesReports?standin_bytes=100000000")
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        held.push(r);
    }
    let mut shed = 0;
    for _ in 0..50 {
        let started = Instant::now();
        let r = h.get("/v1/apps").await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            shed += 1;
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "answered fast"
            );
        }
    }
    assert_eq!(shed, 50);
    drop(held);
    let hh = h.clone();
    assert!(
        until(move || {
            let h = hh.clone();
            Box::pin(async move { h.get("/v1/apps").await.status == StatusCode::OK })
        })
        .await
    );
    Arc::try_unwrap(h).ok().expect("one owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_lets_every_in_flight_request_finish_and_flushes_the_audit_log() {
    let port = free_port();
    let world = World::new(&Setup::default(), &format!("127.0.0.1:{port}")).await;
    let mut child = spawn_serve(&world.config_path);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child).await;
    // 12 in-flight downloads of 20 MB each, read slowly enough to outlive the signal.
    let mut downloads = Vec::new();
    for _ in 0..12 {
        let secret = world.secret.clone();
        downloads.push(tokio::spawn(async move {
            let r = http1_client()
                .request(
                    http::Request::get(format!(
                        "http://{addr}/v1/salesReports?standin_bytes=20000000"
                    ))
                    .header("authorization", format!("Bearer {secret}"))
                    .body(empty())
                    .unwrap(),
                )
                .await
                .unwrap();
            let mut body = r.into_body();
            let mut n = 0usize;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return (n, false) };
                n += frame.data_ref().map_or(0, |d| d.len());
                if n % (1 << 20) < 20_000 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            (n, true)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    for d in downloads {
        assert_eq!(
            d.await.unwrap(),
            (20_000_000, true),
            "an in-flight request finished"
        );
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(world.dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(
        text.lines().count(),
        12,
        "every request audited before exit"
    );
    // New connections are refused after the drain.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// A harness whose `[apis.app-store-server]` table also carries `setting`.
async fn with_app_store_server_setting(setting: &str) -> Harness {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let sandbox = world.standin.url(apple_standin::Role::StoreKitSandbox);
    let text = std::fs::read_to_string(&world.config_path)
        .unwrap()
        .replacen(
            &format!("sandbox_base_url = \"{sandbox}\""),
            &format!("sandbox_base_url = \"{sandbox}\"\n{setting}"),
            1,
        );
    std::fs::write(&world.config_path, text).unwrap();
    Harness::from_world(world).await
}

pub(crate) async fn with_fallback(on: bool) -> Harness {
    with_app_store_server_setting(&format!("sandbox_fallback = {on}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_fallback_answers_a_sandbox_transaction_from_sandbox_and_marks_it() {
    use apple_standin::{Faults, Role};
    let h = with_fallback(true).await;
    h.standin().set_faults(Faults {
        sandbox_only_transactions: vec!["2000000000000042".into()],
        ..Faults::default()
    });
    let r = h.get("/inApps/v1/transactions/2000000000000042").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-apple-environment"], "Sandbox");
    let roles: Vec<Role> = h.standin().received().iter().map(|r| r.role).collect();
    assert_eq!(roles, [Role::StoreKitProduction, Role::StoreKitSandbox]);
    let line = &audit_lines(&h, 1).await[0];
    assert_eq!(
        (
            line["environment"].as_str(),
            line["sandbox_fallback"].as_bool()
        ),
        (Some("sandbox"), Some(true))
    );
    // A production transaction is answered by production, unmarked.
    let r = h.get("/inApps/v1/transactions/2000000000000001").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.headers.contains_key("x-apple-environment"));
    // POST is never replayed against sandbox.
    let post = send(
        h.request("POST", "/inApps/v1/transactions/2000000000000042/finish")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::NOT_FOUND);
    assert_eq!(post.json()["errorCode"], 4040010);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_fallback_recognises_the_unreleased_app_401() {
    use apple_standin::Faults;
    let h = with_fallback(true).await;
    h.standin().set_faults(Faults {
        unreleased_bundle_ids: vec![BUNDLE.into()],
        ..Faults::default()
    });
    let r = h.get("/inApps/v1/transactions/2000000000000001").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "sandbox accepted what production refused"
    );
    assert_eq!(r.headers["x-apple-environment"], "Sandbox");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sandbox_fallback_apples_404_passes_through_unchanged() {
    use apple_standin::{Faults, TRANSACTION_NOT_FOUND_BODY};
    let h = with_fallback(false).await;
    h.standin().set_faults(Faults {
        sandbox_only_transactions: vec!["2000000000000042".into()],
        ..Faults::default()
    });
    let r = h.get("/inApps/v1/transactions/2000000000000042").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body, TRANSACTION_NOT_FOUND_BODY.as_bytes());
    assert_eq!(h.standin().received().len(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_upload_cancels_the_upstream_request_and_is_audited() {
    let h = Harness::start().await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "PUT /externalPurchase/v1/reports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\n",
        h.world.secret
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'u'; 4096]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let line = audit_lines(&h, 1).await.remove(0);
    assert_eq!(line["completed"], false, "{line}");
    assert_eq!(
        line["error"], "client_disconnected",
        "the client's fault, not Apple's: {line}"
    );
    assert_eq!(line["bytes_in"], 4096, "{line}");
    assert_ne!(line["status"], 200, "{line}");
    // The upload had started towards Apple: the record says Apple may have it.
    assert_eq!(line["decision"], "forwarded", "{line}");
    assert!(line["token_sha256"].is_string(), "{line}");
    // "Apple" never saw a complete upload.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h
        .standin()
        .received()
        .iter()
        .all(|r| r.body_len < 1_000_000));
    still_healthy(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_abandoning_downloads_never_fail_other_requests_on_the_shared_upstream_connection()
{
    // Each abandoned download makes the proxy cancel (RST_STREAM) its stream to Apple; at
    // h2's default limit of 1,024 such resets the pooled connection used to be closed,
    // failing every request in flight on it.
    let h = Arc::new(Harness::start().await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut steady = Vec::new();
    for _ in 0..2 {
        let (h, stop, failures) = (h.clone(), stop.clone(), failures.clone());
        steady.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = h.get("/v1/apps").await;
                if r.status != StatusCode::OK {
                    failures.lock().unwrap().push(r.status);
                }
            }
        }));
    }
    // Eight clients abandoning 4 MB downloads at once, as flaky report downloaders do.
    let mut abandoners = Vec::new();
    for _ in 0..8 {
        let h = h.clone();
        abandoners.push(tokio::spawn(async move {
            let client = http1_client();
            for _ in 0..200 {
                let r = client
                    .request(
                        h.request("GET", "/v1/salesReports?standin_bytes=4000000")
                            .body(empty())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let mut body = r.into_body();
                let _ = body.frame().await;
            }
        }));
    }
    for a in abandoners {
        a.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for s in steady {
        s.await.unwrap();
    }
    assert!(
        failures.lock().unwrap().is_empty(),
        "{:?}",
        failures.lock().unwrap()
    );
    Arc::try_unwrap(h).ok().expect("one owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apples_per_endpoint_limit_is_enforced_locally_per_app_when_asked() {
    let h = with_app_store_server_setting("enforce_apple_limits = true").await;
    // "Request a Test Notification": 1 request per second per app.
    let first = send(
        h.request("POST", "/inApps/v1/notifications/test")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    let second = send(
        h.request("POST", "/inApps/v1/notifications/test")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (second.status, second.error_code().as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "PROXY_RATE_LIMITED")
    );
    assert_eq!(
        second.headers["retry-after"], "1",
        "delta-seconds, not Apple's milliseconds"
    );
    assert!(second.json()["errors"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("Request a Test Notification"));
    // Other endpoints have their own budget; Apple saw only what was allowed.
    assert_eq!(
        h.get("/inApps/v1/transactions/1").await.status,
        StatusCode::OK
    );
    assert_eq!(h.standin().received().len(), 2);
    let line = &audit_lines(&h, 2).await[1];
    assert_eq!(
        (line["decision"].as_str(), line["error"].as_str()),
        (Some("denied"), Some("apple_limit"))
    );
    h.stop().await;
}

/// DESIGN §13b: a client that hangs up (HTTP/1.1) or resets its stream (HTTP/2) while Apple
/// is being asked still leaves exactly one record, saying Apple may have the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_before_apples_answer_is_audited_once_on_h1_and_h2() {
    let ca = TestCa::new("bad apple CA");
    let h = harness_with_bad_apple(&ca, bad_apple(&ca, Behaviour::StallBeforeHeaders).await).await;
    post_and_abandon_on_h1_and_h2(h.addr, &h.world.secret, "/v1/apps").await;
    let lines = audit_lines(&h, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert_eq!(line["error"], "client_disconnected", "{line}");
        assert_eq!(line["decision"], "forwarded", "Apple may have it: {line}");
        assert_eq!(line["completed"], false, "{line}");
        assert_eq!(line["status"], 499, "{line}");
        assert_eq!(line["method"], "POST", "{line}");
        assert_eq!(line["path"], "/v1/apps", "{line}");
        assert_eq!(line["client"], "tester", "{line}");
        assert!(line["token_sha256"].is_string(), "{line}");
        assert!(line["upstream_status"].is_null(), "{line}");
    }
    // Once the stalled upstream requests time out nothing more is written.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(audit_lines(&h, 2).await.len(), 2);
    still_healthy(&h).await;
    h.stop().await;
}
