//! Who is calling and what they may call.
//!
//! A client proves itself with a bearer secret (`aap_…`) in `Proxy-Authorization` or
//! `Authorization` (config stores only its SHA-256, compared in constant time), with a
//! client key (DESIGN §17b: the JWT an Apple SDK signs with a key the proxy issued, whose
//! `kid` is the client's `key_id`; see [`key`]), or with its TLS client certificate. Any
//! other `Authorization` value (a JWT whose `kid` is no client's) is not a credential: it
//! is ignored for identity and never forwarded. An OIDC ID token (DESIGN §17) whose `iss` is
//! a configured identity provider's is verified against that provider's keys
//! ([`crate::identity`]) and its claims pick the client: the first, in config order, whose
//! `identity.claims` globs all match. Allow rules are `METHOD /path-glob`, default
//! deny, and match the path exactly as the client sent it (`*` matches across `/`).
//!
//! Imports `config` and `identity`. Holds no client secret (only its hash) and no private
//! key; the bearer JWTs it verified (client-key JWTs, identity tokens) are remembered, as
//! they are, until they expire (`remembered.rs`), so a reused token is not verified again.

pub mod key;
mod remembered;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, PROXY_AUTHORIZATION};
use http::HeaderMap;

use crate::config::{ClientConfig, ClientIdentity, Config, RateLimit};
use crate::identity;
use remembered::Remembered;

/// Every client secret starts with this, so the proxy can tell one from an SDK's JWT.
pub(crate) const SECRET_PREFIX: &str = "aap_";

/// How a client proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    Anonymous,
    Secret,
    Certificate,
    /// A JWT signed with the client's key (DESIGN §17b).
    ClientKey,
    /// An OIDC ID token from a configured identity provider (DESIGN §17).
    Oidc,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Anonymous => "anonymous",
            AuthMethod::Secret => "secret",
            AuthMethod::Certificate => "mtls",
            AuthMethod::ClientKey => "client_key",
            AuthMethod::Oidc => "oidc",
        }
    }
}

/// The names a verified TLS client certificate carries: its DNS subject alternative names
/// and its subject common name. rustls has already verified the chain against
/// `client_ca_file`; this only reads who it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertIdentity {
    pub dns_names: Vec<String>,
    pub common_name: Option<String>,
}

