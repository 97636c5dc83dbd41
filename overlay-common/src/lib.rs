//! Wire constants, map key/value layouts and pure header helpers shared by the eBPF programs
//! (`overlay-ebpf`) and the node agent (`overlay-agent`).
//!
//! Map layouts are ABI between two separately compiled programs and the pinned maps that
//! outlive both: every struct is `repr(C)`, has explicit padding and a compile-time size
//! check. Changing a layout means giving the map a new name, never reusing a field.
#![no_std]

pub mod wire;

pub use wire::*;

/// Names of the maps as the programs declare them and as they are pinned under the
/// per-node bpffs directory. Kept under 16 bytes (the kernel truncates map names).
pub mod map_names {
    /// LPM trie: overlay subnet -> remote VTEP ([`crate::Vtep`]).
    pub const VTEP_BY_SUBNET: &str = "VTEP_BY_SUBNET";
    /// Per-CPU hash: peer underlay address -> [`crate::PeerStats`]. Membership is what
    /// decap checks: a frame from an address not in this map is dropped.
    pub const PEER_STATS: &str = "PEER_STATS";
    /// Per-CPU array indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Array of two [`crate::DataplaneConfig`]s: the one in use is the slot `CONFIG_SLOT`
    /// names; the agent writes the other and then flips the slot, so that a program never
    /// reads a configuration half written.
    pub const DP_CONFIG: &str = "DP_CONFIG";
    /// Array with one u32: which `DP_CONFIG` slot is current (0 or 1).
    pub const CONFIG_SLOT: &str = "CONFIG_SLOT";
    /// Array of u32, indexed like [`ALL`]: the layout version each pinned map was made with
    /// ([`crate::MAP_LAYOUTS`]). Written by the agent only; the programs never read it.
    pub const LAYOUTS: &str = "LAYOUTS";
    /// Ring buffer of [`crate::PacketEvent`]s, written only while a monitor listens.
    pub const EVENTS: &str = "EVENTS";
    /// Array with one [`crate::MonitorState`]: whether and what a monitor listens to.
    pub const MONITOR: &str = "MONITOR";
    /// LPM trie: a dual-stack peer's IPv6 subnet -> its IPv6 VTEP ([`crate::Vtep6`]): decap's
    /// inner-source check for frames arriving for `flannel-v6.<VNI>`.
    pub const VTEP6_BY_SUBNET: &str = "VTEP6_BY_SUBNET";
    /// Per-CPU hash: a peer's underlay IPv6 address -> [`crate::PeerStats`] (membership).
    pub const PEER6_STATS: &str = "PEER6_STATS";
    /// Array with one [`crate::Dataplane6Config`]: this node's IPv6 side (none: IPv6 frames
    /// pass unchecked, as before dual stack).
    pub const DP_CONFIG6: &str = "DP_CONFIG6";
    /// Per-CPU hash: [`crate::KernelDropKey`] (the kernel's drop reason, the device) -> packets
    /// the kernel dropped on the node's overlay devices and underlay, counted by the
    /// `kfree_skb` tracepoint program.
    pub const KERNEL_DROPS: &str = "KERNEL_DROPS";
    /// Array with one [`crate::DropTraceConfig`]: what the `kfree_skb` program watches and
    /// where the running kernel keeps the fields it reads.
    pub const DROP_TRACE: &str = "DROP_TRACE";
    pub const ALL: [&str; 13] = [
        VTEP_BY_SUBNET, PEER_STATS, COUNTERS, DP_CONFIG, EVENTS, MONITOR, CONFIG_SLOT, LAYOUTS, VTEP6_BY_SUBNET, PEER6_STATS, DP_CONFIG6,
        KERNEL_DROPS, DROP_TRACE,
    ];
    /// Maps earlier versions pinned and this one no longer has (`PORT_BY_MAC`: the retired
    /// direct-delivery mode). `up` and `teardown` remove their pins.
    pub const RETIRED: [&str; 1] = ["PORT_BY_MAC"];
}

