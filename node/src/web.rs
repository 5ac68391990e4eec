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

use troop_protocol::policy::unix_ms;

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

/// Whether a browser page at `origin` may call the API: pages served from
/// this machine (localhost, 127.0.0.1, [::1], any port) always, others
/// when listed (`*`: any).
pub fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/') == origin)
    {
        return true;
    }
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let (host, port) = split_host_port(rest);
    port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

/// `host[:port]` or `[v6][:port]` into the host (brackets kept) and the
/// text after its colon, if any.
fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    let host_len = if authority.starts_with('[') {
        authority.find(']').map_or(authority.len(), |i| i + 1)
    } else {
        authority.find(':').unwrap_or(authority.len())
    };
    let (host, rest) = authority.split_at(host_len);
    (host, rest.strip_prefix(':'))
}

/// Who may call a node's HTTP server (the gateway's API and console, the
/// worker's status page): the `Host` names it answers to and the browser
/// origins it serves.
///
/// - `Host` must be a loopback name or address (`localhost`, `*.localhost`,
///   127.0.0.0/8, `[::1]`), the address the server was told to bind
///   (`--http`; any address literal when that is 0.0.0.0 or `[::]`), or a
///   name given with `--allowed-host`. A page of another site that gets its
///   name resolved to 127.0.0.1 (DNS rebinding) sends its own name and is
///   refused.
/// - `Origin`, when a browser sends one, must be a page of this machine
///   (`origin_allowed`), one given with `--cors-origin`, or this server's
///   own origin (the console served under an allowed `Host`). Browsers send
///   `Origin` on every cross-site POST, `no-cors` ones included, which
///   never see a preflight.
#[derive(Clone, Debug)]
pub struct Access {
    bound: std::net::IpAddr,
    hosts: std::sync::Arc<[String]>,
    origins: std::sync::Arc<[String]>,
}

impl Access {
    pub fn new(bound: std::net::IpAddr, hosts: &[String], origins: &[String]) -> Self {
        Self {
            bound,
            hosts: hosts
                .iter()
                .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            origins: origins.into(),
        }
    }

    /// Whether a request naming `host` (the `Host` header) is for us.
    pub fn host_allowed(&self, host: &str) -> bool {
        let (name, port) = split_host_port(host);
        if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
            return false;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if self.hosts.iter().any(|h| h == &name) {
            return true;
        }
        let literal = name.trim_start_matches('[').trim_end_matches(']');
        // An address literal cannot be a rebinding (no name to resolve):
        // loopback, `0.0.0.0` (Linux connects it to this machine) and ours.
        match literal.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                ip.is_loopback()
                    || ip.is_unspecified()
                    || ip == self.bound
                    || self.bound.is_unspecified()
            }
            Err(_) => false,
        }
    }

    /// Whether a request with `Origin: origin` and `Host: host` may be served.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        if origin_allowed(origin, &self.origins) {
            return true;
        }
        // The server's own pages (a console reached at its LAN address).
        host.is_some_and(|h| {
            self.host_allowed(h)
                && (origin.strip_prefix("http://") == Some(h)
                    || origin.strip_prefix("https://") == Some(h))
        })
    }
}

/// Refuses requests for another `Host` or from a foreign `Origin` (see
/// [`Access`]) with 403 and an OpenAI-shaped error (`forbidden_host`,
/// `forbidden_origin`), counted in `troop_http_refused_total`.
pub async fn guard(
    axum::extract::State(access): axum::extract::State<Access>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // Liveness and metrics carry nothing to steal or spend: probes and
    // Prometheus reach them under any name.
    if req.method() == axum::http::Method::GET && matches!(req.uri().path(), "/health" | "/metrics")
    {
        return next.run(req).await;
    }
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}"))
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(h) = host
        && !access.host_allowed(h)
    {
        return refuse(
            "forbidden_host",
            "host",
            &format!(
                "this server does not answer to the host name {h:?} (a web page with its own name pointed at this machine?); to reach it under that name start it with --allowed-host"
            ),
        );
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let o = origin.to_str().unwrap_or("\u{fffd}");
        if !access.origin_allowed(o, host) {
            return refuse(
                "forbidden_origin",
                "origin",
                &format!(
                    "web pages from {o:?} may not call this server; allow that site with --cors-origin"
                ),
            );
        }
    }
    next.run(req).await
}

fn refuse(code: &str, reason: &'static str, message: &str) -> Response {
    metrics::counter!("troop_http_refused_total", "reason" => reason).increment(1);
    tracing::warn!(reason, "{message}");
    let body = json!({ "error": { "message": message, "type": "invalid_request_error", "param": null, "code": code } });
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

#[cfg(test)]
mod access_tests {
    use super::*;

    fn access(bound: &str, hosts: &[&str]) -> Access {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        Access::new(bound.parse().expect("ip"), &hosts, &[])
    }

    #[test]
    fn hosts_are_loopback_our_address_or_listed() {
        let a = access("127.0.0.1", &["gpu-box.lan"]);
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:3000",
            "[::1]:8080",
            "127.0.0.2:8080",
            "0.0.0.0:8080",
            "gpu-box.lan:8080",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.test:8080",
            "evil.test",
            "localhost.evil.test",
            "192.168.1.5:8080",
            "127.0.0.1:80x",
            "127.0.0.1:",
            "",
        ] {
            assert!(!a.host_allowed(bad), "{bad}");
        }
        assert!(access("192.168.1.5", &[]).host_allowed("192.168.1.5:8080"));
        let any = access("0.0.0.0", &[]);
        assert!(any.host_allowed("10.0.0.7:8080"));
        assert!(!any.host_allowed("rebind.example:8080"));
    }

    #[test]
    fn origins_are_local_listed_or_our_own() {
        let a = Access::new(
            "192.168.1.5".parse().expect("ip"),
            &[],
            &["https://app.example".to_string()],
        );
        assert!(a.origin_allowed("http://localhost:3000", None));
        assert!(a.origin_allowed("http://[::1]:3000", None));
        assert!(a.origin_allowed("https://app.example", None));
        assert!(a.origin_allowed("http://192.168.1.5:8080", Some("192.168.1.5:8080")));
        assert!(!a.origin_allowed("http://evil.example", Some("127.0.0.1:8080")));
        assert!(!a.origin_allowed("null", Some("127.0.0.1:8080")));
        assert!(!a.origin_allowed("http://localhost.evil.example", None));
        assert!(!a.origin_allowed("http://evil.test:8080", Some("evil.test:8080")));
    }
}
