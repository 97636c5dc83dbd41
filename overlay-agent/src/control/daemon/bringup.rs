//! Bringing the node up, in the order flanneld does: the underlay interface and the node's
//! description (`NodeSpec`), a dual-stack node's flannel-v6, what the lease will say, and,
//! once a subnet is held, the data plane (`plan` decides which; the eBPF one falls back to
//! the kernel's device where it cannot run).

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context as _, Result};
use overlay_common::EncapMode;

use super::{
    default_device,
    lease::Held,
    rules::{br_netfilter_warning, BRIDGE_SYSCTLS},
    DaemonOptions, DataplaneKind,
};
use crate::{
    config::NetworkConfig,
    dataplane::{self, NodeSpec},
    datapath::{ipv6::Overlay6, wireguard::WireguardDevice},
    health::AgentState,
    lease::LeaseAttrs,
    maps::Maps,
    netdev,
};

/// Which data plane a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// An IPv6-only network: the kernel's flannel-v6 encapsulates, the programs check.
    Ipv6Only,
    /// host-gw: no device, no programs; peers' subnets are kernel routes.
    HostGw,
    /// The programs encapsulate and check (the vxlan backend falls back to the kernel's
    /// device where they cannot run).
    Ebpf,
    /// A TUN device and a userspace forwarder (flannel's udp backend design).
    Tun,
    /// wireguard: the kernel's flannel-wg, a peer per lease; no programs.
    Wireguard,
}

/// The data plane for `kind` (`--dataplane`) and the network config, or why the two do not
/// go together.
pub(super) fn plan(kind: DataplaneKind, cfg: &NetworkConfig) -> Result<Plan> {
    if kind == DataplaneKind::Tun && !cfg.enable_ipv4 {
        bail!("--dataplane tun carries IPv4 only; an IPv6-only network (EnableIPv4 false) runs on the eBPF data plane (leave --dataplane at ebpf)");
    }
    if kind == DataplaneKind::Tun && cfg.backend.type_name() != "udp" {
        bail!("--dataplane tun implements flannel's udp backend; the network config has Backend.Type {:?} (set \"udp\")", cfg.backend.type_name());
    }
    Ok(if cfg.backend.wireguard.is_some() {
        Plan::Wireguard
    } else if !cfg.enable_ipv4 {
        Plan::Ipv6Only
    } else if cfg.backend.host_gw {
        Plan::HostGw
    } else if kind == DataplaneKind::Tun {
        Plan::Tun
    } else {
        Plan::Ebpf
    })
}

/// The node as the data plane sees it, on `underlay` (interface, public address, tunnel
/// address), before a subnet is held (`subnet` is the network's until then).
pub(super) fn node_spec(opts: &DaemonOptions, cfg: &NetworkConfig, (iface, public_ip, underlay_ip): (String, Ipv4Addr, Ipv4Addr)) -> NodeSpec {
    let mode = cfg.backend.mode;
    NodeSpec {
        iface,
        public_ip,
        underlay_ip,
        network: cfg.network,
        subnet: cfg.network, // replaced by the leased subnet
        mode,
        vni: cfg.backend.vni,
        port: cfg.backend.port,
        // An IPv6-only node's one overlay device is flannel-v6's (flannel-wg-v6's).
        device: match (cfg.enable_ipv4, cfg.backend.wireguard) {
            (true, Some(_)) => crate::wireguard::DEVICE.to_string(),
            (true, None) => default_device(mode, cfg.backend.vni),
            (false, Some(_)) if !cfg.wireguard_joint() => crate::wireguard::DEVICE_V6.to_string(),
            (false, Some(_)) => crate::wireguard::DEVICE.to_string(),
            (false, None) => crate::datapath::ipv6::device_name(cfg.backend.vni),
        },
        decap_hook: opts.decap_hook,
        bpffs_dir: opts.bpffs_dir.clone(),
        mtu: cfg.backend.mtu.map(dataplane::MtuAsked::Underlay),
        delivery: opts.delivery,
        inner_source: opts.inner_source,
        flannel_peers: Vec::new(),
        max_routes: opts.max_routes,
        max_peers: opts.max_peers,
        tc_attach: opts.tc_attach,
        guard: opts.guard,
    }
}

