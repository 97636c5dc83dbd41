//! What the maps should hold, given the leases: a pure function of the leases and the maps'
//! current routes, so it is tested without a kernel or etcd. Only the daemon applies the
//! result (through `maps`, the only code that writes maps).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::{Ipv4Net, Ipv6Net};
use overlay_common::EncapMode;

use crate::{
    lease::{registry::LeaseEvent, Lease, LeaseFormatError, LeaseKey},
    maps::Route,
};

/// The route a lease asks for on this node, or why it is skipped. Our own subnet and leases
/// that name our own address get no route (they would send packets to ourselves).
/// An IPv6-only node's lease has no IPv4 route. A wireguard node's route is a peer: the
/// lease's public key and port (a lease without a port: ours, as flannel does).
pub fn route_for(lease: &Lease, me: &Mine) -> Result<Option<Route>, LeaseFormatError> {
    if lease.key().is_ipv6_only() || lease.subnet == me.subnet || lease.attrs.public_ip == me.public_ip {
        return Ok(None);
    }
    let mut route = Route { subnet: lease.subnet, public_ip: lease.attrs.public_ip, vtep_mac: [0; 6], wireguard: None };
    if let Some(own_port) = me.wireguard_port {
        let (public_key, port) = lease.attrs.wireguard_peer()?;
        route.wireguard = Some(crate::maps::WireguardPeer { public_key, port: port.unwrap_or(own_port) });
    } else if me.mode == EncapMode::Vxlan {
        route.vtep_mac = lease.attrs.vtep_mac()?;
    }
    Ok(Some(route))
}

/// A dual-stack peer's IPv6 route (on `flannel-v6.<VNI>`): its IPv6 subnet, its public IPv6
/// address and its IPv6 device's VtepMAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route6 {
    pub subnet: Ipv6Net,
    pub public_ip: Ipv6Addr,
    pub vtep_mac: [u8; 6],
    /// A wireguard node's IPv6 peer (on flannel-wg-v6): the lease's `BackendV6Data` key and
    /// port; no VtepMAC then.
    pub wireguard: Option<crate::maps::WireguardPeer>,
    /// Where one wireguard device carries both families (Modes auto, ipv4, ipv6): the
    /// peer's IPv4 subnet too, and the endpoint its Mode chose.
    pub joint: Option<JointPeer>,
}

/// A peer on the one device of Modes auto, ipv4 and ipv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JointPeer {
    /// The lease's IPv4 subnet (none in an IPv6-only network).
    pub subnet4: Option<Ipv4Net>,
    /// PublicIP:Port or [PublicIPv6]:Port, as the Mode chose.
    pub endpoint: std::net::SocketAddr,
}

/// This node's side of a one-device wireguard network (Modes auto, ipv4, ipv6 with IPv6).
#[derive(Clone, Copy, Debug)]
pub struct JointSide {
    pub mode: crate::config::WireguardMode,
    /// flannel-wg's `ListenPort`: the port of a peer whose lease has no `BackendData.Port`.
    pub listen_port: u16,
    /// The IPv4 network and our public IPv4 address (none in an IPv6-only network).
    pub network4: Option<Ipv4Net>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_ipv6: Ipv6Addr,
}

/// Which of a peer's addresses Mode `auto` sends to, as flannel's selectMode: IPv4 if the
/// peer has no IPv6 address, or if its IPv4 address is public and we have one; IPv6 if its
/// IPv6 address and ours are both public (not fc00::/7); else IPv4.
pub fn select_family(peer4: Ipv4Addr, peer6: Option<Ipv6Addr>, ours4: Option<Ipv4Addr>, ours6: Ipv6Addr) -> crate::config::WireguardMode {
    use crate::config::WireguardMode::{Ipv4, Ipv6};
    let private4 = |a: Ipv4Addr| a.is_private();
    let private6 = |a: Ipv6Addr| a.octets()[0] & 0xfe == 0xfc;
    match peer6 {
        None => Ipv4,
        Some(_) if !private4(peer4) && ours4.is_some() => Ipv4,
        Some(p6) if !private6(p6) && !private6(ours6) => Ipv6,
        Some(_) => Ipv4,
    }
}

