//! The SQLite dialect: the schema (its migrations, run at open) and how a
//! ledger file is opened (WAL, `synchronous=FULL`). PostgreSQL's schema
//! lives next to its backend in `pg.rs`.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

use super::{LedgerError, ensure_mint};
use crate::db::Lite;

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
        // Issue 25: audited answers as gateways reported them (verified),
        // and workers suspended for confirmed failures.
        M::up(AUDITS_SCHEMA),
        // Issue 28: what proved the hardware (backend and adapter).
        M::up(
            "ALTER TABLE workers ADD COLUMN proof_backend TEXT; ALTER TABLE workers ADD COLUMN proof_adapter TEXT;",
        ),
        // Issue 29: the signed time of the newest heartbeat kept and
        // written by a replica (PostgreSQL's batched liveness).
        M::up("ALTER TABLE workers ADD COLUMN last_signed INTEGER;"),
    ])
}

/// Audited answers (one row per answer: a session and a request's number)
/// and suspended workers. PostgreSQL's is the same with `BIGINT`.
const AUDITS_SCHEMA: &str = r#"
CREATE TABLE audits (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    worker TEXT NOT NULL,
    reporter TEXT NOT NULL,
    outcome TEXT NOT NULL,
    refunded INTEGER NOT NULL DEFAULT 0,
    report_sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
) STRICT;
CREATE INDEX audits_by_worker ON audits(worker);
ALTER TABLE workers ADD COLUMN suspended_at INTEGER;
"#;

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
