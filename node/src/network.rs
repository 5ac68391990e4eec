//! The libp2p side of a node: one event loop owns the swarm; the rest of
//! the program talks to it through a cloneable [`NetworkHandle`] (commands
//! on a bounded channel, answers on oneshots) and hears from it through a
//! bounded event channel. Inference streams don't go through the loop at
//! all: they are opened and accepted with `libp2p_stream`'s `Control`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

use anyhow::Context;
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::kad::{self, GetClosestPeersOk, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
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
    relay_server: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    stream: libp2p_stream::Behaviour,
    warm: warm::Behaviour,
}

mod trim;
mod warm;

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
    /// Relays to reserve a slot on at once (`--relay`), each ending in
    /// `/p2p/<PeerId>`. Relays learnt from peers are used only once AutoNAT
    /// finds this node private.
    pub relays: Vec<Multiaddr>,
    /// Offer circuit relay v2 to others, with these limits.
    pub relay_server: Option<RelayLimits>,
    /// Advertise the relay service at once (a dedicated `troop relay`)
    /// instead of waiting for AutoNAT to find this node public.
    pub relay_always: bool,
    /// Addresses others reach this node at, declared by its operator
    /// (`troop relay --external`).
    pub external: Vec<Multiaddr>,
    /// A connection no protocol needs, to a peer not kept warm
    /// (`NetworkHandle::keep_warm`), is closed after this long. Gossipsub
    /// holds a stream open to every peer that speaks it, so this closes
    /// only connections to peers without gossip (and relayed ones); the
    /// peer limits below bound the rest.
    pub idle_timeout: Duration,
    /// Connections (peers) above which the oldest idle ones are closed,
    /// down to `peers_low`. Without it a node keeps a connection to every
    /// peer a DHT lookup ever touched: a third of a 300-node mesh, and the
    /// pings and gossip on each. Never closed: gossip mesh peers, peers
    /// kept warm or busy (`NetworkHandle::busy`), relays we hold a
    /// reservation on, relayed connections, and connections younger than
    /// `peers_grace`. A node that serves as a relay trims nothing.
    pub peers_high: usize,
    /// What trimming brings the connection count down to.
    pub peers_low: usize,
    /// A connection this young is never trimmed (a lookup or a handshake
    /// may still be using it).
    pub peers_grace: Duration,
    /// Incoming connections still in their handshake, at most. A relay
    /// or hub that many nodes join through at once needs more than the
    /// default (`troop relay` sets 512); beyond it, joiners are turned
    /// away and retry.
    pub max_pending_incoming: u32,
    /// Kademlia's replication factor k: how many of the closest peers
    /// hold each provider record, and the bucket size (libp2p's 20).
    pub dht_replication: std::num::NonZeroUsize,
}

/// The limits a relay sets on what it carries for others.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayLimits {
    /// Reservations held at once, in all.
    pub max_reservations: usize,
    /// Reservations one peer may hold.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the client renews it.
    pub reservation_duration: Duration,
    /// Relayed connections (circuits) at once, in all.
    pub max_circuits: usize,
    /// Circuits one peer may have at once.
    pub max_circuits_per_peer: usize,
    /// A circuit is closed after this long...
    pub max_circuit_duration: Duration,
    /// ...or after this many bytes in each direction.
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    /// Sized for inference: a circuit carries many streams of up to 300 s
    /// each (libp2p's own defaults, 2 min and 128 KiB, cut answers short).
    fn default() -> Self {
        Self {
            max_reservations: 1024,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(3600),
            max_circuits: 256,
            max_circuits_per_peer: 32,
            max_circuit_duration: Duration::from_secs(3600),
            max_circuit_bytes: 256 * 1024 * 1024,
        }
    }
}

impl RelayLimits {
    fn config(&self) -> relay::Config {
        relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            // libp2p's per-peer and per-IP reservation and circuit rates.
            ..Default::default()
        }
    }
}

/// How this node is connected to a peer right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// At least one connection that no relay carries.
    Direct,
    /// Only connections through a circuit relay.
    Relayed,
    /// Not connected.
    None,
}

impl Path {
    /// Order of preference in the worker choice: direct, relayed, unknown.
    pub fn rank(self) -> u8 {
        match self {
            Path::Direct => 0,
            Path::Relayed => 1,
            Path::None => 2,
        }
    }
}

/// Whether an address goes through a circuit relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
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
            relays: Vec::new(),
            relay_server: None,
            relay_always: false,
            external: Vec::new(),
            idle_timeout: Duration::from_secs(30),
            peers_high: 64,
            peers_low: 32,
            peers_grace: Duration::from_secs(20),
            max_pending_incoming: 64,
            dht_replication: kad::K_VALUE,
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
    /// A direct connection now exists next to a relayed one (DCUtR punched
    /// through, or a direct dial worked): the relayed one can be closed once
    /// no stream uses it.
    Upgraded(PeerId),
}

