//! Proof of hardware, the coordinator's side.
//!
//! 1. `POST /bench/challenge` (signed by a registered worker): a fresh seed,
//!    the size, the rounds and a deadline. The clock starts now.
//! 2. `POST /bench/submit` with `{challenge_id, root}`: the clock stops (the
//!    throughput is measured here, never taken from the worker), and the
//!    answer names the rows to open: 132 random rows (see
//!    `troop_bench_kernels::verify::SAMPLES`).
//! 3. `POST /bench/submit` with `{challenge_id, openings}`: each row is
//!    checked against the root and recomputed from the seed. Only then are
//!    `verified_gflops` and the multiplier recorded.
//!
//! Multiplier: `clamp(verified_gflops / reference_gflops, 0.5, 8.0)`,
//! rounded to a thousandth, with `reference_gflops = 100` by default (a
//! recent desktop CPU). A worker that never proves keeps 1.0.
//!
//! Re-proofs (issue 28): a worker with a standing proof is asked for a
//! fresh one at random (a Poisson process, on average every
//! `--reproof-mean-secs`, 6 h), in a heartbeat's answer. Its figure is then
//! set to the new one when that is lower than the standing one by more than
//! `reproof_tolerance` (25 %) or higher; a re-proof missed (deadline) or
//! failed takes the proof away: no verified figure, the multiplier at most
//! 1.0. Each outcome is an audit event.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use serde::Deserialize;
use serde_json::json;
use troop_bench_kernels::Challenge;
use troop_bench_kernels::verify::{self, Opening, SAMPLES};
use troop_protocol::ErrorCode;
use troop_protocol::api::{BenchChallenge, BenchRows, BenchVerdict};

use crate::http::error::ApiError;
use crate::http::extract::Signed;
use crate::http::extract::{ledger_error, security_event};
use crate::ledger::{Command, Outcome};
use crate::{AppState, unix_ms, unix_secs};

/// A round in progress (in this process with SQLite; in PostgreSQL, where
/// every replica sees it, when replicas share the ledger).
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct Pending {
    pub worker: String,
    pub challenge: Challenge,
    /// Unix milliseconds: replicas' clocks, not one process's.
    pub issued_ms: u64,
    pub deadline_ms: u64,
    /// Set when the root arrived: (root, seconds on our clock, rows asked).
    pub committed: Option<(String, f64, Vec<usize>)>,
    /// Asked by the coordinator (a re-proof), not by the worker.
    #[serde(default)]
    pub reproof: bool,
    /// What the worker says computed it: backend and adapter.
    #[serde(default)]
    pub proved_on: Option<(String, Option<String>)>,
}

/// Where rounds in progress are kept.
mod rounds {
    use super::*;
    use crate::ledger::LedgerError;
    use crate::p;

    fn poisoned() -> LedgerError {
        LedgerError::Storage("challenge table poisoned".into())
    }

    pub async fn put(state: &Arc<AppState>, id: String, p: Pending) -> Result<(), LedgerError> {
        if state.shared() {
            let json =
                serde_json::to_string(&p).map_err(|e| LedgerError::Storage(e.to_string()))?;
            let deadline = i64::try_from(p.deadline_ms).unwrap_or(i64::MAX);
            return state
                .read_with(move |db| {
                    db.exec(
                        "INSERT INTO bench_challenges (id, worker, pending, deadline_ms) VALUES (?1, ?2, ?3, ?4)",
                        p![&id, &p.worker, json, deadline],
                    )
                    .map(|_| ())
                })
                .await;
        }
        let now = unix_ms();
        let mut c = state.challenges.lock().map_err(|_| poisoned())?;
        // Re-proofs past their deadline stay until the sweeper takes the
        // proof away (`sweep_missed`).
        c.retain(|_, p| p.deadline_ms > now || p.reproof);
        c.insert(id, p);
        Ok(())
    }

