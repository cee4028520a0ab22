//! apple-standin: a local stand-in for Apple's server APIs, an HTTPS server that plays App
//! Store Connect (with Notary) and the App Store Server API, production and sandbox, for
//! apple-api-proxy's `demo`, its tests, the soak and the benchmarks.
//!
//! Owns: the public API below, the three TLS listeners, connection tasks and shutdown.
//! Its worth is independence: it checks tokens with its own reading of Apple's rules
//! (`verify`, from APPLE.md §2) and RustCrypto's `p256`, never the proxy's `ring` minter.
//! This crate does not depend on `apple-api-proxy`, so the verifier cannot share code with
//! the minter it checks: Cargo enforces it, not a convention. Keep it that way; the product
//! uses this crate only in `demo` (its binary) and in tests.
//!
//! Modules: `verify` (token rules, pure), `fault` (the [`Faults`] that refuse a verified
//! token, APPLE.md §3 and §5), `exchange` (one request: check, count, record, answer),
//! `body` (whole and generated response bodies), `tls` (the throw-away CA); and
//! [`fixture`], the one place that turns throw-away keys into a running stand-in and a
//! `proxy.toml` for the proxy in front of it (for `demo`, the tests, soak and benchmarks).
#![forbid(unsafe_code)]

mod body;
mod developer;
mod exchange;
mod fault;
pub mod fixture;
pub mod in_app;
mod oauth;
pub mod oidc;
mod tls;
mod verify;

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

pub use body::pattern_byte;
pub use oauth::TokenEndpoint;

use exchange::{lock, Shared};
use verify::Keyring;

/// App Store Connect's 401 body, identical for every cause (APPLE.md §3).
pub const APP_STORE_CONNECT_NOT_AUTHORIZED_BODY: &str = r#"{"errors":[{"status":"401","code":"NOT_AUTHORIZED","title":"Authentication credentials are missing or invalid.","detail":"Provide a properly configured and signed bearer token, and make sure that it has not expired. Learn more about Generating Tokens for API Requests https://developer.apple.com/go/?id=api-generating-tokens"}]}"#;
/// App Store Connect's 403 when the API key may not make the request, e.g. an Individual
/// key on Provisioning, Sales and Finance or Notary (APPLE.md §3 "403 variants seen",
/// `FORBIDDEN_ERROR`; §5 "Individual key used for Provisioning, Sales/Finance or Notary").
pub const APP_STORE_CONNECT_FORBIDDEN_BODY: &str = r#"{"errors":[{"status":"403","code":"FORBIDDEN_ERROR","title":"This request is forbidden for security reasons","detail":"The API key in use does not allow this request"}]}"#;
/// App Store Connect's 403 while the Account Holder has not accepted the latest Program
/// License Agreement (APPLE.md §3 "403 variants seen", `FORBIDDEN` / "Access Unavailable",
/// detail as quoted in myappcloud/appstore-connect-api#3; §5 "Agreement not accepted").
/// Apple's App Store Server 404 for an unknown transaction id (APPLE.md §3).
pub const TRANSACTION_NOT_FOUND_BODY: &str =
    r#"{"errorCode":4040010,"errorMessage":"Transaction id not found."}"#;

pub const AGREEMENT_PENDING_BODY: &str = r#"{"errors":[{"status":"403","code":"FORBIDDEN","title":"Access Unavailable","detail":"You currently don't have access to this resource. To resolve this issue, the Account Holder must agree to the latest Program License Agreement in their account on the Apple Developer website. https://developer.apple.com/account"}]}"#;
/// App Store Connect's rate-limit header (APPLE.md §4), sent on successful responses.
pub const RATE_LIMIT_HEADER: &str = "x-rate-limit";
/// The stand-in's `user-hour-lim`; `user-hour-rem` counts down from it per key.
pub const RATE_LIMIT_PER_HOUR: u32 = 3600;
/// Apple's per-response request identifier (APPLE.md §3), on every stand-in response.
pub const REQUEST_UUID_HEADER: &str = "x-apple-request-uuid";
/// Query parameter asking for a generated `application/octet-stream` body of N bytes
/// (see [`pattern_byte`]) instead of the JSON echo.
pub const STANDIN_BYTES_PARAM: &str = "standin_bytes";
/// Query parameter asking the stand-in to wait this many milliseconds (at most
/// [`STANDIN_DELAY_MAX_MS`]) after receiving a request before it answers: a slow Apple, for
/// clients that hang up before the response head. Not an Apple parameter.
pub const STANDIN_DELAY_PARAM: &str = "standin_delay_ms";
pub const STANDIN_DELAY_MAX_MS: u64 = 30_000;
/// The largest `standin_bytes` accepted: 8 GiB.
pub const STANDIN_BYTES_MAX: u64 = 8 << 30;

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 receive windows large enough that a 1 GiB upload is not throttled by flow
/// control on loopback.
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONNECTION_WINDOW: u32 = 8 << 20;

