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
            // `up`, `waiting` (failing, still advertised) or `withdrawn`
            // (failing past --upstream-gone-secs: nothing advertised).
            "state": match &health {
                Some(h) if h.withdrawn => "withdrawn",
                Some(h) if !h.ok => "waiting",
                _ => "up",
            },
            "down_since_ms": health.as_ref().and_then(|h| h.down_since_ms),
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
            "backend_asked": s.cfg.benchmark.map(|b| b.name()),
            "adapters": troop_bench_kernels::adapters_listed(),
        },
    }))
    .into_response()
}

/// `GET /troop/account`: the worker's earnings, from the coordinator.
async fn account(State(s): State<Arc<Shared>>) -> Response {
    s.account.respond().await
}

/// What the status address tells while the worker waits for its model
/// server at start (before it registers or joins the mesh).
pub(super) struct Waiting {
    pub upstream: String,
    pub coordinator: String,
    pub peer_id: String,
    pub since_ms: u64,
    /// Tries of what is waited for now.
    pub tries: std::sync::atomic::AtomicU64,
    /// `None` while waiting for the model server; then its models' names,
    /// while waiting for the coordinator.
    pub models: std::sync::Mutex<Option<Vec<String>>>,
    pub error: std::sync::Mutex<Option<String>>,
}

impl Waiting {
    /// The model server answered: what is waited for now is the
    /// coordinator.
    pub fn upstream_found(&self, models: Vec<String>) {
        use troop_protocol::sync::MutexExt as _;
        self.tries.store(0, Ordering::Relaxed);
        if let Some(mut e) = self.error.locked() {
            *e = None;
        }
        if let Some(mut m) = self.models.locked() {
            *m = Some(models);
        }
    }

    /// A failed try and why.
    pub fn failed(&self, why: String) {
        use troop_protocol::sync::MutexExt as _;
        self.tries.fetch_add(1, Ordering::Relaxed);
        if let Some(mut e) = self.error.locked() {
            *e = Some(why);
        }
    }

    fn status(&self) -> serde_json::Value {
        use troop_protocol::sync::MutexExt as _;
        let error = self.error.locked().and_then(|e| e.clone());
        let tries = self.tries.load(Ordering::Relaxed);
        let models = self.models.locked().and_then(|m| m.clone());
        let (state, upstream, coordinator) = match models {
            None => (
                "waiting for upstream",
                json!({"url": self.upstream, "healthy": false, "state": "waiting",
                       "down_since_ms": self.since_ms, "tries": tries, "error": error,
                       "models": []}),
                json!({"url": self.coordinator, "state": "not asked yet"}),
            ),
            Some(names) => (
                "waiting for coordinator",
                json!({"url": self.upstream, "healthy": true, "state": "up",
                       "models": names.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()}),
                json!({"url": self.coordinator, "state": "waiting", "tries": tries,
                       "error": error}),
            ),
        };
        json!({
            "role": "worker",
            "state": state,
            "version": env!("CARGO_PKG_VERSION"),
            "peer_id": self.peer_id,
            "coordinator": self.coordinator,
            "uptime_s": unix_ms().saturating_sub(self.since_ms) / 1000,
            "upstream": upstream,
            "waiting_for": {"coordinator": coordinator},
        })
    }
}

/// Serves the status address while the worker waits for its model server:
/// `/troop/status` and `/` say "waiting for upstream" (and why), `/health`
/// answers 503, `/metrics` as usual. Stops when `stop` fires; the same
/// socket then serves the full pages ([`serve`]).
pub(super) fn serve_waiting(
    listener: &tokio::net::TcpListener,
    waiting: Arc<Waiting>,
    allowed_hosts: &[String],
) -> anyhow::Result<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)> {
    let bound = listener.local_addr()?;
    let twin = socket2::SockRef::from(listener).try_clone()?;
    let std_listener: std::net::TcpListener = twin.into();
    std_listener.set_nonblocking(true)?;
    let twin = tokio::net::TcpListener::from_std(std_listener)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let w = waiting.clone();
    let w2 = waiting.clone();
    let w3 = waiting.clone();
    let app = Router::new()
        .route(
            "/troop/status",
            get(move || {
                let w = w.clone();
                async move { axum::Json(w.status()) }
            }),
        )
        .route(
            "/",
            get(move || {
                let w = w2.clone();
                async move {
                    let v = w.status();
                    let text = if v["state"] == "waiting for upstream" {
                        format!(
                            "Troop worker {}: waiting for upstream (the model server at {}); tried {} times: {}. Nothing is advertised until it answers; this page reloads.",
                            w.peer_id,
                            w.upstream,
                            v["upstream"]["tries"],
                            v["upstream"]["error"].as_str().unwrap_or("no answer yet")
                        )
                    } else {
                        let c = &v["waiting_for"]["coordinator"];
                        format!(
                            "Troop worker {}: the model server answers; waiting for the coordinator at {} (tried {} times: {}). The worker registers and serves once it answers; this page reloads.",
                            w.peer_id,
                            w.coordinator,
                            c["tries"],
                            c["error"].as_str().unwrap_or("no answer yet")
                        )
                    };
                    axum::response::Html(format!(
                        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=5><title>Troop worker: waiting</title><p>{}</p>",
                        html_escape(&text)
                    ))
                }
            }),
        )
        .route(
            "/health",
            get(move || {
                let w = w3.clone();
                async move {
                    (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(json!({"status": w.status()["state"]})),
                    )
                }
            }),
        )
        .merge(crate::web::common_routes())
        .layer(axum::middleware::from_fn_with_state(
            crate::web::Access::new(bound.ip(), allowed_hosts, &[]),
            crate::web::guard,
        ));
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) = axum::serve(twin, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "the waiting status page stopped");
        }
    });
    Ok((stop, task))
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
