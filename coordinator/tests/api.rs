//! The coordinator over real HTTP on loopback: every endpoint, its success
//! and its refusals.

mod common;

use std::time::{Duration, Instant};

use common::{TestCoordinator, now_secs, receipt_for};
use serde_json::{Value, json};
use troop_protocol::api::{AuthorizeResponse, SettlementResponse};
use troop_protocol::identity::generate;
use troop_protocol::receipt::JobStatus;
use troop_protocol::signed::sign_request_with_nonce;
use troop_protocol::ticket::TicketVerifier;

const MODEL: &str = "gemma3:270m";

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    (status, code)
}

#[tokio::test]
async fn health_keys_and_request_ids() {
    let c = TestCoordinator::start().await;
    let r = c.get("/health").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-request-id").is_some());
    assert!(r.headers().get("x-response-time").is_some());
    let health: Value = r.json().await.expect("json");
    let kid = health["kid"].as_str().expect("kid").to_string();

    // A request id sent by the client is kept.
    let r = c
        .http
        .get(format!("{}/health", c.url))
        .header("x-request-id", "my-id-123")
        .send()
        .await
        .expect("get");
    assert_eq!(r.headers()["x-request-id"], "my-id-123");

    let pk: Value = c.get("/public-key").await.json().await.expect("json");
    assert_eq!(pk["kid"], kid.as_str());
    assert!(
        pk["public_key"]
            .as_str()
            .expect("pem")
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    let jwks: Value = c
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(jwks["keys"][0]["kid"], kid.as_str());
    assert_eq!(jwks["keys"][0]["alg"], "RS256");
    assert_eq!(jwks["keys"][0]["kty"], "RSA");

    let r = c.get("/no/such/route").await;
    assert_eq!(error_code(r).await, (404, "not_found".into()));
}

#[tokio::test]
async fn private_key_is_0400_and_survives_restart_with_balances() {
    let mut c = TestCoordinator::start().await;
    let key_path = c.dir.path().join("keys/ticket-signing.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
    }
    let kid1: Value = c.get("/public-key").await.json().await.expect("json");
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth: AuthorizeResponse = c
        .authorize(&user, &worker, MODEL)
        .await
        .json()
        .await
        .expect("auth");
    let before = c.balance(&user).await;

    c.restart_with(|_| {}).await;
    let kid2: Value = c.get("/public-key").await.json().await.expect("json");
    assert_eq!(kid1["kid"], kid2["kid"], "same key after restart");
    assert_eq!(c.balance(&user).await, before, "same balance after restart");
    // The worker is still registered with the same receipt key.
    let r = c
        .submit_receipt(
            &reg.receipt_key,
            &receipt_for(&auth.job_id, &user, &worker, MODEL, 1500),
            now_secs(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let s: SettlementResponse = r.json().await.expect("json");
    assert_eq!(s.cost, 1.5);
}

#[tokio::test]
async fn register_heartbeat_workers_and_bootstrap() {
    let c = TestCoordinator::start().await;
    let worker = generate();
    let reg = c.register(&worker, &[MODEL, "llama3"]).await;
    assert_eq!(reg.peer_id, worker.public().to_peer_id().to_base58());
    assert_eq!(hex::decode(&reg.receipt_key).expect("hex").len(), 32);
    assert_eq!(reg.hardware_multiplier, 1.0);
    // Re-registering keeps the receipt key.
    assert_eq!(
        c.register(&worker, &[MODEL]).await.receipt_key,
        reg.receipt_key
    );

    let hb = c
        .signed(
            &worker,
            "/workers/heartbeat",
            &json!({ "load": { "active_jobs": 2, "queue_depth": 5 } }),
        )
        .await;
    assert_eq!(hb.status(), 200);
    let stranger = generate();
    let hb = c.signed(&stranger, "/workers/heartbeat", &json!({})).await;
    assert_eq!(error_code(hb).await, (404, "unknown_worker".into()));

    let list: Value = c.get("/workers").await.json().await.expect("json");
    let w = &list["workers"][0];
    assert_eq!(w["peer_id"], reg.peer_id.as_str());
    assert_eq!(w["models"], json!([MODEL]));
    assert_eq!(w["hardware_multiplier"], 1.0);
    assert!(w["verified_gflops"].is_null());
    assert!(w["last_seen"].as_u64().expect("last_seen") >= now_secs() - 5);
    assert_eq!(w["load"]["queue_depth"], 5);
    assert_eq!(w["alive"], true);

    let boot: Value = c.get("/bootstrap").await.json().await.expect("json");
    assert_eq!(boot["peers"][0]["peer_id"], reg.peer_id.as_str());
    assert_eq!(boot["peers"][0]["addresses"][0], "/ip4/127.0.0.1/tcp/4001");
    assert_eq!(boot["peers"][0]["relay"], false);
}

#[tokio::test]
async fn bootstrap_lists_the_operators_relays_first() {
    let relay = generate().public().to_peer_id().to_base58();
    let tcp = format!("/ip4/203.0.113.7/tcp/4001/p2p/{relay}");
    let quic = format!("/ip4/203.0.113.7/udp/4001/quic-v1/p2p/{relay}");
    let (t, q) = (tcp.clone(), quic.clone());
    let c = TestCoordinator::start_with(move |cfg| cfg.relays = vec![t, q]).await;
    let worker = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let boot: Value = c.get("/bootstrap").await.json().await.expect("json");
    let peers = boot["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 2, "{boot}");
    assert_eq!(peers[0]["peer_id"], relay.as_str());
    assert_eq!(peers[0]["relay"], true);
    assert_eq!(peers[0]["addresses"], json!([tcp, quic]));
    assert_eq!(peers[1]["peer_id"], reg.peer_id.as_str());
    assert_eq!(peers[1]["relay"], false);
    // `?model=` lists only the workers serving it, and no relays.
    let other = generate();
    let other_reg = c.register(&other, &["qwen2.5:0.5b"]).await;
    let only: Value = c
        .get("/bootstrap?model=qwen2.5%3A0.5b")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        only["peers"],
        json!([{"peer_id": other_reg.peer_id, "addresses": ["/ip4/127.0.0.1/tcp/4001"], "relay": false}]),
        "{only}"
    );
    let none: Value = c
        .get("/bootstrap?model=nobody-serves-this")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(none["peers"], json!([]));
    let r = c
        .get(&format!("/bootstrap?model={}", "x".repeat(300)))
        .await;
    assert_eq!(r.status(), 400);
    // A relay address must name its peer.
    assert!(troop_coordinator::config::relay_peer_id("/ip4/203.0.113.7/tcp/4001").is_none());
    assert!(
        troop_coordinator::config::relay_peer_id(&format!("{tcp}/p2p-circuit/p2p/{relay}"))
            .is_none()
    );
}

#[tokio::test]
async fn signatures_are_checked_and_nonces_refused_twice() {
    let c = TestCoordinator::start().await;
    let worker = generate();
    let body = serde_json::to_vec(&json!({ "models": [MODEL] })).expect("json");

    // Signed over another body.
    let h = sign_request_with_nonce(
        &worker,
        "POST",
        "/workers/register",
        b"{}",
        now_secs(),
        "00112233445566778899aabbccddeeff",
    );
    let mut req = c
        .http
        .post(format!("{}/workers/register", c.url))
        .body(body.clone());
    for (k, v) in h.pairs() {
        req = req.header(k, v);
    }
    assert_eq!(
        error_code(req.send().await.expect("send")).await,
        (401, "bad_signature".into())
    );
    c.wait_audit("bad signature", |l| l["event"] == "security.bad_signature")
        .await;

    // A stale timestamp.
    let r = c
        .signed_raw(
            &worker,
            "/workers/register",
            body.clone(),
            now_secs() - 3600,
        )
        .await;
    assert_eq!(error_code(r).await, (401, "stale_timestamp".into()));

    // The same nonce twice: the second is a replay.
    let h = sign_request_with_nonce(
        &worker,
        "POST",
        "/workers/register",
        &body,
        now_secs(),
        "ffeeddccbbaa99887766554433221100",
    );
    for expected in [200u16, 401] {
        let mut req = c
            .http
            .post(format!("{}/workers/register", c.url))
            .body(body.clone());
        for (k, v) in h.pairs() {
            req = req.header(k, v);
        }
        let r = req.send().await.expect("send");
        assert_eq!(r.status().as_u16(), expected);
        if expected == 401 {
            assert_eq!(error_code(r).await.1, "replay");
        }
    }
    c.wait_audit("replay", |l| l["event"] == "security.replay")
        .await;

    // No signature at all.
    let r = c
        .http
        .post(format!("{}/authorize", c.url))
        .body("{}")
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (401, "unauthorized".into()));
}

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
async fn rate_limits_answer_429_with_retry_after() {
    let c = TestCoordinator::start_with(|cfg| {
        cfg.authorize_per_hour = 20;
        cfg.discovery_per_hour = 3;
    })
    .await;
    let worker = generate();
    let user = generate();
    c.register(&worker, &[MODEL]).await;
    for _ in 0..3 {
        assert_eq!(c.get("/workers").await.status(), 200);
    }
    let r = c.get("/bootstrap").await;
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("numeric Retry-After");
    assert!(wait >= 1);
    assert_eq!(error_code(r).await.1, "rate_limited");
    // Health is not a discovery read.
    assert_eq!(c.get("/health").await.status(), 200);

    // 20 an hour per user on /authorize (12 fit the credits, the rest answer 402).
    for _ in 0..20 {
        let s = c.authorize(&user, &worker, MODEL).await.status().as_u16();
        assert!(s == 200 || s == 402, "{s}");
    }
    let r = c.authorize(&user, &worker, MODEL).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // Another user is not limited.
    assert_eq!(c.authorize(&generate(), &worker, MODEL).await.status(), 200);
    c.wait_audit("429", |l| {
        l["event"] == "rate_limited" && l["scope"] == "authorize"
    })
    .await;
    c.wait_audit("429", |l| {
        l["event"] == "rate_limited" && l["scope"] == "discovery"
    })
    .await;
}

/// Behind a trusted proxy the client is the rightmost `X-Forwarded-For`
/// entry that is not a proxy (a client writes the ones on the left
/// itself), and an IPv6 client counts by its /64: neither a forged entry
/// nor a new address in the same /64 gets a fresh quota.
#[tokio::test]
async fn per_ip_limits_see_through_forged_forwarded_entries_and_ipv6_rotation() {
    let c = TestCoordinator::start_with(|cfg| {
        cfg.trusted_proxy = true;
        cfg.discovery_per_hour = 3;
    })
    .await;
    let get = |forwarded: String| {
        let c = &c;
        async move {
            c.http
                .get(format!("{}/workers", c.url))
                .header("x-forwarded-for", forwarded)
                .send()
                .await
                .expect("GET")
                .status()
                .as_u16()
        }
    };
    // The proxy (127.0.0.1, the peer) appends the client's address; the
    // client forges a new leftmost entry each time, and the proxy's own
    // address in the chain is skipped.
    let mut seen = Vec::new();
    for i in 0..4 {
        seen.push(get(format!("198.51.100.{i}, 203.0.113.7, 127.0.0.1")).await);
    }
    assert_eq!(seen, [200, 200, 200, 429]);
    // The same client as an IPv4-mapped IPv6 address.
    assert_eq!(get("::ffff:203.0.113.7".into()).await, 429);
    // Another client behind the same proxy has its own quota.
    assert_eq!(get("6.6.6.6, 203.0.113.8".into()).await, 200);
    // An IPv6 client rotating inside its /64.
    let mut seen = Vec::new();
    for i in 1..=4 {
        seen.push(get(format!("2001:db8:1:2::{i:x}")).await);
    }
    assert_eq!(seen, [200, 200, 200, 429]);
    assert_eq!(get("2001:db8:1:2:ffff:ffff:ffff:ffff".into()).await, 429);
    // The next /64 is another client.
    assert_eq!(get("2001:db8:1:3::1".into()).await, 200);
}

/// Every JSON request body is an object: an array (which serde reads as a
/// struct's fields in order, `[]` as a struct with no required field) or
/// any other JSON value is refused with 400 and changes nothing.
#[tokio::test]
async fn json_bodies_that_are_not_objects_are_refused() {
    let c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    c.register(&worker, &[MODEL]).await;
    let wid = worker.public().to_peer_id().to_base58();
    // `/authorize` with the fields of an AuthorizeRequest as an array.
    let array = serde_json::to_vec(&json!([MODEL, wid])).expect("json");
    let r = c.signed_raw(&user, "/authorize", array, now_secs()).await;
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    for path in [
        "/workers/heartbeat",
        "/bench/challenge",
        "/workers/register",
    ] {
        for body in [&b"[]"[..], b" [] ", b"null", b"1", b"\"x\""] {
            let r = c.signed_raw(&worker, path, body.to_vec(), now_secs()).await;
            assert_eq!(
                error_code(r).await,
                (400, "bad_request".into()),
                "{path} {}",
                String::from_utf8_lossy(body)
            );
        }
    }
    // No ticket was sold: the user has no account.
    let r = c
        .get(&format!("/users/{}/balance", user.public().to_peer_id()))
        .await;
    assert_eq!(r.status(), 404);
    assert!(
        !c.audit_lines()
            .iter()
            .any(|l| l["event"] == "authorize.granted"),
        "a ticket was sold for an array"
    );
    // Objects still pass.
    assert_eq!(
        c.signed(&worker, "/workers/heartbeat", &json!({}))
            .await
            .status(),
        200
    );
    assert_eq!(c.authorize(&user, &worker, MODEL).await.status(), 200);
}

/// A console polls its own history: reads signed by the account count
/// against that account's quota, not the IP's discovery quota; foreign or
/// bad reads still count per IP.
#[tokio::test]
async fn own_history_reads_count_per_account_not_per_ip() {
    let c = TestCoordinator::start_with(|cfg| {
        cfg.discovery_per_hour = 2;
        cfg.account_reads_per_hour = 5;
    })
    .await;
    let worker = generate();
    let user = generate();
    c.register(&worker, &[MODEL]).await;
    c.ticket(&user, &worker, MODEL).await;
    let path = format!("/users/{}/transactions", user.public().to_peer_id());
    for _ in 0..5 {
        let r = c.signed_get(&user, &path).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("json");
        // The page carries the balance: one read serves a console.
        assert_eq!(v["balance"]["pending"], 300.0);
        assert_eq!(
            v["balance"]["account"],
            user.public().to_peer_id().to_base58()
        );
    }
    // The sixth is over the account's quota.
    let r = c.signed_get(&user, &path).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    c.wait_audit("429", |l| {
        l["event"] == "rate_limited" && l["scope"] == "account_reads"
    })
    .await;
    // The IP's discovery quota was not touched by those five...
    assert_eq!(c.get("/workers").await.status(), 200);
    // ...but a foreign signer's read is charged to it (2nd discovery read).
    let r = c.signed_get(&generate(), &path).await;
    assert_eq!(r.status(), 403);
    let r = c.signed_get(&generate(), &path).await;
    assert_eq!(r.status(), 429);
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

#[tokio::test]
async fn bad_input_gets_json_4xx_and_never_touches_the_ledger() {
    let c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = |body: Vec<u8>| {
        let c = &c;
        let user = &user;
        async move { c.signed_raw(user, "/authorize", body, now_secs()).await }
    };
    let cases: Vec<Vec<u8>> = vec![
        b"{not json".to_vec(),
        b"".to_vec(),
        br#"{"model": 5, "worker": "x"}"#.to_vec(),
        br#"{"model": "m"}"#.to_vec(),
        br#"{"model": "m", "worker": "w", "max_tokens": -1}"#.to_vec(),
        br#"{"model": "m", "worker": "w", "max_tokens": 99999999999999999999999}"#.to_vec(),
        vec![0xff, 0xfe, 0x7b, 0x7d],
        format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        br#"{"model": "m", "worker": "w", "extra": true}"#.to_vec(),
    ];
    for body in cases {
        let r = auth(body.clone()).await;
        let (status, _) = error_code(r).await;
        assert_eq!(
            status,
            400,
            "body {:?}",
            String::from_utf8_lossy(&body[..body.len().min(40)])
        );
    }
    // Over 1 MiB: 413 with a JSON body.
    let huge = vec![b' '; 2 * 1024 * 1024];
    let r = c
        .http
        .post(format!("{}/authorize", c.url))
        .body(huge)
        .send()
        .await
        .expect("send");
    assert_eq!(error_code(r).await, (413, "payload_too_large".into()));
    // Receipts with negative or overflowing numbers.
    for body in [
        br#"{"job_id":"j","worker":"w","user":"u","model":"m","prompt_tokens":-1,"completion_tokens":0,"started_at":0,"finished_at":0,"status":"completed"}"#.to_vec(),
        br#"{"job_id":"j","worker":"w","user":"u","model":"m","prompt_tokens":1e400,"completion_tokens":0,"started_at":0,"finished_at":0,"status":"completed"}"#.to_vec(),
        br#"{"job_id":"j","status":"weird"}"#.to_vec(),
    ] {
        let r = c.submit_raw(&reg.receipt_key, body, now_secs()).await;
        assert_eq!(error_code(r).await.0, 400);
    }
    let r = c.get("/users/not-an-id/balance").await;
    assert_eq!(error_code(r).await, (400, "bad_request".into()));
    let r = c
        .get(&format!(
            "/users/{}/transactions?limit=abc",
            worker.public().to_peer_id()
        ))
        .await;
    // Unsigned: a history is private.
    assert_eq!(error_code(r).await.0, 401);
    // The user never got an account: nothing was granted or reserved.
    let r = c
        .get(&format!("/users/{}/balance", user.public().to_peer_id()))
        .await;
    assert_eq!(error_code(r).await, (404, "unknown_account".into()));
    let _ = auth;
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_troop-coordinator")
}

/// `serve` on a port in use fails with "address in use" before it makes
/// a data folder or a key.
#[test]
fn serve_on_a_port_in_use_leaves_nothing_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = std::process::Command::new(bin())
        .args(["serve", "--listen", &addr, "--data"])
        .arg(&data)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("binding {addr}")), "{err}");
    assert!(err.contains("already in use"), "{err}");
    assert!(!data.exists(), "a data folder was made: {err}");
}

