//! A real PostgreSQL server for a test: `initdb` and `pg_ctl` from
//! Debian's packages, in a temp dir, on a free loopback port, as the
//! `postgres` user when the tests run as root (PostgreSQL refuses root).
//! Stopped when dropped.
//!
//! Without PostgreSQL installed the test says "skipped"; with
//! `TROOP_REQUIRE_POSTGRES_TESTS=1` (CI) that is a failure.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

fn find_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// A port nothing listens on now, on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl PgServer {
    /// Starts a server, or says why not ("skipped" unless CI requires it).
    pub fn start() -> Option<Self> {
        let Some(bin) = find_bin() else {
            let why = "PostgreSQL is not installed (apt-get install postgresql)";
            if std::env::var("TROOP_REQUIRE_POSTGRES_TESTS").is_ok_and(|v| v == "1") {
                panic!("TROOP_REQUIRE_POSTGRES_TESTS=1 but {why}");
            }
            eprintln!("skipped: {why}");
            return None;
        };
        // SAFETY-free check for root: `id -u`.
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let as_postgres = uid == "0";
        let dir = tempfile::Builder::new()
            .prefix("troop-pg-")
            .tempdir()
            .expect("temp dir");
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown the PostgreSQL temp dir to postgres");
        }
        let s = Self {
            dir,
            bin,
            port: free_port(),
            as_postgres,
        };
        s.run(
            "initdb",
            &[
                "-D",
                &s.data().to_string_lossy(),
                "-U",
                "troop",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        s.start_again();
        Some(s)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).output().expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts (again) on the same port and data.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-l",
                &self.dir.path().join("log").to_string_lossy(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server (immediate: like a crash).
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://troop@127.0.0.1:{}/{db}", self.port)
    }

    /// Makes a new, empty database and returns its URL.
    pub fn create_db(&self, name: &str) -> String {
        let admin = self.url("postgres");
        let sql = format!("CREATE DATABASE {name}");
        // On a thread of its own: the blocking client runs a runtime,
        // which an async test's thread may not.
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut c = postgres::Client::connect(&admin, postgres::NoTls)
                    .expect("connect to the postgres database");
                c.batch_execute(&sql).expect("CREATE DATABASE");
            })
            .join()
            .expect("create the database");
        });
        self.url(name)
    }

    /// Runs `f` with a client on database `url`, on a thread of its own.
    pub fn with_client<T: Send>(url: &str, f: impl FnOnce(&mut postgres::Client) -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect");
                f(&mut c)
            })
            .join()
            .expect("the client's thread")
        })
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.stop()));
    }
}
