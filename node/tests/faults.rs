//! Faults in the stream path, on a real loopback mesh: upstreams that stall
//! before or after their first token, and workers that die.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use common::{
    Dialect, FakeUpstream, MODEL, Mode, TestNet, chat_text, eventually, is_unauthorized,
    open_infer_stream, send_ticket, sse_data, tokens,
};
use serde_json::Value;
use troop_coordinator::tickets::TicketKeys;
use troop_node::answer::StreamTimeouts;

fn quick() -> StreamTimeouts {
    StreamTimeouts {
        first_token: Duration::from_secs(1),
        between_chunks: Duration::from_secs(1),
        total: Duration::from_secs(60),
    }
}

/// An upstream that sends one token and then nothing: the worker gives up
/// after the between-chunk limit, drops the upstream request (so the model
/// stops), frees its job slot, and the app gets an error event that says
/// why, instead of waiting for the 300 s total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_after_the_first_token_ends_with_an_error_event_and_frees_the_slot() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(8), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net.add_worker(&fake.url, |c| c.timeouts = quick()).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    fake.set_mode(Mode::StallAfterFirst);
    let resp = net.chat(true).await;
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(20), resp.text())
        .await
        .expect("the answer ends within seconds")
        .expect("body");
    let events = sse_data(&body);
    assert_eq!(chat_text(&events), "tok0 ", "{body}");
    let last: Value = serde_json::from_str(events.last().expect("an event")).expect("json");
    let message = last["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("sent nothing for 1 s"), "{last}");
    // The upstream request was dropped and the worker's slot is free.
    eventually("the upstream request dropped", 10, || {
        let dropped = fake.state.dropped.load(Ordering::SeqCst);
        async move { (dropped >= 1).then_some(()) }
    })
    .await;
    let stats = net.workers[w].stats.clone();
    eventually("the job slot freed", 10, || {
        let active = stats.active_jobs.load(Ordering::SeqCst);
        async move { (active == 0).then_some(()) }
    })
    .await;
    // The worker serves the next request as usual.
    fake.set_mode(Mode::Normal);
    let resp = net.chat(true).await;
    let events = sse_data(&resp.text().await.expect("body"));
    assert_eq!(chat_text(&events), tokens(8).concat());
}

/// A worker whose model never sends a first token is given up after the
/// first-token limit, and the request goes to another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_before_the_first_token_moves_the_request_to_another_worker() {
    let stalled = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let good = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let a = net.add_worker(&stalled.url, |c| c.timeouts = quick()).await;
    let b = net.add_worker(&good.url, |c| c.timeouts = quick()).await;
    stalled.set_mode(Mode::StallBeforeFirst);
    net.add_gateway().await;
    net.wait_for_workers(2).await;
    // Make the stalled worker the gateway's first choice.
    let gw = net.gateway.as_ref().expect("gateway");
    gw.state
        .table
        .write()
        .expect("table")
        .add_inflight(&net.workers[b].peer_id, 10);
    let _ = a;
    let resp = net.chat(true).await;
    assert_eq!(resp.status(), 200);
    let events = sse_data(&resp.text().await.expect("body"));
    assert_eq!(chat_text(&events), tokens(4).concat());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(stalled.state.requests.load(Ordering::SeqCst) >= 1);
    eventually("the stalled upstream request dropped", 10, || {
        let dropped = stalled.state.dropped.load(Ordering::SeqCst);
        async move { (dropped >= 1).then_some(()) }
    })
    .await;
}

