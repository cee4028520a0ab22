//! `proxy.toml` → `raw` (serde, unknown fields rejected) → `validate` → [`Config`], the
//! validated settings the runtime is built from.
//!
//! Owns the configuration's shape, its defaults and every rule that can be checked without
//! I/O beyond reading the file itself. Every error names the file, the field and a fix, so an
//! operator can act on `apple-api-proxy check` output without reading code. Loading key
//! material is `token::key`'s job; this module only records where each key comes from.
//!
//! Relative paths in the file (`private_key_file`, `ca_file`, …) are resolved against the
//! directory holding the config file, so `--config /etc/aap/proxy.toml` finds
//! `keys/AuthKey_X.p8` next to it whatever the working directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use crate::apple::{self, Api, Environment, KeyKind};

mod raw;
mod validate;

use raw::RawConfig;
use validate::Validator;

/// A configuration problem: where it is and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the config file: {error} (fix: check the path given to --config and its permissions)")]
    Read { file: String, error: std::io::Error },
    #[error("{file}: {message}(fix: correct or remove the field; proxy.toml in the repository documents every field)")]
    Syntax { file: String, message: String },
    #[error("{file}: field `{field}`: {problem} (fix: {fix})")]
    Invalid {
        file: String,
        field: String,
        problem: String,
        fix: String,
    },
}

/// Where a key's PEM comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Env(String),
    /// Key material handed over in memory (unit tests); never from TOML.
    Inline(String),
    /// A non-exportable key in a PKCS#11 token (DESIGN §16).
    Pkcs11(Pkcs11Source),
}

/// `pkcs11 = { module, token_label, key_label, pin_env | pin_file }` on a key (DESIGN §16):
/// where the HSM's library is, which token, which key object, and where its user PIN is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Source {
    /// The PKCS#11 library (e.g. `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    pub token_label: String,
    /// `CKA_LABEL` of the private key (and of its public key object).
    pub key_label: String,
    pub pin: PinSource,
    /// Sessions the proxy keeps open to sign with this key (the most signatures in flight).
    pub sessions: usize,
}

/// Where a token's user PIN is read from; the PIN itself is never in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinSource {
    Env(String),
    File(PathBuf),
}

impl fmt::Display for Pkcs11Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PKCS#11 module {}, token `{}`, key `{}`",
            self.module.display(),
            self.token_label,
            self.key_label
        )
    }
}

impl fmt::Display for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::Env(v) => write!(f, "environment variable {v}"),
            PinSource::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "File({})", p.display()),
            KeySource::Env(v) => write!(f, "Env({v})"),
            KeySource::Inline(_) => f.write_str("Inline(<redacted>)"),
            KeySource::Pkcs11(p) => write!(f, "Pkcs11({p:?})"),
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "file {}", p.display()),
            KeySource::Env(v) => write!(f, "environment variable {v}"),
            KeySource::Inline(_) => f.write_str("in-memory key"),
            KeySource::Pkcs11(p) => p.fmt(f),
        }
    }
}

/// What to do when an audit record cannot be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnAuditFailure {
    Reject,
    Serve,
}

/// The validated configuration. Built only by [`Config::parse`] / [`Config::load`] or by code
/// (tests) that fills every field itself.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from, for messages (the name given to [`Config::parse`] for text).
    pub source: String,
    pub server: Server,
    pub audit: Audit,
    pub upstream: Upstream,
    pub tokens: Tokens,
    pub apis: BTreeMap<Api, ApiSettings>,
    pub keys: Vec<KeyConfig>,
    pub clients: Vec<ClientConfig>,
    /// `[[identity_providers]]`: OIDC issuers whose ID tokens authenticate clients (DESIGN §17).
    pub identity_providers: Vec<IdentityProviderConfig>,
    pub log: Log,
}

/// An OIDC issuer whose ID tokens authenticate clients (DESIGN §17).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityProviderConfig {
    pub name: String,
    /// Exactly the tokens' `iss`; an https:// URL.
    pub issuer: String,
    /// The tokens' `aud` must contain it.
    pub audience: String,
    /// Where the keys are; `None`: the `jwks_uri` of the issuer's discovery document.
    pub jwks_url: Option<String>,
    /// Extra trust anchors for the issuer's (and JWKS host's) TLS.
    pub ca_file: Option<PathBuf>,
    /// Tokens issued longer ago are refused.
    pub max_token_age: Duration,
}