/// A snapshot for `troop doctor` and logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NetStatus {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub external_addrs: Vec<String>,
    pub connected_peers: Vec<String>,
    pub nat_status: String,
    /// `public`, `private` or `unknown`.
    pub nat: String,
    /// Circuit addresses (`<relay>/p2p-circuit`) this node holds a
    /// reservation on.
    pub relay_reservations: Vec<String>,
    /// Whether this node offers circuit relay to others right now.
    pub relay_server: bool,
    /// Reservations and circuits this relay refused (over its limits).
    pub relay_refused: u64,
    /// Reservations this relay holds for others right now.
    pub relay_clients: usize,
    /// Peers reached over a direct connection that DCUtR punched.
    pub hole_punched: Vec<String>,
    /// Peers reached only through a relay.
    pub relayed_peers: Vec<String>,
    pub routing_table_peers: usize,
    pub gossip_peers: usize,
}

enum Command {
    /// Answered once every command sent before it was handled.
    Barrier(oneshot::Sender<()>),
    Dial(Multiaddr),
    AddAddress(PeerId, Multiaddr),
    Provide(Vec<u8>),
    FindProviders {
        key: Vec<u8>,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Publish(Vec<u8>),
    Status(oneshot::Sender<NetStatus>),
    AddRelay(Multiaddr),
    DialPeer(PeerId, Vec<Multiaddr>),
    CloseRelayed(PeerId),
    KeepWarm(PeerId, bool),
}

/// Cloneable handle to the event loop.
#[derive(Clone)]
pub struct NetworkHandle {
    pub peer_id: PeerId,
    tx: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    listen_addrs: Arc<RwLock<Vec<Multiaddr>>>,
    paths: Arc<RwLock<HashMap<PeerId, Path>>>,
    busy: Busy,
    task: Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
}

/// Streams of ours in use per peer, and when the last one ended: a peer
/// with one in use is never trimmed, the others least recently used first.
type Busy = Arc<std::sync::Mutex<HashMap<PeerId, (usize, Instant)>>>;

/// Held while a stream to `peer` is in use (an inference request on either
/// side): the connection under it is not trimmed. Dropping it lets go.
pub struct BusyGuard {
    busy: Busy,
    peer: PeerId,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Some(mut b) = self.busy.locked()
            && let Some((n, last)) = b.get_mut(&self.peer)
        {
            *n = n.saturating_sub(1);
            *last = Instant::now();
        }
    }
}

impl NetworkHandle {
    /// Stops the event loop: the swarm and all its connections are dropped.
    pub fn shutdown(&self) {
        if let Some(mut t) = self.task.locked()
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
            .reading()
            .map(|v| v.iter().map(|a| with_p2p(a.clone(), own)).collect())
            .unwrap_or_default()
    }

    /// How we are connected to `peer` right now.
    pub fn path(&self, peer: &PeerId) -> Path {
        self.paths
            .read()
            .ok()
            .and_then(|p| p.get(peer).copied())
            .unwrap_or(Path::None)
    }

    /// A relay to use when AutoNAT finds this node private (from the
    /// coordinator's `/bootstrap`); it is dialed at once.
    pub async fn add_relay(&self, addr: Multiaddr) {
        let _ = self.tx.send(Command::AddRelay(addr)).await;
    }

    /// Closes the relayed connections to `peer` when a direct one exists
    /// (call when no stream of ours runs on it).
    pub fn close_relayed(&self, peer: PeerId) {
        let _ = self.tx.try_send(Command::CloseRelayed(peer));
    }

    /// Marks `peer` busy until the guard is dropped: the connection
    /// trimming (`NetConfig::peers_high`) leaves it alone.
    pub fn busy(&self, peer: PeerId) -> BusyGuard {
        if let Some(mut b) = self.busy.locked() {
            b.entry(peer).or_insert((0, Instant::now())).0 += 1;
        }
        BusyGuard {
            busy: self.busy.clone(),
            peer,
        }
    }

    /// Keeps this peer's connections open while idle (`true`), or lets
    /// them close after `NetConfig::idle_timeout` again (`false`).
    pub fn keep_warm(&self, peer: PeerId, keep: bool) {
        let _ = self.tx.try_send(Command::KeepWarm(peer, keep));
    }

    /// Dials `peer` on all of `addrs` at once (one connection at most),
    /// unless it is connected already (an attempt under way does not stop it).
    pub async fn dial_peer(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.tx.send(Command::DialPeer(peer, addrs)).await;
    }

