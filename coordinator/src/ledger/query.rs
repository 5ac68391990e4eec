//! Reads shared by the routes, the admin CLI and the commands: workers,
//! jobs, balances and reputations. Nothing here writes.

use super::{LedgerError, to_i64};
use crate::db::{Db, Row, V};
use crate::p;
use troop_protocol::MilliCredits;

/// A worker's or user's figures from settled sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Reputation {
    pub requests: i64,
    pub acknowledged: i64,
    pub disputed: i64,
    pub unacknowledged: i64,
}

fn reputation_from(r: &Row, at: usize) -> Result<Reputation, LedgerError> {
    Ok(Reputation {
        requests: r.i64(at)?,
        acknowledged: r.i64(at + 1)?,
        disputed: r.i64(at + 2)?,
        unacknowledged: r.i64(at + 3)?,
    })
}

/// Every worker's reputation.
pub fn worker_reputations(
    conn: &mut dyn Db,
) -> Result<std::collections::HashMap<String, Reputation>, LedgerError> {
    conn.query(
        "SELECT account, requests, acknowledged, disputed, unacknowledged FROM reputation
         WHERE role = 'worker'",
        p![],
    )?
    .iter()
    .map(|r| Ok((r.str(0)?, reputation_from(r, 1)?)))
    .collect()
}

/// [`worker_reputations`] of the workers `ids` only (one indexed read).
pub fn worker_reputations_of(
    conn: &mut dyn Db,
    ids: &[String],
) -> Result<std::collections::HashMap<String, Reputation>, LedgerError> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let (list, params) = in_list(ids);
    let sql = format!(
        "SELECT account, requests, acknowledged, disputed, unacknowledged FROM reputation
         WHERE role = 'worker' AND account IN ({list})"
    );
    conn.query(&sql, &params)?
        .iter()
        .map(|r| Ok((r.str(0)?, reputation_from(r, 1)?)))
        .collect()
}

/// `?1, ?2, ...` for `ids` and their values, padded with empty ids (no
/// account has one) to 10, 100 or 1,000 entries: a few statement texts
/// whatever the list's length, so a connection's statement cache stays
/// small.
fn in_list(ids: &[String]) -> (String, Vec<V>) {
    let n = [10, 100, 1000]
        .into_iter()
        .find(|&b| b >= ids.len())
        .unwrap_or(ids.len());
    let sql = (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut params: Vec<V> = ids.iter().map(V::from).collect();
    params.resize(n, V::from(""));
    (sql, params)
}

pub fn reputation_of(
    conn: &mut dyn Db,
    account: &str,
    role: &str,
) -> Result<Reputation, LedgerError> {
    conn.query_opt(
        "SELECT requests, acknowledged, disputed, unacknowledged FROM reputation
         WHERE account = ?1 AND role = ?2",
        p![account, role],
    )?
    .map(|r| reputation_from(&r, 0))
    .transpose()
    .map(Option::unwrap_or_default)
}

/// A registered worker as the ledger stores it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkerRow {
    pub peer_id: String,
    pub receipt_key: Vec<u8>,
    pub models: Vec<String>,
    pub addresses: Vec<String>,
    pub version: Option<String>,
    pub multiplier_milli: i64,
    pub verified_gflops: Option<f64>,
    pub active_jobs: u32,
    pub queue_depth: u32,
    pub registered_at: u64,
    /// Unix seconds.
    pub last_seen: u64,
    /// Unix seconds when the worker said it was leaving (cleared by its
    /// next registration or heartbeat).
    pub left_at: Option<u64>,
    /// Unix seconds when confirmed audit failures suspended the worker: no
    /// tickets are sold for it from then on.
    pub suspended_at: Option<u64>,
    /// What computed the standing proof (cpu, wgpu, cuda) and the adapter.
    pub proof_backend: Option<String>,
    pub proof_adapter: Option<String>,
    /// When the newest heartbeat a replica kept and wrote was signed (Unix
    /// seconds): an older or the same one is a replay and changes nothing.
    pub last_signed: Option<u64>,
}

impl WorkerRow {
    /// Whether the worker counts as alive at `now` (seen within `ttl`
    /// seconds and not gone).
    pub fn alive(&self, now: u64, ttl: u64) -> bool {
        self.left_at.is_none() && now.saturating_sub(self.last_seen) <= ttl
    }
}

