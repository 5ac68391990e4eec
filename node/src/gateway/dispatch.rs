//! Dispatch: the candidates for a model (by score, or the coordinator's
//! list), each worker's breaker permit, the session a request goes under,
//! and the attempt on one worker with why it was skipped ([`Skip`]).

use super::*;

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
    Rejected {
        status: u16,
        body: String,
        /// The worker's signed statement of the refusal (audits use it).
        refusal: Option<Box<troop_protocol::audit::Refusal>>,
    },
}

impl GatewayState {
    /// The worker could not be dialled: it leaves the table (and
    /// `/v1/models`) until it advertises again.
    pub(super) fn unreachable(&self, peer: PeerId) {
        tracing::info!(worker = %peer, "worker unreachable; dropped from the table until it advertises again");
        if let Some(mut t) = self.table.writing() {
            t.mark_unreachable(&peer);
        }
    }

    /// A permit to try `peer`, or `None` while its breaker is open (or its
    /// one half-open trial is out). The permit records an outcome when
    /// told, and is given back without one when dropped (a final answer
    /// that is not the worker's fault, an app that hung up mid-dispatch).
    pub(super) fn breaker_permit(&self, peer: &PeerId) -> Option<BreakerPermit<'_>> {
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
    pub async fn candidates(
        &self,
        model: &str,
        embeddings: bool,
        pin: Option<&str>,
    ) -> Vec<PeerId> {
        let mut found = self.candidates_by_score(model, embeddings, pin).await;
        if let Some(d) = self.disputed.reading() {
            found.retain(|p| !d.contains(p));
        }
        if let Some(d) = self.audit_failed.reading() {
            found.retain(|p| !d.contains(p));
        }
        found.sort_by_key(|p| self.net.path(p).rank());
        found
    }