/// The underlay interface `--iface` and the config choose, the node's description on it,
/// the data plane it will run, and the public IPv6 address if one was given or found.
/// Refuses a `--dataplane` the network cannot run.
pub(super) fn underlay(opts: &DaemonOptions, cfg: &NetworkConfig) -> Result<(NodeSpec, Plan, Option<Ipv6Addr>)> {
    // An IPv6-only node has no IPv4 address to announce: its interface is chosen by its IPv6
    // address, and its lease says PublicIP 0.0.0.0, as flannel's.
    let (iface, public_ip, underlay_ip, public_ipv6) = if cfg.enable_ipv4 {
        let u = netdev::resolve_interface(&opts.iface, opts.public_ip)?;
        (u.iface, u.public_ip, u.tunnel_ip, opts.public_ipv6)
    } else {
        if opts.public_ip.is_some() {
            tracing::warn!("--public-ip is ignored: the network is IPv6-only (EnableIPv4 false); --public-ipv6 gives the address");
        }
        let (iface, ip6) = netdev::resolve_interface6(&opts.iface, opts.public_ipv6)?;
        (iface, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Some(ip6))
    };
    tracing::info!(%iface, %public_ip, tunnel_endpoint = %underlay_ip, public_ipv6 = ?public_ipv6.map(|a| a.to_string()), "underlay interface chosen");
    if let Some(w) = br_netfilter_warning(std::path::Path::new(BRIDGE_SYSCTLS), cfg.enable_ipv4, cfg.ipv6.is_some(), cfg.enable_nftables) {
        tracing::warn!("{w}");
    }
    if opts.notrack_tunnel && cfg.backend.mode == EncapMode::Ipip {
        tracing::warn!("--notrack-tunnel is for the UDP tunnels (vxlan, udp): IP-in-IP keeps its connection tracking");
    }
    let spec = node_spec(opts, cfg, (iface, public_ip, underlay_ip));
    let plan = plan(opts.dataplane, cfg)?;
    Ok((spec, plan, public_ipv6))
}

/// The node's public IPv6 address in a network with IPv6: `--public-ipv6`, else the
/// underlay's first global one.
pub(super) fn public_ipv6(cfg: &NetworkConfig, spec: &NodeSpec, public_ipv6: Option<Ipv6Addr>) -> Result<Option<Ipv6Addr>> {
    if cfg.ipv6.is_none() {
        return Ok(None);
    }
    Ok(Some(match public_ipv6 {
        Some(a) => a,
        None => netdev::first_ipv6(&spec.iface)?
            .with_context(|| format!("EnableIPv6 is set but {} has no global IPv6 address: give it one or pass --public-ipv6", spec.iface))?,
    }))
}

/// Dual stack and IPv6-only: flannel-v6.<VNI> on the node's public IPv6 address (a wireguard
/// node's IPv6 side is flannel-wg-v6 instead, made with its peers in `wireguard_v6`).
pub(super) fn ipv6_overlay(cfg: &NetworkConfig, spec: &NodeSpec, public_ipv6: Option<Ipv6Addr>) -> Result<Option<Overlay6>> {
    if cfg.backend.wireguard.is_some() {
        return Ok(None);
    }
    Ok(match cfg.ipv6 {
        Some(_) => {
            let public_ipv6 = self::public_ipv6(cfg, spec, public_ipv6)?.expect("the network has IPv6");
            let o6 = crate::datapath::ipv6::Overlay6::up(cfg.backend.vni, cfg.backend.port, public_ipv6, &spec.iface, cfg.backend.mtu)?;
            let stack = if cfg.enable_ipv4 { "dual stack" } else { "IPv6-only" };
            tracing::info!(device = %o6.device, %public_ipv6, vtep_mac = %netdev::format_mac(&o6.mac), mtu = o6.mtu, "IPv6 overlay device up ({stack})");
            Some(o6)
        }
        None => None,
    })
}

