//! The gateway role: an OpenAI-compatible HTTP server on the user's
//! machine that finds workers on the mesh, buys a ticket from the
//! coordinator and streams the answer from the chosen worker.

pub mod http;
pub mod sessions;
pub mod table;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

use anyhow::Context;
use libp2p::identity::Keypair;
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use troop_protocol::ErrorCode;
use troop_protocol::advert::{Advert, model_key};
use troop_protocol::api::AuthorizeResponse;
use troop_protocol::frames::{Endpoint, FRAME_VERSION, Frame, INFER_PROTOCOL, InferenceRequest};
use troop_protocol::policy::{CircuitBreaker, DISCOVERY_TIMEOUT, SystemClock};

use crate::coordinator_client::{ClientError, CoordinatorClient};
use crate::frames_io::{read_frame, write_frame};
use crate::network::{self, NetConfig, NetEvent, NetworkHandle};
use table::{Source, WorkerTable};

/// How to run a gateway.
#[derive(Clone)]
pub struct GatewayConfig {
    pub identity: Keypair,
    pub coordinator: String,
    pub http: SocketAddr,
    pub net: NetConfig,
    /// Longest wait for the first frame from a worker.
    pub first_token_timeout: Duration,
    /// Longest silence between two frames of an answer.
    pub idle_timeout: Duration,
    /// Browser origins allowed besides loopback ones (`*`: any).
    pub cors_origins: Vec<String>,
    /// Host names the HTTP API answers to besides loopback ones and the
    /// address it binds (`--allowed-host`).
    pub allowed_hosts: Vec<String>,
    /// How long a worker's open circuit breaker waits before one trial.
    pub breaker_cooldown: Duration,
    /// Continue an answer on another worker when its worker is lost.
    pub resume: bool,
    /// At most this much of a streamed answer is kept to continue it on
    /// another worker; longer answers are not resumed (4 MiB).
    pub resume_keep_bytes: usize,
    /// The workers used last whose connections stay open while idle
    /// (a reconnection costs a handshake, and a hole punch behind NAT);
    /// connections to other peers close after `net.idle_timeout`.
    pub warm_workers: usize,
    /// A model with no advert is looked up in the DHT; if that has not
    /// answered after this long, the coordinator is asked as well
    /// (`GET /bootstrap?model=`, one request whatever the mesh's size).
    /// `None`: the DHT only.
    pub coordinator_lookup_after: Option<Duration>,
}

impl GatewayConfig {
    pub fn new(identity: Keypair, coordinator: &str, http: SocketAddr) -> Self {
        Self {
            net: NetConfig::new(identity.clone()),
            identity,
            coordinator: coordinator.to_string(),
            http,
            first_token_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            breaker_cooldown: troop_protocol::policy::BREAKER_COOLDOWN,
            resume: true,
            resume_keep_bytes: 4 * 1024 * 1024,
            warm_workers: WARM_WORKERS,
            coordinator_lookup_after: Some(Duration::from_millis(500)),
        }
    }
}

pub struct GatewayState {
    pub cfg: GatewayConfig,
    pub net: NetworkHandle,
    pub table: RwLock<WorkerTable>,
    pub client: CoordinatorClient,
    breakers: Mutex<HashMap<PeerId, CircuitBreaker<SystemClock>>>,
    /// The open session per (model, worker), one ticket serving every
    /// request until its reservation is used up or it expires, and the
    /// next one bought ahead (pure; `sessions.rs`).
    sessions: Mutex<sessions::SessionBook>,
    /// Workers whose settled requests the coordinator reports as disputed
    /// too often (refreshed from `GET /workers` every minute).
    disputed: RwLock<std::collections::HashSet<PeerId>>,
    /// Each worker's record at the coordinator (refreshed every minute).
    pub reputation: RwLock<HashMap<PeerId, troop_protocol::api::ReputationInfo>>,
    /// The latest answers, newest last (for the console).
    pub answers: Mutex<VecDeque<AnswerRecord>>,
    /// The account as the console shows it (read from the coordinator).
    pub account: crate::web::AccountView,
    /// The workers kept warm, most recently used first.
    warm: Mutex<VecDeque<PeerId>>,
    /// When the coordinator was last asked for each model's workers.
    asked_coordinator: Mutex<HashMap<String, Instant>>,
    /// Places for acknowledgements being delivered (`MAX_ACKS_IN_FLIGHT`).
    acks_in_flight: Arc<tokio::sync::Semaphore>,
    /// Acknowledgements being delivered per worker (`MAX_ACKS_PER_WORKER`).
    acks_per_worker: Arc<Mutex<HashMap<PeerId, usize>>>,
}

impl GatewayState {
    /// Keeps `worker`'s connection open while idle, and lets go of the
    /// least recently used one beyond `cfg.warm_workers`.
    fn keep_warm(&self, worker: PeerId) {
        let Some(mut warm) = self.warm.locked() else {
            return;
        };
        if warm.front() == Some(&worker) {
            return;
        }
        warm.retain(|p| *p != worker);
        warm.push_front(worker);
        self.net.keep_warm(worker, true);
        while warm.len() > self.cfg.warm_workers {
            if let Some(old) = warm.pop_back() {
                self.net.keep_warm(old, false);
            }
        }
    }
}

