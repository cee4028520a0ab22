//! The stand-in's bearer-token checks: Apple's JWT rules (APPLE.md §2) written out a
//! second time, independently of the proxy's minting code.
//!
//! Owns: parsing `Authorization: Bearer <jwt>`, the ES256 signature check (RustCrypto
//! `p256`, never `ring`), the claim rules per [`Role`], and App Store Connect `scope`
//! matching. Everything here is pure: the clock is passed in as `now`.
//!
//! Imports only `super` (the stand-in's public types). The proxy's minter is out of reach:
//! this crate does not depend on apple-api-proxy, so a bug in the minter cannot be mirrored
//! here and go unnoticed.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde_json::{Map, Value};

use super::{KnownKey, KnownKeyKind, Role, VerifiedToken};

/// The only audience Apple accepts for App Store Connect and App Store Server API tokens
/// (APPLE.md §2, ASC-JWT and ASSA-JWT).
const AUDIENCE: &str = "appstoreconnect-v1";
/// Header `alg` (APPLE.md §2).
const ALGORITHM: &str = "ES256";
/// Header `typ` (APPLE.md §2).
const TOKEN_TYPE: &str = "JWT";
/// `sub` of an individual App Store Connect key (APPLE.md §2, "do require the Subject key sub").
const INDIVIDUAL_SUBJECT: &str = "user";
/// App Store Connect rejects lifetimes (`exp - iat`) over 20 minutes (APPLE.md §2).
const MAX_LIFETIME_APP_STORE_CONNECT: i128 = 20 * 60;
/// The App Store Server API rejects lifetimes over 60 minutes (APPLE.md §2, ASSA-JWT).
const MAX_LIFETIME_STOREKIT: i128 = 60 * 60;
/// Query parameters App Store Connect ignores when matching a `scope` entry (APPLE.md §2).
const SCOPE_IGNORED_PARAMS: [&[u8]; 3] = [b"limit", b"cursor", b"sort"];
/// How much of a claim value a rejection reason quotes.
const MAX_QUOTED: usize = 80;

/// Which of the three JWT segments a rejection is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Segment {
    Header,
    Payload,
    Signature,
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Segment::Header => "header",
            Segment::Payload => "payload",
            Segment::Signature => "signature",
        })
    }
}

/// Why the stand-in refused a request's token. The `Display` text is the human-readable
/// reason stored in [`super::Received::verdict`]; it never contains the token itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Rejection {
    #[error("no Authorization header")]
    MissingAuthorization,
    #[error("more than one Authorization header")]
    RepeatedAuthorization,
    #[error("Authorization header is not `Bearer <jwt>`")]
    NotBearer,
    #[error("token has {0} '.'-separated segments, expected 3")]
    SegmentCount(usize),
    #[error("{0} segment is not base64url without padding")]
    NotBase64Url(Segment),
    #[error("{0} segment is not a JSON object")]
    NotJsonObject(Segment),
    #[error("header `alg` is {found}, expected \"{ALGORITHM}\"")]
    Algorithm { found: String },
    #[error("header `typ` is {found}, expected \"{TOKEN_TYPE}\"")]
    TokenType { found: String },
    #[error("header `kid` is {found}, expected a string")]
    KeyIdShape { found: String },
    #[error("header `kid` {0:?} names no key this stand-in knows")]
    UnknownKeyId(String),
    #[error("signature is {0} bytes, expected 64 (raw r||s; DER is not accepted)")]
    SignatureLength(usize),
    #[error("signature is not a valid P-256 (r, s) pair")]
    SignatureMalformed,
    #[error("signature does not verify with the public key of `kid` {0:?}")]
    BadSignature(String),
    #[error("`aud` is {found}, expected \"{AUDIENCE}\"")]
    Audience { found: String },
    #[error("`{claim}` is {found}, expected an integer number of seconds since the epoch")]
    NotInteger { claim: &'static str, found: String },
    #[error("`iat` {iat} is {} s in the future of Apple's clock ({now})", iat - now)]
    IssuedInFuture { iat: i64, now: i64 },
    #[error("`exp` {exp} is not in the future of Apple's clock ({now}); the token has expired")]
    Expired { exp: i64, now: i64 },
    #[error("lifetime `exp - iat` is {lifetime} s, over the {max} s {role} allows")]
    LifetimeTooLong {
        lifetime: i128,
        max: i128,
        role: &'static str,
    },
    #[error(
        "key {0:?} is an In-App Purchase key; App Store Connect takes only team or individual keys"
    )]
    InAppPurchaseKeyOnAppStoreConnect(String),
    #[error("key {0} is an Apple Developer account key; App Store Connect and the App Store Server API take none")]
    DeveloperKeyOnAppStore(String),
    #[error("key {0:?} is an App Store Connect key; the App Store Server API takes only In-App Purchase keys")]
    NotInAppPurchaseKey(String),
    #[error("`iss` is {found}, expected the key's issuer ID {expected:?}")]
    Issuer { found: String, expected: String },
    #[error("`sub` is present ({found}); a team key's token must not carry `sub`")]
    SubjectOnTeamKey { found: String },
    #[error("`iss` is present ({found}); an individual key's token must not carry `iss`")]
    IssuerOnIndividualKey { found: String },
    #[error("`sub` is {found}, expected \"{INDIVIDUAL_SUBJECT}\" for an individual key")]
    Subject { found: String },
    #[error("`bid` is {found}, expected one of the key's bundle IDs {expected:?}")]
    BundleId {
        found: String,
        expected: Vec<String>,
    },
    #[error("`scope` is present; App Store Server API tokens must not carry one")]
    ScopeOnStoreKit,
    #[error("`scope` is {found}, expected an array of strings")]
    ScopeShape { found: String },
    #[error("no `scope` entry matches {method} {target}")]
    ScopeMismatch { method: String, target: String },
    #[error(
        "no `scope` entry matches {method} {target} under strict scope encoding (query bytes \
         compared without percent-decoding)"
    )]
    StrictScopeMismatch { method: String, target: String },
    #[error(
        "no `scope` entry matches {method} {target} byte for byte: strict scope encoding \
         compares query bytes without percent-decoding, and an entry matches only once `%XX` \
         escapes are decoded (e.g. `[` in the scope vs `%5B` on the wire)"
    )]
    ScopeEncodingMismatch { method: String, target: String },
}

