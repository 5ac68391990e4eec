//! JSON bodies of the coordinator's HTTP API. Amounts are credit-seconds as
//! JSON numbers with milli-credit precision.

use serde::{Deserialize, Serialize};

/// `POST /workers/register` (signed by the worker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Model names the worker serves.
    pub models: Vec<String>,
    /// Multiaddrs the worker listens on (with or without `/p2p/<id>`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Free-form version string of the worker software.
    #[serde(default)]
    pub version: Option<String>,
}

/// Answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub peer_id: String,
    /// The HMAC-SHA256 key for receipts, 32 bytes, hex.
    pub receipt_key: String,
    pub hardware_multiplier: f64,
    /// Seconds between heartbeats the coordinator expects.
    pub heartbeat_interval_secs: u64,
}

/// Load a worker reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    #[serde(default)]
    pub active_jobs: u32,
    #[serde(default)]
    pub queue_depth: u32,
}

/// `POST /workers/heartbeat` (signed by the worker).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub addresses: Option<Vec<String>>,
    #[serde(default)]
    pub load: Load,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub ok: bool,
    pub last_seen: u64,
    /// A fresh proof of hardware the coordinator asks for, at times the
    /// worker cannot predict (issue 28): prove it and submit it through
    /// `POST /bench/submit` before its deadline, as at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reproof: Option<BenchChallenge>,
}

/// A worker as `GET /workers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub peer_id: String,
    pub models: Vec<String>,
    pub addresses: Vec<String>,
    pub hardware_multiplier: f64,
    /// Null until a proof of hardware passes.
    pub verified_gflops: Option<f64>,
    /// What computed the standing proof: cpu, wgpu or cuda (null before a
    /// proof, or from older workers and coordinators).
    #[serde(default)]
    pub hardware_backend: Option<String>,
    /// The graphics adapter it ran on, as its driver names it.
    #[serde(default)]
    pub hardware_adapter: Option<String>,
    /// Unix seconds of the last registration or heartbeat.
    pub last_seen: u64,
    pub alive: bool,
    pub load: Load,
    /// Figures from settled sessions (absent until one settles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reputation: Option<ReputationInfo>,
    /// Audits of its answers that gateways reported and the coordinator
    /// verified (issue 25; zero from older coordinators).
    #[serde(default)]
    pub audits: AuditCounts,
    /// Suspended after confirmed audit failures: no tickets are sold for it.
    #[serde(default)]
    pub suspended: bool,
}

/// A worker's verified audits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCounts {
    pub passed: u64,
    pub failed: u64,
}

/// A worker's record: requests settled, the share its users acknowledged,
/// the share where its time and the user's differed by more than the
/// tolerance (1 s plus 20 %), and the share it filed without an ack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReputationInfo {
    pub requests: u64,
    pub acknowledged_share: f64,
    pub disputed_share: f64,
    /// Requests its receipts listed with no acknowledgement (absent from
    /// older coordinators).
    #[serde(default)]
    pub unacknowledged_share: f64,
}

/// `GET /workers`: workers in the order of their peer ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkersResponse {
    pub workers: Vec<WorkerInfo>,
    /// With `?limit=`, when more workers follow: the `after=` of the next
    /// page (the last peer id of this one). Absent on the last page and
    /// from older coordinators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// One entry point into the DHT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapPeer {
    pub peer_id: String,
    pub addresses: Vec<String>,
    /// A circuit relay (listed by the coordinator's operator) that nodes
    /// behind NAT can reserve a slot on.
    #[serde(default)]
    pub relay: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapResponse {
    pub peers: Vec<BootstrapPeer>,
}

/// `POST /authorize` (signed by the user).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeRequest {
    pub model: String,
    /// The worker's PeerId.
    pub worker: String,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Hashcash nonce for a new account's starter credits when the
    /// coordinator asks for one (`usage::pow_bits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pow: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthorizeResponse {
    /// The RS256 JWT to hand to the worker.
    pub ticket: String,
    pub job_id: String,
    pub worker: String,
    pub model: String,
    /// Credit-seconds held for this job.
    pub reserved: f64,
    /// Unix seconds when the ticket expires.
    pub expires_at: u64,
    pub kid: String,
}

/// `GET /users/{id}/balance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalanceResponse {
    pub account: String,
    /// Spendable now.
    pub available: f64,
    /// Held by open reservations.
    pub pending: f64,
    /// Everything ever credited to the account.
    pub credited: f64,
    /// Everything ever debited from the account (posted).
    pub debited: f64,
}

/// One line of `GET /users/{id}/transactions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionEntry {
    pub id: i64,
    /// `grant`, `reserve`, `settle`, `refund` or `expire`.
    pub kind: String,
    /// Signed change to this account's available balance, in credit-seconds
    /// (a reservation is negative; a settlement shows what moved).
    pub amount: f64,
    /// `pending`, `posted` or `voided`.
    pub status: String,
    /// On a settled reservation (`reserve`, `posted`): the credit-seconds
    /// given back when it settled (reserved - cost), so that `amount +
    /// released` is what it cost (its `settle` line). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<f64>,
    pub debit_account: String,
    pub credit_account: String,
    #[serde(default)]
    pub job_id: Option<String>,
    /// Unix milliseconds.
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionsResponse {
    pub account: String,
    pub transactions: Vec<TransactionEntry>,
    /// Pass as `?before=` to get the next (older) page; null at the end.
    pub next_before: Option<i64>,
    /// The account's balance as of this page (absent from coordinators
    /// older than the console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<BalanceResponse>,
}

/// Answer to `POST /transactions/submit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettlementResponse {
    pub job_id: String,
    /// `settled` or `refunded`.
    pub outcome: String,
    /// Credit-seconds moved to the worker.
    pub cost: f64,
    /// Credit-seconds given back to the user.
    pub refunded: f64,
    /// True when this receipt had already been settled (nothing changed now).
    pub replayed: bool,
}

/// The error body of every coordinator refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: crate::ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `POST /bench/challenge` (body `{}`): a round of the proof of hardware.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchChallenge {
    pub challenge_id: String,
    /// 64 hex digits.
    pub seed: String,
    pub n: usize,
    pub rounds: u32,
    /// Unix seconds.
    pub deadline: u64,
    /// Rows that will be asked for.
    pub samples: usize,
}

/// The answer to `POST /bench/submit {"challenge_id", "root"}`: the rows to
/// open, and the seconds the coordinator measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRows {
    pub challenge_id: String,
    pub rows: Vec<usize>,
    pub seconds: f64,
}

/// The answer to `POST /bench/submit {"challenge_id", "openings"}` when the
/// proof verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchVerdict {
    pub challenge_id: String,
    pub verified: bool,
    pub verified_gflops: f64,
    pub hardware_multiplier: f64,
    pub seconds: f64,
}
