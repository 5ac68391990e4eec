//! Coordinator throughput on loopback, printed, never asserted:
//! * bare RS256 signatures/s (jsonwebtoken, aws-lc-rs) on 1 thread and on all cores;
//! * tickets/s: signed `POST /authorize` with its ledger reservation, concurrent clients;
//! * receipts settled/s: HMAC `POST /transactions/submit`, concurrent clients;
//! * settlements/s through the ledger writer alone (group commit, no HTTP);
//! * 1,000 concurrent readers (each its own connection, 5 balance reads):
//!   p50/p99 latency and how many answers were 5xx or failed.
//!
//! `cargo bench -p troop-coordinator --bench coordinator` (env: TICKETS,
//! CONCURRENCY, READERS).
//! The load generator runs in the same process, on the same cores, as the server.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestCoordinator, env_usize, now_secs, receipt_for, settle_through_writer};
use futures::StreamExt;
use troop_protocol::api::AuthorizeResponse;
use troop_protocol::identity::generate;
use troop_protocol::ticket::{TICKET_ISSUER, TicketClaims};

fn claims(i: usize) -> TicketClaims {
    TicketClaims {
        iss: TICKET_ISSUER.into(),
        sub: "12D3KooWuser".into(),
        aud: "12D3KooWworker".into(),
        model: "m".into(),
        jti: format!("{i:032x}"),
        iat: now_secs(),
        nbf: now_secs(),
        exp: now_secs() + 300,
        max_tokens: None,
        reserved_milli: 300_000,
    }
}

