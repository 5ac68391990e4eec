//! The `/troop/infer/1` stream: length-prefixed CBOR frames.
//!
//! Each frame is a 4-byte big-endian length `N` (1 to [`MAX_FRAME_BYTES`])
//! followed by `N` bytes of CBOR encoding one [`Frame`]. The gateway sends
//! one `request` frame (with the ticket); the worker answers with `chunk`
//! frames, then one `done` frame (usage and the job id the receipt will
//! carry), or one `error` frame with a stable [`ErrorCode`] number. A frame
//! that is too long, truncated, not CBOR or of another version resets the
//! stream.

use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// The libp2p protocol name.
pub const INFER_PROTOCOL: &str = "/troop/infer/1";
/// The frame format version carried in every request.
pub const FRAME_VERSION: u16 = 1;
/// Hard cap on one frame's body.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Chat (messages) or plain completion (prompt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    Chat,
    Completion,
}

/// The OpenAI endpoint a pass-through request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
}

impl Endpoint {
    /// The path under the upstream's base URL (Ollama serves the same
    /// paths as its OpenAI compatibility API).
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
        }
    }
}

/// What the user asked for.
///
/// A current gateway sends the app's own JSON body in `body` (with
/// `endpoint` naming the OpenAI endpoint): the worker passes it to its
/// upstream as is and answers with `raw` frames. The structured fields
/// (`kind`, `messages`, ...) are the older form, still served (with `chunk`
/// frames) for gateways that send no `body`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceRequest {
    pub model: String,
    pub kind: RequestKind,
    #[serde(default)]
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub seed: Option<i64>,
    /// The endpoint `body` is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    /// The app's JSON request body, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The app's `x-request-id` (or the one the gateway made), for logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The weights the user pinned (`model@sha256:<prefix>`): a worker
    /// whose advertised digest for `model` does not start with it refuses
    /// with `unknown_model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl InferenceRequest {
    /// A pass-through request: `body` is the app's JSON for `endpoint`.
    pub fn passthrough(model: &str, endpoint: Endpoint, body: String) -> Self {
        Self {
            model: model.to_string(),
            kind: match endpoint {
                Endpoint::Completions => RequestKind::Completion,
                _ => RequestKind::Chat,
            },
            messages: Vec::new(),
            prompt: None,
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: Vec::new(),
            seed: None,
            endpoint: Some(endpoint),
            body: Some(body),
            request_id: None,
            digest: None,
        }
    }
}

/// Token counts of a finished job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One frame on the stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Frame {
    Request {
        version: u16,
        ticket: String,
        request: InferenceRequest,
        /// The request's number within the ticket's session (0, 1, 2, ...).
        #[serde(default)]
        index: u32,
    },
    /// Older form: one piece of text.
    Chunk { text: String },
    /// Pass-through answer bytes, forwarded to the app as they are. For a
    /// streamed answer, whole server-sent events (`data: ...` blocks, each
    /// ended by a blank line, `[DONE]` included), `events` of them; for a
    /// whole answer, the next piece of its JSON body (`events` = 0).
    Raw {
        data: String,
        #[serde(default)]
        events: u32,
    },
    Done {
        job_id: String,
        usage: Usage,
        finish_reason: String,
        /// What was served, token by token, signed by the worker (when its
        /// upstream reports logprobs): see [`crate::evidence`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        evidence: Option<crate::evidence::Evidence>,
    },
    Error {
        code: u16,
        message: String,
        /// For `upstream_rejected`: the model server's HTTP status (4xx)
        /// and its body, to hand the app unchanged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
        /// When the model server refused the request: the worker's signed
        /// statement of what it said (an auditor that cannot force the
        /// tokens proves it with this; see `audit::Refusal`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refusal: Option<crate::audit::Refusal>,
    },
    /// The user's signed acknowledgement of one request, gateway to worker,
    /// the only frame of its stream.
    Ack { ack: crate::usage::Ack },
}