/// A worker that died leaves `/v1/models` once a dial to it fails, the app
/// gets 503 instead of retry rounds against a worker that is gone, and no
/// credits are reserved for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_dropped_from_the_model_list_after_a_failed_dial() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let models = format!("{}/v1/models", net.gateway_url());
    let listed = |v: &Value| {
        v["data"]
            .as_array()
            .is_some_and(|d| d.iter().any(|m| m["id"] == MODEL))
    };
    let v: Value = net
        .http
        .get(&models)
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert!(listed(&v), "{v}");
    net.workers[w].kill();
    let t0 = std::time::Instant::now();
    let resp = net.chat(false).await;
    let took = t0.elapsed();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json error");
    let message = body["error"]["message"].as_str().unwrap_or("").to_string();
    eprintln!(
        "only worker killed -> app error in {} ms: {message}",
        took.as_millis()
    );
    // One sentence a person can act on; libp2p's details stay in the log.
    assert!(message.contains("could not be reached"), "{message}");
    assert!(
        !message.contains("io error") && !message.contains("stream"),
        "{message}"
    );
    // The stream is opened before a ticket is bought: the dead worker cost
    // the user no reservation.
    let pending = net
        .balance(&net.gateway_peer())
        .await
        .map(|b| b["pending"].clone());
    assert!(
        pending.is_none() || pending == Some(Value::from(0.0)),
        "a reservation was made for a dead worker: {pending:?}"
    );
    let v: Value = net
        .http
        .get(&models)
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert!(!listed(&v), "the dead worker is still listed: {v}");
    let resp = net.chat(false).await;
    assert!(
        resp.status() == 404 || resp.status() == 503,
        "{}",
        resp.status()
    );
}

