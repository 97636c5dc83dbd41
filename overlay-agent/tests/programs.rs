//! The eBPF programs alone, through `BPF_PROG_TEST_RUN`: crafted frames into each program
//! (decap in TC and XDP, encap in TC), one case per verdict and drop reason, checking the
//! return code, the counter that moved and the bytes that came out, the way Cilium's
//! bpf/tests and Calico's felix/bpf/ut check theirs. A header or checksum bug shows here in
//! seconds, without a cluster.
//!
//! Each test runs in a thread of its own inside a private network namespace (`unshare`), with
//! a veth underlay and a real `flannel.1`, so the encap program's route lookups see a node's
//! routes and never the machine's. Frames are built and parsed with etherparse, independently
//! of overlay-common's header code. Needs root (loading programs): fails, never skips,
//! without it.

use std::{net::Ipv4Addr, process::Command};

use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use etherparse::{PacketBuilder, SlicedPacket};
use overlay_agent::{
    dataplane::ebpf_object,
    maps::{Maps, Route},
    netdev,
};
use overlay_common::{config_flags, prog_names, Counter, DataplaneConfig, EncapMode};

const TCX_NEXT: u32 = u32::MAX; // TC_ACT_UNSPEC, -1
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
/// Peer A: on the underlay's link, subnet 10.244.2.0/24.
const PEER_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
/// Peer B: behind a route with a locked MTU of 1300 (a narrower path), subnet 10.244.3.0/24.
const PEER_B: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
/// Peer C: no route to its underlay address, subnet 10.244.4.0/24.
const PEER_C: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 3);
const MAC_C: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 9);
const UNDERLAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Run `f` on a thread of its own, in a network namespace of its own.
fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests load eBPF programs: run them as root (cargo xtask test does)");
    let t = std::thread::spawn(move || {
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        f()
    });
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p);
    }
}

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A node in the current (private) namespace with the programs loaded, configured and given
/// routes to peers A and B, nothing attached.
struct Node {
    ebpf: Ebpf,
    maps: Maps,
    cfg: DataplaneConfig,
}

impl Node {
    fn new(flags: u16) -> Self {
        sh("ip", &["link", "set", "lo", "up"]);
        // This kernel has no dummy device: a veth pair whose far end stays in the namespace.
        sh("ip", &["link", "add", "ul0", "address", "02:00:00:00:00:01", "type", "veth", "peer", "name", "ul0p"]);
        sh("ip", &["link", "set", "ul0p", "up"]);
        sh("ip", &["addr", "add", "192.168.50.1/24", "dev", "ul0"]);
        sh("ip", &["link", "set", "ul0", "up"]);
        sh("ip", &["route", "add", "192.168.50.3/32", "dev", "ul0", "mtu", "lock", "1300"]);
        // A and B answer ARP (as live peers' entries are): their next hops are resolved.
        sh("ip", &["neigh", "replace", "192.168.50.2", "lladdr", "02:00:00:00:01:02", "dev", "ul0", "nud", "permanent"]);
        sh("ip", &["neigh", "replace", "192.168.50.3", "lladdr", "02:00:00:00:01:03", "dev", "ul0", "nud", "permanent"]);
        // Peer C's address is unreachable from here (an operator's rule, a lost route).
        sh("ip", &["route", "add", "unreachable", "192.168.60.3/32"]);
        // Encap's route lookup is a forwarding lookup, as on a flannel node (docker and
        // kubelet turn forwarding on).
        sh("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        sh("ip", &[
            "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", "192.168.50.1", "dev", "ul0",
            "dstport", "8472", "nolearning",
        ]);
        sh("ip", &["link", "set", "flannel.1", "mtu", "1450", "up"]);
        let underlay = netdev::require_link("ul0").expect("ul0");
        let overlay = netdev::require_link("flannel.1").expect("flannel.1");
        assert!(!ebpf_object().is_empty(), "the agent was built without its eBPF programs (AYA_BUILD_SKIP)");
        let mut ebpf = EbpfLoader::new().load(ebpf_object()).expect("loading the programs");
        let mut maps = Maps::take(&mut ebpf).expect("maps");
        let cfg = DataplaneConfig {
            mode: EncapMode::Vxlan as u32,
            vni: 1,
            port: 8472,
            flags: config_flags::READY | flags,
            underlay_ifindex: underlay.ifindex,
            overlay_ifindex: overlay.ifindex,
            underlay_ip: ME.octets(),
            local_subnet: [10, 244, 1, 0],
            local_prefix_len: 24,
            vtep_mac: overlay.mac,
            _pad: [0; 2],
        };
        maps.set_config(&cfg).expect("config");
        for (subnet, ip, mac) in [("10.244.2.0/24", PEER_A, MAC_A), ("10.244.3.0/24", PEER_B, MAC_B), ("10.244.4.0/24", PEER_C, MAC_C)] {
            maps.upsert_route(&Route { subnet: subnet.parse().unwrap(), public_ip: ip, vtep_mac: mac, wireguard: None }).expect("route");
        }
        Node { ebpf, maps, cfg }
    }

    fn counters(&self) -> [u64; Counter::COUNT] {
        self.maps.counters().expect("counters")
    }

    /// Run `prog` on `frame`: the return code, the frame as the program left it, and the
    /// counters that moved (name, by how much).
    fn run(&mut self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>, Vec<(&'static str, u64)>) {
        let before = self.counters();
        let mut out = vec![0u8; 4096];
        let p = self.ebpf.program_mut(prog).unwrap_or_else(|| panic!("no program {prog}"));
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
        let r = if prog == prog_names::XDP_DECAP {
            let x: &mut Xdp = p.try_into().expect("xdp");
            if x.fd().is_err() {
                x.load().expect("load xdp");
            }
            x.test_run(opts).unwrap_or_else(|e| panic!("test run of {prog} on a {}-byte frame: {e}", frame.len()))
        } else {
            let c: &mut SchedClassifier = p.try_into().expect("tc");
            if c.fd().is_err() {
                c.load().expect("load tc");
            }
            c.test_run(opts).unwrap_or_else(|e| panic!("test run of {prog} on a {}-byte frame: {e}", frame.len()))
        };
        out.truncate(r.data_size_out as usize);
        let after = self.counters();
        let moved = Counter::ALL.iter().filter(|c| after[**c as usize] != before[**c as usize]).map(|c| (c.name(), after[*c as usize] - before[*c as usize])).collect();
        (r.return_value, out, moved)
    }
}

