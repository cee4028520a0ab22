//! The APIs Apple Developer account keys serve (APPLE.md §9): APNs (HTTP/2 only, with its
//! provider-token rules per connection), DeviceCheck, App Attest, WeatherKit and Apple
//! Music — each checking its token as Apple documents, with code written from those rules
//! and independent of the proxy's minter (RustCrypto `p256`).
//!
//! - APNs: header exactly `{alg: ES256, kid}`, claims exactly `{iss: team id, iat}`; `iat`
//!   not in the future and under an hour old (403 `ExpiredProviderToken`); a connection is
//!   bound to the first key that pushed on it (another key: 403 `UnrelatedKeyIdInToken`);
//!   a token that replaces the connection's previous one less than 20 minutes after it
//!   arrived gets 429 `TooManyProviderTokenUpdates` (APPLE.md §9.1). `POST /3/device/<hex>`
//!   with `apns-topic`; device tokens starting `dead` are 410 `Unregistered`.
//! - DeviceCheck: `Authorization: Bearer`, APNs' token shape; 401 otherwise.
//! - App Attest: `Authorization: <JWT>` *without* `Bearer` (401 with it), APNs' shape.
//! - WeatherKit: header `{alg, kid, id: <team>.<service>}`, claims exactly
//!   `{iss, iat, exp, sub: service}`, `exp` after now and at most an hour after `iat`.
//! - Apple Music: claims `{iss, iat, exp}` (`origin` allowed), `exp - iat` ≤ 15,777,000 s;
//!   `/v1/me/…` needs `Music-User-Token`.
//!
//! Every token the stand-in sees is counted per key, so tests can assert reuse.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{AUTHORIZATION, CONTENT_TYPE, DATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::Signature;
use serde_json::{json, Map, Value};
use sha2::Digest as _;

use super::body::ResponseBody;
use super::exchange::{count_body, http_date, lock, standin_delay_ms, Shared};
use super::{KnownKeyKind, Received, Role, VerifiedToken};

/// APNs: a provider token may be at most this old (APPLE.md §9.1).
const MAX_AGE_SECS: i64 = 3600;
/// APNs: a connection's token may change at most once in this long.
const MIN_UPDATE_SECS: i64 = 20 * 60;
/// How far in the future `iat` may be.
const MAX_FUTURE_SECS: i64 = 60;
/// Apple Music: the longest `exp - iat`. [MUSIC-TOK]
const MUSIC_MAX_SECS: i64 = 15_777_000;
/// WeatherKit: the longest `exp - iat` the stand-in takes (Apple's samples: an hour).
const WEATHERKIT_MAX_SECS: i64 = 3600;

/// What one APNs connection has been bound to (per TCP connection, as APNs does it).
#[derive(Debug, Default)]
pub(crate) struct Connection {
    /// Its number (see `Received::connection`).
    id: u64,
    /// The key id of the first accepted push.
    key_id: Option<String>,
    /// The token in use on this connection and when (stand-in seconds) it arrived.
    token: Option<(String, i64)>,
}

impl Connection {
    pub(crate) fn new(id: u64) -> Connection {
        Connection {
            id,
            ..Connection::default()
        }
    }
}

/// Distinct tokens seen, per key id.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    tokens: Mutex<HashMap<String, HashSet<String>>>,
}

impl Seen {
    pub(crate) fn count(&self, key_id: &str) -> usize {
        lock(&self.tokens).get(key_id).map_or(0, HashSet::len)
    }
}

/// Which API a developer role serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Apns,
    DeviceCheck,
    AppAttest,
    WeatherKit,
    Music,
}

fn api_of(role: Role) -> Option<Api> {
    Some(match role {
        Role::Apns | Role::ApnsDevelopment => Api::Apns,
        Role::DeviceCheck | Role::DeviceCheckDevelopment => Api::DeviceCheck,
        Role::AppAttest | Role::AppAttestDevelopment => Api::AppAttest,
        Role::WeatherKit => Api::WeatherKit,
        Role::AppleMusic => Api::Music,
        Role::AppStoreConnect
        | Role::StoreKitProduction
        | Role::StoreKitSandbox
        | Role::Maps
        | Role::AccountToken
        | Role::AppleBusiness
        | Role::AppleSchool
        | Role::SignInWithApple => return None,
    })
}

/// Whether `role` is one of this module's.
pub(crate) fn serves(role: Role) -> bool {
    api_of(role).is_some()
}

