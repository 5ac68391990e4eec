//! The client's address, as per-address limits key it.
//!
//! * Behind a trusted proxy the client is the rightmost `X-Forwarded-For`
//!   entry that is not itself a trusted proxy: a proxy that appends writes
//!   its peer on the right, and everything to the left of that may have been
//!   written by the client.
//! * An IPv6 client is keyed by its /64 (one home or one server gets a
//!   whole /64 and can pick any address in it); an IPv4-mapped IPv6 address
//!   is the IPv4 address it maps.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// An address block, `ADDR/LEN` (a bare address is a block of one): an
/// [`ipnet::IpNet`] that also parses a bare address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet(ipnet::IpNet);

impl IpNet {
    /// Whether `ip` lies in this block (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let net = if t.contains('/') {
            t.parse::<ipnet::IpNet>()
                .map_err(|e| format!("{s:.60}: not an address block: {e}"))?
        } else {
            let addr = t
                .parse::<IpAddr>()
                .map_err(|e| format!("{s:.60}: not an address: {e}"))?;
            ipnet::IpNet::from(canonical(addr))
        };
        Ok(Self(net.trunc()))
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports
/// for an IPv4 peer) as the IPv4 address; anything else unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The key per-address limits count under: an IPv4 address, or an IPv6
/// client's /64 (its first 64 bits, the rest zero).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: an address, perhaps with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:443`).
fn parse_entry(e: &str) -> Option<IpAddr> {
    let e = e.trim();
    e.parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            e.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse().ok())
        })
        .map(canonical)
}

/// The client's address of a request that came from `peer`.
///
/// With `trust_peer` (`--trusted-proxy`) the peer is a trusted proxy
/// whatever its address; otherwise it is one only when it lies in
/// `proxies` (`--trusted-proxy-net`). When it is, the `X-Forwarded-For`
/// entries (all such headers, in order) are read from the right, skipping
/// trusted proxies (the peer's own address and `proxies`): the first other
/// one is the client. When every entry is a trusted proxy, the leftmost
/// is; an entry that is not an address ends the walk at the peer.
pub fn client_addr(
    headers: &HeaderMap,
    peer: IpAddr,
    trust_peer: bool,
    proxies: &[IpNet],
) -> IpAddr {
    let peer = canonical(peer);
    let listed = |ip: IpAddr| proxies.iter().any(|n| n.contains(ip));
    if !(trust_peer || listed(peer)) {
        return peer;
    }
    let trusted = |ip: IpAddr| ip == peer || listed(ip);
    let mut entries: Vec<&str> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(v) = v.to_str() else {
            return peer;
        };
        entries.extend(v.split(',').map(str::trim).filter(|e| !e.is_empty()));
    }
    let mut leftmost = peer;
    for e in entries.iter().rev() {
        let Some(ip) = parse_entry(e) else {
            return peer;
        };
        if !trusted(ip) {
            return ip;
        }
        leftmost = ip;
    }
    leftmost
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                "x-forwarded-for",
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        h
    }

    const PROXY: &str = "10.0.0.2";

    #[test]
    fn the_rightmost_entry_that_is_not_a_proxy_is_the_client() {
        let at = |values: &[&str], nets: &[IpNet]| client_addr(&xff(values), ip(PROXY), true, nets);
        // The client wrote the leftmost entry; the proxy appended the real one.
        assert_eq!(at(&["6.6.6.6, 203.0.113.7"], &[]), ip("203.0.113.7"));
        // The proxy's own address in the chain is skipped.
        assert_eq!(
            at(&["6.6.6.6, 203.0.113.7, 10.0.0.2"], &[]),
            ip("203.0.113.7")
        );
        // So are the operator's other proxies.
        let nets: Vec<IpNet> = vec!["10.1.0.0/16".parse().expect("net")];
        assert_eq!(
            at(&["6.6.6.6, 203.0.113.7, 10.1.2.3, 10.1.9.9"], &nets),
            ip("203.0.113.7")
        );
        // Several headers are one list, in order.
        assert_eq!(at(&["6.6.6.6", "203.0.113.7"], &[]), ip("203.0.113.7"));
        // Ports are ignored.
        assert_eq!(at(&["6.6.6.6, 203.0.113.7:5555"], &[]), ip("203.0.113.7"));
        assert_eq!(at(&["[2001:db8::7]:443"], &[]), ip("2001:db8::7"));
        // Every entry a proxy: the leftmost.
        assert_eq!(at(&["10.1.0.1, 10.0.0.2"], &nets), ip("10.1.0.1"));
        // No header, or an entry that is not an address: the peer.
        assert_eq!(at(&[], &[]), ip(PROXY));
        assert_eq!(at(&["203.0.113.7, unknown"], &[]), ip(PROXY));
        // An IPv4-mapped entry is the IPv4 address.
        assert_eq!(at(&["::ffff:203.0.113.7"], &[]), ip("203.0.113.7"));
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_proxy() {
        let h = xff(&["203.0.113.7"]);
        assert_eq!(client_addr(&h, ip(PROXY), false, &[]), ip(PROXY));
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().expect("net")];
        assert_eq!(client_addr(&h, ip(PROXY), false, &nets), ip("203.0.113.7"));
        assert_eq!(
            client_addr(&h, ip("198.51.100.1"), false, &nets),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            limit_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(limit_key(ip("2001:db8:1:2::1")), ip("2001:db8:1:2::"));
        assert_ne!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(limit_key(ip("::ffff:203.0.113.7")), ip("203.0.113.7"));
        assert_eq!(limit_key(ip("203.0.113.7")), ip("203.0.113.7"));
    }

    #[test]
    fn nets_parse_and_match() {
        let n: IpNet = "192.168.0.0/16".parse().expect("net");
        assert!(n.contains(ip("192.168.44.1")));
        assert!(n.contains(ip("::ffff:192.168.44.1")));
        assert!(!n.contains(ip("192.169.0.1")));
        let one: IpNet = "2001:db8::1".parse().expect("net");
        assert!(one.contains(ip("2001:db8::1")));
        assert!(!one.contains(ip("2001:db8::2")));
        let all: IpNet = "0.0.0.0/0".parse().expect("net");
        assert!(all.contains(ip("8.8.8.8")));
        assert!(!all.contains(ip("2001:db8::1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nope".parse::<IpNet>().is_err());
        assert_eq!(n.to_string(), "192.168.0.0/16");
    }
}
