//! The chaos run at length, printed, never asserted (`scripts/chaos`):
//! a coordinator, 2 relays, 12 workers and 3 gateways on this machine,
//! each node its own process, under a steady stream of requests while
//! workers are killed with SIGKILL and restarted (10 % of them per minute
//! by default), a relay and a gateway are killed and restarted, a model
//! server restarts and a worker's traffic is dropped (iptables, as root).
//! Prints completion, TTFT and total-time percentiles with their
//! coefficient of variation, resumed answers, and the money: requests
//! billed twice, served and never billed, users' charges against what
//! they saw, the ledger audit.
//!
//! Env: CHAOS_SECS (600), CHAOS_WORKERS (12), CHAOS_GATEWAYS (3),
//! CHAOS_CLIENTS (6), CHAOS_KILL_PER_MIN (0.1), CHAOS_SEED (1).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/chaos/harness.rs"]
mod harness;

use std::time::Duration;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the
    // command line.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let opts = harness::ChaosOptions {
        duration: Duration::from_secs(env("CHAOS_SECS", 600)),
        workers: env("CHAOS_WORKERS", 12),
        gateways: env("CHAOS_GATEWAYS", 3),
        clients: env("CHAOS_CLIENTS", 6),
        kill_per_min: env("CHAOS_KILL_PER_MIN", 0.1),
        seed: env("CHAOS_SEED", 1),
        answer_tokens: 20,
        token_delay: Duration::from_millis(15),
        troop: env!("CARGO_BIN_EXE_troop").into(),
    };
    eprintln!("chaos: {opts:?}");
    let report = rt.block_on(harness::run(opts));
    report.print();
}
