//! Links, addresses and routes of the node: the overlay device, the route that sends the
//! overlay network to it, and the vxlan device's forwarding entries.
//!
//! Design notes: rtnetlink messages over a synchronous netlink socket of the calling process
//! (netlink-packet-route builds and parses them), one request and its answer per call. No
//! `ip`/`bridge` forks: a route update with thousands of peers costs a syscall each, not a
//! process, and netlink, like `ip`, sees the caller's network namespace (sysfs does not: under
//! `nsenter --net` /sys still shows the host's devices). Every error names the operation and
//! what the kernel said.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    AddressFamily, RouteNetlinkMessage,
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

type Result<T> = std::result::Result<T, NetdevError>;

/// Send one rtnetlink request and collect what comes back (a dump's messages; nothing for
/// an acknowledged change). A kernel error is returned with `op` named. A dump the kernel
/// marks interrupted (the table changed meanwhile) is asked again, a few times; a message
/// the library cannot decode (a newer kernel's) is skipped by its header's length rather
/// than failing the whole dump.
pub(crate) fn request(op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
    let mut attempts = 0;
    loop {
        match request_once(op, msg.clone(), flags)? {
            (out, false) => return Ok(out),
            (out, true) if attempts >= 3 => return Ok(out),
            (_, true) => attempts += 1,
        }
    }
}

/// One request: its messages, and whether a dump came back interrupted.
fn request_once(op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(Vec<RouteNetlinkMessage>, bool)> {
    let err = |cause: std::io::Error| NetdevError::Netlink { op: op.to_string(), cause };
    let socket = Socket::new(NETLINK_ROUTE).map_err(err)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
    let mut nl = NetlinkMessage::from(msg);
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
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..]) {
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
fn delete_route(op: &str, m: RouteMessage) -> Result<()> {
    match change(op, RouteNetlinkMessage::DelRoute(m), 0) {
        Err(e) if is_errno(&e, libc::ESRCH) => Ok(()),
        r => r,
    }
}

/// A change the kernel acknowledges.
fn change(op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
    request(op, msg, NLM_F_ACK | flags).map(drop)
}

fn is_errno(e: &NetdevError, errno: i32) -> bool {
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
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Veth => "veth".into(),
        InfoKind::Vxlan => "vxlan".into(),
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Dummy => "dummy".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn to_link(m: &LinkMessage) -> Link {
    let mut l = Link { ifindex: m.header.index, name: String::new(), mtu: 0, mac: [0; 6], kind: None, up: m.header.flags.contains(LinkFlags::Up), vxlan: None };
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

/// The addresses of one family on interface `ifindex` (a dump, filtered here).
fn address_messages(family: AddressFamily, ifindex: u32) -> Result<Vec<AddressMessage>> {
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
fn ipv4_addresses(ifindex: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
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

/// Every interface with its IPv4 addresses, in ifindex order.
pub fn interfaces() -> Result<Vec<(String, Vec<Ipv4Addr>)>> {
    let mut m = LinkMessage::default();
    m.header.interface_family = AddressFamily::Unspec;
    let links = request("list links", RouteNetlinkMessage::GetLink(m), NLM_F_DUMP)?;
    let mut a = AddressMessage::default();
    a.header.family = AddressFamily::Inet;
    let addrs = request("list addresses", RouteNetlinkMessage::GetAddress(a), NLM_F_DUMP)?;
    let mut out: Vec<(u32, String, Vec<Ipv4Addr>)> = links
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(to_link(l)),
            _ => None,
        })
        .map(|l| (l.ifindex, l.name, Vec::new()))
        .collect();
    for m in &addrs {
        if let RouteNetlinkMessage::NewAddress(a) = m {
            let ip = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let (Some(ip), Some(entry)) = (ip, out.iter_mut().find(|e| e.0 == a.header.index)) {
                entry.2.push(ip);
            }
        }
    }
    out.sort_by_key(|e| e.0);
    Ok(out.into_iter().map(|(_, n, a)| (n, a)).collect())
}

/// The interfaces enslaved to `master` (a bridge's ports), by name, read over netlink (sysfs
/// shows the namespace that mounted it, not the caller's).
pub fn ports_of(master: &str) -> Result<Vec<String>> {
    let Some(m_idx) = index_of(master) else { return Ok(Vec::new()) };
    let mut m = LinkMessage::default();
    m.header.interface_family = AddressFamily::Unspec;
    let links = request("list links", RouteNetlinkMessage::GetLink(m), NLM_F_DUMP)?;
    Ok(links
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) if l.attributes.iter().any(|a| matches!(a, LinkAttribute::Controller(i) if *i == m_idx)) => {
                Some(to_link(l).name)
            }
            _ => None,
        })
        .collect())
}

