//! Host integration: what the seed's procedure relies on besides the overlay itself, with a
//! real etcd in namespace clusters: systemd readiness, the subnet file and docker options,
//! flannel's masquerade and forward rules with real traffic, health and metrics, and the
//! seed's whole procedure end to end.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use overlay_common::Counter;
use overlay_tests::{
    ip, require_root,
    traffic::{http_get, ping, send_udp, tcp_transfer, tcp_transfer_via, UdpProbe},
    wait_until, Backend, Cluster, ClusterSpec, Control, Netns,
};

fn cluster(tag: &str, spec: &ClusterSpec) -> Cluster {
    require_root();
    Cluster::new(tag, spec).unwrap_or_else(|e| panic!("building the cluster failed: {e:#}"))
}

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

fn with_args(args: &[&str], n: usize) -> ClusterSpec {
    ClusterSpec { agent_args: args.iter().map(|a| a.to_string()).collect(), ..ClusterSpec::etcd(Backend::Vxlan, "tc", n) }
}

#[test]
fn readiness_and_stopping_are_notified_to_systemd() {
    let mut c = cluster("nt", &with_args(&[], 1));
    let n = c.node_mut(1);
    let said = n.read_notifications().to_vec();
    let ready = said.iter().position(|m| m.contains("READY=1")).unwrap_or_else(|| panic!("no READY=1 in {said:?}"));
    assert!(said[..ready].iter().any(|m| m.contains("STATUS=acquiring a subnet lease")), "{said:?}");
    assert!(said[ready].contains("STATUS=lease 10.244."), "READY=1 should come with a status: {said:?}");
    // READY=1 comes after the subnet file is written (docker's unit may start right away).
    let env = std::fs::read_to_string(&n.subnet_file).expect("subnet file written before READY=1");
    assert!(env.contains("FLANNEL_SUBNET=10.244."), "{env}");
    ok("stop", c.stop_agent(1));
    let said = c.node_mut(1).read_notifications().to_vec();
    assert!(said.iter().any(|m| m.contains("STOPPING=1")), "no STOPPING=1 in {said:?}");
}

/// A namespace outside the overlay, linked to `node`'s namespace (private addresses).
fn outside_host(c: &Cluster, node: usize) -> Netns {
    let ns = ok("netns", Netns::new(&format!("{}-out", c.prefix)));
    let n = c.node(node).ns.name();
    ok("veth", ip(&["-n", n, "link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", ns.name()]));
    ok("addr", ip(&["-n", n, "addr", "add", "172.30.0.1/24", "dev", "out0"]));
    ok("up", ip(&["-n", n, "link", "set", "out0", "up"]));
    ok("addr", ip(&["-n", ns.name(), "addr", "add", "172.30.0.2/24", "dev", "eth0"]));
    ok("up", ip(&["-n", ns.name(), "link", "set", "eth0", "up"]));
    ok("up", ip(&["-n", ns.name(), "link", "set", "lo", "up"]));
    ns
}

fn iptables_s(c: &Cluster, node: usize, table: &str, chain: &str) -> anyhow::Result<String> {
    c.node(node).ns.run("iptables", &["-w", "-t", table, "-S", chain])
}

