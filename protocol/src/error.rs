//! Stable error codes and the crate's error type.

use serde::{Deserialize, Serialize};

/// A stable error code. The numbers and the snake_case names never change
/// meaning; new codes are only ever added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    PaymentRequired,
    RateLimited,
    Conflict,
    PayloadTooLarge,
    Unavailable,
    Busy,
    UpstreamFailed,
    Timeout,
    Internal,
    StaleTimestamp,
    Replay,
    BadSignature,
    UnknownWorker,
    UnknownAccount,
    UnknownModel,
    ReservationExpired,
    UpstreamRejected,
}

impl ErrorCode {
    /// The stable number of this code (for binary frames).
    pub const fn number(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 1,
            ErrorCode::Unauthorized => 2,
            ErrorCode::Forbidden => 3,
            ErrorCode::NotFound => 4,
            ErrorCode::PaymentRequired => 5,
            ErrorCode::RateLimited => 6,
            ErrorCode::Conflict => 7,
            ErrorCode::PayloadTooLarge => 8,
            ErrorCode::Unavailable => 9,
            ErrorCode::Busy => 10,
            ErrorCode::UpstreamFailed => 11,
            ErrorCode::Timeout => 12,
            ErrorCode::Internal => 13,
            ErrorCode::StaleTimestamp => 14,
            ErrorCode::Replay => 15,
            ErrorCode::BadSignature => 16,
            ErrorCode::UnknownWorker => 17,
            ErrorCode::UnknownAccount => 18,
            ErrorCode::UnknownModel => 19,
            ErrorCode::ReservationExpired => 20,
            ErrorCode::UpstreamRejected => 21,
        }
    }

    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::PaymentRequired,
        ErrorCode::RateLimited,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Unavailable,
        ErrorCode::Busy,
        ErrorCode::UpstreamFailed,
        ErrorCode::Timeout,
        ErrorCode::Internal,
        ErrorCode::StaleTimestamp,
        ErrorCode::Replay,
        ErrorCode::BadSignature,
        ErrorCode::UnknownWorker,
        ErrorCode::UnknownAccount,
        ErrorCode::UnknownModel,
        ErrorCode::ReservationExpired,
        ErrorCode::UpstreamRejected,
    ];

    /// Looks a code up by its stable number.
    pub fn from_number(n: u16) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.number() == n)
    }

    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PaymentRequired => "payment_required",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Busy => "busy",
            ErrorCode::UpstreamFailed => "upstream_failed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::StaleTimestamp => "stale_timestamp",
            ErrorCode::Replay => "replay",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::UnknownWorker => "unknown_worker",
            ErrorCode::UnknownAccount => "unknown_account",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::ReservationExpired => "reservation_expired",
            ErrorCode::UpstreamRejected => "upstream_rejected",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the shared protocol logic.
#[derive(Debug, thiserror::Error)]
pub enum TroopError {
    #[error("invalid account id {0:?}: {1}")]
    InvalidAccountId(String, String),
    #[error("signed request: {0}")]
    Signature(#[from] crate::signed::SignError),
    #[error("ticket: {0}")]
    Ticket(#[from] crate::ticket::TicketError),
    #[error("identity file {path}: {reason}")]
    IdentityFile { path: String, reason: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl TroopError {
    /// The stable code for this error on the wire.
    pub fn code(&self) -> ErrorCode {
        match self {
            TroopError::InvalidAccountId(..) => ErrorCode::BadRequest,
            TroopError::Signature(e) => e.code(),
            TroopError::Ticket(_) => ErrorCode::Unauthorized,
            TroopError::IdentityFile { .. } | TroopError::Io(_) => ErrorCode::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_are_unique_and_round_trip() {
        let mut numbers = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(numbers.insert(code.number()), "duplicate number {code}");
            assert!(names.insert(code.as_str()), "duplicate name {code}");
            assert_eq!(ErrorCode::from_number(code.number()), Some(code));
            let json = serde_json::to_string(&code).expect("serialize");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, code);
        }
        assert_eq!(ErrorCode::from_number(0), None);
    }
}
