//! Client keys (DESIGN §17b): the JWT an Apple SDK or APNs library signs with a key the
//! proxy issued, verified as that client's credential.
//!
//! Owns the rules, exactly as §17b gives them: the header's `kid` selects the client (the
//! caller does that); `alg` must be ES256 (`none`, HS*, RS* refused); the signature is raw
//! `r‖s` verified with the client's public key (`ring`); the token must carry `exp` or
//! `iat` — `exp`, when present, in the future and at most 1 h ahead (of `iat` when present,
//! else of now); `iat`, when present (integer or not), at most 60 s in the future and at most
//! 1 h old. The SDK's other claims (`iss`, `aud`, `bid`, `scope`, `sub`) are ignored. Pure:
//! `now` is passed in.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;

/// How far `exp` may lie ahead, and how old `iat` may be.
pub const MAX_AGE_SECS: i64 = 3600;
/// How far `iat` may lie in the future (clock skew between the SDK's host and this one).
pub const IAT_LEEWAY_SECS: i64 = 60;

/// The check a client-key JWT failed: the 401's detail names it. Never the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyCheck {
    #[error("it is not a JWT (three base64url parts, JSON header and claims)")]
    Malformed,
    #[error("its alg is not ES256 (client keys are P-256; none, HS* and RS* are refused)")]
    Algorithm,
    #[error("its signature does not verify with the client's public key")]
    Signature,
    #[error("it carries neither exp nor iat")]
    NoTime,
    #[error("exp is not a number")]
    ExpNotNumber,
    #[error("iat is not a number")]
    IatNotNumber,
    #[error("it has expired (exp is not in the future)")]
    Expired,
    #[error("exp is more than 1 h ahead (of iat, or of now without iat)")]
    TooLong,
    #[error("iat is more than 60 s in the future (check the client host's clock)")]
    IssuedInFuture,
    #[error("iat is more than 1 h old")]
    TooOld,
}

/// The `kid` of a bearer value that looks like a JWT (three dot-separated parts, a JSON
/// header with a string `kid`); `None` for anything else.
pub fn kid_of(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    if token.split('.').count() != 3 {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?;
    let header: Value = serde_json::from_slice(&bytes).ok()?;
    header.get("kid")?.as_str().map(str::to_string)
}

/// Verifies `token` with `public_key` (uncompressed SEC1 P-256) at `now` (UNIX seconds).
/// `Ok` carries the last second it stays valid, for the verified-token cache.
pub fn verify(token: &str, public_key: &[u8], now: i64) -> Result<i64, KeyCheck> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(KeyCheck::Malformed);
    };
    let json = |part: &str| -> Result<Value, KeyCheck> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .map_err(|_| KeyCheck::Malformed)?;
        match serde_json::from_slice(&bytes) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(KeyCheck::Malformed),
        }
    };
    let head = json(header)?;
    if head.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err(KeyCheck::Algorithm);
    }
    let raw = URL_SAFE_NO_PAD
        .decode(signature.trim_end_matches('='))
        .map_err(|_| KeyCheck::Signature)?;
    let signed = &token[..header.len() + 1 + claims.len()];
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, public_key)
        .verify(signed.as_bytes(), &raw)
        .map_err(|_| KeyCheck::Signature)?;
    let claims = json(claims)?;
    let number = |name: &str, err: KeyCheck| -> Result<Option<f64>, KeyCheck> {
        match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(err),
            Some(_) => Err(err),
        }
    };
    let exp = number("exp", KeyCheck::ExpNotNumber)?;
    let iat = number("iat", KeyCheck::IatNotNumber)?;
    let now_f = now as f64;
    let mut valid_until = i64::MAX;
    if let Some(iat) = iat {
        if iat > now_f + IAT_LEEWAY_SECS as f64 {
            return Err(KeyCheck::IssuedInFuture);
        }
        if iat < now_f - MAX_AGE_SECS as f64 {
            return Err(KeyCheck::TooOld);
        }
        valid_until = valid_until.min((iat + MAX_AGE_SECS as f64).floor() as i64);
    }
    match (exp, iat) {
        (None, None) => return Err(KeyCheck::NoTime),
        (Some(exp), _) if exp <= now_f => return Err(KeyCheck::Expired),
        (Some(exp), Some(iat)) if exp - iat > MAX_AGE_SECS as f64 => return Err(KeyCheck::TooLong),
        (Some(exp), None) if exp - now_f > MAX_AGE_SECS as f64 => return Err(KeyCheck::TooLong),
        (Some(exp), _) => valid_until = valid_until.min(exp.ceil() as i64 - 1),
        (None, Some(_)) => {}
    }
    Ok(valid_until)
}

/// A client key made by `apple-api-proxy client-key`: its id, the private half for the
/// client (PKCS#8 PEM, as Apple's `.p8` files are) and the public half for the config.
/// `Debug` never shows the private half.
pub struct Issued {
    pub key_id: String,
    pub private_pem: String,
    pub public_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key_id", &self.key_id)
            .field("public_pem", &self.public_pem)
            .finish_non_exhaustive()
    }
}

/// Why a client key could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot make a client key: {0}")]
pub struct IssueError(&'static str);

/// A fresh P-256 key pair and a 10-character key id of upper-case letters and digits (the
/// form of Apple's key ids, which SDKs may check).
pub fn issue() -> Result<Issued, IssueError> {
    use ring::rand::SecureRandom as _;
    use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
    const ALPHABET: &[u8; 36] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| IssueError("the system random number generator failed"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| IssueError("ring refused the key it made"))?;
    let mut key_id = String::with_capacity(10);
    while key_id.len() < 10 {
        let mut b = [0u8; 16];
        rng.fill(&mut b)
            .map_err(|_| IssueError("the system random number generator failed"))?;
        // 252 = 7 × 36: bytes above it would favour the first letters.
        for byte in b.into_iter().filter(|b| *b < 252) {
            if key_id.len() < 10 {
                key_id.push(char::from(ALPHABET[usize::from(byte % 36)]));
            }
        }
    }
    let private_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    use p256::pkcs8::EncodePublicKey as _;
    let public_pem = p256::PublicKey::from_sec1_bytes(pair.public_key().as_ref())
        .map_err(|_| IssueError("the public key is not a P-256 point"))?
        .to_public_key_pem(p256::pkcs8::LineEnding::LF)
        .map_err(|_| IssueError("cannot encode the public key"))?;
    Ok(Issued {
        key_id,
        private_pem,
        public_pem,
    })
}

#[cfg(test)]
mod tests;
