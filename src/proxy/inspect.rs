//! Phase 5, inspect: Apple's 401/403 is diagnosed (DESIGN §7) — the client gets Apple's
//! status, Apple's `errors` unchanged (or a synthesised `NOT_AUTHORIZED` entry when Apple
//! sent no JSON), a `diagnostics` object and `X-Proxy-Diagnosis`; every other answer streams
//! back untouched. Never a token, signature or secret in a diagnosis.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::apple::{Api, Environment, KeyKind, TokenFamily};
use crate::diagnose::{self, SandboxProbe};
use crate::forward::{self, ProxyBody};
use crate::token::{self, Token};

use super::attempt::{apple_date, is_auth_failure, Upstream};
use super::body::{self, Peeked};
use super::{Exchange, Proxy, APPLE_REQUEST_ID, X_PROXY_DIAGNOSIS};

impl Proxy {
    /// `probe` is what sandbox already said of this token (the fallback asked it), if it did.
    pub(super) async fn inspect(
        &self,
        response: Response<Incoming>,
        up: &Upstream<'_>,
        token: &Token,
        probe: Option<SandboxProbe>,
        ex: &mut Exchange,
    ) -> Response<ProxyBody> {
        let status = response.status();
        // An exchange API's refusal of its access token: forgotten (and, where the request
        // could be replayed, exchanged again and retried) in `forward`; Apple's answer goes
        // back as it is, marked.
        if up.route.api.token_strategy() == crate::apple::TokenStrategy::Exchanged {
            if is_auth_failure(status) && ex.diagnosis.is_none() {
                ex.diagnosis = Some("ACCESS_TOKEN_REFUSED");
            }
            return body::stream_back(response, ex.diagnosis);
        }
        let developer = up.route.api.token_family() == TokenFamily::Developer;
        // APNs' 429 `TooManyProviderTokenUpdates` is about the token too (its other 429 is
        // the app's); the 400s and 410 are the app's business and stream back untouched.
        let apns_429 = up.route.api == Api::Apns && status == StatusCode::TOO_MANY_REQUESTS;
        if !is_auth_failure(status) && !apns_429 {
            return body::stream_back(response, ex.diagnosis);
        }
        if developer {
            return match self.diagnosed_developer(response, up, token).await {
                (response, Some(cause)) => {
                    ex.diagnosis = Some(cause);
                    response
                }
                (response, None) => response,
            };
        }
        let (response, cause) = self.diagnosed(response, up, token, ex.retried, probe).await;
        ex.diagnosis = Some(cause);
        response
    }

