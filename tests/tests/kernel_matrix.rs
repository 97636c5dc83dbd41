//! One cluster that proves a kernel: what `cargo xtask vm-test` runs inside VMs booted with
//! Debian 12's own kernels (6.1, without TCX; 6.12, with it), and what runs here on the
//! host's kernel as part of the suite. Two agents and a stock flannel vxlan node, with etcd,
//! on nodes as the seed's are (strict rp_filter, docker's FORWARD DROP, kube-proxy's INVALID
//! drop): the attach mechanism the probe chose, ping and TCP both ways between all of them,
//! a kube-proxy-style Service DNAT to a container on another node, a restart under a UDP
//! stream that loses nothing, and a forged frame dropped and counted.
//!
//! Inside a VM (TCG: slow and uneven CPUs) every wait is generous; the stream runs at a rate
//! the emulated machine keeps up with.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use overlay_common::Counter;
use overlay_tests::{
    require_root,
    traffic::{ping, ping6, send_raw_frames, send_udp, tcp_transfer, tcp_transfer6, tcp_transfer_via, UdpProbe, UdpStream},
    wait_until, Backend, Cluster, ClusterSpec, Control, NodeKind,
};

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// Send (`send`) again, up to 6 times 5 s apart, until `counted`: one datagram is not a
/// condition to wait for on a loaded machine. Whether it ever was.
fn resend_until(mut send: impl FnMut(), counted: impl Fn() -> bool) -> bool {
    (0..6).any(|_| {
        send();
        wait_until(Duration::from_secs(5), &counted)
    })
}

/// A 200/s UDP stream from node `from`'s container to node `to`'s with `step` (`what`) done
/// under it: the stream must go on afterwards; with `lossless`, not one datagram lost.
fn under_a_stream(c: &mut Cluster, from: usize, to: usize, port: u16, what: &str, lossless: bool, step: impl FnOnce(&mut Cluster)) {
    let stream = ok("stream", UdpStream::start(&c.node(from).containers[1], &c.node(to).containers[0], c.node(to).container_ip(0), port, 200));
    assert!(wait_until(Duration::from_secs(60), || stream.received_so_far() >= 400), "the stream did not start");
    step(c);
    let after = stream.received_so_far();
    assert!(wait_until(Duration::from_secs(60), || stream.received_so_far() >= after + 400), "the stream stalled after the {what}:\n{}", c.node(to).log_text());
    let r = ok("stream", stream.finish());
    eprintln!("{what}: UDP sent {} received {} lost {} (receiver overflows {})", r.sent, r.received, r.lost, r.receiver_overflows);
    if lossless {
        assert_eq!(r.lost, 0, "datagrams lost across the {what}: {r:?}\n{}", c.node(to).log_text());
    }
}

/// `to`'s agent restarted under a stream from `from`: not one datagram lost.
fn restart_under_a_stream_loses_nothing(c: &mut Cluster, from: usize, to: usize, port: u16) {
    under_a_stream(c, from, to, port, "restart", true, |c| ok("restart", c.restart_agent(to)));
}

/// Replacing flanneld in place on stock node `stock` under a UDP stream from node `from`: the
/// lease, the device with the routes or peers flanneld gave it are there when the agent
/// starts (a wireguard node's key in the file the agent reads, as flanneld and the agent
/// share /run/flannel/wgkey). `flanneld_deletes`: the device flanneld removes when it stops
/// (flannel-wg; flannel.ipip stays): deleted first, so traffic pauses until the agent has
/// made it again and must then resume; otherwise nothing may be lost. Either way the agent
/// keeps the node's subnet and its lease as flanneld wrote it (no second lease), and
/// traffic flows back.
fn take_over_under_a_stream(c: &mut Cluster, from: usize, stock: usize, port: u16, flanneld_deletes: Option<&str>) {
    let subnet = c.node(stock).subnet;
    let key = format!("/coreos.com/network/subnets/{}-24", subnet.network());
    let lease = |c: &Cluster| -> serde_json::Value {
        let text = ok("lease", c.etcd().etcdctl(&["get", "--print-value-only", &key]));
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("lease {text:?}: {e}"))
    };
    let before = lease(c);
    under_a_stream(c, from, stock, port, "takeover", flanneld_deletes.is_none(), |c| {
        if let Some(device) = flanneld_deletes {
            ok("flanneld stops", c.node(stock).ns.run("ip", &["link", "del", device]));
        }
        ok("take over", c.take_over_stock_node(stock));
    });
    assert_eq!(lease(c), before, "the agent kept flanneld's lease as it was");
    let env = ok("subnet file", std::fs::read_to_string(&c.node(stock).subnet_file).map_err(anyhow::Error::from));
    assert_eq!(overlay_tests::parse_subnet_env(&env).map(|(s, _)| s), Some(subnet), "the agent kept the node's subnet:\n{env}");
    let public_ip = format!(r#""PublicIP":"{}""#, c.node(stock).underlay_ip);
    let all = ok("leases", c.etcd().etcdctl(&["get", "--prefix", "--print-value-only", "/coreos.com/network/subnets/"]));
    assert_eq!(all.lines().filter(|l| l.contains(&public_ip)).count(), 1, "one lease names the node:\n{all}");
    ok("ping back", ping(&c.node(stock).containers[0], c.node(from).container_ip(0), 2));
}

/// Nodes 1 and 2 agents (`--decap-hook auto`), node 3 a stock flannel node of `backend`
/// routed by hand (etcd-driven; no full mesh).
fn two_agents_and_a_stock_node(backend: Backend, tag: &str) -> Cluster {
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "auto" }, NodeKind::Agent { decap_hook: "auto" }, NodeKind::StockFlannel],
        full_mesh: false,
        ..ClusterSpec::etcd(backend, "auto", 3)
    };
    Cluster::new(tag, &spec).unwrap_or_else(|e| panic!("building the {} cluster failed: {e:#}", backend.flag()))
}

/// The agents' nodes as the seed's are: docker's FORWARD DROP, and kube-proxy's drop of
/// INVALID packets (so that conntrack must track every flow).
fn seed_forward_rules(c: &Cluster) {
    for n in [c.node(1), c.node(2)] {
        ok("policy", n.ns.run("iptables", &["-w", "-P", "FORWARD", "DROP"]));
        ok("invalid", n.ns.run("iptables", &["-w", "-I", "FORWARD", "1", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]));
    }
}

