//! The pages people look at, in a real browser: headless Chromium from
//! Debian's packages driven over WebDriver (chromedriver). The gateway's
//! console streams an answer token by token, lists the worker with its
//! round trip and shows the balance going down; the worker's page counts
//! the job and its earnings going up. Screenshots of both go under
//! `target/tmp/troop-screenshots/`.
//!
//! And `/metrics` of each role, from the real `troop` binary (one process
//! per role), parses as Prometheus text and moves with traffic.
//!
//! Without chromium and chromedriver the browser test says "skipped";
//! with `TROOP_REQUIRE_BROWSER_TESTS=1` (CI) that is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Dialect, FakeUpstream, KillOnDrop, MODEL, TestNet, chat_text, eventually, free_port, sse_data,
    tokens,
};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

fn find(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// chromium and chromedriver, or `None` (and "skipped") when missing.
fn browser_tools() -> Option<(PathBuf, PathBuf)> {
    let chromium = find(
        "CHROMIUM",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    );
    let driver = find("CHROMEDRIVER", &["/usr/bin/chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            let why = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)";
            if std::env::var("TROOP_REQUIRE_BROWSER_TESTS").is_ok_and(|v| v == "1") {
                panic!("browser test required but {why}");
            }
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// A chromedriver on a free loopback port and a headless Chromium session.
struct Browser {
    client: Client,
    _driver: KillOnDrop,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(chromium: &Path, driver: &Path) -> Self {
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver_proc = KillOnDrop(child);
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        eventually("chromedriver to be ready", 30, || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let v: Value = http
                    .get(format!("{url}/status"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                v.pointer("/value/ready")
                    .and_then(Value::as_bool)
                    .filter(|r| *r)
            }
        })
        .await;
        let profile = tempfile::tempdir().expect("profile dir");
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                    // Names of other sites that resolve to this machine, as
                    // a DNS rebinding attacker's would.
                    "--host-resolver-rules=MAP evil.test 127.0.0.1, MAP rebind.test 127.0.0.1",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a Chromium session");
        Self {
            client,
            _driver: driver_proc,
            _profile: profile,
        }
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or(Value::Null)
    }

    async fn text(&self, selector: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.textContent : null;",
            json!(selector)
        );
        self.js(&script)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the element's text parses as a number.
    async fn number(&self, selector: &str) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(v) = self.text(selector).await.trim().parse::<f64>() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{selector} never showed a number"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `pred` holds for the number in `selector`.
    async fn number_until(&self, selector: &str, what: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.number(selector).await;
            if pred(v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} (last {v})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("a screenshot");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("troop-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("screenshot written");
        eprintln!("screenshot: {}", path.display());
        path
    }
}

/// Bytes a page loads: the HTML and every asset it names.
async fn page_weight(http: &reqwest::Client, base: &str) -> usize {
    let mut total = 0;
    for path in ["/", "/assets/troop.css", "/assets/troop.js"] {
        let r = http
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("GET a page asset");
        assert_eq!(r.status(), 200, "{path}");
        total += r.bytes().await.expect("asset body").len();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_streams_an_answer_and_the_worker_page_counts_it() {
    let Some((chromium, driver)) = browser_tools() else {
        return;
    };
    let answer = tokens(12);
    let up = FakeUpstream::start(Dialect::OpenAi, answer.clone(), Duration::from_millis(120)).await;
    let mut net = TestNet::start(|_| {}).await;
    net.add_worker(&up.url, |c| {
        c.http = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let gw = net.gateway_url();
    let worker_id = net.workers[0].peer_id.to_base58();
    let worker_page = format!(
        "http://{}",
        net.workers[0]
            .http_addr
            .expect("the worker serves its page")
    );
    let me = net.gateway_peer();

    // One answer first, so the account exists; wait until it settles. It
    // streams, so it takes the upstream's pace (12 x 120 ms) and costs more
    // than nothing: an answer sent whole in under a millisecond may be
    // charged 0 credits, which made this wait fail now and then.
    let first = net.chat(true).await;
    assert_eq!(first.status(), 200);
    let first = first.text().await.expect("the first answer's body");
    assert_eq!(chat_text(&sse_data(&first)), answer.concat());
    let netr = &net;
    let mer = &me;
    eventually("the first session to settle", 30, move || async move {
        let b = netr.balance(mer).await?;
        eprintln!("balance {b}");
        (b["pending"].as_f64()? == 0.0 && b["debited"].as_f64()? > 0.0).then_some(())
    })
    .await;

    let b = Browser::start(&chromium, &driver).await;

    // The worker's page before.
    b.client
        .goto(&worker_page)
        .await
        .expect("open the worker page");
    let served_before = b.number("#jobs-served").await;
    let earned_before = b
        .number_until("#earned", "the first session's earnings", |v| v > 0.0)
        .await;
    assert_eq!(b.text("#upstream-health").await, "healthy");

    // The console: pick the model, ask, watch the answer arrive.
    b.client.goto(&gw).await.expect("open the console");
    let model_ready = format!(
        "return [...document.querySelectorAll('#model option')].some(o => o.value === {}) && !document.querySelector('#send').disabled;",
        json!(MODEL)
    );
    let (br, ready) = (&b, &model_ready);
    eventually(
        "the model picker to list the model",
        30,
        move || async move { br.js(ready).await.as_bool().filter(|x| *x) },
    )
    .await;
    b.js(&format!(
        "document.querySelector('#model').value = {}; return true;",
        json!(MODEL)
    ))
    .await;
    let available_before = b.number("#available").await;
    assert!(available_before > 0.0, "the account has credits");

    b.client
        .find(Locator::Css("#prompt"))
        .await
        .expect("prompt box")
        .send_keys("Name three colors.")
        .await
        .expect("typed");
    b.client
        .find(Locator::Css("#send"))
        .await
        .expect("send button")
        .click()
        .await
        .expect("clicked");

    // Token by token: the answer grows through several partial texts, each
    // a prefix of the whole.
    let last_answer = "const a = document.querySelectorAll('#transcript .assistant'); return a.length ? a[a.length - 1].textContent : '';";
    let stats = "const s = document.querySelectorAll('#transcript .msg-stats'); return s.length ? s[s.length - 1].textContent : '';";
    let full: String = answer.concat();
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = b
            .js(last_answer)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !text.is_empty() && seen.last() != Some(&text) {
            seen.push(text.clone());
        }
        if b.js(stats)
            .await
            .as_str()
            .is_some_and(|s| s.starts_with("TTFT"))
        {
            // The last pieces may have come with the stats line.
            let text = b
                .js(last_answer)
                .await
                .as_str()
                .unwrap_or_default()
                .to_string();
            if seen.last() != Some(&text) {
                seen.push(text);
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the answer never finished; saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let last = seen.last().cloned().unwrap_or_default();
    assert_eq!(last, full, "the whole answer is shown");
    let partial = seen.iter().filter(|t| t.len() < full.len()).count();
    assert!(
        partial >= 3,
        "the answer should appear token by token, saw {seen:?}"
    );
    assert!(
        seen.iter().all(|t| full.starts_with(t.as_str())),
        "{seen:?}"
    );
    let served_by = b
        .js("const s = document.querySelectorAll('#transcript .msg-stats'); return s[s.length - 1].getAttribute('data-worker');")
        .await;
    assert_eq!(served_by.as_str(), Some(worker_id.as_str()));

    // The mesh view lists the worker with its round trip.
    let rtt = format!(
        "const r = document.querySelector('#workers tr[data-peer=\"{worker_id}\"] .rtt'); return r ? r.textContent : null;"
    );
    let rttr = &rtt;
    eventually(
        "the worker's round trip in the mesh view",
        30,
        move || async move {
            let t = br.js(rttr).await.as_str()?.to_string();
            t.ends_with(" ms").then_some(t)
        },
    )
    .await;
    // The balance goes down (held, then settled).
    let available_after = b
        .number_until("#available", "the balance to go down", |v| {
            v < available_before
        })
        .await;
    eprintln!("console: available {available_before} -> {available_after}");
    // The answer is in the recent answers with its worker.
    let rows = b
        .js("return document.querySelectorAll('#answers tbody tr').length;")
        .await;
    assert!(rows.as_u64().is_some_and(|n| n >= 2), "{rows}");
    let paint = b
        .js("const p = performance.getEntriesByName('first-contentful-paint')[0]; return p ? p.startTime : null;")
        .await;
    eprintln!("console first contentful paint: {paint} ms");
    b.screenshot("console.png").await;

    // The worker's page after: the job counted, the earnings up.
    b.client
        .goto(&worker_page)
        .await
        .expect("open the worker page");
    b.number_until("#jobs-served", "the job to be counted", |v| {
        v > served_before
    })
    .await;
    let earned_after = b
        .number_until("#earned", "the earnings to go up", |v| v > earned_before)
        .await;
    eprintln!("worker: earned {earned_before} -> {earned_after}");
    let paint = b
        .js("const p = performance.getEntriesByName('first-contentful-paint')[0]; return p ? p.startTime : null;")
        .await;
    eprintln!("worker page first contentful paint: {paint} ms");
    b.screenshot("worker.png").await;

    let console_bytes = page_weight(&net.http, &gw).await;
    let worker_bytes = page_weight(&net.http, &worker_page).await;
    eprintln!("page weight: console {console_bytes} B, worker page {worker_bytes} B");
    assert!(console_bytes < 200 * 1024 && worker_bytes < 200 * 1024);
    let _ = b.client.close().await;
}

/// A page of another site (served at `evil.test`, which the browser
/// resolves to this machine) that posts to the gateway the way browsers
/// send without a preflight (`no-cors`, `text/plain`) is refused: nothing
/// reaches a worker and the user pays nothing. The same site reached under
/// its own name at the gateway's port (DNS rebinding) can neither read the
/// account nor spend; the worker's page refuses it too. The console and a
/// localhost app on another port keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_other_sites_cannot_spend_credits_or_read_the_account() {
    let Some((chromium, driver)) = browser_tools() else {
        return;
    };
    let up = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    net.add_worker(&up.url, |c| {
        c.http = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let gw = net.gateway_url();
    let gw_port = gw.rsplit(':').next().expect("a port").to_string();
    let worker_port = net.workers[0].http_addr.expect("worker page").port();
    // The attacker's (and a localhost app's) page: any page at all.
    let page = axum::Router::new().route(
        "/",
        axum::routing::get(|| async { axum::response::Html("<html><body>a page</body></html>") }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("page listener");
    let page_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, page).await;
    });
    let refused = |reason: &'static str| {
        let http = net.http.clone();
        let gw = gw.clone();
        async move {
            sample_sum(
                &metrics(&http, &gw).await,
                "troop_http_refused_total",
                &[("reason", reason)],
            )
        }
    };
    let origin_before = refused("origin").await;
    let host_before = refused("host").await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "spend"}]});
    let post = |url: &str, mode: &str| {
        format!(
            "return fetch({}, {{method: 'POST', mode: {}, headers: {{'Content-Type': 'text/plain'}}, body: {}}}).then(r => r.status, e => 'error: ' + e);",
            json!(url),
            json!(mode),
            json!(body.to_string())
        )
    };

    let b = Browser::start(&chromium, &driver).await;
    // 1. A foreign page, a simple no-cors POST (no preflight).
    b.client
        .goto(&format!("http://evil.test:{page_port}/"))
        .await
        .expect("open the foreign page");
    let sent = b
        .js(&post(&format!("{gw}/v1/chat/completions"), "no-cors"))
        .await;
    eprintln!("no-cors POST from evil.test: {sent}");
    let (rf, ob) = (&refused, origin_before);
    eventually(
        "the gateway to refuse the foreign origin",
        30,
        move || async move { (rf("origin").await > ob).then_some(()) },
    )
    .await;
    assert_eq!(
        up.state.requests.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was served"
    );

    // 2. DNS rebinding: the attacker's name, at the gateway's own port.
    let rebound = format!("http://rebind.test:{gw_port}");
    b.client
        .goto(&format!("{rebound}/troop/account"))
        .await
        .expect("open the rebound account");
    let text = b.js("return document.body.textContent;").await;
    let text = text.as_str().unwrap_or_default();
    assert!(text.contains("forbidden_host"), "{text}");
    assert!(!text.contains("available"), "the account leaked: {text}");
    let status = b
        .js(&post(&format!("{rebound}/v1/chat/completions"), "cors"))
        .await;
    assert_eq!(
        status,
        json!(403),
        "a same-origin POST under the rebound name"
    );
    assert!(refused("host").await >= host_before + 2.0);
    b.client
        .goto(&format!("http://rebind.test:{worker_port}/troop/status"))
        .await
        .expect("open the rebound worker page");
    let text = b.js("return document.body.textContent;").await;
    assert!(
        text.as_str().unwrap_or_default().contains("forbidden_host"),
        "{text}"
    );
    assert_eq!(
        up.state.requests.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing was served"
    );

    // 3. What must keep working: the console's own requests, and an app on
    // localhost at another port calling the gateway (CORS).
    b.client.goto(&gw).await.expect("open the console");
    let status = b.js(&post("/v1/chat/completions", "cors")).await;
    assert_eq!(status, json!(200), "the console's own POST");
    b.client
        .goto(&format!("http://localhost:{page_port}/"))
        .await
        .expect("open the localhost app");
    let status = b
        .js(&post(&format!("{gw}/v1/chat/completions"), "cors"))
        .await;
    assert_eq!(status, json!(200), "a localhost app's POST");
    assert_eq!(
        up.state.requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    let _ = b.client.close().await;
}

/// Samples of `name` with every label in `labels`, summed (a histogram's
/// `_count`). The whole text must parse as Prometheus text.
fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    use prom_text_format_parser::{Scrape, Type, ValueType};
    let scrape = Scrape::parse(text).expect("valid Prometheus text");
    scrape
        .metrics
        .iter()
        .filter(|m| m.name == name)
        .flat_map(|m| {
            let counted = matches!(m.kind, Type::Histogram | Type::Summary);
            m.samples
                .iter()
                .filter(move |s| !counted || s.value.value_type == ValueType::Count)
        })
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|l| l.key == *k && l.value == *v))
        })
        .map(|s| s.value.value.parse::<f64>().expect("a number"))
        .sum()
}

async fn metrics(http: &reqwest::Client, base: &str) -> String {
    let r = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(r.status(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    r.text().await.expect("metrics text")
}

fn spawn_troop(args: &[&str], log: &Path) -> KillOnDrop {
    let out = std::fs::File::create(log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_troop"))
        .args(args)
        .env("RUST_LOG", "info,libp2p=warn")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("troop starts");
    KillOnDrop(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_exports_metrics_that_move_with_traffic() {
    let up = FakeUpstream::start(Dialect::OpenAi, tokens(6), Duration::from_millis(5)).await;
    let net = TestNet::start(|_| {}).await;
    let dir = net.dir.path();
    let http = net.http.clone();
    let mut ids = Vec::new();
    for name in ["worker", "gateway"] {
        let key = troop_protocol::identity::generate();
        let path = dir.join(format!("{name}.key"));
        troop_protocol::identity::write_keypair(&path, &key).expect("key written");
        ids.push((path, key.public().to_peer_id().to_base58()));
    }
    let (wport, gport) = (free_port(), free_port());
    let worker_http = format!("http://127.0.0.1:{wport}");
    let coordinator = net.coordinator_url();
    let wkey = ids[0].0.to_string_lossy().to_string();
    let _worker = spawn_troop(
        &[
            "worker",
            "--identity",
            &wkey,
            "--coordinator",
            &coordinator,
            "--upstream",
            &up.url,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--http",
            &format!("127.0.0.1:{wport}"),
            "--advert-interval",
            "0.3",
            "--session-idle-secs",
            "0.5",
        ],
        &dir.join("worker.log"),
    );
    // The worker's own status says where it listens.
    let listen = eventually("the worker's status page", 60, || {
        let http = http.clone();
        let url = format!("{worker_http}/troop/status");
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            v["nat"]["listen_addrs"]
                .as_array()?
                .iter()
                .filter_map(Value::as_str)
                .find(|a| a.starts_with("/ip4/127.0.0.1/tcp/"))
                .map(str::to_string)
        }
    })
    .await;
    let boot = format!("{listen}/p2p/{}", ids[0].1);
    // The gateway bound beyond loopback says so in its log (traffic still
    // goes to 127.0.0.1 only).
    let gkey = ids[1].0.to_string_lossy().to_string();
    let gw_log = dir.join("gateway.log");
    let _gateway = spawn_troop(
        &[
            "gateway",
            "--identity",
            &gkey,
            "--coordinator",
            &coordinator,
            "--http",
            &format!("0.0.0.0:{gport}"),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            &boot,
        ],
        &gw_log,
    );
    let gw = format!("http://127.0.0.1:{gport}");
    eventually("the gateway to see the worker", 60, || {
        let http = http.clone();
        let url = format!("{gw}/v1/models");
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            v["data"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == MODEL)
                .then_some(())
        }
    })
    .await;
    let log = std::fs::read_to_string(&gw_log).unwrap_or_default();
    assert!(
        log.contains("beyond loopback"),
        "the public bind is warned about: {log}"
    );

    let g0 = metrics(&http, &gw).await;
    let w0 = metrics(&http, &worker_http).await;
    for stream in [true, false] {
        let r = http
            .post(format!("{gw}/v1/chat/completions"))
            .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}))
            .send()
            .await
            .expect("chat");
        assert_eq!(r.status(), 200);
        r.text().await.expect("answer");
    }
    let r = http
        .post(format!("{gw}/v1/chat/completions"))
        .json(&json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("chat");
    assert_eq!(r.status(), 404);
    // Receipts go out when the session idles (0.5 s).
    let w1 = eventually("the worker's receipt to be delivered", 30, || {
        let http = http.clone();
        let url = worker_http.clone();
        async move {
            let t = metrics(&http, &url).await;
            (sample_sum(&t, "troop_receipts_delivered_total", &[]) >= 1.0).then_some(t)
        }
    })
    .await;
    let g1 = metrics(&http, &gw).await;

    let chat = [("route", "/v1/chat/completions")];
    assert!(
        sample_sum(&g1, "troop_http_requests_total", &chat)
            >= sample_sum(&g0, "troop_http_requests_total", &chat) + 3.0
    );
    assert!(
        sample_sum(&g1, "troop_gateway_answers_total", &[("outcome", "done")])
            >= sample_sum(&g0, "troop_gateway_answers_total", &[("outcome", "done")]) + 2.0
    );
    assert!(sample_sum(&g1, "troop_gateway_ttft_seconds", &[]) >= 2.0);
    assert!(sample_sum(&g1, "troop_gateway_answer_chunks", &[]) >= 2.0);
    assert!(sample_sum(&g1, "troop_tickets_bought_total", &[]) >= 1.0);
    assert!(
        sample_sum(
            &g1,
            "troop_gateway_errors_total",
            &[("code", "model_not_found")]
        ) >= 1.0
    );
    let done = [("status", "completed")];
    assert!(
        sample_sum(&w1, "troop_jobs_total", &done)
            >= sample_sum(&w0, "troop_jobs_total", &done) + 2.0
    );
    assert!(sample_sum(&w1, "troop_tokens_served_total", &[]) >= 12.0);
    assert!(sample_sum(&w1, "troop_worker_ttft_seconds", &[]) >= 2.0);
    assert!(sample_sum(&w1, "troop_receipts_queued_total", &[]) >= 1.0);
    // Set at every connection and disconnection (it may be back to 0 by
    // now: idle connections close).
    for t in [&g1, &w1] {
        assert!(t.lines().any(|l| l.starts_with("troop_peers_connected ")));
    }
    // Pages polling the account cost the coordinator at most one history
    // read per 3 s, however often they ask.
    let reads = |t: &str| {
        sample_sum(
            t,
            "troop_http_requests_total",
            &[("route", "/users/{id}/transactions")],
        )
    };
    let c0 = reads(&metrics(&http, &coordinator).await);
    for _ in 0..10 {
        let r = http
            .get(format!("{gw}/troop/account"))
            .send()
            .await
            .expect("account");
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["account"], ids[1].1.as_str());
        assert_eq!(v["stale"], false);
        assert!(
            v["balance"]["debited"].as_f64().is_some_and(|d| d > 0.0),
            "{v}"
        );
    }
    let c1 = reads(&metrics(&http, &coordinator).await);
    assert!(c1 - c0 >= 1.0 && c1 - c0 <= 2.0, "{c0} -> {c1}");
    // One process per role: the worker's metrics hold no gateway figures.
    assert_eq!(sample_sum(&w1, "troop_gateway_answers_total", &[]), 0.0);
    assert_eq!(sample_sum(&g1, "troop_jobs_total", &[]), 0.0);
}
