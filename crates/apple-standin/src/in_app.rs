//! StoreKit's side of the in-app signatures: what Apple checks when an app hands it a
//! promotional offer, an introductory-offer eligibility or an Advanced Commerce request
//! signed with an In-App Purchase key (APPLE.md §8), written from Apple's documented rules
//! and independently of the proxy's signing code (RustCrypto `p256`, never `ring`).
//!
//! Pure: the clock comes in as `now`. The tests of the proxy's signature endpoints verify
//! every answer here, so a bug in the proxy's formats cannot test itself green.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde_json::{Map, Value};

/// Who signed: the In-App Purchase key's public half and the identifiers Apple knows it by.
#[derive(Debug, Clone)]
pub struct SignerOf<'a> {
    /// Uncompressed SEC1 point.
    pub public_key: &'a [u8],
    pub key_id: &'a str,
    pub issuer_id: &'a str,
    pub bundle_id: &'a str,
}

/// How long after `iat` Apple still takes a signature (promotional offers: 24 hours).
const MAX_AGE_SECS: i64 = 24 * 3600;
/// How far in the future `iat` may be.
const MAX_FUTURE_SECS: i64 = 60;

/// A JWS that passed: its `aud` and its claims (for Advanced Commerce, `request` is the
/// decoded request object).
#[derive(Debug, Clone)]
pub struct Verified {
    pub aud: String,
    pub claims: Map<String, Value>,
    /// Advanced Commerce: the request the signature fixes.
    pub request: Option<Value>,
}

