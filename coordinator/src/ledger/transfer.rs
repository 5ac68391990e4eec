//! The double-entry primitives every command is built of: a transfer row,
//! its audit event, and voiding a reservation whole.

use serde_json::{Value, json};

use super::change::{AccountDelta, JobChange, TransferRow};
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
        tx.add_transfer(TransferRow {
            id,
            kind: kind.to_string(),
            debit_account: debit.to_string(),
            credit_account: credit.to_string(),
            amount,
            pending_id,
            job_id: job_id.map(str::to_string),
            created_at: at,
        })?;
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
    tx.add_to_account(
        &job.user,
        AccountDelta {
            debits_pending: -job.reserved,
            ..AccountDelta::default()
        },
    )?;
    tx.add_to_account(
        &job.worker,
        AccountDelta {
            credits_pending: -job.reserved,
            ..AccountDelta::default()
        },
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
    tx.change_job(
        &job.job_id,
        JobChange {
            state: Some("voided"),
            cost: Some(0),
            resolved_at: Some(to_i64(now_ms)?),
            ..JobChange::default()
        },
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
