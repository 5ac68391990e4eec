//! The admin CLI's ledger commands: `audit`, `balance`, `history`.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::db::Db;
use crate::p;
use serde_json::Value;
use troop_protocol::api::{BalanceResponse, TransactionEntry};
use troop_protocol::credits_from_milli;

use crate::ledger::{self, LedgerError, MINT};

/// Balance of an account, `None` if there is no such account.
pub fn balance_of(
    conn: &mut dyn Db,
    account: &str,
) -> Result<Option<BalanceResponse>, LedgerError> {
    conn.query_opt(
        "SELECT credits_posted, debits_posted, debits_pending FROM accounts WHERE id = ?1 AND kind != 'mint'",
        p![account],
    )?
    .map(|r| Ok(balance_json(account, r.i64(0)?, r.i64(1)?, r.i64(2)?)))
    .transpose()
}

/// Transfers touching `account`, newest first, with ids below `before`.
pub fn history(
    conn: &mut dyn Db,
    account: &str,
    before: i64,
    limit: u32,
) -> Result<Vec<TransactionEntry>, LedgerError> {
    let rows = conn.query(
        "SELECT t.id, t.kind, t.debit_account, t.credit_account, t.amount, t.job_id, t.created_at, j.state,
                j.reserved, j.cost, t.pending_id
         FROM transfers t LEFT JOIN jobs j ON j.reserve_transfer = t.id
         WHERE t.id IN (
             SELECT id FROM (SELECT id FROM transfers WHERE debit_account = ?1 AND id < ?2
                             ORDER BY id DESC LIMIT ?3) AS d
             UNION ALL
             SELECT id FROM (SELECT id FROM transfers WHERE credit_account = ?1 AND id < ?2
                             ORDER BY id DESC LIMIT ?3) AS c
         )
         ORDER BY t.id DESC LIMIT ?3",
        p![account, before, limit],
    )?;
    rows.iter()
        .map(|r| {
            let kind = r.str(1)?;
            let debit = r.str(2)?;
            let amount = r.i64(4)?;
            let job_state = r.opt_str(7)?;
            // A refund with no reservation pays back a settled session
            // (a confirmed audit failure): posted money, worker to user.
            let voids = r.opt_i64(10)?.is_some();
            let status = match kind.as_str() {
                "reserve" => job_state.unwrap_or_else(|| "pending".into()),
                "refund" | "expire" if voids => "voided".into(),
                _ => "posted".into(),
            };
            // A voided reservation gives the hold back: a refund or expiry
            // line adds to the user's available balance.
            let signed = match kind.as_str() {
                "refund" | "expire" if debit == account && voids => amount,
                _ if debit == account => -amount,
                _ => amount,
            };
            // A settled reservation gives back what it did not cost.
            let released = match (kind.as_str(), status.as_str()) {
                ("reserve", "posted") if debit == account => {
                    let reserved = r.opt_i64(8)?.unwrap_or(amount);
                    Some(credits_from_milli(
                        reserved - r.opt_i64(9)?.unwrap_or(0).min(reserved),
                    ))
                }
                _ => None,
            };
            Ok(TransactionEntry {
                released,
                id: r.i64(0)?,
                kind,
                amount: credits_from_milli(signed),
                status,
                debit_account: debit,
                credit_account: r.str(3)?,
                job_id: r.opt_str(5)?,
                created_at: r.i64(6)?.max(0) as u64,
            })
        })
        .collect()
}

/// What `ledger audit` found.
pub struct AuditReport {
    /// Broken invariants and disagreements; empty means everything holds.
    pub findings: Vec<String>,
    /// Transfers committed but missing from the end of the audit log, as a
    /// crash between the ledger's commit and the log's flush leaves them:
    /// `ledger repair` (or the next start) appends them.
    pub recoverable: Vec<i64>,
    pub totals: ledger::Totals,
}