#[tokio::test]
async fn ledger_cli_audits_balances_and_history() {
    let mut c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    c.submit_receipt(
        &reg.receipt_key,
        &receipt_for(&auth.job_id, &user, &worker, MODEL, 2_000),
        now_secs(),
    )
    .await;
    let _open = c.ticket(&user, &worker, MODEL).await;
    c.stop().await;
    let data = c.dir.path().to_str().expect("utf8").to_string();
    let user_id = user.public().to_peer_id().to_base58();

    let out = std::process::Command::new(bin())
        .args(["ledger", "audit", "--data", &data])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "audit failed: {text}");
    assert!(text.contains("OK"));

    let out = std::process::Command::new(bin())
        .args(["ledger", "balance", &user_id, "--data", &data])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("available 3298.000"), "{text}");
    assert!(text.contains("pending   300.000"), "{text}");

    let out = std::process::Command::new(bin())
        .args(["ledger", "history", &user_id, "--data", &data, "--json"])
        .output()
        .expect("run");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, vec!["reserve", "settle", "reserve", "grant"]);

    // Tamper with a balance: the audit notices and exits non-zero.
    let conn = rusqlite_open(&c.dir.path().join("ledger.sqlite3"));
    conn.execute(
        "UPDATE accounts SET credits_posted = credits_posted + 1000 WHERE id = ?1",
        [&user_id],
    )
    .expect("tamper");
    drop(conn);
    let out = std::process::Command::new(bin())
        .args(["ledger", "audit", "--data", &data])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&user_id), "{text}");
}

