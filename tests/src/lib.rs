//! Clusters of network namespaces for the integration tests, the demo and the benchmarks.
//!
//! A cluster is an underlay namespace holding a bridge, N node namespaces joined to it by
//! veth (each node's `eth0`, 192.168.100.<n>/24), and in each node a docker0-like bridge
//! (10.244.<n>.1/24) with container namespaces behind veths. Every name carries a prefix
//! unique to the process and cluster, so tests run in parallel; every address lives only
//! inside these namespaces. Dropping the cluster kills the agents it started (by pid),
//! removes its bpffs directories and deletes its namespaces, also when a test panics.

pub mod bpf;
pub mod capture;
pub mod docker;
pub mod etcd;
pub mod netns;
pub mod podman;
pub mod traffic;

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
pub use etcd::Etcd;
use ipnet::{Ipv4Net, Ipv6Net};
pub use netns::Netns;
use overlay_agent::maps::{Maps, PeerTotals};
use overlay_common::Counter;

/// The overlay network every cluster uses.
pub const NETWORK: &str = "10.244.0.0/16";
/// The IPv6 network of dual-stack and IPv6-only clusters (stock nodes' subnets are in it).
pub const NETWORK6: &str = "fd00:10:244::/56";
/// Where a cluster's etcd serves clients (on the underlay bridge, inside the underlay
/// namespace).
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 254);
/// etcd's address in an IPv6-only cluster (on the underlay's bridge).
pub const ETCD_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, 0xfe);

/// flannel's config for NETWORK with `backend`, as the seed writes it (wireguard's with a
/// preshared key and a keepalive, which stock nodes set up by hand are given too).
pub fn network_config(backend: Backend) -> String {
    match backend {
        Backend::Wireguard => format!(
            r#"{{"Network":"{NETWORK}","Backend":{{"Type":"wireguard","PSK":"{WIREGUARD_PSK}","PersistentKeepaliveInterval":{WIREGUARD_KEEPALIVE}}}}}"#
        ),
        _ => format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"{}"}}}}"#, backend.flag()),
    }
}

/// The wireguard clusters' preshared key (`wg genpsk`) and keepalive.
pub const WIREGUARD_PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";
pub const WIREGUARD_KEEPALIVE: u16 = 25;
pub const UNDERLAY_MTU: u32 = 1500;

/// Fail loudly (never skip) when the tests cannot run here.
pub fn require_root() {
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "these tests create network namespaces and load eBPF: run them as root (cargo xtask test)");
    assert!(
        Path::new("/sys/fs/bpf").exists() && is_mountpoint("/sys/fs/bpf"),
        "bpffs is not mounted at /sys/fs/bpf: run `cargo xtask setup`"
    );
}

fn is_mountpoint(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(4) == Some(path)))
        .unwrap_or(false)
}

/// The agent binary: $OVERLAY_AGENT_BIN, else the workspace's debug build.
pub fn agent_bin() -> PathBuf {
    let p = std::env::var_os("OVERLAY_AGENT_BIN").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/overlay-agent")
    });
    assert!(
        p.exists(),
        "agent binary {} not found: build it (cargo xtask test does) or set OVERLAY_AGENT_BIN",
        p.display()
    );
    p
}

/// Run a command, failing with its output if it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Vxlan,
    Udp,
    /// flannel's ipip (etcd mode only: the kernel's flannel.ipip; needs the ipip module).
    Ipip,
    /// flannel's wireguard (etcd mode only: the kernel's flannel-wg; needs the module).
    Wireguard,
}

impl Backend {
    pub fn flag(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::Udp => "udp",
            Backend::Ipip => "ipip",
            Backend::Wireguard => "wireguard",
        }
    }
    pub fn port(self) -> u16 {
        match self {
            Backend::Vxlan => 8472,
            Backend::Udp => 8285,
            Backend::Ipip => 0,
            Backend::Wireguard => 51820,
        }
    }
    pub fn device(self) -> &'static str {
        match self {
            Backend::Vxlan => "flannel.1",
            Backend::Udp => "flannel0",
            Backend::Ipip => "flannel.ipip",
            Backend::Wireguard => "flannel-wg",
        }
    }
    pub fn overhead(self) -> u32 {
        match self {
            Backend::Vxlan => 50,
            Backend::Udp => 28,
            Backend::Ipip => 20,
            Backend::Wireguard => 80,
        }
    }
}

/// How a node forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// Our agent, with decapsulation on this hook (`tc` or `xdp`).
    Agent { decap_hook: &'static str },
    /// Set up as flannel's vxlan backend sets a node up: kernel vxlan device, static ARP,
    /// FDB and route entries. No agent.
    StockFlannel,
    /// Our agent with `--dataplane tun` (etcd clusters with the udp backend).
    TunAgent,
    /// No overlay: nodes route each other's subnets via their underlay addresses (the
    /// benchmark's ceiling).
    PlainRouting,
}

#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub backend: Backend,
    pub nodes: Vec<NodeKind>,
    pub containers_per_node: usize,
    /// Fill every agent's routes to every other node (else the test does it).
    pub full_mesh: bool,
    /// Put each node in its own underlay subnet behind a router (the underlay namespace)
    /// instead of one shared L2 segment.
    pub routed_underlay: bool,
    /// Frames between nodes are MTU-sized, as on a physical link: segmentation offloads are
    /// off on the underlay's ports (the bridge segments in software what a node sends as one
    /// GSO frame) and GRO is on at each node's eth0 (merging again where nodes receive).
    /// Otherwise veth passes GSO frames through whole.
    pub wire_underlay: bool,
    /// Nodes' `net.ipv4.conf.{all,default}.rp_filter`: 1 (strict, the seed's RHEL/CentOS
    /// default and ours) or 2 (loose).
    pub rp_filter: u8,
    pub control: Control,
    /// Extra agent flags (etcd mode), e.g. a short lease TTL.
    pub agent_args: Vec<String>,
    /// After an agent is ready, run the seed's ExecStartPost step
    /// (`mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d <subnet file>`) and build the node's
    /// bridge and containers from DOCKER_NETWORK_OPTIONS (--bip, --mtu) instead of subnet.env.
    pub docker_opts_step: bool,
    /// Extra etcd flags (e.g. `--auth-token-ttl 2`).
    pub etcd_args: Vec<String>,
    /// Also give node i the underlay address fd00:64::<i>/64 (and IPv6 forwarding): a
    /// dual-stack underlay.
    pub ipv6_underlay: bool,
    /// An IPv6-only network (`EnableIPv4: false` in the config): nodes' underlay has only
    /// fd00:64::<i>/64 (no IPv4 address), etcd is reached at `ETCD_IPV6`, node subnets are
    /// IPv6 (`Node::subnet6`, from FLANNEL_IPV6_SUBNET; stock nodes get fd00:10:244:<100+i>::/64
    /// and flannel-v6.1), and containers get IPv6 addresses only.
    pub ipv6_only: bool,
    /// The agents' environment (beyond RUST_LOG), e.g. a PATH without some tool.
    pub agent_env: Vec<(String, String)>,
}

/// Where nodes get their subnets and routes.
#[derive(Clone, Debug)]
pub enum Control {
    /// Subnets 10.244.<n>.0/24 given on the command line; routes by `route add`.
    Static,
    /// A real etcd holding `config` (network config JSON); agents lease subnets and watch.
    Etcd { tls: bool, config: String },
}

