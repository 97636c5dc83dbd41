//! Command line: running the agent (flanneld's place) and the admin subcommands.

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

/// flanneld's boolean and integer flags: a `FLANNELD_` value that Go's flag package cannot
/// parse still sets them, to false or 0 (what strconv returns), and flanneld only logs it.
const GO_BOOL_FLAGS: [&str; 6] =
    ["ip-masq", "ip-masq-fully-random-disable", "iptables-forward-rules", "ip-blackhole-route", "kube-subnet-mgr", "set-node-network-unavailable"];
const GO_INT_FLAGS: [&str; 4] = ["subnet-lease-renew-margin", "healthz-port", "iptables-resync", "v"];

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

/// Whether `arg`'s own value parser takes each of `values` (the reason if not).
fn check_values(arg: &clap::Arg, values: &[String]) -> std::result::Result<(), String> {
    let probe = clap::Command::new("env")
        .no_binary_name(true)
        .arg(clap::Arg::new("value").long("value").action(clap::ArgAction::Set).allow_hyphen_values(true).value_parser(arg.get_value_parser().clone()));
    for v in values {
        if let Err(e) = probe.clone().try_get_matches_from([format!("--value={v}")]) {
            return Err(std::error::Error::source(&e).map_or_else(|| e.kind().to_string(), |s| s.to_string()));
        }
    }
    Ok(())
}

/// An integer as Go's flag package reads one (strconv.ParseInt with base 0): an optional
/// sign, then decimal, `0x`/`0X` hex, `0o`/`0O` or a leading `0` octal, or `0b`/`0B` binary,
/// with `_` allowed between digits.
pub fn parse_go_int(s: &str) -> std::result::Result<i64, String> {
    let bad = || format!("{s:?} is not an integer");
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = body.to_ascii_lowercase();
    let (radix, digits) = if let Some(d) = lower.strip_prefix("0x") {
        (16, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0o") {
        (8, d.to_string())
    } else if let Some(d) = lower.strip_prefix("0b") {
        (2, d.to_string())
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, lower[1..].to_string())
    } else {
        (10, lower.clone())
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return Err(bad());
    }
    let v = i64::from_str_radix(&digits.replace('_', ""), radix).map_err(|_| bad())?;
    Ok(if neg { -v } else { v })
}

fn go_int_in<T: TryFrom<i64>>(s: &str) -> std::result::Result<T, String> {
    let v = parse_go_int(s)?;
    T::try_from(v).map_err(|_| format!("{v} is out of range"))
}

fn parse_go_u16(s: &str) -> std::result::Result<u16, String> {
    go_int_in(s)
}

fn parse_go_u64(s: &str) -> std::result::Result<u64, String> {
    go_int_in(s)
}

fn parse_go_i32(s: &str) -> std::result::Result<i32, String> {
    go_int_in(s)
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

/// A duration in Go's `time.ParseDuration` form, as flannel's Go flags take them: numbers
/// with optional fractions, each with a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), e.g.
/// `24h`, `1h30m`, `1.5h`, `300ms`; a plain number is seconds (this agent's earlier form).
/// A lease TTL must be positive (and at least a second: etcd's TTLs are whole seconds).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 24h, 1h30m, 1.5h or 300ms");
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().map_err(|_| bad())?;
        return positive(Duration::from_secs(secs));
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(|| format!("{s:?}: a number needs a unit (ns, us, ms, s, m, h)"))?;
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(bad());
        }
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)")),
        };
        total += value * scale;
        rest = tail;
    }
    if !total.is_finite() || total > u32::MAX as f64 {
        return Err(format!("{s:?} is too long"));
    }
    positive(Duration::from_secs_f64(total))
}

fn positive(d: Duration) -> std::result::Result<Duration, String> {
    if d < Duration::from_secs(1) {
        return Err("a lease TTL must be at least 1s (etcd counts whole seconds)".into());
    }
    Ok(d)
}

fn parse_regex(s: &str) -> std::result::Result<regex::Regex, String> {
    regex::Regex::new(s).map_err(|e| format!("--iface-regex {s:?}: {e}"))
}

