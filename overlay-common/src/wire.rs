//! Wire formats: flannel's VXLAN and UDP encapsulations, and small pure helpers to build and
//! check their headers. Used by the eBPF programs on the packet path (so: no allocation, no
//! slices of unknown length, constant indexes) and unit-tested on the host.

use crate::Counter;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// The fixed IPv6 header (no extension headers).
pub const IPV6_HLEN: usize = 40;
pub const IPPROTO_UDP: u8 = 17;
/// IPv4 in IPv4 (RFC 2003): flannel's ipip backend.
pub const IPPROTO_IPIP: u8 = 4;
/// The ECN field of the IPv4 TOS byte, and its congestion-experienced codepoint (RFC 3168).
pub const ECN_MASK: u8 = 0x03;
pub const ECN_CE: u8 = 0x03;

/// Linux's (and flannel's) VXLAN port; IANA's 4789 is not what flannel uses.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// flannel's udp backend port.
pub const DEFAULT_UDP_PORT: u16 = 8285;
pub const DEFAULT_VNI: u32 = 1;

/// Outer IPv4 + UDP + VXLAN + inner Ethernet: the MTU cost of VXLAN.
pub const VXLAN_OVERHEAD: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
/// Outer IPv4 + UDP: the MTU cost of flannel's udp encapsulation.
pub const UDP_OVERHEAD: usize = IPV4_HLEN + UDP_HLEN;
/// Outer IPv4 alone: the MTU cost of IP-in-IP (flannel's ipip backend: the underlay's MTU
/// less 20).
pub const IPIP_OVERHEAD: usize = IPV4_HLEN;
const _: () = assert!(VXLAN_OVERHEAD == 50 && UDP_OVERHEAD == 28 && IPIP_OVERHEAD == 20);

/// Bytes written in front of the inner IPv4 packet by VXLAN encap (outer Ethernet included).
pub const VXLAN_ENCAP_HDR: usize = ETH_HLEN + VXLAN_OVERHEAD;
/// Bytes written in front of the inner IPv4 packet by udp encap (outer Ethernet included).
pub const UDP_ENCAP_HDR: usize = ETH_HLEN + UDP_OVERHEAD;
/// Offset of the UDP payload in a tunnel frame without IPv4 options.
pub const TUNNEL_PAYLOAD_OFF: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN;

/// The VXLAN "I" flag: the VNI field is valid (RFC 7348). The only flag flannel sets.
pub const VXLAN_FLAG_I: u8 = 0x08;

/// TTL of the outer header (the kernel vxlan device's default too).
pub const OUTER_TTL: u8 = 64;

/// Outer UDP source port from a flow hash, in the ephemeral range as the kernel vxlan
/// device does, so ECMP and RSS spread flows while a flow keeps its port.
#[inline(always)]
pub fn source_port(flow_hash: u32) -> u16 {
    0xc000 | (flow_hash as u16 & 0x3fff)
}

/// The Internet checksum of a 20-byte IPv4 header (checksum field taken as is; zero it
/// first when building).
#[inline(always)]
pub fn ipv4_checksum(hdr: &[u8; IPV4_HLEN]) -> u16 {
    !fold(add_words(0, hdr))
}

/// `sum` plus the big-endian 16-bit words of `bytes` (an even number of them; fixed-size in
/// the programs so that the loop unrolls).
#[inline(always)]
pub fn add_words<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// A one's-complement sum folded to 16 bits, with end-around carry.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The IPv4 "don't fragment" flag, in the flags/fragment-offset word.
pub const IPV4_DF: u16 = 0x4000;

/// An IPv4 or UDP length field for `len` bytes. Lengths past 65535 occur only on GSO
/// aggregates (BIG TCP senders): they become 0, the kernel's own convention for IPv4 BIG TCP
/// (`iph_totlen`), instead of wrapping to a short length that a receiver would trim the
/// packet to. Segmentation writes every segment's real lengths.
#[inline(always)]
pub fn length_field(len: usize) -> u16 {
    if len > u16::MAX as usize {
        0
    } else {
        len as u16
    }
}

/// Outer IPv4 + UDP headers for a tunnel packet whose UDP payload is `payload_len` bytes.
/// The UDP checksum is left 0 (allowed for IPv4; the kernel vxlan device accepts it).
#[inline(always)]
fn write_ipv4_udp(out: &mut [u8], p: &EncapParams, payload_len: usize) {
    let udp_len = UDP_HLEN + payload_len;
    let mut ip = [0u8; IPV4_HLEN];
    ip[0] = 0x45;
    ip[1] = p.tos;
    ip[2..4].copy_from_slice(&length_field(IPV4_HLEN + udp_len).to_be_bytes());
    ip[4..6].copy_from_slice(&p.ip_id.to_be_bytes());
    if p.dont_fragment {
        ip[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
    }
    ip[8] = OUTER_TTL;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&p.src_ip);
    ip[16..20].copy_from_slice(&p.dst_ip);
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    out[..IPV4_HLEN].copy_from_slice(&ip);
    out[IPV4_HLEN..IPV4_HLEN + 2].copy_from_slice(&p.src_port.to_be_bytes());
    out[IPV4_HLEN + 2..IPV4_HLEN + 4].copy_from_slice(&p.dst_port.to_be_bytes());
    out[IPV4_HLEN + 4..IPV4_HLEN + 6].copy_from_slice(&length_field(udp_len).to_be_bytes());
    out[IPV4_HLEN + 6..IPV4_HLEN + 8].copy_from_slice(&[0, 0]);
}

/// The outer header's fragmentation policy and type of service for an inner IPv4 header,
/// as `(tos, dont_fragment)`:
/// - TOS: DSCP and ECN copied from the inner header (RFC 6040's normal mode; the kernel
///   device's `tos inherit`), so the underlay's queues see the class and congestion marks.
/// - DF: inherited from the inner packet. A DF inner packet gets a DF outer one: a router
///   with a smaller MTU answers the node, which learns the path MTU, and the encap program
///   then answers the sender with fragmentation-needed (end-to-end PMTU discovery). A packet
///   that may be fragmented gets an outer header that may be: routers fragment it and the
///   receiving node's kernel reassembles it, as with flannel's own device.
/// - ID: only a fragmentable datagram needs a unique one (RFC 6864); never 0 then.
#[inline(always)]
pub fn outer_policy(inner: &[u8; IPV4_HLEN]) -> (u8, bool) {
    let df = u16::from_be_bytes([inner[6], inner[7]]) & IPV4_DF != 0;
    (inner[1], df)
}