impl ClusterSpec {
    /// Agents driven by a real etcd with the seed's kind of config.
    pub fn etcd(backend: Backend, decap_hook: &'static str, n: usize) -> Self {
        Self {
            full_mesh: false,
            control: Control::Etcd { tls: false, config: network_config(backend) },
            ..Self::agents(backend, decap_hook, n)
        }
    }
}

impl ClusterSpec {
    pub fn agents(backend: Backend, decap_hook: &'static str, n: usize) -> Self {
        Self {
            backend,
            nodes: vec![NodeKind::Agent { decap_hook }; n],
            containers_per_node: 2,
            full_mesh: true,
            routed_underlay: false,
            wire_underlay: false,
            rp_filter: 1,
            control: Control::Static,
            agent_args: Vec::new(),
            docker_opts_step: false,
            etcd_args: Vec::new(),
            ipv6_underlay: false,
            ipv6_only: false,
            agent_env: Vec::new(),
        }
    }
}

pub struct Node {
    /// 1-based.
    pub index: usize,
    pub kind: NodeKind,
    pub ns: Netns,
    pub containers: Vec<Netns>,
    pub underlay_ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// The node's IPv6 subnet in an IPv6-only cluster.
    pub subnet6: Option<Ipv6Net>,
    pub bpffs_dir: PathBuf,
    /// The MAC of its overlay device (flannel-v6.1 in an IPv6-only cluster).
    pub vtep_mac: [u8; 6],
    agent: Option<Child>,
    pub log: PathBuf,
    /// The agent's --subnet-file.
    pub subnet_file: PathBuf,
    /// The command line the agent was started with (for restarts).
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    /// FLANNEL_MTU as the agent wrote it (the containers' MTU).
    pub mtu: u32,
    /// The agent binary, when not `agent_bin()` (an upgrade).
    bin: Option<PathBuf>,
    /// The NOTIFY_SOCKET the agent reports to (etcd mode), and what it said so far.
    notify: Option<std::os::unix::net::UnixDatagram>,
    pub notifications: Vec<String>,
}

impl Node {
    /// The IPv6 address of container `k` (0-based) in an IPv6-only cluster.
    pub fn container_ip6(&self, k: usize) -> Ipv6Addr {
        let s6 = self.subnet6.expect("an IPv6-only cluster's node");
        Ipv6Addr::from(u128::from(s6.network()) + 2 + k as u128)
    }

    /// The address of container `k` (0-based).
    pub fn container_ip(&self, k: usize) -> Ipv4Addr {
        let o = self.subnet.network().octets();
        Ipv4Addr::new(o[0], o[1], o[2], 2 + k as u8)
    }
    /// The data plane's counters (summed over CPUs), read from the pinned maps.
    pub fn counters(&self) -> [u64; Counter::COUNT] {
        Maps::open(&self.bpffs_dir).and_then(|m| m.counters()).unwrap_or_else(|e| {
            panic!("reading counters of node {}: {e}", self.index)
        })
    }
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters()[c as usize]
    }
    pub fn peer_totals(&self, peer: Ipv4Addr) -> PeerTotals {
        let all = Maps::open(&self.bpffs_dir)
            .and_then(|m| m.peer_totals())
            .unwrap_or_else(|e| panic!("reading peers of node {}: {e}", self.index));
        all.get(&peer).copied().unwrap_or_default()
    }
    /// What the socket guard's firewall form dropped on this node: its nftables rules'
    /// counters (table overlay-guard, both families) and its iptables chains' (OVERLAY-GUARD).
    pub fn firewall_guard_drops(&self) -> u64 {
        let mut total = 0;
        for family in ["ip", "ip6"] {
            if let Ok(t) = self.ns.run("nft", &["list", "table", family, "overlay-guard"]) {
                let words: Vec<&str> = t.split_whitespace().collect();
                total += words.windows(2).filter(|w| w[0] == "packets").filter_map(|w| w[1].parse::<u64>().ok()).sum::<u64>();
            }
        }
        for cmd in ["iptables", "ip6tables"] {
            let out = self.ns.run(cmd, &["-w", "-t", "filter", "-L", "OVERLAY-GUARD", "-v", "-x", "-n"]).unwrap_or_default();
            total += out.lines().skip(2).filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok()).sum::<u64>();
        }
        total
    }

    /// Run the agent CLI inside this node.
    pub fn agent_cli(&self, args: &[&str]) -> Result<String> {
        let bin = agent_bin();
        let mut cmd = self.ns.command(bin.to_str().expect("utf-8 path"));
        cmd.args(args).arg("--bpffs-dir").arg(&self.bpffs_dir);
        run(&mut cmd)
    }
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Start the agent with `args` and wait (bounded) until it is ready: with etcd, until it
    /// sends READY=1 on the NOTIFY_SOCKET this harness gives it (as systemd would); without,
    /// until this agent has logged that its data plane is up and `overlay-agent status` agrees
    /// (pins a previous agent left would satisfy `status` alone before this one has loaded).
    fn spawn_agent(&mut self, args: &[String], etcd: bool) -> Result<()> {
        let ready_before = self.notifications.iter().filter(|m| m.contains("READY=1")).count();
        let up_logged = |n: &Self| n.log_text().matches("data plane up (static mode)").count();
        let up_before = up_logged(self);
        self.start_agent_process(args, etcd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = if etcd {
                self.read_notifications();
                self.notifications.iter().filter(|m| m.contains("READY=1")).count() > ready_before
            } else {
                up_logged(self) > up_before && self.agent_cli(&["status"]).is_ok()
            };
            if ready {
                return Ok(());
            }
            if let Some(status) = self.agent.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("agent on node {} exited ({status}) before it was ready:\n{}", self.index, self.log_text());
            }
            if Instant::now() > deadline {
                bail!("agent on node {} not ready within 30 s:\n{}", self.index, self.log_text());
            }
            if !etcd {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Start the agent process with `args` (log appended to `self.log`; with `notify`, a
    /// NOTIFY_SOCKET of ours), without waiting for anything.
    fn start_agent_process(&mut self, args: &[String], notify: bool) -> Result<()> {
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let bin = self.bin.clone().unwrap_or_else(agent_bin);
        let mut cmd = self.ns.command(bin.to_str().expect("utf-8 path"));
        // Each node its own wireguard key file (they share this machine's /run).
        cmd.args(args).env("WIREGUARD_KEY_FILE", self.log.with_extension("wgkey")).envs(self.agent_env.iter().cloned()).env("RUST_LOG", "info").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        if notify {
            let path = self.log.with_extension("notify.sock");
            let _ = fs::remove_file(&path);
            let sock = std::os::unix::net::UnixDatagram::bind(&path).context("binding NOTIFY_SOCKET")?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            cmd.env("NOTIFY_SOCKET", &path);
            self.notify = Some(sock);
        }
        self.agent = Some(cmd.spawn().context("starting the agent")?);
        self.agent_args = args.to_vec();
        Ok(())
    }

    /// The agent's command line for this node: with `etcd_flags` (etcd mode), else static
    /// mode with `static_extra` appended.
    fn command_line(&self, etcd_flags: Option<&[String]>, backend: Backend, static_extra: &[String]) -> Vec<String> {
        let mut args: Vec<String> = vec!["--iface".into(), "eth0".into()];
        match self.kind {
            NodeKind::Agent { decap_hook } => args.extend(["--decap-hook".into(), decap_hook.into()]),
            _ => {
                assert!(etcd_flags.is_some(), "TUN nodes need an etcd cluster");
                args.extend(["--dataplane".into(), "tun".into()]);
            }
        }
        args.extend(["--bpffs-dir".into(), self.bpffs_dir.display().to_string()]);
        match etcd_flags {
            Some(flags) => {
                args.extend(flags.iter().cloned());
                args.extend(["--subnet-file".into(), self.subnet_file.display().to_string()]);
            }
            None => {
                args.extend([
                    "--network".into(), NETWORK.into(), "--subnet".into(), self.subnet.to_string(),
                    "--backend".into(), backend.flag().into(),
                ]);
                args.extend(static_extra.iter().cloned());
            }
        }
        // A test that chooses the interface its own way (--iface, --iface-regex,
        // --iface-can-reach, or --public-ip alone, which picks the interface that has it)
        // replaces the default --iface eth0.
        let chooses = |a: &String| ["--iface", "--iface-regex", "--iface-can-reach", "--public-ip"].iter().any(|f| a == f || a.starts_with(&format!("{f}=")));
        if args.iter().skip(2).any(chooses) {
            args.drain(..2);
        }
        args
    }

    /// Collect what the agent sent on its NOTIFY_SOCKET since the last call.
    pub fn read_notifications(&mut self) -> &[String] {
        if let Some(sock) = &self.notify {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                self.notifications.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        &self.notifications
    }

    /// Whether the agent process has exited (and its status).
    pub fn agent_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.agent.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// The data plane's configuration flags (`overlay_common::config_flags`).
    pub fn config_flags(&self) -> u16 {
        Maps::open(&self.bpffs_dir)
            .and_then(|m| m.config())
            .unwrap_or_else(|e| panic!("config of node {}: {e}", self.index))
            .flags
    }

    /// A counter of this node's interface `dev` as `ip -s link` shows it: `dir` "rx" or
    /// "tx", `name` "packets", "bytes", "dropped"...
    pub fn link_stat(&self, dev: &str, dir: &str, name: &str) -> u64 {
        let out = ip(&["-n", self.ns.name(), "-json", "-s", "link", "show", "dev", dev])
            .unwrap_or_else(|e| panic!("node {}: {dev}: {e:#}", self.index));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip -json: {e}: {out}"));
        v[0]["stats64"][dir][name].as_u64().unwrap_or_else(|| panic!("node {}: no {dir} {name} for {dev}: {out}", self.index))
    }

    /// The routes in this node's maps.
    pub fn routes(&self) -> Vec<overlay_agent::maps::Route> {
        Maps::open(&self.bpffs_dir).and_then(|m| m.routes()).unwrap_or_else(|e| panic!("routes of node {}: {e}", self.index))
    }
}

/// `--bip` (as the subnet it lies in) and `--mtu` of a DOCKER_NETWORK_OPTIONS line.
pub fn parse_docker_network_options(text: &str) -> Option<(Ipv4Net, u32)> {
    let line = text.lines().find_map(|l| l.strip_prefix("DOCKER_NETWORK_OPTIONS="))?;
    let opts = line.trim().trim_matches('"');
    let get = |k: &str| opts.split_whitespace().find_map(|w| w.strip_prefix(k));
    let bip: Ipv4Net = get("--bip=")?.parse().ok()?;
    Some((bip.trunc(), get("--mtu=")?.parse().ok()?))
}

/// FLANNEL_IPV6_SUBNET (as the subnet it lies in) and FLANNEL_MTU of a subnet file.
pub fn parse_subnet_env6(text: &str) -> Option<(Ipv6Net, u32)> {
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k));
    let subnet: Ipv6Net = get("FLANNEL_IPV6_SUBNET=")?.parse().ok()?;
    Some((subnet.trunc(), get("FLANNEL_MTU=")?.parse().ok()?))
}

/// FLANNEL_SUBNET (as the subnet it lies in) and FLANNEL_MTU of a subnet file.
pub fn parse_subnet_env(text: &str) -> Option<(Ipv4Net, u32)> {
    let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
    let subnet: Ipv4Net = get("FLANNEL_SUBNET=")?.parse().ok()?;
    let mtu = get("FLANNEL_MTU=")?.parse().ok()?;
    Some((subnet.trunc(), mtu))
}

pub struct Cluster {
    pub prefix: String,
    pub backend: Backend,
    pub underlay: Netns,
    pub nodes: Vec<Node>,
    pub workdir: PathBuf,
    /// Extra namespaces a test attached to the underlay (deleted with the cluster).
    extra: Vec<Netns>,
    pub etcd: Option<Etcd>,
    spec: ClusterSpec,
    agent_env: Vec<(String, String)>,
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// A prefix unique to this process and cluster, short enough for interface-free names.
fn unique_prefix(tag: &str) -> String {
    let n = CLUSTERS.fetch_add(1, Ordering::SeqCst);
    format!("ov{}{}-{}", std::process::id(), tag, n)
}

pub fn underlay_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 100, index as u8)
}

