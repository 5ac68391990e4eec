//! Prometheus metrics shared by every role (feature `telemetry`): one
//! process-wide recorder from the `metrics` crate's Prometheus exporter,
//! and the HTTP middleware that counts requests by route and status.
//!
//! One recorder per process: the coordinator, a gateway and a worker that
//! run in one process (the tests, `troop demo`) report into the same one.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Histogram buckets for every metric whose name ends in `_seconds`.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the process-wide recorder once and returns its handle (`None`
/// when another recorder was installed first).
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Suffix("_chunks".into()),
                    &[
                        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 4000.0,
                    ],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            // Histogram samples wait in buckets until drained: drain them
            // every 5 s even when nobody scrapes, so memory stays flat.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            Some(handle)
        })
        .clone()
}

/// The Prometheus text of everything recorded so far.
pub fn render() -> String {
    handle().map(|h| h.render()).unwrap_or_default()
}

/// `GET /metrics`: Prometheus text format 0.0.4.
pub async fn metrics_response() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        render(),
    )
        .into_response()
}

fn describe() {
    metrics::describe_counter!(
        "troop_http_requests_total",
        "HTTP requests by route, method and status"
    );
    metrics::describe_histogram!(
        "troop_http_request_duration_seconds",
        "HTTP request latency by route (to the response head)"
    );
    metrics::describe_counter!(
        "troop_limit_hits_total",
        "Requests or streams refused by a limit, by limit"
    );
    metrics::describe_counter!("troop_bad_frames_total", "Undecodable frames, by reason");
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
