//! What keeps the coordinator standing: signatures and nonces, rate and
//! connection limits, and bad input refused without touching the ledger.

use super::*;

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
