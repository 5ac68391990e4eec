//! The gateway's side of the evidence (issue 25; the format is in
//! `troop_protocol::evidence`): each answer's evidence is verified (the
//! worker's signature, the commitment), checked for what needs no model
//! (`troop_protocol::evidence::check`), counted, and kept for a while; the
//! user's acknowledgement co-signs its commitment.

use std::sync::atomic::{AtomicU64, Ordering};

use troop_protocol::evidence::{Evidence, check};

use super::*;

/// Answers whose evidence is kept (the newest).
pub const EVIDENCE_KEPT: usize = 256;

/// One answer's evidence, kept.
pub struct KeptEvidence {
    pub worker: PeerId,
    pub job_id: String,
    pub index: u32,
    pub model: String,
    pub evidence: Evidence,
    /// What the checks found (empty: consistent).
    pub violations: Vec<troop_protocol::evidence::Violation>,
}

/// Counts of the evidence this gateway received.
#[derive(Default)]
pub struct EvidenceStats {
    /// Verified (signed by the worker, commitment matching).
    pub verified: AtomicU64,
    /// Verified, but contradicting itself.
    pub inconsistent: AtomicU64,
    /// Refused: not the worker's signature, or not its commitment.
    pub refused: AtomicU64,
}

/// The request an answer's evidence belongs to.
pub(super) struct AnswerOf<'a> {
    pub worker: PeerId,
    pub job_id: &'a str,
    pub index: u32,
    pub model: &'a str,
    pub temperature: Option<f64>,
}

impl GatewayState {
    /// Verifies and checks a worker's evidence for one answer. Returns the
    /// commitment the user's acknowledgement co-signs, or `None` when the
    /// evidence is not the worker's.
    pub(super) fn on_evidence(&self, of: AnswerOf<'_>, evidence: Evidence) -> Option<String> {
        if let Err(e) = evidence.verify(&of.worker, of.job_id, of.index) {
            tracing::warn!(worker = %of.worker, job = of.job_id, index = of.index, error = %e, "evidence refused");
            self.evidence_stats.refused.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("troop_evidence_total", "outcome" => "refused").increment(1);
            return None;
        }
        self.evidence_stats.verified.fetch_add(1, Ordering::Relaxed);
        let violations = check(&evidence.tokens, of.temperature);
        if let Some(first) = violations.first() {
            tracing::warn!(
                worker = %of.worker, job = of.job_id, index = of.index,
                violations = violations.len(), at = first.at, what = first.what,
                "the worker's evidence contradicts itself"
            );
            self.evidence_stats
                .inconsistent
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!("troop_evidence_total", "outcome" => "inconsistent").increment(1);
        } else {
            metrics::counter!("troop_evidence_total", "outcome" => "consistent").increment(1);
        }
        let commitment = evidence.commitment.clone();
        if let Some(mut kept) = self.evidence.locked() {
            if kept.len() >= EVIDENCE_KEPT {
                kept.pop_front();
            }
            kept.push_back(KeptEvidence {
                worker: of.worker,
                job_id: of.job_id.to_string(),
                index: of.index,
                model: of.model.to_string(),
                evidence,
                violations,
            });
        }
        Some(commitment)
    }
}
