//! A short chaos run (about a minute, fixed seed): workers killed with
//! SIGKILL and restarted, a relay and a gateway killed and restarted, a
//! model server restarted and a worker's traffic dropped, under a steady
//! stream of requests. Nothing is lost, garbled or billed twice, every
//! answer is whole (resumed allowed) or ends with a clear error, users pay
//! no more than what arrived, and the ledger audit is clean. The long run
//! and its figures: `scripts/chaos`.

mod common;
#[path = "chaos/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{ChaosOptions, Outcome};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_churn_loses_nothing_and_bills_each_request_once() {
    if let Err(why) = harness_root_check() {
        eprintln!("note: {why}");
    }
    let report = harness::run(ChaosOptions {
        duration: Duration::from_secs(45),
        workers: 12,
        gateways: 3,
        clients: 6,
        // About 6 kills in the run.
        kill_per_min: 0.6,
        seed: 7,
        answer_tokens: 20,
        token_delay: Duration::from_millis(15),
        troop: env!("CARGO_BIN_EXE_troop").into(),
    })
    .await;
    report.print();
    assert!(report.judged() >= 100, "too few requests to judge");
    assert_eq!(report.count(Outcome::Lost), 0, "requests lost");
    assert_eq!(report.count(Outcome::Garbled), 0, "answers garbled");
    assert_eq!(report.billed_twice(), 0, "billed beyond what was served");
    assert!(
        report.ledger_findings.is_empty(),
        "{:?}",
        report.ledger_findings
    );
    // Each acknowledged request settles at most once, and never beyond
    // what the users saw (2 s clock tolerance per request, generously).
    assert!(
        report.charged_secs <= report.observed_secs + 2.0 * report.samples.len() as f64,
        "charged {} s for {} s observed",
        report.charged_secs,
        report.observed_secs
    );
    assert!(
        report.completion() >= 0.95,
        "completion {:.3}",
        report.completion()
    );
    let faults = report.faults.join("\n");
    assert!(
        faults.contains("SIGKILL") && faults.contains("relay-0"),
        "{faults}"
    );
    if std::env::var_os("TROOP_REQUIRE_ROOT_TESTS").is_some() {
        assert!(
            report.skipped.is_empty(),
            "faults skipped: {:?}",
            report.skipped
        );
    }
}

fn harness_root_check() -> Result<(), String> {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if root {
        Ok(())
    } else {
        Err("skipped: the iptables fault needs root".into())
    }
}
