//! The ledger's commands, one file each, as mini-redis keeps `cmd/*.rs`:
//! each `apply` runs inside the writer's open transaction (a savepoint of
//! its own) and either changes the ledger as a whole or not at all.

pub(crate) mod audit;
pub(crate) mod cancel;
pub(crate) mod expire;
pub(crate) mod hardware;
pub(crate) mod heartbeat;
pub(crate) mod leave;
pub(crate) mod register;
pub(crate) mod reserve;
pub(crate) mod settle;

#[cfg(test)]
mod tests {
    //! Each command on an in-memory ledger, the time given as an argument
    //! (the clock the writer reads is never consulted here).

    use serde_json::Value;

    use crate::db::Lite;
    use crate::ledger::{
        Command, GrantPolicy, LedgerError, Outcome, apply, available, check_invariants_full,
        load_worker, open_in_memory,
    };

    const HOUR_MS: u64 = 3_600_000;

    fn run(conn: &rusqlite::Connection, cmd: Command) -> Result<Outcome, LedgerError> {
        let mut events: Vec<Value> = Vec::new();
        let out = apply(&mut Lite(conn), &cmd, &mut events);
        check_invariants_full(&mut Lite(conn)).expect("the invariants hold after every command");
        out
    }

    fn register(conn: &rusqlite::Connection, peer: &str, now_secs: u64) {
        run(
            conn,
            Command::RegisterWorker {
                peer_id: peer.into(),
                models: vec!["m".into()],
                addresses: Vec::new(),
                version: None,
                new_key: [7; 32],
                now_secs,
            },
        )
        .expect("registered");
    }

    fn reserve(
        conn: &rusqlite::Connection,
        user: &str,
        job: &str,
        ip: &str,
        expires_at: u64,
        now_ms: u64,
    ) -> Result<Outcome, LedgerError> {
        run(
            conn,
            Command::Reserve {
                user: user.into(),
                worker: "w".into(),
                model: "m".into(),
                job_id: job.into(),
                amount: 1_000,
                multiplier_milli: 1_000,
                starter_grant: 10_000,
                grant_policy: GrantPolicy {
                    ip: ip.into(),
                    per_ip_per_day: 1,
                    ..Default::default()
                },
                expires_at,
                now_ms,
            },
        )
    }

    fn audit(
        conn: &rusqlite::Connection,
        job: &str,
        index: u32,
        failed: bool,
    ) -> Result<crate::ledger::AuditRecorded, LedgerError> {
        match run(
            conn,
            Command::RecordAudit {
                reporter: "u1".into(),
                worker: "w".into(),
                job_id: job.into(),
                index,
                failed,
                report_sha256: "sha".into(),
                suspend_after: 2,
                now_ms: 20 * HOUR_MS,
            },
        )? {
            Outcome::Audited(a) => Ok(a),
            other => panic!("not an audit: {other:?}"),
        }
    }

    #[test]
    fn confirmed_audit_failures_refund_the_session_once_and_suspend_the_worker() {
        let conn = open_in_memory().expect("ledger");
        register(&conn, "w", 0);
        let t0 = 10 * HOUR_MS;
        reserve(&conn, "u1", "j1", "1.2.3.4", 100, t0).expect("reserved");
        reserve(&conn, "u1", "j2", "1.2.3.4", 100, t0).expect("reserved");
        let user = |conn: &rusqlite::Connection| {
            available(&mut Lite(conn), "u1")
                .expect("read")
                .expect("the user")
        };
        let worker = |conn: &rusqlite::Connection| {
            available(&mut Lite(conn), "w").expect("read").unwrap_or(0)
        };
        assert_eq!(user(&conn), 8_000);
        // A pass counts and moves no money; the same answer twice counts once.
        let a = audit(&conn, "j1", 0, false).expect("passed");
        assert_eq!(
            (a.passed, a.failed, a.refunded, a.suspended),
            (1, 0, 0, false)
        );
        assert!(audit(&conn, "j1", 0, true).expect("again").duplicate);
        // j2 settles: the worker is paid 600 of the 1,000 reserved.
        let receipt = troop_protocol::receipt::Receipt {
            job_id: "j2".into(),
            worker: "w".into(),
            user: "u1".into(),
            model: "m".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            started_at: t0,
            finished_at: t0 + 600,
            status: troop_protocol::receipt::JobStatus::Completed,
            requests: Vec::new(),
        };
        run(
            &conn,
            Command::Settle {
                receipt,
                receipt_sha256: "r".into(),
                now_ms: t0 + 1_000,
                unacked_cap_ms: 60_000,
                tolerance_ms: 1_000,
                ack_signatures: None,
            },
        )
        .expect("settled");
        assert_eq!((user(&conn), worker(&conn)), (8_400, 600));
        // A failure of the pending session voids its reservation whole.
        let f = audit(&conn, "j1", 1, true).expect("failed");
        assert_eq!((f.refunded, f.failed, f.suspended), (1_000, 1, false));
        assert_eq!(user(&conn), 9_400);
        // A failure of the settled one pays back what the worker got, and
        // the second confirmed failure suspends it.
        let f = audit(&conn, "j2", 0, true).expect("failed");
        assert_eq!((f.refunded, f.failed, f.suspended), (600, 2, true));
        assert_eq!((user(&conn), worker(&conn)), (10_000, 0));
        let row = load_worker(&mut Lite(&conn), "w")
            .expect("read")
            .expect("w");
        assert!(row.suspended_at.is_some());
        // Another failed answer of an already refunded session refunds nothing.
        let f = audit(&conn, "j2", 1, true).expect("failed");
        assert_eq!((f.refunded, f.failed), (0, 3));
        // Only the session's own user may report it.
        let theirs = run(
            &conn,
            Command::RecordAudit {
                reporter: "someone else".into(),
                worker: "w".into(),
                job_id: "j1".into(),
                index: 9,
                failed: true,
                report_sha256: "sha".into(),
                suspend_after: 2,
                now_ms: 20 * HOUR_MS,
            },
        );
        assert!(matches!(theirs, Err(LedgerError::Mismatch(_))));
    }

