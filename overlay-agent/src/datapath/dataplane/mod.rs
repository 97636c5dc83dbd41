//! Bringing a node's data plane up and down: the overlay device, the programs, their links
//! and pins, and the route that sends the overlay network to the device.
//!
//! Design notes: everything the kernel needs to keep forwarding lives in bpffs under the
//! node's pin directory (maps by name, links as `link_*`), so the agent process holds no
//! state the data plane depends on. Maps are loaded with `map_pin_path`: when a pin exists,
//! aya reuses that map, so a restarted agent keeps routes and counters. TC links are attached
//! before the previous pin is removed (TCX runs both for a moment, the old one first); native
//! XDP allows one program, so its old link goes first.

mod links;
mod status;
mod teardown;

use self::links::*;
pub use self::{links::retire_guard_program, status::*, teardown::*};

use std::{
    fs,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, Map, MapData},
    programs::{
        links::FdLink,
        LinkOrder, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use ipnet::Ipv4Net;
use overlay_common::{config_flags, map_names, prog_names, Counter, DataplaneConfig, EncapMode, MAP_LAYOUTS};

use crate::{
    datapath::attach::{self, Guard, GuardChoice, TcAttach, TcAttachChoice},
    maps::Maps,
    netdev::{self, Link},
};

/// The object built from `overlay-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay-ebpf"));

/// The eBPF object this agent carries (empty when built with `AYA_BUILD_SKIP=1`): for tools
/// and the programs' unit tests, which load it without pinning or attaching anything.
pub fn ebpf_object() -> &'static [u8] {
    EBPF_OBJECT
}

pub const LINK_ENCAP: &str = "link_encap";
pub const LINK_DECAP_TC: &str = "link_decap_tc";
pub const LINK_DECAP_XDP: &str = "link_decap_xdp";
pub const LINK_GUARD: &str = "link_guard";
/// flannel's ipip device.
pub const IPIP_DEVICE: &str = crate::datapath::ipip::DEVICE;

/// Where decapsulation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapHook {
    /// Native XDP, only when asked for: it runs before GRO and skb allocation, but attaching
    /// it degrades the whole NIC on common drivers (virtio_net turns the guest offloads off:
    /// LRO and receive checksum, for every packet the node receives; on veth it turns off
    /// GSO on the peer).
    Xdp,
    /// TC ingress on the underlay (TCX, or a cls_bpf filter on kernels without TCX).
    Tc,
    /// TC on every underlay: XDP only checks frames here (the kernel's vxlan device
    /// decapsulates after GRO either way), so it never pays for what XDP costs a NIC.
    Auto,
}

impl std::fmt::Display for DecapHook {
    /// As the flag spells it (`xdp`, `tc`, `auto`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecapHook::Xdp => "xdp",
            DecapHook::Tc => "tc",
            DecapHook::Auto => "auto",
        })
    }
}

/// Which inner sources a peer's tunnel frames may carry (see `--inner-source-check`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum InnerSourceCheck {
    /// Only an address in a subnet the sending peer leases: no node can speak for another
    /// node's containers.
    #[default]
    Strict,
    /// Any address, from a known peer (as a stock flannel node takes frames): traffic from
    /// clients routed through a peer, or from a peer's host processes bound to another address.
    Peer,
}

impl InnerSourceCheck {
    fn flags(self) -> u16 {
        match self {
            InnerSourceCheck::Strict => 0,
            InnerSourceCheck::Peer => config_flags::ANY_INNER_SOURCE,
        }
    }
}

/// How checked tunnel frames reach local containers (see `--decap-delivery`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapDelivery {
    /// The kernel's vxlan device decapsulates (vxlan; the udp backend falls back to `stack`).
    Kernel,
    /// Decapsulated by our program and handed to the overlay device's ingress (TC).
    Stack,
    /// Retired (taken as `kernel`, with a warning): frames GRO merged went to the kernel's
    /// vxlan device and the rest through our program, two paths that could reorder a flow
    /// (CE-marked frames diverged exactly under congestion), and it was never shown faster.
    #[value(hide = true)]
    Split,
}

impl DecapDelivery {
    /// What the data plane runs for this choice: the retired `split` runs `kernel`.
    pub fn effective(self) -> Self {
        match self {
            DecapDelivery::Split => {
                tracing::warn!(
                    "--decap-delivery split is retired (two receive paths could reorder a flow): running `kernel`, \
                     the default; drop the flag"
                );
                DecapDelivery::Kernel
            }
            d => d,
        }
    }
}