/// What the lease says: the IPv4 side's (its device's MAC, the device made here, with the
/// peers a flanneld before us left on it kept in `spec`), and flannel-v6's address and MAC on
/// a dual-stack node; an IPv6-only node's has only the latter. A wireguard node's device,
/// made here for its public key, is handed on to `dataplane`.
pub(super) fn lease_attrs(
    cfg: &NetworkConfig,
    spec: &mut NodeSpec,
    v6: Option<&Overlay6>,
    wireguard_ipv6: Option<Ipv6Addr>,
) -> Result<(LeaseAttrs, Option<WireguardDevice>)> {
    let public_ip = spec.public_ip;
    let mut wireguard = None;
    let attrs = match (v6, cfg.backend.mode) {
        (Some(o6), _) if !cfg.enable_ipv4 => LeaseAttrs::vxlan_ipv6_only(o6.public_ip, cfg.backend.vni, o6.mac),
        _ if cfg.backend.host_gw => LeaseAttrs::host_gw(public_ip),
        // flannel-wg and its key before the lease: the lease announces the public key.
        // IPv6-only: flannel-wg-v6 alone; the lease has only the IPv6 side.
        _ if cfg.backend.wireguard.is_some() && !cfg.enable_ipv4 => {
            let w = cfg.backend.wireguard.expect("checked");
            let ip6 = wireguard_ipv6.context("an IPv6-only node has a public IPv6 address")?;
            // flannel-wg-v6 in Mode separate, flannel-wg (ListenPort) in the others, as flannel.
            let key_file = crate::datapath::wireguard::key_file();
            let dev = match cfg.wireguard_joint() {
                false => crate::datapath::wireguard::prepare_v6_only(&w, &key_file)?,
                true => crate::datapath::wireguard::prepare(&w, &key_file)?,
            };
            let attrs = LeaseAttrs::wireguard_ipv6_only(ip6, &dev.public_key, v6_port(cfg));
            wireguard = Some(dev);
            attrs
        }
        _ if cfg.backend.wireguard.is_some() => {
            let w = cfg.backend.wireguard.expect("checked");
            let dev = crate::datapath::wireguard::prepare(&w, &crate::datapath::wireguard::key_file())?;
            let mut attrs = LeaseAttrs::wireguard(public_ip, &dev.public_key, w.listen_port);
            // Dual stack (Mode separate): the IPv6 side announces the same key and ListenPortV6.
            if let Some(ip6) = wireguard_ipv6 {
                attrs = attrs.with_wireguard_v6(ip6, &dev.public_key, v6_port(cfg));
            }
            wireguard = Some(dev);
            attrs
        }
        (_, EncapMode::Vxlan) => {
            let (_, device, _, flannel_peers) = dataplane::prepare_device(spec)?;
            spec.flannel_peers = flannel_peers;
            LeaseAttrs::vxlan(public_ip, cfg.backend.vni, device.mac)
        }
        (_, EncapMode::Udp) => LeaseAttrs::udp(public_ip),
        (_, EncapMode::Ipip) => LeaseAttrs::ipip(public_ip),
    };
    let attrs = match v6 {
        Some(o6) if cfg.enable_ipv4 => attrs.with_ipv6(o6.public_ip, cfg.backend.vni, o6.mac),
        _ => attrs,
    };
    Ok((attrs, wireguard))
}

/// The port a wireguard lease's `BackendV6Data` names: flannel-wg-v6's `ListenPortV6` in Mode
/// separate; in the one-device Modes flannel-wg's `ListenPort`, where that device listens
/// (flannel writes `ListenPortV6` there too, a port nothing listens on: docs/backends.md).
fn v6_port(cfg: &NetworkConfig) -> u16 {
    match cfg.backend.wireguard {
        Some(w) if cfg.wireguard_joint() => w.listen_port,
        Some(w) => w.listen_port_v6,
        None => 0,
    }
}

