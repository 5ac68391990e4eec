//! Receipts: what a worker reports after a job, authenticated with
//! HMAC-SHA256 under the key the coordinator gave it at registration.
//!
//! Headers: `x-troop-timestamp` (unix seconds) and `x-troop-receipt-mac`
//! (hex of HMAC-SHA256 over `{timestamp}.` followed by the raw body bytes).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const HEADER_RECEIPT_MAC: &str = "x-troop-receipt-mac";
pub use crate::signed::HEADER_TIMESTAMP;

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Completed,
    Failed,
    Cancelled,
}

/// A worker's report of one job. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub job_id: String,
    pub worker: String,
    pub user: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub started_at: u64,
    pub finished_at: u64,
    pub status: JobStatus,
    /// A session's requests, each with the user's acknowledgement when it
    /// came (see `usage`). A receipt without them counts as one
    /// unacknowledged request from `started_at` to `finished_at`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<crate::usage::RequestLine>,
}

type HmacSha256 = Hmac<Sha256>;

fn mac_for(key: &[u8], timestamp: u64, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The hex MAC for a receipt body sent at `timestamp`.
pub fn sign_receipt(key: &[u8], timestamp: u64, body: &[u8]) -> String {
    hex::encode(mac_for(key, timestamp, body).finalize().into_bytes())
}

/// Checks a hex MAC in constant time.
pub fn verify_receipt_mac(key: &[u8], timestamp: u64, body: &[u8], mac_hex: &str) -> bool {
    let Ok(tag) = hex::decode(mac_hex) else {
        return false;
    };
    mac_for(key, timestamp, body).verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mac_detects_tampering() {
        let key = [7u8; 32];
        let body = br#"{"job_id":"j"}"#;
        let mac = sign_receipt(&key, 100, body);
        assert!(verify_receipt_mac(&key, 100, body, &mac));
        assert!(!verify_receipt_mac(&key, 101, body, &mac));
        assert!(!verify_receipt_mac(&key, 100, br#"{"job_id":"k"}"#, &mac));
        assert!(!verify_receipt_mac(&[8u8; 32], 100, body, &mac));
        assert!(!verify_receipt_mac(&key, 100, body, "zz"));
    }

    fn status() -> impl Strategy<Value = JobStatus> {
        prop_oneof![
            Just(JobStatus::Completed),
            Just(JobStatus::Failed),
            Just(JobStatus::Cancelled)
        ]
    }

    proptest! {
        #[test]
        fn receipt_json_round_trips(job_id in ".{0,40}", worker in "[a-zA-Z0-9]{0,52}", user in "[a-zA-Z0-9]{0,52}",
            model in ".{0,30}", p in any::<u64>(), c in any::<u64>(), s in any::<u64>(), f in any::<u64>(), st in status()) {
            let r = Receipt { job_id, worker, user, model, prompt_tokens: p, completion_tokens: c, started_at: s, finished_at: f, status: st, requests: Vec::new() };
            let json = serde_json::to_vec(&r).expect("ser");
            let back: Receipt = serde_json::from_slice(&json).expect("de");
            prop_assert_eq!(back, r);
        }
    }
}