impl CertIdentity {
    /// Reads the names from a DER certificate; `None` if it cannot be parsed.
    pub(crate) fn from_der(der: &[u8]) -> Option<CertIdentity> {
        use x509_cert::der::Decode as _;
        use x509_cert::ext::pkix::name::GeneralName;
        use x509_cert::ext::pkix::SubjectAltName;
        let cert = x509_cert::Certificate::from_der(der).ok()?;
        let tbs = &cert.tbs_certificate;
        let dns_names = match tbs.get::<SubjectAltName>() {
            Ok(Some((_, san))) => san
                .0
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DnsName(d) => Some(d.as_str().to_string()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let common_name = tbs
            .subject
            .0
            .iter()
            .flat_map(|rdn| rdn.0.iter())
            .find(|atv| atv.oid.to_string() == "2.5.4.3")
            .and_then(|atv| std::str::from_utf8(atv.value.value()).ok())
            .map(str::to_string);
        Some(CertIdentity {
            dns_names,
            common_name,
        })
    }

    /// `tls_subject` matches a DNS SAN; only a certificate without DNS SANs is matched by CN.
    fn matches(&self, subject: &str) -> bool {
        if self.dns_names.is_empty() {
            self.common_name.as_deref() == Some(subject)
        } else {
            self.dns_names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(subject))
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Shared with the configuration: cloning it into the audit record allocates nothing.
    pub name: Arc<str>,
    pub method: AuthMethod,
    /// Index into [`Clients`]; `None` for anonymous.
    index: Option<usize>,
    /// Who the identity token says the caller is, when it came with one.
    pub oidc: Option<Arc<OidcSubject>>,
}

/// The provider and `sub` of a verified identity token: the audit record's `identity`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OidcSubject {
    pub provider: Arc<str>,
    pub subject: Arc<str>,
}

/// What a failed identity check would need to be tried again: the provider's index and
/// the key-set version the token was checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refetchable {
    pub provider: usize,
    pub version: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no client credential was sent")]
    Missing,
    #[error("the client secret is not valid")]
    Invalid,
    /// A JWT whose `kid` is `client`'s key id failed `check`.
    #[error("the JWT signed with client `{client}`'s key fails a check: {check}")]
    ClientKey {
        client: String,
        check: key::KeyCheck,
    },
    /// An identity token from `provider` failed `check` (DESIGN §17).
    #[error("the identity token from provider `{provider}` fails a check: {check}")]
    Identity {
        provider: String,
        check: Box<identity::Check>,
        /// Set for an unknown `kid`: a refetch of the provider's keys may find it.
        refetch: Option<Refetchable>,
    },
    /// No keys of `provider` are cached and none could be fetched.
    #[error("identity provider `{provider}`'s keys cannot be had: {why}")]
    IdentityUnavailable {
        provider: String,
        why: String,
        refetch: Refetchable,
    },
    /// A valid identity token that no client's `identity.claims` match.
    #[error("the identity token of provider `{}` for subject `{}` matches no client", .0.provider, .0.subject)]
    NoClientForIdentity(Arc<OidcSubject>),
}

impl AuthError {
    /// Whether refetching the provider's keys could change the answer, and for which one.
    pub fn refetchable(&self) -> Option<Refetchable> {
        match self {
            AuthError::Identity { refetch, .. } => *refetch,
            AuthError::IdentityUnavailable { refetch, .. } => Some(*refetch),
            _ => None,
        }
    }
}

struct Rule {
    /// `None` = any method (`*`).
    method: Option<String>,
    glob: String,
}

struct Client {
    name: Arc<str>,
    secret_sha256: Option<[u8; 32]>,
    tls_subject: Option<String>,
    rules: Vec<Rule>,
    key: Option<String>,
    bundle_id: Option<String>,
    /// The client key's public half (uncompressed SEC1), when it has one.
    client_key: Option<Vec<u8>>,
    /// `[clients.signing]`; `None` signs nothing.
    signing: Option<crate::config::SigningPolicy>,
    /// Where its pushes on APNs' own `/3/device/` path go.
    apns_environment: crate::apple::Environment,
    /// The identity tokens that are this client (DESIGN §17).
    identity: Option<ClientIdentity>,
    /// Shared with the runtime before a reload when the client keeps its name and rate, so a
    /// reload never refills a spent budget.
    bucket: Option<Arc<Bucket>>,
}

/// A token bucket: `count` requests per `per`, bursts up to `count`.
struct Bucket {
    rate: RateLimit,
    /// (tokens available, when last refilled)
    state: Mutex<(f64, Option<Instant>)>,
}

impl Bucket {
    fn new(rate: RateLimit) -> Bucket {
        Bucket {
            rate,
            state: Mutex::new((f64::from(rate.count), None)),
        }
    }

    /// Takes one token, or says how long until one is available.
    fn take(&self, now: Instant) -> Result<(), Duration> {
        let capacity = f64::from(self.rate.count);
        let per_token = self.rate.per.as_secs_f64() / capacity;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        if let Some(last) = *last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            *tokens = (*tokens + elapsed / per_token).min(capacity);
        }
        *last = Some(now);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) * per_token))
        }
    }
}

/// The configured clients and the anonymous switch.
pub struct Clients {
    clients: Vec<Client>,
    allow_anonymous: bool,
    anonymous: Arc<str>,
    /// Client key id → index into `clients`.
    by_key_id: HashMap<String, usize>,
    /// Client-key JWTs already verified (SDKs reuse theirs for minutes) → client index. A
    /// reload starts afresh, so a removed client key stops working at once.
    verified: Remembered<usize>,
    /// The identity providers in config order, with the rules their tokens must meet.
    providers: Vec<ProviderRules>,
    /// Issuer → index into `providers`.
    by_issuer: HashMap<String, usize>,
    /// Identity tokens already verified and mapped to a client; a reload starts afresh.
    identities: Remembered<IdentityHit>,
}

/// A provider as this runtime uses it: its keys (shared across reloads) and its rules.
struct ProviderRules {
    provider: Arc<identity::Provider>,
    audience: String,
    max_token_age_secs: i64,
}

