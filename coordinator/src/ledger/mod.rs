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

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

pub mod error;
pub mod writer;

pub use error::LedgerError;
pub use writer::{AuditSink, Backend, Sqlite, Writer, WriterThread};

use crate::db::{Db, Lite, Row};
use crate::p;
use rusqlite_migration::{M, Migrations};
use serde_json::{Value, json};
use troop_protocol::MilliCredits;
use troop_protocol::receipt::{JobStatus, Receipt};
use troop_protocol::usage::{LineStatus, RequestLine, charge_session};

/// The account that issues credits.
pub const MINT: &str = "troop:mint";

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('mint', 'user', 'worker')),
    debits_pending INTEGER NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    debits_posted INTEGER NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_pending INTEGER NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    credits_posted INTEGER NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    granted INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
) STRICT;
CREATE TABLE transfers (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('grant', 'reserve', 'settle', 'refund', 'expire')),
    debit_account TEXT NOT NULL REFERENCES accounts(id),
    credit_account TEXT NOT NULL REFERENCES accounts(id),
    amount INTEGER NOT NULL CHECK (amount >= 0),
    pending_id INTEGER REFERENCES transfers(id),
    job_id TEXT,
    created_at INTEGER NOT NULL
) STRICT;
CREATE INDEX transfers_by_debit ON transfers(debit_account, id);
CREATE INDEX transfers_by_credit ON transfers(credit_account, id);
CREATE UNIQUE INDEX transfers_resolve_once ON transfers(pending_id) WHERE pending_id IS NOT NULL;
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES accounts(id),
    worker_id TEXT NOT NULL REFERENCES accounts(id),
    model TEXT NOT NULL,
    reserve_transfer INTEGER NOT NULL REFERENCES transfers(id),
    reserved INTEGER NOT NULL CHECK (reserved >= 0),
    multiplier_milli INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'posted', 'voided')),
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    receipt_sha256 TEXT,
    receipt_status TEXT,
    cost INTEGER,
    resolved_at INTEGER
) STRICT;
CREATE INDEX jobs_pending_by_expiry ON jobs(expires_at) WHERE state = 'pending';
CREATE TABLE workers (
    peer_id TEXT PRIMARY KEY,
    receipt_key BLOB NOT NULL,
    models TEXT NOT NULL,
    addresses TEXT NOT NULL,
    version TEXT,
    multiplier_milli INTEGER NOT NULL DEFAULT 1000,
    verified_gflops REAL,
    active_jobs INTEGER NOT NULL DEFAULT 0,
    queue_depth INTEGER NOT NULL DEFAULT 0,
    registered_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
) STRICT;
"#,
        ),
        // Bounded minting and reputation (sessions signed by both sides).
        M::up(
            r#"
CREATE TABLE starter_grants (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    ip TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount >= 0),
    at INTEGER NOT NULL
) STRICT;
CREATE INDEX starter_grants_by_ip ON starter_grants(ip, at);
CREATE INDEX starter_grants_by_time ON starter_grants(at);
CREATE TABLE reputation (
    account TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('worker', 'user')),
    requests INTEGER NOT NULL DEFAULT 0,
    acknowledged INTEGER NOT NULL DEFAULT 0,
    disputed INTEGER NOT NULL DEFAULT 0,
    unacknowledged INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account, role)
) STRICT;
"#,
        ),
        // Totals the invariants need, kept by triggers in the same
        // transaction as every change: each batch checks one row (O(1))
        // instead of scanning every account and job; `ledger audit` and
        // start-up compare it with a full scan.
        M::up(
            r#"
-- A history page names each reservation's state: by index, not a scan.
CREATE INDEX jobs_by_reserve_transfer ON jobs(reserve_transfer);
CREATE TABLE ledger_totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    debits_posted INTEGER NOT NULL,
    credits_posted INTEGER NOT NULL,
    debits_pending INTEGER NOT NULL,
    credits_pending INTEGER NOT NULL,
    balances INTEGER NOT NULL,
    minted INTEGER NOT NULL,
    negative_accounts INTEGER NOT NULL,
    pending_jobs INTEGER NOT NULL
) STRICT;
INSERT INTO ledger_totals
SELECT 1,
    COALESCE(SUM(debits_posted), 0), COALESCE(SUM(credits_posted), 0),
    COALESCE(SUM(debits_pending), 0), COALESCE(SUM(credits_pending), 0),
    COALESCE(SUM(CASE WHEN a.kind != 'mint' THEN a.credits_posted - a.debits_posted - a.debits_pending ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN a.kind = 'mint' THEN a.debits_posted - a.credits_posted ELSE 0 END), 0),
    COALESCE(SUM(CASE WHEN a.kind != 'mint' AND a.credits_posted - a.debits_posted - a.debits_pending < 0 THEN 1 ELSE 0 END), 0),
    (SELECT COALESCE(SUM(reserved), 0) FROM jobs WHERE state = 'pending')