/// An inner IPv4/UDP packet `src -> dst` behind an Ethernet header, with TOS `tos`, DF as
/// given, `payload_len` bytes of payload.
fn inner_frame(src: [u8; 4], dst: [u8; 4], tos: u8, df: bool, payload_len: usize, smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    let mut ip = etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, src, dst).unwrap();
    ip.dscp = etherparse::Ipv4Dscp::try_new(tos >> 2).unwrap();
    ip.ecn = etherparse::Ipv4Ecn::try_new(tos & 3).unwrap();
    ip.dont_fragment = df;
    ip.identification = 0x1234;
    let b = PacketBuilder::ethernet2(smac, dmac).ip(etherparse::IpHeaders::Ipv4(ip, Default::default())).udp(40000, 9000);
    let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
    let mut f = Vec::new();
    b.write(&mut f, &payload).unwrap();
    f
}

/// A VXLAN frame from `outer_src` to us carrying `inner` (an Ethernet frame), with VXLAN
/// flags `flags` and `vni`, outer TOS `tos`.
fn vxlan_frame(outer_src: Ipv4Addr, flags: u8, vni: u32, tos: u8, inner: &[u8]) -> Vec<u8> {
    let mut vx = vec![flags, 0, 0, 0];
    vx.extend_from_slice(&(vni << 8).to_be_bytes());
    vx.extend_from_slice(inner);
    let mut ip = etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::UDP, outer_src.octets(), ME.octets()).unwrap();
    ip.dscp = etherparse::Ipv4Dscp::try_new(tos >> 2).unwrap();
    ip.ecn = etherparse::Ipv4Ecn::try_new(tos & 3).unwrap();
    let b = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x99], UNDERLAY_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .udp(50000, 8472);
    let mut f = Vec::new();
    b.write(&mut f, &vx).unwrap();
    f
}

/// The one's-complement sum of `b` (an even number of bytes), written here rather than taken
/// from overlay-common, whose checksum code these tests check.
fn ones_sum(b: &[u8]) -> u16 {
    let mut sum: u32 = b.chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn ipv4_header_ok(h: &[u8]) -> bool {
    ones_sum(&h[..20]) == 0xffff
}

/// Put the IPv4 header at `off` right again after editing it.
fn fix_checksum(f: &mut [u8], off: usize) {
    f[off + 10..off + 12].copy_from_slice(&[0, 0]);
    let sum = ones_sum(&f[off..off + 20]);
    f[off + 10..off + 12].copy_from_slice(&(!sum).to_be_bytes());
}

/// A valid inner packet from peer A's container to ours.
fn from_a(vtep_mac: [u8; 6]) -> Vec<u8> {
    inner_frame([10, 244, 2, 7], [10, 244, 1, 5], 0, true, 32, MAC_A, vtep_mac)
}

#[test]
fn decap_checks_every_frame_and_counts_each_reason() {
    in_private_netns(|| {
        let mut n = Node::new(config_flags::KERNEL_DECAP);
        let mac = n.cfg.vtep_mac;
        let valid = vxlan_frame(PEER_A, 0x08, 1, 0, &from_a(mac));
        for prog in [prog_names::TC_INGRESS_DECAP, prog_names::XDP_DECAP] {
            let (pass, drop) = if prog == prog_names::XDP_DECAP { (XDP_PASS, XDP_DROP) } else { (TCX_NEXT, TC_ACT_SHOT) };
            let (rc, out, moved) = n.run(prog, &valid);
            assert_eq!((rc, moved), (pass, vec![("decapsulated", 1)]), "{prog}: a valid frame goes on to the kernel device");
            assert_eq!(out, valid, "{prog}: unchanged");

            // Not ours: passed untouched, no counter.
            let mut other_port = valid.clone();
            other_port[36..38].copy_from_slice(&4789u16.to_be_bytes());
            let mut other_dst = valid.clone();
            other_dst[33] = 77;
            fix_checksum(&mut other_dst, 14);
            let arp = [&[0xffu8; 6][..], &UNDERLAY_MAC, &[0x08, 0x06], &[0u8; 28]].concat();
            for (what, f) in [("other port", other_port), ("other destination", other_dst), ("ARP", arp), ("cut inside the UDP header", valid[..14 + 20 + 4].to_vec())] {
                let (rc, out, moved) = n.run(prog, &f);
                assert_eq!((rc, moved), (pass, vec![]), "{prog}: {what} is not ours");
                assert_eq!(out, f, "{prog}: {what} untouched");
            }

            // Ours, and wrong: dropped, each counted once under its reason.
            let mut options = valid.clone();
            options.splice(34..34, [1u8, 1, 1, 1]); // four NOP bytes of IPv4 options
            options[14] = 0x46;
            let l = u16::from_be_bytes([options[16], options[17]]) + 4;
            options[16..18].copy_from_slice(&l.to_be_bytes());
            fix_checksum(&mut options, 14);
            let mut bad_sum = valid.clone();
            bad_sum[24] ^= 0xff;
            let mut not_ipv4 = valid.clone();
            not_ipv4[14 + 20 + 8 + 8 + 12..][..2].copy_from_slice(&[0x86, 0xdd]);
            let cases: Vec<(&str, Vec<u8>)> = vec![
                ("unknown_peer", vxlan_frame(STRANGER, 0x08, 1, 0, &from_a(mac))),
                ("wrong_vni", vxlan_frame(PEER_A, 0x08, 2, 0, &from_a(mac))),
                ("bad_vxlan_flags", vxlan_frame(PEER_A, 0x88, 1, 0, &from_a(mac))),
                ("truncated", valid[..14 + 20 + 8 + 8 + 14 + 10].to_vec()),
                ("outer_ip_options", options),
                ("bad_outer_header", bad_sum),
                ("inner_not_ipv4", not_ipv4),
                ("not_local_subnet", vxlan_frame(PEER_A, 0x08, 1, 0, &inner_frame([10, 244, 2, 7], [10, 244, 3, 5], 0, true, 32, MAC_A, mac))),
                ("spoofed_source", vxlan_frame(PEER_A, 0x08, 1, 0, &inner_frame([10, 244, 3, 7], [10, 244, 1, 5], 0, true, 32, MAC_A, mac))),
            ];
            for (reason, f) in cases {
                let (rc, _, moved) = n.run(prog, &f);
                assert_eq!((rc, moved), (drop, vec![(reason, 1)]), "{prog}: {reason}");
            }

        }
    });
}

/// An IP-in-IP packet from `outer_src` to us carrying the IPv4 packet of `inner` (an
/// Ethernet frame: its header is left off), as flannel.ipip sends it.
fn ipip_frame(outer_src: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x99], UNDERLAY_MAC)
        .ipv4(outer_src.octets(), ME.octets(), 64)
        .write(&mut f, etherparse::IpNumber::IPV4, &inner[14..])
        .unwrap();
    f
}

