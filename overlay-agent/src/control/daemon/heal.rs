//! Self-healing and address following, checked every second from the watch loop: the
//! overlay device, its address, its route and its filters put back when someone removes
//! them (`damage` decides from what was seen); flannel-v6 and flannel-wg-v6 likewise; the data plane and the
//! lease moved when the node's public address changes (`address_moved`, `ipv6_moved`).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::Ordering,
};

use anyhow::Result;
use overlay_common::EncapMode;

use super::Daemon;
use crate::{dataplane::DecapHook, lease::LeaseAttrs, netdev};

/// What was seen of the overlay device and what hangs on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DeviceSeen {
    /// Its ifindex and whether it is up (`None`: no such device).
    pub link: Option<(u32, bool)>,
    /// It has the address of our subnet.
    pub address: bool,
    /// The network's route goes through it.
    pub route: bool,
    /// Legacy TC only: the encapsulation filter is on it, the decapsulation one (where TC
    /// checks) on the underlay. Always true with TCX, whose links are pinned.
    pub encap_filter: bool,
    pub decap_filter: bool,
}

/// What is missing of the overlay device we made (ifindex `expected`), its address and its
/// route (`None`: intact). An operator or another tool may delete any of them; flannel would
/// need a restart. (An IPv6-only node has no IPv4 overlay device: `heal_v6` looks after
/// flannel-v6.)
pub(super) fn damage(expected: u32, seen: &DeviceSeen) -> Option<&'static str> {
    match seen.link {
        None => return Some("the device is gone"),
        Some((ifindex, _)) if ifindex != expected => return Some("the device was recreated by someone else"),
        Some((_, false)) => return Some("the device is down"),
        Some(_) => {}
    }
    if !seen.address {
        Some("its address is gone or changed")
    } else if !seen.route {
        Some("the network's route no longer goes through it")
    } else if !seen.encap_filter {
        Some("its encapsulation filter is gone")
    } else if !seen.decap_filter {
        Some("the underlay's decapsulation filter is gone")
    } else {
        None
    }
}

/// The underlay and address to move to (`None`: stay). `now`: what `--iface` resolves to
/// now; none at all for a moment (between a DHCP release and renewal) keeps the old one
/// until there is a new one.
pub(super) fn address_moved((iface, ip): (&str, Ipv4Addr), now: Option<(String, Ipv4Addr)>) -> Option<(String, Ipv4Addr)> {
    now.filter(|(i, a)| *a != ip || i != iface)
}

/// The IPv6 address flannel-v6 moves to (`None`: stay): the interface's first global one
/// when it differs and the current one is gone (`kept`: still on the interface; unknown
/// counts as kept). No usable global address for a moment keeps the old one.
pub(super) fn ipv6_moved(current: Ipv6Addr, first: Option<Ipv6Addr>, kept: bool) -> Option<Ipv6Addr> {
    first.filter(|ip| *ip != current && !kept)
}

impl Daemon {
    /// What is there of the overlay device, its address, its route and its filters (`None`:
    /// no IPv4 overlay device to look after). What follows a missing, replaced or downed
    /// device is not asked (reported as present): the device's own fault comes first.
    fn observe_device(&self) -> Result<Option<(u32, DeviceSeen)>, netdev::NetdevError> {
        let Some(dp) = self.ebpf.as_ref().filter(|_| self.cfg.enable_ipv4) else { return Ok(None) };
        let expected = dp.device.ifindex;
        let link = netdev::link(&self.spec.device)?.map(|l| (l.ifindex, l.up));
        let mut seen = DeviceSeen { link, address: true, route: true, encap_filter: true, decap_filter: true };
        if link != Some((expected, true)) {
            return Ok(Some((expected, seen)));
        }
        seen.address = netdev::has_address(&self.spec.device, self.held.subnet.network())?;
        // An ipip node has per-peer routes through its device, no network route (flannel's).
        seen.route = self.spec.mode == EncapMode::Ipip || netdev::network_route_via(self.spec.network, &self.spec.device)?;
        // cls_bpf filters go with their qdisc (`tc qdisc del ... clsact`) or alone; TCX
        // links are pinned and cannot be taken off without their pin.
        if dp.attach == crate::datapath::attach::TcAttach::Legacy {
            use crate::datapath::attach::legacy_attached;
            use aya::programs::TcAttachType::{Egress, Ingress};
            // ipip: the kernel device encapsulates; no filter on it.
            seen.encap_filter = self.spec.mode == EncapMode::Ipip
                || legacy_attached(dp.device.ifindex, Egress, overlay_common::prog_names::TC_EGRESS_ENCAP);
            seen.decap_filter = dp.decap_hook != DecapHook::Tc
                || legacy_attached(dp.underlay.ifindex, Ingress, overlay_common::prog_names::TC_INGRESS_DECAP);
        }
        Ok(Some((expected, seen)))
    }

