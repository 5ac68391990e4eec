//! A newcomer's mistakes on the command line get an answer that says what
//! was expected and what to do, at once and before anything starts.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Dialect, FakeUpstream, MODEL, TestNet, eventually, tokens};
use serde_json::Value;

/// Runs `troop args`; one still running after 20 s (a node that started
/// instead of refusing) is killed and the test fails.
fn troop(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_troop"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("troop runs");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let o = child.wait_with_output().expect("output");
            panic!(
                "troop {args:?} was still running after 20 s instead of refusing: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn keygen(dir: &std::path::Path) -> String {
    let key = dir.join("me.key").display().to_string();
    assert!(troop(&["keygen", "--out", &key]).status.success());
    key
}

/// A coordinator or upstream given without a scheme fails at start, saying
/// how to write it (was: "coordinator unreachable: builder error" after
/// 7 s of retries).
#[test]
fn a_url_without_a_scheme_is_refused_with_the_url_to_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(dir.path());
    for args in [
        vec![
            "gateway",
            "--identity",
            &key,
            "--coordinator",
            "127.0.0.1:7070",
            "--http",
            "127.0.0.1:0",
        ],
        vec![
            "worker",
            "--identity",
            &key,
            "--coordinator",
            "http://127.0.0.1:7070",
            "--upstream",
            "127.0.0.1:8081",
            "--http",
            "127.0.0.1:0",
        ],
    ] {
        let started = Instant::now();
        let o = troop(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("is not an http:// or https:// URL"), "{err}");
        assert!(err.contains("write http://127.0.0.1:"), "{err}");
        eprintln!("refused in {:?}: {}", started.elapsed(), err.trim());
    }
}

/// An identity file that exists but is not a troop key (a PEM, say) is
/// not answered with "make one with troop keygen --out <that file>",
/// which keygen would refuse: it says to keep it and use another path.
#[test]
fn a_pem_file_as_identity_gets_advice_that_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join("worker.pem");
    std::fs::write(
        &pem,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let pem = pem.display().to_string();
    let o = troop(&[
        "gateway",
        "--identity",
        &pem,
        "--coordinator",
        "http://127.0.0.1:7070",
        "--http",
        "127.0.0.1:0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("a PEM file"), "{err}");
    assert!(!err.contains(&format!("--out {pem}")), "{err}");
    // The advice given works: keygen makes a key at another path.
    let other = dir.path().join("node.key").display().to_string();
    assert!(troop(&["keygen", "--out", &other]).status.success());
    let o = troop(&["keygen", "--out", &pem]);
    assert!(!o.status.success(), "keygen never overwrites a file");
}

/// `troop` run off the async test's threads.
async fn troop_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        troop(&a)
    })
    .await
    .expect("troop ran")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// A mesh with one worker (status page on a free port) and a gateway that
/// pays with the key in `dir/gateway.key`; one chat answered and settled.
async fn served_once(dir: &std::path::Path) -> (TestNet, FakeUpstream, String) {
    // Tokens 20 ms apart: the session costs more than 0 (a zero-cost one
    // is refunded, with no settle line).
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::from_millis(20)).await;
    let mut net = TestNet::start(|_| {}).await;
    net.add_worker(&fake.url, |c| {
        c.http = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let key = troop_protocol::identity::generate();
    let path = dir.join("gateway.key");
    troop_protocol::identity::write_keypair(&path, &key).expect("key written");
    net.add_gateway_with(|c| {
        c.identity = key.clone();
        c.net.keypair = key;
    })
    .await;
    net.wait_for_workers(1).await;
    let resp = net.chat(true).await;
    assert_eq!(resp.status(), 200);
    let _ = resp.text().await;
    let user = net.gateway_peer();
    let http = net.http.clone();
    let url = format!("{}/users/{user}/balance", net.coordinator_url());
    eventually("the session to settle", 30, || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            // (a ticket bought ahead may still be held)
            (v["debited"].as_f64()? > 0.0).then_some(())
        }
    })
    .await;
    (net, fake, path.display().to_string())
}

