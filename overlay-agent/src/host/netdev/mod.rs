//! Links, addresses and routes of the node: the overlay device, the route that sends the
//! overlay network to it, and the vxlan device's forwarding entries.
//!
//! Design notes: rtnetlink messages over a synchronous netlink socket of the calling process
//! (netlink-packet-route builds and parses them), one request and its answer per call. No
//! `ip`/`bridge` forks: a route update with thousands of peers costs a syscall each, not a
//! process, and netlink, like `ip`, sees the caller's network namespace (sysfs does not: under
//! `nsenter --net` /sys still shows the host's devices). Every error names the operation and
//! what the kernel said.
//!
//! Split by what it touches: links and devices here; `underlay` (the interface the tunnel
//! runs on), `addr` (addresses), `route` (routes) and `neigh` (neighbour and forwarding
//! entries) stand apart. Everything is reached as `netdev::...`.

mod addr;
mod neigh;
mod route;
mod underlay;

pub use self::{addr::*, neigh::*, route::*, underlay::*};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoIpTunnel, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::RouteMessage, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("netlink ({op}): {cause}")]
    Netlink { op: String, cause: std::io::Error },
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    #[error("interface {name:?} has no IPv4 address; pass --public-ip or give it one")]
    NoIpv4 { name: String },
    #[error("interface {name:?} has no global IPv6 address (an IPv6-only network needs one); pass --public-ipv6 or give it one")]
    NoIpv6 { name: String },
    #[error("no default route to pick an interface from; pass --iface")]
    NoDefaultRoute,
}

pub(super) type Result<T> = std::result::Result<T, NetdevError>;

/// Send one rtnetlink request and collect what comes back (a dump's messages; nothing for
/// an acknowledged change). A kernel error is returned with `op` named. A dump the kernel
/// marks interrupted (the table changed meanwhile) is asked again, a few times; a message
/// the library cannot decode (a newer kernel's) is skipped by its header's length rather
/// than failing the whole dump.
pub(crate) fn request(op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
    request_on(NETLINK_ROUTE, op, msg, flags)
}

/// `request` on any netlink protocol (`NETLINK_GENERIC`: the wireguard family's messages).
pub(crate) fn request_on<T>(protocol: isize, op: &str, msg: T, flags: u16) -> Result<Vec<T>>
where
    T: NetlinkSerializable + NetlinkDeserializable + Clone + std::fmt::Debug,
{
    let mut attempts = 0;
    loop {
        match request_once(protocol, op, msg.clone(), flags)? {
            (out, false) => return Ok(out),
            (out, true) if attempts >= 3 => return Ok(out),
            (_, true) => attempts += 1,
        }
    }
}

/// One request: its messages, and whether a dump came back interrupted.
fn request_once<T>(protocol: isize, op: &str, msg: T, flags: u16) -> Result<(Vec<T>, bool)>
where
    T: NetlinkSerializable + NetlinkDeserializable + std::fmt::Debug,
{
    let err = |cause: std::io::Error| NetdevError::Netlink { op: op.to_string(), cause };
    let socket = Socket::new(protocol).map_err(err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
    let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
    nl.header.flags = NLM_F_REQUEST | flags;
    nl.header.sequence_number = 1;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    socket.send(&buf, 0).map_err(err)?;
    let mut out = Vec::new();
    let mut interrupted = false;
    loop {
        let (data, _) = socket.recv_from_full().map_err(err)?;
        let mut off = 0;
        while off + 16 <= data.len() {
            let len = u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]]) as usize;
            let msg_flags = u16::from_ne_bytes([data[off + 6], data[off + 7]]);
            interrupted |= msg_flags & NLM_F_DUMP_INTR != 0;
            match NetlinkMessage::<T>::deserialize(&data[off..]) {
                Ok(m) => match m.payload {
                    NetlinkPayload::Done(_) => return Ok((out, interrupted)),
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok((out, interrupted)),
                    NetlinkPayload::Error(e) => return Err(err(e.to_io())),
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                },
                Err(e) if flags & NLM_F_DUMP != 0 => tracing::debug!(op, error = %e, "skipping a netlink message this build cannot decode"),
                Err(e) => return Err(err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))),
            }
            if len < 16 {
                break;
            }
            // Messages are 4-byte aligned in the datagram.
            off += (len + 3) & !3;
        }
        // A plain request without ACK that answered with one message is complete.
        if flags & (NLM_F_ACK | NLM_F_DUMP) == 0 {
            return Ok((out, interrupted));
        }
    }
}

