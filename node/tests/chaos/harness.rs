//! The chaos harness: a whole mesh on this machine, each node its own
//! process (so a fault is a real SIGKILL), under a steady stream of client
//! requests while a driver breaks things, then the money checked.
//!
//! * A coordinator (in this process, its data on disk), 2 relays, `workers`
//!   workers (`troop worker` processes over a paced fake model server, one
//!   of them behind a model server that restarts), 3 gateways (`troop
//!   gateway` processes).
//! * Clients: `clients` loops, each sending one request after another to a
//!   gateway in turn: streamed chat, whole chat, and streamed chat with
//!   tools.
//! * Faults, from a fixed seed: workers killed with SIGKILL and restarted
//!   (same identity, state folder and port) at `kill_per_min` of the
//!   workers per minute; a relay killed and restarted; a gateway killed and
//!   restarted; the model server of worker 0 restarted (503 "loading"
//!   for a few seconds); a worker's traffic dropped with iptables for a few
//!   seconds (root only).
//! * At the end every worker stops with SIGTERM (settling what it holds),
//!   the coordinator stops, and the money is checked: `ledger audit` clean,
//!   no more requests billed than reached a model server, users charged
//!   no more than what arrived.
//!
//! Used by `tests/chaos.rs` (a short run) and `benches/chaos.rs`
//! (`scripts/chaos`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::common::{self, Dialect, FakeUpstream, MODEL, TestNet, tokens};

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub duration: Duration,
    pub workers: usize,
    pub gateways: usize,
    /// Client loops sending requests one after another.
    pub clients: usize,
    /// Workers killed (and restarted) per minute, as a share of all.
    pub kill_per_min: f64,
    pub seed: u64,
    /// Tokens per answer and the pause between them (the paced model).
    pub answer_tokens: usize,
    pub token_delay: Duration,
    /// The `troop` binary.
    pub troop: PathBuf,
}

/// How one client request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole answer, as the model wrote it.
    Complete,
    /// The whole answer, continued on another worker after its first one
    /// was lost mid-stream (the paced model restarts its text, so the
    /// answer reads as a prefix and then the whole; the prefix may be the
    /// whole text when the first worker was lost before its finish event).
    Resumed,
    /// Ended with a clear error (an SSE error event, an OpenAI-shaped
    /// error body).
    ClearError,
    /// Its gateway process was killed while it ran (the user's own
    /// gateway died: nothing the mesh can answer with).
    GatewayDied,
    /// Cut without an error event or body.
    Lost,
    /// A complete answer whose text is not the model's (duplicated or
    /// mixed up).
    Garbled,
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub gateway: usize,
    pub kind: &'static str,
    pub outcome: Outcome,
    pub ttft: Option<Duration>,
    pub total: Duration,
    /// What a garbled answer read (kept to show what went wrong).
    pub text: Option<String>,
}

/// What a run measured and checked.
#[derive(Debug, Default)]
pub struct ChaosReport {
    pub samples: Vec<Sample>,
    pub faults: Vec<String>,
    /// Requests the model servers started and finished.
    pub upstream_started: usize,
    pub upstream_completed: usize,
    /// Requests billed (settled receipt lines), and of them acknowledged.
    pub billed: u64,
    pub billed_acknowledged: u64,
    /// Credits the users were charged, and the seconds their answers took
    /// as they saw them.
    pub charged_secs: f64,
    pub observed_secs: f64,
    pub ledger_findings: Vec<String>,
    pub skipped: Vec<String>,
    /// What the gateways that garbled an answer logged.
    pub gateway_logs: Vec<String>,
    /// Requests sent before the clients started (billed too).
    pub warmup_requests: u64,
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn cv(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return f64::NAN;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    var.sqrt() / mean
}

impl ChaosReport {
    pub fn count(&self, o: Outcome) -> usize {
        self.samples.iter().filter(|s| s.outcome == o).count()
    }