FROM accounts AS a;
CREATE TRIGGER ledger_totals_account_insert AFTER INSERT ON accounts BEGIN
    UPDATE ledger_totals SET
        debits_posted = debits_posted + NEW.debits_posted,
        credits_posted = credits_posted + NEW.credits_posted,
        debits_pending = debits_pending + NEW.debits_pending,
        credits_pending = credits_pending + NEW.credits_pending,
        balances = balances + (CASE WHEN NEW.kind != 'mint' THEN NEW.credits_posted - NEW.debits_posted - NEW.debits_pending ELSE 0 END),
        minted = minted + (CASE WHEN NEW.kind = 'mint' THEN NEW.debits_posted - NEW.credits_posted ELSE 0 END),
        negative_accounts = negative_accounts + (CASE WHEN NEW.kind != 'mint' AND NEW.credits_posted - NEW.debits_posted - NEW.debits_pending < 0 THEN 1 ELSE 0 END)
    WHERE id = 1;
END;
CREATE TRIGGER ledger_totals_account_update AFTER UPDATE ON accounts BEGIN
    UPDATE ledger_totals SET
        debits_posted = debits_posted - OLD.debits_posted,
        credits_posted = credits_posted - OLD.credits_posted,
        debits_pending = debits_pending - OLD.debits_pending,
        credits_pending = credits_pending - OLD.credits_pending,
        balances = balances - (CASE WHEN OLD.kind != 'mint' THEN OLD.credits_posted - OLD.debits_posted - OLD.debits_pending ELSE 0 END),
        minted = minted - (CASE WHEN OLD.kind = 'mint' THEN OLD.debits_posted - OLD.credits_posted ELSE 0 END),
        negative_accounts = negative_accounts - (CASE WHEN OLD.kind != 'mint' AND OLD.credits_posted - OLD.debits_posted - OLD.debits_pending < 0 THEN 1 ELSE 0 END)
    WHERE id = 1;
    UPDATE ledger_totals SET
        debits_posted = debits_posted + NEW.debits_posted,
        credits_posted = credits_posted + NEW.credits_posted,
        debits_pending = debits_pending + NEW.debits_pending,
        credits_pending = credits_pending + NEW.credits_pending,
        balances = balances + (CASE WHEN NEW.kind != 'mint' THEN NEW.credits_posted - NEW.debits_posted - NEW.debits_pending ELSE 0 END),
        minted = minted + (CASE WHEN NEW.kind = 'mint' THEN NEW.debits_posted - NEW.credits_posted ELSE 0 END),
        negative_accounts = negative_accounts + (CASE WHEN NEW.kind != 'mint' AND NEW.credits_posted - NEW.debits_posted - NEW.debits_pending < 0 THEN 1 ELSE 0 END)
    WHERE id = 1;
END;
CREATE TRIGGER ledger_totals_account_delete AFTER DELETE ON accounts BEGIN
    UPDATE ledger_totals SET
        debits_posted = debits_posted - OLD.debits_posted,
        credits_posted = credits_posted - OLD.credits_posted,
        debits_pending = debits_pending - OLD.debits_pending,
        credits_pending = credits_pending - OLD.credits_pending,
        balances = balances - (CASE WHEN OLD.kind != 'mint' THEN OLD.credits_posted - OLD.debits_posted - OLD.debits_pending ELSE 0 END),
        minted = minted - (CASE WHEN OLD.kind = 'mint' THEN OLD.debits_posted - OLD.credits_posted ELSE 0 END),
        negative_accounts = negative_accounts - (CASE WHEN OLD.kind != 'mint' AND OLD.credits_posted - OLD.debits_posted - OLD.debits_pending < 0 THEN 1 ELSE 0 END)
    WHERE id = 1;
