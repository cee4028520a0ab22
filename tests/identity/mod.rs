//! DESIGN §17, workload identity, through the real binary: a CI job with no stored secret
//! calls App Store Connect with the ID token its platform gave it (issued here by the
//! stand-in's OIDC issuer over its own TLS, signed with RustCrypto's p256; the proxy verifies
//! with ring), every refusal, rotation, an outage with and without cached keys.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Value};

use apple_standin::oidc::OidcIssuer;

use crate::second_round::{binary_audit, Binary};
use crate::support::*;

const AUDIENCE: &str = "apple-api-proxy";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(issuer: &str) -> Value {
    let t = now();
    json!({"iss": issuer, "aud": AUDIENCE, "sub": "repo:example/app:ref:refs/heads/main",
           "repository": "example/app", "ref": "refs/heads/main", "environment": "release",
           "iat": t - 5, "nbf": t - 5, "exp": t + 300})
}

fn with(mut v: Value, k: &str, x: Value) -> Value {
    v[k] = x;
    v
}

/// The proxy with one provider (the issuer, trusted through `ca_file`) and one identity
/// client that may read apps; no secret is configured for it.
async fn start(issuer: &OidcIssuer) -> Binary {
    let ca = issuer.ca_pem().to_string();
    let lines = format!(
        "\n[[identity_providers]]\nname = \"ci\"\nissuer = \"{}\"\naudience = \"{AUDIENCE}\"\nca_file = \"issuer-ca.pem\"\nmax_token_age = \"15m\"\n\n\
         [[clients]]\nname = \"release-ci\"\nallow = [\"GET /v1/*\"]\n\
         identity = {{ provider = \"ci\", claims = {{ repository = \"example/app\", ref = \"refs/heads/main\" }} }}\n",
        issuer.issuer()
    );
    Binary::start_with(
        Setup {
            rust_log: Some("debug"),
            ..Setup::default()
        },
        move |t| t + &lines,
        move |dir| std::fs::write(dir.join("issuer-ca.pem"), ca).unwrap(),
    )
    .await
}

