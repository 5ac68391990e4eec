//! Sampled audits (issue 25): a share of a worker's answers is re-scored by
//! another worker that advertises the same weights (digest). The auditor
//! gets the same request with the answer's exact tokens forced (a grammar
//! of token ids, temperature 0, logprobs on) and returns its own signed
//! evidence; the two must agree token for token ([`compare`]). A failed
//! audit counts only when a second auditor confirms it; an auditor the
//! second one contradicts is counted as outvoted. A worker with a confirmed
//! failure gets no more requests from this gateway.
//!
//! Neither the worker nor the auditor can tell which answers are audited:
//! the gateway decides after the answer, at random, and picks the auditor
//! at random; to the auditor an audit is a paid request like any other.

use rand::seq::SliceRandom as _;
use serde_json::Value;
use troop_protocol::evidence::{TOP_K, TokenEvidence};

use super::*;

/// Every answer of a worker is audited until this many of its audits passed.
pub const AUDIT_ALL_FIRST: u64 = 20;
/// The share audited never falls below this.
pub const AUDIT_FLOOR: f64 = 0.02;
/// An audit fails when the two logprobs of the same forced token differ by
/// more than this on average (nats per token). Measured with
/// `scripts/audit_calibration.py` (llama.cpp on the CPU, other threads and
/// `--parallel`, 250 answers a pairing): SmolLM2-135M (Q4_1) re-scores
/// identically; Gemma 3 270M (Q4_K_M) differs by up to 0.185 (p99 0.078),
/// since its kernels depend on how requests were batched; other weights
/// differ by several nats, or name tokens the auditor cannot force.
pub const AUDIT_MEAN_NATS: f64 = 0.3;

/// One worker's audits as this gateway saw them.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct AuditRecord {
    /// Its answers that passed an audit (or whose failure was not confirmed).
    pub passed: u64,
    /// Its answers whose failure a second auditor confirmed.
    pub failed: u64,
    /// As an auditor: failures it reported that a second auditor contradicted.
    pub outvoted: u64,
}

/// What an audit found.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    Fail(String),
}

/// The auditor's evidence for the forced tokens against the answer's.
pub fn compare(answer: &[TokenEvidence], audit: &[TokenEvidence]) -> Verdict {
    if audit.len() != answer.len() {
        return Verdict::Fail(format!(
            "the auditor re-scored {} tokens of {}",
            audit.len(),
            answer.len()
        ));
    }
    if let Some(i) = answer.iter().zip(audit).position(|(a, b)| a.id != b.id) {
        return Verdict::Fail(format!("token {i} is not the one forced"));
    }
    if answer.is_empty() {
        return Verdict::Pass;
    }
    let total: f64 = answer
        .iter()
        .zip(audit)
        .map(|(a, b)| f64::from((a.logprob - b.logprob).abs()))
        .sum();
    let mean = total / answer.len() as f64;
    if mean > AUDIT_MEAN_NATS {
        Verdict::Fail(format!(
            "the logprobs differ by {mean:.3} nats per token on average ({total:.2} over {} tokens)",
            answer.len()
        ))
    } else {
        Verdict::Pass
    }
}

/// The audit's request body: the answer's own request, with its tokens
/// forced (`grammar` of token ids, llama.cpp's syntax), greedy, streamed,
/// with logprobs, and nothing that could end it early.
pub fn audit_body(original: &str, tokens: &[TokenEvidence]) -> Option<String> {
    let mut v: Value = serde_json::from_str(original).ok()?;
    let obj = v.as_object_mut()?;
    for k in ["stop", "n", "max_completion_tokens", "response_format"] {
        obj.remove(k);
    }
    let grammar = format!(
        "root ::= {}",
        tokens
            .iter()
            .map(|t| format!("<[{}]>", t.id))
            .collect::<Vec<_>>()
            .join(" ")
    );
    obj.insert("grammar".into(), Value::String(grammar));
    obj.insert("stream".into(), Value::Bool(true));
    obj.insert("temperature".into(), serde_json::json!(0));
    obj.insert("max_tokens".into(), serde_json::json!(tokens.len()));
    obj.insert("logprobs".into(), Value::Bool(true));
    obj.insert("top_logprobs".into(), serde_json::json!(TOP_K));
    Some(v.to_string())
}

/// Whether an auditor's error says its model cannot produce the forced
/// tokens (llama.cpp's grammar error: a token outside the vocabulary, or one
/// the grammar could not accept), as opposed to trouble of its own.
fn refused_the_tokens(message: &str) -> bool {
    message.contains("grammar")
}

/// Whether to audit a worker's next answer: always for its first
/// [`AUDIT_ALL_FIRST`] passed audits, then with a chance falling with its
/// record to [`AUDIT_FLOOR`].
pub fn audit_chance(record: &AuditRecord) -> f64 {
    if record.passed < AUDIT_ALL_FIRST {
        1.0
    } else {
        (AUDIT_ALL_FIRST as f64 / record.passed as f64).max(AUDIT_FLOOR)
    }
}

