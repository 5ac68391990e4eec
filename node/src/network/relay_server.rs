//! The relay service this node offers others (`troop relay`, or a public
//! node once AutoNAT confirms it): whether it is advertised, the clients
//! holding a reservation, and what it refused over its limits.

use std::collections::HashSet;

use libp2p::{PeerId, relay};

pub(super) struct RelayServer {
    /// Whether our relay service is advertised.
    pub serving: bool,
    /// Reservations and circuits refused (over the limits).
    pub refused: u64,
    /// Peers holding a reservation on us now.
    clients: HashSet<PeerId>,
}

impl RelayServer {
    pub(super) fn new(serving: bool) -> Self {
        Self {
            serving,
            refused: 0,
            clients: HashSet::new(),
        }
    }

    pub(super) fn clients(&self) -> usize {
        self.clients.len()
    }

    pub(super) fn on_event(&mut self, ev: relay::Event) {
        match ev {
            relay::Event::StatusChanged { status } => {
                self.serving = status == relay::Status::Enable;
                tracing::info!(serving = self.serving, "relay service");
            }
            relay::Event::ReservationReqDenied {
                src_peer_id,
                status,
            } => {
                self.refused += 1;
                metrics::counter!("troop_relay_denied_total", "kind" => "reservation").increment(1);
                tracing::info!(peer = %src_peer_id, ?status, "relay reservation refused");
            }
            relay::Event::CircuitReqDenied {
                src_peer_id,
                dst_peer_id,
                status,
            } => {
                self.refused += 1;
                metrics::counter!("troop_relay_denied_total", "kind" => "circuit").increment(1);
                tracing::info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "relay circuit refused");
            }
            relay::Event::ReservationReqAccepted {
                src_peer_id,
                renewed,
            } => {
                self.clients.insert(src_peer_id);
                metrics::counter!("troop_relay_reservations_total").increment(1);
                tracing::debug!(peer = %src_peer_id, renewed, "relay reservation granted");
            }
            relay::Event::CircuitReqAccepted {
                src_peer_id,
                dst_peer_id,
            } => {
                metrics::counter!("troop_relay_circuits_total").increment(1);
                tracing::debug!(src = %src_peer_id, dst = %dst_peer_id, "relay circuit opened");
            }
            relay::Event::ReservationClosed { src_peer_id }
            | relay::Event::ReservationTimedOut { src_peer_id } => {
                self.clients.remove(&src_peer_id);
            }
            ev => tracing::debug!(?ev, "relay server"),
        }
    }
}
