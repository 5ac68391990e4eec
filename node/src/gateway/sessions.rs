//! The gateway's session book: for each (model, worker), the session whose
//! ticket its requests go under (with the next request index) and the
//! ticket bought ahead for when that one nears its end.
//!
//! Pure: no I/O, no clock. Every method takes the time (unix milliseconds),
//! so the reuse, expiry and renewal rules are unit-tested with a fake
//! clock; the gateway holds the book behind one mutex.

use std::collections::HashMap;

use libp2p::PeerId;
use troop_protocol::api::AuthorizeResponse;

/// A session unused for this long may have been closed by its worker
/// (workers close idle sessions after 30 s by default): buy a new one.
pub const REUSE_IDLE_MS: u64 = 20_000;
/// A session is not reused when its ticket has less than this left (s).
pub const REUSE_MIN_LEFT_SECS: u64 = 30;
/// A ticket bought ahead is not used when it has less than this left (s).
pub const SPARE_MIN_LEFT_SECS: u64 = 60;
/// Buy the next session when the open one has less than this left (s).
pub const RENEW_BEFORE_SECS: u64 = 90;

/// Sessions are per model and worker.
pub type Key = (String, PeerId);

#[derive(Debug, Clone)]
struct Open {
    auth: AuthorizeResponse,
    next_index: u32,
    last_used_ms: u64,
}

/// Where the next request to a worker goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Under the open session, as request `index`; `reused` is true.
    Open { auth: AuthorizeResponse, index: u32 },
    /// No usable session: buy a ticket (then [`SessionBook::opened`]).
    Buy,
}

#[derive(Debug, Default)]
pub struct SessionBook {
    open: HashMap<Key, Open>,
    spare: HashMap<Key, AuthorizeResponse>,
}

impl SessionBook {
    /// The session for the next request to `key`: the open one while it is
    /// fresh (used within [`REUSE_IDLE_MS`], over [`REUSE_MIN_LEFT_SECS`]
    /// left); else the ticket bought ahead, opened now (index 0, not
    /// reused); else [`Next::Buy`]. The second value says whether the
    /// session was in use before.
    pub fn next(&mut self, key: &Key, now_ms: u64) -> (Next, bool) {
        let now_s = now_ms / 1000;
        if let Some(s) = self.open.get_mut(key) {
            if s.auth.expires_at > now_s + REUSE_MIN_LEFT_SECS
                && now_ms.saturating_sub(s.last_used_ms) < REUSE_IDLE_MS
            {
                let index = s.next_index;
                s.next_index += 1;
                s.last_used_ms = now_ms;
                return (
                    Next::Open {
                        auth: s.auth.clone(),
                        index,
                    },
                    true,
                );
            }
            self.open.remove(key);
        }
        match self
            .spare
            .remove(key)
            .filter(|t| t.expires_at > now_s + SPARE_MIN_LEFT_SECS)
        {
            Some(auth) => {
                self.opened(key.clone(), auth.clone(), now_ms);
                (Next::Open { auth, index: 0 }, false)
            }
            None => (Next::Buy, false),
        }
    }

    /// A ticket just bought for `key` opens its session; its first request
    /// is index 0.
    pub fn opened(&mut self, key: Key, auth: AuthorizeResponse, now_ms: u64) {
        self.open.insert(
            key,
            Open {
                auth,
                next_index: 1,
                last_used_ms: now_ms,
            },
        );
    }

    /// The worker closed the session of `job_id`: forget it (a newer
    /// session for the same key is kept).
    pub fn closed(&mut self, key: &Key, job_id: &str) {
        if self.open.get(key).is_some_and(|s| s.auth.job_id == job_id) {
            self.open.remove(key);
        }
    }

    /// Whether to buy the next ticket for `key` now: its session ends within
    /// [`RENEW_BEFORE_SECS`] and none is bought ahead yet.
    pub fn wants_renewal(&self, key: &Key, now_ms: u64) -> bool {
        let now_s = now_ms / 1000;
        self.open
            .get(key)
            .is_some_and(|s| s.auth.expires_at < now_s + RENEW_BEFORE_SECS)
            && !self.spare.contains_key(key)
    }

    /// Keeps a ticket bought ahead for `key` (the first one wins).
    pub fn add_spare(&mut self, key: Key, auth: AuthorizeResponse) {
        self.spare.entry(key).or_insert(auth);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(job: &str, expires_at: u64) -> AuthorizeResponse {
        AuthorizeResponse {
            ticket: format!("t-{job}"),
            job_id: job.into(),
            worker: "w".into(),
            model: "m".into(),
            reserved: 300.0,
            expires_at,
            kid: "k".into(),
        }
    }

    fn key() -> Key {
        ("m".into(), PeerId::random())
    }

    const T0: u64 = 1_000_000_000;

    #[test]
    fn a_session_is_reused_with_growing_indices_until_it_idles() {
        let mut b = SessionBook::default();
        let k = key();
        assert_eq!(b.next(&k, T0), (Next::Buy, false));
        b.opened(k.clone(), auth("a", T0 / 1000 + 600), T0);
        for i in 1..4 {
            let (n, reused) = b.next(&k, T0 + i * 1_000);
            assert!(reused);
            assert_eq!(
                n,
                Next::Open {
                    auth: auth("a", T0 / 1000 + 600),
                    index: i as u32
                }
            );
        }
        // Quiet for the reuse limit: the worker may have closed it.
        let last = T0 + 3_000;
        assert_eq!(b.next(&k, last + REUSE_IDLE_MS), (Next::Buy, false));
    }

    #[test]
    fn a_session_near_its_expiry_is_renewed_ahead_and_the_spare_takes_over() {
        let mut b = SessionBook::default();
        let k = key();
        let exp = T0 / 1000 + 100;
        b.opened(k.clone(), auth("a", exp), T0);
        assert!(!b.wants_renewal(&k, T0), "100 s left is over 90");
        let later = T0 + 15_000;
        assert!(b.wants_renewal(&k, later));
        b.add_spare(k.clone(), auth("b", exp + 600));
        assert!(!b.wants_renewal(&k, later), "one bought ahead is enough");
        // Still fresh: the open one is used.
        assert!(matches!(b.next(&k, later).0, Next::Open { index: 1, .. }));
        // Under 30 s left: the spare opens as a new session.
        let near = (exp - REUSE_MIN_LEFT_SECS) * 1000;
        assert_eq!(
            b.next(&k, near),
            (
                Next::Open {
                    auth: auth("b", exp + 600),
                    index: 0
                },
                false
            )
        );
        assert!(matches!(
            b.next(&k, near + 1).0,
            Next::Open { index: 1, .. }
        ));
    }

    #[test]
    fn a_spare_too_close_to_its_expiry_is_not_used() {
        let mut b = SessionBook::default();
        let k = key();
        b.add_spare(k.clone(), auth("s", T0 / 1000 + SPARE_MIN_LEFT_SECS));
        assert_eq!(b.next(&k, T0), (Next::Buy, false));
    }

    #[test]
    fn a_closed_session_is_forgotten_but_not_a_newer_one() {
        let mut b = SessionBook::default();
        let k = key();
        b.opened(k.clone(), auth("a", T0 / 1000 + 600), T0);
        b.closed(&k, "old");
        assert!(matches!(b.next(&k, T0 + 1).0, Next::Open { .. }));
        b.closed(&k, "a");
        assert_eq!(b.next(&k, T0 + 2), (Next::Buy, false));
    }
}
