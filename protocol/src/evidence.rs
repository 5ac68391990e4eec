//! Evidence of what a worker served (issue 25): for every generated token,
//! the id the model chose, its log-probability and the model's top
//! [`TOP_K`] alternatives, as the worker's upstream reported them. The
//! worker ends the answer with the evidence, a commitment to it (SHA-256 of
//! [`commitment_bytes`]) and its signature of the commitment; the user's
//! acknowledgement repeats the commitment, so that neither side can later
//! change what was served. A gateway checks what needs no model
//! ([`check`]); audits (a second worker re-scoring the tokens) compare
//! against the same evidence.

use base64::Engine as _;
use libp2p_identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::identity::public_key_of;

/// Alternatives kept per token.
pub const TOP_K: usize = 5;

/// Tokens of evidence kept per answer at most (a longer answer's evidence
/// covers its first `MAX_TOKENS` tokens).
pub const MAX_TOKENS: usize = 8_192;

/// One generated token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEvidence {
    /// The token's id in the model's vocabulary.
    pub id: u32,
    /// Its natural-log probability under the model (before sampling).
    pub logprob: f32,
    /// The model's most likely tokens at this place, most likely first:
    /// `[id, logprob]` pairs, at most [`TOP_K`].
    #[serde(default)]
    pub top: Vec<(u32, f32)>,
}

impl TokenEvidence {
    /// A token with no alternatives recorded.
    pub fn chosen(id: u32, logprob: f32) -> Self {
        TokenEvidence {
            id,
            logprob,
            top: Vec::new(),
        }
    }
}

/// A worker's evidence for one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub tokens: Vec<TokenEvidence>,
    /// `sha256:<hex>` of [`commitment_bytes`] of `tokens`.
    pub commitment: String,
    /// The worker's ed25519 signature (its libp2p key) of
    /// [`evidence_message`], base64 (standard, padded).
    pub signature: String,
}

/// The bytes the commitment hashes: per token, its id (u32, big-endian),
/// its logprob (f32 bits, big-endian), the number of alternatives (u8) and
/// each alternative's id and logprob the same way.
pub fn commitment_bytes(tokens: &[TokenEvidence]) -> Vec<u8> {
    let mut out = Vec::with_capacity(tokens.len() * (9 + TOP_K * 8));
    for t in tokens {
        out.extend_from_slice(&t.id.to_be_bytes());
        out.extend_from_slice(&t.logprob.to_bits().to_be_bytes());
        let k = t.top.len().min(usize::from(u8::MAX));
        out.push(k as u8);
        for (id, lp) in t.top.iter().take(k) {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&lp.to_bits().to_be_bytes());
        }
    }
    out
}

/// `sha256:<hex>` of the evidence.
pub fn commitment(tokens: &[TokenEvidence]) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(commitment_bytes(tokens)))
    )
}

/// What the worker signs: the session, the request's number in it and the
/// commitment.
pub fn evidence_message(job_id: &str, index: u32, commitment: &str) -> String {
    format!("troop-evidence-v1\n{job_id}\n{index}\n{commitment}")
}

impl Evidence {
    /// The evidence of `tokens`, committed and signed by `worker`.
    pub fn sign(worker: &Keypair, job_id: &str, index: u32, tokens: Vec<TokenEvidence>) -> Self {
        let commitment = commitment(&tokens);
        // Signing with an ed25519 key cannot fail.
        let sig = worker
            .sign(evidence_message(job_id, index, &commitment).as_bytes())
            .unwrap_or_default();
        Evidence {
            tokens,
            commitment,
            signature: base64::engine::general_purpose::STANDARD.encode(sig),
        }
    }

    /// Whether `worker` signed this evidence for request `index` of
    /// `job_id`, and the commitment is the tokens'.
    pub fn verify(&self, worker: &PeerId, job_id: &str, index: u32) -> Result<(), String> {
        if self.commitment != commitment(&self.tokens) {
            return Err("the commitment is not the evidence's".into());
        }
        let key = public_key_of(worker).ok_or("the worker's id holds no ed25519 key")?;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .map_err(|_| "the signature is not base64")?;
        if !key.verify(
            evidence_message(job_id, index, &self.commitment).as_bytes(),
            &sig,
        ) {
            return Err("the worker's signature does not match".into());
        }
        Ok(())
    }
}

/// A place where the evidence contradicts itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// The token's position in the answer.
    pub at: usize,
    pub what: &'static str,
}

/// How far two logprobs the same server reported for one token may differ
/// (the chosen token's and its entry among the alternatives: both are the
/// same number printed twice).
const SAME: f32 = 1e-3;

