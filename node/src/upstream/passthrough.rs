//! Pass-through: the app's own JSON body goes to the upstream's OpenAI
//! endpoint (llama.cpp, vLLM, LM Studio, or Ollama's OpenAI compatibility
//! API under the same paths), and its answer comes back as it was sent:
//! whole server-sent events for a stream, the JSON body otherwise.
//!
//! The worker reads only what the bill needs (usage, finish reason, errors)
//! from each event, without building a JSON tree, and changes the request
//! only where the ticket binds it (the model, the token limit) and where
//! receipts need usage (`stream_options.include_usage`).

use serde::Deserialize;
use serde_json::{Map, Value, json};
use troop_protocol::frames::{Endpoint, InferenceRequest, Usage};

use super::{UpstreamError, unreachable};

/// Largest whole (non-streamed) answer the worker forwards.
pub const MAX_WHOLE_BYTES: usize = 32 * 1024 * 1024;
/// Largest single server-sent event.
pub const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// A request ready for the upstream.
#[derive(Debug)]
pub struct Prepared {
    pub endpoint: Endpoint,
    pub body: Vec<u8>,
    /// The app asked for a stream.
    pub stream: bool,
    /// The app asked for the usage chunk (`stream_options.include_usage`);
    /// the worker always asks the upstream for it.
    pub forward_usage: bool,
    /// The upstream is asked for each token's logprobs, kept as evidence.
    pub evidence: bool,
    /// The app did not ask for logprobs: they are taken out of its events.
    pub strip_logprobs: bool,
}

/// Checks the app's body against the ticket and makes it ready for the
/// upstream. `cap` is the ticket's token limit. With `evidence` a chat or
/// completions answer, streamed or whole, asks the upstream for each
/// token's logprob and top alternatives (chat: `logprobs: true`,
/// `top_logprobs: 5`; completions: `logprobs: 5`) unless the app asked for
/// them itself.
pub fn prepare(
    req: &InferenceRequest,
    cap: Option<u32>,
    evidence: bool,
) -> Result<Prepared, String> {
    let endpoint = req
        .endpoint
        .ok_or("a pass-through request names no endpoint")?;
    let text = req
        .body
        .as_deref()
        .ok_or("a pass-through request has no body")?;
    let mut obj: Map<String, Value> = match serde_json::from_str(text) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err("the body must be a JSON object".into()),
        Err(e) => return Err(format!("the body is not valid JSON: {e}")),
    };
    let mut changed = false;
    match obj.get("model") {
        Some(Value::String(m)) if *m == req.model => {}
        _ => return Err(format!("the body's `model` must be `{}`", req.model)),
    }
    if let Some(cap) = cap
        && endpoint != Endpoint::Embeddings
    {
        let keys: &[&str] = match endpoint {
            Endpoint::Responses => &["max_output_tokens"],
            _ => &["max_tokens", "max_completion_tokens"],
        };
        let mut any = false;
        for k in keys {
            if let Some(v) = obj.get_mut(*k).filter(|v| !v.is_null()) {
                any = true;
                if v.as_u64().is_none_or(|n| n > u64::from(cap)) {
                    *v = json!(cap);
                    changed = true;
                }
            }
        }
        if !any {
            obj.insert(keys[0].to_string(), json!(cap));
            changed = true;
        }
    }
    let stream = endpoint != Endpoint::Embeddings && obj.get("stream") == Some(&Value::Bool(true));
    let mut forward_usage = true;
    if stream && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions) {
        let opts = obj.entry("stream_options").or_insert_with(|| json!({}));
        if !opts.is_object() {
            *opts = json!({});
        }
        forward_usage = opts.get("include_usage") == Some(&Value::Bool(true));
        if !forward_usage {
            opts["include_usage"] = json!(true);
            changed = true;
        }
    }
    let evidence =
        evidence && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions);
    let mut strip_logprobs = false;
    let top_k = json!(troop_protocol::evidence::TOP_K);
    if evidence && endpoint == Endpoint::ChatCompletions {
        if obj.get("logprobs") != Some(&Value::Bool(true)) {
            obj.insert("logprobs".into(), Value::Bool(true));
            obj.insert("top_logprobs".into(), top_k);
            strip_logprobs = true;
            changed = true;
        }
    } else if evidence && obj.get("logprobs").is_none_or(Value::is_null) {
        // The completions endpoint's `logprobs` is the number of
        // alternatives (llama.cpp answers in the chat endpoint's shape).
        obj.insert("logprobs".into(), top_k);
        strip_logprobs = true;
        changed = true;
    }
    let body = if changed {
        serde_json::to_vec(&obj).map_err(|e| e.to_string())?
    } else {
        text.as_bytes().to_vec()
    };
    Ok(Prepared {
        endpoint,
        body,
        stream,
        forward_usage,
        evidence,
        strip_logprobs,
    })
}