/// flannel's ipip backend: on an ipip node, IP-in-IP to our address is checked as VXLAN is
/// (a peer's, no options, an outer header ip_rcv takes, an inner packet for our subnet from
/// the sending peer's; fragments fail closed) and left to the kernel's flannel.ipip; UDP to
/// a tunnel port is not ours there, and IP-in-IP is not ours on a vxlan node.
#[test]
fn ipip_decap_checks_every_packet_and_counts_each_reason() {
    in_private_netns(|| {
        let mut n = Node::new(config_flags::KERNEL_DECAP);
        let mac = n.cfg.vtep_mac;
        let valid = ipip_frame(PEER_A, &from_a(mac));
        // On a vxlan node, IP-in-IP is not ours.
        for prog in [prog_names::TC_INGRESS_DECAP, prog_names::XDP_DECAP] {
            let pass = if prog == prog_names::XDP_DECAP { XDP_PASS } else { TCX_NEXT };
            assert_eq!(n.run(prog, &valid), (pass, valid.clone(), vec![]), "{prog}: IP-in-IP on a vxlan node");
        }
        n.cfg.mode = EncapMode::Ipip as u32;
        n.cfg.port = 0;
        n.maps.set_config(&n.cfg).expect("config");
        for prog in [prog_names::TC_INGRESS_DECAP, prog_names::XDP_DECAP] {
            let (pass, drop) = if prog == prog_names::XDP_DECAP { (XDP_PASS, XDP_DROP) } else { (TCX_NEXT, TC_ACT_SHOT) };
            let (rc, out, moved) = n.run(prog, &valid);
            assert_eq!((rc, moved), (pass, vec![("decapsulated", 1)]), "{prog}: a valid packet goes on to flannel.ipip");
            assert_eq!(out, valid, "{prog}: unchanged");

            // Not ours: another node's address, a VXLAN datagram (no UDP tunnel here).
            let mut other_dst = valid.clone();
            other_dst[33] = 77;
            fix_checksum(&mut other_dst, 14);
            let vxlan = vxlan_frame(PEER_A, 0x08, 1, 0, &from_a(mac));
            for (what, f) in [("other destination", other_dst), ("VXLAN on an ipip node", vxlan)] {
                let (rc, out, moved) = n.run(prog, &f);
                assert_eq!((rc, moved), (pass, vec![]), "{prog}: {what} is not ours");
                assert_eq!(out, f, "{prog}: {what} untouched");
            }

            let mut bad_sum = valid.clone();
            bad_sum[24] ^= 0xff;
            let mut long = valid.clone();
            long[16..18].copy_from_slice(&((valid.len() - 14 + 8) as u16).to_be_bytes());
            fix_checksum(&mut long, 14);
            let cases: Vec<(&str, Vec<u8>)> = vec![
                ("unknown_peer", ipip_frame(STRANGER, &from_a(mac))),
                ("outer_ip_options", with_options(&valid)),
                ("bad_outer_header", bad_sum),
                ("truncated", long),
                ("not_local_subnet", ipip_frame(PEER_A, &inner_frame([10, 244, 2, 7], [10, 244, 3, 5], 0, true, 32, MAC_A, mac))),
                ("spoofed_source", ipip_frame(PEER_A, &inner_frame([10, 244, 3, 7], [10, 244, 1, 5], 0, true, 32, MAC_A, mac))),
                // Fragments: a later one may not start inside the inner header; a first one
                // must carry it whole.
                ("fragment_overlap", fragment4(&valid, 8, 64, false, 7)),
                ("tiny_fragment", fragment4(&valid, 0, 16, true, 7)),
                ("unknown_peer", fragment4(&ipip_frame(STRANGER, &from_a(mac)), 0, 24, true, 8)),
                ("unknown_peer", fragment4(&ipip_frame(STRANGER, &from_a(mac)), 24, 64, false, 8)),
                ("spoofed_source", fragment4(&ipip_frame(PEER_A, &inner_frame([10, 244, 3, 7], [10, 244, 1, 5], 0, true, 32, MAC_A, mac)), 0, 24, true, 9)),
            ];
            for (reason, f) in cases {
                let (rc, _, moved) = n.run(prog, &f);
                assert_eq!((rc, moved), (drop, vec![(reason, 1)]), "{prog}: {reason}");
            }
            // The legitimate fragments of the same packet: the first checked and left to the
            // kernel to reassemble, a later one past the inner header passed.
            let (rc, _, moved) = n.run(prog, &fragment4(&valid, 0, 24, true, 10));
            assert_eq!((rc, moved), (pass, vec![("fragment_to_kernel", 1)]), "{prog}: a first fragment carrying the inner header");
            let (rc, _, moved) = n.run(prog, &fragment4(&valid, 24, 64, false, 10));
            assert_eq!((rc, moved), (pass, vec![]), "{prog}: a later fragment past the inner header");
        }
    });
}