/// The data plane that is up, and the MTU its containers get.
pub(super) struct Up {
    pub maps: Box<dyn crate::tun::RouteTable>,
    pub ebpf: Option<dataplane::Dataplane>,
    pub tun: Option<crate::tun::TunDataplane>,
    pub mtu: u32,
}

/// Bring up the data plane `plan` names for the subnet `held` (a wireguard node's on the
/// device `lease_attrs` made, `wireguard`).
#[allow(clippy::too_many_arguments)]
pub(super) async fn dataplane(
    plan: Plan,
    opts: &DaemonOptions,
    cfg: &NetworkConfig,
    spec: &mut NodeSpec,
    held: &Held,
    state: &AgentState,
    v6: Option<&Overlay6>,
    wireguard: Option<WireguardDevice>,
) -> Result<Up> {
    let mode = cfg.backend.mode;
    let (maps, ebpf, tun, mtu): (Box<dyn crate::tun::RouteTable>, _, _, u32) = match plan {
        // IPv6-only: no IPv4 device (one a previous IPv4 run left goes), the decap programs
        // checking what arrives for flannel-v6.
        Plan::Ipv6Only => {
            let dev4 = default_device(mode, cfg.backend.vni);
            if netdev::link(&dev4)?.is_some() {
                tracing::warn!(device = %dev4, "the network is IPv6-only; removing the IPv4 overlay device a previous run left");
                netdev::delete_link(&dev4)?;
            }
            let s = spec.clone();
            let up = match opts.ebpf_unavailable {
                true => Err(forced_degraded()),
                false => tokio::task::spawn_blocking(move || dataplane::up_ipv6_only(&s)).await.context("the data-plane task")?,
            };
            match up {
                Ok(dp) => {
                    tracing::info!(decap = %dp.decap_hook, attach = %dp.attach, guard = %dp.guard, kernel_drops = %dp.kernel_drops, "eBPF checks up for the IPv6-only overlay (the kernel's flannel-v6 encapsulates)");
                    crate::datapath::degraded::set_marker(&spec.bpffs_dir, None)?;
                    let mtu = dp.mtu;
                    (Box::new(Maps::open(&spec.bpffs_dir)?), Some(dp), None, mtu)
                }
                // flannel-v6 already carries the traffic with per-peer entries; only the checks go.
                Err(e) if opts.ebpf_unavailable || dataplane::is_unsupported(&e) => {
                    let dev6 = v6.map(|o| o.device.clone()).unwrap_or_default();
                    enter_degraded(spec, state, &dev6, &e, "a stock flannel IPv6-only vxlan node (flannel-v6 with its per-peer entries)")?;
                    let mtu = v6.map(|o| o.mtu).unwrap_or(1450);
                    (Box::new(crate::datapath::degraded::NoIpv4Routes), None, None, mtu)
                }
                Err(e) => return Err(e),
            }
        }
        // host-gw: no device, no programs; peers' subnets are kernel routes via their
        // addresses, and containers keep the underlay's whole MTU.
        Plan::HostGw => {
            let underlay = netdev::require_link(&spec.iface)?;
            spec.device = "none (host-gw)".into();
            tracing::info!(iface = %spec.iface, "host-gw: routing peers' subnets via their addresses, no encapsulation");
            (Box::new(crate::tun::HostGwRoutes { iface: spec.iface.clone() }), None, None, underlay.mtu)
        }
        // wireguard: flannel-wg (made before the lease) configured for the subnet; a run of
        // another backend before leaves neither its device nor its programs behind.
        // An IPv6-only wireguard node (flannel-wg-v6 alone; flannel-wg in Modes other than
        // separate), or one whose flannel-wg carries both families: the device and its peers
        // are the IPv6 side's (made beside the lease); the IPv4 table holds no peers.
        Plan::Wireguard if !cfg.enable_ipv4 || cfg.wireguard_joint() => {
            dataplane::detach_programs(spec)?;
            dataplane::retire_other_backends(spec)?;
            retire_vxlan_ipv6(cfg)?;
            // One device for both families: a Mode separate run's flannel-wg-v6 goes.
            if cfg.wireguard_joint() {
                remove_left_device(crate::wireguard::DEVICE_V6, "wireguard", "in this Mode flannel-wg carries IPv6")?;
            }
            crate::datapath::degraded::set_marker(&spec.bpffs_dir, None)?;
            let mtu = crate::datapath::wireguard::mtu(cfg.backend.mtu, netdev::require_link(&spec.iface)?.mtu);
            crate::datapath::wireguard::set_marker(&spec.bpffs_dir, Some((&spec.device, &spec.iface, None)))
                .with_context(|| format!("writing {}", crate::datapath::wireguard::marker(&spec.bpffs_dir).display()))?;
            let mode = cfg.backend.wireguard.map_or("-", |w| w.mode.name());
            let stack = if cfg.enable_ipv4 { "both families on one device" } else { "IPv6-only" };
            tracing::info!(device = %spec.device, mtu, mode, "wireguard up ({stack}): the kernel encrypts, a peer per lease");
            let routes: Box<dyn crate::tun::RouteTable> = match cfg.enable_ipv4 {
                true => Box::new(crate::datapath::wireguard::JointIpv4Routes::default()),
                false => Box::new(crate::datapath::degraded::NoIpv4Routes),
            };
            (routes, None, None, mtu)
        }
        Plan::Wireguard => {
            let w = cfg.backend.wireguard.expect("the wireguard plan has its config");
            let dev = wireguard.context("the wireguard plan has the device lease_attrs made")?;
            dataplane::detach_programs(spec)?;
            dataplane::retire_other_backends(spec)?;
            retire_vxlan_ipv6(cfg)?;
            // A run in a one-device Mode left IPv6 on flannel-wg: here it carries IPv4 only.
            let cleared = netdev::clear_ipv6(&spec.device)?;
            if cleared > 0 {
                tracing::warn!(device = %spec.device, cleared, "removed IPv6 addresses and routes a previous run left on the device");
            }
            // A dual-stack run before left flannel-wg-v6; this network has no IPv6 now.
            if cfg.ipv6.is_none() {
                remove_left_device(crate::wireguard::DEVICE_V6, "wireguard", "the network no longer has IPv6")?;
            }
            crate::datapath::degraded::set_marker(&spec.bpffs_dir, None)?;
            let underlay = netdev::require_link(&spec.iface)?;
            let mtu = crate::datapath::wireguard::mtu(cfg.backend.mtu, underlay.mtu);
            let peers = crate::datapath::wireguard::WireguardPeers { dev, network: cfg.network, subnet: held.subnet, mtu };
            peers.configure()?;
            let device6 = cfg.ipv6.map(|_| crate::wireguard::DEVICE_V6);
            crate::datapath::wireguard::set_marker(&spec.bpffs_dir, Some((&spec.device, &spec.iface, device6)))
                .with_context(|| format!("writing {}", crate::datapath::wireguard::marker(&spec.bpffs_dir).display()))?;
            tracing::info!(device = %spec.device, mtu, listen_port = w.listen_port, "wireguard up: the kernel encrypts, a peer per lease");
            (Box::new(peers), None, None, mtu)
        }
        Plan::Ebpf => {
            let up = match opts.ebpf_unavailable {
                true => Err(forced_degraded()),
                false => dataplane_up(spec).await,
            };
            match up {
                Ok(dp) => {
                    tracing::info!(vtep_mac = %netdev::format_mac(&dp.device.mac), decap = %dp.decap_hook, attach = %dp.attach, guard = %dp.guard, kernel_drops = %dp.kernel_drops, "eBPF data plane up");
                    if crate::datapath::degraded::reason(&spec.bpffs_dir).is_some() {
                        // A degraded run's per-peer routes: the network route and the program
                        // carry the traffic now.
                        for (dst, gw) in netdev::peer_routes(&spec.device)? {
                            if gw == dst.network() {
                                netdev::del_peer_route(dst)?;
                            }
                        }
                        crate::datapath::degraded::set_marker(&spec.bpffs_dir, None)?;
                        tracing::info!("the eBPF data plane runs again; the kernel-device routes of the degraded run are gone");
                    }
                    let mtu = dp.mtu;
                    let maps = Maps::open(&spec.bpffs_dir)?;
                    let routes: Box<dyn crate::tun::RouteTable> = match mode {
                        EncapMode::Ipip => Box::new(ipip_routes(Some(maps), spec, cfg)),
                        _ => Box::new(maps),
                    };
                    (routes, Some(dp), None, mtu)
                }
                // flannel.ipip carries the traffic alone as on a stock flannel ipip node.
                Err(e) if mode == EncapMode::Ipip && (opts.ebpf_unavailable || dataplane::is_unsupported(&e)) => {
                    enter_degraded(spec, state, &spec.device, &e, "a stock flannel ipip node (the kernel's flannel.ipip, routes via peers)")?;
                    let (_, _, mtu, _) = dataplane::prepare_device(spec)?;
                    netdev::set_device_address(&spec.device, held.subnet.network())?;
                    (Box::new(ipip_routes(None, spec, cfg)), None, None, mtu)
                }
                // The vxlan backend's kernel device can carry the traffic alone, as a stock
                // flannel node's does; the udp backend has nothing to fall back to.
                Err(e) if mode == EncapMode::Vxlan && (opts.ebpf_unavailable || dataplane::is_unsupported(&e)) => {
                    enter_degraded(
                        spec,
                        state,
                        &spec.device,
                        &e,
                        "a stock flannel vxlan node (the kernel's vxlan device encapsulates and decapsulates, with flannel's \
                         per-peer route, neighbour and forwarding entries)",
                    )?;
                    let underlay = netdev::require_link(&spec.iface)?;
                    let mtu = dataplane::overlay_mtu(spec.mtu, mode, &underlay.name, underlay.mtu)?;
                    netdev::set_device_address(&spec.device, held.subnet.network())?;
                    netdev::set_arp(&spec.device, true)?;
                    let routes = crate::datapath::degraded::KernelVxlanRoutes::new(&spec.device, cfg.network)?;
                    (Box::new(routes), None, None, mtu)
                }
                Err(e) => return Err(e),
            }
        }
        Plan::Tun => {
            let underlay = netdev::require_link(&spec.iface)?;
            let mtu = dataplane::overlay_mtu(spec.mtu, mode, &underlay.name, underlay.mtu)?;
            if let Some(old) = netdev::link(&spec.device)? {
                tracing::warn!(device = %old.name, "replacing an existing device for the TUN data plane");
                netdev::delete_link(&spec.device)?;
            }
            let dev = crate::tun::create_device(&spec.device, mtu)?;
            netdev::configure_up(&spec.device, Some(mtu))?;
            netdev::set_device_address(&spec.device, held.subnet.network())?;
            netdev::route_network(cfg.network, &spec.device)?;
            // ICMP errors the proxy writes come from the device's own address; without
            // accept_local the kernel drops them as martians.
            let knob = format!("/proc/sys/net/ipv4/conf/{}/accept_local", spec.device);
            if let Err(e) = std::fs::write(&knob, "1") {
                tracing::warn!(error = %e, %knob, "ICMP net-unreachable replies may be dropped");
            }
            let tun = crate::tun::start(dev, spec.port, held.subnet, mtu)?;
            state.tun_stats.set(tun.stats.clone()).ok();
            tracing::info!(device = %spec.device, port = spec.port, "TUN data plane up (userspace forwarding)");
            (Box::new(tun.routes.clone()), None, Some(tun), mtu)
        }
    };
    Ok(Up { maps, ebpf, tun, mtu })
}