/// The coordinator's requests to `route` so far, from its `/metrics`.
async fn route_requests(net: &TestNet, route: &str) -> f64 {
    let text = net
        .http
        .get(format!("{}/metrics", net.coordinator_url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let label = format!("route=\"{route}\"");
    text.lines()
        .filter(|l| l.starts_with("troop_http_requests_total") && l.contains(&label))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// The coordinator's `/public-key` requests so far.
async fn key_fetches(net: &TestNet) -> f64 {
    route_requests(net, "/public-key").await
}

/// Tickets naming a key the worker does not know make it fetch the
/// coordinator's key once, not once each: 12 at once (under the 16 streams
/// a peer may hold before its tickets are checked) cost one fetch, all are
/// refused, and a good ticket is served right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_ids_cost_one_key_fetch_and_are_refused() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let worker = net.workers[w].peer_id;
    // One request first, so the gateway holds its connection to the worker
    // (12 first-contact dials at once would race the 4-per-peer cap).
    let resp = net.chat(false).await;
    assert_eq!(resp.status(), 200);
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let before = key_fetches(&net).await;
    let frames = futures::future::join_all((0..12).map(|i| {
        let head = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": format!("unknown-{i}")});
        let claims =
            serde_json::json!({"sub": "x", "aud": worker.to_base58(), "exp": u64::MAX / 2});
        let token = format!("{}.{}.c2ln", b64(&head), b64(&claims));
        let net = &net;
        async move { send_ticket(net, worker, token).await }
    }))
    .await;
    assert!(frames.iter().all(is_unauthorized), "{frames:?}");
    let after = key_fetches(&net).await;
    assert_eq!(after - before, 1.0, "one key fetch for 12 unknown kids");
    let resp = net.chat(true).await;
    let events = sse_data(&resp.text().await.expect("body"));
    assert_eq!(chat_text(&events), tokens(4).concat());
}

/// A key rotation reaches workers that are already running: the
/// coordinator restarts signing with a new key (the old one listed as
/// previous), a gateway buys its tickets under the new kid, and the worker,
/// which only knew the old key, fetches the JWKS once and serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_coordinator_key_reaches_a_running_worker_through_the_jwks() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let (old, new) = (keys.path().join("old.pem"), keys.path().join("new.pem"));
    let old_kid = TicketKeys::generate_to(&old).expect("keygen");
    let new_kid = TicketKeys::generate_to(&new).expect("keygen");
    assert_ne!(old_kid, new_kid);
    let rotated = Arc::new(AtomicBool::new(false));
    let flag = rotated.clone();
    let mut net = TestNet::start(move |c| {
        if flag.load(Ordering::SeqCst) {
            c.key_file = Some(new.clone());
            c.previous_key_files = vec![old.clone()];
        } else {
            c.key_file = Some(old.clone());
        }
    })
    .await;
    net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let answer = |resp: reqwest::Response| async move {
        assert_eq!(resp.status(), 200);
        chat_text(&sse_data(&resp.text().await.expect("body")))
    };
    assert_eq!(answer(net.chat(true).await).await, tokens(4).concat());
    let kid = |net: &TestNet| {
        let (http, url) = (net.http.clone(), net.coordinator_url());
        async move {
            let v: Value = http
                .get(format!("{url}/public-key"))
                .send()
                .await
                .expect("public key")
                .json()
                .await
                .expect("json");
            v["kid"].as_str().unwrap_or_default().to_string()
        }
    };
    assert_eq!(kid(&net).await, old_kid);

    // The rotation: the coordinator now signs with the new key.
    rotated.store(true, Ordering::SeqCst);
    net.restart_coordinator().await;
    assert_eq!(kid(&net).await, new_kid);
    // A fresh gateway holds no session yet, so its tickets name the new kid.
    if let Some(mut g) = net.gateway.take() {
        g.kill();
    }
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let (jwks, public) = (
        route_requests(&net, "/.well-known/jwks.json").await,
        key_fetches(&net).await,
    );
    for _ in 0..3 {
        assert_eq!(answer(net.chat(true).await).await, tokens(4).concat());
    }
    assert_eq!(
        route_requests(&net, "/.well-known/jwks.json").await - jwks,
        1.0,
        "the worker fetched the JWKS once"
    );
    assert_eq!(
        key_fetches(&net).await,
        public,
        "the JWKS named the kid, so /public-key was not needed"
    );
}

/// A peer that opens streams and sends nothing holds at most 16 of them
/// open before its ticket is checked; more wait their turn and are reset
/// when none comes within 2 s, and a good request from another node is
/// still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_waiting_for_a_ticket_are_bounded_per_peer() {
    use futures::AsyncReadExt;
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let w = net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let worker = net.workers[w].peer_id;
    let mut buf = [0u8; 16];
    // libp2p-stream hands a protocol's incoming streams over through a
    // channel with one slot and drops a stream that finds it full: on a
    // loaded machine a burst can lose one before the worker sees it. Keep
    // opening until 16 streams are confirmed still open.
    let mut held = Vec::new();
    let mut opened = 0;
    while held.len() < 16 {
        opened += 1;
        assert!(opened <= 64, "could not hold 16 streams open");
        let mut st = open_infer_stream(&net, worker).await.expect("stream");
        if tokio::time::timeout(Duration::from_millis(200), st.read(&mut buf))
            .await
            .is_err()
        {
            held.push(st);
        }
    }
    // The 17th waits for a turn that never comes and is reset.
    let mut extra = open_infer_stream(&net, worker).await.expect("stream");
    let read = tokio::time::timeout(Duration::from_secs(10), extra.read(&mut buf))
        .await
        .expect("the surplus stream is closed, not left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The 16 held ones are still open (nothing read yet).
    let mut first = held.remove(0);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), first.read(&mut buf))
            .await
            .is_err(),
        "a held stream was closed early"
    );
    drop(held);
    drop(first);
    // Once they are gone, requests are served.
    let resp = net.chat(true).await;
    let events = sse_data(&resp.text().await.expect("body"));
    assert_eq!(chat_text(&events), tokens(4).concat());
}

/// A worker whose breaker opened gets one trial after the cool-down; a
/// trial that ends in a final answer that is not the worker's fault (the
/// app's own 400 from the model) gives the trial back, so the next request
/// is served instead of the worker being skipped until the gateway restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_breaker_trial_ended_by_a_final_answer_is_given_back() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway_with(|g| g.breaker_cooldown = Duration::from_millis(500))
        .await;
    net.wait_for_workers(1).await;
    let url = format!("{}/v1/chat/completions", net.gateway_url());
    let ask = |prompt: &str| {
        net.http
            .post(&url)
            .json(&serde_json::json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
            }))
            .send()
    };
    // Five failures open the breaker (each request tries the worker in up
    // to four rounds).
    fake.set_mode(Mode::FailBeforeFirst);
    let mut failed = 0;
    while fake.state.requests.load(Ordering::SeqCst) < 5 {
        let r = ask("hello").await.expect("POST");
        assert_ne!(r.status(), 200);
        failed += 1;
        assert!(failed < 5, "the worker was never tried");
    }
    fake.set_mode(Mode::Normal);
    // The half-open trial: the model refuses the prompt (a 400 that passes
    // through to the app, final).
    let r = ask("[overflow]").await.expect("POST");
    assert_eq!(r.status(), 400, "{:?}", r.text().await);
    // The next request gets the worker again.
    let r = ask("hello").await.expect("POST");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
}

