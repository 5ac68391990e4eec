//! The OpenAI-compatible HTTP API: `GET /v1/models`,
//! `POST /v1/chat/completions`, `POST /v1/completions`, streaming
//! (`text/event-stream`, `data: {...}`, `data: [DONE]`) and not.

// Parsers return a ready error `Response` (the OpenAI-shaped body) as their
// error; it is built once per refused request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use troop_protocol::frames::{ChatMessage, Frame, InferenceRequest, RequestKind, Usage};

use super::{DispatchError, GatewayState, JobStream};

pub fn router(state: Arc<GatewayState>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/troop/status", get(troop_status))
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .fallback(|| async {
            oai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such endpoint",
                None,
            )
        })
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            4 * 1024 * 1024,
        ))
        .with_state(state)
}

/// `GET /troop/status`: this gateway's place on the mesh, and how it
/// reaches each worker it knows (direct, relayed through a circuit relay,
/// or not connected).
async fn troop_status(State(state): State<Arc<GatewayState>>) -> Response {
    let st = state.net.status().await;
    let workers = state.table.read().map(|t| t.workers()).unwrap_or_default();
    let workers: Vec<Value> = workers
        .into_iter()
        .map(|(peer, models, rtt)| {
            json!({
                "peer_id": peer.to_base58(),
                "models": models,
                "connection": state.net.path(&peer),
                "rtt_ms": rtt.map(|d| d.as_secs_f64() * 1000.0),
            })
        })
        .collect();
    axum::Json(json!({
        "peer_id": st.peer_id,
        "nat": st.nat,
        "relays": st.relay_reservations,
        "listen_addrs": st.listen_addrs,
        "hole_punched": st.hole_punched,
        "connected_peers": st.connected_peers.len(),
        "workers": workers,
    }))
    .into_response()
}

/// An error in OpenAI's shape.
pub fn oai_error(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: &str,
    retry_after: Option<u64>,
) -> Response {
    let body =
        json!({ "error": { "message": message, "type": kind, "param": null, "code": code } });
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(s) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
    }
    resp
}

fn bad_request(message: impl AsRef<str>) -> Response {
    oai_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_request",
        message.as_ref(),
        None,
    )
}

fn dispatch_error(e: DispatchError) -> Response {
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
        DispatchError::NoWorker(msg) => oai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_worker_available",
            &format!("no worker could serve the request: {msg}"),
            None,
        ),
        DispatchError::Coordinator(msg) => oai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "coordinator_unreachable",
            &format!("the coordinator could not be reached: {msg}"),
            None,
        ),
    }
}

async fn models(State(state): State<Arc<GatewayState>>) -> Response {
    let list = state.table.read().map(|t| t.models()).unwrap_or_default();
    let data: Vec<Value> = list
        .into_iter()
        .map(|(id, workers)| json!({ "id": id, "object": "model", "created": 0, "owned_by": "troop", "workers": workers }))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Options common to both endpoints.
fn parse_common(v: &Value, kind: RequestKind) -> Result<(InferenceRequest, bool, bool), Response> {
    let obj = v
        .as_object()
        .ok_or_else(|| bad_request("the body must be a JSON object"))?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 256 => m.clone(),
        Some(_) => return Err(bad_request("`model` must be a non-empty string")),
        None => return Err(bad_request("missing required field `model`")),
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad_request("`stream` must be a boolean")),
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = match obj
        .get("max_completion_tokens")
        .or_else(|| obj.get("max_tokens"))
    {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| bad_request("`max_tokens` must be a positive integer"))?,
        ),
    };
    let num = |name: &str, lo: f64, hi: f64| -> Result<Option<f32>, Response> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| (lo..=hi).contains(x))
                .map(|x| Some(x as f32))
                .ok_or_else(|| bad_request(format!("`{name}` must be a number from {lo} to {hi}"))),
        }
    };
    let temperature = num("temperature", 0.0, 2.0)?;
    let top_p = num("top_p", 0.0, 1.0)?;
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad_request("`stop` must be a string or up to 4 strings"))?,
        Some(_) => return Err(bad_request("`stop` must be a string or up to 4 strings")),
    };
    let seed = obj.get("seed").and_then(Value::as_i64);
    Ok((
        InferenceRequest {
            model,
            kind,
            messages: Vec::new(),
            prompt: None,
            max_tokens,
            temperature,
            top_p,
            stop,
            seed,
        },
        stream,
        include_usage,
    ))
}

fn content_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p.get("text").and_then(Value::as_str).map(String::from),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join("")),
        Value::Null => Some(String::new()),
        _ => None,
    }
}

fn parse_json(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body is not valid JSON: {e}")))
}

async fn chat(State(state): State<Arc<GatewayState>>, body: Bytes) -> Response {
    let v = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (mut req, stream, include_usage) = match parse_common(&v, RequestKind::Chat) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(msgs) = v
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
    else {
        return bad_request("`messages` must be a non-empty array");
    };
    for m in msgs {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").and_then(content_text);
        match (role, content) {
            (Some(r @ ("system" | "user" | "assistant" | "developer" | "tool")), Some(c)) => {
                req.messages.push(ChatMessage {
                    role: if r == "developer" {
                        "system".into()
                    } else {
                        r.into()
                    },
                    content: c,
                })
            }
            _ => {
                return bad_request(
                    "each message needs a `role` (system, user or assistant) and text `content`",
                );
            }
        }
    }
    run(state, req, stream, include_usage).await
}

