//! `apple-api-proxy explain`: decode any App Store Connect or storekit JWT and list every
//! Apple rule it breaks — no key needed. Pure: token text and `now` in, [`Report`] out.
//!
//! The rules are APPLE.md §2's, checked from the token alone — or, for the three in-app
//! signature forms (promotional offer, introductory-offer eligibility, Advanced Commerce;
//! recognised by their `aud`), APPLE.md §8's. With a key's public half (from `--config`) the
//! signature is verified and `kid`/`iss` are compared with the configured key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;

use base64::engine::general_purpose::STANDARD;

use crate::apple::{self, Api, SignatureKind, TokenFamily};

/// Resources whose GET-only scopes may have long-lived (up to 6 months) tokens (APPLE.md §2,
/// INFERENCE mapping to path resources).
const LONG_LIVED_RESOURCES: [&str; 15] = [
    "ciBuildActions",
    "ciBuildRuns",
    "scmGitReferences",
    "ciIssues",
    "ciMacOsVersions",
    "ciProducts",
    "scmProviders",
    "perfPowerMetrics",
    "diagnosticSignatures",
    "scmPullRequests",
    "scmRepositories",
    "ciTestResults",
    "ciWorkflows",
    "ciXcodeVersions",
    "logs",
];

/// Six months, the longest any App Store Connect token may live (APPLE.md §2).
const LONG_LIVED_MAX_S: i64 = 180 * 24 * 3600;

/// What `explain` found.
#[derive(Debug, Default)]
pub struct Report {
    pub header: Value,
    pub claims: Value,
    /// The API family the claims point to, and why.
    pub api: Option<(TokenFamily, &'static str)>,
    /// The in-app signature form, when `aud` names one (then `api` is `None`).
    pub in_app: Option<SignatureKind>,
    /// Every rule broken, as sentences.
    pub problems: Vec<String>,
    /// Facts worth saying that break no rule.
    pub notes: Vec<String>,
}

/// Decodes and checks `token` at `now` (UNIX seconds).
pub fn explain(token: &str, now: i64) -> Report {
    let mut r = Report::default();
    let token = token.trim().trim_start_matches("Bearer ").trim();
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        r.problems.push(format!(
            "a JWT has 3 dot-separated parts; this has {}",
            parts.len()
        ));
        return r;
    }
    let decode = |s: &str, what: &str, problems: &mut Vec<String>| -> Option<Vec<u8>> {
        match URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')) {
            Ok(b) => {
                if s.ends_with('=') || s.contains(['+', '/']) {
                    problems.push(format!(
                        "the {what} is not base64url without padding (JWS requires it)"
                    ));
                }
                Some(b)
            }
            Err(_) => {
                problems.push(format!("the {what} is not base64url"));
                None
            }
        }
    };
    let header = decode(parts[0], "header", &mut r.problems)
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let claims = decode(parts[1], "payload", &mut r.problems)
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let signature = decode(parts[2], "signature", &mut r.problems);
    let (Some(header), Some(claims)) = (header, claims) else {
        r.problems.push("the header or payload is not JSON".into());
        return r;
    };

    check_header(&header, &mut r.problems);
    if let Some(sig) = &signature {
        match sig.len() {
            64 => {}
            70..=72 if sig.first() == Some(&0x30) => r.problems.push(
                "the signature is DER-encoded (ASN.1); ES256 JWTs need the raw 64-byte r||s form (RFC 7518 §3.4). openssl dgst and Node's default produce DER".into(),
            ),
            n => r.problems.push(format!("the signature is {n} bytes; ES256 needs exactly 64 (r||s)")),
        }
    }

    let in_app = claims
        .get("aud")
        .and_then(Value::as_str)
        .and_then(SignatureKind::from_audience);
    if let Some(kind) = in_app {
        r.in_app = Some(kind);
        check_in_app(&claims, kind, now, &mut r);
        r.header = header;
        r.claims = claims;
        return r;
    }
    // No `aud` and an `iss` shaped like a Team ID: an Apple Developer key's token (APNs and
    // its kin, WeatherKit, Music; APPLE.md §9).
    let developer = claims.get("aud").is_none()
        && claims
            .get("iss")
            .and_then(Value::as_str)
            .is_some_and(apple::is_plausible_key_id);
    if developer {
        // Apple's examples for these APIs carry no `typ`.
        r.problems.retain(|p| !p.starts_with("header has no typ"));
        check_developer(&header, &claims, now, &mut r);
        r.header = header;
        r.claims = claims;
        return r;
    }
    let family = if claims.get("bid").is_some() {
        Some((
            TokenFamily::StoreKit,
            "it has a `bid` claim: App Store Server / Advanced Commerce / External Purchase",
        ))
    } else if claims.get("scope").is_some() || claims.get("sub").is_some() {
        Some((
            TokenFamily::Connect,
            "it has a `scope` or `sub` claim and no `bid`: App Store Connect / Notary",
        ))
    } else if claims.get("iss").is_some() {
        Some((TokenFamily::Connect, "it has `iss` and no `bid`: App Store Connect / Notary (a storekit token would need `bid`)"))
    } else {
        None
    };
    r.api = family;
    check_claims(&claims, family.map(|f| f.0), now, &mut r);
    r.header = header;
    r.claims = claims;
    r
}

