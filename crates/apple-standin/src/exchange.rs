//! One request through the stand-in: check the token, count the body, record what
//! arrived, and answer the way Apple would.
//!
//! Owns: the state shared by all connections (keys, clock, faults, record, rate-limit
//! counters), routing by role and path prefix, and Apple-shaped responses (APPLE.md §1,
//! §3, §4).
//! Imports only sibling stand-in modules.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, DATE};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde_json::json;

use super::body::ResponseBody;
use super::fault::{self, Fault, Verified};
use super::verify::{Keyring, Rejection, RequestLine, ScopeEncoding};
use super::{
    Faults, Received, Role, VerifiedToken, AGREEMENT_PENDING_BODY,
    APP_STORE_CONNECT_FORBIDDEN_BODY, APP_STORE_CONNECT_NOT_AUTHORIZED_BODY, RATE_LIMIT_HEADER,
    RATE_LIMIT_PER_HOUR, REQUEST_UUID_HEADER, STANDIN_BYTES_MAX, STANDIN_BYTES_PARAM,
    STANDIN_DELAY_MAX_MS, STANDIN_DELAY_PARAM, TRANSACTION_NOT_FOUND_BODY,
};

/// Path prefixes the App Store Server roles serve (APPLE.md §1: route by prefix).
const STOREKIT_PREFIXES: [&str; 4] = [
    "/inApps/",
    "/groups/",
    "/advancedCommerce/",
    "/externalPurchase/",
];
/// Notary shares App Store Connect's keys and rules (APPLE.md §1).
const NOTARY_PREFIX: &str = "/notary/";

/// State every connection of one stand-in shares.
pub(crate) struct Shared {
    pub keyring: Keyring,
    /// Added to the host clock: Apple's clock as the stand-in plays it.
    pub clock_offset_secs: i64,
    /// The fault modes in force; replaced whole by [`Shared::set_faults`].
    faults: RwLock<Faults>,
    /// Transient 401s still to give (starts at `Faults::transient_401s`).
    transient_left: AtomicU32,
    pub received: Mutex<Vec<Received>>,
    /// `user-hour-rem` per App Store Connect key ID.
    pub rate_remaining: Mutex<HashMap<String, u32>>,
    /// The chunk every `standin_bytes` download slices from.
    pub pattern: Bytes,
    uuid_seed: RandomState,
    uuid_counter: AtomicU64,
    /// Tokens the developer-key roles saw, per key.
    pub developer_seen: super::developer::Seen,
    /// The exchange APIs' and Sign in with Apple's state (issued access tokens, knobs,
    /// forms).
    pub oauth: super::oauth::State,
}

/// Summarised by hand: the record holds bearer tokens, which `Debug` must not print.
impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("keyring", &self.keyring)
            .field("clock_offset_secs", &self.clock_offset_secs)
            .field("faults", &*read(&self.faults))
            .field(
                "transient_left",
                &self.transient_left.load(Ordering::Relaxed),
            )
            .field("received", &lock(&self.received).len())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(
        keyring: Keyring,
        clock_offset_secs: i64,
        faults: Faults,
        sign_in_clients: Vec<(String, String)>,
    ) -> Self {
        Shared {
            keyring,
            clock_offset_secs,
            transient_left: AtomicU32::new(faults.transient_401s),
            faults: RwLock::new(faults),
            received: Mutex::new(Vec::new()),
            rate_remaining: Mutex::new(HashMap::new()),
            pattern: super::body::pattern_chunk(),
            uuid_seed: RandomState::new(),
            uuid_counter: AtomicU64::new(0),
            developer_seen: Default::default(),
            oauth: super::oauth::State::new(sign_in_clients),
        }
    }

    /// Replaces the fault modes and restarts the transient-401 budget from them.
    pub(crate) fn set_faults(&self, faults: Faults) {
        let mut current = self.faults.write().unwrap_or_else(PoisonError::into_inner);
        self.transient_left
            .store(faults.transient_401s, Ordering::Release);
        *current = faults;
    }

    pub(crate) fn faults(&self) -> Faults {
        read(&self.faults).clone()
    }

    /// Apple's clock, in seconds since the epoch.
    pub(crate) fn now(&self) -> i64 {
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        host.saturating_add(self.clock_offset_secs)
    }

    /// A fresh UUID-looking identifier (version-4 layout). Unique, not secret.
    pub(crate) fn request_uuid(&self) -> String {
        let n = self.uuid_counter.fetch_add(1, Ordering::Relaxed);
        let hi = self.uuid_seed.hash_one((n, 0u8));
        let lo = self.uuid_seed.hash_one((n, 1u8));
        let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
        let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xffff,
            lo >> 48,
            lo & 0xffff_ffff_ffff
        )
    }

    /// Counts one request against `kid`'s hourly budget and returns what remains.
    fn spend_rate_limit(&self, kid: &str) -> u32 {
        let mut remaining = lock(&self.rate_remaining);
        let left = remaining
            .entry(kid.to_owned())
            .or_insert(RATE_LIMIT_PER_HOUR);
        *left = left.saturating_sub(1);
        *left
    }
}

