//! Containers of a CNI runtime on the overlay: the agent installed as flannel's CNI plugin
//! (`overlay-agent install-cni`, kube-flannel's conflist unchanged but for `subnetFile` and
//! `dataDir`), driven by a real runtime (Debian's podman with its CNI backend) delegating to
//! Debian's standard plugins (bridge, host-local, portmap). Nodes are as the seed's: strict
//! rp_filter, docker's FORWARD DROP, `--ip-masq`.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use overlay_tests::{podman::Podman, require_root, wait_until, Backend, Cluster, ClusterSpec, Node, NodeKind};
use serde_json::{json, Value};

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

use overlay_tests::podman::DEBIAN_PLUGINS;

/// One node's CNI set-up: the plugin and conflist installed by the agent, podman on them.
struct CniNode {
    dir: PathBuf,
    podman: Podman,
}

/// Install the plugin and kube-flannel's conflist for `node` and start a podman on them; the
/// conflist is kube-flannel's but for the two paths.
fn cni_node(c: &Cluster, node: &Node) -> CniNode {
    let (podman, dir) = ok("install-cni and podman", overlay_tests::podman::cni_node(c, node));
    let written: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("net.d/10-flannel.conflist")).unwrap()).unwrap();
    let kube_flannel = json!({"name":"cbr0","cniVersion":"0.3.1","plugins":[
        {"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true},
         "subnetFile": node.subnet_file, "dataDir": dir.join("data")},
        {"type":"portmap","capabilities":{"portMappings":true}}]});
    assert_eq!(written, kube_flannel);
    assert!(dir.join("bin/flannel").exists(), "the plugin is installed as flannel");
    CniNode { dir, podman }
}

/// Containers on two agent nodes and a stock flannel node (its subnet file written by hand,
/// as flanneld writes it) reach each other by ping and TCP; a port published through the
/// portmap plugin answers from another node; an agent restart leaves running containers
/// alone; removing a container releases its address and its saved delegate configuration.
#[test]
fn podman_containers_on_the_overlay_reach_each_other() {
    require_root();
    assert!(Path::new(DEBIAN_PLUGINS).join("bridge").exists() && Path::new("/usr/bin/podman").exists(), "run `cargo xtask setup` (podman, containernetworking-plugins)");
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "tc" }, NodeKind::Agent { decap_hook: "tc" }, NodeKind::StockFlannel],
        containers_per_node: 0,
        full_mesh: false,
        agent_args: vec!["--ip-masq".into()],
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 3)
    };
    let mut c = Cluster::new("cn", &spec).unwrap_or_else(|e| panic!("building the cluster failed: {e:#}"));
    let stock = c.node(3);
    std::fs::write(&stock.subnet_file, format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={}/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n", Ipv4Addr::from(u32::from(stock.subnet.network()) + 1))).unwrap();
    for ours in [c.node(1), c.node(2)] {
        ok("stock route", c.add_route(stock, ours));
    }
    // docker's FORWARD DROP on our nodes (their forward rules let the overlay through; the
    // stock node, without flanneld's, keeps ACCEPT).
    for i in [1, 2] {
        ok("policy", c.node(i).ns.run("iptables", &["-w", "-P", "FORWARD", "DROP"]));
    }
    let rootfs = ok("rootfs", overlay_tests::podman::busybox_rootfs(&c.workdir));
    let mut nodes: Vec<CniNode> = (1..=3).map(|i| cni_node(&c, c.node(i))).collect();
    let serve = ["/bin/busybox", "nc", "-ll", "-p", "9000", "-e", "/bin/busybox", "echo", "hello from a container"];
    for (k, n) in nodes.iter_mut().enumerate() {
        ok(&format!("run on node {}", k + 1), n.podman.run_container("web", "cbr0", &rootfs, &["-p", "8080:9000"], &serve));
    }
    let ips: Vec<Ipv4Addr> = nodes.iter().map(|n| ok("address", n.podman.ipv4("web"))).collect();
    for (k, ip) in ips.iter().enumerate() {
        let subnet = c.node(k + 1).subnet;
        assert!(subnet.contains(ip) && *ip != subnet.network(), "node {}'s container has {ip}, not of {subnet}", k + 1);
        let mtu = ok("mtu", nodes[k].podman.exec("web", &["/bin/busybox", "cat", "/sys/class/net/eth0/mtu"]));
        assert_eq!(mtu.trim(), "1450", "the delegate's MTU is FLANNEL_MTU");
    }
    // Every pair, both ways: ping, and a TCP exchange.
    let ping = |from: &CniNode, to: Ipv4Addr| from.podman.exec("web", &["/bin/busybox", "ping", "-c", "1", "-W", "2", &to.to_string()]);
    for a in 0..3 {
        for b in 0..3 {
            if a == b {
                continue;
            }
            assert!(wait_until(Duration::from_secs(30), || ping(&nodes[a], ips[b]).is_ok()), "ping node {} -> node {}", a + 1, b + 1);
            let got = ok("TCP", nodes[a].podman.exec("web", &["/bin/busybox", "nc", "-w", "5", &ips[b].to_string(), "9000"]));
            assert_eq!(got.trim(), "hello from a container", "TCP node {} -> node {}", a + 1, b + 1);
        }
    }
    // The port published through portmap's chain, from another node.
    let published = ok("nc", c.node(2).ns.run("busybox", &["nc", "-w", "5", &c.node(1).underlay_ip.to_string(), "8080"]));
    assert_eq!(published.trim(), "hello from a container");
    // An agent restart leaves the running containers alone.
    ok("restart", c.restart_agent(1));
    assert_eq!(ok("address", nodes[0].podman.ipv4("web")), ips[0]);
    assert!(wait_until(Duration::from_secs(30), || ping(&nodes[1], ips[0]).is_ok()), "ping to node 1's container after the agent's restart");
    // Removing a container releases its address (host-local's store) and its saved delegate.
    let store = nodes[0].podman.ipam_store("cbr0");
    assert!(store.join(ips[0].to_string()).exists(), "host-local holds {} in {}", ips[0], store.display());
    let data = nodes[0].dir.join("data");
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1, "one saved delegate configuration");
    ok("rm", nodes[0].podman.remove("web"));
    assert!(!store.join(ips[0].to_string()).exists(), "the address stays reserved after the container went");
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0, "the saved delegate configuration stays after the container went");
    drop(nodes);
}

