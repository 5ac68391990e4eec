//! Keeps connections to a chosen few peers open while they are idle.
//!
//! libp2p closes a connection once no protocol needs it and no stream is
//! open (after `NetConfig::idle_timeout`). That is right for the dozens of
//! peers a DHT lookup touches, wrong for the workers a gateway sends its
//! requests to: each reconnection costs a handshake, and for a worker
//! behind NAT a relay circuit and a hole punch. This behaviour speaks no
//! protocol; its handler only answers "keep alive" for the peers in its set.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::task::{Context, Poll, Waker};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::DeniedUpgrade;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::ConnectionEvent;
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandlerEvent, ConnectionId, FromSwarm, NetworkBehaviour,
    NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};

#[derive(Default)]
pub struct Behaviour {
    warm: HashSet<PeerId>,
    conns: HashMap<PeerId, HashSet<ConnectionId>>,
    pending: VecDeque<ToSwarm<Infallible, bool>>,
    waker: Option<Waker>,
}

impl Behaviour {
    /// Keeps (`true`) or stops keeping (`false`) this peer's connections
    /// open while idle.
    pub fn set(&mut self, peer: PeerId, keep: bool) {
        let changed = if keep {
            self.warm.insert(peer)
        } else {
            self.warm.remove(&peer)
        };
        if !changed {
            return;
        }
        for c in self.conns.get(&peer).into_iter().flatten() {
            self.pending.push_back(ToSwarm::NotifyHandler {
                peer_id: peer,
                handler: NotifyHandler::One(*c),
                event: keep,
            });
        }
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The peers kept warm.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.warm.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.warm.len()
    }

    fn handler(&self, peer: &PeerId) -> Handler {
        Handler {
            keep: self.warm.contains(peer),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(&peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(&peer))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.conns
                    .entry(e.peer_id)
                    .or_default()
                    .insert(e.connection_id);
            }
            FromSwarm::ConnectionClosed(e) => {
                if let Some(set) = self.conns.get_mut(&e.peer_id) {
                    set.remove(&e.connection_id);
                    if set.is_empty() {
                        self.conns.remove(&e.peer_id);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        match self.pending.pop_front() {
            Some(ev) => Poll::Ready(ev),
            None => {
                self.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Speaks no protocol; keeps its connection alive while `keep`.
pub struct Handler {
    keep: bool,
}

impl libp2p::swarm::ConnectionHandler for Handler {
    type FromBehaviour = bool;
    type ToBehaviour = Infallible;
    type InboundProtocol = DeniedUpgrade;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(DeniedUpgrade, ())
    }

    fn on_behaviour_event(&mut self, keep: bool) {
        self.keep = keep;
    }

    fn connection_keep_alive(&self) -> bool {
        self.keep
    }

    fn poll(
        &mut self,
        _: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        Poll::Pending
    }

    fn on_connection_event(
        &mut self,
        _: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
    }
}
