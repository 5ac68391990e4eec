//! The OpenAI dialect (llama.cpp's `llama-server`, vLLM, LM Studio, ...).

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{Value, json};
use troop_protocol::advert::ModelAdvert;
use troop_protocol::frames::{InferenceRequest, RequestKind, Usage};

use super::{Delta, DeltaStream, UpstreamError, check_status, unreachable};

pub async fn models(http: &reqwest::Client, base: &str) -> Result<Vec<ModelAdvert>, UpstreamError> {
    let v: Value = super::get_json(http, &format!("{base}/v1/models")).await?;
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| UpstreamError::Protocol("no `data` list in /v1/models".into()))?;
    Ok(data
        .iter()
        .filter_map(|m| {
            let name = m.get("id")?.as_str()?.to_string();
            let context_length = m
                .pointer("/meta/n_ctx_train")
                .or_else(|| m.get("max_model_len"))
                .or_else(|| m.get("context_length"))
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok());
            Some(ModelAdvert {
                name,
                digest: None,
                runtime: None,
                context_length,
                embeds: false,
            })
        })
        .collect())
}

fn body(req: &InferenceRequest) -> (String, Value) {
    let mut b = match req.kind {
        RequestKind::Chat => json!({
            "model": req.model,
            "messages": req.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
        }),
        RequestKind::Completion => json!({
            "model": req.model,
            "prompt": req.prompt.clone().unwrap_or_default(),
        }),
    };
    b["stream"] = json!(true);
    b["stream_options"] = json!({ "include_usage": true });
    if let Some(n) = req.max_tokens {
        b["max_tokens"] = json!(n);
    }
    if let Some(t) = req.temperature {
        b["temperature"] = json!(t);
    }
    if let Some(p) = req.top_p {
        b["top_p"] = json!(p);
    }
    if !req.stop.is_empty() {
        b["stop"] = json!(req.stop);
    }
    if let Some(s) = req.seed {
        b["seed"] = json!(s);
    }
    let path = match req.kind {
        RequestKind::Chat => "/v1/chat/completions",
        RequestKind::Completion => "/v1/completions",
    };
    (path.to_string(), b)
}

pub async fn generate(
    http: &reqwest::Client,
    base: &str,
    req: &InferenceRequest,
) -> Result<DeltaStream, UpstreamError> {
    let (path, b) = body(req);
    let resp = http
        .post(format!("{base}{path}"))
        .json(&b)
        .send()
        .await
        .map_err(unreachable)?;
    let resp = check_status(resp).await?;
    let kind = req.kind;
    let mut events = resp.bytes_stream().eventsource();
    let stream = async_stream::stream! {
        let mut usage = Usage::default();
        let mut finish: Option<String> = None;
        while let Some(ev) = events.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => { yield Err(UpstreamError::Protocol(e.to_string())); return; }
            };
            if ev.data.trim() == "[DONE]" {
                break;
            }
            let v: Value = match serde_json::from_str(&ev.data) {
                Ok(v) => v,
                Err(e) => { yield Err(UpstreamError::Protocol(format!("bad SSE chunk: {e}"))); return; }
            };
            if let Some(err) = v.get("error") {
                yield Err(UpstreamError::Status { status: 500, message: err.to_string() });
                return;
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                usage.prompt_tokens = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
                usage.completion_tokens = u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
            }
            let choice = v.pointer("/choices/0");
            let text = match kind {
                RequestKind::Chat => choice.and_then(|c| c.pointer("/delta/content")).and_then(Value::as_str),
                RequestKind::Completion => choice.and_then(|c| c.get("text")).and_then(Value::as_str),
            };
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                yield Ok(Delta::Text(t.to_string()));
            }
            if let Some(f) = choice.and_then(|c| c.get("finish_reason")).and_then(Value::as_str) {
                finish = Some(f.to_string());
            }
        }
        match finish {
            Some(finish_reason) => yield Ok(Delta::Done { usage, finish_reason }),
            None => yield Err(UpstreamError::Protocol("stream ended without a finish reason".into())),
        }
    };
    Ok(Box::pin(stream))
}
