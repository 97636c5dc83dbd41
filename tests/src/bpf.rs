//! Someone else's TCX program, for tests of how ours shares a hook: a two-instruction
//! classifier that returns TCX_NEXT (the frame goes on to the next program), loaded and
//! attached with raw bpf() calls so that no object file is needed. It stays attached while
//! the value lives (the link is held by its file descriptor, never pinned).

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_F_BEFORE: u32 = 1 << 3;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zeroed bpf_attr of the size passed; the kernel reads and writes it.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a successful call returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// A foreign program attached to a device's TCX ingress.
pub struct ForeignTcx {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl ForeignTcx {
    /// Load a program named `name` (at most 15 bytes) and attach it to `dev`'s TCX ingress in
    /// `ns`, before every program there (`first`) or after them.
    pub fn attach(ns: &Netns, dev: &str, name: &str, first: bool) -> Result<Self> {
        if name.len() > 15 {
            bail!("program names are at most 15 bytes");
        }
        let (dev, name) = (dev.to_string(), name.to_string());
        ns.enter(move || -> Result<Self> {
            // r0 = -1 (TC_ACT_UNSPEC: on to the next program); exit.
            let insns: [u64; 2] = [u64::from_le_bytes([0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0])];
            let license = b"GPL\0";
            let mut attr = [0u8; 128];
            attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
            attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
            attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
            attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
            attr[48..48 + name.len()].copy_from_slice(name.as_bytes());
            let prog = bpf(BPF_PROG_LOAD, &mut attr).context("loading the foreign program")?;
            // The namespace's own index (netlink-backed; /sys is the host's under setns).
            let c = std::ffi::CString::new(dev.clone())?;
            // SAFETY: a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
            if ifindex == 0 {
                bail!("no device {dev}");
            }
            let mut attr = [0u8; 128];
            use std::os::fd::AsRawFd as _;
            attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
            attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
            attr[8..12].copy_from_slice(&BPF_TCX_INGRESS.to_ne_bytes());
            attr[12..16].copy_from_slice(&(if first { BPF_F_BEFORE } else { 0 }).to_ne_bytes());
            let link = bpf(BPF_LINK_CREATE, &mut attr).context("attaching the foreign program to TCX ingress")?;
            Ok(Self { _link: link, _prog: prog })
        })?
    }
}