/// Why a token was refused: APNs' reason, and a sentence for the record.
struct Refused {
    reason: &'static str,
    why: String,
}

fn refused(reason: &'static str, why: impl Into<String>) -> Refused {
    Refused {
        reason,
        why: why.into(),
    }
}

fn segment(part: &str, what: &str) -> Result<Map<String, Value>, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| format!("{what} is not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| format!("{what} is not a JSON object"))
}

/// Checks `jwt` for `api` at `now`: the shape Apple documents, the key, the signature.
fn check(shared: &Shared, api: Api, jwt: &str, now: i64) -> Result<VerifiedToken, Refused> {
    let invalid = |why: String| refused("InvalidProviderToken", why);
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header_b64, payload_b64, signature_b64] = parts[..] else {
        return Err(invalid(format!("{} segments, not 3", parts.len())));
    };
    let header = segment(header_b64, "header").map_err(invalid)?;
    let claims = segment(payload_b64, "payload").map_err(invalid)?;
    let text =
        |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    if text(&header, "alg").as_deref() != Some("ES256") {
        return Err(invalid(format!(
            "alg is {:?}, not ES256",
            header.get("alg")
        )));
    }
    let kid = text(&header, "kid").ok_or_else(|| invalid("header has no kid".into()))?;
    let Some((known, verifying)) = shared.keyring.trusted(&kid) else {
        return Err(invalid(format!("unknown key id {kid}")));
    };
    let KnownKeyKind::Developer {
        team_id,
        service_id,
    } = &known.kind
    else {
        return Err(invalid(format!("key {kid} is not a developer key")));
    };
    let raw = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| invalid("signature is not base64url".into()))?;
    let signature = Signature::from_slice(&raw)
        .map_err(|_| invalid(format!("signature is {} bytes, not raw r||s", raw.len())))?;
    let signed = &jwt.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
    verifying
        .verify(signed, &signature)
        .map_err(|_| invalid("signature does not verify with the key".into()))?;

    // The header: exactly these names (WeatherKit adds `id`).
    let mut header_names: Vec<&str> = header.keys().map(String::as_str).collect();
    header_names.sort_unstable();
    let want_header: &[&str] = match api {
        Api::WeatherKit => &["alg", "id", "kid"],
        _ => &["alg", "kid"],
    };
    let typ_only_extra = header_names
        .iter()
        .filter(|n| !want_header.contains(n))
        .all(|n| *n == "typ");
    if !want_header.iter().all(|n| header_names.contains(n)) || !typ_only_extra {
        return Err(invalid(format!(
            "header fields {header_names:?}, not {want_header:?}"
        )));
    }
    if text(&claims, "iss").as_deref() != Some(team_id.as_str()) {
        return Err(invalid(format!(
            "iss {:?} is not team {team_id}",
            claims.get("iss")
        )));
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or_else(|| invalid("iat is missing or not integer seconds".into()))?;
    if iat > now + MAX_FUTURE_SECS {
        return Err(invalid(format!("iat {iat} is in the future (now {now})")));
    }
    let allowed: &[&str] = match api {
        Api::Apns | Api::DeviceCheck | Api::AppAttest => &["iss", "iat"],
        Api::WeatherKit => &["iss", "iat", "exp", "sub"],
        Api::Music => &["iss", "iat", "exp", "origin"],
    };
    if let Some(extra) = claims.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(invalid(format!(
            "claim `{extra}` is not one Apple lists for this API"
        )));
    }
    match api {
        Api::Apns | Api::DeviceCheck | Api::AppAttest => {
            if iat < now - MAX_AGE_SECS {
                return Err(refused(
                    "ExpiredProviderToken",
                    format!("iat {iat} is more than an hour old (now {now})"),
                ));
            }
        }
        Api::WeatherKit | Api::Music => {
            let exp = claims
                .get("exp")
                .and_then(Value::as_i64)
                .ok_or_else(|| invalid("exp is missing or not integer seconds".into()))?;
            let max = if api == Api::Music {
                MUSIC_MAX_SECS
            } else {
                WEATHERKIT_MAX_SECS
            };
            if exp <= now {
                return Err(invalid(format!("expired (exp {exp}, now {now})")));
            }
            if exp - iat > max {
                return Err(invalid(format!("exp - iat is {} s, over {max}", exp - iat)));
            }
            if api == Api::WeatherKit {
                let service = service_id.as_deref().unwrap_or_default();
                if text(&claims, "sub").as_deref() != Some(service) {
                    return Err(invalid(format!(
                        "sub {:?} is not service {service}",
                        claims.get("sub")
                    )));
                }
                if text(&header, "id") != Some(format!("{team_id}.{service}")) {
                    return Err(invalid(format!(
                        "header id {:?} is not {team_id}.{service}",
                        header.get("id")
                    )));
                }
            }
        }
    }
    Ok(VerifiedToken {
        header: Value::Object(header),
        claims: Value::Object(claims),
    })
}

