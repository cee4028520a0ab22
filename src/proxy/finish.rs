//! Phase 6, finish: the one place a request's outcome is rendered, logged, audited and
//! counted — exactly once, whatever happened. The refusal becomes Apple's error shape, every
//! response gets `X-Request-Id`, the operator's log gets one line (with the refusal's whole
//! cause chain), and a guard riding on the response body writes the audit record and the
//! metrics when the body ends or the client goes away.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::HeaderValue;
use http::Response;

use crate::apple::{Api, Environment};
use crate::audit;
use crate::forward::{self, ProxyBody};
use crate::metrics;

use super::refusal::{error_chain, Fault};
use super::{Exchange, Head, Proxy, Refusal, X_REQUEST_ID};

impl Proxy {
    /// Renders the outcome, logs the one line, and attaches the guard that writes the audit
    /// record and the metrics when the response body ends (or the client goes away).
    pub(super) fn finish(
        &self,
        result: Result<Response<ProxyBody>, Refusal>,
        ex: Exchange,
        head: Head,
        id: String,
        span: tracing::Span,
        started: Instant,
    ) -> Response<ProxyBody> {
        let status_of = |r: &Response<ProxyBody>| r.status().as_u16();
        let head_ms = started.elapsed().as_millis() as u64;
        let (method, path) = (&head.method, &head.path);
        let (mut response, decision, error) = match result {
            Ok(response) => {
                // Every request is in the audit log already; at `info` the operational log
                // keeps only what needs an operator's eye (refusals, failures, Apple's 401/403).
                tracing::debug!(parent: &span, request_id = %id, %method, %path, status = status_of(&response), head_ms, diagnosis = ex.diagnosis, "forwarded");
                (response, audit::Decision::Forwarded, None)
            }
            Err(refusal) => {
                let (kind, decision) = (refusal.kind(), refusal.decision());
                let status = refusal.status().as_u16();
                let cause = error_chain(&refusal);
                match refusal.fault() {
                    Fault::Client => {
                        tracing::info!(parent: &span, request_id = %id, peer = %head.peer.addr, %method, %path, status, head_ms, kind, detail = %cause, "refused")
                    }
                    Fault::Upstream | Fault::Proxy => {
                        tracing::warn!(parent: &span, request_id = %id, peer = %head.peer.addr, %method, %path, status, head_ms, kind, detail = %cause, "failed")
                    }
                }
                (refusal.into_response(&id), decision, Some(kind))
            }
        };
        if let Ok(v) = HeaderValue::from_str(&id) {
            const NAME: http::HeaderName = http::HeaderName::from_static(X_REQUEST_ID);
            response.headers_mut().insert(NAME, v);
        }
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
            status: response.status().as_u16(),
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
            error,
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
            decision: record.decision.as_str(),
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
