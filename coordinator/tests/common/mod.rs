//! Helpers shared by the coordinator's tests and benchmark: a real
//! coordinator on 127.0.0.1 with a temporary data folder, and a client that
//! signs requests the way users and workers do.
//!
//! With `TROOP_TEST_STORE=postgres` every coordinator started here keeps
//! its ledger in a PostgreSQL server of its own (started for it, stopped
//! with it): `scripts/test` runs the HTTP tests once on each store.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use libp2p_identity::Keypair;
use reqwest::{Client, Response};
use serde_json::Value;
use troop_coordinator::{Config, RunningCoordinator};
use troop_protocol::api::RegisterResponse;
use troop_protocol::receipt::{HEADER_RECEIPT_MAC, HEADER_TIMESTAMP, Receipt, sign_receipt};
use troop_protocol::signed::sign_request;

#[path = "../pg/mod.rs"]
pub mod pg;

/// A port nothing listens on now, on 127.0.0.1.
pub fn free_port() -> u16 {
    pg::free_port()
}

/// Settles `receipt` through the coordinator's ledger writer alone, without
/// HTTP (what the benchmarks measure as the writer's own rate).
pub async fn settle_through_writer(state: &troop_coordinator::AppState, receipt: Receipt) {
    let sha = format!("bench-{}", receipt.job_id);
    // As the receipts route does: the acks' signatures checked here, not
    // on the writer's thread.
    let ack_signatures = Some(troop_protocol::usage::ack_signatures(
        &receipt.requests,
        &receipt.user,
    ));
    state
        .writer
        .submit(
            troop_coordinator::ledger::Command::Settle {
                receipt,
                receipt_sha256: sha,
                now_ms: troop_coordinator::unix_ms(),
                unacked_cap_ms: 10_000,
                tolerance_ms: 2_000,
                ack_signatures,
            },
            None,
        )
        .await
        .expect("settled through the writer");
}

/// A whole number from the environment (benchmark sizes), or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Polls `f` until it gives `Some`, failing after `secs`.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether this run's coordinators use PostgreSQL (`TROOP_TEST_STORE`).
pub fn on_postgres() -> bool {
    std::env::var("TROOP_TEST_STORE").is_ok_and(|v| v == "postgres")
}

pub fn now_secs() -> u64 {
    troop_coordinator::unix_secs()
}

pub fn now_ms() -> u64 {
    troop_coordinator::unix_ms()
}

pub struct TestCoordinator {
    /// The coordinator's own PostgreSQL server and database URL, with
    /// `TROOP_TEST_STORE=postgres`.
    pub postgres: Option<(pg::PgServer, String)>,
    pub dir: tempfile::TempDir,
    pub running: Option<RunningCoordinator>,
    pub url: String,
    pub http: Client,
}

pub fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::new(dir);
    cfg.sweep_interval = Duration::from_millis(50);
    // Every test user comes from 127.0.0.1; the minting tests set limits.
    cfg.starter_grants_per_ip_per_day = 0;
    cfg.starter_milli_per_hour = 0;
    cfg.authorize_per_ip_per_hour = 100_000;
    cfg.registrations_per_ip_per_hour = 100_000;
    cfg.bootstrap_per_ip = 100;
    cfg
}