/// This node's IPv6 side, as the IPv6 decisions need it.
#[derive(Clone, Copy, Debug)]
pub struct Mine6 {
    pub config: crate::config::Ipv6Config,
    /// Our lease's key (its IPv6 subnet, if any).
    pub key: LeaseKey,
    pub public_ip: Ipv4Addr,
    pub public_ipv6: Option<Ipv6Addr>,
    /// A wireguard node's IPv6 listen port (`ListenPortV6`: the port of a peer whose
    /// `BackendV6Data` names none); `None` on a vxlan node.
    pub wireguard_port_v6: Option<u16>,
    /// A wireguard node whose one device carries both families (Modes auto, ipv4, ipv6).
    pub joint: Option<JointSide>,
}

impl Mine6 {
    /// Whether `lease` is this node's own, or names this node: our IPv4 subnet or address;
    /// in an IPv6-only network, where no lease has either, our IPv6 subnet or address.
    pub fn owns(&self, lease: &Lease) -> bool {
        if self.key.is_ipv6_only() {
            return lease.subnet6 == self.key.v6 || (lease.attrs.public_ipv6.is_some() && lease.attrs.public_ipv6 == self.public_ipv6);
        }
        lease.subnet == self.key.v4 || lease.attrs.public_ip == self.public_ip
    }
}

/// The IPv6 route a lease asks for on a dual-stack or IPv6-only node: none for our own lease
/// or one naming our address (`Mine6::owns`), none for a peer without all three IPv6 parts
/// (an IPv4-only node, as flannel skips it); an IPv6 subnet outside the network's range, or
/// ours, is refused (it would take the host's own traffic, or our containers', to that peer).
pub fn route6_for(lease: &Lease, me6: &Mine6) -> Result<Option<Route6>, LeaseFormatError> {
    if me6.owns(lease) {
        return Ok(None);
    }
    let (Some(subnet), Some(public_ip)) = (lease.subnet6, lease.attrs.public_ipv6) else {
        return Ok(None);
    };
    // A vxlan peer needs its IPv6 device's VtepMAC; a wireguard peer its BackendV6Data (a
    // lease without one is a node with no IPv6 side: no peer, as flannel skips it).
    if let Some(j) = me6.joint {
        return joint_route_for(lease, me6, &j, subnet, public_ip);
    }
    let (vtep_mac, wireguard) = match me6.wireguard_port_v6 {
        Some(_) if lease.attrs.backend_v6_data.is_none() => return Ok(None),
        Some(own) => {
            let (public_key, port) = lease.attrs.wireguard_peer_v6()?;
            ([0; 6], Some(crate::maps::WireguardPeer { public_key, port: port.unwrap_or(own) }))
        }
        None => match lease.attrs.vtep_mac_v6() {
            Ok(mac) => (mac, None),
            Err(_) => return Ok(None),
        },
    };
    if !me6.config.fits(&subnet) || Some(subnet) == me6.key.v6 {
        return Err(LeaseFormatError::Ipv6SubnetRefused(subnet.to_string()));
    }
    Ok(Some(Route6 { subnet, public_ip, vtep_mac, wireguard, joint: None }))
}

/// A peer on the one device of Modes auto, ipv4 and ipv6: its key (BackendData's, else
/// BackendV6Data's), both its subnets as allowed IPs, its endpoint in the family the Mode
/// chooses (IPv6 for a peer with no IPv4 address), at the port its one device listens on:
/// `BackendData.Port` (its `ListenPort`), else (an IPv6-only network) `BackendV6Data.Port`,
/// else ours. (flannel sends to `BackendV6Data.Port` whatever the family, where a flannel
/// node announces a `ListenPortV6` no device listens on in these Modes; docs/backends.md.)
fn joint_route_for(lease: &Lease, me6: &Mine6, j: &JointSide, subnet: Ipv6Net, public_ipv6: Ipv6Addr) -> Result<Option<Route6>, LeaseFormatError> {
    use crate::config::WireguardMode::{Auto, Ipv4, Ipv6, Separate};
    let (public_key, port) = match lease.attrs.backend_data {
        Some(_) => lease.attrs.wireguard_peer()?,
        // An IPv6-only network: our leases name flannel-wg's ListenPort there.
        None => lease.attrs.wireguard_peer_v6()?,
    };
    let port = port.unwrap_or(j.listen_port);
    let subnet4 = match j.network4 {
        Some(n) if n.contains(&lease.subnet) && lease.subnet.prefix_len() > n.prefix_len() && lease.subnet != me6.key.v4 => Some(lease.subnet),
        Some(_) => return Err(LeaseFormatError::BadWireguardData(format!("IPv4 subnet {} is not one of the network's", lease.subnet))),
        None => None,
    };
    let family = match j.mode {
        Auto => select_family(lease.attrs.public_ip, Some(public_ipv6), j.public_ip, j.public_ipv6),
        m @ (Ipv4 | Ipv6) => m,
        Separate => unreachable!("Mode separate has two devices"),
    };
    let endpoint = match family {
        // A peer without an IPv4 address (an IPv6-only network) is reached over IPv6.
        Ipv4 if !lease.attrs.public_ip.is_unspecified() => std::net::SocketAddr::from((lease.attrs.public_ip, port)),
        _ => std::net::SocketAddr::from((public_ipv6, port)),
    };
    if !me6.config.fits(&subnet) || Some(subnet) == me6.key.v6 {
        return Err(LeaseFormatError::Ipv6SubnetRefused(subnet.to_string()));
    }
    Ok(Some(Route6 {
        subnet,
        public_ip: public_ipv6,
        vtep_mac: [0; 6],
        wireguard: Some(crate::maps::WireguardPeer { public_key, port }),
        joint: Some(JointPeer { subnet4, endpoint }),
    }))
}

