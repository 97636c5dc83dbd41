//! The TUN data plane (`--dataplane tun`, flannel's udp backend design) against a real etcd:
//! TUN <-> eBPF udp and TUN <-> TUN traffic, the TTL decrements on both sides of the proxy,
//! and ICMP net-unreachable for destinations no lease covers.

use overlay_tests::{
    require_root,
    traffic::{ping, tcp_transfer},
    Backend, Cluster, ClusterSpec, NodeKind,
};

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// The TTL of the first echo reply.
fn reply_ttl(c: &Cluster, from: usize, to: usize) -> u8 {
    let out = ok("ping", c.node(from).containers[0].run("ping", &["-c", "1", "-W", "3", &c.node(to).container_ip(1).to_string()]));
    let ttl = out.split_whitespace().find_map(|w| w.strip_prefix("ttl=")).unwrap_or_else(|| panic!("no ttl in {out}"));
    ttl.parse().unwrap()
}

#[test]
fn tun_nodes_interoperate_with_ebpf_udp_nodes_and_each_other() {
    require_root();
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "tc" }, NodeKind::TunAgent, NodeKind::TunAgent],
        ..ClusterSpec::etcd(Backend::Udp, "tc", 3)
    };
    let c = Cluster::new("tn", &spec).unwrap_or_else(|e| panic!("cluster: {e:#}"));
    let (ebpf, t2, t3) = (c.node(1), c.node(2), c.node(3));
    // A physical NIC (or the kernel, for one without checksum offload) fills in the inner TCP
    // checksum of CHECKSUM_PARTIAL packets before they reach the wire; a veth underlay passes
    // them on half-computed, which only the kernel on the other side trusts. The TUN path
    // hands payloads to userspace, so make the veth behave like a wire.
    for n in &c.nodes {
        ok("ethtool", n.ns.run("ethtool", &["-K", "eth0", "tx", "off"]));
    }
    assert!(t2.log_text().contains("TUN data plane up"), "{}", t2.log_text());
    for (a, b) in [(ebpf, t2), (t2, ebpf), (t2, t3), (t3, t2), (ebpf, t3)] {
        ok(&format!("ping {} -> {}", a.index, b.index), ping(&a.containers[0], b.container_ip(1), 3));
    }
    ok("TCP eBPF -> TUN", tcp_transfer(&ebpf.containers[0], &t2.containers[0], t2.container_ip(0), 16 << 20));
    ok("TCP TUN -> eBPF", tcp_transfer(&t3.containers[0], &ebpf.containers[1], ebpf.container_ip(1), 16 << 20));
    ok("TCP TUN -> TUN", tcp_transfer(&t2.containers[1], &t3.containers[1], t3.container_ip(1), 16 << 20));

    // Each router on the way takes one off the TTL: the eBPF path adds none (64 -> 62 across
    // two kernels); flannel's proxy decrements on both sides, so every TUN end adds two.
    assert_eq!(reply_ttl(&c, 2, 1), 62 - 1, "eBPF node replying to a TUN node: proxy decap adds one");
    assert_eq!(reply_ttl(&c, 1, 2), 62 - 1, "TUN node replying to an eBPF node: proxy encap adds one");
    assert_eq!(reply_ttl(&c, 2, 3), 62 - 2, "TUN to TUN: encap and decap both decrement");

    // No lease covers 10.244.250.0/24: the TUN node answers net-unreachable, as flannel does.
    let out = t2.containers[0].run("ping", &["-c", "1", "-W", "2", "10.244.250.9"]);
    let text = match out {
        Ok(o) => o,
        Err(e) => format!("{e:#}"),
    };
    assert!(text.contains("Destination Net Unreachable"), "{text}");
}
