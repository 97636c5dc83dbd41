//! Routes: the network's route to the overlay device, per-peer routes (flannel's, and a
//! degraded node's), DirectRouting's and host-gw's routes via peers, and
//! --ip-blackhole-route's.

use std::net::Ipv4Addr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_core::{
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE,
};
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    AddressFamily, RouteNetlinkMessage,
};

use super::*;

pub(super) fn route6_message(dst: Ipv6Net) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet6;
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet6(dst.network())));
    m
}

/// flannel's IPv6 vxlan route for a peer: its subnet via the subnet's network address,
/// `onlink` on flannel-v6 (the neighbour entry gives that address the peer's VtepMAC).
pub fn set_peer_route6(dev: &str, subnet: Ipv6Net) -> Result<()> {
    let l = require_link(dev)?;
    let mut m = route6_message(subnet);
    m.header.flags = RouteFlags::Onlink;
    m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet6(subnet.network())));
    m.attributes.push(RouteAttribute::Oif(l.ifindex));
    change(&format!("route {subnet} via {dev}"), RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_REPLACE)
}

/// The IPv6 network routed through `device` (scope link): flannel's wireguard backend's
/// route on flannel-wg-v6.
pub fn route_network_link6(network: Ipv6Net, device: &str) -> Result<()> {
    let l = require_link(device)?;
    let mut m = route6_message(network);
    m.header.scope = RouteScope::Link;
    m.attributes.push(RouteAttribute::Oif(l.ifindex));
    change(&format!("route {network} to {device}"), RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_REPLACE)
}

pub fn del_peer_route6(subnet: Ipv6Net) -> Result<()> {
    delete_route(&format!("remove route {subnet}"), route6_message(subnet))
}

/// Every IPv6 route the kernel has, each with its destination network (where it has one).
fn routes6() -> Result<Vec<(RouteMessage, Option<Ipv6Net>)>> {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet6;
    let msgs = request("list IPv6 routes", RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| if let RouteNetlinkMessage::NewRoute(r) = m { Some(r) } else { None })
        .map(|r| {
            let dst = r.attributes.iter().find_map(|a| if let RouteAttribute::Destination(RouteAddress::Inet6(d)) = a { Some(*d) } else { None });
            let net = dst.and_then(|d| Ipv6Net::new(d, r.header.destination_prefix_length).ok());
            (r, net)
        })
        .collect())
}

/// The IPv6 routes through `dev` that have a gateway (the peer routes), by destination.
pub fn peer_routes6(dev: &str) -> Result<Vec<Ipv6Net>> {
    let Some(l) = link(dev)? else { return Ok(Vec::new()) };
    Ok(routes6()?
        .into_iter()
        .filter(|(r, _)| r.attributes.contains(&RouteAttribute::Oif(l.ifindex)) && r.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))))
        .filter_map(|(_, n)| n)
        .collect())
}

/// The main table's IPv6 routes through `ifindex` other than link-local and multicast ones.
pub(super) fn routes6_through(ifindex: u32) -> Result<Vec<Ipv6Net>> {
    Ok(routes6()?
        .into_iter()
        .filter(|(r, _)| r.header.table == RouteHeader::RT_TABLE_MAIN && r.attributes.contains(&RouteAttribute::Oif(ifindex)))
        .filter_map(|(_, n)| n)
        .filter(|n| n.network().segments()[0] & 0xffc0 != 0xfe80 && !n.network().is_multicast())
        .collect())
}

/// Remove the IPv6 route to `dst` through `ifindex`.
pub(super) fn del_route6_through(dst: Ipv6Net, ifindex: u32) -> Result<()> {
    let mut m = route6_message(dst);
    m.header.protocol = RouteProtocol::Unspec;
    m.header.scope = RouteScope::Universe;
    m.attributes.push(RouteAttribute::Oif(ifindex));
    delete_route(&format!("remove route {dst}"), m)
}

