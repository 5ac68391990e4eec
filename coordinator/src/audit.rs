//! The audit log: one JSON object a line in `DIR/logs/audit.log`.
//!
//! Lines are appended by one thread; each drained batch is flushed and
//! fsynced. Every line has `ts_ms`, `event` and `request_id` (null for the
//! sweeper's own work). Events:
//! * `ledger.grant|reserve|settle|refund|expire` with `transfer_id`,
//!   accounts, `amount_milli`, `job_id` (one per ledger transfer);
//! * `authorize.granted` / `authorize.refused` (with `reason`);
//! * `rate_limited` (with `scope` and `key`);
//! * `security.*`: `bad_signature`, `stale_timestamp`, `replay`,
//!   `bad_hmac`, `malformed_receipt`, `receipt_conflict`, `unknown_worker`.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde_json::{Value, json};

enum Msg {
    Line(Value),
    Stop,
}

/// Cloneable handle; lines are written in the order they are recorded.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::SyncSender<Msg>,
    /// The replica's name, on every line when several replicas share one
    /// PostgreSQL ledger (each keeps its own log).
    replica: Option<std::sync::Arc<str>>,
}

/// Lines queued for the writer at most. Ledger lines wait for room (the
/// ledger's writer slows down with the disk); other events are dropped and
/// counted in `troop_limit_hits_total{limit="audit_queue"}` while it is
/// full, so a flood of refused requests cannot grow memory.
pub const AUDIT_QUEUE: usize = 100_000;

pub struct AuditThread {
    tx: mpsc::SyncSender<Msg>,
    join: Option<std::thread::JoinHandle<()>>,
}

use troop_protocol::policy::unix_ms as now_ms;

impl AuditLog {
    /// Opens `path` for appending (creating its folder) and starts the writer.
    pub fn open(path: &Path) -> std::io::Result<(AuditLog, AuditThread)> {
        Self::open_named(path, None)
    }

    /// Like [`AuditLog::open`], naming `replica` on every line.
    pub fn open_named(
        path: &Path,
        replica: Option<String>,
    ) -> std::io::Result<(AuditLog, AuditThread)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::sync_channel(AUDIT_QUEUE);
        let join = std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || writer(file, rx))?;
        Ok((
            AuditLog {
                tx: tx.clone(),
                replica: replica.map(std::sync::Arc::from),
            },
            AuditThread {
                tx,
                join: Some(join),
            },
        ))
    }

    /// Records one event. `fields` must be a JSON object.
    pub fn record(&self, event: &str, request_id: Option<&str>, fields: Value) {
        let mut line = json!({ "ts_ms": now_ms(), "event": event, "request_id": request_id });
        if let (Some(r), Some(obj)) = (&self.replica, line.as_object_mut()) {
            obj.insert("replica".into(), json!(r.as_ref()));
        }
        if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), fields) {
            for (k, v) in extra {
                obj.entry(k).or_insert(v);
            }
        }
        if let Err(mpsc::TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
            metrics::counter!("troop_limit_hits_total", "limit" => "audit_queue").increment(1);
        }
    }

    /// Records ledger events that already carry their `event` name.
    pub fn record_ledger(&self, events: Vec<(Option<String>, Value)>) {
        for (rid, mut ev) in events {
            if let Some(obj) = ev.as_object_mut() {
                obj.insert("ts_ms".into(), json!(now_ms()));
                obj.insert("request_id".into(), json!(rid));
                if let Some(r) = &self.replica {
                    obj.insert("replica".into(), json!(r.as_ref()));
                }
            }
            let _ = self.tx.send(Msg::Line(ev));
        }
    }
}

