//! The IPv6 half of a dual-stack vxlan node, as flannel sets it up: the kernel's
//! `flannel-v6.<VNI>` device (bound to the node's public IPv6 address), its address (the
//! IPv6 subnet's network address as a /128), and per peer a route to the peer's IPv6 subnet
//! via the subnet's network address `onlink`, a permanent neighbour entry giving that address
//! the peer's VtepMAC, and a forwarding entry sending that MAC to the peer's public IPv6
//! address. The kernel device encapsulates and decapsulates; the decap programs on the
//! underlay check what arrives for it (peer and inner source, as for IPv4) against the
//! routes kept here, which the agent mirrors into the IPv6 maps.
//!
//! The routes are keyed by the peer's lease key, so a lease deleted or changed finds what it
//! had. An IPv6-only node has this half only.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv6Addr,
};

use anyhow::{Context as _, Result};
use ipnet::Ipv6Net;

use crate::{lease::LeaseKey, maps::Maps, netdev, reconcile::Route6};

/// IPv6 and UDP and VXLAN and the inner Ethernet header: what flannel-v6's packets carry on
/// top of the inner IPv6 packet (the kernel's VXLAN6_HEADROOM).
pub const VXLAN6_OVERHEAD: u32 = 70;

/// The device's name: flannel's `flannel-v6.<VNI>`.
pub fn device_name(vni: u32) -> String {
    format!("flannel-v6.{vni}")
}

pub struct Overlay6 {
    pub device: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// The node's public IPv6 address (the device's local end).
    pub public_ip: Ipv6Addr,
    routes: BTreeMap<LeaseKey, Route6>,
    /// Keys whose entries could not all be written: tried again by the next `set` or `sync`.
    dirty: BTreeSet<LeaseKey>,
    /// The pinned maps the decap programs check IPv6 frames against (once the data plane is
    /// up): the IPv6 side's configuration, routes and peers.
    maps: Option<Maps>,
}

impl Overlay6 {
    /// Make (or keep) the device, bound to `local` on `underlay`, up with the underlay's MTU
    /// (`backend_mtu` when the config gives Backend.MTU, which flannel reads as the
    /// underlay's) less the encapsulation over IPv6 (70 bytes; flannel takes 50 there too,
    /// which leaves IPv6 tunnel packets 20 bytes too big for the path).
    pub fn up(vni: u32, port: u16, local: Ipv6Addr, underlay: &str, backend_mtu: Option<u32>) -> Result<Self> {
        let device = device_name(vni);
        let under = netdev::require_link(underlay)?;
        if let Some(m) = backend_mtu.filter(|m| *m > under.mtu) {
            anyhow::bail!(
                "Backend.MTU {m} is larger than {underlay}'s MTU ({}): flannel reads Backend.MTU as the underlay's MTU; \
                 use at most {}, or leave it unset",
                under.mtu,
                under.mtu
            );
        }
        let link = netdev::ensure_vxlan6(&device, vni, port, local, underlay)?;
        let mtu = backend_mtu.unwrap_or(under.mtu).saturating_sub(VXLAN6_OVERHEAD);
        if mtu < 1280 {
            anyhow::bail!("{device}: MTU {mtu} is below IPv6's minimum of 1280 (underlay {underlay} has {})", under.mtu);
        }
        netdev::set_up_mtu(&device, mtu)?;
        Ok(Self { device, mac: link.mac, mtu, public_ip: local, routes: BTreeMap::new(), dirty: BTreeSet::new(), maps: None })
    }

    /// The device's address (`subnet`'s network address as a /128, flannel's), and the decap
    /// programs' IPv6 configuration in the maps pinned under `bpffs_dir`: from then on they
    /// check IPv6 tunnel frames (peer, VNI, inner source and destination).
    /// `bpffs_dir` `None`: the node runs degraded (no programs): the device alone.
    pub fn configure(&mut self, subnet: Ipv6Net, bpffs_dir: Option<&std::path::Path>) -> Result<()> {
        netdev::set_device_address6(&self.device, subnet.network()).with_context(|| format!("the address of {}", self.device))?;
        let Some(bpffs_dir) = bpffs_dir else { return Ok(()) };
        let mut maps = Maps::open(bpffs_dir)?.lock_changes_in(bpffs_dir);
        maps.set_config6(&overlay_common::Dataplane6Config {
            underlay_ip: self.public_ip.octets(),
            local_subnet: subnet.network().octets(),
            local_prefix_len: subnet.prefix_len() as u32,
            enabled: 1,
        })?;
        // Routes a previous run left in the maps stay until the first sync (peers' frames keep
        // being accepted across a restart), which removes those no lease asks for.
        self.maps = Some(maps);
        Ok(())
    }

    /// Route, neighbour and forwarding entry for the peer holding `key`, replacing what an
    /// earlier lease of that key had (`None`: remove them). The table is updated first, so a
    /// failure midway leaves the key recorded (and marked to be tried again), never entries
    /// that nothing removes; entries another key still uses (two leases of one node, for a
    /// while) are kept.
    pub fn set(&mut self, key: LeaseKey, want: Option<Route6>) -> Result<()> {
        let old = self.routes.get(&key).copied();
        if old == want && !self.dirty.contains(&key) {
            return Ok(());
        }
        match want {
            Some(r) => self.routes.insert(key, r),
            None => self.routes.remove(&key),
        };
        self.dirty.insert(key);
        if let Some(o) = old.filter(|o| Some(o) != want.as_ref()) {
            self.remove_unused(&o)?;
        }
        if let Some(r) = want {
            // The peer is a member before its frames can arrive.
            if let Some(m) = self.maps.as_mut() {
                m.upsert_route6(r.subnet, r.public_ip, r.vtep_mac)?;
            }
            netdev::vxlan_fdb6_replace(&self.device, r.vtep_mac, r.public_ip)?;
            netdev::set_neighbour6(&self.device, r.subnet.network(), r.vtep_mac)?;
            netdev::set_peer_route6(&self.device, r.subnet)?;
            tracing::info!(subnet = %r.subnet, public_ipv6 = %r.public_ip, "IPv6 route added or updated");
        } else if let Some(o) = old {
            tracing::info!(subnet = %o.subnet, "IPv6 route removed");
        }
        self.dirty.remove(&key);
        Ok(())
    }

