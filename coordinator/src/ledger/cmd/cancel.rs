//! `Cancel`: a reservation whose ticket was never handed out (signing
//! failed) is voided whole.

use serde_json::Value;

use crate::db::Db;
use crate::ledger::query::load_job;
use crate::ledger::transfer::void;
use crate::ledger::{LedgerError, Outcome};

pub(crate) fn apply(
    tx: &mut dyn Db,
    job_id: &str,
    now_ms: u64,
    events: &mut Vec<Value>,
) -> Result<Outcome, LedgerError> {
    let job = load_job(tx, job_id)?.ok_or_else(|| LedgerError::UnknownJob(job_id.into()))?;
    if job.state == "pending" {
        void(tx, &job, "refund", now_ms, events)?;
    }
    Ok(Outcome::Cancelled)
}