/// Everything needed to bring one node's data plane up.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub iface: String,
    /// The address announced in the lease (flannel's PublicIP): where peers send.
    pub public_ip: Ipv4Addr,
    /// Where this node's tunnel ends on the underlay interface: the vxlan device's `local`,
    /// the outer source of what it sends, the destination decap and the guard accept. The
    /// public address when the interface has it, else the interface's own (1:1 NAT).
    pub underlay_ip: Ipv4Addr,
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    pub mode: EncapMode,
    pub vni: u32,
    pub port: u16,
    pub device: String,
    pub decap_hook: DecapHook,
    pub bpffs_dir: PathBuf,
    /// The MTU asked for: an overlay MTU (`--mtu`, static mode) or, as flannel reads
    /// `Backend.MTU`, the underlay MTU to assume. Default: the underlay device's MTU, less the
    /// encapsulation overhead for the overlay.
    pub mtu: Option<MtuAsked>,
    /// How decapsulated packets reach containers.
    pub delivery: DecapDelivery,
    /// Which inner sources a peer's frames may carry.
    pub inner_source: InnerSourceCheck,
    /// The peers a stock flanneld left on the device, found when it was first prepared
    /// (`prepare_device`), for `up` to put into empty maps.
    pub flannel_peers: Vec<FlannelPeer>,
    /// Capacity of the route map (remote subnets) and of the peer map (remote nodes).
    pub max_routes: u32,
    pub max_peers: u32,
    /// How TC programs are attached (TCX where the kernel has it, unless forced).
    pub tc_attach: TcAttachChoice,
    /// How the socket guard runs (the program where it loads, unless forced).
    pub guard: GuardChoice,
}

/// A node whose data plane is up.
pub struct Dataplane {
    pub maps: Maps,
    pub device: Link,
    pub underlay: Link,
    /// The hook decapsulation ended up on (`Auto` resolved).
    pub decap_hook: DecapHook,
    /// How the TC programs were attached.
    pub attach: TcAttach,
    /// How tunnel datagrams not from the underlay are kept from the kernel's vxlan socket
    /// (with `Firewall`, the daemon keeps the rule with its other rules).
    pub guard: Guard,
    pub mtu: u32,
    /// Keeps the loaded objects (and aya-log's map) alive while the agent runs.
    pub ebpf: Ebpf,
    /// udp: the tunnel port's socket, held so that a router's fragmentation-needed about our
    /// datagrams finds one and the kernel records the path MTU (which the encap program's
    /// route lookup then sees). It takes no data: the programs handle every tunnel datagram.
    pub pmtu_socket: Option<std::net::UdpSocket>,
    /// Whether the kernel's own drops on the underlay and the overlay device are traced
    /// (`kernel_drops`): observability, so the data plane runs without it where it cannot be.
    pub kernel_drops: crate::datapath::kernel_drops::DropTrace,
}

/// A socket on `addr:port` that receives nothing (a filter drops every datagram before it is
/// queued) but lets ICMP errors about datagrams sent from that port update the path MTU.
/// Where it cannot be had (the port taken), a warning: DF packets larger than a smaller path
/// MTU are then lost, as before.
fn pmtu_socket(addr: std::net::Ipv4Addr, port: u16) -> Option<std::net::UdpSocket> {
    use socket2::{Domain, SockFilter, Socket, Type};
    let held = || -> std::io::Result<Socket> {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
        // A data plane brought up again (a new subnet or address) binds before the old one
        // lets go.
        sock.set_reuse_port(true)?;
        // Classic BPF `ret #0`: every datagram dropped before it is queued.
        sock.attach_filter(&[SockFilter::new(0x06, 0, 0, 0)])?;
        sock.bind(&std::net::SocketAddr::from((addr, port)).into())?;
        Ok(sock)
    };
    match held() {
        Ok(sock) => Some(sock.into()),
        Err(e) => {
            tracing::warn!(%addr, port, error = %e, "cannot hold the udp tunnel port: the path MTU is not learnt from routers' fragmentation-needed");
            None
        }
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// What the kernel cannot do for the data plane (no BTF, no bpffs, a verifier that refuses a
/// program: a helper or feature it lacks), as opposed to a setting or a conflict an operator
/// can fix. The daemon runs a vxlan node degraded on these, and refuses on anything else.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

/// A program the kernel's verifier would not take: the kernel lacks what it needs.
pub fn verifier_refused(name: &str) -> Unsupported {
    Unsupported(format!("the kernel's verifier refused {name}"))
}

/// Whether `e` says the kernel cannot run the data plane (`Unsupported` anywhere in it).
pub fn is_unsupported(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unsupported>()) || e.downcast_ref::<Unsupported>().is_some()
}

/// The kernel's BTF, which the programs' maps and relocations need.
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Create the pin directory (root-only: maps hold the network's topology) on a bpffs, after
/// checking what the programs need before anything is loaded: one line says what is missing.
fn prepare_pin_dir(dir: &Path) -> Result<()> {
    if !Path::new(KERNEL_BTF).exists() {
        return Err(Unsupported(format!(
            "this kernel has no BTF ({KERNEL_BTF} is missing; it is built with CONFIG_DEBUG_INFO_BTF=y), which the eBPF programs need"
        ))
        .into());
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && !is_bpffs(dir) {
        return Err(Unsupported(format!(
            "{} is not on a bpf filesystem; mount one with `mount -t bpf bpf /sys/fs/bpf` (or run `cargo xtask setup`)",
            parent.display()
        ))
        .into());
    }
    fs::create_dir_all(dir).with_context(|| format!("creating pin directory {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to root", dir.display()))?;
    Ok(())
}

/// Pin `link` at `path`, replacing (and so detaching) whatever link was pinned there.
fn pin_link(link: FdLink, path: &Path) -> Result<()> {
    remove_pin(path)?;
    link.pin(path).with_context(|| format!("pinning link at {}", path.display()))?;
    Ok(())
}

fn remove_pin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing pin {}", path.display())),
    }
}

fn overlay_peer_name(device: &str) -> String {
    let mut peer = format!("{device}-p");
    peer.truncate(15);
    peer
}

/// Where an asked-for MTU comes from, which says what it measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtuAsked {
    /// `--mtu` (static mode): the overlay device's MTU itself.
    Overlay(u32),
    /// flannel's `Backend.MTU`: the MTU of the underlay, as flannel reads it (its vxlan backend
    /// gives the device and FLANNEL_MTU this less 50, whatever the interface says).
    Underlay(u32),
}