/// `identity = { provider, claims }` on a client: which verified identity tokens are this
/// client. Every claim must be a string matching its glob; the first client that matches wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Index into [`Config::identity_providers`].
    pub provider: usize,
    /// Claim name → glob (the `allow` glob syntax), in name order.
    pub claims: Vec<(String, String)>,
}

/// Operational logs (`tracing`). The `--log-format` flag and `RUST_LOG` override these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Log {
    /// `"text"` or `"json"`.
    pub format: String,
    /// A `RUST_LOG`-style filter, e.g. `"info"` or `"info,apple_api_proxy=debug"`.
    pub filter: String,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub allow_anonymous: bool,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
    pub max_request_body: u64,
    pub max_concurrent_requests: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's header block (slowloris guard).
    pub header_read_timeout: Duration,
    /// How long a body may go without data, in either direction, before it is cut off.
    pub body_idle_timeout: Duration,
    /// A client connection with no request in flight for this long is closed (HTTP/1
    /// before its first byte and between requests; HTTP/2 with no open stream).
    pub idle_timeout: Duration,
    /// Open client connections at most; beyond it new ones are closed at once.
    pub max_connections: usize,
}

#[derive(Clone, Debug)]
pub struct Audit {
    /// `None` = stdout (`path = "-"`).
    pub path: Option<PathBuf>,
    pub on_failure: OnAuditFailure,
    pub fsync: Fsync,
}

/// When the audit log is forced to disk. Every record is written (flushed to the OS) at once
/// whatever this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// After every record: nothing acknowledged is lost in a power cut; slowest.
    Always,
    /// At most this long after a record (default 1 s).
    Interval(Duration),
    /// Leave it to the OS.
    Off,
}

#[derive(Clone, Debug)]
pub struct Upstream {
    /// Extra trust anchors (PEM), added to the host's roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub egress_proxy: Option<String>,
}

/// Token minting policy common to all keys.
#[derive(Clone, Debug)]
pub struct Tokens {
    /// How far `iat` is back-dated (counted inside the lifetime). Apple rejects an `iat` in
    /// its future; fastlane uses 60 s. [APPLE.md §5]
    pub iat_leeway: Duration,
    /// Methods whose App Store Connect tokens carry a `scope`. Apple documents only GET.
    pub scope_methods: Vec<String>,
    /// Lifetime of unscoped App Store Connect tokens (non-GET requests), capped by the key's.
    pub unscoped_lifetime: Duration,
    /// How many tokens the cache holds at most.
    pub cache_capacity: usize,
    /// A `Date` from Apple further than this from this host's clock is not believed
    /// (DESIGN §13b): one broken or hostile response must not move every key's `iat`.
    pub max_clock_offset: Duration,
}

#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub base_url: Option<Uri>,
    pub sandbox_base_url: Option<Uri>,
    pub sandbox_fallback: bool,
    /// Enforce Apple's documented per-endpoint limits locally (storekit APIs).
    pub enforce_apple_limits: bool,
    /// This replica's part of each limit (e.g. 0.5 with two replicas).
    pub apple_limit_fraction: f64,
    /// The exchange APIs' token endpoint, overriding Apple's (DESIGN §18).
    pub token_url: Option<Uri>,
    /// Apple Business/School Manager: send the exchange's parameters in the query string
    /// (Apple's sample) instead of the form body (the OAuth standard, the default).
    pub token_params_in_query: bool,
}

