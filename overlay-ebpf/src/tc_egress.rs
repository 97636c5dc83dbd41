//! Encapsulation.
//!
//! Attached: TCX egress of the overlay device (`flannel.<VNI>` or `flannel0`), which the host
//! routes the whole overlay network to.
//! Sees: inner IPv4 packets leaving for remote subnets, behind an Ethernet header the kernel
//! wrote for the device (possibly GSO super-packets).
//! Does: finds the remote VTEP by longest-prefix match on the inner destination, looks up the
//! route to it (one FIB lookup: next hop, and the path MTU, including one the node learnt
//! from a router), pushes the outer headers (VXLAN or flannel-udp) with
//! `bpf_skb_adjust_room` so GSO still segments the inner packet, and hands the frame to the
//! kernel's neighbour resolution on the underlay (`bpf_redirect_neigh` with that next hop:
//! works on routed underlays, and loses no packet while the neighbour is being resolved).
//! The outer header inherits the inner TOS (DSCP and ECN) and DF flag; a fragmentable one
//! gets a random non-zero IPv4 ID.
//! Too big: a DF packet (or GSO segment) that does not fit the path once encapsulated is
//! answered with ICMP fragmentation-needed, as the kernel's vxlan device and any router
//! would; a fragmentable one leaves if the underlay device takes it (routers fragment it,
//! the peer's kernel reassembles it).
//! Not handled: anything that is not IPv4 (the kernel's IPv6 link-local chatter on the
//! device) and destinations without a route are dropped and counted; nobody could take them.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS,
        bpf_fib_lookup, bpf_redir_neigh, BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_FIB_LKUP_RET_BLACKHOLE,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_UNREACHABLE,
        BPF_FIB_LKUP_RET_SUCCESS,
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        TC_ACT_UNSPEC,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::{
        bpf_check_mtu, bpf_fib_lookup, bpf_get_hash_recalc, bpf_get_prandom_u32,
        bpf_redirect,
        bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::error;
use overlay_common::{
    ethertype, fragment_id, icmp_frag_needed_header, outer_policy, outer_segment_len, settle_quoted_checksum, source_port,
    udp_encap_header, vxlan_encap_header, Counter, DataplaneConfig, EncapMode, EncapParams, Hook,
    ETH_HLEN, ETH_P_IPV4, ICMP_HLEN, ICMP_QUOTE, IPPROTO_UDP, IPV4_HLEN, UDP_HLEN, UDP_OVERHEAD,
    VXLAN_OVERHEAD, Vtep,
};

const IPPROTO_TCP: u8 = 6;

use crate::{
    maps::{account_tx, count, ready_config, SCRATCH, VTEP_BY_SUBNET},
    monitor,
    packet::Packet,
};

/// FIXED_GSO keeps gso_size: the overlay MTU already leaves room for the outer headers, and
/// without it the kernel would shrink every segment by the overhead again.
const VXLAN_ROOM_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
    | ((ETH_HLEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);
const UDP_ROOM_FLAGS: u64 =
    (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP)
        as u64;

#[classifier]
pub fn tc_egress_encap(ctx: TcContext) -> i32 {
    crate::upgrade_variant_mark();
    match try_encap(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count(reason);
            if monitor::wanted(false) {
                monitor::report(&ctx, Hook::TcEgress, reason, false, ETH_HLEN);
            }
            if reason == Counter::EncapFailed && crate::log_allowed() {
                // Rare (a kernel helper refused): worth a log line, at most one a second.
                error!(&ctx, "encap failed: the kernel refused adjust_room/store/redirect_neigh");
            }
            TC_ACT_SHOT as i32
        }
    }
}

/// Ok(TC_ACT_REDIRECT) once the frame is on its way (encapsulated to a peer, or turned into
/// an ICMP fragmentation-needed reply); Ok(TC_ACT_OK) before the agent has configured the
/// node; Err(reason) to drop and count.
#[inline(always)]
fn try_encap(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(cfg) = ready_config() else {
        count(Counter::NotConfigured);
        return Ok(TC_ACT_OK as i32);
    };
    let eth: [u8; ETH_HLEN] = ctx.read(0).ok_or(Counter::EncapNotIpv4)?;
    if ethertype(&eth) != ETH_P_IPV4 {
        return Err(Counter::EncapNotIpv4);
    }
    let ip: [u8; IPV4_HLEN] = ctx.read(ETH_HLEN).ok_or(Counter::EncapNotIpv4)?;
    let key = Key {
        prefix_len: 32,
        data: [ip[16], ip[17], ip[18], ip[19]],
    };
    let vtep = *VTEP_BY_SUBNET.get(&key).ok_or(Counter::NoRoute)?;
    // ipip: the kernel's flannel.ipip device encapsulates (this program is not attached there).
    let mode = match cfg.encap_mode() {
        Some(m @ (EncapMode::Vxlan | EncapMode::Udp)) => m,
        _ => return Err(Counter::EncapFailed),
    };
    let inner_len = Packet::len(ctx) - ETH_HLEN;
    let (tos, dont_fragment) = outer_policy(&ip);

    // Where the outer packet goes and whether it fits: one route lookup, which also sees a
    // path MTU the node learnt from a router's fragmentation-needed (outer DF is inherited).
    // The helper answers only where the underlay forwards (`ip_forward`, on on every node
    // that routes containers); elsewhere the packet is sent as before, unchecked. A forwarding
    // lookup (as if the packet came in on the underlay), not an output one: the helper pins an
    // output lookup to the interface it is given, so a peer routed through another NIC would
    // find no route, where the node's routing table (and flannel's device) reaches it.
    let gso = gso_size(ctx);
    let seg_len = outer_segment_len(inner_len, gso, if gso == 0 { 0 } else { l3l4_hlen(ctx, &ip) }, mode.overhead());
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.dport = cfg.port.to_be();
    fib.__bindgen_anon_1.tot_len = if seg_len > u16::MAX as usize { u16::MAX } else { seg_len as u16 };
    fib.ifindex = cfg.underlay_ifindex;
    fib.__bindgen_anon_2.tos = tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.underlay_ip);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(vtep.underlay_ip);
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // No way to the peer: the redirect would drop the packet where no counter sees it.
    if matches!(
        rc as u32,
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT | BPF_FIB_LKUP_RET_NOT_FWDED
    ) {
        return Err(Counter::NoUnderlayRoute);
    }
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        let path_mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as usize;
        if dont_fragment || gso != 0 {
            let mtu = path_mtu.saturating_sub(mode.overhead());
            if !can_answer(cfg, &ip, mtu) {
                return Err(Counter::EncapTooBig);
            }
            if monitor::wanted(false) {
                monitor::report(ctx, Hook::TcEgress, Counter::EncapFragNeeded, false, ETH_HLEN);
            }
            return frag_needed(ctx, cfg, mtu);
        }
        // May be fragmented, which this program cannot do: the kernel device fragments the
        // outer packet. The udp backend has no such device: the packet leaves whole if the
        // underlay device takes it, and routers fragment it.
        if mode == EncapMode::Vxlan {
            return to_kernel_device(ctx, &vtep, inner_len);
        }
        if !fits_underlay_device(ctx, cfg.underlay_ifindex, seg_len) {
            return Err(Counter::EncapTooBig);
        }
    }
    // A GSO aggregate whose outer lengths would not fit 16 bits (BIG TCP): the kernel device
    // segments it before encapsulating. (udp: the lengths say 0, as the kernel's own IPv4
    // BIG TCP does, and the underlay segments it.)
    if mode == EncapMode::Vxlan && inner_len + mode.overhead() > u16::MAX as usize {
        return to_kernel_device(ctx, &vtep, inner_len);
    }

    // vxlan: a port per flow (ECMP and RSS spread flows), as the kernel device picks it. udp:
    // flannel's own port, as its backend sends from its socket; a router's
    // fragmentation-needed then quotes a port the agent's socket holds, and the kernel learns
    // the path MTU from it.
    let src_port = match mode {
        EncapMode::Vxlan => source_port(unsafe { bpf_get_hash_recalc(ctx.skb.skb) }),
        EncapMode::Udp | EncapMode::Ipip => cfg.port,
    };
    let params = EncapParams {
        src_ip: cfg.underlay_ip,
        dst_ip: vtep.underlay_ip,
        src_port,
        dst_port: cfg.port,
        inner_len,
        tos,
        dont_fragment,
        ip_id: if dont_fragment { 0 } else { fragment_id(unsafe { bpf_get_prandom_u32() }) },
        outer_src_mac: cfg.vtep_mac,
        outer_dst_mac: cfg.vtep_mac,
    };
    match mode {
        EncapMode::Vxlan => {
            if ctx.adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, VXLAN_ROOM_FLAGS).is_err() {
                // Refused for a packet a container has already tunnelled (the skb carries
                // inner headers of its own): the kernel device can carry it.
                return to_kernel_device(ctx, &vtep, inner_len);
            }
            store_head(ctx, &vxlan_encap_header(&params, cfg.vni, cfg.vtep_mac, vtep.vtep_mac))?;
        }
        EncapMode::Udp | EncapMode::Ipip => {
            if ctx.adjust_room(UDP_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, UDP_ROOM_FLAGS).is_err() {
                // Refused for a packet a container has already tunnelled (the skb carries
                // inner headers of its own) and there is no kernel device to hand it to. A
                // single packet needs no tunnel GSO state: room without it. A GSO aggregate
                // does (each segment needs our headers), so it stays refused and counted.
                if gso != 0 {
                    return Err(Counter::EncapFailed);
                }
                ctx.adjust_room(UDP_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, 0).map_err(|_| Counter::EncapFailed)?;
            }
            store_head(ctx, &udp_encap_header(&params))?;
        }
    }
    // With the route's next hop and a valid neighbour for it, the helper sends without a
    // second route lookup (through the neighbour's output, which re-probes a stale entry).
    // Otherwise (the neighbour is unresolved, or the lookup gave nothing usable) it routes by
    // itself, which also gives the packet the underlay route: a packet queued while the
    // neighbour resolves is sent by that route later. Given a next hop but no route, the
    // queued packet would keep its overlay route and leave with the overlay device's MACs.
    let action = if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = AF_INET as u32;
        nh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
        unsafe { bpf_redirect_neigh(fib.ifindex, &mut nh, core::mem::size_of::<bpf_redir_neigh>() as i32, 0) }
    } else {
        // To the device the lookup chose when it got as far as the neighbour (newer kernels
        // report it with NO_NEIGH; older ones leave the underlay there), else the underlay;
        // the helper's own route lookup is bound to that device.
        let dev = if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 && fib.ifindex != 0 { fib.ifindex } else { cfg.underlay_ifindex };
        unsafe { bpf_redirect_neigh(dev, core::ptr::null_mut(), 0, 0) }
    };
    if action != TC_ACT_REDIRECT as i64 {
        return Err(Counter::EncapFailed);
    }
    account_tx(&vtep.underlay_ip, inner_len as u64);
    count(Counter::Encapsulated);
    // Queued in the neighbour layer until the next hop answers, lost there if it never does:
    // counted, and shown to a drop monitor with the peer it was for.
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        count(Counter::UnresolvedNextHop);
        if monitor::wanted(false) {
            monitor::report(ctx, Hook::TcEgress, Counter::UnresolvedNextHop, true, ETH_HLEN + mode.overhead());
        }
    }
    if monitor::wanted(true) {
        monitor::report(ctx, Hook::TcEgress, Counter::Encapsulated, true, ETH_HLEN + mode.overhead());
    }
    Ok(TC_ACT_REDIRECT as i32)
}