/// Whether the route for the whole IPv6 `network` goes to `device` (flannel-wg-v6's).
pub fn network_route6_via(network: Ipv6Net, device: &str) -> Result<bool> {
    let Some(l) = link(device)? else { return Ok(false) };
    Ok(routes6()?
        .iter()
        .any(|(r, n)| r.header.table == RouteHeader::RT_TABLE_MAIN && *n == Some(network) && r.attributes.contains(&RouteAttribute::Oif(l.ifindex))))
}

/// flannel's vxlan route for a peer (IPv4, the kernel device carrying the traffic): its
/// subnet via the subnet's network address, `onlink` on the device (the neighbour entry
/// gives that address the peer's VtepMAC).
pub fn set_peer_route(dev: &str, subnet: Ipv4Net) -> Result<()> {
    let l = require_link(dev)?;
    let mut m = route_message(subnet, RouteProtocol::Boot, RouteType::Unicast);
    m.header.flags = RouteFlags::Onlink;
    m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(subnet.network())));
    m.attributes.push(RouteAttribute::Oif(l.ifindex));
    change(&format!("route {subnet} via {dev}"), RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_REPLACE)
}

pub fn del_peer_route(subnet: Ipv4Net) -> Result<()> {
    delete_route(&format!("remove route {subnet}"), route_message(subnet, RouteProtocol::Boot, RouteType::Unicast))
}

/// The IPv4 routes through `dev` that go via a gateway (the peer routes of `set_peer_route`,
/// and the eBPF data plane's one network route).
pub fn peer_routes(dev: &str) -> Result<Vec<(Ipv4Net, Ipv4Addr)>> {
    let Some(l) = link(dev)? else { return Ok(Vec::new()) };
    Ok(all_routes()?
        .into_iter()
        .filter(|r| r.header.table == RouteHeader::RT_TABLE_MAIN && r.attributes.contains(&RouteAttribute::Oif(l.ifindex)))
        .filter_map(|r| {
            let dst = r.attributes.iter().find_map(|a| if let RouteAttribute::Destination(RouteAddress::Inet(d)) = a { Some(*d) } else { None })?;
            let gw = r.attributes.iter().find_map(|a| if let RouteAttribute::Gateway(RouteAddress::Inet(g)) = a { Some(*g) } else { None })?;
            Some((Ipv4Net::new(dst, r.header.destination_prefix_length).ok()?, gw))
        })
        .collect())
}

/// The next hop of the overlay route. Any address works on a NOARP device: routing the whole
/// network through one `onlink` next hop keeps one neighbour entry instead of one per remote
/// container (the kernel's gc_thresh3 is 1024).
pub const OVERLAY_NEXTHOP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// A main-table IPv4 route message for `dst` (protocol and type given), universe scope.
pub(super) fn route_message(dst: Ipv4Net, protocol: RouteProtocol, kind: RouteType) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = dst.prefix_len();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = protocol;
    m.header.scope = RouteScope::Universe;
    m.header.kind = kind;
    m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(dst.network())));
    m
}

/// Every IPv4 route of every table (a dump).
pub(super) fn all_routes() -> Result<Vec<RouteMessage>> {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    let msgs = request("list routes", RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?;
    Ok(msgs.into_iter().filter_map(|m| if let RouteNetlinkMessage::NewRoute(r) = m { Some(r) } else { None }).collect())
}

/// Route the whole overlay network to the device (the node's own subnet stays on its bridge,
/// a longer prefix).
pub fn route_network(network: Ipv4Net, device: &str) -> Result<()> {
    let l = require_link(device)?;
    let mut m = route_message(network, RouteProtocol::Boot, RouteType::Unicast);
    m.header.flags = RouteFlags::Onlink;
    m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(OVERLAY_NEXTHOP)));
    m.attributes.push(RouteAttribute::Oif(l.ifindex));
    change(&format!("route {network} to {device}"), RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_REPLACE)
}

