//! Hostile and malformed input (issue 3, DESIGN §3, §5, §6, §13).
//!
//! - Raw HTTP/1.1 over a plain `TcpStream`, so nothing on the client side normalises the
//!   request target, the header block or the framing before the proxy sees it.
//! - Raw HTTP/2 frames for the stream limits (hyper does not expose the peer's SETTINGS, and
//!   the stand-in's own 200-stream limit would hide the proxy's behind it).
//! - Property tests over path checks, routing, allow-rule globs and scope entries, and one
//!   end-to-end property: a request the policy denies never reaches the stand-in.
//!
//! Each raw test asserts what the client got *and* what reached "Apple".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apple_api_proxy::proxy::codes;
use apple_standin::Role;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::*;

// ---------------------------------------------------------------------------------------
// Raw HTTP/1.1
// ---------------------------------------------------------------------------------------

/// One response as read off the wire.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// `errors[0].code` of a DESIGN §6 JSON error body, if the body is one.
    fn proxy_code(&self) -> Option<String> {
        let json: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        json["errors"][0]["code"].as_str().map(str::to_string)
    }

    /// `status` plus the proxy's error code, or `-` when the body is not the proxy's JSON
    /// (hyper's own parse-error responses have no body).
    fn summary(&self) -> String {
        format!(
            "{} {}",
            self.status,
            self.proxy_code().unwrap_or_else(|| "-".into())
        )
    }
}