/// The overlay MTU: the one asked for (`--mtu`), or the underlay's (`Backend.MTU`, else the
/// underlay device's) minus the encapsulation overhead. Refused when an encapsulated packet
/// of that size could not leave through the underlay: every full-sized packet would be lost
/// (flannel accepts it and drops them later, one by one).
pub fn overlay_mtu(asked: Option<MtuAsked>, mode: EncapMode, underlay: &str, underlay_mtu: u32) -> Result<u32> {
    const MIN_IPV4_MTU: u32 = 68;
    let overhead = mode.overhead() as u32;
    let most = underlay_mtu.saturating_sub(overhead);
    let mode_name = match mode {
        EncapMode::Vxlan => "vxlan",
        EncapMode::Udp => "udp",
        EncapMode::Ipip => "ipip",
    };
    let asked = match asked {
        None => None,
        Some(MtuAsked::Overlay(m)) => Some(m),
        Some(MtuAsked::Underlay(m)) if m > underlay_mtu => bail!(
            "Backend.MTU {m} is larger than {underlay}'s MTU ({underlay_mtu}): flannel reads Backend.MTU as the \
             underlay's MTU, and encapsulated packets of {m} bytes could not leave {underlay}; use at most \
             {underlay_mtu}, or leave it unset"
        ),
        Some(MtuAsked::Underlay(m)) if m.saturating_sub(overhead) < MIN_IPV4_MTU => bail!(
            "Backend.MTU {m} leaves {} bytes for packets after the {overhead} bytes of {mode_name} encapsulation, \
             less than IPv4's minimum of {MIN_IPV4_MTU}",
            m.saturating_sub(overhead)
        ),
        Some(MtuAsked::Underlay(m)) => Some(m - overhead),
    };
    if most < MIN_IPV4_MTU {
        bail!(
            "the MTU of {underlay} ({underlay_mtu}) leaves {most} bytes for packets after the {overhead} bytes of \
             {mode_name} encapsulation, less than IPv4's minimum of {MIN_IPV4_MTU}"
        );
    }
    match asked {
        None => Ok(most),
        Some(m) if m < MIN_IPV4_MTU => bail!("an overlay MTU of {m} (--mtu) is below IPv4's minimum of {MIN_IPV4_MTU}"),
        Some(m) if m > most => bail!(
            "an overlay MTU of {m} (--mtu) does not fit {underlay}: with the {overhead} bytes of \
             {mode_name} encapsulation its packets would be {} bytes and {underlay}'s MTU is {underlay_mtu}; \
             use at most {most}, or leave it unset",
            m + overhead
        ),
        Some(m) => Ok(m),
    }
}

/// The overlay device as the spec wants it (created or kept), its MTU, and the underlay.
/// Called before a lease is claimed: the device's MAC is the VtepMAC the lease announces.
pub fn prepare_device(spec: &NodeSpec) -> Result<(Link, Link, u32, Vec<FlannelPeer>)> {
    let underlay = netdev::require_link(&spec.iface)?;
    let mtu = overlay_mtu(spec.mtu, spec.mode, &underlay.name, underlay.mtu)?;
    // The peers a stock flanneld left on its device, read before the device is configured
    // (turning ARP off on it flushes its neighbour entries, permanent ones included).
    let flannel_peers = match spec.mode {
        EncapMode::Vxlan if netdev::link(&spec.device)?.is_some() => netdev::flannel_peers(&spec.device).unwrap_or_else(|e| {
            tracing::warn!(error = %e, device = %spec.device, "reading the peers flanneld left on the device");
            Vec::new()
        }),
        // flanneld's ipip routes: each peer's subnet via its address through flannel.ipip.
        EncapMode::Ipip if netdev::link(&spec.device)?.is_some() => match netdev::peer_routes(&spec.device) {
            Ok(routes) => routes.into_iter().map(|(subnet, via)| (subnet, via, [0; 6])).collect(),
            Err(e) => {
                tracing::warn!(error = %e, device = %spec.device, "reading the peers flanneld left on the device");
                Vec::new()
            }
        },
        _ => Vec::new(),
    };
    match spec.mode {
        EncapMode::Vxlan => {
            netdev::ensure_vxlan(&spec.device, spec.vni, spec.port, spec.underlay_ip, &spec.iface)?;
        }
        EncapMode::Udp => {
            netdev::ensure_veth(&spec.device, &overlay_peer_name(&spec.device))?;
        }
        EncapMode::Ipip => {
            netdev::ensure_ipip(&spec.device, spec.underlay_ip)?;
        }
    }
    netdev::configure_up(&spec.device, Some(mtu))?;
    let device = netdev::require_link(&spec.device)?;
    retire_other_backends(spec)?;
    Ok((underlay, device, mtu, flannel_peers))
}

