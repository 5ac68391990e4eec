//! Test harness: a fake model server in both dialects, and `TestNet`, which
//! starts a real coordinator (SQLite in a temp dir), real workers and a
//! gateway on loopback, with capped waits.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use libp2p::Multiaddr;
use serde_json::{Value, json};
use troop_coordinator::{Config, RunningCoordinator};
use troop_node::gateway::{self, GatewayConfig, RunningGateway};
use troop_node::worker::{self, RunningWorker, WorkerConfig};

pub const MODEL: &str = "fake-model";

/// A child process (a model server, chromedriver) killed when dropped, so a
/// failed assertion does not leave it running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on now, on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dialect {
    OpenAi,
    Ollama,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Streams every token, then finishes.
    Normal,
    /// Answers 500 before any token.
    FailBeforeFirst,
    /// Streams answers' headers, then nothing (a stalled model).
    StallBeforeFirst,
    /// Streams one token, then nothing.
    StallAfterFirst,
}

/// The blob (its SHA-256) the fake Ollama says its model is built on.
pub const OLLAMA_BLOB: &str = "5a2f0e4fcb2b6b8f3a8e0c9d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f";

pub struct FakeState {
    pub dialect: Dialect,
    pub model: String,
    pub mode: std::sync::Mutex<Mode>,
    pub tokens: Vec<String>,
    pub delay: Duration,
    pub requests: AtomicUsize,
    pub completed: AtomicUsize,
    /// Generations whose HTTP response was dropped before the end.
    pub dropped: AtomicUsize,
    /// The body of the last generation request, as the upstream got it.
    pub last_body: std::sync::Mutex<Option<Value>>,
    /// The file llama.cpp's `/props` names (`model_path`); no `/props`
    /// (404, as vLLM) while None.
    pub model_path: std::sync::Mutex<Option<String>>,
    /// Streamed logprobs name token ids (1000 + the token's place) with
    /// made-up numbers, as a worker faking llama.cpp's evidence would.
    pub token_ids: std::sync::atomic::AtomicBool,
}

pub struct FakeUpstream {
    pub url: String,
    pub state: Arc<FakeState>,
}

/// Counts a generation as dropped unless it reached its end.
struct DropGuard {
    state: Arc<FakeState>,
    done: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.done {
            self.state.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

pub fn tokens(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tok{i} ")).collect()
}

impl FakeUpstream {
    pub async fn start(dialect: Dialect, tokens: Vec<String>, delay: Duration) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake upstream");
        Self::start_on(listener, MODEL, dialect, tokens, delay)
    }

    /// Serves `model` on a listener bound elsewhere (in a network
    /// namespace, say).
    pub fn start_on(
        listener: std::net::TcpListener,
        model: &str,
        dialect: Dialect,
        tokens: Vec<String>,
        delay: Duration,
    ) -> Self {
        let state = Arc::new(FakeState {
            dialect,
            model: model.to_string(),
            mode: std::sync::Mutex::new(Mode::Normal),
            tokens,
            delay,
            requests: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            last_body: std::sync::Mutex::new(None),
            model_path: std::sync::Mutex::new(None),
            token_ids: std::sync::atomic::AtomicBool::new(false),
        });
        let app = match dialect {
            Dialect::OpenAi => axum::Router::new()
                .route(
                    "/v1/models",
                    get(|State(s): State<Arc<FakeState>>| async move {
                        axum::Json(
                            json!({"object": "list", "data": [{"id": s.model, "object": "model"}]}),
                        )
                    }),
                )
                .route("/v1/chat/completions", post(openai_generate))
                .route("/v1/completions", post(openai_generate))
                .route("/v1/embeddings", post(openai_embed))
                .route("/v1/responses", post(openai_responses))
                .route(
                    "/props",
                    get(|State(s): State<Arc<FakeState>>| async move {
                        let path = s.model_path.lock().ok().and_then(|p| p.clone());
                        match path {
                            Some(p) => {
                                axum::Json(json!({"model_path": p, "build_info": "b1-fake"}))
                                    .into_response()
                            }
                            None => StatusCode::NOT_FOUND.into_response(),
                        }
                    }),
                ),
            // Ollama serves its OpenAI compatibility API beside its own.
            Dialect::Ollama => axum::Router::new()
                .route("/v1/chat/completions", post(openai_generate))
                .route("/v1/completions", post(openai_generate))
                .route("/v1/responses", post(openai_responses))
                .route(
                    "/api/tags",
                    get(|State(s): State<Arc<FakeState>>| async move {
                        axum::Json(json!({"models": [{"name": s.model, "digest": "sha256:0123"}]}))
                    }),
                )
                // The model is built on the blob OLLAMA_BLOB names.
                .route(
                    "/api/show",
                    post(|| async {
                        axum::Json(json!({
                            "modelfile": format!("# Modelfile\nFROM /root/.ollama/models/blobs/sha256-{OLLAMA_BLOB}\nPARAMETER stop <end>\n"),
                            "capabilities": ["completion"],
                        }))
                    }),
                )
                .route(
                    "/api/version",
                    get(|| async { axum::Json(json!({"version": "0.12.3"})) }),
                )
                .route("/api/chat", post(ollama_generate))
                .route("/api/generate", post(ollama_generate)),
        }
        .with_state(state.clone());
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let listener = tokio::net::TcpListener::from_std(listener).expect("fake upstream listener");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            state,
        }
    }

