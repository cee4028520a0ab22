//! Prometheus metrics, with fixed label sets only: API ids, configured client names, status
//! classes, configured key names, cause codes — never a path or anything a client chooses.
//!
//! Owns the registry and its text exposition. `proxy` hands it small summary values at the
//! end of each request; counters kept elsewhere (the minter's, the audit writer's) are copied
//! in at scrape time via [`Snapshot`]. Imports nothing from the crate.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Content type of the exposition (OpenMetrics text, which Prometheus scrapes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

// Label values are static strings or shared names, so counting a request allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    api: &'static str,
    client: Shared,
    status_class: &'static str,
    /// The exact status the client got: three digits, so at most 900 values.
    status: Status,
    /// The audit decision (`forwarded`, `denied`, …): a fixed set.
    decision: &'static str,
}

/// An HTTP status as a label value: three digits (hyper allows no other).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Status(u16);

impl EncodeLabelValue for Status {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        use std::fmt::Write as _;
        write!(encoder, "{:03}", self.0.min(999))
    }
}

/// A configured name as a label value: cloning it for a lookup allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Shared(Arc<str>);

impl EncodeLabelValue for Shared {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    api: &'static str,
    status: &'static str,
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    api: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignatureLabels {
    kind: &'static str,
    client: Shared,
    /// `signed`, `denied` (the client's signing policy), `invalid` (the body), `refused`
    /// (anything else the client caused: limits, size, method) or `error`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignerLabels {
    key: String,
    backend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiOutcomeLabels {
    api: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiKeyLabels {
    api: &'static str,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderOutcomeLabels {
    provider: String,
    outcome: &'static str,
}

/// An identity provider's state and running totals (DESIGN §17), copied in at scrape time.
#[derive(Clone, Copy, Debug)]
pub struct IdentityStats<'a> {
    pub provider: &'a str,
    /// Whether the last key fetch worked.
    pub up: bool,
    /// Keys cached now.
    pub keys: usize,
    pub fetches_ok: u64,
    pub fetches_failed: u64,
    /// Verifications by outcome (a fixed set).
    pub verifications: &'a [(&'static str, u64)],
}

/// One finished request, as metrics see it.
#[derive(Clone, Copy, Debug)]
pub struct Summary<'a> {
    /// API id, or `"none"` when the request was not routed.
    pub api: &'static str,
    /// Configured client name or `"anonymous"`; `None` counts as `"unauthenticated"`.
    pub client: Option<&'a Arc<str>>,
    pub status: u16,
    /// The audit decision's spelling.
    pub decision: &'static str,
    pub duration: Duration,
    /// Time until Apple's response head, when Apple was asked.
    pub upstream: Option<Duration>,
    /// The diagnosis of an Apple 401/403 (or of a retried success).
    pub diagnosis: Option<&'static str>,
    /// Apple's status when Apple answered.
    pub upstream_status: Option<u16>,
    pub retried: bool,
    /// The in-app signature kind, for requests to the signature endpoints.
    pub signing: Option<&'static str>,
    /// The proxy's error kind when it answered itself.
    pub error: Option<&'static str>,
}