fn sha(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn answer(status: StatusCode, body: Value) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::whole(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn apns_error(status: StatusCode, reason: &str) -> Response<ResponseBody> {
    answer(status, json!({ "reason": reason }))
}

/// The `Authorization` value's JWT: after `Bearer ` (any case) except on App Attest,
/// which takes the bare JWT.
fn jwt_of(api: Api, headers: &http::HeaderMap) -> Result<String, Refused> {
    let value = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .ok_or_else(|| refused("MissingProviderToken", "no authorization header"))?;
    let bearer = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, jwt)| jwt.trim().to_string());
    match (api, bearer) {
        (Api::AppAttest, Some(_)) => Err(refused(
            "InvalidProviderToken",
            "App Attest takes the JWT without `Bearer`",
        )),
        (Api::AppAttest, None) => Ok(value.to_string()),
        (_, Some(jwt)) => Ok(jwt),
        (_, None) => Err(refused(
            "MissingProviderToken",
            "authorization is not `Bearer <jwt>`",
        )),
    }
}

/// Answers one request on a developer role's listener; `connection` is the state of the
/// TCP connection it came on (APNs binds connections).
pub(crate) async fn handle(
    shared: &Shared,
    role: Role,
    connection: &Mutex<Connection>,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let Some(api) = api_of(role) else {
        return apns_error(StatusCode::NOT_FOUND, "BadPath");
    };
    let now = shared.now();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
    let body_len = count_body(body).await;

    let verdict = jwt_of(api, &parts.headers).and_then(|jwt| {
        let token = check(shared, api, &jwt, now)?;
        let kid = token
            .header
            .get("kid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        lock(&shared.developer_seen.tokens)
            .entry(kid)
            .or_default()
            .insert(sha(&jwt));
        Ok((token, jwt))
    });
    // APNs' per-connection rules, for a token that verifies.
    let connection_refusal = match (&verdict, api) {
        (Ok((token, jwt)), Api::Apns) => {
            let kid = token
                .header
                .get("kid")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let mut c = lock(connection);
            match (&c.key_id, &c.token) {
                (Some(bound), _) if bound != kid => Some(refused(
                    "UnrelatedKeyIdInToken",
                    format!("the connection is bound to key {bound}"),
                )),
                (_, Some((current, since)))
                    if current != &sha(jwt) && now - since < MIN_UPDATE_SECS =>
                {
                    Some(refused(
                        "TooManyProviderTokenUpdates",
                        format!("the token changed {} s after the previous one", now - since),
                    ))
                }
                _ => {
                    let fresh = sha(jwt);
                    if c.token
                        .as_ref()
                        .is_none_or(|(current, _)| *current != fresh)
                    {
                        c.token = Some((fresh, now));
                    }
                    c.key_id = Some(kid.to_string());
                    None
                }
            }
        }
        _ => None,
    };
    let forced = shared.faults().apns_reason;
    let recorded = match (&verdict, &connection_refusal) {
        (Ok((token, _)), None) => Ok(token.clone()),
        (Ok(_), Some(r)) => Err(format!("{}: {}", r.reason, r.why)),
        (Err(r), _) => Err(format!("{}: {}", r.reason, r.why)),
    };
    lock(&shared.received).push(Received {
        role,
        method: parts.method.to_string(),
        path_and_query,
        version: parts.version,
        headers: parts.headers.clone(),
        body_len,
        verdict: recorded.clone(),
        fault: (forced.is_some() && recorded.is_ok() && api == Api::Apns).then_some("apns_reason"),
        connection: lock(connection).id,
    });

    // `?standin_delay_ms=N` holds the answer (for measuring requests in flight).
    if let Some(ms) = standin_delay_ms(parts.uri.query()) {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut response = match (api, &verdict, connection_refusal.as_ref()) {
        (Api::Apns, Err(r), _) | (Api::Apns, Ok(_), Some(r)) => {
            let status = if r.reason == "TooManyProviderTokenUpdates" {
                StatusCode::TOO_MANY_REQUESTS
            } else {
                StatusCode::FORBIDDEN
            };
            apns_error(status, r.reason)
        }
        (Api::Apns, Ok(_), None) => apns_push(&parts, &path, forced, shared),
        (_, Err(r), _) => match api {
            // DeviceCheck answers in plain text; the others in JSON.
            Api::DeviceCheck => {
                let mut response =
                    Response::new(ResponseBody::whole(if r.reason == "ExpiredProviderToken" {
                        "Authorization Token Expired"
                    } else {
                        "Invalid Authorization Token"
                    }));
                *response.status_mut() = StatusCode::UNAUTHORIZED;
                response
            }
            _ => answer(
                StatusCode::UNAUTHORIZED,
                json!({"errors": [{"status": "401", "code": "40100", "title": "Unauthorized"}]}),
            ),
        },
        (_, Ok(_), _) => serve(api, &parts.method, &path, &parts.headers, body_len),
    };
    response.headers_mut().insert(
        DATE,
        HeaderValue::from_str(&http_date(now)).unwrap_or(HeaderValue::from_static("")),
    );
    response
}

/// An accepted APNs push: 200 with `apns-id`, or the app-level errors APNs gives.
fn apns_push(
    parts: &http::request::Parts,
    path: &str,
    forced: Option<(u16, String)>,
    shared: &Shared,
) -> Response<ResponseBody> {
    if let Some((status, reason)) = forced {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
        return answer(status, json!({ "reason": reason }));
    }
    if parts.method != Method::POST {
        return apns_error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed");
    }
    let Some(device) = path.strip_prefix("/3/device/") else {
        return apns_error(StatusCode::NOT_FOUND, "BadPath");
    };
    if device.is_empty() || !device.bytes().all(|b| b.is_ascii_hexdigit()) {
        return apns_error(StatusCode::BAD_REQUEST, "BadDeviceToken");
    }
    if !parts.headers.contains_key("apns-topic") {
        return apns_error(StatusCode::BAD_REQUEST, "MissingTopic");
    }
    if device.starts_with("dead") {
        return answer(
            StatusCode::GONE,
            json!({"reason": "Unregistered", "timestamp": shared.now() * 1000}),
        );
    }
    let id = parts
        .headers
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| shared.request_uuid(), str::to_string);
    let mut response = Response::new(ResponseBody::empty());
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("apns-id", v);
    }
    response
}

