//! Sampled audits (issue 25): a share of a worker's answers is re-scored by
//! another worker that advertises the same weights (digest). The auditor
//! gets the same request with the answer's exact tokens forced (a grammar
//! of token ids, temperature 0, logprobs on) and returns its own signed
//! evidence; the two must agree token for token ([`compare`]). Auditors
//! are asked in turn (at most [`MAX_AUDITORS`]) until one passes the answer
//! or two fail it and agree with each other (`AuditReport::judge`, the
//! coordinator's rule too); an auditor another contradicts is counted as
//! outvoted. A worker with a confirmed failure gets no more requests from
//! this gateway, and every verdict is reported to the coordinator.
//!
//! Neither the worker nor the auditor can tell which answers are audited:
//! the gateway decides after the answer, at random, and picks the auditor
//! at random; to the auditor an audit is a paid request like any other.

use rand::seq::SliceRandom as _;
use serde_json::Value;
pub use troop_protocol::audit::{AUDIT_MEAN_NATS, Verdict, compare};
use troop_protocol::audit::{
    AuditReport, Finding, MAX_AUDITORS, Outcome, Refusal, refused_the_tokens,
};
use troop_protocol::evidence::{Evidence, TOP_K, TokenEvidence};

use super::*;

/// Every answer of a worker is audited until this many of its audits passed.
pub const AUDIT_ALL_FIRST: u64 = 20;
/// The share audited never falls below this.
pub const AUDIT_FLOOR: f64 = 0.02;
/// Audits a gateway runs at once at most; more drawn wait their turn.
pub const AUDITS_AT_ONCE: usize = 4;
/// Audits waiting or running at most; an answer drawn beyond that is not
/// audited (counted: `troop_audits_total{outcome="skipped_busy"}`).
pub const AUDITS_QUEUED: usize = 256;

/// One worker's audits as this gateway saw them.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct AuditRecord {
    /// Its answers that passed an audit (or whose failure was not confirmed).
    pub passed: u64,
    /// Its answers whose failure a second auditor confirmed.
    pub failed: u64,
    /// As an auditor: failures it reported that a second auditor contradicted.
    pub outvoted: u64,
    /// As an auditor: audits it was asked for and gave no verdict on (it
    /// refused, timed out or could not be reached); the next auditor was
    /// asked instead.
    pub declined: u64,
}

/// An answer that may be audited: who served it, where, and its signed
/// evidence.
pub struct Audited {
    pub worker: PeerId,
    pub job_id: String,
    pub index: u32,
    pub evidence: Evidence,
}