    #[test]
    fn a_worker_that_leaves_is_not_alive_until_it_heartbeats_again() {
        let conn = open_in_memory().expect("ledger");
        register(&conn, "w", 100);
        let row = |conn: &rusqlite::Connection| {
            load_worker(&mut Lite(conn), "w")
                .expect("read")
                .expect("the worker")
        };
        assert!(row(&conn).alive(100, 30));
        run(
            &conn,
            Command::Leave {
                peer_id: "w".into(),
                now_secs: 110,
                signed_at: None,
            },
        )
        .expect("left");
        assert!(!row(&conn).alive(110, 30));
        run(
            &conn,
            Command::Heartbeat {
                peer_id: "w".into(),
                models: None,
                addresses: None,
                active_jobs: 1,
                queue_depth: 0,
                now_secs: 120,
                signed_at: None,
            },
        )
        .expect("heartbeat");
        let back = row(&conn);
        assert!(back.alive(120, 30) && !back.alive(151, 30));
        assert_eq!(back.models, vec!["m".to_string()]);
        let unknown = run(
            &conn,
            Command::Leave {
                peer_id: "nobody".into(),
                now_secs: 120,
                signed_at: None,
            },
        );
        assert!(matches!(unknown, Err(LedgerError::UnknownWorker(_))));
    }

    #[test]
    fn starter_grants_are_counted_per_address_over_the_last_day() {
        let conn = open_in_memory().expect("ledger");
        register(&conn, "w", 0);
        let t0 = 10 * HOUR_MS;
        let first = reserve(&conn, "u1", "j1", "1.2.3.4", 100, t0).expect("granted");
        assert!(matches!(
            first,
            Outcome::Reserved {
                granted: 10_000,
                ..
            }
        ));
        // A second new account from the same address within 24 hours.
        let refused = reserve(&conn, "u2", "j2", "1.2.3.4", 100, t0 + 23 * HOUR_MS);
        assert!(matches!(refused, Err(LedgerError::GrantRefused(_))));
        // A day later it gets its grant; the first account never a second one.
        let later = reserve(&conn, "u2", "j2", "1.2.3.4", 100, t0 + 25 * HOUR_MS);
        assert!(matches!(
            later,
            Ok(Outcome::Reserved {
                granted: 10_000,
                ..
            })
        ));
        let again = reserve(&conn, "u1", "j3", "5.6.7.8", 100, t0 + 25 * HOUR_MS);
        assert!(matches!(again, Ok(Outcome::Reserved { granted: 0, .. })));
        assert_eq!(
            available(&mut Lite(&conn), "u1").expect("read"),
            Some(8_000)
        );
    }

    #[test]
    fn only_reservations_past_the_cutoff_expire_oldest_first_and_a_cancel_voids_once() {
        let conn = open_in_memory().expect("ledger");
        register(&conn, "w", 0);
        for (job, expires) in [("a", 300), ("b", 100), ("c", 200)] {
            reserve(&conn, "u", job, "1.2.3.4", expires, 0).expect("reserved");
        }
        assert_eq!(available(&mut Lite(&conn), "u").expect("read"), Some(7_000));
        let expired = run(
            &conn,
            Command::ExpireDue {
                cutoff_secs: 250,
                now_ms: 250_000,
                limit: 1,
            },
        )
        .expect("expired");
        assert_eq!(
            expired,
            Outcome::Expired {
                jobs: vec!["b".into()]
            }
        );
        let expired = run(
            &conn,
            Command::ExpireDue {
                cutoff_secs: 250,
                now_ms: 250_000,
                limit: 10,
            },
        )
        .expect("expired");
        assert_eq!(
            expired,
            Outcome::Expired {
                jobs: vec!["c".into()]
            }
        );
        for _ in 0..2 {
            run(
                &conn,
                Command::Cancel {
                    job_id: "a".into(),
                    now_ms: 260_000,
                },
            )
            .expect("cancelled");
        }
        assert_eq!(
            available(&mut Lite(&conn), "u").expect("read"),
            Some(10_000)
        );
    }
}