/// The devices of flannel's other backends on this node (a run before the network config
/// changed its `Backend.Type`) go: one left up would go on taking its tunnel's packets with
/// no check in front of it (the programs check only the backend the node runs), and a
/// vxlan device's network route would shadow the per-lease routes of ipip.
pub fn retire_other_backends(spec: &NodeSpec) -> Result<()> {
    for (mode, name, kind) in [
        (EncapMode::Vxlan, format!("flannel.{}", spec.vni), "vxlan"),
        (EncapMode::Ipip, IPIP_DEVICE.to_string(), "ipip"),
        (EncapMode::Udp, "flannel0".to_string(), "veth"),
        (EncapMode::Udp, crate::wireguard::DEVICE.to_string(), "wireguard"),
        (EncapMode::Udp, crate::wireguard::DEVICE_V6.to_string(), "wireguard"),
    ] {
        let wireguard_node = spec.device == crate::wireguard::DEVICE || spec.device == crate::wireguard::DEVICE_V6;
        if name == spec.device || (mode == spec.mode && !wireguard_node && kind != "wireguard") {
            continue;
        }
        // A wireguard node keeps flannel-wg-v6 here: its IPv6 side, made before this runs
        // (the bring-up removes it where the network has no IPv6).
        if spec.device == crate::wireguard::DEVICE && kind == "wireguard" {
            continue;
        }
        if netdev::link(&name)?.is_some_and(|l| l.kind.as_deref() == Some(kind)) {
            tracing::warn!(device = %name, backend = ?spec.mode, "removing the device of the backend a previous run used");
            netdev::delete_link(&name)?;
        }
    }
    Ok(())
}

/// A peer a stock flanneld left on its device: (subnet, public IP, VtepMAC).
pub type FlannelPeer = (Ipv4Net, Ipv4Addr, [u8; 6]);

/// Bring the node's data plane up (idempotent: an existing device, maps and links are
/// reused or replaced in place).
pub fn up(spec: &NodeSpec) -> Result<Dataplane> {
    prepare_pin_dir(&spec.bpffs_dir)?;
    let (underlay, device, mtu, found) = prepare_device(spec)?;
    // Those the daemon found when it first prepared the device (for its MAC), else these.
    let flannel_peers = if spec.flannel_peers.is_empty() { found } else { spec.flannel_peers.clone() };
    netdev::set_device_address(&spec.device, spec.subnet.network())?;
    let (mut ebpf, mut maps, previous) = load(spec)?;
    maps.set_config(&DataplaneConfig {
        mode: spec.mode as u32,
        vni: spec.vni,
        port: spec.port,
        flags: config_flags::READY | delivery_flags(spec.delivery, spec.mode) | spec.inner_source.flags(),
        underlay_ifindex: underlay.ifindex,
        overlay_ifindex: device.ifindex,
        underlay_ip: spec.underlay_ip.octets(),
        local_subnet: spec.subnet.network().octets(),
        local_prefix_len: spec.subnet.prefix_len() as u32,
        vtep_mac: device.mac,
        _pad: [0; 2],
    })?;

    // Taking over from flanneld (its device kept, our maps empty): the peers it left on the
    // device go into the maps before any program is attached, so that neither decap (which
    // drops frames from senders not in the peer map) nor encap (no route) stops the traffic
    // flowing through the device while the agent first reads etcd; that reconcile corrects them.
    if !flannel_peers.is_empty() && maps.routes()?.is_empty() {
        adopt_flannel_peers(&mut maps, &spec.device, flannel_peers);
    }

    // The drop tracer before the links: once `status` sees the programs attached, it is too.
    let kernel_drops = crate::datapath::kernel_drops::attach(&mut ebpf, &[underlay.ifindex, device.ifindex]);

    let same_device = previous.is_some_and(|c| c.overlay_ifindex == device.ifindex);
    let same_underlay = previous.is_some_and(|c| c.underlay_ifindex == underlay.ifindex);
    let mech = attach::choose(spec.tc_attach)?;
    let encap_pin = spec.bpffs_dir.join(LINK_ENCAP);
    match mech {
        // ipip: the kernel's flannel.ipip encapsulates; no program on it.
        _ if spec.mode == EncapMode::Ipip => remove_pin(&encap_pin)?,
        TcAttach::Tcx => {
            if !(same_device && adopt_tc(&mut ebpf, prog_names::TC_EGRESS_ENCAP, &encap_pin)) {
                attach_tc(&mut ebpf, prog_names::TC_EGRESS_ENCAP, &spec.device, TcAttachType::Egress, LinkOrder::default())
                    .and_then(|l| pin_link(l, &encap_pin))
                    .context("attaching encapsulation to the overlay device")?;
            }
            // A filter a legacy run left goes once the link runs (both run for a moment).
            attach::detach_legacy(&device, TcAttachType::Egress, prog_names::TC_EGRESS_ENCAP)?;
        }
        TcAttach::Legacy => {
            attach::attach_legacy(&mut ebpf, prog_names::TC_EGRESS_ENCAP, &device, TcAttachType::Egress)
                .context("attaching encapsulation to the overlay device")?;
            remove_pin(&encap_pin)?;
        }
    }

    // Routes kept in the pinned maps from a previous run: the device's entries follow them.
    maps.sync_fdb()?;
    let decap_hook = attach_decap(&mut ebpf, spec, &underlay, same_underlay, mech)?;
    let guard = match spec.mode {
        // IP-in-IP reaches no socket: the guard is the firewall's rule (for protocol 4).
        EncapMode::Ipip => Guard::Firewall,
        _ => guard(&mut ebpf, spec)?,
    };
    // flannel's ipip routes each lease through its device (the peer is the outer
    // destination); the others route the whole network to theirs.
    if spec.mode != EncapMode::Ipip {
        netdev::route_network(spec.network, &spec.device)?;
    }
    let pmtu_socket = (spec.mode == EncapMode::Udp).then(|| pmtu_socket(spec.underlay_ip, spec.port)).flatten();
    Ok(Dataplane { maps, device, underlay, decap_hook, attach: mech, guard, mtu, ebpf, pmtu_socket, kernel_drops })
}

