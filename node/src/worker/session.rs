//! The worker's session book: which tickets are open, which request indices
//! each has taken, the lines served and the acknowledgements received, and
//! when a session closes and what its receipt says.
//!
//! Pure: no sockets, no clock. Every method takes the time as an argument
//! (unix milliseconds), so the rules are unit-tested with a fake clock; the
//! serving code holds the book behind a mutex and passes `unix_ms()`.

use std::collections::{HashMap, HashSet};

use troop_protocol::receipt::{JobStatus, Receipt};
use troop_protocol::ticket::TicketClaims;
use troop_protocol::usage::{Ack, LineStatus, RequestLine};

/// A user whose gateway left this many requests in a row unacknowledged
/// gets no new session from this worker.
pub const MAX_UNACKED_IN_A_ROW: u32 = 20;

/// Most users whose unacknowledged run the book remembers; when full, only
/// the runs that block a user are kept.
pub const MAX_UNACKED_USERS: usize = 10_000;

/// One open session: a ticket serving every request of its user until the
/// reservation is used up, the ticket expires or it sits idle.
#[derive(Debug, Clone)]
pub struct Session {
    pub claims: TicketClaims,
    pub ticket: String,
    /// The reservation in milliseconds of this worker's time.
    pub limit_ms: u64,
    pub used_ms: u64,
    /// Requests running now.
    pub active: u32,
    /// Every index taken (running, served or cut off); abandoned ones are
    /// given back.
    pub indices: HashSet<u32>,
    pub lines: Vec<RequestLine>,
    pub acks: HashMap<u32, Ack>,
    /// The commitment of the evidence each request's answer carried: an
    /// ack that co-signs another is dropped when the session closes.
    pub commitments: HashMap<u32, String>,
    /// Unix ms of the last request start, end or abandon.
    pub last_activity_ms: u64,
    /// Sequence number of this session's last journal entry: its next
    /// request waits until that entry is on disk.
    pub journaled: u64,
}

/// When sessions close.
#[derive(Debug, Clone, Copy)]
pub struct CloseRules {
    /// A session quiet this long closes.
    pub idle_ms: u64,
    /// A finished session (expired, used up or full) waits at most this long
    /// for its last acknowledgements.
    pub grace_ms: u64,
    /// Requests a session may carry.
    pub max_requests: usize,
}

/// Every open session, and each user's run of unacknowledged requests.
#[derive(Debug, Default)]
pub struct SessionBook {
    /// The exact ticket text -> its jti.
    by_ticket: HashMap<String, String>,
    by_jti: HashMap<String, Session>,
    /// Requests per user, in a row, that came without an acknowledgement.
    unacked: HashMap<String, u32>,
}

/// How a request ended: its line's status, tokens and chunks.
#[derive(Debug, Clone)]
pub struct LineEnd {
    pub status: LineStatus,
    pub usage: troop_protocol::frames::Usage,
    pub chunks: u64,
    /// The commitment of the evidence the answer carried.
    pub commitment: Option<String>,
}

/// What an acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    Kept,
    /// No open session has that job id (late, or junk).
    NoSession,
    /// Not for this worker, for an index the session never took, or not
    /// signed by the session's user.
    Refused,
}

impl SessionBook {
    pub fn open_count(&self) -> usize {
        self.by_jti.len()
    }

    /// Takes a place for request `index` in the open session of `ticket`.
    /// `Ok(None)`: no session has this ticket (verify it, then [`open`]).
    ///
    /// [`open`]: Self::open
    pub fn join(
        &mut self,
        ticket: &str,
        index: u32,
        now_ms: u64,
        max_requests: usize,
    ) -> Result<Option<TicketClaims>, String> {
        let Some(jti) = self.by_ticket.get(ticket) else {
            return Ok(None);
        };
        let Some(sess) = self.by_jti.get_mut(jti) else {
            return Ok(None);
        };
        if now_ms / 1000 >= sess.claims.exp {
            return Err("the session's ticket expired".into());
        }
        if sess.used_ms >= sess.limit_ms {
            return Err("the session's reservation is used up".into());
        }
        if sess.indices.len() >= max_requests {
            return Err(format!(
                "the session is full ({max_requests} requests); open another"
            ));
        }
        if !sess.indices.insert(index) {
            return Err(format!("request {index} of this session was already sent"));
        }
        sess.active += 1;
        sess.last_activity_ms = now_ms;
        let claims = sess.claims.clone();
        self.check();
        Ok(Some(claims))
    }

