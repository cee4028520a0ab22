//! The one boundary error: every answer the proxy gives itself instead of Apple's.
//!
//! [`Refusal`] is exhaustive: each variant fixes its HTTP status, its DESIGN §6 code, its
//! title, a stable snake_case kind (the audit record's `error`, the log's `kind`), whose
//! fault it is, and the audit decision. The client-facing detail ([`Refusal::detail`]) never
//! holds internal error text; the cause is kept as the error's `source` and reaches only the
//! operator's log, once, in `finish`. Imports `apple`, `audit` (the decision), `client`,
//! `route` and `forward` (the body type); nothing above `proxy`.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::apple::{Api, Environment};
use crate::audit::Decision;
use crate::client::AuthError;
use crate::forward::{self, BoxError, ProxyBody};
use crate::route::{self, PathError, RouteError};
use crate::signing::{Denied, InputError};

/// The error codes the proxy itself answers with (DESIGN §6, §16, §17). Stable: clients and
/// tests match on them.
pub mod codes {
    pub const UNAUTHENTICATED: &str = "PROXY_UNAUTHENTICATED";
    pub const FORBIDDEN: &str = "PROXY_FORBIDDEN";
    pub const NO_ROUTE: &str = "PROXY_NO_ROUTE";
    pub const BAD_REQUEST: &str = "PROXY_BAD_REQUEST";
    pub const BODY_TOO_LARGE: &str = "PROXY_BODY_TOO_LARGE";
    pub const RATE_LIMITED: &str = "PROXY_RATE_LIMITED";
    pub const OVERLOADED: &str = "PROXY_OVERLOADED";
    pub const UPSTREAM_UNAVAILABLE: &str = "PROXY_UPSTREAM_UNAVAILABLE";
    pub(crate) const UPSTREAM_TIMEOUT: &str = "PROXY_UPSTREAM_TIMEOUT";
    pub const AUDIT_UNAVAILABLE: &str = "PROXY_AUDIT_UNAVAILABLE";
    pub(crate) const SIGNER_UNAVAILABLE: &str = "PROXY_SIGNER_UNAVAILABLE";
    pub(crate) const IDENTITY_UNAVAILABLE: &str = "PROXY_IDENTITY_UNAVAILABLE";
    pub const TOKEN_EXCHANGE_FAILED: &str = "PROXY_TOKEN_EXCHANGE_FAILED";
    pub(crate) const INTERNAL: &str = "PROXY_INTERNAL";
}

/// Whose fault a refusal is: decides the log level (client faults at `info`, the rest at
/// `warn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Proxy,
}

/// What the proxy was waiting for when Apple took too long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waited {
    /// TCP connect and TLS handshake (`[upstream] connect_timeout`).
    Connect,
    /// Apple's response head after the request was sent (`[server] request_timeout`).
    Response,
}

