//! Dual stack as flannel runs it (`EnableIPv6`, `IPv6Network`): each node leases an IPv4 and
//! an IPv6 subnet under one key (`10.244.1.0-24&fd00:10:244:1::-64`), names its public IPv6
//! address and `flannel-v6.<VNI>`'s MAC in the lease, writes FLANNEL_IPV6_* to its subnet
//! file, masquerades with ip6tables, and carries IPv6 containers' traffic in VXLAN over the
//! IPv6 underlay, with a stock flannel dual-stack node (set up by hand as flannel sets itself
//! up) both ways. Nodes as the seed's: strict rp_filter, docker's FORWARD DROP (IPv4 and
//! IPv6).

use std::{net::Ipv6Addr, time::Duration};

use ipnet::Ipv6Net;
use overlay_common::Counter;
use overlay_tests::{
    link_mac, require_root,
    traffic::{ping, ping6, tcp_transfer, tcp_transfer6, UdpProbe},
    underlay_ipv6, wait_until, Backend, Cluster, ClusterSpec, Control, Node, NodeKind, UNDERLAY_MTU,
};

const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const BULK: u64 = 4 << 20;
/// The IPv6 overlay's MTU: the underlay's less VXLAN over IPv6 (70 bytes).
const MTU6: u32 = UNDERLAY_MTU - 70;

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// The IPv6 subnet a node's subnet file names (FLANNEL_IPV6_SUBNET, its first address).
fn subnet6_of(node: &Node) -> Ipv6Net {
    let text = std::fs::read_to_string(&node.subnet_file).expect("subnet file");
    let line = text.lines().find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET=")).unwrap_or_else(|| panic!("no FLANNEL_IPV6_SUBNET in:\n{text}"));
    line.parse::<Ipv6Net>().expect("an IPv6 CIDR").trunc()
}

fn host(net: Ipv6Net, i: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + i)
}

/// docker0 gets the subnet's first IPv6 address, container k the (k+2)th, routed via docker0.
fn add_ipv6_containers(node: &Node, subnet6: Ipv6Net) {
    let n = node.ns.name();
    let gw = host(subnet6, 1);
    ok("docker0 v6", node.ns.run("ip", &["addr", "add", &format!("{gw}/64"), "dev", "docker0", "nodad"]));
    for (k, c) in node.containers.iter().enumerate() {
        let a = host(subnet6, k as u128 + 2);
        ok("container v6", c.run("ip", &["addr", "add", &format!("{a}/64"), "dev", "eth0", "nodad"]));
        ok("container v6 route", c.run("ip", &["-6", "route", "add", "default", "via", &gw.to_string(), "mtu", &MTU6.to_string()]));
    }
    let _ = n;
}

/// The stock node's IPv6 side, as flannel's vxlan backend makes it: flannel-v6.1 bound to its
/// public IPv6 address, the subnet's network address as a /128.
fn stock_ipv6_device(stock: &Node, subnet6: Ipv6Net) -> [u8; 6] {
    let ul6 = underlay_ipv6(stock.index).to_string();
    ok("stock flannel-v6.1", stock.ns.run("ip", &["link", "add", "flannel-v6.1", "type", "vxlan", "id", "1", "local", &ul6, "dev", "eth0", "dstport", "8472", "nolearning"]));
    ok("mtu", stock.ns.run("ip", &["link", "set", "flannel-v6.1", "mtu", &MTU6.to_string(), "up"]));
    ok("addr", stock.ns.run("ip", &["addr", "add", &format!("{}/128", subnet6.network()), "dev", "flannel-v6.1", "nodad"]));
    ok("v6 forwarding", stock.ns.sysctl("net.ipv6.conf.all.forwarding", "1"));
    ok("mac", link_mac(&stock.ns, "flannel-v6.1"))
}

/// What flannel on the stock node does for a dual-stack peer: route via the peer subnet's
/// network address onlink, a permanent neighbour with the peer's v6 VtepMAC, an FDB entry to
/// its public IPv6 address.
fn stock_route6_to(stock: &Node, peer: &Node, subnet6: Ipv6Net) {
    let mac = overlay_agent::netdev::format_mac(&ok("peer v6 mac", link_mac(&peer.ns, "flannel-v6.1")));
    let gw = subnet6.network().to_string();
    ok("neigh", stock.ns.run("ip", &["-6", "neigh", "replace", &gw, "lladdr", &mac, "dev", "flannel-v6.1", "nud", "permanent"]));
    ok("fdb", stock.ns.run("bridge", &["fdb", "replace", &mac, "dev", "flannel-v6.1", "dst", &underlay_ipv6(peer.index).to_string(), "self", "permanent"]));
    ok("route", stock.ns.run("ip", &["-6", "route", "replace", &subnet6.to_string(), "via", &gw, "dev", "flannel-v6.1", "onlink"]));
}

/// An Ethernet frame carrying IPv6 from `src` to `dst` with a destination-options header
/// before UDP to port 8472 and a VXLAN header.
fn ext_header_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    let payload_len: u16 = 8 + 8 + 8;
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&payload_len.to_be_bytes());
    f.extend_from_slice(&[60, 64]); // next: destination options; hop limit
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]); // next: UDP; 8 bytes; PadN
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&8472u16.to_be_bytes());
    f.extend_from_slice(&16u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]); // VXLAN, VNI 1
    f
}