/// A worker whose status address is taken (two workers on one machine
/// without `--http`) exits before it registers: the coordinator never
/// lists it as alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_status_port_is_taken_exits_before_registering() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let net = TestNet::start(|_| {}).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let key = troop_protocol::identity::generate();
    let peer = key.public().to_peer_id().to_base58();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = troop_node::worker::WorkerConfig::new(
        key,
        &net.coordinator_url(),
        &fake.url,
        dir.path().to_path_buf(),
    );
    cfg.net.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    cfg.http = Some(taken.local_addr().expect("addr"));
    let err = match troop_node::worker::start(cfg).await {
        Ok(_) => panic!("the worker started on a taken status address"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("--http"), "{err}");
    let workers: Value = net
        .http
        .get(format!("{}/workers", net.coordinator_url()))
        .send()
        .await
        .expect("GET /workers")
        .json()
        .await
        .expect("json");
    assert!(
        !workers.to_string().contains(&peer),
        "the worker registered before failing: {workers}"
    );
}

/// A worker stopped with SIGTERM (systemd, docker stop) tells the
/// coordinator it is leaving: it is gone from `/bootstrap` and listed as not
/// alive at once (was: alive until its TTL), the session it served is closed
/// and its receipt settled before the process exits, and the log says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_leaves_at_once_and_settles_what_it_served() {
    // Tokens 20 ms apart: the session costs more than 0 (one that costs 0
    // is refunded and pays the worker nothing).
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::from_millis(20)).await;
    let mut net = TestNet::start(|_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("worker.log");
    let (mut child, peer, addrs) = worker_process(&net, &fake.url, dir.path()).await;
    let bootstrap = format!("{}/bootstrap", net.coordinator_url());
    let listed = |v: &Value, peer: &str| v.to_string().contains(peer);
    let http = net.http.clone();
    net.add_gateway_with(|c| c.net.bootstrap = addrs).await;
    net.wait_for_workers(1).await;
    let resp = net.chat(true).await;
    assert_eq!(resp.status(), 200);
    let _ = resp.text().await;
    let credited = |v: Option<Value>| v.and_then(|b| b["credited"].as_f64()).unwrap_or(0.0);
    assert_eq!(
        credited(net.balance(&peer).await),
        0.0,
        "settled before the stop"
    );

    let t0 = std::time::Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(killed.success());
    eventually("the worker to leave /bootstrap", 10, || {
        let (http, url, peer) = (http.clone(), bootstrap.clone(), peer.clone());
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            (!listed(&v, &peer)).then_some(())
        }
    })
    .await;
    eprintln!(
        "SIGTERM to gone from /bootstrap: {} ms",
        t0.elapsed().as_millis()
    );
    let status = eventually("the worker to exit", 30, || {
        let status = child.0.try_wait().ok().flatten();
        async move { status }
    })
    .await;
    assert!(status.success(), "exit status {status}");
    let workers: Value = http
        .get(format!("{}/workers", net.coordinator_url()))
        .send()
        .await
        .expect("GET /workers")
        .json()
        .await
        .expect("json");
    let me = workers["workers"]
        .as_array()
        .and_then(|a| a.iter().find(|w| w["peer_id"] == peer.as_str()))
        .cloned()
        .expect("still listed in /workers");
    assert_eq!(me["alive"], false, "{me}");
    assert!(
        credited(net.balance(&peer).await) > 0.0,
        "the session's receipt was not settled at the stop"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("worker stopped"), "{text}");
}

