//! Random sequences of ledger operations (grant, authorize, settle, fail,
//! replay, expire) against the real SQLite ledger, the real PostgreSQL
//! ledger (a server started by the test) and a small in-memory model;
//! balances and the invariant are compared after every step.
//! Receipts come as old single-job receipts (charged as one unacknowledged
//! request: at most the cap) and as session receipts whose request carries
//! the user's signed acknowledgement (charged the lesser of the worker's
//! and the user's time), always inside the ticket-to-receipt window.

use std::collections::HashMap;

mod pg;

use proptest::prelude::*;
use rusqlite::Connection;
use troop_coordinator::db::{Db, Lite, Pg, StatementCache};
use troop_coordinator::ledger::{self, Command, LedgerError, Outcome};
use troop_coordinator::pg::pipe;
use troop_protocol::receipt::{JobStatus, Receipt};
use troop_protocol::usage::{Ack, LineStatus, RequestLine};

const T0: u64 = 1_000_000_000;
const CAP_MS: u64 = 10_000;

thread_local! {
    static KEYS: Vec<libp2p_identity::Keypair> = (0..3).map(|_| troop_protocol::identity::generate()).collect();
}

fn user_id(i: usize) -> String {
    KEYS.with(|k| k[i].public().to_peer_id().to_base58())
}

fn user_key(id: &str) -> Option<libp2p_identity::Keypair> {
    KEYS.with(|k| {
        k.iter()
            .find(|k| k.public().to_peer_id().to_base58() == id)
            .cloned()
    })
}

const USERS: usize = 3;
const WORKERS: [(&str, i64); 2] = [("worker-x", 1000), ("worker-y", 2500)];
const STARTER: i64 = 3_600_000;
const RESERVE_SECS: i64 = 300;

#[derive(Debug, Clone)]
enum Op {
    Authorize {
        user: usize,
        worker: usize,
    },
    Receipt {
        job: usize,
        millis: u64,
        status: u8,
        ack: Option<u64>,
    },
    Replay {
        job: usize,
    },
    Expire {
        cutoff: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..USERS, 0..WORKERS.len()).prop_map(|(user, worker)| Op::Authorize { user, worker }),
        3 => (0..40usize, 0..400_000u64, 0..3u8, proptest::option::of(0..400_000u64))
            .prop_map(|(job, millis, status, ack)| Op::Receipt { job, millis, status, ack }),
        1 => (0..40usize).prop_map(|job| Op::Replay { job }),
        1 => (0..60u64).prop_map(|cutoff| Op::Expire { cutoff }),
    ]
}

#[derive(Debug, Clone, PartialEq)]
enum JobState {
    Pending,
    Posted,
    Voided,
}

#[derive(Debug, Clone)]
struct ModelJob {
    id: String,
    user: String,
    worker: String,
    reserved: i64,
    multiplier: i64,
    expires_at: u64,
    created_ms: u64,
    state: JobState,
    receipt: Option<(Receipt, String, i64)>,
}

#[derive(Default)]
struct Model {
    /// account -> (credits_posted - debits_posted, debits_pending)
    accounts: HashMap<String, (i64, i64)>,
    granted: std::collections::HashSet<String>,
    minted: i64,
    jobs: Vec<ModelJob>,
}

fn run(conn: &mut Connection, cmd: Command) -> Result<Outcome, LedgerError> {
    let tx = conn.transaction().expect("tx");
    let mut events = Vec::new();
    let out = ledger::apply(&mut Lite(&tx), &cmd, &mut events);
    match out {
        Ok(o) => {
            ledger::check_invariants(&mut Lite(&tx)).expect("invariant inside the transaction");
            tx.commit().expect("commit");
            Ok(o)
        }
        Err(e) => {
            drop(tx);
            Err(e)
        }
    }
}

