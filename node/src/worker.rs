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

use crate::coordinator_client::CoordinatorClient;
use crate::frames_io::{read_frame, write_frame};
use crate::network::{self, NetConfig, NetworkHandle};
use crate::receipts::ReceiptQueue;
use crate::upstream::{Delta, Dialect, Upstream};

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
        }
    }
}

/// Live numbers of a worker (adverts, heartbeats, tests).
#[derive(Default)]
pub struct WorkerStats {
    pub active_jobs: AtomicU32,
    pub jobs_done: AtomicU64,
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
}

/// A running worker; dropping it leaves the tasks running, `kill` stops
/// everything at once (as a crash would).
pub struct RunningWorker {
    pub peer_id: PeerId,
    pub net: NetworkHandle,
    pub stats: Arc<WorkerStats>,
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl RunningWorker {
    /// Stops every task of this worker; its connections drop.
    pub fn kill(&mut self) {
        self.shared.killed.cancel();
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.net.shutdown();
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
        cfg,
    });
    let mut control = net.stream_control();
    let incoming = control
        .accept(StreamProtocol::new(INFER_PROTOCOL))
        .map_err(|_| anyhow::anyhow!("{INFER_PROTOCOL} already registered"))?;

    let tasks = vec![
        tokio::spawn(accept_loop(shared.clone(), incoming)),
        tokio::spawn(advertise_loop(shared.clone())),
        tokio::spawn(heartbeat_loop(shared.clone())),
        tokio::spawn(refresh_models_loop(shared.clone())),
        tokio::spawn(receipts.run(client, shared.receipt_key.clone())),
        tokio::spawn(benchmark_task(shared.clone())),
    ];
    Ok(RunningWorker {
        peer_id,
        net,
        stats,
        tasks,
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
        }
        Err(e) => {
            tracing::warn!(error = %e, "proof of hardware failed; the multiplier stays as it was")
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
        match s.upstream.models().await {
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
        let s = s.clone();
        tokio::spawn(async move {
            let killed = s.killed.clone();
            tokio::select! {
                r = serve_stream(s, peer, stream) => {
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
) -> anyhow::Result<()> {
    let first = tokio::time::timeout(Duration::from_secs(30), read_frame(&mut stream)).await;
    let (ticket, request) = match first {
        Ok(Ok(Some(Frame::Request {
            ticket, request, ..
        }))) => (ticket, request),
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
    let claims = match verify_ticket(&s, &ticket).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%peer, error = %e, "ticket refused");
            return refuse(&mut stream, ErrorCode::Unauthorized, e.to_string()).await;
        }
    };
    if claims.model != request.model {
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
        return refuse(
            &mut stream,
            ErrorCode::UnknownModel,
            format!("this worker does not serve {}", request.model),
        )
        .await;
    }
    let Ok(permit) = s.jobs.clone().try_acquire_owned() else {
        return refuse(
            &mut stream,
            ErrorCode::Busy,
            "the worker is at its job limit".into(),
        )
        .await;
    };
    s.stats.active_jobs.fetch_add(1, Ordering::Relaxed);
    let started_ms = unix_ms();
    let result = run_job(&s, &mut stream, &request, &claims.jti).await;
    s.stats.active_jobs.fetch_sub(1, Ordering::Relaxed);
    drop(permit);
    let (status, usage) = match &result {
        Ok(u) => (JobStatus::Completed, *u),
        Err(JobEnd::Cancelled(u)) => (JobStatus::Cancelled, *u),
        Err(JobEnd::Failed(u)) => (JobStatus::Failed, *u),
    };
    let receipt = Receipt {
        job_id: claims.jti.clone(),
        worker: s.peer_id.to_base58(),
        user: claims.sub.clone(),
        model: claims.model.clone(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        started_at: started_ms,
        finished_at: unix_ms().max(started_ms),
        status,
    };
    tracing::info!(job = %receipt.job_id, status = ?status, tokens = usage.completion_tokens, "job finished");
    s.stats.jobs_done.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = s.receipts.enqueue(&receipt) {
        tracing::error!(error = %e, job = %receipt.job_id, "could not write the receipt");
    }
    Ok(())
}

enum JobEnd {
    Cancelled(troop_protocol::frames::Usage),
    Failed(troop_protocol::frames::Usage),
}

async fn run_job(
    s: &Shared,
    stream: &mut libp2p::Stream,
    request: &InferenceRequest,
    job_id: &str,
) -> Result<troop_protocol::frames::Usage, JobEnd> {
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
            return Err(JobEnd::Failed(Default::default()));
        }
    };
    let mut chunks = 0u64;
    let mut first: Option<Instant> = None;
    let deadline = tokio::time::Instant::now() + troop_protocol::policy::INFERENCE_TIMEOUT;
    loop {
        let next = match tokio::time::timeout_at(deadline, upstream.next()).await {
            Ok(n) => n,
            Err(_) => {
                let _ = write_frame(
                    stream,
                    &Frame::error(ErrorCode::Timeout, "inference timed out"),
                )
                .await;
                return Err(JobEnd::Failed(partial(chunks)));
            }
        };
        match next {
            Some(Ok(Delta::Text(text))) => {
                if first.is_none() {
                    first = Some(Instant::now());
                    ewma(&s.stats.ttft_ms, t0.elapsed().as_secs_f64() * 1000.0);
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
                return Ok(usage);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "upstream failed mid-generation");
                let _ = write_frame(
                    stream,
                    &Frame::error(ErrorCode::UpstreamFailed, e.to_string()),
                )
                .await;
                return Err(JobEnd::Failed(partial(chunks)));
            }
            None => {
                let _ = write_frame(
                    stream,
                    &Frame::error(ErrorCode::UpstreamFailed, "upstream ended early"),
                )
                .await;
                return Err(JobEnd::Failed(partial(chunks)));
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

fn partial(chunks: u64) -> troop_protocol::frames::Usage {
    troop_protocol::frames::Usage {
        prompt_tokens: 0,
        completion_tokens: chunks,
    }
}

async fn verify_ticket(
    s: &Shared,
    token: &str,
) -> Result<troop_protocol::ticket::TicketClaims, TicketError> {
    let now = unix_secs();
    let mut v = s.verifier.lock().await;
    match v.verify(token, now) {
        Err(TicketError::UnknownKid(kid)) => {
            // The coordinator may have rotated its key: fetch it once.
            match s.client.public_key().await {
                Ok(pk) => {
                    v.add_key_pem(&pk.kid, pk.public_key.as_bytes())?;
                    v.verify(token, now)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not refresh the coordinator's key");
                    Err(TicketError::UnknownKid(kid))
                }
            }
        }
        other => other,
    }
}