/// Answers kept for the console.
pub const ANSWERS_KEPT: usize = 100;

/// Workers a gateway keeps connected while idle, by default.
pub const WARM_WORKERS: usize = 8;

/// One answer relayed by this gateway, as the console shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AnswerRecord {
    /// Unix milliseconds when the request went to the worker.
    pub at_ms: u64,
    pub model: String,
    pub worker: String,
    /// The session (ticket) it was billed under, and its number in it.
    pub job_id: String,
    pub index: u32,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    pub events: u64,
    pub completion_tokens: Option<u64>,
    pub tokens_per_s: Option<f64>,
    /// `done` (the worker finished it) or `cut` (it ended early).
    pub outcome: &'static str,
}

/// A worker with at least this many settled requests, of which more than
/// `DISPUTE_THRESHOLD` differed from their user's acknowledgement beyond
/// the tolerance, or were filed without an acknowledgement, is skipped.
const DISPUTE_MIN_REQUESTS: u64 = 10;
const DISPUTE_THRESHOLD: f64 = 0.2;

/// Addresses of one advert the gateway dials a worker at (an advert may
/// carry up to 64 KiB of them).
pub const MAX_ADVERT_ADDRS: usize = 8;

/// Acknowledgements on their way to workers at once; past it, one more is
/// dropped (and counted in `troop_acks_lost_total`) rather than queued
/// without bound.
const MAX_ACKS_IN_FLIGHT: usize = 1024;

/// Acknowledgements in flight to one worker: a dead worker's retries
/// (up to about 30 s each) cannot take every place from healthy ones.
const MAX_ACKS_PER_WORKER: usize = 64;

/// A running gateway.
pub struct RunningGateway {
    pub http_addr: SocketAddr,
    pub state: Arc<GatewayState>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningGateway {
    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn kill(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.state.net.shutdown();
    }

    pub async fn wait(mut self) {
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

pub async fn start(cfg: GatewayConfig) -> anyhow::Result<RunningGateway> {
    // The metrics recorder first: the network counts from its first event.
    crate::web::metrics_handle();
    // Its own port first: nothing starts when another program holds it.
    let listener = tokio::net::TcpListener::bind(cfg.http).await.with_context(|| {
        format!(
            "binding the gateway's HTTP address {} (another program holds it? pass --http 127.0.0.1:8081 or another free port)",
            cfg.http
        )
    })?;
    let http_addr = listener.local_addr()?;
    let client = CoordinatorClient::new(&cfg.coordinator, cfg.identity.clone());
    // A URL that is not a Troop coordinator fails now, not at the first
    // request; one that does not answer yet may come up later.
    match client.identify().await {
        Ok(k) => tracing::info!(coordinator = %cfg.coordinator, kid = %k.kid, "coordinator found"),
        Err(crate::coordinator_client::Identify::NotCoordinator(why)) => anyhow::bail!(why),
        Err(crate::coordinator_client::Identify::Unreachable(why)) => tracing::warn!(
            "{why}; the gateway starts anyway and answers 503 until the coordinator is up"
        ),
    }
    let (net, events) = network::spawn(cfg.net.clone()).await?;
    network::learn_relays(client.clone(), net.clone());
    let state = Arc::new(GatewayState {
        cfg,
        net,
        table: RwLock::new(WorkerTable::default()),
        client: client.clone(),
        breakers: Mutex::new(HashMap::new()),
        sessions: Mutex::new(sessions::SessionBook::default()),
        disputed: RwLock::new(Default::default()),
        reputation: RwLock::new(HashMap::new()),
        answers: Mutex::new(VecDeque::new()),
        account: crate::web::AccountView::new(client.clone()),
        warm: Mutex::new(VecDeque::new()),
        asked_coordinator: Mutex::new(HashMap::new()),
        acks_in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_ACKS_IN_FLIGHT)),
        acks_per_worker: Arc::new(Mutex::new(HashMap::new())),
    });
    crate::web::warn_if_public(http_addr, "gateway");
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(table_loop(state.clone(), events)));
    tasks.push(tokio::spawn(reputation_loop(state.clone())));
    let router = http::router(state.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "gateway HTTP server stopped");
        }
    }));
    tracing::info!(url = %format!("http://{http_addr}/v1"), console = %format!("http://{http_addr}/"), "gateway serving the OpenAI API");
    Ok(RunningGateway {
        http_addr,
        state,
        tasks,
    })
}

