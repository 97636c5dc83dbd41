//! flannel's network configuration (`<prefix>/config`): parsing, defaults and validation.
//!
//! Design notes: flannel decodes this JSON with Go's encoding/json, which matches keys
//! case-insensitively, so `{"network": ...}` works there and must work here. Fields flannel
//! defines that this agent does not implement (other backends' options) are accepted with a
//! warning; unknown fields too (flannel ignores them silently). What would make
//! the network wrong (bad CIDRs, inconsistent subnet ranges, an unsupported backend) is refused
//! with a message naming the field.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use overlay_common::{EncapMode, DEFAULT_UDP_PORT, DEFAULT_VNI, DEFAULT_VXLAN_PORT};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {0} (did you write it with the etcd v3 API? `etcdctl put <prefix>/config '{{\"Network\":...}}'`)")]
    Json(String),
    #[error("network config must be a JSON object")]
    NotAnObject,
    #[error("network config: {field} is required")]
    Missing { field: &'static str },
    #[error("network config: {field}: {message}")]
    Invalid { field: &'static str, message: String },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

/// The backend and its options, as this agent runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub mode: EncapMode,
    pub vni: u32,
    pub port: u16,
    /// `Backend.MTU` (vxlan), if set: as flannel reads it, the underlay's MTU; the overlay
    /// device and FLANNEL_MTU get this less the encapsulation.
    pub mtu: Option<u32>,
    /// vxlan's `DirectRouting`: peers on the underlay's own link are routed to directly,
    /// without encapsulation; the others are encapsulated.
    pub direct_routing: bool,
    /// `host-gw`: no encapsulation and no overlay device at all; every peer's subnet is
    /// routed via its public address, which must be on the underlay's link. (`mode` is
    /// `Udp` then, for what needs a mode: leases carry no VtepMAC.)
    pub host_gw: bool,
    /// `wireguard`: the kernel's flannel-wg device encrypts and carries everything; one peer
    /// per lease, no programs. (`mode` is `Udp` then, `port` the listen port.)
    pub wireguard: Option<WireguardConfig>,
}

/// flannel's wireguard backend's options (pkg/backend/wireguard), its defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireguardConfig {
    /// `ListenPort` (51820): flannel-wg's port, and the `Port` of the lease.
    pub listen_port: u16,
    /// `ListenPortV6` (51821): flannel-wg-v6's, in an IPv6 network with Mode `separate`.
    pub listen_port_v6: u16,
    /// `PSK`: one preshared key for every peer (the same on every node; never in a lease).
    pub psk: Option<crate::wireguard::Secret>,
    /// `PersistentKeepaliveInterval`, seconds (0: off).
    pub keepalive: u16,
    pub mode: WireguardMode,
}


/// flannel's wireguard `Mode`: which devices and which of a peer's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireguardMode {
    /// One device per family (flannel-wg, flannel-wg-v6): the default.
    Separate,
    /// One device (flannel-wg), a peer's endpoint chosen by its addresses.
    Auto,
    /// One device, peers' IPv4 endpoints.
    Ipv4,
    /// One device, peers' IPv6 endpoints.
    Ipv6,
}

impl WireguardMode {
    /// The name in the network config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Separate => "separate",
            Self::Auto => "auto",
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

impl BackendConfig {
    /// The name flannel uses in `BackendType`.
    pub fn type_name(&self) -> &'static str {
        if self.host_gw {
            return "host-gw";
        }
        if self.wireguard.is_some() {
            return "wireguard";
        }
        match self.mode {
            EncapMode::Vxlan => "vxlan",
            EncapMode::Udp => "udp",
            EncapMode::Ipip => "ipip",
        }
    }
}

/// A validated network configuration with flannel's defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// `EnableIPv4` (true unless the config says false). An IPv6-only network (false, with
    /// `EnableIPv6`) has no IPv4 side: `network` is then `IPV6_ONLY_NETWORK`, which holds and
    /// fits no subnet, and nothing IPv4 is set up.
    pub enable_ipv4: bool,
    pub network: Ipv4Net,
    pub subnet_len: u8,
    /// First and last subnet (network addresses) leases may use.
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
    /// `EnableNFTables`: masquerade and forward rules in nftables (flannel's flannel-ipv4
    /// table) instead of iptables.
    pub enable_nftables: bool,
    /// `EnableIPv6` with its `IPv6Network`: each node also leases an IPv6 subnet, carried
    /// over an IPv6 underlay by `flannel-v6.<VNI>` (vxlan only).
    pub ipv6: Option<Ipv6Config>,
    /// What was accepted but is ignored, for the log.
    pub warnings: Vec<String>,
}

/// flannel's IPv6 half of a dual-stack network (`IPv6Network`, `IPv6SubnetLen`,
/// `IPv6SubnetMin/Max`), its defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Config {
    pub network: Ipv6Net,
    pub subnet_len: u8,
    pub subnet_min: Ipv6Addr,
    pub subnet_max: Ipv6Addr,
}

impl Ipv6Config {
    fn step(&self) -> u128 {
        1u128 << (128 - self.subnet_len)
    }

    /// The `i`th subnet from SubnetMin, if it is within SubnetMax.
    pub fn nth(&self, i: u128) -> Option<Ipv6Net> {
        let a = u128::from(self.subnet_min).checked_add(i.checked_mul(self.step())?)?;
        (a <= u128::from(self.subnet_max)).then(|| Ipv6Net::new(Ipv6Addr::from(a), self.subnet_len).expect("length <= 128"))
    }

    /// Whether `subnet` is one this configuration can lease.
    pub fn fits(&self, subnet: &Ipv6Net) -> bool {
        subnet.prefix_len() == self.subnet_len
            && subnet.network() >= self.subnet_min
            && subnet.network() <= self.subnet_max
            && self.network.contains(subnet)
    }
}

