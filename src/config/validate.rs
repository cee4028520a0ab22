//! Raw → validated: every rule that can be checked without I/O beyond reading the file, each
//! failure naming the file, the field and a fix.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;

use crate::apple::{self, Api, Environment, KeyKind};

use super::raw::*;
use super::*;

pub(super) struct Validator<'a> {
    pub file: &'a str,
    pub base_dir: &'a Path,
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

    /// An exchange API's token endpoint: an https:// URL with a path and no query.
    fn token_url(&self, field: &str, value: &str) -> Result<Uri, ConfigError> {
        let uri: Uri = value.parse().map_err(|_| {
            self.invalid(
                field,
                format!("`{value}` is not a URL"),
                "write it as \"https://host[:port]/path\"",
            )
        })?;
        if uri.scheme_str() != Some("https") || uri.authority().is_none() || uri.query().is_some() {
            return Err(self.invalid(
                field,
                format!("`{value}` is not an https:// URL without a query"),
                "write it as \"https://host[:port]/path\", e.g. \"https://account.apple.com/auth/oauth2/token\"",
            ));
        }
        Ok(uri)
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

    pub(crate) fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let audit = self.audit(raw.audit)?;
        let upstream = self.upstream(raw.upstream)?;
        let tokens = self.tokens(raw.tokens)?;
        let apis = self.apis(raw.apis)?;
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
            // A Sign in with Apple form's client_id picks exactly one key.
            if let Some((id, other)) = key.client_ids.iter().find_map(|id| {
                keys.iter()
                    .find(|k: &&KeyConfig| k.client_ids.contains(id))
                    .map(|k| (id, k.name.clone()))
            }) {
                return Err(self.invalid(
                    format!("keys[{i}].client_ids"),
                    format!("client id `{id}` is already key `{other}`'s"),
                    "list each Sign in with Apple client id under one key only",
                ));
            }
            keys.push(key);
        }

        let identity_providers = self.identity_providers(raw.identity_providers)?;
        let mut clients = Vec::with_capacity(raw.clients.len());
        let mut client_names = HashSet::new();
        let mut client_key_ids = BTreeMap::new();
        for (i, c) in raw.clients.into_iter().enumerate() {
            let client = self.client(i, c, &keys, &identity_providers)?;
            if !client_names.insert(client.name.clone()) {
                return Err(self.invalid(
                    format!("clients[{i}].name"),
                    format!("a client named `{}` is already defined", client.name),
                    "give every client a unique name",
                ));
            }
            if let Some(k) = &client.client_key {
                if let Some(other) = client_key_ids.insert(k.key_id.clone(), client.name.clone()) {
                    return Err(self.invalid(
                        format!("clients[{i}].key_id"),
                        format!("client `{other}` already has key id `{}`", k.key_id),
                        "give every client key its own id (`apple-api-proxy client-key NAME` makes one)",
                    ));
                }
                if let Some(apple) = keys.iter().find(|a| a.key_id == k.key_id) {
                    return Err(self.invalid(
                        format!("clients[{i}].key_id"),
                        format!("`{}` is also the Apple key id of [[keys]] `{}`", k.key_id, apple.name),
                        "a client key is the proxy's, not Apple's: make one with `apple-api-proxy client-key NAME`",
                    ));
                }
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
            identity_providers,
        })
    }

    fn server(&self, s: RawServer) -> Result<Server, ConfigError> {
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
            idle_timeout: self.duration(
                "server.idle_timeout",
                s.idle_timeout.as_deref(),
                DEFAULT_IDLE_TIMEOUT,
            )?,
            max_connections: s.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
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
        if server.max_connections == 0 {
            return Err(self.invalid(
                "server.max_connections",
                "must be at least 1",
                "remove it for the default (10000)",
            ));
        }
        if server.idle_timeout.is_zero() {
            return Err(self.invalid(
                "server.idle_timeout",
                "must be longer than zero",
                "remove it for the default (60s)",
            ));
        }
        if server.max_concurrent_requests == 0 {
            return Err(self.invalid(
                "server.max_concurrent_requests",
                "must be at least 1",
                "remove it for the default (1024)",
            ));
        }
        Ok(server)
    }

    fn audit(&self, a: RawAudit) -> Result<Audit, ConfigError> {
        let audit = Audit {
            path: match a.path.as_deref() {
                Some("-") => None,
                Some(p) => Some(self.path("audit.path", p)?),
                None => Some(self.path("audit.path", "audit.jsonl")?),
            },
            on_failure: a.on_failure.unwrap_or(OnAuditFailure::Reject),
            fsync: match a.fsync.as_deref() {
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
        Ok(audit)
    }

    fn upstream(&self, u: RawUpstream) -> Result<Upstream, ConfigError> {
        let upstream = Upstream {
            ca_file: u
                .ca_file
                .as_deref()
                .map(|p| self.path("upstream.ca_file", p))
                .transpose()?,
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                u.connect_timeout.as_deref(),
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            egress_proxy: u.egress_proxy,
        };
        Ok(upstream)
    }

    fn tokens(&self, t: RawTokens) -> Result<Tokens, ConfigError> {
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
            max_clock_offset: self.duration(
                "tokens.max_clock_offset",
                t.max_clock_offset.as_deref(),
                DEFAULT_MAX_CLOCK_OFFSET,
            )?,
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
        Ok(tokens)
    }

    fn apis(&self, a: RawApis) -> Result<BTreeMap<Api, ApiSettings>, ConfigError> {
        let mut apis = BTreeMap::new();
        for (api, settings) in [
            (Api::AppStoreConnect, a.app_store_connect),
            (Api::AppStoreServer, a.app_store_server),
            (Api::AdvancedCommerce, a.advanced_commerce),
            (Api::ExternalPurchase, a.external_purchase),
            (Api::Notary, a.notary),
            (Api::Apns, a.apns),
            (Api::DeviceCheck, a.devicecheck),
            (Api::AppAttest, a.app_attest),
            (Api::WeatherKit, a.weatherkit),
            (Api::AppleMusic, a.apple_music),
            (Api::Maps, a.maps),
            (Api::AppleBusiness, a.apple_business),
            (Api::AppleSchool, a.apple_school),
            (Api::SignInWithApple, a.sign_in_with_apple),
        ] {
            let Some(settings) = settings else { continue };
            let prefix = format!("apis.{}", api.id());
            if !api.has_sandbox() && settings.sandbox_base_url.is_some() {
                return Err(self.invalid(
                    format!("{prefix}.sandbox_base_url"),
                    format!("{} has no sandbox environment", api.id()),
                    "remove the field",
                ));
            }
            if api.token_family() != apple::TokenFamily::StoreKit {
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
                        format!("the sandbox fallback is for the storekit APIs' sandbox-only transactions, not {}", api.id()),
                        "remove the field",
                    ));
                }
            }
            let exchanged = api.token_strategy() == apple::TokenStrategy::Exchanged;
            if !exchanged && settings.token_url.is_some() {
                return Err(self.invalid(
                    format!("{prefix}.token_url"),
                    format!("{} exchanges no token", api.id()),
                    "remove the field: token_url is for maps, apple-business and apple-school",
                ));
            }
            let token_params_in_query = match (settings.token_request.as_deref(), api.account_scope()) {
                (None, _) => false,
                (Some("form"), Some(_)) => false,
                (Some("query"), Some(_)) => true,
                (Some(other), Some(_)) => return Err(self.invalid(
                    format!("{prefix}.token_request"),
                    format!("`{other}` is not a way to send the exchange's parameters"),
                    "use \"form\" (the OAuth standard, the default) or \"query\" (as Apple's sample does)",
                )),
                (Some(_), None) => return Err(self.invalid(
                    format!("{prefix}.token_request"),
                    format!("{} has no client-credentials exchange", api.id()),
                    "remove the field: token_request is for apple-business and apple-school",
                )),
            };
            apis.insert(
                api,
                ApiSettings {
                    token_url: settings
                        .token_url
                        .as_deref()
                        .map(|u| self.token_url(&format!("{prefix}.token_url"), u))
                        .transpose()?,
                    token_params_in_query,
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
        Ok(apis)
    }

    /// `keys[i].pkcs11`: every part present and non-empty, exactly one PIN source.
    fn pkcs11(&self, prefix: &str, p: RawPkcs11) -> Result<Pkcs11Source, ConfigError> {
        let required = |name: &str, value: Option<String>, fix: &str| match value {
            Some(v) if !v.trim().is_empty() => Ok(v),
            Some(_) => Err(self.invalid(format!("{prefix}.{name}"), "is empty", fix)),
            None => Err(self.invalid(format!("{prefix}.{name}"), "is missing", fix)),
        };
        let module = required(
            "module",
            p.module,
            "set the path of the HSM's PKCS#11 library, e.g. module = \"/usr/lib/softhsm/libsofthsm2.so\"",
        )?;
        let token_label = required(
            "token_label",
            p.token_label,
            "set the label of the token holding the key (`softhsm2-util --show-slots` or `pkcs11-tool --list-slots` shows it)",
        )?;
        let key_label = required(
            "key_label",
            p.key_label,
            "set the CKA_LABEL the key was imported with (`apple-api-proxy key import` prints it)",
        )?;
        let pin = match (p.pin_env, p.pin_file) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    format!("{prefix}.pin_env"),
                    "both pin_env and pin_file are set",
                    "keep exactly one",
                ))
            }
            (Some(v), None) => {
                // The name of a variable, never the PIN itself (which would then be echoed).
                let valid = v.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !valid {
                    return Err(self.invalid(
                        format!("{prefix}.pin_env"),
                        "is not an environment variable name (letters, digits and _, not starting with a digit)",
                        "name the variable that holds the PIN, e.g. pin_env = \"HSM_PIN\"; the PIN itself never goes in the config",
                    ));
                }
                PinSource::Env(v)
            }
            (None, Some(f)) if !f.trim().is_empty() => {
                PinSource::File(self.path(&format!("{prefix}.pin_file"), &f)?)
            }
            (None, Some(_)) => {
                return Err(self.invalid(
                    format!("{prefix}.pin_file"),
                    "is empty",
                    "set the path of a file holding the token's user PIN",
                ))
            }
            (None, None) => {
                return Err(self.invalid(
                    format!("{prefix}.pin_env"),
                    "the token's user PIN has no source",
                    "set pin_env = \"VAR_NAME\" or pin_file = \"/run/credentials/…/hsm-pin\" (the PIN itself never goes in the config)",
                ))
            }
        };
        let sessions = match p.sessions {
            None => 4,
            Some(n @ 1..=64) => n,
            Some(n) => {
                return Err(self.invalid(
                    format!("{prefix}.sessions"),
                    format!("{n} is not in 1..=64"),
                    "keep a few sessions per key (default 4): the token cache makes signatures rare, and HSMs limit sessions",
                ))
            }
        };
        Ok(Pkcs11Source {
            module: self.path(&format!("{prefix}.module"), &module)?,
            token_label,
            key_label,
            pin,
            sessions,
        })
    }

    fn key(&self, i: usize, mut k: RawKey, tokens: &Tokens) -> Result<KeyConfig, ConfigError> {
        let field = |name: &str| format!("keys[{i}].{name}");
        if k.name.is_empty() {
            return Err(self.invalid(field("name"), "is empty", "name the key, e.g. \"connect\""));
        }
        let kind = match k.kind.as_str() {
            "team" => KeyKind::Team,
            "individual" => KeyKind::Individual,
            "in-app-purchase" => KeyKind::InAppPurchase,
            "developer" => KeyKind::Developer,
            "business-manager" => KeyKind::BusinessManager,
            other => {
                return Err(self.invalid(
                    field("kind"),
                    format!("unknown key kind `{other}`"),
                    "use \"team\" or \"individual\" (App Store Connect keys, AuthKey_….p8), \"in-app-purchase\" (SubscriptionKey_….p8), \"developer\" (Apple Developer account keys: APNs, DeviceCheck, WeatherKit, MusicKit, Maps, Sign in with Apple) or \"business-manager\" (Apple Business/School Manager API keys)",
                ))
            }
        };
        if kind == KeyKind::BusinessManager && !apple::is_uuid(&k.key_id) {
            return Err(self.invalid(
                field("key_id"),
                format!("`{}` is not an Apple Business/School Manager key id", k.key_id),
                "copy the Key ID shown with the API account in Apple Business/School Manager → Preferences → API (a UUID)",
            ));
        }
        if k.key_id.is_empty()
            || !k.key_id.bytes().all(|b| {
                b.is_ascii_alphanumeric() || (b == b'-' && kind == KeyKind::BusinessManager)
            })
        {
            return Err(self.invalid(
                field("key_id"),
                format!("`{}` is not a key id", k.key_id),
                "copy the Key ID from App Store Connect → Users and Access → Integrations (10 characters, e.g. 2X9R4HXF34)",
            ));
        }
        match (kind, &k.issuer_id) {
            (KeyKind::BusinessManager, Some(_)) => {
                return Err(self.invalid(
                    field("issuer_id"),
                    "business-manager keys take no issuer id (their assertion's iss is the client id)",
                    "remove issuer_id and set client_id = \"BUSINESSAPI.…\" (or \"SCHOOLAPI.…\")",
                ))
            }
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
        let source = match (&k.private_key_file, &k.private_key_env, k.pkcs11.take()) {
            (Some(p), None, None) => KeySource::File(self.path(&field("private_key_file"), p)?),
            (None, Some(v), None) if !v.is_empty() => KeySource::Env(v.clone()),
            (None, None, Some(p)) => KeySource::Pkcs11(self.pkcs11(&field("pkcs11"), p)?),
            (Some(_), Some(_), _) => {
                return Err(self.invalid(
                    field("private_key_file"),
                    "both private_key_file and private_key_env are set",
                    "keep exactly one",
                ))
            }
            (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {
                return Err(self.invalid(
                    field("pkcs11"),
                    format!(
                        "is set together with {}",
                        if k.private_key_file.is_some() { "private_key_file" } else { "private_key_env" }
                    ),
                    "a key lives in one place: keep pkcs11 (the HSM) and remove the .p8 source, or the other way round",
                ))
            }
            _ => return Err(self.invalid(
                field("private_key_file"),
                "the key has no private key source",
                "set private_key_file = \"keys/AuthKey_<ID>.p8\", private_key_env = \"VAR_NAME\" or pkcs11 = { module = …, token_label = …, key_label = …, pin_env = … }",
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
                        KeyKind::InAppPurchase => "in-app-purchase keys serve app-store-server, advanced-commerce, external-purchase and in-app-signing; use a team key for App Store Connect and notary".to_string(),
                        KeyKind::Individual if api == Api::Notary => "notary needs a team key with the Developer role".to_string(),
                        KeyKind::Developer => "developer keys serve apns, devicecheck, app-attest, weatherkit, apple-music, maps and sign-in-with-apple".to_string(),
                        KeyKind::BusinessManager => "business-manager keys serve apple-business and apple-school".to_string(),
                        _ if api.token_family() == apple::TokenFamily::AccountManager => format!("{} needs an API account key from Apple Business/School Manager with kind = \"business-manager\"", api.id()),
                        _ if api.token_family() == apple::TokenFamily::Developer => format!("{} needs an Apple Developer account key (Certificates, Identifiers & Profiles → Keys) with kind = \"developer\"", api.id()),
                        _ => "the storekit APIs need an In-App Purchase key (App Store Connect → Users and Access → Integrations → In-App Purchase)".to_string(),
                    },
                ));
            }
            if !apis.contains(&api) {
                apis.push(api);
            }
        }
        let (team_id, service_id, apns_token_refresh) =
            self.developer_fields(i, &k, kind, &apis)?;
        let (client_id, client_ids) = self.client_id_fields(i, &k, kind, &apis)?;
        if kind == KeyKind::InAppPurchase && k.bundle_id.as_deref().unwrap_or("").is_empty() {
            return Err(self.invalid(
                field("bundle_id"),
                "in-app-purchase keys need the app's bundle id (the token's `bid` claim)",
                "set bundle_id = \"com.example.app\" (case-sensitive, as in App Store Connect)",
            ));
        }
        let cap = kind_max_lifetime(kind);
        // Developer tokens are reused, not per request: an hour (WeatherKit's documented
        // samples; Music allows far more) unless the config says otherwise.
        let default_lifetime = if kind == KeyKind::Developer {
            Duration::from_secs(3600)
        } else {
            DEFAULT_TOKEN_LIFETIME
        };
        let requested = self.duration(
            &field("token_lifetime"),
            k.token_lifetime.as_deref(),
            default_lifetime,
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
        // Sign in with Apple's client_secret: the key's token_lifetime when set, else 10
        // minutes (DESIGN §18), never above Apple's six months.
        let client_secret_lifetime = match k.token_lifetime {
            Some(_) => requested.min(apple::SIGN_IN_MAX_LIFETIME),
            None => apple::SIGN_IN_DEFAULT_LIFETIME,
        };
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
            client_id,
            client_ids,
            client_secret_lifetime,
            team_id,
            service_id,
            apns_token_refresh,
        })
    }

    /// A business-manager key's `client_id` (its prefix fitting every API it serves) and a
    /// Sign in with Apple developer key's `client_ids`; either on another key is an error.
    fn client_id_fields(
        &self,
        i: usize,
        k: &RawKey,
        kind: KeyKind,
        apis: &[Api],
    ) -> Result<(Option<String>, Vec<String>), ConfigError> {
        let field = |name: &str| format!("keys[{i}].{name}");
        let client_id = match (kind, k.client_id.as_deref()) {
            (KeyKind::BusinessManager, None) => {
                return Err(self.invalid(
                    field("client_id"),
                    "business-manager keys need the client id (the assertion's iss and sub)",
                    "copy the Client ID shown with the API account, e.g. client_id = \"BUSINESSAPI.9703f56c-…\"",
                ))
            }
            (KeyKind::BusinessManager, Some(id)) => {
                for api in apis {
                    if let Some((_, prefix)) = api.account_scope() {
                        if !id.starts_with(prefix) || id.len() == prefix.len() || id.contains(char::is_whitespace) {
                            return Err(self.invalid(
                                field("client_id"),
                                format!("`{id}` is not a client id for {}: those start with {prefix}", api.id()),
                                "mixing Apple Business Manager (BUSINESSAPI.…, apple-business) and Apple School Manager (SCHOOLAPI.…, apple-school) values is the common cause of invalid_client: use this account's own client id and API",
                            ));
                        }
                    }
                }
                Some(id.to_string())
            }
            (_, Some(_)) => {
                return Err(self.invalid(
                    field("client_id"),
                    format!("only business-manager keys take client_id; this is a {} key", kind.id()),
                    "remove it (Sign in with Apple keys list theirs in client_ids)",
                ))
            }
            (_, None) => None,
        };
        let siwa = apis.contains(&Api::SignInWithApple);
        let client_ids = match (&k.client_ids, siwa) {
            (None, false) => Vec::new(),
            (None, true) => {
                return Err(self.invalid(
                    field("client_ids"),
                    "sign-in-with-apple needs the client ids this key signs client_secrets for",
                    "list your Services IDs / App IDs, e.g. client_ids = [\"com.example.web\"]",
                ))
            }
            (Some(_), false) => {
                return Err(self.invalid(
                    field("client_ids"),
                    "client_ids are for keys serving sign-in-with-apple",
                    "remove them, or add \"sign-in-with-apple\" to apis",
                ))
            }
            (Some(ids), true) => {
                if ids.is_empty() {
                    return Err(self.invalid(
                        field("client_ids"),
                        "is empty",
                        "list your Services IDs / App IDs, e.g. client_ids = [\"com.example.web\"]",
                    ));
                }
                for id in ids {
                    if id.is_empty() || id.len() > 255 || !id.bytes().all(|b| b.is_ascii_graphic())
                    {
                        return Err(self.invalid(
                            field("client_ids"),
                            format!("`{id}` is not a client id"),
                            "use the Services ID or App ID exactly as in Certificates, Identifiers & Profiles (case-sensitive)",
                        ));
                    }
                }
                ids.clone()
            }
        };
        Ok((client_id, client_ids))
    }

    /// A developer key's `team_id`, `service_id` (WeatherKit) and `apns_token_refresh`;
    /// the same fields on another kind of key are errors.
    fn developer_fields(
        &self,
        i: usize,
        k: &RawKey,
        kind: KeyKind,
        apis: &[Api],
    ) -> Result<(Option<String>, Option<String>, Duration), ConfigError> {
        let field = |name: &str| format!("keys[{i}].{name}");
        if kind != KeyKind::Developer {
            for (name, set) in [
                ("team_id", k.team_id.is_some()),
                ("service_id", k.service_id.is_some()),
                ("apns_token_refresh", k.apns_token_refresh.is_some()),
            ] {
                if set {
                    return Err(self.invalid(
                        field(name),
                        format!("only developer keys take {name}; this is a {} key", kind.id()),
                        "remove it, or set kind = \"developer\" for an Apple Developer account key (APNs, DeviceCheck, WeatherKit, MusicKit)",
                    ));
                }
            }
            return Ok((None, None, apple::APNS_REFRESH_DEFAULT));
        }
        for (name, set) in [
            ("issuer_id", k.issuer_id.is_some()),
            ("bundle_id", k.bundle_id.is_some()),
        ] {
            if set {
                return Err(self.invalid(
                    field(name),
                    format!("developer keys take no {name}"),
                    "remove it: developer tokens carry the team id (team_id), not an issuer or bundle id",
                ));
            }
        }
        let team_id = match k.team_id.as_deref() {
            Some(t) if apple::is_plausible_key_id(t) => t.to_string(),
            Some(t) => {
                return Err(self.invalid(
                    field("team_id"),
                    format!("`{t}` is not a Team ID"),
                    "copy the Team ID (10 characters, e.g. DEF123GHIJ) from developer.apple.com → Account → Membership details",
                ))
            }
            None => {
                return Err(self.invalid(
                    field("team_id"),
                    "developer keys need the team id (the tokens' iss)",
                    "set team_id = \"DEF123GHIJ\" from developer.apple.com → Account → Membership details",
                ))
            }
        };
        let service_id = match (k.service_id.as_deref(), apis.contains(&Api::WeatherKit)) {
            (Some(s), _) if s.trim().is_empty() || s.contains(char::is_whitespace) => {
                return Err(self.invalid(field("service_id"), format!("`{s}` is not a service id"), "use the WeatherKit service identifier, e.g. com.example.weatherkit-client"))
            }
            (None, true) => {
                return Err(self.invalid(
                    field("service_id"),
                    "weatherkit tokens need the service id (their sub, and the header's id)",
                    "set service_id = \"com.example.weatherkit-client\" (Certificates, Identifiers & Profiles → Services IDs)",
                ))
            }
            (s, _) => s.map(str::to_string),
        };
        let refresh = self.duration(
            &field("apns_token_refresh"),
            k.apns_token_refresh.as_deref(),
            apple::APNS_REFRESH_DEFAULT,
        )?;
        if refresh < apple::APNS_REFRESH_MIN || refresh > apple::APNS_REFRESH_MAX {
            return Err(self.invalid(
                field("apns_token_refresh"),
                format!(
                    "{} is outside 20m–55m: APNs answers 429 TooManyProviderTokenUpdates to a token renewed more often than every 20 minutes, and 403 ExpiredProviderToken to one older than an hour",
                    humantime::format_duration(refresh)
                ),
                "leave the default (40m), or set between \"20m\" and \"55m\"",
            ));
        }
        Ok((Some(team_id), service_id, refresh))
    }

    fn client(
        &self,
        i: usize,
        c: RawClient,
        keys: &[KeyConfig],
        providers: &[IdentityProviderConfig],
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
        let client_key = self.client_key(i, &c)?;
        let identity = match &c.identity {
            Some(raw) => Some(self.client_identity(i, raw, providers)?),
            None => None,
        };
        if identity.is_some() {
            // One credential per client: a CI client moved to its platform's identity token
            // must not keep a secret (or key, or certificate) that can still leak.
            for (set, name) in [
                (secret_sha256.is_some(), "secret_sha256"),
                (client_key.is_some(), "key_id"),
                (c.tls_subject.is_some(), "tls_subject"),
            ] {
                if set {
                    return Err(self.invalid(
                        field(name),
                        format!("client `{}` has an identity and a {name}", c.name),
                        "a client authenticates one way: remove the old credential once its callers send identity tokens, or split it into two clients",
                    ));
                }
            }
        }
        if secret_sha256.is_none()
            && c.tls_subject.is_none()
            && client_key.is_none()
            && identity.is_none()
        {
            return Err(self.invalid(
                field("secret_sha256"),
                "the client has no way to authenticate",
                format!("run `apple-api-proxy client-secret {0}` and paste its secret_sha256 line, or `apple-api-proxy client-key {0}` for its key_id and public_key, or set tls_subject, or an identity = {{ provider, claims }}", c.name),
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
        let signing = match c.signing {
            Some(raw) => Some(self.signing(i, raw, c.key.as_deref(), keys)?),
            None => None,
        };
        let apns_environment = match c.apns_environment.as_deref() {
            None | Some("production") => Environment::Production,
            Some("development") => Environment::Sandbox,
            Some(other) => {
                return Err(self.invalid(
                    field("apns_environment"),
                    format!("`{other}` is not an APNs environment"),
                    "use \"production\" (api.push.apple.com, the default) or \"development\" (api.sandbox.push.apple.com)",
                ))
            }
        };
        Ok(ClientConfig {
            name: c.name,
            secret_sha256,
            tls_subject: c.tls_subject,
            allow: c.allow,
            key: c.key,
            bundle_id: c.bundle_id,
            client_key,
            signing,
            apns_environment,
            identity,
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

impl Validator<'_> {
    /// `[[identity_providers]]` (DESIGN §17): unique names (they label metrics and audit
    /// records) and issuers (a token's `iss` picks its provider), https:// issuers and JWKS
    /// URLs, an audience, and a `max_token_age` from 1 min to 24 h.
    fn identity_providers(
        &self,
        raw: Vec<RawIdentityProvider>,
    ) -> Result<Vec<IdentityProviderConfig>, ConfigError> {
        let mut out: Vec<IdentityProviderConfig> = Vec::with_capacity(raw.len());
        for (i, p) in raw.into_iter().enumerate() {
            let field = |name: &str| format!("identity_providers[{i}].{name}");
            let name = p.name.unwrap_or_default();
            let plausible = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
            if !plausible {
                return Err(self.invalid(
                    field("name"),
                    if name.is_empty() { "is missing".to_string() } else { format!("`{name}` is not 1–64 letters, digits, `.`, `_`, `-`") },
                    "name the provider, e.g. name = \"github-actions\"; clients refer to it by this name",
                ));
            }
            if let Some(other) = out.iter().find(|o| o.name == name) {
                return Err(self.invalid(
                    field("name"),
                    format!("a provider named `{}` is already defined", other.name),
                    "give every identity provider a unique name",
                ));
            }
            let issuer = p.issuer.unwrap_or_default();
            self.https_url(
                &field("issuer"),
                &issuer,
                "the tokens' iss exactly, e.g. \"https://token.actions.githubusercontent.com\"",
            )?;
            if let Some(other) = out.iter().find(|o| o.issuer == issuer) {
                return Err(self.invalid(
                    field("issuer"),
                    format!("provider `{}` already has issuer `{issuer}`", other.name),
                    "a token's iss picks its provider, so each issuer is configured once; several audiences or claim sets are several clients of one provider",
                ));
            }
            let audience = match p.audience {
                Some(a) if !a.trim().is_empty() => a,
                _ => {
                    return Err(self.invalid(
                        field("audience"),
                        "is missing",
                        "set the audience your callers request, e.g. audience = \"apple-api-proxy\" (without one, a token minted for any other service would be accepted)",
                    ))
                }
            };
            if let Some(url) = &p.jwks_url {
                self.https_url(&field("jwks_url"), url, "where the issuer publishes its JWKS, e.g. \"https://kubernetes.default.svc/openid/v1/jwks\"")?;
            }
            let ca_file = p
                .ca_file
                .as_deref()
                .map(|f| self.path(&field("ca_file"), f))
                .transpose()?;
            let max_token_age = self.duration(
                &field("max_token_age"),
                p.max_token_age.as_deref(),
                Duration::from_secs(3600),
            )?;
            if !(Duration::from_secs(60)..=Duration::from_secs(24 * 3600)).contains(&max_token_age)
            {
                return Err(self.invalid(
                    field("max_token_age"),
                    format!(
                        "{} is outside 1m–24h",
                        humantime::format_duration(max_token_age)
                    ),
                    "CI and service-account tokens live minutes to an hour; the default is \"1h\"",
                ));
            }
            out.push(IdentityProviderConfig {
                name,
                issuer,
                audience,
                jwks_url: p.jwks_url,
                ca_file,
                max_token_age,
            });
        }
        Ok(out)
    }

    fn https_url(&self, field: &str, value: &str, fix: &str) -> Result<(), ConfigError> {
        let ok = value.parse::<Uri>().is_ok_and(|u| {
            u.scheme_str() == Some("https") && u.authority().is_some() && u.query().is_none()
        }) && !value.contains('#');
        if ok {
            Ok(())
        } else {
            Err(self.invalid(
                field,
                if value.is_empty() {
                    "is missing".to_string()
                } else {
                    format!("`{value}` is not an https:// URL without query or fragment")
                },
                format!("write {fix} (keys are only fetched over TLS)"),
            ))
        }
    }

    /// `clients[i].identity` (DESIGN §17): a configured provider, and claims that narrow it
    /// down — on GitHub Actions any repository's workflow can ask for the proxy's audience, so
    /// a client without claims (or with only `*` globs) would be anyone's.
    fn client_identity(
        &self,
        i: usize,
        raw: &RawClientIdentity,
        providers: &[IdentityProviderConfig],
    ) -> Result<ClientIdentity, ConfigError> {
        let Some(provider) = providers.iter().position(|p| p.name == raw.provider) else {
            return Err(self.invalid(
                format!("clients[{i}].identity.provider"),
                format!("no identity provider named `{}`", raw.provider),
                if providers.is_empty() {
                    "add an [[identity_providers]] entry with this name".to_string()
                } else {
                    format!(
                        "use one of: {}",
                        providers
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
            ));
        };
        let narrowing = raw.claims.values().any(|g| g.bytes().any(|b| b != b'*'));
        if !narrowing {
            return Err(self.invalid(
                format!("clients[{i}].identity.claims"),
                if raw.claims.is_empty() { "is empty".to_string() } else { "matches every value (only `*` globs)".to_string() },
                "name the claims that single out your callers, e.g. claims = { repository = \"example/app\", ref = \"refs/heads/main\" }: the issuer signs tokens for anyone who asks for your audience",
            ));
        }
        for (name, glob) in &raw.claims {
            if name.is_empty() || glob.is_empty() {
                return Err(self.invalid(
                    format!("clients[{i}].identity.claims"),
                    "has an empty claim name or value",
                    "write claim = \"glob\" pairs, e.g. ref = \"refs/heads/main\"",
                ));
            }
        }
        Ok(ClientIdentity {
            provider,
            claims: raw
                .claims
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        })
    }

    /// `clients[i].key_id` with `public_key_file` or `public_key` (DESIGN §17b): a P-256
    /// public key (`BEGIN PUBLIC KEY`) and the `kid` the client's SDK signs with.
    fn client_key(&self, i: usize, c: &RawClient) -> Result<Option<ClientKey>, ConfigError> {
        let field = |name: &str| format!("clients[{i}].{name}");
        let fix = format!(
            "run `apple-api-proxy client-key {}` and paste the lines it prints",
            c.name
        );
        let (pem, from) = match (&c.public_key_file, &c.public_key) {
            (None, None) => {
                if c.key_id.is_some() {
                    return Err(self.invalid(
                        field("public_key_file"),
                        "key_id is set without the client key's public half",
                        fix,
                    ));
                }
                return Ok(None);
            }
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    field("public_key_file"),
                    "both public_key_file and public_key are set",
                    "keep exactly one",
                ))
            }
            (Some(path), None) => {
                let path = self.path(&field("public_key_file"), path)?;
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    self.invalid(
                        field("public_key_file"),
                        format!("cannot read {}: {e}", path.display()),
                        "point it at the .pub.pem file `apple-api-proxy client-key` wrote, or paste the key as public_key",
                    )
                })?;
                (text, field("public_key_file"))
            }
            (None, Some(text)) => (text.clone(), field("public_key")),
        };
        let Some(key_id) = c.key_id.clone() else {
            return Err(self.invalid(
                field("key_id"),
                "a client public key needs the key id its JWTs carry in `kid`",
                fix,
            ));
        };
        let plausible = !key_id.is_empty()
            && key_id.len() <= 64
            && key_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if !plausible {
            return Err(self.invalid(
                field("key_id"),
                format!("`{key_id}` is not a key id (1–64 letters, digits, `.`, `_`, `-`)"),
                fix,
            ));
        }
        use p256::pkcs8::DecodePublicKey as _;
        let public = p256::PublicKey::from_public_key_pem(pem.trim()).map_err(|_| {
            self.invalid(
                from,
                "is not a P-256 public key in PEM (`-----BEGIN PUBLIC KEY-----`)",
                "client keys are P-256 (ES256): make one with `apple-api-proxy client-key NAME`",
            )
        })?;
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        Ok(Some(ClientKey {
            key_id,
            public_key: public.to_encoded_point(false).as_bytes().to_vec(),
        }))
    }

    /// `clients[i].signing` (DESIGN §15): globs that can match something, Advanced Commerce
    /// operations with the price bound they need, ISO 4217 currencies, and a key to sign with.
    fn signing(
        &self,
        i: usize,
        s: RawSigning,
        pinned: Option<&str>,
        keys: &[KeyConfig],
    ) -> Result<SigningPolicy, ConfigError> {
        let field = |name: &str| format!("clients[{i}].signing.{name}");
        for (name, globs) in [("products", &s.products), ("offers", &s.offers)] {
            if let Some(j) = globs.iter().position(|g| g.trim().is_empty()) {
                return Err(self.invalid(
                    format!("clients[{i}].signing.{name}[{j}]"),
                    "is empty",
                    "write a glob, e.g. \"com.example.pro.*\"",
                ));
            }
        }
        for (j, op) in s.operations.iter().enumerate() {
            let ok = op.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
                && op.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
            if !ok {
                return Err(self.invalid(
                    format!("clients[{i}].signing.operations[{j}]"),
                    format!("`{op}` is not an Advanced Commerce operation name"),
                    "write Apple's operation names, e.g. \"CREATE_ONE_TIME_CHARGE\", \"CREATE_SUBSCRIPTION\"",
                ));
            }
        }
        match s.max_price {
            None if !s.operations.is_empty() => {
                return Err(self.invalid(
                    field("max_price"),
                    "is required with `operations`: whoever obtains an Advanced Commerce signature fixes the price",
                    "set the highest price the client may sign, in Apple's units, e.g. max_price = 99990",
                ))
            }
            Some(p) if p < 0 => {
                return Err(self.invalid(
                    field("max_price"),
                    format!("{p} is negative"),
                    "set the highest price the client may sign, e.g. max_price = 99990",
                ))
            }
            _ => {}
        }
        if let Some(currencies) = &s.currencies {
            if currencies.is_empty() {
                return Err(self.invalid(
                    field("currencies"),
                    "is empty",
                    "list ISO 4217 codes, e.g. [\"USD\", \"EUR\"], or remove the line to allow any",
                ));
            }
            for (j, c) in currencies.iter().enumerate() {
                if !(c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())) {
                    return Err(self.invalid(
                        format!("clients[{i}].signing.currencies[{j}]"),
                        format!("`{c}` is not an ISO 4217 currency code"),
                        "write three upper-case letters, e.g. \"USD\"",
                    ));
                }
            }
        }
        let signs = |k: &KeyConfig| k.apis.contains(&Api::InAppSigning);
        let usable = match pinned {
            Some(name) => keys.iter().any(|k| k.name == name && signs(k)),
            None => keys.iter().any(signs),
        };
        if !usable {
            return Err(self.invalid(
                format!("clients[{i}].signing"),
                match pinned {
                    Some(name) => format!("the client is pinned to key `{name}`, which does not list \"in-app-signing\" in its apis"),
                    None => "no key lists \"in-app-signing\" in its apis, so nothing can be signed".to_string(),
                },
                "add \"in-app-signing\" to the apis of the In-App Purchase key that should sign",
            ));
        }
        Ok(SigningPolicy {
            products: s.products,
            offers: s.offers,
            grant_introductory_offer: s.grant_introductory_offer,
            operations: s.operations,
            currencies: s.currencies,
            max_price: s.max_price,
        })
    }
}

fn default_api(kind: KeyKind) -> Api {
    match kind {
        KeyKind::InAppPurchase => Api::AppStoreServer,
        KeyKind::Developer => Api::Apns,
        _ => Api::AppStoreConnect,
    }
}
