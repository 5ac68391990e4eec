//! The worker and its coordinator: heartbeats behind a breaker, the proof
//! of hardware at start and the re-proofs the coordinator asks for, and the ticket keys (fetched again for an unknown
//! `kid`, at most every few seconds).

use super::*;

/// Least time between two fetches of the coordinator's key for an unknown
/// `kid` (any peer can send one).
pub(super) const KEY_REFRESH_EVERY: Duration = Duration::from_secs(10);
/// Proves the hardware once at start (off the event loop: the matmul runs
/// on a blocking thread while the node keeps serving).
pub(super) async fn benchmark_task(s: Arc<Shared>) {
    let Some(backend) = s.cfg.benchmark else {
        return;
    };
    let _one_at_a_time = s.proving.lock().await;
    let r = crate::hardware::prove_to_coordinator(&s.client, backend).await;
    record_proof(&s, r, false);
}

/// Answers a re-proof the coordinator asked for in a heartbeat's answer,
/// while the worker keeps serving; after the proof running, if one is (the
/// deadline leaves room for both).
pub(super) async fn reproof_task(s: Arc<Shared>, c: troop_protocol::api::BenchChallenge) {
    let _one_at_a_time = s.proving.lock().await;
    let backend = s
        .cfg
        .benchmark
        .unwrap_or(troop_bench_kernels::Backend::Auto);
    tracing::info!(challenge = %c.challenge_id, "the coordinator asked for a fresh proof of hardware");
    if let Some(mut p) = s.proof.locked() {
        p.state = "running";
    }
    let r = crate::hardware::answer_challenge(&s.client, c, backend).await;
    record_proof(&s, r, true);
}

fn record_proof(s: &Shared, r: anyhow::Result<crate::hardware::Verified>, reproof: bool) {
    match r {
        Ok(v) => {
            tracing::info!(
                gflops = v.gflops,
                multiplier = v.multiplier,
                backend = v.backend,
                adapter = v.adapter.as_deref().unwrap_or("-"),
                reproof,
                "hardware verified by the coordinator"
            );
            if let Some(mut slot) = s.multiplier.writing() {
                *slot = v.multiplier;
            }
            if let Some(mut p) = s.proof.locked() {
                let reproofs = p.reproofs + u64::from(reproof);
                *p = ProofStatus {
                    state: "verified",
                    gflops: Some(v.gflops),
                    multiplier: Some(v.multiplier),
                    error: None,
                    at_ms: Some(unix_ms()),
                    backend: Some(v.backend),
                    adapter: v.adapter,
                    fallback: v.fallback,
                    reproofs,
                };
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, reproof, "proof of hardware failed");
            if let Some(mut p) = s.proof.locked() {
                p.state = "failed";
                p.error = Some(format!("{e:#}"));
                p.at_ms = Some(unix_ms());
            }
        }
    }
}

pub(super) async fn heartbeat_loop(s: Arc<Shared>) {
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
            models: Some(served_models(&s).into_iter().map(|m| m.name).collect()),
            addresses: Some(s.net.advertised_addrs()),
            load: Load {
                active_jobs: active,
                queue_depth: 0,
            },
        };
        match s.client.heartbeat(&req).await {
            Ok(answer) => {
                if let Some(c) = answer.reproof {
                    tokio::spawn(reproof_task(s.clone(), c));
                }
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

pub(super) fn set_breaker(s: &Shared, st: BreakerState) {
    if let Some(mut b) = s.stats.breaker.locked() {
        *b = format!("{st:?}").to_lowercase();
    }
}

/// Adds the coordinator's other accepted ticket keys (its JWKS) to
/// `verifier`, keeping those it has.
pub(super) async fn add_previous_keys(client: &CoordinatorClient, verifier: &mut TicketVerifier) {
    match client.ticket_keys().await {
        Ok(keys) => add_jwks(verifier, keys),
        Err(e) => tracing::debug!(error = %e, "no JWKS from the coordinator"),
    }
}

/// What a key refresh brought: the JWKS naming the kid sought, or else
/// the coordinator's current key (`/public-key`).
pub(super) enum FetchedKeys {
    Jwks(Vec<(String, String, String)>),
    Current(crate::coordinator_client::PublicKey),
}

/// Adds JWKS entries (kid, n, e) the verifier does not know yet.
pub(super) fn add_jwks(verifier: &mut TicketVerifier, keys: Vec<(String, String, String)>) {
    for (kid, n, e) in keys {
        if !verifier.knows_kid(&kid)
            && let Err(err) = verifier.add_key_components(&kid, &n, &e)
        {
            tracing::warn!(kid, error = %err, "unusable coordinator key");
        }
    }
}

/// Checks a ticket (signature, audience, times, not used yet), fetching
/// a rotated coordinator key when needed; does not consume its jti (the
/// session's opening does, under the book's lock).
pub(super) async fn verify_ticket(
    s: &Shared,
    token: &str,
) -> Result<troop_protocol::ticket::TicketClaims, TicketError> {
    let now = unix_secs();
    let first = s.verifier.lock().await.check(token, now);
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
            v.check(token, unix_secs())
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