/// Every answer the proxy gives itself. See the module doc for what each variant fixes.
#[derive(Debug)]
pub enum Refusal {
    /// No client credential, or one that is not valid.
    Unauthenticated(AuthError),
    /// The client's rules (or its pinned key) do not allow this request. `detail` names the
    /// client and what it asked for.
    Forbidden { detail: String },
    /// No Apple API is served under the path.
    NoRoute(RouteError),
    /// The API is routed but no key signs for it (an operator's omission).
    NoKey { api: Api },
    /// The path fails the checks that run before routing.
    BadPath(PathError),
    /// A method the proxy never forwards (`CONNECT`, `TRACE`).
    MethodNotProxied { method: String },
    /// The path and query exceed `super::MAX_TARGET_BYTES`.
    TargetTooLong { limit: usize },
    /// The head carried both `Content-Length` and `Transfer-Encoding` (see `framing`).
    Smuggling,
    /// A head hyper would refuse by itself, refused by the framing guard first: `what`
    /// says what is wrong with it.
    MalformedHead { what: &'static str },
    /// A head longer than `bytes`, or with more than `headers` header fields.
    HeadTooLarge { bytes: usize, headers: usize },
    /// The request body is (or declared itself) larger than `max_request_body` (or, for a
    /// signature endpoint, its 64 KiB).
    BodyTooLarge { limit: u64 },
    /// One of the proxy's own endpoints was asked with a method it does not take.
    MethodNotAllowed { allow: &'static str },
    /// A signature request's body is not well-formed; the error names the field.
    BadInput(InputError),
    /// Several keys could sign this in-app signature and the body did not say which.
    AmbiguousKey { choices: String },
    /// The client's `[clients.signing]` policy does not allow this signature.
    SigningDenied { client: String, denied: Denied },
    /// The client's own `rate_limit` is spent.
    RateLimited {
        client: String,
        retry_after: Duration,
    },
    /// Apple's documented per-endpoint limit for this app, enforced locally.
    AppleLimit {
        rate: f64,
        endpoint: &'static str,
        environment: Environment,
        /// Whether the client's fair share (rather than the whole budget) is spent.
        share: bool,
        retry_after: Duration,
    },
    /// More than `max_concurrent_requests` are in flight.
    Overloaded { max: usize },
    /// The audit log cannot be written and `on_failure = "reject"`.
    AuditUnavailable,
    /// The client stopped sending its request body; the request to Apple was cancelled.
    ClientDisconnected,
    /// Apple did not answer in time.
    UpstreamTimeout {
        api: Api,
        waited: Waited,
        limit: Duration,
    },
    /// No response from Apple (connection refused, reset, TLS failure, …).
    UpstreamUnavailable {
        api: Api,
        environment: Environment,
        source: BoxError,
    },
    /// The key's signer (an HSM, a KMS) cannot sign right now (DESIGN §16).
    SignerUnavailable { key: String, source: BoxError },
    /// An identity provider's keys cannot be had and none are cached (DESIGN §17).
    IdentityUnavailable { provider: String, source: BoxError },
    /// An exchange API's access token could not be had (DESIGN §18): Apple's token
    /// endpoint refused the assertion, failed or did not answer.
    ExchangeFailed {
        api: Api,
        key: String,
        error: std::sync::Arc<crate::exchange::ExchangeError>,
        /// Seconds until the proxy asks Apple again.
        retry_after: u64,
    },
    /// A form the proxy must rewrite (Sign in with Apple) is not one it can: `what` says
    /// why.
    BadForm { what: String },
    /// A failure inside the proxy at `step`.
    Internal {
        step: &'static str,
        source: BoxError,
    },
}

impl Refusal {
    /// A failure inside the proxy; the cause goes to the log only.
    pub fn internal(step: &'static str, e: impl Into<BoxError>) -> Refusal {
        Refusal::Internal {
            step,
            source: e.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden { .. } => StatusCode::FORBIDDEN,
            Refusal::NoRoute(_) | Refusal::NoKey { .. } => StatusCode::NOT_FOUND,
            Refusal::BadPath(_)
            | Refusal::MethodNotProxied { .. }
            | Refusal::Smuggling
            | Refusal::MalformedHead { .. }
            | Refusal::BadInput(_)
            | Refusal::AmbiguousKey { .. }
            | Refusal::BadForm { .. }
            | Refusal::ClientDisconnected => StatusCode::BAD_REQUEST,
            Refusal::SigningDenied { .. } => StatusCode::FORBIDDEN,
            Refusal::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::HeadTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::TargetTooLong { .. } => StatusCode::URI_TOO_LONG,
            Refusal::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::RateLimited { .. } | Refusal::AppleLimit { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Refusal::Overloaded { .. }
            | Refusal::AuditUnavailable
            | Refusal::SignerUnavailable { .. }
            | Refusal::IdentityUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Refusal::UpstreamUnavailable { .. } | Refusal::ExchangeFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Refusal::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The DESIGN §6 code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated(_) => codes::UNAUTHENTICATED,
            Refusal::Forbidden { .. } | Refusal::SigningDenied { .. } => codes::FORBIDDEN,
            Refusal::NoRoute(_) | Refusal::NoKey { .. } => codes::NO_ROUTE,
            Refusal::MethodNotAllowed { .. }
            | Refusal::BadInput(_)
            | Refusal::BadForm { .. }
            | Refusal::AmbiguousKey { .. } => codes::BAD_REQUEST,
            Refusal::BadPath(_)
            | Refusal::MethodNotProxied { .. }
            | Refusal::TargetTooLong { .. }
            | Refusal::Smuggling
            | Refusal::MalformedHead { .. }
            | Refusal::HeadTooLarge { .. }
            | Refusal::ClientDisconnected => codes::BAD_REQUEST,
            Refusal::BodyTooLarge { .. } => codes::BODY_TOO_LARGE,
            Refusal::RateLimited { .. } | Refusal::AppleLimit { .. } => codes::RATE_LIMITED,
            Refusal::Overloaded { .. } => codes::OVERLOADED,
            Refusal::AuditUnavailable => codes::AUDIT_UNAVAILABLE,
            Refusal::UpstreamTimeout { .. } => codes::UPSTREAM_TIMEOUT,
            Refusal::UpstreamUnavailable { .. } => codes::UPSTREAM_UNAVAILABLE,
            Refusal::SignerUnavailable { .. } => codes::SIGNER_UNAVAILABLE,
            Refusal::IdentityUnavailable { .. } => codes::IDENTITY_UNAVAILABLE,
            Refusal::ExchangeFailed { .. } => codes::TOKEN_EXCHANGE_FAILED,
            Refusal::Internal { .. } => codes::INTERNAL,
        }
    }

    pub fn title(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated(_) => "Proxy authentication required",
            Refusal::Forbidden { .. } => "Forbidden by proxy policy",
            Refusal::SigningDenied { .. } => "Forbidden by the client's signing policy",
            Refusal::MethodNotAllowed { .. } => "Method not allowed",
            Refusal::BadInput(_) | Refusal::AmbiguousKey { .. } | Refusal::BadForm { .. } => {
                "Bad request"
            }
            Refusal::NoRoute(_) => "No route",
            Refusal::NoKey { .. } => "No key for this API",
            Refusal::BadPath(_)
            | Refusal::MethodNotProxied { .. }
            | Refusal::Smuggling
            | Refusal::MalformedHead { .. } => "Bad request",
            Refusal::HeadTooLarge { .. } => "Request header fields too large",
            Refusal::TargetTooLong { .. } => "Request target too long",
            Refusal::ClientDisconnected => "Request body incomplete",
            Refusal::BodyTooLarge { .. } => "Request body too large",
            Refusal::RateLimited { .. } => "Client rate limit exceeded",
            Refusal::AppleLimit { .. } => "Apple's rate limit for this endpoint",
            Refusal::Overloaded { .. } => "Proxy overloaded",
            Refusal::AuditUnavailable => "Audit log unavailable",
            Refusal::UpstreamTimeout { .. } => "Apple did not answer in time",
            Refusal::UpstreamUnavailable { .. } => "Apple could not be reached",
            Refusal::SignerUnavailable { .. } => "Signer unavailable",
            Refusal::IdentityUnavailable { .. } => "Identity provider unavailable",
            Refusal::ExchangeFailed { .. } => "Apple's token exchange failed",
            Refusal::Internal { .. } => "Internal proxy error",
        }
    }

    /// Stable snake_case kind: the audit record's `error` and the log's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::Forbidden { .. } => "forbidden",
            Refusal::SigningDenied { .. } => "signing_denied",
            Refusal::MethodNotAllowed { .. } => "method_not_allowed",
            Refusal::BadInput(_) | Refusal::BadForm { .. } => "invalid_body",
            Refusal::AmbiguousKey { .. } => "ambiguous_key",
            Refusal::NoRoute(_) => "no_route",
            Refusal::NoKey { .. } => "no_key",
            Refusal::BadPath(_) | Refusal::MethodNotProxied { .. } => "bad_request",
            Refusal::TargetTooLong { .. } => "target_too_long",
            Refusal::Smuggling => "smuggling",
            Refusal::MalformedHead { .. } => "malformed_request",
            Refusal::HeadTooLarge { .. } => "head_too_large",
            Refusal::BodyTooLarge { .. } => "body_too_large",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::AppleLimit { .. } => "apple_limit",
            Refusal::Overloaded { .. } => "overloaded",
            Refusal::AuditUnavailable => "audit_unavailable",
            Refusal::ClientDisconnected => "client_disconnected",
            Refusal::UpstreamTimeout { .. } => "upstream_timeout",
            Refusal::UpstreamUnavailable { .. } => "upstream_unavailable",
            Refusal::SignerUnavailable { .. } => "signer_unavailable",
            Refusal::IdentityUnavailable { .. } => "identity_unavailable",
            Refusal::ExchangeFailed { .. } => "token_exchange_failed",
            Refusal::Internal { .. } => "internal",
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            Refusal::Unauthenticated(_)
            | Refusal::Forbidden { .. }
            | Refusal::SigningDenied { .. }
            | Refusal::MethodNotAllowed { .. }
            | Refusal::BadInput(_)
            | Refusal::BadForm { .. }
            | Refusal::AmbiguousKey { .. }
            | Refusal::NoRoute(_)
            | Refusal::BadPath(_)
            | Refusal::MethodNotProxied { .. }
            | Refusal::TargetTooLong { .. }
            | Refusal::Smuggling
            | Refusal::MalformedHead { .. }
            | Refusal::HeadTooLarge { .. }
            | Refusal::BodyTooLarge { .. }
            | Refusal::RateLimited { .. }
            | Refusal::AppleLimit { .. }
            | Refusal::ClientDisconnected => Fault::Client,
            Refusal::UpstreamTimeout { .. }
            | Refusal::UpstreamUnavailable { .. }
            | Refusal::ExchangeFailed { .. } => Fault::Upstream,
            Refusal::NoKey { .. }
            | Refusal::Overloaded { .. }
            | Refusal::AuditUnavailable
            | Refusal::SignerUnavailable { .. }
            | Refusal::IdentityUnavailable { .. }
            | Refusal::Internal { .. } => Fault::Proxy,
        }
    }

