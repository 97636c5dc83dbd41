//! flannel's wireguard backend (pkg/backend/wireguard): the kernel's `flannel-wg` encrypts,
//! decrypts and checks. Each lease is a peer (its public key, endpoint PublicIP:Port, allowed
//! IPs its subnet: cryptokey routing drops what a peer sends from outside its subnet), the
//! whole network is routed through the device, a departed node's peer goes. No programs:
//! every packet arriving on the tunnel is authenticated by the kernel before it is opened,
//! which is more than the underlay checks could add. What this agent does beyond flannel:
//! the device and its peers are kept across a restart (flannel deletes the device when it
//! stops and makes it again), stray peers go, and a damaged device is put back.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use ipnet::Ipv4Net;

use crate::{
    config::WireguardConfig,
    maps::{MapsError, Route, WireguardPeer},
    netdev,
    tun::RouteTable,
    wireguard::{self as wg, Key},
};

/// A wireguard node's device as flannel configures it, and what it is configured with (its
/// secrets `Secret`s, which `Debug` does not show).
#[derive(Clone, Debug)]
pub struct WireguardDevice {
    pub name: String,
    pub private_key: wg::Secret,
    pub public_key: Key,
    pub listen_port: u16,
    pub psk: Option<wg::Secret>,
    pub keepalive: u16,
}


/// Before the lease is claimed (its `BackendData` needs the public key): the node's private
/// key (kept in `key_file`, made there once), flannel-wg made or kept, and given the key and
/// the listen port; the public key read back from the kernel.
pub fn prepare(cfg: &WireguardConfig, key_file: &Path) -> Result<WireguardDevice> {
    let private_key = wg::Secret(wg::load_or_create_key(key_file)?);
    wg::ensure_device(wg::DEVICE)?;
    wg::configure(wg::DEVICE, &private_key, cfg.listen_port)?;
    let public_key = wg::device(wg::DEVICE)?.public_key.context("the kernel gave flannel-wg no public key")?;
    tracing::info!(device = wg::DEVICE, public_key = %wg::format_key(&public_key), listen_port = cfg.listen_port, key_file = %key_file.display(), "wireguard device ready");
    Ok(WireguardDevice { name: wg::DEVICE.to_string(), private_key, public_key, listen_port: cfg.listen_port, psk: cfg.psk, keepalive: cfg.keepalive })
}

/// Before the lease of an IPv6-only node: flannel-wg-v6 alone, with the node's key (kept in
/// `key_file` as on any wireguard node) and `ListenPortV6`.
pub fn prepare_v6_only(cfg: &WireguardConfig, key_file: &Path) -> Result<WireguardDevice> {
    prepare_v6(cfg, wg::Secret(wg::load_or_create_key(key_file)?))
}

/// The key file: `WIREGUARD_KEY_FILE`, as flannel reads it, else /run/flannel/wgkey.
pub fn key_file() -> PathBuf {
    PathBuf::from(wg::key_file(std::env::var("WIREGUARD_KEY_FILE").ok()))
}

/// The MTU of flannel-wg and of containers: the underlay's (or `Backend.MTU`) less 80, as
/// flannel computes it.
pub fn mtu(asked: Option<u32>, underlay_mtu: u32) -> u32 {
    asked.unwrap_or(underlay_mtu).saturating_sub(wg::OVERHEAD)
}

/// Where `status` and `teardown` find that the node behind `bpffs_dir` runs the wireguard
/// backend (no programs, no maps): `device=<name> underlay=<iface>`, and
/// `device6=flannel-wg-v6` on a dual-stack node.
pub fn marker(bpffs_dir: &Path) -> PathBuf {
    crate::datapath::degraded::marker_named(bpffs_dir, "wireguard")
}

/// Record (`Some((device, underlay, IPv6 device))`) or clear that the node runs wireguard.
pub fn set_marker(bpffs_dir: &Path, what: Option<(&str, &str, Option<&str>)>) -> std::io::Result<()> {
    let content = what.map(|(device, underlay, device6)| match device6 {
        Some(d6) => format!("device={device} underlay={underlay} device6={d6}\n"),
        None => format!("device={device} underlay={underlay}\n"),
    });
    crate::datapath::degraded::write_marker(&marker(bpffs_dir), content.as_deref())
}

/// What a wireguard run recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub device: String,
    pub underlay: String,
    /// flannel-wg-v6 on a dual-stack node.
    pub device6: Option<String>,
}