/// Route the whole overlay network to a layer-3 device with no next hop (scope link): the
/// wireguard backend's route through flannel-wg, as flannel's addRoute makes it.
pub fn route_network_link(network: Ipv4Net, device: &str) -> Result<()> {
    let l = require_link(device)?;
    let mut m = route_message(network, RouteProtocol::Boot, RouteType::Unicast);
    m.header.scope = RouteScope::Link;
    m.attributes.push(RouteAttribute::Oif(l.ifindex));
    change(&format!("route {network} to {device}"), RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_REPLACE)
}

/// The metric of the `--ip-blackhole-route` route: worse than the bridge's own route to the
/// subnet (metric 0), so it only catches traffic while the bridge or its route is missing.
pub const BLACKHOLE_METRIC: u32 = 4096;

/// flannel's `--ip-blackhole-route`: a blackhole route for one of the node's own subnets
/// (IPv4 or IPv6), so that traffic to it is dropped here (not sent out the default route)
/// while no bridge holds it.
pub fn blackhole_route(subnet: IpNet) -> Result<()> {
    change(&format!("blackhole route for {subnet}"), RouteNetlinkMessage::NewRoute(blackhole_message(subnet)), NLM_F_CREATE | NLM_F_REPLACE)
}

/// The routing protocol number marking the direct routes this agent adds (vxlan's
/// `DirectRouting`), so that a restart finds and tidies its own and no one else's
/// (`ip route` shows `proto 97`).
pub const DIRECT_ROUTE_PROTO: u8 = 97;

/// Whether `peer` is on one of this node's links: the route to it goes out `underlay` with no
/// gateway (flannel's test for DirectRouting).
pub fn directly_reachable(peer: Ipv4Addr, underlay: &str) -> Result<bool> {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = 32;
    m.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(peer)));
    let msgs = match request(&format!("route to {peer}"), RouteNetlinkMessage::GetRoute(m), 0) {
        Err(e) if is_errno(&e, libc::ENETUNREACH) || is_errno(&e, libc::EHOSTUNREACH) => return Ok(false),
        r => r?,
    };
    let Some(r) = msgs.iter().find_map(|m| if let RouteNetlinkMessage::NewRoute(r) = m { Some(r) } else { None }) else {
        return Ok(false);
    };
    let gateway = r.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_)));
    let oif = r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None });
    Ok(!gateway && r.header.kind == RouteType::Unicast && oif.and_then(name_of).as_deref() == Some(underlay))
}

pub(super) fn direct_route_message(subnet: Ipv4Net) -> RouteMessage {
    route_message(subnet, RouteProtocol::Other(DIRECT_ROUTE_PROTO), RouteType::Unicast)
}

/// Route `subnet` straight to `via` on `underlay` (no encapsulation), replacing ours.
pub fn set_direct_route(subnet: Ipv4Net, via: Ipv4Addr, underlay: &str) -> Result<()> {
    let l = require_link(underlay)?;
    let mut m = direct_route_message(subnet);
    m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(via)));
    m.attributes.push(RouteAttribute::Oif(l.ifindex));
    change(&format!("direct route {subnet} via {via}"), RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_REPLACE)
}

/// Route `subnet` via the peer `via` through the ipip device `dev` (`onlink`: the peer is the
/// outer destination, not a neighbour on the device), replacing ours, as flannel's ipip
/// backend routes each lease; marked ours as direct routes are (`direct_routes` lists both).
pub fn set_tunnel_route(subnet: Ipv4Net, via: Ipv4Addr, dev: &str) -> Result<()> {
    let l = require_link(dev)?;
    let mut m = direct_route_message(subnet);
    m.header.flags = RouteFlags::Onlink;
    m.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(via)));
    m.attributes.push(RouteAttribute::Oif(l.ifindex));
    change(&format!("route {subnet} via {via} on {dev}"), RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_REPLACE)
}

