//! Decapsulation.
//!
//! Attached: the underlay interface, either as TCX ingress (`tc_ingress_decap`) or as native
//! XDP (`xdp_decap`, vxlan only, for NICs).
//! Sees: every frame the node receives on its underlay.
//! Does: accepts only tunnel frames for us: UDP to our port, outer IPv4 without options,
//! from an underlay address in the peer table, with our VNI and exactly the I
//! flag (VXLAN), carrying an IPv4 packet for this node's subnet whose source belongs to the
//! sending peer. What happens to an accepted frame depends on the delivery the agent chose:
//! - kernel (the default for vxlan; always with XDP): the frame passes unchanged to the
//!   kernel's vxlan device, which decapsulates it as on a stock flannel node;
//! - stack (udp backend): TC strips the outer headers (keeping GSO sizes) and redirects the
//!   inner packet into the overlay device's ingress.
//! Every way, the inner packet enters the host on the overlay device and crosses its
//! netfilter (conntrack, NAT, FORWARD) and reverse-path filter, both directions of every
//! flow alike. There is no path around the host's netfilter.
//! flannel's ipip backend: IP-in-IP (protocol 4) to our address gets the same checks (a
//! peer's, no options, an inner IPv4 packet for our subnet from the sender's subnet) and
//! passes unchanged to the kernel's flannel.ipip, which decapsulates it; the fragment rules
//! below apply to it too, with the inner IPv4 header as the checked bytes.
//! Fragmented tunnel datagrams (vxlan): the first fragment must carry the tunnel and inner
//! headers whole and pass every check a whole frame passes; a later fragment to our address
//! may not start inside those headers (RFC 1858). The kernel then reassembles the datagram
//! and hands it to its vxlan device through the socket guard, so no reassembled datagram
//! brings headers no check saw. Frames to our address whose headers cannot be read to their
//! end (an IPv6 extension-header chain too long to walk) are dropped.
//! Not handled: everything that is not addressed to our port passes untouched; frames to our
//! port that fail a check are dropped and counted by reason.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_INGRESS, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::error;
use overlay_common::{
    check_first_fragment, check_first_fragment_ipip, check_outer, check_outer6, check_outer_ipip, check_outer6_fragment, check_vxlan, checked_bytes, classify_ipv4,
    config_flags, ecn_decapsulate, ethertype, inner_ipv4_addrs, later_fragment_overlaps, udp_dst_port, Counter,
    DataplaneConfig, EncapMode, Fragment, Hook, Ipv4Class, PeerStats, CHECKED_BYTES6, ECN_CE, ECN_MASK, ETH_HLEN,
    ETH_P_IPV4, ETH_P_IPV6, FRAG6_HLEN, IPIP_OVERHEAD, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, TUNNEL_PAYLOAD_OFF, UDP_HLEN, UDP_OVERHEAD,
    VXLAN_HLEN, VXLAN_OVERHEAD,
};

use crate::{
    maps::{account_rx, count, is_peer, peer6_stats, peer_stats, ready_config, ready_config6, VTEP6_BY_SUBNET, VTEP_BY_SUBNET},
    monitor,
    packet::Packet,
};

/// TCX's "not decided here": the frame goes on to the programs attached after ours and to
/// legacy tc filters, then to the stack. TC_ACT_OK would end the chain (TCX_PASS), hiding
/// the node's ordinary traffic from everything after us.
const TCX_NEXT: i32 = TC_ACT_UNSPEC;

/// What to do with a frame that is not (or not a valid) tunnel frame for us.
enum Verdict {
    /// Not ours: let the kernel have it, untouched.
    Pass,
    /// Ours but invalid: drop and count.
    Drop(Counter),
    /// A dual-stack node's IPv6 tunnel frame that passed every check, already counted: on to
    /// the kernel's flannel-v6 device.
    Accepted6,
}

impl From<Counter> for Verdict {
    fn from(c: Counter) -> Self {
        Verdict::Drop(c)
    }
}

/// A valid tunnel frame, ready to strip.
struct Tunnel {
    /// The sending peer's counters (found by the membership check).
    stats: *mut PeerStats,
    /// Outer Ethernet header: destination (our underlay MAC), then source.
    outer_eth: [u8; ETH_HLEN],
    /// Bytes between the outer Ethernet header and the inner IPv4 header.
    strip: usize,
    inner_len: usize,
    /// The outer header's ECN field says congestion experienced (RFC 6040 applies).
    outer_ce: bool,
}

