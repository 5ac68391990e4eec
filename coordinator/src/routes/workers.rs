//! Workers: registration, heartbeats, the public list and `/bootstrap`.

use super::*;
use crate::ledger::Beat;
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

pub(crate) fn multiplier(milli: i64) -> f64 {
    milli as f64 / 1000.0
}

pub(crate) fn worker_info(cfg: &crate::Config, w: &WorkerRow, now: u64) -> WorkerInfo {
    WorkerInfo {
        peer_id: w.peer_id.clone(),
        models: w.models.clone(),
        addresses: w.addresses.clone(),
        hardware_multiplier: multiplier(w.multiplier_milli),
        verified_gflops: w.verified_gflops,
        hardware_backend: w.proof_backend.clone(),
        hardware_adapter: w.proof_adapter.clone(),
        last_seen: w.last_seen,
        alive: w.alive(now, cfg.worker_ttl.as_secs()),
        load: Load {
            active_jobs: w.active_jobs,
            queue_depth: w.queue_depth,
        },
        reputation: None,
        audits: Default::default(),
        suspended: w.suspended_at.is_some(),
    }
}

pub(crate) fn reputation_info(r: &crate::ledger::Reputation) -> Option<ReputationInfo> {
    (r.requests > 0).then(|| ReputationInfo {
        requests: r.requests as u64,
        acknowledged_share: r.acknowledged as f64 / r.requests as f64,
        disputed_share: r.disputed as f64 / r.requests as f64,
        unacknowledged_share: r.unacknowledged as f64 / r.requests as f64,
    })
}

pub(crate) fn check_list(
    name: &str,
    items: &[String],
    max_items: usize,
    max_len: usize,
) -> Result<(), ApiError> {
    if items.len() > max_items {
        return Err(ApiError::bad_request(format!(
            "{name}: at most {max_items} entries"
        )));
    }
    if let Some(bad) = items.iter().find(|s| s.is_empty() || s.len() > max_len) {
        return Err(ApiError::bad_request(format!(
            "{name}: entries must be 1 to {max_len} bytes (got {} bytes)",
            bad.len()
        )));
    }
    Ok(())
}

/// Every address must be a multiaddr; one that ends in a PeerId must end
/// in the registrant's own (a relay address may name its relay before
/// `/p2p-circuit`).
pub(crate) fn check_addresses(
    peer: &libp2p_identity::PeerId,
    addresses: &[String],
) -> Result<(), ApiError> {
    check_list("addresses", addresses, 32, 512)?;
    for a in addresses {
        let ma: multiaddr::Multiaddr = a.parse().map_err(|e| {
            ApiError::bad_request(format!("addresses: {a:.80} is not a multiaddr: {e}"))
        })?;
        if let Some(multiaddr::Protocol::P2p(id)) = ma.iter().last()
            && id != *peer
        {
            return Err(ApiError::bad_request(format!(
                "addresses: {a:.80} names another peer ({id}), not the signer"
            )));
        }
    }
    Ok(())
}

pub(crate) fn note_worker_ip(state: &AppState, peer: &str, ip: IpAddr) {
    if let Some(mut m) = state.worker_ips.locked() {
        m.insert(peer.to_string(), ip);
    }
}

