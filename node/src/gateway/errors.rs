//! The gateway's refusals in OpenAI's error shape (`{"error": {message,
//! type, param, code}}`), counted by code; a leaf the HTTP handlers use.

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::DispatchError;

/// An error in OpenAI's shape.
pub fn oai_error(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response {
    metrics::counter!("troop_gateway_errors_total", "code" => code.to_string()).increment(1);
    let body =
        json!({ "error": { "message": message, "type": kind, "param": null, "code": code } });
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(s) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
    }
    resp
}

pub(super) fn bad_request(message: impl AsRef<str>) -> Response {
    oai_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_request",
        message.as_ref(),
        None,
    )
}

pub(super) fn dispatch_error(e: DispatchError) -> Response {
    match e {
        DispatchError::UnknownModel(m) => oai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            &format!("no worker on the mesh serves the model `{m}`"),
            None,
        ),
        DispatchError::PaymentRequired(msg) => oai_error(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            "insufficient_credits",
            &format!("not enough credits: {msg}"),
            None,
        ),
        DispatchError::RateLimited {
            message,
            retry_after,
        } => oai_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
            &message,
            retry_after,
        ),
        DispatchError::NoWorker(msg) => {
            // The app gets one sentence; the transport's details go to the log.
            tracing::warn!(detail = %msg, "no worker could serve the request");
            oai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_worker_available",
                &format!(
                    "no worker could serve the request: {}; try again in a few seconds",
                    msg.plain()
                ),
                None,
            )
        }
        DispatchError::Coordinator(msg) => oai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "coordinator_unreachable",
            &format!("the coordinator could not be reached: {msg}"),
            None,
        ),
        DispatchError::Rejected { status, body, .. } => rejected(status, body),
    }
}

/// The model server's own refusal, status and body as it sent them (its
/// body wrapped in OpenAI's error shape when it is not one already).
pub(super) fn rejected(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let is_oai = serde_json::from_str::<Value>(&body)
        .ok()
        .is_some_and(|v| v.get("error").is_some_and(Value::is_object));
    if is_oai {
        return (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let message = if body.trim().is_empty() {
        "the model server refused the request".to_string()
    } else {
        body
    };
    oai_error(
        status,
        "invalid_request_error",
        "upstream_rejected",
        &message,
        None,
    )
}

pub(super) fn worker_lost(e: &str) -> Response {
    oai_error(
        StatusCode::BAD_GATEWAY,
        "server_error",
        "worker_lost",
        e,
        None,
    )
}

pub(super) fn lost_event(message: &str) -> Bytes {
    let v = json!({ "error": { "message": message, "type": "server_error", "param": null, "code": "worker_lost" } });
    Bytes::from(format!("data: {v}\n\n"))
}
