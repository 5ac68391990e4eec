//! The load of a 100,000-worker mesh against each store (issue 29):
//! SQLite, PostgreSQL with one replica, PostgreSQL with two replicas on one
//! database (a real server started by the bench, fsync on). Printed, never
//! asserted.
//!
//! 1x is what such a mesh asks of its coordinator each second:
//! * 5,000 heartbeats (every worker every 20 s, the default interval), signed,
//!   "still here" (same models and addresses);
//! * 333 session tickets (a session a worker every 5 minutes), signed;
//! * 333 session receipts (each session settled once, its request
//!   acknowledged by the user's signature), HMAC'd;
//! * 333 balance reads (a user's gateway once a session);
//! * 50 `GET /bootstrap?model=` (nodes starting or looking for a model).
//!
//! The table holds `WORKERS` workers (100,000), all alive, registered through
//! the ledger before the clock starts. Each multiple of the load is sent for
//! `STEP_SECS` (5) on a schedule (open loop: a request's latency counts from
//! when it was due, so a coordinator that falls behind shows it), rising
//! until a kind's p99 is over 50 ms or over 0.1 % fail; the highest multiple
//! under both is what the store sustains. Where the time goes: each kind's
//! p50/p99, and the CPU seconds per second of the coordinator's threads
//! (HTTP and reads), its ledger writer, PostgreSQL's processes and the load
//! generator itself, which shares the machine's cores with them.
//!
//! `cargo bench -p troop-coordinator --bench internet` (env: WORKERS,
//! STEP_SECS, MULTIPLES as `0.1,0.2,...`, STORES as `sqlite,pg1,pg2`,
//! FLUSH_SECS for `--heartbeat-flush-secs`).

#[path = "../tests/common/mod.rs"]
mod common;

use common::pg;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestCoordinator, env_usize, now_secs, receipt_for};
use futures::StreamExt;
use libp2p_identity::Keypair;
use rand::Rng;
use troop_coordinator::ledger::{Command, Outcome};
use troop_protocol::api::AuthorizeResponse;
use troop_protocol::identity::generate;
use troop_protocol::receipt::{HEADER_RECEIPT_MAC, HEADER_TIMESTAMP, sign_receipt};
use troop_protocol::signed::sign_request;

/// The mesh the multiples are of.
const MESH_WORKERS: f64 = 100_000.0;
/// A kind's p99 above this fails the step.
const P99_LIMIT_MS: f64 = 50.0;
/// A step with more failed requests than this share fails.
const ERROR_LIMIT: f64 = 0.001;
const MODEL: &str = "m";

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Heartbeat,
    Ticket,
    Receipt,
    Balance,
    Bootstrap,
}

const KINDS: [Kind; 5] = [
    Kind::Heartbeat,
    Kind::Ticket,
    Kind::Receipt,
    Kind::Balance,
    Kind::Bootstrap,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Heartbeat => "heartbeat",
            Kind::Ticket => "ticket",
            Kind::Receipt => "receipt",
            Kind::Balance => "balance",
            Kind::Bootstrap => "bootstrap",
        }
    }

    /// Requests a second at 1x.
    fn base_rate(self) -> f64 {
        match self {
            Kind::Heartbeat => MESH_WORKERS / 20.0,
            Kind::Ticket | Kind::Receipt | Kind::Balance => MESH_WORKERS / 300.0,
            Kind::Bootstrap => MESH_WORKERS / 2_000.0,
        }
    }
}