/// The layout version of each pinned map, in the order of [`map_names::ALL`]. A map's layout
/// is its type, key and value layout and what its entries mean; pins are reused by name across
/// upgrades, so a build must never read a map made with another layout as its own. Bump a
/// map's version whenever any of that changes (the `layouts_are_versioned` test records each
/// version's sizes and fails until the table is updated). Maps pinned before versions were
/// recorded have version 1, except `DP_CONFIG`, which had one slot (version 1) and has two
/// since (version 2).
pub const MAP_LAYOUTS: [u32; map_names::ALL.len()] = [1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1];
/// Entries of the `LAYOUTS` map (room for maps to come).
pub const LAYOUT_SLOTS: u32 = 16;

/// The layout version this build gives map `name`.
pub fn layout_version(name: &str) -> Option<u32> {
    let mut i = 0;
    while i < map_names::ALL.len() {
        if str_eq(map_names::ALL[i], name) {
            return Some(MAP_LAYOUTS[i]);
        }
        i += 1;
    }
    None
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Names of the programs (the functions in `overlay-ebpf`).
pub mod prog_names {
    pub const TC_EGRESS_ENCAP: &str = "tc_egress_encap";
    pub const TC_INGRESS_DECAP: &str = "tc_ingress_decap";
    pub const XDP_DECAP: &str = "xdp_decap";
    pub const SK_LOOKUP_GUARD: &str = "sk_lookup_guard";
    /// `kfree_skb` raw tracepoint with the drop reason (kernels from 5.17).
    pub const KFREE_SKB_REASON: &str = "kfree_skb_reason";
    /// The same without a reason, for kernels whose tracepoint has none (5.10-5.16).
    pub const KFREE_SKB_PLAIN: &str = "kfree_skb_plain";
}

/// Default capacity of the route and peer maps (flags may override it at load time).
pub const MAX_ROUTES: u32 = 16384;
pub const MAX_PEERS: u32 = 16384;

/// The encapsulation a node uses, as flannel's `Backend.Type`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncapMode {
    /// VXLAN: outer IPv4/UDP/VXLAN header plus an inner Ethernet header (50 bytes).
    Vxlan = 1,
    /// flannel's udp backend: the raw inner IPv4 packet as UDP payload (28 bytes).
    Udp = 2,
    /// flannel's ipip backend: IPv4 in IPv4 (protocol 4, 20 bytes). The kernel's
    /// `flannel.ipip` device encapsulates and decapsulates; the programs check what arrives.
    Ipip = 3,
}

impl EncapMode {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Vxlan),
            2 => Some(Self::Udp),
            3 => Some(Self::Ipip),
            _ => None,
        }
    }
    /// Bytes the encapsulation adds in front of the inner IPv4 packet (the outer
    /// Ethernet header is not counted: it replaces the inner one on the wire).
    pub const fn overhead(self) -> usize {
        match self {
            Self::Vxlan => VXLAN_OVERHEAD,
            Self::Udp => UDP_OVERHEAD,
            Self::Ipip => IPIP_OVERHEAD,
        }
    }
}

/// Value of `VTEP_BY_SUBNET`: where to send packets for a remote subnet.
/// Written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Vtep {
    /// The remote node's underlay IPv4 address (flannel's `PublicIP`), network byte order.
    pub underlay_ip: [u8; 4],
    /// The remote node's VTEP MAC (flannel's `BackendData.VtepMAC`): the inner destination
    /// MAC of VXLAN frames we send it. Unused (zero) for the udp backend.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Vtep>() == 12);

/// Value of `VTEP6_BY_SUBNET`: a dual-stack peer's IPv6 tunnel end.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Vtep6 {
    /// The peer's public IPv6 address (flannel's `PublicIPv6`), network byte order.
    pub underlay_ip: [u8; 16],
    /// Its `flannel-v6.<VNI>`'s MAC (`BackendV6Data.VtepMAC`).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Vtep6>() == 24);

/// Key data of `VTEP6_BY_SUBNET` (an IPv6 prefix, network order) and of `PEER6_STATS` (a
/// peer's underlay IPv6 address).
pub type Ipv6Prefix = [u8; 16];
pub type Peer6Addr = [u8; 16];

