//! `Settle`: a signed receipt resolves its reservation exactly once: the
//! cost (the session's charged lines, capped by what was reserved) is
//! posted to the worker and the rest released to the user; a replay of
//! the same receipt answers the same settlement.

use serde_json::{Value, json};

use troop_protocol::receipt::{JobStatus, Receipt};
use troop_protocol::usage::{LineStatus, RequestLine, charge_session_with};

use crate::db::Db;
use crate::ledger::change::{AccountDelta, JobChange};
use crate::ledger::query::load_job;
use crate::ledger::transfer::{insert_transfer, ledger_event, void};
use crate::ledger::{LedgerError, Settlement, to_i64};

/// Cost of a job: its seconds times the multiplier, never more than reserved.
pub fn job_cost(
    started_at_ms: u64,
    finished_at_ms: u64,
    multiplier_milli: i64,
    reserved: i64,
) -> i64 {
    let ms = i128::from(finished_at_ms.saturating_sub(started_at_ms));
    let cost = ms * i128::from(multiplier_milli.max(0)) / 1000;
    i64::try_from(cost.min(i128::from(reserved))).unwrap_or(reserved)
}

pub(crate) fn apply(
    tx: &mut dyn Db,
    r: &Receipt,
    receipt_sha256: &str,
    (now_ms, unacked_cap_ms, tolerance_ms): (u64, u64, u64),
    ack_signatures: Option<&[bool]>,
    events: &mut Vec<Value>,
) -> Result<Settlement, LedgerError> {
    let job = load_job(tx, &r.job_id)?.ok_or_else(|| LedgerError::UnknownJob(r.job_id.clone()))?;
    if job.worker != r.worker {
        return Err(LedgerError::Mismatch(
            "the job belongs to another worker".into(),
        ));
    }
    if job.user != r.user {
        return Err(LedgerError::Mismatch(
            "the job belongs to another user".into(),
        ));
    }
    if job.model != r.model {
        return Err(LedgerError::Mismatch(format!(
            "the job was for model {}",
            job.model
        )));
    }
    if r.finished_at < r.started_at {
        return Err(LedgerError::Mismatch(
            "finished_at is before started_at".into(),
        ));
    }
    if let Some(prev) = &job.receipt_sha256 {
        if prev != receipt_sha256 {
            return Err(LedgerError::Conflict(job.job_id));
        }
        let cost = job.cost.unwrap_or(0);
        let settled = job.state == "posted";
        return Ok(Settlement {
            job_id: job.job_id,
            user: job.user,
            worker: job.worker,
            outcome: if settled { "settled" } else { "refunded" },
            cost,
            refunded: job.reserved - cost,
            replayed: true,
        });
    }
    if job.state != "pending" {
        return Err(LedgerError::ReservationExpired(job.job_id));
    }
    let status = match r.status {
        JobStatus::Completed => "completed",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    };
    // The charging rule (see `troop_protocol::usage::charge_session`): a
    // receipt without request lines is one unacknowledged request.
    let lines: std::borrow::Cow<'_, [RequestLine]> = if r.requests.is_empty() {
        vec![RequestLine {
            index: 0,
            started_at: r.started_at,
            finished_at: r.finished_at,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            chunks: r.completion_tokens,
            status: match r.status {
                JobStatus::Completed => LineStatus::Completed,
                JobStatus::Failed => LineStatus::Failed,
                JobStatus::Cancelled => LineStatus::Cancelled,
            },
            ack: None,
        }]
        .into()
    } else {
        r.requests.as_slice().into()
    };
    let charge = charge_session_with(
        &lines,
        &job.user,
        &job.job_id,
        &job.worker,
        u64::try_from(job.created_at)
            .unwrap_or(0)
            .saturating_sub(tolerance_ms),
        now_ms.saturating_add(tolerance_ms),
        unacked_cap_ms,
        ack_signatures,
    )
    .map_err(|e| LedgerError::BadAck(e.to_string()))?;
    // A legacy receipt of a failed or cancelled job is refunded whole.
    let billable = !r.requests.is_empty() || r.status == JobStatus::Completed;
    let cost = if billable {
        job_cost(0, charge.ms, job.multiplier_milli, job.reserved)
    } else {
        0
    };
    let counts = [
        to_i64(charge.requests)?,
        to_i64(charge.acknowledged)?,
        to_i64(charge.disputed)?,
        to_i64(charge.unacknowledged)?,
    ];
    for (account, role) in [(&job.worker, "worker"), (&job.user, "user")] {
        tx.add_reputation(account, role, counts)?;
    }
    let (outcome, cost) = if cost > 0 {
        tx.add_to_account(
            &job.user,
            AccountDelta {
                debits_pending: -job.reserved,
                debits_posted: cost,
                ..AccountDelta::default()
            },
        )?;
        tx.add_to_account(
            &job.worker,
            AccountDelta {
                credits_pending: -job.reserved,
                credits_posted: cost,
                ..AccountDelta::default()
            },
        )?;
        let id = insert_transfer(
            tx,
            "settle",
            &job.user,
            &job.worker,
            cost,
            Some(job.reserve_transfer),
            Some(&job.job_id),
            now_ms,
        )?;
        tx.change_job(
            &job.job_id,
            JobChange {
                state: Some("posted"),
                cost: Some(cost),
                resolved_at: Some(to_i64(now_ms)?),
                receipt_sha256: Some(receipt_sha256.to_string()),
                receipt_status: Some(status),
            },
        )?;
        let mut ev = ledger_event(
            "settle",
            id,
            &job.user,
            &job.worker,
            cost,
            Some(&job.job_id),
            Some(job.reserve_transfer),
        );
        ev["released_milli"] = json!(job.reserved - cost);
        events.push(ev);
        ("settled", cost)
    } else {
        void(tx, &job, "refund", now_ms, events)?;
        tx.change_job(
            &job.job_id,
            JobChange {
                receipt_sha256: Some(receipt_sha256.to_string()),
                receipt_status: Some(status),
                ..JobChange::default()
            },
        )?;
        ("refunded", 0)
    };
    Ok(Settlement {
        job_id: job.job_id,
        user: job.user,
        worker: job.worker,
        outcome,
        cost,
        refunded: job.reserved - cost,
        replayed: false,
    })
}