/// An accepted request to DeviceCheck, App Attest, WeatherKit or Music.
fn serve(
    api: Api,
    method: &Method,
    path: &str,
    headers: &http::HeaderMap,
    body_len: u64,
) -> Response<ResponseBody> {
    match api {
        Api::DeviceCheck => match (method, path) {
            (&Method::POST, "/v1/query_two_bits") => answer(
                StatusCode::OK,
                json!({"bit0": false, "bit1": true, "last_update_time": "2026-11"}),
            ),
            (&Method::POST, "/v1/update_two_bits" | "/v1/validate_device_token") => {
                Response::new(ResponseBody::empty())
            }
            _ => {
                let mut r = Response::new(ResponseBody::whole("Not Found"));
                *r.status_mut() = StatusCode::NOT_FOUND;
                r
            }
        },
        Api::AppAttest => match (method, path) {
            (&Method::POST, "/v1/attestationData") if body_len > 0 => {
                let mut r = Response::new(ResponseBody::whole("c3RhbmQtaW4gcmVjZWlwdA=="));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("base64"));
                r
            }
            (&Method::POST, "/v1/attestationData") => {
                let mut r = Response::new(ResponseBody::whole("Bad Payload"));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }
            _ => answer(StatusCode::NOT_FOUND, json!({"error": "No Data Found"})),
        },
        Api::WeatherKit if path.starts_with("/api/v1/") => answer(
            StatusCode::OK,
            json!({"currentWeather": {"name": "CurrentWeather", "temperature": 11.5, "path": path}}),
        ),
        Api::Music if path.starts_with("/v1/me/") && !headers.contains_key("music-user-token") => {
            answer(
                StatusCode::FORBIDDEN,
                json!({"errors": [{"status": "403", "code": "40300", "title": "Forbidden", "detail": "Music-User-Token is required"}]}),
            )
        }
        Api::Music if path.starts_with("/v1/") => answer(
            StatusCode::OK,
            json!({"data": [{"id": "1", "type": "songs", "path": path}]}),
        ),
        _ => answer(
            StatusCode::NOT_FOUND,
            json!({"errors": [{"status": "404"}]}),
        ),
    }
}