/// How App Store Connect compares a `scope` entry's query with the request's (APPLE.md §2:
/// whether the scope must carry literal brackets or `%5B`/`%5D` is UNCONFIRMED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ScopeEncoding {
    /// `%XX` escapes are decoded on both sides first (the stand-in's default reading).
    #[default]
    Decoded,
    /// Raw bytes: `filter[platform]` in the scope does not match `filter%5Bplatform%5D`.
    Raw,
}

/// A known key that failed to load: a configuration error in the test, not a token fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyringError {
    #[error("known key {key_id:?}: public key is not a P-256 SEC1 point")]
    BadPublicKey { key_id: String },
    #[error("known key {0:?} is listed twice")]
    Duplicate(String),
}

/// The request facts a token is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestLine<'a> {
    pub role: Role,
    pub method: &'a str,
    /// The path as received, without the query.
    pub path: &'a str,
    /// The query as received (no leading `?`), if the request had one.
    pub query: Option<&'a str>,
}

struct TrustedKey {
    key: KnownKey,
    verifying: VerifyingKey,
}

/// The keys the stand-in trusts, with their public halves parsed once at start.
pub(crate) struct Keyring {
    keys: HashMap<String, TrustedKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    pub(crate) fn new(keys: Vec<KnownKey>) -> Result<Self, KeyringError> {
        let mut map = HashMap::with_capacity(keys.len());
        for key in keys {
            let verifying = VerifyingKey::from_sec1_bytes(&key.public_key).map_err(|_| {
                KeyringError::BadPublicKey {
                    key_id: key.key_id.clone(),
                }
            })?;
            let key_id = key.key_id.clone();
            if map
                .insert(key_id.clone(), TrustedKey { key, verifying })
                .is_some()
            {
                return Err(KeyringError::Duplicate(key_id));
            }
        }
        Ok(Keyring { keys: map })
    }

    /// The trusted key `key_id` and its parsed public half.
    pub(crate) fn trusted(&self, key_id: &str) -> Option<(&KnownKey, &VerifyingKey)> {
        self.keys.get(key_id).map(|t| (&t.key, &t.verifying))
    }

    /// What kind of key `key_id` is, if the stand-in knows it.
    pub(crate) fn kind(&self, key_id: &str) -> Option<&KnownKeyKind> {
        self.keys.get(key_id).map(|trusted| &trusted.key.kind)
    }

    /// Checks the request's bearer token against Apple's rules for `request.role`, with
    /// `now` (seconds since the epoch) as Apple's clock and `scope_encoding` deciding how
    /// App Store Connect `scope` queries are compared.
    pub(crate) fn check(
        &self,
        headers: &HeaderMap,
        request: &RequestLine<'_>,
        now: i64,
        scope_encoding: ScopeEncoding,
    ) -> Result<VerifiedToken, Rejection> {
        let token = bearer_token(headers)?;
        let (header_b64, payload_b64, signature_b64) = split_token(token)?;
        let header_bytes = decode_segment(header_b64, Segment::Header)?;
        let payload_bytes = decode_segment(payload_b64, Segment::Payload)?;
        let signature_bytes = decode_segment(signature_b64, Segment::Signature)?;

        let header = parse_object(&header_bytes, Segment::Header)?;
        expect_string(&header, "alg", ALGORITHM).map_err(|found| Rejection::Algorithm { found })?;
        expect_string(&header, "typ", TOKEN_TYPE)
            .map_err(|found| Rejection::TokenType { found })?;
        let key_id = match header.get("kid") {
            Some(Value::String(kid)) => kid.as_str(),
            other => {
                return Err(Rejection::KeyIdShape {
                    found: quote(other),
                })
            }
        };
        let trusted = self
            .keys
            .get(key_id)
            .ok_or_else(|| Rejection::UnknownKeyId(truncate(key_id)))?;

        // The signature is checked before any claim is believed.
        if signature_bytes.len() != 64 {
            return Err(Rejection::SignatureLength(signature_bytes.len()));
        }
        let signature =
            Signature::from_slice(&signature_bytes).map_err(|_| Rejection::SignatureMalformed)?;
        let signing_input_len = header_b64.len() + 1 + payload_b64.len();
        let signing_input = &token.as_bytes()[..signing_input_len];
        trusted
            .verifying
            .verify(signing_input, &signature)
            .map_err(|_| Rejection::BadSignature(key_id.to_owned()))?;

        let claims = parse_object(&payload_bytes, Segment::Payload)?;
        check_claims(&trusted.key, &claims, request, now, scope_encoding)?;

        Ok(VerifiedToken {
            header: Value::Object(header),
            claims: Value::Object(claims),
        })
    }
}

fn bearer_token(headers: &HeaderMap) -> Result<&str, Rejection> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(Rejection::MissingAuthorization)?;
    if values.next().is_some() {
        return Err(Rejection::RepeatedAuthorization);
    }
    let value = value.to_str().map_err(|_| Rejection::NotBearer)?;
    // RFC 9110 §11.1: the auth-scheme is case-insensitive.
    let (scheme, token) = value.split_once(' ').ok_or(Rejection::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(Rejection::NotBearer);
    }
    Ok(token)
}

