//! The data plane on 3-node namespace clusters: traffic between containers on different
//! nodes for each encapsulation and decap hook, the wire format on the underlay, hostile
//! frames, and interoperation with a node set up as stock flannel's vxlan backend.
//!
//! Every test needs root, bpffs and a kernel with BTF/TCX: it fails (never skips) without.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use overlay_common::Counter;
use overlay_tests::{
    capture::Capture,
    require_root,
    traffic::{ping, send_udp, tcp_transfer, UdpProbe},
    wait_until, Backend, Cluster, ClusterSpec, NodeKind,
};

const BULK: u64 = 32 << 20;

fn cluster(tag: &str, spec: &ClusterSpec) -> Cluster {
    require_root();
    Cluster::new(tag, spec).unwrap_or_else(|e| panic!("building the cluster failed: {e:#}"))
}

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// Which program decapsulates the frames of a bulk TCP transfer.
#[derive(Debug)]
enum Decap {
    /// The kernel's vxlan device, every frame.
    Kernel,
    /// Our program, every frame.
    Native,
}

/// Containers on every pair of nodes reach each other; bulk TCP arrives intact; the
/// counters account for it; the capture on the underlay shows flannel's wire format.
/// Three nodes with `hook` and the agent's extra `args`, ping between every pair, bulk TCP,
/// counters, and the wire format.
fn carries_traffic(tag: &str, backend: Backend, hook: &'static str, args: &[&str], expect: Decap) {
    let spec = ClusterSpec { agent_args: args.iter().map(|a| a.to_string()).collect(), ..ClusterSpec::agents(backend, hook, 3) };
    carries_traffic_on(tag, &spec, expect);
}

fn carries_traffic_on(tag: &str, spec: &ClusterSpec, expect: Decap) {
    let backend = spec.backend;
    let c = cluster(tag, spec);
    for a in &c.nodes {
        for b in &c.nodes {
            if a.index != b.index {
                ok(
                    &format!("container on node {} -> node {}", a.index, b.index),
                    ping(&a.containers[0], b.container_ip(1), 3),
                );
            }
        }
    }
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    let native_before = n2.counter(Counter::DecapNative);
    let decap_before = n2.counter(Counter::Decapsulated);
    let before = n2.peer_totals(n1.underlay_ip);
    let t = ok("TCP 1->2", tcp_transfer(&n1.containers[0], &n2.containers[1], n2.container_ip(1), BULK));
    eprintln!("{tag}: {} bytes node1->node2 in {:?}", t.bytes, t.elapsed);
    ok("TCP 3->1", tcp_transfer(&n3.containers[1], &n1.containers[0], n1.container_ip(0), BULK));

    let after = n2.peer_totals(n1.underlay_ip);
    assert!(
        after.rx_bytes - before.rx_bytes >= BULK,
        "node 2 should count at least {BULK} bytes from node 1, counted {}",
        after.rx_bytes - before.rx_bytes
    );
    assert!(n1.peer_totals(n2.underlay_ip).tx_bytes >= BULK, "node 1 tx to node 2 not counted");
    // Who decapsulated: the kernel's vxlan device, our program, or (auto, TC) each its share.
    let native = n2.counter(Counter::DecapNative) - native_before;
    let all = n2.counter(Counter::Decapsulated) - decap_before;
    match expect {
        Decap::Kernel => assert_eq!(native, 0, "node 2: every frame belongs to the kernel device ({all} accepted)"),
        Decap::Native => assert_eq!(native, all, "node 2: every frame decapsulated by the program"),
    }
    for n in &c.nodes {
        assert!(n.counter(Counter::Encapsulated) > 0, "node {} encapsulated nothing", n.index);
        assert!(n.counter(Counter::Decapsulated) > 0, "node {} decapsulated nothing", n.index);
        for drop in [Counter::UnknownPeer, Counter::WrongVni, Counter::SpoofedSource, Counter::DecapFailed, Counter::EncapFailed] {
            assert_eq!(n.counter(drop), 0, "node {}: unexpected {}", n.index, drop.name());
        }
    }

    // The wire format, seen on the underlay bridge port of node 2.
    let cap = ok(
        "capture",
        Capture::start(&c.underlay, "p2", &format!("udp port {}", backend.port()), c.workdir.join("wire.pcap")),
    );
    ok("ping during capture", ping(&n1.containers[0], n2.container_ip(0), 2));
    // Marked (DSCP AF11, ECT(0)) and fragmentable.
    ok("marked ping", n1.containers[0].run("ping", &["-c", "2", "-i", "0.2", "-W", "2", "-Q", "0x2a", "-M", "dont", &n2.container_ip(0).to_string()]));
    let tunnel_frames_to_n2 = |frames: &[Vec<u8>]| -> Vec<_> {
        frames.iter().filter_map(|f| tunnel_frame(f, backend)).filter(|t| t.outer_dst == n2.underlay_ip).collect()
    };
    let frames = ok("reading capture", cap.finish_when(|f| tunnel_frames_to_n2(f).len() >= 4));
    let to_n2 = tunnel_frames_to_n2(&frames);
    assert!(to_n2.len() >= 4, "expected >= 4 tunnel frames to node 2, got {} of {} frames", to_n2.len(), frames.len());
    assert!(to_n2.iter().any(|t| t.inner_ip.0 == 0x2a && !t.inner_ip.1), "the marked, fragmentable pings were not captured");
    for t in &to_n2 {
        // The outer header inherits TOS (DSCP and ECN) and DF; a fragmentable one has an ID.
        let ((otos, odf, oid), (itos, idf, _)) = (t.outer_ip, t.inner_ip);
        assert_eq!((otos, odf), (itos, idf), "outer TOS and DF must be the inner's: {t:?}");
        assert!(odf || oid != 0, "a fragmentable outer datagram must not have ID 0: {t:?}");
        assert_eq!(t.outer_src, n1.underlay_ip);
        assert_eq!(t.inner_src, n1.container_ip(0));
        assert_eq!(t.inner_dst, n2.container_ip(0));
        if backend == Backend::Vxlan {
            assert_eq!(t.vni, Some(1), "VNI on the wire");
            assert_eq!(t.inner_dst_mac, Some(n2.vtep_mac), "inner destination MAC = peer's VtepMAC");
            assert_eq!(t.inner_src_mac, Some(n1.vtep_mac), "inner source MAC = our VtepMAC");
        } else {
            assert_eq!(t.vni, None);
        }
    }

    // Removing the route stops the traffic and counts it.
    let no_route = n1.counter(Counter::NoRoute);
    ok("route del", n1.agent_cli(&["route", "del", &n2.subnet.to_string()]));
    assert!(ping(&n1.containers[0], n2.container_ip(0), 1).is_err(), "ping must fail without a route");
    assert!(n1.counter(Counter::NoRoute) > no_route, "no_route did not rise");
    let routes = ok("routes", n1.agent_cli(&["routes"]));
    assert!(!routes.contains(&n2.subnet.to_string()), "routes still lists node 2:\n{routes}");
    assert!(routes.contains(&n3.subnet.to_string()), "routes lost node 3:\n{routes}");
}

#[test]
fn vxlan_with_tc_decap_carries_ping_and_tcp_between_nodes() {
    carries_traffic("vt", Backend::Vxlan, "tc", &[], Decap::Kernel);
}

#[test]
fn vxlan_with_xdp_decap_carries_ping_and_tcp_between_nodes() {
    carries_traffic("vx", Backend::Vxlan, "xdp", &[], Decap::Kernel);
}

/// The retired split delivery (merged frames through the kernel device, the rest through the
/// program: two paths that could reorder a flow) runs as `kernel`: every frame to the kernel
/// device, no program-decapsulation flag in the configuration, and a warning that says so.
#[test]
fn retired_split_delivery_runs_as_kernel_delivery() {
    carries_traffic("vs", Backend::Vxlan, "tc", &["--decap-delivery", "split"], Decap::Kernel);
    let spec = ClusterSpec {
        containers_per_node: 0,
        agent_args: vec!["--decap-delivery".into(), "split".into()],
        ..ClusterSpec::agents(Backend::Vxlan, "tc", 1)
    };
    let c = cluster("vr", &spec);
    let n = c.node(1);
    assert_eq!(n.config_flags(), overlay_common::config_flags::READY | overlay_common::config_flags::KERNEL_DECAP);
    assert!(n.log_text().contains("--decap-delivery split is retired"), "{}", n.log_text());
}

/// On an underlay that carries MTU-sized frames (as a physical link does), GRO merges the
/// tunnel frames where nodes receive; TC leaves every one of them to the kernel device, as XDP
/// (before GRO) does.
#[test]
fn vxlan_with_tc_decap_on_a_wire_underlay_carries_ping_and_tcp() {
    carries_traffic_on("wt", &ClusterSpec { wire_underlay: true, ..ClusterSpec::agents(Backend::Vxlan, "tc", 3) }, Decap::Kernel);
}

#[test]
fn vxlan_with_xdp_decap_on_a_wire_underlay_carries_ping_and_tcp() {
    carries_traffic_on("wx", &ClusterSpec { wire_underlay: true, ..ClusterSpec::agents(Backend::Vxlan, "xdp", 3) }, Decap::Kernel);
}

/// Strict reverse-path filtering is what every other test runs; loose works as well.
#[test]
fn vxlan_with_xdp_decap_under_loose_rp_filter_carries_ping_and_tcp() {
    carries_traffic_on("lx", &ClusterSpec { rp_filter: 2, ..ClusterSpec::agents(Backend::Vxlan, "xdp", 3) }, Decap::Kernel);
}

#[test]
fn udp_with_tc_decap_carries_ping_and_tcp_between_nodes() {
    carries_traffic("ut", Backend::Udp, "tc", &[], Decap::Native);
}