#[test]
fn a_cluster_with_a_stock_node_works_on_this_kernel() {
    require_root();
    let mut c = two_agents_and_a_stock_node(Backend::Vxlan, "km");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // In the VM matrix the harness says which kernel this is and what it must attach with;
    // on the host the probe's answer is checked against the agents' own.
    if let Ok(label) = std::env::var("OVERLAY_EXPECT_KERNEL") {
        assert!(kernel.starts_with(&format!("{label}.")), "booted {kernel}, expected Linux {label}");
    }
    let want = match std::env::var("OVERLAY_EXPECT_ATTACH") {
        Ok(a) => format!("attach={a}"),
        Err(_) if overlay_agent::datapath::attach::tcx_supported() => "attach=tcx".to_string(),
        Err(_) => "attach=tc-legacy".to_string(),
    };
    let want = want.as_str();
    eprintln!("kernel {}: expecting {want}", kernel.trim());
    for i in [1, 2] {
        let status = ok("status", c.node(i).agent_cli(&["status"]));
        assert!(status.contains(want) && status.contains("decap=tc") && status.contains("ready=true"), "node {i} on {kernel}: {status}");
        // The kernel's drops are traced there too (its BTF gives the offsets and reasons).
        assert!(status.contains("kernel_drops=traced"), "node {i} on {kernel}: {status}\n{}", c.node(i).log_text());
        assert!(c.node(i).log_text().contains(want), "the start-up line names the mechanism:\n{}", c.node(i).log_text());
    }
    let stock = c.node(3);
    for ours in [c.node(1), c.node(2)] {
        ok("stock route", c.add_route(stock, ours));
    }
    seed_forward_rules(&c);
    // Every pair, both ways: ping, and TCP.
    assert!(
        wait_until(Duration::from_secs(60), || ping(&c.node(1).containers[0], c.node(2).container_ip(0), 1).is_ok()),
        "the agents' routes did not come up"
    );
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        ok(&format!("ping {a} -> {b}"), ping(&c.node(a).containers[0], c.node(b).container_ip(1), 2));
        ok(&format!("TCP {a} -> {b}"), tcp_transfer(&c.node(a).containers[1], &c.node(b).containers[0], c.node(b).container_ip(0), 2 << 20));
    }
    // kube-proxy's Service NAT on node 1 to a container on node 2: both directions of the
    // flow cross the nodes' netfilter.
    let service = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    let target = c.node(2).container_ip(1);
    ok("dnat", c.node(1).ns.run("iptables", &[
        "-w", "-t", "nat", "-A", "PREROUTING", "-d", "10.96.0.10/32", "-p", "tcp", "--dport", "80",
        "-j", "DNAT", "--to-destination", &format!("{target}:8080"),
    ]));
    ok("TCP through the Service", tcp_transfer_via(&c.node(1).containers[0], &c.node(2).containers[1], 8080, service, 2 << 20));

    // A restart under a UDP stream loses nothing.
    restart_under_a_stream_loses_nothing(&mut c, 1, 2, 7010);

    // A forged frame from a peer (an inner source it does not lease): dropped and counted,
    // never delivered; the same frame with its own source is.
    let (n1, n2) = (c.node(1), c.node(2));
    let port = 9990;
    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
    let before = n1.counter(Counter::SpoofedSource);
    let from_n2 = SocketAddrV4::new(n2.underlay_ip, 0);
    let to_n1 = SocketAddrV4::new(n1.underlay_ip, 8472);
    let frame = |src: Ipv4Addr, body: &[u8]| {
        let mut p = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], n1.vtep_mac).ipv4(src.octets(), n1.container_ip(0).octets(), 64).udp(40000, port);
        b.write(&mut p, body).expect("inner frame");
        p
    };
    // A single datagram went uncounted once in a full run on a loaded machine (never alone,
    // 6 of 6): one datagram is not a condition to wait for. Sent again, a bounded number of
    // times, until the counter moves; every copy is dropped, so none can reach the probe.
    let counted = resend_until(
        || ok("forged", send_udp(&n2.ns, from_n2, to_n1, vec![frame(Ipv4Addr::new(10, 244, 99, 7), b"forged")])),
        || n1.counter(Counter::SpoofedSource) > before,
    );
    assert!(counted, "the forged frame was not counted (sent 6 times, 5 s apart)");
    ok("legit", send_udp(&n2.ns, from_n2, to_n1, vec![frame(n2.container_ip(0), b"legit")]));
    assert_eq!(probe.finish_after(1), vec![b"legit".to_vec()], "only the frame with its own source arrives");
}

/// Whether this kernel can make the device `ip link add probe <args>` asks for (a module
/// Debian's kernels have and this machine's has not), asked in a namespace of the test's own.
fn kernel_can_make(tag: &str, args: &[&str]) -> bool {
    let ns = ok("probe namespace", overlay_tests::netns::Netns::new(&format!("km{tag}{}", std::process::id())));
    ns.run("ip", &[&["link", "add", "probe"][..], args].concat()).is_ok()
}

