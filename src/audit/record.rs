//! The record: one request as the security team reads it (each field documented here and in
//! the README), and the line it becomes — the record spliced between the chain's `version`
//! and `seq` and its `prev_sha256`.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Serialize;

use super::VERSION;

/// What happened to a request, for the reviewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Sent to Apple (whatever Apple answered).
    Forwarded,
    /// An in-app signature was made and returned (DESIGN §15); the record's `signing`
    /// says what was signed.
    Signed,
    /// Refused by policy, limits or input checks.
    Denied,
    /// No valid client credential.
    Unauthenticated,
    /// No API under the path (or no key for it).
    NoRoute,
    /// The proxy or Apple failed (unreachable, timeout, internal).
    Error,
}

impl Decision {
    /// The record's (and the metrics label's) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Forwarded => "forwarded",
            Decision::Signed => "signed",
            Decision::Denied => "denied",
            Decision::Unauthenticated => "unauthenticated",
            Decision::NoRoute => "no_route",
            Decision::Error => "error",
        }
    }
}

/// One request, as the security team reads it. Field order is the line's order.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    /// RFC 3339 UTC with milliseconds, when the response ended.
    pub time: String,
    pub request_id: Arc<str>,
    /// The client's configured name; `null` when unauthenticated.
    pub client: Option<Arc<str>>,
    /// `secret`, `client_key`, `oidc`, `mtls`, `anonymous`, or `none`.
    pub client_auth: &'static str,
    /// Identity tokens only (absent on every other record, DESIGN §17): the provider and
    /// the token's `sub` — also when it matched no client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Arc<crate::client::OidcSubject>>,
    pub client_addr: Arc<str>,
    pub method: Cow<'static, str>,
    /// The path as the client sent it, secret-looking segments redacted.
    pub path: String,
    /// The raw query without `?`, secret-looking values redacted; `null` when absent.
    pub query: Option<String>,
    pub api: Option<&'static str>,
    pub environment: Option<&'static str>,
    /// The configured key name that signed, and its Apple key id.
    pub key: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    /// Hex SHA-256 of the compact JWT sent to Apple (the last one, after a retry).
    pub token_sha256: Option<Arc<str>>,
    pub decision: Decision,
    /// The status the client got.
    pub status: u16,
    /// Apple's status, when Apple answered.
    pub upstream_status: Option<u16>,
    /// The first likely cause when Apple refused (or the note on a retried success).
    pub diagnosis: Option<&'static str>,
    /// Whether the proxy re-minted and retried after Apple's 401.
    pub retried: bool,
    /// How many times the connection to Apple failed before anything was sent and the
    /// (body-less, idempotent) request was sent again.
    pub connect_retries: u32,
    /// Whether sandbox answered a production request (sandbox fallback); `environment`
    /// then says `sandbox`.
    pub sandbox_fallback: bool,
    /// Apple's `x-apple-request-uuid`.
    pub apple_request_id: Option<String>,
    /// Apple's `X-Rate-Limit` `user-hour-rem`.
    pub rate_limit_remaining: Option<u64>,
    /// Request body bytes read from the client, and response body bytes sent to it.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
    /// Whether the response body was sent to the end (false: the client went away).
    pub completed: bool,
    /// The proxy's error kind when it answered itself.
    pub error: Option<&'static str>,
    /// Requests to the in-app signature endpoints only (absent on every other record):
    /// what was asked to be signed and, when signed, the nonce and the signature's SHA-256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing: Option<Box<Signing>>,
}

/// What an in-app signature request asked for (DESIGN §15), as far as its body parsed. Never
/// the signature: `sha256` is the hex SHA-256 of the returned `signature` string.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Signing {
    /// `promotional-offer`, `introductory-offer-eligibility`, `advanced-commerce`,
    /// `promotional-offer-v1`.
    pub kind: &'static str,
    /// The `bid` signed (or the V1 message's bundle id).
    pub bundle_id: Option<String>,
    pub product_id: Option<String>,
    pub offer_id: Option<String>,
    pub transaction_id: Option<String>,
    /// Introductory-offer eligibility only: the grant asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_introductory_offer: Option<bool>,
    /// Advanced Commerce only: the operation, the SKUs (at most [`Signing::MAX_SKUS`], then
    /// `sku_count` says how many there were), the first currency and the highest price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skus: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sku_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_price: Option<i64>,
    pub nonce: Option<String>,
    pub sha256: Option<String>,
}

impl Signing {
    /// SKUs listed in one record; the rest are counted.
    pub const MAX_SKUS: usize = 16;
}

/// A chained line that is not a request (DESIGN §13b): the writer's trace of records it had
/// to drop, or of a restart that found the log's tail cut. It has `seq`, `time` and
/// `prev_sha256` like a record, so `audit verify` checks it and a reviewer sees the gap.
#[derive(Clone, Debug, Serialize)]
pub struct Marker {
    pub time: String,
    /// `records_lost` or `resumed_after_truncation`.
    pub event: &'static str,
    /// `records_lost`: how many records were dropped since the last line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// `resumed_after_truncation`: the seq the saved chain state expected next, and the
    /// seq the log's surviving tail continues with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_seq: Option<u64>,
}

impl Marker {
    pub(crate) const RECORDS_LOST: &'static str = "records_lost";
    pub(crate) const RESUMED_AFTER_TRUNCATION: &'static str = "resumed_after_truncation";
}

/// Appends one line's JSON (without the newline) to `buf`: the chain fields around the
/// record, `{"version":…,"seq":…,<the record's fields>,"prev_sha256":"…"}`. The record is
/// serialised by its own derive and spliced in, which is what `#[serde(flatten)]` would
/// write, without flatten's per-field map detour.
pub(super) fn write_line(
    buf: &mut Vec<u8>,
    seq: u64,
    record: &impl Serialize,
    prev_sha256: &str,
) -> serde_json::Result<()> {
    let start = buf.len();
    buf.extend_from_slice(b"{\"version\":");
    serde_json::to_writer(&mut *buf, &VERSION)?;
    buf.extend_from_slice(b",\"seq\":");
    serde_json::to_writer(&mut *buf, &seq)?;
    let at = buf.len();
    serde_json::to_writer(&mut *buf, record)?;
    // The record is a non-empty object: its `{` becomes the separator and its `}` moves
    // after the last chain field.
    if buf.get(at) != Some(&b'{') || buf.pop() != Some(b'}') {
        buf.truncate(start);
        return Err(serde::ser::Error::custom(
            "an audit record is not a JSON object",
        ));
    }
    buf[at] = b',';
    buf.extend_from_slice(b",\"prev_sha256\":");
    serde_json::to_writer(&mut *buf, prev_sha256)?;
    buf.push(b'}');
    Ok(())
}