END;
CREATE TRIGGER ledger_totals_job_insert AFTER INSERT ON jobs BEGIN
    UPDATE ledger_totals SET pending_jobs = pending_jobs + (CASE WHEN NEW.state = 'pending' THEN NEW.reserved ELSE 0 END) WHERE id = 1;
END;
CREATE TRIGGER ledger_totals_job_update AFTER UPDATE OF state, reserved ON jobs BEGIN
    UPDATE ledger_totals SET pending_jobs = pending_jobs - (CASE WHEN OLD.state = 'pending' THEN OLD.reserved ELSE 0 END) WHERE id = 1;
    UPDATE ledger_totals SET pending_jobs = pending_jobs + (CASE WHEN NEW.state = 'pending' THEN NEW.reserved ELSE 0 END) WHERE id = 1;
END;
CREATE TRIGGER ledger_totals_job_delete AFTER DELETE ON jobs BEGIN
    UPDATE ledger_totals SET pending_jobs = pending_jobs - (CASE WHEN OLD.state = 'pending' THEN OLD.reserved ELSE 0 END) WHERE id = 1;
END;
"#,
        ),
        // A worker that stops says so (`POST /workers/leave`): it is not
        // listed as alive again until it registers or heartbeats.
        M::up("ALTER TABLE workers ADD COLUMN left_at INTEGER;"),
    ])
}

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

/// A worker's or user's figures from settled sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Reputation {
    pub requests: i64,
    pub acknowledged: i64,
    pub disputed: i64,
    pub unacknowledged: i64,
}

fn reputation_from(r: &Row, at: usize) -> Result<Reputation, LedgerError> {
    Ok(Reputation {
        requests: r.i64(at)?,
        acknowledged: r.i64(at + 1)?,
        disputed: r.i64(at + 2)?,
        unacknowledged: r.i64(at + 3)?,
    })
}

/// Every worker's reputation.
pub fn worker_reputations(
    conn: &mut dyn Db,
) -> Result<std::collections::HashMap<String, Reputation>, LedgerError> {
    conn.query(
        "SELECT account, requests, acknowledged, disputed, unacknowledged FROM reputation
         WHERE role = 'worker'",
        p![],
    )?
    .iter()
    .map(|r| Ok((r.str(0)?, reputation_from(r, 1)?)))
    .collect()
}

pub fn reputation_of(
    conn: &mut dyn Db,
    account: &str,
    role: &str,
) -> Result<Reputation, LedgerError> {
    conn.query_opt(
        "SELECT requests, acknowledged, disputed, unacknowledged FROM reputation
         WHERE account = ?1 AND role = ?2",
        p![account, role],
    )?
    .map(|r| reputation_from(&r, 0))
    .transpose()
    .map(Option::unwrap_or_default)
}

/// Opens (creating if needed) the ledger database and runs the migrations.
pub fn open(path: &Path) -> Result<Connection, LedgerError> {
    let mut conn = Connection::open(path)?;
    configure(&conn)?;
    migrations()
        .to_latest(&mut conn)
        .map_err(|e| LedgerError::Storage(format!("migration: {e}")))?;
    ensure_mint(&mut Lite(&conn))?;
    Ok(conn)
}

/// A read-only connection for queries that never block the writer (WAL).
pub fn open_reader(path: &Path) -> Result<Connection, LedgerError> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// An in-memory ledger (tests).
pub fn open_in_memory() -> Result<Connection, LedgerError> {
    let mut conn = Connection::open_in_memory()?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    migrations()
        .to_latest(&mut conn)
        .map_err(|e| LedgerError::Storage(format!("migration: {e}")))?;
    ensure_mint(&mut Lite(&conn))?;
    Ok(conn)
}

fn configure(conn: &Connection) -> Result<(), LedgerError> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk (WAL fsynced) before anyone is answered.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(())
}

