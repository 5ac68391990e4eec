//! The mesh end to end on loopback: a real coordinator, real workers in
//! front of a fake upstream in each dialect, and a gateway.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{
    Dialect, FakeUpstream, MODEL, Mode, TestNet, chat_text, eventually, is_unauthorized,
    open_infer_stream, request, send_ticket, sse_data, tokens,
};
use futures::StreamExt;
use serde_json::Value;
use troop_node::coordinator_client::CoordinatorClient;
use troop_node::frames_io::{read_frame, write_frame};
use troop_protocol::frames::{FRAME_VERSION, Frame};

async fn stream_and_check_payment(dialect: Dialect) {
    let fake = FakeUpstream::start(dialect, tokens(12), Duration::from_millis(5)).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net.add_worker(&fake.url, |_| {}).await;
    if dialect == Dialect::Ollama {
        // Ollama's weights are the blob its modelfile names (not the
        // manifest digest of /api/tags), and its version is the runtime's.
        let m = net.workers[w].model_adverts();
        assert_eq!(
            m[0].digest.as_deref(),
            Some(format!("sha256:{}", common::OLLAMA_BLOB).as_str())
        );
        assert_eq!(m[0].runtime.as_deref(), Some("ollama 0.12.3"));
    }
    net.add_gateway().await;
    net.wait_for_workers(1).await;

    let resp = net.chat(true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let body = resp.text().await.expect("body");
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    assert_eq!(chat_text(&events), tokens(12).concat());
    let first: Value = serde_json::from_str(&events[0]).expect("json chunk");
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    // Not streaming, and /v1/completions.
    let r: Value = net.chat(false).await.json().await.expect("json");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["content"], tokens(12).concat());
    assert_eq!(r["usage"]["completion_tokens"], 12);
    let r: Value = net
        .http
        .post(format!("{}/v1/completions", net.gateway_url()))
        .json(&serde_json::json!({"model": MODEL, "prompt": "Once", "max_tokens": 5}))
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["text"], tokens(12)[..5].concat());
    assert_eq!(r["choices"][0]["finish_reason"], "length");

    // The three requests went under one session (one ticket); once the
    // worker closed it (idle), its receipt settled with all three requests
    // acknowledged by the user's signature.
    let user = net.gateway_peer();
    let worker = net.workers[w].peer_id.to_base58();
    let (ub, wb) = eventually("the session's settlement", 20, || {
        let net = &net;
        let user = user.clone();
        let worker = worker.clone();
        async move {
            let rep = net.reputation(&worker).await?;
            if rep["requests"].as_u64()? < 3 {
                return None;
            }
            assert_eq!(
                rep["acknowledged_share"], 1.0,
                "every request acknowledged: {rep}"
            );
            Some((net.balance(&user).await?, net.balance(&worker).await?))
        }
    })
    .await;
    // The user paid exactly what the worker earned (the gateway may hold
    // one spare ticket's reservation, which is still the user's).
    let cost = wb["available"].as_f64().expect("worker balance");
    let avail = ub["available"].as_f64().expect("user balance");
    let held = ub["pending"].as_f64().expect("user pending");
    assert!(cost > 0.0);
    assert!(held <= 300.0, "at most one spare reservation, got {held}");
    assert!(
        (avail + held + cost - 3600.0).abs() < 1e-6,
        "user {avail} + held {held} + worker {cost} != 3600"
    );
    assert_eq!(fake.state.completed.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_from_an_openai_upstream_and_pays() {
    stream_and_check_payment(Dialect::OpenAi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_from_an_ollama_upstream_and_pays() {
    stream_and_check_payment(Dialect::Ollama).await;
}

async fn found_with(dht: bool, gossip: bool) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "troop_node=debug,troop_coordinator=info",
        ))
        .with_test_writer()
        .try_init();
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    net.dht = dht;
    net.gossip = gossip;
    // Both join through a third node, so the gateway does not start out
    // connected to the worker: it must find it.
    net.add_hub().await;
    net.add_worker(&fake.url, |_| {}).await;
    // The coordinator is asked only when both mesh paths are off, so each
    // test shows one path.
    let ask_coordinator = !dht && !gossip;
    net.add_gateway_with(|g| {
        g.coordinator_lookup_after = ask_coordinator.then_some(Duration::ZERO);
    })
    .await;
    let resp = eventually("a worker found", 30, || {
        let net = &net;
        async move {
            let r = net.chat(false).await;
            (r.status() == 200).then_some(r)
        }
    })
    .await;
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], tokens(3).concat());
    let sources: Vec<String> = net
        .gateway
        .as_ref()
        .expect("gateway")
        .state
        .table
        .read()
        .expect("table")
        .rows()
        .iter()
        .map(|r| {
            serde_json::to_value(r.source)
                .expect("json")
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    let want = match (gossip, dht) {
        (true, _) => "gossip",
        (false, true) => "dht",
        (false, false) => "coordinator",
    };
    assert_eq!(sources, vec![want.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_found_through_the_dht_with_gossip_off() {
    found_with(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_found_through_gossip_with_the_dht_off() {
    found_with(false, true).await;
}

/// With neither gossip nor the DHT, the gateway asks the coordinator
/// (`GET /bootstrap?model=`) for the model's workers and dials one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_found_through_the_coordinator_with_gossip_and_the_dht_off() {
    found_with(false, false).await;
}

/// Opens an inference stream from the gateway's node to `worker` and sends
/// a request with `ticket`; returns the first frame back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_for_another_worker_expired_or_reused_are_refused() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let a = net.add_worker(&fake.url, |_| {}).await;
    let b = net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(2).await;
    let user = troop_protocol::identity::generate();
    let client = CoordinatorClient::new(&net.coordinator_url(), user);
    let (pa, pb) = (net.workers[a].peer_id, net.workers[b].peer_id);

    // A ticket for A, shown to B.
    let t = client
        .authorize(MODEL, &pa.to_base58(), None)
        .await
        .expect("ticket")
        .ticket;
    assert!(is_unauthorized(&send_ticket(&net, pb, t.clone()).await));
    // Used once at A: fine. Twice: refused.
    assert!(matches!(
        send_ticket(&net, pa, t.clone()).await,
        Some(Frame::Chunk { .. })
    ));
    assert!(is_unauthorized(&send_ticket(&net, pa, t).await));
    // Expired (signed with the coordinator's own key, an hour ago).
    let keys = troop_coordinator::tickets::TicketKeys::load_or_create(
        &net.dir.path().join("coordinator/keys"),
    )
    .expect("keys");
    let now = troop_coordinator::unix_secs();
    let claims = troop_protocol::ticket::TicketClaims {
        iss: troop_protocol::ticket::TICKET_ISSUER.into(),
        sub: "12D3KooWuser".into(),
        aud: pa.to_base58(),
        model: MODEL.into(),
        jti: "expired-job".into(),
        iat: now - 3600,
        nbf: now - 3600,
        exp: now - 3300,
        max_tokens: None,
        reserved_milli: 0,
    };
    assert!(is_unauthorized(
        &send_ticket(&net, pa, keys.sign(&claims).expect("sign")).await
    ));
    // Garbage.
    assert!(is_unauthorized(
        &send_ticket(&net, pa, "not.a.ticket".into()).await
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_failing_before_the_first_token_is_skipped() {
    let bad = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let good = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let a = net.add_worker(&bad.url, |_| {}).await;
    let b = net.add_worker(&good.url, |_| {}).await;
    bad.set_mode(Mode::FailBeforeFirst);
    net.add_gateway().await;
    net.wait_for_workers(2).await;
    // Make the failing worker the gateway's first choice.
    let gw = net.gateway.as_ref().expect("gateway");
    gw.state
        .table
        .write()
        .expect("table")
        .add_inflight(&net.workers[b].peer_id, 10);
    let _ = a;
    for _ in 0..3 {
        let resp = net.chat(true).await;
        assert_eq!(resp.status(), 200);
        let events = sse_data(&resp.text().await.expect("body"));
        assert_eq!(chat_text(&events), tokens(4).concat());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    }
    assert!(
        bad.state.requests.load(Ordering::SeqCst) >= 1,
        "the bad worker was tried first"
    );
    assert_eq!(good.state.completed.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_gives_an_error_event_and_the_user_pays_nothing() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(400), Duration::from_millis(20)).await;
    let mut net = TestNet::start(|c| {
        c.ticket_ttl = Duration::from_secs(2);
        c.reservation_grace = Duration::from_secs(0);
    })
    .await;
    let w = net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let resp = net.chat(true).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while sse_data(&text).len() < 5 {
        let chunk = body.next().await.expect("chunks arrive").expect("bytes");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let worker_id = net.workers[w].peer_id.to_base58();
    net.workers[w].kill();
    let rest = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(Ok(chunk)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    })
    .await
    .expect("the stream closes within seconds, no hang");
    let events = sse_data(&rest);
    assert_ne!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "no [DONE] for a broken answer"
    );
    let last: Value = serde_json::from_str(events.last().expect("an event")).expect("json");
    assert_eq!(last["error"]["code"], "worker_lost", "{last}");
    // No receipt comes: the reservation is refunded when it expires.
    let user = net.gateway_peer();
    eventually("the refund", 30, || {
        let net = &net;
        let user = user.clone();
        async move {
            let b = net.balance(&user).await?;
            (b["available"] == 3600.0 && b["pending"] == 0.0).then_some(())
        }
    })
    .await;
    assert_eq!(
        net.balance(&worker_id)
            .await
            .map(|b| b["available"].clone()),
        Some(Value::from(0.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_coordinator_down_heartbeats_back_off_tickets_work_and_receipts_arrive_once() {
    let fake = FakeUpstream::start(Dialect::Ollama, tokens(3), Duration::from_millis(5)).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net
        .add_worker(&fake.url, |c| c.breaker_cooldown = Duration::from_secs(3))
        .await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let worker = net.workers[w].peer_id;
    let user = troop_protocol::identity::generate();
    let client = CoordinatorClient::new(&net.coordinator_url(), user.clone());
    let ticket = client
        .authorize(MODEL, &worker.to_base58(), None)
        .await
        .expect("ticket")
        .ticket;

    net.stop_coordinator().await;
    // Five failed heartbeats open the breaker; then heartbeats are skipped.
    let stats = net.workers[w].stats.clone();
    eventually("the breaker to open", 20, || {
        let stats = stats.clone();
        async move {
            let open = stats.breaker.lock().ok()?.as_str() == "open";
            (open && stats.heartbeats_skipped.load(Ordering::SeqCst) >= 2).then_some(())
        }
    })
    .await;
    assert!(stats.heartbeats_failed.load(Ordering::SeqCst) >= 5);
    let failed_when_open = stats.heartbeats_failed.load(Ordering::SeqCst);

    // The ticket issued before the outage still works (verified offline).
    let mut s = open_infer_stream(&net, worker).await.expect("stream");
    write_frame(
        &mut s,
        &Frame::Request {
            version: FRAME_VERSION,
            ticket,
            request: request(),
            index: 0,
        },
    )
    .await
    .expect("write");
    let mut got = String::new();
    loop {
        match read_frame(&mut s).await.expect("frame") {
            Some(Frame::Chunk { text }) => got.push_str(&text),
            Some(Frame::Done { .. }) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, tokens(3).concat());
    // The receipt waits on disk.
    eventually("the receipt to be queued", 10, || {
        let n = net.workers[w].pending_receipts();
        async move { (n == 1).then_some(()) }
    })
    .await;
    // While open, heartbeats are not hammered: at most one trial per cool-down.
    assert!(stats.heartbeats_failed.load(Ordering::SeqCst) <= failed_when_open + 2);

    net.restart_coordinator().await;
    eventually("the receipt delivered", 60, || {
        let n = net.workers[w].pending_receipts();
        async move { (n == 0).then_some(()) }
    })
    .await;
    eventually("heartbeats to resume", 30, || {
        let stats = stats.clone();
        async move { (stats.breaker.lock().ok()?.as_str() == "closed").then_some(()) }
    })
    .await;
    let b = net
        .balance(&worker.to_base58())
        .await
        .expect("worker balance");
    assert!(b["available"].as_f64().expect("number") > 0.0);
    let audit =
        std::fs::read_to_string(net.dir.path().join("coordinator/logs/audit.log")).expect("audit");
    let settles = audit
        .lines()
        .filter(|l| l.contains("\"ledger.settle\""))
        .count();
    assert_eq!(settles, 1, "delivered exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_reset_the_stream_and_the_worker_keeps_serving() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let worker = net.workers[w].peer_id;
    use futures::{AsyncReadExt, AsyncWriteExt};
    for bad in [
        vec![0x7f, 0xff, 0xff, 0xff],
        vec![0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef],
        vec![0, 0, 0, 0],
        vec![0, 0, 0, 9, 1],
    ] {
        let mut s = open_infer_stream(&net, worker).await.expect("stream");
        s.write_all(&bad).await.expect("write");
        let _ = s.close().await;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("reset, not hang");
        assert!(n.is_err() || rest.is_empty(), "no answer to garbage");
    }
    // A wrong version gets a clear error frame.
    let mut s = open_infer_stream(&net, worker).await.expect("stream");
    write_frame(
        &mut s,
        &Frame::Request {
            version: 99,
            ticket: "t".into(),
            request: request(),
            index: 0,
        },
    )
    .await
    .expect("write");
    assert!(matches!(
        read_frame(&mut s).await,
        Ok(Some(Frame::Error { .. }))
    ));
    // Still serving.
    let resp = net.chat(false).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_bad_requests_in_openai_shape() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let mut net = TestNet::start(|c| c.starter_credits_milli = 0).await;
    net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let url = format!("{}/v1/chat/completions", net.gateway_url());
    let cases: Vec<(&str, u16, &str)> = vec![
        ("{not json", 400, "invalid_request"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}]}"#,
            400,
            "invalid_request",
        ),
        (r#"{"model": "fake-model"}"#, 400, "invalid_request"),
        (
            r#"{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "temperature": 9}"#,
            400,
            "invalid_request",
        ),
        (
            r#"{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": -4}"#,
            400,
            "invalid_request",
        ),
        (
            r#"{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}"#,
            404,
            "model_not_found",
        ),
        // Starter credits are 0 here: the coordinator refuses the reservation.
        (
            r#"{"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}"#,
            402,
            "insufficient_credits",
        ),
    ];
    for (body, status, code) in cases {
        let r = net
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("post");
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.expect("json error");
        assert_eq!(v["error"]["code"], code, "{body}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(v["error"]["type"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_with_benchmark_proves_its_hardware_and_advertises_the_multiplier() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let mut net = TestNet::start(|c| {
        c.bench_size = 64;
        c.bench_rounds = 2;
        c.reference_gflops = 1e-6;
    })
    .await;
    let w = net
        .add_worker(&fake.url, |c| {
            c.benchmark = Some(troop_bench_kernels::Backend::Cpu)
        })
        .await;
    net.add_gateway().await;
    let peer = net.workers[w].peer_id.to_base58();
    let url = format!("{}/workers", net.coordinator_url());
    let http = net.http.clone();
    eventually("the verified multiplier", 30, || {
        let http = http.clone();
        let url = url.clone();
        let peer = peer.clone();
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let me = v["workers"]
                .as_array()?
                .iter()
                .find(|x| x["peer_id"] == peer.as_str())?
                .clone();
            (me["verified_gflops"].as_f64()? > 0.0 && me["hardware_multiplier"] == 8.0)
                .then_some(())
        }
    })
    .await;
    let gw = net.gateway.as_ref().expect("gateway");
    eventually("the advert to carry it", 30, || {
        let rows = gw.state.table.read().map(|t| t.rows()).unwrap_or_default();
        async move {
            rows.iter()
                .any(|r| r.hardware_multiplier == Some(8.0))
                .then_some(())
        }
    })
    .await;
}

/// Whether a graphics adapter is here (lavapipe in CI); otherwise says why
/// the test is skipped, or fails under `TROOP_REQUIRE_VULKAN_TESTS=1`.
fn have_vulkan(test: &str) -> bool {
    if !troop_bench_kernels::adapters().is_empty() {
        return true;
    }
    let why = "no Vulkan adapter (apt-get install mesa-vulkan-drivers)";
    assert!(
        std::env::var("TROOP_REQUIRE_VULKAN_TESTS").as_deref() != Ok("1"),
        "TROOP_REQUIRE_VULKAN_TESTS=1 but {why}"
    );
    eprintln!("skipped: {test}: {why}");
    false
}

/// `--bench-backend wgpu` against a real coordinator: the proof (on
/// lavapipe here, a GPU elsewhere) is accepted with the backend and adapter
/// named; then the coordinator asks for re-proofs at random (here at every
/// heartbeat) and the worker answers them while it streams answers, none
/// of which loses a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_proves_on_wgpu_and_answers_reproofs_while_it_streams() {
    if !have_vulkan("a_worker_proves_on_wgpu_and_answers_reproofs_while_it_streams") {
        return;
    }
    let n_tokens = 150;
    let fake =
        FakeUpstream::start(Dialect::OpenAi, tokens(n_tokens), Duration::from_millis(20)).await;
    let mut net = TestNet::start(|c| {
        c.bench_size = 256;
        c.bench_rounds = 2;
        c.reference_gflops = 1e-6;
        c.reproof_mean = Duration::from_millis(1);
    })
    .await;
    let w = net
        .add_worker(&fake.url, |c| {
            c.benchmark = Some(troop_bench_kernels::Backend::Wgpu);
            c.http = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
            c.heartbeat_interval = Duration::from_millis(300);
        })
        .await;
    net.add_gateway().await;
    let peer = net.workers[w].peer_id.to_base58();
    let url = format!("{}/workers", net.coordinator_url());
    let http = net.http.clone();
    let me = eventually("the wgpu proof verified", 120, || {
        let http = http.clone();
        let url = url.clone();
        let peer = peer.clone();
        async move {
            let v = common::get_json(&http, &url).await?;
            let me = v["workers"]
                .as_array()?
                .iter()
                .find(|x| x["peer_id"] == peer.as_str())?
                .clone();
            (me["hardware_multiplier"] == 8.0).then_some(me)
        }
    })
    .await;
    assert_eq!(me["hardware_backend"], "wgpu", "{me}");
    assert!(me["hardware_adapter"].is_string(), "{me}");
    net.wait_for_workers(1).await;

    let status_url = format!(
        "http://{}/troop/status",
        net.workers[w].http_addr.expect("status address")
    );
    let status = || async {
        common::get_json(&http, &status_url)
            .await
            .expect("the status page")
    };
    let v = status().await;
    assert!(
        v["hardware"]["adapters"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{v}"
    );
    let mut during = 0;
    for _ in 0..6 {
        let before = status().await["hardware"]["proof"]["reproofs"]
            .as_u64()
            .unwrap_or(0);
        let body = http
            .post(format!("{}/v1/chat/completions", net.gateway_url()))
            .json(&serde_json::json!({
                "model": common::MODEL,
                "messages": [{"role": "user", "content": "hello"}],
                "stream": true,
            }))
            .send()
            .await
            .expect("POST")
            .text()
            .await
            .expect("the streamed answer");
        assert_eq!(chat_text(&sse_data(&body)), tokens(n_tokens).concat());
        let v = status().await;
        let after = v["hardware"]["proof"]["reproofs"].as_u64().unwrap_or(0);
        if after > before {
            during += 1;
            assert_eq!(v["hardware"]["proof"]["backend"], "wgpu", "{v}");
            assert!(v["hardware"]["proof"]["fallback"].is_null(), "{v}");
            break;
        }
    }
    assert!(
        during > 0,
        "no re-proof was answered while an answer streamed"
    );
}

/// The proof at the coordinator's defaults (n = 4096, 4 rounds): the
/// openings must fit the default 1 MiB body limit (they are Merkle paths
/// only) and the worker must come out with a verified throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_at_the_default_size_is_verified_end_to_end() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let mut net = TestNet::start(|c| {
        assert_eq!((c.bench_size, c.bench_rounds), (4096, 4));
        assert_eq!(c.body_limit_bytes, 1024 * 1024);
    })
    .await;
    let w = net
        .add_worker(&fake.url, |c| {
            c.benchmark = Some(troop_bench_kernels::Backend::Cpu)
        })
        .await;
    let peer = net.workers[w].peer_id.to_base58();
    let url = format!("{}/workers", net.coordinator_url());
    let http = net.http.clone();
    let gflops = eventually("the verified throughput at n = 4096", 240, || {
        let http = http.clone();
        let url = url.clone();
        let peer = peer.clone();
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let me = v["workers"]
                .as_array()?
                .iter()
                .find(|x| x["peer_id"] == peer.as_str())?
                .clone();
            me["verified_gflops"].as_f64().filter(|g| *g > 0.0)
        }
    })
    .await;
    println!("default-size proof verified at {gflops:.1} GFLOP/s");
}

/// A DHT lookup walks on to closer peers until one names a provider. In a
/// mesh much larger than Kademlia's replication factor, most nodes do not
/// hold the record, and the first peers a lookup asks answer with closer
/// peers only (libp2p-kad reports that as `FoundProviders` with an empty
/// set); a lookup that stopped there found nobody. 40 nodes on the
/// in-process memory transport with k = 3 (as 100,000 nodes with k = 20
/// look to one lookup), joining through one hub: every one of 20 lookups
/// from different nodes must find the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_lookups_find_a_provider_that_most_nodes_do_not_hold() {
    use troop_node::network::{self, NetConfig};
    use troop_protocol::advert::model_key;
    const NODES: u64 = 40;
    let base: u64 = 70_000_000 + u64::from(rand::random::<u16>()) * 1_000;
    let mem = |i: u64| -> libp2p::Multiaddr {
        format!("/memory/{}", base + i)
            .parse()
            .expect("memory addr")
    };
    let node = |i: u64, bootstrap: Vec<libp2p::Multiaddr>| {
        let mut cfg = NetConfig::new(troop_protocol::identity::generate());
        cfg.listen = vec![mem(i)];
        cfg.external = vec![mem(i)];
        cfg.gossip = false;
        cfg.bootstrap = bootstrap;
        cfg.dht_replication = std::num::NonZeroUsize::new(3).expect("3 > 0");
        cfg
    };
    let (hub, _hub_ev) = network::spawn(node(0, vec![])).await.expect("hub");
    let hub_addr = network::with_p2p(mem(0), hub.peer_id);
    let mut nodes = vec![];
    for i in 1..NODES {
        let (h, ev) = network::spawn(node(i, vec![hub_addr.clone()]))
            .await
            .expect("node");
        nodes.push((h, ev));
    }
    // Every node knows a good part of the mesh.
    eventually("routing tables filled", 60, || {
        let nodes = &nodes;
        async move {
            for (h, _) in nodes {
                if h.status().await.routing_table_peers < 6 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let (worker, _wev) = network::spawn(node(NODES, vec![hub_addr.clone()]))
        .await
        .expect("worker");
    let wid = worker.peer_id;
    eventually("the worker's routing table filled", 30, || {
        let worker = &worker;
        async move { (worker.status().await.routing_table_peers >= 6).then_some(()) }
    })
    .await;
    worker.provide(model_key(MODEL)).await;
    eventually("the provider record stored", 30, || {
        let probe = nodes[0].0.clone();
        async move {
            probe
                .find_providers(model_key(MODEL))
                .await
                .contains(&wid)
                .then_some(())
        }
    })
    .await;
    let mut missed = Vec::new();
    for (h, _) in nodes.iter().skip(1).step_by(2).take(20) {
        if !h.find_providers(model_key(MODEL)).await.contains(&wid) {
            missed.push(h.peer_id);
        }
    }
    assert!(
        missed.is_empty(),
        "{} of 20 lookups found no provider",
        missed.len()
    );
}

/// Gossipsub keeps a stream open to every peer that speaks it, so without
/// a limit a node stays connected to every peer that ever reached it (a
/// hub to the whole mesh). Above `peers_high` the oldest idle connections
/// close, down to `peers_low`; a peer kept warm and a peer with a stream in
/// use (`busy`) stay connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_closes_idle_connections_above_its_peer_limit_but_keeps_warm_and_busy_peers() {
    use troop_node::network::{self, NetConfig};
    const NODES: u64 = 30;
    let base: u64 = 80_000_000 + u64::from(rand::random::<u16>()) * 1_000;
    let mem = |i: u64| -> libp2p::Multiaddr {
        format!("/memory/{}", base + i)
            .parse()
            .expect("memory addr")
    };
    let mut hub_cfg = NetConfig::new(troop_protocol::identity::generate());
    hub_cfg.listen = vec![mem(0)];
    hub_cfg.external = vec![mem(0)];
    hub_cfg.peers_high = 10;
    hub_cfg.peers_low = 6;
    hub_cfg.peers_grace = Duration::from_secs(1);
    let (hub, _hub_ev) = network::spawn(hub_cfg).await.expect("hub");
    let hub_addr = network::with_p2p(mem(0), hub.peer_id);
    // The first two nodes to join are kept warm and busy before they
    // join: they are the oldest connections, the first a trim would close.
    let keys: Vec<_> = (1..NODES)
        .map(|_| troop_protocol::identity::generate())
        .collect();
    hub.keep_warm(keys[0].public().to_peer_id(), true);
    let _busy = hub.busy(keys[1].public().to_peer_id());
    let mut nodes = vec![];
    for (i, key) in (1..NODES).zip(keys) {
        let mut cfg = NetConfig::new(key);
        cfg.listen = vec![mem(i)];
        cfg.external = vec![mem(i)];
        cfg.bootstrap = vec![hub_addr.clone()];
        // Only the hub trims.
        cfg.peers_high = 1_000;
        nodes.push(network::spawn(cfg).await.expect("node"));
    }
    let (warm, busy) = (nodes[0].0.peer_id, nodes[1].0.peer_id);
    let connected = |h: &network::NetworkHandle| {
        let h = h.clone();
        async move { h.status().await.connected_peers }
    };
    // Everyone joined through the hub: it was connected to most of them.
    let most = eventually("the hub connected to most nodes", 60, || {
        let c = connected(&hub);
        async move {
            let n = c.await.len();
            (n > 20).then_some(n)
        }
    })
    .await;
    let after = eventually("the hub down to its peer limit", 60, || {
        let c = connected(&hub);
        async move {
            let peers = c.await;
            (peers.len() <= 10).then_some(peers)
        }
    })
    .await;
    assert!(
        after.contains(&warm.to_string()) && after.contains(&busy.to_string()),
        "the warm and the busy peer stay connected (hub went from {most} to {} peers: {after:?})",
        after.len()
    );
}

/// Sends `n` streamed chats at once and returns each one's time, slowest
/// last, after checking every answer is whole.
async fn burst(net: &TestNet, n: usize, want: &str) -> Vec<Duration> {
    let answers = futures::future::join_all((0..n).map(|_| async {
        let t0 = std::time::Instant::now();
        let r = net.chat(true).await;
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        (status, body, t0.elapsed())
    }))
    .await;
    let mut times = Vec::new();
    for (status, body, took) in answers {
        assert_eq!(status, 200, "{body}");
        assert_eq!(chat_text(&sse_data(&body)), want);
        times.push(took);
    }
    times.sort();
    times
}

/// Attempts the gateway retried on another worker or again.
fn skipped(net: &TestNet) -> u64 {
    net.gateway
        .as_ref()
        .expect("gateway")
        .state
        .skipped
        .load(Ordering::SeqCst)
}

/// The slowest of a burst within five times the median (a median under
/// 100 ms counts as 100 ms: on a loaded machine scheduling alone spreads
/// short answers that much). A request retried after the gateway's pause
/// (1 s) is past it.
fn no_long_tail(times: &[Duration]) {
    let median = times[times.len() / 2];
    let slowest = times[times.len() - 1];
    assert!(
        slowest <= 5 * median.max(Duration::from_millis(100)),
        "slowest {slowest:?} against a median of {median:?}"
    );
}

/// A burst of 50 streamed answers through one gateway to one worker with
/// no session open: the worker takes every stream the gateway opens (none
/// lost in libp2p-stream's accept queue, none reset while waiting for a
/// ticket check), refuses none, and the gateway retries none; the requests
/// share one session (one ticket bought at a time per worker), every
/// answer is whole and the slowest is not far behind the median.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_fifty_streams_with_no_session_open_is_served_without_resets() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(20), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net
        .add_worker(&fake.url, |c| c.session_idle = Duration::from_secs(120))
        .await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let times = burst(&net, 50, &tokens(20).concat()).await;
    assert_eq!(fake.state.requests.load(Ordering::SeqCst), 50);
    let skipped = skipped(&net);
    let worker = net.workers.remove(w);
    let stats = &worker.stats;
    // A stream lost before the worker took it is invisible to the worker:
    // the gateway's retry of it counts as skipped.
    assert_eq!(
        (
            stats.streams_reset.load(Ordering::SeqCst),
            stats.requests_refused.load(Ordering::SeqCst),
            skipped
        ),
        (0, 0, 0),
        "(streams reset, requests refused by the worker; attempts the gateway retried)"
    );
    no_long_tail(&times);
    let report = worker.stop(Duration::from_secs(5)).await;
    assert_eq!(report.sessions_filed, 1, "sessions for one burst");
}

/// 200 streamed answers at once over four workers that can run 64 jobs
/// each: the gateway spreads them by free slots as it chooses (a request
/// counts on its worker from the moment it is chosen), so no worker is
/// sent more than it can run, none refuses (busy), none is retried, and
/// each serves its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_over_four_workers_spread_by_free_slots() {
    // Paced answers (20 tokens, 10 ms apart) so that the burst's jobs run
    // at the same time: sent all to one worker, 136 would be refused busy.
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(20), Duration::from_millis(10)).await;
    let mut net = TestNet::start(|_| {}).await;
    for _ in 0..4 {
        net.add_worker(&fake.url, |c| c.session_idle = Duration::from_secs(120))
            .await;
    }
    net.add_gateway().await;
    net.wait_for_workers(4).await;
    let times = burst(&net, 200, &tokens(20).concat()).await;
    assert_eq!(fake.state.requests.load(Ordering::SeqCst), 200);
    let skipped = skipped(&net);
    let per_worker: Vec<(u64, u64, u64)> = net
        .workers
        .iter()
        .map(|w| {
            (
                w.stats.jobs_done.load(Ordering::SeqCst),
                w.stats.streams_reset.load(Ordering::SeqCst),
                w.stats.requests_refused.load(Ordering::SeqCst),
            )
        })
        .collect();
    assert_eq!(
        skipped, 0,
        "attempts retried; per worker (served, reset, refused): {per_worker:?}"
    );
    assert_eq!(
        per_worker.iter().map(|w| w.0).sum::<u64>(),
        200,
        "{per_worker:?}"
    );
    for (taken, reset, refused) in &per_worker {
        assert_eq!((*reset, *refused), (0, 0), "{per_worker:?}");
        assert!(
            *taken >= 25 && *taken <= 64,
            "an uneven spread: {per_worker:?}"
        );
    }
    no_long_tail(&times);
}

/// Twenty streams at once to each of three workers the gateway has never
/// been connected to (it learned of them by gossip through a third node;
/// each listens on TCP and QUIC): one dial per worker, the streams wait for
/// it, and the requests that arrive together with a new session's ticket
/// share that session (before, one of them could find the ticket "already
/// used" and be refused). Every answer is whole, none retried or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_streams_at_once_to_each_worker_never_met_all_succeed() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(5), Duration::from_millis(5)).await;
    let mut net = TestNet::start(|_| {}).await;
    net.dht = false;
    net.add_hub().await;
    let both: Vec<libp2p::Multiaddr> = vec![
        "/ip4/127.0.0.1/tcp/0".parse().expect("tcp"),
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("quic"),
    ];
    for _ in 0..3 {
        let listen = both.clone();
        net.add_worker(&fake.url, move |c| {
            c.session_idle = Duration::from_secs(120);
            c.net.listen = listen;
        })
        .await;
    }
    net.add_gateway_with(move |c| c.net.listen = both).await;
    net.wait_for_workers(3).await;
    let g = net.gateway.as_ref().expect("gateway");
    for w in &net.workers {
        assert_eq!(
            g.state.net.path(&w.peer_id),
            troop_node::network::Path::None,
            "the gateway must not be connected to a worker before the burst"
        );
    }
    burst(&net, 60, &tokens(5).concat()).await;
    assert_eq!(fake.state.requests.load(Ordering::SeqCst), 60);
    let refused: Vec<u64> = net
        .workers
        .iter()
        .map(|w| w.stats.requests_refused.load(Ordering::SeqCst))
        .collect();
    assert_eq!(refused, vec![0, 0, 0], "requests refused per worker");
    assert_eq!(skipped(&net), 0, "no attempt retried");
}