/// Sends the request. A 4xx answer is the app's fault and comes back as
/// [`UpstreamError::Rejected`] with the upstream's own body.
pub async fn send(
    http: &reqwest::Client,
    base: &str,
    p: &Prepared,
    request_id: Option<&str>,
) -> Result<reqwest::Response, UpstreamError> {
    let mut rb = http
        .post(format!("{base}{}", p.endpoint.path()))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(p.body.clone());
    if let Some(id) = request_id {
        rb = rb.header("x-request-id", id);
    }
    let resp = rb.send().await.map_err(unreachable)?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let text: String = text.chars().take(64 * 1024).collect();
    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
        return Err(UpstreamError::Rejected {
            status: status.as_u16(),
            body: text,
        });
    }
    Err(UpstreamError::Status {
        status: status.as_u16(),
        message: text.chars().take(300).collect(),
    })
}

#[derive(Deserialize, Default)]
struct PeekUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

impl PeekUsage {
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.or(self.input_tokens).unwrap_or(0),
            completion_tokens: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct PeekChoice {
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct PeekResponse {
    #[serde(default)]
    usage: Option<PeekUsage>,
    #[serde(default)]
    status: Option<String>,
}

/// The fields of an answer or event the worker needs; the rest is skipped
/// by the parser without being built.
#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    choices: Option<Vec<PeekChoice>>,
    #[serde(default)]
    usage: Option<PeekUsage>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    response: Option<PeekResponse>,
    #[serde(default)]
    error: Option<Value>,
}

/// What one event or answer says.
#[derive(Debug, Default, PartialEq)]
pub struct Seen {
    pub usage: Option<Usage>,
    pub finish: Option<String>,
    /// It carries generated content (counts as a chunk).
    pub content: bool,
    /// It is the usage-only chunk (`choices: []` with `usage`).
    pub usage_only: bool,
    pub error: Option<String>,
}

/// Reads what the bill needs from one JSON document (an event's data or a
/// whole answer).
pub fn peek(data: &str) -> Result<Seen, String> {
    let p: Peek = serde_json::from_str(data).map_err(|e| format!("unreadable JSON: {e}"))?;
    let mut s = Seen {
        usage: p.usage.as_ref().map(PeekUsage::usage),
        ..Seen::default()
    };
    if let Some(e) = p.error.filter(|e| !e.is_null()) {
        s.error = Some(e.to_string().chars().take(500).collect());
    }
    if let Some(choices) = &p.choices {
        s.usage_only = choices.is_empty() && s.usage.is_some();
        s.content = !choices.is_empty();
        s.finish = choices.iter().find_map(|c| c.finish_reason.clone());
    }
    match p.kind.as_deref() {
        Some(k) if k.ends_with(".delta") => s.content = true,
        Some("response.completed" | "response.incomplete" | "response.failed") => {
            if let Some(r) = &p.response {
                s.usage = r.usage.as_ref().map(PeekUsage::usage).or(s.usage);
                s.finish = Some(r.status.clone().unwrap_or_else(|| "completed".into()));
            }
        }
        Some("error") if s.error.is_none() => s.error = Some(data.chars().take(500).collect()),
        _ => {}
    }
    // A whole Responses answer: `{"object": "response", "status", "usage"}`.
    if s.finish.is_none()
        && p.choices.is_none()
        && let Some(u) = &p.usage
        && (u.input_tokens.is_some() || u.output_tokens.is_some())
    {
        s.finish = Some("completed".into());
    }
    Ok(s)
}

/// One server-sent event, as the upstream sent it.
#[derive(Debug, PartialEq)]
pub struct SseEvent {
    /// The whole block, lines joined with `\n`, without its blank line.
    pub raw: String,
    /// Its `data:` lines joined with `\n` (empty for a comment-only block).
    pub data: String,
}

/// Cuts a byte stream into server-sent events.
#[derive(Default)]
pub struct SseSplitter {
    buf: Vec<u8>,
    /// Where the next event starts (bytes before it are consumed).
    start: usize,
    /// Bytes already searched for an event's end.
    scanned: usize,
}

impl SseSplitter {
    pub fn push(&mut self, bytes: &[u8]) {
        // Drop what was consumed before growing (once per read, not per event).
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned = self.scanned.saturating_sub(self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received and not yet cut into events.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete event, if one has arrived.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, String> {
        loop {
            let from = self.scanned.saturating_sub(2).max(self.start);
            let Some((block_end, next)) =
                find_blank_line(&self.buf[from..]).map(|(a, b)| (from + a, from + b))
            else {
                self.scanned = self.buf.len();
                if self.pending() > MAX_EVENT_BYTES {
                    return Err(format!(
                        "an event of the upstream is over {MAX_EVENT_BYTES} bytes"
                    ));
                }
                return Ok(None);
            };
            let block = &self.buf[self.start..block_end];
            self.start = next;
            self.scanned = next;
            let mut raw = std::str::from_utf8(block)
                .map_err(|_| "the upstream sent an event that is not UTF-8".to_string())?
                .to_string();
            if raw.contains('\r') {
                raw = raw.replace("\r\n", "\n");
            }
            let mut data = String::new();
            let mut has_data = false;
            for line in raw.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    if has_data {
                        data.push('\n');
                    }
                    has_data = true;
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            if raw.trim().is_empty() {
                continue;
            }
            return Ok(Some(SseEvent { raw, data }));
        }
    }
}

/// Finds the first blank line: returns (end of the block, start of what
/// follows).
fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\n' {
            if b[i + 1] == b'\n' {
                return Some((i, i + 2));
            }
            if b[i + 1] == b'\r' && b.get(i + 2) == Some(&b'\n') {
                return Some((
                    i.saturating_sub(usize::from(i > 0 && b[i - 1] == b'\r')),
                    i + 3,
                ));
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(endpoint: Endpoint, body: Value) -> InferenceRequest {
        InferenceRequest::passthrough("m", endpoint, body.to_string())
    }

    #[test]
    fn prepare_binds_model_and_cap_and_asks_for_usage() {
        let r = req(
            Endpoint::ChatCompletions,
            json!({"model": "m", "messages": [], "stream": true, "tools": [{"type": "function"}], "top_p": 0.9, "max_tokens": 5000}),
        );
        let p = prepare(&r, Some(100), false).expect("prepare");
        let b: Value = serde_json::from_slice(&p.body).expect("json");
        assert_eq!(b["max_tokens"], json!(100));
        assert_eq!(b["stream_options"]["include_usage"], json!(true));
        assert_eq!(b["top_p"], json!(0.9));
        assert_eq!(b["tools"][0]["type"], json!("function"));
        assert!(p.stream && !p.forward_usage);

        let r = req(
            Endpoint::ChatCompletions,
            json!({"model": "other", "messages": []}),
        );
        assert!(prepare(&r, None, false).is_err());

        // Nothing to change: the app's bytes go as they are.
        let text = r#"{"model":"m","messages":[],"logit_bias":{"1":-100}}"#;
        let r = InferenceRequest::passthrough("m", Endpoint::ChatCompletions, text.into());
        let p = prepare(&r, None, false).expect("prepare");
        assert_eq!(p.body, text.as_bytes());
        assert!(!p.stream);
    }

    #[test]
    fn splitter_cuts_events_across_reads() {
        let mut s = SseSplitter::default();
        s.push(b"data: {\"a\":1}\n");
        assert_eq!(s.next_event().expect("ok"), None);
        s.push(b"\ndata: [DONE]\r\n\r\n: keep\n\nevent: x\ndata: 1\ndata: 2\n\n");
        let e = s.next_event().expect("ok").expect("event");
        assert_eq!(e.data, "{\"a\":1}");
        assert_eq!(e.raw, "data: {\"a\":1}");
        assert_eq!(s.next_event().expect("ok").expect("done").data, "[DONE]");
        let c = s.next_event().expect("ok").expect("comment");
        assert_eq!(c.data, "");
        let e = s.next_event().expect("ok").expect("event");
        assert_eq!(e.data, "1\n2");
        assert_eq!(e.raw, "event: x\ndata: 1\ndata: 2");
        assert_eq!(s.next_event().expect("ok"), None);
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn peek_reads_usage_finish_and_errors() {
        let s = peek(r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]},"finish_reason":null}]}"#)
            .expect("peek");
        assert!(s.content && s.finish.is_none() && !s.usage_only);
        let s = peek(r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}"#)
            .expect("peek");
        assert!(s.usage_only);
        assert_eq!(s.usage.map(|u| u.completion_tokens), Some(9));
        let s = peek(r#"{"choices":[{"finish_reason":"tool_calls"}]}"#).expect("peek");
        assert_eq!(s.finish.as_deref(), Some("tool_calls"));
        let s = peek(r#"{"type":"response.completed","response":{"status":"completed","usage":{"input_tokens":4,"output_tokens":6}}}"#)
            .expect("peek");
        assert_eq!(
            s.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((4, 6))
        );
        let s = peek(r#"{"error":{"message":"boom"}}"#).expect("peek");
        assert!(s.error.is_some());
        assert!(peek("not json").is_err());
    }
}
