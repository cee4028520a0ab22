//! The exchanged access tokens (DESIGN §18): Maps trades its auth token at `/v1/token`,
//! Apple Business/School Manager trade a client assertion in an OAuth client-credentials
//! grant; every other request of theirs carries the access token Apple returned.
//!
//! - One access token per key, API, client id and token endpoint, kept across reloads
//!   ([`AccessTokens`] lives in the proxy's shared state), renewed when less than a tenth of
//!   its life (at least 1 s, at most 5 min) remains.
//! - Single flight: a slot's lock is held across its exchange, so concurrent requests wait
//!   for the one exchange and share its answer.
//! - A failed exchange is retried once at once when the failure looks transient (no
//!   answer, 5xx, 429); after that, requests are answered with the same failure, without
//!   asking Apple, for a backoff that doubles from 1 s to 30 s — while an access token still
//!   valid is served instead.
//! - The access token and the assertion never leave this module except inside a
//!   [`Token`]'s sensitive `Authorization` value: errors carry Apple's OAuth `error` code and
//!   description (printable, bounded), never a credential.
//!
//! Imports `apple`, `forward`, `metrics` and `token`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt as _, Full, Limited};

use crate::apple::{self, Api};
use crate::forward;
use crate::token::{self, MintError, Minter, Token};

/// The largest token-endpoint answer read.
const MAX_ANSWER: usize = 64 * 1024;
/// The longest access token accepted (Apple's are far shorter).
const MAX_ACCESS_TOKEN: usize = 8 * 1024;
/// An `expires_in` beyond this is read as this (Apple documents 30 and 60 minutes).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The wait before the one immediate retry of a transient failure.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// The backoff after consecutive failed exchanges: doubling from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why no access token could be had. Its text is safe for the client and the log: it holds
/// Apple's error code and description, never a token or an assertion.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("the assertion could not be signed: {0}")]
    Mint(#[source] MintError),
    #[error("the token endpoint could not be reached ({0})")]
    Unreachable(String),
    #[error("the token endpoint did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the token endpoint answered {status}{}{}",
        .error.as_deref().map(|e| format!(" `{e}`")).unwrap_or_default(),
        .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        status: u16,
        /// OAuth's `error` (`invalid_client`, …), or Maps' `error.message`.
        error: Option<String>,
        description: Option<String>,
        /// Apple's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    #[error("the token endpoint's answer is not a token response: {0}")]
    Malformed(&'static str),
}

impl ExchangeError {
    /// Worth an immediate second try: Apple did not answer, or answered 5xx (a 429 goes
    /// straight to the backoff, which honours its `Retry-After`).
    fn transient(&self) -> bool {
        match self {
            ExchangeError::Unreachable(_) | ExchangeError::Timeout(_) => true,
            ExchangeError::Refused { status, .. } => *status >= 500,
            ExchangeError::Mint(_) | ExchangeError::Malformed(_) => false,
        }
    }

    /// The metrics outcome.
    pub fn outcome(&self) -> &'static str {
        match self {
            ExchangeError::Mint(_) => "signer",
            ExchangeError::Unreachable(_) => "unavailable",
            ExchangeError::Timeout(_) => "timeout",
            ExchangeError::Refused { .. } => "refused",
            ExchangeError::Malformed(_) => "malformed",
        }
    }

    /// The signer could not sign (an HSM that does not answer): a 503, like any mint.
    pub fn signer_unavailable(&self) -> bool {
        matches!(
            self,
            ExchangeError::Mint(MintError::Sign {
                source: token::SignError::Unavailable(_),
                ..
            })
        )
    }

    /// The `X-Proxy-Diagnosis` code.
    pub fn diagnosis(&self) -> &'static str {
        match self {
            ExchangeError::Refused { error, status, .. } => match error.as_deref() {
                Some("invalid_client") => "EXCHANGE_INVALID_CLIENT",
                Some("invalid_scope") => "EXCHANGE_INVALID_SCOPE",
                Some("invalid_grant" | "unauthorized_client") => "EXCHANGE_INVALID_GRANT",
                _ if *status == 401 || *status == 403 => "EXCHANGE_INVALID_CLIENT",
                _ if *status == 429 => "EXCHANGE_RATE_LIMITED",
                _ => "EXCHANGE_REFUSED",
            },
            ExchangeError::Mint(_) => "EXCHANGE_SIGNER",
            ExchangeError::Unreachable(_) | ExchangeError::Timeout(_) => "EXCHANGE_UNAVAILABLE",
            ExchangeError::Malformed(_) => "EXCHANGE_MALFORMED",
        }
    }

    /// The likely cause and its fix, for the client's refusal and the operator's log.
    pub fn likely_cause(&self, api: Api) -> &'static str {
        match (self.diagnosis(), api) {
            ("EXCHANGE_INVALID_CLIENT", Api::Maps) => "Apple refused the Maps auth token: check the key's team_id and key_id, that the key has the Maps capability (Certificates, Identifiers & Profiles → Keys), and this host's clock",
            ("EXCHANGE_INVALID_CLIENT", _) => "Apple refused the client assertion: check the key's client_id (BUSINESSAPI.… for Apple Business Manager, SCHOOLAPI.… for Apple School Manager), that key_id is the key's id from the API account (a UUID), that the key was not revoked, and this host's clock",
            ("EXCHANGE_INVALID_SCOPE", _) => "the scope does not fit the account: business.api for Apple Business Manager, school.api for Apple School Manager (mixing school and business values is the common cause)",
            ("EXCHANGE_INVALID_GRANT", _) => "Apple refused the grant: the API account may be disabled, or its client id and key do not belong together",
            ("EXCHANGE_RATE_LIMITED", _) => "Apple's token endpoint is rate limiting this account; the proxy backs off and retries",
            ("EXCHANGE_SIGNER", _) => "the key's signer cannot sign the assertion",
            ("EXCHANGE_UNAVAILABLE", _) => "Apple's token endpoint cannot be reached from the proxy; the proxy backs off and retries",
            ("EXCHANGE_MALFORMED", _) => "the token endpoint answered 200 without a usable access token: check [apis.<id>] token_url",
            _ => "Apple's token endpoint refused the exchange; its error says why",
        }
    }
}

