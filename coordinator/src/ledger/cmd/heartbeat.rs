//! `Heartbeat`: a worker is still there (and what it serves and how busy
//! it is now); a worker that had left is alive again.

use serde_json::json;

use crate::db::Db;
use crate::ledger::to_i64;
use crate::ledger::{LedgerError, Outcome};
use crate::p;

pub(crate) fn apply(
    tx: &mut dyn Db,
    peer_id: &str,
    models: Option<&[String]>,
    addresses: Option<&[String]>,
    (active_jobs, queue_depth): (u32, u32),
    now_secs: u64,
) -> Result<Outcome, LedgerError> {
    let models_json = models.map(|m| json!(m).to_string());
    let addrs_json = addresses.map(|a| json!(a).to_string());
    let n = tx.exec(
        "UPDATE workers SET last_seen = ?2, active_jobs = ?3, queue_depth = ?4,
         models = COALESCE(?5, models), addresses = COALESCE(?6, addresses), left_at = NULL
         WHERE peer_id = ?1",
        p![
            peer_id,
            to_i64(now_secs)?,
            active_jobs,
            queue_depth,
            models_json,
            addrs_json
        ],
    )?;
    if n == 0 {
        return Err(LedgerError::UnknownWorker(peer_id.into()));
    }
    Ok(Outcome::Heartbeat {
        last_seen: now_secs,
    })
}
