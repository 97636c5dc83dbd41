//! `cargo xtask demo`: a local etcd and a 3-node cluster in network namespaces, shown as an
//! operator wants to see it: the leases in etcd, each node's data plane and routes, pings and
//! a transfer between containers on different nodes, and the counters that moved; then two
//! more nodes whose containers a CNI runtime (podman) attaches through the agent's `flannel`
//! plugin. Everything is removed at the end, or on Ctrl-C.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Result;
use overlay_tests::{
    require_root,
    traffic::{ping, tcp_transfer},
    Backend, Cluster, ClusterSpec, NodeKind,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn section(title: &str) {
    println!("\n\x1b[1m== {title} ==\x1b[0m");
}

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
    }
    require_root();
    if let Err(e) = demo(keep) {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn demo(keep: bool) -> Result<()> {
    section("starting etcd, writing the network config, starting 3 nodes with an agent each");
    println!("config: {}", overlay_tests::network_config(Backend::Vxlan));
    let spec = ClusterSpec::etcd(Backend::Vxlan, "auto", 3);
    let cluster = Cluster::new("demo", &spec)?;
    println!("etcd: {} (inside the demo's underlay namespace)", cluster.etcd().endpoint);
    for n in &cluster.nodes {
        println!(
            "node {}  underlay {:<15}  subnet {:<14}  containers {}",
            n.index,
            n.underlay_ip.to_string(),
            n.subnet.to_string(),
            (0..n.containers.len()).map(|k| n.container_ip(k).to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let result = show(&cluster);
    if result.is_ok() && keep && !interrupted() {
        println!("\nThe cluster stays up until Ctrl-C. Explore it, e.g.:");
        let n1 = cluster.node(1);
        println!("  nsenter --net={} {} stats --bpffs-dir {}", n1.ns.path(), overlay_tests::agent_bin().display(), n1.bpffs_dir.display());
        println!("  bpftool map dump pinned {}/VTEP_BY_SUBNET", n1.bpffs_dir.display());
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let result = result.and_then(|()| if interrupted() { Ok(()) } else { cni() });
    section("cleaning up: agents, bpffs pins, namespaces");
    drop(cluster);
    println!("done; nothing left behind");
    result
}

fn show(c: &Cluster) -> Result<()> {
    section("leases in etcd (etcdctl get --prefix /coreos.com/network/subnets)");
    print!("{}", c.etcd().etcdctl(&["get", "--prefix", "/coreos.com/network/subnets"])?);
    section("the same, as the agent lists them (overlay-agent leases)");
    print!("{}", c.node(1).agent_cli(&["leases", &c.etcd().agent_flags()[0]])?);
    section("each node's subnet file (what docker reads)");
    for n in &c.nodes {
        println!("-- node {} --", n.index);
        print!("{}", std::fs::read_to_string(&n.subnet_file)?);
    }
    // Routes arrive from etcd within milliseconds; give a loaded machine a moment.
    overlay_tests::wait_until(Duration::from_secs(5), || c.nodes.iter().all(|n| n.routes().len() == c.nodes.len() - 1));
    section("data plane and routes on each node (overlay-agent status / routes)");
    for n in &c.nodes {
        println!("-- node {} --", n.index);
        print!("{}", n.agent_cli(&["status"])?);
        print!("{}", n.agent_cli(&["routes"])?);
    }
    if interrupted() {
        return Ok(());
    }
    section("ping between containers on different nodes");
    for a in &c.nodes {
        for b in &c.nodes {
            if a.index == b.index || interrupted() {
                continue;
            }
            let (src, dst) = (a.container_ip(0), b.container_ip(1));
            let verdict = match ping(&a.containers[0], dst, 3) {
                Ok(()) => "ok (3/3 replies)".to_string(),
                Err(e) => format!("FAILED: {e:#}"),
            };
            println!("node {} {src:<12} -> node {} {dst:<12} {verdict}", a.index, b.index);
        }
    }
    section("TCP transfers between containers (every byte checked)");
    for (from, to) in [(1, 2), (3, 1)] {
        if interrupted() {
            return Ok(());
        }
        let (a, b) = (c.node(from), c.node(to));
        let t = tcp_transfer(&a.containers[0], &b.containers[1], b.container_ip(1), 256 << 20)?;
        println!(
            "node {from} -> node {to}: {} MiB in {:.2} s ({:.1} Gbit/s; a debug-built demo, not a benchmark)",
            t.bytes >> 20,
            t.elapsed.as_secs_f64(),
            t.bytes as f64 * 8.0 / t.elapsed.as_secs_f64() / 1e9
        );
    }
    section("counters that moved (overlay-agent stats)");
    for n in &c.nodes {
        println!("-- node {} --", n.index);
        let stats = n.agent_cli(&["stats"])?;
        for line in stats.lines() {
            let zero = line.split_whitespace().nth(1) == Some("0") && !line.starts_with("OUTCOME");
            if !zero && !line.is_empty() {
                println!("{line}");
            }
        }
    }
    Ok(())
}

/// Two nodes of their own (docker0 and cni0 must not own the same subnet), each with the
/// agent's CNI plugin and kube-flannel's conflist installed by `overlay-agent install-cni`,
/// and a podman container on each pinging the other's.
fn cni() -> Result<()> {
    section("containers from a CNI runtime: podman (CNI backend) on two more nodes");
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "auto" }, NodeKind::Agent { decap_hook: "auto" }],
        containers_per_node: 0,
        full_mesh: false,
        ..ClusterSpec::etcd(Backend::Vxlan, "auto", 2)
    };
    let c = Cluster::new("dcni", &spec)?;
    let rootfs = overlay_tests::podman::busybox_rootfs(&c.workdir)?;
    let mut nodes = Vec::new();
    for n in &c.nodes {
        let (mut podman, dir) = overlay_tests::podman::cni_node(&c, n)?;
        println!("node {}: overlay-agent install-cni -> {} and {}", n.index, dir.join("bin/flannel").display(), dir.join("net.d/10-flannel.conflist").display());
        podman.run_container("c1", "cbr0", &rootfs, &[], &["/bin/busybox", "sleep", "3600"])?;
        let ip = podman.ipv4("c1")?;
        println!("node {}: podman run --network cbr0 ... -> container c1 at {ip} (subnet {})", n.index, n.subnet);
        nodes.push((podman, ip));
    }
    for (a, b) in [(0, 1), (1, 0)] {
        let ping = || nodes[a].0.exec("c1", &["/bin/busybox", "ping", "-c", "3", "-W", "2", &nodes[b].1.to_string()]);
        let ok = overlay_tests::wait_until(Duration::from_secs(20), || ping().is_ok());
        println!("node {} podman {} -> node {} podman {}: {}", a + 1, nodes[a].0.ipv4("c1")?, b + 1, nodes[b].1, if ok { "ok" } else { "FAILED" });
        if !ok {
            anyhow::bail!("podman containers on the overlay could not reach each other");
        }
    }
    drop(nodes);
    drop(c);
    Ok(())
}