impl NetworkConfig {
    /// A wireguard network with IPv6 whose one device, flannel-wg, carries both families
    /// (Modes auto, ipv4, ipv6; Mode separate has flannel-wg-v6 for IPv6).
    pub fn wireguard_joint(&self) -> bool {
        self.ipv6.is_some() && self.backend.wireguard.is_some_and(|w| w.mode != WireguardMode::Separate)
    }

    /// Every subnet leases may use, from SubnetMin to SubnetMax.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let step = 1u64 << (32 - self.subnet_len);
        let (min, max) = (u32::from(self.subnet_min) as u64, u32::from(self.subnet_max) as u64);
        (min..=max).step_by(step as usize).map(move |a| {
            Ipv4Net::new(Ipv4Addr::from(a as u32), self.subnet_len).expect("length <= 32")
        })
    }

    /// Whether a lease's key is what this configuration leases. IPv4 and dual stack: the IPv4
    /// subnet in range, and an IPv6 one in range exactly when IPv6 is on (as flannel's
    /// compatibility check). IPv6-only: a key without an IPv4 subnet, its IPv6 one in range.
    pub fn fits_key(&self, key: &crate::lease::LeaseKey) -> bool {
        if !self.enable_ipv4 {
            return key.is_ipv6_only() && matches!((&self.ipv6, &key.v6), (Some(c), Some(s6)) if c.fits(s6));
        }
        self.fits(&key.v4)
            && match (&self.ipv6, &key.v6) {
                (Some(c), Some(s6)) => c.fits(s6),
                (None, None) => true,
                _ => false,
            }
    }

    /// Whether leases of `key`'s kind belong to this network: IPv6-only keys to an IPv6-only
    /// network, the others to a network with IPv4 (the rest is another network's, skipped).
    pub fn takes(&self, key: &crate::lease::LeaseKey) -> bool {
        key.is_ipv6_only() != self.enable_ipv4
    }

    /// The subnet this network identifies a lease by, for the log: the IPv4 one, or the IPv6
    /// one in an IPv6-only network.
    pub fn describe(&self) -> String {
        match self.ipv6 {
            Some(c6) if !self.enable_ipv4 => format!("IPv6Network {} (IPv6SubnetMin {} .. IPv6SubnetMax {}, /{})", c6.network, c6.subnet_min, c6.subnet_max, c6.subnet_len),
            Some(c6) => format!(
                "{} (SubnetMin {} .. SubnetMax {}, /{}) and IPv6Network {} (IPv6SubnetMin {} .. IPv6SubnetMax {}, /{})",
                self.network, self.subnet_min, self.subnet_max, self.subnet_len, c6.network, c6.subnet_min, c6.subnet_max, c6.subnet_len
            ),
            None => format!("{} (SubnetMin {} .. SubnetMax {}, /{})", self.network, self.subnet_min, self.subnet_max, self.subnet_len),
        }
    }

    pub fn fits(&self, subnet: &Ipv4Net) -> bool {
        self.enable_ipv4
            && subnet.prefix_len() == self.subnet_len
            && subnet.network() >= self.subnet_min
            && subnet.network() <= self.subnet_max
            && self.network.contains(subnet)
    }
}

/// Look a key up the way Go's encoding/json does: exact match first, then case-insensitive.
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v))
}

fn has(obj: &Map<String, Value>, key: &str) -> bool {
    get(obj, key).is_some_and(|v| !v.is_null())
}

fn uint(obj: &Map<String, Value>, key: &'static str) -> Result<Option<u64>, ConfigError> {
    match get(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| invalid(key, format!("must be a non-negative integer, got {v}"))),
    }
}

/// Fields whose values no error or log line may show.
const SECRETS: &[&str] = &["PSK"];

fn string<'a>(obj: &'a Map<String, Value>, key: &'static str) -> Result<Option<&'a str>, ConfigError> {
    match get(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        // A secret given in the wrong shape is still a secret: its value is not repeated.
        Some(_) if SECRETS.contains(&key) => Err(invalid(key, "must be a string (the value is not shown: it holds a secret)")),
        Some(v) => Err(invalid(key, format!("must be a string, got {v}"))),
    }
}

fn boolean(obj: &Map<String, Value>, key: &'static str) -> Result<Option<bool>, ConfigError> {
    match get(obj, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(key, format!("must be true or false, got {v}"))),
    }
}

fn ipv4(obj: &Map<String, Value>, key: &'static str) -> Result<Option<Ipv4Addr>, ConfigError> {
    string(obj, key)?
        .map(|s| s.parse().map_err(|_| invalid(key, format!("{s:?} is not an IPv4 address"))))
        .transpose()
}

const TOP_LEVEL: &[&str] = &[
    "Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "EnableIPv4", "EnableIPv6",
    "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "EnableNFTables",
];

