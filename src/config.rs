//! `proxy.toml` → [`RawConfig`] (serde, unknown fields rejected) → [`Config`] (validated).
//!
//! Owns the configuration's shape, its defaults and every rule that can be checked without
//! I/O beyond reading the file itself. Every error names the file, the field and a fix, so an
//! operator can act on `apple-api-proxy check` output without reading code. Loading key
//! material is `token::key`'s job; this module only records where each key comes from.
//!
//! Relative paths in the file (`private_key_file`, `ca_file`, …) are resolved against the
//! directory holding the config file, so `--config /etc/aap/proxy.toml` finds
//! `keys/AuthKey_X.p8` next to it whatever the working directory.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use crate::apple::{self, Api, KeyKind};

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
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "File({})", p.display()),
            KeySource::Env(v) => write!(f, "Env({v})"),
            KeySource::Inline(_) => f.write_str("Inline(<redacted>)"),
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "file {}", p.display()),
            KeySource::Env(v) => write!(f, "environment variable {v}"),
            KeySource::Inline(_) => f.write_str("in-memory key"),
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
    pub log: Log,
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
}

impl Default for ApiSettings {
    fn default() -> ApiSettings {
        ApiSettings {
            base_url: None,
            sandbox_base_url: None,
            sandbox_fallback: false,
            enforce_apple_limits: false,
            apple_limit_fraction: 1.0,
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
// Raw, as written in TOML.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    tokens: RawTokens,
    #[serde(default)]
    apis: RawApis,
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(default)]
    clients: Vec<RawClient>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    filter: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    allow_anonymous: Option<bool>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    client_ca_file: Option<String>,
    max_request_body: Option<String>,
    max_concurrent_requests: Option<usize>,
    request_timeout: Option<String>,
    shutdown_grace: Option<String>,
    header_read_timeout: Option<String>,
    body_idle_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<String>,
    on_failure: Option<OnAuditFailure>,
    fsync: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    ca_file: Option<String>,
    connect_timeout: Option<String>,
    egress_proxy: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    iat_leeway: Option<String>,
    scope_methods: Option<Vec<String>>,
    unscoped_lifetime: Option<String>,
    cache_capacity: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApis {
    #[serde(rename = "app-store-connect")]
    app_store_connect: Option<RawApi>,
    #[serde(rename = "app-store-server")]
    app_store_server: Option<RawApi>,
    #[serde(rename = "advanced-commerce")]
    advanced_commerce: Option<RawApi>,
    #[serde(rename = "external-purchase")]
    external_purchase: Option<RawApi>,
    notary: Option<RawApi>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    base_url: Option<String>,
    sandbox_base_url: Option<String>,
    sandbox_fallback: Option<bool>,
    enforce_apple_limits: Option<bool>,
    apple_limit_fraction: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: String,
    kind: String,
    key_id: String,
    issuer_id: Option<String>,
    bundle_id: Option<String>,
    private_key_file: Option<String>,
    private_key_env: Option<String>,
    apis: Vec<String>,
    token_lifetime: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    secret_sha256: Option<String>,
    tls_subject: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    key: Option<String>,
    bundle_id: Option<String>,
    rate_limit: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Defaults (also documented in proxy.toml).

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 10 * 1024 * 1024;
pub const DEFAULT_MAX_CONCURRENT: usize = 1024;
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_IAT_LEEWAY: Duration = Duration::from_secs(60);
pub const DEFAULT_UNSCOPED_LIFETIME: Duration = Duration::from_secs(3 * 60);
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
/// A token is re-minted when less than this remains; it must also outlive the request.
pub const MIN_USEFUL_LIFETIME: Duration = Duration::from_secs(90);

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
            message: e.to_string(),
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

struct Validator<'a> {
    file: &'a str,
    base_dir: &'a Path,
}

impl Validator<'_> {
    fn invalid(
        &self,
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// A path from the file: `${VAR}` expanded from the environment (e.g.
    /// `${CREDENTIALS_DIRECTORY}/AuthKey_X.p8` under systemd's `LoadCredential=`), then
    /// resolved against the config file's directory when relative.
    fn path(&self, field: &str, p: &str) -> Result<PathBuf, ConfigError> {
        let expanded = expand_env(p).map_err(|var| {
            self.invalid(
                field,
                format!("`{p}` uses ${{{var}}}, which is not set"),
                format!("set {var} in the proxy's environment (systemd sets CREDENTIALS_DIRECTORY for LoadCredential=), or write the path out"),
            )
        })?;
        let p = Path::new(&expanded);
        Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        })
    }

