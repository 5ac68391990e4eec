//! The credit ledger: SQLite (WAL, `synchronous=FULL`), double-entry and
//! two-phase, as TigerBeetle does it.
//!
//! * Every account has four integer columns in milli-credits:
//!   `debits_pending`, `debits_posted`, `credits_pending`, `credits_posted`.
//!   Its available balance is `credits_posted - debits_posted - debits_pending`.
//! * A transfer always names a debit and a credit account and moves the same
//!   amount on both sides. Credits enter the system only from the `mint`
//!   account (`grant` transfers), so `sum of balances + pending == minted`.
//! * A reservation is a pending transfer user -> worker (`reserve`). It is
//!   resolved exactly once, enforced by a unique index: `settle` posts part
//!   of it (the cost) and releases the rest, `refund` (failed or cancelled
//!   job) and `expire` (no receipt in time) void it whole.
//!
//! All writes go through one writer thread that groups many commands into
//! one transaction (each command in its own savepoint, so a refused command
//! changes nothing) and one durable commit; the invariants are checked
//! inside that transaction before it commits, and nobody is answered before
//! the commit is on disk.

//! The folder: `cmd/` holds one file per command with its `apply`;
//! `transfer.rs` the double-entry primitives they are built of;
//! `query.rs` the reads the routes and the admin CLI share;
//! `invariants.rs` the totals and their checks; `writer.rs` the writer
//! thread over a [`Backend`]; `sqlite.rs` the SQLite dialect's schema
//! (PostgreSQL's is in `crate::pg`); `error.rs` the leaf error type.

use serde_json::Value;
use troop_protocol::MilliCredits;
use troop_protocol::receipt::Receipt;

use crate::db::Db;
use crate::p;

pub mod change;
mod cmd;
pub mod error;
mod invariants;
mod query;
mod sqlite;
mod transfer;
pub mod writer;

pub use cmd::reserve::GrantPolicy;
pub use cmd::settle::job_cost;
pub use error::LedgerError;
pub use invariants::{Totals, check_invariants, check_invariants_full, stored_totals, totals};
pub(crate) use query::JOB_COLUMNS;
pub use query::{
    Reputation, WorkerRow, all_audit_counts, audit_counts, audit_counts_of, available, job_parties,
    load_worker, load_workers, load_workers_changed_since, reputation_of, worker_reputations,
    worker_reputations_of,
};
pub use sqlite::{open, open_in_memory, open_reader};
pub use writer::{AuditSink, Backend, Sqlite, Writer, WriterThread};

/// The account that issues credits.
pub const MINT: &str = "troop:mint";

pub(crate) fn ensure_mint(conn: &mut dyn Db) -> Result<(), LedgerError> {
    conn.exec(
        "INSERT INTO accounts (id, kind, created_at) VALUES (?1, 'mint', 0) ON CONFLICT(id) DO NOTHING",
        p![MINT],
    )?;
    Ok(())
}

/// A command for the writer.
#[derive(Debug, Clone)]
pub enum Command {
    /// Registers (or re-registers) a worker; an existing receipt key is kept.
    RegisterWorker {
        peer_id: String,
        models: Vec<String>,
        addresses: Vec<String>,
        version: Option<String>,
        new_key: [u8; 32],
        now_secs: u64,
    },
    Heartbeat {
        peer_id: String,
        models: Option<Vec<String>>,
        addresses: Option<Vec<String>>,
        active_jobs: u32,
        queue_depth: u32,
        now_secs: u64,
        /// When the worker signed it: with one, a heartbeat not signed
        /// after the newest one written (`last_signed`) is a replay and
        /// changes nothing.
        signed_at: Option<u64>,
    },
    /// Liveness and load of many workers at once (a replica's kept
    /// heartbeats): `last_seen` only moves forward, a replayed beat
    /// changes nothing, a worker that left stays gone.
    Heartbeats { beats: Vec<Beat> },
    /// The worker stops: it is no longer alive (its receipts still settle).
    /// Heartbeats signed before `signed_at` cannot bring it back.
    Leave {
        peer_id: String,
        now_secs: u64,
        signed_at: Option<u64>,
    },
    /// Grants starter credits to a new user (once) and reserves `amount`.
    Reserve {
        user: String,
        worker: String,
        model: String,
        job_id: String,
        amount: MilliCredits,
        multiplier_milli: i64,
        starter_grant: MilliCredits,
        grant_policy: GrantPolicy,
        expires_at: u64,
        now_ms: u64,
    },
    /// Voids a reservation that was never handed out (signing failed).
    Cancel { job_id: String, now_ms: u64 },
    Settle {
        receipt: Receipt,
        receipt_sha256: String,
        now_ms: u64,
        /// Most milliseconds charged for a request the user did not acknowledge.
        unacked_cap_ms: u64,
        /// Clock tolerance on both ends of the charging window.
        tolerance_ms: u64,
        /// Whether each request line's ack is the receipt's user's
        /// signature, checked before the command reached the writer
        /// (`troop_protocol::usage::ack_signatures`: the costly part of a
        /// settlement, off the one writer thread); `None`: the writer
        /// checks them.
        ack_signatures: Option<Vec<bool>>,
    },
    /// Records a verified proof of hardware (with what computed it), or
    /// with `verified_gflops: None` takes the standing one away (a re-proof
    /// missed or failed).
    SetHardware {
        peer_id: String,
        verified_gflops: Option<f64>,
        multiplier_milli: i64,
        backend: Option<String>,
        adapter: Option<String>,
    },
    /// A verified audit of request `index` of session `job_id` (issue 25):
    /// counted once; a failure refunds the session to its user (voids a
    /// pending reservation, or posts back what was paid as far as the
    /// worker's balance allows) and suspends the worker at
    /// `suspend_after` failures.
    RecordAudit {
        reporter: String,
        worker: String,
        job_id: String,
        index: u32,
        failed: bool,
        report_sha256: String,
        suspend_after: u32,
        now_ms: u64,
    },
    /// Voids every pending reservation whose ticket expired before `cutoff_secs`.
    ExpireDue {
        cutoff_secs: u64,
        now_ms: u64,
        limit: usize,
    },
}

