//! `troop`: join the Troop mesh as a worker or a gateway, or look at it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use troop_node::network::{NetConfig, RelayLimits};
use troop_node::upstream::Dialect;
use troop_node::{commands, gateway, worker};

#[derive(Parser, Debug)]
#[command(name = "troop", version, about = "Troop: a peer-to-peer inference mesh", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug, Clone)]
struct MeshArgs {
    /// Multiaddr to listen on (repeatable). Default: /ip4/0.0.0.0/tcp/0 and /ip4/0.0.0.0/udp/0/quic-v1.
    #[arg(long = "listen", env = "TROOP_LISTEN", value_delimiter = ',')]
    listen: Vec<Multiaddr>,
    /// A node to join through, ending in /p2p/<PeerId> (repeatable).
    #[arg(long = "bootstrap", env = "TROOP_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<Multiaddr>,
    /// Find peers on the LAN by mDNS (multicast).
    #[arg(long, env = "TROOP_MDNS")]
    mdns: bool,
    /// Turn Kademlia off (gossip only).
    #[arg(long, env = "TROOP_NO_DHT")]
    no_dht: bool,
    /// Turn gossip adverts off (DHT only).
    #[arg(long, env = "TROOP_NO_GOSSIP")]
    no_gossip: bool,
    /// Above this many connected peers, the oldest idle connections are
    /// closed (never gossip mesh peers, warm workers, peers with a job
    /// running, relays; a node with --relay-server trims nothing).
    #[arg(long, env = "TROOP_PEERS_HIGH", default_value_t = 64)]
    peers_high: usize,
    /// How many connected peers a trim leaves (at most --peers-high).
    #[arg(long, env = "TROOP_PEERS_LOW", default_value_t = 32)]
    peers_low: usize,
    /// A circuit relay to reserve a slot on at once, ending in /p2p/<PeerId>
    /// (repeatable). Without it, a node that AutoNAT finds behind NAT uses
    /// the relays among its bootstrap peers and the coordinator's /bootstrap.
    #[arg(long = "relay", env = "TROOP_RELAY", value_delimiter = ',')]
    relay: Vec<Multiaddr>,
    /// Offer circuit relay to others once AutoNAT finds this node public.
    #[arg(long, env = "TROOP_RELAY_SERVER")]
    relay_server: bool,
    #[command(flatten)]
    limits: RelayLimitArgs,
}

/// What a relay carries for others.
#[derive(Args, Debug, Clone)]
struct RelayLimitArgs {
    /// Relay: most reservations held at once.
    #[arg(long, env = "TROOP_RELAY_MAX_RESERVATIONS", default_value_t = 1024)]
    relay_max_reservations: usize,
    /// Relay: most relayed connections (circuits) at once.
    #[arg(long, env = "TROOP_RELAY_MAX_CIRCUITS", default_value_t = 256)]
    relay_max_circuits: usize,
    /// Relay: most circuits per peer at once.
    #[arg(long, env = "TROOP_RELAY_MAX_CIRCUITS_PER_PEER", default_value_t = 32)]
    relay_max_circuits_per_peer: usize,
    /// Relay: seconds a circuit may stay open (libp2p's default is 120).
    #[arg(long, env = "TROOP_RELAY_CIRCUIT_SECS", default_value_t = 3600)]
    relay_circuit_secs: u64,
    /// Relay: bytes a circuit may carry each way (libp2p's default is 131072).
    #[arg(long, env = "TROOP_RELAY_CIRCUIT_BYTES", default_value_t = 256 * 1024 * 1024)]
    relay_circuit_bytes: u64,
    /// Relay: seconds a reservation lasts before the client renews it.
    #[arg(long, env = "TROOP_RELAY_RESERVATION_SECS", default_value_t = 3600)]
    relay_reservation_secs: u64,
}

impl RelayLimitArgs {
    fn limits(&self) -> anyhow::Result<RelayLimits> {
        if self.relay_max_reservations == 0
            || self.relay_max_circuits == 0
            || self.relay_max_circuits_per_peer == 0
            || self.relay_circuit_secs == 0
            || self.relay_circuit_bytes == 0
            || self.relay_reservation_secs == 0
        {
            anyhow::bail!("relay limits must be above 0");
        }
        Ok(RelayLimits {
            max_reservations: self.relay_max_reservations,
            max_circuits: self.relay_max_circuits,
            max_circuits_per_peer: self.relay_max_circuits_per_peer,
            max_circuit_duration: Duration::from_secs(self.relay_circuit_secs),
            max_circuit_bytes: self.relay_circuit_bytes,
            reservation_duration: Duration::from_secs(self.relay_reservation_secs),
            ..RelayLimits::default()
        })
    }
}

