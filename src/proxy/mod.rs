//! The life of one request, in order. This is the only module that knows the order of the
//! steps; each step's rules live in its own module, and each phase in its own file over one
//! per-request context, `Exchange`:
//!
//! 1. `admit`: shed load, authenticate, audit health, method and path checks, route,
//!    policy, rate limits, the key, Apple's per-endpoint limits, a declared oversize body;
//! 2. `mint`: the token for exactly the request forwarded;
//! 3. `attempt` (forward): one attempt at Apple, and one re-mint-and-retry after a 401;
//! 4. `fallback`: production's 404/401 asked again of sandbox, where configured;
//! 5. `inspect`: Apple's 401/403 diagnosed, everything else streamed back untouched;
//! 6. `finish`: rendered, logged, audited and counted exactly once, whatever happened.
//!
//! `Proxy::handle` is the outer handler (it never fails and always finishes);
//! `Proxy::process` is the inner one and returns `Result<_, Refusal>` — the first phase
//! that refuses ends the request, and its [`Refusal`] says status, code, kind, whose fault
//! and the audit decision.

mod admit;
mod attempt;
mod body;
mod fallback;
mod finish;
mod form;
mod inspect;
mod mint;
mod own;
mod refusal;
mod state;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use tracing::Instrument as _;

use crate::apple::{Api, Environment};
use crate::audit;
use crate::client::CertIdentity;
use crate::forward::{self, ProxyBody};
use crate::framing::{self, Refused, Rejection};

pub use refusal::{codes, Fault, Refusal, Waited};
pub use state::{Proxy, StartError};

use admit::Admission;
use attempt::Upstream;
use fallback::Fallback;
use mint::Freshness;

/// Longest path + query accepted. Apple's URLs are far shorter; the bound keeps scopes (and
/// so cached tokens) small whatever a client sends.
pub(crate) const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Apple's request id response header (the audit's `apple_request_id`).
pub(crate) const APPLE_REQUEST_ID: &str = "x-apple-request-uuid";
/// App Store Connect's rate-limit header (`user-hour-lim:3600;user-hour-rem:3121;`).
pub(crate) const APPLE_RATE_LIMIT: &str = "x-rate-limit";

/// Marks a response that sandbox answered for a production request (sandbox fallback).
pub(crate) const X_APPLE_ENVIRONMENT: &str = "x-apple-environment";
/// App Store Server error codes after which Apple advises asking sandbox (APPLE.md §3):
/// TransactionIdNotFound, OriginalTransactionIdNotFound.
pub(crate) const SANDBOX_FALLBACK_CODES: [i64; 2] = [4040010, 4040005];

/// Response header naming the first likely cause when Apple refused a request.
pub(crate) const X_PROXY_DIAGNOSIS: &str = "x-proxy-diagnosis";
/// Response header carrying the request id on every response.
pub(crate) const X_REQUEST_ID: &str = "x-request-id";

impl Proxy {
    /// The outer handler: never fails, always stamps the request id, and hands the outcome
    /// to `Proxy::finish`, which audits and counts it exactly once when its body ends.
    pub(crate) async fn handle(
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
        // From here the exchange owns the request's audit record: `finish` writes it, and
        // if hyper drops this future first (the client hung up or reset its stream before
        // Apple answered), the exchange's drop writes it instead.
        let mut ex = self.exchange(Head::of(&req, peer), id, started);
        let id = ex.id.clone();
        // Boxed: the pipeline's state machine is large, and hyper keeps a slot the size of
        // the future it is handed for every open connection, busy or idle; boxed, the
        // slot holds a pointer and the state machine exists only while a request does.
        let result = Box::pin(
            self.process(req, cert.as_deref(), &id, &mut ex)
                .instrument(span.clone()),
        )
        .await;
        self.finish(result, ex, span)
    }

    /// The answer to a request whose head the framing guard refused (see `crate::framing`):
    /// both `Content-Length` and `Transfer-Encoding`, two different lengths, a head that
    /// does not parse or is too large. The JSON refusal, with `X-Request-Id`, audited like any
    /// other, and `Connection: close` so hyper drops the connection whose framing can no
    /// longer be trusted.
    pub(crate) fn refuse_framing(&self, refused: &Refused, peer: Peer) -> Response<ProxyBody> {
        let started = Instant::now();
        let id = self.shared.ids.next();
        let span = tracing::debug_span!("request", id = %id, peer = %peer.addr);
        let head = Head::of_line(refused.method.as_deref(), refused.target.as_deref(), peer);
        let ex = self.exchange(head, id, started);
        let refusal = match refused.why {
            Rejection::Smuggling => Refusal::Smuggling,
            Rejection::ContentLength => Refusal::MalformedHead {
                what: "two different Content-Length values, or one that is not a number",
            },
            Rejection::TransferEncoding => Refusal::MalformedHead {
                what: "a Transfer-Encoding whose last coding is not chunked",
            },
            Rejection::Malformed => Refusal::MalformedHead {
                what: "it does not parse as HTTP/1.1",
            },
            Rejection::TooLarge => Refusal::HeadTooLarge {
                bytes: framing::MAX_HEAD,
                headers: framing::MAX_HEADERS,
            },
        };
        let mut response = self.finish(Err(refusal), ex, span);
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    }

