//! The life of one request, in order. This is the only module that knows the order of the
//! steps; each step's rules live in its own module.
//!
//! accept → begin → authenticate → check path → route → policy → mint → forward → inspect →
//! finish. [`Proxy::handle`] is the outer handler: it renders every error into the JSON shape
//! of DESIGN §6, stamps `X-Request-Id`, and logs exactly once; [`Proxy::process`] is the
//! inner handler and returns `Result`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use tracing::Instrument as _;

use crate::apple::{Api, Environment, KeyKind, TokenFamily};
use crate::audit;
use crate::client::{AuthError, CertIdentity, Clients, Identity};
use crate::config::Config;
use crate::diagnose::{self, SandboxProbe};
use crate::forward::{self, ProxyBody};
use crate::metrics;
use crate::route::{self, RouteError};
use crate::token::{self, AppleClock, Minter};

/// Longest path + query accepted. Apple's URLs are far shorter; the bound keeps scopes (and
/// so cached tokens) small whatever a client sends.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Apple's request id response header (the audit's `apple_request_id`).
pub const APPLE_REQUEST_ID: &str = "x-apple-request-uuid";
/// App Store Connect's rate-limit header (`user-hour-lim:3600;user-hour-rem:3121;`).
pub const APPLE_RATE_LIMIT: &str = "x-rate-limit";

/// Marks a response that sandbox answered for a production request (sandbox fallback).
pub const X_APPLE_ENVIRONMENT: &str = "x-apple-environment";
/// App Store Server error codes after which Apple advises asking sandbox (APPLE.md §3):
/// TransactionIdNotFound, OriginalTransactionIdNotFound.
pub const SANDBOX_FALLBACK_CODES: [i64; 2] = [4040010, 4040005];

/// Response header naming the first likely cause when Apple refused a request.
pub const X_PROXY_DIAGNOSIS: &str = "x-proxy-diagnosis";
/// Retries of a body-less idempotent request whose connection failed before anything was
/// sent, and the backoff step between them.
const MAX_CONNECT_RETRIES: u32 = 2;
const CONNECT_RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
/// How much of Apple's 401/403 body the diagnosis reads.
const DIAGNOSIS_BODY_LIMIT: usize = 64 * 1024;
const DIAGNOSIS_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long the sandbox probe may take.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Response header carrying the request id on every response.
pub const X_REQUEST_ID: &str = "x-request-id";

/// The error codes the proxy itself answers with (DESIGN §6). Stable: clients and tests match
/// on them.
pub mod codes {
    pub const UNAUTHENTICATED: &str = "PROXY_UNAUTHENTICATED";
    pub const FORBIDDEN: &str = "PROXY_FORBIDDEN";
    pub const NO_ROUTE: &str = "PROXY_NO_ROUTE";
    pub const BAD_REQUEST: &str = "PROXY_BAD_REQUEST";
    pub const BODY_TOO_LARGE: &str = "PROXY_BODY_TOO_LARGE";
    pub const RATE_LIMITED: &str = "PROXY_RATE_LIMITED";
    pub const OVERLOADED: &str = "PROXY_OVERLOADED";
    pub const UPSTREAM_UNAVAILABLE: &str = "PROXY_UPSTREAM_UNAVAILABLE";
    pub const UPSTREAM_TIMEOUT: &str = "PROXY_UPSTREAM_TIMEOUT";
    pub const AUDIT_UNAVAILABLE: &str = "PROXY_AUDIT_UNAVAILABLE";
    pub const INTERNAL: &str = "PROXY_INTERNAL";
}

/// Whose fault an error is: decides the log level and, later, the metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Proxy,
}

/// An error the proxy answers itself. `detail` is written for the client and never holds
/// internal error text; the cause chain goes only to the operator's log.
#[derive(Debug)]
pub struct ProxyError {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Stable snake_case kind (logs, later metrics and audit).
    pub kind: &'static str,
    pub fault: Fault,
    /// Seconds for `Retry-After` (delta-seconds, never Apple's millisecond form).
    pub retry_after: Option<u64>,
}

impl ProxyError {
    fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        kind: &'static str,
        fault: Fault,
        detail: impl Into<String>,
    ) -> ProxyError {
        ProxyError {
            status,
            code,
            title,
            detail: detail.into(),
            kind,
            fault,
            retry_after: None,
        }
    }

    /// Renders Apple's error shape, so clients' error handling keeps working.
    pub fn into_response(self, request_id: &str) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "errors": [{
                "status": self.status.as_str(),
                "code": self.code,
                "title": self.title,
                "detail": self.detail,
            }],
            "request_id": request_id,
        });
        let mut response = Response::new(forward::boxed(Full::new(Bytes::from(body.to_string()))));
        *response.status_mut() = self.status;
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"apple-api-proxy\""),
            );
        }
        response
    }
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}: no [[clients]] are configured and allow_anonymous is false, so nobody could use the proxy (fix: add a client with `apple-api-proxy client-secret NAME`, or set allow_anonymous = true under [server] for local use)")]
    NoClients(String),
    #[error("{file}: field `{field}`: {problem} (fix: {fix})")]
    Tls {
        file: String,
        field: &'static str,
        problem: String,
        fix: &'static str,
    },
    #[error(transparent)]
    Key(#[from] Box<token::LoadError>),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    Upstream(#[from] forward::ClientError),
}

/// Everything a request needs, built once from config.
pub struct Proxy {
    config: Arc<Config>,
    routes: route::Table,
    clients: Clients,
    minter: Minter,
    upstream: forward::Client,
    /// Inbound TLS (and mTLS), when configured.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Per key: when Apple last accepted it (UNIX seconds; 0 = not since start-up), shared
    /// with the runtimes before and after a reload for keys of the same name.
    key_success: HashMap<String, Arc<AtomicI64>>,
    shared: Arc<Shared>,
}