/// A poisoned lock only means a panic elsewhere; the data is still a plain record.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Answers one request on `role`'s listener. Never fails: every problem is a response.
pub(crate) async fn handle(
    shared: &Shared,
    role: Role,
    connection: u64,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let now = shared.now();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());

    let line = RequestLine {
        role,
        method: parts.method.as_str(),
        path: &path,
        query: query.as_deref(),
    };
    let served = serves(role, &path);
    // Decided before the body is read, so the faults' read guard never crosses an await.
    let (verdict, fault) = judge(shared, &parts.headers, &line, served, now);
    let shape = {
        let faults = read(&shared.faults);
        let gzip_accepted = parts
            .headers
            .get_all(http::header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains("gzip"));
        ErrorShape {
            padding: faults.error_padding,
            gzip: faults.compress_errors && gzip_accepted,
        }
    };

    // The body is streamed and counted, never kept: uploads can be gigabytes.
    let body_len = count_body(body).await;

    let kid = verdict
        .as_ref()
        .ok()
        .and_then(|token| token.header.get("kid"))
        .and_then(|kid| kid.as_str())
        .map(str::to_owned);
    let accepted = verdict.is_ok();
    lock(&shared.received).push(Received {
        role,
        method: parts.method.to_string(),
        path_and_query,
        version: parts.version,
        headers: parts.headers,
        body_len,
        verdict,
        fault: fault.map(Fault::as_str),
        connection,
    });
    if let Some(ms) = standin_delay_ms(query.as_deref()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }

    let mut response = if !served {
        not_found(role, shared)
    } else if !accepted {
        shape.apply(not_authorized(role))
    } else if let Some(fault) = fault {
        shape.apply(fault_response(fault, role))
    } else {
        match standin_bytes(query.as_deref()) {
            Ok(Some(len)) => {
                let mut response =
                    Response::new(ResponseBody::generated(shared.pattern.clone(), len));
                set(&mut response, CONTENT_TYPE, "application/octet-stream");
                set(&mut response, CONTENT_LENGTH, len.to_string());
                response
            }
            Ok(None) => echo(role, &parts.method, &path, query.as_deref(), body_len),
            Err(()) => bad_standin_bytes(role, shared),
        }
    };

    if role == Role::AppStoreConnect && response.status() == StatusCode::OK {
        if let Some(kid) = kid {
            let remaining = shared.spend_rate_limit(&kid);
            set(
                &mut response,
                HeaderName::from_static(RATE_LIMIT_HEADER),
                format!("user-hour-lim:{RATE_LIMIT_PER_HOUR};user-hour-rem:{remaining};"),
            );
        }
    }
    set(&mut response, DATE, http_date(now));
    set(
        &mut response,
        HeaderName::from_static(REQUEST_UUID_HEADER),
        shared.request_uuid(),
    );
    response
}

