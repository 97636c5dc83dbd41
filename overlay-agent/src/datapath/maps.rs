//! The only code that touches the eBPF maps: a typed API over the pinned maps of one node.
//!
//! Routes (`VTEP_BY_SUBNET`) and peers (`PEER_STATS`) are kept consistent here: a peer is a
//! member exactly while at least one route points at its underlay address, because decap
//! accepts frames only from members. With vxlan, the overlay device's forwarding entries
//! follow the routes too (the encap program leaves a few packets to the kernel device).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::Key, Array, LpmTrie, Map, MapData, MapError, PerCpuArray,
        PerCpuHashMap, PerCpuValues,
    },
    Ebpf,
};
use ipnet::{Ipv4Net, Ipv6Net};
use overlay_common::{
    map_names, Counter, Dataplane6Config, DataplaneConfig, EncapMode, Ipv4Prefix, Ipv6Prefix, Peer6Addr, PeerAddr, PeerStats,
    Vtep, Vtep6, MAP_LAYOUTS,
};

use crate::netdev;

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is not pinned at {path}: is the data plane up on this node? ({})", crate::error_chain(cause))]
    NotPinned {
        name: &'static str,
        path: PathBuf,
        cause: MapError,
    },
    #[error("map {0} is missing from the loaded programs")]
    Missing(&'static str),
    #[error("map {name}: {}", crate::error_chain(cause))]
    Map {
        name: &'static str,
        cause: MapError,
    },
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
    #[error("no route for {0}")]
    NoSuchRoute(Ipv4Net),
    #[error(
        "the maps pinned in {dir} were made by another version of overlay-agent ({detail}); \
         use the overlay-agent binary that runs on this node, or restart the agent with this one"
    )]
    OtherLayout { dir: PathBuf, detail: String },
    #[error("locking the pin directory: {0}")]
    Lock(std::io::Error),
    /// host-gw: a peer the underlay reaches only through a gateway.
    #[error("peer {peer} is not on {iface}'s link: host-gw routes each subnet via its node's address, so every node must share one link (use vxlan, with DirectRouting for the nodes that do)")]
    NotOnLink { peer: Ipv4Addr, iface: String },
    /// host-gw: a kernel route could not be read or written.
    #[error("{0}")]
    Host(String),
}

type Result<T> = std::result::Result<T, MapsError>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |cause| MapsError::Map { name, cause }
}

/// A route as operators and the control plane see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub subnet: Ipv4Net,
    /// The peer's underlay address (flannel's PublicIP).
    pub public_ip: Ipv4Addr,
    /// The peer's VTEP MAC (zero for the udp backend).
    pub vtep_mac: [u8; 6],
    /// A wireguard peer's public key and the port it listens on (wireguard backend only).
    pub wireguard: Option<WireguardPeer>,
}

/// A wireguard lease's peer, as a route needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireguardPeer {
    pub public_key: crate::wireguard::Key,
    pub port: u16,
}

/// Per-peer counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerTotals {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl PeerTotals {
    /// One peer's per-CPU counters, summed.
    fn sum<'a>(per_cpu: impl Iterator<Item = &'a PeerStats>) -> Self {
        per_cpu.fold(Self::default(), |t, v| Self {
            tx_packets: t.tx_packets + v.tx_packets,
            tx_bytes: t.tx_bytes + v.tx_bytes,
            rx_packets: t.rx_packets + v.rx_packets,
            rx_bytes: t.rx_bytes + v.rx_bytes,
        })
    }
}

pub struct Maps {
    routes: LpmTrie<MapData, Ipv4Prefix, Vtep>,
    peers: PerCpuHashMap<MapData, PeerAddr, PeerStats>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, DataplaneConfig>,
    config_slot: Array<MapData, u32>,
    layouts: Array<MapData, u32>,
    /// A dual-stack node's IPv6 routes and peers (membership, as for IPv4) and its IPv6 side.
    routes6: LpmTrie<MapData, Ipv6Prefix, Vtep6>,
    peers6: PerCpuHashMap<MapData, Peer6Addr, PeerStats>,
    config6: Array<MapData, Dataplane6Config>,
    /// The pin directory, locked (flock) around every change to routes and peers: the daemon
    /// and `route add/del` both read, decide and write, and must not interleave.
    dir: Option<std::fs::File>,
}

/// Holds the pin directory's exclusive lock while alive (the descriptor is `Maps::dir`'s,
/// which outlives it).
struct DirLock(Option<std::os::fd::RawFd>);

impl Drop for DirLock {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            unsafe { libc::flock(fd, libc::LOCK_UN) };
        }
    }
}

