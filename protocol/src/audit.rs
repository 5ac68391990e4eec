//! Audits of what a worker served (issue 25), as the gateway runs them and
//! the coordinator re-checks them.
//!
//! An auditor (another worker advertising the same weights) re-scores an
//! answer's exact tokens (forced decoding) and signs its own evidence; the
//! two are compared by [`compare`]. An auditor whose model server cannot
//! produce the tokens at all (llama.cpp's grammar error: a token outside
//! its vocabulary) signs a [`Refusal`] instead. A gateway reports what its
//! auditors found to the coordinator in an [`AuditReport`]; everything in
//! it is signed by the workers themselves, so the coordinator reaches the
//! same verdict without a model ([`AuditReport::judge`]) and a reporter
//! cannot invent one.

use base64::Engine as _;
use libp2p_identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::evidence::{Evidence, TokenEvidence};
use crate::identity::public_key_of;

/// An audit fails when the two logprobs of the same forced token differ by
/// more than this on average (nats per token). Measured with
/// `scripts/audit_calibration.py` (llama.cpp on the CPU, other threads and
/// `--parallel`, 250 answers a pairing): SmolLM2-135M (Q4_1) re-scores
/// identically; Gemma 3 270M (Q4_K_M) differs by up to 0.185 (p99 0.078),
/// since its kernels depend on how requests were batched; other weights
/// differ by several nats, or name tokens the auditor cannot force.
pub const AUDIT_MEAN_NATS: f64 = 0.3;

/// The worker's likeliest alternative at a place may differ from the
/// auditor's only when the auditor finds the two within this many nats of
/// each other (honest numeric differences are tenths of a nat at most).
pub const TOP_GAP_NATS: f32 = 1.0;

/// Auditors that must agree with each other on a failure before it
/// counts.
pub const CONFIRMATIONS: usize = 2;

/// Auditors asked about one answer at most.
pub const MAX_AUDITORS: usize = 3;

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
    // The alternatives the worker reported are the model's: its likeliest
    // is the auditor's, or close to it. (A worker that generates with a
    // cheaper model and reports the claimed model's logprobs for those
    // tokens must put the chosen token first to pass the free greedy
    // check; the claimed model ranks another first.)
    let off = answer
        .iter()
        .zip(audit)
        .filter(|(a, b)| {
            let (Some(mine), Some(theirs)) = (a.top.first(), b.top.first()) else {
                return false;
            };
            if mine.0 == theirs.0 {
                return false;
            }
            let mine_by_them = if b.id == mine.0 {
                Some(b.logprob)
            } else {
                b.top.iter().find(|(id, _)| *id == mine.0).map(|t| t.1)
            };
            mine_by_them.is_none_or(|lp| theirs.1 - lp > TOP_GAP_NATS)
        })
        .count();
    if off > 0 {
        return Verdict::Fail(format!(
            "at {off} of {} places the worker's likeliest token is not the model's",
            answer.len()
        ));
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

/// Whether a model server's error says it cannot produce the forced tokens
/// (llama.cpp's grammar error: a token outside the vocabulary, or a
/// sequence the grammar could not accept), as opposed to trouble of its own.
pub fn refused_the_tokens(message: &str) -> bool {
    message.contains("grammar")
}

/// A worker's signed statement that its model server refused request
/// `index` of session `job_id` with `message` (at most
/// [`MAX_REFUSAL_BYTES`]). Workers sign every refusal of their upstream;
/// audits use it when an auditor cannot force the tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    /// The session and the request's number in it.
    pub job_id: String,
    pub index: u32,
    pub message: String,
    /// The worker's ed25519 signature of [`refusal_message`], base64.
    pub signature: String,
}

/// The longest refusal message kept (bytes; cut at a character boundary).
pub const MAX_REFUSAL_BYTES: usize = 2_000;

/// What a worker signs for a refusal.
pub fn refusal_message(job_id: &str, index: u32, message: &str) -> String {
    format!(
        "troop-refusal-v1\n{job_id}\n{index}\nsha256:{}",
        hex::encode(Sha256::digest(message.as_bytes()))
    )
}

fn sig_b64(key: &Keypair, text: &str) -> String {
    // Signing with an ed25519 key cannot fail.
    base64::engine::general_purpose::STANDARD.encode(key.sign(text.as_bytes()).unwrap_or_default())
}

fn verify_sig(signer: &PeerId, text: &str, signature: &str) -> Result<(), String> {
    let key = public_key_of(signer).ok_or("the signer's id holds no ed25519 key")?;
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| "the signature is not base64")?;
    if key.verify(text.as_bytes(), &sig) {
        Ok(())
    } else {
        Err("the signature does not match".into())
    }
}

impl Refusal {
    pub fn sign(worker: &Keypair, job_id: &str, index: u32, message: &str) -> Self {
        let mut cut = message.len().min(MAX_REFUSAL_BYTES);
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        let message = message[..cut].to_string();
        Refusal {
            signature: sig_b64(worker, &refusal_message(job_id, index, &message)),
            job_id: job_id.to_string(),
            index,
            message,
        }
    }

