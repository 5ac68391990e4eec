//! Sessions and usage signed by both sides.
//!
//! A ticket buys a session: up to its reservation of one worker's time for
//! one user. The gateway numbers the requests it sends under a session
//! (`index` 0, 1, 2, ...). After each request (completed, cut by the user or
//! failed) the gateway sends the worker an [`Ack`] signed with the user's
//! ed25519 key: what it received and how long it waited from sending the
//! request to the last chunk. The worker's session receipt lists every
//! request with its own times and the user's ack; the coordinator charges
//! each request `min(worker ms, acknowledged ms)`, an unacknowledged one at
//! most the unacknowledged cap, all within the window from the ticket's issue
//! to the receipt's arrival ([`charge_session`]).

use base64::Engine;
use libp2p_identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};

use crate::identity::public_key_of;

/// What the user signs, in UTF-8:
/// `troop-ack-v1\n{job_id}\n{worker}\n{index}\n{chunks}\n{completion_tokens}\n{observed_ms}`.
pub fn ack_message(
    job_id: &str,
    worker: &str,
    index: u32,
    chunks: u64,
    completion_tokens: u64,
    observed_ms: u64,
) -> String {
    format!(
        "troop-ack-v1\n{job_id}\n{worker}\n{index}\n{chunks}\n{completion_tokens}\n{observed_ms}"
    )
}

/// A user's acknowledgement of one request of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The session (the ticket's `jti`).
    pub job_id: String,
    /// The worker that served it (PeerId).
    pub worker: String,
    /// The request's number within the session.
    pub index: u32,
    /// Chunks of text the gateway received.
    pub chunks: u64,
    /// Completion tokens the gateway saw (from the worker's `done`, else its chunks).
    pub completion_tokens: u64,
    /// Milliseconds from sending the request to the last chunk (or to the
    /// moment the user left).
    pub observed_ms: u64,
    /// The commitment of the worker's evidence for this request
    /// (`sha256:<hex>`, see [`crate::evidence`]), when it sent one: the user
    /// signs it too, so neither side can change later what was served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// ed25519 signature by the user of [`ack_message`], followed by
    /// `\n<evidence>` when `evidence` is set; base64 (standard, padded).
    pub signature: String,
}

impl Ack {
    pub fn sign(
        user: &Keypair,
        job_id: &str,
        worker: &str,
        index: u32,
        chunks: u64,
        completion_tokens: u64,
        observed_ms: u64,
    ) -> Ack {
        Self::sign_with_evidence(
            user,
            job_id,
            worker,
            index,
            chunks,
            completion_tokens,
            observed_ms,
            None,
        )
    }

    /// [`sign`](Self::sign), co-signing the worker's evidence commitment.
    #[allow(clippy::too_many_arguments)]
    pub fn sign_with_evidence(
        user: &Keypair,
        job_id: &str,
        worker: &str,
        index: u32,
        chunks: u64,
        completion_tokens: u64,
        observed_ms: u64,
        evidence: Option<&str>,
    ) -> Ack {
        let mut ack = Ack {
            job_id: job_id.to_string(),
            worker: worker.to_string(),
            index,
            chunks,
            completion_tokens,
            observed_ms,
            evidence: evidence.map(String::from),
            signature: String::new(),
        };
        // Signing with an ed25519 key cannot fail.
        let sig = user.sign(ack.signed_text().as_bytes()).unwrap_or_default();
        ack.signature = base64::engine::general_purpose::STANDARD.encode(sig);
        ack
    }

    /// What the user signs: [`ack_message`] of the fields, and the
    /// commitment to the worker's evidence on a line of its own when the
    /// ack carries one.
    fn signed_text(&self) -> String {
        let fields = ack_message(
            &self.job_id,
            &self.worker,
            self.index,
            self.chunks,
            self.completion_tokens,
            self.observed_ms,
        );
        match &self.evidence {
            Some(c) => format!("{fields}\n{c}"),
            None => fields,
        }
    }

    /// Whether `user` signed exactly this ack.
    pub fn verify(&self, user: &PeerId) -> bool {
        let Some(key) = public_key_of(user) else {
            return false;
        };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(&self.signature) else {
            return false;
        };
        key.verify(self.signed_text().as_bytes(), &sig)
    }
}

/// How one request of a session ended, on the worker's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineStatus {
    Completed,
    Failed,
    Cancelled,
}

/// One request of a session as the worker saw it. Times are unix ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestLine {
    pub index: u32,
    pub started_at: u64,
    pub finished_at: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub chunks: u64,
    pub status: LineStatus,
    /// The user's acknowledgement, when it came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<Ack>,
}

