//! Reach: how others get to this node. AutoNAT's verdict, the relays
//! this node knows (given with `--relay`, learnt from peers that offer
//! circuit relay, or from the coordinator), the reservation it holds on
//! one of them while it needs one, the QUIC probe that shows its NAT's UDP
//! mapping, and the peers hole punching reached directly.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, identify, relay};

use super::addr::{ip_of, is_lan, is_quic, is_relayed, is_unspecified, strip_p2p, with_p2p};
use super::connections::Connections;
use super::swarm::Behaviour;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nat {
    Public,
    Private,
    Unknown,
}

impl Nat {
    fn as_str(self) -> &'static str {
        match self {
            Nat::Public => "public",
            Nat::Private => "private",
            Nat::Unknown => "unknown",
        }
    }
}

/// Our circuit listener on one relay.
struct RelayListener {
    id: ListenerId,
    relay: PeerId,
    /// The relay's address, without `/p2p`.
    addr: Multiaddr,
    /// Whether the relay accepted the reservation.
    accepted: bool,
}

/// How long a relay that refused us or went away is left alone.
const RELAY_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub(super) struct KnownRelay {
    pub peer: PeerId,
    /// Its address without `/p2p`.
    pub addr: Multiaddr,
    /// Given with `--relay` (never forgotten, asked first).
    pub explicit: bool,
}

/// Most relays learnt from peers and the coordinator that a node keeps
/// (each one a candidate for a reservation).
const MAX_LEARNT_RELAYS: usize = 64;

pub(super) struct Reach {
    /// AutoNAT's verdict in words, and as a value.
    nat_status: String,
    nat: Nat,
    /// The address of our direct outgoing connection to each peer.
    dialed: HashMap<PeerId, Multiaddr>,
    /// Relays we know.
    relays: Vec<KnownRelay>,
    /// The circuit listener asking a relay for (or holding) a reservation.
    relay_listener: Option<RelayListener>,
    /// Relays not to ask again before the given time.
    relay_backoff: HashMap<PeerId, Instant>,
    /// Peers that DCUtR reached directly.
    punched: HashSet<PeerId>,
    /// Relays we reached over TCP and dialled once more over QUIC, to learn
    /// the address our NAT gives our UDP socket (for hole punching).
    quic_probed: HashSet<PeerId>,
}

/// Our reach as `troop doctor` shows it.
pub(super) struct ReachStatus {
    pub nat_status: String,
    pub nat: &'static str,
    pub relay_reservations: Vec<String>,
    pub hole_punched: Vec<String>,
}

impl Reach {
    /// `relays`: those given with `--relay`.
    pub(super) fn new(relays: Vec<KnownRelay>) -> Self {
        Self {
            nat_status: "unknown (probing)".into(),
            nat: Nat::Unknown,
            dialed: HashMap::new(),
            relays,
            relay_listener: None,
            relay_backoff: HashMap::new(),
            punched: HashSet::new(),
            quic_probed: HashSet::new(),
        }
    }

    /// Peers a trim must not close: the relay we hold a reservation on
    /// and the `--relay` ones.
    pub(super) fn kept(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.relay_listener
            .iter()
            .map(|l| l.relay)
            .chain(self.relays.iter().filter(|r| r.explicit).map(|r| r.peer))
    }

    pub(super) fn status(&self, swarm: &Swarm<Behaviour>) -> ReachStatus {
        ReachStatus {
            nat_status: self.nat_status.clone(),
            nat: self.nat.as_str(),
            relay_reservations: self
                .relay_listener
                .iter()
                .filter(|l| l.accepted)
                .map(|l| {
                    l.addr
                        .clone()
                        .with(Protocol::P2p(l.relay))
                        .with(Protocol::P2pCircuit)
                        .to_string()
                })
                .collect(),
            hole_punched: self
                .punched
                .iter()
                .filter(|p| swarm.is_connected(p))
                .map(|p| p.to_string())
                .collect(),
        }
    }

