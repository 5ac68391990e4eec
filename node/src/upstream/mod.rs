//! Upstream model servers in their two dialects: Ollama's native API
//! (`/api/tags`, `/api/chat`, `/api/generate`, NDJSON) and the OpenAI API
//! (`/v1/models`, `/v1/chat/completions`, `/v1/completions`, SSE). They know
//! nothing of the mesh.
//!
//! Cancellation: a generation is a stream; dropping it drops the HTTP
//! response, which closes the connection, which makes the server stop.

pub mod identity;
pub mod ollama;
pub mod openai;
pub mod passthrough;

use std::pin::Pin;
use std::time::Duration;
use troop_protocol::sync::MutexExt as _;

use futures::Stream;
use troop_protocol::advert::ModelAdvert;
use troop_protocol::frames::{InferenceRequest, Usage};

/// One piece of a generation.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Text(String),
    Done { usage: Usage, finish_reason: String },
}

/// Why the upstream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("upstream sent something unreadable: {0}")]
    Protocol(String),
    /// A 4xx: the request itself is at fault (context overflow, bad schema).
    #[error("upstream refused the request ({status}): {body}")]
    Rejected { status: u16, body: String },
}

pub type DeltaStream = Pin<Box<dyn Stream<Item = Result<Delta, UpstreamError>> + Send>>;

/// Which API the upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dialect {
    Ollama,
    Openai,
}

/// Ollama blob digests by (model, listing digest).
type OllamaBlobs = std::collections::HashMap<(String, Option<String>), Option<String>>;

/// A model server.
#[derive(Clone)]
pub struct Upstream {
    pub base: String,
    pub dialect: Dialect,
    http: reqwest::Client,
    /// Whether each model embeds, asked once per model name.
    embeds: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, bool>>>,
    /// The local copy of the weights (`--model-file`), when the server's
    /// own path is not readable here.
    model_file: Option<std::path::PathBuf>,
    /// Digests of the model files hashed so far.
    digests: identity::DigestCache,
    /// Ollama blob digests by (model, listing digest).
    ollama_blobs: std::sync::Arc<std::sync::Mutex<OllamaBlobs>>,
}

/// The model server's root from the URL a user gave: without a trailing
/// `/`, and without the `/v1` of an "OpenAI base URL"
/// (`http://127.0.0.1:8081/v1`), which the worker adds itself.
pub fn server_root(url: &str) -> String {
    let u = url.trim().trim_end_matches('/');
    u.strip_suffix("/v1")
        .unwrap_or(u)
        .trim_end_matches('/')
        .to_string()
}

