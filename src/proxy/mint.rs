//! Phase 2, mint: the token for exactly the request that is forwarded — same key, method,
//! path (after `/sandbox` is removed) and query — cached or fresh.

use std::sync::Arc;
use std::time::SystemTime;

use http::request::Parts;

use crate::apple::TokenStrategy;
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