impl Recorded {
    /// The node's wireguard devices.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.device.as_str()).chain(self.device6.as_deref())
    }
}

/// The devices and underlay a wireguard run recorded.
pub fn recorded(bpffs_dir: &Path) -> Option<Recorded> {
    parse_marker(&std::fs::read_to_string(marker(bpffs_dir)).ok()?)
}

fn parse_marker(text: &str) -> Option<Recorded> {
    let field = |k: &str| text.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_string);
    Some(Recorded { device: field("device=")?, underlay: field("underlay=").unwrap_or_default(), device6: field("device6=") })
}

/// One device's part of the status line (`prefix` before each key), and whether it is up.
fn device_status(device: &str, prefix: &str) -> Result<(String, bool)> {
    let link = netdev::link(device)?;
    let up = link.as_ref().is_some_and(|l| l.up && l.kind.as_deref() == Some("wireguard"));
    let d = if up { wg::device(device)? } else { wg::DeviceInfo::default() };
    let handshaken = d.peers.iter().filter(|p| p.last_handshake_secs != 0).count();
    let public_key = d.public_key.map_or("-".to_string(), |k| wg::format_key(&k));
    let keyed = if prefix.is_empty() { format!(" public_key={public_key}") } else { String::new() };
    Ok((format!("{keyed} {prefix}listen_port={} {prefix}peers={} {prefix}handshaken={handshaken}", d.listen_port, d.peers.len()), up))
}

/// `overlay-agent status` of a wireguard node: one line (the device, its key and port, its
/// peers and how many have completed a handshake; the same for flannel-wg-v6 with `v6_`
/// keys on a dual-stack node), and whether its devices are up.
pub fn status_line(bpffs_dir: &Path) -> Result<Option<(String, bool)>> {
    let Some(r) = recorded(bpffs_dir) else { return Ok(None) };
    let (v4, up4) = device_status(&r.device, "")?;
    let (v6, up6) = match &r.device6 {
        Some(d6) => {
            let (s, up) = device_status(d6, "v6_")?;
            (format!(" v6_device={d6}{s}"), up)
        }
        None => (String::new(), true),
    };
    let up = up4 && up6;
    let line = format!(
        "device={} underlay={} encap=kernel decap=kernel attach=- guard=none ready={up} backend=wireguard{v4}{v6}",
        r.device, r.underlay
    );
    Ok(Some((line, up)))
}

/// The route table of a wireguard node: the device's peers.
pub struct WireguardPeers {
    pub dev: WireguardDevice,
    /// The overlay network (routed through the device) and this node's subnet (its address).
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    pub mtu: u32,
}

fn host(e: impl std::fmt::Display) -> MapsError {
    MapsError::Host(e.to_string())
}

impl WireguardPeers {
    /// After the lease: flannel-wg up with its MTU, the subnet's network address (/32) on
    /// it, the network routed through it (scope link), and peers that belong to no subnet
    /// (a stray one left by a key change) gone.
    pub fn configure(&self) -> Result<()> {
        netdev::configure_up(&self.dev.name, Some(self.mtu))?;
        netdev::set_device_address(&self.dev.name, self.subnet.network())?;
        netdev::route_network_link(self.network, &self.dev.name)?;
        self.remove_strays()?;
        Ok(())
    }

    /// What is wrong with the device (`None`: intact): see `device_damage`.
    pub fn damage(&self) -> Result<Option<&'static str>> {
        device_damage(&self.dev, || netdev::has_address(&self.dev.name, self.subnet.network()), || netdev::network_route_via(self.network, &self.dev.name))
    }

    /// Make the device as at start (its peers come back with the next reconcile).
    pub fn restore(&self) -> Result<()> {
        remake(&self.dev)?;
        self.configure()
    }

    /// Peers with no subnet of their own (no allowed IPs: another peer took them, as the
    /// kernel moves an allowed IP to the peer last given it) go.
    fn remove_strays(&self) -> Result<()> {
        for p in wg::device(&self.dev.name)?.peers {
            if p.allowed_ips.is_empty() {
                tracing::info!(peer = %wg::format_key(&p.public_key), "removing a wireguard peer that no longer has a subnet");
                wg::remove_peer(&self.dev.name, &p.public_key)?;
            }
        }
        Ok(())
    }
}

