//! Command line: running the agent (flanneld's place) and the admin subcommands.


mod goflags;

pub use self::goflags::{normalize_args, parse_duration, parse_go_bool, parse_go_int};
use self::goflags::*;

use std::{ffi::OsString, net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{bail, Context as _, Result};
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use overlay_common::{EncapMode, DEFAULT_UDP_PORT, DEFAULT_VNI, DEFAULT_VXLAN_PORT};

use crate::{
    daemon::DaemonOptions,
    dataplane::{DecapDelivery, DecapHook, NodeSpec},
    lease::registry::{EtcdOptions, DEFAULT_PREFIX},
};

#[derive(Debug, Parser)]
#[command(
    name = "overlay-agent",
    version,
    about = "Overlay network node agent: flannel's contracts, an eBPF data plane",
    long_about = "Without a subcommand, runs the node agent in flanneld's place: reads the \
        network config from etcd, leases a subnet for this node, writes the subnet file, brings \
        up the eBPF data plane (TC egress encapsulation on the overlay device; XDP or TC ingress \
        checks on the underlay, before the kernel's vxlan device decapsulates what passes them; \
        pinned under --bpffs-dir) and keeps its routes equal to the leases in etcd. The data plane keeps forwarding after the agent exits; `teardown` \
        removes it (`teardown --leave-kernel-state` hands the node back to flanneld).\n\nflanneld's flags are accepted as flanneld spells them, Go style \
        included (-etcd-cafile=F works like --etcd-cafile F, -v=2 sets the log level), and \
        every flag can be set as an environment variable FLANNELD_<FLAG> (e.g. \
        FLANNELD_ETCD_ENDPOINTS), read as flanneld reads them: Go's booleans (1, t, true, ...), \
        an empty variable as unset, a bad value logged and left out. Leases live in etcd: \
        flanneld's --kube-subnet-mgr (leases in Kubernetes Node objects) and its other \
        Kubernetes-mode flags are refused with what to do instead; a Kubernetes node runs the \
        agent in etcd mode (docs/kubernetes.md).\n\nRun under the \
        name `flannel` (see `install-cni`), it is flannel's CNI plugin for containerd, CRI-O, \
        podman and Kubernetes.\n\nWith \
        --network and --subnet it runs without etcd (static mode; routes via `route add`).",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Directory on bpffs holding this node's pinned maps and links.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/overlay", env = "FLANNELD_BPFFS_DIR")]
    pub bpffs_dir: PathBuf,

    #[command(flatten)]
    pub etcd: EtcdArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(flatten)]
    pub kube: KubeArgs,
}

/// flanneld's Kubernetes subnet manager's flags, so that a unit written for that mode stops
/// with what to do instead rather than "unexpected argument" (this build runs flannel's etcd
/// mode), and `--net-config-path`, which flanneld reads only in that mode (taken and ignored,
/// as flanneld ignores it in etcd mode).
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// flanneld: leases in the Kubernetes API. Refused.
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", num_args = 0..=1, action = clap::ArgAction::Set, value_parser = parse_go_bool, default_missing_value = "true", default_value = "false", hide = true)]
    pub kube_subnet_mgr: bool,
    /// flanneld (Kubernetes mode): kubeconfig file. Refused.
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", hide = true)]
    pub kubeconfig_file: Option<String>,
    /// flanneld (Kubernetes mode): API server URL. Refused.
    #[arg(long, env = "FLANNELD_KUBE_API_URL", hide = true)]
    pub kube_api_url: Option<String>,
    /// flanneld (Kubernetes mode): the Node annotations' prefix. Refused.
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", hide = true)]
    pub kube_annotation_prefix: Option<String>,
    /// flanneld (Kubernetes mode): clear the Node's NetworkUnavailable condition. Refused.
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", num_args = 0..=1, action = clap::ArgAction::Set, value_parser = parse_go_bool, default_missing_value = "true", hide = true)]
    pub set_node_network_unavailable: Option<bool>,
    /// flanneld (Kubernetes mode only): the network config file. Ignored in etcd mode, as by
    /// flanneld.
    #[arg(long, env = "FLANNELD_NET_CONFIG_PATH", hide = true)]
    pub net_config_path: Option<String>,
}

