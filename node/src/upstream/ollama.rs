//! Ollama's native dialect: `/api/tags`, `/api/chat` and `/api/generate`,
//! streaming NDJSON (one JSON object a line).

use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::io::StreamReader;
use troop_protocol::advert::ModelAdvert;
use troop_protocol::frames::{InferenceRequest, RequestKind, Usage};

use super::{Delta, DeltaStream, UpstreamError, check_status, unreachable};

pub async fn models(http: &reqwest::Client, base: &str) -> Result<Vec<ModelAdvert>, UpstreamError> {
    let v: Value = super::get_json(http, &format!("{base}/api/tags")).await?;
    let list = v
        .get("models")
        .and_then(Value::as_array)
        .ok_or_else(|| UpstreamError::Protocol("no `models` list in /api/tags".into()))?;
    Ok(list
        .iter()
        .filter_map(|m| {
            let name = m
                .get("name")
                .or_else(|| m.get("model"))?
                .as_str()?
                .to_string();
            Some(ModelAdvert {
                name,
                digest: m.get("digest").and_then(Value::as_str).map(String::from),
                runtime: None,
                context_length: None,
                embeds: false,
            })
        })
        .collect())
}

fn body(req: &InferenceRequest) -> (&'static str, Value) {
    let mut options = json!({});
    if let Some(n) = req.max_tokens {
        options["num_predict"] = json!(n);
    }
    if let Some(t) = req.temperature {
        options["temperature"] = json!(t);
    }
    if let Some(p) = req.top_p {
        options["top_p"] = json!(p);
    }
    if !req.stop.is_empty() {
        options["stop"] = json!(req.stop);
    }
    if let Some(s) = req.seed {
        options["seed"] = json!(s);
    }
    match req.kind {
        RequestKind::Chat => (
            "/api/chat",
            json!({
                "model": req.model,
                "messages": req.messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
                "stream": true,
                "options": options,
            }),
        ),
        RequestKind::Completion => (
            "/api/generate",
            json!({
                "model": req.model,
                "prompt": req.prompt.clone().unwrap_or_default(),
                "stream": true,
                "options": options,
            }),
        ),
    }
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
    let reader = StreamReader::new(resp.bytes_stream().map_err(std::io::Error::other));
    let mut lines = FramedRead::new(reader, LinesCodec::new_with_max_length(1024 * 1024));
    let stream = async_stream::stream! {
        while let Some(line) = lines.next().await {
            let line = match line {
                Ok(l) => l,
                Err(e) => { yield Err(UpstreamError::Protocol(e.to_string())); return; }
            };
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => { yield Err(UpstreamError::Protocol(format!("bad NDJSON line: {e}"))); return; }
            };
            if let Some(err) = v.get("error").and_then(Value::as_str) {
                yield Err(UpstreamError::Status { status: 500, message: err.to_string() });
                return;
            }
            let text = match kind {
                RequestKind::Chat => v.pointer("/message/content").and_then(Value::as_str),
                RequestKind::Completion => v.get("response").and_then(Value::as_str),
            };
            if let Some(t) = text.filter(|t| !t.is_empty()) {
                yield Ok(Delta::Text(t.to_string()));
            }
            if v.get("done").and_then(Value::as_bool) == Some(true) {
                let usage = Usage {
                    prompt_tokens: v.get("prompt_eval_count").and_then(Value::as_u64).unwrap_or(0),
                    completion_tokens: v.get("eval_count").and_then(Value::as_u64).unwrap_or(0),
                };
                let finish_reason = v.get("done_reason").and_then(Value::as_str).unwrap_or("stop").to_string();
                yield Ok(Delta::Done { usage, finish_reason });
                return;
            }
        }
        yield Err(UpstreamError::Protocol("stream ended before `done`".into()));
    };
    Ok(Box::pin(stream))
}
