//! The PostgreSQL writer's connection: statements pipelined, so a batch of
//! ledger commands costs a few round trips, not one per statement.
//!
//! `tokio-postgres` sends a request the moment its future is first polled
//! and matches the answers in order, so statements queued here go out
//! together, in order, in one write, and their answers come back together:
//! one round trip. [`Db::write`] queues a statement whose count nobody
//! reads; a read ([`Db::query`], [`Db::exec`]) sends what is queued and
//! itself, and waits.
//!
//! A batch runs in one of two passes:
//! * **Straight** (first): no savepoints; writes wait for the next read or
//!   the batch's end; the jobs that settlements resolve and the next
//!   transfer id are read ahead with the transaction's lock, so a batch of
//!   settlements is three round trips whatever its size (begin with the
//!   reads ahead; every write with the invariants; commit).
//! * **Careful** (when the straight one cannot finish): every command in a
//!   savepoint of its own, its writes sent at its end, as the SQLite writer
//!   does. Taken when a statement failed in the database (a queued write's
//!   failure cannot be pinned on its command once later ones were sent), or
//!   when a command was refused after it had written (without a savepoint
//!   its writes cannot be undone alone). The straight pass is rolled back
//!   whole first, and commands are pure functions of the ledger and their
//!   arguments, so the careful pass gives what one at a time would.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use futures::TryStreamExt;
use serde_json::Value;
use tokio_postgres::{NoTls, Statement};

use crate::db::{Db, Row, V, pg_row, to_pg};
use crate::ledger::change::{self, AccountDelta, JobChange, ReputationCounts, TransferRow};
use crate::ledger::error::LedgerError;
use crate::ledger::{self, Command, Outcome};

/// Round trips made by every pipe in this process (tests count them).
static ROUND_TRIPS: AtomicU64 = AtomicU64::new(0);
/// Batches begun, straight or careful.
static BATCHES: AtomicU64 = AtomicU64::new(0);
/// Straight passes that had to be run again carefully.
static CAREFUL_PASSES: AtomicU64 = AtomicU64::new(0);

/// Round trips to PostgreSQL made by the ledger writers of this process.
pub fn round_trips() -> u64 {
    ROUND_TRIPS.load(Ordering::Relaxed)
}

/// Batches (transactions) the ledger writers of this process began.
pub fn batches() -> u64 {
    BATCHES.load(Ordering::Relaxed)
}

/// Batches whose straight pass was run again with a savepoint per command.
pub fn careful_passes() -> u64 {
    CAREFUL_PASSES.load(Ordering::Relaxed)
}

enum Reply {
    Count(u64),
    Rows(Vec<tokio_postgres::Row>),
}

type Pending = Pin<Box<dyn Future<Output = Result<Reply, tokio_postgres::Error>> + Send>>;

/// The writer's connection with its queue of statements not yet sent.
pub struct Pipe {
    rt: tokio::runtime::Runtime,
    client: Arc<tokio_postgres::Client>,
    statements: HashMap<String, Statement>,
    queue: Vec<Pending>,
    /// The first failure in the database since the batch began.
    failed: Option<LedgerError>,
    /// The last transfer id given out (ids are the writer's to give while
    /// it holds the lock: `None` outside a batch).
    last_transfer: Option<i64>,
    jobs: HashMap<String, Option<Row>>,
    /// The last transfer id when the batch began.
    first_transfer: i64,
    /// Statements queued since the current command began.
    writes_in_command: usize,
    /// The batch's changes to busy rows, gathered while the straight pass
    /// runs (`None` otherwise) and written set by set before any other
    /// statement (see [`Gathered`]).
    gathered: Option<Gathered>,
}

/// Changes to the ledger's busy rows gathered over a straight pass and
/// written with one statement per table (at most four statements however
/// many commands made them), before the next statement of any other kind
/// and before the commit, so every statement still sees what the commands
/// before it wrote. An account or job changed by many commands is written
/// once, and the totals row, kept by statement triggers (schema step 13),
/// once per statement: a batch no longer grows as the square of its size.
#[derive(Default)]
struct Gathered {
    accounts: BTreeMap<String, AccountDelta>,
    transfers: Vec<TransferRow>,
    jobs: BTreeMap<String, JobChange>,
    reputation: BTreeMap<(String, String), ReputationCounts>,
}

