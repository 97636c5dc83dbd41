//! Degrade, don't refuse: where the eBPF data plane cannot run at all (no BTF, no bpffs, a
//! verifier that refuses the programs, a missing helper), the node runs as a stock flannel
//! vxlan node. The kernel's vxlan device, which exists already (its MAC is in the lease),
//! carries the traffic both ways with flannel's entries per peer: a route to the peer's
//! subnet via the subnet's network address `onlink`, a permanent neighbour entry giving that
//! address the peer's VtepMAC, a forwarding entry sending the VtepMAC to the peer's
//! PublicIP. What it costs: no checks of arriving tunnel frames, no socket guard, no drop
//! counters, no monitor. Said once at start, in `status` (from a marker file under /run,
//! since bpffs may be what is missing) and in /metrics.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;

use crate::{
    maps::{MapsError, Route},
    netdev,
    tun::RouteTable,
};

/// Where `status` finds that the node behind bpffs directory `bpffs_dir` runs degraded, and
/// why (the file's content).
pub fn marker(bpffs_dir: &Path) -> PathBuf {
    marker_named(bpffs_dir, "degraded")
}

/// A file under /run/overlay-agent for the node behind `bpffs_dir` (one that runs no
/// programs has no maps there to say what it runs): `<dir, flattened>.<kind>`.
pub fn marker_named(bpffs_dir: &Path, kind: &str) -> PathBuf {
    let name: String = bpffs_dir.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    PathBuf::from("/run/overlay-agent").join(format!("{name}.{kind}"))
}

/// Record (`Some(reason)`) or clear that the node runs degraded.
pub fn set_marker(bpffs_dir: &Path, reason: Option<&str>) -> std::io::Result<()> {
    write_marker(&marker(bpffs_dir), reason)
}

