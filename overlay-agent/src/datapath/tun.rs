//! The TUN data plane (`--dataplane tun`): flannel's udp backend design, in userspace. The
//! benchmark's baseline and a fallback for kernels without the eBPF features we need.
//!
//! A TUN device (`flannel0`) takes the packets the host routes to the overlay network; one
//! thread reads them, finds the peer by longest-prefix match on the destination, decrements
//! the TTL (incremental checksum) and sends the raw IPv4 packet as the payload of a UDP
//! datagram to the peer's port 8285: the same wire format as the eBPF `udp` encapsulation, so
//! TUN and eBPF nodes interoperate. Unroutable destinations get an ICMP net-unreachable back,
//! as from flannel's proxy. A second thread receives datagrams, accepts them only from peers
//! (flannel accepts anyone) carrying an IPv4 packet for this node's subnet, decrements the TTL
//! and writes the packet to the TUN device.
//!
//! Unlike the eBPF data plane, forwarding stops when the agent exits (the device goes with its
//! file descriptor), as it does with flannel's udp backend.

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;
use overlay_common::{decrement_ttl, ipv4_checksum, IPV4_HLEN};

use crate::maps::{MapsError, Route};

/// The TUN path's routes: exact match per prefix length, longest length first (leases all
/// share one length in practice, so a lookup is one hash probe).
#[derive(Debug, Default)]
pub struct TunRoutes {
    inner: RwLock<TunRouteTable>,
}

#[derive(Debug, Default)]
struct TunRouteTable {
    by_prefix: HashMap<(u8, u32), Route>,
    /// Prefix lengths present, longest first.
    lengths: Vec<u8>,
    peers: HashMap<Ipv4Addr, usize>,
}

impl TunRouteTable {
    fn rebuild_lengths(&mut self) {
        let set: BTreeSet<u8> = self.by_prefix.keys().map(|(l, _)| *l).collect();
        self.lengths = set.into_iter().rev().collect();
    }
}

impl TunRoutes {
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<Route> {
        let t = self.inner.read().expect("routes lock");
        let a = u32::from(dst);
        t.lengths.iter().find_map(|&len| {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            t.by_prefix.get(&(len, a & mask)).copied()
        })
    }

    pub fn is_peer(&self, ip: Ipv4Addr) -> bool {
        self.inner.read().expect("routes lock").peers.contains_key(&ip)
    }

    pub fn upsert(&self, r: &Route) {
        let mut t = self.inner.write().expect("routes lock");
        let key = (r.subnet.prefix_len(), u32::from(r.subnet.network()));
        if let Some(old) = t.by_prefix.insert(key, *r) {
            if let Some(n) = t.peers.get_mut(&old.public_ip) {
                *n -= 1;
                if *n == 0 {
                    t.peers.remove(&old.public_ip);
                }
            }
        }
        *t.peers.entry(r.public_ip).or_insert(0) += 1;
        t.rebuild_lengths();
    }

    pub fn remove(&self, subnet: Ipv4Net) -> bool {
        let mut t = self.inner.write().expect("routes lock");
        let Some(old) = t.by_prefix.remove(&(subnet.prefix_len(), u32::from(subnet.network()))) else {
            return false;
        };
        if let Some(n) = t.peers.get_mut(&old.public_ip) {
            *n -= 1;
            if *n == 0 {
                t.peers.remove(&old.public_ip);
            }
        }
        t.rebuild_lengths();
        true
    }

    pub fn all(&self) -> Vec<Route> {
        let mut v: Vec<Route> = self.inner.read().expect("routes lock").by_prefix.values().copied().collect();
        v.sort_by_key(|r| r.subnet);
        v
    }
}

/// Where the daemon keeps the routes: the eBPF maps or the TUN path's table.
pub trait RouteTable: Send {
    fn routes(&self) -> Result<Vec<Route>, MapsError>;
    fn upsert_route(&mut self, r: &Route) -> Result<(), MapsError>;
    fn remove_route(&mut self, subnet: Ipv4Net) -> Result<(), MapsError>;
    /// Whether what forwards has drifted from what was written (a cheap check, made every
    /// second): then the routes are reconciled again. Only tables kept in two places
    /// (ipip's kernel routes and map) can drift apart.
    fn drifted(&self) -> bool {
        false
    }
}

/// host-gw's routes: kernel routes to each peer's subnet via its address on the underlay
/// (marked `proto 97`, as DirectRouting's); no maps, no programs. A peer not on the
/// underlay's link is refused.
pub struct HostGwRoutes {
    pub iface: String,
}

