//! Apple's clock: this host's clock corrected by the offset learned from the `Date` header
//! of Apple's responses, so a proxy host whose clock runs fast still gets `iat` right.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    pub(crate) fn offset_secs(&self) -> i64 {
        self.offset_secs.load(Ordering::Relaxed)
    }

    /// Records Apple's `Date` against the local time the response head arrived, and
    /// returns the measured offset — unless it is beyond `max`: a clock that far off is not
    /// evidence (a broken or hostile `Date`), so it is ignored and returned as `Err`.
    pub(crate) fn observe(
        &self,
        apple: SystemTime,
        local: SystemTime,
        max: Duration,
    ) -> Result<i64, i64> {
        let offset = unix_secs(apple).saturating_sub(unix_secs(local));
        if offset.unsigned_abs() > max.as_secs() {
            return Err(offset);
        }
        self.offset_secs.store(offset, Ordering::Relaxed);
        Ok(offset)
    }

    /// Apple's "now", in UNIX seconds.
    pub(crate) fn apple_now(&self, local: SystemTime) -> i64 {
        unix_secs(local) + self.offset_secs()
    }
}

pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_implausible_date_is_not_evidence_and_leaves_the_offset_alone() {
        let clock = AppleClock::default();
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour = Duration::from_secs(3600);
        assert_eq!(
            clock.observe(now + Duration::from_secs(42), now, hour),
            Ok(42)
        );
        // `Date: Thu, 01 Jan 1970 …` from a broken or hostile response.
        assert_eq!(clock.observe(UNIX_EPOCH, now, hour), Err(-1_800_000_000));
        assert_eq!(clock.offset_secs(), 42, "kept");
        assert!(clock
            .observe(now + hour + Duration::from_secs(1), now, hour)
            .is_err());
        assert_eq!(
            clock.observe(now - hour, now, hour),
            Ok(-3600),
            "the bound itself is plausible"
        );
    }
}