/// A client connection that writes bytes verbatim and parses responses by hand.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Raw {
    async fn connect(h: &Harness) -> Raw {
        Raw {
            stream: TcpStream::connect(h.addr).await.unwrap(),
            buf: Vec::new(),
            eof: false,
        }
    }

    /// Writes everything; a server that already gave up may reset the connection, which is
    /// not an error here (the response, if any, is what counts).
    async fn send(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.stream.write_all(bytes)).await;
    }

    /// Reads once more into the buffer. False on EOF, reset, or the deadline.
    async fn fill(&mut self, deadline: Instant) -> bool {
        if self.eof {
            return false;
        }
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout_at(deadline.into(), self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.eof = true;
                false
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => false,
        }
    }

    /// The next response, or `None` if the server closed (or went quiet) before sending one.
    async fn response(&mut self, to_head: bool) -> Option<RawResponse> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill(deadline).await {
                return None;
            }
        };
        let head: Vec<u8> = self.buf.drain(..head_end).collect();
        let mut lines = head[..head.len() - 4].split(|&b| b == b'\n');
        let status_line = String::from_utf8_lossy(lines.next()?).into_owned();
        let status: u16 = status_line.split(' ').nth(1)?.trim().parse().ok()?;
        let headers: Vec<(String, Vec<u8>)> = lines
            .filter_map(|l| {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                let colon = l.iter().position(|&b| b == b':')?;
                Some((
                    String::from_utf8_lossy(&l[..colon]).to_ascii_lowercase(),
                    l[colon + 1..].trim_ascii().to_vec(),
                ))
            })
            .collect();
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if to_head || status < 200 || status == 204 || status == 304 {
            return Some(response);
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    if !self.fill(deadline).await {
                        return Some(response);
                    }
                };
                let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size =
                    usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).ok()?;
                while self.buf.len() < line_end + 2 + size + 2 {
                    if !self.fill(deadline).await {
                        return Some(response);
                    }
                }
                response
                    .body
                    .extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    return Some(response);
                }
            }
        }
        match response
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(len) => {
                while self.buf.len() < len {
                    if !self.fill(deadline).await {
                        break;
                    }
                }
                let n = len.min(self.buf.len());
                response.body = self.buf.drain(..n).collect();
            }
            None => {
                while self.fill(deadline).await {}
                response.body = std::mem::take(&mut self.buf);
            }
        }
        Some(response)
    }

    /// True when the server closes the connection (EOF or reset) within `within`.
    async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.eof && Instant::now() < deadline {
            self.fill(deadline).await;
        }
        self.eof
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `METHOD target HTTP/1.1`, then `Host`, the `tester` secret (when given), the extra lines
/// verbatim, and the blank line. No body.
fn request_head(
    method: &str,
    target: &[u8],
    host: &str,
    secret: Option<&str>,
    extra: &[&[u8]],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(secret) = secret {
        out.extend_from_slice(b"Authorization: Bearer ");
        out.extend_from_slice(secret.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for line in extra {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends `bytes` on a fresh connection; the first response and whether the server then
/// closed the connection within `close_wait`.
async fn exchange(h: &Harness, bytes: &[u8], close_wait: Duration) -> (Option<RawResponse>, bool) {
    let mut raw = Raw::connect(h).await;
    raw.send(bytes).await;
    let response = raw.response(false).await;
    let closed = raw.closed_within(close_wait).await;
    (response, closed)
}

fn authority(url: &str) -> &str {
    url.strip_prefix("https://").unwrap()
}

/// No header the stand-in recorded carries CR, LF or NUL, or names the given host.
fn assert_clean_upstream_headers(h: &Harness, forbidden_host: &str) {
    for r in h.standin().received() {
        for (name, value) in &r.headers {
            let v = value.as_bytes();
            assert!(
                !v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)),
                "{name}: {v:?} reached upstream with CR/LF/NUL"
            );
            assert!(
                !String::from_utf8_lossy(v).contains(forbidden_host),
                "{name}: {v:?} names {forbidden_host}"
            );
        }
    }
}

// A1 -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_is_routed_by_its_path_alone_never_to_its_host() {
    let h = Harness::start().await;
    let storekit = authority(&h.standin().url(Role::StoreKitProduction)).to_string();
    // The authority names a host the proxy must not contact, then a host it *could* reach
    // (the storekit stand-in): neither may steer a /v1/ path away from App Store Connect.
    for (target, host) in [
        ("http://evil.example/v1/apps".to_string(), "evil.example"),
        (format!("https://{storekit}/v1/apps"), storekit.as_str()),
    ] {
        h.standin().clear_received();
        let (r, _) = exchange(
            &h,
            &request_head(
                "GET",
                target.as_bytes(),
                host,
                Some(&h.world.secret),
                &[b"Connection: close"],
            ),
            Duration::ZERO,
        )
        .await;
        let r = r.expect("a response");
        eprintln!("A1 GET {target} (Host: {host}) -> {}", r.summary());
        assert_eq!(
            r.status,
            200,
            "{target}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.header("x-request-id").is_some());
        let got = h.standin().received();
        assert_eq!(got.len(), 1, "{target}");
        assert_eq!(
            (got[0].role, got[0].path_and_query.as_str()),
            (Role::AppStoreConnect, "/v1/apps"),
            "{target}"
        );
        let claims = &got[0].verdict.as_ref().expect("token accepted").claims;
        assert_eq!(
            claims["scope"],
            serde_json::json!(["GET /v1/apps"]),
            "the scope names the path, never the client's authority"
        );
        assert_clean_upstream_headers(&h, host);
    }
    h.stop().await;
}

// A2 -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_host_header_does_not_change_the_route() {
    let h = Harness::start().await;
    let sandbox = authority(&h.standin().url(Role::StoreKitSandbox)).to_string();
    // (path, Host, extra header lines, role that must receive it, path it must receive)
    type Case<'a> = (&'a str, &'a str, &'a [&'a [u8]], Role, &'a str);
    let cases: [Case; 4] = [
        (
            "/v1/apps",
            "api.storekit.apple.com",
            &[],
            Role::AppStoreConnect,
            "/v1/apps",
        ),
        (
            "/v1/apps",
            sandbox.as_str(),
            &[],
            Role::AppStoreConnect,
            "/v1/apps",
        ),
        (
            "/inApps/v1/transactions/1",
            "api.appstoreconnect.apple.com",
            &[],
            Role::StoreKitProduction,
            "/inApps/v1/transactions/1",
        ),
        (
            "/inApps/v1/transactions/1",
            "api.storekit.apple.com",
            &[
                b"X-Forwarded-Host: api.storekit-sandbox.apple.com",
                b"Forwarded: host=api.storekit-sandbox.apple.com",
                b"X-Original-URL: /sandbox/inApps/v1/transactions/1",
            ],
            Role::StoreKitProduction,
            "/inApps/v1/transactions/1",
        ),
    ];
    for (path, host, extra, role, upstream_path) in cases {
        h.standin().clear_received();
        let (r, _) = exchange(
            &h,
            &request_head("GET", path.as_bytes(), host, Some(&h.world.secret), extra),
            Duration::ZERO,
        )
        .await;
        let r = r.expect("a response");
        eprintln!("A2 GET {path} (Host: {host}) -> {}", r.summary());
        assert_eq!(r.status, 200, "{path} with Host {host}");
        let got = h.standin().received();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].role, got[0].path_and_query.as_str()),
            (role, upstream_path),
            "Host: {host}"
        );
        assert_clean_upstream_headers(&h, host);
    }
    h.stop().await;
}

// A3 -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_trace_are_refused_and_reach_nothing() {
    let h = Harness::start().await;
    for (method, target) in [
        ("CONNECT", "api.appstoreconnect.apple.com:443"),
        ("CONNECT", "api.storekit.apple.com:443"),
        ("TRACE", "/v1/apps"),
        ("TRACE", "/inApps/v1/transactions/1"),
    ] {
        let (r, closed) = exchange(
            &h,
            &request_head(
                method,
                target.as_bytes(),
                "api.appstoreconnect.apple.com",
                Some(&h.world.secret),
                &[],
            ),
            Duration::from_millis(300),
        )
        .await;
        let r = r.expect("a response");
        eprintln!("A3 {method} {target} -> {} closed={closed}", r.summary());
        assert_eq!(r.status, 400, "{method} {target}");
        // Either the proxy's JSON or hyper's bare 4xx; if the proxy answered, its code.
        if let Some(code) = r.proxy_code() {
            assert_eq!(code, codes::BAD_REQUEST, "{method} {target}");
            assert!(r.header("x-request-id").is_some());
        }
    }
    assert!(h.standin().received().is_empty(), "nothing reached Apple");
    h.stop().await;
}