    /// Requests the mesh answered (its gateway alive throughout).
    pub fn judged(&self) -> usize {
        self.samples.len() - self.count(Outcome::GatewayDied)
    }

    /// Complete or resumed, of those judged.
    pub fn completion(&self) -> f64 {
        let done = self.count(Outcome::Complete) + self.count(Outcome::Resumed);
        done as f64 / self.judged().max(1) as f64
    }

    /// Requests that reached a model server more than were billed: served
    /// and never billed (an upper bound: a request cut by a killed worker
    /// reached its model server and has no line).
    pub fn served_not_billed(&self) -> i64 {
        (self.upstream_completed as i64 - self.billed as i64).max(0)
    }

    /// Acknowledged lines beyond the requests the users made: a request
    /// billed twice (served whole by two workers, or filed twice). A
    /// resumed answer has two lines (the lost worker's part and the
    /// rest); a request cut by its own gateway's death may have been
    /// served and acknowledged before it died.
    pub fn billed_twice(&self) -> i64 {
        let made =
            self.samples.len() + self.count(Outcome::Resumed) + self.warmup_requests as usize;
        (self.billed_acknowledged as i64 - made as i64).max(0)
    }

    /// TTFT or total times (ms, sorted) of the whole answers of `kind`
    /// (`None`: every kind).
    fn times(&self, ttft: bool, kind: Option<&str>) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| matches!(s.outcome, Outcome::Complete | Outcome::Resumed))
            .filter(|s| kind.is_none_or(|k| s.kind == k))
            .filter_map(|s| {
                if ttft {
                    s.ttft.map(|t| t.as_secs_f64() * 1000.0)
                } else {
                    Some(s.total.as_secs_f64() * 1000.0)
                }
            })
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    pub fn print(&self) {
        let ttft = self.times(true, None);
        let total = self.times(false, None);
        println!(
            "chaos: {} requests, {} faults",
            self.samples.len(),
            self.faults.len()
        );
        for f in &self.faults {
            println!("  fault: {f}");
        }
        for s in &self.skipped {
            println!("  skipped: {s}");
        }
        println!(
            "  completion {:.2}% of {} judged (complete {}, resumed {}, clear error {}, lost {}, garbled {}); {} cut by their own gateway's death",
            self.completion() * 100.0,
            self.judged(),
            self.count(Outcome::Complete),
            self.count(Outcome::Resumed),
            self.count(Outcome::ClearError),
            self.count(Outcome::Lost),
            self.count(Outcome::Garbled),
            self.count(Outcome::GatewayDied),
        );
        for kind in ["stream", "whole", "tools"] {
            let of: Vec<&Sample> = self.samples.iter().filter(|s| s.kind == kind).collect();
            let not_whole: Vec<String> = of
                .iter()
                .filter(|s| !matches!(s.outcome, Outcome::Complete | Outcome::Resumed))
                .map(|s| format!("{:?}@gateway-{}", s.outcome, s.gateway))
                .collect();
            println!(
                "  {kind}: {} requests, not whole: {}",
                of.len(),
                if not_whole.is_empty() {
                    "none".to_string()
                } else {
                    not_whole.join(", ")
                }
            );
        }
        for l in &self.gateway_logs {
            println!("  {l}");
        }
        for s in self
            .samples
            .iter()
            .filter(|s| s.outcome == Outcome::Garbled)
        {
            println!(
                "  garbled {} answer on gateway-{}, as it arrived: {:?}",
                s.kind,
                s.gateway,
                s.text.as_deref().unwrap_or_default()
            );
        }
        println!(
            "  all kinds: TTFT ms p50 {:.0} p99 {:.0} cv {:.2}; total ms p50 {:.0} p99 {:.0} cv {:.2}",
            pct(&ttft, 0.5),
            pct(&ttft, 0.99),
            cv(&ttft),
            pct(&total, 0.5),
            pct(&total, 0.99),
            cv(&total),
        );
        for kind in ["stream", "whole", "tools"] {
            let (ttft, total) = (self.times(true, Some(kind)), self.times(false, Some(kind)));
            println!(
                "  {kind}: TTFT ms p50 {:.0} p99 {:.0} cv {:.2}; total ms p50 {:.0} p99 {:.0} cv {:.2}",
                pct(&ttft, 0.5),
                pct(&ttft, 0.99),
                cv(&ttft),
                pct(&total, 0.5),
                pct(&total, 0.99),
                cv(&total),
            );
        }
        println!(
            "  money: model servers started {} finished {}; billed {} requests ({} acknowledged) for {} asked; billed twice {}; finished by a model server, never billed {}",
            self.upstream_started,
            self.upstream_completed,
            self.billed,
            self.billed_acknowledged,
            self.samples.len() as u64 + self.warmup_requests,
            self.billed_twice(),
            self.served_not_billed(),
        );
        println!(
            "  users charged {:.1} s of work for {:.1} s of answers they saw; ledger audit: {}",
            self.charged_secs,
            self.observed_secs,
            if self.ledger_findings.is_empty() {
                "clean".to_string()
            } else {
                self.ledger_findings.join("; ")
            }
        );
    }
}