    /// Serves `/props` naming `path` as the loaded model file.
    pub fn set_model_path(&self, path: &std::path::Path) {
        if let Ok(mut p) = self.state.model_path.lock() {
            *p = Some(path.display().to_string());
        }
    }

    pub fn set_mode(&self, m: Mode) {
        if let Ok(mut mode) = self.state.mode.lock() {
            *mode = m;
        }
    }
}

/// A prompt that says `[slow]` gets 20 ms between tokens (a long answer to
/// break in the middle); others get the upstream's own pace.
fn paced(req: &Value, delay: Duration) -> Duration {
    if req.to_string().contains("[slow]") {
        Duration::from_millis(20)
    } else {
        delay
    }
}

fn failing(state: &FakeState) -> Option<Response> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let mode = state.mode.lock().map(|m| *m).unwrap_or(Mode::Normal);
    (mode == Mode::FailBeforeFirst).then(|| {
        (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "model crashed",
        )
            .into_response()
    })
}

/// The last generation request's body.
impl FakeUpstream {
    pub fn last_body(&self) -> Value {
        self.state
            .last_body
            .lock()
            .ok()
            .and_then(|b| b.clone())
            .unwrap_or_default()
    }
}

async fn openai_embed(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let inputs = match req.get("input") {
        Some(Value::Array(a)) => a.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.25, -0.5, i as f64]}))
        .collect();
    axum::Json(json!({"object": "list", "model": state.model, "data": data,
        "usage": {"prompt_tokens": 3 * inputs, "total_tokens": 3 * inputs}}))
    .into_response()
}

/// OpenAI's Responses API, as far as a test needs: the tokens as
/// `response.output_text.delta` events, then `response.completed` with
/// usage (or the whole response object).
async fn openai_responses(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Ok(mut b) = state.last_body.lock() {
        *b = Some(req.clone());
    }
    let text: String = state.tokens.concat();
    let usage = json!({"input_tokens": 5, "output_tokens": state.tokens.len(), "total_tokens": 5 + state.tokens.len()});
    let whole = json!({"id": "resp_fake", "object": "response", "status": "completed", "model": state.model,
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}],
        "usage": usage});
    if req.get("stream") != Some(&Value::Bool(true)) {
        return axum::Json(whole).into_response();
    }
    let mut out = String::new();
    out.push_str(&format!("event: response.created\ndata: {}\n\n", json!({"type": "response.created", "response": {"id": "resp_fake", "status": "in_progress"}})));
    for t in &state.tokens {
        out.push_str(&format!(
            "event: response.output_text.delta\ndata: {}\n\n",
            json!({"type": "response.output_text.delta", "delta": t})
        ));
    }
    out.push_str(&format!(
        "event: response.completed\ndata: {}\n\n",
        json!({"type": "response.completed", "response": whole})
    ));
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from(out))
        .unwrap_or_default()
}