/// A fragmentable outer datagram's IPv4 ID from a random number: never 0.
#[inline(always)]
pub fn fragment_id(random: u32) -> u16 {
    let id = (random ^ (random >> 16)) as u16;
    if id == 0 {
        1
    } else {
        id
    }
}

/// Length of each outer packet on the wire (from the outer IPv4 header on) for an inner
/// packet of `inner_len` bytes, or, for a GSO aggregate, for its largest segment: the inner
/// IPv4 and transport headers (`l3l4_hlen`) plus `gso_size`.
#[inline(always)]
pub fn outer_segment_len(inner_len: usize, gso_size: usize, l3l4_hlen: usize, overhead: usize) -> usize {
    if gso_size == 0 {
        inner_len + overhead
    } else {
        l3l4_hlen + gso_size + overhead
    }
}

/// ICMP "destination unreachable, fragmentation needed" (type 3, code 4; RFC 1191) for an
/// inner packet that does not fit the tunnel, from `from` (the packet's destination, which
/// routes back through the overlay device, so the node's reverse-path filter and conntrack
/// take it as the flow's RELATED reply) to the packet's source. `quote` is the start of the
/// offending packet: its IPv4 header (no options) and first payload bytes. Returns the IPv4
/// and ICMP headers (next-hop `mtu`), both checksummed, to put in front of the quote.
#[inline(always)]
pub fn icmp_frag_needed_header(quote: &[u8; ICMP_QUOTE], mtu: u16) -> [u8; IPV4_HLEN + ICMP_HLEN] {
    let mut h = [0u8; IPV4_HLEN + ICMP_HLEN];
    h[0] = 0x45;
    // Internetwork control, as Linux's icmp_send sends its errors.
    h[1] = 0xc0;
    h[2..4].copy_from_slice(&(ICMP_FRAG_NEEDED_LEN as u16).to_be_bytes());
    h[8] = OUTER_TTL;
    h[9] = IPPROTO_ICMP;
    h[12..16].copy_from_slice(&quote[16..20]);
    h[16..20].copy_from_slice(&quote[12..16]);
    let mut ip = [0u8; IPV4_HLEN];
    ip.copy_from_slice(&h[..IPV4_HLEN]);
    let c = ipv4_checksum(&ip);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = IPV4_HLEN;
    h[icmp] = 3;
    h[icmp + 1] = 4;
    h[icmp + 6..icmp + 8].copy_from_slice(&mtu.to_be_bytes());
    // Checksum over the ICMP header (checksum field 0) and the quote.
    let sum = fold(add_words(0x0304 + mtu as u32, quote));
    h[icmp + 2..icmp + 4].copy_from_slice(&(!sum).to_be_bytes());
    h
}

/// Set a quoted TCP or UDP header's checksum field to the one value that completing a checksum
/// over the quote would write there again, and return where it sits in the quote and its bytes.
///
/// The reply is built from the offending packet itself, whose checksum may be left to the
/// device (CHECKSUM_PARTIAL: the start and offset point at its transport header, now in the
/// quote). No helper clears that state and a TC program cannot read it; a device without
/// checksum offload on the way back (or `skb_checksum_help`) would then complete a checksum
/// from the quoted transport header to the end of the reply and write it into the quote,
/// after the ICMP checksum was taken over the old bytes, and the sender would drop the reply.
/// With the field at X such that the completion, ~(R + X) with R the sum of the other quoted
/// transport bytes, gives X again (R + 2X = -0 in one's complement: X = ~R rotated right by
/// one bit), the reply reads the same whether or not anything completes it. The quoted
/// checksum is not one anybody checks (a sender matches an ICMP error by addresses and ports).
#[inline(always)]
pub fn settle_quoted_checksum(quote: &mut [u8; ICMP_QUOTE]) -> Option<(usize, [u8; 2])> {
    let off = match quote[9] {
        6 => 16,
        17 => 6,
        _ => return None,
    };
    if quote[0] != 0x45 {
        return None;
    }
    let field = IPV4_HLEN + off;
    quote[field] = 0;
    quote[field + 1] = 0;
    // Summed in place (no copy: the encap program's stack is nearly full).
    let mut sum = 0u32;
    let mut i = IPV4_HLEN;
    while i + 1 < ICMP_QUOTE {
        sum += u16::from_be_bytes([quote[i], quote[i + 1]]) as u32;
        i += 2;
    }
    let rest = fold(sum);
    // (A UDP field of 0 would read "no checksum", which nobody checks in a quote; a device
    // that writes 0xffff for a UDP 0 changes the reply's sum by -0, which checks the same.)
    let x = (!rest).rotate_right(1);
    quote[field..field + 2].copy_from_slice(&x.to_be_bytes());
    Some((field, x.to_be_bytes()))
}

/// The whole message: [`icmp_frag_needed_header`] and the quote.
pub fn icmp_frag_needed(quote: &[u8; ICMP_QUOTE], mtu: u16) -> [u8; ICMP_FRAG_NEEDED_LEN] {
    let mut out = [0u8; ICMP_FRAG_NEEDED_LEN];
    out[..IPV4_HLEN + ICMP_HLEN].copy_from_slice(&icmp_frag_needed_header(quote, mtu));
    out[IPV4_HLEN + ICMP_HLEN..].copy_from_slice(quote);
    out
}

pub const IPPROTO_ICMP: u8 = 1;
pub const ICMP_HLEN: usize = 8;
/// What an ICMP error quotes of the offending packet here: its IPv4 header and 20 bytes (RFC
/// 792 asks for 8 at least). 20 keeps a TCP header whole: the kernel will not cut a packet
/// whose checksum is left to the device (CHECKSUM_PARTIAL) before that checksum field.
pub const ICMP_QUOTE: usize = IPV4_HLEN + 20;
/// IPv4 + ICMP header + quote.
pub const ICMP_FRAG_NEEDED_LEN: usize = IPV4_HLEN + ICMP_HLEN + ICMP_QUOTE;

/// RFC 6040 decapsulation of the ECN field: the inner TOS to deliver given the outer and
/// inner TOS bytes, or `None` when the packet must be dropped (congestion experienced on
/// the outside of a packet whose sender does not do ECN: the mark could not be passed on).
#[inline(always)]
pub fn ecn_decapsulate(outer_tos: u8, inner_tos: u8) -> Option<u8> {
    if outer_tos & ECN_MASK != ECN_CE || inner_tos & ECN_MASK == ECN_CE {
        return Some(inner_tos);
    }
    if inner_tos & ECN_MASK == 0 {
        return None;
    }
    Some(inner_tos | ECN_CE)
}