// A4 -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_path_tricks_get_a_clear_4xx_and_the_proxy_keeps_serving() {
    let h = Harness::start().await;
    let mut long = b"/v1/".to_vec();
    long.resize(9 * 1024, b'a');
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dot-dot", b"/v1/../inApps/v1/x".to_vec()),
        ("dot-dot at the end", b"/inApps/v1/..".to_vec()),
        ("single dot", b"/v1/./apps".to_vec()),
        ("encoded dot-dot", b"/v1/%2e%2e/inApps".to_vec()),
        (
            "encoded dot-dot, mixed case",
            b"/v1/%2E%2e/inApps/v1/x".to_vec(),
        ),
        ("encoded slash", b"/v1/%2F".to_vec()),
        ("encoded slash mid-segment", b"/v1/a%2finApps".to_vec()),
        ("encoded backslash", b"/v1/a%5cb".to_vec()),
        ("double slash", b"/v1//apps".to_vec()),
        ("leading double slash", b"//v1/apps".to_vec()),
        ("backslash", b"/v1\\apps".to_vec()),
        ("encoded NUL", b"/v1/a%00".to_vec()),
        ("raw 0xff byte", b"/v1/a\xffb".to_vec()),
        ("encoded invalid UTF-8", b"/v1/a%ff".to_vec()),
        ("overlong UTF-8 for '/'", b"/v1/a%c0%afb".to_vec()),
        ("truncated escape", b"/v1/a%2".to_vec()),
        ("9 KiB path", long),
    ];
    for (label, target) in &cases {
        let (r, _) = exchange(
            &h,
            &request_head("GET", target, "proxy.test", Some(&h.world.secret), &[]),
            Duration::ZERO,
        )
        .await;
        let r = r.unwrap_or_else(|| panic!("{label}: no response at all"));
        eprintln!("A4 {label} -> {}", r.summary());
        assert!(
            matches!(r.status, 400 | 404 | 414 | 431),
            "{label}: {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        // Whatever the proxy itself answers is its JSON with the request id.
        if let Some(code) = r.proxy_code() {
            assert!(code.starts_with("PROXY_"), "{label}: {code}");
            assert!(r.header("x-request-id").is_some(), "{label}");
        }
        // The two cases DESIGN §13 pins exactly, when the proxy (not hyper) sees them.
        if *label == "9 KiB path" {
            assert_eq!(r.summary(), format!("414 {}", codes::BAD_REQUEST));
        } else if r.proxy_code().is_some() {
            assert_eq!(
                r.summary(),
                format!("400 {}", codes::BAD_REQUEST),
                "{label}"
            );
        }
    }
    assert!(
        h.standin().received().is_empty(),
        "no trick reached Apple: {:?}",
        h.standin()
            .received()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    );
    // Still alive and serving.
    let ok = h.get("/v1/apps").await;
    assert_eq!(ok.status, StatusCode::OK);
    let got = h.standin().received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].path_and_query, "/v1/apps");
    h.stop().await;
}

// A5 -------------------------------------------------------------------------------------

/// A request that would be served if a parser on the way read the bytes after the first
/// request's body as a second request on the same connection.
fn smuggled(h: &Harness) -> Vec<u8> {
    request_head(
        "GET",
        b"/v1/smuggled",
        "proxy.test",
        Some(&h.world.secret),
        &[],
    )
}

/// (label, header lines after the request line, body bytes)
type SmuggleCase<'a> = (&'a str, &'a [&'a [u8]], &'a [u8]);