    /// Opens the session of a verified ticket with request `index` running.
    /// A ticket another request opened meanwhile is joined instead.
    pub fn open(
        &mut self,
        ticket: &str,
        claims: TicketClaims,
        limit_ms: u64,
        index: u32,
        now_ms: u64,
        max_requests: usize,
    ) -> Result<TicketClaims, String> {
        if let Some(c) = self.join(ticket, index, now_ms, max_requests)? {
            return Ok(c);
        }
        if self.unacked.get(&claims.sub).copied().unwrap_or(0) >= MAX_UNACKED_IN_A_ROW {
            return Err(format!(
                "{MAX_UNACKED_IN_A_ROW} requests in a row went unacknowledged: this worker serves users whose gateway signs its usage"
            ));
        }
        if self.by_jti.contains_key(&claims.jti) {
            // The same jti under another ticket text: one session per jti.
            return Err("this ticket's session is open under another ticket text".into());
        }
        self.by_ticket
            .insert(ticket.to_string(), claims.jti.clone());
        self.by_jti.insert(
            claims.jti.clone(),
            Session {
                claims: claims.clone(),
                ticket: ticket.to_string(),
                limit_ms,
                used_ms: 0,
                active: 1,
                indices: HashSet::from([index]),
                lines: Vec::new(),
                acks: HashMap::new(),
                commitments: HashMap::new(),
                last_activity_ms: now_ms,
                journaled: 0,
            },
        );
        self.check();
        Ok(claims)
    }

    /// Request `index` was refused before it ran: it costs nothing and the
    /// index may be used again.
    pub fn abandon(&mut self, jti: &str, index: u32, now_ms: u64) {
        if let Some(sess) = self.by_jti.get_mut(jti) {
            sess.active = sess.active.saturating_sub(1);
            sess.indices.remove(&index);
            sess.last_activity_ms = now_ms;
        }
        self.check();
    }

    /// Request `index`, started at `started_ms`, ended at `now_ms`: its line
    /// is kept for the receipt and its time counts against the reservation.
    /// Returns the line kept (`None`: no such session).
    pub fn finish(
        &mut self,
        jti: &str,
        index: u32,
        started_ms: u64,
        now_ms: u64,
        end: LineEnd,
    ) -> Option<RequestLine> {
        let finished = now_ms.max(started_ms);
        let mut kept = None;
        if let Some(sess) = self.by_jti.get_mut(jti) {
            sess.active = sess.active.saturating_sub(1);
            sess.used_ms = sess.used_ms.saturating_add(finished - started_ms);
            sess.last_activity_ms = now_ms;
            if let Some(c) = end.commitment {
                sess.commitments.insert(index, c);
            }
            sess.lines.push(RequestLine {
                index,
                started_at: started_ms,
                finished_at: finished,
                prompt_tokens: end.usage.prompt_tokens,
                completion_tokens: end.usage.completion_tokens,
                chunks: end.chunks,
                status: end.status,
                ack: None,
            });
            kept = sess.lines.last().cloned();
        }
        self.check();
        kept
    }

    /// Opens again a session read back from the journal after a restart
    /// (nothing running). A session of that ticket or jti already open
    /// wins.
    pub fn restore(&mut self, sess: Session) -> bool {
        if self.by_ticket.contains_key(&sess.ticket) || self.by_jti.contains_key(&sess.claims.jti) {
            return false;
        }
        self.by_ticket
            .insert(sess.ticket.clone(), sess.claims.jti.clone());
        self.by_jti.insert(sess.claims.jti.clone(), sess);
        self.check();
        true
    }

    /// Sets the sequence number of a session's last journal entry.
    pub fn set_journaled(&mut self, jti: &str, seq: u64) {
        if let Some(s) = self.by_jti.get_mut(jti) {
            s.journaled = s.journaled.max(seq);
        }
    }

    /// Sequence number of a session's last journal entry (0: none).
    pub fn journaled(&self, jti: &str) -> u64 {
        self.by_jti.get(jti).map_or(0, |s| s.journaled)
    }

    /// The ticket expiry (unix s) of an open session.
    pub fn exp(&self, jti: &str) -> Option<u64> {
        self.by_jti.get(jti).map(|s| s.claims.exp)
    }

    /// Keeps a user's acknowledgement for the session's receipt (checked
    /// here too, so that junk is not stored; the coordinator checks it
    /// again). The first one for an index wins.
    pub fn ack(&mut self, ack: Ack, worker: &str) -> AckOutcome {
        let Some(sess) = self.by_jti.get_mut(&ack.job_id) else {
            return AckOutcome::NoSession;
        };
        let Ok(user) = troop_protocol::identity::parse_account_id(&sess.claims.sub) else {
            return AckOutcome::Refused;
        };
        if ack.worker != worker || !sess.indices.contains(&ack.index) || !ack.verify(&user) {
            return AckOutcome::Refused;
        }
        sess.acks.entry(ack.index).or_insert(ack);
        AckOutcome::Kept
    }

