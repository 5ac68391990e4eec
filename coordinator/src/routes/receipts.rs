//! `/transactions/submit`: a worker's receipt settles its session.

use super::*;
use troop_protocol::usage;

pub(crate) async fn submit_receipt(
    State(state): St,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let rid = request_id(&headers);
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let refuse = |event: &str, code: ErrorCode, msg: String| {
        security_event(
            &state,
            event,
            &rid,
            json!({ "path": "/transactions/submit", "reason": msg }),
        );
        ApiError::unauthorized(code, msg).with_request_id(&rid)
    };
    let Some(mac) = h(HEADER_RECEIPT_MAC) else {
        return Err(refuse(
            "bad_hmac",
            ErrorCode::Unauthorized,
            format!("missing header {HEADER_RECEIPT_MAC}"),
        ));
    };
    let Some(ts) = h(HEADER_TIMESTAMP).and_then(|t| t.parse::<u64>().ok()) else {
        return Err(refuse(
            "bad_hmac",
            ErrorCode::Unauthorized,
            format!("missing or malformed {HEADER_TIMESTAMP}"),
        ));
    };
    let receipt: Receipt = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => {
            security_event(
                &state,
                "malformed_receipt",
                &rid,
                json!({ "reason": e.message }),
            );
            return Err(e.with_request_id(&rid));
        }
    };
    let key = state
        .worker_with(&receipt.worker, |w| w.receipt_key.clone())
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    let Some(key) = key else {
        return Err(refuse(
            "unknown_worker",
            ErrorCode::UnknownWorker,
            format!("worker {:.60} is not registered", receipt.worker),
        ));
    };
    if !verify_receipt_mac(&key, ts, &body, mac) {
        return Err(refuse(
            "bad_hmac",
            ErrorCode::BadSignature,
            "receipt HMAC does not verify".into(),
        ));
    }
    let now = unix_secs();
    if now.abs_diff(ts) > state.cfg.max_skew_secs {
        return Err(refuse(
            "stale_timestamp",
            ErrorCode::StaleTimestamp,
            format!(
                "timestamp {ts} is {} s from the server's clock",
                now.abs_diff(ts)
            ),
        ));
    }
    let sha = hex::encode(Sha256::digest(&body));
    let job_id = receipt.job_id.clone();
    // The acks' signatures are the costly part of a settlement and need
    // nothing of the ledger: checked here, on this request's thread, not
    // on the ledger's one writer thread (a long session off the runtime).
    let ack_signatures = if receipt.requests.len() <= 8 {
        usage::ack_signatures(&receipt.requests, &receipt.user)
    } else {
        let (lines, user) = (receipt.requests.clone(), receipt.user.clone());
        tokio::task::spawn_blocking(move || usage::ack_signatures(&lines, &user))
            .await
            .map_err(|e| {
                ApiError::internal(format!("checking the acks failed: {e}")).with_request_id(&rid)
            })?
    };
    let out = state
        .writer
        .submit(
            Command::Settle {
                receipt,
                receipt_sha256: sha,
                now_ms: unix_ms(),
                unacked_cap_ms: state.cfg.unacked_cap_secs.saturating_mul(1000),
                tolerance_ms: state.cfg.clock_tolerance_ms,
                ack_signatures: Some(ack_signatures),
            },
            Some(rid.clone()),
        )
        .await;
    let settlement = match out {
        Ok(Outcome::Settled(s)) => s,
        Ok(_) => return Err(ApiError::internal("unexpected ledger outcome").with_request_id(&rid)),
        Err(e) => {
            if matches!(e, LedgerError::Conflict(_)) {
                security_event(
                    &state,
                    "receipt_conflict",
                    &rid,
                    json!({ "job_id": job_id }),
                );
            } else if let LedgerError::BadAck(reason) = &e {
                security_event(
                    &state,
                    "bad_ack",
                    &rid,
                    json!({ "job_id": job_id, "reason": reason }),
                );
            } else {
                state.audit.record(
                    "receipt.refused",
                    Some(&rid),
                    json!({ "job_id": job_id, "reason": e.to_string() }),
                );
            }
            return Err(ledger_error(&state, e, &rid));
        }
    };
    if settlement.replayed {
        security_event(
            &state,
            "replay",
            &rid,
            json!({ "kind": "receipt", "job_id": settlement.job_id }),
        );
    }
    Ok(axum::Json(SettlementResponse {
        job_id: settlement.job_id,
        outcome: settlement.outcome.to_string(),
        cost: credits_from_milli(settlement.cost),
        refunded: credits_from_milli(settlement.refunded),
        replayed: settlement.replayed,
    })
    .into_response())
}
