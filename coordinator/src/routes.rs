//! HTTP routes of the coordinator.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::RngCore;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use troop_protocol::api::{
    AuthorizeRequest, AuthorizeResponse, BalanceResponse, BootstrapPeer, BootstrapResponse,
    HeartbeatRequest, HeartbeatResponse, Load, RegisterRequest, RegisterResponse, ReputationInfo,
    SettlementResponse, TransactionEntry, TransactionsResponse, WorkerInfo, WorkersResponse,
};
use troop_protocol::identity::parse_account_id;
use troop_protocol::receipt::{HEADER_RECEIPT_MAC, Receipt, verify_receipt_mac};
use troop_protocol::signed::{self, HEADER_NONCE, HEADER_PEER, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use troop_protocol::ticket::{TICKET_ISSUER, TicketClaims};
use troop_protocol::{ErrorCode, credits_from_milli};

use crate::error::{ApiError, parse_json};
use crate::ledger::{Command, GrantPolicy, LedgerError, Outcome, WorkerRow};
use crate::pipeline::{Signed, SignedBytes};
use crate::{AppState, unix_ms, unix_secs};

type St = State<Arc<AppState>>;

/// Builds the router with its middleware: request ids, response time,
/// metrics, body limit, request timeout, JSON errors everywhere.
pub fn app(state: Arc<AppState>) -> Router {
    let discovery = Router::new()
        .route("/workers", get(list_workers))
        .route("/bootstrap", get(bootstrap))
        .route("/users/{id}/balance", get(balance))
        .route("/users/{id}/transactions", get(transactions))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            discovery_limit,
        ));
    let public = if state.cfg.metrics_listen.is_some() {
        Router::new()
    } else {
        Router::new().route("/metrics", get(metrics_text))
    };
    public
        .route("/health", get(health))
        .route("/public-key", get(public_key))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/workers/register", post(register))
        .route("/workers/heartbeat", post(heartbeat))
        .route("/authorize", post(authorize))
        .route("/transactions/submit", post(submit_receipt))
        .merge(discovery)
        .route("/bench/challenge", post(crate::bench::challenge))
        // Openings are Merkle paths only: about 140 KB at n = 4096.
        .route("/bench/submit", post(crate::bench::submit))
        // Router::layer wraps from the inside out: the last one is outermost.
        .layer(RequestBodyLimitLayer::new(state.cfg.body_limit_bytes))
        .fallback(not_found)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.cfg.request_timeout,
        ))
        .layer(middleware::from_fn(json_errors))
        // Load shedding: beyond `max_in_flight` requests at once, answer
        // 503 with Retry-After at once instead of queueing without end.
        // (One semaphore for all routes: tower's ConcurrencyLimitLayer
        // under `Router::layer` would be one limit per route.)
        .layer(middleware::from_fn_with_state(state.clone(), shed_load))
        .layer(middleware::from_fn(crate::metrics::track))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

async fn shed_load(State(state): St, req: Request, next: Next) -> Response {
    match state.in_flight.try_acquire() {
        Ok(_permit) => next.run(req).await,
        Err(_) => overloaded().into_response(),
    }
}

fn overloaded() -> ApiError {
    metrics::counter!("troop_limit_hits_total", "limit" => "in_flight").increment(1);
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Busy,
        "the coordinator is at its limit of requests in flight; retry in a second",
    );
    e.retry_after = Some(1);
    e
}

/// `/metrics` alone, for `--metrics-listen`.
pub fn metrics_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(state)
}

pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Turns any error response that is not JSON (405, 413 from the body
/// limit, 408 from the timeout, extractor rejections) into the JSON shape.
async fn json_errors(req: Request, next: Next) -> Response {
    let rid = request_id(req.headers());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::REQUEST_TIMEOUT => ErrorCode::Timeout,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    };
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, code, message)
        .with_request_id(&rid)
        .into_response();
    for name in [header::RETRY_AFTER, header::ALLOW] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

async fn not_found(uri: Uri, headers: HeaderMap) -> ApiError {
    ApiError::not_found(ErrorCode::NotFound, format!("no route for {}", uri.path()))
        .with_request_id(&request_id(&headers))
}

pub(crate) fn client_ip(state: &AppState, req: &Request) -> IpAddr {
    client_ip_of(state, req.headers(), req.extensions())
}

