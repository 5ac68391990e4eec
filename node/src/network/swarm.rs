//! What the swarm runs and how it is built from a [`NetConfig`].

use std::time::Duration;

use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns,
    noise, ping, relay, tcp, yamux,
};
use troop_protocol::advert::{ADVERT_TOPIC, KAD_PROTOCOL};

use super::{NetConfig, RelayLimits, warm};

/// What the swarm runs.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub(super) limits: connection_limits::Behaviour,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    pub(super) gossipsub: Toggle<gossipsub::Behaviour>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) autonat: autonat::Behaviour,
    pub(super) relay: relay::client::Behaviour,
    pub(super) relay_server: Toggle<relay::Behaviour>,
    pub(super) dcutr: dcutr::Behaviour,
    pub(super) stream: libp2p_stream::Behaviour,
    pub(super) warm: warm::Behaviour,
}

impl RelayLimits {
    pub(super) fn config(&self) -> relay::Config {
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

/// Builds the swarm: transports (TCP, QUIC, in-process memory, relay
/// circuits) and the behaviours as `cfg` asks.
pub(super) fn build_swarm(cfg: &NetConfig) -> anyhow::Result<Swarm<Behaviour>> {
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
