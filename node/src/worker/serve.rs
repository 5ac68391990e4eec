//! Serving `/troop/infer/1` streams: the ticket check, a place in the
//! session book for each request, the job on the upstream, and the
//! sessions closed and filed as receipts.

use super::*;

/// Streams of one peer whose tickets are read and checked at once; the
/// peer's further streams wait their turn (they are not reset: a paying
/// gateway's burst is served, not retried after a pause).
pub(super) const UNCHECKED_PER_PEER: u32 = 16;
/// Streams one peer may have waiting for a ticket check (checking or
/// waiting their turn); beyond it its new streams are reset at once.
pub(super) const WAITING_PER_PEER: u32 = 512;
/// Streams all peers together may have waiting for a ticket check.
pub(super) const UNCHECKED_TOTAL: u32 = 1024;
/// Longest a stream waits its turn for a ticket check: a paying
/// gateway's burst gets its turns within milliseconds (each check frees
/// one), while a peer holding its checks with streams that send nothing
/// sees its further streams reset soon.
const CHECK_WAIT: Duration = Duration::from_secs(2);

/// A peer's streams waiting for a ticket check, and the turns they take.
pub(super) struct PeerGate {
    waiting: u32,
    turns: Arc<tokio::sync::Semaphore>,
}

/// A place among the streams whose ticket is not checked yet.
pub(super) struct Unchecked {
    s: Arc<Shared>,
    peer: PeerId,
    turns: Arc<tokio::sync::Semaphore>,
}

impl Unchecked {
    fn take(s: &Arc<Shared>, peer: PeerId) -> Option<Self> {
        let mut m = s.unchecked.locked()?;
        let total: u32 = m.values().map(|g| g.waiting).sum();
        let mine = m.get(&peer).map_or(0, |g| g.waiting);
        if total >= UNCHECKED_TOTAL || mine >= WAITING_PER_PEER {
            metrics::counter!("troop_limit_hits_total", "limit" => "unchecked_streams")
                .increment(1);
            return None;
        }
        let g = m.entry(peer).or_insert_with(|| PeerGate {
            waiting: 0,
            turns: Arc::new(tokio::sync::Semaphore::new(UNCHECKED_PER_PEER as usize)),
        });
        g.waiting += 1;
        Some(Self {
            s: s.clone(),
            peer,
            turns: g.turns.clone(),
        })
    }

    /// Waits for this stream's turn among its peer's ticket checks.
    async fn turn(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(CHECK_WAIT, self.turns.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

impl Drop for Unchecked {
    fn drop(&mut self) {
        if let Some(mut m) = self.s.unchecked.locked()
            && let Some(g) = m.get_mut(&self.peer)
        {
            g.waiting = g.waiting.saturating_sub(1);
            if g.waiting == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

pub(super) async fn accept_loop(s: Arc<Shared>, mut incoming: libp2p_stream::IncomingStreams) {
    while let Some((peer, stream)) = incoming.next().await {
        // Before any ticket is checked a stream costs only a bounded place;
        // over the bound it is dropped (reset) at once.
        let Some(place) = Unchecked::take(&s, peer) else {
            tracing::debug!(%peer, "too many streams waiting for a ticket check; reset");
            s.stats.streams_reset.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let s = s.clone();
        tokio::spawn(async move {
            // The connection under a job is not trimmed while it runs.
            let _busy = s.net.busy(peer);
            let killed = s.killed.clone();
            tokio::select! {
                r = async {
                    // A peer's checks run a few at a time; its other
                    // streams wait here, in order.
                    let Some(turn) = place.turn().await else {
                        tracing::debug!(%peer, "a stream waited too long for its ticket check; reset");
                        s.stats.streams_reset.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    };
                    serve_stream(s, peer, stream, (place, turn)).await
                } => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "stream ended with an error");
                    }
                }
                _ = killed.cancelled() => {}
            }
        });
    }
}

pub(super) async fn refuse(
    s: &Shared,
    stream: &mut libp2p::Stream,
    code: ErrorCode,
    message: String,
) -> anyhow::Result<()> {
    metrics::counter!("troop_jobs_refused_total", "code" => code.as_str()).increment(1);
    s.stats.requests_refused.fetch_add(1, Ordering::Relaxed);
    write_frame(stream, &Frame::error(code, message)).await?;
    let _ = futures::AsyncWriteExt::close(stream).await;
    Ok(())
}

pub(super) async fn serve_stream(
    s: Arc<Shared>,
    peer: PeerId,
    mut stream: libp2p::Stream,
    place: (Unchecked, tokio::sync::OwnedSemaphorePermit),
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
                &s,
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
                    &s,
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
            &s,
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
            return refuse(&s, &mut stream, ErrorCode::Unauthorized, e).await;
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
            &s,
            &mut stream,
            ErrorCode::BadRequest,
            "the ticket is for another model".into(),
        )
        .await;
    }
    let served = s
        .models
        .reading()
        .and_then(|m| m.iter().find(|m| m.name == request.model).cloned());
    let Some(served) = served else {
        guard.abandon();
        return refuse(
            &s,
            &mut stream,
            ErrorCode::UnknownModel,
            format!("this worker does not serve {}", request.model),
        )
        .await;
    };
    if let Some(pin) = &request.digest
        && !troop_protocol::advert::digest_matches(served.digest.as_deref(), pin)
    {
        guard.abandon();
        return refuse(
            &s,
            &mut stream,
            ErrorCode::UnknownModel,
            format!(
                "this worker serves {} as {}, not {pin}",
                request.model,
                served
                    .digest
                    .as_deref()
                    .unwrap_or("weights of unknown digest")
            ),
        )
        .await;
    }
    let Ok(permit) = s.jobs.clone().try_acquire_owned() else {
        guard.abandon();
        return refuse(
            &s,
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
            s.cfg.evidence.then_some(crate::answer::Signer {
                key: &s.cfg.identity,
                index,
            }),
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
            (served.usage, served.chunks, served.commitment)
        })
    } else {
        run_job(&s, &mut stream, &request, &claims.jti)
            .await
            .map(|(u, c)| (u, c, None))
    };
    s.stats.active_jobs.fetch_sub(1, Ordering::Relaxed);
    metrics::gauge!("troop_jobs_running").decrement(1.0);
    drop(permit);
    let (status, usage, chunks, commitment) = match result {
        Ok((u, c, e)) => (LineStatus::Completed, u, c, e),
        Err(JobEnd::Cancelled(u)) => (LineStatus::Cancelled, u, u.completion_tokens, None),
        Err(JobEnd::Failed { usage, rejected }) => {
            if rejected {
                metrics::counter!("troop_jobs_rejected_by_upstream_total").increment(1);
            }
            (LineStatus::Failed, usage, usage.completion_tokens, None)
        }
    };
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
    guard.finish(status, usage, chunks, commitment);
    Ok(())
}

/// A request's place in its session; dropped without `finish` (the task
/// was cancelled) it is recorded as cancelled with nothing served.
pub(super) struct RequestGuard {
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
        match self.s.sessions.lock() {
            Ok(mut book) => book.abandon(&self.jti, self.index, unix_ms()),
            Err(_) => tracing::error!("the session book's lock is poisoned"),
        }
    }

