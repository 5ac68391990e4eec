//! Several coordinator replicas on one real PostgreSQL server (started by
//! the test): workers, tickets, receipts, nonces and quotas are shared; the
//! database going away turns `/health` to 503 and coming back heals it;
//! bad database URLs are refused at start.

mod common;

use common::pg;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::{TestCoordinator, eventually, free_port, now_secs, receipt_for};
use serde_json::{Value, json};
use troop_protocol::api::SettlementResponse;
use troop_protocol::identity::generate;
use troop_protocol::signed::sign_request;

const MODEL: &str = "gemma3:270m";

/// A PostgreSQL server, a database `name` on it and a ticket key for the
/// replicas to share; `None` when PostgreSQL is not installed.
fn shared_database(name: &str) -> Option<(pg::PgServer, String, std::path::PathBuf)> {
    let server = pg::PgServer::start()?;
    let url = server.create_db(name);
    let key = server.dir().join("ticket.pem");
    troop_coordinator::tickets::TicketKeys::generate_to(&key).expect("keygen");
    Some((server, url, key))
}

/// A POST signed once, to be sent as it is (a copy is the same bytes and
/// headers) to any replica; answers the status.
struct SignedCopy {
    path: &'static str,
    body: Vec<u8>,
    headers: troop_protocol::signed::SignedHeaders,
}

impl SignedCopy {
    fn new(key: &libp2p_identity::Keypair, path: &'static str, body: &Value, ts: u64) -> Self {
        let body = serde_json::to_vec(body).expect("json");
        let headers = sign_request(key, "POST", path, &body, ts);
        Self {
            path,
            body,
            headers,
        }
    }

    async fn send(&self, c: &TestCoordinator) -> reqwest::Response {
        let mut req = c
            .http
            .post(format!("{}{}", c.url, self.path))
            .header("content-type", "application/json")
            .body(self.body.clone());
        for (k, v) in self.headers.pairs() {
            req = req.header(k, v);
        }
        req.send().await.expect("POST")
    }
}

