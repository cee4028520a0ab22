//! DESIGN §18's developer-key rows (APNs, DeviceCheck, App Attest, WeatherKit, Apple
//! Music) through the real binary against the stand-in, whose roles check each API's token
//! rules with their own verifier: mounts and paths, token shapes, one APNs token for
//! hundreds of pushes and across a reload, HTTP/2 only to APNs, header pass-through, every
//! APNs reason diagnosed (or passed through), the proxy's own errors with `reason`, audit.

use std::collections::HashSet;
use std::sync::Arc;

use apple_standin::fixture::{self, Identity};
use apple_standin::{Faults, Role};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::Value;

use crate::second_round::{binary_audit, Binary};
use crate::support::*;

const DEV_KID: &str = Identity::TEST.developer.key_id;
const TEAM: &str = Identity::TEST.team_id;
const SERVICE: &str = Identity::TEST.service_id;
const DEVICE: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

/// method, path, role reached, path forwarded, header names, claim names.
type Row = (
    &'static str,
    &'static str,
    Role,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);

fn payload() -> Bytes {
    // About 1 KiB, as a rich push is.
    let alert = "x".repeat(960);
    Bytes::from(format!(r#"{{"aps":{{"alert":"{alert}"}}}}"#))
}

fn push(b: &Binary, path: &str) -> http::Request<Full<Bytes>> {
    b.request("POST", path)
        .header("apns-topic", "com.example.app")
        .header("apns-push-type", "alert")
        .header("apns-priority", "10")
        .header("apns-expiration", "0")
        .header("apns-collapse-id", "greeting")
        .header("apns-id", "8e5ab3c1-0000-4000-8000-0000000000a1")
        .body(Full::new(payload()))
        .unwrap()
}

/// A client that pushes on APNs' own path to the development environment.
fn dev_pusher() -> (String, String) {
    let secret = fixture::generate_secret().unwrap();
    let toml = format!(
        "\n[[clients]]\nname = \"dev-pusher\"\nsecret_sha256 = \"{}\"\nallow = [\"POST /3/device/*\"]\napns_environment = \"development\"\n",
        sha_hex(&secret)
    );
    (secret, toml)
}

fn claims_of(r: &apple_standin::Received) -> (Value, Value) {
    let token = r.verdict.as_ref().expect("the stand-in accepted the token");
    (token.header.clone(), token.claims.clone())
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    n.sort();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_developer_api_is_mounted_and_gets_the_token_its_api_requires() {
    let (dev_secret, dev_toml) = dev_pusher();
    let b = Binary::start(Setup::default(), move |t| t + &dev_toml).await;
    let s = &b.world.standin;

    // APNs through its mount, its sandbox mount and its own path, over HTTP/1.1 from the
    // client and HTTP/2 to Apple.
    for (path, role) in [
        (format!("/apns/3/device/{DEVICE}"), Role::Apns),
        (
            format!("/sandbox/apns/3/device/{DEVICE}"),
            Role::ApnsDevelopment,
        ),
        (format!("/3/device/{DEVICE}"), Role::Apns),
    ] {
        s.clear_received();
        let r = send_with(http1_client(), push(&b, &path)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
        assert_eq!(
            r.headers["apns-id"], "8e5ab3c1-0000-4000-8000-0000000000a1",
            "apns-id comes back"
        );
        let got = s.received();
        assert_eq!((got.len(), got[0].role), (1, role), "{path}");
        assert_eq!(
            got[0].path_and_query,
            format!("/3/device/{DEVICE}"),
            "mount removed"
        );
        assert_eq!(
            got[0].version,
            http::Version::HTTP_2,
            "APNs is spoken to in HTTP/2"
        );
        assert_eq!(got[0].body_len, payload().len() as u64);
        for h in [
            "apns-topic",
            "apns-push-type",
            "apns-priority",
            "apns-expiration",
            "apns-collapse-id",
            "apns-id",
        ] {
            assert!(got[0].headers.contains_key(h), "{h} passed through");
        }
        let (header, claims) = claims_of(&got[0]);
        assert_eq!(names(&header), ["alg", "kid"]);
        assert_eq!(names(&claims), ["iat", "iss"], "no exp, no aud");
        assert_eq!(
            (header["kid"].as_str(), claims["iss"].as_str()),
            (Some(DEV_KID), Some(TEAM))
        );
        assert!(got[0].headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Bearer "));
    }
    // A client configured for development pushes there on APNs' own path.
    s.clear_received();
    let r = send(
        http::Request::post(format!("http://{}/3/device/{DEVICE}", b.addr))
            .header("authorization", format!("Bearer {dev_secret}"))
            .header("apns-topic", "com.example.app")
            .body(Full::new(payload()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(s.received()[0].role, Role::ApnsDevelopment);

    // DeviceCheck (Bearer), App Attest (the bare JWT), WeatherKit (id header, sub), Music.
    let cases: [Row; 6] = [
        (
            "POST",
            "/devicecheck/v1/query_two_bits",
            Role::DeviceCheck,
            "/v1/query_two_bits",
            &["alg", "kid"],
            &["iat", "iss"],
        ),
        (
            "POST",
            "/sandbox/devicecheck/v1/validate_device_token",
            Role::DeviceCheckDevelopment,
            "/v1/validate_device_token",
            &["alg", "kid"],
            &["iat", "iss"],
        ),
        (
            "POST",
            "/appattest/v1/attestationData",
            Role::AppAttest,
            "/v1/attestationData",
            &["alg", "kid"],
            &["iat", "iss"],
        ),
        (
            "POST",
            "/sandbox/appattest/v1/attestationData",
            Role::AppAttestDevelopment,
            "/v1/attestationData",
            &["alg", "kid"],
            &["iat", "iss"],
        ),
        (
            "GET",
            "/weatherkit/api/v1/weather/en/51.5/-0.12?dataSets=currentWeather",
            Role::WeatherKit,
            "/api/v1/weather/en/51.5/-0.12?dataSets=currentWeather",
            &["alg", "id", "kid"],
            &["exp", "iat", "iss", "sub"],
        ),
        (
            "GET",
            "/music/v1/catalog/us/songs/203709340",
            Role::AppleMusic,
            "/v1/catalog/us/songs/203709340",
            &["alg", "kid"],
            &["exp", "iat", "iss"],
        ),
    ];
    for (method, path, role, upstream, header_names, claim_names) in cases {
        s.clear_received();
        let body = if method == "POST" {
            r#"{"device_token":"x","transaction_id":"t","timestamp":1}"#
        } else {
            ""
        };
        let r = send(
            b.request(method, path)
                .body(Full::new(Bytes::from(body)))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
        let got = s.received();
        assert_eq!(
            (got[0].role, got[0].path_and_query.as_str()),
            (role, upstream),
            "{path}"
        );
        let (header, claims) = claims_of(&got[0]);
        assert_eq!(names(&header), header_names, "{path}");
        assert_eq!(names(&claims), claim_names, "{path}");
        let authorization = got[0].headers["authorization"].to_str().unwrap();
        let app_attest = matches!(role, Role::AppAttest | Role::AppAttestDevelopment);
        assert_eq!(
            authorization.starts_with("Bearer "),
            !app_attest,
            "{path}: {authorization:.12}"
        );
        if role == Role::WeatherKit {
            assert_eq!(header["id"], format!("{TEAM}.{SERVICE}"));
            assert_eq!(claims["sub"], SERVICE);
            let life = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
            assert!(
                life <= 3600,
                "WeatherKit tokens live at most an hour: {life}"
            );
        }
    }
    // The end user's Music-User-Token passes through untouched; it is never the proxy's.
    s.clear_received();
    let user_token = "music-user-token-of-the-end-user-0123456789";
    let r = send(
        b.request("GET", "/music/v1/me/library/songs")
            .header("music-user-token", user_token)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(s.received()[0].headers["music-user-token"], user_token);

    // No development host for WeatherKit and Music; unknown mounts list the new prefixes.
    let r = send(
        b.request("GET", "/sandbox/weatherkit/api/v1/availability/1/2")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    let r = send(
        b.request("GET", "/maps2/v1/x")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.error_code(), "PROXY_NO_ROUTE");
    let detail = String::from_utf8_lossy(&r.body);
    for prefix in [
        "/apns/",
        "/3/device/",
        "/devicecheck/",
        "/appattest/",
        "/weatherkit/",
        "/music/",
    ] {
        assert!(detail.contains(prefix), "{prefix} in {detail}");
    }

    // The audit names the API, the key and the token's fingerprint, never the token.
    let records = binary_audit(&b, 1).await;
    let pushes: Vec<&Value> = records.iter().filter(|r| r["api"] == "apns").collect();
    assert!(pushes.len() >= 4, "{records:?}");
    let push = pushes[0];
    assert_eq!(
        (push["key"].as_str(), push["key_id"].as_str()),
        (Some("push"), Some(DEV_KID))
    );
    assert_eq!(push["decision"], "forwarded");
    let audit = std::fs::read_to_string(b.world.dir.path().join("audit.jsonl")).unwrap();
    assert!(!audit.contains("eyJ"), "no JWT in the audit log");
    assert!(
        !audit.contains(user_token),
        "no Music-User-Token in the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_pushes_share_one_provider_token_and_a_reload_keeps_it() {
    let b = Arc::new(Binary::start(Setup::default(), |t| t).await);
    // Concurrent first pushes: one signature among them.
    let h2 = http2_client();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let (b, client) = (b.clone(), h2.clone());
        tasks.push(tokio::spawn(async move {
            let path = format!("/apns/3/device/{:064x}", i + 1);
            send_with(client, push(&b, &path)).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    assert_eq!(
        b.world.standin.distinct_tokens(DEV_KID),
        1,
        "300 pushes, one token"
    );
    let tokens = |b: &Binary| -> HashSet<Vec<u8>> {
        b.world
            .standin
            .received()
            .iter()
            .filter(|r| r.role == Role::Apns)
            .map(|r| r.headers["authorization"].as_bytes().to_vec())
            .collect()
    };
    assert_eq!(tokens(&b).len(), 1);
    let connections: HashSet<u64> = b
        .world
        .standin
        .received()
        .iter()
        .map(|r| r.connection)
        .collect();
    assert_eq!(
        connections.len(),
        1,
        "one connection to APNs for every device"
    );
    // `explain --config` judges the provider token by APNs' rules and knows its key.
    let token = tokens(&b).into_iter().next().unwrap();
    let token = String::from_utf8(token).unwrap();
    let out = bin()
        .args(["explain", "--config"])
        .arg(&b.world.config_path)
        .arg(&token)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("provider token") && said.contains("signature verifies with key `push`"),
        "{said}"
    );

    // A reload (any change to the file) builds a new runtime: the token stays.
    let path = b.world.config_path.clone();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("[audit]", "# reloaded\n[audit]")).unwrap();
    let applied = eventually(|| async {
        b.metrics()
            .await
            .contains("aap_config_reloads_total{result=\"applied\"} 1")
    })
    .await;
    assert!(applied, "the reload was applied");
    for i in 0..20 {
        let r = send(push(&b, &format!("/apns/3/device/{:064x}", 1000 + i))).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    assert_eq!(
        b.world.standin.distinct_tokens(DEV_KID),
        1,
        "the same token after a reload"
    );
    assert_eq!(tokens(&b).len(), 1);
}

/// `apple-api-proxy check --config PATH`.
fn check(config: &std::path::Path) -> std::process::Output {
    bin()
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_asking_apns_for_less_than_twenty_minutes_is_refused_naming_the_field() {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let good = std::fs::read_to_string(&world.config_path).unwrap();
    for (edit, want) in [
        (
            "apns_token_refresh = \"10m\"\n",
            vec![
                "keys[3].apns_token_refresh",
                "10m",
                "TooManyProviderTokenUpdates",
            ],
        ),
        (
            "apns_token_refresh = \"56m\"\n",
            vec!["keys[3].apns_token_refresh", "56m", "ExpiredProviderToken"],
        ),
    ] {
        let text = good.replacen("team_id = ", &format!("{edit}team_id = "), 1);
        std::fs::write(&world.config_path, text).unwrap();
        let out = check(&world.config_path);
        assert_eq!(out.status.code(), Some(1));
        let said = String::from_utf8_lossy(&out.stderr);
        for w in want {
            assert!(said.contains(w), "{w} missing from {said}");
        }
    }
    // WeatherKit without a service id, and a team id on another kind of key.
    let no_service = good.replacen(&format!("service_id = \"{SERVICE}\"\n"), "", 1);
    std::fs::write(&world.config_path, no_service).unwrap();
    let out = check(&world.config_path);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("keys[3].service_id") && said.contains("weatherkit"),
        "{said}"
    );
    // 20m and 55m are the bounds, and the check prints when each token is renewed.
    let text = good.replacen("team_id = ", "apns_token_refresh = \"20m\"\nteam_id = ", 1);
    std::fs::write(&world.config_path, text).unwrap();
    let out = check(&world.config_path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("apns every 20m") && stdout.contains("weatherkit every 59m"),
        "{stdout}"
    );
}

/// An HTTPS server that speaks only HTTP/1.1 (ALPN `http/1.1`), counting the requests it
/// answered; its CA goes into the proxy's `ca_file`.
async fn http1_only_upstream(
    ca: &TestCa,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use hyper_util::rt::TokioIo;
    let acceptor = tls_acceptor(ca, "h1-only", &[b"http/1.1"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from("h1"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_is_never_spoken_to_in_http1() {
    let ca = TestCa::new("h1 upstream CA");
    let (addr, served) = http1_only_upstream(&ca).await;
    let ca_pem = ca.cert.pem();
    let b = Binary::start_with(
        Setup::default(),
        move |t| {
            t.replacen(
                "[apis.apns]\nbase_url = ",
                &format!("[apis.apns]\nbase_url = \"https://{addr}\"\n# was "),
                1,
            )
        },
        move |dir| {
            let ca_file = dir.join("standin-ca.pem");
            let mut pem = std::fs::read_to_string(&ca_file).unwrap();
            pem.push_str(&ca_pem);
            std::fs::write(&ca_file, pem).unwrap();
        },
    )
    .await;
    let r = send(push(&b, &format!("/apns/3/device/{DEVICE}"))).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    assert_eq!(r.error_code(), "PROXY_UPSTREAM_UNAVAILABLE");
    assert_eq!(
        served.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no HTTP/1.1 request was made"
    );
    // The same upstream serves other APIs' HTTP/1.1 fine: the refusal is APNs' rule.
    assert_eq!(
        r.json()["reason"],
        "PROXY_UPSTREAM_UNAVAILABLE",
        "APNs clients read reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_apns_reason_is_diagnosed_and_the_apps_own_errors_pass_through() {
    let b = Binary::start(Setup::default(), |t| t).await;
    let path = format!("/apns/3/device/{DEVICE}");
    // Before any push worked (so a refused token is not yet "revoked").
    let cases: [(u16, &str, Option<&str>); 8] = [
        (
            403,
            "InvalidProviderToken",
            Some("APNS_INVALID_PROVIDER_TOKEN"),
        ),
        (
            403,
            "ExpiredProviderToken",
            Some("APNS_EXPIRED_PROVIDER_TOKEN"),
        ),
        (
            403,
            "MissingProviderToken",
            Some("APNS_MISSING_PROVIDER_TOKEN"),
        ),
        (403, "UnrelatedKeyIdInToken", Some("APNS_UNRELATED_KEY")),
        (
            429,
            "TooManyProviderTokenUpdates",
            Some("APNS_TOO_MANY_TOKEN_UPDATES"),
        ),
        (410, "Unregistered", None),
        (400, "BadDeviceToken", None),
        (429, "TooManyRequests", None),
    ];
    let mut previous: Option<(u64, &str)> = None;
    for (status, reason, diagnosis) in cases {
        b.world.standin.set_faults(Faults {
            apns_reason: Some((status, reason.to_string())),
            ..Faults::default()
        });
        let r = send(push(&b, &path)).await;
        assert_eq!(r.status.as_u16(), status, "{reason}");
        // One connection for every push of the key; a new one after UnrelatedKeyIdInToken.
        let connection = b.world.standin.received().last().unwrap().connection;
        if let Some((before, why)) = previous {
            if why == "UnrelatedKeyIdInToken" {
                assert_ne!(connection, before, "a new connection after {why}");
            } else {
                assert_eq!(connection, before, "the connection is reused after {why}");
            }
        }
        previous = Some((connection, reason));
        let body = r.json();
        assert_eq!(
            body["reason"], reason,
            "APNs' reason reaches the client unchanged"
        );
        match diagnosis {
            Some(code) => {
                assert_eq!(r.headers["x-proxy-diagnosis"], code, "{reason}: {body}");
                let causes = body["diagnostics"]["likely_causes"].as_array().unwrap();
                assert!(
                    !causes.is_empty() && causes[0]["fix"].as_str().is_some_and(|f| !f.is_empty()),
                    "{body}"
                );
                assert_eq!(body["diagnostics"]["key"]["key_id"], DEV_KID);
            }
            None => {
                assert!(
                    !r.headers.contains_key("x-proxy-diagnosis"),
                    "{reason} is the app's business"
                );
                assert!(body.get("diagnostics").is_none(), "{body}");
            }
        }
    }
    b.world.standin.set_faults(Faults::default());
    assert_eq!(send(push(&b, &path)).await.status, StatusCode::OK);
    // Once the key has worked, a refused token reads as a revoked key first.
    b.world.standin.set_faults(Faults {
        apns_reason: Some((403, "InvalidProviderToken".into())),
        ..Faults::default()
    });
    let r = send(push(&b, &path)).await;
    assert_eq!(
        r.headers["x-proxy-diagnosis"],
        "KEY_REVOKED",
        "{}",
        r.json()
    );
    let records = binary_audit(&b, 10).await;
    let diagnosed: Vec<&str> = records
        .iter()
        .filter_map(|r| r["diagnosis"].as_str())
        .collect();
    for code in [
        "APNS_INVALID_PROVIDER_TOKEN",
        "APNS_TOO_MANY_TOKEN_UPDATES",
        "KEY_REVOKED",
    ] {
        assert!(diagnosed.contains(&code), "{code} audited: {diagnosed:?}");
    }
    let metrics = b.metrics().await;
    assert!(metrics.contains(r#"aap_apple_auth_failures_total{api="apns",status="403",cause="APNS_INVALID_PROVIDER_TOKEN"} 1"#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_errors_on_apns_routes_carry_apns_reason() {
    let b = Binary::start(Setup::default(), |t| t).await;
    let cases = [
        (format!("/3/device/{DEVICE}"), None, 401),
        (format!("/apns/3/device/{DEVICE}"), None, 401),
        (
            format!("/sandbox/apns/3/device/{DEVICE}"),
            Some(b.world.reader_secret.clone()),
            403,
        ),
    ];
    for (path, secret, status) in cases {
        let mut req = http::Request::post(format!("http://{}{path}", b.addr))
            .header("apns-topic", "com.example.app");
        if let Some(secret) = secret {
            req = req.header("authorization", format!("Bearer {secret}"));
        }
        let r = send(req.body(Full::new(payload())).unwrap()).await;
        assert_eq!(r.status.as_u16(), status, "{path}");
        let body = r.json();
        assert_eq!(body["reason"], body["errors"][0]["code"], "{path}: {body}");
        assert!(body["reason"].as_str().unwrap().starts_with("PROXY_"));
    }
    // Elsewhere the proxy's errors keep Apple's shape only.
    let r = send(
        http::Request::get(format!("http://{}/v1/apps", b.addr))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.json().get("reason").is_none());
    assert!(
        b.world.standin.received().is_empty(),
        "nothing reached Apple"
    );
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

async fn send_https(client: HttpsClient, req: http::Request<Full<Bytes>>) -> Reply {
    use http_body_util::BodyExt as _;
    let response = client.request(req).await.expect("request succeeds");
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

/// A client straight to the stand-in (trusting its CA), speaking only HTTP/2 or only
/// HTTP/1.1.
fn standin_client(ca_pem: &str, http2: bool) -> HttpsClient {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if http2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

/// An APNs provider token signed here (RustCrypto), not by the proxy.
fn provider_token(pem: &str, iat: i64) -> String {
    use base64::Engine as _;
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::DecodePrivateKey as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let input = format!(
        "{}.{}",
        b64(&serde_json::json!({"alg": "ES256", "kid": DEV_KID})),
        b64(&serde_json::json!({"iss": TEAM, "iat": iat}))
    );
    let key = p256::ecdsa::SigningKey::from_pkcs8_pem(pem).unwrap();
    let signature: p256::ecdsa::Signature = key.sign(input.as_bytes());
    format!(
        "{input}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature.to_bytes())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stand_ins_apns_enforces_apples_rules_per_connection() {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let url = format!("{}/3/device/{DEVICE}", world.standin.url(Role::Apns));
    let pem = &world.keys.developer.pem;
    let now = apple_api_proxy::token::unix_secs(std::time::SystemTime::now());
    let send_push = |client: &HttpsClient, token: String| {
        let request = http::Request::post(&url)
            .header("authorization", format!("bearer {token}"))
            .header("apns-topic", "com.example.app")
            .body(Full::new(payload()))
            .unwrap();
        send_https(client.clone(), request)
    };
    let client = standin_client(world.standin.ca_pem(), true);
    let first = send_push(&client, provider_token(pem, now - 5)).await;
    assert_eq!(first.status, StatusCode::OK);
    // Another token on the same connection within 20 minutes: 429.
    let second = send_push(&client, provider_token(pem, now - 4)).await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.json()["reason"], "TooManyProviderTokenUpdates");
    // The first token keeps working there; a new connection takes the second.
    assert_eq!(
        send_push(&client, provider_token(pem, now - 5))
            .await
            .status,
        StatusCode::OK
    );
    let other = standin_client(world.standin.ca_pem(), true);
    assert_eq!(
        send_push(&other, provider_token(pem, now - 4)).await.status,
        StatusCode::OK
    );
    // An hour old: expired. No token: missing. A token with exp: not APNs' shape.
    let fresh = standin_client(world.standin.ca_pem(), true);
    let old = send_push(&fresh, provider_token(pem, now - 3700)).await;
    assert_eq!(
        (old.status, old.json()["reason"].clone()),
        (StatusCode::FORBIDDEN, Value::from("ExpiredProviderToken"))
    );
    let none = send_https(
        fresh.clone(),
        http::Request::post(&url)
            .header("apns-topic", "t")
            .body(Full::new(payload()))
            .unwrap(),
    )
    .await;
    assert_eq!(none.json()["reason"], "MissingProviderToken");
    // HTTP/1.1 is refused at the TLS handshake (ALPN h2 only).
    let h1 = standin_client(world.standin.ca_pem(), false);
    let request = http::Request::post(&url)
        .body(Full::new(payload()))
        .unwrap();
    assert!(
        h1.request(request).await.is_err(),
        "the APNs role must not speak HTTP/1.1"
    );
}