async fn table_loop(state: Arc<GatewayState>, mut events: mpsc::Receiver<NetEvent>) {
    let mut known_addrs: HashMap<PeerId, Vec<String>> = HashMap::new();
    while let Some(ev) = events.recv().await {
        match ev {
            NetEvent::Advert { source, data } => match Advert::decode(&data) {
                Some(mut a) => {
                    // Adverts carry the worker's addresses: the way to reach
                    // it when it is not a direct neighbour and the DHT is off.
                    // The first few only, dialled and kept in the table: an
                    // advert may list many.
                    a.addresses.truncate(MAX_ADVERT_ADDRS);
                    let addrs = a.addresses.clone();
                    let fresh = known_addrs.get(&source) != Some(&addrs);
                    if let Some(mut t) = state.table.writing() {
                        t.on_advert(source, a);
                    }
                    if fresh && a_peer_matches(&source, &addrs) {
                        for addr in addrs
                            .iter()
                            .filter_map(|s| s.parse::<libp2p::Multiaddr>().ok())
                        {
                            state.net.add_address(source, addr).await;
                        }
                        if known_addrs.len() >= table::MAX_ENTRIES
                            && !known_addrs.contains_key(&source)
                            && let Some(t) = state.table.reading()
                        {
                            // Only workers still in the table are worth
                            // remembering.
                            known_addrs.retain(|p, _| t.contains(p));
                        }
                        if known_addrs.len() < table::MAX_ENTRIES
                            || known_addrs.contains_key(&source)
                        {
                            known_addrs.insert(source, addrs);
                        }
                    }
                }
                None => metrics::counter!("troop_bad_adverts_total").increment(1),
            },
            NetEvent::Rtt { peer, rtt } => {
                if let Some(mut t) = state.table.writing() {
                    t.on_rtt(peer, rtt);
                }
            }
            NetEvent::Upgraded(peer) => {
                // Streams pick one of a peer's connections at random: once
                // a direct path exists, close the relayed one (now, or when
                // our last job on that worker ends).
                let idle = state
                    .table
                    .reading()
                    .map(|t| t.inflight(&peer) == 0)
                    .unwrap_or(false);
                if idle {
                    state.net.close_relayed(peer);
                }
            }
            NetEvent::Connected(_) | NetEvent::Disconnected(_) => {}
        }
    }
}

/// Keeps the set of workers to skip for disputed bills up to date.
async fn reputation_loop(state: Arc<GatewayState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let Ok(list) = state.client.workers().await else {
            continue;
        };
        if let Some(mut r) = state.reputation.writing() {
            *r = list
                .workers
                .iter()
                .filter_map(|w| Some((w.peer_id.parse().ok()?, w.reputation.clone()?)))
                .collect();
        }
        let bad: std::collections::HashSet<PeerId> = list
            .workers
            .iter()
            .filter(|w| {
                w.reputation.as_ref().is_some_and(|r| {
                    r.requests >= DISPUTE_MIN_REQUESTS
                        && (r.disputed_share > DISPUTE_THRESHOLD
                            || r.unacknowledged_share > DISPUTE_THRESHOLD)
                })
            })
            .filter_map(|w| w.peer_id.parse().ok())
            .collect();
        for p in &bad {
            tracing::info!(worker = %p, "skipping a worker whose bills are often disputed or unacknowledged");
        }
        if let Some(mut d) = state.disputed.writing() {
            *d = bad;
        }
    }
}

/// Addresses in an advert must name the advertiser (or no one).
fn a_peer_matches(source: &PeerId, addrs: &[String]) -> bool {
    addrs
        .iter()
        .filter_map(|s| s.parse::<libp2p::Multiaddr>().ok())
        .all(|a| crate::network::peer_of(&a).is_none_or(|p| p == *source))
}

/// Why a request could not be served (mapped to OpenAI-shaped errors).
#[derive(Debug)]
pub enum DispatchError {
    /// No worker on the mesh has this model.
    UnknownModel(String),
    /// The coordinator refused the ticket for lack of credits.
    PaymentRequired(String),
    /// Rate limited by the coordinator.
    RateLimited {
        message: String,
        retry_after: Option<u64>,
    },
    /// Every worker tried failed before the first token.
    NoWorker(Skip),
    /// The coordinator can't be reached.
    Coordinator(String),
    /// The worker's model server refused the request as the app's fault
    /// (4xx): its status and body go to the app unchanged.
    Rejected { status: u16, body: String },
}

/// An answer in progress: the first frame already read, the rest on the stream.
pub struct JobStream {
    pub worker: PeerId,
    pub first: Frame,
    pub stream: libp2p::Stream,
    state: Arc<GatewayState>,
    /// The session and this request's number in it.
    job_id: String,
    index: u32,
    /// When the request was sent, and what came back since.
    sent: Instant,
    sent_unix_ms: u64,
    model: String,
    first_frame: Option<Instant>,
    last_frame: Option<Instant>,
    chunks: u64,
    completion_tokens: Option<u64>,
    /// The worker took the request (its first frame was no refusal): only
    /// such attempts count as answers.
    answered: bool,
    /// Keeps the connection under this stream from being trimmed.
    _busy: crate::network::BusyGuard,
}