impl GatewayState {
    /// This gateway's audit record of `worker`.
    pub fn audit_record(&self, worker: &PeerId) -> AuditRecord {
        self.audits
            .locked()
            .and_then(|a| a.get(worker).cloned())
            .unwrap_or_default()
    }

    fn note(&self, worker: PeerId, f: impl FnOnce(&mut AuditRecord)) {
        if let Some(mut a) = self.audits.locked() {
            if a.len() >= table::MAX_ENTRIES && !a.contains_key(&worker) {
                return;
            }
            f(a.entry(worker).or_default());
        }
    }

    /// Audits this answer of `worker` in the background, when the draw says
    /// so (and audits are on).
    pub(super) fn maybe_audit(
        self: &Arc<Self>,
        request: &InferenceRequest,
        worker: PeerId,
        tokens: Vec<TokenEvidence>,
    ) {
        if !self.cfg.audit || tokens.is_empty() {
            return;
        }
        if rand::random::<f64>() >= audit_chance(&self.audit_record(&worker)) {
            return;
        }
        let Some(body) = request.body.as_deref().and_then(|b| audit_body(b, &tokens)) else {
            return;
        };
        let state = self.clone();
        let mut audit = request.clone();
        audit.body = Some(body);
        audit.request_id = Some(format!("audit-{}", hex::encode(rand::random::<[u8; 6]>())));
        tokio::spawn(async move { state.audit(audit, worker, tokens).await });
    }

    async fn audit(
        self: Arc<Self>,
        audit: InferenceRequest,
        worker: PeerId,
        tokens: Vec<TokenEvidence>,
    ) {
        let digest = self
            .table
            .reading()
            .and_then(|t| t.peer_digest(&worker, &audit.model));
        let Some(digest) = digest else {
            tracing::debug!(%worker, "no audit: the worker advertises no digest");
            return;
        };
        let mut auditors: Vec<PeerId> = self
            .table
            .reading()
            .map(|t| t.candidates_for(&audit.model, false, Some(&digest)))
            .unwrap_or_default();
        // Never the worker itself, nor one caught serving other weights.
        let caught = self
            .audit_failed
            .reading()
            .map(|c| c.clone())
            .unwrap_or_default();
        auditors.retain(|p| *p != worker && !caught.contains(p));
        auditors.shuffle(&mut rand::rng());
        let mut auditors = auditors.into_iter();
        // The first auditor that can run it.
        let mut first = None;
        for a in auditors.by_ref() {
            match self.audit_by(a, &audit, &tokens).await {
                Ok(v) => {
                    first = Some((a, v));
                    break;
                }
                Err(e) => tracing::debug!(auditor = %a, error = %e, "auditor unavailable"),
            }
        }
        let Some((auditor, verdict)) = first else {
            metrics::counter!("troop_audits_total", "outcome" => "no_auditor").increment(1);
            tracing::debug!(%worker, "no auditor for this answer");
            return;
        };
        let why = match verdict {
            Verdict::Pass => {
                metrics::counter!("troop_audits_total", "outcome" => "passed").increment(1);
                tracing::debug!(%worker, %auditor, "audit passed");
                self.note(worker, |r| r.passed += 1);
                return;
            }
            Verdict::Fail(why) => why,
        };
        // A failure counts when a second auditor confirms it.
        let mut second = None;
        for a in auditors {
            if let Ok(v) = self.audit_by(a, &audit, &tokens).await {
                second = Some((a, v));
                break;
            }
        }
        match second {
            Some((confirmer, Verdict::Fail(why2))) => {
                metrics::counter!("troop_audits_total", "outcome" => "failed").increment(1);
                tracing::warn!(
                    %worker, %auditor, %confirmer, first = %why, second = %why2,
                    "audit failed and confirmed: this gateway sends the worker no more requests"
                );
                self.note(worker, |r| r.failed += 1);
                if let Some(mut x) = self.audit_failed.writing() {
                    x.insert(worker);
                }
            }
            Some((confirmer, Verdict::Pass)) => {
                metrics::counter!("troop_audits_total", "outcome" => "outvoted").increment(1);
                tracing::warn!(%worker, %auditor, %confirmer, first = %why, "an auditor's failure was contradicted by a second auditor");
                self.note(worker, |r| r.passed += 1);
                self.note(auditor, |r| r.outvoted += 1);
            }
            None => {
                metrics::counter!("troop_audits_total", "outcome" => "unconfirmed").increment(1);
                tracing::info!(%worker, %auditor, reason = %why, "audit failed; no second auditor to confirm it");
            }
        }
    }