/// Which Apple service a listener plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `api.appstoreconnect.apple.com` (`/v<N>/…`) and Notary (`/notary/…`).
    AppStoreConnect,
    /// `api.storekit.apple.com`.
    StoreKitProduction,
    /// `api.storekit-sandbox.apple.com`.
    StoreKitSandbox,
    /// `api.push.apple.com`: HTTP/2 only (ALPN `h2`), APNs' token rules per connection.
    Apns,
    /// `api.sandbox.push.apple.com`.
    ApnsDevelopment,
    /// `api.devicecheck.apple.com`.
    DeviceCheck,
    /// `api.development.devicecheck.apple.com`.
    DeviceCheckDevelopment,
    /// `data.appattest.apple.com`.
    AppAttest,
    /// `data-development.appattest.apple.com`.
    AppAttestDevelopment,
    /// `weatherkit.apple.com`.
    WeatherKit,
    /// `api.music.apple.com`.
    AppleMusic,
    /// `maps-api.apple.com`: `/v1/token` and the API.
    Maps,
    /// `account.apple.com`: Apple Business/School Manager's token endpoint.
    AccountToken,
    /// `api-business.apple.com`.
    AppleBusiness,
    /// `api-school.apple.com`.
    AppleSchool,
    /// `appleid.apple.com`: Sign in with Apple's token endpoints.
    SignInWithApple,
}

impl Role {
    /// Every role, in listener order.
    pub const ALL: [Role; 16] = [
        Role::AppStoreConnect,
        Role::StoreKitProduction,
        Role::StoreKitSandbox,
        Role::Apns,
        Role::ApnsDevelopment,
        Role::DeviceCheck,
        Role::DeviceCheckDevelopment,
        Role::AppAttest,
        Role::AppAttestDevelopment,
        Role::WeatherKit,
        Role::AppleMusic,
        Role::Maps,
        Role::AccountToken,
        Role::AppleBusiness,
        Role::AppleSchool,
        Role::SignInWithApple,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::AppStoreConnect => "app-store-connect",
            Role::StoreKitProduction => "app-store-server-production",
            Role::StoreKitSandbox => "app-store-server-sandbox",
            Role::Apns => "apns-production",
            Role::ApnsDevelopment => "apns-development",
            Role::DeviceCheck => "devicecheck-production",
            Role::DeviceCheckDevelopment => "devicecheck-development",
            Role::AppAttest => "app-attest-production",
            Role::AppAttestDevelopment => "app-attest-development",
            Role::WeatherKit => "weatherkit",
            Role::AppleMusic => "apple-music",
            Role::Maps => "maps",
            Role::AccountToken => "account-token",
            Role::AppleBusiness => "apple-business",
            Role::AppleSchool => "apple-school",
            Role::SignInWithApple => "sign-in-with-apple",
        }
    }

    fn index(self) -> usize {
        Role::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// APNs speaks HTTP/2 only.
    fn http2_only(self) -> bool {
        matches!(self, Role::Apns | Role::ApnsDevelopment)
    }
}

/// What kind of Apple key a [`KnownKey`] is, which decides where it is accepted
/// (APPLE.md §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KnownKeyKind {
    /// App Store Connect team key: `iss` must be `issuer_id`, no `sub`.
    Team { issuer_id: String },
    /// App Store Connect individual key: `sub` must be `"user"`, no `iss`.
    Individual,
    /// In-App Purchase key (App Store Server API only): `iss` must be `issuer_id` and
    /// `bid` one of `bundle_ids` (case-sensitive).
    InAppPurchase {
        issuer_id: String,
        bundle_ids: Vec<String>,
    },
    /// Apple Developer account key (APNs, DeviceCheck, App Attest, WeatherKit, Music):
    /// `iss` must be `team_id`; WeatherKit's `sub` must be `service_id`.
    Developer {
        team_id: String,
        service_id: Option<String>,
    },
    /// Apple Business / School Manager API key: assertions' `iss` and `sub` must be
    /// `client_id`; its key id is a UUID.
    BusinessManager { client_id: String },
}

/// A key the stand-in trusts: the public half only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownKey {
    pub key_id: String,
    /// Uncompressed SEC1 point, 65 bytes `0x04 || X || Y`.
    pub public_key: Vec<u8>,
    pub kind: KnownKeyKind,
}

/// How to start a stand-in.
#[derive(Debug, Default)]
pub struct Options {
    pub keys: Vec<KnownKey>,
    /// Seconds added to the stand-in's own clock: it is the clock it checks iat/exp against AND the one it reports in every response's `Date` header. Negative = Apple's clock is behind the host's (so a token's iat looks "in the future").
    pub clock_offset_secs: i64,
    /// Ways Apple refuses tokens its JWT rules accept; all off by default. Change them on a
    /// running stand-in with [`Standin::set_faults`].
    pub faults: Faults,
    /// The client ids Sign in with Apple knows, each with the key id configured to sign its
    /// `client_secret` (its `sub` must be the client id, its `kid` that key).
    pub sign_in_clients: Vec<(String, String)>,
}