impl JobStream {
    fn saw(&mut self, f: &Frame) {
        // Per answer, not per frame: the relay's hot path records nothing.
        if self.first_frame.is_none() {
            let now = Instant::now();
            self.first_frame = Some(now);
            metrics::histogram!("troop_gateway_ttft_seconds")
                .record(now.duration_since(self.sent).as_secs_f64());
        }
        match f {
            Frame::Chunk { .. } => {
                self.chunks += 1;
                self.last_frame = Some(Instant::now());
            }
            Frame::Raw { events, .. } => {
                self.chunks = self.chunks.saturating_add(u64::from(*events));
                self.last_frame = Some(Instant::now());
            }
            Frame::Done { usage, .. } => {
                self.completion_tokens = Some(usage.completion_tokens);
                self.last_frame = Some(Instant::now());
            }
            _ => {}
        }
    }
}

/// A place among the acknowledgements in flight: one of
/// `MAX_ACKS_IN_FLIGHT` in all and of `MAX_ACKS_PER_WORKER` for its worker,
/// given back when dropped.
struct AckPlace {
    _all: tokio::sync::OwnedSemaphorePermit,
    per_worker: Arc<Mutex<HashMap<PeerId, usize>>>,
    worker: PeerId,
}

impl AckPlace {
    fn take(state: &GatewayState, worker: PeerId) -> Option<Self> {
        let all = state.acks_in_flight.clone().try_acquire_owned().ok()?;
        let mut m = state
            .acks_per_worker
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = m.entry(worker).or_insert(0);
        if *n >= MAX_ACKS_PER_WORKER {
            return None;
        }
        *n += 1;
        Some(Self {
            _all: all,
            per_worker: state.acks_per_worker.clone(),
            worker,
        })
    }
}

impl Drop for AckPlace {
    fn drop(&mut self) {
        let mut m = self.per_worker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.worker) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.worker);
            }
        }
    }
}

/// Delivers one acknowledgement to `worker`, retried: the connection it
/// goes out on may be the relayed one being closed in favour of a direct
/// path. Holds its place among the acks in flight until done.
async fn deliver_ack(
    net: NetworkHandle,
    worker: PeerId,
    ack: troop_protocol::usage::Ack,
    _place: AckPlace,
) {
    use backon::Retryable;
    let send = || async {
        tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = net
                .stream_control()
                .open_stream(worker, StreamProtocol::new(INFER_PROTOCOL))
                .await
                .map_err(|e| e.to_string())?;
            write_frame(&mut s, &Frame::Ack { ack: ack.clone() })
                .await
                .map_err(|e| e.to_string())?;
            futures::AsyncWriteExt::close(&mut s)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
    };
    let sent = send
        .retry(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_times(4),
        )
        .sleep(tokio::time::sleep)
        .notify(|e: &String, _| {
            tracing::debug!(%worker, error = %e, "acknowledgement not delivered; retrying")
        })
        .await;
    match sent {
        Ok(()) => metrics::counter!("troop_acks_sent_total").increment(1),
        Err(e) => {
            metrics::counter!("troop_acks_lost_total").increment(1);
            tracing::info!(%worker, error = %e, "acknowledgement not delivered");
        }
    }
}

impl Drop for JobStream {
    fn drop(&mut self) {
        // Acknowledge what arrived, signed by the user: the worker bills
        // the session with it (a user who leaves mid-answer pays for the
        // part it got).
        let observed_ms = self
            .last_frame
            .map(|t| t.duration_since(self.sent).as_millis() as u64)
            .unwrap_or(0);
        let ack = troop_protocol::usage::Ack::sign(
            &self.state.cfg.identity,
            &self.job_id,
            &self.worker.to_base58(),
            self.index,
            self.chunks,
            self.completion_tokens.unwrap_or(self.chunks),
            observed_ms,
        );
        if self.answered {
            self.record();
        }
        let net = self.state.net.clone();
        let worker = self.worker;
        match AckPlace::take(&self.state, worker) {
            Some(place) => {
                tokio::spawn(deliver_ack(net, worker, ack, place));
            }
            None => {
                metrics::counter!("troop_acks_lost_total").increment(1);
                tracing::warn!(%worker, "too many acknowledgements in flight; one dropped");
            }
        }
        let idle = match self.state.table.write() {
            Ok(mut t) => {
                t.add_inflight(&self.worker, -1);
                t.inflight(&self.worker) == 0
            }
            Err(_) => false,
        };
        if idle && self.state.net.path(&self.worker) == network::Path::Direct {
            self.state.net.close_relayed(self.worker);
        }
    }
}

impl JobStream {
    /// Keeps this answer for the console and counts it.
    fn record(&self) {
        let end = self.last_frame.unwrap_or(self.sent);
        let duration = end.duration_since(self.sent).as_secs_f64();
        let tokens = self.completion_tokens;
        // A whole answer arrives in one frame: its rate is over the whole
        // request, not from its first frame.
        let from = match self.first_frame {
            Some(f) if self.chunks > 1 => f,
            _ => self.sent,
        };
        let tokens_per_s = tokens.and_then(|t| {
            let secs = end.duration_since(from).as_secs_f64();
            (secs > 0.0 && t > 1).then(|| t as f64 / secs)
        });
        let outcome = if tokens.is_some() { "done" } else { "cut" };
        metrics::counter!("troop_gateway_answers_total", "outcome" => outcome).increment(1);
        metrics::histogram!("troop_gateway_answer_chunks").record(self.chunks as f64);
        let rec = AnswerRecord {
            at_ms: self.sent_unix_ms,
            model: self.model.clone(),
            worker: self.worker.to_base58(),
            job_id: self.job_id.clone(),
            index: self.index,
            ttft_ms: self
                .first_frame
                .map(|f| f.duration_since(self.sent).as_secs_f64() * 1000.0),
            duration_ms: duration * 1000.0,
            events: self.chunks,
            completion_tokens: tokens,
            tokens_per_s,
            outcome,
        };
        if let Some(mut a) = self.state.answers.locked() {
            if a.len() >= ANSWERS_KEPT {
                a.pop_front();
            }
            a.push_back(rec);
        }
    }

