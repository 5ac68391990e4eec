//! The event loop: it owns the swarm and dispatches. Commands from the
//! [`super::NetworkHandle`], swarm events and timers each go to the job
//! they concern: [`Discovery`], [`Reach`], [`RelayServer`] and the
//! [`Connections`] table; the loop itself only keeps the listen addresses
//! and hands events on to the program.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, mdns, ping, relay};
use tokio::sync::{mpsc, oneshot};
use troop_protocol::advert::{ADVERT_TOPIC, KAD_PROTOCOL};
use troop_protocol::sync::RwLockExt as _;

use super::addr::{circuit_relay, is_lan, is_relayed, peer_of, with_p2p};
use super::connections::Connections;
use super::discovery::Discovery;
use super::reach::Reach;
use super::relay_server::RelayServer;
use super::swarm::{Behaviour, BehaviourEvent};
use super::{Command, NetEvent, NetStatus};

pub(super) struct EventLoop {
    pub swarm: Swarm<Behaviour>,
    pub rx: mpsc::Receiver<Command>,
    pub events: mpsc::Sender<NetEvent>,
    /// What [`super::NetworkHandle::listen_addrs`] reads.
    pub listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    pub discovery: Discovery,
    /// Callers waiting for a connection to a peer (one dial for them all).
    pub connecting: HashMap<PeerId, Vec<oneshot::Sender<Result<(), String>>>>,
    pub reach: Reach,
    pub relay_server: RelayServer,
    pub table: Connections,
}

