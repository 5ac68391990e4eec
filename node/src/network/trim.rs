//! Which connections a trim closes: pure, so its order is unit-tested.
//!
//! Above the high-water mark of connected peers, the peers nothing needs
//! are closed down to the low-water mark (go-libp2p's connection manager
//! does the same): least recently used first (a job on either side), a
//! peer never used by how long it has been connected; peers connected for
//! less than the grace time, relayed ones and kept ones are never closed.

use std::time::{Duration, Instant};

use libp2p::PeerId;

/// The water marks and the grace time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub low: usize,
    pub high: usize,
    pub grace: Duration,
}

/// One connected peer as the trim sees it.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub peer: PeerId,
    /// When its first open connection was established.
    pub since: Instant,
    /// When a job with it last ended, if ever.
    pub last_used: Option<Instant>,
    /// A relay carries one of its connections.
    pub relayed: bool,
    /// Something needs it (gossip mesh, warm set, a running job, a relay
    /// of ours).
    pub kept: bool,
}

/// The peers to close now, in the order they go: none while `connected`
/// is at most `high`, else the least recently active of those that may go,
/// as many as bring `connected` down to `low`.
pub(crate) fn to_close(
    peers: &[Candidate],
    connected: usize,
    limits: Limits,
    now: Instant,
) -> Vec<PeerId> {
    if connected <= limits.high {
        return Vec::new();
    }
    let mut candidates: Vec<(Instant, PeerId)> = peers
        .iter()
        .filter(|c| !c.kept && !c.relayed)
        .filter(|c| now.saturating_duration_since(c.since) >= limits.grace)
        .map(|c| (c.last_used.map_or(c.since, |u| c.since.max(u)), c.peer))
        .collect();
    candidates.sort_unstable();
    let excess = connected.saturating_sub(limits.low);
    candidates
        .into_iter()
        .take(excess)
        .map(|(_, p)| p)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        low: 2,
        high: 4,
        grace: Duration::from_secs(10),
    };

    fn peer(since: Instant, last_used: Option<Instant>) -> Candidate {
        Candidate {
            peer: PeerId::random(),
            since,
            last_used,
            relayed: false,
            kept: false,
        }
    }

    #[test]
    fn nothing_is_closed_at_or_under_the_high_mark() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(100);
        let peers: Vec<Candidate> = (0..4).map(|_| peer(t0, None)).collect();
        assert!(to_close(&peers, 4, LIMITS, now).is_empty());
    }

    #[test]
    fn the_least_recently_active_go_first_down_to_the_low_mark() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let now = s(1_000);
        // Connected at 0, 10, 20, 30, 40; the first two used lately.
        let peers = vec![
            peer(s(0), Some(s(900))),
            peer(s(10), Some(s(800))),
            peer(s(20), None),
            peer(s(30), None),
            peer(s(40), Some(s(50))),
        ];
        let closed = to_close(&peers, 5, LIMITS, now);
        // 5 connected, low 2: three go, oldest activity first (20, 30, 50).
        assert_eq!(closed, vec![peers[2].peer, peers[3].peer, peers[4].peer]);
    }

    #[test]
    fn kept_relayed_and_new_peers_are_never_closed() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(1_000);
        let mut kept = peer(t0, None);
        kept.kept = true;
        let mut relayed = peer(t0, None);
        relayed.relayed = true;
        let young = peer(now - Duration::from_secs(5), None);
        let old = peer(t0, None);
        let peers = vec![kept, relayed, young, old.clone()];
        // Far over the mark: only the old idle one may go.
        assert_eq!(to_close(&peers, 10, LIMITS, now), vec![old.peer]);
    }
}
