//! The coordinator's HTTP leaves, which the handlers under `routes/`
//! depend on and which depend on no handler: `extract.rs` (the signed
//! request extractors, the client's address, the request id, the audit
//! log's security events) and `error.rs` (the error body every refusal
//! has).

pub mod error;
pub mod extract;
