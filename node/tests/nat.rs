//! Home workers behind real NAT routers: network namespaces, veth pairs and
//! iptables MASQUERADE built by `scripts/netlab` (root needed). A public
//! network holds the coordinator and a `troop relay`; home A (NAT) a worker,
//! home B (NAT) a gateway, home C (symmetric NAT) a second worker. The
//! gateway streams from both workers; A's path is punched direct by DCUtR,
//! C's stays relayed and carries more than libp2p's default circuit limit;
//! killing the relay leaves the direct path serving; the bill settles.
//!
//! Without root or iptables the test says "skipped"; with
//! `TROOP_REQUIRE_ROOT_TESTS=1` (CI) a skip is a failure.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const PUB_IP: &str = "198.51.100.1";

/// Runs `f` on a thread that has entered network namespace `ns`: every
/// socket it makes (and every connection a current-thread runtime there
/// makes) lives in that namespace.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).expect("open the namespace");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// Runs an async block on a current-thread runtime inside `ns`.
fn block_in<T: Send + 'static>(
    ns: &str,
    fut: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    in_netns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(fut())
    })
}

fn skip_or_fail(why: &str) {
    if std::env::var("TROOP_REQUIRE_ROOT_TESTS").is_ok_and(|v| v == "1") {
        panic!("NAT test cannot run: {why} (TROOP_REQUIRE_ROOT_TESTS=1)");
    }
    eprintln!("skipped: {why}");
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    let troop = PathBuf::from(env!("CARGO_BIN_EXE_troop"));
    troop.with_file_name(name)
}

struct Lab {
    prefix: String,
    procs: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    /// Starts `program args` in namespace `ns`, its output in `logs/<label>.log`.
    fn spawn(&mut self, label: &str, ns: &str, program: &Path, args: &[String]) {
        let log = File::create(self.logs.join(format!("{label}.log"))).expect("log file");
        let err = log.try_clone().expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .arg(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("TROOP_NAT_LOG")
                    .unwrap_or_else(|_| "info,libp2p=warn,troop_node::network=debug".into()),
            )
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn in namespace");
        self.procs.push((label.to_string(), child));
    }

    fn kill(&mut self, label: &str) {
        if let Some((_, c)) = self.procs.iter_mut().find(|(l, _)| l == label) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for `label` to exit by itself; its exit code.
    fn wait(&mut self, label: &str, limit: Duration) -> Option<i32> {
        let (_, c) = self.procs.iter_mut().find(|(l, _)| l == label)?;
        poll(&format!("{label} to finish"), limit, || {
            c.try_wait().ok().flatten().map(|s| s.code())
        })
    }

    fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{label}.log"))).unwrap_or_default()
    }

    fn dump_logs(&self) {
        for (l, _) in &self.procs {
            eprintln!("===== {l} =====\n{}", self.log(l));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
        let _ = Command::new(repo_root().join("scripts/netlab"))
            .args(["down", "--prefix", &self.prefix])
            .stdout(Stdio::null())
            .status();
    }
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.key"));
    let out = Command::new(bin("troop"))
        .args(["keygen", "--out"])
        .arg(&path)
        .output()
        .expect("troop keygen");
    assert!(out.status.success(), "keygen failed");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (path, id)
}

/// GET a JSON document from inside `ns`.
fn get_json(ns: &str, url: String) -> Option<Value> {
    block_in(ns, move || {
        Box::pin(async move {
            let resp = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            resp.json::<Value>().await.ok()
        })
    })
}

/// What one streamed chat completion gave.
struct Answer {
    text: String,
    ttft: Duration,
    total: Duration,
    chunks: usize,
    error: Option<String>,
}

/// Streams a chat completion from the gateway in `ns`.
fn chat(ns: &str, gateway: String, model: &str, prompt: &str) -> Answer {
    let model = model.to_string();
    let prompt = prompt.to_string();
    block_in(ns, move || {
        Box::pin(async move {
            use futures::StreamExt;
            let started = Instant::now();
            let resp = reqwest::Client::new()
                .post(format!("{gateway}/v1/chat/completions"))
                .json(&json!({
                    "model": model,
                    "stream": true,
                    "messages": [{"role": "user", "content": prompt}],
                }))
                .timeout(Duration::from_secs(120))
                .send()
                .await;
            let mut a = Answer {
                text: String::new(),
                ttft: Duration::ZERO,
                total: Duration::ZERO,
                chunks: 0,
                error: None,
            };
            let resp = match resp {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    let status = r.status();
                    a.error = Some(format!("{status}: {}", r.text().await.unwrap_or_default()));
                    return a;
                }
                Err(e) => {
                    a.error = Some(e.to_string());
                    return a;
                }
            };
            let mut body = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(piece) = body.next().await {
                let piece = match piece {
                    Ok(p) => p,
                    Err(e) => {
                        a.error = Some(e.to_string());
                        break;
                    }
                };
                buf.push_str(&String::from_utf8_lossy(&piece));
                while let Some(i) = buf.find("\n\n") {
                    let event: String = buf.drain(..i + 2).collect();
                    let Some(data) = event.trim().strip_prefix("data: ") else {
                        continue;
                    };
                    if data == "[DONE]" {
                        continue;
                    }
                    let v: Value = serde_json::from_str(data).unwrap_or_default();
                    if let Some(err) = v.get("error") {
                        a.error = Some(err.to_string());
                    }
                    if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                        if a.text.is_empty() {
                            a.ttft = started.elapsed();
                        }
                        a.text.push_str(t);
                        a.chunks += 1;
                    }
                }
            }
            a.total = started.elapsed();
            a
        })
    })
}

