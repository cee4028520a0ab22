//! Phase 1, admit: everything that may refuse a request before it costs a signature or
//! reaches Apple — load shedding, the client's credential, the audit log's health, the
//! method and path checks, the route, the client's policy and rate limits, the key, Apple's
//! per-endpoint limits, and a declared oversize body. In that order, and why:
//!
//! - load is shed first, answering at once rather than queuing without bound;
//! - the client authenticates before anything else, so an unauthenticated caller learns
//!   nothing about routes, and every later refusal's record names the client;
//! - the audit check comes right after, so no unaudited request is served;
//! - the path is checked before routing so no path is ever normalised into another one, and
//!   routing uses the path alone (an absolute-form target's authority is ignored);
//! - policy comes before minting: a denied request costs no signature and reaches nothing.

use std::time::Instant;

use http::header;
use http::request::Parts;
use http::Method;

use crate::apple::{Api, Environment};
use crate::client::{CertIdentity, Identity};
use crate::route::{self, Destination, Endpoint};

use super::{Exchange, Proxy, Refusal, MAX_TARGET_BYTES};

/// What admission lets through.
pub(super) enum Admission<'a> {
    /// A request for Apple.
    Apple(Admitted<'a>),
    /// A request for one of the proxy's own endpoints (DESIGN §14): authenticated, audited
    /// and allowed exactly like a forwarded one.
    Own { who: Identity, endpoint: Endpoint },
}

/// A request the proxy will forward: who asks, where it goes, which key signs.
pub(super) struct Admitted<'a> {
    pub who: Identity,
    pub route: route::Route<'a>,
    /// The configured name of the key that signs.
    pub key: &'a str,
}

