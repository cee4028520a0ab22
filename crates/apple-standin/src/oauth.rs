//! Apple's credential-exchange APIs and Sign in with Apple (APPLE.md §9.5–§9.7), each
//! checking what it is sent as Apple documents it, with code written from those rules and
//! independent of the proxy's minter (RustCrypto `p256`):
//!
//! - Maps (`Role::Maps`): `GET /v1/token` takes the auth token as Bearer — header
//!   `{alg: ES256, kid, typ: JWT}`, claims `{iss: team id, iat, exp}` (optional `origin`) —
//!   and answers `{"accessToken", "expiresInSeconds"}` (header and claims exactly these); every other `/v1/` path takes only an
//!   access token it issued and that has not expired.
//! - The account token endpoint (`Role::AccountToken`, `account.apple.com`):
//!   `POST /auth/oauth2/token` with `grant_type=client_credentials`, `client_id`,
//!   `client_assertion_type` (the JWT-bearer URN), `client_assertion` and `scope`, in the form
//!   body or the query string. The assertion: header `{alg: ES256, kid: <UUID>, typ}`,
//!   claims exactly `iss` = `sub` = `client_id` = the key's client id, `aud`
//!   `https://account.apple.com/auth/oauth2/v2/token`, `iat`, `exp` (after now, at most 180
//!   days after `iat`), a `jti` never seen before. `scope` must fit the client id
//!   (`business.api` for `BUSINESSAPI.…`, `school.api` for `SCHOOLAPI.…`: 400
//!   `invalid_scope`); anything else wrong is 400 `invalid_client`.
//! - Apple Business / School Manager (`Role::AppleBusiness`, `Role::AppleSchool`): `/v1/…`
//!   takes only an access token issued for its scope.
//! - Sign in with Apple (`Role::SignInWithApple`): `POST /auth/token`, `/auth/revoke`,
//!   `/auth/oauth2/v2/token` with a form whose `client_secret` is a JWT — header
//!   `{alg: ES256, kid}` of a developer key, claims `iss` team id, `sub` = the form's
//!   `client_id` (case-sensitive, one of the stand-in's `sign_in_clients`, signed by the key configured for it), `aud`
//!   `https://appleid.apple.com`, `iat`, `exp` after now and at most 15,777,000 s after `iat`.
//!   Anything wrong: 400 `{"error":"invalid_client"}`. Every form is kept for the tests.
//!
//! Knobs ([`TokenEndpoint`]) make the token endpoints refuse, fail or hand out short-lived
//! access tokens; exchanges are counted per API.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::header::{AUTHORIZATION, CONTENT_TYPE, DATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::Signature;
use serde_json::{json, Map, Value};

use super::body::ResponseBody;
use super::exchange::{http_date, lock, Shared};
use super::{KnownKeyKind, Role};

/// The JWT-bearer client assertion type. [ABM-OAUTH]
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const ACCOUNT_AUDIENCE: &str = "https://account.apple.com/auth/oauth2/v2/token";
const SIGN_IN_AUDIENCE: &str = "https://appleid.apple.com";
const SIGN_IN_MAX_SECS: i64 = 15_777_000;
const ASSERTION_MAX_SECS: i64 = 180 * 86_400;
const MAX_FUTURE_SECS: i64 = 60;
const MAX_FORM: usize = 64 * 1024;

/// How the token endpoints (Maps' `/v1/token`, the account token endpoint) behave; all
/// off by default. Set on a running stand-in with `Standin::set_token_endpoint`.
#[derive(Clone, Debug, Default)]
pub struct TokenEndpoint {
    /// Every exchange that would succeed gets this status and OAuth `error` instead
    /// (e.g. `(400, "invalid_client")`).
    pub refuse: Option<(u16, String)>,
    /// The next N exchanges get 503 (then normal).
    pub unavailable: u32,
    /// The access tokens' `expires_in` (default: Maps 1800 s, account 3600 s).
    pub lifetime_secs: Option<u64>,
    /// Milliseconds to wait before answering an exchange.
    pub delay_ms: u64,
}