impl Frame {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
        Frame::Error {
            code: code.number(),
            message: message.into(),
            status: None,
            body: None,
            refusal: None,
        }
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the {MAX_FRAME_BYTES} byte cap")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("frame is not valid CBOR for this version: {0}")]
    Malformed(String),
    #[error("unsupported frame version {0} (this node speaks {FRAME_VERSION})")]
    Version(u16),
    #[error("stream closed in the middle of a frame")]
    Truncated,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes a frame with its length prefix.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    ciborium::into_writer(frame, &mut out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads the length prefix, refusing empty and oversized frames before any
/// body is read (so a peer can't make us allocate more than the cap).
pub fn body_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes one frame body and checks a request's version.
pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
    let frame: Frame =
        ciborium::from_reader(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if let Frame::Request { version, .. } = &frame
        && *version != FRAME_VERSION
    {
        return Err(FrameError::Version(*version));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request() -> impl Strategy<Value = InferenceRequest> {
        (
            ".{0,20}",
            any::<bool>(),
            proptest::collection::vec((".{0,8}", ".{0,64}"), 0..4),
            proptest::option::of(".{0,64}"),
            proptest::option::of(any::<u32>()),
            proptest::option::of(-2.0f32..2.0),
            proptest::collection::vec(".{0,4}", 0..3),
            proptest::option::of(any::<i64>()),
        )
            .prop_map(
                |(model, chat, msgs, prompt, max_tokens, temperature, stop, seed)| {
                    InferenceRequest {
                        model,
                        kind: if chat {
                            RequestKind::Chat
                        } else {
                            RequestKind::Completion
                        },
                        messages: msgs
                            .into_iter()
                            .map(|(role, content)| ChatMessage { role, content })
                            .collect(),
                        prompt,
                        max_tokens,
                        temperature,
                        top_p: None,
                        stop,
                        seed,
                        endpoint: None,
                        body: None,
                        request_id: None,
                        digest: None,
                    }
                },
            )
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (".{0,200}", request()).prop_map(|(ticket, request)| Frame::Request {
                index: 0,
                version: FRAME_VERSION,
                ticket,
                request
            }),
            ".{0,100}".prop_map(|text| Frame::Chunk { text }),
            (".{0,32}", any::<u64>(), any::<u64>(), ".{0,10}").prop_map(|(job_id, p, c, f)| {
                Frame::Done {
                    job_id,
                    usage: Usage {
                        prompt_tokens: p,
                        completion_tokens: c,
                    },
                    finish_reason: f,
                    evidence: None,
                }
            }),
            (any::<u16>(), ".{0,50}").prop_map(|(code, message)| Frame::Error {
                code,
                message,
                status: None,
                body: None,
                refusal: None,
            }),
            (".{0,200}", any::<u32>()).prop_map(|(data, events)| Frame::Raw { data, events }),
            (".{0,200}", ".{0,200}").prop_map(|(ticket, body)| Frame::Request {
                index: 1,
                version: FRAME_VERSION,
                ticket,
                request: InferenceRequest::passthrough("m", Endpoint::ChatCompletions, body),
            }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(f in frame()) {
            let bytes = encode(&f).expect("encode");
            let len = body_len(bytes[..4].try_into().expect("prefix")).expect("len");
            prop_assert_eq!(len, bytes.len() - 4);
            prop_assert_eq!(decode(&bytes[4..]).expect("decode"), f);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        /// Valid frames with bytes flipped, cut or inserted: decoding
        /// returns an error or some frame, and never panics.
        #[test]
        fn mutated_frames_never_panic(
            f in frame(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            how in 0u8..3,
        ) {
            let mut bytes = encode(&f).expect("encode").split_off(4);
            let i = at.index(bytes.len().max(1)).min(bytes.len().saturating_sub(1));
            match how {
                0 if !bytes.is_empty() => bytes[i] ^= byte | 1,
                1 => bytes.truncate(i),
                _ => bytes.insert(i, byte),
            }
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn caps_and_versions_are_enforced() {
        assert!(matches!(body_len([0, 0, 0, 0]), Err(FrameError::Empty)));
        assert!(matches!(
            body_len([0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge(_))
        ));
        let big = Frame::Chunk {
            text: "x".repeat(MAX_FRAME_BYTES + 1),
        };
        assert!(matches!(encode(&big), Err(FrameError::TooLarge(_))));
        let mut req = encode(&Frame::Request {
            version: 2,
            index: 0,
            ticket: "t".into(),
            request: InferenceRequest {
                model: "m".into(),
                kind: RequestKind::Chat,
                messages: vec![],
                prompt: None,
                max_tokens: None,
                temperature: None,
                top_p: None,
                stop: vec![],
                seed: None,
                endpoint: None,
                body: None,
                request_id: None,
                digest: None,
            },
        })
        .expect("encode");
        assert!(matches!(decode(&req[4..]), Err(FrameError::Version(2))));
        req.truncate(req.len() - 3);
        assert!(matches!(decode(&req[4..]), Err(FrameError::Malformed(_))));
    }
}