/// Parse and validate flannel's network config JSON.
pub fn parse(json: &str) -> Result<NetworkConfig, ConfigError> {
    let value: Value = serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
    let obj = value.as_object().ok_or(ConfigError::NotAnObject)?;
    let mut warnings = Vec::new();

    let enable_ipv4 = boolean(obj, "EnableIPv4")?.unwrap_or(true);
    if !enable_ipv4 && boolean(obj, "EnableIPv6")? != Some(true) {
        return Err(invalid("EnableIPv4", "false leaves no network: an IPv6-only network also needs \"EnableIPv6\": true and an IPv6Network"));
    }
    let ipv6 = if boolean(obj, "EnableIPv6")? == Some(true) {
        Some(parse_ipv6(obj)?)
    } else {
        if has(obj, "IPv6Network") {
            warnings.push("IPv6Network is set but EnableIPv6 is not true: only the IPv4 network is set up, as flannel does".into());
        }
        None
    };
    let enable_nftables = boolean(obj, "EnableNFTables")?.unwrap_or(false);
    for k in obj.keys() {
        if !TOP_LEVEL.iter().any(|t| t.eq_ignore_ascii_case(k)) {
            warnings.push(format!("unknown field {k:?} ignored"));
        }
    }

    if !enable_ipv4 {
        return ipv6_only(obj, ipv6, enable_nftables, warnings);
    }
    let network_s = string(obj, "Network")?.ok_or(ConfigError::Missing { field: "Network" })?;
    let network: Ipv4Net = network_s
        .parse()
        .map_err(|_| invalid("Network", format!("{network_s:?} is not an IPv4 CIDR like 10.244.0.0/16")))?;
    // flannel (net.ParseCIDR) takes the network of an address with host bits set.
    let network = if network.addr() != network.network() {
        warnings.push(format!("Network {network} has host bits set; using {}, as flannel does", network.trunc()));
        network.trunc()
    } else {
        network
    };
    if network.prefix_len() == 0 {
        return Err(invalid("Network", format!("{network} is the whole address space: flannel refuses it as an empty network")));
    }
    if network.prefix_len() > 28 {
        return Err(invalid("Network", format!("{network} is smaller than /28")));
    }

    let subnet_len = match uint(obj, "SubnetLen")? {
        None | Some(0) if network.prefix_len() <= 22 => 24,
        None | Some(0) => network.prefix_len() + 2,
        Some(n) if n > 30 => return Err(invalid("SubnetLen", format!("{n} is longer than /30"))),
        Some(n) => n as u8,
    };
    // As flannel: the network must hold at least four subnets (the first is never used).
    if subnet_len < network.prefix_len() + 2 {
        return Err(invalid(
            "SubnetLen",
            format!("/{subnet_len} leaves Network's /{} fewer than four subnets; use /{} or longer", network.prefix_len(), network.prefix_len() + 2),
        ));
    }
    let size = 1u64 << (32 - subnet_len);
    let net_start = u32::from(network.network()) as u64;
    let net_end = u32::from(network.broadcast()) as u64;
    let check = |field: &'static str, addr: Ipv4Addr| -> Result<Ipv4Addr, ConfigError> {
        let a = u32::from(addr) as u64;
        if a % size != 0 {
            return Err(invalid(field, format!("{addr} is not on a /{subnet_len} boundary")));
        }
        if a < net_start || a > net_end {
            return Err(invalid(field, format!("{addr} is outside Network {network}")));
        }
        Ok(addr)
    };
    // 0.0.0.0 means unset, as in flannel.
    let subnet_min = match ipv4(obj, "SubnetMin")?.filter(|a| !a.is_unspecified()) {
        Some(a) => check("SubnetMin", a)?,
        None => Ipv4Addr::from((net_start + size) as u32),
    };
    let subnet_max = match ipv4(obj, "SubnetMax")?.filter(|a| !a.is_unspecified()) {
        Some(a) => check("SubnetMax", a)?,
        None => Ipv4Addr::from((net_end + 1 - size) as u32),
    };
    if subnet_min > subnet_max {
        return Err(invalid("SubnetMin", format!("{subnet_min} is above SubnetMax {subnet_max}")));
    }

    let backend = parse_backend(get(obj, "Backend"), &mut warnings)?;
    // wireguard's dual stack: flannel-wg-v6 beside flannel-wg (Mode separate), or both
    // families on flannel-wg.
    let wireguard = backend.wireguard.is_some();
    if ipv6.is_some() && !wireguard && (backend.mode != EncapMode::Vxlan || backend.host_gw) {
        return Err(invalid(
            "EnableIPv6",
            format!("dual stack is implemented for the vxlan backend (flannel-v6.<VNI>), not {:?}", backend.type_name()),
        ));
    }
    if ipv6.is_none() && backend.wireguard.is_some_and(|w| w.mode == WireguardMode::Ipv6) {
        return Err(invalid("Backend.Mode", "\"ipv6\" sends to peers' IPv6 addresses, which needs EnableIPv6; use \"separate\" or \"ipv4\""));
    }
    Ok(NetworkConfig { enable_ipv4, network, subnet_len, subnet_min, subnet_max, backend, enable_nftables, ipv6, warnings })
}

/// What stands for the IPv4 network of an IPv6-only network: a /32 of the unspecified
/// address, which contains and fits no subnet a lease or route could have.
pub const IPV6_ONLY_NETWORK: Ipv4Net = match Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 32) {
    Ok(n) => n,
    Err(_) => panic!("0.0.0.0/32"),
};

/// An IPv6-only network (`EnableIPv4: false`): the IPv6 half only, on vxlan (flannel-v6.<VNI>,
/// without DirectRouting); the IPv4 fields are ignored, as flannel ignores them.
fn ipv6_only(
    obj: &Map<String, Value>,
    ipv6: Option<Ipv6Config>,
    enable_nftables: bool,
    mut warnings: Vec<String>,
) -> Result<NetworkConfig, ConfigError> {
    for k in ["Network", "SubnetLen", "SubnetMin", "SubnetMax"] {
        if has(obj, k) {
            warnings.push(format!("{k} is ignored: EnableIPv4 is false (an IPv6-only network)"));
        }
    }
    let backend = parse_backend(get(obj, "Backend"), &mut warnings)?;
    // wireguard: flannel-wg-v6 alone (Mode separate), or flannel-wg for IPv6.
    let wireguard = backend.wireguard.is_some();
    if !wireguard && (backend.mode != EncapMode::Vxlan || backend.host_gw) {
        return Err(invalid(
            "EnableIPv4",
            format!("false (an IPv6-only network) is implemented for the vxlan backend (flannel-v6.<VNI>), not {:?}", backend.type_name()),
        ));
    }
    if backend.direct_routing {
        return Err(invalid("Backend.DirectRouting", "is not implemented for IPv6-only networks (peers' IPv6 subnets are always encapsulated); remove it"));
    }
    let n = IPV6_ONLY_NETWORK;
    Ok(NetworkConfig {
        enable_ipv4: false,
        network: n,
        subnet_len: 32,
        subnet_min: n.network(),
        subnet_max: n.network(),
        backend,
        enable_nftables,
        ipv6,
        warnings,
    })
}