/// Put the peers a stock flanneld left on `device` into empty maps (logged; etcd's listing
/// comes right after and corrects them).
fn adopt_flannel_peers(maps: &mut Maps, device: &str, peers: Vec<FlannelPeer>) {
    let mut adopted = 0;
    for (subnet, public_ip, vtep_mac) in peers {
        match maps.upsert_route(&crate::datapath::maps::Route { subnet, public_ip, vtep_mac, wireguard: None }) {
            Ok(()) => adopted += 1,
            Err(e) => tracing::warn!(error = %e, %subnet, "adopting a peer flanneld left"),
        }
    }
    if adopted > 0 {
        tracing::info!(peers = adopted, %device, "took over the peers flanneld left on the device (etcd's listing follows)");
    }
}

/// An IPv6-only node's data plane: no IPv4 device, no encapsulation program (the kernel's
/// `flannel-v6.<VNI>`, named by `spec.device`, carries the traffic); the decap programs on
/// the underlay and the socket guard check what arrives for it, as on a dual-stack node. The
/// IPv4 side is configured with no address, no subnet and no device (`is_ipv6_only`), so
/// that no IPv4 frame is taken for a tunnel frame of ours (they all pass to the kernel). An
/// encapsulation link a previous IPv4 run left pinned goes.
pub fn up_ipv6_only(spec: &NodeSpec) -> Result<Dataplane> {
    prepare_pin_dir(&spec.bpffs_dir)?;
    let underlay = netdev::require_link(&spec.iface)?;
    let device = netdev::require_link(&spec.device)?;
    let (mut ebpf, mut maps, previous) = load(spec)?;
    maps.set_config(&DataplaneConfig {
        mode: EncapMode::Vxlan as u32,
        vni: spec.vni,
        port: spec.port,
        flags: config_flags::READY | config_flags::KERNEL_DECAP | spec.inner_source.flags(),
        underlay_ifindex: underlay.ifindex,
        overlay_ifindex: 0,
        underlay_ip: [0; 4],
        local_subnet: [0; 4],
        local_prefix_len: 32,
        vtep_mac: [0; 6],
        _pad: [0; 2],
    })?;
    remove_pin(&spec.bpffs_dir.join(LINK_ENCAP))?;
    let same_underlay = previous.is_some_and(|c| c.underlay_ifindex == underlay.ifindex);
    let mech = attach::choose(spec.tc_attach)?;
    let kernel_drops = crate::datapath::kernel_drops::attach(&mut ebpf, &[underlay.ifindex, device.ifindex]);
    let decap_hook = attach_decap(&mut ebpf, spec, &underlay, same_underlay, mech)?;
    let guard = guard(&mut ebpf, spec)?;
    Ok(Dataplane { maps, mtu: device.mtu, device, underlay, decap_hook, attach: mech, guard, ebpf, pmtu_socket: None, kernel_drops })
}