/// XDP only checks and leaves decapsulation to the kernel's vxlan device; the udp backend
/// has none, so XDP is refused for it with the fix named.
#[test]
fn udp_with_xdp_decap_is_refused_with_a_clear_error() {
    require_root();
    let err = Cluster::new("ux", &ClusterSpec::agents(Backend::Udp, "xdp", 1)).err().expect("udp with XDP must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("udp backend has none") && msg.contains("--decap-hook tc"), "{msg}");
}

/// An overlay MTU whose encapsulated packets could not leave through the underlay (1480 + 50
/// on a 1500 link) is refused at start, with the largest that fits named; the largest is
/// accepted.
#[test]
fn an_overlay_mtu_too_big_for_the_underlay_is_refused() {
    require_root();
    let spec = |mtu: &str| ClusterSpec { agent_args: vec!["--mtu".into(), mtu.into()], ..ClusterSpec::agents(Backend::Vxlan, "tc", 1) };
    let err = Cluster::new("mr", &spec("1480")).err().expect("an overlay MTU of 1480 over a 1500 underlay must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("1480") && msg.contains("use at most 1450"), "{msg}");
    let c = cluster("ma", &spec("1450"));
    assert_eq!(ok("mtu", overlay_tests::link_mtu(&c.node(1).ns, "flannel.1")), 1450);
}

/// What a captured tunnel frame says.
#[derive(Debug)]
struct TunnelFrame {
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    vni: Option<u32>,
    inner_src_mac: Option<[u8; 6]>,
    inner_dst_mac: Option<[u8; 6]>,
    inner_src: Ipv4Addr,
    inner_dst: Ipv4Addr,
    /// (TOS byte, DF, IPv4 ID) of the outer and of the inner IPv4 header.
    outer_ip: (u8, bool, u16),
    inner_ip: (u8, bool, u16),
}

fn tunnel_frame(frame: &[u8], backend: Backend) -> Option<TunnelFrame> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv4(ip)) = p.net else { return None };
    let Some(TransportSlice::Udp(udp)) = p.transport else { return None };
    if udp.destination_port() != backend.port() {
        return None;
    }
    let payload = udp.payload();
    let (vni, smac, dmac, inner) = match backend {
        Backend::Vxlan => {
            if payload.len() < 8 + 14 + 20 || payload[0] != 0x08 {
                return None;
            }
            let vni = u32::from_be_bytes([0, payload[4], payload[5], payload[6]]);
            let e = &payload[8..22];
            (Some(vni), Some(e[6..12].try_into().ok()?), Some(e[0..6].try_into().ok()?), &payload[22..])
        }
        Backend::Udp => (None, None, None, payload),
        // Not a UDP tunnel (the ipip cluster is kernel_matrix's).
        Backend::Ipip | Backend::Wireguard => return None,
    };
    let inner = etherparse::Ipv4HeaderSlice::from_slice(inner).ok()?;
    let fields = |h: &[u8]| (h[1], h[6] & 0x40 != 0, u16::from_be_bytes([h[4], h[5]]));
    Some(TunnelFrame {
        outer_ip: fields(ip.header().slice()),
        inner_ip: fields(inner.slice()),
        outer_src: ip.header().source_addr(),
        outer_dst: ip.header().destination_addr(),
        vni,
        inner_src_mac: smac,
        inner_dst_mac: dmac,
        inner_src: inner.source_addr(),
        inner_dst: inner.destination_addr(),
    })
}

/// A VXLAN frame's UDP payload carrying a UDP datagram `src -> dst:port`.
fn vxlan_payload(flags: u8, vni: u32, dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut p = vec![flags, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(40000, port);
    let body = b"hostile";
    let mut frame = Vec::new();
    b.write(&mut frame, body).expect("building inner frame");
    p.extend_from_slice(&frame);
    p
}

/// Frames that are not ours to accept are dropped and counted by reason, never delivered;
/// a valid frame sent the same way is delivered (so the checks are what stops the others);
/// ordinary underlay traffic is untouched.
fn hostile_frames(tag: &str, hook: &'static str) {
    let mut c = cluster(tag, &ClusterSpec::agents(Backend::Vxlan, hook, 3));
    let evil_ip = Ipv4Addr::new(192, 168, 100, 99);
    let evil = ok("evil host", c.add_underlay_host("evil", evil_ip));
    let (n1, n2) = (c.node(1), c.node(2));
    let victim = n1.container_ip(0);
    let probe_port = 9999;
    let vxlan_to_n1 = SocketAddrV4::new(n1.underlay_ip, 8472);
    let from_n2 = SocketAddrV4::new(n2.underlay_ip, 0);
    let legit_src = n2.container_ip(0);
    let mac = n1.vtep_mac;

    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, probe_port)));
    let before = n1.counters();
    // 1. From an address that is not a peer (with everything else valid, and cut short: who
    //    sent it is judged before what it holds).
    let from_evil = vxlan_payload(0x08, 1, mac, legit_src, victim, probe_port);
    ok("send", send_udp(&evil, SocketAddrV4::new(evil_ip, 0), vxlan_to_n1, vec![from_evil.clone(), from_evil[..4].to_vec()]));
    // 2. From a peer, wrong VNI.
    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, vec![vxlan_payload(0x08, 99, mac, legit_src, victim, probe_port)]));
    // 3. From a peer, wrong flags (no I flag; GBP bit).
    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, vec![
        vxlan_payload(0x00, 1, mac, legit_src, victim, probe_port),
        vxlan_payload(0x88, 1, mac, legit_src, victim, probe_port),
    ]));
    // 4. From a peer, truncated at every length short of a full inner IPv4 header.
    let full = vxlan_payload(0x08, 1, mac, legit_src, victim, probe_port);
    let truncated: Vec<Vec<u8>> = (0..8 + 14 + 20).map(|n| full[..n].to_vec()).collect();
    let n_truncated = truncated.len() as u64;
    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, truncated));
    // 5. From a peer, inner source forged into another node's subnet.
    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, vec![vxlan_payload(0x08, 1, mac, c.node(3).container_ip(0), victim, probe_port)]));
    // 6. From a peer, inner destination outside this node's subnet.
    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, vec![vxlan_payload(0x08, 1, mac, legit_src, c.node(3).container_ip(0), probe_port)]));

    let expect = [
        (Counter::UnknownPeer, 2),
        (Counter::WrongVni, 1),
        (Counter::BadVxlanFlags, 2),
        (Counter::Truncated, n_truncated),
        (Counter::SpoofedSource, 1),
        (Counter::NotLocalSubnet, 1),
    ];
    let settled = wait_until(Duration::from_secs(5), || {
        let now = n1.counters();
        expect.iter().all(|(c, n)| now[*c as usize] - before[*c as usize] >= *n)
    });
    let now = n1.counters();
    let deltas: Vec<_> = expect.iter().map(|(c, n)| (c.name(), *n, now[*c as usize] - before[*c as usize])).collect();
    assert!(settled, "drop counters (name, expected, got): {deltas:?}");
    assert_eq!(now[Counter::Decapsulated as usize], before[Counter::Decapsulated as usize], "nothing hostile may be decapsulated");

    // Control: the same path with a valid frame to the same probe delivers it, so the checks
    // above are what stopped the others. Every hostile frame has been counted as dropped by
    // now, so once the control datagram is in, nothing else can still come.
    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, vec![vxlan_payload(0x08, 1, mac, legit_src, victim, probe_port)]));
    let got = probe.finish_after(1);
    assert_eq!(n1.counter(Counter::Decapsulated) - before[Counter::Decapsulated as usize], 1, "exactly the valid control frame is decapsulated");
    assert_eq!(got, vec![b"hostile".to_vec()], "the valid control frame, and nothing hostile, must reach the container");

    // Ordinary underlay traffic passes untouched: ICMP, UDP on another port, and TCP.
    ok("underlay ping", ping(&n2.ns, n1.underlay_ip, 2));
    ok("underlay ping from a non-peer", ping(&evil, n1.underlay_ip, 2));
    let probe = ok("probe", UdpProbe::start(&n1.ns, SocketAddrV4::new(n1.underlay_ip, 9000)));
    ok("send", send_udp(&evil, SocketAddrV4::new(evil_ip, 0), SocketAddrV4::new(n1.underlay_ip, 9000), vec![b"plain".to_vec()]));
    assert_eq!(probe.finish_after(1), vec![b"plain".to_vec()], "plain UDP on the underlay must pass");
    ok("underlay TCP", tcp_transfer(&evil, &n1.ns, n1.underlay_ip, 1 << 20));
}