    pub async fn dial(&self, addr: Multiaddr) {
        let _ = self.tx.send(Command::Dial(addr)).await;
    }

    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) {
        let _ = self.tx.send(Command::AddAddress(peer, addr)).await;
    }

    /// Returns once the network has handled every command sent before
    /// (addresses added, dials started): a stream opened after it finds
    /// the addresses.
    pub async fn barrier(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Barrier(reply)).await.is_ok() {
            let _ = rx.await;
        }
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

/// The peer a multiaddr names: its last `/p2p/<PeerId>` (a circuit address
/// `<relay>/p2p/R/p2p-circuit/p2p/W` names W, not the relay R).
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter()
        .filter_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .last()
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
        // In-process addresses (`/memory/<n>`): simulations of large meshes
        // in one process (the discovery benchmark); never dialled unless asked.
        .with_other_transport(|key| {
            use libp2p::Transport as _;
            Ok(libp2p::core::transport::MemoryTransport::default()
                .upgrade(libp2p::core::upgrade::Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })?
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let relay_server = cfg.relay_server.map(|l| {
                let mut r = relay::Behaviour::new(peer_id, l.config());
                if cfg.relay_always {
                    r.set_status(Some(relay::Status::Enable));
                }
                // Otherwise the service is advertised once AutoNAT confirms
                // a public address.
                r
            });
            let kad = cfg.dht.then(|| {
                let mut kc = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
                // 5 s: in the 1,000-node simulation a 30 s timeout let
                // queries pile up (18 GB, never settled), see issue 15's note.
                kc.set_query_timeout(Duration::from_secs(5));
                kc.set_replication_factor(cfg.dht_replication);
                kc.set_kbucket_size(cfg.dht_replication);
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
                .with_max_pending_incoming(Some(cfg.max_pending_incoming));
            // Probe only through peers at public-looking addresses (see
            // `is_lan_ip`): a peer on the same home LAN reaches us directly
            // and would call us public. Servers are added as such peers connect.
            let autonat_cfg = autonat::Config {
                only_global_ips: false,
                use_connected: false,
                boot_delay: Duration::from_secs(2),
                ..Default::default()
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new("/troop/id/1.0.0".into(), key.public())
                        .with_agent_version(format!("troop/{}", env!("CARGO_PKG_VERSION"))),
                ),
                // libp2p's 15 s: the first ping goes out as a connection
                // opens (the gateway's round trip to a new worker); after
                // that every connection pays for each ping, and at 5 s the
                // pings were most of an idle node's work.
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(15)),
                ),
                kad: Toggle::from(kad),
                gossipsub: Toggle::from(gossipsub),
                mdns: Toggle::from(mdns),
                autonat: autonat::Behaviour::new(peer_id, autonat_cfg),
                relay: relay_client,
                relay_server: Toggle::from(relay_server),
                dcutr: dcutr::Behaviour::new(peer_id),
                stream: libp2p_stream::Behaviour::new(),
                warm: warm::Behaviour::default(),
            })
        })
        .map_err(|e| anyhow::anyhow!("building the behaviour: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_timeout))
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
        tcp_port_free(addr)?;
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
    if let Some(mut l) = listen_addrs.writing() {
        *l = bound.clone();
    }
    // A dedicated relay is public by its operator's word: declare the
    // addresses it was told to listen on (when they name one IP) and those
    // given with --external, so the relay service is advertised at once.
    if cfg.relay_always {
        let declared: Vec<Multiaddr> = bound
            .iter()
            .filter(|a| !is_unspecified(a))
            .chain(cfg.external.iter())
            .cloned()
            .collect();
        for a in declared {
            tracing::info!(address = %with_p2p(a.clone(), peer_id), "external address");
            swarm.add_external_address(a);
        }
    } else {
        for a in &cfg.external {
            swarm.add_external_address(a.clone());
        }
    }
    let mut relays = Vec::new();
    for addr in &cfg.relays {
        match peer_of(addr) {
            Some(p) if p != peer_id => relays.push(KnownRelay {
                peer: p,
                addr: strip_p2p(addr),
                explicit: true,
            }),
            Some(_) => tracing::warn!(%addr, "ignoring --relay: that is this node itself"),
            None => anyhow::bail!("--relay {addr} must end with /p2p/<PeerId>"),
        }
    }
    for addr in cfg.bootstrap.iter().chain(cfg.relays.iter()) {
        if let (Some(peer), Some(kad)) = (peer_of(addr), swarm.behaviour_mut().kad.as_mut()) {
            kad.add_address(&peer, addr.clone());
        }
        if let Err(e) = swarm.dial(addr.clone()) {
            tracing::warn!(%addr, error = %e, "bootstrap dial failed");
        }
    }
    let paths = Arc::new(RwLock::new(HashMap::new()));
    let busy = Busy::default();
    let handle = NetworkHandle {
        peer_id,
        tx,
        control,
        listen_addrs: listen_addrs.clone(),
        paths: paths.clone(),
        busy: busy.clone(),
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
        nat: Nat::Unknown,
        bootstrapped: false,
        rebootstrap: (Instant::now(), Duration::from_secs(3)),
        dht_replication: cfg.dht_replication.get(),
        provided: HashSet::new(),
        provide_retry: HashMap::new(),
        bootstrap: cfg.bootstrap.clone(),
        conns: HashMap::new(),
        since: HashMap::new(),
        circuits: HashMap::new(),
        busy,
        trim: cfg.relay_server.is_none().then_some((
            cfg.peers_low.min(cfg.peers_high),
            cfg.peers_high,
            cfg.peers_grace,
        )),
        paths,
        dialed: HashMap::new(),
        relays,
        relay_listener: None,
        relay_backoff: HashMap::new(),
        punched: HashSet::new(),
        quic_probed: HashSet::new(),
        relay_serving: cfg.relay_server.is_some() && cfg.relay_always,
        relay_refused: 0,
        relay_clients: HashSet::new(),
    };
    let task = tokio::spawn(ev_loop.run());
    if let Some(mut t) = handle.task.locked() {
        *t = Some(task.abort_handle());
    }
    Ok((handle, event_rx))
}

/// The relay a relayed connection goes through: the peer named just before
/// `/p2p-circuit` in its circuit address.
fn circuit_relay(endpoint: &libp2p::core::ConnectedPoint) -> Option<PeerId> {
    let addr = match endpoint {
        libp2p::core::ConnectedPoint::Dialer { address, .. } => address,
        libp2p::core::ConnectedPoint::Listener { local_addr, .. } => local_addr,
    };
    let mut relay = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => relay = Some(id),
            Protocol::P2pCircuit => return relay,
            _ => {}
        }
    }
    None
}