/// A VXLAN-over-IPv6 tunnel frame as a stock node's flannel-v6 sends it (valid UDP checksums
/// outside and inside, which IPv6 requires), from `from` to `to`'s underlay, carrying a UDP
/// datagram with `body` from `src` to `dst`:`port` addressed to `to`'s VtepMAC. Returned as
/// the outer Ethernet header and the outer IPv6 payload (the UDP datagram), for `ipv6_frames`.
fn vxlan6_datagram(from: &Node, to: &Node, src: Ipv6Addr, dst: Ipv6Addr, port: u16, body: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let inner_b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 7], ok("mac", link_mac(&to.ns, "flannel-v6.1")))
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(40000, port);
    let mut inner = Vec::new();
    inner_b.write(&mut inner, body).expect("inner frame");
    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vx.extend_from_slice(&inner);
    let outer_b = etherparse::PacketBuilder::ethernet2(ok("mac", link_mac(&from.ns, "eth0")), ok("mac", link_mac(&to.ns, "eth0")))
        .ipv6(underlay_ipv6(from.index).octets(), underlay_ipv6(to.index).octets(), 64)
        .udp(50000, 8472);
    let mut outer = Vec::new();
    outer_b.write(&mut outer, &vx).expect("outer frame");
    let (head, datagram) = outer.split_at(14 + 40);
    (head.to_vec(), datagram.to_vec())
}

/// Frames of that datagram: behind the extension headers `ext` (type, body after the
/// next-header byte) and, with `frag = Some((first, id))`, split into a first fragment of
/// `first` bytes and the rest (each behind a fragment header with `id`).
fn ipv6_frames(head: &[u8], datagram: &[u8], ext: &[(u8, Vec<u8>)], frag: Option<(usize, u32)>) -> Vec<Vec<u8>> {
    let frame = |ext: &[(u8, Vec<u8>)], data: &[u8]| {
        let mut chain = Vec::new();
        for (i, (_, body)) in ext.iter().enumerate() {
            chain.push(ext.get(i + 1).map_or(17, |(t, _)| *t));
            chain.extend_from_slice(body);
        }
        let mut f = head.to_vec();
        f[14 + 4..14 + 6].copy_from_slice(&((chain.len() + data.len()) as u16).to_be_bytes());
        f[14 + 6] = ext.first().map_or(17, |(t, _)| *t);
        f.extend_from_slice(&chain);
        f.extend_from_slice(data);
        f
    };
    let Some((first, id)) = frag else { return vec![frame(ext, datagram)] };
    let header = |offset: usize, more: bool| {
        let mut b = vec![0];
        b.extend_from_slice(&(offset as u16 | more as u16).to_be_bytes());
        b.extend_from_slice(&id.to_be_bytes());
        (44u8, b)
    };
    let with = |h: (u8, Vec<u8>)| [ext.to_vec(), vec![h]].concat();
    vec![frame(&with(header(0, true)), &datagram[..first]), frame(&with(header(first, false)), &datagram[first..])]
}

/// A destination-options header of `len` bytes (PadN), as `ipv6_frames` takes it.
fn dest_opts(len: usize) -> (u8, Vec<u8>) {
    let mut b = vec![(len / 8 - 1) as u8, 1, (len - 4) as u8];
    b.resize(len - 1, 0);
    (60, b)
}

/// The IPv6 routes through `node`'s flannel-v6.1.
fn v6_routes(node: &Node) -> String {
    node.ns.run("ip", &["-6", "route", "show", "dev", "flannel-v6.1"]).unwrap_or_default()
}

/// Wait until `node` routes each of `subnets` through flannel-v6.1 as flannel does (via the
/// subnet's network address); fail with its routes and log if it does not within 10 s.
fn wait_for_v6_routes(node: &Node, subnets: &[Ipv6Net]) {
    assert!(
        wait_until(Duration::from_secs(10), || subnets.iter().all(|s| v6_routes(node).contains(&format!("{s} via {}", s.network())))),
        "node {} IPv6 routes: {}\nlog:\n{}",
        node.index,
        v6_routes(node),
        node.log_text()
    );
}