/// A verified identity token: whose it is.
#[derive(Clone)]
struct IdentityHit {
    client: usize,
    provider: usize,
    /// The key-set version it was verified against: a key set that changed since (a key
    /// removed at the issuer) means verifying it again.
    version: u64,
    subject: Arc<OidcSubject>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field(
                "names",
                &self.clients.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

impl Clients {
    /// The clients of `config`, with identity providers of their own (that fetch keys
    /// only when asked to, outside a Tokio runtime).
    pub fn new(config: &Config) -> Result<Clients, identity::provider::SetupError> {
        let providers = identity::Registry::default().providers(config)?;
        Ok(Clients::carrying(config, None, providers))
    }

    /// The clients of `config`; each one that `previous` knows by the same name and rate
    /// keeps its rate-limit bucket (a reload must not refill a spent budget). `providers`
    /// are `config`'s identity providers, in its order.
    pub(crate) fn carrying(
        config: &Config,
        previous: Option<&Clients>,
        providers: Vec<Arc<identity::Provider>>,
    ) -> Clients {
        let bucket_of = |c: &ClientConfig| {
            let rate = c.rate_limit?;
            let kept = previous
                .and_then(|p| p.clients.iter().find(|old| *old.name == *c.name))
                .and_then(|old| old.bucket.clone())
                .filter(|b| b.rate == rate);
            Some(kept.unwrap_or_else(|| Arc::new(Bucket::new(rate))))
        };
        Clients {
            clients: config
                .clients
                .iter()
                .map(|c| Client::from_config(c, bucket_of(c)))
                .collect(),
            allow_anonymous: config.server.allow_anonymous,
            anonymous: Arc::from("anonymous"),
            by_key_id: config
                .clients
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.client_key.as_ref().map(|k| (k.key_id.clone(), i)))
                .collect(),
            verified: Remembered::default(),
            by_issuer: providers
                .iter()
                .enumerate()
                .map(|(i, p)| (p.issuer.clone(), i))
                .collect(),
            providers: providers
                .into_iter()
                .zip(&config.identity_providers)
                .map(|(provider, p)| ProviderRules {
                    provider,
                    audience: p.audience.clone(),
                    max_token_age_secs: i64::try_from(p.max_token_age.as_secs())
                        .unwrap_or(i64::MAX),
                })
                .collect(),
            identities: Remembered::default(),
        }
    }

    /// The identity providers, in config order.
    pub fn identity_providers(&self) -> impl Iterator<Item = &Arc<identity::Provider>> {
        self.providers.iter().map(|p| &p.provider)
    }

    /// Refetches a provider's keys after `why` (an unknown `kid`, or no keys), at most
    /// once per 30 s per provider; `Changed` means authenticating again may now succeed.
    pub async fn refetch(&self, why: Refetchable) -> identity::Refetch {
        match self.providers.get(why.provider) {
            Some(p) => p.provider.refetch(why.version).await,
            None => identity::Refetch::Unchanged,
        }
    }

    /// Identifies the caller: a presented secret first (it names one client exactly), then
    /// a JWT signed with a client key (its `kid` names the client), then the verified client
    /// certificate, then anonymous if allowed. `now` is UNIX seconds.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        cert: Option<&CertIdentity>,
        now: i64,
    ) -> Result<Identity, AuthError> {
        let Some(secret) = presented_secret(headers) else {
            if let Some(identity) = self.client_key(headers, now)? {
                return Ok(identity);
            }
            if let Some(identity) = self.identity_token(headers, now)? {
                return Ok(identity);
            }
            if let Some(cert) = cert {
                if let Some(i) = self
                    .clients
                    .iter()
                    .position(|c| c.tls_subject.as_deref().is_some_and(|s| cert.matches(s)))
                {
                    return Ok(Identity {
                        name: self.clients[i].name.clone(),
                        method: AuthMethod::Certificate,
                        index: Some(i),
                        oidc: None,
                    });
                }
            }
            return if self.allow_anonymous {
                Ok(Identity {
                    name: self.anonymous.clone(),
                    method: AuthMethod::Anonymous,
                    index: None,
                    oidc: None,
                })
            } else {
                Err(AuthError::Missing)
            };
        };
        let digest = crate::sha256(secret.as_bytes());
        // Compare against every client, without stopping at a match, in constant time per
        // comparison: the time taken says nothing about which hash came close.
        let mut found = None;
        for (i, c) in self.clients.iter().enumerate() {
            if let Some(h) = &c.secret_sha256 {
                if constant_time_eq(h, &digest) && found.is_none() {
                    found = Some(i);
                }
            }
        }
        let i = found.ok_or(AuthError::Invalid)?;
        Ok(Identity {
            name: self.clients[i].name.clone(),
            method: AuthMethod::Secret,
            index: Some(i),
            oidc: None,
        })
    }

