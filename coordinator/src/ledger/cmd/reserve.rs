//! `Reserve`: a ticket's credits are held (a pending transfer user ->
//! worker), after the new user's starter grant when it has none yet and
//! the grant policy allows one.

use serde_json::Value;
use troop_protocol::MilliCredits;

use crate::db::Db;
use crate::ledger::change::AccountDelta;
use crate::ledger::transfer::{insert_transfer, ledger_event};
use crate::ledger::{LedgerError, Outcome};
use crate::ledger::{MINT, to_i64};
use crate::p;

/// Limits on starter credits, checked when a new account asks for its first
/// ticket (inside the same transaction as the grant).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrantPolicy {
    /// The client address the request came from.
    pub ip: String,
    /// Most grants to one address in 24 hours (0: no limit).
    pub per_ip_per_day: u32,
    /// Most milli-credits granted in all in one hour (0: no limit).
    pub per_hour_milli: i64,
    /// Hashcash bits a new account must show (0: none).
    pub pow_bits: u32,
    /// Whether the request carried a proof of work of `pow_bits`.
    pub pow_ok: bool,
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn apply(
    tx: &mut dyn Db,
    user: &str,
    worker: &str,
    model: &str,
    job_id: &str,
    amount: MilliCredits,
    multiplier_milli: i64,
    (starter_grant, policy): (MilliCredits, &GrantPolicy),
    expires_at: u64,
    now_ms: u64,
    events: &mut Vec<Value>,
) -> Result<Outcome, LedgerError> {
    if amount < 0 || starter_grant < 0 {
        return Err(LedgerError::Range("negative amount".into()));
    }
    if user == worker {
        return Err(LedgerError::Range("a user cannot buy from itself".into()));
    }
    let now_i = to_i64(now_ms)?;
    // Everything the checks need, in one read (one round trip on
    // PostgreSQL); the checks then run in their order.
    let r = tx.query_one(
        "SELECT (SELECT kind FROM accounts WHERE id = ?1),
                (SELECT kind FROM accounts WHERE id = ?2),
                (SELECT granted FROM accounts WHERE id = ?2),
                (SELECT credits_posted - debits_posted - debits_pending FROM accounts WHERE id = ?2),
                (SELECT COUNT(*) FROM jobs WHERE job_id = ?3)",
        p![worker, user, job_id],
    )?;
    if r.opt_str(0)?.as_deref() != Some("worker") {
        return Err(LedgerError::UnknownWorker(worker.into()));
    }
    // A user refused below wrote nothing, unless it is new (the PostgreSQL
    // writer sends writes ahead of their commands' ends).
    let (kind, granted, mut avail) = match r.opt_str(1)? {
        Some(kind) => (kind, r.i64(2)?, r.i64(3)?),
        None => {
            tx.write(
                "INSERT INTO accounts (id, kind, created_at) VALUES (?1, 'user', ?2)",
                p![user, now_i],
            )?;
            ("user".to_string(), 0, 0)
        }
    };
    if kind == "mint" {
        return Err(LedgerError::Range("reserved account id".into()));
    }
    let mut grant = 0;
    if granted == 0 && starter_grant > 0 {
        check_grant(tx, policy, starter_grant, now_ms)?;
        grant = starter_grant;
        tx.write(
            "INSERT INTO starter_grants (account, ip, amount, at) VALUES (?1, ?2, ?3, ?4)",
            p![user, &policy.ip, grant, now_i],
        )?;
        tx.write(
            "UPDATE accounts SET granted = 1, credits_posted = credits_posted + ?2 WHERE id = ?1",
            p![user, grant],
        )?;
        tx.write(
            "UPDATE accounts SET debits_posted = debits_posted + ?2 WHERE id = ?1",
            p![MINT, grant],
        )?;
        let id = insert_transfer(tx, "grant", MINT, user, grant, None, None, now_ms)?;
        events.push(ledger_event("grant", id, MINT, user, grant, None, None));
        avail += grant;
    }
    if avail < amount {
        return Err(LedgerError::InsufficientFunds {
            available: avail,
            required: amount,
        });
    }
    if r.i64(4)? > 0 {
        return Err(LedgerError::DuplicateJob(job_id.into()));
    }
    tx.add_to_account(
        user,
        AccountDelta {
            debits_pending: amount,
            ..AccountDelta::default()
        },
    )?;
    tx.add_to_account(
        worker,
        AccountDelta {
            credits_pending: amount,
            ..AccountDelta::default()
        },
    )?;
    let id = insert_transfer(
        tx,
        "reserve",
        user,
        worker,
        amount,
        None,
        Some(job_id),
        now_ms,
    )?;
    tx.write(
        "INSERT INTO jobs (job_id, user_id, worker_id, model, reserve_transfer, reserved, multiplier_milli,
                           state, expires_at, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?9)",
        p![
            job_id,
            user,
            worker,
            model,
            id,
            amount,
            multiplier_milli,
            to_i64(expires_at)?,
            now_i
        ],
    )?;
    events.push(ledger_event(
        "reserve",
        id,
        user,
        worker,
        amount,
        Some(job_id),
        None,
    ));
    Ok(Outcome::Reserved {
        transfer_id: id,
        granted: grant,
        available_after: avail - amount,
    })
}

/// Whether a new account may have its starter credits now: proof of work,
/// grants to its address in the last 24 hours, all grants in the last hour.
fn check_grant(
    tx: &mut dyn Db,
    p: &GrantPolicy,
    grant: MilliCredits,
    now_ms: u64,
) -> Result<(), LedgerError> {
    if p.pow_bits > 0 && !p.pow_ok {
        return Err(LedgerError::GrantRefused(format!(
            "a new account needs a proof of work of {} bits (field `pow` of /authorize)",
            p.pow_bits
        )));
    }
    let now = to_i64(now_ms)?;
    if p.per_ip_per_day > 0 {
        let n = tx
            .query_one(
                "SELECT COUNT(*) FROM starter_grants WHERE ip = ?1 AND at > ?2",
                p![&p.ip, now - 86_400_000],
            )?
            .i64(0)?;
        if n >= i64::from(p.per_ip_per_day) {
            return Err(LedgerError::GrantRefused(format!(
                "{} new accounts from this address in the last 24 hours already got theirs",
                p.per_ip_per_day
            )));
        }
    }
    if p.per_hour_milli > 0 {
        let sum = tx
            .query_one(
                "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM starter_grants WHERE at > ?1",
                p![now - 3_600_000],
            )?
            .i64(0)?;
        if sum.saturating_add(grant) > p.per_hour_milli {
            return Err(LedgerError::GrantRefused(
                "the coordinator's hourly budget for starter credits is spent; try again later"
                    .into(),
            ));
        }
    }
    Ok(())
}