fn ipv6_addr(obj: &Map<String, Value>, key: &'static str) -> Result<Option<Ipv6Addr>, ConfigError> {
    string(obj, key)?
        .map(|s| s.parse().map_err(|_| invalid(key, format!("{s:?} is not an IPv6 address"))))
        .transpose()
}

/// The IPv6 half, with flannel's defaults and limits (pkg/subnet/config.go): SubnetLen 64
/// for networks of /62 or wider, else prefix + 2; at most /126; the network at most /124;
/// SubnetMin/Max on subnet boundaries inside the network (defaults: the second and the last
/// subnet).
fn parse_ipv6(obj: &Map<String, Value>) -> Result<Ipv6Config, ConfigError> {
    let s = string(obj, "IPv6Network")?.ok_or_else(|| invalid("IPv6Network", "is required with EnableIPv6 (e.g. \"fd00:10:244::/56\")"))?;
    let network: Ipv6Net = s.parse().map_err(|_| invalid("IPv6Network", format!("{s:?} is not an IPv6 CIDR like fd00:10:244::/56")))?;
    let network = network.trunc();
    if network.prefix_len() == 0 {
        return Err(invalid("IPv6Network", "::/0 is the whole address space"));
    }
    if network.prefix_len() > 124 {
        return Err(invalid("IPv6Network", format!("{network} is smaller than /124")));
    }
    let subnet_len = match uint(obj, "IPv6SubnetLen")? {
        None | Some(0) if network.prefix_len() <= 62 => 64,
        None | Some(0) => network.prefix_len() + 2,
        Some(n) if n > 126 => return Err(invalid("IPv6SubnetLen", format!("{n} is longer than /126"))),
        Some(n) => n as u8,
    };
    if subnet_len < network.prefix_len() + 2 {
        return Err(invalid(
            "IPv6SubnetLen",
            format!("/{subnet_len} leaves IPv6Network's /{} fewer than four subnets", network.prefix_len()),
        ));
    }
    let size = 1u128 << (128 - subnet_len);
    let start = u128::from(network.network());
    let end = u128::from(network.broadcast());
    let check = |field: &'static str, addr: Ipv6Addr| -> Result<Ipv6Addr, ConfigError> {
        let a = u128::from(addr);
        if a % size != 0 {
            return Err(invalid(field, format!("{addr} is not on a /{subnet_len} boundary")));
        }
        if a < start || a > end {
            return Err(invalid(field, format!("{addr} is outside IPv6Network {network}")));
        }
        Ok(addr)
    };
    let subnet_min = match ipv6_addr(obj, "IPv6SubnetMin")?.filter(|a| !a.is_unspecified()) {
        Some(a) => check("IPv6SubnetMin", a)?,
        None => Ipv6Addr::from(start + size),
    };
    let subnet_max = match ipv6_addr(obj, "IPv6SubnetMax")?.filter(|a| !a.is_unspecified()) {
        Some(a) => check("IPv6SubnetMax", a)?,
        None => Ipv6Addr::from(end + 1 - size),
    };
    if subnet_min > subnet_max {
        return Err(invalid("IPv6SubnetMin", format!("{subnet_min} is above IPv6SubnetMax {subnet_max}")));
    }
    Ok(Ipv6Config { network, subnet_len, subnet_min, subnet_max })
}

fn parse_backend(v: Option<&Value>, warnings: &mut Vec<String>) -> Result<BackendConfig, ConfigError> {
    let empty = Map::new();
    let obj = match v {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(o)) => o,
        Some(v) => return Err(invalid("Backend", format!("must be an object, got {v}"))),
    };
    // flannel's code (not its docs) defaults to udp when Backend.Type is absent.
    let ty = string(obj, "Type")?.unwrap_or("udp");
    let port = uint(obj, "Port")?;
    let port = match port {
        Some(p) if p > 65535 => return Err(invalid("Backend.Port", format!("{p} is not a UDP port"))),
        Some(p) => p as u16,
        None => 0,
    };
    match ty.to_ascii_lowercase().as_str() {
        "vxlan" => {
            let vni = match uint(obj, "VNI")? {
                None | Some(0) => DEFAULT_VNI,
                Some(v) if v > 0x00ff_ffff => return Err(invalid("Backend.VNI", format!("{v} does not fit in 24 bits"))),
                Some(v) => v as u32,
            };
            let mtu = match uint(obj, "MTU")? {
                None | Some(0) => None,
                Some(m) if !(68..=65535).contains(&m) => return Err(invalid("Backend.MTU", format!("{m} is not a usable MTU"))),
                Some(m) => Some(m as u32),
            };
            let direct_routing = boolean(obj, "DirectRouting")?.unwrap_or(false);
            for k in ["GBP", "Learning", "MacPrefix"] {
                if has(obj, k) {
                    warnings.push(format!("Backend.{k} is not supported by this agent and is ignored"));
                }
            }
            Ok(BackendConfig {
                mode: EncapMode::Vxlan,
                vni,
                port: if port == 0 { DEFAULT_VXLAN_PORT } else { port },
                mtu,
                direct_routing,
                host_gw: false,
                wireguard: None,
            })
        }
        "udp" => Ok(BackendConfig {
            mode: EncapMode::Udp,
            vni: DEFAULT_VNI,
            port: if port == 0 { DEFAULT_UDP_PORT } else { port },
            mtu: None,
            direct_routing: false,
            host_gw: false,
            wireguard: None,
        }),
        "host-gw" => Ok(BackendConfig { mode: EncapMode::Udp, vni: DEFAULT_VNI, port: 0, mtu: None, direct_routing: false, host_gw: true, wireguard: None }),
        // flannel's ipip backend (pkg/backend/ipip): DirectRouting is its only option; the
        // kernel's flannel.ipip device tunnels, the programs check what arrives. Where the
        // kernel has no ipip module, bringing the device up says so.
        "ipip" => {
            if port != 0 {
                warnings.push("Backend.Port is ignored: IP-in-IP has no port".to_string());
            }
            Ok(BackendConfig {
                mode: EncapMode::Ipip,
                vni: DEFAULT_VNI,
                port: 0,
                mtu: None,
                direct_routing: boolean(obj, "DirectRouting")?.unwrap_or(false),
                host_gw: false,
                wireguard: None,
            })
        }
        // flannel's wireguard backend (pkg/backend/wireguard): the kernel's flannel-wg does the
        // crypto; where the kernel has no wireguard module, bringing the device up says so.
        "wireguard" => parse_wireguard(obj, port, warnings),
        // flannel's other backends that are not kernel devices (docs/backends.md).
        kind @ ("extension" | "ipsec") => Err(invalid(
            "Backend.Type",
            format!(
                "{kind:?} is flannel's, not this agent's: it needs {}, which this data plane does not drive \
                 (see docs/backends.md); use \"vxlan\" (flannel's default, interoperable with stock nodes), \
                 \"host-gw\", \"ipip\", \"wireguard\" or \"udp\"",
                match kind {
                    "ipsec" => "the kernel's xfrm/IPsec and strongSwan's charon",
                    _ => "helper scripts (extension)",
                }
            ),
        )),
        other => Err(invalid(
            "Backend.Type",
            format!("{other:?} is not supported (this agent implements \"vxlan\", \"udp\", \"host-gw\", \"ipip\" and \"wireguard\")"),
        )),
    }
}