pub(crate) fn ensure_mint(conn: &mut dyn Db) -> Result<(), LedgerError> {
    conn.exec(
        "INSERT INTO accounts (id, kind, created_at) VALUES (?1, 'mint', 0) ON CONFLICT(id) DO NOTHING",
        p![MINT],
    )?;
    Ok(())
}

/// A registered worker as the ledger stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub peer_id: String,
    pub receipt_key: Vec<u8>,
    pub models: Vec<String>,
    pub addresses: Vec<String>,
    pub version: Option<String>,
    pub multiplier_milli: i64,
    pub verified_gflops: Option<f64>,
    pub active_jobs: u32,
    pub queue_depth: u32,
    pub registered_at: u64,
    /// Unix seconds.
    pub last_seen: u64,
    /// Unix seconds when the worker said it was leaving (cleared by its
    /// next registration or heartbeat).
    pub left_at: Option<u64>,
}

impl WorkerRow {
    /// Whether the worker counts as alive at `now` (seen within `ttl`
    /// seconds and not gone).
    pub fn alive(&self, now: u64, ttl: u64) -> bool {
        self.left_at.is_none() && now.saturating_sub(self.last_seen) <= ttl
    }
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
    },
    /// The worker stops: it is no longer alive (its receipts still settle).
    Leave { peer_id: String, now_secs: u64 },
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
    },
    /// Records a verified proof of hardware.
    SetHardware {
        peer_id: String,
        verified_gflops: f64,
        multiplier_milli: i64,
    },
    /// Voids every pending reservation whose ticket expired before `cutoff_secs`.
    ExpireDue {
        cutoff_secs: u64,
        now_ms: u64,
        limit: usize,
    },
}

/// What a command did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Worker(WorkerRow),
    Heartbeat {
        last_seen: u64,
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
        } => register_worker(
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
        } => {
            let models_json = models.as_ref().map(|m| json!(m).to_string());
            let addrs_json = addresses.as_ref().map(|a| json!(a).to_string());
            let n = tx.exec(
                "UPDATE workers SET last_seen = ?2, active_jobs = ?3, queue_depth = ?4,
                 models = COALESCE(?5, models), addresses = COALESCE(?6, addresses), left_at = NULL
                 WHERE peer_id = ?1",
                p![
                    peer_id,
                    to_i64(*now_secs)?,
                    *active_jobs,
                    *queue_depth,
                    models_json,
                    addrs_json
                ],
            )?;
            if n == 0 {
                return Err(LedgerError::UnknownWorker(peer_id.clone()));
            }
            Ok(Outcome::Heartbeat {
                last_seen: *now_secs,
            })
        }
        Command::Leave { peer_id, now_secs } => {
            // `last_seen` moves too: replicas keep the newest row they read.
            let n = tx.exec(
                "UPDATE workers SET last_seen = ?2, left_at = ?2, active_jobs = 0, queue_depth = 0
                 WHERE peer_id = ?1",
                p![peer_id, to_i64(*now_secs)?],
            )?;
            if n == 0 {
                return Err(LedgerError::UnknownWorker(peer_id.clone()));
            }
            Ok(Outcome::Heartbeat {
                last_seen: *now_secs,
            })
        }
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
        } => reserve(
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
        } => {
            let n = tx.exec(
                "UPDATE workers SET verified_gflops = ?2, multiplier_milli = ?3 WHERE peer_id = ?1",
                p![peer_id, *verified_gflops, *multiplier_milli],
            )?;
            if n == 0 {
                return Err(LedgerError::UnknownWorker(peer_id.clone()));
            }
            load_worker(tx, peer_id)?
                .map(Outcome::Worker)
                .ok_or_else(|| LedgerError::UnknownWorker(peer_id.clone()))
        }
        Command::Cancel { job_id, now_ms } => {
            let job =
                load_job(tx, job_id)?.ok_or_else(|| LedgerError::UnknownJob(job_id.clone()))?;
            if job.state == "pending" {
                void(tx, &job, "refund", *now_ms, events)?;
            }
            Ok(Outcome::Cancelled)
        }
        Command::Settle {
            receipt,
            receipt_sha256,
            now_ms,
            unacked_cap_ms,
            tolerance_ms,
        } => settle(
            tx,
            receipt,
            receipt_sha256,
            (*now_ms, *unacked_cap_ms, *tolerance_ms),
            events,
        )
        .map(Outcome::Settled),
        Command::ExpireDue {
            cutoff_secs,
            now_ms,
            limit,
        } => {
            let ids: Vec<String> = tx
                .query(
                    "SELECT job_id FROM jobs WHERE state = 'pending' AND expires_at < ?1
                     ORDER BY expires_at LIMIT ?2",
                    p![to_i64(*cutoff_secs)?, to_i64(*limit as u64)?],
                )?
                .iter()
                .map(|r| r.str(0))
                .collect::<Result<_, _>>()?;
            for id in &ids {
                if let Some(job) = load_job(tx, id)? {
                    void(tx, &job, "expire", *now_ms, events)?;
                }
            }
            Ok(Outcome::Expired { jobs: ids })
        }
    }
}