    fn finish(
        mut self,
        status: LineStatus,
        usage: troop_protocol::frames::Usage,
        chunks: u64,
        commitment: Option<String>,
    ) {
        self.done = true;
        self.record(status, usage, chunks, commitment);
    }

    fn record(
        &self,
        status: LineStatus,
        usage: troop_protocol::frames::Usage,
        chunks: u64,
        commitment: Option<String>,
    ) {
        match self.s.sessions.lock() {
            Ok(mut book) => {
                let line = book.finish(
                    &self.jti,
                    self.index,
                    self.started_ms,
                    unix_ms(),
                    session::LineEnd {
                        status,
                        usage,
                        chunks,
                        commitment: commitment.clone(),
                    },
                );
                if let Some(line) = line {
                    journal(
                        &self.s,
                        &mut book,
                        &self.jti,
                        journal::Entry::Line { line, commitment },
                    );
                }
            }
            Err(_) => {
                tracing::error!(job = %self.jti, "the session book's lock is poisoned; a line is lost")
            }
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.done {
            self.record(LineStatus::Cancelled, Default::default(), 0, None);
        }
    }
}

/// Finds the session of `ticket` (or opens one, verifying the ticket) and
/// takes a place in it for request `index`.
pub(super) async fn open_session(
    s: &Arc<Shared>,
    ticket: &str,
    index: u32,
) -> Result<troop_protocol::ticket::TicketClaims, String> {
    let full = s.cfg.max_session_requests;
    let joined = {
        let mut book = s.sessions.lock().map_err(|_| "session book poisoned")?;
        book.join(ticket, index, unix_ms(), full)?.map(|c| {
            let seq = book.journaled(&c.jti);
            (c, seq)
        })
    };
    if let Some((claims, seq)) = joined {
        // The crash rule: the session's earlier lines and acks are on
        // disk before it serves another request.
        s.journal.durable(seq).await;
        return Ok(claims);
    }
    // Checked without consuming its jti: a burst's requests under one new
    // ticket all check it; the first to get here opens the session, the
    // others join it (before, the second request's check found the jti
    // used and was refused).
    let claims = match verify_ticket(s, ticket).await {
        Ok(c) => c,
        // Another request of the burst opened the session since this one
        // looked (its jti is consumed with the session open, under the
        // book's lock): join it.
        Err(TicketError::Reused(jti)) => {
            let mut book = s.sessions.lock().map_err(|_| "session book poisoned")?;
            return match book.join(ticket, index, unix_ms(), full)? {
                Some(c) => Ok(c),
                None => Err(TicketError::Reused(jti).to_string()),
            };
        }
        Err(e) => return Err(e.to_string()),
    };
    let multiplier_milli = s
        .multiplier
        .reading()
        .map(|m| (*m * 1000.0).round() as i64)
        .unwrap_or(1000)
        .max(1);
    let limit_ms =
        u64::try_from(claims.reserved_milli.max(0).saturating_mul(1000) / multiplier_milli)
            .unwrap_or(0);
    let mut verifier = s.verifier.lock().await;
    let mut book = s.sessions.lock().map_err(|_| "session book poisoned")?;
    let now = unix_ms();
    if let Some(c) = book.join(ticket, index, now, full)? {
        return Ok(c);
    }
    verifier
        .consume(&claims, now / 1000)
        .map_err(|e| e.to_string())?;
    drop(verifier);
    let opened = book.open(ticket, claims.clone(), limit_ms, index, now, full)?;
    if book.journaled(&opened.jti) == 0 {
        journal(
            s,
            &mut book,
            &opened.jti,
            journal::Entry::Open {
                ticket: ticket.to_string(),
                claims,
                limit_ms,
                at_ms: now,
            },
        );
    }
    Ok(opened)
}

/// Hands an entry of an open session to the journal (under the book's
/// lock, so entries reach the writer in the book's order).
fn journal(s: &Shared, book: &mut SessionBook, jti: &str, entry: journal::Entry) {
    let exp = book.exp(jti).unwrap_or(0);
    let seq = s.journal.append(jti, &entry, exp);
    book.set_journaled(jti, seq);
}

/// Keeps a user's acknowledgement for the session's receipt.
pub(super) fn record_ack(s: &Shared, peer: PeerId, ack: Ack) {
    let (job, index) = (ack.job_id.clone(), ack.index);
    let outcome = match s.sessions.lock() {
        Ok(mut book) => {
            let kept = ack.clone();
            let outcome = book.ack(ack, &s.peer_id.to_base58());
            if outcome == session::AckOutcome::Kept {
                journal(s, &mut book, &job, journal::Entry::Ack { ack: kept });
            }
            outcome
        }
        Err(_) => {
            tracing::error!("the session book's lock is poisoned; an acknowledgement is lost");
            return;
        }
    };
    match outcome {
        session::AckOutcome::Kept => {}
        session::AckOutcome::NoSession => {
            tracing::debug!(%peer, %job, "acknowledgement for no open session");
        }
        session::AckOutcome::Refused => {
            metrics::counter!("troop_bad_acks_total").increment(1);
            tracing::info!(%peer, %job, index, "acknowledgement refused");
        }
    }
}

/// Closes sessions that are idle, expired or used up, and files their
/// receipts (after a short grace for the last acknowledgements).
pub(super) async fn session_loop(s: Arc<Shared>) {
    let idle = s.cfg.session_idle;
    let rules = CloseRules {
        idle_ms: idle.as_millis() as u64,
        grace_ms: idle.min(Duration::from_secs(2)).as_millis() as u64,
        max_requests: s.cfg.max_session_requests,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250).min(idle));
    loop {
        tick.tick().await;
        let due = match s.sessions.lock() {
            Ok(mut book) => book.close_due(unix_ms(), rules),
            Err(_) => {
                tracing::error!("the session book's lock is poisoned; sessions stay open");
                Vec::new()
            }
        };
        for sess in due {
            file_session(&s, sess).await;
        }
    }
}

