//! Conversions between std socket addresses and the kernel's byte layout.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_common::{AF_INET, AF_INET6, ListenerKey, SockAddr};

fn words(ip: IpAddr) -> (u32, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (AF_INET6, [word(0), word(4), word(8), word(12)])
        }
    }
}

pub fn to_sock_addr(addr: SocketAddr) -> SockAddr {
    let (family, addr_words) = words(addr.ip());
    SockAddr {
        family,
        port: u32::from(addr.port()),
        addr: addr_words,
    }
}

pub fn to_listener_key(ip: IpAddr) -> ListenerKey {
    let (family, addr) = words(ip);
    ListenerKey {
        family,
        reserved: 0,
        addr,
    }
}

/// `None` for a family the kernel side never writes.
pub fn from_sock_addr(addr: &SockAddr) -> Option<SocketAddr> {
    let port = u16::try_from(addr.port).ok()?;
    let ip = match addr.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(addr.addr[0].to_ne_bytes())),
        AF_INET6 => {
            let mut octets = [0u8; 16];
            for (i, word) in addr.addr.iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(octets);
            // A dual-stack socket connecting to a v4-mapped address really talks IPv4.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_both_families() {
        for text in ["10.96.0.10:80", "[fd00:10:96::a]:8080"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(from_sock_addr(&to_sock_addr(addr)), Some(addr), "{text}");
        }
    }

    #[test]
    fn ipv4_bytes_are_in_network_order() {
        let addr = to_sock_addr("10.1.2.3:1".parse().unwrap());
        assert_eq!(addr.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
    }

    #[test]
    fn v4_mapped_becomes_v4() {
        let addr = to_sock_addr("[::ffff:10.0.0.1]:80".parse().unwrap());
        assert_eq!(from_sock_addr(&addr), Some("10.0.0.1:80".parse().unwrap()));
    }
}
