//! Apple JWTs: the claims each API family takes, the App Store Connect scope built from the
//! exact forwarded request, ES256 signing with `ring`, Apple's clock, and the token cache.
//!
//! Owns every decision about what goes into a token. Does not know about HTTP, clients or
//! policy: `proxy` hands it a [`Request`] (key, API, method, path, query, bundle id) and gets
//! back a [`Token`]. Time is always passed in (`now`), so the rules are tested without the
//! wall clock.
//!
//! Rules (APPLE.md §2, DESIGN §4):
//! - header `{"alg":"ES256","kid":…,"typ":"JWT"}`; signature raw `r||s` (64 bytes).
//! - App Store Connect / Notary: `iss` (team) or `sub:"user"` (individual), `iat`, `exp`,
//!   `aud`, and for GET on App Store Connect a one-entry `scope`; ≤ 20 min.
//! - storekit APIs: `iss`, `iat`, `exp`, `aud`, `bid`; never `scope`; ≤ 60 min.
//! - `iat` is Apple's "now" (our clock corrected by the offset learned from Apple's `Date`
//!   header) minus a leeway; `exp - iat` is the key's lifetime, never above Apple's cap.

mod cache;
mod clock;
mod developer;
mod file_name;
pub mod key;
pub mod pkcs11;
mod scope;
pub mod signer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;

use crate::apple::{self, Api, KeyKind, TokenFamily};
use crate::config::{Config, KeyConfig, KeySource};

pub use clock::{unix_secs, AppleClock};
pub(crate) use file_name::{file_name_hints, key_file_name};
pub use key::KeyError;
pub use scope::scope_entry;
pub use signer::{SignError, Signer};

use cache::{Cache, CacheKey};
pub use developer::{renewal as developer_renewal, DeveloperTokens};

/// A token is re-minted when less than this remains before `exp` (APPLE.md §5: "refresh
/// when under 60 s remain").
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// Tokens whose scope is longer than this are not cached: the cache is bounded in entries,
/// and this keeps it bounded in bytes too (unusually long queries are rare and cheap to sign).
const MAX_CACHED_SCOPE: usize = 1024;

/// A newly measured Apple clock offset this far from the one a cached token was minted with
/// retires that token.
pub(crate) const OFFSET_TOLERANCE_SECS: i64 = 5;

/// The claims the proxy puts in a token. Also what diagnoses and `check` show: it holds no
/// secret (the signature and the compact JWT live only in [`Token::jwt`]).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<Arc<str>>,
    /// `"user"` (individual keys), WeatherKit's service id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<Arc<str>>,
    pub iat: i64,
    /// `None` for APNs' provider token and its kin (renewed by age, APPLE.md §9.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// `appstoreconnect-v1`; the developer-key APIs take none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bid: Option<String>,
    /// Apple Business/School Manager's client assertion: a fresh UUID per assertion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// A signed token. `Debug` shows the claims and a fingerprint, never the JWT.
///
/// Built once per signature and shared (`Arc`) by every request the cache serves it to, so
/// everything a request needs from it is ready-made: the `Authorization` value, the
/// fingerprint and the names clone without allocating.
pub struct Token {
    /// `Bearer <compact JWT>` (App Attest: the bare JWT), marked sensitive (never indexed
    /// by HPACK, hidden by `Debug`).
    authorization: http::HeaderValue,
    /// Bytes of the scheme before the JWT in `authorization` (`Bearer `, or none).
    scheme_len: usize,
    fingerprint: Arc<str>,
    pub key_name: Arc<str>,
    pub key_id: Arc<str>,
    pub claims: Claims,
    /// The Apple clock offset (seconds) it was minted with.
    pub clock_offset: i64,
}

const BEARER: &str = "Bearer ";

impl Token {
    /// The compact JWT. Only `token` (the CLI command) and tests read it; it is never
    /// logged, audited or put in an error.
    pub fn jwt(&self) -> &str {
        self.authorization
            .as_bytes()
            .get(self.scheme_len..)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or_default()
    }