/// A node process that can be killed and started again as itself.
struct Proc {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    troop: PathBuf,
    termed: bool,
}

impl Proc {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.troop)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("troop runs");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `wait` for it to exit (SIGKILL after).
    /// Sends SIGTERM once (a second one stops a node at once, unsettled).
    fn signal_term(&mut self) {
        if !self.termed
            && let Some(c) = &self.child
        {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            self.termed = true;
        }
    }

    fn term(&mut self, wait: Duration) {
        self.signal_term();
        self.termed = false;
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("{} did not stop in {wait:?}; killed", self.name);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn keygen(troop: &Path, out: &Path) -> String {
    let o = Command::new(troop)
        .args(["keygen", "--out"])
        .arg(out)
        .output()
        .expect("troop keygen");
    assert!(o.status.success(), "keygen: {o:?}");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// iptables rules dropping a TCP port's traffic on loopback; removed on
/// drop.
struct Blackhole {
    port: u16,
    on: bool,
}

impl Blackhole {
    fn rules(port: u16) -> [Vec<String>; 2] {
        let p = port.to_string();
        [
            [
                "INPUT", "-i", "lo", "-p", "tcp", "--dport", &p, "-j", "DROP",
            ]
            .map(String::from)
            .to_vec(),
            [
                "INPUT", "-i", "lo", "-p", "tcp", "--sport", &p, "-j", "DROP",
            ]
            .map(String::from)
            .to_vec(),
        ]
    }

    fn available() -> Result<(), String> {
        if !nix_root() {
            return Err("not root: no iptables fault".into());
        }
        match Command::new("iptables").arg("-L").arg("-n").output() {
            Ok(o) if o.status.success() => Ok(()),
            _ => Err("iptables not usable: no traffic-drop fault".into()),
        }
    }

    fn drop_port(port: u16) -> Self {
        for r in Self::rules(port) {
            let _ = Command::new("iptables").arg("-I").args(&r).status();
        }
        Self { port, on: true }
    }

    fn lift(&mut self) {
        if self.on {
            for r in Self::rules(self.port) {
                let _ = Command::new("iptables").arg("-D").args(&r).status();
            }
            self.on = false;
        }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.lift();
    }
}

fn nix_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// One client request, judged.
async fn ask(
    http: &reqwest::Client,
    url: &str,
    kind: &'static str,
    want: &str,
) -> (Outcome, Option<Duration>, Duration, Option<String>) {
    let t0 = Instant::now();
    let stream = kind != "whole";
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
        "max_tokens": 64,
    });
    if kind == "tools" {
        body["tools"] = json!([{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    }
    let resp = match http
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => return (Outcome::Lost, None, t0.elapsed(), None),
    };
    let status = resp.status().as_u16();
    if !stream {
        let v: Option<Value> = resp.json().await.ok();
        let total = t0.elapsed();
        return match v {
            Some(v) if status == 200 => {
                let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
                if text == want {
                    (Outcome::Complete, None, total, None)
                } else {
                    (Outcome::Garbled, None, total, Some(v.to_string()))
                }
            }
            Some(v) if v["error"]["message"].is_string() => {
                (Outcome::ClearError, None, total, None)
            }
            _ => (Outcome::Lost, None, total, None),
        };
    }
    if status != 200 {
        let v: Option<Value> = resp.json().await.ok();
        let o = if v.is_some_and(|v| v["error"]["message"].is_string()) {
            Outcome::ClearError
        } else {
            Outcome::Lost
        };
        return (o, None, t0.elapsed(), None);
    }
    use futures::StreamExt as _;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut raw = String::new();
    let mut text = String::new();
    let mut ttft = None;
    let mut done = false;
    let mut error = false;
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        raw.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find('\n') {
            let line = buf[..i].trim().to_string();
            buf.drain(..=i);
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if v["error"].is_object() {
                error = true;
            }
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str()
                && !t.is_empty()
            {
                ttft.get_or_insert_with(|| t0.elapsed());
                text.push_str(t);
            }
            // A tool call: its arguments arrive in pieces.
            if let Some(a) =
                v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            {
                ttft.get_or_insert_with(|| t0.elapsed());
                text.push_str(a);
            }
        }
    }
    let total = t0.elapsed();
    // The paced model calls the first tool with these arguments.
    let want = if kind == "tools" {
        r#"{"city":"Paris"}"#
    } else {
        want
    };
    let o = if error {
        Outcome::ClearError
    } else if !done {
        Outcome::Lost
    } else if text == want {
        Outcome::Complete
    } else if kind != "tools"
        // The gateway marks a continued answer's finish; a gateway that
        // sent a finished answer twice would not.
        && raw.contains(r#""resumed":true"#)
        && (1..=want.len())
            .filter(|k| want.is_char_boundary(*k))
            .any(|k| text.len() == k + want.len() && text == format!("{}{want}", &want[..k]))
    {
        Outcome::Resumed
    } else {
        return (Outcome::Garbled, ttft, total, Some(raw));
    };
    (o, ttft, total, None)
}

/// Runs the mesh under chaos and checks the money.
pub async fn run(opts: ChaosOptions) -> ChaosReport {
    let mut report = ChaosReport::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let fake = FakeUpstream::start(
        Dialect::OpenAi,
        tokens(opts.answer_tokens),
        opts.token_delay,
    )
    .await;
    let want: String = tokens(opts.answer_tokens).concat();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().to_path_buf();

    // Two relays, listed by the coordinator (how every node finds them).
    let mut relays = Vec::new();
    let mut relay_addrs = Vec::new();
    for i in 0..2 {
        let key = dir.join(format!("relay-{i}.key"));
        let peer = keygen(&opts.troop, &key);
        let port = common::free_port();
        let listen = format!("/ip4/127.0.0.1/tcp/{port}");
        relay_addrs.push(format!("{listen}/p2p/{peer}"));
        let mut p = Proc {
            name: format!("relay-{i}"),
            args: vec![
                "relay".into(),
                "--identity".into(),
                key.display().to_string(),
                "--listen".into(),
                listen,
            ],
            log: dir.join(format!("relay-{i}.log")),
            child: None,
            troop: opts.troop.clone(),
            termed: false,
        };
        p.start();
        relays.push(p);
    }
    let ra = relay_addrs.clone();
    let mut net = TestNet::start(move |c| {
        c.relays = ra.clone();
        c.worker_ttl = Duration::from_secs(8);
    })
    .await;
    let coordinator = net.coordinator_url();

    // Workers: worker 0 behind a model server that restarts.
    let down = Arc::new(AtomicBool::new(false));
    let restarting =
        common::restartable_upstream(fake.url.clone(), down.clone(), Arc::default()).await;
    let mut workers = Vec::new();
    let mut worker_ports = Vec::new();
    let mut worker_peers = Vec::new();
    for i in 0..opts.workers {
        let key = dir.join(format!("worker-{i}.key"));
        worker_peers.push(keygen(&opts.troop, &key));
        let port = common::free_port();
        worker_ports.push(port);
        let upstream = if i == 0 { &restarting } else { &fake.url };
        let mut p = Proc {
            name: format!("worker-{i}"),
            args: [
                "worker",
                "--identity",
                &key.display().to_string(),
                "--coordinator",
                &coordinator,
                "--upstream",
                upstream,
                "--listen",
                &format!("/ip4/127.0.0.1/tcp/{port}"),
                "--http",
                "127.0.0.1:0",
                "--state-dir",
                &dir.join(format!("worker-{i}")).display().to_string(),
                "--session-idle-secs",
                "3",
                "--advert-interval",
                "1",
                "--heartbeat-interval",
                "2",
                "--no-evidence",
            ]
            .map(String::from)
            .to_vec(),
            log: dir.join(format!("worker-{i}.log")),
            child: None,
            troop: opts.troop.clone(),
            termed: false,
        };
        p.start();
        workers.push(p);
    }

    // Gateways, each a user with starter credits.
    let mut gateways = Vec::new();
    let mut gateway_urls = Vec::new();
    let mut gateway_users = Vec::new();
    for i in 0..opts.gateways {
        let key = dir.join(format!("gateway-{i}.key"));
        gateway_users.push(keygen(&opts.troop, &key));
        let http = format!("127.0.0.1:{}", common::free_port());
        gateway_urls.push(format!("http://{http}"));
        let mut p = Proc {
            name: format!("gateway-{i}"),
            args: [
                "gateway",
                "--identity",
                &key.display().to_string(),
                "--coordinator",
                &coordinator,
                "--http",
                &http,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-audit",
            ]
            .map(String::from)
            .to_vec(),
            log: dir.join(format!("gateway-{i}.log")),
            child: None,
            troop: opts.troop.clone(),
            termed: false,
        };
        p.start();
        gateways.push(p);
    }

    // Every gateway answers before the clients start.
    let http = reqwest::Client::new();
    let warmups = Arc::new(AtomicU64::new(0));
    for url in &gateway_urls {
        common::eventually("a gateway answering for the model", 120, || {
            let (http, url, warmups) = (http.clone(), url.clone(), warmups.clone());
            async move {
                warmups.fetch_add(1, Ordering::SeqCst);
                let r = http
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .ok()?;
                (r.status() == 200).then_some(())
            }
        })
        .await;
    }

    // The clients.
    let stop = Arc::new(AtomicBool::new(false));
    // A gateway's epoch changes when it is killed and again once its
    // restart answers: a request that did not end whole while its
    // gateway was down or restarting is its own gateway's death, not the
    // mesh's doing.
    let epochs: Arc<Vec<AtomicU64>> =
        Arc::new((0..opts.gateways).map(|_| AtomicU64::new(0)).collect());
    let mut clients = Vec::new();
    for c in 0..opts.clients {
        let (stop, epochs, http, urls, want) = (
            stop.clone(),
            epochs.clone(),
            http.clone(),
            gateway_urls.clone(),
            want.clone(),
        );
        let seed = opts.seed.wrapping_add(c as u64 + 1);
        clients.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut samples = Vec::new();
            let mut n = c;
            while !stop.load(Ordering::SeqCst) {
                let g = n % urls.len();
                n += 1;
                let kind = match rng.random_range(0..10) {
                    0..6 => "stream",
                    6..9 => "whole",
                    _ => "tools",
                };
                let epoch = epochs[g].load(Ordering::SeqCst);
                let (mut outcome, ttft, total, text) = ask(&http, &urls[g], kind, &want).await;
                let down = epoch % 2 == 1;
                if outcome != Outcome::Complete
                    && (down || epochs[g].load(Ordering::SeqCst) != epoch)
                {
                    outcome = Outcome::GatewayDied;
                }
                samples.push(Sample {
                    gateway: g,
                    kind,
                    outcome,
                    ttft,
                    total,
                    text,
                });
            }
            samples
        }));
    }

    // The faults.
    let t0 = Instant::now();
    let secs = opts.duration.as_secs_f64();
    let kills_per_sec = opts.kill_per_min * opts.workers as f64 / 60.0;
    let mut next_kill = if kills_per_sec > 0.0 {
        rng.random_range(0.5..1.5) / kills_per_sec
    } else {
        f64::INFINITY
    };
    let mut once = vec![
        (secs * 0.25, "relay"),
        (secs * 0.4, "model server"),
        (secs * 0.5, "gateway"),
        (secs * 0.6, "iptables"),
    ];
    let mut restarts: Vec<(f64, usize)> = Vec::new();
    let mut blackhole: Option<(f64, Blackhole)> = None;
    let mut relay_back: Option<f64> = None;
    let mut gateway_back: Option<f64> = None;
    let mut model_back: Option<f64> = None;
    loop {
        let now = t0.elapsed().as_secs_f64();
        if now >= secs {
            break;
        }
        if now >= next_kill {
            let alive: Vec<usize> = (1..opts.workers)
                .filter(|i| workers[*i].child.is_some())
                .collect();
            if let Some(&w) = alive.get(
                rng.random_range(0..alive.len().max(1))
                    .min(alive.len().saturating_sub(1)),
            ) {
                workers[w].kill9();
                report.faults.push(format!("{now:.1}s worker-{w} SIGKILL"));
                restarts.push((now + rng.random_range(1.0..3.0), w));
            }
            next_kill = now + rng.random_range(0.5..1.5) / kills_per_sec;
        }
        restarts.retain(|(at, w)| {
            if now >= *at {
                workers[*w].start();
                report
                    .faults
                    .push(format!("{now:.1}s worker-{w} restarted"));
                false
            } else {
                true
            }
        });
        while let Some(&(at, what)) = once.first() {
            if now < at {
                break;
            }
            once.remove(0);
            match what {
                "relay" => {
                    relays[0].kill9();
                    relay_back = Some(now + 3.0);
                    report.faults.push(format!("{now:.1}s relay-0 SIGKILL"));
                }
                "model server" => {
                    down.store(true, Ordering::SeqCst);
                    model_back = Some(now + 3.0);
                    report.faults.push(format!(
                        "{now:.1}s worker-0's model server restarting (503)"
                    ));
                }
                "gateway" if opts.gateways > 1 => {
                    let g = opts.gateways - 1;
                    epochs[g].fetch_add(1, Ordering::SeqCst);
                    gateways[g].kill9();
                    gateway_back = Some(now + 2.0);
                    report.faults.push(format!("{now:.1}s gateway-{g} SIGKILL"));
                }
                "iptables" => match Blackhole::available() {
                    Ok(()) if opts.workers > 2 => {
                        let w = 2;
                        blackhole = Some((now + 4.0, Blackhole::drop_port(worker_ports[w])));
                        report
                            .faults
                            .push(format!("{now:.1}s worker-{w}'s traffic dropped (iptables)"));
                    }
                    Ok(()) => {}
                    Err(why) => report.skipped.push(why),
                },
                _ => {}
            }
        }
        if relay_back.is_some_and(|t| now >= t) {
            relay_back = None;
            relays[0].start();
            report.faults.push(format!("{now:.1}s relay-0 restarted"));
        }
        if gateway_back.is_some_and(|t| now >= t) {
            gateway_back = None;
            let g = opts.gateways - 1;
            gateways[g].start();
            report
                .faults
                .push(format!("{now:.1}s gateway-{g} restarted"));
            // Up again once its HTTP answers.
            let (http, url, epochs) = (http.clone(), gateway_urls[g].clone(), epochs.clone());
            tokio::spawn(async move {
                common::eventually("the restarted gateway answering", 60, || {
                    let (http, url) = (http.clone(), url.clone());
                    async move {
                        let r = http.get(format!("{url}/v1/models")).send().await.ok()?;
                        r.status().is_success().then_some(())
                    }
                })
                .await;
                epochs[g].fetch_add(1, Ordering::SeqCst);
            });
        }
        if model_back.is_some_and(|t| now >= t) {
            model_back = None;
            down.store(false, Ordering::SeqCst);
            report
                .faults
                .push(format!("{now:.1}s worker-0's model server back"));
        }
        if blackhole.as_ref().is_some_and(|(t, _)| now >= *t) {
            if let Some((_, mut b)) = blackhole.take() {
                b.lift();
            }
            report
                .faults
                .push(format!("{now:.1}s worker-2's traffic back"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Everything back, then the clients finish what they run.
    if let Some((_, mut b)) = blackhole.take() {
        b.lift();
    }
    down.store(false, Ordering::SeqCst);
    for (_, w) in restarts.drain(..) {
        workers[w].start();
    }
    if relay_back.is_some() {
        relays[0].start();
    }
    if gateway_back.is_some() {
        gateways[opts.gateways - 1].start();
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        if let Ok(s) = c.await {
            report.samples.extend(s);
        }
    }
    // What a gateway that garbled an answer said about lost workers and
    // continued answers (its log has no request ids).
    let mut told = std::collections::HashSet::new();
    for s in report
        .samples
        .iter()
        .filter(|s| s.outcome == Outcome::Garbled)
    {
        if told.insert(s.gateway) {
            let log = std::fs::read_to_string(&gateways[s.gateway].log).unwrap_or_default();
            let said: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("continued"))
                .collect();
            report.gateway_logs.push(format!(
                "gateway-{} (its warnings, errors and continued answers, last 40 of {}):\n{}",
                s.gateway,
                said.len(),
                said[said.len().saturating_sub(40)..].join("\n")
            ));
        }
    }

    // Settle: gateways send their last acks, workers close their sessions
    // and file their receipts (SIGTERM), then the coordinator stops.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for g in gateways.iter_mut() {
        g.term(Duration::from_secs(15));
    }
    // All at once (each may take seconds to settle), then each waited for.
    for w in workers.iter_mut() {
        w.signal_term();
    }
    for w in workers.iter_mut() {
        w.term(Duration::from_secs(30));
    }
    // Counted from the start, warm-up included (it is billed too).
    report.upstream_started = fake.state.requests.load(Ordering::SeqCst);
    report.upstream_completed = fake.state.completed.load(Ordering::SeqCst);
    report.warmup_requests = warmups.load(Ordering::SeqCst);

    let workers_v: Value = http
        .get(format!("{coordinator}/workers"))
        .send()
        .await
        .expect("GET /workers")
        .json()
        .await
        .expect("json");
    for w in workers_v["workers"].as_array().cloned().unwrap_or_default() {
        let r = &w["reputation"];
        let n = r["requests"].as_u64().unwrap_or(0);
        report.billed += n;
        report.billed_acknowledged +=
            (n as f64 * r["acknowledged_share"].as_f64().unwrap_or(0.0)).round() as u64;
    }
    // Charged: what was debited, less what came back (refunds are
    // credits beyond the starter grant).
    let starter = 3_600.0;
    for u in &gateway_users {
        if let Some(b) = net.balance(u).await {
            let debited = b["debited"].as_f64().unwrap_or(0.0);
            let credited = b["credited"].as_f64().unwrap_or(starter);
            report.charged_secs += debited - (credited - starter);
        }
    }
    report.observed_secs = report.samples.iter().map(|s| s.total.as_secs_f64()).sum();
    net.stop_coordinator().await;
    let ledger_dir = net.dir.path().join("coordinator");
    match troop_coordinator::admin::audit(&ledger_dir, None) {
        Ok(a) => report.ledger_findings = a.findings,
        Err(e) => report.ledger_findings = vec![format!("ledger audit failed: {e}")],
    }
    drop(relays);
    report
}