/// The developer-key APIs' token rules (APPLE.md §9): APNs, DeviceCheck and App Attest take
/// `{iss, iat}` only, under an hour old; WeatherKit adds `exp` (≤ 1 h), `sub` and the header's
/// `id`; Apple Music adds `exp` (≤ 15,777,000 s).
fn check_developer(header: &Value, claims: &Value, now: i64, r: &mut Report) {
    let p = &mut r.problems;
    let names: Vec<&str> = claims
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let iat = claims.get("iat").and_then(Value::as_i64);
    let exp = claims.get("exp").and_then(Value::as_i64);
    let weatherkit = header.get("id").is_some() || claims.get("sub").is_some();
    let (what, allowed): (&'static str, &[&str]) = match (exp, weatherkit) {
        (None, _) => (
            "it has no aud, no exp and a Team ID as iss: an APNs / DeviceCheck / App Attest provider token",
            &["iss", "iat"],
        ),
        (Some(_), true) => (
            "it has a Team ID as iss, exp and sub (or an id header): a WeatherKit token",
            &["iss", "iat", "exp", "sub"],
        ),
        (Some(_), false) => (
            "it has a Team ID as iss and exp, no aud: an Apple Music developer token",
            &["iss", "iat", "exp", "origin"],
        ),
    };
    r.api = Some((TokenFamily::Developer, what));
    for extra in names.iter().filter(|n| !allowed.contains(n)) {
        p.push(format!(
            "claim `{extra}` is not one Apple lists for this token"
        ));
    }
    match iat {
        None => p.push("no iat claim; Apple requires it".into()),
        Some(iat) if iat > now => p.push(format!(
            "iat is {} s in the future; Apple rejects tokens issued in the future (check this host's clock)",
            iat - now
        )),
        Some(iat) if exp.is_none() && now - iat >= 3600 => p.push(format!(
            "iat is {} s old; APNs refuses provider tokens older than an hour (403 ExpiredProviderToken)",
            now - iat
        )),
        Some(_) => {}
    }
    if let (Some(iat), Some(exp)) = (iat, exp) {
        let max = if weatherkit { 3600 } else { 15_777_000 };
        if exp <= now {
            p.push(format!("the token expired {} s ago", now - exp));
        }
        if exp - iat > max {
            p.push(format!(
                "exp - iat is {} s; {} allows at most {max} s",
                exp - iat,
                if weatherkit {
                    "the proxy's safe reading of WeatherKit"
                } else {
                    "Apple Music"
                }
            ));
        }
    }
    if weatherkit {
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
        let want = format!("{iss}.{sub}");
        if header.get("id").and_then(Value::as_str) != Some(want.as_str()) {
            p.push(format!(
                "WeatherKit needs the header's id to be \"<team id>.<service id>\" (\"{want}\")"
            ));
        }
    }
}