/// A stand-in for llama.cpp's OpenAI API: streams (or returns whole) its
/// tokens, at most `max_tokens` of them; with `tools` it calls the first
/// tool instead (in tool_call deltas); `logprobs` adds log-probabilities;
/// a prompt that says `[overflow]` is refused as llama.cpp refuses one over
/// its context (400); the usage chunk comes when asked for.
async fn openai_generate(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    if let Some(r) = failing(&state) {
        return r;
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Ok(mut b) = state.last_body.lock() {
        *b = Some(req.clone());
    }
    if req.to_string().contains("[overflow]") {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 9000, "n_ctx": 4096}})),
        )
            .into_response();
    }
    let chat = req.get("messages").is_some();
    let stream = req.get("stream") == Some(&Value::Bool(true));
    let include_usage = req.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
    let logprobs = req
        .get("logprobs")
        .is_some_and(|l| l == &json!(true) || l.is_u64());
    let tool = req
        .pointer("/tools/0/function/name")
        .and_then(Value::as_str)
        .map(String::from);
    let limit = req
        .get("max_tokens")
        .and_then(Value::as_u64)
        .map_or(usize::MAX, |n| n as usize);
    let tokens: Vec<String> = state.tokens.iter().take(limit).cloned().collect();
    let finish = if tool.is_some() {
        "tool_calls"
    } else if tokens.len() < state.tokens.len() {
        "length"
    } else {
        "stop"
    };
    let id = format!("chatcmpl-fake{}", state.requests.load(Ordering::SeqCst));
    let (object, chunk_object) = if chat {
        ("chat.completion", "chat.completion.chunk")
    } else {
        ("text_completion", "text_completion")
    };
    let model = state.model.clone();
    let usage = json!({"prompt_tokens": 7, "completion_tokens": tokens.len(), "total_tokens": 7 + tokens.len()});
    let lp = |t: &str| json!({"content": [{"token": t, "logprob": -0.5, "bytes": null, "top_logprobs": []}]});
    if !stream {
        let text: String = tokens.concat();
        let choice = if chat {
            let message = match &tool {
                Some(name) => {
                    json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": "{\"city\":\"Paris\"}"}}]})
                }
                None => json!({"role": "assistant", "content": text}),
            };
            json!({"index": 0, "message": message, "finish_reason": finish, "logprobs": if logprobs { lp(&text) } else { Value::Null }})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
        };
        state.completed.fetch_add(1, Ordering::SeqCst);
        return axum::Json(
            json!({"id": id, "object": object, "created": 1, "model": model,
            "system_fingerprint": "fp_fake", "choices": [choice], "usage": usage}),
        )
        .into_response();
    }
    let delay = paced(&req, state.delay);
    let mode = state.mode.lock().map(|m| *m).unwrap_or(Mode::Normal);
    let stream = async_stream::stream! {
        let mut guard = DropGuard { state: state.clone(), done: false };
        let head = |choice: Value| json!({"id": id, "object": chunk_object, "created": 1, "model": model, "system_fingerprint": "fp_fake", "choices": [choice]});
        if let Some(name) = &tool {
            let parts = [
                json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": name, "arguments": ""}}]}),
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
            ];
            for d in parts {
                let c = head(json!({"index": 0, "delta": d, "finish_reason": null}));
                yield Ok::<Bytes, Infallible>(Bytes::from(format!("data: {c}\n\n")));
            }
        } else {
            for (i, t) in tokens.iter().enumerate() {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if (mode == Mode::StallBeforeFirst && i == 0) || (mode == Mode::StallAfterFirst && i == 1) {
                    futures::future::pending::<()>().await;
                }
                let mut choice = if chat && i == 0 {
                    json!({"index": 0, "delta": {"role": "assistant", "content": t}, "finish_reason": null})
                } else if chat {
                    json!({"index": 0, "delta": {"content": t}, "finish_reason": null})
                } else {
                    json!({"index": 0, "text": t, "finish_reason": null})
                };
                if logprobs && state.token_ids.load(Ordering::SeqCst) {
                    let e = json!({"id": 1000 + i, "token": t, "logprob": -0.05, "bytes": null});
                    let mut top = e.clone();
                    top["top_logprobs"] = json!([e]);
                    choice["logprobs"] = json!({"content": [top]});
                } else if logprobs {
                    choice["logprobs"] = lp(t);
                }
                yield Ok::<Bytes, Infallible>(Bytes::from(format!("data: {}\n\n", head(choice))));
            }
        }
        let last = head(json!({"index": 0, "delta": {}, "text": "", "finish_reason": finish}));
        yield Ok(Bytes::from(format!("data: {last}\n\n")));
        if include_usage {
            let u = json!({"id": id, "object": chunk_object, "created": 1, "model": model, "choices": [], "usage": usage});
            yield Ok(Bytes::from(format!("data: {u}\n\n")));
        }
        yield Ok(Bytes::from("data: [DONE]\n\n"));
        guard.done = true;
        state.completed.fetch_add(1, Ordering::SeqCst);
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

async fn ollama_generate(State(state): State<Arc<FakeState>>, body: Bytes) -> Response {
    if let Some(r) = failing(&state) {
        return r;
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let chat = req.get("messages").is_some();
    let stream = async_stream::stream! {
        let mut guard = DropGuard { state: state.clone(), done: false };
        for t in state.tokens.clone() {
            if !state.delay.is_zero() {
                tokio::time::sleep(state.delay).await;
            }
            let line = if chat {
                json!({"model": MODEL, "message": {"role": "assistant", "content": t}, "done": false})
            } else {
                json!({"model": MODEL, "response": t, "done": false})
            };
            yield Ok::<Bytes, Infallible>(Bytes::from(format!("{line}\n")));
        }
        let last = json!({"model": MODEL, "done": true, "done_reason": "stop", "prompt_eval_count": 7, "eval_count": state.tokens.len()});
        yield Ok(Bytes::from(format!("{last}\n")));
        guard.done = true;
        state.completed.fetch_add(1, Ordering::SeqCst);
    };
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

/// Polls `f` until it returns `Some`, failing the test after `secs`.
pub async fn eventually<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct TestNet {
    pub dir: tempfile::TempDir,
    pub coordinator: Option<RunningCoordinator>,
    pub coord_addr: SocketAddr,
    coord_tweak: Arc<dyn Fn(&mut Config) + Send + Sync>,
    pub workers: Vec<RunningWorker>,
    pub hub: Option<troop_node::network::NetworkHandle>,
    pub gateway: Option<RunningGateway>,
    pub http: reqwest::Client,
    pub dht: bool,
    pub gossip: bool,
}

fn loopback() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")
}

impl TestNet {
    pub async fn start(tweak: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        // `RUST_LOG=...` shows the mesh's logs in a failing test's output.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let tweak: Arc<dyn Fn(&mut Config) + Send + Sync> = Arc::new(tweak);
        let cfg = Self::coord_config(dir.path(), &tweak);
        let c = troop_coordinator::spawn(cfg, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("coordinator starts");
        Self {
            coord_addr: c.addr,
            coordinator: Some(c),
            coord_tweak: tweak,
            dir,
            workers: Vec::new(),
            hub: None,
            gateway: None,
            http: reqwest::Client::new(),
            dht: true,
            gossip: true,
        }
    }

    fn coord_config(
        dir: &std::path::Path,
        tweak: &Arc<dyn Fn(&mut Config) + Send + Sync>,
    ) -> Config {
        let mut cfg = Config::new(dir.join("coordinator"));
        cfg.sweep_interval = Duration::from_millis(100);
        cfg.discovery_per_hour = 100_000;
        cfg.authorize_per_hour = 100_000;
        cfg.authorize_per_ip_per_hour = 100_000;
        // Every test user comes from 127.0.0.1.
        cfg.starter_grants_per_ip_per_day = 0;
        cfg.starter_milli_per_hour = 0;
        tweak(&mut cfg);
        cfg
    }

    pub fn coordinator_url(&self) -> String {
        format!("http://{}", self.coord_addr)
    }

    pub async fn stop_coordinator(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.stop().await.expect("coordinator stops cleanly");
        }
    }

    /// Starts the coordinator again on the same address and data folder.
    pub async fn restart_coordinator(&mut self) {
        self.stop_coordinator().await;
        let cfg = Self::coord_config(self.dir.path(), &self.coord_tweak);
        let c = troop_coordinator::spawn(cfg, self.coord_addr)
            .await
            .expect("coordinator restarts");
        self.coordinator = Some(c);
    }

    /// A bare mesh node (no role) that later nodes join through.
    pub async fn add_hub(&mut self) {
        let mut cfg = troop_node::network::NetConfig::new(troop_protocol::identity::generate());
        cfg.listen = vec![loopback()];
        cfg.dht = self.dht;
        cfg.gossip = self.gossip;
        let (h, _events) = troop_node::network::spawn(cfg).await.expect("hub starts");
        self.hub = Some(h);
    }

    fn bootstrap(&self) -> Vec<Multiaddr> {
        if let Some(h) = &self.hub {
            return h.listen_addrs();
        }
        self.workers
            .first()
            .map(|w| w.net.listen_addrs())
            .unwrap_or_default()
    }

    pub async fn add_worker(
        &mut self,
        upstream: &str,
        tweak: impl FnOnce(&mut WorkerConfig),
    ) -> usize {
        let cfg = self.worker_config(upstream, tweak);
        let w = worker::start(cfg).await.expect("worker starts");
        self.workers.push(w);
        self.workers.len() - 1
    }

    /// The configuration `add_worker` starts a worker with.
    pub fn worker_config(
        &self,
        upstream: &str,
        tweak: impl FnOnce(&mut WorkerConfig),
    ) -> WorkerConfig {
        let key = troop_protocol::identity::generate();
        let state = self
            .dir
            .path()
            .join(format!("worker-{}", self.workers.len()));
        let mut cfg = WorkerConfig::new(key.clone(), &self.coordinator_url(), upstream, state);
        cfg.net.listen = vec![loopback()];
        cfg.net.bootstrap = self.bootstrap();
        cfg.net.dht = self.dht;
        cfg.net.gossip = self.gossip;
        cfg.advert_interval = Duration::from_millis(300);
        cfg.heartbeat_interval = Duration::from_millis(200);
        cfg.model_refresh_interval = Duration::from_secs(1);
        cfg.breaker_cooldown = Duration::from_secs(1);
        cfg.session_idle = Duration::from_millis(500);
        tweak(&mut cfg);
        cfg
    }

    pub async fn add_gateway(&mut self) {
        self.add_gateway_with(|_| {}).await;
    }

    pub async fn add_gateway_with(&mut self, tweak: impl FnOnce(&mut GatewayConfig)) {
        let key = troop_protocol::identity::generate();
        let mut cfg = GatewayConfig::new(
            key,
            &self.coordinator_url(),
            "127.0.0.1:0".parse().expect("addr"),
        );
        cfg.net.listen = vec![loopback()];
        cfg.net.bootstrap = self.bootstrap();
        cfg.net.dht = self.dht;
        cfg.net.gossip = self.gossip;
        cfg.first_token_timeout = Duration::from_secs(10);
        cfg.idle_timeout = Duration::from_secs(10);
        tweak(&mut cfg);
        self.gateway = Some(gateway::start(cfg).await.expect("gateway starts"));
    }

    pub fn gateway_url(&self) -> String {
        self.gateway.as_ref().map(|g| g.url()).expect("a gateway")
    }

    pub fn gateway_peer(&self) -> String {
        self.gateway
            .as_ref()
            .map(|g| g.state.net.peer_id.to_base58())
            .expect("a gateway")
    }

    /// Waits until the gateway's table lists `n` workers for the model.
    pub async fn wait_for_workers(&self, n: usize) {
        let url = format!("{}/v1/models", self.gateway_url());
        let http = self.http.clone();
        eventually("the gateway to see the workers", 30, || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                let count =
                    v["data"].as_array()?.iter().find(|m| m["id"] == MODEL)?["workers"].as_u64()?;
                (count as usize >= n).then_some(())
            }
        })
        .await;
    }

    /// A worker's reputation from the coordinator's `GET /workers`.
    pub async fn reputation(&self, worker: &str) -> Option<Value> {
        let v: Value = self
            .http
            .get(format!("{}/workers", self.coordinator_url()))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        v["workers"]
            .as_array()?
            .iter()
            .find(|w| w["peer_id"] == worker)
            .map(|w| w["reputation"].clone())
    }

    pub async fn balance(&self, account: &str) -> Option<Value> {
        let r = self
            .http
            .get(format!(
                "{}/users/{account}/balance",
                self.coordinator_url()
            ))
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json().await.ok()
    }

    pub async fn chat(&self, stream: bool) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chat/completions", self.gateway_url()))
            .json(&json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": "hello"}],
                "stream": stream,
                "max_tokens": 32,
            }))
            .send()
            .await
            .expect("POST /v1/chat/completions")
    }
}