/// Sends each case (head lines, then body, then the smuggled request) and asserts 400, a
/// closed connection, and nothing upstream.
async fn assert_smuggling_refused(h: &Harness, cases: &[SmuggleCase<'_>]) {
    for (label, lines, body) in cases {
        h.standin().clear_received();
        let mut bytes = request_head(
            "POST",
            b"/v1/apps",
            "proxy.test",
            Some(&h.world.secret),
            lines,
        );
        bytes.extend_from_slice(body);
        bytes.extend_from_slice(&smuggled(h));
        let mut raw = Raw::connect(h).await;
        raw.send(&bytes).await;
        let first = raw.response(false).await;
        let second = raw.response(false).await;
        let closed = raw.closed_within(Duration::from_secs(2)).await;
        let got: Vec<String> = h
            .standin()
            .received()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path_and_query))
            .collect();
        eprintln!(
            "A5 {label} -> {} then {} closed={closed} upstream={got:?}",
            first
                .as_ref()
                .map_or("no response".into(), RawResponse::summary),
            second
                .as_ref()
                .map_or("no second response".into(), RawResponse::summary),
        );
        let first = first.unwrap_or_else(|| panic!("{label}: no response"));
        assert_eq!(first.status, 400, "{label}");
        assert!(second.is_none(), "{label}: a second response: {second:?}");
        assert!(closed, "{label}: the connection stays open");
        assert!(got.is_empty(), "{label}: reached Apple: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_together_with_transfer_encoding_is_refused_and_the_connection_closed() {
    let h = Harness::start().await;
    assert_smuggling_refused(
        &h,
        &[
            (
                "CL then TE: chunked",
                &[b"Content-Length: 5", b"Transfer-Encoding: chunked"],
                b"0\r\n\r\n",
            ),
            (
                "TE: chunked then CL",
                &[b"Transfer-Encoding: chunked", b"Content-Length: 5"],
                b"0\r\n\r\n",
            ),
            (
                "CL with TE:<tab>chunked",
                &[b"Content-Length: 5", b"Transfer-Encoding:\tchunked"],
                b"0\r\n\r\n",
            ),
            (
                "CL 0 with TE: chunked and a real chunk",
                &[b"Content-Length: 0", b"Transfer-Encoding: chunked"],
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
        ],
    )
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_content_lengths_are_refused_and_the_connection_closed() {
    let h = Harness::start().await;
    assert_smuggling_refused(
        &h,
        &[
            (
                "Content-Length 5 and 6",
                &[b"Content-Length: 5", b"Content-Length: 6"],
                b"hello!",
            ),
            (
                "Content-Length: 5, 6",
                &[b"Content-Length: 5, 6"],
                b"hello!",
            ),
            (
                "Content-Length 6 then 0",
                &[b"Content-Length: 6", b"Content-Length: 0"],
                b"hello!",
            ),
        ],
    )
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obfuscated_transfer_encodings_are_refused_and_the_connection_closed() {
    let h = Harness::start().await;
    assert_smuggling_refused(
        &h,
        &[
            (
                "TE: xchunked",
                &[b"Transfer-Encoding: xchunked"],
                b"0\r\n\r\n",
            ),
            (
                "CL + TE: xchunked",
                &[b"Content-Length: 5", b"Transfer-Encoding: xchunked"],
                b"0\r\n\r\n",
            ),
            (
                "TE: chunked, identity",
                &[b"Transfer-Encoding: chunked, identity"],
                b"0\r\n\r\n",
            ),
            (
                "CL + TE: chunked, identity",
                &[
                    b"Content-Length: 5",
                    b"Transfer-Encoding: chunked, identity",
                ],
                b"0\r\n\r\n",
            ),
            (
                "TE: chunked + TE: x",
                &[b"Transfer-Encoding: chunked", b"Transfer-Encoding: x"],
                b"0\r\n\r\n",
            ),
            (
                "CL + TE: chunked + TE: x",
                &[
                    b"Content-Length: 5",
                    b"Transfer-Encoding: chunked",
                    b"Transfer-Encoding: x",
                ],
                b"0\r\n\r\n",
            ),
            (
                "space before the colon",
                &[b"Content-Length: 5", b"Transfer-Encoding : chunked"],
                b"0\r\n\r\n",
            ),
            (
                "obs-fold continuation line",
                &[
                    b"Content-Length: 5",
                    b"X-Pad: a",
                    b" Transfer-Encoding: chunked",
                ],
                b"0\r\n\r\n",
            ),
            (
                "vertical tab before chunked",
                &[b"Content-Length: 5", b"Transfer-Encoding:\x0bchunked"],
                b"0\r\n\r\n",
            ),
            (
                "TE on HTTP/1.0-style quoted value",
                &[b"Content-Length: 5", b"Transfer-Encoding: \"chunked\""],
                b"0\r\n\r\n",
            ),
        ],
    )
    .await;
    h.stop().await;
}

// A6 -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_header_block_gets_431_and_the_connection_closed() {
    let h = Harness::start().await;
    let many: Vec<Vec<u8>> = (0..100)
        .map(|i| format!("X-Pad-{i}: {}", "a".repeat(1000)).into_bytes())
        .collect();
    let one = format!("X-Big: {}", "b".repeat(70 * 1024)).into_bytes();
    let cases: [(&str, Vec<&[u8]>); 2] = [
        (
            "100 headers of 1000 bytes",
            many.iter().map(Vec::as_slice).collect(),
        ),
        ("one 70 KiB header value", vec![one.as_slice()]),
    ];
    for (label, lines) in cases {
        let bytes = request_head(
            "GET",
            b"/v1/apps",
            "proxy.test",
            Some(&h.world.secret),
            &lines,
        );
        let (r, closed) = exchange(&h, &bytes, Duration::from_secs(2)).await;
        eprintln!(
            "A6 {label} -> {} closed={closed}",
            r.as_ref()
                .map_or("no response".into(), RawResponse::summary)
        );
        let r = r.unwrap_or_else(|| panic!("{label}: no response"));
        assert_eq!(r.status, 431, "{label}");
        assert!(closed, "{label}: the connection stays open");
    }
    assert!(h.standin().received().is_empty());
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    h.stop().await;
}

// A7 -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_trickling_headers_is_cut_off_while_others_are_served() {
    let h = Harness::with(Setup {
        server_toml: "header_read_timeout = \"1s\"".into(),
        ..Setup::default()
    })
    .await;
    let stream = TcpStream::connect(h.addr).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(b"GET /v1/apps HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // One header byte every 300 ms, never finishing the block, for up to ~6 s.
    let trickle = tokio::spawn(async move {
        for &b in b"X-Slow: ".iter().chain([b'a'; 12].iter()) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
        }
        // Keep the write half open so only the server can end the connection.
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    // Meanwhile an ordinary client is served.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ok = h.get("/v1/apps").await;
    assert_eq!(ok.status, StatusCode::OK);

    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    trickle.abort();
    eprintln!(
        "A7 slowloris -> closed={} after {elapsed:?}, answer {:?}",
        ended.is_ok(),
        String::from_utf8_lossy(&got)
            .lines()
            .next()
            .unwrap_or("(none)")
    );
    assert!(ended.is_ok(), "the server never closed the slow connection");
    assert!(
        elapsed < Duration::from_secs(3),
        "closed only after {elapsed:?}"
    );
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let received = h.standin().received();
    assert_eq!(received.len(), 1, "only the ordinary request reached Apple");
    h.stop().await;
}

// A8 -------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cr_lf_or_nul_inside_a_header_value_never_reaches_upstream() {
    let h = Harness::start().await;
    for (label, line) in [
        ("bare CR", b"X-A: a\rb".as_slice()),
        ("NUL", b"X-B: a\0b".as_slice()),
        (
            "CR then injected header",
            b"X-C: a\rX-Injected: yes".as_slice(),
        ),
        ("DEL", b"X-D: a\x7fb".as_slice()),
        ("NUL in the name", b"X-E\0: a".as_slice()),
    ] {
        let (r, closed) = exchange(
            &h,
            &request_head(
                "GET",
                b"/v1/apps",
                "proxy.test",
                Some(&h.world.secret),
                &[line],
            ),
            Duration::from_secs(2),
        )
        .await;
        eprintln!(
            "A8 {label} -> {} closed={closed}",
            r.as_ref()
                .map_or("no response".into(), RawResponse::summary)
        );
        let r = r.unwrap_or_else(|| panic!("{label}: no response"));
        assert_eq!(r.status, 400, "{label}");
    }
    assert!(h.standin().received().is_empty(), "nothing reached Apple");

    // obs-text (0x80..0xff) is legal in a field value: refused, or forwarded byte for byte.
    let obs: &[u8] = b"caf\xe9 \x80\xff";
    let mut line = b"X-Obs: ".to_vec();
    line.extend_from_slice(obs);
    let (r, _) = exchange(
        &h,
        &request_head(
            "GET",
            b"/v1/apps",
            "proxy.test",
            Some(&h.world.secret),
            &[&line],
        ),
        Duration::ZERO,
    )
    .await;
    let r = r.expect("a response");
    let got = h.standin().received();
    eprintln!("A8 obs-text -> {} upstream={}", r.summary(), got.len());
    if r.status == 200 {
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].headers["x-obs"].as_bytes(), obs);
    } else {
        assert!((400..500).contains(&r.status), "{}", r.status);
        assert!(got.is_empty());
    }
    assert_clean_upstream_headers(&h, "\0never\0");
    h.stop().await;
}

// ---------------------------------------------------------------------------------------
// HTTP/2
// ---------------------------------------------------------------------------------------

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn u32_at(&self, i: usize) -> u32 {
        u32::from_be_bytes(self.payload[i..i + 4].try_into().unwrap()) & 0x7fff_ffff
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK integer with an N-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of "literal without indexing, new name" fields (no Huffman, no table).
fn hpack_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawH2 {
    /// Connects with prior knowledge and returns the server's first SETTINGS, acknowledged.
    async fn connect(h: &Harness) -> (RawH2, Vec<(u16, u32)>) {
        let mut c = RawH2 {
            stream: TcpStream::connect(h.addr).await.unwrap(),
            buf: Vec::new(),
        };
        let mut hello = H2_PREFACE.to_vec();
        hello.extend_from_slice(&frame(FRAME_SETTINGS, 0, 0, &[]));
        c.stream.write_all(&hello).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let f = c.next(deadline).await.expect("server SETTINGS");
            if f.kind == FRAME_SETTINGS && f.flags & FLAG_ACK == 0 {
                let settings = f
                    .payload
                    .chunks_exact(6)
                    .map(|s| {
                        (
                            u16::from_be_bytes([s[0], s[1]]),
                            u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                        )
                    })
                    .collect();
                c.stream
                    .write_all(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
                    .await
                    .unwrap();
                return (c, settings);
            }
        }
    }

    /// The next frame, or `None` on EOF, reset or the deadline.
    async fn next(&mut self, deadline: Instant) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline.into(), self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_advertise_the_deliberate_stream_and_header_list_limits() {
    let h = Harness::start().await;
    let (_c, settings) = RawH2::connect(&h).await;
    eprintln!("B settings: {settings:?}");
    let get = |id: u16| {
        settings
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| *v)
    };
    let streams = get(SETTINGS_MAX_CONCURRENT_STREAMS).expect("MAX_CONCURRENT_STREAMS is set");
    assert_eq!(streams, apple_api_proxy::server::H2_MAX_CONCURRENT_STREAMS);
    assert!(streams > 0 && streams <= 256, "{streams}");
    let list = get(SETTINGS_MAX_HEADER_LIST_SIZE).expect("MAX_HEADER_LIST_SIZE is set");
    assert_eq!(list, apple_api_proxy::server::H2_MAX_HEADER_LIST_SIZE);
    assert!(list <= 64 * 1024, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_beyond_the_advertised_limit_are_refused_and_a_persistent_offender_is_cut_off(
) {
    let h = Harness::start().await;
    let (mut c, settings) = RawH2::connect(&h).await;
    let limit = settings
        .iter()
        .rev()
        .find(|(i, _)| *i == SETTINGS_MAX_CONCURRENT_STREAMS)
        .map(|(_, v)| *v)
        .expect("MAX_CONCURRENT_STREAMS is set");
    // 300 authenticated uploads whose bodies never come: each stays open at the proxy
    // (forwarded, the stand-in waiting for the body), so all count as concurrent.
    let auth = format!("Bearer {}", h.world.secret);
    let mut burst = Vec::new();
    for i in 0..300u32 {
        let block = hpack_block(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "proxy.test"),
            (":path", "/v1/uploads"),
            ("authorization", &auth),
        ]);
        burst.extend_from_slice(&frame(FRAME_HEADERS, FLAG_END_HEADERS, 2 * i + 1, &block));
    }
    c.stream.write_all(&burst).await.unwrap();

    let last_allowed = 2 * limit - 1; // the limit-th client stream id
    let mut refused = Vec::new();
    let mut other_resets = Vec::new();
    let mut goaway = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(f) = c.next(deadline).await {
        match f.kind {
            FRAME_RST_STREAM if f.u32_at(0) == REFUSED_STREAM => refused.push(f.stream),
            FRAME_RST_STREAM => other_resets.push((f.stream, f.u32_at(0))),
            FRAME_GOAWAY => {
                goaway = Some((f.u32_at(0), f.u32_at(4)));
                break;
            }
            _ => {}
        }
    }
    eprintln!(
        "B 300 streams vs limit {limit}: refused {} (ids {:?}..{:?}), other resets {other_resets:?}, goaway (last id, code) {goaway:?}",
        refused.len(),
        refused.first(),
        refused.last()
    );
    assert!(other_resets.is_empty(), "{other_resets:?}");
    assert!(
        refused.iter().all(|&id| id > last_allowed),
        "a stream within the limit was refused: {refused:?}"
    );
    assert_eq!(
        refused.first(),
        Some(&(last_allowed + 2)),
        "the first stream beyond the limit is refused"
    );
    // Every stream beyond the limit was refused, or the connection was ended with
    // ENHANCE_YOUR_CALM having processed no stream beyond the limit.
    match goaway {
        Some((last_id, code)) => {
            assert_eq!(code, ENHANCE_YOUR_CALM);
            assert!(last_id <= last_allowed, "processed up to stream {last_id}");
        }
        None => assert_eq!(refused.len() as u32, 300 - limit),
    }
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        h.standin().received().len() <= limit as usize,
        "more than {limit} requests reached Apple"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_floods_are_answered_with_goaway() {
    let h = Harness::start().await;
    let (mut c, _) = RawH2::connect(&h).await;
    let mut flood = Vec::new();
    for i in 0..200u32 {
        let id = 2 * i + 1;
        let block = hpack_block(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "proxy.test"),
            (":path", "/v1/apps"),
        ]);
        flood.extend_from_slice(&frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            id,
            &block,
        ));
        flood.extend_from_slice(&frame(FRAME_RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    let _ = c.stream.write_all(&flood).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut goaway = None;
    while let Some(f) = c.next(deadline).await {
        if f.kind == FRAME_GOAWAY {
            goaway = Some((f.u32_at(0), f.u32_at(4)));
            break;
        }
    }
    eprintln!("B rapid reset x200 -> goaway (last id, code) {goaway:?}");
    let (_, code) = goaway.expect("a GOAWAY");
    assert_eq!(code, ENHANCE_YOUR_CALM);
    assert!(h.standin().received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conforming_http2_client_with_300_concurrent_requests_is_queued_not_refused() {
    // hyper's client honours the server's MAX_CONCURRENT_STREAMS, so the 44 requests beyond
    // the limit wait for a free stream instead of being refused.
    let h = Harness::start().await;
    let tcp = TcpStream::connect(h.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let auth = format!("Bearer {}", h.world.secret);
    let mut tasks = Vec::new();
    for i in 0..300 {
        let mut sender = sender.clone();
        let req = http::Request::get(format!("http://proxy.test/v1/apps/{i}"))
            .header("authorization", &auth)
            .body(Full::new(Bytes::new()))
            .unwrap();
        tasks.push(tokio::spawn(async move {
            sender.ready().await?;
            let r = sender.send_request(req).await?;
            let status = r.status();
            r.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let status = tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("in time")
            .unwrap()
            .expect("no refused stream");
        assert_eq!(status, StatusCode::OK);
        ok += 1;
    }
    assert_eq!(ok, 300);
    assert_eq!(h.standin().received().len(), 300);
    h.stop().await;
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

/// Path pieces mixing Apple's prefixes with every trick DESIGN §13 names.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "v1",
            "v2",
            "v3",
            "v10",
            "v1000",
            "v",
            "V1",
            "inApps",
            "groups",
            "sandbox",
            "advancedCommerce",
            "externalPurchase",
            "notary",
            "apps",
            "",
            ".",
            "..",
            "%2e",
            "%2E%2e",
            ".%2e",
            "%2f",
            "%2F",
            "%5c",
            "\\",
            "%00",
            "%",
            "%z",
            "%zz",
            "%ff",
            "%c0%af",
            "%C3%A9",
            "é",
            "a..b",
            "?",
            "#",
            "*",
        ])
        .prop_map(String::from),
        "[a-zA-Z0-9._~%-]{0,6}",
        ".{0,3}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(piece(), 0..7).prop_map(|v| format!("/{}", v.join("/"))),
        1 => prop::collection::vec(piece(), 0..7).prop_map(|v| v.join("/")),
        1 => any::<String>(),
    ]
}

fn route_table() -> apple_api_proxy::route::Table {
    let config =
        apple_api_proxy::config::Config::parse("", "t.toml", std::path::Path::new(".")).unwrap();
    apple_api_proxy::route::Table::new(&config)
}

/// `/v<1..3 digits>/`: the App Store Connect prefix rule, written independently.
fn literal_connect_prefix(p: &str) -> bool {
    let Some(rest) = p.strip_prefix("/v") else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    (1..=3).contains(&digits) && rest.as_bytes().get(digits) == Some(&b'/')
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Nothing written next to the sources; a failure prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::with_cases(256)
    })]

    #[test]
    fn path_checks_and_routing_never_panic_and_never_rewrite_the_path(p in path()) {
        use apple_api_proxy::apple::{Api, Environment};
        use apple_api_proxy::route::{check_path, percent_decode};
        let table = route_table();
        let checked = check_path(&p);
        let resolved = table.resolve(&p);
        if checked.is_ok() {
            // Independent restatement of DESIGN §13 for anything that passes.
            prop_assert!(!p.contains('\\'));
            prop_assert!(!p[1..].trim_end_matches('/').contains("//") && !p.starts_with("//"));
            let decoded = percent_decode(&p);
            prop_assert!(decoded.is_some());
            let decoded = String::from_utf8(decoded.unwrap().into_owned());
            prop_assert!(decoded.is_ok());
            prop_assert!(!decoded.unwrap().chars().any(char::is_control));
            for seg in p.split('/') {
                let seg = percent_decode(seg).unwrap();
                prop_assert!(*seg != *b"." && *seg != *b"..", "dot segment in {:?}", p);
                prop_assert!(!seg.contains(&b'/') && !seg.contains(&b'\\'));
            }
            if let Ok(route) = resolved {
                let again = table.resolve(&p).unwrap();
                prop_assert_eq!(again.api, route.api);
                prop_assert_eq!(again.environment, route.environment);
                prop_assert_eq!(again.path, route.path);
                // Forwarded exactly as sent, minus an optional /sandbox prefix.
                let expected = match route.environment {
                    Environment::Sandbox => p.strip_prefix("/sandbox").filter(|r| r.starts_with('/')),
                    Environment::Production => Some(p.as_str()),
                };
                prop_assert_eq!(Some(route.path), expected, "{:?}", p);
                prop_assert!(route.url(None).ends_with(route.path));
                // The API is the one the literal prefix names, never another.
                let literal = if route.api == Api::AppStoreConnect {
                    literal_connect_prefix(route.path)
                } else {
                    route.api.prefixes().iter().any(|pre| route.path.starts_with(pre))
                };
                prop_assert!(literal, "{:?} routed to {}", p, route.api);
                prop_assert_eq!(
                    route.environment == Environment::Sandbox,
                    p.starts_with("/sandbox/")
                );
            }
        }
    }

    #[test]
    fn glob_match_never_panics_and_agrees_with_a_naive_matcher(
        glob in prop_oneof!["[ab/*]{0,8}", ".{0,12}"],
        text in prop_oneof!["[ab/]{0,10}", ".{0,12}"],
    ) {
        use apple_api_proxy::client::glob_match;
        let got = glob_match(&glob, &text);
        prop_assert_eq!(got, naive_glob(glob.as_bytes(), text.as_bytes()), "{:?} ~ {:?}", glob, text);
        prop_assert!(glob_match("*", &text));
        if !glob.contains('*') {
            prop_assert_eq!(got, glob == text, "literal {:?} vs {:?}", glob, text);
            prop_assert!(glob_match(&glob, &glob));
            prop_assert_eq!(glob_match(&format!("{glob}*"), &text), text.starts_with(glob.as_str()));
        }
    }

    #[test]
    fn scope_entries_never_panic_and_never_carry_limit_cursor_or_sort(
        method in prop_oneof![
            prop::sample::select(vec!["GET", "POST", "DELETE", "PATCH"]).prop_map(String::from),
            ".{0,6}",
        ],
        path in "[^?]{0,20}",
        query in prop_oneof![
            Just(None),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "limit", "cursor", "sort", "LIMIT", "limitx", "xlimit", "limit[apps]",
                        "filter%5Bapps%5D", "fields[apps]", "%6Cimit", "a", "", "sort%3D1",
                    ]),
                    prop::option::of("[a-z0-9%=,\\[\\]-]{0,6}"),
                ),
                0..6,
            )
            .prop_map(|pairs| Some(pairs
                .into_iter()
                .map(|(n, v)| match v { Some(v) => format!("{n}={v}"), None => n.to_string() })
                .collect::<Vec<_>>()
                .join("&"))),
            prop::option::of(".{0,20}"),
        ],
    ) {
        use apple_api_proxy::token::scope_entry;
        let entry = scope_entry(&method, &path, query.as_deref());
        let head = format!("{method} {path}");
        prop_assert!(entry.starts_with(&head), "{:?}", entry);
        let rest = &entry[head.len()..];
        prop_assert!(rest.is_empty() || rest.starts_with('?'), "{:?}", entry);
        let params: Vec<&str> = if rest.is_empty() { vec![] } else { rest[1..].split('&').collect() };
        for p in &params {
            let name = p.split('=').next().unwrap_or("");
            prop_assert!(
                !["limit", "cursor", "sort"].contains(&name),
                "{:?} kept in {:?}", p, entry
            );
        }
        let kept = query
            .as_deref()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| !["limit", "cursor", "sort"].contains(&p.split('=').next().unwrap_or("")))
            .count();
        prop_assert_eq!(params.len(), kept, "{:?} from {:?}", entry, query);
    }
}