/// Reads one worker.
pub fn load_worker(conn: &mut dyn Db, peer_id: &str) -> Result<Option<WorkerRow>, LedgerError> {
    conn.query_opt(
        "SELECT peer_id, receipt_key, models, addresses, version, multiplier_milli, verified_gflops,
                active_jobs, queue_depth, registered_at, last_seen, left_at, suspended_at, proof_backend, proof_adapter, last_signed FROM workers WHERE peer_id = ?1",
        p![peer_id],
    )?
    .map(|r| worker_from_row(&r))
    .transpose()
}

/// Reads every worker.
pub fn load_workers(conn: &mut dyn Db) -> Result<Vec<WorkerRow>, LedgerError> {
    conn.query(
        "SELECT peer_id, receipt_key, models, addresses, version, multiplier_milli, verified_gflops,
                active_jobs, queue_depth, registered_at, last_seen, left_at, suspended_at, proof_backend, proof_adapter, last_signed FROM workers ORDER BY peer_id",
        p![],
    )?
    .iter()
    .map(worker_from_row)
    .collect()
}

/// PostgreSQL only: workers seen since `since_secs` whose row changed in
/// a transaction that had not ended when the read that gave `after` began
/// (every one for `None`), and the mark to give the next read. The
/// `workers_changed` trigger (PostgreSQL migration 10) stamps a row with
/// its transaction's id when anything but its liveness changed, or its
/// `last_seen` moved by 30 s or more; `pg_snapshot_xmin` before the read
/// is the oldest transaction still running, so nothing committed later is
/// missed and little is read twice.
pub fn load_workers_changed_since(
    conn: &mut dyn Db,
    after: Option<i64>,
    since_secs: u64,
) -> Result<(Vec<WorkerRow>, i64), LedgerError> {
    let mark = conn
        .query_one(
            "SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS TEXT) AS BIGINT)",
            p![],
        )?
        .i64(0)?;
    let cols = "SELECT peer_id, receipt_key, models, addresses, version, multiplier_milli, verified_gflops,
                active_jobs, queue_depth, registered_at, last_seen, left_at, suspended_at, proof_backend, proof_adapter, last_signed FROM workers";
    let rows = match after {
        None => conn.query(
            &format!("{cols} WHERE last_seen >= ?1"),
            p![to_i64(since_secs)?],
        )?,
        Some(after) => conn.query(
            &format!(
                "{cols} WHERE last_seen >= ?1 AND changed_xid >= CAST(CAST(CAST(?2 AS BIGINT) AS TEXT) AS xid8)"
            ),
            p![to_i64(since_secs)?, after],
        )?,
    };
    let rows = rows.iter().map(worker_from_row).collect::<Result<_, _>>()?;
    Ok((rows, mark))
}

fn worker_from_row(r: &Row) -> Result<WorkerRow, LedgerError> {
    let small = |i: usize| -> Result<u32, LedgerError> {
        Ok(u32::try_from(r.i64(i)?.max(0)).unwrap_or(u32::MAX))
    };
    Ok(WorkerRow {
        peer_id: r.str(0)?,
        receipt_key: r.bytes(1)?,
        models: serde_json::from_str(&r.str(2)?).unwrap_or_default(),
        addresses: serde_json::from_str(&r.str(3)?).unwrap_or_default(),
        version: r.opt_str(4)?,
        multiplier_milli: r.i64(5)?,
        verified_gflops: r.opt_f64(6)?,
        active_jobs: small(7)?,
        queue_depth: small(8)?,
        registered_at: r.i64(9)?.max(0) as u64,
        last_seen: r.i64(10)?.max(0) as u64,
        left_at: r.opt_i64(11)?.map(|t| t.max(0) as u64),
        suspended_at: r.opt_i64(12)?.map(|t| t.max(0) as u64),
        proof_backend: r.opt_str(13)?,
        proof_adapter: r.opt_str(14)?,
        last_signed: r.opt_i64(15)?.map(|t| t.max(0) as u64),
    })
}

#[derive(Debug)]
pub(crate) struct JobRow {
    pub job_id: String,
    pub user: String,
    pub worker: String,
    pub model: String,
    pub reserve_transfer: i64,
    pub reserved: i64,
    pub multiplier_milli: i64,
    pub state: String,
    pub receipt_sha256: Option<String>,
    pub cost: Option<i64>,
    /// Unix ms of the reservation (the ticket's issue).
    pub created_at: i64,
}