    /// Closes the sessions due at `now_ms`: none running, and either quiet
    /// for `idle_ms`, or finished (expired, used up or full) with every line
    /// acknowledged or quiet for `grace_ms`. Each comes back with its acks
    /// on its lines, sorted by index; each user's unacknowledged run is
    /// brought up to date.
    pub fn close_due(&mut self, now_ms: u64, rules: CloseRules) -> Vec<Session> {
        let now_secs = now_ms / 1000;
        let due: Vec<String> = self
            .by_jti
            .iter()
            .filter(|(_, x)| {
                let quiet = now_ms.saturating_sub(x.last_activity_ms);
                let all_acked = x.lines.iter().all(|l| x.acks.contains_key(&l.index));
                x.active == 0
                    && (quiet >= rules.idle_ms
                        || ((now_secs >= x.claims.exp
                            || x.used_ms >= x.limit_ms
                            || x.indices.len() >= rules.max_requests)
                            && (all_acked || quiet >= rules.grace_ms)))
            })
            .map(|(j, _)| j.clone())
            .collect();
        let closed = due.iter().filter_map(|j| self.close(j)).collect();
        self.check();
        closed
    }

    /// Closes every session at once (the worker is stopping), running or
    /// not.
    pub fn close_all(&mut self) -> Vec<Session> {
        let all: Vec<String> = self.by_jti.keys().cloned().collect();
        all.iter().filter_map(|j| self.close(j)).collect()
    }

    fn close(&mut self, jti: &str) -> Option<Session> {
        let mut sess = self.by_jti.remove(jti)?;
        self.by_ticket.remove(&sess.ticket);
        for l in sess.lines.iter_mut() {
            l.ack = sess.acks.remove(&l.index);
            // The user's ack co-signs the evidence the worker sent, or none
            // (a gateway that did not check it); never other evidence.
            let sent = sess.commitments.get(&l.index);
            if let Some(a) = &l.ack
                && a.evidence.is_some()
                && a.evidence.as_ref() != sent
            {
                metrics::counter!("troop_bad_acks_total", "reason" => "evidence").increment(1);
                tracing::warn!(job = %jti, index = l.index, "an acknowledgement co-signs evidence this worker did not send; dropped");
                l.ack = None;
            }
        }
        sess.lines.sort_by_key(|l| l.index);
        let user = sess.claims.sub.clone();
        let before = self.unacked.get(&user).copied().unwrap_or(0);
        let run = troop_protocol::usage::unacked_streak(before, &sess.lines);
        if run == 0 {
            self.unacked.remove(&user);
        } else {
            if self.unacked.len() >= MAX_UNACKED_USERS {
                self.unacked.retain(|_, r| *r >= MAX_UNACKED_IN_A_ROW);
            }
            if self.unacked.len() < MAX_UNACKED_USERS || self.unacked.contains_key(&user) {
                self.unacked.insert(user, run);
            }
        }
        Some(sess)
    }

    /// The invariants, checked after every change in debug builds: the two
    /// maps agree, and no session runs more requests than it took indices
    /// for.
    fn check(&self) {
        if cfg!(debug_assertions) {
            debug_assert_eq!(self.by_ticket.len(), self.by_jti.len());
            for (ticket, jti) in &self.by_ticket {
                let sess = self.by_jti.get(jti);
                debug_assert!(sess.is_some_and(|s| &s.ticket == ticket));
            }
            for s in self.by_jti.values() {
                debug_assert!(s.active as usize + s.lines.len() <= s.indices.len());
            }
        }
    }
}