/// The ledger under test: SQLite or PostgreSQL.
enum Store<'a> {
    Lite(&'a mut Connection),
    Pg(&'a mut postgres::Client, StatementCache),
    /// The writer's pipelined connection, each command a batch of its own.
    Pipe(&'a mut pipe::Pipe),
}

impl Store<'_> {
    /// One command in its own transaction, the invariants checked before
    /// the commit, as the writer does it.
    fn run(&mut self, cmd: Command) -> Result<Outcome, LedgerError> {
        match self {
            Store::Lite(conn) => run(conn, cmd),
            Store::Pipe(p) => {
                let mut out = pipe::run_commands(p, &[&cmd]).expect("the batch commits");
                out.pop().expect("one result").0
            }
            Store::Pg(client, cache) => {
                let mut tx = client.transaction().expect("tx");
                let mut events = Vec::new();
                let mut db = Pg {
                    client: &mut tx,
                    cache,
                };
                let out = ledger::apply(&mut db, &cmd, &mut events);
                match out {
                    Ok(o) => {
                        ledger::check_invariants(&mut db)
                            .expect("invariant inside the transaction");
                        tx.commit().expect("commit");
                        Ok(o)
                    }
                    Err(e) => {
                        tx.rollback().expect("rollback");
                        Err(e)
                    }
                }
            }
        }
    }

    fn db(&mut self) -> Box<dyn Db + '_> {
        match self {
            Store::Lite(conn) => Box::new(Lite(conn)),
            Store::Pipe(p) => Box::new(&mut **p),
            Store::Pg(client, cache) => Box::new(Pg {
                client: &mut **client,
                cache,
            }),
        }
    }
}

fn receipt(job: &ModelJob, millis: u64, status: JobStatus, ack: Option<u64>) -> Receipt {
    let started_at = job.created_ms + 500;
    let requests = match ack {
        None => Vec::new(),
        Some(observed) => {
            let key = user_key(&job.user).expect("a test user");
            vec![RequestLine {
                index: 0,
                started_at,
                finished_at: started_at + millis,
                prompt_tokens: 1,
                completion_tokens: millis,
                chunks: millis,
                status: match status {
                    JobStatus::Completed => LineStatus::Completed,
                    JobStatus::Failed => LineStatus::Failed,
                    JobStatus::Cancelled => LineStatus::Cancelled,
                },
                ack: Some(Ack::sign(
                    &key,
                    &job.id,
                    &job.worker,
                    0,
                    millis,
                    millis,
                    observed,
                )),
            }]
        }
    };
    Receipt {
        job_id: job.id.clone(),
        worker: job.worker.clone(),
        user: job.user.clone(),
        model: "m".into(),
        prompt_tokens: 1,
        completion_tokens: millis,
        started_at,
        finished_at: started_at + millis,
        status,
        requests,
    }
}

/// Receipts arrive well after the work they describe.
fn settle_ms(step: u64) -> u64 {
    T0 + step * 1000 + 1_000_000
}

fn check(store: &mut Store<'_>, model: &Model) -> Result<(), TestCaseError> {
    let mut conn = store.db();
    let conn = &mut *conn;
    for (id, (posted, pending)) in &model.accounts {
        let r = conn
            .query_one(
                "SELECT credits_posted - debits_posted, debits_pending FROM accounts WHERE id = ?1",
                troop_coordinator::p![id],
            )
            .expect("account row");
        let row = (r.i64(0).expect("posted"), r.i64(1).expect("pending"));
        prop_assert_eq!(row, (*posted, *pending), "account {}", id);
    }
    // The O(1) check on the totals row, and the full scan agreeing with it.
    ledger::check_invariants(conn).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let t = ledger::check_invariants_full(conn).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(t.minted, model.minted);
    let pending: i64 = model
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Pending)
        .map(|j| j.reserved)
        .sum();
    prop_assert_eq!(t.pending_jobs, pending);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_ledger_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut conn = ledger::open_in_memory().expect("ledger");
        model_run(&mut Store::Lite(&mut conn), ops)?;
    }
}

/// A worker's registration as the tests send it.
fn register(name: &str) -> Command {
    Command::RegisterWorker {
        peer_id: name.into(),
        models: vec!["m".into()],
        addresses: vec![],
        version: None,
        new_key: [1; 32],
        now_secs: 0,
    }
}

/// A new schema on the server of `url`, migrated: a client with it on its
/// search path and the URL that opens more such connections.
fn fresh_schema(url: &str, schema: &str) -> (postgres::Client, String) {
    let mut admin = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .expect("a schema");
    let url = format!("{url}?options=-csearch_path%3D{schema}");
    let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    troop_coordinator::pg::migrate(&mut client).expect("migrate");
    (client, url)
}

/// Runs `cases` random cases on one PostgreSQL server, each on a fresh,
/// migrated schema: `f` gets a client with the schema on its search path
/// and the URL that opens more such connections.
fn pg_cases(
    name: &str,
    cases: u32,
    f: impl Fn(&mut postgres::Client, &str, Vec<Op>) -> Result<(), TestCaseError>,
) {
    let Some(server) = pg::PgServer::start() else {
        return;
    };
    let url = server.create_db(name);
    let case = std::cell::Cell::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 1..60), |ops| {
            case.set(case.get() + 1);
            let (mut client, url) = fresh_schema(&url, &format!("case_{}", case.get()));
            f(&mut client, &url, ops)
        })
        .unwrap_or_else(|e| panic!("the {name} ledger does not match the model: {e}"));
}

