//! Phase 3, forward: one attempt at Apple ([`Proxy::send`], with bounded retries of a
//! connection that failed before anything was sent), and the one re-mint-and-retry DESIGN §4
//! asks for after Apple's 401 ([`Proxy::forward`]).
//!
//! The client's `Authorization` is never copied into the upstream request; the token's is
//! the only one, so a client can never choose the credential Apple sees.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Body as _;
use hyper::body::Incoming;

use crate::apple::TokenStrategy;
use crate::diagnose;
use crate::forward::{self, Meter, ProxyBody};
use crate::metrics;
use crate::route;
use crate::token::{self, Token};

use super::mint::Freshness;
use super::refusal::{error_chain, Waited};
use super::{Exchange, Proxy, Refusal, APPLE_RATE_LIMIT, APPLE_REQUEST_ID};

/// Retries of a body-less idempotent request whose connection failed before anything was
/// sent, or that Apple's HTTP/2 server refused unprocessed, and the backoff step between
/// connection retries.
const MAX_CONNECT_RETRIES: u32 = 2;
const CONNECT_RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// One request on its way to Apple, as the send, retry, fallback and probe share it.
pub(super) struct Upstream<'a> {
    /// For the operator's log lines about this exchange.
    pub request_id: &'a str,
    pub method: &'a Method,
    pub url: &'a str,
    pub client_headers: &'a http::HeaderMap,
    pub route: &'a route::Route<'a>,
    /// The configured name of the key that signs (APNs keeps a connection per key).
    pub key: &'a str,
}

impl Upstream<'_> {
    /// The raw query forwarded, without `?`.
    pub fn query(&self) -> Option<&str> {
        self.url.split_once('?').map(|(_, q)| q)
    }
}

/// The request-body bookkeeping one send reads and updates.
pub(super) struct Tally<'a> {
    /// The client's request body as read so far (bytes counted before the limit fails it;
    /// whether it ended or failed), when this send carries it.
    pub upload: Option<&'a Meter>,
    pub max_body: u64,
    pub connect_retries: &'a mut u32,
}

impl<'a> Tally<'a> {
    /// For a body-less request (a retry, the fallback, the probe).
    pub(crate) fn bodyless(connect_retries: &'a mut u32) -> Tally<'a> {
        Tally {
            upload: None,
            max_body: 0,
            connect_retries,
        }
    }
}

impl Proxy {
    /// Sends the request with `token`; after Apple's 401 to a replayable request, re-mints
    /// once with a fresh `iat` and sends it again (Apple has transient 401s, APPLE.md §3).
    /// Returns Apple's answer and the token it answered.
    pub(super) async fn forward(
        &self,
        up: &Upstream<'_>,
        body: Incoming,
        request: &token::Request<'_>,
        token: Arc<Token>,
        ex: &mut Exchange,
    ) -> Result<(Response<Incoming>, Arc<Token>), Refusal> {
        let max_body = self.config.server.max_request_body;
        // A body-less idempotent request can be replayed, so it may be retried; only a
        // per-request token is re-minted for it (a cached developer token is not renewed
        // early, DESIGN §18).
        let replayable = is_idempotent(up.method) && body.is_end_stream();
        let strategy = up.route.api.token_strategy();
        let remintable = replayable
            && matches!(
                strategy,
                TokenStrategy::PerRequest | TokenStrategy::Exchanged
            );
        let body = (!replayable).then(|| {
            forward::boxed(
                forward::Metered::new(body, ex.received.clone(), Some(max_body))
                    .without_trailers()
                    .idle_timeout(self.config.server.body_idle_timeout),
            )
        });
        let offset_before = self.minter.clock().offset_secs();
        let tally = Tally {
            upload: body.is_some().then_some(&*ex.received),
            max_body,
            connect_retries: &mut ex.connect_retries,
        };
        let sent = Instant::now();
        // From here Apple may have the request, whatever happens to the client.
        ex.sent = true;
        let response = self.send(up, body, &token, tally).await?;
        self.note_upstream(ex, &response, &token, sent);
        // An access token Apple refused is not offered again (DESIGN §18), unless it is too
        // new for the 401 to be about it: then it is kept and the request not retried.
        let forgotten = response.status() == StatusCode::UNAUTHORIZED
            && strategy == TokenStrategy::Exchanged
            && self.shared.access_tokens.forget(&token);
        let remintable = remintable && (strategy != TokenStrategy::Exchanged || forgotten);
        if response.status() != StatusCode::UNAUTHORIZED || !remintable {
            return Ok((response, token));
        }

        drop(response);
        let token = self
            .credential(request, up.route, Freshness::Fresh, ex)
            .await?;
        ex.retried = true;
        let tally = Tally::bodyless(&mut ex.connect_retries);
        let sent = Instant::now();
        let response = self.send(up, None, &token, tally).await?;
        self.note_upstream(ex, &response, &token, sent);
        // Only a success says the fresh token was the fix (a 5xx proves nothing).
        if is_success(response.status()) {
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
            tracing::info!(request_id = up.request_id, key = %token.key_name, diagnosis = note, "Apple refused once; the retry with a fresh token succeeded");
        }
        Ok((response, token))
    }

