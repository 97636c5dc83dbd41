//! The etcd control plane against a real etcd server (Debian's etcd 3.4, started by the
//! harness in the cluster's underlay namespace): convergence from etcd alone, flannel-format
//! leases both ways, propagation of joins and deletions (measured and bounded), lease reuse
//! after restart, exhaustion, malformed leases, and TLS.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

use overlay_tests::{
    require_root,
    traffic::{ping, tcp_transfer},
    wait_until, Backend, Cluster, ClusterSpec, Control, NodeKind,
};

/// Generous bound for a lease change to reach another node's maps on a loaded 2-core
/// machine (typical: a few milliseconds; printed by the tests).
const PROPAGATION_BOUND: Duration = Duration::from_secs(5);

fn cluster(tag: &str, spec: &ClusterSpec) -> Cluster {
    require_root();
    Cluster::new(tag, spec).unwrap_or_else(|e| panic!("building the cluster failed: {e:#}"))
}

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

fn subnets_of(c: &Cluster) -> Vec<Ipv4Net> {
    c.nodes.iter().map(|n| n.subnet).collect()
}

/// Poll (every 2 ms) until `f` holds; the time it took, or None after `bound`.
fn time_until(bound: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Every agent's maps hold exactly the other nodes' subnets.
fn converged(c: &Cluster) -> bool {
    c.nodes.iter().filter(|n| matches!(n.kind, NodeKind::Agent { .. })).all(|n| {
        let have: BTreeSet<Ipv4Net> = n.routes().iter().map(|r| r.subnet).collect();
        let want: BTreeSet<Ipv4Net> = c.nodes.iter().filter(|o| o.index != n.index).map(|o| o.subnet).collect();
        have == want
    })
}

#[test]
fn cluster_converges_from_etcd_alone_and_carries_traffic() {
    let c = cluster("ec", &ClusterSpec::etcd(Backend::Vxlan, "tc", 3));
    let subnets: BTreeSet<_> = subnets_of(&c).into_iter().collect();
    assert_eq!(subnets.len(), 3, "no two nodes may hold the same subnet: {subnets:?}");
    for s in &subnets {
        assert!(s.prefix_len() == 24 && "10.244.0.0/16".parse::<Ipv4Net>().unwrap().contains(s), "{s}");
    }
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)), "routes did not converge");

    // etcdctl shows flannel-format leases written by our agents.
    let out = ok("etcdctl get", c.etcd().etcdctl(&["get", "--prefix", "/coreos.com/network/subnets"]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "3 keys and 3 values expected:\n{out}");
    for n in &c.nodes {
        let key = format!("/coreos.com/network/subnets/{}-24", n.subnet.network());
        let i = lines.iter().position(|l| *l == key).unwrap_or_else(|| panic!("no key {key} in\n{out}"));
        let v: serde_json::Value = serde_json::from_str(lines[i + 1]).expect("lease JSON");
        assert_eq!(v["PublicIP"], n.underlay_ip.to_string());
        assert_eq!(v["BackendType"], "vxlan");
        assert_eq!(v["BackendData"]["VNI"], 1);
        assert_eq!(v["BackendData"]["VtepMAC"], overlay_agent::netdev::format_mac(&n.vtep_mac));
        assert!(v.as_object().unwrap().contains_key("PublicIPv6"));
    }

    // The routes carry traffic.
    for a in &c.nodes {
        for b in &c.nodes {
            if a.index != b.index {
                ok("ping", ping(&a.containers[0], b.container_ip(1), 2));
            }
        }
    }
    ok("TCP", tcp_transfer(&c.node(1).containers[0], &c.node(3).containers[1], c.node(3).container_ip(1), 16 << 20));

    // The admin subcommands read etcd as the seed's etcdctl steps do.
    let leases = ok("leases", c.node(1).agent_cli(&["leases", &c.etcd().agent_flags()[0]]));
    for n in &c.nodes {
        assert!(leases.contains(&n.subnet.to_string()) && leases.contains(&n.underlay_ip.to_string()), "{leases}");
    }
    assert!(leases.contains("23h"), "time left should be close to the 24 h TTL:\n{leases}");
    let cfg = ok("config get", c.node(2).agent_cli(&["config", "get", &c.etcd().agent_flags()[0]]));
    assert!(cfg.contains("10.244.0.0/16"), "{cfg}");

    // A value that is not flannel's format is skipped and the agents keep running.
    ok("put garbage", c.etcd().etcdctl(&["put", "/coreos.com/network/subnets/10.244.250.0-24", "{not json"]));
    ok("put bad key", c.etcd().etcdctl(&["put", "/coreos.com/network/subnets/banana", "{}"]));
    // Once every agent has logged both (it handles watch events in order), they are handled.
    let skipped = |n: &overlay_tests::Node, key: &str| n.log_text().lines().any(|l| l.contains("not in flannel's format") && l.contains(key));
    for n in &c.nodes {
        assert!(
            wait_until(PROPAGATION_BOUND, || skipped(n, "10.244.250.0-24") && skipped(n, "subnets/banana")),
            "node {} did not log both malformed leases:\n{}",
            n.index,
            n.log_text()
        );
    }
    assert!(converged(&c), "garbage must not change routes");
    ok("ping after garbage", ping(&c.node(2).containers[0], c.node(1).container_ip(0), 1));

    // What an operator reads is plain text: no colour codes in a log that is not a terminal
    // (journald, a file), no Rust debug forms in the log or in `status`.
    for n in &c.nodes {
        let log = n.log_text();
        assert!(!log.contains('\x1b'), "colour codes in node {}'s log:\n{log}", n.index);
        assert!(!log.contains("Some(") && !log.contains("decap=Tc"), "debug formatting in node {}'s log:\n{log}", n.index);
        let status = ok("status", n.agent_cli(&["status"]));
        assert_eq!(status.trim(), "device=flannel.1 underlay=eth0 encap=attached decap=tc attach=tcx guard=sk_lookup ready=true kernel_drops=traced");
    }
}

#[test]
fn joins_and_deletions_reach_every_node_within_the_bound() {
    let mut c = cluster("ej", &ClusterSpec::etcd(Backend::Vxlan, "tc", 2));
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)));

    // A node joining later.
    let started = Instant::now();
    ok("join", c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
    let joined_at = started.elapsed();
    let n3 = c.node(3).subnet;
    let t_join = time_until(PROPAGATION_BOUND, || c.node(1).routes().iter().any(|r| r.subnet == n3) && c.node(2).routes().iter().any(|r| r.subnet == n3))
        .unwrap_or_else(|| panic!("node 3's lease did not reach nodes 1 and 2 within {PROPAGATION_BOUND:?}"));
    eprintln!("join: agent up in {joined_at:?}; its route reached the others {t_join:?} after that");
    ok("ping new node", ping(&c.node(1).containers[0], c.node(3).container_ip(0), 2));

    // A lease written and then deleted by hand (etcdctl put, del), as for a node that left:
    // every node adds the route, then drops it.
    let gone: Ipv4Net = "10.244.177.0/24".parse().unwrap();
    let gone_key = "/coreos.com/network/subnets/10.244.177.0-24";
    let value = r#"{"PublicIP":"192.168.100.77","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:77"}}"#;
    let everywhere = |present: bool| c.nodes.iter().all(|n| n.routes().iter().any(|r| r.subnet == gone) == present);
    ok("etcdctl put", c.etcd().etcdctl(&["put", gone_key, value]));
    let t_put = time_until(PROPAGATION_BOUND, || everywhere(true))
        .unwrap_or_else(|| panic!("a new lease did not reach every node within {PROPAGATION_BOUND:?}"));
    ok("etcdctl del", c.etcd().etcdctl(&["del", gone_key]));
    let t_del = time_until(PROPAGATION_BOUND, || everywhere(false))
        .unwrap_or_else(|| panic!("a deleted lease's route was not dropped by every node within {PROPAGATION_BOUND:?}"));
    eprintln!("put: every node had the route after {t_put:?}; delete: every node dropped it after {t_del:?}");

    // The same lease put again without its VtepMAC (no longer usable), then with one: each
    // node drops the route at the event, as a listing would, and takes it back.
    ok("etcdctl put", c.etcd().etcdctl(&["put", gone_key, value]));
    assert!(wait_until(PROPAGATION_BOUND, || everywhere(true)));
    let no_mac = r#"{"PublicIP":"192.168.100.77","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1}}"#;
    ok("etcdctl put", c.etcd().etcdctl(&["put", gone_key, no_mac]));
    assert!(
        wait_until(PROPAGATION_BOUND, || everywhere(false)),
        "a lease that lost its VtepMAC kept its route:\n{}",
        c.node(1).log_text()
    );
    ok("etcdctl put", c.etcd().etcdctl(&["put", gone_key, value]));
    assert!(wait_until(PROPAGATION_BOUND, || everywhere(true)));
    ok("etcdctl del", c.etcd().etcdctl(&["del", gone_key]));
    assert!(wait_until(PROPAGATION_BOUND, || everywhere(false)));

    // Node 2's own lease deleted by hand: its agent sees it and re-claims the same subnet,
    // loudly.
    let key = format!("/coreos.com/network/subnets/{}-24", c.node(2).subnet.network());
    ok("etcdctl del", c.etcd().etcdctl(&["del", &key]));
    assert!(
        wait_until(PROPAGATION_BOUND, || c.etcd().etcdctl(&["get", &key]).is_ok_and(|o| o.contains(&c.node(2).underlay_ip.to_string()))),
        "node 2 did not re-acquire its subnet:\n{}",
        c.node(2).log_text()
    );
    assert!(c.node(2).log_text().contains("THIS NODE'S LEASE WAS DELETED FROM ETCD"), "{}", c.node(2).log_text());
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)), "routes did not come back after the re-claim");
    ok("ping re-claimed node", ping(&c.node(3).containers[0], c.node(2).container_ip(0), 2));
}