impl Tunnel {
    /// A frame of `len` bytes that passed every check: `strip` bytes of tunnel between its
    /// outer Ethernet header `eth` and the inner packet, outer IPv4 header `ip`.
    #[inline(always)]
    fn new(stats: *mut PeerStats, eth: [u8; ETH_HLEN], ip: &[u8; IPV4_HLEN], strip: usize, len: usize) -> Self {
        Tunnel { stats, outer_eth: eth, strip, inner_len: len - ETH_HLEN - strip, outer_ce: ip[1] & ECN_MASK == ECN_CE }
    }
}

/// `N` bytes of `a` from `off` (constant offsets: no bounds check survives compilation).
#[inline(always)]
fn sub<const M: usize, const N: usize>(a: &[u8; M], off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = a[off + i];
        i += 1;
    }
    out
}

/// The one decision both hooks share.
#[inline(always)]
fn classify<P: Packet>(p: &P, cfg: &DataplaneConfig) -> Result<Tunnel, Verdict> {
    let len = p.len();
    let merged = p.merged();
    // One read for the outer Ethernet and IPv4 headers (without options). Too short for
    // them: nothing says it is ours; the stack judges it.
    let head: [u8; ETH_HLEN + IPV4_HLEN] = p.read_head(0).ok_or(Verdict::Pass)?;
    let eth: [u8; ETH_HLEN] = sub(&head, 0);
    if ethertype(&eth) == ETH_P_IPV6 {
        return match classify6(p, cfg, len, merged) {
            V6_OK => Err(Verdict::Accepted6),
            V6_PASS => Err(Verdict::Pass),
            c => Err(Verdict::Drop(Counter::ALL.get(c as usize).copied().unwrap_or(Counter::Truncated))),
        };
    }
    if ethertype(&eth) != ETH_P_IPV4 {
        return Err(Verdict::Pass);
    }
    let ip: [u8; IPV4_HLEN] = sub(&head, ETH_HLEN);
    let (ihl, fragment) = match classify_ipv4(&ip) {
        Ipv4Class::Udp { header_len, fragment } if header_len >= IPV4_HLEN => (header_len, fragment),
        Ipv4Class::Ipip { header_len, fragment } if header_len >= IPV4_HLEN => {
            return classify_ipip(p, cfg, eth, &ip, header_len, fragment, len, merged);
        }
        _ => return Err(Verdict::Pass),
    };
    // A tunnel frame for another host (this node forwards, or the NIC is promiscuous) is not
    // ours to open; the socket guard keeps frames for the node's other addresses from the
    // kernel's vxlan socket.
    if ip[16..20] != cfg.underlay_ip {
        return Err(Verdict::Pass);
    }
    // An ipip node's tunnel is protocol 4, not UDP (classify_ipip).
    let mode = match cfg.encap_mode() {
        Some(m @ (EncapMode::Vxlan | EncapMode::Udp)) => m,
        _ => return Err(Verdict::Pass),
    };
    // A later fragment has no UDP header to say whose it is. The kernel reassembles it with
    // the first fragment, whose headers are checked below; one that starts inside those
    // headers could replace them after the check, so it goes (the kernel also discards a
    // datagram whose fragments overlap; this keeps one that is tiny or out of order from
    // being the one that counts).
    if let Fragment::Later { offset } = fragment {
        if later_fragment_overlaps(offset, checked_bytes(mode)) {
            return Err(Counter::FragmentOverlap.into());
        }
        return Err(Verdict::Pass);
    }
    let udp: [u8; UDP_HLEN] = if ihl == IPV4_HLEN {
        p.read_head(ETH_HLEN + IPV4_HLEN).ok_or(Verdict::Pass)?
    } else {
        p.read(ETH_HLEN + ihl).ok_or(Verdict::Pass)?
    };
    if udp_dst_port(&udp) != cfg.port {
        return Err(Verdict::Pass);
    }
    // From here on the frame is addressed to us.
    if ihl != IPV4_HLEN {
        return Err(Counter::OuterIpOptions.into());
    }
    let peer = [ip[12], ip[13], ip[14], ip[15]];
    if fragment == Fragment::First {
        // A datagram too big for some link between the nodes (its sender allowed
        // fragmentation, as stock flannel's device always does). Its first fragment must
        // carry the tunnel and inner headers whole and pass every check a whole frame
        // passes; then the kernel reassembles it, and the socket guard checks the datagram
        // (a peer, on the underlay) before the kernel's vxlan device decapsulates it. The udp
        // backend has no kernel socket to reassemble for.
        check_first_fragment(&ip, &udp, len, checked_bytes(mode))?;
        if !is_peer(&peer) {
            return Err(Counter::UnknownPeer.into());
        }
        if mode != EncapMode::Vxlan {
            return Err(Counter::OuterFragment.into());
        }
        check_inner(p, cfg, mode, peer)?;
        count(Counter::FragmentToKernel);
        return Err(Verdict::Pass);
    }
    // What ip_rcv and udp_rcv would check: the paths that decapsulate here skip them.
    check_outer(&ip, &udp, len, merged)?;
    // Who sent it comes before what is in it: a non-peer's frame is counted as such,
    // however short.
    let stats = peer_stats(&peer).ok_or(Counter::UnknownPeer)?;
    let strip = check_inner(p, cfg, mode, peer)?;
    Ok(Tunnel::new(stats, eth, &ip, strip, len))
}

