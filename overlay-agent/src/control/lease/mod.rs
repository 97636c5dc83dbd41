//! Subnet leases: flannel's lease value and key formats (this module), etcd I/O
//! (`registry`), and the choice, reuse and renewal of this node's subnet (`manager`).

pub mod acquire;
pub mod keeper;
pub mod manager;
pub mod registry;

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseFormatError {
    #[error("subnet key {0:?} is not of the form <ip>-<prefix length>, e.g. 10.244.1.0-24")]
    BadKey(String),
    #[error("lease value is not flannel's lease JSON: {0}")]
    BadValue(String),
    #[error("vxlan lease without BackendData.VtepMAC (or with a malformed one)")]
    NoVtepMac,
    /// A wireguard lease whose BackendData has no usable PublicKey (or is not wireguard's).
    #[error("wireguard lease refused: {0}")]
    BadWireguardData(String),
    /// A dual-stack peer's IPv6 subnet outside the network's IPv6 range, or ours.
    #[error("IPv6 subnet {0} is not one of the network's (outside IPv6Network's range, the wrong length, or this node's own)")]
    Ipv6SubnetRefused(String),
    /// Not an error of the lease: an IPv6-only node's, which an IPv4 or dual-stack network
    /// has no route for.
    #[error("IPv6-only lease {0:?} (no IPv4 subnet) in a network with IPv4")]
    Ipv6Only(String),
}

/// The last path element of a lease key: `10.244.1.0-24`.
pub fn subnet_key(subnet: &Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// What names a lease in etcd: its IPv4 subnet and, for a dual-stack node, its IPv6 subnet
/// (flannel's MakeSubnetKey: `10.244.1.0-24&fd00:0:0:1::-64`). An IPv6-only node's key has
/// no IPv4 subnet: flannel writes `0.0.0.0-0&fd00:0:0:1::-64`, and `v4` is then `0.0.0.0/0`,
/// as in flannel's own Lease (`is_ipv6_only`; such a key never names an IPv4 route).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseKey {
    pub v4: Ipv4Net,
    pub v6: Option<Ipv6Net>,
}

/// The IPv4 part of an IPv6-only node's key (flannel's zero IP4Net).
pub const NO_IPV4: Ipv4Net = match Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0) {
    Ok(n) => n,
    Err(_) => panic!("0.0.0.0/0"),
};

impl LeaseKey {
    /// An IPv6-only node's key.
    pub fn ipv6_only(v6: Ipv6Net) -> Self {
        LeaseKey { v4: NO_IPV4, v6: Some(v6) }
    }

    /// Whether the key names only an IPv6 subnet (an IPv6-only network's lease).
    pub fn is_ipv6_only(&self) -> bool {
        self.v4 == NO_IPV4
    }

    /// The subnet that identifies the node in its network: the IPv4 one, or the IPv6 one of
    /// an IPv6-only lease.
    pub fn primary(&self) -> ipnet::IpNet {
        match self.v6 {
            Some(v6) if self.is_ipv6_only() => v6.into(),
            _ => self.v4.into(),
        }
    }

    /// The last path element of the lease's key.
    pub fn name(&self) -> String {
        match self.v6 {
            None => subnet_key(&self.v4),
            Some(v6) => format!("{}&{}-{}", subnet_key(&self.v4), v6.network(), v6.prefix_len()),
        }
    }
}

/// For the log: `10.244.1.0/24`, `10.244.1.0/24+fd00:0:0:1::/64`, or an IPv6-only node's
/// `fd00:0:0:1::/64`.
impl std::fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.v6 {
            Some(v6) if self.is_ipv6_only() => write!(f, "{v6}"),
            Some(v6) => write!(f, "{}+{v6}", self.v4),
            None => write!(f, "{}", self.v4),
        }
    }
}

impl From<&Ipv4Net> for LeaseKey {
    fn from(v4: &Ipv4Net) -> Self {
        LeaseKey { v4: *v4, v6: None }
    }
}

impl From<(Ipv4Net, Option<Ipv6Net>)> for LeaseKey {
    fn from((v4, v6): (Ipv4Net, Option<Ipv6Net>)) -> Self {
        LeaseKey { v4, v6 }
    }
}