#[test]
fn restarted_agent_reuses_its_lease_and_removes_stale_routes() {
    let mut c = cluster("er", &ClusterSpec::etcd(Backend::Vxlan, "tc", 3));
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)));
    let before = c.node(1).subnet;
    let n3 = c.node(3).subnet;
    ok("stop", c.stop_agent(1));
    // While node 1's agent is down, node 3 leaves (its lease is deleted).
    ok("stop 3", c.stop_agent(3));
    ok("del", c.etcd().etcdctl(&["del", &format!("/coreos.com/network/subnets/{}-24", n3.network())]));
    // The data plane of node 1 kept forwarding without its agent.
    ok("ping without agent", ping(&c.node(1).containers[0], c.node(2).container_ip(0), 2));
    assert!(c.node(1).routes().iter().any(|r| r.subnet == n3), "stale route should still be there before restart");
    ok("restart", c.restart_agent(1));
    let env = std::fs::read_to_string(&c.node(1).subnet_file).unwrap();
    assert_eq!(overlay_tests::parse_subnet_env(&env).unwrap().0, before, "restart must keep the subnet");
    assert!(c.node(1).log_text().contains("reusing this node's existing lease"), "{}", c.node(1).log_text());
    // flannel #2554: the route of the node deleted while we were down is gone after start-up.
    assert!(
        wait_until(PROPAGATION_BOUND, || !c.node(1).routes().iter().any(|r| r.subnet == n3)),
        "stale route for {n3} survived the restart"
    );
    ok("ping after restart", ping(&c.node(2).containers[0], c.node(1).container_ip(1), 2));
}

#[test]
fn exhausted_network_fails_with_a_clear_error() {
    // Two subnets only: 10.244.1.0/24 and 10.244.2.0/24.
    let config = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.2.0","Backend":{"Type":"vxlan"}}"#;
    let spec = ClusterSpec {
        control: Control::Etcd { tls: false, config: config.into() },
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 2)
    };
    let mut c = cluster("ex", &spec);
    let err = c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()).expect_err("a third node cannot get a subnet");
    let msg = format!("{err:#}");
    assert!(msg.contains("no free subnet in 10.244.0.0/16"), "{msg}");
    let got: BTreeSet<_> = c.nodes[..2].iter().map(|n| n.subnet.to_string()).collect();
    assert_eq!(got, BTreeSet::from(["10.244.1.0/24".to_string(), "10.244.2.0/24".to_string()]));
}

/// A lease written by hand in flannel's format (as a stock flannel node writes it) is picked
/// up and routed; the stock node, set up from our leases, talks to ours both ways.
#[test]
fn hand_written_flannel_lease_is_routed_to_a_stock_node() {
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "tc" }, NodeKind::Agent { decap_hook: "xdp" }, NodeKind::StockFlannel],
        full_mesh: false,
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 3)
    };
    let c = cluster("eh", &spec);
    let stock = c.node(3);
    assert_eq!(stock.subnet, "10.244.103.0/24".parse::<Ipv4Net>().unwrap());
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)), "our agents did not route the hand-written lease");
    for ours in [c.node(1), c.node(2)] {
        let r = ours.routes().into_iter().find(|r| r.subnet == stock.subnet).unwrap();
        assert_eq!(r.public_ip, stock.underlay_ip);
        assert_eq!(r.vtep_mac, stock.vtep_mac);
        // The stock node's side, as flanneld would set it from our leases.
        ok("stock route", c.add_route(stock, ours));
    }
    for ours in [c.node(1), c.node(2)] {
        ok("ours -> stock", ping(&ours.containers[0], stock.container_ip(0), 2));
        ok("stock -> ours", ping(&stock.containers[1], ours.container_ip(1), 2));
    }
}

#[test]
fn agents_reach_etcd_over_tls_with_the_seeds_flags() {
    let spec = ClusterSpec {
        control: Control::Etcd { tls: true, config: overlay_tests::network_config(Backend::Vxlan) },
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 2)
    };
    let c = cluster("et", &spec);
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)));
    ok("ping over a TLS-configured cluster", ping(&c.node(1).containers[0], c.node(2).container_ip(0), 2));
    // Without the client certificate etcd refuses us: the TLS really is in use.
    let plain = c.node(1).agent_cli(&["leases", &format!("--etcd-endpoints=https://{}:2379", overlay_tests::ETCD_IP), &format!("--etcd-cafile={}", c.etcd().tls.as_ref().unwrap().ca.display())]);
    assert!(plain.is_err(), "etcd accepted a client without a certificate: {plain:?}");
    let listed = ok("leases over TLS", c.node(2).agent_cli(&[
        "leases",
        &c.etcd().agent_flags()[0], &c.etcd().agent_flags()[1], &c.etcd().agent_flags()[2], &c.etcd().agent_flags()[3],
    ]));
    assert!(listed.contains(&c.node(1).subnet.to_string()), "{listed}");
}


/// With a short TTL the agent renews its lease before it expires, again and again.
#[test]
fn leases_are_renewed_before_they_expire() {
    let spec = ClusterSpec {
        agent_args: vec!["--subnet-lease-ttl=4s".into(), "--subnet-lease-renew-margin=1".into()],
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 1)
    };
    let c = cluster("rn", &spec);
    let key = format!("/coreos.com/network/subnets/{}-24", c.node(1).subnet.network());
    // Four renewals span three TTLs: without them etcd would have deleted the key after one.
    // The key is checked all along (each etcdctl call takes a few ms).
    let renewals = || c.node(1).log_text().matches("lease renewed").count();
    let renewed = wait_until(Duration::from_secs(40), || {
        let got = ok("get", c.etcd().etcdctl(&["get", &key]));
        assert!(got.contains(&c.node(1).underlay_ip.to_string()), "lease expired:\n{}", c.node(1).log_text());
        renewals() >= 4
    });
    assert!(renewed, "expected 4 renewals (every 3 s with a 4 s TTL) within 40 s, saw {}", renewals());
    assert!(!c.node(1).log_text().contains("THIS NODE'S LEASE WAS"), "the lease must never lapse");
}