/// Node `index`'s underlay IPv6 address on a dual-stack underlay.
pub fn underlay_ipv6(index: usize) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, index as u16)
}

impl Cluster {
    /// Build the namespaces, start the agents, and (if `full_mesh`) fill the routes.
    pub fn new(tag: &str, spec: &ClusterSpec) -> Result<Self> {
        let prefix = unique_prefix(tag);
        let workdir = std::env::temp_dir().join(&prefix);
        fs::create_dir_all(&workdir)?;
        let underlay = Netns::new(&format!("{prefix}-ul"))?;
        let mut cluster = Cluster {
            prefix: prefix.clone(),
            backend: spec.backend,
            underlay,
            nodes: Vec::new(),
            workdir,
            extra: Vec::new(),
            etcd: None,
            spec: spec.clone(),
            agent_env: spec.agent_env.clone(),
        };
        let ul = cluster.underlay.name().to_string();
        ip(&["-n", &ul, "link", "set", "lo", "up"])?;
        if spec.routed_underlay {
            cluster.underlay.sysctl("net.ipv4.ip_forward", "1")?;
        } else {
            ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &ul, "link", "set", "br0", "up"])?;
            // The underlay is a plain switch: where br_netfilter is loaded (docker loads it),
            // it would validate and drop malformed IPv4 frames before they reach the nodes.
            for knob in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables"] {
                let _ = cluster.underlay.sysctl(&format!("net.bridge.{knob}"), "0");
            }
        }
        if let Control::Etcd { tls, config } = &spec.control {
            assert!(!spec.routed_underlay, "etcd clusters use the bridged underlay");
            ip(&["-n", &ul, "addr", "add", &format!("{ETCD_IP}/24"), "dev", "br0"])?;
            let etcd_ip = if spec.ipv6_only {
                ip(&["-n", &ul, "addr", "add", &format!("{ETCD_IPV6}/64"), "dev", "br0", "nodad"])?;
                std::net::IpAddr::V6(ETCD_IPV6)
            } else {
                std::net::IpAddr::V4(ETCD_IP)
            };
            let etcd = Etcd::start(&cluster.underlay, etcd_ip, &cluster.workdir, *tls, &spec.etcd_args)?;
            // An empty config means: the test writes it later.
            if !config.is_empty() {
                etcd.etcdctl(&["put", "/coreos.com/network/config", config])?;
            }
            cluster.etcd = Some(etcd);
        }
        for kind in spec.nodes.clone() {
            cluster.join(kind)?;
        }
        if spec.full_mesh {
            cluster.full_mesh()?;
        }
        Ok(cluster)
    }

    /// Add a node (later than the others, if the cluster is already up) and start it.
    pub fn join(&mut self, kind: NodeKind) -> Result<&Node> {
        let index = self.nodes.len() + 1;
        let node = self.add_node(index, kind)?;
        self.nodes.push(node);
        self.start_node(index - 1)?;
        Ok(&self.nodes[index - 1])
    }

    /// Add a node without starting it, for a test that prepares the node first (a daemon of
    /// its own there); `start_with_bin` starts it. Its 1-based index.
    pub fn add_unstarted(&mut self, kind: NodeKind) -> Result<usize> {
        let index = self.nodes.len() + 1;
        let node = self.add_node(index, kind)?;
        self.nodes.push(node);
        Ok(index)
    }

    /// Start node `index` (from `add_unstarted`) as `join` would, its agent run by `bin` (a
    /// wrapper that runs an installed agent, say) with the usual command line.
    pub fn start_with_bin(&mut self, index: usize, bin: &Path) -> Result<()> {
        self.nodes[index - 1].bin = Some(bin.to_path_buf());
        self.start_node(index - 1)
    }

    /// Replace node `index`'s stock flannel node by an agent in place, as an operator
    /// replacing flanneld does: everything flanneld left (its lease, the device and its address,
    /// neighbour, forwarding and route entries) stays; the agent starts over it with the
    /// cluster's flags (etcd mode) and is waited for.
    pub fn take_over_stock_node(&mut self, index: usize) -> Result<()> {
        let etcd_flags = self.etcd_agent_flags();
        let (backend, env, extra) = (self.backend, self.agent_env.clone(), self.spec.agent_args.clone());
        let node = &mut self.nodes[index - 1];
        if node.kind != NodeKind::StockFlannel {
            bail!("node {index} is not a stock flannel node");
        }
        node.kind = NodeKind::Agent { decap_hook: "tc" };
        node.agent_env = env;
        let args = node.command_line(etcd_flags.as_deref(), backend, &extra);
        node.spawn_agent(&args, etcd_flags.is_some())
    }

    /// Flags and environment for agents started from now on (etcd mode).
    pub fn set_agent_args(&mut self, args: Vec<String>, env: Vec<(String, String)>) {
        self.spec.agent_args = args;
        self.agent_env = env;
    }

    pub fn etcd(&self) -> &Etcd {
        self.etcd.as_ref().expect("this cluster has no etcd")
    }

    pub fn etcd_mut(&mut self) -> &mut Etcd {
        self.etcd.as_mut().expect("this cluster has no etcd")
    }

    /// Add `count` agent nodes, then start all their agents at once (no waiting).
    pub fn spawn_many_unready(&mut self, count: usize) -> Result<Vec<usize>> {
        let first = self.nodes.len() + 1;
        for i in 0..count {
            let node = self.add_node(first + i, NodeKind::Agent { decap_hook: "tc" })?;
            self.nodes.push(node);
        }
        let mut flags = self.etcd().agent_flags();
        flags.extend(self.spec.agent_args.iter().cloned());
        let backend = self.backend;
        for i in 0..count {
            let node = &mut self.nodes[first - 1 + i];
            node.agent_env = self.agent_env.clone();
            let args = node.command_line(Some(&flags), backend, &[]);
            node.start_agent_process(&args, false)?;
        }
        Ok((first..first + count).collect())
    }

    /// Start an agent node without waiting for it to be ready (for tests of start-up).
    pub fn spawn_unready(&mut self) -> Result<usize> {
        Ok(self.spawn_many_unready(1)?[0])
    }

    /// Send `signal` to the agent of node `index` (our child, by pid) and reap it.
    fn end_agent(&mut self, index: usize, signal: i32) -> Result<()> {
        if let Some(mut child) = self.nodes[index - 1].agent.take() {
            unsafe { libc::kill(child.id() as i32, signal) };
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM the agent of node `index` and wait for it (its data plane stays).
    pub fn stop_agent(&mut self, index: usize) -> Result<()> {
        self.end_agent(index, libc::SIGTERM)
    }

    /// SIGKILL the agent of node `index` (no clean-up at all) and reap it.
    pub fn kill_agent(&mut self, index: usize) -> Result<()> {
        self.end_agent(index, libc::SIGKILL)
    }

    /// Replace node `index`'s agent by another build (`bin`), same command line, the way an
    /// operator upgrades: stop (SIGTERM), start the new binary.
    pub fn upgrade_agent(&mut self, index: usize, bin: &Path) -> Result<()> {
        self.stop_agent(index)?;
        let etcd = matches!(self.spec.control, Control::Etcd { .. });
        let node = &mut self.nodes[index - 1];
        node.bin = Some(bin.to_path_buf());
        let args = node.agent_args.clone();
        node.spawn_agent(&args, etcd)
    }

    /// Start node `index`'s agent again with the same command line.
    pub fn restart_agent(&mut self, index: usize) -> Result<()> {
        self.stop_agent(index)?;
        let node = &mut self.nodes[index - 1];
        let args = node.agent_args.clone();
        node.spawn_agent(&args, matches!(self.spec.control, Control::Etcd { .. }))
    }

    /// Stop node `index`'s agent (if running) and start it with the cluster's current agent
    /// flags and environment (`set_agent_args`), as an operator who edited the unit would.
    pub fn restart_agent_with_current_args(&mut self, index: usize) -> Result<()> {
        self.stop_agent(index)?;
        let etcd_flags = self.etcd_agent_flags();
        let (backend, env) = (self.backend, self.agent_env.clone());
        let node = &mut self.nodes[index - 1];
        node.agent_env = env;
        let args = node.command_line(etcd_flags.as_deref(), backend, &self.spec.agent_args);
        node.spawn_agent(&args, etcd_flags.is_some())
    }

    pub fn node_mut(&mut self, index: usize) -> &mut Node {
        &mut self.nodes[index - 1]
    }

    fn add_node(&self, index: usize, kind: NodeKind) -> Result<Node> {
        let spec = &self.spec;
        let ns = Netns::new(&format!("{}-n{index}", self.prefix))?;
        let n = ns.name().to_string();
        let ul = self.underlay.name();
        let port = format!("p{index}");
        ip(&["-n", ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &n])?;
        let uip = if spec.routed_underlay {
            // Node i: 192.168.(100+i).2/24 behind the router's 192.168.(100+i).1.
            let gw = Ipv4Addr::new(192, 168, 100 + index as u8, 1);
            ip(&["-n", ul, "addr", "add", &format!("{gw}/24"), "dev", &port])?;
            ip(&["-n", ul, "link", "set", &port, "up"])?;
            Ipv4Addr::new(192, 168, 100 + index as u8, 2)
        } else {
            ip(&["-n", ul, "link", "set", &port, "master", "br0", "up"])?;
            underlay_ip(index)
        };
        if !spec.ipv6_only {
            ip(&["-n", &n, "addr", "add", &format!("{uip}/24"), "dev", "eth0"])?;
        }
        ip(&["-n", &n, "link", "set", "eth0", "mtu", &UNDERLAY_MTU.to_string(), "up"])?;
        ip(&["-n", &n, "link", "set", "lo", "up"])?;
        if spec.wire_underlay {
            run(self.underlay.command("ethtool").args(["-K", &port, "tso", "off", "gso", "off", "gro", "off"]))?;
            run(ns.command("ethtool").args(["-K", "eth0", "gro", "on"]))?;
        }
        if spec.routed_underlay {
            let gw = Ipv4Addr::new(192, 168, 100 + index as u8, 1);
            ip(&["-n", &n, "route", "add", "192.168.0.0/16", "via", &gw.to_string()])?;
        }
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        if spec.ipv6_underlay || spec.ipv6_only {
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            ip(&["-n", &n, "addr", "add", &format!("{}/64", underlay_ipv6(index)), "dev", "eth0", "nodad"])?;
        }
        // Strict reverse-path filtering, as the seed's RHEL/CentOS nodes have it (a new
        // namespace starts with 0): a packet must arrive on the device its source routes
        // through.
        for scope in ["all", "default"] {
            ns.sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), &spec.rp_filter.to_string())?;
        }
        // Static clusters give node n 10.244.<n>.0/24; with etcd, agents lease theirs and
        // stock flannel nodes (vxlan, or host-gw: plain routing) get a hand-written lease for
        // 10.244.<100+n>.0/24.
        let subnet: Ipv4Net = match (&spec.control, kind) {
            (Control::Etcd { .. }, NodeKind::StockFlannel | NodeKind::PlainRouting) => format!("10.244.{}.0/24", 100 + index).parse()?,
            _ => format!("10.244.{index}.0/24").parse()?,
        };
        let subnet6 = match kind {
            NodeKind::StockFlannel if spec.ipv6_only => Some(format!("fd00:10:244:{:x}::/64", 100 + index).parse()?),
            _ => None,
        };
        Ok(Node {
            index,
            kind,
            ns,
            containers: Vec::new(),
            underlay_ip: uip,
            subnet,
            subnet6,
            bpffs_dir: PathBuf::from("/sys/fs/bpf").join(format!("{}-n{index}", self.prefix)),
            vtep_mac: [0; 6],
            agent: None,
            log: self.workdir.join(format!("agent-n{index}.log")),
            subnet_file: self.workdir.join(format!("n{index}-subnet.env")),
            agent_args: Vec::new(),
            agent_env: self.agent_env.clone(),
            // flannel-v6 over IPv6 takes 70 bytes; wireguard takes its 80 whatever the family.
            mtu: UNDERLAY_MTU - if spec.ipv6_only && spec.backend != Backend::Wireguard { 70 } else { spec.backend.overhead() },
            notify: None,
            notifications: Vec::new(),
            bin: None,
        })
    }

    /// The docker0-like bridge (first address of the node's subnet) and its containers.
    fn add_containers(&mut self, i: usize) -> Result<()> {
        let count = self.spec.containers_per_node;
        if count == 0 {
            // The test brings its own bridge (a real dockerd).
            return Ok(());
        }
        let prefix = self.prefix.clone();
        let node = &mut self.nodes[i];
        let n = node.ns.name().to_string();
        // docker0 gets the subnet's first address, container k the (k+2)th: of the IPv6
        // subnet in an IPv6-only cluster (no duplicate address detection to wait for).
        let v6 = node.subnet6;
        let (gw, plen) = match v6 {
            Some(s6) => (Ipv6Addr::from(u128::from(s6.network()) + 1).to_string(), s6.prefix_len()),
            None => {
                let o = node.subnet.network().octets();
                (Ipv4Addr::new(o[0], o[1], o[2], o[3] + 1).to_string(), node.subnet.prefix_len())
            }
        };
        let add_address = |ns: &str, addr: &str, dev: &str| {
            let cidr = format!("{addr}/{plen}");
            let mut args = vec!["-n", ns, "addr", "add", &cidr, "dev", dev];
            if v6.is_some() {
                args.push("nodad");
            }
            ip(&args)
        };
        ip(&["-n", &n, "link", "add", "docker0", "type", "bridge"])?;
        add_address(&n, &gw, "docker0")?;
        ip(&["-n", &n, "link", "set", "docker0", "up"])?;
        let mtu = node.mtu.to_string();
        for k in 0..count {
            let c = Netns::new(&format!("{prefix}-n{}c{k}", node.index))?;
            let veth = format!("veth{k}");
            ip(&["-n", &n, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", c.name()])?;
            ip(&["-n", &n, "link", "set", &veth, "master", "docker0", "up"])?;
            let cip = match v6 {
                Some(_) => node.container_ip6(k).to_string(),
                None => node.container_ip(k).to_string(),
            };
            add_address(c.name(), &cip, "eth0")?;
            ip(&["-n", c.name(), "link", "set", "eth0", "mtu", &mtu, "up"])?;
            ip(&["-n", c.name(), "link", "set", "lo", "up"])?;
            let family = if v6.is_some() { "-6" } else { "-4" };
            ip(&["-n", c.name(), family, "route", "add", "default", "via", &gw])?;
            node.containers.push(c);
        }
        Ok(())
    }

    /// The etcd flags (with the cluster's extra agent flags) agents start with, in etcd mode.
    fn etcd_agent_flags(&self) -> Option<Vec<String>> {
        self.etcd.as_ref().map(|e| {
            let overridden = self.spec.agent_args.iter().any(|a| a.starts_with("--etcd-endpoints"));
            let mut f: Vec<String> = e.agent_flags().into_iter().filter(|a| !(overridden && a.starts_with("--etcd-endpoints"))).collect();
            f.extend(self.spec.agent_args.iter().cloned());
            f
        })
    }

    fn start_node(&mut self, i: usize) -> Result<()> {
        let backend = self.backend;
        let etcd_flags = self.etcd_agent_flags();
        let agent_env = self.agent_env.clone();
        let node = &mut self.nodes[i];
        node.agent_env = agent_env;
        match node.kind {
            NodeKind::Agent { .. } | NodeKind::TunAgent => {
                let args = node.command_line(etcd_flags.as_deref(), backend, &self.spec.agent_args);
                node.spawn_agent(&args, etcd_flags.is_some())?;
                if etcd_flags.is_some() && self.spec.docker_opts_step {
                    // The seed's ExecStartPost, through the drop-in wrapper.
                    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/mk-docker-opts.sh");
                    let f = node.subnet_file.display().to_string();
                    run(Command::new("sh")
                        .arg(&wrapper)
                        .args(["-k", "DOCKER_NETWORK_OPTIONS", "-f", &f, "-d", &f])
                        .env("OVERLAY_AGENT", agent_bin()))?;
                    let env = fs::read_to_string(&node.subnet_file)?;
                    let (bip, mtu) = parse_docker_network_options(&env).with_context(|| format!("docker options of node {}:\n{env}", node.index))?;
                    node.subnet = bip;
                    node.mtu = mtu;
                } else if etcd_flags.is_some() && self.spec.ipv6_only {
                    let env = fs::read_to_string(&node.subnet_file)?;
                    let (subnet6, mtu) = parse_subnet_env6(&env).with_context(|| format!("subnet file of node {}:\n{env}", node.index))?;
                    node.subnet6 = Some(subnet6);
                    node.mtu = mtu;
                } else if etcd_flags.is_some() {
                    let env = fs::read_to_string(&node.subnet_file)?;
                    let (subnet, mtu) = parse_subnet_env(&env).with_context(|| format!("subnet file of node {}:\n{env}", node.index))?;
                    node.subnet = subnet;
                    node.mtu = mtu;
                }
            }
            NodeKind::PlainRouting => {}
            NodeKind::StockFlannel if self.spec.ipv6_only && backend == Backend::Wireguard => {
                // flannel's wireguard backend on an IPv6-only node (Mode separate):
                // flannel-wg-v6 alone with a key of its own (in the file its agent would
                // read) and port 51821, the IPv6 subnet's network address as a /128, the
                // IPv6 network routed through it; peers come from the test.
                let n = node.ns.name().to_string();
                let s6 = node.subnet6.expect("stock IPv6-only node's subnet");
                let key = node.log.with_extension("wgkey");
                let private = run(Command::new("wg").arg("genkey"))?;
                fs::write(&key, private.trim())?;
                ip(&["-n", &n, "link", "add", "flannel-wg-v6", "type", "wireguard"])?;
                node.ns.run("wg", &["set", "flannel-wg-v6", "private-key", &key.display().to_string(), "listen-port", "51821"])?;
                ip(&["-n", &n, "link", "set", "flannel-wg-v6", "mtu", &node.mtu.to_string(), "up"])?;
                ip(&["-n", &n, "addr", "add", &format!("{}/128", s6.network()), "dev", "flannel-wg-v6", "nodad"])?;
                ip(&["-n", &n, "-6", "route", "replace", NETWORK6, "dev", "flannel-wg-v6", "scope", "link"])?;
            }
            NodeKind::StockFlannel if self.spec.ipv6_only => {
                // flannel's vxlan backend on an IPv6-only node: flannel-v6.1 only, bound to
                // the public IPv6 address, the subnet's network address as a /128.
                let n = node.ns.name().to_string();
                let s6 = node.subnet6.expect("stock IPv6-only node's subnet");
                ip(&[
                    "-n", &n, "link", "add", "flannel-v6.1", "type", "vxlan", "id", "1", "local",
                    &underlay_ipv6(node.index).to_string(), "dev", "eth0", "dstport", "8472", "nolearning",
                ])?;
                ip(&["-n", &n, "link", "set", "flannel-v6.1", "mtu", &node.mtu.to_string(), "up"])?;
                ip(&["-n", &n, "addr", "add", &format!("{}/128", s6.network()), "dev", "flannel-v6.1", "nodad"])?;
            }
            NodeKind::StockFlannel if backend == Backend::Ipip => {
                // flannel's ipip backend: flannel.ipip with local = the interface's address
                // and no remote, MTU the underlay's less 20, the subnet's network address as
                // a /32.
                let n = node.ns.name().to_string();
                ip(&["-n", &n, "link", "add", "flannel.ipip", "type", "ipip", "local", &node.underlay_ip.to_string()])?;
                ip(&["-n", &n, "link", "set", "flannel.ipip", "mtu", &node.mtu.to_string(), "up"])?;
                ip(&["-n", &n, "addr", "add", &format!("{}/32", node.subnet.network()), "dev", "flannel.ipip"])?;
            }
            NodeKind::StockFlannel if backend == Backend::Wireguard => {
                // flannel's wireguard backend: flannel-wg with a key of its own and port
                // 51820, MTU the underlay's less 80, the subnet's network address as a /32,
                // the network routed through it (scope link); peers come with add_route.
                let n = node.ns.name().to_string();
                // The key where this node's agent would read it (WIREGUARD_KEY_FILE), as
                // flanneld and the agent share /run/flannel/wgkey: a takeover keeps it.
                let key = node.log.with_extension("wgkey");
                let private = run(Command::new("wg").arg("genkey"))?;
                fs::write(&key, private.trim())?;
                ip(&["-n", &n, "link", "add", "flannel-wg", "type", "wireguard"])?;
                node.ns.run("wg", &["set", "flannel-wg", "private-key", &key.display().to_string(), "listen-port", "51820"])?;
                ip(&["-n", &n, "link", "set", "flannel-wg", "mtu", &node.mtu.to_string(), "up"])?;
                ip(&["-n", &n, "addr", "add", &format!("{}/32", node.subnet.network()), "dev", "flannel-wg"])?;
                ip(&["-n", &n, "route", "replace", NETWORK, "dev", "flannel-wg", "scope", "link"])?;
            }
            NodeKind::StockFlannel => {
                assert_eq!(backend, Backend::Vxlan, "stock flannel nodes are set up for vxlan, ipip and wireguard only");
                let n = node.ns.name().to_string();
                ip(&[
                    "-n", &n, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local",
                    &node.underlay_ip.to_string(), "dev", "eth0", "dstport", "8472", "nolearning",
                ])?;
                ip(&["-n", &n, "link", "set", "flannel.1", "mtu", "1450", "up"])?;
                ip(&["-n", &n, "addr", "add", &format!("{}/32", node.subnet.network()), "dev", "flannel.1"])?;
            }
        }
        // (A host-gw agent makes no device: no VtepMAC.)
        let host_gw = matches!(&self.spec.control, Control::Etcd { config, .. } if config.contains("host-gw"));
        if self.spec.ipv6_only && backend == Backend::Wireguard {
            // No VtepMAC: peers are keys.
        } else if self.spec.ipv6_only {
            node.vtep_mac = link_mac(&node.ns, "flannel-v6.1")?;
        } else if !matches!(node.kind, NodeKind::TunAgent | NodeKind::PlainRouting) && !host_gw && !matches!(backend, Backend::Ipip | Backend::Wireguard) {
            node.vtep_mac = link_mac(&node.ns, backend.device())?;
        }
        if let (NodeKind::StockFlannel, Some(etcd), Some(s6), Backend::Wireguard) = (node.kind, &self.etcd, node.subnet6, backend) {
            // What a stock flannel wireguard node writes for itself in an IPv6-only network.
            let key = node.ns.run("wg", &["show", "flannel-wg-v6", "public-key"])?;
            let value = format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{}","BackendType":"wireguard","BackendV6Data":{{"PublicKey":"{}","Port":51821}}}}"#,
                underlay_ipv6(node.index),
                key.trim()
            );
            let key = format!("/coreos.com/network/subnets/0.0.0.0-0&{}-{}", s6.network(), s6.prefix_len());
            etcd.etcdctl(&["put", &key, &value])?;
        } else if let (NodeKind::StockFlannel, Some(etcd), Some(s6)) = (node.kind, &self.etcd, node.subnet6) {
            // What a stock flannel vxlan node writes for itself in an IPv6-only network.
            let value = format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{}","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
                underlay_ipv6(node.index),
                overlay_agent::netdev::format_mac(&node.vtep_mac)
            );
            let key = format!("/coreos.com/network/subnets/0.0.0.0-0&{}-{}", s6.network(), s6.prefix_len());
            etcd.etcdctl(&["put", &key, &value])?;
        } else if let (NodeKind::StockFlannel, Some(etcd), Backend::Wireguard) = (node.kind, &self.etcd, backend) {
            // What a stock flannel wireguard node writes for itself.
            let key = node.ns.run("wg", &["show", "flannel-wg", "public-key"])?;
            let value = format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"wireguard","BackendData":{{"PublicKey":"{}","Port":51820}}}}"#,
                node.underlay_ip,
                key.trim()
            );
            let key = format!("/coreos.com/network/subnets/{}-{}", node.subnet.network(), node.subnet.prefix_len());
            etcd.etcdctl(&["put", &key, &value])?;
        } else if let (NodeKind::StockFlannel, Some(etcd), Backend::Ipip) = (node.kind, &self.etcd, backend) {
            // What a stock flannel ipip node writes for itself.
            let value = format!(r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"ipip"}}"#, node.underlay_ip);
            let key = format!("/coreos.com/network/subnets/{}-{}", node.subnet.network(), node.subnet.prefix_len());
            etcd.etcdctl(&["put", &key, &value])?;
        } else if let (NodeKind::StockFlannel, Some(etcd)) = (node.kind, &self.etcd) {
            // What a stock flannel vxlan node writes for itself.
            let value = format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{}"}}}}"#,
                node.underlay_ip,
                overlay_agent::netdev::format_mac(&node.vtep_mac)
            );
            let key = format!("/coreos.com/network/subnets/{}-{}", node.subnet.network(), node.subnet.prefix_len());
            etcd.etcdctl(&["put", &key, &value])?;
        }
        if let (NodeKind::PlainRouting, Some(etcd)) = (node.kind, &self.etcd) {
            // What a stock flannel host-gw node writes for itself.
            let value = format!(r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#, node.underlay_ip);
            let key = format!("/coreos.com/network/subnets/{}-{}", node.subnet.network(), node.subnet.prefix_len());
            etcd.etcdctl(&["put", &key, &value])?;
        }
        self.add_containers(i)
    }

    /// Give every node a route to every other node, the way each kind does it.
    pub fn full_mesh(&self) -> Result<()> {
        for a in &self.nodes {
            for b in &self.nodes {
                if a.index != b.index {
                    self.add_route(a, b)?;
                }
            }
        }
        Ok(())
    }

    /// Make `from` route `to`'s subnet to `to`.
    pub fn add_route(&self, from: &Node, to: &Node) -> Result<()> {
        if self.spec.ipv6_only {
            assert_eq!(from.kind, NodeKind::StockFlannel, "in an IPv6-only cluster only stock nodes are routed by hand");
            return add_route6(from, to);
        }
        match from.kind {
            NodeKind::Agent { .. } | NodeKind::TunAgent => {
                let mac = overlay_agent::netdev::format_mac(&to.vtep_mac);
                from.agent_cli(&[
                    "route", "add", &to.subnet.to_string(), "--public-ip",
                    &to.underlay_ip.to_string(), "--vtep-mac", &mac,
                ])?;
            }
            NodeKind::PlainRouting => {
                ip(&["-n", from.ns.name(), "route", "replace", &to.subnet.to_string(), "via", &to.underlay_ip.to_string()])?;
            }
            NodeKind::StockFlannel if self.spec.backend == Backend::Wireguard => {
                // flannel's wireguard backend (addPeer): the peer's key, endpoint
                // PublicIP:Port, allowed IPs its subnet, the network's PSK and keepalive.
                let key = to.ns.run("wg", &["show", "flannel-wg", "public-key"])?;
                let psk = from.log.with_extension("stock-psk");
                fs::write(&psk, WIREGUARD_PSK)?;
                from.ns.run(
                    "wg",
                    &[
                        "set", "flannel-wg", "peer", key.trim(), "endpoint", &format!("{}:51820", to.underlay_ip),
                        "allowed-ips", &to.subnet.to_string(), "preshared-key", &psk.display().to_string(),
                        "persistent-keepalive", &WIREGUARD_KEEPALIVE.to_string(),
                    ],
                )?;
            }
            NodeKind::StockFlannel if self.spec.backend == Backend::Ipip => {
                // flannel's ipip backend: the peer's subnet via its address, onlink, through
                // flannel.ipip.
                ip(&[
                    "-n", from.ns.name(), "route", "replace", &to.subnet.to_string(), "via", &to.underlay_ip.to_string(),
                    "dev", "flannel.ipip", "onlink",
                ])?;
            }
            NodeKind::StockFlannel => {
                // flannel's vxlan backend: route via the peer's VTEP address (its subnet's
                // network address) onlink, a permanent ARP entry for it, an FDB entry to
                // the peer's public IP.
                let n = from.ns.name();
                let gw = to.subnet.network().to_string();
                let mac = overlay_agent::netdev::format_mac(&to.vtep_mac);
                ip(&["-n", n, "neigh", "replace", &gw, "lladdr", &mac, "dev", "flannel.1", "nud", "permanent"])?;
                run(Command::new("bridge").args([
                    "-n", n, "fdb", "replace", &mac, "dev", "flannel.1", "dst",
                    &to.underlay_ip.to_string(), "self", "permanent",
                ]))?;
                ip(&["-n", n, "route", "replace", &to.subnet.to_string(), "via", &gw, "dev", "flannel.1", "onlink"])?;
            }
        }
        Ok(())
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index - 1]
    }

    /// Attach a namespace that is not a node to the (bridged) underlay, with address `addr`/24.
    pub fn add_underlay_host(&mut self, name: &str, addr: Ipv4Addr) -> Result<Netns> {
        let ns = Netns::new(&format!("{}-{name}", self.prefix))?;
        let ul = self.underlay.name();
        let port = format!("x{}", self.extra.len());
        ip(&["-n", ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
        ip(&["-n", ul, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", ns.name(), "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", ns.name(), "link", "set", "eth0", "up"])?;
        ip(&["-n", ns.name(), "link", "set", "lo", "up"])?;
        let handle = ns.handle();
        self.extra.push(ns);
        Ok(handle)
    }
}

impl Cluster {
    /// Move nodes (their agents stopped: their eth0 goes) behind one router that maps each
    /// public address 1:1 to a node (DNAT in, SNAT out, hairpin between them included), as a
    /// cloud's or a home router's 1:1 NAT does: node i's eth0 is made again on the router's
    /// private bridge with 10.99.0.<i>/24 and a default route via 10.99.0.254, and the
    /// router's `pub0` on the underlay holds the public addresses. Each node's
    /// `underlay_ip` becomes its public address (where peers send).
    pub fn put_behind_nat(&mut self, nodes: &[(usize, Ipv4Addr)]) -> Result<Netns> {
        let r = Netns::new(&format!("{}-nat", self.prefix))?;
        let (ul, rn) = (self.underlay.name().to_string(), r.name().to_string());
        ip(&["-n", &ul, "link", "add", "xnat", "type", "veth", "peer", "name", "pub0", "netns", &rn])?;
        ip(&["-n", &ul, "link", "set", "xnat", "master", "br0", "up"])?;
        ip(&["-n", &rn, "link", "set", "lo", "up"])?;
        ip(&["-n", &rn, "link", "set", "pub0", "up"])?;
        ip(&["-n", &rn, "link", "add", "br1", "type", "bridge"])?;
        ip(&["-n", &rn, "addr", "add", "10.99.0.254/24", "dev", "br1"])?;
        ip(&["-n", &rn, "link", "set", "br1", "up"])?;
        r.sysctl("net.ipv4.ip_forward", "1")?;
        // Hairpinned packets leave by the interface they came in on: no redirects, the NAT
        // is the way.
        r.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
        r.sysctl("net.ipv4.conf.br1.send_redirects", "0")?;
        for &(i, public) in nodes {
            let node = self.node(i).ns.name().to_string();
            let private = Ipv4Addr::new(10, 99, 0, i as u8);
            ip(&["-n", &rn, "addr", "add", &format!("{public}/24"), "dev", "pub0"])?;
            ip(&["-n", &node, "link", "del", "eth0"])?;
            let port = format!("q{i}");
            ip(&["-n", &rn, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &node])?;
            ip(&["-n", &rn, "link", "set", &port, "master", "br1", "up"])?;
            ip(&["-n", &node, "addr", "add", &format!("{private}/24"), "dev", "eth0"])?;
            ip(&["-n", &node, "link", "set", "eth0", "mtu", &UNDERLAY_MTU.to_string(), "up"])?;
            ip(&["-n", &node, "route", "add", "default", "via", "10.99.0.254"])?;
            let (p, q) = (public.to_string(), private.to_string());
            run(r.command("iptables").args(["-w", "-t", "nat", "-A", "PREROUTING", "-d", &p, "-j", "DNAT", "--to-destination", &q]))?;
            run(r.command("iptables").args(["-w", "-t", "nat", "-A", "POSTROUTING", "-s", &q, "-j", "SNAT", "--to-source", &p]))?;
            self.node_mut(i).underlay_ip = public;
        }
        let handle = r.handle();
        self.extra.push(r);
        Ok(handle)
    }
}

impl Cluster {
    /// Attach a namespace to node `index` through a veth of its own (a second interface of the
    /// node, not the underlay): the node's end is `side0` with 192.168.(200+index).1/30, the
    /// host's `eth0` has .2 and a default route through the node. Returns the host and the
    /// two addresses (node's, host's).
    pub fn add_side_host(&mut self, index: usize, name: &str) -> Result<(Netns, Ipv4Addr, Ipv4Addr)> {
        let ns = Netns::new(&format!("{}-{name}", self.prefix))?;
        let node = self.node(index).ns.name().to_string();
        let (at_node, at_host) = (Ipv4Addr::new(192, 168, 200 + index as u8, 1), Ipv4Addr::new(192, 168, 200 + index as u8, 2));
        ip(&["-n", &node, "link", "add", "side0", "type", "veth", "peer", "name", "eth0", "netns", ns.name()])?;
        ip(&["-n", &node, "addr", "add", &format!("{at_node}/30"), "dev", "side0"])?;
        ip(&["-n", &node, "link", "set", "side0", "up"])?;
        ip(&["-n", ns.name(), "addr", "add", &format!("{at_host}/30"), "dev", "eth0"])?;
        ip(&["-n", ns.name(), "link", "set", "eth0", "up"])?;
        ip(&["-n", ns.name(), "link", "set", "lo", "up"])?;
        ip(&["-n", ns.name(), "route", "add", "default", "via", &at_node.to_string()])?;
        let handle = ns.handle();
        self.extra.push(ns);
        Ok((handle, at_node, at_host))
    }
}

/// The MAC address of `dev` inside `ns`.
/// What flannel's vxlan backend does on `from` (a stock node with flannel-v6.1) for an IPv6
/// peer: a route to its IPv6 subnet via the subnet's network address onlink, a permanent
/// neighbour entry with the peer's flannel-v6.1 MAC, a forwarding entry to its public IPv6
/// address. (The peer's subnet and MAC: `to.subnet6`, `to.vtep_mac` in an IPv6-only cluster.)
pub fn add_route6(from: &Node, to: &Node) -> Result<()> {
    let n = from.ns.name();
    let s6 = to.subnet6.context("the peer's IPv6 subnet")?;
    let gw = s6.network().to_string();
    let mac = overlay_agent::netdev::format_mac(&to.vtep_mac);
    ip(&["-n", n, "-6", "neigh", "replace", &gw, "lladdr", &mac, "dev", "flannel-v6.1", "nud", "permanent"])?;
    run(Command::new("bridge").args(["-n", n, "fdb", "replace", &mac, "dev", "flannel-v6.1", "dst", &underlay_ipv6(to.index).to_string(), "self", "permanent"]))?;
    ip(&["-n", n, "-6", "route", "replace", &s6.to_string(), "via", &gw, "dev", "flannel-v6.1", "onlink"])?;
    Ok(())
}

pub fn link_mac(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let out = ip(&["-n", ns.name(), "-json", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let mac = v[0]["address"].as_str().context("no address")?;
    overlay_agent::netdev::parse_mac(mac).context("bad MAC")
}

pub fn link_mtu(ns: &Netns, dev: &str) -> Result<u32> {
    let out = ip(&["-n", ns.name(), "-json", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["mtu"].as_u64().map(|m| m as u32).context("no mtu")
}

/// Set `dev`'s IPv4 GSO limit in `ns` (BIG TCP past 64 KiB) over rtnetlink: the iproute2 of
/// these machines (6.1) predates `gso_ipv4_max_size`.
pub fn set_gso_ipv4_max_size(ns: &Netns, dev: &str, size: u32) -> Result<()> {
    const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
    let dev = std::ffi::CString::new(dev)?;
    ns.enter(move || -> Result<()> {
        let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no interface {dev:?}");
        let mut msg = Vec::with_capacity(40);
        msg.extend_from_slice(&40u32.to_ne_bytes());
        msg.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
        msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]); // family, pad, type
        msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // change
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&IFLA_GSO_IPV4_MAX_SIZE.to_ne_bytes());
        msg.extend_from_slice(&size.to_ne_bytes());
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        anyhow::ensure!(fd >= 0, "netlink socket: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        let sent = unsafe {
            libc::sendto(fd, msg.as_ptr() as *const _, msg.len(), 0, &addr as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_nl>() as u32)
        };
        let mut ack = [0u8; 1024];
        let got = if sent == msg.len() as isize { unsafe { libc::recv(fd, ack.as_mut_ptr() as *mut _, ack.len(), 0) } } else { -1 };
        let os = std::io::Error::last_os_error();
        unsafe { libc::close(fd) };
        anyhow::ensure!(got >= 20, "netlink: {os}");
        // An NLMSG_ERROR whose error is 0 is the acknowledgement.
        let errno = i32::from_ne_bytes(ack[16..20].try_into().expect("4 bytes"));
        anyhow::ensure!(errno == 0, "setting gso_ipv4_max_size: {}", std::io::Error::from_raw_os_error(-errno));
        Ok(())
    })?
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.agent.take() {
                // Our own child, by pid.
                let _ = child.kill();
                let _ = child.wait();
            }
            // What a node that runs no programs leaves in /run/overlay-agent.
            let _ = overlay_agent::datapath::wireguard::set_marker(&node.bpffs_dir, None);
            let _ = overlay_agent::datapath::degraded::set_marker(&node.bpffs_dir, None);
            if node.bpffs_dir.exists() {
                if let Err(e) = fs::remove_dir_all(&node.bpffs_dir) {
                    eprintln!("cleanup: removing {}: {e}", node.bpffs_dir.display());
                }
            }
        }
        // Namespaces are deleted by their own Drop (containers, nodes, extras, underlay).
        self.nodes.clear();
        self.extra.clear();
        self.etcd = None;
        let _ = fs::remove_dir_all(&self.workdir);
    }
}

/// Wait (bounded) until `f` holds; false if it never did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A PATH with iptables' tools and the system's, but no `nft`: an agent run with it takes the
/// firewall forms a host without nftables' tool gets. The directory goes when this does.
pub struct PathWithoutNft {
    dir: PathBuf,
    pub path: String,
}

impl PathWithoutNft {
    pub fn new() -> Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("overlay-no-nft-{}-{k}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let me = Self { path: format!("{}:/usr/bin:/bin", dir.display()), dir };
        for tool in ["iptables", "iptables-restore", "iptables-save", "ip6tables", "ip6tables-restore", "ip6tables-save"] {
            let target = Path::new("/usr/sbin").join(tool);
            std::os::unix::fs::symlink(&target, me.dir.join(tool)).with_context(|| format!("linking {}", target.display()))?;
        }
        Ok(me)
    }
}

impl Drop for PathWithoutNft {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
