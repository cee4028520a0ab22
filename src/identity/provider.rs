//! One identity provider's keys at run time: fetched at start (discovery, then JWKS),
//! refreshed periodically, refetched on demand for an unknown `kid` at most once per
//! [`ON_DEMAND_INTERVAL`], and kept serving while a refresh fails (DESIGN §17).
//!
//! A [`Provider`] outlives config reloads (the [`Registry`] hands the same one to the next
//! runtime while its fetch settings are unchanged), so a reload costs no refetch and never
//! drops keys. Its refresh task holds only a weak reference and ends with it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::BodyExt as _;

use super::verify::KeySet;
use crate::config::{Config, IdentityProviderConfig};
use crate::forward;

/// How often a provider's keys are refreshed while fetching works.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// An unknown `kid` (or no keys at all) triggers at most one fetch per this interval.
pub const ON_DEMAND_INTERVAL: Duration = Duration::from_secs(30);
/// Retry delays while fetching fails: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// One discovery or JWKS request, head and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery document or JWKS read.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Verification outcomes counted per provider (the metrics' `outcome` label).
pub const OUTCOMES: [&str; 11] = [
    "ok",
    "malformed",
    "algorithm",
    "unknown_key",
    "signature",
    "issuer",
    "audience",
    "expired",
    "too_old",
    "no_client",
    "unavailable",
];

/// What identifies a provider's fetching: a reload that changes none of it keeps the
/// provider (and its keys).
#[derive(Clone, Debug, PartialEq, Eq)]
struct FetchSettings {
    name: String,
    issuer: String,
    jwks_url: Option<String>,
    /// The trust anchors' and egress settings' bytes, hashed.
    trust: [u8; 32],
}

/// Why the keys could not be fetched, for the log, `check` and the 503's cause.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(String);

/// The outcome of an on-demand refetch.
#[derive(Debug, PartialEq, Eq)]
pub enum Refetch {
    /// The key set changed (here or in a fetch that finished while this one waited).
    Changed,
    /// Fetched, or skipped because one ran less than [`ON_DEMAND_INTERVAL`] ago: no change.
    Unchanged,
    /// The fetch failed.
    Failed(FetchError),
}

pub struct Provider {
    pub name: Arc<str>,
    pub issuer: String,
    settings: FetchSettings,
    client: forward::Client,
    keys: ArcSwapOption<KeySet>,
    /// Bumped whenever the stored key set changes.
    version: AtomicU64,
    /// Serialises fetches: a refetch waits for one in progress instead of adding another.
    fetching: tokio::sync::Mutex<()>,
    last_on_demand: Mutex<Option<Instant>>,
    /// Whether the last fetch worked.
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
    counters: Arc<Counters>,
}

/// A provider name's counters: kept by the [`Registry`] across reloads, and across a
/// provider replaced under the same name, so the metrics stay monotonic.
#[derive(Default)]
struct Counters {
    fetches_ok: AtomicU64,
    fetches_failed: AtomicU64,
    verifications: [AtomicU64; OUTCOMES.len()],
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// A provider's counters and state, for `/metrics`.
#[derive(Clone, Debug)]
pub struct Stats {
    pub name: Arc<str>,
    pub up: bool,
    pub keys: usize,
    pub fetches_ok: u64,
    pub fetches_failed: u64,
    pub verifications: Vec<(&'static str, u64)>,
}

impl Provider {
    fn new(settings: FetchSettings, client: forward::Client, counters: Arc<Counters>) -> Provider {
        Provider {
            name: Arc::from(settings.name.as_str()),
            issuer: settings.issuer.clone(),
            settings,
            client,
            keys: ArcSwapOption::empty(),
            version: AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(()),
            last_on_demand: Mutex::new(None),
            up: AtomicBool::new(false),
            last_error: Mutex::new(None),
            counters,
        }
    }

    /// The keys cached now, and the version they carry.
    pub fn keys(&self) -> (Option<Arc<KeySet>>, u64) {
        // Version first: a store between the two loads makes the version stale, which only
        // costs a full verification later, never trusts a removed key.
        let version = self.version.load(Ordering::Acquire);
        (self.keys.load_full(), version)
    }