/// What outlives a config reload: one audit writer, one set of metrics, one idea of Apple's
/// clock, one sequence of request ids, one concurrency limit.
struct Shared {
    audit: std::sync::OnceLock<audit::Audit>,
    metrics: Arc<metrics::Metrics>,
    clock: Arc<AppleClock>,
    ids: RequestIds,
    /// `max_concurrent_requests` permits; a permit lives until the response body is done.
    in_flight: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
    serving: AtomicBool,
    /// Apple's per-endpoint limits, enforced locally where configured.
    apple_limits: crate::limits::AppleLimits,
}

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
            ids: RequestIds::new(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            max_in_flight,
            serving: AtomicBool::new(false),
            apple_limits: crate::limits::AppleLimits::default(),
        });
        Proxy::build(config, shared, &HashMap::new())
    }

    /// A new runtime from `config` for a reload: keys, clients, routes and the upstream
    /// client are built afresh (and checked as at start-up); the audit writer, metrics,
    /// Apple's clock and each same-named key's history carry over. Settings that need a
    /// restart (listeners, audit, max_concurrent_requests) are kept and warned about.
    pub fn reload(&self, config: Config) -> Result<(Proxy, Vec<String>), StartError> {
        Proxy::validate(&config)?;
        let (proxy, mut warnings) = Proxy::build(config, self.shared.clone(), &self.key_success)?;
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
        history: &HashMap<String, Arc<AtomicI64>>,
    ) -> Result<(Proxy, Vec<String>), StartError> {
        let tls = crate::server::tls_acceptor(&config)?;
        let (minter, warnings) = Minter::new(&config, shared.clock.clone())?;
        let upstream = forward::client(&config)?;
        let key_success = config
            .keys
            .iter()
            .map(|k| {
                let t = history
                    .get(&k.name)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(AtomicI64::new(0)));
                (k.name.clone(), t)
            })
            .collect();
        Ok((
            Proxy {
                routes: route::Table::new(&config),
                clients: Clients::new(&config),
                minter,
                upstream,
                tls,
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

    pub fn minter(&self) -> &Minter {
        &self.minter
    }

    pub fn tls(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.tls.as_ref()
    }

    /// Opens the audit log and starts its writer. Until this is called every request is
    /// refused with 503 PROXY_AUDIT_UNAVAILABLE.
    pub fn start_audit(&self) -> Result<audit::Writer, StartError> {
        let (audit, writer) = audit::Audit::start(&self.config.audit)?;
        if self.shared.audit.set(audit).is_err() {
            tracing::warn!("the audit log was already started");
        }
        Ok(writer)
    }

    pub fn audit(&self) -> Option<&audit::Audit> {
        self.shared.audit.get()
    }

    /// Ready to serve: keys loaded (construction), audit started and writable, listener up.
    pub fn ready(&self) -> Result<(), &'static str> {
        match self.shared.audit.get() {
            None => Err("the audit log is not open yet"),
            Some(a) if !a.health().healthy() => Err("the audit log cannot be written"),
            Some(_) if !self.shared.serving.load(Ordering::Relaxed) => {
                Err("the proxy listener is not accepting")
            }
            Some(_) => Ok(()),
        }
    }

    /// Counts a configuration reload (applied or rejected).
    pub fn note_reload(&self, applied: bool) {
        self.shared.metrics.config_reload(applied);
    }

    /// The server says whether its listener is accepting.
    pub fn set_serving(&self, serving: bool) {
        self.shared.serving.store(serving, Ordering::Relaxed);
    }

    /// The Prometheus exposition, with counters owned elsewhere copied in.
    pub fn metrics_text(&self) -> String {
        let (minted, hits) = self.minter.counts();
        let audit = self.shared.audit.get().map(|a| a.health());
        let load = |c: Option<&AtomicU64>| c.map_or(0, |c| c.load(Ordering::Relaxed));
        self.shared.metrics.encode(metrics::Snapshot {
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
        })
    }

    /// The outer handler: never fails, always stamps the request id, and hands the response
    /// to [`Proxy::finish`], which audits and counts it exactly once when its body ends.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
        cert: Option<Arc<CertIdentity>>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let id = self.shared.ids.next();
        // A debug-level span: the lines an operator sees at `info` carry `request_id`
        // themselves, so a request that logs nothing formats nothing.
        let span = tracing::debug_span!("request", id = %id, peer = %peer.addr);
        let head = Head::of(&req, peer);
        let mut ex = Exchange::default();
        let result = self
            .process(req, cert.as_deref(), &id, &mut ex)
            .instrument(span.clone())
            .await;
        self.finish(result, ex, head, id, span, started)
    }

    /// The answer to a request whose head carried both `Content-Length` and
    /// `Transfer-Encoding` (see [`crate::framing`]): 400, and `Connection: close` so hyper
    /// drops the connection whose framing can no longer be trusted. Audited like any other.
    pub fn refuse_smuggling(&self, req: &Request<Incoming>, peer: Peer) -> Response<ProxyBody> {
        let started = Instant::now();
        let id = self.shared.ids.next();
        let span = tracing::debug_span!("request", id = %id, peer = %peer.addr);
        let error = ProxyError {
            kind: "smuggling",
            ..bad_request(
                "the request carries both Content-Length and Transfer-Encoding".to_string(),
            )
        };
        let mut response = self.finish(
            Err(error),
            Exchange::default(),
            Head::of(req, peer),
            id,
            span,
            started,
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }

    /// Renders the outcome, logs the one line, and attaches the guard that writes the audit
    /// record and the metrics when the response body ends (or the client goes away).
    fn finish(
        &self,
        result: Result<Response<ProxyBody>, ProxyError>,
        ex: Exchange,
        head: Head,
        id: String,
        span: tracing::Span,
        started: Instant,
    ) -> Response<ProxyBody> {
        let (mut response, error) = match result {
            Ok(response) => (response, None),
            Err(error) => {
                let info = (error.kind, error.fault, error.detail.clone());
                (error.into_response(&id), Some(info))
            }
        };
        if let Ok(v) = HeaderValue::from_str(&id) {
            const NAME: http::HeaderName = http::HeaderName::from_static(X_REQUEST_ID);
            response.headers_mut().insert(NAME, v);
        }
        let status = response.status().as_u16();
        let head_ms = started.elapsed().as_millis() as u64;
        let (method, path) = (&head.method, &head.path);
        // The one log line per request (head sent; the body may still be streaming).
        match &error {
            None => {
                // Every request is in the audit log already; at `info` the operational log keeps
                // only what needs an operator's eye (refusals, failures, Apple's 401/403).
                tracing::debug!(parent: &span, request_id = %id, %method, %path, status, head_ms, diagnosis = ex.diagnosis, "forwarded")
            }
            Some((kind, Fault::Client, detail)) => {
                tracing::info!(parent: &span, request_id = %id, peer = %head.peer.addr, %method, %path, status, head_ms, kind, %detail, "refused")
            }
            Some((kind, _, detail)) => {
                tracing::warn!(parent: &span, request_id = %id, peer = %head.peer.addr, %method, %path, status, head_ms, kind, %detail, "failed")
            }
        }
        let decision = match error.as_ref().map(|e| e.0) {
            None => audit::Decision::Forwarded,
            Some(kind) => decision_for(kind),
        };
        let record = audit::Record {
            time: String::new(),
            request_id: id,
            client: ex.client,
            client_auth: ex.client_auth,
            client_addr: head.peer.text,
            method: head.method,
            path: head.path,
            query: head.query,
            api: ex.api.map(Api::id),
            environment: ex.environment.map(Environment::as_str),
            key: ex.key,
            key_id: ex.key_id,
            token_sha256: ex.token_sha256,
            decision,
            status,
            upstream_status: ex.upstream_status,
            diagnosis: ex.diagnosis,
            retried: ex.retried,
            connect_retries: ex.connect_retries,
            sandbox_fallback: ex.sandbox_fallback,
            apple_request_id: ex.apple_request_id,
            rate_limit_remaining: ex.rate_limit_remaining,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0,
            completed: false,
            error: error.map(|e| e.0),
        };
        let sent = Arc::new(forward::Meter::default());
        let guard = Finisher {
            record: Some(record),
            audit: self.shared.audit.get().cloned(),
            metrics: self.shared.metrics.clone(),
            started,
            upstream_elapsed: ex.upstream_elapsed,
            received: ex.received,
            sent: sent.clone(),
            _permit: ex.permit,
        };
        let (parts, body) = response.into_parts();
        let body = forward::Metered::new(body, sent, None)
            .idle_timeout(self.config.server.body_idle_timeout)
            .holding(guard);
        Response::from_parts(parts, forward::boxed(body))
    }

    /// The inner handler: each step in order, `?` on the first refusal.
    async fn process(
        &self,
        req: Request<Incoming>,
        cert: Option<&CertIdentity>,
        request_id: &str,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // Shed load first, answering at once rather than queuing without bound.
        ex.permit = Some(
            self.shared
                .in_flight
                .clone()
                .try_acquire_owned()
                .map_err(|_| ProxyError {
                    retry_after: Some(1),
                    ..ProxyError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        codes::OVERLOADED,
                        "Proxy overloaded",
                        "overloaded",
                        Fault::Proxy,
                        format!(
                            "more than {} requests are in flight; retry shortly",
                            self.config.server.max_concurrent_requests
                        ),
                    )
                })?,
        );
        let (parts, body) = req.into_parts();
        // Authenticate first: an unauthenticated caller learns nothing about routes.
        let who = self.authenticate(&parts.headers, cert)?;
        ex.client = Some(who.name.clone());
        ex.client_auth = who.method.as_str();
        // No unaudited request is served: while the audit log cannot be written (and
        // on_failure = "reject"), refuse right after learning who asks (so the refusal's
        // record names them) and before anything reaches Apple.
        if !self.shared.audit.get().is_some_and(audit::Audit::admits) {
            if let Some(a) = self.shared.audit.get() {
                a.refused();
            }
            return Err(ProxyError {
                retry_after: Some(1),
                ..ProxyError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::AUDIT_UNAVAILABLE,
                    "Audit log unavailable",
                    "audit_unavailable",
                    Fault::Proxy,
                    "the proxy cannot write its audit log, and serves no request it cannot audit; retry shortly",
                )
            });
        }

        // Methods that could make the proxy a tunnel or an echo server are refused outright.
        if parts.method == Method::CONNECT || parts.method == Method::TRACE {
            return Err(bad_request(format!("{} is not proxied", parts.method)));
        }

        // Check the path before routing so no path is ever normalised into another one, and
        // route by the path alone (an absolute-form target's authority is ignored).
        let path = parts.uri.path();
        let target_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if target_len > MAX_TARGET_BYTES {
            return Err(ProxyError::new(
                StatusCode::URI_TOO_LONG,
                codes::BAD_REQUEST,
                "Request target too long",
                "target_too_long",
                Fault::Client,
                format!("the path and query exceed {MAX_TARGET_BYTES} bytes"),
            ));
        }
        route::check_path(path).map_err(|e| bad_request(e.to_string()))?;
        let route = self.routes.resolve(path).map_err(|e| no_route(&e))?;
        ex.api = Some(route.api);
        ex.environment = Some(route.environment);

        // Policy before minting: a denied request costs no signature and reaches nothing.
        if !self.clients.allows(&who, parts.method.as_str(), path) {
            return Err(ProxyError::new(
                StatusCode::FORBIDDEN,
                codes::FORBIDDEN,
                "Forbidden by proxy policy",
                "forbidden",
                Fault::Client,
                format!("client `{}` may not {} {}", who.name, parts.method, path),
            ));
        }
        if let Err(wait) = self.clients.check_rate(&who, Instant::now()) {
            let secs = retry_after_secs(wait);
            return Err(ProxyError {
                retry_after: Some(secs),
                ..ProxyError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    codes::RATE_LIMITED,
                    "Client rate limit exceeded",
                    "rate_limited",
                    Fault::Client,
                    format!(
                        "client `{}` exceeded its rate_limit; retry after the Retry-After seconds",
                        who.name
                    ),
                )
            });
        }
        let key_name = self.key_for(&who, route.api)?;
        self.check_apple_limits(&who, &route, key_name, parts.method.as_str())?;

        // Refuse a declared oversize body before contacting Apple; a body that lies or
        // streams without a length is cut off by the metered body below.
        let max_body = self.config.server.max_request_body;
        if let Some(len) = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > max_body {
                return Err(too_large(max_body));
            }
        }

        // Mint for exactly the request that is forwarded: same method, path and query.
        let query = parts.uri.query();
        let treq = token::Request {
            key: key_name,
            api: route.api,
            method: parts.method.as_str(),
            path: route.path,
            query,
            bundle_id: self.clients.pinned_bundle_id(&who),
        };
        let mut token = self
            .minter
            .token(&treq, SystemTime::now())
            .map_err(|e| internal(request_id, "mint", e))?;
        tracing::debug!(key = %token.key_name, api = %route.api, env = %route.environment, "minted");
        ex.key = Some(token.key_name.clone());
        ex.key_id = Some(token.key_id.clone());
        ex.token_sha256 = Some(token.fingerprint().clone());

        // Forward. The client's Authorization was never copied; ours is the only one.
        // A body-less idempotent request can be replayed, so it may be retried below.
        let replayable = is_idempotent(&parts.method) && body.is_end_stream();
        let url = route.url(query);
        let body = (!replayable).then(|| {
            forward::boxed(
                forward::Metered::new(body, ex.received.clone(), Some(max_body))
                    .without_trailers()
                    .idle_timeout(self.config.server.body_idle_timeout),
            )
        });
        let upstream = Upstream {
            request_id,
            method: &parts.method,
            url: &url,
            client_headers: &parts.headers,
            route: &route,
        };
        let offset_before = self.minter.clock().offset_secs();
        let sent = Instant::now();
        let mut response = self
            .send(
                &upstream,
                body,
                &token,
                Tally {
                    bytes_in: &ex.received.bytes,
                    max_body,
                    connect_retries: &mut ex.connect_retries,
                    client_gone: Some(&ex.received.failed),
                },
            )
            .await?;
        self.note_upstream(ex, &response, &token, sent);

        // Apple has transient 401s (APPLE.md §3): re-mint with a fresh iat and retry once.
        if response.status() == StatusCode::UNAUTHORIZED && replayable {
            drop(response);
            token = self
                .minter
                .remint(&treq, SystemTime::now())
                .map_err(|e| internal(request_id, "mint", e))?;
            ex.token_sha256 = Some(token.fingerprint().clone());
            ex.retried = true;
            let sent = Instant::now();
            response = self
                .send(
                    &upstream,
                    None,
                    &token,
                    Tally {
                        bytes_in: &ex.received.bytes,
                        max_body,
                        connect_retries: &mut ex.connect_retries,
                        client_gone: None,
                    },
                )
                .await?;
            self.note_upstream(ex, &response, &token, sent);
            if !is_auth_failure(response.status()) {
                self.key_worked(&token.key_name);
                // If Apple's Date moved our idea of its clock, the first token was refused for
                // its iat/exp, not by chance: say so.
                let moved = (self.minter.clock().offset_secs() - offset_before).abs()
                    >= token::OFFSET_TOLERANCE_SECS;
                let note = if moved {
                    diagnose::codes::CLOCK_SKEW
                } else {
                    diagnose::codes::TRANSIENT_401
                };
                ex.diagnosis = Some(note);
                tracing::info!(request_id, key = %token.key_name, diagnosis = note, "Apple refused once; the retry with a fresh token succeeded");
                return Ok(stream_back(response, Some(note)));
            }
        }

        // Sandbox fallback (opt-in, GET lookups on production): Apple advises retrying a
        // 404 TransactionIdNotFound against sandbox, and before an app's first release
        // production answers 401 for sandbox transactions (APPLE.md §3).
        let fallback = self.config.api(route.api).sandbox_fallback
            && route.environment == Environment::Production
            && parts.method == Method::GET;
        if fallback && response.status() == StatusCode::NOT_FOUND {
            let (head, bytes) = buffer(response).await;
            if not_found_in_production(&bytes) {
                if let Some(sandbox) = self.sandbox_fallback(&upstream, &token, ex).await {
                    return Ok(sandbox);
                }
            }
            self.key_worked(&token.key_name);
            let mut head = head;
            forward::clean_response_headers(&mut head.headers);
            return Ok(Response::from_parts(head, forward::boxed(Full::new(bytes))));
        }
        if fallback && response.status() == StatusCode::UNAUTHORIZED {
            if let Some(sandbox) = self.sandbox_fallback(&upstream, &token, ex).await {
                return Ok(sandbox);
            }
        }

        // Inspect: a 401/403 is diagnosed; everything else streams back untouched.
        if is_auth_failure(response.status()) {
            let (response, cause) = self
                .diagnosed(response, &upstream, &token, ex.retried, request_id)
                .await;
            ex.diagnosis = Some(cause);
            return Ok(response);
        }
        self.key_worked(&token.key_name);
        Ok(stream_back(response, None))
    }

    /// The same GET against sandbox; its answer when sandbox has the resource (marked
    /// `X-Apple-Environment: Sandbox`), `None` when sandbox refuses or lacks it too.
    async fn sandbox_fallback(
        &self,
        up: &Upstream<'_>,
        token: &token::Token,
        ex: &mut Exchange,
    ) -> Option<Response<ProxyBody>> {
        let (route, url) = self.sandbox_target(up)?;
        let sandbox = Upstream {
            request_id: up.request_id,
            method: up.method,
            url: &url,
            client_headers: up.client_headers,
            route: &route,
        };
        let sent = Instant::now();
        let response = self
            .send(
                &sandbox,
                None,
                token,
                Tally {
                    bytes_in: &ex.received.bytes,
                    max_body: 0,
                    connect_retries: &mut ex.connect_retries,
                    client_gone: None,
                },
            )
            .await
            .ok()?;
        if is_auth_failure(response.status()) || response.status() == StatusCode::NOT_FOUND {
            tracing::info!(
                request_id = up.request_id,
                status = response.status().as_u16(),
                "sandbox fallback: sandbox does not have it either"
            );
            return None;
        }
        self.note_upstream(ex, &response, token, sent);
        self.key_worked(&token.key_name);
        ex.environment = Some(Environment::Sandbox);
        ex.sandbox_fallback = true;
        tracing::info!(
            request_id = up.request_id,
            status = response.status().as_u16(),
            "sandbox fallback: answered by sandbox"
        );
        let mut response = stream_back(response, None);
        response
            .headers_mut()
            .insert(X_APPLE_ENVIRONMENT, HeaderValue::from_static("Sandbox"));
        Some(response)
    }

    /// Records what Apple's answer says about this exchange.
    fn note_upstream(
        &self,
        ex: &mut Exchange,
        response: &Response<Incoming>,
        token: &token::Token,
        sent: Instant,
    ) {
        ex.upstream_status = Some(response.status().as_u16());
        ex.upstream_elapsed = Some(sent.elapsed());
        let h = response.headers();
        ex.apple_request_id = h
            .get(APPLE_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(remaining) = h
            .get(APPLE_RATE_LIMIT)
            .and_then(|v| v.to_str().ok())
            .and_then(metrics::parse_rate_limit_remaining)
        {
            ex.rate_limit_remaining = Some(remaining);
            self.shared
                .metrics
                .rate_limit_remaining(&token.key_name, remaining);
        }
    }

    /// Sends one request to Apple and learns Apple's clock from the answer.
    async fn send(
        &self,
        up: &Upstream<'_>,
        body: Option<ProxyBody>,
        token: &token::Token,
        tally: Tally<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let Tally {
            bytes_in,
            max_body,
            connect_retries,
            client_gone,
        } = tally;
        // Built again only for a retry after a failed connection (rare), never cloned.
        let build_headers = || forward::upstream_headers(up.client_headers, token.authorization());
        let mut headers = Some(build_headers());
        // `None` is a body-less request: it can be sent again if the connection fails
        // before a byte went out. A request with a body never is.
        let replayable = body.is_none();
        let mut body = Some(body.unwrap_or_else(forward::empty));
        let timeout = self.config.server.request_timeout;
        let response = loop {
            let mut request = Request::builder()
                .method(up.method.clone())
                .uri(up.url)
                .body(body.take().unwrap_or_else(forward::empty))
                .map_err(|e| internal(up.request_id, "upstream request", e))?;
            *request.headers_mut() = headers.take().unwrap_or_else(build_headers);
            let error = match tokio::time::timeout(timeout, self.upstream.request(request)).await {
                Ok(Ok(response)) => break response,
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(ProxyError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        codes::UPSTREAM_TIMEOUT,
                        "Apple did not answer in time",
                        "upstream_timeout",
                        Fault::Upstream,
                        format!(
                            "{} did not send a response within {}",
                            up.route.api,
                            humantime::format_duration(timeout)
                        ),
                    ))
                }
            };
            // The metered body counts before it fails, so this holds however the transport
            // (HTTP/1 write error, HTTP/2 stream reset) reports the abort.
            if bytes_in.load(Ordering::Relaxed) > max_body {
                return Err(too_large(max_body));
            }
            if client_gone.is_some_and(|f| f.load(Ordering::Relaxed)) {
                return Err(ProxyError::new(
                    StatusCode::BAD_REQUEST,
                    codes::BAD_REQUEST,
                    "Request body incomplete",
                    "client_disconnected",
                    Fault::Client,
                    "the client stopped sending its request body; the request to Apple was cancelled",
                ));
            }
            if forward::is_timeout(&error) {
                tracing::warn!(request_id = up.request_id, api = %up.route.api, error = %error_chain(&error), "upstream connect timed out");
                return Err(ProxyError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    codes::UPSTREAM_TIMEOUT,
                    "Apple did not answer in time",
                    "upstream_timeout",
                    Fault::Upstream,
                    format!(
                        "connecting to {} took longer than {}",
                        up.route.api,
                        humantime::format_duration(self.config.upstream.connect_timeout)
                    ),
                ));
            }
            if replayable && error.is_connect() && *connect_retries < MAX_CONNECT_RETRIES {
                // Nothing was sent: the connection itself failed. Try again, bounded.
                *connect_retries += 1;
                tracing::info!(request_id = up.request_id, api = %up.route.api, attempt = *connect_retries, error = %error_chain(&error), "upstream connection failed; retrying");
                tokio::time::sleep(CONNECT_RETRY_BACKOFF * *connect_retries).await;
                continue;
            }
            tracing::warn!(request_id = up.request_id, api = %up.route.api, error = %error_chain(&error), "upstream request failed");
            return Err(ProxyError::new(
                StatusCode::BAD_GATEWAY,
                codes::UPSTREAM_UNAVAILABLE,
                "Apple could not be reached",
                "upstream_unavailable",
                Fault::Upstream,
                format!(
                    "the proxy could not get a response from {} ({})",
                    up.route.api, up.route.environment
                ),
            ));
        };
        if let Some(date) = apple_date(response.headers()) {
            let offset = self.minter.clock().observe(date, SystemTime::now());
            if offset.abs() > 10 {
                tracing::warn!(
                    offset_s = offset,
                    "Apple's clock differs from this host's; tokens are corrected for it"
                );
            }
        }
        Ok(response)
    }

    /// Apple said 401 or 403: gather the evidence, diagnose, and answer with Apple's errors
    /// plus `diagnostics` (DESIGN §7).
    async fn diagnosed(
        &self,
        response: Response<Incoming>,
        up: &Upstream<'_>,
        token: &token::Token,
        retried: bool,
        request_id: &str,
    ) -> (Response<ProxyBody>, &'static str) {
        let proxy_now = token::unix_secs(SystemTime::now());
        let status = response.status();
        let (mut head, body) = response.into_parts();
        let apple_date = apple_date(&head.headers).map(token::unix_secs);
        // Bounded, and only when not compressed: enough for Apple's small error bodies.
        let body_bytes = if head.headers.contains_key(header::CONTENT_ENCODING) {
            Bytes::new()
        } else {
            read_bounded(body).await
        };
        let apple_json: Option<serde_json::Value> = serde_json::from_slice(&body_bytes).ok();
        let apple_errors = diagnose::apple_errors(&body_bytes);

        // Production storekit GET refused: does sandbox take the same token? (APPLE.md §0)
        let route = up.route;
        let sandbox_probe = if status == StatusCode::UNAUTHORIZED
            && route.api.token_family() == TokenFamily::StoreKit
            && route.environment == Environment::Production
            && *up.method == Method::GET
        {
            Some(self.probe_sandbox(up, token).await)
        } else {
            None
        };

        let key = self.minter.key_config(&token.key_name);
        let named = key.and_then(token::key_file_name);
        let issuer = key.and_then(|k| k.issuer_id.as_deref());
        let issuer_proven = issuer.is_some_and(|iss| {
            self.config
                .keys
                .iter()
                .filter(|k| k.issuer_id.as_deref() == Some(iss))
                .any(|k| self.key_last_success(&k.name).is_some())
        });
        let evidence = diagnose::Evidence {
            status: status.as_u16(),
            api: route.api,
            environment: route.environment,
            method: up.method.as_str(),
            path: route.path,
            query: up.url.split_once('?').map(|(_, q)| q),
            key_name: &token.key_name,
            key_id: &token.key_id,
            key_kind: key.map_or(KeyKind::Team, |k| k.kind),
            file_kind_hint: named.map(|(kind, _)| kind),
            file_key_id: named.map(|(_, id)| id),
            claims: &token.claims,
            proxy_now,
            apple_date,
            apple_errors: &apple_errors,
            key_last_success: self.key_last_success(&token.key_name),
            issuer_proven,
            retried,
            sandbox_probe,
        };
        let causes = diagnose::diagnose(&evidence);
        let first = causes.first().map_or("UNKNOWN", |c| c.code);
        tracing::warn!(
            request_id,
            status = status.as_u16(),
            api = %route.api,
            key = %token.key_name,
            diagnosis = first,
            "Apple refused the request"
        );

        let errors = match apple_json.as_ref().and_then(|j| j.get("errors")) {
            Some(errors) if errors.is_array() => errors.clone(),
            _ => serde_json::json!([{
                "status": status.as_str(),
                "code": "NOT_AUTHORIZED",
                "title": "Apple refused the request without an error body",
                "detail": "Apple answered with no JSON error; see diagnostics for the likely causes",
            }]),
        };
        let c = &token.claims;
        let body = serde_json::json!({
            "errors": errors,
            "diagnostics": {
                "request_id": request_id,
                "api": route.api.id(),
                "environment": route.environment.as_str(),
                "key": {"name": token.key_name, "key_id": token.key_id, "kind": key.map(|k| k.kind.id())},
                "token": {
                    "iss": c.iss, "sub": c.sub, "iat": c.iat, "exp": c.exp,
                    "lifetime_s": c.exp - c.iat, "aud": c.aud, "scope": c.scope, "bid": c.bid,
                },
                "clock": {
                    "proxy": crate::rfc3339(proxy_now),
                    "apple": apple_date.map(crate::rfc3339),
                    "skew_s": apple_date.map(|a| a - proxy_now),
                },
                "retried": retried,
                "key_last_success": evidence.key_last_success.map(crate::rfc3339),
                "sandbox_probe": sandbox_probe.map(|p| match p {
                    SandboxProbe::Accepted(s) => serde_json::json!({"accepted": true, "status": s}),
                    SandboxProbe::Rejected(s) => serde_json::json!({"accepted": false, "status": s}),
                    SandboxProbe::Failed => serde_json::json!({"accepted": null, "status": null}),
                }),
                "apple_request_id": head.headers.get(APPLE_REQUEST_ID).and_then(|v| v.to_str().ok()),
                "likely_causes": causes,
            },
        });
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::TRANSFER_ENCODING,
        ] {
            head.headers.remove(name);
        }
        forward::clean_response_headers(&mut head.headers);
        head.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        head.headers
            .insert(X_PROXY_DIAGNOSIS, HeaderValue::from_static(first));
        let response = Response::from_parts(
            head,
            forward::boxed(Full::new(Bytes::from(body.to_string()))),
        );
        (response, first)
    }

    /// The sandbox route and URL for a production storekit request (same path and query).
    fn sandbox_target<'a>(&'a self, up: &Upstream<'a>) -> Option<(route::Route<'a>, String)> {
        let route = self.routes.sandbox_of(up.route)?;
        let url = route.url(up.url.split_once('?').map(|(_, q)| q));
        Some((route, url))
    }

    /// The same GET, same token, against sandbox.
    async fn probe_sandbox(&self, up: &Upstream<'_>, token: &token::Token) -> SandboxProbe {
        let Some((route, url)) = self.sandbox_target(up) else {
            return SandboxProbe::Failed;
        };
        let probe = Upstream {
            request_id: up.request_id,
            method: up.method,
            url: &url,
            client_headers: up.client_headers,
            route: &route,
        };
        let counter = AtomicU64::new(0);
        match tokio::time::timeout(
            PROBE_TIMEOUT,
            self.send(
                &probe,
                None,
                token,
                Tally {
                    bytes_in: &counter,
                    max_body: 0,
                    connect_retries: &mut 0,
                    client_gone: None,
                },
            ),
        )
        .await
        {
            Ok(Ok(r)) if is_auth_failure(r.status()) => SandboxProbe::Rejected(r.status().as_u16()),
            Ok(Ok(r)) => SandboxProbe::Accepted(r.status().as_u16()),
            _ => SandboxProbe::Failed,
        }
    }

    fn key_worked(&self, key: &str) {
        if let Some(t) = self.key_success.get(key) {
            t.store(token::unix_secs(SystemTime::now()), Ordering::Relaxed);
        }
    }

    fn key_last_success(&self, key: &str) -> Option<i64> {
        self.key_success
            .get(key)
            .map(|t| t.load(Ordering::Relaxed))
            .filter(|t| *t > 0)
    }

    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        cert: Option<&CertIdentity>,
    ) -> Result<Identity, ProxyError> {
        self.clients.authenticate(headers, cert).map_err(|e| {
            ProxyError::new(
                StatusCode::UNAUTHORIZED,
                codes::UNAUTHENTICATED,
                "Proxy authentication required",
                "unauthenticated",
                Fault::Client,
                match e {
                    AuthError::Missing => "send your proxy client secret as `Proxy-Authorization: Bearer aap_…` or `Authorization: Bearer aap_…`",
                    AuthError::Invalid => "the client secret is not valid",
                },
            )
        })
    }

    /// Apple's documented per-endpoint limit for this app, where `enforce_apple_limits` is on:
    /// held back locally (429 with delta-seconds) before it costs a signature or Apple's
    /// budget, with each active client held to its fair share.
    fn check_apple_limits(
        &self,
        who: &Identity,
        route: &route::Route<'_>,
        key: &str,
        method: &str,
    ) -> Result<(), ProxyError> {
        let Some(settings) = self
            .config
            .apis
            .get(&route.api)
            .filter(|s| s.enforce_apple_limits)
        else {
            return Ok(());
        };
        let Some(limit) = crate::apple::endpoint_limit(method, route.path) else {
            return Ok(());
        };
        let bundle = self.clients.pinned_bundle_id(who).or_else(|| {
            self.minter
                .key_config(key)
                .and_then(|k| k.bundle_id.as_deref())
        });
        let Some(bundle) = bundle else { return Ok(()) };
        let sandbox = route.environment == Environment::Sandbox;
        self.shared
            .apple_limits
            .check(
                bundle,
                limit,
                sandbox,
                settings.apple_limit_fraction,
                &who.name,
                Instant::now(),
            )
            .map_err(|held| {
                let secs = retry_after_secs(held.retry_after);
                ProxyError {
                    retry_after: Some(secs),
                    ..ProxyError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        codes::RATE_LIMITED,
                        "Apple's rate limit for this endpoint",
                        "apple_limit",
                        Fault::Client,
                        format!(
                            "Apple allows {} {} requests per second for this app ({}); {}",
                            held.rate,
                            held.endpoint,
                            route.environment,
                            if held.share {
                                "your fair share of it, with other clients using it too, is spent"
                            } else {
                                "the app's budget at this proxy is spent"
                            }
                        ),
                    )
                }
            })
    }

    /// The key that signs: the client's pinned key, else the first key configured for the API.
    fn key_for(&self, who: &Identity, api: Api) -> Result<&str, ProxyError> {
        if let Some(pinned) = self.clients.pinned_key(who) {
            let serves = self
                .minter
                .key_config(pinned)
                .is_some_and(|k| k.apis.contains(&api));
            if !serves {
                return Err(ProxyError::new(
                    StatusCode::FORBIDDEN,
                    codes::FORBIDDEN,
                    "Forbidden by proxy policy",
                    "forbidden",
                    Fault::Client,
                    format!(
                        "client `{}` is pinned to key `{pinned}`, which does not sign for {api}",
                        who.name
                    ),
                ));
            }
            return Ok(pinned);
        }
        self.config.default_key_for(api).map(|k| k.name.as_str()).ok_or_else(|| {
            ProxyError::new(
                StatusCode::NOT_FOUND,
                codes::NO_ROUTE,
                "No key for this API",
                "no_key",
                Fault::Proxy,
                format!("no key is configured for {api}; add a [[keys]] entry whose apis include \"{api}\""),
            )
        })
    }
}