/// An ipip node's routes: the kernel's, and the map's where the checks run.
fn ipip_routes(maps: Option<Maps>, spec: &NodeSpec, cfg: &NetworkConfig) -> crate::datapath::ipip::IpipRoutes {
    crate::datapath::ipip::IpipRoutes { maps, device: spec.device.clone(), iface: spec.iface.clone(), direct_routing: cfg.backend.direct_routing }
}

/// The IPv6 side once a subnet is held: flannel-v6 addressed for it (checked by the
/// programs where they run); or, IPv6 switched off since the last run, its device gone and
/// the programs no longer checking IPv6 frames against a side that no longer exists.
pub(super) fn ipv6_side(cfg: &NetworkConfig, spec: &NodeSpec, held: &Held, v6: Option<&mut Overlay6>, ebpf: bool) -> Result<()> {
    match (v6, held.subnet6) {
        (Some(o6), Some(s6)) => o6.configure(s6, ebpf.then_some(spec.bpffs_dir.as_path()))?,
        (Some(_), None) => {}
        (None, _) if ebpf => {
            let dev6 = crate::datapath::ipv6::device_name(cfg.backend.vni);
            if netdev::link(&dev6)?.is_some() {
                tracing::warn!(device = %dev6, "IPv6 is off in the network config; removing the IPv6 overlay device");
                netdev::delete_link(&dev6)?;
            }
            let mut maps6 = Maps::open(&spec.bpffs_dir)?;
            maps6.set_config6(&overlay_common::Dataplane6Config { underlay_ip: [0; 16], local_subnet: [0; 16], local_prefix_len: 0, enabled: 0 })?;
            maps6.clear6()?;
        }
        (None, _) => {}
    }
    Ok(())
}

