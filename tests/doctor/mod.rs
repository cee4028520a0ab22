//! The 401 doctor end to end: for each cause the stand-in can reproduce, the proxy names it
//! first — in `X-Proxy-Diagnosis` and as `likely_causes[0]` — and the diagnosis never holds a
//! token, a signature or a client secret.

use apple_standin::{Faults, AGREEMENT_PENDING_BODY, APP_STORE_CONNECT_FORBIDDEN_BODY};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;

use crate::support::*;

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// Asserts `reply` is Apple's status with a diagnosis naming `code` first, with a fix for
/// every cause, and without any secret the run produced.
fn assert_diagnosed(
    h: &Harness,
    reply: &Reply,
    status: StatusCode,
    code: &str,
) -> serde_json::Value {
    let body = reply.json();
    assert_eq!(reply.status, status, "{body:#}");
    assert_eq!(reply.headers["x-proxy-diagnosis"], code, "{body:#}");
    let causes = body["diagnostics"]["likely_causes"]
        .as_array()
        .expect("likely_causes");
    assert_eq!(causes[0]["code"], code, "{body:#}");
    for c in causes {
        assert!(
            !c["fix"].as_str().unwrap_or("").is_empty(),
            "every cause has a fix: {c}"
        );
        assert!(!c["detail"].as_str().unwrap_or("").is_empty());
    }
    assert!(
        body["errors"].as_array().is_some_and(|e| !e.is_empty()),
        "errors array present"
    );
    assert_eq!(
        body["diagnostics"]["request_id"],
        reply.headers["x-request-id"].to_str().unwrap()
    );
    let text = String::from_utf8_lossy(&reply.body);
    assert!(
        !text.contains(&h.world.secret) && !text.contains(&h.world.reader_secret),
        "no client secret"
    );
    for r in h.standin().received() {
        if let Some(auth) = r.headers.get("authorization").and_then(|v| v.to_str().ok()) {
            for segment in auth.trim_start_matches("Bearer ").split('.').skip(1) {
                assert!(
                    !text.contains(segment),
                    "no token payload or signature in the diagnosis"
                );
            }
        }
    }
    body
}

async fn reader_get(h: &Harness, path: &str) -> Reply {
    send(
        http::Request::get(h.url(path))
            .header("authorization", format!("Bearer {}", h.world.reader_secret))
            .body(empty())
            .unwrap(),
    )
    .await
}