#[test]
fn ip_masq_hides_containers_going_outside_but_not_between_nodes() {
    let mut c = cluster("mq", &with_args(&["--ip-masq", "--iptables-resync=1"], 2));
    let outside = outside_host(&c, 1);
    let (n1, n2) = (c.node(1), c.node(2));

    // Container -> outside: seen with the node's address.
    let probe = ok("probe", UdpProbe::start(&outside, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9000)));
    let c0 = n1.container_ip(0);
    ok("send", send_udp(&n1.containers[0], SocketAddrV4::new(c0, 0), SocketAddrV4::new(Ipv4Addr::new(172, 30, 0, 2), 9000), vec![b"out".to_vec()]));
    let got = probe.finish_after_with_sources(1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.ip(), std::net::IpAddr::V4(Ipv4Addr::new(172, 30, 0, 1)), "outside must see the node's address, not {c0}");

    // Container -> container on another node: keeps its address.
    let probe = ok("probe", UdpProbe::start(&n1.containers[0], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9001)));
    let src = n2.container_ip(1);
    ok("send", send_udp(&n2.containers[1], SocketAddrV4::new(src, 0), SocketAddrV4::new(c0, 9001), vec![b"in".to_vec()]));
    let got = probe.finish_after_with_sources(1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.ip(), std::net::IpAddr::V4(src), "cross-node traffic must keep the container address");

    // The rules are flannel's, in flannel's order; removed ones come back.
    let subnet = n1.subnet.to_string();
    let rules = ok("iptables", iptables_s(&c, 1, "nat", "FLANNEL-POSTRTG"));
    let expected = [
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN".to_string(),
        format!("-A FLANNEL-POSTRTG -s {subnet} -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d {subnet} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d {subnet} -m comment --comment \"flanneld masq\" -j RETURN"),
        "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully".to_string(),
        "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully".to_string(),
    ];
    let have: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A")).collect();
    assert_eq!(have, expected.iter().map(String::as_str).collect::<Vec<_>>());
    ok("flush", c.node(1).ns.run("iptables", &["-w", "-t", "nat", "-F", "FLANNEL-POSTRTG"]));
    ok("del jump", c.node(1).ns.run("iptables", &["-w", "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"]));
    assert!(
        wait_until(Duration::from_secs(10), || iptables_s(&c, 1, "nat", "FLANNEL-POSTRTG").is_ok_and(|r| r.lines().filter(|l| l.starts_with("-A")).count() == 6)
            && iptables_s(&c, 1, "nat", "POSTROUTING").is_ok_and(|r| r.contains("-j FLANNEL-POSTRTG"))),
        "removed rules were not restored:\n{}",
        c.node(1).log_text()
    );
    // The agent logs the restore after making it: wait for the line too.
    assert!(
        wait_until(Duration::from_secs(10), || c.node(1).log_text().contains("iptables rules were missing or changed; restored")),
        "the restore was not logged:\n{}",
        c.node(1).log_text()
    );

    // A clean shutdown keeps them (flannel since v0.27): with docker's FORWARD DROP, new
    // cross-node connections and masqueraded egress go on while the agent is away.
    for n in [1, 2] {
        ok("policy", c.node(n).ns.run("iptables", &["-w", "-P", "FORWARD", "DROP"]));
    }
    ok("stop", c.stop_agent(1));
    assert_eq!(ok("iptables", iptables_s(&c, 1, "nat", "FLANNEL-POSTRTG")).lines().filter(|l| l.starts_with("-A")).count(), 6, "chain kept after SIGTERM");
    assert!(ok("postrouting", iptables_s(&c, 1, "nat", "POSTROUTING")).contains("-j FLANNEL-POSTRTG"));
    assert!(ok("forward", iptables_s(&c, 1, "filter", "FORWARD")).contains("-j FLANNEL-FWD"), "forward jump kept after SIGTERM");
    let (n1, n2) = (c.node(1), c.node(2));
    ok("new TCP connection with the agent stopped", tcp_transfer(&n2.containers[0], &n1.containers[1], n1.container_ip(1), 1 << 20));
    let probe = ok("probe", UdpProbe::start(&outside, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9002)));
    ok("send", send_udp(&n1.containers[1], SocketAddrV4::new(n1.container_ip(1), 0), SocketAddrV4::new(Ipv4Addr::new(172, 30, 0, 2), 9002), vec![b"out".to_vec()]));
    let got = probe.finish_after_with_sources(1);
    assert_eq!(got.iter().map(|(a, _)| a.ip()).collect::<Vec<_>>(), vec![std::net::IpAddr::V4(Ipv4Addr::new(172, 30, 0, 1))], "masqueraded egress with the agent stopped");

    // Started again without --ip-masq: the stale masquerade chain goes at start, the
    // forward rules stay.
    c.set_agent_args(vec!["--iptables-resync=1".into()], Vec::new());
    ok("start", c.restart_agent_with_current_args(1));
    assert!(iptables_s(&c, 1, "nat", "FLANNEL-POSTRTG").is_err(), "a masquerade chain this run does not keep:\n{}", c.node(1).log_text());
    assert!(!ok("postrouting", iptables_s(&c, 1, "nat", "POSTROUTING")).contains("FLANNEL-POSTRTG"));
    assert!(ok("forward", iptables_s(&c, 1, "filter", "FORWARD")).contains("-j FLANNEL-FWD"));
    ok("TCP after the restart", tcp_transfer(&c.node(2).containers[0], &c.node(1).containers[1], c.node(1).container_ip(1), 1 << 20));
    drop(outside);
}

/// `EnableNFTables: true`: flannel's nftables table instead of iptables chains, listed as
/// flannel's users see it (`nft list table ip flannel-ipv4`), masquerading containers going
/// outside, restored when someone deletes it, kept on a clean exit (flannel since v0.27);
/// no iptables chain of ours meanwhile. Switched back to iptables, the next start clears the
/// table, as flannel clears the form it does not use.
#[test]
fn nftables_mode_keeps_flannels_table() {
    let config = r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;
    let spec = ClusterSpec {
        control: Control::Etcd { tls: false, config: config.into() },
        ..with_args(&["--ip-masq", "--iptables-resync=1"], 2)
    };
    let mut c = cluster("nf", &spec);
    let outside = outside_host(&c, 1);
    let n1 = c.node(1);
    let list = |c: &Cluster| c.node(1).ns.run("nft", &["list", "table", "ip", "flannel-ipv4"]);
    let table = ok("nft", list(&c));
    let (net, sub) = ("10.244.0.0/16", n1.subnet.to_string());
    let expected = format!(
        "table ip flannel-ipv4 {{\n\tcomment \"rules for flannel-ipv4\"\n\tchain postrtg {{\n\t\tcomment \"chain to manage traffic masquerading by flannel\"\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tmeta mark 0x00004000 return\n\t\tip saddr {sub} ip daddr {net} return\n\t\tip saddr {net} ip daddr {sub} return\n\t\tip saddr != {sub} ip daddr {net} return\n\t\tip saddr {net} ip daddr != 224.0.0.0/4 masquerade fully-random\n\t\tip saddr != {net} ip daddr {net} masquerade fully-random\n\t}}\n\n\tchain forward {{\n\t\tcomment \"chain to accept flannel traffic\"\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tip saddr {net} accept\n\t\tip daddr {net} accept\n\t}}\n}}"
    );
    assert_eq!(table.trim_end(), expected);
    assert!(iptables_s(&c, 1, "nat", "FLANNEL-POSTRTG").is_err(), "no iptables chain in nftables mode");

    let probe = ok("probe", UdpProbe::start(&outside, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9000)));
    let c0 = n1.container_ip(0);
    ok("send", send_udp(&n1.containers[0], SocketAddrV4::new(c0, 0), SocketAddrV4::new(Ipv4Addr::new(172, 30, 0, 2), 9000), vec![b"out".to_vec()]));
    let got = probe.finish_after_with_sources(1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.ip(), std::net::IpAddr::V4(Ipv4Addr::new(172, 30, 0, 1)), "outside must see the node's address");
    ok("ping", ping(&c.node(2).containers[0], c0, 1));

    ok("delete", c.node(1).ns.run("nft", &["delete", "table", "ip", "flannel-ipv4"]));
    assert!(wait_until(Duration::from_secs(10), || list(&c).is_ok_and(|t| t.trim_end() == expected)), "the table was not restored:\n{}", c.node(1).log_text());
    ok("stop", c.stop_agent(1));
    assert_eq!(ok("nft", list(&c)).trim_end(), expected, "the table is kept after SIGTERM");
    ok("ping with the agent stopped", ping(&c.node(2).containers[0], c0, 1));
    let config = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    ok("config", c.etcd().etcdctl(&["put", "/coreos.com/network/config", config]));
    ok("start", c.restart_agent(1));
    assert!(list(&c).is_err(), "the nftables table must go when the node runs iptables rules:\n{}", c.node(1).log_text());
    assert!(ok("iptables", iptables_s(&c, 1, "nat", "FLANNEL-POSTRTG")).contains("MASQUERADE"));
    drop(outside);
}

