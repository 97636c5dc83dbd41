//! Command line: running the agent (flanneld's place) and the admin subcommands.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use overlay_common::{EncapMode, DEFAULT_UDP_PORT, DEFAULT_VNI, DEFAULT_VXLAN_PORT};

use crate::dataplane::{DecapHook, NodeSpec};

#[derive(Debug, Parser)]
#[command(
    name = "overlay-agent",
    version,
    about = "Overlay network node agent: flannel's contracts, an eBPF data plane",
    long_about = "Without a subcommand, runs the node agent: creates the overlay device, loads \
        and attaches the eBPF encapsulation (TC egress on the device) and decapsulation (XDP \
        or TC ingress on the underlay), pins them under --bpffs-dir, routes the overlay \
        network to the device and waits for SIGTERM. The data plane keeps forwarding after \
        the agent exits; `teardown` removes it.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Directory on bpffs holding this node's pinned maps and links.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/overlay", env = "OVERLAY_BPFFS_DIR")]
    pub bpffs_dir: PathBuf,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
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

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Underlay interface (default: the interface of the default route).
    #[arg(long, env = "FLANNELD_IFACE")]
    pub iface: Option<String>,
    /// This node's underlay address (default: the first IPv4 address of --iface).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// The whole overlay network (flannel's `Network`), e.g. 10.244.0.0/16.
    #[arg(long)]
    pub network: Option<Ipv4Net>,
    /// This node's subnet of the network, e.g. 10.244.1.0/24.
    #[arg(long)]
    pub subnet: Option<Ipv4Net>,
    /// Encapsulation.
    #[arg(long, value_enum, default_value = "vxlan")]
    pub backend: Backend,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = DEFAULT_VNI)]
    pub vni: u32,
    /// UDP port of the encapsulation [default: 8472 for vxlan, 8285 for udp].
    #[arg(long)]
    pub port: Option<u16>,
    /// Overlay device name [default: flannel.<VNI> for vxlan, flannel0 for udp].
    #[arg(long)]
    pub device: Option<String>,
    /// Where decapsulation runs.
    #[arg(long, value_enum, default_value = "auto")]
    pub decap_hook: DecapHook,
    /// Overlay MTU [default: underlay MTU - 50 (vxlan) or - 28 (udp)].
    #[arg(long)]
    pub mtu: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the route table (subnet -> peer) from the pinned maps.
    Routes,
    /// Print the data plane's counters, by outcome and by peer, from the pinned maps.
    Stats,
    /// Exit 0 if the data plane is up (config written, programs attached), 1 otherwise.
    Status,
    /// Add, replace or remove routes by hand (the etcd control plane does this normally).
    #[command(subcommand)]
    Route(RouteCommand),
    /// Remove everything the agent made: links, pinned maps, overlay device and route.
    Teardown,
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
    /// Resolve defaults and check consistency.
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
        let iface = match &self.iface {
            Some(i) => i.clone(),
            None => crate::netdev::default_route_iface()?,
        };
        let public_ip = match self.public_ip {
            Some(ip) => ip,
            None => crate::netdev::first_ipv4(&iface)?,
        };
        let (port, device) = match mode {
            EncapMode::Vxlan => (DEFAULT_VXLAN_PORT, format!("flannel.{}", self.vni)),
            EncapMode::Udp => (DEFAULT_UDP_PORT, "flannel0".to_string()),
        };
        Ok(NodeSpec {
            iface,
            public_ip,
            network,
            subnet,
            mode,
            vni: self.vni,
            port: self.port.unwrap_or(port),
            device: self.device.clone().unwrap_or(device),
            decap_hook: self.decap_hook,
            bpffs_dir,
            mtu: self.mtu,
        })
    }
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
            (vec!["--subnet", "10.244.1.0/24"], "--network is required"),
            (vec!["--network", "10.244.0.0/16"], "--subnet is required"),
            (vec!["--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--vni", "16777216"], "24 bits"),
        ];
        for (args, want) in cases {
            let err = format!("{:#}", spec(&args).expect_err(&format!("{args:?} must be refused")));
            assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        }
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