/// Leave the packet to the kernel's vxlan device (the overlay device this program runs on):
/// addressed to the peer's VtepMAC, it is sent by the forwarding entry the agent keeps for
/// that peer, as on a stock flannel node, through the host's OUTPUT and POSTROUTING, after
/// the kernel has segmented what needs it. Only for what this program cannot do itself.
#[inline(always)]
fn to_kernel_device(ctx: &TcContext, vtep: &Vtep, inner_len: usize) -> Result<i32, Counter> {
    if monitor::wanted(true) {
        monitor::report(ctx, Hook::TcEgress, Counter::EncapToKernel, false, ETH_HLEN);
    }
    ctx.store(0, &vtep.vtep_mac, 0).map_err(|_| Counter::EncapFailed)?;
    account_tx(&vtep.underlay_ip, inner_len as u64);
    count(Counter::EncapToKernel);
    Ok(TCX_NEXT)
}

/// Write the outer headers at the start of the frame: in place where the head is linear and
/// writable (it is after `bpf_skb_adjust_room`, which made the room there), through the
/// helper otherwise. In place saves the helper call: some 30 ns of the encap program's
/// 950 (`cargo xtask bench programs`).
#[inline(always)]
fn store_head<const N: usize>(ctx: &TcContext, hdr: &[u8; N]) -> Result<(), Counter> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + N <= end {
        // SAFETY: bounds checked against data_end just above; TC may write its linear head.
        unsafe { core::ptr::write_unaligned(start as *mut [u8; N], *hdr) };
        return Ok(());
    }
    ctx.store(0, hdr, 0).map_err(|_| Counter::EncapFailed)
}