fn to_i64(v: u64) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| LedgerError::Range(format!("{v} does not fit")))
}

fn register_worker(
    tx: &mut dyn Db,
    peer_id: &str,
    models: &[String],
    addresses: &[String],
    version: Option<&str>,
    new_key: &[u8; 32],
    now: u64,
) -> Result<Outcome, LedgerError> {
    let now_i = to_i64(now)?;
    tx.exec(
        "INSERT INTO accounts (id, kind, created_at) VALUES (?1, 'worker', ?2)
         ON CONFLICT(id) DO NOTHING",
        p![peer_id, now_i],
    )?;
    let kind = tx
        .query_one("SELECT kind FROM accounts WHERE id = ?1", p![peer_id])?
        .str(0)?;
    if kind == "mint" {
        return Err(LedgerError::Range("reserved account id".into()));
    }
    tx.exec(
        "INSERT INTO workers (peer_id, receipt_key, models, addresses, version, registered_at, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT(peer_id) DO UPDATE SET models = excluded.models, addresses = excluded.addresses,
           version = excluded.version, last_seen = excluded.last_seen, left_at = NULL",
        p![
            peer_id,
            &new_key[..],
            json!(models).to_string(),
            json!(addresses).to_string(),
            version,
            now_i
        ],
    )?;
    load_worker(tx, peer_id)?
        .map(Outcome::Worker)
        .ok_or_else(|| LedgerError::UnknownWorker(peer_id.into()))
}

/// Reads one worker.
pub fn load_worker(conn: &mut dyn Db, peer_id: &str) -> Result<Option<WorkerRow>, LedgerError> {
    conn.query_opt(
        "SELECT peer_id, receipt_key, models, addresses, version, multiplier_milli, verified_gflops,
                active_jobs, queue_depth, registered_at, last_seen, left_at FROM workers WHERE peer_id = ?1",
        p![peer_id],
    )?
    .map(|r| worker_from_row(&r))
    .transpose()
}

/// Reads every worker.
pub fn load_workers(conn: &mut dyn Db) -> Result<Vec<WorkerRow>, LedgerError> {
    conn.query(
        "SELECT peer_id, receipt_key, models, addresses, version, multiplier_milli, verified_gflops,
                active_jobs, queue_depth, registered_at, last_seen, left_at FROM workers ORDER BY peer_id",
        p![],
    )?
    .iter()
    .map(worker_from_row)
    .collect()
}

/// Workers seen since `since_secs` (replicas refresh their table with it).
pub fn load_workers_seen_since(
    conn: &mut dyn Db,
    since_secs: u64,
) -> Result<Vec<WorkerRow>, LedgerError> {
    conn.query(
        "SELECT peer_id, receipt_key, models, addresses, version, multiplier_milli, verified_gflops,
                active_jobs, queue_depth, registered_at, last_seen, left_at FROM workers WHERE last_seen >= ?1",
        p![to_i64(since_secs)?],
    )?
    .iter()
    .map(worker_from_row)
    .collect()
}

