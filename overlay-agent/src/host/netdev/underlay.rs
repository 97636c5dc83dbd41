//! The underlay: the interface the tunnel runs on (flannel's --iface, --iface-regex,
//! --iface-can-reach order), its addresses, and the public address the lease names.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
    AddressFamily, RouteNetlinkMessage,
};

use super::*;

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

pub(super) fn default_route_iface_of(family: AddressFamily) -> Result<String> {
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


#[cfg(test)]
mod tests {
    use super::*;

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
}