/// The one entry of `DP_CONFIG6`: a dual-stack node's IPv6 side, written by the agent once
/// its IPv6 subnet is leased (before any IPv6 route).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Dataplane6Config {
    /// This node's public IPv6 address (outer destination of frames for us).
    pub underlay_ip: [u8; 16],
    /// This node's IPv6 subnet (inner destinations accepted).
    pub local_subnet: [u8; 16],
    pub local_prefix_len: u32,
    /// Non-zero once written: IPv6 tunnel frames are checked from then on.
    pub enabled: u32,
}
const _: () = assert!(core::mem::size_of::<Dataplane6Config>() == 40);

impl Dataplane6Config {
    /// Whether `addr` lies in this node's IPv6 subnet.
    #[inline(always)]
    pub fn is_local(&self, addr: &[u8; 16]) -> bool {
        prefix6_contains(&self.local_subnet, self.local_prefix_len, addr)
    }
}

/// Whether `addr` lies in `prefix/len` (IPv6, network order), on two 64-bit halves (the
/// eBPF target has no 128-bit shifts).
#[inline(always)]
pub fn prefix6_contains(prefix: &[u8; 16], len: u32, addr: &[u8; 16]) -> bool {
    let half = |a: &[u8; 16], i: usize| u64::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4], a[i + 5], a[i + 6], a[i + 7]]);
    let (ph, pl, ah, al) = (half(prefix, 0), half(prefix, 8), half(addr, 0), half(addr, 8));
    let masked = |v: u64, bits: u32| if bits == 0 { 0 } else if bits >= 64 { v } else { v & (u64::MAX << (64 - bits)) };
    let len = if len > 128 { 128 } else { len };
    let (hi_bits, lo_bits) = if len > 64 { (64, len - 64) } else { (len, 0) };
    masked(ph, hi_bits) == masked(ah, hi_bits) && masked(pl, lo_bits) == masked(al, lo_bits)
}

/// Key data of `VTEP_BY_SUBNET` entries: an IPv4 prefix in network byte order (the LPM
/// key is `{prefix_len: u32 host order, data: Ipv4Prefix}`).
pub type Ipv4Prefix = [u8; 4];

/// Key of `PEER_STATS`: a peer's underlay IPv4 address, network byte order.
pub type PeerAddr = [u8; 4];

/// Value of `PEER_STATS` (one per CPU). The agent inserts zeroed entries when a peer
/// appears; the programs increment them. Bytes count the inner IPv4 packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PeerStats {
    /// Packets encapsulated towards this peer (TC egress).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets from this peer decapsulated and delivered.
    pub rx_packets: u64,
    pub rx_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<PeerStats>() == 32);

/// What `overlay-agent monitor` asks of the programs (the one entry of `MONITOR`). The
/// programs write events only while `heartbeat_ns` (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`)
/// is recent: the monitor renews it every second, so a monitor that died stops the events
/// within [`MONITOR_TIMEOUT_NS`] and nobody listening costs one array read per drop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MonitorState {
    pub heartbeat_ns: u64,
    /// [`monitor_flags`].
    pub flags: u32,
    /// With `DECISIONS`: one accepted or sent packet in `sample` is reported (0 or 1: all).
    pub sample: u32,
}
const _: () = assert!(core::mem::size_of::<MonitorState>() == 16);

pub const MONITOR_TIMEOUT_NS: u64 = 3_000_000_000;
/// At most this many events per CPU per second reach the ring buffer.
pub const MONITOR_EVENTS_PER_SEC: u64 = 1000;

pub mod monitor_flags {
    /// Report every drop (rate-limited).
    pub const DROPS: u32 = 1 << 0;
    /// Also report a sample of accepted and encapsulated packets.
    pub const DECISIONS: u32 = 1 << 1;
}

/// Where an event was seen.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    TcIngress = 1,
    Xdp = 2,
    TcEgress = 3,
    SocketGuard = 4,
    /// The kernel dropped the packet (the `kfree_skb` tracepoint): `outcome` is then the
    /// kernel's own drop reason (`enum skb_drop_reason`, as the running kernel numbers it).
    Kernel = 5,
}

