//! Credits: tickets that reserve, receipts that settle, refunds of what
//! was not used.

use super::*;

#[tokio::test]
async fn authorize_grants_once_reserves_and_signs_a_verifiable_ticket() {
    let c = TestCoordinator::start_with(|cfg| cfg.authorize_per_hour = 1000).await;
    let worker = generate();
    let user = generate();
    c.register(&worker, &[MODEL]).await;

    let r = c.authorize(&user, &worker, MODEL).await;
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"]
        .to_str()
        .expect("rid")
        .to_string();
    let auth: AuthorizeResponse = r.json().await.expect("json");
    assert_eq!(auth.reserved, 300.0);
    let b = c.balance(&user).await;
    assert_eq!(b["available"], 3300.0);
    assert_eq!(b["pending"], 300.0);

    // The ticket verifies offline with the published key, for this worker only.
    let pk: Value = c.get("/public-key").await.json().await.expect("json");
    let mut v = TicketVerifier::new(worker.public().to_peer_id().to_base58());
    v.add_key_pem(
        pk["kid"].as_str().expect("kid"),
        pk["public_key"].as_str().expect("pem").as_bytes(),
    )
    .expect("key");
    let claims = v.verify(&auth.ticket, now_secs()).expect("ticket verifies");
    assert_eq!(claims.sub, user.public().to_peer_id().to_base58());
    assert_eq!(claims.aud, worker.public().to_peer_id().to_base58());
    assert_eq!(claims.jti, auth.job_id);
    assert_eq!(claims.model, MODEL);
    assert_eq!(claims.exp - claims.iat, 300);
    let mut other = TicketVerifier::new(generate().public().to_peer_id().to_base58());
    other
        .add_key_pem(
            pk["kid"].as_str().expect("kid"),
            pk["public_key"].as_str().expect("pem").as_bytes(),
        )
        .expect("key");
    assert!(
        other.verify(&auth.ticket, now_secs()).is_err(),
        "ticket for another worker is refused"
    );

    // The grant happened once: 11 more reservations fit in 3600, the 13th does not.
    for _ in 0..11 {
        assert_eq!(c.authorize(&user, &worker, MODEL).await.status(), 200);
    }
    assert_eq!(c.balance(&user).await["available"], 0.0);
    let r = c.authorize(&user, &worker, MODEL).await;
    assert_eq!(error_code(r).await, (402, "payment_required".into()));
    c.wait_audit("402", |l| {
        l["event"] == "authorize.refused" && l["reason"] == "insufficient_credits"
    })
    .await;
    c.wait_audit("granted with request id", |l| {
        l["event"] == "authorize.granted" && l["request_id"] == rid.as_str()
    })
    .await;
    let grants = c
        .audit_lines()
        .iter()
        .filter(|l| l["event"] == "ledger.grant")
        .count();
    assert_eq!(grants, 1);

    let metrics = c.get("/metrics").await.text().await.expect("text");
    assert!(metrics.contains("troop_tickets_issued_total"), "{metrics}");
    assert!(metrics.contains("troop_payment_required_total"));
    assert!(metrics.contains("troop_http_requests_total"));
}

