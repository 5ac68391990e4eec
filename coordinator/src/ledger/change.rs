//! The changes commands make to the ledger's busy rows (an account's sums,
//! a new transfer, a job's resolution, a reputation's counts), described
//! as values so that a store may gather a batch's changes and write each
//! row once (the PostgreSQL writer: see `crate::pg::pipe`). One at a time,
//! as every other store writes them, each is one statement here.

use crate::db::{Db, V};
use crate::ledger::LedgerError;
use crate::p;

/// Amounts added to an account's four sums (milli-credits; a negative
/// amount takes away). Changes to one account add up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountDelta {
    pub debits_pending: i64,
    pub debits_posted: i64,
    pub credits_pending: i64,
    pub credits_posted: i64,
}

impl AccountDelta {
    pub fn add(&mut self, o: AccountDelta) -> Result<(), LedgerError> {
        let sum = |a: i64, b: i64| {
            a.checked_add(b)
                .ok_or_else(|| LedgerError::Range("an account's sum overflows".into()))
        };
        self.debits_pending = sum(self.debits_pending, o.debits_pending)?;
        self.debits_posted = sum(self.debits_posted, o.debits_posted)?;
        self.credits_pending = sum(self.credits_pending, o.credits_pending)?;
        self.credits_posted = sum(self.credits_posted, o.credits_posted)?;
        Ok(())
    }

    pub fn is_zero(&self) -> bool {
        *self == AccountDelta::default()
    }
}

/// A transfer whose id the store gave (`Db::next_transfer_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRow {
    pub id: i64,
    pub kind: String,
    pub debit_account: String,
    pub credit_account: String,
    pub amount: i64,
    pub pending_id: Option<i64>,
    pub job_id: Option<String>,
    pub created_at: i64,
}

/// What resolving a job sets in its row; `None` leaves a column as it is.
/// Later changes to one job win column by column.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobChange {
    pub state: Option<&'static str>,
    pub cost: Option<i64>,
    pub resolved_at: Option<i64>,
    pub receipt_sha256: Option<String>,
    pub receipt_status: Option<&'static str>,
}

impl JobChange {
    pub fn then(&mut self, later: JobChange) {
        self.state = later.state.or(self.state);
        self.cost = later.cost.or(self.cost);
        self.resolved_at = later.resolved_at.or(self.resolved_at);
        self.receipt_sha256 = later.receipt_sha256.or(self.receipt_sha256.take());
        self.receipt_status = later.receipt_status.or(self.receipt_status);
    }
}

/// A request's counts added to an account's reputation in one role:
/// requests, acknowledged, disputed, unacknowledged.
pub type ReputationCounts = [i64; 4];

pub(crate) fn write_account_delta<D: Db + ?Sized>(
    db: &mut D,
    id: &str,
    d: AccountDelta,
) -> Result<(), LedgerError> {
    db.write(
        "UPDATE accounts SET debits_pending = debits_pending + ?2, debits_posted = debits_posted + ?3,
         credits_pending = credits_pending + ?4, credits_posted = credits_posted + ?5 WHERE id = ?1",
        p![
            id,
            d.debits_pending,
            d.debits_posted,
            d.credits_pending,
            d.credits_posted
        ],
    )
}

pub(crate) fn write_transfer<D: Db + ?Sized>(
    db: &mut D,
    t: TransferRow,
) -> Result<(), LedgerError> {
    db.write(
        "INSERT INTO transfers (id, kind, debit_account, credit_account, amount, pending_id, job_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        p![
            t.id,
            t.kind,
            t.debit_account,
            t.credit_account,
            t.amount,
            t.pending_id,
            t.job_id,
            t.created_at
        ],
    )
}

pub(crate) fn write_job_change<D: Db + ?Sized>(
    db: &mut D,
    job_id: &str,
    c: JobChange,
) -> Result<(), LedgerError> {
    let mut sets = Vec::new();
    let mut params = vec![V::from(job_id)];
    let mut set = |column: &str, v: V| {
        params.push(v);
        sets.push(format!("{column} = ?{}", params.len()));
    };
    if let Some(s) = c.state {
        set("state", V::from(s));
    }
    if let Some(v) = c.cost {
        set("cost", V::from(v));
    }
    if let Some(v) = c.resolved_at {
        set("resolved_at", V::from(v));
    }
    if let Some(v) = c.receipt_sha256 {
        set("receipt_sha256", V::from(v));
    }
    if let Some(v) = c.receipt_status {
        set("receipt_status", V::from(v));
    }
    if sets.is_empty() {
        return Ok(());
    }
    db.write(
        &format!("UPDATE jobs SET {} WHERE job_id = ?1", sets.join(", ")),
        &params,
    )
}

pub(crate) fn write_reputation<D: Db + ?Sized>(
    db: &mut D,
    account: &str,
    role: &str,
    c: ReputationCounts,
) -> Result<(), LedgerError> {
    db.write(
        "INSERT INTO reputation (account, role, requests, acknowledged, disputed, unacknowledged)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(account, role) DO UPDATE SET
            requests = reputation.requests + excluded.requests,
            acknowledged = reputation.acknowledged + excluded.acknowledged,
            disputed = reputation.disputed + excluded.disputed,
            unacknowledged = reputation.unacknowledged + excluded.unacknowledged",
        p![account, role, c[0], c[1], c[2], c[3]],
    )
}
