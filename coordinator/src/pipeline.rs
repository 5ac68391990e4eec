//! One request pipeline for the signed endpoints: the body read within its
//! limit, the Ed25519 signature and nonce checked, the JSON parsed into a
//! typed struct (unknown fields refused), the request id and the client's
//! address at hand. A handler takes `Signed<T>` and starts from there.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use libp2p_identity::PeerId;
use serde::de::DeserializeOwned;
use troop_protocol::ErrorCode;

use crate::AppState;
use crate::error::{ApiError, parse_json};
use crate::ledger::LedgerError;
use crate::routes::{client_ip, request_id, verify_signed};

/// A verified signed request with its body parsed as `T`.
pub struct Signed<T> {
    /// Who signed it.
    pub peer: PeerId,
    pub body: T,
    /// The request's `x-request-id`.
    pub rid: String,
    pub ip: IpAddr,
}

/// A verified signed request whose body the handler parses itself (to
/// audit a refusal of it, say).
pub struct SignedBytes {
    pub peer: PeerId,
    pub bytes: Bytes,
    pub rid: String,
    pub ip: IpAddr,
}

impl FromRequest<Arc<AppState>> for SignedBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let ip = client_ip(state, &req);
        let (parts, body) = req.into_parts();
        let rid = request_id(&parts.headers);
        let bytes = axum::body::to_bytes(body, state.cfg.body_limit_bytes)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::PayloadTooLarge,
                    "request body too large",
                )
                .with_request_id(&rid)
            })?;
        let peer = verify_signed(
            state,
            &parts.headers,
            &parts.method,
            &parts.uri,
            &bytes,
            &rid,
        )
        .await?;
        Ok(Self {
            peer,
            bytes,
            rid,
            ip,
        })
    }
}

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for Signed<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let SignedBytes {
            peer,
            bytes,
            rid,
            ip,
        } = SignedBytes::from_request(req, state).await?;
        let body = parse_json(&bytes).map_err(|e| e.with_request_id(&rid))?;
        Ok(Self {
            peer,
            body,
            rid,
            ip,
        })
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        let (status, code) = match &e {
            LedgerError::InsufficientFunds { .. } | LedgerError::GrantRefused(_) => {
                (StatusCode::PAYMENT_REQUIRED, ErrorCode::PaymentRequired)
            }
            LedgerError::UnknownJob(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            LedgerError::UnknownWorker(_) => (StatusCode::NOT_FOUND, ErrorCode::UnknownWorker),
            LedgerError::Mismatch(_) | LedgerError::BadAck(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::BadRequest)
            }
            LedgerError::Conflict(_) | LedgerError::DuplicateJob(_) => {
                (StatusCode::CONFLICT, ErrorCode::Conflict)
            }
            LedgerError::ReservationExpired(_) => {
                (StatusCode::CONFLICT, ErrorCode::ReservationExpired)
            }
            LedgerError::Range(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            LedgerError::Closed
            | LedgerError::Invariant(_)
            | LedgerError::Storage(_)
            | LedgerError::Unavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable)
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}