    /// Put the overlay device, its address, its route and the programs on it back, as at
    /// start, if any went missing: counted, logged, no restart.
    pub(super) async fn heal(&mut self) {
        self.check_decap_chain();
        let damage = match self.observe_device() {
            Ok(Some((expected, seen))) => match damage(expected, &seen) {
                Some(d) => d,
                None => return,
            },
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "checking the overlay device");
                return;
            }
        };
        tracing::error!(device = %self.spec.device, problem = damage, "the overlay device was damaged; restoring it");
        match super::bringup::dataplane_up(&self.spec).await {
            Ok(dp) => {
                self.state.device_repairs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %self.spec.device, ifindex = dp.device.ifindex, "overlay device restored: device, address, route and programs");
                let mac = dp.device.mac;
                self.ebpf = Some(dp);
                // A device made again has a new MAC: peers must address the frames they leave
                // to our kernel device to it, so the lease says it.
                if self.spec.mode == EncapMode::Vxlan && self.attrs.vtep_mac().ok() != Some(mac) {
                    let attrs = self.keep_v6(LeaseAttrs::vxlan(self.spec.public_ip, self.spec.vni, mac));
                    if let Err(e) = self.announce(attrs).await {
                        tracing::error!(error = %crate::error_chain(e.as_ref()), "announcing the restored device's VtepMAC failed");
                    }
                }
            }
            Err(e) => tracing::error!(error = %crate::error_chain(e.as_ref()), "restoring the overlay device failed; trying again"),
        }
    }

    /// Log what else runs on the underlay's TC ingress hook whenever that changes (the first
    /// time at start): our program goes first at attach time, but a program attached ahead
    /// of it later that returns "ok" would end the chain, and the kernel would decapsulate
    /// frames our checks never saw.
    fn check_decap_chain(&mut self) {
        let Some(dp) = self.ebpf.as_ref().filter(|dp| dp.decap_hook == DecapHook::Tc) else { return };
        let chain = crate::datapath::attach::chain(&dp.underlay, aya::programs::TcAttachType::Ingress, overlay_common::prog_names::TC_INGRESS_DECAP);
        if chain == self.decap_chain {
            return;
        }
        let names = |v: &[(u32, String)]| v.iter().map(|(id, n)| format!("{n} (id {id})")).collect::<Vec<_>>().join(", ");
        let filters = chain.filters.iter().map(|(p, k, n)| format!("{k} {n} (prio {p})")).collect::<Vec<_>>().join(", ");
        if !chain.tcx_ahead.is_empty() {
            tracing::warn!(
                iface = %dp.underlay.name,
                ahead = %names(&chain.tcx_ahead),
                "programs run before our checks on the underlay's TC ingress: one that returns TC_ACT_OK lets tunnel frames past them"
            );
        } else if !chain.is_empty() {
            tracing::info!(iface = %dp.underlay.name, after = %names(&chain.tcx_after), filters = %filters, "other programs on the underlay's TC ingress run after our checks");
        }
        self.decap_chain = chain;
    }

    /// The same for a dual-stack node's flannel-v6 device: made again with its address and
    /// every peer's route, neighbour and forwarding entry (`settle_v6` announces a new MAC).
    pub(super) async fn heal_v6(&mut self) -> Result<()> {
        if let Some(w6) = self.wg6.as_mut() {
            match w6.damage() {
                Ok(None) => {}
                Ok(Some(problem)) => {
                    tracing::error!(device = %w6.dev.name, problem, "the wireguard IPv6 device was damaged; restoring it");
                    match w6.restore() {
                        Ok(()) => {
                            self.state.device_repairs.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(device = %w6.dev.name, peers = w6.route_count(), "wireguard IPv6 device restored: key, port, address, route and peers");
                        }
                        Err(e) => tracing::error!(error = %crate::error_chain(e.as_ref()), "restoring the wireguard IPv6 device failed; trying again"),
                    }
                }
                Err(e) => tracing::warn!(error = %crate::error_chain(e.as_ref()), "checking the wireguard IPv6 device"),
            }
            return Ok(());
        }
        let (Some(o6), Some(s6)) = (self.v6.as_mut(), self.held.subnet6) else { return Ok(()) };
        let damage = match o6.damage(s6) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(e.as_ref()), "checking the IPv6 overlay device");
                return Ok(());
            }
        };
        tracing::error!(device = %o6.device, problem = damage, "the IPv6 overlay device was damaged; restoring it");
        let (vni, port, mtu) = (self.cfg.backend.vni, self.cfg.backend.port, self.cfg.backend.mtu);
        let public_ipv6 = o6.public_ip;
        match o6.rebuild(public_ipv6, vni, port, &self.spec.iface, mtu, s6, &self.spec.bpffs_dir) {
            Ok(()) => {
                self.state.device_repairs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %o6.device, "IPv6 overlay device restored: device, address and peers' entries");
            }
            Err(e) => tracing::error!(error = %crate::error_chain(e.as_ref()), "restoring the IPv6 overlay device failed; trying again"),
        }
        Ok(())
    }

    /// After any IPv6 change: peers whose entries failed are written again, and the lease is
    /// made to say the device's address and MAC if it does not (a rebuild, a move, or an
    /// earlier rewrite that failed). Errors no retry can fix end the agent, as for IPv4.
    pub(super) async fn settle_v6(&mut self) -> Result<()> {
        if let Some(w6) = self.wg6.as_mut() {
            if let Err(e) = w6.retry() {
                tracing::warn!(device = %w6.dev.name, error = %crate::error_chain(e.as_ref()), "wireguard IPv6 peers");
            }
        }
        if let Some(ip) = self.wg6.as_ref().map(|w6| w6.public_ip).filter(|ip| self.attrs.public_ipv6 != Some(*ip)) {
            // A wireguard node's IPv6 side: peers send to the lease's PublicIPv6.
            let mut attrs = self.attrs.clone();
            attrs.public_ipv6 = Some(ip);
            self.announce(attrs).await?;
            tracing::warn!(public_ipv6 = %ip, "the lease now names the node's new public IPv6 address");
            return Ok(());
        }
        let Some(o6) = self.v6.as_mut() else { return Ok(()) };
        if let Err(e) = o6.retry() {
            tracing::warn!(error = %crate::error_chain(e.as_ref()), "IPv6 peers' entries");
        }
        let (ip, mac) = (o6.public_ip, o6.mac);
        if self.attrs.public_ipv6 == Some(ip) && self.attrs.vtep_mac_v6().ok() == Some(mac) {
            return Ok(());
        }
        let attrs = self.attrs.clone().with_ipv6(ip, self.cfg.backend.vni, mac);
        self.announce(attrs).await?;
        tracing::warn!(public_ipv6 = %ip, vtep_mac = %netdev::format_mac(&mac), "the lease now names the IPv6 device's address and MAC");
        Ok(())
    }

    /// The node's public IPv6 address changed (SLAAC, DHCPv6, an operator) and was not fixed
    /// by --public-ipv6: flannel-v6 is made again on the new address (`settle_v6` then writes
    /// `PublicIPv6` and the new VtepMAC into the lease, same etcd lease; peers' forwarding
    /// entries follow). True if a move was tried (the heal waits for the next tick).
    pub(super) async fn follow_public_ipv6(&mut self) -> Result<bool> {
        if self.opts.public_ipv6.is_some() {
            return Ok(false);
        }
        if let Some(w6) = self.wg6.as_mut() {
            // flannel-wg-v6 is bound to no address: the lease is rewritten with the new one
            // (`settle_v6`), and the peers' endpoints follow their leases.
            let first = netdev::first_ipv6(&self.spec.iface).ok().flatten();
            let kept = first.is_some_and(|ip| ip != w6.public_ip) && netdev::has_ipv6(&self.spec.iface, w6.public_ip).unwrap_or(true);
            let Some(ip) = ipv6_moved(w6.public_ip, first, kept) else { return Ok(false) };
            tracing::warn!(old = %w6.public_ip, new = %ip, "this node's public IPv6 address changed; the lease follows it");
            w6.public_ip = ip;
            self.state.public_ip_changes.fetch_add(1, Ordering::Relaxed);
            // Mode auto chose each peer's family by our address too: choose again.
            self.relist = self.cfg.wireguard_joint() && self.cfg.backend.wireguard.is_some_and(|w| w.mode == crate::config::WireguardMode::Auto);
            return Ok(true);
        }
        let (Some(o6), Some(s6)) = (self.v6.as_mut(), self.held.subnet6) else { return Ok(false) };
        let first = netdev::first_ipv6(&self.spec.iface).ok().flatten();
        // Asked only when there is somewhere to move to.
        let kept = first.is_some_and(|ip| ip != o6.public_ip) && netdev::has_ipv6(&self.spec.iface, o6.public_ip).unwrap_or(true);
        let Some(ip) = ipv6_moved(o6.public_ip, first, kept) else { return Ok(false) };
        tracing::warn!(old = %o6.public_ip, new = %ip, "this node's public IPv6 address changed; moving flannel-v6 and the lease to it");
        let (vni, port, mtu) = (self.cfg.backend.vni, self.cfg.backend.port, self.cfg.backend.mtu);
        match o6.rebuild(ip, vni, port, &self.spec.iface, mtu, s6, &self.spec.bpffs_dir) {
            Ok(()) => {
                self.state.public_ip_changes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(public_ipv6 = %ip, "flannel-v6 moved to the new public IPv6 address");
            }
            Err(e) => tracing::error!(error = %crate::error_chain(e.as_ref()), "moving flannel-v6 to the new address failed; trying again"),
        }
        Ok(true)
    }

    /// The node's public address changed (DHCP, an operator) and was not fixed by
    /// --public-ip: move the data plane to it (the vxlan device is bound to its address, so
    /// it is made again, with a new VtepMAC) and rewrite our lease with the new PublicIP and
    /// VtepMAC under the same etcd lease; peers' routes follow the lease. No restart.
    /// True if it moved (the etcd connections were made anew).
    pub(super) async fn follow_public_ip(&mut self) -> Result<bool> {
        if self.opts.public_ip.is_some() || self.ebpf.is_none() || !self.cfg.enable_ipv4 {
            return Ok(false);
        }
        let now = netdev::resolve_interface(&self.opts.iface, None).ok().map(|u| (u.iface, u.public_ip));
        let Some((iface, ip)) = address_moved((&self.spec.iface, self.spec.public_ip), now) else { return Ok(false) };
        tracing::warn!(old = %self.spec.public_ip, new = %ip, %iface, "this node's public address changed; moving the data plane and the lease to it");
        let mut spec = self.spec.clone();
        spec.iface = iface;
        spec.public_ip = ip;
        spec.underlay_ip = ip;
        let dp = match super::bringup::dataplane_up(&spec).await {
            Ok(dp) => dp,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(e.as_ref()), "moving the data plane to the new address failed; trying again");
                return Ok(false);
            }
        };
        let attrs = self.keep_v6(match spec.mode {
            EncapMode::Vxlan => LeaseAttrs::vxlan(ip, spec.vni, dp.device.mac),
            EncapMode::Udp => LeaseAttrs::udp(ip),
            EncapMode::Ipip => LeaseAttrs::ipip(ip),
        });
        self.spec = spec;
        self.ebpf = Some(dp);
        // A firewall guard names the tunnel address: it follows, now.
        if let Err(e) = self.renew_rules().await {
            tracing::error!(error = %crate::error_chain(e.as_ref()), "updating the rules for the new address failed; the periodic check tries again");
        }
        // The client's connections left from the old address, which is gone: waiting for
        // them to time out would leave the lease naming an address nobody answers on.
        self.reg = super::etcd::connect(&self.opts.etcd).await?;
        self.start_keeper();
        let subnet = self.held.subnet;
        self.announce(attrs).await?;
        self.state.public_ip_changes.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(public_ip = %ip, %subnet, "data plane and lease moved to the new public address");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_names_the_first_thing_missing() {
        let whole = DeviceSeen { link: Some((7, true)), address: true, route: true, encap_filter: true, decap_filter: true };
        assert_eq!(damage(7, &whole), None);
        assert_eq!(damage(7, &DeviceSeen { link: None, ..whole }), Some("the device is gone"));
        assert_eq!(damage(7, &DeviceSeen { link: Some((9, true)), ..whole }), Some("the device was recreated by someone else"));
        assert_eq!(damage(7, &DeviceSeen { link: Some((7, false)), address: false, ..whole }), Some("the device is down"));
        assert_eq!(damage(7, &DeviceSeen { address: false, route: false, ..whole }), Some("its address is gone or changed"));
        assert_eq!(damage(7, &DeviceSeen { route: false, ..whole }), Some("the network's route no longer goes through it"));
        assert_eq!(damage(7, &DeviceSeen { encap_filter: false, ..whole }), Some("its encapsulation filter is gone"));
        assert_eq!(damage(7, &DeviceSeen { decap_filter: false, ..whole }), Some("the underlay's decapsulation filter is gone"));
    }

    #[test]
    fn the_data_plane_follows_a_new_address_and_keeps_the_old_one_through_a_gap() {
        let a: Ipv4Addr = "192.168.100.1".parse().unwrap();
        let b: Ipv4Addr = "192.168.100.9".parse().unwrap();
        assert_eq!(address_moved(("eth0", a), Some(("eth0".into(), a))), None);
        assert_eq!(address_moved(("eth0", a), None), None, "no address for a moment");
        assert_eq!(address_moved(("eth0", a), Some(("eth0".into(), b))), Some(("eth0".into(), b)));
        assert_eq!(address_moved(("eth0", a), Some(("eth1".into(), a))), Some(("eth1".into(), a)));
        let (x, y): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        assert_eq!(ipv6_moved(x, Some(y), false), Some(y));
        assert_eq!(ipv6_moved(x, Some(y), true), None, "the old address is still there: stay");
        assert_eq!(ipv6_moved(x, None, false), None, "no global address for a moment");
        assert_eq!(ipv6_moved(x, Some(x), false), None);
    }
}
