//! The node's client for the coordinator's HTTP API: signed requests for
//! registration, heartbeats and tickets; HMAC-signed receipts.

use std::time::Duration;

use libp2p::identity::Keypair;
use serde::Serialize;
use serde::de::DeserializeOwned;
use troop_protocol::ErrorCode;
use troop_protocol::api::{
    AuthorizeRequest, AuthorizeResponse, ErrorBody, HeartbeatRequest, HeartbeatResponse,
    RegisterRequest, RegisterResponse, SettlementResponse,
};
use troop_protocol::policy::AUTH_TIMEOUT;
use troop_protocol::receipt::{HEADER_RECEIPT_MAC, HEADER_TIMESTAMP, sign_receipt};
use troop_protocol::signed::sign_request;

/// Why a call to the coordinator failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The coordinator answered with an error.
    #[error("coordinator answered {status}: {message}")]
    Refused {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
        retry_after: Option<u64>,
    },
    /// It could not be reached (or did not answer in time).
    #[error("coordinator unreachable: {0}")]
    Transport(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } => Some(*status),
            ClientError::Transport(_) => None,
        }
    }
}

/// Why a URL did not identify as a Troop coordinator.
#[derive(Debug, thiserror::Error)]
pub enum Identify {
    /// Something else answers there (a web server, another service).
    #[error("{0}")]
    NotCoordinator(String),
    /// Nothing answered (yet), or the coordinator refused for now.
    #[error("{0}")]
    Unreachable(String),
}

/// The coordinator's ticket key.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PublicKey {
    pub kid: String,
    pub public_key: String,
}

#[derive(Clone)]
pub struct CoordinatorClient {
    base: String,
    http: reqwest::Client,
    key: Keypair,
    /// The hashcash nonce a new account shows, found once when the
    /// coordinator's `/health` asks for one.
    pow: std::sync::Arc<tokio::sync::OnceCell<Option<String>>>,
}

use troop_protocol::policy::unix_secs;

impl CoordinatorClient {
    pub fn new(base: &str, key: Keypair) -> Self {
        let http = reqwest::Client::builder()
            .timeout(AUTH_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(32)
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_string(),
            http,
            key,
            pow: Default::default(),
        }
    }

    /// The proof of work for this account's starter credits, when the
    /// coordinator wants one (`starter_pow_bits` in `/health`).
    async fn pow(&self) -> Option<String> {
        self.pow
            .get_or_init(|| async {
                let bits = self
                    .health()
                    .await
                    .ok()?
                    .get("starter_pow_bits")?
                    .as_u64()
                    .filter(|b| *b > 0 && *b <= 32)? as u32;
                let account = self.key.public().to_peer_id().to_base58();
                tracing::info!(
                    bits,
                    "solving the coordinator's proof of work for starter credits"
                );
                tokio::task::spawn_blocking(move || {
                    troop_protocol::usage::solve_pow(&account, bits)
                })
                .await
                .ok()
            })
            .await
            .clone()
    }