impl Gathered {
    fn is_empty(&self) -> bool {
        self.accounts.is_empty()
            && self.transfers.is_empty()
            && self.jobs.is_empty()
            && self.reputation.is_empty()
    }
}

/// The advisory lock key every replica's writer takes for its batch.
const WRITER_LOCK: i64 = 0x7472_6f6f_7001;

impl Pipe {
    /// Connects (the schema must be current: see `crate::pg::connect_ready`).
    pub fn connect(url: &str) -> Result<Self, LedgerError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LedgerError::Storage(format!("a runtime for the writer: {e}")))?;
        let (client, connection) = rt
            .block_on(tokio_postgres::connect(url, NoTls))
            .map_err(|e| LedgerError::Unavailable(format!("PostgreSQL is not reachable: {e}")))?;
        rt.spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "the writer's PostgreSQL connection ended");
            }
        });
        let client = Arc::new(client);
        // Bounded so a writer never hangs behind a lost lock holder forever.
        // The writer's statements find their rows by key; a batch's rows
        // come from a JSON parameter whose size the planner cannot know (it
        // guesses 100), and with that guess it scanned the whole `jobs`
        // table to hash-join a batch's few jobs: a batch cost grew with the
        // table. Without hash and merge joins each row is found through
        // its primary key.
        rt.block_on(client.batch_execute(
            "SET lock_timeout = '10s'; SET statement_timeout = '30s';
             SET enable_hashjoin = off; SET enable_mergejoin = off",
        ))?;
        Ok(Self {
            rt,
            client,
            statements: HashMap::new(),
            queue: Vec::new(),
            failed: None,
            last_transfer: None,
            jobs: HashMap::new(),
            first_transfer: 0,
            writes_in_command: 0,
            gathered: None,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Sets `troop.replica` on this session: the transfers it commits are
    /// named `name` (migration 9's default).
    pub fn name_replica(&mut self, name: &str) -> Result<(), LedgerError> {
        self.rt.block_on(
            self.client
                .execute("SELECT set_config('troop.replica', $1, false)", &[&name]),
        )?;
        Ok(())
    }

    fn statement(&mut self, sql: &str) -> Result<Statement, LedgerError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!("troop_ledger_round_trips_total").increment(1);
        let s = self.rt.block_on(self.client.prepare(&to_pg(sql)))?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    fn push_exec(&mut self, sql: &str, params: Vec<V>) -> Result<(), LedgerError> {
        let s = self.statement(sql)?;
        let client = self.client.clone();
        self.queue.push(Box::pin(async move {
            client
                .execute_raw(&s, params.iter())
                .await
                .map(Reply::Count)
        }));
        Ok(())
    }

    fn push_query(&mut self, sql: &str, params: Vec<V>) -> Result<(), LedgerError> {
        let s = self.statement(sql)?;
        let client = self.client.clone();
        self.queue.push(Box::pin(async move {
            let rows = client.query_raw(&s, params.iter()).await?;
            rows.try_collect().await.map(Reply::Rows)
        }));
        Ok(())
    }

    /// Sends everything queued in one round trip and waits for every
    /// answer, each on its own; a failure is kept for the batch.
    fn flush_all(&mut self) -> Vec<Result<Reply, LedgerError>> {
        let queue = std::mem::take(&mut self.queue);
        if queue.is_empty() {
            return Vec::new();
        }
        ROUND_TRIPS.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!("troop_ledger_round_trips_total").increment(1);
        let answers = self.rt.block_on(in_order(queue));
        answers
            .into_iter()
            .map(|a| {
                a.map_err(|e| {
                    let e = LedgerError::from(e);
                    if self.failed.is_none() {
                        self.failed = Some(e.clone());
                    }
                    e
                })
            })
            .collect()
    }

    /// [`Pipe::flush_all`], failing with the first failure.
    fn flush(&mut self) -> Result<Vec<Reply>, LedgerError> {
        self.flush_all().into_iter().collect()
    }

    /// Queues a statement without parameters (transaction control).
    fn control(&mut self, sql: &str) -> Result<(), LedgerError> {
        self.push_exec(sql, Vec::new())
    }

    /// Begins a batch: the lock, the last transfer id and the rows of
    /// `jobs` read in the same round trip.
    fn begin(&mut self, jobs: &[String]) -> Result<(), LedgerError> {
        self.failed = None;
        self.jobs.clear();
        BATCHES.fetch_add(1, Ordering::Relaxed);
        self.control("BEGIN")?;
        self.push_exec("SELECT pg_advisory_xact_lock(?1)", vec![V::I(WRITER_LOCK)])?;
        self.push_query(
            "SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM transfers",
            Vec::new(),
        )?;
        if !jobs.is_empty() {
            self.push_query(
                &format!(
                    "SELECT {} FROM jobs WHERE job_id IN (SELECT jsonb_array_elements_text(CAST(CAST(?1 AS TEXT) AS JSONB)))",
                    ledger::JOB_COLUMNS
                ),
                vec![V::T(serde_json::json!(jobs).to_string())],
            )?;
        }
        let answers = self.flush()?;
        let mut rows = answers.into_iter().filter_map(|a| match a {
            Reply::Rows(r) => Some(r),
            Reply::Count(_) => None,
        });
        let last = rows
            .next()
            .and_then(|r| r.first().map(|r| r.try_get::<_, i64>(0)))
            .transpose()?
            .unwrap_or(0);
        self.last_transfer = Some(last);
        self.first_transfer = last;
        for j in jobs {
            self.jobs.insert(j.clone(), None);
        }
        for r in rows.next().unwrap_or_default() {
            let row = pg_row(&r)?;
            let id = row.str(0)?;
            self.jobs.insert(id, Some(row));
        }
        Ok(())
    }

    /// Queues the gathered changes, one statement per table (the order
    /// keeps foreign keys whole: accounts exist before transfers name
    /// them, transfers before jobs' rows are resolved). A failure here is
    /// the batch's, not the command's that happened to send them (they
    /// hold earlier commands' writes): the straight pass is run again
    /// carefully.
    fn write_gathered(&mut self) -> Result<(), LedgerError> {
        let r = self.queue_gathered();
        if let Err(e) = &r
            && self.failed.is_none()
        {
            self.failed = Some(e.clone());
        }
        r
    }

    /// Queues `sql` with `rows` as its one parameter, a JSON list.
    fn push_rows(&mut self, sql: &str, rows: Vec<Value>) -> Result<(), LedgerError> {
        self.push_exec(sql, vec![V::T(Value::from(rows).to_string())])
    }

    /// The batch's gathered changes, with one more write counted for the
    /// current command; `None` when changes are not gathered (each is
    /// written at once).
    fn gather(&mut self) -> Option<&mut Gathered> {
        let g = self.gathered.as_mut()?;
        self.writes_in_command += 1;
        Some(g)
    }

    fn queue_gathered(&mut self) -> Result<(), LedgerError> {
        let Some(g) = self.gathered.as_mut() else {
            return Ok(());
        };
        if g.is_empty() {
            return Ok(());
        }
        let g = std::mem::take(g);
        if !g.accounts.is_empty() {
            let rows: Vec<Value> = g
                .accounts
                .iter()
                .filter(|(_, d)| !d.is_zero())
                .map(|(id, d)| {
                    serde_json::json!({
                        "id": id,
                        "dpe": d.debits_pending,
                        "dpo": d.debits_posted,
                        "cpe": d.credits_pending,
                        "cpo": d.credits_posted,
                    })
                })
                .collect();
            if !rows.is_empty() {
                self.push_rows(
                    "UPDATE accounts AS a SET debits_pending = a.debits_pending + d.dpe,
                        debits_posted = a.debits_posted + d.dpo,
                        credits_pending = a.credits_pending + d.cpe,
                        credits_posted = a.credits_posted + d.cpo
                     FROM jsonb_to_recordset(CAST(CAST(?1 AS TEXT) AS JSONB))
                        AS d(id TEXT, dpe BIGINT, dpo BIGINT, cpe BIGINT, cpo BIGINT)
                     WHERE a.id = d.id",
                    rows,
                )?;
            }
        }
        if !g.transfers.is_empty() {
            let rows: Vec<Value> = g
                .transfers
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "id": t.id,
                        "kind": t.kind,
                        "debit_account": t.debit_account,
                        "credit_account": t.credit_account,
                        "amount": t.amount,
                        "pending_id": t.pending_id,
                        "job_id": t.job_id,
                        "created_at": t.created_at,
                    })
                })
                .collect();
            self.push_rows(
                "INSERT INTO transfers (id, kind, debit_account, credit_account, amount, pending_id, job_id, created_at)
                 SELECT id, kind, debit_account, credit_account, amount, pending_id, job_id, created_at
                 FROM jsonb_to_recordset(CAST(CAST(?1 AS TEXT) AS JSONB))
                    AS d(id BIGINT, kind TEXT, debit_account TEXT, credit_account TEXT, amount BIGINT,
                         pending_id BIGINT, job_id TEXT, created_at BIGINT)
                 ORDER BY id",
                rows,
            )?;
        }
        if !g.jobs.is_empty() {
            let rows: Vec<Value> = g
                .jobs
                .iter()
                .map(|(id, c)| {
                    serde_json::json!({
                        "job_id": id,
                        "state": c.state,
                        "cost": c.cost,
                        "resolved_at": c.resolved_at,
                        "receipt_sha256": c.receipt_sha256,
                        "receipt_status": c.receipt_status,
                    })
                })
                .collect();
            self.push_rows(
                "UPDATE jobs AS j SET state = COALESCE(d.state, j.state),
                    cost = COALESCE(d.cost, j.cost),
                    resolved_at = COALESCE(d.resolved_at, j.resolved_at),
                    receipt_sha256 = COALESCE(d.receipt_sha256, j.receipt_sha256),
                    receipt_status = COALESCE(d.receipt_status, j.receipt_status)
                 FROM jsonb_to_recordset(CAST(CAST(?1 AS TEXT) AS JSONB))
                    AS d(job_id TEXT, state TEXT, cost BIGINT, resolved_at BIGINT,
                         receipt_sha256 TEXT, receipt_status TEXT)
                 WHERE j.job_id = d.job_id",
                rows,
            )?;
        }
        if !g.reputation.is_empty() {
            let rows: Vec<Value> = g
                .reputation
                .iter()
                .map(|((account, role), c)| {
                    serde_json::json!({
                        "account": account,
                        "role": role,
                        "requests": c[0],
                        "acknowledged": c[1],
                        "disputed": c[2],
                        "unacknowledged": c[3],
                    })
                })
                .collect();
            self.push_rows(
                "INSERT INTO reputation (account, role, requests, acknowledged, disputed, unacknowledged)
                 SELECT account, role, requests, acknowledged, disputed, unacknowledged
                 FROM jsonb_to_recordset(CAST(CAST(?1 AS TEXT) AS JSONB))
                    AS d(account TEXT, role TEXT, requests BIGINT, acknowledged BIGINT,
                         disputed BIGINT, unacknowledged BIGINT)
                 ON CONFLICT(account, role) DO UPDATE SET
                    requests = reputation.requests + excluded.requests,
                    acknowledged = reputation.acknowledged + excluded.acknowledged,
                    disputed = reputation.disputed + excluded.disputed,
                    unacknowledged = reputation.unacknowledged + excluded.unacknowledged",
                rows,
            )?;
        }
        Ok(())
    }

    /// Ends a batch: rolls back whatever was not committed.
    fn rollback(&mut self) {
        self.queue.clear();
        self.gathered = None;
        self.last_transfer = None;
        self.jobs.clear();
        if self.control("ROLLBACK").is_ok() {
            let _ = self.flush();
        }
        self.failed = None;
    }
}

