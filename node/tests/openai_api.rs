//! The whole OpenAI API through the mesh: requests and answers pass through
//! with every field (tools, response formats, logprobs, usage), upstream
//! refusals reach the app as they are, CORS and request ids, `n` and
//! prompt lists, embeddings, the Responses API, and answers continued on
//! another worker when theirs is lost.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Dialect, FakeUpstream, MODEL, TestNet, chat_text, sse_data, tokens};
use futures::StreamExt;
use serde_json::{Value, json};

async fn mesh_with(fakes: &[&FakeUpstream]) -> TestNet {
    mesh_resuming(fakes, true).await
}

async fn mesh_resuming(fakes: &[&FakeUpstream], resume: bool) -> TestNet {
    mesh_keeping(fakes, resume, None).await
}

async fn mesh_keeping(fakes: &[&FakeUpstream], resume: bool, keep: Option<usize>) -> TestNet {
    let mut net = TestNet::start(|_| {}).await;
    for f in fakes {
        net.add_worker(&f.url, |_| {}).await;
    }
    net.add_gateway_with(|c| {
        c.resume = resume;
        if let Some(k) = keep {
            c.resume_keep_bytes = k;
        }
    })
    .await;
    net.wait_for_workers(fakes.len()).await;
    net
}

async fn post(net: &TestNet, path: &str, body: &Value) -> reqwest::Response {
    net.http
        .post(format!("{}{path}", net.gateway_url()))
        .json(body)
        .send()
        .await
        .expect("POST")
}