/// Opens the ledger for the admin commands: PostgreSQL when `database`
/// is given, else the SQLite file in `data_dir`.
pub fn with_ledger<T>(
    data_dir: &Path,
    database: Option<&str>,
    f: impl FnOnce(&mut dyn Db) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match database {
        Some(url) => {
            let mut client = crate::pg::connect(url)?;
            let have = crate::pg::schema_version(&mut client)?;
            if have == 0 {
                anyhow::bail!(
                    "the database has no Troop ledger yet (run `troop-coordinator migrate`)"
                );
            }
            let mut cache = crate::db::StatementCache::default();
            f(&mut crate::db::Pg {
                client: &mut client,
                cache: &mut cache,
            })
        }
        None => {
            let path = data_dir.join("ledger.sqlite3");
            if !path.exists() {
                anyhow::bail!("no ledger at {}", path.display());
            }
            let conn = ledger::open_reader(&path)?;
            f(&mut crate::db::Lite(&conn))
        }
    }
}

/// Runs every check on the ledger in `data_dir` (or `database`) and the
/// audit log in `data_dir`.
pub fn audit(data_dir: &Path, database: Option<&str>) -> anyhow::Result<AuditReport> {
    audit_replica(data_dir, database, None)
}

/// [`audit`]; with PostgreSQL the log in `data_dir` is one replica's, and is
/// compared with the transfers that replica committed: those of the names
/// on the log's lines, and of `replica` when given (`--replica-name`).
pub fn audit_replica(
    data_dir: &Path,
    database: Option<&str>,
    replica: Option<&str>,
) -> anyhow::Result<AuditReport> {
    with_ledger(data_dir, database, |conn| {
        let names = database
            .map(|_| replica_names(data_dir, replica))
            .transpose()?;
        audit_on(conn, data_dir, names.as_deref())
    })
}

/// The replica names an audit log's lines carry, and `given`.
fn replica_names(data_dir: &Path, given: Option<&str>) -> anyhow::Result<Vec<String>> {
    let (lines, _) = crate::audit::read_lines(&crate::audit::path_in(data_dir))?;
    let mut names: Vec<String> = given.map(str::to_string).into_iter().collect();
    for l in &lines {
        if let Some(n) = l.get("replica").and_then(Value::as_str)
            && !names.iter().any(|m| m == n)
        {
            names.push(n.to_string());
        }
    }
    Ok(names)
}