/// Whether the kernel has `module` (Debian's, told from outside with OVERLAY_EXPECT_KERNEL,
/// must); where it has not, an agent of `backend` refuses to start and names it.
fn has_module_or_is_refused(has: bool, backend: Backend, prefix: &str, module: &str) -> bool {
    if std::env::var("OVERLAY_EXPECT_KERNEL").is_ok() {
        assert!(has, "Debian's kernel has the {module} module; this one could not make a {module} device");
    }
    if has {
        return true;
    }
    let spec = ClusterSpec { nodes: vec![NodeKind::Agent { decap_hook: "auto" }], ..ClusterSpec::etcd(backend, "auto", 1) };
    let e = match Cluster::new(prefix, &spec) {
        Ok(_) => panic!("a {module} node came up on a kernel that cannot make a {module} device"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains(&format!("needs the kernel's {module} module")) && e.contains(&format!("modprobe {module}")), "{e}");
    eprintln!("no {module} module here: the agent refused as it should");
    false
}

/// flannel's ipip backend, where the kernel has the ipip module (the VM matrix's Debian
/// kernels; there it must): two agents and a stock flannel ipip node set up by hand, ping
/// and TCP both ways between all, a forged IP-in-IP packet from a peer (an inner source it
/// does not lease) and one from a host that is no node dropped and counted by the checks on
/// the underlay (flannel.ipip alone takes IP-in-IP from anywhere), a restart that keeps the
/// traffic flowing, the stock node's flanneld replaced by an agent in place under a stream,
/// a departed node's route removed, and a node rolled back to flanneld (`teardown
/// --leave-kernel-state`) under a stream. Where the kernel has no ipip
/// module (this machine's), the agent refuses to start and names the module.
#[test]
fn ipip_nodes_interoperate_with_a_stock_ipip_node_or_are_refused_without_the_module() {
    require_root();
    if !has_module_or_is_refused(kernel_can_make("ip", &["type", "ipip", "local", "10.255.0.1"]), Backend::Ipip, "kmr", "ipip") {
        return;
    }
    let mut c = two_agents_and_a_stock_node(Backend::Ipip, "kmi");
    for i in [1, 2] {
        let status = ok("status", c.node(i).agent_cli(&["status"]));
        assert!(
            status.contains("device=flannel.ipip") && status.contains("encap=kernel") && status.contains("decap=tc")
                && status.contains("guard=firewall") && status.contains("ready=true"),
            "node {i}: {status}\n{}",
            c.node(i).log_text()
        );
        let lease = ok("lease", c.etcd().etcdctl(&["get", "--print-value-only", &format!("/coreos.com/network/subnets/{}-24", c.node(i).subnet.network())]));
        assert!(lease.contains(r#""BackendType":"ipip""#), "node {i}'s lease is flannel's: {lease}");
        assert_eq!(ok("mtu", overlay_tests::link_mtu(&c.node(i).ns, "flannel.ipip")), c.node(i).mtu, "FLANNEL_MTU is the device's");
    }
    let stock = c.node(3);
    for ours in [c.node(1), c.node(2)] {
        ok("stock route", c.add_route(stock, ours));
    }
    seed_forward_rules(&c);
    assert!(
        wait_until(Duration::from_secs(60), || ping(&c.node(1).containers[0], c.node(3).container_ip(0), 1).is_ok()
            && ping(&c.node(2).containers[0], c.node(1).container_ip(0), 1).is_ok()),
        "the agents' routes did not come up"
    );
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        ok(&format!("ping {a} -> {b}"), ping(&c.node(a).containers[0], c.node(b).container_ip(1), 2));
        ok(&format!("TCP {a} -> {b}"), tcp_transfer(&c.node(a).containers[1], &c.node(b).containers[0], c.node(b).container_ip(0), 2 << 20));
    }

    // Forged IP-in-IP to node 1: from a peer with an inner source it does not lease, and
    // from a host on the underlay that is no node. Dropped and counted, never delivered; the
    // same packet with the peer's own source is.
    let u = c.node(1).underlay_ip.octets();
    let stranger_ip = Ipv4Addr::new(u[0], u[1], u[2], 200);
    let stranger = ok("stranger", c.add_underlay_host("stranger", stranger_ip));
    let (n1, n2) = (c.node(1), c.node(2));
    let port = 9991;
    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
    let n1_mac = ok("mac", overlay_tests::link_mac(&n1.ns, "eth0"));
    let packet = |from_mac: [u8; 6], from: Ipv4Addr, src: Ipv4Addr, body: &[u8]| {
        let mut inner = Vec::new();
        etherparse::PacketBuilder::ipv4(src.octets(), n1.container_ip(0).octets(), 64).udp(40000, port).write(&mut inner, body).expect("inner packet");
        let mut p = Vec::new();
        etherparse::PacketBuilder::ethernet2(from_mac, n1_mac)
            .ipv4(from.octets(), n1.underlay_ip.octets(), 64)
            .write(&mut p, etherparse::IpNumber::IPV4, &inner)
            .expect("outer packet");
        p
    };
    let (n2_mac, stranger_mac) = (ok("mac", overlay_tests::link_mac(&n2.ns, "eth0")), ok("mac", overlay_tests::link_mac(&stranger, "eth0")));
    let (spoofed, unknown) = (n1.counter(Counter::SpoofedSource), n1.counter(Counter::UnknownPeer));
    // One packet is not a condition to wait for: sent again (a bounded number of times)
    // until counted; every copy is dropped.
    let counted = resend_until(
        || ok("forged", send_raw_frames(&n2.ns, "eth0", vec![packet(n2_mac, n2.underlay_ip, Ipv4Addr::new(10, 244, 99, 7), b"forged")])),
        || n1.counter(Counter::SpoofedSource) > spoofed,
    );
    assert!(counted, "the forged IP-in-IP packet from a peer was not counted");
    let counted = resend_until(
        || ok("stranger's", send_raw_frames(&stranger, "eth0", vec![packet(stranger_mac, stranger_ip, n2.container_ip(0), b"stranger")])),
        || n1.counter(Counter::UnknownPeer) > unknown,
    );
    assert!(counted, "IP-in-IP from a host that is no node was not counted");
    let legit = packet(n2_mac, n2.underlay_ip, n2.container_ip(0), b"legit");
    ok("legit", send_raw_frames(&n2.ns, "eth0", vec![legit.clone(), legit.clone(), legit]));
    let got = probe.finish_after(1);
    assert!(!got.is_empty() && got.iter().all(|d| d == b"legit"), "only the packets with the peer's own source arrive: {got:?}");

    // IP-in-IP sent from a container to its own node's tunnel address never meets the
    // checks on the underlay: the guard's rule drops it before flannel.ipip can open it.
    let n1 = c.node(1);
    let guard_drops = |n: &overlay_tests::Node| -> u64 {
        let t = n.ns.run("nft", &["list", "table", "ip", "overlay-guard"]).unwrap_or_default();
        t.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|p| p.parse().ok()).unwrap_or(0)
    };
    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
    let mut inner = Vec::new();
    etherparse::PacketBuilder::ipv4(c.node(2).container_ip(0).octets(), n1.container_ip(0).octets(), 64)
        .udp(40000, port)
        .write(&mut inner, b"from a container")
        .expect("inner packet");
    let before = guard_drops(n1);
    let dropped = resend_until(
        || ok("ipip from a container", send_ip_in_ip(&n1.containers[1], n1.underlay_ip, inner.clone())),
        || guard_drops(n1) > before,
    );
    assert!(dropped, "the guard did not drop IP-in-IP from a container (counter {before})");
    assert_eq!(probe.finish_after(1), Vec::<Vec<u8>>::new(), "IP-in-IP from a container was opened");

    // flannel.ipip deleted by someone: made again, and its routes with it.
    ok("delete the device", c.node(1).ns.run("ip", &["link", "del", "flannel.ipip"]));
    assert!(
        wait_until(Duration::from_secs(60), || ping(&c.node(1).containers[0], c.node(3).container_ip(0), 1).is_ok()
            && ping(&c.node(3).containers[0], c.node(1).container_ip(0), 1).is_ok()),
        "the ipip device and its routes did not come back:\n{}",
        c.node(1).log_text()
    );

    // A restart under a UDP stream loses nothing; a vxlan device a run before the backend
    // changed left goes (it would take VXLAN with no check in front of it).
    ok("stale vxlan device", c.node(1).ns.run("ip", &["link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472", "nolearning"]));
    restart_under_a_stream_loses_nothing(&mut c, 2, 1, 7011);
    let links = ok("links", c.node(1).ns.run("ip", &["-o", "link"]));
    assert!(!links.contains("flannel.1") && links.contains("flannel.ipip"), "{links}");

    // flanneld on the stock node replaced by an agent in place: its routes on flannel.ipip
    // adopted before the checks start, nothing lost.
    take_over_under_a_stream(&mut c, 1, 3, 7012, None);
    let status = ok("status", c.node(3).agent_cli(&["status"]));
    assert!(status.contains("device=flannel.ipip") && status.contains("ready=true"), "{status}");

    // The node departs (its agent stopped, its lease deleted): its route goes from both agents.
    ok("stop", c.stop_agent(3));
    let gone = c.node(3).subnet;
    ok("delete", c.etcd().etcdctl(&["del", &format!("/coreos.com/network/subnets/{}-24", gone.network())]));
    for i in [1, 2] {
        let routed = |n: &overlay_tests::Node| n.ns.run("ip", &["route", "show", &gone.to_string()]).map(|o| !o.trim().is_empty()).unwrap_or(true);
        assert!(wait_until(Duration::from_secs(30), || !routed(c.node(i))), "node {i} still routes {gone}");
    }

    // Rolling node 2 back to flanneld under a UDP stream from node 1: its agent stopped,
    // `teardown --leave-kernel-state` leaves flannel.ipip, its address and its routes (what a
    // flanneld started next adopts) and removes the programs and pins; nothing lost, and
    // the kernel device alone carries traffic both ways afterwards.
    under_a_stream(&mut c, 1, 2, 7013, "rollback", true, |c| {
        ok("stop", c.stop_agent(2));
        ok("rollback", c.node(2).agent_cli(&["teardown", "--leave-kernel-state"]));
    });
    let n2 = c.node(2);
    assert!(!n2.bpffs_dir.exists(), "pins left after teardown");
    // (bpftool lists TC and TCX attachments alike: 6.1 has the one, 6.12 the other.)
    let attached = ok("bpftool", n2.ns.run("bpftool", &["net", "show", "dev", "eth0"]));
    assert!(!attached.contains("tc_ingress") && !attached.contains("tc_egress"), "programs left on the underlay:\n{attached}");
    let routes = ok("routes", n2.ns.run("ip", &["route", "show", "dev", "flannel.ipip"]));
    let to_1 = format!("{} via {} ", c.node(1).subnet, c.node(1).underlay_ip);
    assert!(routes.lines().any(|l| l.starts_with(&to_1) && l.contains("onlink")), "{routes}");
    let addr = ok("addr", n2.ns.run("ip", &["-4", "addr", "show", "dev", "flannel.ipip"]));
    assert!(addr.contains(&format!("inet {}/32", n2.subnet.network())), "{addr}");
    ok("ping 2 -> 1", ping(&n2.containers[0], c.node(1).container_ip(0), 2));
    ok("ping 1 -> 2", ping(&c.node(1).containers[0], n2.container_ip(0), 2));
}

/// Send `inner` (an IPv4 packet) to `to` as IP-in-IP from inside `ns` (a raw socket of
/// protocol 4: the kernel writes the outer header).
fn send_ip_in_ip(ns: &overlay_tests::Netns, to: Ipv4Addr, inner: Vec<u8>) -> anyhow::Result<()> {
    ns.enter(move || -> anyhow::Result<()> {
        // SAFETY: plain socket calls on a descriptor owned here and closed before returning.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP);
            anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.octets()) },
                sin_zero: [0; 8],
            };
            let n = libc::sendto(fd, inner.as_ptr().cast(), inner.len(), 0, (&addr as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            anyhow::ensure!(n == inner.len() as isize, "sendto: {err}");
        }
        Ok(())
    })?
}

