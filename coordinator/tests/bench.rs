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
    let rows: Vec<usize> = asked["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(Value::as_u64)
        .map(|v| v as usize)
        .collect();
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
    let rows: Vec<usize> = asked["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(Value::as_u64)
        .map(|v| v as usize)
        .collect();
    let mut open = openings(&proof, &rows);
    open[3].values[5] += 1.0;
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
