//! Pure: an OIDC ID token and a provider's key set → the verified claims, or the one check
//! that failed (DESIGN §17). `now` is passed in and is the host's clock: Apple's learned
//! offset has nothing to do with an identity provider and is never applied here.
//!
//! The rules, in the order they are checked:
//! - three base64url parts, a JSON object header and claims, at most [`MAX_TOKEN_BYTES`];
//! - `alg` is RS256 or ES256 (`none`, every HS*, and anything else refused); a header with
//!   `crit` is refused (RFC 7515 §4.1.11: extensions the proxy does not implement); what the
//!   header says about where keys live (`jku`, `x5u`, `jwk`, `x5c`) is never read;
//! - `kid` names a key of the provider's key set, whose type fits `alg` (and whose own `alg`,
//!   when the JWK states one, equals it); the signature verifies with it (`ring`);
//! - `iss` is the provider's issuer, exactly; `aud` (a string, or an array of strings)
//!   contains the provider's audience;
//! - `exp` is present and not more than [`LEEWAY_SECS`] in the past; `nbf`, when present,
//!   not more than [`LEEWAY_SECS`] in the future; `iat` is present, not more than
//!   [`LEEWAY_SECS`] in the future and not older than `max_token_age`.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};

/// Clock skew allowed on `exp`, `nbf` and a future `iat`.
pub const LEEWAY_SECS: i64 = 60;
/// Longest token considered: CI tokens are 1–2 KiB; a bound keeps decoding cheap.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A public key from a JWKS.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// RSA: big-endian modulus and exponent, leading zero bytes removed.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// P-256: uncompressed SEC1 point, 65 bytes.
    Ec(Vec<u8>),
}

impl PublicKey {
    fn kty(&self) -> &'static str {
        match self {
            PublicKey::Rsa { .. } => "RSA",
            PublicKey::Ec(_) => "EC (P-256)",
        }
    }
}

/// One JWKS key: the public key and the `alg` the JWK restricts it to, if any.
#[derive(Clone, PartialEq, Eq)]
pub struct Jwk {
    pub key: PublicKey,
    pub alg: Option<String>,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Jwk({}, alg {:?})", self.key.kty(), self.alg)
    }
}

/// A provider's keys by `kid`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySet {
    pub keys: HashMap<String, Jwk>,
    /// Keys of the document that were skipped, and why (for `check` and the log).
    pub skipped: Vec<String>,
}

impl KeySet {
    /// Reads a JWKS document (RFC 7517): RSA keys of 2048–8192 bits and P-256 EC keys with
    /// a `kid`; a key whose `use` is not `sig`, of another type or curve, or without `kid`
    /// is skipped. An error when the document is not a JWKS or holds no usable key.
    pub fn parse(json: &[u8]) -> Result<KeySet, String> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| format!("the JWKS is not JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("the JWKS has no `keys` array")?;
        let mut set = KeySet::default();
        for (i, k) in keys.iter().enumerate() {
            let kid = k.get("kid").and_then(Value::as_str);
            let label = kid.map_or_else(|| format!("keys[{i}]"), |kid| format!("kid {kid:?}"));
            match jwk(k) {
                Ok(jwk) => match kid {
                    Some(kid) if !kid.is_empty() => {
                        if set.keys.insert(kid.to_string(), jwk).is_some() {
                            set.skipped
                                .push(format!("{label}: listed twice; the last one kept"));
                        }
                    }
                    _ => set.skipped.push(format!("{label}: has no kid")),
                },
                Err(why) => set.skipped.push(format!("{label}: {why}")),
            }
        }
        if set.keys.is_empty() {
            return Err(format!(
                "the JWKS holds no usable key (RSA ≥ 2048 bits or EC P-256, with a kid){}",
                if set.skipped.is_empty() {
                    String::new()
                } else {
                    format!(": {}", set.skipped.join("; "))
                }
            ));
        }
        Ok(set)
    }

    /// Whether every key of `self` is in `newer` unchanged (a refresh that only added keys).
    pub fn kept_by(&self, newer: &KeySet) -> bool {
        self.keys
            .iter()
            .all(|(kid, k)| newer.keys.get(kid) == Some(k))
    }
}

