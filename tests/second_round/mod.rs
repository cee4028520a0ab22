//! DESIGN §13b, the second hardening round, through the real binary over real sockets.

use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Full};

use crate::support::*;

/// The real binary serving a world whose config `edit` changed; killed on drop.
pub(crate) struct Binary {
    pub(crate) world: World,
    pub(crate) addr: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) child: Child,
}

impl Binary {
    pub(crate) async fn start(setup: Setup, edit: impl FnOnce(String) -> String) -> Binary {
        Binary::start_with(setup, edit, |_| {}).await
    }

    /// [`Binary::start`] that first writes `files` into the world's directory.
    pub(crate) async fn start_with(
        setup: Setup,
        edit: impl FnOnce(String) -> String,
        files: impl FnOnce(&std::path::Path),
    ) -> Binary {
        let (mut port, mut admin_port) = free_port_pair();
        let world = World::new(&setup, &format!("127.0.0.1:{port}")).await;
        files(world.dir.path());
        let mut text = edit(
            std::fs::read_to_string(&world.config_path)
                .unwrap()
                .replace(
                    "admin_listen = \"off\"",
                    &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
                ),
        );
        let log = world.dir.path().join("stderr.log");
        // A port free a moment ago can be taken before the proxy binds it (another test's
        // client connection gets it as its local port): then start again on new ports.
        for attempt in 0.. {
            std::fs::write(&world.config_path, &text).unwrap();
            let mut child = serve_command(
                &world.config_path,
                setup.rust_log.unwrap_or("warn"),
                setup.rust_log.map(|_| log.as_path()),
            )
            .envs(setup.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
            match (up(addr, &mut child).await, up(admin, &mut child).await) {
                (Ok(()), Ok(())) => {
                    return Binary {
                        world,
                        addr,
                        admin,
                        child,
                    }
                }
                (Err(why), _) | (_, Err(why)) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let stderr = child
                        .stderr
                        .take()
                        .map(|mut e| {
                            let mut s = String::new();
                            let _ = std::io::Read::read_to_string(&mut e, &mut s);
                            s
                        })
                        .unwrap_or_else(|| std::fs::read_to_string(&log).unwrap_or_default());
                    let port_taken = stderr.contains("cannot listen");
                    assert!(
                        port_taken && attempt < 3,
                        "the proxy did not start: {why}\n{stderr}"
                    );
                    let (p, a) = free_port_pair();
                    text = text
                        .replace(&format!("127.0.0.1:{port}"), &format!("127.0.0.1:{p}"))
                        .replace(
                            &format!("127.0.0.1:{admin_port}"),
                            &format!("127.0.0.1:{a}"),
                        );
                    (port, admin_port) = (p, a);
                }
            }
        }
        unreachable!()
    }

    pub(crate) fn request(&self, method: &str, path: &str) -> http::request::Builder {
        http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("authorization", format!("Bearer {}", self.world.secret))
    }