/// Polls every future once, in order (each sends its request then), and
/// then waits for each answer in turn.
async fn in_order(mut queue: Vec<Pending>) -> Vec<Result<Reply, tokio_postgres::Error>> {
    let mut early = Vec::with_capacity(queue.len());
    for f in &mut queue {
        early.push(
            futures::future::poll_fn(|cx| {
                Poll::Ready(match f.as_mut().poll(cx) {
                    Poll::Ready(r) => Some(r),
                    Poll::Pending => None,
                })
            })
            .await,
        );
    }
    let mut out = Vec::with_capacity(queue.len());
    for (f, done) in queue.into_iter().zip(early) {
        out.push(match done {
            Some(r) => r,
            None => f.await,
        });
    }
    out
}

impl Db for Pipe {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, LedgerError> {
        self.write_gathered()?;
        self.push_exec(sql, params.to_vec())?;
        match self.flush()?.pop() {
            Some(Reply::Count(n)) => {
                if n > 0 {
                    self.writes_in_command += 1;
                }
                Ok(n)
            }
            _ => Err(LedgerError::Storage("no count for a statement".into())),
        }
    }

    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Row>, LedgerError> {
        self.write_gathered()?;
        self.push_query(sql, params.to_vec())?;
        match self.flush()?.pop() {
            Some(Reply::Rows(rows)) => rows.iter().map(pg_row).collect(),
            _ => Err(LedgerError::Storage("no rows for a query".into())),
        }
    }