    /// The next frame, or an error when the worker is gone or silent.
    pub async fn next(&mut self, idle: Duration) -> Result<Option<Frame>, String> {
        match tokio::time::timeout(idle, read_frame(&mut self.stream)).await {
            Ok(Ok(f)) => {
                if let Some(f) = &f {
                    self.saw(f);
                }
                Ok(f)
            }
            Ok(Err(e)) => Err(format!("the worker's stream broke: {e}")),
            Err(_) => Err(format!("the worker sent nothing for {} s", idle.as_secs())),
        }
    }
}

impl GatewayState {
    /// The worker could not be dialled: it leaves the table (and
    /// `/v1/models`) until it advertises again.
    fn unreachable(&self, peer: PeerId) {
        tracing::info!(worker = %peer, "worker unreachable; dropped from the table until it advertises again");
        if let Some(mut t) = self.table.writing() {
            t.mark_unreachable(&peer);
        }
    }

    /// A permit to try `peer`, or `None` while its breaker is open (or its
    /// one half-open trial is out). The permit records an outcome when
    /// told, and is given back without one when dropped (a final answer
    /// that is not the worker's fault, an app that hung up mid-dispatch).
    fn breaker_permit(&self, peer: &PeerId) -> Option<BreakerPermit<'_>> {
        let cooldown = self.cfg.breaker_cooldown;
        let mut breakers = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        if breakers.len() >= table::MAX_ENTRIES
            && !breakers.contains_key(peer)
            && let Some(t) = self.table.reading()
        {
            // One breaker per worker ever tried: keep those still in the
            // table, and those open or in a trial.
            breakers.retain(|p, b| {
                t.contains(p) || b.state() != troop_protocol::policy::BreakerState::Closed
            });
        }
        let allowed = breakers
            .entry(*peer)
            .or_insert_with(|| {
                CircuitBreaker::with_policy(
                    SystemClock::default(),
                    troop_protocol::policy::BREAKER_THRESHOLD,
                    cooldown,
                )
            })
            .try_acquire();
        // The lock is released first: a permit's drop takes it again.
        drop(breakers);
        allowed.then(|| BreakerPermit {
            breakers: &self.breakers,
            peer: *peer,
            settled: false,
        })
    }

    /// Workers for `model`, from the table or else from the DHT: direct
    /// paths first, then relayed ones, then workers we are not connected
    /// to; by expected latency and load within each.
    pub async fn candidates(&self, model: &str, embeddings: bool) -> Vec<PeerId> {
        let mut found = self.candidates_by_score(model, embeddings).await;
        if let Some(d) = self.disputed.reading() {
            found.retain(|p| !d.contains(p));
        }
        found.sort_by_key(|p| self.net.path(p).rank());
        found
    }

    async fn candidates_by_score(&self, model: &str, embeddings: bool) -> Vec<PeerId> {
        let found = self
            .table
            .reading()
            .map(|t| t.candidates_for(model, embeddings))
            .unwrap_or_default();
        if !found.is_empty() {
            return found;
        }
        // No advert yet: ask the DHT and, when it is slow or finds nobody,
        // the coordinator; the first answer that names a worker wins.
        let dht =
            tokio::time::timeout(DISCOVERY_TIMEOUT, self.net.find_providers(model_key(model)));
        let after = self.cfg.coordinator_lookup_after;
        let hedge = async {
            match after {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(dht);
        let (providers, source) = tokio::select! {
            r = &mut dht => match r.unwrap_or_default() {
                p if p.is_empty() && after.is_some() => {
                    (self.workers_from_coordinator(model).await, Source::Coordinator)
                }
                p => (p, Source::Dht),
            },
            // The DHT is slow: ask the coordinator too (a hedged request).
            () = hedge => {
                let coordinator = self.workers_from_coordinator(model);
                tokio::pin!(coordinator);
                tokio::select! {
                    r = &mut dht => match r.unwrap_or_default() {
                        p if p.is_empty() => (coordinator.await, Source::Coordinator),
                        p => (p, Source::Dht),
                    },
                    p = &mut coordinator => match p {
                        p if p.is_empty() => (dht.await.unwrap_or_default(), Source::Dht),
                        p => (p, Source::Coordinator),
                    },
                }
            }
        };
        if let Some(mut t) = self.table.writing() {
            for p in &providers {
                t.on_found(*p, model, source);
            }
            t.candidates_for(model, embeddings)
        } else {
            providers
        }
    }

    /// The live workers the coordinator knows for `model` (`GET
    /// /bootstrap?model=`), their addresses learnt and a dial started. At
    /// most one such read per model every 10 s (the coordinator counts them
    /// against this IP's discovery quota).
    async fn workers_from_coordinator(&self, model: &str) -> Vec<PeerId> {
        if let Some(mut asked) = self.asked_coordinator.locked() {
            let now = Instant::now();
            if asked
                .get(model)
                .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(10))
            {
                return Vec::new();
            }
            if asked.len() >= 1024 {
                asked.retain(|_, t| now.duration_since(*t) < Duration::from_secs(10));
            }
            asked.insert(model.to_string(), now);
        }
        let peers = match self.client.workers_for(model).await {
            Ok(r) => r.peers,
            Err(e) => {
                tracing::debug!(model, error = %e, "no workers from the coordinator");
                return Vec::new();
            }
        };
        let mut found = Vec::new();
        for p in peers.into_iter().filter(|p| !p.relay) {
            let Ok(peer) = p.peer_id.parse::<PeerId>() else {
                continue;
            };
            let addrs: Vec<libp2p::Multiaddr> = p
                .addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                // An address naming another peer is not this worker's.
                .filter(|a| network::peer_of(a).is_none_or(|p| p == peer))
                .collect();
            if addrs.is_empty() {
                continue;
            }
            for a in &addrs {
                self.net.add_address(peer, a.clone()).await;
            }
            self.net.dial_peer(peer, addrs).await;
            found.push(peer);
        }
        // The addresses are in the swarm before anyone opens a stream to
        // these workers (a stream opened earlier failed with "no addresses
        // for peer", which dropped the worker from the table).
        self.net.barrier().await;
        tracing::info!(model, workers = found.len(), "workers from the coordinator");
        found
    }

    /// Finds a worker, buys a ticket, opens the stream and waits for the
    /// first frame. A worker that refuses or fails before that is skipped
    /// for the next (and counted by its breaker); when every candidate
    /// failed, the round is retried after 1, 2 and 4 s.
    pub async fn dispatch(
        self: &Arc<Self>,
        request: InferenceRequest,
    ) -> Result<JobStream, DispatchError> {
        self.dispatch_avoiding(request, &[]).await
    }

    /// [`dispatch`](Self::dispatch) to any worker but those in `avoid`
    /// (failing at once when no other worker serves the model).
    pub async fn dispatch_avoiding(
        self: &Arc<Self>,
        request: InferenceRequest,
        avoid: &[PeerId],
    ) -> Result<JobStream, DispatchError> {
        use backon::BackoffBuilder;
        let mut delays = troop_protocol::policy::retry_policy().build();
        let mut last_error = Skip::NoneTried;
        let mut ever_found = false;
        loop {
            let embeddings = request.endpoint == Some(Endpoint::Embeddings);
            let mut candidates = self.candidates(&request.model, embeddings).await;
            let before = candidates.len();
            candidates.retain(|p| !avoid.contains(p));
            if before > 0 && candidates.is_empty() {
                return Err(DispatchError::NoWorker(Skip::NoOther));
            }
            if ever_found && candidates.is_empty() {
                // Every worker we knew was dropped as unreachable: waiting
                // brings none back, an advert would.
                return Err(DispatchError::NoWorker(last_error));
            }
            ever_found |= !candidates.is_empty();
            for worker in candidates {
                let Some(permit) = self.breaker_permit(&worker) else {
                    continue;
                };
                match self.try_worker(worker, &request).await {
                    Ok(job) => {
                        permit.record(true);
                        return Ok(job);
                    }
                    // Not the worker's doing (402, 429, the coordinator
                    // away, the app's own 4xx): the permit goes back as it
                    // drops.
                    Err(Attempt::Final(e)) => return Err(e),
                    Err(Attempt::Next(reason)) => {
                        tracing::info!(%worker, %reason, "worker skipped");
                        permit.record(false);
                        last_error = reason;
                    }
                }
            }
            if !ever_found {
                return Err(DispatchError::UnknownModel(request.model.clone()));
            }
            match delays.next() {
                Some(d) => tokio::time::sleep(d).await,
                None => return Err(DispatchError::NoWorker(last_error)),
            }
        }
    }

    /// The session to send a request to `worker` under: the open one, else
    /// the one bought ahead, else a new one. Returns the ticket, the
    /// request's index in the session and whether the session was in use
    /// before.
    async fn session_for(
        self: &Arc<Self>,
        model: &str,
        worker: PeerId,
    ) -> Result<(AuthorizeResponse, u32, bool), ClientError> {
        let key = (model.to_string(), worker);
        let next = self
            .sessions
            .locked()
            .map(|mut b| b.next(&key, unix_now_ms()));
        if let Some((sessions::Next::Open { auth, index }, reused)) = next {
            return Ok((auth, index, reused));
        }
        let auth = self
            .client
            .authorize(model, &worker.to_base58(), None)
            .await?;
        metrics::counter!("troop_tickets_bought_total", "when" => "now").increment(1);
        if let Some(mut b) = self.sessions.locked() {
            b.opened(key, auth.clone(), unix_now_ms());
        }
        Ok((auth, 0, false))
    }

    fn drop_session(&self, model: &str, worker: PeerId, job_id: &str) {
        if let Some(mut b) = self.sessions.locked() {
            b.closed(&(model.to_string(), worker), job_id);
        }
    }

    /// Buys the next session for (model, worker) in the background when the
    /// open one nears its expiry.
    fn renew_ahead(self: &Arc<Self>, model: &str, worker: PeerId) {
        let key = (model.to_string(), worker);
        let renew = self
            .sessions
            .locked()
            .is_some_and(|b| b.wants_renewal(&key, unix_now_ms()));
        if !renew {
            return;
        }
        let state = self.clone();
        tokio::spawn(async move {
            if let Ok(t) = state
                .client
                .authorize(&key.0, &key.1.to_base58(), None)
                .await
                && let Some(mut b) = state.sessions.locked()
            {
                metrics::counter!("troop_tickets_bought_total", "when" => "ahead").increment(1);
                b.add_spare(key, t);
            }
        });
    }

    async fn try_worker(
        self: &Arc<Self>,
        worker: PeerId,
        request: &InferenceRequest,
    ) -> Result<JobStream, Attempt> {
        // A session the worker already closed (idle) is refused: then one
        // more try with a new session. The stream is opened before the
        // ticket is bought, so a worker that cannot be reached costs no
        // reservation.
        for _ in 0..2 {
            // From before the stream opens: the connection it goes out on
            // is not trimmed while the ticket is bought.
            let busy = self.net.busy(worker);
            let stream = self.open_to(worker).await?;
            let (auth, index, reused) = match self.session_for(&request.model, worker).await {
                Ok(a) => a,
                Err(ClientError::Refused {
                    status: 402,
                    message,
                    ..
                }) => {
                    return Err(Attempt::Final(DispatchError::PaymentRequired(message)));
                }
                Err(ClientError::Refused {
                    status: 429,
                    message,
                    retry_after,
                    ..
                }) => {
                    return Err(Attempt::Final(DispatchError::RateLimited {
                        message,
                        retry_after,
                    }));
                }
                Err(ClientError::Transport(e)) => {
                    return Err(Attempt::Final(DispatchError::Coordinator(e)));
                }
                Err(e) => return Err(Attempt::Next(Skip::NoTicket(e.to_string()))),
            };
            match self
                .send_request(worker, stream, busy, request, &auth, index)
                .await
            {
                Err(Attempt::Next(reason)) if reused && reason.is_unauthorized() => {
                    tracing::debug!(%worker, %reason, "session closed by the worker; opening a new one");
                    self.drop_session(&request.model, worker, &auth.job_id);
                    continue;
                }
                other => return other,
            }
        }
        Err(Attempt::Next(Skip::TwoSessions))
    }

    /// Opens an inference stream to `worker` (dialling it if need be). A
    /// worker that cannot be reached leaves the table.
    async fn open_to(&self, worker: PeerId) -> Result<libp2p::Stream, Attempt> {
        let mut control = self.net.stream_control();
        let open = tokio::time::timeout(
            DISCOVERY_TIMEOUT,
            control.open_stream(worker, StreamProtocol::new(INFER_PROTOCOL)),
        )
        .await;
        match open {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => {
                self.unreachable(worker);
                Err(Attempt::Next(Skip::Unreachable(format!(
                    "could not open a stream: {e}"
                ))))
            }
            Err(_) => {
                self.unreachable(worker);
                Err(Attempt::Next(Skip::Unreachable(
                    "opening a stream timed out".into(),
                )))
            }
        }
    }

    async fn send_request(
        self: &Arc<Self>,
        worker: PeerId,
        mut stream: libp2p::Stream,
        busy: crate::network::BusyGuard,
        request: &InferenceRequest,
        auth: &AuthorizeResponse,
        index: u32,
    ) -> Result<JobStream, Attempt> {
        let frame = Frame::Request {
            version: FRAME_VERSION,
            ticket: auth.ticket.clone(),
            request: request.clone(),
            index,
        };
        let sent = Instant::now();
        if let Err(e) = write_frame(&mut stream, &frame).await {
            return Err(Attempt::Next(Skip::Unreachable(format!(
                "could not send the request: {e}"
            ))));
        }
        if let Some(mut t) = self.table.writing() {
            t.add_inflight(&worker, 1);
        }
        self.keep_warm(worker);
        let mut job = JobStream {
            worker,
            first: Frame::Chunk {
                text: String::new(),
            },
            stream,
            state: self.clone(),
            job_id: auth.job_id.clone(),
            index,
            sent,
            sent_unix_ms: unix_now_ms(),
            model: request.model.clone(),
            first_frame: None,
            last_frame: None,
            chunks: 0,
            completion_tokens: None,
            answered: false,
            _busy: busy,
        };
        // A whole (non-streamed) answer comes in one go when it is ready.
        let first_wait = if request.body.is_some() && !wants_stream(request) {
            troop_protocol::policy::INFERENCE_TIMEOUT
        } else {
            self.cfg.first_token_timeout
        };
        match job.next(first_wait).await {
            Ok(Some(Frame::Error {
                code, status, body, ..
            })) if code == ErrorCode::UpstreamRejected.number() => {
                Err(Attempt::Final(DispatchError::Rejected {
                    status: status.filter(|s| (400..500).contains(s)).unwrap_or(400),
                    body: body.unwrap_or_default(),
                }))
            }
            Ok(Some(Frame::Error { code, message, .. })) => Err(Attempt::Next(Skip::Refused {
                code: ErrorCode::from_number(code),
                message,
            })),
            Ok(Some(first)) => {
                job.first = first;
                job.answered = true;
                self.renew_ahead(&request.model, worker);
                Ok(job)
            }
            Ok(None) => Err(Attempt::Next(Skip::NoAnswer(
                "the worker closed the stream".into(),
            ))),
            Err(e) => Err(Attempt::Next(Skip::NoAnswer(e))),
        }
    }
}

