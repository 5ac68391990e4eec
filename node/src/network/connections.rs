//! The connection table: every open connection per peer and whether a
//! relay carries it, when each peer connected, the relay under each
//! relayed connection, the streams in use per peer, and the path
//! (direct, relayed, none) the rest of the program reads. Which peers a
//! trim closes is decided by [`super::trim::to_close`] from this table.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use libp2p::PeerId;
use libp2p::swarm::ConnectionId;
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

use super::Path;
use super::trim;

/// Streams of ours in use per peer, and when the last one ended: a peer
/// with one in use is never trimmed, the others least recently used first.
pub(super) type Busy = Arc<std::sync::Mutex<HashMap<PeerId, (usize, Instant)>>>;

pub(super) struct Connections {
    /// Every open connection, per peer: whether a relay carries it.
    conns: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    /// When each connected peer's newest connection was established.
    since: HashMap<PeerId, Instant>,
    /// The relay under each relayed connection (ours to a peer behind a
    /// relay, or a peer's to us through our reservation).
    circuits: HashMap<ConnectionId, PeerId>,
    busy: Busy,
    /// Connection trimming; `None` on a relay (it trims nothing).
    trim: Option<trim::Limits>,
    /// What [`super::NetworkHandle::path`] reads.
    paths: Arc<RwLock<HashMap<PeerId, Path>>>,
}

impl Connections {
    pub(super) fn new(
        busy: Busy,
        paths: Arc<RwLock<HashMap<PeerId, Path>>>,
        trim: Option<trim::Limits>,
    ) -> Self {
        Self {
            conns: HashMap::new(),
            since: HashMap::new(),
            circuits: HashMap::new(),
            busy,
            trim,
            paths,
        }
    }

    /// Connected peers.
    pub(super) fn len(&self) -> usize {
        self.conns.len()
    }

    pub(super) fn is_connected(&self, peer: &PeerId) -> bool {
        self.conns.contains_key(peer)
    }

    /// At least one connection to `peer` that no relay carries.
    pub(super) fn has_direct(&self, peer: &PeerId) -> bool {
        self.conns
            .get(peer)
            .is_some_and(|c| c.values().any(|relayed| !relayed))
    }

    /// Whether this one connection to `peer` is a direct one.
    pub(super) fn is_direct(&self, peer: &PeerId, id: &ConnectionId) -> bool {
        self.conns
            .get(peer)
            .and_then(|c| c.get(id))
            .is_some_and(|relayed| !relayed)
    }

    /// Records a new connection (`relay`: the relay under it, when one
    /// carries it). True when it is a direct connection next to a relayed
    /// one: the relayed one can go once no stream uses it.
    pub(super) fn established(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        relayed: bool,
        relay: Option<PeerId>,
        now: Instant,
    ) -> bool {
        // The newest connection's time: the grace covers it (a direct
        // connection that just replaced a relayed one).
        self.since.insert(peer, now);
        if let Some(r) = relay.filter(|_| relayed) {
            self.circuits.insert(id, r);
        }
        let c = self.conns.entry(peer).or_default();
        c.insert(id, relayed);
        let upgraded = !relayed && c.values().any(|r| *r);
        metrics::gauge!("troop_peers_connected").set(self.conns.len() as f64);
        self.update_path(peer);
        upgraded
    }

    /// Forgets a closed connection (and the peer with its last one, and
    /// its last use unless a job of ours still runs on it).
    pub(super) fn closed(&mut self, peer: PeerId, id: ConnectionId) {
        self.circuits.remove(&id);
        if let Some(c) = self.conns.get_mut(&peer) {
            c.remove(&id);
            if c.is_empty() {
                self.conns.remove(&peer);
                self.since.remove(&peer);
                if let Some(mut b) = self.busy.locked()
                    && b.get(&peer).is_some_and(|(n, _)| *n == 0)
                {
                    b.remove(&peer);
                }
            }
        }
        metrics::gauge!("troop_peers_connected").set(self.conns.len() as f64);
        self.update_path(peer);
    }

