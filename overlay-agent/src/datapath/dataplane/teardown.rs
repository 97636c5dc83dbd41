//! Taking a node's data plane down: the programs off a device (degrading to the kernel's
//! device), the whole of it (`teardown`), or ours alone with flannel's kernel state left for
//! a flanneld to take back (`release_to_flannel`).

use std::{
    fs,
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use aya::programs::TcAttachType;
use ipnet::Ipv4Net;
use overlay_common::{map_names, prog_names, DataplaneConfig, EncapMode};

use crate::{
    datapath::attach::{self},
    maps::Maps,
    netdev::{self},
};

use super::*;

/// Take every program of ours off the node's interfaces (link pins, cls_bpf filters, the
/// guard), keeping the maps and the device: after an `up` that failed midway, nothing
/// half-attached is left (the node then runs degraded, on the kernel device alone).
pub fn detach_programs(spec: &NodeSpec) -> Result<()> {
    for link in [LINK_ENCAP, LINK_DECAP_TC, LINK_DECAP_XDP, LINK_GUARD] {
        remove_pin(&spec.bpffs_dir.join(link))?;
    }
    for (iface, at, name) in [
        (&spec.iface, TcAttachType::Ingress, prog_names::TC_INGRESS_DECAP),
        (&spec.device, TcAttachType::Egress, prog_names::TC_EGRESS_ENCAP),
    ] {
        if let Some(l) = netdev::link(iface)? {
            attach::detach_legacy(&l, at, name)?;
        }
    }
    Ok(())
}

/// `teardown --leave-kernel-state`: hand the node back to flanneld (a rollback) without a
/// lost packet. What a flanneld started next adopts stays: the overlay device with its
/// address, flannel's forwarding and neighbour entries and its per-peer routes (made here
/// from the route map, first, so that traffic already follows them while our programs are
/// still attached), flannel's own firewall chains, the subnet file. What is ours goes, in an
/// order that never leaves a gap: the programs (their links and filters), the pinned maps,
/// the socket guard's and NOTRACK's firewall rules, and our one network route. Run it with
/// the agent stopped (its links are held by their pins only then). An ipip node's device and
/// routes are flanneld's as they stand. The udp backend has no kernel device to leave:
/// refused, `teardown` removes it.
pub fn release_to_flannel(dir: &Path) -> Result<()> {
    // A wireguard node runs no programs: flannel-wg, its peers and route are a flanneld's to
    // take (it makes the device again with the same key file).
    if crate::datapath::wireguard::recorded(dir).is_some() {
        crate::datapath::wireguard::set_marker(dir, None)?;
        return remove_pin_dir(dir);
    }
    let maps = Maps::open(dir).context("no data plane of this agent here (nothing to hand over)")?;
    let config = maps.config()?;
    if !config.is_ready() {
        bail!("the data plane in {} was never configured: nothing to hand over; `teardown` removes it", dir.display());
    }
    if config.encap_mode() == Some(EncapMode::Udp) {
        bail!("the udp backend has no kernel device a flanneld could take over (flanneld's udp backend makes its own TUN device): use `teardown`");
    }
    if config.encap_mode() == Some(EncapMode::Ipip) {
        // flannel.ipip and the per-lease routes through it (or the underlay) are flanneld's
        // own as they stand: only the checks go.
        drop(maps);
        detach_and_unpin(dir, Some(config))?;
    } else if !is_ipv6_only(&config) {
        let device = netdev::name_of(config.overlay_ifindex).context("the overlay device is gone: nothing to hand over")?;
        // Peers this node routes directly (DirectRouting) keep their direct route.
        let direct: Vec<Ipv4Net> = netdev::direct_routes()?.into_iter().map(|(s, _)| s).collect();
        for r in maps.routes()?.iter().filter(|r| !direct.contains(&r.subnet)) {
            netdev::vxlan_fdb_replace(&device, r.vtep_mac, r.public_ip)?;
            netdev::set_neighbour(&device, r.subnet.network(), r.vtep_mac)?;
            netdev::set_peer_route(&device, r.subnet)?;
        }
        drop(maps);
        detach_and_unpin(dir, Some(config))?;
        // Our one route for the whole network (flanneld routes per peer, as just set up).
        for (subnet, via) in netdev::peer_routes(&device)? {
            if via == netdev::OVERLAY_NEXTHOP {
                netdev::del_peer_route(subnet)?;
            }
        }
    } else {
        // An IPv6-only node's flannel-v6 already carries flannel's own entries.
        drop(maps);
        detach_and_unpin(dir, Some(config))?;
    }
    // Our rules; flannel's chains (masquerade, forward) stay for flanneld to adopt.
    let [_, _, _, _, g, g6, nt, nt_out] = crate::iptables::all_chains();
    for c in [g, g6, nt, nt_out] {
        let _ = crate::iptables::remove(&c);
    }
    if crate::nftables::has_nft() {
        remove_our_nft_tables();
    }
    crate::datapath::wireguard::set_marker(dir, None)?;
    remove_pin_dir(dir)
}

/// The guard's and NOTRACK's nftables tables (flannel's own tables are not ours to judge here).
pub(super) fn remove_our_nft_tables() {
    let _ = crate::nftables::remove_guard(false);
    let _ = crate::nftables::remove_guard(true);
    let _ = crate::nftables::remove_notrack();
}

/// The degraded marker and the (then empty) pin directory.
pub(super) fn remove_pin_dir(dir: &Path) -> Result<()> {
    crate::datapath::degraded::set_marker(dir, None).context("removing the degraded marker")?;
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Detach our programs (their pinned links, and our cls_bpf filters where the kernel has no
/// TCX) and remove every pinned map.
pub(super) fn detach_and_unpin(dir: &Path, config: Option<DataplaneConfig>) -> Result<()> {
    for link in [LINK_ENCAP, LINK_DECAP_TC, LINK_DECAP_XDP, LINK_GUARD] {
        remove_pin(&dir.join(link))?;
    }
    // Our cls_bpf filters (kernels without TCX), and only ours: the qdisc and others' filters
    // stay.
    if let Some(c) = config {
        for (ifindex, at, name) in [
            (c.underlay_ifindex, TcAttachType::Ingress, prog_names::TC_INGRESS_DECAP),
            (c.overlay_ifindex, TcAttachType::Egress, prog_names::TC_EGRESS_ENCAP),
        ] {
            if let Some(iface) = netdev::name_of(ifindex).and_then(|n| netdev::link(&n).ok().flatten()) {
                attach::detach_legacy(&iface, at, name)?;
            }
        }
    }
    for map in map_names::ALL.iter().chain(&map_names::RETIRED) {
        remove_pin(&dir.join(map))?;
    }
    Ok(())
}

/// Remove everything `up` made: links (detaching the programs), pinned maps, the overlay
/// device (and with it the overlay route) and the pin directory.
pub fn teardown(dir: &Path) -> Result<()> {
    let config = Maps::open(dir).ok().and_then(|m| m.config().ok()).filter(|c| c.is_ready());
    let device = config.and_then(|c| netdev::name_of(c.overlay_ifindex));
    // A dual-stack node's IPv6 device goes too.
    let device6 = config.map(|c| crate::datapath::ipv6::device_name(c.vni));
    // A degraded run has no maps: its marker names its devices.
    let degraded = crate::datapath::degraded::devices(dir);
    // A wireguard run's devices (flannel removes them when it stops).
    let wireguard: Vec<String> = crate::datapath::wireguard::recorded(dir).map_or(Vec::new(), |r| r.devices().map(str::to_string).collect());
    detach_and_unpin(dir, config)?;
    for dev in device.into_iter().chain(device6).chain(degraded).chain(wireguard) {
        if netdev::link(&dev)?.is_some() {
            netdev::delete_link(&dev)?;
        }
    }
    // An agent that was killed (not stopped) leaves its rules; iptables may also be absent.
    if let Err(e) = crate::iptables::remove_all() {
        tracing::warn!(error = %e, "removing flannel's iptables chains");
    }
    // And the nftables forms, where nft exists: flannel's tables and the guard's.
    if crate::nftables::remove().is_ok() {
        remove_our_nft_tables();
    }
    crate::datapath::wireguard::set_marker(dir, None)?;
    remove_pin_dir(dir)
}