fn tool_request(stream: bool) -> Value {
    json!({
        "model": MODEL,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You call tools."},
            {"role": "user", "content": "Weather in Paris?", "name": "ann"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "auto",
        "parallel_tool_calls": false,
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}},
        "logprobs": true,
        "top_logprobs": 2,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {"42": -100},
        "user": "ann",
        "top_p": 0.9,
        "seed": 7,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_answers_pass_through_with_every_field() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    let net = mesh_with(&[&fake]).await;

    // Streamed: the upstream got the app's fields exactly; tool-call deltas
    // come back as the upstream sent them, and no usage chunk unless asked.
    let sent = tool_request(true);
    let resp = post(&net, "/v1/chat/completions", &sent).await;
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("body");
    let got = fake.last_body();
    for k in [
        "messages",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "top_p",
        "seed",
    ] {
        assert_eq!(got[k], sent[k], "`{k}` reached the upstream unchanged");
    }
    assert_eq!(got["top_p"].to_string(), "0.9");
    assert_eq!(
        got["stream_options"]["include_usage"], true,
        "the worker always asks for usage"
    );
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let parsed: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    let args: String = parsed
        .iter()
        .filter_map(|v| v.pointer("/choices/0/delta/tool_calls/0/function/arguments"))
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, "{\"city\":\"Paris\"}");
    assert!(parsed.iter().all(|v| v["system_fingerprint"] == "fp_fake"));
    assert!(
        parsed
            .iter()
            .any(|v| v["choices"][0]["finish_reason"] == "tool_calls")
    );
    assert!(
        parsed.iter().all(|v| v.get("usage").is_none()),
        "no usage chunk when the app did not ask: {body}"
    );

    // Asked for: the usage chunk arrives, and logprobs ride on each chunk.
    let resp = post(
        &net,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": true,
                "stream_options": {"include_usage": true}, "logprobs": true}),
    )
    .await;
    let events = sse_data(&resp.text().await.expect("body"));
    let parsed: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    let usage = parsed
        .iter()
        .find(|v| v["choices"] == json!([]))
        .expect("a usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert!(
        parsed
            .iter()
            .filter(|v| v["choices"][0]["delta"]["content"].is_string())
            .all(|v| v["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.5)
    );
    assert_eq!(chat_text(&events), tokens(3).concat());

    // Whole: the upstream's answer as it is, usage included.
    let resp = post(&net, "/v1/chat/completions", &tool_request(false)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "weather"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["system_fingerprint"], "fp_fake");
    assert_eq!(v["usage"]["prompt_tokens"], 7);
    assert_eq!(fake.last_body().get("stream_options"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusal_reaches_the_app_at_once_and_blames_no_worker() {
    let a = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let b = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let net = mesh_with(&[&a, &b]).await;
    let overflow = json!({"model": MODEL, "messages": [{"role": "user", "content": "[overflow] a very long prompt"}]});
    // More refusals than a breaker tolerates (5): none counts as a fault.
    for _ in 0..8 {
        let resp = post(&net, "/v1/chat/completions", &overflow).await;
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["error"]["type"], "exceed_context_size_error", "{v}");
        assert_eq!(v["error"]["n_ctx"], 4096);
    }
    let tried = a.state.requests.load(Ordering::SeqCst) + b.state.requests.load(Ordering::SeqCst);
    assert_eq!(tried, 8, "each refusal came from one worker, never retried");
    let resp = net.chat(false).await;
    assert_eq!(resp.status(), 200, "valid requests are served at once");
    let resp = net.chat(false).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_get_cors_and_every_answer_has_a_request_id() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(2), Duration::ZERO).await;
    let net = mesh_with(&[&fake]).await;
    let url = format!("{}/v1/chat/completions", net.gateway_url());
    let preflight = |origin: &'static str| {
        net.http
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let ok = preflight("http://localhost:5173").await.expect("preflight");
    assert!(ok.status().is_success(), "{}", ok.status());
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "http://localhost:5173"
    );
    let methods = ok.headers()["access-control-allow-methods"]
        .to_str()
        .expect("ascii");
    assert!(methods.contains("POST"), "{methods}");
    let other = preflight("https://elsewhere.example")
        .await
        .expect("preflight");
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let resp = net
        .http
        .post(&url)
        .header("x-request-id", "req-abc-123")
        .header("origin", "http://127.0.0.1:3000")
        .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.headers()["x-request-id"], "req-abc-123");
    assert_eq!(
        resp.headers()["x-troop-worker"],
        net.workers[0].peer_id.to_base58().as_str(),
        "the answer names the worker that served it"
    );
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "http://127.0.0.1:3000"
    );
    let resp = net.chat(true).await;
    let id = resp.headers()["x-request-id"].to_str().expect("ascii");
    assert!(id.len() >= 16, "a generated id: {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_and_prompt_lists_are_merged_by_index() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    let net = mesh_with(&[&fake]).await;
    let v: Value = post(
        &net,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 5}),
    )
    .await
    .json()
    .await
    .expect("json");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "{v}");
    let mut idx: Vec<u64> = choices.iter().filter_map(|c| c["index"].as_u64()).collect();
    idx.sort();
    assert_eq!(idx, vec![0, 1]);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert!(fake.last_body().get("n").is_none());

    let resp = post(
        &net,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": true}),
    )
    .await;
    let events = sse_data(&resp.text().await.expect("body"));
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    for i in 0..2 {
        let text: String = events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter(|v| v["choices"][0]["index"] == i)
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(text, tokens(3).concat(), "choice {i}");
    }

    let v: Value = post(
        &net,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": ["one", "two", "three"], "max_tokens": 2}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6);

    let bad = post(
        &net,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 0}),
    )
    .await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_the_responses_api_pass_through() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    // This one's model does not embed (its upstream has no embeddings
    // endpoint): its advert says so and embeddings never go there.
    let chat_only = FakeUpstream::start(Dialect::Ollama, tokens(3), Duration::ZERO).await;
    let mut net = mesh_with(&[&chat_only]).await;
    let resp = post(
        &net,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.expect("json");
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    net.add_worker(&fake.url, |_| {}).await;
    net.wait_for_workers(2).await;
    for _ in 0..4 {
        let resp = post(
            &net,
            "/v1/embeddings",
            &json!({"model": MODEL, "input": "x"}),
        )
        .await;
        assert_eq!(resp.status(), 200);
    }
    let v: Value = post(
        &net,
        "/v1/embeddings",
        &json!({"model": MODEL, "input": ["a", "b"]}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["data"][1]["embedding"], json!([0.25, -0.5, 1.0]));
    assert_eq!(v["usage"]["prompt_tokens"], 6);

    let v: Value = post(
        &net,
        "/v1/responses",
        &json!({"model": MODEL, "input": "hello"}),
    )
    .await
    .json()
    .await
    .expect("json");
    assert_eq!(v["object"], "response");
    assert_eq!(v["usage"]["output_tokens"], 3);
    let resp = post(
        &net,
        "/v1/responses",
        &json!({"model": MODEL, "input": "hello", "stream": true}),
    )
    .await;
    let body = resp.text().await.expect("body");
    assert!(body.contains("event: response.output_text.delta"), "{body}");
    let last = sse_data(&body).last().cloned().expect("events");
    let last: Value = serde_json::from_str(&last).expect("json");
    assert_eq!(last["type"], "response.completed");
}

/// Starts a slow 40-token answer on a two-worker mesh, kills the worker
/// serving it after a few chunks, and returns the whole SSE body, the two
/// upstreams and which one was serving.
async fn lose_a_worker_mid_answer(
    resume: bool,
) -> (String, FakeUpstream, FakeUpstream, usize, TestNet) {
    lose_a_worker_keeping(resume, None).await
}

async fn lose_a_worker_keeping(
    resume: bool,
    keep: Option<usize>,
) -> (String, FakeUpstream, FakeUpstream, usize, TestNet) {
    let a = FakeUpstream::start(Dialect::OpenAi, tokens(40), Duration::ZERO).await;
    let b = FakeUpstream::start(Dialect::OpenAi, tokens(40), Duration::ZERO).await;
    let mut net = mesh_keeping(&[&a, &b], resume, keep).await;
    let resp = post(
        &net,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "[slow] tell me"}],
                "stream": true, "max_tokens": 40}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while sse_data(&text).len() < 5 {
        let chunk = body.next().await.expect("chunks arrive").expect("bytes");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    // Lose whichever worker is serving.
    let serving = if a.state.requests.load(Ordering::SeqCst) > 0 {
        0
    } else {
        1
    };
    net.workers[serving].kill();
    let rest = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(chunk)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    })
    .await
    .expect("the stream ends");
    (rest, a, b, serving, net)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_resume_a_lost_worker_ends_the_stream_with_an_error() {
    let (rest, ..) = lose_a_worker_mid_answer(false).await;
    let events = sse_data(&rest);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{rest}");
    let last: Value = serde_json::from_str(events.last().expect("an event")).expect("json");
    assert_eq!(last["error"]["code"], "worker_lost", "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_worker_is_lost_continues_on_another() {
    let (rest, a, b, serving, net) = lose_a_worker_mid_answer(true).await;
    let events = sse_data(&rest);
    assert_eq!(
        events.iter().filter(|e| *e == "[DONE]").count(),
        1,
        "{rest}"
    );
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let parsed: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    assert!(parsed.iter().all(|v| v.get("error").is_none()), "{rest}");
    let ids: std::collections::HashSet<String> = parsed
        .iter()
        .filter_map(|v| v["id"].as_str().map(String::from))
        .collect();
    assert_eq!(ids.len(), 1, "one answer id throughout: {ids:?}");
    let finish = parsed
        .iter()
        .find(|v| v["choices"][0]["finish_reason"].is_string())
        .expect("a finish");
    assert_eq!(finish["troop"]["resumed"], true);

    // The second worker got the prompt plus the text so far, to continue,
    // and only the tokens left: together no more than one answer.
    let other = if serving == 0 { &b } else { &a };
    let got = other.last_body();
    let msgs = got["messages"].as_array().expect("messages");
    let prefix = msgs.last().expect("a last message");
    assert_eq!(prefix["role"], "assistant");
    let before = prefix["content"].as_str().expect("text so far");
    let pieces = before.split_whitespace().count() as u64;
    assert!(pieces >= 4, "{before}");
    assert_eq!(
        got["max_tokens"].as_u64().expect("a limit") + pieces,
        40,
        "{got}"
    );
    let all = chat_text(&events);
    assert!(all.starts_with(before));
    let served_after = other.state.completed.load(Ordering::SeqCst);
    assert_eq!(served_after, 1);

    // The survivor goes on serving.
    let resp = net.chat(false).await;
    assert_eq!(resp.status(), 200);
}

/// An answer that outgrew what the gateway keeps for resuming is not
/// resumed (the spec's rule): the app gets `worker_lost`, not a
/// continuation from only the tail kept after the buffer overflowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_longer_than_the_resume_buffer_is_not_resumed() {
    // Two events fit; the kill comes after five.
    let (rest, a, b, serving, _net) = lose_a_worker_keeping(true, Some(400)).await;
    let events = sse_data(&rest);
    assert!(!events.iter().any(|e| e == "[DONE]"), "{rest}");
    let last: Value = serde_json::from_str(events.last().expect("an event")).expect("json");
    assert_eq!(last["error"]["code"], "worker_lost", "{last}");
    let other = if serving == 0 { &b } else { &a };
    assert_eq!(
        other.state.requests.load(Ordering::SeqCst),
        0,
        "nothing was sent to another worker"
    );
}