fn check_header(header: &Value, problems: &mut Vec<String>) {
    match header.get("alg").and_then(Value::as_str) {
        Some("ES256") => {}
        Some(other) => problems.push(format!(
            "header alg is \"{other}\"; Apple requires \"ES256\""
        )),
        None => problems.push("header has no alg; Apple requires \"ES256\"".into()),
    }
    match header.get("kid").and_then(Value::as_str) {
        Some(kid) if apple::is_plausible_key_id(kid) => {}
        Some(kid) => problems.push(format!(
            "header kid \"{kid}\" is not a Key ID like Apple's (10 upper-case letters/digits)"
        )),
        None => problems.push("header has no kid; it must be the Key ID of the signing key".into()),
    }
    match header.get("typ").and_then(Value::as_str) {
        Some("JWT") => {}
        Some(other) => problems.push(format!(
            "header typ is \"{other}\"; Apple's documentation says \"JWT\""
        )),
        None => problems.push("header has no typ; Apple's documentation says \"JWT\"".into()),
    }
}

fn check_claims(claims: &Value, family: Option<TokenFamily>, now: i64, r: &mut Report) {
    let p = &mut r.problems;
    match claims.get("aud").and_then(Value::as_str) {
        Some(apple::AUDIENCE) => {}
        Some("apple-developer-enterprise-v1") => p.push("aud is the Enterprise Program API's (\"apple-developer-enterprise-v1\"); App Store Connect and the storekit APIs need \"appstoreconnect-v1\"".into()),
        Some(other) => p.push(format!("aud is \"{other}\"; Apple requires \"appstoreconnect-v1\"")),
        None => p.push("no aud claim; Apple requires \"appstoreconnect-v1\"".into()),
    }
    let iat = claims.get("iat").and_then(Value::as_i64);
    let exp = claims.get("exp").and_then(Value::as_i64);
    match iat {
        None => p.push("no iat claim (App Store Connect requires it; always send it)".into()),
        Some(iat) if iat > now => p.push(format!("iat is {} s in the future; Apple rejects tokens issued in the future (check this host's clock)", iat - now)),
        Some(_) => {}
    }
    match exp {
        None => p.push("no exp claim; Apple requires one".into()),
        Some(exp) if exp <= now => p.push(format!("the token expired {} s ago", now - exp)),
        Some(_) => {}
    }
    let iss = claims.get("iss").and_then(Value::as_str);
    let sub = claims.get("sub").and_then(Value::as_str);
    if let Some(iss) = iss {
        if !apple::is_plausible_issuer_id(iss) {
            p.push(format!("iss \"{iss}\" is not an Issuer ID (a UUID)"));
        }
    }
    let scope = claims.get("scope");
    match family {
        // Not inferred from claims: explain tells only the App Store families apart.
        Some(TokenFamily::Developer | TokenFamily::AccountManager) => {}
        Some(TokenFamily::StoreKit) => {
            if iss.is_none() {
                p.push("no iss; storekit tokens need your Issuer ID".into());
            }
            if sub.is_some() {
                p.push("sub is set; storekit tokens use iss (In-App Purchase keys have no individual form)".into());
            }
            if claims
                .get("bid")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                p.push("bid is empty or not a string; it must be the app's bundle id".into());
            }
            if scope.is_some() {
                p.push("scope is set; the storekit APIs document no scope claim (whether Apple ignores or rejects it is unconfirmed — leave it out)".into());
            }
            if let (Some(iat), Some(exp)) = (iat, exp) {
                let max = apple::STOREKIT_MAX_LIFETIME.as_secs() as i64;
                if exp - iat > max {
                    p.push(format!("lifetime exp − iat is {} s; the storekit APIs reject more than {max} s (60 min)", exp - iat));
                }
            }
        }
        Some(TokenFamily::Connect) => {
            match (iss, sub) {
                (Some(_), Some("user")) => p.push("both iss and sub:\"user\"; team keys send iss only, individual keys sub:\"user\" only".into()),
                (None, Some("user")) => r.notes.push("individual key (sub:\"user\", no iss)".into()),
                (_, Some(other)) => p.push(format!("sub is \"{other}\"; the only value Apple accepts is \"user\" (individual keys)")),
                (Some(_), None) => r.notes.push("team key (iss, no sub)".into()),
                (None, None) => p.push("neither iss (team key) nor sub:\"user\" (individual key)".into()),
            }
            let entries = check_scope(scope, p);
            if let (Some(iat), Some(exp)) = (iat, exp) {
                let lifetime = exp - iat;
                let max = apple::CONNECT_MAX_LIFETIME.as_secs() as i64;
                if lifetime > max {
                    let mut why = Vec::new();
                    if entries.is_empty() {
                        why.push("it has no scope".to_string());
                    }
                    for e in &entries {
                        let (method, path) = e.split_once(' ').unwrap_or((e, ""));
                        if method != "GET" {
                            why.push(format!("scope entry \"{e}\" is not GET"));
                        } else if !long_lived_path(path) {
                            why.push(format!("scope entry \"{e}\" names a resource that may not have long-lived tokens"));
                        }
                    }
                    if lifetime > LONG_LIVED_MAX_S {
                        why.push("it is longer than 6 months".into());
                    }
                    if !why.is_empty() {
                        p.push(format!(
                            "lifetime exp − iat is {lifetime} s; App Store Connect rejects more than {max} s (20 min) unless the token is a long-lived one, and {}",
                            why.join("; ")
                        ));
                    } else {
                        r.notes.push(format!("long-lived token ({lifetime} s): allowed for GET scopes on Xcode Cloud / metrics resources"));
                    }
                }
            }
        }
        None => p.push("the claims fit no Apple API: no iss, sub or bid".into()),
    }
}

