//! Every map the programs use, declared once, with BTF so that `bpftool map dump` prints
//! field names. Layouts and names come from `overlay-common`; the agent pins them all under
//! the node's bpffs directory and is the only writer of routes, peers and configuration.

use aya_ebpf::{
    btf_maps::{Array, LpmTrie, PerCpuArray, PerCpuHashMap, RingBuf},
    macros::btf_map,
};
use overlay_common::{
    Counter, Dataplane6Config, DataplaneConfig, DropTraceConfig, KernelDropKey, Ipv4Prefix, Ipv6Prefix, MonitorState, PacketEvent, Peer6Addr, PeerAddr,
    PeerStats, Vtep, Vtep6, MAX_PEERS, MAX_ROUTES,
};

/// Remote subnet -> VTEP. Longest-prefix match on the inner destination (encap) and on the
/// inner source (decap's anti-spoofing check).
#[btf_map]
pub static VTEP_BY_SUBNET: LpmTrie<Ipv4Prefix, Vtep, { MAX_ROUTES as usize }> = LpmTrie::new();

/// Peer underlay address -> per-CPU traffic counters. Presence is membership.
#[btf_map]
pub static PEER_STATS: PerCpuHashMap<PeerAddr, PeerStats, { MAX_PEERS as usize }> =
    PerCpuHashMap::new();

/// A dual-stack peer's IPv6 subnet -> its IPv6 tunnel end (decap's inner-source check for
/// frames to `flannel-v6.<VNI>`).
#[btf_map]
pub static VTEP6_BY_SUBNET: LpmTrie<Ipv6Prefix, Vtep6, { MAX_ROUTES as usize }> = LpmTrie::new();

/// A peer's underlay IPv6 address -> per-CPU traffic counters. Presence is membership.
#[btf_map]
pub static PEER6_STATS: PerCpuHashMap<Peer6Addr, PeerStats, { MAX_PEERS as usize }> = PerCpuHashMap::new();

/// This node's IPv6 side (dual stack), once the agent has written it.
#[btf_map]
pub static DP_CONFIG6: Array<Dataplane6Config, 1> = Array::new();

/// Outcome counters, indexed by `Counter`.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { Counter::COUNT }> = PerCpuArray::new();

/// The node's data-plane configuration, double-buffered: `CONFIG_SLOT` says which entry is
/// current, so a configuration being written is never the one read.
#[btf_map]
pub static DP_CONFIG: Array<DataplaneConfig, 2> = Array::new();

#[btf_map]
pub static CONFIG_SLOT: Array<u32, 1> = Array::new();

/// Layout versions of the pinned maps (written and read by the agent only).
#[btf_map]
pub static LAYOUTS: Array<u32, { overlay_common::LAYOUT_SLOTS as usize }> = Array::new();

/// Events for `overlay-agent monitor` (256 KiB: some 6500 events between two reads).
#[btf_map]
pub static EVENTS: RingBuf<PacketEvent, { 256 * 1024 }> = RingBuf::new();

/// Whether a monitor listens, and to what (one entry, written by the monitor).
#[btf_map]
pub static MONITOR: Array<MonitorState, 1> = Array::new();

/// Per CPU: the start of the current one-second window and the events written in it.
#[btf_map]
pub static MONITOR_RATE: PerCpuArray<[u64; 2], 1> = PerCpuArray::new();

/// The kernel's drops on the node's devices, per (reason, device): the `kfree_skb` program's.
#[btf_map]
pub static KERNEL_DROPS: PerCpuHashMap<KernelDropKey, u64, 1024> = PerCpuHashMap::new();

/// What the `kfree_skb` program watches (one entry, written by the agent).
#[btf_map]
pub static DROP_TRACE: Array<DropTraceConfig, 1> = Array::new();

/// Per CPU: room for what does not fit the programs' 512-byte stacks (the quote of an ICMP
/// reply). Never pinned: its content lives for one packet.
#[btf_map]
pub static SCRATCH: PerCpuArray<[u8; 64], 1> = PerCpuArray::new();

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: no other CPU writes it, and a program is not preempted mid-update.
        unsafe { *p += 1 };
    }
}

/// The node's configuration once the agent has written all of it; `None` before. A reference
/// into the current slot, read field by field where used: a copy cost every packet some 80
/// instructions and 80 bytes of stack (it was copied twice). The agent never rewrites the
/// slot a program may still be reading: it writes the other one, flips, and leaves at least
/// `CONFIG_REWRITE_GAP` before it writes this one again (a program runs for microseconds).
#[inline(always)]
pub fn ready_config() -> Option<&'static DataplaneConfig> {
    let slot = CONFIG_SLOT.get(0).copied().unwrap_or(0) & 1;
    DP_CONFIG.get(slot).filter(|c| c.is_ready())
}

/// Add one sent packet of `bytes` to a known peer's counters; `false` if the peer is unknown.
/// (Received packets are accounted through `peer_stats`, found by the membership check.)
#[inline(always)]
pub fn account_tx(peer: &PeerAddr, bytes: u64) -> bool {
    match PEER_STATS.get_ptr_mut(peer) {
        Some(p) => {
            // SAFETY: a per-CPU value of a live map entry; a program is not preempted mid-update.
            let s = unsafe { &mut *p };
            s.tx_packets += 1;
            s.tx_bytes += bytes;
            true
        }
        None => false,
    }
}

#[inline(always)]
pub fn is_peer(peer: &PeerAddr) -> bool {
    PEER_STATS.get_ptr(peer).is_some()
}

/// A peer's counters on this CPU, if it is a peer: membership and accounting in one lookup.
#[inline(always)]
pub fn peer_stats(peer: &PeerAddr) -> Option<*mut PeerStats> {
    PEER_STATS.get_ptr_mut(peer)
}

/// Add one received packet of `bytes` to counters found by `peer_stats`.
#[inline(always)]
pub fn account_rx(stats: *mut PeerStats, bytes: u64) {
    // SAFETY: a per-CPU value of a live map entry; a program is not preempted mid-update.
    let s = unsafe { &mut *stats };
    s.rx_packets += 1;
    s.rx_bytes += bytes;
}

/// This node's IPv6 side, if it is a dual-stack node whose IPv6 subnet is configured.
#[inline(always)]
pub fn ready_config6() -> Option<&'static Dataplane6Config> {
    // A reference into the map, not a copy: the IPv6 checks run in a small stack frame.
    DP_CONFIG6.get(0).filter(|c| c.enabled != 0)
}

/// An IPv6 peer's counters on this CPU, if it is a peer.
#[inline(always)]
pub fn peer6_stats(peer: &Peer6Addr) -> Option<*mut PeerStats> {
    PEER6_STATS.get_ptr_mut(peer)
}

#[inline(always)]
pub fn is_peer6(peer: &Peer6Addr) -> bool {
    PEER6_STATS.get_ptr(peer).is_some()
}
