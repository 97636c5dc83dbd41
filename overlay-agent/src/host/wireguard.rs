//! The kernel's wireguard devices, configured as flannel's wireguard backend configures them
//! (pkg/backend/wireguard): the device made over rtnetlink (`netdev`), its private key,
//! listen port and peers over generic netlink's `wireguard` family (netlink-packet-wireguard
//! builds and parses the messages, as netlink-packet-route does rtnetlink's); the private key
//! kept in a file where flannel keeps it. The kernel does the crypto, and derives the public
//! key from the private one: what the lease says is read back from the device.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;
use ipnet::Ipv4Net;
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlMessage,
};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd, WireguardMessage,
    WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use netlink_sys::protocols::NETLINK_GENERIC;

/// flannel's device for IPv4 (Mode `separate`; the only one in `auto`, `ipv4`, `ipv6`).
pub const DEVICE: &str = "flannel-wg";
/// flannel's device for IPv6 in Mode `separate`.
pub const DEVICE_V6: &str = "flannel-wg-v6";
/// Where flannel keeps the private key (`WIREGUARD_KEY_FILE` overrides it).
pub const DEFAULT_KEY_FILE: &str = "/run/flannel/wgkey";
/// What wireguard adds to a packet, as flannel counts it: outer IPv4 or IPv6 header (40 at
/// most), UDP 8, type 4, key index 4, nonce 8, authentication tag 16.
pub const OVERHEAD: u32 = 80;

/// A Curve25519 key (private, public or preshared), 32 bytes.
pub type Key = [u8; 32];

/// A key that is a secret (a node's private key, the network's PSK): `Debug` says only that
/// it is set, so no log line or error built from a struct holding one can show it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Secret(pub Key);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(set)")
    }
}

/// A key as wireguard's tools and flannel write it: standard base64 of its 32 bytes.
pub fn format_key(k: &Key) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// A key in wireguard's base64 form (surrounding whitespace ignored, as `wg` does), or what
/// is wrong with it.
///
/// The error never holds the text: a private key or a PSK that is almost right is still a
/// secret (a caller whose key is public, a lease's, names it).
pub fn parse_key(s: &str) -> std::result::Result<Key, String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|e| format!("not base64 ({e})"))?;
    bytes.try_into().map_err(|b: Vec<u8>| format!("a wireguard key is 32 bytes; this one has {}", b.len()))
}

/// The key file flannel reads: `WIREGUARD_KEY_FILE` if set, else /run/flannel/wgkey.
pub fn key_file(env: Option<String>) -> String {
    env.filter(|p| !p.is_empty()).unwrap_or_else(|| DEFAULT_KEY_FILE.to_string())
}

/// The node's private key: the one in `path` (a restart keeps it, and with it the peers'
/// sessions and the lease's PublicKey), or a new one written there (mode 0400, its
/// directory made, as flannel does; on tmpfs a reboot means a new key, as with flannel). A
/// file that holds no key is an error naming it: replacing it would change the node's key
/// behind the operator's back.
pub fn load_or_create_key(path: &Path) -> Result<Key> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_key(&text).map_err(|e| anyhow::anyhow!("{}: not a wireguard private key: {e}; remove it to have a new key made", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_private_key()?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(path)
                .with_context(|| format!("creating the wireguard key file {}", path.display()))?;
            f.write_all(format_key(&key).as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))?;
            tracing::info!(key_file = %path.display(), "new wireguard private key made");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading the wireguard key file {}", path.display())),
    }
}

/// 32 bytes from the OS's random source, clamped as Curve25519 private keys are (`wg genkey`).
fn generate_private_key() -> Result<Key> {
    use rand::TryRngCore as _;
    let mut k = [0u8; 32];
    rand::rngs::OsRng.try_fill_bytes(&mut k).context("reading the OS's random source for a wireguard key")?;
    k[0] &= 248;
    k[31] = (k[31] & 127) | 64;
    Ok(k)
}

