//! Mesh figures on loopback, printed, never asserted:
//! * time to first token through the mesh minus straight from the same
//!   upstream (p50, p99);
//! * the same two next to nginx as a reverse proxy (when nginx is
//!   installed), and chunks per second over 50 concurrent streams;
//! * chunks per second relayed on one stream from a fast fake upstream;
//! * peak memory of one worker process holding 1,000 concurrent streams;
//! * time for a newly started gateway to find a model's worker among 50 nodes;
//! * bursts of 50 and 500 concurrent streams (2,000 events each) with no
//!   session open: aggregate events/s, median and slowest stream, beside
//!   nginx and the upstream itself.
//!
//! * answers streamed while a proof of hardware (a re-proof) runs beside
//!   the worker, against the same answers idle.
//!
//! `cargo bench -p troop-node --bench mesh` (env: MESH_BENCH=ttft,chunks,burst,memory,discovery,scale,reproof
//! picks parts; TTFT_RUNS, CHUNKS, CONCURRENT, BURST_EVENTS, STREAMS, NODES,
//! REPROOF_N, REPROOF_ROUNDS, REPROOF_BACKEND).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Dialect, FakeUpstream, MODEL, TestNet, tokens};
use futures::StreamExt;
use libp2p::StreamProtocol;
use serde_json::json;
use troop_node::coordinator_client::CoordinatorClient;
use troop_node::frames_io::{read_frame, write_frame};
use troop_node::network::{self, NetConfig};
use troop_protocol::advert::model_key;
use troop_protocol::frames::{Endpoint, FRAME_VERSION, Frame, INFER_PROTOCOL, InferenceRequest};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn rich(c: &mut troop_coordinator::Config) {
    c.starter_credits_milli = 1_000_000_000_000;
    c.authorize_per_hour = 10_000_000;
    c.discovery_per_hour = 10_000_000;
}

/// Sends a streaming chat request and returns the time to the first content chunk.
async fn ttft(http: &reqwest::Client, url: &str) -> f64 {
    let start = Instant::now();
    let resp = http
        .post(url)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": 4}))
        .send()
        .await
        .expect("send");
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let mut first = None;
    while let Some(Ok(b)) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&b));
        if first.is_none() && seen.contains("tok0") {
            first = Some(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    first.expect("a first token")
}

/// nginx as a reverse proxy in front of `upstream` (buffering off, as for
/// SSE), when nginx is installed: the well-known relay to compare with.
struct Nginx {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM lets the master stop its workers (KILL would orphan them).
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

async fn nginx(upstream: &str) -> Option<Nginx> {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let dir = tempfile::tempdir().ok()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .ok()?
        .port();
    let up = upstream.trim_start_matches("http://");
    let d = dir.path().display();
    let conf = format!(
        "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
           upstream up {{ server {up}; keepalive 64; }}\n\
           server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; }} }} }}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).ok()?;
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .arg("-p")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http.get(format!("{url}/v1/models")).send().await.is_ok() {
            return Some(Nginx {
                child,
                url,
                _dir: dir,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn bench_ttft(runs: usize) -> [f64; 6] {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let proxy = nginx(&fake.url).await;
    let mut net = TestNet::start(rich).await;
    net.add_worker(&fake.url, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let http = reqwest::Client::new();
    let direct_url = format!("{}/v1/chat/completions", fake.url);
    let mesh_url = format!("{}/v1/chat/completions", net.gateway_url());
    let nginx_url = proxy
        .as_ref()
        .map(|p| format!("{}/v1/chat/completions", p.url));
    for _ in 0..20 {
        ttft(&http, &direct_url).await;
        ttft(&http, &mesh_url).await;
        if let Some(u) = &nginx_url {
            ttft(&http, u).await;
        }
    }
    let (mut d, mut m, mut n) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        d.push(ttft(&http, &direct_url).await);
        m.push(ttft(&http, &mesh_url).await);
        if let Some(u) = &nginx_url {
            n.push(ttft(&http, u).await);
        }
    }
    let nx = |v: &mut Vec<f64>, p| if v.is_empty() { f64::NAN } else { pct(v, p) };
    [
        pct(&mut d, 0.5),
        pct(&mut d, 0.99),
        pct(&mut m, 0.5),
        pct(&mut m, 0.99),
        nx(&mut n, 0.5),
        nx(&mut n, 0.99),
    ]
}

/// A model server that is never the bottleneck: it streams `max_tokens`
/// pre-rendered chat chunks (one token each, llama.cpp's shape), written
/// 16 to a write, as a server under load writes what is ready.
async fn blast_upstream() -> String {
    use axum::routing::{get, post};
    async fn generate(body: axum::body::Bytes) -> axum::response::Response {
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let n = req["max_tokens"].as_u64().unwrap_or(1000) as usize;
        let usage = req
            .pointer("/stream_options/include_usage")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let one = |i: usize| {
            format!(
                "data: {{\"id\":\"chatcmpl-blast\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{MODEL}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{}\"}},\"finish_reason\":null}}]}}\n\n",
                i % 10
            )
        };
        let group: String = (0..16).map(one).collect();
        let group = axum::body::Bytes::from(group);
        let stream = async_stream::stream! {
            let mut left = n;
            while left >= 16 {
                yield Ok::<_, std::convert::Infallible>(group.clone());
                left -= 16;
            }
            let mut tail: String = (0..left).map(one).collect();
            tail.push_str(&format!("data: {{\"id\":\"chatcmpl-blast\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{MODEL}\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"length\"}}]}}\n\n"));
            if usage {
                tail.push_str(&format!("data: {{\"id\":\"chatcmpl-blast\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{MODEL}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":{n},\"total_tokens\":{}}}}}\n\n", n + 1));
            }
            tail.push_str("data: [DONE]\n\n");
            yield Ok(axum::body::Bytes::from(tail));
        };
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(axum::body::Body::from_stream(stream))
            .unwrap_or_default()
    }
    let app = axum::Router::new()
        .route(
            "/v1/models",
            get(|| async {
                axum::Json(json!({"object": "list", "data": [{"id": MODEL, "object": "model"}]}))
            }),
        )
        .route("/v1/chat/completions", post(generate));
    common::serve_app(app).await
}

/// Events per second on one stream of `n` chunks.
async fn count_events(http: reqwest::Client, url: String, n: usize) -> (usize, f64) {
    let start = Instant::now();
    let resp = http
        .post(url)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true, "max_tokens": n}))
        .send()
        .await
        .expect("send");
    let mut body = resp.bytes_stream();
    let mut events = 0usize;
    let mut last = 0u8;
    while let Some(Ok(b)) = body.next().await {
        // Count blank lines (event ends), across reads too.
        for &c in b.iter() {
            if c == b'\n' && last == b'\n' {
                events += 1;
            }
            last = c;
        }
    }
    (events, start.elapsed().as_secs_f64())
}

