//! End-to-end tests: the real proxy (in process on port 0, or the real binary) in front of
//! the Apple stand-in over real TLS. What reached "Apple" is asserted from the stand-in's
//! record; tokens are verified with RustCrypto's p256, never with ring (which signs them).

mod audit;
mod client_keys;
mod deploy;
mod doctor;
mod exchange;
mod hardening;
mod hsm;
mod identity;
mod ops;
mod push;
mod review;
mod second_round;
mod shape;
mod signing;
mod support;

use std::process::Stdio;
use std::time::Duration;

use apple_api_proxy::proxy::codes;
use apple_standin::Role;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt as _, Full};
use support::*;

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

fn bearer(received: &apple_standin::Received) -> String {
    received.headers["authorization"]
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_and_the_sandbox_prefix_reach_the_right_upstream_with_the_path_intact() {
    let h = Harness::start().await;
    let cases = [
        (
            "GET",
            "/v1/apps?filter%5Bplatform%5D=IOS&limit=5",
            Role::AppStoreConnect,
            "/v1/apps?filter%5Bplatform%5D=IOS&limit=5",
        ),
        (
            "GET",
            "/v2/inAppPurchases/123",
            Role::AppStoreConnect,
            "/v2/inAppPurchases/123",
        ),
        (
            "GET",
            "/v3/appPricePoints/abc",
            Role::AppStoreConnect,
            "/v3/appPricePoints/abc",
        ),
        (
            "GET",
            "/notary/v2/test",
            Role::AppStoreConnect,
            "/notary/v2/test",
        ),
        (
            "GET",
            "/inApps/v1/transactions/2000000000000001",
            Role::StoreKitProduction,
            "/inApps/v1/transactions/2000000000000001",
        ),
        (
            "GET",
            "/sandbox/inApps/v2/history/1?revision=abc",
            Role::StoreKitSandbox,
            "/inApps/v2/history/1?revision=abc",
        ),
        (
            "POST",
            "/groups/v1/transactions/1/seats",
            Role::StoreKitProduction,
            "/groups/v1/transactions/1/seats",
        ),
        (
            "POST",
            "/sandbox/groups/v1/transactions/1/seats",
            Role::StoreKitSandbox,
            "/groups/v1/transactions/1/seats",
        ),
        (
            "POST",
            "/advancedCommerce/v1/subscription/cancel/7",
            Role::StoreKitProduction,
            "/advancedCommerce/v1/subscription/cancel/7",
        ),
        (
            "PUT",
            "/externalPurchase/v1/reports",
            Role::StoreKitProduction,
            "/externalPurchase/v1/reports",
        ),
        (
            "GET",
            "/sandbox/externalPurchase/v1/reports/r1",
            Role::StoreKitSandbox,
            "/externalPurchase/v1/reports/r1",
        ),
    ];
    for (method, path, role, upstream_path) in cases {
        h.standin().clear_received();
        let reply = send(h.request(method, path).body(empty()).unwrap()).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{method} {path}: {:?}",
            reply.body
        );
        let got = h.standin().received();
        assert_eq!(got.len(), 1, "{method} {path}");
        assert_eq!(
            (
                got[0].role,
                got[0].method.as_str(),
                got[0].path_and_query.as_str()
            ),
            (role, method, upstream_path)
        );
        assert!(
            got[0].verdict.is_ok(),
            "{method} {path}: {:?}",
            got[0].verdict
        );
        assert!(reply.headers.contains_key("x-request-id"));
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_exact_for_each_api_and_key_kind() {
    let h = Harness::start().await;
    // Team key on App Store Connect, scoped GET.
    h.get("/v1/apps/1").await;
    // Individual key (client `reader` is pinned to it).
    let r = send(
        http::Request::get(h.url("/v1/users"))
            .header(
                "proxy-authorization",
                format!("Bearer {}", h.world.reader_secret),
            )
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // Team key on Notary (unscoped).
    h.get("/notary/v2/test").await;
    // In-app-purchase key on the storekit APIs.
    h.get("/inApps/v1/transactions/1").await;
    let got = h.standin().received();
    assert_eq!(got.len(), 4);
    let claims: Vec<serde_json::Value> = got
        .iter()
        .map(|r| r.verdict.as_ref().expect("accepted").claims.clone())
        .collect();
    let headers: Vec<serde_json::Value> = got
        .iter()
        .map(|r| r.verdict.as_ref().unwrap().header.clone())
        .collect();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&claims[0]), ["aud", "exp", "iat", "iss", "scope"]);
    assert_eq!(claims[0]["iss"], ISSUER);
    assert_eq!(claims[0]["scope"], serde_json::json!(["GET /v1/apps/1"]));
    assert_eq!(
        headers[0],
        serde_json::json!({"alg": "ES256", "kid": TEAM_KID, "typ": "JWT"})
    );
    assert_eq!(keys(&claims[1]), ["aud", "exp", "iat", "scope", "sub"]);
    assert_eq!(claims[1]["sub"], "user");
    assert_eq!(headers[1]["kid"], INDIVIDUAL_KID);
    assert_eq!(keys(&claims[2]), ["aud", "exp", "iat", "iss"]);
    assert_eq!(keys(&claims[3]), ["aud", "bid", "exp", "iat", "iss"]);
    assert_eq!(claims[3]["bid"], BUNDLE);
    assert_eq!(headers[3]["kid"], IAP_KID);
    for c in &claims {
        assert_eq!(c["aud"], "appstoreconnect-v1");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let iat = c["iat"].as_i64().unwrap();
        assert!(
            iat <= now && iat >= now - 70,
            "iat back-dated by the 60 s leeway: {iat} vs {now}"
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_is_exact_including_the_query_and_the_path_is_forwarded_as_sent() {
    let h = Harness::start().await;
    let target = "/v1/apps?filter%5BbundleId%5D=com.example.app&fields[apps]=name&limit=200&cursor=abc&sort=-name";
    let r = h.get(target).await;
    assert_eq!(r.status, StatusCode::OK);
    let got = h.standin().received();
    assert_eq!(got[0].path_and_query, target);
    let claims = &got[0].verdict.as_ref().unwrap().claims;
    assert_eq!(
        claims["scope"],
        serde_json::json!(["GET /v1/apps?filter[bundleId]=com.example.app&fields[apps]=name"])
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_caps_hold_against_a_config_asking_for_more() {
    let h = Harness::with(Setup {
        key_lifetime: Some("6h"),
        ..Setup::default()
    })
    .await;
    h.get("/v1/apps").await;
    h.get("/inApps/v1/transactions/1").await;
    h.request("POST", "/v1/apps");
    let post = send(
        h.request("POST", "/v1/bundleIds")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(post.status, StatusCode::OK);
    let got = h.standin().received();
    let lifetime = |i: usize| {
        let c = &got[i].verdict.as_ref().expect("accepted").claims;
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap()
    };
    assert_eq!(lifetime(0), 20 * 60, "App Store Connect capped at 20 min");
    assert_eq!(lifetime(1), 60 * 60, "storekit capped at 60 min");
    assert!(
        lifetime(2) <= 3 * 60,
        "unscoped (non-GET) App Store Connect tokens are short"
    );
    assert!(got[2]
        .verdict
        .as_ref()
        .unwrap()
        .claims
        .get("scope")
        .is_none());
    assert_eq!(got[2].body_len, 2, "the request body streamed through");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature_verifies_with_an_independent_implementation() {
    let h = Harness::start().await;
    h.get("/v1/apps").await;
    h.get("/inApps/v1/transactions/1").await;
    let got = h.standin().received();
    let (team, iap) = (bearer(&got[0]), bearer(&got[1]));
    assert!(verify_with_p256(&team, &h.world.keys.team.public));
    assert!(verify_with_p256(&iap, &h.world.keys.iap.public));
    assert!(
        !verify_with_p256(&team, &h.world.keys.iap.public),
        "and fails with the wrong key"
    );
    use base64::Engine as _;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(team.rsplit('.').next().unwrap())
        .unwrap();
    assert_eq!(sig.len(), 64, "raw r||s, never DER");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authorization_cookies_and_hop_by_hop_headers_are_never_forwarded() {
    let h = Harness::start().await;
    let r = send(
        http::Request::get(h.url("/v1/apps"))
            .header("proxy-authorization", format!("Bearer {}", h.world.secret))
            .header(
                "authorization",
                "Bearer eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJzZGsifQ.c2ln",
            )
            .header("cookie", "session=abc")
            .header("host", "evil.example")
            .header("x-forwarded-for", "10.1.2.3")
            .header("connection", "x-private-hop")
            .header("x-private-hop", "1")
            .header("accept", "application/json")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let got = &h.standin().received()[0];
    let headers = &got.headers;
    assert_eq!(headers.get_all("authorization").iter().count(), 1);
    let sent = bearer(got);
    assert!(
        !sent.contains("c2ln") && verify_with_p256(&sent, &h.world.keys.team.public),
        "only the proxy's token"
    );
    for name in [
        "proxy-authorization",
        "cookie",
        "x-forwarded-for",
        "x-private-hop",
    ] {
        assert!(!headers.contains_key(name), "{name} reached Apple");
    }
    let body = String::from_utf8_lossy(&r.body);
    assert!(!body.contains(&h.world.secret));
    assert_eq!(headers["accept"], "application/json");
    if let Some(host) = headers.get("host") {
        assert_ne!(host, "evil.example");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_from_the_client_and_http2_to_apple() {
    let h = Harness::start().await;
    let r = send_with(
        http2_client(),
        h.request("GET", "/v1/apps").body(empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        h.standin().received()[0].version,
        http::Version::HTTP_2,
        "ALPN picked h2 upstream"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_prefix_is_a_json_404_naming_the_known_prefixes_and_contacts_nothing() {
    let h = Harness::start().await;
    for path in ["/nope", "/sandbox/v1/apps", "/vx/apps", "/"] {
        let r = h.get(path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.error_code(), codes::NO_ROUTE);
        let detail = r.json()["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .to_string();
        for prefix in [
            "/v1/",
            "/inApps/",
            "/groups/",
            "/advancedCommerce/",
            "/externalPurchase/",
            "/notary/",
        ] {
            assert!(detail.contains(prefix), "{detail}");
        }
        assert_eq!(
            r.json()["request_id"],
            r.headers["x-request-id"].to_str().unwrap()
        );
    }
    assert!(h.standin().received().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_secret_or_permission_get_json_errors_and_nothing_reaches_apple() {
    let h = Harness::start().await;
    let none = send(http::Request::get(h.url("/v1/apps")).body(empty()).unwrap()).await;
    assert_eq!(
        (none.status, none.error_code().as_str()),
        (StatusCode::UNAUTHORIZED, codes::UNAUTHENTICATED)
    );
    let wrong = send(
        http::Request::get(h.url("/v1/apps"))
            .header("authorization", "Bearer aap_wrong")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (wrong.status, wrong.error_code().as_str()),
        (StatusCode::UNAUTHORIZED, codes::UNAUTHENTICATED)
    );
    let sdk_jwt = send(
        http::Request::get(h.url("/v1/apps"))
            .header("authorization", "Bearer eyJ.x.y")
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(sdk_jwt.status, StatusCode::UNAUTHORIZED);
    let reader = |method: &str, path: &str| {
        http::Request::builder()
            .method(method)
            .uri(h.url(path))
            .header("authorization", format!("Bearer {}", h.world.reader_secret))
            .body(empty())
            .unwrap()
    };
    let denied = send(reader("DELETE", "/v1/apps/1")).await;
    assert_eq!(
        (denied.status, denied.error_code().as_str()),
        (StatusCode::FORBIDDEN, codes::FORBIDDEN)
    );
    let denied = send(reader("GET", "/inApps/v1/transactions/1")).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    for r in [&none, &wrong, &denied] {
        assert!(r.headers.contains_key("x-request-id"));
        assert_eq!(r.headers["content-type"], "application/json");
    }
    assert!(h.standin().received().is_empty(), "nothing reached Apple");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_are_refused_before_routing() {
    let h = Harness::start().await;
    for path in [
        "/v1/../inApps/v1/x",
        "/v1/%2e%2e/inApps/v1/x",
        "/v1/a%2fb",
        "/v1//apps",
        "/v1/a%00b",
        "/v1/a%ff",
    ] {
        let r = h.get(path).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::BAD_REQUEST, codes::BAD_REQUEST),
            "{path}"
        );
    }
    assert!(h.standin().received().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_a_json_502() {
    let closed = free_port();
    let h = Harness::with(Setup {
        connect_base_url: Some(format!("https://127.0.0.1:{closed}")),
        ..Setup::default()
    })
    .await;
    let r = h.get("/v1/apps").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::BAD_GATEWAY, codes::UPSTREAM_UNAVAILABLE)
    );
    assert!(r.headers.contains_key("x-request-id"));
    let detail = r.json()["errors"][0]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !detail.contains("Connection refused") && !detail.contains("os error"),
        "no internal error text: {detail}"
    );
    // The other APIs still work.
    assert_eq!(
        h.get("/inApps/v1/transactions/1").await.status,
        StatusCode::OK
    );
    h.stop().await;
}

/// An HTTP/2 "Apple" over TLS (the `h2` crate itself, not the stand-in, whose hyper server
/// cannot refuse a stream) that refuses its first stream with `REFUSED_STREAM`, as a server
/// going away does, and answers every later one 200 with the `Authorization` it was sent.
/// Counts the streams it saw.
async fn refusing_h2_apple(ca: &TestCa) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    let acceptor = tls_acceptor(ca, "refusing apple", &[b"h2"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let streams = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let bearer = req.headers().contains_key("authorization");
                    let response = http::Response::builder()
                        .status(if bearer { 200 } else { 401 })
                        .header("content-type", "application/json")
                        .body(())
                        .unwrap();
                    if let Ok(mut body) = respond.send_response(response, false) {
                        let _ = body.send_data(Bytes::from_static(b"{\"data\":[]}"), true);
                    }
                }
            });
        }
    });
    (port, streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_apple_refused_unprocessed_is_sent_again_and_audited_as_a_retry() {
    let ca = TestCa::new("refusing apple CA");
    let (port, streams) = refusing_h2_apple(&ca).await;
    let world = World::new(
        &Setup {
            connect_base_url: Some(format!("https://127.0.0.1:{port}")),
            ..Setup::default()
        },
        "127.0.0.1:0",
    )
    .await;
    // Trust this "Apple" beside the stand-in.
    let ca_file = world.dir.path().join("standin-ca.pem");
    let mut pem = std::fs::read_to_string(&ca_file).unwrap();
    pem.push_str(&ca.cert.pem());
    std::fs::write(&ca_file, pem).unwrap();
    let h = Harness::from_world(world).await;

    let r = h.get("/v1/apps").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the refused stream was sent again: {:?}",
        r.body
    );
    assert_eq!(
        streams.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "one refused, one answered"
    );
    // The record is written when the response ends; the writer commits in groups.
    let audit = h.world.dir.path().join("audit.jsonl");
    let records = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|r: &serde_json::Value| r["path"] == "/v1/apps")
            .collect()
    };
    assert!(
        eventually(|| async { !records().is_empty() }).await,
        "the request was audited"
    );
    let records = records();
    assert_eq!(records.len(), 1, "one record for the one request");
    assert_eq!(records[0]["status"], 200);
    assert_eq!(records[0]["connect_retries"], 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_host_whose_clock_runs_fast_learns_apples_clock_and_gets_through() {
    // "Apple" is 5 minutes behind this host: our iat looks 4 minutes in the future to it.
    let h = Harness::with(Setup {
        standin_clock_offset: -300,
        ..Setup::default()
    })
    .await;
    // Apple refuses the first token (iat in its future); the proxy learns Apple's clock from
    // that answer's Date, re-mints and retries once: the client only sees the success,
    // marked with the cause.
    let first = h.get("/inApps/v1/transactions/1").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-proxy-diagnosis"], "CLOCK_SKEW");
    let second = h.get("/inApps/v1/transactions/1").await;
    assert_eq!(
        second.status,
        StatusCode::OK,
        "later tokens are minted on Apple's clock"
    );
    assert!(!second.headers.contains_key("x-proxy-diagnosis"));
    let got = h.standin().received();
    assert_eq!(got.len(), 3);
    assert!(got[0].verdict.is_err(), "the first token was refused");
    let claims = &got[1].verdict.as_ref().unwrap().claims;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let iat = claims["iat"].as_i64().unwrap();
    assert!(
        (now - 300 - 62..=now - 300 - 58).contains(&iat),
        "iat = Apple's now - 60 s: {iat} vs {now}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_oversize_bodies_get_413_without_contacting_apple() {
    let h = Harness::with(Setup {
        server_toml: "max_request_body = \"1KiB\"".into(),
        ..Setup::default()
    })
    .await;
    let r = send(
        h.request("PUT", "/externalPurchase/v1/reports")
            .body(Full::new(Bytes::from(vec![b'x'; 4096])))
            .unwrap(),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, codes::BODY_TOO_LARGE)
    );
    assert!(h.standin().received().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_concurrent_requests_the_proxy_sheds_load_with_503_until_a_stream_finishes() {
    let h = Harness::with(Setup {
        server_toml: "max_concurrent_requests = 1".into(),
        ..Setup::default()
    })
    .await;
    // A big response left unread keeps its request in flight (the permit lives with the body).
    let slow = http1_client()
        .request(
            h.request("GET", "/v1/salesReports?standin_bytes=268435456")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(slow.status(), StatusCode::OK);
    let shed = h.get("/v1/apps").await;
    assert_eq!(
        (shed.status, shed.error_code().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, codes::OVERLOADED)
    );
    assert_eq!(shed.headers["retry-after"], "1");
    drop(slow);
    let mut recovered = false;
    for _ in 0..100 {
        if h.get("/v1/apps").await.status == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        recovered,
        "the permit is released when the client goes away"
    );
    h.stop().await;
}

/// A chunked (no Content-Length) request body of `chunks` × 1 MiB, generated as it is sent.
fn streamed_body(chunks: usize) -> apple_api_proxy::forward::ProxyBody {
    let stream = futures_util::stream::iter((0..chunks).map(|_| {
        Ok::<_, apple_api_proxy::forward::BoxError>(hyper::body::Frame::data(Bytes::from(
            vec![b'u'; 1 << 20],
        )))
    }));
    apple_api_proxy::forward::boxed(http_body_util::StreamBody::new(stream))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_through_and_the_size_limit_holds_mid_stream() {
    let h = Harness::with(Setup {
        server_toml: "max_request_body = \"80MiB\"".into(),
        ..Setup::default()
    })
    .await;
    // HTTP/2: a server may answer (413) before the body is done and reset just that stream;
    // over HTTP/1.1 the same early answer surfaces in the client as a broken pipe.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<apple_api_proxy::forward::ProxyBody>();
    let ok = client
        .request(
            h.request("PUT", "/externalPurchase/v1/reports")
                .body(streamed_body(64))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let echoed: serde_json::Value =
        serde_json::from_slice(&ok.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echoed["data"]["bytes_received"], 64u64 << 20);
    assert_eq!(h.standin().received()[0].body_len, 64 << 20);

    let too_big = client
        .request(
            h.request("PUT", "/externalPurchase/v1/reports")
                .body(streamed_body(100))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(too_big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value =
        serde_json::from_slice(&too_big.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["errors"][0]["code"], codes::BODY_TOO_LARGE);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_token_key_or_body_ever_reaches_the_logs_even_at_trace_level() {
    let port = free_port();
    let world = World::new(&Setup::default(), &format!("127.0.0.1:{port}")).await;
    // Logs go to a file: a pipe nobody reads until the end would fill and stall the proxy.
    let log_path = world.dir.path().join("proxy.log");
    let mut child = bin()
        .args(["serve", "--config"])
        .arg(&world.config_path)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child).await;
    let body_marker = "BODY-MARKER-4f1c9e";
    let sdk_jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzZGsiOiJ0b2tlbiJ9.U0RLLVNJR05BVFVSRS1NQVJLRVI";
    let requests = [
        (
            "GET",
            "/v1/apps?filter%5Bplatform%5D=IOS",
            world.secret.clone(),
        ),
        ("PUT", "/externalPurchase/v1/reports", world.secret.clone()),
        (
            "GET",
            "/sandbox/inApps/v1/transactions/1",
            world.secret.clone(),
        ),
        ("GET", "/v1/apps", "aap_wrong-secret-d00d".to_string()),
        ("GET", "/nope", world.secret.clone()),
    ];
    for (method, path, secret) in &requests {
        let r = send_with(
            http2_client(),
            http::Request::builder()
                .method(*method)
                .uri(format!("http://{addr}{path}"))
                .header("proxy-authorization", format!("Bearer {secret}"))
                .header("authorization", format!("Bearer {sdk_jwt}"))
                .body(Full::new(Bytes::from(format!(
                    "{{\"x\":\"{body_marker}\"}}"
                ))))
                .unwrap(),
        )
        .await;
        assert!(r.headers.contains_key("x-request-id"));
    }
    let sent_tokens: Vec<String> = world.standin.received().iter().map(bearer).collect();
    assert_eq!(sent_tokens.len(), 3);
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM stops the proxy cleanly");
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.contains("forwarded") && logs.contains("refused"),
        "the run was logged: {}",
        &logs[..logs.len().min(2000)]
    );
    let mut forbidden: Vec<(String, String)> = vec![
        ("client secret".into(), world.secret.clone()),
        ("wrong secret".into(), "aap_wrong-secret-d00d".into()),
        ("sdk jwt".into(), sdk_jwt.into()),
        ("request body".into(), body_marker.into()),
    ];
    for t in &sent_tokens {
        let mut parts = t.split('.');
        let (_, payload, sig) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        forbidden.push(("minted token payload".into(), payload.to_string()));
        forbidden.push(("minted token signature".into(), sig.to_string()));
    }
    for key in [&world.keys.team, &world.keys.individual, &world.keys.iap] {
        let line = key.pem.lines().nth(1).unwrap().to_string();
        forbidden.push(("private key".into(), line));
    }
    for (what, needle) in forbidden {
        assert!(!logs.contains(&needle), "{what} appears in the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_limit_gets_429_with_delta_seconds_and_nothing_reaches_apple() {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let text = std::fs::read_to_string(&world.config_path)
        .unwrap()
        .replace(
            "allow = [\"* /*\"]",
            "allow = [\"* /*\"]\nrate_limit = \"2/m\"",
        );
    std::fs::write(&world.config_path, text).unwrap();
    let h = Harness::from_world(world).await;
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    let limited = h.get("/v1/apps").await;
    assert_eq!(
        (limited.status, limited.error_code().as_str()),
        (StatusCode::TOO_MANY_REQUESTS, codes::RATE_LIMITED)
    );
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("delta-seconds");
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(h.standin().received().len(), 2);
    // Other clients are not affected.
    let reader = send(
        http::Request::get(h.url("/v1/apps"))
            .header("authorization", format!("Bearer {}", h.world.reader_secret))
            .body(empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reader.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_tls_with_client_certificates_identifies_mtls_clients_by_san() {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let server_ca = TestCa::new("proxy server CA");
    let client_ca = TestCa::new("client CA");
    let (server_cert, server_key) = server_ca.issue(&["localhost", "127.0.0.1"], "proxy", false);
    let dir = world.dir.path();
    std::fs::write(dir.join("server.pem"), &server_cert).unwrap();
    write_private(&dir.join("server-key.pem"), &server_key);
    std::fs::write(dir.join("clients-ca.pem"), client_ca.cert.pem()).unwrap();
    let text = std::fs::read_to_string(&world.config_path).unwrap().replace(
        "request_timeout = \"20s\"",
        "request_timeout = \"20s\"\ntls_cert_file = \"server.pem\"\ntls_key_file = \"server-key.pem\"\nclient_ca_file = \"clients-ca.pem\"",
    ) + "\n[[clients]]\nname = \"mtls-ci\"\ntls_subject = \"ci.internal\"\nallow = [\"GET /v1/*\"]\n";
    std::fs::write(&world.config_path, text).unwrap();
    let h = Harness::from_world(world).await;
    let url = format!("https://localhost:{}/v1/apps", h.addr.port());
    let get = |client: &hyper_util::client::legacy::Client<_, Full<Bytes>>,
               auth: Option<String>| {
        let mut b = http::Request::get(&url);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        client.request(b.body(empty()).unwrap())
    };

    // Certificate for ci.internal: identified as `mtls-ci`, over HTTP/2 (ALPN).
    let ci = tls_client(
        &server_ca,
        Some(&client_ca.issue(&["ci.internal"], "CI", true)),
    );
    let r = get(&ci, None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), http::Version::HTTP_2);
    // Its rules apply: GET /v1/* only.
    let denied = ci
        .request(
            http::Request::get(format!(
                "https://localhost:{}/inApps/v1/transactions/1",
                h.addr.port()
            ))
            .body(empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    // A valid certificate naming nobody configured, and no secret: 401.
    let stranger = tls_client(
        &server_ca,
        Some(&client_ca.issue(&["stranger.internal"], "ci.internal", true)),
    );
    assert_eq!(
        get(&stranger, None).await.unwrap().status(),
        StatusCode::UNAUTHORIZED,
        "CN is not used when the cert has DNS SANs"
    );
    // ...but the same connection with a client secret is that client.
    let with_secret = get(&stranger, Some(format!("Bearer {}", h.world.secret)))
        .await
        .unwrap();
    assert_eq!(with_secret.status(), StatusCode::OK);
    // No certificate, or one from another CA: the handshake fails (mTLS is required).
    assert!(get(&tls_client(&server_ca, None), None).await.is_err());
    let rogue = TestCa::new("rogue CA");
    assert!(get(
        &tls_client(&server_ca, Some(&rogue.issue(&["ci.internal"], "CI", true))),
        None
    )
    .await
    .is_err());
    assert_eq!(
        h.standin().received().len(),
        2,
        "only the two authorised requests reached Apple"
    );
    h.stop().await;
}

#[test]
fn the_reference_proxy_toml_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let config = apple_api_proxy::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.keys.is_empty());
    assert!(!config.clients.is_empty());
}

// ---------------------------------------------------------------------------------------
// The real binary.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_gib_response_streams_through_the_real_binary_with_flat_memory() {
    let port = free_port();
    let world = World::new(&Setup::default(), &format!("127.0.0.1:{port}")).await;
    let mut child = spawn_serve(&world.config_path);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child).await;
    let client = http1_client();
    let req = |n: u64| {
        http::Request::get(format!("http://{addr}/v1/salesReports?standin_bytes={n}"))
            .header("authorization", format!("Bearer {}", world.secret))
            .body(empty())
            .unwrap()
    };
    // Warm up (TLS session, pool, allocator), then take the baseline.
    let warm = client.request(req(1 << 20)).await.unwrap();
    assert_eq!(warm.status(), StatusCode::OK);
    warm.into_body().collect().await.unwrap();
    let (rss_before, _) = memory_kib(child.id());
    const GIB: u64 = 1 << 30;
    let started = std::time::Instant::now();
    let response = client.request(req(GIB)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut total = 0u64;
    let mut peak_rss = 0u64;
    let mut frames = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len() as u64;
        }
        frames += 1;
        if frames % 2048 == 0 {
            peak_rss = peak_rss.max(memory_kib(child.id()).0);
        }
    }
    let elapsed = started.elapsed();
    let (rss_after, hwm) = memory_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(total, GIB);
    println!(
        "1 GiB streamed in {:.2}s ({:.0} MiB/s); proxy RSS before {} KiB, peak sampled {} KiB, after {} KiB, high-water {} KiB",
        elapsed.as_secs_f64(),
        1024.0 / elapsed.as_secs_f64(),
        rss_before,
        peak_rss,
        rss_after,
        hwm
    );
    assert!(
        peak_rss.max(rss_after) < rss_before + 48 * 1024,
        "memory grew while streaming: {rss_before} → {peak_rss} KiB"
    );
    assert!(hwm < 160 * 1024, "high-water mark {hwm} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_good_config_and_prints_the_tables() {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let out = bin()
        .args(["check", "--config"])
        .arg(&world.config_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "KEYS",
        "ROUTES",
        "CLIENTS",
        "connect",
        "storekit",
        "app-store-server",
        "sandbox",
        "tester",
    ] {
        assert!(stdout.contains(want), "{want}: {stdout}");
    }
    assert_eq!(
        stdout.matches(" ok ").count(),
        6,
        "six keys test-signed: {stdout}"
    );
    // Apple Business/School Manager key ids are UUIDs: no hint that they should be 10
    // characters, and the column fits them.
    assert!(!stdout.contains("is not 10 upper-case"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{} ",
            apple_standin::fixture::Identity::TEST.business.key_id
        )),
        "{stdout}"
    );
    assert!(!stdout.contains(&world.keys.team.pem[30..60]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_with_a_message_naming_file_field_and_fix() {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let good = std::fs::read_to_string(&world.config_path).unwrap();
    let p384 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    write_private(
        &world.dir.path().join("keys/p384.p8"),
        &pem::encode(&pem::Pem::new("PRIVATE KEY", p384.as_ref().to_vec())),
    );
    let cases = [
        (
            "typo'd field",
            good.replace("request_timeout", "request_timout"),
            vec!["request_timout", "fix:"],
        ),
        (
            "missing key file",
            good.replace(
                &format!("keys/AuthKey_{TEAM_KID}.p8"),
                "keys/AuthKey_MISSING.p8",
            ),
            vec![
                "keys[0].private_key_file",
                "AuthKey_MISSING.p8",
                "not found",
                "fix:",
            ],
        ),
        (
            "non-P-256 key",
            good.replace(
                &format!("keys/SubscriptionKey_{IAP_KID}.p8"),
                "keys/p384.p8",
            ),
            vec!["keys[2].private_key_file", "P-384", "fix:"],
        ),
        (
            "bad duration",
            good.replace("connect_timeout = \"2s\"", "connect_timeout = \"soon\""),
            vec!["upstream.connect_timeout", "fix:"],
        ),
    ];
    for (name, text, wants) in cases {
        let path = world.dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = bin()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.contains("bad.toml"),
            "{name}: names the file: {stderr}"
        );
        for want in wants {
            assert!(stderr.contains(want), "{name}: wants {want:?}: {stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_prints_a_jwt_for_exactly_that_request() {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let out = bin()
        .args([
            "token",
            "--key",
            "connect",
            "--request",
            "GET /v1/apps?filter[platform]=IOS&limit=2",
            "--config",
        ])
        .arg(&world.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwt = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(verify_with_p256(&jwt, &world.keys.team.public));
    let (header, claims) = decode_jwt(&jwt);
    assert_eq!(header["kid"], TEAM_KID);
    assert_eq!(
        claims["scope"],
        serde_json::json!(["GET /v1/apps?filter[platform]=IOS"])
    );
    let out = bin()
        .args([
            "token",
            "--request",
            "GET /sandbox/inApps/v1/transactions/1",
            "--config",
        ])
        .arg(&world.config_path)
        .output()
        .unwrap();
    let (_, claims) = decode_jwt(String::from_utf8(out.stdout).unwrap().trim());
    assert_eq!(claims["bid"], BUNDLE);
    let out = bin()
        .args(["token", "--request", "GET /nowhere", "--config"])
        .arg(&world.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("known prefixes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_lists_every_rule_a_token_breaks_and_checks_it_against_the_config() {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    // A token the proxy itself made: breaks nothing; with --config its signature verifies.
    let out = bin()
        .args([
            "token",
            "--key",
            "connect",
            "--request",
            "GET /v1/apps",
            "--config",
        ])
        .arg(&world.config_path)
        .output()
        .unwrap();
    let good = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = bin().args(["explain", &good]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("app-store-connect") && stdout.contains("OK"),
        "{stdout}"
    );
    let out = bin()
        .args(["explain", "--config"])
        .arg(&world.config_path)
        .arg(&good)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("signature verifies with key `connect`"));

    // A hand-rolled token with the classic mistakes, read from stdin.
    use base64::Engine as _;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut der = vec![0x30u8, 0x44];
    der.extend([9u8; 68]);
    let bad = format!(
        "{}.{}.{}",
        b64(serde_json::json!({"alg": "ES256", "kid": TEAM_KID})),
        b64(
            serde_json::json!({"iss": ISSUER, "sub": "user", "iat": now + 120, "exp": now + 3600, "aud": "appstoreconnect-v1"})
        ),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&der)
    );
    let mut child = bin()
        .args(["explain", "--config"])
        .arg(&world.config_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(bad.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    for want in [
        "DER",
        "future",
        "20 min",
        "both iss and sub",
        "typ",
        "does not verify",
    ] {
        assert!(stdout.contains(want), "names {want:?}: {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_survives_sighup_rotation_and_verify_names_each_tampered_line() {
    let port = free_port();
    let world = World::new(&Setup::default(), &format!("127.0.0.1:{port}")).await;
    let mut child = spawn_serve(&world.config_path);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, &mut child).await;
    let dir = world.dir.path().to_path_buf();
    let log = dir.join("audit.jsonl");
    let get = |path: &'static str| {
        send(
            http::Request::get(format!("http://{addr}{path}"))
                .header("authorization", format!("Bearer {}", world.secret))
                .body(empty())
                .unwrap(),
        )
    };
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let wait_lines = |p: std::path::PathBuf, n: usize| async move {
        for _ in 0..200 {
            if lines(&p) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{} never reached {n} lines", p.display());
    };
    for path in ["/v1/apps", "/inApps/v1/transactions/1", "/nope"] {
        get(path).await;
    }
    wait_lines(log.clone(), 3).await;
    // logrotate: move the file, then SIGHUP.
    std::fs::rename(&log, dir.join("audit.jsonl.1")).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for path in ["/v1/apps", "/sandbox/inApps/v1/transactions/1"] {
        get(path).await;
    }
    wait_lines(log.clone(), 2).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());

    let verify = |files: &[std::path::PathBuf]| {
        let out = bin()
            .arg("audit")
            .arg("verify")
            .args(files)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let series = [dir.join("audit.jsonl.1"), log.clone()];
    let (code, out) = verify(&series);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("5 record(s) in 2 file(s)"), "{out}");
    let second_file: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let first_seq =
        serde_json::from_str::<serde_json::Value>(&second_file[0]).unwrap()["seq"].as_u64();
    assert_eq!(first_seq, Some(4), "the chain continued into the new file");

    // Tampering, each on a copy of the first file: the right line is named.
    let original: Vec<String> = std::fs::read_to_string(&series[0])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "edited",
            {
                let mut l = original.clone();
                l[1] = l[1].replace("\"status\":200", "\"status\":201");
                l
            },
            "line 2",
        ),
        (
            "deleted",
            {
                let mut l = original.clone();
                l.remove(1);
                l
            },
            "line 2",
        ),
        (
            "reordered",
            {
                let mut l = original.clone();
                l.swap(1, 2);
                l
            },
            "line 2",
        ),
        (
            "inserted",
            {
                let mut l = original.clone();
                l.insert(1, original[0].clone());
                l
            },
            "line 2",
        ),
    ];
    for (what, tampered, want) in cases {
        let copy = dir.join(format!("tampered-{what}.jsonl"));
        std::fs::write(&copy, tampered.join("\n") + "\n").unwrap();
        let (code, out) = verify(&[copy]);
        assert_eq!(code, Some(1), "{what}: {out}");
        assert!(out.contains(want), "{what}: wants {want}: {out}");
    }
    let truncated = dir.join("tampered-truncated.jsonl");
    let text = std::fs::read_to_string(&series[0]).unwrap();
    std::fs::write(&truncated, &text[..text.len() - 10]).unwrap();
    let (code, out) = verify(&[truncated]);
    assert_eq!(code, Some(1));
    assert!(out.contains("line 3") && out.contains("truncated"), "{out}");
    // A later file given alone, or the series out of order, is not a silent pass.
    let (code, out) = verify(&[series[1].clone(), series[0].clone()]);
    assert_eq!(code, Some(1), "{out}");
}

#[test]
fn client_secret_prints_a_secret_and_its_config_hash() {
    let out = bin().args(["client-secret", "ci"]).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let secret = stdout
        .lines()
        .find(|l| l.starts_with("aap_"))
        .expect("a secret line");
    let hash_line = stdout
        .lines()
        .find(|l| l.starts_with("secret_sha256"))
        .expect("a hash line");
    assert_eq!(
        hash_line,
        format!("secret_sha256 = \"{}\"", sha_hex(secret))
    );
    assert!(stdout.contains("name = \"ci\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_curl_lines_that_work_as_pasted_and_stops_on_ctrl_c() {
    use tokio::io::AsyncBufReadExt as _;
    let port = free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_apple-api-proxy"))
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut curls = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("demo prints")
    {
        if line.starts_with("curl ") {
            curls.push(line);
        } else if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    assert!(curls.len() >= 5, "{curls:?}");
    let have_curl = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok();
    let mut signed = false;
    let mut pushed = false;
    for line in &curls {
        let body = if have_curl {
            let out = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(line)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "{line}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        } else {
            eprintln!("curl is not installed: checking the line's shape only");
            continue;
        };
        if line.contains("/apns/") {
            assert!(
                body.starts_with("HTTP/1.1 200") && body.contains("apns-id"),
                "{body}"
            );
            pushed = true;
            continue;
        }
        if line.contains("-D -") {
            assert!(
                body.contains("x-request-id") && body.contains("x-rate-limit"),
                "{body}"
            );
            continue;
        }
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{line}: not JSON ({e}): {body}"));
        if line.contains("/proxy/v1/signatures/") {
            let jws = json["signature"]
                .as_str()
                .unwrap_or_else(|| panic!("{body}"));
            let (_, claims) = decode_jwt(jws);
            assert_eq!(claims["aud"], "promotional-offer", "{claims}");
            assert_eq!(claims["productId"], "com.example.demo.pro.monthly");
            signed = true;
            continue;
        }
        assert!(
            json.get("data").is_some()
                || json.get("currentWeather").is_some()
                // Sign in with Apple's token answer.
                || json.get("access_token").is_some()
                || json["errors"][0]["code"].is_string(),
            "Apple-shaped JSON: {body}"
        );
    }
    assert!(signed || !have_curl, "the demo signs a promotional offer");
    assert!(pushed || !have_curl, "the demo sends a push");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("demo stops")
        .unwrap();
    assert!(status.success(), "{status}");
}
