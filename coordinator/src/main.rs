//! `troop-coordinator`: serve the API, or inspect the ledger.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use troop_coordinator::{Config, Coordinator, admin};

#[derive(Parser, Debug)]
#[command(
    name = "troop-coordinator",
    version,
    about = "Troop's coordinator: signs tickets and settles the credit ledger"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the HTTP API (tickets, ledger, worker registry).
    Serve(Box<ServeArgs>),
    /// Make a new RSA-2048 ticket signing key (PKCS#8 PEM, mode 0400) for
    /// `serve --key-file`, shared by every replica; prints its key id.
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Bring a PostgreSQL database's schema up to this version (serve
    /// does it too; this runs it on its own, e.g. before a rolling upgrade).
    Migrate {
        /// `postgres://USER@HOST:PORT/DB`.
        #[arg(long, env = "TROOP_DATABASE_URL")]
        database: String,
    },
    /// Inspect the ledger in a data folder (or in PostgreSQL).
    Ledger {
        #[command(subcommand)]
        command: LedgerCmd,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TROOP_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Folder for the ledger, the keys and logs/audit.log (made if missing).
    #[arg(long, env = "TROOP_DATA", default_value = "./data/coordinator")]
    data: PathBuf,
    /// Ticket signing key from `troop-coordinator keygen`, shared by every
    /// replica (default: one made and kept in DATA/keys/).
    #[arg(long, env = "TROOP_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Keep the ledger and everything replicas share in PostgreSQL
    /// (`postgres://USER[:PASSWORD]@HOST:PORT/DB`), so that several
    /// replicas can serve behind one load balancer; without it the ledger
    /// is SQLite in --data. --data stays this replica's own folder (audit
    /// log, keys).
    #[arg(long, env = "TROOP_DATABASE_URL")]
    database: Option<String>,
    /// This replica's name on its audit log lines (with --database;
    /// default: HOST:DATA).
    #[arg(long, env = "TROOP_REPLICA_NAME")]
    replica_name: Option<String>,
    /// An earlier --key-file whose tickets are still accepted while they
    /// expire (listed in /.well-known/jwks.json, never used to sign;
    /// repeatable).
    #[arg(
        long = "previous-key-file",
        env = "TROOP_PREVIOUS_KEY_FILES",
        value_delimiter = ','
    )]
    previous_key_files: Vec<PathBuf>,
    /// Credit-seconds a new account gets once.
    #[arg(long, env = "TROOP_STARTER_CREDITS", default_value_t = 3600.0)]
    starter_credits: f64,
    /// Seconds of the worker's rate held per reservation.
    #[arg(long, env = "TROOP_RESERVATION_SECS", default_value_t = 300)]
    reservation_secs: i64,
    /// Ticket lifetime in seconds.
    #[arg(long, env = "TROOP_TICKET_TTL_SECS", default_value_t = 300)]
    ticket_ttl_secs: u64,
    /// Seconds after a ticket's expiry before its unused reservation is refunded.
    #[arg(long, env = "TROOP_RESERVATION_GRACE_SECS", default_value_t = 600)]
    reservation_grace_secs: u64,
    /// Seconds between sweeps for expired reservations.
    #[arg(long, env = "TROOP_SWEEP_INTERVAL_SECS", default_value_t = 15)]
    sweep_interval_secs: u64,
    /// Requests an hour per IP on discovery reads (/workers, /bootstrap, balances,
    /// and history reads not signed by their own account).
    #[arg(long, env = "TROOP_DISCOVERY_PER_HOUR", default_value_t = 100)]
    discovery_per_hour: u32,
    /// Reads an hour of an account's own history signed by that account
    /// (per account; the gateway console and worker page poll it).
    #[arg(long, env = "TROOP_ACCOUNT_READS_PER_HOUR", default_value_t = 1200)]
    account_reads_per_hour: u32,
    /// Requests an hour per user on /authorize.
    #[arg(long, env = "TROOP_AUTHORIZE_PER_HOUR", default_value_t = 20)]
    authorize_per_hour: u32,
    /// Seconds without a heartbeat after which a worker is not alive.
    #[arg(long, env = "TROOP_WORKER_TTL_SECS", default_value_t = 90)]
    worker_ttl_secs: u64,
    /// With PostgreSQL: seconds between a replica's writes of the workers'
    /// liveness. A heartbeat that only says "still here" (same models and
    /// addresses) is kept in memory and written with the others of that
    /// interval in one command; other replicas see it within this plus
    /// their 1 s refresh. Keep it well under --worker-ttl-secs. 0 writes
    /// every heartbeat at once.
    #[arg(long, env = "TROOP_HEARTBEAT_FLUSH_SECS", default_value_t = 5)]
    heartbeat_flush_secs: u64,
    /// Mean seconds between re-proofs of hardware asked of each worker with
    /// a proof, at random times it cannot predict (answered while it
    /// serves; one missed or failed takes its multiplier away). 0: never.
    #[arg(long, env = "TROOP_REPROOF_MEAN_SECS", default_value_t = 21600.0)]
    reproof_mean_secs: f64,
    /// Confirmed audit failures (each proved by two auditors' signed
    /// findings, `POST /audits`) after which a worker is suspended: no
    /// more tickets are sold for it. 0 never suspends.
    #[arg(long, env = "TROOP_SUSPEND_AFTER_FAILURES", default_value_t = 2)]
    suspend_after_failures: u32,
    /// Trust X-Forwarded-For for the client address (only behind your own
    /// proxy): the rightmost entry that is not a trusted proxy is the client.
    #[arg(long, env = "TROOP_TRUSTED_PROXY")]
    trusted_proxy: bool,
    /// A block of your own proxies' addresses (`10.0.0.0/8`, `2001:db8::1`):
    /// a peer in it is trusted, and its entries in X-Forwarded-For are
    /// skipped (repeatable).
    #[arg(
        long = "trusted-proxy-net",
        env = "TROOP_TRUSTED_PROXY_NETS",
        value_delimiter = ','
    )]
    trusted_proxy_net: Vec<troop_coordinator::client_addr::IpNet>,
    /// Most seconds charged for a request the user's gateway did not acknowledge.
    #[arg(long, env = "TROOP_UNACKNOWLEDGED_CAP_SECS", default_value_t = 10)]
    unacknowledged_cap_secs: u64,
    /// New accounts from one client address that get starter credits in 24 hours (0: no limit).
    #[arg(long, env = "TROOP_STARTER_GRANTS_PER_IP_PER_DAY", default_value_t = 3)]
    starter_grants_per_ip_per_day: u32,
    /// Starter credit-seconds granted in all in one hour (0: no limit).
    #[arg(
        long,
        env = "TROOP_STARTER_CREDITS_PER_HOUR",
        default_value_t = 360000.0
    )]
    starter_credits_per_hour: f64,
    /// Hashcash bits a new account must show on its first /authorize (0: none).
    #[arg(long, env = "TROOP_STARTER_POW_BITS", default_value_t = 0)]
    starter_pow_bits: u32,
    /// Requests an hour per client address on /authorize.
    #[arg(long, env = "TROOP_AUTHORIZE_PER_IP_PER_HOUR", default_value_t = 200)]
    authorize_per_ip_per_hour: u32,
    /// New worker ids one client address may register an hour.
    #[arg(
        long,
        env = "TROOP_REGISTRATIONS_PER_IP_PER_HOUR",
        default_value_t = 20
    )]
    registrations_per_ip_per_hour: u32,
    /// Workers from one client address listed in /bootstrap at most.
    #[arg(long, env = "TROOP_BOOTSTRAP_PER_IP", default_value_t = 2)]
    bootstrap_per_ip: usize,
    /// Serve /metrics on this address only (e.g. 127.0.0.1:9464), not on
    /// the public one: metrics name workers and traffic.
    #[arg(long, env = "TROOP_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Requests handled at once; more are answered 503 with Retry-After.
    #[arg(long, env = "TROOP_MAX_IN_FLIGHT", default_value_t = 1024)]
    max_in_flight: usize,
    /// Connections at once from one client address.
    #[arg(long, env = "TROOP_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    max_connections_per_ip: u32,
    /// Seconds a connection may send and take nothing before it is closed
    /// (slow headers, idle keep-alive).
    #[arg(long, env = "TROOP_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    idle_timeout_secs: u64,
    /// A circuit relay (`troop relay`) to list first in /bootstrap, as its
    /// multiaddr ending in /p2p/<PeerId> (repeatable).
    #[arg(long = "relay", env = "TROOP_RELAYS", value_delimiter = ',')]
    relay: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum LedgerCmd {
    /// Check every invariant; exit 0 when all hold, 1 on a finding, 3 when
    /// only audit lines a crash left out are missing (`repair` adds them).
    Audit {
        /// The data folder whose audit log is checked (with --database, one
        /// replica's: its log against the transfers that replica committed).
        #[arg(long, env = "TROOP_DATA", default_value = "./data/coordinator")]
        data: PathBuf,
        /// PostgreSQL ledger (`postgres://USER@HOST:PORT/DB`) instead of
        /// the SQLite file in --data.
        #[arg(long, env = "TROOP_DATABASE_URL")]
        database: Option<String>,
        /// With --database: the replica's name, when its log has no line
        /// yet (the names on the log's lines are always taken).
        #[arg(long, env = "TROOP_REPLICA_NAME")]
        replica_name: Option<String>,
    },
    /// Append the audit lines a crash left out (what `audit` calls
    /// recoverable) while the coordinator (with --database: this replica)
    /// is stopped; other replicas may keep serving.
    Repair {
        #[arg(long, env = "TROOP_DATA", default_value = "./data/coordinator")]
        data: PathBuf,
        /// PostgreSQL ledger (`postgres://USER@HOST:PORT/DB`) instead of
        /// the SQLite file in --data.
        #[arg(long, env = "TROOP_DATABASE_URL")]
        database: Option<String>,
        /// With --database: the replica's name, when its log has no line
        /// yet (the names on the log's lines are always taken).
        #[arg(long, env = "TROOP_REPLICA_NAME")]
        replica_name: Option<String>,
    },
    /// Print an account's balance in credit-seconds.
    Balance {
        /// Account id (a PeerId).
        id: String,
        #[arg(long, env = "TROOP_DATA", default_value = "./data/coordinator")]
        data: PathBuf,
        /// PostgreSQL ledger (`postgres://USER@HOST:PORT/DB`) instead of
        /// the SQLite file in --data.
        #[arg(long, env = "TROOP_DATABASE_URL")]
        database: Option<String>,
    },
    /// Print an account's transfers, newest first.
    History {
        /// Account id (a PeerId).
        id: String,
        #[arg(long, env = "TROOP_DATA", default_value = "./data/coordinator")]
        data: PathBuf,
        /// PostgreSQL ledger (`postgres://USER@HOST:PORT/DB`) instead of
        /// the SQLite file in --data.
        #[arg(long, env = "TROOP_DATABASE_URL")]
        database: Option<String>,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
        /// Most lines to print.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Serve(a) => {
            let mut cfg = Config::new(a.data.clone());
            cfg.key_file = a.key_file.clone();
            if let Some(url) = &a.database
                && !troop_coordinator::pg::is_postgres_url(url)
            {
                anyhow::bail!(
                    "--database {url}: expected a postgres:// or postgresql:// URL (leave it out for SQLite in --data)"
                );
            }
            cfg.database = a.database.clone();
            cfg.replica_name = a.replica_name.clone();
            cfg.previous_key_files = a.previous_key_files.clone();
            if !(a.starter_credits.is_finite() && a.starter_credits >= 0.0) {
                anyhow::bail!("--starter-credits must be a non-negative number");
            }
            cfg.starter_credits_milli = (a.starter_credits * 1000.0).round() as i64;
            cfg.reservation_secs = a.reservation_secs.max(0);
            cfg.ticket_ttl = Duration::from_secs(a.ticket_ttl_secs);
            cfg.reservation_grace = Duration::from_secs(a.reservation_grace_secs);
            cfg.sweep_interval = Duration::from_secs(a.sweep_interval_secs.max(1));
            cfg.discovery_per_hour = a.discovery_per_hour;
            cfg.authorize_per_hour = a.authorize_per_hour;
            cfg.account_reads_per_hour = a.account_reads_per_hour;
            cfg.worker_ttl = Duration::from_secs(a.worker_ttl_secs);
            if a.heartbeat_flush_secs.saturating_mul(3) > a.worker_ttl_secs {
                anyhow::bail!(
                    "--heartbeat-flush-secs {} is too close to --worker-ttl-secs {}: other replicas \
                     would drop live workers; keep it under a third of the TTL",
                    a.heartbeat_flush_secs,
                    a.worker_ttl_secs
                );
            }
            cfg.heartbeat_flush = Duration::from_secs(a.heartbeat_flush_secs);
            if !a.reproof_mean_secs.is_finite() || a.reproof_mean_secs < 0.0 {
                anyhow::bail!("--reproof-mean-secs must be a number of seconds, 0 or more");
            }
            cfg.reproof_mean = Duration::from_secs_f64(a.reproof_mean_secs);
            cfg.suspend_after_failures = a.suspend_after_failures;
            cfg.trusted_proxy = a.trusted_proxy;
            cfg.trusted_proxy_nets = a.trusted_proxy_net.clone();
            for r in &a.relay {
                if troop_coordinator::config::relay_peer_id(r).is_none() {
                    anyhow::bail!(
                        "--relay {r}: expected a multiaddr ending in /p2p/<PeerId>, e.g. /ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."
                    );
                }
            }
            cfg.relays = a.relay.clone();
            if !(a.starter_credits_per_hour.is_finite() && a.starter_credits_per_hour >= 0.0) {
                anyhow::bail!("--starter-credits-per-hour must be a non-negative number");
            }
            if a.starter_pow_bits > 32 {
                anyhow::bail!("--starter-pow-bits must be 0 to 32");
            }
            cfg.unacked_cap_secs = a.unacknowledged_cap_secs;
            cfg.starter_grants_per_ip_per_day = a.starter_grants_per_ip_per_day;
            cfg.starter_milli_per_hour = (a.starter_credits_per_hour * 1000.0).round() as i64;
            cfg.starter_pow_bits = a.starter_pow_bits;
            cfg.authorize_per_ip_per_hour = a.authorize_per_ip_per_hour;
            cfg.registrations_per_ip_per_hour = a.registrations_per_ip_per_hour;
            cfg.bootstrap_per_ip = a.bootstrap_per_ip.max(1);
            cfg.metrics_listen = a.metrics_listen;
            cfg.max_in_flight = a.max_in_flight.max(1);
            cfg.conn_limits.max_per_ip = a.max_connections_per_ip.max(1);
            cfg.conn_limits.idle = std::time::Duration::from_secs(a.idle_timeout_secs.max(1));
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                // The port first: a second coordinator on a port in use
                // leaves no data folder or key behind.
                let listener =
                    tokio::net::TcpListener::bind(a.listen)
                        .await
                        .with_context(|| {
                            format!(
                                "binding {} (--listen; another coordinator running there?)",
                                a.listen
                            )
                        })?;
                // Off the async threads: opening may talk to PostgreSQL
                // through a blocking client.
                let coordinator = tokio::task::spawn_blocking(move || Coordinator::open(cfg))
                    .await
                    .context("opening the coordinator")??;
                coordinator.serve(listener, shutdown_signal()).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Keygen { out } => {
            let kid = troop_coordinator::tickets::TicketKeys::generate_to(&out)?;
            println!("{kid}");
            eprintln!(
                "wrote {} (kid {kid}); start every replica with --key-file {}",
                out.display(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Migrate { database } => {
            let mut client = troop_coordinator::pg::connect(&database)?;
            let before = troop_coordinator::pg::schema_version(&mut client)?;
            let applied = troop_coordinator::pg::migrate(&mut client)?;
            println!(
                "migrate: schema version {} (was {before}; {applied} step(s) applied)",
                before + applied
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Ledger { command } => ledger_cmd(command),
    }
}

fn ledger_cmd(cmd: LedgerCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LedgerCmd::Repair {
            data,
            database,
            replica_name,
        } => {
            let n = admin::repair_replica(&data, database.as_deref(), replica_name.as_deref())?;
            if n == 0 {
                println!("ledger repair: nothing to repair");
            } else {
                println!("ledger repair: appended {n} audit line(s) marked \"recovered\"");
            }
            Ok(ExitCode::SUCCESS)
        }
        LedgerCmd::Audit {
            data,
            database,
            replica_name,
        } => {
            let admin::AuditReport {
                findings,
                recoverable,
                totals: t,
            } = admin::audit_replica(&data, database.as_deref(), replica_name.as_deref())?;
            println!(
                "minted {:.3}  balances {:.3}  pending {:.3}",
                t.minted as f64 / 1000.0,
                t.balances as f64 / 1000.0,
                t.pending_jobs as f64 / 1000.0
            );
            if findings.is_empty() && recoverable.is_empty() {
                println!("ledger audit: OK (every invariant holds)");
                Ok(ExitCode::SUCCESS)
            } else if findings.is_empty() {
                println!(
                    "ledger audit: recoverable: {} committed transfer(s) missing from the end of the audit log (a crash before its flush): {:?}",
                    recoverable.len(),
                    recoverable
                );
                let db = if database.is_some() {
                    " --database URL"
                } else {
                    ""
                };
                println!(
                    "run `troop-coordinator ledger repair --data {}{db}` (or start the coordinator) to append them",
                    data.display()
                );
                Ok(ExitCode::from(3))
            } else {
                println!("ledger audit: {} finding(s)", findings.len());
                for f in &findings {
                    println!("  - {f}");
                }
                Ok(ExitCode::from(1))
            }
        }
        LedgerCmd::Balance { id, data, database } => {
            let id = troop_protocol::identity::parse_account_id(&id)?.to_base58();
            let balance = admin::with_ledger(&data, database.as_deref(), |db| {
                Ok(admin::balance_of(db, &id)?)
            })?;
            match balance {
                Some(b) => {
                    println!("account   {}", b.account);
                    println!("available {:.3}", b.available);
                    println!("pending   {:.3}", b.pending);
                    println!("credited  {:.3}", b.credited);
                    println!("debited   {:.3}", b.debited);
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("no account {id}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        LedgerCmd::History {
            id,
            data,
            database,
            json,
            limit,
        } => {
            let id = troop_protocol::identity::parse_account_id(&id)?.to_base58();
            let rows = admin::with_ledger(&data, database.as_deref(), |db| {
                Ok(admin::history(db, &id, i64::MAX, limit.max(1))?)
            })?;
            for r in rows {
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    let back = r
                        .released
                        .map(|x| format!("{x:+.3} back"))
                        .unwrap_or_default();
                    println!(
                        "{:>6}  {:<8} {:>12.3} {:>14}  {:<8} {}",
                        r.id,
                        r.kind,
                        r.amount,
                        back,
                        r.status,
                        r.job_id.unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; finishing requests in flight");
}
