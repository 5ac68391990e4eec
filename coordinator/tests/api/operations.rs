//! Running a coordinator: keys, the ledger CLI, audits and repairs,
//! signals, metrics and replicas sharing a key.

use super::*;

#[tokio::test]
async fn health_keys_and_request_ids() {
    let c = TestCoordinator::start().await;
    let r = c.get("/health").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-request-id").is_some());
    assert!(r.headers().get("x-response-time").is_some());
    let health: Value = r.json().await.expect("json");
    let kid = health["kid"].as_str().expect("kid").to_string();

    // A request id sent by the client is kept.
    let r = c
        .http
        .get(format!("{}/health", c.url))
        .header("x-request-id", "my-id-123")
        .send()
        .await
        .expect("get");
    assert_eq!(r.headers()["x-request-id"], "my-id-123");

    let pk: Value = c.get("/public-key").await.json().await.expect("json");
    assert_eq!(pk["kid"], kid.as_str());
    assert!(
        pk["public_key"]
            .as_str()
            .expect("pem")
            .starts_with("-----BEGIN PUBLIC KEY-----")
    );
    let jwks: Value = c
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(jwks["keys"][0]["kid"], kid.as_str());
    assert_eq!(jwks["keys"][0]["alg"], "RS256");
    assert_eq!(jwks["keys"][0]["kty"], "RSA");

    let r = c.get("/no/such/route").await;
    assert_eq!(error_code(r).await, (404, "not_found".into()));
}

#[tokio::test]
async fn private_key_is_0400_and_survives_restart_with_balances() {
    let mut c = TestCoordinator::start().await;
    let key_path = c.dir.path().join("keys/ticket-signing.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path)
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
    }
    let kid1: Value = c.get("/public-key").await.json().await.expect("json");
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth: AuthorizeResponse = c
        .authorize(&user, &worker, MODEL)
        .await
        .json()
        .await
        .expect("auth");
    let before = c.balance(&user).await;

    c.restart_with(|_| {}).await;
    let kid2: Value = c.get("/public-key").await.json().await.expect("json");
    assert_eq!(kid1["kid"], kid2["kid"], "same key after restart");
    assert_eq!(c.balance(&user).await, before, "same balance after restart");
    // The worker is still registered with the same receipt key.
    let r = c
        .submit_receipt(
            &reg.receipt_key,
            &receipt_for(&auth.job_id, &user, &worker, MODEL, 1500),
            now_secs(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let s: SettlementResponse = r.json().await.expect("json");
    assert_eq!(s.cost, 1.5);
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_troop-coordinator")
}

/// `serve` on a port in use fails with "address in use" before it makes
/// a data folder or a key.
#[test]
fn serve_on_a_port_in_use_leaves_nothing_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = std::process::Command::new(bin())
        .args(["serve", "--listen", &addr, "--data"])
        .arg(&data)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("binding {addr}")), "{err}");
    assert!(err.contains("already in use"), "{err}");
    assert!(!data.exists(), "a data folder was made: {err}");
}

#[tokio::test]
async fn ledger_cli_audits_balances_and_history() {
    let mut c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    c.submit_receipt(
        &reg.receipt_key,
        &receipt_for(&auth.job_id, &user, &worker, MODEL, 2_000),
        now_secs(),
    )
    .await;
    let _open = c.ticket(&user, &worker, MODEL).await;
    c.stop().await;
    let data = c.dir.path().to_str().expect("utf8").to_string();
    let user_id = user.public().to_peer_id().to_base58();

    let out = std::process::Command::new(bin())
        .args(["ledger", "audit", "--data", &data])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "audit failed: {text}");
    assert!(text.contains("OK"));

    let out = std::process::Command::new(bin())
        .args(["ledger", "balance", &user_id, "--data", &data])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("available 3298.000"), "{text}");
    assert!(text.contains("pending   300.000"), "{text}");

    let out = std::process::Command::new(bin())
        .args(["ledger", "history", &user_id, "--data", &data, "--json"])
        .output()
        .expect("run");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, vec!["reserve", "settle", "reserve", "grant"]);

    // Tamper with a balance: the audit notices and exits non-zero.
    let conn = rusqlite_open(&c.dir.path().join("ledger.sqlite3"));
    conn.execute(
        "UPDATE accounts SET credits_posted = credits_posted + 1000 WHERE id = ?1",
        [&user_id],
    )
    .expect("tamper");
    drop(conn);
    let out = std::process::Command::new(bin())
        .args(["ledger", "audit", "--data", &data])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&user_id), "{text}");
}

