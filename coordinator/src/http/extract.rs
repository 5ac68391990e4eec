//! One request pipeline for the signed endpoints: the body read within its
//! limit, the Ed25519 signature and nonce checked, the JSON parsed into a
//! typed struct (unknown fields refused), the request id and the client's
//! address at hand. A handler takes `Signed<T>` and starts from there.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, Request};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use libp2p_identity::PeerId;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use troop_protocol::ErrorCode;
use troop_protocol::signed::{self, HEADER_NONCE, HEADER_PEER, HEADER_SIGNATURE, HEADER_TIMESTAMP};

use crate::http::error::{ApiError, parse_json};
use crate::ledger::LedgerError;
use crate::{AppState, unix_secs};

/// A verified signed request with its body parsed as `T`.
pub struct Signed<T> {
    /// Who signed it.
    pub peer: PeerId,
    pub body: T,
    /// The request's `x-request-id`.
    pub rid: String,
    pub ip: IpAddr,
    /// When it was signed (its checked `x-troop-timestamp`, Unix seconds).
    pub signed_at: u64,
}

/// A verified signed request whose body the handler parses itself (to
/// audit a refusal of it, say).
pub struct SignedBytes {
    pub peer: PeerId,
    pub bytes: Bytes,
    pub rid: String,
    pub ip: IpAddr,
    pub signed_at: u64,
    /// With PostgreSQL, on a path of [`NONCE_WITH_QUOTAS`]: the nonce the
    /// handler must still check (with its quotas, in one round trip:
    /// `AppState::admit`, then [`replay_refused`] when it was seen).
    pub nonce: Option<DeferredNonce>,
}

/// A signed request's nonce not yet remembered.
#[derive(Debug, Clone)]
pub struct DeferredNonce {
    pub peer: String,
    pub nonce: String,
    pub signed_at: u64,
}

/// Paths whose handlers check the nonce of a signed request themselves,
/// together with their shared quotas (one database round trip instead of
/// three with PostgreSQL): `routes::tickets::authorize`.
const NONCE_WITH_QUOTAS: &[&str] = &["/authorize"];

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
        let defer = state.shared() && NONCE_WITH_QUOTAS.contains(&parts.uri.path());
        let (peer, signed_at, nonce) = verify_signed_deferring(
            state,
            &parts.headers,
            &parts.method,
            &parts.uri,
            &bytes,
            &rid,
            defer,
        )
        .await?;
        Ok(Self {
            peer,
            bytes,
            rid,
            ip,
            signed_at,
            nonce,
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
            signed_at,
            nonce,
        } = SignedBytes::from_request(req, state).await?;
        if let Some(n) = nonce {
            // Only handlers of `NONCE_WITH_QUOTAS` take their nonce late,
            // and they take `SignedBytes`.
            tracing::error!(peer = %n.peer, "a deferred nonce reached a typed handler");
            return Err(ApiError::internal("nonce not checked").with_request_id(&rid));
        }
        let body = parse_json(&bytes).map_err(|e| e.with_request_id(&rid))?;
        Ok(Self {
            peer,
            body,
            rid,
            ip,
            signed_at,
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

// ---------------------------------------------------------------------------
// The leaves every handler uses: request id, client address, signature and
// nonce check, security events, ledger errors as HTTP ones.

pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The client's address as per-address limits key it (see
/// [`crate::client_addr`]): the peer, or with a trusted proxy the
/// rightmost `X-Forwarded-For` entry that is not a proxy; an IPv6
/// client's /64.
pub(crate) fn client_ip(state: &AppState, req: &Request) -> IpAddr {
    crate::client_addr::limit_key(client_ip_of(state, req.headers(), req.extensions()))
}

/// The caller's exact IP (the peer, or behind a trusted proxy the
/// client it names), for answers that depend on where the caller is.
pub struct CallerIp(pub IpAddr);

impl axum::extract::FromRequestParts<Arc<AppState>> for CallerIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(client_ip_of(state, &parts.headers, &parts.extensions)))
    }
}

fn client_ip_of(state: &AppState, headers: &HeaderMap, ext: &axum::http::Extensions) -> IpAddr {
    let peer = if let Some(ConnectInfo(crate::listener::ClientAddr(a))) =
        ext.get::<ConnectInfo<crate::listener::ClientAddr>>()
    {
        a.ip()
    } else {
        ext.get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    };
    crate::client_addr::client_addr(
        headers,
        peer,
        state.cfg.trusted_proxy,
        &state.cfg.trusted_proxy_nets,
    )
}

pub(crate) fn security_event(state: &AppState, event: &str, rid: &str, fields: Value) {
    metrics::counter!("troop_security_events_total", "event" => event.to_string()).increment(1);
    state
        .audit
        .record(&format!("security.{event}"), Some(rid), fields);
}

/// Nonces remembered at most (each for `max_skew_secs`): beyond it signed
/// requests are answered 503 until old ones age out.
const MAX_NONCES: usize = 500_000;

/// Requests whose replay changes nothing, so their nonces stay in the
/// replica that saw them instead of costing a shared database write each:
/// a heartbeat counts only when it was signed after the newest one
/// recorded for its worker (`workers.last_signed`, which a leave moves
/// too; see `routes::workers::heartbeat`), so the same heartbeat sent to
/// another replica is a no-op there.
fn replay_harmless(state: &AppState, path: &str) -> bool {
    path == "/workers/heartbeat" && state.beats_batched()
}