/// A replica on the shared database: `per_hour` tickets per user and
/// `per_ip` per address, 3 new worker ids per address.
async fn replica(url: &str, key: &std::path::Path, per_hour: u32, per_ip: u32) -> TestCoordinator {
    let url = url.to_string();
    let key = key.to_path_buf();
    TestCoordinator::start_with(move |c| {
        c.database = Some(url);
        c.key_file = Some(key);
        c.authorize_per_hour = per_hour;
        c.registrations_per_ip_per_hour = 3;
        c.authorize_per_ip_per_hour = per_ip;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_workers_tickets_receipts_nonces_and_quotas() {
    let Some((server, url, key)) = shared_database("replicas") else {
        return;
    };
    let r1 = Arc::new(replica(&url, &key, 3, 8).await);
    let r2 = Arc::new(replica(&url, &key, 3, 8).await);

    // A worker registers and beats on replica 1 ...
    let worker = generate();
    let user = generate();
    let reg = r1.register(&worker, &[MODEL]).await;
    let beat = r1.signed(&worker, "/workers/heartbeat", &json!({})).await;
    assert_eq!(beat.status(), 200);
    // ... replica 2 lists it without being told ...
    let wid = worker.public().to_peer_id().to_base58();
    eventually("replica 2 to list the worker", 10, || {
        let r2 = r2.clone();
        let wid = wid.clone();
        async move {
            let v: Value = r2.get("/workers").await.json().await.ok()?;
            v["workers"]
                .as_array()?
                .iter()
                .any(|w| w["peer_id"] == wid.as_str())
                .then_some(())
        }
    })
    .await;
    // ... sells its ticket, and the receipt settles on replica 1.
    let auth = r2.ticket(&user, &worker, MODEL).await;
    let r = r1
        .submit_receipt(
            &reg.receipt_key,
            &receipt_for(&auth.job_id, &user, &worker, MODEL, 1500),
            now_secs(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let s: SettlementResponse = r.json().await.expect("settlement");
    assert_eq!((s.cost, s.replayed), (1.5, false));
    assert_eq!(r2.balance(&user).await["debited"], 1.5);
    assert_eq!(r1.balance(&worker).await["available"], 1.5);

    // 3 tickets an hour per user, whichever replica sells them.
    assert_eq!(r1.authorize(&user, &worker, MODEL).await.status(), 200);
    assert_eq!(r2.authorize(&user, &worker, MODEL).await.status(), 200);
    for c in [&r1, &r2] {
        let r = c.authorize(&user, &worker, MODEL).await;
        assert_eq!(r.status(), 429, "the shared quota is spent");
        assert!(r.headers().get("retry-after").is_some());
    }

    // Heartbeats' nonces stay in the replica (issue 29): a copy sent to
    // the other one is taken and changes nothing (it was not signed after
    // the newest heartbeat recorded).
    let beat = SignedCopy::new(
        &worker,
        "/workers/heartbeat",
        &json!({ "models": [MODEL] }),
        now_secs(),
    );
    assert_eq!(beat.send(&r1).await.status(), 200);
    assert_eq!(beat.send(&r2).await.status(), 200);
    // Any other signed request replayed to the other replica is refused.
    let asked = SignedCopy::new(&worker, "/bench/challenge", &json!({}), now_secs());
    assert_ne!(asked.send(&r1).await.status(), 401);
    let again = asked.send(&r2).await;
    assert_eq!(again.status(), 401);
    let v: Value = again.json().await.expect("json");
    assert_eq!(v["error"]["code"], "replay");
    // So is a ticket request (its nonce is checked with its quotas, in one
    // statement): the copies draw on no quota (the per-address count
    // below would be off by two).
    let user4 = generate();
    let ask = SignedCopy::new(
        &user4,
        "/authorize",
        &json!({ "worker": wid, "model": MODEL }),
        now_secs(),
    );
    assert_eq!(ask.send(&r1).await.status(), 200);
    for c in [&r2, &r1] {
        let again = ask.send(c).await;
        assert_eq!(again.status(), 401);
        let v: Value = again.json().await.expect("json");
        assert_eq!(v["error"]["code"], "replay");
    }

    // 100 concurrent copies of one receipt over both replicas settle once.
    let user2 = generate();
    let auth = r1.ticket(&user2, &worker, MODEL).await;
    let receipt = receipt_for(&auth.job_id, &user2, &worker, MODEL, 1_000);
    let ts = now_secs();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let c = if i % 2 == 0 { r1.clone() } else { r2.clone() };
        let key = reg.receipt_key.clone();
        let receipt = receipt.clone();
        tasks.push(tokio::spawn(async move {
            let r = c.submit_receipt(&key, &receipt, ts).await;
            assert_eq!(r.status(), 200);
            r.json::<SettlementResponse>().await.expect("json")
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        let s = t.await.expect("task");
        assert_eq!((s.cost, s.refunded), (1.0, 299.0));
        fresh += usize::from(!s.replayed);
    }
    assert_eq!(fresh, 1, "exactly one settlement across replicas");
    assert_eq!(r2.balance(&worker).await["available"], 2.5);

    // The per-IP quotas are shared too: new worker ids (3 an hour; the
    // first worker was one) ...
    r2.register(&generate(), &[MODEL]).await;
    r1.register(&generate(), &[MODEL]).await;
    let r = r2
        .signed(
            &generate(),
            "/workers/register",
            &json!({ "models": [MODEL], "addresses": ["/ip4/127.0.0.1/tcp/4001"] }),
        )
        .await;
    assert_eq!(r.status(), 429, "the shared registration quota is spent");
    // ... and tickets per address (8 an hour: seven asked for so far, the
    // refused ones included, the replayed ones not; replica 2 alone saw
    // three).
    let user3 = generate();
    assert_eq!(r1.authorize(&user3, &worker, MODEL).await.status(), 200);
    let r = r2.authorize(&user3, &worker, MODEL).await;
    assert_eq!(r.status(), 429, "the shared per-address quota is spent");
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("authorize_ip"),
        "{v}"
    );

    // Each replica's audit log names it, and holds what it committed:
    // two settlements between them.
    let mut settles = 0;
    for c in [&r1, &r2] {
        let lines = c.audit_lines();
        let name = format!("{}", c.dir.path().display());
        assert!(
            lines
                .iter()
                .all(|l| l["replica"].as_str().is_some_and(|r| r.ends_with(&name))),
            "every line names its replica"
        );
        settles += lines
            .iter()
            .filter(|l| l["event"] == "ledger.settle")
            .count();
    }
    assert_eq!(settles, 2);

    // `ledger audit --database` finds everything in order, replica 1's
    // audit log against the transfers replica 1 committed included.
    let report = audit_replica(r1.dir.path(), &url).await;
    assert_eq!(report.totals.pending_jobs, 300_000 * 4, "four tickets open");
    // The same from the command line.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_troop-coordinator"))
            .args(args)
            .output()
            .expect("run troop-coordinator")
    };
    let url = server.url("replicas");
    let out = cli(&["ledger", "audit", "--database", &url]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    let worker_id = worker.public().to_peer_id().to_base58();
    let out = cli(&["ledger", "balance", &worker_id, "--database", &url]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("available 2.500"),
        "{out:?}"
    );
    let out = cli(&[
        "ledger",
        "history",
        &worker_id,
        "--json",
        "--database",
        &url,
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        8,
        "{out:?}"
    );
    let out = cli(&["migrate", "--database", &url]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 step(s) applied"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answers_503_while_postgres_is_down_and_heals_by_itself() {
    let Some((server, url, key)) = shared_database("outage") else {
        return;
    };
    let r1 = Arc::new(replica(&url, &key, 100, 100_000).await);
    let worker = generate();
    let user = generate();
    r1.register(&worker, &[MODEL]).await;
    assert_eq!(r1.get("/health").await.status(), 200);

    server.stop();
    let r = r1.authorize(&user, &worker, MODEL).await;
    assert_eq!(r.status(), 503, "no ticket without the ledger");
    let reason = eventually("/health to say the database is down", 20, || {
        let r1 = r1.clone();
        async move {
            let r = r1.get("/health").await;
            if r.status() != 503 {
                return None;
            }
            let v: Value = r.json().await.ok()?;
            v["reason"].as_str().map(str::to_string)
        }
    })
    .await;
    assert!(!reason.is_empty());

    server.start_again();
    eventually("/health to recover", 30, || {
        let r1 = r1.clone();
        async move { (r1.get("/health").await.status() == 200).then_some(()) }
    })
    .await;
    assert_eq!(r1.authorize(&user, &worker, MODEL).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_database_urls_are_refused_or_waited_for() {
    let Some(server) = pg::PgServer::start() else {
        return;
    };
    // A database that does not exist: one line, exit code 2.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_troop-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--database"])
        .arg(server.url("no_such_db"))
        .arg("--data")
        .arg(dir.path())
        .output()
        .expect("run troop-coordinator");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error:") && last.contains("no_such_db"),
        "{err}"
    );

    // A schema newer than this build: refused with a clear message.
    let url = server.create_db("newer");
    pg::PgServer::with_client(&url, |c| {
        troop_coordinator::pg::migrate(c).expect("migrate");
        c.execute(
            "INSERT INTO troop_schema (version, applied_at_ms) VALUES (99, 0)",
            &[],
        )
        .expect("a future version");
    });
    let url2 = url.clone();
    let e = match TestCoordinator::start_with_result(move |cfg| cfg.database = Some(url2)).await {
        Ok(_) => panic!("a newer schema must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("newer"), "{e}");

    // A server that does not answer: the replica starts and says why.
    let port = free_port();
    let nobody = format!("postgres://troop@127.0.0.1:{port}/x");
    let c = TestCoordinator::start_with(move |cfg| cfg.database = Some(nobody)).await;
    let r = c.get("/health").await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("json");
    assert!(v["reason"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
}

/// `kill -9` of a replica in the middle of a stream of receipts: every
/// receipt it answered 200 is settled in the database, the others settle on
/// the surviving replica when sent again, and `ledger audit` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_replica_under_load_loses_no_acknowledged_settlement() {
    let Some((_server, url, key)) = shared_database("kill9") else {
        return;
    };
    let r1 = Arc::new(replica(&url, &key, 100_000, 100_000).await);
    let worker = generate();
    let reg = r1.register(&worker, &[MODEL]).await;

    // Replica 2 is the real binary, so that it can be killed.
    let port = free_port();
    let data = tempfile::tempdir().expect("tempdir");
    let start_replica_2 = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_troop-coordinator"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--database")
            .arg(&url)
            .arg("--key-file")
            .arg(&key)
            .arg("--data")
            .arg(data.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start replica 2")
    };
    let mut child = start_replica_2();
    let r2 = Arc::new(TestCoordinator {
        postgres: None,
        dir: tempfile::tempdir().expect("tempdir"),
        running: None,
        url: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
    });
    eventually("replica 2 to be healthy", 30, || {
        let r2 = r2.clone();
        async move { (r2.get_maybe("/health").await == Some(200)).then_some(()) }
    })
    .await;

    let mut receipts = Vec::new();
    for i in 0..150 {
        let user = generate();
        let auth = r1.ticket(&user, &worker, MODEL).await;
        receipts.push(receipt_for(&auth.job_id, &user, &worker, MODEL, 1000 + i));
    }
    let ts = now_secs();
    let mut tasks = Vec::new();
    for r in receipts.clone() {
        let r2 = r2.clone();
        let key = reg.receipt_key.clone();
        tasks.push(tokio::spawn(async move {
            let status = r2.try_submit_receipt(&key, &r, ts).await.ok();
            (r.job_id.clone(), status)
        }));
    }
    // Kill it once 30 receipts were answered, while the rest are in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tasks.iter().filter(|t| t.is_finished()).count() < 30 {
        assert!(Instant::now() < deadline, "no receipt was answered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    let mut acknowledged = Vec::new();
    for t in tasks {
        let (job, status) = t.await.expect("task");
        if status == Some(200) {
            acknowledged.push(job);
        }
    }
    assert!(!acknowledged.is_empty());
    // Every acknowledged settlement is in the database.
    let url2 = url.clone();
    let acked = acknowledged.clone();
    let posted = tokio::task::spawn_blocking(move || {
        pg::PgServer::with_client(&url2, |c| {
            acked
                .iter()
                .filter(|j| {
                    c.query_one("SELECT state FROM jobs WHERE job_id = $1", &[j])
                        .map(|r| r.get::<_, String>(0) == "posted")
                        .unwrap_or(false)
                })
                .count()
        })
    })
    .await
    .expect("query");
    assert_eq!(
        posted,
        acknowledged.len(),
        "an acknowledged settlement was lost"
    );
    // The rest settle on replica 1, each once.
    for r in &receipts {
        let resp = r1.submit_receipt(&reg.receipt_key, r, now_secs()).await;
        assert_eq!(resp.status(), 200);
        let s: SettlementResponse = resp.json().await.expect("json");
        // Acknowledged ones are replays; the others may be too (committed
        // by replica 2 just before it died, never answered).
        if acknowledged.contains(&r.job_id) {
            assert!(s.replayed);
        }
    }
    let report = audit_replica(r1.dir.path(), &url).await;
    assert_eq!(report.totals.pending_jobs, 0);

    // Replica 2's audit log, cut where a crash before its flush cuts it
    // (at its last settlement line, whatever the kill left):
    // `ledger audit --database` on its folder calls the missing tail
    // recoverable, `ledger repair --database` appends it from the
    // transfers replica 2 committed, and the audit then passes, while
    // replica 1 keeps serving.
    let log2 = data.path().join("logs/audit.log");
    let text = std::fs::read_to_string(&log2).expect("replica 2's audit log");
    let last = text
        .rfind("\"ledger.settle\"")
        .expect("replica 2 logged a settlement");
    let cut = text[..last].rfind('\n').map_or(0, |i| i + 1);
    let kept_settles = text[..cut].matches("\"ledger.settle\"").count();
    std::fs::write(&log2, &text[..cut]).expect("cut the log");
    let ledger = |verb: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_troop-coordinator"))
            .args(["ledger", verb, "--database", &url, "--data"])
            .arg(data.path())
            .output()
            .expect("run troop-coordinator ledger");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (out.status.code(), text)
    };
    let (code, text) = ledger("audit");
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("recoverable"), "{text}");
    let (code, text) = ledger("repair");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("appended"), "{text}");
    let (code, text) = ledger("audit");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("OK"), "{text}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log2)
        .expect("log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let recovered: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["recovered"] == true).collect();
    assert!(!recovered.is_empty());
    let name = data.path().display().to_string();
    for l in &recovered {
        assert_eq!(l["event"], "ledger.settle", "{l}");
        assert!(
            l["replica"].as_str().is_some_and(|r| r.ends_with(&name)),
            "a recovered line names replica 2: {l}"
        );
    }
    // Every settlement replica 2 committed is in its log once.
    let settled_by_2 = tokio::task::spawn_blocking({
        let url = url.clone();
        let name = name.clone();
        move || {
            pg::PgServer::with_client(&url, |c| {
                c.query_one(
                    "SELECT count(*) FROM transfers WHERE kind = 'settle' AND replica LIKE '%' || $1",
                    &[&name],
                )
                .map(|r| r.get::<_, i64>(0))
                .expect("count")
            })
        }
    })
    .await
    .expect("query");
    assert_eq!(
        settled_by_2 as usize,
        kept_settles + recovered.len(),
        "replica 2's log holds each of its settlements once"
    );
    // The same cut mended by replica 2's next start instead.
    let text = std::fs::read_to_string(&log2).expect("log");
    let cut = text[..text.rfind("\"ledger.settle\"").expect("a settlement")]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    std::fs::write(&log2, &text[..cut]).expect("cut the log");
    assert_eq!(ledger("audit").0, Some(3));
    let mut child = start_replica_2();
    eventually("replica 2 to be healthy again", 30, || {
        let r2 = r2.clone();
        async move { (r2.get_maybe("/health").await == Some(200)).then_some(()) }
    })
    .await;
    child.kill().expect("stop replica 2");
    let _ = child.wait();
    let (code, text) = ledger("audit");
    assert_eq!(code, Some(0), "after a restart: {text}");
    eprintln!(
        "replica 2 acknowledged {} of {} receipts before kill -9",
        acknowledged.len(),
        receipts.len()
    );
}

/// A worker registered on one replica sells a ticket on another at once,
/// before that replica's refresh (every second) has heard of it: the
/// replica reads the database before refusing. Its receipt settles there
/// too, and it may ask there for a proof-of-hardware challenge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_for_a_worker_registered_on_another_replica_just_now_is_sold() {
    let Some((_server, url, key)) = shared_database("fresh_worker") else {
        return;
    };
    let r1 = replica(&url, &key, 10, 100).await;
    let r2 = replica(&url, &key, 10, 100).await;
    let worker = generate();
    let user = generate();
    let wid = worker.public().to_peer_id().to_base58();
    // Replica 2 has not heard of the worker yet (its refresh may have run
    // since the registration: forget what it learnt, as it would not have).
    let forget = |c: &TestCoordinator| {
        if let Some(running) = &c.running
            && let Ok(mut map) = running.state.workers.write()
        {
            map.remove(&wid);
        }
    };
    let reg = r1.register(&worker, &[MODEL]).await;
    forget(&r2);
    let r = r2.authorize(&user, &worker, MODEL).await;
    let status = r.status();
    let text = r.text().await.expect("body");
    assert_eq!(status, 200, "{text}");
    let auth: troop_protocol::api::AuthorizeResponse = serde_json::from_str(&text).expect("ticket");
    forget(&r2);
    let r = r2
        .submit_receipt(
            &reg.receipt_key,
            &receipt_for(&auth.job_id, &user, &worker, MODEL, 1500),
            now_secs(),
        )
        .await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    forget(&r2);
    let r = r2.signed(&worker, "/bench/challenge", &json!({})).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    // `GET /workers?peer=` finds it too (`troop doctor` asks this way).
    forget(&r2);
    let one: Value = r2
        .get(&format!("/workers?peer={wid}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(one["workers"][0]["peer_id"], wid.as_str(), "{one}");
    // A worker nobody registered is still refused.
    let stranger = generate();
    let r = r2.authorize(&user, &stranger, MODEL).await;
    assert_eq!(r.status(), 503);
}

/// A proof-of-hardware round may span replicas: the challenge from one,
/// the root to the other, the openings back to the first; its one try is
/// spent on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_of_hardware_round_spans_replicas() {
    let Some((_server, url, key)) = shared_database("proof") else {
        return;
    };
    let small = |url: String, key: std::path::PathBuf| {
        TestCoordinator::start_with(move |c| {
            c.database = Some(url);
            c.key_file = Some(key);
            c.bench_size = 64;
            c.bench_rounds = 2;
            c.reference_gflops = 1e-6; // any machine earns the cap here
        })
    };
    let r1 = Arc::new(small(url.clone(), key.clone()).await);
    let r2 = Arc::new(small(url, key).await);
    let w = generate();
    r1.register(&w, &[MODEL]).await;
    let sign = |c: &Arc<TestCoordinator>, path: &'static str, body: Value| {
        let c = c.clone();
        let w = w.clone();
        async move {
            let r = c.signed(&w, path, &body).await;
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.expect("json"))
        }
    };
    let (s, v) = sign(&r1, "/bench/challenge", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let id = v["challenge_id"].as_str().expect("id").to_string();
    let ch = troop_bench_kernels::Challenge {
        seed: v["seed"].as_str().expect("seed").into(),
        n: v["n"].as_u64().expect("n") as usize,
        rounds: v["rounds"].as_u64().expect("rounds") as u32,
    };
    let proof = tokio::task::spawn_blocking(move || {
        troop_bench_kernels::prove(&ch, troop_bench_kernels::Backend::Cpu, None, |_, _| {})
            .expect("prove")
    })
    .await
    .expect("prover");
    let (s, asked) = sign(
        &r2,
        "/bench/submit",
        json!({"challenge_id": id, "root": proof.root_hex()}),
    )
    .await;
    assert_eq!(s, 200, "{asked}");
    let rows = serde_json::from_value::<troop_protocol::api::BenchRows>(asked)
        .expect("rows")
        .rows;
    let (s, verdict) = sign(
        &r1,
        "/bench/submit",
        json!({"challenge_id": id, "openings": proof.openings(&rows)}),
    )
    .await;
    assert_eq!(s, 200, "{verdict}");
    assert_eq!(verdict["hardware_multiplier"], 8.0);
    // The try is spent on both replicas.
    for c in [&r1, &r2] {
        let (s, _) = sign(
            c,
            "/bench/submit",
            json!({"challenge_id": id, "openings": proof.openings(&rows)}),
        )
        .await;
        assert_eq!(s, 404);
    }
}

/// Issue 29: the writer pipelines a batch's statements, so a batch of
/// settlements costs a few round trips to PostgreSQL whatever its size
/// (counted by the writer's own connection), and every settlement is
/// still paid exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_settlements_is_a_few_round_trips_whatever_its_size() {
    use troop_coordinator::pg::pipe;
    let Some((_server, url, key)) = shared_database("pipeline") else {
        return;
    };
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let c = TestCoordinator::start_with(move |c| {
        c.database = Some(url);
        c.key_file = Some(key);
        c.authorize_per_hour = 100_000;
        c.authorize_per_ip_per_hour = 100_000;
        // No expiry sweep in the middle of the count.
        c.sweep_interval = Duration::from_secs(3600);
    })
    .await;
    let worker = generate();
    c.register(&worker, &[MODEL]).await;
    let users: Vec<_> = (0..20).map(|_| generate()).collect();
    let mut jobs = Vec::new();
    for i in 0..200 {
        let user = &users[i % users.len()];
        jobs.push((i % users.len(), c.ticket(user, &worker, MODEL).await.job_id));
    }
    let state = c.running.as_ref().expect("running").state.clone();
    let settle = |(u, job): (usize, String)| {
        let state = state.clone();
        let receipt = receipt_for(&job, &users[u], &worker, MODEL, 1500);
        async move { common::settle_through_writer(&state, receipt).await }
    };
    // A few first, so every statement is prepared before counting.
    for j in jobs.drain(..4) {
        settle(j).await;
    }
    // The database counts the statements on each ledger table and the
    // writes of the totals row.
    db.batch_execute(
        "CREATE TABLE test_statements (tbl TEXT NOT NULL);
         CREATE TABLE test_totals_writes (n BIGINT NOT NULL);
         CREATE FUNCTION test_count_statement() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO test_statements VALUES (TG_TABLE_NAME); RETURN NULL; END $$;
         CREATE FUNCTION test_count_totals() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO test_totals_writes VALUES (1); RETURN NULL; END $$;
         CREATE TRIGGER test_count_statement AFTER UPDATE ON accounts
             FOR EACH STATEMENT EXECUTE FUNCTION test_count_statement();
         CREATE TRIGGER test_count_statement AFTER INSERT ON transfers
             FOR EACH STATEMENT EXECUTE FUNCTION test_count_statement();
         CREATE TRIGGER test_count_statement AFTER UPDATE ON jobs
             FOR EACH STATEMENT EXECUTE FUNCTION test_count_statement();
         -- An upsert fires both INSERT and UPDATE statement triggers.
         CREATE TRIGGER test_count_statement AFTER INSERT ON reputation
             FOR EACH STATEMENT EXECUTE FUNCTION test_count_statement();
         CREATE TRIGGER test_count_totals AFTER UPDATE ON ledger_totals
             FOR EACH ROW EXECUTE FUNCTION test_count_totals();",
    )
    .await
    .expect("counting triggers");
    let (trips, batches, careful) = (pipe::round_trips(), pipe::batches(), pipe::careful_passes());
    let n = jobs.len() as u64;
    futures::future::join_all(jobs.into_iter().map(settle)).await;
    let trips = pipe::round_trips() - trips;
    let batches = pipe::batches() - batches;
    let statements: Vec<(String, i64)> = db
        .query(
            "SELECT tbl, COUNT(*) FROM test_statements GROUP BY tbl ORDER BY tbl",
            &[],
        )
        .await
        .expect("statements")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let totals_writes: i64 = db
        .query_one("SELECT COUNT(*) FROM test_totals_writes", &[])
        .await
        .expect("totals writes")
        .get(0);
    println!(
        "{n} settlements: {batches} batches, {trips} round trips, statements {statements:?}, totals row written {totals_writes} times"
    );
    // One statement per table per batch (issue 29: they were 6 per
    // settlement, and the totals row was written 3 times per settlement).
    for (table, count) in &statements {
        assert!(
            *count as u64 <= batches,
            "{count} statements on {table} for {batches} batches of {n} settlements"
        );
    }
    assert_eq!(statements.len(), 4, "{statements:?}");
    assert!(
        totals_writes as u64 <= 2 * batches,
        "the totals row was written {totals_writes} times in {batches} batches"
    );
    assert_eq!(
        pipe::careful_passes(),
        careful,
        "no batch needed the careful pass"
    );
    assert!(batches >= 1 && batches < n, "the settlements were batched");
    // Begin with the reads ahead, every write with the invariants, commit.
    assert!(
        trips <= 3 * batches,
        "{trips} round trips for {batches} batches of {n} settlements"
    );
    // Every settlement paid the worker 1.5 s at multiplier 1.
    assert_eq!(c.balance(&worker).await["available"], 1.5 * 200.0);
    for u in &users {
        assert_eq!(c.balance(u).await["debited"], 1.5 * 10.0);
    }
}

/// Issue 29: heartbeats that only say "still here" are kept by the replica
/// and written together every --heartbeat-flush-secs, so a flood of them
/// makes a bounded number of database writes (counted by triggers in the
/// database) and no nonce rows; the other replica still sees the workers'
/// liveness, and a worker that left is not brought back by a copy of an
/// older heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_flood_makes_a_bounded_number_of_database_writes() {
    let Some((_server, url, key)) = shared_database("beats") else {
        return;
    };
    let replica = |url: String, key: std::path::PathBuf| {
        TestCoordinator::start_with(move |c| {
            c.database = Some(url);
            c.key_file = Some(key);
            c.registrations_per_ip_per_hour = 1_000;
            c.heartbeat_flush = Duration::from_secs(1);
        })
    };
    let r1 = Arc::new(replica(url.clone(), key.clone()).await);
    let r2 = replica(url.clone(), key).await;
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    db.batch_execute(
        "CREATE TABLE test_worker_writes (rows BIGINT NOT NULL);
         INSERT INTO test_worker_writes VALUES (0);
         CREATE TABLE test_worker_txs (tx BIGINT PRIMARY KEY);
         CREATE FUNCTION test_count_row() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN UPDATE test_worker_writes SET rows = rows + 1; RETURN NULL; END $$;
         CREATE FUNCTION test_count_tx() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO test_worker_txs VALUES (txid_current()) ON CONFLICT DO NOTHING;
         RETURN NULL; END $$;
         CREATE TRIGGER test_count_row AFTER UPDATE ON workers
             FOR EACH ROW EXECUTE FUNCTION test_count_row();
         CREATE TRIGGER test_count_tx AFTER UPDATE ON workers
             FOR EACH STATEMENT EXECUTE FUNCTION test_count_tx();",
    )
    .await
    .expect("counting triggers");
    let count = |sql: &'static str| {
        let db = &db;
        async move {
            db.query_one(sql, &[])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };
    let workers: Vec<_> = (0..20).map(|_| generate()).collect();
    for w in &workers {
        r1.register(w, &[MODEL]).await;
    }
    // Replica 2 reads only the workers that changed (migration 10), not
    // every live one each second: once it has the 20, the flood (liveness
    // only) brings it none of them again.
    let refresh = |c: &TestCoordinator| {
        let r = &c.running.as_ref().expect("running").state.worker_refresh;
        (r.reads.load(Relaxed), r.rows.load(Relaxed))
    };
    eventually("replica 2 to list the 20 workers", 15, || async {
        let v: Value = r2.get("/workers").await.json().await.ok()?;
        (v["workers"].as_array()?.len() == 20).then_some(())
    })
    .await;
    let (rows0, txs0, nonces0) = (
        count("SELECT rows FROM test_worker_writes").await,
        count("SELECT COUNT(*) FROM test_worker_txs").await,
        count("SELECT COUNT(*) FROM request_nonces").await,
    );
    // 50 heartbeats from each of 20 workers, as fast as they are answered:
    // each signed a second after the one before (a heartbeat not newer
    // than the last is a replay), the workers side by side.
    let per_worker = 50u64;
    let t0 = now_secs();
    let start = Instant::now();
    let statuses: Vec<Vec<u16>> = futures::future::join_all(workers.iter().map(|w| {
        let r1 = r1.clone();
        let w = w.clone();
        async move {
            let mut out = Vec::new();
            for j in 0..per_worker {
                let body = serde_json::to_vec(&json!({ "models": [MODEL] })).expect("json");
                let r = r1.signed_raw(&w, "/workers/heartbeat", body, t0 + j).await;
                out.push(r.status().as_u16());
            }
            out
        }
    }))
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let sent = statuses.iter().map(Vec::len).sum::<usize>();
    assert!(
        statuses.iter().flatten().all(|s| *s == 200),
        "every heartbeat accepted: {statuses:?}"
    );
    // Every kept beat is written within the next flush.
    let end = now_secs();
    let wid = workers[0].public().to_peer_id().to_base58();
    eventually(
        "replica 2 to see the flood's last heartbeats",
        15,
        || async {
            let v: Value = r2.get("/workers").await.json().await.ok()?;
            let w = v["workers"]
                .as_array()?
                .iter()
                .find(|w| w["peer_id"] == wid.as_str())?
                .clone();
            (w["last_seen"].as_u64()? + 2 >= end).then_some(())
        },
    )
    .await;
    // The kept beats reach the table (one statement a flush).
    eventually("the flood's heartbeats to be written", 15, || async {
        let signed = count("SELECT COUNT(*) FROM workers WHERE last_signed IS NOT NULL").await;
        (signed == 20).then_some(())
    })
    .await;
    let rows = count("SELECT rows FROM test_worker_writes").await - rows0;
    let txs = count("SELECT COUNT(*) FROM test_worker_txs").await - txs0;
    let nonces = count("SELECT COUNT(*) FROM request_nonces").await - nonces0;
    let flushes = elapsed.ceil() as i64 + 3;
    println!(
        "{sent} heartbeats in {elapsed:.1} s ({:.0}/s): {txs} transactions and {rows} rows \
         written on workers, {nonces} nonces",
        sent as f64 / elapsed
    );
    assert!(
        txs <= flushes,
        "{txs} transactions for {sent} heartbeats over {flushes} flushes"
    );
    assert!(
        rows <= 20 * flushes,
        "{rows} rows written for {sent} heartbeats over {flushes} flushes of 20 workers"
    );
    assert_eq!(nonces, 0, "heartbeats' nonces stay in the replica");
    // Once the flood is written (its beats may have crossed into the next
    // 30 s and so changed every row) and replica 2 has read once more, the
    // table stands still: its next reads take (almost) nothing.
    let (after_flood, _) = refresh(&r2);
    eventually("replica 2 to read the written flood", 15, || async {
        (refresh(&r2).0 > after_flood).then_some(())
    })
    .await;
    let (reads0, read_rows0) = refresh(&r2);
    eventually("replica 2 to read the table 3 more times", 15, || async {
        (refresh(&r2).0 >= reads0 + 3).then_some(())
    })
    .await;
    let (reads, read_rows) = refresh(&r2);
    assert!(
        read_rows - read_rows0 < 20,
        "replica 2 read {} worker rows in {} reads of an unchanged table of 20",
        read_rows - read_rows0,
        reads - reads0
    );

    // A worker beats, leaves; a copy of its earlier heartbeat brings it
    // back on neither replica.
    let w = &workers[1];
    let wid = w.public().to_peer_id().to_base58();
    // Signed after its flood's heartbeats, by the same (fast) clock.
    let signed_at = t0 + per_worker;
    let beat = SignedCopy::new(
        w,
        "/workers/heartbeat",
        &json!({ "models": [MODEL] }),
        signed_at,
    );
    assert_eq!(beat.send(&r1).await.status(), 200);
    let leave = serde_json::to_vec(&json!({})).expect("json");
    assert_eq!(
        r1.signed_raw(w, "/workers/leave", leave, signed_at + 1)
            .await
            .status(),
        200
    );
    // The replica that took it knows its nonce; the other takes the copy,
    // which changes nothing.
    assert_eq!(beat.send(&r1).await.status(), 401);
    assert_eq!(beat.send(&r2).await.status(), 200);
    let gone = |v: &Value| {
        v["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|x| x["peer_id"] == wid.as_str()))
            .is_some_and(|row| row["alive"] == false)
    };
    let v: Value = r1.get("/workers").await.json().await.expect("json");
    assert!(gone(&v), "replica 1 lists the worker as gone: {v}");
    eventually("replica 2 to list the worker as gone", 15, || async {
        let v: Value = r2.get("/workers").await.json().await.ok()?;
        gone(&v).then_some(())
    })
    .await;

    // Liveness alone marks a row changed (for other replicas to read) when
    // last_seen crosses into the next 30 s, however small each step: a
    // worker beating every 20 s is read by the others at least every 30 s.
    let wid = workers[2].public().to_peer_id().to_base58();
    let stamp = |seen: i64| {
        let (db, wid) = (&db, wid.clone());
        async move {
            db.execute(
                "UPDATE workers SET last_seen = $1 WHERE peer_id = $2",
                &[&seen, &wid],
            )
            .await
            .expect("update");
            db.query_one(
                "SELECT changed_xid::text FROM workers WHERE peer_id = $1",
                &[&wid],
            )
            .await
            .expect("changed_xid")
            .get::<_, String>(0)
        }
    };
    let at60 = stamp(60).await;
    assert_eq!(stamp(80).await, at60, "20 s within the slot: not a change");
    assert_eq!(stamp(89).await, at60, "still within the slot");
    assert_ne!(stamp(100).await, at60, "into the next 30 s: a change");
}

/// `ledger audit --database` of one replica's folder while it may still be
/// writing its log: polled until it finds nothing (a line being written at
/// the moment of reading is a torn line) or 10 s pass; its last report.
async fn audit_replica(dir: &std::path::Path, url: &str) -> troop_coordinator::admin::AuditReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (dir2, url2) = (dir.to_path_buf(), url.to_string());
        let report = tokio::task::spawn_blocking(move || {
            troop_coordinator::admin::audit(&dir2, Some(&url2)).expect("audit")
        })
        .await
        .expect("audit thread");
        if report.findings.is_empty() {
            return report;
        }
        assert!(Instant::now() < deadline, "{:?}", report.findings);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
