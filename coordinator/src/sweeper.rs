//! The sweeper: refunds reservations nobody settled in time and keeps the
//! in-memory tables (nonces, limiters, challenges) bounded.

use std::sync::Arc;
use std::time::Duration;

use crate::ledger::{Command, Outcome};
use crate::{AppState, unix_ms, unix_secs};

/// Refunds reservations whose ticket expired more than the grace period
/// ago, and keeps the in-memory tables bounded.
pub async fn run(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.cfg.sweep_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = unix_secs();
        let cutoff = now.saturating_sub(state.cfg.reservation_grace.as_secs());
        loop {
            match state
                .writer
                .submit(
                    Command::ExpireDue {
                        cutoff_secs: cutoff,
                        now_ms: unix_ms(),
                        limit: 1000,
                    },
                    None,
                )
                .await
            {
                Ok(Outcome::Expired { jobs }) => {
                    if !jobs.is_empty() {
                        tracing::info!(count = jobs.len(), "refunded expired reservations");
                    }
                    if jobs.len() < 1000 {
                        break;
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "expiry sweep failed");
                    break;
                }
            }
        }
        let skew = state.cfg.max_skew_secs;
        if let Ok(mut n) = state.nonces.lock() {
            n.retain(|_, ts| now.saturating_sub(*ts) <= skew);
        }
        state.discovery_limiter.prune();
        state.authorize_limiter.prune();
        state.account_read_limiter.prune();
        state.authorize_ip_limiter.prune();
        state.register_ip_limiter.prune();
    }
}