/// An IP-in-IP packet (flannel's ipip backend): on an ipip node, addressed to our tunnel
/// address, it must come from a peer, without outer options, with an outer header ip_rcv
/// would take, and carry an inner IPv4 packet for this node's subnet whose source belongs to
/// the sending peer; then the kernel's flannel.ipip device decapsulates it (flannel's device
/// alone takes IP-in-IP from any source). Fragments as for the UDP tunnels: a first one must
/// carry the inner header and pass the same checks, a later one may not start inside it.
/// Anywhere else (another node's address, a vxlan or udp node): not ours.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn classify_ipip<P: Packet>(
    p: &P,
    cfg: &DataplaneConfig,
    eth: [u8; ETH_HLEN],
    ip: &[u8; IPV4_HLEN],
    ihl: usize,
    fragment: Fragment,
    len: usize,
    merged: bool,
) -> Result<Tunnel, Verdict> {
    if ip[16..20] != cfg.underlay_ip || cfg.encap_mode() != Some(EncapMode::Ipip) {
        return Err(Verdict::Pass);
    }
    let peer = [ip[12], ip[13], ip[14], ip[15]];
    if let Fragment::Later { offset } = fragment {
        if later_fragment_overlaps(offset, checked_bytes(EncapMode::Ipip)) {
            return Err(Counter::FragmentOverlap.into());
        }
        // No socket guard stands behind the firewall's rule here (where only iptables is,
        // it sees reassembled packets): a later fragment must at least be a peer's, so that
        // one from elsewhere cannot complete a first fragment that never met these checks.
        if !is_peer(&peer) {
            return Err(Counter::UnknownPeer.into());
        }
        return Err(Verdict::Pass);
    }
    if ihl != IPV4_HLEN {
        return Err(Counter::OuterIpOptions.into());
    }
    if fragment == Fragment::First {
        check_first_fragment_ipip(ip, len)?;
        if !is_peer(&peer) {
            return Err(Counter::UnknownPeer.into());
        }
        check_inner(p, cfg, EncapMode::Ipip, peer)?;
        count(Counter::FragmentToKernel);
        return Err(Verdict::Pass);
    }
    check_outer_ipip(ip, len, merged)?;
    let stats = peer_stats(&peer).ok_or(Counter::UnknownPeer)?;
    let strip = check_inner(p, cfg, EncapMode::Ipip, peer)?;
    Ok(Tunnel::new(stats, eth, ip, strip, len))
}