/// Starts `troop worker` (the binary) for `upstream` with its log in
/// `dir/worker.log`; returns it once the coordinator's `/bootstrap` lists
/// it, with its PeerId and addresses.
async fn worker_process(
    net: &TestNet,
    upstream: &str,
    dir: &std::path::Path,
) -> (common::KillOnDrop, String, Vec<libp2p::Multiaddr>) {
    worker_process_with(net, upstream, dir, "/ip4/127.0.0.1/tcp/0", 600).await
}

/// [`worker_process`] listening on `listen`, closing sessions idle for
/// `idle_secs`; a second start in the same `dir` is the same worker
/// (identity, state folder) restarted, its log appended to.
async fn worker_process_with(
    net: &TestNet,
    upstream: &str,
    dir: &std::path::Path,
    listen: &str,
    idle_secs: u64,
) -> (common::KillOnDrop, String, Vec<libp2p::Multiaddr>) {
    let key = dir.join("worker.key");
    let peer_file = dir.join("worker.peer");
    if !key.exists() {
        let kg = std::process::Command::new(env!("CARGO_BIN_EXE_troop"))
            .args(["keygen", "--out"])
            .arg(&key)
            .output()
            .expect("keygen");
        assert!(kg.status.success());
        std::fs::write(&peer_file, String::from_utf8_lossy(&kg.stdout).trim()).expect("peer");
    }
    let peer = std::fs::read_to_string(&peer_file).expect("peer id");
    let log = dir.join("worker.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_troop"))
        .args(["worker", "--identity"])
        .arg(&key)
        .args([
            "--coordinator",
            &net.coordinator_url(),
            "--upstream",
            upstream,
            "--http",
            "127.0.0.1:0",
            "--listen",
            listen,
            "--session-idle-secs",
            &idle_secs.to_string(),
        ])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("log file"),
        )
        .spawn()
        .expect("troop worker runs");
    let child = common::KillOnDrop(child);
    let bootstrap = format!("{}/bootstrap", net.coordinator_url());
    let http = net.http.clone();
    let addrs: Vec<libp2p::Multiaddr> = eventually("the worker in /bootstrap", 30, || {
        let (http, url, peer) = (http.clone(), bootstrap.clone(), peer.clone());
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let me = v["peers"]
                .as_array()?
                .iter()
                .find(|p| p["peer_id"] == peer.as_str())?;
            let addrs = me["addresses"].as_array()?;
            Some(
                addrs
                    .iter()
                    .filter_map(|a| a.as_str()?.parse().ok())
                    .collect(),
            )
        }
    })
    .await;
    (child, peer, addrs)
}

/// The only worker's process killed outright (SIGKILL: no leave call): the
/// app's next request gets a 503 in one sentence, soon (the figure is
/// printed; was 6-11 s with a raw libp2p dial dump).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_worker_process_killed_gives_the_app_one_plain_sentence() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, _peer, addrs) = worker_process(&net, &fake.url, dir.path()).await;
    net.add_gateway_with(|c| c.net.bootstrap = addrs).await;
    net.wait_for_workers(1).await;
    assert_eq!(net.chat(false).await.status(), 200);
    child.0.kill().expect("SIGKILL");
    let _ = child.0.wait();
    let t0 = std::time::Instant::now();
    let resp = net.chat(false).await;
    let took = t0.elapsed();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json error");
    let message = body["error"]["message"].as_str().unwrap_or("").to_string();
    eprintln!(
        "only worker process killed -> app error in {} ms: {message}",
        took.as_millis()
    );
    assert!(message.contains("could not be reached"), "{message}");
    assert!(
        !message.contains("io error") && !message.contains("Transport"),
        "{message}"
    );
}