/// The IPv4 datagram of Ethernet frame `frame` (no options) as one fragment: `len` bytes of
/// its payload from `offset` (a multiple of 8), more-fragments as given, IP ID `id`.
fn fragment4(frame: &[u8], offset: usize, len: usize, more: bool, id: u16) -> Vec<u8> {
    assert_eq!(offset % 8, 0);
    let (eth, ip, payload) = (&frame[..14], &frame[14..34], &frame[34..]);
    let mut h = ip.to_vec();
    let data = &payload[offset..(offset + len).min(payload.len())];
    h[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    let word = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
    h[6..8].copy_from_slice(&word.to_be_bytes());
    let mut f = [eth, &h[..], data].concat();
    fix_checksum(&mut f, 14);
    f
}

/// `frame` (Ethernet + IPv4 without options) with four NOP bytes of IPv4 options.
fn with_options(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f.splice(34..34, [1u8, 1, 1, 1]);
    f[14] = 0x46;
    let l = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&l.to_be_bytes());
    fix_checksum(&mut f, 14);
    f
}

/// Fragments fail closed at both hooks: a first fragment must carry the tunnel and inner
/// headers whole and pass every check a whole frame passes; a later fragment to us may not
/// start inside them; everything that is not ours still passes untouched. Each drop class
/// beside its control (the legitimate fragment of the same datagram passing).
#[test]
fn ipv4_fragments_fail_closed() {
    in_private_netns(|| {
        let mut n = Node::new(config_flags::KERNEL_DECAP);
        let mac = n.cfg.vtep_mac;
        // 32 bytes of inner payload: the VXLAN datagram carries 8 + 8 + 14 + 20 + 8 + 32 bytes.
        let valid = vxlan_frame(PEER_A, 0x08, 1, 0, &from_a(mac));
        let forged = vxlan_frame(PEER_A, 0x08, 1, 0, &inner_frame([10, 244, 3, 7], [10, 244, 1, 5], 0, true, 32, MAC_A, mac));
        let stranger = vxlan_frame(STRANGER, 0x08, 1, 0, &from_a(mac));
        let mut other_port = valid.clone();
        other_port[36..38].copy_from_slice(&4789u16.to_be_bytes());
        let mut other_dst = valid.clone();
        other_dst[33] = 77;
        fix_checksum(&mut other_dst, 14);
        let mut tcp = valid.clone();
        tcp[14 + 9] = 6;
        fix_checksum(&mut tcp, 14);
        for prog in [prog_names::TC_INGRESS_DECAP, prog_names::XDP_DECAP] {
            let (pass, drop) = if prog == prog_names::XDP_DECAP { (XDP_PASS, XDP_DROP) } else { (TCX_NEXT, TC_ACT_SHOT) };
            let cases: Vec<(&str, Vec<u8>, u32, Vec<(&str, u64)>)> = vec![
                // Controls: the legitimate datagram's fragments pass (the first checked whole).
                ("first fragment carrying the headers", fragment4(&valid, 0, 56, true, 7), pass, vec![("fragment_to_kernel", 1)]),
                ("the whole first fragment but one 8-byte block", fragment4(&valid, 0, 80, true, 7), pass, vec![("fragment_to_kernel", 1)]),
                ("later fragment past the headers", fragment4(&valid, 56, 64, false, 7), pass, vec![]),
                // A forged inner source behind a first fragment: caught as in a whole frame.
                ("forged first fragment", fragment4(&forged, 0, 56, true, 8), drop, vec![("spoofed_source", 1)]),
                ("first fragment from a stranger", fragment4(&stranger, 0, 56, true, 9), drop, vec![("unknown_peer", 1)]),
                // Tiny first fragments: the headers would come from a later fragment.
                ("first fragment without the inner header", fragment4(&valid, 0, 48, true, 10), drop, vec![("tiny_fragment", 1)]),
                ("first fragment with only UDP", fragment4(&valid, 0, 8, true, 11), drop, vec![("tiny_fragment", 1)]),
                // Later fragments starting inside the checked headers (overlapping a checked
                // first fragment, or completing a tiny one).
                ("later fragment at 8", fragment4(&valid, 8, 64, false, 12), drop, vec![("fragment_overlap", 1)]),
                ("later fragment at 48", fragment4(&valid, 48, 64, true, 12), drop, vec![("fragment_overlap", 1)]),
                ("later fragment at 8 with a tiny payload", fragment4(&valid, 8, 4, false, 12), drop, vec![("fragment_overlap", 1)]),
                // Not ours: passed untouched, however small.
                ("tiny first fragment to another port", fragment4(&other_port, 0, 8, true, 13), pass, vec![]),
                ("later fragment at 8 to another host", fragment4(&other_dst, 8, 64, false, 13), pass, vec![]),
                ("later TCP fragment at 8", fragment4(&tcp, 8, 64, false, 13), pass, vec![]),
                ("first fragment with IP options", with_options(&fragment4(&valid, 0, 56, true, 14)), drop, vec![("outer_ip_options", 1)]),
            ];
            for (what, f, rc_want, moved_want) in cases {
                let (rc, out, moved) = n.run(prog, &f);
                assert_eq!((rc, moved), (rc_want, moved_want), "{prog}: {what}");
                if rc_want == pass {
                    assert_eq!(out, f, "{prog}: {what} untouched");
                }
            }
        }
        // The udp backend: its headers are 28 bytes (UDP and the inner IPv4 header), and its
        // first fragments have no kernel socket to be reassembled for.
        let mut udp_cfg = n.cfg;
        udp_cfg.mode = EncapMode::Udp as u32;
        udp_cfg.port = 8285;
        n.maps.set_config(&udp_cfg).expect("config");
        let mut raw = vxlan_frame(PEER_A, 0x08, 1, 0, &from_a(mac));
        raw.drain(42..42 + 8 + 14); // the inner IPv4 packet right after UDP
        raw[36..38].copy_from_slice(&8285u16.to_be_bytes());
        let l = (raw.len() - 14) as u16;
        raw[16..18].copy_from_slice(&l.to_be_bytes());
        raw[38..40].copy_from_slice(&(l - 20).to_be_bytes());
        fix_checksum(&mut raw, 14);
        for prog in [prog_names::TC_INGRESS_DECAP, prog_names::XDP_DECAP] {
            let (pass, drop) = if prog == prog_names::XDP_DECAP { (XDP_PASS, XDP_DROP) } else { (TCX_NEXT, TC_ACT_SHOT) };
            for (what, f, rc_want, moved_want) in [
                ("udp: first fragment", fragment4(&raw, 0, 32, true, 20), drop, vec![("outer_fragment", 1)]),
                ("udp: tiny first fragment", fragment4(&raw, 0, 24, true, 21), drop, vec![("tiny_fragment", 1)]),
                ("udp: later fragment at 24", fragment4(&raw, 24, 32, false, 22), drop, vec![("fragment_overlap", 1)]),
                ("udp: later fragment at 32", fragment4(&raw, 32, 32, false, 22), pass, vec![]),
            ] {
                let (rc, _, moved) = n.run(prog, &f);
                assert_eq!((rc, moved), (rc_want, moved_want), "{prog}: {what}");
            }
        }
    });
}