/// Exponential-time reference: `*` matches any run of bytes, everything else itself.
fn naive_glob(g: &[u8], t: &[u8]) -> bool {
    match g.split_first() {
        None => t.is_empty(),
        Some((b'*', rest)) => (0..=t.len()).any(|i| naive_glob(rest, &t[i..])),
        Some((c, rest)) => t.first() == Some(c) && naive_glob(rest, &t[1..]),
    }
}

/// One request from client `reader` (allowed only `GET /v1/*`) and the policy oracle.
async fn reader_request(
    h: &Harness,
    method: &str,
    target: &str,
    forwarded: &AtomicUsize,
) -> Result<(), proptest::test_runner::TestCaseError> {
    let before = h.standin().received().len();
    let bytes = request_head(
        method,
        target.as_bytes(),
        "proxy.test",
        Some(&h.world.reader_secret),
        &[b"Connection: close"],
    );
    let mut raw = Raw::connect(h).await;
    raw.send(&bytes).await;
    let r = raw.response(method == "HEAD").await;
    prop_assert!(r.is_some(), "{} {}: no response", method, target);
    let r = r.unwrap();
    let received = h.standin().received();
    let new = &received[before..];
    let path = target.split('?').next().unwrap_or("");
    let allowed = method == "GET"
        && path.starts_with("/v1/")
        && apple_api_proxy::route::check_path(path).is_ok();

    prop_assert!(
        r.header("x-request-id").is_some(),
        "{} {} -> {} without x-request-id",
        method,
        target,
        r.status
    );
    if allowed {
        prop_assert_eq!(new.len(), 1, "{} {} -> {}", method, target, r.status);
        prop_assert_eq!(new[0].role, Role::AppStoreConnect);
        prop_assert_eq!(&new[0].path_and_query, target);
        forwarded.fetch_add(1, Ordering::Relaxed);
    } else {
        prop_assert!(
            new.is_empty(),
            "{} {} is denied but reached Apple (status {})",
            method,
            target,
            r.status
        );
        prop_assert!(
            matches!(r.status, 400 | 401 | 403 | 404 | 414),
            "{} {} -> {}",
            method,
            target,
            r.status
        );
        if method != "HEAD" {
            let code = r.proxy_code().unwrap_or_default();
            prop_assert!(
                code.starts_with("PROXY_"),
                "{} {} -> {:?}",
                method,
                target,
                code
            );
        }
    }
    Ok(())
}