/// A model server in front of `real` that can be down: while `down` is
/// set it answers 503 "Loading model" (llama.cpp booting or restarting)
/// and counts the refusals in `refused`; otherwise it passes every request
/// on. Returns its URL.
pub async fn restartable_upstream(
    real: String,
    down: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<AtomicUsize>,
) -> String {
    use axum::http::{Method, Uri};
    let http = reqwest::Client::new();
    serve_app(
        axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
            let (down, refused, real, http) =
                (down.clone(), refused.clone(), real.clone(), http.clone());
            async move {
                if down.load(Ordering::SeqCst) {
                    refused.fetch_add(1, Ordering::SeqCst);
                    return axum::http::Response::builder()
                        .status(503)
                        .body(Body::from(
                            r#"{"error":{"code":503,"message":"Loading model"}}"#,
                        ))
                        .unwrap_or_default();
                }
                match http
                    .request(method, format!("{real}{uri}"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(resp) => axum::http::Response::builder()
                        .status(resp.status().as_u16())
                        .body(Body::from_stream(resp.bytes_stream()))
                        .unwrap_or_default(),
                    Err(_) => axum::http::Response::builder()
                        .status(502)
                        .body(Body::empty())
                        .unwrap_or_default(),
                }
            }
        }),
    )
    .await
}