fn worker_from_row(r: &Row) -> Result<WorkerRow, LedgerError> {
    let small = |i: usize| -> Result<u32, LedgerError> {
        Ok(u32::try_from(r.i64(i)?.max(0)).unwrap_or(u32::MAX))
    };
    Ok(WorkerRow {
        peer_id: r.str(0)?,
        receipt_key: r.bytes(1)?,
        models: serde_json::from_str(&r.str(2)?).unwrap_or_default(),
        addresses: serde_json::from_str(&r.str(3)?).unwrap_or_default(),
        version: r.opt_str(4)?,
        multiplier_milli: r.i64(5)?,
        verified_gflops: r.opt_f64(6)?,
        active_jobs: small(7)?,
        queue_depth: small(8)?,
        registered_at: r.i64(9)?.max(0) as u64,
        last_seen: r.i64(10)?.max(0) as u64,
        left_at: r.opt_i64(11)?.map(|t| t.max(0) as u64),
    })
}

#[derive(Debug)]
struct JobRow {
    job_id: String,
    user: String,
    worker: String,
    model: String,
    reserve_transfer: i64,
    reserved: i64,
    multiplier_milli: i64,
    state: String,
    receipt_sha256: Option<String>,
    cost: Option<i64>,
    /// Unix ms of the reservation (the ticket's issue).
    created_at: i64,
}

fn load_job(tx: &mut dyn Db, job_id: &str) -> Result<Option<JobRow>, LedgerError> {
    tx.query_opt(
        "SELECT job_id, user_id, worker_id, model, reserve_transfer, reserved, multiplier_milli, state,
                receipt_sha256, cost, created_at FROM jobs WHERE job_id = ?1",
        p![job_id],
    )?
    .map(|r| {
        Ok(JobRow {
            job_id: r.str(0)?,
            user: r.str(1)?,
            worker: r.str(2)?,
            model: r.str(3)?,
            reserve_transfer: r.i64(4)?,
            reserved: r.i64(5)?,
            multiplier_milli: r.i64(6)?,
            state: r.str(7)?,
            receipt_sha256: r.opt_str(8)?,
            cost: r.opt_i64(9)?,
            created_at: r.i64(10)?,
        })
    })
    .transpose()
}

/// Available balance of an account (None when it does not exist).
pub fn available(conn: &mut dyn Db, account: &str) -> Result<Option<MilliCredits>, LedgerError> {
    conn.query_opt(
        "SELECT credits_posted - debits_posted - debits_pending FROM accounts WHERE id = ?1",
        p![account],
    )?
    .map(|r| r.i64(0))
    .transpose()
}

#[allow(clippy::too_many_arguments)]
fn insert_transfer(
    tx: &mut dyn Db,
    kind: &str,
    debit: &str,
    credit: &str,
    amount: i64,
    pending_id: Option<i64>,
    job_id: Option<&str>,
    now_ms: u64,
) -> Result<i64, LedgerError> {
    tx.query_one(
        "INSERT INTO transfers (kind, debit_account, credit_account, amount, pending_id, job_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
        p![kind, debit, credit, amount, pending_id, job_id, to_i64(now_ms)?],
    )?
    .i64(0)
}