    /// The `Authorization` header value for Apple (`Bearer <jwt>`, sensitive). Cloning it
    /// shares the bytes.
    pub fn authorization(&self) -> http::HeaderValue {
        self.authorization.clone()
    }

    /// An access token an exchange returned (DESIGN §18), as the request carries it:
    /// `Bearer <access token>`, sensitive; its fingerprint is the SHA-256 of the access
    /// token (what Apple sees), its claims the assertion's it was exchanged for.
    pub(crate) fn access(access: &str, assertion: &Token) -> Result<Token, MintError> {
        let mut authorization = http::HeaderValue::try_from(format!("{BEARER}{access}"))
            .map_err(|_| MintError::Encode)?;
        authorization.set_sensitive(true);
        Ok(Token {
            authorization,
            scheme_len: BEARER.len(),
            fingerprint: Arc::from(crate::hex(&crate::sha256(access.as_bytes()))),
            key_name: assertion.key_name.clone(),
            key_id: assertion.key_id.clone(),
            claims: assertion.claims.clone(),
            clock_offset: assertion.clock_offset,
        })
    }

    /// Hex SHA-256 of the compact JWT: the audit fingerprint (DESIGN §13), computed once.
    pub fn fingerprint(&self) -> &Arc<str> {
        &self.fingerprint
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("key_name", &self.key_name)
            .field("key_id", &self.key_id)
            .field("claims", &self.claims)
            .finish_non_exhaustive()
    }
}

/// What a token is for.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub key: &'a str,
    pub api: Api,
    pub method: &'a str,
    pub path: &'a str,
    /// Raw query string without `?`, exactly as forwarded.
    pub query: Option<&'a str>,
    /// Overrides the key's bundle id (a client pinned to another app).
    pub bundle_id: Option<&'a str>,
    /// Sign in with Apple: the form's `client_id`, the `client_secret`'s `sub`.
    pub subject: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("no key named `{0}` is loaded")]
    UnknownKey(String),
    #[error("key `{key}` does not sign for {api}")]
    WrongApi { key: String, api: Api },
    #[error("key `{0}` has no bundle id for a storekit token")]
    NoBundleId(String),
    #[error("key `{key}` has no {field} for {api}")]
    Missing {
        key: String,
        field: &'static str,
        api: Api,
    },
    #[error("cannot encode the token")]
    Encode,
    #[error("key `{key}`")]
    Sign {
        key: String,
        #[source]
        source: SignError,
    },
}

struct LoadedKey {
    config: KeyConfig,
    signer: Box<dyn Signer>,
    /// base64url of the JOSE header, fixed per key.
    header_b64: String,
    /// The key's name, Apple key id and (team and in-app purchase keys) issuer, shared by
    /// every token it signs.
    name: Arc<str>,
    key_id: Arc<str>,
    issuer: Option<Arc<str>>,
    /// SHA-256 of the public key: what, with the key id, makes a held token this key's.
    public_sha256: [u8; 32],
}

/// Mints and caches tokens for the configured keys.
pub struct Minter {
    keys: HashMap<String, LoadedKey>,
    clock: Arc<AppleClock>,
    iat_leeway: i64,
    unscoped_lifetime: Duration,
    scope_methods: Vec<String>,
    cache: Cache,
    counts: Arc<MintCounts>,
    /// The developer-key APIs' tokens (DESIGN §18), shared with the minters before and
    /// after a reload so a reload never re-mints one.
    developer: Arc<DeveloperTokens>,
}