impl RouteTable for HostGwRoutes {
    fn routes(&self) -> Result<Vec<Route>, MapsError> {
        let routes = crate::netdev::direct_routes().map_err(|e| MapsError::Host(e.to_string()))?;
        Ok(routes.into_iter().map(|(subnet, public_ip)| Route { subnet, public_ip, vtep_mac: [0; 6], wireguard: None }).collect())
    }
    fn upsert_route(&mut self, r: &Route) -> Result<(), MapsError> {
        let on_link = crate::netdev::directly_reachable(r.public_ip, &self.iface).map_err(|e| MapsError::Host(e.to_string()))?;
        if !on_link {
            return Err(MapsError::NotOnLink { peer: r.public_ip, iface: self.iface.clone() });
        }
        crate::netdev::set_direct_route(r.subnet, r.public_ip, &self.iface).map_err(|e| MapsError::Host(e.to_string()))
    }
    fn remove_route(&mut self, subnet: Ipv4Net) -> Result<(), MapsError> {
        if !self.routes()?.iter().any(|r| r.subnet == subnet) {
            return Err(MapsError::NoSuchRoute(subnet));
        }
        crate::netdev::del_direct_route(subnet).map_err(|e| MapsError::Host(e.to_string()))
    }
}

impl RouteTable for crate::maps::Maps {
    fn routes(&self) -> Result<Vec<Route>, MapsError> {
        crate::maps::Maps::routes(self)
    }
    fn upsert_route(&mut self, r: &Route) -> Result<(), MapsError> {
        crate::maps::Maps::upsert_route(self, r)
    }
    fn remove_route(&mut self, subnet: Ipv4Net) -> Result<(), MapsError> {
        crate::maps::Maps::remove_route(self, subnet)
    }
}

impl RouteTable for Arc<TunRoutes> {
    fn routes(&self) -> Result<Vec<Route>, MapsError> {
        Ok(self.all())
    }
    fn upsert_route(&mut self, r: &Route) -> Result<(), MapsError> {
        self.upsert(r);
        Ok(())
    }
    fn remove_route(&mut self, subnet: Ipv4Net) -> Result<(), MapsError> {
        if self.remove(subnet) {
            Ok(())
        } else {
            Err(MapsError::NoSuchRoute(subnet))
        }
    }
}

/// What the TUN path counted (reported in /metrics).
#[derive(Debug, Default)]
pub struct TunStats {
    pub encapsulated: AtomicU64,
    pub decapsulated: AtomicU64,
    pub no_route: AtomicU64,
    pub unknown_peer: AtomicU64,
    pub malformed: AtomicU64,
    pub ttl_expired: AtomicU64,
    pub not_local_subnet: AtomicU64,
}

pub struct TunDataplane {
    pub routes: Arc<TunRoutes>,
    pub stats: Arc<TunStats>,
    pub mtu: u32,
}

/// The internet checksum of any byte string.
fn checksum(data: &[u8]) -> u16 {
    let sum = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    !overlay_common::fold(sum)
}

/// ICMP destination unreachable / net unreachable from `from` about `orig` (an IPv4 packet):
/// its header and the first 8 bytes of its payload, as RFC 792 asks.
pub fn icmp_net_unreachable(orig: &[u8], from: Ipv4Addr) -> Option<Vec<u8>> {
    if orig.len() < IPV4_HLEN || orig[0] >> 4 != 4 {
        return None;
    }
    // Never answer an ICMP error with another one.
    let ihl = ((orig[0] & 0x0f) as usize) * 4;
    if orig[9] == 1 && orig.len() > ihl && !matches!(orig[ihl], 0 | 8 | 13 | 15 | 17) {
        return None;
    }
    let quoted = &orig[..orig.len().min(ihl + 8)];
    let total = IPV4_HLEN + 8 + quoted.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&from.octets());
    p[16..20].copy_from_slice(&orig[12..16]);
    let c = ipv4_checksum(p[..IPV4_HLEN].try_into().expect("20 bytes"));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 3; // destination unreachable
    p[21] = 0; // net unreachable
    p[28..].copy_from_slice(quoted);
    let c = checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    Some(p)
}