/// What is wrong with a wireguard device (`None`: intact): gone, made again by someone with
/// another key or port, down, without its address (`has_address`) or the network's route
/// through it (`has_route`).
fn device_damage(
    dev: &WireguardDevice,
    has_address: impl FnOnce() -> Result<bool, netdev::NetdevError>,
    has_route: impl FnOnce() -> Result<bool, netdev::NetdevError>,
) -> Result<Option<&'static str>> {
    let Some(l) = netdev::link(&dev.name)? else { return Ok(Some("the device is gone")) };
    if l.kind.as_deref() != Some("wireguard") {
        return Ok(Some("the device is no longer a wireguard device"));
    }
    let d = wg::device(&dev.name)?;
    Ok(if d.public_key != Some(dev.public_key) || d.listen_port != dev.listen_port {
        Some("its key or listen port changed")
    } else if !l.up {
        Some("the device is down")
    } else if !has_address()? {
        Some("its address is gone or changed")
    } else if !has_route()? {
        Some("the network's route no longer goes through it")
    } else {
        None
    })
}

/// The device made again (a link of another kind in its place removed first) with its key
/// and listen port; no peers, no address yet.
fn remake(dev: &WireguardDevice) -> Result<()> {
    if netdev::link(&dev.name)?.is_some_and(|l| l.kind.as_deref() != Some("wireguard")) {
        netdev::delete_link(&dev.name)?;
    }
    wg::ensure_device(&dev.name)?;
    wg::configure(&dev.name, &dev.private_key, dev.listen_port)
}

/// The IPv4 table of a node whose one wireguard device carries both families (Modes auto,
/// ipv4, ipv6 with IPv6): each peer is written whole, with both its subnets, by the IPv6 side
/// (`WireguardPeers6` with `ipv4`); the IPv4 routes are only kept here for the reconcile.
#[derive(Default)]
pub struct JointIpv4Routes(std::collections::BTreeMap<Ipv4Net, Route>);

impl RouteTable for JointIpv4Routes {
    fn routes(&self) -> Result<Vec<Route>, MapsError> {
        Ok(self.0.values().copied().collect())
    }
    fn upsert_route(&mut self, r: &Route) -> Result<(), MapsError> {
        self.0.insert(r.subnet, *r);
        Ok(())
    }
    fn remove_route(&mut self, subnet: Ipv4Net) -> Result<(), MapsError> {
        self.0.remove(&subnet).map(drop).ok_or(MapsError::NoSuchRoute(subnet))
    }
}

/// The routes a device's peers stand for: one per peer with exactly one IPv4 subnet, its
/// endpoint's address and port, its key. One whose preshared key or keepalive is not what
/// the config says, or with no IPv4 endpoint, is given no peer address, so that the reconcile
/// writes it again (or removes it).
pub fn peer_routes(peers: &[wg::PeerInfo], psk: Option<wg::Secret>, keepalive: u16) -> Vec<Route> {
    peers
        .iter()
        .filter_map(|p| {
            let subnet = wg::single_ipv4_allowed(p)?;
            let endpoint = wg::ipv4_endpoint(p).unwrap_or(wg::NO_ENDPOINT);
            let current = p.preshared_key == psk && p.keepalive == keepalive;
            let public_ip = if current { *endpoint.ip() } else { Ipv4Addr::UNSPECIFIED };
            Some(Route { subnet, public_ip, vtep_mac: [0; 6], wireguard: Some(WireguardPeer { public_key: p.public_key, port: endpoint.port() }) })
        })
        .collect()
}

impl RouteTable for WireguardPeers {
    fn routes(&self) -> Result<Vec<Route>, MapsError> {
        let d = wg::device(&self.dev.name).map_err(host)?;
        Ok(peer_routes(&d.peers, self.dev.psk, self.dev.keepalive))
    }

    fn upsert_route(&mut self, r: &Route) -> Result<(), MapsError> {
        let Some(peer) = r.wireguard else { return Err(MapsError::Host(format!("route {} has no wireguard peer", r.subnet))) };
        wg::set_peer(
            &self.dev.name,
            &wg::PeerConfig {
                public_key: peer.public_key,
                endpoint: SocketAddrV4::new(r.public_ip, peer.port).into(),
                allowed: r.subnet.into(),
                also_allowed: None,
                preshared_key: self.dev.psk,
                keepalive: self.dev.keepalive,
            },
        )
        .map_err(host)?;
        // A node whose key changed (its key file lost, on tmpfs after a reboot) left its old
        // peer behind, now without the subnet.
        self.remove_strays().map_err(host)
    }