    /// A relay from the coordinator's `/bootstrap` (`NetworkHandle::add_relay`):
    /// remembered and dialled at once.
    pub(super) fn add_relay(&mut self, swarm: &mut Swarm<Behaviour>, addr: Multiaddr) {
        let Some(peer) = super::addr::peer_of(&addr) else {
            return;
        };
        if peer == *swarm.local_peer_id() || is_relayed(&addr) {
            return;
        }
        if !self.relays.iter().any(|r| r.peer == peer) {
            tracing::info!(relay = %addr, "relay known");
            self.remember_relay(peer, strip_p2p(&addr));
        }
        if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
            kad.add_address(&peer, addr.clone());
        }
        if !swarm.is_connected(&peer) {
            let _ = swarm.dial(addr);
        }
    }

    /// A new direct connection we dialled: its address (the host a QUIC
    /// probe and a learnt relay use).
    pub(super) fn dialed(&mut self, peer: PeerId, addr: Multiaddr) {
        self.dialed.insert(peer, addr);
    }

    /// The last connection to `peer` closed.
    pub(super) fn peer_gone(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        table: &Connections,
        peer: PeerId,
    ) {
        self.dialed.remove(&peer);
        self.punched.remove(&peer);
        // Met again, a relay is probed over QUIC again (our NAT's UDP
        // mapping may have changed meanwhile).
        self.quic_probed.remove(&peer);
        self.relay_lost(swarm, table, peer, "the connection to the relay closed");
    }

    /// A listener closed: when it was our circuit listener, the
    /// reservation is gone.
    pub(super) fn listener_closed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        table: &Connections,
        id: ListenerId,
        reason: &Result<(), std::io::Error>,
    ) {
        if let Some(relay) = self
            .relay_listener
            .as_ref()
            .filter(|l| l.id == id)
            .map(|l| l.relay)
        {
            let why = match reason {
                Ok(()) => "the relay listener closed".to_string(),
                Err(e) => e.to_string(),
            };
            self.relay_lost(swarm, table, relay, &why);
        }
    }

    /// What a peer told about itself: a peer that offers circuit relay,
    /// reached directly, is a relay to use if we turn out to be behind
    /// NAT (and one to learn our UDP mapping through).
    pub(super) fn identified(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        peer_id: PeerId,
        info: &identify::Info,
        direct: bool,
    ) {
        let offers_relay = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
        if offers_relay
            && direct
            && peer_id != *swarm.local_peer_id()
            && !self.relays.iter().any(|r| r.peer == peer_id)
        {
            let addr = self.dialed.get(&peer_id).cloned().or_else(|| {
                info.listen_addrs
                    .iter()
                    .find(|a| !is_relayed(a) && !is_unspecified(a))
                    .cloned()
            });
            if let Some(addr) = addr {
                tracing::info!(relay = %with_p2p(addr.clone(), peer_id), "peer offers circuit relay");
                self.remember_relay(peer_id, strip_p2p(&addr));
            }
        }
        if offers_relay && direct && !is_quic(&info.observed_addr) {
            self.probe_quic(swarm, peer_id, &info.listen_addrs);
        }
    }

    /// AutoNAT changed its mind: reachable directly, the reservation goes
    /// back (unless `--relay` asked for one); private, one is asked for.
    pub(super) fn nat_changed(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        table: &Connections,
        new: autonat::NatStatus,
    ) {
        (self.nat_status, self.nat) = match new {
            autonat::NatStatus::Public(addr) => (format!("public ({addr})"), Nat::Public),
            autonat::NatStatus::Private => ("private (behind NAT)".into(), Nat::Private),
            autonat::NatStatus::Unknown => ("unknown".into(), Nat::Unknown),
        };
        tracing::info!(status = %self.nat_status, "NAT status");
        if self.nat == Nat::Public
            && !self.explicit_relay()
            && let Some(l) = self.relay_listener.take()
        {
            tracing::info!(relay = %l.relay, "reachable directly: giving the relay reservation back");
            swarm.remove_listener(l.id);
        }
        self.ensure_reservation(swarm, table);
    }

    pub(super) fn reservation_accepted(&mut self, relay_peer_id: PeerId, renewal: bool) {
        if let Some(l) = self
            .relay_listener
            .as_mut()
            .filter(|l| l.relay == relay_peer_id)
        {
            l.accepted = true;
        }
        if renewal {
            tracing::debug!(relay = %relay_peer_id, "relay reservation renewed");
        } else {
            tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
        }
    }

    pub(super) fn hole_punch(&mut self, ev: dcutr::Event) {
        let dcutr::Event {
            remote_peer_id,
            result,
        } = ev;
        match result {
            Ok(_) => {
                tracing::info!(peer = %remote_peer_id, "hole punched: direct connection");
                metrics::counter!("troop_hole_punch_total", "result" => "direct").increment(1);
                self.punched.insert(remote_peer_id);
            }
            Err(e) => {
                tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed");
                metrics::counter!("troop_hole_punch_total", "result" => "failed").increment(1);
            }
        }
    }

    /// Adds a relay learnt from a peer or the coordinator to the relays
    /// this node knows, at most [`MAX_LEARNT_RELAYS`] of them: when full,
    /// the oldest learnt one is forgotten (`--relay` ones never are).
    fn remember_relay(&mut self, peer: PeerId, addr: Multiaddr) {
        let learnt = self.relays.iter().filter(|r| !r.explicit).count();
        if learnt >= MAX_LEARNT_RELAYS
            && let Some(oldest) = self.relays.iter().position(|r| !r.explicit)
        {
            self.relays.remove(oldest);
        }
        self.relays.push(KnownRelay {
            peer,
            addr,
            explicit: false,
        });
    }

    /// Dials a relay we reached over TCP once more over QUIC (the host we
    /// dialled, IP or DNS name, at its QUIC port), when we listen on QUIC
    /// ourselves: identify on that connection tells us the address our NAT maps our UDP socket
    /// to, which DCUtR then offers beside the TCP one. Routers that answer
    /// unsolicited TCP with RST defeat TCP simultaneous open but not a UDP
    /// punch; whichever path comes up first is kept.
    fn probe_quic(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        relay: PeerId,
        listen_addrs: &[Multiaddr],
    ) {
        if self.quic_probed.contains(&relay) || !swarm.listeners().any(is_quic) {
            return;
        }
        // The relay's host as we dialled it (an IP, or the DNS name of a
        // `--relay /dns4/...`), and the port of its QUIC listener (on that
        // IP when it lists several).
        let dialed = self.dialed.get(&relay);
        let Some(host) = dialed.and_then(|a| {
            a.iter().find(|p| {
                matches!(
                    p,
                    Protocol::Ip4(_)
                        | Protocol::Ip6(_)
                        | Protocol::Dns(_)
                        | Protocol::Dns4(_)
                        | Protocol::Dns6(_)
                )
            })
        }) else {
            return;
        };
        let ip = dialed.and_then(ip_of);
        let quic: Vec<&Multiaddr> = listen_addrs
            .iter()
            .filter(|a| is_quic(a) && !is_relayed(a) && !is_unspecified(a))
            .collect();
        let Some(port) = quic
            .iter()
            .find(|a| ip.is_some() && ip_of(a) == ip)
            .or_else(|| quic.iter().find(|a| ip.is_none() && !is_lan(a)))
            .and_then(|a| {
                a.iter().find_map(|p| match p {
                    Protocol::Udp(port) => Some(port),
                    _ => None,
                })
            })
        else {
            return;
        };
        let addr = Multiaddr::empty()
            .with(host)
            .with(Protocol::Udp(port))
            .with(Protocol::QuicV1);
        if self.quic_probed.len() >= MAX_LEARNT_RELAYS * 2 {
            self.quic_probed.clear();
        }
        self.quic_probed.insert(relay);
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(relay)
            .addresses(vec![addr.clone()])
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .build();
        tracing::debug!(%relay, address = %addr, "dialling the relay over QUIC too, to learn our UDP mapping");
        if let Err(e) = swarm.dial(opts) {
            tracing::debug!(%relay, error = %e, "QUIC dial to the relay failed");
        }
    }

    /// Whether this node should hold a relay reservation: it was given a
    /// relay explicitly, or AutoNAT found it behind NAT.
    ///
    /// Until AutoNAT has answered (a probe can take 10 s), a node whose
    /// every address is a LAN one cannot be reached from outside without a
    /// port forward: it reserves at once and lets go if AutoNAT later finds
    /// it public.
    fn wants_relay(&self, swarm: &Swarm<Behaviour>) -> bool {
        self.explicit_relay()
            || self.nat == Nat::Private
            || (self.nat == Nat::Unknown && self.lan_only(swarm))
    }

    fn explicit_relay(&self) -> bool {
        self.relays.iter().any(|r| r.explicit)
    }

    /// Every address we listen on or were confirmed at is a LAN one.
    fn lan_only(&self, swarm: &Swarm<Behaviour>) -> bool {
        let direct = |a: &&Multiaddr| !is_relayed(a);
        let listen: Vec<Multiaddr> = swarm.listeners().cloned().collect();
        let mut any = false;
        for a in listen
            .iter()
            .chain(swarm.external_addresses())
            .filter(direct)
        {
            any = true;
            if !is_lan(a) && !is_unspecified(a) {
                return false;
            }
        }
        any
    }

    /// Asks a known relay for a reservation when we need one and hold none
    /// (at start, after a refusal, or when our relay went away).
    pub(super) fn ensure_reservation(&mut self, swarm: &mut Swarm<Behaviour>, table: &Connections) {
        if !self.wants_relay(swarm) || self.relay_listener.is_some() {
            return;
        }
        let now = Instant::now();
        let local = *swarm.local_peer_id();
        self.relay_backoff.retain(|_, until| *until > now);
        // Explicit relays first, then those learnt from peers.
        let mut order: Vec<&KnownRelay> = self.relays.iter().collect();
        order.sort_by_key(|r| !r.explicit);
        let usable: Vec<KnownRelay> = order
            .into_iter()
            .filter(|r| r.peer != local && !self.relay_backoff.contains_key(&r.peer))
            .cloned()
            .collect();
        // Ask over a direct connection we already hold (a reservation asked
        // for while the first dial is under way fails at once).
        let direct = |p: &PeerId| table.has_direct(p);
        let Some(KnownRelay { peer, addr, .. }) = usable.iter().find(|r| direct(&r.peer)).cloned()
        else {
            if let Some(r) = usable.first()
                && !swarm.is_connected(&r.peer)
            {
                let _ = swarm.dial(r.addr.clone().with(Protocol::P2p(r.peer)));
            }
            return;
        };
        let circuit = addr
            .clone()
            .with(Protocol::P2p(peer))
            .with(Protocol::P2pCircuit);
        match swarm.listen_on(circuit.clone()) {
            Ok(id) => {
                tracing::info!(relay = %circuit, "asking the relay for a reservation");
                self.relay_listener = Some(RelayListener {
                    id,
                    relay: peer,
                    addr,
                    accepted: false,
                });
            }
            Err(e) => {
                tracing::warn!(relay = %circuit, error = %e, "cannot listen through the relay");
                self.relay_backoff.insert(peer, now + RELAY_BACKOFF);
            }
        }
    }

    /// Our reservation on `peer` is gone: try another relay.
    fn relay_lost(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        table: &Connections,
        peer: PeerId,
        why: &str,
    ) {
        if let Some(l) = self.relay_listener.take_if(|l| l.relay == peer) {
            tracing::warn!(relay = %peer, reason = why, "relay reservation lost; looking for another relay");
            // Already closed when the listener itself reported it: a no-op.
            swarm.remove_listener(l.id);
            self.relay_backoff
                .insert(peer, Instant::now() + RELAY_BACKOFF);
            self.ensure_reservation(swarm, table);
        }
    }
}
