//! Addresses: the overlay device's one address, and an interface's usable IPv4 and IPv6
//! addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::Ipv4Net;
use netlink_packet_core::{
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    AddressFamily, RouteNetlinkMessage,
};

use super::*;

/// The addresses of one family on interface `ifindex` (a dump, filtered here).
pub(super) fn address_messages(family: AddressFamily, ifindex: u32) -> Result<Vec<AddressMessage>> {
    let mut m = AddressMessage::default();
    m.header.family = family;
    let msgs = request("list addresses", RouteNetlinkMessage::GetAddress(m), NLM_F_DUMP)?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if a.header.index == ifindex => Some(a),
            _ => None,
        })
        .collect())
}

/// The IPv4 addresses (with prefix lengths) of interface `ifindex`.
pub(super) fn ipv4_addresses(ifindex: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
    Ok(address_messages(AddressFamily::Inet, ifindex)?
        .iter()
        .filter_map(|a| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, a.header.prefix_len)),
                _ => None,
            })
        })
        .collect())
}

/// The IPv6 addresses of `ifindex` of global scope, with their prefix lengths.
pub(super) fn ipv6_addresses(ifindex: u32) -> Result<Vec<(Ipv6Addr, u8)>> {
    Ok(address_messages(AddressFamily::Inet6, ifindex)?
        .iter()
        .filter_map(|a| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(IpAddr::V6(ip)) if !is_link_local6(ip) => Some((*ip, a.header.prefix_len)),
                _ => None,
            })
        })
        .collect())
}

