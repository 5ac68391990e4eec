//! The libp2p side of a node: one event loop owns the swarm; the rest of
//! the program talks to it through a cloneable [`NetworkHandle`] (commands
//! on a bounded channel, answers on oneshots) and hears from it through a
//! bounded event channel. Inference streams don't go through the loop at
//! all: they are opened and accepted with `libp2p_stream`'s `Control`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::{self, GetClosestPeersOk, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, gossipsub,
    identify, mdns, noise, ping, relay, tcp, yamux,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use troop_protocol::advert::{ADVERT_TOPIC, KAD_PROTOCOL};

/// What the swarm runs.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    gossipsub: Toggle<gossipsub::Behaviour>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    autonat: autonat::Behaviour,
    relay: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// How to start the swarm.
#[derive(Clone)]
pub struct NetConfig {
    pub keypair: Keypair,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    /// LAN discovery by multicast (off unless asked for).
    pub mdns: bool,
    /// Kademlia (provider records, lookups).
    pub dht: bool,
    /// Gossipsub (adverts).
    pub gossip: bool,
    /// Most connections in total.
    pub max_connections: u32,
    /// Most concurrent streams on one connection.
    pub max_streams_per_connection: usize,
}

impl NetConfig {
    pub fn new(keypair: Keypair) -> Self {
        Self {
            keypair,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
            dht: true,
            gossip: true,
            max_connections: 512,
            max_streams_per_connection: 4096,
        }
    }
}

/// Something the network heard.
#[derive(Debug, Clone)]
pub enum NetEvent {
    /// A gossipsub message on the advert topic (signature already checked).
    Advert {
        source: PeerId,
        data: Vec<u8>,
    },
    /// A ping round trip.
    Rtt {
        peer: PeerId,
        rtt: Duration,
    },
    Connected(PeerId),
    Disconnected(PeerId),
}

/// A snapshot for `troop doctor` and logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetStatus {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub external_addrs: Vec<String>,
    pub connected_peers: Vec<String>,
    pub nat_status: String,
    pub relay_reservations: Vec<String>,
    pub routing_table_peers: usize,
    pub gossip_peers: usize,
}

enum Command {
    Dial(Multiaddr),
    AddAddress(PeerId, Multiaddr),
    Provide(Vec<u8>),
    FindProviders {
        key: Vec<u8>,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Publish(Vec<u8>),
    Status(oneshot::Sender<NetStatus>),
}

/// Cloneable handle to the event loop.
#[derive(Clone)]
pub struct NetworkHandle {
    pub peer_id: PeerId,
    tx: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    task: Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
}

impl NetworkHandle {
    /// Stops the event loop: the swarm and all its connections are dropped.
    pub fn shutdown(&self) {
        if let Ok(mut t) = self.task.lock()
            && let Some(t) = t.take()
        {
            t.abort();
        }
    }

    /// A new control for opening and accepting streams.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Our listen addresses, each with `/p2p/<PeerId>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let own = self.peer_id;
        self.listen_addrs
            .read()
            .map(|v| v.iter().map(|a| with_p2p(a.clone(), own)).collect())
            .unwrap_or_default()
    }

    pub async fn dial(&self, addr: Multiaddr) {
        let _ = self.tx.send(Command::Dial(addr)).await;
    }

    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) {
        let _ = self.tx.send(Command::AddAddress(peer, addr)).await;
    }

    /// Announces a provider record for `key` (re-announced by the caller
    /// every so often).
    pub async fn provide(&self, key: Vec<u8>) {
        let _ = self.tx.send(Command::Provide(key)).await;
    }

    /// Looks up providers of `key`; their addresses are resolved and dialed
    /// before the answer comes. Empty when the DHT is off or finds nobody.
    pub async fn find_providers(&self, key: Vec<u8>) -> Vec<PeerId> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::FindProviders { key, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub async fn publish(&self, data: Vec<u8>) {
        let _ = self.tx.send(Command::Publish(data)).await;
    }

    pub async fn status(&self) -> NetStatus {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Status(reply)).await.is_err() {
            return NetStatus::default();
        }
        rx.await.unwrap_or_default()
    }
}

/// Appends `/p2p/<peer>` unless the address already ends with one.
pub fn with_p2p(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr
    } else {
        addr.with(Protocol::P2p(peer))
    }
}

/// The peer id at the end of a multiaddr, if any.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

