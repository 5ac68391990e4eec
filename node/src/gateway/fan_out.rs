//! `n` > 1 and lists of prompts: one request per (prompt, choice), sent at
//! once and merged by index, whole or streamed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use troop_protocol::frames::{Endpoint, Frame, InferenceRequest};

use super::errors::{dispatch_error, lost_event, worker_lost};
use super::reading::{frame_problem, read_whole, sse_response, take_first, with_worker};
use super::validate::Checked;
use super::{GatewayState, JobStream};
use crate::upstream::passthrough::SseSplitter;

/// `n` > 1 or several prompts: one request per (prompt, choice), sent at
/// once (to one or several workers), merged by index: prompt `p`'s choice
/// `j` is index `p n + j`. A `seed` becomes `seed + j` so the choices
/// differ as they do with `n` upstream.
pub(super) async fn fan_out(
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
                o.insert("model".into(), Value::String(checked.model.clone()));
                if let Some(p) = p {
                    o.insert("prompt".into(), p.clone());
                }
                if let Some(seed) = o.get("seed").and_then(Value::as_i64) {
                    o.insert("seed".into(), json!(seed.wrapping_add(j as i64)));
                }
            }
            let mut req = InferenceRequest::passthrough(&checked.model, endpoint, b.to_string());
            req.request_id = request_id.clone();
            req.digest = checked.digest.clone();
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

pub(super) fn add_usage(total: &mut Option<Value>, u: &Value, count_prompt: bool) {
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

pub(super) async fn merge_whole(jobs: Vec<JobStream>, idle: Duration) -> Response {
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

pub(super) fn merge_streams(jobs: Vec<JobStream>, idle: Duration) -> Response {
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
