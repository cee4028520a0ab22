//! Local enforcement of Apple's documented per-endpoint storekit rate limits (APPLE.md §4),
//! per app, so one noisy client cannot spend a whole app's budget at Apple — with a fair
//! share: while several clients use the same endpoint of the same app, each gets an equal
//! part of its rate.
//!
//! Apple counts per app (bundle id) and per endpoint, sandbox at 10% of production. A
//! bucket per (bundle id, endpoint, environment) holds the app's budget at this replica
//! (`apple_limit_fraction` scales it for N replicas); inside it, a bucket per client holds
//! that client's share. Opt-in (`enforce_apple_limits`); Apple's own 429 passes through
//! either way. Time is passed in. Imports only `apple`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::apple::{EndpointLimit, SANDBOX_LIMIT_FRACTION};

/// A client that used an endpoint within this window counts toward its fair share.
const ACTIVE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, rate: f64, capacity: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.last = now;
    }

    /// Seconds until one token is there.
    fn wait(&self, rate: f64) -> f64 {
        if self.tokens >= 1.0 {
            0.0
        } else {
            (1.0 - self.tokens) / rate
        }
    }
}

#[derive(Debug)]
struct AppBucket {
    app: Bucket,
    clients: HashMap<String, (Bucket, Instant)>,
}

/// The buckets; shared by every request (and kept across config reloads).
#[derive(Debug, Default)]
pub struct AppleLimits {
    buckets: Mutex<HashMap<(String, &'static str, bool), AppBucket>>,
}

/// Why a request was held back locally.
#[derive(Debug, PartialEq)]
pub struct Held {
    pub endpoint: &'static str,
    /// The app's rate at this replica, requests per second.
    pub rate: f64,
    /// How long until this client may send again.
    pub retry_after: Duration,
    /// Whether the client's fair share (rather than the app's whole budget) is spent.
    pub share: bool,
}

impl AppleLimits {
    /// Spends one request of `limit` for `bundle_id` by `client`, or says how long to wait.
    pub fn check(
        &self,
        bundle_id: &str,
        limit: &EndpointLimit,
        sandbox: bool,
        fraction: f64,
        client: &str,
        now: Instant,
    ) -> Result<(), Held> {
        let rate = f64::from(limit.per_second)
            * if sandbox { SANDBOX_LIMIT_FRACTION } else { 1.0 }
            * fraction;
        let capacity = rate.max(1.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let entry = buckets
            .entry((bundle_id.to_string(), limit.name, sandbox))
            .or_insert_with(|| AppBucket {
                app: Bucket::full(capacity, now),
                clients: HashMap::new(),
            });
        entry.app.refill(rate, capacity, now);
        entry.clients.retain(|name, (_, seen)| {
            name == client || now.saturating_duration_since(*seen) < ACTIVE_WINDOW
        });
        let active = entry.clients.len() + usize::from(!entry.clients.contains_key(client));
        let share_rate = rate / active as f64;
        let share_capacity = share_rate.max(1.0);
        let (share, seen) = entry
            .clients
            .entry(client.to_string())
            .or_insert_with(|| (Bucket::full(share_capacity, now), now));
        share.refill(share_rate, share_capacity, now);
        *seen = now;
        if share.tokens >= 1.0 && entry.app.tokens >= 1.0 {
            share.tokens -= 1.0;
            entry.app.tokens -= 1.0;
            return Ok(());
        }
        let (share_wait, app_wait) = (share.wait(share_rate), entry.app.wait(rate));
        Err(Held {
            endpoint: limit.name,
            rate,
            retry_after: Duration::from_secs_f64(share_wait.max(app_wait)),
            share: share_wait >= app_wait && active > 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apple::endpoint_limit;

    fn lookup() -> &'static EndpointLimit {
        endpoint_limit("GET", "/inApps/v1/lookup/X").unwrap()
    }

    #[test]
    fn an_apps_budget_holds_per_endpoint_and_refills_at_apples_rate() {
        let l = AppleLimits::default();
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(l.check("com.a", lookup(), false, 1.0, "ci", t0).is_ok());
        }
        let held = l
            .check("com.a", lookup(), false, 1.0, "ci", t0)
            .unwrap_err();
        assert_eq!((held.endpoint, held.rate), ("Look Up Order ID", 10.0));
        assert!(held.retry_after <= Duration::from_millis(100));
        assert!(l
            .check(
                "com.a",
                lookup(),
                false,
                1.0,
                "ci",
                t0 + Duration::from_millis(100)
            )
            .is_ok());
        // Another app, another endpoint, or sandbox are separate budgets.
        assert!(l.check("com.b", lookup(), false, 1.0, "ci", t0).is_ok());
        let tx = endpoint_limit("GET", "/inApps/v1/transactions/1").unwrap();
        assert!(l.check("com.a", tx, false, 1.0, "ci", t0).is_ok());
        assert!(
            l.check("com.a", lookup(), true, 1.0, "ci", t0).is_ok(),
            "sandbox: 1/s, one token"
        );
        assert!(
            l.check("com.a", lookup(), true, 1.0, "ci", t0).is_err(),
            "sandbox is 10%"
        );
    }

    #[test]
    fn a_noisy_client_cannot_take_a_quiet_clients_share() {
        let l = AppleLimits::default();
        let t0 = Instant::now();
        assert!(l.check("com.a", lookup(), false, 1.0, "quiet", t0).is_ok());
        // The noisy one keeps asking for 5 s: it is held to half the rate (5/s, plus a burst
        // of 5), not the app's whole 10/s.
        let mut allowed = 0;
        for ms in 0..5000 {
            let at = t0 + Duration::from_millis(ms);
            if l.check("com.a", lookup(), false, 1.0, "noisy", at).is_ok() {
                allowed += 1;
            }
        }
        assert!(
            (28..=31).contains(&allowed),
            "noisy got {allowed} in 5 s of a 10/s budget"
        );
        // The quiet client still gets through.
        assert!(l
            .check(
                "com.a",
                lookup(),
                false,
                1.0,
                "quiet",
                t0 + Duration::from_millis(5000)
            )
            .is_ok());
    }

    #[test]
    fn the_fraction_splits_the_budget_between_replicas() {
        let l = AppleLimits::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(l.check("com.a", lookup(), false, 0.5, "ci", t0).is_ok());
        }
        assert!(l.check("com.a", lookup(), false, 0.5, "ci", t0).is_err());
    }
}
