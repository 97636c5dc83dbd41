//! Links, addresses and routes of the node: the overlay device and the route that sends the
//! overlay network to it.
//!
//! Design notes: this drives iproute2 (`ip -json`) rather than netlink directly. `ip` is
//! present wherever flannel runs, its JSON output is stable, and it reads the calling
//! process's network namespace (sysfs does not: under `nsenter --net` /sys still shows the
//! host's devices). Every call returns a typed error naming the command and what `ip` said.
//! Moving to rtnetlink is a contained change behind these functions.

use std::{net::Ipv4Addr, process::Command};

use ipnet::Ipv4Net;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("could not run `{cmd}`: {cause} (is iproute2 installed?)")]
    Spawn {
        cmd: String,
        cause: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("unexpected output from `{cmd}`: {cause}")]
    Parse {
        cmd: String,
        cause: serde_json::Error,
    },
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    #[error("interface {name:?} has no IPv4 address; pass --public-ip or give it one")]
    NoIpv4 { name: String },
    #[error("no default route to pick an interface from; pass --iface")]
    NoDefaultRoute,
    #[error("interface {name:?} has a malformed MAC address {mac:?}")]
    BadMac { name: String, mac: String },
}

type Result<T> = std::result::Result<T, NetdevError>;

/// Run an iproute2 tool (`ip`, `bridge`); its stdout, or a typed error naming the command.
fn run_tool(program: &str, args: &[&str]) -> Result<String> {
    let cmd = format!("{program} {}", args.join(" "));
    let out = Command::new(program).args(args).output().map_err(|cause| NetdevError::Spawn { cmd: cmd.clone(), cause })?;
    if !out.status.success() {
        return Err(NetdevError::Failed { cmd, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run_tool("ip", args)
}

fn ip_json<T: for<'de> Deserialize<'de>>(args: &[&str]) -> Result<T> {
    let out = ip(args)?;
    let out = if out.trim().is_empty() { "[]" } else { out.as_str() };
    serde_json::from_str(out).map_err(|cause| NetdevError::Parse { cmd: format!("ip {}", args.join(" ")), cause })
}

#[derive(Debug, Deserialize)]
struct JsonLink {
    ifindex: u32,
    ifname: String,
    mtu: u32,
    address: Option<String>,
    flags: Vec<String>,
    linkinfo: Option<JsonLinkInfo>,
}

#[derive(Debug, Deserialize)]
struct JsonLinkInfo {
    info_kind: Option<String>,
    info_data: Option<serde_json::Value>,
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
    info_data: Option<serde_json::Value>,
}

impl Link {
    /// A VXLAN device's `(id, port, local)`.
    pub fn vxlan_params(&self) -> Option<(u64, u64, Option<String>)> {
        let d = self.info_data.as_ref()?;
        Some((
            d.get("id")?.as_u64()?,
            d.get("port")?.as_u64()?,
            d.get("local").and_then(|l| l.as_str()).map(str::to_string),
        ))
    }
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
    let links: Vec<JsonLink> = match ip_json(&["-json", "-details", "link", "show", "dev", name]) {
        Ok(l) => l,
        Err(NetdevError::Failed { stderr, .. }) if stderr.contains("does not exist") => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let Some(l) = links.into_iter().next() else { return Ok(None) };
    // L3 devices (TUN) have no link-layer address: zero MAC.
    let mac = match l.address.as_deref() {
        None | Some("") => [0; 6],
        Some(a) => parse_mac(a).ok_or_else(|| NetdevError::BadMac { name: l.ifname.clone(), mac: a.to_string() })?,
    };
    let (kind, info_data) = match l.linkinfo {
        Some(i) => (i.info_kind, i.info_data),
        None => (None, None),
    };
    Ok(Some(Link {
        ifindex: l.ifindex,
        name: l.ifname,
        mtu: l.mtu,
        mac,
        kind,
        up: l.flags.iter().any(|f| f == "UP"),
        info_data,
    }))
}

pub fn require_link(name: &str) -> Result<Link> {
    link(name)?.ok_or_else(|| NetdevError::NoSuchInterface(name.to_string()))
}

#[derive(Debug, Deserialize)]
struct JsonAddrs {
    addr_info: Vec<JsonAddr>,
}
#[derive(Debug, Deserialize)]
struct JsonAddr {
    family: String,
    local: String,
    #[serde(default)]
    prefixlen: u8,
}

/// The first IPv4 address of `name`.
pub fn first_ipv4(name: &str) -> Result<Ipv4Addr> {
    let a: Vec<JsonAddrs> = ip_json(&["-json", "addr", "show", "dev", name])?;
    a.iter()
        .flat_map(|a| a.addr_info.iter())
        .filter(|a| a.family == "inet")
        .find_map(|a| a.local.parse().ok())
        .ok_or_else(|| NetdevError::NoIpv4 { name: name.to_string() })
}

#[derive(Debug, Deserialize)]
struct JsonRoute {
    dev: Option<String>,
}

/// The interface of the default route (flannel's choice when --iface is not given).
pub fn default_route_iface() -> Result<String> {
    let r: Vec<JsonRoute> = ip_json(&["-4", "-json", "route", "show", "default"])?;
    r.into_iter().find_map(|r| r.dev).ok_or(NetdevError::NoDefaultRoute)
}

/// Create (or keep, if it already matches) the kernel VXLAN device flannel's vxlan backend
/// uses: `flannel.<VNI>` with `nolearning`, bound to the underlay. Our TC program on its
/// egress does the encapsulation; the device itself gives the node UDP-tunnel GRO on port
/// `port`, and stock tools show what operators expect.
pub fn ensure_vxlan(
    name: &str,
    vni: u32,
    port: u16,
    local: Ipv4Addr,
    underlay: &str,
) -> Result<Link> {
    if let Some(l) = link(name)? {
        let matches = l.kind.as_deref() == Some("vxlan")
            && l.vxlan_params()
                .is_some_and(|(id, p, loc)| id == vni as u64 && p == port as u64 && loc == Some(local.to_string()));
        if matches {
            return Ok(l);
        }
        tracing::warn!(device = name, "existing device does not match the configuration; recreating it");
        delete_link(name)?;
    }
    ip(&[
        "link", "add", name, "type", "vxlan", "id", &vni.to_string(), "local",
        &local.to_string(), "dev", underlay, "dstport", &port.to_string(), "nolearning",
    ])?;
    require_link(name)
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
    ip(&["link", "add", name, "type", "veth", "peer", "name", peer])?;
    configure_up(peer, None)?;
    require_link(name)
}

/// Set the MTU (if given), turn ARP off (the egress program answers for every neighbour,
/// and an ARP request would only be dropped), give it no IPv6 link-local address (IPv4 only:
/// router solicitations and DAD would only be dropped and counted by the egress program) and
/// bring the link up.
pub fn configure_up(name: &str, mtu: Option<u32>) -> Result<()> {
    if !require_link(name)?.up {
        // addrgenmode can only change while the link is down.
        ip(&["link", "set", "dev", name, "addrgenmode", "none"])?;
    }
    let mut args = vec!["link", "set", "dev", name];
    let mtu_s;
    if let Some(m) = mtu {
        mtu_s = m.to_string();
        args.extend(["mtu", mtu_s.as_str()]);
    }
    args.extend(["arp", "off", "up"]);
    ip(&args).map(drop)
}

/// Give the overlay device exactly one address, the subnet's network address as a /32 (as
/// flannel does): the source the host uses to reach remote containers.
pub fn set_device_address(name: &str, addr: Ipv4Addr) -> Result<()> {
    // Already right (an agent restart): leave it, so host traffic never loses its source.
    let a: Vec<JsonAddrs> = ip_json(&["-json", "-4", "addr", "show", "dev", name])?;
    let have: Vec<(&str, u8)> = a.iter().flat_map(|a| a.addr_info.iter()).filter(|i| i.family == "inet").map(|i| (i.local.as_str(), i.prefixlen)).collect();
    if have == [(addr.to_string().as_str(), 32)] {
        return Ok(());
    }
    ip(&["-4", "addr", "flush", "dev", name])?;
    ip(&["addr", "add", &format!("{addr}/32"), "dev", name]).map(drop)
}

/// The next hop of the overlay route. Any address works on a NOARP device: routing the whole
/// network through one `onlink` next hop keeps one neighbour entry instead of one per remote
/// container (the kernel's gc_thresh3 is 1024).
pub const OVERLAY_NEXTHOP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Route the whole overlay network to the device (the node's own subnet stays on its bridge,
/// a longer prefix).
pub fn route_network(network: Ipv4Net, device: &str) -> Result<()> {
    ip(&[
        "route", "replace", &network.to_string(), "via", &OVERLAY_NEXTHOP.to_string(), "dev",
        device, "onlink",
    ])
    .map(drop)
}

#[derive(Debug, Deserialize)]
struct JsonFdb {
    mac: String,
    dst: Option<String>,
}

/// The VXLAN device's unicast forwarding entries with a destination, as (VtepMAC, peer
/// address): what the kernel device itself sends by. Our encap program sends nearly
/// everything; it leaves to the device only what it cannot encapsulate itself (a packet
/// already tunnelled by a container, a GSO aggregate past 64 KiB, a fragmentable packet
/// bigger than the path), for which the device needs these entries, as flannel writes them.
pub fn vxlan_fdb(dev: &str) -> Result<Vec<([u8; 6], Ipv4Addr)>> {
    let out = run_tool("bridge", &["-json", "fdb", "show", "dev", dev])?;
    let out = if out.trim().is_empty() { "[]" } else { out.as_str() };
    let entries: Vec<JsonFdb> = serde_json::from_str(out)
        .map_err(|cause| NetdevError::Parse { cmd: format!("bridge -json fdb show dev {dev}"), cause })?;
    Ok(entries
        .iter()
        .filter_map(|e| Some((parse_mac(&e.mac)?, e.dst.as_deref()?.parse().ok()?)))
        .filter(|(mac, _)| mac != &[0; 6])
        .collect())
}

/// Add (or keep) the entry sending frames for `mac` to `dst`, as flannel's vxlan backend does.
pub fn vxlan_fdb_replace(dev: &str, mac: [u8; 6], dst: Ipv4Addr) -> Result<()> {
    run_tool("bridge", &["fdb", "replace", &format_mac(&mac), "dev", dev, "dst", &dst.to_string(), "self", "permanent"]).map(drop)
}

pub fn vxlan_fdb_del(dev: &str, mac: [u8; 6], dst: Ipv4Addr) -> Result<()> {
    run_tool("bridge", &["fdb", "del", &format_mac(&mac), "dev", dev, "dst", &dst.to_string(), "self"]).map(drop)
}

pub fn delete_link(name: &str) -> Result<()> {
    ip(&["link", "del", "dev", name]).map(drop)
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