/// Fault modes reproducing the causes of Apple 401s and 403s that a token's claims alone
/// don't explain (APPLE.md §3, §5). All default to off.
///
/// A bad token is always a plain 401 first. For a token that verifies, the faults apply
/// in this order: revoked, transient, unreleased (production App Store Server only),
/// Individual key forbidden (always on, App Store Connect only), agreement pending (App
/// Store Connect only). Which one answered is recorded in [`Received::fault`].
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Key ids Apple treats as revoked: tokens that otherwise verify get 401 — App Store
    /// Connect's exact NOT_AUTHORIZED body on that role, an empty body on the storekit roles.
    pub revoked_key_ids: Vec<String>,
    /// Bundle ids with no release in production yet: the StoreKitProduction role answers 401
    /// with an EMPTY body for tokens with that `bid` (APPLE.md §0, forum 806452); the sandbox
    /// role serves them normally.
    pub unreleased_bundle_ids: Vec<String>,
    /// Every otherwise-accepted App Store Connect request (Notary included) gets 403 with
    /// [`AGREEMENT_PENDING_BODY`].
    pub agreement_pending: bool,
    /// The next N requests that would be accepted (any role) get a 401 instead (Apple's
    /// transient 401s), then behaviour is normal. Requests refused for another reason, and
    /// unknown paths, don't use one up.
    pub transient_401s: u32,
    /// Scope matching compares the request's raw query bytes with the scope entry's query
    /// bytes (after dropping limit/cursor/sort, order-insensitive on '&'-separated pairs),
    /// WITHOUT percent-decoding — so a scope with literal `[`/`]` does not match a request
    /// sent with `%5B`/`%5D`. Models Apple's unconfirmed strict reading (APPLE.md §2).
    pub strict_scope_encoding: bool,
    /// App Store Connect path prefixes the keys' role does not allow: otherwise-accepted
    /// requests under them get 403 FORBIDDEN_ERROR (a role lacking a permission).
    pub role_forbidden_paths: Vec<String>,
    /// Transaction ids that exist only in sandbox: on the StoreKitProduction role, an
    /// otherwise-accepted request whose path has one as a segment gets Apple's 404
    /// `{"errorCode":4040010,"errorMessage":"Transaction id not found."}`.
    pub sandbox_only_transactions: Vec<String>,
    /// Apple's JSON error bodies (401, 403 and 404) are padded with trailing spaces to at
    /// least this many bytes (still valid JSON): a body larger than a reader's bound.
    pub error_padding: usize,
    /// Apple's JSON error bodies are sent gzip-compressed (`Content-Encoding: gzip`) to
    /// requests whose `Accept-Encoding` allows it, as a CDN in front of Apple may.
    pub compress_errors: bool,
    /// APNs answers every otherwise-accepted push with this status and `{"reason": …}`
    /// (e.g. `(403, "InvalidProviderToken")`, `(410, "Unregistered")`).
    pub apns_reason: Option<(u16, String)>,
}

/// One request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub role: Role,
    pub method: String,
    /// Exactly as received on the wire.
    pub path_and_query: String,
    /// So tests can assert HTTP/2 via ALPN.
    pub version: http::Version,
    /// All request headers as received.
    pub headers: http::HeaderMap,
    /// Request body bytes read (streamed and counted, not kept).
    pub body_len: u64,
    /// Did the token verify by Apple's rules? `Err` is a human-readable reason it was
    /// rejected (never the token). A token refused by a fault below may still be `Ok`.
    pub verdict: Result<VerifiedToken, String>,
    /// The [`Faults`] mode that produced the answer, if one did: `"revoked"`,
    /// `"transient"`, `"unreleased"`, `"individual_forbidden"` (always on), `"agreement"`,
    /// or `"strict_scope_encoding"` (the scope would have matched after percent-decoding;
    /// `verdict` is then `Err`).
    pub fault: Option<&'static str>,
    /// Which TCP connection it came on: a number per accepted connection, in order.
    pub connection: u64,
}

/// A token that passed every check: its decoded header and claims.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
}

/// A running stand-in. Dropping it stops the listeners too; [`Standin::shutdown`] also
/// waits for them.
#[derive(Debug)]
pub struct Standin {
    addrs: Vec<SocketAddr>,
    ca_pem: String,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
}