/// A dual-stack wireguard node's IPv6 side once a subnet is held: flannel-wg-v6 with the
/// node's key and ListenPortV6, up with wireguard's MTU, the IPv6 subnet's address on it and
/// the IPv6 network routed through it; its peers follow with the routes.
pub(super) fn wireguard_v6(
    cfg: &NetworkConfig,
    spec: &NodeSpec,
    held: &Held,
    dev: Option<&WireguardDevice>,
    public_ipv6: Option<Ipv6Addr>,
) -> Result<Option<crate::datapath::wireguard::WireguardPeers6>> {
    let (Some(w), Some(c6), Some(dev), Some(ip6)) = (cfg.backend.wireguard, cfg.ipv6, dev, public_ipv6) else { return Ok(None) };
    let s6 = held.subnet6.context("a dual-stack wireguard node's lease has no IPv6 subnet")?;
    let mtu = crate::datapath::wireguard::mtu(cfg.backend.mtu, netdev::require_link(&spec.iface)?.mtu);
    // Modes auto, ipv4, ipv6: flannel-wg carries both families (its IPv4 side set up here
    // too); Mode separate: flannel-wg-v6, with the same key.
    let peers = match cfg.wireguard_joint() {
        true => {
            let mut p = crate::datapath::wireguard::WireguardPeers6::new(dev.clone(), ip6, c6.network, s6, mtu);
            p.ipv4 = cfg.enable_ipv4.then_some((cfg.network, held.subnet));
            p
        }
        false => crate::datapath::wireguard::WireguardPeers6::new(crate::datapath::wireguard::prepare_v6(&w, dev.private_key)?, ip6, c6.network, s6, mtu),
    };
    peers.configure()?;
    tracing::info!(device = %peers.dev.name, subnet = %s6, mtu, mode = w.mode.name(), "wireguard IPv6 side up");
    Ok(Some(peers))
}