/// A harness whose config file was edited by `edit` before the proxy started.
async fn edited(edit: impl FnOnce(String) -> String) -> Harness {
    let world = World::new(&Setup::default(), "127.0.0.1:0").await;
    let text = edit(std::fs::read_to_string(&world.config_path).unwrap());
    std::fs::write(&world.config_path, text).unwrap();
    Harness::from_world(world).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_clock_is_diagnosed_as_clock_skew_with_the_measured_offset() {
    let h = Harness::with(Setup {
        standin_clock_offset: -300,
        ..Setup::default()
    })
    .await;
    // A POST with a body is not replayed, so Apple's 401 reaches the client, diagnosed.
    let r = send(
        h.request("POST", "/v1/bundleIds")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    let body = assert_diagnosed(&h, &r, StatusCode::UNAUTHORIZED, "CLOCK_SKEW");
    let skew = body["diagnostics"]["clock"]["skew_s"].as_i64().unwrap();
    assert!((-302..=-298).contains(&skew), "{skew}");
    assert_eq!(
        body["errors"],
        serde_json::from_str::<serde_json::Value>(
            apple_standin::APP_STORE_CONNECT_NOT_AUTHORIZED_BODY
        )
        .unwrap()["errors"],
        "Apple's errors array, unchanged"
    );
    assert_eq!(body["diagnostics"]["token"]["aud"], "appstoreconnect-v1");
    assert_eq!(body["diagnostics"]["key"]["key_id"], TEAM_KID);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_store_connect_key_used_for_storekit_is_diagnosed_as_the_wrong_key_kind() {
    let h = edited(|t| {
        t.replace(
            &format!("key_id = \"{IAP_KID}\""),
            &format!("key_id = \"{TEAM_KID}\""),
        )
        .replace(
            &format!("keys/SubscriptionKey_{IAP_KID}.p8"),
            &format!("keys/AuthKey_{TEAM_KID}.p8"),
        )
    })
    .await;
    let r = h.get("/inApps/v1/transactions/1").await;
    let body = assert_diagnosed(&h, &r, StatusCode::UNAUTHORIZED, "WRONG_KEY_KIND");
    assert_eq!(
        body["errors"][0]["code"], "NOT_AUTHORIZED",
        "synthesised: the storekit 401 has no body"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_individual_key_on_sales_reports_is_diagnosed_with_apples_403_quoted() {
    let h = Harness::start().await;
    let r = reader_get(&h, "/v1/salesReports?filter%5BreportType%5D=SALES").await;
    let body = assert_diagnosed(&h, &r, StatusCode::FORBIDDEN, "INDIVIDUAL_KEY_NOT_ALLOWED");
    let apple: serde_json::Value = serde_json::from_str(APP_STORE_CONNECT_FORBIDDEN_BODY).unwrap();
    assert_eq!(body["errors"], apple["errors"]);
    assert!(body["diagnostics"]["likely_causes"][0]["fix"]
        .as_str()
        .unwrap()
        .contains("team key"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_bundle_id_is_diagnosed_as_a_bundle_id_mismatch() {
    let h = edited(|t| {
        t.replace(
            &format!("bundle_id = \"{BUNDLE}\""),
            "bundle_id = \"com.example.App\"",
        )
    })
    .await;
    // The team key (same issuer) works, so the issuer is proven right.
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    let r = h.get("/inApps/v1/transactions/1").await;
    let body = assert_diagnosed(&h, &r, StatusCode::UNAUTHORIZED, "BUNDLE_ID_MISMATCH");
    assert_eq!(body["diagnostics"]["token"]["bid"], "com.example.App");
    assert_eq!(body["diagnostics"]["sandbox_probe"]["accepted"], false);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_apple_matches_byte_for_byte_is_diagnosed_as_a_scope_mismatch() {
    let h = Harness::start().await;
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    h.standin().set_faults(Faults {
        strict_scope_encoding: true,
        ..Faults::default()
    });
    let r = h.get("/v1/apps?filter%5Bplatform%5D=IOS").await;
    let body = assert_diagnosed(&h, &r, StatusCode::UNAUTHORIZED, "SCOPE_MISMATCH");
    assert_eq!(
        body["diagnostics"]["token"]["scope"],
        serde_json::json!(["GET /v1/apps?filter[platform]=IOS"])
    );
    assert_eq!(
        body["diagnostics"]["retried"], true,
        "idempotent: re-minted and retried once first"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_401_while_sandbox_accepts_is_diagnosed_as_app_not_released() {
    let h = Harness::start().await;
    h.standin().set_faults(Faults {
        unreleased_bundle_ids: vec![BUNDLE.into()],
        ..Faults::default()
    });
    let r = h.get("/inApps/v1/transactions/2000000000000001").await;
    let body = assert_diagnosed(&h, &r, StatusCode::UNAUTHORIZED, "APP_NOT_RELEASED");
    assert_eq!(
        body["diagnostics"]["sandbox_probe"],
        serde_json::json!({"accepted": true, "status": 200})
    );
    assert_eq!(body["diagnostics"]["environment"], "production");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_worked_and_is_now_refused_is_diagnosed_as_revoked_with_when_it_last_worked() {
    let h = Harness::start().await;
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    h.standin().set_faults(Faults {
        revoked_key_ids: vec![TEAM_KID.into()],
        ..Faults::default()
    });
    let r = h.get("/v1/apps").await;
    let body = assert_diagnosed(&h, &r, StatusCode::UNAUTHORIZED, "KEY_REVOKED");
    assert!(body["diagnostics"]["likely_causes"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("last worked at"));
    assert!(body["diagnostics"]["key_last_success"].is_string());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_teams_issuer_id_is_diagnosed_as_the_wrong_issuer() {
    let h = edited(|t| {
        t.replacen(
            &format!("issuer_id = \"{ISSUER}\""),
            "issuer_id = \"11111111-2222-4333-8444-555555555555\"",
            1,
        )
    })
    .await;
    let r = h.get("/v1/apps").await;
    let body = assert_diagnosed(&h, &r, StatusCode::UNAUTHORIZED, "WRONG_ISSUER");
    assert_eq!(
        body["diagnostics"]["token"]["iss"],
        "11111111-2222-4333-8444-555555555555"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_id_that_disagrees_with_the_key_file_is_diagnosed_as_the_wrong_key_id() {
    let h = edited(|t| {
        t.replacen(
            &format!("key_id = \"{TEAM_KID}\""),
            "key_id = \"WRONGKEY01\"",
            1,
        )
    })
    .await;
    let r = h.get("/v1/apps").await;
    let body = assert_diagnosed(&h, &r, StatusCode::UNAUTHORIZED, "WRONG_KEY_ID");
    assert!(body["diagnostics"]["likely_causes"][0]["detail"]
        .as_str()
        .unwrap()
        .contains(TEAM_KID));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_the_permission_is_diagnosed_as_role_forbidden() {
    let h = Harness::start().await;
    h.standin().set_faults(Faults {
        role_forbidden_paths: vec!["/v1/users".into()],
        ..Faults::default()
    });
    let r = h.get("/v1/users").await;
    let body = assert_diagnosed(&h, &r, StatusCode::FORBIDDEN, "ROLE_FORBIDDEN");
    assert!(body["diagnostics"]["likely_causes"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("does not allow this request"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_agreement_is_diagnosed_with_apples_detail_quoted() {
    let h = Harness::start().await;
    h.standin().set_faults(Faults {
        agreement_pending: true,
        ..Faults::default()
    });
    let r = h.get("/v1/apps").await;
    let body = assert_diagnosed(&h, &r, StatusCode::FORBIDDEN, "AGREEMENT_PENDING");
    let apple: serde_json::Value = serde_json::from_str(AGREEMENT_PENDING_BODY).unwrap();
    assert_eq!(body["errors"], apple["errors"]);
    let detail = body["diagnostics"]["likely_causes"][0]["detail"]
        .as_str()
        .unwrap();
    assert!(
        detail.contains(apple["errors"][0]["detail"].as_str().unwrap()),
        "{detail}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_401_is_retried_once_with_a_fresh_token_and_named() {
    let h = Harness::start().await;
    h.standin().set_faults(Faults {
        transient_401s: 1,
        ..Faults::default()
    });
    let r = h.get("/v1/apps").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-proxy-diagnosis"], "APPLE_TRANSIENT_401");
    let got = h.standin().received();
    assert_eq!(got.len(), 2, "one retry");
    assert_ne!(
        got[0].headers["authorization"], got[1].headers["authorization"],
        "re-minted, not resent"
    );
    // Two transient 401s in a row: the second is diagnosed, and retried is recorded.
    h.standin().set_faults(Faults {
        transient_401s: 2,
        ..Faults::default()
    });
    let r = h.get("/v1/apps").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["diagnostics"]["retried"], true);
    h.stop().await;
}