/// Routes for all leases, and the leases skipped with the reason.
pub fn desired_routes(leases: &[Lease], me: &Mine) -> (Vec<Route>, Vec<(Ipv4Net, LeaseFormatError)>) {
    let mut routes = Vec::new();
    let mut skipped = Vec::new();
    for l in leases {
        match route_for(l, me) {
            Ok(Some(r)) => routes.push(r),
            Ok(None) => {}
            Err(e) => skipped.push((l.subnet, e)),
        }
    }
    (routes, skipped)
}

/// This node, as the decisions need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mine {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub mode: EncapMode,
    /// A wireguard node's listen port (the port of a peer whose lease names none).
    pub wireguard_port: Option<u16>,
}

impl Mine {
    /// A node of `mode` that is no wireguard node.
    pub fn new(subnet: Ipv4Net, public_ip: Ipv4Addr, mode: EncapMode) -> Self {
        Self { subnet, public_ip, mode, wireguard_port: None }
    }
}

/// What one watched lease event asks of this node. The same decisions as a full listing
/// (`desired_routes`): applying every event to the routes a listing gave yields the routes
/// a listing after them would give (`events_and_listings_agree`).
#[derive(Debug, PartialEq)]
pub enum EventAction {
    /// Make `subnet`'s route this (`None`: no route), and say why a lease gave none.
    SetRoute { subnet: Ipv4Net, route: Option<Route>, skipped: Option<LeaseFormatError> },
    /// Our own lease was deleted or expired: claim again.
    LostOwn,
    /// Our subnet's key now names another node: logged loudly (the next listing decides).
    OwnNamesOther(Ipv4Addr),
    /// A key or value that is not flannel's (counted), or an IPv6-only lease (not counted).
    Skipped(String, LeaseFormatError),
}