    /// The inner handler: the phases in order, `?` on the first refusal.
    async fn process(
        &self,
        req: Request<Incoming>,
        cert: Option<&CertIdentity>,
        request_id: &str,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let (parts, body) = req.into_parts();
        let admission = match self.admit(&parts, cert, ex) {
            Ok(admission) => admission,
            // An identity token with a `kid` the cached keys lack, or a provider with no keys
            // yet: one refetch (at most one per 30 s per provider), then admission again.
            Err(refusal) => match ex.identity_refetch.take() {
                Some(why) => match self.clients.refetch(why).await {
                    crate::identity::Refetch::Changed => self.admit(&parts, cert, ex)?,
                    crate::identity::Refetch::Failed(e) => {
                        return Err(match refusal {
                            Refusal::IdentityUnavailable { provider, .. } => {
                                Refusal::IdentityUnavailable {
                                    provider,
                                    source: e.into(),
                                }
                            }
                            other => other,
                        })
                    }
                    crate::identity::Refetch::Unchanged => return Err(refusal),
                },
                None => return Err(refusal),
            },
        };
        let admitted = match admission {
            Admission::Apple(admitted) => admitted,
            // The proxy's own endpoints (DESIGN §14) answer here; finish audits them.
            Admission::Own { who, endpoint } => {
                return self.answer_own(endpoint, &who, &parts, body, ex).await
            }
        };

        // Sign in with Apple: the credential goes into the form, which is read whole.
        if admitted.route.api == Api::SignInWithApple {
            return self.sign_in(&admitted, &parts, body, request_id, ex).await;
        }
        let request = self.token_request(&admitted, &parts);
        let token = self
            .credential(&request, &admitted.route, Freshness::Cached, ex)
            .await?;

        let url = admitted.route.url(parts.uri.query());
        let up = Upstream {
            request_id,
            method: &parts.method,
            url: &url,
            client_headers: &parts.headers,
            route: &admitted.route,
            key: admitted.key,
        };
        let (response, token) = self.forward(&up, body, &request, token, ex).await?;

        let answer = match self.fallback(&up, &token, response, ex).await {
            Fallback::Answered(answer) => answer,
            Fallback::Production { response, probe } => {
                self.inspect(response, &up, &token, probe, ex).await
            }
        };
        // The key worked unless the answer the client gets is Apple's refusal of it; after a
        // 401 and a retry, only a success proves it (DESIGN §13b).
        let worked = ex.upstream_status.is_some_and(|s| {
            if ex.retried {
                (200..400).contains(&s)
            } else {
                s != 401 && s != 403
            }
        });
        if worked {
            self.key_worked(&token.key_name);
        }
        Ok(answer)
    }
}

/// What one request learned on its way, for its audit record, metrics and log line. It owns
/// the record from the handler's first line: `Proxy::finish` hands it to the response body's
/// guard, and an exchange dropped before that (its handler future dropped by hyper) writes
/// it itself, as `client_disconnected`.
pub struct Exchange {
    id: Arc<str>,
    head: Head,
    started: Instant,
    client: Option<Arc<str>>,
    client_auth: &'static str,
    /// The identity token's provider and subject (DESIGN §17), also on a 403 when it
    /// matched no client.
    identity: Option<Arc<crate::client::OidcSubject>>,
    /// Set by admission when refetching an identity provider's keys could let the request in.
    identity_refetch: Option<crate::client::Refetchable>,
    api: Option<Api>,
    environment: Option<Environment>,
    key: Option<Arc<str>>,
    key_id: Option<Arc<str>>,
    token_sha256: Option<Arc<str>>,
    /// Whether the request was handed to the upstream client (Apple may have it).
    sent: bool,
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
    /// An in-app signature request: what it asked for, and what was signed.
    signing: Option<Box<audit::Signing>>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Where the record goes; `None` once `finish` has taken it.
    sink: Option<finish::Sink>,
}

impl Proxy {
    fn exchange(&self, head: Head, id: Arc<str>, started: Instant) -> Exchange {
        Exchange {
            id,
            head,
            started,
            client: None,
            client_auth: "none",
            identity: None,
            identity_refetch: None,
            api: None,
            environment: None,
            key: None,
            key_id: None,
            token_sha256: None,
            sent: false,
            upstream_status: None,
            upstream_elapsed: None,
            diagnosis: None,
            retried: false,
            apple_request_id: None,
            rate_limit_remaining: None,
            received: Arc::new(forward::Meter::watched()),
            connect_retries: 0,
            sandbox_fallback: false,
            signing: None,
            permit: None,
            sink: Some(finish::Sink {
                audit: self.shared.audit.get().cloned(),
                metrics: self.shared.metrics.clone(),
            }),
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
    /// A request line the framing guard read before refusing its head: `-` for what it
    /// could not read.
    fn of_line(method: Option<&str>, target: Option<&str>, peer: Peer) -> Head {
        // What a refused head says is bounded like an admitted one's.
        let target = target.map(|t| truncated(t, MAX_TARGET_BYTES));
        let method = method.map(|m| truncated(m, 32));
        let (path, query) = match target {
            Some(target) => match target.split_once('?') {
                Some((path, query)) => (path, Some(query)),
                None => (target, None),
            },
            None => ("-", None),
        };
        Head {
            method: method.map_or(Cow::Borrowed("-"), |m| Cow::Owned(m.to_string())),
            path: audit::redact_path(path),
            query: query.map(audit::redact_query),
            peer,
        }
    }

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

/// The Apple-error-body reader's decoding, for the fuzz target.
#[cfg(test)]
pub(crate) fn decoded_for_fuzz(encoding: &str, bytes: &[u8]) -> Option<bytes::Bytes> {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_str(encoding).ok()?,
    );
    body::decoded(&headers, &bytes::Bytes::copy_from_slice(bytes))
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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
