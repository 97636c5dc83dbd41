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
//! - split (vxlan in TC, opt-in): frames GRO merged, and frames whose outer header says
//!   congestion experienced, go to the kernel's vxlan device as above (it clears the tunnel
//!   GSO state and applies RFC 6040); the rest are decapsulated here as with stack;
//! - stack (udp backend): TC strips the outer headers (keeping GSO sizes) and redirects the
//!   inner packet into the overlay device's ingress.
//! Every way, the inner packet enters the host on the overlay device and crosses its
//! netfilter (conntrack, NAT, FORWARD) and reverse-path filter, both directions of every
//! flow alike. There is no path around the host's netfilter.
//! Fragmented tunnel datagrams from peers (vxlan) go to the kernel to be reassembled, then to
//! its vxlan device through the socket guard: the inner-source check does not see them.
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
    check_outer, check_outer6, check_vxlan, classify_ipv4, config_flags, ecn_decapsulate, ethertype, inner_ipv4_addrs,
    udp_dst_port, Counter, DataplaneConfig, EncapMode, Hook, Ipv4Class, PeerStats, ECN_CE, ECN_MASK,
    ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, TUNNEL_PAYLOAD_OFF, UDP_HLEN, UDP_OVERHEAD,
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
    /// A GRO/GSO aggregate (read once: the outer checks and the split decision use it).
    merged: bool,
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
    // One read for the outer Ethernet, IPv4 (without options) and UDP headers. Too short for
    // them: nothing says it is ours; the stack judges it.
    let head: [u8; ETH_HLEN + IPV4_HLEN + UDP_HLEN] = p.read_head(0).ok_or(Verdict::Pass)?;
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
    let (ihl, first_fragment) = match classify_ipv4(&ip) {
        Ipv4Class::Udp { header_len, first_fragment } if header_len >= IPV4_HLEN => {
            (header_len, first_fragment)
        }
        _ => return Err(Verdict::Pass),
    };
    let udp: [u8; UDP_HLEN] = if ihl == IPV4_HLEN {
        sub(&head, ETH_HLEN + IPV4_HLEN)
    } else {
        p.read(ETH_HLEN + ihl).ok_or(Verdict::Pass)?
    };
    if udp_dst_port(&udp) != cfg.port {
        return Err(Verdict::Pass);
    }
    // A tunnel frame for another host (this node forwards, or the NIC is promiscuous) is not
    // ours to open; the socket guard keeps frames for the node's other addresses from the
    // kernel's vxlan socket.
    if ip[16..20] != cfg.underlay_ip {
        return Err(Verdict::Pass);
    }
    // From here on the frame is addressed to us.
    if ihl != IPV4_HLEN {
        return Err(Counter::OuterIpOptions.into());
    }
    if first_fragment {
        // A datagram too big for some link between the nodes (its sender allowed
        // fragmentation, as stock flannel's device always does). The kernel reassembles it;
        // the socket guard then checks the whole datagram (a peer, on the underlay) before
        // the kernel's vxlan device decapsulates it. Later fragments carry no UDP header and
        // pass above. The udp backend has no kernel socket to reassemble for.
        if !is_peer(&[ip[12], ip[13], ip[14], ip[15]]) {
            return Err(Counter::UnknownPeer.into());
        }
        if cfg.encap_mode() != Some(EncapMode::Vxlan) {
            return Err(Counter::OuterFragment.into());
        }
        count(Counter::FragmentToKernel);
        return Err(Verdict::Pass);
    }
    // What ip_rcv and udp_rcv would check: the paths that decapsulate here skip them.
    check_outer(&ip, &udp, len, merged)?;
    // Who sent it comes before what is in it: a non-peer's frame is counted as such,
    // however short.
    let peer = [ip[12], ip[13], ip[14], ip[15]];
    let stats = peer_stats(&peer).ok_or(Counter::UnknownPeer)?;
    let (strip, inner_ip) = match cfg.encap_mode() {
        Some(EncapMode::Vxlan) => {
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
        Some(EncapMode::Udp) => {
            let iip: [u8; IPV4_HLEN] = p.read(TUNNEL_PAYLOAD_OFF).ok_or(Counter::Truncated)?;
            (UDP_OVERHEAD, iip)
        }
        None => return Err(Verdict::Pass),
    };
    let (inner_src, inner_dst) = inner_ipv4_addrs(&inner_ip)?;
    if !cfg.is_local(inner_dst) {
        return Err(Counter::NotLocalSubnet.into());
    }
    // The inner source must belong to a subnet leased by the very peer that sent it.
    let key = Key { prefix_len: 32, data: inner_src };
    match VTEP_BY_SUBNET.get(&key) {
        Some(v) if v.underlay_ip == peer => {}
        _ => return Err(Counter::SpoofedSource.into()),
    }
    Ok(Tunnel {
        stats,
        outer_eth: eth,
        strip,
        inner_len: len - ETH_HLEN - strip,
        outer_ce: ip[1] & ECN_MASK == ECN_CE,
        merged,
    })
}

/// The same checks for a dual-stack node's IPv6 tunnel frames (VXLAN over IPv6 to
/// `flannel-v6.<VNI>`): UDP to our port right after the fixed IPv6 header, addressed to our
/// public IPv6 address, from a peer in `PEER6_STATS`, our VNI and exactly the I flag, an
/// inner IPv6 packet for this node's IPv6 subnet whose source belongs to the sending peer
/// (`VTEP6_BY_SUBNET`). Tunnel frames with extension headers are dropped (`outer_ip_options`;
/// flannel's kernel device never sends them). Before the agent configured the IPv6 side, or
/// on an IPv4-only node: not ours.
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