/// Signatures made and cache hits served: shared by the minters before and after a reload,
/// so the exported counters never stall or go backwards.
#[derive(Debug, Default)]
pub struct MintCounts {
    minted: AtomicU64,
    cache_hits: AtomicU64,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A key that failed to load, with the config entry it came from.
#[derive(Debug, thiserror::Error)]
#[error("{file}: field `{field}` (key `{name}`)")]
pub struct LoadError {
    pub file: String,
    pub name: String,
    pub field: String,
    #[source]
    pub error: KeyError,
}

impl Minter {
    /// Loads every configured key. Returns the minter and warnings for the operator.
    pub fn new(
        config: &Config,
        clock: Arc<AppleClock>,
    ) -> Result<(Minter, Vec<String>), Box<LoadError>> {
        let mut keys = HashMap::new();
        let mut warnings = Vec::new();
        for (i, kc) in config.keys.iter().enumerate() {
            let load_error = |error| {
                Box::new(LoadError {
                    file: config.source.clone(),
                    name: kc.name.clone(),
                    field: format!(
                        "keys[{i}].{}",
                        match kc.source {
                            KeySource::Env(_) => "private_key_env",
                            KeySource::Pkcs11(_) => "pkcs11",
                            _ => "private_key_file",
                        }
                    ),
                    error,
                })
            };
            let signer: Box<dyn Signer> = match &kc.source {
                KeySource::Pkcs11(source) => {
                    Box::new(pkcs11::Pkcs11Key::open(source).map_err(load_error)?)
                }
                _ => {
                    let loaded = key::load(&kc.source).map_err(load_error)?;
                    warnings.extend(loaded.warnings);
                    warnings.extend(file_name_hints(kc));
                    Box::new(loaded.key)
                }
            };
            keys.insert(kc.name.clone(), Minter::prepare(kc.clone(), signer));
        }
        let minter = Minter {
            keys,
            clock,
            iat_leeway: i64::try_from(config.tokens.iat_leeway.as_secs()).unwrap_or(60),
            unscoped_lifetime: config.tokens.unscoped_lifetime,
            scope_methods: config.tokens.scope_methods.clone(),
            cache: Cache::new(config.tokens.cache_capacity),
            counts: Arc::default(),
            developer: Arc::default(),
        };
        Ok((minter, warnings))
    }

    fn prepare(config: KeyConfig, signer: Box<dyn Signer>) -> LoadedKey {
        let header = serde_json::json!({"alg": "ES256", "kid": config.key_id, "typ": "JWT"});
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        LoadedKey {
            public_sha256: crate::sha256(signer.public_key()),
            name: Arc::from(config.name.as_str()),
            key_id: Arc::from(config.key_id.as_str()),
            issuer: match config.kind {
                KeyKind::Individual => None,
                KeyKind::Team | KeyKind::InAppPurchase => {
                    config.issuer_id.as_deref().map(Arc::from)
                }
                KeyKind::Developer => config.team_id.as_deref().map(Arc::from),
                KeyKind::BusinessManager => config.client_id.as_deref().map(Arc::from),
            },
            config,
            signer,
            header_b64,
        }
    }

    /// Counts into `counts` (those of the minter this one replaces) from now on, and keeps
    /// the developer-key tokens in `developer` (the store that outlives reloads).
    pub(crate) fn sharing(
        mut self,
        counts: Arc<MintCounts>,
        developer: Arc<DeveloperTokens>,
    ) -> Minter {
        self.counts = counts;
        self.developer = developer;
        self
    }

    pub fn clock(&self) -> &AppleClock {
        &self.clock
    }

    pub(crate) fn key_config(&self, name: &str) -> Option<&KeyConfig> {
        self.keys.get(name).map(|k| &k.config)
    }

    /// The signer of key `name` and its JOSE header (`{"alg":"ES256","kid":…,"typ":"JWT"}`,
    /// base64url, made once per key): the in-app signatures (DESIGN §15) sign with it directly.
    pub(crate) fn signer(&self, name: &str) -> Option<(&dyn Signer, &str)> {
        self.keys
            .get(name)
            .map(|k| (&*k.signer, k.header_b64.as_str()))
    }

    /// The `iat` every token made at `now` carries — Apple's clock back-dated by the leeway —
    /// in milliseconds, for the in-app signatures (the JWS `iat` is its seconds, the legacy
    /// signature's `timestamp` the milliseconds themselves).
    pub(crate) fn iat_millis(&self, now: SystemTime) -> i64 {
        let local_ms = match now.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        let back = self.clock.offset_secs().saturating_sub(self.iat_leeway);
        local_ms.saturating_add(back.saturating_mul(1000))
    }