/// The same model on PostgreSQL, one command per transaction.
#[test]
fn postgres_ledger_matches_the_model() {
    pg_cases("one_by_one", 24, |client, _, ops| {
        model_run(&mut Store::Pg(client, StatementCache::default()), ops)
    });
}

/// The same model through the writer's pipelined connection (issue 29).
#[test]
fn pipelined_postgres_ledger_matches_the_model() {
    pg_cases("pipelined", 16, |_, url, ops| {
        let mut p = pipe::Pipe::connect(url).expect("the pipe");
        model_run(&mut Store::Pipe(&mut p), ops)
    });
}

/// A batch whose command is refused after it wrote (a new account, its
/// starter grant refused) is run again with a savepoint per command: the
/// other commands' results stand, the refused one changed nothing.
#[test]
fn a_command_refused_after_it_wrote_sends_the_batch_to_the_careful_pass() {
    let Some(server) = pg::PgServer::start() else {
        return;
    };
    let url = server.create_db("careful");
    let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    troop_coordinator::pg::migrate(&mut c).expect("migrate");
    let mut p = pipe::Pipe::connect(&url).expect("the pipe");
    pipe::run_commands(&mut p, &[&register("w")]).expect("registered");
    let reserve = |user: &str, job: &str| Command::Reserve {
        user: user.into(),
        worker: "w".into(),
        model: "m".into(),
        job_id: job.into(),
        amount: 1_000,
        multiplier_milli: 1_000,
        starter_grant: STARTER,
        grant_policy: ledger::GrantPolicy {
            ip: "10.0.0.1".into(),
            per_ip_per_day: 1,
            ..Default::default()
        },
        expires_at: 100,
        now_ms: T0,
    };
    let before = pipe::careful_passes();
    let (a, b, again) = (reserve("a", "j1"), reserve("b", "j2"), reserve("a", "j3"));
    let out = pipe::run_commands(&mut p, &[&a, &b, &again]).expect("the batch commits");
    assert_eq!(pipe::careful_passes(), before + 1, "the careful pass ran");
    assert!(
        matches!(
            out[0].0,
            Ok(Outcome::Reserved {
                granted: STARTER,
                ..
            })
        ),
        "{:?}",
        out[0].0
    );
    assert!(
        matches!(out[1].0, Err(LedgerError::GrantRefused(_))),
        "{:?}",
        out[1].0
    );
    assert!(out[1].1.is_empty(), "a refused command has no events");
    assert!(
        matches!(out[2].0, Ok(Outcome::Reserved { granted: 0, .. })),
        "{:?}",
        out[2].0
    );
    // `b` was never created; `a` holds two reservations; the books balance.
    assert_eq!(ledger::available(&mut p, "b").expect("read"), None);
    assert_eq!(
        ledger::available(&mut p, "a").expect("read"),
        Some(STARTER - 2_000)
    );
    ledger::check_invariants_full(&mut p).expect("the invariants hold");
    // The transfer ids given out stay dense and the sequence follows them.
    let ids: Vec<i64> = c
        .query("SELECT id FROM transfers ORDER BY id", &[])
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>());
    let next: i64 = c
        .query_one(
            "SELECT nextval(pg_get_serial_sequence('transfers', 'id'))",
            &[],
        )
        .expect("nextval")
        .get(0);
    assert_eq!(next, ids.len() as i64 + 1);
}