impl Default for ApiSettings {
    fn default() -> ApiSettings {
        ApiSettings {
            base_url: None,
            sandbox_base_url: None,
            sandbox_fallback: false,
            enforce_apple_limits: false,
            apple_limit_fraction: 1.0,
            token_url: None,
            token_params_in_query: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct KeyConfig {
    pub name: String,
    pub kind: KeyKind,
    pub key_id: String,
    pub issuer_id: Option<String>,
    pub bundle_id: Option<String>,
    pub source: KeySource,
    pub apis: Vec<Api>,
    /// Already capped at the kind's Apple maximum.
    pub token_lifetime: Duration,
    /// Developer keys: the Apple Developer team id, the tokens' `iss`.
    pub team_id: Option<String>,
    /// Developer keys serving WeatherKit: the service id (`sub`, and the header's `id`).
    pub service_id: Option<String>,
    /// Developer keys: how old APNs' (DeviceCheck's, App Attest's) provider token gets
    /// before it is renewed (20–55 min, default 40).
    pub apns_token_refresh: Duration,
    /// Apple Business/School Manager keys: the client id (`BUSINESSAPI.…`/`SCHOOLAPI.…`).
    pub client_id: Option<String>,
    /// Developer keys serving Sign in with Apple: the services/app ids whose
    /// `client_secret` this key makes (a form's `client_id` picks the key).
    pub client_ids: Vec<String>,
    /// Sign in with Apple: the `client_secret`'s `exp - iat` (default 10 min; ≤ 6 months).
    pub client_secret_lifetime: Duration,
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub name: String,
    pub secret_sha256: Option<[u8; 32]>,
    pub tls_subject: Option<String>,
    pub allow: Vec<String>,
    pub key: Option<String>,
    pub bundle_id: Option<String>,
    pub rate_limit: Option<RateLimit>,
    /// `key_id` with `public_key_file`/`public_key`: the client key its SDK signs with
    /// (DESIGN §17b).
    pub client_key: Option<ClientKey>,
    /// `[clients.signing]`; `None`: the client signs nothing (DESIGN §15, default deny).
    pub signing: Option<SigningPolicy>,
    /// Where this client's pushes on APNs' own `/3/device/` path go (DESIGN §18).
    pub apns_environment: Environment,
    /// The identity tokens that authenticate this client (DESIGN §17).
    pub identity: Option<ClientIdentity>,
}

/// A client key (DESIGN §17b): the `kid` a client's SDK puts in its JWT header, and the
/// public half the proxy verifies that JWT with. The private half stays with the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientKey {
    pub key_id: String,
    /// Uncompressed SEC1 P-256 point (65 bytes).
    pub public_key: Vec<u8>,
}

/// What a client may have the proxy sign with an In-App Purchase key (DESIGN §15). Every
/// list is an allow list; an empty one allows nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SigningPolicy {
    /// Globs over `product_id`, and over every `SKU` in an Advanced Commerce request.
    pub products: Vec<String>,
    /// Globs over `offer_id`.
    pub offers: Vec<String>,
    /// Whether the client may sign `allow_introductory_offer = true`.
    pub grant_introductory_offer: bool,
    /// Advanced Commerce `operation`s the client may sign.
    pub operations: Vec<String>,
    /// Advanced Commerce currencies (ISO 4217); `None`: any.
    pub currencies: Option<Vec<String>>,
    /// No `price` anywhere in an Advanced Commerce request may exceed it; set whenever
    /// `operations` is.
    pub max_price: Option<i64>,
}

/// `"20/s"`: at most `count` requests per `per`, with bursts up to `count`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
}

impl RateLimit {
    /// `"20/s"`, `"100/m"`, `"1000/h"`, `"5/10s"`.
    pub fn parse(s: &str) -> Option<RateLimit> {
        let (count, per) = s.trim().split_once('/')?;
        let count: u32 = count.trim().parse().ok().filter(|c| *c > 0)?;
        let per = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => parse_duration(other).filter(|d| !d.is_zero())?,
        };
        Some(RateLimit { count, per })
    }
}

// ---------------------------------------------------------------------------------------
// Defaults (also documented in proxy.toml).

pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub(crate) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub(crate) const DEFAULT_MAX_REQUEST_BODY: u64 = 10 * 1024 * 1024;
pub(crate) const DEFAULT_MAX_CONCURRENT: usize = 1024;
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_secs(1);
pub(crate) const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(5 * 60);
pub(crate) const DEFAULT_IAT_LEEWAY: Duration = Duration::from_secs(60);
pub(crate) const DEFAULT_UNSCOPED_LIFETIME: Duration = Duration::from_secs(3 * 60);
pub(crate) const DEFAULT_CACHE_CAPACITY: usize = 10_000;
pub(crate) const DEFAULT_MAX_CLOCK_OFFSET: Duration = Duration::from_secs(60 * 60);
/// A token is re-minted when less than this remains; it must also outlive the request.
pub(crate) const MIN_USEFUL_LIFETIME: Duration = Duration::from_secs(90);

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            file: file.clone(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &file, base)
    }

    /// Parses and validates TOML text; `file` names it in errors, `base_dir` anchors relative
    /// paths.
    pub fn parse(text: &str, file: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_string(),
            message: syntax_message(text, &e),
        })?;
        Validator { file, base_dir }.validate(raw)
    }

    /// Settings for `api` (all defaults when the file has no `[apis.<id>]` table).
    pub fn api(&self, api: Api) -> ApiSettings {
        self.apis.get(&api).cloned().unwrap_or_default()
    }

    pub fn key(&self, name: &str) -> Option<&KeyConfig> {
        self.keys.iter().find(|k| k.name == name)
    }

    /// The key that signs for `api` when the client pins none: the first listed for it.
    pub fn default_key_for(&self, api: Api) -> Option<&KeyConfig> {
        self.keys.iter().find(|k| k.apis.contains(&api))
    }
}