fn ledger_event(
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

#[allow(clippy::too_many_arguments)]
fn reserve(
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
    let worker_kind = tx
        .query_opt("SELECT kind FROM accounts WHERE id = ?1", p![worker])?
        .map(|r| r.str(0))
        .transpose()?;
    if worker_kind.as_deref() != Some("worker") {
        return Err(LedgerError::UnknownWorker(worker.into()));
    }
    tx.exec(
        "INSERT INTO accounts (id, kind, created_at) VALUES (?1, 'user', ?2) ON CONFLICT(id) DO NOTHING",
        p![user, now_i],
    )?;
    let r = tx.query_one("SELECT kind, granted FROM accounts WHERE id = ?1", p![user])?;
    let (kind, granted) = (r.str(0)?, r.i64(1)?);
    if kind == "mint" {
        return Err(LedgerError::Range("reserved account id".into()));
    }
    let mut grant = 0;
    if granted == 0 && starter_grant > 0 {
        check_grant(tx, policy, starter_grant, now_ms)?;
        grant = starter_grant;
        tx.exec(
            "INSERT INTO starter_grants (account, ip, amount, at) VALUES (?1, ?2, ?3, ?4)",
            p![user, &policy.ip, grant, now_i],
        )?;
        tx.exec(
            "UPDATE accounts SET granted = 1, credits_posted = credits_posted + ?2 WHERE id = ?1",
            p![user, grant],
        )?;
        tx.exec(
            "UPDATE accounts SET debits_posted = debits_posted + ?2 WHERE id = ?1",
            p![MINT, grant],
        )?;
        let id = insert_transfer(tx, "grant", MINT, user, grant, None, None, now_ms)?;
        events.push(ledger_event("grant", id, MINT, user, grant, None, None));
    }
    let avail = available(tx, user)?.unwrap_or(0);
    if avail < amount {
        return Err(LedgerError::InsufficientFunds {
            available: avail,
            required: amount,
        });
    }
    if tx
        .query_opt("SELECT 1 FROM jobs WHERE job_id = ?1", p![job_id])?
        .is_some()
    {
        return Err(LedgerError::DuplicateJob(job_id.into()));
    }
    tx.exec(
        "UPDATE accounts SET debits_pending = debits_pending + ?2 WHERE id = ?1",
        p![user, amount],
    )?;
    tx.exec(
        "UPDATE accounts SET credits_pending = credits_pending + ?2 WHERE id = ?1",
        p![worker, amount],
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
    tx.exec(
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

/// Releases a pending reservation whole (`refund` or `expire`).
fn void(
    tx: &mut dyn Db,
    job: &JobRow,
    kind: &str,
    now_ms: u64,
    events: &mut Vec<Value>,
) -> Result<i64, LedgerError> {
    tx.exec(
        "UPDATE accounts SET debits_pending = debits_pending - ?2 WHERE id = ?1",
        p![&job.user, job.reserved],
    )?;
    tx.exec(
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
    tx.exec(
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

fn settle(
    tx: &mut dyn Db,
    r: &Receipt,
    receipt_sha256: &str,
    (now_ms, unacked_cap_ms, tolerance_ms): (u64, u64, u64),
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
    let lines = if r.requests.is_empty() {
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
    } else {
        r.requests.clone()
    };
    let charge = charge_session(
        &lines,
        &job.user,
        &job.job_id,
        &job.worker,
        u64::try_from(job.created_at)
            .unwrap_or(0)
            .saturating_sub(tolerance_ms),
        now_ms.saturating_add(tolerance_ms),
        unacked_cap_ms,
    )
    .map_err(|e| LedgerError::BadAck(e.to_string()))?;
    // A legacy receipt of a failed or cancelled job is refunded whole.
    let billable = !r.requests.is_empty() || r.status == JobStatus::Completed;
    let cost = if billable {
        job_cost(0, charge.ms, job.multiplier_milli, job.reserved)
    } else {
        0
    };
    for (account, role) in [(&job.worker, "worker"), (&job.user, "user")] {
        tx.exec(
            "INSERT INTO reputation (account, role, requests, acknowledged, disputed, unacknowledged)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(account, role) DO UPDATE SET
                requests = reputation.requests + excluded.requests,
                acknowledged = reputation.acknowledged + excluded.acknowledged,
                disputed = reputation.disputed + excluded.disputed,
                unacknowledged = reputation.unacknowledged + excluded.unacknowledged",
            p![
                account,
                role,
                to_i64(charge.requests)?,
                to_i64(charge.acknowledged)?,
                to_i64(charge.disputed)?,
                to_i64(charge.unacknowledged)?
            ],
        )?;
    }
    let (outcome, cost) = if cost > 0 {
        tx.exec(
            "UPDATE accounts SET debits_pending = debits_pending - ?2, debits_posted = debits_posted + ?3
             WHERE id = ?1",
            p![&job.user, job.reserved, cost],
        )?;
        tx.exec(
            "UPDATE accounts SET credits_pending = credits_pending - ?2, credits_posted = credits_posted + ?3
             WHERE id = ?1",
            p![&job.worker, job.reserved, cost],
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
        tx.exec(
            "UPDATE jobs SET state = 'posted', cost = ?2, resolved_at = ?3 WHERE job_id = ?1",
            p![&job.job_id, cost, to_i64(now_ms)?],
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
        ("refunded", 0)
    };
    tx.exec(
        "UPDATE jobs SET receipt_sha256 = ?2, receipt_status = ?3 WHERE job_id = ?1",
        p![&job.job_id, receipt_sha256, status],
    )?;
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
