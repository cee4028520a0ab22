//! The runtime one request reads: [`Proxy`], built whole from one validated config (keys,
//! clients, routes, the upstream pool, inbound TLS), and `Shared`, what outlives a reload
//! (the audit writer, metrics, Apple's clock, the token counters, each key's history, the
//! request ids, the concurrency limit, Apple's per-endpoint budgets).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::apple::Api;
use crate::audit;
use crate::client::Clients;
use crate::config::Config;
use crate::forward;
use crate::metrics;
use crate::route;
use crate::tls::TlsError;
use crate::token::{self, AppleClock, MintCounts, Minter};

/// Why the proxy could not start (or a reload was rejected).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}: no [[clients]] are configured and allow_anonymous is false, so nobody could use the proxy (fix: add a client with `apple-api-proxy client-secret NAME`, or set allow_anonymous = true under [server] for local use)")]
    NoClients(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Key(#[from] Box<token::LoadError>),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    Upstream(#[from] forward::ClientError),
    #[error("{0}")]
    Identity(#[from] crate::identity::provider::SetupError),
}

/// Everything a request needs, built once from config and swapped whole on reload.
pub struct Proxy {
    pub(super) config: Arc<Config>,
    pub(super) routes: route::Table,
    pub(super) clients: Clients,
    /// Shared with the token exchanges it signs for, which outlive their requests.
    pub(super) minter: Arc<Minter>,
    pub(super) upstream: forward::Client,
    /// APNs: an HTTP/2-only client per key, so each key has its own connection per
    /// environment, reused for every device (DESIGN §18). Replaced when APNs says
    /// `UnrelatedKeyIdInToken` (a connection must not mix keys).
    pub(super) apns: HashMap<String, Mutex<forward::Client>>,
    /// Inbound TLS (and mTLS), when configured, and what identifies its settings.
    tls: Option<tokio_rustls::TlsAcceptor>,
    tls_fingerprint: u64,
    /// Per key name: when Apple last accepted that key (UNIX seconds; 0 = never seen), taken
    /// from [`Shared::key_history`] by key id and public-key fingerprint.
    key_success: HashMap<String, Arc<AtomicI64>>,
    pub(super) shared: Arc<Shared>,
}

/// What outlives a config reload.
pub(super) struct Shared {
    pub audit: std::sync::OnceLock<audit::Audit>,
    pub metrics: Arc<metrics::Metrics>,
    pub clock: Arc<AppleClock>,
    pub mint_counts: Arc<MintCounts>,
    /// The developer-key APIs' tokens: a reload never re-mints one (DESIGN §18).
    pub developer_tokens: Arc<crate::token::DeveloperTokens>,
    /// The exchange APIs' access tokens: a reload that keeps a key keeps its token.
    pub access_tokens: Arc<crate::exchange::AccessTokens>,
    /// The identity providers' keys: a reload that keeps a provider keeps its keys.
    pub identity: crate::identity::Registry,
    /// When Apple last accepted each key, by (key id, SHA-256 of its public key): a new key
    /// under an old name starts with no history, a renamed key keeps its own.
    key_history: Mutex<HashMap<KeyIdentity, Arc<AtomicI64>>>,
    pub ids: RequestIds,
    /// `max_concurrent_requests` permits; a permit lives until the response body is done.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    pub max_in_flight: usize,
    serving: AtomicBool,
    /// Apple's per-endpoint limits, enforced locally where configured.
    pub apple_limits: crate::limits::AppleLimits,
}

/// A key as Apple knows it: its key id and the SHA-256 of its public key.
type KeyIdentity = (String, [u8; 32]);

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.config.source)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Validates the deployment-level rules, loads keys, builds the upstream client.
    pub fn new(config: Config) -> Result<(Proxy, Vec<String>), StartError> {
        Proxy::validate(&config)?;
        let max_in_flight = config.server.max_concurrent_requests;
        let shared = Arc::new(Shared {
            audit: std::sync::OnceLock::new(),
            metrics: Arc::new(metrics::Metrics::new()),
            clock: Arc::new(AppleClock::default()),
            mint_counts: Arc::default(),
            developer_tokens: Arc::default(),
            access_tokens: Arc::default(),
            identity: crate::identity::Registry::default(),
            key_history: Mutex::default(),
            ids: RequestIds::new(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            max_in_flight,
            serving: AtomicBool::new(false),
            apple_limits: crate::limits::AppleLimits::default(),
        });
        Proxy::build(config, shared, None)
    }

    /// A new runtime from `config` for a reload: keys, clients, routes, inbound TLS and the
    /// upstream client are built afresh (and checked as at start-up); what `Shared` holds
    /// carries over, and so does each client's rate-limit bucket. Settings that need a
    /// restart (listeners, audit, max_concurrent_requests) are kept and warned about.
    pub fn reload(&self, config: Config) -> Result<(Proxy, Vec<String>), StartError> {
        Proxy::validate(&config)?;
        let (proxy, mut warnings) = Proxy::build(config, self.shared.clone(), Some(self))?;
        let (old, new) = (&self.config.server, &proxy.config.server);
        if old.listen != new.listen || old.admin_listen != new.admin_listen {
            warnings.push("listen/admin_listen changed: takes effect after a restart".into());
        }
        if new.max_concurrent_requests != self.shared.max_in_flight {
            warnings.push("max_concurrent_requests changed: takes effect after a restart".into());
        }
        if self.config.audit.path != proxy.config.audit.path
            || self.config.audit.on_failure != proxy.config.audit.on_failure
        {
            warnings.push("[audit] changed: takes effect after a restart".into());
        }
        Ok((proxy, warnings))
    }

    /// The deployment-level rules `new` and `reload` both enforce.
    fn validate(config: &Config) -> Result<(), StartError> {
        if config.clients.is_empty() && !config.server.allow_anonymous {
            return Err(StartError::NoClients(config.source.clone()));
        }
        Ok(())
    }

    fn build(
        config: Config,
        shared: Arc<Shared>,
        previous: Option<&Proxy>,
    ) -> Result<(Proxy, Vec<String>), StartError> {
        let tls = crate::tls::acceptor(&config)?;
        let tls_fingerprint = crate::tls::fingerprint(&config);
        let (minter, warnings) = Minter::new(&config, shared.clock.clone())?;
        let minter = minter.sharing(shared.mint_counts.clone(), shared.developer_tokens.clone());
        let upstream = forward::client(&config)?;
        let mut apns = HashMap::new();
        for k in config.keys.iter().filter(|k| k.apis.contains(&Api::Apns)) {
            apns.insert(k.name.clone(), Mutex::new(forward::http2_client(&config)?));
        }
        let key_success = {
            let mut history = shared.key_history.lock().unwrap_or_else(|p| p.into_inner());
            config
                .keys
                .iter()
                .map(|k| {
                    let public = minter.public_key(&k.name).unwrap_or_default();
                    let id = (k.key_id.clone(), crate::sha256(public));
                    (k.name.clone(), history.entry(id).or_default().clone())
                })
                .collect()
        };
        let providers = shared.identity.providers(&config)?;
        Ok((
            Proxy {
                routes: route::Table::new(&config),
                clients: Clients::carrying(&config, previous.map(|p| &p.clients), providers),
                minter: Arc::new(minter),
                upstream,
                apns,
                tls,
                tls_fingerprint,
                key_success,
                shared,
                config: Arc::new(config),
            },
            warnings,
        ))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The identity providers, in config order (for `check`).
    pub fn identity_providers(&self) -> impl Iterator<Item = &Arc<crate::identity::Provider>> {
        self.clients.identity_providers()
    }

    pub fn minter(&self) -> &Minter {
        &self.minter
    }

    pub fn tls(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.tls.as_ref()
    }

    /// Identifies the inbound TLS settings this runtime was built with (see
    /// `crate::tls::fingerprint`).
    pub(crate) fn tls_fingerprint(&self) -> u64 {
        self.tls_fingerprint
    }

    /// Opens the audit log and starts its writer. Until this is called every request is
    /// refused with 503 PROXY_AUDIT_UNAVAILABLE.
    pub(crate) fn start_audit(&self) -> Result<audit::Writer, StartError> {
        let (audit, writer) = audit::Audit::start(&self.config.audit)?;
        if self.shared.audit.set(audit).is_err() {
            tracing::warn!("the audit log was already started");
        }
        Ok(writer)
    }

    pub fn audit(&self) -> Option<&audit::Audit> {
        self.shared.audit.get()
    }

    /// Ready to serve: keys loaded (construction), audit started and writable, listener up,
    /// every key's signer answering (an HSM key whose HSM fails names itself here).
    pub fn ready(&self) -> Result<(), String> {
        match self.shared.audit.get() {
            None => return Err("the audit log is not open yet".into()),
            Some(a) if !a.health().healthy() => {
                return Err("the audit log cannot be written".into())
            }
            Some(_) if !self.shared.serving.load(Ordering::Relaxed) => {
                return Err("the proxy listener is not accepting".into())
            }
            Some(_) => {}
        }
        let failing = self.minter.unavailable();
        if failing.is_empty() {
            return Ok(());
        }
        Err(failing
            .iter()
            .map(|(key, why)| format!("key `{key}` cannot sign: {why}"))
            .collect::<Vec<_>>()
            .join("; "))
    }

    /// Counts a configuration reload (applied or rejected).
    pub(crate) fn note_reload(&self, applied: bool) {
        self.shared.metrics.config_reload(applied);
    }

    /// The server says whether its listener is accepting.
    pub(crate) fn set_serving(&self, serving: bool) {
        self.shared.serving.store(serving, Ordering::Relaxed);
    }

    /// The Prometheus exposition, with counters owned elsewhere copied in.
    /// The audit chain's newest line (DESIGN §19); `None` before the log is open.
    pub fn audit_head(&self) -> Option<crate::audit::Head> {
        self.shared.audit.get().map(crate::audit::Audit::head)
    }

    pub(crate) fn metrics_text(&self) -> String {
        let (minted, hits) = self.minter.counts();
        let audit = self.shared.audit.get().map(|a| a.health());
        let load = |c: Option<&AtomicU64>| c.map_or(0, |c| c.load(Ordering::Relaxed));
        let failing = self.minter.unavailable();
        let signers: Vec<(&str, &'static str, bool)> = self
            .config
            .keys
            .iter()
            .filter_map(|k| {
                let (backend, _) = self.minter.custody(&k.name)?;
                let up = !failing.iter().any(|(name, _)| *name == k.name);
                Some((k.name.as_str(), backend.as_str(), up))
            })
            .collect();
        self.shared.metrics.exchanges(
            &self.shared.access_tokens.counts(),
            &self.shared.access_tokens.ages(),
        );
        let identity: Vec<_> = self
            .clients
            .identity_providers()
            .map(|p| p.stats())
            .collect();
        self.shared.metrics.encode(
            metrics::Snapshot {
                tokens_minted: minted,
                token_cache_hits: hits,
                apple_clock_offset_s: self.minter.clock().offset_secs(),
                audit_written: load(audit.map(|h| &h.written)),
                audit_write_failures: load(audit.map(|h| &h.write_failures)),
                audit_lost: load(audit.map(|h| &h.lost)),
                audit_refused: load(audit.map(|h| &h.refused)),
                audit_healthy: audit.is_some_and(audit::Health::healthy),
                in_flight: i64::try_from(
                    self.shared.max_in_flight - self.shared.in_flight.available_permits(),
                )
                .unwrap_or(0),
            },
            &signers,
            &identity
                .iter()
                .map(|s| metrics::IdentityStats {
                    provider: &s.name,
                    up: s.up,
                    keys: s.keys,
                    fetches_ok: s.fetches_ok,
                    fetches_failed: s.fetches_failed,
                    verifications: &s.verifications,
                })
                .collect::<Vec<_>>(),
        )
    }

    /// The client that carries a request for `api` signed by `key`: APNs' per-key HTTP/2
    /// client, or the shared one.
    pub(super) fn upstream_for(&self, api: Api, key: &str) -> forward::Client {
        match self.apns.get(key).filter(|_| api == Api::Apns) {
            Some(client) => client
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            None => self.upstream.clone(),
        }
    }

    /// APNs refused `key`'s token on a connection bound to another key
    /// (`UnrelatedKeyIdInToken`): the next push opens a new connection (APPLE.md §9.1).
    pub(super) fn renew_apns_connection(&self, key: &str) {
        if let Some(client) = self.apns.get(key) {
            match forward::http2_client(&self.config) {
                Ok(fresh) => {
                    *client
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                }
                Err(e) => tracing::warn!(key, error = %e, "cannot build a new APNs connection"),
            }
        }
    }

    /// Apple accepted `key` just now.
    pub(super) fn key_worked(&self, key: &str) {
        if let Some(t) = self.key_success.get(key) {
            t.store(token::unix_secs(SystemTime::now()), Ordering::Relaxed);
        }
    }

    /// When Apple last accepted `key`, if it has since start-up.
    pub(super) fn key_last_success(&self, key: &str) -> Option<i64> {
        self.key_success
            .get(key)
            .map(|t| t.load(Ordering::Relaxed))
            .filter(|t| *t > 0)
    }
}

/// Request ids: a random per-process prefix and a counter — unique across replicas without
/// coordination, cheap to make.
pub(super) struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> RequestIds {
        use ring::rand::SecureRandom as _;
        let mut bytes = [0u8; 6];
        // Falls back to the time when the OS RNG is unavailable: ids need uniqueness, not secrecy.
        if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
            let t = token::unix_secs(SystemTime::now()).to_be_bytes();
            bytes.copy_from_slice(&t[2..]);
        }
        RequestIds {
            prefix: crate::hex(&bytes),
            next: AtomicU64::new(1),
        }
    }

    /// `<prefix>-<counter as at least 8 hex digits>`, shared by the exchange, its log lines
    /// and its record without copying.
    pub fn next(&self) -> Arc<str> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Built on the stack: the Arc is the id's one allocation.
        let digits = (16 - n.leading_zeros() as usize / 4).max(8);
        let mut buf = [0u8; 64];
        let prefix = self.prefix.as_bytes();
        buf[..prefix.len()].copy_from_slice(prefix);
        buf[prefix.len()] = b'-';
        let end = prefix.len() + 1 + digits;
        for (i, b) in buf[prefix.len() + 1..end].iter_mut().rev().enumerate() {
            *b = DIGITS[((n >> (4 * i)) & 0xf) as usize];
        }
        // Hex digits after a hex prefix: ASCII.
        Arc::from(std::str::from_utf8(&buf[..end]).unwrap_or("request"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_prefix_dash_at_least_eight_hex_digits() {
        let ids = RequestIds::new();
        let first = ids.next();
        let (prefix, counter) = first.split_once('-').expect("a dash");
        assert_eq!(prefix.len(), 12);
        assert!(prefix.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(counter, "00000001");
        assert_eq!(&*ids.next(), format!("{prefix}-00000002"));
        ids.next.store(0xdead_beef, Ordering::Relaxed);
        assert_eq!(&*ids.next(), format!("{prefix}-deadbeef"));
        // Past 2^32 the counter grows a digit instead of wrapping.
        ids.next.store(0x1_0000_0000, Ordering::Relaxed);
        assert_eq!(&*ids.next(), format!("{prefix}-100000000"));
        ids.next.store(u64::MAX, Ordering::Relaxed);
        assert_eq!(&*ids.next(), format!("{prefix}-ffffffffffffffff"));
    }
}
