//! Who is calling and what they may call.
//!
//! A client proves itself with a bearer secret (`aap_…`) in `Proxy-Authorization` or
//! `Authorization` (config stores only its SHA-256, compared in constant time), with a
//! client key (DESIGN §17b: the JWT an Apple SDK signs with a key the proxy issued, whose
//! `kid` is the client's `key_id`; see [`key`]), or with its TLS client certificate. Any
//! other `Authorization` value (a JWT whose `kid` is no client's) is not a credential: it
//! is ignored for identity and never forwarded. Allow rules are `METHOD /path-glob`, default
//! deny, and match the path exactly as the client sent it (`*` matches across `/`).
//!
//! Imports only `config`. Holds no secret: only hashes and public keys.

pub mod key;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, PROXY_AUTHORIZATION};
use http::HeaderMap;

use crate::config::{ClientConfig, Config, RateLimit};

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
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Anonymous => "anonymous",
            AuthMethod::Secret => "secret",
            AuthMethod::Certificate => "mtls",
            AuthMethod::ClientKey => "client_key",
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
    /// Client-key JWTs already verified (SDKs reuse theirs for minutes): SHA-256 of the
    /// token → (client index, last second it stays valid). Bounded; a reload starts afresh,
    /// so a removed client key stops working at once.
    verified: Mutex<HashMap<[u8; 32], (usize, i64)>>,
}

/// Verified client-key JWTs remembered at most.
const MAX_VERIFIED: usize = 4096;

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
    pub fn new(config: &Config) -> Clients {
        Clients::carrying(config, None)
    }

    /// The clients of `config`; each one that `previous` knows by the same name and rate
    /// keeps its rate-limit bucket (a reload must not refill a spent budget).
    pub(crate) fn carrying(config: &Config, previous: Option<&Clients>) -> Clients {
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
            verified: Mutex::new(HashMap::new()),
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
                    });
                }
            }
            return if self.allow_anonymous {
                Ok(Identity {
                    name: self.anonymous.clone(),
                    method: AuthMethod::Anonymous,
                    index: None,
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
        })
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
        };
        let digest = crate::sha256(token.as_bytes());
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(index, until)) = verified.get(&digest) {
            if index == i && now <= until {
                return Ok(Some(identity));
            }
            verified.remove(&digest);
        }
        drop(verified);
        let public = client.client_key.as_deref().unwrap_or_default();
        let until = key::verify(token, public, now).map_err(|check| AuthError::ClientKey {
            client: client.name.to_string(),
            check,
        })?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= MAX_VERIFIED {
            verified.retain(|_, (_, until)| *until >= now);
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
        }
        verified.insert(digest, (i, until));
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
            let v = v.to_str().ok()?.trim();
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
}

/// The `aap_…` secret from `Proxy-Authorization` (preferred) or `Authorization`.
fn presented_secret(headers: &HeaderMap) -> Option<&str> {
    [PROXY_AUTHORIZATION, AUTHORIZATION]
        .iter()
        .find_map(|name| {
            headers.get_all(name).iter().find_map(|v| {
                let v = v.to_str().ok()?.trim();
                let (scheme, token) = v.split_once(' ')?;
                let token = token.trim();
                (scheme.eq_ignore_ascii_case("bearer") && token.starts_with(SECRET_PREFIX))
                    .then_some(token)
            })
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
        Clients::new(&Config::parse(&text, "t.toml", Path::new(".")).unwrap())
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
        let c = Clients::new(&Config::parse(text, "t.toml", Path::new(".")).unwrap());
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
        );
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
}
