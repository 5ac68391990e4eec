//! Coordinator settings. Every value has the design's default and can be
//! changed from the command line or the environment.

use std::path::PathBuf;
use std::time::Duration;

/// Everything `serve` needs to know.
#[derive(Debug, Clone)]
pub struct Config {
    /// Folder that holds `ledger.sqlite3`, `keys/` and `logs/audit.log`.
    pub data_dir: PathBuf,
    /// A ticket signing key shared with other replicas (`--key-file`,
    /// from `troop-coordinator keygen`) instead of `DIR/keys/`.
    pub key_file: Option<PathBuf>,
    /// `postgres://…`: the ledger and everything replicas share live in
    /// that database; `None`: SQLite in `data_dir`.
    pub database: Option<String>,
    /// This replica's name in its audit log lines (default: the host name
    /// and the data folder).
    pub replica_name: Option<String>,
    /// Earlier signing keys whose tickets still verify (listed in the
    /// JWKS, never used to sign): `--previous-key-file`.
    pub previous_key_files: Vec<PathBuf>,
    /// Credit-seconds a new account gets once.
    pub starter_credits_milli: i64,
    /// Seconds of the worker's rate held by each reservation.
    pub reservation_secs: i64,
    /// Lifetime of a ticket.
    pub ticket_ttl: Duration,
    /// Extra time after a ticket's expiry before its reservation is refunded.
    pub reservation_grace: Duration,
    /// How often the sweeper looks for expired reservations.
    pub sweep_interval: Duration,
    /// Requests an hour per IP on discovery-type reads.
    pub discovery_per_hour: u32,
    /// Requests an hour per user on `/authorize`.
    pub authorize_per_hour: u32,
    /// Reads an hour of an account's own history, signed by that account
    /// (consoles and status pages poll it; these do not count per IP).
    pub account_reads_per_hour: u32,
    /// How far a signed timestamp may be from our clock.
    pub max_skew_secs: u64,
    /// A worker not heard from for this long is not alive.
    pub worker_ttl: Duration,
    /// Confirmed audit failures after which a worker is suspended (no more
    /// tickets); 0 never suspends.
    pub suspend_after_failures: u32,
    /// Heartbeat interval the coordinator asks workers for.
    pub heartbeat_interval: Duration,
    /// With PostgreSQL: how often a replica writes the liveness of the
    /// workers that beat on it, all in one command (a heartbeat that
    /// changes nothing but liveness and load costs no database write of
    /// its own). Zero writes each heartbeat through the ledger.
    pub heartbeat_flush: Duration,
    /// Limit on request bodies.
    pub body_limit_bytes: usize,
    /// Limit on the time one request may take.
    pub request_timeout: Duration,
    /// Take the client address from `X-Forwarded-For` (only behind a proxy
    /// you run): the peer is a trusted proxy, whatever its address.
    pub trusted_proxy: bool,
    /// Addresses of the operator's proxies (`--trusted-proxy-net`): a peer
    /// in them is a trusted proxy, and entries in them are skipped when
    /// `X-Forwarded-For` is read from the right.
    pub trusted_proxy_nets: Vec<crate::client_addr::IpNet>,
    /// How many workers `/bootstrap` returns at most.
    pub bootstrap_peers: usize,
    /// Most seconds charged for a request the user did not acknowledge.
    pub unacked_cap_secs: u64,
    /// How far a worker's clock may be off: the charging window runs from
    /// the ticket's issue minus this to the receipt's arrival plus this.
    pub clock_tolerance_ms: u64,
    /// Starter grants to one client address in 24 hours (0: no limit).
    pub starter_grants_per_ip_per_day: u32,
    /// Starter credits granted in all in one hour, milli-credits (0: no limit).
    pub starter_milli_per_hour: i64,
    /// Hashcash bits a new account shows on its first `/authorize` (0: none).
    pub starter_pow_bits: u32,
    /// Requests an hour per client address on `/authorize`.
    pub authorize_per_ip_per_hour: u32,
    /// Circuit relays `/bootstrap` lists first (`--relay`), each a multiaddr
    /// ending in `/p2p/<PeerId>`.
    pub relays: Vec<String>,
    /// Most commands the ledger writer groups into one commit.
    pub max_batch: usize,
    /// Proof of hardware: matrix size, rounds, and how long a worker has.
    pub bench_size: usize,
    pub bench_rounds: u32,
    pub bench_deadline: Duration,
    /// Mean time between re-proofs asked of a worker with a standing proof
    /// (random, in heartbeat answers); zero asks none.
    pub reproof_mean: Duration,
    /// How much slower than its standing figure a re-proof may be and the
    /// standing figure stay (0.25: a quarter).
    pub reproof_tolerance: f64,
    /// GFLOP/s that earn a multiplier of 1.0 (see `bench::multiplier_for`).
    pub reference_gflops: f64,
    /// Proofs verified at once (each holds about 73 MB at n = 4096 while it
    /// runs); default: the machine's cores.
    pub bench_verify_concurrency: usize,
    /// Proofs waiting for a verification slot before new ones are answered
    /// 503 with `Retry-After` (a waiting proof holds only its ~140 KB body).
    pub bench_verify_queue: usize,
    /// New worker ids one client IP may register an hour (re-registering a
    /// known id does not count).
    pub registrations_per_ip_per_hour: u32,
    /// Workers from one IP listed in `/bootstrap` at most.
    pub bootstrap_per_ip: usize,
    /// Serve `/metrics` only on this address (not on the public one).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Connections at once, per IP, and how long one may sit idle.
    pub conn_limits: crate::listener::ConnLimits,
    /// Requests handled at once; beyond it, 503 with `Retry-After`.
    pub max_in_flight: usize,
}

