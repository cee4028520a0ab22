//! The life of one request, in order. This is the only module that knows the order of the
//! steps; each step's rules live in its own module.
//!
//! accept → begin → authenticate → check path → route → policy → mint → forward → inspect →
//! finish. [`Proxy::handle`] is the outer handler: it renders every error into the JSON shape
//! of DESIGN §6, stamps `X-Request-Id`, and logs exactly once; [`Proxy::process`] is the
//! inner handler and returns `Result`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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
use crate::client::{AuthError, CertIdentity, Clients, Identity};
use crate::config::Config;
use crate::diagnose::{self, SandboxProbe};
use crate::forward::{self, ProxyBody};
use crate::route::{self, RouteError};
use crate::token::{self, AppleClock, Minter};

/// Longest path + query accepted. Apple's URLs are far shorter; the bound keeps scopes (and
/// so cached tokens) small whatever a client sends.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Response header naming the first likely cause when Apple refused a request.
pub const X_PROXY_DIAGNOSIS: &str = "x-proxy-diagnosis";
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
    #[error("{file}: field `{field}` is not implemented yet, and the proxy will not pretend it is (fix: remove it)")]
    NotImplemented { file: String, field: &'static str },
    #[error(transparent)]
    Key(#[from] Box<token::LoadError>),
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
    ids: RequestIds,
    /// `max_concurrent_requests` permits; a permit lives until the response body is done.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Inbound TLS (and mTLS), when configured.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Per key: when Apple last accepted it (UNIX seconds; 0 = not since start-up).
    key_success: HashMap<String, AtomicI64>,
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
    /// `extra_ca_pem` adds in-memory trust anchors (the demo's stand-in CA).
    pub fn new(
        config: Config,
        extra_ca_pem: Option<&str>,
    ) -> Result<(Proxy, Vec<String>), StartError> {
        if config.clients.is_empty() && !config.server.allow_anonymous {
            return Err(StartError::NoClients(config.source.clone()));
        }
        if config.upstream.egress_proxy.is_some() {
            return Err(StartError::NotImplemented {
                file: config.source.clone(),
                field: "upstream.egress_proxy",
            });
        }
        if config.apis.values().any(|a| a.sandbox_fallback) {
            return Err(StartError::NotImplemented {
                file: config.source.clone(),
                field: "apis.<id>.sandbox_fallback",
            });
        }
        let tls = crate::server::tls_acceptor(&config)?;
        let (minter, warnings) = Minter::new(&config, Arc::new(AppleClock::default()))?;
        let upstream = forward::client(&config, extra_ca_pem)?;
        Ok((
            Proxy {
                routes: route::Table::new(&config),
                clients: Clients::new(&config),
                minter,
                upstream,
                ids: RequestIds::new(),
                in_flight: Arc::new(tokio::sync::Semaphore::new(
                    config.server.max_concurrent_requests,
                )),
                tls,
                key_success: config
                    .keys
                    .iter()
                    .map(|k| (k.name.clone(), AtomicI64::new(0)))
                    .collect(),
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

    /// The outer handler: never fails, always stamps the request id, logs once.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        cert: Option<Arc<CertIdentity>>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let id = self.ids.next();
        let span = tracing::info_span!("request", id = %id, peer = %peer);
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let (mut response, outcome) = match self
            .process(req, cert.as_deref(), &id)
            .instrument(span.clone())
            .await
        {
            Ok(response) => (response, None),
            Err(error) => {
                let outcome = (error.kind, error.fault, error.detail.clone());
                (error.into_response(&id), Some(outcome))
            }
        };
        if let Ok(v) = HeaderValue::from_str(&id) {
            response.headers_mut().insert(X_REQUEST_ID, v);
        }
        // The one log line per request (head sent; the body may still be streaming).
        let status = response.status().as_u16();
        let head_ms = started.elapsed().as_millis() as u64;
        match outcome {
            None => tracing::info!(parent: &span, %method, %path, status, head_ms, "forwarded"),
            Some((kind, Fault::Client, detail)) => {
                tracing::info!(parent: &span, %method, %path, status, head_ms, kind, %detail, "refused")
            }
            Some((kind, _, detail)) => {
                tracing::warn!(parent: &span, %method, %path, status, head_ms, kind, %detail, "failed")
            }
        }
        response
    }

    /// The answer to a request whose head carried both `Content-Length` and
    /// `Transfer-Encoding` (see [`crate::framing`]): 400, and `Connection: close` so hyper
    /// drops the connection whose framing can no longer be trusted.
    pub fn refuse_smuggling(&self, peer: SocketAddr) -> Response<ProxyBody> {
        let id = self.ids.next();
        tracing::info!(id = %id, %peer, kind = "smuggling", "refused: conflicting Content-Length and Transfer-Encoding");
        let mut response = bad_request(
            "the request carries both Content-Length and Transfer-Encoding".to_string(),
        )
        .into_response(&id);
        let h = response.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert(X_REQUEST_ID, v);
        }
        response
    }

    /// The inner handler: each step in order, `?` on the first refusal.
    async fn process(
        &self,
        req: Request<Incoming>,
        cert: Option<&CertIdentity>,
        request_id: &str,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // Shed load first, answering at once rather than queuing without bound.
        let permit = self
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
            })?;
        let (parts, body) = req.into_parts();
        // Authenticate first: an unauthenticated caller learns nothing about routes.
        let who = self.authenticate(&parts.headers, cert)?;

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
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(ProxyError {
                retry_after: Some(secs.max(1)),
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
            .map_err(|e| internal("mint", e))?;
        tracing::debug!(key = %token.key_name, api = %route.api, env = %route.environment, "minted");

        // Forward. The client's Authorization was never copied; ours is the only one.
        // A body-less idempotent request can be replayed, so it may be retried below.
        let replayable = is_idempotent(&parts.method) && body.is_end_stream();
        let url = route.url(query);
        let bytes_in = Arc::new(AtomicU64::new(0));
        let body = forward::boxed(
            forward::Metered::new(body, bytes_in.clone(), Some(max_body)).without_trailers(),
        );
        let upstream = Upstream {
            method: &parts.method,
            url: &url,
            client_headers: &parts.headers,
            route: &route,
        };
        let offset_before = self.minter.clock().offset_secs();
        let mut response = self
            .send(&upstream, body, &token, &bytes_in, max_body)
            .await?;

        // Apple has transient 401s (APPLE.md §3): re-mint with a fresh iat and retry once.
        let mut retried = false;
        if response.status() == StatusCode::UNAUTHORIZED && replayable {
            drop(response);
            token = self
                .minter
                .remint(&treq, SystemTime::now())
                .map_err(|e| internal("mint", e))?;
            response = self
                .send(&upstream, forward::empty(), &token, &bytes_in, max_body)
                .await?;
            retried = true;
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
                tracing::info!(request_id, key = %token.key_name, diagnosis = note, "Apple refused once; the retry with a fresh token succeeded");
                return Ok(stream_back(response, permit, Some(note)));
            }
        }

        // Inspect: a 401/403 is diagnosed; everything else streams back untouched.
        if is_auth_failure(response.status()) {
            return Ok(self
                .diagnosed(response, &upstream, &token, retried, request_id)
                .await);
        }
        self.key_worked(&token.key_name);
        Ok(stream_back(response, permit, None))
    }

    /// Sends one request to Apple and learns Apple's clock from the answer.
    async fn send(
        &self,
        up: &Upstream<'_>,
        body: ProxyBody,
        token: &token::Token,
        bytes_in: &AtomicU64,
        max_body: u64,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.jwt()))
            .map_err(|e| internal("authorization header", e))?;
        authorization.set_sensitive(true);
        let mut request = Request::builder()
            .method(up.method.clone())
            .uri(up.url)
            .body(body)
            .map_err(|e| internal("upstream request", e))?;
        *request.headers_mut() = forward::upstream_headers(up.client_headers, authorization);
        let timeout = self.config.server.request_timeout;
        let response = match tokio::time::timeout(timeout, self.upstream.request(request)).await {
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
            // The metered body counts before it fails, so this holds however the transport
            // (HTTP/1 write error, HTTP/2 stream reset) reports the abort.
            Ok(Err(_)) if bytes_in.load(Ordering::Relaxed) > max_body => {
                return Err(too_large(max_body))
            }
            Ok(Err(e)) => {
                tracing::warn!(api = %up.route.api, error = %error_chain(&e), "upstream request failed");
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
            }
            Ok(Ok(response)) => response,
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
    ) -> Response<ProxyBody> {
        let proxy_now = token::unix_secs(SystemTime::now());
        let status = response.status();
        let (mut head, body) = response.into_parts();
        let apple_date = apple_date(&head.headers).map(token::unix_secs);
        // Bounded, and only when not compressed: enough for Apple's small error bodies.
        let body_bytes = if head.headers.contains_key(header::CONTENT_ENCODING) {
            Bytes::new()
        } else {
            let limited = http_body_util::Limited::new(body, DIAGNOSIS_BODY_LIMIT);
            match tokio::time::timeout(DIAGNOSIS_READ_TIMEOUT, limited.collect()).await {
                Ok(Ok(collected)) => collected.to_bytes(),
                _ => Bytes::new(),
            }
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
        let (file_kind_hint, file_key_id) = key.map(file_evidence).unwrap_or((None, None));
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
            file_kind_hint,
            file_key_id: file_key_id.as_deref(),
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
                "apple_request_id": head.headers.get("x-apple-request-uuid").and_then(|v| v.to_str().ok()),
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
        Response::from_parts(
            head,
            forward::boxed(Full::new(Bytes::from(body.to_string()))),
        )
    }

    /// The same GET, same token, against sandbox.
    async fn probe_sandbox(&self, up: &Upstream<'_>, token: &token::Token) -> SandboxProbe {
        let sandbox_path = format!("{}{}", crate::apple::SANDBOX_PREFIX, up.route.path);
        let Ok(route) = self.routes.resolve(&sandbox_path) else {
            return SandboxProbe::Failed;
        };
        let url = route.url(up.url.split_once('?').map(|(_, q)| q));
        let probe = Upstream {
            method: up.method,
            url: &url,
            client_headers: up.client_headers,
            route: &route,
        };
        let counter = AtomicU64::new(0);
        match tokio::time::timeout(
            PROBE_TIMEOUT,
            self.send(&probe, forward::empty(), token, &counter, 0),
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

/// One request on its way to Apple, as the send/retry/probe steps share it.
struct Upstream<'a> {
    method: &'a Method,
    url: &'a str,
    client_headers: &'a http::HeaderMap,
    route: &'a route::Route<'a>,
}

/// Apple's answer, streamed back with hop-by-hop headers removed; the concurrency permit
/// lives as long as the body. `note` (a diagnosis code) marks a success worth knowing about.
fn stream_back(
    response: Response<Incoming>,
    permit: tokio::sync::OwnedSemaphorePermit,
    note: Option<&'static str>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    forward::clean_response_headers(&mut parts.headers);
    if let Some(code) = note {
        parts
            .headers
            .insert(X_PROXY_DIAGNOSIS, HeaderValue::from_static(code));
    }
    let bytes_out = Arc::new(AtomicU64::new(0));
    Response::from_parts(
        parts,
        forward::boxed(forward::Metered::new(body, bytes_out, None).holding(permit)),
    )
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

/// What the key file's name says: the kind Apple gave it (`AuthKey_` = App Store Connect,
/// `SubscriptionKey_` = In-App Purchase) and the key id it carries.
fn file_evidence(key: &crate::config::KeyConfig) -> (Option<KeyKind>, Option<String>) {
    let crate::config::KeySource::File(path) = &key.source else {
        return (None, None);
    };
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if let Some(id) = stem.strip_prefix("AuthKey_") {
        (Some(KeyKind::Team), Some(id.to_string()))
    } else if let Some(id) = stem.strip_prefix("SubscriptionKey_") {
        (Some(KeyKind::InAppPurchase), Some(id.to_string()))
    } else {
        (None, None)
    }
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
fn internal(step: &'static str, e: impl std::error::Error) -> ProxyError {
    tracing::error!(step, error = %error_chain(&e), "internal error");
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