/// What the tunnel carries, for a whole frame and a first fragment alike: our VNI and
/// exactly the I flag (VXLAN), an inner IPv4 packet for this node's subnet whose source
/// belongs to a subnet leased by `peer`, the node that sent it. The bytes between the outer
/// Ethernet header and the inner IPv4 header (the tunnel's overhead) on success.
#[inline(always)]
fn check_inner<P: Packet>(p: &P, cfg: &DataplaneConfig, mode: EncapMode, peer: [u8; 4]) -> Result<usize, Verdict> {
    let (strip, inner_ip) = match mode {
        EncapMode::Vxlan => {
            // One read for the VXLAN, inner Ethernet and inner IPv4 headers.
            let t: [u8; VXLAN_HLEN + ETH_HLEN + IPV4_HLEN] =
                p.read_head(TUNNEL_PAYLOAD_OFF).ok_or(Counter::Truncated)?;
            let vx: [u8; VXLAN_HLEN] = sub(&t, 0);
            let ieth: [u8; ETH_HLEN] = sub(&t, VXLAN_HLEN);
            let iip: [u8; IPV4_HLEN] = sub(&t, VXLAN_HLEN + ETH_HLEN);
            check_vxlan(&vx, cfg.vni)?;
            if ethertype(&ieth) != ETH_P_IPV4 {
                return Err(Counter::InnerNotIpv4.into());
            }
            (VXLAN_OVERHEAD, iip)
        }
        EncapMode::Udp => {
            let iip: [u8; IPV4_HLEN] = p.read(TUNNEL_PAYLOAD_OFF).ok_or(Counter::Truncated)?;
            (UDP_OVERHEAD, iip)
        }
        EncapMode::Ipip => {
            let iip: [u8; IPV4_HLEN] = p.read(ETH_HLEN + IPV4_HLEN).ok_or(Counter::Truncated)?;
            (IPIP_OVERHEAD, iip)
        }
    };
    let (inner_src, inner_dst) = inner_ipv4_addrs(&inner_ip)?;
    if !cfg.is_local(inner_dst) {
        return Err(Counter::NotLocalSubnet.into());
    }
    // The inner source must belong to a subnet leased by the very peer that sent it (unless
    // the operator relaxed it: any source from a known peer).
    if cfg.flags & config_flags::ANY_INNER_SOURCE != 0 {
        return Ok(strip);
    }
    let key = Key { prefix_len: 32, data: inner_src };
    match VTEP_BY_SUBNET.get(&key) {
        Some(v) if v.underlay_ip == peer => Ok(strip),
        _ => Err(Counter::SpoofedSource.into()),
    }
}

/// The same checks for a dual-stack node's IPv6 tunnel frames (VXLAN over IPv6 to
/// `flannel-v6.<VNI>`): UDP to our port, addressed to our public IPv6 address, from a peer
/// in `PEER6_STATS`, our VNI and exactly the I flag, an inner IPv6 packet for this node's
/// IPv6 subnet whose source belongs to the sending peer (`VTEP6_BY_SUBNET`). Before the agent
/// configured the IPv6 side, or on an IPv4-only node: not ours.
///
/// Extension headers, on frames to our address: the chain (hop-by-hop, routing, fragment,
/// destination options) is walked (up to `MAX_EXT_HEADERS`; a longer one, or one that
/// cannot be read to its end, is dropped as `unreadable_headers`: it could hide a tunnel
/// frame). IPsec (ESP, AH) ends the walk and passes: only a security association opens it. A fragment header alone is how a
/// stock node's device sends a datagram bigger than the path: its first fragment is checked
/// as a whole frame is (and must carry the headers whole), later ones may not start inside
/// them, as for IPv4. Any other extension header in front of UDP to our port is dropped
/// (`outer_ip_options`; flannel's device never sends one).
///
/// A function of its own (its buffers would not fit the hooks' 512-byte stacks beside the
/// IPv4 path's), answering in a plain integer: `V6_OK` (accepted and counted), `V6_PASS`, or
/// the counter to drop with. (A `Result` of `Tunnel` would put a union the kernel's BTF
/// checks refuse into the function's signature.)
#[inline(never)]
fn classify6<P: Packet>(p: &P, cfg: &DataplaneConfig, len: usize, merged: bool) -> u32 {
    match check6(p, cfg, len, merged) {
        Ok(()) | Err(Verdict::Accepted6) => V6_OK,
        Err(Verdict::Pass) => V6_PASS,
        Err(Verdict::Drop(c)) => c as u32,
    }
}

const V6_OK: u32 = u32::MAX;
const V6_PASS: u32 = u32::MAX - 1;

