//! The worker role: serves `/troop/infer/1` streams from its upstream model
//! server, advertises its models, registers and heartbeats with the
//! coordinator, and files a receipt after every job. The rooms: `session`
//! (the pure session book), `serve` (streams and jobs), `coordinator`
//! (heartbeats, keys, the proof), `advertise` (gossip and the DHT), `http`
//! (the status page).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

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
use troop_protocol::ticket::{TicketError, TicketVerifier};
use troop_protocol::usage::{Ack, LineStatus};

use crate::answer::{JobEnd, partial};
use crate::coordinator_client::CoordinatorClient;
use crate::frames_io::{read_frame, write_frame};
use crate::network::{self, NetConfig, NetworkHandle};
use crate::receipts::ReceiptQueue;
use crate::upstream::{Delta, Dialect, Upstream};

mod advertise;
mod coordinator;
mod http;
pub mod journal;
mod serve;
pub mod session;

use advertise::*;
use coordinator::*;
use serve::*;

use session::{CloseRules, SessionBook};

/// How to run a worker.
#[derive(Clone)]
pub struct WorkerConfig {
    pub identity: Keypair,
    pub coordinator: String,
    pub upstream: String,
    /// Force a dialect instead of probing.
    pub dialect: Option<Dialect>,
    /// A local copy of the served model's GGUF file, hashed for the
    /// advert's digest (`--model-file`); otherwise the file llama.cpp's
    /// `/props` names (Ollama names its blob).
    pub model_file: Option<std::path::PathBuf>,
    pub net: NetConfig,
    /// Most jobs at once; beyond it a request gets `busy`.
    pub max_jobs: usize,
    /// Ask the upstream for each token's logprobs and sign them as evidence
    /// of what was served (streamed chat answers; `--no-evidence` turns it
    /// off for upstreams that refuse `logprobs`).
    pub evidence: bool,
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
    /// The upstream failing its model listing this long withdraws the
    /// worker's adverts until it answers again.
    pub upstream_gone_after: Duration,
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
            model_file: None,
            net,
            max_jobs: 64,
            evidence: true,
            advert_interval: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(20),
            model_refresh_interval: Duration::from_secs(15),
            breaker_cooldown: troop_protocol::policy::BREAKER_COOLDOWN,
            state_dir,
            benchmark: None,
            session_idle: Duration::from_secs(30),
            upstream_gone_after: Duration::from_secs(60),
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
    /// Requests answered with a refusal frame (busy, bad ticket, stopping…).
    pub requests_refused: AtomicU64,
    /// Streams reset before their ticket was read: over the bound on
    /// streams waiting for a check, or waiting too long.
    pub streams_reset: AtomicU64,
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
    if let Some(mut v) = slot.locked() {
        *v = Some(match *v {
            Some(old) => 0.8 * old + 0.2 * sample,
            None => sample,
        });
    }
}

