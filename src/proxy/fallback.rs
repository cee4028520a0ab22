//! Phase 4, fallback (opt-in `sandbox_fallback`, production GETs of the storekit APIs):
//! Apple advises asking sandbox after a production 404 TransactionIdNotFound, and before an
//! app's first release production answers 401 for sandbox transactions (APPLE.md §3). The
//! same request, same token, goes to sandbox at most once per request: when sandbox refuses,
//! what it said is the evidence `inspect` diagnoses with, not a reason to ask again.

use std::time::Instant;

use http::header::HeaderValue;
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;

use crate::apple::Environment;
use crate::diagnose::SandboxProbe;
use crate::forward::ProxyBody;
use crate::token::Token;

use super::attempt::{is_auth_failure, Tally, Upstream};
use super::body;
use super::refusal::error_chain;
use super::{Exchange, Proxy, SANDBOX_FALLBACK_CODES, X_APPLE_ENVIRONMENT};

/// How long the diagnosis's sandbox probe may take.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the fallback made of production's answer.
pub(super) enum Fallback {
    /// The client's answer is ready: sandbox's, or production's 404 put back together.
    Answered(Response<ProxyBody>),
    /// Production's answer is for `inspect`, with what sandbox said of the same token when
    /// the fallback asked it.
    Production {
        response: Response<Incoming>,
        probe: Option<SandboxProbe>,
    },
}

impl Proxy {
    pub(super) async fn fallback(
        &self,
        up: &Upstream<'_>,
        token: &Token,
        response: Response<Incoming>,
        ex: &mut Exchange,
    ) -> Fallback {
        let enabled = self.config.api(up.route.api).sandbox_fallback
            && up.route.environment == Environment::Production
            && *up.method == Method::GET;
        match response.status() {
            StatusCode::NOT_FOUND if enabled => {
                let (head, body) = response.into_parts();
                let peeked = body::peek(body).await;
                let not_here = peeked
                    .whole()
                    .and_then(|b| body::decoded(&head.headers, b))
                    .is_some_and(|b| not_found_in_production(&b));
                if not_here {
                    if let Ok(sandbox) = self.ask_sandbox(up, token, ex).await {
                        return Fallback::Answered(sandbox);
                    }
                }
                Fallback::Answered(body::reassemble(head, peeked))
            }
            StatusCode::UNAUTHORIZED if enabled => match self.ask_sandbox(up, token, ex).await {
                Ok(sandbox) => Fallback::Answered(sandbox),
                Err(probe) => Fallback::Production {
                    response,
                    probe: Some(probe),
                },
            },
            _ => Fallback::Production {
                response,
                probe: None,
            },
        }
    }

    /// The same GET against sandbox: its answer, marked `X-Apple-Environment: Sandbox`, when
    /// sandbox has the resource; otherwise what its answer says of the token.
    async fn ask_sandbox(
        &self,
        up: &Upstream<'_>,
        token: &Token,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, SandboxProbe> {
        let sent = Instant::now();
        let tally = Tally::bodyless(&mut ex.connect_retries);
        let response = self.send_to_sandbox(up, token, tally).await?;
        let status = response.status();
        if is_auth_failure(status) || status == StatusCode::NOT_FOUND {
            tracing::info!(
                request_id = up.request_id,
                status = status.as_u16(),
                "sandbox fallback: sandbox does not have it either"
            );
            return Err(probe_of(status));
        }
        self.note_upstream(ex, &response, token, sent);
        ex.environment = Some(Environment::Sandbox);
        ex.sandbox_fallback = true;
        tracing::info!(
            request_id = up.request_id,
            status = status.as_u16(),
            "sandbox fallback: answered by sandbox"
        );
        let mut response = body::stream_back(response, None);
        response
            .headers_mut()
            .insert(X_APPLE_ENVIRONMENT, HeaderValue::from_static("Sandbox"));
        Ok(response)
    }

    /// The diagnosis's question when the fallback did not ask it: does sandbox take the
    /// same token?
    pub(super) async fn probe_sandbox(&self, up: &Upstream<'_>, token: &Token) -> SandboxProbe {
        let mut retries = 0;
        let tally = Tally::bodyless(&mut retries);
        match tokio::time::timeout(PROBE_TIMEOUT, self.send_to_sandbox(up, token, tally)).await {
            Ok(Ok(response)) => probe_of(response.status()),
            _ => SandboxProbe::Failed,
        }
    }

    async fn send_to_sandbox(
        &self,
        up: &Upstream<'_>,
        token: &Token,
        tally: Tally<'_>,
    ) -> Result<Response<Incoming>, SandboxProbe> {
        let route = self
            .routes
            .sandbox_of(up.route)
            .ok_or(SandboxProbe::Failed)?;
        let url = route.url(up.query());
        let sandbox = Upstream {
            request_id: up.request_id,
            method: up.method,
            url: &url,
            client_headers: up.client_headers,
            route: &route,
            key: up.key,
        };
        self.send(&sandbox, None, token, tally).await.map_err(|e| {
            tracing::info!(request_id = up.request_id, error = %error_chain(&e), "sandbox did not answer");
            SandboxProbe::Failed
        })
    }
}

/// What sandbox's status says of the token: a 401/403 refused it; anything else (a 404
/// included) accepted it.
fn probe_of(status: StatusCode) -> SandboxProbe {
    if is_auth_failure(status) {
        SandboxProbe::Rejected(status.as_u16())
    } else {
        SandboxProbe::Accepted(status.as_u16())
    }
}

/// Whether a production 404 body is one of the "not in production" codes.
fn not_found_in_production(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("errorCode").and_then(serde_json::Value::as_i64))
        .is_some_and(|code| SANDBOX_FALLBACK_CODES.contains(&code))
}
