//! DESIGN §18's exchange rows (Maps, Apple Business Manager, Apple School Manager) and Sign
//! in with Apple through the real binary against the stand-in, whose token endpoints and
//! APIs check assertions, access tokens and `client_secret`s with their own verifier:
//! one exchange for many concurrent requests, renewal before expiry and after Apple revokes
//! the access token, failures as 502 with Apple's OAuth error, the backoff, form injection
//! keeping every other field, refusals, audit and metrics, and no credential anywhere a
//! client or an operator reads.

use apple_standin::fixture::Identity;
use apple_standin::{Role, TokenEndpoint};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::Value;

use crate::second_round::{binary_audit, Binary};
use crate::support::*;

fn get(b: &Binary, path: &str) -> http::Request<Full<Bytes>> {
    b.request("GET", path)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn form(b: &Binary, path: &str, body: &str) -> http::Request<Full<Bytes>> {
    b.request("POST", path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn decoded(segment: &str) -> Value {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    n.sort();
    n
}

fn bearer(r: &apple_standin::Received) -> String {
    r.headers["authorization"]
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_string()
}

/// The access tokens the API roles were sent, in order.
fn access_tokens(b: &Binary, role: Role) -> Vec<String> {
    b.world
        .standin
        .received()
        .iter()
        .filter(|r| r.role == role && r.path_and_query != "/v1/token")
        .map(bearer)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_and_the_managers_get_one_exchange_for_many_concurrent_requests_and_clients_never_see_a_token(
) {
    let b = Binary::start(
        Setup {
            rust_log: Some("info"),
            ..Setup::default()
        },
        |t| t,
    )
    .await;
    let s = &b.world.standin;
    for (path, role) in [
        ("/maps/v1/geocode?q=Cupertino", Role::Maps),
        ("/business/v1/orgDevices", Role::AppleBusiness),
        ("/school/v1/orgDevices", Role::AppleSchool),
    ] {
        let replies = futures_join(&b, path, 20).await;
        for r in &replies {
            assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
        }
        assert_eq!(s.exchanges(role), 1, "{path}: one exchange for 20 requests");
        let tokens = access_tokens(&b, role);
        assert_eq!(tokens.len(), 20);
        assert!(tokens.iter().all(|t| *t == tokens[0]), "one access token");
        for r in &replies {
            let seen = format!("{:?}{}", r.headers, String::from_utf8_lossy(&r.body));
            assert!(!seen.contains(&tokens[0]), "no access token to the client");
        }
    }
    // What went to the token endpoints: Maps' auth token, the managers' client assertion.
    let got = s.received();
    let maps_exchange = got
        .iter()
        .find(|r| r.role == Role::Maps && r.path_and_query == "/v1/token")
        .expect("the Maps exchange");
    let jwt = bearer(maps_exchange);
    let parts: Vec<&str> = jwt.split('.').collect();
    let (header, claims) = (decoded(parts[0]), decoded(parts[1]));
    assert_eq!(names(&header), ["alg", "kid", "typ"]);
    assert_eq!(names(&claims), ["exp", "iat", "iss"]);
    assert_eq!(claims["iss"], Identity::TEST.team_id);
    assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 600);

    let records = binary_audit(&b, 60).await;
    let maps: Vec<&Value> = records.iter().filter(|r| r["api"] == "maps").collect();
    assert_eq!(maps.len(), 20);
    let access = access_tokens(&b, Role::Maps)[0].clone();
    assert_eq!(
        maps[0]["token_sha256"],
        sha_hex(&access),
        "token_sha256 fingerprints the access token Apple saw"
    );
    assert_eq!(maps[0]["key"], Identity::TEST.developer.name);
    let business = records
        .iter()
        .find(|r| r["api"] == "apple-business")
        .unwrap();
    assert_eq!(business["key"], Identity::TEST.business.name);
    assert_eq!(business["key_id"], Identity::TEST.business.key_id);
    // No access token or assertion in the audit log or the operational log.
    let audit = records.iter().map(Value::to_string).collect::<String>();
    let log = std::fs::read_to_string(b.world.dir.path().join("stderr.log")).unwrap();
    for role in [Role::Maps, Role::AppleBusiness, Role::AppleSchool] {
        let t = &access_tokens(&b, role)[0];
        assert!(!audit.contains(t.as_str()) && !log.contains(t.as_str()));
    }
    assert!(!audit.contains(&jwt) && !log.contains(parts[2]));
    let metrics = b.metrics().await;
    for api in ["maps", "apple-business", "apple-school"] {
        assert!(
            metrics.contains(&format!(
                "aap_token_exchanges_total{{api=\"{api}\",outcome=\"ok\"}} 1"
            )),
            "{api}: {metrics}"
        );
        assert!(metrics.contains(&format!("aap_access_token_age_seconds{{api=\"{api}\"")));
    }

    // The one path a client may not call: Maps' own token endpoint, however spelled.
    s.clear_received();
    for path in [
        "/maps/v1/token",
        "/maps/v1/%74oken",
        "/maps/V1/Token",
        "/maps/v1/token/",
    ] {
        let r = send(get(&b, path)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {:?}", r.body);
        assert!(r.json()["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("exchanges Maps tokens itself"));
    }
    assert!(s.received().is_empty(), "the refusals reached nothing");
}

/// `n` concurrent GETs of `path`.
async fn futures_join(b: &Binary, path: &str, n: usize) -> Vec<Reply> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let req = get(b, path);
        tasks.push(tokio::spawn(send(req)));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_is_renewed_before_it_expires_and_after_apple_revokes_it() {
    let b = Binary::start(Setup::default(), |t| t).await;
    let s = &b.world.standin;
    s.set_token_endpoint(TokenEndpoint {
        lifetime_secs: Some(3),
        ..TokenEndpoint::default()
    });
    let path = "/business/v1/mdmServers";
    assert_eq!(send(get(&b, path)).await.status, StatusCode::OK);
    assert_eq!(send(get(&b, path)).await.status, StatusCode::OK);
    assert_eq!(s.exchanges(Role::AppleBusiness), 1, "reused while fresh");
    // A 3 s token is renewed when less than 1 s of it is left, before Apple refuses it.
    tokio::time::sleep(std::time::Duration::from_millis(2300)).await;
    assert_eq!(send(get(&b, path)).await.status, StatusCode::OK);
    assert_eq!(s.exchanges(Role::AppleBusiness), 2, "renewed before expiry");
    let tokens = access_tokens(&b, Role::AppleBusiness);
    assert_ne!(tokens[1], tokens[2]);

    // Apple revokes it. A 401 to a token this new (under half its life, at most 10 s) is
    // taken to be about the request: Apple's answer goes back, no new exchange — so a path
    // Apple refuses cannot make every request cost one.
    s.set_token_endpoint(TokenEndpoint::default());
    s.revoke_access_tokens();
    let r = send(get(&b, path)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.body);
    assert_eq!(r.headers["x-proxy-diagnosis"], "ACCESS_TOKEN_REFUSED");
    assert_eq!(s.exchanges(Role::AppleBusiness), 2);
    // Older than that: the API's 401 drops it, and the replayable GET is retried once with
    // a new one.
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let r = send(get(&b, path)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(s.exchanges(Role::AppleBusiness), 3);
    let records = binary_audit(&b, 5).await;
    assert_eq!(records[4]["retried"], true, "{}", records[4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_exchange_is_a_502_with_apples_error_and_waits_out_its_backoff() {
    let b = Binary::start(Setup::default(), |t| t).await;
    let s = &b.world.standin;
    s.set_token_endpoint(TokenEndpoint {
        refuse: Some((400, "invalid_client".into())),
        ..TokenEndpoint::default()
    });
    let path = "/business/v1/orgDevices";
    let r = send(get(&b, path)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{:?}", r.body);
    let e = &r.json()["errors"][0];
    assert_eq!(e["code"], "PROXY_TOKEN_EXCHANGE_FAILED");
    let detail = e["detail"].as_str().unwrap();
    assert!(
        detail.contains("`invalid_client`") && detail.contains("BUSINESSAPI."),
        "{detail}"
    );
    assert_eq!(r.headers["x-proxy-diagnosis"], "EXCHANGE_INVALID_CLIENT");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(s.exchange_attempts(), 1, "a refusal is not retried at once");
    // Within the backoff: the same answer, without asking Apple.
    let r = send(get(&b, path)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(s.exchange_attempts(), 1);
    assert!(
        access_tokens(&b, Role::AppleBusiness).is_empty(),
        "nothing reached the API"
    );
    // Apple recovers; after the backoff the next request exchanges and goes through.
    s.set_token_endpoint(TokenEndpoint::default());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(send(get(&b, path)).await.status, StatusCode::OK);

    // A transient failure (503) is retried at once, within the same request.
    s.set_token_endpoint(TokenEndpoint {
        unavailable: 1,
        ..TokenEndpoint::default()
    });
    let before = s.exchange_attempts();
    let r = send(get(&b, "/school/v1/orgDevices")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(s.exchange_attempts(), before + 2);
    let records = binary_audit(&b, 4).await;
    assert_eq!(records[0]["error"], "token_exchange_failed");
    assert_eq!(records[0]["decision"], "error");
    let metrics = b.metrics().await;
    assert!(
        metrics.contains(r#"aap_token_exchanges_total{api="apple-business",outcome="refused"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"aap_token_exchanges_total{api="apple-school",outcome="refused"} 1"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_with_apple_forms_get_the_proxys_client_secret_and_keep_every_other_field() {
    let b = Binary::start(
        Setup {
            rust_log: Some("info"),
            ..Setup::default()
        },
        // A second client id the key signs for but Apple does not know: invalid_client.
        |t| {
            t.replace(
                "client_ids = [\"com.example.web\"]",
                "client_ids = [\"com.example.web\", \"com.example.retired\"]",
            )
        },
    )
    .await;
    let s = &b.world.standin;
    let sent = "grant_type=authorization_code&code=c0de%2Fwith+space&client_secret=leaked.client.secret&client_id=com.example.web&redirect_uri=https%3A%2F%2Fexample.com%2Fcb";
    let r = send(form(&b, "/appleid/auth/token", sent)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert!(r.json()["access_token"].is_string());
    let forms = s.sign_in_forms();
    let (got, with_authorization) = &forms[0];
    assert!(!with_authorization, "the credential is in the form only");
    let fields: Vec<&str> = got.split('&').collect();
    assert_eq!(fields[0], "grant_type=authorization_code");
    assert_eq!(fields[1], "code=c0de%2Fwith+space", "byte for byte");
    assert!(fields[2].starts_with("client_secret=") && !got.contains("leaked"));
    assert_eq!(fields[3], "client_id=com.example.web");
    assert_eq!(fields[4], "redirect_uri=https%3A%2F%2Fexample.com%2Fcb");
    let secret = fields[2].trim_start_matches("client_secret=");
    let parts: Vec<&str> = secret.split('.').collect();
    let claims = decoded(parts[1]);
    assert_eq!(
        names(&decoded(parts[0])),
        ["alg", "kid"],
        "no WeatherKit `id`"
    );
    assert_eq!(names(&claims), ["aud", "exp", "iat", "iss", "sub"]);
    assert_eq!(claims["sub"], "com.example.web");
    assert_eq!(claims["aud"], "https://appleid.apple.com");
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 600, "the default 10 minutes");

    // Revoke and the v2 token endpoint too; the secret is reused, not re-signed.
    for path in ["/appleid/auth/revoke", "/appleid/auth/oauth2/v2/token"] {
        let r = send(form(
            &b,
            path,
            "client_id=com.example.web&token=t0k&token_type_hint=refresh_token",
        ))
        .await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {:?}", r.body);
    }
    let forms = s.sign_in_forms();
    assert!(forms[1].0.ends_with(&format!("&client_secret={secret}")));
    assert_eq!(forms.len(), 3);

    // Apple's invalid_client is diagnosed, its body kept.
    let r = send(form(
        &b,
        "/appleid/auth/token",
        "grant_type=refresh_token&refresh_token=r&client_id=com.example.retired",
    ))
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.headers["x-proxy-diagnosis"], "SIGN_IN_INVALID_CLIENT");
    let body = r.json();
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(
        body["diagnostics"]["client_secret"]["sub"],
        "com.example.retired"
    );
    assert!(!r.body.windows(secret.len()).any(|w| w == secret.as_bytes()));

    // Refusals, none of which reach Apple.
    let before = s.sign_in_forms().len();
    let long = format!("client_id=com.example.web&pad={}", "x".repeat(70 * 1024));
    for (req, status, needle) in [
        (
            form(
                &b,
                "/appleid/auth/token",
                "code=1&client_id=com.example.other",
            ),
            403,
            "com.example.other",
        ),
        (
            form(&b, "/appleid/auth/token", "code=1"),
            400,
            "no client_id",
        ),
        (
            form(&b, "/appleid/auth/token", "client_id=a&client_id=b"),
            400,
            "more than one",
        ),
        (form(&b, "/appleid/auth/token", &long), 413, "65536"),
        (get(&b, "/appleid/auth/keys"), 403, "only POST"),
        (
            form(
                &b,
                "/appleid/auth/token?client_secret=mine",
                "client_id=com.example.web",
            ),
            400,
            "no query string",
        ),
        (
            b.request("POST", "/appleid/auth/token")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    b"{\"client_id\":\"com.example.web\"}",
                )))
                .unwrap(),
            400,
            "x-www-form-urlencoded",
        ),
    ] {
        let r = send(req).await;
        assert_eq!(r.status.as_u16(), status, "{needle}: {:?}", r.body);
        let detail = r.json()["errors"][0]["detail"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(detail.contains(needle), "{detail}");
    }
    assert_eq!(s.sign_in_forms().len(), before, "no refusal reached Apple");

    // Audit: the secret's fingerprint, never the secret or the form.
    let records = binary_audit(&b, 10).await;
    assert_eq!(records[0]["api"], "sign-in-with-apple");
    assert_eq!(records[0]["token_sha256"], sha_hex(secret));
    let audit = records.iter().map(Value::to_string).collect::<String>();
    let log = std::fs::read_to_string(b.world.dir.path().join("stderr.log")).unwrap();
    for text in [&audit, &log] {
        assert!(!text.contains(parts[2]) && !text.contains("c0de") && !text.contains("leaked"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_exchange_neither_aborts_it_nor_causes_another() {
    let b = Binary::start(Setup::default(), |t| t).await;
    let s = &b.world.standin;
    s.set_token_endpoint(TokenEndpoint {
        delay_ms: 800,
        ..TokenEndpoint::default()
    });
    // The first request starts the exchange, then its client goes away.
    let leader = tokio::spawn(send(get(&b, "/maps/v1/search?q=first")));
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    leader.abort();
    let replies = futures_join(&b, "/maps/v1/search?q=next", 5).await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    assert_eq!(s.exchange_attempts(), 1, "the one exchange served them all");
    assert_eq!(s.exchanges(Role::Maps), 1);
    let records = binary_audit(&b, 6).await;
    assert!(
        records.iter().any(|r| r["error"] == "client_disconnected"),
        "the leader's request is audited as disconnected"
    );
}