/// The interface (and source address) the route to `dst` uses: `ip route get <dst>`.
pub fn route_to(dst: IpAddr) -> Result<(String, Option<IpAddr>)> {
    let mut m = RouteMessage::default();
    let (family, len, addr) = match dst {
        IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
    };
    m.header.address_family = family;
    m.header.destination_prefix_length = len;
    m.attributes.push(RouteAttribute::Destination(addr));
    let op = format!("route to {dst}");
    let msgs = request(&op, RouteNetlinkMessage::GetRoute(m), 0)?;
    let r = msgs.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewRoute(r) => Some(r),
        _ => None,
    });
    let oif = r.and_then(|r| r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None }));
    let src = r.and_then(|r| {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            RouteAttribute::PrefSource(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        })
    });
    let name = oif.and_then(name_of).ok_or_else(|| NetdevError::Netlink { op, cause: std::io::Error::other("no route") })?;
    Ok((name, src))
}

/// How the underlay interface is chosen, as flannel's flags say it.
#[derive(Clone, Debug, Default)]
pub struct IfaceChoice {
    /// `--iface` (name or address), in order: the first that exists wins.
    pub iface: Vec<String>,
    /// `--iface-regex`, in order: the first matching an address, then a name, wins.
    pub regex: Vec<regex::Regex>,
    /// `--iface-can-reach`: the interface of the route to this address (either family).
    pub can_reach: Option<IpAddr>,
}

impl IfaceChoice {
    /// Nothing given: the default route's interface (or --public-ip's).
    pub fn is_empty(&self) -> bool {
        self.iface.is_empty() && self.regex.is_empty() && self.can_reach.is_none()
    }
}

/// Pick the interface and the address it gives, from `interfaces` (name, IPv4 addresses),
/// as flannel's LookupExtIface does: `--iface` entries in order (an address picks the
/// interface holding it, and is the public address), else the `--iface-regex` patterns in
/// order (against every address first, then every name), else the route to `--iface-can-reach`
/// (`route`), else the default route's interface (`default`). The address is the one matched,
/// else the interface's first IPv4 address (`None` if it has none).
/// (An IPv6-only node gives its interfaces' public IPv6 addresses instead: `A` is the
/// address family the node's public address is of.)
pub fn choose_interface<A: Copy + PartialEq + std::str::FromStr + std::fmt::Display>(
    choice: &IfaceChoice,
    interfaces: &[(String, Vec<A>)],
    route: impl FnOnce(IpAddr) -> Option<(String, Option<A>)>,
    default: impl FnOnce() -> Option<String>,
) -> std::result::Result<(String, Option<A>), String> {
    let first_addr = |name: &str| interfaces.iter().find(|(n, _)| n == name).and_then(|(_, a)| a.first().copied());
    // As flanneld: each kind of choice in turn (--iface, --iface-regex, --iface-can-reach),
    // the next one tried when the one before matches nothing; the default route only when none
    // was given.
    let mut misses = Vec::new();
    for want in &choice.iface {
        if let Ok(ip) = want.parse::<A>() {
            if let Some((name, _)) = interfaces.iter().find(|(_, a)| a.contains(&ip)) {
                return Ok((name.clone(), Some(ip)));
            }
        } else if interfaces.iter().any(|(n, _)| n == want) {
            return Ok((want.clone(), first_addr(want)));
        }
    }
    if !choice.iface.is_empty() {
        misses.push(format!("none of --iface {} exists here (an interface name or one of its addresses)", choice.iface.join(", ")));
    }
    for re in &choice.regex {
        for (name, addrs) in interfaces {
            if let Some(ip) = addrs.iter().find(|a| re.is_match(&a.to_string())) {
                return Ok((name.clone(), Some(*ip)));
            }
        }
        if let Some((name, _)) = interfaces.iter().find(|(n, _)| re.is_match(n)) {
            return Ok((name.clone(), first_addr(name)));
        }
    }
    if !choice.regex.is_empty() {
        let res: Vec<&str> = choice.regex.iter().map(|r| r.as_str()).collect();
        misses.push(format!("no interface name or address matches --iface-regex {}", res.join(", ")));
    }
    if let Some(dst) = choice.can_reach {
        match route(dst) {
            Some((name, src)) => {
                let addr = src.or_else(|| first_addr(&name));
                return Ok((name, addr));
            }
            None => misses.push(format!("no route to --iface-can-reach {dst}")),
        }
    }
    if !misses.is_empty() {
        return Err(misses.join("; "));
    }
    let name = default().ok_or_else(|| "no default route to pick an interface from; pass --iface".to_string())?;
    let addr = first_addr(&name);
    Ok((name, addr))
}