impl Hook {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::TcIngress),
            2 => Some(Self::Xdp),
            3 => Some(Self::TcEgress),
            4 => Some(Self::SocketGuard),
            5 => Some(Self::Kernel),
            _ => None,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Self::TcIngress => "tc-ingress",
            Self::Xdp => "xdp",
            Self::TcEgress => "tc-egress",
            Self::SocketGuard => "socket-guard",
            Self::Kernel => "kernel",
        }
    }
}

/// One packet's outcome, as the monitor prints it. Addresses in network order, ports in host
/// order; zero where the packet did not show them (too short, not IPv4, no L4 header).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PacketEvent {
    pub ts_ns: u64,
    /// [`Counter`] as u32.
    pub outcome: u32,
    /// [`Hook`] as u8.
    pub hook: u8,
    /// The inner packet's IP protocol.
    pub proto: u8,
    /// For [`Hook::Kernel`]: which watched device the packet was on (the index into
    /// [`DropTraceConfig::ifindex`], from 1); the addresses and ports are then the packet's
    /// own IPv4 header's (the outer one on the underlay).
    pub device: u8,
    pub _pad: u8,
    /// Outer (tunnel) addresses: the peer and us. For encap, zero.
    pub outer_src: [u8; 4],
    pub outer_dst: [u8; 4],
    pub inner_src: [u8; 4],
    pub inner_dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// Length of the frame as the hook saw it.
    pub len: u32,
}
const _: () = assert!(core::mem::size_of::<PacketEvent>() == 40);

/// The `kfree_skb` tracepoint program's configuration. Offsets are into the running kernel's
/// structures, found in its BTF by the agent (they differ between kernels and builds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DropTraceConfig {
    /// 0: the program returns at once.
    pub enabled: u32,
    /// The node's network namespace (its inode number): devices of other namespaces can have
    /// the same ifindex.
    pub netns_inum: u32,
    /// The watched devices: the underlay and the overlay devices (0: an unused slot).
    pub ifindex: [u32; 4],
    /// Reasons not counted: our own programs' drops (`TC_INGRESS`, `TC_EGRESS`), which their
    /// own counters already hold; `u32::MAX` in unused slots.
    pub skip_reason: [u32; 4],
    /// `sk_buff.dev`, `.head`, `.network_header`, `.len`.
    pub off_skb_dev: u32,
    pub off_skb_head: u32,
    pub off_skb_network_header: u32,
    pub off_skb_len: u32,
    /// `net_device.ifindex`; `net_device.nd_net` and `net.ns.inum` (`NO_OFFSET` where the
    /// kernel has no network namespaces).
    pub off_dev_ifindex: u32,
    pub off_dev_nd_net: u32,
    pub off_net_inum: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<DropTraceConfig>() == 72);

impl DropTraceConfig {
    pub const NO_OFFSET: u32 = u32::MAX;
}

/// Key of `KERNEL_DROPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct KernelDropKey {
    /// The kernel's drop reason (0 on kernels before 5.17, which give none).
    pub reason: u32,
    pub ifindex: u32,
}

/// Flags in [`DataplaneConfig::flags`].
pub mod config_flags {
    /// The agent has written a complete configuration; programs pass everything until set.
    pub const READY: u16 = 1 << 0;
    // 1 << 1 was DIRECT_DELIVERY (retired: it skipped the host's netfilter inbound only).
    /// Decap only checks (vxlan): a frame that passes is handed on unchanged (TC_ACT_OK,
    /// XDP_PASS) to the kernel's own vxlan device, which decapsulates it as on a stock
    /// flannel node, so the inner packet enters the host on the overlay device and crosses
    /// its netfilter (conntrack, NAT, FORWARD) and reverse-path filter as flannel's do.
    pub const KERNEL_DECAP: u16 = 1 << 2;
    // 1 << 3 was NATIVE_UNMERGED (retired split delivery: merged frames through the kernel
    // device and the rest through the program could reorder a flow, and it was never shown
    // faster).
    /// `--inner-source-check peer`: a known peer's frame may carry any inner source (as a
    /// stock flannel node takes it: routed external clients, host processes bound to another
    /// address); without it the source must lie in a subnet that very peer leases.
    pub const ANY_INNER_SOURCE: u16 = 1 << 4;
}

