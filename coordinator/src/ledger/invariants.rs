//! The ledger's invariants: totals kept in one row by triggers (checked
//! inside every write transaction) and by a full scan (start-up, audit).

use super::LedgerError;
use crate::db::Db;
use crate::p;

/// Totals over the whole ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub minted: i64,
    pub balances: i64,
    pub pending_accounts: i64,
    pub pending_jobs: i64,
    pub debits_posted: i64,
    pub credits_posted: i64,
    pub debits_pending: i64,
    pub credits_pending: i64,
    pub min_available: i64,
    /// Accounts (not the mint) whose available balance is below zero.
    pub negative_accounts: i64,
}

/// Totals by a full scan of every account and pending job (O(accounts)):
/// `ledger audit` and start-up; the request path reads [`stored_totals`].
pub fn totals(conn: &mut dyn Db) -> Result<Totals, LedgerError> {
    let r = conn.query_one(
        "SELECT CAST(COALESCE(SUM(debits_posted), 0) AS BIGINT), CAST(COALESCE(SUM(credits_posted), 0) AS BIGINT),
                CAST(COALESCE(SUM(debits_pending), 0) AS BIGINT), CAST(COALESCE(SUM(credits_pending), 0) AS BIGINT),
                CAST(COALESCE(SUM(CASE WHEN kind != 'mint' THEN credits_posted - debits_posted - debits_pending END), 0) AS BIGINT),
                CAST(COALESCE(SUM(CASE WHEN kind = 'mint' THEN debits_posted - credits_posted END), 0) AS BIGINT),
                CAST(COALESCE(MIN(CASE WHEN kind != 'mint' THEN credits_posted - debits_posted - debits_pending END), 0) AS BIGINT),
                CAST(COALESCE(SUM(CASE WHEN kind != 'mint' THEN debits_pending END), 0) AS BIGINT),
                CAST(COALESCE(SUM(CASE WHEN kind != 'mint' AND credits_posted - debits_posted - debits_pending < 0 THEN 1 ELSE 0 END), 0) AS BIGINT)
         FROM accounts",
        p![],
    )?;
    let mut t = Totals {
        debits_posted: r.i64(0)?,
        credits_posted: r.i64(1)?,
        debits_pending: r.i64(2)?,
        credits_pending: r.i64(3)?,
        balances: r.i64(4)?,
        minted: r.i64(5)?,
        min_available: r.i64(6)?,
        pending_accounts: r.i64(7)?,
        negative_accounts: r.i64(8)?,
        pending_jobs: 0,
    };
    t.pending_jobs = conn
        .query_one(
            "SELECT CAST(COALESCE(SUM(reserved), 0) AS BIGINT) FROM jobs WHERE state = 'pending'",
            p![],
        )?
        .i64(0)?;
    Ok(t)
}

/// The totals row the triggers keep (one row: O(1)).
pub fn stored_totals(conn: &mut dyn Db) -> Result<Totals, LedgerError> {
    let r = conn.query_one(
        "SELECT debits_posted, credits_posted, debits_pending, credits_pending, balances,
                minted, negative_accounts, pending_jobs
         FROM ledger_totals WHERE id = 1",
        p![],
    )?;
    Ok(Totals {
        debits_posted: r.i64(0)?,
        credits_posted: r.i64(1)?,
        debits_pending: r.i64(2)?,
        credits_pending: r.i64(3)?,
        balances: r.i64(4)?,
        minted: r.i64(5)?,
        negative_accounts: r.i64(6)?,
        pending_jobs: r.i64(7)?,
        min_available: 0,
        pending_accounts: 0,
    })
}

fn violations(t: &Totals) -> Vec<String> {
    let mut problems = Vec::new();
    if t.debits_posted != t.credits_posted {
        problems.push(format!(
            "posted debits {} != posted credits {}",
            t.debits_posted, t.credits_posted
        ));
    }
    if t.debits_pending != t.credits_pending {
        problems.push(format!(
            "pending debits {} != pending credits {}",
            t.debits_pending, t.credits_pending
        ));
    }
    if t.pending_jobs != t.debits_pending {
        problems.push(format!(
            "open reservations {} != pending debits {}",
            t.pending_jobs, t.debits_pending
        ));
    }
    if t.balances + t.pending_jobs != t.minted {
        problems.push(format!(
            "balances {} + pending {} != minted {}",
            t.balances, t.pending_jobs, t.minted
        ));
    }
    if t.negative_accounts != 0 {
        problems.push(format!("{} account(s) negative", t.negative_accounts));
    }
    problems
}

/// The invariants checked inside every transaction that changes money, on
/// the totals row the triggers keep in that same transaction: the batch's
/// changes balance (posted and pending debits equal credits, reservations
/// match pending debits, balances plus reservations equal what was
/// minted) and no account went negative. O(1), whatever the ledger's size.
pub fn check_invariants(conn: &mut dyn Db) -> Result<Totals, LedgerError> {
    let t = stored_totals(conn)?;
    let problems = violations(&t);
    if problems.is_empty() {
        Ok(t)
    } else {
        Err(LedgerError::Invariant(problems.join("; ")))
    }
}

/// The invariants by a full scan, and the totals row checked against it
/// (start-up and `ledger audit`; O(accounts)).
pub fn check_invariants_full(conn: &mut dyn Db) -> Result<Totals, LedgerError> {
    let t = totals(conn)?;
    let mut problems = violations(&t);
    let stored = stored_totals(conn)?;
    let fields = [
        ("posted debits", t.debits_posted, stored.debits_posted),
        ("posted credits", t.credits_posted, stored.credits_posted),
        ("pending debits", t.debits_pending, stored.debits_pending),
        ("pending credits", t.credits_pending, stored.credits_pending),
        ("balances", t.balances, stored.balances),
        ("minted", t.minted, stored.minted),
        (
            "negative accounts",
            t.negative_accounts,
            stored.negative_accounts,
        ),
        ("open reservations", t.pending_jobs, stored.pending_jobs),
    ];
    for (name, scanned, kept) in fields {
        if scanned != kept {
            problems.push(format!(
                "the totals row says {name} {kept}, a full scan {scanned}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(t)
    } else {
        Err(LedgerError::Invariant(problems.join("; ")))
    }
}