#[test]
fn a_request_the_policy_denies_is_never_forwarded() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h = rt.block_on(Harness::start());
    // Weighted so that about one case in five is allowed (GET /v1/…) and must get through.
    let method = prop::sample::select(vec![
        "GET", "GET", "GET", "GET", "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS",
        "TRACE",
    ]);
    let prefix = prop::sample::select(vec![
        "/v1/",
        "/v1/",
        "/v1/",
        "/v1/",
        "/v1/",
        "/v1/",
        "/v2/",
        "/v1",
        "/v10/",
        "/V1/",
        "/v1//",
        "/v1/../",
        "/v1/%2e%2e/",
        "/v1/%2f",
        "/inApps/v1/",
        "/sandbox/inApps/v1/",
        "/sandbox/v1/",
        "/groups/",
        "/notary/v2/",
        "/advancedCommerce/",
        "/externalPurchase/",
        "/",
        "/sandbox",
    ]);
    let tail = prop_oneof![
        3 => "[A-Za-z0-9._~!$&'()*+,;=:@/-]{0,24}",
        1 => "[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,24}",
    ];
    let query = prop::option::of("[A-Za-z0-9=&%._-]{0,16}");
    let strategy = (method, prefix, tail, query).prop_map(|(m, p, t, q)| {
        let target = match q {
            Some(q) => format!("{p}{t}?{q}"),
            None => format!("{p}{t}"),
        };
        (m, target)
    });
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        failure_persistence: None,
        ..proptest::test_runner::Config::with_cases(48)
    });
    let forwarded = AtomicUsize::new(0);
    let result = runner.run(&strategy, |(method, target)| {
        rt.block_on(reader_request(&h, method, &target, &forwarded))
    });
    rt.block_on(h.stop());
    result.unwrap();
    eprintln!(
        "C4 48 cases, {} allowed and forwarded, the rest denied and not",
        forwarded.load(Ordering::Relaxed)
    );
}