    /// Remove what `old` added and no route in the table uses any more.
    fn remove_unused(&mut self, old: &Route6) -> Result<()> {
        if !self.routes.values().any(|r| r.subnet == old.subnet) {
            if let Some(m) = self.maps.as_mut() {
                m.remove_route6(old.subnet)?;
            }
            netdev::del_peer_route6(old.subnet)?;
            netdev::del_neighbour6(&self.device, old.subnet.network())?;
        }
        if !self.routes.values().any(|r| (r.vtep_mac, r.public_ip) == (old.vtep_mac, old.public_ip)) {
            netdev::vxlan_fdb6_del(&self.device, old.vtep_mac, old.public_ip)?;
        }
        Ok(())
    }

    /// Hold exactly `desired` (by peer lease key), also removing what a previous run left
    /// on the device or in the maps that no lease asks for any more. One peer's failure does
    /// not stop the others: the error says how many failed (each is tried again next time).
    pub fn sync(&mut self, desired: &BTreeMap<LeaseKey, Route6>) -> Result<()> {
        let mut failed: Vec<String> = Vec::new();
        let stale: Vec<LeaseKey> = self.routes.keys().filter(|k| !desired.contains_key(k)).copied().collect();
        for k in stale {
            if let Err(e) = self.set(k, None) {
                failed.push(format!("{k}: {}", crate::error_chain(e.as_ref())));
            }
        }
        for (k, r) in desired {
            if let Err(e) = self.set(*k, Some(*r)) {
                failed.push(format!("{}: {}", r.subnet, crate::error_chain(e.as_ref())));
            }
        }
        let wanted: BTreeSet<Ipv6Net> = self.routes.values().map(|r| r.subnet).collect();
        for subnet in netdev::peer_routes6(&self.device)?.into_iter().filter(|s| !wanted.contains(s)) {
            tracing::info!(%subnet, "removing an IPv6 route no lease asks for");
            netdev::del_peer_route6(subnet)?;
            netdev::del_neighbour6(&self.device, subnet.network())?;
        }
        if let Some(m) = self.maps.as_mut() {
            for (subnet, _) in m.routes6()?.into_iter().filter(|(s, _)| !wanted.contains(s)) {
                m.remove_route6(subnet)?;
            }
        }
        if !failed.is_empty() {
            anyhow::bail!("{} IPv6 route(s) not set: {}", failed.len(), failed.join("; "));
        }
        Ok(())
    }

    /// What is missing of the device and its address (`None`: intact).
    pub fn damage(&self, subnet: Ipv6Net) -> Result<Option<&'static str>> {
        let Some(link) = netdev::link(&self.device)? else { return Ok(Some("the device is gone")) };
        if !link.up {
            return Ok(Some("the device is down"));
        }
        if link.mac != self.mac {
            return Ok(Some("the device was recreated by someone else"));
        }
        if !netdev::has_address6(&self.device, subnet.network())? {
            return Ok(Some("its address is gone or changed"));
        }
        Ok(None)
    }

    /// Make the device (bound to `public_ip`: the same, or the node's new address), its
    /// address and every peer's entries again, as at start (the device may get a new MAC: the
    /// caller announces it). Ok once the device is in place: peers whose entries could not be
    /// written are logged and marked, and `retry` writes them later.
    #[allow(clippy::too_many_arguments)]
    pub fn rebuild(
        &mut self,
        public_ip: Ipv6Addr,
        vni: u32,
        port: u16,
        underlay: &str,
        mtu: Option<u32>,
        subnet: Ipv6Net,
        bpffs_dir: &std::path::Path,
    ) -> Result<()> {
        if netdev::link(&self.device)?.is_some() {
            netdev::delete_link(&self.device)?;
        }
        let mut fresh = Overlay6::up(vni, port, public_ip, underlay, mtu)?;
        fresh.configure(subnet, self.maps.is_some().then_some(bpffs_dir))?;
        // Every route is to be written again on the new device; kept even if that fails
        // midway (the next sync or set tries again).
        let routes = self.routes.clone();
        fresh.dirty = routes.keys().copied().collect();
        fresh.routes = routes.clone();
        let synced = fresh.sync(&routes);
        *self = fresh;
        if let Err(e) = synced {
            tracing::error!(error = %crate::error_chain(e.as_ref()), "some IPv6 peers' entries are not written yet; trying again");
        }
        Ok(())
    }

    /// How many peers' IPv6 routes are held.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// Write again the entries of peers whose last write failed. Err: how many still fail.
    pub fn retry(&mut self) -> Result<()> {
        let keys: Vec<LeaseKey> = self.dirty.iter().copied().collect();
        let mut failed = 0;
        for k in keys {
            let want = self.routes.get(&k).copied();
            if self.set(k, want).is_err() {
                failed += 1;
            }
        }
        if failed > 0 {
            anyhow::bail!("{failed} IPv6 peer(s) still not written");
        }
        Ok(())
    }
}