impl AuditThread {
    /// Writes what is queued, syncs the file and stops.
    pub fn shutdown(mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

fn writer(file: File, rx: mpsc::Receiver<Msg>) {
    let mut out = BufWriter::new(file);
    let mut stop = false;
    while !stop {
        let Ok(first) = rx.recv() else { break };
        let mut pending = vec![first];
        while let Ok(m) = rx.try_recv() {
            pending.push(m);
        }
        for m in pending {
            match m {
                Msg::Line(v) => {
                    let _ = serde_json::to_writer(&mut out, &v);
                    let _ = out.write_all(b"\n");
                }
                Msg::Stop => stop = true,
            }
        }
        if let Err(e) = out.flush().and_then(|_| out.get_ref().sync_data()) {
            tracing::error!(error = %e, "audit log write failed");
        }
    }
}

/// Every parsed line of an audit log; lines that are not JSON are reported
/// by their 1-based number.
pub fn read_lines(path: &Path) -> std::io::Result<(Vec<Value>, Vec<usize>)> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e),
    };
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v) => lines.push(v),
            Err(_) => bad.push(i + 1),
        }
    }
    Ok((lines, bad))
}

/// Transfer ids that the audit log mentions in `ledger.*` lines.
pub fn audited_transfers(lines: &[Value]) -> HashSet<i64> {
    lines
        .iter()
        .filter(|l| {
            l.get("event")
                .and_then(Value::as_str)
                .is_some_and(|e| e.starts_with("ledger."))
        })
        .filter_map(|l| l.get("transfer_id").and_then(Value::as_i64))
        .collect()
}

/// After a crash between a ledger commit and its audit lines, appends a
/// `recovered` line for each committed transfer the log lacks, so that the
/// log and the ledger agree again. Returns how many lines were added.
/// `replicas`: on PostgreSQL, the names of this log's replica; only the
/// transfers they committed after the log's last one are looked for
/// (`None`: every transfer, SQLite).
pub fn reconcile(
    path: &Path,
    conn: &mut dyn crate::db::Db,
    replicas: Option<&[String]>,
) -> anyhow::Result<usize> {
    let (lines, _) = read_lines(path)?;
    let seen = audited_transfers(&lines);
    let rows = match replicas {
        None => conn.query(
            "SELECT id, kind, debit_account, credit_account, amount, job_id, pending_id FROM transfers ORDER BY id",
            crate::p![],
        )?,
        Some(names) => {
            // A lost tail comes after the log's last transfer (ids are given
            // out in commit order): a range of the primary key, not a scan
            // of a ledger every replica writes.
            let after = seen.iter().max().copied().unwrap_or(0);
            let mut rows = Vec::new();
            for name in names {
                rows.extend(conn.query(
                    "SELECT id, kind, debit_account, credit_account, amount, job_id, pending_id, replica FROM transfers WHERE id > ?1 AND replica = ?2 ORDER BY id",
                    crate::p![after, name.as_str()],
                )?);
            }
            rows.sort_by_key(|r| r.i64(0).unwrap_or(0));
            rows
        }
    };
    let mut missing: Vec<Value> = Vec::new();
    for r in &rows {
        let id = r.i64(0)?;
        if seen.contains(&id) {
            continue;
        }
        let replica = if replicas.is_some() {
            r.opt_str(7)?
        } else {
            None
        };
        missing.push(json!({
            "event": format!("ledger.{}", r.str(1)?),
            "transfer_id": id,
            "debit_account": r.str(2)?,
            "credit_account": r.str(3)?,
            "amount_milli": r.i64(4)?,
            "job_id": r.opt_str(5)?,
            "pending_id": r.opt_i64(6)?,
            "recovered": true,
            "ts_ms": now_ms(),
            "request_id": null,
        }));
        if let (Some(name), Some(obj)) =
            (replica, missing.last_mut().and_then(Value::as_object_mut))
        {
            obj.insert("replica".into(), json!(name));
        }
    }
    if missing.is_empty() {
        return Ok(0);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    for v in &missing {
        serde_json::to_writer(&mut f, v)?;
        f.write_all(b"\n")?;
    }
    f.sync_data()?;
    Ok(missing.len())
}

/// Where the audit log of a data folder lives.
pub fn path_in(data_dir: &Path) -> PathBuf {
    data_dir.join("logs").join("audit.log")
}