/// Load the programs with their maps pinned under the node's directory (reusing the pins of
/// this build's layout), and what configuration a previous run left (for adopting its links).
fn load(spec: &NodeSpec) -> Result<(Ebpf, Maps, Option<DataplaneConfig>)> {
    if EBPF_OBJECT.is_empty() {
        bail!("this agent was built with AYA_BUILD_SKIP=1 and carries no eBPF programs; build it with `cargo xtask build`");
    }
    for retired in map_names::RETIRED {
        remove_pin(&spec.bpffs_dir.join(retired))?;
    }
    // What the pinned links were attached to, if a previous run left them; then every pin
    // of another layout goes, so that the loader reuses only maps this build can read.
    let previous = take_over_pins(&spec.bpffs_dir)?;
    // An older version's counter map may have fewer slots than there are counters now: it is
    // statistics only, so a fresh one replaces it rather than the new counters going missing.
    let counters_pin = spec.bpffs_dir.join(map_names::COUNTERS);
    if let Ok(info) = aya::maps::MapInfo::from_pin(&counters_pin) {
        if info.max_entries() < Counter::COUNT as u32 {
            tracing::warn!(
                slots = info.max_entries(),
                counters = Counter::COUNT,
                "the pinned counter map is from an older version; counting starts again from zero"
            );
            remove_pin(&counters_pin)?;
        }
    }
    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> =
        map_names::ALL.iter().map(|m| (*m, spec.bpffs_dir.join(m))).collect();
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader.map_max_entries(map_names::VTEP_BY_SUBNET, spec.max_routes);
    loader.map_max_entries(map_names::PEER_STATS, spec.max_peers);
    loader.map_max_entries(map_names::VTEP6_BY_SUBNET, spec.max_routes);
    loader.map_max_entries(map_names::PEER6_STATS, spec.max_peers);
    let mut ebpf = loader.load(EBPF_OBJECT).context(
        "loading the eBPF programs failed (root, a kernel with BTF and TCX are needed; \
         if the maps' layout or --max-routes/--max-peers changed, run `overlay-agent teardown` first)",
    )?;
    let maps = Maps::take(&mut ebpf)?.lock_changes_in(&spec.bpffs_dir);
    Ok((ebpf, maps, previous))
}

/// The layout versions the pins in `dir` were made with, as `MAP_LAYOUTS` is ordered: those
/// the `LAYOUTS` map records (0 for a map it does not know), or, for pins from before layouts
/// were recorded, version 1 for every map.
fn pinned_layouts(dir: &Path) -> Vec<u32> {
    let recorded = MapData::from_pin(dir.join(map_names::LAYOUTS))
        .ok()
        .and_then(|d| Array::<MapData, u32>::try_from(Map::Array(d)).ok());
    match recorded {
        Some(a) => (0..map_names::ALL.len() as u32).map(|i| a.get(&i, 0).unwrap_or(0)).collect(),
        None => vec![1; map_names::ALL.len()],
    }
}

/// Before the loader reuses pins by name: read the configuration a previous run left (for
/// adopting its links; version 1 had one slot, version 2 two), then remove every pinned map
/// whose layout is not this build's, logged, so that it is made afresh. Routes and peers come
/// back from etcd at the first reconcile (with static routes, add them again); counters
/// start from zero.
fn take_over_pins(dir: &Path) -> Result<Option<DataplaneConfig>> {
    let layouts = pinned_layouts(dir);
    let index = |name: &str| map_names::ALL.iter().position(|m| *m == name).expect("a known map");
    let slot = match layouts[index(map_names::DP_CONFIG)] {
        2 => MapData::from_pin(dir.join(map_names::CONFIG_SLOT))
            .ok()
            .and_then(|d| Array::<MapData, u32>::try_from(Map::Array(d)).ok())
            .and_then(|a| a.get(&0, 0).ok())
            .unwrap_or(0)
            & 1,
        _ => 0,
    };
    let previous = MapData::from_pin(dir.join(map_names::DP_CONFIG))
        .ok()
        .and_then(|d| Array::<MapData, DataplaneConfig>::try_from(Map::Array(d)).ok())
        .and_then(|a| a.get(&slot, 0).ok())
        .filter(|c| c.is_ready());
    for (i, name) in map_names::ALL.iter().enumerate() {
        let pin = dir.join(name);
        if pin.exists() && layouts[i] != MAP_LAYOUTS[i] {
            tracing::warn!(
                map = name,
                pinned = layouts[i],
                this_build = MAP_LAYOUTS[i],
                "a pinned map has another layout than this version's; it is made afresh"
            );
            remove_pin(&pin)?;
        }
    }
    Ok(previous)
}

/// The config flags for `delivery`: the kernel's vxlan device can decapsulate only vxlan, so
/// the udp backend decapsulates itself (the stack path) when asked for `kernel`.
fn delivery_flags(delivery: DecapDelivery, mode: EncapMode) -> u16 {
    match (delivery, mode) {
        // Only the kernel's flannel.ipip opens IP-in-IP here.
        (_, EncapMode::Ipip) => config_flags::KERNEL_DECAP,
        (DecapDelivery::Kernel | DecapDelivery::Split, EncapMode::Vxlan) => config_flags::KERNEL_DECAP,
        (_, EncapMode::Udp) | (DecapDelivery::Stack, _) => 0,
    }
}

