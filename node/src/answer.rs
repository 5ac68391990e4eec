//! The worker's side of a pass-through request: the app's body to the
//! upstream, the upstream's answer to the gateway in `raw` frames.
//!
//! Events that are ready together go out in one frame (up to
//! [`FRAME_TARGET`] bytes), so a fast upstream costs one frame per read,
//! not one per token; nothing is parsed beyond the bill's fields.

use std::time::Instant;

use futures::{FutureExt, StreamExt};
use troop_protocol::ErrorCode;
use troop_protocol::frames::{Endpoint, Frame, InferenceRequest, Usage};

use crate::frames_io::write_frame;
use crate::upstream::passthrough::{self, MAX_WHOLE_BYTES, SseSplitter};
use crate::upstream::{Upstream, UpstreamError};

/// Bytes of answer gathered into one frame at most.
pub const FRAME_TARGET: usize = 256 * 1024;

/// Who signs a streamed chat answer's evidence: the worker's key, and the
/// request's number in its session.
#[derive(Clone, Copy)]
pub struct Signer<'a> {
    pub key: &'a libp2p::identity::Keypair,
    pub index: u32,
}

/// How a job ended when it did not complete.
#[derive(Debug)]
pub enum JobEnd {
    /// The gateway went away (the upstream generation was dropped).
    Cancelled(Usage),
    /// The upstream failed, or refused the request (`rejected`).
    Failed { usage: Usage, rejected: bool },
}

/// A completed job: usage, events forwarded, when the first one went out.
pub struct Served {
    pub usage: Usage,
    pub chunks: u64,
    pub first: Option<Instant>,
    /// The commitment of the evidence the answer ended with.
    pub commitment: Option<String>,
}

/// What a job that ended early served: its chunks, as tokens.
pub(crate) fn partial(chunks: u64) -> Usage {
    Usage {
        prompt_tokens: 0,
        completion_tokens: chunks,
    }
}

/// How long the worker waits on its upstream before it gives up, tells the
/// gateway (an `error` frame, code `timeout`) and drops the upstream
/// request (which stops the generation).
#[derive(Debug, Clone, Copy)]
pub struct StreamTimeouts {
    /// From the request to the first event of a streamed answer.
    pub first_token: std::time::Duration,
    /// Between two reads of a streamed answer.
    pub between_chunks: std::time::Duration,
    /// The whole job, streamed or not.
    pub total: std::time::Duration,
}

impl Default for StreamTimeouts {
    fn default() -> Self {
        Self {
            first_token: troop_protocol::policy::AUTH_TIMEOUT,
            between_chunks: troop_protocol::policy::AUTH_TIMEOUT,
            total: troop_protocol::policy::INFERENCE_TIMEOUT,
        }
    }
}

/// The deadlines of one job: the total, and the first-token or
/// between-chunk one depending on whether anything has arrived yet.
pub(crate) struct Pace {
    t: StreamTimeouts,
    end: tokio::time::Instant,
    started: bool,
    /// Whole answers come at once after the generation: only the total.
    whole: bool,
}

impl Pace {
    pub(crate) fn new(t: StreamTimeouts, whole: bool) -> Self {
        Self {
            t,
            end: tokio::time::Instant::now() + t.total,
            started: false,
            whole,
        }
    }

    /// Something arrived: from now on the between-chunk limit applies.
    pub(crate) fn started(&mut self) {
        self.started = true;
    }

    /// Waits for `f` within the deadline that applies now; on timeout, says
    /// which limit bit.
    pub(crate) async fn wait<F: std::future::Future>(&self, f: F) -> Result<F::Output, String> {
        const TOTAL: (&str, &str) = ("total", "the job ran past");
        let (limit, (stage, what)) = match (self.whole, self.started) {
            (true, _) => (self.t.total, TOTAL),
            (false, false) => (
                self.t.first_token,
                ("first_token", "no first token from the upstream within"),
            ),
            (false, true) => (
                self.t.between_chunks,
                ("between_chunks", "the upstream sent nothing for"),
            ),
        };
        let deadline = self.end.min(tokio::time::Instant::now() + limit);
        // When the total comes first, it is the limit that bites.
        let (limit, (stage, what)) = if deadline == self.end {
            (self.t.total, TOTAL)
        } else {
            (limit, (stage, what))
        };
        tokio::time::timeout_at(deadline, f).await.map_err(|_| {
            metrics::counter!("troop_jobs_timed_out_total", "stage" => stage).increment(1);
            format!("{what} {} s", limit.as_secs())
        })
    }
}