/// Chunks/s on one stream and over `conc` concurrent streams: straight
/// from the upstream, through nginx and through the mesh.
async fn bench_chunks(n: usize, conc: usize) -> [f64; 6] {
    let up = blast_upstream().await;
    let proxy = nginx(&up).await;
    let mut net = TestNet::start(rich).await;
    net.add_worker(&up, |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let http = reqwest::Client::new();
    let one = |base: String| {
        let http = http.clone();
        async move {
            let (ev, secs) = count_events(http, format!("{base}/v1/chat/completions"), n).await;
            ev as f64 / secs
        }
    };
    let many = |base: String| {
        let http = http.clone();
        async move {
            let start = Instant::now();
            let per = (n / conc).max(1);
            let all = futures::future::join_all((0..conc).map(|_| {
                let http = http.clone();
                let url = format!("{base}/v1/chat/completions");
                tokio::spawn(async move { count_events(http, url, per).await.0 })
            }))
            .await;
            let events: usize = all.into_iter().map(|r| r.unwrap_or(0)).sum();
            events as f64 / start.elapsed().as_secs_f64()
        }
    };
    // Warm the session and connections.
    one(net.gateway_url()).await;
    let nginx_url = proxy.as_ref().map(|p| p.url.clone());
    let t = Instant::now();
    let d1 = one(up.clone()).await;
    eprintln!(
        "[mesh bench] one stream straight: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let n1 = match &nginx_url {
        Some(u) => one(u.clone()).await,
        None => f64::NAN,
    };
    let m1 = one(net.gateway_url()).await;
    let dc = many(up.clone()).await;
    let nc = match &nginx_url {
        Some(u) => many(u.clone()).await,
        None => f64::NAN,
    };
    let mc = many(net.gateway_url()).await;
    eprintln!(
        "[mesh bench] chunks done after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    [d1, n1, m1, dc, nc, mc]
}

/// One burst: aggregate events/s, the median and the slowest stream (s).
#[derive(Clone, Copy)]
struct Burst {
    events_per_s: f64,
    median_s: f64,
    slowest_s: f64,
}

impl Burst {
    const NONE: Burst = Burst {
        events_per_s: f64::NAN,
        median_s: f64::NAN,
        slowest_s: f64::NAN,
    };

    fn json(&self) -> serde_json::Value {
        json!({"events_per_s": self.events_per_s, "median_s": self.median_s, "slowest_s": self.slowest_s})
    }
}

/// `conc` streams of `events` events each, all opened at once against
/// `base`, each timed on its own.
async fn burst_at(http: &reqwest::Client, base: &str, conc: usize, events: usize) -> Burst {
    let start = Instant::now();
    let all = futures::future::join_all((0..conc).map(|_| {
        let http = http.clone();
        let url = format!("{base}/v1/chat/completions");
        tokio::spawn(async move { count_events(http, url, events).await })
    }))
    .await;
    let wall = start.elapsed().as_secs_f64();
    let mut times: Vec<f64> = Vec::new();
    let mut total = 0usize;
    for (ev, secs) in all.into_iter().flatten() {
        total += ev;
        times.push(secs);
    }
    if times.is_empty() {
        return Burst::NONE;
    }
    Burst {
        events_per_s: total as f64 / wall,
        median_s: pct(&mut times, 0.5),
        slowest_s: pct(&mut times, 1.0),
    }
}

/// Issue 30's burst: `conc` concurrent streamed answers of `events` events
/// each, straight from the upstream, through nginx and through a mesh
/// gateway that has no session open yet (a fresh mesh for each burst, as
/// after the gateway sat idle past its session's end).
async fn bench_burst(conc: usize, events: usize) -> [Burst; 3] {
    let up = blast_upstream().await;
    let proxy = nginx(&up).await;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(conc)
        .build()
        .expect("client");
    let direct = burst_at(&http, &up, conc, events).await;
    let through_nginx = match &proxy {
        Some(p) => burst_at(&http, &p.url, conc, events).await,
        None => Burst::NONE,
    };
    let mut net = TestNet::start(rich).await;
    // A worker that runs the whole burst at once (the default cap is 64).
    net.add_worker(&up, |c| c.max_jobs = conc.max(64)).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let mesh = burst_at(&http, &net.gateway_url(), conc, events).await;
    [direct, through_nginx, mesh]
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// CPU time this process has used (user + system), in seconds.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th, in clock ticks (100 a second on Linux).
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn request() -> InferenceRequest {
    let body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true});
    InferenceRequest::passthrough(MODEL, Endpoint::ChatCompletions, body.to_string())
}

async fn bench_memory(streams: usize) -> (u64, u64, u64, usize) {
    // Slow tokens keep every stream open while we measure.
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(240), Duration::from_millis(500)).await;
    let net = TestNet::start(rich).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("worker.key");
    let key = troop_protocol::identity::generate();
    troop_protocol::identity::write_keypair(&key_path, &key).expect("key");
    let worker_peer = key.public().to_peer_id();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_troop"))
        .args(["worker", "--identity"])
        .arg(&key_path)
        .args([
            "--coordinator",
            &net.coordinator_url(),
            "--upstream",
            &fake.url,
            "--listen",
            &listen,
        ])
        .args(["--max-jobs", &(streams * 2).to_string()])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("worker process");
    let pid = child.id();
    let mut cfg = NetConfig::new(troop_protocol::identity::generate());
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    let (client_net, _ev) = network::spawn(cfg).await.expect("client node");
    let addr: libp2p::Multiaddr = format!("{listen}/p2p/{worker_peer}").parse().expect("addr");
    // Wait for the worker to register (it answers the coordinator first).
    let user = troop_protocol::identity::generate();
    let cc = CoordinatorClient::new(&net.coordinator_url(), user);
    let deadline = Instant::now() + Duration::from_secs(60);
    let ticket0 = loop {
        if let Ok(a) = cc.authorize(MODEL, &worker_peer.to_base58(), None).await {
            break a.ticket;
        }
        assert!(Instant::now() < deadline, "worker never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    client_net.dial(addr).await;
    let idle = rss_kib(pid);
    let mut tickets = vec![ticket0];
    while tickets.len() < streams {
        tickets.push(
            cc.authorize(MODEL, &worker_peer.to_base58(), None)
                .await
                .expect("ticket")
                .ticket,
        );
    }
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let mut handles = Vec::new();
    for t in tickets {
        let mut control = client_net.stream_control();
        let (started, failed, release) = (started.clone(), failed.clone(), release.clone());
        handles.push(tokio::spawn(async move {
            let notified = release.notified();
            // A stream the worker could not take at once (a burst of opens)
            // is opened again with the same, still unused, ticket.
            for _ in 0..5 {
                let Ok(mut s) = control
                    .open_stream(worker_peer, StreamProtocol::new(INFER_PROTOCOL))
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if write_frame(
                    &mut s,
                    &Frame::Request {
                        version: FRAME_VERSION,
                        ticket: t.clone(),
                        request: request(),
                        index: 0,
                    },
                )
                .await
                .is_err()
                {
                    continue;
                }
                match read_frame(&mut s).await {
                    Ok(Some(Frame::Raw { .. })) => {
                        started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        // Hold the stream open until the measurement is done.
                        notified.await;
                        return;
                    }
                    Ok(None) => continue,
                    other => {
                        eprintln!("[mesh bench] a stream did not start: {other:?}");
                        break;
                    }
                }
            }
            failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while started.load(std::sync::atomic::Ordering::SeqCst)
        + failed.load(std::sync::atomic::Ordering::SeqCst)
        < streams
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live = started.load(std::sync::atomic::Ordering::SeqCst);
    let (busy_rss, _) = rss_kib(pid);
    release.notify_waiters();
    for h in handles {
        let _ = h.await;
    }
    let (_, hwm) = rss_kib(pid);
    let _ = child.kill();
    let _ = child.wait();
    (idle.0, busy_rss, hwm, live)
}

/// What the simulated mesh measured.
struct Scale {
    nodes: usize,
    join_s: f64,
    reach50_ms: f64,
    reach99_ms: f64,
    reached: usize,
    lookup50_ms: f64,
    lookup99_ms: f64,
    lookups_failed: usize,
}

/// `nodes` nodes in this process on libp2p's memory transport (noise,
/// yamux, Kademlia, gossipsub, identify, ping: the real stack), joining
/// through `HUBS` bootstrap nodes as a public mesh joins through its
/// relays. Then a new worker provides a model and publishes adverts:
/// how long until 50 % and 99 % of the other nodes hold one, and how long
/// 100 DHT lookups of the model take from random nodes.
async fn bench_scale(nodes: usize) -> Scale {
    use std::sync::Mutex;
    const HUBS: usize = 8;
    let base: u64 = 40_000_000 + u64::from(rand::random::<u16>()) * 10_000;
    let mem = |i: usize| -> libp2p::Multiaddr {
        format!("/memory/{}", base + i as u64)
            .parse()
            .expect("memory addr")
    };
    let start = Instant::now();
    let mut hubs = Vec::new();
    for i in 0..HUBS {
        let mut cfg = NetConfig::new(troop_protocol::identity::generate());
        cfg.listen = vec![mem(i)];
        cfg.external = vec![mem(i)];
        cfg.max_connections = 8192;
        cfg.max_pending_incoming = 512;
        cfg.bootstrap = hubs
            .iter()
            .map(|(h, _): &(network::NetworkHandle, _)| network::with_p2p(mem(0), h.peer_id))
            .take(1)
            .collect();
        let (h, ev) = network::spawn(cfg).await.expect("hub");
        hubs.push((h, ev));
    }
    let hub_addrs: Vec<libp2p::Multiaddr> = hubs
        .iter()
        .enumerate()
        .map(|(i, (h, _))| network::with_p2p(mem(i), h.peer_id))
        .collect();
    let mut all: Vec<(
        network::NetworkHandle,
        tokio::sync::mpsc::Receiver<network::NetEvent>,
    )> = Vec::new();
    for i in HUBS..nodes {
        let mut cfg = NetConfig::new(troop_protocol::identity::generate());
        cfg.listen = vec![mem(i)];
        // Public nodes: their address is confirmed (AutoNAT does this on the
        // internet), so provider records carry it.
        cfg.external = vec![mem(i)];
        // Two hubs each, spread evenly.
        cfg.bootstrap = vec![
            hub_addrs[i % HUBS].clone(),
            hub_addrs[(i + 1) % HUBS].clone(),
        ];
        all.push(network::spawn(cfg).await.expect("node"));
    }
    all.extend(hubs);
    // Settled: most nodes have gossip peers and a routing table.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut ready = 0;
        let (mut gossip, mut table, mut conns) = (Vec::new(), Vec::new(), Vec::new());
        for (h, _) in &all {
            let st = h.status().await;
            conns.push(st.connected_peers.len());
            gossip.push(st.gossip_peers);
            table.push(st.routing_table_peers);
            if st.gossip_peers >= 3 && st.routing_table_peers >= 8 {
                ready += 1;
            }
        }
        if ready * 100 >= all.len() * 95 || Instant::now() > deadline {
            gossip.sort_unstable();
            table.sort_unstable();
            conns.sort_unstable();
            let q = |v: &[usize], p: usize| v.get(v.len() * p / 100).copied().unwrap_or(0);
            eprintln!(
                "[mesh bench] scale: {ready} of {} nodes settled after {:.1} s; gossip peers p1/p50 {}/{}, routing table p1/p50 {}/{}, connected peers p50/p99 {}/{}, process RSS {:.0} MiB",
                all.len(),
                start.elapsed().as_secs_f64(),
                q(&gossip, 1),
                q(&gossip, 50),
                q(&table, 1),
                q(&table, 50),
                q(&conns, 50),
                q(&conns, 99),
                rss_kib(std::process::id()).0 as f64 / 1024.0
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let join_s = start.elapsed().as_secs_f64();
    // A quiet spell before the new worker: what the settled mesh costs
    // per node while nothing happens (connections kept, CPU).
    let soak = env_usize("SCALE_SOAK_S", 30);
    let mut cpu_at = (Instant::now(), cpu_seconds());
    let soak_until = Instant::now() + Duration::from_secs(soak as u64);
    while Instant::now() < soak_until {
        tokio::time::sleep(Duration::from_secs(10).min(soak_until - Instant::now())).await;
        let mut conns = Vec::new();
        for (h, _) in &all {
            conns.push(h.status().await.connected_peers.len());
        }
        conns.sort_unstable();
        let now = (Instant::now(), cpu_seconds());
        let cpu = (now.1 - cpu_at.1) / (now.0 - cpu_at.0).as_secs_f64();
        cpu_at = now;
        eprintln!(
            "[mesh bench] scale: settled and idle: connected peers p50/p99 {}/{}, CPU {:.0} % ({:.2} ms per node per second), RSS {:.0} MiB",
            conns[conns.len() / 2],
            conns[conns.len() * 99 / 100],
            cpu * 100.0,
            cpu * 1000.0 / all.len() as f64,
            rss_kib(std::process::id()).0 as f64 / 1024.0
        );
    }

    // The new worker.
    let mut cfg = NetConfig::new(troop_protocol::identity::generate());
    cfg.listen = vec![mem(nodes)];
    cfg.external = vec![mem(nodes)];
    cfg.bootstrap = vec![hub_addrs[0].clone(), hub_addrs[HUBS / 2].clone()];
    let (worker, _wev) = network::spawn(cfg).await.expect("worker");
    let wid = worker.peer_id;
    let arrivals: Arc<Mutex<Vec<f64>>> = Arc::default();
    let t0 = Instant::now();
    for (_, mut ev) in all.iter_mut().map(|(h, ev)| {
        (
            h.clone(),
            std::mem::replace(ev, tokio::sync::mpsc::channel(1).1),
        )
    }) {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let mut seen = false;
            while let Some(e) = ev.recv().await {
                if !seen && matches!(&e, network::NetEvent::Advert { source, .. } if *source == wid)
                {
                    seen = true;
                    if let Ok(mut a) = arrivals.lock() {
                        a.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
        });
    }
    worker.provide(model_key(MODEL)).await;
    let others = all.len();
    let publish_until = Instant::now() + Duration::from_secs(30);
    let mut seq = 0u64;
    while Instant::now() < publish_until {
        seq += 1;
        worker.publish(format!("advert {seq}").into_bytes()).await;
        let got = arrivals.lock().map(|a| a.len()).unwrap_or(0);
        if got * 100 >= others * 99 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut reach = arrivals.lock().map(|a| a.clone()).unwrap_or_default();
    reach.sort_by(|a, b| a.total_cmp(b));
    let at = |share: f64| -> f64 {
        let need = ((others as f64) * share).ceil() as usize;
        reach
            .get(need.saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (reach50_ms, reach99_ms) = (at(0.5), at(0.99));

    // When can a random node find the record? Then 100 timed lookups.
    let findable = Instant::now();
    let probe = &all[all.len() / 3].0;
    while !probe.find_providers(model_key(MODEL)).await.contains(&wid)
        && findable.elapsed() < Duration::from_secs(30)
    {}
    eprintln!(
        "[mesh bench] scale: the provider record was findable {:.0} ms after the adverts reached 99 %",
        findable.elapsed().as_secs_f64() * 1000.0
    );
    // 100 lookups from spread-out nodes, 10 at a time (gateways look up
    // independently of each other).
    let mut lat = Vec::new();
    let mut failed_ms = Vec::new();
    use futures::StreamExt as _;
    let lookups: Vec<(bool, f64)> = futures::stream::iter((0..100).map(|k| {
        let h = all[(k * 7919) % all.len()].0.clone();
        async move {
            let t = Instant::now();
            let found = h.find_providers(model_key(MODEL)).await;
            if !found.contains(&wid) && std::env::var_os("SCALE_DEBUG").is_some() {
                eprintln!(
                    "[mesh bench] lookup from {} found {found:?}, not {wid}",
                    h.peer_id
                );
            }
            (found.contains(&wid), t.elapsed().as_secs_f64() * 1000.0)
        }
    }))
    .buffer_unordered(10)
    .collect()
    .await;
    for (ok, ms) in lookups {
        if ok {
            lat.push(ms);
        } else {
            failed_ms.push(ms);
        }
    }
    let failed = failed_ms.len();
    if failed > 0 {
        eprintln!(
            "[mesh bench] scale: {failed} lookups failed, after {:.0} ms at p50",
            pct(&mut failed_ms, 0.5)
        );
    }
    let (lookup50_ms, lookup99_ms) = if lat.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (pct(&mut lat, 0.5), pct(&mut lat, 0.99))
    };
    worker.shutdown();
    for (h, _) in &all {
        h.shutdown();
    }
    Scale {
        nodes: all.len() + 1,
        join_s,
        reach50_ms,
        reach99_ms,
        reached: reach.len(),
        lookup50_ms,
        lookup99_ms,
        lookups_failed: failed,
    }
}

async fn bench_discovery(nodes: usize) -> (f64, f64) {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(1), Duration::ZERO).await;
    let mut net = TestNet::start(rich).await;
    net.add_hub().await;
    let hub = net.hub.as_ref().expect("hub").listen_addrs();
    let mut others = Vec::new();
    // 48 more plain nodes, each joining through the hub: 50 with the worker.
    for _ in 0..nodes.saturating_sub(2) {
        let mut cfg = NetConfig::new(troop_protocol::identity::generate());
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
        cfg.bootstrap = hub.clone();
        others.push(network::spawn(cfg).await.expect("node").0);
    }
    net.add_worker(&fake.url, |_| {}).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // New nodes join through nodes that are not the worker, one at a
    // time, each through another entry: p50 over DISCOVERY_RUNS of each.
    let runs = env_usize("DISCOVERY_RUNS", 5).max(1);
    let entry = |i: usize| {
        others
            .get(others.len().saturating_sub(1 + i))
            .map(|n| n.listen_addrs())
            .unwrap_or(hub.clone())
    };
    let (mut dht, mut gossip) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let mut cfg = NetConfig::new(troop_protocol::identity::generate());
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
        cfg.bootstrap = entry(i);
        cfg.gossip = false;
        let start = Instant::now();
        let (dht_node, mut ev) = network::spawn(cfg).await.expect("new node");
        let spawned = start.elapsed().as_secs_f64() * 1000.0;
        while !matches!(
            ev.recv().await,
            Some(network::NetEvent::Connected(_)) | None
        ) {}
        let connected = start.elapsed().as_secs_f64() * 1000.0;
        let mut found = Vec::new();
        let mut tries = 0;
        while found.is_empty() && start.elapsed() < Duration::from_secs(10) {
            tries += 1;
            found = dht_node.find_providers(model_key(MODEL)).await;
        }
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        eprintln!(
            "[mesh bench] DHT: node up after {spawned:.0} ms, connected to its entry after {connected:.0} ms, providers after {tries} queries at {ms:.0} ms"
        );
        dht.push(if found.is_empty() { f64::NAN } else { ms });
        dht_node.shutdown();

        let mut cfg = NetConfig::new(troop_protocol::identity::generate());
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
        cfg.bootstrap = entry(i);
        cfg.dht = false;
        let start = Instant::now();
        let (g, mut ev) = network::spawn(cfg).await.expect("new node");
        let mut gossip_ms = f64::NAN;
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(network::NetEvent::Advert { .. })) =
                tokio::time::timeout(Duration::from_secs(1), ev.recv()).await
            {
                gossip_ms = start.elapsed().as_secs_f64() * 1000.0;
                break;
            }
        }
        eprintln!("[mesh bench] gossip: first advert at {gossip_ms:.0} ms");
        gossip.push(gossip_ms);
        g.shutdown();
    }
    (pct(&mut dht, 0.5), pct(&mut gossip, 0.5))
}

/// What a proof of hardware running beside the worker costs its answers.
struct ReproofCost {
    backend: String,
    proof_s: f64,
    /// (answers, TTFT p50 ms, answer p50 s, tokens/s over all) idle and
    /// while the proof ran.
    idle: (usize, f64, f64, f64),
    during: (usize, f64, f64, f64),
}

/// One streamed answer through the gateway: (TTFT s, whole answer s).
async fn answer_times(http: &reqwest::Client, url: &str) -> (f64, f64) {
    let start = Instant::now();
    let resp = http
        .post(url)
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .expect("send");
    let mut body = resp.bytes_stream();
    let mut first = None;
    while let Some(Ok(_)) = body.next().await {
        first.get_or_insert_with(|| start.elapsed().as_secs_f64());
    }
    (first.unwrap_or(f64::NAN), start.elapsed().as_secs_f64())
}

/// `conc` clients streaming answers until `stop` is set.
async fn answers_until(
    http: &reqwest::Client,
    url: &str,
    conc: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<(f64, f64)>, f64) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (http, url, stop) = (http.clone(), url.to_string(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                out.push(answer_times(&http, &url).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (all, start.elapsed().as_secs_f64())
}

/// A worker streams answers (200 tokens, 5 ms apart, 4 clients at once)
/// idle for 10 s, then while a proof of hardware at the coordinator's size
/// runs in its process exactly as a re-proof does (the worker's own key,
/// the same challenge, prove and submit), until it is verified.
async fn bench_reproof(
    n: usize,
    rounds: u32,
    backend: troop_bench_kernels::Backend,
) -> ReproofCost {
    let n_tokens = 200;
    let fake =
        FakeUpstream::start(Dialect::OpenAi, tokens(n_tokens), Duration::from_millis(5)).await;
    let mut net = TestNet::start(move |c| {
        rich(c);
        c.bench_size = n;
        c.bench_rounds = rounds;
        c.reproof_mean = Duration::ZERO;
    })
    .await;
    let cfg = net.worker_config(&fake.url, |_| {});
    let key = cfg.identity.clone();
    net.workers
        .push(troop_node::worker::start(cfg).await.expect("worker"));
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", net.gateway_url());
    for _ in 0..3 {
        answer_times(&http, &url).await;
    }
    let summarize = |mut v: Vec<(f64, f64)>, secs: f64| {
        let count = v.len();
        let mut ttft: Vec<f64> = v.iter().map(|x| x.0 * 1000.0).collect();
        let mut whole: Vec<f64> = v.drain(..).map(|x| x.1).collect();
        if count == 0 {
            return (0, f64::NAN, f64::NAN, 0.0);
        }
        (
            count,
            pct(&mut ttft, 0.5),
            pct(&mut whole, 0.5),
            (count * n_tokens) as f64 / secs,
        )
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let (idle, idle_s) = answers_until(&http, &url, 4, stop).await;
    let _ = timer.await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = CoordinatorClient::new(&net.coordinator_url(), key);
    let prover = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = troop_node::hardware::prove_to_coordinator(&client, backend).await;
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            (t.elapsed().as_secs_f64(), r)
        })
    };
    let (during, during_s) = answers_until(&http, &url, 4, stop).await;
    let (proof_s, verified) = prover.await.expect("the prover");
    let backend = match verified {
        Ok(v) => format!(
            "{}{} ({:.1} GFLOP/s verified)",
            v.backend,
            v.adapter.map(|a| format!(" on {a}")).unwrap_or_default(),
            v.gflops
        ),
        Err(e) => format!("failed: {e:#}"),
    };
    ReproofCost {
        backend,
        proof_s,
        idle: summarize(idle, idle_s),
        during: summarize(during, during_s),
    }
}

fn main() {
    // RUST_LOG=troop_node=debug shows what the nodes do (off by default).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // MESH_BENCH picks parts (ttft,chunks,burst,memory,discovery,scale,reproof); all by default.
        let parts = std::env::var("MESH_BENCH").unwrap_or_else(|_| "ttft,chunks,burst,memory,discovery,scale,reproof".into());
        let on = |p: &str| parts.split(',').any(|x| x.trim() == p);
        let nan = f64::NAN;
        let runs = env_usize("TTFT_RUNS", 200);
        let [d50, d99, m50, m99, x50, x99] = if on("ttft") {
            eprintln!("[mesh bench] time to first token, {runs} runs");
            bench_ttft(runs).await
        } else {
            [nan; 6]
        };
        let chunks = env_usize("CHUNKS", 400_000);
        let conc = env_usize("CONCURRENT", 50);
        let [d1, n1, m1, dc, nc, mc] = if on("chunks") {
            eprintln!("[mesh bench] chunks on one stream and on {conc} ({chunks})");
            bench_chunks(chunks, conc).await
        } else {
            [nan; 6]
        };
        let burst_events = env_usize("BURST_EVENTS", 2000);
        let mut bursts = Vec::new();
        if on("burst") {
            for conc in [50, 500] {
                eprintln!("[mesh bench] a burst of {conc} streams of {burst_events} events, no session open");
                bursts.push((conc, bench_burst(conc, burst_events).await));
            }
        }
        let streams = env_usize("STREAMS", 1000);
        let (idle, busy, hwm, live) = if on("memory") {
            eprintln!("[mesh bench] worker memory with {streams} streams");
            bench_memory(streams).await
        } else {
            (0, 0, 0, 0)
        };
        let nodes = env_usize("NODES", 50);
        let discovery_runs = env_usize("DISCOVERY_RUNS", 5).max(1);
        let (dht_ms, gossip_ms) = if on("discovery") {
            eprintln!("[mesh bench] discovery among {nodes} nodes");
            bench_discovery(nodes).await
        } else {
            (nan, nan)
        };
        let reproof = if on("reproof") {
            let n = env_usize("REPROOF_N", 4096);
            let rounds = env_usize("REPROOF_ROUNDS", 4) as u32;
            let backend: troop_bench_kernels::Backend = std::env::var("REPROOF_BACKEND")
                .ok()
                .and_then(|b| b.parse().ok())
                .unwrap_or(troop_bench_kernels::Backend::Auto);
            eprintln!("[mesh bench] answers while a proof of hardware runs (n = {n}, {rounds} rounds, {})", backend.name());
            Some(bench_reproof(n, rounds, backend).await)
        } else {
            None
        };
        let scale_nodes = env_usize("SCALE_NODES", 1000);
        let scale = if on("scale") {
            eprintln!("[mesh bench] {scale_nodes} simulated nodes on the memory transport");
            Some(bench_scale(scale_nodes).await)
        } else {
            None
        };
        println!();
        println!("mesh benchmark on loopback ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        println!("| figure | measured | goal |");
        println!("|---|---|---|");
        println!("| TTFT straight from the upstream, p50 / p99 ({runs} runs) | {d50:.2} / {d99:.2} ms | - |");
        println!("| TTFT through the mesh, p50 / p99 | {m50:.2} / {m99:.2} ms | - |");
        println!("| TTFT through nginx (reverse proxy, buffering off), p50 / p99 | {x50:.2} / {x99:.2} ms | - |");
        println!("| added to TTFT, p50 / p99: mesh | {:.2} / {:.2} ms | <= 1 ms at p50 |", m50 - d50, m99 - d99);
        println!("| added to TTFT, p50 / p99: nginx | {:.2} / {:.2} ms | - |", x50 - d50, x99 - d99);
        println!("| chunks/s on one stream: straight / nginx / mesh ({chunks} chunks) | {d1:.0} / {n1:.0} / {m1:.0} | mesh >= 250000 |");
        println!("| chunks/s over {conc} concurrent streams: straight / nginx / mesh | {dc:.0} / {nc:.0} / {mc:.0} | - |");
        for (conc, [d, n, m]) in &bursts {
            println!("| burst of {conc} x {burst_events} events, events/s: straight / nginx / mesh | {:.0} / {:.0} / {:.0} | mesh >= 1000000 at 50 |", d.events_per_s, n.events_per_s, m.events_per_s);
            println!("| burst of {conc}, median / slowest stream: straight | {:.3} / {:.3} s | - |", d.median_s, d.slowest_s);
            println!("| burst of {conc}, median / slowest stream: nginx | {:.3} / {:.3} s | - |", n.median_s, n.slowest_s);
            println!("| burst of {conc}, median / slowest stream: mesh (no session open) | {:.3} / {:.3} s | slowest <= 3x nginx's |", m.median_s, m.slowest_s);
        }
        println!("| worker RSS idle / with {live} of {streams} streams live / peak | {:.1} / {:.1} / {:.1} MiB | < 256 MiB at 1000 |", idle as f64 / 1024.0, busy as f64 / 1024.0, hwm as f64 / 1024.0);
        println!("| new node finds the worker among {nodes} nodes: DHT lookup, p50 of {discovery_runs} | {dht_ms:.0} ms | < 500 ms |");
        println!("| new node finds the worker among {nodes} nodes: first gossip advert, p50 of {discovery_runs} | {gossip_ms:.0} ms | < 500 ms |");
        if let Some(r) = &reproof {
            println!("| a re-proof beside 4 streaming clients: proof on {} | {:.1} s | - |", r.backend, r.proof_s);
            println!("| answers idle: count, TTFT p50, answer p50, tokens/s | {} / {:.1} ms / {:.3} s / {:.0} | - |", r.idle.0, r.idle.1, r.idle.2, r.idle.3);
            println!("| answers during the re-proof: count, TTFT p50, answer p50, tokens/s | {} / {:.1} ms / {:.3} s / {:.0} | - |", r.during.0, r.during.1, r.during.2, r.during.3);
            println!("| serving lost to the re-proof (1 - tokens/s during / idle) | {:.1} % | - |", (1.0 - r.during.3 / r.idle.3) * 100.0);
        }
        if let Some(sc) = &scale {
            println!("| {} simulated nodes (memory transport): joined and settled | {:.1} s | - |", sc.nodes, sc.join_s);
            println!("| {} nodes: a new worker's advert held by 50 % / 99 % of nodes ({} reached) | {:.0} / {:.0} ms | 99 % < 5 s |", sc.nodes, sc.reached, sc.reach50_ms, sc.reach99_ms);
            println!("| {} nodes: DHT lookup of the model, p50 / p99 (100 lookups, {} failed) | {:.0} / {:.0} ms | p99 < 2 s |", sc.nodes, sc.lookups_failed, sc.lookup50_ms, sc.lookup99_ms);
        }
        if let Ok(path) = std::env::var("BENCH_JSON") {
            let v = json!({"ttft_direct_p50_ms": d50, "ttft_direct_p99_ms": d99, "ttft_mesh_p50_ms": m50, "ttft_mesh_p99_ms": m99,
                "ttft_nginx_p50_ms": x50, "ttft_nginx_p99_ms": x99,
                "chunks_per_s_direct": d1, "chunks_per_s_nginx": n1, "chunks_per_s_mesh": m1,
                "chunks_per_s_direct_concurrent": dc, "chunks_per_s_nginx_concurrent": nc, "chunks_per_s_mesh_concurrent": mc, "concurrent_streams": conc,
                "bursts": bursts.iter().map(|(conc, [d, n, m])| json!({"streams": conc, "events": burst_events,
                    "direct": d.json(), "nginx": n.json(), "mesh": m.json()})).collect::<Vec<_>>(),
                "worker_rss_idle_kib": idle, "worker_rss_busy_kib": busy, "worker_rss_peak_kib": hwm, "streams_live": live, "streams": streams,
                "reproof": reproof.as_ref().map(|r| json!({"backend": r.backend, "proof_s": r.proof_s,
                    "idle": {"answers": r.idle.0, "ttft_p50_ms": r.idle.1, "answer_p50_s": r.idle.2, "tokens_per_s": r.idle.3},
                    "during": {"answers": r.during.0, "ttft_p50_ms": r.during.1, "answer_p50_s": r.during.2, "tokens_per_s": r.during.3}})),
                "discovery_dht_ms": dht_ms, "discovery_gossip_ms": gossip_ms, "nodes": nodes,
                "scale": scale.as_ref().map(|sc| json!({"nodes": sc.nodes, "join_s": sc.join_s,
                    "advert_reach_p50_ms": sc.reach50_ms, "advert_reach_p99_ms": sc.reach99_ms, "reached": sc.reached,
                    "lookup_p50_ms": sc.lookup50_ms, "lookup_p99_ms": sc.lookup99_ms, "lookups_failed": sc.lookups_failed}))});
            std::fs::write(path, v.to_string()).expect("write BENCH_JSON");
        }
    });
}