/// This module's state in the stand-in's `Shared`.
#[derive(Default)]
pub(crate) struct State {
    pub endpoint: Mutex<TokenEndpoint>,
    /// Access tokens issued: token → (the API role it is for, expiry in stand-in seconds).
    issued: Mutex<HashMap<String, (Role, i64)>>,
    /// Exchanges answered with a token, by API role.
    pub exchanges: Mutex<HashMap<Role, u32>>,
    /// Token endpoint requests of any outcome.
    pub attempts: Mutex<u32>,
    jtis: Mutex<HashSet<String>>,
    /// Sign in with Apple forms as received, with whether an `Authorization` header came too.
    pub forms: Mutex<Vec<(String, bool)>>,
    /// Sign in with Apple: each client id with the key id configured to sign for it.
    pub sign_in_clients: Vec<(String, String)>,
}

impl State {
    pub(crate) fn new(sign_in_clients: Vec<(String, String)>) -> State {
        State {
            sign_in_clients,
            ..State::default()
        }
    }

    /// Every access token issued so far stops working (Apple revoked them).
    pub(crate) fn revoke_all(&self) {
        lock(&self.issued).clear();
    }
}

/// Whether `role` is one of this module's.
pub(crate) fn serves(role: Role) -> bool {
    matches!(
        role,
        Role::Maps
            | Role::AccountToken
            | Role::AppleBusiness
            | Role::AppleSchool
            | Role::SignInWithApple
    )
}

fn answer(status: StatusCode, body: Value, now: i64) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::whole(body.to_string()));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(date) = HeaderValue::from_str(&http_date(now)) {
        h.insert(DATE, date);
    }
    response
}

fn oauth_error(status: StatusCode, error: &str, now: i64) -> Response<ResponseBody> {
    answer(status, json!({ "error": error }), now)
}

fn segment(part: &str) -> Option<Map<String, Value>> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

/// A verified JWT's header, claims, and the kind of key that signed it.
type Checked<'s> = (Map<String, Value>, Map<String, Value>, &'s KnownKeyKind);

/// A JWT's header and claims once its ES256 signature verifies with the key its `kid`
/// names; `Err` says what is wrong (for the stand-in's own log, never sent).
fn verified<'s>(shared: &'s Shared, jwt: &str) -> Result<Checked<'s>, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [h, p, s] = parts[..] else {
        return Err("not three segments".into());
    };
    let header = segment(h).ok_or("header is not base64url JSON")?;
    let claims = segment(p).ok_or("payload is not base64url JSON")?;
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err("alg is not ES256".into());
    }
    let kid = header.get("kid").and_then(Value::as_str).ok_or("no kid")?;
    let (known, verifying) = shared.keyring.trusted(kid).ok_or("unknown kid")?;
    let raw = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| "signature not base64url")?;
    let signature = Signature::from_slice(&raw).map_err(|_| "signature is not raw r||s")?;
    verifying
        .verify(&jwt.as_bytes()[..h.len() + 1 + p.len()], &signature)
        .map_err(|_| "signature does not verify")?;
    Ok((header, claims, &known.kind))
}

fn int(claims: &Map<String, Value>, name: &str) -> Result<i64, String> {
    claims
        .get(name)
        .and_then(Value::as_i64)
        .ok_or_else(|| format!("{name} is missing or not an integer"))
}

/// `iat` not in the future, `exp` after now and at most `max` after `iat`.
fn times(claims: &Map<String, Value>, now: i64, max: i64) -> Result<(), String> {
    let iat = int(claims, "iat")?;
    let exp = int(claims, "exp")?;
    if iat > now + MAX_FUTURE_SECS {
        return Err("iat is in the future".into());
    }
    if exp <= now {
        return Err("expired".into());
    }
    if exp - iat > max {
        return Err(format!("exp - iat is {} s, over {max}", exp - iat));
    }
    Ok(())
}