/// Create the wireguard device `name` (kept if one is there: its peers go on carrying
/// traffic across an agent restart; flannel makes it anew). Another kind of device of that
/// name is refused; a kernel without the wireguard module is said so by name.
pub fn ensure_device(name: &str) -> Result<crate::netdev::Link> {
    if let Some(l) = crate::netdev::link(name)? {
        match l.kind.as_deref() {
            Some("wireguard") => return Ok(l),
            kind => bail!(
                "{name} exists and is not a wireguard device ({}): remove it and start again",
                kind.unwrap_or("a physical interface")
            ),
        }
    }
    match crate::netdev::new_wireguard_link(name) {
        Err(e) if crate::netdev::is_errno(&e, libc::EOPNOTSUPP) => bail!(
            "Backend.Type \"wireguard\" needs the kernel's wireguard module, which this kernel does not have ({e}): \
             load it (modprobe wireguard; Debian 12's and RHEL 9's kernels have it) or use \"vxlan\" (flannel's default, \
             interoperable with stock nodes)"
        ),
        r => r?,
    }
    Ok(crate::netdev::require_link(name)?)
}

/// The wireguard family's id (generic netlink families are numbered at registration).
fn family_id() -> Result<u16> {
    let mut m = GenlMessage::from_payload(GenlCtrl { cmd: GenlCtrlCmd::GetFamily, nlas: vec![GenlCtrlAttrs::FamilyName("wireguard".into())] });
    m.finalize();
    let answers = match crate::netdev::request_on(NETLINK_GENERIC, "resolve the wireguard netlink family", m, NLM_F_ACK) {
        Ok(a) => a,
        Err(e) if crate::netdev::is_errno(&e, libc::ENOENT) => {
            bail!("the kernel has no wireguard netlink family (the wireguard module is not loaded): modprobe wireguard")
        }
        Err(e) => return Err(e.into()),
    };
    answers
        .iter()
        .flat_map(|a| a.payload.nlas.iter())
        .find_map(|n| match n {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        })
        .context("the kernel's answer for the wireguard family has no id")
}

fn wg_request(op: &str, cmd: WireguardCmd, attributes: Vec<WireguardAttribute>, flags: u16) -> Result<Vec<WireguardMessage>> {
    let mut m = GenlMessage::from_payload(WireguardMessage { cmd, attributes });
    m.set_resolved_family_id(family_id()?);
    m.finalize();
    Ok(crate::netdev::request_on(NETLINK_GENERIC, op, m, flags)?.into_iter().map(|g| g.payload).collect())
}

/// A peer as the device holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<(IpAddr, u8)>,
    pub preshared_key: Option<Secret>,
    pub keepalive: u16,
    pub last_handshake_secs: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}


/// A device's state: its public key (none before a private key is set), listen port, peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub public_key: Option<Key>,
    pub listen_port: u16,
    pub peers: Vec<PeerInfo>,
}