impl KubeArgs {
    /// Why the agent will not start with these flags, if it will not.
    pub fn refusal(&self) -> Option<String> {
        let given: Vec<&str> = [
            (self.kube_subnet_mgr, "--kube-subnet-mgr"),
            (self.kubeconfig_file.is_some(), "--kubeconfig-file"),
            (self.kube_api_url.is_some(), "--kube-api-url"),
            (self.kube_annotation_prefix.is_some(), "--kube-annotation-prefix"),
            (self.set_node_network_unavailable.is_some(), "--set-node-network-unavailable"),
        ]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect();
        (!given.is_empty()).then(|| {
            format!(
                "{}: flanneld's Kubernetes subnet manager is not part of this build, which runs flannel's etcd mode \
                 (the network config and the subnet leases in etcd under --etcd-prefix, as a binary install of flanneld \
                 sets up). Remove these flags and give --etcd-endpoints; on Kubernetes, run the agent against etcd as \
                 its DaemonSet does (docs/kubernetes.md), or keep kube-flannel on this cluster",
                given.join(", ")
            )
        })
    }

    /// Lines to log: flags taken and ignored.
    pub fn notes(&self) -> Vec<String> {
        self.net_config_path
            .iter()
            .map(|p| format!("--net-config-path={p} is read by flanneld only with --kube-subnet-mgr; in etcd mode the network config comes from etcd, as with flanneld: ignored"))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// VXLAN (flannel's `vxlan` backend): UDP 8472, VNI 1 by default.
    Vxlan,
    /// Raw IPv4 in UDP (flannel's `udp` backend): UDP 8285 by default.
    Udp,
}

impl From<Backend> for EncapMode {
    fn from(b: Backend) -> Self {
        match b {
            Backend::Vxlan => EncapMode::Vxlan,
            Backend::Udp => EncapMode::Udp,
        }
    }
}

/// The logging flags flanneld copies from klog (`-v`, `-vmodule`, `-log_backtrace_at`), so
/// that its unit files work unchanged.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log verbosity, as klog's -v: 0 logs info and above, 1 to 3 also debug, 4 and more
    /// trace. RUST_LOG, when set, takes precedence.
    #[arg(short = 'v', long = "v", global = true, env = "FLANNELD_V", value_name = "LEVEL", value_parser = parse_go_i32, allow_negative_numbers = true)]
    pub v: Option<i32>,
    /// klog's per-file verbosity (flanneld's -vmodule): accepted, and ignored with a note
    /// (this agent's log levels are per module: RUST_LOG=overlay_agent::control=debug).
    #[arg(long = "vmodule", global = true, env = "FLANNELD_VMODULE", value_name = "PATTERN=N,...")]
    pub vmodule: Option<String>,
    /// klog's stack trace at a log line (flanneld's -log_backtrace_at): accepted, and ignored
    /// with a note.
    #[arg(long = "log_backtrace_at", global = true, env = "FLANNELD_LOG_BACKTRACE_AT", value_name = "FILE:N")]
    pub log_backtrace_at: Option<String>,
}

impl LogArgs {
    /// The tracing filter for `-v` (used when RUST_LOG is not set).
    pub fn filter(&self) -> &'static str {
        match self.v.unwrap_or(0) {
            ..=0 => "info",
            1..=3 => "info,overlay_agent=debug",
            _ => "info,overlay_agent=trace",
        }
    }

    /// Lines to log once logging is up: the klog flags that are accepted but do nothing here.
    pub fn notes(&self) -> Vec<String> {
        let mut n = Vec::new();
        if let Some(m) = &self.vmodule {
            n.push(format!("-vmodule={m} is klog's per-file verbosity and is ignored here; RUST_LOG sets levels per module (e.g. RUST_LOG=info,overlay_agent::control=debug)"));
        }
        if let Some(b) = &self.log_backtrace_at {
            n.push(format!("-log_backtrace_at={b} is klog's and is ignored here"));
        }
        n
    }
}