#[tokio::test]
async fn authorize_refuses_unknown_dead_or_wrong_model_workers() {
    let c = TestCoordinator::start_with(|cfg| cfg.worker_ttl = Duration::from_secs(0)).await;
    let user = generate();
    let worker = generate();
    let r = c.authorize(&user, &worker, MODEL).await;
    assert_eq!(error_code(r).await, (503, "unavailable".into()));
    c.register(&worker, &[MODEL]).await;
    // ttl 0: alive only within the same second it was seen; wait until it is not.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.authorize(&user, &worker, "other-model").await;
        assert_eq!(error_code(r).await, (503, "unavailable".into()));
        let list: Value = c.get("/workers").await.json().await.expect("json");
        if list["workers"][0]["alive"] == false {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = c.authorize(&user, &worker, MODEL).await;
    assert_eq!(error_code(r).await, (503, "unavailable".into()));
    // Nothing was reserved or granted.
    let r = c
        .get(&format!("/users/{}/balance", user.public().to_peer_id()))
        .await;
    assert_eq!(error_code(r).await, (404, "unknown_account".into()));
    let r = c
        .signed(
            &user,
            "/authorize",
            &json!({ "model": MODEL, "worker": "not-a-peer" }),
        )
        .await;
    assert_eq!(error_code(r).await.0, 400);
}

#[tokio::test]
async fn receipt_settles_cost_and_refunds_the_rest() {
    let c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    let receipt = receipt_for(&auth.job_id, &user, &worker, MODEL, 2_000);
    let r = c
        .submit_receipt(&reg.receipt_key, &receipt, now_secs())
        .await;
    assert_eq!(r.status(), 200);
    let s: SettlementResponse = r.json().await.expect("json");
    assert_eq!(
        (s.outcome.as_str(), s.cost, s.refunded, s.replayed),
        ("settled", 2.0, 298.0, false)
    );
    let b = c.balance(&user).await;
    assert_eq!(
        (b["available"].as_f64(), b["pending"].as_f64()),
        (Some(3598.0), Some(0.0))
    );
    assert_eq!(c.balance(&worker).await["available"], 2.0);

    let hist: Value = c
        .signed_get(
            &user,
            &format!("/users/{}/transactions", user.public().to_peer_id()),
        )
        .await
        .json()
        .await
        .expect("json");
    let kinds: Vec<&str> = hist["transactions"]
        .as_array()
        .expect("array")
        .iter()
        .map(|t| t["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, vec!["settle", "reserve", "grant"], "newest first");
    assert_eq!(hist["transactions"][1]["status"], "posted");
    assert_eq!(hist["transactions"][0]["amount"], -2.0);
    let page: Value = c
        .signed_get(
            &user,
            &format!("/users/{}/transactions?limit=1", user.public().to_peer_id()),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page["transactions"].as_array().map(Vec::len), Some(1));
    let before = page["next_before"].as_i64().expect("next page");
    let page2: Value = c
        .signed_get(
            &user,
            &format!(
                "/users/{}/transactions?limit=5&before={before}",
                user.public().to_peer_id()
            ),
        )
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(page2["transactions"].as_array().map(Vec::len), Some(2));

    // A failed job is refunded in full.
    let auth = c.ticket(&user, &worker, MODEL).await;
    let mut failed = common::bare_receipt_for(&auth.job_id, &user, &worker, MODEL, 9_000);
    failed.status = JobStatus::Failed;
    let s: SettlementResponse = c
        .submit_receipt(&reg.receipt_key, &failed, now_secs())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        (s.outcome.as_str(), s.cost, s.refunded),
        ("refunded", 0.0, 300.0)
    );
    assert_eq!(c.balance(&user).await["available"], 3598.0);

    // A worker that claims 300 s for a request its user saw take 1 s is
    // paid 1 s.
    let auth = c.ticket(&user, &worker, MODEL).await;
    let mut long = receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);
    long.requests[0].started_at -= 299_000;
    long.started_at -= 299_000;
    let s: SettlementResponse = c
        .submit_receipt(&reg.receipt_key, &long, now_secs())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(s.cost, 1.0);

    // Without the user's acknowledgement, 900 s claimed cost at most the
    // 10 s cap, and no more than the ticket-to-receipt window (plus the 2 s
    // clock tolerance on each end).
    let auth = c.ticket(&user, &worker, MODEL).await;
    let bare = common::bare_receipt_for(&auth.job_id, &user, &worker, MODEL, 900_000);
    let s: SettlementResponse = c
        .submit_receipt(&reg.receipt_key, &bare, now_secs())
        .await
        .json()
        .await
        .expect("json");
    assert!(s.cost > 0.0 && s.cost <= 10.0, "cost {}", s.cost);
    // One in the future, or before the ticket, costs nothing beyond that.
    let auth = c.ticket(&user, &worker, MODEL).await;
    let mut future = common::bare_receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);
    future.started_at += 200_000;
    future.finished_at += 400_000;
    let s: SettlementResponse = c
        .submit_receipt(&reg.receipt_key, &future, now_secs())
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(s.cost, 0.0);
}

