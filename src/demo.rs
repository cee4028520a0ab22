//! `apple-api-proxy demo`: the whole thing working without an Apple account.
//!
//! Starts the Apple stand-in (TLS with a throw-away CA, throw-away keys, Apple's token rules
//! enforced by its own verifier) and the real proxy in front of it, with a demo client
//! secret, and produces curl lines that work when pasted. Nothing is written to disk: keys
//! and the CA stay in memory and vanish on exit.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use tokio::net::TcpListener;

use crate::config::{Config, KeySource};
use crate::proxy::Proxy;
use apple_standin::{KnownKey, KnownKeyKind, Options, Role, Standin};

pub const DEMO_ISSUER: &str = "69a6de7e-0000-47e3-e053-5b8c7c11a4d1";
pub const DEMO_BUNDLE: &str = "com.example.demo";
pub const DEMO_CONNECT_KID: &str = "DEMOTEAM01";
pub const DEMO_STOREKIT_KID: &str = "DEMOIAP001";
pub const DEMO_INDIVIDUAL_KID: &str = "DEMOUSER01";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the Apple stand-in: {0}")]
    Standin(std::io::Error),
    #[error("cannot listen on {addr}: {error} (fix: pass --listen 127.0.0.1:<free port>)")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot generate a throw-away key")]
    KeyGen,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Start(#[from] Box<crate::proxy::StartError>),
}

/// A running demo: the stand-in, the proxy's listener and the demo client's secret.
pub struct Demo {
    pub standin: Standin,
    pub proxy: Arc<Proxy>,
    pub listener: TcpListener,
    pub addr: SocketAddr,
    pub secret: String,
    /// Secret of client `analyst`, pinned to an individual key (to show a diagnosis).
    pub analyst_secret: String,
}

fn throwaway_key() -> Result<(String, Vec<u8>), DemoError> {
    let rng = SystemRandom::new();
    let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| DemoError::KeyGen)?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_ref(), &rng)
        .map_err(|_| DemoError::KeyGen)?;
    use ring::signature::KeyPair as _;
    let public = pair.public_key().as_ref().to_vec();
    Ok((
        pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec())),
        public,
    ))
}

