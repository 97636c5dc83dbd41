//! The kernel's drops, seen from its `kfree_skb` tracepoint.
//!
//! Attached: raw tracepoint `kfree_skb` (no tracefs needed), while the agent runs.
//! Sees: every packet the kernel frees as dropped, on any device of any namespace.
//! Does: keeps those that were on one of the node's watched devices (the underlay and the
//! overlay devices, in the node's own network namespace) and not dropped by our own
//! programs (they count theirs), counts them per (reason, device), and reports them to a
//! listening monitor with the packet's IPv4 header. The structures' layouts come from the
//! running kernel's BTF, through `DROP_TRACE`: this program reads kernel memory only through
//! `bpf_probe_read_kernel`, at the offsets the agent found there.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_ktime_get_ns},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use overlay_common::{DropTraceConfig, Hook, KernelDropKey, PacketEvent, IPV4_HLEN};

use crate::{
    maps::{DROP_TRACE, EVENTS, KERNEL_DROPS},
    monitor,
};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Kernels from 5.17: `kfree_skb(skb, location, reason, ...)`.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn kfree_skb_reason(ctx: RawTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let reason: u64 = ctx.arg(2);
    trace(skb, reason as u32);
    0
}

/// Kernels before 5.17: `kfree_skb(skb, location)`, no reason (reported as 0).
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn kfree_skb_plain(ctx: RawTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    trace(skb, 0);
    0
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[inline(always)]
fn trace(skb: u64, reason: u32) {
    let Some(cfg) = DROP_TRACE.get(0) else { return };
    if cfg.enabled == 0 || skb == 0 || cfg.skip_reason.contains(&reason) {
        return;
    }
    let Some(dev) = read::<u64>(skb + cfg.off_skb_dev as u64).filter(|d| *d != 0) else { return };
    let Some(ifindex) = read::<u32>(dev + cfg.off_dev_ifindex as u64) else { return };
    let Some(slot) = cfg.ifindex.iter().position(|i| *i != 0 && *i == ifindex) else { return };
    if cfg.off_dev_nd_net != DropTraceConfig::NO_OFFSET {
        let Some(net) = read::<u64>(dev + cfg.off_dev_nd_net as u64).filter(|n| *n != 0) else { return };
        if read::<u32>(net + cfg.off_net_inum as u64) != Some(cfg.netns_inum) {
            return;
        }
    }
    let key = KernelDropKey { reason, ifindex };
    match KERNEL_DROPS.get_ptr_mut(&key) {
        // Per-CPU value: no other CPU writes it, and a program is not preempted mid-update.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = KERNEL_DROPS.insert(&key, &1, 0);
        }
    }
    if monitor::wanted(false) {
        report(skb, cfg, reason, slot as u8 + 1);
    }
}

/// The dropped packet's IPv4 header and ports, read where the kernel says its network header
/// is. Not inlined: its buffers stay out of the tracepoint's frame.
#[inline(never)]
fn report(skb: u64, cfg: &DropTraceConfig, reason: u32, device: u8) {
    let Some(mut slot) = EVENTS.reserve(0) else { return };
    let e = slot.write(PacketEvent::default());
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    e.outcome = reason;
    e.hook = Hook::Kernel as u8;
    e.device = device;
    e.len = read::<u32>(skb + cfg.off_skb_len as u64).unwrap_or(0);
    let head = read::<u64>(skb + cfg.off_skb_head as u64).unwrap_or(0);
    let nh = read::<u16>(skb + cfg.off_skb_network_header as u64).unwrap_or(u16::MAX);
    if head != 0 && nh != u16::MAX {
        if let Some(ip) = read::<[u8; IPV4_HLEN]>(head + nh as u64) {
            if ip[0] >> 4 == 4 {
                e.inner_src = [ip[12], ip[13], ip[14], ip[15]];
                e.inner_dst = [ip[16], ip[17], ip[18], ip[19]];
                e.proto = ip[9];
                let l4 = head + nh as u64 + (((ip[0] & 0x0f) as u64) * 4);
                if matches!(ip[9], IPPROTO_TCP | IPPROTO_UDP) {
                    if let Some(ports) = read::<[u8; 4]>(l4) {
                        e.sport = u16::from_be_bytes([ports[0], ports[1]]);
                        e.dport = u16::from_be_bytes([ports[2], ports[3]]);
                    }
                }
            }
        }
    }
    slot.submit(0);
}