/// The checks that need no model: every logprob finite and at most 0, the
/// alternatives in order, the chosen token's logprob the same as its entry
/// among them, a token outside them no likelier than the last of them, and
/// with greedy decoding (`temperature` 0) the chosen token the likeliest.
pub fn check(tokens: &[TokenEvidence], temperature: Option<f64>) -> Vec<Violation> {
    let greedy = temperature.is_some_and(|t| t <= 0.0);
    let mut v = Vec::new();
    for (at, t) in tokens.iter().enumerate() {
        let mut bad = |what| v.push(Violation { at, what });
        if !t.logprob.is_finite() || t.logprob > SAME {
            bad("a logprob that is not a log-probability");
            continue;
        }
        if t.top.len() > TOP_K {
            bad("more alternatives than asked for");
        }
        if t.top.iter().any(|(_, lp)| !lp.is_finite() || *lp > SAME) {
            bad("an alternative's logprob is not a log-probability");
            continue;
        }
        if t.top.windows(2).any(|w| w[1].1 > w[0].1 + SAME) {
            bad("the alternatives are not in order");
        }
        match t.top.iter().find(|(id, _)| *id == t.id) {
            Some((_, lp)) if (lp - t.logprob).abs() > SAME => {
                bad("the chosen token's logprob differs from its entry among the alternatives")
            }
            None if t.top.len() >= TOP_K
                && t.top
                    .last()
                    .is_some_and(|(_, last)| t.logprob > last + SAME) =>
            {
                bad("a token likelier than an alternative is missing from them")
            }
            _ => {}
        }
        if greedy
            && let Some((_, best)) = t.top.first()
            && t.logprob + SAME < *best
        {
            bad("greedy decoding chose a token that was not the likeliest");
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(id: u32, lp: f32, top: &[(u32, f32)]) -> TokenEvidence {
        TokenEvidence {
            id,
            logprob: lp,
            top: top.to_vec(),
        }
    }

    #[test]
    fn signed_evidence_verifies_and_any_change_is_refused() {
        let key = crate::identity::generate();
        let peer = key.public().to_peer_id();
        let tokens = vec![
            tok(57, -2.25, &[(57, -2.25), (19556, -2.39)]),
            tok(5248, -0.15, &[(5248, -0.15), (744, -3.6)]),
        ];
        let e = Evidence::sign(&key, "job", 3, tokens);
        assert_eq!(e.verify(&peer, "job", 3), Ok(()));
        assert!(e.verify(&peer, "job", 4).is_err(), "another request");
        assert!(e.verify(&peer, "other", 3).is_err(), "another session");
        let stranger = crate::identity::generate().public().to_peer_id();
        assert!(e.verify(&stranger, "job", 3).is_err(), "another worker");
        let mut tampered = e.clone();
        tampered.tokens[1].logprob = -0.1;
        assert!(
            tampered.verify(&peer, "job", 3).is_err(),
            "a changed logprob"
        );
        let mut recommitted = tampered.clone();
        recommitted.commitment = commitment(&recommitted.tokens);
        assert!(
            recommitted.verify(&peer, "job", 3).is_err(),
            "a new commitment without the worker's signature"
        );
        // The commitment is over exact bits: an id changes it too.
        let mut other = e.tokens.clone();
        other[0].id = 58;
        assert_ne!(commitment(&other), e.commitment);
    }

    #[test]
    fn honest_evidence_passes_and_each_inconsistency_is_named() {
        let honest = vec![
            tok(57, -2.2564542, &[(57, -2.2564542), (19556, -2.3952272)]),
            tok(5248, -0.14922045, &[(5248, -0.14922045), (744, -3.6178675)]),
        ];
        assert!(check(&honest, Some(1.0)).is_empty());
        // Sampling at temperature 1 may choose the second likeliest.
        let sampled = vec![tok(2, -1.0, &[(1, -0.5), (2, -1.0)])];
        assert!(check(&sampled, Some(1.0)).is_empty());
        assert!(check(&sampled, None).is_empty());
        let what = |t: Vec<TokenEvidence>, temp| {
            check(&t, temp)
                .into_iter()
                .map(|v| v.what)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            what(sampled.clone(), Some(0.0)),
            vec!["greedy decoding chose a token that was not the likeliest"]
        );
        assert_eq!(
            what(vec![tok(1, 0.5, &[])], None),
            vec!["a logprob that is not a log-probability"]
        );
        assert_eq!(
            what(vec![tok(1, f32::NAN, &[])], None),
            vec!["a logprob that is not a log-probability"]
        );
        assert_eq!(
            what(vec![tok(1, -1.0, &[(2, -2.0), (1, -1.0)])], None),
            vec!["the alternatives are not in order"]
        );
        assert_eq!(
            what(vec![tok(1, -1.0, &[(1, -0.5), (2, -2.0)])], None),
            vec!["the chosen token's logprob differs from its entry among the alternatives"]
        );
        let five: Vec<(u32, f32)> = (10..15).map(|i| (i, -(i as f32) / 10.0)).collect();
        assert_eq!(
            what(vec![tok(1, -0.2, &five)], None),
            vec!["a token likelier than an alternative is missing from them"]
        );
        assert!(what(vec![tok(1, -3.0, &five)], None).is_empty());
    }
}