    /// The relayed connections to `peer` that can be closed because a
    /// direct one exists (none otherwise).
    pub(super) fn relayed_beside_direct(&self, peer: &PeerId) -> Vec<ConnectionId> {
        let Some(c) = self.conns.get(peer) else {
            return Vec::new();
        };
        if !c.values().any(|relayed| !relayed) {
            return Vec::new();
        }
        c.iter()
            .filter(|(_, relayed)| **relayed)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Peers reached only through a relay.
    pub(super) fn relayed_peers(&self) -> Vec<PeerId> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.is_empty() && c.values().all(|r| *r))
            .map(|(p, _)| *p)
            .collect()
    }

    /// The peers a trim closes now, with the limits it used; `None` when
    /// this node does not trim (a relay). `keep`: peers something else
    /// needs (gossip mesh, our relays, the warm set); the relays carrying
    /// our circuits and peers with a job running are added here.
    pub(super) fn to_trim(
        &self,
        mut keep: HashSet<PeerId>,
        now: Instant,
    ) -> Option<(Vec<PeerId>, trim::Limits)> {
        let limits = self.trim?;
        if self.conns.len() <= limits.high {
            return Some((Vec::new(), limits));
        }
        // A relay carrying one of our circuits: closing it ends the circuit
        // (a job on it, a hole punch under way).
        keep.extend(self.circuits.values().copied());
        let mut used: HashMap<PeerId, Instant> = HashMap::new();
        if let Some(b) = self.busy.locked() {
            for (p, (n, last)) in b.iter() {
                if *n > 0 {
                    keep.insert(*p);
                } else {
                    used.insert(*p, *last);
                }
            }
        }
        let peers: Vec<trim::Candidate> = self
            .conns
            .iter()
            .filter_map(|(p, c)| {
                Some(trim::Candidate {
                    peer: *p,
                    since: *self.since.get(p)?,
                    last_used: used.get(p).copied(),
                    relayed: c.values().any(|relayed| *relayed),
                    kept: keep.contains(p),
                })
            })
            .collect();
        Some((
            trim::to_close(&peers, self.conns.len(), limits, now),
            limits,
        ))
    }

    fn update_path(&mut self, peer: PeerId) {
        let path = match self.conns.get(&peer) {
            Some(c) if c.values().any(|r| !r) => Path::Direct,
            Some(c) if !c.is_empty() => Path::Relayed,
            _ => Path::None,
        };
        if let Some(mut p) = self.paths.writing() {
            if path == Path::None {
                p.remove(&peer);
            } else {
                p.insert(peer, path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn table(high: usize) -> Connections {
        Connections::new(
            Busy::default(),
            Arc::default(),
            Some(trim::Limits {
                low: 1,
                high,
                grace: Duration::ZERO,
            }),
        )
    }

    #[test]
    fn paths_follow_the_connections_and_an_upgrade_is_told() {
        let mut t = table(10);
        let (relay, peer) = (PeerId::random(), PeerId::random());
        let (c1, c2) = (
            ConnectionId::new_unchecked(1),
            ConnectionId::new_unchecked(2),
        );
        let now = Instant::now();
        assert!(!t.established(peer, c1, true, Some(relay), now));
        assert_eq!(
            t.paths.read().expect("paths").get(&peer),
            Some(&Path::Relayed)
        );
        assert_eq!(t.relayed_peers(), vec![peer]);
        assert!(t.relayed_beside_direct(&peer).is_empty());
        // A direct connection beside the relayed one: an upgrade.
        assert!(t.established(peer, c2, false, None, now));
        assert_eq!(
            t.paths.read().expect("paths").get(&peer),
            Some(&Path::Direct)
        );
        assert_eq!(t.relayed_beside_direct(&peer), vec![c1]);
        assert!(t.is_direct(&peer, &c2) && !t.is_direct(&peer, &c1));
        t.closed(peer, c1);
        assert!(t.has_direct(&peer));
        t.closed(peer, c2);
        assert!(!t.is_connected(&peer));
        assert_eq!(t.paths.read().expect("paths").get(&peer), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_trim_spares_busy_peers_and_the_relays_under_our_circuits() {
        let mut t = table(2);
        let now = Instant::now();
        let (relay, behind, busy, idle) = (
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
            PeerId::random(),
        );
        t.established(relay, ConnectionId::new_unchecked(1), false, None, now);
        t.established(
            behind,
            ConnectionId::new_unchecked(2),
            true,
            Some(relay),
            now,
        );
        t.established(busy, ConnectionId::new_unchecked(3), false, None, now);
        t.established(idle, ConnectionId::new_unchecked(4), false, None, now);
        if let Some(mut b) = t.busy.locked() {
            b.insert(busy, (1, now));
        }
        let later = now + Duration::from_secs(1);
        let (close, _) = t.to_trim(HashSet::new(), later).expect("a worker trims");
        assert_eq!(close, vec![idle]);
        // Under the high mark nothing goes; a relay trims nothing at all.
        t.closed(idle, ConnectionId::new_unchecked(4));
        t.closed(busy, ConnectionId::new_unchecked(3));
        assert!(
            t.to_trim(HashSet::new(), later)
                .expect("a worker trims")
                .0
                .is_empty()
        );
        let relay_node = Connections::new(Busy::default(), Arc::default(), None);
        assert!(relay_node.to_trim(HashSet::new(), later).is_none());
    }
}