/// A failed exchange as requests see it: why, and when the proxy asks Apple again.
#[derive(Clone, Debug)]
pub struct Failed {
    pub error: Arc<ExchangeError>,
    pub retry_at: Instant,
}

impl Failed {
    /// Whole seconds until the next exchange (for `Retry-After`), at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let wait = self.retry_at.saturating_duration_since(Instant::now());
        (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
    }
}

/// The longest backoff a token endpoint's `Retry-After` may ask for.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// An access token the API refuses (401) is dropped only once it is this old (or half its
/// life, if shorter): a 401 to a token just obtained is about the request, and dropping it
/// would let every such request cost an exchange.
const MIN_AGE_TO_FORGET: Duration = Duration::from_secs(10);

/// Where and how a slot exchanges.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    /// The token endpoint's URL.
    pub url: &'a str,
    /// Apple Business/School Manager: the grant's parameters in the query string.
    pub in_query: bool,
    /// How long one exchange may take.
    pub timeout: Duration,
}

/// What an access token is for: a new key, client id or endpoint gets a new one.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Slot {
    api: Api,
    key_name: Arc<str>,
    key_id: String,
    public_key: [u8; 32],
    client: String,
    url: String,
    in_query: bool,
}

/// One slot: the access token held, read without waiting by every request, and the
/// exchange lock (with the last failure), taken only to exchange.
#[derive(Default)]
struct Cell {
    held: RwLock<Option<Held>>,
    flight: Arc<tokio::sync::Mutex<Option<Failure>>>,
}

impl Cell {
    /// The token held, if it is still before `deadline` (its refresh or its expiry).
    fn token_until(&self, deadline: impl Fn(&Held) -> Instant) -> Option<Arc<Token>> {
        let held = self
            .held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.as_ref()
            .filter(|h| Instant::now() < deadline(h))
            .map(|h| h.token.clone())
    }
}

struct Held {
    token: Arc<Token>,
    /// When the exchange was sent: the access token's life counts from there.
    obtained: Instant,
    refresh_at: Instant,
    expires_at: Instant,
}

/// The last failed exchange and how many failed in a row.
struct Failure {
    failed: Failed,
    streak: u32,
}

/// The access tokens, by slot. `Debug` shows how many, never a token.
#[derive(Default)]
pub struct AccessTokens {
    slots: Mutex<HashMap<Slot, Arc<Cell>>>,
    /// Exchanges sent, by API id and outcome.
    counts: Mutex<HashMap<(&'static str, &'static str), u64>>,
}