/// What an encapsulating program needs to know about one packet.
#[derive(Clone, Copy, Debug)]
pub struct EncapParams {
    pub src_ip: [u8; 4],
    pub dst_ip: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    /// Length of the inner IPv4 packet.
    pub inner_len: usize,
    /// Outer TOS byte and DF flag ([`outer_policy`]) and IPv4 ID ([`fragment_id`], or 0
    /// with DF).
    pub tos: u8,
    pub dont_fragment: bool,
    pub ip_id: u16,
    /// Outer Ethernet addresses. With `bpf_redirect_neigh` the kernel rewrites them, but the
    /// destination must be unicast or the helper drops the packet.
    pub outer_src_mac: [u8; 6],
    pub outer_dst_mac: [u8; 6],
}

#[inline(always)]
fn write_eth(out: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
}

/// Everything in front of the inner IPv4 packet of a VXLAN frame: outer Ethernet, IPv4,
/// UDP, VXLAN (I flag, `vni`), and the inner Ethernet header from `inner_src_mac` (our
/// VtepMAC) to `inner_dst_mac` (the peer's VtepMAC, which stock flannel nodes require).
#[inline(always)]
pub fn vxlan_encap_header(
    p: &EncapParams,
    vni: u32,
    inner_src_mac: [u8; 6],
    inner_dst_mac: [u8; 6],
) -> [u8; VXLAN_ENCAP_HDR] {
    let mut h = [0u8; VXLAN_ENCAP_HDR];
    write_eth(&mut h[..ETH_HLEN], p.outer_dst_mac, p.outer_src_mac);
    let payload = VXLAN_HLEN + ETH_HLEN + p.inner_len;
    write_ipv4_udp(&mut h[ETH_HLEN..TUNNEL_PAYLOAD_OFF], p, payload);
    let v = TUNNEL_PAYLOAD_OFF;
    h[v] = VXLAN_FLAG_I;
    let vni = (vni & 0x00ff_ffff) << 8;
    h[v + 4..v + 8].copy_from_slice(&vni.to_be_bytes());
    write_eth(&mut h[v + VXLAN_HLEN..], inner_dst_mac, inner_src_mac);
    h
}

/// Everything in front of the inner IPv4 packet of a flannel-udp frame: outer Ethernet,
/// IPv4 and UDP. The payload is the raw inner packet.
#[inline(always)]
pub fn udp_encap_header(p: &EncapParams) -> [u8; UDP_ENCAP_HDR] {
    let mut h = [0u8; UDP_ENCAP_HDR];
    write_eth(&mut h[..ETH_HLEN], p.outer_dst_mac, p.outer_src_mac);
    write_ipv4_udp(&mut h[ETH_HLEN..], p, p.inner_len);
    h
}

/// The EtherType of an Ethernet header, host order.
#[inline(always)]
pub fn ethertype(eth: &[u8; ETH_HLEN]) -> u16 {
    u16::from_be_bytes([eth[12], eth[13]])
}

/// Where a packet sits in its datagram, from its IPv4 flags/fragment word or its IPv6
/// fragment header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0 with more to come: the only fragment that carries the UDP header and the
    /// tunnel's headers behind it.
    First,
    /// A later fragment, whose payload goes `offset` bytes into the datagram's payload.
    Later { offset: usize },
}

impl Fragment {
    /// From the offset (in 8-byte units) and the more-fragments flag.
    #[inline(always)]
    pub const fn from_parts(offset_units: u16, more: bool) -> Self {
        match (offset_units, more) {
            (0, false) => Fragment::Whole,
            (0, true) => Fragment::First,
            (o, _) => Fragment::Later { offset: o as usize * 8 },
        }
    }
}

/// What the fixed part of an IPv4 header says about a possible tunnel frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv4Class {
    /// Neither UDP nor IP-in-IP (or not IPv4 at all): not ours, pass it on.
    NotUdp,
    /// A UDP datagram or a fragment of one. `header_len` is IHL * 4.
    Udp { header_len: usize, fragment: Fragment },
    /// An IP-in-IP packet (protocol 4) or a fragment of one.
    Ipip { header_len: usize, fragment: Fragment },
}

