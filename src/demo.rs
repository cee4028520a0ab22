//! `apple-api-proxy demo`: the whole thing working without an Apple account.
//!
//! Part of the binary (declared in main.rs), not the library: the stand-in is a test
//! double, and the library must not grow a use of it.
//!
//! The stand-in's fixture generates throw-away keys, starts the Apple stand-in (TLS with a
//! throw-away CA, Apple's token rules enforced by its own verifier) trusting them, and
//! writes the keys, the CA and a `proxy.toml` into a temp dir that is removed when the demo
//! ends. The proxy is then loaded and served exactly as `serve` does it (`Config::load`,
//! `server::bind`, `apple_api_proxy::run`), so the demo exercises the real path. This file
//! chooses the demo's identity and clients and produces curl lines that work when pasted.
//! Imports the library's public API and the stand-in crate.

use std::net::SocketAddr;

use apple_api_proxy::config::{Config, ConfigError};
use apple_api_proxy::server::{self, Listeners};
use apple_standin::fixture::{self, Client, Identity, Slot};

/// The client the examples use: allowed App Store Connect reads, storekit and notary.
const DEMO_CLIENT: &str = "demo";
/// The demo client's `[clients.signing]`: promotional offers on the demo's pro products.
const DEMO_SIGNING: &str =
    "[clients.signing]\nproducts = [\"com.example.demo.pro.*\"]\noffers = [\"winback-*\"]\n";
/// A client pinned to the individual key, to show a diagnosis.
const ANALYST_CLIENT: &str = "analyst";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot set up the Apple stand-in and its throw-away keys")]
    Fixture(#[from] fixture::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {error} (fix: pass --listen 127.0.0.1:<free port>)")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A demo ready to serve: the stand-in and its temp dir, the proxy's config loaded from
/// that dir, and the proxy's bound listener.
pub struct Demo {
    /// Dropping it stops the stand-in and removes the temp dir.
    pub world: fixture::World,
    pub config: Config,
    pub listeners: Listeners,
    pub addr: SocketAddr,
    pub secret: String,
    /// Secret of client `analyst`, pinned to an individual key (to show a diagnosis).
    pub analyst_secret: String,
}

/// Starts the stand-in, writes and loads the config, and binds the proxy on `listen`; the
/// caller serves it with [`apple_api_proxy::run`].
pub async fn start(listen: SocketAddr) -> Result<Demo, DemoError> {
    let world = fixture::World::start(&fixture::Options {
        identity: Identity::DEMO,
        listen: listen.to_string(),
        // Each request's audit record on stdout, under the curl lines.
        audit_toml: "path = \"-\"".to_string(),
        clients: vec![
            Client::new(
                DEMO_CLIENT,
                &[
                    "GET /v1/*",
                    "* /inApps/*",
                    "* /sandbox/inApps/*",
                    "GET /notary/*",
                    "POST /proxy/v1/signatures/*",
                    "POST /apns/*",
                    "GET /weatherkit/*",
                    "GET /maps/*",
                    "GET /business/*",
                    "POST /appleid/*",
                ],
            )
            // What it may have the proxy sign with the In-App Purchase key (DESIGN §15).
            .with_toml(DEMO_SIGNING),
            Client::new(ANALYST_CLIENT, &["GET /v1/*"]).pinned(Slot::Individual),
        ],
        ..fixture::Options::default()
    })
    .await?;
    let config = Config::load(&world.config_path)?;
    let listeners = server::bind(&config)
        .await
        .map_err(|error| DemoError::Listen {
            addr: listen,
            error,
        })?;
    let addr = listeners
        .proxy
        .local_addr()
        .map_err(|error| DemoError::Listen {
            addr: listen,
            error,
        })?;
    let secret = issued(&world, DEMO_CLIENT);
    let analyst_secret = issued(&world, ANALYST_CLIENT);
    Ok(Demo {
        world,
        config,
        listeners,
        addr,
        secret,
        analyst_secret,
    })
}

fn issued(world: &fixture::World, client: &str) -> String {
    world
        .secret(client)
        .expect("the fixture issues a secret for every client in its options")
        .to_string()
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
                "In-app signature: a promotional offer for StoreKit, signed by the proxy under the client's [clients.signing] policy (the key stays here)",
                format!(
                    "curl -sS {auth} -H 'Content-Type: application/json' -d '{{\"product_id\":\"com.example.demo.pro.monthly\",\"offer_id\":\"winback-1\",\"transaction_id\":\"2000000123456789\"}}' '{base}/proxy/v1/signatures/promotional-offer'"
                ),
            ),
            (
                "APNs: a push (developer key; one provider token per key, reused for 40 minutes, over HTTP/2 to \"Apple\"); the status line and apns-id",
                format!(
                    "curl -sS -o /dev/null -D - {auth} -H 'apns-topic: com.example.demo' -H 'apns-push-type: alert' -d '{{\"aps\":{{\"alert\":\"Hello from the proxy\"}}}}' '{base}/apns/3/device/a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90'"
                ),
            ),
            (
                "WeatherKit: current weather (the same developer key; its token carries WeatherKit's id header and service id)",
                format!("curl -sS {auth} '{base}/weatherkit/api/v1/weather/en/51.50/-0.12?dataSets=currentWeather'"),
            ),
            (
                "Maps Server API: a geocode (the proxy exchanges its auth token at /v1/token once and reuses the 30-minute access token; the client never sees either)",
                format!("curl -sS {auth} '{base}/maps/v1/geocode?q=1%20Infinite%20Loop'"),
            ),
            (
                "Apple Business Manager: the organisation's devices (a client-credentials exchange with a client assertion signed by the business-manager key, then the access token)",
                format!("curl -sS {auth} '{base}/business/v1/orgDevices'"),
            ),
            (
                "Sign in with Apple: a token request whose client_secret the proxy signs and puts into the form (every other field passes byte for byte)",
                format!(
                    "curl -sS {auth} -d 'grant_type=authorization_code&code=demo-code&client_id={}' '{base}/appleid/auth/token'",
                    Identity::DEMO.sign_in_client_id
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
