//! The OIDC issuer for the `oidc` load mode (benches/load/oidc.sh): starts the stand-in's
//! issuer on 127.0.0.1 (its own TLS) with a P-256 key `key-1` and an RSA key `rsa-1`, writes
//! its CA to the path given, prints `ISSUER <url>`, `JWKS <url>`, `RS256 <token>` and
//! `ES256 <token>` (audience `apple-api-proxy`, valid for an hour, the claims of a GitHub
//! Actions job on `main` of example/app), and serves until its standard input closes.
//!
//! Usage: oidc_issuer CA_FILE

use std::io::BufRead as _;
use std::time::{SystemTime, UNIX_EPOCH};

use apple_standin::oidc::OidcIssuer;
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let Some(ca_file) = std::env::args().nth(1) else {
        eprintln!("usage: oidc_issuer CA_FILE");
        std::process::exit(2);
    };
    let issuer = OidcIssuer::start().await.expect("the issuer starts");
    issuer.add_rsa_key("rsa-1", true).expect("an RSA key");
    std::fs::write(&ca_file, issuer.ca_pem()).expect("the CA file is written");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    let claims = json!({
        "iss": issuer.issuer(), "aud": "apple-api-proxy",
        "sub": "repo:example/app:ref:refs/heads/main",
        "repository": "example/app", "ref": "refs/heads/main",
        "iat": now, "nbf": now, "exp": now + 3600,
    });
    println!("ISSUER {}", issuer.issuer());
    println!("JWKS {}", issuer.jwks_url());
    println!("RS256 {}", issuer.sign("rsa-1", json!({}), claims.clone()));
    println!("ES256 {}", issuer.sign("key-1", json!({}), claims));
    // Serve until the bench script closes our stdin (or exits).
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            line.clear();
        }
    })
    .await;
    drop(issuer);
}
