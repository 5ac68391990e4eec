//! What a multiaddr says: its peer, whether a relay carries it, whether
//! it is a LAN one, and the check that a TCP port is free.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// Whether an address goes through a circuit relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
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

/// The relay a relayed connection goes through: the peer named just before
/// `/p2p-circuit` in its circuit address.
pub(super) fn circuit_relay(endpoint: &libp2p::core::ConnectedPoint) -> Option<PeerId> {
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
pub(super) fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
        a.pop();
    }
    a
}

/// `0.0.0.0` or `::`: an address that names no interface.
pub(super) fn is_unspecified(addr: &Multiaddr) -> bool {
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
pub(super) fn tcp_port_free(addr: &Multiaddr) -> anyhow::Result<()> {
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
pub(super) fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

/// The IP of an address, if it names one.
pub(super) fn ip_of(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(ip.into()),
        Protocol::Ip6(ip) => Some(ip.into()),
        _ => None,
    })
}

/// Of a peer's addresses, those worth dialling: never an unspecified IP
/// (`0.0.0.0`, `::`) or port 0, and loopback ones only when the peer gives
/// nothing else (a peer on the same host; one elsewhere that lists its
/// loopback next to its real addresses would have us dial our own host).
pub fn dialable(addrs: Vec<Multiaddr>) -> Vec<Multiaddr> {
    let port_zero = |a: &Multiaddr| {
        a.iter()
            .any(|p| matches!(p, Protocol::Tcp(0) | Protocol::Udp(0)))
    };
    let loopback = |a: &Multiaddr| ip_of(a).is_some_and(|ip| ip.is_loopback());
    let usable: Vec<Multiaddr> = addrs
        .into_iter()
        .filter(|a| !is_unspecified(a) && !port_zero(a))
        .collect();
    if usable.iter().all(loopback) {
        return usable;
    }
    usable.into_iter().filter(|a| !loopback(a)).collect()
}

/// An address on a LAN, loopback or carrier-grade NAT range: a peer there
/// says nothing about whether the internet reaches us.
pub(super) fn is_lan(addr: &Multiaddr) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_dialled_only_when_a_peer_has_nothing_else_and_wildcards_never() {
        let m = |v: &[&str]| -> Vec<Multiaddr> {
            v.iter().map(|s| s.parse().expect("multiaddr")).collect()
        };
        assert_eq!(
            dialable(m(&[
                "/ip4/127.0.0.1/tcp/4001",
                "/ip4/0.0.0.0/tcp/4001",
                "/ip4/192.168.1.5/tcp/0",
                "/ip4/192.168.1.5/tcp/4001",
                "/ip6/::1/udp/4001/quic-v1",
            ])),
            m(&["/ip4/192.168.1.5/tcp/4001"])
        );
        let same_host = m(&["/ip4/127.0.0.1/tcp/4001", "/ip6/::1/tcp/4001"]);
        assert_eq!(dialable(same_host.clone()), same_host);
        assert!(dialable(m(&["/ip4/0.0.0.0/tcp/1"])).is_empty());
    }

    fn ma(s: &str) -> Multiaddr {
        s.parse().expect("a multiaddr")
    }

    #[test]
    fn a_circuit_address_names_the_peer_behind_the_relay() {
        let (relay, worker) = (PeerId::random(), PeerId::random());
        let circuit = ma(&format!(
            "/ip4/10.0.0.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{worker}"
        ));
        assert_eq!(peer_of(&circuit), Some(worker));
        assert!(is_relayed(&circuit));
        let ep = libp2p::core::ConnectedPoint::Dialer {
            address: circuit.clone(),
            role_override: libp2p::core::Endpoint::Dialer,
            port_use: libp2p::core::transport::PortUse::Reuse,
        };
        assert_eq!(circuit_relay(&ep), Some(relay));
        let direct = ma(&format!("/ip4/10.0.0.1/tcp/4001/p2p/{relay}"));
        assert!(!is_relayed(&direct));
        assert_eq!(strip_p2p(&direct), ma("/ip4/10.0.0.1/tcp/4001"));
        assert_eq!(with_p2p(strip_p2p(&direct), relay), direct);
        assert_eq!(with_p2p(direct.clone(), worker), direct);
    }

    #[test]
    fn lan_loopback_and_cgnat_addresses_say_nothing_about_the_internet() {
        for lan in [
            "/ip4/192.168.1.5/tcp/1",
            "/ip4/10.1.2.3/tcp/1",
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/100.64.0.1/udp/1/quic-v1",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
            "/ip6/::1/tcp/1",
        ] {
            assert!(is_lan(&ma(lan)), "{lan}");
        }
        for public in [
            "/ip4/8.8.8.8/tcp/1",
            "/ip4/100.128.0.1/tcp/1",
            "/ip6/2001:db8::1/tcp/1",
            "/dns4/relay.example/tcp/1",
        ] {
            assert!(!is_lan(&ma(public)), "{public}");
        }
        assert!(is_unspecified(&ma("/ip4/0.0.0.0/tcp/1")));
        assert!(is_quic(&ma("/ip4/8.8.8.8/udp/1/quic-v1")));
        assert_eq!(
            ip_of(&ma("/ip4/8.8.8.8/tcp/1")),
            Some(std::net::IpAddr::from([8, 8, 8, 8]))
        );
    }
}