/// How far a worker's time may differ from the user's before the request
/// counts as disputed: 1 s plus 20 % of the user's time.
pub fn disputed(worker_ms: u64, observed_ms: u64) -> bool {
    worker_ms.abs_diff(observed_ms) > 1_000 + observed_ms / 5
}

/// Whether an acknowledged request counts as disputed: the two sides
/// disagree about what was delivered. A request the worker saw cut short
/// by the user (`cancelled`: the app hung up, perhaps during a pause or an
/// upstream stall) is no dispute when the worker's time is the longer: the
/// user's time stops at the last chunk before it left, the worker's when it
/// noticed, and both are right. Otherwise the times must agree within
/// [`disputed`]'s tolerance.
pub fn line_disputed(line: &RequestLine, ack: &Ack) -> bool {
    let worker_ms = line.finished_at.saturating_sub(line.started_at);
    let user_left = line.status == LineStatus::Cancelled && worker_ms >= ack.observed_ms;
    !user_left && disputed(worker_ms, ack.observed_ms)
}

/// Requests in a row, counted to the end of `lines` (sorted by index),
/// that came without an acknowledgement, starting from `streak` (the run
/// before these lines): an acknowledged request ends the run.
pub fn unacked_streak(streak: u32, lines: &[RequestLine]) -> u32 {
    lines.iter().fold(streak, |run, l| {
        if l.ack.is_some() {
            0
        } else {
            run.saturating_add(1)
        }
    })
}

/// What a session receipt is worth, and the figures reputation keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Charge {
    /// Milliseconds of the worker's time to charge.
    pub ms: u64,
    pub requests: u64,
    pub acknowledged: u64,
    pub disputed: u64,
    pub unacknowledged: u64,
}

/// Why a session receipt was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargeError {
    #[error("request {0} appears twice")]
    DuplicateIndex(u32),
    #[error("the acknowledgement of request {0} is not signed by the session's user")]
    BadSignature(u32),
    #[error("the acknowledgement of request {0} is for another session, worker or request")]
    WrongAck(u32),
    #[error("request {0} finishes before it starts")]
    Backwards(u32),
    #[error("too many requests in one receipt ({0})")]
    TooMany(usize),
}

/// Most request lines one session receipt may carry.
pub const MAX_LINES: usize = 10_000;

/// Most requests a worker serves under one session: it closes the session
/// (and files its receipt) at this many, and the gateway opens another.
/// A full session's receipt stays far inside the coordinator's 1 MiB body
/// limit (about 450 bytes a line with its ack) and [`MAX_LINES`].
pub const MAX_SESSION_REQUESTS: usize = 1_000;

/// The charging rule. Each request is charged the overlap of the worker's
/// interval with the window `[window_start_ms, window_end_ms]` (the ticket's
/// issue to the receipt's arrival), but no more than the user's
/// acknowledged milliseconds. The requests without an ack are charged
/// their overlaps too, but all of them together no more than
/// `unacked_cap_ms`: one cap per session, however many such lines a
/// receipt lists. The sum never exceeds the window's length. Every ack must be the user's
/// signature over this session, this worker and this request's index.
pub fn charge_session(
    lines: &[RequestLine],
    user: &str,
    job_id: &str,
    worker: &str,
    window_start_ms: u64,
    window_end_ms: u64,
    unacked_cap_ms: u64,
) -> Result<Charge, ChargeError> {
    charge_session_with(
        lines,
        user,
        job_id,
        worker,
        window_start_ms,
        window_end_ms,
        unacked_cap_ms,
        None,
    )
}

/// Whether each line's ack is `user`'s signature (`false` for a line
/// without one): the costly part of charging a session (a key decoded and
/// an ed25519 verification per ack), which needs nothing of the ledger, so
/// it can run anywhere before the ledger's one writer charges the session
/// with [`charge_session_with`].
pub fn ack_signatures(lines: &[RequestLine], user: &str) -> Vec<bool> {
    let signer = crate::identity::parse_account_id(user).ok();
    lines
        .iter()
        .map(|l| match (&l.ack, &signer) {
            (Some(a), Some(u)) => a.verify(u),
            _ => false,
        })
        .collect()
}