#[tokio::test]
async fn ledger_audit_notices_a_doctored_audit_log() {
    let mut c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    c.register(&worker, &[MODEL]).await;
    assert_eq!(c.authorize(&user, &worker, MODEL).await.status(), 200);
    c.stop().await;
    let log = c.dir.path().join("logs/audit.log");
    let text = std::fs::read_to_string(&log).expect("log");
    let doctored: String = text
        .lines()
        .filter(|l| !l.contains("\"ledger.reserve\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&log, doctored).expect("write");
    let data = c.dir.path().to_str().expect("utf8");
    let out = std::process::Command::new(bin())
        .args(["ledger", "audit", "--data", data])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("missing from the audit log"), "{text}");
}

fn rusqlite_open(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("open sqlite")
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = http
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "server never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            assert!(s.success(), "exit status {s}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The ledger it left is whole.
    let out = std::process::Command::new(bin())
        .args(["ledger", "audit", "--data"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert!(out.status.success());
}

/// A crash between the ledger's commit and the audit log's flush loses the
/// log's tail: `ledger audit` calls that recoverable (exit 3), `ledger
/// repair` appends the lines on a stopped coordinator (and refuses on a
/// running one), and the audit passes again.
#[tokio::test]
async fn ledger_repair_restores_an_audit_log_cut_by_a_crash() {
    let mut c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    c.register(&worker, &[MODEL]).await;
    assert_eq!(c.authorize(&user, &worker, MODEL).await.status(), 200);
    let data = c.dir.path().to_str().expect("utf8").to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .output()
            .expect("run")
    };
    // Running: repair refuses (the server owns the audit log).
    let out = run(&["ledger", "repair", "--data", &data]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a coordinator is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.stop().await;
    // Cut the log where a crash would: just before the reservation's line.
    let log = c.dir.path().join("logs/audit.log");
    let text = std::fs::read_to_string(&log).expect("log");
    let cut = text.find("\"ledger.reserve\"").expect("reserve line");
    let start = text[..cut].rfind('\n').map_or(0, |i| i + 1);
    std::fs::write(&log, &text[..start]).expect("write");

    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains("recoverable"), "{said}");
    let out = run(&["ledger", "repair", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("appended 1"), "{said}");
    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    let out = run(&["ledger", "repair", "--data", &data]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to repair"));
}

/// A crash can lose a settlement's audit line while the ticket's
/// `authorize.granted` line for the same job, written before it, stays in
/// the log: that is a lost tail (exit 3) that `ledger repair` appends, not
/// a finding.
#[tokio::test]
async fn ledger_repair_restores_a_lost_settlement_line_after_its_ticket_line() {
    let mut c = TestCoordinator::start().await;
    let worker = generate();
    let user = generate();
    let reg = c.register(&worker, &[MODEL]).await;
    let auth = c.ticket(&user, &worker, MODEL).await;
    let r = c
        .submit_receipt(
            &reg.receipt_key,
            &receipt_for(&auth.job_id, &user, &worker, MODEL, 1_500),
            now_secs(),
        )
        .await;
    assert_eq!(r.status(), 200);
    c.stop().await;
    // Cut the log where a crash would: just before the settlement's line.
    let log = c.dir.path().join("logs/audit.log");
    let text = std::fs::read_to_string(&log).expect("log");
    let cut = text.find("\"ledger.settle\"").expect("settle line");
    let start = text[..cut].rfind('\n').map_or(0, |i| i + 1);
    let kept = &text[..start];
    assert!(
        kept.contains("\"authorize.granted\"") && kept.contains(auth.job_id.as_str()),
        "the ticket's line stays: {kept}"
    );
    std::fs::write(&log, kept).expect("write");

    let data = c.dir.path().to_str().expect("utf8").to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .output()
            .expect("run")
    };
    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{said}");
    let out = run(&["ledger", "repair", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("appended 1"), "{said}");
    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");

    // A line written after the settlement (its receipt replayed) in the
    // log while the settlement's line is not: removed, not a lost tail.
    let text = std::fs::read_to_string(&log).expect("log");
    let replay = json!({"ts_ms": 1, "event": "security.replay", "request_id": null,
        "kind": "receipt", "job_id": auth.job_id});
    let doctored: String = text
        .lines()
        .filter(|l| !l.contains("\"ledger.settle\""))
        .map(|l| format!("{l}\n"))
        .chain(std::iter::once(format!("{replay}\n")))
        .collect();
    std::fs::write(&log, doctored).expect("write");
    let out = run(&["ledger", "audit", "--data", &data]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("missing from the audit log"), "{said}");
}

/// With `--metrics-listen`, `/metrics` is served there and not on the
/// public address.
#[tokio::test]
async fn metrics_can_move_to_their_own_address() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let c = TestCoordinator::start_with(|cfg| cfg.metrics_listen = Some(maddr)).await;
    assert_eq!(c.get("/metrics").await.status(), 404);
    let text = reqwest::get(format!("http://{maddr}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(text.contains("troop_http_requests_total"), "{text}");
}

/// Replicas share one signing key (`keygen --out`, `serve --key-file`), and
/// a rotation lists the previous key in the JWKS: a ticket signed with the
/// old key by a replica not yet rotated still verifies with the keys the
/// rotated replica publishes.
#[tokio::test]
async fn replicas_share_a_key_file_and_a_rotation_keeps_old_tickets_valid() {
    use troop_coordinator::tickets::TicketKeys;
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (dir.path().join("old.pem"), dir.path().join("keys/new.pem"));
    let old_kid = TicketKeys::generate_to(&old).expect("old key");
    let new_kid = TicketKeys::generate_to(&new).expect("new key");
    assert_ne!(old_kid, new_kid);
    let again = TicketKeys::generate_to(&old).expect_err("never overwritten");
    assert!(again.to_string().contains("exists already"), "{again}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&old).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o400);
    }
    let o = old.clone();
    let a = TestCoordinator::start_with(move |cfg| cfg.key_file = Some(o)).await;
    let (n, o) = (new.clone(), old.clone());
    let b = TestCoordinator::start_with(move |cfg| {
        cfg.key_file = Some(n);
        cfg.previous_key_files = vec![o];
    })
    .await;
    let a2 = TestCoordinator::start_with({
        let o = old.clone();
        move |cfg| cfg.key_file = Some(o)
    })
    .await;
    let kid = |v: Value| v["kid"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        kid(a.get("/public-key").await.json().await.expect("json")),
        old_kid
    );
    assert_eq!(
        kid(a2.get("/public-key").await.json().await.expect("json")),
        old_kid
    );
    assert_eq!(
        kid(b.get("/public-key").await.json().await.expect("json")),
        new_kid
    );
    let jwks: Value = b
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert_eq!(kids, vec![new_kid.as_str(), old_kid.as_str()]);

    // A ticket from the replica still on the old key...
    let (worker, user) = (generate(), generate());
    a.register(&worker, &[MODEL]).await;
    let r = a.authorize(&user, &worker, MODEL).await;
    assert_eq!(r.status(), 200);
    let auth: AuthorizeResponse = r.json().await.expect("json");
    // ...verifies with what the rotated replica publishes, and with the
    // other replica's public key as well.
    let verifier = |jwks: &Value| {
        let mut v = TicketVerifier::new(worker.public().to_peer_id().to_base58());
        for k in jwks["keys"].as_array().expect("keys") {
            v.add_key_components(
                k["kid"].as_str().expect("kid"),
                k["n"].as_str().expect("n"),
                k["e"].as_str().expect("e"),
            )
            .expect("key");
        }
        v
    };
    let claims = verifier(&jwks)
        .check(&auth.ticket, now_secs())
        .expect("old-key ticket verifies");
    assert_eq!(claims.aud, worker.public().to_peer_id().to_base58());
    // Without the previous key, the JWKS of a coordinator on the new key
    // alone would not verify it.
    let c = TestCoordinator::start_with({
        let n = new.clone();
        move |cfg| cfg.key_file = Some(n)
    })
    .await;
    let only_new: Value = c
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .expect("json");
    assert!(verifier(&only_new).check(&auth.ticket, now_secs()).is_err());
}