/// Authentication on: root, and a `flannel` user (password `s3cret-pw`) that may read and
/// write flannel's prefix only, as an operator following etcd's RBAC guide sets it up.
fn enable_auth(e: &mut overlay_tests::etcd::Etcd) {
    ok("user", e.etcdctl(&["user", "add", "root:rootpw"]));
    ok("user", e.etcdctl(&["user", "add", "flannel:s3cret-pw"]));
    ok("role", e.etcdctl(&["role", "add", "flannel"]));
    ok("grant", e.etcdctl(&["role", "grant-permission", "--prefix=true", "flannel", "readwrite", "/coreos.com/network/"]));
    ok("bind", e.etcdctl(&["user", "grant-role", "flannel", "flannel"]));
    ok("auth", e.etcdctl(&["auth", "enable"]));
    e.user = Some("root:rootpw".into());
}

fn flannel_user(endpoints: &str) -> (Vec<String>, Vec<(String, String)>) {
    (
        vec![endpoints.to_string(), "--etcd-username=flannel".into()],
        vec![("FLANNELD_ETCD_PASSWORD".into(), "s3cret-pw".into())],
    )
}

/// etcd forgets an auth token after `--auth-token-ttl` (2 s here; 300 s by default), and all
/// of them when it restarts: the agent logs in again when etcd calls its token invalid, so
/// that listings, the watch and renewals go on. Before, after an etcd restart every call
/// failed as "invalid auth token" and was retried forever; renewals, which ran only between
/// watch events, stopped, and the lease expired (every peer then dropped the node's routes).
#[test]
fn an_expired_auth_token_is_refreshed_and_the_lease_kept() {
    let spec = ClusterSpec { nodes: vec![], etcd_args: vec!["--auth-token-ttl=2".into()], ..ClusterSpec::etcd(Backend::Vxlan, "tc", 0) };
    let mut c = cluster("at", &spec);
    enable_auth(c.etcd_mut());
    let (mut args, env) = flannel_user(&c.etcd().agent_flags()[0]);
    // An 8 s lease renewed at 4 s: every renewal finds the last token 2 s past its expiry.
    args.extend(["--subnet-lease-ttl=8s".into(), "--subnet-lease-renew-margin=1".into()]);
    c.set_agent_args(args, env);
    ok("join", c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
    let key = format!("/coreos.com/network/subnets/{}-24", c.node(1).subnet.network());
    let renewals = |c: &Cluster| c.node(1).log_text().matches("lease renewed").count();
    let renewed = wait_until(Duration::from_secs(60), || {
        let got = ok("get", c.etcd().etcdctl(&["get", &key]));
        assert!(got.contains(&c.node(1).underlay_ip.to_string()), "the lease expired:\n{}", c.node(1).log_text());
        renewals(&c) >= 3
    });
    assert!(renewed, "expected 3 renewals within 60 s, saw {}:\n{}", renewals(&c), c.node(1).log_text());
    // etcd restarts (its tokens die with it); the watch breaks and node 1 lists again.
    ok("stop", c.etcd_mut().stop());
    ok("restart", c.etcd_mut().restart());
    let before = renewals(&c);
    // A node joining now reaches node 1 through a listing and a new watch, with a new token.
    ok("join", c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
    assert!(wait_until(Duration::from_secs(30), || converged(&c)), "node 1 did not see node 2:\n{}", c.node(1).log_text());
    let renewed = wait_until(Duration::from_secs(30), || {
        let got = ok("get", c.etcd().etcdctl(&["get", &key]));
        assert!(got.contains(&c.node(1).underlay_ip.to_string()), "the lease expired:\n{}", c.node(1).log_text());
        renewals(&c) >= before + 3
    });
    assert!(renewed, "renewals stopped after the restart:\n{}", c.node(1).log_text());
    assert!(!c.node(1).log_text().contains("THIS NODE'S LEASE WAS"), "the lease must never lapse");
}

/// etcd with authentication on: agents log in with --etcd-username/--etcd-password (the
/// password from FLANNELD_ETCD_PASSWORD, never on the command line), and a dead endpoint
/// listed first does not stop them.
#[test]
fn username_password_and_several_endpoints() {
    require_root();
    let mut c = cluster("ea", &ClusterSpec { nodes: vec![], ..ClusterSpec::etcd(Backend::Vxlan, "tc", 0) });
    enable_auth(c.etcd_mut());
    let endpoints = format!("--etcd-endpoints=http://192.168.100.253:2379,{}", c.etcd().endpoint);
    let (args, env) = flannel_user(&endpoints);
    c.set_agent_args(args, env);
    ok("join", c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
    ok("join", c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)));
    ok("ping", ping(&c.node(1).containers[0], c.node(2).container_ip(0), 2));
    for n in &c.nodes {
        assert!(!n.log_text().contains("s3cret-pw"), "the password leaked into the log:\n{}", n.log_text());
    }
    // Wrong password: refused with etcd's reason, not a hang.
    let bad = c.node(1).agent_cli(&["leases", &endpoints, "--etcd-username=flannel", "--etcd-password=wrong"]);
    let msg = format!("{:#}", bad.expect_err("a wrong password must fail"));
    assert!(msg.to_lowercase().contains("authentication failed") || msg.contains("invalid"), "{msg}");
}

/// A dual-stack flannel node's lease, keyed as flannel's MakeSubnetKey writes it
/// ("10.244.7.0-24&fd00:0:0:7::-64"): allocation counts its IPv4 subnet as taken, the agent
/// routes it, drops the route when it is deleted, and a claim of that subnet (the agent's
/// own registry code) finds it held. Before, the key was "malformed": the agent took the
/// subnet a dual-stack node holds.
#[test]
fn dual_stack_leases_count_for_allocation_and_routing() {
    use overlay_agent::lease::{registry::{EtcdOptions, Registry, DEFAULT_PREFIX}, LeaseAttrs};
    let config = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.7.0","SubnetMax":"10.244.8.0","Backend":{"Type":"vxlan"}}"#;
    let spec = ClusterSpec { nodes: vec![], control: Control::Etcd { tls: false, config: config.into() }, ..ClusterSpec::etcd(Backend::Vxlan, "tc", 0) };
    let mut c = cluster("ds", &spec);
    let key = "/coreos.com/network/subnets/10.244.7.0-24&fd00:0:0:7::-64";
    let value = r#"{"PublicIP":"192.168.100.77","PublicIPv6":"fd00::77","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:77"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:78"}}"#;
    ok("put", c.etcd().etcdctl(&["put", key, value]));
    let held: Ipv4Net = "10.244.7.0/24".parse().unwrap();

    let endpoint = c.etcd().endpoint.clone();
    let claimed = ok(
        "claim",
        c.underlay.enter(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let opts = EtcdOptions { endpoints: vec![endpoint], prefix: DEFAULT_PREFIX.into(), ..Default::default() };
                let mut reg = Registry::connect(&opts).await?;
                let me = LeaseAttrs::vxlan("192.168.100.99".parse().unwrap(), 1, [2, 0, 0, 0, 0, 0x99]);
                let dual = reg.claim(&held, &me, Duration::from_secs(60)).await?;
                // A claim whose answer was lost and is tried again finds the subnet held by
                // this node already: it gets its lease back, not "taken".
                let free: Ipv4Net = "10.244.9.0/24".parse().unwrap();
                let first = reg.claim(&free, &me, Duration::from_secs(60)).await?;
                let again = reg.claim(&free, &me, Duration::from_secs(60)).await?;
                let other = LeaseAttrs::vxlan("192.168.100.98".parse().unwrap(), 1, [2, 0, 0, 0, 0, 0x98]);
                let by_other = reg.claim(&free, &other, Duration::from_secs(60)).await?;
                reg.revoke(first.expect("claimed")).await?;
                // Two dual-stack claims of different IPv4 subnets naming one IPv6 subnet (the
                // held lease's): the IPv6 subnet is already taken, so the claim is given up,
                // its key gone; another IPv6 subnet is claimed.
                use overlay_agent::lease::LeaseKey;
                let v6_taken = LeaseKey { v4: "10.244.10.0/24".parse().unwrap(), v6: Some("fd00:0:0:7::/64".parse().unwrap()) };
                let v6_free = LeaseKey { v4: "10.244.10.0/24".parse().unwrap(), v6: Some("fd00:0:0:a::/64".parse().unwrap()) };
                let tie = reg.claim(v6_taken, &me, Duration::from_secs(60)).await?;
                let tie_left = reg.get_lease(v6_taken).await?;
                let untied = reg.claim(v6_free, &me, Duration::from_secs(60)).await?;
                reg.revoke(untied.expect("claimed")).await?;
                assert!(tie.is_none() && tie_left.is_none(), "a claim of a taken IPv6 subnet went through: {tie:?} {tie_left:?}");
                Ok::<_, overlay_agent::lease::registry::RegistryError>((dual, first, again, by_other))
            })
        }),
    );
    let (dual, first, again, by_other) = claimed.expect("etcd");
    assert_eq!(dual, None, "a subnet held by a dual-stack node was claimed again");
    assert!(first.is_some());
    assert_eq!(again, first, "a second claim by the same node must find its own lease");
    assert_eq!(by_other, None, "another node's claim must find the subnet taken");

    ok("join", c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
    assert_eq!(c.node(1).subnet, "10.244.8.0/24".parse::<Ipv4Net>().unwrap(), "the agent must take the free subnet");
    let routed = |c: &Cluster| c.node(1).routes().iter().any(|r| r.subnet == held && r.public_ip.to_string() == "192.168.100.77");
    assert!(wait_until(PROPAGATION_BOUND, || routed(&c)), "{}", c.node(1).log_text());
    assert!(!c.node(1).log_text().contains("not in flannel's format"), "{}", c.node(1).log_text());
    ok("del", c.etcd().etcdctl(&["del", key]));
    assert!(wait_until(PROPAGATION_BOUND, || !routed(&c)), "the deleted dual-stack lease kept its route");
}