pub(crate) async fn register(
    State(state): St,
    Signed {
        peer,
        body: req,
        rid,
        ip,
        ..
    }: Signed<RegisterRequest>,
) -> Result<Response, ApiError> {
    check_list("models", &req.models, 256, 256).map_err(|e| e.with_request_id(&rid))?;
    check_addresses(&peer, &req.addresses).map_err(|e| e.with_request_id(&rid))?;
    let known = state
        .workers
        .reading()
        .map(|w| w.contains_key(&peer.to_base58()))
        .unwrap_or(false);
    if !known {
        check_quota(
            &state,
            "register",
            &state.register_ip_limiter,
            &ip,
            state.cfg.registrations_per_ip_per_hour,
            &rid,
        )
        .await?;
    }
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let out = state
        .writer
        .submit(
            Command::RegisterWorker {
                peer_id: peer.to_base58(),
                models: req.models,
                addresses: req.addresses,
                version: req.version.map(|v| v.chars().take(64).collect()),
                new_key: key,
                now_secs: unix_secs(),
            },
            Some(rid.clone()),
        )
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    let Outcome::Worker(row) = out else {
        return Err(ApiError::internal("unexpected ledger outcome").with_request_id(&rid));
    };
    state.audit.record(
        "worker.registered",
        Some(&rid),
        json!({ "peer_id": row.peer_id, "models": row.models }),
    );
    tracing::info!(worker = %row.peer_id, models = ?row.models, "worker registered");
    let resp = RegisterResponse {
        peer_id: row.peer_id.clone(),
        receipt_key: hex::encode(&row.receipt_key),
        hardware_multiplier: multiplier(row.multiplier_milli),
        heartbeat_interval_secs: state.cfg.heartbeat_interval.as_secs(),
    };
    note_worker_ip(&state, &row.peer_id, ip);
    state.put_worker(row);
    Ok(axum::Json(resp).into_response())
}

pub(crate) async fn heartbeat(
    State(state): St,
    Signed {
        peer,
        body: req,
        rid,
        ip,
        signed_at,
    }: Signed<HeartbeatRequest>,
) -> Result<Response, ApiError> {
    if let Some(m) = &req.models {
        check_list("models", m, 256, 256).map_err(|e| e.with_request_id(&rid))?;
    }
    if let Some(a) = &req.addresses {
        check_addresses(&peer, a).map_err(|e| e.with_request_id(&rid))?;
    }
    let now = unix_secs();
    let peer_id = peer.to_base58();
    note_worker_ip(&state, &peer_id, ip);
    // Before the heartbeat updates it: whether it has a standing proof and
    // how long since it was last seen (for the re-proof's draw).
    let before = state
        .worker_with(&peer_id, |w| (w.verified_gflops.is_some(), w.last_seen))
        .await
        .ok()
        .flatten();
    let load = (req.load.active_jobs, req.load.queue_depth);
    // A heartbeat signed no later than the newest one recorded (two in
    // one second, or a copy sent to another replica) changes nothing and
    // is answered as usual.
    let kept = keep_beat(&state, &peer_id, &req, now, signed_at);
    let mut replay = kept == Some(false);
    if kept.is_none() {
        let out = state
            .writer
            .submit(
                Command::Heartbeat {
                    peer_id: peer_id.clone(),
                    models: req.models.clone(),
                    addresses: req.addresses.clone(),
                    active_jobs: load.0,
                    queue_depth: load.1,
                    now_secs: now,
                    // Replicas: a copy sent to another replica is a replay
                    // there (their nonces are not shared for heartbeats).
                    signed_at: state.shared().then_some(signed_at),
                },
                Some(rid.clone()),
            )
            .await
            .map_err(|e| ledger_error(&state, e, &rid))?;
        replay = matches!(out, Outcome::Heartbeat { replay: true, .. });
        if !replay
            && let Some(mut map) = state.workers.writing()
            && let Some(w) = map.get_mut(&peer_id)
        {
            note_beat(w, now, signed_at, load);
            w.left_at = None;
            if let Some(m) = req.models {
                w.models = m;
            }
            if let Some(a) = req.addresses {
                w.addresses = a;
            }
            state.worker_index.ensure(w);
        }
    }
    if replay {
        ::metrics::counter!("troop_heartbeats_replayed_total").increment(1);
        tracing::debug!(worker = %peer_id, signed_at, "heartbeat not newer than the last one: nothing changed");
    }
    let reproof = match before {
        Some((proved, last)) => {
            super::hardware::maybe_reproof(&state, &peer_id, proved, now.saturating_sub(last), &rid)
                .await
        }
        None => None,
    };
    Ok(axum::Json(HeartbeatResponse {
        ok: true,
        last_seen: now,
        reproof,
    })
    .into_response())
}

