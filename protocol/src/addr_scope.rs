//! Where a multiaddr can be reached from: the same host (loopback), the
//! same network (private, link-local, CGNAT, ULA), anywhere (public), or
//! nowhere (unspecified). The coordinator's `/bootstrap` hands each caller
//! only the addresses its own place can reach.

use std::net::IpAddr;

/// How far an address reaches, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// `0.0.0.0`, `::`: a listening socket's wildcard, never dialable.
    Unspecified,
    /// `127.0.0.0/8`, `::1`: only from the same host.
    Loopback,
    /// Private, link-local, shared (CGNAT) or unique-local: only from the
    /// same network.
    Lan,
    /// Anything else, and names (`/dns4/...`): from anywhere.
    Public,
}

/// The scope of an IP address.
pub fn ip_scope(ip: IpAddr) -> Scope {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_unspecified() {
                Scope::Unspecified
            } else if v4.is_loopback() {
                Scope::Loopback
            } else if v4.is_private()
                || v4.is_link_local()
                || (o[0] == 100 && (64..128).contains(&o[1]))
            {
                Scope::Lan
            } else {
                Scope::Public
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            if v6.is_unspecified() {
                Scope::Unspecified
            } else if v6.is_loopback() {
                Scope::Loopback
            } else if (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80 {
                Scope::Lan
            } else {
                Scope::Public
            }
        }
    }
}

/// The scope of a multiaddr (text): that of its first IP (a relayed
/// address's is its relay's); names are public; `None` when it starts
/// with neither an IP nor a name.
pub fn multiaddr_scope(addr: &str) -> Option<Scope> {
    let mut parts = addr.split('/').skip(1);
    let proto = parts.next()?;
    let value = parts.next()?;
    match proto {
        "ip4" | "ip6" => value.parse::<IpAddr>().ok().map(ip_scope),
        "dns" | "dns4" | "dns6" | "dnsaddr" => Some(Scope::Public),
        _ => None,
    }
}

/// Whether a caller at `caller` (its IP as the coordinator sees it) can
/// reach `addr`: a caller on the same host reaches everything dialable,
/// one on a private network also LAN addresses (it may share the
/// worker's), one elsewhere only public and relayed ones.
pub fn reachable_from(caller: IpAddr, addr: &str) -> bool {
    let Some(scope) = multiaddr_scope(addr) else {
        return false;
    };
    match ip_scope(caller) {
        Scope::Loopback | Scope::Unspecified => scope != Scope::Unspecified,
        Scope::Lan => scope >= Scope::Lan,
        Scope::Public => scope == Scope::Public,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_gets_the_addresses_its_place_reaches() {
        let addrs = [
            "/ip4/127.0.0.1/tcp/4001",
            "/ip4/0.0.0.0/tcp/4001",
            "/ip4/192.168.1.5/tcp/4001",
            "/ip6/fe80::1/tcp/4001",
            "/ip4/100.64.0.9/udp/4001/quic-v1",
            "/ip4/203.0.113.7/tcp/4001",
            "/ip6/::1/tcp/4001",
            "/dns4/worker.example/tcp/4001",
            "/ip4/198.51.100.2/tcp/4001/p2p/12D3KooWRelay/p2p-circuit",
            "/p2p/12D3KooWX",
        ];
        let got = |caller: &str| -> Vec<&str> {
            let ip: IpAddr = caller.parse().expect("ip");
            addrs
                .iter()
                .copied()
                .filter(|a| reachable_from(ip, a))
                .collect()
        };
        assert_eq!(
            got("198.51.100.9"),
            vec![
                "/ip4/203.0.113.7/tcp/4001",
                "/dns4/worker.example/tcp/4001",
                "/ip4/198.51.100.2/tcp/4001/p2p/12D3KooWRelay/p2p-circuit",
            ]
        );
        let lan = got("10.0.0.3");
        assert!(lan.contains(&"/ip4/192.168.1.5/tcp/4001"));
        assert!(!lan.contains(&"/ip4/127.0.0.1/tcp/4001"));
        assert!(!lan.contains(&"/ip6/::1/tcp/4001"));
        let same_host = got("127.0.0.1");
        assert!(same_host.contains(&"/ip4/127.0.0.1/tcp/4001"));
        assert!(!same_host.contains(&"/ip4/0.0.0.0/tcp/4001"));
        assert_eq!(got("::ffff:127.0.0.1"), same_host);
    }
}
