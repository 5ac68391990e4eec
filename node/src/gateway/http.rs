//! The OpenAI-compatible HTTP API: `GET /v1/models`,
//! `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and
//! `/v1/responses`, streamed (`text/event-stream`) or not.
//!
//! Requests pass through: the gateway checks the body's shape and the
//! fields it must read (model, stream, n, ranges), then sends the app's own
//! bytes to a worker, and writes the worker's `raw` frames back as they
//! come. Only `n` > 1 and lists of prompts (served by several requests
//! merged by index) and resumed answers are rewritten. CORS preflights are
//! answered; every answer carries `x-request-id`.

// Parsers return a ready error `Response` (the OpenAI-shaped body) as their
// error; it is built once per refused request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use troop_protocol::frames::{Endpoint, Frame, InferenceRequest, MAX_FRAME_BYTES};

use super::{DispatchError, GatewayState, JobStream};
use crate::upstream::passthrough::{MAX_WHOLE_BYTES, SseSplitter};

/// Largest request body the gateway passes on (it travels in one frame).
pub const MAX_BODY_BYTES: usize = MAX_FRAME_BYTES - 16 * 1024;
/// Most choices (`n`) times prompts one request may fan out to.
pub const MAX_FAN_OUT: usize = 16;

pub fn router(state: Arc<GatewayState>) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { crate::web::page(crate::web::CONSOLE_HTML) }),
        )
        .route("/troop/account", get(account))
        .merge(crate::web::common_routes())
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
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
        .layer(axum::middleware::map_response(too_large_in_openai_shape))
        .layer(axum::middleware::from_fn(troop_protocol::telemetry::track))
        .layer(axum::middleware::from_fn_with_state(
            crate::web::Access::new(
                state.cfg.http.ip(),
                &state.cfg.allowed_hosts,
                &state.cfg.cors_origins,
            ),
            crate::web::guard,
        ))
        .layer(cors(&state.cfg.cors_origins))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

pub use crate::web::origin_allowed;

fn cors(allowed: &[String]) -> CorsLayer {
    let allowed = allowed.to_vec();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            origin.to_str().is_ok_and(|o| origin_allowed(o, &allowed))
        }))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            header::HeaderName::from_static("x-request-id"),
            header::HeaderName::from_static("x-troop-worker"),
        ])
        .max_age(Duration::from_secs(600))
}

/// `GET /troop/status`: this gateway's place on the mesh, how it reaches
/// each worker it knows (direct, relayed through a circuit relay, or not
/// connected) with what the worker advertises, and the latest answers.
async fn troop_status(State(state): State<Arc<GatewayState>>) -> Response {
    let st = state.net.status().await;
    let (workers, rows) = state
        .table
        .reading()
        .map(|t| (t.workers(), t.rows()))
        .unwrap_or_default();
    metrics::gauge!("troop_workers_known").set(workers.len() as f64);
    let reputation = state
        .reputation
        .reading()
        .map(|r| r.clone())
        .unwrap_or_default();
    // One row per worker, looked up once each (not a scan per worker).
    let mut by_peer: std::collections::HashMap<&str, &super::table::WorkerRow> =
        std::collections::HashMap::with_capacity(rows.len());
    for r in &rows {
        by_peer.entry(r.peer_id.as_str()).or_insert(r);
    }
    let workers: Vec<Value> = workers
        .into_iter()
        .map(|(peer, models, rtt)| {
            let id = peer.to_base58();
            let row = by_peer.get(id.as_str()).copied();
            json!({
                "peer_id": id,
                "models": models,
                "connection": state.net.path(&peer),
                "rtt_ms": rtt.map(|d| d.as_secs_f64() * 1000.0),
                "hardware_multiplier": row.and_then(|r| r.hardware_multiplier),
                "ttft_ms": row.and_then(|r| r.ttft_ms),
                "tokens_per_s": row.and_then(|r| r.tokens_per_s),
                "active_jobs": row.and_then(|r| r.active_jobs),
                "max_jobs": row.and_then(|r| r.max_jobs),
                "reputation": reputation.get(&peer),
            })
        })
        .collect();
    let answers: Vec<super::AnswerRecord> = state
        .answers
        .locked()
        .map(|a| a.iter().rev().cloned().collect())
        .unwrap_or_default();
    axum::Json(json!({
        "role": "gateway",
        "version": env!("CARGO_PKG_VERSION"),
        "peer_id": st.peer_id,
        "account": state.client.account_id(),
        "coordinator": state.client.base(),
        "nat": st.nat,
        "relays": st.relay_reservations,
        "listen_addrs": st.listen_addrs,
        "hole_punched": st.hole_punched,
        "connected_peers": st.connected_peers.len(),
        "workers": workers,
        "answers": answers,
    }))
    .into_response()
}