/// Start forwarding between the TUN device `device` (already created by `create_device`) and
/// UDP `port`.
pub fn start(
    dev: tun_rs::SyncDevice,
    port: u16,
    subnet: Ipv4Net,
    mtu: u32,
) -> Result<TunDataplane> {
    let sock = UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
        .with_context(|| format!("binding UDP port {port} for the TUN data plane"))?;
    let dev = Arc::new(dev);
    let sock = Arc::new(sock);
    let routes = Arc::new(TunRoutes::default());
    let stats = Arc::new(TunStats::default());
    let local = subnet.network();

    // TUN -> UDP: encapsulate.
    {
        let (dev, sock, routes, stats) = (dev.clone(), sock.clone(), routes.clone(), stats.clone());
        std::thread::Builder::new().name("tun-encap".into()).spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match dev.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(error = %e, "reading the TUN device; stopping encapsulation");
                        return;
                    }
                };
                let pkt = &mut buf[..n];
                if n < IPV4_HLEN || pkt[0] >> 4 != 4 {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
                let Some(route) = routes.lookup(dst) else {
                    stats.no_route.fetch_add(1, Ordering::Relaxed);
                    if let Some(icmp) = icmp_net_unreachable(pkt, local) {
                        let _ = dev.send(&icmp);
                    }
                    continue;
                };
                if !decrement_ttl(pkt) {
                    stats.ttl_expired.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match sock.send_to(pkt, SocketAddrV4::new(route.public_ip, port)) {
                    Ok(_) => {
                        stats.encapsulated.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!(error = %e, peer = %route.public_ip, "sending to peer"),
                }
            }
        })?;
    }
    // UDP -> TUN: decapsulate.
    {
        let (dev, sock, routes, stats) = (dev.clone(), sock.clone(), routes.clone(), stats.clone());
        std::thread::Builder::new().name("tun-decap".into()).spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, from) = match sock.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "receiving on the UDP socket; stopping decapsulation");
                        return;
                    }
                };
                let SocketAddr::V4(from) = from else { continue };
                if !routes.is_peer(*from.ip()) {
                    stats.unknown_peer.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let pkt = &mut buf[..n];
                if n < IPV4_HLEN || pkt[0] >> 4 != 4 || (u16::from_be_bytes([pkt[2], pkt[3]]) as usize) > n {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
                if !subnet.contains(&dst) {
                    stats.not_local_subnet.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if !decrement_ttl(pkt) {
                    stats.ttl_expired.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match dev.send(pkt) {
                    Ok(_) => {
                        stats.decapsulated.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!(error = %e, "writing to the TUN device"),
                }
            }
        })?;
    }
    Ok(TunDataplane { routes, stats, mtu })
}

/// Create the TUN device (L3, no packet information header, as flannel's).
pub fn create_device(name: &str, mtu: u32) -> Result<tun_rs::SyncDevice> {
    let mtu16 = u16::try_from(mtu).context("MTU too large")?;
    tun_rs::DeviceBuilder::new()
        .name(name)
        .mtu(mtu16)
        .build_sync()
        .with_context(|| format!("creating TUN device {name} (is /dev/net/tun available?)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(s: &str, ip: u8) -> Route {
        Route { subnet: s.parse().unwrap(), public_ip: Ipv4Addr::new(192, 168, 0, ip), vtep_mac: [0; 6], wireguard: None }
    }

    #[test]
    fn longest_prefix_wins_and_peers_follow_routes() {
        let t = TunRoutes::default();
        t.upsert(&route("10.0.0.0/16", 1));
        t.upsert(&route("10.0.5.0/24", 2));
        assert_eq!(t.lookup(Ipv4Addr::new(10, 0, 5, 9)).unwrap().public_ip, Ipv4Addr::new(192, 168, 0, 2));
        assert_eq!(t.lookup(Ipv4Addr::new(10, 0, 6, 9)).unwrap().public_ip, Ipv4Addr::new(192, 168, 0, 1));
        assert!(t.lookup(Ipv4Addr::new(10, 1, 0, 1)).is_none());
        assert!(t.is_peer(Ipv4Addr::new(192, 168, 0, 2)));
        t.upsert(&route("10.0.5.0/24", 3));
        assert!(!t.is_peer(Ipv4Addr::new(192, 168, 0, 2)), "re-pointed: old peer gone");
        assert!(t.remove("10.0.5.0/24".parse().unwrap()));
        assert!(!t.remove("10.0.5.0/24".parse().unwrap()));
        assert!(!t.is_peer(Ipv4Addr::new(192, 168, 0, 3)));
    }

    #[test]
    fn icmp_net_unreachable_quotes_the_packet() {
        let mut orig = vec![0u8; 60];
        orig[0] = 0x45;
        orig[2..4].copy_from_slice(&60u16.to_be_bytes());
        orig[8] = 64;
        orig[9] = 17;
        orig[12..16].copy_from_slice(&[10, 0, 1, 2]);
        orig[16..20].copy_from_slice(&[10, 9, 9, 9]);
        let c = ipv4_checksum(orig[..20].try_into().unwrap());
        orig[10..12].copy_from_slice(&c.to_be_bytes());
        let p = icmp_net_unreachable(&orig, Ipv4Addr::new(10, 0, 1, 0)).unwrap();
        assert_eq!(p.len(), 20 + 8 + 28);
        assert_eq!(ipv4_checksum(p[..20].try_into().unwrap()), 0);
        assert_eq!(&p[16..20], &[10, 0, 1, 2], "back to the sender");
        assert_eq!((p[20], p[21]), (3, 0));
        assert_eq!(checksum(&p[20..]), 0, "ICMP checksum verifies");
        assert_eq!(&p[28..], &orig[..28]);
        // Not for ICMP errors.
        let mut err = orig.clone();
        err[9] = 1;
        err[20] = 3;
        assert!(icmp_net_unreachable(&err, Ipv4Addr::new(10, 0, 1, 0)).is_none());
    }
}