/// The IPv4 subnet a key names (IPv6-only keys are `Ipv6Only`).
pub fn parse_subnet_key(key: &str) -> Result<Ipv4Net, LeaseFormatError> {
    let k = parse_lease_key(key)?;
    if k.is_ipv6_only() {
        return Err(LeaseFormatError::Ipv6Only(key.to_string()));
    }
    Ok(k.v4)
}

/// Both subnets a key names.
pub fn parse_lease_key(key: &str) -> Result<LeaseKey, LeaseFormatError> {
    let bad = || LeaseFormatError::BadKey(key.to_string());
    // A dual-stack node's key: "<IPv4 key>&<IPv6 network>-<length>" (flannel's
    // MakeSubnetKey). The IPv4 part is what this agent routes; the IPv6 part is checked, so
    // that a garbled key is refused whole.
    let (v4, v6) = match key.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (key, None),
    };
    let v6 = match v6 {
        Some(v6) => {
            let (ip, len) = address_and_length::<Ipv6Addr>(v6).ok_or_else(bad)?;
            let net = Ipv6Net::new(ip, len).map_err(|_| bad())?;
            if net.network() != ip || len == 0 {
                return Err(bad());
            }
            Some(net)
        }
        None => None,
    };
    let (ip, len) = address_and_length::<Ipv4Addr>(v4).ok_or_else(bad)?;
    let net = Ipv4Net::new(ip, len).map_err(|_| bad())?;
    if net.network() != ip {
        return Err(bad());
    }
    // An IPv6-only node writes 0.0.0.0-0 for the IPv4 part: it has no IPv4 subnet.
    if len == 0 && ip.is_unspecified() && v6.is_some() {
        return Ok(LeaseKey { v4: NO_IPV4, v6 });
    }
    if len == 0 {
        return Err(bad());
    }
    Ok(LeaseKey { v4: net, v6 })
}

/// `<address>-<prefix length>`, as a key part writes a network.
fn address_and_length<A: std::str::FromStr>(part: &str) -> Option<(A, u8)> {
    let (ip, len) = part.rsplit_once('-')?;
    Some((ip.parse().ok()?, len.parse().ok()?))
}

/// The etcd key range (start, end) that holds dual-stack leases of `subnet`
/// ("<subnet key>&..."): a claim of `subnet` must find it empty as well as its own key.
pub fn dual_stack_range(prefix: &str, subnet: &Ipv4Net) -> (String, String) {
    let base = format!("{prefix}{}", subnet_key(subnet));
    // '&' + 1 = '\''
    (format!("{base}&"), format!("{base}'"))
}

/// flannel's lease value, field for field (`etcdctl get` shows the same JSON for our leases
/// as for a stock node's). Unknown fields are ignored, as flannel does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(rename = "BackendType", default, skip_serializing_if = "String::is_empty")]
    pub backend_type: String,
    #[serde(rename = "BackendData", default, skip_serializing_if = "Option::is_none")]
    pub backend_data: Option<serde_json::Value>,
    /// The IPv6 device's data of a dual-stack vxlan node (VNI and the VtepMAC of
    /// `flannel-v6.<VNI>`).
    #[serde(rename = "BackendV6Data", default, skip_serializing_if = "Option::is_none")]
    pub backend_v6_data: Option<serde_json::Value>,
}

/// `BackendData` of flannel's vxlan backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct VxlanData {
    #[serde(rename = "VNI")]
    vni: u32,
    #[serde(rename = "VtepMAC")]
    vtep_mac: String,
}