fn build_swarm(cfg: &NetConfig) -> anyhow::Result<Swarm<Behaviour>> {
    let max_streams = cfg.max_streams_per_connection;
    let mut yamux_cfg = yamux::Config::default();
    #[allow(deprecated)]
    yamux_cfg.set_max_num_streams(max_streams);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            move || yamux_cfg.clone(),
        )?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let kad = cfg.dht.then(|| {
                let mut kc = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
                kc.set_query_timeout(Duration::from_secs(5));
                let mut k =
                    kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kc);
                // Serve the DHT even without a confirmed public address
                // (home networks, loopback test meshes).
                k.set_mode(Some(kad::Mode::Server));
                k
            });
            let gossipsub = if cfg.gossip {
                let gc = gossipsub::ConfigBuilder::default()
                    .heartbeat_interval(Duration::from_millis(700))
                    .validation_mode(gossipsub::ValidationMode::Strict)
                    .max_transmit_size(64 * 1024)
                    .build()
                    .map_err(|e| anyhow::anyhow!("gossipsub config: {e}"))?;
                let mut g = gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gc,
                )
                .map_err(|e| anyhow::anyhow!("gossipsub: {e}"))?;
                // Many peers on one IP are normal for loopback meshes and for
                // several machines behind one home NAT: don't let the
                // colocation penalty graylist them on loopback.
                let params = gossipsub::PeerScoreParams {
                    ip_colocation_factor_whitelist: [
                        std::net::IpAddr::from([127, 0, 0, 1]),
                        std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                    ]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                };
                g.with_peer_score(params, gossipsub::PeerScoreThresholds::default())
                    .map_err(|e| anyhow::anyhow!("gossipsub scoring: {e}"))?;
                g.subscribe(&gossipsub::IdentTopic::new(ADVERT_TOPIC))?;
                Some(g)
            } else {
                None
            };
            let mdns = if cfg.mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            let limits = connection_limits::ConnectionLimits::default()
                .with_max_established(Some(cfg.max_connections))
                .with_max_established_per_peer(Some(4))
                .with_max_pending_incoming(Some(64));
            let autonat_cfg = autonat::Config {
                only_global_ips: false,
                boot_delay: Duration::from_secs(2),
                ..Default::default()
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new("/troop/id/1.0.0".into(), key.public())
                        .with_agent_version(format!("troop/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                kad: Toggle::from(kad),
                gossipsub: Toggle::from(gossipsub),
                mdns: Toggle::from(mdns),
                autonat: autonat::Behaviour::new(peer_id, autonat_cfg),
                relay: relay_client,
                dcutr: dcutr::Behaviour::new(peer_id),
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| anyhow::anyhow!("building the behaviour: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    Ok(swarm)
}

/// Starts the swarm and its event loop. Returns once every listen address
/// is bound (so callers can print them).
pub async fn spawn(cfg: NetConfig) -> anyhow::Result<(NetworkHandle, mpsc::Receiver<NetEvent>)> {
    let mut swarm = build_swarm(&cfg)?;
    let peer_id = *swarm.local_peer_id();
    let listen = if cfg.listen.is_empty() {
        vec!["/ip4/127.0.0.1/tcp/0".parse()?]
    } else {
        cfg.listen.clone()
    };
    for addr in &listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("listening on {addr}"))?;
    }
    let control = swarm.behaviour().stream.new_control();
    let (tx, rx) = mpsc::channel(256);
    let (event_tx, event_rx) = mpsc::channel(4096);
    let listen_addrs = Arc::new(RwLock::new(Vec::new()));
    // Wait for the listeners to be bound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut bound = Vec::new();
    while bound.len() < listen.len() {
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .context("listen addresses were not bound within 5 s")?;
        if let SwarmEvent::NewListenAddr { address, .. } = ev {
            tracing::info!(address = %with_p2p(address.clone(), peer_id), "listening");
            bound.push(address);
        }
    }
    if let Ok(mut l) = listen_addrs.write() {
        *l = bound;
    }
    for addr in &cfg.bootstrap {
        if let (Some(peer), Some(kad)) = (peer_of(addr), swarm.behaviour_mut().kad.as_mut()) {
            kad.add_address(&peer, addr.clone());
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, error = %e, "bootstrap dial failed");
        }
    }
    let handle = NetworkHandle {
        peer_id,
        tx,
        control,
        listen_addrs: listen_addrs.clone(),
        task: Arc::new(std::sync::Mutex::new(None)),
    };
    let ev_loop = EventLoop {
        swarm,
        rx,
        events: event_tx,
        listen_addrs,
        provider_queries: HashMap::new(),
        closest_queries: HashMap::new(),
        lookups: HashMap::new(),
        next_lookup: 0,
        nat_status: "unknown (probing)".into(),
        relay_reservations: HashSet::new(),
        bootstrapped: false,
        provided: HashSet::new(),
        bootstrap: cfg.bootstrap.clone(),
    };
    let task = tokio::spawn(ev_loop.run());
    if let Ok(mut t) = handle.task.lock() {
        *t = Some(task.abort_handle());
    }
    Ok((handle, event_rx))
}