const ME6: &str = "fd00:64::1";
const PEER6_A: &str = "fd00:64::2";
const STRANGER6: &str = "fd00:64::9";

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// UDP to `dport`, VXLAN (I flag, VNI 1), then an inner Ethernet frame carrying IPv6/UDP
/// from `src` to `dst` with 32 bytes of payload: a VXLAN-over-IPv6 datagram's payload.
fn vxlan6_datagram(dport: u16, src: &str, dst: &str, dmac: [u8; 6]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_A, dmac).ipv6(v6(src), v6(dst), 64).udp(40000, 9000);
    let mut inner = Vec::new();
    b.write(&mut inner, &[7u8; 32]).unwrap();
    let mut d = Vec::new();
    d.extend_from_slice(&50000u16.to_be_bytes());
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&((8 + 8 + inner.len()) as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]);
    d.extend_from_slice(&inner);
    d
}

/// Ethernet and IPv6 from `src` to us, then extension headers `ext` (their types and bodies
/// after the next-header byte, chained in order), then `payload` of protocol `proto`.
fn ipv6_frame(src: &str, dst: &str, ext: &[(u8, Vec<u8>)], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, (_, body)) in ext.iter().enumerate() {
        chain.push(ext.get(i + 1).map_or(proto, |(t, _)| *t));
        chain.extend_from_slice(body);
    }
    let first = ext.first().map_or(proto, |(t, _)| *t);
    let mut f = Vec::new();
    f.extend_from_slice(&UNDERLAY_MAC);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((chain.len() + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[first, 64]);
    f.extend_from_slice(&v6(src));
    f.extend_from_slice(&v6(dst));
    f.extend_from_slice(&chain);
    f.extend_from_slice(payload);
    f
}

/// A destination-options header of `len` bytes (a multiple of 8) after its next-header byte
/// (PadN), as `ipv6_frame` takes it.
fn dest_opts(len: usize) -> (u8, Vec<u8>) {
    let mut b = vec![(len / 8 - 1) as u8, 1, (len - 4) as u8];
    b.resize(len - 1, 0);
    (60, b)
}

/// A fragment header (after its next-header byte): offset in bytes, more-fragments, ID.
fn frag_header(offset: usize, more: bool, id: u32) -> (u8, Vec<u8>) {
    let word = (offset as u16) | more as u16; // offset is a multiple of 8: its low 3 bits are free
    let mut b = vec![0];
    b.extend_from_slice(&word.to_be_bytes());
    b.extend_from_slice(&id.to_be_bytes());
    (44, b)
}