/// [`charge_session`], with each line's signature check done beforehand
/// ([`ack_signatures`] for the same lines and user) or, with `None`, here.
/// The same rule and the same errors either way: an ack naming another
/// session, worker or index is refused before its signature counts.
#[allow(clippy::too_many_arguments)]
pub fn charge_session_with(
    lines: &[RequestLine],
    user: &str,
    job_id: &str,
    worker: &str,
    window_start_ms: u64,
    window_end_ms: u64,
    unacked_cap_ms: u64,
    signatures: Option<&[bool]>,
) -> Result<Charge, ChargeError> {
    if lines.len() > MAX_LINES {
        return Err(ChargeError::TooMany(lines.len()));
    }
    let mut seen = std::collections::HashSet::new();
    let mut c = Charge::default();
    let mut total: u64 = 0;
    let mut unacked_ms: u64 = 0;
    let mut signer = None;
    for (i, l) in lines.iter().enumerate() {
        if !seen.insert(l.index) {
            return Err(ChargeError::DuplicateIndex(l.index));
        }
        if l.finished_at < l.started_at {
            return Err(ChargeError::Backwards(l.index));
        }
        let start = l.started_at.max(window_start_ms);
        let end = l.finished_at.min(window_end_ms);
        let worker_ms = end.saturating_sub(start);
        c.requests += 1;
        let charged = match &l.ack {
            Some(a) => {
                if a.job_id != job_id || a.worker != worker || a.index != l.index {
                    return Err(ChargeError::WrongAck(l.index));
                }
                let signed = match signatures {
                    Some(s) => s.get(i).copied().unwrap_or(false),
                    None => signer
                        .get_or_insert_with(|| crate::identity::parse_account_id(user).ok())
                        .as_ref()
                        .is_some_and(|u| a.verify(u)),
                };
                if !signed {
                    return Err(ChargeError::BadSignature(l.index));
                }
                c.acknowledged += 1;
                if line_disputed(l, a) {
                    c.disputed += 1;
                }
                worker_ms.min(a.observed_ms)
            }
            None => {
                c.unacknowledged += 1;
                unacked_ms = unacked_ms.saturating_add(worker_ms);
                0
            }
        };
        total = total.saturating_add(charged);
    }
    total = total.saturating_add(unacked_ms.min(unacked_cap_ms));
    c.ms = total.min(window_end_ms.saturating_sub(window_start_ms));
    Ok(c)
}

/// Hashcash for a new account's first `/authorize`: the number of leading
/// zero bits of `sha256("troop-pow-v1\n{account}\n{nonce}")`.
pub fn pow_bits(account: &str, nonce: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("troop-pow-v1\n{account}\n{nonce}").as_bytes());
    let mut bits = 0;
    for b in h.iter() {
        if *b == 0 {
            bits += 8;
        } else {
            bits += b.leading_zeros();
            break;
        }
    }
    bits
}