/// `replicas`: with PostgreSQL, the names of the replica whose log is in
/// `data_dir` (None: SQLite, every transfer belongs in the log).
fn audit_on(
    conn: &mut dyn Db,
    data_dir: &Path,
    replicas: Option<&[String]>,
) -> anyhow::Result<AuditReport> {
    let mut findings = Vec::new();
    let totals = ledger::totals(conn)?;
    if let Err(e) = ledger::check_invariants_full(conn) {
        findings.push(e.to_string());
    }

    // Recompute every account from its transfers.
    #[derive(Default, Debug, PartialEq)]
    struct Sums {
        dp: i64,
        dpost: i64,
        cp: i64,
        cpost: i64,
    }
    let mut computed: HashMap<String, Sums> = HashMap::new();
    let mut reserves: HashMap<i64, (String, String, i64, Option<String>)> = HashMap::new();
    let mut resolutions: Vec<(i64, String, i64, i64)> = Vec::new(); // id, kind, pending_id, amount
    {
        let rows = conn.query(
            "SELECT id, kind, debit_account, credit_account, amount, pending_id, job_id FROM transfers ORDER BY id",
            p![],
        )?;
        for r in &rows {
            let id = r.i64(0)?;
            let kind = r.str(1)?;
            let debit = r.str(2)?;
            let credit = r.str(3)?;
            let amount = r.i64(4)?;
            let pending = r.opt_i64(5)?;
            let job = r.opt_str(6)?;
            match kind.as_str() {
                "grant" => {
                    if debit != MINT {
                        findings.push(format!("transfer {id}: grant not from the mint"));
                    }
                    computed.entry(debit).or_default().dpost += amount;
                    computed.entry(credit).or_default().cpost += amount;
                }
                "reserve" => {
                    computed.entry(debit.clone()).or_default().dp += amount;
                    computed.entry(credit.clone()).or_default().cp += amount;
                    reserves.insert(id, (debit, credit, amount, job));
                }
                // A settled session paid back after a confirmed audit
                // failure: a refund with no reservation, worker to user,
                // posted at once.
                "refund" if pending.is_none() => {
                    let reverses = reserves.values().any(|(rd, rc, _, j)| {
                        rc == &debit && rd == &credit && j.is_some() && *j == job
                    });
                    if !reverses {
                        findings.push(format!(
                            "transfer {id}: a refund without a reservation that pays back no session"
                        ));
                    }
                    computed.entry(debit).or_default().dpost += amount;
                    computed.entry(credit).or_default().cpost += amount;
                }
                "settle" | "refund" | "expire" => {
                    let Some(p) = pending else {
                        findings.push(format!("transfer {id}: {kind} without its reservation"));
                        continue;
                    };
                    let Some((rd, rc, ramount, _)) = reserves.get(&p) else {
                        findings.push(format!(
                            "transfer {id}: {kind} refers to {p}, which is not an earlier reservation"
                        ));
                        continue;
                    };
                    if rd != &debit || rc != &credit {
                        findings.push(format!(
                            "transfer {id}: accounts differ from reservation {p}"
                        ));
                    }
                    let ramount = *ramount;
                    if amount > ramount {
                        findings.push(format!(
                            "transfer {id}: posts {amount} but reservation {p} held only {ramount}"
                        ));
                    }
                    if kind != "settle" && amount != ramount {
                        findings.push(format!(
                            "transfer {id}: {kind} of {amount} does not void all {ramount}"
                        ));
                    }
                    let d = computed.entry(debit).or_default();
                    d.dp -= ramount;
                    if kind == "settle" {
                        d.dpost += amount;
                    }
                    let c = computed.entry(credit).or_default();
                    c.cp -= ramount;
                    if kind == "settle" {
                        c.cpost += amount;
                    }
                    resolutions.push((id, kind, p, amount));
                }
                other => findings.push(format!("transfer {id}: unknown kind {other}")),
            }
        }
    }
    let mut resolved = HashSet::new();
    for (id, _, p, _) in &resolutions {
        if !resolved.insert(*p) {
            findings.push(format!(
                "reservation {p} resolved more than once (again by {id})"
            ));
        }
    }
    {
        let rows = conn.query(
            "SELECT id, kind, debits_pending, debits_posted, credits_pending, credits_posted FROM accounts",
            p![],
        )?;
        for r in &rows {
            let id = r.str(0)?;
            let kind = r.str(1)?;
            let stored = Sums {
                dp: r.i64(2)?,
                dpost: r.i64(3)?,
                cp: r.i64(4)?,
                cpost: r.i64(5)?,
            };
            let want = computed.remove(&id).unwrap_or_default();
            if stored != want {
                findings.push(format!(
                    "account {id}: stored {stored:?} but its transfers add up to {want:?}"
                ));
            }
            if kind != "mint" && stored.cpost - stored.dpost - stored.dp < 0 {
                findings.push(format!("account {id}: negative available balance"));
            }
        }
        for id in computed.keys() {
            findings.push(format!("transfers name account {id}, which does not exist"));
        }
    }
    // Jobs agree with their reservation's resolution.
    {
        let rows = conn.query(
            "SELECT job_id, reserve_transfer, reserved, state, cost FROM jobs",
            p![],
        )?;
        let by_pending: HashMap<i64, (String, i64)> = resolutions
            .iter()
            .map(|(_, k, p, a)| (*p, (k.clone(), *a)))
            .collect();
        for r in &rows {
            let job = r.str(0)?;
            let rt = r.i64(1)?;
            let reserved = r.i64(2)?;
            let state = r.str(3)?;
            let cost = r.opt_i64(4)?;
            match reserves.get(&rt) {
                Some((_, _, a, j)) if *a == reserved && j.as_deref() == Some(job.as_str()) => {}
                _ => findings.push(format!(
                    "job {job}: its reservation transfer {rt} does not match"
                )),
            }
            let res = by_pending.get(&rt);
            let ok = match (state.as_str(), res) {
                ("pending", None) => true,
                ("posted", Some((k, a))) => k == "settle" && Some(*a) == cost,
                ("voided", Some((k, _))) => k == "refund" || k == "expire",
                _ => false,
            };
            if !ok {
                findings.push(format!(
                    "job {job}: state {state} disagrees with its transfers"
                ));
            }
        }
    }
    // With PostgreSQL each replica's audit log holds the transfers that
    // replica committed (named in `transfers.replica`), so a log is compared
    // with those alone; a log that names no replica (none in this folder)
    // has nothing to compare, and the ledger's own checks above are the
    // audit.
    let mut named_transfers = || -> anyhow::Result<bool> {
        let rows = conn.query(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'transfers' AND column_name = 'replica'",
            p![],
        )?;
        Ok(rows.first().map(|r| r.i64(0)).transpose()?.unwrap_or(0) > 0)
    };
    // (A database a newer coordinator has not migrated yet names none.)
    if replicas.is_some_and(|r| r.is_empty()) || (replicas.is_some() && !named_transfers()?) {
        return Ok(AuditReport {
            findings,
            recoverable: Vec::new(),
            totals,
        });
    }
    // The audit log agrees with the ledger.
    let (lines, bad) = crate::audit::read_lines(&crate::audit::path_in(data_dir))?;
    for n in bad {
        findings.push(format!("audit log line {n} is not JSON"));
    }
    let mut audited: HashMap<i64, &Value> = HashMap::new();
    for l in &lines {
        let is_ledger = l
            .get("event")
            .and_then(Value::as_str)
            .is_some_and(|e| e.starts_with("ledger.") && e != "ledger.failure");
        if let (true, Some(id)) = (is_ledger, l.get("transfer_id").and_then(Value::as_i64))
            && audited.insert(id, l).is_some()
        {
            findings.push(format!("audit log records transfer {id} twice"));
        }
    }
    // The log is written in order, so a crash loses a suffix of it. A
    // missing transfer is recoverable when it comes after every audited
    // transfer and no line that was written after it is in the log. Its
    // line would have followed every `ledger.*` line in the log (those are
    // written in the order of their ids), so only the lines after the last
    // of them can be such a line: one there that names its job was written
    // after it, unless it is the `authorize.granted` of the job's ticket
    // (written after the reservation, always before a settlement, refund
    // or expiry of the job). Anything else missing was removed.
    let last_audited = audited.keys().copied().max().unwrap_or(0);
    fn event_of(l: &Value) -> &str {
        l.get("event").and_then(Value::as_str).unwrap_or("")
    }
    let after_last_transfer_line = lines
        .iter()
        .rposition(|l| {
            let e = event_of(l);
            e.starts_with("ledger.") && e != "ledger.failure" && l.get("transfer_id").is_some()
        })
        .map_or(0, |i| i + 1);
    // Job -> the events of the lines after the last transfer line naming it.
    let mut tail_lines: HashMap<&str, Vec<&str>> = HashMap::new();
    for l in &lines[after_last_transfer_line..] {
        if let (e, Some(job)) = (event_of(l), l.get("job_id").and_then(Value::as_str))
            && !e.starts_with("ledger.")
        {
            tail_lines.entry(job).or_default().push(e);
        }
    }
    let followed = |kind: &str, job: Option<&str>| {
        let resolution = matches!(kind, "settle" | "refund" | "expire");
        job.and_then(|j| tail_lines.get(j)).is_some_and(|events| {
            events
                .iter()
                .any(|e| !(resolution && *e == "authorize.granted"))
        })
    };
    let mut recoverable = Vec::new();
    let rows = conn.query(
        if replicas.is_some() {
            "SELECT id, kind, amount, job_id, replica FROM transfers ORDER BY id"
        } else {
            "SELECT id, kind, amount, job_id FROM transfers ORDER BY id"
        },
        p![],
    )?;
    let mut in_ledger = HashSet::new();
    for r in &rows {
        let id = r.i64(0)?;
        let kind = r.str(1)?;
        let amount = r.i64(2)?;
        let job = r.opt_str(3)?;
        in_ledger.insert(id);
        // Another replica's transfer (or one from before migration 9) is
        // not this log's to hold.
        let mine = match replicas {
            None => true,
            Some(names) => r.opt_str(4)?.is_some_and(|n| names.contains(&n)),
        };
        match audited.get(&id) {
            None if !mine => {}
            None if id > last_audited && !followed(&kind, job.as_deref()) => recoverable.push(id),
            None => findings.push(format!(
                "transfer {id} ({kind}) is missing from the audit log"
            )),
            Some(l) => {
                let ev = l.get("event").and_then(Value::as_str).unwrap_or("");
                let am = l.get("amount_milli").and_then(Value::as_i64);
                if ev != format!("ledger.{kind}") || am != Some(amount) {
                    findings.push(format!(
                        "audit log says {ev} of {am:?} for transfer {id}, the ledger says {kind} of {amount}"
                    ));
                }
            }
        }
    }
    for id in audited.keys() {
        if !in_ledger.contains(id) {
            findings.push(format!(
                "audit log records transfer {id}, which the ledger does not have"
            ));
        }
    }
    Ok(AuditReport {
        findings,
        recoverable,
        totals,
    })
}