/// TCX's "not decided here": the packet continues to the device's own transmit path.
const TCX_NEXT: i32 = TC_ACT_UNSPEC;

const AF_INET: u8 = 2;

#[inline(always)]
fn gso_size(ctx: &TcContext) -> usize {
    // SAFETY: the context's skb pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).gso_size as usize }
}

/// The inner IPv4 and transport header length of a GSO aggregate (TCP or UDP), which with
/// the GSO size gives its segments' length.
#[inline(always)]
fn l3l4_hlen(ctx: &TcContext, ip: &[u8; IPV4_HLEN]) -> usize {
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    match ip[9] {
        IPPROTO_TCP => match ctx.read::<1>(ETH_HLEN + (ihl & 0x3c) + 12) {
            Some([off]) => ihl + ((off >> 4) as usize) * 4,
            None => ihl + 20,
        },
        _ => ihl + UDP_HLEN,
    }
}

/// Whether an outer packet of `len` bytes (from its IPv4 header) fits the underlay device.
#[inline(always)]
fn fits_underlay_device(ctx: &TcContext, ifindex: u32, len: usize) -> bool {
    let mut mtu_len: u32 = len as u32;
    let rc = unsafe { bpf_check_mtu(ctx.skb.skb as *mut _, ifindex, &mut mtu_len, 0, 0) };
    rc == BPF_MTU_CHK_RET_SUCCESS as i64
}

