//! Events for `overlay-agent monitor`: drops (and, when asked, a sample of decisions) with the
//! hook, the tunnel's addresses and the inner packet's 5-tuple, into a ring buffer. Written
//! only while a monitor's heartbeat is recent, at most `MONITOR_EVENTS_PER_SEC` per CPU, so
//! with nobody listening a drop or an accepted packet costs one (inlined) array lookup and a
//! flag test.

use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use overlay_common::{
    monitor_flags, Counter, Hook, PacketEvent, ETH_HLEN, ETH_P_IPV4, IPV4_HLEN, MONITOR_EVENTS_PER_SEC,
    MONITOR_TIMEOUT_NS,
};

use crate::{
    maps::{EVENTS, MONITOR, MONITOR_RATE},
    packet::Packet,
};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Whether an event of this kind is wanted now (and within the rate).
#[inline(always)]
pub fn wanted(decision: bool) -> bool {
    let Some(m) = MONITOR.get(0) else { return false };
    let flag = if decision { monitor_flags::DECISIONS } else { monitor_flags::DROPS };
    if m.flags & flag == 0 {
        return false;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(m.heartbeat_ns) > MONITOR_TIMEOUT_NS {
        return false;
    }
    if decision && m.sample > 1 && unsafe { bpf_get_prandom_u32() } % m.sample != 0 {
        return false;
    }
    let Some(rate) = MONITOR_RATE.get_ptr_mut(0) else { return false };
    // Per-CPU slot: no other CPU writes it.
    let rate = unsafe { &mut *rate };
    if now.wrapping_sub(rate[0]) > 1_000_000_000 {
        rate[0] = now;
        rate[1] = 0;
    }
    if rate[1] >= MONITOR_EVENTS_PER_SEC {
        return false;
    }
    rate[1] += 1;
    true
}

/// Report `outcome` for the frame `p`: its outer IPv4 addresses if `tunnel`, and the inner
/// IPv4 header at `inner_off` (from the start of the frame) with its ports. Not inlined, and
/// written in place in the ring buffer: the programs' own stack frames stay as they were.
#[inline(never)]
pub fn report<P: Packet>(p: &P, hook: Hook, outcome: Counter, tunnel: bool, inner_off: usize) {
    let Some(mut slot) = EVENTS.reserve(0) else { return };
    let e = slot.write(PacketEvent::default());
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    e.outcome = outcome as u32;
    e.hook = hook as u8;
    e.len = p.len() as u32;
    let is_ipv4 = p.read::<ETH_HLEN>(0).is_some_and(|eth| u16::from_be_bytes([eth[12], eth[13]]) == ETH_P_IPV4);
    if is_ipv4 {
        if tunnel {
            if let Some(ip) = p.read::<IPV4_HLEN>(ETH_HLEN) {
                e.outer_src = [ip[12], ip[13], ip[14], ip[15]];
                e.outer_dst = [ip[16], ip[17], ip[18], ip[19]];
            }
        }
        if let Some(ip) = p.read::<IPV4_HLEN>(inner_off) {
            if ip[0] >> 4 == 4 {
                e.inner_src = [ip[12], ip[13], ip[14], ip[15]];
                e.inner_dst = [ip[16], ip[17], ip[18], ip[19]];
                e.proto = ip[9];
                let l4 = inner_off + (((ip[0] & 0x0f) as usize) * 4 & 0x3c);
                if matches!(ip[9], IPPROTO_TCP | IPPROTO_UDP) {
                    if let Some(ports) = p.read::<4>(l4) {
                        e.sport = u16::from_be_bytes([ports[0], ports[1]]);
                        e.dport = u16::from_be_bytes([ports[2], ports[3]]);
                    }
                }
            }
        }
    }
    slot.submit(0);
}

/// Report a socket-guard drop: the datagram's addresses (no packet to read).
#[inline(always)]
pub fn report_addrs(hook: Hook, outcome: Counter, remote: [u8; 4], local: [u8; 4], sport: u16, dport: u16) {
    let e = PacketEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        outcome: outcome as u32,
        hook: hook as u8,
        proto: IPPROTO_UDP,
        outer_src: remote,
        outer_dst: local,
        sport,
        dport,
        ..PacketEvent::default()
    };
    let _ = EVENTS.output(e, 0);
}
