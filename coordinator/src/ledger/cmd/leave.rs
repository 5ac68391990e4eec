//! `Leave`: a worker stops. It is no longer alive (out of `/bootstrap`,
//! no tickets naming it); its receipts still settle.

use crate::db::Db;
use crate::ledger::to_i64;
use crate::ledger::{LedgerError, Outcome};
use crate::p;

pub(crate) fn apply(
    tx: &mut dyn Db,
    peer_id: &str,
    now_secs: u64,
    signed_at: Option<u64>,
) -> Result<Outcome, LedgerError> {
    // `last_seen` moves too: replicas keep the newest row they read. A
    // heartbeat signed before the leave is a replay from then on.
    let n = tx.exec(
        "UPDATE workers SET last_seen = ?2, left_at = ?2, active_jobs = 0, queue_depth = 0,
         last_signed = CASE WHEN last_signed IS NULL OR last_signed < ?3 THEN ?3 ELSE last_signed END
         WHERE peer_id = ?1",
        p![peer_id, to_i64(now_secs)?, signed_at.map(to_i64).transpose()?],
    )?;
    if n == 0 {
        return Err(LedgerError::UnknownWorker(peer_id.into()));
    }
    Ok(Outcome::Heartbeat {
        last_seen: now_secs,
        replay: false,
    })
}