impl Config {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            key_file: None,
            database: None,
            replica_name: None,
            previous_key_files: Vec::new(),
            starter_credits_milli: 3_600_000,
            reservation_secs: 300,
            ticket_ttl: Duration::from_secs(300),
            reservation_grace: Duration::from_secs(600),
            sweep_interval: Duration::from_secs(15),
            discovery_per_hour: 100,
            authorize_per_hour: 20,
            account_reads_per_hour: 1200,
            max_skew_secs: 300,
            worker_ttl: Duration::from_secs(90),
            suspend_after_failures: 2,
            heartbeat_interval: Duration::from_secs(20),
            heartbeat_flush: Duration::from_secs(5),
            body_limit_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            trusted_proxy: false,
            trusted_proxy_nets: Vec::new(),
            bootstrap_peers: 8,
            relays: Vec::new(),
            unacked_cap_secs: 10,
            clock_tolerance_ms: 2_000,
            starter_grants_per_ip_per_day: 3,
            starter_milli_per_hour: 360_000_000,
            starter_pow_bits: 0,
            authorize_per_ip_per_hour: 200,
            max_batch: 2048,
            bench_size: 4096,
            bench_rounds: 4,
            bench_deadline: Duration::from_secs(300),
            reference_gflops: 100.0,
            reproof_mean: Duration::from_secs(6 * 3600),
            reproof_tolerance: 0.25,
            bench_verify_concurrency: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            bench_verify_queue: 64,
            registrations_per_ip_per_hour: 20,
            bootstrap_per_ip: 2,
            metrics_listen: None,
            conn_limits: crate::listener::ConnLimits::default(),
            max_in_flight: 1024,
        }
    }

    /// The name on this replica's audit lines.
    pub fn replica_name(&self) -> String {
        self.replica_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "coordinator".into());
            format!("{host}:{}", self.data_dir.display())
        })
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.data_dir.join("ledger.sqlite3")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.data_dir.join("logs").join("audit.log")
    }

    /// The ticket signing key: `key_file` when set (shared by replicas),
    /// else made and kept in `DIR/keys/`.
    pub fn ticket_keys(&self) -> anyhow::Result<crate::tickets::TicketKeys> {
        let mut keys = match &self.key_file {
            Some(p) => crate::tickets::TicketKeys::load_file(p)?,
            None => crate::tickets::TicketKeys::load_or_create(&self.keys_dir())?,
        };
        for p in &self.previous_key_files {
            let kid = keys.add_previous(p)?;
            tracing::info!(kid, path = %p.display(), "an earlier ticket key is still accepted");
        }
        Ok(keys)
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }
}

/// The PeerId a relay's multiaddr ends with (`.../p2p/<PeerId>`), if it
/// is a well-formed one.
pub fn relay_peer_id(addr: &str) -> Option<String> {
    if !addr.starts_with('/') || addr.contains("/p2p-circuit") {
        return None;
    }
    let (_, last) = addr.rsplit_once("/p2p/")?;
    let peer: libp2p_identity::PeerId = last.parse().ok()?;
    Some(peer.to_base58())
}