fn jwk(k: &Value) -> Result<Jwk, String> {
    if let Some(u) = k.get("use").and_then(Value::as_str) {
        if u != "sig" {
            return Err(format!("its use is {u:?}, not \"sig\""));
        }
    }
    let b64 = |name: &str| -> Result<Vec<u8>, String> {
        let s = k
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("has no `{name}`"))?;
        URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|_| format!("its `{name}` is not base64url"))
    };
    let alg = k.get("alg").and_then(Value::as_str).map(str::to_string);
    let key = match k.get("kty").and_then(Value::as_str) {
        Some("RSA") => {
            let strip = |v: Vec<u8>| {
                let first = v.iter().position(|&b| b != 0).unwrap_or(v.len());
                v[first..].to_vec()
            };
            let (n, e) = (strip(b64("n")?), strip(b64("e")?));
            let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
            if !(2048..=8192).contains(&bits) {
                return Err(format!("an RSA key of {bits} bits (2048–8192 accepted)"));
            }
            if e.is_empty() || e.len() > 4 {
                return Err("an RSA key with an unusable exponent".into());
            }
            PublicKey::Rsa { n, e }
        }
        Some("EC") => {
            let crv = k.get("crv").and_then(Value::as_str).unwrap_or("");
            if crv != "P-256" {
                return Err(format!("an EC key on curve {crv:?} (P-256 accepted)"));
            }
            let (x, y) = (b64("x")?, b64("y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("an EC key whose x or y is not 32 bytes".into());
            }
            let mut point = Vec::with_capacity(65);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            if p256::PublicKey::from_sec1_bytes(&point).is_err() {
                return Err("an EC key whose point is not on P-256".into());
            }
            PublicKey::Ec(point)
        }
        Some(other) => return Err(format!("a key of type {other:?} (RSA and EC accepted)")),
        None => return Err("has no kty".into()),
    };
    Ok(Jwk { key, alg })
}

/// What a provider requires of its tokens.
#[derive(Clone, Debug)]
pub struct Rules<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub max_token_age_secs: i64,
}

/// A token that passed every check.
#[derive(Clone, Debug)]
pub struct Verified {
    pub kid: String,
    pub claims: Map<String, Value>,
    /// `sub`, or empty when the token has none.
    pub subject: Arc<str>,
    /// The last second (UNIX) at which this token still passes the time checks: the
    /// verified-token cache keeps it no longer.
    pub valid_until: i64,
}

/// The check a token failed: the 401's detail names it, never the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Check {
    #[error(
        "it is not a JWT (three base64url parts with a JSON header and claims, at most 16 KiB)"
    )]
    Malformed,
    #[error("its alg {0:?} is not accepted (RS256 and ES256 only; none and HS* are refused)")]
    Algorithm(String),
    #[error("its header lists `crit` extensions, which the proxy does not implement")]
    Critical,
    #[error("its header has no kid")]
    NoKid,
    #[error("its kid {0:?} is not among the provider's keys (unknown key)")]
    UnknownKey(String),
    #[error("its alg {alg} does not fit key {kid:?}, an {kty} key{restricted}")]
    KeyMismatch {
        alg: String,
        kid: String,
        kty: &'static str,
        restricted: String,
    },
    #[error("its signature does not verify with key {0:?}")]
    Signature(String),
    #[error("its iss {0:?} is not the provider's issuer")]
    Issuer(String),
    #[error("its aud does not contain the audience {0:?} (audience)")]
    Audience(String),
    #[error("it has no {0} claim (a number of UNIX seconds)")]
    MissingTime(&'static str),
    #[error("it has expired (exp is {0} s ago, beyond the 60 s leeway)")]
    Expired(i64),
    #[error("it is not valid yet (nbf is {0} s ahead, beyond the 60 s leeway)")]
    NotYetValid(i64),
    #[error("its iat is {0} s in the future, beyond the 60 s leeway (check the issuer's clock)")]
    IssuedInFuture(i64),
    #[error("it was issued {age} s ago, longer than max_token_age ({max} s)")]
    TooOld { age: i64, max: i64 },
}

impl Check {
    /// The metrics outcome label: a fixed set.
    pub fn outcome(&self) -> &'static str {
        match self {
            Check::Malformed | Check::Critical | Check::NoKid => "malformed",
            Check::Algorithm(_) | Check::KeyMismatch { .. } => "algorithm",
            Check::UnknownKey(_) => "unknown_key",
            Check::Signature(_) => "signature",
            Check::Issuer(_) => "issuer",
            Check::Audience(_) => "audience",
            Check::MissingTime(_) | Check::Expired(_) | Check::NotYetValid(_) => "expired",
            Check::IssuedInFuture(_) | Check::TooOld { .. } => "too_old",
        }
    }
}