/// A vxlan run's flannel-v6.<VNI> (and with it its per-peer IPv6 routes, which would take
/// IPv6 traffic from the wireguard device) removed from a node that now runs wireguard.
fn retire_vxlan_ipv6(cfg: &NetworkConfig) -> Result<()> {
    remove_left_device(&crate::datapath::ipv6::device_name(cfg.backend.vni), "vxlan", "the backend a previous run used")
}

/// The device `name` of `kind` a previous run left, removed (logged with `why`).
fn remove_left_device(name: &str, kind: &str, why: &str) -> Result<()> {
    if netdev::link(name)?.is_some_and(|l| l.kind.as_deref() == Some(kind)) {
        tracing::warn!(device = %name, why, "removing a device a previous run left");
        netdev::delete_link(name)?;
    }
    Ok(())
}

/// The error `--ebpf-unavailable` stands in for.
pub(super) fn forced_degraded() -> anyhow::Error {
    anyhow::anyhow!("forced with --ebpf-unavailable")
}

/// Degrade, don't refuse (the eBPF side could not come up: `e`): said once with what it costs,
/// nothing of ours left attached, and recorded for `status` (the marker, naming `device` for
/// teardown) and /metrics. The node then runs as `what`.
pub(super) fn enter_degraded(spec: &NodeSpec, state: &AgentState, device: &str, e: &anyhow::Error, what: &str) -> Result<()> {
    let reason = crate::error_chain(e.as_ref());
    tracing::warn!(
        %reason,
        "the eBPF data plane cannot run on this node: running as {what}; what that costs: no checks of arriving tunnel \
         frames, no socket guard, no drop counters, no monitor"
    );
    dataplane::detach_programs(spec)?;
    let marker = format!("device={device} underlay={}\n{reason}", spec.iface);
    crate::datapath::degraded::set_marker(&spec.bpffs_dir, Some(&marker))
        .with_context(|| format!("writing {}", crate::datapath::degraded::marker(&spec.bpffs_dir).display()))?;
    let _ = state.degraded.set(reason);
    Ok(())
}

