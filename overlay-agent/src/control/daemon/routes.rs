//! Routes from leases: a full listing reconciled into the maps (and a dual-stack node's
//! IPv6 routes, and DirectRouting's kernel routes), then one watch event at a time.
//! `reconcile` decides both; this applies them, counting and logging what cannot be
//! applied (a full map, an unreachable peer) without ending the agent.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::atomic::Ordering,
};

use anyhow::Result;
use ipnet::Ipv4Net;

use super::Daemon;
use crate::{
    config::BackendConfig,
    lease::{registry::LeaseEvent, LeaseKey},
    maps::{MapsError, Route},
    netdev, reconcile,
};

/// DirectRouting's kernel routes a previous run left (`ours`) that go: all of them when
/// DirectRouting is off, else those for subnets no lease asks for any more. (host-gw's and
/// ipip's routes are their route tables: the diff keeps them.)
pub(super) fn stale_direct_routes(ours: &[(Ipv4Net, Ipv4Addr)], desired: &[Route], backend: &BackendConfig) -> Vec<Ipv4Net> {
    // host-gw's and ipip's routes are their route tables (ipip's DirectRouting among them).
    if backend.host_gw || backend.mode == overlay_common::EncapMode::Ipip {
        return Vec::new();
    }
    ours.iter()
        .map(|(subnet, _)| *subnet)
        .filter(|subnet| !backend.direct_routing || !desired.iter().any(|r| r.subnet == *subnet))
        .collect()
}

impl Daemon {
    /// This node, as the route decisions need it.
    fn mine(&self) -> reconcile::Mine {
        reconcile::Mine {
            wireguard_port: self.cfg.backend.wireguard.map(|w| w.listen_port),
            ..reconcile::Mine::new(self.held.subnet, self.attrs.public_ip, self.spec.mode)
        }
    }