/// The decision for one watched event (see `EventAction`). An IPv6-only node's lease has
/// nothing to do with the IPv4 routes (skipped, not counted).
pub fn on_event(ev: &LeaseEvent, me: &Mine) -> EventAction {
    match ev {
        LeaseEvent::Put(lease) if lease.key().is_ipv6_only() => {
            EventAction::Skipped(lease.key().name(), LeaseFormatError::Ipv6Only(lease.key().name()))
        }
        LeaseEvent::Delete(key) if key.is_ipv6_only() => EventAction::Skipped(key.name(), LeaseFormatError::Ipv6Only(key.name())),
        LeaseEvent::Put(lease) if lease.subnet == me.subnet => {
            if lease.attrs.public_ip == me.public_ip {
                EventAction::SetRoute { subnet: lease.subnet, route: None, skipped: None }
            } else {
                EventAction::OwnNamesOther(lease.attrs.public_ip)
            }
        }
        LeaseEvent::Put(lease) => match route_for(lease, me) {
            Ok(route) => EventAction::SetRoute { subnet: lease.subnet, route, skipped: None },
            Err(e) => EventAction::SetRoute { subnet: lease.subnet, route: None, skipped: Some(e) },
        },
        LeaseEvent::Delete(key) if key.v4 == me.subnet => EventAction::LostOwn,
        LeaseEvent::Delete(key) => EventAction::SetRoute { subnet: key.v4, route: None, skipped: None },
        LeaseEvent::Malformed(key, e) => EventAction::Skipped(key.clone(), e.clone()),
    }
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
        Route { subnet: s.parse().unwrap(), public_ip: Ipv4Addr::new(192, 168, 0, ip), vtep_mac: [mac; 6], wireguard: None }
    }

    #[test]
    fn ipv6_routes_need_all_three_parts_of_a_peers_lease() {
        let me: Ipv4Net = "10.0.1.0/24".parse().unwrap();
        let my_ip = Ipv4Addr::new(192, 168, 0, 1);
        let attrs = LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 2), 1, [2; 6]).with_ipv6("fd00::2".parse().unwrap(), 1, [6; 6]);
        let peer = Lease { subnet: "10.0.2.0/24".parse().unwrap(), subnet6: Some("fd00:0:0:2::/64".parse().unwrap()), attrs, etcd_lease: 2 };
        let cfg = crate::config::parse(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#).unwrap();
        let me6 = Mine6 {
            config: cfg.ipv6.unwrap(),
            key: LeaseKey { v4: me, v6: Some("fd00:0:0:1::/64".parse().unwrap()) },
            public_ip: my_ip,
            public_ipv6: Some("fd00::1".parse().unwrap()),
            wireguard_port_v6: None,
            joint: None,
        };
        assert_eq!(
            route6_for(&peer, &me6),
            Ok(Some(Route6 { subnet: "fd00:0:0:2::/64".parse().unwrap(), public_ip: "fd00::2".parse().unwrap(), vtep_mac: [6; 6], wireguard: None, joint: None }))
        );
        assert_eq!(route6_for(&Lease { subnet6: None, ..peer.clone() }, &me6), Ok(None), "an IPv4-only peer");
        let v4_only_attrs = LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 2), 1, [2; 6]);
        assert_eq!(route6_for(&Lease { attrs: v4_only_attrs, ..peer.clone() }, &me6), Ok(None), "no PublicIPv6 or v6 VtepMAC");
        assert_eq!(route6_for(&Lease { subnet: me, ..peer.clone() }, &me6), Ok(None), "our own");
        for bad in ["2000::/3", "fd00:0:0:1::/64", "fd01::/64", "fd00::/64"] {
            let l = Lease { subnet6: Some(bad.parse().unwrap()), ..peer.clone() };
            assert!(matches!(route6_for(&l, &me6), Err(LeaseFormatError::Ipv6SubnetRefused(_))), "{bad}");
        }
    }

    /// A dual-stack wireguard node (Mode separate): a peer's IPv6 side is a peer on
    /// flannel-wg-v6 with the key and port of its BackendV6Data (its own port where the lease
    /// names none); an IPv4-only wireguard peer has none; a bad IPv6 key is refused.
    #[test]
    fn dual_stack_wireguard_peers_get_an_ipv6_peer() {
        let cfg = crate::config::parse(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#).unwrap();
        let me6 = Mine6 {
            config: cfg.ipv6.unwrap(),
            key: LeaseKey { v4: "10.0.1.0/24".parse().unwrap(), v6: Some("fd00:0:0:1::/64".parse().unwrap()) },
            public_ip: Ipv4Addr::new(192, 168, 0, 1),
            public_ipv6: Some("fd00:64::1".parse().unwrap()),
            wireguard_port_v6: Some(51821),
            joint: None,
        };
        let key = [7u8; 32];
        let v4 = LeaseAttrs::wireguard(Ipv4Addr::new(192, 168, 0, 2), &key, 51820);
        let peer = Lease {
            subnet: "10.0.2.0/24".parse().unwrap(),
            subnet6: Some("fd00:0:0:2::/64".parse().unwrap()),
            attrs: v4.clone().with_wireguard_v6("fd00:64::2".parse().unwrap(), &key, 51999),
            etcd_lease: 2,
        };
        let want = |port| Route6 {
            subnet: "fd00:0:0:2::/64".parse().unwrap(),
            public_ip: "fd00:64::2".parse().unwrap(),
            vtep_mac: [0; 6],
            wireguard: Some(crate::maps::WireguardPeer { public_key: key, port }),
            joint: None,
        };
        assert_eq!(route6_for(&peer, &me6), Ok(Some(want(51999))));
        let mut no_port = peer.clone();
        no_port.attrs.backend_v6_data = Some(serde_json::json!({"PublicKey": crate::wireguard::format_key(&key)}));
        assert_eq!(route6_for(&no_port, &me6), Ok(Some(want(51821))), "our own port where the lease names none");
        let v4_only = Lease { attrs: LeaseAttrs { public_ipv6: Some("fd00:64::2".parse().unwrap()), ..v4 }, ..peer.clone() };
        assert_eq!(route6_for(&v4_only, &me6), Ok(None), "no BackendV6Data: no IPv6 peer");
        let mut bad = peer.clone();
        bad.attrs.backend_v6_data = Some(serde_json::json!({"PublicKey": "c2hvcnQ=", "Port": 51821}));
        assert!(matches!(route6_for(&bad, &me6), Err(LeaseFormatError::BadWireguardData(_))));
        // A vxlan node ignores the wireguard parts (no IPv6 VtepMAC: no route).
        assert_eq!(route6_for(&peer, &Mine6 { wireguard_port_v6: None, ..me6 }), Ok(None));
    }

    /// Modes auto, ipv4 and ipv6 (one device): a peer with both subnets, its endpoint in the
    /// Mode's family at its BackendData port (its one device's ListenPort), never ListenPortV6.
    #[test]
    fn one_device_wireguard_peers_carry_both_subnets_and_the_modes_endpoint() {
        use crate::config::WireguardMode::{Auto, Ipv4, Ipv6};
        let cfg = crate::config::parse(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"wireguard","Mode":"auto"}}"#).unwrap();
        let side = |mode, ours4: Ipv4Addr, ours6: &str| JointSide {
            mode,
            listen_port: 51820,
            network4: Some(cfg.network),
            public_ip: Some(ours4),
            public_ipv6: ours6.parse().unwrap(),
        };
        let me6 = |j: JointSide| Mine6 {
            config: cfg.ipv6.unwrap(),
            key: LeaseKey { v4: "10.0.1.0/24".parse().unwrap(), v6: Some("fd00:0:0:1::/64".parse().unwrap()) },
            public_ip: j.public_ip.unwrap(),
            public_ipv6: Some(j.public_ipv6),
            wireguard_port_v6: Some(51821),
            joint: Some(j),
        };
        let key = [7u8; 32];
        let peer = |ip4: Ipv4Addr, ip6: &str| Lease {
            subnet: "10.0.2.0/24".parse().unwrap(),
            subnet6: Some("fd00:0:0:2::/64".parse().unwrap()),
            attrs: LeaseAttrs::wireguard(ip4, &key, 51999).with_wireguard_v6(ip6.parse().unwrap(), &key, 51821),
            etcd_lease: 2,
        };
        let private4 = Ipv4Addr::new(192, 168, 0, 1);
        let lease = peer(Ipv4Addr::new(192, 168, 0, 2), "fd00:64::2");
        let endpoint = |l: &Lease, j| route6_for(l, &me6(j)).unwrap().unwrap().joint.unwrap().endpoint.to_string();
        assert_eq!(endpoint(&lease, side(Ipv4, private4, "fd00:64::1")), "192.168.0.2:51999");
        assert_eq!(endpoint(&lease, side(Ipv6, private4, "fd00:64::1")), "[fd00:64::2]:51999", "the peer's one port, not its ListenPortV6");
        assert_eq!(endpoint(&lease, side(Auto, private4, "fd00:64::1")), "192.168.0.2:51999", "private addresses: IPv4, as flannel");
        let public6 = peer(Ipv4Addr::new(192, 168, 0, 2), "2001:db8::2");
        assert_eq!(endpoint(&public6, side(Auto, private4, "2001:db8::1")), "[2001:db8::2]:51999", "both IPv6 public, IPv4 private: IPv6");
        assert_eq!(endpoint(&public6, side(Auto, private4, "fd00:64::1")), "192.168.0.2:51999", "our IPv6 is private: IPv4");
        let public4 = peer(Ipv4Addr::new(198, 51, 100, 2), "2001:db8::2");
        assert_eq!(endpoint(&public4, side(Auto, private4, "2001:db8::1")), "198.51.100.2:51999", "a public IPv4 address wins");
        let r = route6_for(&lease, &me6(side(Ipv4, private4, "fd00:64::1"))).unwrap().unwrap();
        assert_eq!(r.joint.unwrap().subnet4, Some("10.0.2.0/24".parse().unwrap()));
        assert_eq!(r.wireguard, Some(crate::maps::WireguardPeer { public_key: key, port: 51999 }));
        // A lease without a port: our ListenPort; an IPv4 subnet outside the network: refused.
        let mut no_port = lease.clone();
        no_port.attrs.backend_data = Some(serde_json::json!({"PublicKey": crate::wireguard::format_key(&key)}));
        assert_eq!(endpoint(&no_port, side(Ipv6, private4, "fd00:64::1")), "[fd00:64::2]:51820");
        let outside = Lease { subnet: "172.16.0.0/24".parse().unwrap(), ..peer(Ipv4Addr::new(192, 168, 0, 9), "fd00:64::9") };
        assert!(matches!(route6_for(&outside, &me6(side(Ipv4, private4, "fd00:64::1"))), Err(LeaseFormatError::BadWireguardData(_))));
    }

    #[test]
    fn auto_mode_chooses_the_family_as_flannels_select_mode() {
        use crate::config::WireguardMode::{Ipv4, Ipv6};
        let (p4, pub4): (Ipv4Addr, Ipv4Addr) = ("10.1.2.3".parse().unwrap(), "203.0.113.3".parse().unwrap());
        let (ula, global): (Ipv6Addr, Ipv6Addr) = ("fd00::3".parse().unwrap(), "2001:db8::3".parse().unwrap());
        assert_eq!(select_family(pub4, None, Some(p4), global), Ipv4, "no IPv6 address");
        assert_eq!(select_family(pub4, Some(global), Some(p4), global), Ipv4);
        assert_eq!(select_family(pub4, Some(global), None, global), Ipv6, "a public IPv4 peer, but we have no IPv4");
        assert_eq!(select_family(p4, Some(global), Some(p4), global), Ipv6);
        assert_eq!(select_family(p4, Some(ula), Some(p4), global), Ipv4, "the peer's IPv6 is private");
        assert_eq!(select_family("172.31.0.1".parse().unwrap(), Some(global), Some(p4), "fc00::1".parse().unwrap()), Ipv4, "ours is private");
        assert_eq!(select_family("172.32.0.1".parse().unwrap(), Some(global), Some(p4), global), Ipv4, "172.32/16 is public to flannel");
    }

    /// In an IPv6-only network every lease says PublicIP 0.0.0.0 and has the key's 0.0.0.0/0:
    /// peers are told apart from us by their IPv6 subnet and address.
    #[test]
    fn ipv6_only_peers_get_routes_and_we_get_none() {
        let cfg = crate::config::parse(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#).unwrap();
        let me6 = Mine6 {
            config: cfg.ipv6.unwrap(),
            key: LeaseKey::ipv6_only("fd00:0:0:1::/64".parse().unwrap()),
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: Some("fd00:64::1".parse().unwrap()),
            wireguard_port_v6: None,
            joint: None,
        };
        let lease = |s6: &str, ip6: &str| {
            let k = LeaseKey::ipv6_only(s6.parse().unwrap());
            Lease { subnet: k.v4, subnet6: k.v6, attrs: LeaseAttrs::vxlan_ipv6_only(ip6.parse().unwrap(), 1, [6; 6]), etcd_lease: 2 }
        };
        assert_eq!(
            route6_for(&lease("fd00:0:0:2::/64", "fd00:64::2"), &me6),
            Ok(Some(Route6 { subnet: "fd00:0:0:2::/64".parse().unwrap(), public_ip: "fd00:64::2".parse().unwrap(), vtep_mac: [6; 6], wireguard: None, joint: None }))
        );
        assert_eq!(route6_for(&lease("fd00:0:0:1::/64", "fd00:64::1"), &me6), Ok(None), "our own");
        assert_eq!(route6_for(&lease("fd00:0:0:3::/64", "fd00:64::1"), &me6), Ok(None), "another lease naming our address");
        assert!(matches!(route6_for(&lease("fd01::/64", "fd00:64::4"), &me6), Err(LeaseFormatError::Ipv6SubnetRefused(_))));
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

    use proptest::prelude::*;

    /// A lease event drawn from a small world (a few subnets and nodes, this node among
    /// them), so that sequences revisit the same keys: puts by other nodes, by us, by a node
    /// taking our subnet, without a VtepMAC, IPv6-only nodes' leases (never an IPv4 route),
    /// and deletes.
    fn event() -> impl Strategy<Value = LeaseEvent> {
        let key = prop_oneof![
            4 => (0u8..6).prop_map(|i| LeaseKey::from(&Ipv4Net::new(Ipv4Addr::new(10, 0, i, 0), 24).unwrap())),
            1 => (0u16..2).prop_map(|i| LeaseKey::ipv6_only(Ipv6Net::new(Ipv6Addr::new(0xfd00, 0, 0, i, 0, 0, 0, 0), 64).unwrap())),
        ];
        let put = (key.clone(), 1u8..5, any::<bool>(), any::<u8>()).prop_map(|(key, node, has_mac, mac)| {
            let ip = Ipv4Addr::new(192, 168, 0, node);
            let attrs = match (key.is_ipv6_only(), has_mac) {
                (true, _) => LeaseAttrs::vxlan_ipv6_only(Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, node as u16), 1, [6, 0, 0, 0, node, mac]),
                (false, true) => LeaseAttrs::vxlan(ip, 1, [2, 0, 0, 0, node, mac]),
                (false, false) => LeaseAttrs::udp(ip),
            };
            LeaseEvent::Put(Lease { subnet: key.v4, subnet6: key.v6, attrs, etcd_lease: 7 })
        });
        prop_oneof![3 => put, 1 => key.prop_map(LeaseEvent::Delete)]
    }

    proptest! {
        /// Events and listings agree: from the routes a listing gave, applying each watched
        /// event's decision gives the routes a fresh listing of the same store would give.
        /// (Our own subnet is 10.0.0.0/24 and our address 192.168.0.1; losing our own lease
        /// is the daemon's business and ends the sequence as it would end the watch.)
        #[test]
        fn events_and_listings_agree(start in proptest::collection::vec(event(), 0..8), events in proptest::collection::vec(event(), 0..40)) {
            let me = Mine::new("10.0.0.0/24".parse().unwrap(), Ipv4Addr::new(192, 168, 0, 1), EncapMode::Vxlan);
            let mut store: BTreeMap<LeaseKey, Lease> = BTreeMap::new();
            let apply = |store: &mut BTreeMap<LeaseKey, Lease>, ev: &LeaseEvent| match ev {
                LeaseEvent::Put(l) => { store.insert(l.key(), l.clone()); }
                LeaseEvent::Delete(s) => { store.remove(s); }
                LeaseEvent::Malformed(..) => {}
            };
            for ev in &start {
                apply(&mut store, ev);
            }
            let listing = |store: &BTreeMap<LeaseKey, Lease>| {
                let leases: Vec<Lease> = store.values().cloned().collect();
                let (routes, _) = desired_routes(&leases, &me);
                routes.into_iter().map(|r| (r.subnet, r)).collect::<BTreeMap<_, _>>()
            };
            let mut routes = listing(&store);
            for ev in &events {
                apply(&mut store, ev);
                match on_event(ev, &me) {
                    EventAction::SetRoute { subnet, route: Some(r), .. } => { routes.insert(subnet, r); }
                    EventAction::SetRoute { subnet, route: None, .. } => { routes.remove(&subnet); }
                    EventAction::LostOwn => break,
                    EventAction::OwnNamesOther(_) | EventAction::Skipped(..) => {}
                }
                prop_assert_eq!(&routes, &listing(&store), "after {:?}", ev);
            }
        }
    }

    #[test]
    fn event_decisions() {
        let me = Mine::new("10.0.0.0/24".parse().unwrap(), Ipv4Addr::new(192, 168, 0, 1), EncapMode::Vxlan);
        let other = Lease { subnet: "10.0.2.0/24".parse().unwrap(), subnet6: None, attrs: LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 2), 1, [2; 6]), etcd_lease: 2 };
        assert_eq!(on_event(&LeaseEvent::Put(other.clone()), &me), EventAction::SetRoute { subnet: other.subnet, route: Some(route("10.0.2.0/24", 2, 2)), skipped: None });
        let no_mac = Lease { attrs: LeaseAttrs::udp(Ipv4Addr::new(192, 168, 0, 2)), ..other.clone() };
        assert_eq!(on_event(&LeaseEvent::Put(no_mac), &me), EventAction::SetRoute { subnet: other.subnet, route: None, skipped: Some(LeaseFormatError::NoVtepMac) });
        assert_eq!(on_event(&LeaseEvent::Delete(LeaseKey::from(&me.subnet)), &me), EventAction::LostOwn);
        // An IPv6-only node's lease: nothing for the IPv4 routes (its key's 0.0.0.0/0 least of all).
        let v6_only = Lease {
            subnet: crate::lease::NO_IPV4,
            subnet6: Some("fd00:0:0:2::/64".parse().unwrap()),
            attrs: LeaseAttrs::vxlan_ipv6_only("fd00:64::2".parse().unwrap(), 1, [6; 6]),
            etcd_lease: 3,
        };
        assert!(matches!(on_event(&LeaseEvent::Put(v6_only.clone()), &me), EventAction::Skipped(_, LeaseFormatError::Ipv6Only(_))));
        assert!(matches!(on_event(&LeaseEvent::Delete(v6_only.key()), &me), EventAction::Skipped(_, LeaseFormatError::Ipv6Only(_))));
        assert_eq!(desired_routes(&[v6_only], &me), (vec![], vec![]));
        let taken = Lease { subnet: me.subnet, ..other.clone() };
        assert_eq!(on_event(&LeaseEvent::Put(taken), &me), EventAction::OwnNamesOther(Ipv4Addr::new(192, 168, 0, 2)));
    }

    #[test]
    fn own_and_malformed_leases_get_no_route() {
        let me: Ipv4Net = "10.0.1.0/24".parse().unwrap();
        let my_ip = Ipv4Addr::new(192, 168, 0, 1);
        let leases = [
            Lease { subnet: me, subnet6: None, attrs: LeaseAttrs::vxlan(my_ip, 1, [1; 6]), etcd_lease: 1 },
            Lease { subnet: "10.0.9.0/24".parse().unwrap(), subnet6: None, attrs: LeaseAttrs::vxlan(my_ip, 1, [1; 6]), etcd_lease: 1 },
            Lease { subnet: "10.0.2.0/24".parse().unwrap(), subnet6: None, attrs: LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 2), 1, [2; 6]), etcd_lease: 2 },
            Lease { subnet: "10.0.3.0/24".parse().unwrap(), subnet6: None, attrs: LeaseAttrs::udp(Ipv4Addr::new(192, 168, 0, 3)), etcd_lease: 3 },
        ];
        let (routes, skipped) = desired_routes(&leases, &Mine::new(me, my_ip, EncapMode::Vxlan));
        assert_eq!(routes, vec![route("10.0.2.0/24", 2, 2)]);
        assert_eq!(skipped, vec![("10.0.3.0/24".parse().unwrap(), LeaseFormatError::NoVtepMac)]);
        let (routes, skipped) = desired_routes(&leases, &Mine::new(me, my_ip, EncapMode::Udp));
        assert_eq!(routes.len(), 2, "udp needs no VtepMAC");
        assert!(skipped.is_empty());
        assert_eq!(routes[1].vtep_mac, [0; 6]);
    }

    /// A wireguard node's routes are peers: each lease's key and port (its own listen port
    /// for a lease without one); a lease of another backend, or with a bad key, is skipped
    /// with the reason and disturbs no other.
    #[test]
    fn wireguard_leases_are_peers_and_bad_ones_are_skipped_alone() {
        let me = Mine { wireguard_port: Some(51820), ..Mine::new("10.0.1.0/24".parse().unwrap(), Ipv4Addr::new(192, 168, 0, 1), EncapMode::Udp) };
        let (k2, k3) = ([2u8; 32], [3u8; 32]);
        let mut no_port = LeaseAttrs::wireguard(Ipv4Addr::new(192, 168, 0, 3), &k3, 1);
        no_port.backend_data = Some(serde_json::json!({"PublicKey": crate::wireguard::format_key(&k3)}));
        let mut bad_key = LeaseAttrs::wireguard(Ipv4Addr::new(192, 168, 0, 4), &k3, 1);
        bad_key.backend_data = Some(serde_json::json!({"PublicKey": "AAAA", "Port": 51820}));
        let leases = [
            Lease { subnet: "10.0.2.0/24".parse().unwrap(), subnet6: None, attrs: LeaseAttrs::wireguard(Ipv4Addr::new(192, 168, 0, 2), &k2, 51999), etcd_lease: 2 },
            Lease { subnet: "10.0.3.0/24".parse().unwrap(), subnet6: None, attrs: no_port, etcd_lease: 3 },
            Lease { subnet: "10.0.4.0/24".parse().unwrap(), subnet6: None, attrs: bad_key, etcd_lease: 4 },
            Lease { subnet: "10.0.5.0/24".parse().unwrap(), subnet6: None, attrs: LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 5), 1, [5; 6]), etcd_lease: 5 },
        ];
        let (routes, skipped) = desired_routes(&leases, &me);
        let peer = |k, port| Some(crate::maps::WireguardPeer { public_key: k, port });
        assert_eq!(routes.iter().map(|r| (r.subnet.to_string(), r.wireguard)).collect::<Vec<_>>(), vec![
            ("10.0.2.0/24".to_string(), peer(k2, 51999)),
            ("10.0.3.0/24".to_string(), peer(k3, 51820)),
        ]);
        let skipped: Vec<String> = skipped.iter().map(|(s, e)| format!("{s}: {e}")).collect();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].starts_with("10.0.4.0/24: wireguard lease refused: BackendData.PublicKey"), "{skipped:?}");
        assert!(skipped[1].contains("not \"wireguard\""), "{skipped:?}");
    }
}