/// Did the token verify by Apple's rules, and which fault mode (if any) answers instead?
/// Order: the token first (a bad token is a plain 401), then [`fault::decide`]. Faults
/// apply only to paths the role serves: an unknown path is a 404 whatever the token.
fn judge(
    shared: &Shared,
    headers: &http::HeaderMap,
    line: &RequestLine<'_>,
    served: bool,
    now: i64,
) -> (Result<VerifiedToken, String>, Option<Fault>) {
    let role = line.role.as_str();
    let faults = read(&shared.faults);
    let scope_encoding = if faults.strict_scope_encoding {
        ScopeEncoding::Raw
    } else {
        ScopeEncoding::Decoded
    };
    let token = match shared.keyring.check(headers, line, now, scope_encoding) {
        Ok(token) => token,
        Err(rejection) => {
            let fault = matches!(rejection, Rejection::ScopeEncodingMismatch { .. })
                .then_some(Fault::StrictScopeEncoding);
            let reason = rejection.to_string();
            tracing::debug!(role, %reason, "stand-in rejected the bearer token");
            return (Err(reason), fault);
        }
    };
    let key_id = token
        .header
        .get("kid")
        .and_then(|kid| kid.as_str())
        .unwrap_or_default();
    let verified = Verified {
        role: line.role,
        path: line.path,
        key_id,
        kind: shared.keyring.kind(key_id),
        claims: &token.claims,
    };
    let fault = served
        .then(|| fault::decide(&faults, &shared.transient_left, &verified))
        .flatten();
    if let Some(fault) = fault {
        tracing::debug!(
            role,
            fault = fault.as_str(),
            kid = key_id,
            reason = fault.reason(),
            "stand-in refused a verified token (fault mode)"
        );
    }
    (Ok(token), fault)
}

pub(crate) async fn count_body(mut body: Incoming) -> u64 {
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    len += data.len() as u64;
                }
            }
            Err(error) => {
                tracing::debug!(%error, bytes_so_far = len, "stand-in stopped reading a request body");
                break;
            }
        }
    }
    len
}

/// Does `role`'s listener serve `path`? App Store Connect: `/v<N>/…` and `/notary/…`;
/// App Store Server: the four prefixes of APPLE.md §1.
fn serves(role: Role, path: &str) -> bool {
    match role {
        Role::AppStoreConnect => path.starts_with(NOTARY_PREFIX) || is_versioned(path),
        Role::StoreKitProduction | Role::StoreKitSandbox => STOREKIT_PREFIXES
            .iter()
            .any(|prefix| path.starts_with(prefix)),
        // Answered by `developer`, never here.
        _ => false,
    }
}

/// `/v<digits>/…`
fn is_versioned(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v") else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && rest.as_bytes().get(digits) == Some(&b'/')
}

/// `Ok(Some(n))` if the query asks for an n-byte download, `Err` if it asks badly.
fn standin_bytes(query: Option<&str>) -> Result<Option<u64>, ()> {
    let Some(query) = query else {
        return Ok(None);
    };
    let Some(value) = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(name, value)| (name == STANDIN_BYTES_PARAM).then_some(value))
    else {
        return Ok(None);
    };
    match value.parse::<u64>() {
        Ok(n) if n <= STANDIN_BYTES_MAX => Ok(Some(n)),
        _ => Err(()),
    }
}

/// `standin_delay_ms=N` in the query, bounded; anything else is no delay.
pub(crate) fn standin_delay_ms(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(name, value)| (name == STANDIN_DELAY_PARAM).then_some(value))?
        .parse::<u64>()
        .ok()
        .map(|ms| ms.min(STANDIN_DELAY_MAX_MS))
}

fn echo(
    role: Role,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body_len: u64,
) -> Response<ResponseBody> {
    let body = json!({
        "data": {
            "type": "standin",
            "role": role.as_str(),
            "method": method.as_str(),
            "path": path,
            "query": query,
            "bytes_received": body_len,
        }
    });
    json_response(StatusCode::OK, body.to_string())
}

/// APPLE.md §3: App Store Connect's 401 body is the same for every cause; the App Store
/// Server API's 401 is empty.
fn not_authorized(role: Role) -> Response<ResponseBody> {
    match role {
        Role::AppStoreConnect => json_response(
            StatusCode::UNAUTHORIZED,
            APP_STORE_CONNECT_NOT_AUTHORIZED_BODY,
        ),
        _ => empty_response(StatusCode::UNAUTHORIZED),
    }
}