impl std::fmt::Debug for AccessTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessTokens")
            .field("slots", &lock(&self.slots).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One access token's age, for `/metrics`.
#[derive(Clone, Debug)]
pub struct Age {
    pub api: Api,
    pub key: Arc<str>,
    pub seconds: u64,
}

impl AccessTokens {
    /// The access token for `req` (an exchange API's request): the one held while it is
    /// good, else the answer of one exchange shared by every request that waits for it.
    pub async fn get(
        self: &Arc<Self>,
        minter: &Arc<Minter>,
        client: &forward::Client,
        req: &token::Request<'_>,
        endpoint: Endpoint<'_>,
    ) -> Result<Arc<Token>, Failed> {
        let slot = self
            .slot_of(minter, req, endpoint)
            .map_err(|error| Failed {
                error,
                retry_at: Instant::now(),
            })?;
        let cell = lock(&self.slots).entry(slot).or_default().clone();
        // The common case: a token held and fresh, no waiting.
        if let Some(token) = cell.token_until(|h| h.refresh_at) {
            return Ok(token);
        }
        let failure = cell.flight.clone().lock_owned().await;
        // Another request exchanged while this one waited: share its answer.
        if let Some(token) = cell.token_until(|h| h.refresh_at) {
            return Ok(token);
        }
        if let Some(f) = failure
            .as_ref()
            .filter(|f| Instant::now() < f.failed.retry_at)
        {
            return cell.token_until(|h| h.expires_at).ok_or(f.failed.clone());
        }
        // The exchange runs in a task of its own, holding the slot's lock: a client that
        // hangs up mid-exchange neither aborts it nor lets the next request start another.
        let job = Job {
            tokens: self.clone(),
            cell,
            minter: minter.clone(),
            client: client.clone(),
            key: req.key.to_string(),
            api: req.api,
            url: endpoint.url.to_string(),
            in_query: endpoint.in_query,
            timeout: endpoint.timeout,
        };
        tokio::spawn(job.run(failure)).await.unwrap_or_else(|_| {
            Err(Failed {
                error: Arc::new(ExchangeError::Unreachable(
                    "the exchange task ended abnormally".into(),
                )),
                retry_at: Instant::now(),
            })
        })
    }

    /// Apple refused `token` on the API (a 401): it is dropped, so the next request
    /// exchanges again — unless it was obtained under [`MIN_AGE_TO_FORGET`] ago (or half
    /// its life). Whether it was dropped.
    pub fn forget(&self, token: &Arc<Token>) -> bool {
        let mut dropped = false;
        let cells: Vec<_> = lock(&self.slots).values().cloned().collect();
        for cell in cells {
            let mut held = cell
                .held
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let old_enough = |h: &Held| {
                let life = h.expires_at.saturating_duration_since(h.obtained);
                h.obtained.elapsed() >= MIN_AGE_TO_FORGET.min(life / 2)
            };
            if held
                .as_ref()
                .is_some_and(|h| Arc::ptr_eq(&h.token, token) && old_enough(h))
            {
                *held = None;
                dropped = true;
            }
        }
        dropped
    }

    /// The age of each access token held.
    pub fn ages(&self) -> Vec<Age> {
        let slots = lock(&self.slots);
        slots
            .iter()
            .filter_map(|(slot, cell)| {
                let held = cell
                    .held
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let held = held.as_ref()?;
                Some(Age {
                    api: slot.api,
                    key: slot.key_name.clone(),
                    seconds: held.obtained.elapsed().as_secs(),
                })
            })
            .collect()
    }

    /// Exchanges sent so far, by API id and outcome.
    pub fn counts(&self) -> Vec<((&'static str, &'static str), u64)> {
        let mut out: Vec<_> = lock(&self.counts).iter().map(|(k, v)| (*k, *v)).collect();
        out.sort();
        out
    }

    fn count(&self, api: Api, outcome: &'static str) {
        *lock(&self.counts).entry((api.id(), outcome)).or_default() += 1;
    }

    fn slot_of(
        &self,
        minter: &Minter,
        req: &token::Request<'_>,
        endpoint: Endpoint<'_>,
    ) -> Result<Slot, Arc<ExchangeError>> {
        let unknown = || Arc::new(ExchangeError::Mint(MintError::UnknownKey(req.key.into())));
        let key = minter.key_config(req.key).ok_or_else(unknown)?;
        let public_key = minter.public_key_sha256(req.key).ok_or_else(unknown)?;
        Ok(Slot {
            api: req.api,
            key_name: Arc::from(req.key),
            key_id: key.key_id.clone(),
            public_key,
            client: key
                .client_id
                .clone()
                .or_else(|| key.team_id.clone())
                .unwrap_or_default(),
            url: endpoint.url.to_string(),
            in_query: endpoint.in_query,
        })
    }

    /// One exchange: a fresh assertion, Apple's answer, the access token.
    async fn exchange(
        &self,
        minter: &Minter,
        client: &forward::Client,
        req: &token::Request<'_>,
        endpoint: Endpoint<'_>,
    ) -> Result<Held, ExchangeError> {
        let result = exchange_once(minter, client, req, endpoint).await;
        self.count(
            req.api,
            match &result {
                Ok(_) => "ok",
                Err(e) => e.outcome(),
            },
        );
        result
    }
}

/// One exchange, owned, so it can outlive the request that started it.
struct Job {
    tokens: Arc<AccessTokens>,
    cell: Arc<Cell>,
    minter: Arc<Minter>,
    client: forward::Client,
    key: String,
    api: Api,
    url: String,
    in_query: bool,
    timeout: Duration,
}

impl Job {
    /// Exchanges (retrying a transient failure once), stores the token or the failure in
    /// the slot, and releases its lock.
    async fn run(
        self,
        mut failure: tokio::sync::OwnedMutexGuard<Option<Failure>>,
    ) -> Result<Arc<Token>, Failed> {
        let req = token::Request {
            key: &self.key,
            api: self.api,
            method: "POST",
            path: "",
            query: None,
            bundle_id: None,
            subject: None,
        };
        let endpoint = Endpoint {
            url: &self.url,
            in_query: self.in_query,
            timeout: self.timeout,
        };
        let (minter, client) = (&*self.minter, &self.client);
        let mut result = self.tokens.exchange(minter, client, &req, endpoint).await;
        if matches!(&result, Err(e) if e.transient()) {
            tokio::time::sleep(RETRY_PAUSE).await;
            result = self.tokens.exchange(minter, client, &req, endpoint).await;
        }
        let cell = &self.cell;
        match result {
            Ok(held) => {
                let token = held.token.clone();
                *cell
                    .held
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(held);
                *failure = None;
                tracing::info!(api = %self.api, key = %self.key, "exchanged an assertion for an access token; it is reused until shortly before it expires");
                Ok(token)
            }
            Err(error) => {
                let error = Arc::new(error);
                let streak = failure.as_ref().map_or(0, |f| f.streak) + 1;
                let asked = match &*error {
                    ExchangeError::Refused { retry_after, .. } => {
                        retry_after.map(|d| d.min(RETRY_AFTER_MAX))
                    }
                    _ => None,
                };
                let backoff = BACKOFF_FIRST
                    .saturating_mul(1 << (streak - 1).min(5))
                    .min(BACKOFF_MAX)
                    .max(asked.unwrap_or_default());
                tracing::warn!(api = %self.api, key = %self.key, error = %error, backoff_ms = backoff.as_millis() as u64, "the token exchange failed");
                let retry_at = Instant::now() + backoff;
                let failed = Failed { error, retry_at };
                *failure = Some(Failure {
                    failed: failed.clone(),
                    streak,
                });
                cell.token_until(|h| h.expires_at).ok_or(failed)
            }
        }
    }
}

async fn exchange_once(
    minter: &Minter,
    client: &forward::Client,
    req: &token::Request<'_>,
    endpoint: Endpoint<'_>,
) -> Result<Held, ExchangeError> {
    let assertion = minter
        .assertion(req, SystemTime::now())
        .map_err(ExchangeError::Mint)?;
    let mut request = match req.api.account_scope() {
        // Maps: the auth token as Bearer on GET /v1/token. [MAPS-TOK]
        None => {
            let mut r = Request::get(endpoint.url);
            if let Some(h) = r.headers_mut() {
                h.insert(header::AUTHORIZATION, assertion.authorization());
            }
            r.body(forward::empty())
        }
        // Apple Business/School Manager: the client-credentials grant. [ABM-OAUTH]
        Some((scope, _)) => {
            let client_id = minter
                .key_config(req.key)
                .and_then(|k| k.client_id.as_deref())
                .unwrap_or_default();
            let form = format!(
                "grant_type=client_credentials&client_id={}&client_assertion_type={}&client_assertion={}&scope={}",
                form_encode(client_id),
                form_encode(apple::CLIENT_ASSERTION_TYPE),
                form_encode(assertion.jwt()),
                form_encode(scope),
            );
            let (uri, body) = if endpoint.in_query {
                (format!("{}?{form}", endpoint.url), Bytes::new())
            } else {
                (endpoint.url.to_string(), Bytes::from(form))
            };
            Request::builder()
                .method(Method::POST)
                .uri(uri)
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-www-form-urlencoded"),
                )
                .body(forward::boxed(Full::new(body)))
        }
    }
    .map_err(|_| ExchangeError::Malformed("the token URL does not form a request"))?;
    request
        .headers_mut()
        .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let sent = Instant::now();
    let answer = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| ExchangeError::Unreachable(crate::error_chain(&e)))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|_| ExchangeError::Malformed("the answer is cut short or too large"))?
            .to_bytes();
        Ok::<_, ExchangeError>((status, body, retry_after))
    };
    let (status, body, retry_after) = tokio::time::timeout(endpoint.timeout, answer)
        .await
        .map_err(|_| ExchangeError::Timeout(endpoint.timeout))??;
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    if status != http::StatusCode::OK {
        let field = |name: &str| {
            json.as_ref()
                .and_then(|j| j.get(name))
                .and_then(|v| v.as_str().or_else(|| v.get("message")?.as_str()))
                .map(printable)
        };
        return Err(ExchangeError::Refused {
            status: status.as_u16(),
            error: field("error"),
            description: field("error_description"),
            retry_after,
        });
    }
    let json = json.ok_or(ExchangeError::Malformed("the body is not JSON"))?;
    let (token_field, lifetime_field) = match req.api {
        Api::Maps => ("accessToken", "expiresInSeconds"),
        _ => ("access_token", "expires_in"),
    };
    let access = json
        .get(token_field)
        .and_then(|v| v.as_str())
        .filter(|t| {
            !t.is_empty() && t.len() <= MAX_ACCESS_TOKEN && t.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or(ExchangeError::Malformed("no usable access token"))?;
    let lifetime = json
        .get(lifetime_field)
        .and_then(serde_json::Value::as_u64)
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s).min(MAX_LIFETIME))
        .ok_or(ExchangeError::Malformed("no positive expiry"))?;
    let token = Token::access(access, &assertion).map_err(ExchangeError::Mint)?;
    let margin = (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(300));
    Ok(Held {
        token: Arc::new(token),
        obtained: sent,
        refresh_at: sent + lifetime.saturating_sub(margin),
        expires_at: sent + lifetime,
    })
}