    fn write(&mut self, sql: &str, params: &[V]) -> Result<(), LedgerError> {
        self.write_gathered()?;
        self.writes_in_command += 1;
        self.push_exec(sql, params.to_vec())
    }

    fn next_transfer_id(&mut self) -> Option<i64> {
        let id = self.last_transfer? + 1;
        self.last_transfer = Some(id);
        Some(id)
    }

    fn prefetched_job(&mut self, job_id: &str) -> Option<Option<Row>> {
        self.jobs.remove(job_id)
    }

    fn add_to_account(&mut self, id: &str, d: AccountDelta) -> Result<(), LedgerError> {
        let Some(g) = self.gather() else {
            return change::write_account_delta(self, id, d);
        };
        g.accounts.entry(id.to_string()).or_default().add(d)
    }

    fn add_transfer(&mut self, t: TransferRow) -> Result<(), LedgerError> {
        let Some(g) = self.gather() else {
            return change::write_transfer(self, t);
        };
        g.transfers.push(t);
        Ok(())
    }

    fn change_job(&mut self, job_id: &str, c: JobChange) -> Result<(), LedgerError> {
        let Some(g) = self.gather() else {
            return change::write_job_change(self, job_id, c);
        };
        g.jobs.entry(job_id.to_string()).or_default().then(c);
        Ok(())
    }