/// The request-body bookkeeping one send reads and updates.
struct Tally<'a> {
    /// Request body bytes read from the client so far (counted before the limit fails it).
    bytes_in: &'a AtomicU64,
    max_body: u64,
    connect_retries: &'a mut u32,
    /// Set when the client's request body failed (it went away mid-upload).
    client_gone: Option<&'a AtomicBool>,
}

/// One request on its way to Apple, as the send/retry/probe steps share it.
struct Upstream<'a> {
    /// For the operator's log lines about this exchange.
    request_id: &'a str,
    method: &'a Method,
    url: &'a str,
    client_headers: &'a http::HeaderMap,
    route: &'a route::Route<'a>,
}

/// Apple's answer, streamed back with hop-by-hop headers removed. `note` (a diagnosis
/// code) marks a success worth knowing about.
fn stream_back(response: Response<Incoming>, note: Option<&'static str>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    forward::clean_response_headers(&mut parts.headers);
    if let Some(code) = note {
        parts
            .headers
            .insert(X_PROXY_DIAGNOSIS, HeaderValue::from_static(code));
    }
    Response::from_parts(parts, forward::boxed(body))
}

/// What one request learned on its way, for its audit record, metrics and log line.
struct Exchange {
    client: Option<Arc<str>>,
    client_auth: &'static str,
    api: Option<Api>,
    environment: Option<Environment>,
    key: Option<Arc<str>>,
    key_id: Option<Arc<str>>,
    token_sha256: Option<Arc<str>>,
    upstream_status: Option<u16>,
    upstream_elapsed: Option<std::time::Duration>,
    diagnosis: Option<&'static str>,
    retried: bool,
    apple_request_id: Option<String>,
    rate_limit_remaining: Option<u64>,
    /// The client's request body: bytes read, and whether it failed (the client went away
    /// mid-upload).
    received: Arc<forward::Meter>,
    /// Connection failures retried before Apple answered.
    connect_retries: u32,
    /// Whether sandbox answered for production.
    sandbox_fallback: bool,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Default for Exchange {
    fn default() -> Exchange {
        Exchange {
            client: None,
            client_auth: "none",
            api: None,
            environment: None,
            key: None,
            key_id: None,
            token_sha256: None,
            upstream_status: None,
            upstream_elapsed: None,
            diagnosis: None,
            retried: false,
            apple_request_id: None,
            rate_limit_remaining: None,
            received: Arc::new(forward::Meter::default()),
            connect_retries: 0,
            sandbox_fallback: false,
            permit: None,
        }
    }
}

/// The request line as recorded: path and query with secret-looking values redacted.
struct Head {
    method: Cow<'static, str>,
    path: String,
    query: Option<String>,
    peer: Peer,
}

impl Head {
    fn of<B>(req: &Request<B>, peer: Peer) -> Head {
        Head {
            method: method_name(req.method()),
            path: audit::redact_path(req.uri().path()),
            query: req.uri().query().map(audit::redact_query),
            peer,
        }
    }
}

/// A client's address, formatted once per connection: every request's audit record shares
/// the text.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    text: Arc<str>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            text: Arc::from(addr.to_string()),
        }
    }
}