    /// Stores `set` as if fetched (unit tests of the callers).
    #[cfg(test)]
    pub(crate) fn set_keys(&self, set: KeySet) {
        self.keys.store(Some(Arc::new(set)));
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Why the last fetch failed, while it is failing.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Counts one verification outcome (one of [`OUTCOMES`]).
    pub fn count(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.counters.verifications[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            name: self.name.clone(),
            up: self.up.load(Ordering::Relaxed),
            keys: self.keys.load().as_ref().map_or(0, |k| k.keys.len()),
            fetches_ok: self.counters.fetches_ok.load(Ordering::Relaxed),
            fetches_failed: self.counters.fetches_failed.load(Ordering::Relaxed),
            verifications: OUTCOMES
                .iter()
                .zip(&self.counters.verifications)
                .map(|(o, n)| (*o, n.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Fetches the keys now (waiting for a fetch in progress first).
    pub async fn fetch(&self) -> Result<(), FetchError> {
        let _one = self.fetching.lock().await;
        self.fetch_now().await
    }

    /// For an unknown `kid` or an empty cache: at most one fetch per
    /// [`ON_DEMAND_INTERVAL`]; `seen` is the key-set version the caller verified against.
    pub async fn refetch(&self, seen: u64) -> Refetch {
        let _one = self.fetching.lock().await;
        if self.version() != seen {
            return Refetch::Changed;
        }
        {
            let mut last = lock(&self.last_on_demand);
            if last.is_some_and(|t| t.elapsed() < ON_DEMAND_INTERVAL) {
                return Refetch::Unchanged;
            }
            *last = Some(Instant::now());
        }
        match self.fetch_now().await {
            Ok(()) if self.version() != seen => Refetch::Changed,
            Ok(()) => Refetch::Unchanged,
            Err(e) => Refetch::Failed(e),
        }
    }

    /// One fetch; the caller holds `fetching`.
    async fn fetch_now(&self) -> Result<(), FetchError> {
        match self.download().await {
            Ok(set) => {
                self.counters.fetches_ok.fetch_add(1, Ordering::Relaxed);
                self.up.store(true, Ordering::Relaxed);
                *lock(&self.last_error) = None;
                let old = self.keys.load_full();
                if old.as_deref() != Some(&set) {
                    let mut kids: Vec<&str> = set.keys.keys().map(String::as_str).collect();
                    kids.sort_unstable();
                    tracing::info!(provider = %self.name, keys = ?kids, skipped = ?set.skipped, "identity provider keys loaded");
                    self.keys.store(Some(Arc::new(set)));
                    self.version.fetch_add(1, Ordering::AcqRel);
                }
                Ok(())
            }
            Err(e) => {
                self.counters.fetches_failed.fetch_add(1, Ordering::Relaxed);
                self.up.store(false, Ordering::Relaxed);
                *lock(&self.last_error) = Some(e.0.clone());
                tracing::warn!(provider = %self.name, error = %e, cached = self.keys.load().is_some(), "cannot fetch the identity provider's keys; cached keys (if any) keep serving");
                Err(e)
            }
        }
    }

    async fn download(&self) -> Result<KeySet, FetchError> {
        let jwks_url = match &self.settings.jwks_url {
            Some(url) => url.clone(),
            None => self.discover().await?,
        };
        let body = self.get(&jwks_url).await?;
        KeySet::parse(&body).map_err(|e| FetchError(format!("{jwks_url}: {e}")))
    }

    /// The `jwks_uri` of the issuer's discovery document, which must name the issuer.
    async fn discover(&self) -> Result<String, FetchError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        );
        let body = self.get(&url).await?;
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| FetchError(format!("{url}: not JSON: {e}")))?;
        let named = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or("");
        if named != self.issuer {
            return Err(FetchError(format!(
                "{url}: the discovery document names issuer {named:?}, not {:?} (fix: set issuer to exactly what the tokens' iss says)",
                self.issuer
            )));
        }
        let jwks = doc
            .get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                FetchError(format!(
                    "{url}: the discovery document has no jwks_uri (fix: set jwks_url)"
                ))
            })?;
        if !jwks.starts_with("https://") {
            return Err(FetchError(format!(
                "{url}: jwks_uri {jwks:?} is not https:// (keys are fetched over TLS only)"
            )));
        }
        Ok(jwks.to_string())
    }

