//! What the gateway's and the worker's HTTP servers share for people:
//! the pages (static assets built into the binary: no download, no CDN),
//! `/metrics`, `/troop/account`, and the warning for a public bind.
//!
//! Pages read only the JSON endpoints next to them; nothing secret is in
//! a page or an endpoint (the identity key never leaves the process).

use std::net::SocketAddr;
use std::sync::Once;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

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

/// Least time between two reads of the account from the coordinator,
/// however many pages poll (a history read costs the account's quota at
/// the coordinator: 1,200 an hour by default).
pub const ACCOUNT_MIN_AGE: Duration = Duration::from_secs(3);

/// The node's account as last read from the coordinator, for the pages:
/// one read at a time, at most one per [`ACCOUNT_MIN_AGE`]; after a
/// refusal (429 with `Retry-After`, or the coordinator away) the last good
/// copy is served, marked stale, until the wait is over.
pub struct AccountView {
    client: CoordinatorClient,
    cache: tokio::sync::Mutex<AccountCache>,
}

#[derive(Default)]
struct AccountCache {
    body: Option<Value>,
    fetched: Option<Instant>,
    fetched_at_ms: u64,
    not_before: Option<Instant>,
    problem: Option<String>,
}

impl AccountView {
    pub fn new(client: CoordinatorClient) -> Self {
        Self {
            client,
            cache: tokio::sync::Mutex::new(AccountCache::default()),
        }
    }

    /// `GET /troop/account`: this node's balance and its latest
    /// transactions (the history signed with this node's key: histories
    /// are private). 502 with a reason when the coordinator was never read.
    pub async fn respond(&self) -> Response {
        let mut c = self.cache.lock().await;
        let now = Instant::now();
        let due = c
            .fetched
            .is_none_or(|t| now.duration_since(t) >= ACCOUNT_MIN_AGE)
            && c.not_before.is_none_or(|t| now >= t);
        if due {
            match self.fetch().await {
                Ok(body) => {
                    c.body = Some(body);
                    c.fetched = Some(now);
                    c.fetched_at_ms = unix_ms();
                    c.not_before = None;
                    c.problem = None;
                }
                Err((wait, problem)) => {
                    tracing::debug!(%problem, "account not read from the coordinator");
                    c.not_before = Some(now + wait);
                    c.problem = Some(problem);
                }
            }
        }
        match &c.body {
            Some(body) => {
                let mut body = body.clone();
                body["fetched_at_ms"] = json!(c.fetched_at_ms);
                body["stale"] = json!(c.problem.is_some());
                body["problem"] = json!(c.problem);
                axum::Json(body).into_response()
            }
            None => coordinator_unreachable(c.problem.as_deref().unwrap_or("not read yet")),
        }
    }

    async fn fetch(&self) -> Result<Value, (Duration, String)> {
        let id = self.client.account_id();
        let zero = || json!({ "account": id, "available": 0.0, "pending": 0.0, "credited": 0.0, "debited": 0.0 });
        let (balance, transactions) = match self.client.my_transactions().await {
            Ok(mut v) => {
                let txs = v
                    .get_mut("transactions")
                    .map(Value::take)
                    .unwrap_or(json!([]));
                match v.get_mut("balance").map(Value::take) {
                    Some(b) if b.is_object() => (b, txs),
                    // A coordinator older than the console: ask the balance too.
                    _ => match self.client.my_balance().await {
                        Ok(b) => (serde_json::to_value(b).unwrap_or_else(|_| zero()), txs),
                        Err(e) => return Err(refusal(&e)),
                    },
                }
            }
            // No transaction yet: the coordinator does not know the account.
            Err(ClientError::Refused { status: 404, .. }) => (zero(), json!([])),
            Err(e) => return Err(refusal(&e)),
        };
        Ok(json!({
            "account": id,
            "coordinator": self.client.base(),
            "balance": balance,
            "transactions": transactions,
        }))
    }
}

/// How long to wait after a failed read, and why it failed.
fn refusal(e: &ClientError) -> (Duration, String) {
    let wait = match e {
        ClientError::Refused {
            status: 429,
            retry_after,
            ..
        } => retry_after.unwrap_or(60),
        _ => 10,
    };
    (
        Duration::from_secs(wait),
        format!("the coordinator did not answer: {e}"),
    )
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn coordinator_unreachable(problem: &str) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        axum::Json(json!({
            "error": { "code": "coordinator_unreachable", "message": problem }
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