    /// Whether `worker` signed this refusal.
    pub fn verify(&self, worker: &PeerId) -> Result<(), String> {
        verify_sig(
            worker,
            &refusal_message(&self.job_id, self.index, &self.message),
            &self.signature,
        )
    }
}

/// What one auditor returned for the forced tokens: its signed evidence,
/// or its signed refusal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// The auditor's peer id.
    pub auditor: String,
    /// The audit request's session and number in it (the auditor signed
    /// them; a refusal names the same).
    pub job_id: String,
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

impl Finding {
    /// The finding's verdict on `answer`, once its signature is checked.
    pub fn verdict(&self, answer: &[TokenEvidence]) -> Result<Verdict, String> {
        let auditor: PeerId = self
            .auditor
            .parse()
            .map_err(|_| format!("auditor {} is not a peer id", self.auditor))?;
        match (&self.evidence, &self.refusal) {
            (Some(e), None) => {
                e.verify(&auditor, &self.job_id, self.index)
                    .map_err(|w| format!("auditor {}: {w}", self.auditor))?;
                Ok(compare(answer, &e.tokens))
            }
            (None, Some(r)) => {
                if r.job_id != self.job_id || r.index != self.index {
                    return Err(format!(
                        "auditor {}'s refusal is for another request",
                        self.auditor
                    ));
                }
                r.verify(&auditor)
                    .map_err(|w| format!("auditor {}'s refusal: {w}", self.auditor))?;
                if refused_the_tokens(&r.message) {
                    Ok(Verdict::Fail(format!(
                        "the auditor's model server could not force the tokens: {}",
                        r.message
                    )))
                } else {
                    Err(format!(
                        "auditor {} refused for a reason of its own",
                        self.auditor
                    ))
                }
            }
            _ => Err("a finding holds either evidence or a refusal".into()),
        }
    }
}

/// A gateway's report of one audited answer (`POST /audits`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    pub model: String,
    /// The audited worker's peer id, its session and the request's number.
    pub worker: String,
    pub job_id: String,
    pub index: u32,
    /// The worker's signed evidence of the answer.
    pub evidence: Evidence,
    /// What the auditors found, in the order they were asked.
    pub findings: Vec<Finding>,
}

/// The verdict a report supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An auditor re-scored the answer within the rule.
    Passed,
    /// At least [`CONFIRMATIONS`] auditors, and every one asked, found it
    /// failing.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
        }
    }
}

/// Whether two failing findings say the same of the tokens: both refused
/// them, or both re-scored them to the same numbers (by the audit rule).
/// Honest auditors of one model agree with each other; a lying or broken
/// one (another model, canned numbers) does not, so two of them cannot
/// confirm a failure of an honest worker between them.
pub fn agree(a: &Finding, b: &Finding) -> bool {
    match (&a.evidence, &b.evidence) {
        (Some(x), Some(y)) => compare(&x.tokens, &y.tokens) == Verdict::Pass,
        (None, None) => a.refusal.is_some() && b.refusal.is_some(),
        _ => false,
    }
}

impl AuditReport {
    /// Checks every signature and reaches the verdict from the signed
    /// numbers alone: `passed` when an auditor passes the answer, `failed`
    /// when none does and two auditors that fail it agree with each other
    /// ([`agree`]); `Err` says why the report proves nothing.
    pub fn judge(&self) -> Result<Outcome, String> {
        let worker: PeerId = self
            .worker
            .parse()
            .map_err(|_| format!("worker {} is not a peer id", self.worker))?;
        self.evidence
            .verify(&worker, &self.job_id, self.index)
            .map_err(|w| format!("the worker's evidence: {w}"))?;
        if self.findings.is_empty() {
            return Err("the report names no auditor".into());
        }
        if self.findings.len() > MAX_AUDITORS {
            return Err(format!("at most {MAX_AUDITORS} auditors per answer"));
        }
        let mut seen = std::collections::HashSet::new();
        let mut failing = Vec::new();
        for f in &self.findings {
            if f.auditor == self.worker {
                return Err("a worker cannot audit itself".into());
            }
            if !seen.insert(f.auditor.as_str()) {
                return Err(format!("auditor {} is named twice", f.auditor));
            }
            match f.verdict(&self.evidence.tokens)? {
                Verdict::Pass => return Ok(Outcome::Passed),
                Verdict::Fail(_) => failing.push(f),
            }
        }
        let confirmed = failing
            .iter()
            .enumerate()
            .any(|(i, a)| failing[i + 1..].iter().any(|b| agree(a, b)));
        if confirmed {
            Ok(Outcome::Failed)
        } else {
            Err(format!(
                "a failure needs {CONFIRMATIONS} auditors that agree with each other; {} failed it and none agree",
                failing.len()
            ))
        }
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
        // The same chosen numbers, but the worker claims its token was the
        // likeliest where the model ranks another far above it.
        let tok = |lp: f32, top: Vec<(u32, f32)>| {
            vec![TokenEvidence {
                id: 1,
                logprob: lp,
                top,
            }]
        };
        let near_claimed = tok(-0.5, vec![(1, -0.5), (4, -0.6)]);
        let near_model = tok(-0.5, vec![(4, -0.2), (1, -0.5)]);
        assert_eq!(
            compare(&near_claimed, &near_model),
            Verdict::Pass,
            "a near tie"
        );
        let claimed = tok(-2.0, vec![(1, -2.0), (4, -2.5)]);
        assert_eq!(compare(&claimed, &claimed), Verdict::Pass);
        let model = tok(-2.0, vec![(4, -0.1), (1, -2.0)]);
        assert!(matches!(compare(&claimed, &model), Verdict::Fail(w) if w.contains("likeliest")));
    }