/// With PostgreSQL (and `--heartbeat-flush-secs` above 0): a heartbeat of
/// a worker this replica knows, that has not left and whose models and
/// addresses are unchanged, only says "still here". It is applied to the
/// replica's table at once and kept, to be written with the others of the
/// interval in one command (`sweeper::refresh_workers`). `Some(true)`:
/// kept; `Some(false)`: a replay (not signed after the newest seen), which
/// changes nothing; `None`: it must go through the ledger now.
fn keep_beat(
    state: &AppState,
    peer_id: &str,
    req: &HeartbeatRequest,
    now: u64,
    signed_at: u64,
) -> Option<bool> {
    if !state.beats_batched() {
        return None;
    }
    let mut map = state.workers.writing()?;
    let w = map.get_mut(peer_id)?;
    let same = req.models.as_ref().is_none_or(|m| *m == w.models)
        && req.addresses.as_ref().is_none_or(|a| *a == w.addresses);
    if w.left_at.is_some() || !same {
        return None;
    }
    if w.last_signed.is_some_and(|t| t >= signed_at) {
        return Some(false);
    }
    let load = (req.load.active_jobs, req.load.queue_depth);
    note_beat(w, now, signed_at, load);
    state.worker_index.ensure(w);
    let beat = Beat {
        peer_id: peer_id.to_string(),
        seen_at: now,
        signed_at,
        active_jobs: load.0,
        queue_depth: load.1,
    };
    drop(map);
    state.beats.locked()?.insert(peer_id.to_string(), beat);
    ::metrics::counter!("troop_heartbeats_kept_total").increment(1);
    Some(true)
}

/// A heartbeat taken into the replica's table: seen now, signed then, this
/// busy.
fn note_beat(w: &mut WorkerRow, now: u64, signed_at: u64, (active, queued): (u32, u32)) {
    w.last_seen = now;
    w.last_signed = Some(signed_at);
    (w.active_jobs, w.queue_depth) = (active, queued);
}

fn ttl(state: &AppState) -> u64 {
    state.cfg.worker_ttl.as_secs()
}

/// `POST /workers/leave` (signed, body `{}`): the worker is stopping. It
/// leaves `/bootstrap` and is listed as not alive at once; no new ticket
/// names it; receipts it still owes settle as before.
pub(crate) async fn leave(
    State(state): St,
    Signed {
        peer,
        rid,
        ip,
        signed_at,
        ..
    }: Signed<serde_json::Value>,
) -> Result<Response, ApiError> {
    let now = unix_secs();
    let peer_id = peer.to_base58();
    note_worker_ip(&state, &peer_id, ip);
    state
        .writer
        .submit(
            Command::Leave {
                peer_id: peer_id.clone(),
                now_secs: now,
                signed_at: state.shared().then_some(signed_at),
            },
            Some(rid.clone()),
        )
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    if let Some(mut map) = state.workers.writing()
        && let Some(w) = map.get_mut(&peer_id)
    {
        w.last_seen = now;
        w.left_at = Some(now);
        w.last_signed = w.last_signed.max(Some(signed_at));
        w.active_jobs = 0;
        w.queue_depth = 0;
    }
    state
        .audit
        .record("worker.left", Some(&rid), json!({ "peer_id": peer_id }));
    tracing::info!(worker = %peer_id, "worker left the mesh");
    Ok(axum::Json(HeartbeatResponse {
        ok: true,
        last_seen: now,
        reproof: None,
    })
    .into_response())
}

/// `GET /workers`: every worker, or with `?peer=ID` one, or with
/// `?limit=N` (1 to [`WORKERS_PAGE_MAX`]) a page of those whose peer id
/// comes after `?after=ID`, with `next` when more follow.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct WorkersQuery {
    peer: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// The most workers one page of `GET /workers` holds.
