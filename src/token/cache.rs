//! The token cache: sharded maps behind short-lived locks, bounded, never locked while
//! signing. Tokens are told apart by key, scope entry, bundle id and (App Store Connect)
//! whether they are unscoped.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use crate::apple::TokenFamily;

use super::scope::push_scope_entry;
use super::{Request, Token, OFFSET_TOLERANCE_SECS, REFRESH_MARGIN};

/// What tells cached tokens apart — key, scope entry, bundle id, and whether an App Store
/// Connect token is unscoped — as one string, the scope entry kept addressable inside it.
pub(super) struct CacheKey {
    pub text: String,
    /// Where the scope entry is in `text`, when the request is scoped.
    scope: Option<std::ops::Range<usize>>,
}

impl CacheKey {
    pub fn new(req: &Request<'_>, scoped: bool, bid: Option<&str>) -> CacheKey {
        let scope_len = if scoped {
            req.method.len() + req.path.len() + req.query.map_or(0, str::len) + 2
        } else {
            0
        };
        let bid = bid.unwrap_or("");
        let mut text = String::with_capacity(req.key.len() + scope_len + bid.len() + 5);
        text.push_str(req.key);
        text.push('\u{0}');
        let scope = scoped.then(|| {
            let start = text.len();
            push_scope_entry(&mut text, req.method, req.path, req.query);
            start..text.len()
        });
        text.push('\u{0}');
        text.push_str(bid);
        text.push('\u{0}');
        // An unscoped App Store Connect token has a shorter life than a scoped one.
        let unscoped_connect = req.api.token_family() == TokenFamily::Connect && !scoped;
        text.push(if unscoped_connect { '1' } else { '0' });
        CacheKey { text, scope }
    }

    pub fn scope(&self) -> Option<&str> {
        self.scope.clone().and_then(|r| self.text.get(r))
    }
}

pub(super) const SHARDS: usize = 16;

/// More than [`REFRESH_MARGIN`] left before `exp` (every cached token has one).
fn lives(token: &Token, apple_now: i64) -> bool {
    token
        .claims
        .exp
        .is_some_and(|exp| exp - apple_now >= REFRESH_MARGIN.as_secs() as i64)
}

pub(super) struct Cache {
    shards: Vec<Mutex<HashMap<String, Arc<Token>>>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl Cache {
    pub fn new(capacity: usize) -> Cache {
        Cache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Arc<Token>>> {
        // Truncation is the point: any bits pick a shard.
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    fn usable(token: &Token, apple_now: i64, offset: i64) -> bool {
        lives(token, apple_now) && (token.clock_offset - offset).abs() < OFFSET_TOLERANCE_SECS
    }

    pub fn get(&self, key: &str, apple_now: i64, offset: i64) -> Option<Arc<Token>> {
        let shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
        shard
            .get(key)
            .filter(|t| Cache::usable(t, apple_now, offset))
            .cloned()
    }

    pub fn insert(&self, k: String, token: Arc<Token>, apple_now: i64) {
        let mut shard = self.shard(&k).lock().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.per_shard && !shard.contains_key(&k) {
            // Drop every token too close to expiry to be served; if the live ones still fill
            // the shard, drop an arbitrary eighth of them too (HashMap order is random): the
            // bound kept without an LRU's per-hit bookkeeping, nothing copied or re-hashed.
            let live = shard.values().filter(|t| lives(t, apple_now)).count();
            let mut surplus = if live >= self.per_shard {
                self.per_shard.div_ceil(8)
            } else {
                0
            };
            shard.retain(|_, t| {
                if !lives(t, apple_now) {
                    false
                } else if surplus > 0 {
                    surplus -= 1;
                    false
                } else {
                    true
                }
            });
        }
        shard.insert(k, token);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}