async fn get(b: &Binary, token: &str) -> Reply {
    send(
        http::Request::get(format!("http://{}/v1/apps", b.addr))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

fn detail(r: &Reply) -> String {
    r.json()["errors"][0]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ci_job_with_only_its_identity_token_calls_app_store_connect_and_every_bad_token_is_refused(
) {
    let issuer = OidcIssuer::start().await.unwrap();
    // GitHub, GitLab and Kubernetes sign RS256; the issuer publishes an RSA and an EC key.
    issuer.add_rsa_key("rsa-1", true).unwrap();
    let evil = OidcIssuer::start().await.unwrap();
    let b = start(&issuer).await;
    let iss = issuer.issuer();
    let rs256 = issuer.sign("rsa-1", json!({}), claims(&iss));
    assert!(rs256.starts_with(&{
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256""#)[..16]
            .to_string()
    }));
    let r = get(&b, &rs256).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "RS256: {}",
        String::from_utf8_lossy(&r.body)
    );
    let good = issuer.sign("key-1", json!({}), claims(&iss));
    // Keys are fetched at start; the first request may race the fetch, and waits for it.
    let r = get(&b, &good).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let apple = b.world.standin.received();
    let last = apple.last().expect("Apple got the request");
    assert!(last.verdict.is_ok(), "Apple accepted the proxy's own token");
    let sent = last
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(!sent.contains(&good), "Apple never sees the identity token");

    // A JWKS signed by another key under the same kid: the evil issuer's token claiming our iss.
    let forged = evil.sign("key-1", json!({}), claims(&iss));
    // HS256 "keyed" with the issuer's public key: refused by its alg.
    let hs256 = issuer.sign("key-1", json!({"alg": "HS256"}), claims(&iss));
    let unsigned = {
        use base64::Engine as _;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "kid": "key-1"})),
            b64(&claims(&iss))
        )
    };
    let jku = evil.sign("key-1", json!({"jku": evil.jwks_url()}), claims(&iss));
    let t = now();
    let cases: Vec<(&str, String, &str)> = vec![
        ("forged", forged, "signature"),
        ("hs256", hs256, "HS256"),
        ("none", unsigned, "\"none\""),
        ("jku", jku, "signature"),
        (
            "expired",
            issuer.sign(
                "key-1",
                json!({}),
                with(claims(&iss), "exp", json!(t - 120)),
            ),
            "expired",
        ),
        (
            "audience",
            issuer.sign(
                "key-1",
                json!({}),
                with(claims(&iss), "aud", json!("sts.amazonaws.com")),
            ),
            "audience",
        ),
        (
            "not yet",
            issuer.sign(
                "key-1",
                json!({}),
                with(claims(&iss), "nbf", json!(t + 600)),
            ),
            "not valid yet",
        ),
        (
            "too old",
            issuer.sign(
                "key-1",
                json!({}),
                with(
                    with(claims(&iss), "iat", json!(t - 1200)),
                    "exp",
                    json!(t + 60),
                ),
            ),
            "max_token_age",
        ),
        (
            "ES256 on no key",
            issuer.sign("nope", json!({}), claims(&iss)),
            "unknown key",
        ),
        (
            "RS256 on the EC key",
            issuer.sign("key-1", json!({"alg": "RS256"}), claims(&iss)),
            "does not fit",
        ),
        (
            "ES256 on the RSA key",
            issuer.sign("rsa-1", json!({"alg": "ES256"}), claims(&iss)),
            "does not fit",
        ),
    ];
    for (what, token, says) in &cases {
        let r = get(&b, token).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(r.error_code(), "PROXY_UNAUTHENTICATED", "{what}");
        let d = detail(&r);
        assert!(d.contains(says), "{what}: {d}");
        assert!(
            !d.contains(&token[..30]),
            "{what}: the token is never echoed"
        );
    }
    assert_eq!(evil.fetches(), (0, 0), "a jku is never followed");
    // A token from an issuer that is not configured is no credential at all.
    let r = get(&b, &evil.sign("key-1", json!({}), claims(&evil.issuer()))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        detail(&r).contains("send your proxy client secret"),
        "{}",
        detail(&r)
    );
    // Valid, but another repository: 403 naming the subject.
    let other = issuer.sign(
        "key-1",
        json!({}),
        with(
            with(claims(&iss), "repository", json!("evil/app")),
            "sub",
            json!("repo:evil/app:ref:refs/heads/main"),
        ),
    );
    let r = get(&b, &other).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "PROXY_FORBIDDEN");
    assert!(
        detail(&r).contains("repo:evil/app:ref:refs/heads/main"),
        "{}",
        detail(&r)
    );
    // The allow rules apply as to any client.
    let r = send(
        http::Request::post(format!("http://{}/v1/builds", b.addr))
            .header("authorization", format!("Bearer {good}"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let records = binary_audit(&b, 5 + cases.len()).await;
    let ok = &records[1];
    assert_eq!(ok["client"], "release-ci");
    assert_eq!(ok["client_auth"], "oidc");
    assert_eq!(
        ok["identity"],
        json!({"provider": "ci", "subject": "repo:example/app:ref:refs/heads/main"})
    );
    let denied = records
        .iter()
        .find(|r| r["status"] == 403 && r["client"].is_null())
        .expect("the unmatched token's record");
    assert_eq!(
        denied["identity"]["subject"],
        "repo:evil/app:ref:refs/heads/main"
    );
    let metrics = b.metrics().await;
    for want in [
        r#"aap_identity_verifications_total{provider="ci",outcome="ok"}"#,
        r#"aap_identity_verifications_total{provider="ci",outcome="signature"} 2"#,
        r#"aap_identity_verifications_total{provider="ci",outcome="expired"}"#,
        r#"aap_identity_verifications_total{provider="ci",outcome="no_client"} 1"#,
        r#"aap_identity_provider_up{provider="ci"} 1"#,
        r#"aap_identity_provider_keys{provider="ci"} 2"#,
        r#"aap_identity_verifications_total{provider="ci",outcome="algorithm"} 4"#,
    ] {
        assert!(metrics.contains(want), "{want}\n{metrics}");
    }
    // No token, in whole or signature, in the audit log or the debug-level log.
    let audit = std::fs::read_to_string(b.world.dir.path().join("audit.jsonl")).unwrap();
    let log = std::fs::read_to_string(b.world.dir.path().join("stderr.log")).unwrap_or_default();
    for (_, token, _) in cases.iter().chain([("good", good.clone(), "")].iter()) {
        let sig = token.rsplit('.').next().unwrap_or_default();
        for text in [&audit, &log] {
            assert!(!text.contains(token.as_str()));
            if sig.len() > 20 {
                assert!(!text.contains(sig));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_is_one_refetch_an_unknown_kid_refetches_at_most_every_30s_and_cached_keys_outlive_an_outage(
) {
    let issuer = OidcIssuer::start().await.unwrap();
    let b = start(&issuer).await;
    let iss = issuer.issuer();
    assert!(
        eventually(|| async { issuer.fetches().1 >= 1 }).await,
        "keys are fetched at start"
    );
    let r = get(&b, &issuer.sign("key-1", json!({}), claims(&iss))).await;
    assert_eq!(r.status, StatusCode::OK);
    let before = issuer.fetches();
    assert_eq!(before.0, before.1, "discovery, then the JWKS it names");

    // The issuer rotates: a token signed by the new key costs one refetch and then works.
    issuer.add_key("key-2", true);
    let r = get(&b, &issuer.sign("key-2", json!({}), claims(&iss))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", detail(&r));
    assert_eq!(issuer.fetches().1, before.1 + 1);
    // Another unknown kid within 30 s: refused without another fetch.
    issuer.add_key("key-3", true);
    for _ in 0..5 {
        let r = get(&b, &issuer.sign("key-3", json!({}), claims(&iss))).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(detail(&r).contains("unknown key"), "{}", detail(&r));
    }
    assert_eq!(
        issuer.fetches().1,
        before.1 + 1,
        "at most one refetch per 30 s"
    );

    // Outage: cached keys keep serving (a fresh token, not one remembered).
    issuer.set_down(true);
    let mut c = claims(&iss);
    c["jti"] = json!("fresh");
    let r = get(&b, &issuer.sign("key-1", json!({}), c)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", detail(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_keys_to_be_had_identity_tokens_get_503_and_the_proxy_recovers_on_its_own() {
    let issuer = OidcIssuer::start().await.unwrap();
    issuer.set_down(true);
    let b = start(&issuer).await;
    let token = issuer.sign("key-1", json!({}), claims(&issuer.issuer()));
    let r = get(&b, &token).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "PROXY_IDENTITY_UNAVAILABLE");
    assert!(detail(&r).contains("`ci`"), "{}", detail(&r));
    // Other clients are not held up: the secret client still works.
    let r = send(
        b.request("GET", "/v1/apps")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(b
        .metrics()
        .await
        .contains(r#"aap_identity_provider_up{provider="ci"} 0"#));
    issuer.set_down(false);
    assert!(
        eventually(|| async { get(&b, &token).await.status == StatusCode::OK }).await,
        "the background retry fetches the keys once the issuer is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_says_which_client_an_identity_token_is_and_check_lists_the_providers_keys() {
    let issuer = OidcIssuer::start().await.unwrap();
    let b = start(&issuer).await;
    let iss = issuer.issuer();
    let explain = |token: String| {
        let config = b.world.config_path.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                bin()
                    .args(["explain", "--config"])
                    .arg(&config)
                    .arg(&token)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = explain(issuer.sign("key-1", json!({}), claims(&iss))).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("identity token"), "{stdout}");
    assert!(
        stdout.contains("OK: authenticates client `release-ci`"),
        "{stdout}"
    );
    let out = explain(issuer.sign(
        "key-1",
        json!({}),
        with(claims(&iss), "aud", json!("other")),
    ))
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("audience"));
    let out = explain(issuer.sign(
        "key-1",
        json!({}),
        with(claims(&iss), "repository", json!("evil/app")),
    ))
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("matches no client"));

    let config = b.world.config_path.clone();
    let out = tokio::task::spawn_blocking(move || {
        bin()
            .arg("check")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("IDENTITY PROVIDERS"), "{stdout}");
    assert!(stdout.contains("keys: key-1"), "{stdout}");
    assert!(
        stdout.contains("oidc:ci[ref=refs/heads/main,repository=example/app]"),
        "{stdout}"
    );
}