/// Parse the command line and the FLANNELD_ variables as flanneld does (Go's
/// flagutil.SetFlagsFromEnv over its flag set): a flag on the command line wins over its
/// variable; an empty variable is as if unset; a boolean or integer variable Go cannot parse
/// sets false or 0, as in flanneld, with a note (returned, for the caller to log), and is an
/// error only where 0 is not a value the flag takes (flanneld then exits too); any other
/// variable the flag cannot take is an error naming it (flanneld fails on those later, when
/// it uses them; this agent's own flags were never flanneld's). Command-line errors are errors.
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> std::result::Result<(Cli, Vec<String>), clap::Error> {
    parse_with_env(argv, |name| std::env::var_os(name))
}

/// `parse`, with the environment read through `env`.
pub fn parse_with_env(
    argv: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<OsString>,
) -> std::result::Result<(Cli, Vec<String>), clap::Error> {
    use clap::FromArgMatches as _;
    // Each variable's values, checked by the flag's own parser, become the flag's default
    // (so the command line still wins); clap reads no environment itself.
    let seen = Cli::command();
    let mut notes = Vec::new();
    let mut plan = Vec::new();
    for arg in seen.get_arguments() {
        let (Some(name), Some(long)) = (arg.get_env().and_then(|n| n.to_str()), arg.get_long()) else { continue };
        let value = env(name).filter(|v| !v.is_empty());
        let Some(value) = value else {
            plan.push((arg.get_id().clone(), None));
            continue;
        };
        let shown = if arg.is_hide_env_values_set() { "its value".to_string() } else { format!("{:?}", value.to_string_lossy()) };
        let Some(text) = value.to_str() else {
            return Err(clap::Error::raw(clap::error::ErrorKind::InvalidUtf8, format!("{name}: {shown} is not UTF-8\n")));
        };
        let pieces: Vec<String> = match arg.get_value_delimiter() {
            Some(d) => text.split(d).map(str::to_string).collect(),
            None => vec![text.to_string()],
        };
        let values = match check_values(arg, &pieces) {
            Ok(()) => pieces,
            Err(why) if GO_BOOL_FLAGS.contains(&long) => {
                notes.push(format!("{name}: {shown} is not a boolean ({why}); read as false, as flanneld reads it"));
                vec!["false".to_string()]
            }
            Err(why) if GO_INT_FLAGS.contains(&long) && check_values(arg, &["0".to_string()]).is_ok() => {
                notes.push(format!("{name}: {shown} is not a number ({why}); read as 0, as flanneld reads it"));
                vec!["0".to_string()]
            }
            Err(why) if GO_INT_FLAGS.contains(&long) => {
                return Err(clap::Error::raw(
                    clap::error::ErrorKind::ValueValidation,
                    format!("{name}: {shown} is not a number ({why}); flanneld reads it as 0, which --{long} does not take\n"),
                ))
            }
            Err(why) => {
                return Err(clap::Error::raw(
                    clap::error::ErrorKind::ValueValidation,
                    format!("{name}: {shown} is not a value --{long} takes ({why})\n"),
                ))
            }
        };
        plan.push((arg.get_id().clone(), Some((values, arg.is_hide_env_values_set()))));
    }
    let mut cmd = Cli::command();
    for (id, values) in plan {
        cmd = cmd.mut_arg(id, |a| {
            let a = a.env(None);
            match values {
                // Leaked once per process: clap keeps defaults as 'static strings.
                Some((v, hide)) => {
                    let v: Vec<&'static str> = v.into_iter().map(|s| &*Box::leak(s.into_boxed_str())).collect();
                    a.default_values(v).hide_default_value(hide)
                }
                None => a,
            }
        });
    }
    let matches = cmd.try_get_matches_from(normalize_args(argv))?;
    Ok((Cli::from_arg_matches(&matches)?, notes))
}