#[tokio::test]
async fn forged_stale_and_mismatched_receipts_change_nothing() {
    let c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    let receipt = receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);

    let wrong_key = hex::encode([9u8; 32]);
    let r = c.submit_receipt(&wrong_key, &receipt, now_secs()).await;
    assert_eq!(error_code(r).await, (401, "bad_signature".into()));
    c.wait_audit("bad hmac", |l| l["event"] == "security.bad_hmac")
        .await;

    let r = c
        .submit_receipt(&reg.receipt_key, &receipt, now_secs() - 301)
        .await;
    assert_eq!(error_code(r).await, (401, "stale_timestamp".into()));

    // Tampered body under a valid MAC of the original.
    let body = serde_json::to_vec(&receipt).expect("json");
    let mac = troop_protocol::receipt::sign_receipt(
        &hex::decode(&reg.receipt_key).expect("hex"),
        now_secs(),
        &body,
    );
    let mut tampered = receipt.clone();
    tampered.finished_at += 100_000;
    let r = c
        .http
        .post(format!("{}/transactions/submit", c.url))
        .header("x-troop-timestamp", now_secs().to_string())
        .header("x-troop-receipt-mac", mac)
        .body(serde_json::to_vec(&tampered).expect("json"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);

    let mut other_user = receipt.clone();
    other_user.user = generate().public().to_peer_id().to_base58();
    let r = c
        .submit_receipt(&reg.receipt_key, &other_user, now_secs())
        .await;
    assert_eq!(r.status(), 422);
    let mut unknown = receipt.clone();
    unknown.job_id = "nope".into();
    assert_eq!(
        c.submit_receipt(&reg.receipt_key, &unknown, now_secs())
            .await
            .status(),
        404
    );

    let b = c.balance(&user).await;
    assert_eq!(
        (b["available"].as_f64(), b["pending"].as_f64()),
        (Some(3300.0), Some(300.0))
    );

    // Settled once; a different receipt for the same job is a conflict.
    assert_eq!(
        c.submit_receipt(&reg.receipt_key, &receipt, now_secs())
            .await
            .status(),
        200
    );
    let mut second = receipt.clone();
    second.completion_tokens += 1;
    let r = c
        .submit_receipt(&reg.receipt_key, &second, now_secs())
        .await;
    assert_eq!(error_code(r).await, (409, "conflict".into()));
    assert_eq!(c.balance(&user).await["available"], 3599.0);
}

#[tokio::test]
async fn a_receipt_replayed_100_times_concurrently_settles_once() {
    let c = std::sync::Arc::new(TestCoordinator::start().await);
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    let receipt = receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);
    let ts = now_secs();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let c = c.clone();
        let key = reg.receipt_key.clone();
        let receipt = receipt.clone();
        tasks.push(tokio::spawn(async move {
            let r = c.submit_receipt(&key, &receipt, ts).await;
            assert_eq!(r.status(), 200);
            r.json::<SettlementResponse>().await.expect("json")
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        let s = t.await.expect("task");
        assert_eq!(
            (s.cost, s.refunded),
            (1.0, 299.0),
            "every answer is the first one's"
        );
        fresh += usize::from(!s.replayed);
    }
    assert_eq!(fresh, 1, "exactly one settlement");
    assert_eq!(c.balance(&user).await["available"], 3599.0);
    assert_eq!(c.balance(&worker).await["available"], 1.0);
    let settles = c
        .audit_lines()
        .iter()
        .filter(|l| l["event"] == "ledger.settle")
        .count();
    assert_eq!(settles, 1);
}

#[tokio::test]
async fn unused_reservations_are_refunded_after_expiry() {
    let c = TestCoordinator::start_with(|cfg| {
        cfg.ticket_ttl = Duration::from_secs(0);
        cfg.reservation_grace = Duration::from_secs(0);
    })
    .await;
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = c.balance(&user).await;
        if b["pending"] == 0.0 {
            assert_eq!(b["available"], 3600.0);
            break;
        }
        assert!(Instant::now() < deadline, "reservation never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.wait_audit("expire", |l| {
        l["event"] == "ledger.expire" && l["job_id"] == auth.job_id.as_str()
    })
    .await;
    // A receipt that comes after the refund is refused and changes nothing.
    let late = receipt_for(&auth.job_id, &user, &worker, MODEL, 1_000);
    let r = c.submit_receipt(&reg.receipt_key, &late, now_secs()).await;
    assert_eq!(error_code(r).await, (409, "reservation_expired".into()));
    assert_eq!(c.balance(&user).await["available"], 3600.0);
    assert_eq!(c.balance(&worker).await["available"], 0.0);
}