/// Load and attach the programs (verifier, netlink, bpffs: a few hundred milliseconds) on a
/// blocking thread: /healthz and the lease keeper go on meanwhile.
pub(super) async fn dataplane_up(spec: &NodeSpec) -> Result<dataplane::Dataplane> {
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || dataplane::up(&spec)).await.context("the data-plane task")?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> NetworkConfig {
        crate::config::parse(json).unwrap()
    }

    #[test]
    fn the_data_plane_follows_the_config_and_refuses_what_it_cannot_carry() {
        let vxlan = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        let udp = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#);
        let host_gw = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#);
        let only6 = cfg(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/48","Backend":{"Type":"vxlan"}}"#);
        assert_eq!(plan(DataplaneKind::Ebpf, &vxlan).unwrap(), Plan::Ebpf);
        assert_eq!(plan(DataplaneKind::Ebpf, &udp).unwrap(), Plan::Ebpf);
        assert_eq!(plan(DataplaneKind::Tun, &udp).unwrap(), Plan::Tun);
        assert_eq!(plan(DataplaneKind::Ebpf, &host_gw).unwrap(), Plan::HostGw);
        assert_eq!(plan(DataplaneKind::Ebpf, &only6).unwrap(), Plan::Ipv6Only);
        let wg = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#);
        assert_eq!(plan(DataplaneKind::Ebpf, &wg).unwrap(), Plan::Wireguard);
        let e = plan(DataplaneKind::Tun, &wg).unwrap_err().to_string();
        assert!(e.contains("flannel's udp backend") && e.contains("\"wireguard\""), "{e}");
        let e = plan(DataplaneKind::Tun, &vxlan).unwrap_err().to_string();
        assert!(e.contains("flannel's udp backend") && e.contains("\"vxlan\""), "{e}");
        let e = plan(DataplaneKind::Tun, &only6).unwrap_err().to_string();
        assert!(e.contains("IPv4 only"), "{e}");
    }
}