    pub async fn get(state: &Arc<AppState>, id: &str) -> Result<Option<Pending>, LedgerError> {
        if state.shared() {
            let id = id.to_string();
            let row = state
                .read_with(move |db| {
                    db.query_opt(
                        "SELECT pending FROM bench_challenges WHERE id = ?1",
                        p![&id],
                    )
                })
                .await?;
            return row
                .map(|r| {
                    serde_json::from_str(&r.str(0)?)
                        .map_err(|e| LedgerError::Storage(format!("a stored challenge: {e}")))
                })
                .transpose();
        }
        Ok(state
            .challenges
            .lock()
            .map_err(|_| poisoned())?
            .get(id)
            .cloned())
    }

    /// Records the committed root on the round.
    pub async fn commit(state: &Arc<AppState>, id: &str, p: Pending) -> Result<(), LedgerError> {
        if state.shared() {
            let id = id.to_string();
            let json =
                serde_json::to_string(&p).map_err(|e| LedgerError::Storage(e.to_string()))?;
            return state
                .read_with(move |db| {
                    db.exec(
                        "UPDATE bench_challenges SET pending = ?2 WHERE id = ?1",
                        p![&id, json],
                    )
                    .map(|_| ())
                })
                .await;
        }
        if let Some(have) = state.challenges.lock().map_err(|_| poisoned())?.get_mut(id) {
            *have = p;
        }
        Ok(())
    }

    /// Whether `worker` has a re-proof in progress.
    pub async fn reproof_pending(state: &Arc<AppState>, worker: &str) -> Result<bool, LedgerError> {
        let now = unix_ms();
        if state.shared() {
            let worker = worker.to_string();
            let now = i64::try_from(now).unwrap_or(i64::MAX);
            let rows = state
                .read_with(move |db| {
                    db.query(
                        "SELECT pending FROM bench_challenges WHERE worker = ?1 AND deadline_ms >= ?2",
                        p![&worker, now],
                    )
                })
                .await?;
            return Ok(rows.iter().any(|r| {
                r.str(0)
                    .ok()
                    .and_then(|j| serde_json::from_str::<Pending>(&j).ok())
                    .is_some_and(|p| p.reproof)
            }));
        }
        Ok(state
            .challenges
            .lock()
            .map_err(|_| poisoned())?
            .values()
            .any(|p| p.worker == worker && p.reproof && p.deadline_ms >= now))
    }

    /// Re-proofs past their deadline: (id, round).
    pub async fn missed(state: &Arc<AppState>) -> Result<Vec<(String, Pending)>, LedgerError> {
        let now = unix_ms();
        if state.shared() {
            let now = i64::try_from(now).unwrap_or(i64::MAX);
            let rows = state
                .read_with(move |db| {
                    db.query(
                        "SELECT id, pending FROM bench_challenges WHERE deadline_ms < ?1",
                        p![now],
                    )
                })
                .await?;
            return Ok(rows
                .iter()
                .filter_map(|r| {
                    let p: Pending = serde_json::from_str(&r.str(1).ok()?).ok()?;
                    Some((r.str(0).ok()?, p))
                })
                .filter(|(_, p)| p.reproof)
                .collect());
        }
        Ok(state
            .challenges
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .filter(|(_, p)| p.reproof && p.deadline_ms < now)
            .map(|(id, p)| (id.clone(), p.clone()))
            .collect())
    }

    /// Removes the round; false when it was gone already (someone else
    /// took its one try).
    pub async fn take(state: &Arc<AppState>, id: &str) -> Result<bool, LedgerError> {
        if state.shared() {
            let id = id.to_string();
            return state
                .read_with(move |db| {
                    Ok(db.exec("DELETE FROM bench_challenges WHERE id = ?1", p![&id])? == 1)
                })
                .await;
        }
        Ok(state
            .challenges
            .lock()
            .map_err(|_| poisoned())?
            .remove(id)
            .is_some())
    }
}