/// `application/x-www-form-urlencoded` for one value: unreserved bytes as they are, every
/// other byte `%XX`.
pub(crate) fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Apple's error text as the proxy repeats it: printable ASCII, at most 200 bytes.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_values_are_percent_encoded() {
        assert_eq!(
            form_encode(apple::CLIENT_ASSERTION_TYPE),
            "urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
        );
        assert_eq!(form_encode("BUSINESSAPI.9703-ab"), "BUSINESSAPI.9703-ab");
        assert_eq!(form_encode("a b&c=d"), "a%20b%26c%3Dd");
    }

    #[test]
    fn refusals_name_apples_error_and_a_cause() {
        let e = ExchangeError::Refused {
            status: 400,
            error: Some("invalid_client".into()),
            description: Some("bad assertion".into()),
            retry_after: None,
        };
        assert_eq!(
            e.to_string(),
            "the token endpoint answered 400 `invalid_client` (bad assertion)"
        );
        assert_eq!(e.diagnosis(), "EXCHANGE_INVALID_CLIENT");
        assert!(e.likely_cause(Api::AppleBusiness).contains("BUSINESSAPI."));
        assert!(!e.transient());
        let busy = ExchangeError::Refused {
            status: 503,
            error: None,
            description: None,
            retry_after: None,
        };
        assert!(busy.transient());
        let limited = ExchangeError::Refused {
            status: 429,
            error: None,
            description: None,
            retry_after: Some(Duration::from_secs(20)),
        };
        assert!(!limited.transient(), "a 429 waits out its Retry-After");
        assert_eq!(printable("a\u{7}b\nc é"), "abc ");
    }
}
