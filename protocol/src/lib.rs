//! Troop's wire types and shared policy.
//!
//! This crate knows no sockets and no async runtime: it holds the types that
//! travel between the gateway, the worker and the coordinator, how requests
//! are signed, how tickets are verified offline, how receipts are
//! authenticated, the stable error codes, and the retry and circuit-breaker
//! policy that every client follows.

pub mod addr_scope;
pub mod advert;
pub mod api;
pub mod audit;
pub mod error;
pub mod evidence;
pub mod frames;
pub mod identity;
pub mod policy;
pub mod receipt;
pub mod signed;
pub mod sync;
#[cfg(feature = "telemetry")]
pub mod telemetry;
pub mod ticket;
pub mod usage;

pub use error::{ErrorCode, TroopError};
pub use identity::AccountId;

/// Milli-credits: the integer unit of the ledger. One credit-second is 1,000.
pub type MilliCredits = i64;

/// Converts milli-credits to credit-seconds for JSON (milli-credit precision).
pub fn credits_from_milli(milli: MilliCredits) -> f64 {
    milli as f64 / 1000.0
}
