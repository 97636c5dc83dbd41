//! The programs' links: attached (TCX or legacy TC, XDP, the socket guard's sk_lookup) and
//! pinned, or adopted from the pins a previous run left so that a restart never leaves a
//! hook empty.

use std::{
    fs,
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
        LinkOrder, SchedClassifier, SkLookup, TcAttachType, Xdp, XdpMode,
    },
    Ebpf,
};
use overlay_common::prog_names;

use crate::datapath::attach::{Guard, GuardChoice};

use super::*;

/// The socket guard as the spec wants it: the program, or where it cannot load or attach (no
/// `ingress_ifindex` before Linux 5.17) the firewall rule, said once with why. A pinned
/// program link goes when the firewall takes over.
pub(super) fn guard(ebpf: &mut Ebpf, spec: &NodeSpec) -> Result<Guard> {
    let pin = spec.bpffs_dir.join(LINK_GUARD);
    match spec.guard {
        // A previous run's program stays until the firewall rule is in (`retire_guard_program`).
        GuardChoice::Firewall => Ok(Guard::Firewall),
        GuardChoice::SkLookup => attach_guard(ebpf, &pin).map(|()| Guard::SkLookup),
        GuardChoice::Auto => match attach_guard(ebpf, &pin) {
            Ok(()) => Ok(Guard::SkLookup),
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "the socket guard program cannot run on this kernel (sk_lookup with ingress_ifindex needs Linux 5.17); \
                     tunnel datagrams that do not come from the underlay are dropped by a firewall rule instead (guard=firewall)"
                );
                Ok(Guard::Firewall)
            }
        },
    }
}

/// The socket guard's program goes once its firewall rule is in place (forced to the
/// firewall after a run with the program): no moment without either.
pub fn retire_guard_program(dir: &Path) -> Result<()> {
    remove_pin(&dir.join(LINK_GUARD))
}

/// The socket guard, attached to the agent's network namespace: tunnel datagrams that did
/// not arrive on the underlay never reach the kernel's vxlan socket. A fresh link is pinned
/// in place of the previous one (a namespace runs both for a moment: no gap on restart).
pub(super) fn attach_guard(ebpf: &mut Ebpf, pin: &Path) -> Result<()> {
    let prog: &mut SkLookup = ebpf
        .program_mut(prog_names::SK_LOOKUP_GUARD)
        .context("program sk_lookup_guard missing from the object")?
        .try_into()?;
    prog.load().with_context(|| verifier_refused(prog_names::SK_LOOKUP_GUARD))?;
    let netns = fs::File::open("/proc/self/ns/net").context("opening this network namespace")?;
    let id = prog.attach(&netns).context("attaching the socket guard (sk_lookup, Linux >= 5.17)")?;
    let link = FdLink::from(prog.take_link(id)?);
    pin_link(link, pin)
}

/// Hitless restart: put the freshly loaded program `name` into the link pinned at `pin`
/// with one atomic `bpf_link_update` (no moment without a program, no detach). False when
/// there is no usable pinned link (then the caller attaches anew).
pub(super) fn adopt_tc(ebpf: &mut Ebpf, name: &str, pin: &Path) -> bool {
    adopted(name, pin, (|| {
        let link = SchedClassifierLink::try_from(FdLink::from(PinnedLink::from_pin(pin)?))?;
        let prog: &mut SchedClassifier = ebpf.program_mut(name).context("program missing")?.try_into()?;
        if prog.fd().is_err() {
            prog.load().with_context(|| verifier_refused(name))?;
        }
        let id = prog.attach_to_link(link)?;
        // The pin keeps the (updated) link; our fd may go with the agent.
        drop(prog.take_link(id)?);
        Ok(())
    })())
}

/// As `adopt_tc`, for the XDP decap link.
pub(super) fn adopt_xdp(ebpf: &mut Ebpf, pin: &Path) -> bool {
    adopted(prog_names::XDP_DECAP, pin, (|| {
        let link = XdpLink::try_from(FdLink::from(PinnedLink::from_pin(pin)?))?;
        let prog: &mut Xdp = ebpf.program_mut(prog_names::XDP_DECAP).context("program missing")?.try_into()?;
        if prog.fd().is_err() {
            prog.load().with_context(|| verifier_refused(prog_names::XDP_DECAP))?;
        }
        let id = prog.attach_to_link(link)?;
        drop(prog.take_link(id)?);
        Ok(())
    })())
}

/// Log an adoption's outcome; whether the pinned link now runs the new program.
pub(super) fn adopted(program: &str, pin: &Path, result: Result<()>) -> bool {
    match result {
        Ok(()) => {
            tracing::info!(program, pin = %pin.display(), "adopted the pinned link: program replaced atomically");
            true
        }
        Err(e) if pin.exists() => {
            tracing::warn!(program, error = format!("{e:#}"), "cannot update the pinned link; attaching anew");
            false
        }
        Err(_) => false,
    }
}

pub(super) fn attach_tc(ebpf: &mut Ebpf, name: &str, iface: &str, at: TcAttachType, order: LinkOrder) -> Result<FdLink> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load().with_context(|| verifier_refused(name))?;
    }
    let id = prog
        .attach_with_options(iface, at, TcAttachOptions::TcxOrder(order))
        .with_context(|| format!("attaching {name} to {iface} (TCX needs Linux >= 6.6)"))?;
    let link = prog.take_link(id)?;
    Ok(FdLink::try_from(link)?)
}

pub(super) fn attach_xdp(ebpf: &mut Ebpf, iface: &str) -> Result<FdLink> {
    let prog: &mut Xdp = ebpf
        .program_mut(prog_names::XDP_DECAP)
        .context("program xdp_decap missing from the object")?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load().with_context(|| verifier_refused(prog_names::XDP_DECAP))?;
    }
    let id = prog.attach(iface, XdpMode::Driver).with_context(|| {
        format!("attaching XDP in native (driver) mode to {iface}; its driver may not support it: try --decap-hook tc")
    })?;
    let link = prog.take_link(id)?;
    Ok(FdLink::try_from(link)?)
}