/// `troop account` reads one's own balance and signed history with one's
/// key (the guide's curl answered 401), and a settled reservation shows what
/// came back, so its line plus that part is what the session cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troop_account_reads_the_signed_history_and_what_each_reservation_gave_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, _fake, key) = served_once(dir.path()).await;
    let o = troop_async(vec![
        "account".into(),
        "--identity".into(),
        key.clone(),
        "--coordinator".into(),
        net.coordinator_url(),
        "--json".into(),
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).expect("json");
    let txs = v["transactions"].as_array().expect("transactions");
    let settle = txs
        .iter()
        .find(|t| t["kind"] == "settle")
        .expect("a settle line");
    let reserve = txs
        .iter()
        .find(|t| t["kind"] == "reserve" && t["job_id"] == settle["job_id"])
        .expect("its reserve line");
    assert_eq!(reserve["status"], "posted", "{reserve}");
    let released = reserve["released"]
        .as_f64()
        .expect("released on the reserve line");
    let cost = settle["amount"].as_f64().expect("amount");
    let held = reserve["amount"].as_f64().expect("amount");
    assert!(
        (held + released - cost).abs() < 0.0015,
        "reserve {held} + released {released} != settle {cost}"
    );
    assert!(released > 0.0);
    // The text form names the account, the balance and the released part.
    let o = troop_async(vec![
        "account".into(),
        "--identity".into(),
        key,
        "--coordinator".into(),
        net.coordinator_url(),
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains(&net.gateway_peer()), "{text}");
    assert!(text.contains("available"), "{text}");
    assert!(text.contains(&format!("{released:+.3}")), "{text}");
}

/// `troop doctor` checks the node running on this machine through its
/// status address and finds peers through the coordinator's `/bootstrap`
/// when given no --bootstrap (it used to start a throwaway node and report
/// 0 peers); `troop models --coordinator` finds the model the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_local_node_and_finds_peers_through_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (net, _fake, _key) = served_once(dir.path()).await;
    let page = net.workers[0].http_addr.expect("worker page");
    let worker = net.workers[0].peer_id.to_base58();
    let o = troop_async(vec![
        "doctor".into(),
        "--coordinator".into(),
        net.coordinator_url(),
        "--node".into(),
        format!("http://{page}"),
        "--wait".into(),
        "4".into(),
    ])
    .await;
    let text = stdout(&o);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no {name:?} line in:\n{text}"))
            .to_string()
    };
    assert!(line("node on this machine").contains(&worker), "{text}");
    assert!(line("node on this machine").starts_with("[ ok ]"), "{text}");
    assert!(line("its registration").starts_with("[ ok ]"), "{text}");
    assert!(line("peers found").starts_with("[ ok ]"), "{text}");
    assert!(
        line("its advert, seen from outside").starts_with("[ ok ]"),
        "{text}"
    );

    let o = troop_async(vec![
        "models".into(),
        "--coordinator".into(),
        net.coordinator_url(),
        "--wait".into(),
        "4".into(),
    ])
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(MODEL), "{}", stdout(&o));
}

