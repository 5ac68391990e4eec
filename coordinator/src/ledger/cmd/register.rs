//! `RegisterWorker`: a worker joins (or joins again); an existing receipt
//! key is kept, and a worker that had left is alive again.

use serde_json::json;

use crate::db::Db;
use crate::ledger::{LedgerError, Outcome};
use crate::ledger::{load_worker, to_i64};
use crate::p;

/// Registers `peer_id` (its account too, once).
pub(crate) fn apply(
    tx: &mut dyn Db,
    peer_id: &str,
    models: &[String],
    addresses: &[String],
    version: Option<&str>,
    new_key: &[u8; 32],
    now: u64,
) -> Result<Outcome, LedgerError> {
    let now_i = to_i64(now)?;
    tx.write(
        "INSERT INTO accounts (id, kind, created_at) VALUES (?1, 'worker', ?2)
         ON CONFLICT(id) DO NOTHING",
        p![peer_id, now_i],
    )?;
    let kind = tx
        .query_one("SELECT kind FROM accounts WHERE id = ?1", p![peer_id])?
        .str(0)?;
    if kind == "mint" {
        return Err(LedgerError::Range("reserved account id".into()));
    }
    tx.write(
        "INSERT INTO workers (peer_id, receipt_key, models, addresses, version, registered_at, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT(peer_id) DO UPDATE SET models = excluded.models, addresses = excluded.addresses,
           version = excluded.version, last_seen = excluded.last_seen, left_at = NULL,
           last_signed = NULL",
        p![
            peer_id,
            &new_key[..],
            json!(models).to_string(),
            json!(addresses).to_string(),
            version,
            now_i
        ],
    )?;
    load_worker(tx, peer_id)?
        .map(Outcome::Worker)
        .ok_or_else(|| LedgerError::UnknownWorker(peer_id.into()))
}