/// The method as the audit records it: the standard ones without allocating.
fn method_name(method: &Method) -> Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
    ];
    match STANDARD.iter().find(|m| **m == method.as_str()) {
        Some(m) => Cow::Borrowed(m),
        None => Cow::Owned(method.as_str().to_string()),
    }
}

/// Rides on the response body; when the body is dropped — fully sent or abandoned by the
/// client — it completes the audit record and the metrics, exactly once, and releases the
/// concurrency permit.
struct Finisher {
    record: Option<audit::Record>,
    audit: Option<audit::Audit>,
    metrics: Arc<metrics::Metrics>,
    started: Instant,
    upstream_elapsed: Option<std::time::Duration>,
    /// The request body read from the client, and the response body sent to it.
    received: Arc<forward::Meter>,
    sent: Arc<forward::Meter>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        let elapsed = self.started.elapsed();
        record.time = crate::rfc3339_millis(SystemTime::now());
        record.duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        record.bytes_in = self.received.bytes.load(Ordering::Relaxed);
        record.bytes_out = self.sent.bytes.load(Ordering::Relaxed);
        record.completed =
            self.sent.ended.load(Ordering::Relaxed) && record.error != Some("client_disconnected");
        self.metrics.observe(&metrics::Summary {
            api: record.api.unwrap_or("none"),
            client: record.client.as_ref(),
            status: record.status,
            duration: elapsed,
            upstream: self.upstream_elapsed,
            diagnosis: record.diagnosis,
            upstream_status: record.upstream_status,
            retried: record.retried,
        });
        if let Some(audit) = &self.audit {
            audit.record(record);
        }
    }
}

