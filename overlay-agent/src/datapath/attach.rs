//! How the TC programs get onto interfaces, on every kernel flannel's users run.
//!
//! With TCX (Linux 6.6 and later): bpf links, pinned under the node's bpffs directory; they
//! outlive the agent, and a restart puts the new program into the pinned link atomically.
//! Without (Debian 12's 6.1, Ubuntu 22.04's 5.15, RHEL 9's 5.14): a cls_bpf filter in
//! direct-action mode under the interface's clsact qdisc, at a fixed priority and handle.
//! Such a filter belongs to the qdisc, so it outlives the agent too; a restart (or an
//! upgrade, or a start after a SIGKILL) replaces the program in the filter in place (netlink
//! RTM_NEWTFILTER on our priority and handle without NLM_F_CREATE: no moment without a
//! program). Ours are found by name at our priority and handle; nobody else's filter, and
//! nobody else's use of the qdisc, is touched. On TCX kernels every TCX program runs before
//! any such filter.
//!
//! aya 0.14's traps, read from its source: a link it holds detaches the filter when dropped
//! (so a taken link is forgotten, never dropped), and its fresh netlink attach creates
//! exclusively (so an existing filter is replaced through `attach_to_link` instead).

use std::{
    ffi::CString,
    fmt,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use aya::{
    programs::{
        links::Link as _,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        SchedClassifier, TcAttachType,
    },
    Ebpf,
};

use crate::{host::tc, netdev::Link};

/// The mechanism TC programs are attached with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcAttach {
    /// TCX bpf links (Linux 6.6+).
    Tcx,
    /// cls_bpf filters under clsact (every kernel since 4.5).
    Legacy,
}

impl fmt::Display for TcAttach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcAttach::Tcx => "tcx",
            TcAttach::Legacy => "tc-legacy",
        })
    }
}

/// What the operator asked for (`--tc-attach`, hidden: for tests of the legacy path on
/// kernels that have TCX).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttachChoice {
    /// TCX where the kernel has it, else cls_bpf filters.
    #[default]
    Auto,
    Tcx,
    Legacy,
}

/// How tunnel datagrams that did not come from the underlay are kept from the kernel's vxlan
/// socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    /// The sk_lookup program (needs `ingress_ifindex` in its context: Linux 5.17).
    SkLookup,
    /// The same rule in the host's firewall (iptables or nftables, with our other rules):
    /// UDP to the tunnel port dropped unless it came in on the underlay to our address.
    Firewall,
}

impl fmt::Display for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Guard::SkLookup => "sk_lookup",
            Guard::Firewall => "firewall",
        })
    }
}

/// What the operator asked for (`--guard`, hidden: for tests of the firewall path on kernels
/// where the program runs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GuardChoice {
    /// The program where it loads, else the firewall rule.
    #[default]
    Auto,
    #[value(name = "sk-lookup")]
    SkLookup,
    Firewall,
}

/// Whether this kernel has TCX: a query of the loopback's TCX ingress programs (which changes
/// nothing) works only where it does. A probe, not a version comparison: distributions
/// backport.
pub fn tcx_supported() -> bool {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress).is_ok()
}

/// The mechanism to use.
pub fn choose(choice: TcAttachChoice) -> Result<TcAttach> {
    Ok(match choice {
        TcAttachChoice::Auto if tcx_supported() => TcAttach::Tcx,
        TcAttachChoice::Auto | TcAttachChoice::Legacy => TcAttach::Legacy,
        TcAttachChoice::Tcx if tcx_supported() => TcAttach::Tcx,
        TcAttachChoice::Tcx => bail!("--tc-attach tcx: this kernel has no TCX (Linux 6.6); leave it at auto for cls_bpf filters"),
    })
}

/// Our filters' priority (the first: on a hook, a filter before ours that returns "ok"
/// would end the chain and the frame would skip our checks) and handle.
pub const LEGACY_PRIORITY: u16 = 1;
pub const LEGACY_HANDLE: u32 = 0xf1a0;