/// Write a marker file (`Some(content)`, its directory made) or remove it (one already
/// gone is no error).
pub fn write_marker(path: &Path, content: Option<&str>) -> std::io::Result<()> {
    match content {
        Some(c) => {
            std::fs::create_dir_all(path.parent().expect("a directory"))?;
            std::fs::write(path, c)
        }
        None => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// Why the node runs degraded, if it does.
pub fn reason(bpffs_dir: &Path) -> Option<String> {
    std::fs::read_to_string(marker(bpffs_dir)).ok()
}

/// The overlay devices a degraded run made (its marker's `device=`, and a dual-stack node's
/// flannel-v6 of the same VNI), for teardown, which has no maps to read them from.
pub fn devices(bpffs_dir: &Path) -> Vec<String> {
    let Some(text) = reason(bpffs_dir) else { return Vec::new() };
    let Some(dev) = text.split_whitespace().find_map(|w| w.strip_prefix("device=")).filter(|d| !d.is_empty()) else {
        return Vec::new();
    };
    let mut v = vec![dev.to_string()];
    if let Some(vni) = dev.strip_prefix("flannel.").and_then(|n| n.parse::<u32>().ok()) {
        v.push(crate::datapath::ipv6::device_name(vni));
    }
    v
}

/// flannel's per-peer entries on the kernel vxlan device.
pub struct KernelVxlanRoutes {
    pub device: String,
    /// What this run wrote, by subnet (for the forwarding entries a removal must take).
    known: BTreeMap<Ipv4Net, Route>,
}

impl KernelVxlanRoutes {
    /// The table for `device`; the network-wide route an eBPF run leaves (one next hop for
    /// the whole network, which only the encapsulation program can serve) goes.
    pub fn new(device: &str, network: Ipv4Net) -> Result<Self, MapsError> {
        let routes = netdev::peer_routes(device).map_err(host)?;
        if routes.iter().any(|(dst, gw)| *dst == network && *gw == netdev::OVERLAY_NEXTHOP) {
            netdev::del_peer_route(network).map_err(host)?;
        }
        Ok(Self { device: device.to_string(), known: BTreeMap::new() })
    }
}

fn host(e: netdev::NetdevError) -> MapsError {
    MapsError::Host(e.to_string())
}

impl RouteTable for KernelVxlanRoutes {
    /// The peer routes on the device (their VtepMAC and PublicIP as this run wrote them; a
    /// route an earlier run left shows with zeros, and the reconcile replaces or removes it).
    fn routes(&self) -> Result<Vec<Route>, MapsError> {
        Ok(netdev::peer_routes(&self.device)
            .map_err(host)?
            .into_iter()
            .filter(|(dst, gw)| *gw == dst.network())
            .map(|(subnet, _)| self.known.get(&subnet).copied().unwrap_or(Route { subnet, public_ip: Ipv4Addr::UNSPECIFIED, vtep_mac: [0; 6], wireguard: None }))
            .collect())
    }

    fn upsert_route(&mut self, r: &Route) -> Result<(), MapsError> {
        let old = self.known.insert(r.subnet, *r);
        netdev::vxlan_fdb_replace(&self.device, r.vtep_mac, r.public_ip).map_err(host)?;
        netdev::set_neighbour(&self.device, r.subnet.network(), r.vtep_mac).map_err(host)?;
        netdev::set_peer_route(&self.device, r.subnet).map_err(host)?;
        if let Some(o) = old.filter(|o| (o.vtep_mac, o.public_ip) != (r.vtep_mac, r.public_ip)) {
            self.forget_fdb_if_unused(&o)?;
        }
        Ok(())
    }

    fn remove_route(&mut self, subnet: Ipv4Net) -> Result<(), MapsError> {
        netdev::del_peer_route(subnet).map_err(host)?;
        netdev::del_neighbour(&self.device, subnet.network()).map_err(host)?;
        if let Some(o) = self.known.remove(&subnet) {
            self.forget_fdb_if_unused(&o)?;
        }
        Ok(())
    }
}

impl KernelVxlanRoutes {
    fn forget_fdb_if_unused(&mut self, old: &Route) -> Result<(), MapsError> {
        if !self.known.values().any(|r| (r.vtep_mac, r.public_ip) == (old.vtep_mac, old.public_ip)) {
            netdev::vxlan_fdb_del(&self.device, old.vtep_mac, old.public_ip).map_err(host)?;
        }
        Ok(())
    }
}

/// An IPv6-only node's IPv4 table when it runs degraded: the network takes no IPv4 leases,
/// and there are no maps to hold any.
pub struct NoIpv4Routes;

impl RouteTable for NoIpv4Routes {
    fn routes(&self) -> Result<Vec<Route>, MapsError> {
        Ok(Vec::new())
    }
    fn upsert_route(&mut self, r: &Route) -> Result<(), MapsError> {
        Err(MapsError::Host(format!("the network is IPv6-only; no IPv4 route to {} is kept", r.subnet)))
    }
    fn remove_route(&mut self, subnet: Ipv4Net) -> Result<(), MapsError> {
        Err(MapsError::NoSuchRoute(subnet))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_marker_is_one_file_per_bpffs_directory() {
        let a = super::marker(std::path::Path::new("/sys/fs/bpf/overlay"));
        let b = super::marker(std::path::Path::new("/sys/fs/bpf/ov1-n1"));
        assert_ne!(a, b);
        assert_eq!(a, std::path::PathBuf::from("/run/overlay-agent/_sys_fs_bpf_overlay.degraded"));
    }

    #[test]
    fn teardown_finds_the_devices_a_degraded_run_named() {
        let dir = std::env::temp_dir().join(format!("overlay-degraded-test-{}", std::process::id()));
        super::set_marker(&dir, Some("device=flannel.7 underlay=eth0\nno BTF")).unwrap();
        assert_eq!(super::devices(&dir), ["flannel.7", "flannel-v6.7"]);
        super::set_marker(&dir, Some("device=flannel-v6.1 underlay=eth0\nforced")).unwrap();
        assert_eq!(super::devices(&dir), ["flannel-v6.1"]);
        super::set_marker(&dir, None).unwrap();
        assert!(super::devices(&dir).is_empty());
    }
}