    pub(super) async fn candidates_by_score(
        &self,
        model: &str,
        embeddings: bool,
        pin: Option<&str>,
    ) -> Vec<PeerId> {
        let found = self
            .table
            .reading()
            .map(|t| t.candidates_for(model, embeddings, pin))
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
            t.candidates_for(model, embeddings, pin)
        } else {
            providers
        }
    }

    /// The live workers the coordinator knows for `model` (`GET
    /// /bootstrap?model=`), their addresses learnt and a dial started. At
    /// most one such read per model every 10 s (the coordinator counts them
    /// against this IP's discovery quota).
    pub(super) async fn workers_from_coordinator(&self, model: &str) -> Vec<PeerId> {
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
            let addrs: Vec<libp2p::Multiaddr> = network::dialable(
                p.addresses
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    // An address naming another peer is not this worker's.
                    .filter(|a| network::peer_of(a).is_none_or(|p| p == peer))
                    .collect(),
            );
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
            let mut candidates = self
                .candidates(&request.model, embeddings, request.digest.as_deref())
                .await;
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
            let mut left: Vec<(PeerId, u8)> = candidates
                .into_iter()
                .map(|p| (p, self.net.path(&p).rank()))
                .collect();
            while let Some(mut claim) = self.claim_next(&mut left) {
                let worker = claim.worker;
                let Some(permit) = self.breaker_permit(&worker) else {
                    continue;
                };
                match self.try_worker(&mut claim, &request).await {
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
                        self.skipped
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        metrics::counter!("troop_gateway_workers_skipped_total").increment(1);
                        permit.record(false);
                        last_error = reason;
                    }
                }
            }
            if !ever_found {
                return Err(DispatchError::UnknownModel(match &request.digest {
                    Some(pin) => format!("{}@{pin}", request.model),
                    None => request.model.clone(),
                }));
            }
            match delays.next() {
                Some(d) => tokio::time::sleep(d).await,
                None => return Err(DispatchError::NoWorker(last_error)),
            }
        }
    }

    /// Takes a place on the best worker left in `left` (by path, then
    /// score with the places already taken) and removes it from `left`.
    fn claim_next(self: &Arc<Self>, left: &mut Vec<(PeerId, u8)>) -> Option<Claim> {
        let i = match self.table.writing() {
            Some(mut t) => t.claim_best(left)?,
            None if left.is_empty() => return None,
            None => 0,
        };
        let (worker, _) = left.remove(i);
        Some(Claim {
            state: self.clone(),
            worker,
            held: true,
        })
    }

    /// Takes a place on `worker` (an audit names its auditor).
    pub(super) fn claim_on(self: &Arc<Self>, worker: PeerId) -> Claim {
        if let Some(mut t) = self.table.writing() {
            t.add_inflight(&worker, 1);
        }
        Claim {
            state: self.clone(),
            worker,
            held: true,
        }
    }

    /// The session to send a request to `worker` under: the open one, else
    /// the one bought ahead, else a new one. Returns the ticket, the
    /// request's index in the session and whether the session was in use
    /// before.
    pub(super) async fn session_for(
        self: &Arc<Self>,
        model: &str,
        worker: PeerId,
    ) -> Result<(AuthorizeResponse, u32, bool), ClientError> {
        let key = (model.to_string(), worker);
        let open = || {
            self.sessions
                .locked()
                .map(|mut b| b.next(&key, unix_now_ms()))
        };
        if let Some((sessions::Next::Open { auth, index }, reused)) = open() {
            return Ok((auth, index, reused));
        }
        // One ticket per (model, worker) is bought at a time: a burst of
        // requests with no session open waits for the first one's ticket
        // and shares its session (one reservation, one ticket check at the
        // worker) instead of buying one each.
        let gate = self
            .buying
            .locked()
            .map(|mut m| m.entry(key.clone()).or_default().clone());
        let turn = match gate.clone() {
            Some(g) => Some(g.lock_owned().await),
            None => None,
        };
        let bought = async {
            if let Some((sessions::Next::Open { auth, index }, reused)) = open() {
                return Ok((auth, index, reused));
            }
            let auth = self
                .client
                .authorize(model, &worker.to_base58(), None)
                .await?;
            metrics::counter!("troop_tickets_bought_total", "when" => "now").increment(1);
            if let Some(mut b) = self.sessions.locked() {
                b.opened(key.clone(), auth.clone(), unix_now_ms());
            }
            Ok((auth, 0, false))
        }
        .await;
        drop(turn);
        // The last one through forgets the gate.
        if let Some(g) = gate
            && let Some(mut m) = self.buying.locked()
            && Arc::strong_count(&g) <= 2
        {
            m.remove(&key);
        }
        bought
    }

    pub(super) fn drop_session(&self, model: &str, worker: PeerId, job_id: &str) {
        if let Some(mut b) = self.sessions.locked() {
            b.closed(&(model.to_string(), worker), job_id);
        }
    }

    /// Buys the next session for (model, worker) in the background when the
    /// open one nears its expiry.
    pub(super) fn renew_ahead(self: &Arc<Self>, model: &str, worker: PeerId) {
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

    pub(super) async fn try_worker(
        self: &Arc<Self>,
        claim: &mut Claim,
        request: &InferenceRequest,
    ) -> Result<JobStream, Attempt> {
        let worker = claim.worker;
        // A session the worker already closed (idle) is refused: then one
        // more try with a new session. The stream is opened before the
        // ticket is bought, so a worker that cannot be reached costs no
        // reservation.
        // Up to two sessions, and one more try when the spare stream
        // turned out closed.
        let mut spare_ok = true;
        for _ in 0..3 {
            claim.hold();
            // From before the stream opens: the connection it goes out on
            // is not trimmed while the ticket is bought.
            let busy = self.net.busy(worker);
            let spare = if spare_ok {
                self.take_spare(&worker)
            } else {
                None
            };
            let from_spare = spare.is_some();
            let stream = match spare {
                Some(s) => s,
                None => self.open_to(worker).await?,
            };
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
                .send_request(claim, stream, busy, request, &auth, index)
                .await
            {
                Err(Attempt::Next(reason)) if reused && reason.is_unauthorized() => {
                    tracing::debug!(%worker, %reason, "session closed by the worker; opening a new one");
                    self.drop_session(&request.model, worker, &auth.job_id);
                    continue;
                }
                // The spare was closed under us (the connection went, the
                // worker gave up waiting): the request never reached the
                // worker, so it goes again on a new stream.
                Err(Attempt::Next(reason)) if from_spare && reason.is_lost_stream() => {
                    tracing::debug!(%worker, %reason, "spare stream closed; opening a new one");
                    spare_ok = false;
                    continue;
                }
                other => return other,
            }
        }
        Err(Attempt::Next(Skip::TwoSessions))
    }

    /// Opens an inference stream to `worker` (dialling it if need be). A
    /// worker that cannot be reached leaves the table.
    pub(super) async fn open_to(&self, worker: PeerId) -> Result<libp2p::Stream, Attempt> {
        let open = tokio::time::timeout(
            DISCOVERY_TIMEOUT,
            self.net
                .open_stream(worker, StreamProtocol::new(INFER_PROTOCOL)),
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

    pub(super) async fn send_request(
        self: &Arc<Self>,
        claim: &mut Claim,
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
        let worker = claim.worker;
        // The job holds the claimed place from here (its drop gives it back).
        claim.hand_over();
        self.keep_warm(worker);
        self.open_spare(worker);
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
            temperature: None,
            evidence: None,
            evidence_signed: None,
            answered: false,
            _busy: busy,
        };
        // Read while the worker works on the request.
        let shape = body_shape(request);
        job.temperature = shape.plain_temperature();
        // A whole (non-streamed) answer comes in one go when it is ready.
        let first_wait = if request.body.is_some() && !shape.streamed(request.endpoint) {
            troop_protocol::policy::INFERENCE_TIMEOUT
        } else {
            self.cfg.first_token_timeout
        };
        match job.next(first_wait).await {
            Ok(Some(Frame::Error {
                code,
                status,
                body,
                refusal,
                ..
            })) if code == ErrorCode::UpstreamRejected.number() => {
                Err(Attempt::Final(DispatchError::Rejected {
                    status: status.filter(|s| (400..500).contains(s)).unwrap_or(400),
                    body: body.unwrap_or_default(),
                    refusal: refusal.map(Box::new),
                }))
            }
            Ok(Some(Frame::Error {
                code,
                message,
                refusal,
                ..
            })) => Err(Attempt::Next(Skip::Refused {
                code: ErrorCode::from_number(code),
                message,
                refusal: refusal.map(Box::new),
            })),
            Ok(Some(first)) => {
                job.first = first;
                job.answered = true;
                self.renew_ahead(&request.model, worker);
                Ok(job)
            }
            Ok(None) => Err(Attempt::Next(Skip::Closed)),
            Err(e) => Err(Attempt::Next(Skip::NoAnswer(e))),
        }
    }
}

/// A place taken on a worker for one request, from the moment the worker
/// is chosen (so that a burst spreads by free slots, see
/// [`WorkerTable::claim_best`](super::table::WorkerTable::claim_best)) until
/// the request is sent, when its [`JobStream`] holds it; given back when the
/// attempt fails.
pub(super) struct Claim {
    state: Arc<GatewayState>,
    pub(super) worker: PeerId,
    held: bool,
}

impl Claim {
    /// Takes the place again for a second try on the same worker.
    fn hold(&mut self) {
        if !self.held {
            if let Some(mut t) = self.state.table.writing() {
                t.add_inflight(&self.worker, 1);
            }
            self.held = true;
        }
    }

    /// The job counts the place from now.
    fn hand_over(&mut self) {
        self.held = false;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.held
            && let Some(mut t) = self.state.table.writing()
        {
            t.add_inflight(&self.worker, -1);
        }
    }
}

pub(super) enum Attempt {
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
    /// The worker closed the stream without a frame.
    Closed,
    /// The worker refused with a frame error.
    Refused {
        code: Option<ErrorCode>,
        message: String,
        /// The worker's signed statement, when its model server refused.
        refusal: Option<Box<troop_protocol::audit::Refusal>>,
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
            Skip::Closed => f.write_str("no answer: the worker closed the stream"),
            Skip::Refused { code, message, .. } => write!(
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
            Skip::NoAnswer(_) | Skip::Closed => "the worker did not answer in time",
            Skip::Unreachable(_) | Skip::NoneTried => {
                "the workers that serve this model could not be reached (they may have stopped)"
            }
        }
    }

    /// The stream was gone before the worker could have read the request:
    /// it could not be written, or closed without a frame.
    pub(super) fn is_lost_stream(&self) -> bool {
        matches!(self, Skip::Unreachable(_) | Skip::Closed)
    }

    pub(super) fn is_unauthorized(&self) -> bool {
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
pub(super) struct BreakerPermit<'a> {
    breakers: &'a Mutex<HashMap<PeerId, CircuitBreaker<SystemClock>>>,
    peer: PeerId,
    settled: bool,
}

impl BreakerPermit<'_> {
    pub(super) fn record(mut self, ok: bool) {
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