struct Lookup {
    reply: Option<oneshot::Sender<Vec<PeerId>>>,
    found: HashSet<PeerId>,
    unresolved: HashSet<PeerId>,
    provider_query_done: bool,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    provider_queries: HashMap<QueryId, u64>,
    closest_queries: HashMap<QueryId, (u64, PeerId)>,
    lookups: HashMap<u64, Lookup>,
    next_lookup: u64,
    nat_status: String,
    relay_reservations: HashSet<String>,
    bootstrapped: bool,
    provided: HashSet<Vec<u8>>,
    bootstrap: Vec<Multiaddr>,
}

impl EventLoop {
    async fn run(mut self) {
        let mut reprovide = tokio::time::interval(Duration::from_secs(60));
        let mut redial = tokio::time::interval(Duration::from_secs(3));
        loop {
            tokio::select! {
                _ = redial.tick() => {
                    // Alone? Try the bootstrap peers again (they may have
                    // started after us).
                    if self.swarm.connected_peers().next().is_none() {
                        for addr in self.bootstrap.clone() {
                            let _ = self.swarm.dial(addr);
                        }
                    }
                }
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                ev = self.swarm.select_next_some() => self.on_event(ev),
                _ = reprovide.tick() => self.reprovide(),
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

    fn reprovide(&mut self) {
        let keys: Vec<Vec<u8>> = self.provided.iter().cloned().collect();
        if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
            for k in keys {
                if let Err(e) = kad.start_providing(RecordKey::new(&k)) {
                    tracing::debug!(error = %e, "start_providing failed");
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial(addr) => {
                if let Some(peer) = peer_of(&addr)
                    && let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                {
                    kad.add_address(&peer, addr.clone());
                }
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::warn!(%addr, error = %e, "dial failed");
                }
            }
            Command::AddAddress(peer, addr) => {
                self.swarm.add_peer_address(peer, addr.clone());
                if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                    kad.add_address(&peer, addr);
                }
            }
            Command::Provide(key) => {
                self.provided.insert(key.clone());
                if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                    && let Err(e) = kad.start_providing(RecordKey::new(&key))
                {
                    tracing::warn!(error = %e, "start_providing failed");
                }
            }
            Command::FindProviders { key, reply } => {
                let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
                    let _ = reply.send(Vec::new());
                    return;
                };
                let id = self.next_lookup;
                self.next_lookup += 1;
                let q = kad.get_providers(RecordKey::new(&key));
                self.provider_queries.insert(q, id);
                self.lookups.insert(
                    id,
                    Lookup {
                        reply: Some(reply),
                        found: HashSet::new(),
                        unresolved: HashSet::new(),
                        provider_query_done: false,
                    },
                );
            }
            Command::Publish(data) => {
                if let Some(g) = self.swarm.behaviour_mut().gossipsub.as_mut()
                    && let Err(e) = g.publish(gossipsub::IdentTopic::new(ADVERT_TOPIC), data)
                {
                    tracing::debug!(error = %e, "advert not published");
                }
            }
            Command::Status(reply) => {
                let st = self.status();
                let _ = reply.send(st);
            }
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
        NetStatus {
            peer_id: peer_id.to_string(),
            listen_addrs,
            external_addrs,
            connected_peers,
            nat_status: self.nat_status.clone(),
            relay_reservations: self.relay_reservations.iter().cloned().collect(),
            routing_table_peers,
            gossip_peers,
        }
    }

    fn finish_lookup_if_done(&mut self, id: u64) {
        let done = self
            .lookups
            .get(&id)
            .is_some_and(|l| l.provider_query_done && l.unresolved.is_empty());
        if done
            && let Some(mut l) = self.lookups.remove(&id)
            && let Some(reply) = l.reply.take()
        {
            let _ = reply.send(l.found.into_iter().collect());
        }
    }

    fn on_kad(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::OutboundQueryProgressed { id, result, .. } => match result {
                QueryResult::GetProviders(res) => {
                    let Some(&lookup) = self.provider_queries.get(&id) else {
                        return;
                    };
                    match res {
                        Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                            let local = *self.swarm.local_peer_id();
                            for p in providers.into_iter().filter(|p| *p != local) {
                                let connected = self.swarm.is_connected(&p);
                                let Some(l) = self.lookups.get_mut(&lookup) else {
                                    break;
                                };
                                if !l.found.insert(p) {
                                    continue;
                                }
                                if !connected {
                                    // Dial now, while the query still holds the
                                    // addresses the provider record came with;
                                    // ask the DHT for them only if that fails.
                                    if self.swarm.dial(p).is_err()
                                        && let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                                    {
                                        let q = kad.get_closest_peers(p);
                                        self.closest_queries.insert(q, (lookup, p));
                                    }
                                    if let Some(l) = self.lookups.get_mut(&lookup) {
                                        l.unresolved.insert(p);
                                    }
                                }
                            }
                            // One answer is enough: stop the query early.
                            if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                                && let Some(mut q) = kad.query_mut(&id)
                            {
                                q.finish();
                            }
                        }
                        Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
                        Err(e) => tracing::debug!(error = %e, "provider lookup failed"),
                    }
                    // The first answer (or the end of the query) settles the lookup.
                    self.provider_queries.remove(&id);
                    if let Some(l) = self.lookups.get_mut(&lookup) {
                        l.provider_query_done = true;
                    }
                    self.finish_lookup_if_done(lookup);
                }
                QueryResult::GetClosestPeers(res) => {
                    let Some((lookup, target)) = self.closest_queries.remove(&id) else {
                        return;
                    };
                    let peers = match res {
                        Ok(GetClosestPeersOk { peers, .. }) => peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    for info in peers.into_iter().filter(|i| i.peer_id == target) {
                        for addr in info.addrs {
                            self.swarm.add_peer_address(target, addr);
                        }
                    }
                    if let Err(e) = self.swarm.dial(target) {
                        tracing::debug!(peer = %target, error = %e, "could not dial provider");
                    }
                    if let Some(l) = self.lookups.get_mut(&lookup) {
                        l.unresolved.remove(&target);
                    }
                    self.finish_lookup_if_done(lookup);
                }
                QueryResult::StartProviding(Err(e)) => {
                    tracing::debug!(error = %e, "providing not replicated yet")
                }
                QueryResult::Bootstrap(Ok(_)) => {}
                _ => {}
            },
            kad::Event::RoutingUpdated { peer, .. } => {
                tracing::trace!(%peer, "routing table updated");
                if !self.bootstrapped {
                    self.bootstrapped = true;
                    if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                        let _ = kad.bootstrap();
                    }
                    self.reprovide();
                }
            }
            _ => {}
        }
    }