/// Checks one of the three JWS forms as StoreKit would. `Err` says which rule it breaks.
pub fn verify_jws(jws: &str, signer: &SignerOf<'_>, now: i64) -> Result<Verified, String> {
    let parts: Vec<&str> = jws.split('.').collect();
    let [header, payload, signature] = parts[..] else {
        return Err(format!("{} segments, not 3", parts.len()));
    };
    let header: Map<String, Value> = object(header, "header")?;
    let want_header: Map<String, Value> = [
        ("alg", Value::from("ES256")),
        ("kid", Value::from(signer.key_id)),
        ("typ", Value::from("JWT")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if header != want_header {
        return Err(format!("header is {header:?}, not alg ES256, kid, typ JWT"));
    }
    let raw = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "signature is not base64url".to_string())?;
    if raw.len() != 64 {
        return Err(format!(
            "signature is {} bytes, not raw r||s (64)",
            raw.len()
        ));
    }
    let sig = Signature::from_slice(&raw).map_err(|_| "signature is not r||s".to_string())?;
    let key = VerifyingKey::from_sec1_bytes(signer.public_key)
        .map_err(|_| "the stand-in's public key is not P-256".to_string())?;
    let signed_len = header_len(jws) + 1 + payload.len();
    key.verify(&jws.as_bytes()[..signed_len], &sig)
        .map_err(|_| "signature does not verify with the In-App Purchase key".to_string())?;

    let claims: Map<String, Value> = object(payload, "payload")?;
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    if text("iss") != Some(signer.issuer_id) {
        return Err(format!("iss is {:?}, not the issuer id", claims.get("iss")));
    }
    if text("bid") != Some(signer.bundle_id) {
        return Err(format!("bid is {:?}, not the bundle id", claims.get("bid")));
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or("iat is missing or not integer seconds")?;
    if iat > now + MAX_FUTURE_SECS {
        return Err(format!("iat {iat} is in the future (now {now})"));
    }
    if iat < now - MAX_AGE_SECS {
        return Err(format!("iat {iat} is more than 24 h old"));
    }
    for forbidden in ["exp", "scope"] {
        if claims.contains_key(forbidden) {
            return Err(format!(
                "carries `{forbidden}`, which makes the request fail"
            ));
        }
    }
    match text("nonce") {
        Some(n) if is_lowercase_uuid(n) => {}
        other => return Err(format!("nonce {other:?} is not a lowercase UUID")),
    }
    let aud = text("aud").ok_or("aud is missing")?.to_string();
    // Each form's claims, beyond the base ones, and whether each is required.
    let form: &[(&str, Kind, bool)] = match aud.as_str() {
        "promotional-offer" => &[
            ("productId", Kind::Text, true),
            ("offerIdentifier", Kind::Text, true),
            ("transactionId", Kind::Digits, false),
        ],
        "introductory-offer-eligibility" => &[
            ("productId", Kind::Text, true),
            ("allowIntroductoryOffer", Kind::Bool, true),
            ("transactionId", Kind::Digits, true),
        ],
        "advanced-commerce-api" => &[("request", Kind::Base64, true)],
        other => return Err(format!("aud `{other}` is not an in-app signature audience")),
    };
    for name in claims.keys() {
        let base = ["iss", "iat", "aud", "bid", "nonce"].contains(&name.as_str());
        if !base && !form.iter().any(|(n, _, _)| n == name) {
            return Err(format!("unexpected claim `{name}` for aud {aud}"));
        }
    }
    let mut request = None;
    for (name, kind, required) in form {
        let Some(value) = claims.get(*name) else {
            if *required {
                return Err(format!("{name} is missing"));
            }
            continue;
        };
        match (kind, value) {
            (Kind::Text, Value::String(s)) if !s.is_empty() => {}
            (Kind::Digits, Value::String(s))
                if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {}
            (Kind::Bool, Value::Bool(_)) => {}
            (Kind::Base64, Value::String(s)) => {
                let bytes = STANDARD
                    .decode(s)
                    .map_err(|_| format!("{name} is not standard base64 with padding"))?;
                let json: Value = serde_json::from_slice(&bytes)
                    .map_err(|_| format!("{name} does not decode to UTF-8 JSON"))?;
                if !json.is_object() {
                    return Err(format!("{name} does not decode to a JSON object"));
                }
                request = Some(json);
            }
            _ => return Err(format!("{name} has the wrong type: {value}")),
        }
    }
    Ok(Verified {
        aud,
        claims,
        request,
    })
}

#[derive(Clone, Copy)]
enum Kind {
    Text,
    Digits,
    Bool,
    Base64,
}

/// What the app hands StoreKit with a legacy (V1) promotional offer signature.
#[derive(Debug, Clone)]
pub struct V1Offer<'a> {
    pub product_id: &'a str,
    pub offer_id: &'a str,
    /// The app account token (or application username); empty when none.
    pub app_account_token: &'a str,
    pub nonce: &'a str,
    pub timestamp_ms: i64,
}

/// Checks a legacy promotional-offer signature as StoreKit would (APPLE.md §8.2): standard
/// base64 of an ASN.1 DER ECDSA signature over the seven values joined by U+2063.
pub fn verify_v1(
    signature_b64: &str,
    signer: &SignerOf<'_>,
    offer: &V1Offer<'_>,
    now_ms: i64,
) -> Result<(), String> {
    if !is_lowercase_uuid(offer.nonce) {
        return Err(format!("nonce {:?} is not a lowercase UUID", offer.nonce));
    }
    if offer.app_account_token != offer.app_account_token.to_lowercase() {
        return Err("the app account token is not lowercase".to_string());
    }
    if offer.timestamp_ms > now_ms + MAX_FUTURE_SECS * 1000
        || offer.timestamp_ms < now_ms - MAX_AGE_SECS * 1000
    {
        return Err(format!(
            "timestamp {} ms is not within the last 24 h (now {now_ms} ms)",
            offer.timestamp_ms
        ));
    }
    let der = STANDARD
        .decode(signature_b64)
        .map_err(|_| "signature is not standard base64".to_string())?;
    let sig = Signature::from_der(&der).map_err(|_| "signature is not ASN.1 DER".to_string())?;
    let message = [
        signer.bundle_id,
        signer.key_id,
        offer.product_id,
        offer.offer_id,
        offer.app_account_token,
        offer.nonce,
        &offer.timestamp_ms.to_string(),
    ]
    .join("\u{2063}");
    let key = VerifyingKey::from_sec1_bytes(signer.public_key)
        .map_err(|_| "the stand-in's public key is not P-256".to_string())?;
    key.verify(message.as_bytes(), &sig)
        .map_err(|_| "signature does not verify over the U+2063-separated message".to_string())
}

fn header_len(jws: &str) -> usize {
    jws.find('.').unwrap_or(jws.len())
}

fn object(segment: &str, what: &str) -> Result<Map<String, Value>, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| format!("{what} is not base64url without padding"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(format!("{what} is not a JSON object")),
    }
}

/// `8-4-4-4-12` lowercase hex.
fn is_lowercase_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| {
            g.len() == n
                && g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}