/// Holds `DIR/coordinator.lock` while a coordinator serves from `DIR` or
/// `ledger repair` runs on it, so they never write the audit log together.
pub struct DataLock {
    _file: std::fs::File,
}

impl DataLock {
    pub fn take(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("coordinator.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "a coordinator is running on {} (it holds {}); stop it first",
                data_dir.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                anyhow::bail!("locking {}: {e}", path.display())
            }
        }
    }
}

/// Appends the recoverable audit lines (see [`AuditReport::recoverable`])
/// to the audit log of a stopped coordinator. Refuses when the audit finds
/// anything else. Returns how many lines were appended.
pub fn repair(data_dir: &Path) -> anyhow::Result<usize> {
    repair_replica(data_dir, None, None)
}

/// [`repair`]; with PostgreSQL (`database`), of one stopped replica's log
/// in `data_dir`, from the transfers it committed (see [`audit_replica`]).
/// The other replicas may keep serving.
pub fn repair_replica(
    data_dir: &Path,
    database: Option<&str>,
    replica: Option<&str>,
) -> anyhow::Result<usize> {
    let _lock = DataLock::take(data_dir)?;
    let report = audit_replica(data_dir, database, replica)?;
    if !report.findings.is_empty() {
        anyhow::bail!(
            "the audit found {} problem(s) that a repair cannot fix; run `ledger audit` to see them",
            report.findings.len()
        );
    }
    if report.recoverable.is_empty() {
        return Ok(0);
    }
    let names = database
        .map(|_| replica_names(data_dir, replica))
        .transpose()?;
    with_ledger(data_dir, database, |conn| {
        crate::audit::reconcile(&crate::audit::path_in(data_dir), conn, names.as_deref())
    })
}

/// Parses a `BalanceResponse` row helper used by both HTTP and the CLI.
pub fn balance_json(account: &str, cp: i64, dp: i64, dpend: i64) -> BalanceResponse {
    BalanceResponse {
        account: account.to_string(),
        available: credits_from_milli(cp - dp - dpend),
        pending: credits_from_milli(dpend),
        credited: credits_from_milli(cp),
        debited: credits_from_milli(dp),
    }
}