/// `GET /troop/account`: this gateway's credits and latest transactions.
async fn account(State(state): State<Arc<GatewayState>>) -> Response {
    state.account.respond().await
}

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

fn too_large() -> Response {
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
async fn too_large_in_openai_shape(resp: Response) -> Response {
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
        DispatchError::Rejected { status, body } => rejected(status, body),
    }
}

/// The model server's own refusal, status and body as it sent them (its
/// body wrapped in OpenAI's error shape when it is not one already).
fn rejected(status: u16, body: String) -> Response {
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

async fn models(State(state): State<Arc<GatewayState>>) -> Response {
    let list = state
        .table
        .reading()
        .map(|t| t.models())
        .unwrap_or_default();
    let data: Vec<Value> = list
        .into_iter()
        .map(|(id, workers)| json!({ "id": id, "object": "model", "created": 0, "owned_by": "troop", "workers": workers }))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

/// What the gateway reads of a request body before passing it on.
struct Checked {
    model: String,
    stream: bool,
    n: usize,
    /// Completions' `prompt` when it is a list of several prompts.
    prompts: Option<Vec<Value>>,
}

fn validate(v: &Value, endpoint: Endpoint) -> Result<Checked, Response> {
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
    Ok(Checked {
        model,
        stream,
        n,
        prompts,
    })
}

fn parse_json(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body is not valid JSON: {e}")))
}

async fn chat(State(state): State<Arc<GatewayState>>, headers: HeaderMap, body: Bytes) -> Response {
    serve(state, Endpoint::ChatCompletions, &headers, body).await
}

async fn completions(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve(state, Endpoint::Completions, &headers, body).await
}

async fn embeddings(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve(state, Endpoint::Embeddings, &headers, body).await
}

async fn responses(
    State(state): State<Arc<GatewayState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    serve(state, Endpoint::Responses, &headers, body).await
}

async fn serve(
    state: Arc<GatewayState>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    if body.len() > MAX_BODY_BYTES {
        return too_large();
    }
    let v = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let checked = match validate(&v, endpoint) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let request_id = headers
        .get("x-request-id")
        .and_then(|h| h.to_str().ok())
        .map(|s| s.chars().take(128).collect::<String>());
    if checked.n > 1 || checked.prompts.is_some() {
        return fan_out(state, endpoint, v, checked, request_id).await;
    }
    // Valid JSON is valid UTF-8.
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return bad_request("the body is not UTF-8");
    };
    let mut req = InferenceRequest::passthrough(&checked.model, endpoint, text);
    req.request_id = request_id;
    let job = match state.dispatch(req.clone()).await {
        Ok(j) => j,
        Err(e) => return dispatch_error(e),
    };
    let worker = job.worker;
    let resp = if checked.stream {
        stream_answer(state, job, req)
    } else {
        whole_answer(job, state.cfg.idle_timeout).await
    };
    with_worker(resp, &worker)
}

/// Names the worker that served (first) in `x-troop-worker`.
fn with_worker(mut resp: Response, worker: &libp2p::PeerId) -> Response {
    if let Ok(v) = HeaderValue::from_str(&worker.to_base58()) {
        resp.headers_mut().insert("x-troop-worker", v);
    }
    resp
}

fn lost_event(message: &str) -> Bytes {
    let v = json!({ "error": { "message": message, "type": "server_error", "param": null, "code": "worker_lost" } });
    Bytes::from(format!("data: {v}\n\n"))
}

fn sse_response(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn take_first(job: &mut JobStream) -> Frame {
    std::mem::replace(
        &mut job.first,
        Frame::Raw {
            data: String::new(),
            events: 0,
        },
    )
}

/// What went wrong with a worker mid-answer.
fn frame_problem(f: &Frame) -> Option<String> {
    match f {
        Frame::Raw { .. } | Frame::Done { .. } => None,
        Frame::Error { message, .. } => Some(format!("the worker failed: {message}")),
        Frame::Chunk { .. } => {
            Some("the worker speaks an older protocol (text chunks); upgrade it".into())
        }
        Frame::Request { .. } | Frame::Ack { .. } => {
            Some("the worker sent a frame that has no place in an answer".into())
        }
    }
}

fn stream_answer(state: Arc<GatewayState>, job: JobStream, req: InferenceRequest) -> Response {
    let idle = state.cfg.idle_timeout;
    let keep_limit = state.cfg.resume_keep_bytes;
    let mut resumable = state.cfg.resume
        && matches!(
            req.endpoint,
            Some(Endpoint::ChatCompletions | Endpoint::Completions)
        );
    let events = async_stream::stream! {
        let mut job = job;
        let mut next = Some(take_first(&mut job));
        let mut kept = String::new();
        let mut resumed: Option<Resumed> = None;
        loop {
            let problem = match next.take() {
                Some(f) => frame_problem(&f).map_or(Ok(f), Err),
                None => match job.next(idle).await {
                    Ok(Some(f)) => frame_problem(&f).map_or(Ok(f), Err),
                    Ok(None) => Err("the worker closed the stream before the answer was complete".to_string()),
                    Err(e) => Err(e),
                },
            };
            match problem {
                Ok(Frame::Raw { data, .. }) => {
                    match &mut resumed {
                        Some(r) => yield Ok::<Bytes, Infallible>(r.rewrite(&data)),
                        None => {
                            if resumable && kept.len() + data.len() <= keep_limit {
                                kept.push_str(&data);
                            } else if resumable {
                                // Too long to keep whole: never resumed
                                // (a continuation from a tail would drop
                                // the text before it).
                                resumable = false;
                                kept = String::new();
                            }
                            yield Ok(Bytes::from(data));
                        }
                    }
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(worker = %job.worker, error = %e, "worker lost mid-stream");
                    if resumable && resumed.is_none() && !kept.is_empty()
                        && let Some((j, r)) = resume(&state, &req, &kept, job.worker).await
                    {
                        tracing::info!(lost = %job.worker, worker = %j.worker, "answer continued on another worker");
                        metrics::counter!("troop_answers_resumed_total").increment(1);
                        job = j;
                        next = Some(take_first(&mut job));
                        resumed = Some(r);
                        continue;
                    }
                    yield Ok(lost_event(&e));
                    return;
                }
            }
        }
    };
    sse_response(Body::from_stream(events))
}

/// The continuation of a resumed answer: its events take the first
/// answer's `id` and `created`, the first one loses its `role`, and the
/// chunks that finish it say `"troop": {"resumed": true}`.
struct Resumed {
    id: Value,
    created: Value,
    split: SseSplitter,
    first: bool,
}

impl Resumed {
    fn rewrite(&mut self, data: &str) -> Bytes {
        self.split.push(data.as_bytes());
        let mut out = String::new();
        while let Ok(Some(ev)) = self.split.next_event() {
            let Ok(mut v) = serde_json::from_str::<Value>(&ev.data) else {
                out.push_str(&ev.raw);
                out.push_str("\n\n");
                continue;
            };
            v["id"] = self.id.clone();
            v["created"] = self.created.clone();
            if let Some(c) = v.pointer_mut("/choices/0") {
                if self.first
                    && let Some(d) = c.get_mut("delta").and_then(Value::as_object_mut)
                {
                    d.remove("role");
                }
                self.first = false;
                if c.get("finish_reason").is_some_and(|f| !f.is_null()) {
                    v["troop"] = json!({ "resumed": true });
                }
            } else if v.get("usage").is_some() {
                v["troop"] = json!({ "resumed": true });
            }
            out.push_str(&format!("data: {v}\n\n"));
        }
        Bytes::from(out)
    }
}

/// Continues an answer whose worker was lost: the prompt plus the text so
/// far (as the assistant's message to continue, or appended to a
/// completion prompt) goes to another worker serving the model, with the
/// token limit lowered by what arrived. `None` when it cannot be resumed
/// (tool calls, a prompt list, no other worker).
async fn resume(
    state: &Arc<GatewayState>,
    req: &InferenceRequest,
    kept: &str,
    lost: libp2p::PeerId,
) -> Option<(JobStream, Resumed)> {
    let endpoint = req.endpoint?;
    let mut split = SseSplitter::default();
    split.push(kept.as_bytes());
    let mut text = String::new();
    let (mut id, mut created) = (Value::Null, Value::Null);
    let mut pieces = 0u64;
    while let Ok(Some(ev)) = split.next_event() {
        let v: Value = serde_json::from_str(&ev.data).ok()?;
        if id.is_null() {
            id = v.get("id").cloned().unwrap_or(Value::Null);
            created = v.get("created").cloned().unwrap_or(Value::Null);
        }
        let Some(c) = v.pointer("/choices/0") else {
            continue;
        };
        if c.pointer("/delta/tool_calls").is_some_and(|t| !t.is_null())
            || c.get("finish_reason").is_some_and(|f| !f.is_null())
        {
            return None;
        }
        let piece = c
            .pointer("/delta/content")
            .or_else(|| c.get("text"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        text.push_str(piece);
        pieces += 1;
    }
    let mut body: Value = serde_json::from_str(req.body.as_deref()?).ok()?;
    match endpoint {
        Endpoint::ChatCompletions => body
            .get_mut("messages")?
            .as_array_mut()?
            .push(json!({ "role": "assistant", "content": text })),
        Endpoint::Completions => {
            let prompt = body.get("prompt")?.as_str()?.to_string();
            body["prompt"] = json!(prompt + &text);
        }
        _ => return None,
    }
    for k in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = body.get(k).and_then(Value::as_u64) {
            body[k] = json!(n.saturating_sub(pieces).max(1));
        }
    }
    let mut again = InferenceRequest::passthrough(&req.model, endpoint, body.to_string());
    again.request_id = req.request_id.clone();
    let job = state.dispatch_avoiding(again, &[lost]).await.ok()?;
    Some((
        job,
        Resumed {
            id,
            created,
            split: SseSplitter::default(),
            first: true,
        },
    ))
}

/// Reads a whole answer (`raw` frames up to `done`).
async fn read_whole(job: &mut JobStream, idle: Duration) -> Result<String, String> {
    let mut out = String::new();
    let mut next = Some(take_first(job));
    loop {
        let f = match next.take() {
            Some(f) => f,
            None => match job.next(idle).await {
                Ok(Some(f)) => f,
                Ok(None) => return Err("the worker closed the stream early".into()),
                Err(e) => return Err(e),
            },
        };
        if let Some(p) = frame_problem(&f) {
            return Err(p);
        }
        match f {
            Frame::Raw { data, .. } => {
                if out.len() + data.len() > MAX_WHOLE_BYTES {
                    return Err("the answer is too large".into());
                }
                out.push_str(&data);
            }
            _ => return Ok(out),
        }
    }
}

fn worker_lost(e: &str) -> Response {
    oai_error(
        StatusCode::BAD_GATEWAY,
        "server_error",
        "worker_lost",
        e,
        None,
    )
}

async fn whole_answer(mut job: JobStream, idle: Duration) -> Response {
    match read_whole(&mut job, idle).await {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => worker_lost(&e),
    }
}

/// `n` > 1 or several prompts: one request per (prompt, choice), sent at
/// once (to one or several workers), merged by index: prompt `p`'s choice
/// `j` is index `p n + j`. A `seed` becomes `seed + j` so the choices
/// differ as they do with `n` upstream.
async fn fan_out(
    state: Arc<GatewayState>,
    endpoint: Endpoint,
    v: Value,
    checked: Checked,
    request_id: Option<String>,
) -> Response {
    let prompts: Vec<Option<Value>> = match &checked.prompts {
        Some(p) => p.iter().cloned().map(Some).collect(),
        None => vec![None],
    };
    let mut subs = Vec::new();
    for p in &prompts {
        for j in 0..checked.n {
            let mut b = v.clone();
            if let Some(o) = b.as_object_mut() {
                o.remove("n");
                if let Some(p) = p {
                    o.insert("prompt".into(), p.clone());
                }
                if let Some(seed) = o.get("seed").and_then(Value::as_i64) {
                    o.insert("seed".into(), json!(seed.wrapping_add(j as i64)));
                }
            }
            let mut req = InferenceRequest::passthrough(&checked.model, endpoint, b.to_string());
            req.request_id = request_id.clone();
            subs.push(req);
        }
    }
    let jobs = futures::future::join_all(subs.into_iter().map(|r| {
        let state = state.clone();
        async move { state.dispatch(r).await }
    }))
    .await;
    let mut ok = Vec::new();
    for j in jobs {
        match j {
            Ok(j) => ok.push(j),
            Err(e) => return dispatch_error(e),
        }
    }
    let idle = state.cfg.idle_timeout;
    let Some(first) = ok.first().map(|j| j.worker) else {
        return worker_lost("no request was sent");
    };
    let resp = if checked.stream {
        merge_streams(ok, idle)
    } else {
        merge_whole(ok, idle).await
    };
    with_worker(resp, &first)
}

fn add_usage(total: &mut Option<Value>, u: &Value, count_prompt: bool) {
    let t = total.get_or_insert_with(
        || json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}),
    );
    for k in ["prompt_tokens", "completion_tokens"] {
        if k == "prompt_tokens" && !count_prompt {
            continue;
        }
        let add = u.get(k).and_then(Value::as_u64).unwrap_or(0);
        let now = t.get(k).and_then(Value::as_u64).unwrap_or(0);
        t[k] = json!(now.saturating_add(add));
    }
    let sum = t["prompt_tokens"]
        .as_u64()
        .unwrap_or(0)
        .saturating_add(t["completion_tokens"].as_u64().unwrap_or(0));
    t["total_tokens"] = json!(sum);
}

async fn merge_whole(jobs: Vec<JobStream>, idle: Duration) -> Response {
    let bodies = futures::future::join_all(
        jobs.into_iter()
            .map(|mut j| async move { read_whole(&mut j, idle).await }),
    )
    .await;
    let mut merged: Option<Value> = None;
    let mut choices = Vec::new();
    let mut usage = None;
    for (i, b) in bodies.into_iter().enumerate() {
        let body = match b {
            Ok(b) => b,
            Err(e) => return worker_lost(&e),
        };
        let Ok(mut v) = serde_json::from_str::<Value>(&body) else {
            return worker_lost("a worker's answer is not JSON");
        };
        if let Some(cs) = v.get_mut("choices").and_then(Value::as_array_mut) {
            for c in cs.iter_mut() {
                c["index"] = json!(i);
                choices.push(c.take());
            }
        }
        if let Some(u) = v.get("usage") {
            add_usage(&mut usage, u, true);
        }
        merged.get_or_insert(v);
    }
    let Some(mut merged) = merged else {
        return worker_lost("no answer");
    };
    merged["choices"] = Value::Array(choices);
    if let Some(u) = usage {
        merged["usage"] = u;
    }
    axum::Json(merged).into_response()
}

fn merge_streams(jobs: Vec<JobStream>, idle: Duration) -> Response {
    let streams = jobs.into_iter().enumerate().map(|(i, job)| {
        Box::pin(async_stream::stream! {
            let mut job = job;
            let mut split = SseSplitter::default();
            let mut next = Some(take_first(&mut job));
            loop {
                let f = match next.take() {
                    Some(f) => f,
                    None => match job.next(idle).await {
                        Ok(Some(f)) => f,
                        Ok(None) => { yield (i, Err("the worker closed the stream early".to_string())); return; }
                        Err(e) => { yield (i, Err(e)); return; }
                    },
                };
                if let Some(p) = frame_problem(&f) {
                    yield (i, Err(p));
                    return;
                }
                match f {
                    Frame::Raw { data, .. } => {
                        split.push(data.as_bytes());
                        while let Ok(Some(ev)) = split.next_event() {
                            yield (i, Ok(ev.data));
                        }
                    }
                    _ => return,
                }
            }
        })
    });
    let mut all = futures::stream::select_all(streams);
    let events = async_stream::stream! {
        use futures::StreamExt;
        let mut id: Option<Value> = None;
        let mut object = json!("chat.completion.chunk");
        let mut usage: Option<Value> = None;
        while let Some((i, ev)) = all.next().await {
            let data = match ev {
                Ok(d) => d,
                Err(e) => { yield Ok::<Bytes, Infallible>(lost_event(&e)); return; }
            };
            if data.trim() == "[DONE]" {
                continue;
            }
            let Ok(mut v) = serde_json::from_str::<Value>(&data) else { continue };
            let is_usage = v.get("choices").and_then(Value::as_array).is_some_and(|c| c.is_empty());
            if is_usage {
                if let Some(u) = v.get("usage") {
                    add_usage(&mut usage, u, true);
                }
                continue;
            }
            match &id {
                None => {
                    id = v.get("id").cloned();
                    object = v.get("object").cloned().unwrap_or(object);
                }
                Some(first) => v["id"] = first.clone(),
            }
            if let Some(cs) = v.get_mut("choices").and_then(Value::as_array_mut) {
                for c in cs.iter_mut() {
                    c["index"] = json!(i);
                }
            }
            yield Ok(Bytes::from(format!("data: {v}\n\n")));
        }
        if let Some(u) = usage {
            let chunk = json!({"id": id, "object": object, "choices": [], "usage": u});
            yield Ok(Bytes::from(format!("data: {chunk}\n\n")));
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    sse_response(Body::from_stream(events))
}