/// flannel's wireguard backend, where the kernel has the module (the VM matrix's Debian
/// kernels; there it must): two agents and a stock flannel wireguard node set up with `wg`
/// as flannel configures it, ping and TCP both ways between all, a restart that keeps the
/// key (the lease's PublicKey unchanged) and the traffic flowing, a lease with a bad key
/// skipped alone, the stock node's flanneld replaced by an agent in place (flannel-wg gone
/// with flanneld, made again from the same key file) under a stream that resumes, and a
/// departed node's peer removed. Where the kernel has no wireguard
/// module (this machine's), the agent refuses to start and names the module.
#[test]
fn wireguard_nodes_interoperate_with_a_stock_wireguard_node_or_are_refused_without_the_module() {
    require_root();
    if !has_module_or_is_refused(kernel_can_make("wg", &["type", "wireguard"]), Backend::Wireguard, "kmwr", "wireguard") {
        return;
    }
    let mut c = two_agents_and_a_stock_node(Backend::Wireguard, "kmw");
    let lease_of = |c: &Cluster, i: usize| ok("lease", c.etcd().etcdctl(&["get", "--print-value-only", &format!("/coreos.com/network/subnets/{}-24", c.node(i).subnet.network())]));
    for i in [1, 2] {
        let status = ok("status", c.node(i).agent_cli(&["status"]));
        assert!(status.contains("device=flannel-wg") && status.contains("backend=wireguard") && status.contains("ready=true"), "node {i}: {status}");
        let lease = lease_of(&c, i);
        assert!(lease.contains(r#""BackendType":"wireguard""#) && lease.contains(r#""Port":51820"#), "node {i}'s lease is flannel's: {lease}");
        assert_eq!(ok("mtu", overlay_tests::link_mtu(&c.node(i).ns, "flannel-wg")), c.node(i).mtu, "FLANNEL_MTU is the device's");
    }
    for ours in [c.node(1), c.node(2)] {
        ok("stock peer", c.add_route(c.node(3), ours));
    }
    seed_forward_rules(&c);
    assert!(
        wait_until(Duration::from_secs(60), || ping(&c.node(1).containers[0], c.node(3).container_ip(0), 1).is_ok()
            && ping(&c.node(2).containers[0], c.node(1).container_ip(0), 1).is_ok()),
        "the agents' peers did not come up:\n{}",
        c.node(1).log_text()
    );
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        ok(&format!("ping {a} -> {b}"), ping(&c.node(a).containers[0], c.node(b).container_ip(1), 2));
        ok(&format!("TCP {a} -> {b}"), tcp_transfer(&c.node(a).containers[1], &c.node(b).containers[0], c.node(b).container_ip(0), 2 << 20));
    }

    // A restart keeps the key (the lease says the same PublicKey) and loses nothing.
    let before = lease_of(&c, 1);
    restart_under_a_stream_loses_nothing(&mut c, 2, 1, 7021);
    assert_eq!(lease_of(&c, 1), before, "the restart kept node 1's key and lease");

    // A lease with a bad key: skipped with a clear line, no other peer disturbed.
    ok("bad lease", c.etcd().etcdctl(&["put", "/coreos.com/network/subnets/10.244.77.0-24",
        r#"{"PublicIP":"192.168.100.77","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"c2hvcnQ=","Port":51820}}"#]));
    assert!(wait_until(Duration::from_secs(30), || c.node(1).log_text().contains("wireguard lease refused")), "{}", c.node(1).log_text());
    ok("still", ping(&c.node(1).containers[0], c.node(3).container_ip(0), 2));

    // flanneld on the stock node replaced by an agent in place: flanneld deletes flannel-wg
    // when it stops; the agent, reading flanneld's key file, makes it again with the same key
    // (the lease unchanged) and the peers, and traffic resumes.
    let key3 = ok("key", c.node(3).ns.run("wg", &["show", "flannel-wg", "public-key"]));
    take_over_under_a_stream(&mut c, 1, 3, 7022, Some("flannel-wg"));
    let status = ok("status", c.node(3).agent_cli(&["status"]));
    assert!(status.contains("device=flannel-wg") && status.contains(&format!("public_key={}", key3.trim())) && status.contains("peers=2"), "{status}");

    // The node departs (its agent stopped, its lease deleted): its peer goes from both agents.
    ok("stop", c.stop_agent(3));
    ok("delete", c.etcd().etcdctl(&["del", &format!("/coreos.com/network/subnets/{}-24", c.node(3).subnet.network())]));
    for i in [1, 2] {
        let has = |n: &overlay_tests::Node| n.ns.run("wg", &["show", "flannel-wg", "peers"]).map(|o| o.contains(key3.trim())).unwrap_or(true);
        assert!(wait_until(Duration::from_secs(30), || !has(c.node(i))), "node {i} still has the departed peer");
    }
}

/// Whether the kernel can make a wireguard device (`tag` names the probe). Where it cannot,
/// the VM matrix must not be running (Debian's kernels have the module): the test says it
/// runs there and returns false.
fn wireguard_module(tag: &str, what: &str) -> bool {
    if kernel_can_make(tag, &["type", "wireguard"]) {
        return true;
    }
    assert!(std::env::var("OVERLAY_EXPECT_KERNEL").is_err(), "Debian's kernel has the wireguard module");
    eprintln!("no wireguard module here: the {what} test runs in the VM matrix");
    false
}

/// A dual-stack agent's IPv6 subnet, from its subnet file.
fn subnet6_of(n: &overlay_tests::Node) -> ipnet::Ipv6Net {
    let text = std::fs::read_to_string(&n.subnet_file).expect("subnet file");
    let line = text.lines().find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET=")).unwrap_or_else(|| panic!("no FLANNEL_IPV6_SUBNET in:\n{text}"));
    line.parse::<ipnet::Ipv6Net>().expect("an IPv6 CIDR").trunc()
}

/// The `i`th address of `net`.
fn host6(net: ipnet::Ipv6Net, i: u128) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(u128::from(net.network()) + i)
}

/// A dual-stack node's containers given IPv6 from `s6` (the harness gives them IPv4 only):
/// docker0 the subnet's first address, container k the (k+2)th with a default route via
/// docker0 at the node's MTU; the node forwards IPv6.
fn give_containers_ipv6(n: &overlay_tests::Node, s6: ipnet::Ipv6Net) {
    let gw = host6(s6, 1);
    ok("docker0 v6", n.ns.run("ip", &["addr", "add", &format!("{gw}/64"), "dev", "docker0", "nodad"]));
    for (k, ct) in n.containers.iter().enumerate() {
        ok("container v6", ct.run("ip", &["addr", "add", &format!("{}/64", host6(s6, k as u128 + 2)), "dev", "eth0", "nodad"]));
        ok("container v6 route", ct.run("ip", &["-6", "route", "add", "default", "via", &gw.to_string(), "mtu", &n.mtu.to_string()]));
    }
    ok("v6 forwarding", n.ns.sysctl("net.ipv6.conf.all.forwarding", "1"));
}

/// The wireguard network's dual-stack config (Mode separate: flannel-wg and flannel-wg-v6).
fn dual_stack_wireguard_config() -> String {
    format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"wireguard","PSK":"{}","PersistentKeepaliveInterval":{}}}}}"#,
        overlay_tests::WIREGUARD_PSK,
        overlay_tests::WIREGUARD_KEEPALIVE
    )
}