/// The IPv6 side of the checks, at both hooks: fragments as for IPv4, extension-header
/// chains walked to their end (four deep is dropped as a tunnel frame with extension
/// headers, one reaching past byte 128 too, where XDP used to stop reading and pass it),
/// a chain longer than the program walks or cut short dropped as unreadable; controls pass.
#[test]
fn ipv6_fragments_and_header_chains_fail_closed() {
    in_private_netns(|| {
        let mut n = Node::new(config_flags::KERNEL_DECAP);
        let mac = n.cfg.vtep_mac;
        n.maps
            .set_config6(&overlay_common::Dataplane6Config {
                underlay_ip: v6(ME6),
                local_subnet: v6("fd00:10:244:1::"),
                local_prefix_len: 64,
                enabled: 1,
            })
            .expect("config6");
        n.maps.upsert_route6("fd00:10:244:2::/64".parse().unwrap(), PEER6_A.parse().unwrap(), MAC_A).expect("route6");
        let valid = vxlan6_datagram(8472, "fd00:10:244:2::7", "fd00:10:244:1::5", mac);
        let forged = vxlan6_datagram(8472, "fd00:10:244:3::7", "fd00:10:244:1::5", mac);
        let other_port = vxlan6_datagram(4789, "fd00:10:244:2::7", "fd00:10:244:1::5", mac);
        let frag = |d: &[u8], offset: usize, len: usize, more: bool, id: u32| {
            let data = &d[offset..(offset + len).min(d.len())];
            ipv6_frame(PEER6_A, ME6, &[frag_header(offset, more, id)], 17, data)
        };
        let four = [(0u8, dest_opts(8).1), dest_opts(8), (43, vec![0, 0, 0, 0, 0, 0, 0]), dest_opts(8)];
        let nine: Vec<(u8, Vec<u8>)> = (0..9).map(|_| dest_opts(8)).collect();
        let mut cut = ipv6_frame(PEER6_A, ME6, &nine, 17, &valid);
        cut.truncate(14 + 40 + 8 * 4 + 4);
        let mut tcp_frag_at_8 = frag(&valid, 8, 64, false, 6);
        tcp_frag_at_8[14 + 40] = 6; // the fragment header says TCP follows
        for prog in [prog_names::TC_INGRESS_DECAP, prog_names::XDP_DECAP] {
            let (pass, drop) = if prog == prog_names::XDP_DECAP { (XDP_PASS, XDP_DROP) } else { (TCX_NEXT, TC_ACT_SHOT) };
            let cases: Vec<(&str, Vec<u8>, u32, Vec<(&str, u64)>)> = vec![
                // Controls.
                ("whole", ipv6_frame(PEER6_A, ME6, &[], 17, &valid), pass, vec![("decapsulated", 1)]),
                ("first fragment carrying the headers", frag(&valid, 0, 72, true, 1), pass, vec![("fragment_to_kernel", 1)]),
                ("later fragment past the headers", frag(&valid, 72, 64, false, 1), pass, vec![]),
                ("atomic fragment", frag(&valid, 0, valid.len(), false, 2), pass, vec![("decapsulated", 1)]),
                ("four extension headers to another port", ipv6_frame(PEER6_A, ME6, &four, 17, &other_port), pass, vec![]),
                ("TCP behind a destination-options header", ipv6_frame(PEER6_A, ME6, &[dest_opts(8)], 6, &valid), pass, vec![]),
                ("nine extension headers to another host", ipv6_frame(PEER6_A, STRANGER6, &nine, 17, &valid), pass, vec![]),
                // IPsec is opened only with a security association: the kernel's business.
                ("AH ahead of UDP", ipv6_frame(PEER6_A, ME6, &[(51, vec![4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])], 17, &valid), pass, vec![]),
                // Fragments.
                ("forged first fragment", frag(&forged, 0, 72, true, 3), drop, vec![("spoofed_source", 1)]),
                ("first fragment from a stranger", ipv6_frame(STRANGER6, ME6, &[frag_header(0, true, 3)], 17, &valid[..72]), drop, vec![("unknown_peer", 1)]),
                ("tiny first fragment", frag(&valid, 0, 64, true, 4), drop, vec![("tiny_fragment", 1)]),
                ("later fragment at 8", frag(&valid, 8, 64, false, 5), drop, vec![("fragment_overlap", 1)]),
                ("later fragment at 64", frag(&valid, 64, 64, true, 5), drop, vec![("fragment_overlap", 1)]),
                ("later fragment at 8 saying TCP", tcp_frag_at_8.clone(), drop, vec![("fragment_overlap", 1)]),
                ("two fragment headers", ipv6_frame(PEER6_A, ME6, &[frag_header(0, true, 8), frag_header(0, true, 8)], 17, &valid[..72]), drop, vec![("outer_ip_options", 1)]),
                ("a first then a later fragment header", ipv6_frame(PEER6_A, ME6, &[frag_header(0, true, 9), frag_header(8, false, 9)], 17, &valid[..72]), drop, vec![("fragment_overlap", 1)]),
                ("a fragment header, then half a UDP header", ipv6_frame(PEER6_A, ME6, &[frag_header(0, true, 10)], 17, &valid[..4]), drop, vec![("truncated", 1)]),
                ("first fragment behind a destination-options header",
                    ipv6_frame(PEER6_A, ME6, &[dest_opts(8), frag_header(0, true, 7)], 17, &valid[..72]), drop, vec![("outer_ip_options", 1)]),
                // Extension-header chains.
                ("four extension headers", ipv6_frame(PEER6_A, ME6, &four, 17, &valid), drop, vec![("outer_ip_options", 1)]),
                ("a chain past byte 128", ipv6_frame(PEER6_A, ME6, &[dest_opts(200)], 17, &valid), drop, vec![("outer_ip_options", 1)]),
                ("nine extension headers", ipv6_frame(PEER6_A, ME6, &nine, 17, &valid), drop, vec![("unreadable_headers", 1)]),
                ("a chain cut short", cut.clone(), drop, vec![("unreadable_headers", 1)]),
            ];
            for (what, f, rc_want, moved_want) in cases {
                let (rc, out, moved) = n.run(prog, &f);
                assert_eq!((rc, moved), (rc_want, moved_want), "{prog}: {what}");
                if rc_want == pass {
                    assert_eq!(out, f, "{prog}: {what} untouched");
                }
            }
        }
    });
}

