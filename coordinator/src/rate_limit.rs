//! Rate limits with `governor`: per client IP on discovery-type reads, per
//! user on `/authorize`. A refusal carries the whole seconds to wait.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A keyed limiter with a quota of `n` an hour (burst `n`).
pub struct Limiter<K: Hash + Eq + Clone> {
    inner: DefaultKeyedRateLimiter<K>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn per_hour(n: u32) -> Self {
        let n = NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            inner: RateLimiter::keyed(Quota::per_hour(n)),
            clock: DefaultClock::default(),
        }
    }

    /// `Ok` when the request may go on; `Err(seconds)` to wait otherwise.
    pub fn check(&self, key: &K) -> Result<(), u64> {
        self.inner.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }

    /// Forgets keys whose quota has fully recovered (keeps memory bounded).
    pub fn prune(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

pub type IpLimiter = Limiter<IpAddr>;
pub type UserLimiter = Limiter<String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_is_enforced_per_key_with_retry_after() {
        let l = UserLimiter::per_hour(3);
        for _ in 0..3 {
            assert!(l.check(&"a".to_string()).is_ok());
        }
        let wait = l.check(&"a".to_string()).expect_err("fourth is refused");
        // 3 an hour: one comes back every 1200 s.
        assert!((1..=1200).contains(&wait), "wait {wait}");
        assert!(
            l.check(&"b".to_string()).is_ok(),
            "other keys are unaffected"
        );
    }
}