/// The stock node of `c` (node `index`, set up by the harness as flannel's IPv4 wireguard
/// node) made dual-stack as flannel makes it in Mode separate: flannel-wg-v6 with the same
/// private key (its key file) and port 51821, the MTU of flannel-wg, the IPv6 subnet's network
/// address as a /128, the IPv6 network routed through it (scope link); its lease replaced by
/// the dual-stack one flannel writes (key `<v4>-24&<v6>-64`, `PublicIPv6`, `BackendV6Data`).
fn make_stock_wireguard_node_dual_stack(c: &Cluster, index: usize, s6: ipnet::Ipv6Net) {
    let n = c.node(index);
    let key = n.log.with_extension("wgkey");
    ok("v6 device", n.ns.run("ip", &["link", "add", "flannel-wg-v6", "type", "wireguard"]));
    ok("v6 key", n.ns.run("wg", &["set", "flannel-wg-v6", "private-key", &key.display().to_string(), "listen-port", "51821"]));
    ok("v6 up", n.ns.run("ip", &["link", "set", "flannel-wg-v6", "mtu", &n.mtu.to_string(), "up"]));
    ok("v6 addr", n.ns.run("ip", &["-6", "addr", "add", &format!("{}/128", s6.network()), "dev", "flannel-wg-v6", "nodad"]));
    ok("v6 route", n.ns.run("ip", &["-6", "route", "replace", "fd00:10:244::/56", "dev", "flannel-wg-v6", "scope", "link"]));
    let public_key = ok("key", n.ns.run("wg", &["show", "flannel-wg", "public-key"]));
    let value = format!(
        r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"wireguard","BackendData":{{"PublicKey":"{k}","Port":51820}},"BackendV6Data":{{"PublicKey":"{k}","Port":51821}}}}"#,
        n.underlay_ip,
        overlay_tests::underlay_ipv6(n.index),
        k = public_key.trim()
    );
    ok("old lease", c.etcd().etcdctl(&["del", &format!("/coreos.com/network/subnets/{}-24", n.subnet.network())]));
    ok("lease", c.etcd().etcdctl(&["put", &format!("/coreos.com/network/subnets/{}-24&{}-64", n.subnet.network(), s6.network()), &value]));
}

/// flannel's addPeer on a stock node's flannel-wg-v6: the peer's key, endpoint
/// [PublicIPv6]:51821, allowed IPs its IPv6 subnet, the PSK and keepalive.
fn stock_ipv6_peer(from: &overlay_tests::Node, to: &overlay_tests::Node, to_ipv6: std::net::Ipv6Addr, s6: ipnet::Ipv6Net) {
    let key = ok("key", to.ns.run("wg", &["show", "flannel-wg-v6", "public-key"]));
    let psk = from.log.with_extension("stock-psk");
    ok("psk", std::fs::write(&psk, overlay_tests::WIREGUARD_PSK).map_err(anyhow::Error::from));
    ok(
        "stock v6 peer",
        from.ns.run(
            "wg",
            &[
                "set", "flannel-wg-v6", "peer", key.trim(), "endpoint", &format!("[{to_ipv6}]:51821"), "allowed-ips", &s6.to_string(),
                "preshared-key", &psk.display().to_string(), "persistent-keepalive", &overlay_tests::WIREGUARD_KEEPALIVE.to_string(),
            ],
        ),
    );
}