/// Finds a nonce with at least `bits` leading zero bits (2^bits tries on
/// average).
pub fn solve_pow(account: &str, bits: u32) -> String {
    let mut n: u64 = 0;
    loop {
        let nonce = format!("{n:x}");
        if pow_bits(account, &nonce) >= bits {
            return nonce;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::generate;
    use proptest::prelude::*;

    fn line(index: u32, s: u64, f: u64, ack: Option<Ack>) -> RequestLine {
        RequestLine {
            index,
            started_at: s,
            finished_at: f,
            prompt_tokens: 1,
            completion_tokens: 5,
            chunks: 5,
            status: LineStatus::Completed,
            ack,
        }
    }

    /// Signatures checked beforehand charge exactly as checked in place:
    /// the same charge for good acks, the same refusal for a forged one,
    /// and a wrong session still refused before its signature counts.
    #[test]
    fn signatures_checked_beforehand_charge_the_same() {
        let user = generate();
        let uid = user.public().to_peer_id().to_base58();
        let good = line(
            0,
            1_000,
            5_000,
            Some(Ack::sign(&user, "job", "w", 0, 5, 5, 3_000)),
        );
        let forged = line(
            1,
            1_000,
            5_000,
            Some(Ack::sign(&generate(), "job", "w", 1, 5, 5, 3_000)),
        );
        let bare = line(2, 1_000, 2_000, None);
        for lines in [
            vec![good.clone(), bare.clone()],
            vec![good.clone(), forged.clone()],
            vec![bare.clone()],
        ] {
            let sigs = ack_signatures(&lines, &uid);
            assert_eq!(sigs.len(), lines.len());
            let here = charge_session(&lines, &uid, "job", "w", 0, 60_000, 10_000);
            let before =
                charge_session_with(&lines, &uid, "job", "w", 0, 60_000, 10_000, Some(&sigs));
            assert_eq!(format!("{here:?}"), format!("{before:?}"));
        }
        let sigs = ack_signatures(&[good.clone(), forged.clone()], &uid);
        assert_eq!(sigs, vec![true, false]);
        let r = charge_session_with(
            &[forged],
            &uid,
            "job",
            "w",
            0,
            60_000,
            10_000,
            Some(&[true]),
        );
        assert!(r.is_ok(), "a signature vouched for is not checked again");
        let r = charge_session_with(
            &[good],
            &uid,
            "other",
            "w",
            0,
            60_000,
            10_000,
            Some(&[true]),
        );
        assert!(matches!(r, Err(ChargeError::WrongAck(0))), "{r:?}");
    }

    #[test]
    fn acks_verify_and_bind_session_worker_and_index() {
        let user = generate();
        let uid_peer = user.public().to_peer_id();
        let uid = uid_peer.to_base58();
        let a = Ack::sign(&user, "job", "w", 3, 10, 10, 1_500);
        assert!(a.verify(&uid_peer));
        let other = generate().public().to_peer_id();
        assert!(!a.verify(&other));
        let mut t = a.clone();
        t.observed_ms = 9_000;
        assert!(!t.verify(&uid_peer));
        // Charged: min(worker, observed).
        let c = charge_session(
            &[line(3, 1_000, 301_000, Some(a.clone()))],
            &uid,
            "job",
            "w",
            0,
            400_000,
            10_000,
        )
        .expect("charge");
        assert_eq!(c.ms, 1_500);
        assert_eq!((c.acknowledged, c.disputed), (1, 1));
        // Reused for another index, session or worker: refused.
        for (job, w, idx) in [("job", "w", 4), ("other", "w", 3), ("job", "x", 3)] {
            let r = charge_session(
                &[line(idx, 0, 10, Some(a.clone()))],
                &uid,
                job,
                w,
                0,
                100,
                10,
            );
            assert!(r.is_err(), "{job} {w} {idx}");
        }
        // Forged by someone else.
        let with = Ack::sign_with_evidence(&user, "job", "w", 3, 10, 10, 1_500, Some("sha256:ab"));
        assert!(with.verify(&user.public().to_peer_id()));
        let mut swapped = with.clone();
        swapped.evidence = Some("sha256:cd".into());
        assert!(
            !swapped.verify(&user.public().to_peer_id()),
            "another commitment"
        );
        swapped.evidence = None;
        assert!(
            !swapped.verify(&user.public().to_peer_id()),
            "the commitment dropped"
        );
        let forged = Ack::sign(&generate(), "job", "w", 3, 10, 10, 1_500);
        assert_eq!(
            charge_session(
                &[line(3, 0, 10, Some(forged))],
                &uid,
                "job",
                "w",
                0,
                100,
                10
            ),
            Err(ChargeError::BadSignature(3))
        );
    }

    #[test]
    fn unacknowledged_requests_cost_at_most_the_cap_and_times_stay_in_the_window() {
        let uid = generate().public().to_peer_id().to_base58();
        let c = charge_session(
            &[line(0, 0, 300_000, None), line(1, 0, 300_000, None)],
            &uid,
            "j",
            "w",
            0,
            1_000_000,
            10_000,
        )
        .expect("charge");
        assert_eq!(
            c.ms, 10_000,
            "one cap for the session's unacknowledged lines"
        );
        assert_eq!(c.unacknowledged, 2);
        // Ten overlapping unacknowledged lines filed after a 25 s wait take
        // no more than one: the cap, not ten caps (was 29 s, the window).
        let ten: Vec<RequestLine> = (0..10).map(|i| line(i, 0, 25_000, None)).collect();
        let c = charge_session(&ten, &uid, "j", "w", 0, 29_000, 10_000).expect("charge");
        assert_eq!(c.ms, 10_000);
        // Short unacknowledged lines are charged what they took.
        let c = charge_session(
            &[line(0, 0, 2_000, None), line(1, 3_000, 6_000, None)],
            &uid,
            "j",
            "w",
            0,
            29_000,
            10_000,
        )
        .expect("charge");
        assert_eq!(c.ms, 5_000);
        // Times before the ticket or after the receipt count for nothing.
        let c = charge_session(&[line(0, 0, 50, None)], &uid, "j", "w", 100, 200, 10_000)
            .expect("charge");
        assert_eq!(c.ms, 0);
        let c = charge_session(
            &[line(0, 150, 10_000, None)],
            &uid,
            "j",
            "w",
            100,
            200,
            10_000,
        )
        .expect("charge");
        assert_eq!(c.ms, 50);
        assert!(charge_session(&[line(0, 5, 4, None)], &uid, "j", "w", 0, 9, 1).is_err());
        assert!(
            charge_session(
                &[line(0, 0, 1, None), line(0, 0, 1, None)],
                &uid,
                "j",
                "w",
                0,
                9,
                1
            )
            .is_err()
        );
    }

    #[test]
    fn a_user_who_left_is_not_a_dispute_but_a_disagreement_is() {
        let user = generate();
        let uid = user.public().to_peer_id().to_base58();
        // The user left 1 s in, during a pause; the worker noticed at 6 s.
        let ack = Ack::sign(&user, "j", "w", 0, 3, 3, 1_000);
        let mut left = line(0, 0, 6_000, Some(ack.clone()));
        left.status = LineStatus::Cancelled;
        let c = charge_session(&[left], &uid, "j", "w", 0, 60_000, 10_000).expect("charge");
        assert_eq!((c.acknowledged, c.disputed, c.ms), (1, 0, 1_000));
        // The same times on a request both sides say completed disagree.
        let done = line(0, 0, 6_000, Some(ack));
        let c = charge_session(&[done], &uid, "j", "w", 0, 60_000, 10_000).expect("charge");
        assert_eq!(c.disputed, 1);
        // "Cancelled" excuses only the worker's time being the longer: a
        // user who waited 6 s for a worker that says it stopped at 1 s
        // disagrees.
        let waited = Ack::sign(&user, "j", "w", 0, 3, 3, 6_000);
        let mut short = line(0, 0, 1_000, Some(waited));
        short.status = LineStatus::Cancelled;
        let c = charge_session(&[short], &uid, "j", "w", 0, 60_000, 10_000).expect("charge");
        assert_eq!(c.disputed, 1);
    }

    #[test]
    fn the_unacknowledged_run_counts_requests_not_sessions() {
        let user = generate();
        let acked = |i| line(i, 0, 1, Some(Ack::sign(&user, "j", "w", i, 1, 1, 1)));
        // One acknowledged request, then 25 without: a run of 25, whatever
        // the session's first line was.
        let mut lines = vec![acked(0)];
        lines.extend((1..26).map(|i| line(i, 0, 1, None)));
        assert_eq!(unacked_streak(0, &lines), 25);
        assert_eq!(unacked_streak(7, &lines[1..]), 32);
        // An acknowledgement at the end ends the run.
        lines.push(acked(26));
        assert_eq!(unacked_streak(30, &lines), 0);
    }

    #[test]
    fn a_full_session_receipt_fits_the_coordinator_body_limit() {
        let user = generate();
        let worker = generate().public().to_peer_id().to_base58();
        let job = "0123456789abcdef0123456789abcdef0123";
        let big = u64::MAX / 2;
        let lines: Vec<RequestLine> = (0..MAX_SESSION_REQUESTS as u32)
            .map(|i| RequestLine {
                index: i,
                started_at: big,
                finished_at: big,
                prompt_tokens: big,
                completion_tokens: big,
                chunks: big,
                status: LineStatus::Cancelled,
                ack: Some(Ack::sign(&user, job, &worker, i, big, big, big)),
            })
            .collect();
        let bytes = serde_json::to_vec(&lines).expect("json").len();
        assert!(bytes < 1024 * 1024 - 4096, "{bytes} bytes");
        const { assert!(MAX_SESSION_REQUESTS <= MAX_LINES) };
    }

    #[test]
    fn pow_is_found_and_checked() {
        let n = solve_pow("12D3KooWx", 8);
        assert!(pow_bits("12D3KooWx", &n) >= 8);
    }

    proptest! {
        #[test]
        fn a_charge_never_exceeds_the_window_the_acks_or_the_caps(
            spans in proptest::collection::vec((0u64..10_000, 0u64..10_000, proptest::option::of(0u64..20_000)), 0..12),
            ws in 0u64..5_000, wl in 0u64..20_000, cap in 0u64..5_000,
        ) {
            let user = generate();
            let uid = user.public().to_peer_id().to_base58();
            let lines: Vec<RequestLine> = spans.iter().enumerate().map(|(i, (s, d, obs))| {
                let ack = obs.map(|o| Ack::sign(&user, "j", "w", i as u32, 1, 1, o));
                line(i as u32, *s, s + d, ack)
            }).collect();
            let c = charge_session(&lines, &uid, "j", "w", ws, ws + wl, cap).expect("charge");
            prop_assert!(c.ms <= wl);
            let acked: u64 = lines.iter().filter_map(|l| l.ack.as_ref().map(|a| {
                a.observed_ms.min(l.finished_at - l.started_at)
            })).sum();
            let unacked: u64 = lines.iter().filter(|l| l.ack.is_none())
                .map(|l| l.finished_at - l.started_at).sum();
            prop_assert!(c.ms <= acked + unacked.min(cap));
            prop_assert_eq!(c.requests, lines.len() as u64);
            prop_assert_eq!(c.acknowledged + c.unacknowledged, c.requests);
        }
    }
}