/// The single entry of `DP_CONFIG`. Written by the agent at start-up, read by every program
/// on every packet (an array lookup, cheaper than re-loading programs to change a constant).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DataplaneConfig {
    /// [`EncapMode`] as u32.
    pub mode: u32,
    /// VXLAN network identifier, host byte order (low 24 bits).
    pub vni: u32,
    /// UDP destination port of the encapsulation, host byte order.
    pub port: u16,
    /// [`config_flags`].
    pub flags: u16,
    /// ifindex of the underlay interface (encap redirects there).
    pub underlay_ifindex: u32,
    /// ifindex of the overlay device (decap delivers there).
    pub overlay_ifindex: u32,
    /// This node's underlay address (outer source), network byte order.
    pub underlay_ip: [u8; 4],
    /// This node's subnet (inner destinations accepted by decap), network byte order.
    pub local_subnet: [u8; 4],
    /// Prefix length of `local_subnet`.
    pub local_prefix_len: u32,
    /// This node's VTEP MAC: the overlay device's MAC, inner source MAC on encap and
    /// destination MAC of decapsulated frames handed to the overlay device.
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<DataplaneConfig>() == 40);

impl DataplaneConfig {
    pub fn is_ready(&self) -> bool {
        self.flags & config_flags::READY != 0
    }
    pub fn encap_mode(&self) -> Option<EncapMode> {
        EncapMode::from_u32(self.mode)
    }
    /// Whether `addr` (network order) lies in this node's subnet.
    pub fn is_local(&self, addr: [u8; 4]) -> bool {
        prefix_contains(self.local_subnet, self.local_prefix_len, addr)
    }
}

/// Whether `addr` lies in `prefix/len` (both network byte order).
#[inline(always)]
pub fn prefix_contains(prefix: [u8; 4], len: u32, addr: [u8; 4]) -> bool {
    if len == 0 {
        return true;
    }
    let len = if len > 32 { 32 } else { len };
    let mask = u32::MAX << (32 - len);
    (u32::from_be_bytes(prefix) & mask) == (u32::from_be_bytes(addr) & mask)
}

