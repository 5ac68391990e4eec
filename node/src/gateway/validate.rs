//! What the gateway checks of a request before passing it on: its size,
//! that it is JSON, and the fields it must read itself (model, stream, n,
//! prompts, ranges). Every refusal is a ready OpenAI-shaped 400 or 413.

// Parsers return a ready error `Response` (the OpenAI-shaped body) as their
// error; it is built once per refused request, so its size does not matter.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::Value;
use troop_protocol::frames::{Endpoint, MAX_FRAME_BYTES};

use super::errors::{bad_request, oai_error};

/// Largest request body the gateway passes on (it travels in one frame).
pub const MAX_BODY_BYTES: usize = MAX_FRAME_BYTES - 16 * 1024;

/// Most choices (`n`) times prompts one request may fan out to.
pub const MAX_FAN_OUT: usize = 16;

pub(super) fn too_large() -> Response {
    oai_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        "request_too_large",
        &format!("the request body is over {MAX_BODY_BYTES} bytes"),
        None,
    )
}

/// A body over the transport's limit (refused while it is read, before any
/// handler) gets the same OpenAI-shaped `request_too_large` as one just over
/// [`MAX_BODY_BYTES`], not the plain text of the limit layer.
pub(super) async fn too_large_in_openai_shape(resp: Response) -> Response {
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if resp.status() == StatusCode::PAYLOAD_TOO_LARGE && !json {
        return too_large();
    }
    resp
}

/// What the gateway reads of a request body before passing it on.
pub(super) struct Checked {
    /// The model's name (without a pin).
    pub model: String,
    /// The digest the request pinned (`model@sha256:<prefix>`).
    pub digest: Option<String>,
    pub stream: bool,
    pub n: usize,
    /// Completions' `prompt` when it is a list of several prompts.
    pub prompts: Option<Vec<Value>>,
}

pub(super) fn validate(v: &Value, endpoint: Endpoint) -> Result<Checked, Response> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad_request("the body must be a JSON object"))?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 256 => m.as_str(),
        Some(_) => return Err(bad_request("`model` must be a non-empty string")),
        None => return Err(bad_request("missing required field `model`")),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b && endpoint != Endpoint::Embeddings,
        Some(_) => return Err(bad_request("`stream` must be a boolean")),
    };
    for (name, lo, hi) in [
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ] {
        match obj.get(name) {
            None | Some(Value::Null) => {}
            Some(x) if x.as_f64().is_some_and(|x| (lo..=hi).contains(&x)) => {}
            Some(_) => {
                return Err(bad_request(format!(
                    "`{name}` must be a number from {lo} to {hi}"
                )));
            }
        }
    }
    for name in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
        match obj.get(name) {
            None | Some(Value::Null) => {}
            Some(x)
                if x.as_u64()
                    .is_some_and(|n| n > 0 && n <= u64::from(u32::MAX)) => {}
            Some(_) => return Err(bad_request(format!("`{name}` must be a positive integer"))),
        }
    }
    let n = match obj.get("n") {
        None | Some(Value::Null) => 1,
        Some(x) => match x.as_u64() {
            Some(n) if (1..=MAX_FAN_OUT as u64).contains(&n) => n as usize,
            _ => {
                return Err(bad_request(format!(
                    "`n` must be an integer from 1 to {MAX_FAN_OUT}"
                )));
            }
        },
    };
    let mut prompts = None;
    match endpoint {
        Endpoint::ChatCompletions => {
            let Some(msgs) = obj
                .get("messages")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
            else {
                return Err(bad_request("`messages` must be a non-empty array"));
            };
            if !msgs
                .iter()
                .all(|m| m.get("role").is_some_and(Value::is_string))
            {
                return Err(bad_request("each message needs a string `role`"));
            }
        }
        Endpoint::Completions => match obj.get("prompt") {
            Some(Value::String(_)) => {}
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(bad_request("`prompt` must not be an empty list"));
            }
            // One prompt given as token ids.
            Some(Value::Array(a)) if a.iter().all(Value::is_number) => {}
            Some(Value::Array(a)) if a.iter().all(|p| p.is_string() || p.is_array()) => {
                if a.len() > 1 {
                    prompts = Some(a.clone());
                }
            }
            Some(_) => {
                return Err(bad_request(
                    "`prompt` must be a string, a list of strings or token ids",
                ));
            }
            None => return Err(bad_request("missing required field `prompt`")),
        },
        Endpoint::Embeddings => match obj.get("input") {
            Some(Value::String(_)) => {}
            Some(Value::Array(a)) if !a.is_empty() => {}
            _ => {
                return Err(bad_request("`input` must be a string or a non-empty list"));
            }
        },
        Endpoint::Responses => {}
    }
    let n = if matches!(endpoint, Endpoint::Embeddings | Endpoint::Responses) {
        1
    } else {
        n
    };
    if n * prompts.as_ref().map_or(1, Vec::len) > MAX_FAN_OUT {
        return Err(bad_request(format!(
            "`n` times the number of prompts must be at most {MAX_FAN_OUT}"
        )));
    }
    let (model, digest) = troop_protocol::advert::split_pin(model);
    Ok(Checked {
        model: model.to_string(),
        digest: digest.map(str::to_ascii_lowercase),
        stream,
        n,
        prompts,
    })
}