/// Verifies a signed request and its nonce; audits every refusal. Returns
/// the signer and the time it signed.
pub(crate) async fn verify_signed(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: &[u8],
    rid: &str,
) -> Result<(libp2p_identity::PeerId, u64), ApiError> {
    let (peer, at, _) =
        verify_signed_deferring(state, headers, method, uri, body, rid, false).await?;
    Ok((peer, at))
}

/// The refusal of a signed request whose nonce some replica saw already
/// (audited as [`verify_signed`] does).
pub(crate) fn replay_refused(state: &AppState, rid: &str, path: &str, peer: &str) -> ApiError {
    sign_refused(state, rid, path, Some(peer), signed::SignError::Replay)
}

/// A signed request refused: its security event audited, its 401.
fn sign_refused(
    state: &AppState,
    rid: &str,
    path: &str,
    peer: Option<&str>,
    e: signed::SignError,
) -> ApiError {
    let event = match e.code() {
        ErrorCode::StaleTimestamp => "stale_timestamp",
        ErrorCode::Replay => "replay",
        _ => "bad_signature",
    };
    security_event(
        state,
        event,
        rid,
        json!({ "path": path, "peer": peer, "reason": e.to_string() }),
    );
    ApiError::unauthorized(e.code(), e.to_string()).with_request_id(rid)
}

/// [`verify_signed`]; with `defer` and PostgreSQL the nonce is not checked
/// but returned, for the handler to check with its quotas.
async fn verify_signed_deferring(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: &[u8],
    rid: &str,
    defer: bool,
) -> Result<(libp2p_identity::PeerId, u64, Option<DeferredNonce>), ApiError> {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    for name in [
        HEADER_PEER,
        HEADER_TIMESTAMP,
        HEADER_NONCE,
        HEADER_SIGNATURE,
    ] {
        if headers.get_all(name).iter().nth(1).is_some() {
            security_event(
                state,
                "bad_signature",
                rid,
                json!({ "path": uri.path(), "reason": format!("{name} sent twice") }),
            );
            return Err(ApiError::unauthorized(
                ErrorCode::BadSignature,
                format!("the {name} header must be sent once"),
            )
            .with_request_id(rid));
        }
    }
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or(uri.path());
    let now = unix_secs();
    let refuse = |e: signed::SignError| sign_refused(state, rid, uri.path(), h(HEADER_PEER), e);
    let v = signed::verify_request(
        [
            h(HEADER_PEER),
            h(HEADER_TIMESTAMP),
            h(HEADER_NONCE),
            h(HEADER_SIGNATURE),
        ],
        method.as_str(),
        path,
        body,
        now,
        state.cfg.max_skew_secs,
    )
    .map_err(refuse)?;
    if state.shared() && defer {
        let d = DeferredNonce {
            peer: v.peer.to_base58(),
            nonce: v.nonce.clone(),
            signed_at: v.timestamp,
        };
        return Ok((v.peer, v.timestamp, Some(d)));
    }
    if state.shared() && !replay_harmless(state, uri.path()) {
        // PostgreSQL: every replica's nonces in one table, kept across
        // restarts, so a request replayed to another replica is refused.
        return match state
            .remember_nonce(v.peer.to_base58(), v.nonce.clone(), v.timestamp)
            .await
        {
            Ok(true) => Ok((v.peer, v.timestamp, None)),
            Ok(false) => Err(refuse(signed::SignError::Replay)),
            Err(e) => Err(ledger_error(state, e, rid)),
        };
    }
    if v.timestamp < state.started_at {
        return Err(refuse(signed::SignError::StaleTimestamp {
            timestamp: v.timestamp,
            skew: state.started_at - v.timestamp,
            max: 0,
        }));
    }
    let mut nonces = state
        .nonces
        .lock()
        .map_err(|_| ApiError::internal("nonce store poisoned"))?;
    let key = (v.peer.to_base58(), v.nonce.clone());
    if nonces.contains_key(&key) {
        drop(nonces);
        return Err(refuse(signed::SignError::Replay));
    }
    if nonces.len() >= MAX_NONCES {
        drop(nonces);
        metrics::counter!("troop_limit_hits_total", "limit" => "nonces").increment(1);
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Busy,
            "too many signed requests in the last minutes; retry later",
        )
        .with_request_id(rid);
        e.retry_after = Some(state.cfg.max_skew_secs.min(60));
        return Err(e);
    }
    nonces.insert(key, v.timestamp);
    Ok((v.peer, v.timestamp, None))
}

/// A ledger refusal as an HTTP one; failures of the store itself are
/// logged and audited as `ledger.failure`.
pub(crate) fn ledger_error(state: &AppState, e: LedgerError, rid: &str) -> ApiError {
    if matches!(e, LedgerError::Invariant(_) | LedgerError::Storage(_)) {
        tracing::error!(error = %e, request_id = rid, "ledger failure");
        state.audit.record(
            "ledger.failure",
            Some(rid),
            json!({ "error": e.to_string() }),
        );
    }
    ApiError::from(e).with_request_id(rid)
}