impl LeaseAttrs {
    /// What our vxlan backend writes.
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, vtep_mac: [u8; 6]) -> Self {
        let data = VxlanData { vni, vtep_mac: crate::netdev::format_mac(&vtep_mac) };
        Self {
            public_ip,
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::to_value(data).expect("plain struct")),
            backend_v6_data: None,
        }
    }

    /// A dual-stack vxlan node's lease: also its IPv6 address and `flannel-v6.<VNI>`'s MAC.
    pub fn with_ipv6(mut self, public_ipv6: Ipv6Addr, vni: u32, vtep_mac: [u8; 6]) -> Self {
        let data = VxlanData { vni, vtep_mac: crate::netdev::format_mac(&vtep_mac) };
        self.public_ipv6 = Some(public_ipv6);
        self.backend_v6_data = Some(serde_json::to_value(data).expect("plain struct"));
        self
    }

    /// The VtepMAC of a dual-stack vxlan lease's IPv6 device.
    pub fn vtep_mac_v6(&self) -> Result<[u8; 6], LeaseFormatError> {
        vtep_mac_of(&self.backend_v6_data)
    }

    /// An IPv6-only vxlan node's lease, as flannel writes it: `PublicIP` 0.0.0.0 and no
    /// `BackendData`; its IPv6 address and `flannel-v6.<VNI>`'s MAC.
    pub fn vxlan_ipv6_only(public_ipv6: Ipv6Addr, vni: u32, vtep_mac: [u8; 6]) -> Self {
        Self {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: None,
            backend_v6_data: None,
        }
        .with_ipv6(public_ipv6, vni, vtep_mac)
    }

    /// Whether a lease with attributes `other` is the node's these attributes describe (ours):
    /// same public IPv4 address; an IPv6-only node (PublicIP 0.0.0.0, as every IPv6-only lease
    /// says) by its public IPv6 address, which also finds its dual-stack lease from before the
    /// network became IPv6-only; and a dual-stack node finds its IPv6-only lease from before
    /// IPv4 was switched on by its public IPv6 address.
    pub fn same_node(&self, other: &LeaseAttrs) -> bool {
        let by_v6 = self.public_ipv6.is_some() && self.public_ipv6 == other.public_ipv6;
        if self.public_ip.is_unspecified() {
            return by_v6;
        }
        self.public_ip == other.public_ip || (other.public_ip.is_unspecified() && by_v6)
    }

    /// flannel's host-gw lease: the address peers route this node's subnet via.
    pub fn host_gw(public_ip: Ipv4Addr) -> Self {
        Self { public_ip, public_ipv6: None, backend_type: "host-gw".into(), backend_data: None, backend_v6_data: None }
    }

    /// flannel's ipip lease: the address peers route this node's subnet via, through their
    /// flannel.ipip devices.
    pub fn ipip(public_ip: Ipv4Addr) -> Self {
        Self { public_ip, public_ipv6: None, backend_type: "ipip".into(), backend_data: None, backend_v6_data: None }
    }

    /// flannel's wireguard lease: the public key and listen port of its flannel-wg in
    /// `BackendData` (`{"PublicKey":"<base64>","Port":51820}`).
    pub fn wireguard(public_ip: Ipv4Addr, public_key: &crate::wireguard::Key, port: u16) -> Self {
        let data = WireguardData { public_key: crate::wireguard::format_key(public_key), port: Some(port) };
        Self {
            public_ip,
            public_ipv6: None,
            backend_type: "wireguard".into(),
            backend_data: Some(serde_json::to_value(data).expect("plain struct")),
            backend_v6_data: None,
        }
    }

    /// An IPv6-only wireguard node's, as flannel writes it: PublicIP 0.0.0.0, no
    /// `BackendData`, the IPv6 side's `BackendV6Data`.
    pub fn wireguard_ipv6_only(public_ipv6: Ipv6Addr, public_key: &crate::wireguard::Key, port_v6: u16) -> Self {
        Self { public_ip: Ipv4Addr::UNSPECIFIED, public_ipv6: None, backend_type: "wireguard".into(), backend_data: None, backend_v6_data: None }
            .with_wireguard_v6(public_ipv6, public_key, port_v6)
    }

    /// A dual-stack wireguard node's IPv6 side, as flannel writes it (newSubnetAttrs):
    /// `PublicIPv6` and `BackendV6Data` with the same public key (both devices share the
    /// private key) and `ListenPortV6`.
    pub fn with_wireguard_v6(mut self, public_ipv6: Ipv6Addr, public_key: &crate::wireguard::Key, port_v6: u16) -> Self {
        let data = WireguardData { public_key: crate::wireguard::format_key(public_key), port: Some(port_v6) };
        self.public_ipv6 = Some(public_ipv6);
        self.backend_v6_data = Some(serde_json::to_value(data).expect("plain struct"));
        self
    }

    /// A wireguard lease's peer: its public key, and its port (`None`: a flannel before the
    /// port was announced, whose peers use their own listen port). Another backend's lease,
    /// or a key that is no wireguard key, is refused with what is wrong.
    pub fn wireguard_peer(&self) -> Result<(crate::wireguard::Key, Option<u16>), LeaseFormatError> {
        self.wireguard_data(&self.backend_data, "BackendData")
    }

    /// The same for a dual-stack or IPv6-only lease's IPv6 side (`BackendV6Data`), the peer
    /// on flannel-wg-v6.
    pub fn wireguard_peer_v6(&self) -> Result<(crate::wireguard::Key, Option<u16>), LeaseFormatError> {
        self.wireguard_data(&self.backend_v6_data, "BackendV6Data")
    }

    fn wireguard_data(&self, data: &Option<serde_json::Value>, field: &str) -> Result<(crate::wireguard::Key, Option<u16>), LeaseFormatError> {
        let bad = |m: String| LeaseFormatError::BadWireguardData(m);
        if self.backend_type != "wireguard" {
            return Err(bad(format!("its BackendType is {:?}, not \"wireguard\" (a node of another backend)", self.backend_type)));
        }
        let data: WireguardData = data
            .clone()
            .ok_or_else(|| bad(format!("no {field}")))
            .and_then(|d| serde_json::from_value(d).map_err(|e| bad(format!("{field} is not wireguard's: {e}"))))?;
        let key = crate::wireguard::parse_key(&data.public_key).map_err(|e| bad(format!("{field}.PublicKey {:?}: {e}", data.public_key)))?;
        Ok((key, data.port.filter(|p| *p != 0)))
    }

    /// What flannel's udp backend writes: the public IP only.
    pub fn udp(public_ip: Ipv4Addr) -> Self {
        Self { public_ip, public_ipv6: None, backend_type: String::new(), backend_data: None, backend_v6_data: None }
    }

    pub fn parse(json: &[u8]) -> Result<Self, LeaseFormatError> {
        serde_json::from_slice(json).map_err(|e| LeaseFormatError::BadValue(e.to_string()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease attrs serialise")
    }

    /// The VtepMAC of a vxlan lease.
    pub fn vtep_mac(&self) -> Result<[u8; 6], LeaseFormatError> {
        vtep_mac_of(&self.backend_data)
    }
}

/// The VtepMAC in a vxlan backend's data (`BackendData` or `BackendV6Data`).
fn vtep_mac_of(data: &Option<serde_json::Value>) -> Result<[u8; 6], LeaseFormatError> {
    let data: VxlanData = data.clone().and_then(|d| serde_json::from_value(d).ok()).ok_or(LeaseFormatError::NoVtepMac)?;
    crate::netdev::parse_mac(&data.vtep_mac).ok_or(LeaseFormatError::NoVtepMac)
}

/// `BackendData` of flannel's wireguard backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct WireguardData {
    #[serde(rename = "PublicKey")]
    public_key: String,
    #[serde(rename = "Port", default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

/// A lease as read from etcd (`subnet` is `NO_IPV4` in an IPv6-only node's).
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    /// A dual-stack node's IPv6 subnet (the key's part after '&').
    pub subnet6: Option<Ipv6Net>,
    pub attrs: LeaseAttrs,
    /// The etcd lease the key is attached to (0: none).
    pub etcd_lease: i64,
}