/// Choose the underlay interface and this node's public address on this host (`public_ip`
/// overrides the address, as --public-ip does).
pub fn resolve_interface(choice: &IfaceChoice, public_ip: Option<Ipv4Addr>) -> std::result::Result<Underlay, NetdevError> {
    let interfaces = interfaces()?;
    let owner = |ip: Ipv4Addr| interfaces.iter().find(|(_, a)| a.contains(&ip)).map(|(n, _)| n.clone());
    let chosen = match public_ip {
        // --public-ip alone: the interface that owns that address (flannel v0.28 does the
        // same, and exits when none does).
        Some(p) if choice.is_empty() => match owner(p) {
            Some(name) => Some((name, Some(p))),
            None => {
                tracing::warn!(
                    public_ip = %p,
                    "no interface has the --public-ip address (a node behind NAT): the default route's interface and its \
                     address carry the tunnel, and the lease tells peers to send to the public address"
                );
                None
            }
        },
        _ => None,
    };
    let (name, addr) = match chosen {
        Some(c) => c,
        None => choose_interface(
            choice,
            &interfaces,
            // The route's source address where it is an IPv4 one (an IPv6 --iface-can-reach
            // picks the interface; its IPv4 address is then the first one).
            |dst| route_to(dst).ok().map(|(name, src)| (name, src.and_then(|s| if let IpAddr::V4(a) = s { Some(a) } else { None }))),
            || default_route_iface().ok(),
        )
            .map_err(|why| NetdevError::Netlink { op: "choosing the interface".into(), cause: std::io::Error::other(why) })?,
    };
    let addr = addr.ok_or_else(|| NetdevError::NoIpv4 { name: name.clone() })?;
    Ok(underlay_of(name, addr, public_ip, |n, ip| owner(ip).as_deref() == Some(n)))
}

/// The node's underlay: its interface, the address its tunnel ends at there (the outer
/// source of what it sends, the destination of what it takes), and the address the lease
/// announces (flannel's PublicIP), which differs from it behind 1:1 NAT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    pub iface: String,
    pub tunnel_ip: Ipv4Addr,
    pub public_ip: Ipv4Addr,
}

/// The tunnel ends at `--public-ip` when the chosen interface has that address, else at the
/// interface's own address, as flannel v0.11 to v0.27 bind the vxlan device (`owns`: whether
/// interface `name` has address `ip`).
pub fn underlay_of(iface: String, iface_addr: Ipv4Addr, public_ip: Option<Ipv4Addr>, owns: impl Fn(&str, Ipv4Addr) -> bool) -> Underlay {
    let tunnel_ip = match public_ip {
        Some(p) if owns(&iface, p) => p,
        _ => iface_addr,
    };
    Underlay { public_ip: public_ip.unwrap_or(tunnel_ip), tunnel_ip, iface }
}