fn bare_signing(
    keys: &Arc<troop_coordinator::tickets::TicketKeys>,
    threads: usize,
    per_thread: usize,
) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let keys = keys.clone();
            s.spawn(move || {
                for i in 0..per_thread {
                    let _ = keys.sign(&claims(t * per_thread + i)).expect("sign");
                }
            });
        }
    });
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let tickets = env_usize("TICKETS", 3000);
    let concurrency = env_usize("CONCURRENCY", 32);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    rt.block_on(async move {
        let c = Arc::new(
            TestCoordinator::start_with(|cfg| {
                cfg.authorize_per_hour = 1_000_000;
                cfg.discovery_per_hour = 1_000_000;
                cfg.sweep_interval = Duration::from_secs(3600);
                // Every reader below comes from 127.0.0.1.
                cfg.conn_limits.max_per_ip = 1_000_000;
            })
            .await,
        );
        let state = c.running.as_ref().expect("running").state.clone();
        let keys = Arc::new(troop_coordinator::tickets::TicketKeys::load_or_create(&c.dir.path().join("keys")).expect("keys"));

        // Bare signing, same key size, same library, same cores.
        let _ = bare_signing(&keys, 1, 50);
        let sign_1 = bare_signing(&keys, 1, 600);
        let sign_all = bare_signing(&keys, cores, 600);

        // Tickets over HTTP.
        let worker = generate();
        let reg = c.register(&worker, &["m"]).await;
        let users: Vec<_> = (0..tickets.div_ceil(12)).map(|_| generate()).collect();
        let start = Instant::now();
        let jobs: Vec<(usize, AuthorizeResponse)> = futures::stream::iter(0..tickets)
            .map(|i| {
                let c = c.clone();
                let user = users[i / 12].clone();
                let worker = worker.clone();
                async move {
                    let r = c.authorize(&user, &worker, "m").await;
                    assert_eq!(r.status(), 200, "authorize");
                    (i / 12, r.json::<AuthorizeResponse>().await.expect("json"))
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let ticket_secs = start.elapsed().as_secs_f64();
        let tickets_per_s = tickets as f64 / ticket_secs;

        // Receipts over HTTP: half of them; the other half through the writer alone.
        let half = jobs.len() / 2;
        let ts = now_secs();
        let start = Instant::now();
        futures::stream::iter(jobs[..half].iter())
            .map(|(u, a)| {
                let c = c.clone();
                let receipt = receipt_for(&a.job_id, &users[*u], &worker, "m", 1500);
                let key = reg.receipt_key.clone();
                async move {
                    let r = c.submit_receipt(&key, &receipt, ts).await;
                    assert_eq!(r.status(), 200, "settle");
                }
            })
            .buffer_unordered(concurrency * 2)
            .collect::<Vec<()>>()
            .await;
        let http_settle_per_s = half as f64 / start.elapsed().as_secs_f64();

        let start = Instant::now();
        futures::stream::iter(jobs[half..].iter())
            .map(|(u, a)| {
                let state = state.clone();
                let receipt = receipt_for(&a.job_id, &users[*u], &worker, "m", 1500);
                async move { settle_through_writer(&state, receipt).await }
            })
            .buffer_unordered(4096)
            .collect::<Vec<()>>()
            .await;
        let writer_settle_per_s = (jobs.len() - half) as f64 / start.elapsed().as_secs_f64();

        // Readers: each its own client (connection), all at once.
        let readers = env_usize("READERS", 1000);
        let reads_each = 5;
        let start = Instant::now();
        let samples: Vec<(u16, f64)> = futures::stream::iter(0..readers)
            .map(|i| {
                let url = format!("{}/users/{}/balance", c.url, users[i % users.len()].public().to_peer_id());
                async move {
                    let client = reqwest::Client::new();
                    let mut out = Vec::with_capacity(reads_each);
                    for _ in 0..reads_each {
                        let t = Instant::now();
                        let status = match client.get(&url).send().await {
                            Ok(r) => {
                                let s = r.status().as_u16();
                                let _ = r.bytes().await;
                                s
                            }
                            Err(_) => 0,
                        };
                        out.push((status, t.elapsed().as_secs_f64() * 1000.0));
                    }
                    out
                }
            })
            .buffer_unordered(readers)
            .flat_map(futures::stream::iter)
            .collect()
            .await;
        let read_secs = start.elapsed().as_secs_f64();
        let mut lat: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
        lat.sort_by(f64::total_cmp);
        let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(f64::NAN);
        let (read_p50, read_p99) = (pct(0.50), pct(0.99));
        let read_5xx = samples.iter().filter(|(s, _)| *s >= 500).count();
        let read_failed = samples.iter().filter(|(s, _)| *s == 0).count();
        let reads_per_s = samples.len() as f64 / read_secs;

        println!();
        println!("coordinator benchmark: {tickets} tickets, {concurrency} concurrent clients, {cores} cores (load generator in the same process)");
        println!("| figure | measured | goal |");
        println!("|---|---|---|");
        println!("| bare RS256 signatures/s, 1 thread | {sign_1:.0} | - |");
        println!("| bare RS256 signatures/s, {cores} threads | {sign_all:.0} | - |");
        println!("| tickets/s over HTTP (/authorize + reservation) | {tickets_per_s:.0} | >= 1500 and >= 70 % of bare |");
        println!("| tickets / bare signing on {cores} threads | {:.0} % | >= 70 % |", 100.0 * tickets_per_s / sign_all);
        println!("| receipts settled/s over HTTP (HMAC + durable commit) | {http_settle_per_s:.0} | >= 10000 |");
        println!("| receipts settled/s through the ledger writer (group commit) | {writer_settle_per_s:.0} | >= 10000 |");
        println!("| {readers} concurrent readers x {reads_each} balance reads: p50 / p99 ms | {read_p50:.1} / {read_p99:.1} | - |");
        println!("| readers' reads/s | {reads_per_s:.0} | - |");
        println!("| readers' answers 5xx / connection failures | {read_5xx} / {read_failed} | 0 / 0 |");
        if let Ok(path) = std::env::var("BENCH_JSON") {
            let v = serde_json::json!({
                "bare_rs256_per_s_1_thread": sign_1,
                "bare_rs256_per_s_all_threads": sign_all,
                "tickets_per_s": tickets_per_s,
                "settlements_per_s_http": http_settle_per_s,
                "settlements_per_s_writer": writer_settle_per_s,
                "cores": cores,
                "readers": readers,
                "readers_p50_ms": read_p50,
                "readers_p99_ms": read_p99,
                "readers_5xx": read_5xx,
                "readers_failed": read_failed,
            });
            std::fs::write(path, v.to_string()).expect("write BENCH_JSON");
        }
        if let Ok(c) = Arc::try_unwrap(c) {
            let mut c = c;
            c.stop().await;
        }
    });
}
