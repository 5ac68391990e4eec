//! The double-entry primitives every command is built of: a transfer row,
//! its audit event, and voiding a reservation whole.

use serde_json::{Value, json};

use super::query::JobRow;
use super::{LedgerError, to_i64};
use crate::db::Db;
use crate::p;

#[allow(clippy::too_many_arguments)]
pub(crate) fn insert_transfer(
    tx: &mut dyn Db,
    kind: &str,
    debit: &str,
    credit: &str,
    amount: i64,
    pending_id: Option<i64>,
    job_id: Option<&str>,
    now_ms: u64,
) -> Result<i64, LedgerError> {
    let at = to_i64(now_ms)?;
    if let Some(id) = tx.next_transfer_id() {
        tx.write(
            "INSERT INTO transfers (id, kind, debit_account, credit_account, amount, pending_id, job_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            p![id, kind, debit, credit, amount, pending_id, job_id, at],
        )?;
        return Ok(id);
    }
    tx.query_one(
        "INSERT INTO transfers (kind, debit_account, credit_account, amount, pending_id, job_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
        p![kind, debit, credit, amount, pending_id, job_id, at],
    )?
    .i64(0)
}

pub(crate) fn ledger_event(
    kind: &str,
    transfer_id: i64,
    debit: &str,
    credit: &str,
    amount: i64,
    job_id: Option<&str>,
    pending_id: Option<i64>,
) -> Value {
    json!({
        "event": format!("ledger.{kind}"),
        "transfer_id": transfer_id,
        "debit_account": debit,
        "credit_account": credit,
        "amount_milli": amount,
        "job_id": job_id,
        "pending_id": pending_id,
    })
}

/// Releases a pending reservation whole (`refund` or `expire`).
pub(crate) fn void(
    tx: &mut dyn Db,
    job: &JobRow,
    kind: &str,
    now_ms: u64,
    events: &mut Vec<Value>,
) -> Result<i64, LedgerError> {
    tx.write(
        "UPDATE accounts SET debits_pending = debits_pending - ?2 WHERE id = ?1",
        p![&job.user, job.reserved],
    )?;
    tx.write(
        "UPDATE accounts SET credits_pending = credits_pending - ?2 WHERE id = ?1",
        p![&job.worker, job.reserved],
    )?;
    let id = insert_transfer(
        tx,
        kind,
        &job.user,
        &job.worker,
        job.reserved,
        Some(job.reserve_transfer),
        Some(&job.job_id),
        now_ms,
    )?;
    tx.write(
        "UPDATE jobs SET state = 'voided', cost = 0, resolved_at = ?2 WHERE job_id = ?1",
        p![&job.job_id, to_i64(now_ms)?],
    )?;
    events.push(ledger_event(
        kind,
        id,
        &job.user,
        &job.worker,
        job.reserved,
        Some(&job.job_id),
        Some(job.reserve_transfer),
    ));
    Ok(id)
}