/// Starts the stand-in and binds the proxy on `listen`; the caller serves it.
pub async fn start(listen: SocketAddr) -> Result<Demo, DemoError> {
    let (connect_pem, connect_pub) = throwaway_key()?;
    let (storekit_pem, storekit_pub) = throwaway_key()?;
    let (analyst_pem, analyst_pub) = throwaway_key()?;
    let standin = Standin::start(Options {
        keys: vec![
            KnownKey {
                key_id: DEMO_CONNECT_KID.into(),
                public_key: connect_pub,
                kind: KnownKeyKind::Team {
                    issuer_id: DEMO_ISSUER.into(),
                },
            },
            KnownKey {
                key_id: DEMO_INDIVIDUAL_KID.into(),
                public_key: analyst_pub,
                kind: KnownKeyKind::Individual,
            },
            KnownKey {
                key_id: DEMO_STOREKIT_KID.into(),
                public_key: storekit_pub,
                kind: KnownKeyKind::InAppPurchase {
                    issuer_id: DEMO_ISSUER.into(),
                    bundle_ids: vec![DEMO_BUNDLE.into()],
                },
            },
        ],
        ..Options::default()
    })
    .await
    .map_err(DemoError::Standin)?;

    let secret = crate::client::generate_secret().map_err(|_| DemoError::KeyGen)?;
    let analyst_secret = crate::client::generate_secret().map_err(|_| DemoError::KeyGen)?;
    let connect_url = standin.url(Role::AppStoreConnect);
    let text = format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "off"

[audit]
path = "-"

[apis.app-store-connect]
base_url = "{connect_url}"
[apis.notary]
base_url = "{connect_url}"
[apis.app-store-server]
base_url = "{prod}"
sandbox_base_url = "{sandbox}"
[apis.advanced-commerce]
base_url = "{prod}"
sandbox_base_url = "{sandbox}"
[apis.external-purchase]
base_url = "{prod}"
sandbox_base_url = "{sandbox}"

[[keys]]
name = "connect"
kind = "team"
key_id = "{DEMO_CONNECT_KID}"
issuer_id = "{DEMO_ISSUER}"
private_key_env = "DEMO_IN_MEMORY"
apis = ["app-store-connect", "notary"]

[[keys]]
name = "storekit"
kind = "in-app-purchase"
key_id = "{DEMO_STOREKIT_KID}"
issuer_id = "{DEMO_ISSUER}"
bundle_id = "{DEMO_BUNDLE}"
private_key_env = "DEMO_IN_MEMORY"
apis = ["app-store-server", "advanced-commerce", "external-purchase"]

[[keys]]
name = "analyst"
kind = "individual"
key_id = "{DEMO_INDIVIDUAL_KID}"
private_key_env = "DEMO_IN_MEMORY"
apis = ["app-store-connect"]

[[clients]]
name = "demo"
secret_sha256 = "{hash}"
allow = ["GET /v1/*", "* /inApps/*", "* /sandbox/inApps/*", "GET /notary/*"]

[[clients]]
name = "analyst"
secret_sha256 = "{analyst_hash}"
allow = ["GET /v1/*"]
key = "analyst"
"#,
        prod = standin.url(Role::StoreKitProduction),
        sandbox = standin.url(Role::StoreKitSandbox),
        hash = crate::hex(&crate::sha256(secret.as_bytes())),
        analyst_hash = crate::hex(&crate::sha256(analyst_secret.as_bytes())),
    );
    let mut config = Config::parse(&text, "<demo>", Path::new("."))?;
    config.keys[0].source = KeySource::Inline(connect_pem);
    config.keys[1].source = KeySource::Inline(storekit_pem);
    config.keys[2].source = KeySource::Inline(analyst_pem);
    let (proxy, _warnings) = Proxy::new(config, Some(standin.ca_pem())).map_err(Box::new)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|error| DemoError::Listen {
            addr: listen,
            error,
        })?;
    let addr = listener.local_addr().map_err(|error| DemoError::Listen {
        addr: listen,
        error,
    })?;
    Ok(Demo {
        standin,
        proxy: Arc::new(proxy),
        listener,
        addr,
        secret,
        analyst_secret,
    })
}

impl Demo {
    /// `(what it shows, curl line)` pairs; every line works when pasted into a shell.
    pub fn examples(&self) -> Vec<(&'static str, String)> {
        let base = format!("http://{}", self.addr);
        let auth = format!("-H 'Authorization: Bearer {}'", self.secret);
        vec![
            (
                "App Store Connect: list apps (the proxy mints a token scoped to exactly this GET)",
                format!("curl -sS {auth} '{base}/v1/apps?filter%5Bplatform%5D=IOS&limit=5'"),
            ),
            (
                "App Store Server API, production (in-app-purchase key, bundle id in the token)",
                format!("curl -sS {auth} '{base}/inApps/v1/transactions/2000000123456789'"),
            ),
            (
                "App Store Server API, sandbox (the /sandbox prefix picks Apple's sandbox host)",
                format!("curl -sS {auth} '{base}/sandbox/inApps/v2/history/2000000123456789'"),
            ),
            (
                "Response headers: X-Request-Id from the proxy, X-Rate-Limit from \"Apple\"",
                format!("curl -sS -o /dev/null -D - {auth} '{base}/v1/apps'"),
            ),
            (
                "The 401 doctor: client `analyst` uses an individual key, which Apple refuses sales reports (403); the proxy says why and how to fix it",
                format!(
                    "curl -sS -H 'Authorization: Bearer {}' '{base}/v1/salesReports?filter%5BreportType%5D=SALES'",
                    self.analyst_secret
                ),
            ),
            (
                "No client secret: the proxy refuses (401 PROXY_UNAUTHENTICATED)",
                format!("curl -sS '{base}/v1/apps'"),
            ),
            (
                "Not allowed by this client's rules (403 PROXY_FORBIDDEN)",
                format!("curl -sS -X DELETE {auth} '{base}/v1/apps/1'"),
            ),
            (
                "Unknown path prefix (404 PROXY_NO_ROUTE, lists the known prefixes)",
                format!("curl -sS {auth} '{base}/nope'"),
            ),
        ]
    }
}