/// flannel's wireguard backend with one device for both families (dual stack, Mode `ipv6`),
/// where the kernel has the module: two agents whose flannel-wg carries IPv4 and IPv6 (no
/// flannel-wg-v6), each peer with both subnets as allowed IPs and its IPv6 endpoint at the
/// port its one device listens on (which their leases' BackendV6Data names), and a stock
/// node made as flannel makes a Mode ipv6 node (its peers at [PublicIPv6]:51820, the port our
/// leases name; its own lease names ListenPortV6 51821, as flannel's); ping both families and
/// TCP over IPv6 between all three both ways; flannel-wg deleted under an agent put back with
/// both addresses, both routes and its peers.
#[test]
fn one_device_wireguard_nodes_carry_both_families_with_a_stock_node() {
    require_root();
    if !wireguard_module("wg1d", "one-device wireguard") {
        return;
    }
    let config = dual_stack_wireguard_config().replace(r#""Type":"wireguard","#, r#""Type":"wireguard","Mode":"ipv6","#);
    assert!(config.contains(r#""Mode":"ipv6""#), "{config}");
    let spec = ClusterSpec {
        control: Control::Etcd { tls: false, config },
        ipv6_underlay: true,
        nodes: vec![NodeKind::Agent { decap_hook: "auto" }, NodeKind::Agent { decap_hook: "auto" }, NodeKind::StockFlannel],
        full_mesh: false,
        ..ClusterSpec::etcd(Backend::Wireguard, "auto", 3)
    };
    let c = Cluster::new("kmw1d", &spec).unwrap_or_else(|e| panic!("building the one-device wireguard cluster failed: {e:#}"));
    let stock6: ipnet::Ipv6Net = "fd00:10:244:67::/64".parse().unwrap();
    let sub6 = [subnet6_of(c.node(1)), subnet6_of(c.node(2)), stock6];
    // The stock node as flannel makes a Mode ipv6 node: flannel-wg (made by the harness, port
    // 51820) given the IPv6 subnet's address and the IPv6 network's route too, and the
    // dual-stack lease flannel writes (BackendV6Data's port is ListenPortV6, 51821).
    let n3 = c.node(3);
    ok("v6 addr", n3.ns.run("ip", &["-6", "addr", "add", &format!("{}/128", stock6.network()), "dev", "flannel-wg", "nodad"]));
    ok("v6 route", n3.ns.run("ip", &["-6", "route", "replace", overlay_tests::NETWORK6, "dev", "flannel-wg", "scope", "link"]));
    let pk3 = ok("key", n3.ns.run("wg", &["show", "flannel-wg", "public-key"]));
    let value = format!(
        r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"wireguard","BackendData":{{"PublicKey":"{k}","Port":51820}},"BackendV6Data":{{"PublicKey":"{k}","Port":51821}}}}"#,
        n3.underlay_ip,
        overlay_tests::underlay_ipv6(3),
        k = pk3.trim()
    );
    ok("old lease", c.etcd().etcdctl(&["del", &format!("/coreos.com/network/subnets/{}-24", n3.subnet.network())]));
    ok("lease", c.etcd().etcdctl(&["put", &format!("/coreos.com/network/subnets/{}-24&{}-64", n3.subnet.network(), stock6.network()), &value]));
    let psk = n3.log.with_extension("stock-psk");
    ok("psk", std::fs::write(&psk, overlay_tests::WIREGUARD_PSK).map_err(anyhow::Error::from));
    for i in [1, 2] {
        let n = c.node(i);
        let key = ok("key", n.ns.run("wg", &["show", "flannel-wg", "public-key"]));
        ok(
            "stock peer",
            n3.ns.run(
                "wg",
                &[
                    "set", "flannel-wg", "peer", key.trim(), "endpoint", &format!("[{}]:51820", overlay_tests::underlay_ipv6(i)),
                    "allowed-ips", &format!("{},{}", n.subnet, sub6[i - 1]), "preshared-key", &psk.display().to_string(),
                    "persistent-keepalive", &overlay_tests::WIREGUARD_KEEPALIVE.to_string(),
                ],
            ),
        );
        assert!(n.ns.run("ip", &["link", "show", "flannel-wg-v6"]).is_err(), "node {i} made flannel-wg-v6 in Mode ipv6");
        let addrs = ok("addr", n.ns.run("ip", &["addr", "show", "dev", "flannel-wg"]));
        assert!(addrs.contains(&format!("inet {}/32", n.subnet.network())) && addrs.contains(&format!("inet6 {}/128", sub6[i - 1].network())), "{addrs}");
    }
    for (i, n) in [c.node(1), c.node(2), c.node(3)].into_iter().enumerate() {
        give_containers_ipv6(n, sub6[i]);
    }
    seed_forward_rules(&c);
    let ct6 = |node: usize, k: u128| host6(sub6[node - 1], k + 2);
    let all_up = || [(1, 2), (2, 1), (1, 3), (3, 2)].iter().all(|&(a, b)| {
        ping6(&c.node(a).containers[0], ct6(b, 0), 1).is_ok() && ping(&c.node(a).containers[0], c.node(b).container_ip(0), 1).is_ok()
    });
    assert!(
        wait_until(Duration::from_secs(60), all_up),
        "no traffic between the containers:\n{}\n{}",
        c.node(1).log_text(),
        ok("wg", c.node(1).ns.run("wg", &["show", "flannel-wg"]))
    );
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        ok(&format!("ping {a} -> {b}"), ping(&c.node(a).containers[0], c.node(b).container_ip(1), 2));
        ok(&format!("ping6 {a} -> {b}"), ping6(&c.node(a).containers[0], ct6(b, 1), 2));
        ok(&format!("TCP6 {a} -> {b}"), tcp_transfer6(&c.node(a).containers[1], &c.node(b).containers[0], ct6(b, 0), 1 << 20));
    }
    // Each agent's peers: IPv6 endpoints at the port the peer's one device listens on, both
    // subnets allowed.
    for i in [1, 2] {
        let endpoints = ok("endpoints", c.node(i).ns.run("wg", &["show", "flannel-wg", "endpoints"]));
        assert_eq!(endpoints.lines().count(), 2, "{endpoints}");
        assert!(endpoints.lines().all(|l| l.contains("]:51820")), "node {i}: {endpoints}");
        // The stock node's peer: both its subnets on the one peer.
        let allowed = ok("allowed", c.node(i).ns.run("wg", &["show", "flannel-wg", "allowed-ips"]));
        let line = allowed.lines().find(|l| l.starts_with(pk3.trim())).unwrap_or_else(|| panic!("node {i} has no peer for node 3: {allowed}"));
        let mut nets: Vec<&str> = line.split_whitespace().skip(1).collect();
        nets.sort();
        assert_eq!(nets, [c.node(3).subnet.to_string(), stock6.to_string()], "node {i}: {allowed}");
        // Its lease names flannel-wg's port on the IPv6 side too (where that device listens).
        let key = format!("/coreos.com/network/subnets/{}-24&{}-64", c.node(i).subnet.network(), sub6[i - 1].network());
        let lease: serde_json::Value = serde_json::from_str(ok("lease", c.etcd().etcdctl(&["get", &key, "--print-value-only"])).trim()).expect("lease JSON");
        assert_eq!((lease["BackendData"]["Port"].as_u64(), lease["BackendV6Data"]["Port"].as_u64()), (Some(51820), Some(51820)), "{lease}");
        let status = ok("status", c.node(i).agent_cli(&["status"]));
        assert!(status.contains("device=flannel-wg ") && status.contains("peers=2") && !status.contains("v6_device"), "node {i}: {status}");
    }
    // flannel-wg deleted under node 1's agent: put back with both addresses, routes and peers.
    ok("delete", c.node(1).ns.run("ip", &["link", "del", "flannel-wg"]));
    assert!(
        wait_until(Duration::from_secs(30), || c.node(1).ns.run("wg", &["show", "flannel-wg", "peers"]).is_ok_and(|p| p.lines().count() == 2)
            && ping6(&c.node(1).containers[0], ct6(3, 0), 1).is_ok()
            && ping(&c.node(1).containers[0], c.node(3).container_ip(0), 1).is_ok()),
        "flannel-wg was not restored:\n{}",
        c.node(1).log_text()
    );
}