impl Upstream {
    pub fn new(base: &str, dialect: Dialect) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(1024)
            .build()
            .unwrap_or_default();
        Self {
            base: server_root(base),
            dialect,
            http,
            embeds: Default::default(),
            model_file: None,
            digests: Default::default(),
            ollama_blobs: Default::default(),
        }
    }

    /// Names the local copy of the model's weights (`--model-file`): its
    /// digest is advertised instead of that of the file the server names.
    pub fn with_model_file(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.model_file = path;
        self
    }

    /// Finds out which dialect `base` speaks (Ollama's `/api/tags` first,
    /// then OpenAI's `/v1/models`).
    pub async fn detect(base: &str) -> Result<Self, UpstreamError> {
        let probe = Self::new(base, Dialect::Ollama);
        if ollama::models(&probe.http, &probe.base).await.is_ok() {
            return Ok(probe);
        }
        let probe = Self::new(base, Dialect::Openai);
        match openai::models(&probe.http, &probe.base).await {
            Ok(_) => Ok(probe),
            // Not up yet (refused, timed out, still loading): worth waiting for.
            Err(e) if e.not_up_yet() => Err(e),
            Err(e) => Err(UpstreamError::Protocol(format!(
                "{base} answers neither /api/tags (Ollama) nor /v1/models (OpenAI): {e}"
            ))),
        }
    }

    /// The upstream's models, each marked with whether it embeds and the
    /// digest of its weights.
    pub async fn models(&self) -> Result<Vec<ModelAdvert>, UpstreamError> {
        let mut list = match self.dialect {
            Dialect::Ollama => ollama::models(&self.http, &self.base).await,
            Dialect::Openai => openai::models(&self.http, &self.base).await,
        }?;
        self.identify(&mut list).await;
        for m in &mut list {
            let known = self
                .embeds
                .lock()
                .ok()
                .and_then(|e| e.get(&m.name).copied());
            m.embeds = match known {
                Some(b) => b,
                None => {
                    let b = self.probe_embeddings(&m.name).await;
                    if let Some(mut e) = self.embeds.locked() {
                        e.insert(m.name.clone(), b);
                    }
                    b
                }
            };
        }
        Ok(list)
    }

    /// Fills in each model's digest and runtime (see [`identity`]).
    async fn identify(&self, list: &mut [ModelAdvert]) {
        match self.dialect {
            Dialect::Openai => {
                // llama.cpp's `/props`: the file it loaded and its build.
                let props = get_json(&self.http, &format!("{}/props", self.base))
                    .await
                    .ok();
                let prop = |k: &str| {
                    props
                        .as_ref()
                        .and_then(|p| p.get(k))
                        .and_then(serde_json::Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                };
                let runtime = prop("build_info").map(|b| format!("llama.cpp {b}"));
                let path = self
                    .model_file
                    .clone()
                    .or_else(|| prop("model_path").map(std::path::PathBuf::from));
                // One file names one model: a server listing several (a
                // router) says nothing of which file is which.
                let digest = match (&path, list.len()) {
                    (Some(p), 1) => self.digests.digest(p).await,
                    _ => None,
                };
                for m in list.iter_mut() {
                    m.digest = digest.clone();
                    m.runtime = runtime.clone();
                }
            }
            Dialect::Ollama => {
                let version = get_json(&self.http, &format!("{}/api/version", self.base))
                    .await
                    .ok()
                    .and_then(|v| v.get("version")?.as_str().map(String::from));
                for m in list.iter_mut() {
                    let key = (m.name.clone(), m.digest.clone());
                    let known = self
                        .ollama_blobs
                        .locked()
                        .and_then(|b| b.get(&key).cloned());
                    let blob = match known {
                        Some(b) => b,
                        None => {
                            let b = self.ollama_blob(&m.name).await;
                            if let Some(mut c) = self.ollama_blobs.locked() {
                                c.insert(key, b.clone());
                            }
                            b
                        }
                    };
                    // The listing's digest is the manifest's, not the
                    // weights': only the blob's is advertised.
                    m.digest = blob;
                    m.runtime = version.as_ref().map(|v| format!("ollama {v}"));
                }
            }
        }
    }

    /// The digest of the GGUF blob an Ollama model is built on.
    async fn ollama_blob(&self, model: &str) -> Option<String> {
        let v: serde_json::Value = self
            .http
            .post(format!("{}/api/show", self.base))
            .json(&serde_json::json!({ "model": model }))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        // The same answer says whether the model embeds: remembered, so
        // the probe in `models` asks `/api/show` no second time.
        if let Some(embeds) = ollama_embeds(&v)
            && let Some(mut e) = self.embeds.locked()
        {
            e.entry(model.to_string()).or_insert(embeds);
        }
        identity::ollama_blob_digest(v.get("modelfile")?.as_str()?)
    }

    /// Ollama says so in `/api/show`'s capabilities; an OpenAI server is
    /// asked to embed one word (llama.cpp answers 501 unless started with
    /// `--embeddings`).
    async fn probe_embeddings(&self, model: &str) -> bool {
        let probe = async {
            match self.dialect {
                Dialect::Ollama => {
                    let v: serde_json::Value = self
                        .http
                        .post(format!("{}/api/show", self.base))
                        .json(&serde_json::json!({ "model": model }))
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    ollama_embeds(&v)
                }
                Dialect::Openai => {
                    let r = self
                        .http
                        .post(format!("{}/v1/embeddings", self.base))
                        .json(&serde_json::json!({ "model": model, "input": "troop" }))
                        .send()
                        .await
                        .ok()?;
                    Some(r.status().is_success())
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), probe)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    /// Sends a pass-through request to the upstream's OpenAI endpoint.
    pub async fn send_raw(
        &self,
        p: &passthrough::Prepared,
        request_id: Option<&str>,
    ) -> Result<reqwest::Response, UpstreamError> {
        passthrough::send(&self.http, &self.base, p, request_id).await
    }

    /// Starts a generation; the stream ends after one `Delta::Done`.
    pub async fn generate(&self, req: &InferenceRequest) -> Result<DeltaStream, UpstreamError> {
        match self.dialect {
            Dialect::Ollama => ollama::generate(&self.http, &self.base, req).await,
            Dialect::Openai => openai::generate(&self.http, &self.base, req).await,
        }
    }
}

/// Whether `/api/show`'s capabilities list `embedding`.
fn ollama_embeds(show: &serde_json::Value) -> Option<bool> {
    Some(
        show.get("capabilities")?
            .as_array()?
            .iter()
            .any(|c| c == "embedding"),
    )
}

impl UpstreamError {
    /// The model server is not up yet: nothing answers, or it answers 5xx
    /// (llama.cpp says 503 while it loads its model).
    pub fn not_up_yet(&self) -> bool {
        match self {
            UpstreamError::Unreachable(_) => true,
            UpstreamError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

pub(crate) fn unreachable(e: reqwest::Error) -> UpstreamError {
    UpstreamError::Unreachable(e.to_string())
}

pub(crate) async fn check_status(
    resp: reqwest::Response,
) -> Result<reqwest::Response, UpstreamError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    Err(UpstreamError::Status {
        status,
        message: text.chars().take(300).collect(),
    })
}

/// GETs a JSON document from the upstream (5 s limit): the model listings.
pub(crate) async fn get_json(
    http: &reqwest::Client,
    url: &str,
) -> Result<serde_json::Value, UpstreamError> {
    let resp = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(unreachable)?;
    check_status(resp)
        .await?
        .json()
        .await
        .map_err(|e| UpstreamError::Protocol(e.to_string()))
}