/// How many IPv6 extension headers decap follows before it gives up (and drops a frame to
/// our address). Real traffic carries a few at most.
const MAX_EXT_HEADERS: usize = 8;

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// Where the outer IPv6 header starts, and where UDP starts behind it without extension
/// headers and behind a fragment header alone.
const IP6: usize = ETH_HLEN;
const UDP6: usize = ETH_HLEN + IPV6_HLEN;
const UDP6_FRAG: usize = UDP6 + FRAG6_HLEN;

#[inline(always)]
fn check6<P: Packet>(p: &P, cfg: &DataplaneConfig, len: usize, merged: bool) -> Result<(), Verdict> {
    let Some(c6) = ready_config6() else { return Err(Verdict::Pass) };
    let [ver, _, _, _, plen_hi, plen_lo, next, _]: [u8; 8] = p.read_head(IP6).ok_or(Verdict::Pass)?;
    let dst: [u8; 16] = p.read_head(IP6 + 24).ok_or(Verdict::Pass)?;
    if dst != c6.underlay_ip {
        return Err(Verdict::Pass);
    }
    let plen = u16::from_be_bytes([plen_hi, plen_lo]);
    if next == IPPROTO_UDP {
        return check6_at::<_, UDP6>(p, cfg, &c6, ver, plen, len, merged, Fragment::Whole);
    }
    // Extension headers on a frame to our address.
    let (mut nh, mut off) = (next, UDP6);
    let mut fragment = Fragment::Whole;
    let mut frag_header = false;
    let mut others = false;
    let mut i = 0;
    while i < MAX_EXT_HEADERS && matches!(nh, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST) {
        let [n, hlen, f0, f1]: [u8; 4] = p.read(off).ok_or(Counter::UnreadableHeaders)?;
        let size = match nh {
            NEXTHDR_FRAGMENT => {
                let word = u16::from_be_bytes([f0, f1]);
                match Fragment::from_parts(word >> 3, word & 1 != 0) {
                    // What follows is the middle of a datagram, not headers; the kernel takes
                    // the reassembled datagram's protocol from the first fragment, whatever
                    // this one says, so the rule holds for every later fragment to us.
                    Fragment::Later { offset } if later_fragment_overlaps(offset, CHECKED_BYTES6) => {
                        return Err(Counter::FragmentOverlap.into());
                    }
                    Fragment::Later { .. } => return Err(Verdict::Pass),
                    f => {
                        others |= frag_header; // a second fragment header
                        frag_header = true;
                        fragment = f;
                        FRAG6_HLEN
                    }
                }
            }
            _ => {
                others = true;
                (hlen as usize + 1) * 8
            }
        };
        nh = n;
        off += size;
        i += 1;
    }
    if matches!(nh, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST) {
        return Err(Counter::UnreadableHeaders.into());
    }
    // Not UDP: not ours. That includes IPsec (ESP, and AH, as for IPv4): the kernel opens it
    // only with a security association, which authenticates the sender; the socket guard
    // still checks where the datagram inside came from.
    if nh != IPPROTO_UDP {
        return Err(Verdict::Pass);
    }
    let [_, _, d0, d1]: [u8; 4] = p.read(off).ok_or(Counter::UnreadableHeaders)?;
    if u16::from_be_bytes([d0, d1]) != cfg.port {
        return Err(Verdict::Pass);
    }
    if others {
        return Err(Counter::OuterIpOptions.into());
    }
    // A fragment header alone (so UDP right behind it): a first fragment, or an atomic
    // fragment (RFC 6946: offset 0, no more to come; a whole datagram behind a fragment
    // header).
    check6_at::<_, UDP6_FRAG>(p, cfg, &c6, ver, plen, len, merged, fragment)
}