    fn add_reputation(
        &mut self,
        account: &str,
        role: &str,
        c: ReputationCounts,
    ) -> Result<(), LedgerError> {
        let Some(g) = self.gather() else {
            return change::write_reputation(self, account, role, c);
        };
        let sum = g
            .reputation
            .entry((account.to_string(), role.to_string()))
            .or_default();
        for (s, v) in sum.iter_mut().zip(c) {
            *s = s
                .checked_add(v)
                .ok_or_else(|| LedgerError::Range("a reputation count overflows".into()))?;
        }
        Ok(())
    }
}

/// The jobs a batch's settlements resolve that nothing else in the batch
/// names (so the row read ahead is the row the settlement would read),
/// up to the first expiry (which may change any job).
fn read_ahead(cmds: &[&Command]) -> Vec<String> {
    let mut named: HashMap<&str, (usize, bool)> = HashMap::new();
    let mut expired = false;
    for c in cmds {
        let (job, settle) = match c {
            Command::Settle { receipt, .. } => (receipt.job_id.as_str(), !expired),
            Command::Cancel { job_id, .. }
            | Command::Reserve { job_id, .. }
            | Command::RecordAudit { job_id, .. } => (job_id.as_str(), false),
            Command::ExpireDue { .. } => {
                expired = true;
                continue;
            }
            _ => continue,
        };
        let e = named.entry(job).or_insert((0, settle));
        e.0 += 1;
        e.1 &= settle;
    }
    let mut jobs: Vec<String> = named
        .into_iter()
        .filter(|(_, (n, settle))| *n == 1 && *settle)
        .map(|(j, _)| j.to_string())
        .collect();
    jobs.sort();
    jobs
}

/// What each command of a batch gave, and its audit events.
pub type Applied = Vec<(Result<Outcome, LedgerError>, Vec<Value>)>;

/// Why a straight pass stopped.
enum Stop {
    /// Run the batch again carefully.
    Careful,
    /// Refuse the batch whole.
    Fail(LedgerError),
}

/// Applies `cmds` in one transaction (see the module's comment for the
/// two passes) and commits it after the invariants hold.
pub fn run_commands(pipe: &mut Pipe, cmds: &[&Command]) -> Result<Applied, LedgerError> {
    match straight(pipe, cmds) {
        Ok(r) => return Ok(r),
        Err(Stop::Fail(e)) => {
            pipe.rollback();
            return Err(e);
        }
        Err(Stop::Careful) => pipe.rollback(),
    }
    CAREFUL_PASSES.fetch_add(1, Ordering::Relaxed);
    ::metrics::counter!("troop_ledger_careful_passes_total").increment(1);
    careful(pipe, cmds).inspect_err(|_| pipe.rollback())
}