pub fn pin_path(dir: &Path, map: &str) -> PathBuf {
    dir.join(map)
}

fn typed<T>(name: &'static str, map: Map) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(map).map_err(map_err(name))
}

/// The maps whose recorded layout differs from this build's, as "NAME vX (this build: vY)".
pub fn stale_layouts(layouts: &Array<MapData, u32>) -> Vec<String> {
    map_names::ALL
        .iter()
        .zip(MAP_LAYOUTS)
        .enumerate()
        .filter_map(|(i, (name, want))| {
            let have = layouts.get(&(i as u32), 0).unwrap_or(0);
            (have != want).then(|| format!("{name} v{have} (this build: v{want})"))
        })
        .collect()
}

/// How long a configuration slot is left alone after it stopped being current: far longer
/// than any program run (microseconds), so that no program reads a slot being rewritten.
pub const CONFIG_REWRITE_GAP: std::time::Duration = std::time::Duration::from_millis(10);

/// When this process last flipped the configuration slot (the agent is its only writer).
static LAST_CONFIG_FLIP: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);

/// How long to wait before rewriting the slot that the flip at `last` retired.
fn rewrite_wait(last: Option<std::time::Instant>, now: std::time::Instant) -> std::time::Duration {
    last.map_or(std::time::Duration::ZERO, |t| CONFIG_REWRITE_GAP.saturating_sub(now.saturating_duration_since(t)))
}

