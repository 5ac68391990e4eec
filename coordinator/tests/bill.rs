//! The bill: acknowledgements signed by the user, bounded minting, private
//! histories — against the real coordinator on loopback.

mod common;

use common::{TestCoordinator, now_secs, receipt_for};
use serde_json::{Value, json};
use troop_protocol::api::SettlementResponse;
use troop_protocol::identity::generate;
use troop_protocol::usage::Ack;

const MODEL: &str = "llama3.2:1b";

async fn code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn forged_reused_and_foreign_acknowledgements_are_refused() {
    let c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    let stranger = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    let other = c.ticket(&stranger, &worker, MODEL).await;
    let w = worker.public().to_peer_id().to_base58();
    let before = c.balance(&user).await;

    // Signed by someone else than the session's user.
    let mut forged = receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);
    forged.requests[0].ack = Some(Ack::sign(&stranger, &auth.job_id, &w, 0, 34, 34, 1_000));
    // The user's real ack, but of another request index.
    let mut reused = receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);
    reused.requests[0].index = 1;
    // Another user's ack of another session, replayed here.
    let mut foreign = receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);
    foreign.requests[0].ack = Some(Ack::sign(&stranger, &other.job_id, &w, 0, 34, 34, 1_000));
    // The same request twice.
    let mut twice = receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);
    twice.requests.push(twice.requests[0].clone());
    for (name, r) in [
        ("forged", forged),
        ("reused", reused),
        ("foreign", foreign),
        ("twice", twice),
    ] {
        let resp = c.submit_receipt(&reg.receipt_key, &r, now_secs()).await;
        assert_eq!(code(resp).await, (422, "bad_request".into()), "{name}");
    }
    c.wait_audit("bad ack", |l| l["event"] == "security.bad_ack")
        .await;
    assert_eq!(c.balance(&user).await, before, "nothing was charged");
    // The honest receipt still settles.
    let ok = receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);
    let s: SettlementResponse = c
        .submit_receipt(&reg.receipt_key, &ok, now_secs())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(s.cost, 1.0);
    // Reputation: one acknowledged request, not disputed.
    let workers: Value = c.get("/workers").await.json().await.expect("json");
    let rep = &workers["workers"][0]["reputation"];
    assert_eq!(rep["requests"], 1);
    assert_eq!(rep["acknowledged_share"], 1.0);
    assert_eq!(rep["disputed_share"], 0.0);
    // The same entry, reputation included, asked for by its peer id or in
    // a page (which read only their workers' records).
    for q in [format!("peer={w}"), "limit=1".to_string()] {
        let one: Value = c
            .get(&format!("/workers?{q}"))
            .await
            .json()
            .await
            .expect("json");
        assert_eq!(one["workers"][0], workers["workers"][0], "{q}");
    }
}

#[tokio::test]
async fn a_gateway_that_withholds_signatures_costs_at_most_the_cap_per_session() {
    let c = TestCoordinator::start_with(|cfg| cfg.clock_tolerance_ms = 400_000).await;
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    // Three requests of 60 s each, none acknowledged: one 10 s cap for the
    // session, not three (a worker listing more lines takes no more).
    let mut r = receipt_for(&auth.job_id, &user, &worker, MODEL, 60_000);
    let line = r.requests[0].clone();
    r.requests.clear();
    for i in 0..3 {
        let mut l = line.clone();
        l.index = i;
        l.ack = None;
        r.requests.push(l);
    }
    let s: SettlementResponse = c
        .submit_receipt(&reg.receipt_key, &r, now_secs())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(s.cost, 10.0);
    let workers: Value = c.get("/workers").await.json().await.expect("json");
    assert_eq!(
        workers["workers"][0]["reputation"]["acknowledged_share"],
        0.0
    );
    assert_eq!(
        workers["workers"][0]["reputation"]["unacknowledged_share"],
        1.0
    );
}