/// An outer Ethernet + IPv4 (`ihl` words, flags/fragment word `frag`) + UDP header to `dport`,
/// followed by `payload`, from `src` to `dst`.
fn raw_frame(dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, ihl: u8, frag: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let opts = (ihl as usize - 5) * 4;
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 0x42]);
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = (20 + opts + 8 + payload.len()) as u16;
    let mut ip = vec![0x40 | ihl, 0];
    ip.extend_from_slice(&tot.to_be_bytes());
    ip.extend_from_slice(&[0, 1]);
    ip.extend_from_slice(&frag.to_be_bytes());
    ip.extend_from_slice(&[64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend(std::iter::repeat(1u8).take(opts)); // NOP options
    // The checksum covers the options too.
    let sum = ipv4_sum(&ip);
    ip[10..12].copy_from_slice(&(!sum).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Frames below the UDP layer, sent raw from a peer: outer IPv4 options and a tunnel frame
/// cut at every length from the Ethernet header to the end of the inner IPv4 header, and with a wrong header checksum or UDP length. Those cut before the UDP header is
/// whole are not ours and move no counter (the stack drops them); the others are dropped and
/// counted once each; a frame of another EtherType moves no counter; and the valid frame
/// built the same way is delivered, whole and in fragments.
fn malformed_outer_frames(tag: &str, hook: &'static str) {
    let c = cluster(tag, &ClusterSpec::agents(Backend::Vxlan, hook, 2));
    let (n1, n2) = (c.node(1), c.node(2));
    let n1_mac = ok("mac", overlay_tests::link_mac(&n1.ns, "eth0"));
    let port = 9997;
    let payload = vxlan_payload(0x08, 1, n1.vtep_mac, n2.container_ip(0), n1.container_ip(0), port);
    let frame = |ihl, frag| raw_frame(n1_mac, n2.underlay_ip, n1.underlay_ip, ihl, frag, 8472, &payload);
    let valid = frame(5, 0);
    let mut frames = vec![frame(6, 0), frame(15, 0)];
    // Cut inside the outer IPv4 or UDP header: nothing says the frame is ours; it passes to
    // the stack untouched (which drops it) and moves no counter. Cut after it: ours, truncated.
    let not_ours: Vec<Vec<u8>> = (14..42).map(|n| valid[..n].to_vec()).collect();
    let cut: Vec<Vec<u8>> = (42..42 + 8 + 14 + 20).map(|n| valid[..n].to_vec()).collect();
    frames.extend(not_ours.iter().cloned());
    frames.extend(cut.iter().cloned());
    // Headers the stack would refuse: a wrong IPv4 checksum, a UDP length that disagrees.
    let mut bad_sum = valid.clone();
    bad_sum[14 + 10] ^= 0xff;
    let mut bad_udp_len = valid.clone();
    let l = u16::from_be_bytes([valid[14 + 20 + 4], valid[14 + 20 + 5]]) - 1;
    bad_udp_len[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&l.to_be_bytes());
    frames.extend([bad_sum, bad_udp_len]);
    let mut other = valid.clone();
    other[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental EtherType
    frames.push(other);

    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
    let before = n1.counters();
    ok("raw", overlay_tests::traffic::send_raw_frames(&n2.ns, "eth0", frames));
    let expect = [
        (Counter::OuterIpOptions, 2),
        (Counter::Truncated, cut.len() as u64),
        (Counter::BadOuterHeader, 2),
    ];
    let settled = wait_until(Duration::from_secs(5), || {
        let now = n1.counters();
        expect.iter().all(|(c, n)| now[*c as usize] - before[*c as usize] >= *n)
    });
    let now = n1.counters();
    let deltas: Vec<_> = expect.iter().map(|(c, n)| (c.name(), *n, now[*c as usize] - before[*c as usize])).collect();
    assert!(settled, "drop counters (name, expected, got): {deltas:?}");
    for (c, n) in expect {
        assert_eq!(now[c as usize] - before[c as usize], n, "{}: exactly one count per frame", c.name());
    }
    let total_drops = |v: &[u64; Counter::COUNT]| Counter::ALL.iter().filter(|c| c.is_drop()).map(|c| v[*c as usize]).sum::<u64>();
    assert_eq!(total_drops(&now) - total_drops(&before), 4 + cut.len() as u64, "the other-EtherType frame must move no counter");
    assert_eq!(now[Counter::Decapsulated as usize], before[Counter::Decapsulated as usize]);
    // Fragments of tunnel datagrams from the peer, each class with its own IP ID (so that
    // the kernel's reassembly queues stay apart): none may bring the container a packet.
    // 1. A forged inner source behind a first fragment that carries the headers whole.
    let forged_payload = vxlan_payload(0x08, 1, n1.vtep_mac, Ipv4Addr::new(10, 244, 99, 7), n1.container_ip(0), port);
    let forged = with_id(&raw_frame(n1_mac, n2.underlay_ip, n1.underlay_ip, 5, 0, 8472, &forged_payload), 101);
    // 2. A tiny first fragment (UDP and VXLAN only): the inner headers would come later.
    // 3. A checked first fragment, then a second one overlapping its headers to rewrite the
    //    inner source.
    let overlap = [fragments(&with_id(&valid, 103), 56).remove(0), later_fragment(&with_id(&forged, 103), 8)];
    let hostile: Vec<Vec<u8>> = [fragments(&forged, 56), fragments(&with_id(&valid, 102), 16), overlap.to_vec()].concat();
    let before = n1.counters();
    ok("raw hostile fragments", overlay_tests::traffic::send_raw_frames(&n2.ns, "eth0", hostile));
    let expect = [(Counter::SpoofedSource, 1), (Counter::TinyFragment, 1), (Counter::FragmentOverlap, 2), (Counter::FragmentToKernel, 1)];
    let settled = wait_until(Duration::from_secs(5), || {
        let now = n1.counters();
        expect.iter().all(|(c, n)| now[*c as usize] - before[*c as usize] >= *n)
    });
    let now = n1.counters();
    let deltas: Vec<_> = expect.iter().map(|(c, n)| (c.name(), *n, now[*c as usize] - before[*c as usize])).collect();
    assert!(settled, "fragment counters (name, expected, got): {deltas:?}");
    for (c, n) in expect {
        assert_eq!(now[c as usize] - before[c as usize], n, "{}: exactly the hostile fragments of its class", c.name());
    }

    // Control: the valid frame, sent the same way to the same probe, is delivered, and is
    // all that arrives (every malformed frame has been counted as dropped by now).
    let before = n1.counters();
    ok("raw", overlay_tests::traffic::send_raw_frames(&n2.ns, "eth0", vec![valid.clone()]));
    // The same datagram in two fragments (a router on the way fragmented it, as it may when
    // DF is clear, which stock flannel's device always leaves it): the first, carrying the
    // headers whole, is checked and goes to the kernel, which reassembles the datagram for
    // its vxlan device, and it is delivered too.
    let frags = fragments(&valid, 56);
    ok("raw fragments", overlay_tests::traffic::send_raw_frames(&n2.ns, "eth0", frags));
    assert_eq!(
        probe.finish_after(2),
        vec![b"hostile".to_vec(), b"hostile".to_vec()],
        "the valid raw frame and its fragmented twin, and no malformed frame or hostile fragment, must be delivered"
    );
    assert_eq!(n1.counter(Counter::Decapsulated) - before[Counter::Decapsulated as usize], 1, "reassembled datagrams are not seen again");
    assert_eq!(n1.counter(Counter::FragmentToKernel) - before[Counter::FragmentToKernel as usize], 1, "one first fragment");
}

/// The one path around the underlay programs: a forged first fragment that a local container
/// sends to its node's underlay address (with a peer's address as source, which loose
/// reverse-path filtering lets in), completed by a later fragment from the peer over the
/// underlay (which the programs pass: it starts past the checked headers). The kernel gives
/// the reassembled datagram the first fragment's interface, so the socket guard drops it as
/// `foreign_tunnel` and the container's probe sees nothing; the same datagram, all over the
/// underlay, is delivered.
fn a_containers_first_fragment(tag: &str, hook: &'static str, guard: &str) {
    let spec = ClusterSpec { rp_filter: 2, agent_args: vec![format!("--guard={guard}")], ..ClusterSpec::agents(Backend::Vxlan, hook, 2) };
    let c = cluster(tag, &spec);
    let (n1, n2) = (c.node(1), c.node(2));
    let port = 9995;
    let n1_mac = ok("mac", overlay_tests::link_mac(&n1.ns, "eth0"));
    let payload = vxlan_payload(0x08, 1, n1.vtep_mac, n2.container_ip(0), n1.container_ip(0), port);
    let valid = raw_frame(n1_mac, n2.underlay_ip, n1.underlay_ip, 5, 0, 8472, &payload);
    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
    let before = n1.counters();
    let fw_before = n1.firewall_guard_drops();
    let guarded = || match guard {
        "firewall" => n1.firewall_guard_drops() > fw_before,
        _ => n1.counter(Counter::ForeignTunnel) > before[Counter::ForeignTunnel as usize],
    };
    // From container 1 on node 1, to docker0 (its gateway), the first 56 bytes.
    let bridge_mac = ok("mac", overlay_tests::link_mac(&n1.ns, "docker0"));
    let [first, later] = <[Vec<u8>; 2]>::try_from(fragments(&with_id(&valid, 301), 56)).unwrap();
    let mut first = first;
    first[..6].copy_from_slice(&bridge_mac);
    first[6..12].copy_from_slice(&ok("mac", overlay_tests::link_mac(&n1.containers[1], "eth0")));
    ok("container fragment", overlay_tests::traffic::send_raw_frames(&n1.containers[1], "eth0", vec![first]));
    ok("underlay fragment", overlay_tests::traffic::send_raw_frames(&n2.ns, "eth0", vec![later]));
    assert!(wait_until(Duration::from_secs(5), guarded), "the container's first fragment was not dropped by the socket guard ({guard})");
    assert_eq!(n1.counter(Counter::FragmentToKernel), before[Counter::FragmentToKernel as usize], "no first fragment crossed the underlay");
    // Control: the same datagram, both fragments over the underlay.
    ok("underlay fragments", overlay_tests::traffic::send_raw_frames(&n2.ns, "eth0", fragments(&with_id(&valid, 302), 56)));
    assert_eq!(probe.finish_after(1), vec![b"hostile".to_vec()], "exactly the datagram that came whole over the underlay");
}

#[test]
fn a_containers_first_fragment_is_not_completed_over_the_underlay_with_tc_decap() {
    a_containers_first_fragment("cf", "tc", "sk-lookup");
}

/// The guard's firewall form sees each fragment with its own interface (its chain runs
/// before defragmentation, which gives the datagram the last fragment's): the container's
/// first fragment is dropped there, so the underlay's cannot complete it.
#[test]
fn a_containers_first_fragment_is_dropped_by_the_firewall_guard() {
    a_containers_first_fragment("cw", "tc", "firewall");
}

#[test]
fn a_containers_first_fragment_is_not_completed_over_the_underlay_with_xdp_decap() {
    a_containers_first_fragment("cx", "xdp", "sk-lookup");
}

/// `frame` with IPv4 ID `id` (its header checksum made right again).
fn with_id(frame: &[u8], id: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[18..20].copy_from_slice(&id.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let sum = ipv4_sum(&f[14..34]);
    f[24..26].copy_from_slice(&(!sum).to_be_bytes());
    f
}

/// The IPv4 datagram of Ethernet frame `frame` (no options) split into two fragments, the
/// first carrying `first` bytes (a multiple of 8) of the IPv4 payload.
fn fragments(frame: &[u8], first: usize) -> Vec<Vec<u8>> {
    assert_eq!(first % 8, 0);
    vec![fragment(frame, 0, first, true), later_fragment(frame, first)]
}

/// The last fragment of `frame`'s datagram, from byte `offset` of its payload on.
fn later_fragment(frame: &[u8], offset: usize) -> Vec<u8> {
    fragment(frame, offset, frame.len() - 34 - offset, false)
}

fn fragment(frame: &[u8], offset: usize, len: usize, more: bool) -> Vec<u8> {
    let (eth, ip, payload) = (&frame[..14], &frame[14..34], &frame[34..]);
    let data = &payload[offset..offset + len];
    let mut h = ip.to_vec();
    h[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
    let word = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
    h[6..8].copy_from_slice(&word.to_be_bytes());
    h[10..12].copy_from_slice(&[0, 0]);
    let sum = ipv4_sum(&h);
    h[10..12].copy_from_slice(&(!sum).to_be_bytes());
    [eth, &h[..], data].concat()
}

#[test]
fn malformed_outer_frames_are_dropped_and_counted_with_tc_decap() {
    malformed_outer_frames("mt", "tc");
}

#[test]
fn malformed_outer_frames_are_dropped_and_counted_with_xdp_decap() {
    malformed_outer_frames("mx", "xdp");
}

/// `--inner-source-check peer`: a known peer's frame may carry an inner source outside the
/// peer's own subnet (here another node's container: a client routed through the peer), as
/// a stock flannel node takes it, and it is delivered; a non-peer's frame, and one for
/// another node's subnet, are still dropped. (The default, strict, drops the first as
/// `spoofed_source`: `hostile_frames`.)
#[test]
fn a_peer_may_speak_for_other_sources_when_the_check_is_relaxed() {
    let spec = ClusterSpec { agent_args: vec!["--inner-source-check=peer".into()], ..ClusterSpec::agents(Backend::Vxlan, "tc", 3) };
    let mut c = cluster("is", &spec);
    let evil_ip = Ipv4Addr::new(192, 168, 100, 98);
    let evil = ok("evil host", c.add_underlay_host("evil", evil_ip));
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    let (victim, port, mac) = (n1.container_ip(0), 9996, n1.vtep_mac);
    let vxlan_to_n1 = SocketAddrV4::new(n1.underlay_ip, 8472);
    let from_n2 = SocketAddrV4::new(n2.underlay_ip, 0);
    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
    let before = n1.counters();
    // Not a peer, and for another node's subnet: dropped as before.
    ok("send", send_udp(&evil, SocketAddrV4::new(evil_ip, 0), vxlan_to_n1, vec![vxlan_payload(0x08, 1, mac, n2.container_ip(0), victim, port)]));
    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, vec![vxlan_payload(0x08, 1, mac, n2.container_ip(0), n3.container_ip(0), port)]));
    let dropped = || {
        let now = n1.counters();
        now[Counter::UnknownPeer as usize] > before[Counter::UnknownPeer as usize] && now[Counter::NotLocalSubnet as usize] > before[Counter::NotLocalSubnet as usize]
    };
    assert!(wait_until(Duration::from_secs(10), dropped), "{:?}", n1.counters());
    // From a peer, with node 3's container as the inner source: delivered.
    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, vec![vxlan_payload(0x08, 1, mac, n3.container_ip(0), victim, port)]));
    let got = probe.finish_after_with_sources(1);
    assert_eq!(got.iter().map(|(from, _)| from.ip()).collect::<Vec<_>>(), vec![std::net::IpAddr::V4(n3.container_ip(0))], "{got:?}");
    assert_eq!(n1.counter(Counter::SpoofedSource), before[Counter::SpoofedSource as usize]);
}

#[test]
fn hostile_frames_are_dropped_and_counted_with_tc_decap() {
    hostile_frames("ht", "tc");
}

#[test]
fn hostile_frames_are_dropped_and_counted_with_xdp_decap() {
    hostile_frames("hx", "xdp");
}

/// One node set up as stock flannel's vxlan backend (kernel vxlan device, ARP, FDB and
/// routes) exchanges traffic both ways with nodes running our data plane.
#[test]
fn stock_flannel_vxlan_node_interoperates_both_ways() {
    let spec = ClusterSpec {
        backend: Backend::Vxlan,
        nodes: vec![
            NodeKind::Agent { decap_hook: "tc" },
            NodeKind::Agent { decap_hook: "xdp" },
            NodeKind::StockFlannel,
        ],
        ..ClusterSpec::agents(Backend::Vxlan, "tc", 3)
    };
    let c = cluster("sf", &spec);
    let (n1, n2, stock) = (c.node(1), c.node(2), c.node(3));
    for ours in [n1, n2] {
        ok("ours -> stock", ping(&ours.containers[0], stock.container_ip(0), 3));
        ok("stock -> ours", ping(&stock.containers[1], ours.container_ip(1), 3));
        ok("TCP ours -> stock", tcp_transfer(&ours.containers[0], &stock.containers[0], stock.container_ip(0), BULK));
        ok("TCP stock -> ours", tcp_transfer(&stock.containers[1], &ours.containers[1], ours.container_ip(1), BULK));
        let t = ours.peer_totals(stock.underlay_ip);
        assert!(t.rx_bytes >= BULK && t.tx_bytes >= BULK, "node {} traffic with the stock node not counted: {t:?}", ours.index);
    }
    // Host-to-container: the stock node's host sources from its flannel.1 address.
    ok("stock host -> our container", ping(&stock.ns, n1.container_ip(0), 2));
}

/// bpftool shows the route map with field names (the maps carry BTF).
#[test]
fn bpftool_dumps_the_route_map_with_field_names() {
    let c = cluster("bt", &ClusterSpec::agents(Backend::Vxlan, "tc", 2));
    let n1 = c.node(1);
    let path = n1.bpffs_dir.join("VTEP_BY_SUBNET");
    let out = ok(
        "bpftool",
        overlay_tests::run(std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&path)),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bpftool JSON: {e}\n{out}"));
    let entry = &v[0];
    assert_eq!(entry["formatted"]["key"]["prefix_len"], 24, "{out}");
    assert_eq!(entry["formatted"]["key"]["data"], serde_json::json!([10, 244, 2, 0]), "{out}");
    let ip = &entry["formatted"]["value"]["underlay_ip"];
    assert_eq!(ip, &serde_json::json!([192, 168, 100, 2]), "{out}");
    assert!(entry["formatted"]["value"]["vtep_mac"].is_array(), "{out}");
}

/// The typed route API keeps peer membership equal to "some route points at this address":
/// decap trusts exactly the peers that routes name.
#[test]
fn peers_follow_routes() {
    let spec = ClusterSpec { full_mesh: false, ..ClusterSpec::agents(Backend::Vxlan, "tc", 3) };
    let c = cluster("pr", &spec);
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    let peers = || -> Vec<Ipv4Addr> {
        overlay_agent::maps::Maps::open(&n1.bpffs_dir).and_then(|m| m.peer_totals()).expect("peers").keys().copied().collect()
    };
    assert!(peers().is_empty());
    let add = |subnet: &str, to: &overlay_tests::Node| {
        let mac = overlay_agent::netdev::format_mac(&to.vtep_mac);
        ok("route add", n1.agent_cli(&["route", "add", subnet, "--public-ip", &to.underlay_ip.to_string(), "--vtep-mac", &mac]));
    };
    add("10.244.2.0/24", n2);
    add("10.244.20.0/24", n2);
    assert_eq!(peers(), vec![n2.underlay_ip]);
    ok("route del", n1.agent_cli(&["route", "del", "10.244.20.0/24"]));
    assert_eq!(peers(), vec![n2.underlay_ip], "node 2 still has a route");
    // Re-pointing a subnet moves membership.
    add("10.244.2.0/24", n3);
    assert_eq!(peers(), vec![n3.underlay_ip], "node 2 lost its last route");
    ok("route del", n1.agent_cli(&["route", "del", "10.244.2.0/24"]));
    assert!(peers().is_empty());
    let err = n1.agent_cli(&["route", "del", "10.244.2.0/24"]).expect_err("deleting a missing route fails");
    assert!(format!("{err:#}").contains("no route for 10.244.2.0/24"), "{err:#}");
}

/// Nodes in different underlay subnets behind a router: the kernel resolves the outer next
/// hop (bpf_redirect_neigh), so encapsulated traffic crosses the router both ways.
#[test]
fn routed_underlay_carries_traffic_through_a_router() {
    let spec = ClusterSpec { routed_underlay: true, ..ClusterSpec::agents(Backend::Vxlan, "tc", 3) };
    let c = cluster("ru", &spec);
    let (n1, n2, n3) = (c.node(1), c.node(2), c.node(3));
    assert_ne!(n1.underlay_ip.octets()[2], n2.underlay_ip.octets()[2], "nodes must be in different subnets");
    ok("1 -> 2", ping(&n1.containers[0], n2.container_ip(0), 3));
    ok("3 -> 1", ping(&n3.containers[1], n1.container_ip(1), 3));
    ok("TCP 2 -> 3", tcp_transfer(&n2.containers[0], &n3.containers[0], n3.container_ip(0), BULK));
    assert!(n3.peer_totals(n2.underlay_ip).rx_bytes >= BULK);
    for n in &c.nodes {
        assert_eq!(n.counter(Counter::EncapFailed), 0, "node {}", n.index);
        assert_eq!(n.counter(Counter::EncapNotIpv4), 0, "node {}: the overlay device sends no IPv6", n.index);
    }
}

/// Set the TOS byte of the IPv4 header at `off` in `buf` and recompute its checksum.
fn set_tos(buf: &mut [u8], off: usize, tos: u8) {
    buf[off + 1] = tos;
    buf[off + 10..off + 12].copy_from_slice(&[0, 0]);
    let sum = ipv4_sum(&buf[off..off + 20]);
    buf[off + 10..off + 12].copy_from_slice(&(!sum).to_be_bytes());
}

/// The one's-complement sum of an IPv4 header, options included (0xffff when its checksum
/// is right): the test's own, independent of overlay-common's.
fn ipv4_sum(h: &[u8]) -> u16 {
    let mut sum: u32 = h.chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// RFC 6040 where our program decapsulates (`--decap-delivery stack`): a frame whose outer
/// header says congestion experienced delivers its ECN-capable inner packet marked CE (with a
/// valid header checksum), and drops a Not-ECT one, counted; an unmarked frame is delivered
/// as it was.
#[test]
fn congestion_marks_cross_native_decapsulation() {
    let spec = ClusterSpec {
        agent_args: vec!["--decap-delivery".into(), "stack".into()],
        ..ClusterSpec::agents(Backend::Vxlan, "tc", 2)
    };
    let c = cluster("ec", &spec);
    let (n1, n2) = (c.node(1), c.node(2));
    let n1_mac = ok("mac", overlay_tests::link_mac(&n1.ns, "eth0"));
    let port = 9996;
    let frame = |outer_tos: u8, inner_tos: u8| {
        let mut payload = vxlan_payload(0x08, 1, n1.vtep_mac, n2.container_ip(0), n1.container_ip(0), port);
        set_tos(&mut payload, 8 + 14, inner_tos);
        let mut f = raw_frame(n1_mac, n2.underlay_ip, n1.underlay_ip, 5, 0, 8472, &payload);
        set_tos(&mut f, 14, outer_tos);
        f
    };
    let (ect0, ce, dscp) = (0x02u8, 0x03u8, 0x28u8);
    let container = &n1.containers[0];
    let cap = ok("capture", Capture::start(container, "eth0", &format!("udp port {port}"), c.workdir.join("ecn.pcap")));
    let probe = ok("probe", UdpProbe::start(container, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
    let before = n1.counters();
    let frames = vec![frame(ce, dscp | ect0), frame(ce, dscp), frame(0, dscp)];
    ok("raw", overlay_tests::traffic::send_raw_frames(&n2.ns, "eth0", frames));
    assert_eq!(probe.finish_after(2), vec![b"hostile".to_vec(), b"hostile".to_vec()], "the marked ECT and the unmarked frame arrive");
    let got = ok("capture", cap.finish_when(|f| f.len() >= 2));
    assert_eq!(got.len(), 2, "exactly two datagrams reach the container");
    let tos: Vec<u8> = got.iter().map(|f| f[14 + 1]).collect();
    assert_eq!(tos, vec![dscp | ce, dscp], "CE passed on to the ECT packet; the unmarked one unchanged");
    for f in &got {
        assert_eq!(ipv4_sum(&f[14..34]), 0xffff, "the inner header checksum must stay valid");
    }
    let now = n1.counters();
    assert_eq!(now[Counter::CongestionNotEct as usize] - before[Counter::CongestionNotEct as usize], 1);
    assert_eq!(now[Counter::DecapNative as usize] - before[Counter::DecapNative as usize], 2);
}

/// `ping -M <pmtudisc> -s <size>` once from `from` to `dst`: whether a reply came, and what
/// ping printed (errors such as "Frag needed and DF set (mtu = N)" included).
fn ping_sized(from: &overlay_tests::Netns, dst: Ipv4Addr, pmtudisc: &str, size: u32) -> (bool, String) {
    let out = from
        .command("ping")
        .args(["-c", "1", "-W", "2", "-M", pmtudisc, "-s", &size.to_string(), &dst.to_string()])
        .output()
        .expect("running ping");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The underlay between two nodes has a smaller MTU (1300) than node 1's own link (1500), as
/// behind a VPN or a PPPoE hop. Node 1 sends a DF packet that fills its overlay MTU: the
/// outer header inherits DF, the router answers node 1 with fragmentation-needed, node 1
/// learns the path MTU, and the encap program then answers the container with
/// fragmentation-needed for the inner packet (1300 - 50): the container's next probe at that
/// size goes through, and TCP finds its segment size by itself. A fragmentable packet of the
/// full size leaves with a fragmentable outer header, the router fragments it, and node 2's
/// kernel reassembles it. Before, outer headers had DF=0 and ID 0 and node 2 dropped
/// fragments: both kinds were lost without a word.
/// Two nodes of `backend` behind a router whose link to node 2 (and node 2's own) has MTU
/// 1300; node 2's agent, restarted, sizes its overlay for it.
fn narrow_path_to_node_2(tag: &str, backend: Backend) -> Cluster {
    let spec = ClusterSpec { routed_underlay: true, ..ClusterSpec::agents(backend, "tc", 2) };
    let mut c = cluster(tag, &spec);
    ok("router mtu", overlay_tests::ip(&["-n", c.underlay.name(), "link", "set", "p2", "mtu", "1300"]));
    ok("node 2 mtu", overlay_tests::ip(&["-n", c.node(2).ns.name(), "link", "set", "eth0", "mtu", "1300"]));
    ok("restart node 2", c.restart_agent(2));
    c
}

/// DF pings of `size` from `from` until one is answered with fragmentation-needed saying
/// `mtu` (bounded: 30 s); the first probes are lost while the node learns the path MTU.
fn assert_told_mtu(from: &overlay_tests::Netns, dst: Ipv4Addr, size: u32, mtu: u32) {
    let mut last = String::new();
    let told = wait_until(Duration::from_secs(30), || {
        let (_, out) = ping_sized(from, dst, "do", size);
        let told = out.contains(&format!("mtu = {mtu}")) || out.contains(&format!("mtu={mtu}"));
        last = out;
        told
    });
    assert!(told, "the container was never told the tunnel's MTU; last ping said:\n{last}");
}

#[test]
fn a_smaller_path_mtu_is_discovered_end_to_end() {
    let c = narrow_path_to_node_2("pm", Backend::Vxlan);
    let (n1, n2) = (c.node(1), c.node(2));
    let dev_mtu = ok("flannel.1", overlay_tests::link_mtu(&n2.ns, "flannel.1"));
    assert_eq!(dev_mtu, 1250, "node 2's overlay MTU follows its smaller link");
    let (c1, dst) = (&n1.containers[0], n2.container_ip(0));
    ok("small ping", ping(c1, dst, 2));

    // Fragmentable and full-sized: fragmented by the router, reassembled by node 2's kernel.
    // (First: once the container has learnt the MTU below, its own stack fragments.)
    let reassembled = n2.counter(Counter::FragmentToKernel);
    let (answered, out) = ping_sized(c1, dst, "dont", 1450 - 28);
    assert!(answered, "a fragmentable full-sized packet must arrive:\n{out}");
    assert!(n2.counter(Counter::FragmentToKernel) > reassembled, "node 2 saw no fragment");

    // Fills node 1's overlay MTU (1450) with DF: until the path MTU is learnt the router
    // drops it; then the answer says 1250.
    let before = n1.counters();
    assert_told_mtu(c1, dst, 1450 - 28, 1250);
    let frag_needed = n1.counter(Counter::EncapFragNeeded) - before[Counter::EncapFragNeeded as usize];
    assert!(frag_needed >= 1, "node 1 counted no fragmentation-needed answer");
    let (answered, out) = ping_sized(c1, dst, "do", 1250 - 28);
    assert!(answered, "a DF probe of the announced size must pass:\n{out}");

    // TCP in both directions settles on segments that fit.
    ok("TCP 1 -> 2", tcp_transfer(c1, &n2.containers[1], n2.container_ip(1), 8 << 20));
    ok("TCP 2 -> 1", tcp_transfer(&n2.containers[0], &n1.containers[1], n1.container_ip(1), 8 << 20));
    for n in [n1, n2] {
        for drop in [Counter::EncapFailed, Counter::EncapTooBig, Counter::BadOuterHeader, Counter::Truncated] {
            assert_eq!(n.counter(drop), 0, "node {}: unexpected {}", n.index, drop.name());
        }
    }
}

/// ICMP checksum errors counted by the stack of `ns` (/proc/net/snmp's `Icmp: InCsumErrors`).
fn icmp_in_csum_errors(ns: &overlay_tests::Netns) -> u64 {
    let snmp = ok("snmp", ns.run("cat", &["/proc/net/snmp"]));
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (names, values) = (icmp.next().unwrap_or_default(), icmp.next().unwrap_or_default());
    let at = names.split_whitespace().position(|n| n == "InCsumErrors").expect("InCsumErrors in /proc/net/snmp");
    values.split_whitespace().nth(at).and_then(|v| v.parse().ok()).expect("a count")
}

/// The fragmentation-needed answer is built from the offending packet, whose checksum the
/// container's stack left to the device (CHECKSUM_PARTIAL: TCP over a veth). On the way back
/// a device without checksum offload completes that checksum in software (here node 1's
/// bridge port towards the container, with transmit checksumming off, as a VM-based
/// container's tap may have): the answer must still check, so that TCP learns the path MTU.
/// Before, the completion wrote into the quote after the ICMP checksum had been taken: the
/// container dropped every answer (InCsumErrors) and TCP through the narrow path stalled.
#[test]
fn a_frag_needed_answer_survives_a_software_checksum_on_the_way_back() {
    let c = narrow_path_to_node_2("pc", Backend::Vxlan);
    let (n1, n2) = (c.node(1), c.node(2));
    ok("transmit checksum in software", n1.ns.run("ethtool", &["-K", "veth0", "tx", "off"]));
    let c1 = &n1.containers[0];
    let (errors, answered) = (icmp_in_csum_errors(c1), n1.counter(Counter::EncapFragNeeded));
    let sent = tcp_transfer(c1, &n2.containers[0], n2.container_ip(0), 4 << 20);
    assert!(n1.counter(Counter::EncapFragNeeded) > answered, "node 1 answered no packet with fragmentation-needed");
    assert_eq!(icmp_in_csum_errors(c1) - errors, 0, "the container received fragmentation-needed answers with bad checksums");
    ok("TCP through the narrow path", sent);
}

/// The udp backend learns a smaller path MTU too: its datagrams leave from flannel's port,
/// which the agent holds (a socket that takes no data), so a router's fragmentation-needed
/// finds a socket and the kernel records the path MTU; the encap program then tells the
/// container (1300 - 28). Before, nothing listened there: the kernel dropped the router's
/// answer and DF packets of the full size vanished.
#[test]
fn a_smaller_path_mtu_is_learnt_by_the_udp_backend() {
    let c = narrow_path_to_node_2("pu", Backend::Udp);
    let (n1, n2) = (c.node(1), c.node(2));
    let (c1, dst) = (&n1.containers[0], n2.container_ip(0));
    ok("small ping", ping(c1, dst, 2));
    assert_told_mtu(c1, dst, 1472 - 28, 1272);
    let (answered, out) = ping_sized(c1, dst, "do", 1272 - 28);
    assert!(answered, "a DF probe of the announced size must pass:\n{out}");
    ok("TCP 1 -> 2", tcp_transfer(c1, &n2.containers[1], n2.container_ip(1), 4 << 20));
}

/// Containers that run a tunnel of their own (a VXLAN device between two containers on
/// different nodes, with the kernel's offloads, as a CNI-in-CNI or a VPN would) get their
/// encapsulated traffic carried inside ours, TCP included (GSO aggregates that already have
/// inner headers), with no encapsulation failure.
#[test]
fn a_containers_own_tunnel_is_carried() {
    let c = cluster("ne", &ClusterSpec::agents(Backend::Vxlan, "tc", 2));
    let (n1, n2) = (c.node(1), c.node(2));
    let (a, b) = (&n1.containers[0], &n2.containers[0]);
    let inner = |k: u8| Ipv4Addr::new(172, 30, 0, k);
    for (ns, local, remote, k) in [(a, n1.container_ip(0), n2.container_ip(0), 1), (b, n2.container_ip(0), n1.container_ip(0), 2)] {
        ok("vxlan in a container", ns.run("ip", &[
            "link", "add", "vx0", "type", "vxlan", "id", "42", "local", &local.to_string(), "remote",
            &remote.to_string(), "dstport", "4789", "dev", "eth0",
        ]));
        ok("address", ns.run("ip", &["addr", "add", &format!("{}/24", inner(k)), "dev", "vx0"]));
        ok("up", ns.run("ip", &["link", "set", "vx0", "mtu", "1400", "up"]));
    }
    ok("ping through both tunnels", ping(a, inner(2), 3));
    let before = n1.counters();
    ok("TCP through both tunnels", tcp_transfer(a, b, inner(2), 16 << 20));
    ok("TCP back", tcp_transfer(b, a, inner(1), 16 << 20));
    let now = n1.counters();
    let delta = |c: Counter| now[c as usize] - before[c as usize];
    assert!(delta(Counter::EncapToKernel) > 0, "the tunnelled packets go to the kernel device");
    assert_eq!(delta(Counter::EncapFailed), 0, "node 1 failed to encapsulate the containers' tunnel frames");
}

/// A container with BIG TCP (IPv4 GSO aggregates past 64 KiB, `gso_ipv4_max_size`): its
/// aggregates cannot carry 16-bit outer lengths, so the program leaves them to the kernel
/// device, which segments them first; the transfer arrives intact. (Before, the outer
/// lengths wrapped; a receiver that got such an aggregate whole would cut it short.)
#[test]
fn big_tcp_aggregates_are_carried() {
    let c = cluster("bt", &ClusterSpec::agents(Backend::Vxlan, "tc", 2));
    let (n1, n2) = (c.node(1), c.node(2));
    let a = &n1.containers[0];
    ok("BIG TCP", a.run("ip", &["link", "set", "dev", "eth0", "gso_max_size", "185000"]));
    ok("BIG TCP v4", overlay_tests::set_gso_ipv4_max_size(a, "eth0", 185000));
    let before = n1.counters();
    ok("TCP", tcp_transfer(a, &n2.containers[0], n2.container_ip(0), 64 << 20));
    let now = n1.counters();
    let delta = |c: Counter| now[c as usize] - before[c as usize];
    assert!(delta(Counter::EncapToKernel) > 0, "no aggregate past 64 KiB reached the encap program (or none was left to the kernel)");
    assert!(delta(Counter::Encapsulated) > 0);
    assert_eq!(delta(Counter::EncapFailed), 0);
}

/// `overlay-agent monitor` shows drops as they happen, with reason, hook and addresses: one
/// from the decap program (a peer's frame with another VNI, with the tunnel's and the inner
/// packet's addresses and ports) and one from the socket guard (a container sending tunnel
/// frames to its own node). A drop from before the monitor started was counted but never
/// queued; a packet sent towards a peer that no longer answers ARP shows as queued for an
/// unresolved next hop, with the peer; a drop the kernel makes past our programs (a firewall
/// rule) shows with the kernel's reason and is counted; the monitor stops cleanly on SIGTERM.
#[test]
fn monitor_streams_drops_as_they_happen() {
    use std::io::{BufRead as _, BufReader};
    let c = cluster("mo", &ClusterSpec::agents(Backend::Vxlan, "tc", 3));
    let (n1, n2) = (c.node(1), c.node(2));
    let vxlan_to_n1 = SocketAddrV4::new(n1.underlay_ip, 8472);
    let from_n2 = SocketAddrV4::new(n2.underlay_ip, 0);
    let (mac, victim, port) = (n1.vtep_mac, n1.container_ip(0), 9995);

    let spoofed = vxlan_payload(0x08, 1, mac, c.node(3).container_ip(0), victim, port);
    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, vec![spoofed]));
    assert!(wait_until(Duration::from_secs(10), || n1.counter(Counter::SpoofedSource) >= 1), "the spoofed frame was not counted");

    let bin = overlay_tests::agent_bin();
    let mut child = n1
        .ns
        .command(bin.to_str().unwrap())
        .args(["monitor", "--bpffs-dir"])
        .arg(&n1.bpffs_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting the monitor");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let tx2 = tx.clone();
    std::thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
    std::thread::spawn(move || BufReader::new(err).lines().map_while(Result::ok).for_each(|l| drop(tx2.send(format!("stderr: {l}")))));
    let mut lines = Vec::new();
    let next_line = |lines: &mut Vec<String>| -> Option<String> {
        let l = rx.recv_timeout(Duration::from_secs(15)).ok()?;
        lines.push(l.clone());
        Some(l)
    };
    while !next_line(&mut lines).is_some_and(|l| l.contains("listening")) {
        assert!(lines.len() < 50 && child.try_wait().unwrap().is_none(), "the monitor did not start: {lines:?}");
    }

    ok("send", send_udp(&n2.ns, from_n2, vxlan_to_n1, vec![vxlan_payload(0x08, 99, mac, n2.container_ip(0), victim, port)]));
    let from_container = SocketAddrV4::new(victim, 5555);
    ok("send", send_udp(&n1.containers[0], from_container, vxlan_to_n1, vec![vxlan_payload(0x08, 1, mac, n2.container_ip(0), victim, port)]));
    let wrong_vni = format!(
        "drop wrong_vni tc-ingress tunnel {} -> {} udp {}:40000 -> {victim}:{port}",
        n2.underlay_ip,
        n1.underlay_ip,
        n2.container_ip(0)
    );
    let guard = format!("drop foreign_tunnel socket-guard tunnel {victim} -> {} ports 5555 -> 8472", n1.underlay_ip);
    // Node 3 stops answering ARP and node 1 forgets its address: what node 1 sends there
    // waits for a next hop that never answers (and is lost in the neighbour layer), which the
    // monitor shows with the peer it was for.
    let n3 = c.node(3);
    ok("arp off", n3.ns.run("ip", &["link", "set", "eth0", "arp", "off"]));
    ok("forget node 3", n1.ns.run("ip", &["neigh", "flush", "to", &n3.underlay_ip.to_string(), "dev", "eth0"]));
    let unresolved_before = n1.counter(Counter::UnresolvedNextHop);
    let to_n3 = SocketAddrV4::new(n3.container_ip(0), 9994);
    ok("send", send_udp(&n1.containers[0], SocketAddrV4::new(victim, 5556), to_n3, vec![b"lost".to_vec()]));
    let queued = format!(
        "queued unresolved_next_hop tc-egress tunnel {} -> {} udp {victim}:5556 -> {to_n3}",
        n1.underlay_ip, n3.underlay_ip
    );
    // Past our programs: node 1's firewall drops what comes in on flannel.1 for port 9993.
    // The kernel's kfree_skb tracepoint sees it, named by the running kernel's own reason.
    ok("firewall", n1.ns.run("iptables", &["-w", "-I", "FORWARD", "1", "-i", "flannel.1", "-p", "udp", "--dport", "9993", "-j", "DROP"]));
    let n2c = SocketAddrV4::new(n2.container_ip(0), 5557);
    ok("send", send_udp(&n2.containers[0], n2c, SocketAddrV4::new(victim, 9993), vec![b"firewalled".to_vec()]));
    let kernel = format!("drop NETFILTER_DROP kernel dev flannel.1 udp {n2c} -> {victim}:9993");
    let seen = |lines: &[String], what: &str| lines.iter().any(|l| l.contains(what));
    while !(seen(&lines, &wrong_vni) && seen(&lines, &guard) && seen(&lines, &queued) && seen(&lines, &kernel)) {
        if next_line(&mut lines).is_none() {
            break;
        }
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("monitor exit");
    assert!(seen(&lines, &wrong_vni), "expected a line with {wrong_vni:?} in {lines:#?}");
    assert!(seen(&lines, &guard), "expected a line with {guard:?} in {lines:#?}");
    assert!(seen(&lines, &queued), "expected a line with {queued:?} in {lines:#?}");
    assert!(n1.counter(Counter::UnresolvedNextHop) > unresolved_before, "unresolved_next_hop did not move");
    assert!(seen(&lines, &kernel), "expected a line with {kernel:?} in {lines:#?}");
    assert!(!seen(&lines, "spoofed_source"), "a drop from before the monitor was queued: {lines:#?}");
    // Counted by reason and device; our own programs' drops (the spoofed frame, the wrong
    // VNI: TC_ACT_SHOT) are theirs to count, not counted again as the kernel's.
    let reasons = overlay_agent::datapath::kernel_drops::reasons();
    let counts = ok("kernel drops", overlay_agent::datapath::kernel_drops::counts(&n1.bpffs_dir));
    let named: Vec<(String, u32, u64)> =
        counts.iter().map(|(k, v)| (overlay_agent::datapath::kernel_drops::reason_name(reasons, k.reason), k.ifindex, *v)).collect();
    let link = ok("ifindex", n1.ns.run("ip", &["-o", "link", "show", "flannel.1"]));
    let flannel1: u32 = link.split(':').next().and_then(|i| i.trim().parse().ok()).unwrap_or_else(|| panic!("no ifindex in {link:?}"));
    assert!(named.iter().any(|(r, i, v)| r == "NETFILTER_DROP" && *i == flannel1 && *v >= 1), "{named:?}");
    assert!(!named.iter().any(|(r, _, _)| r.starts_with("TC_")), "our own drops counted again: {named:?}");
    assert!(status.success(), "the monitor should stop cleanly on SIGTERM: {status:?}");
}

/// `--decap-delivery stack`: our program decapsulates every frame and hands it to the overlay
/// device (the kernel's vxlan device gets none), and traffic still flows.
#[test]
fn stack_delivery_goes_through_the_overlay_device() {
    let spec = ClusterSpec {
        agent_args: vec!["--decap-delivery".into(), "stack".into()],
        ..ClusterSpec::agents(Backend::Vxlan, "tc", 2)
    };
    let c = cluster("sk", &spec);
    let (n1, n2) = (c.node(1), c.node(2));
    let flags = n2.config_flags();
    assert_eq!(flags & overlay_common::config_flags::KERNEL_DECAP, 0, "config flags {flags:#x}");
    ok("ping", ping(&n1.containers[0], n2.container_ip(0), 3));
    ok("TCP", tcp_transfer(&n1.containers[0], &n2.containers[1], n2.container_ip(1), 8 << 20));
    let all = n2.counter(Counter::Decapsulated);
    assert!(all > 0);
    assert_eq!(n2.counter(Counter::DecapNative), all, "stack delivery decapsulates every frame itself");
}

/// A tunnel frame that would pass every check on the underlay, sent to node 1's tunnel port
/// from anywhere else (a local container, to the node's underlay address and to its bridge;
/// the node itself over loopback; a host behind a second interface of the node) is dropped
/// by the socket guard and counted as `foreign_tunnel`: the kernel's vxlan socket, which
/// listens on every address, never decapsulates it. The same frame from the peer over the
/// underlay is delivered, so the interface is what stops the others.
fn tunnel_frames_from_elsewhere(tag: &str, hook: &'static str, guard: &str, no_nft: bool) {
    // A host without nft's tool: the guard's firewall form is an iptables chain.
    let no_nft_path = no_nft.then(|| ok("PATH", overlay_tests::PathWithoutNft::new()));
    let spec = ClusterSpec {
        agent_args: vec![format!("--guard={guard}")],
        agent_env: no_nft_path.iter().map(|p| ("PATH".to_string(), p.path.clone())).collect(),
        ..ClusterSpec::agents(Backend::Vxlan, hook, 2)
    };
    let mut c = cluster(tag, &spec);
    let (side, side_gw, side_ip) = ok("side host", c.add_side_host(1, "side"));
    let (n1, n2) = (c.node(1), c.node(2));
    let probe_port = 9999;
    let frame = vxlan_payload(0x08, 1, n1.vtep_mac, n2.container_ip(0), n1.container_ip(0), probe_port);
    let gateway = Ipv4Addr::from(u32::from(n1.subnet.network()) + 1);
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let port = |ip| SocketAddrV4::new(ip, 8472);

    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, probe_port)));
    let before = n1.counters();
    let rx_before = n1.link_stat("flannel.1", "rx", "packets");
    let sends: [(&str, &overlay_tests::Netns, SocketAddrV4, SocketAddrV4); 6] = [
        ("container -> node underlay address", &n1.containers[1], any, port(n1.underlay_ip)),
        ("container -> its bridge address", &n1.containers[1], any, port(gateway)),
        ("node -> 127.0.0.1", &n1.ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), port(Ipv4Addr::LOCALHOST)),
        ("node -> its own underlay address", &n1.ns, SocketAddrV4::new(n1.underlay_ip, 0), port(n1.underlay_ip)),
        ("second interface -> node underlay address", &side, SocketAddrV4::new(side_ip, 0), port(n1.underlay_ip)),
        ("second interface -> its address there", &side, SocketAddrV4::new(side_ip, 0), port(side_gw)),
    ];
    let status = ok("status", n1.agent_cli(&["status"]));
    assert!(status.contains(&format!("guard={}", guard.replace('-', "_"))), "{status}");
    // Where the guard's program cannot run (forced here), its firewall rule drops instead:
    // nftables where nft is (before defragmentation), else iptables; counted by the rules.
    if guard == "firewall" {
        let nft = n1.ns.run("nft", &["list", "table", "ip", "overlay-guard"]);
        let chain = n1.ns.run("iptables", &["-w", "-S", "OVERLAY-GUARD"]);
        assert_eq!((nft.is_ok(), chain.is_ok()), (!no_nft, no_nft), "the guard's form: nft {nft:?}, iptables {chain:?}");
    }
    let fw_before = n1.firewall_guard_drops();
    let guarded = || match guard {
        "firewall" => n1.firewall_guard_drops() - fw_before,
        _ => n1.counter(Counter::ForeignTunnel) - before[Counter::ForeignTunnel as usize],
    };
    for (k, (what, ns, from, to)) in sends.iter().enumerate() {
        ok(what, send_udp(ns, *from, *to, vec![frame.clone()]));
        let k = k as u64 + 1;
        assert!(wait_until(Duration::from_secs(10), || guarded() >= k), "{what}: not counted as foreign_tunnel");
        assert_eq!(guarded(), k, "{what}: counted more than once");
    }
    let n = sends.len() as u64;
    assert_eq!(n1.counter(Counter::Decapsulated), before[Counter::Decapsulated as usize], "nothing foreign was checked as a tunnel frame");
    assert_eq!(n1.link_stat("flannel.1", "rx", "packets"), rx_before, "the kernel's vxlan device decapsulated a foreign frame");

    // Control: the same frame from the peer over the underlay arrives, and only it.
    ok("send", send_udp(&n2.ns, SocketAddrV4::new(n2.underlay_ip, 0), port(n1.underlay_ip), vec![frame.clone()]));
    assert_eq!(probe.finish_after(1), vec![b"hostile".to_vec()], "the underlay frame, and no foreign one, reaches the container");
    assert_eq!(guarded(), n, "the underlay frame passed the guard");
    // Other UDP from a container to the node passes the guard.
    let plain = ok("probe", UdpProbe::start(&n1.ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9000)));
    ok("send", send_udp(&n1.containers[1], any, SocketAddrV4::new(gateway, 9000), vec![b"plain".to_vec()]));
    assert_eq!(plain.finish_after(1), vec![b"plain".to_vec()], "UDP to another port of the node must pass");
}

#[test]
fn tunnel_frames_from_elsewhere_than_the_underlay_are_dropped_with_tc_decap() {
    tunnel_frames_from_elsewhere("gt", "tc", "sk-lookup", false);
}

#[test]
fn tunnel_frames_from_elsewhere_than_the_underlay_are_dropped_with_xdp_decap() {
    tunnel_frames_from_elsewhere("gx", "xdp", "sk-lookup", false);
}

/// Kernels before 5.17 cannot run the guard's program (no `ingress_ifindex`): its rule in
/// the firewall (forced here) drops the same frames, in nftables and, on a host without nft,
/// in iptables.
#[test]
fn tunnel_frames_from_elsewhere_are_dropped_by_the_firewall_guard() {
    tunnel_frames_from_elsewhere("gf", "tc", "firewall", false);
    tunnel_frames_from_elsewhere("gi", "tc", "firewall", true);
}

/// Packets the (one) tc filter action on node `n`'s eth0 ingress has seen.
fn legacy_filter_packets(n: &overlay_tests::Node) -> u64 {
    let out = ok("tc -s filter show", n.ns.run("tc", &["-s", "filter", "show", "dev", "eth0", "ingress"]));
    out.split("Sent ")
        .nth(1)
        .and_then(|r| r.split(" pkt").next())
        .and_then(|r| r.split_whitespace().last())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in:\n{out}"))
}

/// The decap program shares the underlay with whatever else the host attaches: what it does
/// not take for itself (ordinary traffic, and checked tunnel frames it leaves to the kernel's
/// vxlan device) goes on to the programs and tc filters attached after it (TCX_NEXT), where
/// TC_ACT_OK would have ended the chain.
#[test]
fn frames_we_do_not_take_reach_the_tc_filters_after_ours() {
    let c = cluster("tn", &ClusterSpec::agents(Backend::Vxlan, "tc", 2));
    let (n1, n2) = (c.node(1), c.node(2));
    // A legacy tc filter after our TCX program that counts every frame: u32 matching all,
    // mirroring a copy to a spare veth (the kernels here have u32 and mirred, not matchall).
    ok("veth", n1.ns.run("ip", &["link", "add", "mir0", "type", "veth", "peer", "name", "mir1"]));
    for dev in ["mir0", "mir1"] {
        ok("up", n1.ns.run("ip", &["link", "set", dev, "up"]));
    }
    ok("clsact", n1.ns.run("tc", &["qdisc", "add", "dev", "eth0", "clsact"]));
    ok("filter", n1.ns.run("tc", &[
        "filter", "add", "dev", "eth0", "ingress", "protocol", "all", "u32", "match", "u32", "0", "0",
        "action", "mirred", "egress", "mirror", "dev", "mir0",
    ]));
    let seen = legacy_filter_packets(n1);
    ok("underlay ping", ping(&n2.ns, n1.underlay_ip, 3));
    assert!(legacy_filter_packets(n1) >= seen + 3, "ordinary underlay traffic never reached the tc filter");
    let (seen, decap) = (legacy_filter_packets(n1), n1.counter(Counter::Decapsulated));
    ok("overlay ping", ping(&n2.containers[0], n1.container_ip(0), 3));
    assert!(n1.counter(Counter::Decapsulated) >= decap + 3, "our program checked the tunnel frames first");
    assert!(legacy_filter_packets(n1) >= seen + 3, "checked tunnel frames never reached the tc filter");
}

/// Tunnel frames from a peer addressed to another host (a node that forwards, a promiscuous
/// NIC) are not decapsulated by us: they pass on untouched. Frames to another of the node's
/// own addresses are kept from the kernel's vxlan socket by the guard. Both with stack
/// delivery, where the program itself would otherwise open them.
#[test]
fn tunnel_frames_for_other_addresses_are_left_alone() {
    let spec = ClusterSpec {
        agent_args: vec!["--decap-delivery".into(), "stack".into()],
        ..ClusterSpec::agents(Backend::Vxlan, "tc", 2)
    };
    let c = cluster("oa", &spec);
    let (n1, n2) = (c.node(1), c.node(2));
    let n1_mac = ok("mac", overlay_tests::link_mac(&n1.ns, "eth0"));
    let port = 9996;
    let payload = vxlan_payload(0x08, 1, n1.vtep_mac, n2.container_ip(0), n1.container_ip(0), port);
    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
    let before = n1.counters();
    // To node 1's MAC, for an address that is not node 1's.
    let elsewhere = raw_frame(n1_mac, n2.underlay_ip, Ipv4Addr::new(192, 168, 100, 77), 5, 0, 8472, &payload);
    ok("raw", overlay_tests::traffic::send_raw_frames(&n2.ns, "eth0", vec![elsewhere]));
    // To a second address of node 1's.
    let second = Ipv4Addr::new(192, 168, 100, 201);
    ok("address", n1.ns.run("ip", &["addr", "add", &format!("{second}/32"), "dev", "eth0"]));
    ok("send", send_udp(&n2.ns, SocketAddrV4::new(n2.underlay_ip, 0), SocketAddrV4::new(second, 8472), vec![payload.clone()]));
    let guarded = || n1.counter(Counter::ForeignTunnel) - before[Counter::ForeignTunnel as usize];
    assert!(wait_until(Duration::from_secs(10), || guarded() >= 1), "the frame to the second address was not stopped by the guard");
    assert_eq!(n1.counter(Counter::Decapsulated), before[Counter::Decapsulated as usize], "a frame for another address was decapsulated");
    // Control: the same payload to node 1's underlay address is delivered, and only it.
    ok("send", send_udp(&n2.ns, SocketAddrV4::new(n2.underlay_ip, 0), SocketAddrV4::new(n1.underlay_ip, 8472), vec![payload]));
    assert_eq!(probe.finish_after(1), vec![b"hostile".to_vec()], "only the frame for node 1's own address reaches the container");
    assert_eq!(guarded(), 1);
}

/// `status` asks the kernel, not the pin files: a link detached behind the agent's back (its
/// pin still there) is reported detached, one piece at a time, and status fails.
#[test]
fn status_reports_links_detached_behind_their_pins() {
    let spec = ClusterSpec { containers_per_node: 0, ..ClusterSpec::agents(Backend::Vxlan, "tc", 1) };
    let c = cluster("sl", &spec);
    let n = c.node(1);
    let status = || {
        let out = n
            .ns
            .command(overlay_tests::agent_bin().to_str().unwrap())
            .args(["status", "--bpffs-dir"])
            .arg(&n.bpffs_dir)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let (up, line) = status();
    assert!(up && line.contains("encap=attached decap=tc attach=tcx guard=sk_lookup"), "{line}");
    let detach = |pin: &str| {
        let path = n.bpffs_dir.join(pin);
        ok(pin, n.ns.run("bpftool", &["link", "detach", "pinned", path.to_str().unwrap()]));
        assert!(path.exists(), "the pin stays");
    };
    detach(overlay_agent::dataplane::LINK_ENCAP);
    let (up, line) = status();
    assert!(!up && line.contains("encap=detached decap=tc"), "{line}");
    detach(overlay_agent::dataplane::LINK_DECAP_TC);
    let (up, line) = status();
    assert!(!up && line.contains("decap=- attach=-"), "{line}");
    detach(overlay_agent::dataplane::LINK_GUARD);
    let (up, line) = status();
    assert!(!up && line.contains("guard=detached"), "{line}");
}

/// A peer whose underlay address the node routes through another interface (a second NIC)
/// gets its tunnel frames there, where the routing table (and flannel's device) sends them,
/// instead of losing them to a route lookup pinned to the underlay interface.
#[test]
fn a_peer_routed_through_another_interface_gets_its_frames() {
    let spec = ClusterSpec { containers_per_node: 1, ..ClusterSpec::agents(Backend::Vxlan, "tc", 1) };
    let mut c = cluster("fo", &spec);
    let (side, _, side_host) = ok("second interface", c.add_side_host(1, "side"));
    let n = c.node(1);
    // The peer 172.31.9.9 is reached through the second interface only.
    let peer = Ipv4Addr::new(172, 31, 9, 9);
    ok("route", n.ns.run("ip", &["route", "add", &format!("{peer}/32"), "via", &side_host.to_string(), "dev", "side0"]));
    ok(
        "overlay route",
        n.agent_cli(&["route", "add", "10.244.77.0/24", "--public-ip", &peer.to_string(), "--vtep-mac", "02:00:00:00:77:01"]),
    );
    let cap = ok("capture", Capture::start(&side, "eth0", &format!("udp dst port 8472 and dst host {peer}"), c.workdir.join("side.pcap")));
    let before = n.counter(Counter::NoUnderlayRoute);
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 244, 77, 2), 9);
    let frames = ok(
        "frames",
        cap.finish_when(|f| {
            let _ = send_udp(&n.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), to, vec![vec![7u8; 32]]);
            !f.is_empty()
        }),
    );
    assert!(
        !frames.is_empty(),
        "no tunnel frame for {peer} left through the second interface:\n{}\n{}",
        n.agent_cli(&["stats"]).unwrap_or_default(),
        n.ns.run("ip", &["route"]).unwrap_or_default()
    );
    assert_eq!(n.counter(Counter::NoUnderlayRoute) - before, 0, "counted as having no underlay route");
    let sliced = SlicedPacket::from_ethernet(&frames[0]).expect("a frame");
    match sliced.net {
        Some(NetSlice::Ipv4(ip)) => assert_eq!(ip.header().destination_addr(), peer),
        other => panic!("not IPv4: {other:?}"),
    }
}

