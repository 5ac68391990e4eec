//! `RecordAudit`: a verified audit of one answer (issue 25). Each answer
//! (session and request number) counts once. A failure refunds its session
//! to the user, once per session: a reservation still pending is voided
//! whole (the worker's receipt for it is then refused as resolved); a
//! session already settled is paid back by a `refund` transfer without a
//! reservation (`pending_id` null) from the worker to the user, as far as the worker's available balance goes (no
//! account goes negative). At `suspend_after` failures the worker is
//! suspended: the coordinator sells no more tickets for it.

use serde_json::Value;

use crate::db::Db;
use crate::ledger::query::{audit_counts, available, load_job};
use crate::ledger::transfer::{insert_transfer, ledger_event, void};
use crate::ledger::{AuditRecorded, Command, LedgerError, to_i64};
use crate::p;

pub(crate) fn apply(
    tx: &mut dyn Db,
    cmd: &Command,
    events: &mut Vec<Value>,
) -> Result<AuditRecorded, LedgerError> {
    let Command::RecordAudit {
        reporter,
        worker,
        job_id,
        index,
        failed,
        report_sha256,
        suspend_after,
        now_ms,
    } = cmd
    else {
        return Err(LedgerError::Mismatch("not an audit".into()));
    };
    let job = load_job(tx, job_id)?.ok_or_else(|| LedgerError::UnknownJob(job_id.clone()))?;
    if &job.worker != worker {
        return Err(LedgerError::Mismatch(
            "the session belongs to another worker".into(),
        ));
    }
    if &job.user != reporter {
        return Err(LedgerError::Mismatch(
            "the session belongs to another user".into(),
        ));
    }
    let suspended_now = |tx: &mut dyn Db| -> Result<bool, LedgerError> {
        Ok(tx
            .query_opt(
                "SELECT suspended_at FROM workers WHERE peer_id = ?1",
                p![worker],
            )?
            .map(|r| r.opt_i64(0))
            .transpose()?
            .flatten()
            .is_some())
    };
    let seen = tx.query_opt(
        "SELECT outcome FROM audits WHERE job_id = ?1 AND idx = ?2",
        p![job_id, i64::from(*index)],
    )?;
    if seen.is_some() {
        let (passed, failed) = audit_counts(tx, worker)?;
        return Ok(AuditRecorded {
            duplicate: true,
            refunded: 0,
            suspended: suspended_now(tx)?,
            passed,
            failed,
        });
    }
    // A session is refunded by its first confirmed failure only.
    let refunded_before = tx
        .query_opt(
            "SELECT 1 FROM audits WHERE job_id = ?1 AND outcome = 'failed'",
            p![job_id],
        )?
        .is_some();
    let mut refunded = 0;
    if *failed && !refunded_before {
        match job.state.as_str() {
            "pending" => {
                void(tx, &job, "refund", *now_ms, events)?;
                refunded = job.reserved;
            }
            "posted" => {
                let owed = job.cost.unwrap_or(0);
                let can = available(tx, worker)?.unwrap_or(0).max(0);
                let amount = owed.min(can);
                if amount > 0 {
                    tx.write(
                        "UPDATE accounts SET debits_posted = debits_posted + ?2 WHERE id = ?1",
                        p![worker, amount],
                    )?;
                    tx.write(
                        "UPDATE accounts SET credits_posted = credits_posted + ?2 WHERE id = ?1",
                        p![&job.user, amount],
                    )?;
                    // A `refund` with no reservation of its own, from the
                    // worker back to the user, posted at once.
                    let id = insert_transfer(
                        tx,
                        "refund",
                        worker,
                        &job.user,
                        amount,
                        None,
                        Some(job_id),
                        *now_ms,
                    )?;
                    let mut ev =
                        ledger_event("refund", id, worker, &job.user, amount, Some(job_id), None);
                    ev["audit"] = Value::from(true);
                    ev["owed_milli"] = Value::from(owed);
                    events.push(ev);
                    refunded = amount;
                }
            }
            // Voided already (refunded, expired): nothing was paid.
            _ => {}
        }
    }
    tx.write(
        "INSERT INTO audits (job_id, idx, worker, reporter, outcome, refunded, report_sha256, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        p![
            job_id,
            i64::from(*index),
            worker,
            reporter,
            if *failed { "failed" } else { "passed" },
            refunded,
            report_sha256,
            to_i64(*now_ms)?
        ],
    )?;
    let (passed, failed_n) = audit_counts(tx, worker)?;
    if *failed && *suspend_after > 0 && failed_n >= i64::from(*suspend_after) {
        tx.write(
            "UPDATE workers SET suspended_at = ?2 WHERE peer_id = ?1 AND suspended_at IS NULL",
            p![worker, to_i64(*now_ms / 1000)?],
        )?;
    }
    Ok(AuditRecorded {
        duplicate: false,
        refunded,
        suspended: suspended_now(tx)?,
        passed,
        failed: failed_n,
    })
}