fn split_token(token: &str) -> Result<(&str, &str, &str), Rejection> {
    let parts: Vec<&str> = token.split('.').collect();
    match parts.as_slice() {
        [header, payload, signature] => Ok((header, payload, signature)),
        _ => Err(Rejection::SegmentCount(parts.len())),
    }
}

fn decode_segment(segment: &str, which: Segment) -> Result<Vec<u8>, Rejection> {
    // URL_SAFE_NO_PAD rejects '=' padding, the standard alphabet's '+' and '/', and
    // non-zero trailing bits.
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| Rejection::NotBase64Url(which))
}

fn parse_object(bytes: &[u8], which: Segment) -> Result<Map<String, Value>, Rejection> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(Rejection::NotJsonObject(which)),
    }
}

/// `Ok` if `map[name]` is exactly the string `expected`; otherwise the quoted value found.
fn expect_string(map: &Map<String, Value>, name: &str, expected: &str) -> Result<(), String> {
    match map.get(name) {
        Some(Value::String(s)) if s == expected => Ok(()),
        other => Err(quote(other)),
    }
}

/// A claim value for a rejection reason: compact JSON, or `missing`, cut short.
fn quote(value: Option<&Value>) -> String {
    match value {
        None => "missing".to_owned(),
        Some(v) => truncate(&v.to_string()),
    }
}

fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

fn integer_claim(claims: &Map<String, Value>, claim: &'static str) -> Result<i64, Rejection> {
    let value = claims.get(claim);
    value
        .and_then(Value::as_i64)
        .ok_or_else(|| Rejection::NotInteger {
            claim,
            found: quote(value),
        })
}

fn check_claims(
    key: &KnownKey,
    claims: &Map<String, Value>,
    request: &RequestLine<'_>,
    now: i64,
    scope_encoding: ScopeEncoding,
) -> Result<(), Rejection> {
    expect_string(claims, "aud", AUDIENCE).map_err(|found| Rejection::Audience { found })?;

    let iat = integer_claim(claims, "iat")?;
    let exp = integer_claim(claims, "exp")?;
    // No tolerance: APPLE.md §0, App Store Connect rejects an `iat` in the future.
    if iat > now {
        return Err(Rejection::IssuedInFuture { iat, now });
    }
    if exp <= now {
        return Err(Rejection::Expired { exp, now });
    }
    let lifetime = i128::from(exp) - i128::from(iat);
    let max = match request.role {
        Role::AppStoreConnect => MAX_LIFETIME_APP_STORE_CONNECT,
        // The storekit roles (the developer-key roles never come here).
        _ => MAX_LIFETIME_STOREKIT,
    };
    if lifetime > max {
        return Err(Rejection::LifetimeTooLong {
            lifetime,
            max,
            role: request.role.as_str(),
        });
    }

    match request.role {
        Role::AppStoreConnect => check_app_store_connect(key, claims, request, scope_encoding),
        _ => check_storekit(key, claims),
    }
}

fn check_issuer(claims: &Map<String, Value>, issuer_id: &str) -> Result<(), Rejection> {
    expect_string(claims, "iss", issuer_id).map_err(|found| Rejection::Issuer {
        found,
        expected: issuer_id.to_owned(),
    })
}

fn check_app_store_connect(
    key: &KnownKey,
    claims: &Map<String, Value>,
    request: &RequestLine<'_>,
    scope_encoding: ScopeEncoding,
) -> Result<(), Rejection> {
    match &key.kind {
        KnownKeyKind::Team { issuer_id } => {
            check_issuer(claims, issuer_id)?;
            if let Some(sub) = claims.get("sub") {
                return Err(Rejection::SubjectOnTeamKey {
                    found: quote(Some(sub)),
                });
            }
        }
        KnownKeyKind::Individual => {
            if let Some(iss) = claims.get("iss") {
                return Err(Rejection::IssuerOnIndividualKey {
                    found: quote(Some(iss)),
                });
            }
            expect_string(claims, "sub", INDIVIDUAL_SUBJECT)
                .map_err(|found| Rejection::Subject { found })?;
        }
        KnownKeyKind::InAppPurchase { .. } => {
            return Err(Rejection::InAppPurchaseKeyOnAppStoreConnect(
                key.key_id.clone(),
            ));
        }
        KnownKeyKind::Developer { .. } | KnownKeyKind::BusinessManager { .. } => {
            return Err(Rejection::DeveloperKeyOnAppStore(key.key_id.clone()));
        }
    }

    let Some(scope) = claims.get("scope") else {
        return Ok(());
    };
    let entries = match scope {
        Value::Array(items) => items
            .iter()
            .map(Value::as_str)
            .collect::<Option<Vec<&str>>>(),
        _ => None,
    }
    .ok_or_else(|| Rejection::ScopeShape {
        found: quote(Some(scope)),
    })?;
    let any_matches = |encoding| {
        entries
            .iter()
            .any(|entry| scope_entry_matches(entry, request, encoding))
    };
    if any_matches(scope_encoding) {
        return Ok(());
    }
    let method = request.method.to_owned();
    let target = truncate(&match request.query {
        Some(q) => format!("{}?{q}", request.path),
        None => request.path.to_owned(),
    });
    Err(match scope_encoding {
        ScopeEncoding::Decoded => Rejection::ScopeMismatch { method, target },
        ScopeEncoding::Raw if any_matches(ScopeEncoding::Decoded) => {
            Rejection::ScopeEncodingMismatch { method, target }
        }
        ScopeEncoding::Raw => Rejection::StrictScopeMismatch { method, target },
    })
}