/// `m` has exactly the names `want` (sorted), or at most them when `optional` lists the
/// ones that may be absent.
fn exactly(
    m: &Map<String, Value>,
    want: &[&str],
    optional: &[&str],
    what: &str,
) -> Result<(), String> {
    let have: Vec<&str> = m.keys().map(String::as_str).collect();
    let missing: Vec<&&str> = want
        .iter()
        .filter(|w| !have.contains(w) && !optional.contains(w))
        .collect();
    let extra: Vec<&&str> = have.iter().filter(|h| !want.contains(h)).collect();
    if missing.is_empty() && extra.is_empty() {
        Ok(())
    } else {
        Err(format!("{what}: missing {missing:?}, unexpected {extra:?}"))
    }
}

/// A form's (and query's) parameters, decoded; `None` when one is sent twice (a second
/// `client_secret` or `scope` must not slip past the check of the first).
struct Params(Vec<(String, String)>);

impl Params {
    fn of(form: &str, query: Option<&str>) -> Option<Params> {
        let mut pairs = form_pairs(form);
        pairs.extend(form_pairs(query.unwrap_or("")));
        let twice = pairs
            .iter()
            .enumerate()
            .any(|(i, (k, _))| pairs[..i].iter().any(|(earlier, _)| earlier == k));
        (!twice).then_some(Params(pairs))
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

/// `8-4-4-4-12` hex digits.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn text<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str)
}

/// `application/x-www-form-urlencoded` pairs, decoded.
fn form_pairs(raw: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    raw.split('&')
        .filter(|f| !f.is_empty())
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(f), String::new()),
        })
        .collect()
}

fn bearer(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// A random access token.
fn fresh_token(shared: &Shared) -> String {
    format!("at.{}", shared.request_uuid().replace('-', ""))
}

/// Answers one request on one of this module's roles, and records it (`Received`, with
/// `verdict` `Ok` when it was answered 2xx).
pub(crate) async fn handle(
    shared: &Shared,
    role: Role,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let now = shared.now();
    let (parts, body) = request.into_parts();
    let raw = match Limited::new(body, MAX_FORM).collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(_) => return oauth_error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request", now),
    };
    let response = respond(shared, role, &parts, &raw, now).await;
    lock(&shared.received).push(super::Received {
        role,
        method: parts.method.to_string(),
        path_and_query: parts.uri.path_and_query().map_or_else(
            || parts.uri.path().to_string(),
            |pq| pq.as_str().to_string(),
        ),
        version: parts.version,
        headers: parts.headers.clone(),
        body_len: raw.len() as u64,
        verdict: if response.status().is_success() {
            Ok(super::VerifiedToken {
                header: Value::Null,
                claims: Value::Null,
            })
        } else {
            Err(format!("answered {}", response.status()))
        },
        fault: None,
        connection: 0,
    });
    response
}

