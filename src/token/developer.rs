//! The tokens of the APIs Apple Developer account keys serve (DESIGN §18, APPLE.md §9):
//! one token per key and API, made once and reused.
//!
//! - APNs, DeviceCheck and App Attest take a *provider token*: header `{alg, kid}`, claims
//!   `{iss: team id, iat}`, no `exp`. It is renewed when it is the key's
//!   `apns_token_refresh` old (20–55 min), never sooner: APNs answers 429
//!   `TooManyProviderTokenUpdates` to a connection whose token changes more often than every
//!   20 minutes.
//! - WeatherKit's token adds `exp` and `sub` (the service id) and puts `id` =
//!   `<team id>.<service id>` in the header; Apple Music's adds `exp`. Both are renewed when
//!   less than the refresh margin is left.
//!
//! The store outlives reloads (the proxy keeps it in its shared state), so a reload that
//! keeps a key keeps its token; a key whose id, public key, team or service changes gets a
//! new one, as it must. Concurrent first requests share one signature: a token's slot is
//! locked while it is made, and only that slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::apple::{self, Api};

use super::{Claims, MintError, Minter, Request, Token, BEARER, REFRESH_MARGIN};

/// What a developer token is made of: a new key, team or service gets a new token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Slot {
    key_id: Arc<str>,
    public_key: [u8; 32],
    api: Api,
    iss: Arc<str>,
    sub: Option<Arc<str>>,
}

struct Held {
    token: Arc<Token>,
    /// When it was signed, on the monotonic clock: a provider token's age.
    minted: Instant,
}

/// The developer-key tokens, by key and API.
#[derive(Default)]
pub struct DeveloperTokens {
    slots: Mutex<HashMap<Slot, Arc<Mutex<Option<Held>>>>>,
}

impl std::fmt::Debug for DeveloperTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeveloperTokens").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DeveloperTokens {
    fn slot(&self, slot: Slot) -> Arc<Mutex<Option<Held>>> {
        lock(&self.slots).entry(slot).or_default().clone()
    }
}

impl Minter {
    /// The token for a developer-key API: the one held for this key and API while it is
    /// good, else a new one (DESIGN §18). Reissue is never faster than the API allows, even
    /// when asked for a fresh token after a refusal.
    pub(crate) fn cached(
        &self,
        req: &Request<'_>,
        now: SystemTime,
    ) -> Result<Arc<Token>, MintError> {
        let key = self.loaded(req)?;
        let missing = |field| MintError::Missing {
            key: req.key.to_string(),
            field,
            api: req.api,
        };
        let iss = key.issuer.clone().ok_or_else(|| missing("team_id"))?;
        let sub = match req.api {
            Api::WeatherKit => Some(Arc::from(
                key.config
                    .service_id
                    .as_deref()
                    .ok_or_else(|| missing("service_id"))?,
            )),
            // Sign in with Apple: one client_secret per client id the key serves.
            Api::SignInWithApple => {
                let id = req.subject.ok_or_else(|| missing("client_id"))?;
                if !key.config.client_ids.iter().any(|c| c == id) {
                    return Err(missing("client_ids entry for this client id"));
                }
                Some(Arc::from(id))
            }
            _ => None,
        };
        let cell = self.developer.slot(Slot {
            key_id: key.key_id.clone(),
            public_key: key.public_sha256,
            api: req.api,
            iss: iss.clone(),
            sub: sub.clone(),
        });
        let mut held = lock(&cell);
        let apple_now = self.clock.apple_now(now);
        let refresh = key.config.apns_token_refresh.max(apple::APNS_REFRESH_MIN);
        if let Some(h) = held.as_ref() {
            let good = match h.token.claims.exp {
                None => h.minted.elapsed() < refresh,
                Some(exp) => exp - apple_now >= REFRESH_MARGIN.as_secs() as i64,
            };
            if good {
                self.counts
                    .cache_hits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(h.token.clone());
            }
        }
        let iat = apple_now - self.iat_leeway;
        let lifetime = match req.api {
            Api::SignInWithApple => key.config.client_secret_lifetime,
            _ => key.config.token_lifetime,
        };
        let exp = req
            .api
            .max_lifetime()
            .map(|cap| iat + i64::try_from(lifetime.min(cap).as_secs()).unwrap_or(0));
        let mut header = serde_json::json!({"alg": "ES256", "kid": key.config.key_id});
        if let Some(service) = sub.as_ref().filter(|_| req.api == Api::WeatherKit) {
            header["id"] = serde_json::Value::String(format!("{iss}.{service}"));
        }
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        let claims = Claims {
            iss: Some(iss),
            sub,
            iat,
            exp,
            aud: (req.api == Api::SignInWithApple).then_some(apple::SIGN_IN_AUDIENCE),
            scope: None,
            bid: None,
            jti: None,
        };
        // App Attest takes the bare JWT; Sign in with Apple's goes into a form, not a header.
        let scheme = if req.api.bearer() && req.api != Api::SignInWithApple {
            BEARER
        } else {
            ""
        };
        let token =
            Arc::new(self.sign(key, &header_b64, claims, self.clock.offset_secs(), scheme)?);
        self.counts
            .minted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(key = %key.name, api = %req.api, "minted a developer token; it is reused until it is due for renewal");
        *held = Some(Held {
            token: token.clone(),
            minted: Instant::now(),
        });
        Ok(token)
    }
}

/// How long a developer-key API's token serves before the proxy renews it, for `check`.
pub fn renewal(api: Api, refresh: Duration, lifetime: Duration) -> Duration {
    match api.max_lifetime() {
        None => refresh.max(apple::APNS_REFRESH_MIN),
        Some(cap) => lifetime.min(cap).saturating_sub(REFRESH_MARGIN),
    }
}