#[inline(always)]
fn check6<P: Packet>(p: &P, cfg: &DataplaneConfig, len: usize, merged: bool) -> Result<(), Verdict> {
    // Small reads of what is checked, not whole headers: this runs in its own frame beside
    // the hook's, and both share 512 bytes of stack.
    const IP: usize = ETH_HLEN;
    const UDP: usize = ETH_HLEN + IPV6_HLEN;
    const VX: usize = UDP + UDP_HLEN;
    const INNER: usize = VX + VXLAN_HLEN + ETH_HLEN;
    let Some(c6) = ready_config6() else { return Err(Verdict::Pass) };
    let [ver, _, _, _, plen_hi, plen_lo, next, _]: [u8; 8] = p.read_head(IP).ok_or(Verdict::Pass)?;
    let dst: [u8; 16] = p.read_head(IP + 24).ok_or(Verdict::Pass)?;
    if dst != c6.underlay_ip {
        return Err(Verdict::Pass);
    }
    if next != IPPROTO_UDP {
        // Extension headers (flannel's device sends none): a tunnel frame behind them is
        // dropped, as an IPv4 one with options is, rather than passed unchecked. Followed up
        // to three deep; fragments go to the kernel to be reassembled, whose datagram the
        // socket guard checks (a peer's), as IPv4's do.
        let (mut nh, mut off) = (next, UDP);
        let mut i = 0;
        while i < 3 && matches!(nh, 0 | 43 | 60) {
            let [n, hlen]: [u8; 2] = p.read(off).ok_or(Verdict::Pass)?;
            nh = n;
            off += (hlen as usize + 1) * 8;
            i += 1;
        }
        if nh == IPPROTO_UDP {
            let [_, _, d0, d1]: [u8; 4] = p.read(off).ok_or(Verdict::Pass)?;
            if u16::from_be_bytes([d0, d1]) == cfg.port {
                return Err(Counter::OuterIpOptions.into());
            }
        }
        return Err(Verdict::Pass);
    }
    let udp: [u8; UDP_HLEN] = p.read_head(UDP).ok_or(Verdict::Pass)?;
    if udp_dst_port(&udp) != cfg.port {
        return Err(Verdict::Pass);
    }
    check_outer6(ver, u16::from_be_bytes([plen_hi, plen_lo]), &udp, len, merged)?;
    let peer: [u8; 16] = p.read_head(IP + 8).ok_or(Verdict::Pass)?;
    let stats = peer6_stats(&peer).ok_or(Counter::UnknownPeer)?;
    let vx: [u8; VXLAN_HLEN] = p.read_head(VX).ok_or(Counter::Truncated)?;
    check_vxlan(&vx, cfg.vni)?;
    let [t0, t1]: [u8; 2] = p.read_head(VX + VXLAN_HLEN + 12).ok_or(Counter::Truncated)?;
    if u16::from_be_bytes([t0, t1]) != ETH_P_IPV6 {
        return Err(Counter::InnerNotIpv4.into());
    }
    let [iver]: [u8; 1] = p.read_head(INNER).ok_or(Counter::Truncated)?;
    if iver >> 4 != 6 {
        return Err(Counter::InnerNotIpv4.into());
    }
    let inner_dst: [u8; 16] = p.read_head(INNER + 24).ok_or(Counter::Truncated)?;
    if !c6.is_local(&inner_dst) {
        return Err(Counter::NotLocalSubnet.into());
    }
    let inner_src: [u8; 16] = p.read_head(INNER + 8).ok_or(Counter::Truncated)?;
    match VTEP6_BY_SUBNET.get(&Key { prefix_len: 128, data: inner_src }) {
        Some(v) if v.underlay_ip == peer => {}
        _ => return Err(Counter::SpoofedSource.into()),
    }
    account_rx(stats, len.saturating_sub(INNER) as u64);
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
fn inner_offset(cfg: Option<DataplaneConfig>) -> usize {
    match cfg.and_then(|c| c.encap_mode()) {
        Some(EncapMode::Udp) => ETH_HLEN + UDP_OVERHEAD,
        _ => ETH_HLEN + VXLAN_OVERHEAD,
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
                monitor::report(&ctx, Hook::TcIngress, reason, true, inner_offset(ready_config()));
            }
            if reason == Counter::DecapFailed {
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
    let t = classify(ctx, &cfg)?;
    if monitor::wanted(true) {
        monitor::report(ctx, Hook::TcIngress, Counter::Decapsulated, true, inner_offset(Some(cfg)));
    }
    if cfg.flags & config_flags::KERNEL_DECAP != 0 {
        // GRO-merged frames carry tunnel GSO state that only the kernel device clears (on
        // 6.18 adjust_room leaves it, and the forwarded frame would be segmented in
        // software); CE-marked ones need RFC 6040, which the kernel device applies.
        if cfg.flags & config_flags::NATIVE_UNMERGED == 0 || t.merged || t.outer_ce {
            // Checked: the kernel's vxlan device decapsulates it, as on a stock flannel node.
            // Programs and tc filters after ours see it, as they would on such a node.
            accepted(&t);
            return Ok(TCX_NEXT);
        }
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
                monitor::report(&ctx, Hook::Xdp, reason, true, inner_offset(ready_config()));
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
    let t = classify(ctx, &cfg)?;
    if monitor::wanted(true) {
        monitor::report(ctx, Hook::Xdp, Counter::Decapsulated, true, inner_offset(Some(cfg)));
    }
    accepted(&t);
    Ok(())
}