/// An address with its `/p2p/<PeerId>` taken off the end.
fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// `0.0.0.0` or `::`: an address that names no interface.
fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// Fails with "address already in use" when another process listens on a
/// TCP address we are told to listen on. libp2p's TCP listeners set
/// `SO_REUSEPORT` (for port reuse when dialling), so a second node on the
/// same port would otherwise start and share it with the first; a plain
/// socket bound for a moment tells. Port 0 and non-TCP addresses pass.
fn tcp_port_free(addr: &Multiaddr) -> anyhow::Result<()> {
    let port = addr.iter().find_map(|p| match p {
        Protocol::Tcp(n) => Some(n),
        _ => None,
    });
    let (Some(ip), Some(port)) = (ip_of(addr), port.filter(|n| *n != 0)) else {
        return Ok(());
    };
    match std::net::TcpListener::bind((ip, port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
            "listening on {addr}: address already in use (another troop node on this port? give this one --listen with another port)"
        ),
        // Anything else (no such address here, ...) is libp2p's to report.
        Err(_) => Ok(()),
    }
}

/// A QUIC address (`.../udp/N/quic-v1`).
fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

/// The IP of an address, if it names one.
fn ip_of(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

/// An address on a LAN, loopback or carrier-grade NAT range: a peer there
/// says nothing about whether the internet reaches us.
fn is_lan(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => {
            let o = ip.octets();
            ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || (o[0] == 100 && (64..128).contains(&o[1]))
        }
        Protocol::Ip6(ip) => {
            let s = ip.segments()[0];
            ip.is_loopback()
                || ip.is_unspecified()
                || (s & 0xfe00) == 0xfc00
                || (s & 0xffc0) == 0xfe80
        }
        Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_) => false,
        _ => false,
    })
}

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
    nat: Nat,
    bootstrapped: bool,
    /// When to bootstrap the DHT again while its table is short, and the
    /// wait after that (doubling up to a minute).
    rebootstrap: (Instant, Duration),
    /// Kademlia's k (`NetConfig::dht_replication`).
    dht_replication: usize,
    provided: HashSet<Vec<u8>>,
    /// Keys whose last announcement timed out before reaching the closest
    /// peers (libp2p-kad then stores the record on no other node): announce again
    /// at the given time, backing off from 2 s to the minute of `reprovide`.
    provide_retry: HashMap<Vec<u8>, (Instant, Duration)>,
    bootstrap: Vec<Multiaddr>,
    /// Every open connection, per peer: whether a relay carries it.
    conns: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    /// When each connected peer's first open connection was established.
    since: HashMap<PeerId, Instant>,
    /// The relay under each relayed connection (ours to a peer behind a
    /// relay, or a peer's to us through our reservation).
    circuits: HashMap<ConnectionId, PeerId>,
    busy: Busy,
    /// Connection trimming: (low, high, grace); `None` on a relay.
    trim: Option<(usize, usize, Duration)>,
    paths: Arc<RwLock<HashMap<PeerId, Path>>>,
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
    /// Whether our relay service is advertised.
    relay_serving: bool,
    relay_refused: u64,
    relay_clients: HashSet<PeerId>,
    /// Relays we reached over TCP and dialled once more over QUIC, to learn
    /// the address our NAT gives our UDP socket (for hole punching).
    quic_probed: HashSet<PeerId>,
}