pub(super) fn is_link_local6(ip: &Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The first usable global IPv6 address of interface `name` (flannel's public IPv6 when
/// --public-ipv6 is not given): not one still in duplicate address detection or failed it,
/// not a temporary (privacy) one, which comes and goes; a deprecated one only if nothing
/// else is there.
pub fn first_ipv6(name: &str) -> Result<Option<Ipv6Addr>> {
    Ok(usable_ipv6(name)?.first().copied())
}

/// The usable global IPv6 addresses of interface `name` (as `first_ipv6` judges them), the
/// preferred ones first, deprecated ones after them.
pub fn usable_ipv6(name: &str) -> Result<Vec<Ipv6Addr>> {
    use netlink_packet_route::address::AddressFlags as F;
    let l = require_link(name)?;
    let (mut preferred, mut deprecated) = (Vec::new(), Vec::new());
    for a in address_messages(AddressFamily::Inet6, l.ifindex)? {
        let Some(ip) = a.attributes.iter().find_map(|x| if let AddressAttribute::Address(IpAddr::V6(ip)) = x { Some(*ip) } else { None }) else {
            continue;
        };
        let flags = a
            .attributes
            .iter()
            .find_map(|x| if let AddressAttribute::Flags(f) = x { Some(*f) } else { None })
            .unwrap_or_else(|| F::from_bits_retain(a.header.flags.bits() as u32));
        // IFA_F_TEMPORARY has IFA_F_SECONDARY's value.
        if is_link_local6(&ip) || ip.is_loopback() || flags.intersects(F::Tentative | F::Dadfailed | F::Secondary) {
            continue;
        }
        if flags.contains(F::Deprecated) {
            deprecated.push(ip);
        } else {
            preferred.push(ip);
        }
    }
    preferred.extend(deprecated);
    Ok(preferred)
}

/// Whether interface `name` has IPv6 address `addr`.
pub fn has_ipv6(name: &str, addr: Ipv6Addr) -> Result<bool> {
    let l = require_link(name)?;
    Ok(ipv6_addresses(l.ifindex)?.iter().any(|(a, _)| *a == addr))
}

pub(super) fn address_message(ifindex: u32, addr: IpAddr, prefix_len: u8) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.prefix_len = prefix_len;
    m.header.index = ifindex;
    match addr {
        IpAddr::V4(_) => {
            m.header.family = AddressFamily::Inet;
            m.attributes.push(AddressAttribute::Local(addr));
        }
        IpAddr::V6(_) => m.header.family = AddressFamily::Inet6,
    }
    m.attributes.push(AddressAttribute::Address(addr));
    m
}

/// The addresses of `addr`'s family on `ifindex` (global ones for IPv6), as (address, length).
pub(super) fn addresses_like(ifindex: u32, addr: IpAddr) -> Result<Vec<(IpAddr, u8)>> {
    Ok(match addr {
        IpAddr::V4(_) => ipv4_addresses(ifindex)?.into_iter().map(|(a, l)| (IpAddr::V4(a), l)).collect(),
        IpAddr::V6(_) => ipv6_addresses(ifindex)?.into_iter().map(|(a, l)| (IpAddr::V6(a), l)).collect(),
    })
}

/// The full length of `addr`'s family (32 or 128): overlay devices' addresses are host routes.
pub(super) fn host_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// Give `name` exactly one address of `addr`'s family, `addr` as a host address, removing
/// the others of that family; none removed when it is already so (an agent restart: host
/// traffic never loses its source).
pub(super) fn set_only_address(name: &str, addr: IpAddr) -> Result<()> {
    let l = require_link(name)?;
    let have = addresses_like(l.ifindex, addr)?;
    if have == [(addr, host_len(addr))] {
        return Ok(());
    }
    let op = format!("set the address of {name}");
    for (a, len) in have {
        change(&op, RouteNetlinkMessage::DelAddress(address_message(l.ifindex, a, len)), 0)?;
    }
    change(&op, RouteNetlinkMessage::NewAddress(address_message(l.ifindex, addr, host_len(addr))), NLM_F_CREATE | NLM_F_EXCL)
}

/// `name`'s IPv4 addresses with their prefix lengths.
pub fn addresses4(name: &str) -> Result<Vec<Ipv4Net>> {
    let l = require_link(name)?;
    Ok(ipv4_addresses(l.ifindex)?.into_iter().filter_map(|(a, len)| Ipv4Net::new(a, len).ok()).collect())
}

/// Whether `name` has exactly the address of `addr`'s family that `set_only_address` gives.
pub(super) fn has_only_address(name: &str, addr: IpAddr) -> Result<bool> {
    let l = require_link(name)?;
    Ok(addresses_like(l.ifindex, addr)? == [(addr, host_len(addr))])
}

/// Remove `name`'s global IPv6 addresses and the IPv6 routes through it (a wireguard device
/// that carried IPv6 in a run before and no longer does). How many went.
pub fn clear_ipv6(name: &str) -> Result<usize> {
    let l = require_link(name)?;
    let op = format!("remove the IPv6 addresses of {name}");
    let addresses = ipv6_addresses(l.ifindex)?;
    for (a, len) in &addresses {
        change(&op, RouteNetlinkMessage::DelAddress(address_message(l.ifindex, IpAddr::V6(*a), *len)), 0)?;
    }
    let routes = super::route::routes6_through(l.ifindex)?;
    for r in &routes {
        super::route::del_route6_through(*r, l.ifindex)?;
    }
    Ok(addresses.len() + routes.len())
}

/// Give the overlay device exactly one address, the subnet's network address as a /32 (as
/// flannel does): the source the host uses to reach remote containers.
pub fn set_device_address(name: &str, addr: Ipv4Addr) -> Result<()> {
    set_only_address(name, IpAddr::V4(addr))
}

/// Give flannel-v6 its one address, the IPv6 subnet's network address as a /128 (flannel's
/// ConfigureIPv6), removing any other global one.
pub fn set_device_address6(name: &str, addr: Ipv6Addr) -> Result<()> {
    set_only_address(name, IpAddr::V6(addr))
}

/// Whether `name` has exactly the address the agent gives it (`addr`/32).
pub fn has_address(name: &str, addr: Ipv4Addr) -> Result<bool> {
    has_only_address(name, IpAddr::V4(addr))
}

/// Whether flannel-v6 has exactly the address the agent gives it (`addr`/128).
pub fn has_address6(name: &str, addr: Ipv6Addr) -> Result<bool> {
    has_only_address(name, IpAddr::V6(addr))
}