    /// Make the maps hold exactly the routes the leases ask for.
    pub(super) fn reconcile_all(&mut self, leases: &[crate::lease::Lease]) -> Result<()> {
        let (desired, skipped) = reconcile::desired_routes(leases, &self.mine());
        for (subnet, e) in skipped {
            self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%subnet, error = %e, "lease skipped");
        }
        // Direct routes a previous run left for subnets no lease asks for any more (all of
        // them if DirectRouting is now off), then the ones the leases ask for.
        // (host-gw's routes are the route table itself: the diff below keeps them.)
        let ours = netdev::direct_routes().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "listing direct routes");
            Vec::new()
        });
        for subnet in stale_direct_routes(&ours, &desired, &self.cfg.backend) {
            if let Err(e) = netdev::del_direct_route(subnet) {
                tracing::warn!(%subnet, error = %e, "removing a stale direct route");
            }
        }
        let changes = reconcile::diff(&self.maps.routes()?, &desired);
        // Routes the diff changes get theirs through set_route below; the others here.
        for r in desired.iter().filter(|r| !changes.upsert.contains(r)) {
            self.set_direct_route(r.subnet, Some(r.public_ip))?;
        }
        for r in &changes.upsert {
            self.set_route(r.subnet, Some(r))?;
        }
        for s in &changes.remove {
            self.set_route(*s, None)?;
        }
        tracing::info!(routes = desired.len(), added_or_changed = changes.upsert.len(), removed = changes.remove.len(), "routes reconciled with etcd");
        if let Some(me6) = self.mine6() {
            let mut desired6: BTreeMap<LeaseKey, reconcile::Route6> = BTreeMap::new();
            for l in leases {
                match reconcile::route6_for(l, &me6) {
                    Ok(Some(r)) => {
                        desired6.insert(l.key(), r);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(lease = %l.key(), error = %e, "lease's IPv6 part skipped");
                    }
                }
            }
            self.sync_v6(&desired6);
        }
        Ok(())
    }

    /// This node's IPv6 side, on a dual-stack or IPv6-only node.
    fn mine6(&self) -> Option<reconcile::Mine6> {
        let (public_ipv6, wireguard_port_v6) = match (&self.v6, &self.wg6) {
            (Some(o6), _) => (o6.public_ip, None),
            (None, Some(w6)) => (w6.public_ip, Some(w6.dev.listen_port)),
            (None, None) => return None,
        };
        // One wireguard device for both families (Modes auto, ipv4, ipv6).
        let joint = self.cfg.backend.wireguard.filter(|_| self.cfg.wireguard_joint()).map(|w| reconcile::JointSide {
            mode: w.mode,
            listen_port: w.listen_port,
            network4: self.cfg.enable_ipv4.then_some(self.cfg.network),
            public_ip: self.cfg.enable_ipv4.then_some(self.attrs.public_ip),
            public_ipv6,
        });
        Some(reconcile::Mine6 { config: self.cfg.ipv6?, key: self.held.key(), public_ip: self.attrs.public_ip, public_ipv6: Some(public_ipv6), wireguard_port_v6, joint })
    }

    /// Whether leases of `key`'s kind are this network's (`NetworkConfig::takes`); the others
    /// are passed over (logged at debug level, not counted: they are not malformed).
    pub(super) fn takes(&self, key: &LeaseKey) -> bool {
        let takes = self.cfg.takes(key);
        if !takes {
            tracing::debug!(lease = %key, ipv6_only_network = !self.cfg.enable_ipv4, "a lease of another kind of network (IPv6-only or not): no route");
        }
        takes
    }

    /// Whether `key` names the subnet we hold (the IPv4 one; in an IPv6-only network the IPv6
    /// one).
    fn holds(&self, key: &LeaseKey) -> bool {
        if self.cfg.enable_ipv4 {
            key.v4 == self.held.subnet
        } else {
            key.v6 == self.held.subnet6
        }
    }

    /// Make the IPv6 device's peer routes exactly `desired` (a failure is counted and logged:
    /// the IPv4 overlay goes on).
    fn sync_v6(&mut self, desired: &BTreeMap<LeaseKey, reconcile::Route6>) {
        let r = match (self.v6.as_mut(), self.wg6.as_mut()) {
            (Some(o6), _) => o6.sync(desired),
            (None, Some(w6)) => w6.sync(desired),
            (None, None) => return,
        };
        if let Err(e) = r {
            self.state.route_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %crate::error_chain(e.as_ref()), "could not set the IPv6 routes");
        }
    }

    /// One lease's IPv6 route (`None`: none), as `reconcile::route6_for` decides it.
    fn set_route6(&mut self, key: LeaseKey, want: Option<reconcile::Route6>) {
        let r = match (self.v6.as_mut(), self.wg6.as_mut()) {
            (Some(o6), _) => o6.set(key, want),
            (None, Some(w6)) => w6.set(key, want),
            (None, None) => return,
        };
        if let Err(e) = r {
            self.state.route_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(lease = %key, error = %crate::error_chain(e.as_ref()), "could not set the IPv6 route");
        }
    }

    pub(super) async fn handle(&mut self, ev: LeaseEvent) -> Result<()> {
        let key = match &ev {
            LeaseEvent::Put(l) => Some(l.key()),
            LeaseEvent::Delete(k) => Some(*k),
            LeaseEvent::Malformed(..) => None,
        };
        if key.is_some_and(|k| !self.takes(&k)) {
            return Ok(());
        }
        // The IPv6 routes: none for a key of ours (a previous holder's entries go, should its
        // deletion arrive after we took the subnet), none left for a deleted key.
        if let Some(me6) = self.mine6() {
            match &ev {
                LeaseEvent::Put(l) => {
                    let r6 = if self.holds(&l.key()) {
                        None
                    } else {
                        reconcile::route6_for(l, &me6).unwrap_or_else(|e| {
                            self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(lease = %l.key(), error = %e, "lease's IPv6 part skipped");
                            None
                        })
                    };
                    self.set_route6(l.key(), r6);
                }
                LeaseEvent::Delete(k) => self.set_route6(*k, None),
                LeaseEvent::Malformed(..) => {}
            }
        }
        // An IPv6-only node has no IPv4 routes: only its own lease's fate is left to decide.
        if !self.cfg.enable_ipv4 {
            match ev {
                LeaseEvent::Put(l) if self.holds(&l.key()) && !self.attrs.same_node(&l.attrs) => {
                    tracing::error!(lease = %l.key(), other = ?l.attrs.public_ipv6.map(|a| a.to_string()), "our subnet's lease now names another node");
                }
                LeaseEvent::Delete(k) if self.holds(&k) => self.lost_lease("deleted from etcd").await?,
                LeaseEvent::Malformed(key, e) => self.skipped_lease(&key, &e),
                _ => {}
            }
            return Ok(());
        }
        let me = self.mine();
        match reconcile::on_event(&ev, &me) {
            reconcile::EventAction::SetRoute { subnet, route, skipped } => {
                if let Some(e) = skipped {
                    self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%subnet, error = %e, "lease skipped");
                }
                self.set_route(subnet, route.as_ref())?;
            }
            reconcile::EventAction::LostOwn => self.lost_lease("deleted from etcd").await?,
            reconcile::EventAction::OwnNamesOther(other) => {
                tracing::error!(subnet = %self.held.subnet, %other, "our subnet's lease now names another node");
            }
            reconcile::EventAction::Skipped(key, e) => self.skipped_lease(&key, &e),
        }
        Ok(())
    }

    /// A key under subnets/ that gives no lease: counted and logged if malformed; an IPv6-only
    /// node's lease is not malformed, only of no use to a network with IPv4.
    pub(super) fn skipped_lease(&self, key: &str, e: &crate::lease::LeaseFormatError) {
        if matches!(e, crate::lease::LeaseFormatError::Ipv6Only(_)) {
            tracing::debug!(%key, "an IPv6-only lease: no IPv4 route to add");
            return;
        }
        self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%key, error = %e, "skipping a lease that is not in flannel's format");
    }

    /// Make `subnet`'s route what its lease asks for (`want`; `None`: no route). The one way
    /// routes change, for watch events and listings alike.
    fn set_route(&mut self, subnet: Ipv4Net, want: Option<&Route>) -> Result<()> {
        match want {
            Some(r) => {
                if self.add_route(r) {
                    tracing::info!(subnet = %r.subnet, public_ip = %r.public_ip, "route added or updated");
                }
            }
            None => match self.maps.remove_route(subnet) {
                Ok(()) => tracing::info!(%subnet, "route removed: no lease asks for it (deleted, expired, or no longer usable)"),
                Err(MapsError::NoSuchRoute(_)) => {}
                Err(e) => return Err(e.into()),
            },
        }
        self.set_direct_route(subnet, want.map(|r| r.public_ip))?;
        Ok(())
    }

    /// vxlan's DirectRouting, as flannel decides it per peer: a peer on the underlay's own
    /// link (the route to it has no gateway) gets a kernel route for its subnet via its
    /// address, which takes the subnet's traffic past the overlay device unencapsulated; the
    /// others stay encapsulated. Without DirectRouting, or with no peer: no such route.
    fn set_direct_route(&mut self, subnet: Ipv4Net, peer: Option<Ipv4Addr>) -> Result<()> {
        // ipip's route table routes a peer on the same link directly itself.
        if !self.cfg.backend.direct_routing || self.cfg.backend.mode == overlay_common::EncapMode::Ipip {
            return Ok(());
        }
        let direct = match peer {
            Some(ip) => netdev::directly_reachable(ip, &self.spec.iface).unwrap_or(false).then_some(ip),
            None => None,
        };
        let done = match direct {
            Some(via) => netdev::set_direct_route(subnet, via, &self.spec.iface).map(|()| {
                tracing::info!(%subnet, %via, "peer on the same link: routed directly (DirectRouting)");
            }),
            None => netdev::del_direct_route(subnet),
        };
        // Like a full map: counted and logged, never the end of the agent (the subnet stays
        // reachable through the tunnel route).
        if let Err(e) = done {
            self.state.route_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%subnet, error = %e, "could not set the direct route");
        }
        Ok(())
    }

    /// Add or update a route; a failure (a full map) is logged and counted, never fatal and
    /// never silent: the rest of the routes keep working.
    fn add_route(&mut self, r: &Route) -> bool {
        match self.maps.upsert_route(r) {
            Ok(()) => true,
            Err(e) => {
                self.state.route_errors.fetch_add(1, Ordering::Relaxed);
                match e {
                    MapsError::NotOnLink { .. } | MapsError::Host(_) => {
                        tracing::error!(subnet = %r.subnet, public_ip = %r.public_ip, error = %e, "could not add the route")
                    }
                    _ => tracing::error!(
                        subnet = %r.subnet, public_ip = %r.public_ip, error = %e,
                        "could not add the route: the route or peer map is probably full (raise --max-routes / --max-peers)"
                    ),
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_routes_go_when_no_lease_asks_for_them_or_direct_routing_is_off() {
        let net = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        let via: Ipv4Addr = "192.168.100.2".parse().unwrap();
        let ours = [(net("10.244.2.0/24"), via), (net("10.244.3.0/24"), via)];
        let desired = [Route { subnet: net("10.244.2.0/24"), public_ip: via, vtep_mac: [0; 6], wireguard: None }];
        let mut b = crate::config::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#).unwrap().backend;
        assert_eq!(stale_direct_routes(&ours, &desired, &b), vec![net("10.244.3.0/24")]);
        b.direct_routing = false;
        assert_eq!(stale_direct_routes(&ours, &desired, &b), vec![net("10.244.2.0/24"), net("10.244.3.0/24")]);
        b.host_gw = true;
        assert_eq!(stale_direct_routes(&ours, &desired, &b), vec![], "host-gw's routes are its route table");
        b.host_gw = false;
        b.mode = overlay_common::EncapMode::Ipip;
        assert_eq!(stale_direct_routes(&ours, &desired, &b), vec![], "ipip's too");
    }
}