#[test]
fn dual_stack_nodes_carry_ipv6_both_ways_with_a_stock_flannel_node() {
    require_root();
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "tc" }, NodeKind::Agent { decap_hook: "xdp" }, NodeKind::StockFlannel],
        control: Control::Etcd { tls: false, config: CONFIG.into() },
        agent_args: vec!["--ip-masq".into()],
        ipv6_underlay: true,
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 3)
    };
    let mut c = Cluster::new("ds", &spec).unwrap_or_else(|e| panic!("building the cluster failed: {e:#}"));
    // A host on the underlay that is no peer (used at the end).
    let rogue = ok("rogue host", c.add_underlay_host("rogue6", "192.168.100.99".parse().unwrap()));
    let (n1, n2, stock) = (c.node(1), c.node(2), c.node(3));
    let etcd = c.etcd();

    // Our leases: both subnets in the key, PublicIPv6 and flannel-v6.1's MAC in the value;
    // the subnet file names the IPv6 network and subnet.
    let mut sub6 = Vec::new();
    for n in [n1, n2] {
        let s6 = subnet6_of(n);
        assert!("fd00:10:244::/56".parse::<Ipv6Net>().unwrap().contains(&s6) && s6.prefix_len() == 64, "{s6}");
        let key = format!("/coreos.com/network/subnets/{}-24&{}-64", n.subnet.network(), s6.network());
        let value = ok("etcdctl get", etcd.etcdctl(&["get", &key, "--print-value-only"]));
        let v: serde_json::Value = serde_json::from_str(value.trim()).unwrap_or_else(|e| panic!("lease {key}: {e}: {value:?}"));
        assert_eq!(v["PublicIPv6"], underlay_ipv6(n.index).to_string(), "{value}");
        let mac6 = overlay_agent::netdev::format_mac(&ok("mac", link_mac(&n.ns, "flannel-v6.1")));
        assert_eq!(v["BackendV6Data"]["VtepMAC"], mac6, "{value}");
        assert_eq!(v["BackendData"]["VtepMAC"], overlay_agent::netdev::format_mac(&n.vtep_mac), "{value}");
        let file = std::fs::read_to_string(&n.subnet_file).unwrap();
        assert!(file.contains("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"), "{file}");
        // flannel's ip6tables masquerade and forward rules.
        let masq = ok("ip6tables", n.ns.run("ip6tables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]));
        assert!(masq.contains(&format!("-s {s6} -d fd00:10:244::/56")), "{masq}");
        assert!(
            masq.lines().any(|l| l.starts_with("-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8") && l.contains("-j MASQUERADE")),
            "{masq}"
        );
        let fwd = ok("ip6tables", n.ns.run("ip6tables", &["-S", "FLANNEL-FWD"]));
        assert!(fwd.contains("-s fd00:10:244::/56") && fwd.contains("-j ACCEPT"), "{fwd}");
        // docker's FORWARD DROP, both families: flannel's forward rules let the overlay pass.
        ok("policy", n.ns.run("iptables", &["-w", "-P", "FORWARD", "DROP"]));
        ok("policy6", n.ns.run("ip6tables", &["-w", "-P", "FORWARD", "DROP"]));
        add_ipv6_containers(n, s6);
        sub6.push(s6);
    }
    assert_ne!(sub6[0], sub6[1], "no two nodes may hold the same IPv6 subnet");

    // The stock node, dual stack by hand: its device, its lease rewritten as flannel writes a
    // dual-stack one, its routes to ours.
    let stock6: Ipv6Net = "fd00:10:244:67::/64".parse().unwrap();
    let stock_mac6 = stock_ipv6_device(stock, stock6);
    add_ipv6_containers(stock, stock6);
    let old_key = format!("/coreos.com/network/subnets/{}-24", stock.subnet.network());
    let key = format!("{old_key}&{}-64", stock6.network());
    let value = format!(
        r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
        stock.underlay_ip,
        underlay_ipv6(stock.index),
        overlay_agent::netdev::format_mac(&stock.vtep_mac),
        overlay_agent::netdev::format_mac(&stock_mac6)
    );
    ok("delete the stock node's IPv4-only lease", etcd.etcdctl(&["del", &old_key]));
    ok("put its dual-stack lease", etcd.etcdctl(&["put", &key, &value]));
    for (i, n) in [n1, n2].into_iter().enumerate() {
        c.add_route(stock, n).unwrap();
        stock_route6_to(stock, n, sub6[i]);
    }

    // Our nodes route each other's and the stock node's IPv6 subnets through flannel-v6.1.
    for (i, n) in [n1, n2].into_iter().enumerate() {
        wait_for_v6_routes(n, &[sub6[1 - i], stock6]);
    }
    // And the IPv4 overlay still carries, to the stock node too.
    ok("v4 ours -> stock", ping(&n1.containers[0], stock.container_ip(0), 2));
    ok("v4 ours -> ours", ping(&n1.containers[0], n2.container_ip(0), 2));

    let c6 = |net: Ipv6Net, k: u128| host(net, k + 2);
    ok("v6 n1 -> n2", ping6(&n1.containers[0], c6(sub6[1], 0), 3));
    ok("v6 n2 -> n1", ping6(&n2.containers[1], c6(sub6[0], 1), 3));
    for (i, ours) in [n1, n2].into_iter().enumerate() {
        ok("v6 ours -> stock", ping6(&ours.containers[0], c6(stock6, 0), 3));
        ok("v6 stock -> ours", ping6(&stock.containers[1], c6(sub6[i], 1), 3));
        ok("v6 TCP ours -> stock", tcp_transfer6(&ours.containers[0], &stock.containers[0], c6(stock6, 0), BULK));
        ok("v6 TCP stock -> ours", tcp_transfer6(&stock.containers[1], &ours.containers[1], c6(sub6[i], 1), BULK));
    }
    ok("v6 TCP n1 -> n2", tcp_transfer6(&n1.containers[1], &n2.containers[0], c6(sub6[1], 0), BULK));
    ok("v4 TCP n2 -> stock", tcp_transfer(&n2.containers[1], &stock.containers[1], stock.container_ip(1), BULK));

    // The decap programs know the IPv6 peers and counted their traffic (TC on node 1, XDP
    // on node 2).
    for n in [n1, n2] {
        let peers = ok("maps", overlay_agent::maps::Maps::open(&n.bpffs_dir).and_then(|m| m.peer6_totals()).map_err(anyhow::Error::from));
        let t = peers.get(&underlay_ipv6(stock.index)).unwrap_or_else(|| panic!("node {}: no IPv6 peer entry for the stock node: {peers:?}", n.index));
        assert!(t.rx_bytes >= BULK, "node {}: IPv6 traffic from the stock node not counted: {t:?}", n.index);
    }

    // Operators see the IPv6 side: routes and peers.
    let routes = ok("routes", n1.agent_cli(&["routes"]));
    assert!(routes.contains(&format!("{stock6}")) && routes.contains(&underlay_ipv6(stock.index).to_string()), "{routes}");
    let stats = ok("stats", n1.agent_cli(&["stats"]));
    assert!(stats.contains(&underlay_ipv6(stock.index).to_string()), "{stats}");

    // A peer sending an inner source outside its IPv6 subnet: dropped and counted, at both
    // hooks (the stock node's container takes an address that is not its node's).
    let spoof = "fd00:10:244:99::5";
    ok("spoofed address", stock.containers[0].run("ip", &["addr", "add", &format!("{spoof}/128"), "dev", "eth0", "nodad"]));
    for (i, n) in [n1, n2].into_iter().enumerate() {
        let before = n.counter(Counter::SpoofedSource);
        let _ = stock.containers[0].run("ping", &["-6", "-c", "3", "-W", "1", "-i", "0.2", "-I", spoof, &c6(sub6[i], 0).to_string()]);
        assert!(n.counter(Counter::SpoofedSource) >= before + 3, "node {}: spoofed IPv6 inner sources not dropped as such", n.index);
    }
    // A host on the underlay that is no peer, sending flannel-v6 frames to node 1: dropped.
    ok("rogue v6", rogue.run("ip", &["addr", "add", "fd00:64::99/64", "dev", "eth0", "nodad"]));
    ok("rogue vxlan", rogue.run("ip", &["link", "add", "vx", "type", "vxlan", "id", "1", "local", "fd00:64::99", "dev", "eth0", "dstport", "8472", "nolearning"]));
    ok("rogue up", rogue.run("ip", &["link", "set", "vx", "up"]));
    ok("rogue addr", rogue.run("ip", &["addr", "add", "fd00:10:244:77::1/64", "dev", "vx", "nodad"]));
    let n1_mac6 = overlay_agent::netdev::format_mac(&ok("mac", link_mac(&n1.ns, "flannel-v6.1")));
    let gw = sub6[0].network().to_string();
    ok("rogue neigh", rogue.run("ip", &["-6", "neigh", "replace", &gw, "lladdr", &n1_mac6, "dev", "vx", "nud", "permanent"]));
    ok("rogue fdb", rogue.run("bridge", &["fdb", "replace", &n1_mac6, "dev", "vx", "dst", &underlay_ipv6(1).to_string(), "self", "permanent"]));
    ok("rogue route", rogue.run("ip", &["-6", "route", "replace", &sub6[0].to_string(), "via", &gw, "dev", "vx", "onlink"]));
    let before = n1.counter(Counter::UnknownPeer);
    assert!(ping6(&rogue, c6(sub6[0], 0), 3).is_err(), "a non-peer's IPv6 tunnel frames reached a container");
    assert!(n1.counter(Counter::UnknownPeer) >= before + 3, "frames from a non-peer IPv6 address not counted as unknown_peer");

    // A tunnel frame behind an IPv6 extension header (a destination-options header before
    // UDP; flannel's device never sends one) is dropped and counted, not passed unchecked.
    for n in [n1, n2] {
        let before = n.counter(Counter::OuterIpOptions);
        let frame = ext_header_frame(ok("mac", link_mac(&n.ns, "eth0")), ok("mac", link_mac(&stock.ns, "eth0")), underlay_ipv6(stock.index), underlay_ipv6(n.index));
        ok("raw", overlay_tests::traffic::send_raw_frames(&stock.ns, "eth0", vec![frame; 3]));
        assert!(
            wait_until(Duration::from_secs(5), || n.counter(Counter::OuterIpOptions) >= before + 3),
            "node {}: IPv6 tunnel frames with an extension header not dropped as such",
            n.index
        );
    }

    // Fragments and extension-header chains from the stock node (a peer), sent raw to a
    // container's UDP probe: only the legitimate datagram arrives, whole and in fragments;
    // a forged inner source behind a first fragment, a tiny first fragment, a tunnel frame
    // behind four extension headers and one whose headers reach past byte 128 (where XDP
    // used to stop reading and pass it) are dropped and counted, at TC (node 1) and XDP
    // (node 2).
    for (i, n) in [n1, n2].into_iter().enumerate() {
        let (port, to) = (9996, c6(sub6[i], 0));
        let probe = ok("probe", UdpProbe::start(&n.containers[0], std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)));
        let (head, legit) = vxlan6_datagram(stock, n, c6(stock6, 0), to, port, b"legit");
        let (_, forged) = vxlan6_datagram(stock, n, "fd00:10:244:99::5".parse().unwrap(), to, port, b"hostile");
        let four = [(0u8, dest_opts(8).1), dest_opts(8), dest_opts(8), dest_opts(8)];
        let hostile = [
            ipv6_frames(&head, &forged, &[], Some((80, 11))),
            ipv6_frames(&head, &legit, &[], Some((64, 12))),
            ipv6_frames(&head, &legit, &four, None),
            ipv6_frames(&head, &legit, &[dest_opts(200)], None),
        ]
        .concat();
        let before = n.counters();
        ok("raw v6", overlay_tests::traffic::send_raw_frames(&stock.ns, "eth0", hostile));
        let expect = [(Counter::SpoofedSource, 1), (Counter::TinyFragment, 1), (Counter::FragmentOverlap, 1), (Counter::OuterIpOptions, 2)];
        let settled = wait_until(Duration::from_secs(5), || expect.iter().all(|(c, k)| n.counter(*c) >= before[*c as usize] + k));
        let deltas: Vec<_> = expect.iter().map(|(c, k)| (c.name(), *k, n.counter(*c) - before[*c as usize])).collect();
        assert!(settled, "node {}: IPv6 drop counters (name, expected, got): {deltas:?}", n.index);
        for (c, k) in expect {
            assert_eq!(n.counter(c) - before[c as usize], k, "node {}: {}: exactly the hostile frames of its class", n.index, c.name());
        }
        let legit_frames = [ipv6_frames(&head, &legit, &[], None), ipv6_frames(&head, &legit, &[], Some((80, 13)))].concat();
        ok("raw v6", overlay_tests::traffic::send_raw_frames(&stock.ns, "eth0", legit_frames));
        assert_eq!(
            probe.finish_after(2),
            vec![b"legit".to_vec(), b"legit".to_vec()],
            "node {}: the legitimate IPv6 datagram, whole and reassembled, and nothing else must arrive",
            n.index
        );
        assert!(n.counter(Counter::FragmentToKernel) > before[Counter::FragmentToKernel as usize], "node {}: no checked first fragment", n.index);
    }

    // Self-healing: node 1's flannel-v6.1 deleted -> made again with its peers' entries, and
    // its new MAC reaches node 2 through the lease (node 2's neighbour entry follows).
    let old_mac = ok("mac", link_mac(&n1.ns, "flannel-v6.1"));
    ok("delete flannel-v6.1", n1.ns.run("ip", &["link", "del", "flannel-v6.1"]));
    let both_ways = || ping6(&n1.containers[0], c6(sub6[1], 0), 1).is_ok() && ping6(&n2.containers[0], c6(sub6[0], 0), 1).is_ok();
    assert!(wait_until(Duration::from_secs(20), both_ways), "IPv6 not restored after flannel-v6.1 was deleted:\n{}", n1.log_text());
    let new_mac = ok("mac", link_mac(&n1.ns, "flannel-v6.1"));
    assert!(n1.log_text().contains("IPv6 overlay device restored"), "{}", n1.log_text());
    if new_mac != old_mac {
        let key = format!("/coreos.com/network/subnets/{}-24&{}-64", n1.subnet.network(), sub6[0].network());
        let value = ok("get", etcd.etcdctl(&["get", &key, "--print-value-only"]));
        assert!(value.contains(&overlay_agent::netdev::format_mac(&new_mac)), "the new MAC is not announced: {value}");
    }

    // Node 2's public IPv6 address changes (no --public-ipv6): its lease and node 1's
    // forwarding entry follow, IPv6 between them keeps working, no restart.
    let new6: Ipv6Addr = "fd00:64::22".parse().unwrap();
    ok("new address", n2.ns.run("ip", &["addr", "add", &format!("{new6}/64"), "dev", "eth0", "nodad"]));
    ok("old address gone", n2.ns.run("ip", &["addr", "del", &format!("{}/64", underlay_ipv6(2)), "dev", "eth0"]));
    let key2 = format!("/coreos.com/network/subnets/{}-24&{}-64", n2.subnet.network(), sub6[1].network());
    assert!(
        wait_until(Duration::from_secs(20), || etcd.etcdctl(&["get", &key2, "--print-value-only"]).is_ok_and(|v| v.contains(&format!("\"PublicIPv6\":\"{new6}\""))))
            && wait_until(Duration::from_secs(10), || {
                n1.ns.run("bridge", &["fdb", "show", "dev", "flannel-v6.1"]).is_ok_and(|f| f.contains(&format!("dst {new6}")))
            }),
        "node 2's new IPv6 address did not reach its lease and node 1:\n{}",
        n2.log_text()
    );
    assert!(wait_until(Duration::from_secs(10), || ping6(&n1.containers[0], c6(sub6[1], 0), 1).is_ok()), "IPv6 to node 2 after its address changed");
    ok("v6 n2 -> n1 after the move", ping6(&n2.containers[1], c6(sub6[0], 1), 2));
    let peers = ok("maps", overlay_agent::maps::Maps::open(&n1.bpffs_dir).and_then(|m| m.peer6_totals()).map_err(anyhow::Error::from));
    assert!(peers.contains_key(&new6) && !peers.contains_key(&underlay_ipv6(2)), "node 1's IPv6 peers: {peers:?}");

    // An IPv6-only node's lease in this dual-stack network (key 0.0.0.0-0&...) gets no route
    // of either family; it is written before the stock node's deletion, whose effect the
    // next step waits for, so both nodes have seen it by then.
    let v6_only = "fd00:10:244:88::/64";
    ok(
        "put an IPv6-only lease",
        etcd.etcdctl(&[
            "put",
            "/coreos.com/network/subnets/0.0.0.0-0&fd00:10:244:88::-64",
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:64::88","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"0a:00:00:00:00:88"}}"#,
        ]),
    );
    // The stock node leaves: its IPv6 route, neighbour and forwarding entry go.
    ok("delete the stock lease", etcd.etcdctl(&["del", &key]));
    for n in [n1, n2] {
        assert!(
            wait_until(Duration::from_secs(10), || !v6_routes(n).contains(&stock6.to_string())),
            "node {} kept the departed node's IPv6 route: {}",
            n.index,
            v6_routes(n)
        );
        let neigh = n.ns.run("ip", &["-6", "neigh", "show", "dev", "flannel-v6.1"]).unwrap_or_default();
        assert!(!neigh.contains(&stock6.network().to_string()), "{neigh}");
        let fdb = n.ns.run("bridge", &["fdb", "show", "dev", "flannel-v6.1"]).unwrap_or_default();
        assert!(!fdb.contains(&underlay_ipv6(stock.index).to_string()), "{fdb}");
        // Nor is it a member any more: its frames would be dropped.
        let peers = ok("maps", overlay_agent::maps::Maps::open(&n.bpffs_dir).and_then(|m| m.peer6_totals()).map_err(anyhow::Error::from));
        assert!(!peers.contains_key(&underlay_ipv6(stock.index)), "node {}: {peers:?}", n.index);
    }
    // The others keep theirs.
    ok("v6 n1 -> n2 after", ping6(&n1.containers[0], c6(sub6[1], 0), 2));
    for n in [n1, n2] {
        assert!(!v6_routes(n).contains(v6_only), "node {}: an IPv6-only lease routed in a dual-stack network", n.index);
        assert!(n.routes().iter().all(|r| r.subnet.prefix_len() > 0), "node {}: {:?}", n.index, n.routes());
        let default = ok("ip route", n.ns.run("ip", &["-4", "route", "show", "exact", "0.0.0.0/0", "table", "all"]));
        assert!(default.trim().is_empty(), "node {}: {default}", n.index);
    }
}

