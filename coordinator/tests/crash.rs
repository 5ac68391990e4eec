//! `kill -9` of the real coordinator binary at a random moment under
//! settlement load, several times over one data folder: every receipt the
//! coordinator acknowledged (200) is settled in the ledger after the
//! restart, and `ledger audit` passes. Rounds: `CRASH_ROUNDS` (default 3).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestCoordinator, free_port, now_secs, receipt_for};
use futures::StreamExt;
use rand::Rng;
use troop_protocol::api::AuthorizeResponse;
use troop_protocol::identity::generate;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_troop-coordinator")
}

/// The coordinator process; killed when dropped (a failed assertion must
/// not leave it running).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on `c`'s data folder and points `c` at it.
async fn start(c: &mut TestCoordinator) -> Proc {
    let port = free_port();
    let child = Proc(
        Command::new(bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--starter-grants-per-ip-per-day",
                "1000000",
                "--authorize-per-ip-per-hour",
                "1000000",
                "--starter-credits-per-hour",
                "1000000000",
            ])
            .arg("--data")
            .arg(c.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    c.url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if c.get_maybe("/health").await == Some(200) {
            return child;
        }
        assert!(Instant::now() < deadline, "the coordinator never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_settlements_survive_kill_9_at_random_moments() {
    let rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut c = TestCoordinator::idle();
    let worker = generate();
    let mut acked_total: Vec<String> = Vec::new();
    let mut sent_total = 0usize;
    for round in 0..rounds {
        let mut child = start(&mut c).await;
        let reg = c.register(&worker, &["m"]).await;
        // 150 sessions from 150 users, then their receipts all at once.
        let users: Vec<_> = (0..150).map(|_| generate()).collect();
        let mut jobs = Vec::new();
        for u in &users {
            let r = c.authorize(u, &worker, "m").await;
            let status = r.status();
            let text = r.text().await.expect("body");
            assert_eq!(status, 200, "{text}");
            let a: AuthorizeResponse = serde_json::from_str(&text).expect("ticket");
            jobs.push((u.clone(), a.job_id));
        }
        let acked = Arc::new(Mutex::new(Vec::<String>::new()));
        let kill_after = Duration::from_millis(rand::rng().random_range(2..60));
        let load = {
            let acked = acked.clone();
            let c = &c;
            let worker = &worker;
            let key = reg.receipt_key.clone();
            async move {
                futures::stream::iter(jobs.iter())
                    .map(|(u, job)| {
                        let receipt = receipt_for(job, u, worker, "m", 1500);
                        let acked = acked.clone();
                        let key = key.clone();
                        async move {
                            if let Ok(r) = c.try_submit_receipt(&key, &receipt, now_secs()).await
                                && r == 200
                                && let Ok(mut a) = acked.lock()
                            {
                                a.push(receipt.job_id.clone());
                            }
                        }
                    })
                    .buffer_unordered(8)
                    .collect::<Vec<()>>()
                    .await
            }
        };
        let killer = async {
            tokio::time::sleep(kill_after).await;
            let _ = child.0.kill(); // SIGKILL
        };
        tokio::join!(load, killer);
        let _ = child.0.wait();
        let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
        println!(
            "round {round}: killed after {} ms, {} of {} receipts acknowledged",
            kill_after.as_millis(),
            acked.len(),
            users.len()
        );
        sent_total += users.len();
        acked_total.extend(acked);
    }
    // A restart reconciles the audit log; a clean stop leaves it whole.
    let mut child = start(&mut c).await;
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let _ = child.0.wait();
    let conn = rusqlite::Connection::open(c.dir.path().join("ledger.sqlite3")).expect("open");
    for job in &acked_total {
        let state: String = conn
            .query_row("SELECT state FROM jobs WHERE job_id = ?1", [job], |r| {
                r.get(0)
            })
            .expect("the acknowledged job is in the ledger");
        assert_eq!(state, "posted", "job {job} was acknowledged but is {state}");
    }
    let out = Command::new(bin())
        .args(["ledger", "audit", "--data"])
        .arg(c.dir.path())
        .output()
        .expect("audit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    println!(
        "{rounds} kill -9 rounds: {} of {sent_total} receipts acknowledged, all of them settled; ledger audit OK",
        acked_total.len()
    );
}
