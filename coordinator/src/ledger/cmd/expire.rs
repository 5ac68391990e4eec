//! `ExpireDue`: reservations whose ticket expired without a receipt are
//! voided whole, oldest first, at most `limit` in one command.

use serde_json::Value;

use crate::db::Db;
use crate::ledger::query::load_job;
use crate::ledger::to_i64;
use crate::ledger::transfer::void;
use crate::ledger::{LedgerError, Outcome};
use crate::p;

pub(crate) fn apply(
    tx: &mut dyn Db,
    cutoff_secs: u64,
    now_ms: u64,
    limit: usize,
    events: &mut Vec<Value>,
) -> Result<Outcome, LedgerError> {
    let ids: Vec<String> = tx
        .query(
            "SELECT job_id FROM jobs WHERE state = 'pending' AND expires_at < ?1
             ORDER BY expires_at LIMIT ?2",
            p![to_i64(cutoff_secs)?, to_i64(limit as u64)?],
        )?
        .iter()
        .map(|r| r.str(0))
        .collect::<Result<_, _>>()?;
    for id in &ids {
        if let Some(job) = load_job(tx, id)? {
            void(tx, &job, "expire", now_ms, events)?;
        }
    }
    Ok(Outcome::Expired { jobs: ids })
}