impl Proxy {
    pub(super) fn admit<'a>(
        &'a self,
        parts: &'a Parts,
        cert: Option<&CertIdentity>,
        ex: &mut Exchange,
    ) -> Result<Admission<'a>, Refusal> {
        ex.permit = Some(
            self.shared
                .in_flight
                .clone()
                .try_acquire_owned()
                .map_err(|_| Refusal::Overloaded {
                    max: self.config.server.max_concurrent_requests,
                })?,
        );
        let who = self
            .clients
            .authenticate(
                &parts.headers,
                cert,
                crate::token::unix_secs(std::time::SystemTime::now()),
            )
            .map_err(|e| {
                ex.identity_refetch = e.refetchable();
                auth_refusal(e, ex)
            })?;
        ex.client = Some(who.name.clone());
        ex.client_auth = who.method.as_str();
        ex.identity = who.oidc.clone();
        match self.shared.audit.get() {
            Some(a) if a.admits() => {}
            other => {
                if let Some(a) = other {
                    a.refused();
                }
                return Err(Refusal::AuditUnavailable);
            }
        }

        // Methods that could make the proxy a tunnel or an echo server are refused outright.
        if parts.method == Method::CONNECT || parts.method == Method::TRACE {
            return Err(Refusal::MethodNotProxied {
                method: parts.method.to_string(),
            });
        }
        let path = parts.uri.path();
        let target_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if target_len > MAX_TARGET_BYTES {
            return Err(Refusal::TargetTooLong {
                limit: MAX_TARGET_BYTES,
            });
        }
        route::check_path(path).map_err(Refusal::BadPath)?;
        let destination = self.routes.destination(path).map_err(Refusal::NoRoute)?;
        match &destination {
            Destination::Apple(route) => {
                ex.api = Some(route.api);
                ex.environment = Some(route.environment);
            }
            Destination::Own(endpoint) => ex.api = Some(endpoint.api()),
        }

        if !self.clients.allows(&who, parts.method.as_str(), path) {
            return Err(Refusal::Forbidden {
                // Redacted: the detail reaches the operator's log (DESIGN §13b).
                detail: format!(
                    "client `{}` may not {} {}",
                    who.name,
                    parts.method,
                    crate::audit::redact_path(path)
                ),
            });
        }
        if let Err(wait) = self.clients.check_rate(&who, Instant::now()) {
            return Err(Refusal::RateLimited {
                client: who.name.to_string(),
                retry_after: wait,
            });
        }
        let mut route = match destination {
            Destination::Apple(route) => route,
            Destination::Own(endpoint) => return Ok(Admission::Own { who, endpoint }),
        };
        // APNs' own path carries no environment: the client's config chooses it.
        if route.api == Api::Apns
            && path.starts_with(crate::apple::APNS_NATIVE_PREFIX)
            && self.clients.apns_environment(&who) == Environment::Sandbox
        {
            if let Some(development) = self.routes.sandbox_of(&route) {
                route = development;
                ex.environment = Some(route.environment);
            }
        }
        // The credential endpoints the proxy speaks to itself (DESIGN §18): a client never
        // trades a token of its own at Maps' /v1/token, and Sign in with Apple is proxied
        // only where the form carries the client_secret.
        if route.api == Api::Maps && is_maps_token_path(route.path) {
            return Err(Refusal::Forbidden {
                detail: "the proxy exchanges Maps tokens itself and never hands out an access token: call the Maps Server API's paths (e.g. /maps/v1/geocode) directly".into(),
            });
        }
        if route.api == Api::SignInWithApple
            && (parts.method != Method::POST
                || !crate::apple::SIGN_IN_FORM_PATHS.contains(&route.path))
        {
            return Err(Refusal::Forbidden {
                detail: format!(
                    "the proxy forwards only POST /appleid{} to Sign in with Apple (the endpoints whose form carries the client_secret)",
                    crate::apple::SIGN_IN_FORM_PATHS.join(", /appleid")
                ),
            });
        }
        let key = self.key_for(&who, route.api)?;
        self.check_apple_limits(&who, &route, key, parts.method.as_str())?;

        // A declared oversize body is refused before contacting Apple; a body that lies or
        // streams without a length is cut off by the metered body in `forward`.
        let max_body = self.config.server.max_request_body;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max_body) {
            return Err(Refusal::BodyTooLarge { limit: max_body });
        }
        Ok(Admission::Apple(Admitted { who, route, key }))
    }

    /// The key that signs: the client's pinned key, else the first key configured for the API.
    fn key_for(&self, who: &Identity, api: Api) -> Result<&str, Refusal> {
        if let Some(pinned) = self.clients.pinned_key(who) {
            let serves = self
                .minter
                .key_config(pinned)
                .is_some_and(|k| k.apis.contains(&api));
            if !serves {
                return Err(Refusal::Forbidden {
                    detail: format!(
                        "client `{}` is pinned to key `{pinned}`, which does not sign for {api}",
                        who.name
                    ),
                });
            }
            return Ok(pinned);
        }
        self.config
            .default_key_for(api)
            .map(|k| k.name.as_str())
            .ok_or(Refusal::NoKey { api })
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
    ) -> Result<(), Refusal> {
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
        self.shared
            .apple_limits
            .check(
                bundle,
                limit,
                route.environment == Environment::Sandbox,
                settings.apple_limit_fraction,
                &who.name,
                Instant::now(),
            )
            .map_err(|held| Refusal::AppleLimit {
                rate: held.rate,
                endpoint: held.endpoint,
                environment: route.environment,
                share: held.share,
                retry_after: held.retry_after,
            })
    }
}

/// Whether `path` (Maps' own, mount removed) names Maps' token endpoint however it is
/// spelled: percent-encoded, in another case, with a suffix. Apple may decode what the
/// proxy's path check lets through, so the comparison decodes too; a path that does not
/// decode (the path check refuses those first) is taken to be it.
fn is_maps_token_path(path: &str) -> bool {
    route::percent_decode(path).is_none_or(|decoded| {
        decoded
            .to_ascii_lowercase()
            .starts_with(crate::apple::MAPS_TOKEN_PATH.as_bytes())
    })
}

/// The refusal for a failed authentication: a 401 naming the check, except that an identity
/// provider without keys is a 503 and a valid identity token that is no client's a 403
/// naming its subject (DESIGN §17), whose record keeps the identity.
fn auth_refusal(e: crate::client::AuthError, ex: &mut Exchange) -> Refusal {
    use crate::client::AuthError;
    match e {
        AuthError::IdentityUnavailable { provider, why, .. } => Refusal::IdentityUnavailable {
            provider,
            source: why.into(),
        },
        AuthError::NoClientForIdentity(subject) => {
            let detail = format!(
                "the identity token of provider `{}` for subject `{}` matches no client's identity claims",
                subject.provider, subject.subject
            );
            ex.identity = Some(subject);
            Refusal::Forbidden { detail }
        }
        other => Refusal::Unauthenticated(other),
    }
}