fn client_ip_of(state: &AppState, headers: &HeaderMap, ext: &axum::http::Extensions) -> IpAddr {
    if state.cfg.trusted_proxy
        && let Some(ip) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return ip;
    }
    if let Some(ConnectInfo(crate::listener::ClientAddr(a))) =
        ext.get::<ConnectInfo<crate::listener::ClientAddr>>()
    {
        return a.ip();
    }
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

fn rate_limited(state: &AppState, scope: &str, key: &str, wait: u64, rid: &str) -> ApiError {
    metrics::counter!("troop_rate_limited_total", "scope" => scope.to_string()).increment(1);
    state.audit.record(
        "rate_limited",
        Some(rid),
        json!({ "scope": scope, "key": key, "retry_after": wait }),
    );
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        format!("rate limit for {scope} reached; retry in {wait} s"),
    )
    .with_request_id(rid);
    e.retry_after = Some(wait);
    e
}

async fn discovery_limit(State(state): St, req: Request, next: Next) -> Response {
    let ip = client_ip(&state, &req);
    if let Err(wait) = state.discovery_limiter.check(&ip) {
        let rid = request_id(req.headers());
        return rate_limited(&state, "discovery", &ip.to_string(), wait, &rid).into_response();
    }
    next.run(req).await
}

pub(crate) fn security_event(state: &AppState, event: &str, rid: &str, fields: Value) {
    metrics::counter!("troop_security_events_total", "event" => event.to_string()).increment(1);
    state
        .audit
        .record(&format!("security.{event}"), Some(rid), fields);
}

/// Verifies a signed request and its nonce; audits every refusal.
/// Nonces remembered at most (each for `max_skew_secs`): beyond it signed
/// requests are answered 503 until old ones age out.
const MAX_NONCES: usize = 500_000;

pub(crate) fn verify_signed(
    state: &AppState,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: &[u8],
    rid: &str,
) -> Result<libp2p_identity::PeerId, ApiError> {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    for name in [
        HEADER_PEER,
        HEADER_TIMESTAMP,
        HEADER_NONCE,
        HEADER_SIGNATURE,
    ] {
        if headers.get_all(name).iter().nth(1).is_some() {
            security_event(
                state,
                "bad_signature",
                rid,
                json!({ "path": uri.path(), "reason": format!("{name} sent twice") }),
            );
            return Err(ApiError::unauthorized(
                ErrorCode::BadSignature,
                format!("the {name} header must be sent once"),
            )
            .with_request_id(rid));
        }
    }
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(uri.path());
    let now = unix_secs();
    let refuse = |e: signed::SignError| {
        let event = match e.code() {
            ErrorCode::StaleTimestamp => "stale_timestamp",
            ErrorCode::Replay => "replay",
            _ => "bad_signature",
        };
        security_event(
            state,
            event,
            rid,
            json!({ "path": uri.path(), "peer": h(HEADER_PEER), "reason": e.to_string() }),
        );
        ApiError::unauthorized(e.code(), e.to_string()).with_request_id(rid)
    };
    let v = signed::verify_request(
        [
            h(HEADER_PEER),
            h(HEADER_TIMESTAMP),
            h(HEADER_NONCE),
            h(HEADER_SIGNATURE),
        ],
        method.as_str(),
        path,
        body,
        now,
        state.cfg.max_skew_secs,
    )
    .map_err(refuse)?;
    if v.timestamp < state.started_at {
        return Err(refuse(signed::SignError::StaleTimestamp {
            timestamp: v.timestamp,
            skew: state.started_at - v.timestamp,
            max: 0,
        }));
    }
    let mut nonces = state
        .nonces
        .lock()
        .map_err(|_| ApiError::internal("nonce store poisoned"))?;
    let key = (v.peer.to_base58(), v.nonce.clone());
    if nonces.contains_key(&key) {
        drop(nonces);
        return Err(refuse(signed::SignError::Replay));
    }
    if nonces.len() >= MAX_NONCES {
        drop(nonces);
        metrics::counter!("troop_limit_hits_total", "limit" => "nonces").increment(1);
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Busy,
            "too many signed requests in the last minutes; retry later",
        )
        .with_request_id(rid);
        e.retry_after = Some(state.cfg.max_skew_secs.min(60));
        return Err(e);
    }
    nonces.insert(key, v.timestamp);
    Ok(v.peer)
}