/// A heartbeat kept in a replica's memory until it writes them all
/// (`Command::Heartbeats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    pub peer_id: String,
    /// When the replica received it (Unix seconds): `last_seen`.
    pub seen_at: u64,
    /// When the worker signed it: a beat not newer than the last one
    /// written is a replay.
    pub signed_at: u64,
    pub active_jobs: u32,
    pub queue_depth: u32,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Worker(WorkerRow),
    Heartbeat {
        last_seen: u64,
        /// The heartbeat was a replay (signed no later than the newest one
        /// written): nothing changed.
        replay: bool,
    },
    /// Liveness written for this many workers.
    Beats {
        written: usize,
    },
    Reserved {
        transfer_id: i64,
        granted: MilliCredits,
        available_after: MilliCredits,
    },
    Settled(Settlement),
    Expired {
        jobs: Vec<String>,
    },
    Cancelled,
    Audited(AuditRecorded),
}

/// What recording an audit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecorded {
    /// The same answer was reported before (nothing changed).
    pub duplicate: bool,
    /// Milli-credits given back to the user by this audit.
    pub refunded: MilliCredits,
    /// The worker is suspended (now or before).
    pub suspended: bool,
    /// The worker's verified audits, after this one.
    pub passed: i64,
    pub failed: i64,
}

/// The result of applying a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub job_id: String,
    pub user: String,
    pub worker: String,
    /// `settled` or `refunded`.
    pub outcome: &'static str,
    pub cost: MilliCredits,
    pub refunded: MilliCredits,
    pub replayed: bool,
}

/// Applies one command inside an open transaction (or savepoint). Ledger
/// changes are described in `events` for the audit log.
pub fn apply(
    tx: &mut dyn Db,
    cmd: &Command,
    events: &mut Vec<Value>,
) -> Result<Outcome, LedgerError> {
    match cmd {
        Command::RegisterWorker {
            peer_id,
            models,
            addresses,
            version,
            new_key,
            now_secs,
        } => cmd::register::apply(
            tx,
            peer_id,
            models,
            addresses,
            version.as_deref(),
            new_key,
            *now_secs,
        ),
        Command::Heartbeat {
            peer_id,
            models,
            addresses,
            active_jobs,
            queue_depth,
            now_secs,
            signed_at,
        } => cmd::heartbeat::apply(
            tx,
            peer_id,
            models.as_deref(),
            addresses.as_deref(),
            (*active_jobs, *queue_depth),
            (*now_secs, *signed_at),
        ),
        Command::Heartbeats { beats } => cmd::heartbeat::apply_many(tx, beats),
        Command::Leave {
            peer_id,
            now_secs,
            signed_at,
        } => cmd::leave::apply(tx, peer_id, *now_secs, *signed_at),
        Command::Reserve {
            user,
            worker,
            model,
            job_id,
            amount,
            multiplier_milli,
            starter_grant,
            grant_policy,
            expires_at,
            now_ms,
        } => cmd::reserve::apply(
            tx,
            user,
            worker,
            model,
            job_id,
            *amount,
            *multiplier_milli,
            (*starter_grant, grant_policy),
            *expires_at,
            *now_ms,
            events,
        ),
        Command::SetHardware {
            peer_id,
            verified_gflops,
            multiplier_milli,
            backend,
            adapter,
        } => cmd::hardware::apply(
            tx,
            peer_id,
            *verified_gflops,
            *multiplier_milli,
            backend.as_deref(),
            adapter.as_deref(),
        ),
        Command::Cancel { job_id, now_ms } => cmd::cancel::apply(tx, job_id, *now_ms, events),
        Command::Settle {
            receipt,
            receipt_sha256,
            now_ms,
            unacked_cap_ms,
            tolerance_ms,
            ack_signatures,
        } => cmd::settle::apply(
            tx,
            receipt,
            receipt_sha256,
            (*now_ms, *unacked_cap_ms, *tolerance_ms),
            ack_signatures.as_deref(),
            events,
        )
        .map(Outcome::Settled),
        Command::ExpireDue {
            cutoff_secs,
            now_ms,
            limit,
        } => cmd::expire::apply(tx, *cutoff_secs, *now_ms, *limit, events),
        Command::RecordAudit { .. } => cmd::audit::apply(tx, cmd, events).map(Outcome::Audited),
    }
}

pub(crate) fn to_i64(v: u64) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| LedgerError::Range(format!("{v} does not fit")))
}