/// A TOML error as line, column and message — without the excerpt of the file `toml`
/// prints, which would echo a value (a PIN, a pasted key) typed where it does not belong.
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("TOML parse error at line {line}, column {column}: {message} ")
        }
        None => format!("TOML parse error: {message} "),
    }
}

/// Apple's lifetime cap for the family a key kind signs for.
pub(crate) fn kind_max_lifetime(kind: KeyKind) -> Duration {
    match kind {
        KeyKind::InAppPurchase => apple::STOREKIT_MAX_LIFETIME,
        KeyKind::Team | KeyKind::Individual => apple::CONNECT_MAX_LIFETIME,
        KeyKind::Developer => apple::MUSIC_MAX_LIFETIME,
        KeyKind::BusinessManager => apple::ASSERTION_MAX_LIFETIME,
    }
}

/// `"30s"`, `"5m"`, `"1h 30m"`, `"250ms"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s.trim()).ok()
}

/// `"10MiB"`, `"512 KiB"`, `"1GB"`, `"1000"` → bytes. Binary (KiB) and decimal (KB) units.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Expands `${NAME}` from the environment; `Err(NAME)` when one is unset.
pub(super) fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        out.push_str(&std::env::var(name).map_err(|_| name.to_string())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub(super) fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "57246542-96fe-1a63-e053-0824d011072a";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", Path::new("/etc/aap"))
    }

    fn key_block(extra: &str) -> String {
        format!(
            "[[keys]]\nname = \"connect\"\nkind = \"team\"\nkey_id = \"2X9R4HXF34\"\nissuer_id = \"{ISS}\"\nprivate_key_file = \"keys/AuthKey_2X9R4HXF34.p8\"\napis = [\"app-store-connect\"]\n{extra}"
        )
    }

    #[test]
    fn empty_file_gets_the_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.server.max_request_body, 10 * 1024 * 1024);
        assert!(!c.server.allow_anonymous);
        assert_eq!(
            c.audit.path.as_deref(),
            Some(Path::new("/etc/aap/audit.jsonl"))
        );
        assert_eq!(c.tokens.iat_leeway, Duration::from_secs(60));
    }

    #[test]
    fn unknown_fields_are_errors_that_name_the_file_and_field() {
        let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:"), "{err}");
        assert!(err.contains("lisen"), "{err}");
        assert!(err.contains("fix:"), "{err}");
        let err = parse("[apis.app-store-conect]\n").unwrap_err().to_string();
        assert!(err.contains("app-store-conect"), "{err}");
    }

    #[test]
    fn relative_key_paths_resolve_against_the_config_directory() {
        let c = parse(&key_block("")).unwrap();
        assert_eq!(
            c.keys[0].source,
            KeySource::File(PathBuf::from("/etc/aap/keys/AuthKey_2X9R4HXF34.p8"))
        );
    }

    #[test]
    fn paths_expand_environment_variables_such_as_systemds_credentials_directory() {
        std::env::set_var(
            "AAP_TEST_CREDS_DIR",
            "/run/credentials/apple-api-proxy.service",
        );
        let text = key_block("").replace(
            "keys/AuthKey_2X9R4HXF34.p8",
            "${AAP_TEST_CREDS_DIR}/AuthKey_2X9R4HXF34.p8",
        );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.keys[0].source,
            KeySource::File(PathBuf::from(
                "/run/credentials/apple-api-proxy.service/AuthKey_2X9R4HXF34.p8"
            ))
        );
        let err = parse(&key_block("").replace("keys/", "${AAP_TEST_SURELY_UNSET}/"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("keys[0].private_key_file") && err.contains("AAP_TEST_SURELY_UNSET"),
            "{err}"
        );
    }

    #[test]
    fn a_pkcs11_key_is_validated_field_by_field() {
        let hsm = |table: &str| {
            key_block("").replace(
                "private_key_file = \"keys/AuthKey_2X9R4HXF34.p8\"",
                &format!("pkcs11 = {{ {table} }}"),
            )
        };
        let full = "module = \"/usr/lib/softhsm/libsofthsm2.so\", token_label = \"apple\", key_label = \"AuthKey_2X9R4HXF34\"";
        let c = parse(&hsm(&format!("{full}, pin_file = \"hsm-pin\""))).unwrap();
        assert_eq!(
            c.keys[0].source,
            KeySource::Pkcs11(Pkcs11Source {
                module: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
                token_label: "apple".into(),
                key_label: "AuthKey_2X9R4HXF34".into(),
                pin: PinSource::File(PathBuf::from("/etc/aap/hsm-pin")),
                sessions: 4,
            })
        );
        let c = parse(&hsm(&format!(
            "{full}, pin_env = \"HSM_PIN\", sessions = 16"
        )))
        .unwrap();
        let KeySource::Pkcs11(p) = &c.keys[0].source else {
            panic!("{:?}", c.keys[0].source)
        };
        assert_eq!(
            (&p.pin, p.sessions),
            (&PinSource::Env("HSM_PIN".into()), 16)
        );
        for (table, field, says) in [
            (
                "token_label = \"apple\", key_label = \"k\", pin_env = \"P\"",
                "keys[0].pkcs11.module",
                "is missing",
            ),
            (
                "module = \"/m.so\", key_label = \"k\", pin_env = \"P\"",
                "keys[0].pkcs11.token_label",
                "is missing",
            ),
            (
                "module = \"/m.so\", token_label = \"apple\", key_label = \"\", pin_env = \"P\"",
                "keys[0].pkcs11.key_label",
                "is empty",
            ),
            (full, "keys[0].pkcs11.pin_env", "no source"),
            (
                &format!("{full}, pin_env = \"P\", pin_file = \"f\""),
                "keys[0].pkcs11.pin_env",
                "both",
            ),
            (
                &format!("{full}, pin_env = \"P\", sessions = 0"),
                "keys[0].pkcs11.sessions",
                "not in 1..=64",
            ),
            (&format!("{full}, pin = \"1234\""), "`pin`", "unknown field"),
            (
                &format!("{full}, pin_env = \"1234\""),
                "keys[0].pkcs11.pin_env",
                "not an environment variable name",
            ),
            (
                &format!("{full}, pin_file = \"\""),
                "keys[0].pkcs11.pin_file",
                "is empty",
            ),
        ] {
            let err = parse(&hsm(table)).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(says), "{table}: {err}");
            assert!(
                !err.contains("1234"),
                "a PIN in the config is never echoed: {err}"
            );
        }
        let both = key_block(&format!("pkcs11 = {{ {full}, pin_env = \"P\" }}"));
        let err = parse(&both).unwrap_err().to_string();
        assert!(
            err.contains("keys[0].pkcs11") && err.contains("private_key_file"),
            "{err}"
        );
    }

    #[test]
    fn lifetimes_are_capped_at_apples_maximum_whatever_the_config_says() {
        let c = parse(&key_block("token_lifetime = \"2h\"")).unwrap();
        assert_eq!(c.keys[0].token_lifetime, apple::CONNECT_MAX_LIFETIME);
    }

    #[test]
    fn field_errors_name_the_field_and_a_fix() {
        let cases = [
            (
                key_block("token_lifetime = \"soon\""),
                "keys[0].token_lifetime",
            ),
            (
                key_block("").replace("\"team\"", "\"teem\""),
                "keys[0].kind",
            ),
            (
                key_block("").replace("app-store-connect", "app-store-server"),
                "keys[0].apis",
            ),
            (
                key_block("").replace(&format!("issuer_id = \"{ISS}\"\n"), ""),
                "keys[0].issuer_id",
            ),
            (
                "[server]\nlisten = \"localhost\"\n".to_string(),
                "server.listen",
            ),
            (
                "[server]\nmax_request_body = \"ten\"\n".to_string(),
                "server.max_request_body",
            ),
            (
                "[apis.app-store-connect]\nbase_url = \"http://x\"\n".to_string(),
                "apis.app-store-connect.base_url",
            ),
            (
                "[apis.notary]\nsandbox_fallback = true\n".to_string(),
                "apis.notary.sandbox_fallback",
            ),
            (
                format!("{}{}", key_block(""), key_block("")),
                "keys[1].name",
            ),
            (
                "[[clients]]\nname = \"ci\"\nallow = [\"GET /v1/*\"]\n".to_string(),
                "clients[0].secret_sha256",
            ),
            (
                format!(
                    "[[clients]]\nname = \"ci\"\nsecret_sha256 = \"{}\"\nrate_limit = \"fast\"\n",
                    "ab".repeat(32)
                ),
                "clients[0].rate_limit",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(&format!("field `{field}`")), "{field}: {err}");
            assert!(err.contains("fix:"), "{err}");
        }
    }

    #[test]
    fn exchange_and_sign_in_keys_are_validated_naming_the_field() {
        const KID: &str = "d136aa66-0c3b-4bd4-9892-c20e8db024ab";
        let manager = |kid: &str, client_id: &str, apis: &str| {
            format!(
                "[[keys]]\nname = \"abm\"\nkind = \"business-manager\"\nkey_id = \"{kid}\"\n{client_id}private_key_file = \"keys/abm.pem\"\napis = {apis}\n"
            )
        };
        let business = "client_id = \"BUSINESSAPI.9703f56c\"\n";
        let developer = |extra: &str, apis: &str| {
            format!(
                "[[keys]]\nname = \"dev\"\nkind = \"developer\"\nkey_id = \"ABC123DEFG\"\nteam_id = \"DEF123GHIJ\"\n{extra}private_key_file = \"keys/AuthKey_ABC123DEFG.p8\"\napis = {apis}\n"
            )
        };
        let good = format!(
            "{}{}[apis.apple-business]\ntoken_url = \"https://account.example/token\"\ntoken_request = \"query\"\n",
            manager(KID, business, r#"["apple-business"]"#),
            developer("client_ids = [\"com.example.web\"]\n", r#"["maps", "sign-in-with-apple"]"#),
        );
        let c = parse(&good).unwrap();
        assert_eq!(c.keys[0].client_id.as_deref(), Some("BUSINESSAPI.9703f56c"));
        assert_eq!(c.keys[1].client_ids, ["com.example.web"]);
        assert_eq!(c.keys[1].client_secret_lifetime, Duration::from_secs(600));
        let settings = &c.apis[&Api::AppleBusiness];
        assert!(settings.token_params_in_query);
        assert_eq!(
            settings
                .token_url
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("https://account.example/token")
        );

        let cases = [
            (
                manager("ABC123DEFG", business, r#"["apple-business"]"#),
                "keys[0].key_id",
                "UUID",
            ),
            (
                manager(KID, "", r#"["apple-business"]"#),
                "keys[0].client_id",
                "need the client id",
            ),
            (
                manager(KID, business, r#"["apple-school"]"#),
                "keys[0].client_id",
                "SCHOOLAPI.",
            ),
            (
                manager(KID, business, r#"["maps"]"#),
                "keys[0].apis",
                "business-manager keys serve",
            ),
            (
                manager(
                    KID,
                    &format!("{business}team_id = \"DEF123GHIJ\"\n"),
                    r#"["apple-business"]"#,
                ),
                "keys[0].team_id",
                "only developer keys",
            ),
            (
                developer("", r#"["sign-in-with-apple"]"#),
                "keys[0].client_ids",
                "client ids",
            ),
            (
                developer("client_ids = [\"a\"]\n", r#"["maps"]"#),
                "keys[0].client_ids",
                "sign-in-with-apple",
            ),
            (
                developer("client_ids = [\"a b\"]\n", r#"["sign-in-with-apple"]"#),
                "keys[0].client_ids",
                "not a client id",
            ),
            (
                developer("client_id = \"x\"\n", r#"["maps"]"#),
                "keys[0].client_id",
                "only business-manager",
            ),
            (
                format!(
                    "{}{}",
                    developer("client_ids = [\"a\"]\n", r#"["sign-in-with-apple"]"#),
                    developer("client_ids = [\"a\"]\n", r#"["sign-in-with-apple"]"#)
                        .replace("\"dev\"", "\"dev2\"")
                ),
                "keys[1].client_ids",
                "already key `dev`'s",
            ),
            (
                "[apis.weatherkit]\ntoken_url = \"https://x/t\"\n".to_string(),
                "apis.weatherkit.token_url",
                "exchanges no token",
            ),
            (
                "[apis.maps]\ntoken_url = \"http://x/t\"\n".to_string(),
                "apis.maps.token_url",
                "https://",
            ),
            (
                "[apis.maps]\ntoken_request = \"query\"\n".to_string(),
                "apis.maps.token_request",
                "client-credentials",
            ),
            (
                "[apis.apple-school]\ntoken_request = \"json\"\n".to_string(),
                "apis.apple-school.token_request",
                "\"form\"",
            ),
        ];
        for (text, field, needle) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(&format!("field `{field}`")), "{field}: {err}");
            assert!(err.contains(needle), "{field}: {err}");
        }
    }

    /// An In-App Purchase key that signs in-app signatures, and a client with `signing`.
    fn signing_config(key_apis: &str, signing: &str) -> String {
        format!(
            "[[keys]]\nname = \"iap\"\nkind = \"in-app-purchase\"\nkey_id = \"2X9R4HXF34\"\nissuer_id = \"{ISS}\"\nbundle_id = \"com.example.app\"\nprivate_key_file = \"keys/SubscriptionKey_2X9R4HXF34.p8\"\napis = {key_apis}\n\
             [[clients]]\nname = \"shop\"\nsecret_sha256 = \"{}\"\nallow = [\"POST /proxy/v1/signatures/*\"]\n[clients.signing]\n{signing}\n",
            "ab".repeat(32)
        )
    }

    #[test]
    fn a_signing_policy_is_validated_naming_the_field() {
        let ok = signing_config(
            r#"["app-store-server", "in-app-signing"]"#,
            "products = [\"com.example.*\"]\noffers = [\"winback-*\"]\ngrant_introductory_offer = true\noperations = [\"CREATE_ONE_TIME_CHARGE\"]\ncurrencies = [\"USD\"]\nmax_price = 99990",
        );
        let c = parse(&ok).unwrap();
        let policy = c.clients[0].signing.as_ref().unwrap();
        assert_eq!(policy.max_price, Some(99990));
        assert!(policy.grant_introductory_offer);
        assert_eq!(policy.currencies.as_deref(), Some(&["USD".to_string()][..]));
        // No table: None (signs nothing).
        let without = &ok[..ok.find("[clients.signing]").unwrap()];
        assert!(parse(without).unwrap().clients[0].signing.is_none());
        let iap = r#"["in-app-signing"]"#;
        let cases = [
            (
                signing_config(iap, "operations = [\"CREATE_ONE_TIME_CHARGE\"]"),
                "clients[0].signing.max_price",
            ),
            (
                signing_config(iap, "max_price = -1"),
                "clients[0].signing.max_price",
            ),
            (
                signing_config(iap, "operations = [\"create\"]\nmax_price = 1"),
                "clients[0].signing.operations[0]",
            ),
            (
                signing_config(iap, "currencies = [\"usd\"]"),
                "clients[0].signing.currencies[0]",
            ),
            (
                signing_config(iap, "currencies = []"),
                "clients[0].signing.currencies",
            ),
            (
                signing_config(iap, "products = [\"\"]"),
                "clients[0].signing.products[0]",
            ),
            (
                signing_config(iap, "offers = [\"a\", \" \"]"),
                "clients[0].signing.offers[1]",
            ),
            (signing_config(iap, "max_pric = 1"), "max_pric"),
            (
                signing_config(r#"["app-store-server"]"#, "products = [\"a\"]"),
                "clients[0].signing",
            ),
            (
                signing_config(iap, "products = [\"a\"]")
                    .replace("[clients.signing]", "key = \"iap2\"\n[clients.signing]"),
                "clients[0].key",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        // A team key cannot sign in-app signatures: Apple's In-App Purchase key does.
        let err =
            parse(&key_block("").replace(r#"["app-store-connect"]"#, r#"["in-app-signing"]"#))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("keys[0].apis") && err.contains("in-app-signing"),
            "{err}"
        );
    }

    #[test]
    fn client_keys_are_validated_naming_the_field() {
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .public_key_pem();
        let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
            .unwrap()
            .public_key_pem();
        let client = |name: &str, extra: &str| {
            format!("[[clients]]\nname = \"{name}\"\nallow = [\"GET /inApps/*\"]\n{extra}\n")
        };
        let with_key =
            |kid: &str, pem: &str| format!("key_id = \"{kid}\"\npublic_key = \"\"\"\n{pem}\"\"\"");
        // A client key alone is a credential.
        let c = parse(&client("receipts", &with_key("CLNTKEY001", &p256))).unwrap();
        let key = c.clients[0].client_key.as_ref().unwrap();
        assert_eq!(key.key_id, "CLNTKEY001");
        assert_eq!(key.public_key.len(), 65);
        let cases = [
            (
                client("a", &with_key("CLNTKEY001", &p384)),
                "clients[0].public_key",
            ),
            (
                client(
                    "a",
                    &with_key(
                        "CLNTKEY001",
                        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                    ),
                ),
                "clients[0].public_key",
            ),
            (
                client("a", "key_id = \"CLNTKEY001\""),
                "clients[0].public_key_file",
            ),
            (
                client("a", &format!("public_key = \"\"\"\n{p256}\"\"\"")),
                "clients[0].key_id",
            ),
            (client("a", &with_key("bad id", &p256)), "clients[0].key_id"),
            (
                client(
                    "a",
                    &format!("{}\npublic_key_file = \"k.pem\"", with_key("K1", &p256)),
                ),
                "clients[0].public_key_file",
            ),
            (
                client(
                    "a",
                    "key_id = \"K1\"\npublic_key_file = \"/nonexistent/k.pem\"",
                ),
                "clients[0].public_key_file",
            ),
            (
                format!(
                    "{}{}",
                    client("a", &with_key("K1", &p256)),
                    client("b", &with_key("K1", &p256))
                ),
                "clients[1].key_id",
            ),
            (
                format!(
                    "{}{}",
                    key_block(""),
                    client("a", &with_key("2X9R4HXF34", &p256))
                ),
                "clients[0].key_id",
            ),
            (client("a", ""), "clients[0].secret_sha256"),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(&format!("field `{field}`")), "{field}: {err}");
        }
    }

    #[test]
    fn identity_providers_and_client_identities_are_validated_naming_the_field() {
        let provider = |extra: &str| {
            format!("[[identity_providers]]\nname = \"gha\"\nissuer = \"https://token.actions.githubusercontent.com\"\n{extra}\n")
        };
        let aud = "audience = \"apple-api-proxy\"";
        let client = |extra: &str| {
            format!("[[clients]]\nname = \"release-ci\"\nallow = [\"GET /v1/*\"]\n{extra}\n")
        };
        let identity = "identity = { provider = \"gha\", claims = { repository = \"example/app\", ref = \"refs/heads/main\" } }";
        let c = parse(&format!("{}{}", provider(aud), client(identity))).unwrap();
        let p = &c.identity_providers[0];
        assert_eq!(p.max_token_age, Duration::from_secs(3600));
        assert_eq!(p.jwks_url, None);
        let id = c.clients[0].identity.as_ref().unwrap();
        assert_eq!(id.provider, 0);
        assert_eq!(
            id.claims,
            [
                ("ref".to_string(), "refs/heads/main".to_string()),
                ("repository".to_string(), "example/app".to_string())
            ]
        );
        let secret = format!("secret_sha256 = \"{}\"", "a".repeat(64));
        let cases = [
            (provider(""), "identity_providers[0].audience"),
            (
                provider("audience = \" \""),
                "identity_providers[0].audience",
            ),
            (
                format!("[[identity_providers]]\nissuer = \"https://x.example\"\n{aud}\n"),
                "identity_providers[0].name",
            ),
            (
                provider(&format!("{aud}\njwks_url = \"http://x.example/jwks\"")),
                "identity_providers[0].jwks_url",
            ),
            (
                provider(&format!("{aud}\nmax_token_age = \"30s\"")),
                "identity_providers[0].max_token_age",
            ),
            (
                format!(
                    "[[identity_providers]]\nname = \"a\"\nissuer = \"http://x.example\"\n{aud}\n"
                ),
                "identity_providers[0].issuer",
            ),
            (
                format!(
                    "{}{}",
                    provider(aud),
                    provider(aud).replace("\"gha\"", "\"gha2\"")
                ),
                "identity_providers[1].issuer",
            ),
            (
                client("identity = { provider = \"nope\", claims = { sub = \"x\" } }"),
                "clients[0].identity.provider",
            ),
            (
                format!(
                    "{}{}",
                    provider(aud),
                    client("identity = { provider = \"gha\" }")
                ),
                "clients[0].identity.claims",
            ),
            (
                format!(
                    "{}{}",
                    provider(aud),
                    client("identity = { provider = \"gha\", claims = { repository = \"**\" } }")
                ),
                "clients[0].identity.claims",
            ),
            (
                format!(
                    "{}{}",
                    provider(aud),
                    client(&format!("{identity}\n{secret}"))
                ),
                "clients[0].secret_sha256",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(&format!("field `{field}`")), "{field}: {err}");
        }
    }

    #[test]
    fn rate_limits_parse() {
        let r = |count, secs| {
            Some(RateLimit {
                count,
                per: Duration::from_secs(secs),
            })
        };
        assert_eq!(RateLimit::parse("20/s"), r(20, 1));
        assert_eq!(RateLimit::parse("600/m"), r(600, 60));
        assert_eq!(RateLimit::parse("5/10s"), r(5, 10));
        assert_eq!(RateLimit::parse("1000 / h"), r(1000, 3600));
        for bad in ["", "20", "0/s", "x/s", "20/fortnight", "20/0s", "-1/s"] {
            assert_eq!(RateLimit::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("512 KiB"), Some(512 << 10));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        assert_eq!(parse_size("77"), Some(77));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999GiB"), None);
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("soon"), None);
    }
}