/// flannel's wireguard backend in an IPv6-only network (EnableIPv4 false, Mode separate),
/// where the kernel has the module: two agents with flannel-wg-v6 alone (no flannel-wg),
/// leases as flannel writes them (PublicIP 0.0.0.0, BackendV6Data only), and a stock flannel
/// IPv6-only wireguard node set up with `wg`; IPv6 ping and TCP between all three both ways;
/// `status` on flannel-wg-v6; a departed node's peer removed.
#[test]
fn ipv6_only_wireguard_nodes_interoperate_with_a_stock_node() {
    require_root();
    if !wireguard_module("wg6o", "IPv6-only wireguard") {
        return;
    }
    let config = format!(
        r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{}","Backend":{{"Type":"wireguard","PSK":"{}","PersistentKeepaliveInterval":{}}}}}"#,
        overlay_tests::NETWORK6,
        overlay_tests::WIREGUARD_PSK,
        overlay_tests::WIREGUARD_KEEPALIVE
    );
    let spec = ClusterSpec {
        control: Control::Etcd { tls: false, config },
        ipv6_only: true,
        nodes: vec![NodeKind::Agent { decap_hook: "auto" }, NodeKind::Agent { decap_hook: "auto" }, NodeKind::StockFlannel],
        full_mesh: false,
        ..ClusterSpec::etcd(Backend::Wireguard, "auto", 3)
    };
    let mut c = Cluster::new("kmw6o", &spec).unwrap_or_else(|e| panic!("building the IPv6-only wireguard cluster failed: {e:#}"));
    let s6 = |c: &Cluster, i: usize| c.node(i).subnet6.expect("an IPv6 subnet");
    for i in [1, 2] {
        let n = c.node(i);
        let key = format!("/coreos.com/network/subnets/0.0.0.0-0&{}-64", s6(&c, i).network());
        let value = ok("lease", c.etcd().etcdctl(&["get", &key, "--print-value-only"]));
        let v: serde_json::Value = serde_json::from_str(value.trim()).unwrap_or_else(|e| panic!("lease {key}: {e}: {value:?}"));
        let public_key = ok("key", n.ns.run("wg", &["show", "flannel-wg-v6", "public-key"]));
        assert_eq!(v["PublicIP"], "0.0.0.0", "{v}");
        assert_eq!(v["PublicIPv6"], overlay_tests::underlay_ipv6(i).to_string(), "{v}");
        assert_eq!(v["BackendV6Data"]["PublicKey"], public_key.trim(), "{v}");
        assert_eq!(v["BackendV6Data"]["Port"], 51821, "{v}");
        assert!(v.get("BackendData").is_none(), "no IPv4 side: {v}");
        assert!(n.ns.run("ip", &["link", "show", "flannel-wg"]).is_err(), "node {i} made flannel-wg in an IPv6-only network");
        assert_eq!(ok("mtu", overlay_tests::link_mtu(&n.ns, "flannel-wg-v6")), n.mtu, "FLANNEL_MTU is the device's");
        let status = ok("status", n.agent_cli(&["status"]));
        assert!(status.contains("device=flannel-wg-v6 ") && status.contains("backend=wireguard") && status.contains("ready=true"), "node {i}: {status}");
    }
    for i in [1, 2] {
        stock_ipv6_peer(c.node(3), c.node(i), overlay_tests::underlay_ipv6(i), s6(&c, i));
    }
    for n in [c.node(1), c.node(2), c.node(3)] {
        ok("v6 forwarding", n.ns.sysctl("net.ipv6.conf.all.forwarding", "1"));
    }
    assert!(
        wait_until(Duration::from_secs(60), || [(1, 2), (2, 1), (1, 3), (3, 2)].iter().all(|&(a, b)| ping6(&c.node(a).containers[0], c.node(b).container_ip6(0), 1).is_ok())),
        "no IPv6 between the containers:\n{}\n{}",
        c.node(1).log_text(),
        ok("wg", c.node(1).ns.run("wg", &["show", "flannel-wg-v6"]))
    );
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        ok(&format!("ping6 {a} -> {b}"), ping6(&c.node(a).containers[0], c.node(b).container_ip6(1), 2));
        ok(&format!("TCP6 {a} -> {b}"), tcp_transfer6(&c.node(a).containers[1], &c.node(b).containers[0], c.node(b).container_ip6(0), 1 << 20));
    }
    // Node 2 departs: its peer goes from node 1.
    let pk2 = ok("key", c.node(2).ns.run("wg", &["show", "flannel-wg-v6", "public-key"]));
    ok("stop", c.stop_agent(2));
    ok("delete", c.etcd().etcdctl(&["del", &format!("/coreos.com/network/subnets/0.0.0.0-0&{}-64", s6(&c, 2).network())]));
    let has = || c.node(1).ns.run("wg", &["show", "flannel-wg-v6", "peers"]).map(|o| o.contains(pk2.trim())).unwrap_or(true);
    assert!(wait_until(Duration::from_secs(30), || !has()), "node 1 still has node 2's peer");
}