/// flannel's --ip-masq-fully-random-disable: the masquerade rules lose --random-fully (which
/// this iptables supports, so it is the default, as the test above checks) and take no other
/// randomisation, as flannel's masqRules write them: plain `-j MASQUERADE`. (Before, they
/// said `--random`, which flannel never writes.)
#[test]
fn fully_random_masquerade_can_be_disabled() {
    let c = cluster("mr", &with_args(&["--ip-masq", "--ip-masq-fully-random-disable"], 1));
    let rules = ok("iptables", iptables_s(&c, 1, "nat", "FLANNEL-POSTRTG"));
    let masq: Vec<&str> = rules.lines().filter(|l| l.contains("MASQUERADE")).collect();
    assert_eq!(masq.len(), 2, "{rules}");
    assert!(masq.iter().all(|l| l.ends_with("-j MASQUERADE")), "{rules}");
}

/// An iptables call that hangs (here a wrapper that sleeps 20 s; on a node, the xtables lock
/// held by kube-proxy or docker) stalls neither /healthz nor the watch: the rules are checked
/// on a thread of their own. Before, the agent's single-threaded runtime waited for it.
#[test]
fn a_hanging_iptables_stalls_neither_healthz_nor_the_watch() {
    let c0 = cluster("ih", &ClusterSpec { nodes: vec![], ..with_args(&[], 0) });
    let bin = c0.workdir.join("fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let hang = c0.workdir.join("hang");
    let real = String::from_utf8(std::process::Command::new("sh").args(["-c", "command -v iptables"]).output().unwrap().stdout).unwrap();
    let script = format!("#!/bin/sh\nif [ -e {} ]; then sleep 19.7; fi\nexec {} \"$@\"\n", hang.display(), real.trim());
    std::fs::write(bin.join("iptables"), script).unwrap();
    std::process::Command::new("chmod").args(["+x", bin.join("iptables").to_str().unwrap()]).status().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let mut c = c0;
    c.set_agent_args(
        vec!["--ip-masq".into(), "--iptables-resync=1".into(), "--healthz-ip=127.0.0.1".into(), "--healthz-port=9103".into()],
        vec![("PATH".into(), path)],
    );
    ok("join", c.join(overlay_tests::NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
    let at = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9103);
    assert_eq!(ok("healthz", http_get(&c.node(1).ns, at, "/healthz")).0, 200);
    std::fs::write(&hang, "").unwrap();
    // Let a resync start hanging (every second), then ask.
    let sleeping = || -> Vec<i32> {
        let out = std::process::Command::new("pgrep").args(["-f", "sleep 19.7"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
    };
    assert!(wait_until(Duration::from_secs(5), || !sleeping().is_empty()), "no iptables call started hanging");
    let asked = std::time::Instant::now();
    assert_eq!(ok("healthz while iptables hangs", http_get(&c.node(1).ns, at, "/healthz")).0, 200);
    assert!(asked.elapsed() < Duration::from_secs(5), "/healthz took {:?}", asked.elapsed());
    let key = "/coreos.com/network/subnets/10.244.177.0-24";
    let value = r#"{"PublicIP":"192.168.100.77","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:77"}}"#;
    ok("put", c.etcd().etcdctl(&["put", key, value]));
    assert!(
        wait_until(Duration::from_secs(5), || c.node(1).routes().iter().any(|r| r.subnet.to_string() == "10.244.177.0/24")),
        "the watch stalled behind iptables:\n{}",
        c.node(1).log_text()
    );
    std::fs::remove_file(&hang).unwrap();
    // The hanging calls are ours (the wrapper's): end them rather than leave them behind.
    for pid in sleeping() {
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// flannel's --ip-blackhole-route: a blackhole route for the node's subnet, below the
/// bridge's own route (traffic between nodes is untouched), which catches traffic to the
/// subnet once the bridge no longer holds it, instead of the overlay or default route.
#[test]
fn ip_blackhole_route_catches_the_subnet_when_the_bridge_lets_go() {
    let c = cluster("bh", &with_args(&["--ip-blackhole-route"], 2));
    let (n1, n2) = (c.node(1), c.node(2));
    let routes = ok("routes", n1.ns.run("ip", &["route", "show", "type", "blackhole"]));
    assert!(routes.contains(&format!("blackhole {} metric 4096", n1.subnet)), "{routes}");
    ok("ping", ping(&n2.containers[0], n1.container_ip(0), 2));
    let target = n1.container_ip(0).to_string();
    let via = |c: &Cluster| c.node(1).ns.run("ip", &["route", "get", &target]).map_err(|e| format!("{e:#}"));
    assert!(via(&c).is_ok_and(|r| r.contains("dev docker0")), "{:?}", via(&c));
    // A blackhole a previous run left for a subnet this node no longer holds would swallow
    // traffic to whichever node holds it now: removed at start, ours kept.
    ok("stale", n1.ns.run("ip", &["route", "add", "blackhole", "10.244.250.0/24", "metric", "4096"]));
    let mut c = c;
    ok("restart", c.restart_agent(1));
    let (n1, _n2) = (c.node(1), c.node(2));
    let routes = ok("routes", n1.ns.run("ip", &["route", "show", "type", "blackhole"]));
    assert!(!routes.contains("10.244.250.0/24") && routes.contains(&n1.subnet.to_string()), "{routes}");
    let gw = format!("{}/{}", n1.subnet.network().octets().iter().enumerate().map(|(i, b)| if i == 3 { (b + 1).to_string() } else { b.to_string() }).collect::<Vec<_>>().join("."), n1.subnet.prefix_len());
    ok("bridge lets go", n1.ns.run("ip", &["addr", "del", &gw, "dev", "docker0"]));
    // The kernel answers a lookup that ends in a blackhole with EINVAL; without the route
    // the packet would go to flannel.1 by the network's route.
    assert!(via(&c).is_err_and(|e| e.contains("Invalid argument")), "{:?}", via(&c));
}

/// docker sets FORWARD's policy to DROP; flannel's forward rules keep overlay traffic going.
#[test]
fn forward_rules_keep_overlay_traffic_flowing_under_a_drop_policy() {
    let c = cluster("fw", &with_args(&[], 2));
    for n in &c.nodes {
        ok("policy", n.ns.run("iptables", &["-w", "-P", "FORWARD", "DROP"]));
    }
    ok("ping with forward rules", ping(&c.node(1).containers[0], c.node(2).container_ip(0), 2));
    // Control: without them the same traffic is dropped.
    for n in &c.nodes {
        ok("del", n.ns.run("iptables", &["-w", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"]));
    }
    assert!(ping(&c.node(1).containers[0], c.node(2).container_ip(0), 1).is_err(), "the DROP policy should bite without the rules");
}

/// Parse OpenMetrics text into `name{labels} -> value`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    assert!(text.trim_end().ends_with("# EOF"), "not OpenMetrics text:\n{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
            (k.to_string(), v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")))
        })
        .collect()
}

/// `--healthz-ip` takes an IPv6 address, as flanneld's does (before: IPv4 only, refused).
#[test]
fn healthz_serves_on_an_ipv6_address() {
    let c = cluster("h6", &with_args(&["--healthz-ip=::1", "--healthz-port=9104"], 1));
    let at: std::net::SocketAddr = "[::1]:9104".parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || http_get(&c.node(1).ns, at, "/healthz").is_ok_and(|r| r.0 == 200)), "{}", c.node(1).log_text());
}

#[test]
fn health_endpoints_and_metrics_follow_the_traffic() {
    let c = cluster("hm", &with_args(&["--healthz-ip=127.0.0.1", "--healthz-port=9101"], 2));
    let (n1, n2) = (c.node(1), c.node(2));
    let at = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9101);
    // The kernel's program statistics cost every run something: off until /metrics asks.
    let holds_stats = || {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", n1.agent_pid().unwrap())).unwrap();
        fds.filter_map(|f| std::fs::read_link(f.ok()?.path()).ok()).any(|l| l.to_string_lossy().contains("bpf-stats"))
    };
    assert!(!holds_stats(), "statistics on before anyone asked");
    assert_eq!(ok("healthz", http_get(&n1.ns, at, "/healthz")).0, 200);
    assert_eq!(ok("readyz", http_get(&n1.ns, at, "/readyz")).0, 200);
    assert_eq!(ok("404", http_get(&n1.ns, at, "/nope")).0, 404);
    let (code, body) = ok("metrics", http_get(&n1.ns, at, "/metrics"));
    assert_eq!(code, 200);
    let before = parse_metrics(&body);
    assert_eq!(before["overlay_ready"], 1.0);
    assert_eq!(before["overlay_routes"], 1.0);
    assert_eq!(before["overlay_peers"], 1.0);
    assert_eq!(before[&format!("overlay_lease_info{{subnet=\"{}\"}}", n1.subnet)], 1.0);
    let left = before["overlay_lease_expiry_seconds"];
    assert!(left > 23.0 * 3600.0 && left <= 24.0 * 3600.0, "{left}");
    assert!(before.contains_key("overlay_etcd_reconnects_total"));
    assert_eq!(before["overlay_program_stats_enabled"], 1.0);
    assert!(holds_stats(), "a scrape turns the program statistics on (BPF_ENABLE_STATS descriptor)");
    let program = |m: &BTreeMap<String, f64>, metric: &str, name: &str| {
        let prefix = format!("{metric}{{program=\"{name}\",id=");
        m.iter().find(|(k, _)| k.starts_with(&prefix)).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {prefix}: {m:#?}"))
    };

    let peer = n2.underlay_ip;
    ok("TCP", tcp_transfer(&n1.containers[0], &n2.containers[0], n2.container_ip(0), 4 << 20));
    let after = parse_metrics(&ok("metrics", http_get(&n1.ns, at, "/metrics")).1);
    let key = |m: &str, labels: &str| format!("{m}{{{labels}}}");
    let enc = key("overlay_datapath_packets_total", "outcome=\"encapsulated\",kind=\"ok\"");
    assert!(after[&enc] > before[&enc], "{enc}: {} -> {}", before[&enc], after[&enc]);
    let tx = key("overlay_peer_bytes_total", &format!("peer=\"{peer}\",direction=\"tx\""));
    assert!(after[&tx] - before.get(&tx).copied().unwrap_or(0.0) >= (4 << 20) as f64, "{tx}");
    let drops = key("overlay_datapath_packets_total", "outcome=\"unknown_peer\",kind=\"drop\"");
    assert_eq!(after[&drops], 0.0);
    // Each program's runs and time, counted since the first scrape turned them on.
    for name in ["tc_egress_encap", "tc_ingress_decap", "sk_lookup_guard"] {
        let runs = program(&after, "overlay_program_runs_total", name) - program(&before, "overlay_program_runs_total", name);
        assert!(runs > 0.0, "{name}: no runs counted across the transfer");
    }
    assert!(program(&after, "overlay_program_run_seconds_total", "tc_egress_encap") > 0.0);
    // The kernel's own drops past our programs, by its reason and the device: node 1's
    // firewall drops what comes in on flannel.1 for one port.
    ok("firewall", n1.ns.run("iptables", &["-w", "-I", "FORWARD", "1", "-i", "flannel.1", "-p", "udp", "--dport", "9992", "-j", "DROP"]));
    let firewalled = SocketAddrV4::new(n1.container_ip(0), 9992);
    let dropped_by_firewall = key("overlay_kernel_drops_total", "reason=\"NETFILTER_DROP\",device=\"flannel.1\"");
    let kernel_drops = || parse_metrics(&http_get(&n1.ns, at, "/metrics").map(|r| r.1).unwrap_or_default()).get(&dropped_by_firewall).copied().unwrap_or(0.0);
    ok("send", overlay_tests::traffic::send_udp(&n2.containers[0], SocketAddrV4::new(n2.container_ip(0), 5558), firewalled, vec![b"x".to_vec(); 5]));
    assert!(wait_until(Duration::from_secs(10), || kernel_drops() >= 5.0), "{dropped_by_firewall}: {}", kernel_drops());
    // The peer's side counted the same traffic as received.
    let rx = key("overlay_peer_bytes_total", &format!("peer=\"{}\",direction=\"rx\"", n1.underlay_ip));
    let n2m = parse_metrics(&ok("metrics", http_get(&n2.ns, at, "/metrics")).1);
    assert!(n2m[&rx] >= (4 << 20) as f64, "{rx}: {}", n2m[&rx]);

    // Node 1's underlay link loses its carrier (the far end goes down): encap's route lookup
    // and neighbour entry still hold, so packets are handed to the device, which drops them.
    // The programs cannot see that; the underlay's own transmit drops, in the metrics, do.
    let dropped = key("overlay_underlay_tx_dropped_total", "device=\"eth0\"");
    assert!(after.contains_key(&key("overlay_underlay_tx_errors_total", "device=\"eth0\"")), "{after:#?}");
    ok("carrier off", c.underlay.run("ip", &["link", "set", "p1", "down"]));
    let to = SocketAddrV4::new(n2.container_ip(0), 9993);
    let lost = |n: u64| {
        let from = SocketAddrV4::new(n1.container_ip(0), 0);
        ok("send", send_udp(&n1.containers[0], from, to, vec![b"into the void".to_vec(); n as usize]));
        parse_metrics(&ok("metrics", http_get(&n1.ns, at, "/metrics")).1)[&dropped]
    };
    assert!(
        wait_until(Duration::from_secs(10), || lost(5) >= after[&dropped] + 5.0),
        "{dropped} did not follow the dead link: {} -> {}",
        after[&dropped],
        lost(0)
    );
}

/// The seed's cluster: its network config, agents started with `--ip-masq`, and the unit's
/// ExecStartPost docker-options step.
fn seed_spec(tls: bool, containers_per_node: usize) -> ClusterSpec {
    let config = r#"{"Network":"172.17.0.0/16","Backend":{"Type":"vxlan"}}"#;
    ClusterSpec {
        control: Control::Etcd { tls, config: config.into() },
        agent_args: vec!["--ip-masq".into()],
        docker_opts_step: true,
        containers_per_node,
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 2)
    }
}

/// The seed's procedure with this agent in flanneld's place: the network config written with
/// etcdctl (TLS), agents started as the seed's unit starts flanneld (`--ip-masq
/// $FLANNEL_OPTIONS`, Go-style `-etcd-cafile`), readiness on NOTIFY_SOCKET, the ExecStartPost
/// docker-options step (writing DOCKER_NETWORK_OPTIONS into subnet.env, as the seed does),
/// containers on bridges set up from those options reaching each other across nodes, and the
/// seed's `etcdctl ls`/`get` inspection.
#[test]
fn the_seeds_procedure_end_to_end() {
    let mut c = cluster("sd", &seed_spec(true, 2));
    for i in 1..=2 {
        let said = c.node_mut(i).read_notifications().to_vec();
        assert!(said.iter().any(|m| m.contains("READY=1")), "node {i}: {said:?}");
    }
    let (n1, n2) = (c.node(1), c.node(2));
    for n in [n1, n2] {
        assert!(n.subnet.to_string().starts_with("172.17."), "{}", n.subnet);
        let env = std::fs::read_to_string(&n.subnet_file).unwrap();
        let line = env.lines().find(|l| l.starts_with("DOCKER_NETWORK_OPTIONS=")).unwrap_or_else(|| panic!("{env}"));
        let first = Ipv4Addr::from(u32::from(n.subnet.network()) + 1);
        assert_eq!(line, format!("DOCKER_NETWORK_OPTIONS=\" --bip={first}/24 --ip-masq=false --mtu=1450\""));
    }
    ok("ping 1->2", ping(&n1.containers[0], n2.container_ip(1), 3));
    ok("ping 2->1", ping(&n2.containers[0], n1.container_ip(1), 3));
    ok("TCP", tcp_transfer(&n2.containers[1], &n1.containers[0], n1.container_ip(0), 8 << 20));
    // The seed's `etcdctl ls /coreos.com/network/subnets` and `get .../<subnet>` (v3 spelling).
    let keys = ok("ls", c.etcd().etcdctl(&["get", "--prefix", "--keys-only", "/coreos.com/network/subnets"]));
    for n in [n1, n2] {
        let key = format!("/coreos.com/network/subnets/{}-24", n.subnet.network());
        assert!(keys.contains(&key), "{keys}");
        let v = ok("get", c.etcd().etcdctl(&["get", "--print-value-only", &key]));
        let v: serde_json::Value = serde_json::from_str(v.trim()).unwrap();
        assert_eq!(v["PublicIP"], n.underlay_ip.to_string());
    }
    let flags = c.etcd().agent_flags();
    let mut args = vec!["lease".to_string(), n2.subnet.to_string()];
    args.extend(flags);
    let shown = ok("lease", n1.agent_cli(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(shown.contains(&n2.underlay_ip.to_string()) && shown.contains("vxlan"), "{shown}");
    // --ip-masq is in force on every node.
    for i in 1..=2 {
        assert!(ok("nat", iptables_s(&c, i, "nat", "FLANNEL-POSTRTG")).contains("MASQUERADE"));
    }
}

/// The seed's docker step with a real docker daemon on each node: dockerd started with
/// $DOCKER_NETWORK_OPTIONS from the subnet file (as the seed's docker unit does), containers
/// get addresses from the node's lease and the overlay MTU, and reach containers on the other
/// node, through docker's own FORWARD DROP policy (flannel's forward rules let them pass).
#[test]
fn real_docker_containers_reach_each_other_across_nodes() {
    let c = cluster("dk", &seed_spec(false, 0));
    let mut daemons = Vec::new();
    let mut addrs = Vec::new();
    for n in &c.nodes {
        let env = std::fs::read_to_string(&n.subnet_file).unwrap();
        let opts = env.lines().find_map(|l| l.strip_prefix("DOCKER_NETWORK_OPTIONS=")).unwrap().trim_matches('"').to_string();
        let mut d = ok("dockerd", overlay_tests::docker::Dockerd::start(&n.ns, &c.workdir.join(format!("docker-n{}", n.index)), &opts));
        ok("image", d.import_busybox());
        let ip = ok("run", d.run_container("c1"));
        assert!(n.subnet.contains(&ip), "docker gave {ip}, outside the node's lease {}", n.subnet);
        let mtu = ok("mtu", d.exec("c1", &["cat", "/sys/class/net/eth0/mtu"]));
        assert_eq!(mtu.trim(), "1450", "container MTU must be the overlay MTU");
        // dockerd sets FORWARD's policy to DROP when it has to turn forwarding on itself, as
        // on a fresh host; this node had it on already, so set what docker would.
        ok("policy", n.ns.run("iptables", &["-w", "-P", "FORWARD", "DROP"]));
        let rules = ok("rules", n.ns.run("iptables", &["-w", "-S", "FORWARD"]));
        assert!(rules.contains("-A FORWARD -j DOCKER-USER"), "dockerd's chains are in place:\n{rules}");
        addrs.push(ip);
        daemons.push(d);
    }
    ok("docker 1 -> 2", daemons[0].exec("c1", &["ping", "-c", "3", "-W", "2", &addrs[1].to_string()]).map(drop));
    ok("docker 2 -> 1", daemons[1].exec("c1", &["ping", "-c", "3", "-W", "2", &addrs[0].to_string()]).map(drop));
    drop(daemons);
}

/// The host's netfilter sees both directions of every overlay flow, as on a stock flannel
/// node: on nodes with strict rp_filter, docker's FORWARD DROP and kube-proxy's rules (a
/// Service DNAT to a container on another node, a conntrack INVALID drop), traffic through
/// the Service and between containers flows both ways, and both nodes' conntrack tables hold
/// a cross-node connection as ESTABLISHED.
fn netfilter_sees_both_directions(tag: &str, hook: &'static str, delivery: &str) {
    use std::io::{Read as _, Write as _};
    let c = cluster(tag, &ClusterSpec {
        agent_args: vec![format!("--decap-delivery={delivery}")],
        ..ClusterSpec::etcd(Backend::Vxlan, hook, 2)
    });
    for n in &c.nodes {
        ok("policy", n.ns.run("iptables", &["-w", "-P", "FORWARD", "DROP"]));
        ok("invalid", n.ns.run("iptables", &["-w", "-I", "FORWARD", "1", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]));
    }
    let (n1, n2) = (c.node(1), c.node(2));
    for (a, b) in [(n1, n2), (n2, n1)] {
        for k in 0..2 {
            ok("ping", ping(&a.containers[k], b.container_ip(k), 1));
        }
    }
    let native_before = n2.counter(Counter::DecapNative);
    let decap_before = n2.counter(Counter::Decapsulated);
    let target = n2.container_ip(0);
    let service = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    ok("dnat", n1.ns.run("iptables", &[
        "-w", "-t", "nat", "-A", "PREROUTING", "-d", "10.96.0.10/32", "-p", "tcp", "--dport", "80",
        "-j", "DNAT", "--to-destination", &format!("{target}:8080"),
    ]));
    ok("TCP through the Service", tcp_transfer_via(&n1.containers[0], &n2.containers[0], 8080, service, 16 << 20));
    ok("TCP 1 -> 2", tcp_transfer(&n1.containers[1], &n2.containers[1], n2.container_ip(1), 16 << 20));
    ok("TCP 2 -> 1", tcp_transfer(&n2.containers[1], &n1.containers[1], n1.container_ip(1), 16 << 20));

    // A connection held open through the Service is ESTABLISHED on both nodes.
    let (tx, rx) = std::sync::mpsc::channel();
    let server = n2.containers[0].spawn(move || -> std::io::Result<()> {
        let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 8080))?;
        let _ = tx.send(());
        let (mut s, _) = l.accept()?;
        let mut b = [0u8; 64];
        while s.read(&mut b)? > 0 {}
        Ok(())
    });
    rx.recv_timeout(Duration::from_secs(10)).expect("listener up");
    let mut client = ok("connect", n1.containers[0].enter(move || {
        std::net::TcpStream::connect_timeout(&service.into(), Duration::from_secs(10)).map_err(anyhow::Error::from)
    }).and_then(|r| r));
    ok("send", client.write_all(b"held").map_err(Into::into));
    let c1 = n1.container_ip(0);
    for (n, flow) in [(n1, format!("src={c1} dst=10.96.0.10 ")), (n2, format!("src={c1} dst={target} "))] {
        assert!(
            wait_until(Duration::from_secs(10), || n.ns.run("conntrack", &["-L", "-p", "tcp"]).is_ok_and(|t| t.lines().any(|l| l.contains("ESTABLISHED") && l.contains(&flow)))),
            "node {}: no ESTABLISHED entry for {flow}:\n{}",
            n.index,
            n.ns.run("conntrack", &["-L", "-p", "tcp"]).unwrap_or_default()
        );
    }
    drop(client);
    server.join().expect("server thread").and_then(|r| r.map_err(Into::into)).expect("server");

    // The receive path the delivery promises carried this traffic through the rules above:
    // `kernel` (and always XDP, which only checks) leaves every frame to the kernel's vxlan
    // device; `stack` decapsulates every frame itself.
    let native = n2.counter(Counter::DecapNative) - native_before;
    let all = n2.counter(Counter::Decapsulated) - decap_before;
    if delivery == "stack" {
        assert!(all > 0 && native == all, "node 2: {native} of {all} frames decapsulated natively; expected all");
    } else {
        assert_eq!(native, 0, "node 2: every frame belongs to the kernel device ({all} accepted)");
    }
}

#[test]
fn netfilter_sees_both_directions_with_tc_decap() {
    netfilter_sees_both_directions("nft", "tc", "kernel");
}

#[test]
fn netfilter_sees_both_directions_with_stack_delivery() {
    netfilter_sees_both_directions("nfs", "tc", "stack");
}

#[test]
fn netfilter_sees_both_directions_with_xdp_decap() {
    netfilter_sees_both_directions("nfx", "xdp", "kernel");
}

/// A flanneld unit file's flags and environment start the agent: klog's `-v=2` and
/// `-vmodule`, `FLANNELD_IP_MASQ=1` (Go's boolean), an empty `FLANNELD_IFACE=` (as if
/// unset) and an integer Go cannot parse (logged and read as 0, as flanneld reads it).
#[test]
fn a_flanneld_unit_files_flags_and_variables_start_the_agent() {
    let mut c = cluster("fu", &with_args(&[], 1));
    let env = [("FLANNELD_IP_MASQ", "1"), ("FLANNELD_IFACE", ""), ("FLANNELD_HEALTHZ_PORT", "eighty")];
    c.set_agent_args(vec!["-v=2".into(), "-vmodule=main=3".into()], env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    ok("restart with the unit's flags", c.restart_agent_with_current_args(1));
    let log = c.node(1).log_text();
    assert!(ok("iptables", iptables_s(&c, 1, "nat", "FLANNEL-POSTRTG")).contains("MASQUERADE"), "FLANNELD_IP_MASQ=1 means true:\n{log}");
    assert!(log.contains("FLANNELD_HEALTHZ_PORT: \"eighty\" is not a number") && log.contains("read as 0, as flanneld reads it"), "{log}");
    assert!(log.contains("-vmodule=main=3 is klog's per-file verbosity and is ignored here"), "{log}");
    ok("ping", ping(&c.node(1).containers[0], c.node(1).container_ip(1), 1));
}

/// The socket guard's firewall form (for kernels before 5.17, forced here) on a node in
/// nftables mode: a table of our own (flannel's keeps exactly flannel's rules) whose chain,
/// before defragmentation, drops tunnel datagrams that did not come in on the underlay to the tunnel address;
/// a container's tunnel frame to its node is not decapsulated, a peer's is; restarted with
/// the program, the table goes.
#[test]
fn the_firewall_guard_in_nftables_mode() {
    let config = r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;
    let spec = ClusterSpec { control: Control::Etcd { tls: false, config: config.into() }, ..with_args(&["--guard=firewall"], 2) };
    let mut c = cluster("ng", &spec);
    let (n1, n2) = (c.node(1), c.node(2));
    let table = ok("nft", n1.ns.run("nft", &["list", "table", "ip", "overlay-guard"]));
    for rule in [
        "type filter hook prerouting priority -450; policy accept;",
        "iifname != \"eth0\" udp dport 8472 fib daddr type local counter packets",
        &format!("udp dport 8472 ip daddr != {} fib daddr type local counter packets", n1.underlay_ip),
    ] {
        assert!(table.contains(rule), "{rule:?} missing:\n{table}");
    }
    assert!(ok("status", n1.agent_cli(&["status"])).contains("guard=firewall"));
    ok("ping", ping(&n2.containers[0], n1.container_ip(0), 2));
    // A container sends its node a tunnel frame that would pass every check on the underlay.
    let rx_before = n1.link_stat("flannel.1", "rx", "packets");
    let mut frame = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    let inner = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], n1.vtep_mac).ipv4(n2.container_ip(0).octets(), n1.container_ip(0).octets(), 64).udp(40000, 9000);
    inner.write(&mut frame, b"from a container").unwrap();
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    ok("send", send_udp(&n1.containers[1], any, SocketAddrV4::new(n1.underlay_ip, 8472), vec![frame.clone(); 3]));
    ok("ping", ping(&n2.containers[0], n1.container_ip(0), 1));
    let rx = n1.link_stat("flannel.1", "rx", "packets") - rx_before;
    assert!(rx >= 1 && rx < 3, "flannel.1 took {rx} packets: the peer's ping only, none of the container's frames");
    // With the program again (auto on this kernel), the table goes at start.
    c.set_agent_args(Vec::new(), Vec::new());
    ok("restart", c.restart_agent_with_current_args(1));
    assert!(c.node(1).ns.run("nft", &["list", "table", "ip", "overlay-guard"]).is_err(), "the guard's table must go with the program back");
    assert!(ok("status", c.node(1).agent_cli(&["status"])).contains("guard=sk_lookup"));
}

/// The tunnel datagrams' conntrack entries on `n`'s side (UDP to the vxlan port).
fn tunnel_entries(n: &overlay_tests::Node) -> Vec<String> {
    let out = n.ns.run("conntrack", &["-L", "-p", "udp", "--dport", "8472"]).unwrap_or_default();
    out.lines().filter(|l| l.contains("dport=8472")).map(str::to_string).collect()
}

/// --notrack-tunnel (opt-in) takes the tunnel datagrams out of connection tracking, in
/// iptables mode and in nftables mode: where the kernel tracked each outer flow before, no
/// entry for the tunnel port once the flag is on, while the containers' own flows are still
/// tracked; the rule goes with teardown.
#[test]
fn notrack_tunnel_takes_only_the_tunnel_out_of_conntrack() {
    // iptables mode, and the control: without the flag the kernel tracks the tunnel.
    let mut c = cluster("nt", &with_args(&[], 2));
    // kube-proxy's rule: conntrack runs in the node's namespace (the kernel hooks it in only
    // where a rule needs it).
    for n in &c.nodes {
        ok("invalid", n.ns.run("iptables", &["-w", "-I", "FORWARD", "1", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]));
    }
    ok("TCP", tcp_transfer(&c.node(1).containers[0], &c.node(2).containers[0], c.node(2).container_ip(0), 1 << 20));
    assert!(!tunnel_entries(c.node(2)).is_empty(), "control: the kernel tracks tunnel datagrams by default");
    c.set_agent_args(vec!["--notrack-tunnel".into()], Vec::new());
    ok("restart with the flag", c.restart_agent_with_current_args(2));
    let n2 = c.node(2);
    let rules = ok("raw table", n2.ns.run("iptables", &["-w", "-t", "raw", "-S", "OVERLAY-NOTRACK"]));
    assert!(rules.contains("--dport 8472") && rules.contains("-j NOTRACK"), "{rules}");
    ok("flush", n2.ns.run("conntrack", &["-F"]));
    let (n1, n2) = (c.node(1), c.node(2));
    ok("TCP", tcp_transfer(&n1.containers[0], &n2.containers[0], n2.container_ip(0), 1 << 20));
    assert_eq!(tunnel_entries(n2), Vec::<String>::new(), "tunnel datagrams tracked despite --notrack-tunnel");
    let inner = n2.ns.run("conntrack", &["-L", "-p", "tcp"]).unwrap_or_default();
    assert!(inner.contains(&n1.container_ip(0).to_string()), "the containers' flow is tracked: {inner}");
    ok("stop", c.stop_agent(2));
    let n2 = c.node(2);
    ok("teardown", n2.agent_cli(&["teardown"]));
    assert!(n2.ns.run("iptables", &["-w", "-t", "raw", "-S", "OVERLAY-NOTRACK"]).is_err(), "teardown leaves the notrack chain");

    // nftables mode: the rule in a table of ours at the raw priority.
    let config = r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#.to_string();
    let spec = ClusterSpec { control: Control::Etcd { tls: false, config }, ..with_args(&["--notrack-tunnel"], 2) };
    let c = cluster("nn", &spec);
    let (n1, n2) = (c.node(1), c.node(2));
    for n in &c.nodes {
        ok("invalid", n.ns.run("iptables", &["-w", "-I", "FORWARD", "1", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]));
    }
    let table = ok("nft table", n2.ns.run("nft", &["list", "table", "ip", "overlay-notrack"]));
    assert!(table.contains("udp dport 8472 notrack") && table.contains("priority raw"), "{table}");
    ok("TCP", tcp_transfer(&n1.containers[0], &n2.containers[0], n2.container_ip(0), 1 << 20));
    assert_eq!(tunnel_entries(n2), Vec::<String>::new(), "nftables mode: tunnel datagrams tracked despite --notrack-tunnel");
}