pub const WORKERS_PAGE_MAX: usize = 1000;

pub(crate) async fn list_workers(
    State(state): St,
    headers: HeaderMap,
    query: Result<Query<WorkersQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let rid = request_id(&headers);
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()).with_request_id(&rid))?;
    if let Some(n) = q.limit
        && !(1..=WORKERS_PAGE_MAX).contains(&n)
    {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {WORKERS_PAGE_MAX} (pages go on with after=, the last peer id of the page before)"
        ))
        .with_request_id(&rid));
    }
    if q.after.is_some() && q.limit.is_none() {
        return Err(ApiError::bad_request(
            "after= goes with limit= (1 to 1000): a page after that id",
        )
        .with_request_id(&rid));
    }
    if q.peer.is_some() && (q.after.is_some() || q.limit.is_some()) {
        return Err(ApiError::bad_request(
            "peer= names one worker: it does not go with after= or limit=",
        )
        .with_request_id(&rid));
    }
    for (name, v) in [("peer", &q.peer), ("after", &q.after)] {
        if v.as_ref().is_some_and(|v| v.len() > 128) {
            return Err(
                ApiError::bad_request(format!("{name}: at most 128 bytes")).with_request_id(&rid)
            );
        }
    }
    let now = unix_secs();
    // The page's rows, in peer id order, out of the table (cloned under its
    // read lock; a page is found with a partial sort, not a sort of all).
    let (mut rows, next) = {
        let map = state
            .workers
            .read()
            .map_err(|_| ApiError::internal("worker table poisoned"))?;
        if let Some(peer) = &q.peer {
            (map.get(peer).cloned().into_iter().collect::<Vec<_>>(), None)
        } else {
            let mut keys: Vec<&String> = match &q.after {
                Some(a) => map.keys().filter(|k| k.as_str() > a.as_str()).collect(),
                None => map.keys().collect(),
            };
            let limit = q.limit.unwrap_or(usize::MAX);
            let more = keys.len() > limit;
            if more {
                keys.select_nth_unstable(limit);
                keys.truncate(limit);
            }
            keys.sort_unstable();
            let next = more.then(|| keys.last().map(|k| k.to_string())).flatten();
            (
                keys.iter().filter_map(|k| map.get(*k).cloned()).collect(),
                next,
            )
        }
    };
    // With PostgreSQL a worker that registered on another replica since
    // this one's last refresh is read from the database.
    if let Some(peer) = &q.peer
        && rows.is_empty()
        && state.shared()
    {
        rows = state
            .reload_worker(peer)
            .await
            .map_err(|e| ledger_error(&state, e, &rid))?
            .into_iter()
            .collect();
    }
    // Reputations and audit counts, in one read: of the page's workers
    // only when it is a page (one indexed read each), else of all.
    let paged = q.peer.is_some() || q.limit.is_some();
    let ids: Vec<String> = rows.iter().map(|w| w.peer_id.clone()).collect();
    let (reps, audits) = state
        .read_with(move |db| {
            if paged {
                Ok((
                    crate::ledger::worker_reputations_of(db, &ids)?,
                    crate::ledger::audit_counts_of(db, &ids)?,
                ))
            } else {
                Ok((
                    crate::ledger::worker_reputations(db)?,
                    crate::ledger::all_audit_counts(db)?,
                ))
            }
        })
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    let workers: Vec<WorkerInfo> = rows
        .iter()
        .map(|w| {
            let mut i = worker_info(&state.cfg, w, now);
            i.reputation = reps.get(&w.peer_id).and_then(reputation_info);
            if let Some((passed, failed)) = audits.get(&w.peer_id) {
                i.audits = troop_protocol::api::AuditCounts {
                    passed: (*passed).max(0) as u64,
                    failed: (*failed).max(0) as u64,
                };
            }
            i
        })
        .collect();
    Ok(axum::Json(WorkersResponse { workers, next }).into_response())
}