/// An IPv6-only node's underlay interface and public IPv6 address, chosen as
/// `resolve_interface` chooses (--iface names or IPv6 addresses, --iface-regex against the
/// interfaces' public IPv6 addresses and names, --iface-can-reach's route, else the default
/// IPv6 route's interface, else the default IPv4 route's); the address is `public_ipv6`
/// (--public-ipv6) if given, else the one matched, else the interface's (`first_ipv6`).
pub fn resolve_interface6(choice: &IfaceChoice, public_ipv6: Option<Ipv6Addr>) -> std::result::Result<(String, Ipv6Addr), NetdevError> {
    let interfaces: Vec<(String, Vec<Ipv6Addr>)> = interfaces()?
        .into_iter()
        .map(|(name, _)| {
            let a = usable_ipv6(&name).unwrap_or_default();
            (name, a)
        })
        .collect();
    let (name, addr) = choose_interface(
        choice,
        &interfaces,
        |dst| route_to(dst).ok().map(|(name, _)| (name, None)),
        || default_route_iface_of(AddressFamily::Inet6).or_else(|_| default_route_iface()).ok(),
    )
    .map_err(|why| NetdevError::Netlink { op: "choosing the interface".into(), cause: std::io::Error::other(why) })?;
    let ip = match public_ipv6.or(addr) {
        Some(ip) => ip,
        None => first_ipv6(&name)?.ok_or_else(|| NetdevError::NoIpv6 { name: name.clone() })?,
    };
    Ok((name, ip))
}

/// The interface of the default route (flannel's choice when --iface is not given).
pub fn default_route_iface() -> Result<String> {
    default_route_iface_of(AddressFamily::Inet)
}