/// Outcomes counted per CPU in `COUNTERS`. One shared enum for both sides: the agent
/// prints these names. Values are counter indexes, never program return codes. Never
/// renumber: add at the end.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Inner packet encapsulated and sent to a peer.
    Encapsulated = 0,
    /// Tunnel frame accepted: passed every check and handed to the kernel's vxlan device
    /// (kernel delivery, and always with XDP), or decapsulated and delivered by TC.
    Decapsulated = 1,
    /// Encap: no route for the inner destination (dropped).
    NoRoute = 2,
    /// Encap: not an IPv4 packet on the overlay device (dropped).
    EncapNotIpv4 = 3,
    /// Encap: the kernel refused to grow the packet or redirect it (dropped).
    EncapFailed = 4,
    /// Decap: tunnel frame from an underlay address not in the peer table (dropped).
    UnknownPeer = 5,
    /// Decap: VXLAN frame with another VNI (dropped).
    WrongVni = 6,
    /// Decap: VXLAN header flags other than exactly the I flag (dropped).
    BadVxlanFlags = 7,
    /// Decap: frame from a peer to our port too short for the tunnel and inner headers, or
    /// whose IP length runs past the frame (dropped). Frames too short to show a UDP port are
    /// not ours and pass (the stack drops them).
    Truncated = 8,
    /// Decap: outer IPv4 with options to our port (dropped).
    OuterIpOptions = 9,
    /// Decap: the first fragment of a datagram to our port with the udp backend, which has no
    /// kernel socket to reassemble for (dropped). With vxlan, checked first fragments go to
    /// the kernel instead (`fragment_to_kernel`).
    OuterFragment = 10,
    /// Decap: the inner payload is not a packet of the tunnel's family (IPv4 in IPv4 tunnels, IPv6
    /// in a dual-stack node's IPv6 ones) (dropped).
    InnerNotIpv4 = 11,
    /// Decap: inner destination is not in this node's subnet (dropped).
    NotLocalSubnet = 12,
    /// Decap: inner source is not in the sending peer's subnets (dropped).
    SpoofedSource = 13,
    /// Decap: the kernel refused to shrink or redirect the packet (dropped).
    DecapFailed = 14,
    /// A program ran before the agent wrote its configuration (passed).
    NotConfigured = 15,
    /// Decap: of the decapsulated packets, those the TC program decapsulated itself and
    /// handed to the overlay device's ingress (the rest went to the kernel's vxlan device).
    /// Index 16 counted the retired direct delivery before; a node upgraded in place keeps
    /// that count here.
    DecapNative = 16,
    /// A tunnel datagram to our port that arrived on another interface than the underlay (a
    /// local container, loopback, a second NIC): the socket guard dropped it before the
    /// kernel's vxlan socket could decapsulate it unchecked.
    ForeignTunnel = 17,
    /// Decap: outer IPv4 header checksum wrong, or its total length or the UDP length
    /// disagrees with the frame (dropped).
    BadOuterHeader = 18,
    /// Encap: a packet with DF set does not fit the path MTU to its peer (the route's, or
    /// one the node learnt from a router) once encapsulated: answered with ICMP
    /// fragmentation-needed carrying the MTU left for the inner packet, and dropped.
    EncapFragNeeded = 19,
    /// Encap: a packet too big for the path that cannot be answered (with DF but IPv4 options,
    /// or not from this node's subnet; with the udp backend also a fragmentable one larger
    /// than the underlay device), or one the kernel refused to turn into an ICMP reply
    /// (dropped).
    EncapTooBig = 20,
    /// Decap (vxlan): the first fragment of a peer's fragmented tunnel datagram, which carried
    /// the tunnel and inner headers whole and passed every check a whole frame passes; handed
    /// to the kernel, which reassembles the datagram (no later fragment may reach into those
    /// headers: `fragment_overlap`); the socket guard then checks it (a peer, on the
    /// underlay) before the kernel's vxlan device takes it. Not a drop.
    FragmentToKernel = 21,
    /// Decap: the outer header says congestion experienced and the inner packet is not
    /// ECN-capable: RFC 6040 drops it (the kernel's vxlan device does the same).
    CongestionNotEct = 22,
    /// Encap (vxlan): a packet the program leaves to the kernel's vxlan device, which sends it
    /// by the forwarding entry the agent keeps for the peer: already tunnelled by a container
    /// (the kernel cannot put a second tunnel around a GSO aggregate in place), a GSO
    /// aggregate past 64 KiB (BIG TCP; the device segments it first), or a fragmentable packet
    /// bigger than the path (the device fragments the outer packet). Not a drop.
    EncapToKernel = 23,
    /// Encap: the node has no usable route to the peer's underlay address (no route,
    /// unreachable, blackhole or prohibit): dropped here, where it is seen, rather than by
    /// the redirect, where it would not be.
    NoUnderlayRoute = 24,
    /// Encap: encapsulated and handed to the kernel while the link-layer address of the next
    /// hop towards the peer was unknown (no neighbour entry yet, one being resolved, or one
    /// that failed). The kernel queues the packet until the next hop answers ARP and drops it
    /// if it never does (in the neighbour layer, where no counter of ours sees it). Not a drop
    /// by itself, and counted with `encapsulated` too: the first packets to a peer after its
    /// entry expired land here; a count that keeps growing means a peer (or the router
    /// towards it) does not answer on the underlay. `overlay-agent monitor` names the peer.
    UnresolvedNextHop = 25,
    /// Decap: the first fragment of a datagram to our port that does not carry the tunnel and
    /// inner headers whole (dropped): reassembled, the datagram would bring headers that no
    /// check saw.
    TinyFragment = 26,
    /// Decap: a later fragment to our address (of a UDP datagram for IPv4; of any datagram
    /// for IPv6, whose reassembly takes the protocol from the first fragment) whose payload
    /// starts inside the bytes the checks read in a first fragment (RFC 1858's overlapping or
    /// tiny fragments; dropped). Only paths with an MTU below 76 bytes fragment that early.
    FragmentOverlap = 27,
    /// Decap: a frame to our address whose headers the program cannot read to their end
    /// (more IPv6 extension headers than it walks, a chain cut short, or headers past the
    /// bytes XDP may read), so it cannot tell whether the frame is a tunnel frame (dropped).
    UnreadableHeaders = 28,
}