/// flannel's wireguard options, as its backend reads them (Go's JSON: keys in any case);
/// a PSK that is no wireguard key, a port that is none or an unknown Mode is refused here,
/// before anything on the node changes.
fn parse_wireguard(obj: &Map<String, Value>, port: u16, warnings: &mut Vec<String>) -> Result<BackendConfig, ConfigError> {
    let port_of = |key: &'static str, default: u16| -> Result<u16, ConfigError> {
        match uint(obj, key)? {
            None | Some(0) => Ok(default),
            Some(p) if p > 65535 => Err(invalid(key, format!("{p} is not a UDP port"))),
            Some(p) => Ok(p as u16),
        }
    };
    let listen_port = port_of("ListenPort", 51820)?;
    let listen_port_v6 = port_of("ListenPortV6", 51821)?;
    if port != 0 {
        warnings.push("Backend.Port is ignored: wireguard listens on Backend.ListenPort".to_string());
    }
    let psk = match string(obj, "PSK")? {
        None | Some("") => None,
        Some(k) => Some(crate::wireguard::parse_key(k).map(crate::wireguard::Secret).map_err(|e| invalid("Backend.PSK", format!("is not a wireguard key: {e} (make one with `wg genpsk`)")))?),
    };
    let keepalive = match uint(obj, "PersistentKeepaliveInterval")? {
        None => 0,
        Some(k) if k > 65535 => return Err(invalid("Backend.PersistentKeepaliveInterval", format!("{k} s is more than wireguard's 65535"))),
        Some(k) => k as u16,
    };
    let mode = match string(obj, "Mode")? {
        None | Some("separate") => WireguardMode::Separate,
        Some("auto") => WireguardMode::Auto,
        Some("ipv4") => WireguardMode::Ipv4,
        Some("ipv6") => WireguardMode::Ipv6,
        Some(m) => return Err(invalid("Backend.Mode", format!("{m:?} is not one of flannel's: \"separate\" (the default), \"auto\", \"ipv4\", \"ipv6\""))),
    };
    let mtu = match uint(obj, "MTU")? {
        None | Some(0) => None,
        Some(m) if !(crate::wireguard::OVERHEAD as u64 + 68..=65535).contains(&m) => {
            return Err(invalid("Backend.MTU", format!("{m} leaves no usable MTU after wireguard's {} bytes", crate::wireguard::OVERHEAD)))
        }
        Some(m) => Some(m as u32),
    };
    Ok(BackendConfig {
        mode: EncapMode::Udp,
        vni: DEFAULT_VNI,
        port: listen_port,
        mtu,
        direct_routing: false,
        host_gw: false,
        wireguard: Some(WireguardConfig { listen_port, listen_port_v6, psk, keepalive, mode }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseKey;

    fn ok(json: &str) -> NetworkConfig {
        parse(json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    #[test]
    fn seed_config_gets_flannel_defaults() {
        let c = ok(r#"{"Network":"172.17.0.0/16","Backend":{"Type":"vxlan"}}"#);
        assert_eq!(c.network, "172.17.0.0/16".parse().unwrap());
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(172, 17, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(172, 17, 255, 0));
        assert_eq!(c.backend, BackendConfig { mode: EncapMode::Vxlan, vni: 1, port: 8472, mtu: None, direct_routing: false, host_gw: false, wireguard: None });
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.subnets().count(), 255);
    }

    #[test]
    fn defaults_table() {
        // (json, subnet_len, min, max, mode, port)
        let cases = [
            (r#"{"Network":"10.0.0.0/8"}"#, 24, "10.0.1.0", "10.255.255.0", EncapMode::Udp, 8285),
            (r#"{"Network":"10.1.0.0/22","Backend":{"Type":"udp","Port":9000}}"#, 24, "10.1.1.0", "10.1.3.0", EncapMode::Udp, 9000),
            (r#"{"Network":"10.1.0.0/24","Backend":{"Type":"vxlan","Port":4789}}"#, 26, "10.1.0.64", "10.1.0.192", EncapMode::Vxlan, 4789),
            (r#"{"Network":"10.1.0.0/28","Backend":{"Type":"VXLAN"}}"#, 30, "10.1.0.4", "10.1.0.12", EncapMode::Vxlan, 8472),
            (r#"{"network":"10.2.0.0/16","subnetlen":25,"backend":{"type":"vxlan","vni":7}}"#, 25, "10.2.0.128", "10.2.255.128", EncapMode::Vxlan, 8472),
            (r#"{"Network":"10.2.0.0/16","SubnetMin":"10.2.10.0","SubnetMax":"10.2.20.0","Backend":{"Type":"vxlan"}}"#, 24, "10.2.10.0", "10.2.20.0", EncapMode::Vxlan, 8472),
            (r#"{"Network":"10.3.0.0/16","Backend":{"Type":"ipip"}}"#, 24, "10.3.1.0", "10.3.255.0", EncapMode::Ipip, 0),
        ];
        for (json, len, min, max, mode, port) in cases {
            let c = ok(json);
            assert_eq!(c.subnet_len, len, "{json}");
            assert_eq!(c.subnet_min.to_string(), min, "{json}");
            assert_eq!(c.subnet_max.to_string(), max, "{json}");
            assert_eq!((c.backend.mode, c.backend.port), (mode, port), "{json}");
        }
        assert_eq!(ok(r#"{"network":"10.2.0.0/16","backend":{"type":"vxlan","vni":7}}"#).backend.vni, 7);
        // flannel's wireguard: its defaults, and its options in any case (Go's JSON).
        let wg = ok(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"WireGuard"}}"#);
        assert_eq!(wg.backend.type_name(), "wireguard");
        assert_eq!(
            wg.backend.wireguard,
            Some(WireguardConfig { listen_port: 51820, listen_port_v6: 51821, psk: None, keepalive: 0, mode: WireguardMode::Separate })
        );
        assert_eq!((wg.backend.port, wg.backend.mtu), (51820, None));
        let psk = "cGFzc3dvcmRwYXNzd29yZHBhc3N3b3JkcGFzc3dvcmQ=";
        let wg = ok(&format!(
            r#"{{"Network":"10.3.0.0/16","Backend":{{"Type":"wireguard","listenPort":51900,"PSK":"{psk}","PersistentKeepaliveInterval":25,"Mode":"auto","MTU":1400,"Port":1}}}}"#
        ));
        let w = wg.backend.wireguard.unwrap();
        assert_eq!((w.listen_port, w.keepalive, w.mode, wg.backend.port, wg.backend.mtu), (51900, 25, WireguardMode::Auto, 51900, Some(1400)));
        assert_eq!(w.psk.map(|k| crate::wireguard::format_key(&k.0)).as_deref(), Some(psk));
        assert!(wg.warnings.iter().any(|w| w.contains("Backend.Port is ignored")), "{:?}", wg.warnings);
        // flannel's ipip: DirectRouting its one option; a port means nothing to it.
        let ipip = ok(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"ipip","DirectRouting":true,"Port":9}}"#);
        assert!(ipip.backend.direct_routing && ipip.backend.type_name() == "ipip");
        assert!(ipip.warnings.iter().any(|w| w.contains("Backend.Port is ignored")), "{:?}", ipip.warnings);
    }

    /// flannel's own cases (pkg/subnet/config_test.go and checkNetworkConfig): defaults,
    /// overrides, and the limits it enforces, so that `config set` never stores a config a
    /// stock node refuses, nor refuses one it takes.
    #[test]
    fn flannels_own_cases() {
        let c = ok(r#"{ "network": "10.3.0.0/16" }"#);
        assert_eq!((c.subnet_len, c.subnet_min.to_string(), c.subnet_max.to_string()), (24, "10.3.1.0".into(), "10.3.255.0".into()));
        let c = ok(r#"{ "Network": "10.3.0.0/16", "SubnetLen": 28, "SubnetMin": "10.3.5.0", "SubnetMax": "10.3.8.0" }"#);
        assert_eq!((c.subnet_len, c.subnet_min.to_string(), c.subnet_max.to_string()), (28, "10.3.5.0".into(), "10.3.8.0".into()));
        // /23: too small for /24s to four hosts, so prefix + 2.
        assert_eq!(ok(r#"{"Network":"10.1.0.0/23"}"#).subnet_len, 25);
        assert_eq!(ok(r#"{"Network":"10.1.0.0/16","SubnetLen":18}"#).subnet_len, 18);
        assert_eq!(ok(r#"{"Network":"10.1.0.0/16","SubnetLen":30}"#).subnet_len, 30);
        // SubnetMin/SubnetMax "0.0.0.0": unset, flannel's defaults.
        let c = ok(r#"{"Network":"10.3.0.0/16","SubnetMin":"0.0.0.0","SubnetMax":"0.0.0.0"}"#);
        assert_eq!((c.subnet_min.to_string(), c.subnet_max.to_string()), ("10.3.1.0".into(), "10.3.255.0".into()));
        // Host bits: flannel takes the network (net.ParseCIDR), with a warning here.
        let c = ok(r#"{"Network":"10.0.0.1/16"}"#);
        assert_eq!(c.network.to_string(), "10.0.0.0/16");
        assert!(c.warnings.iter().any(|w| w.contains("host bits")), "{:?}", c.warnings);
        for refused in [
            r#"{"Network":"0.0.0.0/0"}"#,
            r#"{"Network":"10.1.0.0/29"}"#,
            r#"{"Network":"10.1.0.0/16","SubnetLen":17}"#,
            r#"{"Network":"10.1.0.0/16","SubnetLen":31}"#,
            r#"{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}"#,
            r#"{"Network":"10.1.0.0/16","SubnetMax":"10.1.5.1"}"#,
        ] {
            assert!(parse(refused).is_err(), "flannel refuses {refused}");
        }
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let cases = [
            ("not json", "not valid JSON"),
            ("[1,2]", "must be a JSON object"),
            (r#"{"Backend":{"Type":"vxlan"}}"#, "Network is required"),
            (r#"{"Network":"10.0.0.0"}"#, "Network: \"10.0.0.0\" is not an IPv4 CIDR"),
            (r#"{"Network":"10.0.0.0/33"}"#, "Network: \"10.0.0.0/33\" is not an IPv4 CIDR"),
            (r#"{"Network":"fd00::/64"}"#, "Network: \"fd00::/64\" is not an IPv4 CIDR"),
            (r#"{"Network":"0.0.0.0/0"}"#, "Network: 0.0.0.0/0 is the whole address space"),
            (r#"{"Network":"10.0.0.0/29"}"#, "Network: 10.0.0.0/29 is smaller than /28"),
            (r#"{"Network":42}"#, "Network: must be a string"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":16}"#, "SubnetLen: /16 leaves Network's /16 fewer than four subnets"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#, "SubnetLen: /17 leaves Network's /16 fewer than four subnets"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#, "SubnetLen: 31 is longer than /30"),
            (r#"{"Network":"10.0.0.0/16","SubnetLen":"24"}"#, "SubnetLen: must be a non-negative integer"),
            (r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.128"}"#, "SubnetMin: 10.0.1.128 is not on a /24 boundary"),
            (r#"{"Network":"10.0.0.0/16","SubnetMax":"10.1.0.0"}"#, "SubnetMax: 10.1.0.0 is outside Network"),
            (r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.8.0"}"#, "SubnetMin: 10.0.9.0 is above SubnetMax"),
            (r#"{"Network":"10.0.0.0/16","SubnetMin":"x"}"#, "SubnetMin: \"x\" is not an IPv4 address"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"gre"}}"#, "Backend.Type: \"gre\" is not supported"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"ipsec"}}"#, "strongSwan"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"wireguard","PSK":"c2hvcnQ="}}"#, "Backend.PSK: is not a wireguard key: a wireguard key is 32 bytes"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"wireguard","PSK":"not base64!"}}"#, "wg genpsk"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"wireguard","PSK":["FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE="]}}"#, "PSK: must be a string (the value is not shown"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"wireguard","ListenPort":70000}}"#, "ListenPort: 70000 is not a UDP port"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"wireguard","Mode":"both"}}"#, "Backend.Mode: \"both\" is not one of flannel's"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"wireguard","Mode":"ipv6"}}"#, "needs EnableIPv6"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"wireguard","MTU":100}}"#, "no usable MTU"),
            (r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"ipip"}}"#, "not \"ipip\""),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"Extension"}}"#, "use \"vxlan\""),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#, "Backend.VNI: 16777216 does not fit"),
            (r#"{"Network":"10.0.0.0/16","Backend":{"Type":"vxlan","Port":70000}}"#, "Backend.Port: 70000 is not a UDP port"),
            (r#"{"Network":"10.0.0.0/16","Backend":"vxlan"}"#, "Backend: must be an object"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv4":false}"#, "EnableIPv4: false leaves no network"),
            (r#"{"EnableIPv4":false,"EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#, "IPv6Network: is required"),
            (r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56"}"#, "implemented for the vxlan backend (flannel-v6.<VNI>), not \"udp\""),
            (r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"host-gw"}}"#, "not \"host-gw\""),
            (r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan","DirectRouting":true}}"#, "Backend.DirectRouting: is not implemented for IPv6-only"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#, "IPv6Network: is required"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#, "not an IPv6 CIDR"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/125","Backend":{"Type":"vxlan"}}"#, "smaller than /124"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/64","IPv6SubnetLen":65,"Backend":{"Type":"vxlan"}}"#, "IPv6SubnetLen: /65 leaves"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00:0:0:1::1","Backend":{"Type":"vxlan"}}"#, "IPv6SubnetMin: fd00:0:0:1::1 is not on a /64 boundary"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","IPv6SubnetMax":"fd01::","Backend":{"Type":"vxlan"}}"#, "outside IPv6Network"),
            (r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"udp"}}"#, "dual stack is implemented for the vxlan backend"),
        ];
        for (json, want) in cases {
            let e = parse(json).expect_err(json).to_string();
            assert!(e.contains(want), "{json}: expected {want:?} in {e:?}");
            assert!(!e.contains("FpCyhws9") && !e.contains("c2hvcnQ="), "{json}: a PSK's text in {e:?}");
        }
    }

    #[test]
    fn dual_stack_and_ipv6_only_wireguard_are_accepted_in_every_mode() {
        let c = ok(r#"{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"wireguard","ListenPortV6":51999}}"#);
        let w = c.backend.wireguard.unwrap();
        assert_eq!((w.mode, w.listen_port, w.listen_port_v6), (WireguardMode::Separate, 51820, 51999));
        assert!(c.ipv6.is_some() && c.enable_ipv4);
        let c = ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"wireguard","Mode":"separate"}}"#);
        assert!(c.ipv6.is_some() && !c.enable_ipv4 && c.backend.wireguard.is_some());
        assert!(!c.wireguard_joint());
        // Modes auto, ipv4 and ipv6: one device for both families, where there is IPv6.
        for (mode, ipv6_only) in [("auto", false), ("ipv4", false), ("ipv6", false), ("ipv6", true), ("auto", true)] {
            let enable4 = if ipv6_only { r#""EnableIPv4":false,"# } else { r#""Network":"10.0.0.0/16","# };
            let c = ok(&format!(r#"{{{enable4}"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#));
            assert!(c.wireguard_joint(), "{mode}");
            assert_eq!(c.backend.wireguard.unwrap().mode.name(), mode);
        }
        // Mode ipv4 in an IPv4-only network is the one device flannel-wg, as separate.
        let c = ok(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"wireguard","Mode":"ipv4"}}"#);
        assert_eq!(c.backend.wireguard.unwrap().mode, WireguardMode::Ipv4);
        assert!(!c.wireguard_joint(), "no IPv6: nothing to join");
    }

    #[test]
    fn unsupported_flannel_fields_are_accepted_with_warnings() {
        let c = ok(r#"{"Network":"10.0.0.0/16","IPv6Network":"fd00::/56","EnableNFTables":true,
                     "Backend":{"Type":"vxlan","DirectRouting":true,"GBP":true},"Colour":"blue"}"#);
        assert!(c.backend.direct_routing);
        assert!(c.enable_nftables);
        assert_eq!(c.ipv6, None, "IPv6Network without EnableIPv6 is not dual stack (flannel)");
        let w = c.warnings.join("\n");
        for want in ["IPv6Network is set but EnableIPv6", "GBP", "\"Colour\""] {
            assert!(w.contains(want), "missing warning about {want}: {w}");
        }
    }

    /// flannel's IPv6 defaults: /64 subnets in networks of /62 or wider, else prefix + 2; the
    /// second subnet to the last.
    #[test]
    fn dual_stack_configs_get_flannels_ipv6_defaults() {
        let c = ok(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#);
        let v6 = c.ipv6.expect("dual stack");
        assert_eq!(v6.network, "fd00:10:244::/56".parse::<Ipv6Net>().unwrap());
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.subnet_min, "fd00:10:244:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.subnet_max, "fd00:10:244:ff::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.nth(0), Some("fd00:10:244:1::/64".parse().unwrap()));
        assert_eq!(v6.nth(254), Some("fd00:10:244:ff::/64".parse().unwrap()));
        assert_eq!(v6.nth(255), None);
        let key = |v4: &str, v6: Option<&str>| LeaseKey { v4: v4.parse().unwrap(), v6: v6.map(|s| s.parse().unwrap()) };
        assert!(c.fits_key(&key("10.244.3.0/24", Some("fd00:10:244:7::/64"))));
        assert!(!c.fits_key(&key("10.244.3.0/24", None)), "IPv6 on: a lease without an IPv6 subnet is stale");
        assert!(!c.fits_key(&key("10.244.3.0/24", Some("fd00:10:244::/64"))), "below IPv6SubnetMin");
        assert!(!c.fits_key(&LeaseKey::ipv6_only("fd00:10:244:7::/64".parse().unwrap())), "an IPv6-only key in a dual-stack network");
        assert!(c.takes(&key("10.244.3.0/24", None)) && !c.takes(&LeaseKey::ipv6_only("fd00:10:244:7::/64".parse().unwrap())));
        let c = ok(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/120","Backend":{"Type":"vxlan"}}"#);
        assert_eq!(c.ipv6.unwrap().subnet_len, 122);
        let c = ok(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetLen":80,
                     "IPv6SubnetMin":"fd00:0:0:2::","IPv6SubnetMax":"fd00:0:0:3::","Backend":{"Type":"vxlan"}}"#);
        let v6 = c.ipv6.unwrap();
        assert_eq!((v6.subnet_len, v6.subnet_min.to_string(), v6.subnet_max.to_string()), (80, "fd00:0:0:2::".into(), "fd00:0:0:3::".into()));
        assert!(!ok(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).fits_key(&key("10.244.3.0/24", Some("fd00::/64"))));
    }

    /// flannel's IPv6-only network: EnableIPv4 false, no Network needed (ignored, warned, if
    /// given); only IPv6-only keys fit, and no IPv4 subnet does.
    #[test]
    fn ipv6_only_networks_have_no_ipv4_side() {
        let c = ok(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan","VNI":4}}"#);
        assert!(!c.enable_ipv4 && c.backend.vni == 4 && c.warnings.is_empty(), "{c:?}");
        assert_eq!(c.ipv6.unwrap().subnet_len, 64);
        assert!(c.fits_key(&LeaseKey::ipv6_only("fd00:10:244:7::/64".parse().unwrap())));
        assert!(!c.fits_key(&LeaseKey::ipv6_only("fd00:10:244::/64".parse().unwrap())), "below IPv6SubnetMin");
        assert!(!c.fits_key(&LeaseKey { v4: "10.244.3.0/24".parse().unwrap(), v6: Some("fd00:10:244:7::/64".parse().unwrap()) }));
        assert!(c.takes(&LeaseKey::ipv6_only("fd00:10:244:7::/64".parse().unwrap())) && !c.takes(&LeaseKey::from(&"10.244.3.0/24".parse().unwrap())));
        // Nothing IPv4 fits or is held by the stand-in network (not even 0.0.0.0/0's parts).
        for v4 in ["0.0.0.0/32", "0.0.0.0/0", "10.244.3.0/24"] {
            let n: Ipv4Net = v4.parse().unwrap();
            assert!(!c.fits(&n), "{v4}");
        }
        assert!(!c.network.contains(&"10.0.0.1".parse::<Ipv4Addr>().unwrap()));
        assert!(c.describe().starts_with("IPv6Network fd00:10:244::/56"), "{}", c.describe());
        let c = ok(r#"{"Network":"10.244.0.0/16","SubnetLen":26,"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan"}}"#);
        let w = c.warnings.join("\n");
        assert!(w.contains("Network is ignored") && w.contains("SubnetLen is ignored"), "{w}");
        assert!(!c.enable_ipv4);
    }

    #[test]
    fn fits_checks_length_and_range() {
        let c = ok(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.5.0","SubnetMax":"10.0.9.0"}"#);
        assert!(c.fits(&"10.0.5.0/24".parse().unwrap()));
        assert!(c.fits(&"10.0.9.0/24".parse().unwrap()));
        assert!(!c.fits(&"10.0.4.0/24".parse().unwrap()));
        assert!(!c.fits(&"10.0.10.0/24".parse().unwrap()));
        assert!(!c.fits(&"10.0.6.0/25".parse().unwrap()));
    }
}
