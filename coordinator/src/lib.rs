//! Troop's coordinator: a thin HTTP service that signs short-lived RS256
//! tickets and settles a double-entry SQLite credit ledger from receipts
//! that workers authenticate with HMAC-SHA256.
//!
//! `app(state)` builds the router; [`Coordinator::open`] prepares the state
//! from a data folder and [`Coordinator::serve`] runs it until a shutdown
//! signal, finishing what is in flight.

pub mod admin;
pub mod audit;
pub mod client_addr;
pub mod config;
pub mod db;
pub mod http;
pub mod ledger;
pub mod listener;
pub mod metrics;
pub mod pg;
pub mod rate_limit;
pub mod routes;
pub mod sweeper;
pub mod tickets;
pub mod worker_index;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use troop_protocol::sync::MutexExt as _;

use anyhow::Context;

pub use config::Config;
pub use routes::app;

use audit::{AuditLog, AuditThread};
use ledger::{WorkerRow, Writer, WriterThread};
use rate_limit::{IpLimiter, UserLimiter};
use tickets::TicketKeys;

/// Unix seconds and milliseconds now: the one wall clock of every part.
pub use troop_protocol::policy::{unix_ms, unix_secs};

/// Everything the handlers share.
pub struct AppState {
    pub cfg: Config,
    pub writer: Writer,
    readers: Readers,
    next_reader: AtomicUsize,
    pub keys: TicketKeys,
    pub audit: AuditLog,
    /// Registered workers, mirrored from the ledger after each commit.
    pub workers: RwLock<HashMap<String, WorkerRow>>,
    /// The order `/bootstrap` lists `workers` in: whoever changes a
    /// worker's registration, proof, models or liveness puts it again
    /// (under `workers`' write lock: `workers` first, then the index).
    pub worker_index: worker_index::WorkerIndex,
    /// With PostgreSQL: what this replica read of the shared worker table.
    pub worker_refresh: sweeper::RefreshCounts,
    /// (peer, nonce) -> signed timestamp, for replay refusal.
    pub nonces: Mutex<HashMap<(String, String), u64>>,
    /// With PostgreSQL: heartbeats kept until this replica writes them
    /// (`sweeper::refresh_workers`), the newest per worker.
    pub beats: Mutex<HashMap<String, ledger::Beat>>,
    pub discovery_limiter: IpLimiter,
    pub authorize_limiter: UserLimiter,
    pub account_read_limiter: UserLimiter,
    pub authorize_ip_limiter: IpLimiter,
    /// New worker registrations per client IP.
    pub register_ip_limiter: IpLimiter,
    /// The client IP each worker last registered or beat from (for
    /// `/bootstrap`'s per-IP cap; bounded by the worker table).
    pub worker_ips: Mutex<HashMap<String, std::net::IpAddr>>,
    /// Requests signed before this second are refused (their nonces were
    /// held in memory by a process that is gone).
    pub started_at: u64,
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Why the database cannot be used now (PostgreSQL down); `/health`
    /// answers 503 with it.
    pub db_down: Mutex<Option<String>>,
    /// Proof-of-hardware rounds in progress, by challenge id.
    pub challenges: Mutex<HashMap<String, routes::hardware::Pending>>,
    /// At most `bench_verify_concurrency` proofs are checked at once.
    pub verify_slots: tokio::sync::Semaphore,
    /// Proofs waiting for a slot (bounded by `bench_verify_queue`).
    pub verify_waiting: AtomicUsize,
    /// Requests being handled (at most `max_in_flight`).
    pub in_flight: tokio::sync::Semaphore,
}

/// The connections handlers read with.
enum Readers {
    Sqlite(Vec<Mutex<rusqlite::Connection>>),
    Postgres(pg::PgReaders),
}

/// The opened coordinator, ready to serve.
pub struct Coordinator {
    pub state: Arc<AppState>,
    writer_thread: WriterThread,
    audit_thread: AuditThread,
    /// Held while this coordinator may write the audit log.
    _data_lock: admin::DataLock,
}