impl WorkerStats {
    pub fn ttft_ms(&self) -> Option<f64> {
        self.ttft_ms.locked().and_then(|v| *v)
    }
    pub fn tokens_per_s(&self) -> Option<f64> {
        self.tokens_per_s.locked().and_then(|v| *v)
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
    sessions: Mutex<SessionBook>,
    /// Every open session's entries on disk (`<state>/sessions`).
    journal: journal::Journal,
    /// The coordinator's key is fetched by one task at a time, at most once
    /// per [`KEY_REFRESH_EVERY`], never under the verifier's lock.
    key_refresh: tokio::sync::Mutex<Option<Instant>>,
    /// Streams whose ticket is not checked yet, by peer (bounded).
    unchecked: Mutex<std::collections::HashMap<PeerId, serve::PeerGate>>,
    /// The upstream's last model listing: when, and what went wrong.
    upstream_health: Mutex<UpstreamHealth>,
    /// The proof of hardware: not asked, running, verified or failed.
    proof: Mutex<ProofStatus>,
    /// Held while a proof runs (at start or a re-proof): one at a time.
    proving: tokio::sync::Mutex<()>,
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
    /// Since when (unix ms) the listing has failed without a break.
    pub down_since_ms: Option<u64>,
    /// Down past `--upstream-gone-secs`: nothing is advertised.
    pub withdrawn: bool,
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
    /// What proved last: cpu, wgpu or cuda, and the adapter's name.
    pub backend: Option<&'static str>,
    pub adapter: Option<String>,
    /// Set when the GPU failed and the CPU proved instead.
    pub fallback: Option<String>,
    /// Re-proofs the coordinator asked for and verified since start.
    pub reproofs: u64,
}

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
        let open = match s.sessions.lock() {
            Ok(mut book) => book.close_all(),
            Err(_) => {
                tracing::error!("the session book's lock is poisoned; open sessions are not filed");
                Vec::new()
            }
        };
        for sess in open {
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

    /// The models as advertised (names, digests, runtimes).
    pub fn model_adverts(&self) -> Vec<ModelAdvert> {
        self.shared
            .models
            .reading()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn models(&self) -> Vec<String> {
        self.shared
            .models
            .reading()
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

use troop_protocol::policy::{unix_ms, unix_secs};

/// Asks the coordinator until it answers: while it is unreachable, or
/// answers 5xx or 429 (down, restarting, overloaded), for ever, with a log
/// line each try (1 s, doubling to 30 s between tries) and the waiting
/// page told; any other refusal fails at once.
async fn until_coordinator_answers<T, F, Fut>(
    what: &str,
    waiting: &http::Waiting,
    f: F,
) -> Result<T, crate::coordinator_client::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::coordinator_client::ClientError>>,
{
    use crate::coordinator_client::ClientError;
    use backon::Retryable;
    let policy = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times();
    f.retry(policy)
        .sleep(tokio::time::sleep)
        .when(|e| match e {
            ClientError::Transport(_) => true,
            ClientError::Refused { status, .. } => *status >= 500 || *status == 429,
        })
        .notify(|e: &ClientError, d: Duration| {
            waiting.failed(e.to_string());
            tracing::warn!(error = %e, retry_in = ?d, "{what}: waiting for the coordinator")
        })
        .await
}

/// The upstream and its models, once it answers. A model server that is not
/// up yet (nothing answers, or 5xx while it loads) is waited for, for ever,
/// with a log line each try (1 s, doubling to 30 s between tries): a worker
/// may start before its model server. One that answers but is no model
/// server fails at once.
async fn wait_for_upstream(
    cfg: &WorkerConfig,
    waiting: Option<&http::Waiting>,
) -> Result<(Upstream, Vec<troop_protocol::advert::ModelAdvert>), crate::upstream::UpstreamError> {
    use backon::Retryable;
    let policy = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times();
    let attempt = || async {
        let upstream = match cfg.dialect {
            Some(d) => Upstream::new(&cfg.upstream, d),
            None => Upstream::detect(&cfg.upstream).await?,
        }
        .with_model_file(cfg.model_file.clone());
        let models = upstream.models().await?;
        Ok((upstream, models))
    };
    attempt
        .retry(policy)
        .sleep(tokio::time::sleep)
        .when(crate::upstream::UpstreamError::not_up_yet)
        .notify(|e, d: Duration| {
            if let Some(w) = waiting {
                w.failed(format!("{e:#}"));
            }
            tracing::warn!(upstream = %cfg.upstream, error = %e, retry_in = ?d, "waiting for the upstream (the model server) to answer; nothing is advertised until it does")
        })
        .await
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
    let client = CoordinatorClient::new(&cfg.coordinator, cfg.identity.clone());
    if let Err(crate::coordinator_client::Identify::NotCoordinator(why)) = client.identify().await {
        anyhow::bail!(why);
    }
    if let Some(f) = &cfg.model_file
        && !f.is_file()
    {
        anyhow::bail!(
            "--model-file {}: no such file here (it names a local copy of the GGUF file the model server loaded)",
            f.display()
        );
    }
    // While it waits for the model server, the status address already
    // answers (and says so): `troop doctor` and a browser see why.
    let waiting = Arc::new(http::Waiting {
        upstream: cfg.upstream.clone(),
        coordinator: cfg.coordinator.clone(),
        peer_id: cfg.identity.public().to_peer_id().to_base58(),
        since_ms: unix_ms(),
        tries: AtomicU64::new(0),
        models: Mutex::new(None),
        error: Mutex::new(None),
    });
    let waiting_page = match &http_listener {
        Some(l) => Some(http::serve_waiting(l, waiting.clone(), &cfg.allowed_hosts)?),
        None => None,
    };
    // A browser holding a connection open does not hold up the start:
    // the waiting page gets 5 s to close its connections.
    let stop_waiting_page = || async {
        if let Some((stop, mut task)) = waiting_page {
            let _ = stop.send(());
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    };
    let ready = prepare(&cfg, &client, &waiting).await;
    stop_waiting_page().await;
    start_serving(cfg, client, http_listener, ready?).await
}

/// What a worker has once its model server and its coordinator answered.
struct Prepared {
    upstream: Upstream,
    models: Vec<ModelAdvert>,
    verifier: TicketVerifier,
    net: NetworkHandle,
    reg: troop_protocol::api::RegisterResponse,
}

/// Waits for the model server, then for the coordinator (its key, the
/// registration), joining the mesh between the two.
async fn prepare(
    cfg: &WorkerConfig,
    client: &CoordinatorClient,
    waiting: &http::Waiting,
) -> anyhow::Result<Prepared> {
    let (upstream, models) = wait_for_upstream(cfg, Some(waiting))
        .await
        .with_context(|| format!("listing models at {}", cfg.upstream))?;
    waiting.upstream_found(models.iter().map(|m| m.name.clone()).collect());
    tracing::info!(upstream = %cfg.upstream, dialect = ?upstream.dialect, models = ?models.iter().map(|m| &m.name).collect::<Vec<_>>(), "upstream found");
    if let Some(backend) = cfg.benchmark {
        // The graphics adapters, listed once (the status page and doctor
        // show them) and what the proof will run on.
        let target = tokio::task::spawn_blocking(move || {
            let found = troop_bench_kernels::adapters();
            (found, backend.target())
        })
        .await;
        if let Ok((found, target)) = target {
            for a in found {
                tracing::info!(adapter = %a, "graphics adapter found");
            }
            match target {
                Ok(t) => {
                    tracing::info!(asked = backend.name(), proves_on = %t, "proof of hardware backend")
                }
                Err(e) => {
                    tracing::warn!(asked = backend.name(), error = %e, "the proof's backend is not usable here; the CPU will prove")
                }
            }
        }
    }

    let pk = until_coordinator_answers("fetching the coordinator's key", waiting, || {
        client.public_key()
    })
    .await
    .with_context(|| format!("fetching the ticket key from {}", cfg.coordinator))?;
    let peer_id = cfg.identity.public().to_peer_id();
    let mut verifier = TicketVerifier::new(peer_id.to_base58());
    verifier
        .add_key_pem(&pk.kid, pk.public_key.as_bytes())
        .map_err(|e| anyhow::anyhow!("coordinator key: {e}"))?;
    // Earlier keys still valid during a rotation (other replicas may sign
    // with one for a while).
    add_previous_keys(client, &mut verifier).await;

    let (net, _events) = network::spawn(cfg.net.clone()).await?;
    network::learn_relays(client.clone(), net.clone());
    // No wildcard or port-0 address: nobody can dial one.
    let addresses: Vec<String> = net.advertised_addrs();
    let reg_req = RegisterRequest {
        models: models.iter().map(|m| m.name.clone()).collect(),
        addresses,
        version: Some(env!("CARGO_PKG_VERSION").into()),
    };
    let reg = match until_coordinator_answers("registering with the coordinator", waiting, || {
        client.register(&reg_req)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            net.shutdown();
            return Err(anyhow::Error::new(e).context("registering with the coordinator"));
        }
    };
    Ok(Prepared {
        upstream,
        models,
        verifier,
        net,
        reg,
    })
}

/// Starts serving once [`prepare`]d: the receipts and session journal,
/// the status page, and the loops.
async fn start_serving(
    cfg: WorkerConfig,
    client: CoordinatorClient,
    http_listener: Option<tokio::net::TcpListener>,
    ready: Prepared,
) -> anyhow::Result<RunningWorker> {
    let Prepared {
        upstream,
        models,
        mut verifier,
        net,
        reg,
    } = ready;
    let peer_id = cfg.identity.public().to_peer_id();
    let key = hex::decode(&reg.receipt_key).context("receipt key is not hex")?;
    tracing::info!(peer_id = %peer_id, multiplier = reg.hardware_multiplier, "registered with the coordinator");

    let receipts = ReceiptQueue::open(&cfg.state_dir.join("receipts"))
        .with_context(|| format!("opening {}", cfg.state_dir.display()))?;
    // Sessions a crash left open are opened again (their receipts are
    // owed); closed ones keep their tickets refused until they expire.
    let sessions_dir = cfg.state_dir.join("sessions");
    let restored = journal::restore(&sessions_dir, |jti| receipts.has(jti));
    let mut book = SessionBook::default();
    for (jti, exp) in &restored.closed {
        verifier.remember(jti, *exp);
    }
    let (mut reopened, mut lines) = (0, 0);
    for sess in restored.open {
        verifier.remember(&sess.claims.jti, sess.claims.exp);
        lines += sess.lines.len();
        reopened += usize::from(book.restore(sess));
    }
    if reopened > 0 || restored.skipped_lines > 0 {
        tracing::info!(
            sessions = reopened,
            lines,
            closed = restored.closed.len(),
            torn = restored.skipped_lines,
            "sessions open at the last stop read back from the journal; their receipts will be filed"
        );
    }
    let journal = journal::Journal::open(&sessions_dir, restored.closed)
        .with_context(|| format!("opening {}", sessions_dir.display()))?;
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
        sessions: Mutex::new(book),
        journal,
        key_refresh: tokio::sync::Mutex::new(None),
        unchecked: Mutex::new(std::collections::HashMap::new()),
        upstream_health: Mutex::new(UpstreamHealth {
            ok: true,
            checked_at_ms: unix_ms(),
            error: None,
            down_since_ms: None,
            withdrawn: false,
        }),
        proof: Mutex::new(ProofStatus {
            state: if cfg.benchmark.is_some() {
                "running"
            } else {
                "off"
            },
            ..Default::default()
        }),
        proving: tokio::sync::Mutex::new(()),
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