fn model_run(conn: &mut Store<'_>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    {
        let mut model = Model::default();
        for (name, _) in WORKERS {
            let out = conn.run(register(name));
            prop_assert!(out.is_ok());
            model.accounts.insert(name.into(), (0, 0));
        }
        for (step, op) in ops.into_iter().enumerate() {
            let step = step as u64;
            match op {
                Op::Authorize { user, worker } => {
                    let (w, mult) = WORKERS[worker];
                    let u = user_id(user);
                    let u = u.as_str();
                    let amount = RESERVE_SECS * mult;
                    let job_id = format!("job-{step}");
                    let created_ms = T0 + step * 1000;
                    let out = conn.run(Command::Reserve {
                        user: u.into(),
                        worker: w.into(),
                        model: "m".into(),
                        job_id: job_id.clone(),
                        amount,
                        multiplier_milli: mult,
                        starter_grant: STARTER,
                        grant_policy: Default::default(),
                        expires_at: step,
                        now_ms: created_ms,
                    });
                    // Model: the grant happens once, even when the reservation is refused
                    // (the grant commits with the refusal only if the reservation passes).
                    let first = !model.granted.contains(u);
                    let acc = *model.accounts.get(u).unwrap_or(&(0, 0));
                    let avail = acc.0 - acc.1 + if first { STARTER } else { 0 };
                    if avail < amount {
                        let refused = matches!(out, Err(LedgerError::InsufficientFunds { .. }));
                        prop_assert!(refused, "expected 402, got {:?}", out);
                    } else {
                        prop_assert!(out.is_ok(), "{:?}", out);
                        if first {
                            model.granted.insert(u.into());
                            model.minted += STARTER;
                        }
                        let e = model.accounts.entry(u.into()).or_insert((0, 0));
                        if first {
                            e.0 += STARTER;
                        }
                        e.1 += amount;
                        model.jobs.push(ModelJob {
                            id: job_id,
                            user: u.into(),
                            worker: w.into(),
                            reserved: amount,
                            multiplier: mult,
                            expires_at: step,
                            created_ms,
                            state: JobState::Pending,
                            receipt: None,
                        });
                    }
                }
                Op::Receipt {
                    job,
                    millis,
                    status,
                    ack,
                } => {
                    let Some(j) = model.jobs.get(job % model.jobs.len().max(1)).cloned() else {
                        continue;
                    };
                    let status = [
                        JobStatus::Completed,
                        JobStatus::Failed,
                        JobStatus::Cancelled,
                    ][status as usize];
                    let r = receipt(&j, millis, status, ack);
                    let sha = format!("{:?}-{millis}-{ack:?}", status);
                    let out = conn.run(Command::Settle {
                        receipt: r.clone(),
                        receipt_sha256: sha.clone(),
                        now_ms: settle_ms(step),
                        unacked_cap_ms: CAP_MS,
                        tolerance_ms: 0,
                        // Checked before the writer on odd steps (as the
                        // receipts route does), by the writer on even ones.
                        ack_signatures: (step % 2 == 1)
                            .then(|| troop_protocol::usage::ack_signatures(&r.requests, &r.user)),
                    });
                    let idx = model.jobs.iter().position(|x| x.id == j.id).unwrap_or(0);
                    match (&j.state, &j.receipt) {
                        (_, Some((_, prev, _))) if *prev != sha => {
                            prop_assert!(matches!(out, Err(LedgerError::Conflict(_))), "{:?}", out);
                        }
                        (_, Some((_, _, cost))) => {
                            let Ok(Outcome::Settled(s)) = out else {
                                return Err(TestCaseError::fail("replay failed"));
                            };
                            prop_assert!(s.replayed);
                            prop_assert_eq!(s.cost, *cost);
                        }
                        (JobState::Voided, None) => {
                            prop_assert!(
                                matches!(out, Err(LedgerError::ReservationExpired(_))),
                                "{:?}",
                                out
                            );
                        }
                        (JobState::Pending, None) => {
                            // min(worker ms, acknowledged ms), or the cap without an ack;
                            // an old receipt of a failed job is refunded whole.
                            let charged = match ack {
                                Some(observed) => millis.min(observed),
                                None if status == JobStatus::Completed => millis.min(CAP_MS),
                                None => 0,
                            };
                            let cost = ((charged as i128 * j.multiplier as i128 / 1000) as i64)
                                .min(j.reserved);
                            let Ok(Outcome::Settled(s)) = out else {
                                return Err(TestCaseError::fail(format!("settle failed: {out:?}")));
                            };
                            prop_assert_eq!(s.cost, cost);
                            prop_assert_eq!(s.refunded, j.reserved - cost);
                            prop_assert!(!s.replayed);
                            let u = model.accounts.entry(j.user.clone()).or_default();
                            u.0 -= cost;
                            u.1 -= j.reserved;
                            model.accounts.entry(j.worker.clone()).or_default().0 += cost;
                            let mj = &mut model.jobs[idx];
                            mj.state = if cost > 0 {
                                JobState::Posted
                            } else {
                                JobState::Voided
                            };
                            mj.receipt = Some((r, sha, cost));
                        }
                        (state, None) => {
                            return Err(TestCaseError::fail(format!(
                                "unreachable model state {state:?}"
                            )));
                        }
                    }
                }
                Op::Replay { job } => {
                    let Some(j) = model.jobs.get(job % model.jobs.len().max(1)).cloned() else {
                        continue;
                    };
                    let Some((r, sha, cost)) = j.receipt else {
                        continue;
                    };
                    let out = conn.run(Command::Settle {
                        receipt: r,
                        receipt_sha256: sha,
                        now_ms: settle_ms(step),
                        unacked_cap_ms: CAP_MS,
                        tolerance_ms: 0,
                        ack_signatures: None,
                    });
                    let Ok(Outcome::Settled(s)) = out else {
                        return Err(TestCaseError::fail("replay failed"));
                    };
                    prop_assert!(s.replayed);
                    prop_assert_eq!(s.cost, cost);
                }
                Op::Expire { cutoff } => {
                    let out = conn.run(Command::ExpireDue {
                        cutoff_secs: cutoff,
                        now_ms: step,
                        limit: 1000,
                    });
                    let Ok(Outcome::Expired { jobs }) = out else {
                        return Err(TestCaseError::fail("expire failed"));
                    };
                    let mut want = Vec::new();
                    for mj in model.jobs.iter_mut() {
                        if mj.state == JobState::Pending && mj.expires_at < cutoff {
                            mj.state = JobState::Voided;
                            want.push(mj.id.clone());
                            model.accounts.entry(mj.user.clone()).or_default().1 -= mj.reserved;
                        }
                    }
                    let mut got = jobs;
                    got.sort();
                    want.sort();
                    prop_assert_eq!(got, want);
                }
            }
            check(conn, &model)?;
        }
    }
    Ok(())
}