/// Dual stack in nftables mode (`EnableNFTables`): flannel's `ip6 flannel-ipv6` table beside
/// `ip flannel-ipv4`, rule for rule as flannel's nftables manager writes it, restored when
/// someone deletes it, and gone after a clean stop; no ip6tables chains.
/// flanneld's --ip-blackhole-route on a dual-stack node: a blackhole for each of its subnets,
/// IPv4 and IPv6, re-added every --iptables-resync seconds when someone removes one (before:
/// IPv4 only, and only at start).
#[test]
fn ip_blackhole_route_covers_both_families_and_comes_back() {
    require_root();
    let config = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
    let spec = ClusterSpec {
        control: Control::Etcd { tls: false, config: config.into() },
        agent_args: vec!["--ip-blackhole-route".into(), "--iptables-resync=1".into()],
        ipv6_underlay: true,
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 1)
    };
    let c = Cluster::new("db", &spec).unwrap_or_else(|e| panic!("building the cluster failed: {e:#}"));
    let n = c.node(1);
    let (s4, s6) = (n.subnet.to_string(), subnet6_of(n).to_string());
    let has = |family: &str, subnet: &str| {
        n.ns.run("ip", &[family, "route", "show", "type", "blackhole"]).is_ok_and(|r| r.lines().any(|l| l.starts_with(&format!("blackhole {subnet} ")) && l.contains("metric 4096")))
    };
    assert!(wait_until(Duration::from_secs(10), || has("-4", &s4) && has("-6", &s6)), "{:?}\n{:?}", n.ns.run("ip", &["-4", "route"]), n.ns.run("ip", &["-6", "route"]));
    for (family, subnet) in [("-4", &s4), ("-6", &s6)] {
        ok("remove", n.ns.run("ip", &[family, "route", "del", "blackhole", subnet, "metric", "4096"]));
        assert!(!has(family, subnet));
        assert!(wait_until(Duration::from_secs(10), || has(family, subnet)), "the {subnet} blackhole was not restored:\n{}", n.log_text());
    }
    assert!(n.log_text().contains("the blackhole route was missing; restored"), "{}", n.log_text());
}

