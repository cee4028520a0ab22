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

use crate::apple::{Environment, KeyKind, TokenFamily};
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
        if !is_auth_failure(response.status()) {
            return body::stream_back(response, ex.diagnosis);
        }
        let (response, cause) = self.diagnosed(response, up, token, ex.retried, probe).await;
        ex.diagnosis = Some(cause);
        response
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
}