impl TestCoordinator {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_result(tweak)
            .await
            .expect("coordinator starts")
    }

    /// Starts a coordinator, or says why it would not start.
    pub async fn start_with_result(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        let postgres = if on_postgres() {
            let server = pg::PgServer::start().expect("TROOP_TEST_STORE=postgres needs PostgreSQL");
            let url = server.create_db("troop");
            cfg.database = Some(url.clone());
            Some((server, url))
        } else {
            None
        };
        tweak(&mut cfg);
        let running = troop_coordinator::spawn(cfg, "127.0.0.1:0".parse().expect("addr")).await?;
        let url = running.url();
        Ok(Self {
            postgres,
            dir,
            running: Some(running),
            url,
            http: Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
        })
    }

    /// A data folder and a client, with no coordinator running (tests that
    /// start the binary themselves set `url`).
    pub fn idle() -> Self {
        Self {
            postgres: None,
            dir: tempfile::tempdir().expect("tempdir"),
            running: None,
            url: String::new(),
            http: Client::new(),
        }
    }

    /// The status of `GET path`, or None when nothing answers.
    pub async fn get_maybe(&self, path: &str) -> Option<u16> {
        self.http
            .get(format!("{}{}", self.url, path))
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// A receipt's status, or an error when the connection broke.
    pub async fn try_submit_receipt(
        &self,
        key_hex: &str,
        receipt: &Receipt,
        ts: u64,
    ) -> Result<u16, reqwest::Error> {
        let body = serde_json::to_vec(receipt).expect("json");
        self.receipt_request(key_hex, body, ts)
            .send()
            .await
            .map(|r| r.status().as_u16())
    }

    /// Stops and starts again on the same data folder.
    pub async fn restart_with(&mut self, tweak: impl FnOnce(&mut Config)) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean stop");
        }
        let mut cfg = config(self.dir.path());
        cfg.database = self.postgres.as_ref().map(|(_, url)| url.clone());
        tweak(&mut cfg);
        let running = troop_coordinator::spawn(cfg, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("coordinator restarts");
        self.url = running.url();
        self.running = Some(running);
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.expect("clean stop");
        }
    }

    pub fn audit_lines(&self) -> Vec<Value> {
        let text =
            std::fs::read_to_string(self.dir.path().join("logs/audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls the audit log until a line satisfies `pred` (capped wait).
    pub async fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(l) = self.audit_lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(Instant::now() < deadline, "no audit line for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn get(&self, path: &str) -> Response {
        self.http
            .get(format!("{}{}", self.url, path))
            .send()
            .await
            .expect("GET")
    }

    pub async fn signed(&self, key: &Keypair, path: &str, body: &Value) -> Response {
        let bytes = serde_json::to_vec(body).expect("json");
        self.signed_raw(key, path, bytes, now_secs()).await
    }

    pub async fn signed_raw(&self, key: &Keypair, path: &str, body: Vec<u8>, ts: u64) -> Response {
        let h = sign_request(key, "POST", path, &body, ts);
        let mut req = self.http.post(format!("{}{}", self.url, path)).body(body);
        req = req.header("content-type", "application/json");
        for (k, v) in h.pairs() {
            req = req.header(k, v);
        }
        req.send().await.expect("POST")
    }

    /// A GET signed by `key` (histories are readable only so).
    pub async fn signed_get(&self, key: &Keypair, path: &str) -> Response {
        let h = sign_request(key, "GET", path, b"", now_secs());
        let mut req = self.http.get(format!("{}{}", self.url, path));
        for (k, v) in h.pairs() {
            req = req.header(k, v);
        }
        req.send().await.expect("GET")
    }

    pub async fn register(&self, key: &Keypair, models: &[&str]) -> RegisterResponse {
        let resp = self
            .signed(
                key,
                "/workers/register",
                &serde_json::json!({ "models": models, "addresses": ["/ip4/127.0.0.1/tcp/4001"] }),
            )
            .await;
        assert_eq!(resp.status(), 200, "register: {:?}", resp.text().await);
        resp.json().await.expect("register json")
    }

    pub async fn authorize(&self, user: &Keypair, worker: &Keypair, model: &str) -> Response {
        self.signed(
            user,
            "/authorize",
            &serde_json::json!({ "model": model, "worker": worker.public().to_peer_id().to_base58() }),
        )
        .await
    }

    /// A granted ticket (the test fails on a refusal).
    pub async fn ticket(
        &self,
        user: &Keypair,
        worker: &Keypair,
        model: &str,
    ) -> troop_protocol::api::AuthorizeResponse {
        self.authorize(user, worker, model)
            .await
            .json()
            .await
            .expect("json")
    }

    pub async fn submit_receipt(&self, key_hex: &str, receipt: &Receipt, ts: u64) -> Response {
        let body = serde_json::to_vec(receipt).expect("json");
        self.submit_raw(key_hex, body, ts).await
    }

    pub async fn submit_raw(&self, key_hex: &str, body: Vec<u8>, ts: u64) -> Response {
        self.receipt_request(key_hex, body, ts)
            .send()
            .await
            .expect("POST receipt")
    }

    /// `POST /transactions/submit` with the receipt MAC headers.
    fn receipt_request(&self, key_hex: &str, body: Vec<u8>, ts: u64) -> reqwest::RequestBuilder {
        let key = hex::decode(key_hex).expect("hex key");
        let mac = sign_receipt(&key, ts, &body);
        self.http
            .post(format!("{}/transactions/submit", self.url))
            .header("content-type", "application/json")
            .header(HEADER_TIMESTAMP, ts.to_string())
            .header(HEADER_RECEIPT_MAC, mac)
            .body(body)
    }

    pub async fn balance(&self, key: &Keypair) -> Value {
        let resp = self
            .get(&format!("/users/{}/balance", key.public().to_peer_id()))
            .await;
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("balance json")
    }
}

pub fn receipt_for(
    job_id: &str,
    user: &Keypair,
    worker: &Keypair,
    model: &str,
    millis: u64,
) -> Receipt {
    let end = now_ms();
    let w = worker.public().to_peer_id().to_base58();
    // A session of one request that the user acknowledged as lasting
    // `millis` (the coordinator's clock tolerance, 2 s, lets a test claim
    // up to that much without waiting for it).
    let ack = troop_protocol::usage::Ack::sign(user, job_id, &w, 0, 34, 34, millis);
    Receipt {
        job_id: job_id.into(),
        worker: w,
        user: user.public().to_peer_id().to_base58(),
        model: model.into(),
        prompt_tokens: 12,
        completion_tokens: 34,
        started_at: end - millis,
        finished_at: end,
        status: troop_protocol::receipt::JobStatus::Completed,
        requests: vec![troop_protocol::usage::RequestLine {
            index: 0,
            started_at: end - millis,
            finished_at: end,
            prompt_tokens: 12,
            completion_tokens: 34,
            chunks: 34,
            status: troop_protocol::usage::LineStatus::Completed,
            ack: Some(ack),
        }],
    }
}

/// An old-style receipt: no request lines, no acknowledgement.
pub fn bare_receipt_for(
    job_id: &str,
    user: &Keypair,
    worker: &Keypair,
    model: &str,
    millis: u64,
) -> Receipt {
    let mut r = receipt_for(job_id, user, worker, model, millis);
    r.requests.clear();
    r
}

/// Polls `GET path` on a fresh connection until it answers `status`.
pub async fn eventually_status(c: &TestCoordinator, path: &str, status: u16) -> Response {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = Client::new();
        if let Ok(r) = fresh.get(format!("{}{}", c.url, path)).send().await
            && r.status().as_u16() == status
        {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