/// Tells the gateway the upstream was too slow (`why` says which limit).
pub(crate) async fn timed_out(stream: &mut libp2p::Stream, chunks: u64, why: &str) -> JobEnd {
    tracing::warn!(reason = why, "upstream timed out; its request was dropped");
    let _ = write_frame(stream, &Frame::error(ErrorCode::Timeout, why)).await;
    JobEnd::Failed {
        usage: partial(chunks),
        rejected: false,
    }
}

/// Who signs a refusal: the signer and the session.
type Sign<'a> = Option<(Signer<'a>, &'a str)>;

async fn fail(
    stream: &mut libp2p::Stream,
    e: &UpstreamError,
    chunks: u64,
    sign: Sign<'_>,
) -> JobEnd {
    // What the model server said, signed: an auditor that cannot force a
    // worker's tokens proves it with this (`audit::Refusal`).
    let refusal = |said: &str| {
        sign.map(|(sg, job)| troop_protocol::audit::Refusal::sign(sg.key, job, sg.index, said))
    };
    let (frame, rejected) = match e {
        UpstreamError::Rejected { status, body } => (
            Frame::Error {
                code: ErrorCode::UpstreamRejected.number(),
                message: format!("the model server refused the request ({status})"),
                status: Some(*status),
                body: Some(body.clone()),
                refusal: refusal(&format!("{status}: {body}")),
            },
            true,
        ),
        UpstreamError::Status { .. } => {
            let said = e.to_string();
            let mut f = Frame::error(ErrorCode::UpstreamFailed, said.clone());
            if let Frame::Error { refusal: r, .. } = &mut f {
                *r = refusal(&said);
            }
            (f, false)
        }
        other => (
            Frame::error(ErrorCode::UpstreamFailed, other.to_string()),
            false,
        ),
    };
    let _ = write_frame(stream, &frame).await;
    JobEnd::Failed {
        usage: partial(chunks),
        rejected,
    }
}

/// Sends `data` in `raw` frames of at most [`FRAME_TARGET`] bytes.
async fn send_raw(stream: &mut libp2p::Stream, data: &str, events: u32) -> bool {
    for (piece, n) in raw_pieces(data, events) {
        let f = Frame::Raw {
            data: piece.to_string(),
            events: n,
        };
        if write_frame(stream, &f).await.is_err() {
            return false;
        }
    }
    true
}

/// Cuts `data` (server-sent events, each ended by a blank line) into
/// pieces of at most [`FRAME_TARGET`] bytes, each with the events it ends.
/// Frames end between events; only an event longer than a frame is cut
/// (at a character boundary), `events` counting it on its last piece.
fn raw_pieces(data: &str, events: u32) -> Vec<(&str, u32)> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut counted = 0u32;
    while rest.len() > FRAME_TARGET {
        let mut cut = FRAME_TARGET;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let cut = rest[..cut].rfind("\n\n").map_or(cut, |i| i + 2);
        let (head, tail) = rest.split_at(cut);
        let ended = (head.matches("\n\n").count() as u32).min(events - counted);
        counted += ended;
        out.push((head, ended));
        rest = tail;
    }
    out.push((rest, events - counted));
    out
}