/// The audit decision for an error kind the proxy answered itself.
fn decision_for(kind: &str) -> audit::Decision {
    match kind {
        "unauthenticated" => audit::Decision::Unauthenticated,
        "no_route" | "no_key" => audit::Decision::NoRoute,
        "upstream_unavailable"
        | "upstream_timeout"
        | "internal"
        | "audit_unavailable"
        | "client_disconnected" => audit::Decision::Error,
        _ => audit::Decision::Denied,
    }
}

/// Reads one of Apple's (small) error bodies whole: at most [`DIAGNOSIS_BODY_LIMIT`] bytes
/// within [`DIAGNOSIS_READ_TIMEOUT`]; empty when it is larger, slower or broken.
async fn read_bounded(body: Incoming) -> Bytes {
    let limited = http_body_util::Limited::new(body, DIAGNOSIS_BODY_LIMIT);
    match tokio::time::timeout(DIAGNOSIS_READ_TIMEOUT, limited.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => Bytes::new(),
    }
}

/// A response with its (small) body read whole, see [`read_bounded`].
async fn buffer(response: Response<Incoming>) -> (http::response::Parts, Bytes) {
    let (head, body) = response.into_parts();
    (head, read_bounded(body).await)
}

/// Whether a production 404 body is one of the "not in production" codes.
fn not_found_in_production(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("errorCode").and_then(serde_json::Value::as_i64))
        .is_some_and(|code| SANDBOX_FALLBACK_CODES.contains(&code))
}