/// The answer a fault mode gives a verified token (APPLE.md §3 and §5).
fn fault_response(fault: Fault, role: Role) -> Response<ResponseBody> {
    match fault {
        // Indistinguishable from a bad token, as Apple makes them.
        Fault::Revoked | Fault::Transient | Fault::StrictScopeEncoding => not_authorized(role),
        // APPLE.md §0: production answers 401 with no body until the app is released.
        Fault::Unreleased => empty_response(StatusCode::UNAUTHORIZED),
        Fault::TransactionNotFound => {
            json_response(StatusCode::NOT_FOUND, TRANSACTION_NOT_FOUND_BODY)
        }
        Fault::IndividualForbidden | Fault::RoleForbidden => {
            json_response(StatusCode::FORBIDDEN, APP_STORE_CONNECT_FORBIDDEN_BODY)
        }
        Fault::AgreementPending => json_response(StatusCode::FORBIDDEN, AGREEMENT_PENDING_BODY),
    }
}

/// App Store Connect answers an unknown path with a JSON:API error; the App Store Server
/// API's 404s may be empty (APPLE.md §3).
fn not_found(role: Role, shared: &Shared) -> Response<ResponseBody> {
    match role {
        Role::AppStoreConnect => {
            let body = json!({"errors": [{
                "id": shared.request_uuid(),
                "status": "404",
                "code": "NOT_FOUND",
                "title": "The specified resource does not exist",
                "detail": "The path provided does not match a defined resource type.",
            }]});
            json_response(StatusCode::NOT_FOUND, body.to_string())
        }
        _ => empty_response(StatusCode::NOT_FOUND),
    }
}

fn bad_standin_bytes(role: Role, shared: &Shared) -> Response<ResponseBody> {
    let detail = format!("{STANDIN_BYTES_PARAM} must be an integer from 0 to {STANDIN_BYTES_MAX}");
    let body = match role {
        Role::AppStoreConnect => json!({"errors": [{
            "id": shared.request_uuid(),
            "status": "400",
            "code": "PARAMETER_ERROR.INVALID",
            "title": "A parameter has an invalid value",
            "detail": detail,
        }]}),
        _ => json!({"errorCode": 4000000, "errorMessage": detail}),
    };
    json_response(StatusCode::BAD_REQUEST, body.to_string())
}

/// How the stand-in dresses its JSON error bodies ([`Faults::error_padding`],
/// [`Faults::compress_errors`]).
struct ErrorShape {
    padding: usize,
    gzip: bool,
}

impl ErrorShape {
    /// `response` padded and compressed as configured; an empty body stays empty.
    fn apply(&self, response: Response<ResponseBody>) -> Response<ResponseBody> {
        let Some(body) = response.body().whole_bytes() else {
            return response;
        };
        if body.is_empty() || (self.padding == 0 && !self.gzip) {
            return response;
        }
        let mut bytes = body.to_vec();
        if bytes.len() < self.padding {
            bytes.resize(self.padding, b' ');
        }
        if self.gzip {
            use std::io::Write as _;
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            if encoder.write_all(&bytes).is_err() {
                return response;
            }
            match encoder.finish() {
                Ok(compressed) => bytes = compressed,
                Err(_) => return response,
            }
        }
        let (mut parts, _) = response.into_parts();
        parts.headers.insert(CONTENT_LENGTH, bytes.len().into());
        if self.gzip {
            parts.headers.insert(
                http::header::CONTENT_ENCODING,
                http::HeaderValue::from_static("gzip"),
            );
        }
        Response::from_parts(parts, ResponseBody::whole(Bytes::from(bytes)))
    }
}

fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<ResponseBody> {
    let body = body.into();
    let len = body.len();
    let mut response = Response::new(ResponseBody::whole(body));
    *response.status_mut() = status;
    set(&mut response, CONTENT_TYPE, "application/json");
    set(&mut response, CONTENT_LENGTH, len.to_string());
    response
}