    /// The client an identity token in the headers authenticates (DESIGN §17); `Ok(None)`
    /// when no bearer JWT's `iss` is a configured provider's issuer.
    fn identity_token(&self, headers: &HeaderMap, now: i64) -> Result<Option<Identity>, AuthError> {
        if self.providers.is_empty() {
            return Ok(None);
        }
        for token in bearer_values(headers) {
            if token.starts_with(SECRET_PREFIX) {
                continue;
            }
            if let Some(identity) = self.remembered_identity(token, now) {
                return Ok(Some(identity));
            }
            let Some(p) = identity::verify::issuer_of(token)
                .and_then(|iss| self.by_issuer.get(&iss).copied())
            else {
                continue;
            };
            return self.verify_identity(token, p, now).map(Some);
        }
        Ok(None)
    }

    /// A token verified earlier that is still valid against an unchanged key set.
    fn remembered_identity(&self, token: &str, now: i64) -> Option<Identity> {
        let hit = self.identities.get(token, now, |hit| {
            self.providers[hit.provider].provider.version() == hit.version
        })?;
        self.providers[hit.provider].provider.count("ok");
        let c = &self.clients[hit.client];
        Some(Identity {
            name: c.name.clone(),
            method: AuthMethod::Oidc,
            index: Some(hit.client),
            oidc: Some(hit.subject.clone()),
        })
    }

    fn verify_identity(&self, token: &str, p: usize, now: i64) -> Result<Identity, AuthError> {
        let rules = &self.providers[p];
        let provider = &rules.provider;
        let (keys, version) = provider.keys();
        let refetch = Refetchable {
            provider: p,
            version,
        };
        let Some(keys) = keys else {
            provider.count("unavailable");
            return Err(AuthError::IdentityUnavailable {
                provider: provider.name.to_string(),
                why: provider
                    .last_error()
                    .unwrap_or_else(|| "its keys have not been fetched yet".into()),
                refetch,
            });
        };
        let verified = identity::verify::verify(
            token,
            &keys,
            &identity::Rules {
                issuer: &provider.issuer,
                audience: &rules.audience,
                max_token_age_secs: rules.max_token_age_secs,
            },
            now,
        )
        .map_err(|check| {
            provider.count(check.outcome());
            AuthError::Identity {
                provider: provider.name.to_string(),
                refetch: matches!(check, identity::Check::UnknownKey(_)).then_some(refetch),
                check: Box::new(check),
            }
        })?;
        let subject = Arc::new(OidcSubject {
            provider: provider.name.clone(),
            subject: verified.subject.clone(),
        });
        let Some(i) = self.clients.iter().position(|c| {
            c.identity
                .as_ref()
                .is_some_and(|id| id.provider == p && claims_match(&verified.claims, &id.claims))
        }) else {
            provider.count("no_client");
            return Err(AuthError::NoClientForIdentity(subject));
        };
        provider.count("ok");
        self.identities.insert(
            token,
            IdentityHit {
                client: i,
                provider: p,
                version,
                subject: subject.clone(),
            },
            verified.valid_until,
            now,
        );
        Ok(Identity {
            name: self.clients[i].name.clone(),
            method: AuthMethod::Oidc,
            index: Some(i),
            oidc: Some(subject),
        })
    }