pub(super) fn parse_json(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value, e: Endpoint) -> Result<Checked, u16> {
        validate(&v, e).map_err(|r| r.status().as_u16())
    }

    #[test]
    fn what_fans_out_and_what_does_not() {
        let c = check(
            json!({"model": "m", "prompt": ["a", "b"], "n": 2}),
            Endpoint::Completions,
        )
        .expect("valid");
        assert_eq!((c.n, c.prompts.map(|p| p.len())), (2, Some(2)));
        // One prompt given as token ids is one prompt, not a list.
        let c = check(
            json!({"model": "m", "prompt": [1, 2, 3]}),
            Endpoint::Completions,
        )
        .expect("valid");
        assert!(c.prompts.is_none());
        // Embeddings never fan out nor stream.
        let c = check(
            json!({"model": "m", "input": "x", "n": 3, "stream": true}),
            Endpoint::Embeddings,
        )
        .expect("valid");
        assert_eq!((c.n, c.stream), (1, false));
        let c = check(
            json!({"model": "m@sha256:ABCDEF0123", "messages": [{"role": "user"}]}),
            Endpoint::ChatCompletions,
        )
        .expect("valid");
        assert_eq!(
            (c.model.as_str(), c.digest.as_deref()),
            ("m", Some("sha256:abcdef0123"))
        );
        let many: Vec<Value> = (0..9).map(|i| json!(format!("p{i}"))).collect();
        assert_eq!(
            check(
                json!({"model": "m", "prompt": many, "n": 2}),
                Endpoint::Completions
            )
            .err(),
            Some(400)
        );
    }

    #[test]
    fn fields_out_of_range_are_refused_with_400() {
        for body in [
            json!([1]),
            json!({"messages": [{"role": "user"}]}),
            json!({"model": "", "messages": [{"role": "user"}]}),
            json!({"model": "m", "messages": []}),
            json!({"model": "m", "messages": [{"content": "x"}]}),
            json!({"model": "m", "messages": [{"role": "user"}], "temperature": 3}),
            json!({"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}),
            json!({"model": "m", "messages": [{"role": "user"}], "n": 17}),
            json!({"model": "m", "messages": [{"role": "user"}], "stream": "yes"}),
        ] {
            assert_eq!(
                check(body.clone(), Endpoint::ChatCompletions).err(),
                Some(400),
                "{body}"
            );
        }
        assert!(
            check(
                json!({"model": "m", "messages": [{"role": "user"}], "temperature": 2}),
                Endpoint::ChatCompletions
            )
            .is_ok()
        );
    }
}