#[tokio::test]
async fn ledger_audit_notices_a_doctored_audit_log() {
    let mut c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    c.register(&worker, &[MODEL]).await;
    assert_eq!(c.authorize(&user, &worker, MODEL).await.status(), 200);
    c.stop().await;
    let log = c.dir.path().join("logs/audit.log");
    let text = std::fs::read_to_string(&log).expect("log");
    let doctored: String = text
        .lines()
        .filter(|l| !l.contains("\"ledger.reserve\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&log, doctored).expect("write");
    let data = c.dir.path().to_str().expect("utf8");
    let out = std::process::Command::new(bin())
        .args(["ledger", "audit", "--data", data])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("missing from the audit log"), "{text}");
}

fn rusqlite_open(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("open sqlite")
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = http
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "server never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            assert!(s.success(), "exit status {s}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The ledger it left is whole.
    let out = std::process::Command::new(bin())
        .args(["ledger", "audit", "--data"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(out.status.success());
}

/// New worker ids are limited per client IP and hour (re-registering a
/// known id is not), and every address must be a multiaddr that names no
/// peer but the signer at its end.
#[tokio::test]
async fn registrations_are_limited_per_ip_and_addresses_must_be_the_signers() {
    let c = TestCoordinator::start_with(|cfg| cfg.registrations_per_ip_per_hour = 3).await;
    let first = generate();
    c.register(&first, &[MODEL]).await;
    c.register(&generate(), &[MODEL]).await;
    c.register(&generate(), &[MODEL]).await;
    let r = c
        .signed(
            &generate(),
            "/workers/register",
            &json!({ "models": [MODEL], "addresses": [] }),
        )
        .await;
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(error_code(r).await, (429, "rate_limited".into()));
    // A known id re-registers.
    c.register(&first, &[MODEL]).await;

    let me = first.public().to_peer_id();
    let other = generate().public().to_peer_id();
    let try_addr = |a: String| {
        let c = &c;
        let first = &first;
        async move {
            c.signed(
                first,
                "/workers/register",
                &json!({ "models": [MODEL], "addresses": [a] }),
            )
            .await
        }
    };
    for bad in [
        format!("/ip4/10.0.0.1/tcp/4001/p2p/{other}"),
        "not a multiaddr".to_string(),
        "/ip4/999.0.0.1/tcp/1".to_string(),
    ] {
        assert_eq!(
            error_code(try_addr(bad.clone()).await).await,
            (400, "bad_request".into()),
            "{bad}"
        );
    }
    for good in [
        format!("/ip4/10.0.0.1/tcp/4001/p2p/{me}"),
        format!("/ip4/10.0.0.2/tcp/4001/p2p/{other}/p2p-circuit"),
        format!("/ip4/10.0.0.2/tcp/4001/p2p/{other}/p2p-circuit/p2p/{me}"),
        "/ip6/::1/udp/4001/quic-v1".to_string(),
    ] {
        assert_eq!(try_addr(good.clone()).await.status(), 200, "{good}");
    }
    // The heartbeat checks its addresses the same way.
    let hb = c
        .signed(
            &first,
            "/workers/heartbeat",
            &json!({ "addresses": [format!("/ip4/10.0.0.1/tcp/1/p2p/{other}")] }),
        )
        .await;
    assert_eq!(error_code(hb).await, (400, "bad_request".into()));
}

/// Typed bodies with no unknown fields, numbers in range, and each signed
/// header sent once.
#[tokio::test]
async fn strict_bodies_and_duplicate_signature_headers_are_refused() {
    let c = TestCoordinator::start().await;
    let w = generate();
    c.register(&w, &[MODEL]).await;
    let raw = |body: &'static [u8]| {
        let c = &c;
        let w = &w;
        async move {
            c.signed_raw(w, "/workers/heartbeat", body.to_vec(), now_secs())
                .await
        }
    };
    for body in [
        &br#"{"load": {"active_jobs": 1e400}}"#[..],
        br#"{"load": {"active_jobs": -1}}"#,
        br#"{"load": {"active_jobs": 1, "extra": [1, 2]}}"#,
        br#"{"models": ["m"], "deep": {"a": {"b": {"c": 1}}}}"#,
        br#"[1, 2, 3]"#,
        b"{\"models\": [\"\xff\xfe\"]}",
    ] {
        let r = raw(body).await;
        assert_eq!(
            error_code(r).await,
            (400, "bad_request".into()),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(raw(br#"{"load": {"active_jobs": 1}}"#).await.status(), 200);
    // `/bench/challenge` takes `{}` and nothing else.
    let r = c
        .signed(&w, "/bench/challenge", &json!({"n": 16, "rounds": 1}))
        .await;
    assert_eq!(error_code(r).await, (400, "bad_request".into()));

    // Two signatures (or two nonces) in one request: refused.
    let body = br#"{}"#.to_vec();
    let h =
        troop_protocol::signed::sign_request(&w, "POST", "/workers/heartbeat", &body, now_secs());
    let mut req = c
        .http
        .post(format!("{}/workers/heartbeat", c.url))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in h.pairs() {
        req = req.header(k, v);
        if k == troop_protocol::signed::HEADER_SIGNATURE {
            req = req.header(k, v);
        }
    }
    let r = req.send().await.expect("POST");
    assert_eq!(error_code(r).await, (401, "bad_signature".into()));
}

/// One IP cannot fill `/bootstrap` with ids it made up.
#[tokio::test]
async fn bootstrap_lists_at_most_a_few_workers_per_ip() {
    let c = TestCoordinator::start_with(|cfg| cfg.bootstrap_per_ip = 2).await;
    for _ in 0..5 {
        c.register(&generate(), &[MODEL]).await;
    }
    let boot: Value = c.get("/bootstrap").await.json().await.expect("json");
    let listed = boot["peers"].as_array().expect("peers").len();
    assert_eq!(listed, 2, "{boot}");
}

/// A crash between the ledger's commit and the audit log's flush loses the
/// log's tail: `ledger audit` calls that recoverable (exit 3), `ledger
/// repair` appends the lines on a stopped coordinator (and refuses on a
/// running one), and the audit passes again.
#[tokio::test]
async fn ledger_repair_restores_an_audit_log_cut_by_a_crash() {
    let mut c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    c.register(&worker, &[MODEL]).await;
    assert_eq!(c.authorize(&user, &worker, MODEL).await.status(), 200);
    let data = c.dir.path().to_str().expect("utf8").to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .output()
            .expect("run")
    };
    // Running: repair refuses (the server owns the audit log).
    let out = run(&["ledger", "repair", "--data", &data]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a coordinator is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.stop().await;
    // Cut the log where a crash would: just before the reservation's line.
    let log = c.dir.path().join("logs/audit.log");
    let text = std::fs::read_to_string(&log).expect("log");
    let cut = text.find("\"ledger.reserve\"").expect("reserve line");
    let start = text[..cut].rfind('\n').map_or(0, |i| i + 1);
    std::fs::write(&log, &text[..start]).expect("write");

    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains("recoverable"), "{said}");
    let out = run(&["ledger", "repair", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("appended 1"), "{said}");
    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    let out = run(&["ledger", "repair", "--data", &data]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to repair"));
}

/// A crash can lose a settlement's audit line while the ticket's
/// `authorize.granted` line for the same job, written before it, stays in
/// the log: that is a lost tail (exit 3) that `ledger repair` appends, not
/// a finding.
#[tokio::test]
async fn ledger_repair_restores_a_lost_settlement_line_after_its_ticket_line() {
    let mut c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    let r = c
        .submit_receipt(
            &reg.receipt_key,
            &receipt_for(&auth.job_id, &user, &worker, MODEL, 1_500),
            now_secs(),
        )
        .await;
    assert_eq!(r.status(), 200);
    c.stop().await;
    // Cut the log where a crash would: just before the settlement's line.
    let log = c.dir.path().join("logs/audit.log");
    let text = std::fs::read_to_string(&log).expect("log");
    let cut = text.find("\"ledger.settle\"").expect("settle line");
    let start = text[..cut].rfind('\n').map_or(0, |i| i + 1);
    let kept = &text[..start];
    assert!(
        kept.contains("\"authorize.granted\"") && kept.contains(auth.job_id.as_str()),
        "the ticket's line stays: {kept}"
    );
    std::fs::write(&log, kept).expect("write");

    let data = c.dir.path().to_str().expect("utf8").to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .output()
            .expect("run")
    };
    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{said}");
    let out = run(&["ledger", "repair", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("appended 1"), "{said}");
    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");

    // A line written after the settlement (its receipt replayed) in the
    // log while the settlement's line is not: removed, not a lost tail.
    let text = std::fs::read_to_string(&log).expect("log");
    let replay = json!({"ts_ms": 1, "event": "security.replay", "request_id": null,
        "kind": "receipt", "job_id": auth.job_id});
    let doctored: String = text
        .lines()
        .filter(|l| !l.contains("\"ledger.settle\""))
        .map(|l| format!("{l}\n"))
        .chain(std::iter::once(format!("{replay}\n")))
        .collect();
    std::fs::write(&log, doctored).expect("write");
    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("missing from the audit log"), "{said}");
}

fn addr_of(c: &TestCoordinator) -> String {
    c.url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or `secs` pass).
async fn closed_within(s: &mut tokio::net::TcpStream, secs: u64) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A client that sends half its headers and then nothing is cut off after
/// the idle limit; connections beyond the per-IP cap are closed at once.
#[tokio::test]
async fn slow_and_surplus_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let c = TestCoordinator::start_with(|cfg| {
        cfg.conn_limits.idle = Duration::from_secs(1);
        cfg.conn_limits.max_per_ip = 2;
    })
    .await;
    let addr = addr_of(&c);
    let mut slow = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut idle = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    // A third connection from the same address is over the cap.
    let mut third = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    assert!(closed_within(&mut third, 5).await, "over the cap, closed");
    assert!(closed_within(&mut slow, 10).await, "slow headers cut off");
    assert!(
        closed_within(&mut idle, 10).await,
        "idle connection cut off"
    );
    // Their places are free again.
    let fresh = reqwest::Client::new();
    let r = fresh
        .get(format!("{}/health", c.url))
        .send()
        .await
        .expect("health");
    assert_eq!(r.status(), 200);
}

/// Beyond `max_in_flight` requests at once the answer is 503 `busy` with
/// `Retry-After`, at once.
#[tokio::test]
async fn requests_over_the_in_flight_limit_are_shed_with_503() {
    use tokio::io::AsyncWriteExt;
    let c = TestCoordinator::start_with(|cfg| cfg.max_in_flight = 1).await;
    // Hold the one place: a POST whose body never finishes arriving.
    let mut held = tokio::net::TcpStream::connect(addr_of(&c))
        .await
        .expect("connect");
    held.write_all(
        b"POST /workers/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"lo",
    )
    .await
    .expect("write");
    let r = common::eventually_status(&c, "/health", 503).await;
    assert!(r.headers().get("retry-after").is_some());
    let (status, code) = error_code(r).await;
    assert_eq!((status, code.as_str()), (503, "busy"));
    drop(held);
    common::eventually_status(&c, "/health", 200).await;
}

/// With `--metrics-listen`, `/metrics` is served there and not on the
/// public address.
#[tokio::test]
async fn metrics_can_move_to_their_own_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let c = TestCoordinator::start_with(|cfg| cfg.metrics_listen = Some(maddr)).await;
    assert_eq!(c.get("/metrics").await.status(), 404);
    let text = reqwest::get(format!("http://{maddr}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(text.contains("troop_http_requests_total"), "{text}");
}

/// Replicas share one signing key (`keygen --out`, `serve --key-file`), and
/// a rotation lists the previous key in the JWKS: a ticket signed with the
/// old key by a replica not yet rotated still verifies with the keys the
/// rotated replica publishes.
#[tokio::test]
async fn replicas_share_a_key_file_and_a_rotation_keeps_old_tickets_valid() {
    use troop_coordinator::tickets::TicketKeys;
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (dir.path().join("old.pem"), dir.path().join("keys/new.pem"));
    let old_kid = TicketKeys::generate_to(&old).expect("old key");
    let new_kid = TicketKeys::generate_to(&new).expect("new key");
    assert_ne!(old_kid, new_kid);
    let again = TicketKeys::generate_to(&old).expect_err("never overwritten");
    assert!(again.to_string().contains("exists already"), "{again}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&old).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o400);
    }
    let o = old.clone();
    let a = TestCoordinator::start_with(move |cfg| cfg.key_file = Some(o)).await;
    let (n, o) = (new.clone(), old.clone());
    let b = TestCoordinator::start_with(move |cfg| {
        cfg.key_file = Some(n);
        cfg.previous_key_files = vec![o];
    })
    .await;
    let a2 = TestCoordinator::start_with({
        let o = old.clone();
        move |cfg| cfg.key_file = Some(o)
    })
    .await;
    let kid = |v: Value| v["kid"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        kid(a.get("/public-key").await.json().await.expect("json")),
        old_kid
    );
    assert_eq!(
        kid(a2.get("/public-key").await.json().await.expect("json")),
        old_kid
    );
    assert_eq!(
        kid(b.get("/public-key").await.json().await.expect("json")),
        new_kid
    );
    let jwks: Value = b
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert_eq!(kids, vec![new_kid.as_str(), old_kid.as_str()]);

    // A ticket from the replica still on the old key...
    let (worker, user) = (generate(), generate());
    a.register(&worker, &[MODEL]).await;
    let r = a.authorize(&user, &worker, MODEL).await;
    assert_eq!(r.status(), 200);
    let auth: AuthorizeResponse = r.json().await.expect("json");
    // ...verifies with what the rotated replica publishes, and with the
    // other replica's public key as well.
    let verifier = |jwks: &Value| {
        let mut v = TicketVerifier::new(worker.public().to_peer_id().to_base58());
        for k in jwks["keys"].as_array().expect("keys") {
            v.add_key_components(
                k["kid"].as_str().expect("kid"),
                k["n"].as_str().expect("n"),
                k["e"].as_str().expect("e"),
            )
            .expect("key");
        }
        v
    };
    let claims = verifier(&jwks)
        .check(&auth.ticket, now_secs())
        .expect("old-key ticket verifies");
    assert_eq!(claims.aud, worker.public().to_peer_id().to_base58());
    // Without the previous key, the JWKS of a coordinator on the new key
    // alone would not verify it.
    let c = TestCoordinator::start_with({
        let n = new.clone();
        move |cfg| cfg.key_file = Some(n)
    })
    .await;
    let only_new: Value = c
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    assert!(verifier(&only_new).check(&auth.ticket, now_secs()).is_err());
}
