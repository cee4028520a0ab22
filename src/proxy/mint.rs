//! Phase 2, mint: the token for exactly the request that is forwarded — same key, method,
//! path (after `/sandbox` is removed) and query — cached or fresh.

use std::sync::Arc;
use std::time::SystemTime;

use http::request::Parts;

use crate::apple::TokenStrategy;
use crate::exchange;
use crate::route;
use crate::token::{self, Token};

use super::admit::Admitted;
use super::{Exchange, Proxy, Refusal};

/// Whether a cached token may serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Freshness {
    /// A cached token when one is valid (the normal case).
    Cached,
    /// A new signature with a fresh `iat` (the retry after Apple's 401).
    Fresh,
}

impl Proxy {
    /// The credential a forwarded request carries, by its API's strategy: minted (or
    /// cached) by [`Proxy::mint`], or for an exchange API the access token, which may wait
    /// for Apple's token endpoint (DESIGN §18). `Fresh` for an exchange API means the held
    /// access token was just refused: the caller has already forgotten it.
    pub(super) async fn credential(
        &self,
        request: &token::Request<'_>,
        route: &route::Route<'_>,
        freshness: Freshness,
        ex: &mut Exchange,
    ) -> Result<Arc<Token>, Refusal> {
        if request.api.token_strategy() != TokenStrategy::Exchanged {
            return self.mint(request, freshness, ex);
        }
        let settings = self.config.apis.get(&request.api);
        let url = match (
            settings.and_then(|s| s.token_url.as_ref()),
            request.api.token_url(),
        ) {
            (Some(configured), _) => configured.to_string(),
            (None, Some(apple)) => apple.to_string(),
            (None, None) => format!("{}{}", route.upstream.base, crate::apple::MAPS_TOKEN_PATH),
        };
        let endpoint = exchange::Endpoint {
            url: &url,
            in_query: settings.is_some_and(|s| s.token_params_in_query),
            timeout: self.config.server.request_timeout,
        };
        ex.key = Some(Arc::from(request.key));
        match self
            .shared
            .access_tokens
            .get(&self.minter, &self.upstream, request, endpoint)
            .await
        {
            Ok(token) => {
                ex.key_id = Some(token.key_id.clone());
                ex.token_sha256 = Some(token.fingerprint().clone());
                Ok(token)
            }
            Err(failed) if failed.error.signer_unavailable() => {
                self.shared.metrics.signer_failure(request.key);
                Err(Refusal::SignerUnavailable {
                    key: request.key.to_string(),
                    source: failed.error.to_string().into(),
                })
            }
            Err(failed) => {
                ex.diagnosis = Some(failed.error.diagnosis());
                Err(Refusal::ExchangeFailed {
                    api: request.api,
                    key: request.key.to_string(),
                    retry_after: failed.retry_after_secs(),
                    error: failed.error,
                })
            }
        }
    }

    /// What the token is for.
    pub(super) fn token_request<'a>(
        &'a self,
        admitted: &'a Admitted<'a>,
        parts: &'a Parts,
    ) -> token::Request<'a> {
        token::Request {
            key: admitted.key,
            api: admitted.route.api,
            method: parts.method.as_str(),
            path: admitted.route.path,
            query: parts.uri.query(),
            bundle_id: self.clients.pinned_bundle_id(&admitted.who),
            subject: None,
        }
    }

    /// Mints (or takes from the cache) and notes the token's names and fingerprint.
    pub(super) fn mint(
        &self,
        request: &token::Request<'_>,
        freshness: Freshness,
        ex: &mut Exchange,
    ) -> Result<Arc<Token>, Refusal> {
        let now = SystemTime::now();
        let token = match (request.api.token_strategy(), freshness) {
            (TokenStrategy::PerRequest, Freshness::Cached) => self.minter.token(request, now),
            (TokenStrategy::PerRequest, Freshness::Fresh) => self.minter.remint(request, now),
            // Reused until due for renewal, whatever happened to the last request (DESIGN §18).
            (TokenStrategy::Cached, _) => self.minter.cached(request, now),
            // Sign in with Apple's client_secret, for the form (`form`): cached like these.
            (TokenStrategy::FormSecret, _) => self.minter.cached(request, now),
            // Exchanged asynchronously (`Proxy::credential`), never minted here.
            (TokenStrategy::Exchanged, _) => {
                return Err(Refusal::internal(
                    "mint",
                    format!("{} takes an exchanged access token", request.api),
                ))
            }
            // Answered by the proxy itself (`own`); never routed to Apple, so never minted for.
            (TokenStrategy::Answered, _) => {
                return Err(Refusal::internal(
                    "mint",
                    format!("{} is not forwarded", request.api),
                ))
            }
        }
        .map_err(|e| match e {
            // An HSM or KMS that does not answer: 503, nothing sent to Apple (DESIGN §16).
            token::MintError::Sign {
                key,
                source: source @ token::SignError::Unavailable(_),
            } => {
                self.shared.metrics.signer_failure(&key);
                Refusal::SignerUnavailable {
                    key,
                    source: Box::new(source),
                }
            }
            e => Refusal::internal("mint", e),
        })?;
        tracing::debug!(key = %token.key_name, api = %request.api, "minted");
        ex.key = Some(token.key_name.clone());
        ex.key_id = Some(token.key_id.clone());
        ex.token_sha256 = Some(token.fingerprint().clone());
        Ok(token)
    }
}