/// Requests naming another host (DNS rebinding) or sent by a page of
/// another site are refused with 403 before anything is served or read;
/// apps on this machine (no `Origin`, or a localhost one) are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_and_origins_are_refused() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let net = mesh_with(&[&fake]).await;
    let url = format!("{}/v1/chat/completions", net.gateway_url());
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let send = |host: Option<&'static str>, origin: Option<&'static str>| {
        let mut r = net.http.post(&url).body(body.to_string());
        if let Some(h) = host {
            r = r.header("host", h);
        }
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    for (host, origin, code) in [
        (Some("evil.test:8080"), None, "forbidden_host"),
        (None, Some("http://evil.example"), "forbidden_origin"),
        (None, Some("null"), "forbidden_origin"),
    ] {
        let r = send(host, origin).await.expect("POST");
        assert_eq!(r.status(), 403, "{host:?} {origin:?}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], code, "{v}");
    }
    let r = net
        .http
        .get(format!("{}/troop/account", net.gateway_url()))
        .header("host", "evil.test:8080")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 403);
    assert_eq!(fake.state.requests.load(Ordering::SeqCst), 0);
    // Liveness answers any name (probes behind a DNS name).
    let r = net
        .http
        .get(format!("{}/health", net.gateway_url()))
        .header("host", "probe.internal:8080")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
    for (host, origin) in [
        (None, None),
        (Some("localhost:8080"), Some("http://localhost:3000")),
    ] {
        let r = send(host, origin).await.expect("POST");
        assert_eq!(r.status(), 200, "{host:?} {origin:?}");
    }
    assert_eq!(fake.state.requests.load(Ordering::SeqCst), 2);
}

