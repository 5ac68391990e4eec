//! `Heartbeat`: a worker is still there (and what it serves and how busy
//! it is now); a worker that had left is alive again.

use serde_json::json;

use crate::db::Db;
use crate::ledger::to_i64;
use crate::ledger::{Beat, LedgerError, Outcome};
use crate::p;

pub(crate) fn apply(
    tx: &mut dyn Db,
    peer_id: &str,
    models: Option<&[String]>,
    addresses: Option<&[String]>,
    (active_jobs, queue_depth): (u32, u32),
    (now_secs, signed_at): (u64, Option<u64>),
) -> Result<Outcome, LedgerError> {
    let models_json = models.map(|m| json!(m).to_string());
    let addrs_json = addresses.map(|a| json!(a).to_string());
    let signed = signed_at.map(to_i64).transpose()?;
    let n = tx.exec(
        "UPDATE workers SET last_seen = ?2, active_jobs = ?3, queue_depth = ?4,
         models = COALESCE(?5, models), addresses = COALESCE(?6, addresses), left_at = NULL,
         last_signed = COALESCE(?7, last_signed)
         WHERE peer_id = ?1 AND (CAST(?7 AS BIGINT) IS NULL OR last_signed IS NULL OR last_signed < ?7)",
        p![
            peer_id,
            to_i64(now_secs)?,
            active_jobs,
            queue_depth,
            models_json,
            addrs_json,
            signed
        ],
    )?;
    if n == 0 {
        // A replay of a heartbeat already written, or no such worker.
        let seen = tx
            .query_opt(
                "SELECT last_seen FROM workers WHERE peer_id = ?1",
                p![peer_id],
            )?
            .ok_or_else(|| LedgerError::UnknownWorker(peer_id.into()))?
            .i64(0)?;
        return Ok(Outcome::Heartbeat {
            last_seen: seen.max(0) as u64,
            replay: true,
        });
    }
    Ok(Outcome::Heartbeat {
        last_seen: now_secs,
        replay: false,
    })
}

/// A replica's kept heartbeats, in one statement (PostgreSQL only: only
/// a replica keeps heartbeats). A beat counts only when it was signed after
/// the newest one written (`last_signed`), so the same heartbeat kept by two
/// replicas (a replay) is written once; `last_seen` (the time a replica
/// received it) only moves forward; a worker that left stays gone.
pub(crate) fn apply_many(tx: &mut dyn Db, beats: &[Beat]) -> Result<Outcome, LedgerError> {
    let rows: Vec<serde_json::Value> = beats
        .iter()
        .map(|b| {
            json!({
                "p": b.peer_id,
                "s": b.seen_at,
                "g": b.signed_at,
                "a": b.active_jobs,
                "q": b.queue_depth,
            })
        })
        .collect();
    tx.write(
        "UPDATE workers AS w SET last_seen = GREATEST(w.last_seen, b.s), last_signed = b.g,
                active_jobs = b.a, queue_depth = b.q
         FROM jsonb_to_recordset(CAST(CAST(?1 AS TEXT) AS jsonb)) AS b(p TEXT, s BIGINT, g BIGINT, a BIGINT, q BIGINT)
         WHERE w.peer_id = b.p AND w.left_at IS NULL AND (w.last_signed IS NULL OR w.last_signed < b.g)",
        p![json!(rows).to_string()],
    )?;
    Ok(Outcome::Beats {
        written: beats.len(),
    })
}