/// `troop models` that finds nothing exits non-zero and says why; without
/// --bootstrap or --coordinator it says what to pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troop_models_that_finds_nothing_exits_non_zero() {
    let net = TestNet::start(|_| {}).await;
    let o = troop_async(vec![
        "models".into(),
        "--coordinator".into(),
        net.coordinator_url(),
        "--wait".into(),
        "1".into(),
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no worker advert"), "{}", stderr(&o));
    let o = troop_async(vec!["models".into(), "--wait".into(), "1".into()]).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--coordinator"), "{}", stderr(&o));
}

/// A gateway or worker pointed at a URL that is not a Troop coordinator
/// (here a web server that answers 404 to everything) refuses to start and
/// says so, instead of starting silently and failing at the first request.
#[test]
fn a_url_that_is_not_a_coordinator_is_refused_at_start() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.0 404 File not found\r\nContent-Type: text/html\r\nContent-Length: 14\r\n\r\nFile not found",
            );
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let key = keygen(dir.path());
    for args in [
        vec![
            "gateway",
            "--identity",
            &key,
            "--coordinator",
            &url,
            "--http",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
        vec![
            "worker",
            "--identity",
            &key,
            "--coordinator",
            &url,
            "--upstream",
            &url,
            "--dialect",
            "openai",
            "--http",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    ] {
        let o = troop(&args);
        assert!(!o.status.success(), "{args:?} started");
        let err = stderr(&o);
        assert!(err.contains("not a Troop coordinator"), "{args:?}: {err}");
    }
}

/// Every flag of every command has a description in `--help` (a newcomer
/// reads them; `gateway --identity` had none).
#[test]
fn every_flag_of_every_command_has_a_description() {
    let top = troop(&["--help"]);
    assert!(top.status.success());
    let text = stdout(&top);
    let commands: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|c| c != "help")
        .collect();
    assert!(commands.len() >= 8, "{text}");
    let mut missing = Vec::new();
    for c in &commands {
        let o = troop(&[c, "--help"]);
        assert!(o.status.success(), "{c} --help");
        let help = stdout(&o);
        // One line per flag: "  -x, --name <V>  description [env: ...]".
        // When a flag has several paragraphs clap puts every description
        // on the lines below its flag, indented deeper.
        let lines: Vec<&str> = help.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if !t.starts_with('-') {
                continue;
            }
            let indent = l.len() - t.len();
            let (spec, rest) = t.split_once("  ").unwrap_or((t, ""));
            let mut rest = rest.trim().to_string();
            if rest.is_empty()
                && let Some(next) = lines.get(i + 1)
                && next.len() - next.trim_start().len() > indent
            {
                rest = next.trim().to_string();
            }
            if rest.is_empty() || rest.starts_with('[') {
                missing.push(format!("{c} {}", spec.trim()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "flags without a description: {missing:?}"
    );
}

/// `troop demo` (what `scripts/demo` runs) with its gateway port taken says
/// so at once, naming the port and what to pass, before it starts anything
/// (was: "kill: No such process" and "see its log in the demo folder").
#[test]
fn the_demo_with_its_port_taken_says_so_before_starting_anything() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("demo");
    let o = troop(&[
        "demo",
        "--once",
        "--http",
        &addr,
        "--data",
        &data.display().to_string(),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains(&addr) && err.contains("not free"), "{err}");
    assert!(err.contains("--http"), "{err}");
    assert!(!data.exists(), "the demo started before checking its port");
}

/// `troop bench --json` names the adapters found and what proved: `auto`
/// takes the CPU over a software adapter (lavapipe here), `wgpu` proves on
/// that adapter, and both roots are the same. Without a Vulkan driver it
/// says "skipped" (a failure under `TROOP_REQUIRE_VULKAN_TESTS=1`).
#[test]
fn troop_bench_names_the_adapters_and_auto_keeps_the_cpu_over_a_software_one() {
    let seed = "11".repeat(32);
    let run = |backend: &str| -> Value {
        let o = troop(&[
            "bench",
            "--size",
            "256",
            "--rounds",
            "2",
            "--seed",
            &seed,
            "--backend",
            backend,
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).expect("one JSON line")
    };
    let auto = run("auto");
    let adapters = auto["adapters"]
        .as_array()
        .expect("adapters listed")
        .clone();
    if adapters.is_empty() {
        let why = "no Vulkan adapter (apt-get install mesa-vulkan-drivers)";
        assert!(
            std::env::var("TROOP_REQUIRE_VULKAN_TESTS").as_deref() != Ok("1"),
            "TROOP_REQUIRE_VULKAN_TESTS=1 but {why}"
        );
        eprintln!("skipped: the wgpu half of troop bench: {why}");
        assert_eq!(auto["backend"], "cpu");
        return;
    }
    let real_gpu = adapters
        .iter()
        .any(|a| a["kind"] == "discrete" || a["kind"] == "integrated");
    if !real_gpu {
        assert_eq!(auto["backend"], "cpu", "{auto}");
        assert!(auto["adapter"].is_null(), "{auto}");
    }
    assert_eq!(auto["asked"], "auto");
    let wgpu = run("wgpu");
    assert_eq!(wgpu["backend"], "wgpu", "{wgpu}");
    assert!(wgpu["fallback"].is_null(), "{wgpu}");
    assert!(wgpu["adapter"]["name"].is_string(), "{wgpu}");
    assert_eq!(wgpu["root"], auto["root"]);
}