impl MeshArgs {
    fn net(&self, key: libp2p::identity::Keypair) -> anyhow::Result<NetConfig> {
        let mut n = NetConfig::new(key);
        n.listen = if self.listen.is_empty() {
            vec![
                "/ip4/0.0.0.0/tcp/0".parse()?,
                "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
            ]
        } else {
            self.listen.clone()
        };
        n.bootstrap = self.bootstrap.clone();
        n.mdns = self.mdns;
        n.dht = !self.no_dht;
        n.gossip = !self.no_gossip;
        if self.peers_high == 0 || self.peers_low > self.peers_high {
            anyhow::bail!(
                "--peers-high must be above 0 and --peers-low at most --peers-high (got {} and {})",
                self.peers_high,
                self.peers_low
            );
        }
        n.peers_high = self.peers_high;
        n.peers_low = self.peers_low;
        n.relays = self.relay.clone();
        if self.relay_server {
            n.relay_server = Some(self.limits.limits()?);
        }
        Ok(n)
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write a new ed25519 identity (mode 0600) and print its PeerId.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long, env = "TROOP_IDENTITY_OUT")]
        out: PathBuf,
    },
    /// Serve a local model server (Ollama or OpenAI-compatible) to the mesh and earn credits.
    Worker {
        /// Identity file from `troop keygen`.
        #[arg(long, env = "TROOP_IDENTITY")]
        identity: PathBuf,
        /// Coordinator URL, e.g. http://127.0.0.1:7070.
        #[arg(long, env = "TROOP_COORDINATOR")]
        coordinator: String,
        /// Model server URL, e.g. http://127.0.0.1:11434 (Ollama) or http://127.0.0.1:8081 (llama-server).
        #[arg(long, env = "TROOP_UPSTREAM")]
        upstream: String,
        /// Upstream dialect; probed when not given.
        #[arg(long, env = "TROOP_UPSTREAM_DIALECT", value_enum)]
        dialect: Option<Dialect>,
        /// The GGUF file the model server loaded, when it runs on another
        /// machine (a local copy): its SHA-256 is advertised as the model's
        /// digest. By default the worker hashes the file llama.cpp's /props
        /// names; Ollama names its own blob.
        #[arg(long, env = "TROOP_MODEL_FILE", value_name = "PATH")]
        model_file: Option<PathBuf>,
        /// Most jobs at once; more get `busy`.
        #[arg(long, env = "TROOP_MAX_JOBS", default_value_t = 64)]
        max_jobs: usize,
        /// Do not ask the model server for each token's logprobs (the
        /// signed evidence of what was served that gateways check and
        /// audits compare). For servers that refuse `logprobs`; answers
        /// then carry no evidence.
        #[arg(long, env = "TROOP_NO_EVIDENCE")]
        no_evidence: bool,
        /// Folder for queued receipts (default: next to the identity file).
        #[arg(long, env = "TROOP_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Seconds between gossip adverts.
        #[arg(long, env = "TROOP_ADVERT_INTERVAL_SECS", default_value_t = 3.0)]
        advert_interval: f64,
        /// Seconds between heartbeats to the coordinator.
        #[arg(long, env = "TROOP_HEARTBEAT_INTERVAL_SECS", default_value_t = 20.0)]
        heartbeat_interval: f64,
        /// Seconds without a request after which a session is closed and its
        /// receipt filed (also at its ticket's expiry or when its time is used up).
        #[arg(long, env = "TROOP_SESSION_IDLE_SECS", default_value_t = 30.0)]
        session_idle_secs: f64,
        /// Seconds the model server may fail its model listing (checked
        /// every 15 s) before the worker withdraws its
        /// adverts (gateways and the coordinator stop sending it work); it
        /// advertises again by itself once the server answers.
        #[arg(long, env = "TROOP_UPSTREAM_GONE_SECS", default_value_t = 60.0)]
        upstream_gone_secs: f64,
        /// Seconds the upstream may take to send the first event of a
        /// streamed answer (raise it for big models that load on first use).
        #[arg(long, env = "TROOP_FIRST_TOKEN_TIMEOUT_SECS", default_value_t = 30.0)]
        first_token_timeout_secs: f64,
        /// Seconds the upstream may go silent between two events of a
        /// streamed answer before the job is failed and the upstream dropped.
        #[arg(long, env = "TROOP_CHUNK_TIMEOUT_SECS", default_value_t = 30.0)]
        chunk_timeout_secs: f64,
        /// Seconds a whole job may take, streamed or not.
        #[arg(long, env = "TROOP_INFERENCE_TIMEOUT_SECS", default_value_t = 300.0)]
        inference_timeout_secs: f64,
        /// On SIGTERM or Ctrl-C: seconds running requests get to finish
        /// (new ones go to other workers) before they are cut off; a second
        /// signal stops at once.
        #[arg(long, env = "TROOP_DRAIN_SECS", default_value_t = 30.0)]
        drain_secs: f64,
        /// Prove the hardware with a matmul benchmark at start (also RUN_INITIAL_BENCHMARK=true).
        #[arg(long, env = "RUN_INITIAL_BENCHMARK")]
        benchmark: bool,
        /// Backend for that proof (and for re-proofs the coordinator asks
        /// for): auto picks a discrete GPU, then an integrated one, else the
        /// CPU, never a software adapter (llvmpipe); cpu; wgpu (the best
        /// adapter found, software ones included; in the default build);
        /// cuda needs a build with --features cuda. A GPU that fails falls
        /// back to the CPU.
        #[arg(long, env = "TROOP_BENCH_BACKEND", default_value = "auto")]
        bench_backend: troop_bench_kernels::Backend,
        /// Address of the worker's status page, /troop/status and /metrics
        /// (keep it on loopback: it shows earnings; port 0 picks a free one).
        #[arg(long, env = "TROOP_HTTP", default_value = "127.0.0.1:9464")]
        http: SocketAddr,
        /// Host name the status page answers to besides localhost and the
        /// --http address (repeatable), e.g. gpu-box.lan; requests naming
        /// another host are refused (403), so no web page can read it by
        /// pointing its own name at this machine (DNS rebinding).
        #[arg(
            long = "allowed-host",
            env = "TROOP_ALLOWED_HOSTS",
            value_delimiter = ','
        )]
        allowed_hosts: Vec<String>,
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Serve the OpenAI API on localhost, answered by workers on the mesh.
    Gateway {
        /// Identity file from `troop keygen`: your account (its PeerId) pays
        /// for the answers.
        #[arg(long, env = "TROOP_IDENTITY")]
        identity: PathBuf,
        /// Coordinator URL, e.g. http://127.0.0.1:7070 (it sells the tickets
        /// and its /bootstrap lists peers to join through).
        #[arg(long, env = "TROOP_COORDINATOR")]
        coordinator: String,
        /// Address for the OpenAI-compatible HTTP API, the console at `/` and
        /// /metrics (keep it on loopback: whoever reaches it spends your credits).
        #[arg(long, env = "TROOP_HTTP", default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Browser origins allowed to call the API (CORS), e.g.
        /// https://app.example.com (repeatable; `*` allows any). Pages on
        /// localhost, 127.0.0.1 and [::1] are always allowed.
        #[arg(
            long = "cors-origin",
            env = "TROOP_CORS_ORIGINS",
            value_delimiter = ','
        )]
        cors_origins: Vec<String>,
        /// Host name the API answers to besides localhost and the --http
        /// address (repeatable), e.g. gpu-box.lan; requests naming another
        /// host are refused (403), so no web page can spend your credits by
        /// pointing its own name at this machine (DNS rebinding).
        #[arg(
            long = "allowed-host",
            env = "TROOP_ALLOWED_HOSTS",
            value_delimiter = ','
        )]
        allowed_hosts: Vec<String>,
        /// Do not continue an answer on another worker when its worker is
        /// lost mid-stream (the app then gets a `worker_lost` error event).
        #[arg(long)]
        no_resume: bool,
        /// Do not have this gateway's answers audited. By default a share
        /// of answers (every one of a new worker's first 20, then fewer,
        /// down to 2 %) is re-scored by another worker serving the same
        /// weights, which sees the prompt; a worker caught serving other
        /// weights gets no more requests. Without audits, that protection
        /// is gone.
        #[arg(long, env = "TROOP_NO_AUDIT")]
        no_audit: bool,
        /// For a model no worker has advertised yet, ask the coordinator
        /// for its workers (`GET /bootstrap?model=`) when the DHT has not
        /// answered within this many milliseconds (0: at once).
        #[arg(long, env = "TROOP_COORDINATOR_LOOKUP_MS", default_value_t = 500)]
        coordinator_lookup_ms: u64,
        /// Find workers through the mesh only (gossip and the DHT), never
        /// through the coordinator's list.
        #[arg(long, conflicts_with = "coordinator_lookup_ms")]
        no_coordinator_lookup: bool,
        /// Workers used last whose connections stay open while idle.
        #[arg(long, env = "TROOP_WARM_WORKERS", default_value_t = gateway::WARM_WORKERS)]
        warm_workers: usize,
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Run a public relay: DHT server, gossip peer, bootstrap node and circuit
    /// relay v2 for workers and gateways behind NAT.
    Relay {
        /// Identity file from `troop keygen` (keep it: the PeerId is in everyone's --bootstrap).
        #[arg(long, env = "TROOP_IDENTITY")]
        identity: PathBuf,
        /// Multiaddr to listen on (repeatable). Default: /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1.
        #[arg(long = "listen", env = "TROOP_LISTEN", value_delimiter = ',')]
        listen: Vec<Multiaddr>,
        /// Other nodes to join through, ending in /p2p/<PeerId> (repeatable).
        #[arg(long = "bootstrap", env = "TROOP_BOOTSTRAP", value_delimiter = ',')]
        bootstrap: Vec<Multiaddr>,
        /// Public address of this relay when it listens on 0.0.0.0 or behind a
        /// port forward, e.g. /ip4/203.0.113.7/tcp/4001 (repeatable).
        #[arg(long = "external", env = "TROOP_EXTERNAL", value_delimiter = ',')]
        external: Vec<Multiaddr>,
        #[command(flatten)]
        limits: RelayLimitArgs,
    },
    /// Run a whole mesh on loopback over two real models: coordinator, a worker for each, a gateway.
    Demo {
        /// Answer one question, print the ledger lines and exit.
        #[arg(long)]
        once: bool,
        /// The question to ask the chat model (SmolLM2-135M-Instruct).
        #[arg(long, default_value = "Name three colors.")]
        question: String,
        /// Address for the gateway's OpenAI API.
        #[arg(long, env = "TROOP_HTTP", default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Python of the virtual environment with xllamacpp and the model packages (scripts/setup-model).
        #[arg(long, env = "TROOP_PYTHON", default_value = ".venv/bin/python")]
        python: PathBuf,
        /// The model server script.
        #[arg(
            long,
            env = "TROOP_MODEL_SERVER",
            default_value = "scripts/model_server.py"
        )]
        model_server: PathBuf,
        /// Folder for keys, ledger and logs (emptied first).
        #[arg(long, default_value = "./data/demo")]
        data: PathBuf,
    },
    /// Time a verifiable matmul (the proof of hardware) on this machine.
    Bench {
        /// Matrix size n (n x n).
        #[arg(long, default_value_t = 4096)]
        size: usize,
        /// Chained rounds (each maps C back to small integers and multiplies by B again).
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// Challenge seed, 64 hex digits (random when not given).
        #[arg(long)]
        seed: Option<String>,
        /// auto (a discrete GPU, then an integrated one, else the CPU; never
        /// a software adapter), cpu (burn Flex), wgpu (Vulkan, Metal or
        /// DX12 on the best adapter found, llvmpipe included) or cuda (a
        /// build with --features cuda).
        #[arg(long, env = "TROOP_BENCH_BACKEND", default_value = "auto")]
        backend: troop_bench_kernels::Backend,
        /// Print one JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the models on the mesh with their workers, queue depth and TTFT.
    /// Exits 1 when no model is found.
    Models {
        /// A node to join through, ending in /p2p/<PeerId> (repeatable);
        /// without it the coordinator's /bootstrap is asked.
        #[arg(long = "bootstrap", env = "TROOP_BOOTSTRAP", value_delimiter = ',')]
        bootstrap: Vec<Multiaddr>,
        /// Coordinator URL, e.g. http://127.0.0.1:7070: its /bootstrap lists
        /// peers to join through when --bootstrap is not given.
        #[arg(long, env = "TROOP_COORDINATOR")]
        coordinator: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Seconds to listen for adverts.
        #[arg(long, default_value_t = 4.0)]
        wait: f64,
    },
    /// Check the node on this machine (through its status address) and what
    /// the mesh sees: listen addresses, NAT, relay, peers, workers,
    /// coordinator. Exits 1 when a check fails.
    Doctor {
        /// A node to join through, ending in /p2p/<PeerId> (repeatable);
        /// without it the coordinator's /bootstrap is asked.
        #[arg(long = "bootstrap", env = "TROOP_BOOTSTRAP", value_delimiter = ',')]
        bootstrap: Vec<Multiaddr>,
        /// Coordinator URL, e.g. http://127.0.0.1:7070 (default: the one the
        /// node on this machine uses).
        #[arg(long, env = "TROOP_COORDINATOR")]
        coordinator: Option<String>,
        /// Status address of the node to check, e.g. http://127.0.0.1:9464
        /// (repeatable; default: a worker on 127.0.0.1:9464 and a gateway on
        /// 127.0.0.1:8080, whichever answers).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// A relay to reserve a slot on, ending in /p2p/<PeerId> (repeatable).
        #[arg(long = "relay", env = "TROOP_RELAY", value_delimiter = ',')]
        relay: Vec<Multiaddr>,
        /// Seconds to watch the mesh (behind NAT, give AutoNAT and hole punching ~10 s).
        #[arg(long, default_value_t = 5.0)]
        wait: f64,
    },
    /// Your own balance and signed history, read with your key (a
    /// reservation's line shows what came back when it settled).
    Account {
        /// Identity file from `troop keygen` (the account is its PeerId).
        #[arg(long, env = "TROOP_IDENTITY")]
        identity: PathBuf,
        /// Coordinator URL, e.g. http://127.0.0.1:7070.
        #[arg(long, env = "TROOP_COORDINATOR")]
        coordinator: String,
        /// Print the coordinator's JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Checks a URL flag at start: an `http://` or `https://` URL with a host,
/// or an error that says what was expected and how to write it.
fn http_url(flag: &str, value: &str) -> anyhow::Result<String> {
    let v = value.trim();
    let fix = if v.contains("://") {
        String::new()
    } else {
        format!(" (write http://{v})")
    };
    match reqwest::Url::parse(v) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(v.to_string()),
        _ => anyhow::bail!(
            "{flag} {value:?} is not an http:// or https:// URL{fix}, e.g. {flag} http://127.0.0.1:7070"
        ),
    }
}

fn secs(v: f64, name: &str) -> anyhow::Result<Duration> {
    if v.is_finite() && v > 0.0 && v < 86_400.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        anyhow::bail!("{name} must be a number of seconds above 0")
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn read_identity(path: &std::path::Path) -> anyhow::Result<libp2p::identity::Keypair> {
    troop_protocol::identity::read_keypair(path).with_context(|| {
        if path.exists() {
            let pem = std::fs::read(path).is_ok_and(|b| b.starts_with(b"-----BEGIN"));
            format!(
                "{} is {} not a key file written by `troop keygen` (its own format; keep that file and make a troop identity at another path: `troop keygen --out ~/.troop/node.key`)",
                path.display(),
                if pem { "a PEM file," } else { "" }
            )
        } else {
            format!(
                "reading the identity (make one with `troop keygen --out {}`)",
                path.display()
            )
        }
    })
}

/// Ctrl-C (SIGINT) or, on Unix, SIGTERM (systemd, docker stop, kill).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Keygen { out } => {
            let key = troop_protocol::identity::generate();
            troop_protocol::identity::write_keypair(&out, &key)?;
            println!("{}", key.public().to_peer_id());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Worker {
            identity,
            coordinator,
            upstream,
            dialect,
            model_file,
            max_jobs,
            no_evidence,
            state_dir,
            advert_interval,
            heartbeat_interval,
            session_idle_secs,
            upstream_gone_secs,
            first_token_timeout_secs,
            chunk_timeout_secs,
            inference_timeout_secs,
            drain_secs,
            benchmark,
            bench_backend,
            http,
            allowed_hosts,
            mesh,
        } => {
            let coordinator = http_url("--coordinator", &coordinator)?;
            let upstream = http_url("--upstream", &upstream)?;
            let root = troop_node::upstream::server_root(&upstream);
            if root != upstream.trim_end_matches('/') {
                tracing::info!(upstream = %root, given = %upstream, "using the model server's root (the worker adds /v1 itself)");
            }
            let key = read_identity(&identity)?;
            let peer = key.public().to_peer_id();
            let state_dir = state_dir.unwrap_or_else(|| {
                identity
                    .parent()
                    .map(|p| p.join(format!("worker-{peer}")))
                    .unwrap_or_else(|| PathBuf::from(format!("worker-{peer}")))
            });
            let mut cfg =
                worker::WorkerConfig::new(key.clone(), &coordinator, &upstream, state_dir);
            cfg.dialect = dialect;
            cfg.model_file = model_file;
            cfg.max_jobs = max_jobs.max(1);
            cfg.evidence = !no_evidence;
            cfg.advert_interval = secs(advert_interval, "--advert-interval")?;
            cfg.heartbeat_interval = secs(heartbeat_interval, "--heartbeat-interval")?;
            cfg.session_idle = secs(session_idle_secs, "--session-idle-secs")?;
            cfg.upstream_gone_after = secs(upstream_gone_secs, "--upstream-gone-secs")?;
            cfg.timeouts = troop_node::answer::StreamTimeouts {
                first_token: secs(first_token_timeout_secs, "--first-token-timeout-secs")?,
                between_chunks: secs(chunk_timeout_secs, "--chunk-timeout-secs")?,
                total: secs(inference_timeout_secs, "--inference-timeout-secs")?,
            };
            cfg.net = mesh.net(key)?;
            cfg.http = Some(http);
            cfg.allowed_hosts = allowed_hosts;
            if benchmark {
                cfg.benchmark = Some(bench_backend);
            }
            tracing::info!(peer_id = %peer, "starting worker");
            let drain = secs(drain_secs, "--drain-secs")?;
            let w = worker::start(cfg).await?;
            tracing::info!(
                "worker ready (stop with Ctrl-C or SIGTERM: it leaves the mesh and finishes its requests)"
            );
            stop_signal().await;
            tracing::info!(
                drain_secs = drain.as_secs_f64(),
                "stopping: leaving the mesh, finishing running requests (signal again to stop at once)"
            );
            tokio::select! {
                _ = w.stop(drain) => {},
                _ = stop_signal() => tracing::warn!("second signal: stopping at once"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Relay {
            identity,
            listen,
            bootstrap,
            external,
            limits,
        } => {
            let key = read_identity(&identity)?;
            let peer = key.public().to_peer_id();
            let mut n = NetConfig::new(key);
            n.listen = if listen.is_empty() {
                vec![
                    "/ip4/0.0.0.0/tcp/4001".parse()?,
                    "/ip4/0.0.0.0/udp/4001/quic-v1".parse()?,
                ]
            } else {
                listen
            };
            n.bootstrap = bootstrap;
            n.external = external;
            n.relay_server = Some(limits.limits()?);
            n.relay_always = true;
            // Every joiner's first handshake lands here.
            n.max_pending_incoming = 512;
            let l = limits.limits()?;
            tracing::info!(
                peer_id = %peer,
                max_reservations = l.max_reservations,
                max_circuits = l.max_circuits,
                circuit_secs = l.max_circuit_duration.as_secs(),
                circuit_bytes = l.max_circuit_bytes,
                "starting relay"
            );
            let (net, _events) = troop_node::network::spawn(n).await?;
            stop_signal().await;
            tracing::info!("stopping");
            net.shutdown();
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gateway {
            identity,
            coordinator,
            http,
            cors_origins,
            allowed_hosts,
            no_resume,
            no_audit,
            coordinator_lookup_ms,
            no_coordinator_lookup,
            warm_workers,
            mesh,
        } => {
            let coordinator = http_url("--coordinator", &coordinator)?;
            let key = read_identity(&identity)?;
            tracing::info!(peer_id = %key.public().to_peer_id(), "starting gateway");
            let mut cfg = gateway::GatewayConfig::new(key.clone(), &coordinator, http);
            cfg.net = mesh.net(key)?;
            cfg.cors_origins = cors_origins;
            cfg.allowed_hosts = allowed_hosts;
            cfg.resume = !no_resume;
            cfg.audit = !no_audit;
            cfg.coordinator_lookup_after = (!no_coordinator_lookup)
                .then(|| std::time::Duration::from_millis(coordinator_lookup_ms));
            cfg.warm_workers = warm_workers;
            let g = gateway::start(cfg).await?;
            tokio::select! {
                _ = g.wait() => {},
                _ = stop_signal() => tracing::info!("stopping"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo {
            once,
            question,
            http,
            python,
            model_server,
            data,
        } => {
            troop_node::demo::run(troop_node::demo::DemoOptions {
                once,
                question,
                http,
                python,
                model_server,
                data,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench {
            size,
            rounds,
            seed,
            backend,
            json,
        } => {
            let seed: [u8; 32] = match seed {
                Some(h) => hex::decode(&h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| anyhow::anyhow!("--seed must be 64 hex digits"))?,
                None => {
                    use rand::RngCore;
                    let mut s = [0u8; 32];
                    rand::rng().fill_bytes(&mut s);
                    s
                }
            };
            let report = tokio::task::spawn_blocking(move || {
                troop_node::hardware::run_local(size, rounds, seed, backend, !json)
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                if report.adapters.is_empty() {
                    println!("adapters  none found (no Vulkan, Metal or DX12 driver)");
                }
                for (i, a) in report.adapters.iter().enumerate() {
                    let head = if i == 0 { "adapters" } else { "" };
                    println!("{head:<9} {a}");
                }
                if let Some(why) = &report.fallback {
                    println!("fallback  {why}");
                }
                match &report.adapter {
                    Some(a) => println!(
                        "backend   {} on {} ({} asked)",
                        report.backend, a.name, report.asked
                    ),
                    None => println!("backend   {} ({} asked)", report.backend, report.asked),
                }
                println!(
                    "size      {} x {}, {} round(s)",
                    report.n, report.n, report.rounds
                );
                println!(
                    "matmul    {:.3} s  ({:.1} GFLOP/s)",
                    report.matmul_seconds, report.gflops
                );
                println!(
                    "total     {:.3} s  (expansion, rounds, hashing)",
                    report.seconds
                );
                println!("root      {}", report.root);
                println!(
                    "verify    {} rows in {:.3} s ({:.1} % of proving)",
                    report.verify_rows,
                    report.verify_seconds,
                    report.verify_fraction * 100.0
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Models {
            bootstrap,
            coordinator,
            json,
            wait,
        } => {
            let coordinator = coordinator
                .map(|c| http_url("--coordinator", &c))
                .transpose()?;
            let wait = secs(wait, "--wait")?;
            let peers = commands::peers_to_join(bootstrap, coordinator.as_deref()).await?;
            let (rows, _) = commands::survey(peers, wait).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                commands::print_models(&rows);
            }
            if rows.is_empty() {
                eprintln!(
                    "no worker advert arrived in {:.0} s: is a worker running and reachable? (`troop doctor` checks; a longer --wait helps behind NAT)",
                    wait.as_secs_f64()
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Account {
            identity,
            coordinator,
            json,
        } => {
            let coordinator = http_url("--coordinator", &coordinator)?;
            let key = read_identity(&identity)?;
            commands::account(&coordinator, key, json).await
        }
        Cmd::Doctor {
            bootstrap,
            coordinator,
            nodes,
            relay,
            wait,
        } => {
            let coordinator = coordinator
                .map(|c| http_url("--coordinator", &c))
                .transpose()?;
            let nodes = nodes
                .iter()
                .map(|n| http_url("--node", n))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let checks =
                commands::doctor(bootstrap, relay, coordinator, nodes, secs(wait, "--wait")?)
                    .await?;
            let mut all_ok = true;
            for c in &checks {
                println!(
                    "[{}] {:<22} {}",
                    if c.ok { " ok " } else { "FAIL" },
                    c.name,
                    c.detail
                );
                if !c.ok {
                    all_ok = false;
                    println!("       -> {}", c.advice);
                }
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
