//! The worker role: serves `/troop/infer/1` streams from its upstream model
//! server, advertises its models, registers and heartbeats with the
//! coordinator, and files a receipt after every job.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use troop_protocol::ErrorCode;
use troop_protocol::advert::{Advert, ModelAdvert, model_key};
use troop_protocol::api::{HeartbeatRequest, Load, RegisterRequest};
use troop_protocol::frames::{Frame, INFER_PROTOCOL, InferenceRequest};
use troop_protocol::policy::{BreakerState, CircuitBreaker, SystemClock};
use troop_protocol::receipt::{JobStatus, Receipt};
use troop_protocol::ticket::{TicketError, TicketVerifier};
use troop_protocol::usage::{Ack, LineStatus, RequestLine};

use crate::answer::{JobEnd, partial};
use crate::coordinator_client::CoordinatorClient;
use crate::frames_io::{read_frame, write_frame};
use crate::network::{self, NetConfig, NetworkHandle};
use crate::receipts::ReceiptQueue;
use crate::upstream::{Delta, Dialect, Upstream};

#[path = "worker_http.rs"]
mod http;

/// How to run a worker.
#[derive(Clone)]
pub struct WorkerConfig {
    pub identity: Keypair,
    pub coordinator: String,
    pub upstream: String,
    /// Force a dialect instead of probing.
    pub dialect: Option<Dialect>,
    pub net: NetConfig,
    /// Most jobs at once; beyond it a request gets `busy`.
    pub max_jobs: usize,
    pub advert_interval: Duration,
    pub heartbeat_interval: Duration,
    pub model_refresh_interval: Duration,
    /// Circuit breaker cool-down for heartbeats (60 s by default).
    pub breaker_cooldown: Duration,
    /// Where receipts wait while the coordinator is away.
    pub state_dir: PathBuf,
    /// Prove the hardware to the coordinator at start, on this backend.
    pub benchmark: Option<troop_bench_kernels::Backend>,
    /// A session with no request for this long is closed and its receipt
    /// filed (also at the ticket's expiry, or when its time is used up).
    pub session_idle: Duration,
    /// First-token, between-chunk and total limits on the upstream.
    pub timeouts: crate::answer::StreamTimeouts,
    /// Address of the status page, `/troop/status` and `/metrics`
    /// (`None`: no HTTP server).
    pub http: Option<std::net::SocketAddr>,
    /// Host names the status page answers to besides loopback ones and
    /// the address it binds (`--allowed-host`).
    pub allowed_hosts: Vec<String>,
    /// Most requests served under one session before it is closed and its
    /// receipt filed (the gateway then opens another); keeps every receipt
    /// inside the coordinator's body and line limits.
    pub max_session_requests: usize,
}

impl WorkerConfig {
    pub fn new(identity: Keypair, coordinator: &str, upstream: &str, state_dir: PathBuf) -> Self {
        let net = NetConfig::new(identity.clone());
        Self {
            identity,
            coordinator: coordinator.to_string(),
            upstream: upstream.to_string(),
            dialect: None,
            net,
            max_jobs: 64,
            advert_interval: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(20),
            model_refresh_interval: Duration::from_secs(15),
            breaker_cooldown: troop_protocol::policy::BREAKER_COOLDOWN,
            state_dir,
            benchmark: None,
            session_idle: Duration::from_secs(30),
            timeouts: crate::answer::StreamTimeouts::default(),
            http: None,
            allowed_hosts: Vec::new(),
            max_session_requests: troop_protocol::usage::MAX_SESSION_REQUESTS,
        }
    }
}

/// Live numbers of a worker (adverts, heartbeats, tests).
#[derive(Default)]
pub struct WorkerStats {
    pub active_jobs: AtomicU32,
    pub jobs_done: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_cancelled: AtomicU64,
    pub tokens_served: AtomicU64,
    pub heartbeats_ok: AtomicU64,
    pub heartbeats_failed: AtomicU64,
    pub heartbeats_skipped: AtomicU64,
    ttft_ms: Mutex<Option<f64>>,
    tokens_per_s: Mutex<Option<f64>>,
    pub breaker: Mutex<String>,
}

fn ewma(slot: &Mutex<Option<f64>>, sample: f64) {
    if let Ok(mut v) = slot.lock() {
        *v = Some(match *v {
            Some(old) => 0.8 * old + 0.2 * sample,
            None => sample,
        });
    }
}

impl WorkerStats {
    pub fn ttft_ms(&self) -> Option<f64> {
        self.ttft_ms.lock().ok().and_then(|v| *v)
    }
    pub fn tokens_per_s(&self) -> Option<f64> {
        self.tokens_per_s.lock().ok().and_then(|v| *v)
    }
}

struct Shared {
    cfg: WorkerConfig,
    peer_id: PeerId,
    client: CoordinatorClient,
    upstream: Upstream,
    verifier: tokio::sync::Mutex<TicketVerifier>,
    models: RwLock<Vec<ModelAdvert>>,
    multiplier: RwLock<f64>,
    receipt_key: Arc<RwLock<Vec<u8>>>,
    receipts: ReceiptQueue,
    jobs: Arc<Semaphore>,
    stats: Arc<WorkerStats>,
    net: NetworkHandle,
    /// Cancelled by `kill`: every job task stops at once.
    killed: tokio_util::sync::CancellationToken,
    /// Cancelled by `stop`: new requests are refused while the running
    /// ones finish.
    stopping: tokio_util::sync::CancellationToken,
    sessions: Mutex<Sessions>,
    /// The coordinator's key is fetched by one task at a time, at most once
    /// per [`KEY_REFRESH_EVERY`], never under the verifier's lock.
    key_refresh: tokio::sync::Mutex<Option<Instant>>,
    /// Streams whose ticket is not checked yet, by peer (bounded).
    unchecked: Mutex<std::collections::HashMap<PeerId, u32>>,
    /// The upstream's last model listing: when, and what went wrong.
    upstream_health: Mutex<UpstreamHealth>,
    /// The proof of hardware: not asked, running, verified or failed.
    proof: Mutex<ProofStatus>,
    started_ms: u64,
    /// The account as the status page shows it (read from the coordinator).
    account: crate::web::AccountView,
}