/// The totals row follows changes made by any statement (triggers), the
/// O(1) check catches a negative account and unbalanced totals, and the
/// full scan names a totals row that drifted from the accounts.
#[test]
fn the_totals_row_follows_every_change_and_drift_is_caught() {
    let conn = ledger::open_in_memory().expect("ledger");
    conn.execute(
        "INSERT INTO accounts (id, kind, credits_posted, created_at) VALUES ('a', 'user', 5000, 0)",
        [],
    )
    .expect("account");
    conn.execute(
        "UPDATE accounts SET debits_posted = debits_posted + 5000 WHERE id = ?1",
        [ledger::MINT],
    )
    .expect("mint");
    let t = ledger::check_invariants(&mut Lite(&conn)).expect("balanced");
    assert_eq!((t.minted, t.balances), (5000, 5000));
    ledger::check_invariants_full(&mut Lite(&conn)).expect("the row agrees with a scan");

    // An account spent beyond its credits, to the mint (balanced otherwise).
    conn.execute(
        "UPDATE accounts SET debits_posted = 6000 WHERE id = 'a'",
        [],
    )
    .expect("overspend");
    conn.execute(
        "UPDATE accounts SET credits_posted = credits_posted + 6000 WHERE id = ?1",
        [ledger::MINT],
    )
    .expect("counterpart");
    let e = ledger::check_invariants(&mut Lite(&conn)).expect_err("negative");
    assert_eq!(
        e.to_string(),
        "ledger invariant violated: 1 account(s) negative"
    );
    conn.execute("UPDATE accounts SET debits_posted = 0 WHERE id = 'a'", [])
        .expect("undo");
    conn.execute(
        "UPDATE accounts SET credits_posted = credits_posted - 6000 WHERE id = ?1",
        [ledger::MINT],
    )
    .expect("undo");
    ledger::check_invariants_full(&mut Lite(&conn)).expect("balanced again");

    // The row itself edited: the O(1) check sees unbalanced totals, and the
    // full scan says which figure drifted.
    conn.execute("UPDATE ledger_totals SET balances = balances + 7", [])
        .expect("drift");
    let e = ledger::check_invariants(&mut Lite(&conn)).expect_err("unbalanced");
    assert!(e.to_string().contains("!= minted"), "{e}");
    let e = ledger::check_invariants_full(&mut Lite(&conn)).expect_err("drift");
    assert!(
        e.to_string()
            .contains("the totals row says balances 5007, a full scan 5000"),
        "{e}"
    );
}

/// Statements that ran, with SQLite's own counters: rows stepped through
/// in full table scans, and rows put in automatic (transient) indexes.
static SCANS: std::sync::Mutex<Vec<(String, i32, i32)>> = std::sync::Mutex::new(Vec::new());

