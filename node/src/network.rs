//! The libp2p side of a node: one event loop owns the swarm; the rest of
//! the program talks to it through a cloneable [`NetworkHandle`] (commands
//! on a bounded channel, answers on oneshots) and hears from it through a
//! bounded event channel. Inference streams don't go through the loop at
//! all: they are opened and accepted with `libp2p_stream`'s `Control`.
//!
//! The loop is a thin dispatcher (`event_loop.rs`) over the network's
//! jobs, each a struct of its own: discovery in the DHT (`discovery.rs`),
//! reach through NAT and relays (`reach.rs`), the relay service offered
//! to others (`relay_server.rs`) and the connection table with its
//! trimming (`connections.rs`, `trim.rs`); `swarm.rs` builds the swarm
//! and `addr.rs` reads multiaddrs.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use troop_protocol::sync::{MutexExt as _, RwLockExt as _};

use anyhow::Context;
use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, kad};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

mod addr;
mod connections;
mod discovery;
mod event_loop;
mod reach;
mod relay_server;
mod swarm;
mod trim;
mod warm;

pub use addr::{dialable, is_relayed, peer_of, with_p2p};
use addr::{is_unspecified, strip_p2p, tcp_port_free};
use connections::{Busy, Connections};
use discovery::Discovery;
use event_loop::EventLoop;
use reach::{KnownRelay, Reach};
use relay_server::RelayServer;
use swarm::build_swarm;

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
    /// Answered once connected to the peer (at once when connected), or
    /// with why the dial failed; one dial per peer however many ask.
    Connect(PeerId, oneshot::Sender<Result<(), String>>),
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

    /// The addresses to give others (adverts, registration, heartbeats):
    /// our listen addresses that are [`dialable`].
    pub fn advertised_addrs(&self) -> Vec<String> {
        dialable(self.listen_addrs())
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// How we are connected to `peer` right now.
    pub fn path(&self, peer: &PeerId) -> Path {
        self.paths
            .reading()
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

    /// Opens a stream of `protocol` to `peer`. A peer not connected yet is
    /// dialled once however many streams wait for it (libp2p-stream alone
    /// dials per stream and fails every waiting stream when any dial to
    /// the peer fails); the streams go out once the connection is up.
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: libp2p::StreamProtocol,
    ) -> Result<libp2p::Stream, String> {
        if self.path(&peer) == Path::None {
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(Command::Connect(peer, reply))
                .await
                .map_err(|_| "the network stopped".to_string())?;
            rx.await.map_err(|_| "the network stopped".to_string())??;
        }
        self.control
            .clone()
            .open_stream(peer, protocol)
            .await
            .map_err(|e| e.to_string())
    }

    /// Dials `peer` on all of `addrs` at once (one connection at most),
    /// unless it is connected already or a dial to it is under way.
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
        discovery: Discovery::new(cfg.bootstrap.clone(), cfg.dht_replication.get()),
        connecting: HashMap::new(),
        reach: Reach::new(relays),
        relay_server: RelayServer::new(cfg.relay_server.is_some() && cfg.relay_always),
        table: Connections::new(
            busy,
            paths,
            cfg.relay_server.is_none().then_some(trim::Limits {
                low: cfg.peers_low.min(cfg.peers_high),
                high: cfg.peers_high,
                grace: cfg.peers_grace,
            }),
        ),
    };
    let task = tokio::spawn(ev_loop.run());
    if let Some(mut t) = handle.task.locked() {
        *t = Some(task.abort_handle());
    }
    Ok((handle, event_rx))
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