/// A relay this node knows of.
#[derive(Debug, Clone)]
struct KnownRelay {
    peer: PeerId,
    /// Its address without `/p2p`.
    addr: Multiaddr,
    /// Given with `--relay` (never forgotten, asked first).
    explicit: bool,
}

/// Most relays learnt from peers and the coordinator that a node keeps
/// (each one a candidate for a reservation).
const MAX_LEARNT_RELAYS: usize = 64;

impl EventLoop {
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
    fn probe_quic(&mut self, relay: PeerId, listen_addrs: &[Multiaddr]) {
        if self.quic_probed.contains(&relay) || !self.swarm.listeners().any(is_quic) {
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
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%relay, error = %e, "QUIC dial to the relay failed");
        }
    }

    async fn run(mut self) {
        let mut reprovide = tokio::time::interval(Duration::from_secs(60));
        let mut redial = tokio::time::interval(Duration::from_secs(3));
        let mut relay_tick = tokio::time::interval(Duration::from_secs(2));
        let mut trim_tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = relay_tick.tick() => self.ensure_reservation(),
                _ = trim_tick.tick() => self.trim_connections(),
                _ = redial.tick() => {
                    // Alone? Try the bootstrap peers again (they may have
                    // started after us).
                    if self.swarm.connected_peers().next().is_none() {
                        for addr in self.bootstrap.clone() {
                            let _ = self.swarm.dial(addr);
                        }
                    } else {
                        self.bootstrap_if_short();
                        self.retry_providing();
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

    /// The first DHT bootstrap runs before any connection is up; when the
    /// peers it asked were busy (a hub turning joiners away), the table
    /// stays short until Kademlia's own 5-minute refresh. Bootstrap again
    /// while it holds fewer than one bucket (k, 20 by default) of peers, backing off
    /// from 3 s to a minute.
    fn bootstrap_if_short(&mut self) {
        let now = Instant::now();
        if now < self.rebootstrap.0 {
            return;
        }
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else {
            return;
        };
        let known: usize = kad.kbuckets().map(|b| b.num_entries()).sum();
        if known >= self.dht_replication {
            return;
        }
        if kad.bootstrap().is_ok() {
            tracing::debug!(known, "DHT table short: bootstrapping again");
        }
        let wait = self.rebootstrap.1;
        self.rebootstrap = (now + wait, (wait * 2).min(Duration::from_secs(60)));
    }

    /// Announces again the keys whose announcement timed out, when due.
    fn retry_providing(&mut self) {
        let now = Instant::now();
        let due: Vec<Vec<u8>> = self
            .provide_retry
            .iter()
            .filter(|(k, (at, _))| *at <= now && self.provided.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            // Not again until this attempt has answered.
            if let Some((at, _)) = self.provide_retry.get_mut(&k) {
                *at = now + Duration::from_secs(60);
            }
            if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                && let Err(e) = kad.start_providing(RecordKey::new(&k))
            {
                tracing::debug!(error = %e, "start_providing failed");
            }
        }
    }

    fn reprovide(&mut self) {
        // Keys waiting for a retry are announced by `retry_providing`.
        let keys: Vec<Vec<u8>> = self
            .provided
            .iter()
            .filter(|k| !self.provide_retry.contains_key(*k))
            .cloned()
            .collect();
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
            Command::Barrier(reply) => {
                let _ = reply.send(());
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
            Command::AddRelay(addr) => {
                let Some(peer) = peer_of(&addr) else {
                    return;
                };
                if peer == *self.swarm.local_peer_id() || is_relayed(&addr) {
                    return;
                }
                if !self.relays.iter().any(|r| r.peer == peer) {
                    tracing::info!(relay = %addr, "relay known");
                    self.remember_relay(peer, strip_p2p(&addr));
                }
                if let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() {
                    kad.add_address(&peer, addr.clone());
                }
                if !self.swarm.is_connected(&peer) {
                    let _ = self.swarm.dial(addr);
                }
            }
            Command::DialPeer(peer, addrs) => {
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .condition(libp2p::swarm::dial_opts::PeerCondition::Disconnected)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::debug!(%peer, error = %e, "not dialing");
                }
            }
            Command::KeepWarm(peer, keep) => {
                let warm = &mut self.swarm.behaviour_mut().warm;
                warm.set(peer, keep);
                tracing::debug!(%peer, keep, warm = warm.len(), "warm connections");
            }
            Command::CloseRelayed(peer) => {
                let Some(c) = self.conns.get(&peer) else {
                    return;
                };
                if !c.values().any(|relayed| !relayed) {
                    return;
                }
                let relayed: Vec<ConnectionId> = c
                    .iter()
                    .filter(|(_, relayed)| **relayed)
                    .map(|(id, _)| *id)
                    .collect();
                for id in relayed {
                    tracing::debug!(%peer, "closing the relayed connection: a direct one exists");
                    self.swarm.close_connection(id);
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
        let Some((low, high, grace)) = self.trim else {
            return;
        };
        if self.conns.len() <= high {
            return;
        }
        let now = Instant::now();
        let mut keep: HashSet<PeerId> = HashSet::new();
        if let Some(g) = self.swarm.behaviour().gossipsub.as_ref() {
            keep.extend(g.all_mesh_peers().copied());
        }
        if let Some(r) = &self.relay_listener {
            keep.insert(r.relay);
        }
        keep.extend(self.relays.iter().filter(|r| r.explicit).map(|r| r.peer));
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
        let warm = &self.swarm.behaviour().warm;
        let peers: Vec<trim::Candidate> = self
            .conns
            .iter()
            .filter_map(|(p, c)| {
                Some(trim::Candidate {
                    peer: *p,
                    since: *self.since.get(p)?,
                    last_used: used.get(p).copied(),
                    relayed: c.values().any(|relayed| *relayed),
                    kept: keep.contains(p) || warm.contains(p),
                })
            })
            .collect();
        let limits = trim::Limits { low, high, grace };
        let mut closed = 0;
        for peer in trim::to_close(&peers, self.conns.len(), limits, now) {
            if self.swarm.disconnect_peer_id(peer).is_ok() {
                closed += 1;
            }
        }
        if closed > 0 {
            metrics::counter!("troop_peers_trimmed_total").increment(closed as u64);
            tracing::debug!(
                closed,
                connected = self.conns.len(),
                high,
                low,
                "closed idle connections above the peer limit"
            );
        }
    }

    /// Whether this node should hold a relay reservation: it was given a
    /// relay explicitly, or AutoNAT found it behind NAT.
    ///
    /// Until AutoNAT has answered (a probe can take 10 s), a node whose
    /// every address is a LAN one cannot be reached from outside without a
    /// port forward: it reserves at once and lets go if AutoNAT later finds
    /// it public.
    fn wants_relay(&self) -> bool {
        self.explicit_relay()
            || self.nat == Nat::Private
            || (self.nat == Nat::Unknown && self.lan_only())
    }

    fn explicit_relay(&self) -> bool {
        self.relays.iter().any(|r| r.explicit)
    }

    /// Every address we listen on or were confirmed at is a LAN one.
    fn lan_only(&self) -> bool {
        let direct = |a: &&Multiaddr| !is_relayed(a);
        let listen: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
        let mut any = false;
        for a in listen
            .iter()
            .chain(self.swarm.external_addresses())
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
    fn ensure_reservation(&mut self) {
        if !self.wants_relay() || self.relay_listener.is_some() {
            return;
        }
        let now = Instant::now();
        let local = *self.swarm.local_peer_id();
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
        let direct = |p: &PeerId| {
            self.conns
                .get(p)
                .is_some_and(|c| c.values().any(|relayed| !relayed))
        };
        let Some(KnownRelay { peer, addr, .. }) = usable.iter().find(|r| direct(&r.peer)).cloned()
        else {
            if let Some(r) = usable.first()
                && !self.swarm.is_connected(&r.peer)
            {
                let _ = self.swarm.dial(r.addr.clone().with(Protocol::P2p(r.peer)));
            }
            return;
        };
        let circuit = addr
            .clone()
            .with(Protocol::P2p(peer))
            .with(Protocol::P2pCircuit);
        match self.swarm.listen_on(circuit.clone()) {
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
    fn relay_lost(&mut self, peer: PeerId, why: &str) {
        if let Some(l) = self.relay_listener.take_if(|l| l.relay == peer) {
            tracing::warn!(relay = %peer, reason = why, "relay reservation lost; looking for another relay");
            // Already closed when the listener itself reported it: a no-op.
            self.swarm.remove_listener(l.id);
            self.relay_backoff
                .insert(peer, Instant::now() + RELAY_BACKOFF);
            self.ensure_reservation();
        }
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
            nat: self.nat.as_str().into(),
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
            relay_server: self.relay_serving,
            relay_refused: self.relay_refused,
            relay_clients: self.relay_clients.len(),
            hole_punched: self
                .punched
                .iter()
                .filter(|p| self.swarm.is_connected(p))
                .map(|p| p.to_string())
                .collect(),
            relayed_peers: self
                .conns
                .iter()
                .filter(|(_, c)| !c.is_empty() && c.values().all(|r| *r))
                .map(|(p, _)| p.to_string())
                .collect(),
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
            kad::Event::OutboundQueryProgressed {
                id, result, stats, ..
            } => match result {
                QueryResult::GetProviders(res) => {
                    let Some(&lookup) = self.provider_queries.get(&id) else {
                        return;
                    };
                    // libp2p-kad reports `FoundProviders` for every peer's
                    // answer, with an empty set from a peer that only knew
                    // closer peers: only a non-empty set is an answer.
                    let found = match &res {
                        Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                            let local = *self.swarm.local_peer_id();
                            providers.iter().filter(|p| **p != local).count()
                        }
                        _ => 0,
                    };
                    let last = !matches!(res, Ok(GetProvidersOk::FoundProviders { .. }));
                    tracing::debug!(
                        target: "troop_node::dht",
                        found,
                        requests = stats.num_requests(),
                        ok = stats.num_successes(),
                        failed = stats.num_failures(),
                        ms = stats.duration().map(|d| d.as_millis()).unwrap_or(0),
                        "provider lookup step"
                    );
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
                            if found > 0
                                && let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                                && let Some(mut q) = kad.query_mut(&id)
                            {
                                q.finish();
                            }
                        }
                        Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => {}
                        Err(e) => tracing::debug!(error = %e, "provider lookup failed"),
                    }
                    if found == 0 && !last {
                        // Not an answer yet: the query goes on to closer peers.
                        return;
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
                    // Nothing was stored: try again soon, not in a minute.
                    let key = e.key().to_vec();
                    let now = Instant::now();
                    let wait = self
                        .provide_retry
                        .get(&key)
                        .map_or(Duration::from_secs(2), |(_, w)| {
                            (*w * 2).min(Duration::from_secs(60))
                        });
                    self.provide_retry.insert(key, (now + wait, wait));
                    tracing::debug!(
                        target: "troop_node::dht",
                        error = %e,
                        requests = stats.num_requests(),
                        ok = stats.num_successes(),
                        "providing not replicated yet"
                    )
                }
                QueryResult::StartProviding(Ok(ok)) => {
                    self.provide_retry.remove(ok.key.as_ref());
                    tracing::debug!(
                        target: "troop_node::dht",
                        requests = stats.num_requests(),
                        ok = stats.num_successes(),
                        failed = stats.num_failures(),
                        "provider record stored"
                    )
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
        match &ev {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                if !relayed && endpoint.is_dialer() {
                    self.dialed
                        .insert(*peer_id, endpoint.get_remote_address().clone());
                }
                let remote = endpoint.get_remote_address();
                if !relayed && !self.conns.contains_key(peer_id) && !is_lan(remote) {
                    self.swarm
                        .behaviour_mut()
                        .autonat
                        .add_server(*peer_id, Some(remote.clone()));
                }
                // The newest connection's time: the grace covers it (a
                // direct connection that just replaced a relayed one).
                self.since.insert(*peer_id, Instant::now());
                if relayed && let Some(r) = circuit_relay(endpoint) {
                    self.circuits.insert(*connection_id, r);
                }
                let c = self.conns.entry(*peer_id).or_default();
                c.insert(*connection_id, relayed);
                let upgraded = !relayed && c.values().any(|r| *r);
                metrics::gauge!("troop_peers_connected").set(self.conns.len() as f64);
                self.update_path(*peer_id);
                if upgraded {
                    tracing::info!(peer = %peer_id, "direct connection next to the relayed one");
                    self.emit(NetEvent::Upgraded(*peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.circuits.remove(connection_id);
                if let Some(c) = self.conns.get_mut(peer_id) {
                    c.remove(connection_id);
                    if c.is_empty() {
                        self.conns.remove(peer_id);
                        self.since.remove(peer_id);
                        // Forget a gone peer's last use unless a job runs.
                        if let Some(mut b) = self.busy.locked()
                            && b.get(peer_id).is_some_and(|(n, _)| *n == 0)
                        {
                            b.remove(peer_id);
                        }
                    }
                }
                metrics::gauge!("troop_peers_connected").set(self.conns.len() as f64);
                self.update_path(*peer_id);
                if *num_established == 0 {
                    self.swarm.behaviour_mut().autonat.remove_server(peer_id);
                    self.dialed.remove(peer_id);
                    self.punched.remove(peer_id);
                    // Met again, a relay is probed over QUIC again (our
                    // NAT's UDP mapping may have changed meanwhile).
                    self.quic_probed.remove(peer_id);
                    let p = *peer_id;
                    self.relay_lost(p, "the connection to the relay closed");
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(relay) = self
                    .relay_listener
                    .as_ref()
                    .filter(|l| l.id == *listener_id)
                    .map(|l| l.relay)
                {
                    let why = match reason {
                        Ok(()) => "the relay listener closed".to_string(),
                        Err(e) => e.to_string(),
                    };
                    self.relay_lost(relay, &why);
                }
            }
            _ => {}
        }
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                let peer = *self.swarm.local_peer_id();
                tracing::info!(address = %with_p2p(address.clone(), peer), "listening");
                if let Some(mut l) = self.listen_addrs.writing()
                    && !l.contains(&address)
                {
                    l.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if let Some(mut l) = self.listen_addrs.writing() {
                    l.retain(|a| a != &address);
                }
            }
            // A relay reservation makes `<relay>/p2p-circuit` an address
            // others reach us at: it goes into adverts with the rest.
            SwarmEvent::ExternalAddrConfirmed { address } if is_relayed(&address) => {
                let peer = *self.swarm.local_peer_id();
                tracing::info!(address = %with_p2p(address.clone(), peer), "reachable through a relay");
                if let Some(mut l) = self.listen_addrs.writing()
                    && !l.contains(&address)
                {
                    l.push(address);
                }
            }
            SwarmEvent::ExternalAddrExpired { address } if is_relayed(&address) => {
                if let Some(mut l) = self.listen_addrs.writing() {
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
                // A peer that offers circuit relay, reached directly: a relay
                // to use if we turn out to be behind NAT.
                let direct = self
                    .conns
                    .get(&peer_id)
                    .and_then(|c| c.get(&connection_id))
                    .is_some_and(|relayed| !relayed);
                let offers_relay = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                if offers_relay
                    && direct
                    && peer_id != *self.swarm.local_peer_id()
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
                    self.probe_quic(peer_id, &info.listen_addrs);
                }
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
                    self.swarm.remove_listener(l.id);
                }
                self.ensure_reservation();
            }
            BehaviourEvent::Relay(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
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
            BehaviourEvent::Relay(ev) => tracing::debug!(?ev, "relay client"),
            BehaviourEvent::RelayServer(ev) => match ev {
                relay::Event::StatusChanged { status } => {
                    self.relay_serving = status == relay::Status::Enable;
                    tracing::info!(serving = self.relay_serving, "relay service");
                }
                relay::Event::ReservationReqDenied {
                    src_peer_id,
                    status,
                } => {
                    self.relay_refused += 1;
                    metrics::counter!("troop_relay_denied_total", "kind" => "reservation")
                        .increment(1);
                    tracing::info!(peer = %src_peer_id, ?status, "relay reservation refused");
                }
                relay::Event::CircuitReqDenied {
                    src_peer_id,
                    dst_peer_id,
                    status,
                } => {
                    self.relay_refused += 1;
                    metrics::counter!("troop_relay_denied_total", "kind" => "circuit").increment(1);
                    tracing::info!(src = %src_peer_id, dst = %dst_peer_id, ?status, "relay circuit refused");
                }
                relay::Event::ReservationReqAccepted {
                    src_peer_id,
                    renewed,
                } => {
                    self.relay_clients.insert(src_peer_id);
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
                    self.relay_clients.remove(&src_peer_id);
                }
                ev => tracing::debug!(?ev, "relay server"),
            },
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "hole punched: direct connection");
                    metrics::counter!("troop_hole_punch_total", "result" => "direct").increment(1);
                    self.punched.insert(remote_peer_id);
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed");
                    metrics::counter!("troop_hole_punch_total", "result" => "failed").increment(1);
                }
            },
            _ => {}
        }
    }
}

/// Asks the coordinator's `/bootstrap` for the relays its operator lists
/// and hands them to the swarm (used once AutoNAT finds us private). Runs
/// in the background; a coordinator that is away only means fewer relays.
pub fn learn_relays(client: crate::coordinator_client::CoordinatorClient, net: NetworkHandle) {
    tokio::spawn(async move {
        match client.bootstrap().await {
            Ok(b) => {
                for p in b.peers.into_iter().filter(|p| p.relay) {
                    for a in p.addresses {
                        match a.parse::<Multiaddr>() {
                            Ok(addr) if peer_of(&addr).is_some() => net.add_relay(addr).await,
                            _ => {
                                tracing::debug!(address = %a, "unusable relay address from /bootstrap")
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "no relays from the coordinator's /bootstrap"),
        }
    });
}
