//! The sweeper: refunds reservations nobody settled in time and keeps the
//! in-memory tables (nonces, limiters, challenges) bounded.

use std::sync::Arc;
use std::time::Duration;
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

use crate::ledger::{Beat, Command, Outcome};
use crate::{AppState, unix_ms, unix_secs};

/// With PostgreSQL, keeps this replica's worker table in step with what
/// workers registered and beat on other replicas (every second; backing
/// off while the database is down, and saying so on `/health`).
pub async fn refresh_workers(state: Arc<AppState>) {
    let mut delays = crate::pg::retry_delays();
    let mut flushed = std::time::Instant::now();
    loop {
        if state.beats_batched() && flushed.elapsed() >= state.cfg.heartbeat_flush {
            flushed = std::time::Instant::now();
            write_beats(&state).await;
        }
        let since = unix_secs().saturating_sub(state.cfg.worker_ttl.as_secs());
        let r = state
            .read_with(move |db| crate::ledger::load_workers_seen_since(db, since))
            .await;
        let wait = match r {
            Ok(rows) => {
                if let Some(mut map) = state.workers.writing() {
                    for w in rows {
                        match map.get(&w.peer_id) {
                            // Ours is newer, unless the database says the
                            // worker left, signed no earlier than the newest
                            // heartbeat we took (a copy of an older one is
                            // no sign of life).
                            Some(have)
                                if have.last_seen > w.last_seen
                                    && !(w.left_at.is_some()
                                        && w.last_signed >= have.last_signed) => {}
                            _ => {
                                map.insert(w.peer_id.clone(), w);
                            }
                        }
                    }
                }
                delays = crate::pg::retry_delays();
                Duration::from_secs(1)
            }
            Err(e) => {
                tracing::debug!(error = %e, "worker refresh failed");
                delays.next().unwrap_or(Duration::from_secs(10))
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Writes the heartbeats this replica kept since the last time, in one
/// command. Lost when the database is down: the next ones come within a
/// heartbeat interval.
async fn write_beats(state: &AppState) {
    let beats: Vec<Beat> = match state.beats.locked() {
        Some(mut b) => b.drain().map(|(_, v)| v).collect(),
        None => return,
    };
    if beats.is_empty() {
        return;
    }
    let n = beats.len();
    match state
        .writer
        .submit(Command::Heartbeats { beats }, None)
        .await
    {
        Ok(_) => {
            ::metrics::counter!("troop_heartbeat_writes_total").increment(1);
            tracing::debug!(workers = n, "kept heartbeats written");
        }
        Err(e) => tracing::warn!(error = %e, workers = n, "kept heartbeats not written"),
    }
}

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
                Err(e @ crate::ledger::LedgerError::Unavailable(_)) => {
                    state.note_db::<()>(&Err(e));
                    break;
                }
                Ok(Outcome::Expired { jobs }) => {
                    state.note_db(&Ok(()));
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
        crate::routes::hardware::sweep_missed(&state).await;
        let skew = state.cfg.max_skew_secs;
        if state.shared() {
            let before = now.saturating_sub(skew);
            let _ = state
                .read_with(move |db| crate::pg::prune(db, before, unix_ms()))
                .await;
        }
        if let Some(mut n) = state.nonces.locked() {
            n.retain(|_, ts| now.saturating_sub(*ts) <= skew);
        }
        state.discovery_limiter.prune();
        state.authorize_limiter.prune();
        state.account_read_limiter.prune();
        state.authorize_ip_limiter.prune();
        state.register_ip_limiter.prune();
    }
}