/// The etcd lease ID a key is bound to (0: none, a reservation), and its value.
fn lease_of(c: &Cluster, key: &str) -> Option<(i64, String)> {
    let out = ok("get", c.etcd().etcdctl(&["get", key, "-w", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    let kv = v["kvs"].get(0)?;
    let value = kv["value"].as_str().map(|b| String::from_utf8(decode_base64(b)).unwrap()).unwrap_or_default();
    Some((kv["lease"].as_i64().unwrap_or(0), value))
}

fn decode_base64(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | A.iter().position(|a| *a == c).expect("base64") as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// An operator's reservation (flannel's Documentation/reservations.md: a lease key written
/// without an etcd lease) is used as it is: the node takes that subnet, writes its attributes
/// into it, never binds it to a TTL, and takes it again after a restart. Before, the agent
/// deleted it and claimed a subnet afresh. A lease the config no longer allows is deleted at
/// the next start, as flannel does, instead of holding a subnet until it expires.
#[test]
fn reservations_are_kept_and_leases_the_config_drops_are_deleted() {
    let mut c = cluster("rv", &ClusterSpec { nodes: vec![], ..ClusterSpec::etcd(Backend::Vxlan, "tc", 0) });
    let reserved = "/coreos.com/network/subnets/10.244.42.0-24";
    let node1 = overlay_tests::underlay_ip(1);
    ok("put", c.etcd().etcdctl(&["put", reserved, &format!(r#"{{"PublicIP":"{node1}"}}"#)]));
    ok("join", c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
    ok("join", c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
    assert_eq!(c.node(1).subnet, "10.244.42.0/24".parse::<Ipv4Net>().unwrap(), "{}", c.node(1).log_text());
    let (lease, value) = lease_of(&c, reserved).expect("the reservation is gone");
    assert_eq!(lease, 0, "the reservation was bound to a TTL");
    assert!(value.contains(&overlay_agent::netdev::format_mac(&c.node(1).vtep_mac)), "our attributes are not in it: {value}");
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)));
    ok("restart", c.restart_agent(1));
    let env = std::fs::read_to_string(&c.node(1).subnet_file).unwrap();
    assert_eq!(overlay_tests::parse_subnet_env(&env).unwrap().0.to_string(), "10.244.42.0/24");
    assert_eq!(lease_of(&c, reserved).map(|l| l.0), Some(0));
    let log = c.node(1).log_text();
    assert!(!log.contains("lease renewed") && !log.contains("LEASE WAS"), "{log}");

    // Node 2's subnet falls outside a new config: at its next start the old lease is deleted
    // at once (it would otherwise hold the subnet for the rest of its 24 h TTL).
    let old = c.node(2).subnet;
    let old_key = format!("/coreos.com/network/subnets/{}-24", old.network());
    let config = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.200.0","SubnetMax":"10.244.250.0","Backend":{"Type":"vxlan"}}"#;
    ok("config", c.etcd().etcdctl(&["put", "/coreos.com/network/config", config]));
    ok("restart", c.restart_agent(2));
    let env = std::fs::read_to_string(&c.node(2).subnet_file).unwrap();
    let new = overlay_tests::parse_subnet_env(&env).unwrap().0;
    assert!(new.network().octets()[2] >= 200, "{new} is outside the new config");
    assert_eq!(lease_of(&c, &old_key), None, "the lease the config dropped is still there:\n{}", c.node(2).log_text());
}

/// The underlay interface chosen as flannel chooses it: `--iface` repeated (a name that does
/// not exist is passed over; an address picks the interface holding it), `--iface-regex`
/// (addresses, then names), `--iface-can-reach` (the route to an address), each tried in turn
/// when the one before matches nothing. Each node comes up on eth0 with its address as
/// PublicIP, and the nodes route to each other.
#[test]
fn the_interface_is_chosen_as_flannel_chooses_it() {
    let mut c = cluster("if", &ClusterSpec { nodes: vec![], ..ClusterSpec::etcd(Backend::Vxlan, "tc", 0) });
    let ways: [Vec<String>; 4] = [
        vec!["--iface=nosuch0".into(), format!("--iface={}", overlay_tests::underlay_ip(1))],
        vec![r"--iface-regex=^192\.168\.100\.".into()],
        vec![format!("--iface-can-reach={}", overlay_tests::ETCD_IP)],
        // No --iface exists: on to --iface-regex (none matches), then --iface-can-reach.
        vec!["--iface=nosuch0".into(), "--iface-regex=^ib".into(), format!("--iface-can-reach={}", overlay_tests::ETCD_IP)],
    ];
    for (i, args) in ways.into_iter().enumerate() {
        c.set_agent_args(args, vec![]);
        ok("join", c.join(NodeKind::Agent { decap_hook: "tc" }).map(|_| ()));
        let n = c.node(i + 1);
        assert!(n.log_text().contains(&format!("underlay interface chosen iface=eth0 public_ip={}", n.underlay_ip)), "{}", n.log_text());
        let key = format!("/coreos.com/network/subnets/{}-24", n.subnet.network());
        assert!(ok("get", c.etcd().etcdctl(&["get", &key])).contains(&format!("\"PublicIP\":\"{}\"", n.underlay_ip)));
    }
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)));
    ok("ping", ping(&c.node(1).containers[0], c.node(3).container_ip(0), 2));
    // None of the named interfaces exists: refused, naming them.
    c.set_agent_args(vec!["--iface=nosuch0".into(), "--iface=10.9.9.9".into()], vec![]);
    let i = ok("spawn", c.spawn_unready());
    assert!(wait_until(Duration::from_secs(20), || c.node_mut(i).agent_exit().is_some()), "{}", c.node(i).log_text());
    assert!(c.node(i).log_text().contains("none of --iface nosuch0, 10.9.9.9 exists here"), "{}", c.node(i).log_text());
}

/// vxlan's DirectRouting, decided per peer as flannel decides it: a peer on the underlay's
/// own link gets a kernel route to its subnet via its address, and the traffic goes there
/// unencapsulated (neither node's encap or decap counters move, and the reverse-path check
/// of rp_filter=1 nodes accepts it); a peer behind a gateway stays encapsulated, and a
/// restart tidies a direct route no longer right.
#[test]
fn direct_routing_routes_peers_on_the_same_link_without_encapsulation() {
    use overlay_common::Counter;
    let config = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
    let spec = ClusterSpec { control: Control::Etcd { tls: false, config: config.into() }, ..ClusterSpec::etcd(Backend::Vxlan, "tc", 2) };
    let mut c = cluster("dr", &spec);
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)));
    let (n1, n2) = (c.node(1), c.node(2));
    let direct = |c: &Cluster, i: usize| ok("routes", c.node(i).ns.run("ip", &["route", "show", "proto", "97"]));
    assert!(direct(&c, 1).contains(&format!("{} via {} dev eth0", n2.subnet, n2.underlay_ip)), "{}", direct(&c, 1));
    assert!(direct(&c, 2).contains(&format!("{} via {} dev eth0", n1.subnet, n1.underlay_ip)), "{}", direct(&c, 2));
    let (enc, dec) = (n1.counter(Counter::Encapsulated), n2.counter(Counter::Decapsulated));
    ok("ping", ping(&n1.containers[0], n2.container_ip(0), 2));
    ok("TCP", tcp_transfer(&n1.containers[0], &n2.containers[1], n2.container_ip(1), 4 << 20));
    assert_eq!((n1.counter(Counter::Encapsulated), n2.counter(Counter::Decapsulated)), (enc, dec), "direct traffic must not be encapsulated");
    // The self-healing check looks at the network's own route: a direct route to a peer's
    // subnet is no damage.
    assert!(!n1.log_text().contains("damaged"), "{}", n1.log_text());

    // Node 2 now reached through a gateway (as a peer on another link would be): at its
    // next start node 1 drops the direct route and encapsulates again.
    ok("gateway", n1.ns.run("ip", &["route", "add", &format!("{}/32", n2.underlay_ip), "via", &overlay_tests::ETCD_IP.to_string(), "dev", "eth0"]));
    ok("restart", c.restart_agent(1));
    assert!(!direct(&c, 1).contains(&c.node(2).subnet.to_string()), "{}", direct(&c, 1));
    assert!(c.node(1).routes().iter().any(|r| r.subnet == c.node(2).subnet), "the peer stays routed through the tunnel");
}

/// flannel's host-gw: no device, no encapsulation; every node routes each peer's subnet via
/// the peer's address on the shared link, with the lease flannel writes (`BackendType`
/// "host-gw") and the underlay's whole MTU for containers. A lease whose node is not on the
/// link is refused with the reason; a deleted lease takes its route with it.
#[test]
fn host_gw_routes_each_subnet_via_its_node_without_a_device() {
    let config = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
    let spec = ClusterSpec { control: Control::Etcd { tls: false, config: config.into() }, ..ClusterSpec::etcd(Backend::Vxlan, "tc", 2) };
    let c = cluster("hg", &spec);
    let (n1, n2) = (c.node(1), c.node(2));
    let routes = |i: usize| ok("routes", c.node(i).ns.run("ip", &["route", "show", "proto", "97"]));
    assert!(
        wait_until(PROPAGATION_BOUND, || routes(1).contains(&format!("{} via {} dev eth0", n2.subnet, n2.underlay_ip))
            && routes(2).contains(&format!("{} via {} dev eth0", n1.subnet, n1.underlay_ip))),
        "{}\n{}",
        routes(1),
        n1.log_text()
    );
    assert!(n1.ns.run("ip", &["link", "show", "flannel.1"]).is_err(), "host-gw makes no overlay device");
    let key = format!("/coreos.com/network/subnets/{}-24", n1.subnet.network());
    let lease = ok("get", c.etcd().etcdctl(&["get", &key]));
    assert!(lease.contains(&format!(r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#, n1.underlay_ip)), "{lease}");
    assert!(std::fs::read_to_string(&n1.subnet_file).unwrap().contains("FLANNEL_MTU=1500"));
    ok("ping", ping(&n1.containers[0], n2.container_ip(0), 2));
    ok("TCP", tcp_transfer(&n2.containers[1], &n1.containers[1], n1.container_ip(1), 4 << 20));

    let fake = "/coreos.com/network/subnets/10.244.200.0-24";
    ok("put", c.etcd().etcdctl(&["put", fake, r#"{"PublicIP":"10.99.0.1","BackendType":"host-gw"}"#]));
    assert!(
        wait_until(PROPAGATION_BOUND, || n1.log_text().contains("peer 10.99.0.1 is not on eth0's link")),
        "{}",
        n1.log_text()
    );
    assert!(!routes(1).contains("10.244.200.0"));
    ok("put", c.etcd().etcdctl(&["put", fake, r#"{"PublicIP":"192.168.100.77","BackendType":"host-gw"}"#]));
    assert!(wait_until(PROPAGATION_BOUND, || routes(1).contains("10.244.200.0/24 via 192.168.100.77 dev eth0")), "{}", routes(1));
    ok("del", c.etcd().etcdctl(&["del", fake]));
    assert!(wait_until(PROPAGATION_BOUND, || !routes(1).contains("10.244.200.0")), "{}", routes(1));
}

/// host-gw among stock flannel host-gw nodes (set up by hand as flannel's host-gw sets itself
/// up: its lease, a route to each peer's subnet via the peer's address): traffic both ways
/// with both decap hooks' nodes, on rp_filter=1 nodes behind docker's FORWARD DROP; the
/// stock node's departure takes its route away.
#[test]
fn host_gw_nodes_interoperate_with_a_stock_host_gw_node() {
    let config = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "tc" }, NodeKind::Agent { decap_hook: "xdp" }, NodeKind::PlainRouting],
        control: Control::Etcd { tls: false, config: config.into() },
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 3)
    };
    let c = cluster("hs", &spec);
    let stock = c.node(3);
    for n in [c.node(1), c.node(2)] {
        ok("stock route", c.add_route(stock, n));
        ok("policy", n.ns.run("iptables", &["-w", "-P", "FORWARD", "DROP"]));
    }
    let routes = |i: usize| c.node(i).ns.run("ip", &["route", "show", "proto", "97"]).unwrap_or_default();
    for i in [1, 2] {
        let want = format!("{} via {} dev eth0", stock.subnet, stock.underlay_ip);
        assert!(wait_until(PROPAGATION_BOUND, || routes(i).contains(&want)), "node {i}: {}", routes(i));
    }
    for n in [c.node(1), c.node(2)] {
        ok("ours -> stock", ping(&n.containers[0], stock.container_ip(0), 2));
        ok("stock -> ours", ping(&stock.containers[1], n.container_ip(1), 2));
        ok("TCP ours -> stock", tcp_transfer(&n.containers[1], &stock.containers[0], stock.container_ip(0), 4 << 20));
        ok("TCP stock -> ours", tcp_transfer(&stock.containers[0], &n.containers[0], n.container_ip(0), 4 << 20));
    }
    let key = format!("/coreos.com/network/subnets/{}-24", stock.subnet.network());
    ok("del", c.etcd().etcdctl(&["del", &key]));
    for i in [1, 2] {
        assert!(wait_until(PROPAGATION_BOUND, || !routes(i).contains(&stock.subnet.to_string())), "node {i}: {}", routes(i));
    }
}

/// vxlan with DirectRouting beside a stock flannel vxlan node with DirectRouting (set up by
/// hand: flannel.1 and its lease, and, the peer being on its link, a plain route to our
/// subnet via our address instead of the tunnel): both sides route each other directly, the
/// traffic passes both ways unencapsulated (our encap and decap counters stay still), on
/// rp_filter=1 nodes.
#[test]
fn direct_routing_interoperates_with_a_stock_direct_routing_node() {
    use overlay_common::Counter;
    let config = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "tc" }, NodeKind::StockFlannel],
        control: Control::Etcd { tls: false, config: config.into() },
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 2)
    };
    let c = cluster("dx", &spec);
    let (n1, stock) = (c.node(1), c.node(2));
    // flannel's DirectRouting on the stock node: our node is on its link.
    ok("stock direct route", stock.ns.run("ip", &["route", "replace", &n1.subnet.to_string(), "via", &n1.underlay_ip.to_string(), "dev", "eth0"]));
    let direct = || n1.ns.run("ip", &["route", "show", "proto", "97"]).unwrap_or_default();
    let want = format!("{} via {} dev eth0", stock.subnet, stock.underlay_ip);
    assert!(wait_until(PROPAGATION_BOUND, || direct().contains(&want)), "{}
{}", direct(), n1.log_text());
    let (enc, dec) = (n1.counter(Counter::Encapsulated), n1.counter(Counter::Decapsulated));
    ok("ours -> stock", ping(&n1.containers[0], stock.container_ip(0), 2));
    ok("stock -> ours", ping(&stock.containers[1], n1.container_ip(1), 2));
    ok("TCP ours -> stock", tcp_transfer(&n1.containers[1], &stock.containers[0], stock.container_ip(0), 4 << 20));
    ok("TCP stock -> ours", tcp_transfer(&stock.containers[0], &n1.containers[0], n1.container_ip(0), 4 << 20));
    assert_eq!((n1.counter(Counter::Encapsulated), n1.counter(Counter::Decapsulated)), (enc, dec), "direct traffic must not be encapsulated");
    assert!(n1.routes().iter().any(|r| r.subnet == stock.subnet), "the tunnel route stays, for when the link changes");
}

/// Errors that no retry can fix stop the agent at once (a non-zero exit that systemd shows),
/// naming what to change, instead of "cannot reach etcd; retrying" forever: a wrong password,
/// none where etcd wants one, a user without permission on flannel's prefix, TLS flags with a
/// plain-HTTP endpoint. A stopped etcd, which retrying does fix, is retried.
#[test]
fn errors_that_retrying_cannot_fix_stop_the_agent_with_what_to_fix() {
    let mut c = cluster("ef", &ClusterSpec { nodes: vec![], ..ClusterSpec::etcd(Backend::Vxlan, "tc", 0) });
    enable_auth(c.etcd_mut());
    ok("user", c.etcd().etcdctl(&["user", "add", "nobody:pw"]));
    let password = |p: &str| vec![("FLANNELD_ETCD_PASSWORD".to_string(), p.to_string())];
    let cases: [(&str, Vec<String>, Vec<(String, String)>, &str); 4] = [
        ("wrong password", vec!["--etcd-username=flannel".into()], password("wrong"), "check --etcd-username and --etcd-password"),
        ("no credentials", vec![], vec![], "give --etcd-username and --etcd-password"),
        ("no permission", vec!["--etcd-username=nobody".into()], password("pw"), "grant-permission --prefix=true"),
        ("TLS flags, http endpoint", vec!["--etcd-cafile=/etc/hostname".into()], vec![], "write it https://"),
    ];
    for (what, args, env, hint) in cases {
        c.set_agent_args(args, env);
        let i = ok("spawn", c.spawn_unready());
        assert!(
            wait_until(Duration::from_secs(20), || c.node_mut(i).agent_exit().is_some()),
            "{what}: the agent kept running:\n{}",
            c.node(i).log_text()
        );
        let status = c.node_mut(i).agent_exit().unwrap();
        let log = c.node(i).log_text();
        assert!(!status.success(), "{what}: exit {status:?}");
        assert!(log.contains(hint), "{what}: expected {hint:?} in the log:\n{log}");
        assert!(!log.contains("retrying"), "{what}: retried an error retrying cannot fix:\n{log}");
    }
    // A stopped etcd is worth waiting for: the agent retries (and says so) rather than exit.
    c.set_agent_args(vec!["--etcd-username=flannel".into()], password("s3cret-pw"));
    ok("stop", c.etcd_mut().stop());
    let i = ok("spawn", c.spawn_unready());
    assert!(
        wait_until(Duration::from_secs(20), || c.node(i).log_text().contains("retrying")),
        "{}",
        c.node(i).log_text()
    );
    assert!(c.node_mut(i).agent_exit().is_none(), "an unreachable etcd must be retried:\n{}", c.node(i).log_text());
    ok("restart", c.etcd_mut().restart());
    assert!(wait_until(Duration::from_secs(30), || c.node(i).subnet_file.exists()), "{}", c.node(i).log_text());
}

/// Without a network config the agent waits, says so, and starts as soon as one appears; an
/// invalid one stops it with the field named.
#[test]
fn missing_config_is_waited_for_and_invalid_config_is_refused() {
    let spec = ClusterSpec {
        control: Control::Etcd { tls: false, config: String::new() },
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 0)
    };
    let mut c = cluster("mc", &spec);
    let i = ok("spawn", c.spawn_unready());
    assert!(
        wait_until(Duration::from_secs(10), || c.node(i).log_text().contains("no network config yet")),
        "{}",
        c.node(i).log_text()
    );
    // It keeps asking (every second) rather than giving up.
    let reads = ok("etcd metrics", c.etcd().reads_served());
    assert!(
        wait_until(Duration::from_secs(20), || c.etcd().reads_served().is_ok_and(|r| r >= reads + 3)),
        "the agent stopped asking etcd for the config:\n{}",
        c.node(i).log_text()
    );
    assert!(c.node_mut(i).agent_exit().is_none(), "the agent must keep waiting");
    assert!(!c.node(i).subnet_file.exists());
    ok("put", c.etcd().etcdctl(&["put", "/coreos.com/network/config", &overlay_tests::network_config(Backend::Vxlan)]));
    assert!(
        wait_until(Duration::from_secs(10), || c.node(i).subnet_file.exists()),
        "the agent did not start after the config appeared:\n{}",
        c.node(i).log_text()
    );

    // A second agent against an invalid config exits with the field named.
    ok("put", c.etcd().etcdctl(&["put", "/coreos.com/network/config", r#"{"Network":"10.244.0.0/16","Backend":{"Type":"gre"}}"#]));
    let j = ok("spawn", c.spawn_unready());
    assert!(wait_until(Duration::from_secs(10), || c.node_mut(j).agent_exit().is_some()), "an invalid config must stop the agent");
    let status = c.node_mut(j).agent_exit().unwrap();
    assert!(!status.success());
    assert!(c.node(j).log_text().contains("Backend.Type: \"gre\" is not supported"), "{}", c.node(j).log_text());

    // A wireguard config whose PSK is no wireguard key: refused at start, the field and the
    // way to make one named, the key's text never in the log. (Checked before the kernel's
    // wireguard module is asked for: this kernel has none, and the refusal names the PSK.)
    let bad_psk = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PSK":"c2hvcnQ="}}"#;
    ok("put", c.etcd().etcdctl(&["put", "/coreos.com/network/config", bad_psk]));
    let k = ok("spawn", c.spawn_unready());
    assert!(wait_until(Duration::from_secs(10), || c.node_mut(k).agent_exit().is_some()), "a bad PSK must stop the agent");
    assert!(!c.node_mut(k).agent_exit().unwrap().success());
    let log = c.node(k).log_text();
    assert!(log.contains("Backend.PSK") && log.contains("wg genpsk"), "{log}");
    assert!(!log.contains("c2hvcnQ="), "the key's text stays out of the log:\n{log}");
    assert!(!log.contains("wireguard module"), "the config is refused before the kernel is asked:\n{log}");
}

/// `Backend.MTU` is the underlay's MTU, as flannel reads it: `{"MTU":1500}` on a 1500-byte
/// underlay gives flannel.1 and FLANNEL_MTU 1450 (it used to be taken as the overlay's and
/// stop the agent), full-sized DF packets cross; a smaller value gives the overlay that
/// less 50, as a stock node next to it gets, after a restart too.
#[test]
fn backend_mtu_is_the_underlay_mtu_as_flannel_reads_it() {
    let mut spec = ClusterSpec::etcd(Backend::Vxlan, "tc", 2);
    spec.control = Control::Etcd { tls: false, config: r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":1500}}"#.into() };
    let mut c = cluster("bm", &spec);
    let flannel_mtu = |n: &overlay_tests::Node| {
        let text = std::fs::read_to_string(&n.subnet_file).expect("subnet file");
        text.lines().find_map(|l| l.strip_prefix("FLANNEL_MTU=")).map(str::to_string)
    };
    for n in &c.nodes {
        assert_eq!(ok("mtu", overlay_tests::link_mtu(&n.ns, "flannel.1")), 1450, "node {}", n.index);
        assert_eq!(flannel_mtu(n).as_deref(), Some("1450"), "node {}", n.index);
    }
    // A full-sized packet (1450 bytes, DF) crosses between containers.
    let dst = c.node(2).container_ip(0).to_string();
    ok("full-sized DF ping", c.node(1).containers[0].run("ping", &["-c", "2", "-W", "2", "-M", "do", "-s", "1422", &dst]));

    let config = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":1400}}"#;
    ok("config", c.etcd().etcdctl(&["put", "/coreos.com/network/config", config]));
    ok("restart", c.restart_agent(1));
    let n1 = c.node(1);
    assert_eq!(ok("mtu", overlay_tests::link_mtu(&n1.ns, "flannel.1")), 1350, "{}", n1.log_text());
    assert_eq!(flannel_mtu(n1).as_deref(), Some("1350"));
    ok("ping", ping(&n1.containers[0], c.node(2).container_ip(1), 2));
}

/// Nodes behind 1:1 NAT, flannel's documented `--public-ip` case, as flannel v0.11 to v0.27
/// run them: the tunnel ends at the interface's (private) address, the lease names the
/// public one. Node 1 (TC) and node 2 (XDP) sit behind one router; node 3 does not. Node 1
/// gives `--public-ip` alone (no interface has it: the default route's is used, with a
/// warning). Traffic crosses the NAT both ways, and between the two NATed nodes through the
/// router's hairpin, whose SNAT makes the outer source the sender's lease PublicIP (the one
/// source the peer check accepts).
#[test]
fn nodes_behind_one_to_one_nat_carry_traffic_both_ways() {
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "tc" }, NodeKind::Agent { decap_hook: "xdp" }, NodeKind::Agent { decap_hook: "tc" }],
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 3)
    };
    let mut c = cluster("nt", &spec);
    let publics = [(1usize, Ipv4Addr::new(192, 168, 100, 51)), (2, Ipv4Addr::new(192, 168, 100, 52))];
    for (i, _) in publics {
        ok("stop", c.stop_agent(i));
        // Its lease named its old address; the restarted agent claims its subnet again.
        let key = format!("/coreos.com/network/subnets/{}-24", c.node(i).subnet.network());
        ok("del lease", c.etcd().etcdctl(&["del", &key]));
    }
    let router = ok("nat", c.put_behind_nat(&publics));
    for (i, public) in publics {
        let arg = format!("--public-ip={public}");
        // Node 1: --public-ip alone; node 2 also names its interface.
        let args = if i == 1 { vec![arg] } else { vec![arg, "--iface=eth0".into()] };
        c.set_agent_args(args, Vec::new());
        ok("restart behind NAT", c.restart_agent_with_current_args(i));
    }
    c.set_agent_args(Vec::new(), Vec::new());
    assert!(
        c.node(1).log_text().contains("no interface has the --public-ip address"),
        "--public-ip on no interface is warned about:\n{}",
        c.node(1).log_text()
    );
    for (i, public) in publics {
        let lease = ok("lease", c.node(3).agent_cli(&["lease", &c.node(i).subnet.to_string(), &c.etcd().agent_flags()[0]]));
        assert!(lease.contains(&format!("\"PublicIP\":\"{public}\"")), "node {i}'s lease names its public address:\n{lease}");
        let dev = ok("ip", c.node(i).ns.run("ip", &["-d", "link", "show", "flannel.1"]));
        assert!(dev.contains(&format!("local 10.99.0.{i} ")), "node {i}'s tunnel ends at its interface's address:\n{dev}");
    }
    assert!(wait_until(PROPAGATION_BOUND * 4, || converged(&c)), "routes did not converge after the move behind NAT");
    for (a, b) in [(1, 3), (3, 1), (2, 3), (3, 2), (1, 2), (2, 1)] {
        ok(&format!("ping {a} -> {b}"), ping(&c.node(a).containers[0], c.node(b).container_ip(1), 2));
        ok(&format!("TCP {a} -> {b}"), tcp_transfer(&c.node(a).containers[1], &c.node(b).containers[0], c.node(b).container_ip(0), 4 << 20));
    }
    // The checks saw the NATed peers by their public addresses.
    for (i, public) in publics {
        assert!(c.node(3).peer_totals(public).rx_packets > 0, "node 3 took nothing from node {i} at {public}");
    }
    assert!(c.node(1).peer_totals(publics[1].1).rx_packets > 0, "node 1 took nothing from node 2 through the hairpin");
    drop(router);
}

/// Degrade, don't refuse: where the eBPF data plane cannot run (forced here), the node runs
/// as a stock flannel vxlan node on its kernel device with flannel's per-peer entries, says
/// so once in its log, in `status` and in /metrics, leaves no program attached, and carries
/// traffic with our other node and a stock one, both ways. Started again where eBPF runs,
/// it is a full node again and the degraded run's routes go.
#[test]
fn a_node_without_ebpf_runs_as_a_stock_flannel_node() {
    let spec = ClusterSpec {
        nodes: vec![NodeKind::Agent { decap_hook: "tc" }, NodeKind::Agent { decap_hook: "tc" }, NodeKind::StockFlannel],
        full_mesh: false,
        ..ClusterSpec::etcd(Backend::Vxlan, "tc", 3)
    };
    let mut c = cluster("dg", &spec);
    c.set_agent_args(vec!["--ebpf-unavailable".into(), "--healthz-port=9911".into()], Vec::new());
    ok("restart without eBPF", c.restart_agent_with_current_args(1));
    c.set_agent_args(Vec::new(), Vec::new());
    let n1 = c.node(1);
    let log = n1.log_text();
    assert_eq!(log.matches("the eBPF data plane cannot run on this node").count(), 1, "said once:\n{log}");
    assert!(log.contains("forced with --ebpf-unavailable") && log.contains("no checks of arriving tunnel frames"), "{log}");
    let status = ok("status", n1.agent_cli(&["status"]));
    assert!(status.contains("encap=kernel decap=kernel") && status.contains("degraded=\"forced with --ebpf-unavailable\""), "{status}");
    let (code, metrics) = ok("metrics", overlay_tests::traffic::http_get(&n1.ns, std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9911), "/metrics"));
    assert_eq!(code, 200);
    assert!(metrics.contains("overlay_degraded{reason=\"forced with --ebpf-unavailable\"} 1"), "{metrics}");
    assert!(!n1.bpffs_dir.join("link_encap").exists() && !n1.bpffs_dir.join("link_decap_tc").exists() && !n1.bpffs_dir.join("link_guard").exists(), "programs left attached");
    let stock = c.node(3);
    for ours in [c.node(1), c.node(2)] {
        ok("stock route", c.add_route(stock, ours));
    }
    assert!(wait_until(PROPAGATION_BOUND, || ok("routes", n1.ns.run("ip", &["route", "show", "dev", "flannel.1"])).lines().count() >= 2), "node 1's per-peer routes");
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1)] {
        ok(&format!("ping {a} -> {b}"), ping(&c.node(a).containers[0], c.node(b).container_ip(1), 2));
        ok(&format!("TCP {a} -> {b}"), tcp_transfer(&c.node(a).containers[1], &c.node(b).containers[0], c.node(b).container_ip(0), 4 << 20));
    }
    let routes = ok("routes", n1.ns.run("ip", &["route", "show", "dev", "flannel.1"]));
    for peer in [c.node(2), c.node(3)] {
        assert!(routes.contains(&format!("{} via {} ", peer.subnet, peer.subnet.network())), "flannel's route to node {}:\n{routes}", peer.index);
    }
    // teardown has no maps to read the device from: the marker names it.
    ok("stop degraded", c.stop_agent(1));
    let n1 = c.node(1);
    ok("teardown degraded", n1.agent_cli(&["teardown"]));
    assert!(n1.ns.run("ip", &["link", "show", "flannel.1"]).is_err(), "teardown left a degraded run's device");
    let status = n1.agent_cli(&["status"]).unwrap_or_else(|e| e.to_string());
    assert!(!status.contains("degraded"), "the marker outlived teardown: {status}");
    // eBPF again: a full node, the kernel-device routes gone.
    c.set_agent_args(vec!["--ebpf-unavailable".into()], Vec::new());
    ok("degraded again", c.restart_agent_with_current_args(1));
    c.set_agent_args(Vec::new(), Vec::new());
    // The device made again has a new MAC: the stock node's hand-made entries follow it.
    c.node_mut(1).vtep_mac = ok("MAC", overlay_tests::link_mac(&c.node(1).ns, "flannel.1"));
    ok("stock route again", c.add_route(c.node(3), c.node(1)));
    assert!(wait_until(PROPAGATION_BOUND, || ok("routes", c.node(1).ns.run("ip", &["route", "show", "dev", "flannel.1"])).lines().count() >= 2), "node 1's per-peer routes again");
    ok("restart with eBPF", c.restart_agent_with_current_args(1));
    let n1 = c.node(1);
    let status = ok("status", n1.agent_cli(&["status"]));
    assert!(status.contains("attach=tcx") && status.contains("guard=sk_lookup") && !status.contains("degraded"), "{status}");
    let routes = ok("routes", n1.ns.run("ip", &["route", "show", "dev", "flannel.1"]));
    assert!(!routes.contains(&format!("via {}", c.node(2).subnet.network())), "a degraded run's route left:\n{routes}");
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1)] {
        ok(&format!("ping {a} -> {b} after"), ping(&c.node(a).containers[0], c.node(b).container_ip(0), 2));
    }
}