impl Counter {
    pub const COUNT: usize = 29;
    pub const ALL: [Counter; Self::COUNT] = [
        Self::Encapsulated,
        Self::Decapsulated,
        Self::NoRoute,
        Self::EncapNotIpv4,
        Self::EncapFailed,
        Self::UnknownPeer,
        Self::WrongVni,
        Self::BadVxlanFlags,
        Self::Truncated,
        Self::OuterIpOptions,
        Self::OuterFragment,
        Self::InnerNotIpv4,
        Self::NotLocalSubnet,
        Self::SpoofedSource,
        Self::DecapFailed,
        Self::NotConfigured,
        Self::DecapNative,
        Self::ForeignTunnel,
        Self::BadOuterHeader,
        Self::EncapFragNeeded,
        Self::EncapTooBig,
        Self::FragmentToKernel,
        Self::CongestionNotEct,
        Self::EncapToKernel,
        Self::NoUnderlayRoute,
        Self::UnresolvedNextHop,
        Self::TinyFragment,
        Self::FragmentOverlap,
        Self::UnreadableHeaders,
    ];
    /// The name operators see (`overlay-agent stats`, metrics).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Encapsulated => "encapsulated",
            Self::Decapsulated => "decapsulated",
            Self::NoRoute => "no_route",
            Self::EncapNotIpv4 => "encap_not_ipv4",
            Self::EncapFailed => "encap_failed",
            Self::UnknownPeer => "unknown_peer",
            Self::WrongVni => "wrong_vni",
            Self::BadVxlanFlags => "bad_vxlan_flags",
            Self::Truncated => "truncated",
            Self::OuterIpOptions => "outer_ip_options",
            Self::OuterFragment => "outer_fragment",
            Self::InnerNotIpv4 => "inner_not_ipv4",
            Self::NotLocalSubnet => "not_local_subnet",
            Self::SpoofedSource => "spoofed_source",
            Self::DecapFailed => "decap_failed",
            Self::NotConfigured => "not_configured",
            Self::DecapNative => "decap_native",
            Self::ForeignTunnel => "foreign_tunnel",
            Self::BadOuterHeader => "bad_outer_header",
            Self::EncapFragNeeded => "encap_frag_needed",
            Self::EncapTooBig => "encap_too_big",
            Self::FragmentToKernel => "fragment_to_kernel",
            Self::CongestionNotEct => "congestion_not_ect",
            Self::EncapToKernel => "encap_to_kernel",
            Self::NoUnderlayRoute => "no_underlay_route",
            Self::UnresolvedNextHop => "unresolved_next_hop",
            Self::TinyFragment => "tiny_fragment",
            Self::FragmentOverlap => "fragment_overlap",
            Self::UnreadableHeaders => "unreadable_headers",
        }
    }
    /// Whether this outcome drops the packet.
    pub const fn is_drop(self) -> bool {
        !matches!(
            self,
            Self::Encapsulated
                | Self::Decapsulated
                | Self::NotConfigured
                | Self::DecapNative
                | Self::FragmentToKernel
                | Self::EncapToKernel
                | Self::UnresolvedNextHop
        )
    }
}