#[test]
fn stack_delivery_strips_the_tunnel_and_applies_rfc_6040() {
    in_private_netns(|| {
        let mut n = Node::new(0);
        let mac = n.cfg.vtep_mac;
        let inner = from_a(mac);
        let (rc, out, moved) = n.run(prog_names::TC_INGRESS_DECAP, &vxlan_frame(PEER_A, 0x08, 1, 0, &inner));
        assert_eq!(rc, TC_ACT_REDIRECT, "into the overlay device's ingress");
        assert_eq!(moved, vec![("decapsulated", 1), ("decap_native", 1)]);
        assert_eq!(&out[..6], &mac, "addressed to the overlay device");
        assert_eq!(&out[12..], &inner[12..], "the inner packet, byte for byte");

        let ect0 = inner_frame([10, 244, 2, 7], [10, 244, 1, 5], 0x28 | 2, true, 32, MAC_A, mac);
        let (rc, out, _) = n.run(prog_names::TC_INGRESS_DECAP, &vxlan_frame(PEER_A, 0x08, 1, 3, &ect0));
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(out[15], 0x28 | 3, "CE passed on to the ECN-capable packet, DSCP kept");
        assert!(ipv4_header_ok(&out[14..]), "inner checksum updated");
        assert_eq!((&out[16..24], &out[26..]), (&ect0[16..24], &ect0[26..]), "nothing else changed");

        let not_ect = inner_frame([10, 244, 2, 7], [10, 244, 1, 5], 0x28, true, 32, MAC_A, mac);
        let (rc, _, moved) = n.run(prog_names::TC_INGRESS_DECAP, &vxlan_frame(PEER_A, 0x08, 1, 3, &not_ect));
        assert_eq!((rc, moved), (TC_ACT_SHOT, vec![("congestion_not_ect", 1)]));
    });
}

#[test]
fn encap_builds_flannels_frame_and_inherits_tos_and_df() {
    in_private_netns(|| {
        let mut n = Node::new(config_flags::KERNEL_DECAP);
        let mac = n.cfg.vtep_mac;
        for (tos, df) in [(0x2a, true), (0x00, false), (0x03, false)] {
            let inner = inner_frame([10, 244, 1, 5], [10, 244, 2, 7], tos, df, 100, mac, mac);
            let (rc, out, moved) = n.run(prog_names::TC_EGRESS_ENCAP, &inner);
            assert_eq!((rc, moved), (TC_ACT_REDIRECT, vec![("encapsulated", 1)]), "tos {tos:#x} df {df}");
            let p = SlicedPacket::from_ethernet(&out).expect("an Ethernet frame");
            let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else { panic!("outer IPv4") };
            let h = ip.header();
            assert_eq!((h.source_addr(), h.destination_addr()), (ME, PEER_A));
            assert_eq!((h.dcp().value() << 2) | h.ecn().value(), tos, "outer TOS = inner TOS");
            assert_eq!(h.dont_fragment(), df, "outer DF = inner DF");
            assert!(df || h.identification() != 0, "a fragmentable outer datagram has an ID");
            assert_eq!(h.ttl(), 64);
            assert!(ipv4_header_ok(&out[14..]));
            assert_eq!(h.total_len() as usize, out.len() - 14);
            let Some(etherparse::TransportSlice::Udp(udp)) = &p.transport else { panic!("outer UDP") };
            assert_eq!(udp.destination_port(), 8472);
            assert!(udp.source_port() >= 0xc000);
            assert_eq!(udp.length() as usize, out.len() - 14 - 20);
            let vx = udp.payload();
            assert_eq!(&vx[..8], &[0x08, 0, 0, 0, 0, 0, 1, 0], "I flag, VNI 1");
            assert_eq!(&vx[8..14], &MAC_A, "inner destination: the peer's VtepMAC");
            assert_eq!(&vx[14..20], &mac, "inner source: ours");
            assert_eq!(&vx[20..], &inner[12..], "the inner packet, byte for byte");
        }
        // A's next hop unresolved (its entry gone): sent all the same, to wait for ARP in the
        // kernel's queue, and counted so that a peer which never answers shows.
        sh("ip", &["neigh", "del", "192.168.50.2", "dev", "ul0"]);
        let (rc, out, moved) = n.run(prog_names::TC_EGRESS_ENCAP, &inner_frame([10, 244, 1, 5], [10, 244, 2, 7], 0, true, 100, mac, mac));
        assert_eq!((rc, moved), (TC_ACT_REDIRECT, vec![("encapsulated", 1), ("unresolved_next_hop", 1)]));
        assert_eq!(&out[14 + 16..14 + 20], &PEER_A.octets(), "encapsulated to A");
        let (rc, _, moved) = n.run(prog_names::TC_EGRESS_ENCAP, &inner_frame([10, 244, 1, 5], [10, 99, 0, 1], 0, true, 10, mac, mac));
        assert_eq!((rc, moved), (TC_ACT_SHOT, vec![("no_route", 1)]));
        let (rc, _, moved) = n.run(prog_names::TC_EGRESS_ENCAP, &inner_frame([10, 244, 1, 5], [10, 244, 4, 7], 0, true, 100, mac, mac));
        assert_eq!((rc, moved), (TC_ACT_SHOT, vec![("no_underlay_route", 1)]), "no way to the peer: dropped and counted here");
        let mut v6 = inner_frame([10, 244, 1, 5], [10, 244, 2, 7], 0, true, 100, mac, mac);
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        let (rc, _, moved) = n.run(prog_names::TC_EGRESS_ENCAP, &v6);
        assert_eq!((rc, moved), (TC_ACT_SHOT, vec![("encap_not_ipv4", 1)]));
    });
}

