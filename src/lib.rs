//! apple-api-proxy: an authenticating reverse proxy in front of Apple's server APIs.
//!
//! Clients send plain requests (no Apple credential) to the proxy as they would to Apple.
//! The proxy mints an ES256 JWT for exactly that request with a key that never leaves this
//! host, and forwards it over TLS, streaming both bodies.
//!
//! # Modules, bottom to top (each imports only modules above it in this list)
//!
//! - [`apple`]: what Apple requires, as pure data (APIs, hosts, mounts, token strategies,
//!   audiences, lifetime caps, per-endpoint limits).
//! - [`config`]: `proxy.toml` → raw (serde) → validated [`config::Config`].
//! - [`forward`]: the pooled rustls client, header hygiene, streaming bodies.
//! - [`identity`]: workload identity (OIDC ID tokens): JWKS, verification, each provider's
//!   keys fetched and refreshed over `forward`'s client.
//! - [`route`]: path → the proxy's own endpoint or Apple's API, environment and upstream;
//!   path checks.
//! - [`client`]: who is calling (client secrets, client keys — an Apple SDK's own JWT —,
//!   identity tokens, mTLS) and what they may call (allow rules, rate limits, signing policy).
//! - [`token`]: `.p8` loading, the [`token::Signer`] seam, claims, scope, Apple's clock, the
//!   cache.
//! - [`audit`]: the hash-chained audit log, its single writer, redaction, `audit verify`.
//! - `metrics`: Prometheus counters and histograms with fixed label sets.
//! - `limits`: Apple's per-endpoint storekit limits enforced locally, with fair shares.
//! - `framing`: watches HTTP/1 framing under hyper to refuse request smuggling.
//! - [`diagnose`]: pure: evidence of an Apple 401/403 → ranked likely causes with fixes.
//! - [`explain`]: pure: any Apple JWT → every rule it breaks (the `explain` command).
//! - [`signing`]: the in-app signatures (promotional offers, introductory-offer eligibility,
//!   Advanced Commerce): request bodies, the `[clients.signing]` policy, Apple's formats.
//! - `tls`: the inbound rustls acceptor (and mTLS) built from config.
//! - [`proxy`]: the only module that knows the order of a request's steps, one file per
//!   phase, and the one boundary error, [`proxy::Refusal`].
//! - `runtime`: the live runtime, swapped whole on reload (SIGHUP, file change).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on their own listener, reading the live
//!   runtime.
//! - [`server`]: listeners, inbound TLS/mTLS, connection tasks, graceful shutdown, [`run`].
//!
//! The local Apple stand-in that `demo`, the tests, the soak and the benchmarks run against
//! is its own crate, `apple-standin` (`crates/apple-standin`), with the fixture that turns
//! throw-away keys into a running stand-in and a `proxy.toml`. It does not depend on this
//! crate, so its token verifier shares no code with the minter; this library does not use
//! it either (the `demo` command's wiring is in the binary, `src/demo.rs`).
//!
//! # Life of a request (see `proxy::Proxy::handle`)
//!
//! accept (`server`: the framing guard, TLS, the runtime current now) → begin (request id,
//! clock) → **admit** (shed load, authenticate, audit health, method and path checks, route,
//! policy, rate limits, key, Apple's limits, declared body size) → **mint** → **forward** (one
//! attempt; one re-mint-and-retry after a 401) → **fallback** (sandbox, where configured) →
//! **inspect** (401/403 → diagnosis; other statuses stream untouched) → **finish** (audit
//! record, metrics and one log line, exactly once, whatever happened).
//!
//! - Load is shed first and the client authenticated next, so an unauthenticated caller
//!   learns nothing about routes and every later refusal's record names the client.
//! - The path is checked before routing so that no path is ever normalised into another.
//! - Policy is checked before minting so that a denied request never costs a signature and
//!   never reaches Apple.
//! - The proxy's own endpoints (`/proxy/v1/`, DESIGN §14) pass the same admission — the
//!   same authentication, audit check, path checks, `allow` rules and rate limits — and are
//!   then answered by `proxy`'s `own` phase instead of mint and forward; an in-app signature
//!   is made only after its body and the client's `[clients.signing]` policy passed whole.
//! - The client's `Authorization` is never copied upstream; ours is the only one, so a
//!   client can never choose the credential Apple sees.
//! - `finish` rides on the response body, so the record is written when the body ends or
//!   the client goes away.
#![forbid(unsafe_code)]

pub mod admin;
pub mod apple;
pub mod audit;
pub mod client;
pub mod config;
pub mod diagnose;
pub mod exchange;
pub mod explain;
pub mod forward;
pub(crate) mod framing;
#[cfg(test)]
mod fuzz;
pub mod identity;
pub(crate) mod limits;
pub(crate) mod metrics;
pub mod proxy;
pub mod route;
pub(crate) mod runtime;
pub mod server;
pub mod signing;
pub(crate) mod tls;
pub mod token;

pub use server::run;

/// `outer: inner: innermost`, for operator logs and fetch errors (hyper's own text is often
/// only "client error").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// RFC 3339 UTC (`2026-11-22T15:21:46Z`) for UNIX seconds.
pub fn rfc3339(unix: i64) -> String {
    let mut s = String::with_capacity(20);
    push_rfc3339(&mut s, unix);
    s
}

/// RFC 3339 UTC with milliseconds (`2026-11-22T15:21:46.123Z`), for audit records. Every
/// record takes one, so the date and time of the current second are formatted once per
/// thread and second, and only the milliseconds per call.
pub fn rfc3339_millis(t: std::time::SystemTime) -> String {
    use std::cell::Cell;
    thread_local! {
        static SECOND: Cell<Option<(u64, [u8; 19])>> = const { Cell::new(None) };
    }
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let mut s = String::with_capacity(24);
    match SECOND.get() {
        Some((cached, prefix)) if cached == secs => {
            s.push_str(std::str::from_utf8(&prefix).unwrap_or_default());
        }
        _ => {
            push_rfc3339(&mut s, i64::try_from(secs).unwrap_or(i64::MAX));
            s.pop(); // the `Z`
            if let Ok(prefix) = <[u8; 19]>::try_from(s.as_bytes()) {
                SECOND.set(Some((secs, prefix)));
            }
        }
    }
    let ms = since.subsec_millis();
    s.push('.');
    for digit in [ms / 100, ms / 10 % 10, ms % 10] {
        s.push(char::from(b'0' + (digit as u8)));
    }
    s.push('Z');
    s
}

/// Writes `unix` as RFC 3339 UTC into `out`.
fn push_rfc3339(out: &mut String, unix: i64) {
    use std::fmt::Write as _;
    // Howard Hinnant's days-to-civil algorithm.
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    );
    out.push('Z');
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

/// Lower-case hex of `bytes`, appended to `out`.
pub fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_360_906), "2026-11-22T15:21:46Z");
        assert_eq!(super::rfc3339(-1), "1969-12-31T23:59:59Z");
        // In order: the same second twice (the cached date), the next second, another
        // date, and back.
        for (ms, want) in [
            (1_795_360_906_007, "2026-11-22T15:21:46.007Z"),
            (1_795_360_906_950, "2026-11-22T15:21:46.950Z"),
            (1_795_360_907_000, "2026-11-22T15:21:47.000Z"),
            (951_782_400_120, "2000-02-29T00:00:00.120Z"),
            (1_795_360_906_999, "2026-11-22T15:21:46.999Z"),
        ] {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            assert_eq!(super::rfc3339_millis(t), want);
        }
    }
}