/// The rules of APPLE.md §8.1 for the three in-app JWS forms.
fn check_in_app(claims: &Value, kind: SignatureKind, now: i64, r: &mut Report) {
    let p = &mut r.problems;
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    match text("iss") {
        Some(iss) if apple::is_plausible_issuer_id(iss) => {}
        Some(iss) => p.push(format!(
            "iss \"{iss}\" is not an Issuer ID (a UUID, 8-4-4-4-12); Apple's own JSON examples spell it one hyphen short — copy it from App Store Connect"
        )),
        None => p.push("no iss; in-app signatures carry your Issuer ID".into()),
    }
    match claims.get("iat") {
        Some(Value::Number(n)) if n.is_i64() => {
            let iat = n.as_i64().unwrap_or_default();
            if iat > 1_000_000_000_000 {
                p.push("iat looks like milliseconds; it is UNIX seconds (the legacy signature's timestamp is the one in milliseconds)".into());
            } else if iat > now {
                p.push(format!("iat is {} s in the future; Apple derives the signature's expiry from iat, and a future iat is refused (check this host's clock)", iat - now));
            } else if now - iat > 24 * 3600 {
                r.notes.push(format!("issued {} h ago; Apple derives the expiry from iat (the legacy signature is good for 24 h; the JWS window is not documented)", (now - iat) / 3600));
            }
        }
        Some(_) => p.push("iat is not integer UNIX seconds".into()),
        None => p.push("no iat claim; Apple derives the signature's expiry from it".into()),
    }
    if claims.get("exp").is_some() {
        p.push("exp is set; Apple says including it makes the request fail (the expiry is derived from iat)".into());
    }
    if claims.get("scope").is_some() {
        p.push("scope is set; in-app signatures take none".into());
    }
    if text("bid").is_none_or(str::is_empty) {
        p.push("bid is missing or empty; it must be the app's bundle id".into());
    }
    match text("nonce") {
        Some(n) if apple::is_uuid(n) => {
            if n != n.to_lowercase() {
                r.notes.push("nonce is upper-case; whether Apple minds for the JWS forms is unverified, but the legacy signature needs lower case — emit lower case".into());
            }
        }
        Some(n) => p.push(format!(
            "nonce \"{n}\" is not a UUID; Apple wants a new UUID for every signature"
        )),
        None => p.push("no nonce; Apple wants a new UUID for every signature".into()),
    }
    let p = &mut r.problems;
    let required_text = |name: &str, p: &mut Vec<String>| match claims.get(name) {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(_) => p.push(format!("{name} must be a non-empty string")),
        None => p.push(format!("no {name}; the {} form requires it", kind.id())),
    };
    let transaction_id = |required: bool, p: &mut Vec<String>, notes: &mut Vec<String>| {
        match claims.get("transactionId") {
            Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {}
            Some(Value::String(s)) if apple::is_uuid(s) => p.push("transactionId is a UUID; it is Apple's numeric transaction id (or the appTransactionID), not an appAccountToken".into()),
            Some(_) => p.push("transactionId must be Apple's transaction id as a string of digits".into()),
            None if required => p.push("no transactionId; the introductory-offer eligibility form requires it".into()),
            None => notes.push("no transactionId; Apple recommends one (any of the customer's transactions, or the appTransactionID), and Retention Messaging's V2 offers require the originalTransactionId".into()),
        }
    };
    let extra: &[&str] = match kind {
        SignatureKind::PromotionalOffer => {
            required_text("productId", p);
            required_text("offerIdentifier", p);
            transaction_id(false, p, &mut r.notes);
            &["productId", "offerIdentifier", "transactionId"]
        }
        SignatureKind::IntroductoryOfferEligibility => {
            required_text("productId", p);
            match claims.get("allowIntroductoryOffer") {
                Some(Value::Bool(_)) => {}
                Some(_) => p.push("allowIntroductoryOffer must be true or false (a JSON boolean)".into()),
                None => p.push("no allowIntroductoryOffer; the introductory-offer eligibility form requires it".into()),
            }
            transaction_id(true, p, &mut r.notes);
            &["productId", "allowIntroductoryOffer", "transactionId"]
        }
        SignatureKind::AdvancedCommerce => {
            match claims.get("request") {
                Some(Value::String(s)) => match STANDARD.decode(s) {
                    Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                        Ok(Value::Object(request)) => {
                            if !request.contains_key("operation") {
                                p.push("the decoded request has no operation".into());
                            }
                        }
                        _ => p.push("request does not decode to a UTF-8 JSON object".into()),
                    },
                    Err(_) if URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).is_ok() => p.push(
                        "request is base64url; Apple wants standard base64 (+/ and = padding) of the request's UTF-8 JSON".into(),
                    ),
                    Err(_) => p.push("request is not standard base64".into()),
                },
                Some(Value::Object(_)) => p.push("request is a JSON object; it must be the standard base64 of the request's UTF-8 JSON".into()),
                Some(_) => p.push("request must be the standard base64 of the request's UTF-8 JSON".into()),
                None => p.push("no request; the Advanced Commerce form carries the request object, base64-encoded".into()),
            }
            &["request"]
        }
        // The legacy form is not a JWS; `from_audience` never yields it.
        SignatureKind::PromotionalOfferV1 => &[],
    };
    if let Some(map) = claims.as_object() {
        for name in map.keys() {
            let known = ["iss", "iat", "aud", "bid", "nonce", "exp", "scope"]
                .contains(&name.as_str())
                || extra.contains(&name.as_str());
            if !known {
                r.notes.push(format!(
                    "claim `{name}` is not one of the {} form's",
                    kind.id()
                ));
            }
        }
    }
}