/// A boolean as Go's flag package reads one (strconv.ParseBool): 1, t, T, TRUE, true, True,
/// 0, f, F, FALSE, false, False. flanneld's unit files and FLANNELD_ variables use them all.
pub fn parse_go_bool(s: &str) -> std::result::Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)")),
    }
}

/// flannel's range for --subnet-lease-renew-margin: 1 to 1439 minutes (less than a day).
fn parse_renew_margin(s: &str) -> std::result::Result<u64, String> {
    let m = parse_go_int(s).map_err(|_| format!("{s:?} is not a number of minutes"))?;
    if !(1..24 * 60).contains(&m) {
        return Err(format!("{m} is out of range: the renew margin is 1 to 1439 minutes, as flannel's"));
    }
    Ok(m as u64)
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

/// Accept Go's flag syntax as flanneld users write it: `-etcd-cafile=F` and `-ip-masq` mean
/// `--etcd-cafile=F` and `--ip-masq`. Only single-dash words naming one of our long flags are
/// rewritten; short flags (`-h`) and values are left alone.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    fn longs(cmd: &clap::Command, out: &mut Vec<String>) {
        out.extend(cmd.get_arguments().filter_map(|a| a.get_long().map(str::to_string)));
        for sub in cmd.get_subcommands() {
            longs(sub, out);
        }
    }
    let mut known = Vec::new();
    longs(&Cli::command(), &mut known);
    known.extend(["help".to_string(), "version".to_string()]);
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let Some(s) = a.to_str() else { return a };
            if i == 0 || s.starts_with("--") || !s.starts_with('-') || s.len() <= 2 {
                return a;
            }
            let name = s[1..].split('=').next().unwrap_or("");
            if known.iter().any(|k| k == name) {
                OsString::from(format!("-{s}"))
            } else {
                a
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &[&str]) -> Result<NodeSpec> {
        let mut argv = vec!["overlay-agent", "--iface", "eth0", "--public-ip", "192.168.1.10"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv)?;
        cli.run.node_spec(cli.bpffs_dir)
    }

    #[test]
    fn defaults_follow_flannel() {
        let s = spec(&["--network", "10.244.0.0/16", "--subnet", "10.244.3.0/24"]).unwrap();
        assert_eq!((s.mode, s.vni, s.port, s.device.as_str()), (EncapMode::Vxlan, 1, 8472, "flannel.1"));
        assert_eq!(s.bpffs_dir, PathBuf::from("/sys/fs/bpf/overlay"));
        assert_eq!(s.decap_hook, DecapHook::Auto);
        let s = spec(&["--network", "10.244.0.0/16", "--subnet", "10.244.3.0/24", "--backend", "udp"]).unwrap();
        assert_eq!((s.mode, s.port, s.device.as_str()), (EncapMode::Udp, 8285, "flannel0"));
        let s = spec(&["--network", "10.244.0.0/16", "--subnet", "10.244.3.0/24", "--vni", "42"]).unwrap();
        assert_eq!(s.device, "flannel.42");
    }

    #[test]
    fn inconsistent_networks_are_refused_with_the_flag_named() {
        let cases = [
            (vec!["--network", "10.244.0.0/16", "--subnet", "10.245.1.0/24"], "inside --network"),
            (vec!["--network", "10.244.0.0/16", "--subnet", "10.244.0.0/16"], "smaller subnet"),
            (vec!["--network", "10.244.0.1/16", "--subnet", "10.244.1.0/24"], "--network 10.244.0.1/16 has host bits"),
            (vec!["--network", "10.244.0.0/16", "--subnet", "10.244.1.7/24"], "--subnet 10.244.1.7/24 has host bits"),
            (vec!["--subnet", "10.244.1.0/24"], "--network"),
            (vec!["--network", "10.244.0.0/16"], "--subnet"),
            (vec!["--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--vni", "16777216"], "24 bits"),
        ];
        for (args, want) in cases {
            let err = format!("{:#}", spec(&args).expect_err(&format!("{args:?} must be refused")));
            assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        }
    }

    fn parse(args: &[&str]) -> Cli {
        let argv = normalize_args(args.iter().map(OsString::from));
        Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// `--iface-can-reach` and `--healthz-ip` take either family, as flanneld's.
    #[test]
    fn addresses_of_either_family_where_flanneld_takes_them() {
        let cli = parse(&["overlay-agent", "--iface-can-reach=fd00:64::1", "--healthz-ip=::1", "--healthz-port=8471"]);
        assert_eq!(cli.run.iface_can_reach, Some("fd00:64::1".parse().unwrap()));
        let opts = cli.run.daemon_options(&cli.etcd, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(opts.healthz, Some("[::1]:8471".parse().unwrap()));
        assert_eq!(parse(&["overlay-agent", "--iface-can-reach=10.0.0.1"]).run.iface_can_reach, Some("10.0.0.1".parse().unwrap()));
    }

    /// flanneld's Kubernetes-mode flags: a clear refusal naming them, from the command line
    /// or a FLANNELD_ variable; `--net-config-path` taken and ignored with a note.
    #[test]
    fn kubernetes_mode_flags_are_refused_with_what_to_do() {
        let with_env = |vars: &[(&str, &str)], args: &[&str]| {
            let vars: std::collections::BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let argv = std::iter::once("overlay-agent").chain(args.iter().copied()).map(OsString::from);
            super::parse_with_env(argv, |n| vars.get(n).map(OsString::from)).unwrap_or_else(|e| panic!("{args:?}: {e}")).0
        };
        let why = parse(&["overlay-agent", "--kube-subnet-mgr", "--ip-masq"]).kube.refusal().expect("refused");
        assert!(why.starts_with("--kube-subnet-mgr: ") && why.contains("etcd mode") && why.contains("docs/kubernetes.md"), "{why}");
        let why = parse(&["overlay-agent", "-kube-subnet-mgr=true", "-kubeconfig-file=/k", "--kube-api-url", "https://api:6443", "--kube-annotation-prefix=x", "--set-node-network-unavailable=false"])
            .kube
            .refusal()
            .expect("refused");
        assert!(why.starts_with("--kube-subnet-mgr, --kubeconfig-file, --kube-api-url, --kube-annotation-prefix, --set-node-network-unavailable: "), "{why}");
        assert!(with_env(&[("FLANNELD_KUBE_SUBNET_MGR", "true")], &[]).kube.refusal().is_some(), "from its variable too");
        // flanneld's default, said out loud, is etcd mode.
        assert_eq!(parse(&["overlay-agent", "--kube-subnet-mgr=false"]).kube.refusal(), None);
        let cli = parse(&["overlay-agent", "--net-config-path", "/etc/kube-flannel/net-conf.json"]);
        assert_eq!(cli.kube.refusal(), None);
        assert!(cli.kube.notes()[0].contains("ignored"), "{:?}", cli.kube.notes());
        assert!(parse(&["overlay-agent"]).kube.notes().is_empty());
    }

    #[test]
    fn the_seeds_option_string_parses_go_style() {
        let cli = parse(&[
            "overlay-agent", "--ip-masq",
            "--etcd-endpoints=https://192.168.1.251:2379,https://192.168.1.252:2379,https://192.168.1.253:2379",
            "-etcd-cafile=/opt/kubernetes/ssl/ca.pem", "--etcd-certfile=/opt/kubernetes/ssl/server.pem",
            "--etcd-keyfile=/opt/kubernetes/ssl/server-key.pem",
        ]);
        assert!(cli.run.ip_masq);
        assert_eq!(cli.etcd.etcd_endpoints.len(), 3);
        assert_eq!(cli.etcd.etcd_endpoints[1], "https://192.168.1.252:2379");
        assert_eq!(cli.etcd.etcd_cafile, Some(PathBuf::from("/opt/kubernetes/ssl/ca.pem")));
        assert_eq!(cli.etcd.etcd_keyfile, Some(PathBuf::from("/opt/kubernetes/ssl/server-key.pem")));
        assert!(cli.command.is_none());
    }

    #[test]
    fn go_style_and_gnu_style_flags_mean_the_same() {
        let a = parse(&["overlay-agent", "-etcd-prefix=/x", "-iface", "eth1", "-ip-masq=false", "-subnet-lease-renew-margin=5"]);
        let b = parse(&["overlay-agent", "--etcd-prefix", "/x", "--iface=eth1", "--subnet-lease-renew-margin", "5"]);
        assert_eq!(a.etcd.etcd_prefix, "/x");
        assert_eq!(a.etcd.etcd_prefix, b.etcd.etcd_prefix);
        assert_eq!(a.run.iface, b.run.iface);
        assert!(!a.run.ip_masq);
        assert_eq!(a.run.subnet_lease_renew_margin, 5);
        // A value that looks like a flag is not rewritten when it is not one of ours.
        let c = parse(&["overlay-agent", "route", "del", "10.1.0.0/24"]);
        assert!(matches!(c.command, Some(Command::Route(RouteCommand::Del { .. }))));
    }

    #[test]
    fn defaults_are_flanneld_defaults() {
        let cli = parse(&["overlay-agent"]);
        assert_eq!(cli.etcd.etcd_endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(cli.etcd.etcd_prefix, "/coreos.com/network");
        assert_eq!(cli.run.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(cli.run.subnet_lease_renew_margin, 60);
        assert_eq!(cli.run.subnet_lease_ttl, Duration::from_secs(24 * 3600));
        assert!(!cli.run.ip_masq);
    }

    /// Run the calling test `name` again in a child process of this test binary, with `vars`
    /// in the child's environment: no test changes the environment that tests running
    /// beside it read. True in the child (which makes the assertions); in the parent, false
    /// once the child has passed.
    fn in_child_with_env(name: &str, vars: &[(&str, &str)]) -> bool {
        const CHILD: &str = "OVERLAY_AGENT_TEST_CHILD";
        let test = format!("{}::{name}", module_path!().split_once("::").map_or(module_path!(), |(_, m)| m));
        if std::env::var_os(CHILD).is_some_and(|v| v == test.as_str()) {
            return true;
        }
        let exe = std::env::current_exe().expect("the test binary");
        let out = std::process::Command::new(exe)
            .args([test.as_str(), "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD, &test)
            .envs(vars.iter().copied())
            .output()
            .expect("running the test binary again");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{test} failed in its child process:\n{text}");
        assert!(text.contains("1 passed"), "{test} did not run in its child process:\n{text}");
        false
    }

    #[test]
    fn every_flag_can_come_from_a_flanneld_variable() {
        let vars = [("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "17"), ("FLANNELD_IPTABLES_RESYNC", "9")];
        if !in_child_with_env("every_flag_can_come_from_a_flanneld_variable", &vars) {
            return;
        }
        let cli = parse(&["overlay-agent"]);
        assert_eq!(cli.run.subnet_lease_renew_margin, 17);
        assert_eq!(cli.run.iptables_resync, 9);
        // Every long flag of the agent declares its FLANNELD_ variable.
        for a in Cli::command().get_arguments() {
            let Some(long) = a.get_long() else { continue };
            let want = format!("FLANNELD_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(a.get_env().and_then(|e| e.to_str()), Some(want.as_str()), "--{long}");
        }
    }

    /// flanneld's environment, as Go's flagutil.SetFlagsFromEnv reads it into its flags.
    #[test]
    fn flanneld_variables_are_read_as_flanneld_reads_them() {
        let run = |vars: &[(&str, &str)], args: &[&str]| {
            let vars: std::collections::BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let argv = std::iter::once("overlay-agent").chain(args.iter().copied()).map(OsString::from);
            super::parse_with_env(argv, |n| vars.get(n).map(OsString::from))
        };
        let (cli, notes) = run(
            &[
                ("FLANNELD_IP_MASQ", "1"),
                ("FLANNELD_IPTABLES_FORWARD_RULES", "F"),
                ("FLANNELD_IFACE", ""),
                ("FLANNELD_PUBLIC_IP", ""),
                ("FLANNELD_HEALTHZ_PORT", "0x1f90"),
                ("FLANNELD_IPTABLES_RESYNC", "010"),
                ("FLANNELD_V", "3"),
                ("FLANNELD_ETCD_ENDPOINTS", "https://a:2379,https://b:2379"),
            ],
            &[],
        )
        .expect("parses");
        assert!(cli.run.ip_masq, "FLANNELD_IP_MASQ=1 is true");
        assert!(!cli.run.iptables_forward_rules, "FLANNELD_IPTABLES_FORWARD_RULES=F is false");
        assert!(cli.run.iface.is_empty() && cli.run.public_ip.is_none(), "empty variables are unset");
        assert_eq!((cli.run.healthz_port, cli.run.iptables_resync), (8080, 8), "Go's base-0 integers");
        assert_eq!(cli.log.v, Some(3));
        assert_eq!(cli.etcd.etcd_endpoints, vec!["https://a:2379", "https://b:2379"]);
        assert!(notes.is_empty(), "{notes:?}");

        // Go's flag package sets a boolean it cannot parse to false and an integer to 0, and
        // flanneld only logs it: so here, with a note.
        let (cli, notes) = run(&[("FLANNELD_IPTABLES_FORWARD_RULES", "yes"), ("FLANNELD_HEALTHZ_PORT", "eighty")], &[]).expect("parses");
        assert!(!cli.run.iptables_forward_rules, "a bad boolean reads as false, as in flanneld (the default is true)");
        assert_eq!(cli.run.healthz_port, 0);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("FLANNELD_HEALTHZ_PORT: \"eighty\" is not a number") && notes[0].contains("read as 0"), "{notes:?}");
        assert!(notes[1].starts_with("FLANNELD_IPTABLES_FORWARD_RULES: \"yes\" is not a boolean") && notes[1].contains("read as false"), "{notes:?}");
        // 0 is no renew margin: flanneld exits, and so does this.
        let e = run(&[("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "abc")], &[]).expect_err("refused").to_string();
        assert!(e.contains("FLANNELD_SUBNET_LEASE_RENEW_MARGIN: \"abc\" is not a number") && e.contains("reads it as 0"), "{e}");
        // Values flanneld keeps as strings and refuses when it uses them, and this agent's own
        // flags: an error naming the variable.
        for (var, val) in [("FLANNELD_PUBLIC_IP", "banana"), ("FLANNELD_BACKEND", "udpp"), ("FLANNELD_IFACE_CAN_REACH", "10.0.0.300")] {
            let e = run(&[(var, val)], &[]).expect_err(var).to_string();
            assert!(e.contains(&format!("{var}: \"{val}\" is not a value")), "{e}");
        }
        // The command line wins over the environment, a bad variable's too.
        let (cli, notes) = run(
            &[("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "7"), ("FLANNELD_HEALTHZ_PORT", "x"), ("FLANNELD_IP_MASQ", "true")],
            &["-subnet-lease-renew-margin=5", "--healthz-port=8", "-ip-masq=false"],
        )
        .expect("parses");
        assert_eq!((cli.run.subnet_lease_renew_margin, cli.run.healthz_port, cli.run.ip_masq), (5, 8, false));
        assert_eq!(notes.len(), 1, "the bad variable is still noted: {notes:?}");
        // A bad command line is an error; a subcommand goes with any agent variable.
        assert!(run(&[], &["--subnet-lease-renew-margin=abc"]).is_err());
        let (cli, _) = run(&[("FLANNELD_IP_MASQ", "1"), ("FLANNELD_ETCD_PREFIX", "/x")], &["leases"]).expect("parses");
        assert!(matches!(cli.command, Some(Command::Leases)));
        assert_eq!(cli.etcd.etcd_prefix, "/x");
    }

    #[test]
    fn go_integers() {
        for (text, want) in [("0", 0), ("42", 42), ("-7", -7), ("+7", 7), ("0x1F90", 8080), ("010", 8), ("0o17", 15), ("0b101", 5), ("1_000", 1000)] {
            assert_eq!(parse_go_int(text), Ok(want), "{text}");
        }
        for bad in ["", "x", "0x", "1__0", "_1", "1_", "08", "1.5", " 1"] {
            assert!(parse_go_int(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn go_booleans_and_klog_flags_on_the_command_line() {
        let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        for (word, want) in [("1", true), ("t", true), ("T", true), ("TRUE", true), ("true", true), ("True", true),
            ("0", false), ("f", false), ("F", false), ("FALSE", false), ("false", false), ("False", false)] {
            assert_eq!(parse_go_bool(word), Ok(want), "{word}");
            let cli = parse(&["overlay-agent", &format!("-ip-masq={word}"), &format!("--ip-blackhole-route={word}")]);
            assert_eq!((cli.run.ip_masq, cli.run.ip_blackhole_route), (want, want), "{word}");
        }
        for bad in ["yes", "", "2", "tRUE"] {
            assert!(parse_go_bool(bad).is_err(), "{bad:?}");
        }
        // klog's flags, as flanneld's unit files give them.
        for (args, v, filter) in [
            (vec!["overlay-agent", "-v=2"], Some(2), "info,overlay_agent=debug"),
            (vec!["overlay-agent", "-v", "0"], Some(0), "info"),
            (vec!["overlay-agent", "--v=5"], Some(5), "info,overlay_agent=trace"),
            (vec!["overlay-agent"], None, "info"),
            (vec!["overlay-agent", "leases", "-v=1"], Some(1), "info,overlay_agent=debug"),
            (vec!["overlay-agent", "-v=-1"], Some(-1), "info"),
        ] {
            let (cli, _) = super::parse(argv(&args)).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!((cli.log.v, cli.log.filter()), (v, filter), "{args:?}");
        }
        let (cli, _) = super::parse(argv(&["overlay-agent", "-v=2", "-vmodule=main=3,subnet=4", "-log_backtrace_at=main.go:100"])).expect("parses");
        let notes = cli.log.notes();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("-vmodule=main=3,subnet=4") && notes[1].contains("-log_backtrace_at=main.go:100"), "{notes:?}");
        assert!(super::parse(argv(&["overlay-agent", "-v=high"])).is_err());
    }

    /// Cases from Go's time.ParseDuration tests (those a positive TTL can be), and its errors.
    #[test]
    fn lease_ttl_durations_in_gos_form() {
        let secs = |s: &str| parse_duration(s).map(|d| d.as_secs_f64());
        for (text, want) in [
            ("24h", 86400.0), ("90m", 5400.0), ("45", 45.0), ("1h30m", 5400.0), ("1.5h", 5400.0),
            ("2h45m", 9900.0), ("3m30s", 210.0), ("1m0.5s", 60.5), ("1.s", 1.0), ("5s", 5.0), ("1h1m1s", 3661.0),
            ("1500ms", 1.5), ("1000000us", 1.0), ("1000000µs", 1.0), ("1000000000ns", 1.0), (".5m", 30.0),
        ] {
            assert_eq!(secs(text), Ok(want), "{text:?}");
        }
        for bad in ["", "h", "10d", "-5s", "0s", "0", "300ms", ".", ".s", "1..5s", "3", "1hh", "5 s", "s5"] {
            if bad == "3" {
                continue; // a plain number is seconds
            }
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn renew_margin_has_flannels_range() {
        assert_eq!(parse_renew_margin("1"), Ok(1));
        assert_eq!(parse_renew_margin("1439"), Ok(1439));
        for bad in ["0", "1440", "-1", "x", ""] {
            assert!(parse_renew_margin(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn help_never_shows_the_password() {
        if !in_child_with_env("help_never_shows_the_password", &[("FLANNELD_ETCD_PASSWORD", "s3cret-in-env")]) {
            return;
        }
        assert_eq!(std::env::var("FLANNELD_ETCD_PASSWORD").as_deref(), Ok("s3cret-in-env"));
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--etcd-password"));
        assert!(!help.contains("s3cret-in-env"), "{help}");
    }

    #[test]
    fn bad_cidrs_and_macs_are_parse_errors() {
        assert!(Cli::try_parse_from(["overlay-agent", "--network", "10.244.0.0/33"]).is_err());
        assert!(Cli::try_parse_from(["overlay-agent", "--network", "banana"]).is_err());
        let e = Cli::try_parse_from(["overlay-agent", "route", "add", "10.244.2.0/24", "--public-ip", "1.2.3.4", "--vtep-mac", "nope"])
            .expect_err("bad MAC");
        assert!(e.to_string().contains("is not a MAC address"), "{e}");
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