/// The public address a simulated party calls from (each its own, as on
/// the internet: the coordinator sits behind a trusted proxy that says so
/// in `X-Forwarded-For`, so per-IP quotas and `/bootstrap`'s per-IP cap
/// see many IPs, not 127.0.0.1). Only ever a header's text: no traffic
/// goes to it.
fn ip(party: u32, i: usize) -> String {
    let i = i as u32;
    format!(
        "{}.{}.{}.{}",
        11 + party,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}
const WORKER_IPS: u32 = 0;
const USER_IPS: u32 = 1;
const OTHER_IPS: u32 = 2;

/// A registered worker: its key and the HMAC key its receipts are signed with.
struct Worker {
    key: Keypair,
    peer: String,
    receipt_key: Vec<u8>,
}

/// Users, made as tickets need them (12 tickets each, within starter credits).
#[derive(Default)]
struct Users {
    keys: Vec<Keypair>,
    tickets: usize,
}

impl Users {
    fn for_ticket(&mut self) -> usize {
        if self.tickets.is_multiple_of(12) {
            self.keys.push(generate());
        }
        self.tickets += 1;
        self.keys.len() - 1
    }
}

/// A granted ticket, waiting to be settled: (user, worker, job id).
type Granted = (usize, usize, String);

struct Mesh {
    workers: Vec<Worker>,
    users: Mutex<Users>,
    granted: Mutex<VecDeque<Granted>>,
    /// Users with an account (a ticket granted): 0..known.
    known: AtomicUsize,
    /// The replicas' base URLs; requests go round-robin.
    urls: Vec<String>,
    http: reqwest::Client,
}

/// One request, built (and signed) before its step starts.
enum Op {
    Heartbeat {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        worker: usize,
    },
    Ticket {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        user: usize,
        worker: usize,
    },
    Receipt,
    Balance,
    Bootstrap {
        caller: usize,
    },
}

impl Op {
    fn kind(&self) -> Kind {
        match self {
            Op::Heartbeat { .. } => Kind::Heartbeat,
            Op::Ticket { .. } => Kind::Ticket,
            Op::Receipt => Kind::Receipt,
            Op::Balance => Kind::Balance,
            Op::Bootstrap { .. } => Kind::Bootstrap,
        }
    }
}

fn signed_headers(key: &Keypair, path: &str, body: &[u8], ts: u64) -> Vec<(String, String)> {
    sign_request(key, "POST", path, body, ts)
        .pairs()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What one step measured.
#[derive(Default)]
struct Step {
    multiple: f64,
    sent: usize,
    secs: f64,
    /// Latency from when each request was due, in microseconds, per kind.
    latencies: HashMap<Kind, Vec<u64>>,
    errors: HashMap<Kind, usize>,
    first_error: Option<String>,
    /// Receipts and balance reads not sent: no granted ticket yet.
    no_ticket: usize,
    cpu: Cpu,
}

impl Step {
    fn pct(&self, kind: Kind, q: f64) -> f64 {
        percentile(self.latencies.get(&kind).map_or(&[][..], |v| v), q)
    }

    fn worst_p99(&self) -> (Kind, f64) {
        KINDS
            .iter()
            .map(|k| (*k, self.pct(*k, 0.99)))
            .fold((Kind::Heartbeat, 0.0), |a, b| if b.1 > a.1 { b } else { a })
    }

    fn error_share(&self) -> f64 {
        self.errors.values().sum::<usize>() as f64 / self.sent.max(1) as f64
    }

    fn passed(&self) -> bool {
        self.worst_p99().1 <= P99_LIMIT_MS && self.error_share() <= ERROR_LIMIT
    }
}

/// Milliseconds at quantile `q` of microsecond samples.
fn percentile(samples: &[u64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i] as f64 / 1000.0
}

/// CPU seconds used, by part.
#[derive(Default, Clone, Copy)]
struct Cpu {
    coordinator: f64,
    writer: f64,
    load: f64,
    other: f64,
    postgres: f64,
}

impl Cpu {
    fn now() -> Self {
        let mut c = Cpu::default();
        let tick = 100.0; // USER_HZ on Linux
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                let Some((comm, secs)) = proc_cpu(&t.path(), tick) else {
                    continue;
                };
                if comm.starts_with("coord-rt") {
                    c.coordinator += secs;
                } else if comm.starts_with("ledger-writer") {
                    c.writer += secs;
                } else if comm.starts_with("load-rt") {
                    c.load += secs;
                } else {
                    c.other += secs;
                }
            }
        }
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                if let Some((comm, secs)) = proc_cpu(&p.path(), tick)
                    && comm == "postgres"
                {
                    c.postgres += secs;
                }
            }
        }
        c
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            coordinator: self.coordinator - before.coordinator,
            writer: self.writer - before.writer,
            load: self.load - before.load,
            other: self.other - before.other,
            postgres: self.postgres - before.postgres,
        }
    }
}

/// A process's or thread's name and its user + system CPU seconds.
fn proc_cpu(dir: &std::path::Path, tick: f64) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) / tick))
}