fn hook_name(at: TcAttachType) -> &'static str {
    match at {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

fn is_egress(at: TcAttachType) -> bool {
    matches!(at, TcAttachType::Egress)
}

/// Attach program `name` (loaded or not) to `iface`'s `at` hook as our cls_bpf filter,
/// replacing ours in place if it is there, then remove ours left at other places of the hook
/// (an earlier version's). Refused if another program holds our priority and handle.
pub fn attach_legacy(ebpf: &mut Ebpf, name: &str, iface: &Link, at: TcAttachType) -> Result<()> {
    let hook = hook_name(at);
    if let Err(e) = aya::programs::tc::qdisc_add_clsact(&iface.name) {
        // EEXIST: the qdisc is there already (ours from before, or someone else's).
        let exists = matches!(&e, aya::programs::tc::TcError::AlreadyAttached)
            || matches!(&e, aya::programs::tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST));
        if !exists {
            return Err(e).with_context(|| format!("adding the clsact qdisc to {}", iface.name));
        }
    }
    let existing = tc::filters(iface.ifindex, is_egress(at))?;
    let prog: &mut SchedClassifier =
        ebpf.program_mut(name).with_context(|| format!("program {name} missing from the object"))?.try_into()?;
    if prog.fd().is_err() {
        prog.load().with_context(|| crate::dataplane::verifier_refused(name))?;
    }
    // Another's filter at our priority would share the first place with ours, in an order the
    // kernel keeps by insertion, not by us: refused, naming it.
    if let Some(f) = existing.iter().find(|f| f.priority == LEGACY_PRIORITY && f.handle != LEGACY_HANDLE && f.bpf_name.as_deref() != Some(name)) {
        bail!(
            "another tc filter shares priority {LEGACY_PRIORITY} (the first) on {} {hook} with ours: {} {} handle {:#x}; \
             our checks must run first: move it to a later priority (tc filter del dev {} {hook} prio {LEGACY_PRIORITY} handle {:#x} {})",
            iface.name,
            f.kind,
            f.bpf_name.as_deref().unwrap_or("-"),
            f.handle,
            iface.name,
            f.handle,
            f.kind
        );
    }
    let slot = existing.iter().find(|f| f.priority == LEGACY_PRIORITY && f.handle == LEGACY_HANDLE);
    let handle = TcHandle::new((LEGACY_HANDLE >> 16) as u16, LEGACY_HANDLE as u16);
    let id = match slot {
        Some(f) if f.bpf_name.as_deref() == Some(name) => {
            let link = SchedClassifierLink::attached(&iface.name, at, LEGACY_PRIORITY, handle, None)
                .with_context(|| format!("finding {}", iface.name))?;
            prog.attach_to_link(link).with_context(|| format!("replacing {name} in its tc filter on {} {hook}", iface.name))?
        }
        Some(f) => bail!(
            "the tc filter at priority {LEGACY_PRIORITY}, handle {LEGACY_HANDLE:#x} on {} {hook} is not ours ({} {}); \
             remove it (tc filter del dev {} {hook} prio {LEGACY_PRIORITY}) or move it",
            iface.name,
            f.kind,
            f.bpf_name.as_deref().unwrap_or("-"),
            iface.name
        ),
        None => prog
            .attach_with_options(&iface.name, at, TcAttachOptions::Netlink(NlOptions { priority: LEGACY_PRIORITY, handle, classid: None }))
            .with_context(|| format!("attaching {name} to {} {hook} as a cls_bpf filter", iface.name))?,
    };
    // The filter belongs to the qdisc: aya's link would remove it when dropped.
    std::mem::forget(prog.take_link(id)?);
    for f in existing.iter().filter(|f| f.bpf_name.as_deref() == Some(name) && (f.priority, f.handle) != (LEGACY_PRIORITY, LEGACY_HANDLE)) {
        detach_filter(iface, at, f.priority, f.handle)?;
    }
    Ok(())
}

fn detach_filter(iface: &Link, at: TcAttachType, priority: u16, handle: u32) -> Result<()> {
    let link = SchedClassifierLink::attached(&iface.name, at, priority, TcHandle::new((handle >> 16) as u16, handle as u16), None)?;
    link.detach().with_context(|| format!("removing tc filter prio {priority} handle {handle:#x} from {} {}", iface.name, hook_name(at)))
}

/// Remove every cls_bpf filter of ours (program `name`) from `iface`'s `at` hook, and only
/// those; whether there was one.
pub fn detach_legacy(iface: &Link, at: TcAttachType, name: &str) -> Result<bool> {
    let ours: Vec<_> = tc::filters(iface.ifindex, is_egress(at))?.into_iter().filter(|f| f.bpf_name.as_deref() == Some(name)).collect();
    for f in &ours {
        detach_filter(iface, at, f.priority, f.handle)?;
    }
    Ok(!ours.is_empty())
}

/// Whether a cls_bpf filter of ours (program `name`) is on `ifindex`'s hook.
pub fn legacy_attached(ifindex: u32, at: TcAttachType, name: &str) -> bool {
    tc::filters(ifindex, is_egress(at)).is_ok_and(|fs| fs.iter().any(|f| f.bpf_name.as_deref() == Some(name)))
}

/// What else runs on a hook where ours does, in the order the kernel runs them: TCX programs
/// (with ours marked), then tc filters. For the log, at start and when it changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// TCX programs that run before ours (id and name).
    pub tcx_ahead: Vec<(u32, String)>,
    /// TCX programs after ours.
    pub tcx_after: Vec<(u32, String)>,
    /// tc filters that are not ours (priority, kind, program name).
    pub filters: Vec<(u16, String, String)>,
}

impl Chain {
    pub fn is_empty(&self) -> bool {
        self.tcx_ahead.is_empty() && self.tcx_after.is_empty() && self.filters.is_empty()
    }
}

/// The kernel keeps a program's first 15 bytes of name.
fn same_program(kernel_name: &str, ours: &str) -> bool {
    !kernel_name.is_empty() && ours.starts_with(kernel_name) && kernel_name.len() >= ours.len().min(15)
}