    /// The audit record's `decision`.
    pub fn decision(&self) -> Decision {
        match self {
            Refusal::Unauthenticated(_) => Decision::Unauthenticated,
            Refusal::NoRoute(_) | Refusal::NoKey { .. } => Decision::NoRoute,
            Refusal::Forbidden { .. }
            | Refusal::SigningDenied { .. }
            | Refusal::MethodNotAllowed { .. }
            | Refusal::BadInput(_)
            | Refusal::BadForm { .. }
            | Refusal::AmbiguousKey { .. }
            | Refusal::BadPath(_)
            | Refusal::MethodNotProxied { .. }
            | Refusal::TargetTooLong { .. }
            | Refusal::Smuggling
            | Refusal::MalformedHead { .. }
            | Refusal::HeadTooLarge { .. }
            | Refusal::BodyTooLarge { .. }
            | Refusal::RateLimited { .. }
            | Refusal::AppleLimit { .. }
            | Refusal::Overloaded { .. } => Decision::Denied,
            Refusal::AuditUnavailable
            | Refusal::ClientDisconnected
            | Refusal::UpstreamTimeout { .. }
            | Refusal::UpstreamUnavailable { .. }
            | Refusal::SignerUnavailable { .. }
            | Refusal::IdentityUnavailable { .. }
            | Refusal::ExchangeFailed { .. }
            | Refusal::Internal { .. } => Decision::Error,
        }
    }