/// The audit's request body: the answer's own request, with its tokens
/// forced (`grammar` of token ids, llama.cpp's syntax), greedy, streamed,
/// with logprobs, and nothing that could end it early.
pub fn audit_body(original: &str, tokens: &[TokenEvidence], endpoint: Endpoint) -> Option<String> {
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
    if endpoint == Endpoint::Completions {
        // Here `logprobs` is the number of alternatives.
        obj.remove("top_logprobs");
        obj.insert("logprobs".into(), serde_json::json!(TOP_K));
    } else {
        obj.insert("logprobs".into(), Value::Bool(true));
        obj.insert("top_logprobs".into(), serde_json::json!(TOP_K));
    }
    Some(v.to_string())
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

/// A gateway's own record of a worker, credited with the passes the
/// coordinator verified from every gateway, unless an audit failed there.
pub fn with_published(
    mut local: AuditRecord,
    published: Option<troop_protocol::api::AuditCounts>,
) -> AuditRecord {
    if let Some(p) = published
        && p.failed == 0
    {
        local.passed = local.passed.max(p.passed);
    }
    local
}

impl GatewayState {
    /// This gateway's audit record of `worker`.
    pub fn audit_record(&self, worker: &PeerId) -> AuditRecord {
        self.audits
            .locked()
            .and_then(|a| a.get(worker).cloned())
            .unwrap_or_default()
    }

    /// What the draw goes by: this gateway's record of `worker`, with the
    /// passes the coordinator verified from every gateway when none of its
    /// audits failed there.
    fn audit_basis(&self, worker: &PeerId) -> AuditRecord {
        with_published(
            self.audit_record(worker),
            self.published_audits
                .reading()
                .and_then(|m| m.get(worker).copied()),
        )
    }

    fn note(&self, worker: PeerId, f: impl FnOnce(&mut AuditRecord)) {
        if let Some(mut a) = self.audits.locked() {
            if a.len() >= table::MAX_ENTRIES && !a.contains_key(&worker) {
                return;
            }
            f(a.entry(worker).or_default());
        }
    }

    /// Audits this answer in the background, when the draw says so (and
    /// audits are on).
    pub(super) fn maybe_audit(self: &Arc<Self>, request: &InferenceRequest, answer: Audited) {
        if !self.cfg.audit || answer.evidence.tokens.is_empty() {
            return;
        }
        if rand::random::<f64>() >= audit_chance(&self.audit_basis(&answer.worker)) {
            return;
        }
        let Some(body) = request.body.as_deref().and_then(|b| {
            audit_body(
                b,
                &answer.evidence.tokens,
                request.endpoint.unwrap_or(Endpoint::ChatCompletions),
            )
        }) else {
            return;
        };
        // A place in the queue (waiting or running), or no audit.
        let Ok(queued) = self.audits_queued.clone().try_acquire_owned() else {
            metrics::counter!("troop_audits_total", "outcome" => "skipped_busy").increment(1);
            return;
        };
        let state = self.clone();
        let mut audit = request.clone();
        audit.body = Some(body);
        audit.request_id = Some(format!("audit-{}", hex::encode(rand::random::<[u8; 6]>())));
        tokio::spawn(async move {
            // At most AUDITS_AT_ONCE run; the rest wait their turn.
            if let Ok(_slot) = state.audit_slots.clone().acquire_owned().await {
                state.audit(audit, answer).await;
            }
            drop(queued);
        });
    }

    async fn audit(self: Arc<Self>, audit: InferenceRequest, answer: Audited) {
        let worker = answer.worker;
        let tokens = &answer.evidence.tokens;
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
        // Auditors that gave verdicts before are asked first (in random
        // order); one that keeps declining goes to the back.
        auditors.sort_by_key(|a| self.audit_record(a).declined.min(3));
        // Auditors in turn until the findings settle it (the rule the
        // coordinator applies, `AuditReport::judge`): one that passes the
        // answer, or two that fail it and agree with each other.
        let mut report = AuditReport {
            model: audit.model.clone(),
            worker: worker.to_base58(),
            job_id: answer.job_id.clone(),
            index: answer.index,
            evidence: answer.evidence.clone(),
            findings: Vec::new(),
        };
        let mut verdicts = Vec::new();
        let mut judged = Err(String::new());
        for a in auditors {
            if report.findings.len() >= MAX_AUDITORS {
                break;
            }
            match self.audit_by(a, &audit, tokens).await {
                Ok((v, found)) => {
                    verdicts.push((a, v));
                    report.findings.push(found);
                }
                Err(e) => {
                    tracing::info!(auditor = %a, error = %e, "an auditor gave no verdict; asking another");
                    self.note(a, |r| r.declined += 1);
                    continue;
                }
            }
            judged = report.judge();
            if judged.is_ok() {
                break;
            }
        }
        let outcome = match (&judged, verdicts.first()) {
            (_, None) => {
                metrics::counter!("troop_audits_total", "outcome" => "no_auditor").increment(1);
                tracing::debug!(%worker, "no auditor for this answer");
                return;
            }
            (Ok(o), _) => *o,
            (Err(why), Some(_)) => {
                metrics::counter!("troop_audits_total", "outcome" => "unconfirmed").increment(1);
                tracing::info!(%worker, reason = %why, "audit failed; no two auditors agree on it");
                return;
            }
        };
        match outcome {
            Outcome::Passed => {
                // Auditors that failed an answer another passed were wrong.
                let wrong: Vec<PeerId> = verdicts
                    .iter()
                    .filter(|(_, v)| matches!(v, Verdict::Fail(_)))
                    .map(|(a, _)| *a)
                    .collect();
                let label = if wrong.is_empty() {
                    "passed"
                } else {
                    "outvoted"
                };
                metrics::counter!("troop_audits_total", "outcome" => label).increment(1);
                if !wrong.is_empty() {
                    tracing::warn!(%worker, outvoted = ?wrong, "an auditor's failure was contradicted by another auditor");
                }
                self.note(worker, |r| r.passed += 1);
                for a in wrong {
                    self.note(a, |r| r.outvoted += 1);
                }
            }
            Outcome::Failed => {
                metrics::counter!("troop_audits_total", "outcome" => "failed").increment(1);
                let why: Vec<String> = verdicts
                    .iter()
                    .map(|(a, v)| format!("{a}: {v:?}"))
                    .collect();
                tracing::warn!(
                    %worker, findings = ?why,
                    "audit failed and confirmed: this gateway sends the worker no more requests"
                );
                self.note(worker, |r| r.failed += 1);
                if let Some(mut x) = self.audit_failed.writing() {
                    x.insert(worker);
                }
            }
        }
        self.report(report).await;
    }

    /// Tells the coordinator what the auditors found (`POST /audits`): it
    /// checks the signatures and the numbers itself, counts the audit in
    /// the worker's record and, for a confirmed failure, refunds the
    /// session and may suspend the worker.
    async fn report(&self, report: AuditReport) {
        match self.client.report_audit(&report).await {
            Ok(v) => tracing::info!(
                worker = %report.worker,
                outcome = %v.get("outcome").and_then(serde_json::Value::as_str).unwrap_or("?"),
                refunded = %v.get("refunded_milli").and_then(serde_json::Value::as_i64).unwrap_or(0),
                suspended = %v.get("suspended").and_then(serde_json::Value::as_bool).unwrap_or(false),
                "audit reported to the coordinator"
            ),
            Err(e) => {
                metrics::counter!("troop_audit_reports_failed_total").increment(1);
                tracing::warn!(worker = %report.worker, error = %e, "the coordinator did not take the audit report");
            }
        }
    }

    /// Runs one audit on `auditor`: `Ok` with its verdict and its signed
    /// finding, `Err` when the auditor could not be asked (unreachable,
    /// busy, no ticket) or failed for a reason of its own.
    async fn audit_by(
        self: &Arc<Self>,
        auditor: PeerId,
        audit: &InferenceRequest,
        tokens: &[TokenEvidence],
    ) -> Result<(Verdict, Finding), String> {
        // The auditor's model server refused: a verdict only when the
        // refusal is signed and says it cannot force the tokens (not this
        // model's: out of its vocabulary, or a sequence it cannot produce).
        let refused = |refusal: Option<Box<Refusal>>, message: &str| match refusal {
            Some(r) if refused_the_tokens(&r.message) => {
                let finding = Finding {
                    auditor: auditor.to_base58(),
                    job_id: r.job_id.clone(),
                    index: r.index,
                    evidence: None,
                    refusal: Some(*r),
                };
                let v = finding.verdict(tokens)?;
                Ok((v, finding))
            }
            _ => Err(format!("the auditor refused: {message}")),
        };
        let mut claim = self.claim_on(auditor);
        let mut job = match self.try_worker(&mut claim, audit).await {
            Ok(job) => job,
            Err(dispatch::Attempt::Final(DispatchError::Rejected {
                status, refusal, ..
            })) => return refused(refusal, &format!("status {status}")),
            Err(dispatch::Attempt::Next(Skip::Refused {
                code: Some(ErrorCode::UpstreamFailed),
                message,
                refusal,
            })) => return refused(refusal, &message),
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
                // The auditor's own trouble (its server away, a timeout) is
                // no verdict; a signed grammar refusal is.
                Some(Frame::Error {
                    message, refusal, ..
                }) => return refused(refusal.map(Box::new), &message),
                Some(_) | None => return Err("the audit's answer ended early".into()),
            }
        }
        let theirs = job
            .evidence_signed
            .take()
            .ok_or("the auditor sent no evidence")?;
        let finding = Finding {
            auditor: auditor.to_base58(),
            job_id: job.job_id.clone(),
            index: job.index,
            evidence: Some(theirs),
            refusal: None,
        };
        let v = finding.verdict(tokens)?;
        Ok((v, finding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(v: &[(u32, f32)]) -> Vec<TokenEvidence> {
        v.iter()
            .map(|&(id, lp)| TokenEvidence::chosen(id, lp))
            .collect()
    }

    #[test]
    fn the_audit_forces_the_answer_s_tokens_on_the_same_request() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false,"temperature":1.3,"stop":["\n"],"max_tokens":100,"tools":[{"type":"function"}]}"#;
        let b: Value = serde_json::from_str(
            &audit_body(
                body,
                &toks(&[(57, -1.0), (5248, -2.0)]),
                Endpoint::ChatCompletions,
            )
            .expect("body"),
        )
        .expect("json");
        assert_eq!(b["grammar"], "root ::= <[57]> <[5248]>");
        assert_eq!(b["max_tokens"], 2);
        assert_eq!(b["temperature"], 0);
        assert_eq!(b["stream"], true);
        assert_eq!(b["logprobs"], true);
        assert!(b.get("stop").is_none());
        // On the completions endpoint `logprobs` is a count.
        let c: Value = serde_json::from_str(
            &audit_body(
                r#"{"model":"m","prompt":"hi","stream":false}"#,
                &toks(&[(57, -1.0)]),
                Endpoint::Completions,
            )
            .expect("body"),
        )
        .expect("json");
        assert_eq!(
            (c["logprobs"].clone(), c.get("top_logprobs")),
            (serde_json::json!(TOP_K), None)
        );
        assert_eq!(c["grammar"], "root ::= <[57]>");
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
        // A clean record at the coordinator counts here; one with a failure
        // does not.
        let published = |passed, failed| Some(troop_protocol::api::AuditCounts { passed, failed });
        assert_eq!(with_published(r(3), published(5_000, 0)).passed, 5_000);
        assert_eq!(with_published(r(3), published(5_000, 1)).passed, 3);
        assert_eq!(with_published(r(30), published(5, 0)).passed, 30);
        assert_eq!(with_published(r(3), None).passed, 3);
    }
}