/// Remove a route; one already gone is no error.
pub(super) fn delete_route(op: &str, m: RouteMessage) -> Result<()> {
    match change(op, RouteNetlinkMessage::DelRoute(m), 0) {
        Err(e) if is_errno(&e, libc::ESRCH) => Ok(()),
        r => r,
    }
}

/// A change the kernel acknowledges.
pub(super) fn change(op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
    request(op, msg, NLM_F_ACK | flags).map(drop)
}

pub(crate) fn is_errno(e: &NetdevError, errno: i32) -> bool {
    matches!(e, NetdevError::Netlink { cause, .. } if cause.raw_os_error() == Some(errno))
}

/// A VXLAN device's parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VxlanParams {
    pub id: u32,
    pub port: u16,
    pub local: Option<Ipv4Addr>,
    pub local6: Option<Ipv6Addr>,
}

/// What the agent needs to know about an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: [u8; 6],
    /// rtnetlink kind (`veth`, `vxlan`, `bridge`...); `None` for a physical NIC.
    pub kind: Option<String>,
    pub up: bool,
    pub vxlan: Option<VxlanParams>,
    /// An ipip device's ends (`local`, `remote`; unset: any).
    pub ipip: Option<(Option<Ipv4Addr>, Option<Ipv4Addr>)>,
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Dummy => "dummy".into(),
        InfoKind::IpIp => "ipip".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn to_link(m: &LinkMessage) -> Link {
    let mut l = Link { ifindex: m.header.index, name: String::new(), mtu: 0, mac: [0; 6], kind: None, up: m.header.flags.contains(LinkFlags::Up), vxlan: None, ipip: None };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            // L3 devices (TUN) have no link-layer address: zero MAC.
            LinkAttribute::Address(b) if b.len() == 6 => l.mac.copy_from_slice(b),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => l.kind = Some(kind_name(k)),
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            let mut p = VxlanParams::default();
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => p.id = *id,
                                    InfoVxlan::Port(port) => p.port = *port,
                                    InfoVxlan::Local(a) => p.local = Some(*a),
                                    InfoVxlan::Local6(a) => p.local6 = Some(*a),
                                    _ => {}
                                }
                            }
                            l.vxlan = Some(p);
                        }
                        LinkInfo::Data(InfoData::IpTunnel(v)) => {
                            let addr = |a: &IpAddr| match a {
                                IpAddr::V4(a) if !a.is_unspecified() => Some(*a),
                                _ => None,
                            };
                            let local = v.iter().find_map(|x| if let InfoIpTunnel::Local(a) = x { addr(a) } else { None });
                            let remote = v.iter().find_map(|x| if let InfoIpTunnel::Remote(a) = x { addr(a) } else { None });
                            l.ipip = Some((local, remote));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    l
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The interface called `name`, or `None` if there is none.
pub fn link(name: &str) -> Result<Option<Link>> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    match request(&format!("get link {name}"), RouteNetlinkMessage::GetLink(m), NLM_F_ACK) {
        Ok(msgs) => Ok(msgs.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(to_link(l)),
            _ => None,
        })),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn require_link(name: &str) -> Result<Link> {
    link(name)?.ok_or_else(|| NetdevError::NoSuchInterface(name.to_string()))
}