    /// The signers that cannot sign right now, by key name, with why (DESIGN §16: `/readyz`
    /// names them).
    pub fn unavailable(&self) -> Vec<(&str, String)> {
        let mut out: Vec<(&str, String)> = self
            .keys
            .iter()
            .filter_map(|(name, k)| k.signer.available().err().map(|why| (name.as_str(), why)))
            .collect();
        out.sort();
        out
    }

    /// Where each key lives and whether it can be read out of there, for `check` and
    /// `/metrics`: `(backend, extractable)`.
    pub fn custody(&self, name: &str) -> Option<(signer::Backend, Option<bool>)> {
        self.keys
            .get(name)
            .map(|k| (k.signer.backend(), k.signer.extractable()))
    }

    /// SHA-256 of `name`'s public key, computed once at load.
    pub(crate) fn public_key_sha256(&self, name: &str) -> Option<[u8; 32]> {
        self.keys.get(name).map(|k| k.public_sha256)
    }

    /// The public key of `name` (uncompressed SEC1), for `check` and tests.
    pub fn public_key(&self, name: &str) -> Option<&[u8]> {
        self.keys.get(name).map(|k| k.signer.public_key())
    }

    /// Signs a throw-away message with `name` and verifies it with the key's public half:
    /// proves the key loads, signs, and yields a 64-byte `r||s` signature.
    pub fn self_test(&self, name: &str) -> Result<(), String> {
        let key = self
            .keys
            .get(name)
            .ok_or_else(|| format!("no key named `{name}` is loaded"))?;
        let message = b"apple-api-proxy self-test";
        let signature = key
            .signer
            .sign(message)
            .map_err(|_| "signing failed".to_string())?;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            key.signer.public_key(),
        )
        .verify(message, &signature)
        .map_err(|_| "the test signature does not verify with the key's public key".to_string())
    }