#[test]
fn dual_stack_nftables_mode_keeps_flannels_ipv6_table() {
    require_root();
    let config = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;
    let spec = ClusterSpec {
        control: Control::Etcd { tls: false, config: config.into() },
        agent_args: vec!["--ip-masq".into(), "--iptables-resync=1".into()],
        ipv6_underlay: true,
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 1)
    };
    let mut c = Cluster::new("dn", &spec).unwrap_or_else(|e| panic!("building the cluster failed: {e:#}"));
    let s6 = subnet6_of(c.node(1));
    let list = |c: &Cluster| c.node(1).ns.run("nft", &["list", "table", "ip6", "flannel-ipv6"]);
    let net = "fd00:10:244::/56";
    let expected = format!(
        "table ip6 flannel-ipv6 {{\n\tcomment \"rules for flannel-ipv6\"\n\tchain postrtg {{\n\t\tcomment \"chain to manage traffic masquerading by flannel\"\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tmeta mark 0x00004000 return\n\t\tip6 saddr {s6} ip6 daddr {net} return\n\t\tip6 saddr {net} ip6 daddr {s6} return\n\t\tip6 saddr != {s6} ip6 daddr {net} return\n\t\tip6 saddr {net} ip6 daddr != ff00::/8 masquerade fully-random\n\t\tip6 saddr != {net} ip6 daddr {net} masquerade fully-random\n\t}}\n\n\tchain forward {{\n\t\tcomment \"chain to accept flannel traffic\"\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tip6 saddr {net} accept\n\t\tip6 daddr {net} accept\n\t}}\n}}"
    );
    assert_eq!(ok("nft", list(&c)).trim_end(), expected);
    assert!(ok("nft", c.node(1).ns.run("nft", &["list", "table", "ip", "flannel-ipv4"])).contains("ip saddr 10.244.0.0/16 accept"));
    assert!(c.node(1).ns.run("ip6tables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).is_err(), "no ip6tables chain in nftables mode");
    ok("delete", c.node(1).ns.run("nft", &["delete", "table", "ip6", "flannel-ipv6"]));
    assert!(
        wait_until(Duration::from_secs(10), || list(&c).is_ok_and(|t| t.trim_end() == expected)),
        "the IPv6 table was not restored:\n{}",
        c.node(1).log_text()
    );
    ok("stop", c.stop_agent(1));
    assert_eq!(ok("nft", list(&c)).trim_end(), expected, "the IPv6 table is kept after SIGTERM (flannel since v0.27)");
}

/// An IPv6-only network (`EnableIPv4: false`), as flannel runs it: nodes with no IPv4 address
/// at all lease an IPv6 subnet under flannel's IPv6-only key (`0.0.0.0-0&<subnet>-64`, value
/// with PublicIP 0.0.0.0 and BackendV6Data), make flannel-v6.1 and no flannel.1, write only
/// the IPv6 lines to the subnet file, masquerade with ip6tables only, and carry IPv6 both ways
/// with a stock IPv6-only flannel node set up by hand; the decap programs check its frames at
/// both hooks; a restart keeps the subnet.
#[test]
fn ipv6_only_nodes_carry_traffic_with_a_stock_ipv6_only_node() {
    require_root();
    let config = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "tc" }, NodeKind::Agent { decap_hook: "xdp" }, NodeKind::StockFlannel],
        control: Control::Etcd { tls: false, config: config.into() },
        agent_args: vec!["--ip-masq".into()],
        ipv6_only: true,
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 3)
    };
    let mut c = Cluster::new("v6o", &spec).unwrap_or_else(|e| panic!("building the cluster failed: {e:#}"));
    let etcd = c.etcd();
    let (n1, n2, stock) = (c.node(1), c.node(2), c.node(3));
    let subnet6 = |n: &Node| n.subnet6.expect("an IPv6 subnet");
    let net: Ipv6Net = "fd00:10:244::/56".parse().unwrap();
    assert_ne!(subnet6(n1), subnet6(n2), "no two nodes may hold the same IPv6 subnet");

    for n in [n1, n2] {
        let s6 = subnet6(n);
        assert!(net.contains(&s6) && s6.prefix_len() == 64, "{s6}");
        // No IPv4 on the node's underlay, and no IPv4 overlay device.
        let addrs = ok("addresses", n.ns.run("ip", &["-4", "-o", "addr", "show", "dev", "eth0"]));
        assert!(addrs.trim().is_empty(), "node {}: {addrs}", n.index);
        assert!(n.ns.run("ip", &["link", "show", "flannel.1"]).is_err(), "node {}: an IPv6-only node has no flannel.1", n.index);
        // flannel's IPv6-only lease, field for field.
        let key = format!("/coreos.com/network/subnets/0.0.0.0-0&{}-64", s6.network());
        let value = ok("etcdctl get", etcd.etcdctl(&["get", &key, "--print-value-only"]));
        let want = format!(
            r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{}","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
            underlay_ipv6(n.index),
            overlay_agent::netdev::format_mac(&n.vtep_mac)
        );
        assert_eq!(value.trim(), want, "lease {key}");
        // The subnet file has the IPv6 lines only, in flannel's order.
        let file = std::fs::read_to_string(&n.subnet_file).unwrap();
        assert_eq!(
            file,
            format!("FLANNEL_IPV6_NETWORK={net}\nFLANNEL_IPV6_SUBNET={}/64\nFLANNEL_MTU={MTU6}\nFLANNEL_IPMASQ=true\n", host(s6, 1)),
            "node {}",
            n.index
        );
        // The data plane is up without an IPv4 side: `status` says so and exits 0; no IPv4
        // route anywhere on the node (it has no IPv4 address), none in the maps.
        let status = ok("status", n.agent_cli(&["status"]));
        assert!(status.contains("device=flannel-v6.1") && status.contains("encap=kernel") && status.contains("ready=true"), "{status}");
        let routes4 = ok("ip -4 route", n.ns.run("ip", &["-4", "route", "show", "table", "main"]));
        assert!(routes4.trim().is_empty(), "node {}: IPv4 routes on an IPv6-only node:\n{routes4}", n.index);
        // ip6tables masquerade and forward rules; no IPv4 ones.
        let masq = ok("ip6tables", n.ns.run("ip6tables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]));
        assert!(masq.contains(&format!("-s {s6} -d {net}")), "{masq}");
        assert!(n.ns.run("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"]).is_err(), "node {}: IPv4 masquerade rules in an IPv6-only network", n.index);
        // docker's FORWARD DROP, both families.
        ok("policy", n.ns.run("iptables", &["-w", "-P", "FORWARD", "DROP"]));
        ok("policy6", n.ns.run("ip6tables", &["-w", "-P", "FORWARD", "DROP"]));
    }
    for n in [n1, n2] {
        ok("stock route", overlay_tests::add_route6(stock, n));
    }

    // Each of our nodes routes the two others' IPv6 subnets through flannel-v6.1.
    for (n, others) in [(n1, [n2, stock]), (n2, [n1, stock])] {
        wait_for_v6_routes(n, &others.map(subnet6));
    }
    ok("n1 -> n2", ping6(&n1.containers[0], n2.container_ip6(0), 3));
    ok("n2 -> n1", ping6(&n2.containers[1], n1.container_ip6(1), 3));
    for n in [n1, n2] {
        assert!(n.routes().is_empty(), "node {}: IPv4 routes in the maps: {:?}", n.index, n.routes());
        let table = ok("routes", n.agent_cli(&["routes"]));
        assert!(table.contains(&subnet6(stock).to_string()), "{table}");
    }
    for ours in [n1, n2] {
        ok("ours -> stock", ping6(&ours.containers[0], stock.container_ip6(0), 3));
        ok("stock -> ours", ping6(&stock.containers[1], ours.container_ip6(1), 3));
        ok("TCP ours -> stock", tcp_transfer6(&ours.containers[0], &stock.containers[0], stock.container_ip6(0), BULK));
        ok("TCP stock -> ours", tcp_transfer6(&stock.containers[1], &ours.containers[1], ours.container_ip6(1), BULK));
    }
    ok("TCP n1 -> n2", tcp_transfer6(&n1.containers[1], &n2.containers[0], n2.container_ip6(0), BULK));

    // The decap programs (TC on node 1, XDP on node 2) know the stock node as an IPv6 peer and
    // counted its traffic; a spoofed inner source from it is dropped and counted at both.
    for n in [n1, n2] {
        let peers = ok("maps", overlay_agent::maps::Maps::open(&n.bpffs_dir).and_then(|m| m.peer6_totals()).map_err(anyhow::Error::from));
        let t = peers.get(&underlay_ipv6(stock.index)).unwrap_or_else(|| panic!("node {}: no IPv6 peer entry for the stock node: {peers:?}", n.index));
        assert!(t.rx_bytes >= BULK, "node {}: traffic from the stock node not counted: {t:?}", n.index);
    }
    let spoof = "fd00:10:244:99::5";
    ok("spoofed address", stock.containers[0].run("ip", &["addr", "add", &format!("{spoof}/128"), "dev", "eth0", "nodad"]));
    for n in [n1, n2] {
        let before = n.counter(Counter::SpoofedSource);
        let _ = stock.containers[0].run("ping", &["-6", "-c", "3", "-W", "1", "-i", "0.2", "-I", spoof, &n.container_ip6(0).to_string()]);
        assert!(n.counter(Counter::SpoofedSource) >= before + 3, "node {}: spoofed IPv6 inner sources not dropped as such", n.index);
    }

    // Operators see IPv6-only leases as such.
    let leases = ok("leases", n1.agent_cli(&["leases", &format!("--etcd-endpoints={}", etcd.endpoint)]));
    let row = leases.lines().find(|l| l.contains(&subnet6(stock).to_string())).unwrap_or_else(|| panic!("{leases}"));
    assert!(row.starts_with("- ") && row.ends_with(&underlay_ipv6(stock.index).to_string()), "{leases}");
    let one = ok("lease", n1.agent_cli(&["lease", &subnet6(n2).to_string(), &format!("--etcd-endpoints={}", etcd.endpoint)]));
    assert!(one.contains(&format!("0.0.0.0-0&{}-64", subnet6(n2).network())), "{one}");

    // A restart keeps the node's IPv6 subnet (its own lease, found by its PublicIPv6: every
    // IPv6-only lease says PublicIP 0.0.0.0) and the traffic flows again.
    let before = subnet6(c.node(1));
    ok("restart", c.restart_agent(1));
    let file = std::fs::read_to_string(&c.node(1).subnet_file).unwrap();
    assert!(file.contains(&format!("FLANNEL_IPV6_SUBNET={}/64", host(before, 1))), "a restart changed the subnet:\n{file}");
    let (n1, n2) = (c.node(1), c.node(2));
    let etcd = c.etcd();
    let values = ok("leases", etcd.etcdctl(&["get", "--prefix", "/coreos.com/network/subnets/", "--print-value-only"]));
    let mine = format!("\"PublicIPv6\":\"{}\"", underlay_ipv6(1));
    assert_eq!(values.lines().filter(|v| v.contains(&mine)).count(), 1, "node 1 must hold exactly one lease after its restart:\n{values}");
    assert!(wait_until(Duration::from_secs(10), || ping6(&n2.containers[0], n1.container_ip6(0), 1).is_ok()), "IPv6 to node 1 after its restart");
    ok("n1 -> stock after restart", ping6(&n1.containers[1], c.node(3).container_ip6(1), 2));

    // Where the eBPF checks cannot run (forced), an IPv6-only node runs as a stock one:
    // flannel-v6 with its per-peer entries, no program attached, said in `status`; the
    // departure below is then followed on the kernel device alone.
    c.set_agent_args(vec!["--ip-masq".into(), "--ebpf-unavailable".into()], Vec::new());
    ok("restart degraded", c.restart_agent_with_current_args(1));
    let (n1, n2) = (c.node(1), c.node(2));
    let status = ok("status", n1.agent_cli(&["status"]));
    assert!(status.contains("degraded=\"forced with --ebpf-unavailable\""), "{status}");
    assert!(!n1.bpffs_dir.join("link_decap_tc").exists() && !n1.bpffs_dir.join("link_guard").exists(), "programs left attached");
    assert!(wait_until(Duration::from_secs(10), || ping6(&n2.containers[0], n1.container_ip6(0), 1).is_ok()), "IPv6 to the degraded node");
    ok("degraded n1 -> stock", ping6(&n1.containers[1], c.node(3).container_ip6(1), 2));
    ok("stock -> degraded n1", ping6(&c.node(3).containers[0], n1.container_ip6(0), 2));
    let etcd = c.etcd();

    // The stock node leaves: its route, neighbour and forwarding entry go from our nodes.
    let stock6 = subnet6(c.node(3));
    ok("delete the stock lease", etcd.etcdctl(&["del", &format!("/coreos.com/network/subnets/0.0.0.0-0&{}-64", stock6.network())]));
    for n in [n1, n2] {
        let gone = || {
            let route = n.ns.run("ip", &["-6", "route", "show", "dev", "flannel-v6.1"]);
            let neigh = n.ns.run("ip", &["-6", "neigh", "show", "dev", "flannel-v6.1"]);
            let fdb = n.ns.run("bridge", &["fdb", "show", "dev", "flannel-v6.1"]);
            route.is_ok_and(|r| r.contains("via") && !r.contains(&stock6.to_string()))
                && neigh.is_ok_and(|t| !t.contains(&stock6.network().to_string()))
                && fdb.is_ok_and(|t| !t.contains(&underlay_ipv6(3).to_string()))
        };
        assert!(wait_until(Duration::from_secs(10), gone), "node {} kept the departed node's entries: {}", n.index, v6_routes(n));
    }
    ok("n1 -> n2 after", ping6(&n1.containers[0], n2.container_ip6(0), 2));
}
