//! The in-app signatures (DESIGN §15, APPLE.md §8): what an app's server used to sign with
//! the In-App Purchase key so StoreKit can carry it to Apple — promotional offers (the JWS
//! form and the legacy V1 signature), introductory-offer eligibility, and Advanced Commerce
//! in-app requests. The proxy signs instead, under the client's `[clients.signing]` policy.
//!
//! Owns the request bodies ([`input`]: every field checked, 400 naming the field), the
//! policy ([`policy`]: default deny, 403 naming the rule and the value), and the output
//! formats (here: Apple's JOSE header and claims, the lowercase UUID v4 nonce, the V1
//! message). Pure apart from the random nonce: the time comes in as `apple_now`, the key as a
//! [`Signer`], and nothing here knows about HTTP or the audit log. Imports `apple`, `config`
//! and `token` (the signer); `proxy` calls it from its own-endpoint phase.
//!
//! Order, and why: the body is parsed whole and checked whole, then the policy is checked
//! whole, and only then is anything signed — nothing is ever signed on a partial check.

pub mod input;
pub mod policy;

use std::fmt;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::Serialize;

use crate::token::{SignError, Signer};

pub use input::{Ask, InputError, MAX_BODY};
pub use policy::Denied;

pub use crate::apple::{is_uuid, SignatureKind as Kind, V1_SEPARATOR};

/// The key that signs, and what the signature names: its Apple key id, the issuer, and
/// the bundle id (`bid`, or the V1 message's `appBundleId`).
pub struct SigningKey<'a> {
    pub signer: &'a dyn Signer,
    /// base64url of `{"alg":"ES256","kid":<key_id>,"typ":"JWT"}` ([`jose_header`]).
    pub header_b64: &'a str,
    pub key_id: &'a str,
    pub issuer_id: &'a str,
    pub bundle_id: &'a str,
}

/// A signature made: the answer's fields, and its fingerprint for the audit record.
/// `Debug` never shows the signature.
pub struct Signed {
    /// The compact JWS, or (V1) standard base64 of the DER signature.
    pub signature: String,
    pub nonce: String,
    /// JWS kinds: `iat` (seconds); V1: the message's `timestamp` (milliseconds).
    pub time: i64,
    /// Hex SHA-256 of `signature`.
    pub sha256: String,
}

impl fmt::Debug for Signed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("nonce", &self.nonce)
            .field("time", &self.time)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// Why a signature could not be made after the checks passed.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot encode the claims")]
    Encode,
    #[error("signing")]
    Sign(#[source] SignError),
}

/// The claims of the three JWS forms, in Apple's order (APPLE.md §8.1). Never `exp`, never
/// `scope`.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: i64,
    aud: &'static str,
    bid: &'a str,
    nonce: &'a str,
    #[serde(rename = "productId", skip_serializing_if = "Option::is_none")]
    product_id: Option<&'a str>,
    #[serde(rename = "offerIdentifier", skip_serializing_if = "Option::is_none")]
    offer_identifier: Option<&'a str>,
    #[serde(
        rename = "allowIntroductoryOffer",
        skip_serializing_if = "Option::is_none"
    )]
    allow_introductory_offer: Option<bool>,
    #[serde(rename = "transactionId", skip_serializing_if = "Option::is_none")]
    transaction_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<String>,
}

/// Signs `ask` (already parsed and allowed) with `key`. `apple_now_ms` is Apple's clock in
/// milliseconds, already back-dated by the leeway; `nonce` a fresh lowercase UUID v4.
pub fn sign(
    ask: &Ask,
    key: &SigningKey<'_>,
    apple_now_ms: i64,
    nonce: String,
) -> Result<Signed, SigningError> {
    let signature = match ask.kind.audience() {
        Some(aud) => {
            let iat = apple_now_ms.div_euclid(1000);
            let claims = Claims {
                iss: key.issuer_id,
                iat,
                aud,
                bid: key.bundle_id,
                nonce: &nonce,
                product_id: ask.product_id.as_deref(),
                offer_identifier: ask.offer_id.as_deref(),
                allow_introductory_offer: ask.allow_introductory_offer,
                transaction_id: ask.transaction_id.as_deref(),
                request: ask
                    .request_json
                    .as_deref()
                    .map(|json| STANDARD.encode(json)),
            };
            let payload = serde_json::to_vec(&claims).map_err(|_| SigningError::Encode)?;
            let mut jws =
                String::with_capacity(key.header_b64.len() + payload.len().div_ceil(3) * 4 + 90);
            jws.push_str(key.header_b64);
            jws.push('.');
            URL_SAFE_NO_PAD.encode_string(payload, &mut jws);
            let raw = key
                .signer
                .sign(jws.as_bytes())
                .map_err(SigningError::Sign)?;
            jws.push('.');
            URL_SAFE_NO_PAD.encode_string(raw, &mut jws);
            return Ok(finished(jws, nonce, iat));
        }
        None => {
            let message = v1_message(
                key.bundle_id,
                key.key_id,
                ask.product_id.as_deref().unwrap_or_default(),
                ask.offer_id.as_deref().unwrap_or_default(),
                ask.app_account_token.as_deref().unwrap_or_default(),
                &nonce,
                apple_now_ms,
            );
            let der = key
                .signer
                .sign_der(message.as_bytes())
                .map_err(SigningError::Sign)?;
            STANDARD.encode(der)
        }
    };
    Ok(finished(signature, nonce, apple_now_ms))
}

/// base64url of the JOSE header every in-app JWS carries: `{"alg":"ES256","kid":…,"typ":"JWT"}`.
pub fn jose_header(key_id: &str) -> String {
    let header = serde_json::json!({"alg": "ES256", "kid": key_id, "typ": "JWT"});
    URL_SAFE_NO_PAD.encode(header.to_string())
}

fn finished(signature: String, nonce: String, time: i64) -> Signed {
    let sha256 = crate::hex(&crate::sha256(signature.as_bytes()));
    Signed {
        signature,
        nonce,
        time,
        sha256,
    }
}

/// The legacy V1 message (APPLE.md §8.2): seven values joined by U+2063, the fifth
/// (`appAccountToken`) and the nonce lower-cased, the timestamp in milliseconds.
pub fn v1_message(
    bundle_id: &str,
    key_id: &str,
    product_id: &str,
    offer_id: &str,
    app_account_token: &str,
    nonce: &str,
    timestamp_ms: i64,
) -> String {
    let token = app_account_token.to_lowercase();
    let nonce = nonce.to_lowercase();
    let timestamp = timestamp_ms.to_string();
    let parts = [
        bundle_id, key_id, product_id, offer_id, &token, &nonce, &timestamp,
    ];
    let mut message = String::with_capacity(parts.iter().map(|p| p.len() + 3).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            message.push(V1_SEPARATOR);
        }
        message.push_str(part);
    }
    message
}

/// A fresh lowercase UUID v4 (RFC 9562 §5.4) from `rng`.
pub fn nonce(rng: &dyn ring::rand::SecureRandom) -> Result<String, ring::error::Unspecified> {
    let mut b = [0u8; 16];
    rng.fill(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex = crate::hex(&b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

#[cfg(test)]
mod tests;