/// A header or claim value as it may appear in an error: printable, at most 64 characters.
fn shown(s: &str) -> String {
    let mut out = printable(s, 64);
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// `s` without control characters, cut at `max` characters.
fn printable(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// The decoded parts of a compact JWS.
pub struct Parts<'a> {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    signed: &'a str,
    signature: &'a str,
}

/// Splits and decodes `token` without verifying anything.
pub fn parts(token: &str) -> Result<Parts<'_>, Check> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Check::Malformed);
    }
    let mut it = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(Check::Malformed);
    };
    let object = |part: &str| -> Result<Map<String, Value>, Check> {
        let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| Check::Malformed)?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(Check::Malformed),
        }
    };
    Ok(Parts {
        header: object(h)?,
        claims: object(c)?,
        signed: &token[..h.len() + 1 + c.len()],
        signature: s,
    })
}

/// The `iss` of a bearer value that decodes as a JWT, unverified: only to pick the
/// provider whose rules then verify it.
pub fn issuer_of(token: &str) -> Option<String> {
    let mut it = token.split('.');
    let (Some(_), Some(c), Some(_), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return None;
    };
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    let bytes = URL_SAFE_NO_PAD.decode(c).ok()?;
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

/// Verifies `token` against `keys` and `rules` at `now` (UNIX seconds, the host's clock).
pub fn verify(token: &str, keys: &KeySet, rules: &Rules<'_>, now: i64) -> Result<Verified, Check> {
    let p = parts(token)?;
    let alg = match p.header.get("alg") {
        Some(Value::String(a)) => a.as_str(),
        Some(other) => return Err(Check::Algorithm(shown(&other.to_string()))),
        None => return Err(Check::Algorithm("(none given)".into())),
    };
    if alg != "RS256" && alg != "ES256" {
        return Err(Check::Algorithm(shown(alg)));
    }
    if p.header.contains_key("crit") {
        return Err(Check::Critical);
    }
    let kid = p
        .header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(Check::NoKid)?;
    let jwk = keys
        .keys
        .get(kid)
        .ok_or_else(|| Check::UnknownKey(shown(kid)))?;
    let fits = matches!(
        (&jwk.key, alg),
        (PublicKey::Rsa { .. }, "RS256") | (PublicKey::Ec(_), "ES256")
    ) && jwk.alg.as_deref().is_none_or(|a| a == alg);
    if !fits {
        return Err(Check::KeyMismatch {
            alg: alg.to_string(),
            kid: shown(kid),
            kty: jwk.key.kty(),
            restricted: jwk
                .alg
                .as_deref()
                .map(|a| format!(" restricted to {}", shown(a)))
                .unwrap_or_default(),
        });
    }
    let signature = URL_SAFE_NO_PAD
        .decode(p.signature)
        .map_err(|_| Check::Malformed)?;
    let message = p.signed.as_bytes();
    use ring::signature as sig;
    let ok = match &jwk.key {
        PublicKey::Rsa { n, e } => sig::RsaPublicKeyComponents { n, e }
            .verify(&sig::RSA_PKCS1_2048_8192_SHA256, message, &signature)
            .is_ok(),
        PublicKey::Ec(point) => {
            signature.len() == 64
                && sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, &signature)
                    .is_ok()
        }
    };
    if !ok {
        return Err(Check::Signature(shown(kid)));
    }

    let claims = p.claims;
    match claims.get("iss").and_then(Value::as_str) {
        Some(iss) if iss == rules.issuer => {}
        other => return Err(Check::Issuer(shown(other.unwrap_or("")))),
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == rules.audience,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(rules.audience)),
        _ => false,
    };
    if !audience_ok {
        return Err(Check::Audience(shown(rules.audience)));
    }
    let time = |name: &'static str| -> Result<Option<i64>, Check> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .map(|f| Some(f.floor() as i64))
                .ok_or(Check::MissingTime(name)),
        }
    };
    let exp = time("exp")?.ok_or(Check::MissingTime("exp"))?;
    if now > exp.saturating_add(LEEWAY_SECS) {
        return Err(Check::Expired(now.saturating_sub(exp)));
    }
    if let Some(nbf) = time("nbf")? {
        if nbf > now.saturating_add(LEEWAY_SECS) {
            return Err(Check::NotYetValid(nbf.saturating_sub(now)));
        }
    }
    let iat = time("iat")?.ok_or(Check::MissingTime("iat"))?;
    if iat > now.saturating_add(LEEWAY_SECS) {
        return Err(Check::IssuedInFuture(iat.saturating_sub(now)));
    }
    let age = now.saturating_sub(iat);
    if age > rules.max_token_age_secs {
        return Err(Check::TooOld {
            age,
            max: rules.max_token_age_secs,
        });
    }
    // `sub` as the audit record and a 403 show it: printable, at most 256 characters.
    let subject: Arc<str> = Arc::from(
        claims
            .get("sub")
            .and_then(Value::as_str)
            .map(|s| printable(s, 256))
            .unwrap_or_default()
            .as_str(),
    );
    Ok(Verified {
        kid: kid.to_string(),
        valid_until: exp
            .saturating_add(LEEWAY_SECS)
            .min(iat.saturating_add(rules.max_token_age_secs)),
        claims,
        subject,
    })
}