/// Checks `scope` is an array of `"METHOD /path[?query]"` strings; returns the entries.
fn check_scope(scope: Option<&Value>, p: &mut Vec<String>) -> Vec<String> {
    let Some(scope) = scope else {
        return Vec::new();
    };
    let Some(items) = scope.as_array() else {
        p.push("scope is not an array of strings".into());
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        match item.as_str() {
            Some(s) => match s.split_once(' ') {
                Some((m, path))
                    if m.bytes().all(|b| b.is_ascii_uppercase()) && path.starts_with('/') =>
                {
                    out.push(s.to_string())
                }
                _ => p.push(format!(
                    "scope entry \"{s}\" is not \"METHOD /path[?query]\""
                )),
            },
            None => p.push("scope holds a non-string entry".into()),
        }
    }
    if items.is_empty() {
        p.push("scope is an empty array; leave it out for an unscoped token".into());
    }
    out
}

fn long_lived_path(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    path.split('/')
        .any(|seg| LONG_LIVED_RESOURCES.contains(&seg))
}

/// Whether the token's ES256 signature verifies with `public_key` (uncompressed SEC1).
pub fn signature_verifies(token: &str, public_key: &[u8]) -> bool {
    let token = token.trim().trim_start_matches("Bearer ").trim();
    let Some((signed, sig)) = token.rsplit_once('.') else {
        return false;
    };
    let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
        return false;
    };
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, public_key)
        .verify(signed.as_bytes(), &sig)
        .is_ok()
}

