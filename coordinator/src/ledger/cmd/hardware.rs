//! `SetHardware`: a verified proof of hardware sets the worker's
//! measured speed, its price multiplier and what proved it; a re-proof
//! missed or failed clears the speed and lowers the multiplier.

use crate::db::Db;
use crate::ledger::load_worker;
use crate::ledger::{LedgerError, Outcome};
use crate::p;

pub(crate) fn apply(
    tx: &mut dyn Db,
    peer_id: &str,
    verified_gflops: Option<f64>,
    multiplier_milli: i64,
    backend: Option<&str>,
    adapter: Option<&str>,
) -> Result<Outcome, LedgerError> {
    let n = tx.exec(
        "UPDATE workers SET verified_gflops = ?2, multiplier_milli = ?3, proof_backend = ?4, proof_adapter = ?5 WHERE peer_id = ?1",
        p![peer_id, verified_gflops, multiplier_milli, backend, adapter],
    )?;
    if n == 0 {
        return Err(LedgerError::UnknownWorker(peer_id.into()));
    }
    load_worker(tx, peer_id)?
        .map(Outcome::Worker)
        .ok_or_else(|| LedgerError::UnknownWorker(peer_id.into()))
}