/// Whether a pass-through body asks for a stream (`"stream": true`).
pub fn wants_stream(request: &InferenceRequest) -> bool {
    #[derive(serde::Deserialize)]
    struct Flag {
        #[serde(default)]
        stream: Option<bool>,
    }
    request
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str::<Flag>(b).ok())
        .and_then(|f| f.stream)
        .unwrap_or(false)
        && request.endpoint != Some(troop_protocol::frames::Endpoint::Embeddings)
}

use troop_protocol::policy::unix_ms as unix_now_ms;

enum Attempt {
    Next(Skip),
    Final(DispatchError),
}

/// Why a worker was skipped (and another tried): the log gets the detail,
/// the app one sentence a person can act on ([`Skip::plain`]).
#[derive(Debug, Clone)]
pub enum Skip {
    /// No stream could be opened or written (the worker is gone or cut off).
    Unreachable(String),
    /// Nothing came back in time, or the stream broke before an answer.
    NoAnswer(String),
    /// The worker refused with a frame error.
    Refused {
        code: Option<ErrorCode>,
        message: String,
    },
    /// The coordinator would not sell a ticket for this worker.
    NoTicket(String),
    /// The worker refused a new session right after closing the old one.
    TwoSessions,
    /// Every worker that serves the model was tried already.
    NoOther,
    /// No worker was tried (none known yet).
    NoneTried,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Unreachable(e) => write!(f, "unreachable: {e}"),
            Skip::NoAnswer(e) => write!(f, "no answer: {e}"),
            Skip::Refused { code, message } => write!(
                f,
                "worker refused ({}): {message}",
                code.map(|c| c.as_str()).unwrap_or("unknown")
            ),
            Skip::NoTicket(e) => write!(f, "no ticket: {e}"),
            Skip::TwoSessions => f.write_str("the worker refused two sessions"),
            Skip::NoOther => f.write_str("no other worker serves this model"),
            Skip::NoneTried => f.write_str("no worker answered"),
        }
    }
}