    /// Sends one request to Apple and learns Apple's clock from the answer. `body: None` is
    /// a body-less request: it can be sent again if the connection fails before a byte
    /// went out. A request with a body never is.
    pub(super) async fn send(
        &self,
        up: &Upstream<'_>,
        body: Option<ProxyBody>,
        token: &Token,
        tally: Tally<'_>,
    ) -> Result<Response<Incoming>, Refusal> {
        let Tally {
            upload,
            max_body,
            connect_retries,
        } = tally;
        // Built again only for a retry after a failed connection (rare), never cloned.
        // Sign in with Apple's credential is in the form: no `Authorization` at all.
        let in_form = up.route.api.token_strategy() == TokenStrategy::FormSecret;
        let build_headers = || {
            forward::upstream_headers(up.client_headers, (!in_form).then(|| token.authorization()))
        };
        let mut headers = Some(build_headers());
        let replayable = body.is_none();
        let mut body = Some(body.unwrap_or_else(forward::empty));
        let timeout = self.config.server.request_timeout;
        let client = self.upstream_for(up.route.api, up.key);
        let response = loop {
            let mut request = Request::builder()
                .method(up.method.clone())
                .uri(up.url)
                .body(body.take().unwrap_or_else(forward::empty))
                .map_err(|e| Refusal::internal("upstream request", e))?;
            *request.headers_mut() = headers.take().unwrap_or_else(build_headers);
            // `request_timeout` bounds the wait for Apple's head once the body is sent; a
            // slow upload is bounded by `body_idle_timeout` instead (DESIGN §13b).
            let answer = match upload {
                None => tokio::time::timeout(timeout, client.request(request))
                    .await
                    .map_err(drop),
                Some(upload) => {
                    let deadline = async {
                        upload.finished().await;
                        tokio::time::sleep(timeout).await;
                    };
                    tokio::select! {
                        biased;
                        answer = client.request(request) => Ok(answer),
                        () = deadline => Err(()),
                    }
                }
            };
            let error = match answer {
                Ok(Ok(response)) => break response,
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(Refusal::UpstreamTimeout {
                        api: up.route.api,
                        waited: Waited::Response,
                        limit: timeout,
                    })
                }
            };
            // The metered body counts before it fails, so this holds however the transport
            // (HTTP/1 write error, HTTP/2 stream reset) reports the abort.
            if let Some(upload) = upload {
                if upload.bytes.load(Ordering::Relaxed) > max_body {
                    return Err(Refusal::BodyTooLarge { limit: max_body });
                }
                if upload.failed.load(Ordering::Relaxed) {
                    return Err(Refusal::ClientDisconnected);
                }
            }
            if forward::is_timeout(&error) {
                return Err(Refusal::UpstreamTimeout {
                    api: up.route.api,
                    waited: Waited::Connect,
                    limit: self.config.upstream.connect_timeout,
                });
            }
            // Nothing reached Apple — the connection itself failed — or Apple's HTTP/2 server
            // said it never processed the request (a refused stream, or a graceful GOAWAY as
            // it rotates the connection; the pool opens a new one). Try again, bounded; a
            // failed connection after a pause, a refused request at once.
            let connect = error.is_connect();
            if replayable
                && (connect || forward::is_unprocessed(&error))
                && *connect_retries < MAX_CONNECT_RETRIES
            {
                *connect_retries += 1;
                let why = if connect {
                    "upstream connection failed; retrying"
                } else {
                    "Apple did not process the request (HTTP/2 refused stream or GOAWAY); sending it again"
                };
                tracing::info!(request_id = up.request_id, api = %up.route.api, attempt = *connect_retries, error = %error_chain(&error), "{why}");
                if connect {
                    tokio::time::sleep(CONNECT_RETRY_BACKOFF * *connect_retries).await;
                }
                continue;
            }
            return Err(Refusal::UpstreamUnavailable {
                api: up.route.api,
                environment: up.route.environment,
                source: Box::new(error),
            });
        };
        // A cached answer (`Age`) says when it was made, not what time it is at Apple.
        let cached = response.headers().contains_key(http::header::AGE);
        if let Some(date) = apple_date(response.headers()).filter(|_| !cached) {
            let max = self.config.tokens.max_clock_offset;
            match self.minter.clock().observe(date, SystemTime::now(), max) {
                Ok(offset) if offset.abs() > 10 => tracing::warn!(
                    offset_s = offset,
                    "Apple's clock differs from this host's; tokens are corrected for it"
                ),
                Ok(_) => {}
                Err(offset) => tracing::warn!(
                    offset_s = offset,
                    max_s = max.as_secs(),
                    "ignoring Apple's Date: it is further from this host's clock than [tokens] max_clock_offset"
                ),
            }
        }
        Ok(response)
    }

    /// Records what Apple's answer says about this exchange.
    pub(super) fn note_upstream(
        &self,
        ex: &mut Exchange,
        response: &Response<Incoming>,
        token: &Token,
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
}

/// 2xx or 3xx: Apple accepted the request and its token.
pub(super) fn is_success(status: StatusCode) -> bool {
    status.is_success() || status.is_redirection()
}

pub(super) fn is_auth_failure(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

/// RFC 9110 §9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::PUT
    )
}

pub(super) fn apple_date(headers: &http::HeaderMap) -> Option<SystemTime> {
    headers
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
}