/// The checks of an IPv6 tunnel frame whose UDP header starts at `UDP` (a constant: the
/// reads stay direct). `fragment`: `Whole` for a frame without extension headers, `First`
/// for a first fragment (checked, then left to the kernel to reassemble: counted
/// `fragment_to_kernel`), `Whole` behind a fragment header for an atomic fragment.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn check6_at<P: Packet, const UDP: usize>(
    p: &P,
    cfg: &DataplaneConfig,
    c6: &overlay_common::Dataplane6Config,
    ver: u8,
    plen: u16,
    len: usize,
    merged: bool,
    fragment: Fragment,
) -> Result<(), Verdict> {
    let vx_off = UDP + UDP_HLEN;
    let inner = vx_off + VXLAN_HLEN + ETH_HLEN;
    // Behind a fragment header the port was read already: ours, so a cut header is dropped.
    let udp: [u8; UDP_HLEN] = match p.read_head(UDP) {
        Some(u) => u,
        None if UDP == UDP6 => return Err(Verdict::Pass),
        None => return Err(Counter::Truncated.into()),
    };
    if udp_dst_port(&udp) != cfg.port {
        return Err(Verdict::Pass);
    }
    if UDP == UDP6 {
        check_outer6(ver, plen, &udp, len, merged)?;
    } else {
        check_outer6_fragment(ver, plen, &udp, len, fragment == Fragment::First)?;
    }
    let peer: [u8; 16] = p.read_head(IP6 + 8).ok_or(Verdict::Pass)?;
    let stats = peer6_stats(&peer).ok_or(Counter::UnknownPeer)?;
    let vx: [u8; VXLAN_HLEN] = p.read_head(vx_off).ok_or(Counter::Truncated)?;
    check_vxlan(&vx, cfg.vni)?;
    let [t0, t1]: [u8; 2] = p.read_head(vx_off + VXLAN_HLEN + 12).ok_or(Counter::Truncated)?;
    if u16::from_be_bytes([t0, t1]) != ETH_P_IPV6 {
        return Err(Counter::InnerNotIpv4.into());
    }
    let [iver]: [u8; 1] = p.read_head(inner).ok_or(Counter::Truncated)?;
    if iver >> 4 != 6 {
        return Err(Counter::InnerNotIpv4.into());
    }
    let inner_dst: [u8; 16] = p.read_head(inner + 24).ok_or(Counter::Truncated)?;
    if !c6.is_local(&inner_dst) {
        return Err(Counter::NotLocalSubnet.into());
    }
    let inner_src: [u8; 16] = p.read_head(inner + 8).ok_or(Counter::Truncated)?;
    if cfg.flags & config_flags::ANY_INNER_SOURCE == 0 {
        match VTEP6_BY_SUBNET.get(&Key { prefix_len: 128, data: inner_src }) {
            Some(v) if v.underlay_ip == peer => {}
            _ => return Err(Counter::SpoofedSource.into()),
        }
    }
    if fragment == Fragment::First {
        count(Counter::FragmentToKernel);
        return Err(Verdict::Pass);
    }
    account_rx(stats, len.saturating_sub(inner) as u64);
    count(Counter::Decapsulated);
    Ok(())
}

/// Count a frame that passed every check and is on its way to a container.
#[inline(always)]
fn accepted(t: &Tunnel) {
    account_rx(t.stats, t.inner_len as u64);
    count(Counter::Decapsulated);
}

/// Where the inner IPv4 header of a tunnel frame starts (for the monitor's events).
#[inline(always)]
fn inner_offset(cfg: Option<&DataplaneConfig>) -> usize {
    match cfg.and_then(|c| c.encap_mode()) {
        Some(EncapMode::Udp) => ETH_HLEN + UDP_OVERHEAD,
        Some(EncapMode::Ipip) => ETH_HLEN + IPIP_OVERHEAD,
        _ => ETH_HLEN + VXLAN_OVERHEAD,
    }
}

/// Where the monitor finds a dropped frame's inner header: none in a later fragment (its
/// bytes are the middle of a datagram; an offset past any frame reads nothing).
#[inline(always)]
fn monitor_inner(reason: Counter) -> usize {
    match reason {
        Counter::FragmentOverlap => u32::MAX as usize,
        _ => inner_offset(ready_config()),
    }
}

#[classifier]
pub fn tc_ingress_decap(ctx: TcContext) -> i32 {
    crate::upgrade_variant_mark();
    match try_tc_decap(&ctx) {
        Ok(action) => action,
        // Checked (IPv6): flannel-v6's kernel device decapsulates it.
        Err(Verdict::Pass | Verdict::Accepted6) => TCX_NEXT,
        Err(Verdict::Drop(reason)) => {
            count(reason);
            if monitor::wanted(false) {
                monitor::report(&ctx, Hook::TcIngress, reason, true, monitor_inner(reason));
            }
            if reason == Counter::DecapFailed && crate::log_allowed() {
                // Rare (a kernel helper refused): at most one line a second, as encap's.
                error!(&ctx, "tc decap failed: the kernel refused adjust_room/store");
            }
            TC_ACT_SHOT as i32
        }
    }
}

