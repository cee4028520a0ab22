//! Phase 6, finish: the one place a request's outcome is rendered, logged, audited and
//! counted — exactly once, whatever happened. The refusal becomes Apple's error shape, every
//! response gets `X-Request-Id`, the operator's log gets one line (with the refusal's whole
//! cause chain), and a guard riding on the response body writes the audit record and the
//! metrics when the body ends or the client goes away. An exchange that never reaches this
//! phase (hyper dropped the handler: the client closed its connection or reset its HTTP/2
//! stream while Apple was being asked) writes its record when it is dropped (DESIGN §13b).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::HeaderValue;
use http::Response;

use crate::apple::{Api, Environment};
use crate::audit::{self, Decision};
use crate::forward::{self, ProxyBody};
use crate::metrics;

use super::refusal::{error_chain, Fault};
use super::{Exchange, Proxy, Refusal, X_REQUEST_ID};

/// The status recorded for a request whose client went away before any response head was
/// sent: nginx's "client closed request", never sent on the wire.
pub(crate) const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Where an exchange's record goes.
pub(super) struct Sink {
    pub audit: Option<audit::Audit>,
    pub metrics: Arc<metrics::Metrics>,
}

impl Proxy {
    /// Renders the outcome, logs the one line, and attaches the guard that writes the audit
    /// record and the metrics when the response body ends (or the client goes away).
    pub(super) fn finish(
        &self,
        result: Result<Response<ProxyBody>, Refusal>,
        mut ex: Exchange,
        span: tracing::Span,
    ) -> Response<ProxyBody> {
        let head_ms = ex.started.elapsed().as_millis() as u64;
        let (id, method, path, peer) = (&ex.id, &ex.head.method, &ex.head.path, &ex.head.peer);
        let (mut response, decision, error) = match result {
            Ok(response) => {
                // Every request is in the audit log already; at `info` the operational log
                // keeps only what needs an operator's eye (refusals, failures, Apple's 401/403).
                let decision = if ex.signing.as_ref().is_some_and(|s| s.sha256.is_some()) {
                    Decision::Signed
                } else {
                    Decision::Forwarded
                };
                tracing::debug!(parent: &span, request_id = %id, %method, %path, status = response.status().as_u16(), head_ms, diagnosis = ex.diagnosis, decision = decision.as_str(), "answered");
                (response, decision, None)
            }
            Err(refusal) => {
                let kind = refusal.kind();
                // Sent, then failed: Apple may have it, and the record says so.
                let decision = if ex.sent && refusal.may_have_reached_apple() {
                    Decision::Forwarded
                } else {
                    refusal.decision()
                };
                let status = refusal.status().as_u16();
                let cause = error_chain(&refusal);
                match refusal.fault() {
                    Fault::Client => {
                        tracing::info!(parent: &span, request_id = %id, peer = %peer.addr, %method, %path, status, head_ms, kind, detail = %cause, "refused")
                    }
                    Fault::Upstream | Fault::Proxy => {
                        tracing::warn!(parent: &span, request_id = %id, peer = %peer.addr, %method, %path, status, head_ms, kind, detail = %cause, "failed")
                    }
                }
                // APNs libraries read `reason` from every non-200 body (one crashes without
                // it): on APNs routes the proxy's errors carry it too (DESIGN §18).
                let apns = ex.api == Some(crate::apple::Api::Apns)
                    || crate::apple::is_apns_path(&ex.head.path);
                let mut response = refusal.into_response(id, apns);
                // A refusal with a diagnosis (a failed token exchange) names it too.
                if let Some(code) = ex.diagnosis {
                    response
                        .headers_mut()
                        .insert(super::X_PROXY_DIAGNOSIS, HeaderValue::from_static(code));
                }
                (response, decision, Some(kind))
            }
        };
        if let Ok(v) = HeaderValue::from_str(id) {
            const NAME: http::HeaderName = http::HeaderName::from_static(X_REQUEST_ID);
            response.headers_mut().insert(NAME, v);
        }
        let Some(guard) = ex.finisher(response.status().as_u16(), decision, error) else {
            return response;
        };
        let sent = guard.sent.clone();
        let (parts, body) = response.into_parts();
        let body = forward::Metered::new(body, sent, None)
            .idle_timeout(self.config.server.body_idle_timeout)
            .holding(guard);
        Response::from_parts(parts, forward::boxed(body))
    }
}

impl Exchange {
    /// The guard that completes this exchange's record; `None` once it was taken. Leaves
    /// the exchange spent, so its drop writes nothing.
    fn finisher(
        &mut self,
        status: u16,
        decision: Decision,
        error: Option<&'static str>,
    ) -> Option<Finisher> {
        let sink = self.sink.take()?;
        let record = audit::Record {
            time: String::new(),
            request_id: self.id.clone(),
            client: self.client.take(),
            client_auth: self.client_auth,
            identity: self.identity.take(),
            client_addr: self.head.peer.text.clone(),
            method: std::mem::take(&mut self.head.method),
            path: std::mem::take(&mut self.head.path),
            query: self.head.query.take(),
            api: self.api.map(Api::id),
            environment: self.environment.map(Environment::as_str),
            key: self.key.take(),
            key_id: self.key_id.take(),
            token_sha256: self.token_sha256.take(),
            decision,
            status,
            upstream_status: self.upstream_status,
            diagnosis: self.diagnosis,
            retried: self.retried,
            connect_retries: self.connect_retries,
            sandbox_fallback: self.sandbox_fallback,
            apple_request_id: self.apple_request_id.take(),
            rate_limit_remaining: self.rate_limit_remaining,
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0,
            completed: false,
            error,
            signing: self.signing.take(),
        };
        Some(Finisher {
            record: Some(record),
            sink,
            started: self.started,
            upstream_elapsed: self.upstream_elapsed,
            received: self.received.clone(),
            sent: Arc::new(forward::Meter::default()),
            _permit: self.permit.take(),
        })
    }
}

impl Drop for Exchange {
    /// Reached with the record still here only when hyper dropped the handler before
    /// `finish`: the client is gone, and Apple may already have the request.
    fn drop(&mut self) {
        if self.sink.is_none() {
            return;
        }
        let decision = if self.sent {
            Decision::Forwarded
        } else {
            Decision::Error
        };
        let (id, sent) = (self.id.clone(), self.sent);
        if let Some(guard) =
            self.finisher(CLIENT_CLOSED_REQUEST, decision, Some("client_disconnected"))
        {
            tracing::info!(request_id = %id, sent_to_apple = sent, "the client went away before the response; audited as client_disconnected");
            drop(guard);
        }
    }
}

/// Rides on the response body; when the body is dropped — fully sent or abandoned by the
/// client — it completes the audit record and the metrics, exactly once, and releases the
/// concurrency permit.
struct Finisher {
    record: Option<audit::Record>,
    sink: Sink,
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
        self.sink.metrics.observe(&metrics::Summary {
            api: record.api.unwrap_or("none"),
            client: record.client.as_ref(),
            status: record.status,
            decision: record.decision.as_str(),
            duration: elapsed,
            upstream: self.upstream_elapsed,
            diagnosis: record.diagnosis,
            upstream_status: record.upstream_status,
            retried: record.retried,
            signing: record.signing.as_ref().map(|s| s.kind),
            error: record.error,
        });
        if let Some(audit) = &self.sink.audit {
            audit.record(record);
        }
    }
}