/// Starts a coordinator on the coordinator's runtime.
fn start(
    rt: &tokio::runtime::Runtime,
    database: Option<String>,
    key: Option<std::path::PathBuf>,
    name: &str,
) -> TestCoordinator {
    let name = name.to_string();
    rt.block_on(TestCoordinator::start_with(move |cfg| {
        cfg.database = database;
        cfg.key_file = key;
        cfg.replica_name = Some(name);
        // Every seeded worker stays alive through the run, as in a mesh
        // whose workers all beat every 20 s.
        cfg.worker_ttl = Duration::from_secs(6 * 3600);
        cfg.trusted_proxy = true;
        // Every party has its own IP and key: quotas as generous as a
        // second's worth of the heaviest load, so that none refuses.
        cfg.authorize_per_hour = 1_000_000;
        cfg.authorize_per_ip_per_hour = 1_000_000;
        cfg.discovery_per_hour = 1_000_000;
        cfg.account_reads_per_hour = 1_000_000;
        cfg.registrations_per_ip_per_hour = 1_000_000;
        cfg.sweep_interval = Duration::from_secs(1);
        cfg.conn_limits.max_per_ip = 1_000_000;
        // `--heartbeat-flush-secs` (PostgreSQL), `FLUSH_SECS` to try others.
        if let Some(s) = std::env::var("FLUSH_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
        {
            cfg.heartbeat_flush = Duration::from_secs_f64(s);
        }
    }))
}

/// Registers `n` workers through the first replica's ledger writer (no
/// HTTP: the registrations are the set-up, not the load) and waits until
/// every replica lists them.
fn seed(
    rt: &tokio::runtime::Runtime,
    replicas: &[TestCoordinator],
    keys: &[Keypair],
) -> Vec<Worker> {
    let state = replicas[0].running.as_ref().expect("running").state.clone();
    let t0 = Instant::now();
    let workers: Vec<Worker> = rt.block_on(async {
        futures::stream::iter(keys.iter().enumerate())
            .map(|(i, key)| {
                let state = state.clone();
                let key = key.clone();
                async move {
                    let peer = key.public().to_peer_id().to_base58();
                    let mut secret = [0u8; 32];
                    rand::rng().fill(&mut secret);
                    let out = state
                        .writer
                        .submit(
                            Command::RegisterWorker {
                                peer_id: peer.clone(),
                                models: vec![MODEL.into()],
                                addresses: vec![format!("/ip4/{}/tcp/4001", ip(WORKER_IPS, i))],
                                version: None,
                                new_key: secret,
                                now_secs: now_secs(),
                            },
                            None,
                        )
                        .await
                        .expect("registered through the writer");
                    let Outcome::Worker(row) = out else {
                        panic!("not a worker row");
                    };
                    let receipt_key = row.receipt_key.clone();
                    // As the registration handler does: in the table and
                    // in the bootstrap order.
                    state.put_worker(row);
                    Worker {
                        key,
                        peer,
                        receipt_key,
                    }
                }
            })
            .buffered(2048)
            .collect()
            .await
    });
    eprintln!(
        "  {} workers registered in {:.1} s",
        workers.len(),
        t0.elapsed().as_secs_f64()
    );
    for c in &replicas[1..] {
        let deadline = Instant::now() + Duration::from_secs(120);
        let state = &c.running.as_ref().expect("running").state;
        while state.workers.read().map_or(0, |m| m.len()) < workers.len() {
            assert!(
                Instant::now() < deadline,
                "another replica never listed every worker"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    workers
}

/// The ops of one step at `multiple`, each with when it is due.
fn plan(mesh: &Mesh, multiple: f64, secs: f64, beat: &mut usize) -> Vec<(Duration, Op)> {
    let mut rng = rand::rng();
    let start = now_secs();
    let mut ops: Vec<(Duration, Op)> = Vec::new();
    for kind in KINDS {
        let rate = kind.base_rate() * multiple;
        let n = (rate * secs).round() as usize;
        let phase: f64 = rng.random_range(0.0..1.0);
        for i in 0..n {
            let at = Duration::from_secs_f64((i as f64 + phase) / rate);
            // Signed for the second it goes out: a worker's next heartbeat
            // is newer than its last.
            let ts = start + at.as_secs();
            let op = match kind {
                Kind::Heartbeat => {
                    let worker = *beat % mesh.workers.len();
                    *beat += 1;
                    let body = br#"{"load":{"active_jobs":0,"queue_depth":0}}"#.to_vec();
                    let headers =
                        signed_headers(&mesh.workers[worker].key, "/workers/heartbeat", &body, ts);
                    Op::Heartbeat {
                        headers,
                        body,
                        worker,
                    }
                }
                Kind::Ticket => {
                    let worker = rng.random_range(0..mesh.workers.len());
                    let (user, key) = {
                        let mut u = mesh.users.lock().expect("users");
                        let i = u.for_ticket();
                        (i, u.keys[i].clone())
                    };
                    let body = serde_json::to_vec(&serde_json::json!({
                        "model": MODEL,
                        "worker": mesh.workers[worker].peer,
                    }))
                    .expect("json");
                    let headers = signed_headers(&key, "/authorize", &body, ts);
                    Op::Ticket {
                        headers,
                        body,
                        user,
                        worker,
                    }
                }
                Kind::Receipt => Op::Receipt,
                Kind::Balance => Op::Balance,
                Kind::Bootstrap => Op::Bootstrap {
                    caller: rng.random_range(0..1 << 20),
                },
            };
            ops.push((at, op));
        }
    }
    ops.sort_by_key(|(at, _)| *at);
    ops
}

/// Sends one op; `Ok(())` on the answer expected, else what came instead.
async fn send(mesh: &Mesh, url: &str, op: Op) -> Result<(), String> {
    let post = |path: &str, headers: Vec<(String, String)>, body: Vec<u8>, from: String| {
        let mut req = mesh
            .http
            .post(format!("{url}{path}"))
            .header("content-type", "application/json")
            .header("x-forwarded-for", from)
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req
    };
    let is_bootstrap = matches!(op, Op::Bootstrap { .. });
    let resp = match op {
        Op::Heartbeat {
            headers,
            body,
            worker,
        } => {
            post("/workers/heartbeat", headers, body, ip(WORKER_IPS, worker))
                .send()
                .await
        }
        Op::Ticket {
            headers,
            body,
            user,
            worker,
        } => {
            let r = post("/authorize", headers, body, ip(USER_IPS, user))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if r.status() != 200 {
                return Err(format!(
                    "ticket: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ));
            }
            let a: AuthorizeResponse = r.json().await.map_err(|e| e.to_string())?;
            mesh.known.fetch_max(user + 1, Ordering::Relaxed);
            if let Ok(mut g) = mesh.granted.lock() {
                g.push_back((user, worker, a.job_id));
            }
            return Ok(());
        }
        Op::Receipt => {
            let Some((user, worker, job)) =
                mesh.granted.lock().ok().and_then(|mut g| g.pop_front())
            else {
                return Err("no ticket".into());
            };
            let w = &mesh.workers[worker];
            let key = mesh.users.lock().map_err(|e| e.to_string())?.keys[user].clone();
            let receipt = receipt_for(&job, &key, &w.key, MODEL, 1500);
            let body = serde_json::to_vec(&receipt).expect("json");
            let ts = now_secs();
            let mac = sign_receipt(&w.receipt_key, ts, &body);
            mesh.http
                .post(format!("{url}/transactions/submit"))
                .header("content-type", "application/json")
                .header(HEADER_TIMESTAMP, ts.to_string())
                .header(HEADER_RECEIPT_MAC, mac)
                .header("x-forwarded-for", ip(WORKER_IPS, worker))
                .body(body)
                .send()
                .await
        }
        Op::Balance => {
            // A user whose account exists (a ticket was granted to it).
            let known = mesh.known.load(Ordering::Relaxed);
            if known == 0 {
                return Err("no ticket".into());
            }
            let i = rand::rng().random_range(0..known);
            let user = mesh.users.lock().map_err(|e| e.to_string())?.keys[i]
                .public()
                .to_peer_id();
            mesh.http
                .get(format!("{url}/users/{user}/balance"))
                .header("x-forwarded-for", ip(USER_IPS, i))
                .send()
                .await
        }
        Op::Bootstrap { caller } => {
            mesh.http
                .get(format!("{url}/bootstrap?model={MODEL}"))
                .header("x-forwarded-for", ip(OTHER_IPS, caller))
                .send()
                .await
        }
    };
    let r = resp.map_err(|e| e.to_string())?;
    let status = r.status();
    // Read the whole answer: its bytes are part of the cost.
    let text = r.text().await.map_err(|e| e.to_string())?;
    if status == 200 {
        // A bootstrap that finds no worker among 100,000 live ones is wrong,
        // however fast.
        if is_bootstrap && !text.contains("\"peer_id\"") {
            return Err(format!("bootstrap listed no worker: {text:.200}"));
        }
        Ok(())
    } else {
        Err(format!(
            "{status}: {}",
            text.chars().take(200).collect::<String>()
        ))
    }
}

fn run_step(
    load: &tokio::runtime::Runtime,
    mesh: &Arc<Mesh>,
    multiple: f64,
    secs: f64,
    beat: &mut usize,
) -> Step {
    let ops = plan(mesh, multiple, secs, beat);
    let sent = ops.len();
    let cpu0 = Cpu::now();
    let t0 = Instant::now();
    let results: Vec<(Kind, Duration, u64, Result<(), String>)> = load.block_on(async {
        let start = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (at, op)) in ops.into_iter().enumerate() {
            tokio::time::sleep_until(start + at).await;
            let mesh = mesh.clone();
            let url = mesh.urls[i % mesh.urls.len()].clone();
            tasks.spawn(async move {
                let kind = op.kind();
                let r = send(&mesh, &url, op).await;
                let due = start + at;
                (kind, at, due.elapsed().as_micros() as u64, r)
            });
        }
        let mut out = Vec::with_capacity(sent);
        while let Some(r) = tasks.join_next().await {
            if let Ok(r) = r {
                out.push(r);
            }
        }
        out
    });
    let secs_taken = t0.elapsed().as_secs_f64();
    let mut step = Step {
        multiple,
        sent,
        secs: secs_taken,
        cpu: Cpu::now().since(cpu0),
        ..Default::default()
    };
    // TIMELINE=1: the slowest request due in each 100 ms, per kind (when
    // the time goes all at once, it shows as a row of high figures).
    let mut timeline: std::collections::BTreeMap<u64, HashMap<Kind, u64>> = Default::default();
    for (kind, at, micros, r) in results {
        let slot = timeline.entry(at.as_millis() as u64 / 100).or_default();
        let worst = slot.entry(kind).or_default();
        *worst = (*worst).max(micros);
        match r {
            Ok(()) => step.latencies.entry(kind).or_default().push(micros),
            Err(e) if e == "no ticket" => step.no_ticket += 1,
            Err(e) => {
                *step.errors.entry(kind).or_default() += 1;
                step.first_error
                    .get_or_insert(format!("{}: {e}", kind.name()));
            }
        }
    }
    if std::env::var("TIMELINE").is_ok() {
        for (slot, worst) in &timeline {
            let row: Vec<String> = KINDS
                .iter()
                .map(|k| {
                    format!(
                        "{} {:.0}",
                        k.name(),
                        *worst.get(k).unwrap_or(&0) as f64 / 1000.0
                    )
                })
                .collect();
            eprintln!("    {:>5.1} s: {}", *slot as f64 / 10.0, row.join(", "));
        }
    }
    step
}

fn print_step(store: &str, s: &Step) {
    let (worst, p99) = s.worst_p99();
    let per_s = |x: f64| x / s.secs;
    println!(
        "| {store} | {:.2}x | {:.0} | {} | {:.1} ({}) | {:.2} % | {:.2} / {:.2} / {:.2} / {:.2} / {:.2} | {} |",
        s.multiple,
        s.sent as f64 / s.secs,
        KINDS
            .iter()
            .map(|k| format!("{:.1}/{:.1}", s.pct(*k, 0.5), s.pct(*k, 0.99)))
            .collect::<Vec<_>>()
            .join(" "),
        p99,
        worst.name(),
        s.error_share() * 100.0,
        per_s(s.cpu.coordinator),
        per_s(s.cpu.writer),
        per_s(s.cpu.postgres),
        per_s(s.cpu.load),
        per_s(s.cpu.other),
        if s.passed() { "yes" } else { "no" },
    );
    if let Some(e) = &s.first_error {
        eprintln!("    first error: {e}");
    }
    if s.no_ticket > 0 {
        eprintln!(
            "    {} receipts or balance reads not sent: no granted ticket yet",
            s.no_ticket
        );
    }
}

fn main() {
    let workers = env_usize("WORKERS", 100_000);
    let secs = env_usize("STEP_SECS", 5) as f64;
    let multiples: Vec<f64> = std::env::var("MULTIPLES")
        .unwrap_or_else(|_| "0.1,0.2,0.3,0.5,0.75,1,1.5,2,3,4,6,8".into())
        .split(',')
        .filter_map(|m| m.trim().parse().ok())
        .collect();
    let stores_wanted = std::env::var("STORES").unwrap_or_else(|_| "sqlite,pg1,pg2".into());
    let coord = tokio::runtime::Builder::new_multi_thread()
        .thread_name("coord-rt")
        .thread_keep_alive(Duration::from_secs(24 * 3600))
        .enable_all()
        .build()
        .expect("runtime");
    let load = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load-rt")
        .enable_all()
        .build()
        .expect("runtime");
    let server = if stores_wanted.contains("pg") {
        let s = pg::PgServer::start();
        if s.is_none() {
            eprintln!("PostgreSQL is not installed: the PostgreSQL stores are skipped");
        }
        s
    } else {
        None
    };
    eprintln!("making {workers} worker keys");
    let keys: Vec<Keypair> = (0..workers).map(|_| generate()).collect();
    let mut results: Vec<(&str, Vec<Step>)> = Vec::new();
    for store in ["sqlite", "pg1", "pg2"] {
        if !stores_wanted.contains(store) {
            continue;
        }
        let (label, replicas): (&str, Vec<TestCoordinator>) = match (store, &server) {
            ("sqlite", _) => ("SQLite, 1 process", vec![start(&coord, None, None, "a")]),
            ("pg1", Some(s)) | ("pg2", Some(s)) => {
                let url = s.create_db(&format!("internet_{store}"));
                let key = s.dir().join("ticket.pem");
                if !key.exists() {
                    troop_coordinator::tickets::TicketKeys::generate_to(&key).expect("keygen");
                }
                let n = if store == "pg1" { 1 } else { 2 };
                let label = if n == 1 {
                    "PostgreSQL, 1 replica"
                } else {
                    "PostgreSQL, 2 replicas"
                };
                (
                    label,
                    (0..n)
                        .map(|i| {
                            start(
                                &coord,
                                Some(url.clone()),
                                Some(key.clone()),
                                &format!("r{i}"),
                            )
                        })
                        .collect(),
                )
            }
            _ => continue,
        };
        eprintln!("==> {label}");
        let seeded = seed(&coord, &replicas, &keys);
        let mesh = Arc::new(Mesh {
            workers: seeded,
            users: Mutex::new(Users::default()),
            granted: Mutex::new(VecDeque::new()),
            known: AtomicUsize::new(0),
            urls: replicas.iter().map(|c| c.url.clone()).collect(),
            http: load.block_on(async {
                reqwest::Client::builder()
                    .pool_max_idle_per_host(4096)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .expect("client")
            }),
        });
        // Tickets granted ahead, for the first receipts to settle.
        let mut beat = 0usize;
        let warm = run_step(&load, &mesh, 0.05, 4.0, &mut beat);
        eprintln!(
            "  warm-up: {} requests, {} failed",
            warm.sent,
            warm.errors.values().sum::<usize>()
        );
        let mut steps = Vec::new();
        for m in &multiples {
            let s = run_step(&load, &mesh, *m, secs, &mut beat);
            eprintln!(
                "  {:.2}x: worst p99 {:.1} ms ({}), {:.2} % failed",
                m,
                s.worst_p99().1,
                s.worst_p99().0.name(),
                s.error_share() * 100.0
            );
            let passed = s.passed();
            steps.push(s);
            if !passed {
                break;
            }
        }
        results.push((label, steps));
        for mut c in replicas.into_iter().rev() {
            coord.block_on(c.stop());
        }
    }
    println!();
    println!(
        "internet load model: 1x = a {MESH_WORKERS}-worker mesh: {:.0} heartbeats/s, {:.0} tickets/s, {:.0} receipts/s, {:.0} balance reads/s, {:.0} /bootstrap/s; {workers} workers in the table; {secs} s a step; coordinator, PostgreSQL and load on one machine",
        Kind::Heartbeat.base_rate(),
        Kind::Ticket.base_rate(),
        Kind::Receipt.base_rate(),
        Kind::Balance.base_rate(),
        Kind::Bootstrap.base_rate(),
    );
    println!(
        "| store | multiple | requests/s | p50/p99 ms: heartbeat ticket receipt balance bootstrap | worst p99 ms | failed | CPU s/s: coordinator / ledger writer / PostgreSQL / load / other | sustained |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (label, steps) in &results {
        for s in steps {
            print_step(label, s);
        }
    }
    println!();
    println!(
        "| store | highest multiple sustained (every kind's p99 under {P99_LIMIT_MS} ms, under {} % failed) |",
        ERROR_LIMIT * 100.0
    );
    println!("|---|---|");
    for (label, steps) in &results {
        let best = steps
            .iter()
            .filter(|s| s.passed())
            .map(|s| s.multiple)
            .fold(f64::NAN, f64::max);
        let shown = if best.is_nan() {
            format!(
                "none (below {:.2}x)",
                multiples.first().copied().unwrap_or(0.0)
            )
        } else {
            format!("{best:.2}x")
        };
        println!("| {label} | {shown} |");
    }
}