fn default_route_iface_of(family: AddressFamily) -> Result<String> {
    let mut m = RouteMessage::default();
    m.header.address_family = family;
    let msgs = request("list routes", RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?;
    let oif = msgs.iter().find_map(|m| match m {
        RouteNetlinkMessage::NewRoute(r) if r.header.destination_prefix_length == 0 && r.header.table == RouteHeader::RT_TABLE_MAIN => {
            r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        }
        _ => None,
    });
    oif.and_then(name_of).ok_or(NetdevError::NoDefaultRoute)
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

/// The IPv6 addresses of `ifindex` of global scope, with their prefix lengths.
fn ipv6_addresses(ifindex: u32) -> Result<Vec<(Ipv6Addr, u8)>> {
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

fn is_link_local6(ip: &Ipv6Addr) -> bool {
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

fn route6_message(dst: Ipv6Net) -> RouteMessage {
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

pub fn del_peer_route6(subnet: Ipv6Net) -> Result<()> {
    delete_route(&format!("remove route {subnet}"), route6_message(subnet))
}

/// The IPv6 routes through `dev` that have a gateway (the peer routes), by destination.
pub fn peer_routes6(dev: &str) -> Result<Vec<Ipv6Net>> {
    let Some(l) = link(dev)? else { return Ok(Vec::new()) };
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet6;
    let msgs = request("list IPv6 routes", RouteNetlinkMessage::GetRoute(m), NLM_F_DUMP)?;
    Ok(msgs
        .iter()
        .filter_map(|m| if let RouteNetlinkMessage::NewRoute(r) = m { Some(r) } else { None })
        .filter(|r| r.attributes.contains(&RouteAttribute::Oif(l.ifindex)) && r.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))))
        .filter_map(|r| {
            let dst = r.attributes.iter().find_map(|a| if let RouteAttribute::Destination(RouteAddress::Inet6(d)) = a { Some(*d) } else { None })?;
            Ipv6Net::new(dst, r.header.destination_prefix_length).ok()
        })
        .collect())
}

fn neigh6_message(ifindex: u32, ip: Ipv6Addr, mac: [u8; 6]) -> NeighbourMessage {
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

fn address_message(ifindex: u32, addr: IpAddr, prefix_len: u8) -> AddressMessage {
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
fn addresses_like(ifindex: u32, addr: IpAddr) -> Result<Vec<(IpAddr, u8)>> {
    Ok(match addr {
        IpAddr::V4(_) => ipv4_addresses(ifindex)?.into_iter().map(|(a, l)| (IpAddr::V4(a), l)).collect(),
        IpAddr::V6(_) => ipv6_addresses(ifindex)?.into_iter().map(|(a, l)| (IpAddr::V6(a), l)).collect(),
    })
}

/// The full length of `addr`'s family (32 or 128): overlay devices' addresses are host routes.
fn host_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// Give `name` exactly one address of `addr`'s family, `addr` as a host address, removing
/// the others of that family; none removed when it is already so (an agent restart: host
/// traffic never loses its source).
fn set_only_address(name: &str, addr: IpAddr) -> Result<()> {
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
fn has_only_address(name: &str, addr: IpAddr) -> Result<bool> {
    let l = require_link(name)?;
    Ok(addresses_like(l.ifindex, addr)? == [(addr, host_len(addr))])
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

fn neigh_message(ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> NeighbourMessage {
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

/// Whether flannel-v6 has exactly the address the agent gives it (`addr`/128).
pub fn has_address6(name: &str, addr: Ipv6Addr) -> Result<bool> {
    has_only_address(name, IpAddr::V6(addr))
}

/// The next hop of the overlay route. Any address works on a NOARP device: routing the whole
/// network through one `onlink` next hop keeps one neighbour entry instead of one per remote
/// container (the kernel's gc_thresh3 is 1024).
pub const OVERLAY_NEXTHOP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// A main-table IPv4 route message for `dst` (protocol and type given), universe scope.
fn route_message(dst: Ipv4Net, protocol: RouteProtocol, kind: RouteType) -> RouteMessage {
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
fn all_routes() -> Result<Vec<RouteMessage>> {
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

fn direct_route_message(subnet: Ipv4Net) -> RouteMessage {
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

/// A route's IPv4 destination network.
fn destination(r: &RouteMessage) -> Option<Ipv4Net> {
    let dst = r.attributes.iter().find_map(|a| if let RouteAttribute::Destination(RouteAddress::Inet(d)) = a { Some(*d) } else { None })?;
    Ipv4Net::new(dst, r.header.destination_prefix_length).ok()
}

fn blackhole_message(subnet: IpNet) -> RouteMessage {
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

/// A vxlan device's forwarding entry: frames for `mac` go to `dst` (either family).
fn fdb_message(ifindex: u32, mac: [u8; 6], dst: IpAddr) -> NeighbourMessage {
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
    /// Behind 1:1 NAT the tunnel ends at the interface's address and the lease names the
    /// public one; a public address the interface has is both; no --public-ip, the
    /// interface's address is both.
    #[test]
    fn the_tunnel_ends_on_the_interface_and_the_lease_names_the_public_address() {
        let (private, public, second) = ("10.99.1.2".parse().unwrap(), "192.168.100.51".parse().unwrap(), "192.168.100.7".parse().unwrap());
        let owns = |n: &str, ip| n == "eth0" && (ip == private || ip == second);
        let u = |p| super::underlay_of("eth0".into(), private, p, owns);
        assert_eq!((u(Some(public)).tunnel_ip, u(Some(public)).public_ip), (private, public), "NAT");
        assert_eq!((u(Some(second)).tunnel_ip, u(Some(second)).public_ip), (second, second), "a second address of the interface");
        assert_eq!((u(None).tunnel_ip, u(None).public_ip), (private, private));
    }
    use super::*;

    /// flannel's order: --iface entries (names or addresses; first that exists), else
    /// --iface-regex (addresses before names), else --iface-can-reach, else (none given) the
    /// default route.
    #[test]
    fn interface_choice_follows_flannels_order() {
        let ifs = vec![
            ("lo".to_string(), vec![Ipv4Addr::LOCALHOST]),
            ("eth0".to_string(), vec![Ipv4Addr::new(192, 168, 1, 10)]),
            ("eth1".to_string(), vec![Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)]),
            ("wg0".to_string(), vec![]),
        ];
        let none = |_| None;
        let dflt = || Some("eth0".to_string());
        let pick = |c: IfaceChoice| choose_interface(&c, &ifs, |_| Some(("eth1".to_string(), Some(Ipv4Addr::new(10, 0, 0, 6)))), dflt);
        let by = |iface: &[&str]| IfaceChoice { iface: iface.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        assert_eq!(pick(by(&["nosuch", "eth1"])), Ok(("eth1".into(), Some(Ipv4Addr::new(10, 0, 0, 5)))));
        assert_eq!(pick(by(&["10.0.0.6", "eth0"])), Ok(("eth1".into(), Some(Ipv4Addr::new(10, 0, 0, 6)))));
        assert!(pick(by(&["nosuch", "10.9.9.9"])).unwrap_err().contains("none of --iface nosuch, 10.9.9.9"));
        // Nothing matches --iface: --iface-regex, then --iface-can-reach, are tried in turn
        // (flanneld's fall-through); all missing is an error naming each, never the default route.
        let all = |iface: &[&str], r: &[&str], reach: Option<Ipv4Addr>| IfaceChoice {
            iface: iface.iter().map(|s| s.to_string()).collect(),
            regex: r.iter().map(|s| regex::Regex::new(s).unwrap()).collect(),
            can_reach: reach.map(IpAddr::V4),
        };
        assert_eq!(pick(all(&["nosuch"], &["^eth0$"], None)), Ok(("eth0".into(), Some(Ipv4Addr::new(192, 168, 1, 10)))));
        assert_eq!(pick(all(&["nosuch"], &["^ib"], Some(Ipv4Addr::new(10, 0, 0, 1)))), Ok(("eth1".into(), Some(Ipv4Addr::new(10, 0, 0, 6)))));
        let why = choose_interface(&all(&["nosuch"], &["^ib"], Some(Ipv4Addr::new(10, 0, 0, 1))), &ifs, none, dflt).unwrap_err();
        assert!(why.contains("none of --iface nosuch") && why.contains("--iface-regex ^ib") && why.contains("no route to --iface-can-reach 10.0.0.1"), "{why}");
        let re = |r: &[&str]| IfaceChoice { regex: r.iter().map(|s| regex::Regex::new(s).unwrap()).collect(), ..Default::default() };
        assert_eq!(pick(re(&[r"^10\.0\.0\.6$"])), Ok(("eth1".into(), Some(Ipv4Addr::new(10, 0, 0, 6)))));
        assert_eq!(pick(re(&["^nomatch", "^eth"])), Ok(("eth0".into(), Some(Ipv4Addr::new(192, 168, 1, 10)))));
        assert!(pick(re(&["^ib"])).is_err());
        let reach = IfaceChoice { can_reach: Some(Ipv4Addr::new(10, 0, 0, 1).into()), ..Default::default() };
        assert_eq!(pick(reach.clone()), Ok(("eth1".into(), Some(Ipv4Addr::new(10, 0, 0, 6)))));
        // An IPv6 address to reach (flannel takes either family): the route's interface.
        let reach6 = IfaceChoice { can_reach: Some("fd00:64::9".parse().unwrap()), ..Default::default() };
        let via = |dst: IpAddr| dst.is_ipv6().then(|| ("eth1".to_string(), None));
        assert_eq!(choose_interface(&reach6, &ifs, via, dflt), Ok(("eth1".into(), Some(Ipv4Addr::new(10, 0, 0, 5)))), "its first IPv4 address");
        assert!(choose_interface(&reach, &ifs, none, dflt).is_err());
        assert_eq!(pick(IfaceChoice::default()), Ok(("eth0".into(), Some(Ipv4Addr::new(192, 168, 1, 10)))));
        assert_eq!(pick(by(&["wg0"])), Ok(("wg0".into(), None)), "an interface without IPv4 needs --public-ip");
    }

    /// An IPv6-only node chooses among its interfaces' IPv6 addresses the same way: an
    /// address that is not an interface's first one picks that interface and is the public
    /// address; regexes match IPv6 addresses before names.
    #[test]
    fn ipv6_only_interface_choice_takes_any_of_an_interfaces_addresses() {
        let a = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let ifs = vec![
            ("eth0".to_string(), vec![a("fd00:64::1")]),
            ("eth1".to_string(), vec![a("fd00:65::5"), a("fd00:65::6")]),
        ];
        let dflt = || Some("eth0".to_string());
        let by = |iface: &[&str]| IfaceChoice { iface: iface.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        let pick = |c: IfaceChoice| choose_interface(&c, &ifs, |_| None, dflt);
        assert_eq!(pick(by(&["fd00:65::6"])), Ok(("eth1".into(), Some(a("fd00:65::6")))));
        assert_eq!(pick(by(&["eth1"])), Ok(("eth1".into(), Some(a("fd00:65::5")))));
        assert_eq!(pick(by(&["192.168.1.10", "eth0"])), Ok(("eth0".into(), Some(a("fd00:64::1")))), "an IPv4 address names no interface here");
        let re = IfaceChoice { regex: vec![regex::Regex::new("::6$").unwrap()], ..Default::default() };
        assert_eq!(pick(re), Ok(("eth1".into(), Some(a("fd00:65::6")))));
        assert_eq!(pick(IfaceChoice::default()), Ok(("eth0".into(), Some(a("fd00:64::1")))));
    }

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
