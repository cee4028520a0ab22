//! An OIDC issuer stand-in (DESIGN §17): what GitHub Actions, GitLab CI or a Kubernetes API
//! server publishes — a discovery document and a JWKS over TLS — and the ID tokens it signs,
//! for the proxy's workload-identity tests.
//!
//! Owns: its own throw-away CA (so the proxy needs the provider's `ca_file`), one TLS
//! listener on 127.0.0.1, its signing keys (P-256, RustCrypto — never the proxy's ring), and
//! the knobs tests turn: publish or withdraw a key (rotation), go down (outage), answer
//! slowly, and count what was fetched. Imports only `tls` from the crate.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// A running issuer; dropping it stops the listener.
pub struct OidcIssuer {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for OidcIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcIssuer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// An issuer key: GitHub, GitLab and Kubernetes sign with RSA; some issuers with P-256.
#[derive(Clone)]
enum Key {
    Ec(SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

struct State {
    issuer: String,
    /// What the discovery document says the issuer is (normally `issuer`).
    named: Mutex<Option<String>>,
    /// kid → (key, published in the JWKS).
    keys: Mutex<BTreeMap<String, (Key, bool)>>,
    down: AtomicBool,
    delay_ms: AtomicU64,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
}

impl OidcIssuer {
    /// Starts an issuer on 127.0.0.1 with one published P-256 key, kid `key-1`.
    pub async fn start() -> std::io::Result<OidcIssuer> {
        let authority = crate::tls::Authority::generate().map_err(std::io::Error::other)?;
        let acceptor = TlsAcceptor::from(authority.server_config);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            issuer: format!("https://{addr}"),
            named: Mutex::new(None),
            keys: Mutex::new(BTreeMap::new()),
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
        });
        let (stop, mut stopped) = watch::channel(false);
        let issuer = OidcIssuer {
            addr,
            ca_pem: authority.ca_pem,
            state: Arc::clone(&state),
            stop,
        };
        issuer.add_key("key-1", true);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let acceptor = acceptor.clone();
                        let state = Arc::clone(&state);
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let service = service_fn(move |req| {
                                let state = Arc::clone(&state);
                                async move { Ok::<_, Infallible>(answer(&state, req.uri().path()).await) }
                            });
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tls), service)
                                .await;
                        });
                    }
                }
            }
        });
        Ok(issuer)
    }

    /// The issuer URL, the tokens' `iss`: `https://127.0.0.1:PORT`.
    pub fn issuer(&self) -> String {
        self.state.issuer.clone()
    }

    /// Makes the discovery document name another issuer (a misconfigured or hostile one).
    pub fn set_issuer_name(&self, issuer: &str) {
        *lock(&self.state.named) = Some(issuer.to_string());
    }

    /// `https://127.0.0.1:PORT/jwks`.
    pub fn jwks_url(&self) -> String {
        format!("https://{}/jwks", self.addr)
    }

    /// The throw-away CA (PEM) the issuer's certificate chains to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Adds a fresh P-256 key under `kid`, published in the JWKS or not.
    pub fn add_key(&self, kid: &str, published: bool) {
        let key = SigningKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        lock(&self.state.keys).insert(kid.to_string(), (Key::Ec(key), published));
    }

    /// Adds a fresh 2048-bit RSA key under `kid` (its tokens are RS256).
    pub fn add_rsa_key(&self, kid: &str, published: bool) -> Result<(), rsa::Error> {
        let key = rsa::RsaPrivateKey::new(&mut p256::elliptic_curve::rand_core::OsRng, 2048)?;
        lock(&self.state.keys).insert(kid.to_string(), (Key::Rsa(Box::new(key)), published));
        Ok(())
    }

    /// Publishes or withdraws `kid` from the JWKS (it can still sign).
    pub fn publish(&self, kid: &str, published: bool) {
        if let Some(entry) = lock(&self.state.keys).get_mut(kid) {
            entry.1 = published;
        }
    }

    /// While down, discovery and JWKS answer 503.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Holds every answer this long.
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// (discovery documents, JWKS documents) served so far.
    pub fn fetches(&self) -> (usize, usize) {
        (
            self.state.discovery_fetches.load(Ordering::SeqCst),
            self.state.jwks_fetches.load(Ordering::SeqCst),
        )
    }

    /// An ID token signed with `kid`'s key (a throw-away P-256 key when `kid` is none of
    /// the issuer's): header `{alg, kid, typ}` — `alg` ES256 or RS256 by the key — plus
    /// `header`'s fields (which may override `alg`), and `claims` as given.
    pub fn sign(&self, kid: &str, header: Value, claims: Value) -> String {
        let key = lock(&self.state.keys)
            .get(kid)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| {
                Key::Ec(SigningKey::random(
                    &mut p256::elliptic_curve::rand_core::OsRng,
                ))
            });
        let alg = match key {
            Key::Ec(_) => "ES256",
            Key::Rsa(_) => "RS256",
        };
        let mut h = json!({"alg": alg, "kid": kid, "typ": "JWT"});
        if let (Some(h), Value::Object(extra)) = (h.as_object_mut(), header) {
            h.extend(extra);
        }
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(h.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = match key {
            Key::Ec(k) => {
                let sig: Signature = k.sign(signed.as_bytes());
                sig.to_bytes().to_vec()
            }
            Key::Rsa(k) => {
                use rsa::signature::SignatureEncoding as _;
                rsa::pkcs1v15::SigningKey::<rsa::sha2::Sha256>::new(*k)
                    .sign(signed.as_bytes())
                    .to_vec()
            }
        };
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// The JWKS as published now.
    pub fn jwks(&self) -> Value {
        jwks(&self.state)
    }
}

impl Drop for OidcIssuer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn jwks(state: &State) -> Value {
    let keys: Vec<Value> = lock(&state.keys)
        .iter()
        .filter(|(_, (_, published))| *published)
        .map(|(kid, (key, _))| match key {
            Key::Ec(key) => {
                let point = key.verifying_key().to_encoded_point(false);
                json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                    "x": URL_SAFE_NO_PAD.encode(point.x().map(|x| x.to_vec()).unwrap_or_default()),
                    "y": URL_SAFE_NO_PAD.encode(point.y().map(|y| y.to_vec()).unwrap_or_default()),
                })
            }
            Key::Rsa(key) => {
                use rsa::traits::PublicKeyParts as _;
                // As GitHub publishes them: no `alg` on the key.
                json!({
                    "kty": "RSA", "use": "sig", "kid": kid,
                    "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                    "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
                })
            }
        })
        .collect();
    json!({ "keys": keys })
}

async fn answer(state: &State, path: &str) -> http::Response<Full<Bytes>> {
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let respond = |status: u16, body: String| {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if state.down.load(Ordering::SeqCst) {
        return respond(503, r#"{"error":"unavailable"}"#.into());
    }
    match path {
        "/.well-known/openid-configuration" => {
            state.discovery_fetches.fetch_add(1, Ordering::SeqCst);
            let issuer = lock(&state.named)
                .clone()
                .unwrap_or_else(|| state.issuer.clone());
            let base = state.issuer.trim_end_matches('/');
            respond(
                200,
                json!({
                    "issuer": issuer,
                    "jwks_uri": format!("{base}/jwks"),
                    "id_token_signing_alg_values_supported": ["ES256", "RS256"],
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                })
                .to_string(),
            )
        }
        "/jwks" => {
            state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            respond(200, jwks(state).to_string())
        }
        _ => respond(404, r#"{"error":"not found"}"#.into()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