/// The upstream as last seen by the model listing (every 15 s).
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamHealth {
    pub ok: bool,
    pub checked_at_ms: u64,
    pub error: Option<String>,
}

/// Where the proof of hardware stands.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProofStatus {
    /// `off` (not asked: `--benchmark`), `running`, `verified` or `failed`.
    pub state: &'static str,
    pub gflops: Option<f64>,
    pub multiplier: Option<f64>,
    pub error: Option<String>,
    pub at_ms: Option<u64>,
}

/// Least time between two fetches of the coordinator's key for an unknown
/// `kid` (any peer can send one).
const KEY_REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Streams a peer may hold open before its ticket is checked.
const UNCHECKED_PER_PEER: u32 = 16;
/// Streams all peers together may hold open before their tickets are checked.
const UNCHECKED_TOTAL: u32 = 1024;

/// A place among the streams whose ticket is not checked yet.
struct Unchecked {
    s: Arc<Shared>,
    peer: PeerId,
}

impl Unchecked {
    fn take(s: &Arc<Shared>, peer: PeerId) -> Option<Self> {
        let mut m = s.unchecked.lock().ok()?;
        let total: u32 = m.values().sum();
        let mine = m.get(&peer).copied().unwrap_or(0);
        if total >= UNCHECKED_TOTAL || mine >= UNCHECKED_PER_PEER {
            metrics::counter!("troop_limit_hits_total", "limit" => "unchecked_streams")
                .increment(1);
            return None;
        }
        m.insert(peer, mine + 1);
        Some(Self { s: s.clone(), peer })
    }
}