/// Serves one pass-through request on `stream`.
pub async fn relay(
    upstream: &Upstream,
    stream: &mut libp2p::Stream,
    request: &InferenceRequest,
    cap: Option<u32>,
    job_id: &str,
    timeouts: StreamTimeouts,
    signer: Option<Signer<'_>>,
) -> Result<Served, JobEnd> {
    let sign: Sign<'_> = signer.map(|sg| (sg, job_id));
    let prepared = match passthrough::prepare(request, cap, signer.is_some()) {
        Ok(p) => p,
        Err(e) => {
            let err = UpstreamError::Rejected {
                status: 400,
                body: serde_json::json!({"error": {"message": e, "type": "invalid_request_error", "param": null, "code": "invalid_request"}}).to_string(),
            };
            return Err(fail(stream, &err, 0, sign).await);
        }
    };
    let mut pace = Pace::new(timeouts, !prepared.stream);
    let sent = pace
        .wait(upstream.send_raw(&prepared, request.request_id.as_deref()))
        .await;
    let resp = match sent {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::info!(job = job_id, error = %e, "upstream refused or failed");
            return Err(fail(stream, &e, 0, sign).await);
        }
        Err(why) => {
            return Err(timed_out(stream, 0, &why).await);
        }
    };
    let mut body = resp.bytes_stream();
    if !prepared.stream {
        let collector = prepared
            .evidence
            .then(|| crate::evidence::Collector::new(prepared.strip_logprobs));
        return whole(stream, &mut body, &pace, job_id, collector.zip(signer)).await;
    }
    let chat_like = matches!(
        prepared.endpoint,
        Endpoint::ChatCompletions | Endpoint::Completions
    );
    let mut collector = prepared
        .evidence
        .then(|| crate::evidence::Collector::new(prepared.strip_logprobs));
    let mut split = SseSplitter::default();
    let mut out = String::new();
    let mut out_events = 0u32;
    let mut chunks = 0u64;
    let mut usage: Option<Usage> = None;
    let mut finish: Option<String> = None;
    let mut first: Option<Instant> = None;
    let mut saw_done = false;
    let mut ended = false;
    loop {
        // Wait for bytes, then take whatever else is ready without waiting.
        let mut got = match pace.wait(body.next()).await {
            Ok(n) => n,
            Err(why) => {
                return Err(timed_out(stream, chunks, &why).await);
            }
        };
        loop {
            match got {
                Some(Ok(bytes)) => split.push(&bytes),
                Some(Err(e)) => {
                    let e = UpstreamError::Protocol(e.to_string());
                    return Err(fail(stream, &e, chunks, sign).await);
                }
                None => {
                    ended = true;
                    break;
                }
            }
            if split.pending() >= FRAME_TARGET {
                break;
            }
            match body.next().now_or_never() {
                Some(n) => got = n,
                None => break,
            }
        }
        loop {
            let ev = match split.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => return Err(fail(stream, &UpstreamError::Protocol(e), chunks, sign).await),
            };
            if ev.data.is_empty() {
                continue; // a comment or keep-alive
            }
            if ev.data.trim() == "[DONE]" {
                saw_done = true;
                out.push_str(&ev.raw);
                out.push_str("\n\n");
                out_events += 1;
                break;
            }
            let seen = match passthrough::peek(&ev.data) {
                Ok(s) => s,
                Err(e) => {
                    let e = UpstreamError::Protocol(format!("bad event: {e}"));
                    return Err(fail(stream, &e, chunks, sign).await);
                }
            };
            if let Some(msg) = seen.error {
                let e = UpstreamError::Status {
                    status: 500,
                    message: msg,
                };
                return Err(fail(stream, &e, chunks, sign).await);
            }
            if seen.usage.is_some() {
                usage = seen.usage;
            }
            if seen.finish.is_some() {
                finish = seen.finish;
            }
            if seen.content {
                chunks += 1;
            }
            if seen.usage_only && !prepared.forward_usage {
                continue;
            }
            match collector
                .as_mut()
                .and_then(|c| c.on_event(&ev.raw, &ev.data))
            {
                Some(rewritten) => out.push_str(&rewritten),
                None => out.push_str(&ev.raw),
            }
            out.push_str("\n\n");
            out_events += 1;
        }
        if ended && !saw_done && chat_like && finish.is_some() {
            // Some servers end without `[DONE]`; apps wait for it.
            out.push_str("data: [DONE]\n\n");
            out_events += 1;
        }
        if !out.is_empty() {
            first.get_or_insert_with(Instant::now);
            pace.started();
            // Backpressure: this waits while the gateway is not reading.
            if !send_raw(stream, &out, out_events).await {
                tracing::info!(
                    job = job_id,
                    "client went away; upstream generation stopped"
                );
                return Err(JobEnd::Cancelled(usage.unwrap_or(partial(chunks))));
            }
            out.clear();
            out_events = 0;
        }
        if saw_done || ended {
            break;
        }
    }
    let finish = match finish {
        Some(f) => f,
        None if !chat_like => "completed".into(),
        None => {
            let e = UpstreamError::Protocol("the stream ended without a finish reason".into());
            return Err(fail(stream, &e, chunks, sign).await);
        }
    };
    let mut usage = usage.unwrap_or_default();
    if usage.completion_tokens == 0 {
        usage.completion_tokens = chunks;
    }
    let evidence = match (collector, signer) {
        (Some(c), Some(sg)) => c.finish(sg.key, job_id, sg.index),
        _ => None,
    };
    let commitment = evidence.as_ref().map(|e| e.commitment.clone());
    done(stream, job_id, usage, finish, evidence).await?;
    Ok(Served {
        usage,
        chunks,
        first,
        commitment,
    })
}