    fn addr(&self, field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.invalid(
                field,
                format!("`{value}` is not an IP address with a port"),
                "write it as \"127.0.0.1:8080\" or \"[::]:8080\"",
            )
        })
    }

    fn duration(
        &self,
        field: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => parse_duration(v).ok_or_else(|| {
                self.invalid(
                    field,
                    format!("`{v}` is not a duration"),
                    "write a number with a unit, e.g. \"30s\", \"5m\", \"1h\"",
                )
            }),
        }
    }

    fn base_url(&self, field: &str, value: &str) -> Result<Uri, ConfigError> {
        let uri: Uri = value.parse().map_err(|_| {
            self.invalid(
                field,
                format!("`{value}` is not a URL"),
                "write it as \"https://host[:port]\"",
            )
        })?;
        if uri.scheme_str() != Some("https") || uri.authority().is_none() {
            return Err(self.invalid(
                field,
                format!("`{value}` is not an https:// URL"),
                "Apple is only reached over TLS; write \"https://host[:port]\" (add the stand-in's CA with [upstream] ca_file)",
            ));
        }
        if uri.query().is_some() {
            return Err(self.invalid(
                field,
                "a base URL cannot carry a query",
                "remove the `?…` part",
            ));
        }
        Ok(uri)
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let s = raw.server;
        let server = Server {
            listen: self.addr("server.listen", s.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?,
            admin_listen: match s.admin_listen.as_deref() {
                Some("") | Some("off") => None,
                other => Some(self.addr("server.admin_listen", other.unwrap_or(DEFAULT_ADMIN_LISTEN))?),
            },
            allow_anonymous: s.allow_anonymous.unwrap_or(false),
            tls_cert_file: s.tls_cert_file.as_deref().map(|p| self.path("server.tls_cert_file", p)).transpose()?,
            tls_key_file: s.tls_key_file.as_deref().map(|p| self.path("server.tls_key_file", p)).transpose()?,
            client_ca_file: s.client_ca_file.as_deref().map(|p| self.path("server.client_ca_file", p)).transpose()?,
            max_request_body: match s.max_request_body.as_deref() {
                None => DEFAULT_MAX_REQUEST_BODY,
                Some(v) => parse_size(v).ok_or_else(|| {
                    self.invalid(
                        "server.max_request_body",
                        format!("`{v}` is not a size"),
                        "write bytes with an optional unit, e.g. \"10MiB\", \"512KiB\", \"1000000\"",
                    )
                })?,
            },
            max_concurrent_requests: s.max_concurrent_requests.unwrap_or(DEFAULT_MAX_CONCURRENT),
            request_timeout: self.duration("server.request_timeout", s.request_timeout.as_deref(), DEFAULT_REQUEST_TIMEOUT)?,
            shutdown_grace: self.duration("server.shutdown_grace", s.shutdown_grace.as_deref(), DEFAULT_SHUTDOWN_GRACE)?,
            header_read_timeout: self.duration(
                "server.header_read_timeout",
                s.header_read_timeout.as_deref(),
                DEFAULT_HEADER_READ_TIMEOUT,
            )?,
            body_idle_timeout: self.duration(
                "server.body_idle_timeout",
                s.body_idle_timeout.as_deref(),
                DEFAULT_BODY_IDLE_TIMEOUT,
            )?,
        };
        if server.tls_cert_file.is_some() != server.tls_key_file.is_some() {
            return Err(self.invalid(
                "server.tls_cert_file",
                "tls_cert_file and tls_key_file must be set together",
                "set both to serve HTTPS, or neither to serve plain HTTP",
            ));
        }
        if server.client_ca_file.is_some() && server.tls_cert_file.is_none() {
            return Err(self.invalid(
                "server.client_ca_file",
                "client certificates need inbound TLS",
                "set tls_cert_file and tls_key_file too, or remove client_ca_file",
            ));
        }
        if server.max_concurrent_requests == 0 {
            return Err(self.invalid(
                "server.max_concurrent_requests",
                "must be at least 1",
                "remove it for the default (1024)",
            ));
        }

        let audit = Audit {
            path: match raw.audit.path.as_deref() {
                Some("-") => None,
                Some(p) => Some(self.path("audit.path", p)?),
                None => Some(self.path("audit.path", "audit.jsonl")?),
            },
            on_failure: raw.audit.on_failure.unwrap_or(OnAuditFailure::Reject),
            fsync: match raw.audit.fsync.as_deref() {
                None => Fsync::Interval(DEFAULT_FSYNC_INTERVAL),
                Some("always") => Fsync::Always,
                Some("off") => Fsync::Off,
                Some(v) => Fsync::Interval(parse_duration(v).filter(|d| !d.is_zero()).ok_or_else(
                    || {
                        self.invalid(
                        "audit.fsync",
                        format!("`{v}` is neither \"always\", \"off\" nor an interval"),
                        "write \"always\" (every record), an interval such as \"1s\", or \"off\"",
                    )
                    },
                )?),
            },
        };

        let upstream = Upstream {
            ca_file: raw
                .upstream
                .ca_file
                .as_deref()
                .map(|p| self.path("upstream.ca_file", p))
                .transpose()?,
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                raw.upstream.connect_timeout.as_deref(),
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            egress_proxy: raw.upstream.egress_proxy,
        };

        let t = raw.tokens;
        let tokens = Tokens {
            iat_leeway: self.duration(
                "tokens.iat_leeway",
                t.iat_leeway.as_deref(),
                DEFAULT_IAT_LEEWAY,
            )?,
            scope_methods: t
                .scope_methods
                .unwrap_or_else(|| vec!["GET".to_string()])
                .into_iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
            unscoped_lifetime: self.duration(
                "tokens.unscoped_lifetime",
                t.unscoped_lifetime.as_deref(),
                DEFAULT_UNSCOPED_LIFETIME,
            )?,
            cache_capacity: t.cache_capacity.unwrap_or(DEFAULT_CACHE_CAPACITY).max(1),
        };
        if tokens.iat_leeway > Duration::from_secs(5 * 60) {
            return Err(self.invalid(
                "tokens.iat_leeway",
                "a back-dating of more than 5 minutes eats most of a token's life",
                "use the default (60s) unless Apple's clock is far off; the proxy also learns Apple's clock from its Date header",
            ));
        }
        if tokens.unscoped_lifetime < tokens.iat_leeway + MIN_USEFUL_LIFETIME {
            return Err(self.invalid(
                "tokens.unscoped_lifetime",
                format!(
                    "must exceed iat_leeway ({}) by at least {}",
                    humantime::format_duration(tokens.iat_leeway),
                    humantime::format_duration(MIN_USEFUL_LIFETIME)
                ),
                "raise it (default 3m) or lower tokens.iat_leeway",
            ));
        }

        let mut apis = BTreeMap::new();
        let a = raw.apis;
        for (api, settings) in [
            (Api::AppStoreConnect, a.app_store_connect),
            (Api::AppStoreServer, a.app_store_server),
            (Api::AdvancedCommerce, a.advanced_commerce),
            (Api::ExternalPurchase, a.external_purchase),
            (Api::Notary, a.notary),
        ] {
            let Some(settings) = settings else { continue };
            let prefix = format!("apis.{}", api.id());
            if !api.has_sandbox() {
                if settings.sandbox_base_url.is_some() {
                    return Err(self.invalid(
                        format!("{prefix}.sandbox_base_url"),
                        format!("{} has no sandbox environment", api.id()),
                        "remove the field",
                    ));
                }
                if settings.enforce_apple_limits == Some(true) {
                    return Err(self.invalid(
                        format!("{prefix}.enforce_apple_limits"),
                        format!("Apple documents per-endpoint limits only for the storekit APIs, not {}", api.id()),
                        "remove the field",
                    ));
                }
                if settings.sandbox_fallback == Some(true) {
                    return Err(self.invalid(
                        format!("{prefix}.sandbox_fallback"),
                        format!("{} has no sandbox environment", api.id()),
                        "remove the field",
                    ));
                }
            }
            apis.insert(
                api,
                ApiSettings {
                    base_url: settings
                        .base_url
                        .as_deref()
                        .map(|u| self.base_url(&format!("{prefix}.base_url"), u))
                        .transpose()?,
                    sandbox_base_url: settings
                        .sandbox_base_url
                        .as_deref()
                        .map(|u| self.base_url(&format!("{prefix}.sandbox_base_url"), u))
                        .transpose()?,
                    sandbox_fallback: settings.sandbox_fallback.unwrap_or(false),
                    enforce_apple_limits: settings.enforce_apple_limits.unwrap_or(false),
                    apple_limit_fraction: match settings.apple_limit_fraction {
                        None => 1.0,
                        Some(f) if f > 0.0 && f <= 1.0 => f,
                        Some(f) => return Err(self.invalid(
                            format!("{prefix}.apple_limit_fraction"),
                            format!("{f} is not in (0, 1]"),
                            "set this replica's part of Apple's limits, e.g. 0.5 with two replicas",
                        )),
                    },
                },
            );
        }

        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut names = HashSet::new();
        for (i, k) in raw.keys.into_iter().enumerate() {
            let key = self.key(i, k, &tokens)?;
            if !names.insert(key.name.clone()) {
                return Err(self.invalid(
                    format!("keys[{i}].name"),
                    format!("a key named `{}` is already defined", key.name),
                    "give every key a unique name",
                ));
            }
            keys.push(key);
        }

        let mut clients = Vec::with_capacity(raw.clients.len());
        let mut client_names = HashSet::new();
        for (i, c) in raw.clients.into_iter().enumerate() {
            let client = self.client(i, c, &keys)?;
            if !client_names.insert(client.name.clone()) {
                return Err(self.invalid(
                    format!("clients[{i}].name"),
                    format!("a client named `{}` is already defined", client.name),
                    "give every client a unique name",
                ));
            }
            clients.push(client);
        }

        if server.allow_anonymous && !clients.is_empty() {
            return Err(self.invalid(
                "server.allow_anonymous",
                "anonymous access would let any caller bypass the [[clients]] allow rules",
                "set allow_anonymous = false when clients are configured (anonymous is for local use without clients)",
            ));
        }
        let log = Log {
            format: match raw.log.format.as_deref() {
                None | Some("text") => "text".to_string(),
                Some("json") => "json".to_string(),
                Some(other) => {
                    return Err(self.invalid(
                        "log.format",
                        format!("unknown format `{other}`"),
                        "use \"text\" or \"json\"",
                    ))
                }
            },
            filter: raw.log.filter.unwrap_or_else(|| "info".to_string()),
        };
        Ok(Config {
            log,
            source: self.file.to_string(),
            server,
            audit,
            upstream,
            tokens,
            apis,
            keys,
            clients,
        })
    }

    fn key(&self, i: usize, k: RawKey, tokens: &Tokens) -> Result<KeyConfig, ConfigError> {
        let field = |name: &str| format!("keys[{i}].{name}");
        if k.name.is_empty() {
            return Err(self.invalid(field("name"), "is empty", "name the key, e.g. \"connect\""));
        }
        let kind = match k.kind.as_str() {
            "team" => KeyKind::Team,
            "individual" => KeyKind::Individual,
            "in-app-purchase" => KeyKind::InAppPurchase,
            other => {
                return Err(self.invalid(
                    field("kind"),
                    format!("unknown key kind `{other}`"),
                    "use \"team\" or \"individual\" (App Store Connect keys, AuthKey_….p8) or \"in-app-purchase\" (SubscriptionKey_….p8)",
                ))
            }
        };
        if k.key_id.is_empty() || !k.key_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(self.invalid(
                field("key_id"),
                format!("`{}` is not a key id", k.key_id),
                "copy the Key ID from App Store Connect → Users and Access → Integrations (10 characters, e.g. 2X9R4HXF34)",
            ));
        }
        match (kind, &k.issuer_id) {
            (KeyKind::Individual, Some(_)) => {
                return Err(self.invalid(
                    field("issuer_id"),
                    "individual keys don't use an issuer id (Apple expects `sub: \"user\"` instead)",
                    "remove issuer_id, or set kind = \"team\" if this is a team key",
                ))
            }
            (KeyKind::Team | KeyKind::InAppPurchase, None) => {
                return Err(self.invalid(
                    field("issuer_id"),
                    format!("{} keys need the issuer id", kind.id()),
                    "copy the Issuer ID (a UUID) from App Store Connect → Users and Access → Integrations",
                ))
            }
            (_, Some(iss)) if iss.is_empty() => {
                return Err(self.invalid(field("issuer_id"), "is empty", "copy the Issuer ID (a UUID) from App Store Connect"))
            }
            _ => {}
        }
        let source = match (&k.private_key_file, &k.private_key_env) {
            (Some(p), None) => KeySource::File(self.path(&field("private_key_file"), p)?),
            (None, Some(v)) if !v.is_empty() => KeySource::Env(v.clone()),
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    field("private_key_file"),
                    "both private_key_file and private_key_env are set",
                    "keep exactly one",
                ))
            }
            _ => return Err(self.invalid(
                field("private_key_file"),
                "the key has no private key source",
                "set private_key_file = \"keys/AuthKey_<ID>.p8\" or private_key_env = \"VAR_NAME\"",
            )),
        };
        if k.apis.is_empty() {
            return Err(self.invalid(
                field("apis"),
                "lists no API",
                format!(
                    "list the APIs this key signs for, e.g. apis = [\"{}\"]",
                    default_api(kind).id()
                ),
            ));
        }
        let mut apis = Vec::with_capacity(k.apis.len());
        for id in &k.apis {
            let api = Api::from_id(id).ok_or_else(|| {
                self.invalid(
                    field("apis"),
                    format!("unknown API `{id}`"),
                    format!(
                        "use some of: {}",
                        Api::ALL
                            .iter()
                            .map(|a| a.id())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
            if !kind.serves(api) {
                return Err(self.invalid(
                    field("apis"),
                    format!("a {} key cannot sign for {} (Apple rejects it)", kind.id(), api.id()),
                    match kind {
                        KeyKind::InAppPurchase => "in-app-purchase keys serve app-store-server, advanced-commerce and external-purchase; use a team key for App Store Connect and notary".to_string(),
                        KeyKind::Individual if api == Api::Notary => "notary needs a team key with the Developer role".to_string(),
                        _ => "the storekit APIs need an In-App Purchase key (App Store Connect → Users and Access → Integrations → In-App Purchase)".to_string(),
                    },
                ));
            }
            if !apis.contains(&api) {
                apis.push(api);
            }
        }
        if kind == KeyKind::InAppPurchase && k.bundle_id.as_deref().unwrap_or("").is_empty() {
            return Err(self.invalid(
                field("bundle_id"),
                "in-app-purchase keys need the app's bundle id (the token's `bid` claim)",
                "set bundle_id = \"com.example.app\" (case-sensitive, as in App Store Connect)",
            ));
        }
        let cap = kind_max_lifetime(kind);
        let requested = self.duration(
            &field("token_lifetime"),
            k.token_lifetime.as_deref(),
            DEFAULT_TOKEN_LIFETIME,
        )?;
        if requested < tokens.iat_leeway + MIN_USEFUL_LIFETIME {
            return Err(self.invalid(
                field("token_lifetime"),
                format!(
                    "{} leaves too little after the {} iat back-dating",
                    humantime::format_duration(requested),
                    humantime::format_duration(tokens.iat_leeway)
                ),
                "use at least 3m; the default is 5m",
            ));
        }
        if requested > cap {
            tracing::warn!(
                file = self.file,
                key = %k.name,
                requested = %humantime::format_duration(requested),
                cap = %humantime::format_duration(cap),
                "token_lifetime exceeds Apple's maximum for this key kind; capping it"
            );
        }
        Ok(KeyConfig {
            name: k.name,
            kind,
            key_id: k.key_id,
            issuer_id: k.issuer_id,
            bundle_id: k.bundle_id.filter(|b| !b.is_empty()),
            source,
            apis,
            token_lifetime: requested.min(cap),
        })
    }

    fn client(
        &self,
        i: usize,
        c: RawClient,
        keys: &[KeyConfig],
    ) -> Result<ClientConfig, ConfigError> {
        let field = |name: &str| format!("clients[{i}].{name}");
        if c.name.is_empty() {
            return Err(self.invalid(field("name"), "is empty", "name the client, e.g. \"ci\""));
        }
        let secret_sha256 = c
            .secret_sha256
            .as_deref()
            .map(|hex| {
                parse_sha256_hex(hex).ok_or_else(|| {
                    self.invalid(
                        field("secret_sha256"),
                        "is not 64 hex digits",
                        format!(
                            "paste the line printed by `apple-api-proxy client-secret {}`",
                            c.name
                        ),
                    )
                })
            })
            .transpose()?;
        if secret_sha256.is_none() && c.tls_subject.is_none() {
            return Err(self.invalid(
                field("secret_sha256"),
                "the client has no way to authenticate",
                format!("run `apple-api-proxy client-secret {}` and paste its secret_sha256 line, or set tls_subject", c.name),
            ));
        }
        for (j, rule) in c.allow.iter().enumerate() {
            let mut parts = rule.split_whitespace();
            let ok = matches!((parts.next(), parts.next(), parts.next()), (Some(m), Some(p), None)
                if (m == "*" || m.bytes().all(|b| b.is_ascii_uppercase())) && p.starts_with('/'));
            if !ok {
                return Err(self.invalid(
                    format!("clients[{i}].allow[{j}]"),
                    format!("`{rule}` is not `METHOD /path-glob`"),
                    "write e.g. \"GET /v1/apps*\" or \"* /inApps/*\"",
                ));
            }
        }
        if let Some(key) = &c.key {
            if !keys.iter().any(|k| &k.name == key) {
                return Err(self.invalid(
                    field("key"),
                    format!("no key named `{key}`"),
                    "use the name of a [[keys]] entry",
                ));
            }
        }
        Ok(ClientConfig {
            name: c.name,
            secret_sha256,
            tls_subject: c.tls_subject,
            allow: c.allow,
            key: c.key,
            bundle_id: c.bundle_id,
            rate_limit: c
                .rate_limit
                .as_deref()
                .map(|r| {
                    RateLimit::parse(r).ok_or_else(|| {
                        self.invalid(
                            field("rate_limit"),
                            format!("`{r}` is not a rate"),
                            "write requests per period, e.g. \"20/s\", \"600/m\", \"5/10s\"",
                        )
                    })
                })
                .transpose()?,
        })
    }
}

fn default_api(kind: KeyKind) -> Api {
    match kind {
        KeyKind::InAppPurchase => Api::AppStoreServer,
        _ => Api::AppStoreConnect,
    }
}

/// Apple's lifetime cap for the family a key kind signs for.
pub fn kind_max_lifetime(kind: KeyKind) -> Duration {
    match kind {
        KeyKind::InAppPurchase => apple::STOREKIT_MAX_LIFETIME,
        KeyKind::Team | KeyKind::Individual => apple::CONNECT_MAX_LIFETIME,
    }
}

/// Expands `${NAME}` from the environment; `Err(NAME)` when one is unset.
fn expand_env(s: &str) -> Result<String, String> {
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

/// `"30s"`, `"5m"`, `"1h 30m"`, `"250ms"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s.trim()).ok()
}

/// `"10MiB"`, `"512 KiB"`, `"1GB"`, `"1000"` → bytes. Binary (KiB) and decimal (KB) units.
pub fn parse_size(s: &str) -> Option<u64> {
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

fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
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