fn record_scans(e: rusqlite::trace::TraceEvent<'_>) {
    if let rusqlite::trace::TraceEvent::Profile(stmt, _) = e {
        let full = stmt.get_status(rusqlite::StatementStatus::FullscanStep);
        let auto = stmt.get_status(rusqlite::StatementStatus::AutoIndex);
        if let Ok(mut v) = SCANS.lock() {
            v.push((stmt.sql().to_string(), full, auto));
        }
    }
}

/// Every statement the request path runs (tickets, settlements, refunds,
/// expiries, registrations, heartbeats, balances, histories, the O(1)
/// invariant check) finds its rows by index on a ledger of a few hundred
/// accounts and jobs: no full table scan, no automatic index. The list of
/// all workers (`GET /workers`, answered whole) is the one read that walks
/// its table.
#[test]
fn no_statement_on_the_request_path_scans_a_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut conn = ledger::open(&dir.path().join("ledger.sqlite3")).expect("ledger");
    let registered = |conn: &mut Connection, name: &str| {
        run(conn, register(name)).expect("registered");
    };
    let reserve = |conn: &mut Connection, user: &str, job: &str, step: u64| {
        run(
            conn,
            Command::Reserve {
                user: user.into(),
                worker: "worker-x".into(),
                model: "m".into(),
                job_id: job.into(),
                amount: 1000,
                multiplier_milli: 1000,
                starter_grant: STARTER,
                grant_policy: ledger::GrantPolicy {
                    ip: "127.0.0.1".into(),
                    per_ip_per_day: 1_000_000,
                    per_hour_milli: i64::MAX / 4,
                    ..Default::default()
                },
                expires_at: 10 + step,
                now_ms: T0 + step,
            },
        )
        .expect("reserved");
    };
    // A few hundred of everything, so that a scan would step.
    registered(&mut conn, "worker-x");
    for i in 0..300u64 {
        reserve(&mut conn, &format!("user-{i}"), &format!("seed-{i}"), i);
    }
    for w in 0..50 {
        registered(&mut conn, &format!("worker-{w}"));
    }

    conn.trace_v2(
        rusqlite::trace::TraceEventCodes::SQLITE_TRACE_PROFILE,
        Some(record_scans),
    );
    let user = user_id(0);
    reserve(&mut conn, &user, "job-a", 1000);
    reserve(&mut conn, &user, "job-b", 1001);
    reserve(&mut conn, &user, "job-c", 1002);
    let job = |id: &str| ModelJob {
        id: id.into(),
        user: user.clone(),
        worker: "worker-x".into(),
        reserved: 1000,
        multiplier: 1000,
        expires_at: 0,
        created_ms: T0,
        state: JobState::Pending,
        receipt: None,
    };
    for (id, status) in [
        ("job-a", JobStatus::Completed),
        ("job-b", JobStatus::Failed),
    ] {
        let r = receipt(&job(id), 400, status, Some(400));
        let cmd = || Command::Settle {
            receipt: r.clone(),
            receipt_sha256: format!("sha-{id}"),
            now_ms: settle_ms(5),
            unacked_cap_ms: CAP_MS,
            tolerance_ms: 0,
            ack_signatures: None,
        };
        run(&mut conn, cmd()).expect("settled");
        run(&mut conn, cmd()).expect("replayed");
    }
    run(
        &mut conn,
        Command::Cancel {
            job_id: "job-c".into(),
            now_ms: settle_ms(6),
        },
    )
    .expect("cancelled");
    run(
        &mut conn,
        Command::ExpireDue {
            cutoff_secs: 20,
            now_ms: settle_ms(7),
            limit: 1000,
        },
    )
    .expect("expired");
    run(
        &mut conn,
        Command::Heartbeat {
            peer_id: "worker-x".into(),
            models: Some(vec!["m".into()]),
            addresses: None,
            active_jobs: 1,
            queue_depth: 0,
            now_secs: 5,
            signed_at: None,
        },
    )
    .expect("heartbeat");
    registered(&mut conn, "worker-x");
    troop_coordinator::admin::balance_of(&mut Lite(&conn), &user).expect("balance");
    let page =
        troop_coordinator::admin::history(&mut Lite(&conn), &user, i64::MAX, 2).expect("history");
    assert_eq!(page.len(), 2);
    ledger::load_worker(&mut Lite(&conn), "worker-x").expect("worker");
    ledger::reputation_of(&mut Lite(&conn), "worker-x", "worker").expect("reputation");
    ledger::available(&mut Lite(&conn), &user).expect("available");
    ledger::check_invariants(&mut Lite(&conn)).expect("invariants");
    ledger::load_workers(&mut Lite(&conn)).expect("all workers");
    conn.trace_v2(rusqlite::trace::TraceEventCodes::empty(), None);

    let seen = SCANS.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(seen.len() > 20, "{} statements traced", seen.len());
    let scanning: Vec<_> = seen
        .iter()
        .filter(|(sql, full, auto)| {
            (*full > 0 || *auto > 0) && !sql.contains("FROM workers ORDER BY peer_id")
        })
        .collect();
    assert!(
        scanning.is_empty(),
        "statements that scan (sql, full-scan steps, automatic-index rows): {scanning:#?}"
    );
    // The counters work: the list of all workers does walk its table.
    assert!(
        seen.iter()
            .any(|(sql, full, _)| sql.contains("FROM workers ORDER BY peer_id") && *full > 0)
    );
}