/// flannel's wireguard backend in a dual-stack network (Mode separate), where the kernel has
/// the module (the VM matrix's Debian kernels): two agents, each with flannel-wg and
/// flannel-wg-v6 (the same key, ports 51820 and 51821), and a stock flannel node set up with
/// `wg` as flannel makes a dual-stack wireguard node; leases with BackendV6Data as flannel
/// writes them; IPv6 ping and TCP between all three both ways through flannel-wg-v6 (IPv4
/// still through flannel-wg); `status` naming both devices; flannel-wg-v6 deleted by hand put
/// back with its peers; a node's public IPv6 address changed under it followed into its
/// lease (and by its peers' endpoints); a departed node's IPv6 peer removed; `teardown`
/// removing both devices; a node whose network lost IPv6 removing flannel-wg-v6.
#[test]
fn dual_stack_wireguard_nodes_interoperate_with_a_stock_node_over_ipv6() {
    require_root();
    if !wireguard_module("wg6", "dual-stack wireguard") {
        return;
    }
    let spec = ClusterSpec {
        control: Control::Etcd { tls: false, config: dual_stack_wireguard_config() },
        ipv6_underlay: true,
        nodes: vec![NodeKind::Agent { decap_hook: "auto" }, NodeKind::Agent { decap_hook: "auto" }, NodeKind::StockFlannel],
        full_mesh: false,
        ..ClusterSpec::etcd(Backend::Wireguard, "auto", 3)
    };
    let mut c = Cluster::new("kmw6", &spec).unwrap_or_else(|e| panic!("building the dual-stack wireguard cluster failed: {e:#}"));
    let stock6: ipnet::Ipv6Net = "fd00:10:244:67::/64".parse().unwrap();
    make_stock_wireguard_node_dual_stack(&c, 3, stock6);
    let lease_key = |n: &overlay_tests::Node, s6: ipnet::Ipv6Net| format!("/coreos.com/network/subnets/{}-24&{}-64", n.subnet.network(), s6.network());
    let lease = |c: &Cluster, key: &str| -> serde_json::Value {
        let value = ok("lease", c.etcd().etcdctl(&["get", key, "--print-value-only"]));
        serde_json::from_str(value.trim()).unwrap_or_else(|e| panic!("lease {key}: {e}: {value:?}"))
    };
    let mut sub6 = Vec::new();
    for n in [c.node(1), c.node(2), c.node(3)] {
        let s6 = if n.kind == NodeKind::StockFlannel { stock6 } else { subnet6_of(n) };
        if n.kind != NodeKind::StockFlannel {
            let v = lease(&c, &lease_key(n, s6));
            let public_key = ok("key", n.ns.run("wg", &["show", "flannel-wg", "public-key"]));
            assert_eq!(v["BackendData"]["PublicKey"], public_key.trim(), "{v}");
            assert_eq!(v["BackendV6Data"]["PublicKey"], public_key.trim(), "one key for both devices: {v}");
            assert_eq!(v["BackendV6Data"]["Port"], 51821, "{v}");
            assert_eq!(v["PublicIPv6"], overlay_tests::underlay_ipv6(n.index).to_string(), "{v}");
            let key6 = ok("key6", n.ns.run("wg", &["show", "flannel-wg-v6", "public-key"]));
            assert_eq!(key6.trim(), public_key.trim());
        }
        give_containers_ipv6(n, s6);
        sub6.push(s6);
    }
    // The stock node's peers, as its flanneld would add them from the agents' leases.
    for i in [1, 2] {
        ok("stock peer", c.add_route(c.node(3), c.node(i)));
        stock_ipv6_peer(c.node(3), c.node(i), overlay_tests::underlay_ipv6(i), sub6[i - 1]);
    }
    seed_forward_rules(&c);
    let ct6 = |node: usize, k: u128| host6(sub6[node - 1], k + 2);
    assert!(
        wait_until(Duration::from_secs(60), || [(1, 2), (2, 1), (1, 3), (3, 2)].iter().all(|&(a, b)| ping6(&c.node(a).containers[0], ct6(b, 0), 1).is_ok())),
        "no IPv6 between the containers:\n{}\n{}",
        c.node(1).log_text(),
        ok("wg", c.node(1).ns.run("wg", &["show", "flannel-wg-v6"]))
    );
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2)] {
        ok(&format!("ping6 {a} -> {b}"), ping6(&c.node(a).containers[0], ct6(b, 1), 2));
        ok(&format!("TCP6 {a} -> {b}"), tcp_transfer6(&c.node(a).containers[1], &c.node(b).containers[0], ct6(b, 0), 1 << 20));
    }
    // IPv4 still flows through flannel-wg, the stock node's included.
    ok("ping 1 -> 3", ping(&c.node(1).containers[0], c.node(3).container_ip(0), 2));
    let status = ok("status", c.node(1).agent_cli(&["status"]));
    for want in ["device=flannel-wg ", "ready=true", "v6_device=flannel-wg-v6", "v6_listen_port=51821", "v6_peers=2"] {
        assert!(status.contains(want), "{want} not in: {status}");
    }

    // flannel-wg-v6 deleted under the agent: put back with its key, port and peers.
    ok("delete v6 device", c.node(1).ns.run("ip", &["link", "del", "flannel-wg-v6"]));
    assert!(
        wait_until(Duration::from_secs(30), || c.node(1).ns.run("wg", &["show", "flannel-wg-v6", "peers"]).is_ok_and(|p| p.lines().count() == 2)
            && ping6(&c.node(1).containers[0], ct6(3, 0), 1).is_ok()),
        "flannel-wg-v6 was not restored:\n{}",
        c.node(1).log_text()
    );
    assert!(c.node(1).log_text().contains("wireguard IPv6 device restored"), "{}", c.node(1).log_text());
    let port = ok("port", c.node(1).ns.run("wg", &["show", "flannel-wg-v6", "listen-port"]));
    assert_eq!(port.trim(), "51821");

    // Node 2's public IPv6 address changes (SLAAC, an operator): its lease follows (same
    // subnets), node 1's peer endpoint follows the lease, the stock node's is moved as its
    // flanneld would, and IPv6 flows to it again.
    let (old6, new6) = (overlay_tests::underlay_ipv6(2), std::net::Ipv6Addr::from(u128::from(overlay_tests::underlay_ipv6(2)) + 0x100));
    // Node 2 may not reach node 1's flannel-wg-v6 meanwhile: wireguard's roaming would move
    // node 1's endpoint by itself on the first datagram from the new address.
    let block = ["OUTPUT", "-p", "udp", "-d", &overlay_tests::underlay_ipv6(1).to_string(), "--dport", "51821", "-j", "DROP"];
    ok("block", c.node(2).ns.run("ip6tables", &[&["-w", "-I"][..], &block[..]].concat()));
    ok("new address", c.node(2).ns.run("ip", &["-6", "addr", "add", &format!("{new6}/64"), "dev", "eth0", "nodad"]));
    ok("old address", c.node(2).ns.run("ip", &["-6", "addr", "del", &format!("{old6}/64"), "dev", "eth0"]));
    let key2 = lease_key(c.node(2), sub6[1]);
    assert!(
        wait_until(Duration::from_secs(30), || lease(&c, &key2)["PublicIPv6"] == new6.to_string()),
        "node 2's lease did not follow its address: {}\n{}",
        lease(&c, &key2),
        c.node(2).log_text()
    );
    let endpoint = format!("[{new6}]:51821");
    assert!(
        wait_until(Duration::from_secs(30), || c.node(1).ns.run("wg", &["show", "flannel-wg-v6", "endpoints"]).is_ok_and(|e| e.contains(&endpoint))),
        "node 1's peer for node 2 did not follow the lease: {}",
        ok("wg", c.node(1).ns.run("wg", &["show", "flannel-wg-v6", "endpoints"]))
    );
    ok("unblock", c.node(2).ns.run("ip6tables", &[&["-w", "-D"][..], &block[..]].concat()));
    stock_ipv6_peer(c.node(3), c.node(2), new6, sub6[1]);
    for from in [1, 3] {
        assert!(wait_until(Duration::from_secs(30), || ping6(&c.node(from).containers[0], ct6(2, 0), 1).is_ok()), "node {from} cannot reach node 2 at its new address");
    }

    // Node 2 departs (its agent stopped, its lease deleted): its IPv6 peer goes from node 1's
    // flannel-wg-v6.
    let pk2 = ok("key", c.node(2).ns.run("wg", &["show", "flannel-wg", "public-key"]));
    ok("stop", c.stop_agent(2));
    ok("delete", c.etcd().etcdctl(&["del", &key2]));
    let has = || c.node(1).ns.run("wg", &["show", "flannel-wg-v6", "peers"]).map(|o| o.contains(pk2.trim())).unwrap_or(true);
    assert!(wait_until(Duration::from_secs(30), || !has()), "node 1 still has node 2's IPv6 peer");

    // `teardown` removes both devices (flannel removes them when it stops).
    ok("stop 1", c.stop_agent(1));
    ok("teardown", c.node(1).agent_cli(&["teardown"]));
    for dev in ["flannel-wg", "flannel-wg-v6"] {
        assert!(c.node(1).ns.run("ip", &["link", "show", dev]).is_err(), "{dev} left after teardown");
    }

    // The network loses IPv6: node 2's next run removes the flannel-wg-v6 its last run left.
    assert!(c.node(2).ns.run("ip", &["link", "show", "flannel-wg-v6"]).is_ok(), "a stopped agent leaves its devices");
    let v4_only = dual_stack_wireguard_config().replace(r#""EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","#, "");
    assert!(!v4_only.contains("IPv6"), "{v4_only}");
    ok("config", c.etcd().etcdctl(&["put", "/coreos.com/network/config", &v4_only]));
    ok("start 2", c.restart_agent(2));
    assert!(
        wait_until(Duration::from_secs(30), || c.node(2).ns.run("ip", &["link", "show", "flannel-wg-v6"]).is_err()),
        "flannel-wg-v6 stayed in an IPv4-only network:\n{}",
        c.node(2).log_text()
    );
    let status = ok("status", c.node(2).agent_cli(&["status"]));
    assert!(status.contains("ready=true") && !status.contains("v6_device"), "{status}");
}