fn empty_response(status: StatusCode) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = status;
    set(&mut response, CONTENT_LENGTH, "0");
    response
}

/// Sets a header whose value is built from ASCII we control; an invalid value is skipped
/// rather than allowed to panic.
fn set(response: &mut Response<ResponseBody>, name: HeaderName, value: impl AsRef<str>) {
    match HeaderValue::from_str(value.as_ref()) {
        Ok(value) => {
            response.headers_mut().insert(name, value);
        }
        Err(_) => tracing::debug!(header = %name, "stand-in skipped an invalid header value"),
    }
}

/// RFC 9110 IMF-fixdate for `unix_secs`, clamped to what the format (and `httpdate`,
/// which panics outside it) can express: 1970 to the end of 9999.
pub(crate) fn http_date(unix_secs: i64) -> String {
    const LAST_SECOND_OF_9999: u64 = 253_402_300_799;
    let secs = u64::try_from(unix_secs)
        .unwrap_or(0)
        .min(LAST_SECOND_OF_9999);
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_the_role_that_serves_them() {
        let cases = [
            (Role::AppStoreConnect, "/v1/apps", true),
            (Role::AppStoreConnect, "/v3/appPricePoints/x", true),
            (Role::AppStoreConnect, "/v12/x", true),
            (Role::AppStoreConnect, "/notary/v2/test", true),
            (Role::AppStoreConnect, "/v/apps", false),
            (Role::AppStoreConnect, "/v1", false),
            (Role::AppStoreConnect, "/version/1", false),
            (Role::AppStoreConnect, "/inApps/v1/transactions/1", false),
            (Role::StoreKitProduction, "/inApps/v1/transactions/1", true),
            (
                Role::StoreKitSandbox,
                "/groups/v1/transactions/1/seats",
                true,
            ),
            (
                Role::StoreKitSandbox,
                "/advancedCommerce/v1/subscription/cancel/1",
                true,
            ),
            (
                Role::StoreKitProduction,
                "/externalPurchase/v1/reports",
                true,
            ),
            (Role::StoreKitProduction, "/v1/apps", false),
            (Role::StoreKitProduction, "/inapps/v1/x", false),
        ];
        for (role, path, expected) in cases {
            assert_eq!(serves(role, path), expected, "{role:?} {path}");
        }
    }

    #[test]
    fn standin_bytes_is_parsed_and_bounded() {
        assert_eq!(standin_bytes(None), Ok(None));
        assert_eq!(standin_bytes(Some("a=1")), Ok(None));
        assert_eq!(standin_bytes(Some("a=1&standin_bytes=10")), Ok(Some(10)));
        assert_eq!(
            standin_bytes(Some("standin_bytes=8589934592")),
            Ok(Some(8 << 30))
        );
        assert_eq!(standin_bytes(Some("standin_bytes=8589934593")), Err(()));
        assert_eq!(standin_bytes(Some("standin_bytes=-1")), Err(()));
        assert_eq!(standin_bytes(Some("standin_bytes=")), Err(()));
    }

    #[test]
    fn standin_delay_is_parsed_and_bounded() {
        assert_eq!(standin_delay_ms(None), None);
        assert_eq!(
            standin_delay_ms(Some("a=1&standin_delay_ms=250")),
            Some(250)
        );
        assert_eq!(
            standin_delay_ms(Some("standin_delay_ms=99999999")),
            Some(STANDIN_DELAY_MAX_MS)
        );
        assert_eq!(standin_delay_ms(Some("standin_delay_ms=x")), None);
    }

    #[test]
    fn dates_follow_the_offset_clock_in_imf_fixdate() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(http_date(-5), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(i64::MAX), "Fri, 31 Dec 9999 23:59:59 GMT");
    }

    #[test]
    fn request_uuids_look_like_uuids_and_differ() {
        let keyring = Keyring::new(Vec::new()).expect("no keys is a valid keyring");
        let shared = Shared::new(keyring, 0, Faults::default(), Vec::new());
        let a = shared.request_uuid();
        let b = shared.request_uuid();
        assert_ne!(a, b);
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }
}
