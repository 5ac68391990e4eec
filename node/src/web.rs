//! What the gateway's and the worker's HTTP servers share for people:
//! the pages (static assets built into the binary: no download, no CDN),
//! `/metrics`, `/troop/account`, and the warning for a public bind.
//!
//! Pages read only the JSON endpoints next to them; nothing secret is in
//! a page or an endpoint (the identity key never leaves the process).

use std::net::SocketAddr;
use std::sync::Once;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::coordinator_client::{ClientError, CoordinatorClient};

/// The gateway's console (`GET /` on the gateway).
pub const CONSOLE_HTML: &str = include_str!("../assets/console.html");
/// The worker's status page (`GET /` on the worker's `--http`).
pub const WORKER_HTML: &str = include_str!("../assets/worker.html");
/// Styles shared by both pages.
pub const CSS: &str = include_str!("../assets/troop.css");
/// Helpers shared by both pages (fetching, formatting, charts).
pub const JS: &str = include_str!("../assets/troop.js");

/// Every byte a page loads: the HTML, the stylesheet and the script.
pub fn page_weight(html: &str) -> usize {
    html.len() + CSS.len() + JS.len()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// A page: no caching (a new binary brings a new page), no framing by
/// other sites, scripts and styles from this origin only.
pub fn page(html: &'static str) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                ),
            ),
        ],
        html,
    )
        .into_response()
}

/// `/assets/troop.css`, `/assets/troop.js` and `/metrics`, for any state.
pub fn common_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    metrics_handle();
    Router::new()
        .route(
            "/assets/troop.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/assets/troop.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
        .route("/metrics", get(troop_protocol::telemetry::metrics_response))
}

/// Installs the process's Prometheus recorder and describes the node's
/// metrics (once).
pub fn metrics_handle() {
    static DESCRIBED: Once = Once::new();
    troop_protocol::telemetry::handle();
    DESCRIBED.call_once(describe);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "troop_gateway_answers_total",
        "Answers relayed by the gateway, by endpoint kind and outcome"
    );
    describe_counter!(
        "troop_gateway_errors_total",
        "Requests the gateway answered with an error, by OpenAI error code"
    );
    describe_histogram!(
        "troop_gateway_ttft_seconds",
        "Gateway: request sent to the worker until its first frame"
    );
    describe_histogram!(
        "troop_gateway_chunk_gap_seconds",
        "Gateway: time between two frames of one answer"
    );
    describe_histogram!("troop_gateway_answer_chunks", "Gateway: events per answer");
    describe_counter!(
        "troop_tickets_bought_total",
        "Tickets bought from the coordinator, by when (now or ahead)"
    );
    describe_gauge!("troop_peers_connected", "Peers this node is connected to");
    describe_gauge!("troop_workers_known", "Workers in the gateway's table");
    describe_counter!("troop_jobs_total", "Worker jobs finished, by status");
    describe_gauge!("troop_jobs_running", "Worker jobs running now");
    describe_histogram!(
        "troop_worker_ttft_seconds",
        "Worker: request taken until the model's first event"
    );
    describe_counter!(
        "troop_tokens_served_total",
        "Completion tokens the worker's model produced"
    );
    describe_counter!(
        "troop_receipts_queued_total",
        "Receipts written to the worker's queue"
    );
    describe_counter!(
        "troop_receipts_delivered_total",
        "Receipts the coordinator took"
    );
    describe_counter!(
        "troop_receipts_rejected_total",
        "Receipts the coordinator refused for good"
    );
    describe_gauge!(
        "troop_receipts_waiting",
        "Receipts on disk waiting for the coordinator"
    );
}

/// `GET /troop/account`: this node's balance and its latest transactions,
/// read from the coordinator (the history with this node's signature:
/// histories are private). 502 with a reason when the coordinator cannot
/// be reached.
pub async fn account(client: &CoordinatorClient) -> Response {
    let id = client.account_id();
    let (balance, history) = tokio::join!(client.my_balance(), client.my_transactions());
    let balance = match balance {
        Ok(b) => serde_json::to_value(b).unwrap_or_default(),
        Err(ClientError::Refused { status: 404, .. }) => json!({
            "account": id, "available": 0.0, "pending": 0.0, "credited": 0.0, "debited": 0.0
        }),
        Err(e) => return coordinator_unreachable(&e),
    };
    let transactions = match history {
        Ok(v) => v.get("transactions").cloned().unwrap_or(json!([])),
        Err(ClientError::Refused { status: 404, .. }) => json!([]),
        Err(e) => return coordinator_unreachable(&e),
    };
    axum::Json(json!({
        "account": id,
        "coordinator": client.base(),
        "balance": balance,
        "transactions": transactions,
    }))
    .into_response()
}

fn coordinator_unreachable(e: &ClientError) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(json!({
            "error": { "code": "coordinator_unreachable", "message": format!("the coordinator did not answer: {e}") }
        })),
    )
        .into_response()
}

/// Logs a warning when a node's HTTP server is reachable beyond this
/// machine: whoever reaches it can spend (gateway) or watch (worker) its
/// credits.
pub fn warn_if_public(addr: SocketAddr, role: &str) {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the {role}'s HTTP server listens beyond loopback: anyone who reaches {addr} can {}",
            if role == "gateway" {
                "spend this gateway's credits and read its account"
            } else {
                "see this worker's status, earnings and account"
            }
        );
    }
}