impl EventLoop {
    pub(super) async fn run(mut self) {
        let mut reprovide = tokio::time::interval(Duration::from_secs(60));
        let mut redial = tokio::time::interval(Duration::from_secs(3));
        let mut relay_tick = tokio::time::interval(Duration::from_secs(2));
        let mut trim_tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = relay_tick.tick() => self.reach.ensure_reservation(&mut self.swarm, &self.table),
                _ = trim_tick.tick() => self.trim_connections(),
                _ = redial.tick() => self.discovery.redial(&mut self.swarm),
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_event(ev),
                _ = reprovide.tick() => self.discovery.reprovide(&mut self.swarm),
            }
        }
        tracing::debug!("network event loop stopped");
    }

    fn emit(&self, ev: NetEvent) {
        // A full channel means nobody keeps up; dropping adverts is safe
        // (they repeat), and the counter tells.
        if self.events.try_send(ev).is_err() {
            metrics::counter!("troop_net_events_dropped_total").increment(1);
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let swarm = &mut self.swarm;
        match cmd {
            Command::Dial(addr) => {
                if let Some(peer) = peer_of(&addr)
                    && let Some(kad) = swarm.behaviour_mut().kad.as_mut()
                {
                    kad.add_address(&peer, addr.clone());
                }
                if let Err(e) = swarm.dial(addr.clone()) {
                    tracing::warn!(%addr, error = %e, "dial failed");
                }
            }
            Command::Barrier(reply) => {
                let _ = reply.send(());
            }
            Command::AddAddress(peer, addr) => {
                swarm.add_peer_address(peer, addr.clone());
                if let Some(kad) = swarm.behaviour_mut().kad.as_mut() {
                    kad.add_address(&peer, addr);
                }
            }
            Command::Provide(key) => self.discovery.provide(swarm, key),
            Command::FindProviders { key, reply } => {
                self.discovery.find_providers(swarm, key, reply)
            }
            Command::Publish(data) => {
                if let Some(g) = swarm.behaviour_mut().gossipsub.as_mut()
                    && let Err(e) = g.publish(gossipsub::IdentTopic::new(ADVERT_TOPIC), data)
                {
                    tracing::debug!(error = %e, "advert not published");
                }
            }
            Command::Status(reply) => {
                let st = self.status();
                let _ = reply.send(st);
            }
            Command::AddRelay(addr) => self.reach.add_relay(swarm, addr),
            Command::DialPeer(peer, addrs) => {
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if let Err(e) = swarm.dial(opts) {
                    tracing::debug!(%peer, error = %e, "not dialing");
                }
            }
            Command::Connect(peer, reply) => self.connect(peer, reply),
            Command::KeepWarm(peer, keep) => {
                let warm = &mut swarm.behaviour_mut().warm;
                warm.set(peer, keep);
                tracing::debug!(%peer, keep, warm = warm.len(), "warm connections");
            }
            Command::CloseRelayed(peer) => {
                for id in self.table.relayed_beside_direct(&peer) {
                    tracing::debug!(%peer, "closing the relayed connection: a direct one exists");
                    swarm.close_connection(id);
                }
            }
        }
    }

    /// Above `peers_high` connected peers, closes the connections to the
    /// peers that nothing needs and that were least recently used (a job
    /// on either side) or, never used, connected longest, down to `peers_low`
    /// (the connection manager of go-libp2p does the same with its low
    /// and high water marks). Gossipsub keeps a stream open to every peer
    /// that speaks it, so without this every peer a DHT lookup touched
    /// stays connected for good, each with its pings and gossip.
    fn trim_connections(&mut self) {
        let mut keep: HashSet<_> = self.reach.kept().collect();
        let behaviour = self.swarm.behaviour();
        if let Some(g) = behaviour.gossipsub.as_ref() {
            keep.extend(g.all_mesh_peers().copied());
        }
        keep.extend(behaviour.warm.peers());
        let Some((close, limits)) = self.table.to_trim(keep, Instant::now()) else {
            return;
        };
        let mut closed = 0;
        for peer in close {
            if self.swarm.disconnect_peer_id(peer).is_ok() {
                closed += 1;
            }
        }
        if closed > 0 {
            metrics::counter!("troop_peers_trimmed_total").increment(closed as u64);
            tracing::debug!(
                closed,
                connected = self.table.len(),
                high = limits.high,
                low = limits.low,
                "closed idle connections above the peer limit"
            );
        }
    }

    fn status(&mut self) -> NetStatus {
        let peer_id = *self.swarm.local_peer_id();
        let listen_addrs = self
            .swarm
            .listeners()
            .map(|a| with_p2p(a.clone(), peer_id).to_string())
            .collect();
        let external_addrs = self
            .swarm
            .external_addresses()
            .map(|a| a.to_string())
            .collect();
        let connected_peers = self
            .swarm
            .connected_peers()
            .map(|p| p.to_string())
            .collect();
        let routing_table_peers = self
            .swarm
            .behaviour_mut()
            .kad
            .as_mut()
            .map(|k| k.kbuckets().map(|b| b.num_entries()).sum())
            .unwrap_or(0);
        let gossip_peers = self
            .swarm
            .behaviour()
            .gossipsub
            .as_ref()
            .map(|g| g.all_peers().count())
            .unwrap_or(0);
        let reach = self.reach.status(&self.swarm);
        NetStatus {
            peer_id: peer_id.to_string(),
            listen_addrs,
            external_addrs,
            connected_peers,
            nat_status: reach.nat_status,
            nat: reach.nat.into(),
            relay_reservations: reach.relay_reservations,
            relay_server: self.relay_server.serving,
            relay_refused: self.relay_server.refused,
            relay_clients: self.relay_server.clients(),
            hole_punched: reach.hole_punched,
            relayed_peers: self
                .table
                .relayed_peers()
                .iter()
                .map(|p| p.to_string())
                .collect(),
            routing_table_peers,
            gossip_peers,
        }
    }

    fn add_listen_addr(&self, address: Multiaddr) {
        if let Some(mut l) = self.listen_addrs.writing()
            && !l.contains(&address)
        {
            l.push(address);
        }
    }

    fn remove_listen_addr(&self, address: &Multiaddr) {
        if let Some(mut l) = self.listen_addrs.writing() {
            l.retain(|a| a != address);
        }
    }

    /// Answers `reply` once `peer` is connected: at once when it is, else
    /// after the one dial to it (ours, or one under way already).
    fn connect(&mut self, peer: PeerId, reply: oneshot::Sender<Result<(), String>>) {
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        let waiting = self.connecting.entry(peer).or_default();
        waiting.retain(|r| !r.is_closed());
        waiting.push(reply);
        if waiting.len() > 1 {
            return;
        }
        use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => metrics::counter!("troop_dials_total", "by" => "stream").increment(1),
            // Another dial to it is under way: its outcome answers.
            Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => self.connected(peer, Err(e.to_string())),
        }
    }

    /// Answers everyone waiting for a connection to `peer`.
    fn connected(&mut self, peer: PeerId, outcome: Result<(), String>) {
        for r in self.connecting.remove(&peer).unwrap_or_default() {
            let _ = r.send(outcome.clone());
        }
    }

    fn on_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.discovery.provider_settled(peer_id);
                let relayed = endpoint.is_relayed();
                let remote = endpoint.get_remote_address();
                if !relayed && endpoint.is_dialer() {
                    self.reach.dialed(peer_id, remote.clone());
                }
                if !relayed && !self.table.is_connected(&peer_id) && !is_lan(remote) {
                    self.swarm
                        .behaviour_mut()
                        .autonat
                        .add_server(peer_id, Some(remote.clone()));
                }
                let relay = circuit_relay(&endpoint);
                let upgraded =
                    self.table
                        .established(peer_id, connection_id, relayed, relay, Instant::now());
                if upgraded {
                    tracing::info!(peer = %peer_id, "direct connection next to the relayed one");
                    self.emit(NetEvent::Upgraded(peer_id));
                }
                self.connected(peer_id, Ok(()));
                if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, "connected");
                    self.emit(NetEvent::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.table.closed(peer_id, connection_id);
                if num_established == 0 {
                    self.swarm.behaviour_mut().autonat.remove_server(&peer_id);
                    self.reach.peer_gone(&mut self.swarm, &self.table, peer_id);
                    tracing::debug!(peer = %peer_id, "disconnected");
                    self.emit(NetEvent::Disconnected(peer_id));
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => self
                .reach
                .listener_closed(&mut self.swarm, &self.table, listener_id, &reason),
            SwarmEvent::NewListenAddr { address, .. } => {
                let peer = *self.swarm.local_peer_id();
                tracing::info!(address = %with_p2p(address.clone(), peer), "listening");
                self.add_listen_addr(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => self.remove_listen_addr(&address),
            // A relay reservation makes `<relay>/p2p-circuit` an address
            // others reach us at: it goes into adverts with the rest.
            SwarmEvent::ExternalAddrConfirmed { address } if is_relayed(&address) => {
                let peer = *self.swarm.local_peer_id();
                tracing::info!(address = %with_p2p(address.clone(), peer), "reachable through a relay");
                self.add_listen_addr(address);
            }
            SwarmEvent::ExternalAddrExpired { address } if is_relayed(&address) => {
                self.remove_listen_addr(&address)
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if let Some(p) = peer_id {
                    self.discovery.dial_failed(p);
                    if !self.swarm.is_connected(&p) {
                        self.connected(p, Err(error.to_string()));
                    }
                }
                tracing::debug!(peer = ?peer_id, error = %error, detail = ?error, "outgoing connection failed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour(ev),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            }) => {
                let direct = self.table.is_direct(&peer_id, &connection_id);
                self.reach
                    .identified(&mut self.swarm, peer_id, &info, direct);
                if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                    && info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL)
                {
                    for addr in info.listen_addrs {
                        kad.add_address(&peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.emit(NetEvent::Rtt { peer, rtt });
            }
            BehaviourEvent::Kad(ev) => self.discovery.on_kad(&mut self.swarm, ev),
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. }) => {
                if let Some(source) = message.source {
                    self.emit(NetEvent::Advert {
                        source,
                        data: message.data,
                    });
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    tracing::debug!(%peer, %addr, "found on the LAN");
                    if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                        kad.add_address(&peer, addr.clone());
                    }
                    let _ = self.swarm.dial(addr);
                }
            }
            BehaviourEvent::Autonat(libp2p::autonat::Event::StatusChanged { new, .. }) => {
                self.reach.nat_changed(&mut self.swarm, &self.table, new)
            }
            BehaviourEvent::Relay(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => self.reach.reservation_accepted(relay_peer_id, renewal),
            BehaviourEvent::Relay(ev) => tracing::debug!(?ev, "relay client"),
            BehaviourEvent::RelayServer(ev) => self.relay_server.on_event(ev),
            BehaviourEvent::Dcutr(ev) => self.reach.hole_punch(ev),
            _ => {}
        }
    }
}