impl Standin {
    /// Binds three TLS listeners on 127.0.0.1:0, one per role, and serves until shutdown.
    pub async fn start(opts: Options) -> std::io::Result<Standin> {
        let keyring = Keyring::new(opts.keys)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let authority = tls::Authority::generate().map_err(std::io::Error::other)?;
        let http2_acceptor = {
            let mut config = (*authority.server_config).clone();
            config.alpn_protocols = vec![b"h2".to_vec()];
            TlsAcceptor::from(Arc::new(config))
        };
        let acceptor = TlsAcceptor::from(authority.server_config);
        let shared = Arc::new(Shared::new(
            keyring,
            opts.clock_offset_secs,
            opts.faults,
            opts.sign_in_clients,
        ));
        let (stop, stopped) = watch::channel(false);

        let mut addrs = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, 0)); Role::ALL.len()];
        let mut listeners = Vec::with_capacity(Role::ALL.len());
        for role in Role::ALL {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            addrs[role.index()] = listener.local_addr()?;
            listeners.push(tokio::spawn(accept_loop(
                listener,
                role,
                if role.http2_only() {
                    http2_acceptor.clone()
                } else {
                    acceptor.clone()
                },
                Arc::clone(&shared),
                stopped.clone(),
            )));
        }

        Ok(Standin {
            addrs,
            ca_pem: authority.ca_pem,
            shared,
            stop,
            listeners,
        })
    }

    /// `https://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self, role: Role) -> String {
        format!("https://{}", self.addrs[role.index()])
    }

    /// The throw-away CA certificate (PEM) that signed the listeners' certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// How many different tokens signed by `key_id` the developer-key roles have seen.
    pub fn distinct_tokens(&self, key_id: &str) -> usize {
        self.shared.developer_seen.count(key_id)
    }

    /// Changes how the token endpoints (Maps' `/v1/token`, the account token endpoint)
    /// answer from the next exchange on.
    pub fn set_token_endpoint(&self, endpoint: TokenEndpoint) {
        *lock(&self.shared.oauth.endpoint) = endpoint;
    }

    /// Exchanges answered with an access token for the API `role` plays (Maps, Apple
    /// Business, Apple School).
    pub fn exchanges(&self, role: Role) -> u32 {
        lock(&self.shared.oauth.exchanges)
            .get(&role)
            .copied()
            .unwrap_or(0)
    }

    /// Requests to the token endpoints, whatever their answer.
    pub fn exchange_attempts(&self) -> u32 {
        *lock(&self.shared.oauth.attempts)
    }

    /// Every access token issued so far stops working, as if Apple revoked them.
    pub fn revoke_access_tokens(&self) {
        self.shared.oauth.revoke_all();
    }

    /// The Sign in with Apple forms received, raw, each with whether an `Authorization`
    /// header came with it.
    pub fn sign_in_forms(&self) -> Vec<(String, bool)> {
        lock(&self.shared.oauth.forms).clone()
    }

    /// Everything received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.shared.received).clone()
    }

    pub fn clear_received(&self) {
        lock(&self.shared.received).clear();
    }

    /// Replaces the fault modes of the running stand-in; requests already being answered
    /// keep the old ones. The transient-401 budget restarts at `faults.transient_401s`.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// The fault modes in force now (the transient budget as configured, not what is left).
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Stops the listeners and ends their connection tasks, then waits for them.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        for listener in std::mem::take(&mut self.listeners) {
            if let Err(error) = listener.await {
                tracing::debug!(%error, "stand-in listener task ended abnormally");
            }
        }
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Accepts connections until told to stop; stopping aborts every connection task.
async fn accept_loop(
    listener: TcpListener,
    role: Role,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // Also ends the loop if the `Standin` is gone.
            () = stop_requested(&mut stopped) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(serve_connection(
                        tcp,
                        peer,
                        role,
                        acceptor.clone(),
                        Arc::clone(&shared),
                    ));
                }
                Err(error) => {
                    tracing::debug!(role = role.as_str(), %error, "stand-in accept failed");
                    // Out of file descriptors and the like: don't spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

/// Resolves once a stop is requested or the `Standin` is gone. (The `watch::Ref` that
/// `wait_for` yields is dropped here, so it is never held across an await.)
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await.map(|_| ());
}