/// The columns of a job that [`load_job`] reads (the PostgreSQL writer
/// reads a batch's jobs ahead with the same list).
pub(crate) const JOB_COLUMNS: &str = "job_id, user_id, worker_id, model, reserve_transfer, reserved, \
     multiplier_milli, state, receipt_sha256, cost, created_at";

pub(crate) fn load_job(tx: &mut dyn Db, job_id: &str) -> Result<Option<JobRow>, LedgerError> {
    let row = match tx.prefetched_job(job_id) {
        Some(row) => row,
        None => tx.query_opt(
            "SELECT job_id, user_id, worker_id, model, reserve_transfer, reserved, multiplier_milli, state,
                    receipt_sha256, cost, created_at FROM jobs WHERE job_id = ?1",
            p![job_id],
        )?,
    };
    row.map(|r| {
        Ok(JobRow {
            job_id: r.str(0)?,
            user: r.str(1)?,
            worker: r.str(2)?,
            model: r.str(3)?,
            reserve_transfer: r.i64(4)?,
            reserved: r.i64(5)?,
            multiplier_milli: r.i64(6)?,
            state: r.str(7)?,
            receipt_sha256: r.opt_str(8)?,
            cost: r.opt_i64(9)?,
            created_at: r.i64(10)?,
        })
    })
    .transpose()
}

/// A worker's audits as reported and verified: (passed, failed).
pub fn audit_counts(conn: &mut dyn Db, worker: &str) -> Result<(i64, i64), LedgerError> {
    let r = conn.query_one(
        "SELECT CAST(COALESCE(SUM(CASE WHEN outcome = 'passed' THEN 1 ELSE 0 END), 0) AS BIGINT),
                CAST(COALESCE(SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END), 0) AS BIGINT)
         FROM audits WHERE worker = ?1",
        p![worker],
    )?;
    Ok((r.i64(0)?, r.i64(1)?))
}

/// Every worker's audits: peer id -> (passed, failed).
pub fn all_audit_counts(
    conn: &mut dyn Db,
) -> Result<std::collections::HashMap<String, (i64, i64)>, LedgerError> {
    conn.query(
        "SELECT worker, CAST(SUM(CASE WHEN outcome = 'passed' THEN 1 ELSE 0 END) AS BIGINT),
                CAST(SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) AS BIGINT)
         FROM audits GROUP BY worker",
        p![],
    )?
    .iter()
    .map(|r| Ok((r.str(0)?, (r.i64(1)?, r.i64(2)?))))
    .collect()
}

/// [`all_audit_counts`] of the workers `ids` only.
pub fn audit_counts_of(
    conn: &mut dyn Db,
    ids: &[String],
) -> Result<std::collections::HashMap<String, (i64, i64)>, LedgerError> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let (list, params) = in_list(ids);
    let sql = format!(
        "SELECT worker, CAST(SUM(CASE WHEN outcome = 'passed' THEN 1 ELSE 0 END) AS BIGINT),
                CAST(SUM(CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END) AS BIGINT)
         FROM audits WHERE worker IN ({list}) GROUP BY worker"
    );
    conn.query(&sql, &params)?
        .iter()
        .map(|r| Ok((r.str(0)?, (r.i64(1)?, r.i64(2)?))))
        .collect()
}

/// A session's user, worker and model.
pub fn job_parties(
    conn: &mut dyn Db,
    job_id: &str,
) -> Result<Option<(String, String, String)>, LedgerError> {
    conn.query_opt(
        "SELECT user_id, worker_id, model FROM jobs WHERE job_id = ?1",
        p![job_id],
    )?
    .map(|r| Ok((r.str(0)?, r.str(1)?, r.str(2)?)))
    .transpose()
}

/// Available balance of an account (None when it does not exist).
pub fn available(conn: &mut dyn Db, account: &str) -> Result<Option<MilliCredits>, LedgerError> {
    conn.query_opt(
        "SELECT credits_posted - debits_posted - debits_pending FROM accounts WHERE id = ?1",
        p![account],
    )?
    .map(|r| r.i64(0))
    .transpose()
}