impl Lease {
    pub fn key(&self) -> LeaseKey {
        LeaseKey { v4: self.subnet, v6: self.subnet6 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by a stock flannel v0.2x vxlan node (flannel's README / CONTRACTS.md).
    const STOCK_VXLAN: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
    /// Written by flannel v0.11's udp backend (the seed's era): no backend fields.
    const STOCK_UDP: &str = r#"{"PublicIP":"192.168.1.252"}"#;

    #[test]
    fn reads_stock_flannel_leases() {
        let v = LeaseAttrs::parse(STOCK_VXLAN.as_bytes()).unwrap();
        assert_eq!(v.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(v.backend_type, "vxlan");
        assert_eq!(v.vtep_mac().unwrap(), [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44]);
        let u = LeaseAttrs::parse(STOCK_UDP.as_bytes()).unwrap();
        assert_eq!(u.public_ip, Ipv4Addr::new(192, 168, 1, 252));
        assert_eq!(u.vtep_mac(), Err(LeaseFormatError::NoVtepMac));
    }

    #[test]
    fn writes_what_stock_flannel_writes() {
        let v = LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 64, 3), 1, [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44]);
        assert_eq!(v.to_json(), STOCK_VXLAN);
        assert_eq!(LeaseAttrs::udp(Ipv4Addr::new(10, 0, 0, 1)).to_json(), r#"{"PublicIP":"10.0.0.1","PublicIPv6":null}"#);
    }

    /// Written by a stock flannel wireguard node (pkg/backend/wireguard: newSubnetAttrs).
    const STOCK_WIREGUARD: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"2EyOaJZNYnmtE/TgvDqQovpJBt+hivRrVQO0ssN3e3I=","Port":51820}}"#;

    #[test]
    fn wireguard_leases_are_flannels_and_bad_ones_say_why() {
        let key = crate::wireguard::parse_key("2EyOaJZNYnmtE/TgvDqQovpJBt+hivRrVQO0ssN3e3I=").unwrap();
        let w = LeaseAttrs::parse(STOCK_WIREGUARD.as_bytes()).unwrap();
        assert_eq!(w.wireguard_peer(), Ok((key, Some(51820))));
        assert_eq!(LeaseAttrs::wireguard(Ipv4Addr::new(192, 168, 64, 3), &key, 51820).to_json(), STOCK_WIREGUARD);
        // An older flannel announced no port: its peers use their own.
        let old = LeaseAttrs::parse(br#"{"PublicIP":"1.2.3.4","BackendType":"wireguard","BackendData":{"PublicKey":"2EyOaJZNYnmtE/TgvDqQovpJBt+hivRrVQO0ssN3e3I="}}"#).unwrap();
        assert_eq!(old.wireguard_peer(), Ok((key, None)));
        for (bad, says) in [
            (r#"{"PublicIP":"1.2.3.4","BackendType":"wireguard","BackendData":{"PublicKey":"short"}}"#, "BackendData.PublicKey"),
            (r#"{"PublicIP":"1.2.3.4","BackendType":"wireguard","BackendData":{"PublicKey":"c2hvcnQ="}}"#, "32 bytes"),
            (r#"{"PublicIP":"1.2.3.4","BackendType":"wireguard"}"#, "no BackendData"),
            (r#"{"PublicIP":"1.2.3.4","BackendType":"wireguard","BackendData":{"VNI":1}}"#, "not wireguard's"),
            (STOCK_VXLAN, "not \"wireguard\""),
        ] {
            let e = LeaseAttrs::parse(bad.as_bytes()).unwrap().wireguard_peer().unwrap_err().to_string();
            assert!(e.starts_with("wireguard lease refused") && e.contains(says), "{bad}: {e}");
        }
    }

    /// Written by a stock flannel wireguard node in a dual-stack network (Mode separate):
    /// both sides announce the one public key, each its own port.
    const STOCK_WIREGUARD_DUAL: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":"fd00:64::3","BackendType":"wireguard","BackendData":{"PublicKey":"2EyOaJZNYnmtE/TgvDqQovpJBt+hivRrVQO0ssN3e3I=","Port":51820},"BackendV6Data":{"PublicKey":"2EyOaJZNYnmtE/TgvDqQovpJBt+hivRrVQO0ssN3e3I=","Port":51821}}"#;

    #[test]
    fn dual_stack_wireguard_leases_are_flannels() {
        let key = crate::wireguard::parse_key("2EyOaJZNYnmtE/TgvDqQovpJBt+hivRrVQO0ssN3e3I=").unwrap();
        let w = LeaseAttrs::parse(STOCK_WIREGUARD_DUAL.as_bytes()).unwrap();
        assert_eq!(w.wireguard_peer(), Ok((key, Some(51820))));
        assert_eq!(w.wireguard_peer_v6(), Ok((key, Some(51821))));
        let ours = LeaseAttrs::wireguard(Ipv4Addr::new(192, 168, 64, 3), &key, 51820).with_wireguard_v6("fd00:64::3".parse().unwrap(), &key, 51821);
        assert_eq!(ours.to_json(), STOCK_WIREGUARD_DUAL);
        // An IPv6-only node's (EnableIPv4 false): PublicIP 0.0.0.0, no BackendData.
        let stock_v6_only = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:64::3","BackendType":"wireguard","BackendV6Data":{"PublicKey":"2EyOaJZNYnmtE/TgvDqQovpJBt+hivRrVQO0ssN3e3I=","Port":51821}}"#;
        assert_eq!(LeaseAttrs::wireguard_ipv6_only("fd00:64::3".parse().unwrap(), &key, 51821).to_json(), stock_v6_only);
        let w = LeaseAttrs::parse(stock_v6_only.as_bytes()).unwrap();
        assert_eq!(w.wireguard_peer_v6(), Ok((key, Some(51821))));
        assert!(w.wireguard_peer().is_err(), "no IPv4 side");
        // An IPv4-only wireguard lease has no IPv6 peer; a bad IPv6 side says which field.
        let e = LeaseAttrs::parse(STOCK_WIREGUARD.as_bytes()).unwrap().wireguard_peer_v6().unwrap_err().to_string();
        assert!(e.contains("no BackendV6Data"), "{e}");
        let bad = STOCK_WIREGUARD_DUAL.replace(r#""Port":51821"#, r#""Port":"x""#);
        let e = LeaseAttrs::parse(bad.as_bytes()).unwrap().wireguard_peer_v6().unwrap_err().to_string();
        assert!(e.contains("BackendV6Data is not wireguard's"), "{e}");
    }

    #[test]
    fn malformed_values_are_errors_not_panics() {
        for bad in ["", "{", "null", "[]", r#"{"PublicIP":"nope"}"#, r#"{"PublicIP":"fd00::1"}"#, r#"{"BackendType":"vxlan"}"#] {
            assert!(LeaseAttrs::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let no_mac = LeaseAttrs::parse(br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1}}"#).unwrap();
        assert_eq!(no_mac.vtep_mac(), Err(LeaseFormatError::NoVtepMac));
    }

    #[test]
    fn subnet_keys_round_trip_and_reject_garbage() {
        let n: Ipv4Net = "172.17.98.0/24".parse().unwrap();
        assert_eq!(subnet_key(&n), "172.17.98.0-24");
        assert_eq!(parse_subnet_key("172.17.98.0-24").unwrap(), n);
        for bad in ["172.17.98.0/24", "172.17.98.0-33", "172.17.98.1-24", "x-24", "172.17.98.0-", "-24", "", "0.0.0.0-0"] {
            assert!(parse_subnet_key(bad).is_err(), "{bad:?}");
        }
    }

    /// A dual-stack lease as flannel v0.2x writes it (vxlan with flannel-v6.1).
    const STOCK_DUAL: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":"fd00:64::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},"BackendV6Data":{"VNI":1,"VtepMAC":"ae:21:32:6f:8f:45"}}"#;

    #[test]
    fn dual_stack_leases_round_trip() {
        let v = LeaseAttrs::parse(STOCK_DUAL.as_bytes()).unwrap();
        assert_eq!(v.public_ipv6, Some("fd00:64::3".parse().unwrap()));
        assert_eq!(v.vtep_mac_v6().unwrap(), [0xae, 0x21, 0x32, 0x6f, 0x8f, 0x45]);
        let ours = LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 64, 3), 1, [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44])
            .with_ipv6("fd00:64::3".parse().unwrap(), 1, [0xae, 0x21, 0x32, 0x6f, 0x8f, 0x45]);
        assert_eq!(ours.to_json(), STOCK_DUAL);
        assert_eq!(LeaseAttrs::parse(STOCK_VXLAN.as_bytes()).unwrap().vtep_mac_v6(), Err(LeaseFormatError::NoVtepMac));
        assert!(LeaseAttrs::parse(br#"{"PublicIP":"1.2.3.4","PublicIPv6":"1.2.3.4"}"#).is_err());
        let key = LeaseKey { v4: "10.244.1.0/24".parse().unwrap(), v6: Some("fd00:0:0:1::/64".parse().unwrap()) };
        assert_eq!(key.name(), "10.244.1.0-24&fd00:0:0:1::-64");
        assert_eq!(parse_lease_key(&key.name()).unwrap(), key);
        assert_eq!(parse_lease_key("10.244.1.0-24").unwrap().v6, None);
    }

    /// An IPv6-only lease as flannel v0.2x writes it (vxlan, flannel-v6.1 only): PublicIP
    /// 0.0.0.0 and no BackendData.
    const STOCK_V6_ONLY: &str = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:64::3","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"ae:21:32:6f:8f:45"}}"#;

    #[test]
    fn ipv6_only_leases_round_trip() {
        let v = LeaseAttrs::parse(STOCK_V6_ONLY.as_bytes()).unwrap();
        assert_eq!(v, LeaseAttrs::vxlan_ipv6_only("fd00:64::3".parse().unwrap(), 1, [0xae, 0x21, 0x32, 0x6f, 0x8f, 0x45]));
        assert_eq!(v.to_json(), STOCK_V6_ONLY);
        assert_eq!(v.vtep_mac(), Err(LeaseFormatError::NoVtepMac));
        let key = parse_lease_key("0.0.0.0-0&fd00:10:244:7::-64").unwrap();
        assert!(key.is_ipv6_only());
        assert_eq!(key, LeaseKey::ipv6_only("fd00:10:244:7::/64".parse().unwrap()));
        assert_eq!(key.name(), "0.0.0.0-0&fd00:10:244:7::-64");
        assert_eq!(key.to_string(), "fd00:10:244:7::/64");
        assert_eq!(key.primary().to_string(), "fd00:10:244:7::/64");
        // Only 0.0.0.0-0 stands for "no IPv4 subnet", and only beside an IPv6 one.
        for bad in ["0.0.0.0-0", "10.0.0.0-0&fd00::-64", "0.0.0.0-0&"] {
            assert!(matches!(parse_lease_key(bad), Err(LeaseFormatError::BadKey(_))), "{bad:?}");
        }
        // Which node a lease is: by PublicIP, and for IPv6-only leases (all 0.0.0.0) by PublicIPv6.
        let other = LeaseAttrs::vxlan_ipv6_only("fd00:64::4".parse().unwrap(), 1, [1; 6]);
        assert!(v.same_node(&v.clone()) && !v.same_node(&other));
        let a = LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 1), 1, [1; 6]);
        assert!(a.same_node(&a.clone().with_ipv6("fd00::1".parse().unwrap(), 1, [2; 6])), "IPv4 nodes: by PublicIP");
        assert!(!a.same_node(&v) && !v.same_node(&a), "an IPv4 node and an IPv6-only one");
        // Switching between dual stack and IPv6-only: the node's lease of the other kind is its own.
        let dual = LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 3), 1, [1; 6]).with_ipv6("fd00:64::3".parse().unwrap(), 1, [2; 6]);
        assert!(v.same_node(&dual) && dual.same_node(&v));
        assert!(!LeaseAttrs::vxlan(Ipv4Addr::new(192, 168, 0, 3), 1, [1; 6]).same_node(&v), "an IPv4-only node has no IPv6 address to match");
    }