fn is_auth_failure(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

/// RFC 9110 §9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::PUT
    )
}

fn apple_date(headers: &http::HeaderMap) -> Option<SystemTime> {
    headers
        .get(header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
}

/// Whole seconds for `Retry-After` (delta-seconds), rounded up and at least 1.
fn retry_after_secs(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

fn bad_request(detail: String) -> ProxyError {
    ProxyError::new(
        StatusCode::BAD_REQUEST,
        codes::BAD_REQUEST,
        "Bad request",
        "bad_request",
        Fault::Client,
        detail,
    )
}

fn too_large(limit: u64) -> ProxyError {
    ProxyError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        codes::BODY_TOO_LARGE,
        "Request body too large",
        "body_too_large",
        Fault::Client,
        format!("the request body exceeds the proxy's limit of {limit} bytes"),
    )
}

fn no_route(e: &RouteError) -> ProxyError {
    ProxyError::new(
        StatusCode::NOT_FOUND,
        codes::NO_ROUTE,
        "No route",
        "no_route",
        Fault::Client,
        format!(
            "{e}; known path prefixes: {}",
            route::known_prefixes().join(", ")
        ),
    )
}

/// A failure inside the proxy. The cause goes to the log; the client gets a generic detail.
fn internal(request_id: &str, step: &'static str, e: impl std::error::Error) -> ProxyError {
    tracing::error!(request_id, step, error = %error_chain(&e), "internal error");
    ProxyError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        codes::INTERNAL,
        "Internal proxy error",
        "internal",
        Fault::Proxy,
        format!("the proxy failed at step `{step}`; the operator's log has the cause"),
    )
}

/// `outer: inner: innermost`, for operator logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Request ids: a random per-process prefix and a counter — unique across replicas without
/// coordination, cheap to make.
struct RequestIds {
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

    fn next(&self) -> String {
        format!(
            "{}-{:08x}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}