/// The multiplier for a verified throughput.
pub fn multiplier_for(gflops: f64, reference: f64) -> i64 {
    let m = (gflops / reference.max(1e-9)).clamp(0.5, 8.0);
    (m * 1000.0).round() as i64
}

fn refuse(
    state: &AppState,
    rid: &str,
    status: StatusCode,
    code: ErrorCode,
    event: &str,
    worker: &str,
    msg: String,
) -> ApiError {
    if let Some(ev) = event.strip_prefix("security.") {
        security_event(state, ev, rid, json!({ "worker": worker, "reason": msg }));
    } else {
        state
            .audit
            .record(event, Some(rid), json!({ "worker": worker, "reason": msg }));
    }
    ApiError::new(status, code, msg).with_request_id(rid)
}

/// Waits for one of the `bench_verify_concurrency` verification slots, so
/// that memory stays bounded however many proofs arrive at once. With
/// `bench_verify_queue` proofs already waiting, answers 503 with
/// `Retry-After` instead of queueing without end.
async fn verify_slot<'a>(
    state: &'a AppState,
    rid: &str,
) -> Result<tokio::sync::SemaphorePermit<'a>, ApiError> {
    if let Ok(permit) = state.verify_slots.try_acquire() {
        return Ok(permit);
    }
    let waiting = state.verify_waiting.fetch_add(1, Ordering::SeqCst);
    struct Leave<'a>(&'a AtomicUsize);
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _leave = Leave(&state.verify_waiting);
    if waiting >= state.cfg.bench_verify_queue {
        metrics::counter!("troop_limit_hits_total", "limit" => "bench_verify_queue").increment(1);
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Busy,
            format!("{waiting} proofs are waiting to be verified; retry later"),
        )
        .with_request_id(rid);
        e.retry_after = Some(30);
        return Err(e);
    }
    metrics::counter!("troop_bench_verifications_queued_total").increment(1);
    state
        .verify_slots
        .acquire()
        .await
        .map_err(|_| ApiError::internal("verification slots closed"))
}

pub async fn challenge(
    State(state): State<Arc<AppState>>,
    Signed {
        peer, rid, body: _, ..
    }: Signed<ChallengeRequest>,
) -> Result<Response, ApiError> {
    let worker = peer.to_base58();
    let known = state
        .worker_with(&worker, |_| ())
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?
        .is_some();
    if !known {
        return Err(ApiError::not_found(
            ErrorCode::UnknownWorker,
            "register before asking for a challenge",
        )
        .with_request_id(&rid));
    }
    Ok(axum::Json(
        issue(&state, &worker, false, Some(&rid))
            .await
            .map_err(|e| ledger_error(&state, e, &rid))?,
    )
    .into_response())
}

/// A fresh challenge for `worker` (asked by it, or a re-proof).
pub(crate) async fn issue(
    state: &Arc<AppState>,
    worker: &str,
    reproof: bool,
    rid: Option<&str>,
) -> Result<BenchChallenge, crate::ledger::LedgerError> {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    let id = hex::encode(id);
    let ch = Challenge::new(seed, state.cfg.bench_size, state.cfg.bench_rounds);
    let now = unix_ms();
    let deadline_unix = unix_secs() + state.cfg.bench_deadline.as_secs();
    rounds::put(
        state,
        id.clone(),
        Pending {
            worker: worker.to_string(),
            challenge: ch.clone(),
            issued_ms: now,
            deadline_ms: now + state.cfg.bench_deadline.as_millis() as u64,
            committed: None,
            reproof,
            proved_on: None,
        },
    )
    .await?;
    state.audit.record(
        if reproof {
            "bench.reproof_asked"
        } else {
            "bench.challenge"
        },
        rid,
        json!({ "worker": worker, "challenge_id": id, "n": ch.n, "rounds": ch.rounds }),
    );
    if reproof {
        metrics::counter!("troop_bench_reproofs_total", "outcome" => "asked").increment(1);
        tracing::info!(%worker, challenge = %id, "asked for a fresh proof of hardware");
    }
    Ok(BenchChallenge {
        challenge_id: id,
        seed: ch.seed,
        n: ch.n,
        rounds: ch.rounds,
        deadline: deadline_unix,
        samples: SAMPLES,
    })
}