fn straight(pipe: &mut Pipe, cmds: &[&Command]) -> Result<Applied, Stop> {
    pipe.begin(&read_ahead(cmds)).map_err(Stop::Fail)?;
    pipe.gathered = Some(Gathered::default());
    let mut out = Vec::with_capacity(cmds.len());
    for cmd in cmds {
        let mut events = Vec::new();
        pipe.writes_in_command = 0;
        let r = ledger::apply(pipe, cmd, &mut events);
        if pipe.failed.is_some() {
            return Err(Stop::Careful);
        }
        if r.is_err() && pipe.writes_in_command > 0 {
            return Err(Stop::Careful);
        }
        out.push((r, events));
    }
    finish(pipe).map_err(|e| {
        if pipe.failed.is_some() {
            Stop::Careful
        } else {
            Stop::Fail(e)
        }
    })?;
    Ok(out)
}

fn careful(pipe: &mut Pipe, cmds: &[&Command]) -> Result<Applied, LedgerError> {
    pipe.begin(&[])?;
    // Nothing is read ahead; ids are given out as before, one command's
    // taken back when it is rolled back.
    let mut out = Vec::with_capacity(cmds.len());
    for cmd in cmds {
        let mut events = Vec::new();
        let mark = pipe.last_transfer;
        pipe.control("SAVEPOINT command")?;
        let mut r = ledger::apply(pipe, cmd, &mut events);
        if r.is_ok() {
            pipe.control("RELEASE SAVEPOINT command")?;
            if let Err(e) = pipe.flush() {
                r = Err(e);
            }
        }
        if r.is_err() {
            // What this command queued goes too, then is undone with it.
            pipe.control("ROLLBACK TO SAVEPOINT command")?;
            pipe.control("RELEASE SAVEPOINT command")?;
            let mut answers = pipe.flush_all();
            let released = answers.pop();
            let rolled_back = answers.pop();
            for a in [rolled_back, released] {
                a.unwrap_or_else(|| Err(LedgerError::Storage("no answer to a rollback".into())))?;
            }
            pipe.failed = None;
            pipe.last_transfer = mark;
            events.clear();
        }
        out.push((r, events));
    }
    finish(pipe)?;
    Ok(out)
}

/// The sequence moved past the ids given out, the invariants checked, the
/// commit.
fn finish(pipe: &mut Pipe) -> Result<(), LedgerError> {
    pipe.write_gathered()?;
    pipe.gathered = None;
    if let Some(last) = pipe.last_transfer.filter(|l| *l > pipe.first_transfer) {
        pipe.write(
            "SELECT setval(pg_get_serial_sequence('transfers', 'id'), CAST(?1 AS BIGINT))",
            &[V::I(last)],
        )?;
    }
    ledger::check_invariants(pipe)?;
    pipe.control("COMMIT")?;
    pipe.flush()?;
    pipe.last_transfer = None;
    pipe.jobs.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use troop_protocol::receipt::{JobStatus, Receipt};

    fn settle(job: &str) -> Command {
        Command::Settle {
            receipt: Receipt {
                job_id: job.into(),
                worker: "w".into(),
                user: "u".into(),
                model: "m".into(),
                prompt_tokens: 0,
                completion_tokens: 0,
                started_at: 0,
                finished_at: 0,
                status: JobStatus::Completed,
                requests: Vec::new(),
            },
            receipt_sha256: "s".into(),
            now_ms: 0,
            unacked_cap_ms: 0,
            tolerance_ms: 0,
            ack_signatures: None,
        }
    }

    #[test]
    fn only_jobs_nothing_else_in_the_batch_touches_are_read_ahead() {
        let cancel = Command::Cancel {
            job_id: "b".into(),
            now_ms: 0,
        };
        let expire = Command::ExpireDue {
            cutoff_secs: 0,
            now_ms: 0,
            limit: 1,
        };
        let (a, b, c, d) = (settle("a"), settle("b"), settle("c"), settle("d"));
        // b is cancelled too, c settled twice, d after an expiry.
        let batch = [&a, &b, &cancel, &c, &c, &expire, &d];
        assert_eq!(read_ahead(&batch), vec!["a".to_string()]);
    }
}