/// Classify a 20-byte IPv4 header.
#[inline(always)]
pub fn classify_ipv4(ip: &[u8; IPV4_HLEN]) -> Ipv4Class {
    if ip[0] >> 4 != 4 || (ip[9] != IPPROTO_UDP && ip[9] != IPPROTO_IPIP) {
        return Ipv4Class::NotUdp;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let header_len = ((ip[0] & 0x0f) as usize) * 4;
    let fragment = Fragment::from_parts(frag & 0x1fff, frag & 0x2000 != 0);
    if ip[9] == IPPROTO_IPIP {
        return Ipv4Class::Ipip { header_len, fragment };
    }
    Ipv4Class::Udp { header_len, fragment }
}

/// Bytes after the outer IP header that decap reads and checks in a tunnel datagram: UDP,
/// then VXLAN, inner Ethernet and inner IPv4 (vxlan, 50) or the inner IPv4 header (udp, 28).
/// A first fragment must carry them whole, and no later fragment may start inside them
/// (RFC 1858), so that a reassembled datagram cannot bring headers no check saw.
pub const fn checked_bytes(mode: crate::EncapMode) -> usize {
    match mode {
        crate::EncapMode::Vxlan => UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN,
        crate::EncapMode::Udp => UDP_HLEN + IPV4_HLEN,
        crate::EncapMode::Ipip => IPV4_HLEN,
    }
}

/// The same for a dual-stack node's IPv6 tunnel datagrams (VXLAN with an inner IPv6 header).
pub const CHECKED_BYTES6: usize = UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV6_HLEN;
const _: () = assert!(
    checked_bytes(crate::EncapMode::Vxlan) == 50 && checked_bytes(crate::EncapMode::Udp) == 28 && checked_bytes(crate::EncapMode::Ipip) == 20
);
const _: () = assert!(CHECKED_BYTES6 == 70);

/// A later fragment to our address whose payload starts inside the `checked` bytes would
/// overwrite (or, with a tiny first fragment, supply) headers the checks read: dropped, as
/// RFC 1858 drops TCP fragments at offset 1. A trade-off taken on purpose: only a path whose
/// MTU is below 76 bytes (IPv4's floor is 68, which leaves a first fragment 48 bytes) starts
/// a legitimate later fragment that early, and then any UDP datagram to the node loses it;
/// IPv6's floor of 1280 leaves first fragments 1232 bytes.
#[inline(always)]
pub fn later_fragment_overlaps(offset: usize, checked: usize) -> bool {
    offset < checked
}

/// The UDP destination port of a UDP header, host order.
#[inline(always)]
pub fn udp_dst_port(udp: &[u8; UDP_HLEN]) -> u16 {
    u16::from_be_bytes([udp[2], udp[3]])
}

/// Check the outer IPv4 and UDP headers (no options) of a frame of `frame_len` bytes from the
/// Ethernet header on, as the stack's `ip_rcv` and `udp_rcv` would: the header checksum, a
/// total length that fits in the frame (which may be longer: Ethernet pads short frames;
/// shorter is `Truncated`) and holds a UDP header, and a UDP length equal to what the IPv4
/// header leaves. `merged`:
/// the frame is a GRO/GSO aggregate, whose lengths the kernel itself set; only the checksum
/// is checked.
#[inline(always)]
pub fn check_outer(ip: &[u8; IPV4_HLEN], udp: &[u8; UDP_HLEN], frame_len: usize, merged: bool) -> Result<(), Counter> {
    if ipv4_checksum(ip) != 0 {
        return Err(Counter::BadOuterHeader);
    }
    if merged {
        return Ok(());
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if total > frame_len.saturating_sub(ETH_HLEN) {
        return Err(Counter::Truncated);
    }
    if total < IPV4_HLEN + UDP_HLEN || udp_len != total - IPV4_HLEN {
        return Err(Counter::BadOuterHeader);
    }
    Ok(())
}

/// Check the outer IPv4 (no options) and UDP headers of the first fragment of a tunnel
/// datagram, as `check_outer` checks a whole one: the header checksum, a total length that
/// fits in the frame (`Truncated` otherwise), a fragment carrying at least the `checked`
/// bytes (the tunnel and inner headers: `TinyFragment` otherwise), and a UDP length no
/// smaller than what this fragment carries (the datagram goes on in later fragments).
#[inline(always)]
pub fn check_first_fragment(ip: &[u8; IPV4_HLEN], udp: &[u8; UDP_HLEN], frame_len: usize, checked: usize) -> Result<(), Counter> {
    if ipv4_checksum(ip) != 0 {
        return Err(Counter::BadOuterHeader);
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total > frame_len.saturating_sub(ETH_HLEN) {
        return Err(Counter::Truncated);
    }
    let carried = total.saturating_sub(IPV4_HLEN);
    if carried < checked {
        return Err(Counter::TinyFragment);
    }
    if (u16::from_be_bytes([udp[4], udp[5]]) as usize) < carried {
        return Err(Counter::BadOuterHeader);
    }
    Ok(())
}

/// Check the outer IPv4 header (no options) of an IP-in-IP packet as ip_rcv would: the
/// header checksum, a total length that fits in the frame (`Truncated` otherwise) and that
/// holds at least the inner IPv4 header. A merged (GRO) packet's total length is the
/// kernel's to keep.
#[inline(always)]
pub fn check_outer_ipip(ip: &[u8; IPV4_HLEN], frame_len: usize, merged: bool) -> Result<(), Counter> {
    if ipv4_checksum(ip) != 0 {
        return Err(Counter::BadOuterHeader);
    }
    if merged {
        return Ok(());
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total > frame_len.saturating_sub(ETH_HLEN) {
        return Err(Counter::Truncated);
    }
    if total < IPV4_HLEN + IPV4_HLEN {
        return Err(Counter::Truncated);
    }
    Ok(())
}

/// The first fragment of an IP-in-IP packet: the checksum, a total length that fits in the
/// frame, and the whole inner IPv4 header in this fragment (`TinyFragment` otherwise).
#[inline(always)]
pub fn check_first_fragment_ipip(ip: &[u8; IPV4_HLEN], frame_len: usize) -> Result<(), Counter> {
    if ipv4_checksum(ip) != 0 {
        return Err(Counter::BadOuterHeader);
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total > frame_len.saturating_sub(ETH_HLEN) {
        return Err(Counter::Truncated);
    }
    if total.saturating_sub(IPV4_HLEN) < checked_bytes(crate::EncapMode::Ipip) {
        return Err(Counter::TinyFragment);
    }
    Ok(())
}

/// The IPv6 counterpart for a tunnel datagram behind one fragment header (`FRAG6_HLEN`
/// bytes between the fixed header and UDP): a payload that fits the frame, at least
/// `CHECKED_BYTES6` of the datagram in this fragment (`TinyFragment`), and a UDP length
/// that is at least what it carries (a first fragment) or exactly that (`more` clear: an
/// atomic fragment, RFC 6946, a whole datagram with a fragment header).
#[inline(always)]
pub fn check_outer6_fragment(first_byte: u8, payload_len: u16, udp: &[u8; UDP_HLEN], frame_len: usize, more: bool) -> Result<(), Counter> {
    if first_byte >> 4 != 6 {
        return Err(Counter::BadOuterHeader);
    }
    let payload = payload_len as usize;
    if IPV6_HLEN + payload > frame_len.saturating_sub(ETH_HLEN) {
        return Err(Counter::Truncated);
    }
    let carried = payload.saturating_sub(FRAG6_HLEN);
    if carried < CHECKED_BYTES6 {
        return Err(Counter::TinyFragment);
    }
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if udp_len < carried || (!more && udp_len != carried) {
        return Err(Counter::BadOuterHeader);
    }
    Ok(())
}

/// IPv6's fragment header.
pub const FRAG6_HLEN: usize = 8;

/// Check the outer IPv6 header (its first byte and payload length) and UDP header of a frame of `frame_len` bytes (from the Ethernet
/// header on) as `ipv6_rcv` and `udp_rcv` would: a payload length that fits in the frame
/// (shorter is `Truncated`) and holds a UDP header, and a UDP length equal to it. IPv6 has no
/// header checksum. `merged`: a GRO aggregate, whose lengths the kernel set.
#[inline(always)]
pub fn check_outer6(first_byte: u8, payload_len: u16, udp: &[u8; UDP_HLEN], frame_len: usize, merged: bool) -> Result<(), Counter> {
    if first_byte >> 4 != 6 {
        return Err(Counter::BadOuterHeader);
    }
    if merged {
        return Ok(());
    }
    let payload = payload_len as usize;
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if IPV6_HLEN + payload > frame_len.saturating_sub(ETH_HLEN) {
        return Err(Counter::Truncated);
    }
    if payload < UDP_HLEN || udp_len != payload {
        return Err(Counter::BadOuterHeader);
    }
    Ok(())
}

/// Check a VXLAN header: exactly the I flag, reserved bits zero, and our VNI.
#[inline(always)]
pub fn check_vxlan(h: &[u8; VXLAN_HLEN], vni: u32) -> Result<(), Counter> {
    if h[0] != VXLAN_FLAG_I || h[1] != 0 || h[2] != 0 || h[3] != 0 || h[7] != 0 {
        return Err(Counter::BadVxlanFlags);
    }
    let got = u32::from_be_bytes([0, h[4], h[5], h[6]]);
    if got != (vni & 0x00ff_ffff) {
        return Err(Counter::WrongVni);
    }
    Ok(())
}

/// Source and destination of an inner IPv4 header, or `InnerNotIpv4`.
#[inline(always)]
pub fn inner_ipv4_addrs(ip: &[u8; IPV4_HLEN]) -> Result<([u8; 4], [u8; 4]), Counter> {
    if ip[0] >> 4 != 4 || (ip[0] & 0x0f) < 5 {
        return Err(Counter::InnerNotIpv4);
    }
    Ok((
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
    ))
}

/// Decrement the TTL of the IPv4 header at the start of `pkt`, updating its checksum
/// incrementally (RFC 1624), as flannel's udp proxy does on both sides. Returns false (and
/// changes nothing) when the TTL is already 0 or 1: the packet must not be forwarded.
#[inline(always)]
pub fn decrement_ttl(pkt: &mut [u8]) -> bool {
    if pkt.len() < IPV4_HLEN || pkt[8] <= 1 {
        return false;
    }
    pkt[8] -= 1;
    // The 16-bit word holding the TTL (high byte) went down by 0x0100: the one's-complement
    // checksum goes up by the same amount, with end-around carry.
    let sum = u16::from_be_bytes([pkt[10], pkt[11]]) as u32 + 0x0100;
    let sum = (sum & 0xffff) + (sum >> 16);
    pkt[10..12].copy_from_slice(&(sum as u16).to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_headers_are_checked_as_the_stack_would() {
        let p = params(100);
        let hdr = vxlan_encap_header(&p, 1, [2; 6], [4; 6]);
        let ip: [u8; IPV4_HLEN] = hdr[ETH_HLEN..ETH_HLEN + IPV4_HLEN].try_into().unwrap();
        let udp: [u8; UDP_HLEN] = hdr[ETH_HLEN + IPV4_HLEN..ETH_HLEN + IPV4_HLEN + UDP_HLEN].try_into().unwrap();
        let frame_len = ETH_HLEN + u16::from_be_bytes([ip[2], ip[3]]) as usize;
        assert_eq!(check_outer(&ip, &udp, frame_len, false), Ok(()));
        assert_eq!(check_outer(&ip, &udp, frame_len + 6, false), Ok(()), "Ethernet padding is allowed");
        assert_eq!(check_outer(&ip, &udp, frame_len - 1, false), Err(Counter::Truncated), "total length past the frame");
        let mut bad = ip;
        bad[8] ^= 1; // TTL changed, checksum not
        assert_eq!(check_outer(&bad, &udp, frame_len, false), Err(Counter::BadOuterHeader));
        assert_eq!(check_outer(&bad, &udp, frame_len, true), Err(Counter::BadOuterHeader), "merged frames: checksum still");
        let mut short_udp = udp;
        short_udp[5] = short_udp[5].wrapping_sub(1);
        assert_eq!(check_outer(&ip, &short_udp, frame_len, false), Err(Counter::BadOuterHeader), "UDP length disagrees");
        assert_eq!(check_outer(&ip, &short_udp, frame_len, true), Ok(()), "merged frames: lengths are the kernel's");
        let mut tiny = ip;
        tiny[2..4].copy_from_slice(&20u16.to_be_bytes());
        tiny[10..12].copy_from_slice(&[0, 0]);
        let c = ipv4_checksum(&tiny);
        tiny[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(check_outer(&tiny, &udp, frame_len, false), Err(Counter::BadOuterHeader), "no room for UDP");
    }

    /// An IP-in-IP packet's outer header: checksum, a length within the frame, room for the
    /// inner header; a first fragment carries the inner header whole.
    #[test]
    fn ipip_outer_headers_are_checked_as_the_stack_would() {
        let with = |total: u16, frag: u16| {
            let mut ip = [0u8; IPV4_HLEN];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[6..8].copy_from_slice(&frag.to_be_bytes());
            ip[8] = 64;
            ip[9] = IPPROTO_IPIP;
            ip[12..16].copy_from_slice(&[192, 168, 100, 2]);
            ip[16..20].copy_from_slice(&[192, 168, 100, 1]);
            let c = ipv4_checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip
        };
        let ip = with(84, 0);
        let frame_len = ETH_HLEN + 84;
        assert_eq!(check_outer_ipip(&ip, frame_len, false), Ok(()));
        assert_eq!(check_outer_ipip(&ip, frame_len + 6, false), Ok(()), "Ethernet padding is allowed");
        assert_eq!(check_outer_ipip(&ip, frame_len - 1, false), Err(Counter::Truncated));
        let mut bad = ip;
        bad[8] ^= 1;
        assert_eq!(check_outer_ipip(&bad, frame_len, true), Err(Counter::BadOuterHeader));
        assert_eq!(check_outer_ipip(&with(39, 0), frame_len, false), Err(Counter::Truncated), "no room for the inner header");
        assert_eq!(check_outer_ipip(&with(39, 0), frame_len, true), Ok(()), "merged: lengths are the kernel's");
        assert_eq!(check_first_fragment_ipip(&with(1500, 0x2000), ETH_HLEN + 1500), Ok(()));
        assert_eq!(check_first_fragment_ipip(&with(36, 0x2000), ETH_HLEN + 36), Err(Counter::TinyFragment));
        assert_eq!(check_first_fragment_ipip(&with(1500, 0x2000), ETH_HLEN + 100), Err(Counter::Truncated));
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        for ttl in [2u8, 3, 64, 128, 255] {
            for seed in 0u32..200 {
                let mut h = [0u8; 20];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&((seed % 1400) as u16 + 20).to_be_bytes());
                h[4..6].copy_from_slice(&(seed as u16).wrapping_mul(7919).to_be_bytes());
                h[8] = ttl;
                h[9] = [1u8, 6, 17][seed as usize % 3];
                h[12..16].copy_from_slice(&seed.wrapping_mul(2654435761).to_be_bytes());
                h[16..20].copy_from_slice(&seed.wrapping_mul(40503).to_be_bytes());
                let c = ipv4_checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                assert!(decrement_ttl(&mut h));
                assert_eq!(h[8], ttl - 1);
                assert_eq!(ipv4_checksum(&h), 0, "ttl {ttl} seed {seed}: incremental update must match a full one");
            }
        }
        let mut expiring = [0x45u8; 20];
        expiring[8] = 1;
        assert!(!decrement_ttl(&mut expiring));
        assert_eq!(expiring[8], 1, "unchanged");
        assert!(!decrement_ttl(&mut [0u8; 10]), "too short");
    }

    fn params(inner_len: usize) -> EncapParams {
        EncapParams {
            src_ip: [192, 168, 50, 1],
            dst_ip: [192, 168, 50, 2],
            src_port: source_port(0xdead_beef),
            dst_port: DEFAULT_VXLAN_PORT,
            inner_len,
            tos: 0,
            dont_fragment: false,
            ip_id: 1,
            outer_src_mac: [2, 0, 0, 0, 0, 1],
            outer_dst_mac: [2, 0, 0, 0, 0, 2],
        }
    }

    #[test]
    fn outer_header_inherits_tos_and_df_and_fragmentable_ones_get_an_id() {
        let mut inner = [0u8; IPV4_HLEN];
        inner[0] = 0x45;
        inner[1] = 0x2a; // DSCP AF11, ECT(0)
        inner[6] = 0x40; // DF
        assert_eq!(outer_policy(&inner), (0x2a, true));
        inner[6] = 0;
        inner[1] = 0x03;
        assert_eq!(outer_policy(&inner), (0x03, false), "CE is copied out (RFC 6040 normal mode)");
        let mut p = params(100);
        p.tos = 0x2a;
        p.dont_fragment = true;
        p.ip_id = 0;
        let h = vxlan_encap_header(&p, 1, [1; 6], [2; 6]);
        let ip: [u8; IPV4_HLEN] = h[ETH_HLEN..ETH_HLEN + IPV4_HLEN].try_into().unwrap();
        assert_eq!(ip[1], 0x2a);
        assert_eq!(u16::from_be_bytes([ip[6], ip[7]]), IPV4_DF);
        assert_eq!(ipv4_checksum(&ip), 0);
        p.dont_fragment = false;
        p.ip_id = fragment_id(0xabcd_1234);
        let h = udp_encap_header(&p);
        assert_eq!(u16::from_be_bytes([h[ETH_HLEN + 6], h[ETH_HLEN + 7]]), 0, "no DF, offset 0");
        assert_eq!(u16::from_be_bytes([h[ETH_HLEN + 4], h[ETH_HLEN + 5]]), p.ip_id);
        for r in [0u32, 0x0001_0001, 0xffff_ffff, 0x1234_1234] {
            assert_ne!(fragment_id(r), 0, "{r:#x}: a fragmentable datagram never has ID 0");
        }
    }

    #[test]
    fn lengths_past_64k_do_not_wrap() {
        assert_eq!(length_field(1500), 1500);
        assert_eq!(length_field(65535), 65535);
        assert_eq!(length_field(65536), 0);
        // A BIG TCP aggregate of 100000 bytes: before, 100000 + 36 wrapped to 34500 and a
        // receiver would have trimmed the packet to that.
        let h = vxlan_encap_header(&params(100_000), 1, [1; 6], [2; 6]);
        let ip: [u8; IPV4_HLEN] = h[ETH_HLEN..ETH_HLEN + IPV4_HLEN].try_into().unwrap();
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 0);
        assert_eq!(u16::from_be_bytes([h[ETH_HLEN + 24], h[ETH_HLEN + 25]]), 0);
        assert_eq!(ipv4_checksum(&ip), 0);
        assert_eq!(outer_segment_len(1450, 0, 0, VXLAN_OVERHEAD), 1500);
        assert_eq!(outer_segment_len(60_000, 1398, 52, VXLAN_OVERHEAD), 1500, "GSO: one segment");
    }

    /// The Internet checksum of any byte string (test oracle, written independently of the
    /// header builders).
    fn internet_checksum(b: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for c in b.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn frag_needed_quotes_the_packet_and_checksums() {
        let mut orig = [0u8; ICMP_QUOTE];
        orig[0] = 0x45;
        orig[2..4].copy_from_slice(&1450u16.to_be_bytes());
        orig[6] = 0x40;
        orig[8] = 63;
        orig[9] = 6;
        orig[12..16].copy_from_slice(&[10, 244, 1, 2]);
        orig[16..20].copy_from_slice(&[10, 244, 2, 3]);
        orig[20..28].copy_from_slice(&[0x9c, 0x40, 0x1f, 0x90, 1, 2, 3, 4]);
        orig[28..40].copy_from_slice(&[5, 6, 7, 8, 0x50, 0x10, 0x01, 0xf5, 0xab, 0xcd, 0, 0]);
        let c = ipv4_checksum(orig[..20].try_into().unwrap());
        orig[10..12].copy_from_slice(&c.to_be_bytes());
        let m = icmp_frag_needed(&orig, 1250);
        assert_eq!(m.len(), 68);
        let ip: [u8; IPV4_HLEN] = m[..IPV4_HLEN].try_into().unwrap();
        assert_eq!(ipv4_checksum(&ip), 0);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 68);
        assert_eq!(ip[9], IPPROTO_ICMP);
        assert_eq!(&ip[12..16], &[10, 244, 2, 3], "from the packet's destination");
        assert_eq!(&ip[16..20], &[10, 244, 1, 2], "to its source");
        assert_eq!(&m[20..22], &[3, 4], "destination unreachable, fragmentation needed");
        assert_eq!(u16::from_be_bytes([m[26], m[27]]), 1250, "next-hop MTU");
        assert_eq!(&m[28..], &orig[..]);
        assert_eq!(internet_checksum(&m[20..]), 0, "ICMP checksum over header and quote");
    }

    /// What a device does to a CHECKSUM_PARTIAL packet (and `skb_checksum_help` in software):
    /// the one's-complement sum from the transport header to the end, complemented, written
    /// at the checksum field.
    fn complete(msg: &mut [u8], start: usize, field: usize) {
        let mut sum = 0u32;
        for w in msg[start..].chunks(2) {
            sum += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32;
        }
        let v = !fold(sum);
        msg[field..field + 2].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn a_reply_whose_quote_gets_a_checksum_completed_still_checks() {
        for (proto, off) in [(6u8, 16usize), (17, 6)] {
            for seed in 0..300u32 {
                let mut q = [0u8; ICMP_QUOTE];
                q[0] = 0x45;
                q[9] = proto;
                for (i, b) in q[12..].iter_mut().enumerate() {
                    *b = (seed.wrapping_mul(2654435761).rotate_left(i as u32) >> 7) as u8;
                }
                // Ports are never zero.
                q[20] |= 0x80;
                q[22] |= 0x01;
                // The stack's seed in the field (the pseudo-header sum), whatever it is.
                let before = q;
                let (at, v) = settle_quoted_checksum(&mut q).expect("TCP and UDP quotes are settled");
                assert_eq!((at, v), (IPV4_HLEN + off, [q[at], q[at + 1]]));
                assert_eq!(q[..at], before[..at], "only the checksum field changes");
                assert_eq!(q[at + 2..], before[at + 2..]);
                let mut m = icmp_frag_needed(&q, 1250);
                assert_eq!(internet_checksum(&m[20..]), 0);
                // A device completes the quoted transport checksum: the reply is unchanged.
                let l4 = IPV4_HLEN + ICMP_HLEN + IPV4_HLEN;
                complete(&mut m, l4, l4 + off);
                assert_eq!(&m[28..], &q[..], "proto {proto} seed {seed}: the completion changed the quote");
                assert_eq!(internet_checksum(&m[20..]), 0, "proto {proto} seed {seed}");
            }
        }
        // Without the settling, a completion breaks the reply (what happened before).
        let mut q = [0u8; ICMP_QUOTE];
        q[0] = 0x45;
        q[9] = 6;
        q[20..24].copy_from_slice(&[0x9c, 0x40, 0x1f, 0x90]);
        q[36..38].copy_from_slice(&[0x12, 0x34]);
        let mut m = icmp_frag_needed(&q, 1250);
        complete(&mut m, 48, 48 + 16);
        assert_ne!(internet_checksum(&m[20..]), 0);
        // Other protocols are left alone.
        let mut icmp = q;
        icmp[9] = 1;
        assert_eq!(settle_quoted_checksum(&mut icmp), None);
        assert_eq!(icmp, { let mut i = q; i[9] = 1; i });
    }

    #[test]
    fn ecn_decapsulation_follows_rfc_6040() {
        const NOT_ECT: u8 = 0;
        const ECT1: u8 = 1;
        const ECT0: u8 = 2;
        let dscp = 0x28;
        for inner in [NOT_ECT, ECT1, ECT0, ECN_CE] {
            for outer in [NOT_ECT, ECT1, ECT0] {
                assert_eq!(ecn_decapsulate(outer, dscp | inner), Some(dscp | inner), "outer {outer} inner {inner}");
            }
        }
        assert_eq!(ecn_decapsulate(ECN_CE, dscp | ECT0), Some(dscp | ECN_CE));
        assert_eq!(ecn_decapsulate(ECN_CE, dscp | ECT1), Some(dscp | ECN_CE));
        assert_eq!(ecn_decapsulate(ECN_CE, dscp | ECN_CE), Some(dscp | ECN_CE));
        assert_eq!(ecn_decapsulate(ECN_CE, dscp | NOT_ECT), None, "CE on a Not-ECT packet is dropped");
    }

    #[test]
    fn ipv4_checksum_matches_a_known_header() {
        // Example header from RFC 1071 style worked examples (wikipedia's IPv4 checksum).
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(ipv4_checksum(&h), 0, "a header with its checksum sums to zero");
    }

    #[test]
    fn vxlan_header_has_flannel_layout() {
        let h = vxlan_encap_header(&params(100), 1, [0xaa; 6], [0xbb; 6]);
        assert_eq!(h.len(), 64);
        assert_eq!(ethertype(h[..14].try_into().unwrap()), ETH_P_IPV4);
        let ip: [u8; 20] = h[14..34].try_into().unwrap();
        assert_eq!(ip[0], 0x45);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 20 + 8 + 8 + 14 + 100);
        assert_eq!(ip[9], IPPROTO_UDP);
        assert_eq!(ipv4_checksum(&ip), 0, "outer checksum must verify");
        assert_eq!(&ip[12..16], &[192, 168, 50, 1]);
        assert_eq!(&ip[16..20], &[192, 168, 50, 2]);
        let udp: [u8; 8] = h[34..42].try_into().unwrap();
        assert_eq!(udp_dst_port(&udp), 8472);
        assert!(u16::from_be_bytes([udp[0], udp[1]]) >= 0xc000);
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 8 + 8 + 14 + 100);
        assert_eq!(&h[42..50], &[0x08, 0, 0, 0, 0, 0, 1, 0], "I flag, VNI 1");
        assert_eq!(&h[50..56], &[0xbb; 6], "inner destination is the peer's VtepMAC");
        assert_eq!(&h[56..62], &[0xaa; 6], "inner source is our VtepMAC");
        assert_eq!(&h[62..64], &[0x08, 0x00]);
        check_vxlan(h[42..50].try_into().unwrap(), 1).expect("own header checks");
    }

    #[test]
    fn udp_header_carries_the_raw_packet() {
        let mut p = params(84);
        p.dst_port = DEFAULT_UDP_PORT;
        let h = udp_encap_header(&p);
        assert_eq!(h.len(), 42);
        let ip: [u8; 20] = h[14..34].try_into().unwrap();
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 20 + 8 + 84);
        assert_eq!(ipv4_checksum(&ip), 0);
        let udp: [u8; 8] = h[34..42].try_into().unwrap();
        assert_eq!(udp_dst_port(&udp), 8285);
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 8 + 84);
    }

    #[test]
    fn vni_is_24_bits_big_endian() {
        let h = vxlan_encap_header(&params(0), 0x00ab_cdef, [0; 6], [0; 6]);
        assert_eq!(&h[46..50], &[0xab, 0xcd, 0xef, 0]);
    }

    #[test]
    fn check_vxlan_rejects_other_vni_and_flags() {
        let ok = [0x08, 0, 0, 0, 0, 0, 7, 0];
        assert_eq!(check_vxlan(&ok, 7), Ok(()));
        assert_eq!(check_vxlan(&ok, 1), Err(Counter::WrongVni));
        let no_i = [0x00, 0, 0, 0, 0, 0, 7, 0];
        assert_eq!(check_vxlan(&no_i, 7), Err(Counter::BadVxlanFlags));
        let gbp = [0x88, 0, 0, 0, 0, 0, 7, 0];
        assert_eq!(check_vxlan(&gbp, 7), Err(Counter::BadVxlanFlags));
        let reserved = [0x08, 0, 0, 0, 0, 0, 7, 1];
        assert_eq!(check_vxlan(&reserved, 7), Err(Counter::BadVxlanFlags));
    }

    #[test]
    fn classify_ipv4_sees_udp_options_and_fragments() {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[9] = IPPROTO_UDP;
        let udp = |header_len, fragment| Ipv4Class::Udp { header_len, fragment };
        assert_eq!(classify_ipv4(&ip), udp(20, Fragment::Whole));
        ip[0] = 0x46;
        assert_eq!(classify_ipv4(&ip), udp(24, Fragment::Whole));
        ip[6] = 0x20; // MF
        assert_eq!(classify_ipv4(&ip), udp(24, Fragment::First));
        ip[7] = 0x10; // offset 16 units
        assert_eq!(classify_ipv4(&ip), udp(24, Fragment::Later { offset: 128 }));
        ip[6] = 0x00; // the last fragment
        assert_eq!(classify_ipv4(&ip), udp(24, Fragment::Later { offset: 128 }));
        ip[6] = 0x5f; // DF and MF set, the largest offset
        ip[7] = 0xff;
        assert_eq!(classify_ipv4(&ip), udp(24, Fragment::Later { offset: 0x1fff * 8 }));
        ip[9] = 6;
        assert_eq!(classify_ipv4(&ip), Ipv4Class::NotUdp);
        ip[9] = IPPROTO_IPIP;
        assert_eq!(classify_ipv4(&ip), Ipv4Class::Ipip { header_len: 24, fragment: Fragment::Later { offset: 0x1fff * 8 } });
        ip[9] = IPPROTO_UDP;
        ip[0] = 0x65;
        assert_eq!(classify_ipv4(&ip), Ipv4Class::NotUdp, "IPv6 version nibble");
    }

    /// A later fragment may not start inside the checked headers: every offset below them is
    /// refused, the first one past them taken, for each encapsulation.
    #[test]
    fn later_fragments_may_not_reach_into_the_checked_headers() {
        for checked in [checked_bytes(crate::EncapMode::Vxlan), checked_bytes(crate::EncapMode::Udp), checked_bytes(crate::EncapMode::Ipip), CHECKED_BYTES6] {
            for offset in (8..checked).step_by(8) {
                assert!(later_fragment_overlaps(offset, checked), "offset {offset} of {checked}");
            }
            let past = checked.div_ceil(8) * 8;
            assert!(!later_fragment_overlaps(past, checked), "offset {past} of {checked}");
        }
    }

    #[test]
    fn first_fragments_must_carry_the_checked_headers() {
        let p = params(1400);
        let hdr = vxlan_encap_header(&p, 1, [2; 6], [4; 6]);
        let udp: [u8; UDP_HLEN] = hdr[ETH_HLEN + IPV4_HLEN..ETH_HLEN + IPV4_HLEN + UDP_HLEN].try_into().unwrap();
        // The first fragment of that datagram carrying `carried` bytes of it, MF set.
        let first = |carried: usize| {
            let mut ip: [u8; IPV4_HLEN] = hdr[ETH_HLEN..ETH_HLEN + IPV4_HLEN].try_into().unwrap();
            ip[2..4].copy_from_slice(&((IPV4_HLEN + carried) as u16).to_be_bytes());
            ip[6] = 0x20;
            ip[7] = 0;
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = ipv4_checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip
        };
        let vx = checked_bytes(crate::EncapMode::Vxlan);
        let frame = |carried: usize| ETH_HLEN + IPV4_HLEN + carried;
        assert_eq!(check_first_fragment(&first(56), &udp, frame(56), vx), Ok(()));
        assert_eq!(check_first_fragment(&first(56), &udp, frame(56) + 4, vx), Ok(()), "padding");
        assert_eq!(check_first_fragment(&first(48), &udp, frame(48), vx), Err(Counter::TinyFragment));
        assert_eq!(check_first_fragment(&first(8), &udp, frame(8), vx), Err(Counter::TinyFragment));
        assert_eq!(check_first_fragment(&first(48), &udp, frame(48), checked_bytes(crate::EncapMode::Udp)), Ok(()), "udp needs 28");
        assert_eq!(check_first_fragment(&first(56), &udp, frame(56) - 1, vx), Err(Counter::Truncated));
        let mut bad = first(56);
        bad[8] ^= 1;
        assert_eq!(check_first_fragment(&bad, &udp, frame(56), vx), Err(Counter::BadOuterHeader), "checksum");
        let mut short_udp = udp;
        short_udp[4..6].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(check_first_fragment(&first(56), &short_udp, frame(56), vx), Err(Counter::BadOuterHeader), "UDP shorter than the fragment");
        // IPv6: one fragment header, then UDP.
        let udp6 = |len: u16| [0xc0, 0, 0x21, 0x18, (len >> 8) as u8, len as u8, 0, 0];
        let f6 = |carried: usize| (FRAG6_HLEN + carried) as u16;
        let frame6 = |carried: usize| ETH_HLEN + IPV6_HLEN + FRAG6_HLEN + carried;
        assert_eq!(check_outer6_fragment(0x60, f6(72), &udp6(1400), frame6(72), true), Ok(()));
        assert_eq!(check_outer6_fragment(0x60, f6(64), &udp6(1400), frame6(64), true), Err(Counter::TinyFragment));
        assert_eq!(check_outer6_fragment(0x60, f6(72), &udp6(1400), frame6(72) - 1, true), Err(Counter::Truncated));
        assert_eq!(check_outer6_fragment(0x60, f6(72), &udp6(64), frame6(72), true), Err(Counter::BadOuterHeader));
        assert_eq!(check_outer6_fragment(0x40, f6(72), &udp6(1400), frame6(72), true), Err(Counter::BadOuterHeader));
        // An atomic fragment is a whole datagram: its UDP length is exactly what it carries.
        assert_eq!(check_outer6_fragment(0x60, f6(100), &udp6(100), frame6(100), false), Ok(()));
        assert_eq!(check_outer6_fragment(0x60, f6(100), &udp6(1400), frame6(100), false), Err(Counter::BadOuterHeader));
    }

    #[test]
    fn inner_addrs_need_an_ipv4_header() {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[12..16].copy_from_slice(&[10, 244, 1, 2]);
        ip[16..20].copy_from_slice(&[10, 244, 2, 3]);
        assert_eq!(inner_ipv4_addrs(&ip), Ok(([10, 244, 1, 2], [10, 244, 2, 3])));
        ip[0] = 0x60;
        assert_eq!(inner_ipv4_addrs(&ip), Err(Counter::InnerNotIpv4));
    }

    #[test]
    fn source_port_stays_in_the_ephemeral_range() {
        for h in [0u32, 1, 0x3fff, 0x4000, u32::MAX] {
            let p = source_port(h);
            assert!(p >= 0xc000, "{h:#x} -> {p}");
        }
        assert_ne!(source_port(1), source_port(2));
    }
}
