//! Proof of hardware through the coordinator's HTTP API.

mod common;

use std::time::Duration;

use common::{TestCoordinator, now_secs, receipt_for};
use libp2p_identity::Keypair;
use serde_json::{Value, json};
use troop_bench_kernels::verify::Opening;
use troop_bench_kernels::{Backend, Challenge, prove};
use troop_protocol::api::{AuthorizeResponse, SettlementResponse};
use troop_protocol::identity::generate;

async fn small() -> TestCoordinator {
    TestCoordinator::start_with(|c| {
        c.bench_size = 64;
        c.bench_rounds = 2;
        c.reference_gflops = 1e-6; // any machine earns the cap here
    })
    .await
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let s = r.status().as_u16();
    (s, r.json().await.expect("json"))
}

async fn challenge(c: &TestCoordinator, w: &Keypair) -> (String, Challenge) {
    let (s, v) = json_of(c.signed(w, "/bench/challenge", &json!({})).await).await;
    assert_eq!(s, 200, "{v}");
    let ch = Challenge {
        seed: v["seed"].as_str().expect("seed").into(),
        n: v["n"].as_u64().expect("n") as usize,
        rounds: v["rounds"].as_u64().expect("rounds") as u32,
    };
    (v["challenge_id"].as_str().expect("id").into(), ch)
}

/// The rows the coordinator asked to open, from its typed answer.
fn rows_of(asked: &Value) -> Vec<usize> {
    serde_json::from_value::<troop_protocol::api::BenchRows>(asked.clone())
        .expect("rows")
        .rows
}

fn openings(p: &troop_bench_kernels::Proof, rows: &[usize]) -> Vec<Opening> {
    p.openings(rows)
}

async fn worker_info(c: &TestCoordinator, w: &Keypair) -> Value {
    let v: Value = c.get("/workers").await.json().await.expect("json");
    v["workers"]
        .as_array()
        .expect("list")
        .iter()
        .find(|x| x["peer_id"] == w.public().to_peer_id().to_base58().as_str())
        .cloned()
        .expect("listed")
}

#[tokio::test]
async fn a_verified_round_sets_the_multiplier_and_settlement_uses_it() {
    let c = small().await;
    let w = generate();
    let reg = c.register(&w, &["m"]).await;
    assert!(worker_info(&c, &w).await["verified_gflops"].is_null());
    let (id, ch) = challenge(&c, &w).await;
    let proof = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("prove");
    let (s, asked) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": id, "root": proof.root_hex()}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{asked}");
    let rows = rows_of(&asked);
    assert_eq!(rows.len(), 64.min(troop_bench_kernels::verify::SAMPLES));
    let (s, verdict) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": id, "openings": openings(&proof, &rows)}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{verdict}");
    assert_eq!(verdict["hardware_multiplier"], 8.0);
    let info = worker_info(&c, &w).await;
    assert!(info["verified_gflops"].as_f64().expect("set") > 0.0);
    assert_eq!(info["hardware_multiplier"], 8.0);

    // The reservation and the settlement use the verified multiplier.
    let user = generate();
    let auth: AuthorizeResponse = c
        .authorize(&user, &w, "m")
        .await
        .json()
        .await
        .expect("auth");
    assert_eq!(auth.reserved, 300.0 * 8.0);
    let r = c
        .submit_receipt(
            &reg.receipt_key,
            &receipt_for(&auth.job_id, &user, &w, "m", 1_000),
            now_secs(),
        )
        .await;
    let s: SettlementResponse = r.json().await.expect("json");
    assert_eq!(s.cost, 8.0);
    // The challenge is spent.
    let (s, _) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": id, "root": proof.root_hex()}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn a_wrong_row_is_refused_and_the_multiplier_stays() {
    let c = small().await;
    let w = generate();
    c.register(&w, &["m"]).await;
    let (id, ch) = challenge(&c, &w).await;
    let proof = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("prove");
    let (_, asked) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": id, "root": proof.root_hex()}),
        )
        .await,
    )
    .await;
    let rows = rows_of(&asked);
    let mut open = proof.openings_with_values(&rows);
    if let Some(v) = open[3].values.as_mut() {
        v[5] += 1.0;
    }
    let (s, v) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": id, "openings": open}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 422, "{v}");
    let info = worker_info(&c, &w).await;
    assert!(info["verified_gflops"].is_null());
    assert_eq!(info["hardware_multiplier"], 1.0);
    c.wait_audit("bench failure", |l| l["event"] == "security.bench_failed")
        .await;
}

