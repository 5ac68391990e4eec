//! HTTP routes of the coordinator: the router and its middleware here,
//! one module per resource (workers, tickets, receipts, accounts; the
//! proof of hardware in `hardware.rs`), and the sweeper in `crate::sweeper`.

mod accounts;
mod audits;
pub mod hardware;
mod receipts;
mod tickets;
mod workers;

pub use crate::admin::balance_json;
use crate::http::extract::replay_refused;
use crate::pg;
use accounts::{balance, transactions};
use receipts::submit_receipt;
use tickets::authorize;
use troop_protocol::sync::MutexExt as _;
use workers::{bootstrap, heartbeat, leave, list_workers, register};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::RngCore;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use troop_protocol::api::{
    AuthorizeRequest, AuthorizeResponse, BootstrapPeer, BootstrapResponse, HeartbeatRequest,
    HeartbeatResponse, Load, RegisterRequest, RegisterResponse, ReputationInfo, SettlementResponse,
    TransactionEntry, TransactionsResponse, WorkerInfo, WorkersResponse,
};
use troop_protocol::identity::parse_account_id;
use troop_protocol::receipt::{HEADER_RECEIPT_MAC, Receipt, verify_receipt_mac};
use troop_protocol::signed::HEADER_TIMESTAMP;
use troop_protocol::ticket::{TICKET_ISSUER, TicketClaims};
use troop_protocol::{ErrorCode, credits_from_milli};

use crate::http::error::{ApiError, parse_json};
use crate::http::extract::{Signed, SignedBytes};
pub(crate) use crate::http::extract::{
    client_ip, ledger_error, request_id, security_event, verify_signed,
};
use crate::ledger::{Command, GrantPolicy, LedgerError, Outcome, WorkerRow};
use crate::{AppState, unix_ms, unix_secs};

type St = State<Arc<AppState>>;

/// Builds the router with its middleware: request ids, response time,
/// metrics, body limit, request timeout, JSON errors everywhere.
pub fn app(state: Arc<AppState>) -> Router {
    let discovery = Router::new()
        .route("/workers", get(list_workers))
        .route("/bootstrap", get(bootstrap))
        .route("/users/{id}/balance", get(balance))
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
        .route("/users/{id}/transactions", get(transactions))
        .route("/workers/register", post(register))
        .route("/workers/heartbeat", post(heartbeat))
        .route("/workers/leave", post(leave))
        .route("/authorize", post(authorize))
        .route("/transactions/submit", post(submit_receipt))
        .route("/audits", post(audits::report_audit))
        .merge(discovery)
        .route("/bench/challenge", post(crate::routes::hardware::challenge))
        // Openings are Merkle paths only: about 140 KB at n = 4096.
        .route("/bench/submit", post(crate::routes::hardware::submit))
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

/// One request against a quota: this replica's own limiter with SQLite,
/// the quota every replica shares (a row in PostgreSQL) otherwise.
pub(crate) async fn check_quota<K>(
    state: &Arc<AppState>,
    scope: &'static str,
    local: &crate::rate_limit::Limiter<K>,
    key: &K,
    per_hour: u32,
    rid: &str,
) -> Result<(), ApiError>
where
    K: std::hash::Hash + Eq + Clone + std::fmt::Display,
{
    let r = if state.shared() {
        state
            .shared_rate(scope, key.to_string(), per_hour)
            .await
            .map_err(|e| ledger_error(state, e, rid))?
    } else {
        local.check(key)
    };
    r.map_err(|wait| rate_limited(state, scope, &key.to_string(), wait, rid))
}

/// One read against the client IP's discovery quota.
pub(crate) async fn check_discovery(
    state: &Arc<AppState>,
    ip: &IpAddr,
    rid: &str,
) -> Result<(), ApiError> {
    check_quota(
        state,
        "discovery",
        &state.discovery_limiter,
        ip,
        state.cfg.discovery_per_hour,
        rid,
    )
    .await
}

async fn discovery_limit(State(state): St, req: Request, next: Next) -> Response {
    let ip = client_ip(&state, &req);
    let rid = request_id(req.headers());
    if let Err(e) = check_discovery(&state, &ip, &rid).await {
        return e.into_response();
    }
    next.run(req).await
}

// ---------------------------------------------------------------------------

async fn health(State(state): St) -> Response {
    let down = state.db_down.locked().and_then(|d| d.clone());
    if let Some(reason) = down {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            axum::Json(json!({
                "status": "unavailable",
                "reason": reason,
                "version": env!("CARGO_PKG_VERSION"),
                "kid": state.keys.kid,
            })),
        )
            .into_response();
    }
    axum::Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "kid": state.keys.kid,
        "starter_pow_bits": state.cfg.starter_pow_bits,
    }))
    .into_response()
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