impl Drop for Unchecked {
    fn drop(&mut self) {
        if let Ok(mut m) = self.s.unchecked.lock()
            && let Some(n) = m.get_mut(&self.peer)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

/// Open sessions: one per ticket, serving every request of its user until
/// the reservation is used up, the ticket expires or it sits idle.
#[derive(Default)]
struct Sessions {
    /// The exact ticket text -> its jti.
    by_ticket: std::collections::HashMap<String, String>,
    by_jti: std::collections::HashMap<String, Session>,
    /// Requests per user, in a row, that came without an acknowledgement.
    unacked: std::collections::HashMap<String, u32>,
}

struct Session {
    claims: troop_protocol::ticket::TicketClaims,
    ticket: String,
    /// The reservation in milliseconds of this worker's time.
    limit_ms: u64,
    used_ms: u64,
    active: u32,
    indices: std::collections::HashSet<u32>,
    lines: Vec<RequestLine>,
    acks: std::collections::HashMap<u32, Ack>,
    last_activity: Instant,
}

/// A user whose gateway left this many requests in a row unacknowledged
/// gets no new session from this worker.
const MAX_UNACKED_IN_A_ROW: u32 = 20;

/// Most users whose unacknowledged run the worker remembers; when full,
/// only the runs that block a user are kept.
const MAX_UNACKED_USERS: usize = 10_000;

/// A running worker; dropping it leaves the tasks running, `kill` stops
/// everything at once (as a crash would).
pub struct RunningWorker {
    pub peer_id: PeerId,
    pub net: NetworkHandle,
    pub stats: Arc<WorkerStats>,
    /// Where the status page and `/metrics` are served, when asked.
    pub http_addr: Option<std::net::SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    /// The adverts and heartbeats: stopped before the worker leaves.
    announce: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// What a graceful stop did.
#[derive(Debug, Clone, Default)]
pub struct StopReport {
    /// Whether the coordinator took the leave call.
    pub left: bool,
    /// Requests still running when the drain time ran out (cut off).
    pub cut_off: usize,
    /// Receipts filed for sessions closed by the stop.
    pub sessions_filed: usize,
    /// Receipts not delivered yet: kept on disk for the next start.
    pub receipts_kept: usize,
}

impl RunningWorker {
    /// Stops every task of this worker; its connections drop.
    pub fn kill(&mut self) {
        self.shared.killed.cancel();
        for t in self.tasks.drain(..).chain(self.announce.drain(..)) {
            t.abort();
        }
        self.net.shutdown();
    }

    /// Stops the way an operator expects (SIGTERM, Ctrl-C): no more adverts
    /// or heartbeats; the coordinator is told the worker is leaving, so it
    /// drops out of `/bootstrap` at once; new requests are refused (the
    /// gateway tries another worker) while running ones get up to `drain`
    /// to finish; every open session is closed and its receipt filed and
    /// delivered (what cannot be delivered in time stays on disk for the
    /// next start); then everything stops.
    pub async fn stop(mut self, drain: Duration) -> StopReport {
        let s = self.shared.clone();
        let mut report = StopReport::default();
        s.stopping.cancel();
        for t in self.announce.drain(..) {
            t.abort();
            let _ = t.await;
        }
        match tokio::time::timeout(Duration::from_secs(5), s.client.leave()).await {
            Ok(Ok(_)) => {
                report.left = true;
                tracing::info!("told the coordinator this worker is leaving");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the coordinator did not take the leave call; it lists this worker until its TTL")
            }
            Err(_) => tracing::warn!(
                "the coordinator did not answer the leave call in 5 s; it lists this worker until its TTL"
            ),
        }
        let deadline = Instant::now() + drain;
        let running = || s.cfg.max_jobs.saturating_sub(s.jobs.available_permits());
        if running() > 0 {
            tracing::info!(
                running = running(),
                drain_secs = drain.as_secs(),
                "letting running requests finish"
            );
        }
        while running() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report.cut_off = running();
        if report.cut_off > 0 {
            tracing::warn!(
                cut_off = report.cut_off,
                "drain time over; cutting off the requests still running"
            );
            s.killed.cancel();
        }
        // Requests cut off end their lines as they unwind.
        let settle = Instant::now() + Duration::from_secs(2);
        while running() > 0 && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let open: Vec<Session> = match s.sessions.lock() {
            Ok(mut ss) => {
                ss.by_ticket.clear();
                ss.by_jti.drain().map(|(_, x)| x).collect()
            }
            Err(_) => Vec::new(),
        };
        for mut sess in open {
            for l in sess.lines.iter_mut() {
                l.ack = sess.acks.remove(&l.index);
            }
            if !sess.lines.is_empty() {
                report.sessions_filed += 1;
            }
            file_session(&s, sess).await;
        }
        // The receipt task delivers what was filed; wait for it a while.
        let until = Instant::now() + Duration::from_secs(5);
        while !s.receipts.pending().is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report.receipts_kept = s.receipts.pending().len();
        self.kill();
        tracing::info!(
            left = report.left,
            cut_off = report.cut_off,
            sessions_filed = report.sessions_filed,
            receipts_kept = report.receipts_kept,
            "worker stopped"
        );
        report
    }

    pub fn models(&self) -> Vec<String> {
        self.shared
            .models
            .read()
            .map(|m| m.iter().map(|m| m.name.clone()).collect())
            .unwrap_or_default()
    }

    pub fn pending_receipts(&self) -> usize {
        self.shared.receipts.pending().len()
    }

    /// Waits until every task ends (they don't, unless killed).
    pub async fn wait(mut self) {
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn with_retries<T, E: std::fmt::Display, F, Fut>(what: &str, mut f: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    use backon::BackoffBuilder;
    let mut delays = troop_protocol::policy::retry_policy().build();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => match delays.next() {
                Some(d) => {
                    tracing::warn!(error = %e, retry_in = ?d, "{what} failed");
                    tokio::time::sleep(d).await;
                }
                None => return Err(e),
            },
        }
    }
}

/// Starts a worker: finds the upstream's models, fetches the coordinator's
/// ticket key, registers, joins the mesh and starts serving.
pub async fn start(cfg: WorkerConfig) -> anyhow::Result<RunningWorker> {
    // The metrics recorder first: the network counts from its first event.
    crate::web::metrics_handle();
    let http_listener = match cfg.http {
        Some(addr) => Some(http::bind(addr).await?),
        None => None,
    };
    // A --coordinator that is not a Troop coordinator fails now (one that
    // does not answer yet is waited for below).
    if let Err(crate::coordinator_client::Identify::NotCoordinator(why)) =
        CoordinatorClient::new(&cfg.coordinator, cfg.identity.clone())
            .identify()
            .await
    {
        anyhow::bail!(why);
    }
    let upstream = match cfg.dialect {
        Some(d) => Upstream::new(&cfg.upstream, d),
        None => Upstream::detect(&cfg.upstream).await?,
    };
    let models = with_retries("listing the upstream's models", || upstream.models())
        .await
        .with_context(|| format!("listing models at {}", cfg.upstream))?;
    tracing::info!(upstream = %cfg.upstream, dialect = ?upstream.dialect, models = ?models.iter().map(|m| &m.name).collect::<Vec<_>>(), "upstream found");

    let client = CoordinatorClient::new(&cfg.coordinator, cfg.identity.clone());
    let pk = with_retries("fetching the coordinator's key", || client.public_key())
        .await
        .with_context(|| format!("fetching the ticket key from {}", cfg.coordinator))?;
    let peer_id = cfg.identity.public().to_peer_id();
    let mut verifier = TicketVerifier::new(peer_id.to_base58());
    verifier
        .add_key_pem(&pk.kid, pk.public_key.as_bytes())
        .map_err(|e| anyhow::anyhow!("coordinator key: {e}"))?;
    // Earlier keys still valid during a rotation (other replicas may sign
    // with one for a while).
    add_previous_keys(&client, &mut verifier).await;

    let (net, _events) = network::spawn(cfg.net.clone()).await?;
    network::learn_relays(client.clone(), net.clone());
    let addresses: Vec<String> = net.listen_addrs().iter().map(|a| a.to_string()).collect();
    let reg_req = RegisterRequest {
        models: models.iter().map(|m| m.name.clone()).collect(),
        addresses,
        version: Some(env!("CARGO_PKG_VERSION").into()),
    };
    let reg = with_retries("registering with the coordinator", || {
        client.register(&reg_req)
    })
    .await
    .context("registering with the coordinator")?;
    let key = hex::decode(&reg.receipt_key).context("receipt key is not hex")?;
    tracing::info!(peer_id = %peer_id, multiplier = reg.hardware_multiplier, "registered with the coordinator");

    let receipts = ReceiptQueue::open(&cfg.state_dir.join("receipts"))
        .with_context(|| format!("opening {}", cfg.state_dir.display()))?;
    let stats = Arc::new(WorkerStats::default());
    let shared = Arc::new(Shared {
        peer_id,
        client: client.clone(),
        upstream,
        verifier: tokio::sync::Mutex::new(verifier),
        models: RwLock::new(models),
        multiplier: RwLock::new(reg.hardware_multiplier),
        receipt_key: Arc::new(RwLock::new(key)),
        receipts: receipts.clone(),
        jobs: Arc::new(Semaphore::new(cfg.max_jobs)),
        stats: stats.clone(),
        net: net.clone(),
        killed: tokio_util::sync::CancellationToken::new(),
        stopping: tokio_util::sync::CancellationToken::new(),
        sessions: Mutex::new(Sessions::default()),
        key_refresh: tokio::sync::Mutex::new(None),
        unchecked: Mutex::new(std::collections::HashMap::new()),
        upstream_health: Mutex::new(UpstreamHealth {
            ok: true,
            checked_at_ms: unix_ms(),
            error: None,
        }),
        proof: Mutex::new(ProofStatus {
            state: if cfg.benchmark.is_some() {
                "running"
            } else {
                "off"
            },
            ..Default::default()
        }),
        started_ms: unix_ms(),
        account: crate::web::AccountView::new(client.clone()),
        cfg,
    });
    let http = match http_listener {
        Some(listener) => Some(http::serve(shared.clone(), listener).await?),
        None => None,
    };
    let mut control = net.stream_control();
    let incoming = control
        .accept(StreamProtocol::new(INFER_PROTOCOL))
        .map_err(|_| anyhow::anyhow!("{INFER_PROTOCOL} already registered"))?;

    let announce = vec![
        tokio::spawn(advertise_loop(shared.clone())),
        tokio::spawn(heartbeat_loop(shared.clone())),
    ];
    let mut tasks = vec![
        tokio::spawn(accept_loop(shared.clone(), incoming)),
        tokio::spawn(refresh_models_loop(shared.clone())),
        tokio::spawn(receipts.run(client, shared.receipt_key.clone())),
        tokio::spawn(benchmark_task(shared.clone())),
        tokio::spawn(session_loop(shared.clone())),
    ];
    let http_addr = http.map(|(addr, task)| {
        tasks.push(task);
        addr
    });
    Ok(RunningWorker {
        peer_id,
        net,
        stats,
        http_addr,
        tasks,
        announce,
        shared,
    })
}

/// Proves the hardware once at start (off the event loop: the matmul runs
/// on a blocking thread while the node keeps serving).
async fn benchmark_task(s: Arc<Shared>) {
    let Some(backend) = s.cfg.benchmark else {
        return;
    };
    match crate::hardware::prove_to_coordinator(&s.client, backend).await {
        Ok((m, gflops)) => {
            tracing::info!(
                gflops,
                multiplier = m,
                "hardware verified by the coordinator"
            );
            if let Ok(mut slot) = s.multiplier.write() {
                *slot = m;
            }
            if let Ok(mut p) = s.proof.lock() {
                *p = ProofStatus {
                    state: "verified",
                    gflops: Some(gflops),
                    multiplier: Some(m),
                    error: None,
                    at_ms: Some(unix_ms()),
                };
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "proof of hardware failed; the multiplier stays as it was");
            if let Ok(mut p) = s.proof.lock() {
                *p = ProofStatus {
                    state: "failed",
                    error: Some(format!("{e:#}")),
                    at_ms: Some(unix_ms()),
                    ..Default::default()
                };
            }
        }
    }
}

fn advert(s: &Shared) -> Advert {
    let active = s.stats.active_jobs.load(Ordering::Relaxed);
    Advert {
        peer_id: s.peer_id.to_base58(),
        addresses: s.net.listen_addrs().iter().map(|a| a.to_string()).collect(),
        models: s.models.read().map(|m| m.clone()).unwrap_or_default(),
        queue_depth: active.saturating_sub(s.cfg.max_jobs as u32),
        active_jobs: active,
        max_jobs: s.cfg.max_jobs as u32,
        ttft_ms: s.stats.ttft_ms(),
        tokens_per_s: s.stats.tokens_per_s(),
        hardware_multiplier: s.multiplier.read().map(|m| *m).unwrap_or(1.0),
        ttl_ms: (s.cfg.advert_interval.as_millis() as u64).saturating_mul(3),
        sent_at_ms: unix_ms(),
    }
}

async fn advertise_loop(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.cfg.advert_interval);
    let mut provided: Vec<String> = Vec::new();
    loop {
        tick.tick().await;
        let names: Vec<String> = s
            .models
            .read()
            .map(|m| m.iter().map(|m| m.name.clone()).collect())
            .unwrap_or_default();
        for n in names.iter().filter(|n| !provided.contains(n)) {
            s.net.provide(model_key(n)).await;
        }
        provided = names;
        s.net.publish(advert(&s).encode()).await;
    }
}

async fn refresh_models_loop(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(s.cfg.model_refresh_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let listed = s.upstream.models().await;
        if let Ok(mut h) = s.upstream_health.lock() {
            *h = UpstreamHealth {
                ok: listed.is_ok(),
                checked_at_ms: unix_ms(),
                error: listed.as_ref().err().map(|e| format!("{e:#}")),
            };
        }
        match listed {
            Ok(models) => {
                let changed = s.models.read().map(|m| *m != models).unwrap_or(true);
                if changed {
                    tracing::info!(models = ?models.iter().map(|m| &m.name).collect::<Vec<_>>(), "upstream models changed");
                    if let Ok(mut m) = s.models.write() {
                        *m = models;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "upstream did not list its models"),
        }
    }
}

async fn heartbeat_loop(s: Arc<Shared>) {
    let mut breaker = CircuitBreaker::with_policy(
        SystemClock::default(),
        troop_protocol::policy::BREAKER_THRESHOLD,
        s.cfg.breaker_cooldown,
    );
    let mut tick = tokio::time::interval(s.cfg.heartbeat_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        if !breaker.try_acquire() {
            s.stats.heartbeats_skipped.fetch_add(1, Ordering::Relaxed);
            set_breaker(&s, breaker.state());
            continue;
        }
        let active = s.stats.active_jobs.load(Ordering::Relaxed);
        let req = HeartbeatRequest {
            models: Some(
                s.models
                    .read()
                    .map(|m| m.iter().map(|m| m.name.clone()).collect())
                    .unwrap_or_default(),
            ),
            addresses: Some(s.net.listen_addrs().iter().map(|a| a.to_string()).collect()),
            load: Load {
                active_jobs: active,
                queue_depth: 0,
            },
        };
        match s.client.heartbeat(&req).await {
            Ok(_) => {
                if breaker.state() != BreakerState::Closed {
                    tracing::info!("coordinator is back; heartbeats resume");
                }
                breaker.record_success();
                s.stats.heartbeats_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.status() == Some(404) => {
                // The coordinator forgot us (a new data folder): register again.
                breaker.record_success();
                let addresses = req.addresses.clone().unwrap_or_default();
                match s
                    .client
                    .register(&RegisterRequest {
                        models: req.models.clone().unwrap_or_default(),
                        addresses,
                        version: Some(env!("CARGO_PKG_VERSION").into()),
                    })
                    .await
                {
                    Ok(reg) => {
                        if let (Ok(k), Ok(mut slot)) =
                            (hex::decode(&reg.receipt_key), s.receipt_key.write())
                        {
                            *slot = k;
                        }
                        tracing::info!("registered again with the coordinator");
                    }
                    Err(e) => tracing::warn!(error = %e, "re-registration failed"),
                }
            }
            Err(e) => {
                breaker.record_failure();
                s.stats.heartbeats_failed.fetch_add(1, Ordering::Relaxed);
                if breaker.state() == BreakerState::Open {
                    tracing::warn!(error = %e, retry_in = ?breaker.retry_in(), "coordinator unreachable; heartbeats paused");
                } else {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
        }
        set_breaker(&s, breaker.state());
    }
}

fn set_breaker(s: &Shared, st: BreakerState) {
    if let Ok(mut b) = s.stats.breaker.lock() {
        *b = format!("{st:?}").to_lowercase();
    }
}

async fn accept_loop(s: Arc<Shared>, mut incoming: libp2p_stream::IncomingStreams) {
    while let Some((peer, stream)) = incoming.next().await {
        // Before any ticket is checked a stream costs only a bounded place;
        // over the bound it is dropped (reset) at once.
        let Some(place) = Unchecked::take(&s, peer) else {
            tracing::debug!(%peer, "too many streams waiting for a ticket check; reset");
            drop(stream);
            continue;
        };
        let s = s.clone();
        tokio::spawn(async move {
            // The connection under a job is not trimmed while it runs.
            let _busy = s.net.busy(peer);
            let killed = s.killed.clone();
            tokio::select! {
                r = serve_stream(s, peer, stream, place) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "stream ended with an error");
                    }
                }
                _ = killed.cancelled() => {}
            }
        });
    }
}

async fn refuse(
    stream: &mut libp2p::Stream,
    code: ErrorCode,
    message: String,
) -> anyhow::Result<()> {
    metrics::counter!("troop_jobs_refused_total", "code" => code.as_str()).increment(1);
    write_frame(stream, &Frame::error(code, message)).await?;
    let _ = futures::AsyncWriteExt::close(stream).await;
    Ok(())
}

async fn serve_stream(
    s: Arc<Shared>,
    peer: PeerId,
    mut stream: libp2p::Stream,
    place: Unchecked,
) -> anyhow::Result<()> {
    let first = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut stream)).await;
    let (ticket, request, index) = match first {
        Ok(Ok(Some(Frame::Request {
            ticket,
            request,
            index,
            ..
        }))) => (ticket, request, index),
        Ok(Ok(Some(Frame::Ack { ack }))) => {
            record_ack(&s, peer, ack);
            let _ = futures::AsyncWriteExt::close(&mut stream).await;
            return Ok(());
        }
        Ok(Ok(Some(_))) => {
            return refuse(
                &mut stream,
                ErrorCode::BadRequest,
                "expected a request frame".into(),
            )
            .await;
        }
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            // Garbage, oversized or wrong-version frames reset the stream.
            tracing::debug!(%peer, error = %e, "bad frame; resetting the stream");
            if let troop_protocol::frames::FrameError::Version(v) = e {
                let _ = refuse(
                    &mut stream,
                    ErrorCode::BadRequest,
                    format!("unsupported frame version {v}"),
                )
                .await;
            }
            return Ok(());
        }
        Err(_) => return Ok(()),
    };
    if s.stopping.is_cancelled() {
        drop(place);
        return refuse(
            &mut stream,
            ErrorCode::Unavailable,
            "the worker is stopping".into(),
        )
        .await;
    }
    let claims = match open_session(&s, &ticket, index).await {
        Ok(c) => c,
        Err(e) => {
            drop(place);
            tracing::info!(%peer, error = %e, "ticket refused");
            return refuse(&mut stream, ErrorCode::Unauthorized, e).await;
        }
    };
    drop(place);
    // From here on the request holds a place in its session: every return
    // goes through `end_request`.
    let guard = RequestGuard {
        s: s.clone(),
        jti: claims.jti.clone(),
        index,
        started_ms: unix_ms(),
        done: false,
    };
    if claims.model != request.model {
        guard.abandon();
        return refuse(
            &mut stream,
            ErrorCode::BadRequest,
            "the ticket is for another model".into(),
        )
        .await;
    }
    let served = s
        .models
        .read()
        .map(|m| m.iter().any(|m| m.name == request.model))
        .unwrap_or(false);
    if !served {
        guard.abandon();
        return refuse(
            &mut stream,
            ErrorCode::UnknownModel,
            format!("this worker does not serve {}", request.model),
        )
        .await;
    }
    let Ok(permit) = s.jobs.clone().try_acquire_owned() else {
        guard.abandon();
        return refuse(
            &mut stream,
            ErrorCode::Busy,
            "the worker is at its job limit".into(),
        )
        .await;
    };
    s.stats.active_jobs.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!("troop_jobs_running").increment(1.0);
    let request_id = request.request_id.clone().unwrap_or_default();
    let result = if request.body.is_some() {
        let t0 = Instant::now();
        let r = crate::answer::relay(
            &s.upstream,
            &mut stream,
            &request,
            claims.max_tokens,
            &claims.jti,
            s.cfg.timeouts,
        )
        .await;
        r.map(|served| {
            if let Some(f) = served.first {
                let ttft = f.duration_since(t0).as_secs_f64();
                metrics::histogram!("troop_worker_ttft_seconds").record(ttft);
                ewma(&s.stats.ttft_ms, ttft * 1000.0);
                // A whole answer is one event: its rate is over the job.
                let secs = if served.chunks > 1 {
                    f.elapsed().as_secs_f64()
                } else {
                    t0.elapsed().as_secs_f64()
                };
                if secs > 0.0 && served.usage.completion_tokens > 1 {
                    ewma(
                        &s.stats.tokens_per_s,
                        served.usage.completion_tokens as f64 / secs,
                    );
                }
            }
            (served.usage, served.chunks)
        })
    } else {
        run_job(&s, &mut stream, &request, &claims.jti).await
    };
    s.stats.active_jobs.fetch_sub(1, Ordering::Relaxed);
    metrics::gauge!("troop_jobs_running").decrement(1.0);
    drop(permit);
    let (status, usage, chunks) = match &result {
        Ok((u, c)) => (LineStatus::Completed, *u, *c),
        Err(JobEnd::Cancelled(u)) => (LineStatus::Cancelled, *u, u.completion_tokens),
        Err(JobEnd::Failed { usage, .. }) => (LineStatus::Failed, *usage, usage.completion_tokens),
    };
    if let Err(JobEnd::Failed { rejected: true, .. }) = &result {
        metrics::counter!("troop_jobs_rejected_by_upstream_total").increment(1);
    }
    tracing::info!(job = %claims.jti, index, request_id, status = ?status, tokens = usage.completion_tokens, "job finished");
    s.stats.jobs_done.fetch_add(1, Ordering::Relaxed);
    s.stats
        .tokens_served
        .fetch_add(usage.completion_tokens, Ordering::Relaxed);
    metrics::counter!("troop_tokens_served_total").increment(usage.completion_tokens);
    let label = match status {
        LineStatus::Completed => "completed",
        LineStatus::Cancelled => {
            s.stats.jobs_cancelled.fetch_add(1, Ordering::Relaxed);
            "cancelled"
        }
        LineStatus::Failed => {
            s.stats.jobs_failed.fetch_add(1, Ordering::Relaxed);
            "failed"
        }
    };
    metrics::counter!("troop_jobs_total", "status" => label).increment(1);
    guard.finish(status, usage, chunks);
    Ok(())
}

/// A request's place in its session; dropped without `finish` (the task
/// was cancelled) it is recorded as cancelled with nothing served.
struct RequestGuard {
    s: Arc<Shared>,
    jti: String,
    index: u32,
    started_ms: u64,
    done: bool,
}

impl RequestGuard {
    /// The request was refused before it ran: it costs nothing and its
    /// index may be used again.
    fn abandon(mut self) {
        self.done = true;
        if let Ok(mut ss) = self.s.sessions.lock()
            && let Some(sess) = ss.by_jti.get_mut(&self.jti)
        {
            sess.active = sess.active.saturating_sub(1);
            sess.indices.remove(&self.index);
            sess.last_activity = Instant::now();
        }
    }