/// The hook to attach. XDP only checks and hands valid frames to the kernel's vxlan device,
/// so it serves the vxlan backend with `kernel` delivery, and only when asked for: `Auto` is
/// TC on every underlay (native XDP turns a virtio NIC's receive offloads off, and GSO off
/// on a veth's peer, for all of the node's traffic, while the kernel device decapsulates
/// after GRO either way).
pub fn resolve_hook(requested: DecapHook, mode: EncapMode, delivery: DecapDelivery) -> Result<DecapHook> {
    Ok(match requested {
        DecapHook::Auto => DecapHook::Tc,
        DecapHook::Xdp if mode == EncapMode::Udp => bail!(
            "--decap-hook xdp hands checked frames to the kernel's vxlan device, and the udp \
             backend has none: use --decap-hook tc (or auto)"
        ),
        DecapHook::Xdp if delivery == DecapDelivery::Stack && mode == EncapMode::Vxlan => bail!(
            "--decap-hook xdp always leaves decapsulation to the kernel's vxlan device; \
             --decap-delivery {} needs --decap-hook tc",
            format!("{delivery:?}").to_lowercase()
        ),
        h => h,
    })
}

fn attach_decap(ebpf: &mut Ebpf, spec: &NodeSpec, underlay: &Link, same_underlay: bool, mech: TcAttach) -> Result<DecapHook> {
    let dir = &spec.bpffs_dir;
    let want = resolve_hook(spec.decap_hook, spec.mode, spec.delivery)?;
    if want == DecapHook::Tc && mech == TcAttach::Legacy {
        attach::attach_legacy(ebpf, prog_names::TC_INGRESS_DECAP, underlay, TcAttachType::Ingress)
            .context("attaching decapsulation to the underlay")?;
        remove_pin(&dir.join(LINK_DECAP_TC))?;
        remove_pin(&dir.join(LINK_DECAP_XDP))?;
        return Ok(DecapHook::Tc);
    }
    if same_underlay {
        let adopted = match want {
            DecapHook::Xdp => adopt_xdp(ebpf, &dir.join(LINK_DECAP_XDP)).then_some(DecapHook::Xdp),
            _ => adopt_tc(ebpf, prog_names::TC_INGRESS_DECAP, &dir.join(LINK_DECAP_TC)).then_some(DecapHook::Tc),
        };
        if let Some(hook) = adopted {
            remove_pin(&dir.join(if hook == DecapHook::Xdp { LINK_DECAP_TC } else { LINK_DECAP_XDP }))?;
            attach::detach_legacy(underlay, TcAttachType::Ingress, prog_names::TC_INGRESS_DECAP)?;
            return Ok(hook);
        }
    }
    if want == DecapHook::Xdp {
        tracing::info!(
            iface = %spec.iface,
            driver_kind = underlay.kind.as_deref().unwrap_or("physical"),
            "native XDP as asked (--decap-hook xdp): on virtio_net this turns the NIC's receive offloads off, on veth GSO on the peer"
        );
    }
    if want == DecapHook::Xdp {
        remove_pin(&dir.join(LINK_DECAP_XDP))?;
        match attach_xdp(ebpf, &spec.iface) {
            Ok(link) => {
                pin_link(link, &dir.join(LINK_DECAP_XDP))?;
                remove_pin(&dir.join(LINK_DECAP_TC))?;
                attach::detach_legacy(underlay, TcAttachType::Ingress, prog_names::TC_INGRESS_DECAP)?;
                return Ok(DecapHook::Xdp);
            }
            Err(e) => return Err(e),
        }
    }
    // First in the chain: a program ahead of ours that says "ok" would end it, and the kernel
    // would decapsulate the frame without our checks. (That holds at attach time; the daemon
    // logs programs that get ahead later.)
    let link = attach_tc(ebpf, prog_names::TC_INGRESS_DECAP, &spec.iface, TcAttachType::Ingress, LinkOrder::first())
        .context("attaching decapsulation to the underlay")?;
    pin_link(link, &dir.join(LINK_DECAP_TC))?;
    remove_pin(&dir.join(LINK_DECAP_XDP))?;
    attach::detach_legacy(underlay, TcAttachType::Ingress, prog_names::TC_INGRESS_DECAP)?;
    Ok(DecapHook::Tc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_hook_is_never_xdp() {
        let (vx, kernel) = (EncapMode::Vxlan, DecapDelivery::Kernel);
        let hook = |h, mode, delivery| resolve_hook(h, mode, delivery).unwrap();
        for (mode, delivery) in [(vx, kernel), (vx, DecapDelivery::Stack), (vx, DecapDelivery::Split), (EncapMode::Udp, kernel)] {
            assert_eq!(hook(DecapHook::Auto, mode, delivery), DecapHook::Tc, "{mode:?} {delivery:?}");
        }
        assert_eq!(hook(DecapHook::Xdp, vx, kernel), DecapHook::Xdp, "explicit choice wins");
        assert_eq!(hook(DecapHook::Tc, vx, kernel), DecapHook::Tc);
        // XDP leaves decapsulation to the kernel's vxlan device: udp and other deliveries
        // decapsulate in TC.
        let err = resolve_hook(DecapHook::Xdp, EncapMode::Udp, kernel).unwrap_err().to_string();
        assert!(err.contains("udp") && err.contains("--decap-hook tc"), "{err}");
        let err = resolve_hook(DecapHook::Xdp, vx, DecapDelivery::Stack).unwrap_err().to_string();
        assert!(err.contains("--decap-delivery stack") && err.contains("--decap-hook tc"), "{err}");
    }

    #[test]
    fn only_kernel_delivery_of_vxlan_leaves_frames_to_the_kernel_device() {
        use config_flags::KERNEL_DECAP;
        assert_eq!(DecapDelivery::Split.effective(), DecapDelivery::Kernel, "split is retired");
        assert_eq!(delivery_flags(DecapDelivery::Split, EncapMode::Vxlan), KERNEL_DECAP);
        assert_eq!(delivery_flags(DecapDelivery::Kernel, EncapMode::Vxlan), KERNEL_DECAP);
        assert_eq!(delivery_flags(DecapDelivery::Stack, EncapMode::Vxlan), 0);
        for d in [DecapDelivery::Split, DecapDelivery::Kernel, DecapDelivery::Stack] {
            assert_eq!(delivery_flags(d, EncapMode::Udp), 0, "udp has no kernel device: {d:?}");
        }
    }

    #[test]
    fn an_overlay_mtu_that_cannot_leave_the_underlay_is_refused() {
        let (vx, udp) = (EncapMode::Vxlan, EncapMode::Udp);
        use MtuAsked::{Overlay as O, Underlay as U};
        assert_eq!(overlay_mtu(None, vx, "eth0", 1500).unwrap(), 1450);
        assert_eq!(overlay_mtu(None, udp, "eth0", 1500).unwrap(), 1472);
        assert_eq!(overlay_mtu(Some(O(1450)), vx, "eth0", 1500).unwrap(), 1450);
        assert_eq!(overlay_mtu(Some(O(1400)), vx, "eth0", 1500).unwrap(), 1400, "smaller is allowed");
        assert_eq!(overlay_mtu(Some(O(8950)), vx, "eth0", 9000).unwrap(), 8950, "jumbo underlay");
        // Backend.MTU, as flannel reads it: the underlay's MTU, less 50 for the overlay.
        assert_eq!(overlay_mtu(Some(U(1500)), vx, "eth0", 1500).unwrap(), 1450, "flannel's MTU 1500 on a 1500-byte underlay");
        assert_eq!(overlay_mtu(Some(U(1400)), vx, "eth0", 1500).unwrap(), 1350, "a narrower path than the link");
        assert_eq!(overlay_mtu(Some(U(9000)), vx, "eth0", 9000).unwrap(), 8950);
        let err = overlay_mtu(Some(U(9000)), vx, "eth0", 1500).unwrap_err().to_string();
        assert!(err.contains("Backend.MTU 9000 is larger than eth0's MTU (1500)"), "{err}");
        let err = overlay_mtu(Some(U(100)), vx, "eth0", 1500).unwrap_err().to_string();
        assert!(err.contains("Backend.MTU 100 leaves 50 bytes"), "{err}");
        let err = overlay_mtu(Some(O(1480)), vx, "eth0", 1500).unwrap_err().to_string();
        assert!(err.contains("1480") && err.contains("1530") && err.contains("at most 1450") && err.contains("eth0"), "{err}");
        let err = overlay_mtu(Some(O(1473)), udp, "eth0", 1500).unwrap_err().to_string();
        assert!(err.contains("at most 1472"), "{err}");
        let err = overlay_mtu(Some(O(60)), vx, "eth0", 1500).unwrap_err().to_string();
        assert!(err.contains("minimum of 68"), "{err}");
        let err = overlay_mtu(None, vx, "eth0", 100).unwrap_err().to_string();
        assert!(err.contains("leaves 50 bytes"), "{err}");
    }

    #[test]
    fn udp_overlay_peer_name_fits_ifnamsiz() {
        assert_eq!(overlay_peer_name("flannel0"), "flannel0-p");
        assert!(overlay_peer_name("a-very-long-devname").len() <= 15);
    }
}

#[cfg(test)]
mod unsupported_tests {
    use super::*;

    /// Only what the kernel cannot do degrades a node: found under any context, from a
    /// context or a source; any other error refuses.
    #[test]
    fn unsupported_is_found_wherever_it_sits() {
        let as_context: anyhow::Error = Err::<(), _>(std::io::Error::other("EINVAL")).context(verifier_refused("xdp_decap")).unwrap_err();
        assert!(is_unsupported(&as_context.context("bringing the data plane up").context("starting")));
        let as_root = anyhow::Error::from(Unsupported("no BTF".into())).context("preparing");
        assert!(is_unsupported(&as_root));
        assert!(!is_unsupported(&anyhow::anyhow!("attaching to eth0: File exists").context("starting")));
    }
}
