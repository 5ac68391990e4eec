//! Prometheus metrics (the `metrics` crate with its Prometheus exporter).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        "troop_http_requests_total",
        "HTTP requests by route, method and status"
    );
    metrics::describe_histogram!(
        "troop_http_request_duration_seconds",
        "HTTP request latency by route"
    );
    metrics::describe_counter!("troop_tickets_issued_total", "Tickets signed by /authorize");
    metrics::describe_counter!(
        "troop_settlements_total",
        "Receipts that moved credits to a worker"
    );
    metrics::describe_counter!(
        "troop_refunds_total",
        "Reservations given back (failed, cancelled or expired)"
    );
    metrics::describe_counter!("troop_payment_required_total", "/authorize answered 402");
    metrics::describe_counter!("troop_rate_limited_total", "Requests answered 429");
    metrics::describe_counter!(
        "troop_security_events_total",
        "Bad signatures, bad HMACs, replays, stale timestamps"
    );
    metrics::describe_counter!("troop_ledger_commits_total", "Ledger group commits");
    metrics::describe_histogram!("troop_ledger_batch_size", "Commands per ledger commit");
}

/// Adds `X-Response-Time` and records per-route counters and latencies.
pub async fn track(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let mut resp = next.run(req).await;
    let elapsed = start.elapsed();
    let status = resp.status().as_u16().to_string();
    metrics::counter!("troop_http_requests_total", "route" => route.clone(), "method" => method.clone(), "status" => status.clone()).increment(1);
    metrics::histogram!("troop_http_request_duration_seconds", "route" => route, "method" => method, "status" => status)
        .record(elapsed.as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(&format!("{:.3}ms", elapsed.as_secs_f64() * 1000.0)) {
        resp.headers_mut().insert("x-response-time", v);
    }
    resp
}