/// The TCX programs on `iface`'s `at` hook in the order they run (id and the name the
/// kernel keeps); none where the kernel has no TCX.
pub fn tcx_programs(iface: &str, at: TcAttachType) -> Vec<(u32, String)> {
    SchedClassifier::query_tcx(iface, at)
        .map(|(_, progs)| progs.into_iter().map(|p| (p.id(), p.name_as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default()
}

/// The chain on `iface`'s `at` hook around our program `name`.
pub fn chain(iface: &Link, at: TcAttachType, name: &str) -> Chain {
    let mut c = Chain::default();
    {
        let progs = tcx_programs(&iface.name, at);
        let mut seen_ours = false;
        for (id, n) in progs {
            if !seen_ours && same_program(&n, name) {
                seen_ours = true;
                continue;
            }
            if seen_ours { c.tcx_after.push((id, n)) } else { c.tcx_ahead.push((id, n)) }
        }
        if !seen_ours {
            // Ours is not a TCX program here (legacy attach): every TCX program runs first.
            c.tcx_ahead.append(&mut c.tcx_after);
        }
    }
    if let Ok(fs) = tc::filters(iface.ifindex, is_egress(at)) {
        c.filters = fs
            .into_iter()
            .filter(|f| f.bpf_name.as_deref() != Some(name))
            .map(|f| (f.priority, f.kind, f.bpf_name.unwrap_or_default()))
            .collect();
    }
    c
}

/// What a pinned bpf link is attached to now: the interface index of a TCX or XDP link, the
/// network namespace's inode of an sk_lookup (netns) link; `None` when the link was detached
/// behind its pin's back (`bpftool link detach`, the device or namespace gone: the kernel keeps
/// the link object and reports a zero target). A pin file says only that the object exists.
pub fn pinned_link_target(pin: &Path) -> Result<Option<u32>> {
    Ok(pinned_link_info(pin)?.1)
}

/// The program a pinned link runs (its id) and what the link is attached to now (see
/// `pinned_link_target`).
pub fn pinned_link_info(pin: &Path) -> Result<(u32, Option<u32>)> {
    let path = CString::new(pin.as_os_str().as_bytes()).context("pin path")?;
    // BPF_OBJ_GET: { pathname, bpf_fd, file_flags }.
    let mut get = [0u64; 2];
    get[0] = path.as_ptr() as u64;
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_mut_ptr(), std::mem::size_of_val(&get)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("opening the pinned link {}", pin.display()));
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id (u32 each), then (8-aligned) the union whose
    // tcx, xdp and netns members all start with the target (ifindex or netns_ino).
    let mut info = [0u8; 64];
    // BPF_OBJ_GET_INFO_BY_FD: { bpf_fd: u32, info_len: u32, info: u64 }.
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoByFd { bpf_fd: fd.as_raw_fd() as u32, info_len: info.len() as u32, info: info.as_mut_ptr() as u64 };
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &mut attr as *mut InfoByFd, std::mem::size_of::<InfoByFd>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("reading the link behind {}", pin.display()));
    }
    Ok((u32::from_ne_bytes([info[8], info[9], info[10], info[11]]), link_target(&info)))
}

/// The ids of this node's cls_bpf program `name` on `ifindex`'s hook (kernels without TCX).
pub fn legacy_program_ids(ifindex: u32, at: TcAttachType, name: &str) -> Vec<u32> {
    tc::filters(ifindex, is_egress(at))
        .map(|fs| fs.into_iter().filter(|f| f.bpf_name.as_deref() == Some(name)).filter_map(|f| f.prog_id).collect())
        .unwrap_or_default()
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// The target in a `struct bpf_link_info` (see `pinned_link_target`).
fn link_target(info: &[u8; 64]) -> Option<u32> {
    let target = u32::from_ne_bytes([info[16], info[17], info[18], info[19]]);
    (target != 0).then_some(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_links_target_sits_after_its_type_id_and_program() {
        let mut info = [0u8; 64];
        info[0..4].copy_from_slice(&11u32.to_ne_bytes()); // BPF_LINK_TYPE_TCX
        info[4..8].copy_from_slice(&7u32.to_ne_bytes());
        info[8..12].copy_from_slice(&99u32.to_ne_bytes());
        assert_eq!(link_target(&info), None, "detached: the kernel reports no interface");
        info[16..20].copy_from_slice(&3u32.to_ne_bytes());
        assert_eq!(link_target(&info), Some(3));
    }

    #[test]
    fn program_names_compare_as_the_kernel_keeps_them() {
        assert!(same_program("tc_ingress_deca", "tc_ingress_decap"), "truncated to 15 bytes");
        assert!(same_program("tc_egress_encap", "tc_egress_encap"));
        assert!(!same_program("tc_ingress", "tc_ingress_decap"), "a shorter name is another program");
        assert!(!same_program("", "tc_ingress_decap"));
        assert!(!same_program("cil_from_netdev", "tc_ingress_decap"));
    }
}