#[cfg(test)]
mod tests {
    //! Tokens signed with RustCrypto's p256, verified with ring: the two share no code.
    use super::*;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::{Signature, SigningKey};
    use serde_json::json;

    const ISS: &str = "https://token.actions.githubusercontent.com";
    const NOW: i64 = 1_800_000_000;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).unwrap()
    }

    fn jwk_of(k: &SigningKey) -> Value {
        let point = k.verifying_key().to_encoded_point(false);
        json!({"kty": "EC", "crv": "P-256", "use": "sig", "kid": "ec1",
               "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
               "y": URL_SAFE_NO_PAD.encode(point.y().unwrap())})
    }

    fn keys() -> KeySet {
        let rsa_n = URL_SAFE_NO_PAD.encode([0xC5u8; 256]);
        let doc = json!({"keys": [
            jwk_of(&key(1)),
            {"kty": "RSA", "kid": "rsa1", "n": rsa_n, "e": "AQAB", "alg": "RS256"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "short", "n": URL_SAFE_NO_PAD.encode([0xC5u8; 128]), "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "use": "enc", "kid": "enc", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        ]});
        KeySet::parse(doc.to_string().as_bytes()).unwrap()
    }

    fn sign(k: &SigningKey, header: Value, claims: Value) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig: Signature = k.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    fn claims() -> Value {
        json!({"iss": ISS, "aud": "apple-api-proxy", "sub": "repo:example/app:ref:refs/heads/main",
               "repository": "example/app", "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 300})
    }

    fn rules() -> Rules<'static> {
        Rules {
            issuer: ISS,
            audience: "apple-api-proxy",
            max_token_age_secs: 3600,
        }
    }

    fn check(header: Value, claims: Value) -> Result<Verified, Check> {
        verify(&sign(&key(1), header, claims), &keys(), &rules(), NOW)
    }

    fn es256() -> Value {
        json!({"alg": "ES256", "kid": "ec1", "typ": "JWT"})
    }

    fn with(mut v: Value, k: &str, x: Value) -> Value {
        v[k] = x;
        v
    }

    #[test]
    fn jwks_keeps_rsa_and_p256_signing_keys_and_says_why_it_skipped_the_rest() {
        let set = keys();
        let mut kids: Vec<&str> = set.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["ec1", "rsa1"]);
        let skipped = set.skipped.join("\n");
        for why in ["P-384", "1024 bits", "\"enc\"", "\"oct\""] {
            assert!(skipped.contains(why), "{why}: {skipped}");
        }
        assert!(KeySet::parse(br#"{"keys": []}"#)
            .unwrap_err()
            .contains("no usable key"));
        assert!(KeySet::parse(b"<html>").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn a_valid_token_verifies_with_its_subject_and_a_bounded_cache_lifetime() {
        let v = check(es256(), claims()).unwrap();
        assert_eq!(&*v.subject, "repo:example/app:ref:refs/heads/main");
        assert_eq!(v.kid, "ec1");
        assert_eq!(v.valid_until, NOW + 300 + LEEWAY_SECS);
        assert_eq!(v.claims["repository"], "example/app");
        // aud as an array containing the audience; a header's jku/x5u/jwk are never read.
        let header = with(
            with(es256(), "jku", json!("https://evil.example/jwks")),
            "x5u",
            json!("https://evil.example/c"),
        );
        let v = check(
            header,
            with(claims(), "aud", json!(["other", "apple-api-proxy"])),
        )
        .unwrap();
        assert_eq!(v.kid, "ec1");
        // Kept in the cache no longer than max_token_age allows.
        let mut r = rules();
        r.max_token_age_secs = 100;
        let t = sign(&key(1), es256(), claims());
        assert_eq!(
            verify(&t, &keys(), &r, NOW).unwrap().valid_until,
            NOW - 10 + 100
        );
    }

    #[test]
    fn none_hs256_and_an_alg_that_does_not_fit_the_key_are_refused() {
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": "ec1"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        assert_eq!(
            verify(&unsigned, &keys(), &rules(), NOW).unwrap_err(),
            Check::Algorithm("none".into())
        );
        // HS256 "keyed with the public key": refused by alg before any key is looked at.
        let hs = check(json!({"alg": "HS256", "kid": "rsa1"}), claims()).unwrap_err();
        assert_eq!(hs, Check::Algorithm("HS256".into()));
        assert_eq!(hs.outcome(), "algorithm");
        assert!(hs.to_string().contains("HS256"));
        // ES256 pointed at the RSA key, RS256 at the EC key.
        assert!(matches!(
            check(json!({"alg": "ES256", "kid": "rsa1"}), claims()),
            Err(Check::KeyMismatch { .. })
        ));
        assert!(matches!(
            check(json!({"alg": "RS256", "kid": "ec1"}), claims()),
            Err(Check::KeyMismatch { .. })
        ));
        assert_eq!(
            check(with(es256(), "crit", json!(["exp"])), claims()).unwrap_err(),
            Check::Critical
        );
        assert_eq!(
            check(json!({"alg": "ES256"}), claims()).unwrap_err(),
            Check::NoKid
        );
    }

    #[test]
    fn unknown_keys_and_signatures_by_another_key_are_refused() {
        assert_eq!(
            check(with(es256(), "kid", json!("rotated")), claims()).unwrap_err(),
            Check::UnknownKey("rotated".into())
        );
        // Another issuer's key under a colliding kid: the signature fails.
        let forged = sign(&key(2), es256(), claims());
        assert_eq!(
            verify(&forged, &keys(), &rules(), NOW).unwrap_err(),
            Check::Signature("ec1".into())
        );
        // Claims changed after signing.
        let t = sign(&key(1), es256(), claims());
        let mut parts: Vec<&str> = t.split('.').collect();
        let other =
            URL_SAFE_NO_PAD.encode(with(claims(), "repository", json!("evil/app")).to_string());
        parts[1] = &other;
        assert!(matches!(
            verify(&parts.join("."), &keys(), &rules(), NOW),
            Err(Check::Signature(_))
        ));
        for bad in ["", "a.b", "a.b.c.d", "!!.!!.!!"] {
            assert_eq!(
                verify(bad, &keys(), &rules(), NOW).unwrap_err(),
                Check::Malformed
            );
        }
    }

    #[test]
    fn issuer_audience_and_every_time_rule_with_its_leeway() {
        let cases = [
            (
                with(claims(), "iss", json!("https://gitlab.com")),
                Check::Issuer("https://gitlab.com".into()),
            ),
            (
                with(claims(), "aud", json!("sts.amazonaws.com")),
                Check::Audience("apple-api-proxy".into()),
            ),
            (
                with(claims(), "aud", json!(["a", "b"])),
                Check::Audience("apple-api-proxy".into()),
            ),
            (with(claims(), "exp", json!(NOW - 61)), Check::Expired(61)),
            (
                with(claims(), "nbf", json!(NOW + 61)),
                Check::NotYetValid(61),
            ),
            (
                with(claims(), "iat", json!(NOW + 61)),
                Check::IssuedInFuture(61),
            ),
            (
                with(claims(), "iat", json!(NOW - 3601)),
                Check::TooOld {
                    age: 3601,
                    max: 3600,
                },
            ),
            (
                with(claims(), "exp", Value::Null),
                Check::MissingTime("exp"),
            ),
        ];
        for (c, want) in cases {
            assert_eq!(check(es256(), c.clone()).unwrap_err(), want, "{c}");
        }
        let mut no_iat = claims();
        no_iat.as_object_mut().unwrap().remove("iat");
        assert_eq!(
            check(es256(), no_iat).unwrap_err(),
            Check::MissingTime("iat")
        );
        // Within the leeway.
        for c in [
            with(claims(), "exp", json!(NOW - 60)),
            with(claims(), "nbf", json!(NOW + 60)),
            with(claims(), "iat", json!(NOW + 60)),
            with(claims(), "iat", json!(NOW - 3600)),
        ] {
            assert!(check(es256(), c.clone()).is_ok(), "{c}");
        }
    }

    #[test]
    fn the_issuer_is_read_unverified_only_from_a_jwt_shape() {
        let t = sign(&key(1), es256(), claims());
        assert_eq!(issuer_of(&t).as_deref(), Some(ISS));
        assert_eq!(issuer_of("aap_secret"), None);
        assert_eq!(issuer_of("a.b"), None);
    }
}