/// The APIs a family covers, for the report's first line.
pub fn family_apis(family: TokenFamily) -> Vec<&'static str> {
    Api::FORWARDED
        .iter()
        .filter(|a| a.token_family() == family)
        .map(|a| a.id())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn jwt(header: Value, claims: Value, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    fn good_header() -> Value {
        serde_json::json!({"alg": "ES256", "kid": "2X9R4HXF34", "typ": "JWT"})
    }

    #[test]
    fn developer_tokens_are_judged_by_their_own_apis_rules() {
        let jwt = |header: Value, claims: Value| {
            let b = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
            format!(
                "{}.{}.{}",
                b(&header),
                b(&claims),
                URL_SAFE_NO_PAD.encode([1u8; 64])
            )
        };
        let apns = explain(
            &jwt(
                serde_json::json!({"alg": "ES256", "kid": "ABC123DEFG"}),
                serde_json::json!({"iss": "DEF123GHIJ", "iat": NOW - 60}),
            ),
            NOW,
        );
        assert_eq!(apns.api.map(|a| a.0), Some(TokenFamily::Developer));
        assert!(apns.problems.is_empty(), "{:?}", apns.problems);
        let stale = explain(
            &jwt(
                serde_json::json!({"alg": "ES256", "kid": "ABC123DEFG"}),
                serde_json::json!({"iss": "DEF123GHIJ", "iat": NOW - 4000, "scope": "x"}),
            ),
            NOW,
        );
        let said = stale.problems.join("\n");
        assert!(
            said.contains("ExpiredProviderToken") && said.contains("`scope`"),
            "{said}"
        );
        let weather = explain(
            &jwt(
                serde_json::json!({"alg": "ES256", "kid": "ABC123DEFG", "id": "DEF123GHIJ.com.example.wk"}),
                serde_json::json!({"iss": "DEF123GHIJ", "iat": NOW - 60, "exp": NOW + 7200, "sub": "com.example.other"}),
            ),
            NOW,
        );
        let said = weather.problems.join("\n");
        assert!(
            said.contains("at most 3600") && said.contains("DEF123GHIJ.com.example.other"),
            "{said}"
        );
    }

    #[test]
    fn a_good_token_breaks_nothing() {
        let t = jwt(
            good_header(),
            serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW - 60, "exp": NOW + 240, "aud": "appstoreconnect-v1", "scope": ["GET /v1/apps"]}),
            &[1; 64],
        );
        let r = explain(&t, NOW);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.api.unwrap().0, TokenFamily::Connect);
        let t = jwt(
            good_header(),
            serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 300, "aud": "appstoreconnect-v1", "bid": "com.x"}),
            &[1; 64],
        );
        let r = explain(&format!("Bearer {t}"), NOW);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.api.unwrap().0, TokenFamily::StoreKit);
    }

    /// Apple's three example payloads (APPLE.md §8.1), with the issuer id spelt as a UUID
    /// and Apple's example `iat`.
    fn apple_in_app_examples() -> Vec<(SignatureKind, Value)> {
        let request = STANDARD.encode(r#"{"operation":"CREATE_ONE_TIME_CHARGE","version":"1"}"#);
        vec![
            (
                SignatureKind::PromotionalOffer,
                serde_json::json!({"iss":"57246542-96fe-1a63-e053-0824d011072a","iat":1741043663,"aud":"promotional-offer","bid":"com.example.testbundleid","nonce":"368f3088-dcd5-11ef-b3c8-325096b39f46","productId":"com.example.product","offerIdentifier":"com.example.product.offer","transactionId":"1000011859217"}),
            ),
            (
                SignatureKind::IntroductoryOfferEligibility,
                serde_json::json!({"iss":"57246542-96fe-1a63-e053-0824d011072a","iat":1741043663,"aud":"introductory-offer-eligibility","bid":"com.example.testbundleid","nonce":"cfb43594-4f92-4fe2-8b06-d947a848adaa","productId":"com.example.product","allowIntroductoryOffer":false,"transactionId":"1000011859217"}),
            ),
            (
                SignatureKind::AdvancedCommerce,
                serde_json::json!({"iss":"57246542-96fe-1a63-e053-0824d011072a","iat":1741043663,"aud":"advanced-commerce-api","bid":"com.example.testbundleid","nonce":"df2b8374-95a1-425b-a6a5-77a4d7648333","request":request}),
            ),
        ]
    }

    #[test]
    fn apples_in_app_examples_are_recognised_and_break_nothing() {
        for (kind, claims) in apple_in_app_examples() {
            let r = explain(&jwt(good_header(), claims, &[1; 64]), 1_741_043_700);
            assert_eq!(r.in_app, Some(kind));
            assert!(r.api.is_none());
            assert!(r.problems.is_empty(), "{kind}: {:?}", r.problems);
        }
    }

    #[test]
    fn every_in_app_rule_broken_is_named() {
        let now = 1_741_043_700;
        let base = apple_in_app_examples();
        let with = |i: usize, edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
            let mut claims = base[i].1.clone();
            edit(claims.as_object_mut().unwrap());
            explain(&jwt(good_header(), claims, &[1; 64]), now)
                .problems
                .join(" | ")
        };
        type Edit = Box<dyn Fn(&mut serde_json::Map<String, Value>)>;
        let cases: Vec<(usize, Edit, &str)> = vec![
            (
                0,
                Box::new(move |c| {
                    c.insert("exp".into(), (now + 60).into());
                }),
                "exp is set",
            ),
            (
                0,
                Box::new(move |c| {
                    c.insert("scope".into(), serde_json::json!(["x"]));
                }),
                "scope is set",
            ),
            // Apple's JSON examples' one-hyphen-short issuer id.
            (
                0,
                Box::new(move |c| {
                    c.insert("iss".into(), "57246542-96fe-1a63e053-0824d011072a".into());
                }),
                "one hyphen short",
            ),
            (
                0,
                Box::new(move |c| {
                    c.insert("iat".into(), (now + 600).into());
                }),
                "in the future",
            ),
            (
                0,
                Box::new(move |c| {
                    c.insert("iat".into(), (now * 1000).into());
                }),
                "milliseconds",
            ),
            (
                0,
                Box::new(move |c| {
                    c.remove("iat");
                }),
                "no iat",
            ),
            (
                0,
                Box::new(move |c| {
                    c.insert("nonce".into(), "abc".into());
                }),
                "not a UUID",
            ),
            (
                0,
                Box::new(move |c| {
                    c.remove("offerIdentifier");
                }),
                "no offerIdentifier",
            ),
            (
                0,
                Box::new(move |c| {
                    c.insert(
                        "transactionId".into(),
                        "368f3088-dcd5-11ef-b3c8-325096b39f46".into(),
                    );
                }),
                "not an appAccountToken",
            ),
            (
                0,
                Box::new(move |c| {
                    c.insert("bid".into(), "".into());
                }),
                "bid is missing or empty",
            ),
            (
                1,
                Box::new(move |c| {
                    c.insert("allowIntroductoryOffer".into(), "false".into());
                }),
                "JSON boolean",
            ),
            (
                1,
                Box::new(move |c| {
                    c.remove("transactionId");
                }),
                "requires it",
            ),
            (
                2,
                Box::new(move |c| {
                    c.insert(
                        "request".into(),
                        URL_SAFE_NO_PAD
                            .encode(r#"{"operation":"X","k":"??>>"}"#)
                            .into(),
                    );
                }),
                "base64url",
            ),
            (
                2,
                Box::new(move |c| {
                    c.insert("request".into(), serde_json::json!({"operation":"X"}));
                }),
                "is a JSON object",
            ),
            (
                2,
                Box::new(move |c| {
                    c.insert("request".into(), STANDARD.encode("[1]").into());
                }),
                "JSON object",
            ),
            (
                2,
                Box::new(move |c| {
                    c.remove("request");
                }),
                "no request",
            ),
        ];
        for (i, edit, want) in cases {
            let problems = with(i, &*edit);
            assert!(problems.contains(want), "{want}: {problems}");
        }
        // An uppercase nonce or a missing promotional transactionId is a note, not a rule.
        let mut claims = base[0].1.clone();
        claims["nonce"] = "368F3088-DCD5-11EF-B3C8-325096B39F46".into();
        claims.as_object_mut().unwrap().remove("transactionId");
        let r = explain(&jwt(good_header(), claims, &[1; 64]), now);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.notes.len(), 2, "{:?}", r.notes);
        // A DER signature and a wrong header are named for in-app forms too.
        let r = explain(
            &jwt(
                serde_json::json!({"alg":"HS256","kid":"2X9R4HXF34"}),
                base[0].1.clone(),
                &[0x30; 70],
            ),
            now,
        );
        let all = r.problems.join(" | ");
        assert!(
            all.contains("DER") && all.contains("HS256") && all.contains("typ"),
            "{all}"
        );
    }

    #[test]
    fn every_rule_broken_is_named() {
        let mut der = vec![0x30, 0x45];
        der.extend([7u8; 69]);
        let cases: Vec<(Value, Value, Vec<u8>, &str)> = vec![
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 3600, "aud": "appstoreconnect-v1"}),
                vec![1; 64],
                "20 min",
            ),
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW + 100, "exp": NOW + 300, "aud": "appstoreconnect-v1"}),
                vec![1; 64],
                "future",
            ),
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "exp": NOW + 300, "aud": "appstoreconnect-v1"}),
                vec![1; 64],
                "no iat",
            ),
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 300, "aud": "apple-developer-enterprise-v1"}),
                vec![1; 64],
                "Enterprise",
            ),
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "sub": "user", "iat": NOW, "exp": NOW + 300, "aud": "appstoreconnect-v1"}),
                vec![1; 64],
                "both iss and sub",
            ),
            (
                good_header(),
                serde_json::json!({"sub": "me", "iat": NOW, "exp": NOW + 300, "aud": "appstoreconnect-v1"}),
                vec![1; 64],
                "only value",
            ),
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 300, "aud": "appstoreconnect-v1", "bid": ""}),
                vec![1; 64],
                "bid is empty",
            ),
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 86400, "aud": "appstoreconnect-v1", "scope": ["POST /v1/ciBuildRuns"]}),
                vec![1; 64],
                "is not GET",
            ),
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 86400, "aud": "appstoreconnect-v1", "scope": ["GET /v1/apps"]}),
                vec![1; 64],
                "may not have long-lived",
            ),
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 300, "aud": "appstoreconnect-v1"}),
                der,
                "DER",
            ),
            (
                serde_json::json!({"alg": "RS256", "kid": "x"}),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 300, "aud": "appstoreconnect-v1"}),
                vec![1; 64],
                "RS256",
            ),
            (
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 7200, "aud": "appstoreconnect-v1", "bid": "com.x"}),
                vec![1; 64],
                "60 min",
            ),
        ];
        for (header, claims, sig, want) in cases {
            let r = explain(&jwt(header, claims.clone(), &sig), NOW);
            assert!(
                r.problems.iter().any(|p| p.contains(want)),
                "{want}: {claims} → {:?}",
                r.problems
            );
        }
        let r = explain(
            &jwt(
                good_header(),
                serde_json::json!({"iss": "57246542-96fe-1a63-e053-0824d011072a", "iat": NOW, "exp": NOW + 86400, "aud": "appstoreconnect-v1", "scope": ["GET /v1/ciBuildRuns/1"]}),
                &[1; 64],
            ),
            NOW,
        );
        assert!(
            r.problems.is_empty(),
            "long-lived CI token is fine: {:?}",
            r.problems
        );
    }

    #[test]
    fn garbage_is_explained_not_panicked_on() {
        for t in [
            "",
            "a.b",
            "a.b.c",
            "...",
            "e30.e30.",
            "Bearer x.y.z",
            "é.é.é",
        ] {
            let r = explain(t, NOW);
            assert!(!r.problems.is_empty(), "{t}");
        }
    }
}
