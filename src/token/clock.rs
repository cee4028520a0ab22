//! Apple's clock: this host's clock corrected by the offset learned from the `Date` header
//! of Apple's responses, so a proxy host whose clock runs fast still gets `iat` right.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Apple's clock, as learned from the `Date` header of its responses.
///
/// Apple rejects an `iat` in its future, so a proxy host whose clock runs fast would be
/// locked out; the offset corrects for that. `Date` has one-second resolution, so the offset
/// is good to about a second — well inside the `iat` leeway.
#[derive(Debug, Default)]
pub struct AppleClock {
    offset_secs: AtomicI64,
}

impl AppleClock {
    /// Seconds to add to the local clock to get Apple's.
    pub fn offset_secs(&self) -> i64 {
        self.offset_secs.load(Ordering::Relaxed)
    }

    /// Records Apple's `Date` against the local time the response head arrived.
    /// Returns the measured offset.
    pub fn observe(&self, apple: SystemTime, local: SystemTime) -> i64 {
        let offset = unix_secs(apple) - unix_secs(local);
        self.offset_secs.store(offset, Ordering::Relaxed);
        offset
    }

    /// Apple's "now", in UNIX seconds.
    pub fn apple_now(&self, local: SystemTime) -> i64 {
        unix_secs(local) + self.offset_secs()
    }
}

pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
