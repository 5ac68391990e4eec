//! Workers joining: registration, heartbeats and `/bootstrap`.

use super::*;

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

/// `/bootstrap` hands each caller only the addresses its place can reach:
/// a caller on another host (here named by a trusted proxy) gets no
/// loopback, unspecified or LAN address, and no worker or relay left with
/// nothing reachable; one on a private network also gets LAN addresses;
/// one on the same host gets every dialable one.
#[tokio::test]
async fn bootstrap_gives_a_caller_on_another_host_no_loopback_address() {
    let relay = generate().public().to_peer_id().to_base58();
    let local_relay = format!("/ip4/127.0.0.1/tcp/4001/p2p/{relay}");
    let r = local_relay.clone();
    let c = TestCoordinator::start_with(move |cfg| {
        cfg.trusted_proxy = true;
        cfg.relays = vec![r];
    })
    .await;
    let public = generate();
    let addrs = json!([
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/0.0.0.0/tcp/4001",
        "/ip6/::1/tcp/4001",
        "/ip4/192.168.1.5/tcp/4001",
        "/ip4/203.0.113.7/tcp/4001",
    ]);
    let resp = c
        .signed(
            &public,
            "/workers/register",
            &json!({"models": [MODEL], "addresses": addrs}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    // A worker with loopback addresses only: of no use elsewhere.
    let local_only = generate();
    c.register(&local_only, &[MODEL]).await;
    let from = |forwarded: Option<&'static str>| {
        let c = &c;
        async move {
            let mut req = c.http.get(format!("{}/bootstrap", c.url));
            if let Some(f) = forwarded {
                req = req.header("x-forwarded-for", f);
            }
            let v: Value = req.send().await.expect("GET").json().await.expect("json");
            v["peers"].as_array().cloned().unwrap_or_default()
        }
    };
    let elsewhere = from(Some("198.51.100.9")).await;
    assert_eq!(
        elsewhere,
        vec![json!({"peer_id": public.public().to_peer_id().to_base58(),
                    "addresses": ["/ip4/203.0.113.7/tcp/4001"], "relay": false})],
        "a caller on another host"
    );
    let text = serde_json::to_string(&elsewhere).expect("json");
    assert!(!text.contains("127.0.0.1") && !text.contains("0.0.0.0") && !text.contains("::1"));
    let lan = from(Some("10.0.0.3")).await;
    assert_eq!(lan.len(), 1, "{lan:?}");
    assert_eq!(
        lan[0]["addresses"],
        json!(["/ip4/192.168.1.5/tcp/4001", "/ip4/203.0.113.7/tcp/4001"])
    );
    let here = from(None).await;
    assert_eq!(here.len(), 3, "the relay and both workers: {here:?}");
    assert_eq!(here[0]["addresses"], json!([local_relay]));
    let mine = here
        .iter()
        .find(|p| p["peer_id"] == public.public().to_peer_id().to_base58())
        .expect("listed");
    assert_eq!(
        mine["addresses"].as_array().map(Vec::len),
        Some(4),
        "all but the unspecified one: {mine}"
    );
}

/// `/bootstrap` keeps its order between requests (`worker_index`): a
/// heartbeat with new models, a worker that leaves and one that comes
/// back show in the very next answer.
#[tokio::test]
async fn bootstrap_follows_models_leaves_and_returns_at_once() {
    let c = TestCoordinator::start().await;
    // The peer ids `/bootstrap?model=` lists, sorted.
    async fn listed(c: &TestCoordinator, model: &str) -> Vec<String> {
        let boot: Value = c
            .get(&format!("/bootstrap?model={model}"))
            .await
            .json()
            .await
            .expect("json");
        let mut ids: Vec<String> = boot["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter_map(|p| p["peer_id"].as_str().map(String::from))
            .collect();
        ids.sort();
        ids
    }
    let a = generate();
    let b = generate();
    let a_id = c.register(&a, &["m1"]).await.peer_id;
    let b_id = c.register(&b, &["m1"]).await.peer_id;
    let mut both = vec![a_id.clone(), b_id.clone()];
    both.sort();
    assert_eq!(listed(&c, "m1").await, both);
    // b now serves m2 instead.
    let hb = c
        .signed(&b, "/workers/heartbeat", &json!({ "models": ["m2"] }))
        .await;
    assert_eq!(hb.status(), 200);
    assert_eq!(listed(&c, "m1").await, std::slice::from_ref(&a_id));
    assert_eq!(listed(&c, "m2").await, [b_id]);
    // a leaves: gone at once.
    let left = c.signed(&a, "/workers/leave", &json!({})).await;
    assert_eq!(left.status(), 200);
    assert!(listed(&c, "m1").await.is_empty());
    // A newcomer registers while a is gone (a is out of the order now).
    c.register(&generate(), &["m3"]).await;
    assert!(listed(&c, "m1").await.is_empty());
    // a's next heartbeat (signed a second after its leave: one not newer
    // is a replay) brings it back at once.
    let body = serde_json::to_vec(&json!({})).expect("json");
    let hb = c
        .signed_raw(&a, "/workers/heartbeat", body, now_secs() + 1)
        .await;
    assert_eq!(hb.status(), 200);
    assert_eq!(listed(&c, "m1").await, [a_id]);
}

#[tokio::test]
async fn workers_are_listed_in_pages_or_one_by_peer_id() {
    let c = TestCoordinator::start().await;
    for _ in 0..5 {
        c.register(&generate(), &[MODEL]).await;
    }
    let all: Value = c.get("/workers").await.json().await.expect("json");
    let all = all["workers"].as_array().expect("workers").clone();
    assert_eq!(all.len(), 5);
    let ids: Vec<String> = all
        .iter()
        .map(|w| w["peer_id"].as_str().unwrap_or("").to_string())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "in peer id order");

    // Pages of two: 2, 2, 1, each going on after the last one's last id.
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &after {
            Some(a) => format!("/workers?limit=2&after={a}"),
            None => "/workers?limit=2".into(),
        };
        let page: Value = c.get(&q).await.json().await.expect("json");
        let got = page["workers"].as_array().expect("workers").clone();
        pages += 1;
        assert!(got.len() <= 2, "{page}");
        paged.extend(got);
        match page["next"].as_str() {
            Some(n) => {
                assert_eq!(Some(n), paged.last().and_then(|w| w["peer_id"].as_str()));
                after = Some(n.to_string());
            }
            None => break,
        }
        assert!(pages < 10, "pages never end");
    }
    assert_eq!(pages, 3);
    assert_eq!(paged, all, "the pages together are the whole list");

    // One by its peer id; an unknown one is an empty list.
    let one: Value = c
        .get(&format!("/workers?peer={}", ids[3]))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(one["workers"], json!([all[3]]));
    assert!(one.get("next").is_none());
    let none: Value = c
        .get(&format!(
            "/workers?peer={}",
            generate().public().to_peer_id()
        ))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(none["workers"], json!([]));

    // Bad pages are refused with what to send.
    for q in [
        "limit=0",
        "limit=1001",
        "limit=two",
        "peer=x&limit=1",
        "after=x",
    ] {
        let r = c.get(&format!("/workers?{q}")).await;
        assert_eq!(r.status(), 400, "{q}");
        let v: Value = r.json().await.expect("json");
        assert!(v["error"]["message"].is_string(), "{q}: {v}");
    }
}