pub(super) async fn file_session(s: &Shared, sess: session::Session) {
    let (jti, exp) = (sess.claims.jti.clone(), sess.claims.exp);
    let filed = match session::receipt(sess, &s.peer_id.to_base58()) {
        Some(receipt) => enqueue_receipt(s, receipt).await,
        None => true,
    };
    // Only once the receipt is in the queue (or there is none): a crash
    // before this opens the session again at the next start.
    if filed {
        s.journal
            .append(&jti, &journal::Entry::Closed { at_ms: unix_ms() }, exp);
    }
}

/// Writes a closed session's receipt to the queue; false when the disk
/// refused it (the session's journal then stays open for the next start).
async fn enqueue_receipt(s: &Shared, receipt: troop_protocol::receipt::Receipt) -> bool {
    tracing::info!(
        job = %receipt.job_id,
        requests = receipt.requests.len(),
        acknowledged = receipt.requests.iter().filter(|l| l.ack.is_some()).count(),
        "session closed; receipt filed"
    );
    let job = receipt.job_id.clone();
    if let Err(e) = s.receipts.enqueue_async(receipt).await {
        tracing::error!(error = %e, %job, "could not write the receipt");
        return false;
    }
    true
}

pub(super) async fn run_job(
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
                    evidence: None,
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

pub(super) trait MaxWith {
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
