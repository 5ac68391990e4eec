//! `troop demo`: a whole mesh on loopback, with a real model.
//!
//! Starts two llama.cpp servers (the `xllamacpp` wheel in a virtual
//! environment): SmolLM2-135M-Instruct, a chat model, and Gemma 3 270M, a
//! base model; a coordinator, a worker in front of each and a gateway, each
//! as its own process. It asks the chat model a question and Gemma to
//! complete a sentence through the mesh (the gateway routes by model),
//! printing each answer, the worker that served it and the time to first
//! token; prints the ledger lines the jobs caused; then stays up for any
//! OpenAI client until Ctrl-C (or exits with `--once`, non-zero when the
//! mesh gave no answer). Every process it started is stopped on the way out.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};

pub struct DemoOptions {
    pub once: bool,
    pub question: String,
    pub http: SocketAddr,
    pub python: PathBuf,
    pub model_server: PathBuf,
    pub data: PathBuf,
}

/// Children are stopped (SIGTERM, then SIGKILL) when this drops: the last
/// started first, each waited for, so the gateway and the workers settle
/// with a coordinator that still runs.
struct Procs(Vec<(String, Child, PathBuf)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (name, c, _) in self.0.iter_mut().rev() {
            if !matches!(c.try_wait(), Ok(None)) {
                continue;
            }
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        eprintln!("  {name} had to be killed");
                        break;
                    }
                }
            }
        }
    }
}

/// The last lines of a log that say what went wrong (errors first).
fn log_cause(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let pick = lines
        .iter()
        .rev()
        .find(|l| l.contains("ERROR") || l.contains("Error:") || l.contains("error:"))
        .or(lines.last());
    pick.map(|l| l.trim().chars().take(400).collect())
        .unwrap_or_else(|| "(its log is empty)".into())
}