    async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        let request = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("apple-api-proxy/", env!("CARGO_PKG_VERSION")),
            )
            .body(forward::empty())
            .map_err(|e| FetchError(format!("{url}: {e}")))?;
        let fetch = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| FetchError(format!("{url}: {}", crate::error_chain(&e))))?;
            if response.status() != http::StatusCode::OK {
                return Err(FetchError(format!("{url} answered {}", response.status())));
            }
            let body = http_body_util::Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
                .collect()
                .await
                .map_err(|e| FetchError(format!("{url}: reading the body: {e}")))?;
            Ok(body.to_bytes())
        };
        tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| {
                FetchError(format!(
                    "{url}: no answer within {} s",
                    FETCH_TIMEOUT.as_secs()
                ))
            })?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps every provider alive across reloads while its fetch settings are unchanged.
#[derive(Default)]
pub struct Registry {
    providers: Mutex<Vec<Weak<Provider>>>,
    counters: Mutex<std::collections::HashMap<String, Arc<Counters>>>,
}

/// A provider could not be set up: its `ca_file` is unreadable or holds no certificate.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {source}")]
pub struct SetupError {
    pub field: String,
    #[source]
    pub source: forward::ClientError,
}

impl Registry {
    /// The providers of `config`, in its order: the ones already running with the same
    /// fetch settings, else new ones whose refresh task starts now (when a Tokio runtime is
    /// running; `check` and `explain` fetch themselves).
    pub fn providers(&self, config: &Config) -> Result<Vec<Arc<Provider>>, SetupError> {
        let mut running = lock(&self.providers);
        running.retain(|w| w.strong_count() > 0);
        let mut out = Vec::with_capacity(config.identity_providers.len());
        for (i, p) in config.identity_providers.iter().enumerate() {
            let settings = FetchSettings {
                name: p.name.clone(),
                issuer: p.issuer.clone(),
                jwks_url: p.jwks_url.clone(),
                trust: trust_fingerprint(config, p),
            };
            if let Some(existing) = running
                .iter()
                .filter_map(Weak::upgrade)
                .find(|e| e.settings == settings)
            {
                out.push(existing);
                continue;
            }
            let client =
                forward::identity_client(config, p.ca_file.as_deref()).map_err(|source| {
                    SetupError {
                        field: format!("{}: identity_providers[{i}].ca_file", config.source),
                        source,
                    }
                })?;
            let counters = lock(&self.counters)
                .entry(p.name.clone())
                .or_default()
                .clone();
            let provider = Arc::new(Provider::new(settings, client, counters));
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(refresh(Arc::downgrade(&provider)));
            }
            running.push(Arc::downgrade(&provider));
            out.push(provider);
        }
        Ok(out)
    }
}

/// The bytes a provider's TLS trust and egress depend on, hashed.
fn trust_fingerprint(config: &Config, p: &IdentityProviderConfig) -> [u8; 32] {
    let mut bytes = Vec::new();
    for path in [p.ca_file.as_deref(), config.upstream.ca_file.as_deref()]
        .into_iter()
        .flatten()
    {
        bytes.extend_from_slice(path.as_os_str().as_encoded_bytes());
        bytes.push(0);
        bytes.extend_from_slice(&std::fs::read(path).unwrap_or_default());
        bytes.push(0);
    }
    bytes.extend_from_slice(
        config
            .upstream
            .egress_proxy
            .as_deref()
            .unwrap_or("")
            .as_bytes(),
    );
    crate::sha256(&bytes)
}

/// Fetches at once, then every [`REFRESH_INTERVAL`], retrying sooner (doubling from
/// 1 s to 60 s) while fetching fails; ends when the provider is dropped.
async fn refresh(provider: Weak<Provider>) {
    let mut retry = RETRY_FIRST;
    loop {
        let Some(p) = provider.upgrade() else { return };
        let wait = match p.fetch().await {
            Ok(()) => {
                retry = RETRY_FIRST;
                REFRESH_INTERVAL
            }
            Err(_) => {
                let wait = retry;
                retry = (retry * 2).min(RETRY_MAX);
                wait
            }
        };
        drop(p);
        tokio::time::sleep(wait).await;
    }
}