/// A Merkle step with a field it does not have is refused with 400 before
/// the round's one try is spent: the right openings pass afterwards.
#[tokio::test]
async fn a_path_step_with_an_unknown_field_is_refused_and_keeps_the_try() {
    let c = small().await;
    let w = generate();
    c.register(&w, &["m"]).await;
    let (id, ch) = challenge(&c, &w).await;
    let proof = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("prove");
    let (s, asked) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": id, "root": proof.root_hex()}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{asked}");
    let rows = rows_of(&asked);
    let good = openings(&proof, &rows);
    // The same (correct) openings, one step carrying an extra field.
    let mut bad = serde_json::to_value(&good).expect("json");
    bad[0]["path"][0]["extra"] = json!(true);
    let (s, v) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": id, "openings": bad}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    assert!(worker_info(&c, &w).await["verified_gflops"].is_null());
    let (s, verdict) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": id, "openings": good}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{verdict}");
    assert_eq!(verdict["verified"], true);
}

#[tokio::test]
async fn foreign_unknown_and_stale_challenges_are_refused() {
    let c = TestCoordinator::start_with(|cfg| {
        cfg.bench_size = 32;
        cfg.bench_rounds = 1;
    })
    .await;
    let w = generate();
    let other = generate();
    c.register(&w, &["m"]).await;
    c.register(&other, &["m"]).await;
    let (id, ch) = challenge(&c, &w).await;
    let proof = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("prove");
    let (s, _) = json_of(
        c.signed(
            &other,
            "/bench/submit",
            &json!({"challenge_id": id, "root": proof.root_hex()}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 403);
    c.wait_audit("foreign", |l| {
        l["event"] == "security.bench_foreign_challenge"
    })
    .await;
    let (s, _) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": "feedface", "root": proof.root_hex()}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 404);
    // Openings before the root.
    let (s, _) = json_of(
        c.signed(
            &w,
            "/bench/submit",
            &json!({"challenge_id": id, "openings": []}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 409);
    // Unregistered workers get no challenge.
    let (s, _) = json_of(c.signed(&generate(), "/bench/challenge", &json!({})).await).await;
    assert_eq!(s, 404);

    let stale = TestCoordinator::start_with(|cfg| {
        cfg.bench_size = 32;
        cfg.bench_rounds = 1;
        cfg.bench_deadline = Duration::from_millis(1);
    })
    .await;
    stale.register(&w, &["m"]).await;
    let (id, _) = challenge(&stale, &w).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (s, _) = json_of(
        stale
            .signed(
                &w,
                "/bench/submit",
                &json!({"challenge_id": id, "root": proof.root_hex()}),
            )
            .await,
    )
    .await;
    assert_eq!(s, 410);
    stale
        .wait_audit("expired", |l| l["event"] == "bench.expired")
        .await;
}

/// A worker that commits any root and uploads made-up paths: the
/// coordinator still recomputes every asked row before refusing.
async fn bogus_round(c: &TestCoordinator, w: &Keypair) -> (String, Vec<Opening>) {
    let (id, ch) = challenge(c, w).await;
    let root = hex::encode([0x5au8; 32]);
    let (s, asked) = json_of(
        c.signed(
            w,
            "/bench/submit",
            &json!({"challenge_id": id, "root": root}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{asked}");
    let depth = usize::BITS as usize - (ch.n - 1).leading_zeros() as usize;
    let open = rows_of(&asked)
        .into_iter()
        .map(|row| Opening {
            row,
            values: None,
            path: (0..depth)
                .map(|level| troop_bench_kernels::proof::Step {
                    sibling: Some(hex::encode([level as u8; 32])),
                    left: (row >> level) & 1 == 1,
                })
                .collect(),
        })
        .collect();
    (id, open)
}

/// Sends openings: (status, has Retry-After, body).
async fn submit_openings(
    c: &TestCoordinator,
    w: &Keypair,
    id: &str,
    open: &[Opening],
) -> (u16, bool, Value) {
    let r = c
        .signed(
            w,
            "/bench/submit",
            &json!({"challenge_id": id, "openings": open}),
        )
        .await;
    let retry = r.headers().get("retry-after").is_some();
    let (s, v) = json_of(r).await;
    (s, retry, v)
}

fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// 24 bogus proofs at the default size at once: each is refused with 422,
/// at most `bench_verify_concurrency` are checked at a time (the rest wait
/// in the queue), and nothing answers 5xx. Prints the peak memory of the
/// process (the coordinator runs in it) for the closing note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bogus_proofs_is_verified_a_few_at_a_time() {
    let c = TestCoordinator::start_with(|cfg| {
        cfg.bench_verify_concurrency = 2;
        // The last of 24 proofs checked two at a time waits for the other
        // 22: on a loaded 2-core machine that is past the default 30 s
        // request limit, which is not what this test is about.
        cfg.request_timeout = std::time::Duration::from_secs(180);
    })
    .await;
    let before = peak_rss_mb();
    let mut rounds = Vec::new();
    for _ in 0..24 {
        let w = generate();
        c.register(&w, &["m"]).await;
        let (id, open) = bogus_round(&c, &w).await;
        rounds.push((w, id, open));
    }
    let statuses = futures::future::join_all(rounds.iter().map(|(w, id, open)| async {
        let (s, _, v) = submit_openings(&c, w, id, open).await;
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("proof rejected")),
            "{v}"
        );
        s
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 422), "{statuses:?}");
    let metrics = c.get("/metrics").await.text().await.expect("text");
    let queued = metrics
        .lines()
        .find(|l| l.starts_with("troop_bench_verifications_queued_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("the queue counter");
    assert!(queued >= 1.0, "no proof ever waited for a slot: {queued}");
    println!(
        "24 concurrent bogus proofs at n = 4096: peak RSS {:.0} MB (before {:.0} MB), {queued} waited for a slot",
        peak_rss_mb().unwrap_or(0.0),
        before.unwrap_or(0.0)
    );
}

/// With the queue full a proof is answered 503 with `Retry-After`, and its
/// challenge is not spent: the same openings sent later are verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_verification_queue_answers_503_and_keeps_the_try() {
    let c = TestCoordinator::start_with(|cfg| {
        cfg.bench_size = 2048;
        cfg.bench_verify_concurrency = 1;
        cfg.bench_verify_queue = 1;
    })
    .await;
    let mut rounds = Vec::new();
    for _ in 0..6 {
        let w = generate();
        c.register(&w, &["m"]).await;
        let (id, open) = bogus_round(&c, &w).await;
        rounds.push((w, id, open));
    }
    let first = futures::future::join_all(
        rounds
            .iter()
            .map(|(w, id, open)| submit_openings(&c, w, id, open)),
    )
    .await;
    let busy: Vec<usize> = first
        .iter()
        .enumerate()
        .filter(|(_, (s, _, _))| *s == 503)
        .map(|(i, _)| i)
        .collect();
    assert!(!busy.is_empty(), "{first:?}");
    assert!(busy.iter().all(|&i| first[i].1), "503 without Retry-After");
    assert!(
        first.iter().all(|(s, _, _)| *s == 503 || *s == 422),
        "{first:?}"
    );
    // The refused ones still hold their try.
    for i in busy {
        let (w, id, open) = &rounds[i];
        let (s, _, v) = submit_openings(&c, w, id, open).await;
        assert_eq!(s, 422, "{v}");
    }
}

/// `/bootstrap` lists workers with a verified proof first.
#[tokio::test]
async fn bootstrap_prefers_workers_with_a_verified_proof() {
    let c = small().await;
    let ws: Vec<Keypair> = (0..3).map(|_| generate()).collect();
    for w in &ws {
        c.register(w, &["m"]).await;
    }
    let proven = &ws[2];
    let (id, ch) = challenge(&c, proven).await;
    let proof = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("prove");
    let (_, asked) = json_of(
        c.signed(
            proven,
            "/bench/submit",
            &json!({"challenge_id": id, "root": proof.root_hex()}),
        )
        .await,
    )
    .await;
    let rows = rows_of(&asked);
    let (s, _, v) = submit_openings(&c, proven, &id, &proof.openings(&rows)).await;
    assert_eq!(s, 200, "{v}");
    let boot: Value = c.get("/bootstrap").await.json().await.expect("json");
    assert_eq!(
        boot["peers"][0]["peer_id"],
        proven.public().to_peer_id().to_base58().as_str(),
        "{boot}"
    );
}

/// One whole round: challenge (or the one given), root (with what computed
/// it), openings. `before_root` runs between proving and committing (a
/// slow worker). Returns the verdict's status and body.
async fn round(
    c: &TestCoordinator,
    w: &Keypair,
    given: Option<(String, Challenge)>,
    before_root: Duration,
    tamper: bool,
) -> (u16, Value) {
    let (id, ch) = match given {
        Some(g) => g,
        None => challenge(c, w).await,
    };
    let proof = prove(&ch, Backend::Cpu, None, |_, _| {}).expect("prove");
    if !before_root.is_zero() {
        // A slow worker: it commits its root late.
        tokio::time::sleep(before_root).await;
    }
    let (s, asked) = json_of(
        c.signed(
            w,
            "/bench/submit",
            &json!({"challenge_id": id, "root": proof.root_hex(),
                    "backend": "wgpu", "adapter": "Test GPU 9000\u{7}"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 200, "{asked}");
    let mut rows = rows_of(&asked);
    if tamper {
        // Opens other rows than those asked: the paths lead elsewhere.
        for r in &mut rows {
            *r = (*r + 1) % ch.n;
        }
    }
    let mut opened = openings(&proof, &rows);
    if tamper {
        for (o, asked) in opened.iter_mut().zip(rows_of(&asked)) {
            o.row = asked;
        }
    }
    json_of(
        c.signed(
            w,
            "/bench/submit",
            &json!({"challenge_id": id, "openings": opened}),
        )
        .await,
    )
    .await
}

/// The re-proof a heartbeat's answer carries, if any.
async fn heartbeat(c: &TestCoordinator, w: &Keypair) -> Option<(String, Challenge)> {
    let (s, v) = json_of(c.signed(w, "/workers/heartbeat", &json!({})).await).await;
    assert_eq!(s, 200, "{v}");
    let r = v.get("reproof")?;
    let c: troop_protocol::api::BenchChallenge =
        serde_json::from_value(r.clone()).expect("a re-proof challenge");
    Some((
        c.challenge_id,
        Challenge {
            seed: c.seed,
            n: c.n,
            rounds: c.rounds,
        },
    ))
}

#[tokio::test]
async fn a_proof_names_its_backend_and_adapter_in_the_worker_list() {
    let c = small().await;
    let w = generate();
    c.register(&w, &["m"]).await;
    let info = worker_info(&c, &w).await;
    assert!(info["hardware_backend"].is_null(), "{info}");
    let (s, v) = round(&c, &w, None, Duration::ZERO, false).await;
    assert_eq!(s, 200, "{v}");
    let info = worker_info(&c, &w).await;
    assert_eq!(info["hardware_backend"], "wgpu");
    // Control characters are dropped from what the worker says.
    assert_eq!(info["hardware_adapter"], "Test GPU 9000");
}

/// Re-proofs at random times: asked in a heartbeat's answer only of a
/// worker with a standing proof and none in progress; a failed one takes
/// the multiplier away, a slower one lowers it, each audited.
#[tokio::test]
async fn reproofs_are_asked_in_heartbeats_and_a_failed_one_loses_the_multiplier() {
    let c = TestCoordinator::start_with(|c| {
        c.bench_size = 64;
        c.bench_rounds = 2;
        // A prompt proof earns the cap (8.0); one committed 1.5 s late
        // earns about 0.7.
        c.reference_gflops = 1e-3;
        // Every heartbeat draws a re-proof (when one may be asked).
        c.reproof_mean = Duration::from_millis(1);
    })
    .await;
    let w = generate();
    c.register(&w, &["m"]).await;
    // No standing proof: nothing to re-prove.
    assert!(heartbeat(&c, &w).await.is_none());
    let (s, v) = round(&c, &w, None, Duration::ZERO, false).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(worker_info(&c, &w).await["hardware_multiplier"], 8.0);

    // Asked, and not again while it is in progress.
    let asked = heartbeat(&c, &w).await.expect("a re-proof is asked");
    assert!(heartbeat(&c, &w).await.is_none());
    c.wait_audit("the re-proof asked", |l| {
        l["event"] == "bench.reproof_asked"
    })
    .await;
    // A wrong answer: refused, and the proof is taken away.
    let (s, v) = round(&c, &w, Some(asked), Duration::ZERO, true).await;
    assert_eq!(s, 422, "{v}");
    let info = worker_info(&c, &w).await;
    assert!(info["verified_gflops"].is_null(), "{info}");
    assert_eq!(info["hardware_multiplier"], 1.0);
    assert!(info["hardware_backend"].is_null(), "{info}");
    let lost = c
        .wait_audit("the lost proof", |l| l["event"] == "bench.reproof_failed")
        .await;
    assert_eq!(lost["hardware_multiplier_before"], 8.0, "{lost}");
    // Without a standing proof, no re-proof is asked.
    assert!(heartbeat(&c, &w).await.is_none());

    // Proved again; a re-proof that is much slower lowers the figure.
    let (s, _) = round(&c, &w, None, Duration::ZERO, false).await;
    assert_eq!(s, 200);
    let asked = heartbeat(&c, &w).await.expect("a re-proof is asked");
    let (s, v) = round(&c, &w, Some(asked), Duration::from_millis(1500), false).await;
    assert_eq!(s, 200, "{v}");
    let m = v["hardware_multiplier"].as_f64().expect("multiplier");
    assert!(m < 6.0, "lowered: {v}");
    assert_eq!(worker_info(&c, &w).await["hardware_multiplier"], m);
    let e = c
        .wait_audit("the lowered figure", |l| l["event"] == "bench.reproof")
        .await;
    assert_eq!(e["result"], "lowered", "{e}");
}

/// A re-proof nobody answers: past its deadline the sweeper takes the proof
/// away.
#[tokio::test]
async fn a_missed_reproof_loses_the_multiplier() {
    let c = TestCoordinator::start_with(|c| {
        c.bench_size = 64;
        c.bench_rounds = 2;
        c.reference_gflops = 1e-6;
        c.reproof_mean = Duration::from_millis(1);
        c.bench_deadline = Duration::from_secs(1);
        c.sweep_interval = Duration::from_millis(100);
    })
    .await;
    let w = generate();
    c.register(&w, &["m"]).await;
    let (s, v) = round(&c, &w, None, Duration::ZERO, false).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(worker_info(&c, &w).await["hardware_multiplier"], 8.0);
    assert!(heartbeat(&c, &w).await.is_some());
    common::eventually("the missed re-proof to cost the multiplier", 15, || async {
        let info = worker_info(&c, &w).await;
        (info["hardware_multiplier"] == 1.0 && info["verified_gflops"].is_null()).then_some(())
    })
    .await;
    let e = c
        .wait_audit("the missed re-proof", |l| {
            l["event"] == "bench.reproof_failed"
        })
        .await;
    assert!(
        e["reason"].as_str().unwrap_or("").contains("deadline"),
        "{e}"
    );
}