    fn remove_route(&mut self, subnet: Ipv4Net) -> Result<(), MapsError> {
        let d = wg::device(&self.dev.name).map_err(host)?;
        let holds = |p: &wg::PeerInfo| {
            p.allowed_ips.iter().any(|(a, len)| matches!(a, std::net::IpAddr::V4(a) if Ipv4Net::new(*a, *len).is_ok_and(|n| n.trunc() == subnet)))
        };
        let owners: Vec<Key> = d.peers.iter().filter(|p| holds(p)).map(|p| p.public_key).collect();
        if owners.is_empty() {
            return Err(MapsError::NoSuchRoute(subnet));
        }
        for k in owners {
            wg::remove_peer(&self.dev.name, &k).map_err(host)?;
        }
        Ok(())
    }

    fn drifted(&self) -> bool {
        // The device, its address or its route went (someone deleted it, or ran `wg set`
        // with another key): put back, and the peers written again by a fresh reconcile.
        match self.damage() {
            Ok(None) => false,
            Ok(Some(problem)) => {
                tracing::error!(device = %self.dev.name, problem, "the wireguard device was damaged; restoring it");
                match self.restore() {
                    Ok(()) => tracing::warn!(device = %self.dev.name, "wireguard device restored: key, port, address, route; its peers follow"),
                    Err(e) => tracing::error!(error = %crate::error_chain(e.as_ref()), "restoring the wireguard device failed; trying again"),
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(e.as_ref()), "checking the wireguard device");
                false
            }
        }
    }
}

/// Before the lease, on a dual-stack or IPv6-only node (Mode `separate`): flannel-wg-v6 made
/// or kept and given the node's one private key (as flannel's both devices share the key
/// file) and `ListenPortV6`.
pub fn prepare_v6(cfg: &WireguardConfig, private_key: wg::Secret) -> Result<WireguardDevice> {
    wg::ensure_device(wg::DEVICE_V6)?;
    wg::configure(wg::DEVICE_V6, &private_key, cfg.listen_port_v6)?;
    let public_key = wg::device(wg::DEVICE_V6)?.public_key.context("the kernel gave flannel-wg-v6 no public key")?;
    tracing::info!(device = wg::DEVICE_V6, public_key = %wg::format_key(&public_key), listen_port = cfg.listen_port_v6, "wireguard IPv6 device ready");
    Ok(WireguardDevice { name: wg::DEVICE_V6.to_string(), private_key, public_key, listen_port: cfg.listen_port_v6, psk: cfg.psk, keepalive: cfg.keepalive })
}

/// The IPv6 half of a wireguard node (Mode `separate`): flannel-wg-v6's peers, one per
/// lease with an IPv6 side (endpoint [PublicIPv6]:Port of its BackendV6Data, allowed IPs its
/// IPv6 subnet), kept by lease key as the vxlan IPv6 half keeps its routes.
pub struct WireguardPeers6 {
    pub dev: WireguardDevice,
    /// The node's public IPv6 address (the lease's PublicIPv6; peers send to it).
    pub public_ip: std::net::Ipv6Addr,
    pub network: ipnet::Ipv6Net,
    pub subnet: ipnet::Ipv6Net,
    pub mtu: u32,
    /// Where one device carries both families (flannel-wg in Modes auto, ipv4, ipv6 of a
    /// dual-stack network): its IPv4 network and subnet, set up and checked here too.
    pub ipv4: Option<(Ipv4Net, Ipv4Net)>,
    routes: std::collections::BTreeMap<crate::lease::LeaseKey, crate::reconcile::Route6>,
    /// A peer write or removal failed: `retry` makes the device match `routes`.
    dirty: bool,
}

impl WireguardPeers6 {
    pub fn new(dev: WireguardDevice, public_ip: std::net::Ipv6Addr, network: ipnet::Ipv6Net, subnet: ipnet::Ipv6Net, mtu: u32) -> Self {
        Self { dev, public_ip, network, subnet, mtu, ipv4: None, routes: Default::default(), dirty: false }
    }