    /// Tokens signed so far, and requests served from the cache.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.minted.load(Ordering::Relaxed),
            self.counts.cache_hits.load(Ordering::Relaxed),
        )
    }

    /// Whether a request with this method on this API gets a scoped token.
    fn scoped(&self, api: Api, method: &str) -> bool {
        api == Api::AppStoreConnect && self.scope_methods.iter().any(|m| m == method)
    }

    /// A token for `req`: from the cache when one with enough life left exists, otherwise
    /// freshly signed. The cache lock is never held while signing, so one request's
    /// signature never delays another request.
    pub fn token(&self, req: &Request<'_>, now: SystemTime) -> Result<Arc<Token>, MintError> {
        self.mint(req, now, true)
    }

    fn mint(
        &self,
        req: &Request<'_>,
        now: SystemTime,
        use_cache: bool,
    ) -> Result<Arc<Token>, MintError> {
        let key = self.loaded(req)?;
        let bid = match req.api.token_family() {
            TokenFamily::StoreKit => Some(
                req.bundle_id
                    .or(key.config.bundle_id.as_deref())
                    .ok_or_else(|| MintError::NoBundleId(req.key.to_string()))?,
            ),
            TokenFamily::Connect => None,
            // Never cached here: `cached` keeps these (DESIGN §18).
            TokenFamily::Developer => return self.cached(req, now),
            // Exchanged with Apple, never sent as they are: `assertion`.
            TokenFamily::AccountManager => {
                return Err(MintError::WrongApi {
                    key: req.key.to_string(),
                    api: req.api,
                })
            }
        };
        // The cache key embeds the scope entry, so a cache hit costs this one string.
        let scoped = self.scoped(req.api, req.method);
        let cache_key = CacheKey::new(req, scoped, bid);
        let scope = cache_key.scope();
        let apple_now = self.clock.apple_now(now);
        let offset = self.clock.offset_secs();
        if use_cache {
            if let Some(token) = self.cache.get(&cache_key.text, apple_now, offset) {
                self.counts.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(token);
            }
        }
        let lifetime = self.lifetime(&key.config, req.api, scope.is_some());
        let iat = apple_now - self.iat_leeway;
        let claims = Claims {
            iss: key.issuer.clone(),
            sub: (key.config.kind == KeyKind::Individual).then(|| Arc::from("user")),
            iat,
            exp: Some(iat + i64::try_from(lifetime.as_secs()).unwrap_or(0)),
            aud: Some(apple::AUDIENCE),
            scope: scope.map(|s| vec![s.to_string()]),
            bid: bid.map(str::to_string),
            jti: None,
        };
        let cacheable = scope.is_none_or(|s| s.len() <= MAX_CACHED_SCOPE);
        let token = Arc::new(self.sign(key, &key.header_b64, claims, offset, BEARER)?);
        self.counts.minted.fetch_add(1, Ordering::Relaxed);
        if cacheable {
            self.cache.insert(cache_key.text, token.clone(), apple_now);
        }
        Ok(token)
    }

    /// The short assertion an exchange API trades for an access token (DESIGN §18): Maps'
    /// auth token `{iss: team id, iat, exp}`, Apple Business/School Manager's client
    /// assertion `{iss = sub = client id, aud, iat, exp, jti}`. One per exchange, never
    /// cached, at most [`apple::ASSERTION_MAX_LIFETIME`] long.
    pub(crate) fn assertion(&self, req: &Request<'_>, now: SystemTime) -> Result<Token, MintError> {
        let key = self.loaded(req)?;
        let account = req.api.token_family() == TokenFamily::AccountManager;
        let iss = key.issuer.clone().ok_or_else(|| MintError::Missing {
            key: req.key.to_string(),
            field: if account { "client_id" } else { "team_id" },
            api: req.api,
        })?;
        let offset = self.clock.offset_secs();
        let iat = self.clock.apple_now(now) - self.iat_leeway;
        let lifetime = key.config.token_lifetime.min(apple::ASSERTION_MAX_LIFETIME);
        let exp = iat + i64::try_from(lifetime.as_secs()).unwrap_or(0);
        let claims = if account {
            let jti = crate::signing::nonce(&ring::rand::SystemRandom::new())
                .map_err(|_| MintError::Encode)?;
            Claims {
                iss: Some(iss.clone()),
                sub: Some(iss),
                iat,
                exp: Some(exp),
                aud: Some(apple::ACCOUNT_TOKEN_AUDIENCE),
                scope: None,
                bid: None,
                jti: Some(jti),
            }
        } else {
            Claims {
                iss: Some(iss),
                sub: None,
                iat,
                exp: Some(exp),
                aud: None,
                scope: None,
                bid: None,
                jti: None,
            }
        };
        let token = self.sign(key, &key.header_b64, claims, offset, BEARER)?;
        self.counts.minted.fetch_add(1, Ordering::Relaxed);
        Ok(token)
    }

    /// A freshly signed token for `req` (new `iat`), replacing any cached one: the retry after
    /// one of Apple's transient 401s must not resend the token Apple just refused.
    pub fn remint(&self, req: &Request<'_>, now: SystemTime) -> Result<Arc<Token>, MintError> {
        self.mint(req, now, false)
    }

    /// The key that signs `req`, if it is loaded and serves `req.api`.
    fn loaded(&self, req: &Request<'_>) -> Result<&LoadedKey, MintError> {
        let key = self
            .keys
            .get(req.key)
            .ok_or_else(|| MintError::UnknownKey(req.key.to_string()))?;
        if !key.config.apis.contains(&req.api) {
            return Err(MintError::WrongApi {
                key: req.key.to_string(),
                api: req.api,
            });
        }
        Ok(key)
    }

    /// `exp - iat` for this key and request: the key's lifetime (already capped at its
    /// kind's maximum), shortened for unscoped App Store Connect tokens, and — whatever the
    /// configuration — never above the API family's cap.
    fn lifetime(&self, key: &KeyConfig, api: Api, scoped: bool) -> Duration {
        let mut lifetime = key.token_lifetime;
        if api.token_family() == TokenFamily::Connect && !scoped {
            lifetime = lifetime.min(self.unscoped_lifetime);
        }
        lifetime.min(api.token_family().max_lifetime())
    }

    /// Signs `claims` under the JOSE header `header_b64`; `scheme` goes before the JWT in
    /// the `Authorization` value (`Bearer `, or nothing for App Attest).
    fn sign(
        &self,
        key: &LoadedKey,
        header_b64: &str,
        claims: Claims,
        clock_offset: i64,
        scheme: &str,
    ) -> Result<Token, MintError> {
        let mut payload = Vec::with_capacity(256);
        serde_json::to_writer(&mut payload, &claims).map_err(|_| MintError::Encode)?;
        // scheme + header.payload.signature, built in place: the header value is the
        // token's only copy of the JWT.
        let mut value = String::with_capacity(
            scheme.len() + header_b64.len() + payload.len().div_ceil(3) * 4 + 90,
        );
        value.push_str(scheme);
        value.push_str(header_b64);
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut value);
        let signature = key
            .signer
            .sign(&value.as_bytes()[scheme.len()..])
            .map_err(|source| MintError::Sign {
                key: key.config.name.clone(),
                source,
            })?;
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut value);
        let fingerprint = crate::sha256(&value.as_bytes()[scheme.len()..]);
        let mut authorization = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
            .map_err(|_| MintError::Encode)?;
        authorization.set_sensitive(true);
        Ok(Token {
            authorization,
            scheme_len: scheme.len(),
            fingerprint: Arc::from(crate::hex(&fingerprint)),
            key_name: key.name.clone(),
            key_id: key.key_id.clone(),
            claims,
            clock_offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeySource;
    use cache::SHARDS;
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use std::time::UNIX_EPOCH;

    const ISS: &str = "57246542-96fe-1a63-e053-0824d011072a";

    fn pem() -> String {
        let der = EcdsaKeyPair::generate_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec()))
    }

    fn config(extra_tokens: &str) -> Config {
        let text = format!(
            "[tokens]\n{extra_tokens}\n\
             [[keys]]\nname = \"team\"\nkind = \"team\"\nkey_id = \"TEAMKEY001\"\nissuer_id = \"{ISS}\"\nprivate_key_env = \"X\"\napis = [\"app-store-connect\", \"notary\"]\ntoken_lifetime = \"1h\"\n\
             [[keys]]\nname = \"me\"\nkind = \"individual\"\nkey_id = \"INDIVKEY01\"\nprivate_key_env = \"X\"\napis = [\"app-store-connect\"]\n\
             [[keys]]\nname = \"iap\"\nkind = \"in-app-purchase\"\nkey_id = \"IAPKEY0001\"\nissuer_id = \"{ISS}\"\nbundle_id = \"com.example.app\"\nprivate_key_env = \"X\"\napis = [\"app-store-server\", \"advanced-commerce\", \"external-purchase\"]\ntoken_lifetime = \"3h\"\n"
        );
        let mut c = Config::parse(&text, "t.toml", std::path::Path::new(".")).unwrap();
        for k in &mut c.keys {
            k.source = KeySource::Inline(pem());
        }
        c
    }

    fn minter(extra: &str) -> Minter {
        Minter::new(&config(extra), Arc::new(AppleClock::default()))
            .unwrap()
            .0
    }

    fn req<'a>(
        key: &'a str,
        api: Api,
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
    ) -> Request<'a> {
        Request {
            key,
            api,
            method,
            path,
            query,
            bundle_id: None,
            subject: None,
        }
    }

    fn decode(jwt: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>) {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let d = |s: &str| URL_SAFE_NO_PAD.decode(s).unwrap();
        (
            serde_json::from_slice(&d(parts[0])).unwrap(),
            serde_json::from_slice(&d(parts[1])).unwrap(),
            d(parts[2]),
        )
    }

    const NOW: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    #[test]
    fn claims_are_exact_for_each_family_and_kind() {
        let m = minter("");
        let now_i = NOW as i64;
        let cases = [
            (
                req(
                    "team",
                    Api::AppStoreConnect,
                    "GET",
                    "/v1/apps",
                    Some("filter%5Bplatform%5D=IOS&limit=5"),
                ),
                serde_json::json!({"iss": ISS, "iat": now_i - 60, "exp": now_i - 60 + 1200, "aud": "appstoreconnect-v1", "scope": ["GET /v1/apps?filter[platform]=IOS"]}),
                "TEAMKEY001",
            ),
            (
                req("me", Api::AppStoreConnect, "GET", "/v1/users", None),
                serde_json::json!({"sub": "user", "iat": now_i - 60, "exp": now_i - 60 + 300, "aud": "appstoreconnect-v1", "scope": ["GET /v1/users"]}),
                "INDIVKEY01",
            ),
            (
                req("team", Api::AppStoreConnect, "POST", "/v1/apps", None),
                serde_json::json!({"iss": ISS, "iat": now_i - 60, "exp": now_i - 60 + 180, "aud": "appstoreconnect-v1"}),
                "TEAMKEY001",
            ),
            (
                req("team", Api::Notary, "GET", "/notary/v2/submissions", None),
                serde_json::json!({"iss": ISS, "iat": now_i - 60, "exp": now_i - 60 + 180, "aud": "appstoreconnect-v1"}),
                "TEAMKEY001",
            ),
            (
                req(
                    "iap",
                    Api::AppStoreServer,
                    "GET",
                    "/inApps/v1/transactions/1",
                    None,
                ),
                serde_json::json!({"iss": ISS, "iat": now_i - 60, "exp": now_i - 60 + 3600, "aud": "appstoreconnect-v1", "bid": "com.example.app"}),
                "IAPKEY0001",
            ),
        ];
        for (r, want, kid) in cases {
            let t = m.token(&r, now()).unwrap();
            let (header, claims, sig) = decode(t.jwt());
            assert_eq!(
                header,
                serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"})
            );
            assert_eq!(claims, want, "{r:?}");
            assert_eq!(sig.len(), 64, "raw r||s, not DER");
        }
    }

    #[test]
    fn lifetime_never_exceeds_apples_cap_even_if_config_asks_for_more() {
        let m = minter("unscoped_lifetime = \"3h\"");
        for r in [
            req("team", Api::AppStoreConnect, "GET", "/v1/apps", None),
            req("team", Api::AppStoreConnect, "DELETE", "/v1/apps/1", None),
            req(
                "iap",
                Api::ExternalPurchase,
                "PUT",
                "/externalPurchase/v1/reports",
                None,
            ),
        ] {
            let t = m.token(&r, now()).unwrap();
            let cap = r.api.token_family().max_lifetime().as_secs() as i64;
            assert!(t.claims.exp.unwrap() - t.claims.iat <= cap, "{r:?}");
        }
    }

    #[test]
    fn storekit_tokens_never_carry_a_scope_and_take_the_overridden_bundle_id() {
        let m = minter("");
        let mut r = req(
            "iap",
            Api::AdvancedCommerce,
            "POST",
            "/advancedCommerce/v1/subscription/cancel/1",
            None,
        );
        r.bundle_id = Some("com.example.other");
        let t = m.token(&r, now()).unwrap();
        assert_eq!(t.claims.scope, None);
        assert_eq!(t.claims.bid.as_deref(), Some("com.example.other"));
    }

    #[test]
    fn scope_drops_ignored_params_and_writes_literal_brackets() {
        let cases = [
            ("/v1/apps", None, "GET /v1/apps"),
            (
                "/v1/apps",
                Some("limit=200&cursor=abc&sort=name"),
                "GET /v1/apps",
            ),
            (
                "/v1/apps",
                Some("filter%5BbundleId%5D=com.x&limit=2"),
                "GET /v1/apps?filter[bundleId]=com.x",
            ),
            (
                "/v1/apps",
                Some("filter[platform]=IOS&fields%5bapps%5d=name"),
                "GET /v1/apps?filter[platform]=IOS&fields[apps]=name",
            ),
            ("/v1/apps", Some("a=%20b&&c"), "GET /v1/apps?a=%20b&c"),
            ("/v1/apps", Some("x=%"), "GET /v1/apps?x=%"),
            ("/v1/apps", Some("limited=1"), "GET /v1/apps?limited=1"),
        ];
        for (path, query, want) in cases {
            assert_eq!(scope_entry("GET", path, query), want);
        }
    }

    #[test]
    fn iat_follows_apples_clock() {
        let m = minter("");
        m.clock()
            .observe(
                now() - Duration::from_secs(300),
                now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let t = m
            .token(
                &req("iap", Api::AppStoreServer, "GET", "/inApps/v1/x", None),
                now(),
            )
            .unwrap();
        assert_eq!(t.claims.iat, NOW as i64 - 300 - 60);
        // The in-app signatures' time is the same instant, in milliseconds.
        let ms = m.iat_millis(now() + Duration::from_millis(250));
        assert_eq!(ms, (NOW as i64 - 300 - 60) * 1000 + 250);
        assert_eq!(ms.div_euclid(1000), t.claims.iat);
    }

    #[test]
    fn cache_reuses_until_refresh_margin_and_retires_on_clock_change() {
        let m = minter("");
        let r = req(
            "iap",
            Api::AppStoreServer,
            "GET",
            "/inApps/v1/transactions/1",
            None,
        );
        let a = m.token(&r, now()).unwrap();
        let b = m.token(&r, now() + Duration::from_secs(60)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        // exp = now - 60 + 3600: within 60 s of it, a new token is minted.
        let c = m
            .token(&r, now() + Duration::from_secs(3600 - 60 - 59))
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        m.clock()
            .observe(
                now() + Duration::from_secs(30),
                now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let d = m.token(&r, now()).unwrap();
        assert!(!Arc::ptr_eq(&c, &d));
        assert_eq!(m.counts(), (3, 1));
        // Different scopes are different entries.
        let e = m
            .token(
                &req("team", Api::AppStoreConnect, "GET", "/v1/apps/1", None),
                now(),
            )
            .unwrap();
        let f = m
            .token(
                &req("team", Api::AppStoreConnect, "GET", "/v1/apps/2", None),
                now(),
            )
            .unwrap();
        assert_ne!(e.claims.scope, f.claims.scope);
    }

    #[test]
    fn remint_signs_anew_and_replaces_the_cached_token() {
        let m = minter("");
        let r = req(
            "iap",
            Api::AppStoreServer,
            "GET",
            "/inApps/v1/transactions/1",
            None,
        );
        let a = m.token(&r, now()).unwrap();
        let b = m.remint(&r, now()).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&b, &m.token(&r, now()).unwrap()));
    }

    #[test]
    fn cache_stays_bounded() {
        let m = minter("cache_capacity = 64");
        for i in 0..1000 {
            let path = format!("/v1/apps/{i}");
            m.token(
                &req("team", Api::AppStoreConnect, "GET", &path, None),
                now(),
            )
            .unwrap();
        }
        assert!(m.cache.len() <= 64 + SHARDS, "{}", m.cache.len());
    }

    #[test]
    fn long_scopes_are_signed_but_not_cached() {
        let m = minter("");
        let query = format!("filter[name]={}", "x".repeat(2000));
        let r = req(
            "team",
            Api::AppStoreConnect,
            "GET",
            "/v1/apps",
            Some(&query),
        );
        let a = m.token(&r, now()).unwrap();
        let b = m.token(&r, now()).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(m.cache.len(), 0);
    }

    #[test]
    fn wrong_api_and_unknown_key_are_errors() {
        let m = minter("");
        assert!(matches!(
            m.token(
                &req("iap", Api::AppStoreConnect, "GET", "/v1/apps", None),
                now()
            ),
            Err(MintError::WrongApi { .. })
        ));
        assert!(matches!(
            m.token(
                &req("nope", Api::AppStoreConnect, "GET", "/v1/apps", None),
                now()
            ),
            Err(MintError::UnknownKey(_))
        ));
    }

    #[test]
    fn token_debug_hides_the_jwt() {
        let m = minter("");
        let t = m
            .token(
                &req("team", Api::AppStoreConnect, "GET", "/v1/apps", None),
                now(),
            )
            .unwrap();
        let sig = t.jwt().rsplit('.').next().unwrap().to_string();
        assert!(!format!("{t:?}").contains(&sig));
        assert!(!format!("{t:?}").contains(t.jwt()));
    }
}
