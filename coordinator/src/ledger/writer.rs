//! The writer thread: every ledger write goes through it, grouped into
//! batches (one transaction, each command in its own savepoint, the
//! invariants checked before the one durable commit) on a backend:
//! SQLite here, PostgreSQL in `crate::pg`.

use rusqlite::Connection;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::{Command, LedgerError, Outcome, apply, check_invariants};
use crate::db::Lite;

type Reply = oneshot::Sender<Result<Outcome, LedgerError>>;

pub struct Envelope {
    pub(crate) cmd: Command,
    pub(crate) request_id: Option<String>,
    reply: Reply,
}

enum Message {
    Command(Box<Envelope>),
    Stop,
}

/// Handle to the writer thread. Cloneable; every write goes through it.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Message>,
}

/// Owns the writer thread; `shutdown` finishes what is queued and joins it.
pub struct WriterThread {
    tx: mpsc::Sender<Message>,
    join: Option<std::thread::JoinHandle<()>>,
}

/// Receives the audit events of each committed batch.
pub type AuditSink = Box<dyn Fn(Vec<(Option<String>, Value)>) + Send>;

/// A database the writer commits batches to: SQLite here, PostgreSQL in
/// `crate::pg`.
pub trait Backend: Send {
    /// Applies a batch in one transaction: each command in its own
    /// savepoint, the invariants checked before the one commit.
    fn run(&mut self, batch: &[Envelope]) -> Result<BatchResult, LedgerError>;
    /// Most commands in one batch on this store.
    fn max_batch(&self, configured: usize) -> usize {
        configured
    }
}

/// The SQLite ledger as the writer's backend.
pub struct Sqlite(pub Connection);

impl Backend for Sqlite {
    fn run(&mut self, batch: &[Envelope]) -> Result<BatchResult, LedgerError> {
        let mut tx = self
            .0
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut out = BatchOutcome::new(batch.len());
        for env in batch {
            let mut events = Vec::new();
            let sp = tx.savepoint()?;
            let r = apply(&mut Lite(&sp), &env.cmd, &mut events);
            if r.is_ok() {
                sp.commit()?;
            } else {
                drop(sp); // rolls back this command only
            }
            out.push(env, r, events);
        }
        check_invariants(&mut Lite(&tx))?;
        tx.set_drop_behavior(rusqlite::DropBehavior::Commit);
        tx.commit()?;
        Ok(out.done())
    }
}

/// Results and audit events of a batch, gathered command by command.
pub struct BatchOutcome {
    results: Vec<Result<Outcome, LedgerError>>,
    events: Vec<(Option<String>, Value)>,
}

impl BatchOutcome {
    pub(crate) fn new(size: usize) -> Self {
        Self {
            results: Vec::with_capacity(size),
            events: Vec::new(),
        }
    }

    pub(crate) fn push(
        &mut self,
        env: &Envelope,
        r: Result<Outcome, LedgerError>,
        events: Vec<Value>,
    ) {
        if r.is_ok() {
            self.events
                .extend(events.into_iter().map(|e| (env.request_id.clone(), e)));
        }
        self.results.push(r);
    }

    pub(crate) fn done(self) -> BatchResult {
        (self.results, self.events)
    }
}

impl Writer {
    /// Starts the writer on `store`.
    pub fn start(
        store: Box<dyn Backend>,
        max_batch: usize,
        audit: AuditSink,
    ) -> (Writer, WriterThread) {
        let max_batch = store.max_batch(max_batch);
        let (tx, rx) = mpsc::channel(65_536);
        let join = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer_loop(store, rx, max_batch.max(1), audit))
            .ok();
        (Writer { tx: tx.clone() }, WriterThread { tx, join })
    }

    /// Submits a command and waits until it is durably committed (or refused).
    pub async fn submit(
        &self,
        cmd: Command,
        request_id: Option<String>,
    ) -> Result<Outcome, LedgerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Message::Command(Box::new(Envelope {
                cmd,
                request_id,
                reply,
            })))
            .await
            .map_err(|_| LedgerError::Closed)?;
        rx.await.map_err(|_| LedgerError::Closed)?
    }
}

impl WriterThread {
    /// Lets the writer finish every queued command, then joins it.
    pub async fn shutdown(mut self) {
        let _ = self.tx.send(Message::Stop).await;
        if let Some(join) = self.join.take() {
            let _ = tokio::task::spawn_blocking(move || join.join()).await;
        }
    }
}

fn writer_loop(
    mut store: Box<dyn Backend>,
    mut rx: mpsc::Receiver<Message>,
    max_batch: usize,
    audit: AuditSink,
) {
    let mut stop = false;
    while !stop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut batch = Vec::new();
        match first {
            Message::Command(e) => batch.push(*e),
            Message::Stop => stop = true,
        }
        while batch.len() < max_batch && !stop {
            match rx.try_recv() {
                Ok(Message::Command(e)) => batch.push(*e),
                Ok(Message::Stop) => stop = true,
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        run_batch(&mut store, batch, &audit);
        metrics::counter!("troop_ledger_commits_total").increment(1);
    }
    rx.close();
    // Commands that raced with the stop are refused, never dropped silently.
    while let Ok(Message::Command(e)) = rx.try_recv() {
        let e = *e;
        let _ = e.reply.send(Err(LedgerError::Closed));
    }
    tracing::info!("ledger writer stopped");
}

pub type BatchResult = (
    Vec<Result<Outcome, LedgerError>>,
    Vec<(Option<String>, Value)>,
);

fn run_batch(store: &mut Box<dyn Backend>, batch: Vec<Envelope>, audit: &AuditSink) {
    let size = batch.len();
    metrics::histogram!("troop_ledger_batch_size").record(size as f64);
    let result = store.run(&batch);
    match result {
        Ok((results, events)) => {
            if !events.is_empty() {
                audit(events);
            }
            for (env, r) in batch.into_iter().zip(results) {
                let _ = env.reply.send(r);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "ledger batch rolled back");
            for env in batch {
                let _ = env.reply.send(Err(e.clone()));
            }
        }
    }
}