/// A body far over the limit gets the same OpenAI-shaped 413 as one just
/// over it, not the plain text of the transport's limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_an_openai_shaped_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(4), Duration::ZERO).await;
    let net = mesh_with(&[&fake]).await;
    let r = net
        .http
        .post(format!("{}/v1/chat/completions", net.gateway_url()))
        .header("content-type", "application/json")
        .body(vec![b' '; 1024 * 1024 + 10])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.expect("an OpenAI-shaped body");
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    // 5 MB announced: the answer comes before the body is sent (a client
    // that writes it all first sees the connection close under it).
    let addr = net.gateway_url().trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        5 * 1024 * 1024
    );
    conn.write_all(head.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: Value = serde_json::from_str(body).expect("an OpenAI-shaped body");
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
}

/// A worker given the "OpenAI base URL" of its model server
/// (`http://127.0.0.1:8081/v1`, what guides ask for) finds its models and
/// serves (was: "answers neither /api/tags nor /v1/models", having asked
/// for `/v1/v1/models`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_the_openai_base_url_serves() {
    let fake = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    let mut net = TestNet::start(|_| {}).await;
    net.add_worker(&format!("{}/v1/", fake.url), |_| {}).await;
    net.add_gateway().await;
    net.wait_for_workers(1).await;
    let r = net.chat(false).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], tokens(3).concat());
}

/// `sha256:<hex>` of `bytes`, computed here (not by the worker's code).
fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serving_other_weights_under_one_name_are_told_apart_and_a_pin_picks_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (fa, fb) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    std::fs::write(&fa, b"GGUF weights of model A").expect("write a");
    std::fs::write(&fb, b"GGUF weights of model B").expect("write b");
    let (da, db) = (
        sha256(b"GGUF weights of model A"),
        sha256(b"GGUF weights of model B"),
    );
    // Two workers with A's weights (one names its file in /props, one is
    // given it with --model-file), one with B's.
    let a1 = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    a1.set_model_path(&fa);
    let a2 = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    let b = FakeUpstream::start(Dialect::OpenAi, tokens(3), Duration::ZERO).await;
    b.set_model_path(&fb);
    let mut net = TestNet::start(|_| {}).await;
    net.add_worker(&a1.url, |_| {}).await;
    let model_file = fa.clone();
    net.add_worker(&a2.url, move |c| c.model_file = Some(model_file))
        .await;
    net.add_worker(&b.url, |_| {}).await;
    let b_peer = net.workers[2].net.peer_id.to_base58();
    net.add_gateway().await;
    net.wait_for_workers(3).await;
    let url = format!("{}/v1/models", net.gateway_url());
    let http = net.http.clone();
    let want = json!([{"digest": da, "workers": 2}, {"digest": db, "workers": 1}]);
    common::eventually("both digests in /v1/models", 30, || {
        let (http, url, want) = (http.clone(), url.clone(), want.clone());
        async move {
            let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            let m = v["data"].as_array()?.iter().find(|m| m["id"] == MODEL)?;
            (m["digests"] == want).then_some(())
        }
    })
    .await;
    // Unpinned requests stay on the weights most workers serve.
    for _ in 0..6 {
        let r = post(
            &net,
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(r.status(), 200);
        let worker = r.headers()["x-troop-worker"]
            .to_str()
            .expect("header")
            .to_string();
        assert_ne!(
            worker, b_peer,
            "an unpinned request went to the other weights"
        );
    }
    assert_eq!(b.state.requests.load(Ordering::SeqCst), 0);
    // A pin (a prefix, any case) picks B's weights; the model server gets
    // the plain name.
    let pinned = format!(
        "{MODEL}@{}",
        db[..20].to_ascii_uppercase().replace("SHA256", "sha256")
    );
    let r = post(
        &net,
        "/v1/chat/completions",
        &json!({"model": pinned, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-troop-worker"].to_str().expect("header"),
        b_peer
    );
    let body = b
        .state
        .last_body
        .lock()
        .expect("lock")
        .clone()
        .expect("a body");
    assert_eq!(body["model"], MODEL);
    // Weights nobody serves: 404 naming the pin.
    let r = post(
        &net,
        "/v1/chat/completions",
        &json!({"model": format!("{MODEL}@sha256:00000000"), "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "model_not_found");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("@sha256:00000000")),
        "{v}"
    );
}