impl Maps {
    /// Open the maps pinned under `dir` (no program needs to be loaded or running).
    pub fn open(dir: &Path) -> Result<Self> {
        let open = |name: &'static str| -> Result<Map> {
            let path = pin_path(dir, name);
            let data = MapData::from_pin(&path)
                .map_err(|cause| MapsError::NotPinned { name, path: path.clone(), cause })?;
            Map::from_map_data(data).map_err(map_err(name))
        };
        // Every map must be the layout this build reads: pins are shared by name across
        // versions, and another layout of the same size would be misread silently.
        let layouts: Array<MapData, u32> = match open(map_names::LAYOUTS) {
            Ok(m) => typed(map_names::LAYOUTS, m)?,
            Err(_) => {
                return Err(MapsError::OtherLayout {
                    dir: dir.to_path_buf(),
                    detail: "no LAYOUTS map: an older version".into(),
                })
            }
        };
        let stale = stale_layouts(&layouts);
        if !stale.is_empty() {
            return Err(MapsError::OtherLayout { dir: dir.to_path_buf(), detail: stale.join(", ") });
        }
        Ok(Self {
            routes: typed(map_names::VTEP_BY_SUBNET, open(map_names::VTEP_BY_SUBNET)?)?,
            peers: typed(map_names::PEER_STATS, open(map_names::PEER_STATS)?)?,
            counters: typed(map_names::COUNTERS, open(map_names::COUNTERS)?)?,
            config: typed(map_names::DP_CONFIG, open(map_names::DP_CONFIG)?)?,
            config_slot: typed(map_names::CONFIG_SLOT, open(map_names::CONFIG_SLOT)?)?,
            layouts,
            routes6: typed(map_names::VTEP6_BY_SUBNET, open(map_names::VTEP6_BY_SUBNET)?)?,
            peers6: typed(map_names::PEER6_STATS, open(map_names::PEER6_STATS)?)?,
            config6: typed(map_names::DP_CONFIG6, open(map_names::DP_CONFIG6)?)?,
            dir: std::fs::File::open(dir).ok(),
        })
    }

    /// Lock route and peer changes through the pin directory `dir` (see `Maps::dir`).
    pub fn lock_changes_in(mut self, dir: &Path) -> Self {
        self.dir = std::fs::File::open(dir).ok();
        self
    }

    fn write_lock(&self) -> Result<DirLock> {
        use std::os::fd::AsRawFd as _;
        if let Some(f) = &self.dir {
            loop {
                if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(MapsError::Lock(e));
                }
            }
        }
        Ok(DirLock(self.dir.as_ref().map(|f| f.as_raw_fd())))
    }

    /// Take the maps out of freshly loaded programs.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing(name));
        let mut maps = Self {
            routes: typed(map_names::VTEP_BY_SUBNET, take(map_names::VTEP_BY_SUBNET)?)?,
            peers: typed(map_names::PEER_STATS, take(map_names::PEER_STATS)?)?,
            counters: typed(map_names::COUNTERS, take(map_names::COUNTERS)?)?,
            config: typed(map_names::DP_CONFIG, take(map_names::DP_CONFIG)?)?,
            config_slot: typed(map_names::CONFIG_SLOT, take(map_names::CONFIG_SLOT)?)?,
            layouts: typed(map_names::LAYOUTS, take(map_names::LAYOUTS)?)?,
            routes6: typed(map_names::VTEP6_BY_SUBNET, take(map_names::VTEP6_BY_SUBNET)?)?,
            peers6: typed(map_names::PEER6_STATS, take(map_names::PEER6_STATS)?)?,
            config6: typed(map_names::DP_CONFIG6, take(map_names::DP_CONFIG6)?)?,
            dir: None,
        };
        // The loader made (or reused, when the versions already matched) every map with this
        // build's layouts: say so for the tools and the next agent.
        for (i, version) in MAP_LAYOUTS.iter().enumerate() {
            maps.layouts.set(i as u32, version, 0).map_err(map_err(map_names::LAYOUTS))?;
        }
        Ok(maps)
    }

    fn current_slot(&self) -> u32 {
        self.config_slot.get(&0, 0).unwrap_or(0) & 1
    }

    pub fn config(&self) -> Result<DataplaneConfig> {
        self.config.get(&self.current_slot(), 0).map_err(map_err(map_names::DP_CONFIG))
    }

    /// Write the configuration into the slot the programs are not reading, then make it the
    /// current one: a program sees the old configuration or the new one, never a mixture.
    pub fn set_config(&mut self, cfg: &DataplaneConfig) -> Result<()> {
        // The programs read the current slot in place, for as long as they run. The slot
        // written now was current until the last flip: a program that started before it may
        // still be reading, so it is left alone for a while after.
        let mut last = LAST_CONFIG_FLIP.lock().unwrap_or_else(|p| p.into_inner());
        let wait = rewrite_wait(*last, std::time::Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        let next = 1 - self.current_slot();
        self.config.set(next, cfg, 0).map_err(map_err(map_names::DP_CONFIG))?;
        self.config_slot.set(0, next, 0).map_err(map_err(map_names::CONFIG_SLOT))?;
        *last = Some(std::time::Instant::now());
        Ok(())
    }

    /// Add or replace the route for `route.subnet`, and make its peer a member.
    pub fn upsert_route(&mut self, route: &Route) -> Result<()> {
        let _lock = self.write_lock()?;
        let key = Key::new(route.subnet.prefix_len() as u32, route.subnet.network().octets());
        let old = self.routes.get(&key, 0).ok();
        let peer = route.public_ip.octets();
        if !self.peer_is_member(&peer)? {
            let zeros = vec![PeerStats::default(); nr_cpus()?];
            let values = PerCpuValues::try_from(zeros)
                .map_err(|e| MapsError::Cpus(format!("per-CPU values: {e}")))?;
            self.peers.insert(peer, values, 0).map_err(map_err(map_names::PEER_STATS))?;
        }
        let value = Vtep { underlay_ip: peer, vtep_mac: route.vtep_mac, _pad: [0; 2] };
        self.routes.insert(&key, value, 0).map_err(map_err(map_names::VTEP_BY_SUBNET))?;
        if let Some(old) = old {
            if old.underlay_ip != peer {
                self.forget_peer_if_unused(old.underlay_ip)?;
            }
            if (old.vtep_mac, old.underlay_ip) != (value.vtep_mac, value.underlay_ip) {
                self.forget_fdb_if_unused(old);
            }
        }
        if let Some(dev) = self.vxlan_device() {
            if let Err(e) = netdev::vxlan_fdb_replace(&dev, route.vtep_mac, route.public_ip) {
                tracing::warn!(error = %e, peer = %route.public_ip, "the overlay device's forwarding entry could not be written; \
                               the few packets the data plane leaves to the device will not reach this peer");
            }
        }
        Ok(())
    }

    /// The kernel VXLAN device the encap program hands packets to when it cannot encapsulate
    /// them itself (`None` for the udp backend, or before the configuration is written).
    fn vxlan_device(&self) -> Option<String> {
        let cfg = self.config().ok().filter(|c| c.is_ready())?;
        (cfg.encap_mode() == Some(EncapMode::Vxlan)).then(|| netdev::name_of(cfg.overlay_ifindex)).flatten()
    }

    fn forget_fdb_if_unused(&self, old: Vtep) {
        let Some(dev) = self.vxlan_device() else { return };
        let still_used = self.routes().is_ok_and(|rs| {
            rs.iter().any(|r| r.vtep_mac == old.vtep_mac && r.public_ip.octets() == old.underlay_ip)
        });
        if !still_used {
            if let Err(e) = netdev::vxlan_fdb_del(&dev, old.vtep_mac, Ipv4Addr::from(old.underlay_ip)) {
                tracing::debug!(error = %e, "removing a forwarding entry");
            }
        }
    }

    /// Make the overlay device's forwarding entries those of the routes (after a restart the
    /// device may be new, or entries of peers that left may remain).
    pub fn sync_fdb(&self) -> Result<()> {
        let Some(dev) = self.vxlan_device() else { return Ok(()) };
        let want: BTreeSet<([u8; 6], Ipv4Addr)> = self.routes()?.iter().map(|r| (r.vtep_mac, r.public_ip)).collect();
        let have: BTreeSet<([u8; 6], Ipv4Addr)> = match netdev::vxlan_fdb(&dev) {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the overlay device's forwarding entries");
                return Ok(());
            }
        };
        for (mac, ip) in have.difference(&want) {
            if let Err(e) = netdev::vxlan_fdb_del(&dev, *mac, *ip) {
                tracing::warn!(error = %e, "removing a stale forwarding entry");
            }
        }
        for (mac, ip) in want.difference(&have) {
            if let Err(e) = netdev::vxlan_fdb_replace(&dev, *mac, *ip) {
                tracing::warn!(error = %e, peer = %ip, "writing a forwarding entry");
            }
        }
        Ok(())
    }

    /// Remove the route for `subnet`; its peer stops being a member if no route is left.
    pub fn remove_route(&mut self, subnet: Ipv4Net) -> Result<()> {
        let _lock = self.write_lock()?;
        let key = Key::new(subnet.prefix_len() as u32, subnet.network().octets());
        let old = self.routes.get(&key, 0).map_err(|_| MapsError::NoSuchRoute(subnet))?;
        self.routes.remove(&key).map_err(map_err(map_names::VTEP_BY_SUBNET))?;
        self.forget_fdb_if_unused(old);
        self.forget_peer_if_unused(old.underlay_ip)
    }

    /// The peer the data plane would send `addr` to (one longest-prefix-match lookup, as the
    /// encapsulation program does).
    pub fn lookup(&self, addr: Ipv4Addr) -> Result<Option<Ipv4Addr>> {
        match self.routes.get(&Key::new(32, addr.octets()), 0) {
            Ok(v) => Ok(Some(Ipv4Addr::from(v.underlay_ip))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::VTEP_BY_SUBNET)(e)),
        }
    }

    fn peer_is_member(&self, peer: &PeerAddr) -> Result<bool> {
        match self.peers.get(peer, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(map_err(map_names::PEER_STATS)(e)),
        }
    }

    fn forget_peer_if_unused(&mut self, peer: PeerAddr) -> Result<()> {
        let still_used = self.routes()?.iter().any(|r| r.public_ip.octets() == peer);
        if !still_used {
            match self.peers.remove(&peer) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::PEER_STATS)(e)),
            }
        }
        Ok(())
    }

    /// This node's IPv6 side (dual stack): decap checks IPv6 tunnel frames from then on.
    pub fn set_config6(&mut self, cfg: &Dataplane6Config) -> Result<()> {
        self.config6.set(0, cfg, 0).map_err(map_err(map_names::DP_CONFIG6))
    }

    /// Add or replace a dual-stack peer's IPv6 route, and make its IPv6 address a member.
    pub fn upsert_route6(&mut self, subnet: Ipv6Net, public_ip: Ipv6Addr, vtep_mac: [u8; 6]) -> Result<()> {
        let _lock = self.write_lock()?;
        let key = Key::new(subnet.prefix_len() as u32, subnet.network().octets());
        let old = self.routes6.get(&key, 0).ok();
        let peer = public_ip.octets();
        match self.peers6.get(&peer, 0) {
            Ok(_) => {}
            Err(MapError::KeyNotFound) => {
                let values = PerCpuValues::try_from(vec![PeerStats::default(); nr_cpus()?])
                    .map_err(|e| MapsError::Cpus(format!("per-CPU values: {e}")))?;
                self.peers6.insert(peer, values, 0).map_err(map_err(map_names::PEER6_STATS))?;
            }
            Err(e) => return Err(map_err(map_names::PEER6_STATS)(e)),
        }
        let value = Vtep6 { underlay_ip: peer, vtep_mac, _pad: [0; 2] };
        self.routes6.insert(&key, value, 0).map_err(map_err(map_names::VTEP6_BY_SUBNET))?;
        if let Some(old) = old.filter(|o| o.underlay_ip != peer) {
            self.forget_peer6_if_unused(old.underlay_ip)?;
        }
        Ok(())
    }

    /// Remove a dual-stack peer's IPv6 route (none: nothing to do); its address stops being
    /// a member if no IPv6 route is left for it.
    pub fn remove_route6(&mut self, subnet: Ipv6Net) -> Result<()> {
        let _lock = self.write_lock()?;
        let key = Key::new(subnet.prefix_len() as u32, subnet.network().octets());
        let Ok(old) = self.routes6.get(&key, 0) else { return Ok(()) };
        self.routes6.remove(&key).map_err(map_err(map_names::VTEP6_BY_SUBNET))?;
        self.forget_peer6_if_unused(old.underlay_ip)
    }

    fn forget_peer6_if_unused(&mut self, peer: Peer6Addr) -> Result<()> {
        let mut used = false;
        for item in self.routes6.iter() {
            let (_, v) = item.map_err(map_err(map_names::VTEP6_BY_SUBNET))?;
            used |= v.underlay_ip == peer;
        }
        if !used {
            match self.peers6.remove(&peer) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::PEER6_STATS)(e)),
            }
        }
        Ok(())
    }

    /// Remove every IPv6 route and peer (IPv6 switched off).
    pub fn clear6(&mut self) -> Result<()> {
        for (subnet, _) in self.routes6()? {
            self.remove_route6(subnet)?;
        }
        Ok(())
    }

    /// The IPv6 routes, as (subnet, peer).
    pub fn routes6(&self) -> Result<Vec<(Ipv6Net, Ipv6Addr)>> {
        let mut out = Vec::new();
        for item in self.routes6.iter() {
            let (key, v) = item.map_err(map_err(map_names::VTEP6_BY_SUBNET))?;
            let subnet = Ipv6Net::new(Ipv6Addr::from(key.data()), key.prefix_len() as u8).expect("prefix <= 128");
            out.push((subnet, Ipv6Addr::from(v.underlay_ip)));
        }
        out.sort();
        Ok(out)
    }

    /// Per-peer counters of the IPv6 peers, summed over CPUs.
    pub fn peer6_totals(&self) -> Result<BTreeMap<Ipv6Addr, PeerTotals>> {
        totals(&self.peers6, map_names::PEER6_STATS)
    }

    /// All routes, sorted by subnet.
    pub fn routes(&self) -> Result<Vec<Route>> {
        let mut out = Vec::new();
        for item in self.routes.iter() {
            let (key, v) = item.map_err(map_err(map_names::VTEP_BY_SUBNET))?;
            let subnet = Ipv4Net::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)
                .expect("the kernel keeps prefix lengths <= 32 for 4-byte keys");
            out.push(Route {
                subnet,
                public_ip: Ipv4Addr::from(v.underlay_ip),
                vtep_mac: v.vtep_mac,
                wireguard: None,
            });
        }
        out.sort_by_key(|r| r.subnet);
        Ok(out)
    }

    /// Outcome counters summed over CPUs, in `Counter` order.
    pub fn counters(&self) -> Result<[u64; Counter::COUNT]> {
        let mut out = [0u64; Counter::COUNT];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self.counters.get(&(i as u32), 0).map_err(map_err(map_names::COUNTERS))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Per-peer counters summed over CPUs, by peer address.
    pub fn peer_totals(&self) -> Result<BTreeMap<Ipv4Addr, PeerTotals>> {
        totals(&self.peers, map_names::PEER_STATS)
    }
}

/// Each peer's per-CPU counters in `map`, summed, by address.
fn totals<K, A>(map: &PerCpuHashMap<MapData, K, PeerStats>, name: &'static str) -> Result<BTreeMap<A, PeerTotals>>
where
    K: aya::Pod,
    A: From<K> + Ord,
{
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (peer, values) = item.map_err(map_err(name))?;
        out.insert(A::from(peer), PeerTotals::sum(values.iter()));
    }
    Ok(out)
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| MapsError::Cpus(format!("{what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_retired_configuration_slot_is_left_alone_for_the_gap() {
        let t = Instant::now();
        assert_eq!(rewrite_wait(None, t), Duration::ZERO, "the first write waits for nothing");
        assert_eq!(rewrite_wait(Some(t), t), CONFIG_REWRITE_GAP);
        assert_eq!(rewrite_wait(Some(t), t + Duration::from_millis(4)), CONFIG_REWRITE_GAP - Duration::from_millis(4));
        assert_eq!(rewrite_wait(Some(t), t + CONFIG_REWRITE_GAP), Duration::ZERO);
        assert_eq!(rewrite_wait(Some(t + Duration::from_secs(1)), t), CONFIG_REWRITE_GAP, "a clock that seems to go back waits the whole gap");
    }
}