/// GET `url` as JSON; `None` when it does not answer or is not JSON.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Option<Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

/// Joins the content of chat chunks.
pub fn chat_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content")
                .or_else(|| v.pointer("/choices/0/text"))
                .and_then(Value::as_str)
                .map(String::from)
        })
        .collect()
}

/// A small structured request (the older frame shape).
pub fn request() -> troop_protocol::frames::InferenceRequest {
    troop_protocol::frames::InferenceRequest {
        model: MODEL.into(),
        kind: troop_protocol::frames::RequestKind::Chat,
        messages: vec![troop_protocol::frames::ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
        prompt: None,
        max_tokens: Some(8),
        temperature: None,
        top_p: None,
        stop: vec![],
        seed: None,
        endpoint: None,
        body: None,
        request_id: None,
        digest: None,
    }
}

/// Sends `ticket` with a request straight to `worker` from the gateway's node
/// and returns the first frame of the answer.
/// Opens an inference stream to `worker` from the gateway's node.
pub async fn open_infer_stream(
    net: &TestNet,
    worker: libp2p::PeerId,
) -> Result<libp2p::Stream, libp2p_stream::OpenStreamError> {
    net.gateway
        .as_ref()
        .expect("gateway")
        .state
        .net
        .stream_control()
        .open_stream(
            worker,
            libp2p::StreamProtocol::new(troop_protocol::frames::INFER_PROTOCOL),
        )
        .await
}

pub async fn send_ticket(
    net: &TestNet,
    worker: libp2p::PeerId,
    ticket: String,
) -> Option<troop_protocol::frames::Frame> {
    // A connection can close under a loaded test machine before the request
    // is written; that is transport, not the ticket check: try again.
    let mut last = String::new();
    for _ in 0..3 {
        let mut s = match open_infer_stream(net, worker).await {
            Ok(s) => s,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let sent = troop_node::frames_io::write_frame(
            &mut s,
            &troop_protocol::frames::Frame::Request {
                version: troop_protocol::frames::FRAME_VERSION,
                ticket: ticket.clone(),
                request: request(),
                index: 0,
            },
        )
        .await;
        if let Err(e) = sent {
            last = e.to_string();
            continue;
        }
        return troop_node::frames_io::read_frame(&mut s)
            .await
            .expect("read");
    }
    panic!("could not send the ticket: {last}");
}

pub fn is_unauthorized(f: &Option<troop_protocol::frames::Frame>) -> bool {
    matches!(f, Some(troop_protocol::frames::Frame::Error { code, .. }) if *code == troop_protocol::ErrorCode::Unauthorized.number())
}

/// Serves `app` on a free loopback port; its base URL.
pub async fn serve_app(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}