/// A ledger refusal as an HTTP one; failures of the store itself are
/// logged and audited as `ledger.failure`.
pub(crate) fn ledger_error(state: &AppState, e: LedgerError, rid: &str) -> ApiError {
    if matches!(e, LedgerError::Invariant(_) | LedgerError::Storage(_)) {
        tracing::error!(error = %e, request_id = rid, "ledger failure");
        state.audit.record(
            "ledger.failure",
            Some(rid),
            json!({ "error": e.to_string() }),
        );
    }
    ApiError::from(e).with_request_id(rid)
}

// ---------------------------------------------------------------------------

async fn health(State(state): St) -> impl IntoResponse {
    axum::Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "kid": state.keys.kid,
        "starter_pow_bits": state.cfg.starter_pow_bits,
    }))
}

async fn public_key(State(state): St) -> impl IntoResponse {
    axum::Json(json!({
        "kid": state.keys.kid,
        "alg": "RS256",
        "issuer": TICKET_ISSUER,
        "public_key": state.keys.public_pem,
    }))
}

async fn jwks(State(state): St) -> impl IntoResponse {
    axum::Json(state.keys.jwks.clone())
}

async fn metrics_text(State(state): St) -> Response {
    let body = state
        .prometheus
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        body,
    )
        .into_response()
}

fn multiplier(milli: i64) -> f64 {
    milli as f64 / 1000.0
}

fn worker_info(cfg: &crate::Config, w: &WorkerRow, now: u64) -> WorkerInfo {
    WorkerInfo {
        peer_id: w.peer_id.clone(),
        models: w.models.clone(),
        addresses: w.addresses.clone(),
        hardware_multiplier: multiplier(w.multiplier_milli),
        verified_gflops: w.verified_gflops,
        last_seen: w.last_seen,
        alive: now.saturating_sub(w.last_seen) <= cfg.worker_ttl.as_secs(),
        load: Load {
            active_jobs: w.active_jobs,
            queue_depth: w.queue_depth,
        },
        reputation: None,
    }
}

fn reputation_info(r: &crate::ledger::Reputation) -> Option<ReputationInfo> {
    (r.requests > 0).then(|| ReputationInfo {
        requests: r.requests as u64,
        acknowledged_share: r.acknowledged as f64 / r.requests as f64,
        disputed_share: r.disputed as f64 / r.requests as f64,
    })
}