/// Polls `f` every 250 ms until it gives `Some`, or panics after `limit`.
fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn worker_entry(status: &Value, peer: &str) -> Option<Value> {
    status["workers"]
        .as_array()?
        .iter()
        .find(|w| w["peer_id"] == peer)
        .cloned()
}

/// Builds the lab (`scripts/netlab up` with `extra` arguments) in a
/// temporary folder, or says "skipped" (a failure under
/// `TROOP_REQUIRE_ROOT_TESTS=1`) and gives `None` when it cannot.
/// (The folder comes first: bound before the lab, it outlives it, so a
/// failing test's logs can still be printed as the lab drops.)
fn lab_up(extra: &[&str]) -> Option<(tempfile::TempDir, Lab)> {
    let is_root = nix::unistd::Uid::effective().is_root();
    if !is_root {
        skip_or_fail("needs root for network namespaces");
        return None;
    }
    let have = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have("ip") || !have("iptables") {
        skip_or_fail("needs ip (iproute2) and iptables");
        return None;
    }
    if !bin("troop-coordinator").exists() {
        panic!(
            "{} is missing: build the workspace first (cargo nextest run --workspace builds it)",
            bin("troop-coordinator").display()
        );
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // Two lab tests may run at once: each its own prefix.
    let prefix = format!(
        "t{}{}",
        std::process::id() % 100_000,
        if extra.is_empty() { "" } else { "r" }
    );
    let up = Command::new(repo_root().join("scripts/netlab"))
        .args(["up", "--prefix", &prefix])
        .args(extra)
        .output()
        .expect("scripts/netlab up");
    let lab = Lab {
        prefix,
        procs: Vec::new(),
        logs: tmp.path().to_path_buf(),
    };
    if !up.status.success() {
        let err = String::from_utf8_lossy(&up.stderr).to_string();
        drop(lab);
        skip_or_fail(&format!("scripts/netlab up failed: {err}"));
        return None;
    }
    Some((tmp, lab))
}

/// The coordinator and a `troop relay` in the public network; returns the
/// relay's bootstrap address and the coordinator's URL.
fn start_public(lab: &mut Lab, dir: &Path) -> (String, String) {
    let (relay_key, relay_id) = keygen(dir, "relay");
    let relay_addr = format!("/ip4/{PUB_IP}/tcp/4001/p2p/{relay_id}");
    let coordinator = format!("http://{PUB_IP}:7070");
    let s = |v: &str| v.to_string();
    lab.spawn(
        "coordinator",
        "pub",
        &bin("troop-coordinator"),
        &[
            s("serve"),
            s("--listen"),
            format!("{PUB_IP}:7070"),
            s("--data"),
            dir.join("coord").display().to_string(),
            s("--relay"),
            relay_addr.clone(),
        ],
    );
    lab.spawn(
        "relay",
        "pub",
        &bin("troop"),
        &[
            s("relay"),
            s("--identity"),
            relay_key.display().to_string(),
            s("--listen"),
            format!("/ip4/{PUB_IP}/tcp/4001"),
            s("--listen"),
            format!("/ip4/{PUB_IP}/udp/4001/quic-v1"),
        ],
    );
    let pubns = lab.ns("pub");
    poll("the coordinator", Duration::from_secs(30), || {
        get_json(&pubns, format!("{coordinator}/health"))
    });
    (relay_addr, coordinator)
}

/// `--identity`, `--coordinator`, TCP and QUIC listeners and the relay as
/// bootstrap: what every node in a home is started with.
fn mesh_args(key: &Path, coordinator: &str, relay_addr: &str) -> Vec<String> {
    [
        "--identity",
        &key.display().to_string(),
        "--coordinator",
        coordinator,
        "--listen",
        "/ip4/0.0.0.0/tcp/0",
        "--listen",
        "/ip4/0.0.0.0/udp/0/quic-v1",
        "--bootstrap",
        relay_addr,
    ]
    .iter()
    .map(|v| v.to_string())
    .collect()
}

#[test]
fn workers_behind_nat_are_reached_through_a_relay_and_punched_direct() {
    let Some((tmp, mut lab)) = lab_up(&[]) else {
        return;
    };

    // Fake model servers on each worker's own loopback, in its home, all
    // giving the same answer: 6,000 chunks, 144 KiB of text, more than
    // libp2p's default circuit limit of 128 KiB. Worker D sits in the
    // gateway's own home (the loopback reference).
    let answer: Vec<String> = (0..6000)
        .map(|i| format!("tok{i:05}-{} ", "x".repeat(14)))
        .collect();
    let expected = answer.concat();
    assert!(expected.len() > 128 * 1024);
    let upstreams = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = upstreams.enter();
    let mut fakes = Vec::new();
    for (home, model) in [("hA", "alpha"), ("hC", "gamma"), ("hB", "delta")] {
        let listener = in_netns(&lab.ns(home), || {
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind in a home")
        });
        fakes.push(common::FakeUpstream::start_on(
            listener,
            model,
            common::Dialect::OpenAi,
            answer.clone(),
            Duration::ZERO,
        ));
    }
    let port = |i: usize| fakes[i].url.clone();

    let (a_key, a_id) = keygen(tmp.path(), "worker-a");
    let (c_key, c_id) = keygen(tmp.path(), "worker-c");
    let (d_key, d_id) = keygen(tmp.path(), "worker-d");
    let (b_key, b_id) = keygen(tmp.path(), "gateway-b");
    let s = |v: &str| v.to_string();
    let (relay_addr, coordinator) = start_public(&mut lab, tmp.path());
    let pubns = lab.ns("pub");
    let mesh = |key: &Path| mesh_args(key, &coordinator, &relay_addr);
    let worker_started = Instant::now();
    for (label, ns, key, up) in [
        ("worker-a", "hA", &a_key, port(0)),
        ("worker-c", "hC", &c_key, port(1)),
        ("worker-d", "hB", &d_key, port(2)),
    ] {
        let mut args = vec![s("worker")];
        args.extend(mesh(key));
        args.extend([
            s("--upstream"),
            up,
            s("--advert-interval"),
            s("1"),
            s("--session-idle-secs"),
            s("1"),
            s("--state-dir"),
            tmp.path().join(label).display().to_string(),
        ]);
        lab.spawn(label, ns, &bin("troop"), &args);
    }
    let mut args = vec![s("gateway")];
    args.extend(mesh(&b_key));
    args.extend([s("--http"), s("127.0.0.1:8080")]);
    lab.spawn("gateway-b", "hB", &bin("troop"), &args);
    let gw = s("http://127.0.0.1:8080");
    let hb = lab.ns("hB");
    // `troop doctor` from home A, while the mesh comes up.
    lab.spawn(
        "doctor",
        "hA",
        &bin("troop"),
        &[
            s("doctor"),
            s("--bootstrap"),
            relay_addr.clone(),
            s("--coordinator"),
            coordinator.clone(),
            s("--wait"),
            s("8"),
        ],
    );

    // The workers find out they are behind NAT, reserve a slot on the relay
    // and advertise their circuit address; the gateway hears them.
    let status = poll(
        "the gateway to hear the three workers",
        Duration::from_secs(90),
        || {
            let st = get_json(&hb, format!("{gw}/troop/status"))?;
            [&a_id, &c_id, &d_id]
                .iter()
                .all(|w| worker_entry(&st, w).is_some())
                .then_some(st)
        },
    );
    assert_eq!(status["peer_id"], b_id.as_str());

    // A (endpoint-independent NAT): the first answer, then a punched path.
    let first = poll("an answer from worker A", Duration::from_secs(90), || {
        let a = chat(&hb, gw.clone(), "alpha", "hello over NAT");
        a.error.is_none().then_some(a)
    });
    let first_served = worker_started.elapsed();
    assert_eq!(first.text, expected);
    for label in ["worker-a", "worker-c"] {
        poll(
            &format!("{label}'s relay reservation"),
            Duration::from_secs(60),
            || {
                lab.log(label)
                    .contains("relay reservation accepted")
                    .then_some(())
            },
        );
    }
    let direct = poll("a direct path to worker A", Duration::from_secs(60), || {
        let st = get_json(&hb, format!("{gw}/troop/status"))?;
        let w = worker_entry(&st, &a_id)?;
        (w["connection"] == "direct").then_some(w)
    });
    assert!(
        direct["models"]
            .as_array()
            .is_some_and(|m| m.contains(&json!("alpha")))
    );

    // The same answer through a punched path (A), a relay (C: symmetric
    // NAT defeats punching) and the gateway's own home (D).
    let mut runs: Vec<(&str, Vec<Answer>)> = Vec::new();
    for (model, path) in [
        ("alpha", "punched"),
        ("gamma", "relayed"),
        ("delta", "loopback"),
    ] {
        let mut v = Vec::new();
        for _ in 0..3 {
            let a = chat(&hb, gw.clone(), model, "hello over NAT");
            assert!(a.error.is_none(), "{path} answer failed: {:?}", a.error);
            assert_eq!(a.text.len(), expected.len(), "{path} answer cut short");
            assert_eq!(a.text, expected);
            v.push(a);
        }
        runs.push((path, v));
    }
    // AutoNAT's verdict takes a probe through the relay (its dial back
    // times out after 10 s); the gateway reserved before it, its addresses
    // being LAN ones only.
    let st = poll(
        "AutoNAT to find the gateway private",
        Duration::from_secs(60),
        || {
            let st = get_json(&hb, format!("{gw}/troop/status"))?;
            (st["nat"] == "private").then_some(st)
        },
    );
    assert!(
        st["relays"].as_array().is_some_and(|r| !r.is_empty()),
        "the gateway holds no reservation: {st}"
    );
    assert_eq!(
        worker_entry(&st, &a_id).expect("A")["connection"],
        "direct",
        "{st}"
    );
    assert_eq!(
        worker_entry(&st, &c_id).expect("C")["connection"],
        "relayed",
        "{st}"
    );
    assert_eq!(
        worker_entry(&st, &d_id).expect("D")["connection"],
        "direct",
        "{st}"
    );

    // Every session so far is paid for: both NAT'd workers earned, and
    // their users acknowledged every request.
    let balance = |w: &str| -> Option<f64> {
        get_json(&pubns, format!("{coordinator}/users/{w}/balance"))?["available"].as_f64()
    };
    let reputation = |w: &str| -> Option<Value> {
        let list = get_json(&pubns, format!("{coordinator}/workers"))?;
        list["workers"]
            .as_array()?
            .iter()
            .find(|x| x["peer_id"] == w)
            .map(|x| x["reputation"].clone())
    };
    for (w, requests) in [(&a_id, 4), (&c_id, 3)] {
        let rep = poll(
            "the workers' sessions to settle",
            Duration::from_secs(60),
            || {
                let rep = reputation(w)?;
                (rep["requests"].as_u64()? >= requests).then_some(rep)
            },
        );
        assert_eq!(rep["acknowledged_share"], 1.0, "{rep}");
        assert!(balance(w).expect("balance") > 0.0);
    }
    let c_before = balance(&c_id).expect("balance");

    // The doctor, behind NAT, names the relay that holds its reservation.
    let code = lab.wait("doctor", Duration::from_secs(60));
    let report = lab.log("doctor");
    let verdicts: Vec<&str> = report.lines().filter(|l| l.starts_with('[')).collect();
    for l in &verdicts {
        eprintln!("doctor in home A: {l}");
    }
    let line = verdicts
        .iter()
        .find(|l| l.contains("relay reservation"))
        .copied()
        .unwrap_or_default();
    assert!(
        line.contains("[ ok ]") && line.contains(&format!("held by /ip4/{PUB_IP}/")),
        "doctor: {report}"
    );
    assert!(
        verdicts.iter().any(|l| l.contains("paths to workers")),
        "doctor: {report}"
    );
    assert!(code.is_some(), "doctor: {report}");

    // The relay dies in the middle of a relayed answer: the app gets
    // `worker_lost` and the user pays nothing for it. The punched path to A
    // keeps serving.
    let requests_before = fakes[1].state.requests.load(Ordering::SeqCst);
    let (hb2, gw2) = (hb.clone(), gw.clone());
    let broken = std::thread::spawn(move || chat(&hb2, gw2, "gamma", "[slow] a long one"));
    poll("the slow answer to start", Duration::from_secs(30), || {
        (fakes[1].state.requests.load(Ordering::SeqCst) > requests_before).then_some(())
    });
    lab.kill("relay");
    let broken = broken.join().expect("chat thread");
    let err = broken
        .error
        .expect("the stream must break when the relay dies");
    assert!(err.contains("worker_lost"), "got {err}");
    assert!(broken.text.len() < expected.len());
    let after = chat(&hb, gw.clone(), "alpha", "hello over NAT");
    assert!(
        after.error.is_none(),
        "A after the relay died: {:?}",
        after.error
    );
    assert_eq!(after.text, expected);
    let st = get_json(&hb, format!("{gw}/troop/status")).expect("status");
    assert_eq!(worker_entry(&st, &a_id).expect("A")["connection"], "direct");
    // The user's acknowledgement could not reach C (its only path died), so
    // the broken request counts as unacknowledged: at most the 10 s cap.
    poll(
        "worker C's receipt for the broken job",
        Duration::from_secs(60),
        || (reputation(&c_id)?["requests"].as_u64()? >= 4).then_some(()),
    );
    let c_after = balance(&c_id).expect("balance");
    assert!(
        c_after - c_before <= 10.0 + 1e-9,
        "worker C was paid more than the unacknowledged cap: {c_before} -> {c_after}"
    );

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut line = format!(
        "NAT lab: worker start to first served request {:.0} ms;",
        ms(first_served)
    );
    for (path, v) in &runs {
        line.push_str(&format!(
            " {path}: TTFT p50 {:.1} ms, {:.0} chunks/s;",
            median(v.iter().map(|r| ms(r.ttft)).collect()),
            median(
                v.iter()
                    .map(|r| r.chunks as f64 / r.total.as_secs_f64())
                    .collect()
            ),
        ));
    }
    line.push_str(
        " upgraded to direct: endpoint-independent NAT (A) yes, symmetric NAT (C) no, same home (D) direct without a relay",
    );
    eprintln!("{line}");
    drop(lab);
}

/// Routers that answer unsolicited packets (a TCP RST, an ICMP port
/// unreachable) instead of dropping them, as many home routers do: TCP
/// simultaneous open fails there every time, so the endpoint-independent
/// pair (worker A, gateway B) must punch over QUIC: both learn their UDP
/// mapping by identifying with the relay over QUIC too, DCUtR offers it,
/// and the gateway ends up with a direct path that serves answers.
#[test]
fn behind_routers_that_answer_rst_the_pair_punches_over_quic() {
    let Some((tmp, mut lab)) = lab_up(&["--rst"]) else {
        return;
    };
    let answer: Vec<String> = (0..200).map(|i| format!("tok{i:03} ")).collect();
    let expected = answer.concat();
    let upstreams = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = upstreams.enter();
    let listener = in_netns(&lab.ns("hA"), || {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind in a home")
    });
    let fake = common::FakeUpstream::start_on(
        listener,
        "alpha",
        common::Dialect::OpenAi,
        answer,
        Duration::ZERO,
    );
    let (a_key, a_id) = keygen(tmp.path(), "worker-a");
    let (b_key, _) = keygen(tmp.path(), "gateway-b");
    let (relay_addr, coordinator) = start_public(&mut lab, tmp.path());
    let s = |v: &str| v.to_string();
    let mut args = vec![s("worker")];
    args.extend(mesh_args(&a_key, &coordinator, &relay_addr));
    args.extend([
        s("--upstream"),
        fake.url.clone(),
        s("--advert-interval"),
        s("1"),
        s("--state-dir"),
        tmp.path().join("worker-a").display().to_string(),
    ]);
    lab.spawn("worker-a", "hA", &bin("troop"), &args);
    let mut args = vec![s("gateway")];
    args.extend(mesh_args(&b_key, &coordinator, &relay_addr));
    args.extend([s("--http"), s("127.0.0.1:8080")]);
    lab.spawn("gateway-b", "hB", &bin("troop"), &args);
    let gw = s("http://127.0.0.1:8080");
    let hb = lab.ns("hB");

    let first = poll("an answer from worker A", Duration::from_secs(90), || {
        let a = chat(&hb, gw.clone(), "alpha", "hello over NAT");
        a.error.is_none().then_some(a)
    });
    assert_eq!(first.text, expected);
    let direct = poll(
        "a direct path to worker A through RST routers",
        Duration::from_secs(60),
        || {
            let st = get_json(&hb, format!("{gw}/troop/status"))?;
            let w = worker_entry(&st, &a_id)?;
            (w["connection"] == "direct").then_some(st)
        },
    );
    eprintln!("RST routers: direct path to A: {}", direct["hole_punched"]);
    let after = chat(&hb, gw.clone(), "alpha", "hello over the punched path");
    assert!(after.error.is_none(), "{:?}", after.error);
    assert_eq!(after.text, expected);
    eprintln!("NAT lab (RST routers): endpoint-independent pair punched direct over QUIC");
    drop(lab);
}