    /// This client's account: its key's PeerId.
    pub fn account_id(&self) -> String {
        self.key.public().to_peer_id().to_base58()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Refused {
                status,
                code: None,
                message: format!("unreadable answer: {e}"),
                retry_after: None,
            });
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (Some(b.error.code), b.error.message),
            Err(_) => (
                None,
                String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            ),
        };
        Err(ClientError::Refused {
            status,
            code,
            message,
            retry_after,
        })
    }

    async fn signed_post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ClientError::Transport(e.to_string()))?;
        let h = sign_request(&self.key, "POST", path, &bytes, unix_secs());
        let mut req = self
            .http
            .post(format!("{}{}", self.base, path))
            .header("content-type", "application/json")
            .body(bytes);
        for (k, v) in h.pairs() {
            req = req.header(k, v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }

    /// This account's own transaction history (a signed GET: histories are
    /// private).
    pub async fn my_transactions(&self) -> Result<serde_json::Value, ClientError> {
        let path = format!(
            "/users/{}/transactions",
            self.key.public().to_peer_id().to_base58()
        );
        let h = sign_request(&self.key, "GET", &path, b"", unix_secs());
        let mut req = self.http.get(format!("{}{}", self.base, path));
        for (k, v) in h.pairs() {
            req = req.header(k, v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }

    /// This account's balance (a public read).
    pub async fn my_balance(&self) -> Result<troop_protocol::api::BalanceResponse, ClientError> {
        let id = self.key.public().to_peer_id().to_base58();
        self.get_public(&format!("/users/{id}/balance")).await
    }

    /// A signed POST with any JSON body (proof-of-hardware rounds).
    pub async fn signed_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        self.signed_post(path, body).await
    }

    /// An unsigned GET of a public read (5 s limit).
    async fn get_public<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.get_query(path, &[]).await
    }

    /// An unsigned GET with query parameters (URL-encoded).
    async fn get_query<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        let resp = self
            .http
            .get(format!("{}{}", self.base, path))
            .query(query)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }

    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.get_public("/health").await
    }

    /// `GET /workers`: registered workers with their reputation.
    pub async fn workers(&self) -> Result<troop_protocol::api::WorkersResponse, ClientError> {
        self.get_public("/workers").await
    }

    /// `GET /workers?peer=ID`: one worker's entry (`None`: not registered;
    /// a coordinator too old to filter lists all, and the worker is
    /// picked out of them).
    pub async fn worker(
        &self,
        peer: &str,
    ) -> Result<Option<troop_protocol::api::WorkerInfo>, ClientError> {
        let list: troop_protocol::api::WorkersResponse =
            self.get_query("/workers", &[("peer", peer)]).await?;
        Ok(list.workers.into_iter().find(|w| w.peer_id == peer))
    }

    /// `GET /bootstrap`: a few live workers and the operator's relays.
    pub async fn bootstrap(&self) -> Result<troop_protocol::api::BootstrapResponse, ClientError> {
        self.get_public("/bootstrap").await
    }

    /// Live workers that serve `model`, with their addresses (no relays).
    pub async fn workers_for(
        &self,
        model: &str,
    ) -> Result<troop_protocol::api::BootstrapResponse, ClientError> {
        self.get_query("/bootstrap", &[("model", model)]).await
    }

    /// Every ticket key the coordinator accepts (`GET
    /// /.well-known/jwks.json`): its current key and earlier ones still
    /// valid during a rotation, as (kid, n, e) of each RSA key.
    pub async fn ticket_keys(&self) -> Result<Vec<(String, String, String)>, ClientError> {
        let v: serde_json::Value = self.get_public("/.well-known/jwks.json").await?;
        let keys = v["keys"].as_array().map(Vec::as_slice).unwrap_or_default();
        Ok(keys
            .iter()
            .filter(|k| k["kty"] == "RSA")
            .filter_map(|k| {
                Some((
                    k["kid"].as_str()?.to_string(),
                    k["n"].as_str()?.to_string(),
                    k["e"].as_str()?.to_string(),
                ))
            })
            .collect())
    }

    /// Checks that the URL is a Troop coordinator (its `GET /public-key`),
    /// for a check at start. `Err(NotCoordinator)` when something else
    /// answers there; `Err(Unreachable)` when nothing answers.
    pub async fn identify(&self) -> Result<PublicKey, Identify> {
        let resp = self
            .http
            .get(format!("{}/public-key", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| Identify::Unreachable(format!("nothing answers at {}: {e}", self.base)))?;
        match Self::decode::<PublicKey>(resp).await {
            Ok(k) => Ok(k),
            // A Troop error body: a coordinator that refused (busy, say).
            Err(ClientError::Refused {
                code: Some(_),
                status,
                message,
                ..
            }) => Err(Identify::Unreachable(format!(
                "the coordinator at {} answered {status}: {message}",
                self.base
            ))),
            Err(ClientError::Refused {
                status, message, ..
            }) => Err(Identify::NotCoordinator(format!(
                "{} answers, but it is not a Troop coordinator (GET /public-key: {status} {}); \
                 --coordinator takes the address `troop-coordinator serve --listen` was given, e.g. http://127.0.0.1:7070",
                self.base,
                message.trim()
            ))),
            Err(ClientError::Transport(e)) => Err(Identify::Unreachable(format!(
                "nothing answers at {}: {e}",
                self.base
            ))),
        }
    }

    pub async fn public_key(&self) -> Result<PublicKey, ClientError> {
        let resp = self
            .http
            .get(format!("{}/public-key", self.base))
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }

    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        self.signed_post("/workers/register", req).await
    }

    pub async fn heartbeat(
        &self,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.signed_post("/workers/heartbeat", req).await
    }

    /// Tells the coordinator this worker is stopping (`POST /workers/leave`):
    /// it leaves `/bootstrap` and the alive list at once.
    pub async fn leave(&self) -> Result<HeartbeatResponse, ClientError> {
        self.signed_post("/workers/leave", &serde_json::json!({}))
            .await
    }

    pub async fn authorize(
        &self,
        model: &str,
        worker: &str,
        max_tokens: Option<u32>,
    ) -> Result<AuthorizeResponse, ClientError> {
        self.signed_post(
            "/authorize",
            &AuthorizeRequest {
                model: model.to_string(),
                worker: worker.to_string(),
                max_tokens,
                pow: self.pow().await,
            },
        )
        .await
    }

    /// Reports an audited answer (`POST /audits`, signed by this user).
    pub async fn report_audit(
        &self,
        report: &troop_protocol::audit::AuditReport,
    ) -> Result<serde_json::Value, ClientError> {
        self.signed_post("/audits", report).await
    }

    /// Posts a receipt body (already serialized) with its HMAC.
    pub async fn submit_receipt(
        &self,
        receipt_key: &[u8],
        body: Vec<u8>,
    ) -> Result<SettlementResponse, ClientError> {
        let ts = unix_secs();
        let mac = sign_receipt(receipt_key, ts, &body);
        let resp = self
            .http
            .post(format!("{}/transactions/submit", self.base))
            .header("content-type", "application/json")
            .header(HEADER_TIMESTAMP, ts.to_string())
            .header(HEADER_RECEIPT_MAC, mac)
            .body(body)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Self::decode(resp).await
    }
}