fn check_list(
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
fn check_addresses(peer: &libp2p_identity::PeerId, addresses: &[String]) -> Result<(), ApiError> {
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

fn note_worker_ip(state: &AppState, peer: &str, ip: IpAddr) {
    if let Ok(mut m) = state.worker_ips.lock() {
        m.insert(peer.to_string(), ip);
    }
}

async fn register(
    State(state): St,
    Signed {
        peer,
        body: req,
        rid,
        ip,
    }: Signed<RegisterRequest>,
) -> Result<Response, ApiError> {
    check_list("models", &req.models, 256, 256).map_err(|e| e.with_request_id(&rid))?;
    check_addresses(&peer, &req.addresses).map_err(|e| e.with_request_id(&rid))?;
    let known = state
        .workers
        .read()
        .map(|w| w.contains_key(&peer.to_base58()))
        .unwrap_or(false);
    if !known && let Err(wait) = state.register_ip_limiter.check(&ip) {
        return Err(rate_limited(
            &state,
            "register",
            &ip.to_string(),
            wait,
            &rid,
        ));
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
    if let Ok(mut w) = state.workers.write() {
        w.insert(row.peer_id.clone(), row);
    }
    Ok(axum::Json(resp).into_response())
}

async fn heartbeat(
    State(state): St,
    Signed {
        peer,
        body: req,
        rid,
        ip,
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
    state
        .writer
        .submit(
            Command::Heartbeat {
                peer_id: peer_id.clone(),
                models: req.models.clone(),
                addresses: req.addresses.clone(),
                active_jobs: req.load.active_jobs,
                queue_depth: req.load.queue_depth,
                now_secs: now,
            },
            Some(rid.clone()),
        )
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    if let Ok(mut map) = state.workers.write()
        && let Some(w) = map.get_mut(&peer_id)
    {
        w.last_seen = now;
        w.active_jobs = req.load.active_jobs;
        w.queue_depth = req.load.queue_depth;
        if let Some(m) = req.models {
            w.models = m;
        }
        if let Some(a) = req.addresses {
            w.addresses = a;
        }
    }
    Ok(axum::Json(HeartbeatResponse {
        ok: true,
        last_seen: now,
    })
    .into_response())
}

async fn list_workers(State(state): St, headers: HeaderMap) -> Result<Response, ApiError> {
    let rid = request_id(&headers);
    let now = unix_secs();
    let reps = state
        .read_with(crate::ledger::worker_reputations)
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    let mut workers: Vec<WorkerInfo> = state
        .workers
        .read()
        .map_err(|_| ApiError::internal("worker table poisoned"))?
        .values()
        .map(|w| {
            let mut i = worker_info(&state.cfg, w, now);
            i.reputation = reps.get(&w.peer_id).and_then(reputation_info);
            i
        })
        .collect();
    workers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
    Ok(axum::Json(WorkersResponse { workers }).into_response())
}

async fn bootstrap(State(state): St) -> Result<Response, ApiError> {
    let now = unix_secs();
    let ttl = state.cfg.worker_ttl.as_secs();
    let mut live: Vec<&WorkerRow>;
    let map = state
        .workers
        .read()
        .map_err(|_| ApiError::internal("worker table poisoned"))?;
    live = map
        .values()
        .filter(|w| now.saturating_sub(w.last_seen) <= ttl && !w.addresses.is_empty())
        .collect();
    // Workers with a verified proof first, then the longest registered;
    // at most `bootstrap_per_ip` from one IP, so one address cannot fill
    // the list with ids it made up.
    live.sort_by_key(|w| (w.verified_gflops.is_none(), w.registered_at));
    let ips = state
        .worker_ips
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
    live.retain(|w| match ips.get(&w.peer_id) {
        Some(ip) => {
            let n = per_ip.entry(*ip).or_insert(0);
            *n += 1;
            *n <= state.cfg.bootstrap_per_ip
        }
        None => true,
    });
    // The operator's relays first: a node behind NAT needs one to be reached.
    let mut peers: Vec<BootstrapPeer> = Vec::new();
    for r in &state.cfg.relays {
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
    peers.extend(
        live.into_iter()
            .take(state.cfg.bootstrap_peers)
            .map(|w| BootstrapPeer {
                peer_id: w.peer_id.clone(),
                addresses: w.addresses.clone(),
                relay: false,
            }),
    );
    Ok(axum::Json(BootstrapResponse { peers }).into_response())
}

fn new_job_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

async fn authorize(
    State(state): St,
    SignedBytes {
        peer: user,
        bytes: body,
        rid,
        ip,
    }: SignedBytes,
) -> Result<Response, ApiError> {
    if let Err(wait) = state.authorize_ip_limiter.check(&ip) {
        return Err(rate_limited(
            &state,
            "authorize_ip",
            &ip.to_string(),
            wait,
            &rid,
        ));
    }
    let user_id = user.to_base58();
    let refuse = |reason: &str, detail: String| {
        state.audit.record(
            "authorize.refused",
            Some(&rid),
            json!({ "user": user_id, "reason": reason, "detail": detail }),
        );
    };
    if let Err(wait) = state.authorize_limiter.check(&user_id) {
        refuse("rate_limited", format!("retry in {wait} s"));
        return Err(rate_limited(&state, "authorize", &user_id, wait, &rid));
    }
    let req: AuthorizeRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => {
            refuse("bad_request", e.message.clone());
            return Err(e.with_request_id(&rid));
        }
    };
    if req.model.is_empty() || req.model.len() > 256 {
        refuse("bad_request", "model".into());
        return Err(ApiError::bad_request("model must be 1 to 256 bytes").with_request_id(&rid));
    }
    let worker = match parse_account_id(&req.worker) {
        Ok(w) => w.to_base58(),
        Err(e) => {
            refuse("bad_request", e.to_string());
            return Err(ApiError::bad_request(format!("worker: {e}")).with_request_id(&rid));
        }
    };
    if worker == user_id {
        refuse("bad_request", "self".into());
        return Err(ApiError::bad_request("a user cannot buy from itself").with_request_id(&rid));
    }
    let now = unix_secs();
    let multiplier_milli = {
        let map = state
            .workers
            .read()
            .map_err(|_| ApiError::internal("worker table poisoned"))?;
        let unavailable = |why: String| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, why)
                .with_request_id(&rid)
        };
        match map.get(&worker) {
            None => {
                refuse("unknown_worker", worker.clone());
                return Err(unavailable(format!("worker {worker} is not registered")));
            }
            Some(w) if now.saturating_sub(w.last_seen) > state.cfg.worker_ttl.as_secs() => {
                refuse("worker_not_alive", worker.clone());
                return Err(unavailable(format!(
                    "worker {worker} was last seen {} s ago",
                    now.saturating_sub(w.last_seen)
                )));
            }
            Some(w) if !w.models.iter().any(|m| m == &req.model) => {
                refuse("model_not_served", req.model.clone());
                return Err(unavailable(format!(
                    "worker {worker} does not serve {}",
                    req.model
                )));
            }
            Some(w) => w.multiplier_milli,
        }
    };
    let amount = state.cfg.reservation_secs.saturating_mul(multiplier_milli);
    let job_id = new_job_id();
    let exp = now + state.cfg.ticket_ttl.as_secs();
    let out = state
        .writer
        .submit(
            Command::Reserve {
                user: user_id.clone(),
                worker: worker.clone(),
                model: req.model.clone(),
                job_id: job_id.clone(),
                amount,
                multiplier_milli,
                starter_grant: state.cfg.starter_credits_milli,
                grant_policy: GrantPolicy {
                    ip: ip.to_string(),
                    per_ip_per_day: state.cfg.starter_grants_per_ip_per_day,
                    per_hour_milli: state.cfg.starter_milli_per_hour,
                    pow_bits: state.cfg.starter_pow_bits,
                    pow_ok: state.cfg.starter_pow_bits == 0
                        || req.pow.as_deref().is_some_and(|n| {
                            n.len() <= 64
                                && troop_protocol::usage::pow_bits(&user_id, n)
                                    >= state.cfg.starter_pow_bits
                        }),
                },
                expires_at: exp,
                now_ms: unix_ms(),
            },
            Some(rid.clone()),
        )
        .await;
    match out {
        Ok(Outcome::Reserved { granted, .. }) if granted > 0 => {
            metrics::counter!("troop_starter_grants_total", "result" => "granted").increment(1);
            metrics::counter!("troop_starter_credits_granted_total").increment(granted as u64);
            state.audit.record(
                "starter.granted",
                Some(&rid),
                json!({ "user": user_id, "ip": ip.to_string(), "amount_milli": granted }),
            );
        }
        Ok(_) => {}
        Err(e) => {
            if let LedgerError::GrantRefused(reason) = &e {
                metrics::counter!("troop_starter_grants_total", "result" => "refused").increment(1);
                state.audit.record(
                    "starter.refused",
                    Some(&rid),
                    json!({ "user": user_id, "ip": ip.to_string(), "reason": reason }),
                );
                refuse("starter_refused", reason.clone());
            } else if matches!(e, LedgerError::InsufficientFunds { .. }) {
                metrics::counter!("troop_payment_required_total").increment(1);
                refuse("insufficient_credits", e.to_string());
            } else {
                refuse("ledger", e.to_string());
            }
            return Err(ledger_error(&state, e, &rid));
        }
    }
    let claims = TicketClaims {
        iss: TICKET_ISSUER.into(),
        sub: user_id.clone(),
        aud: worker.clone(),
        model: req.model.clone(),
        jti: job_id.clone(),
        iat: now,
        nbf: now,
        exp,
        max_tokens: req.max_tokens,
        reserved_milli: amount,
    };
    let signer = state.clone();
    let signed = tokio::task::spawn_blocking(move || signer.keys.sign(&claims)).await;
    let ticket = match signed {
        Ok(Ok(t)) => t,
        other => {
            tracing::error!(?other, "ticket signing failed");
            let _ = state
                .writer
                .submit(
                    Command::Cancel {
                        job_id: job_id.clone(),
                        now_ms: unix_ms(),
                    },
                    Some(rid.clone()),
                )
                .await;
            refuse("signing_failed", job_id);
            return Err(ApiError::internal("ticket signing failed").with_request_id(&rid));
        }
    };
    metrics::counter!("troop_tickets_issued_total").increment(1);
    state.audit.record(
        "authorize.granted",
        Some(&rid),
        json!({ "user": user_id, "worker": worker, "model": req.model, "job_id": job_id, "reserved_milli": amount, "exp": exp }),
    );
    Ok(axum::Json(AuthorizeResponse {
        ticket,
        job_id,
        worker,
        model: req.model,
        reserved: credits_from_milli(amount),
        expires_at: exp,
        kid: state.keys.kid.clone(),
    })
    .into_response())
}

async fn submit_receipt(
    State(state): St,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let rid = request_id(&headers);
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let refuse = |event: &str, code: ErrorCode, msg: String| {
        security_event(
            &state,
            event,
            &rid,
            json!({ "path": "/transactions/submit", "reason": msg }),
        );
        ApiError::unauthorized(code, msg).with_request_id(&rid)
    };
    let Some(mac) = h(HEADER_RECEIPT_MAC) else {
        return Err(refuse(
            "bad_hmac",
            ErrorCode::Unauthorized,
            format!("missing header {HEADER_RECEIPT_MAC}"),
        ));
    };
    let Some(ts) = h(HEADER_TIMESTAMP).and_then(|t| t.parse::<u64>().ok()) else {
        return Err(refuse(
            "bad_hmac",
            ErrorCode::Unauthorized,
            format!("missing or malformed {HEADER_TIMESTAMP}"),
        ));
    };
    let receipt: Receipt = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => {
            security_event(
                &state,
                "malformed_receipt",
                &rid,
                json!({ "reason": e.message }),
            );
            return Err(e.with_request_id(&rid));
        }
    };
    let key = state
        .workers
        .read()
        .map_err(|_| ApiError::internal("worker table poisoned"))?
        .get(&receipt.worker)
        .map(|w| w.receipt_key.clone());
    let Some(key) = key else {
        return Err(refuse(
            "unknown_worker",
            ErrorCode::UnknownWorker,
            format!("worker {:.60} is not registered", receipt.worker),
        ));
    };
    if !verify_receipt_mac(&key, ts, &body, mac) {
        return Err(refuse(
            "bad_hmac",
            ErrorCode::BadSignature,
            "receipt HMAC does not verify".into(),
        ));
    }
    let now = unix_secs();
    if now.abs_diff(ts) > state.cfg.max_skew_secs {
        return Err(refuse(
            "stale_timestamp",
            ErrorCode::StaleTimestamp,
            format!(
                "timestamp {ts} is {} s from the server's clock",
                now.abs_diff(ts)
            ),
        ));
    }
    let sha = hex::encode(Sha256::digest(&body));
    let job_id = receipt.job_id.clone();
    let out = state
        .writer
        .submit(
            Command::Settle {
                receipt,
                receipt_sha256: sha,
                now_ms: unix_ms(),
                unacked_cap_ms: state.cfg.unacked_cap_secs.saturating_mul(1000),
                tolerance_ms: state.cfg.clock_tolerance_ms,
            },
            Some(rid.clone()),
        )
        .await;
    let settlement = match out {
        Ok(Outcome::Settled(s)) => s,
        Ok(_) => return Err(ApiError::internal("unexpected ledger outcome").with_request_id(&rid)),
        Err(e) => {
            if matches!(e, LedgerError::Conflict(_)) {
                security_event(
                    &state,
                    "receipt_conflict",
                    &rid,
                    json!({ "job_id": job_id }),
                );
            } else if let LedgerError::BadAck(reason) = &e {
                security_event(
                    &state,
                    "bad_ack",
                    &rid,
                    json!({ "job_id": job_id, "reason": reason }),
                );
            } else {
                state.audit.record(
                    "receipt.refused",
                    Some(&rid),
                    json!({ "job_id": job_id, "reason": e.to_string() }),
                );
            }
            return Err(ledger_error(&state, e, &rid));
        }
    };
    if settlement.replayed {
        security_event(
            &state,
            "replay",
            &rid,
            json!({ "kind": "receipt", "job_id": settlement.job_id }),
        );
    }
    Ok(axum::Json(SettlementResponse {
        job_id: settlement.job_id,
        outcome: settlement.outcome.to_string(),
        cost: credits_from_milli(settlement.cost),
        refunded: credits_from_milli(settlement.refunded),
        replayed: settlement.replayed,
    })
    .into_response())
}

fn account_param(id: &str, rid: &str) -> Result<String, ApiError> {
    parse_account_id(id)
        .map(|p| p.to_base58())
        .map_err(|e| ApiError::bad_request(e.to_string()).with_request_id(rid))
}

async fn balance(
    State(state): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rid = request_id(&headers);
    let account = account_param(&id, &rid)?;
    let acc = account.clone();
    let row = state
        .read_with(move |c| crate::admin::balance_of(c, &acc))
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    match row {
        Some(b) => Ok(axum::Json(b).into_response()),
        None => Err(ApiError::not_found(
            ErrorCode::UnknownAccount,
            format!("no account {account}"),
        )
        .with_request_id(&rid)),
    }
}

#[derive(Debug, Deserialize)]
struct Page {
    limit: Option<u32>,
    before: Option<i64>,
}

async fn transactions(
    State(state): St,
    Path(id): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rid = request_id(&headers);
    let account = account_param(&id, &rid)?;
    // A history names counterparties, amounts and session ids: only its
    // owner reads it (admins use `troop-coordinator ledger history`).
    let signer = verify_signed(&state, &headers, &method, &uri, b"", &rid)?;
    if signer.to_base58() != account {
        security_event(
            &state,
            "foreign_history",
            &rid,
            json!({ "account": account, "signer": signer.to_base58() }),
        );
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Unauthorized,
            "a transaction history is readable only with its own account's signature",
        )
        .with_request_id(&rid));
    }
    let Query(page) =
        page.map_err(|e| ApiError::bad_request(e.body_text()).with_request_id(&rid))?;
    let limit = page.limit.unwrap_or(50).clamp(1, 500);
    let before = page.before.unwrap_or(i64::MAX);
    let acc = account.clone();
    let (exists, entries) = state
        .read_with(move |c| {
            let exists = crate::admin::balance_of(c, &acc)?.is_some();
            Ok((exists, crate::admin::history(c, &acc, before, limit)?))
        })
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    if !exists {
        return Err(ApiError::not_found(
            ErrorCode::UnknownAccount,
            format!("no account {account}"),
        )
        .with_request_id(&rid));
    }
    let next_before = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e: &TransactionEntry| e.id))
        .flatten();
    Ok(axum::Json(TransactionsResponse {
        account,
        transactions: entries,
        next_before,
    })
    .into_response())
}