/// Numbers the accepted connections ([`Received::connection`]).
static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// TLS handshake, then HTTP/1.1 or HTTP/2 (whichever the client speaks) until the client
/// hangs up or the task is aborted.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    role: Role,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) {
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(role = role.as_str(), %peer, %error, "stand-in TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(role = role.as_str(), %peer, "stand-in TLS handshake timed out");
            return;
        }
    };

    // APNs binds each connection to a key and limits token changes on it.
    let id = CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let connection = Arc::new(std::sync::Mutex::new(developer::Connection::new(id)));
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        let connection = Arc::clone(&connection);
        async move {
            Ok::<_, Infallible>(if developer::serves(role) {
                developer::handle(&shared, role, &connection, request).await
            } else if oauth::serves(role) {
                oauth::handle(&shared, role, request).await
            } else {
                exchange::handle(&shared, role, id, request).await
            })
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .auto_date_header(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .auto_date_header(false)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW);
    let served = if role.http2_only() {
        builder
            .http2_only()
            .serve_connection(TokioIo::new(tls), service)
            .await
    } else {
        builder.serve_connection(TokioIo::new(tls), service).await
    };
    if let Err(error) = served {
        tracing::debug!(role = role.as_str(), %peer, %error, "stand-in connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use bytes::Bytes;
    use http::{Request, StatusCode, Version};
    use http_body_util::{BodyExt as _, Full};
    use hyper::client::conn::{http1, http2};
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::{Signature, SigningKey};
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};
    use serde_json::{json, Value};
    use tokio_rustls::TlsConnector;

    const ISSUER: &str = "57246542-96fe-1a63-e053-0824d011072a";
    const OFFSET: i64 = -30;

    fn unix_now() -> i64 {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the host clock is after 1970");
        i64::try_from(since.as_secs()).expect("seconds fit in i64")
    }

    /// Test-only ES256 signer (RustCrypto, never `ring`).
    fn team_token(key: &SigningKey) -> String {
        let now = unix_now();
        let header = json!({"alg": "ES256", "kid": "TEAMKEY001", "typ": "JWT"});
        let claims =
            json!({"iss": ISSUER, "iat": now - 60, "exp": now + 600, "aud": "appstoreconnect-v1"});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature: Signature = key.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    async fn tls_to(
        standin: &Standin,
        role: Role,
        alpn: &[u8],
    ) -> TokioIo<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                CertificateDer::from_pem_slice(standin.ca_pem().as_bytes()).expect("CA PEM parses"),
            )
            .expect("CA is a valid trust anchor");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let addr = standin.addrs[role.index()];
        let tcp = TcpStream::connect(addr)
            .await
            .expect("stand-in is listening");
        let name = ServerName::try_from("127.0.0.1").expect("an IP address is a server name");
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("the certificate is valid for 127.0.0.1 under the throw-away CA");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        TokioIo::new(tls)
    }

    fn header<'a>(response: &'a http::Response<hyper::body::Incoming>, name: &str) -> &'a str {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("response lacks {name}"))
    }

    #[tokio::test]
    async fn standin_serves_h2_and_h1_and_answers_like_apple() {
        let key = SigningKey::from_slice(&[7; 32]).expect("valid test scalar");
        let standin = Standin::start(Options {
            keys: vec![KnownKey {
                key_id: "TEAMKEY001".into(),
                public_key: key
                    .verifying_key()
                    .to_encoded_point(false)
                    .as_bytes()
                    .to_vec(),
                kind: KnownKeyKind::Team {
                    issuer_id: ISSUER.into(),
                },
            }],
            clock_offset_secs: OFFSET,
            ..Options::default()
        })
        .await
        .expect("stand-in starts");
        let asc = standin.url(Role::AppStoreConnect);
        assert!(asc.starts_with("https://127.0.0.1:") && !asc.ends_with('/'));

        // HTTP/2 to App Store Connect: no token, then a good one.
        let (mut h2, conn) = http2::handshake(
            TokioExecutor::new(),
            tls_to(&standin, Role::AppStoreConnect, b"h2").await,
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let uri = format!("{asc}/v1/apps?filter%5Bplatform%5D=IOS");
        let request = Request::get(&uri)
            .body(Full::<Bytes>::default())
            .expect("valid request");
        let response = h2.send_request(request).await.expect("401 arrives");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(header(&response, "content-type"), "application/json");
        let date = httpdate::parse_http_date(header(&response, "date")).expect("IMF-fixdate");
        let date = i64::try_from(
            date.duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs(),
        )
        .expect("fits");
        assert!(
            (date - (unix_now() + OFFSET)).abs() <= 5,
            "Date follows the offset clock"
        );
        assert_eq!(header(&response, REQUEST_UUID_HEADER).len(), 36);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, APP_STORE_CONNECT_NOT_AUTHORIZED_BODY.as_bytes());

        let request = Request::get(&uri)
            .header("authorization", format!("Bearer {}", team_token(&key)))
            .body(Full::<Bytes>::default())
            .expect("valid request");
        let response = h2.send_request(request).await.expect("200 arrives");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, RATE_LIMIT_HEADER),
            "user-hour-lim:3600;user-hour-rem:3599;"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let echo: Value = serde_json::from_slice(&body).expect("JSON echo");
        assert_eq!(
            echo,
            json!({"data": {"type": "standin", "role": "app-store-connect", "method": "GET",
                "path": "/v1/apps", "query": "filter%5Bplatform%5D=IOS", "bytes_received": 0}})
        );

        // HTTP/1.1 to the same role: a streamed download and an upload that is only counted.
        let (mut h1, conn) =
            http1::handshake(tls_to(&standin, Role::AppStoreConnect, b"http/1.1").await)
                .await
                .expect("h1 handshake");
        tokio::spawn(conn);
        let len = 200_000u64;
        let request = Request::post(format!("/notary/v2/submissions?standin_bytes={len}"))
            .header("host", "127.0.0.1")
            .header("authorization", format!("Bearer {}", team_token(&key)))
            .body(Full::new(Bytes::from_static(&[1; 1000])))
            .expect("valid request");
        let response = h1.send_request(request).await.expect("200 arrives");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "content-type"),
            "application/octet-stream"
        );
        assert_eq!(header(&response, "content-length"), len.to_string());
        assert_eq!(
            header(&response, RATE_LIMIT_HEADER),
            "user-hour-lim:3600;user-hour-rem:3598;"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body.len() as u64, len);
        assert!(body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i as u64)));

        // A StoreKit listener: unknown path is an empty 404, a missing token an empty 401.
        let (mut sk, conn) = http2::handshake(
            TokioExecutor::new(),
            tls_to(&standin, Role::StoreKitSandbox, b"h2").await,
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let base = standin.url(Role::StoreKitSandbox);
        for (path, status) in [
            ("/v1/apps", StatusCode::NOT_FOUND),
            ("/inApps/v1/transactions/1", StatusCode::UNAUTHORIZED),
        ] {
            let request = Request::get(format!("{base}{path}"))
                .body(Full::<Bytes>::default())
                .expect("valid request");
            let response = sk.send_request(request).await.expect("answer arrives");
            assert_eq!(response.status(), status, "{path}");
            assert!(response.headers().contains_key(REQUEST_UUID_HEADER));
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            assert!(body.is_empty(), "{path}");
        }

        let received = standin.received();
        let summary: Vec<_> = received
            .iter()
            .map(|r| {
                (
                    r.role,
                    r.method.as_str(),
                    r.path_and_query.as_str(),
                    r.version,
                    r.body_len,
                    r.verdict.is_ok(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    Role::AppStoreConnect,
                    "GET",
                    "/v1/apps?filter%5Bplatform%5D=IOS",
                    Version::HTTP_2,
                    0,
                    false
                ),
                (
                    Role::AppStoreConnect,
                    "GET",
                    "/v1/apps?filter%5Bplatform%5D=IOS",
                    Version::HTTP_2,
                    0,
                    true
                ),
                (
                    Role::AppStoreConnect,
                    "POST",
                    "/notary/v2/submissions?standin_bytes=200000",
                    Version::HTTP_11,
                    1000,
                    true
                ),
                (
                    Role::StoreKitSandbox,
                    "GET",
                    "/v1/apps",
                    Version::HTTP_2,
                    0,
                    false
                ),
                (
                    Role::StoreKitSandbox,
                    "GET",
                    "/inApps/v1/transactions/1",
                    Version::HTTP_2,
                    0,
                    false
                ),
            ]
        );
        assert_eq!(
            received[0].verdict.as_ref().err().map(String::as_str),
            Some("no Authorization header")
        );
        let token = received[1].verdict.as_ref().expect("accepted");
        assert_eq!(token.claims["iss"], ISSUER);
        assert!(received[1].headers.contains_key("authorization"));
        standin.clear_received();
        assert!(standin.received().is_empty());

        let addr = standin.addrs[0];
        standin.shutdown().await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener is closed after shutdown"
        );
    }

    // ---- Fault modes (APPLE.md §3, §5) ----

    const TEAM_KID: &str = "TEAMKEY001";
    const INDIVIDUAL_KID: &str = "INDIVKEY01";
    const IAP_KID: &str = "IAPKEY0001";
    const BUNDLE: &str = "com.example.App";
    const UNRELEASED: &str = "com.example.Unreleased";

    fn fault_key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).expect("valid test scalar")
    }

    /// Test-only ES256 signer (RustCrypto, never `ring`).
    fn sign(kid: &str, seed: u8, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature: Signature = fault_key(seed).sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    fn team(scope: Option<&str>) -> String {
        let now = unix_now();
        let mut claims =
            json!({"iss": ISSUER, "iat": now - 60, "exp": now + 600, "aud": "appstoreconnect-v1"});
        if let Some(scope) = scope {
            claims["scope"] = json!([scope]);
        }
        sign(TEAM_KID, 11, &claims)
    }

    fn individual() -> String {
        let now = unix_now();
        let claims =
            json!({"sub": "user", "iat": now - 60, "exp": now + 600, "aud": "appstoreconnect-v1"});
        sign(INDIVIDUAL_KID, 12, &claims)
    }

    fn iap(bid: &str) -> String {
        let now = unix_now();
        let claims = json!({"iss": ISSUER, "iat": now - 60, "exp": now + 300,
            "aud": "appstoreconnect-v1", "bid": bid});
        sign(IAP_KID, 13, &claims)
    }

    async fn fault_standin(faults: Faults) -> Standin {
        let public = |seed| {
            fault_key(seed)
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec()
        };
        Standin::start(Options {
            keys: vec![
                KnownKey {
                    key_id: TEAM_KID.into(),
                    public_key: public(11),
                    kind: KnownKeyKind::Team {
                        issuer_id: ISSUER.into(),
                    },
                },
                KnownKey {
                    key_id: INDIVIDUAL_KID.into(),
                    public_key: public(12),
                    kind: KnownKeyKind::Individual,
                },
                KnownKey {
                    key_id: IAP_KID.into(),
                    public_key: public(13),
                    kind: KnownKeyKind::InAppPurchase {
                        issuer_id: ISSUER.into(),
                        bundle_ids: vec![BUNDLE.into(), UNRELEASED.into()],
                    },
                },
            ],
            clock_offset_secs: OFFSET,
            faults,
            sign_in_clients: Vec::new(),
        })
        .await
        .expect("stand-in starts")
    }

    /// One request over a fresh HTTP/1.1 connection. Every answer must carry Apple's `Date`
    /// (offset clock) and `x-apple-request-uuid`, faults included.
    async fn call(
        standin: &Standin,
        role: Role,
        method: &str,
        target: &str,
        token: Option<&str>,
    ) -> (StatusCode, Bytes) {
        let (mut h1, conn) = http1::handshake(tls_to(standin, role, b"http/1.1").await)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(target)
            .header("host", "127.0.0.1");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Full::<Bytes>::default())
            .expect("valid request");
        let response = h1.send_request(request).await.expect("answer arrives");
        let status = response.status();
        let date = httpdate::parse_http_date(header(&response, "date")).expect("IMF-fixdate");
        let date = date
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let date = i64::try_from(date).expect("fits");
        assert!(
            (date - (unix_now() + OFFSET)).abs() <= 5,
            "{target}: Date follows the offset clock"
        );
        assert_eq!(header(&response, REQUEST_UUID_HEADER).len(), 36, "{target}");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, body)
    }

    /// The `fault` and verdict of the last request received.
    fn last(standin: &Standin) -> (Option<&'static str>, Result<VerifiedToken, String>) {
        let received = standin.received();
        let last = received.last().expect("a request was recorded");
        (last.fault, last.verdict.clone())
    }

    const ASC_401: &[u8] = APP_STORE_CONNECT_NOT_AUTHORIZED_BODY.as_bytes();
    const TRANSACTION: &str = "/inApps/v1/transactions/2000000123456789";

    #[tokio::test]
    async fn revoked_key_gets_apples_401_on_every_role() {
        let standin = fault_standin(Faults {
            revoked_key_ids: vec![TEAM_KID.into(), IAP_KID.into()],
            ..Faults::default()
        })
        .await;
        let (status, body) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            "/v1/apps",
            Some(&team(None)),
        )
        .await;
        assert_eq!((status, &body[..]), (StatusCode::UNAUTHORIZED, ASC_401));
        let (fault, verdict) = last(&standin);
        assert_eq!(fault, Some("revoked"));
        assert!(verdict.is_ok(), "the token itself verifies");

        for role in [Role::StoreKitProduction, Role::StoreKitSandbox] {
            let (status, body) = call(&standin, role, "GET", TRANSACTION, Some(&iap(BUNDLE))).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{role:?}");
            assert!(body.is_empty(), "{role:?}");
            assert_eq!(last(&standin).0, Some("revoked"));
        }

        // Another key is unaffected; a bad token is a plain 401, not "revoked".
        let (status, _) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            "/v1/apps",
            Some(&individual()),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(last(&standin).0, None);
        let (status, body) = call(&standin, Role::AppStoreConnect, "GET", "/v1/apps", None).await;
        assert_eq!((status, &body[..]), (StatusCode::UNAUTHORIZED, ASC_401));
        let (fault, verdict) = last(&standin);
        assert_eq!(fault, None);
        assert_eq!(verdict.err().as_deref(), Some("no Authorization header"));
    }

    #[tokio::test]
    async fn transient_401s_fail_the_next_n_accepted_requests_then_clear() {
        let standin = fault_standin(Faults {
            transient_401s: 2,
            ..Faults::default()
        })
        .await;
        let token = team(None);
        // Neither a bad token nor an unknown path uses one up.
        let (status, _) = call(&standin, Role::AppStoreConnect, "GET", "/v1/apps", None).await;
        assert_eq!((status, last(&standin).0), (StatusCode::UNAUTHORIZED, None));
        let (status, _) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            "/nope",
            Some(&token),
        )
        .await;
        assert_eq!((status, last(&standin).0), (StatusCode::NOT_FOUND, None));

        let (status, body) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            "/v1/apps",
            Some(&token),
        )
        .await;
        assert_eq!((status, &body[..]), (StatusCode::UNAUTHORIZED, ASC_401));
        assert_eq!(last(&standin).0, Some("transient"));
        let (status, body) = call(
            &standin,
            Role::StoreKitSandbox,
            "GET",
            TRANSACTION,
            Some(&iap(BUNDLE)),
        )
        .await;
        assert_eq!((status, body.is_empty()), (StatusCode::UNAUTHORIZED, true));
        assert_eq!(last(&standin).0, Some("transient"));

        // The same token now works: the fault has cleared.
        let (status, _) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            "/v1/apps",
            Some(&token),
        )
        .await;
        assert_eq!((status, last(&standin).0), (StatusCode::OK, None));
        let (status, _) = call(
            &standin,
            Role::StoreKitSandbox,
            "GET",
            TRANSACTION,
            Some(&iap(BUNDLE)),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn unreleased_bundle_gets_an_empty_401_in_production_only() {
        let standin = fault_standin(Faults {
            unreleased_bundle_ids: vec![UNRELEASED.into()],
            ..Faults::default()
        })
        .await;
        let token = iap(UNRELEASED);
        let (status, body) = call(
            &standin,
            Role::StoreKitProduction,
            "GET",
            TRANSACTION,
            Some(&token),
        )
        .await;
        assert_eq!((status, body.is_empty()), (StatusCode::UNAUTHORIZED, true));
        let (fault, verdict) = last(&standin);
        assert_eq!(fault, Some("unreleased"));
        assert_eq!(verdict.expect("verifies").claims["bid"], UNRELEASED);

        let (status, _) = call(
            &standin,
            Role::StoreKitSandbox,
            "GET",
            TRANSACTION,
            Some(&token),
        )
        .await;
        assert_eq!((status, last(&standin).0), (StatusCode::OK, None));
        let (status, _) = call(
            &standin,
            Role::StoreKitProduction,
            "GET",
            TRANSACTION,
            Some(&iap(BUNDLE)),
        )
        .await;
        assert_eq!((status, last(&standin).0), (StatusCode::OK, None));
    }

    #[tokio::test]
    async fn individual_key_is_forbidden_provisioning_reports_and_notary() {
        // Always on: no fault needs setting.
        let standin = fault_standin(Faults::default()).await;
        let forbidden = APP_STORE_CONNECT_FORBIDDEN_BODY.as_bytes();
        for (method, target) in [
            ("GET", "/v1/bundleIds"),
            ("POST", "/v1/certificates"),
            ("GET", "/v1/devices?limit=200"),
            ("GET", "/v1/profiles/ABC/devices"),
            ("POST", "/v1/bundleIdCapabilities"),
            ("GET", "/v1/salesReports?filter%5BreportType%5D=SALES"),
            ("GET", "/v1/financeReports"),
            ("POST", "/notary/v2/submissions"),
        ] {
            let (status, body) = call(
                &standin,
                Role::AppStoreConnect,
                method,
                target,
                Some(&individual()),
            )
            .await;
            assert_eq!(
                (status, &body[..]),
                (StatusCode::FORBIDDEN, forbidden),
                "{target}"
            );
            let (fault, verdict) = last(&standin);
            assert_eq!(fault, Some("individual_forbidden"), "{target}");
            assert!(verdict.is_ok(), "{target}");
        }
        let (status, _) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            "/v1/apps",
            Some(&individual()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "other resources are allowed");
        let (status, _) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            "/v1/salesReports",
            Some(&team(None)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "team keys are allowed");
    }

    #[tokio::test]
    async fn agreement_pending_forbids_app_store_connect_only() {
        let standin = fault_standin(Faults {
            agreement_pending: true,
            ..Faults::default()
        })
        .await;
        let body_json: Value = serde_json::from_str(AGREEMENT_PENDING_BODY).expect("JSON");
        assert_eq!(body_json["errors"][0]["code"], "FORBIDDEN");
        for target in ["/v1/apps", "/notary/v2/submissions"] {
            let (status, body) = call(
                &standin,
                Role::AppStoreConnect,
                "GET",
                target,
                Some(&team(None)),
            )
            .await;
            assert_eq!(
                (status, &body[..]),
                (StatusCode::FORBIDDEN, AGREEMENT_PENDING_BODY.as_bytes()),
                "{target}"
            );
            assert_eq!(last(&standin).0, Some("agreement"));
        }
        // A bad token is still a 401; an individual key on reports still its own 403.
        let (status, body) = call(&standin, Role::AppStoreConnect, "GET", "/v1/apps", None).await;
        assert_eq!((status, &body[..]), (StatusCode::UNAUTHORIZED, ASC_401));
        let (status, body) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            "/v1/financeReports",
            Some(&individual()),
        )
        .await;
        assert_eq!(
            (status, &body[..]),
            (
                StatusCode::FORBIDDEN,
                APP_STORE_CONNECT_FORBIDDEN_BODY.as_bytes()
            )
        );
        // The App Store Server API is not affected.
        let (status, _) = call(
            &standin,
            Role::StoreKitProduction,
            "GET",
            TRANSACTION,
            Some(&iap(BUNDLE)),
        )
        .await;
        assert_eq!((status, last(&standin).0), (StatusCode::OK, None));
    }

    #[tokio::test]
    async fn strict_scope_encoding_refuses_a_bracket_scope_sent_encoded() {
        let standin = fault_standin(Faults::default()).await;
        let target = "/v1/apps?filter%5Bplatform%5D=IOS&limit=200";
        let bracketed = team(Some("GET /v1/apps?filter[platform]=IOS"));
        let encoded = team(Some("GET /v1/apps?filter%5Bplatform%5D=IOS"));
        let (status, _) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            target,
            Some(&bracketed),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "the default reading decodes both");

        standin.set_faults(Faults {
            strict_scope_encoding: true,
            ..Faults::default()
        });
        let (status, body) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            target,
            Some(&bracketed),
        )
        .await;
        assert_eq!((status, &body[..]), (StatusCode::UNAUTHORIZED, ASC_401));
        let (fault, verdict) = last(&standin);
        assert_eq!(fault, Some("strict_scope_encoding"));
        let reason = verdict.expect_err("the strict reading refuses the token");
        assert!(reason.contains("encoding"), "{reason}");

        let (status, _) = call(
            &standin,
            Role::AppStoreConnect,
            "GET",
            target,
            Some(&encoded),
        )
        .await;
        assert_eq!((status, last(&standin).0), (StatusCode::OK, None));
        let other = team(Some("GET /v1/apps?filter%5Bplatform%5D=MAC_OS"));
        let (status, _) = call(&standin, Role::AppStoreConnect, "GET", target, Some(&other)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (fault, verdict) = last(&standin);
        assert_eq!(fault, None, "a plain scope mismatch is no encoding fault");
        assert!(verdict
            .expect_err("refused")
            .contains("strict scope encoding"));
    }

    #[tokio::test]
    async fn set_faults_changes_a_running_standin() {
        let standin = fault_standin(Faults::default()).await;
        let token = team(None);
        let get = || {
            call(
                &standin,
                Role::AppStoreConnect,
                "GET",
                "/v1/apps",
                Some(&token),
            )
        };
        assert_eq!(get().await.0, StatusCode::OK);

        standin.set_faults(Faults {
            revoked_key_ids: vec![TEAM_KID.into()],
            transient_401s: 1,
            ..Faults::default()
        });
        assert_eq!(standin.faults().revoked_key_ids, [TEAM_KID]);
        for _ in 0..2 {
            assert_eq!(get().await.0, StatusCode::UNAUTHORIZED);
            assert_eq!(
                last(&standin).0,
                Some("revoked"),
                "revoked spends no transient"
            );
        }

        // Replacing the faults restarts the transient budget from the new value.
        let mut faults = standin.faults();
        faults.revoked_key_ids.clear();
        faults.transient_401s = 1;
        standin.set_faults(faults.clone());
        assert_eq!(get().await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(last(&standin).0, Some("transient"));
        assert_eq!(get().await.0, StatusCode::OK);
        standin.set_faults(faults);
        assert_eq!(get().await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(get().await.0, StatusCode::OK);

        faults = Faults {
            agreement_pending: true,
            ..Faults::default()
        };
        standin.set_faults(faults);
        assert_eq!(get().await.0, StatusCode::FORBIDDEN);
        standin.set_faults(Faults::default());
        assert_eq!(get().await.0, StatusCode::OK);
        standin.shutdown().await;
    }
}
