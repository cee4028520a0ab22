//! The proxy's own endpoints (DESIGN §14), answered here instead of mint and forward. They
//! have passed the same admission as a forwarded request (authentication, the audit check,
//! path checks, `allow` rules, rate limits) and are audited by `finish` like one.
//!
//! Today: the in-app signatures (DESIGN §15). Their order, and why:
//!
//! 1. method and declared size, before reading anything;
//! 2. the body, read whole within 64 KiB (413 beyond) and its idle and total time;
//! 3. the body parsed and checked whole (400 naming the field);
//! 4. the client's `[clients.signing]` policy, whole (403 naming the rule and the value);
//! 5. the key and the bundle id (400 if ambiguous, 403 if not the client's);
//! 6. only then a nonce and a signature — a refusal never costs one.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

use crate::apple::Api;
use crate::audit;
use crate::client::Identity;
use crate::config::KeyConfig;
use crate::forward::{self, ProxyBody};
use crate::route::Endpoint;
use crate::signing::{self, Ask, Kind};
use crate::token::SignError;

use super::{Exchange, Proxy, Refusal};

impl Proxy {
    pub(super) async fn answer_own(
        &self,
        endpoint: Endpoint,
        who: &Identity,
        parts: &Parts,
        body: Incoming,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Refusal> {
        match endpoint {
            Endpoint::Signature(kind) => self.signature(kind, who, parts, body, ex).await,
        }
    }

    async fn signature(
        &self,
        kind: Kind,
        who: &Identity,
        parts: &Parts,
        body: Incoming,
        ex: &mut Exchange,
    ) -> Result<Response<ProxyBody>, Refusal> {
        ex.signing = Some(Box::new(audit::Signing {
            kind: kind.id(),
            ..audit::Signing::default()
        }));
        if parts.method != Method::POST {
            return Err(Refusal::MethodNotAllowed { allow: "POST" });
        }
        let body = self
            .read_small_body(parts, body, signing::MAX_BODY as u64, ex)
            .await?;
        let ask = signing::input::parse(kind, &body).map_err(Refusal::BadInput)?;
        if let Some(record) = ex.signing.as_deref_mut() {
            note_ask(record, &ask);
        }
        signing::policy::check(self.clients.signing_policy(who), &ask).map_err(|denied| {
            Refusal::SigningDenied {
                client: who.name.to_string(),
                denied,
            }
        })?;
        let (key, bundle_id) = self.in_app_key(who, &ask)?;
        if let Some(record) = ex.signing.as_deref_mut() {
            record.bundle_id = Some(bundle_id.to_string());
        }
        ex.key = Some(key.name.as_str().into());
        ex.key_id = Some(key.key_id.as_str().into());

        let (signer, header_b64) = self.minter.signer(&key.name).ok_or_else(|| {
            Refusal::internal("sign", format!("key `{}` is not loaded", key.name))
        })?;
        let issuer_id = key.issuer_id.as_deref().ok_or_else(|| {
            Refusal::internal("sign", format!("key `{}` has no issuer id", key.name))
        })?;
        let nonce = signing::nonce(&ring::rand::SystemRandom::new())
            .map_err(|_| Refusal::internal("sign", "the system random number generator failed"))?;
        let apple_now_ms = self.minter.iat_millis(SystemTime::now());
        let signed = signing::sign(
            &ask,
            &signing::SigningKey {
                signer,
                header_b64,
                key_id: &key.key_id,
                issuer_id,
                bundle_id,
            },
            apple_now_ms,
            nonce,
        )
        .map_err(|e| match e {
            signing::SigningError::Sign(source @ SignError::Unavailable(_)) => {
                self.shared.metrics.signer_failure(&key.name);
                Refusal::SignerUnavailable {
                    key: key.name.clone(),
                    source: Box::new(source),
                }
            }
            e => Refusal::internal("sign", e),
        })?;
        let answer = Answer {
            issued_at: (kind != Kind::PromotionalOfferV1).then_some(signed.time),
            key_id: &key.key_id,
            nonce: &signed.nonce,
            signature: &signed.signature,
            timestamp: (kind == Kind::PromotionalOfferV1).then_some(signed.time),
        };
        let answer = serde_json::to_vec(&answer).map_err(|e| Refusal::internal("sign", e))?;
        if let Some(record) = ex.signing.as_deref_mut() {
            record.nonce = Some(signed.nonce.clone());
            record.sha256 = Some(signed.sha256.clone());
        }
        tracing::debug!(kind = kind.id(), key = %key.name, sha256 = %signed.sha256, "signed");
        let mut response = Response::new(forward::boxed(Full::new(Bytes::from(answer))));
        *response.status_mut() = StatusCode::OK;
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        // A signature is good for one purchase: no cache may keep it.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Ok(response)
    }

    /// A body the proxy reads whole (a signature request, a Sign in with Apple form):
    /// refused before reading when it declares more than `limit`, cut off when it sends
    /// more, bounded in idle and total time.
    pub(super) async fn read_small_body(
        &self,
        parts: &Parts,
        body: Incoming,
        limit: u64,
        ex: &mut Exchange,
    ) -> Result<Bytes, Refusal> {
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit) {
            return Err(Refusal::BodyTooLarge { limit });
        }
        let metered = forward::Metered::new(body, ex.received.clone(), Some(limit))
            .idle_timeout(self.config.server.body_idle_timeout)
            .without_trailers();
        let collected =
            tokio::time::timeout(self.config.server.request_timeout, metered.collect()).await;
        match collected {
            Ok(Ok(body)) => Ok(body.to_bytes()),
            _ if ex.received.bytes.load(std::sync::atomic::Ordering::Relaxed) > limit => {
                Err(Refusal::BodyTooLarge { limit })
            }
            _ => Err(Refusal::ClientDisconnected),
        }
    }