impl Skip {
    /// What the app is told.
    pub fn plain(&self) -> &'static str {
        match self {
            Skip::NoOther => "every worker that serves this model failed it",
            Skip::Refused {
                code: Some(ErrorCode::Busy),
                ..
            } => "every worker that serves this model is at its job limit",
            Skip::Refused {
                code: Some(ErrorCode::Unavailable),
                ..
            } => "the workers that serve this model are stopping or unavailable",
            Skip::Refused {
                code: Some(ErrorCode::Unauthorized),
                ..
            }
            | Skip::TwoSessions => "the worker refused the ticket",
            Skip::Refused { .. } => "the worker refused the request",
            Skip::NoTicket(_) => {
                "the coordinator would not sell a ticket for the workers that serve this model"
            }
            Skip::NoAnswer(_) => "the worker did not answer in time",
            Skip::Unreachable(_) | Skip::NoneTried => {
                "the workers that serve this model could not be reached (they may have stopped)"
            }
        }
    }

    fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            Skip::Refused {
                code: Some(ErrorCode::Unauthorized),
                ..
            }
        )
    }
}

/// One call's permit from a worker's circuit breaker: [`record`](Self::record)
/// counts its outcome; dropped without one (a final refusal that says
/// nothing of the worker, a dispatch the app abandoned), it is given back so
/// a half-open breaker's trial is never held for good.
struct BreakerPermit<'a> {
    breakers: &'a Mutex<HashMap<PeerId, CircuitBreaker<SystemClock>>>,
    peer: PeerId,
    settled: bool,
}

impl BreakerPermit<'_> {
    fn record(mut self, ok: bool) {
        self.settled = true;
        let mut b = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(br) = b.get_mut(&self.peer) {
            if ok {
                br.record_success();
            } else {
                br.record_failure();
            }
        }
    }
}

impl Drop for BreakerPermit<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let mut b = self.breakers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(br) = b.get_mut(&self.peer) {
                br.release();
            }
        }
    }
}