/// A worker started before its model server (systemd boot order) waits for
/// it instead of exiting: while the server answers 503 ("Loading model",
/// as llama.cpp does) the worker keeps trying and its status address says
/// "waiting for upstream"; once it answers, the worker starts, registers
/// and serves. When the server goes away for longer than
/// --upstream-gone-secs, the worker's adverts are withdrawn (coordinator
/// and gateway stop listing it); when it is back, it is listed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_model_server_waits_for_it_then_serves() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    // The model server as it boots: 503 while `down`, then itself.
    let down = Arc::new(AtomicBool::new(true));
    let tries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let booting = common::restartable_upstream(fake.url.clone(), down.clone(), tries.clone()).await;
    let mut net = TestNet::start(|_| {}).await;
    let status_addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .expect("addr");
    let starting = tokio::spawn(troop_node::worker::start(net.worker_config(
        &booting,
        |c| {
            c.http = Some(status_addr);
            c.upstream_gone_after = Duration::from_secs(1);
        },
    )));
    // Three rounds of probes (each asks Ollama's and OpenAI's listing):
    // a worker that gave up at the first would have stopped asking.
    eventually("the worker keeps asking the booting server", 30, || {
        let t = tries.clone();
        async move { (t.load(Ordering::SeqCst) >= 6).then_some(()) }
    })
    .await;
    assert!(!starting.is_finished(), "the worker did not wait");
    // Its status address says so meanwhile (what `troop doctor` reads).
    let status_url = format!("http://{status_addr}/troop/status");
    let st = common::get_json(&net.http, &status_url)
        .await
        .expect("the status address answers while waiting");
    assert_eq!(st["state"], "waiting for upstream", "{st}");
    assert_eq!(st["upstream"]["state"], "waiting", "{st}");
    assert!(st["upstream"]["tries"].as_u64().unwrap_or(0) >= 1, "{st}");
    down.store(false, Ordering::SeqCst);
    let w = tokio::time::timeout(Duration::from_secs(60), starting)
        .await
        .expect("the worker starts once its server answers")
        .expect("join")
        .expect("worker starts");
    net.workers.push(w);
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", net.gateway_url()))
        .json(&serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status().as_u16(), 200);
    let st = common::get_json(&net.http, &status_url)
        .await
        .expect("the status page");
    assert_eq!(st["upstream"]["state"], "up", "{st}");

    // The model server goes away: past --upstream-gone-secs (1 s here) the
    // worker withdraws its adverts, so the coordinator and the gateway
    // stop listing it for the model; back, it advertises again by itself.
    let listed = |want: bool| {
        let (http, coordinator, gateway) =
            (net.http.clone(), net.coordinator_url(), net.gateway_url());
        async move {
            let boot =
                common::get_json(&http, &format!("{coordinator}/bootstrap?model={MODEL}")).await?;
            let at_coordinator = !boot["peers"].as_array()?.is_empty();
            let models = common::get_json(&http, &format!("{gateway}/v1/models")).await?;
            let at_gateway = models["data"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == MODEL && m["workers"].as_u64().unwrap_or(0) > 0);
            (at_coordinator == want && at_gateway == want).then_some(())
        }
    };
    down.store(true, Ordering::SeqCst);
    eventually(
        "the worker withdrawn while its model server is gone",
        30,
        || listed(false),
    )
    .await;
    let st = common::get_json(&net.http, &status_url)
        .await
        .expect("the status page");
    assert_eq!(st["upstream"]["state"], "withdrawn", "{st}");
    down.store(false, Ordering::SeqCst);
    eventually(
        "the worker listed again once its server is back",
        30,
        || listed(true),
    )
    .await;
}