/// The model's operations as ledger commands, without a model: job `k`
/// is the reservation of the `k`-th authorization (modulo their number),
/// receipts differ by their contents, a replay sends a job's last receipt
/// again. Refusals (a job reserved twice, a conflicting receipt, funds
/// short) come out of the ledger itself.
fn commands(ops: &[Op]) -> Vec<Command> {
    let mut jobs: Vec<ModelJob> = Vec::new();
    let mut last: HashMap<String, (Receipt, String)> = HashMap::new();
    let mut out = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let step = step as u64;
        match op {
            Op::Authorize { user, worker } => {
                let (w, mult) = WORKERS[*worker];
                let job = ModelJob {
                    id: format!("job-{step}"),
                    user: user_id(*user),
                    worker: w.into(),
                    reserved: RESERVE_SECS * mult,
                    multiplier: mult,
                    expires_at: step,
                    created_ms: T0 + step * 1000,
                    state: JobState::Pending,
                    receipt: None,
                };
                out.push(Command::Reserve {
                    user: job.user.clone(),
                    worker: job.worker.clone(),
                    model: "m".into(),
                    job_id: job.id.clone(),
                    amount: job.reserved,
                    multiplier_milli: job.multiplier,
                    starter_grant: STARTER,
                    grant_policy: Default::default(),
                    expires_at: job.expires_at,
                    now_ms: job.created_ms,
                });
                jobs.push(job);
            }
            Op::Receipt {
                job,
                millis,
                status,
                ack,
            } => {
                let Some(j) = jobs.get(job % jobs.len().max(1)) else {
                    continue;
                };
                let status = [
                    JobStatus::Completed,
                    JobStatus::Failed,
                    JobStatus::Cancelled,
                ][*status as usize];
                let r = receipt(j, *millis, status, *ack);
                let sha = format!("{status:?}-{millis}-{ack:?}");
                last.insert(j.id.clone(), (r.clone(), sha.clone()));
                out.push(Command::Settle {
                    ack_signatures: step
                        .is_multiple_of(2)
                        .then(|| troop_protocol::usage::ack_signatures(&r.requests, &r.user)),
                    receipt: r,
                    receipt_sha256: sha,
                    now_ms: settle_ms(step),
                    unacked_cap_ms: CAP_MS,
                    tolerance_ms: 0,
                });
            }
            Op::Replay { job } => {
                let Some(j) = jobs.get(job % jobs.len().max(1)) else {
                    continue;
                };
                let Some((r, sha)) = last.get(&j.id).cloned() else {
                    continue;
                };
                out.push(Command::Settle {
                    receipt: r,
                    receipt_sha256: sha,
                    now_ms: settle_ms(step),
                    unacked_cap_ms: CAP_MS,
                    tolerance_ms: 0,
                    ack_signatures: None,
                });
            }
            Op::Expire { cutoff } => out.push(Command::ExpireDue {
                cutoff_secs: *cutoff,
                now_ms: step,
                limit: 1000,
            }),
        }
    }
    out
}

