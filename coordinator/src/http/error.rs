//! Every refusal is a JSON body `{"error": {"code", "message", "request_id"}}`
//! with a fitting 4xx status; never a panic, never a bare 500.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use troop_protocol::ErrorCode;
use troop_protocol::api::{ErrorBody, ErrorDetail};

/// An HTTP refusal.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    pub retry_after: Option<u64>,
    pub request_id: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            request_id: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub fn unauthorized(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn not_found(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        )
    }

    pub fn with_request_id(mut self, id: &str) -> Self {
        self.request_id = Some(id.to_string());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                request_id: self.request_id,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// Parses a JSON request body, turning every failure into a 400 that says
/// what is wrong. Every request body is a JSON object: serde would read a
/// struct from an array of its fields in order (and an empty struct from
/// `[]`), so anything but an object is refused before it is parsed.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "request body is empty; JSON expected",
        ));
    }
    // JSON's whitespace is these four; whatever follows it must open an
    // object (serde_json then checks the rest, trailing bytes included).
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid JSON body: the body must be a JSON object",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Pair {
        #[allow(dead_code)]
        a: u32,
        #[allow(dead_code)]
        b: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Empty {}

    #[test]
    fn bodies_must_be_objects() {
        assert!(parse_json::<Pair>(br#" {"a": 1, "b": 2}"#).is_ok());
        assert!(parse_json::<Empty>(b"\r\n\t {}").is_ok());
        // Today's serde reads `[1, 2]` as a Pair and `[]` as an Empty.
        for body in [
            &b"[1, 2]"[..],
            b"[]",
            b" []",
            b"null",
            b"1",
            b"\"x\"",
            b"   ",
        ] {
            for e in [
                parse_json::<Pair>(body).err(),
                parse_json::<Empty>(body).err(),
            ] {
                let e = e.expect("refused");
                assert_eq!(e.status, StatusCode::BAD_REQUEST);
                assert_eq!(e.code, ErrorCode::BadRequest);
            }
        }
    }
}