#[tokio::test]
async fn fifty_fresh_keys_from_one_address_get_three_grants() {
    let c = TestCoordinator::start_with(|cfg| cfg.starter_grants_per_ip_per_day = 3).await;
    let worker = generate();
    c.register(&worker, &[MODEL]).await;
    let mut granted = 0;
    let mut refused = 0;
    for _ in 0..50 {
        let r = c.authorize(&generate(), &worker, MODEL).await;
        match r.status().as_u16() {
            200 => granted += 1,
            402 => {
                let body: Value = r.json().await.expect("json");
                assert_eq!(body["error"]["code"], "payment_required");
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("starter credits")),
                    "{body}"
                );
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!((granted, refused), (3, 47));
    c.wait_audit("starter refusals", |l| l["event"] == "starter.refused")
        .await;
}

#[tokio::test]
async fn the_hourly_mint_cap_holds_under_concurrency() {
    // Five grants' worth an hour; addresses vary through a trusted proxy.
    let c = std::sync::Arc::new(
        TestCoordinator::start_with(|cfg| {
            cfg.starter_milli_per_hour = 5 * 3_600_000;
            cfg.starter_grants_per_ip_per_day = 1;
            cfg.trusted_proxy = true;
        })
        .await,
    );
    let worker = generate();
    c.register(&worker, &[MODEL]).await;
    let w = worker.public().to_peer_id().to_base58();
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let c = c.clone();
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            let user = generate();
            let body = serde_json::to_vec(&json!({ "model": MODEL, "worker": w })).expect("json");
            let h = troop_protocol::signed::sign_request(
                &user,
                "POST",
                "/authorize",
                &body,
                now_secs(),
            );
            let mut req = c
                .http
                .post(format!("{}/authorize", c.url))
                .header("content-type", "application/json")
                .header("x-forwarded-for", format!("198.51.100.{}", i + 1))
                .body(body);
            for (k, v) in h.pairs() {
                req = req.header(k, v);
            }
            req.send().await.expect("POST").status().as_u16()
        }));
    }
    let mut granted = 0;
    for t in tasks {
        if t.await.expect("task") == 200 {
            granted += 1;
        }
    }
    assert_eq!(granted, 5, "the hourly budget is five grants");
}

#[tokio::test]
async fn a_proof_of_work_is_asked_of_new_accounts_when_configured() {
    let c = TestCoordinator::start_with(|cfg| cfg.starter_pow_bits = 8).await;
    let health: Value = c.get("/health").await.json().await.expect("json");
    assert_eq!(health["starter_pow_bits"], 8);
    let worker = generate();
    c.register(&worker, &[MODEL]).await;
    let w = worker.public().to_peer_id().to_base58();
    let user = generate();
    let r = c.authorize(&user, &worker, MODEL).await;
    assert_eq!(code(r).await, (402, "payment_required".into()));
    let me = user.public().to_peer_id().to_base58();
    let nonce = troop_protocol::usage::solve_pow(&me, 8);
    let r = c
        .signed(
            &user,
            "/authorize",
            &json!({ "model": MODEL, "worker": w, "pow": nonce }),
        )
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_history_is_readable_only_with_its_own_signature() {
    let c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    let path = format!("/users/{}/transactions", user.public().to_peer_id());
    assert_eq!(code(c.get(&path).await).await.0, 401, "unsigned");
    let r = c.signed_get(&worker, &path).await;
    assert_eq!(
        code(r).await,
        (403, "unauthorized".into()),
        "the worker's signature"
    );
    let r = c.signed_get(&user, &path).await;
    assert_eq!(r.status(), 200);
    let h: Value = r.json().await.expect("json");
    assert_eq!(h["transactions"][0]["job_id"], auth.job_id.as_str());
    // Balances stay public and carry no job ids.
    let b: Value = c
        .get(&format!("/users/{}/balance", user.public().to_peer_id()))
        .await
        .json()
        .await
        .expect("json");
    assert!(!b.to_string().contains(&auth.job_id));
}