    /// Runs one audit on `auditor`: `Ok` with its verdict, `Err` when the
    /// auditor could not be asked (unreachable, busy, no ticket).
    async fn audit_by(
        self: &Arc<Self>,
        auditor: PeerId,
        audit: &InferenceRequest,
        tokens: &[TokenEvidence],
    ) -> Result<Verdict, String> {
        let mut claim = self.claim_on(auditor);
        let mut job = match self.try_worker(&mut claim, audit).await {
            Ok(job) => job,
            // The auditor's model server refused the tokens: not this
            // model's (out of its vocabulary, or a sequence it cannot
            // produce).
            Err(dispatch::Attempt::Final(DispatchError::Rejected { status, .. })) => {
                return Ok(Verdict::Fail(format!(
                    "the auditor's model server refused the tokens ({status})"
                )));
            }
            Err(dispatch::Attempt::Next(Skip::Refused {
                code: Some(ErrorCode::UpstreamFailed),
                message,
            })) if refused_the_tokens(&message) => {
                return Ok(Verdict::Fail(format!(
                    "the auditor's model server could not force the tokens: {message}"
                )));
            }
            Err(dispatch::Attempt::Next(reason)) => return Err(reason.to_string()),
            Err(dispatch::Attempt::Final(e)) => return Err(format!("{e:?}")),
        };
        let mut next = Some(std::mem::replace(
            &mut job.first,
            Frame::Chunk {
                text: String::new(),
            },
        ));
        loop {
            let f = match next.take() {
                Some(f) => Some(f),
                None => job.next(self.cfg.idle_timeout).await?,
            };
            match f {
                Some(Frame::Raw { .. } | Frame::Chunk { .. }) => {}
                Some(Frame::Done { .. }) => break,
                Some(Frame::Error { message, .. }) if refused_the_tokens(&message) => {
                    return Ok(Verdict::Fail(format!(
                        "the auditor's model server could not force the tokens: {message}"
                    )));
                }
                // The auditor's own trouble (its server away, a timeout):
                // no verdict.
                Some(Frame::Error { message, .. }) => {
                    return Err(format!("the auditor failed: {message}"));
                }
                Some(_) | None => return Err("the audit's answer ended early".into()),
            }
        }
        let theirs = job
            .evidence_tokens
            .take()
            .ok_or("the auditor sent no evidence")?;
        Ok(compare(tokens, &theirs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: &[(u32, f32)]) -> Vec<TokenEvidence> {
        v.iter()
            .map(|(id, lp)| TokenEvidence {
                id: *id,
                logprob: *lp,
                top: vec![],
            })
            .collect()
    }

    #[test]
    fn the_same_numbers_pass_and_other_weights_fail() {
        let a = toks(&[(1, -0.5), (2, -1.25), (3, -0.01)]);
        assert_eq!(compare(&a, &a), Verdict::Pass);
        // Rounding-sized differences pass.
        let near = toks(&[(1, -0.51), (2, -1.24), (3, -0.02)]);
        assert_eq!(compare(&a, &near), Verdict::Pass);
        let other = toks(&[(1, -2.5), (2, -0.25), (3, -0.5)]);
        assert!(matches!(compare(&a, &other), Verdict::Fail(w) if w.contains("nats")));
        let wrong_token = toks(&[(1, -0.5), (9, -1.25), (3, -0.01)]);
        assert!(matches!(compare(&a, &wrong_token), Verdict::Fail(w) if w.contains("token 1")));
        assert!(matches!(compare(&a, &a[..2]), Verdict::Fail(_)));
    }

    #[test]
    fn the_audit_forces_the_answer_s_tokens_on_the_same_request() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false,"temperature":1.3,"stop":["\n"],"max_tokens":100,"tools":[{"type":"function"}]}"#;
        let b: Value = serde_json::from_str(
            &audit_body(body, &toks(&[(57, -1.0), (5248, -2.0)])).expect("body"),
        )
        .expect("json");
        assert_eq!(b["grammar"], "root ::= <[57]> <[5248]>");
        assert_eq!(b["max_tokens"], 2);
        assert_eq!(b["temperature"], 0);
        assert_eq!(b["stream"], true);
        assert_eq!(b["logprobs"], true);
        assert!(b.get("stop").is_none());
        // What shapes the prompt stays.
        assert_eq!(b["messages"][0]["content"], "hi");
        assert_eq!(b["tools"][0]["type"], "function");
    }

    #[test]
    fn every_answer_is_audited_at_first_then_fewer_down_to_the_floor() {
        let r = |passed| AuditRecord {
            passed,
            ..Default::default()
        };
        assert_eq!(audit_chance(&r(0)), 1.0);
        assert_eq!(audit_chance(&r(19)), 1.0);
        assert!((audit_chance(&r(40)) - 0.5).abs() < 1e-9);
        assert_eq!(audit_chance(&r(100_000)), AUDIT_FLOOR);
    }
}