#[cfg(feature = "user")]
mod user {
    // aya 0.14's Pod is its own trait; the orphan rule puts these impls here.
    unsafe impl aya::Pod for super::Vtep {}
    unsafe impl aya::Pod for super::PeerStats {}
    unsafe impl aya::Pod for super::DataplaneConfig {}
    unsafe impl aya::Pod for super::MonitorState {}
    unsafe impl aya::Pod for super::Vtep6 {}
    unsafe impl aya::Pod for super::Dataplane6Config {}
    unsafe impl aya::Pod for super::DropTraceConfig {}
    unsafe impl aya::Pod for super::KernelDropKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_table_is_complete_and_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "Counter::ALL[{i}] is {c:?}");
        }
    }

    /// Each map's layout as of its current version: (name, version, key size, value size).
    /// A change to a struct here without a new version in MAP_LAYOUTS fails this test; the
    /// fix is to bump the version (and to teach the agent to migrate, if the old contents
    /// matter) and then to record the new sizes.
    #[test]
    fn layouts_are_versioned() {
        use core::mem::size_of;
        let recorded: [(&str, u32, usize, usize); map_names::ALL.len()] = [
            (map_names::VTEP_BY_SUBNET, 1, 8, 12),
            (map_names::PEER_STATS, 1, 4, 32),
            (map_names::COUNTERS, 1, 4, 8),
            (map_names::DP_CONFIG, 2, 4, 40),
            (map_names::EVENTS, 1, 0, 40),
            (map_names::MONITOR, 1, 4, 16),
            (map_names::CONFIG_SLOT, 1, 4, 4),
            (map_names::LAYOUTS, 1, 4, 4),
            (map_names::VTEP6_BY_SUBNET, 1, 20, 24),
            (map_names::PEER6_STATS, 1, 16, 32),
            (map_names::DP_CONFIG6, 1, 4, 40),
            (map_names::KERNEL_DROPS, 1, 8, 8),
            (map_names::DROP_TRACE, 1, 4, 72),
        ];
        let actual = [
            (4 + size_of::<Ipv4Prefix>(), size_of::<Vtep>()),
            (size_of::<PeerAddr>(), size_of::<PeerStats>()),
            (4, size_of::<u64>()),
            (4, size_of::<DataplaneConfig>()),
            (0, size_of::<PacketEvent>()),
            (4, size_of::<MonitorState>()),
            (4, 4),
            (4, 4),
            (4 + size_of::<Ipv6Prefix>(), size_of::<Vtep6>()),
            (size_of::<Peer6Addr>(), size_of::<PeerStats>()),
            (4, size_of::<Dataplane6Config>()),
            (size_of::<KernelDropKey>(), 8),
            (4, size_of::<DropTraceConfig>()),
        ];
        for (i, (name, version, key, value)) in recorded.iter().enumerate() {
            assert_eq!(map_names::ALL[i], *name);
            assert_eq!(MAP_LAYOUTS[i], *version, "{name}: the version changed; record its layout here");
            assert_eq!(actual[i], (*key, *value), "{name}: the layout changed; bump its version in MAP_LAYOUTS");
            assert_eq!(layout_version(name), Some(*version));
        }
        assert_eq!(layout_version("NO_SUCH_MAP"), None);
        assert!(map_names::ALL.len() as u32 <= LAYOUT_SLOTS);
    }

    #[test]
    fn prefix6_contains_matches_cidr_semantics() {
        let a = |s: &str| s.parse::<core::net::Ipv6Addr>().unwrap().octets();
        assert!(prefix6_contains(&a("fd00:10:244:7::"), 64, &a("fd00:10:244:7::2")));
        assert!(!prefix6_contains(&a("fd00:10:244:7::"), 64, &a("fd00:10:244:8::2")));
        assert!(prefix6_contains(&a("fd00::"), 8, &a("fdff::1")));
        assert!(!prefix6_contains(&a("fd00::"), 9, &a("fdff::1")));
        assert!(prefix6_contains(&a("fd00::5:0"), 112, &a("fd00::5:77")));
        assert!(!prefix6_contains(&a("fd00::5:0"), 112, &a("fd00::6:77")));
        assert!(prefix6_contains(&a("fd00::5"), 128, &a("fd00::5")));
        assert!(!prefix6_contains(&a("fd00::5"), 128, &a("fd00::6")));
        assert!(prefix6_contains(&a("::"), 0, &a("2001:db8::1")));
    }

    #[test]
    fn prefix_contains_matches_cidr_semantics() {
        assert!(prefix_contains([10, 244, 1, 0], 24, [10, 244, 1, 77]));
        assert!(!prefix_contains([10, 244, 1, 0], 24, [10, 244, 2, 1]));
        assert!(prefix_contains([0, 0, 0, 0], 0, [8, 8, 8, 8]));
        assert!(prefix_contains([10, 244, 1, 5], 32, [10, 244, 1, 5]));
        assert!(!prefix_contains([10, 244, 1, 5], 32, [10, 244, 1, 6]));
    }
}
