//! Prometheus metrics (the `metrics` crate with its Prometheus exporter).

use std::sync::Once;

use metrics_exporter_prometheus::PrometheusHandle;

pub use troop_protocol::telemetry::track;

/// The process-wide recorder (shared with any gateway or worker in the
/// same process), with the coordinator's metrics described.
pub fn handle() -> Option<PrometheusHandle> {
    static DESCRIBED: Once = Once::new();
    let h = troop_protocol::telemetry::handle();
    DESCRIBED.call_once(describe);
    h
}

fn describe() {
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