impl Coordinator {
    /// Opens the data folder: migrates the ledger, reconciles the audit log,
    /// loads (or makes) the ticket key and the registered workers.
    pub fn open(cfg: Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("creating data folder {}", cfg.data_dir.display()))?;
        let data_lock = admin::DataLock::take(&cfg.data_dir)?;
        let (store, readers, workers, db_down) = match &cfg.database {
            None => {
                let conn = ledger::open(&cfg.ledger_path())
                    .with_context(|| format!("opening ledger {}", cfg.ledger_path().display()))?;
                let mut lite = db::Lite(&conn);
                ledger::check_invariants_full(&mut lite).context("ledger invariants at start")?;
                let recovered = audit::reconcile(&cfg.audit_path(), &mut lite, None)
                    .context("reconciling the audit log")?;
                if recovered > 0 {
                    tracing::warn!(
                        recovered,
                        "audit log lacked committed transfers; recovered lines appended"
                    );
                }
                let workers = ledger::load_workers(&mut lite)?;
                let mut readers = Vec::new();
                for _ in 0..4 {
                    readers.push(Mutex::new(ledger::open_reader(&cfg.ledger_path())?));
                }
                (
                    Box::new(ledger::Sqlite(conn)) as Box<dyn ledger::Backend>,
                    Readers::Sqlite(readers),
                    workers,
                    None,
                )
            }
            Some(url) => {
                let (mut client, workers, down) = pg::open_or_wait(url)?;
                if down.is_none() {
                    tracing::info!(schema = pg::known_version(), "PostgreSQL ledger ready");
                }
                // The transfers this replica committed that its audit log
                // lacks (a crash before the log's flush), as SQLite does.
                if let Some(c) = client.as_mut() {
                    let mut cache = db::StatementCache::default();
                    let mut pg = db::Pg {
                        client: c,
                        cache: &mut cache,
                    };
                    let names = [cfg.replica_name()];
                    let recovered = audit::reconcile(&cfg.audit_path(), &mut pg, Some(&names))
                        .context("reconciling the audit log")?;
                    if recovered > 0 {
                        tracing::warn!(
                            recovered,
                            "audit log lacked transfers this replica committed; recovered lines appended"
                        );
                    }
                }
                (
                    Box::new(pg::PgWriter::new(url, client).named(cfg.replica_name()))
                        as Box<dyn ledger::Backend>,
                    Readers::Postgres(pg::PgReaders::new(url, 4)),
                    workers,
                    down,
                )
            }
        };
        let workers: HashMap<String, WorkerRow> = workers
            .into_iter()
            .map(|w| (w.peer_id.clone(), w))
            .collect();
        let replica = cfg.database.as_ref().map(|_| cfg.replica_name());
        let (audit_log, audit_thread) = AuditLog::open_named(&cfg.audit_path(), replica)
            .with_context(|| format!("opening {}", cfg.audit_path().display()))?;
        let keys = cfg.ticket_keys()?;
        let sink_log = audit_log.clone();
        let sink: ledger::AuditSink = Box::new(move |events| {
            for (_, ev) in &events {
                match ev.get("event").and_then(|e| e.as_str()) {
                    Some("ledger.settle") => {
                        ::metrics::counter!("troop_settlements_total").increment(1)
                    }
                    Some("ledger.refund") | Some("ledger.expire") => {
                        ::metrics::counter!("troop_refunds_total").increment(1)
                    }
                    _ => {}
                }
            }
            sink_log.record_ledger(events);
        });
        // Each backend caps its own batches (PostgreSQL's stay small).
        let (writer, writer_thread) = Writer::start(store, cfg.max_batch, sink);
        let verify_slots = cfg.bench_verify_concurrency.max(1);
        let max_in_flight = cfg.max_in_flight.max(1);
        let state = AppState {
            discovery_limiter: IpLimiter::per_hour(cfg.discovery_per_hour),
            authorize_limiter: UserLimiter::per_hour(cfg.authorize_per_hour),
            account_read_limiter: UserLimiter::per_hour(cfg.account_reads_per_hour),
            authorize_ip_limiter: IpLimiter::per_hour(cfg.authorize_per_ip_per_hour),
            register_ip_limiter: IpLimiter::per_hour(cfg.registrations_per_ip_per_hour),
            worker_ips: Mutex::new(HashMap::new()),
            cfg,
            writer,
            readers,
            next_reader: AtomicUsize::new(0),
            keys,
            audit: audit_log,
            worker_index: worker_index::WorkerIndex::of(workers.values()),
            workers: RwLock::new(workers),
            worker_refresh: Default::default(),
            nonces: Mutex::new(HashMap::new()),
            beats: Mutex::new(HashMap::new()),
            started_at: unix_secs(),
            prometheus: metrics::handle(),
            challenges: Mutex::new(HashMap::new()),
            db_down: Mutex::new(db_down),
            verify_slots: tokio::sync::Semaphore::new(verify_slots),
            verify_waiting: AtomicUsize::new(0),
            in_flight: tokio::sync::Semaphore::new(max_in_flight),
        };
        Ok(Self {
            state: Arc::new(state),
            writer_thread,
            audit_thread,
            _data_lock: data_lock,
        })
    }

    /// Serves on `listener` until `shutdown` resolves, then stops accepting,
    /// finishes the requests in flight, commits what the ledger holds and
    /// flushes the audit log.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, kid = %self.state.keys.kid, "coordinator listening");
        let sweeper = tokio::spawn(sweeper::run(self.state.clone()));
        let refresher = self
            .state
            .shared()
            .then(|| tokio::spawn(sweeper::refresh_workers(self.state.clone())));
        let router = app(self.state.clone());
        let (stop_metrics, metrics_stopped) = tokio::sync::watch::channel(false);
        let metrics_server = match self.state.cfg.metrics_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding --metrics-listen {addr}"))?;
                tracing::info!(addr = %l.local_addr()?, "metrics listening");
                let mut stopped = metrics_stopped.clone();
                Some(tokio::spawn(
                    axum::serve(
                        listener::Guarded::new(l, self.state.cfg.conn_limits),
                        routes::metrics_app(self.state.clone()),
                    )
                    .with_graceful_shutdown(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .into_future(),
                ))
            }
            None => None,
        };
        let served = axum::serve(
            listener::Guarded::new(listener, self.state.cfg.conn_limits),
            router.into_make_service_with_connect_info::<listener::ClientAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await;
        let _ = stop_metrics.send(true);
        if let Some(m) = metrics_server {
            let _ = m.await;
        }
        sweeper.abort();
        let _ = sweeper.await;
        if let Some(r) = refresher {
            r.abort();
            let _ = r.await;
        }
        self.writer_thread.shutdown().await;
        let audit_thread = self.audit_thread;
        let _ = tokio::task::spawn_blocking(move || audit_thread.shutdown()).await;
        tracing::info!("coordinator stopped");
        served.context("serving HTTP")
    }
}