fn peer_info(p: &WireguardPeer) -> PeerInfo {
    let mut info = PeerInfo {
        public_key: [0; 32],
        endpoint: None,
        allowed_ips: Vec::new(),
        preshared_key: None,
        keepalive: 0,
        last_handshake_secs: 0,
        rx_bytes: 0,
        tx_bytes: 0,
    };
    for a in &p.0 {
        match a {
            WireguardPeerAttribute::PublicKey(k) => info.public_key = *k,
            WireguardPeerAttribute::PresharedKey(k) => info.preshared_key = (*k != [0; 32]).then_some(Secret(*k)),
            WireguardPeerAttribute::Endpoint(e) => info.endpoint = Some(*e),
            WireguardPeerAttribute::PersistentKeepalive(k) => info.keepalive = *k,
            WireguardPeerAttribute::LastHandshake(t) => info.last_handshake_secs = t.seconds as u64,
            WireguardPeerAttribute::RxBytes(b) => info.rx_bytes = *b,
            WireguardPeerAttribute::TxBytes(b) => info.tx_bytes = *b,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    let (mut addr, mut cidr) = (None, None);
                    for a in &ip.0 {
                        match a {
                            WireguardAllowedIpAttr::IpAddr(x) => addr = Some(*x),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
                            _ => {}
                        }
                    }
                    if let (Some(a), Some(c)) = (addr, cidr) {
                        info.allowed_ips.push((a, c));
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// What the device `name` holds. A device with many peers answers in several messages, each
/// with some of them: they are put together.
pub fn device(name: &str) -> Result<DeviceInfo> {
    let answers = wg_request(&format!("read wireguard device {name}"), WireguardCmd::GetDevice, vec![WireguardAttribute::IfName(name.into())], NLM_F_DUMP)?;
    let mut d = DeviceInfo::default();
    for m in &answers {
        for a in &m.attributes {
            match a {
                WireguardAttribute::PublicKey(k) if *k != [0; 32] => d.public_key = Some(*k),
                WireguardAttribute::ListenPort(p) => d.listen_port = *p,
                WireguardAttribute::Peers(peers) => d.peers.extend(peers.iter().map(peer_info)),
                _ => {}
            }
        }
    }
    // A peer split over two messages comes back twice, its allowed IPs divided: one entry.
    let mut merged: Vec<PeerInfo> = Vec::new();
    for p in d.peers {
        match merged.iter_mut().find(|m| m.public_key == p.public_key) {
            Some(m) => m.allowed_ips.extend(p.allowed_ips),
            None => merged.push(p),
        }
    }
    d.peers = merged;
    Ok(d)
}

/// Give the device `name` its private key and listen port; its peers stay.
pub fn configure(name: &str, private_key: &Secret, listen_port: u16) -> Result<()> {
    wg_request(
        &format!("configure wireguard device {name}"),
        WireguardCmd::SetDevice,
        vec![WireguardAttribute::IfName(name.into()), WireguardAttribute::PrivateKey(private_key.0), WireguardAttribute::ListenPort(listen_port)],
        NLM_F_ACK,
    )
    .map(drop)
}

/// A peer as flannel configures it for a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    /// PublicIP:Port on flannel-wg, [PublicIPv6]:Port on flannel-wg-v6.
    pub endpoint: SocketAddr,
    /// The lease's subnet (IPv4 on flannel-wg, IPv6 on flannel-wg-v6): what the peer may send
    /// from and is sent to.
    pub allowed: ipnet::IpNet,
    /// Its other subnet, where one device carries both families (Modes auto, ipv4, ipv6 with
    /// IPv6): the lease's IPv4 subnet beside its IPv6 one.
    pub also_allowed: Option<ipnet::IpNet>,
    /// The network's `PSK` (none: no preshared key).
    pub preshared_key: Option<Secret>,
    /// `PersistentKeepaliveInterval` in seconds (0: off).
    pub keepalive: u16,
}


/// Add or update a peer: its endpoint, its allowed IPs replaced by the lease's subnet, the
/// preshared key and keepalive (flannel's addPeer).
pub fn set_peer(name: &str, p: &PeerConfig) -> Result<()> {
    let allowed_ip = |n: ipnet::IpNet| {
        let family = match n {
            ipnet::IpNet::V4(_) => WireguardAddressFamily::Ipv4,
            ipnet::IpNet::V6(_) => WireguardAddressFamily::Ipv6,
        };
        WireguardAllowedIp(vec![
            WireguardAllowedIpAttr::Family(family),
            WireguardAllowedIpAttr::IpAddr(n.network()),
            WireguardAllowedIpAttr::Cidr(n.prefix_len()),
        ])
    };
    let allowed: Vec<_> = std::iter::once(p.allowed).chain(p.also_allowed).map(allowed_ip).collect();
    let peer = WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(p.public_key),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::PresharedKey(p.preshared_key.map_or([0; 32], |k| k.0)),
        WireguardPeerAttribute::PersistentKeepalive(p.keepalive),
        WireguardPeerAttribute::Endpoint(p.endpoint),
        WireguardPeerAttribute::AllowedIps(allowed),
    ]);
    wg_request(
        &format!("set wireguard peer {} on {name}", format_key(&p.public_key)),
        WireguardCmd::SetDevice,
        vec![WireguardAttribute::IfName(name.into()), WireguardAttribute::Peers(vec![peer])],
        NLM_F_ACK,
    )
    .map(drop)
}

/// Remove the peer with `public_key` (one already gone is no error: the kernel ignores it).
pub fn remove_peer(name: &str, public_key: &Key) -> Result<()> {
    let peer = WireguardPeer(vec![WireguardPeerAttribute::PublicKey(*public_key), WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)]);
    wg_request(
        &format!("remove wireguard peer {} from {name}", format_key(public_key)),
        WireguardCmd::SetDevice,
        vec![WireguardAttribute::IfName(name.into()), WireguardAttribute::Peers(vec![peer])],
        NLM_F_ACK,
    )
    .map(drop)
}