fn new_link(op: &str, name: &str, info: Vec<LinkInfo>) -> Result<()> {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m.attributes.push(LinkAttribute::LinkInfo(info));
    change(op, RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
}

/// Create (or keep, if it already matches) the kernel VXLAN device flannel's vxlan backend
/// uses: `flannel.<VNI>` with `nolearning`, bound to the underlay. Our TC program on its
/// egress does the encapsulation; the device itself gives the node UDP-tunnel GRO on port
/// `port`, and stock tools show what operators expect.
pub fn ensure_vxlan(name: &str, vni: u32, port: u16, local: Ipv4Addr, underlay: &str) -> Result<Link> {
    ensure_vxlan_on(name, vni, port, IpAddr::V4(local), underlay)
}

/// Create (or keep, if it already matches) flannel's IPv6 vxlan device `flannel-v6.<VNI>`:
/// `nolearning`, bound to the underlay and its IPv6 address, as flannel makes it. The kernel
/// device carries the node's IPv6 overlay traffic both ways.
pub fn ensure_vxlan6(name: &str, vni: u32, port: u16, local: Ipv6Addr, underlay: &str) -> Result<Link> {
    ensure_vxlan_on(name, vni, port, IpAddr::V6(local), underlay)
}

/// A `nolearning` vxlan device bound to `underlay` and its address `local` (either family),
/// kept if one with these parameters exists, else made (again).
fn ensure_vxlan_on(name: &str, vni: u32, port: u16, local: IpAddr, underlay: &str) -> Result<Link> {
    let (local4, local6) = match local {
        IpAddr::V4(a) => (Some(a), None),
        IpAddr::V6(a) => (None, Some(a)),
    };
    if let Some(l) = link(name)? {
        let want = VxlanParams { id: vni, port, local: local4, local6 };
        if l.kind.as_deref() == Some("vxlan") && l.vxlan.as_ref() == Some(&want) {
            return Ok(l);
        }
        tracing::warn!(device = name, "existing device does not match the configuration; recreating it");
        delete_link(name)?;
    }
    let under = require_link(underlay)?;
    new_link(
        &format!("create vxlan device {name}"),
        name,
        vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(vni),
                match local {
                    IpAddr::V4(a) => InfoVxlan::Local(a),
                    IpAddr::V6(a) => InfoVxlan::Local6(a),
                },
                InfoVxlan::Link(under.ifindex),
                InfoVxlan::Port(port),
                InfoVxlan::Learning(false),
            ])),
        ],
    )?;
    require_link(name)
}

/// Create (or keep, if it already matches) flannel's ipip device: `name` (flannel.ipip) with
/// `local` the underlay's address and no remote, so that it takes IP-in-IP to that address
/// only (the namespace's tunl0, if the module made one, keeps the rest: flannel leaves tunl0
/// alone, since users may use it). Another kind of device of that name is refused, as
/// flannel refuses it; an ipip device with other ends is made again. A kernel without the
/// ipip module is said so by name.
pub fn ensure_ipip(name: &str, local: Ipv4Addr) -> std::result::Result<Link, anyhow::Error> {
    if let Some(l) = link(name)? {
        match (l.kind.as_deref(), l.ipip) {
            (Some("ipip"), Some((Some(a), None))) if a == local => return Ok(l),
            (Some("ipip"), ends) => {
                tracing::warn!(device = name, ?ends, %local, "the ipip device has other ends (local, remote); recreating it");
                delete_link(name)?;
            }
            (kind, _) => anyhow::bail!(
                "{name} exists and is not an ipip device ({}): remove it and start again (flannel refuses it too)",
                kind.unwrap_or("a physical interface")
            ),
        }
    }
    let made = new_link(
        &format!("create ipip device {name}"),
        name,
        vec![LinkInfo::Kind(InfoKind::IpIp), LinkInfo::Data(InfoData::IpTunnel(vec![InfoIpTunnel::Local(IpAddr::V4(local))]))],
    );
    match made {
        Err(e) if is_errno(&e, libc::EOPNOTSUPP) => anyhow::bail!(
            "Backend.Type \"ipip\" needs the kernel's ipip module, which this kernel does not have ({e}): \
             load it (modprobe ipip) or use \"vxlan\" (flannel's default, interoperable with stock nodes)"
        ),
        r => r?,
    }
    Ok(require_link(name)?)
}