/// Call the plugin as a runtime does: `command` with the conflist's flannel entry (with
/// `overrides`) on stdin, in `node`'s namespace; its exit status and stdout as JSON.
fn plugin(node: &Node, dir: &Path, command: &str, container: &str, netns: &str, conf: &Value) -> (bool, Value) {
    let mut child = node
        .ns
        .command(dir.join("bin/flannel").to_str().unwrap())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", format!("{}:{DEBIAN_PLUGINS}", dir.join("bin").display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v)
}

/// Each failure is a CNI error object on stdout with a non-zero exit: no subnet file yet, a
/// subnet file without FLANNEL_SUBNET, a missing delegate, an unknown version, bad JSON, and
/// cni0 holding an address of an earlier lease (fixed when no container uses it, explained
/// when one does). A failed ADD leaves what DEL removes; DEL works twice and after the subnet
/// file is gone.
#[test]
fn the_plugin_fails_as_cni_wants_and_recovers() {
    require_root();
    let spec = ClusterSpec { containers_per_node: 0, full_mesh: false, ..ClusterSpec::etcd(Backend::Vxlan, "tc", 1) };
    let c = Cluster::new("ce", &spec).unwrap_or_else(|e| panic!("building the cluster failed: {e:#}"));
    let n = c.node(1);
    let cn = cni_node(&c, n);
    let conflist: Value = serde_json::from_str(&std::fs::read_to_string(cn.dir.join("net.d/10-flannel.conflist")).unwrap()).unwrap();
    let mut conf = conflist["plugins"][0].clone();
    conf["name"] = conflist["name"].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    let with = |k: &str, v: Value| {
        let mut x = conf.clone();
        x[k] = v;
        x
    };
    // A container namespace of our own (the runtime's part).
    let cns = ok("netns", overlay_tests::Netns::new(&format!("{}-ctr", c.prefix)));
    let expect_err = |what: &str, (good, v): (bool, Value), code: u64, text: &str| {
        assert!(!good, "{what}: succeeded: {v}");
        assert_eq!(v["code"], json!(code), "{what}: {v}");
        assert!(v["msg"].as_str().unwrap_or_default().contains(text), "{what}: {v}");
    };
    let missing = cn.dir.join("nope.env");
    expect_err("no subnet file", plugin(n, &cn.dir, "ADD", "c1", &cns.path(), &with("subnetFile", json!(missing))), 11, "has not written it yet");
    let partial = cn.dir.join("partial.env");
    std::fs::write(&partial, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n").unwrap();
    expect_err("no FLANNEL_SUBNET", plugin(n, &cn.dir, "ADD", "c1", &cns.path(), &with("subnetFile", json!(partial))), 100, "missing FLANNEL_SUBNET");
    std::fs::write(&partial, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.0.300/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n").unwrap();
    expect_err("bad FLANNEL_SUBNET", plugin(n, &cn.dir, "ADD", "c1", &cns.path(), &with("subnetFile", json!(partial))), 100, "is not a CIDR");
    expect_err("no delegate", plugin(n, &cn.dir, "ADD", "c1", &cns.path(), &with("delegate", json!({"type": "nosuchplugin"}))), 101, "nosuchplugin");
    expect_err("version", plugin(n, &cn.dir, "ADD", "c1", &cns.path(), &with("cniVersion", json!("0.9.9"))), 1, "incompatible CNI versions");
    let mut bad = n.ns.command(cn.dir.join("bin/flannel").to_str().unwrap());
    bad.env("CNI_COMMAND", "ADD").env("CNI_CONTAINERID", "c1").env("CNI_NETNS", cns.path()).env("CNI_IFNAME", "eth0").env("CNI_PATH", DEBIAN_PLUGINS);
    let out = bad.stdin(Stdio::null()).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success() && v["code"] == json!(6), "empty stdin: {v}");

    // A good ADD: the container gets an address of the node's subnet.
    let (good, result) = plugin(n, &cn.dir, "ADD", "c1", &cns.path(), &conf);
    assert!(good, "ADD: {result}");
    let ip: ipnet::Ipv4Net = result["ips"][0]["address"].as_str().unwrap_or_default().parse().unwrap_or_else(|e| panic!("{e}: {result}"));
    assert!(n.subnet.contains(&ip.addr()), "{result}");
    // cni0 holding an address of an earlier lease, with a container on it: explained.
    ok("old address", n.ns.run("ip", &["addr", "add", "10.244.250.1/24", "dev", "cni0"]));
    let cns2 = ok("netns", overlay_tests::Netns::new(&format!("{}-ct2", c.prefix)));
    let r = plugin(n, &cn.dir, "ADD", "c2", &cns2.path(), &conf);
    expect_err("cni0 of another lease", r.clone(), 102, "cni0 already has an IP address different from");
    assert!(r.1["msg"].as_str().unwrap().contains("10.244.250.1/24"), "{}", r.1);
    // The failed ADD left its saved configuration: DEL removes it, twice, and with the
    // subnet file gone.
    let subnet_file = n.subnet_file.clone();
    let saved = std::fs::read(&subnet_file).unwrap();
    std::fs::remove_file(&subnet_file).unwrap();
    for round in 0..2 {
        let (good, v) = plugin(n, &cn.dir, "DEL", "c2", &cns2.path(), &conf);
        assert!(good, "DEL c2 round {round}: {v}");
        let (good, v) = plugin(n, &cn.dir, "DEL", "c1", &cns.path(), &conf);
        assert!(good, "DEL c1 round {round}: {v}");
    }
    assert_eq!(std::fs::read_dir(cn.dir.join("data")).unwrap().count(), 0, "DEL left saved configurations");
    std::fs::write(&subnet_file, saved).unwrap();
    // No container on cni0 now: the stale bridge goes and ADD succeeds with the right address.
    let (good, v) = plugin(n, &cn.dir, "ADD", "c3", &cns.path(), &conf);
    assert!(good, "ADD after the bridge was freed: {v}");
    let addrs = ok("cni0", n.ns.run("ip", &["-4", "-o", "addr", "show", "dev", "cni0"]));
    assert!(!addrs.contains("10.244.250.1") && addrs.contains(&format!("{}/24", Ipv4Addr::from(u32::from(n.subnet.network()) + 1))), "{addrs}");
    // A dual-stack subnet file gives a container both families.
    let dual = cn.dir.join("dual.env");
    std::fs::write(&dual, format!(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={}/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        Ipv4Addr::from(u32::from(n.subnet.network()) + 1)
    )).unwrap();
    let cns6 = ok("netns", overlay_tests::Netns::new(&format!("{}-ct6", c.prefix)));
    let (good, v) = plugin(n, &cn.dir, "ADD", "c6", &cns6.path(), &with("subnetFile", json!(dual)));
    assert!(good, "dual-stack ADD: {v}");
    let families: Vec<&str> = v["ips"].as_array().unwrap().iter().filter_map(|i| i["version"].as_str()).collect();
    assert_eq!(families, ["4", "6"], "{v}");
    assert!(v["ips"][1]["address"].as_str().unwrap().starts_with("fd00:10:244:7::"), "{v}");
    let in_ctr = ok("addr", cns6.run("ip", &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"]));
    assert!(in_ctr.contains("fd00:10:244:7::"), "{in_ctr}");
    let routes = ok("routes", cns6.run("ip", &["-6", "route"]));
    assert!(routes.contains("fd00:10:244::/56"), "the IPv6 network's route: {routes}");
    let (good, v) = plugin(n, &cn.dir, "DEL", "c6", &cns6.path(), &with("subnetFile", json!(dual)));
    assert!(good, "{v}");
    // VERSION and STATUS.
    let (good, v) = plugin(n, &cn.dir, "VERSION", "", "", &json!({}));
    assert!(good && v["supportedVersions"].as_array().is_some_and(|a| a.contains(&json!("0.3.1"))), "{v}");
    let (good, v) = plugin(n, &cn.dir, "DEL", "c3", &cns.path(), &conf);
    assert!(good, "{v}");
}