/// The udp backend carries packets a container has already tunnelled itself (its own vxlan
/// device, segmentation off so its packets come one by one, checksums left to offload: the
/// kernel marks them as encapsulated), where encapsulation used to be refused (`encap_failed`).
#[test]
fn udp_backend_carries_a_containers_own_tunnel() {
    let c = cluster("ut", &ClusterSpec { containers_per_node: 1, ..ClusterSpec::agents(Backend::Udp, "tc", 2) });
    let (n1, n2) = (c.node(1), c.node(2));
    let (c1, c2) = (&n1.containers[0], &n2.containers[0]);
    for (ns, local, remote, inner) in [(c1, n1.container_ip(0), n2.container_ip(0), "172.30.0.1/30"), (c2, n2.container_ip(0), n1.container_ip(0), "172.30.0.2/30")] {
        let (local, remote) = (local.to_string(), remote.to_string());
        ok("vxlan in a container", ns.run("ip", &["link", "add", "vx0", "type", "vxlan", "id", "42", "local", &local, "remote", &remote, "dstport", "4789", "dev", "eth0"]));
        ok("mtu", ns.run("ip", &["link", "set", "vx0", "mtu", "1300", "up"]));
        ok("address", ns.run("ip", &["addr", "add", inner, "dev", "vx0"]));
        ok("one by one", ns.run("ethtool", &["-K", "vx0", "tso", "off", "gso", "off"]));
    }
    let failed_before = n1.counter(Counter::EncapFailed);
    ok("ping through the container's tunnel", ping(c1, Ipv4Addr::new(172, 30, 0, 2), 3));
    ok("TCP through the container's tunnel", tcp_transfer(c1, c2, Ipv4Addr::new(172, 30, 0, 2), 256 * 1024));
    assert_eq!(n1.counter(Counter::EncapFailed) - failed_before, 0, "node 1 refused some of the container's tunnel packets");
}
