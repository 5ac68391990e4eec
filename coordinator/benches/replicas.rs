//! Coordinator throughput on each store, printed, never asserted: SQLite
//! (one process), PostgreSQL with one replica and with two replicas on one
//! database (a real server started by the bench, fsync on). For each:
//! * tickets/s: signed `POST /authorize` (RS256 + reservation), spread
//!   round-robin over the replicas;
//! * receipts settled/s over HTTP (HMAC + durable commit), round-robin;
//! * settlements/s through the ledger writers alone (group commit, no HTTP):
//!   SETTLEMENTS jobs of their own, reserved and their receipts signed
//!   before the clock starts.
//!
//! `cargo bench -p troop-coordinator --bench replicas` (env: TICKETS,
//! CONCURRENCY, SETTLEMENTS). Everything (server, replicas, load) shares this machine's
//! cores, so two replicas here measure contention, not added capacity.

#[path = "../tests/common/mod.rs"]
mod common;

use common::pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestCoordinator, env_usize, now_ms, now_secs, receipt_for, settle_through_writer};
use futures::StreamExt;
use troop_coordinator::ledger::{Command, GrantPolicy};
use troop_protocol::api::AuthorizeResponse;
use troop_protocol::identity::generate;

struct Figures {
    tickets_per_s: f64,
    http_settle_per_s: f64,
    writer_settle_per_s: f64,
}

async fn start(database: Option<String>, key: Option<std::path::PathBuf>) -> Arc<TestCoordinator> {
    Arc::new(
        TestCoordinator::start_with(move |cfg| {
            cfg.database = database;
            cfg.key_file = key;
            cfg.authorize_per_hour = 1_000_000;
            cfg.discovery_per_hour = 1_000_000;
            cfg.sweep_interval = Duration::from_secs(3600);
            cfg.conn_limits.max_per_ip = 1_000_000;
        })
        .await,
    )
}

/// Settlements/s through the replicas' ledger writers alone: `n` jobs
/// reserved through the writers and their receipts signed before the
/// clock starts, then every receipt submitted at once.
async fn through_writers(
    replicas: &[Arc<TestCoordinator>],
    worker: &libp2p_identity::Keypair,
    n: usize,
) -> f64 {
    let states: Vec<_> = replicas
        .iter()
        .map(|c| c.running.as_ref().expect("running").state.clone())
        .collect();
    let wid = worker.public().to_peer_id().to_base58();
    let users: Vec<_> = (0..n.div_ceil(12)).map(|_| generate()).collect();
    let jobs: Vec<(usize, String)> = (0..n)
        .map(|i| (i / 12, format!("writer-bench-{i}")))
        .collect();
    futures::stream::iter(jobs.iter().enumerate())
        .map(|(i, (u, job))| {
            let state = states[i % states.len()].clone();
            let cmd = Command::Reserve {
                user: users[*u].public().to_peer_id().to_base58(),
                worker: wid.clone(),
                model: "m".into(),
                job_id: job.clone(),
                amount: 60_000,
                multiplier_milli: 1000,
                starter_grant: 3_600_000,
                grant_policy: GrantPolicy::default(),
                expires_at: now_secs() + 3600,
                now_ms: now_ms() - 5_000,
            };
            async move {
                state.writer.submit(cmd, None).await.expect("reserved");
            }
        })
        .buffer_unordered(4096)
        .collect::<Vec<()>>()
        .await;
    let receipts: Vec<_> = jobs
        .iter()
        .map(|(u, job)| receipt_for(job, &users[*u], worker, "m", 1500))
        .collect();
    let start = Instant::now();
    futures::stream::iter(receipts.into_iter().enumerate())
        .map(|(i, receipt)| {
            let state = states[i % states.len()].clone();
            async move { settle_through_writer(&state, receipt).await }
        })
        .buffer_unordered(4096)
        .collect::<Vec<()>>()
        .await;
    n as f64 / start.elapsed().as_secs_f64()
}

async fn measure(
    replicas: &[Arc<TestCoordinator>],
    tickets: usize,
    concurrency: usize,
    settlements: usize,
) -> Figures {
    let n = replicas.len();
    let worker = generate();
    let reg = replicas[0].register(&worker, &["m"]).await;
    // Every replica knows the worker before the clock starts.
    for c in replicas {
        let wid = worker.public().to_peer_id().to_base58();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c
            .running
            .as_ref()
            .is_some_and(|r| r.state.workers.read().is_ok_and(|w| w.contains_key(&wid)))
        {
            assert!(Instant::now() < deadline, "a replica never saw the worker");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let users: Vec<_> = (0..tickets.div_ceil(12)).map(|_| generate()).collect();
    let start = Instant::now();
    let jobs: Vec<(usize, AuthorizeResponse)> = futures::stream::iter(0..tickets)
        .map(|i| {
            let c = replicas[i % n].clone();
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
    let tickets_per_s = tickets as f64 / start.elapsed().as_secs_f64();

    let ts = now_secs();
    let start = Instant::now();
    futures::stream::iter(jobs.iter().enumerate())
        .map(|(i, (u, a))| {
            let c = replicas[i % n].clone();
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
    let http_settle_per_s = jobs.len() as f64 / start.elapsed().as_secs_f64();

    let writer_settle_per_s = through_writers(replicas, &worker, settlements).await;
    Figures {
        tickets_per_s,
        http_settle_per_s,
        writer_settle_per_s,
    }
}

fn main() {
    let tickets = env_usize("TICKETS", 3000);
    let concurrency = env_usize("CONCURRENCY", 32);
    let settlements = env_usize("SETTLEMENTS", 12_000);
    let Some(server) = pg::PgServer::start() else {
        eprintln!("the PostgreSQL figures need PostgreSQL installed");
        return;
    };
    let url1 = server.create_db("bench_one");
    let url2 = server.create_db("bench_two");
    let key = server.dir().join("ticket.pem");
    troop_coordinator::tickets::TicketKeys::generate_to(&key).expect("keygen");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut rows = Vec::new();
        let sqlite = start(None, None).await;
        rows.push(("SQLite, 1 process", measure(&[sqlite], tickets, concurrency, settlements).await));
        let one = start(Some(url1), Some(key.clone())).await;
        rows.push((
            "PostgreSQL, 1 replica",
            measure(&[one], tickets, concurrency, settlements).await,
        ));
        let a = start(Some(url2.clone()), Some(key.clone())).await;
        let b = start(Some(url2), Some(key)).await;
        rows.push((
            "PostgreSQL, 2 replicas",
            measure(&[a, b], tickets, concurrency, settlements).await,
        ));
        println!();
        println!(
            "coordinator stores: {tickets} tickets, {concurrency} concurrent clients, {settlements} settlements through the writers, server, replicas and load on one machine"
        );
        println!("| store | tickets/s | receipts settled/s over HTTP | settlements/s through the writer |");
        println!("|---|---|---|---|");
        for (name, f) in &rows {
            println!(
                "| {name} | {:.0} | {:.0} | {:.0} |",
                f.tickets_per_s, f.http_settle_per_s, f.writer_settle_per_s
            );
        }
        let pg1 = &rows[1].1;
        let pg2 = &rows[2].1;
        println!(
            "two replicas / one: tickets {:.2}x, settlements over HTTP {:.2}x (goal for tickets on separate machines: >= 1.6x)",
            pg2.tickets_per_s / pg1.tickets_per_s,
            pg2.http_settle_per_s / pg1.http_settle_per_s
        );
    });
}