/// Refunds reservations whose ticket expired more than the grace period
/// ago, and keeps the in-memory tables bounded.
pub async fn sweeper(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(state.cfg.sweep_interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = unix_secs();
        let cutoff = now.saturating_sub(state.cfg.reservation_grace.as_secs());
        loop {
            match state
                .writer
                .submit(
                    Command::ExpireDue {
                        cutoff_secs: cutoff,
                        now_ms: unix_ms(),
                        limit: 1000,
                    },
                    None,
                )
                .await
            {
                Ok(Outcome::Expired { jobs }) => {
                    if !jobs.is_empty() {
                        tracing::info!(count = jobs.len(), "refunded expired reservations");
                    }
                    if jobs.len() < 1000 {
                        break;
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "expiry sweep failed");
                    break;
                }
            }
        }
        let skew = state.cfg.max_skew_secs;
        if let Ok(mut n) = state.nonces.lock() {
            n.retain(|_, ts| now.saturating_sub(*ts) <= skew);
        }
        state.discovery_limiter.prune();
        state.authorize_limiter.prune();
        state.authorize_ip_limiter.prune();
        state.register_ip_limiter.prune();
    }
}

/// Parses a `BalanceResponse` row helper used by both HTTP and the CLI.
pub fn balance_json(account: &str, cp: i64, dp: i64, dpend: i64) -> BalanceResponse {
    BalanceResponse {
        account: account.to_string(),
        available: credits_from_milli(cp - dp - dpend),
        pending: credits_from_milli(dpend),
        credited: credits_from_milli(cp),
        debited: credits_from_milli(dp),
    }
}
