//! What the maps should hold, given the leases: a pure function of the leases and the maps'
//! current routes, so it is tested without a kernel or etcd. Only the daemon applies the
//! result (through `maps`, the only code that writes maps).

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnet::Ipv4Net;
use overlay_common::EncapMode;

use crate::{
    lease::{Lease, LeaseFormatError},
    maps::Route,
};

/// The route a lease asks for on this node, or why it is skipped. Our own subnet and leases
/// that name our own address get no route (they would send packets to ourselves).
pub fn route_for(lease: &Lease, mode: EncapMode, my_subnet: Ipv4Net, my_ip: Ipv4Addr) -> Result<Option<Route>, LeaseFormatError> {
    if lease.subnet == my_subnet || lease.attrs.public_ip == my_ip {
        return Ok(None);
    }
    let vtep_mac = match mode {
        EncapMode::Vxlan => lease.attrs.vtep_mac()?,
        EncapMode::Udp => [0; 6],
    };
    Ok(Some(Route { subnet: lease.subnet, public_ip: lease.attrs.public_ip, vtep_mac }))
}

/// Routes for all leases, and the leases skipped with the reason.
pub fn desired_routes(
    leases: &[Lease],
    mode: EncapMode,
    my_subnet: Ipv4Net,
    my_ip: Ipv4Addr,
) -> (Vec<Route>, Vec<(Ipv4Net, LeaseFormatError)>) {
    let mut routes = Vec::new();
    let mut skipped = Vec::new();
    for l in leases {
        match route_for(l, mode, my_subnet, my_ip) {
            Ok(Some(r)) => routes.push(r),
            Ok(None) => {}
            Err(e) => skipped.push((l.subnet, e)),
        }
    }
    (routes, skipped)
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upsert: Vec<Route>,
    pub remove: Vec<Ipv4Net>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// What to write so that the maps hold exactly `desired`.
pub fn diff(current: &[Route], desired: &[Route]) -> Changes {
    let cur: BTreeMap<Ipv4Net, &Route> = current.iter().map(|r| (r.subnet, r)).collect();
    let want: BTreeMap<Ipv4Net, &Route> = desired.iter().map(|r| (r.subnet, r)).collect();
    Changes {
        upsert: want.iter().filter(|(s, r)| cur.get(s) != Some(r)).map(|(_, r)| **r).collect(),
        remove: cur.keys().filter(|s| !want.contains_key(s)).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;

    fn route(s: &str, ip: u8, mac: u8) -> Route {
        Route { subnet: s.parse().unwrap(), public_ip: Ipv4Addr::new(192, 168, 0, ip), vtep_mac: [mac; 6] }
    }

    #[test]
    fn diff_adds_changes_and_removes() {
        let current = [route("10.0.1.0/24", 1, 1), route("10.0.2.0/24", 2, 2), route("10.0.3.0/24", 3, 3)];
        let desired = [route("10.0.1.0/24", 1, 1), route("10.0.2.0/24", 2, 9), route("10.0.4.0/24", 4, 4)];
        let c = diff(&current, &desired);
        assert_eq!(c.upsert, vec![route("10.0.2.0/24", 2, 9), route("10.0.4.0/24", 4, 4)]);
        assert_eq!(c.remove, vec!["10.0.3.0/24".parse::<Ipv4Net>().unwrap()]);
    }

    #[test]
    fn stale_routes_no_lease_backs_are_removed() {
        // flannel #2554: peers deleted while the daemon was down keep their routes.
        let c = diff(&[route("10.0.7.0/24", 7, 7)], &[]);
        assert_eq!(c.remove.len(), 1);
        assert!(diff(&[route("10.0.7.0/24", 7, 7)], &[route("10.0.7.0/24", 7, 7)]).is_empty());
    }

    #[test]
    fn own_and_malformed_leases_get_no_route() {
        let me: Ipv4Net = "10.0.1.0/24".parse().unwrap();
        let my_ip = Ipv4Addr::new(192, 168, 0, 1);
        let leases = [
            Lease { subnet: me, attrs: LeaseAttrs::vxlan(my_ip, 1, [1; 6]), etcd_lease: 1 },
            Lease { subnet: "10.0.9.0/24".parse().unwrap(), attrs: LeaseAttrs::vxlan(my_ip, 1, [1; 6]), etcd_lease: 1 },
            Lease { subnet: "10.0.2.0/24".parse().unwrap(), attrs: LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 2), 1, [2; 6]), etcd_lease: 2 },
            Lease { subnet: "10.0.3.0/24".parse().unwrap(), attrs: LeaseAttrs::udp(Ipv4Addr::new(192, 168, 0, 3)), etcd_lease: 3 },
        ];
        let (routes, skipped) = desired_routes(&leases, EncapMode::Vxlan, me, my_ip);
        assert_eq!(routes, vec![route("10.0.2.0/24", 2, 2)]);
        assert_eq!(skipped, vec![("10.0.3.0/24".parse().unwrap(), LeaseFormatError::NoVtepMac)]);
        let (routes, skipped) = desired_routes(&leases, EncapMode::Udp, me, my_ip);
        assert_eq!(routes.len(), 2, "udp needs no VtepMAC");
        assert!(skipped.is_empty());
        assert_eq!(routes[1].vtep_mac, [0; 6]);
    }
}