    /// Whether, once the request was handed to the upstream client, this failure leaves
    /// Apple possibly holding the request (its audit decision is then `forwarded`): the
    /// client went away or overran the body limit mid-upload, or Apple did not answer in
    /// time. A connection that failed is not: nothing of the request reached Apple.
    pub(crate) fn may_have_reached_apple(&self) -> bool {
        matches!(
            self,
            Refusal::ClientDisconnected
                | Refusal::BodyTooLarge { .. }
                | Refusal::UpstreamTimeout {
                    waited: Waited::Response,
                    ..
                }
        )
    }

    /// Seconds for `Retry-After` (delta-seconds, never Apple's millisecond form).
    pub(crate) fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::RateLimited { retry_after, .. } | Refusal::AppleLimit { retry_after, .. } => {
                Some(retry_after_secs(*retry_after))
            }
            Refusal::ExchangeFailed { retry_after, .. } => Some((*retry_after).max(1)),
            Refusal::Overloaded { .. }
            | Refusal::AuditUnavailable
            | Refusal::SignerUnavailable { .. }
            | Refusal::IdentityUnavailable { .. } => Some(1),
            _ => None,
        }
    }

    /// What the client is told: never internal error text, a token or a secret.
    pub fn detail(&self) -> String {
        match self {
            Refusal::Unauthenticated(AuthError::Missing) => "send your proxy client secret as `Proxy-Authorization: Bearer aap_…` or `Authorization: Bearer aap_…`, or a JWT signed with your client key".into(),
            Refusal::Unauthenticated(AuthError::Invalid) => "the client secret is not valid".into(),
            Refusal::Unauthenticated(e) => e.to_string(),
            Refusal::Forbidden { detail } => detail.clone(),
            Refusal::SigningDenied { client, denied } => {
                format!("client `{client}` may not sign this: {denied}")
            }
            Refusal::MethodNotAllowed { allow } => {
                format!("this endpoint takes {allow} only")
            }
            Refusal::BadInput(e) => format!("{e}"),
            Refusal::BadForm { what } => what.clone(),
            Refusal::ExchangeFailed { api, key, error, .. } => format!(
                "the proxy could not get a {api} access token for key `{key}`: {error}; likely cause: {}",
                error.likely_cause(*api)
            ),
            Refusal::AmbiguousKey { choices } => format!(
                "several keys sign in-app signatures; say which app with `bundle_id`: {choices}"
            ),
            Refusal::NoRoute(e) => format!(
                "{e}; known path prefixes: {}",
                route::known_prefixes().join(", ")
            ),
            Refusal::NoKey { api } => format!(
                "no key is configured for {api}; add a [[keys]] entry whose apis include \"{api}\""
            ),
            Refusal::BadPath(e) => e.to_string(),
            Refusal::MethodNotProxied { method } => format!("{method} is not proxied"),
            Refusal::TargetTooLong { limit } => {
                format!("the path and query exceed {limit} bytes")
            }
            Refusal::Smuggling => {
                "the request carries both Content-Length and Transfer-Encoding".into()
            }
            Refusal::MalformedHead { what } => format!("the request head is malformed: {what}"),
            Refusal::HeadTooLarge { bytes, headers } => format!(
                "the request head exceeds {bytes} bytes or {headers} header fields"
            ),
            Refusal::BodyTooLarge { limit } => {
                format!("the request body exceeds the proxy's limit of {limit} bytes")
            }
            Refusal::RateLimited { client, .. } => format!(
                "client `{client}` exceeded its rate_limit; retry after the Retry-After seconds"
            ),
            Refusal::AppleLimit {
                rate,
                endpoint,
                environment,
                share,
                ..
            } => format!(
                "Apple allows {rate} {endpoint} requests per second for this app ({environment}); {}",
                if *share {
                    "your fair share of it, with other clients using it too, is spent"
                } else {
                    "the app's budget at this proxy is spent"
                }
            ),
            Refusal::Overloaded { max } => {
                format!("more than {max} requests are in flight; retry shortly")
            }
            Refusal::AuditUnavailable => "the proxy cannot write its audit log, and serves no request it cannot audit; retry shortly".into(),
            Refusal::ClientDisconnected => "the client stopped sending its request body; the request to Apple was cancelled".into(),
            Refusal::UpstreamTimeout { api, waited, limit } => match waited {
                Waited::Connect => format!(
                    "connecting to {api} took longer than {}",
                    humantime::format_duration(*limit)
                ),
                Waited::Response => format!(
                    "{api} did not send a response within {}",
                    humantime::format_duration(*limit)
                ),
            },
            Refusal::UpstreamUnavailable {
                api, environment, ..
            } => format!("the proxy could not get a response from {api} ({environment})"),
            Refusal::SignerUnavailable { key, .. } => format!(
                "the signer of key `{key}` is not answering; nothing was sent to Apple; retry shortly"
            ),
            Refusal::IdentityUnavailable { provider, .. } => format!(
                "the keys of identity provider `{provider}` cannot be fetched; retry shortly"
            ),
            Refusal::Internal { step, .. } => {
                format!("the proxy failed at step `{step}`; the operator's log has the cause")
            }
        }
    }

    /// Renders Apple's error shape, so clients' error handling keeps working; on APNs
    /// routes (`apns`) with APNs' `reason` beside it, the proxy's code.
    pub(crate) fn into_response(self, request_id: &str, apns: bool) -> Response<ProxyBody> {
        let status = self.status();
        let mut body = serde_json::json!({
            "errors": [{
                "status": status.as_str(),
                "code": self.code(),
                "title": self.title(),
                "detail": self.detail(),
            }],
            "request_id": request_id,
        });
        if apns {
            body["reason"] = serde_json::Value::from(self.code());
        }
        let mut response = Response::new(forward::boxed(Full::new(Bytes::from(body.to_string()))));
        *response.status_mut() = status;
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Refusal::MethodNotAllowed { allow } = &self {
            h.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"apple-api-proxy\""),
            );
        }
        response
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail())
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Refusal::Unauthenticated(e) => Some(e),
            Refusal::NoRoute(e) => Some(e),
            Refusal::BadPath(e) => Some(e),
            Refusal::UpstreamUnavailable { source, .. }
            | Refusal::SignerUnavailable { source, .. }
            | Refusal::IdentityUnavailable { source, .. }
            | Refusal::Internal { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

/// Whole seconds for `Retry-After` (delta-seconds), rounded up and at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

pub(crate) use crate::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(msg: &str) -> BoxError {
        msg.to_string().into()
    }

    /// One row per variant: status, code, kind, fault, decision, Retry-After.
    #[test]
    #[rustfmt::skip]
    fn every_refusal_fixes_its_status_code_kind_fault_and_decision() {
        use Decision as D;
        use Fault as F;
        let s = Duration::from_millis(1500);
        type Row = (Refusal, u16, &'static str, &'static str, Fault, Decision, Option<u64>);
        let rows: Vec<Row> = vec![
            (Refusal::Unauthenticated(AuthError::Missing), 401, codes::UNAUTHENTICATED, "unauthenticated", F::Client, D::Unauthenticated, None),
            (Refusal::Forbidden { detail: "no".into() }, 403, codes::FORBIDDEN, "forbidden", F::Client, D::Denied, None),
            (Refusal::NoRoute(RouteError::NoRoute), 404, codes::NO_ROUTE, "no_route", F::Client, D::NoRoute, None),
            (Refusal::NoKey { api: Api::AppStoreConnect }, 404, codes::NO_ROUTE, "no_key", F::Proxy, D::NoRoute, None),
            (Refusal::BadPath(PathError::DotSegment), 400, codes::BAD_REQUEST, "bad_request", F::Client, D::Denied, None),
            (Refusal::MethodNotProxied { method: "TRACE".into() }, 400, codes::BAD_REQUEST, "bad_request", F::Client, D::Denied, None),
            (Refusal::TargetTooLong { limit: 8 }, 414, codes::BAD_REQUEST, "target_too_long", F::Client, D::Denied, None),
            (Refusal::Smuggling, 400, codes::BAD_REQUEST, "smuggling", F::Client, D::Denied, None),
            (Refusal::MalformedHead { what: "x" }, 400, codes::BAD_REQUEST, "malformed_request", F::Client, D::Denied, None),
            (Refusal::HeadTooLarge { bytes: 1, headers: 1 }, 431, codes::BAD_REQUEST, "head_too_large", F::Client, D::Denied, None),
            (Refusal::BodyTooLarge { limit: 1 }, 413, codes::BODY_TOO_LARGE, "body_too_large", F::Client, D::Denied, None),
            (Refusal::MethodNotAllowed { allow: "POST" }, 405, codes::BAD_REQUEST, "method_not_allowed", F::Client, D::Denied, None),
            (Refusal::BadInput(InputError::NotObject), 400, codes::BAD_REQUEST, "invalid_body", F::Client, D::Denied, None),
            (Refusal::AmbiguousKey { choices: "a, b".into() }, 400, codes::BAD_REQUEST, "ambiguous_key", F::Client, D::Denied, None),
            (Refusal::SigningDenied { client: "shop".into(), denied: Denied { rule: "signing.products", value: "product `x`".into() } }, 403, codes::FORBIDDEN, "signing_denied", F::Client, D::Denied, None),
            (Refusal::RateLimited { client: "ci".into(), retry_after: s }, 429, codes::RATE_LIMITED, "rate_limited", F::Client, D::Denied, Some(2)),
            (Refusal::AppleLimit { rate: 10.0, endpoint: "x", environment: Environment::Production, share: true, retry_after: s }, 429, codes::RATE_LIMITED, "apple_limit", F::Client, D::Denied, Some(2)),
            (Refusal::Overloaded { max: 1 }, 503, codes::OVERLOADED, "overloaded", F::Proxy, D::Denied, Some(1)),
            (Refusal::AuditUnavailable, 503, codes::AUDIT_UNAVAILABLE, "audit_unavailable", F::Proxy, D::Error, Some(1)),
            (Refusal::ClientDisconnected, 400, codes::BAD_REQUEST, "client_disconnected", F::Client, D::Error, None),
            (Refusal::UpstreamTimeout { api: Api::Notary, waited: Waited::Connect, limit: s }, 504, codes::UPSTREAM_TIMEOUT, "upstream_timeout", F::Upstream, D::Error, None),
            (Refusal::UpstreamUnavailable { api: Api::Notary, environment: Environment::Production, source: boxed("reset") }, 502, codes::UPSTREAM_UNAVAILABLE, "upstream_unavailable", F::Upstream, D::Error, None),
            (Refusal::SignerUnavailable { key: "k".into(), source: boxed("hsm") }, 503, codes::SIGNER_UNAVAILABLE, "signer_unavailable", F::Proxy, D::Error, Some(1)),
            (Refusal::IdentityUnavailable { provider: "gh".into(), source: boxed("jwks") }, 503, codes::IDENTITY_UNAVAILABLE, "identity_unavailable", F::Proxy, D::Error, Some(1)),
            (Refusal::ExchangeFailed { api: Api::Maps, key: "k".into(), error: std::sync::Arc::new(crate::exchange::ExchangeError::Timeout(s)), retry_after: 3 }, 502, codes::TOKEN_EXCHANGE_FAILED, "token_exchange_failed", F::Upstream, D::Error, Some(3)),
            (Refusal::BadForm { what: "no client_id".into() }, 400, codes::BAD_REQUEST, "invalid_body", F::Client, D::Denied, None),
            (Refusal::internal("mint", boxed("boom")), 500, codes::INTERNAL, "internal", F::Proxy, D::Error, None),
        ];
        for (refusal, status, code, kind, fault, decision, retry) in rows {
            assert_eq!(refusal.status().as_u16(), status, "{kind}");
            assert_eq!(refusal.code(), code, "{kind}");
            assert_eq!(refusal.kind(), kind);
            assert_eq!(refusal.fault(), fault, "{kind}");
            assert_eq!(refusal.decision(), decision, "{kind}");
            assert_eq!(refusal.retry_after(), retry, "{kind}");
            assert!(!refusal.title().is_empty() && !refusal.detail().is_empty());
        }
    }

    #[test]
    fn the_cause_reaches_the_log_chain_but_never_the_client() {
        let refusal = Refusal::internal("upstream request", boxed("secret internal text"));
        assert!(!refusal.detail().contains("secret internal text"));
        assert!(error_chain(&refusal).ends_with(": secret internal text"));
        let response = refusal.into_response("rid-1", false);
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }
}