/// Counters owned by other parts, copied in at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub tokens_minted: u64,
    pub token_cache_hits: u64,
    pub apple_clock_offset_s: i64,
    pub audit_written: u64,
    pub audit_write_failures: u64,
    pub audit_lost: u64,
    pub audit_refused: u64,
    pub audit_healthy: bool,
    pub in_flight: i64,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<ApiLabels, Histogram>,
    upstream_duration: Family<ApiLabels, Histogram>,
    apple_auth_failures: Family<CauseLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    signatures: Family<SignatureLabels, Counter>,
    rate_limit_remaining: Family<KeyLabels, Gauge>,
    signer_up: Family<SignerLabels, Gauge>,
    signer_failures: Family<KeyLabels, Counter>,
    identity_verifications: Family<ProviderOutcomeLabels, Counter>,
    identity_key_fetches: Family<ProviderOutcomeLabels, Counter>,
    identity_provider_up: Family<ProviderLabels, Gauge>,
    identity_keys: Family<ProviderLabels, Gauge>,
    token_exchanges: Family<ApiOutcomeLabels, Counter>,
    access_token_age: Family<ApiKeyLabels, Gauge>,
    tokens_minted: Counter,
    token_cache_hits: Counter,
    clock_offset: Gauge,
    audit_written: Counter,
    audit_write_failures: Counter,
    audit_lost: Counter,
    audit_refused: Counter,
    audit_healthy: Gauge,
    in_flight: Gauge,
    config_reloads: Family<ReloadLabels, Counter>,
    /// The client label of requests that never authenticated.
    unauthenticated: Arc<str>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("aap");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by API, client, status (class and exact) and decision",
            requests.clone(),
        );
        let duration = Family::<ApiLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response body",
            duration.clone(),
        );
        let upstream_duration = Family::<ApiLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "upstream_duration_seconds",
            "Time until Apple's response head",
            upstream_duration.clone(),
        );
        let apple_auth_failures = Family::<CauseLabels, Counter>::default();
        registry.register(
            "apple_auth_failures",
            "Apple 401/403 answers, by first diagnosed cause",
            apple_auth_failures.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Re-mint-and-retry after an Apple 401, by outcome",
            retries.clone(),
        );
        let signatures = Family::<SignatureLabels, Counter>::default();
        registry.register(
            "signatures",
            "In-app signature requests (DESIGN §15), by kind, client and outcome",
            signatures.clone(),
        );
        let rate_limit_remaining = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "apple_rate_limit_remaining",
            "Apple's X-Rate-Limit user-hour-rem, per key",
            rate_limit_remaining.clone(),
        );
        let signer_up = Family::<SignerLabels, Gauge>::default();
        registry.register(
            "signer_up",
            "1 while the key's signer can sign (an HSM key is 0 while its HSM fails), by key and backend",
            signer_up.clone(),
        );
        let signer_failures = Family::<KeyLabels, Counter>::default();
        registry.register(
            "signer_failures",
            "Requests refused with 503 PROXY_SIGNER_UNAVAILABLE because the key's signer failed",
            signer_failures.clone(),
        );
        let identity_verifications = Family::<ProviderOutcomeLabels, Counter>::default();
        registry.register(
            "identity_verifications",
            "Identity tokens checked (DESIGN §17), by provider and outcome (ok, expired, audience, signature, unknown_key, no_client, unavailable, …)",
            identity_verifications.clone(),
        );
        let identity_key_fetches = Family::<ProviderOutcomeLabels, Counter>::default();
        registry.register(
            "identity_key_fetches",
            "Fetches of an identity provider's discovery document and JWKS, by provider and outcome (ok, error)",
            identity_key_fetches.clone(),
        );
        let identity_provider_up = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "identity_provider_up",
            "1 while the last fetch of the identity provider's keys worked (cached keys keep serving while it is 0)",
            identity_provider_up.clone(),
        );
        let identity_keys = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "identity_provider_keys",
            "Keys of the identity provider cached now (0: its tokens get 503 PROXY_IDENTITY_UNAVAILABLE)",
            identity_keys.clone(),
        );
        let token_exchanges = Family::<ApiOutcomeLabels, Counter>::default();
        registry.register(
            "token_exchanges",
            "Exchanges of an assertion for an access token (DESIGN §18: Maps, Apple Business/School Manager), by API and outcome (ok, refused, unavailable, timeout, malformed, signer)",
            token_exchanges.clone(),
        );
        let access_token_age = Family::<ApiKeyLabels, Gauge>::default();
        registry.register(
            "access_token_age_seconds",
            "Age of each exchanged access token held, by API and key",
            access_token_age.clone(),
        );
        let tokens_minted = Counter::default();
        registry.register(
            "tokens_minted",
            "ES256 tokens signed",
            tokens_minted.clone(),
        );
        let token_cache_hits = Counter::default();
        registry.register(
            "token_cache_hits",
            "Requests served a cached token",
            token_cache_hits.clone(),
        );
        let clock_offset = Gauge::default();
        registry.register(
            "apple_clock_offset_seconds",
            "Apple's clock minus this host's, from Apple's Date header",
            clock_offset.clone(),
        );
        let audit_written = Counter::default();
        registry.register(
            "audit_records_written",
            "Audit records written",
            audit_written.clone(),
        );
        let audit_write_failures = Counter::default();
        registry.register(
            "audit_write_failures",
            "Failed audit writes (each retried)",
            audit_write_failures.clone(),
        );
        let audit_lost = Counter::default();
        registry.register(
            "audit_records_lost",
            "Audit records that could not be written at all",
            audit_lost.clone(),
        );
        let audit_refused = Counter::default();
        registry.register(
            "audit_refused_requests",
            "Requests refused because the audit log was failing",
            audit_refused.clone(),
        );
        let audit_healthy = Gauge::default();
        registry.register(
            "audit_healthy",
            "1 while the audit log is writable",
            audit_healthy.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, applied or rejected",
            config_reloads.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Requests being served",
            in_flight.clone(),
        );
        Metrics {
            unauthenticated: Arc::from("unauthenticated"),
            registry,
            requests,
            duration,
            upstream_duration,
            apple_auth_failures,
            retries,
            signatures,
            rate_limit_remaining,
            signer_up,
            signer_failures,
            identity_verifications,
            token_exchanges,
            access_token_age,
            identity_key_fetches,
            identity_provider_up,
            identity_keys,
            tokens_minted,
            token_cache_hits,
            clock_offset,
            audit_written,
            audit_write_failures,
            audit_lost,
            audit_refused,
            audit_healthy,
            in_flight,
            config_reloads,
        }
    }

    /// Counts one finished request.
    pub fn observe(&self, s: &Summary<'_>) {
        let api = ApiLabels { api: s.api };
        self.requests
            .get_or_create(&RequestLabels {
                api: s.api,
                client: Shared(s.client.unwrap_or(&self.unauthenticated).clone()),
                status_class: match s.status / 100 {
                    1 => "1xx",
                    2 => "2xx",
                    3 => "3xx",
                    4 => "4xx",
                    _ => "5xx",
                },
                status: Status(s.status),
                decision: s.decision,
            })
            .inc();
        self.duration
            .get_or_create(&api)
            .observe(s.duration.as_secs_f64());
        if let Some(up) = s.upstream {
            self.upstream_duration
                .get_or_create(&api)
                .observe(up.as_secs_f64());
        }
        if let (Some(cause), Some(status @ (401 | 403))) = (s.diagnosis, s.upstream_status) {
            self.apple_auth_failures
                .get_or_create(&CauseLabels {
                    api: s.api,
                    status: if status == 401 { "401" } else { "403" },
                    cause,
                })
                .inc();
        }
        if let Some(kind) = s.signing {
            let outcome = match (s.decision, s.error) {
                ("signed", _) => "signed",
                (_, Some("signing_denied")) => "denied",
                (_, Some("invalid_body" | "ambiguous_key")) => "invalid",
                ("denied", _) => "refused",
                _ => "error",
            };
            self.signatures
                .get_or_create(&SignatureLabels {
                    kind,
                    client: Shared(s.client.unwrap_or(&self.unauthenticated).clone()),
                    outcome,
                })
                .inc();
        }
        if s.retried {
            let ok = s.upstream_status.is_some_and(|st| st != 401 && st != 403);
            self.retries
                .get_or_create(&RetryLabels {
                    api: s.api,
                    outcome: if ok { "succeeded" } else { "refused_again" },
                })
                .inc();
        }
    }

    /// Counts a configuration reload.
    pub fn config_reload(&self, applied: bool) {
        self.config_reloads
            .get_or_create(&ReloadLabels {
                result: if applied { "applied" } else { "rejected" }.to_string(),
            })
            .inc();
    }

    /// Apple's remaining hourly budget for `key` (from `X-Rate-Limit`).
    pub fn rate_limit_remaining(&self, key: &str, remaining: u64) {
        self.rate_limit_remaining
            .get_or_create(&KeyLabels {
                key: key.to_string(),
            })
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    /// A request for `key` was refused because its signer failed.
    pub fn signer_failure(&self, key: &str) {
        self.signer_failures
            .get_or_create(&KeyLabels {
                key: key.to_string(),
            })
            .inc();
    }

    /// The exchange APIs' totals and access-token ages (owned by `exchange`), copied in
    /// before [`Metrics::encode`].
    pub fn exchanges(
        &self,
        counts: &[((&'static str, &'static str), u64)],
        ages: &[crate::exchange::Age],
    ) {
        for ((api, outcome), n) in counts {
            sync(
                &self
                    .token_exchanges
                    .get_or_create(&ApiOutcomeLabels { api, outcome }),
                *n,
            );
        }
        self.access_token_age.clear();
        for age in ages {
            self.access_token_age
                .get_or_create(&ApiKeyLabels {
                    api: age.api.id(),
                    key: age.key.to_string(),
                })
                .set(i64::try_from(age.seconds).unwrap_or(i64::MAX));
        }
    }

    /// The exposition text, with `snapshot` copied in first, and `signers` (each key's
    /// name, backend and whether it can sign now) replacing the previous signer gauges.
    pub fn encode(
        &self,
        snapshot: Snapshot,
        signers: &[(&str, &'static str, bool)],
        identity: &[IdentityStats<'_>],
    ) -> String {
        self.identity_provider_up.clear();
        self.identity_keys.clear();
        for p in identity {
            let provider = || ProviderLabels {
                provider: p.provider.to_string(),
            };
            self.identity_provider_up
                .get_or_create(&provider())
                .set(i64::from(p.up));
            self.identity_keys
                .get_or_create(&provider())
                .set(i64::try_from(p.keys).unwrap_or(i64::MAX));
            let outcome = |outcome| ProviderOutcomeLabels {
                provider: p.provider.to_string(),
                outcome,
            };
            sync(
                &self.identity_key_fetches.get_or_create(&outcome("ok")),
                p.fetches_ok,
            );
            sync(
                &self.identity_key_fetches.get_or_create(&outcome("error")),
                p.fetches_failed,
            );
            for (o, n) in p.verifications {
                if *n > 0 {
                    sync(&self.identity_verifications.get_or_create(&outcome(o)), *n);
                }
            }
        }
        self.signer_up.clear();
        for (key, backend, up) in signers {
            self.signer_up
                .get_or_create(&SignerLabels {
                    key: (*key).to_string(),
                    backend,
                })
                .set(i64::from(*up));
        }
        sync(&self.tokens_minted, snapshot.tokens_minted);
        sync(&self.token_cache_hits, snapshot.token_cache_hits);
        sync(&self.audit_written, snapshot.audit_written);
        sync(&self.audit_write_failures, snapshot.audit_write_failures);
        sync(&self.audit_lost, snapshot.audit_lost);
        sync(&self.audit_refused, snapshot.audit_refused);
        self.clock_offset.set(snapshot.apple_clock_offset_s);
        self.audit_healthy.set(i64::from(snapshot.audit_healthy));
        self.in_flight.set(snapshot.in_flight);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Brings a counter up to a monotonic total kept elsewhere.
fn sync(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

/// `user-hour-rem` from Apple's `X-Rate-Limit: user-hour-lim:3600;user-hour-rem:3121;`.
pub fn parse_rate_limit_remaining(header: &str) -> Option<u64> {
    header
        .split(';')
        .filter_map(|part| part.trim().split_once(':'))
        .find(|(k, _)| k.trim() == "user-hour-rem")
        .and_then(|(_, v)| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_exposition_with_fixed_labels() {
        let m = Metrics::new();
        m.observe(&Summary {
            api: "app-store-connect",
            client: Some(&Arc::from("ci")),
            status: 401,
            decision: "forwarded",
            duration: Duration::from_millis(12),
            upstream: Some(Duration::from_millis(10)),
            diagnosis: Some("CLOCK_SKEW"),
            upstream_status: Some(401),
            retried: true,
            signing: None,
            error: None,
        });
        let shop: Arc<str> = Arc::from("shop");
        let signature = |decision, error| Summary {
            api: "in-app-signing",
            client: Some(&shop),
            status: 200,
            decision,
            duration: Duration::from_millis(1),
            upstream: None,
            diagnosis: None,
            upstream_status: None,
            retried: false,
            signing: Some("promotional-offer"),
            error,
        };
        m.observe(&signature("signed", None));
        m.observe(&signature("signed", None));
        m.observe(&signature("denied", Some("signing_denied")));
        m.observe(&signature("denied", Some("invalid_body")));
        m.rate_limit_remaining("connect", 3121);
        m.signer_failure("hsm");
        let text = m.encode(
            Snapshot {
                tokens_minted: 3,
                audit_healthy: true,
                ..Snapshot::default()
            },
            &[("connect", "memory", true), ("hsm", "pkcs11", false)],
            &[IdentityStats {
                provider: "github-actions",
                up: false,
                keys: 2,
                fetches_ok: 3,
                fetches_failed: 1,
                verifications: &[("ok", 5), ("expired", 1), ("audience", 0)],
            }],
        );
        for want in [
            r#"aap_requests_total{api="app-store-connect",client="ci",status_class="4xx",status="401",decision="forwarded"} 1"#,
            r#"aap_apple_auth_failures_total{api="app-store-connect",status="401",cause="CLOCK_SKEW"} 1"#,
            r#"aap_upstream_retries_total{api="app-store-connect",outcome="refused_again"} 1"#,
            r#"aap_apple_rate_limit_remaining{key="connect"} 3121"#,
            r#"aap_signatures_total{kind="promotional-offer",client="shop",outcome="signed"} 2"#,
            r#"aap_signatures_total{kind="promotional-offer",client="shop",outcome="denied"} 1"#,
            r#"aap_signatures_total{kind="promotional-offer",client="shop",outcome="invalid"} 1"#,
            "aap_tokens_minted_total 3",
            "aap_audit_healthy 1",
            r#"aap_signer_up{key="connect",backend="memory"} 1"#,
            r#"aap_signer_up{key="hsm",backend="pkcs11"} 0"#,
            r#"aap_signer_failures_total{key="hsm"} 1"#,
            r#"aap_identity_provider_up{provider="github-actions"} 0"#,
            r#"aap_identity_provider_keys{provider="github-actions"} 2"#,
            r#"aap_identity_key_fetches_total{provider="github-actions",outcome="ok"} 3"#,
            r#"aap_identity_key_fetches_total{provider="github-actions",outcome="error"} 1"#,
            r#"aap_identity_verifications_total{provider="github-actions",outcome="ok"} 5"#,
            r#"aap_identity_verifications_total{provider="github-actions",outcome="expired"} 1"#,
            "aap_request_duration_seconds_bucket",
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        // Monotonic copies never go backwards.
        let again = m.encode(
            Snapshot {
                tokens_minted: 1,
                ..Snapshot::default()
            },
            &[("connect", "memory", true)],
            &[],
        );
        assert!(again.contains("aap_tokens_minted_total 3"));
        assert!(!again.contains(r#"aap_identity_provider_up{"#), "{again}");
        // A key gone after a reload leaves no gauge behind.
        assert!(!again.contains(r#"aap_signer_up{key="hsm""#), "{again}");
    }

    #[test]
    fn apples_rate_limit_header_parses() {
        assert_eq!(
            parse_rate_limit_remaining("user-hour-lim:3500;user-hour-rem:500;"),
            Some(500)
        );
        assert_eq!(parse_rate_limit_remaining("user-hour-rem: 7"), Some(7));
        assert_eq!(parse_rate_limit_remaining("garbage"), None);
    }
}