    fn finding(key: &Keypair, job: &str, tokens: Option<Vec<TokenEvidence>>) -> Finding {
        let (evidence, refusal) = match tokens {
            Some(t) => (Some(Evidence::sign(key, job, 0, t)), None),
            None => (
                None,
                Some(Refusal::sign(
                    key,
                    job,
                    0,
                    "failed to parse grammar: token 70000 is out of range",
                )),
            ),
        };
        Finding {
            auditor: key.public().to_peer_id().to_base58(),
            job_id: job.into(),
            index: 0,
            evidence,
            refusal,
        }
    }

    #[test]
    fn a_report_is_judged_from_its_signatures_and_numbers_alone() {
        let worker = crate::identity::generate();
        let (a1, a2) = (crate::identity::generate(), crate::identity::generate());
        let served = toks(&[(1, -0.5), (2, -1.25)]);
        let other = toks(&[(1, -3.5), (2, -0.05)]);
        let report = |findings| AuditReport {
            model: "m".into(),
            worker: worker.public().to_peer_id().to_base58(),
            job_id: "job".into(),
            index: 3,
            evidence: Evidence::sign(&worker, "job", 3, served.clone()),
            findings,
        };
        // Two auditors that disagree with the worker and agree with each
        // other, by numbers or by refusing the tokens.
        let failed = report(vec![finding(&a1, "j1", None), finding(&a2, "j2", None)]);
        assert_eq!(failed.judge(), Ok(Outcome::Failed));
        let by_numbers = report(vec![
            finding(&a1, "j1", Some(other.clone())),
            finding(&a2, "j2", Some(other.clone())),
        ]);
        assert_eq!(by_numbers.judge(), Ok(Outcome::Failed));
        // Two that fail it but disagree with each other (another model,
        // canned numbers) confirm nothing; a third that agrees with one does.
        let third = crate::identity::generate();
        let canned = toks(&[(7, -0.01), (8, -0.01)]);
        let split = report(vec![
            finding(&a1, "j1", Some(other.clone())),
            finding(&a2, "j2", Some(canned.clone())),
        ]);
        assert!(split.judge().is_err());
        let mut settled = split.clone();
        settled
            .findings
            .push(finding(&third, "j3", Some(other.clone())));
        assert_eq!(settled.judge(), Ok(Outcome::Failed));
        let mixed = report(vec![
            finding(&a1, "j1", Some(other.clone())),
            finding(&a2, "j2", None),
        ]);
        assert!(mixed.judge().is_err(), "a refusal and numbers do not agree");
        // One is not enough; one that agrees is a pass.
        assert!(
            report(vec![finding(&a1, "j1", Some(other.clone()))])
                .judge()
                .is_err()
        );
        let passed = report(vec![
            finding(&a1, "j1", Some(other.clone())),
            finding(&a2, "j2", Some(served.clone())),
        ]);
        assert_eq!(passed.judge(), Ok(Outcome::Passed));
        // The same auditor twice, or the worker auditing itself, prove nothing.
        let twice = report(vec![
            finding(&a1, "j1", Some(other.clone())),
            finding(&a1, "j2", None),
        ]);
        assert!(twice.judge().is_err());
        let itself = report(vec![finding(&worker, "j1", Some(served.clone()))]);
        assert!(itself.judge().is_err());
        // A reporter cannot change the numbers, the worker's or an auditor's.
        let mut forged = failed.clone();
        forged.evidence.tokens[0].logprob = -9.0;
        assert!(forged.judge().is_err());
        let mut forged = by_numbers.clone();
        if let Some(e) = forged.findings[0].evidence.as_mut() {
            e.tokens = served.clone();
            e.commitment = crate::evidence::commitment(&e.tokens);
        }
        assert!(forged.judge().is_err());
        // Nor claim a refusal the auditor did not sign, or one for another reason.
        let mut forged = failed.clone();
        if let Some(r) = forged.findings[1].refusal.as_mut() {
            r.message = "grammar: made up".into();
        }
        assert!(forged.judge().is_err());
        let mut busy = finding(&a2, "j2", None);
        busy.refusal = Some(Refusal::sign(&a2, "j2", 0, "the server is busy"));
        assert!(
            report(vec![finding(&a1, "j1", Some(other)), busy])
                .judge()
                .is_err()
        );
    }
}