async fn respond(
    shared: &Shared,
    role: Role,
    parts: &http::request::Parts,
    raw: &str,
    now: i64,
) -> Response<ResponseBody> {
    let raw = raw.to_string();
    let path = parts.uri.path().to_string();
    let state = &shared.oauth;
    match role {
        Role::Maps if path == "/v1/token" => {
            if parts.method != Method::GET {
                return oauth_error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request", now);
            }
            let check = bearer(&parts.headers)
                .ok_or_else(|| "no Bearer auth token".to_string())
                .and_then(|jwt| {
                    let (header, claims, kind) = verified(shared, &jwt)?;
                    let KnownKeyKind::Developer { team_id, .. } = kind else {
                        return Err("not a developer key".into());
                    };
                    exactly(&header, &["alg", "kid", "typ"], &[], "header")?;
                    exactly(
                        &claims,
                        &["exp", "iat", "iss", "origin"],
                        &["origin"],
                        "claims",
                    )?;
                    if text(&header, "typ") != Some("JWT") {
                        return Err("typ is not JWT".into());
                    }
                    if text(&claims, "iss") != Some(team_id.as_str()) {
                        return Err("iss is not the team id".into());
                    }
                    times(&claims, now, i64::MAX / 2)
                });
            exchange(
                shared,
                Role::Maps,
                check,
                now,
                |token, lifetime| json!({"accessToken": token, "expiresInSeconds": lifetime}),
            )
            .await
        }
        Role::Maps | Role::AppleBusiness | Role::AppleSchool => {
            let ok = bearer(&parts.headers).is_some_and(|t| {
                lock(&state.issued)
                    .get(&t)
                    .is_some_and(|(r, exp)| *r == role && *exp > now)
            });
            if !ok {
                return answer(
                    StatusCode::UNAUTHORIZED,
                    json!({"errors": [{"status": "401", "code": "UNAUTHORIZED", "title": "Not authorized"}]}),
                    now,
                );
            }
            answer(
                StatusCode::OK,
                json!({"data": [], "path": path, "role": role.as_str()}),
                now,
            )
        }
        Role::AccountToken => {
            if parts.method != Method::POST || path != "/auth/oauth2/token" {
                return oauth_error(StatusCode::NOT_FOUND, "invalid_request", now);
            }
            let Some(params) = Params::of(&raw, parts.uri.query()) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", now);
            };
            let param = |name: &str| params.get(name);
            let scope = param("scope").unwrap_or_default();
            let client_id = param("client_id").unwrap_or_default();
            let for_role = match scope.as_str() {
                "business.api" if client_id.starts_with("BUSINESSAPI.") => Role::AppleBusiness,
                "school.api" if client_id.starts_with("SCHOOLAPI.") => Role::AppleSchool,
                _ => return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", now),
            };
            let check = (|| {
                if param("grant_type").as_deref() != Some("client_credentials") {
                    return Err("grant_type is not client_credentials".to_string());
                }
                if param("client_assertion_type").as_deref() != Some(ASSERTION_TYPE) {
                    return Err("wrong client_assertion_type".into());
                }
                let jwt = param("client_assertion").ok_or("no client_assertion")?;
                let (header, claims, kind) = verified(shared, &jwt)?;
                let KnownKeyKind::BusinessManager { client_id: own } = kind else {
                    return Err("not a business-manager key".into());
                };
                exactly(&header, &["alg", "kid", "typ"], &[], "header")?;
                exactly(
                    &claims,
                    &["aud", "exp", "iat", "iss", "jti", "sub"],
                    &[],
                    "claims",
                )?;
                let kid = text(&header, "kid").unwrap_or_default();
                if !is_uuid(kid) {
                    return Err("kid is not a UUID".into());
                }
                if text(&header, "typ") != Some("JWT") {
                    return Err("typ is not JWT".into());
                }
                if own != &client_id
                    || text(&claims, "iss") != Some(own.as_str())
                    || text(&claims, "sub") != Some(own.as_str())
                {
                    return Err("iss, sub and client_id are not the key's client id".into());
                }
                if text(&claims, "aud") != Some(ACCOUNT_AUDIENCE) {
                    return Err("aud is not the account token audience".into());
                }
                times(&claims, now, ASSERTION_MAX_SECS)?;
                let jti = text(&claims, "jti").ok_or("no jti")?;
                if !lock(&state.jtis).insert(jti.to_string()) {
                    return Err("jti was used before".into());
                }
                Ok(())
            })();
            exchange(shared, for_role, check, now, |token, lifetime| {
                json!({"access_token": token, "token_type": "Bearer", "expires_in": lifetime, "scope": scope})
            })
            .await
        }
        Role::SignInWithApple => {
            lock(&state.forms).push((raw.clone(), parts.headers.contains_key(AUTHORIZATION)));
            let endpoints = ["/auth/token", "/auth/revoke", "/auth/oauth2/v2/token"];
            if parts.method != Method::POST || !endpoints.contains(&path.as_str()) {
                return oauth_error(StatusCode::NOT_FOUND, "invalid_request", now);
            }
            let Some(params) = Params::of(&raw, None) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", now);
            };
            let param = |name: &str| params.get(name);
            let check = (|| {
                let client_id = param("client_id").ok_or("no client_id")?;
                if !state.sign_in_clients.iter().any(|(id, _)| *id == client_id) {
                    return Err("unknown client_id".to_string());
                }
                let jwt = param("client_secret").ok_or("no client_secret")?;
                let (header, claims, kind) = verified(shared, &jwt)?;
                let KnownKeyKind::Developer { team_id, .. } = kind else {
                    return Err("not a developer key".into());
                };
                exactly(&header, &["alg", "kid", "typ"], &["typ"], "header")?;
                exactly(&claims, &["aud", "exp", "iat", "iss", "sub"], &[], "claims")?;
                if text(&header, "typ").is_some_and(|t| t != "JWT") {
                    return Err("typ is not JWT".into());
                }
                // The key configured for this client id in the developer portal, no other.
                let kid = text(&header, "kid").unwrap_or_default().to_string();
                if !state.sign_in_clients.contains(&(client_id.clone(), kid)) {
                    return Err(
                        "the client_secret is signed by a key not configured for this client id"
                            .into(),
                    );
                }
                if text(&claims, "iss") != Some(team_id.as_str()) {
                    return Err("iss is not the team id".into());
                }
                if text(&claims, "sub") != Some(client_id.as_str()) {
                    return Err("sub is not the client_id".into());
                }
                if text(&claims, "aud") != Some(SIGN_IN_AUDIENCE) {
                    return Err("aud is not https://appleid.apple.com".into());
                }
                times(&claims, now, SIGN_IN_MAX_SECS)
            })();
            if let Err(why) = check {
                tracing::debug!(why, "stand-in Sign in with Apple refused the client_secret");
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_client", now);
            }
            match path.as_str() {
                "/auth/revoke" => answer(StatusCode::OK, json!({}), now),
                _ => answer(
                    StatusCode::OK,
                    json!({"access_token": fresh_token(shared), "token_type": "Bearer", "expires_in": 3600,
                           "refresh_token": fresh_token(shared), "id_token": "stand-in.id.token"}),
                    now,
                ),
            }
        }
        _ => oauth_error(StatusCode::NOT_FOUND, "invalid_request", now),
    }
}

