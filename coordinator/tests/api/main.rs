//! The coordinator over real HTTP on loopback: every endpoint, its success
//! and its refusals, by topic: `workers` (registration, heartbeats,
//! bootstrap), `money` (tickets, receipts, refunds), `guards` (signatures,
//! limits, bad input, connections) and `operations` (keys, the ledger CLI,
//! audits and repairs, signals, metrics, replicas).

#[path = "../common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{TestCoordinator, now_secs, receipt_for};
use serde_json::{Value, json};
use troop_protocol::api::{AuthorizeResponse, SettlementResponse};
use troop_protocol::identity::generate;
use troop_protocol::receipt::JobStatus;
use troop_protocol::signed::sign_request_with_nonce;
use troop_protocol::ticket::TicketVerifier;

const MODEL: &str = "gemma3:270m";

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("error body is JSON");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string();
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    (status, code)
}

mod guards;
mod money;
mod operations;
mod workers;