/// Whether a fragmentation-needed answer can be given for the packet with IPv4 header `ip`:
/// no options (the quote has a fixed size), a sender on this node (the answer is delivered
/// here), and an MTU IPv4 allows.
#[inline(always)]
fn can_answer(cfg: &DataplaneConfig, ip: &[u8; IPV4_HLEN], mtu: usize) -> bool {
    let src = [ip[12], ip[13], ip[14], ip[15]];
    ip[0] == 0x45 && (cfg.is_local(src) || src == cfg.underlay_ip) && mtu >= 68
}

/// Answer a packet that does not fit the tunnel with ICMP fragmentation-needed, as a router
/// (and the kernel's vxlan device) would: the packet is cut to what the ICMP message quotes
/// of it, headers are put in front, and the reply enters the host on the overlay device, so
/// that conntrack relates it to its flow and the node routes it back to the sender through
/// its netfilter like any other packet from the overlay. Only for senders on this node
/// (containers and the node itself: the reply is delivered locally; see `can_answer`).
/// Not inlined: its buffers would otherwise sit in the encap program's own stack frame,
/// which the monitor's call has to share the 512 bytes with.
#[inline(never)]
fn frag_needed(ctx: &TcContext, cfg: &DataplaneConfig, mtu: usize) -> Result<i32, Counter> {
    let buf = SCRATCH.get_ptr_mut(0).ok_or(Counter::EncapTooBig)?;
    // SAFETY: a per-CPU slot of 64 bytes, used by this program run alone.
    let quote = unsafe { &mut *(buf as *mut [u8; ICMP_QUOTE]) };
    // A fixed length: the verifier refuses a read that might be empty.
    let rc = unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, ETH_HLEN as u32, quote.as_mut_ptr() as *mut _, ICMP_QUOTE as u32) };
    if rc != 0 {
        return Err(Counter::EncapTooBig);
    }
    // A checksum left to the device (CHECKSUM_PARTIAL) keeps pointing at the quoted transport
    // header, and a device without checksum offload on the way back would complete it over the
    // quote after the ICMP checksum was taken: the quoted field gets the value that completion
    // writes again (see `settle_quoted_checksum`).
    // (Its result is not kept: a value live across the helper calls below costs stack, and
    // the quote says again which field it was.)
    let _ = settle_quoted_checksum(quote);
    // Also drops GSO state: the reply is one small packet.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ICMP_QUOTE) as u32, 0) } != 0 {
        return Err(Counter::EncapTooBig);
    }
    ctx.adjust_room((IPV4_HLEN + ICMP_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Counter::EncapTooBig)?;
    let hdr = icmp_frag_needed_header(quote, mtu as u16);
    ctx.store(ETH_HLEN, &hdr, 0).map_err(|_| Counter::EncapTooBig)?;
    if matches!(quote[9], IPPROTO_TCP | IPPROTO_UDP) {
        // The settled field, from the quote in the per-CPU slot (not a copy on the stack:
        // this program's frames are at the verifier's limit).
        let field = if quote[9] == IPPROTO_TCP { IPV4_HLEN + 16 } else { IPV4_HLEN + 6 };
        let at = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + field;
        let rc = unsafe { bpf_skb_store_bytes(ctx.skb.skb as *mut _, at as u32, quote.as_ptr().add(field) as *const _, 2, 0) };
        if rc != 0 {
            return Err(Counter::EncapTooBig);
        }
    }
    // To the overlay device's own MAC: it takes the frame as addressed to the host.
    ctx.store(0, &cfg.vtep_mac, 0).map_err(|_| Counter::EncapTooBig)?;
    ctx.store(6, &cfg.vtep_mac, 0).map_err(|_| Counter::EncapTooBig)?;
    ctx.store(12, &ETH_P_IPV4.to_be_bytes(), 0).map_err(|_| Counter::EncapTooBig)?;
    count(Counter::EncapFragNeeded);
    Ok(unsafe { bpf_redirect(cfg.overlay_ifindex, BPF_F_INGRESS as u64) } as i32)
}