    pub(crate) async fn metrics(&self) -> String {
        let r = send(
            http::Request::get(format!("http://{}/metrics", self.admin))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        String::from_utf8_lossy(&r.body).into_owned()
    }
}

/// Waits until something accepts on `addr`; `Err` when the proxy exited first.
async fn up(addr: SocketAddr, child: &mut Child) -> Result<(), String> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited early: {status}"));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!("nothing listens on {addr}"))
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_with_a_semicolon_or_an_encoded_percent_are_refused_before_apple_on_h1_and_h2() {
    let b = Binary::start(Setup::default(), |t| t).await;
    for path in [
        "/v1/apps;x=1",
        "/v1/apps/..;/users",
        "/v1/%252e%252e/users",
        "/inApps/v1/transactions/1%25",
        "/v1/apps/%2e%3b/users",
        "/v1/apps%3Bx=1",
    ] {
        for client in [http1_client(), http2_client()] {
            let r = send_with(
                client,
                b.request("GET", path)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
            assert_eq!(r.error_code(), "PROXY_BAD_REQUEST", "{path}");
        }
    }
    assert!(
        b.world.standin.received().is_empty(),
        "nothing reached Apple"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_and_path_override_headers_never_reach_apple() {
    let b = Binary::start(Setup::default(), |t| t).await;
    let r = send(
        b.request("GET", "/v1/apps")
            .header("x-http-method-override", "DELETE")
            .header("x-http-method", "DELETE")
            .header("x-method-override", "DELETE")
            .header("x-original-url", "/v1/users")
            .header("x-rewrite-url", "/v1/users")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let received = b.world.standin.received();
    let headers = &received[0].headers;
    for name in [
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
    ] {
        assert!(!headers.contains_key(name), "{name} was forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_slower_than_request_timeout_is_bounded_by_the_body_idle_timeout_instead() {
    let b = Binary::start(Setup::default(), |t| {
        t.replace(
            "request_timeout = \"20s\"",
            "request_timeout = \"1s\"\nbody_idle_timeout = \"3s\"",
        )
    })
    .await;
    let (tx, body) = futures_channel();
    let request = b
        .request("POST", "/inApps/v1/notifications/test")
        .header("content-length", "4000")
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let pending = tokio::spawn(async move { client.request(request).await });
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.send(Bytes::from(vec![b'u'; 1000])).await.unwrap();
    }
    drop(tx);
    let response = pending.await.unwrap().expect("an answer");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "2 s of upload, 1 s request_timeout"
    );
    let _ = response.into_body().collect().await;
    assert_eq!(b.world.standin.received()[0].body_len, 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apple_date_hours_away_does_not_move_apples_clock() {
    let b = Binary::start(
        Setup {
            standin_clock_offset: 3 * 3600,
            ..Setup::default()
        },
        |t| t,
    )
    .await;
    let r = send(
        b.request("GET", "/v1/apps")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::UNAUTHORIZED,
        "minted on this host's clock"
    );
    let metrics = b.metrics().await;
    assert!(
        metrics.contains("aap_apple_clock_offset_seconds 0\n"),
        "{metrics}"
    );
}

/// A frame stream for a request body.
type Frames = std::pin::Pin<
    Box<
        dyn futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>
            + Send,
    >,
>;

/// A request body fed from a channel.
fn futures_channel() -> (
    tokio::sync::mpsc::Sender<Bytes>,
    http_body_util::StreamBody<Frames>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok(hyper::body::Frame::data(b)), rx))
    });
    (tx, http_body_util::StreamBody::new(Box::pin(stream)))
}

/// Reads until the peer closes; how long that took, or `None` if it stayed open past `limit`.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt as _;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            s.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout_on_h1_and_h2() {
    use tokio::io::AsyncWriteExt as _;
    let b = Binary::start(Setup::default(), |t| {
        t.replace("[server]\n", "[server]\nidle_timeout = \"1s\"\n")
    })
    .await;
    // Nothing sent at all.
    let mut silent = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    // Only the HTTP/2 preface (and an empty SETTINGS frame).
    let mut preface = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // One HTTP/1.1 request answered, then the keep-alive connection left idle.
    let mut kept = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    kept.write_all(
        format!(
            "GET /v1/apps HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            b.world.secret
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for (name, s) in [
        ("silent", &mut silent),
        ("h2 preface", &mut preface),
        ("h1 keep-alive", &mut kept),
    ] {
        let closed = closed_within(s, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "{name}: still open after 5 s");
    }
    // A connection with a request in flight is not idle: a slow download outlives it.
    let r = send(
        b.request("GET", "/v1/salesReports?standin_bytes=1000")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_new_connections_are_closed_at_once() {
    let b = Binary::start(Setup::default(), |t| {
        t.replace("[server]\n", "[server]\nmax_connections = 3\n")
    })
    .await;
    // Let the start-up probes' connections close first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(b.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let closed = closed_within(&mut extra, Duration::from_secs(2)).await;
    assert!(closed.is_some(), "the fourth connection is closed");
    // The three held ones are still open; freeing one makes room again.
    for s in &mut held {
        assert!(closed_within(s, Duration::from_millis(100)).await.is_none());
    }
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = send(
        b.request("GET", "/v1/apps")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzipped_apple_errors_are_read_for_the_diagnosis_and_the_fallback_and_passed_on_intact() {
    use apple_standin::{Faults, Role, AGREEMENT_PENDING_BODY, TRANSACTION_NOT_FOUND_BODY};
    let b = Binary::start(Setup::default(), |t| t).await;
    // An agreement-pending 403, gzip'd: Apple's errors are kept and ranked first.
    b.world.standin.set_faults(Faults {
        agreement_pending: true,
        compress_errors: true,
        ..Faults::default()
    });
    let r = send(gzip_get(&b, "/v1/apps")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.headers["x-proxy-diagnosis"], "AGREEMENT_PENDING");
    let apple: serde_json::Value = serde_json::from_str(AGREEMENT_PENDING_BODY).unwrap();
    assert_eq!(
        r.json()["errors"],
        apple["errors"],
        "Apple's errors, not a synthesised one"
    );
    // Without the fallback, a gzip'd 404 reaches the client exactly as Apple sent it.
    b.world.standin.set_faults(Faults {
        sandbox_only_transactions: vec!["2000000000000042".into()],
        compress_errors: true,
        ..Faults::default()
    });
    let r = send(gzip_get(&b, "/inApps/v1/transactions/2000000000000042")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.headers["content-encoding"], "gzip");
    let mut plain = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&r.body[..]), &mut plain)
        .unwrap();
    assert_eq!(plain, TRANSACTION_NOT_FOUND_BODY);
    drop(b);
    // With it, a gzip'd 404 4040010 still sends the GET to sandbox.
    let b = Binary::start(Setup::default(), |t| {
        t.replacen(
            "[apis.app-store-server]\n",
            "[apis.app-store-server]\nsandbox_fallback = true\n",
            1,
        )
    })
    .await;
    b.world.standin.set_faults(Faults {
        sandbox_only_transactions: vec!["2000000000000042".into()],
        compress_errors: true,
        ..Faults::default()
    });
    let r = send(gzip_get(&b, "/inApps/v1/transactions/2000000000000042")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-apple-environment"], "Sandbox");
    let roles: Vec<Role> = b.world.standin.received().iter().map(|r| r.role).collect();
    assert_eq!(roles, [Role::StoreKitProduction, Role::StoreKitSandbox]);
}

fn gzip_get(b: &Binary, path: &str) -> http::Request<Full<Bytes>> {
    b.request("GET", path)
        .header("accept-encoding", "gzip")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Sends `bytes` on a fresh connection and reads until the proxy closes it (at most 5 s).
async fn exchange_raw(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_framing_guard_never_switches_itself_off() {
    let b = Binary::start(Setup::default(), |t| t).await;
    let auth = format!("Authorization: Bearer {}", b.world.secret);
    let smuggled = format!(
        "POST /inApps/v1/notifications/test HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    // 1. A head ending in `\n\r\n`, which httparse (and so hyper) accepts, then smuggling.
    let first = format!("GET /v1/apps HTTP/1.1\nHost: x\n{auth}\n\r\n");
    let out = exchange_raw(b.addr, format!("{first}{smuggled}").as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains("HTTP/1.1 400"),
        "the smuggling request is refused: {out}"
    );
    // 2. Whole lines are followed whatever their length (a 5,000-byte chunk extension).
    let long = format!(
        "PUT /inApps/v1/x HTTP/1.1\r\nHost: x\r\n{auth}\r\nTransfer-Encoding: chunked\r\n\r\n1;ext={}\r\na\r\n0\r\n\r\n",
        "e".repeat(5000)
    );
    let out = exchange_raw(b.addr, format!("{long}{smuggled}").as_bytes()).await;
    assert!(
        out.contains("HTTP/1.1 400"),
        "followed, then refused: {out}"
    );
    // 3. A chunk line still incomplete past 4 KiB: the connection is closed, not left
    // unguarded for the smuggling request behind it.
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
        let head = format!(
            "PUT /inApps/v1/y HTTP/1.1\r\nHost: x\r\n{auth}\r\nTransfer-Encoding: chunked\r\n\r\n1;ext={}",
            "e".repeat(4500)
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = s
            .write_all(format!("\r\na\r\n0\r\n\r\n{smuggled}").as_bytes())
            .await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        // The PUT itself may be answered (its body failed), but the connection ends there:
        // the request behind it is never read, so never refused as smuggling either.
        assert!(
            out.matches("HTTP/1.1 ").count() <= 1
                && !out.contains("both Content-Length and Transfer-Encoding"),
            "the connection ended first: {out}"
        );
    }
    let notifications = b
        .world
        .standin
        .received()
        .iter()
        .filter(|r| r.path_and_query.contains("notifications"))
        .count();
    assert_eq!(notifications, 0, "no smuggled request reached Apple");
}

/// The audit lines the binary has written so far (waiting until there are `n`).
pub(crate) async fn binary_audit(b: &Binary, n: usize) -> Vec<serde_json::Value> {
    crate::ops::audit_lines_in(b.world.dir.path(), n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_hyper_would_refuse_by_itself_are_audited_and_answered_in_json_with_a_request_id() {
    let b = Binary::start(Setup::default(), |t| t).await;
    let auth = format!("Authorization: Bearer {}", b.world.secret);
    let get = format!("GET /v1/apps HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n");
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "two Content-Lengths",
            format!("POST /v1/apps?token=aap_leakedsecret HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
            400,
            "malformed_request",
        ),
        (
            "a 70 KB header",
            format!("GET /v1/apps HTTP/1.1\r\nHost: x\r\n{auth}\r\nX-Big: {}\r\n\r\n", "b".repeat(70_000)),
            431,
            "head_too_large",
        ),
        (
            "101 header fields",
            format!("GET /v1/apps HTTP/1.1\r\nHost: x\r\n{auth}\r\n{many}\r\n"),
            431,
            "head_too_large",
        ),
        (
            "an invalid header name",
            "GET /v1/apps HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n".to_string(),
            400,
            "malformed_request",
        ),
    ];
    let mut audited = 0;
    for (label, bad, status, kind) in cases {
        b.world.standin.clear_received();
        // A good request first on the same connection: it is served, the bad one refused,
        // and then the connection closes (nothing after the bad head is read).
        let out = exchange_raw(b.addr, format!("{get}{bad}{get}").as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{label}: {out}");
        assert_eq!(
            out.matches("HTTP/1.1 ").count(),
            2,
            "{label}: two answers then close: {out}"
        );
        let second = &out[out.rfind("HTTP/1.1 ").unwrap()..];
        assert!(
            second.starts_with(&format!("HTTP/1.1 {status}")),
            "{label}: {second}"
        );
        let lower = second.to_ascii_lowercase();
        assert!(lower.contains("connection: close"), "{label}: {second}");
        assert!(
            lower.contains("content-type: application/json"),
            "{label}: {second}"
        );
        let id = lower
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("{label}: no X-Request-Id: {second}"))
            .trim()
            .to_string();
        let body = &second[second.find("\r\n\r\n").unwrap() + 4..];
        let json: serde_json::Value = serde_json::from_str(body).expect(label);
        assert_eq!(json["errors"][0]["code"], "PROXY_BAD_REQUEST", "{label}");
        assert_eq!(
            b.world.standin.received().len(),
            1,
            "{label}: only the good request reached Apple"
        );
        audited += 2;
        let lines = binary_audit(&b, audited).await;
        let record = lines
            .iter()
            .find(|l| l["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{label}: no audit record for {id}"));
        assert_eq!(record["status"], status, "{label}");
        assert_eq!(record["decision"], "denied", "{label}");
        assert_eq!(record["error"], kind, "{label}");
        assert!(record["upstream_status"].is_null(), "{label}");
        if label == "two Content-Lengths" {
            assert_eq!(record["method"], "POST");
            assert_eq!(record["path"], "/v1/apps");
            assert!(
                !record.to_string().contains("aap_leakedsecret"),
                "the query is redacted: {record}"
            );
        }
    }
    let verify = std::process::Command::new(env!("CARGO_BIN_EXE_apple-api-proxy"))
        .args(["audit", "verify"])
        .arg(b.world.dir.path().join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_or_resets_before_apples_answer_is_audited_once_on_h1_and_h2() {
    let b = Binary::start(Setup::default(), |t| t).await;
    // Apple answers only after 1.5 s; each client gives up after 300 ms.
    crate::ops::post_and_abandon_on_h1_and_h2(
        b.addr,
        &b.world.secret,
        "/v1/apps?standin_delay_ms=1500",
    )
    .await;
    let lines = binary_audit(&b, 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert_eq!(line["error"], "client_disconnected", "{line}");
        assert_eq!(line["decision"], "forwarded", "Apple has it: {line}");
        assert_eq!(
            (line["completed"].clone(), line["status"].clone()),
            (false.into(), 499.into()),
            "{line}"
        );
        assert_eq!(line["method"], "POST", "{line}");
        assert!(line["token_sha256"].is_string(), "{line}");
    }
    assert_eq!(b.world.standin.received().len(), 2, "both reached Apple");
    // Apple's late answers write nothing more.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(binary_audit(&b, 2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_client_ca_closes_connections_accepted_under_the_old_one() {
    let server_ca = TestCa::new("proxy server CA");
    let (old_ca, new_ca) = (TestCa::new("old client CA"), TestCa::new("new client CA"));
    let (server_cert, server_key) = server_ca.issue(&["localhost", "127.0.0.1"], "proxy", false);
    let b = Binary::start_with(
        Setup::default(),
        |t| {
            t.replace(
                "request_timeout = \"20s\"",
                "request_timeout = \"20s\"\ntls_cert_file = \"server.pem\"\ntls_key_file = \"server-key.pem\"\nclient_ca_file = \"clients-ca.pem\"",
            ) + "\n[[clients]]\nname = \"mtls-ci\"\ntls_subject = \"ci.internal\"\nallow = [\"GET /v1/*\"]\n"
        },
        |dir| {
            std::fs::write(dir.join("server.pem"), &server_cert).unwrap();
            write_private(&dir.join("server-key.pem"), &server_key);
            std::fs::write(dir.join("clients-ca.pem"), old_ca.cert.pem()).unwrap();
        },
    )
    .await;
    let url = format!("https://localhost:{}/v1/apps", b.addr.port());
    let get = |client: &hyper_util::client::legacy::Client<_, Full<Bytes>>| {
        client.request(
            http::Request::get(&url)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    };
    let old_cert = old_ca.issue(&["ci.internal"], "CI", true);
    let h1 = tls_client_for(&server_ca, Some(&old_cert), false);
    let h2 = tls_client_for(&server_ca, Some(&old_cert), true);
    for (client, version) in [(&h1, http::Version::HTTP_11), (&h2, http::Version::HTTP_2)] {
        let r = get(client).await.expect("served under the old CA");
        assert_eq!((r.status(), r.version()), (StatusCode::OK, version));
        let _ = r.into_body().collect().await;
    }
    // The operator replaces the client CA and reloads.
    std::fs::write(b.world.dir.path().join("clients-ca.pem"), new_ca.cert.pem()).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &b.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    // Both open connections are closed; a new one needs a certificate from the new CA.
    for (client, label) in [(&h1, "h1"), (&h2, "h2")] {
        let mut refused = false;
        for _ in 0..40 {
            match get(client).await {
                Ok(r) => {
                    let _ = r.into_body().collect().await;
                }
                Err(_) => {
                    refused = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            refused,
            "{label}: the connection opened under the old CA still serves"
        );
    }
    let fresh = tls_client_for(
        &server_ca,
        Some(&new_ca.issue(&["ci.internal"], "CI", true)),
        true,
    );
    assert_eq!(
        get(&fresh).await.expect("the new CA").status(),
        StatusCode::OK
    );
}
