//! Reading a worker's answer off its stream: the first frame, a whole
//! answer up to `done`, and what a frame that has no place there means.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use troop_protocol::frames::Frame;

use super::JobStream;
use super::errors::worker_lost;
use crate::upstream::passthrough::MAX_WHOLE_BYTES;

/// Names the worker that served (first) in `x-troop-worker`.
pub(super) fn with_worker(mut resp: Response, worker: &libp2p::PeerId) -> Response {
    if let Ok(v) = HeaderValue::from_str(&worker.to_base58()) {
        resp.headers_mut().insert("x-troop-worker", v);
    }
    resp
}

pub(super) fn sse_response(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

pub(super) fn take_first(job: &mut JobStream) -> Frame {
    std::mem::replace(
        &mut job.first,
        Frame::Raw {
            data: String::new(),
            events: 0,
        },
    )
}

/// What went wrong with a worker mid-answer.
pub(super) fn frame_problem(f: &Frame) -> Option<String> {
    match f {
        Frame::Raw { .. } | Frame::Done { .. } => None,
        Frame::Error { message, .. } => Some(format!("the worker failed: {message}")),
        Frame::Chunk { .. } => {
            Some("the worker speaks an older protocol (text chunks); upgrade it".into())
        }
        Frame::Request { .. } | Frame::Ack { .. } => {
            Some("the worker sent a frame that has no place in an answer".into())
        }
    }
}

/// Reads a whole answer (`raw` frames up to `done`).
pub(super) async fn read_whole(job: &mut JobStream, idle: Duration) -> Result<String, String> {
    let mut out = String::new();
    let mut next = Some(take_first(job));
    loop {
        let f = match next.take() {
            Some(f) => f,
            None => match job.next(idle).await {
                Ok(Some(f)) => f,
                Ok(None) => return Err("the worker closed the stream early".into()),
                Err(e) => return Err(e),
            },
        };
        if let Some(p) = frame_problem(&f) {
            return Err(p);
        }
        match f {
            Frame::Raw { data, .. } => {
                if out.len() + data.len() > MAX_WHOLE_BYTES {
                    return Err("the answer is too large".into());
                }
                out.push_str(&data);
            }
            _ => return Ok(out),
        }
    }
}

/// A whole answer for the app; its evidence, when it verified, may be
/// audited like a streamed answer's.
pub(super) async fn whole_answer(
    state: &std::sync::Arc<super::GatewayState>,
    mut job: JobStream,
    req: &troop_protocol::frames::InferenceRequest,
) -> Response {
    match read_whole(&mut job, state.cfg.idle_timeout).await {
        Ok(body) => {
            if let Some(evidence) = job.evidence_signed.take() {
                state.maybe_audit(
                    req,
                    super::audit::Audited {
                        worker: job.worker,
                        job_id: job.job_id.clone(),
                        index: job.index,
                        evidence,
                    },
                );
            }
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        Err(e) => worker_lost(&e),
    }
}
