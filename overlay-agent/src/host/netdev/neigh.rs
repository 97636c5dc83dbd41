//! Neighbour and forwarding entries of the vxlan devices: flannel's permanent ARP/NDP
//! entries and FDB entries per peer, read back when taking over a flanneld node.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::Ipv4Net;
use netlink_packet_core::{
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE,
};
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
    AddressFamily, RouteNetlinkMessage,
};

use super::*;

pub(super) fn neigh6_message(ifindex: u32, ip: Ipv6Addr, mac: [u8; 6]) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet6;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)));
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m
}

/// flannel's AddV6ARP: the peer subnet's network address has the peer's VtepMAC, for good.
pub fn set_neighbour6(dev: &str, ip: Ipv6Addr, mac: [u8; 6]) -> Result<()> {
    let l = require_link(dev)?;
    change(&format!("neighbour {ip} {} on {dev}", format_mac(&mac)), RouteNetlinkMessage::NewNeighbour(neigh6_message(l.ifindex, ip, mac)), NLM_F_CREATE | NLM_F_REPLACE)
}

pub fn del_neighbour6(dev: &str, ip: Ipv6Addr) -> Result<()> {
    let l = require_link(dev)?;
    match change(&format!("remove neighbour {ip} on {dev}"), RouteNetlinkMessage::DelNeighbour(neigh6_message(l.ifindex, ip, [0; 6])), 0) {
        Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// flannel's AddV6FDB: frames for the peer's VtepMAC go to its public IPv6 address.
pub fn vxlan_fdb6_replace(dev: &str, mac: [u8; 6], dst: Ipv6Addr) -> Result<()> {
    let l = require_link(dev)?;
    change(&format!("forwarding entry {} -> {dst} on {dev}", format_mac(&mac)), RouteNetlinkMessage::NewNeighbour(fdb_message(l.ifindex, mac, IpAddr::V6(dst))), NLM_F_CREATE | NLM_F_REPLACE)
}

pub fn vxlan_fdb6_del(dev: &str, mac: [u8; 6], dst: Ipv6Addr) -> Result<()> {
    let l = require_link(dev)?;
    match change(&format!("remove forwarding entry {} -> {dst} on {dev}", format_mac(&mac)), RouteNetlinkMessage::DelNeighbour(fdb_message(l.ifindex, mac, IpAddr::V6(dst))), 0) {
        Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
        r => r,
    }
}

pub(super) fn neigh_message(ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m
}

/// flannel's AddARP: the peer subnet's network address has the peer's VtepMAC, for good.
pub fn set_neighbour(dev: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
    let l = require_link(dev)?;
    change(&format!("neighbour {ip} {} on {dev}", format_mac(&mac)), RouteNetlinkMessage::NewNeighbour(neigh_message(l.ifindex, ip, mac)), NLM_F_CREATE | NLM_F_REPLACE)
}

pub fn del_neighbour(dev: &str, ip: Ipv4Addr) -> Result<()> {
    let l = require_link(dev)?;
    match change(&format!("remove neighbour {ip} on {dev}"), RouteNetlinkMessage::DelNeighbour(neigh_message(l.ifindex, ip, [0; 6])), 0) {
        Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// A vxlan device's forwarding entry: frames for `mac` go to `dst` (either family).
pub(super) fn fdb_message(ifindex: u32, mac: [u8; 6], dst: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m.attributes.push(NeighbourAttribute::Destination(match dst {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    }));
    m
}

/// The VXLAN device's unicast forwarding entries with a destination, as (VtepMAC, peer
/// address): what the kernel device itself sends by. Our encap program sends nearly
/// everything; it leaves to the device only what it cannot encapsulate itself (a packet
/// already tunnelled by a container, a GSO aggregate past 64 KiB, a fragmentable packet
/// bigger than the path), for which the device needs these entries, as flannel writes them.
pub fn vxlan_fdb(dev: &str) -> Result<Vec<([u8; 6], Ipv4Addr)>> {
    let l = require_link(dev)?;
    // A bare ndmsg: with attributes, the kernel's legacy fdb dump parser would read them as
    // an ifinfomsg's (NDA_IFINDEX as IFLA_MASTER) and filter by master. Filtered here.
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    let msgs = request(&format!("list the forwarding entries of {dev}"), RouteNetlinkMessage::GetNeighbour(m), NLM_F_DUMP)?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == l.ifindex => {
                let mut mac = None;
                let mut dst = None;
                for a in &n.attributes {
                    match a {
                        NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => mac = <[u8; 6]>::try_from(b.as_slice()).ok(),
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => dst = Some(*ip),
                        // In a bridge-family message the library cannot tell the address's
                        // family from the header: four bytes are IPv4.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                            dst = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                        }
                        _ => {}
                    }
                }
                Some((mac?, dst?))
            }
            _ => None,
        })
        .filter(|(mac, _)| mac != &[0; 6])
        .collect())
}

/// The IPv4 neighbour entries on `dev` with a link-layer address (flanneld's permanent
/// entries giving each peer subnet's network address the peer's VtepMAC among them).
pub fn neighbours(dev: &str) -> Result<Vec<(Ipv4Addr, [u8; 6])>> {
    let l = require_link(dev)?;
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    let msgs = request(&format!("list the neighbours of {dev}"), RouteNetlinkMessage::GetNeighbour(m), NLM_F_DUMP)?;
    Ok(msgs
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == l.ifindex => {
                let ip = n.attributes.iter().find_map(|a| if let NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) = a { Some(*ip) } else { None })?;
                let mac = n.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => <[u8; 6]>::try_from(b.as_slice()).ok(),
                    _ => None,
                })?;
                Some((ip, mac))
            }
            _ => None,
        })
        .collect())
}

/// The peers a stock flanneld left configured on its vxlan device `dev`, as (subnet, public
/// IP, VtepMAC): each route `subnet via <subnet's network address> onlink`, whose neighbour
/// entry gives the VtepMAC and whose forwarding entry gives where frames for it go.
pub fn flannel_peers(dev: &str) -> Result<Vec<(Ipv4Net, Ipv4Addr, [u8; 6])>> {
    let (neigh, fdb) = (neighbours(dev)?, vxlan_fdb(dev)?);
    Ok(peer_routes(dev)?
        .into_iter()
        .filter(|(subnet, via)| *via == subnet.network())
        .filter_map(|(subnet, via)| {
            let mac = neigh.iter().find(|(ip, _)| *ip == via)?.1;
            let dst = fdb.iter().find(|(m, _)| *m == mac)?.1;
            Some((subnet, dst, mac))
        })
        .collect())
}

/// Add (or keep) the entry sending frames for `mac` to `dst`, as flannel's vxlan backend does.
pub fn vxlan_fdb_replace(dev: &str, mac: [u8; 6], dst: Ipv4Addr) -> Result<()> {
    let l = require_link(dev)?;
    change(&format!("forwarding entry {} -> {dst} on {dev}", format_mac(&mac)), RouteNetlinkMessage::NewNeighbour(fdb_message(l.ifindex, mac, IpAddr::V4(dst))), NLM_F_CREATE | NLM_F_REPLACE)
}

pub fn vxlan_fdb_del(dev: &str, mac: [u8; 6], dst: Ipv4Addr) -> Result<()> {
    let l = require_link(dev)?;
    change(&format!("remove forwarding entry {} -> {dst} on {dev}", format_mac(&mac)), RouteNetlinkMessage::DelNeighbour(fdb_message(l.ifindex, mac, IpAddr::V4(dst))), 0)
}