/// Ok(TCX_NEXT) for checked frames left to the kernel's vxlan device, Ok(TC_ACT_REDIRECT)
/// into the overlay device's ingress for those decapsulated here; Err(Pass) for frames that
/// are not ours; Err(Drop(reason)) otherwise.
#[inline(always)]
fn try_tc_decap(ctx: &TcContext) -> Result<i32, Verdict> {
    let Some(cfg) = ready_config() else {
        return Err(Verdict::Pass);
    };
    let t = classify(ctx, cfg)?;
    if monitor::wanted(true) {
        monitor::report(ctx, Hook::TcIngress, Counter::Decapsulated, true, inner_offset(Some(cfg)));
    }
    if cfg.flags & config_flags::KERNEL_DECAP != 0 {
        // Checked: the kernel's vxlan device decapsulates it, as on a stock flannel node.
        // Programs and tc filters after ours see it, as they would on such a node.
        accepted(&t);
        return Ok(TCX_NEXT);
    }
    // RFC 6040: congestion experienced on the outer header is passed on to an ECN-capable
    // inner packet, and drops one that is not (the kernel device does the same).
    if t.outer_ce {
        let tos_off = ETH_HLEN + t.strip + 1;
        let inner: [u8; 2] = ctx.read(tos_off - 1).ok_or(Counter::DecapFailed)?;
        let tos = ecn_decapsulate(ECN_CE, inner[1]).ok_or(Counter::CongestionNotEct)?;
        if tos != inner[1] {
            let old = u16::from_be_bytes(inner);
            let new = u16::from_be_bytes([inner[0], tos]);
            ctx.store(tos_off, &tos, 0).map_err(|_| Counter::DecapFailed)?;
            ctx.l3_csum_replace(ETH_HLEN + t.strip + 10, old.to_be() as u64, new.to_be() as u64, 2)
                .map_err(|_| Counter::DecapFailed)?;
        }
    }
    // FIXED_GSO: without it gso_size grows by the overhead and bulk TCP collapses.
    ctx.adjust_room(-(t.strip as i32), BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO as u64)
        .map_err(|_| Counter::DecapFailed)?;
    // The overlay device takes the frame as its own only if addressed to its MAC.
    let mut eth = [0u8; ETH_HLEN];
    eth[0..6].copy_from_slice(&cfg.vtep_mac);
    eth[6..12].copy_from_slice(&t.outer_eth[6..12]);
    eth[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    ctx.store(0, &eth, 0).map_err(|_| Counter::DecapFailed)?;
    accepted(&t);
    count(Counter::DecapNative);
    Ok(unsafe { bpf_redirect(cfg.overlay_ifindex, BPF_F_INGRESS as u64) } as i32)
}

#[xdp]
pub fn xdp_decap(ctx: XdpContext) -> u32 {
    match try_xdp_check(&ctx) {
        Ok(()) | Err(Verdict::Pass | Verdict::Accepted6) => xdp_action::XDP_PASS,
        Err(Verdict::Drop(reason)) => {
            count(reason);
            if monitor::wanted(false) {
                monitor::report(&ctx, Hook::Xdp, reason, true, monitor_inner(reason));
            }
            xdp_action::XDP_DROP
        }
    }
}

/// The checks, before an skb exists: invalid frames to our port are dropped and counted,
/// valid ones pass unchanged to the kernel's vxlan device, which decapsulates them (the
/// agent uses XDP only for vxlan). The inner packet so enters the host on the overlay
/// device, through its netfilter and reverse-path filter, after GRO has merged the frames.
#[inline(always)]
fn try_xdp_check(ctx: &XdpContext) -> Result<(), Verdict> {
    let Some(cfg) = ready_config() else {
        return Err(Verdict::Pass);
    };
    let t = classify(ctx, cfg)?;
    if monitor::wanted(true) {
        monitor::report(ctx, Hook::Xdp, Counter::Decapsulated, true, inner_offset(Some(cfg)));
    }
    accepted(&t);
    Ok(())
}