async fn done(
    stream: &mut libp2p::Stream,
    job_id: &str,
    usage: Usage,
    finish_reason: String,
    evidence: Option<troop_protocol::evidence::Evidence>,
) -> Result<(), JobEnd> {
    let f = Frame::Done {
        job_id: job_id.to_string(),
        usage,
        finish_reason,
        evidence,
    };
    if write_frame(stream, &f).await.is_err() {
        return Err(JobEnd::Cancelled(usage));
    }
    let _ = futures::AsyncWriteExt::close(stream).await;
    Ok(())
}

/// A whole answer: read it (at most [`MAX_WHOLE_BYTES`]), note its usage,
/// forward it.
async fn whole(
    stream: &mut libp2p::Stream,
    body: &mut (impl futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin),
    pace: &Pace,
    job_id: &str,
    evidence: Option<(crate::evidence::Collector, Signer<'_>)>,
) -> Result<Served, JobEnd> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match pace.wait(body.next()).await {
            Ok(Some(Ok(b))) => {
                if buf.len() + b.len() > MAX_WHOLE_BYTES {
                    let e = UpstreamError::Protocol(format!(
                        "the answer is over {MAX_WHOLE_BYTES} bytes"
                    ));
                    return Err(fail(stream, &e, 0, None).await);
                }
                buf.extend_from_slice(&b);
            }
            Ok(Some(Err(e))) => {
                return Err(fail(stream, &UpstreamError::Protocol(e.to_string()), 0, None).await);
            }
            Ok(None) => break,
            Err(why) => {
                return Err(timed_out(stream, 0, &why).await);
            }
        }
    }
    let text = match String::from_utf8(buf) {
        Ok(t) => t,
        Err(_) => {
            let e = UpstreamError::Protocol("the answer is not UTF-8".into());
            return Err(fail(stream, &e, 0, None).await);
        }
    };
    let seen = match passthrough::peek(&text) {
        Ok(s) => s,
        Err(e) => return Err(fail(stream, &UpstreamError::Protocol(e), 0, None).await),
    };
    if let Some(msg) = seen.error {
        let e = UpstreamError::Status {
            status: 500,
            message: msg,
        };
        return Err(fail(stream, &e, 0, None).await);
    }
    let usage = seen.usage.unwrap_or_default();
    // The evidence of a whole answer: its choice's logprobs, taken out of
    // the body when the app did not ask for them.
    let (text, evidence) = match evidence {
        Some((mut c, sg)) => {
            let text = c.on_whole(&text).unwrap_or(text);
            (text, c.finish(sg.key, job_id, sg.index))
        }
        None => (text, None),
    };
    let commitment = evidence.as_ref().map(|e| e.commitment.clone());
    let first = Instant::now();
    if !send_raw(stream, &text, 0).await {
        return Err(JobEnd::Cancelled(usage));
    }
    done(
        stream,
        job_id,
        usage,
        seen.finish.unwrap_or_else(|| "stop".into()),
        evidence,
    )
    .await?;
    Ok(Served {
        usage,
        chunks: 0,
        first: Some(first),
        commitment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_end_between_events() {
        let event = format!("data: {}\n\n", "x".repeat(1000));
        let n = 600;
        let data = event.repeat(n);
        let pieces = raw_pieces(&data, n as u32);
        assert!(pieces.len() >= 3);
        for (p, e) in &pieces {
            assert!(p.len() <= FRAME_TARGET);
            assert!(p.ends_with("\n\n"), "a frame ends mid-event");
            assert_eq!(*e as usize, p.len() / event.len());
        }
        assert_eq!(pieces.iter().map(|p| p.1).sum::<u32>(), n as u32);
        assert_eq!(pieces.iter().map(|p| p.0).collect::<String>(), data);
    }

    #[test]
    fn an_event_longer_than_a_frame_is_cut_and_counted_on_its_last_piece() {
        let long = format!("data: {}\n\n", "y".repeat(FRAME_TARGET + 10));
        let data = format!("data: a\n\n{long}data: b\n\n");
        let pieces = raw_pieces(&data, 3);
        assert_eq!(pieces[0], ("data: a\n\n", 1));
        assert_eq!(pieces.iter().map(|p| p.1).sum::<u32>(), 3);
        assert_eq!(pieces.iter().map(|p| p.0).collect::<String>(), data);
        assert!(pieces.iter().all(|p| p.0.len() <= FRAME_TARGET));
    }
}