/// Rolling a node back to flanneld: with its agent stopped, `teardown --leave-kernel-state`
/// leaves what a flanneld started next adopts (the vxlan device and its address, flannel's
/// neighbour, forwarding and per-peer route entries, flannel's chains) and removes what is
/// ours (programs, pins, our network route). A ping stream of 100/s from a container on the
/// other node loses nothing across the switch, and the kernel device carries the traffic
/// afterwards, both ways.
#[test]
fn a_rollback_to_flanneld_leaves_its_kernel_state_and_loses_nothing() {
    use overlay_common::Counter;
    let mut c = cluster("rb", &ClusterSpec { agent_args: vec!["--ip-masq".into()], ..ClusterSpec::etcd(Backend::Vxlan, "tc", 2) });
    assert!(wait_until(PROPAGATION_BOUND, || converged(&c)));
    let (n1, n2) = (c.node(1), c.node(2));
    let (n2_subnet, n2_gw, n2_mac, n2_ip) = (n2.subnet.to_string(), n2.subnet.network().to_string(), overlay_agent::netdev::format_mac(&n2.vtep_mac), n2.underlay_ip.to_string());
    let dst = n1.container_ip(0).to_string();
    let tx_packets = |c: &Cluster| -> u64 {
        let out = c.node(1).ns.run("cat", &["/proc/net/dev"]).unwrap_or_default();
        out.lines().find(|l| l.trim_start().starts_with("flannel.1:")).and_then(|l| l.split_whitespace().nth(10)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let kernel_tx_before = tx_packets(&c);
    let encapsulated = n1.counter(Counter::Encapsulated);
    let stream = c.node(2).containers[0]
        .command("ping")
        .args(["-n", "-q", "-i", "0.01", "-c", "400", "-W", "1", &dst])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    // The switch happens while the stream flows: once node 1's program has answered some.
    assert!(wait_until(Duration::from_secs(10), || c.node(1).counter(Counter::Encapsulated) >= encapsulated + 20), "the stream did not start");
    ok("stop", c.stop_agent(1));
    ok("rollback", c.node(1).agent_cli(&["teardown", "--leave-kernel-state"]));
    let out = stream.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("400 packets transmitted, 400 received"), "packets were lost across the rollback:\n{text}");

    let (n1, n2) = (c.node(1), c.node(2));
    assert!(!n1.bpffs_dir.exists(), "pins left");
    let routes = ok("routes", n1.ns.run("ip", &["route", "show", "dev", "flannel.1"]));
    assert!(routes.contains(&format!("{n2_subnet} via {n2_gw} onlink")) && !routes.contains("169.254.1.1"), "{routes}");
    let neigh = ok("neigh", n1.ns.run("ip", &["neigh", "show", "dev", "flannel.1"]));
    assert!(neigh.contains(&format!("{n2_gw} lladdr {n2_mac} PERMANENT")), "{neigh}");
    let fdb = ok("fdb", n1.ns.run("bridge", &["fdb", "show", "dev", "flannel.1"]));
    assert!(fdb.contains(&format!("{n2_mac} dst {n2_ip}")), "{fdb}");
    let addr = ok("addr", n1.ns.run("ip", &["-4", "addr", "show", "dev", "flannel.1"]));
    assert!(addr.contains(&format!("inet {}/32", n1.subnet.network())), "{addr}");
    assert!(ok("chains", n1.ns.run("iptables", &["-w", "-t", "nat", "-S", "FLANNEL-POSTRTG"])).contains("MASQUERADE"), "flannel's chains stay");
    // The kernel device encapsulates now, both ways.
    ok("ping 1 -> 2", ping(&n1.containers[0], n2.container_ip(0), 3));
    ok("ping 2 -> 1", ping(&n2.containers[0], n1.container_ip(0), 3));
    assert!(tx_packets(&c) > kernel_tx_before + 3, "flannel.1's own transmit path did not carry the traffic");
}

/// Replacing a running flanneld in place: node 1 is set up exactly as flanneld leaves it (its
/// lease in etcd, flannel.1 with its address, per-peer neighbour, forwarding and route entries
/// to node 2), node 2 runs the agent. The agent started on node 1 keeps its subnet and takes
/// over flannel.1, and a UDP stream of 1,000 datagrams/s from node 2's container to node 1's
/// loses nothing across the switch.
#[test]
fn taking_over_a_flanneld_node_loses_nothing() {
    let spec = ClusterSpec { nodes: vec![NodeKind::StockFlannel, NodeKind::Agent { decap_hook: "tc" }], ..ClusterSpec::etcd(Backend::Vxlan, "tc", 2) };
    let mut c = cluster("to", &spec);
    ok("flanneld's routes on node 1", c.add_route(c.node(1), c.node(2)));
    let subnet = c.node(1).subnet;
    assert!(wait_until(PROPAGATION_BOUND, || c.node(2).routes().iter().any(|r| r.subnet == subnet)), "node 2 never learnt node 1's lease");
    let stream = ok(
        "stream",
        overlay_tests::traffic::UdpStream::start(&c.node(2).containers[0], &c.node(1).containers[0], c.node(1).container_ip(0), 7004, 1000),
    );
    assert!(wait_until(Duration::from_secs(10), || stream.received_so_far() >= 500), "the stream did not start");
    ok("take over", c.take_over_stock_node(1));
    let n1 = c.node(1);
    let status = ok("status", n1.agent_cli(&["status"]));
    assert!(status.contains("encap=attached") && status.contains("ready=true"), "{status}");
    assert_eq!(n1.routes().len(), 1, "{}", n1.log_text());
    assert!(n1.log_text().contains(&subnet.to_string()), "node 1 did not keep its subnet:\n{}", n1.log_text());
    let got = stream.received_so_far();
    assert!(wait_until(Duration::from_secs(10), || stream.received_so_far() >= got + 1000), "the stream stalled after the takeover");
    let r = ok("stream", stream.finish());
    assert_eq!(r.lost, 0, "datagrams lost across the takeover: {r:?}\n{}", c.node(1).log_text());
    ok("ping back", ping(&c.node(1).containers[0], c.node(2).container_ip(0), 2));
}