impl Procs {
    fn spawn(&mut self, name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.0.push((name.to_string(), child, log.to_path_buf()));
        Ok(())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, c, log) in self.0.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                bail!(
                    "{name} exited early ({st}): {}\n    its log: {}",
                    log_cause(log),
                    log.display()
                );
            }
        }
        Ok(())
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_http(
    procs: &mut Procs,
    http: &reqwest::Client,
    url: &str,
    what: &str,
    secs: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        procs.check_alive()?;
        if Instant::now() > deadline {
            bail!("{what} did not come up within {secs} s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn first_listen_addr(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .filter(|l| l.contains("listening"))
        .find_map(|l| {
            l.split("address=")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap_or("").to_string())
        })
}

/// The chat model the demo asks (and the question it asks by default is
/// one it answers well: `Name three colors.`).
const CHAT_MODEL: &str = "smollm2-135m";
/// The base model, asked to complete a sentence.
const BASE_MODEL: &str = "gemma3-270m";
const BASE_PROMPT: &str = "Paris is the capital of";

struct Answer {
    worker: String,
    ttft_ms: f64,
}

/// Streams one answer, printing it as it comes; fails unless text arrived
/// and the stream ended with `[DONE]`.
async fn ask(http: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<Answer> {
    let start = Instant::now();
    let resp = http.post(url).json(body).send().await?;
    if !resp.status().is_success() {
        bail!(
            "the gateway answered {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let worker = resp
        .headers()
        .get("x-troop-worker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string();
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut text = String::new();
    let mut ttft_ms = f64::NAN;
    let mut done = false;
    print!("    answer: ");
    while let Some(chunk) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(pos) = buf.find("\n\n") {
            let event: String = buf.drain(..pos + 2).collect();
            let data = event.trim().trim_start_matches("data:").trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(e) = v.get("error") {
                bail!("the stream broke: {e}");
            }
            if let Some(t) = v
                .pointer("/choices/0/delta/content")
                .or_else(|| v.pointer("/choices/0/text"))
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                if text.is_empty() {
                    ttft_ms = start.elapsed().as_secs_f64() * 1000.0;
                }
                text.push_str(t);
                print!("{}", t.replace('\n', "\n            "));
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        }
    }
    println!();
    if !done || text.trim().is_empty() {
        bail!("the mesh gave no complete answer");
    }
    Ok(Answer { worker, ttft_ms })
}

/// Workers advertise every second and close an idle session after 2 s, so
/// the demo's ledger lines appear within seconds.
const WORKER_PACE: [&str; 4] = ["--advert-interval", "1", "--session-idle-secs", "2"];

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    // The gateway's address is bound last: find out now, before anything
    // starts, that another program holds it.
    if let Err(e) = std::net::TcpListener::bind(opts.http) {
        bail!(
            "the demo's gateway address {} is not free ({e}); stop what holds it or pass another, e.g. `scripts/demo --http 127.0.0.1:8090`",
            opts.http
        );
    }
    let exe = std::env::current_exe()?;
    let bin_dir = exe
        .parent()
        .context("where is the troop binary?")?
        .to_path_buf();
    let coordinator_bin = bin_dir.join("troop-coordinator");
    if !coordinator_bin.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p troop-coordinator`",
            coordinator_bin.display()
        );
    }
    if !opts.python.exists() {
        bail!(
            "{} is missing: run scripts/demo (it installs the model server into .venv)",
            opts.python.display()
        );
    }
    let _ = std::fs::remove_dir_all(&opts.data);
    std::fs::create_dir_all(&opts.data)?;
    let data = opts.data.canonicalize()?;
    let http = reqwest::Client::new();
    let mut procs = Procs(Vec::new());
    let step = |s: &str| println!("\x1b[1m==>\x1b[0m {s}");

    step(
        "starting two model servers (llama.cpp, one thread each): SmolLM2-135M-Instruct and Gemma 3 270M",
    );
    let mut upstreams = Vec::new();
    for (model, alias) in [("smollm2", CHAT_MODEL), ("gemma", BASE_MODEL)] {
        let port = free_port()?;
        procs.spawn(
            &format!("model server ({alias})"),
            Command::new(&opts.python).arg(&opts.model_server).args([
                "--model",
                model,
                "--port",
                &port.to_string(),
                "--threads",
                "1",
            ]),
            &data.join(format!("model-server-{model}.log")),
        )?;
        upstreams.push(format!("http://127.0.0.1:{port}"));
    }

    step("starting the coordinator");
    let coord_port = free_port()?;
    let coordinator = format!("http://127.0.0.1:{coord_port}");
    procs.spawn(
        "coordinator",
        Command::new(&coordinator_bin)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{coord_port}"),
                "--data",
            ])
            .arg(data.join("coordinator"))
            .env("RUST_LOG", "info"),
        &data.join("coordinator.log"),
    )?;
    wait_http(
        &mut procs,
        &http,
        &format!("{coordinator}/health"),
        "the coordinator",
        30,
    )
    .await?;
    for upstream in &upstreams {
        wait_http(
            &mut procs,
            &http,
            &format!("{upstream}/health"),
            "a model server",
            180,
        )
        .await?;
    }

    let mut ids = Vec::new();
    let mut keys = Vec::new();
    for name in ["worker-1", "worker-2", "gateway"] {
        let key = troop_protocol::identity::generate();
        let path = data.join(format!("{name}.key"));
        troop_protocol::identity::write_keypair(&path, &key)?;
        ids.push((path, key.public().to_peer_id().to_base58()));
        keys.push(key);
    }

    step("starting a worker in front of each");
    let w1_port = free_port()?;
    // Each worker's status page on a free loopback port.
    let pages = [
        format!("127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
    ];
    procs.spawn(
        "worker-1",
        Command::new(&exe)
            .args(["worker", "--identity"])
            .arg(&ids[0].0)
            .args(["--coordinator", &coordinator, "--upstream", &upstreams[0]])
            .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{w1_port}")])
            .args(["--http", &pages[0]])
            .args(WORKER_PACE)
            .arg("--state-dir")
            .arg(data.join("worker-1")),
        &data.join("worker-1.log"),
    )?;
    let boot = format!("/ip4/127.0.0.1/tcp/{w1_port}/p2p/{}", ids[0].1);
    // The others join through worker-1: wait until it listens (it registers
    // with the coordinator right after binding its port).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Value = http
            .get(format!("{coordinator}/workers"))
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        let up = v["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|x| x["peer_id"] == ids[0].1.as_str()));
        if up {
            break;
        }
        procs.check_alive()?;
        if Instant::now() > deadline {
            bail!("worker-1 did not register within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    procs.spawn(
        "worker-2",
        Command::new(&exe)
            .args(["worker", "--identity"])
            .arg(&ids[1].0)
            .args(["--coordinator", &coordinator, "--upstream", &upstreams[1]])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", &boot])
            .args(["--http", &pages[1]])
            .args(WORKER_PACE)
            .arg("--state-dir")
            .arg(data.join("worker-2")),
        &data.join("worker-2.log"),
    )?;

    step("starting the gateway");
    procs.spawn(
        "gateway",
        Command::new(&exe)
            .args(["gateway", "--identity"])
            .arg(&ids[2].0)
            .args([
                "--coordinator",
                &coordinator,
                "--http",
                &opts.http.to_string(),
            ])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", &boot]),
        &data.join("gateway.log"),
    )?;
    let gw = format!("http://{}", opts.http);
    wait_http(
        &mut procs,
        &http,
        &format!("{gw}/health"),
        "the gateway",
        30,
    )
    .await?;
    // Both workers' adverts usually arrive within seconds; after 60 s go on
    // with the chat model alone (the gateway also asks the DHT).
    let deadline = Instant::now() + Duration::from_secs(60);
    let models = loop {
        let v: Value = http
            .get(format!("{gw}/v1/models"))
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        let models: Vec<String> = v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(String::from))
            .collect();
        let chat = models.iter().any(|m| m == CHAT_MODEL);
        if chat && (models.len() >= 2 || Instant::now() > deadline) {
            break models;
        }
        procs.check_alive()?;
        if Instant::now() > deadline + Duration::from_secs(60) {
            bail!(
                "the gateway saw no worker with {CHAT_MODEL} within 120 s; see the logs in {}",
                data.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some(addr) = first_listen_addr(&data.join("worker-1.log")) {
        println!("    worker-1 listens on {addr}");
    }
    println!("    the gateway sees {}", models.join(" and "));
    let names = [
        (ids[0].1.clone(), "worker-1"),
        (ids[1].1.clone(), "worker-2"),
    ];
    let who = |peer: &str| {
        names
            .iter()
            .find(|(p, _)| p == peer)
            .map(|(_, n)| format!("{n} ({peer})"))
            .unwrap_or_else(|| peer.to_string())
    };

    step(&format!("asking {CHAT_MODEL} through the mesh"));
    println!("    question: {}", opts.question);
    let body = json!({"model": CHAT_MODEL, "stream": true, "max_tokens": 64, "temperature": 0,
                      "messages": [{"role": "user", "content": opts.question}]});
    let answer = ask(&http, &format!("{gw}/v1/chat/completions"), &body).await?;
    println!(
        "    served by {}, first token after {:.0} ms",
        who(&answer.worker),
        answer.ttft_ms
    );
    let mut asked = 1;
    if models.iter().any(|m| m == BASE_MODEL) {
        asked += 1;
        step(&format!(
            "asking {BASE_MODEL} (a base model) to complete a sentence"
        ));
        println!("    prompt: {BASE_PROMPT}");
        let body = json!({"model": BASE_MODEL, "stream": true, "max_tokens": 12, "temperature": 0,
                          "prompt": BASE_PROMPT});
        let answer = ask(&http, &format!("{gw}/v1/completions"), &body).await?;
        println!(
            "    served by {}, first token after {:.0} ms",
            who(&answer.worker),
            answer.ttft_ms
        );
    }

    step("the ledger entries these requests caused");
    let user = &ids[2].1;
    // The history is private: read it with the user's own signature.
    let me = crate::coordinator_client::CoordinatorClient::new(&coordinator, keys[2].clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let history = loop {
        let v: Value = me.my_transactions().await.unwrap_or_default();
        let settled = v["transactions"]
            .as_array()
            .is_some_and(|t| t.iter().filter(|x| x["kind"] == "settle").count() >= asked);
        if settled {
            break v;
        }
        if Instant::now() > deadline {
            bail!(
                "not every request settled within 30 s; see worker logs in {}",
                data.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut workers_paid: Vec<String> = Vec::new();
    println!("    user {user}");
    for t in history["transactions"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
    {
        let back = t["released"]
            .as_f64()
            .map(|x| format!("{x:+.3} back"))
            .unwrap_or_default();
        println!(
            "      #{:<4} {:<8} {:>11.3} credit-s {:>14}  {:<8} job {}",
            t["id"],
            t["kind"].as_str().unwrap_or(""),
            t["amount"].as_f64().unwrap_or(0.0),
            back,
            t["status"].as_str().unwrap_or(""),
            t["job_id"].as_str().unwrap_or("-")
        );
        if t["kind"] == "settle"
            && let Some(w) = t["credit_account"].as_str()
            && !workers_paid.iter().any(|x| x == w)
        {
            workers_paid.push(w.to_string());
        }
    }
    for w in workers_paid {
        let b: Value = http
            .get(format!("{coordinator}/users/{w}/balance"))
            .send()
            .await?
            .json()
            .await?;
        println!("    worker {w}");
        println!(
            "      earned {:.3} credit-seconds (available {:.3})",
            b["credited"].as_f64().unwrap_or(0.0),
            b["available"].as_f64().unwrap_or(0.0)
        );
    }
    let b: Value = http
        .get(format!("{coordinator}/users/{user}/balance"))
        .send()
        .await?
        .json()
        .await?;
    println!(
        "    user balance: {:.3} available, {:.3} held",
        b["available"].as_f64().unwrap_or(0.0),
        b["pending"].as_f64().unwrap_or(0.0)
    );

    println!();
    if opts.once {
        println!("    logs and keys: {}", data.display());
        println!(
            "    --once: the mesh stops now; run `scripts/demo` without --once to keep it up and point an OpenAI client at it"
        );
        return Ok(());
    }
    step(&format!("the gateway speaks the OpenAI API at {gw}/v1"));
    println!("    from openai import OpenAI");
    println!("    client = OpenAI(base_url=\"{gw}/v1\", api_key=\"unused\")");
    println!(
        "    print(client.chat.completions.create(model=\"{CHAT_MODEL}\", messages=[{{\"role\": \"user\", \"content\": \"Hi!\"}}]).choices[0].message.content)"
    );
    println!("    console in a browser: {gw}/");
    println!(
        "    worker pages: http://{}/ and http://{}/",
        pages[0], pages[1]
    );
    println!("    logs and keys: {}", data.display());
    println!("\n    Ctrl-C stops the demo and every process it started.");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => procs.check_alive()?,
        }
    }
    println!("stopping");
    Ok(())
}
