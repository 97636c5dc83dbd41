//! Encapsulation.
//!
//! Attached: TCX egress of the overlay device (`flannel.<VNI>` or `flannel0`), which the host
//! routes the whole overlay network to.
//! Sees: inner IPv4 packets leaving for remote subnets, behind an Ethernet header the kernel
//! wrote for the device (possibly GSO super-packets).
//! Does: finds the remote VTEP by longest-prefix match on the inner destination, pushes the
//! outer headers (VXLAN or flannel-udp) with `bpf_skb_adjust_room` so GSO still segments the
//! inner packet, and hands the frame to the kernel's routing and neighbour resolution on the
//! underlay (`bpf_redirect_neigh` without a next hop: works on routed underlays, and loses no
//! packet while the neighbour is being resolved).
//! Not handled: anything that is not IPv4 (the kernel's IPv6 link-local chatter on the
//! device) and destinations without a route are dropped and counted; nobody could take them.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_ADJ_ROOM_ENCAP_L2_SHIFT,
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_get_hash_recalc, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::error;
use overlay_common::{
    ethertype, source_port, udp_encap_header, vxlan_encap_header, Counter, EncapMode,
    EncapParams, ETH_HLEN, ETH_P_IPV4, IPV4_HLEN, UDP_OVERHEAD, VXLAN_OVERHEAD,
};

use crate::{
    maps::{account_peer, count, ready_config, Direction, VTEP_BY_SUBNET},
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
            if reason == Counter::EncapFailed {
                // Rare (a kernel helper refused): worth a log line; never per normal packet.
                error!(&ctx, "encap failed: the kernel refused adjust_room/store/redirect_neigh");
            }
            TC_ACT_SHOT as i32
        }
    }
}

/// Ok(TC_ACT_REDIRECT) once the frame is on its way; Ok(TC_ACT_OK) before the agent has
/// configured the node; Err(reason) to drop and count.
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
    let inner_len = Packet::len(ctx) - ETH_HLEN;
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let params = EncapParams {
        src_ip: cfg.underlay_ip,
        dst_ip: vtep.underlay_ip,
        src_port: source_port(hash),
        dst_port: cfg.port,
        inner_len,
        outer_src_mac: cfg.vtep_mac,
        outer_dst_mac: cfg.vtep_mac,
    };
    match cfg.encap_mode() {
        Some(EncapMode::Vxlan) => {
            ctx.adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, VXLAN_ROOM_FLAGS)
                .map_err(|_| Counter::EncapFailed)?;
            let hdr = vxlan_encap_header(&params, cfg.vni, cfg.vtep_mac, vtep.vtep_mac);
            ctx.store(0, &hdr, 0).map_err(|_| Counter::EncapFailed)?;
        }
        Some(EncapMode::Udp) => {
            ctx.adjust_room(UDP_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, UDP_ROOM_FLAGS)
                .map_err(|_| Counter::EncapFailed)?;
            let hdr = udp_encap_header(&params);
            ctx.store(0, &hdr, 0).map_err(|_| Counter::EncapFailed)?;
        }
        None => return Err(Counter::EncapFailed),
    }
    let action = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) };
    if action != TC_ACT_REDIRECT as i64 {
        return Err(Counter::EncapFailed);
    }
    account_peer(&vtep.underlay_ip, Direction::Tx, inner_len as u64);
    count(Counter::Encapsulated);
    Ok(TC_ACT_REDIRECT as i32)
}