/// Remove our direct route for `subnet` (none: nothing to do).
pub fn del_direct_route(subnet: Ipv4Net) -> Result<()> {
    delete_route(&format!("remove direct route {subnet}"), direct_route_message(subnet))
}

/// The direct routes this agent added (ours by `DIRECT_ROUTE_PROTO`), as (subnet, via).
pub fn direct_routes() -> Result<Vec<(Ipv4Net, Ipv4Addr)>> {
    Ok(all_routes()?
        .iter()
        .filter(|r| r.header.protocol == RouteProtocol::Other(DIRECT_ROUTE_PROTO))
        .filter_map(|r| {
            let via = r.attributes.iter().find_map(|a| if let RouteAttribute::Gateway(RouteAddress::Inet(g)) = a { Some(*g) } else { None })?;
            Some((destination(r)?, via))
        })
        .collect())
}

/// The same with each route's output interface (its ifindex; 0 if it names none).
pub fn direct_routes_via() -> Result<Vec<(Ipv4Net, Ipv4Addr, u32)>> {
    Ok(all_routes()?
        .iter()
        .filter(|r| r.header.protocol == RouteProtocol::Other(DIRECT_ROUTE_PROTO))
        .filter_map(|r| {
            let via = r.attributes.iter().find_map(|a| if let RouteAttribute::Gateway(RouteAddress::Inet(g)) = a { Some(*g) } else { None })?;
            let oif = r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None }).unwrap_or(0);
            Some((destination(r)?, via, oif))
        })
        .collect())
}

/// A route's IPv4 destination network.
pub(super) fn destination(r: &RouteMessage) -> Option<Ipv4Net> {
    let dst = r.attributes.iter().find_map(|a| if let RouteAttribute::Destination(RouteAddress::Inet(d)) = a { Some(*d) } else { None })?;
    Ipv4Net::new(dst, r.header.destination_prefix_length).ok()
}

pub(super) fn blackhole_message(subnet: IpNet) -> RouteMessage {
    let mut m = match subnet {
        IpNet::V4(n) => route_message(n, RouteProtocol::Boot, RouteType::BlackHole),
        IpNet::V6(n) => {
            let mut m = route6_message(n);
            m.header.kind = RouteType::BlackHole;
            m
        }
    };
    m.attributes.push(RouteAttribute::Priority(BLACKHOLE_METRIC));
    m
}

/// The `--ip-blackhole-route` routes on this node (blackholes with our metric), both families.
pub fn blackhole_routes() -> Result<Vec<IpNet>> {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet6;
    let v6 = request("list IPv6 routes", RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?;
    let v6 = v6.into_iter().filter_map(|m| if let RouteNetlinkMessage::NewRoute(r) = m { Some(r) } else { None });
    Ok(all_routes()?
        .into_iter()
        .chain(v6)
        .filter(|r| r.header.kind == RouteType::BlackHole && r.attributes.contains(&RouteAttribute::Priority(BLACKHOLE_METRIC)))
        .filter_map(|r| {
            let len = r.header.destination_prefix_length;
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Ipv4Net::new(*d, len).ok().map(IpNet::V4),
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => Ipv6Net::new(*d, len).ok().map(IpNet::V6),
                _ => None,
            })
        })
        .collect())
}

pub fn del_blackhole_route(subnet: IpNet) -> Result<()> {
    delete_route(&format!("remove blackhole route {subnet}"), blackhole_message(subnet))
}

/// Whether the route for the whole `network` goes to `device` (the overlay route).
pub fn network_route_via(network: Ipv4Net, device: &str) -> Result<bool> {
    let Some(dev) = link(device)? else { return Ok(false) };
    Ok(all_routes()?.iter().any(|r| {
        r.header.table == RouteHeader::RT_TABLE_MAIN && destination(r) == Some(network) && r.attributes.contains(&RouteAttribute::Oif(dev.ifindex))
    }))
}
