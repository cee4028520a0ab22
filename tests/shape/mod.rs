//! Regressions found while giving the request path its shape (issue "Shape"): the sandbox
//! asked once, buffered bodies whose headers describe them, and state that a reload must
//! neither freeze (admin metrics) nor reset (rate limits) nor carry to another key (history).

use std::sync::Arc;

use http::StatusCode;

use crate::ops::{audit_lines, edit_config, scrape, until, with_fallback};
use crate::support::*;

/// The value of the first exposition line that starts with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until the file watch has applied its `nth` reload.
async fn reloaded(h: &Arc<Harness>, nth: u32) -> bool {
    let hh = h.clone();
    let want = format!("aap_config_reloads_total{{result=\"applied\"}} {nth}");
    until(move || {
        let (h, want) = (hh.clone(), want.clone());
        Box::pin(async move { scrape(&h).await.contains(&want) })
    })
    .await
}

/// Appends a comment to the config file and waits until the file watch has applied it.
async fn reload(h: &Arc<Harness>, nth: u32) {
    edit_config(h, |t| format!("{t}\n# reload {nth}\n"));
    assert!(reloaded(h, nth).await, "reload {nth} applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_that_sandbox_refuses_too_asks_sandbox_once_and_diagnoses_with_its_answer() {
    use apple_standin::{Faults, Role};
    let h = with_fallback(true).await;
    h.standin().set_faults(Faults {
        revoked_key_ids: vec![IAP_KID.into()],
        ..Faults::default()
    });
    let r = h.get("/inApps/v1/transactions/2000000000000001").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let roles: Vec<Role> = h.standin().received().iter().map(|r| r.role).collect();
    // Production, its re-minted retry, then sandbox — once.
    assert_eq!(
        roles,
        [
            Role::StoreKitProduction,
            Role::StoreKitProduction,
            Role::StoreKitSandbox
        ]
    );
    let probe = &r.json()["diagnostics"]["sandbox_probe"];
    assert_eq!(probe["accepted"], false, "{probe}");
    assert_eq!(probe["status"], 401, "{probe}");
    let line = &audit_lines(&h, 1).await[0];
    assert_eq!(line["environment"], "production", "{line}");
    assert_eq!(line["sandbox_fallback"], false, "{line}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_the_admin_listener_counts_the_new_runtimes_tokens() {
    let h = Arc::new(Harness::start().await);
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    let before = metric(&scrape(&h).await, "aap_tokens_minted_total").expect("tokens minted");
    reload(&h, 1).await;
    // A new scope: a fresh signature in the new runtime.
    assert_eq!(h.get("/v1/apps?fields=name").await.status, StatusCode::OK);
    let after = metric(&scrape(&h).await, "aap_tokens_minted_total").expect("tokens minted");
    assert_eq!(
        after,
        before + 1.0,
        "the admin listener reads the live runtime"
    );
    Arc::try_unwrap(h).ok().expect("one owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_does_not_refill_a_clients_spent_rate_limit() {
    let h = Arc::new(
        Harness::edited(|t| {
            t.replacen(
                "allow = [\"* /*\"]",
                "allow = [\"* /*\"]\nrate_limit = \"2/m\"",
                1,
            )
        })
        .await,
    );
    for _ in 0..2 {
        assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    }
    assert_eq!(
        h.get("/v1/apps").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    reload(&h, 1).await;
    let r = h.get("/v1/apps").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "still spent");
    assert_eq!(r.error_code(), apple_api_proxy::proxy::codes::RATE_LIMITED);
    Arc::try_unwrap(h).ok().expect("one owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_key_under_the_same_name_does_not_inherit_its_history() {
    let h = Arc::new(Harness::start().await);
    assert_eq!(h.get("/v1/apps").await.status, StatusCode::OK);
    // The operator replaces the key file with a key Apple does not know: same name, same id.
    let file = h
        .world
        .dir
        .path()
        .join("keys")
        .join(format!("AuthKey_{TEAM_KID}.p8"));
    write_private(&file, &TestKey::generate().unwrap().pem);
    assert!(reloaded(&h, 1).await, "the key file change is reloaded");
    let r = h.get("/v1/apps").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let diagnostics = &r.json()["diagnostics"];
    assert!(
        diagnostics["key_last_success"].is_null(),
        "the old key's success is not this key's: {diagnostics}"
    );
    Arc::try_unwrap(h).ok().expect("one owner").stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_too_large_to_read_passes_back_whole_with_headers_that_describe_it() {
    use apple_standin::{Faults, Role};
    let h = with_fallback(true).await;
    h.standin().set_faults(Faults {
        sandbox_only_transactions: vec!["2000000000000042".into()],
        error_padding: 100_000,
        ..Faults::default()
    });
    let r = h.get("/inApps/v1/transactions/2000000000000042").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body.len(), 100_000, "Apple's body, all of it");
    assert_eq!(r.headers["content-length"], "100000");
    assert_eq!(r.json()["errorCode"], 4040010);
    // Too large to read within the bound, so not recognised: sandbox is not asked.
    let roles: Vec<Role> = h.standin().received().iter().map(|r| r.role).collect();
    assert_eq!(roles, [Role::StoreKitProduction]);
    h.stop().await;
}
