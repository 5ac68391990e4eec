//! The worker's own HTTP server (`--http`, 127.0.0.1:9464 by default):
//! the status page at `/`, `GET /troop/status`, `GET /troop/account`,
//! `/metrics` and `/health`. It only reads: nothing here changes the
//! worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::task::JoinHandle;

use super::{Shared, unix_ms};

/// Binds the worker's status address, first thing at start: a worker that
/// cannot serve it exits before it registers anywhere.
pub(super) async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the worker's status address {addr} (--http; another worker on this machine? give each its own, e.g. --http 127.0.0.1:9465)"
        )
    })
}

/// Serves the worker's pages on `listener` (from [`bind`]).
pub(super) async fn serve(
    s: Arc<Shared>,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let bound = listener.local_addr()?;
    crate::web::warn_if_public(bound, "worker");
    let app = Router::new()
        .route(
            "/",
            get(|| async { crate::web::page(crate::web::WORKER_HTML) }),
        )
        .route("/troop/status", get(status))
        .route("/troop/account", get(account))
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .merge(crate::web::common_routes())
        .layer(axum::middleware::from_fn_with_state(
            crate::web::Access::new(bound.ip(), &s.cfg.allowed_hosts, &[]),
            crate::web::guard,
        ))
        .layer(axum::middleware::from_fn(troop_protocol::telemetry::track))
        .with_state(s);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "worker status server stopped");
        }
    });
    tracing::info!(url = %format!("http://{bound}/"), "worker status page");
    Ok((bound, task))
}

/// `GET /troop/status`: upstream, jobs, receipts, NAT and proof of hardware.
async fn status(State(s): State<Arc<Shared>>) -> Response {
    let net = s.net.status().await;
    let waiting = s.receipts.waiting();
    let st = &s.stats;
    let models = s.models.reading().map(|m| m.clone()).unwrap_or_default();
    let health = s.upstream_health.locked().map(|h| h.clone());
    let proof = s.proof.locked().map(|p| p.clone()).unwrap_or_default();
    let sessions = s.sessions.locked().map(|b| b.open_count()).unwrap_or(0);
    axum::Json(json!({
        "role": "worker",
        "version": env!("CARGO_PKG_VERSION"),
        "peer_id": s.peer_id.to_base58(),
        "coordinator": s.client.base(),
        "uptime_s": unix_ms().saturating_sub(s.started_ms) / 1000,
        "upstream": {
            "url": s.upstream.base,
            "dialect": format!("{:?}", s.upstream.dialect).to_lowercase(),
            "healthy": health.as_ref().map(|h| h.ok),
            "checked_at_ms": health.as_ref().map(|h| h.checked_at_ms),
            "error": health.and_then(|h| h.error),
            "models": models,
        },
        "jobs": {
            "running": st.active_jobs.load(Ordering::Relaxed),
            "max": s.cfg.max_jobs,
            "served": st.jobs_done.load(Ordering::Relaxed),
            "failed": st.jobs_failed.load(Ordering::Relaxed),
            "cancelled": st.jobs_cancelled.load(Ordering::Relaxed),
            "tokens": st.tokens_served.load(Ordering::Relaxed),
            "sessions_open": sessions,
            "ttft_ms": st.ttft_ms(),
            "tokens_per_s": st.tokens_per_s(),
        },
        "receipts": {
            "waiting": waiting,
            "delivered": s.receipts.delivered(),
            "rejected": s.receipts.rejected(),
        },
        "nat": {
            "status": net.nat,
            "relays": net.relay_reservations,
            "listen_addrs": net.listen_addrs,
            "external_addrs": net.external_addrs,
            "hole_punched": net.hole_punched.len(),
            "relayed_peers": net.relayed_peers.len(),
            "connected_peers": net.connected_peers.len(),
        },
        "hardware": {
            "multiplier": s.multiplier.reading().map(|m| *m).unwrap_or(1.0),
            "proof": proof,
        },
    }))
    .into_response()
}

/// `GET /troop/account`: the worker's earnings, from the coordinator.
async fn account(State(s): State<Arc<Shared>>) -> Response {
    s.account.respond().await
}
