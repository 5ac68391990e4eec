//! The sweeper: refunds reservations nobody settled in time and keeps the
//! in-memory tables (nonces, limiters, challenges) bounded.

use std::sync::Arc;
use std::time::Duration;
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

use crate::ledger::{Beat, Command, Outcome, WorkerRow};
use crate::{AppState, unix_ms, unix_secs};

/// How many reads of the worker table a replica made, and the rows they
/// brought (`troop_worker_refresh_rows_total`).
#[derive(Default)]
pub struct RefreshCounts {
    pub reads: std::sync::atomic::AtomicU64,
    pub rows: std::sync::atomic::AtomicU64,
}

/// Every live worker is read again this often (the reads between take
/// only the changed ones).
const FULL_REFRESH: Duration = Duration::from_secs(600);

/// With PostgreSQL, keeps this replica's worker table in step with what
/// workers registered and beat on other replicas (every second; backing
/// off while the database is down, and saying so on `/health`).
pub async fn refresh_workers(state: Arc<AppState>) {
    let mut delays = crate::pg::retry_delays();
    let mut flushed = std::time::Instant::now();
    // Where the last read ended (see `load_workers_changed_since`), and
    // when every live worker was last read.
    let mut mark: Option<i64> = None;
    let mut full = std::time::Instant::now();
    loop {
        if state.beats_batched() && flushed.elapsed() >= state.cfg.heartbeat_flush {
            flushed = std::time::Instant::now();
            write_beats(&state).await;
        }
        let since = unix_secs().saturating_sub(state.cfg.worker_ttl.as_secs());
        if full.elapsed() >= FULL_REFRESH {
            mark = None;
        }
        let after = mark;
        let r = state
            .read_with(move |db| crate::ledger::load_workers_changed_since(db, after, since))
            .await;
        let wait = match r {
            Ok((rows, next)) => {
                if mark.is_none() {
                    full = std::time::Instant::now();
                }
                mark = Some(next);
                {
                    use std::sync::atomic::Ordering::Relaxed;
                    state.worker_refresh.reads.fetch_add(1, Relaxed);
                    state
                        .worker_refresh
                        .rows
                        .fetch_add(rows.len() as u64, Relaxed);
                }
                ::metrics::counter!("troop_worker_refresh_rows_total").increment(rows.len() as u64);
                if let Some(mut map) = state.workers.writing() {
                    for w in rows {
                        match map.get_mut(&w.peer_id) {
                            // Our liveness is newer (a heartbeat this replica
                            // kept and has not written yet), unless the
                            // database says the worker left, signed no
                            // earlier than the newest heartbeat we took (a
                            // copy of an older one is no sign of life): keep
                            // it, and take the rest of the row (a proof,
                            // suspension or new models from another replica;
                            // this row is not read again).
                            Some(have)
                                if have.last_seen > w.last_seen
                                    && !(w.left_at.is_some()
                                        && w.last_signed >= have.last_signed) =>
                            {
                                *have = WorkerRow {
                                    last_seen: have.last_seen,
                                    last_signed: have.last_signed,
                                    active_jobs: have.active_jobs,
                                    queue_depth: have.queue_depth,
                                    left_at: have.left_at,
                                    ..w
                                };
                                state.worker_index.ensure(have);
                            }
                            _ => {
                                state.worker_index.ensure(&w);
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

/// Kept heartbeats written in one command at most: the writer runs one
/// command at a time, so tickets and receipts wait for a command's rows at
/// most (about 15 ms for 500 here), not for the interval's thousands.
const BEATS_PER_COMMAND: usize = 500;

/// Writes the heartbeats this replica kept since the last time, a command
/// per [`BEATS_PER_COMMAND`]. Lost when the database is down: the next
/// ones come within a heartbeat interval.
async fn write_beats(state: &AppState) {
    let mut beats: Vec<Beat> = match state.beats.locked() {
        Some(mut b) => b.drain().map(|(_, v)| v).collect(),
        None => return,
    };
    while !beats.is_empty() {
        let rest = beats.split_off(beats.len().min(BEATS_PER_COMMAND));
        let chunk = std::mem::replace(&mut beats, rest);
        let n = chunk.len();
        match state
            .writer
            .submit(Command::Heartbeats { beats: chunk }, None)
            .await
        {
            Ok(_) => {
                ::metrics::counter!("troop_heartbeat_writes_total").increment(1);
                tracing::debug!(workers = n, "kept heartbeats written");
            }
            Err(e) => tracing::warn!(error = %e, workers = n, "kept heartbeats not written"),
        }
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
