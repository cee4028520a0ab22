//! JWTs already verified (client-key JWTs, identity tokens), so that a token a caller
//! reuses for minutes costs one signature check rather than one per request.
//!
//! An entry holds the token itself and is found by exact comparison: no digest stands in
//! for it, so nothing but the very token verified is ever answered from memory. The map is
//! keyed by the token's last [`TAIL`] bytes (the end of its signature: random-looking, and
//! not choosable by anyone without the signing key), hashed with the per-process SipHash,
//! so a lookup costs a short hash and one comparison rather than a SHA-256 of a kilobyte
//! on every request. Two tokens that share a tail only displace one another. The tokens held are
//! credentials for this proxy only, already in this process's memory for every request
//! they arrive with, each kept no longer than it stays valid; `Debug` shows only the count.
//! Bounded: at most [`MAX_ENTRIES`], and a token longer than [`MAX_TOKEN_BYTES`] is
//! verified every time instead.

use std::collections::HashMap;
use std::sync::Mutex;

/// Tokens remembered at most; when full, expired ones go first, then all of them.
pub(crate) const MAX_ENTRIES: usize = 4096;

/// Longer tokens are not remembered (GitHub's and Kubernetes' are about 1 KiB), so the
/// cache's memory stays under `MAX_ENTRIES × MAX_TOKEN_BYTES`.
pub(crate) const MAX_TOKEN_BYTES: usize = 4096;

/// Bytes at the end of a token that key the map.
const TAIL: usize = 32;

pub(crate) struct Remembered<V> {
    entries: Mutex<HashMap<Box<str>, Entry<V>>>,
}

struct Entry<V> {
    /// The whole token, compared on every lookup.
    token: Box<str>,
    value: V,
    /// The last UNIX second the token stays valid.
    until: i64,
}

impl<V> Default for Remembered<V> {
    fn default() -> Self {
        Remembered {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

impl<V> std::fmt::Debug for Remembered<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remembered")
            .field("entries", &self.lock().len())
            .finish()
    }
}

impl<V: Clone> Remembered<V> {
    /// What `token` was verified as, if it was and is still valid at `now` and `still`
    /// accepts it; an entry that is not is forgotten.
    pub fn get(&self, token: &str, now: i64, still: impl FnOnce(&V) -> bool) -> Option<V> {
        let mut entries = self.lock();
        let entry = entries.get(tail(token))?;
        if *entry.token != *token {
            return None;
        }
        if now <= entry.until && still(&entry.value) {
            return Some(entry.value.clone());
        }
        entries.remove(tail(token));
        None
    }

    /// Remembers `token`, verified as `value`, until the UNIX second `until`.
    pub fn insert(&self, token: &str, value: V, until: i64, now: i64) {
        if token.len() > MAX_TOKEN_BYTES || until < now {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, e| e.until >= now);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(
            tail(token).into(),
            Entry {
                token: token.into(),
                value,
                until,
            },
        );
    }
}

/// The map key: the token's last [`TAIL`] bytes (all of a shorter token).
fn tail(token: &str) -> &str {
    token
        .get(token.len().saturating_sub(TAIL)..)
        .unwrap_or(token)
}

impl<V> Remembered<V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Entry<V>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_is_answered_and_only_while_valid() {
        let r = Remembered::default();
        r.insert("aaa.bbb.sig", 7usize, 100, 50);
        assert_eq!(r.get("aaa.bbb.sig", 100, |_| true), Some(7));
        // Another token with the same signature (so the same map key) is a stranger, and
        // does not displace the one remembered.
        assert_eq!(r.get("xxx.yyy.sig", 60, |_| true), None);
        assert_eq!(r.get("aaa.bbb.si", 60, |_| true), None);
        let long = format!("header.payload.{}", "s".repeat(64));
        r.insert(&long, 9, 100, 50);
        assert_eq!(
            r.get(&format!("forged.claims.{}", "s".repeat(64)), 60, |_| true),
            None
        );
        assert_eq!(r.get(&long, 60, |_| true), Some(9));
        // `still` refusing forgets the entry.
        assert_eq!(r.get("aaa.bbb.sig", 60, |_| false), None);
        assert_eq!(r.get("aaa.bbb.sig", 60, |_| true), None);
        r.insert("t", 1, 100, 50);
        assert_eq!(r.get("t", 101, |_| true), None, "expired");
        assert_eq!(
            format!("{r:?}"),
            "Remembered { entries: 1 }",
            "the long one"
        );
    }

    #[test]
    fn bounded_in_entries_and_token_size() {
        let r = Remembered::default();
        r.insert(&"x".repeat(MAX_TOKEN_BYTES + 1), 1usize, 100, 0);
        assert_eq!(r.lock().len(), 0);
        r.insert("already-expired", 1, 10, 20);
        assert_eq!(r.lock().len(), 0);
        for i in 0..MAX_ENTRIES {
            r.insert(&format!("t{i}"), i, if i % 2 == 0 { 5 } else { 100 }, 0);
        }
        // Full: the expired half goes, the valid half stays.
        r.insert("new", 1, 100, 10);
        assert_eq!(r.lock().len(), MAX_ENTRIES / 2 + 1);
        assert_eq!(r.get("t1", 10, |_| true), Some(1));
    }
}
