//! What `overlay-agent status` reports of a node's data plane: its pinned config, which
//! links are attached and how, and whether the kernel's drops are traced.

use std::{
    fs,
    path::Path,
};

use anyhow::Result;
use aya::programs::TcAttachType;
use overlay_common::{prog_names, DataplaneConfig};

use crate::{
    datapath::attach::{self, Guard, TcAttach},
    maps::Maps,
    netdev::{self},
};

use super::*;

/// What `status` reports about a node's data plane.
#[derive(Debug)]
pub struct Status {
    pub config: DataplaneConfig,
    pub device: Option<String>,
    pub underlay: Option<String>,
    pub decap_hook: Option<DecapHook>,
    pub encap_attached: bool,
    pub guard_attached: bool,
    /// How the TC programs are attached (none attached: `None`).
    pub attach: Option<TcAttach>,
    /// How the socket guard runs (`guard_attached` covers both).
    pub guard: Option<Guard>,
    /// Whether a `kfree_skb` program counting into this node's `KERNEL_DROPS` is loaded (it
    /// lives as long as the agent that attached it).
    pub kernel_drops_traced: bool,
}

impl Status {
    pub fn is_up(&self) -> bool {
        self.config.is_ready() && (self.encap_attached || self.kernel_encapsulates()) && self.guard_attached && self.decap_hook.is_some()
    }

    /// Whether a kernel device encapsulates (an IPv6-only node's flannel-v6, an ipip node's
    /// flannel.ipip): no encapsulation program is expected.
    pub fn kernel_encapsulates(&self) -> bool {
        self.is_ipv6_only() || self.config.encap_mode() == Some(overlay_common::EncapMode::Ipip)
    }

    /// An IPv6-only node's data plane (`up_ipv6_only`): no IPv4 address, no encapsulation.
    pub fn is_ipv6_only(&self) -> bool {
        is_ipv6_only(&self.config)
    }
}

/// Whether `config` is an IPv6-only node's (`up_ipv6_only`: no IPv4 underlay address).
pub fn is_ipv6_only(config: &DataplaneConfig) -> bool {
    config.is_ready() && config.underlay_ip == [0; 4]
}

pub fn status(dir: &Path) -> Result<Status> {
    let maps = Maps::open(dir)?;
    let config = maps.config()?;
    // Our cls_bpf filters (attached where the kernel has no TCX) have no pins: asked of the
    // interfaces' hooks.
    let legacy_decap = attach::legacy_attached(config.underlay_ifindex, TcAttachType::Ingress, prog_names::TC_INGRESS_DECAP);
    let legacy_encap = attach::legacy_attached(config.overlay_ifindex, TcAttachType::Egress, prog_names::TC_EGRESS_ENCAP);
    // A pin says only that the link object exists: it may have been detached (bpftool link
    // detach) or its device or namespace may be gone. Asked of the kernel: attached, and to
    // the interface (or namespace) this node's configuration names.
    let linked = |pin: &str, target: u32| attach::pinned_link_target(&dir.join(pin)).ok().flatten() == Some(target);
    let decap_tc_linked = linked(LINK_DECAP_TC, config.underlay_ifindex);
    let decap_hook = if linked(LINK_DECAP_XDP, config.underlay_ifindex) {
        Some(DecapHook::Xdp)
    } else if decap_tc_linked || legacy_decap {
        Some(DecapHook::Tc)
    } else {
        None
    };
    let encap_linked = linked(LINK_ENCAP, config.overlay_ifindex);
    let tcx_pins = encap_linked || decap_tc_linked;
    // The guard's program has a pin; its firewall form is asked of the firewall.
    let netns = fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32).unwrap_or(0);
    let guard = if netns != 0 && linked(LINK_GUARD, netns) {
        Some(Guard::SkLookup)
    } else if crate::iptables::guard_present() || crate::nftables::guard_present() {
        Some(Guard::Firewall)
    } else {
        None
    };
    let attach = if legacy_decap || legacy_encap {
        Some(TcAttach::Legacy)
    } else if tcx_pins {
        Some(TcAttach::Tcx)
    } else {
        None
    };
    // An IPv6-only node's one device is flannel-v6's.
    let device = match is_ipv6_only(&config) {
        true => Some(crate::datapath::ipv6::device_name(config.vni)).filter(|d| netdev::link(d).ok().flatten().is_some()),
        false => netdev::name_of(config.overlay_ifindex),
    };
    Ok(Status {
        kernel_drops_traced: crate::datapath::kernel_drops::traced(dir),
        device,
        underlay: netdev::name_of(config.underlay_ifindex),
        encap_attached: encap_linked || legacy_encap,
        guard_attached: guard.is_some(),
        guard,
        decap_hook,
        attach,
        config,
    })
}

/// The programs this node runs, by name and kernel id: those behind its pinned links that are
/// still attached, and its cls_bpf filters (kernels without TCX) on the interfaces `config`
/// names. For their run statistics.
pub fn running_programs(dir: &Path, config: &DataplaneConfig) -> Vec<(&'static str, u32)> {
    let mut out = Vec::new();
    for (pin, name) in [
        (LINK_ENCAP, prog_names::TC_EGRESS_ENCAP),
        (LINK_DECAP_TC, prog_names::TC_INGRESS_DECAP),
        (LINK_DECAP_XDP, prog_names::XDP_DECAP),
        (LINK_GUARD, prog_names::SK_LOOKUP_GUARD),
    ] {
        if let Ok((id, Some(_))) = attach::pinned_link_info(&dir.join(pin)) {
            out.push((name, id));
        }
    }
    for (ifindex, at, name) in [
        (config.underlay_ifindex, TcAttachType::Ingress, prog_names::TC_INGRESS_DECAP),
        (config.overlay_ifindex, TcAttachType::Egress, prog_names::TC_EGRESS_ENCAP),
    ] {
        out.extend(attach::legacy_program_ids(ifindex, at, name).into_iter().map(|id| (name, id)));
    }
    out
}