    /// Keys as flannel's MakeSubnetKey writes them for dual-stack and IPv6-only nodes.
    #[test]
    fn dual_stack_keys_give_their_ipv4_subnet() {
        let n: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        assert_eq!(parse_subnet_key("10.244.1.0-24&fd00::-64").unwrap(), n);
        assert_eq!(parse_subnet_key("10.244.1.0-24&fd00:10:244:1::-64").unwrap(), n);
        assert!(matches!(parse_subnet_key("0.0.0.0-0&fd00::-64"), Err(LeaseFormatError::Ipv6Only(_))));
        for bad in ["10.244.1.0-24&", "10.244.1.0-24&fd00::", "10.244.1.0-24&fd00::1-64", "10.244.1.0-24&zz::-64", "10.244.1.0-24&fd00::-129", "10.244.1.0-24&10.0.0.0-8"] {
            assert!(matches!(parse_subnet_key(bad), Err(LeaseFormatError::BadKey(_))), "{bad:?}");
        }
        let (start, end) = dual_stack_range("/p/subnets/", &n);
        assert_eq!((start.as_str(), end.as_str()), ("/p/subnets/10.244.1.0-24&", "/p/subnets/10.244.1.0-24'"));
        assert!(start.as_str() < "/p/subnets/10.244.1.0-24&fd00::-64" && "/p/subnets/10.244.1.0-24&fd00::-64" < end.as_str());
    }
}