/// The receipt of a closed session, or `None` when it served nothing.
pub fn receipt(sess: Session, worker: &str) -> Option<Receipt> {
    if sess.lines.is_empty() {
        return None;
    }
    let mut lines = sess.lines;
    lines.sort_by_key(|l| l.index);
    let status = if lines.iter().any(|l| l.status == LineStatus::Completed) {
        JobStatus::Completed
    } else if lines.iter().any(|l| l.status == LineStatus::Cancelled) {
        JobStatus::Cancelled
    } else {
        JobStatus::Failed
    };
    Some(Receipt {
        job_id: sess.claims.jti.clone(),
        worker: worker.to_string(),
        user: sess.claims.sub.clone(),
        model: sess.claims.model.clone(),
        prompt_tokens: lines.iter().map(|l| l.prompt_tokens).sum(),
        completion_tokens: lines.iter().map(|l| l.completion_tokens).sum(),
        started_at: lines.iter().map(|l| l.started_at).min().unwrap_or(0),
        finished_at: lines.iter().map(|l| l.finished_at).max().unwrap_or(0),
        status,
        requests: lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;
    use troop_protocol::frames::Usage;

    const WORKER: &str = "12D3KooWorker";
    const RULES: CloseRules = CloseRules {
        idle_ms: 30_000,
        grace_ms: 2_000,
        max_requests: 3,
    };

    fn claims(user: &Keypair, jti: &str, exp_secs: u64) -> TicketClaims {
        TicketClaims {
            iss: "troop-coordinator".into(),
            sub: user.public().to_peer_id().to_base58(),
            aud: WORKER.into(),
            model: "m".into(),
            jti: jti.into(),
            iat: 0,
            nbf: 0,
            exp: exp_secs,
            max_tokens: None,
            reserved_milli: 300_000,
        }
    }

    fn usage() -> Usage {
        Usage {
            prompt_tokens: 3,
            completion_tokens: 5,
        }
    }

    fn done(chunks: u64) -> LineEnd {
        LineEnd {
            status: LineStatus::Completed,
            usage: usage(),
            chunks,
            commitment: None,
        }
    }

    fn ack(user: &Keypair, jti: &str, index: u32) -> Ack {
        Ack::sign(user, jti, WORKER, index, 5, 5, 100)
    }

    #[test]
    fn an_ack_that_co_signs_other_evidence_than_the_answer_carried_is_dropped() {
        let user = troop_protocol::identity::generate();
        let mut b = SessionBook::default();
        b.open("t", claims(&user, "j", 3_600), 300_000, 0, 1_000, 3)
            .expect("open");
        let sent = |i: u32| LineEnd {
            commitment: Some(format!("sha256:{i}")),
            ..done(5)
        };
        for i in 0..3 {
            if i > 0 {
                assert!(b.join("t", i, 1_000, 3).expect("join").is_some());
            }
            b.finish("j", i, 1_000, 1_100, sent(i));
        }
        let with = |i: u32, evidence: Option<&str>| {
            Ack::sign_with_evidence(&user, "j", WORKER, i, 5, 5, 100, evidence)
        };
        // The commitment sent, none (a gateway that did not check it), another.
        assert_eq!(b.ack(with(0, Some("sha256:0")), WORKER), AckOutcome::Kept);
        assert_eq!(b.ack(with(1, None), WORKER), AckOutcome::Kept);
        assert_eq!(b.ack(with(2, Some("sha256:9")), WORKER), AckOutcome::Kept);
        let closed = b.close_due(1_100 + 30_000, RULES);
        let acked: Vec<bool> = closed[0].lines.iter().map(|l| l.ack.is_some()).collect();
        assert_eq!(acked, vec![true, true, false]);
    }

    #[test]
    fn a_session_serves_its_requests_and_closes_idle_with_its_acks_on_its_lines() {
        let user = troop_protocol::identity::generate();
        let mut b = SessionBook::default();
        assert_eq!(b.join("t", 0, 1_000, 3), Ok(None));
        b.open("t", claims(&user, "j", 3_600), 300_000, 0, 1_000, 3)
            .expect("open");
        b.finish("j", 0, 1_000, 1_400, done(5));
        assert!(b.join("t", 1, 2_000, 3).expect("join").is_some());
        b.finish("j", 1, 2_000, 2_100, done(5));
        assert_eq!(b.ack(ack(&user, "j", 1), WORKER), AckOutcome::Kept);
        assert_eq!(b.ack(ack(&user, "j", 0), WORKER), AckOutcome::Kept);
        // Not due while quiet for less than the idle time.
        assert!(b.close_due(2_100 + 29_999, RULES).is_empty());
        let closed = b.close_due(2_100 + 30_000, RULES);
        assert_eq!(closed.len(), 1);
        assert_eq!(b.open_count(), 0);
        let s = &closed[0];
        assert_eq!(s.used_ms, 500);
        assert_eq!(
            s.lines.iter().map(|l| l.index).collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert!(s.lines.iter().all(|l| l.ack.is_some()));
        let r = receipt(closed[0].clone(), WORKER).expect("a receipt");
        assert_eq!(r.status, JobStatus::Completed);
        assert_eq!((r.started_at, r.finished_at), (1_000, 2_100));
        assert_eq!(r.completion_tokens, 10);
    }

    #[test]
    fn an_index_is_taken_once_and_an_abandoned_one_may_be_sent_again() {
        let user = troop_protocol::identity::generate();
        let mut b = SessionBook::default();
        b.open("t", claims(&user, "j", 3_600), 300_000, 0, 0, 3)
            .expect("open");
        assert!(b.join("t", 0, 10, 3).is_err(), "index 0 twice");
        b.abandon("j", 0, 20);
        assert!(b.join("t", 0, 30, 3).expect("join").is_some());
        // A running request keeps the session open however quiet it is.
        assert!(b.close_due(10_000_000, RULES).is_empty());
    }

    #[test]
    fn a_full_expired_or_used_up_session_refuses_and_closes_once_acked_or_after_the_grace() {
        let user = troop_protocol::identity::generate();
        let mut b = SessionBook::default();
        b.open("t", claims(&user, "j", 3_600), 300_000, 0, 0, 3)
            .expect("open");
        for i in 0..3 {
            if i > 0 {
                b.join("t", i, 0, 3).expect("join").expect("open");
            }
            b.finish("j", i, 0, 10, done(1));
        }
        assert!(b.join("t", 3, 20, 3).expect_err("refused").contains("full"));
        // Full, two of three acked: waits for the grace...
        b.ack(ack(&user, "j", 0), WORKER);
        b.ack(ack(&user, "j", 1), WORKER);
        assert!(b.close_due(1_000, RULES).is_empty());
        // ...or closes at once when the last ack comes.
        b.ack(ack(&user, "j", 2), WORKER);
        assert_eq!(b.close_due(1_000, RULES).len(), 1);

        b.open("u", claims(&user, "k", 5), 100, 0, 0, 3)
            .expect("open");
        b.finish("k", 0, 0, 100, done(1));
        assert!(
            b.join("u", 1, 200, 3)
                .expect_err("refused")
                .contains("used up")
        );
        assert!(
            b.join("u", 1, 5_000, 3)
                .expect_err("refused")
                .contains("expired")
        );
        assert!(b.close_due(1_999 + 100, RULES).is_empty());
        assert_eq!(b.close_due(2_000 + 100, RULES).len(), 1, "after the grace");
    }

    #[test]
    fn acks_of_others_for_untaken_indices_or_unknown_jobs_are_refused() {
        let user = troop_protocol::identity::generate();
        let other = troop_protocol::identity::generate();
        let mut b = SessionBook::default();
        b.open("t", claims(&user, "j", 3_600), 300_000, 0, 0, 3)
            .expect("open");
        assert_eq!(b.ack(ack(&other, "j", 0), WORKER), AckOutcome::Refused);
        assert_eq!(b.ack(ack(&user, "j", 7), WORKER), AckOutcome::Refused);
        assert_eq!(
            b.ack(ack(&user, "j", 0), "someone-else"),
            AckOutcome::Refused
        );
        assert_eq!(b.ack(ack(&user, "x", 0), WORKER), AckOutcome::NoSession);
        assert_eq!(b.ack(ack(&user, "j", 0), WORKER), AckOutcome::Kept);
    }

    #[test]
    fn a_user_who_never_acknowledges_is_refused_new_sessions_after_the_run() {
        let user = troop_protocol::identity::generate();
        let mut b = SessionBook::default();
        let mut now = 0;
        for n in 0..MAX_UNACKED_IN_A_ROW {
            let jti = format!("j{n}");
            b.open(&jti, claims(&user, &jti, 3_600), 300_000, 0, now, 1)
                .expect("open");
            b.finish(&jti, 0, now, now + 10, done(1));
            now += 10 + RULES.grace_ms;
            assert_eq!(
                b.close_due(
                    now,
                    CloseRules {
                        max_requests: 1,
                        ..RULES
                    }
                )
                .len(),
                1
            );
        }
        let err = b
            .open("last", claims(&user, "last", 3_600), 300_000, 0, now, 1)
            .expect_err("refused");
        assert!(err.contains("unacknowledged"), "{err}");
    }

    #[test]
    fn a_ticket_opened_twice_at_once_is_one_session() {
        let user = troop_protocol::identity::generate();
        let mut b = SessionBook::default();
        // Two requests verified the same new ticket concurrently.
        b.open("t", claims(&user, "j", 3_600), 300_000, 0, 0, 3)
            .expect("first");
        b.open("t", claims(&user, "j", 3_600), 300_000, 1, 0, 3)
            .expect("second joins");
        assert_eq!(b.open_count(), 1);
        let all = b.close_all();
        assert_eq!(all[0].indices.len(), 2);
        assert_eq!(all[0].active, 2);
    }
}
