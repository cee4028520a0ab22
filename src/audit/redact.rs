//! Redaction: path segments and query values that look like secrets (a client secret, a
//! JWT, a PEM block, a long run of base64 or hex) are replaced by [`REDACTED`] before a
//! path reaches a record or a log line. Apple's ids (numeric transaction ids, short
//! resource ids, bundle ids) are kept.

use super::REDACTED;

/// Whether a path segment or query value looks like a secret: a proxy client secret, a JWT,
/// or a long run of base64/hex (keys, signatures). Apple's ids (numeric transaction ids,
/// short resource ids, bundle ids) do not.
pub fn looks_secret(value: &str) -> bool {
    let decoded = crate::route::percent_decode(value);
    let v = match decoded.as_deref().map(std::str::from_utf8) {
        Some(Ok(v)) => v,
        _ => value,
    };
    if v.contains(crate::client::SECRET_PREFIX) || v.contains("-----BEGIN") {
        return true;
    }
    let jwt_like = v.starts_with("eyJ") && v.split('.').count() >= 2;
    let token_chars = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+' | b'/' | b'='));
    let has_letters_and_digits =
        v.bytes().any(|b| b.is_ascii_alphabetic()) && v.bytes().any(|b| b.is_ascii_digit());
    jwt_like || (v.len() >= 40 && token_chars && has_letters_and_digits)
}

/// The path with secret-looking segments replaced by [`REDACTED`].
pub fn redact_path(path: &str) -> String {
    if !path.split('/').any(looks_secret) {
        return path.to_string();
    }
    path.split('/')
        .map(|seg| if looks_secret(seg) { REDACTED } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// The raw query with secret-looking values (and names) replaced by [`REDACTED`].
pub(crate) fn redact_query(query: &str) -> String {
    // The same test as below, without building anything when nothing needs redacting.
    let pair_secret = |pair: &str| match pair.split_once('=') {
        Some((name, value)) => looks_secret(value) || looks_secret(name),
        None => looks_secret(pair),
    };
    if !query.split('&').any(pair_secret) {
        return query.to_string();
    }
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if looks_secret(value) || looks_secret(name) => format!(
                "{}={REDACTED}",
                if looks_secret(name) { REDACTED } else { name }
            ),
            None if looks_secret(pair) => REDACTED.to_string(),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}