fn check_storekit(key: &KnownKey, claims: &Map<String, Value>) -> Result<(), Rejection> {
    let KnownKeyKind::InAppPurchase {
        issuer_id,
        bundle_ids,
    } = &key.kind
    else {
        return Err(Rejection::NotInAppPurchaseKey(key.key_id.clone()));
    };
    check_issuer(claims, issuer_id)?;
    // `bid` is case-sensitive (APPLE.md §2).
    match claims.get("bid") {
        Some(Value::String(bid)) if bundle_ids.iter().any(|b| b == bid) => {}
        other => {
            return Err(Rejection::BundleId {
                found: quote(other),
                expected: bundle_ids.clone(),
            })
        }
    }
    // APPLE.md §2 and §8: whether ASSA accepts a `scope` is unknown; the safe reading
    // is that a proxy must never send one, so the stand-in refuses it.
    if claims.contains_key("scope") {
        return Err(Rejection::ScopeOnStoreKit);
    }
    Ok(())
}

/// Does one App Store Connect scope entry, `"<METHOD> <path>[?query]"`, cover the request?
/// Method and path compare exactly; queries compare as multisets of (name, value) pairs,
/// ignoring `limit`, `cursor` and `sort` (APPLE.md §2), percent-decoded or raw as
/// `encoding` says.
fn scope_entry_matches(entry: &str, request: &RequestLine<'_>, encoding: ScopeEncoding) -> bool {
    let Some((method, target)) = entry.split_once(' ') else {
        return false;
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    method == request.method
        && path == request.path
        && query_pairs(query, encoding) == query_pairs(request.query, encoding)
}

/// The query's (name, value) pairs, percent-decoded (or raw), without the ignored names,
/// sorted so that equal multisets compare equal. `+` is left as is: only `%XX` is decoded.
fn query_pairs(query: Option<&str>, encoding: ScopeEncoding) -> Vec<(Vec<u8>, Vec<u8>)> {
    let bytes = |s: &str| match encoding {
        ScopeEncoding::Decoded => percent_decode(s),
        ScopeEncoding::Raw => s.as_bytes().to_vec(),
    };
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .unwrap_or("")
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            (bytes(name), bytes(value))
        })
        .filter(|(name, _)| !SCOPE_IGNORED_PARAMS.contains(&name.as_slice()))
        .collect();
    pairs.sort();
    pairs
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits stays literal.
fn percent_decode(s: &str) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex);
            let lo = bytes.get(i + 2).copied().and_then(hex);
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push((hi << 4) | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use p256::ecdsa::signature::Signer as _;
    use p256::ecdsa::SigningKey;
    use serde_json::json;

    // A test-only signer (RustCrypto, like the verifier; never `ring`).
    const NOW: i64 = 1_750_000_000;
    const TEAM_ISSUER: &str = "57246542-96fe-1a63-e053-0824d011072a";
    const IAP_ISSUER: &str = "69a6de70-03db-47e3-e053-5b8c7c11a4d1";
    const BUNDLE: &str = "com.example.App";

    fn signing_key(seed: u8) -> SigningKey {
        SigningKey::from_slice(&[seed; 32]).expect("a 32-byte scalar below n is a valid key")
    }

    fn public_key(key: &SigningKey) -> Vec<u8> {
        key.verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    fn keyring() -> Keyring {
        Keyring::new(vec![
            KnownKey {
                key_id: "TEAMKEY001".into(),
                public_key: public_key(&signing_key(1)),
                kind: KnownKeyKind::Team {
                    issuer_id: TEAM_ISSUER.into(),
                },
            },
            KnownKey {
                key_id: "INDIVKEY01".into(),
                public_key: public_key(&signing_key(2)),
                kind: KnownKeyKind::Individual,
            },
            KnownKey {
                key_id: "IAPKEY0001".into(),
                public_key: public_key(&signing_key(3)),
                kind: KnownKeyKind::InAppPurchase {
                    issuer_id: IAP_ISSUER.into(),
                    bundle_ids: vec![BUNDLE.into(), "com.example.Other".into()],
                },
            },
        ])
        .expect("test keys are valid and distinct")
    }

    fn b64(bytes: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn sign_with(key: &SigningKey, header: &Value, claims: &Value) -> String {
        let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let signature: Signature = key.sign(input.as_bytes());
        format!("{input}.{}", b64(signature.to_bytes()))
    }

    fn header(kid: &str) -> Value {
        json!({"alg": "ES256", "kid": kid, "typ": "JWT"})
    }

    fn team_claims() -> Value {
        json!({"iss": TEAM_ISSUER, "iat": NOW - 60, "exp": NOW + 600, "aud": "appstoreconnect-v1"})
    }

    fn individual_claims() -> Value {
        json!({"sub": "user", "iat": NOW - 60, "exp": NOW + 600, "aud": "appstoreconnect-v1"})
    }

    fn iap_claims() -> Value {
        json!({"iss": IAP_ISSUER, "iat": NOW, "exp": NOW + 300, "aud": "appstoreconnect-v1", "bid": BUNDLE})
    }

    fn team_token(edit: impl FnOnce(&mut Value)) -> String {
        let mut claims = team_claims();
        edit(&mut claims);
        sign_with(&signing_key(1), &header("TEAMKEY001"), &claims)
    }

    fn individual_token(edit: impl FnOnce(&mut Value)) -> String {
        let mut claims = individual_claims();
        edit(&mut claims);
        sign_with(&signing_key(2), &header("INDIVKEY01"), &claims)
    }

    fn iap_token(edit: impl FnOnce(&mut Value)) -> String {
        let mut claims = iap_claims();
        edit(&mut claims);
        sign_with(&signing_key(3), &header("IAPKEY0001"), &claims)
    }

    fn set(claims: &mut Value, name: &str, value: Value) {
        claims[name] = value;
    }

    fn remove(claims: &mut Value, name: &str) {
        if let Value::Object(map) = claims {
            map.remove(name);
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("tokens are ASCII"),
        );
        headers
    }

    const ASC_GET_APPS: RequestLine<'static> = RequestLine {
        role: Role::AppStoreConnect,
        method: "GET",
        path: "/v1/apps",
        query: Some("filter%5Bplatform%5D=IOS&limit=200"),
    };
    const STOREKIT_GET: RequestLine<'static> = RequestLine {
        role: Role::StoreKitProduction,
        method: "GET",
        path: "/inApps/v1/transactions/2000000123456789",
        query: None,
    };
    const SANDBOX_GET: RequestLine<'static> = RequestLine {
        role: Role::StoreKitSandbox,
        ..STOREKIT_GET
    };

    /// `None` = accepted; `Some(text)` = rejected with a reason containing `text`.
    fn run(headers: &HeaderMap, request: RequestLine<'_>, expect: Option<&str>, name: &str) {
        let outcome = keyring().check(headers, &request, NOW, ScopeEncoding::Decoded);
        match (expect, outcome) {
            (None, Ok(_)) => {}
            (None, Err(rejection)) => panic!("{name}: rejected ({rejection}), expected accepted"),
            (Some(text), Ok(_)) => {
                panic!("{name}: accepted, expected rejection mentioning {text:?}")
            }
            (Some(text), Err(rejection)) => {
                let reason = rejection.to_string();
                assert!(
                    reason.contains(text),
                    "{name}: reason {reason:?} lacks {text:?}"
                );
            }
        }
    }

    #[test]
    fn tokens_are_accepted_or_rejected_by_apples_rules() {
        let cases: Vec<(&str, String, RequestLine<'_>, Option<&str>)> = vec![
            ("good team token", team_token(|_| {}), ASC_GET_APPS, None),
            (
                "good individual token",
                individual_token(|_| {}),
                ASC_GET_APPS,
                None,
            ),
            (
                "good IAP token, production",
                iap_token(|_| {}),
                STOREKIT_GET,
                None,
            ),
            (
                "good IAP token, sandbox",
                iap_token(|_| {}),
                SANDBOX_GET,
                None,
            ),
            (
                "IAP token for the key's second bundle",
                iap_token(|c| set(c, "bid", json!("com.example.Other"))),
                STOREKIT_GET,
                None,
            ),
            (
                "team token at exactly 20 minutes",
                team_token(|c| set(c, "exp", json!(NOW - 60 + 1200))),
                ASC_GET_APPS,
                None,
            ),
            (
                "IAP token at exactly 60 minutes",
                iap_token(|c| set(c, "exp", json!(NOW + 3600))),
                STOREKIT_GET,
                None,
            ),
            (
                "iat equal to Apple's now",
                team_token(|c| set(c, "iat", json!(NOW))),
                ASC_GET_APPS,
                None,
            ),
            // Header rules.
            (
                "alg HS256",
                sign_with(
                    &signing_key(1),
                    &json!({"alg": "HS256", "kid": "TEAMKEY001", "typ": "JWT"}),
                    &team_claims(),
                ),
                ASC_GET_APPS,
                Some("`alg` is \"HS256\""),
            ),
            (
                "alg missing",
                sign_with(
                    &signing_key(1),
                    &json!({"kid": "TEAMKEY001", "typ": "JWT"}),
                    &team_claims(),
                ),
                ASC_GET_APPS,
                Some("`alg` is missing"),
            ),
            (
                "typ missing",
                sign_with(
                    &signing_key(1),
                    &json!({"alg": "ES256", "kid": "TEAMKEY001"}),
                    &team_claims(),
                ),
                ASC_GET_APPS,
                Some("`typ` is missing"),
            ),
            (
                "typ lowercase",
                sign_with(
                    &signing_key(1),
                    &json!({"alg": "ES256", "kid": "TEAMKEY001", "typ": "jwt"}),
                    &team_claims(),
                ),
                ASC_GET_APPS,
                Some("`typ` is \"jwt\""),
            ),
            (
                "kid not a string",
                sign_with(
                    &signing_key(1),
                    &json!({"alg": "ES256", "kid": 7, "typ": "JWT"}),
                    &team_claims(),
                ),
                ASC_GET_APPS,
                Some("`kid` is 7"),
            ),
            (
                "kid unknown",
                sign_with(&signing_key(1), &header("NOSUCHKEY0"), &team_claims()),
                ASC_GET_APPS,
                Some("names no key"),
            ),
            (
                "signed by another key",
                sign_with(&signing_key(2), &header("TEAMKEY001"), &team_claims()),
                ASC_GET_APPS,
                Some("does not verify"),
            ),
            // Claim rules common to both APIs.
            (
                "aud wrong",
                team_token(|c| set(c, "aud", json!("apple-developer-enterprise-v1"))),
                ASC_GET_APPS,
                Some("`aud` is"),
            ),
            (
                "aud missing",
                team_token(|c| remove(c, "aud")),
                ASC_GET_APPS,
                Some("`aud` is missing"),
            ),
            (
                "aud as array",
                team_token(|c| set(c, "aud", json!(["appstoreconnect-v1"]))),
                ASC_GET_APPS,
                Some("`aud` is ["),
            ),
            (
                "iat missing",
                team_token(|c| remove(c, "iat")),
                ASC_GET_APPS,
                Some("`iat` is missing"),
            ),
            (
                "iat a string",
                team_token(|c| set(c, "iat", json!("1750000000"))),
                ASC_GET_APPS,
                Some("`iat` is \"1750000000\""),
            ),
            (
                "iat a float",
                team_token(|c| set(c, "iat", json!(1_749_999_940.5))),
                ASC_GET_APPS,
                Some("expected an integer"),
            ),
            (
                "exp missing",
                team_token(|c| remove(c, "exp")),
                ASC_GET_APPS,
                Some("`exp` is missing"),
            ),
            (
                "iat one second in the future",
                team_token(|c| set(c, "iat", json!(NOW + 1))),
                ASC_GET_APPS,
                Some("1 s in the future"),
            ),
            (
                "exp equal to now",
                team_token(|c| set(c, "exp", json!(NOW))),
                ASC_GET_APPS,
                Some("has expired"),
            ),
            (
                "exp in the past",
                team_token(|c| set(c, "exp", json!(NOW - 1))),
                ASC_GET_APPS,
                Some("has expired"),
            ),
            (
                "team token one second over 20 minutes",
                team_token(|c| set(c, "exp", json!(NOW - 60 + 1201))),
                ASC_GET_APPS,
                Some("1201 s, over the 1200 s"),
            ),
            (
                "IAP token one second over 60 minutes",
                iap_token(|c| set(c, "exp", json!(NOW + 3601))),
                STOREKIT_GET,
                Some("3601 s, over the 3600 s"),
            ),
            (
                "an hour-long token on App Store Connect",
                team_token(|c| set(c, "exp", json!(NOW + 3000))),
                ASC_GET_APPS,
                Some("over the 1200 s"),
            ),
            (
                "extreme iat and exp do not overflow",
                team_token(|c| {
                    set(c, "iat", json!(i64::MIN));
                    set(c, "exp", json!(i64::MAX));
                }),
                ASC_GET_APPS,
                Some("over the 1200 s"),
            ),
            // App Store Connect key rules.
            (
                "team token with wrong iss",
                team_token(|c| set(c, "iss", json!(IAP_ISSUER))),
                ASC_GET_APPS,
                Some("`iss` is"),
            ),
            (
                "team token without iss",
                team_token(|c| remove(c, "iss")),
                ASC_GET_APPS,
                Some("`iss` is missing"),
            ),
            (
                "team token with sub",
                team_token(|c| set(c, "sub", json!("user"))),
                ASC_GET_APPS,
                Some("must not carry `sub`"),
            ),
            (
                "individual token with iss",
                individual_token(|c| set(c, "iss", json!(TEAM_ISSUER))),
                ASC_GET_APPS,
                Some("must not carry `iss`"),
            ),
            (
                "individual token without sub",
                individual_token(|c| remove(c, "sub")),
                ASC_GET_APPS,
                Some("`sub` is missing"),
            ),
            (
                "individual token with sub admin",
                individual_token(|c| set(c, "sub", json!("admin"))),
                ASC_GET_APPS,
                Some("`sub` is \"admin\""),
            ),
            (
                "IAP key on App Store Connect",
                iap_token(|_| {}),
                ASC_GET_APPS,
                Some("In-App Purchase key"),
            ),
            // App Store Server key rules.
            (
                "team key on App Store Server",
                team_token(|_| {}),
                STOREKIT_GET,
                Some("only In-App Purchase keys"),
            ),
            (
                "individual key on sandbox",
                individual_token(|_| {}),
                SANDBOX_GET,
                Some("only In-App Purchase keys"),
            ),
            (
                "IAP token with team issuer",
                iap_token(|c| set(c, "iss", json!(TEAM_ISSUER))),
                STOREKIT_GET,
                Some("`iss` is"),
            ),
            (
                "IAP token without bid",
                iap_token(|c| remove(c, "bid")),
                STOREKIT_GET,
                Some("`bid` is missing"),
            ),
            (
                "IAP token with unknown bid",
                iap_token(|c| set(c, "bid", json!("com.example.Nope"))),
                STOREKIT_GET,
                Some("`bid` is"),
            ),
            (
                "bid compared case-sensitively",
                iap_token(|c| set(c, "bid", json!("com.example.app"))),
                STOREKIT_GET,
                Some("`bid` is"),
            ),
            (
                "IAP token with a scope",
                iap_token(|c| set(c, "scope", json!(["GET /inApps/v1/transactions/1"]))),
                STOREKIT_GET,
                Some("must not carry one"),
            ),
            // App Store Connect scope.
            (
                "scope entry with literal brackets matches encoded request",
                team_token(|c| set(c, "scope", json!(["GET /v1/apps?filter[platform]=IOS"]))),
                ASC_GET_APPS,
                None,
            ),
            (
                "one of several scope entries matches",
                team_token(|c| {
                    set(
                        c,
                        "scope",
                        json!(["GET /v1/builds", "GET /v1/apps?filter%5Bplatform%5D=IOS"]),
                    )
                }),
                ASC_GET_APPS,
                None,
            ),
            (
                "scope method differs",
                team_token(|c| set(c, "scope", json!(["POST /v1/apps?filter[platform]=IOS"]))),
                ASC_GET_APPS,
                Some("no `scope` entry matches GET /v1/apps?filter%5Bplatform%5D=IOS&limit=200"),
            ),
            (
                "scope path differs",
                team_token(|c| set(c, "scope", json!(["GET /v1/apps/123?filter[platform]=IOS"]))),
                ASC_GET_APPS,
                Some("no `scope` entry matches"),
            ),
            (
                "scope query value differs",
                team_token(|c| set(c, "scope", json!(["GET /v1/apps?filter[platform]=MAC_OS"]))),
                ASC_GET_APPS,
                Some("no `scope` entry matches"),
            ),
            (
                "scope without the request's filter",
                team_token(|c| set(c, "scope", json!(["GET /v1/apps"]))),
                ASC_GET_APPS,
                Some("no `scope` entry matches"),
            ),
            (
                "empty scope",
                team_token(|c| set(c, "scope", json!([]))),
                ASC_GET_APPS,
                Some("no `scope` entry matches"),
            ),
            (
                "scope a string",
                team_token(|c| set(c, "scope", json!("GET /v1/apps"))),
                ASC_GET_APPS,
                Some("`scope` is \"GET /v1/apps\""),
            ),
            (
                "scope with a number",
                team_token(|c| set(c, "scope", json!(["GET /v1/apps", 1]))),
                ASC_GET_APPS,
                Some("expected an array of strings"),
            ),
        ];
        for (name, token, request, expect) in cases {
            run(&bearer(&token), request, expect, name);
        }
    }

    #[test]
    fn malformed_authorization_is_rejected_with_a_reason() {
        let good = team_token(|_| {});
        let (input, signature) = good.rsplit_once('.').expect("three segments");
        let (header_b64, _) = input.split_once('.').expect("three segments");
        let der = {
            let sig: Signature = signing_key(1).sign(input.as_bytes());
            b64(sig.to_der().as_bytes())
        };
        let padded = format!("{good}==");
        let cases: Vec<(&str, Option<String>, &str)> = vec![
            ("no header", None, "no Authorization header"),
            (
                "basic auth",
                Some("Basic dXNlcjpwYXNz".into()),
                "not `Bearer <jwt>`",
            ),
            (
                "bearer with nothing",
                Some("Bearer ".into()),
                "not `Bearer <jwt>`",
            ),
            (
                "bearer without space",
                Some(format!("Bearer{good}")),
                "not `Bearer <jwt>`",
            ),
            (
                "two segments",
                Some(format!("Bearer {input}")),
                "2 '.'-separated segments",
            ),
            (
                "four segments",
                Some(format!("Bearer {good}.x")),
                "4 '.'-separated segments",
            ),
            (
                "padded signature",
                Some(format!("Bearer {padded}")),
                "signature segment is not base64url",
            ),
            (
                "standard-alphabet header",
                Some(format!("Bearer ++++{}.{}", &header_b64[4..], "x.y")),
                "header segment is not base64url",
            ),
            (
                "header not JSON",
                Some(format!(
                    "Bearer {}.{}.{signature}",
                    b64("not json"),
                    b64("{}")
                )),
                "header segment is not a JSON object",
            ),
            (
                "header a JSON array",
                Some(format!("Bearer {}.{}.{signature}", b64("[1]"), b64("{}"))),
                "header segment is not a JSON object",
            ),
            (
                "DER signature",
                Some(format!("Bearer {input}.{der}")),
                "expected 64 (raw r||s; DER",
            ),
            (
                "all-zero signature",
                Some(format!("Bearer {input}.{}", b64([0u8; 64]))),
                "not a valid P-256",
            ),
            (
                "payload tampered after signing",
                Some(format!(
                    "Bearer {header_b64}.{}.{signature}",
                    b64({
                        let mut claims = team_claims();
                        set(&mut claims, "exp", json!(NOW + 601));
                        claims.to_string()
                    })
                )),
                "does not verify",
            ),
        ];
        for (name, authorization, expect) in cases {
            let mut headers = HeaderMap::new();
            if let Some(value) = authorization {
                headers.insert(AUTHORIZATION, HeaderValue::from_str(&value).expect("ASCII"));
            }
            run(&headers, ASC_GET_APPS, Some(expect), name);
        }

        let mut repeated = bearer(&good);
        repeated.append(AUTHORIZATION, HeaderValue::from_static("Bearer x.y.z"));
        run(
            &repeated,
            ASC_GET_APPS,
            Some("more than one"),
            "repeated header",
        );

        let mut lowercase = HeaderMap::new();
        lowercase.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("bearer {good}")).expect("ASCII"),
        );
        run(&lowercase, ASC_GET_APPS, None, "scheme is case-insensitive");

        let mut binary = HeaderMap::new();
        binary.insert(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff\xfe").expect("opaque bytes"),
        );
        run(
            &binary,
            ASC_GET_APPS,
            Some("not `Bearer <jwt>`"),
            "non-ASCII header",
        );
    }

    #[test]
    fn garbage_claims_after_a_valid_signature_are_rejected() {
        let key = signing_key(1);
        let input = format!(
            "{}.{}",
            b64(header("TEAMKEY001").to_string()),
            b64("\u{0}garbage")
        );
        let signature: Signature = key.sign(input.as_bytes());
        let token = format!("{input}.{}", b64(signature.to_bytes()));
        run(
            &bearer(&token),
            ASC_GET_APPS,
            Some("payload segment is not a JSON object"),
            "garbage payload",
        );
    }

    #[test]
    fn accepted_tokens_expose_their_header_and_claims() {
        let token = keyring()
            .check(
                &bearer(&iap_token(|_| {})),
                &STOREKIT_GET,
                NOW,
                ScopeEncoding::Decoded,
            )
            .expect("a good IAP token");
        assert_eq!(token.header["kid"], "IAPKEY0001");
        assert_eq!(token.claims["bid"], BUNDLE);
    }

    #[test]
    fn scope_queries_match_as_multisets_of_decoded_pairs() {
        let request = |query| RequestLine {
            role: Role::AppStoreConnect,
            method: "GET",
            path: "/v1/apps",
            query,
        };
        let cases: [(&str, Option<&str>, bool); 16] = [
            ("GET /v1/apps", None, true),
            ("GET /v1/apps", Some(""), true),
            ("GET /v1/apps?", None, true),
            ("GET /v1/apps?a=1&b=2", Some("b=2&a=1"), true),
            ("GET /v1/apps?a=1&a=2", Some("a=2&a=1"), true),
            ("GET /v1/apps?a=1&a=1", Some("a=1"), false),
            ("GET /v1/apps?a=1", Some("a=1&a=1"), false),
            (
                "GET /v1/apps?filter[platform]=IOS",
                Some("filter%5Bplatform%5D=IOS"),
                true,
            ),
            (
                "GET /v1/apps?filter%5bplatform%5d=IOS",
                Some("filter[platform]=IOS"),
                true,
            ),
            (
                "GET /v1/apps?fields[apps]=name,bundleId",
                Some("fields%5Bapps%5D=name%2CbundleId"),
                true,
            ),
            ("GET /v1/apps?limit=10&cursor=abc&sort=name", None, true),
            ("GET /v1/apps", Some("limit=200&sort=-name&cursor=Ag"), true),
            ("GET /v1/apps?a=1&limit=5", Some("limit=9&a=1"), true),
            ("GET /v1/apps?a", Some("a="), true),
            ("GET /v1/apps?a=%ZZ", Some("a=%ZZ"), true),
            ("get /v1/apps", None, false),
        ];
        for (entry, query, expected) in cases {
            assert_eq!(
                scope_entry_matches(entry, &request(query), ScopeEncoding::Decoded),
                expected,
                "{entry:?} vs {query:?}"
            );
        }
        assert!(
            !scope_entry_matches("GET", &request(None), ScopeEncoding::Decoded),
            "entry without a path"
        );
        assert!(
            !scope_entry_matches("GET /v1/apps/", &request(None), ScopeEncoding::Decoded),
            "paths compare exactly"
        );
        assert!(
            !scope_entry_matches("GET /v1/%61pps", &request(None), ScopeEncoding::Decoded),
            "paths are not decoded"
        );
    }

    #[test]
    fn strict_scope_encoding_compares_raw_query_bytes() {
        let request = |query| RequestLine {
            role: Role::AppStoreConnect,
            method: "GET",
            path: "/v1/apps",
            query,
        };
        let cases: [(&str, Option<&str>, bool); 9] = [
            ("GET /v1/apps", None, true),
            ("GET /v1/apps?a=1&b=2", Some("b=2&a=1"), true),
            (
                "GET /v1/apps?a=1&limit=5",
                Some("limit=9&a=1&cursor=x"),
                true,
            ),
            (
                "GET /v1/apps?filter%5Bplatform%5D=IOS",
                Some("filter%5Bplatform%5D=IOS"),
                true,
            ),
            (
                "GET /v1/apps?filter[platform]=IOS",
                Some("filter[platform]=IOS"),
                true,
            ),
            (
                "GET /v1/apps?filter[platform]=IOS",
                Some("filter%5Bplatform%5D=IOS"),
                false,
            ),
            (
                "GET /v1/apps?filter%5bplatform%5d=IOS",
                Some("filter%5Bplatform%5D=IOS"),
                false,
            ),
            (
                "GET /v1/apps?fields[apps]=name,bundleId",
                Some("fields%5Bapps%5D=name%2CbundleId"),
                false,
            ),
            ("GET /v1/apps?a=1&a=1", Some("a=1"), false),
        ];
        for (entry, query, expected) in cases {
            assert_eq!(
                scope_entry_matches(entry, &request(query), ScopeEncoding::Raw),
                expected,
                "{entry:?} vs {query:?}"
            );
        }

        let check = |scope: Value, encoding| {
            keyring().check(
                &bearer(&team_token(|c| set(c, "scope", scope))),
                &ASC_GET_APPS,
                NOW,
                encoding,
            )
        };
        let bracketed = json!(["GET /v1/apps?filter[platform]=IOS"]);
        assert!(check(bracketed.clone(), ScopeEncoding::Decoded).is_ok());
        let rejection = check(bracketed, ScopeEncoding::Raw).expect_err("strict refuses");
        assert!(matches!(rejection, Rejection::ScopeEncodingMismatch { .. }));
        assert!(rejection.to_string().contains("encoding"), "{rejection}");
        let encoded = json!(["GET /v1/apps?filter%5Bplatform%5D=IOS"]);
        assert!(check(encoded, ScopeEncoding::Raw).is_ok());
        let rejection = check(
            json!(["GET /v1/apps?filter[platform]=MAC_OS"]),
            ScopeEncoding::Raw,
        )
        .expect_err("no reading matches");
        assert!(matches!(rejection, Rejection::StrictScopeMismatch { .. }));
        assert!(
            rejection.to_string().contains("strict scope encoding"),
            "{rejection}"
        );
    }

    #[test]
    fn bad_known_keys_are_refused_at_start() {
        let bad = KnownKey {
            key_id: "BAD".into(),
            public_key: vec![4; 65],
            kind: KnownKeyKind::Individual,
        };
        assert!(matches!(
            Keyring::new(vec![bad]),
            Err(KeyringError::BadPublicKey { .. })
        ));
        let key = KnownKey {
            key_id: "DUP".into(),
            public_key: public_key(&signing_key(9)),
            kind: KnownKeyKind::Individual,
        };
        assert!(matches!(
            Keyring::new(vec![key.clone(), key]),
            Err(KeyringError::Duplicate(_))
        ));
    }
}