/// How to reach etcd (flanneld's flags; also used by the admin subcommands).
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// Comma-separated etcd endpoints.
    #[arg(long, global = true, env = "FLANNELD_ETCD_ENDPOINTS", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: Vec<String>,
    /// etcd prefix holding `config` and `subnets/`.
    #[arg(long, global = true, env = "FLANNELD_ETCD_PREFIX", default_value = DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// CA certificate (PEM) that signed etcd's server certificate.
    #[arg(long, global = true, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    #[arg(long, global = true, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd.
    #[arg(long, global = true, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, global = true, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// etcd password (prefer the environment variable: command lines are visible to all users).
    #[arg(long, global = true, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
}

impl EtcdArgs {
    pub fn options(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Underlay interface, by name or by one of its addresses; repeat it to give choices in
    /// order (the first that exists wins). Default: --iface-regex, else --iface-can-reach,
    /// else the interface of the default route.
    #[arg(long, env = "FLANNELD_IFACE", action = clap::ArgAction::Append, value_delimiter = ',')]
    pub iface: Vec<String>,
    /// Regular expression matched against every interface's IPv4 addresses, then names; the
    /// first match wins (repeatable: tried in order). Used when no --iface is given.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", action = clap::ArgAction::Append, value_parser = parse_regex)]
    pub iface_regex: Vec<regex::Regex>,
    /// Use the interface the route to this address (IPv4 or IPv6) goes through (`ip route
    /// get`), when neither --iface nor --iface-regex is given or matches.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<std::net::IpAddr>,
    /// This node's underlay address (default: the address --iface named, else the first
    /// IPv4 address of the chosen interface).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// This node's underlay IPv6 address on a dual-stack network (default: the first global
    /// IPv6 address of the chosen interface).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// Where to write the node's subnet for docker (flannel's subnet.env).
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = "/run/flannel/subnet.env")]
    pub subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires.
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60, value_parser = parse_renew_margin)]
    pub subnet_lease_renew_margin: u64,
    /// TTL of the subnet lease in etcd, in Go's duration form (e.g. 24h, 1h30m, 90m, 30s).
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = parse_duration)]
    pub subnet_lease_ttl: Duration,
    /// Masquerade traffic from the overlay network to destinations outside it.
    #[arg(long, env = "FLANNELD_IP_MASQ", num_args = 0..=1, action = clap::ArgAction::Set, value_parser = parse_go_bool, default_missing_value = "true", default_value = "false")]
    pub ip_masq: bool,
    /// Masquerade without `--random-fully` (nftables: without `fully-random`), as flannel's
    /// flag does; for networks whose firewalls dislike fully random source ports.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", num_args = 0..=1, action = clap::ArgAction::Set, value_parser = parse_go_bool, default_missing_value = "true", default_value = "false")]
    pub ip_masq_fully_random_disable: bool,
    /// Add a blackhole route for this node's subnet (flannel's flag): traffic to it is
    /// dropped here while no bridge holds the subnet, instead of leaving by the default route.
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", num_args = 0..=1, action = clap::ArgAction::Set, value_parser = parse_go_bool, default_missing_value = "true", default_value = "false")]
    pub ip_blackhole_route: bool,
    /// Address to serve /healthz on (with --healthz-port), IPv4 or IPv6.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: std::net::IpAddr,
    /// Port to serve /healthz on (0: off).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0, value_parser = parse_go_u16)]
    pub healthz_port: u16,
    /// Add flannel's FLANNEL-FWD rules accepting overlay traffic in FORWARD (needed when
    /// docker sets FORWARD's policy to DROP).
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", num_args = 0..=1, action = clap::ArgAction::Set, value_parser = parse_go_bool, default_missing_value = "true", default_value = "true")]
    pub iptables_forward_rules: bool,
    /// Opt-in: tunnel datagrams to and from this node's tunnel address and port skip
    /// connection tracking (a raw-table NOTRACK rule, in iptables or nftables as flannel's
    /// other rules, kept and removed with them). Saves conntrack's work per datagram; the
    /// containers' flows keep theirs (the kernel resets it on decapsulation). But an INPUT
    /// chain that accepts the tunnel port only as `--ctstate NEW,ESTABLISHED` before a DROP
    /// policy then drops the tunnel: accept it by port, or `--ctstate UNTRACKED` too.
    #[arg(long, env = "FLANNELD_NOTRACK_TUNNEL", num_args = 0..=1, action = clap::ArgAction::Set, value_parser = parse_go_bool, default_missing_value = "true", default_value = "false")]
    pub notrack_tunnel: bool,
    /// Seconds between checks that the iptables rules are still in place.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5, value_parser = parse_go_u64)]
    pub iptables_resync: u64,
    /// Where the checks of arriving tunnel frames run: `auto` and `tc` attach to TC ingress on
    /// the underlay. `xdp` (only when asked for) runs them earlier, before an skb exists, but
    /// attaching native XDP costs the whole NIC: virtio_net (every KVM cloud VM) turns its
    /// receive offloads (LRO, checksum) off for all traffic, and on veth the peer loses GSO.
    /// The kernel's vxlan device decapsulates after GRO either way.
    #[arg(long, env = "FLANNELD_DECAP_HOOK", value_enum, default_value = "auto")]
    pub decap_hook: DecapHook,
    /// How checked tunnel frames reach containers; every choice hands the inner packet to
    /// the host on the overlay device, so it crosses the host's netfilter (conntrack, NAT,
    /// FORWARD) and rp_filter as on a stock flannel node, both directions of every flow.
    /// `kernel` (vxlan): the kernel's vxlan device decapsulates, as on a stock flannel node
    /// (the udp backend has none and does as `stack`). `stack` (TC): decapsulated here and
    /// handed to the overlay device. The tunnel datagrams themselves cross the node's
    /// PREROUTING and INPUT rules with `kernel` (as with flannel), not with `stack`. No mode
    /// skips netfilter for the containers' traffic. (`split` is retired and runs `kernel`.)
    #[arg(long, env = "FLANNELD_DECAP_DELIVERY", value_enum, default_value = "kernel")]
    pub decap_delivery: DecapDelivery,
    /// Which inner source addresses a peer's tunnel frames may carry. `strict`: one in a
    /// subnet the sending peer leases, so that no node (or anything that reaches the underlay
    /// as it) can send as another node's containers. `peer`: any address, from a known peer,
    /// as a stock flannel node takes them (traffic from clients routed through a peer, or from
    /// a peer's host processes bound to another address); the price is that a compromised or
    /// misconfigured node can then reach this node's containers with any source address, so
    /// rules that trust source addresses (network policies, allow lists) no longer hold
    /// across nodes. Frames from non-peers, and for other nodes' subnets, are dropped either way.
    #[arg(long, env = "FLANNELD_INNER_SOURCE_CHECK", value_enum, default_value = "strict")]
    pub inner_source_check: crate::datapath::dataplane::InnerSourceCheck,
    /// How TC programs are attached: TCX where the kernel has it (Linux 6.6), else cls_bpf
    /// filters under clsact. Hidden: `legacy` tests the older kernels' path on newer ones.
    #[arg(long, env = "FLANNELD_TC_ATTACH", value_enum, default_value = "auto", hide = true)]
    pub tc_attach: crate::datapath::attach::TcAttachChoice,
    /// How the socket guard runs: its program where the kernel can run it (Linux 5.17), else
    /// the same rule in the firewall. Hidden: `firewall` tests the older kernels' path.
    #[arg(long, env = "FLANNELD_GUARD", value_enum, default_value = "auto", hide = true)]
    pub guard: crate::datapath::attach::GuardChoice,
    /// Behave as on a kernel where the eBPF data plane cannot run at all: the node runs as a
    /// stock flannel vxlan node on the kernel device (hidden; for tests of that path).
    #[arg(long, env = "FLANNELD_EBPF_UNAVAILABLE", num_args = 0..=1, action = clap::ArgAction::Set, value_parser = parse_go_bool, default_missing_value = "true", default_value = "false", hide = true)]
    pub ebpf_unavailable: bool,
    /// Capacity of the route map: remote subnets the node can route to.
    #[arg(long, env = "FLANNELD_MAX_ROUTES", default_value_t = overlay_common::MAX_ROUTES)]
    pub max_routes: u32,
    /// Capacity of the peer map: remote nodes the node accepts tunnel frames from. Allocated
    /// at load, per CPU: about max-peers x (32 B x CPUs + 64 B), 33 MiB at the default on 64 CPUs.
    #[arg(long, env = "FLANNELD_MAX_PEERS", default_value_t = overlay_common::MAX_PEERS)]
    pub max_peers: u32,
    /// The data plane: eBPF programs, or a TUN device with a userspace forwarder (flannel's udp
    /// backend design; needs Backend.Type udp; forwarding stops when the agent exits).
    #[arg(long, env = "FLANNELD_DATAPLANE", value_enum, default_value = "ebpf")]
    pub dataplane: crate::daemon::DataplaneKind,

    /// Static mode (no etcd): the whole overlay network, e.g. 10.244.0.0/16.
    #[arg(long, env = "FLANNELD_NETWORK", requires = "subnet", help_heading = "Static mode (without etcd)")]
    pub network: Option<Ipv4Net>,
    /// Static mode: this node's subnet of the network, e.g. 10.244.1.0/24.
    #[arg(long, env = "FLANNELD_SUBNET", requires = "network", help_heading = "Static mode (without etcd)")]
    pub subnet: Option<Ipv4Net>,
    /// Static mode: encapsulation.
    #[arg(long, env = "FLANNELD_BACKEND", value_enum, default_value = "vxlan", help_heading = "Static mode (without etcd)")]
    pub backend: Backend,
    /// Static mode: VXLAN network identifier.
    #[arg(long, env = "FLANNELD_VNI", default_value_t = DEFAULT_VNI, help_heading = "Static mode (without etcd)")]
    pub vni: u32,
    /// Static mode: UDP port [default: 8472 for vxlan, 8285 for udp].
    #[arg(long, env = "FLANNELD_PORT", help_heading = "Static mode (without etcd)")]
    pub port: Option<u16>,
    /// Static mode: overlay device name [default: flannel.<VNI> for vxlan, flannel0 for udp].
    #[arg(long, env = "FLANNELD_DEVICE", help_heading = "Static mode (without etcd)")]
    pub device: Option<String>,
    /// Static mode: the overlay device's MTU [default: underlay MTU - 50 (vxlan) or - 28
    /// (udp)]. (In etcd mode flannel's Backend.MTU gives the underlay's MTU instead.)
    #[arg(long, env = "FLANNELD_MTU", help_heading = "Static mode (without etcd)")]
    pub mtu: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the route table (subnet -> peer) from the pinned maps.
    Routes,
    /// Print the data plane's counters, by outcome and by peer, from the pinned maps.
    Stats,
    /// Stream the data plane's drops as they happen: reason, hook, tunnel addresses and the
    /// inner packet's addresses and ports (and, as `queued`, packets sent towards a next hop
    /// whose link-layer address is unresolved: lost if it never answers). The programs write these events only while a
    /// monitor listens (and at most 1000 per CPU per second).
    Monitor {
        /// Also show accepted and encapsulated packets, one in --sample.
        #[arg(long)]
        decisions: bool,
        /// With --decisions: show one packet in this many.
        #[arg(long, default_value_t = 100)]
        sample: u32,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Exit 0 if the data plane is up (config written, programs attached), 1 otherwise.
    Status,
    /// Add, replace or remove routes by hand (the etcd control plane does this normally).
    #[command(subcommand)]
    Route(RouteCommand),
    /// Remove everything the agent made: links, pinned maps, overlay device and route.
    Teardown {
        /// Roll back to flanneld instead: remove only what is ours (programs, pinned maps, the
        /// guard's and NOTRACK's rules, our network route) and leave what a flanneld started
        /// next adopts: the vxlan device, flannel's forwarding and neighbour entries and
        /// per-peer routes (written from the route map first, so no packet is lost), flannel's
        /// firewall chains and the subnet file. Stop the agent first.
        #[arg(long)]
        leave_kernel_state: bool,
    },
    /// Read, write or check the network config in etcd (`<prefix>/config`).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// List the subnet leases in etcd: subnet, node address, backend, VtepMAC, time left.
    Leases,
    /// Write docker daemon options from the subnet file, as flannel's mk-docker-opts.sh does
    /// (for the flanneld unit's ExecStartPost).
    MkDockerOpts(crate::docker_opts::DockerOptsArgs),
    /// Install the CNI plugin (this executable, as `flannel`) and kube-flannel's conflist, as
    /// kube-flannel's init containers do: containers of containerd, CRI-O, podman (CNI
    /// backend) and Kubernetes join the overlay through it. A conflist it did not write is
    /// left alone.
    InstallCni(InstallCniArgs),
    /// Show one lease in etcd.
    Lease {
        /// The lease's subnet, e.g. 172.17.98.0/24 (or its key form 172.17.98.0-24).
        subnet: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the network config stored in etcd.
    Get,
    /// Validate and store a network config (JSON argument, or --file).
    Set {
        json: Option<String>,
        #[arg(long, conflicts_with = "json")]
        file: Option<PathBuf>,
    },
    /// Check a network config (JSON argument, --file, or the one in etcd) and print it with
    /// flannel's defaults filled in.
    Validate {
        json: Option<String>,
        #[arg(long, conflicts_with = "json")]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Route SUBNET to the node at --public-ip.
    Add {
        subnet: Ipv4Net,
        /// The peer's underlay address.
        #[arg(long)]
        public_ip: Ipv4Addr,
        /// The peer's VTEP MAC (vxlan): the inner destination MAC its device accepts.
        #[arg(long, value_parser = parse_mac_arg)]
        vtep_mac: Option<[u8; 6]>,
    },
    /// Remove the route for SUBNET.
    Del { subnet: Ipv4Net },
}

fn parse_mac_arg(s: &str) -> std::result::Result<[u8; 6], String> {
    crate::netdev::parse_mac(s).ok_or_else(|| format!("{s:?} is not a MAC address like c6:d2:32:6f:8f:44"))
}

impl RunArgs {
    /// How to choose the underlay interface (--iface, --iface-regex, --iface-can-reach).
    pub fn iface_choice(&self) -> crate::netdev::IfaceChoice {
        crate::netdev::IfaceChoice { iface: self.iface.clone(), regex: self.iface_regex.clone(), can_reach: self.iface_can_reach }
    }

    /// Options of the etcd-driven agent.
    pub fn daemon_options(&self, etcd: &EtcdArgs, bpffs_dir: PathBuf) -> DaemonOptions {
        DaemonOptions {
            etcd: etcd.options(),
            iface: self.iface_choice(),
            public_ip: self.public_ip,
            public_ipv6: self.public_ipv6,
            subnet_file: self.subnet_file.clone(),
            lease_ttl: self.subnet_lease_ttl,
            renew_margin: Duration::from_secs(self.subnet_lease_renew_margin * 60),
            decap_hook: self.decap_hook,
            bpffs_dir,
            ip_masq: self.ip_masq,
            masq_random: crate::iptables::MasqRandom::choose(self.ip_masq_fully_random_disable),
            blackhole_route: self.ip_blackhole_route,
            forward_rules: self.iptables_forward_rules,
            notrack_tunnel: self.notrack_tunnel,
            iptables_resync: Duration::from_secs(self.iptables_resync.max(1)),
            healthz: (self.healthz_port != 0)
                .then(|| std::net::SocketAddr::from((self.healthz_ip, self.healthz_port))),
            dataplane: self.dataplane,
            delivery: self.decap_delivery.effective(),
            inner_source: self.inner_source_check,
            max_routes: self.max_routes,
            max_peers: self.max_peers,
            tc_attach: self.tc_attach,
            guard: self.guard,
            ebpf_unavailable: self.ebpf_unavailable,
        }
    }

    /// Static mode: resolve defaults and check consistency.
    pub fn node_spec(&self, bpffs_dir: PathBuf) -> Result<NodeSpec> {
        let network = self.network.context("--network is required (e.g. 10.244.0.0/16)")?;
        let subnet = self.subnet.context("--subnet is required (e.g. 10.244.1.0/24)")?;
        if network.network() != network.addr() {
            bail!("--network {network} has host bits set; did you mean {}?", network.trunc());
        }
        if subnet.network() != subnet.addr() {
            bail!("--subnet {subnet} has host bits set; did you mean {}?", subnet.trunc());
        }
        if !network.contains(&subnet) || subnet.prefix_len() <= network.prefix_len() {
            bail!("--subnet {subnet} must be a smaller subnet inside --network {network}");
        }
        if self.vni > 0x00ff_ffff {
            bail!("--vni {} does not fit in VXLAN's 24 bits", self.vni);
        }
        let mode = EncapMode::from(self.backend);
        let u = crate::netdev::resolve_interface(&self.iface_choice(), self.public_ip)?;
        let (iface, public_ip, underlay_ip) = (u.iface, u.public_ip, u.tunnel_ip);
        let (port, device) = match mode {
            EncapMode::Vxlan => (DEFAULT_VXLAN_PORT, format!("flannel.{}", self.vni)),
            EncapMode::Udp => (DEFAULT_UDP_PORT, "flannel0".to_string()),
            // Static mode's --backend offers vxlan and udp only.
            EncapMode::Ipip => (0, crate::dataplane::IPIP_DEVICE.to_string()),
        };
        Ok(NodeSpec {
            iface,
            public_ip,
            underlay_ip,
            network,
            subnet,
            mode,
            vni: self.vni,
            port: self.port.unwrap_or(port),
            device: self.device.clone().unwrap_or(device),
            decap_hook: self.decap_hook,
            bpffs_dir,
            mtu: self.mtu.map(crate::dataplane::MtuAsked::Overlay),
            delivery: self.decap_delivery.effective(),
            inner_source: self.inner_source_check,
            flannel_peers: Vec::new(),
            max_routes: self.max_routes,
            max_peers: self.max_peers,
            tc_attach: self.tc_attach,
            guard: self.guard,
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct InstallCniArgs {
    /// Where the runtime looks for CNI plugins (kube-flannel's /opt/cni/bin; Debian's
    /// plugins live in /usr/lib/cni).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: std::path::PathBuf,
    /// Where the runtime reads network configurations.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: std::path::PathBuf,
    /// The conflist's file name (kube-flannel's).
    #[arg(long, default_value = "10-flannel.conflist")]
    pub conf_name: String,
    /// The subnet file the agent writes (written into the conflist when not flannel's default).
    #[arg(long, default_value = crate::cni::DEFAULT_SUBNET_FILE)]
    pub subnet_file: std::path::PathBuf,
    /// Where the plugin keeps each container's delegate configuration.
    #[arg(long, default_value = crate::cni::DEFAULT_DATA_DIR)]
    pub data_dir: std::path::PathBuf,
    /// Replace a conflist of that name that this command did not write.
    #[arg(long)]
    pub force: bool,
}

#[cfg(test)]
mod tests;