#[test]
fn encap_answers_what_does_not_fit_the_path() {
    in_private_netns(|| {
        let mut n = Node::new(config_flags::KERNEL_DECAP);
        let mac = n.cfg.vtep_mac;
        // 1400 bytes inside, 1450 outside: fits ul0 (1500) but not the path to B (1300).
        let big = inner_frame([10, 244, 1, 5], [10, 244, 3, 7], 0, true, 1400 - 28, mac, mac);
        let (rc, out, moved) = n.run(prog_names::TC_EGRESS_ENCAP, &big);
        assert_eq!((rc, moved), (TC_ACT_REDIRECT, vec![("encap_frag_needed", 1)]), "DF: answered");
        assert_eq!(out.len(), 14 + 20 + 8 + 40, "IPv4 + ICMP + the quote");
        assert_eq!(&out[..6], &mac, "to the overlay device, into the host");
        assert!(ipv4_header_ok(&out[14..]));
        assert_eq!(&out[14 + 12..14 + 20], &[10, 244, 3, 7, 10, 244, 1, 5], "from the destination to the sender");
        assert_eq!(out[14 + 9], 1, "ICMP");
        let icmp = &out[34..];
        assert_eq!(&icmp[..2], &[3, 4], "fragmentation needed");
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1250, "the MTU left inside the tunnel");
        // The packet's headers, but for the quoted checksum, which holds the value a
        // completion of the packet's stale checksum state would write again.
        let mut quote: [u8; 40] = big[14..14 + 40].try_into().unwrap();
        let (field, _) = overlay_common::settle_quoted_checksum(&mut quote).expect("a TCP quote");
        assert_eq!(&icmp[8..], &quote, "quotes the packet's headers");
        assert_eq!((&icmp[8..8 + field], &icmp[8 + field + 2..]), (&big[14..14 + field], &big[14 + field + 2..14 + 40]));
        assert_eq!(ones_sum(icmp), 0xffff, "ICMP checksum");

        // The same to A (whose path is the whole link) is simply encapsulated.
        let to_a = inner_frame([10, 244, 1, 5], [10, 244, 2, 7], 0, true, 1400 - 28, mac, mac);
        let (rc, _, moved) = n.run(prog_names::TC_EGRESS_ENCAP, &to_a);
        assert_eq!((rc, moved), (TC_ACT_REDIRECT, vec![("encapsulated", 1)]));

        // Fragmentable: left to the kernel device (which fragments the outer datagram),
        // addressed to B's VtepMAC for its forwarding entry.
        let frag_ok = inner_frame([10, 244, 1, 5], [10, 244, 3, 7], 0, false, 1400 - 28, mac, mac);
        let (rc, out, moved) = n.run(prog_names::TC_EGRESS_ENCAP, &frag_ok);
        assert_eq!((rc, moved), (TCX_NEXT, vec![("encap_to_kernel", 1)]));
        assert_eq!(&out[..6], &MAC_B);
        assert_eq!(&out[6..], &frag_ok[6..]);

        // DF from somewhere else than this node: no answer can be delivered here; dropped.
        let foreign = inner_frame([172, 16, 0, 1], [10, 244, 3, 7], 0, true, 1400 - 28, mac, mac);
        let (rc, _, moved) = n.run(prog_names::TC_EGRESS_ENCAP, &foreign);
        assert_eq!((rc, moved), (TC_ACT_SHOT, vec![("encap_too_big", 1)]));
    });
}


/// The vxlan device's forwarding entries follow the routes (written over netlink, read back
/// with `bridge`, the operator's view): one per peer, replaced when a peer's VtepMAC changes,
/// gone with its last route. They carry what the program leaves to the kernel device.
#[test]
fn forwarding_entries_follow_the_routes() {
    in_private_netns(|| {
        let mut n = Node::new(config_flags::KERNEL_DECAP);
        let bridge = || {
            let out = Command::new("bridge").args(["fdb", "show", "dev", "flannel.1"]).output().expect("bridge");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let fdb = bridge();
        for (mac, ip) in [(MAC_A, PEER_A), (MAC_B, PEER_B), (MAC_C, PEER_C)] {
            let line = format!("{} dst {ip} self permanent", netdev::format_mac(&mac));
            assert!(fdb.contains(&line), "{line:?} missing from:\n{fdb}");
        }
        let listed = netdev::vxlan_fdb("flannel.1").expect("fdb");
        assert!(listed.contains(&(MAC_A, PEER_A)) && listed.contains(&(MAC_C, PEER_C)), "{listed:?}");
        // A's VtepMAC changes (its agent recreated the device): the old entry goes.
        let new_mac = [0x02, 0, 0, 0, 0, 0x1a];
        n.maps.upsert_route(&Route { subnet: "10.244.2.0/24".parse().unwrap(), public_ip: PEER_A, vtep_mac: new_mac, wireguard: None }).expect("route");
        let fdb = bridge();
        assert!(fdb.contains(&format!("{} dst {PEER_A} self permanent", netdev::format_mac(&new_mac))), "{fdb}");
        assert!(!fdb.contains(&netdev::format_mac(&MAC_A)), "{fdb}");
        // C's only route goes: so does its entry.
        n.maps.remove_route("10.244.4.0/24".parse().unwrap()).expect("remove");
        assert!(!bridge().contains(&netdev::format_mac(&MAC_C)));
        assert!(!netdev::vxlan_fdb("flannel.1").expect("fdb").iter().any(|(m, _)| *m == MAC_C));
    });
}
