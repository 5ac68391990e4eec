//! Costs that stay flat as the ledger grows, printed, never asserted:
//! `/authorize` latency (p50 / p99, sequential, each from a new user: a
//! starter grant and a reservation, each checked against the ledger's
//! invariants) and settlements/s through the writer, on ledgers that
//! already hold 10, 10,000 and 1,000,000 accounts, in one run.
//!
//! `cargo bench -p troop-coordinator --bench accounts` (env: ACCOUNTS, a
//! comma-separated list of sizes; REQUESTS, per size; BENCH_JSON, a file
//! for the figures).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{TestCoordinator, env_usize, receipt_for, settle_through_writer};
use futures::StreamExt;
use troop_coordinator::ledger::{self, MINT};
use troop_protocol::api::AuthorizeResponse;
use troop_protocol::identity::generate;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// A ledger with `n` funded user accounts (minted as grants are).
fn seed(path: &std::path::Path, n: usize) {
    let mut conn = ledger::open(path).expect("ledger");
    let tx = conn.transaction().expect("tx");
    {
        let mut ins = tx
            .prepare(
                "INSERT INTO accounts (id, kind, credits_posted, created_at) VALUES (?1, 'user', 3600000, 0)",
            )
            .expect("insert");
        for i in 0..n {
            ins.execute([format!("bench-account-{i:08}")])
                .expect("account");
        }
    }
    tx.execute(
        "UPDATE accounts SET debits_posted = debits_posted + ?1 WHERE id = ?2",
        rusqlite::params![n as i64 * 3_600_000, MINT],
    )
    .expect("mint");
    ledger::check_invariants_full(&mut troop_coordinator::db::Lite(&tx))
        .expect("a consistent seed");
    tx.commit().expect("commit");
}

struct Row {
    accounts: usize,
    seed_s: f64,
    start_s: f64,
    p50: f64,
    p99: f64,
    settle_per_s: f64,
}

async fn measure(accounts: usize, requests: usize) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    seed(&dir.path().join("ledger.sqlite3"), accounts);
    let seed_s = t.elapsed().as_secs_f64();
    let mut cfg = common::config(dir.path());
    cfg.authorize_per_hour = 1_000_000;
    cfg.discovery_per_hour = 1_000_000;
    cfg.sweep_interval = std::time::Duration::from_secs(3600);
    let t = Instant::now();
    let running = troop_coordinator::spawn(cfg, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("coordinator starts");
    let start_s = t.elapsed().as_secs_f64();
    let c = Arc::new(TestCoordinator {
        postgres: None,
        url: running.url(),
        running: Some(running),
        dir,
        http: reqwest::Client::new(),
    });
    let worker = generate();
    c.register(&worker, &["m"]).await;
    // Warm-up, then one request at a time: latency, not throughput.
    for _ in 0..20 {
        assert_eq!(c.authorize(&generate(), &worker, "m").await.status(), 200);
    }
    let mut lat = Vec::with_capacity(requests);
    let mut jobs = Vec::with_capacity(requests);
    for _ in 0..requests {
        let user = generate();
        let t = Instant::now();
        let r = c.authorize(&user, &worker, "m").await;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.status(), 200, "authorize");
        jobs.push((user, r.json::<AuthorizeResponse>().await.expect("json")));
    }
    // Settlements through the writer alone, all at once (group commit).
    let state = c.running.as_ref().expect("running").state.clone();
    let t = Instant::now();
    futures::stream::iter(jobs.iter())
        .map(|(user, a)| {
            let state = state.clone();
            let receipt = receipt_for(&a.job_id, user, &worker, "m", 1_000);
            async move { settle_through_writer(&state, receipt).await }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    let settle_per_s = jobs.len() as f64 / t.elapsed().as_secs_f64();
    Row {
        accounts,
        seed_s,
        start_s,
        p50: pct(&mut lat, 0.5),
        p99: pct(&mut lat, 0.99),
        settle_per_s,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::var("ACCOUNTS")
        .unwrap_or_else(|_| "10,10000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let requests = env_usize("REQUESTS", 300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rows: Vec<Row> = rt.block_on(async {
        let mut rows = Vec::new();
        for &n in &sizes {
            eprintln!("[accounts bench] {n} accounts");
            rows.push(measure(n, requests).await);
        }
        rows
    });
    let base = rows.first().map(|r| r.p50).unwrap_or(1.0);
    println!(
        "\nledger size benchmark ({requests} sequential /authorize per size, each a new user)"
    );
    println!(
        "| accounts | /authorize p50 / p99 | p50 vs the smallest | settlements/s (writer) | seed / start-up (full check) |"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} / {:.2} ms | {:.2}x | {:.0} | {:.1} / {:.2} s |",
            r.accounts,
            r.p50,
            r.p99,
            r.p50 / base,
            r.settle_per_s,
            r.seed_s,
            r.start_s
        );
    }
    println!("goal: p50 within 1.3x across sizes");
    if let Ok(path) = std::env::var("BENCH_JSON") {
        let sizes: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "accounts": r.accounts, "authorize_p50_ms": r.p50, "authorize_p99_ms": r.p99,
                    "settlements_per_s_writer": r.settle_per_s, "startup_s": r.start_s,
                })
            })
            .collect();
        let v = serde_json::json!({ "requests": requests, "sizes": sizes });
        std::fs::write(path, v.to_string()).expect("write BENCH_JSON");
    }
}