/// `GET /bootstrap?model=NAME`: only workers that serve the model (and no
/// relays): how a gateway with no advert for a model finds its workers in
/// one request, whatever the mesh's size, instead of a DHT lookup.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct BootstrapQuery {
    model: Option<String>,
}

pub(crate) async fn bootstrap(
    State(state): St,
    crate::http::extract::CallerIp(caller): crate::http::extract::CallerIp,
    query: Result<Query<BootstrapQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let model = query.model.filter(|m| !m.is_empty());
    if model.as_ref().is_some_and(|m| m.len() > 256) {
        return Err(ApiError::bad_request("model: at most 256 bytes"));
    }
    let now = unix_secs();
    let ttl = ttl(&state);
    let map = state
        .workers
        .read()
        .map_err(|_| ApiError::internal("worker table poisoned"))?;
    // Only the addresses the caller's place can reach: none on loopback
    // or unspecified for a caller on another host, no LAN ones for a
    // caller on the public internet.
    let reachable = |w: &WorkerRow| -> Vec<String> {
        w.addresses
            .iter()
            .filter(|a| troop_protocol::addr_scope::reachable_from(caller, a))
            .cloned()
            .collect()
    };
    // Workers with a verified proof first, then the longest registered
    // (the index's order, checked against the live table); at most
    // `bootstrap_per_ip` from one IP, so one address cannot fill the list
    // with ids it made up.
    let mut index = state.worker_index.lock();
    let ips = state.worker_ips.locked();
    let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
    let mut live: Vec<BootstrapPeer> = Vec::new();
    // Workers gone for good from the order's point of view (they come back
    // through `worker_index.put` when they return).
    let mut gone: Vec<String> = Vec::new();
    // Workers walked past without being taken out (unreachable from the
    // caller, over their IP's cap) are walked again by the next request:
    // at most this many, so that a request's cost stays bounded.
    let max_walk = (8 * state.cfg.bootstrap_peers).max(1_000);
    for (walked, id) in index.walk(model.as_deref()).enumerate() {
        if live.len() >= state.cfg.bootstrap_peers || walked >= max_walk {
            break;
        }
        let Some(w) = map.get(id) else {
            gone.push(id.to_string());
            continue;
        };
        if !w.alive(now, ttl) || w.suspended_at.is_some() {
            gone.push(id.to_string());
            continue;
        }
        if model.as_ref().is_some_and(|m| !w.models.contains(m)) {
            continue;
        }
        let addresses = reachable(w);
        if addresses.is_empty() {
            continue;
        }
        if let Some(ip) = ips.as_ref().and_then(|m| m.get(&w.peer_id)) {
            let n = per_ip.entry(*ip).or_insert(0);
            *n += 1;
            if *n > state.cfg.bootstrap_per_ip {
                continue;
            }
        }
        live.push(BootstrapPeer {
            peer_id: w.peer_id.clone(),
            addresses,
            relay: false,
        });
    }
    for id in gone {
        index.remove(&id);
    }
    drop(index);
    drop(ips);
    drop(map);
    // The operator's relays first: a node behind NAT needs one to be reached.
    let mut peers: Vec<BootstrapPeer> = Vec::new();
    for r in state
        .cfg
        .relays
        .iter()
        .filter(|r| model.is_none() && troop_protocol::addr_scope::reachable_from(caller, r))
    {
        let Some(peer_id) = crate::config::relay_peer_id(r) else {
            continue;
        };
        match peers.iter_mut().find(|p| p.peer_id == peer_id) {
            Some(p) => p.addresses.push(r.clone()),
            None => peers.push(BootstrapPeer {
                peer_id,
                addresses: vec![r.clone()],
                relay: true,
            }),
        }
    }
    peers.extend(live);
    Ok(axum::Json(BootstrapResponse { peers }).into_response())
}
