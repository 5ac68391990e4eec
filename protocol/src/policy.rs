//! Timeouts, retries and the circuit breaker every Troop client follows.

use std::time::Duration;

use backon::ExponentialBuilder;

/// Discovery (DHT lookups, bootstrap, worker tables).
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Authorization (getting a ticket, registering, heartbeats).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// One inference job, end to end.
pub const INFERENCE_TIMEOUT: Duration = Duration::from_secs(300);

/// Three retries, after 1 s, 2 s and 4 s (no jitter, so the schedule is
/// exactly the documented one).
pub fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_factor(2.0)
        .with_max_delay(Duration::from_secs(4))
        .with_max_times(3)
}

/// Unix milliseconds now (the wall clock every Troop part reads; 0 before
/// 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix seconds now.
pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}

/// A source of monotonic time, injected so tests never sleep.
pub trait Clock: Send + Sync {
    /// Time since an arbitrary fixed origin.
    fn now(&self) -> Duration;
    /// Unix milliseconds (the wall clock); a test clock may pin it.
    fn unix_ms(&self) -> u64 {
        unix_ms()
    }
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: std::time::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: std::time::Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that only moves when told to (for tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    nanos: std::sync::atomic::AtomicU64,
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        self.nanos.fetch_add(
            u64::try_from(by.as_nanos()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl<C: Clock + ?Sized> Clock for std::sync::Arc<C> {
    fn now(&self) -> Duration {
        (**self).now()
    }
}

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls are refused until the cool-down has passed.
    Open,
    /// One trial call is let through; its outcome closes or re-opens.
    HalfOpen,
}

/// A circuit breaker: opens after `threshold` consecutive failures, lets one
/// trial through after `cooldown`, closes again on a success.
#[derive(Debug)]
pub struct CircuitBreaker<C: Clock> {
    clock: C,
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    opened_at: Option<Duration>,
    trial_in_flight: bool,
}

/// Defaults from the design: opens after 5 failures, half-opens after 60 s.
pub const BREAKER_THRESHOLD: u32 = 5;
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(60);

impl<C: Clock> CircuitBreaker<C> {
    pub fn new(clock: C) -> Self {
        Self::with_policy(clock, BREAKER_THRESHOLD, BREAKER_COOLDOWN)
    }

    pub fn with_policy(clock: C, threshold: u32, cooldown: Duration) -> Self {
        Self {
            clock,
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            opened_at: None,
            trial_in_flight: false,
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) if self.clock.now().saturating_sub(at) >= self.cooldown => {
                BreakerState::HalfOpen
            }
            Some(_) => BreakerState::Open,
        }
    }

    /// Asks to make a call. `false` means: don't, the breaker is open (or
    /// its one half-open trial is already out).
    pub fn try_acquire(&mut self) -> bool {
        match self.state() {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                if self.trial_in_flight {
                    false
                } else {
                    self.trial_in_flight = true;
                    true
                }
            }
        }
    }

    pub fn record_success(&mut self) {
        self.failures = 0;
        self.opened_at = None;
        self.trial_in_flight = false;
    }

    /// Gives back a call's permit without an outcome (the call ended for a
    /// reason that says nothing of the callee's health, or never ended):
    /// a half-open breaker lets its next trial through.
    pub fn release(&mut self) {
        self.trial_in_flight = false;
    }

    pub fn record_failure(&mut self) {
        self.trial_in_flight = false;
        match self.state() {
            BreakerState::HalfOpen => self.opened_at = Some(self.clock.now()),
            BreakerState::Open => {}
            BreakerState::Closed => {
                self.failures += 1;
                if self.failures >= self.threshold {
                    self.opened_at = Some(self.clock.now());
                }
            }
        }
    }

    /// Time left until a trial call is allowed (zero unless open).
    pub fn retry_in(&self) -> Duration {
        match self.opened_at {
            Some(at) => self
                .cooldown
                .saturating_sub(self.clock.now().saturating_sub(at)),
            None => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn retry_schedule_is_1_2_4_seconds() {
        use backon::BackoffBuilder;
        let delays: Vec<Duration> = retry_policy().build().collect();
        assert_eq!(
            delays,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(4)
            ]
        );
    }

    #[test]
    fn breaker_opens_after_five_and_half_opens_after_sixty_seconds() {
        let clock = Arc::new(ManualClock::default());
        let mut b = CircuitBreaker::new(clock.clone());
        for _ in 0..4 {
            assert!(b.try_acquire());
            b.record_failure();
            assert_eq!(b.state(), BreakerState::Closed);
        }
        assert!(b.try_acquire());
        b.record_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.try_acquire());
        clock.advance(Duration::from_secs(59));
        assert!(!b.try_acquire());
        assert_eq!(b.retry_in(), Duration::from_secs(1));
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire(), "one trial");
        assert!(!b.try_acquire(), "only one trial at a time");
        b.record_failure();
        assert_eq!(b.state(), BreakerState::Open, "a failed trial re-opens");
        clock.advance(Duration::from_secs(60));
        assert!(b.try_acquire());
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_acquire());
    }

    #[test]
    fn a_released_trial_lets_the_next_one_through() {
        let clock = Arc::new(ManualClock::default());
        let mut b = CircuitBreaker::with_policy(clock.clone(), 1, Duration::from_secs(1));
        assert!(b.try_acquire());
        b.record_failure();
        clock.advance(Duration::from_secs(1));
        assert!(b.try_acquire(), "the trial");
        assert!(!b.try_acquire());
        b.release();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire(), "released: another trial");
    }

    #[test]
    fn success_resets_the_failure_count() {
        let clock = Arc::new(ManualClock::default());
        let mut b = CircuitBreaker::new(clock);
        for _ in 0..4 {
            b.record_failure();
        }
        b.record_success();
        for _ in 0..4 {
            b.record_failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
