//! Which addresses the gateway reaches on a remote party's or a user's word: a
//! file link, a homeserver URL. None may lead to the gateway's own machine or
//! network unless the admin said so.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is an address of the public internet: not loopback, private
/// (RFC 1918, IPv6 unique local fc00::/7), link-local, shared (CGNAT,
/// 100.64.0.0/10), unspecified, broadcast, multicast, documentation,
/// benchmarking (198.18.0.0/15), IETF protocol assignments (192.0.0.0/24) or
/// reserved; IPv4-mapped and IPv4-compatible IPv6 addresses as their IPv4; the
/// IPv6 prefixes that lead to IPv4 through a translator or relay (NAT64
/// 64:ff9b::/96 and the local-use 64:ff9b:1::/48, 6to4 2002::/16), the old
/// site-local fec0::/10, documentation 2001:db8::/32 and discard 100::/64 are not public.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, c, _] = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240)
}

fn is_public_v6(v6: Ipv6Addr) -> bool {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = v6.segments();
    // ::/96: unspecified, loopback and the deprecated IPv4-compatible addresses.
    if s[..6] == [0; 6] {
        return s[6] != 0 && is_public_v4(Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32));
    }
    !(v6.is_multicast()
        || v6.is_unique_local()
        || v6.is_unicast_link_local()
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1))
        || s[0] == 0x2002
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x0100 && s[1..4] == [0; 3]))
}