/// The first IPv4 allowed IP of a peer as a network, if it has exactly one (flannel gives
/// each peer its lease's subnet and nothing else).
pub fn single_ipv4_allowed(p: &PeerInfo) -> Option<Ipv4Net> {
    match p.allowed_ips.as_slice() {
        [(IpAddr::V4(a), len)] => Ipv4Net::new(*a, *len).ok().map(|n| n.trunc()),
        _ => None,
    }
}

/// The IPv4 endpoint of a peer.
pub fn ipv4_endpoint(p: &PeerInfo) -> Option<SocketAddrV4> {
    match p.endpoint {
        Some(SocketAddr::V4(e)) => Some(e),
        _ => None,
    }
}

/// An unspecified IPv4 socket address (a peer with no usable endpoint).
pub const NO_ENDPOINT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_in_wireguards_form_and_bad_ones_say_why() {
        // `wg genkey` output (a clamped private key) and the public key `wg pubkey` gives.
        let k = parse_key("YA4LzKwlZ2NVe5pMsrdvUKqjgyEFx2vYrsjTKKu/b3o=\n").unwrap();
        assert_eq!(format_key(&k), "YA4LzKwlZ2NVe5pMsrdvUKqjgyEFx2vYrsjTKKu/b3o=");
        let e = parse_key("not base64!").unwrap_err();
        assert!(e.contains("not base64"), "{e}");
        let e = parse_key("AAAA").unwrap_err();
        assert!(e.contains("32 bytes") && e.contains("has 3"), "{e}");
        // A near-miss secret (a private key one byte short) is not repeated in the error.
        let short = "YA4LzKwlZ2NVe5pMsrdvUKqjgyEFx2vYrsjTKKu/bw==";
        let e = parse_key(short).unwrap_err();
        assert!(e.contains("has 31") && !e.contains("YA4L"), "{e}");
        let e = parse_key("YA4LzKwlZ2NVe5pMsrdvUKqjgyEFx2vYrsjTKKu/b3o!").unwrap_err();
        assert!(!e.contains("YA4L"), "{e}");
        assert!(parse_key("").is_err());
    }

    #[test]
    fn debug_output_never_shows_a_preshared_key() {
        let psk = [0xabu8; 32];
        let shown = [format_key(&psk), format!("{:?}", psk[0]), "171, 171".to_string()];
        let peer = PeerConfig { public_key: [1; 32], endpoint: "192.0.2.1:51820".parse().unwrap(), allowed: "10.0.1.0/24".parse().unwrap(), also_allowed: None, preshared_key: Some(Secret(psk)), keepalive: 25 };
        let info = PeerInfo { public_key: [1; 32], endpoint: None, allowed_ips: Vec::new(), preshared_key: Some(Secret(psk)), keepalive: 0, last_handshake_secs: 0, rx_bytes: 0, tx_bytes: 0 };
        let cfg = crate::config::WireguardConfig { listen_port: 51820, listen_port_v6: 51821, psk: Some(Secret(psk)), keepalive: 0, mode: crate::config::WireguardMode::Separate };
        for text in [format!("{peer:?}"), format!("{info:?}"), format!("{cfg:?}")] {
            assert!(text.contains("(set)"), "{text}");
            assert!(!text.contains(&shown[0]) && !text.contains(&shown[2]), "{text}");
        }
    }

    #[test]
    fn the_key_file_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("overlay-wgkey-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/wgkey");
        let first = load_or_create_key(&path).unwrap();
        assert_eq!(first[0] & 7, 0, "clamped");
        assert_eq!(first[31] & 0xc0, 0x40, "clamped");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o400);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format_key(&first), "flannel's format: base64, no newline");
        assert_eq!(load_or_create_key(&path).unwrap(), first, "a restart keeps the key");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "garbage").unwrap();
        let e = format!("{:#}", load_or_create_key(&path).unwrap_err());
        assert!(e.contains("not a wireguard private key") && e.contains("wgkey"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage", "a bad key file is never replaced");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(key_file(None), "/run/flannel/wgkey");
        assert_eq!(key_file(Some("/etc/wg/key".into())), "/etc/wg/key");
    }
}