/// A token endpoint's answer: the knobs first, then the check, then a fresh access token
/// for `for_role`, shaped by `shape`.
async fn exchange(
    shared: &Shared,
    for_role: Role,
    check: Result<(), String>,
    now: i64,
    shape: impl FnOnce(&str, u64) -> Value,
) -> Response<ResponseBody> {
    let state = &shared.oauth;
    *lock(&state.attempts) += 1;
    let knobs = {
        let mut endpoint = lock(&state.endpoint);
        let knobs = endpoint.clone();
        endpoint.unavailable = endpoint.unavailable.saturating_sub(1);
        knobs
    };
    if knobs.delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(knobs.delay_ms)).await;
    }
    if knobs.unavailable > 0 {
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            now,
        );
    }
    if let Err(why) = check {
        tracing::debug!(
            why,
            role = for_role.as_str(),
            "stand-in token endpoint refused the assertion"
        );
        return match for_role {
            Role::Maps => answer(
                StatusCode::UNAUTHORIZED,
                json!({"error": {"message": "Not Authorized", "details": []}}),
                now,
            ),
            _ => oauth_error(StatusCode::BAD_REQUEST, "invalid_client", now),
        };
    }
    if let Some((status, error)) = knobs.refuse {
        return oauth_error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            &error,
            now,
        );
    }
    let lifetime = knobs.lifetime_secs.unwrap_or(match for_role {
        Role::Maps => 1800,
        _ => 3600,
    });
    let token = fresh_token(shared);
    lock(&state.issued).insert(
        token.clone(),
        (
            for_role,
            now + i64::try_from(lifetime).unwrap_or(i64::MAX / 2),
        ),
    );
    *lock(&state.exchanges).entry(for_role).or_default() += 1;
    answer(StatusCode::OK, shape(&token, lifetime), now)
}
