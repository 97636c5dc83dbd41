//! flannel's ipip backend: the kernel's `flannel.ipip` device encapsulates and
//! decapsulates IP-in-IP, with a route per lease via the peer's address (`onlink`), or
//! straight through the underlay for a peer on the same link (`DirectRouting`), as flannel
//! routes them (pkg/backend/ipip). What this data plane adds: the decap programs on the
//! underlay check every IP-in-IP packet to the node before the device opens it (a peer's,
//! its inner source in the sending peer's subnet, the fragment rules), so the route map holds
//! the peers as on a vxlan node; the guard's rule keeps IP-in-IP that did not come in on the
//! underlay from the device. No encapsulation program: the kernel device does it.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::{
    maps::{Maps, MapsError, Route},
    netdev,
    tun::RouteTable,
};

/// flannel's device name for the ipip backend.
pub const DEVICE: &str = "flannel.ipip";

/// The routes of an ipip node: kernel routes (ours by their protocol, as DirectRouting's),
/// and the same peers in the route map where the checks run (`maps`: none on a node whose
/// programs cannot run).
pub struct IpipRoutes {
    pub maps: Option<Maps>,
    pub device: String,
    pub iface: String,
    pub direct_routing: bool,
}

fn host(e: impl std::fmt::Display) -> MapsError {
    MapsError::Host(e.to_string())
}

/// The routes as the reconcile sees them: those in the kernel (subnet, peer, output
/// interface) and, where the checks run, in the map alike. One that only one of them has,
/// that they give different peers, or that leaves through another interface than the one
/// it should (`expected_oif` of its peer: the underlay for DirectRouting's peers on the same
/// link, else the device) is given with no peer, so that a lease asking for it writes both
/// again and one that does not removes both.
pub fn merged(kernel: &[(Ipv4Net, Ipv4Addr, u32)], map: Option<&[Route]>, expected_oif: impl Fn(Ipv4Addr) -> u32) -> Vec<Route> {
    let none = Ipv4Addr::UNSPECIFIED;
    let mut out: Vec<Route> = kernel
        .iter()
        .map(|(subnet, via, oif)| {
            let agrees = map.is_none_or(|m| m.iter().any(|r| r.subnet == *subnet && r.public_ip == *via)) && *oif == expected_oif(*via);
            Route { subnet: *subnet, public_ip: if agrees { *via } else { none }, vtep_mac: [0; 6], wireguard: None }
        })
        .collect();
    for r in map.unwrap_or_default() {
        if !kernel.iter().any(|(s, _, _)| *s == r.subnet) {
            out.push(Route { subnet: r.subnet, public_ip: none, vtep_mac: [0; 6], wireguard: None });
        }
    }
    out
}

/// Whether the kernel's routes and the map hold different subnets or peers (ignoring which
/// interface: that needs a route lookup per peer, left to the reconcile).
pub fn apart(kernel: &[(Ipv4Net, Ipv4Addr, u32)], map: &[Route]) -> bool {
    kernel.len() != map.len() || map.iter().any(|r| !kernel.iter().any(|(s, via, _)| *s == r.subnet && *via == r.public_ip))
}

impl RouteTable for IpipRoutes {
    fn routes(&self) -> Result<Vec<Route>, MapsError> {
        let kernel = netdev::direct_routes_via().map_err(host)?;
        let map = self.maps.as_ref().map(|m| m.routes()).transpose()?;
        let (device, underlay) = (netdev::index_of(&self.device).unwrap_or(0), netdev::index_of(&self.iface).unwrap_or(0));
        let expected = |via| match self.direct_routing && netdev::directly_reachable(via, &self.iface).unwrap_or(false) {
            true => underlay,
            false => device,
        };
        Ok(merged(&kernel, map.as_deref(), expected))
    }

    fn upsert_route(&mut self, r: &Route) -> Result<(), MapsError> {
        if let Some(m) = self.maps.as_mut() {
            m.upsert_route(r)?;
        }
        let direct = self.direct_routing && netdev::directly_reachable(r.public_ip, &self.iface).unwrap_or(false);
        if direct {
            tracing::info!(subnet = %r.subnet, via = %r.public_ip, "peer on the same link: routed directly (DirectRouting)");
            netdev::set_direct_route(r.subnet, r.public_ip, &self.iface).map_err(host)
        } else {
            netdev::set_tunnel_route(r.subnet, r.public_ip, &self.device).map_err(host)
        }
    }

    fn remove_route(&mut self, subnet: Ipv4Net) -> Result<(), MapsError> {
        let in_kernel = netdev::direct_routes().map_err(host)?.iter().any(|(s, _)| *s == subnet);
        let in_map = match self.maps.as_mut().map(|m| m.remove_route(subnet)) {
            None | Some(Err(MapsError::NoSuchRoute(_))) => false,
            Some(Ok(())) => true,
            Some(Err(e)) => return Err(e),
        };
        if in_kernel {
            netdev::del_direct_route(subnet).map_err(host)?;
        }
        if !in_kernel && !in_map {
            return Err(MapsError::NoSuchRoute(subnet));
        }
        Ok(())
    }

    fn drifted(&self) -> bool {
        // A device made again (self-healing) took its routes with it; an operator may delete
        // one. Without the map (no checks running) there is nothing to compare with.
        let Some(maps) = self.maps.as_ref() else { return false };
        match (netdev::direct_routes_via(), maps.routes()) {
            (Ok(kernel), Ok(map)) => apart(&kernel, &map),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_and_the_map_must_agree_for_a_route_to_count() {
        let s = |x: &str| -> Ipv4Net { x.parse().unwrap() };
        let (a, b): (Ipv4Addr, Ipv4Addr) = ("192.168.100.2".parse().unwrap(), "192.168.100.3".parse().unwrap());
        let route = |subnet, public_ip| Route { subnet, public_ip, vtep_mac: [0; 6], wireguard: None };
        // Interface 7 is flannel.ipip, 2 the underlay; peer b is on the underlay's link.
        let oif = |via: Ipv4Addr| if via == b { 2 } else { 7 };
        let kernel = [(s("10.244.2.0/24"), a, 7), (s("10.244.3.0/24"), b, 7), (s("10.244.4.0/24"), a, 7), (s("10.244.6.0/24"), b, 2)];
        let map = [route(s("10.244.2.0/24"), a), route(s("10.244.3.0/24"), b), route(s("10.244.5.0/24"), b), route(s("10.244.6.0/24"), b)];
        let none = Ipv4Addr::UNSPECIFIED;
        assert_eq!(
            merged(&kernel, Some(&map), oif),
            vec![
                route(s("10.244.2.0/24"), a),
                route(s("10.244.3.0/24"), none),
                route(s("10.244.4.0/24"), none),
                route(s("10.244.6.0/24"), b),
                route(s("10.244.5.0/24"), none),
            ],
            "agreeing and through the right interface: as is; through the wrong one, missing from the map, or from the kernel: no peer"
        );
        assert_eq!(merged(&kernel, None, |_| 7)[0], route(s("10.244.2.0/24"), a), "no checks running: the kernel's routes alone");
        assert!(apart(&kernel, &map), "4 in the kernel, a different 4 in the map");
        let same: Vec<Route> = kernel.iter().map(|(s, via, _)| route(*s, *via)).collect();
        assert!(!apart(&kernel, &same));
        assert!(apart(&kernel[..3], &same), "a route gone from the kernel");
    }
}