    /// A provider we were resolving is now connected (or could not be).
    fn provider_settled(&mut self, peer: PeerId) {
        let ids: Vec<u64> = self
            .lookups
            .iter_mut()
            .filter_map(|(id, l)| l.unresolved.remove(&peer).then_some(*id))
            .collect();
        for id in ids {
            self.finish_lookup_if_done(id);
        }
    }

    fn on_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match &ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. } => self.provider_settled(*peer_id),
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(p), ..
            } => {
                // Still waiting for a closest-peers answer? Then keep waiting.
                let p = *p;
                if !self.closest_queries.values().any(|(_, t)| *t == p) {
                    self.provider_settled(p);
                }
            }
            _ => {}
        }
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let peer = *self.swarm.local_peer_id();
                tracing::info!(address = %with_p2p(address.clone(), peer), "listening");
                if let Ok(mut l) = self.listen_addrs.write()
                    && !l.contains(&address)
                {
                    l.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if let Ok(mut l) = self.listen_addrs.write() {
                    l.retain(|a| a != &address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } if num_established.get() == 1 => {
                tracing::debug!(peer = %peer_id, "connected");
                self.emit(NetEvent::Connected(peer_id));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                tracing::debug!(peer = %peer_id, "disconnected");
                self.emit(NetEvent::Disconnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, error = %error, "outgoing connection failed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour(ev),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
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
            BehaviourEvent::Kad(ev) => self.on_kad(ev),
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
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                self.nat_status = match new {
                    autonat::NatStatus::Public(addr) => format!("public ({addr})"),
                    autonat::NatStatus::Private => "private (behind NAT)".into(),
                    autonat::NatStatus::Unknown => "unknown".into(),
                };
                tracing::info!(status = %self.nat_status, "NAT status");
            }
            BehaviourEvent::Relay(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                ..
            }) => {
                self.relay_reservations.insert(relay_peer_id.to_string());
                tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
            }
            BehaviourEvent::Dcutr(ev) => tracing::debug!(?ev, "dcutr"),
            _ => {}
        }
    }
}