impl AppState {
    /// Runs a query on one of the reader connections, off the async
    /// threads.
    pub async fn read_with<T, F>(self: &Arc<Self>, f: F) -> Result<T, ledger::LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn db::Db) -> Result<T, ledger::LedgerError> + Send + 'static,
    {
        let state = self.clone();
        let r = tokio::task::spawn_blocking(move || {
            let i = state.next_reader.fetch_add(1, Ordering::Relaxed);
            match &state.readers {
                Readers::Sqlite(readers) => {
                    let guard = readers[i % readers.len()]
                        .lock()
                        .map_err(|_| ledger::LedgerError::Storage("reader lock poisoned".into()))?;
                    f(&mut db::Lite(&guard))
                }
                Readers::Postgres(pool) => pool.with(i, f),
            }
        })
        .await
        .map_err(|e| ledger::LedgerError::Storage(e.to_string()))?;
        self.note_db(&r);
        r
    }

    /// Puts a worker's row, as the ledger wrote it, in the table and in
    /// the bootstrap order (its registration, proof or models may have
    /// changed).
    pub fn put_worker(&self, row: WorkerRow) {
        if let Ok(mut w) = self.workers.write() {
            self.worker_index.put(&row);
            w.insert(row.peer_id.clone(), row);
        }
    }

    /// Whether the replicas share their state through PostgreSQL.
    pub fn shared(&self) -> bool {
        matches!(self.readers, Readers::Postgres(_))
    }

    /// Whether "still here" heartbeats are kept and written together
    /// (PostgreSQL with `--heartbeat-flush-secs` above 0).
    pub fn beats_batched(&self) -> bool {
        self.shared() && !self.cfg.heartbeat_flush.is_zero()
    }

    /// Remembers whether the database answered (for `/health`).
    pub fn note_db<T>(&self, r: &Result<T, ledger::LedgerError>) {
        let down = match r {
            Err(ledger::LedgerError::Unavailable(why)) => Some(why.clone()),
            Err(_) => return,
            Ok(_) => None,
        };
        if let Some(mut d) = self.db_down.locked()
            && *d != down
        {
            match &down {
                Some(why) => tracing::error!(reason = %why, "database unavailable"),
                None => tracing::info!("database available again"),
            }
            *d = down;
        }
    }

    /// The worker `peer_id` as the database has it now, put into this
    /// replica's table (unless the table has a newer heartbeat). With
    /// PostgreSQL a worker may have registered or beaten on another replica
    /// since this one's last refresh (about a second ago): a miss (or a
    /// stale entry) in the table is read again here before a request is
    /// refused. With SQLite the table is the database, so `None` at once
    /// when it lacks the worker.
    pub async fn reload_worker(
        self: &Arc<Self>,
        peer_id: &str,
    ) -> Result<Option<WorkerRow>, ledger::LedgerError> {
        if !self.shared() {
            return Ok(self
                .workers
                .read()
                .ok()
                .and_then(|m| m.get(peer_id).cloned()));
        }
        let id = peer_id.to_string();
        let Some(row) = self
            .read_with(move |db| ledger::load_worker(db, &id))
            .await?
        else {
            return Ok(None);
        };
        let mut map = self
            .workers
            .write()
            .map_err(|_| ledger::LedgerError::Storage("worker table poisoned".into()))?;
        match map.get(&row.peer_id) {
            // A heartbeat this replica took since the read began.
            Some(have) if have.last_seen > row.last_seen => Ok(Some(have.clone())),
            _ => {
                self.worker_index.ensure(&row);
                map.insert(row.peer_id.clone(), row.clone());
                Ok(Some(row))
            }
        }
    }

    /// `f` of the worker `peer_id`: from this replica's table, else (with
    /// PostgreSQL, for a worker that registered on another replica since
    /// the last refresh) from the database ([`reload_worker`](Self::reload_worker)).
    pub async fn worker_with<T>(
        self: &Arc<Self>,
        peer_id: &str,
        f: impl Fn(&WorkerRow) -> T,
    ) -> Result<Option<T>, ledger::LedgerError> {
        if let Some(v) = self
            .workers
            .read()
            .ok()
            .and_then(|m| m.get(peer_id).map(&f))
        {
            return Ok(Some(v));
        }
        Ok(self.reload_worker(peer_id).await?.as_ref().map(f))
    }

    /// A signed request's nonce, refused when any replica (or this one)
    /// saw it before.
    pub async fn remember_nonce(
        self: &Arc<Self>,
        peer: String,
        nonce: String,
        signed_at: u64,
    ) -> Result<bool, ledger::LedgerError> {
        self.read_with(move |db| pg::remember_nonce(db, &peer, &nonce, signed_at))
            .await
    }

    /// A signed request's nonce and its shared quotas (`(name, key,
    /// per_hour)`, in order), checked in one round trip: see
    /// [`pg::admit`].
    pub async fn admit(
        self: &Arc<Self>,
        nonce: Option<http::extract::DeferredNonce>,
        quotas: Vec<(&'static str, String, u32)>,
    ) -> Result<pg::Admitted, ledger::LedgerError> {
        self.read_with(move |db| {
            let q: Vec<(&str, &str, u32)> = quotas
                .iter()
                .map(|(n, k, p)| (*n, k.as_str(), *p))
                .collect();
            let n = nonce
                .as_ref()
                .map(|d| (d.peer.as_str(), d.nonce.as_str(), d.signed_at));
            pg::admit(db, n, &q, unix_ms())
        })
        .await
    }

    /// One request against a quota of `per_hour` an hour that every
    /// replica shares; `Ok(Err(seconds))` to wait.
    pub async fn shared_rate(
        self: &Arc<Self>,
        name: &'static str,
        key: String,
        per_hour: u32,
    ) -> Result<Result<(), u64>, ledger::LedgerError> {
        self.read_with(move |db| pg::check_rate(db, name, &key, per_hour, unix_ms()))
            .await
    }
}

/// A coordinator running in the background on 127.0.0.1 (tests, the demo).
pub struct RunningCoordinator {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningCoordinator {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful stop; returns when everything is flushed.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.join.await.context("coordinator task")?
    }
}

/// Opens and serves a coordinator on `listen` in the background.
pub async fn spawn(cfg: Config, listen: SocketAddr) -> anyhow::Result<RunningCoordinator> {
    let coordinator = tokio::task::spawn_blocking(move || Coordinator::open(cfg)).await??;
    let state = coordinator.state.clone();
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(coordinator.serve(listener, async move {
        let _ = rx.await;
    }));
    Ok(RunningCoordinator {
        addr,
        state,
        stop: Some(tx),
        join,
    })
}