async fn completions(State(state): State<Arc<GatewayState>>, body: Bytes) -> Response {
    let v = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (mut req, stream, include_usage) = match parse_common(&v, RequestKind::Completion) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let prompt = match v.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(_) => return bad_request("`prompt` must be a string (one prompt per request)"),
        None => return bad_request("missing required field `prompt`"),
    };
    req.prompt = Some(prompt);
    run(state, req, stream, include_usage).await
}

struct Shape {
    id: String,
    model: String,
    created: u64,
    kind: RequestKind,
}

impl Shape {
    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        match self.kind {
            RequestKind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({ "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }] })
            }
            RequestKind::Completion => {
                json!({ "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                        "choices": [{ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish }] })
            }
        }
    }

    fn usage(u: &Usage) -> Value {
        json!({ "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens })
    }

    fn usage_chunk(&self, u: &Usage) -> Value {
        let object = match self.kind {
            RequestKind::Chat => "chat.completion.chunk",
            RequestKind::Completion => "text_completion",
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": Self::usage(u) })
    }

    fn whole(&self, text: &str, finish: &str, u: &Usage) -> Value {
        match self.kind {
            RequestKind::Chat => {
                json!({ "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish }],
                "usage": Self::usage(u) })
            }
            RequestKind::Completion => {
                json!({ "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }],
                "usage": Self::usage(u) })
            }
        }
    }
}

fn lost_event(message: &str) -> Value {
    json!({ "error": { "message": message, "type": "server_error", "param": null, "code": "worker_lost" } })
}

async fn run(
    state: Arc<GatewayState>,
    req: InferenceRequest,
    stream: bool,
    include_usage: bool,
) -> Response {
    let kind = req.kind;
    let model = req.model.clone();
    let mut job = match state.dispatch(req).await {
        Ok(j) => j,
        Err(e) => return dispatch_error(e),
    };
    let idle = state.cfg.idle_timeout;
    let prefix = match kind {
        RequestKind::Chat => "chatcmpl",
        RequestKind::Completion => "cmpl",
    };
    let shape = Shape {
        id: format!("{prefix}-{}", uuid_like()),
        model,
        created: now_secs(),
        kind,
    };
    if !stream {
        return collect(job, shape, idle).await;
    }
    let events = async_stream::stream! {
        let mut first = true;
        let mut frame = Some(std::mem::replace(&mut job.first, Frame::Chunk { text: String::new() }));
        loop {
            let f = match frame.take() {
                Some(f) => f,
                None => match job.next(idle).await {
                    Ok(Some(f)) => f,
                    Ok(None) => {
                        yield Ok::<Event, Infallible>(Event::default().data(lost_event("the worker closed the stream before the answer was complete").to_string()));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(worker = %job.worker, error = %e, "worker lost mid-stream");
                        yield Ok(Event::default().data(lost_event(&e).to_string()));
                        return;
                    }
                },
            };
            match f {
                Frame::Chunk { text } => {
                    yield Ok(Event::default().data(shape.chunk(Some(&text), first, None).to_string()));
                    first = false;
                }
                Frame::Done { usage, finish_reason, .. } => {
                    yield Ok(Event::default().data(shape.chunk(None, first, Some(&finish_reason)).to_string()));
                    if include_usage {
                        yield Ok(Event::default().data(shape.usage_chunk(&usage).to_string()));
                    }
                    yield Ok(Event::default().data("[DONE]"));
                    return;
                }
                Frame::Error { message, .. } => {
                    yield Ok(Event::default().data(lost_event(&format!("the worker failed: {message}")).to_string()));
                    return;
                }
                Frame::Request { .. } | Frame::Ack { .. } => {
                    yield Ok(Event::default().data(lost_event("the worker sent a request frame").to_string()));
                    return;
                }
            }
        }
    };
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn collect(mut job: JobStream, shape: Shape, idle: std::time::Duration) -> Response {
    let mut text = String::new();
    let mut frame = Some(std::mem::replace(
        &mut job.first,
        Frame::Chunk {
            text: String::new(),
        },
    ));
    loop {
        let f = match frame.take() {
            Some(f) => f,
            None => match job.next(idle).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return oai_error(
                        StatusCode::BAD_GATEWAY,
                        "server_error",
                        "worker_lost",
                        "the worker closed the stream early",
                        None,
                    );
                }
                Err(e) => {
                    return oai_error(
                        StatusCode::BAD_GATEWAY,
                        "server_error",
                        "worker_lost",
                        &e,
                        None,
                    );
                }
            },
        };
        match f {
            Frame::Chunk { text: t } => text.push_str(&t),
            Frame::Done {
                usage,
                finish_reason,
                ..
            } => {
                return axum::Json(shape.whole(&text, &finish_reason, &usage)).into_response();
            }
            Frame::Error { message, .. } => {
                return oai_error(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "worker_failed",
                    &message,
                    None,
                );
            }
            Frame::Request { .. } | Frame::Ack { .. } => {
                return oai_error(
                    StatusCode::BAD_GATEWAY,
                    "server_error",
                    "worker_lost",
                    "unexpected frame",
                    None,
                );
            }
        }
    }
}

fn uuid_like() -> String {
    use rand::RngCore;
    let mut b = [0u8; 12];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}