/// Create a wireguard device `name` (its keys and peers are set over generic netlink).
pub(crate) fn new_wireguard_link(name: &str) -> Result<()> {
    new_link(&format!("create wireguard device {name}"), name, vec![LinkInfo::Kind(InfoKind::Wireguard)])
}

/// Bring `name` up with `mtu`, neighbour discovery left on (flannel-v6's neighbours are
/// permanent entries, so it never asks).
pub fn set_up_mtu(name: &str, mtu: u32) -> Result<()> {
    let l = require_link(name)?;
    let mut m = LinkMessage::default();
    m.header.index = l.ifindex;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    m.attributes.push(LinkAttribute::Mtu(mtu));
    change(&format!("configure {name}"), RouteNetlinkMessage::SetLink(m), 0)
}

/// Turn neighbour discovery on `name` on or off (the eBPF data plane's device needs none;
/// the kernel device alone resolves through flannel's permanent entries, as a stock node's).
pub fn set_arp(name: &str, on: bool) -> Result<()> {
    let l = require_link(name)?;
    let mut m = LinkMessage::default();
    m.header.index = l.ifindex;
    m.header.flags = if on { LinkFlags::empty() } else { LinkFlags::Noarp };
    m.header.change_mask = LinkFlags::Noarp;
    change(&format!("set ARP {} on {name}", if on { "on" } else { "off" }), RouteNetlinkMessage::SetLink(m), 0)
}

/// Create (or keep) a veth pair `name` / `peer` as the overlay device of the udp backend:
/// packets routed to it meet our TC egress program; the peer only has to be up.
pub fn ensure_veth(name: &str, peer: &str) -> Result<Link> {
    if let Some(l) = link(name)? {
        if l.kind.as_deref() == Some("veth") && link(peer)?.is_some() {
            return Ok(l);
        }
        delete_link(name)?;
    }
    let mut p = LinkMessage::default();
    p.attributes.push(LinkAttribute::IfName(peer.to_string()));
    new_link(&format!("create veth pair {name}/{peer}"), name, vec![LinkInfo::Kind(InfoKind::Veth), LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p)))])?;
    configure_up(peer, None)?;
    require_link(name)
}

/// Set the MTU (if given), turn ARP off (the egress program answers for every neighbour,
/// and an ARP request would only be dropped), give it no IPv6 link-local address (IPv4 only:
/// router solicitations and DAD would only be dropped and counted by the egress program) and
/// bring the link up.
pub fn configure_up(name: &str, mtu: Option<u32>) -> Result<()> {
    let l = require_link(name)?;
    let op = format!("configure {name}");
    if !l.up {
        // addrgenmode can only change while the link is down.
        let mut m = LinkMessage::default();
        m.header.index = l.ifindex;
        m.attributes.push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)])]));
        change(&op, RouteNetlinkMessage::SetLink(m), 0)?;
    }
    let mut m = LinkMessage::default();
    m.header.index = l.ifindex;
    m.header.flags = LinkFlags::Up | LinkFlags::Noarp;
    m.header.change_mask = LinkFlags::Up | LinkFlags::Noarp;
    if let Some(mtu) = mtu {
        m.attributes.push(LinkAttribute::Mtu(mtu));
    }
    change(&op, RouteNetlinkMessage::SetLink(m), 0)
}

pub fn delete_link(name: &str) -> Result<()> {
    let l = require_link(name)?;
    let mut m = LinkMessage::default();
    m.header.index = l.ifindex;
    change(&format!("delete {name}"), RouteNetlinkMessage::DelLink(m), 0)
}

/// The ifindex of interface `name` in this namespace.
pub fn index_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The name of interface `ifindex` in this namespace.
pub fn name_of(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    s.to_str().ok().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips() {
        let m = parse_mac("c6:d2:32:6f:8f:44").unwrap();
        assert_eq!(m, [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44]);
        assert_eq!(format_mac(&m), "c6:d2:32:6f:8f:44");
    }

    #[test]
    fn malformed_macs_are_refused() {
        for bad in ["", "c6:d2:32:6f:8f", "c6:d2:32:6f:8f:44:00", "zz:d2:32:6f:8f:44", "c6-d2-32-6f-8f-44"] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}