    fn finish(mut self, status: LineStatus, usage: troop_protocol::frames::Usage, chunks: u64) {
        self.done = true;
        self.record(status, usage, chunks);
    }

    fn record(&self, status: LineStatus, usage: troop_protocol::frames::Usage, chunks: u64) {
        let finished = unix_ms().max(self.started_ms);
        if let Ok(mut ss) = self.s.sessions.lock()
            && let Some(sess) = ss.by_jti.get_mut(&self.jti)
        {
            sess.active = sess.active.saturating_sub(1);
            sess.used_ms = sess.used_ms.saturating_add(finished - self.started_ms);
            sess.last_activity = Instant::now();
            sess.lines.push(RequestLine {
                index: self.index,
                started_at: self.started_ms,
                finished_at: finished,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                chunks,
                status,
                ack: None,
            });
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.done {
            self.record(LineStatus::Cancelled, Default::default(), 0);
        }
    }
}

/// Finds the session of `ticket` (or opens one, verifying the ticket) and
/// takes a place in it for request `index`.
async fn open_session(
    s: &Arc<Shared>,
    ticket: &str,
    index: u32,
) -> Result<troop_protocol::ticket::TicketClaims, String> {
    let now = unix_secs();
    {
        let mut ss = s.sessions.lock().map_err(|_| "session table poisoned")?;
        if let Some(jti) = ss.by_ticket.get(ticket).cloned()
            && let Some(sess) = ss.by_jti.get_mut(&jti)
        {
            if now >= sess.claims.exp {
                return Err("the session's ticket expired".into());
            }
            if sess.used_ms >= sess.limit_ms {
                return Err("the session's reservation is used up".into());
            }
            if sess.indices.len() >= s.cfg.max_session_requests {
                return Err(format!(
                    "the session is full ({} requests); open another",
                    s.cfg.max_session_requests
                ));
            }
            if !sess.indices.insert(index) {
                return Err(format!("request {index} of this session was already sent"));
            }
            sess.active += 1;
            sess.last_activity = Instant::now();
            return Ok(sess.claims.clone());
        }
    }
    let claims = verify_ticket(s, ticket).await.map_err(|e| e.to_string())?;
    let multiplier_milli = s
        .multiplier
        .read()
        .map(|m| (*m * 1000.0).round() as i64)
        .unwrap_or(1000)
        .max(1);
    let limit_ms =
        u64::try_from(claims.reserved_milli.max(0).saturating_mul(1000) / multiplier_milli)
            .unwrap_or(0);
    let mut ss = s.sessions.lock().map_err(|_| "session table poisoned")?;
    if ss.unacked.get(&claims.sub).copied().unwrap_or(0) >= MAX_UNACKED_IN_A_ROW {
        return Err(format!(
            "{MAX_UNACKED_IN_A_ROW} requests in a row went unacknowledged: this worker serves users whose gateway signs its usage"
        ));
    }
    let mut indices = std::collections::HashSet::new();
    indices.insert(index);
    ss.by_ticket.insert(ticket.to_string(), claims.jti.clone());
    ss.by_jti.insert(
        claims.jti.clone(),
        Session {
            claims: claims.clone(),
            ticket: ticket.to_string(),
            limit_ms,
            used_ms: 0,
            active: 1,
            indices,
            lines: Vec::new(),
            acks: std::collections::HashMap::new(),
            last_activity: Instant::now(),
        },
    );
    Ok(claims)
}

/// Keeps a user's acknowledgement for the session's receipt (checked here
/// too, so that junk is not stored; the coordinator checks it again).
fn record_ack(s: &Shared, peer: PeerId, ack: Ack) {
    let Ok(mut ss) = s.sessions.lock() else {
        return;
    };
    let Some(sess) = ss.by_jti.get_mut(&ack.job_id) else {
        tracing::debug!(%peer, job = %ack.job_id, "acknowledgement for no open session");
        return;
    };
    let user = match troop_protocol::identity::parse_account_id(&sess.claims.sub) {
        Ok(u) => u,
        Err(_) => return,
    };
    if ack.worker != s.peer_id.to_base58()
        || !sess.indices.contains(&ack.index)
        || !ack.verify(&user)
    {
        metrics::counter!("troop_bad_acks_total").increment(1);
        tracing::info!(%peer, job = %ack.job_id, index = ack.index, "acknowledgement refused");
        return;
    }
    sess.acks.entry(ack.index).or_insert(ack);
}

/// Closes sessions that are idle, expired or used up, and files their
/// receipts (after a short grace for the last acknowledgements).
async fn session_loop(s: Arc<Shared>) {
    let idle = s.cfg.session_idle;
    let grace = idle.min(Duration::from_secs(2));
    let mut tick = tokio::time::interval(Duration::from_millis(250).min(idle));
    loop {
        tick.tick().await;
        let now = unix_secs();
        let mut due = Vec::new();
        let full = s.cfg.max_session_requests;
        if let Ok(mut ss) = s.sessions.lock() {
            let jtis: Vec<String> = ss
                .by_jti
                .iter()
                .filter(|(_, x)| {
                    let quiet = x.last_activity.elapsed();
                    let all_acked = x.lines.iter().all(|l| x.acks.contains_key(&l.index));
                    x.active == 0
                        && (quiet >= idle
                            || ((now >= x.claims.exp
                                || x.used_ms >= x.limit_ms
                                || x.indices.len() >= full)
                                && (all_acked || quiet >= grace)))
                })
                .map(|(j, _)| j.clone())
                .collect();
            for j in jtis {
                if let Some(mut sess) = ss.by_jti.remove(&j) {
                    ss.by_ticket.remove(&sess.ticket);
                    for l in sess.lines.iter_mut() {
                        l.ack = sess.acks.remove(&l.index);
                    }
                    sess.lines.sort_by_key(|l| l.index);
                    let before = ss.unacked.get(&sess.claims.sub).copied().unwrap_or(0);
                    let run = troop_protocol::usage::unacked_streak(before, &sess.lines);
                    if run == 0 {
                        ss.unacked.remove(&sess.claims.sub);
                    } else {
                        if ss.unacked.len() >= MAX_UNACKED_USERS {
                            ss.unacked.retain(|_, r| *r >= MAX_UNACKED_IN_A_ROW);
                        }
                        if ss.unacked.len() < MAX_UNACKED_USERS
                            || ss.unacked.contains_key(&sess.claims.sub)
                        {
                            ss.unacked.insert(sess.claims.sub.clone(), run);
                        }
                    }
                    due.push(sess);
                }
            }
        }
        for sess in due {
            file_session(&s, sess).await;
        }
    }
}

async fn file_session(s: &Shared, mut sess: Session) {
    if sess.lines.is_empty() {
        return;
    }
    sess.lines.sort_by_key(|l| l.index);
    let status = if sess.lines.iter().any(|l| l.status == LineStatus::Completed) {
        JobStatus::Completed
    } else if sess.lines.iter().any(|l| l.status == LineStatus::Cancelled) {
        JobStatus::Cancelled
    } else {
        JobStatus::Failed
    };
    let receipt = Receipt {
        job_id: sess.claims.jti.clone(),
        worker: s.peer_id.to_base58(),
        user: sess.claims.sub.clone(),
        model: sess.claims.model.clone(),
        prompt_tokens: sess.lines.iter().map(|l| l.prompt_tokens).sum(),
        completion_tokens: sess.lines.iter().map(|l| l.completion_tokens).sum(),
        started_at: sess.lines.iter().map(|l| l.started_at).min().unwrap_or(0),
        finished_at: sess.lines.iter().map(|l| l.finished_at).max().unwrap_or(0),
        status,
        requests: sess.lines,
    };
    tracing::info!(
        job = %receipt.job_id,
        requests = receipt.requests.len(),
        acknowledged = receipt.requests.iter().filter(|l| l.ack.is_some()).count(),
        "session closed; receipt filed"
    );
    let job = receipt.job_id.clone();
    if let Err(e) = s.receipts.enqueue_async(receipt).await {
        tracing::error!(error = %e, %job, "could not write the receipt");
    }
}

async fn run_job(
    s: &Shared,
    stream: &mut libp2p::Stream,
    request: &InferenceRequest,
    job_id: &str,
) -> Result<(troop_protocol::frames::Usage, u64), JobEnd> {
    let t0 = Instant::now();
    let mut upstream = match s.upstream.generate(request).await {
        Ok(st) => st,
        Err(e) => {
            tracing::warn!(error = %e, "upstream failed");
            let _ = write_frame(
                stream,
                &Frame::error(ErrorCode::UpstreamFailed, e.to_string()),
            )
            .await;
            return Err(JobEnd::Failed {
                usage: Default::default(),
                rejected: false,
            });
        }
    };
    let mut chunks = 0u64;
    let mut first: Option<Instant> = None;
    let mut pace = crate::answer::Pace::new(s.cfg.timeouts, false);
    loop {
        let next = match pace.wait(upstream.next()).await {
            Ok(n) => n,
            Err(why) => return Err(crate::answer::timed_out(stream, chunks, &why).await),
        };
        pace.started();
        match next {
            Some(Ok(Delta::Text(text))) => {
                if first.is_none() {
                    first = Some(Instant::now());
                    let ttft = t0.elapsed().as_secs_f64();
                    metrics::histogram!("troop_worker_ttft_seconds").record(ttft);
                    ewma(&s.stats.ttft_ms, ttft * 1000.0);
                }
                chunks += 1;
                // Backpressure: this waits while the gateway is not reading.
                if write_frame(stream, &Frame::Chunk { text }).await.is_err() {
                    // The gateway hung up: dropping `upstream` stops the generation.
                    tracing::info!(
                        job = job_id,
                        "client went away; upstream generation stopped"
                    );
                    return Err(JobEnd::Cancelled(partial(chunks)));
                }
            }
            Some(Ok(Delta::Done {
                usage,
                finish_reason,
            })) => {
                let usage = if usage.completion_tokens == 0 {
                    partial(chunks).max_with(usage)
                } else {
                    usage
                };
                if let Some(f) = first {
                    let secs = f.elapsed().as_secs_f64();
                    if secs > 0.0 && usage.completion_tokens > 1 {
                        ewma(&s.stats.tokens_per_s, usage.completion_tokens as f64 / secs);
                    }
                }
                let done = Frame::Done {
                    job_id: job_id.to_string(),
                    usage,
                    finish_reason,
                };
                if write_frame(stream, &done).await.is_err() {
                    return Err(JobEnd::Cancelled(usage));
                }
                let _ = futures::AsyncWriteExt::close(stream).await;
                return Ok((usage, chunks));
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "upstream failed mid-generation");
                let _ = write_frame(
                    stream,
                    &Frame::error(ErrorCode::UpstreamFailed, e.to_string()),
                )
                .await;
                return Err(JobEnd::Failed {
                    usage: partial(chunks),
                    rejected: false,
                });
            }
            None => {
                let _ = write_frame(
                    stream,
                    &Frame::error(ErrorCode::UpstreamFailed, "upstream ended early"),
                )
                .await;
                return Err(JobEnd::Failed {
                    usage: partial(chunks),
                    rejected: false,
                });
            }
        }
    }
}

trait MaxWith {
    fn max_with(self, other: Self) -> Self;
}

impl MaxWith for troop_protocol::frames::Usage {
    fn max_with(self, other: Self) -> Self {
        Self {
            prompt_tokens: self.prompt_tokens.max(other.prompt_tokens),
            completion_tokens: self.completion_tokens.max(other.completion_tokens),
        }
    }
}

/// Adds the coordinator's other accepted ticket keys (its JWKS) to
/// `verifier`, keeping those it has.
async fn add_previous_keys(client: &CoordinatorClient, verifier: &mut TicketVerifier) {
    match client.ticket_keys().await {
        Ok(keys) => add_jwks(verifier, keys),
        Err(e) => tracing::debug!(error = %e, "no JWKS from the coordinator"),
    }
}

/// What a key refresh brought: the JWKS naming the kid sought, or else
/// the coordinator's current key (`/public-key`).
enum FetchedKeys {
    Jwks(Vec<(String, String, String)>),
    Current(crate::coordinator_client::PublicKey),
}

/// Adds JWKS entries (kid, n, e) the verifier does not know yet.
fn add_jwks(verifier: &mut TicketVerifier, keys: Vec<(String, String, String)>) {
    for (kid, n, e) in keys {
        if !verifier.knows_kid(&kid)
            && let Err(err) = verifier.add_key_components(&kid, &n, &e)
        {
            tracing::warn!(kid, error = %err, "unusable coordinator key");
        }
    }
}

async fn verify_ticket(
    s: &Shared,
    token: &str,
) -> Result<troop_protocol::ticket::TicketClaims, TicketError> {
    let now = unix_secs();
    let first = s.verifier.lock().await.verify(token, now);
    let Err(TicketError::UnknownKid(kid)) = first else {
        return first;
    };
    // The coordinator may have rotated its key. One task fetches it, at
    // most once per KEY_REFRESH_EVERY, without the verifier's lock; tickets
    // with an unknown kid meanwhile are refused at once.
    let Ok(mut last) = s.key_refresh.try_lock() else {
        return Err(TicketError::UnknownKid(kid));
    };
    if last.is_some_and(|t| t.elapsed() < KEY_REFRESH_EVERY) {
        return Err(TicketError::UnknownKid(kid));
    }
    *last = Some(Instant::now());
    metrics::counter!("troop_key_refreshes_total").increment(1);
    // The JWKS holds every key the coordinator accepts (its replicas may
    // sign with the previous one during a rotation); `/public-key` only the
    // current one, from coordinators older than the JWKS.
    let fetched = tokio::time::timeout(troop_protocol::policy::AUTH_TIMEOUT, async {
        let keys = s.client.ticket_keys().await.unwrap_or_default();
        if keys.iter().any(|(k, _, _)| *k == kid) {
            return Ok(FetchedKeys::Jwks(keys));
        }
        s.client.public_key().await.map(FetchedKeys::Current)
    })
    .await;
    match fetched {
        Ok(Ok(found)) => {
            let mut v = s.verifier.lock().await;
            match found {
                FetchedKeys::Current(pk) => v.add_key_pem(&pk.kid, pk.public_key.as_bytes())?,
                FetchedKeys::Jwks(keys) => add_jwks(&mut v, keys),
            }
            v.verify(token, unix_secs())
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not refresh the coordinator's key");
            Err(TicketError::UnknownKid(kid))
        }
        Err(_) => {
            tracing::warn!("refreshing the coordinator's key timed out");
            Err(TicketError::UnknownKid(kid))
        }
    }
}