    /// How many peers the IPv6 side holds.
    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// After the lease: up with its MTU, the IPv6 subnet's network address (/128) on it, the
    /// IPv6 network routed through it (scope link).
    pub fn configure(&self) -> Result<()> {
        netdev::configure_up(&self.dev.name, Some(self.mtu))?;
        if let Some((network4, subnet4)) = self.ipv4 {
            netdev::set_device_address(&self.dev.name, subnet4.network())?;
            netdev::route_network_link(network4, &self.dev.name)?;
        }
        netdev::set_device_address6(&self.dev.name, self.subnet.network())?;
        netdev::route_network_link6(self.network, &self.dev.name)?;
        Ok(())
    }

    /// What is wrong with flannel-wg-v6 (`None`: intact), as for flannel-wg.
    pub fn damage(&self) -> Result<Option<&'static str>> {
        let name = &self.dev.name;
        device_damage(
            &self.dev,
            || Ok(netdev::has_address6(name, self.subnet.network())? && self.ipv4.map_or(Ok(true), |(_, s4)| netdev::has_address(name, s4.network()))?),
            || Ok(netdev::network_route6_via(self.network, name)? && self.ipv4.map_or(Ok(true), |(n4, _)| netdev::network_route_via(n4, name))?),
        )
    }

    /// flannel-wg-v6 made as at start, and every peer written again (one that fails is left
    /// to `retry`).
    pub fn restore(&mut self) -> Result<()> {
        remake(&self.dev)?;
        self.configure()?;
        self.dirty = true;
        self.retry()
    }

    fn peer_config(&self, r: &crate::reconcile::Route6) -> Result<wg::PeerConfig> {
        let peer = r.wireguard.with_context(|| format!("IPv6 route {} has no wireguard peer", r.subnet))?;
        Ok(wg::PeerConfig {
            public_key: peer.public_key,
            // One device for both families: the endpoint the Mode chose.
            endpoint: r.joint.map_or(std::net::SocketAddrV6::new(r.public_ip, peer.port, 0, 0).into(), |j| j.endpoint),
            allowed: r.subnet.into(),
            also_allowed: r.joint.and_then(|j| j.subnet4).map(Into::into),
            preshared_key: self.dev.psk,
            keepalive: self.dev.keepalive,
        })
    }

    /// The peer for the lease `key` (`None`: its peer goes). A peer whose key changed is
    /// written anew and the old one removed, unless another lease names that key (a node
    /// that took a new subnet while its old lease lives out its TTL): then that lease's peer
    /// is written again. What fails is recorded as wanted and left to `retry`.
    pub fn set(&mut self, key: crate::lease::LeaseKey, want: Option<crate::reconcile::Route6>) -> Result<()> {
        let old = match want {
            Some(r) => self.routes.insert(key, r),
            None => self.routes.remove(&key),
        };
        let r = self.write(old, want);
        if r.is_err() {
            self.dirty = true;
        }
        r
    }

    fn write(&self, old: Option<crate::reconcile::Route6>, want: Option<crate::reconcile::Route6>) -> Result<()> {
        if let Some(r) = &want {
            wg::set_peer(&self.dev.name, &self.peer_config(r)?)?;
        }
        let old_key = old.and_then(|o| o.wireguard).map(|p| p.public_key);
        let new_key = want.and_then(|w| w.wireguard).map(|p| p.public_key);
        if let Some(k) = old_key.filter(|k| Some(*k) != new_key) {
            match self.routes.values().find(|r| r.wireguard.map(|p| p.public_key) == Some(k)) {
                Some(other) => wg::set_peer(&self.dev.name, &self.peer_config(other)?)?,
                None => wg::remove_peer(&self.dev.name, &k)?,
            }
        }
        Ok(())
    }

    /// Make the peers exactly `desired`: every desired peer written, every other peer on the
    /// device (a departed node's, one a previous run left) removed. A peer that fails does
    /// not stop the others; `retry` writes it later.
    pub fn sync(&mut self, desired: &std::collections::BTreeMap<crate::lease::LeaseKey, crate::reconcile::Route6>) -> Result<()> {
        let mut first_error = None;
        for (k, r) in desired {
            if let Err(e) = self.set(*k, Some(*r)) {
                first_error.get_or_insert(e);
            }
        }
        let gone: Vec<_> = self.routes.keys().filter(|k| !desired.contains_key(k)).copied().collect();
        for k in gone {
            if let Err(e) = self.set(k, None) {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.remove_unwanted() {
            self.dirty = true;
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// After a failure: every peer the leases ask for written again, every other removed.
    pub fn retry(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.dirty) {
            return Ok(());
        }
        let mut first_error = None;
        for r in self.routes.values() {
            if let Err(e) = self.peer_config(r).and_then(|p| wg::set_peer(&self.dev.name, &p)) {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.remove_unwanted() {
            first_error.get_or_insert(e);
        }
        self.dirty = first_error.is_some();
        first_error.map_or(Ok(()), Err)
    }

    /// Peers on the device whose key no lease names.
    fn remove_unwanted(&self) -> Result<()> {
        let wanted: std::collections::BTreeSet<Key> = self.routes.values().filter_map(|r| r.wireguard.map(|p| p.public_key)).collect();
        for p in wg::device(&self.dev.name)?.peers {
            if !wanted.contains(&p.public_key) {
                tracing::info!(peer = %wg::format_key(&p.public_key), device = %self.dev.name, "removing a wireguard peer no lease asks for");
                wg::remove_peer(&self.dev.name, &p.public_key)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(key: u8, endpoint: Option<&str>, allowed: &[&str], psk: Option<wg::Secret>, keepalive: u16) -> wg::PeerInfo {
        wg::PeerInfo {
            public_key: [key; 32],
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: allowed
                .iter()
                .map(|a| {
                    let n: ipnet::IpNet = a.parse().unwrap();
                    (n.addr(), n.prefix_len())
                })
                .collect(),
            preshared_key: psk,
            keepalive,
            last_handshake_secs: 0,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    #[test]
    fn peers_are_routes_and_those_not_as_configured_are_written_again() {
        let psk = Some(wg::Secret([9u8; 32]));
        let peers = [
            peer(1, Some("192.168.0.2:51820"), &["10.0.2.0/24"], psk, 25),
            peer(2, Some("192.168.0.3:51999"), &["10.0.3.0/24"], None, 25),
            peer(3, Some("192.168.0.4:51820"), &["10.0.4.0/24"], psk, 0),
            peer(4, None, &["10.0.5.0/24"], psk, 25),
            peer(5, Some("192.168.0.6:51820"), &[], psk, 25),
            peer(6, Some("192.168.0.7:51820"), &["10.0.7.0/24", "10.0.8.0/24"], psk, 25),
            peer(7, Some("[fd00::7]:51820"), &["10.0.9.0/24"], psk, 25),
        ];
        let got: Vec<(String, String, Option<WireguardPeer>)> =
            peer_routes(&peers, psk, 25).into_iter().map(|r| (r.subnet.to_string(), r.public_ip.to_string(), r.wireguard)).collect();
        let wgp = |k: u8, port| Some(WireguardPeer { public_key: [k; 32], port });
        assert_eq!(
            got,
            vec![
                ("10.0.2.0/24".into(), "192.168.0.2".into(), wgp(1, 51820)),
                ("10.0.3.0/24".into(), "0.0.0.0".into(), wgp(2, 51999)),
                ("10.0.4.0/24".into(), "0.0.0.0".into(), wgp(3, 51820)),
                ("10.0.5.0/24".into(), "0.0.0.0".into(), wgp(4, 0)),
                ("10.0.9.0/24".into(), "0.0.0.0".into(), wgp(7, 0)),
            ],
            "as configured: as is; another PSK or keepalive, or no IPv4 endpoint: no peer address; no single subnet: not a route"
        );
    }

    #[test]
    fn the_marker_names_both_devices_of_a_dual_stack_node() {
        let dir = std::env::temp_dir().join(format!("ov-wg-marker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        set_marker(&dir, Some(("flannel-wg", "eth0", Some("flannel-wg-v6")))).unwrap();
        let r = recorded(&dir).unwrap();
        assert_eq!(r.devices().collect::<Vec<_>>(), ["flannel-wg", "flannel-wg-v6"]);
        assert_eq!(r.underlay, "eth0");
        set_marker(&dir, Some(("flannel-wg", "eth0", None))).unwrap();
        assert_eq!(recorded(&dir).unwrap().devices().collect::<Vec<_>>(), ["flannel-wg"]);
        // A marker written before IPv6 (no device6) reads as IPv4 only.
        assert_eq!(parse_marker("device=flannel-wg underlay=eth1\n").unwrap().device6, None);
        set_marker(&dir, None).unwrap();
        assert!(recorded(&dir).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mtu_is_flannels() {
        assert_eq!(mtu(None, 1500), 1420);
        assert_eq!(mtu(Some(9001), 1500), 8921);
    }
}