    /// The developer-key APIs' refusal (DESIGN §18): Apple's body as Apple sent it — APNs
    /// clients read its `reason` — with a `diagnostics` object added when it is a JSON
    /// object, and `X-Proxy-Diagnosis`. An APNs answer whose reason is not about the token
    /// goes back undiagnosed.
    async fn diagnosed_developer(
        &self,
        response: Response<Incoming>,
        up: &Upstream<'_>,
        token: &Token,
    ) -> (Response<ProxyBody>, Option<&'static str>) {
        let proxy_now = token::unix_secs(SystemTime::now());
        let status = response.status();
        let (mut head, body) = response.into_parts();
        let apple_date = apple_date(&head.headers).map(token::unix_secs);
        let raw = match body::peek(body).await {
            Peeked::Whole(bytes) => bytes,
            // Too big or too slow to be one of Apple's error bodies: Apple's, as it comes.
            other => return (body::reassemble(head, other), None),
        };
        let decoded = body::decoded(&head.headers, &raw);
        let mut json: Option<serde_json::Map<String, serde_json::Value>> = decoded
            .as_ref()
            .and_then(|b| serde_json::from_slice(b).ok());
        let reason = json
            .as_ref()
            .and_then(|j| j.get("reason"))
            .and_then(|r| r.as_str())
            .map(str::to_string);
        let api = up.route.api;
        if api == Api::Apns
            && !reason
                .as_deref()
                .is_some_and(|r| diagnose::apns_token_reason(status.as_u16(), r))
        {
            return (body::reassemble(head, Peeked::Whole(raw)), None);
        }
        if reason.as_deref() == Some("UnrelatedKeyIdInToken") {
            self.renew_apns_connection(up.key);
        }
        let key = self.minter.key_config(&token.key_name);
        let evidence = diagnose::DeveloperEvidence {
            status: status.as_u16(),
            api,
            reason: reason.as_deref(),
            key_name: &token.key_name,
            key_id: &token.key_id,
            team_id: key.and_then(|k| k.team_id.as_deref()),
            service_id: key.and_then(|k| k.service_id.as_deref()),
            claims: &token.claims,
            proxy_now,
            apple_date,
            key_last_success: self.key_last_success(&token.key_name),
            refresh_s: key.map_or(0, |k| k.apns_token_refresh.as_secs()),
        };
        let causes = diagnose::diagnose_developer(&evidence);
        let first = causes.first().map_or("UNKNOWN", |c| c.code);
        tracing::warn!(
            request_id = up.request_id,
            status = status.as_u16(),
            api = %api,
            key = %token.key_name,
            reason = reason.as_deref().unwrap_or("-"),
            diagnosis = first,
            "Apple refused the request"
        );
        let c = &token.claims;
        let diagnostics = serde_json::json!({
            "request_id": up.request_id,
            "api": api.id(),
            "environment": route_environment(up),
            "key": {"name": token.key_name, "key_id": token.key_id, "kind": key.map(|k| k.kind.id())},
            "token": {"iss": c.iss, "sub": c.sub, "iat": c.iat, "exp": c.exp},
            "clock": {
                "proxy": crate::rfc3339(proxy_now),
                "apple": apple_date.map(crate::rfc3339),
                "skew_s": apple_date.map(|a| a - proxy_now),
            },
            "key_last_success": evidence.key_last_success.map(crate::rfc3339),
            "likely_causes": causes,
        });
        let body = match json.as_mut() {
            Some(object) => {
                object.insert("diagnostics".into(), diagnostics);
                body::rewritten_as_json(&mut head);
                Bytes::from(serde_json::Value::Object(json.unwrap_or_default()).to_string())
            }
            // Not JSON (DeviceCheck answers in text): Apple's bytes unchanged.
            None => raw,
        };
        forward::clean_response_headers(&mut head.headers);
        head.headers
            .insert(X_PROXY_DIAGNOSIS, HeaderValue::from_static(first));
        let response = Response::from_parts(head, forward::boxed(Full::new(body)));
        (response, Some(first))
    }

    /// Gathers the evidence, diagnoses, and answers with Apple's errors plus `diagnostics`.
    async fn diagnosed(
        &self,
        response: Response<Incoming>,
        up: &Upstream<'_>,
        token: &Token,
        retried: bool,
        probe: Option<SandboxProbe>,
    ) -> (Response<ProxyBody>, &'static str) {
        let proxy_now = token::unix_secs(SystemTime::now());
        let status = response.status();
        let (mut head, body) = response.into_parts();
        let apple_date = apple_date(&head.headers).map(token::unix_secs);
        // Bounded, and decoded when Apple (or a CDN before it) compressed it.
        let body_bytes = match body::peek(body).await {
            Peeked::Whole(bytes) => body::decoded(&head.headers, &bytes).unwrap_or_default(),
            Peeked::Partial(..) | Peeked::Broken(_) => Bytes::new(),
        };
        let apple_json: Option<serde_json::Value> = serde_json::from_slice(&body_bytes).ok();
        let apple_errors = diagnose::apple_errors(&body_bytes);

        // Production storekit GET refused: does sandbox take the same token? (APPLE.md §0)
        let route = up.route;
        let sandbox_probe = match probe {
            Some(known) => Some(known),
            None if status == StatusCode::UNAUTHORIZED
                && route.api.token_family() == TokenFamily::StoreKit
                && route.environment == Environment::Production
                && *up.method == Method::GET =>
            {
                Some(self.probe_sandbox(up, token).await)
            }
            None => None,
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
            query: up.query(),
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
            request_id = up.request_id,
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
                "request_id": up.request_id,
                "api": route.api.id(),
                "environment": route.environment.as_str(),
                "key": {"name": token.key_name, "key_id": token.key_id, "kind": key.map(|k| k.kind.id())},
                "token": {
                    "iss": c.iss, "sub": c.sub, "iat": c.iat, "exp": c.exp,
                    "lifetime_s": c.exp.map(|exp| exp - c.iat), "aud": c.aud, "scope": c.scope, "bid": c.bid,
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
}

fn route_environment(up: &Upstream<'_>) -> &'static str {
    match (up.route.api.has_sandbox(), up.route.environment) {
        (true, Environment::Sandbox) => "development",
        _ => "production",
    }
}