/// A worker killed with SIGKILL while its session is open (nothing filed
/// yet) files the receipt it owes once restarted, from its session
/// journal: the request served before the crash is billed, with the
/// user's acknowledgement, once; the session's ticket is not served twice,
/// and the user's next request after the restart is billed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_session_files_the_owed_receipt_after_its_restart() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::from_millis(20)).await;
    let mut net = TestNet::start(|_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("/ip4/127.0.0.1/tcp/{}", common::free_port());
    // Sessions stay open (600 s idle): only the crash interrupts this one.
    let (mut child, peer, addrs) =
        worker_process_with(&net, &fake.url, dir.path(), &listen, 600).await;
    net.add_gateway_with(|c| c.net.bootstrap = addrs).await;
    net.wait_for_workers(1).await;
    let resp = net.chat(true).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.expect("body").contains("[DONE]"));
    // The user's ack reaches the worker's journal (on disk).
    let sessions = dir.path().join(format!("worker-{peer}")).join("sessions");
    eventually("the ack in the worker's journal", 20, || {
        let sessions = sessions.clone();
        async move {
            let files = std::fs::read_dir(&sessions).ok()?;
            files
                .filter_map(Result::ok)
                .filter_map(|f| std::fs::read_to_string(f.path()).ok())
                .any(|t| t.contains(r#""e":"line""#) && t.contains(r#""e":"ack""#))
                .then_some(())
        }
    })
    .await;
    child.0.kill().expect("SIGKILL");
    let _ = child.0.wait();
    let credited = |v: Option<Value>| v.and_then(|b| b["credited"].as_f64()).unwrap_or(0.0);
    assert_eq!(
        credited(net.balance(&peer).await),
        0.0,
        "nothing was filed before the crash"
    );

    // Restarted (same identity, state and address), closing idle sessions
    // after 1 s: the session read back from the journal closes and files.
    let (_child, _, _) = worker_process_with(&net, &fake.url, dir.path(), &listen, 1).await;
    let (http, url, me) = (
        net.http.clone(),
        format!("{}/workers", net.coordinator_url()),
        peer.clone(),
    );
    let requests = move || {
        let (http, url, me) = (http.clone(), url.clone(), me.clone());
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let w = v["workers"]
                .as_array()?
                .iter()
                .find(|w| w["peer_id"] == me.as_str())?
                .clone();
            let r = &w["reputation"];
            Some((r["requests"].as_u64()?, r["acknowledged_share"].as_f64()?))
        }
    };
    let first = eventually("the owed receipt settled after the restart", 30, || {
        let requests = requests.clone();
        async move { requests().await.filter(|(n, _)| *n >= 1) }
    })
    .await;
    assert_eq!(
        first,
        (1, 1.0),
        "the request served before the crash, acknowledged"
    );
    assert!(
        credited(net.balance(&peer).await) > 0.0,
        "the worker was paid"
    );
    let log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    assert!(log.contains("read back from the journal"), "{log}");

    // The user goes on: the next request is served and billed on its own.
    let resp = net.chat(true).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.expect("body").contains("[DONE]"));
    let second = eventually("the next session settled", 30, || {
        let requests = requests.clone();
        async move { requests().await.filter(|(n, _)| *n >= 2) }
    })
    .await;
    assert_eq!(second.0, 2, "each request billed once");
}

/// A worker started while its coordinator is down (boot order, or the
/// coordinator restarting) waits for it instead of exiting after a few
/// tries: its status address says "waiting for coordinator" with the
/// tries so far; once the coordinator is back, the worker registers and
/// serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_its_coordinator_is_down_waits_for_it_then_serves() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    net.stop_coordinator().await;
    let status_addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .expect("addr");
    let starting = tokio::spawn(troop_node::worker::start(
        net.worker_config(&fake.url, |c| c.http = Some(status_addr)),
    ));
    let status_url = format!("http://{status_addr}/troop/status");
    let http = net.http.clone();
    // Past the old limit of 3 tries (1 + 2 + 4 s).
    let st = eventually("the worker waiting for its coordinator", 40, || {
        let (http, url) = (http.clone(), status_url.clone());
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            (v["waiting_for"]["coordinator"]["tries"].as_u64()? >= 4).then_some(v)
        }
    })
    .await;
    assert_eq!(st["state"], "waiting for coordinator", "{st}");
    assert_eq!(st["upstream"]["state"], "up", "{st}");
    assert!(!starting.is_finished(), "the worker gave up");
    net.restart_coordinator().await;
    let w = tokio::time::timeout(Duration::from_secs(60), starting)
        .await
        .expect("the worker starts once its coordinator answers")
        .expect("join")
        .expect("worker starts");
    net.workers.push(w);
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    assert_eq!(net.chat(false).await.status(), 200);
}
