//! Proof of hardware from the node's side: `troop bench` locally, and the
//! worker's round with the coordinator (`--benchmark`).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use troop_bench_kernels::verify::{self, SAMPLES};
use troop_bench_kernels::{Adapter, Backend, Challenge, prove};
use troop_protocol::api::{BenchChallenge, BenchRows, BenchVerdict};

use crate::coordinator_client::CoordinatorClient;

/// Longest a benchmark may run.
pub const BENCH_LIMIT: Duration = Duration::from_secs(300);

/// What `troop bench --json` prints (one line).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The backend that proved: cpu, wgpu or cuda (`auto` resolved).
    pub backend: &'static str,
    /// The wgpu adapter it proved on (null on the CPU).
    pub adapter: Option<Adapter>,
    /// The backend asked for (`--backend`).
    pub asked: &'static str,
    /// Every graphics adapter found on this machine.
    pub adapters: Vec<Adapter>,
    /// Set when the backend asked for failed and the CPU proved instead.
    pub fallback: Option<String>,
    pub n: usize,
    pub rounds: u32,
    /// Expansion, all rounds and hashing.
    pub seconds: f64,
    pub matmul_seconds: f64,
    /// On the matmul time.
    pub gflops: f64,
    pub root: String,
    pub seed: String,
    /// Rows a verifier opens, and the time it took here to check them.
    pub verify_rows: usize,
    pub verify_seconds: f64,
    /// verify_seconds / seconds.
    pub verify_fraction: f64,
}

/// Runs a local proof (and checks it as a coordinator would), stopping with
/// an error after [`BENCH_LIMIT`].
pub fn run_local(
    n: usize,
    rounds: u32,
    seed: [u8; 32],
    backend: Backend,
    show_progress: bool,
) -> anyhow::Result<Report> {
    let ch = Challenge::new(seed, n, rounds);
    ch.validate()?;
    let bar = (show_progress && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(u64::from(rounds));
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} rounds {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(format!("{n}x{n} matmul on {}", backend.name()));
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let ch2 = ch.clone();
    let bar2 = bar.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + BENCH_LIMIT;
        let r = prove(&ch2, backend, Some(deadline), |done, _| {
            if let Some(b) = &bar2 {
                b.set_position(u64::from(done));
            }
        });
        let _ = tx.send(r);
    });
    let proof = match rx.recv_timeout(BENCH_LIMIT) {
        Ok(r) => r?,
        Err(_) => anyhow::bail!(
            "the benchmark ran past {} s and was stopped",
            BENCH_LIMIT.as_secs()
        ),
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let rows = verify::pick_rows(&seed, n, SAMPLES);
    let openings = proof.openings(&rows);
    let t = Instant::now();
    verify::verify(&ch, &proof.root_hex(), &rows, &openings)?;
    let verify_seconds = t.elapsed().as_secs_f64();
    Ok(Report {
        backend: proof.target.backend.name(),
        adapter: proof.target.adapter.clone(),
        asked: backend.name(),
        adapters: troop_bench_kernels::adapters().to_vec(),
        fallback: proof.fallback.clone(),
        n,
        rounds,
        seconds: proof.seconds,
        matmul_seconds: proof.matmul_seconds,
        gflops: ch.flops() / proof.matmul_seconds.max(1e-9) / 1e9,
        root: proof.root_hex(),
        seed: ch.seed.clone(),
        verify_rows: rows.len(),
        verify_seconds,
        verify_fraction: verify_seconds / proof.seconds.max(1e-9),
    })
}

/// What a round with the coordinator ended with.
#[derive(Debug, Clone)]
pub struct Verified {
    pub multiplier: f64,
    pub gflops: f64,
    /// What proved (cpu, wgpu or cuda) and on which adapter.
    pub backend: &'static str,
    pub adapter: Option<String>,
    /// Set when the GPU failed and the CPU proved instead.
    pub fallback: Option<String>,
}

/// The worker's round with the coordinator, asked by the worker (at start).
pub async fn prove_to_coordinator(
    client: &CoordinatorClient,
    backend: Backend,
) -> anyhow::Result<Verified> {
    let c: BenchChallenge =
        serde_json::from_value(client.signed_json("/bench/challenge", &json!({})).await?)
            .map_err(|e| anyhow::anyhow!("the coordinator's challenge is malformed: {e}"))?;
    answer_challenge(client, c, backend).await
}

/// Proves a challenge the coordinator issued (at start, or a re-proof it
/// asked for in a heartbeat's answer) and goes through its checks.
pub async fn answer_challenge(
    client: &CoordinatorClient,
    c: BenchChallenge,
    backend: Backend,
) -> anyhow::Result<Verified> {
    let id = c.challenge_id;
    let ch = Challenge {
        seed: c.seed,
        n: c.n,
        rounds: c.rounds,
    };
    ch.validate()?;
    tracing::info!(
        n = ch.n,
        rounds = ch.rounds,
        backend = backend.name(),
        "proving hardware (the node keeps serving meanwhile)"
    );
    let ch2 = ch.clone();
    let proof = tokio::task::spawn_blocking(move || {
        prove(&ch2, backend, Some(Instant::now() + BENCH_LIMIT), |_, _| {})
    })
    .await??;
    if let Some(why) = &proof.fallback {
        tracing::warn!(failed = %why, "the GPU failed; the CPU proved instead");
    }
    let adapter = proof.target.adapter.as_ref().map(|a| a.name.clone());
    let asked = client
        .signed_json(
            "/bench/submit",
            &json!({ "challenge_id": id, "root": proof.root_hex(), "seconds": proof.seconds,
                     "backend": proof.target.backend.name(), "adapter": adapter }),
        )
        .await?;
    let asked: BenchRows = serde_json::from_value(asked)
        .map_err(|e| anyhow::anyhow!("the coordinator's rows are malformed: {e}"))?;
    let rows: Vec<usize> = asked.rows.into_iter().filter(|&i| i < ch.n).collect();
    let openings = proof.openings(&rows);
    let verdict = client
        .signed_json(
            "/bench/submit",
            &json!({ "challenge_id": id, "openings": openings }),
        )
        .await?;
    let verdict: BenchVerdict = serde_json::from_value(verdict)
        .map_err(|e| anyhow::anyhow!("the coordinator's verdict is malformed: {e}"))?;
    Ok(Verified {
        multiplier: verdict.hardware_multiplier,
        gflops: verdict.verified_gflops,
        backend: proof.target.backend.name(),
        adapter,
        fallback: proof.fallback,
    })
}
