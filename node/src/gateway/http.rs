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
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use troop_protocol::frames::{Endpoint, Frame, InferenceRequest};

use super::audit;
use super::errors::{bad_request, dispatch_error, lost_event, oai_error};
use super::fan_out::fan_out;
use super::reading::{frame_problem, sse_response, take_first, whole_answer, with_worker};
use super::validate::{parse_json, too_large, too_large_in_openai_shape, validate};
use super::{GatewayState, JobStream};
use crate::upstream::passthrough::SseSplitter;

pub use super::validate::{MAX_BODY_BYTES, MAX_FAN_OUT};

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
    // Each worker's weights, by model.
    let mut digests: std::collections::HashMap<&str, serde_json::Map<String, Value>> =
        std::collections::HashMap::new();
    for r in &rows {
        by_peer.entry(r.peer_id.as_str()).or_insert(r);
        if let Some(d) = &r.digest {
            digests
                .entry(r.peer_id.as_str())
                .or_default()
                .insert(r.model.clone(), Value::String(d.clone()));
        }
    }
    let workers: Vec<Value> = workers
        .into_iter()
        .map(|(peer, models, rtt)| {
            let id = peer.to_base58();
            let row = by_peer.get(id.as_str()).copied();
            json!({
                "peer_id": id,
                "models": models,
                "digests": digests.get(id.as_str()).cloned().unwrap_or_default(),
                "connection": state.net.path(&peer),
                "rtt_ms": rtt.map(|d| d.as_secs_f64() * 1000.0),
                "hardware_multiplier": row.and_then(|r| r.hardware_multiplier),
                "ttft_ms": row.and_then(|r| r.ttft_ms),
                "tokens_per_s": row.and_then(|r| r.tokens_per_s),
                "active_jobs": row.and_then(|r| r.active_jobs),
                "max_jobs": row.and_then(|r| r.max_jobs),
                "reputation": reputation.get(&peer),
                "audits": state.audit_record(&peer),
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

async fn models(State(state): State<Arc<GatewayState>>) -> Response {
    let list = state
        .table
        .reading()
        .map(|t| t.models())
        .unwrap_or_default();
    let data: Vec<Value> = list
        .into_iter()
        .map(|m| json!({ "id": m.id, "object": "model", "created": 0, "owned_by": "troop", "workers": m.workers, "digests": m.digests }))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
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
    // Valid JSON is valid UTF-8. A pinned model goes to the worker by its
    // name alone (the pin travels beside it).
    let text = if checked.digest.is_some() {
        let mut v = v;
        v["model"] = Value::String(checked.model.clone());
        v.to_string()
    } else {
        let Ok(text) = String::from_utf8(body.to_vec()) else {
            return bad_request("the body is not UTF-8");
        };
        text
    };
    let mut req = InferenceRequest::passthrough(&checked.model, endpoint, text);
    req.request_id = request_id;
    req.digest = checked.digest.clone();
    let job = match state.dispatch(req.clone()).await {
        Ok(j) => j,
        Err(e) => return dispatch_error(e),
    };
    let worker = job.worker;
    let resp = if checked.stream {
        stream_answer(state, job, req)
    } else {
        whole_answer(&state, job, &req).await
    };
    with_worker(resp, &worker)
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
                Ok(_) => {
                    // A whole answer from one worker: perhaps audited.
                    if resumed.is_none()
                        && let Some(evidence) = job.evidence_signed.take()
                    {
                        state.maybe_audit(&req, audit::Audited {
                            worker: job.worker,
                            job_id: job.job_id.clone(),
                            index: job.index,
                            evidence,
                        });
                    }
                    return;
                }
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
