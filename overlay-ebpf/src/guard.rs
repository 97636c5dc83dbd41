//! The socket guard.
//!
//! Attached: the node's network namespace (`sk_lookup`), so it runs whenever the kernel looks
//! for the socket of an arriving UDP datagram or TCP connection.
//! Sees: every datagram to a local address that reached the host's UDP layer, whatever the
//! interface: the only way a tunnel frame gets to the kernel's vxlan socket, which listens
//! on every address and decapsulates whatever it is given.
//! Does: an IPv4 UDP datagram to our tunnel port passes only if it arrived on the underlay
//! interface from a peer and is addressed to the node's underlay address, which is what the
//! decap program (TC or XDP) has already checked. One to another of the node's addresses
//! (which decap leaves alone), or from anywhere else (a local container sending to its own
//! node's address, loopback, another NIC) is dropped and counted as `foreign_tunnel`, so no
//! forged inner packet enters the host unchecked; the kernel answers it as a closed port
//! would. The peer check matters for the node's own processes: a datagram sent to a local
//! address owned by the underlay interface is looked up with that interface as its
//! ingress, though it never crossed it.
//! IPv6 (a dual-stack node's `flannel-v6.<VNI>` socket): the same, against the node's public
//! IPv6 address and the IPv6 peers, once the agent has configured the IPv6 side.
//! Not handled: every other protocol and port pass untouched.

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use overlay_common::{Counter, Hook, IPPROTO_UDP};

use crate::{
    maps::{count, is_peer, is_peer6, ready_config, ready_config6},
    monitor,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// An IPv6 address of the lookup context (four u32 in network order) as bytes.
#[inline(always)]
fn ip6_bytes(a: &[u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = a[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[sk_lookup]
pub fn sk_lookup_guard(ctx: SkLookupContext) -> u32 {
    let Some(cfg) = ready_config() else { return SK_PASS };
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    let l = unsafe { &*ctx.lookup };
    if l.family == AF_INET6 && l.protocol == IPPROTO_UDP as u32 && l.local_port == cfg.port as u32 {
        let Some(c6) = ready_config6() else { return SK_PASS };
        if l.ingress_ifindex == cfg.underlay_ifindex
            && ip6_bytes(&l.local_ip6) == c6.underlay_ip
            && is_peer6(&ip6_bytes(&l.remote_ip6))
        {
            return SK_PASS;
        }
        count(Counter::ForeignTunnel);
        return SK_DROP;
    }
    // local_port is in host order in this context.
    if l.family != AF_INET || l.protocol != IPPROTO_UDP as u32 || l.local_port != cfg.port as u32 {
        return SK_PASS;
    }
    // remote_ip4 and local_ip4 are in network order, as PeerAddr and underlay_ip.
    if l.ingress_ifindex == cfg.underlay_ifindex
        && l.local_ip4.to_ne_bytes() == cfg.underlay_ip
        && is_peer(&l.remote_ip4.to_ne_bytes())
    {
        return SK_PASS;
    }
    count(Counter::ForeignTunnel);
    if monitor::wanted(false) {
        // remote_port is in network order in this context, local_port in host order.
        let sport = u16::from_be(l.remote_port as u16);
        let local = l.local_ip4.to_ne_bytes();
        monitor::report_addrs(Hook::SocketGuard, Counter::ForeignTunnel, l.remote_ip4.to_ne_bytes(), local, sport, l.local_port as u16);
    }
    SK_DROP
}