/// Whether this heartbeat's answer asks `worker` for a re-proof: only a
/// worker with a standing proof and none in progress, with the chance
/// `1 - exp(-dt / mean)` for the `dt` seconds since its last heartbeat, so
/// that re-proofs come on average every `reproof_mean` at times the worker
/// cannot predict.
pub(crate) async fn maybe_reproof(
    state: &Arc<AppState>,
    worker: &str,
    proved: bool,
    since_last_secs: u64,
    rid: &str,
) -> Option<BenchChallenge> {
    let mean = state.cfg.reproof_mean.as_secs_f64();
    if !proved || mean <= 0.0 {
        return None;
    }
    let dt = (since_last_secs.max(1) as f64)
        .min(3.0 * state.cfg.heartbeat_interval.as_secs_f64().max(1.0));
    let chance = 1.0 - (-dt / mean).exp();
    if rand::random::<f64>() >= chance {
        return None;
    }
    match rounds::reproof_pending(state, worker).await {
        Ok(false) => {}
        Ok(true) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "could not check for a re-proof in progress");
            return None;
        }
    }
    match issue(state, worker, true, Some(rid)).await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "could not issue a re-proof");
            None
        }
    }
}

/// Takes a worker's standing proof away (a re-proof missed or failed): no
/// verified figure, the multiplier at most 1.0 (a worker that never proved
/// has 1.0; one that proved slower keeps its lower figure).
async fn lose_proof(state: &Arc<AppState>, worker: &str, why: &str, rid: Option<&str>) {
    let standing = state
        .worker_with(worker, |w| w.multiplier_milli)
        .await
        .ok()
        .flatten()
        .unwrap_or(1000);
    let milli = standing.min(1000);
    match state
        .writer
        .submit(
            Command::SetHardware {
                peer_id: worker.to_string(),
                verified_gflops: None,
                multiplier_milli: milli,
                backend: None,
                adapter: None,
            },
            rid.map(String::from),
        )
        .await
    {
        Ok(Outcome::Worker(row)) => state.put_worker(row),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(%worker, error = %e, "could not take the proof away");
            return;
        }
    }
    metrics::counter!("troop_bench_reproofs_total", "outcome" => "lost").increment(1);
    state.audit.record(
        "bench.reproof_failed",
        rid,
        json!({ "worker": worker, "reason": why,
                "hardware_multiplier_before": standing as f64 / 1000.0,
                "hardware_multiplier": milli as f64 / 1000.0 }),
    );
    tracing::warn!(%worker, reason = why, multiplier = milli as f64 / 1000.0, "re-proof failed: the proof of hardware is taken away");
}

/// Re-proofs past their deadline take the worker's proof away (run by the
/// sweeper; each round is taken once, whichever replica sweeps).
pub async fn sweep_missed(state: &Arc<AppState>) {
    let missed = match rounds::missed(state).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "could not list missed re-proofs");
            return;
        }
    };
    for (id, p) in missed {
        if matches!(rounds::take(state, &id).await, Ok(true)) {
            lose_proof(state, &p.worker, "the re-proof's deadline passed", None).await;
        }
    }
}

/// `POST /bench/challenge` takes an empty object.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submit {
    challenge_id: String,
    #[serde(default)]
    root: Option<String>,
    /// The worker's own timing (recorded, never trusted).
    #[serde(default)]
    seconds: Option<f64>,
    #[serde(default)]
    openings: Option<Vec<Opening>>,
    /// What computed the root, as the worker says (shown, not trusted):
    /// cpu, wgpu or cuda, and the adapter's name.
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    adapter: Option<String>,
}

/// A short printable label from a worker (at most 128 characters).
fn label(s: Option<String>) -> Option<String> {
    s.map(|s| {
        s.chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect::<String>()
    })
    .filter(|s| !s.is_empty())
}