/// Everything a ledger holds, as text to compare.
fn ledger_rows(client: &mut postgres::Client) -> Vec<String> {
    let mut rows = Vec::new();
    for sql in [
        "SELECT id, kind, debits_pending, debits_posted, credits_pending, credits_posted, granted FROM accounts ORDER BY id",
        "SELECT id, kind, debit_account, credit_account, amount, pending_id, job_id, created_at FROM transfers ORDER BY id",
        "SELECT job_id, state, cost, resolved_at, receipt_sha256, receipt_status, reserved FROM jobs ORDER BY job_id",
        "SELECT account, role, requests, acknowledged, disputed, unacknowledged FROM reputation ORDER BY account, role",
        "SELECT debits_posted, credits_posted, debits_pending, credits_pending, balances, minted, negative_accounts, pending_jobs FROM ledger_totals",
    ] {
        for r in client.query(sql, &[]).expect("rows") {
            let cols: Vec<String> = (0..r.len())
                .map(|i| {
                    r.try_get::<_, Option<i64>>(i)
                        .map(|v| format!("{v:?}"))
                        .or_else(|_| r.try_get::<_, Option<String>>(i).map(|v| format!("{v:?}")))
                        .or_else(|_| r.try_get::<_, Option<i32>>(i).map(|v| format!("{v:?}")))
                        .unwrap_or_else(|e| format!("<{e}>"))
                })
                .collect();
            rows.push(cols.join(" | "));
        }
    }
    rows
}

/// Runs `ops` as commands one per batch and cut into batches of `cuts`
/// (in turn), each on a fresh schema; fails when the answers, the events
/// or the ledgers differ.
fn same_either_way(
    url: &str,
    case: usize,
    ops: &[Op],
    cuts: &[usize],
) -> Result<(), TestCaseError> {
    let cmds = commands(ops);
    let mut seen = Vec::new();
    for batched in [false, true] {
        let (mut client, url) = fresh_schema(url, &format!("batched_{case}_{batched}"));
        let mut p = pipe::Pipe::connect(&url).expect("the pipe");
        let mut answers = Vec::new();
        for (name, _) in WORKERS {
            pipe::run_commands(&mut p, &[&register(name)]).expect("registered");
        }
        let all: Vec<&Command> = cmds.iter().collect();
        let mut rest = &all[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = if batched {
                (*cut.next().unwrap_or(&1)).clamp(1, rest.len())
            } else {
                1
            };
            let (now, later) = rest.split_at(n);
            let out = pipe::run_commands(&mut p, now)
                .map_err(|e| TestCaseError::fail(format!("a batch of {n} failed: {e}")))?;
            for (r, events) in out {
                answers.push(format!("{r:?} {events:?}"));
            }
            rest = later;
        }
        ledger::check_invariants_full(&mut p).map_err(|e| TestCaseError::fail(e.to_string()))?;
        seen.push((answers, ledger_rows(&mut client)));
    }
    prop_assert_eq!(&seen[0].0, &seen[1].0, "the answers differ");
    prop_assert_eq!(&seen[0].1, &seen[1].1, "the ledgers differ");
    Ok(())
}

/// Issue 29: the writer gathers a batch's changes to accounts, transfers,
/// jobs and reputations and writes them one statement per table. Random
/// commands cut into random batches must leave exactly the ledger, the
/// answers and the audit events that one command per batch leaves; first
/// a fixed case where every account is changed by many commands of one
/// batch (settlements, refunds, replays and a conflict after the
/// reservations).
#[test]
fn batches_on_postgres_leave_what_one_command_at_a_time_leaves() {
    let Some(server) = pg::PgServer::start() else {
        return;
    };
    let url = server.create_db("batched");
    let mut fixed: Vec<Op> = (0..6)
        .map(|i| Op::Authorize {
            user: i % USERS,
            worker: i % WORKERS.len(),
        })
        .collect();
    for job in 0..6 {
        fixed.push(Op::Receipt {
            job,
            millis: 1_000 + job as u64 * 700,
            status: (job % 3) as u8,
            ack: (job % 2 == 0).then_some(900),
        });
    }
    fixed.extend([
        Op::Replay { job: 1 },
        Op::Receipt {
            job: 2,
            millis: 5,
            status: 0,
            ack: None,
        },
        Op::Replay { job: 4 },
    ]);
    same_either_way(&url, 0, &fixed, &[6, 100])
        .unwrap_or_else(|e| panic!("batches change the ledger: {e}"));
    let case = std::cell::Cell::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 16,
        ..ProptestConfig::default()
    });
    let strategy = (
        proptest::collection::vec(op(), 1..80),
        proptest::collection::vec(1..40usize, 1..10),
    );
    runner
        .run(&strategy, |(ops, cuts)| {
            case.set(case.get() + 1);
            same_either_way(&url, case.get(), &ops, &cuts)
        })
        .unwrap_or_else(|e| panic!("batches change the ledger: {e}"));
}
