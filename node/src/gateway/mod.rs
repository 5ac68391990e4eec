//! The gateway role: an OpenAI-compatible HTTP server on the user's
//! machine that finds workers on the mesh, buys a ticket from the
//! coordinator and streams the answer from the chosen worker.

mod acks;
pub mod audit;
mod dispatch;
mod errors;
pub mod evidence;
mod fan_out;
pub mod http;
mod reading;
pub mod sessions;
mod spare;
pub mod table;
mod validate;

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
use acks::*;
pub use dispatch::{DispatchError, Skip};
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
    /// Have a share of this gateway's answers re-scored by other workers of
    /// the same weights (`--no-audit` turns it off: audits show the prompt
    /// to a second worker).
    pub audit: bool,
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
            audit: true,
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
    /// Each worker's verified audits at the coordinator, from every
    /// gateway (refreshed every minute): a worker with a long clean record
    /// is audited at the floor's rate here too.
    pub published_audits: RwLock<HashMap<PeerId, troop_protocol::api::AuditCounts>>,
    /// The latest answers, newest last (for the console).
    pub answers: Mutex<VecDeque<AnswerRecord>>,
    /// The account as the console shows it (read from the coordinator).
    pub account: crate::web::AccountView,
    /// The workers kept warm, most recently used first.
    warm: Mutex<VecDeque<PeerId>>,
    /// When the coordinator was last asked for each model's workers.
    asked_coordinator: Mutex<HashMap<String, Instant>>,
    /// Acknowledgements on their way to workers.
    acks: AckSender,
    /// One ticket purchase at a time per (model, worker): a burst shares it.
    buying: Mutex<HashMap<sessions::Key, Arc<tokio::sync::Mutex<()>>>>,
    /// Attempts on a worker that failed before its first frame and were
    /// tried on another worker or again (refused, busy, unreachable, a
    /// stream lost): zero in a healthy burst.
    pub skipped: std::sync::atomic::AtomicU64,
    /// A stream opened ahead to each warm worker (`spare.rs`).
    spares: Mutex<HashMap<PeerId, spare::Spare>>,
    /// The evidence of the latest answers, newest last (`evidence.rs`).
    pub evidence: Mutex<VecDeque<evidence::KeptEvidence>>,
    pub evidence_stats: evidence::EvidenceStats,
    /// Each worker's audits as this gateway saw them (`audit.rs`).
    audits: Mutex<HashMap<PeerId, audit::AuditRecord>>,
    /// Workers with a confirmed failed audit: sent no more requests.
    audit_failed: RwLock<std::collections::HashSet<PeerId>>,
    /// Audits running at once at most ([`audit::AUDITS_AT_ONCE`]): audits
    /// must not crowd out the answers they check.
    audit_slots: Arc<tokio::sync::Semaphore>,
    /// Places for audits waiting for a slot or running
    /// ([`audit::AUDITS_QUEUED`]).
    audits_queued: Arc<tokio::sync::Semaphore>,
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
    let (acks, ack_task) = AckSender::start(net.clone());
    let state = Arc::new(GatewayState {
        cfg,
        net,
        table: RwLock::new(WorkerTable::default()),
        client: client.clone(),
        breakers: Mutex::new(HashMap::new()),
        sessions: Mutex::new(sessions::SessionBook::default()),
        disputed: RwLock::new(Default::default()),
        reputation: RwLock::new(HashMap::new()),
        published_audits: RwLock::new(HashMap::new()),
        answers: Mutex::new(VecDeque::new()),
        account: crate::web::AccountView::new(client.clone()),
        warm: Mutex::new(VecDeque::new()),
        asked_coordinator: Mutex::new(HashMap::new()),
        acks,
        buying: Mutex::new(HashMap::new()),
        skipped: Default::default(),
        spares: Mutex::new(HashMap::new()),
        evidence: Mutex::new(VecDeque::new()),
        evidence_stats: Default::default(),
        audits: Mutex::new(HashMap::new()),
        audit_failed: RwLock::new(Default::default()),
        audit_slots: Arc::new(tokio::sync::Semaphore::new(audit::AUDITS_AT_ONCE)),
        audits_queued: Arc::new(tokio::sync::Semaphore::new(audit::AUDITS_QUEUED)),
    });
    crate::web::warn_if_public(http_addr, "gateway");
    let mut tasks = vec![ack_task];
    tasks.push(tokio::spawn(table_loop(state.clone(), events)));
    tasks.push(tokio::spawn(reputation_loop(state.clone())));
    let router = http::router(state.clone());
    tasks.push(tokio::spawn(async move {
        // Each streamed event goes out when it is written (no Nagle wait
        // behind the previous one's acknowledgement).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
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
                        for addr in crate::network::dialable(
                            addrs
                                .iter()
                                .filter_map(|s| s.parse::<libp2p::Multiaddr>().ok())
                                .collect(),
                        ) {
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
        if let Some(mut a) = state.published_audits.writing() {
            *a = list
                .workers
                .iter()
                .filter_map(|w| Some((w.peer_id.parse().ok()?, w.audits)))
                .collect();
        }
        let bad: std::collections::HashSet<PeerId> = list
            .workers
            .iter()
            .filter(|w| {
                // Suspended for failed audits: no ticket would be sold.
                w.suspended
                    || w.reputation.as_ref().is_some_and(|r| {
                        r.requests >= DISPUTE_MIN_REQUESTS
                            && (r.disputed_share > DISPUTE_THRESHOLD
                                || r.unacknowledged_share > DISPUTE_THRESHOLD)
                    })
            })
            .filter_map(|w| w.peer_id.parse().ok())
            .collect();
        for p in &bad {
            tracing::info!(worker = %p, "skipping a worker that is suspended or whose bills are often disputed or unacknowledged");
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
    /// The request's sampling temperature (for the evidence's checks).
    temperature: Option<f64>,
    /// The commitment of the worker's verified evidence, co-signed by the ack.
    evidence: Option<String>,
    /// The verified evidence, signed (for an audit and its report).
    evidence_signed: Option<troop_protocol::evidence::Evidence>,
    /// The worker took the request (its first frame was no refusal): only
    /// such attempts count as answers.
    answered: bool,
    /// Keeps the connection under this stream from being trimmed.
    _busy: crate::network::BusyGuard,
}

impl JobStream {
    fn saw(&mut self, f: &mut Frame) {
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
            Frame::Done {
                usage, evidence, ..
            } => {
                if let Some(e) = evidence.take() {
                    // Kept for an audit only when audits are on.
                    let signed = self.state.cfg.audit.then(|| e.clone());
                    self.evidence = self.state.on_evidence(
                        evidence::AnswerOf {
                            worker: self.worker,
                            job_id: &self.job_id,
                            index: self.index,
                            model: &self.model,
                            temperature: self.temperature,
                        },
                        e,
                    );
                    if self.evidence.is_some() {
                        self.evidence_signed = signed;
                    }
                }
                self.completion_tokens = Some(usage.completion_tokens);
                self.last_frame = Some(Instant::now());
            }
            _ => {}
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
        let ack = troop_protocol::usage::Ack::sign_with_evidence(
            &self.state.cfg.identity,
            &self.job_id,
            &self.worker.to_base58(),
            self.index,
            self.chunks,
            self.completion_tokens.unwrap_or(self.chunks),
            observed_ms,
            self.evidence.as_deref(),
        );
        if self.answered {
            self.record();
        }
        self.state.acks.send(self.worker, ack);
        let idle = match self.state.table.writing() {
            Some(mut t) => {
                t.add_inflight(&self.worker, -1);
                t.inflight(&self.worker) == 0
            }
            None => false,
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
            Ok(Ok(mut f)) => {
                if let Some(f) = &mut f {
                    self.saw(f);
                }
                Ok(f)
            }
            Ok(Err(e)) => Err(format!("the worker's stream broke: {e}")),
            Err(_) => Err(format!("the worker sent nothing for {} s", idle.as_secs())),
        }
    }
}

/// What the gateway reads of a pass-through body: whether it asks for a
/// stream, and its sampling temperature.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub struct BodyShape {
    pub stream: Option<bool>,
    pub temperature: Option<f64>,
    // What makes a server choose other than the likeliest token even at
    // temperature 0 (its logprobs are the model's, before these apply).
    grammar: Option<serde::de::IgnoredAny>,
    json_schema: Option<serde::de::IgnoredAny>,
    response_format: Option<serde::de::IgnoredAny>,
    tools: Option<serde::de::IgnoredAny>,
    logit_bias: Option<serde::de::IgnoredAny>,
    presence_penalty: Option<serde::de::IgnoredAny>,
    frequency_penalty: Option<serde::de::IgnoredAny>,
    repeat_penalty: Option<serde::de::IgnoredAny>,
}

impl BodyShape {
    /// The temperature the evidence's checks may assume: `None` when
    /// something besides the model's own numbers steers the choice.
    pub fn plain_temperature(&self) -> Option<f64> {
        let steered = self.grammar.is_some()
            || self.json_schema.is_some()
            || self.response_format.is_some()
            || self.tools.is_some()
            || self.logit_bias.is_some()
            || self.presence_penalty.is_some()
            || self.frequency_penalty.is_some()
            || self.repeat_penalty.is_some();
        self.temperature.filter(|_| !steered)
    }

    /// The answer comes as a stream (embeddings never do).
    pub fn streamed(&self, endpoint: Option<Endpoint>) -> bool {
        self.stream.unwrap_or(false) && endpoint != Some(Endpoint::Embeddings)
    }
}

pub fn body_shape(request: &InferenceRequest) -> BodyShape {
    request
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str::<BodyShape>(b).ok())
        .unwrap_or_default()
}

use troop_protocol::policy::unix_ms as unix_now_ms;