pub async fn submit(
    State(state): State<Arc<AppState>>,
    Signed {
        peer,
        rid,
        body: req,
        ..
    }: Signed<Submit>,
) -> Result<Response, ApiError> {
    let arrived = unix_ms();
    let worker = peer.to_base58();
    // Look the round up and check it belongs to this worker and is on time.
    let pending = rounds::get(&state, &req.challenge_id)
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    let (challenge, committed, issued, reproof, proved_on) = {
        let Some(p) = pending.as_ref() else {
            return Err(refuse(
                &state,
                &rid,
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "security.bench_unknown_challenge",
                &worker,
                format!(
                    "no challenge {:.40} was issued (or it is over)",
                    req.challenge_id
                ),
            ));
        };
        if p.worker != worker {
            return Err(refuse(
                &state,
                &rid,
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                "security.bench_foreign_challenge",
                &worker,
                "this challenge was issued to another worker".into(),
            ));
        }
        if arrived > p.deadline_ms {
            if matches!(rounds::take(&state, &req.challenge_id).await, Ok(true)) && p.reproof {
                lose_proof(
                    &state,
                    &worker,
                    "the re-proof came after its deadline",
                    Some(&rid),
                )
                .await;
            }
            return Err(refuse(
                &state,
                &rid,
                StatusCode::GONE,
                ErrorCode::Timeout,
                "bench.expired",
                &worker,
                "the challenge's deadline has passed".into(),
            ));
        }
        (
            p.challenge.clone(),
            p.committed.clone(),
            p.issued_ms,
            p.reproof,
            p.proved_on.clone(),
        )
    };
    match (req.root, req.openings, committed) {
        (Some(root), None, None) => {
            if hex::decode(&root).map(|b| b.len()) != Ok(32) {
                return Err(
                    ApiError::bad_request("root must be 64 hex digits").with_request_id(&rid)
                );
            }
            let seconds = arrived.saturating_sub(issued) as f64 / 1000.0;
            let mut r = [0u8; 32];
            rand::rng().fill_bytes(&mut r);
            let rows = verify::pick_rows(&r, challenge.n, SAMPLES);
            if let Some(mut p) = pending {
                p.committed = Some((root.clone(), seconds, rows.clone()));
                p.proved_on = label(req.backend.clone()).map(|b| (b, label(req.adapter.clone())));
                rounds::commit(&state, &req.challenge_id, p)
                    .await
                    .map_err(|e| ledger_error(&state, e, &rid))?;
            }
            state.audit.record(
                "bench.committed",
                Some(&rid),
                json!({ "worker": worker, "challenge_id": req.challenge_id,
                "seconds": seconds, "worker_seconds": req.seconds,
                "backend": req.backend, "adapter": req.adapter, "reproof": reproof }),
            );
            Ok(axum::Json(BenchRows {
                challenge_id: req.challenge_id,
                rows,
                seconds,
            })
            .into_response())
        }
        (None, Some(openings), Some((root, seconds, rows))) => {
            // A full queue refuses before the try is spent.
            let _slot = verify_slot(&state, &rid).await?;
            // One try per challenge, pass or fail.
            if !rounds::take(&state, &req.challenge_id)
                .await
                .map_err(|e| ledger_error(&state, e, &rid))?
            {
                // A concurrent submit of the same openings took the try.
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::Conflict,
                    "these openings are already being verified",
                )
                .with_request_id(&rid));
            }
            let ch = challenge.clone();
            let verdict =
                tokio::task::spawn_blocking(move || verify::verify(&ch, &root, &rows, &openings))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?;
            if let Err(e) = verdict {
                if reproof {
                    lose_proof(&state, &worker, &format!("proof rejected: {e}"), Some(&rid)).await;
                }
                return Err(refuse(
                    &state,
                    &rid,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    ErrorCode::BadRequest,
                    "security.bench_failed",
                    &worker,
                    format!("proof rejected: {e}"),
                ));
            }
            let gflops = challenge.flops() / seconds.max(1e-9) / 1e9;
            let measured = multiplier_for(gflops, state.cfg.reference_gflops);
            let (backend, adapter) = match proved_on {
                Some((b, a)) => (Some(b), a),
                None => (None, None),
            };
            let standing = if reproof {
                state
                    .worker_with(&worker, |w| (w.multiplier_milli, w.verified_gflops))
                    .await
                    .map_err(|e| ledger_error(&state, e, &rid))?
            } else {
                None
            };
            // A re-proof within the tolerance below the standing figure
            // keeps it (a worker proving while it serves is a little
            // slower); a lower or a higher one replaces it.
            let keep = match standing {
                Some((milli, Some(_))) => {
                    let floor = milli as f64 * (1.0 - state.cfg.reproof_tolerance);
                    (measured as f64) >= floor && measured <= milli
                }
                _ => false,
            };
            let (set_gflops, multiplier_milli) = match standing {
                Some((milli, Some(g))) if keep => (g, milli),
                _ => (gflops, measured),
            };
            let out = state
                .writer
                .submit(
                    Command::SetHardware {
                        peer_id: worker.clone(),
                        verified_gflops: Some(set_gflops),
                        multiplier_milli,
                        backend: backend.clone(),
                        adapter: adapter.clone(),
                    },
                    Some(rid.clone()),
                )
                .await
                .map_err(|e| ledger_error(&state, e, &rid))?;
            if let Outcome::Worker(row) = out {
                state.put_worker(row);
            }
            if reproof {
                let before = standing.map(|(m, _)| m).unwrap_or(1000);
                let result = if keep {
                    "kept"
                } else if multiplier_milli < before {
                    "lowered"
                } else if multiplier_milli > before {
                    "raised"
                } else {
                    "same"
                };
                metrics::counter!("troop_bench_reproofs_total", "outcome" => result).increment(1);
                state.audit.record(
                    "bench.reproof",
                    Some(&rid),
                    json!({ "worker": worker,
                    "challenge_id": req.challenge_id, "verified_gflops": gflops,
                    "measured_multiplier": measured as f64 / 1000.0,
                    "hardware_multiplier_before": before as f64 / 1000.0,
                    "hardware_multiplier": multiplier_milli as f64 / 1000.0,
                    "result": result, "backend": backend, "adapter": adapter }),
                );
                tracing::info!(%worker, gflops, result, multiplier = multiplier_milli as f64 / 1000.0, "re-proof verified");
            } else {
                state.audit.record("bench.verified", Some(&rid), json!({ "worker": worker, "challenge_id": req.challenge_id,
                    "verified_gflops": gflops, "hardware_multiplier": multiplier_milli as f64 / 1000.0,
                    "backend": backend, "adapter": adapter }));
                tracing::info!(%worker, gflops, multiplier = multiplier_milli as f64 / 1000.0, "proof of hardware verified");
            }
            Ok(axum::Json(BenchVerdict {
                challenge_id: req.challenge_id,
                verified: true,
                verified_gflops: gflops,
                hardware_multiplier: multiplier_milli as f64 / 1000.0,
                seconds,
            })
            .into_response())
        }
        (Some(_), None, Some(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            "the root was already committed; send the openings",
        )
        .with_request_id(&rid)),
        (None, Some(_), None) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::Conflict,
            "commit the root first",
        )
        .with_request_id(&rid)),
        _ => Err(ApiError::bad_request("send either `root` or `openings`").with_request_id(&rid)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplier_has_a_floor_and_a_cap() {
        assert_eq!(multiplier_for(100.0, 100.0), 1000);
        assert_eq!(multiplier_for(250.0, 100.0), 2500);
        assert_eq!(multiplier_for(1.0, 100.0), 500);
        assert_eq!(multiplier_for(1e6, 100.0), 8000);
    }
}