    /// The key that signs and the bundle id it signs for (DESIGN §15): the client's pinned
    /// key; else the one whose `bundle_id` is the body's (or the client's pinned bundle
    /// id); else the only one. A bundle id that is not the key's — or not the client's
    /// pinned one — is refused.
    fn in_app_key<'a>(
        &'a self,
        who: &Identity,
        ask: &Ask,
    ) -> Result<(&'a KeyConfig, &'a str), Refusal> {
        let signs = |k: &&KeyConfig| k.apis.contains(&Api::InAppSigning);
        let forbidden = |detail: String| Refusal::Forbidden { detail };
        let pinned_bundle = self.clients.pinned_bundle_id(who);
        let asked = ask.bundle_id.as_deref();
        if let (Some(asked), Some(pinned)) = (asked, pinned_bundle) {
            if asked != pinned {
                return Err(forbidden(format!(
                    "client `{}` signs for bundle id `{pinned}` only, not `{asked}`",
                    who.name
                )));
            }
        }
        let candidates: Vec<&KeyConfig> = self.config.keys.iter().filter(signs).collect();
        let key = if let Some(pinned) = self.clients.pinned_key(who) {
            *candidates.iter().find(|k| k.name == pinned).ok_or_else(|| {
                forbidden(format!(
                    "client `{}` is pinned to key `{pinned}`, which does not sign in-app signatures",
                    who.name
                ))
            })?
        } else if let Some(wanted) = asked.or(pinned_bundle) {
            match candidates
                .iter()
                .find(|k| k.bundle_id.as_deref() == Some(wanted))
            {
                Some(k) => *k,
                None if candidates.len() == 1 => candidates[0],
                None if candidates.is_empty() => {
                    return Err(Refusal::NoKey {
                        api: Api::InAppSigning,
                    })
                }
                None => {
                    return Err(forbidden(format!(
                        "no key signs in-app signatures for bundle id `{wanted}`; the keys that do are for {}",
                        choices(&candidates)
                    )))
                }
            }
        } else {
            let first = candidates.first().ok_or(Refusal::NoKey {
                api: Api::InAppSigning,
            })?;
            // Several keys for one app (a rotation) are not ambiguous: the first listed signs.
            if candidates.iter().any(|k| k.bundle_id != first.bundle_id) {
                return Err(Refusal::AmbiguousKey {
                    choices: choices(&candidates),
                });
            }
            *first
        };
        let bundle_id = pinned_bundle.or(key.bundle_id.as_deref()).ok_or_else(|| {
            Refusal::internal("sign", format!("key `{}` has no bundle id", key.name))
        })?;
        if let Some(asked) = asked {
            if asked != bundle_id {
                return Err(forbidden(format!(
                    "bundle id `{asked}` is not the one key `{}` signs for (`{bundle_id}`)",
                    key.name
                )));
            }
        }
        Ok((key, bundle_id))
    }
}

/// A signature endpoint's answer (DESIGN §15): `issued_at` for the JWS forms, `timestamp`
/// (milliseconds) for the legacy one. Keys in alphabetical order, as they always were.
#[derive(serde::Serialize)]
struct Answer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    issued_at: Option<i64>,
    key_id: &'a str,
    nonce: &'a str,
    signature: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
}

/// `com.example.a (key `a`), com.example.b (key `b`)`.
fn choices(keys: &[&KeyConfig]) -> String {
    keys.iter()
        .map(|k| {
            format!(
                "`{}` (key `{}`)",
                k.bundle_id.as_deref().unwrap_or("-"),
                k.name
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the audit record says was asked for.
fn note_ask(record: &mut audit::Signing, ask: &Ask) {
    record.bundle_id = ask.bundle_id.clone();
    record.product_id = ask.product_id.clone();
    record.offer_id = ask.offer_id.clone();
    record.transaction_id = ask.transaction_id.clone();
    record.allow_introductory_offer = ask.allow_introductory_offer;
    if let Some(commerce) = &ask.commerce {
        record.operation = Some(commerce.operation.clone());
        record.sku_count = Some(commerce.skus.len());
        record.skus = Some(
            commerce
                .skus
                .iter()
                .take(audit::Signing::MAX_SKUS)
                .map(|(_, sku)| sku.clone())
                .collect(),
        );
        record.currency = commerce.currencies.first().map(|(_, c)| c.clone());
        record.max_price = commerce.max_price();
    }
}