    /// The first client, in config order, that a verified identity token of provider `p`
    /// with `claims` is (for `explain --config`).
    pub fn identity_client(
        &self,
        p: usize,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Option<&str> {
        self.clients
            .iter()
            .find(|c| {
                c.identity
                    .as_ref()
                    .is_some_and(|id| id.provider == p && claims_match(claims, &id.claims))
            })
            .map(|c| &*c.name)
    }

    /// The client a client-key JWT in the headers authenticates; `Ok(None)` when no bearer
    /// JWT names a client's key id (such a JWT is no credential, as before client keys).
    fn client_key(&self, headers: &HeaderMap, now: i64) -> Result<Option<Identity>, AuthError> {
        if self.by_key_id.is_empty() {
            return Ok(None);
        }
        let Some((token, i)) = bearer_values(headers).find_map(|token| {
            let kid = key::kid_of(token)?;
            self.by_key_id.get(&kid).map(|&i| (token, i))
        }) else {
            return Ok(None);
        };
        let client = &self.clients[i];
        let identity = Identity {
            name: client.name.clone(),
            method: AuthMethod::ClientKey,
            index: Some(i),
            oidc: None,
        };
        if self.verified.get(token, now, |&index| index == i).is_some() {
            return Ok(Some(identity));
        }
        let public = client.client_key.as_deref().unwrap_or_default();
        let until = key::verify(token, public, now).map_err(|check| AuthError::ClientKey {
            client: client.name.to_string(),
            check,
        })?;
        self.verified.insert(token, i, until, now);
        Ok(Some(identity))
    }

    /// The client whose key id is `kid` (for `explain --config`).
    pub fn client_key_owner(&self, kid: &str) -> Option<(&str, &[u8])> {
        let &i = self.by_key_id.get(kid)?;
        let c = &self.clients[i];
        Some((&c.name, c.client_key.as_deref()?))
    }

    /// Whether `who` may send `method` to `path` (the path as the client sent it).
    pub fn allows(&self, who: &Identity, method: &str, path: &str) -> bool {
        match who.index {
            None => who.method == AuthMethod::Anonymous && self.allow_anonymous,
            Some(i) => self.clients[i].rules.iter().any(|r| {
                r.method.as_deref().is_none_or(|m| m == method) && glob_match(&r.glob, path)
            }),
        }
    }

    /// Spends one request of the client's `rate_limit`; `Err` says how long to wait.
    /// Anonymous callers and clients without a limit are not limited here.
    pub(crate) fn check_rate(&self, who: &Identity, now: Instant) -> Result<(), Duration> {
        match who.index.and_then(|i| self.clients[i].bucket.as_ref()) {
            Some(bucket) => bucket.take(now),
            None => Ok(()),
        }
    }

    /// The key this client is pinned to, if any.
    pub(crate) fn pinned_key(&self, who: &Identity) -> Option<&str> {
        who.index.and_then(|i| self.clients[i].key.as_deref())
    }

    /// The bundle id this client is pinned to, if any.
    pub(crate) fn pinned_bundle_id(&self, who: &Identity) -> Option<&str> {
        who.index.and_then(|i| self.clients[i].bundle_id.as_deref())
    }

    /// The APNs environment of this client's pushes on APNs' own `/3/device/` path
    /// (DESIGN §18): production unless its config says development.
    pub(crate) fn apns_environment(&self, who: &Identity) -> crate::apple::Environment {
        who.index
            .map_or(crate::apple::Environment::Production, |i| {
                self.clients[i].apns_environment
            })
    }

    /// What this client may have signed (DESIGN §15); `None`, for a client without
    /// `[clients.signing]` or an anonymous caller, signs nothing.
    pub(crate) fn signing_policy(&self, who: &Identity) -> Option<&crate::config::SigningPolicy> {
        who.index.and_then(|i| self.clients[i].signing.as_ref())
    }
}

impl Client {
    fn from_config(c: &ClientConfig, bucket: Option<Arc<Bucket>>) -> Client {
        Client {
            name: Arc::from(c.name.as_str()),
            secret_sha256: c.secret_sha256,
            tls_subject: c.tls_subject.clone(),
            rules: c
                .allow
                .iter()
                .filter_map(|rule| {
                    let (method, glob) = rule.trim().split_once(char::is_whitespace)?;
                    Some(Rule {
                        method: (method != "*").then(|| method.to_string()),
                        glob: glob.trim().to_string(),
                    })
                })
                .collect(),
            key: c.key.clone(),
            bundle_id: c.bundle_id.clone(),
            client_key: c.client_key.as_ref().map(|k| k.public_key.clone()),
            signing: c.signing.clone(),
            apns_environment: c.apns_environment,
            identity: c.identity.clone(),
            bucket,
        }
    }
}

/// Every bearer token in `Proxy-Authorization`, then `Authorization`.
fn bearer_values(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    [PROXY_AUTHORIZATION, AUTHORIZATION]
        .into_iter()
        .flat_map(move |name| headers.get_all(name).iter())
        .filter_map(|v| {
            let v = header_text(v)?;
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
}

/// A credential header's value as text, trimmed. `from_utf8` rather than `to_str`: the
/// latter checks a kilobyte-long identity token byte by byte on every request, and nothing
/// here needs its narrower alphabet (a secret or a JWT with other bytes fails its own
/// check).
fn header_text(v: &http::HeaderValue) -> Option<&str> {
    std::str::from_utf8(v.as_bytes()).ok().map(str::trim)
}

/// The `aap_…` secret from `Proxy-Authorization` (preferred) or `Authorization`.
fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    [PROXY_AUTHORIZATION, AUTHORIZATION]
        .iter()
        .find_map(|name| {
            headers.get_all(name).iter().find_map(|v| {
                let v = header_text(v)?;
                let (scheme, token) = v.split_once(' ')?;
                let token = token.trim();
                (scheme.eq_ignore_ascii_case("bearer") && token.starts_with(SECRET_PREFIX))
                    .then_some(token)
            })
        })
}

/// Whether every claim rule (name → glob, the `allow` glob syntax) is met: each named claim
/// is a string that matches its glob.
fn claims_match(
    claims: &serde_json::Map<String, serde_json::Value>,
    rules: &[(String, String)],
) -> bool {
    rules.iter().all(|(name, glob)| {
        claims
            .get(name)
            .and_then(serde_json::Value::as_str)
            .is_some_and(|v| glob_match(glob, v))
    })
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `*` matches any run of characters, `/` included; everything else is literal.
pub fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t) = (glob.as_bytes(), text.as_bytes());
    let (mut gi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ti));
            gi += 1;
        } else if gi < g.len() && g[gi] == t[ti] {
            gi += 1;
            ti += 1;
        } else if let Some((sg, st)) = star {
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

/// A fresh client secret: the prefix and 32 random bytes, base64url.
pub fn generate_secret() -> Result<String, ring::error::Unspecified> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn clients(secret: &str, allow: &str) -> Clients {
        let text = format!(
            "[[clients]]\nname = \"ci\"\nsecret_sha256 = \"{}\"\nallow = [{allow}]\n",
            crate::hex(&crate::sha256(secret.as_bytes()))
        );
        Clients::new(&Config::parse(&text, "t.toml", Path::new(".")).unwrap()).unwrap()
    }

    impl Clients {
        fn authenticate_h(&self, h: &HeaderMap) -> Result<Identity, AuthError> {
            self.authenticate(h, None, 0)
        }
    }

    #[test]
    fn certificates_match_dns_sans_first_and_cn_only_without_sans() {
        let text =
            "[[clients]]\nname = \"ci\"\ntls_subject = \"ci.internal\"\nallow = [\"GET /v1/*\"]\n";
        let c = Clients::new(&Config::parse(text, "t.toml", Path::new(".")).unwrap()).unwrap();
        let san = CertIdentity {
            dns_names: vec!["CI.internal".into()],
            common_name: Some("other".into()),
        };
        assert_eq!(
            c.authenticate(&HeaderMap::new(), Some(&san), 0)
                .unwrap()
                .method,
            AuthMethod::Certificate
        );
        let cn_only = CertIdentity {
            dns_names: vec![],
            common_name: Some("ci.internal".into()),
        };
        assert_eq!(
            c.authenticate(&HeaderMap::new(), Some(&cn_only), 0)
                .unwrap()
                .name,
            "ci".into()
        );
        let cn_but_sans = CertIdentity {
            dns_names: vec!["x.internal".into()],
            common_name: Some("ci.internal".into()),
        };
        assert_eq!(
            c.authenticate(&HeaderMap::new(), Some(&cn_but_sans), 0)
                .unwrap_err(),
            AuthError::Missing
        );
    }

    #[test]
    fn names_are_read_from_a_real_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["ci.internal".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "CI Runner");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let id = CertIdentity::from_der(cert.der()).unwrap();
        assert_eq!(id.dns_names, ["ci.internal"]);
        assert_eq!(id.common_name.as_deref(), Some("CI Runner"));
        assert_eq!(CertIdentity::from_der(b"garbage"), None);
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn secrets_are_accepted_in_either_header_and_sdk_jwts_are_not_credentials() {
        let c = clients("aap_good", "\"GET /v1/*\"");
        assert_eq!(
            c.authenticate_h(&headers(&[("proxy-authorization", "Bearer aap_good")]))
                .unwrap()
                .name,
            "ci".into()
        );
        assert_eq!(
            c.authenticate_h(&headers(&[("authorization", "bearer aap_good")]))
                .unwrap()
                .name,
            "ci".into()
        );
        assert_eq!(
            c.authenticate_h(&headers(&[("authorization", "Bearer aap_bad")]))
                .unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(
            c.authenticate_h(&headers(&[("authorization", "Bearer eyJhbGciOi.x.y")]))
                .unwrap_err(),
            AuthError::Missing
        );
        assert_eq!(
            c.authenticate_h(&HeaderMap::new()).unwrap_err(),
            AuthError::Missing
        );
        // Anonymous access exists only without clients; a presented secret is still checked.
        let anon = Clients::new(
            &Config::parse(
                "[server]\nallow_anonymous = true\n",
                "t.toml",
                Path::new("."),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            anon.authenticate_h(&HeaderMap::new()).unwrap().method,
            AuthMethod::Anonymous
        );
        assert_eq!(
            anon.authenticate_h(&headers(&[("authorization", "Bearer aap_bad")]))
                .unwrap_err(),
            AuthError::Invalid
        );
    }

    #[test]
    fn allow_rules_default_deny_and_glob_across_slashes() {
        let c = clients("aap_s", "\"GET /v1/apps*\", \"* /sandbox/inApps/*\"");
        let who = c
            .authenticate_h(&headers(&[("authorization", "Bearer aap_s")]))
            .unwrap();
        assert!(c.allows(&who, "GET", "/v1/apps"));
        assert!(c.allows(&who, "GET", "/v1/apps/1/builds"));
        assert!(!c.allows(&who, "POST", "/v1/apps"));
        assert!(c.allows(&who, "POST", "/sandbox/inApps/v1/x"));
        assert!(!c.allows(&who, "GET", "/inApps/v1/x"));
        assert!(!c.allows(&who, "GET", "/v1/builds"));
    }

    #[test]
    fn rate_limits_allow_a_burst_then_refill_at_the_rate() {
        let b = Bucket::new(RateLimit::parse("2/s").unwrap());
        let t0 = Instant::now();
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        let wait = b.take(t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(490) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(b.take(t0 + Duration::from_millis(250)).is_err());
        assert!(b.take(t0 + Duration::from_millis(500)).is_ok());
        assert!(b.take(t0 + Duration::from_secs(60)).is_ok(), "refills");
        assert!(
            b.take(t0 + Duration::from_secs(60)).is_ok(),
            "burst capped at 2"
        );
        assert!(b.take(t0 + Duration::from_secs(60)).is_err());
    }

    #[test]
    fn glob_table() {
        for (g, t, want) in [
            ("/v1/*", "/v1/a/b", true),
            ("/v1/*/builds", "/v1/a/b/builds", true),
            ("/v1/*/builds", "/v1/a/b/build", false),
            ("*", "", true),
            ("/a", "/a", true),
            ("/a", "/ab", false),
            ("/a*b*c", "/aXbYc", true),
            ("/a*b*c", "/aXbY", false),
        ] {
            assert_eq!(glob_match(g, t), want, "{g} ~ {t}");
        }
    }

    #[test]
    fn generated_secrets_have_the_prefix_and_differ() {
        let a = generate_secret().unwrap();
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == 4 + 43);
        assert_ne!(a, generate_secret().unwrap());
    }

    /// Identity tokens (DESIGN §17) against a provider whose keys are set in place of a
    /// fetch: signed with RustCrypto's p256, verified with ring.
    #[test]
    fn identity_tokens_pick_the_first_matching_client_and_are_remembered_until_keys_change() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        use p256::ecdsa::signature::Signer as _;
        use serde_json::json;
        let iss = "https://token.actions.githubusercontent.com";
        let text = format!(
            "[[identity_providers]]\nname = \"gha\"\nissuer = \"{iss}\"\naudience = \"aap\"\n\
             [[clients]]\nname = \"release\"\nallow = [\"* /v1/*\"]\n\
             identity = {{ provider = \"gha\", claims = {{ repository = \"example/app\", ref = \"refs/heads/main\" }} }}\n\
             [[clients]]\nname = \"any-branch\"\nallow = [\"GET /v1/*\"]\n\
             identity = {{ provider = \"gha\", claims = {{ repository = \"example/*\" }} }}\n"
        );
        let c = Clients::new(&Config::parse(&text, "t.toml", Path::new(".")).unwrap()).unwrap();
        let key = p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap();
        let point = key.verifying_key().to_encoded_point(false);
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
            "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()), "y": URL_SAFE_NO_PAD.encode(point.y().unwrap())}]});
        let provider = c.identity_providers().next().unwrap().clone();
        let now = 1_800_000_000;
        let jwt = |kid: &str, repository: &str, git_ref: &str| {
            let signed = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(json!({"alg": "ES256", "kid": kid}).to_string()),
                URL_SAFE_NO_PAD.encode(
                    json!({"iss": iss, "aud": "aap", "sub": format!("repo:{repository}"),
                    "repository": repository, "ref": git_ref, "iat": now, "exp": now + 300})
                    .to_string()
                )
            );
            let sig: p256::ecdsa::Signature = key.sign(signed.as_bytes());
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
        };
        let bearer = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
            h
        };
        let main = jwt("k1", "example/app", "refs/heads/main");
        // No keys fetched yet: unavailable, and worth a refetch.
        let e = c.authenticate(&bearer(&main), None, now).unwrap_err();
        assert!(matches!(e, AuthError::IdentityUnavailable { .. }), "{e}");
        assert_eq!(e.refetchable().map(|r| r.provider), Some(0));

        provider.set_keys(identity::KeySet::parse(jwks.to_string().as_bytes()).unwrap());
        let who = c.authenticate(&bearer(&main), None, now).unwrap();
        assert_eq!((&*who.name, who.method), ("release", AuthMethod::Oidc));
        assert_eq!(&*who.oidc.as_ref().unwrap().subject, "repo:example/app");
        assert!(c.allows(&who, "POST", "/v1/builds"));
        // First match wins: a feature branch falls through to the second client.
        let feature = jwt("k1", "example/app", "refs/heads/feature");
        let who = c.authenticate(&bearer(&feature), None, now).unwrap();
        assert_eq!(&*who.name, "any-branch");
        assert!(!c.allows(&who, "POST", "/v1/builds"));
        // Valid, but no client's claims match: the error names the subject.
        let e = c
            .authenticate(
                &bearer(&jwt("k1", "evil/app", "refs/heads/main")),
                None,
                now,
            )
            .unwrap_err();
        assert!(e.to_string().contains("subject `repo:evil/app`"), "{e}");
        // An unknown kid may be found by a refetch; the error never holds the token.
        let e = c
            .authenticate(
                &bearer(&jwt("k2", "example/app", "refs/heads/main")),
                None,
                now,
            )
            .unwrap_err();
        assert!(
            e.refetchable().is_some() && e.to_string().contains("unknown key"),
            "{e}"
        );
        assert!(!format!("{e:?}{e}").contains(&main[..40]));
        // Remembered: still accepted after the cache's own clock check, refused once expired.
        assert_eq!(
            &*c.authenticate(&bearer(&main), None, now + 10).unwrap().name,
            "release"
        );
        assert!(c
            .authenticate(&bearer(&main), None, now + 300 + 61)
            .is_err());
        // A changed key set (a key removed at the issuer) is never answered from memory.
        provider.set_keys(
            identity::KeySet::parse(
                br#"{"keys":[{"kty":"EC","crv":"P-256","kid":"other","x":"AA","y":"AA"}]}"#,
            )
            .unwrap_or_default(),
        );
        let e = c.authenticate(&bearer(&main), None, now + 10).unwrap_err();
        assert!(
            e.to_string().contains("unknown key") || e.to_string().contains("no usable"),
            "{e}"
        );
        let ok = provider
            .stats()
            .verifications
            .iter()
            .find(|(o, _)| *o == "ok")
            .map(|(_, n)| *n);
        assert_eq!(ok, Some(3));
    }
}
