//! Why the ledger refused a command: the leaf every store and handler
//! names (it imports nothing of the ledger).

use troop_protocol::MilliCredits;

/// Why the ledger refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient credits: {available} available, {required} required (milli-credits)")]
    InsufficientFunds {
        available: MilliCredits,
        required: MilliCredits,
    },
    #[error("unknown job {0}")]
    UnknownJob(String),
    #[error("unknown worker {0}")]
    UnknownWorker(String),
    #[error("receipt does not match the job: {0}")]
    Mismatch(String),
    #[error("job {0} was already settled with a different receipt")]
    Conflict(String),
    #[error("the reservation of job {0} expired and was refunded")]
    ReservationExpired(String),
    #[error("job id {0} already exists")]
    DuplicateJob(String),
    #[error("amount out of range: {0}")]
    Range(String),
    #[error("ledger invariant violated: {0}")]
    Invariant(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("the ledger is shutting down")]
    Closed,
    /// The database cannot be reached now (PostgreSQL down or restarting).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("no starter credits: {0}")]
    GrantRefused(String),
    #[error("acknowledgement refused: {0}")]
    BadAck(String),
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Storage(e.to_string())
    }
}
