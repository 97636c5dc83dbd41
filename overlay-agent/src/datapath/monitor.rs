//! `overlay-agent monitor`: the data plane's drops as they happen (and, when asked, a sample
//! of accepted and encapsulated packets), read from the programs' ring buffer, as `cilium
//! monitor --type drop` shows Cilium's.
//!
//! The programs write events only while a monitor's heartbeat in the `MONITOR` map is recent;
//! this command renews it every second and clears it when it stops. A monitor killed outright
//! stops the events within `MONITOR_TIMEOUT_NS` all the same.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, Map, MapData, RingBuf};
use overlay_common::{map_names, monitor_flags, Counter, Hook, MonitorState, PacketEvent};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// What to show.
#[derive(Debug, Clone, Copy)]
pub struct MonitorOptions {
    pub decisions: bool,
    pub sample: u32,
    pub count: Option<u64>,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!("opening {} (is the data plane up, and from a version with the monitor?)", path.display())
    })?;
    Map::from_map_data(data).with_context(|| format!("map {name}"))
}

/// What a kernel drop's event needs to be read: the running kernel's reason names and the
/// devices the tracer watches (by slot, from 1).
#[derive(Debug, Default)]
pub struct KernelNames {
    pub reasons: std::collections::BTreeMap<u32, String>,
    pub devices: Vec<String>,
}

/// One line for an event.
pub fn format_event(e: &PacketEvent, names: &KernelNames) -> String {
    if e.hook == Hook::Kernel as u8 {
        return format_kernel_drop(e, names);
    }
    let outcome = Counter::ALL.get(e.outcome as usize).copied();
    let kind = match outcome {
        Some(c) if c.is_drop() => "drop",
        // Sent, but waiting for the next hop's link-layer address: lost if it never comes.
        Some(Counter::UnresolvedNextHop) => "queued",
        Some(_) => "ok",
        None => "?",
    };
    let name = outcome.map_or("unknown", |c| c.name());
    let hook = Hook::from_u8(e.hook).map_or("?", |h| h.name());
    let secs = e.ts_ns as f64 / 1e9;
    let mut line = format!("{secs:.6} {kind} {name} {hook}");
    if e.outer_src != [0; 4] || e.outer_dst != [0; 4] {
        line += &format!(" tunnel {} -> {}", Ipv4Addr::from(e.outer_src), Ipv4Addr::from(e.outer_dst));
    }
    if e.inner_src != [0; 4] || e.inner_dst != [0; 4] {
        let proto = match e.proto {
            1 => "icmp".to_string(),
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            p => format!("proto-{p}"),
        };
        if matches!(e.proto, 6 | 17) {
            line += &format!(
                " {proto} {}:{} -> {}:{}",
                Ipv4Addr::from(e.inner_src),
                e.sport,
                Ipv4Addr::from(e.inner_dst),
                e.dport
            );
        } else {
            line += &format!(" {proto} {} -> {}", Ipv4Addr::from(e.inner_src), Ipv4Addr::from(e.inner_dst));
        }
    } else if e.hook == Hook::SocketGuard as u8 {
        line += &format!(" ports {} -> {}", e.sport, e.dport);
    }
    line += &format!(" len {}", e.len);
    line
}

/// A drop the kernel made past our programs: its reason as the kernel names it, the device,
/// and the packet's own IPv4 header (the outer one on the underlay).
fn format_kernel_drop(e: &PacketEvent, names: &KernelNames) -> String {
    let reason = crate::datapath::kernel_drops::reason_name(&names.reasons, e.outcome);
    let dev = names.devices.get((e.device as usize).wrapping_sub(1)).cloned().unwrap_or_else(|| format!("device-{}", e.device));
    let mut line = format!("{:.6} drop {reason} kernel dev {dev}", e.ts_ns as f64 / 1e9);
    if e.inner_src != [0; 4] || e.inner_dst != [0; 4] {
        let (src, dst) = (Ipv4Addr::from(e.inner_src), Ipv4Addr::from(e.inner_dst));
        line += &match e.proto {
            6 | 17 => format!(" {} {src}:{} -> {dst}:{}", if e.proto == 6 { "tcp" } else { "udp" }, e.sport, e.dport),
            1 => format!(" icmp {src} -> {dst}"),
            p => format!(" proto-{p} {src} -> {dst}"),
        };
    }
    line + &format!(" len {}", e.len)
}

/// Stream events to stdout until interrupted (or `count` events).
pub fn run(dir: &Path, opts: MonitorOptions) -> Result<()> {
    let mut state: Array<MapData, MonitorState> =
        Array::try_from(open(dir, map_names::MONITOR)?).context("MONITOR is not an array of MonitorState")?;
    let mut ring = RingBuf::try_from(open(dir, map_names::EVENTS)?).context("EVENTS is not a ring buffer")?;
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let flags = monitor_flags::DROPS | if opts.decisions { monitor_flags::DECISIONS } else { 0 };
    let write_state = |state: &mut Array<MapData, MonitorState>, flags: u32| {
        let s = MonitorState { heartbeat_ns: monotonic_ns(), flags, sample: opts.sample.max(1) };
        state.set(0, s, 0).context("writing MONITOR")
    };
    let names = KernelNames {
        reasons: crate::datapath::kernel_drops::reasons().clone(),
        devices: crate::datapath::kernel_drops::watched(dir)
            .map(|w| w.iter().map(|i| crate::netdev::name_of(*i).unwrap_or_else(|| format!("ifindex-{i}"))).collect())
            .unwrap_or_default(),
    };
    // Whatever an earlier monitor left unread is not this one's business.
    while ring.next().is_some() {}
    write_state(&mut state, flags)?;
    let what = if opts.decisions { format!("drops and one decision in {}", opts.sample.max(1)) } else { "drops".into() };
    eprintln!("listening for {what} (Ctrl-C to stop)");
    let mut out = std::io::stdout().lock();
    let mut seen = 0u64;
    let mut last_beat = Instant::now();
    let result = loop {
        if STOP.load(Ordering::SeqCst) || opts.count.is_some_and(|n| seen >= n) {
            break Ok(());
        }
        let mut got = false;
        while let Some(item) = ring.next() {
            got = true;
            if item.len() < std::mem::size_of::<PacketEvent>() {
                continue;
            }
            let e: PacketEvent = bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<PacketEvent>()]);
            drop(item);
            if writeln!(out, "{}", format_event(&e, &names)).and_then(|_| out.flush()).is_err() {
                // stdout closed (a pipe to `head`): done.
                STOP.store(true, Ordering::SeqCst);
                break;
            }
            seen += 1;
            if opts.count.is_some_and(|n| seen >= n) {
                break;
            }
        }
        if last_beat.elapsed() >= Duration::from_secs(1) {
            if let Err(e) = write_state(&mut state, flags) {
                break Err(e);
            }
            last_beat = Instant::now();
        }
        if !got {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // Stop the events now rather than when the heartbeat runs out.
    let _ = write_state(&mut state, 0);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_as_an_operator_would_want() {
        let e = PacketEvent {
            ts_ns: 1_500_000_000,
            outcome: Counter::SpoofedSource as u32,
            hook: Hook::TcIngress as u8,
            proto: 17,
            outer_src: [192, 168, 100, 2],
            outer_dst: [192, 168, 100, 1],
            inner_src: [10, 244, 3, 7],
            inner_dst: [10, 244, 1, 5],
            sport: 40000,
            dport: 9000,
            len: 92,
            ..Default::default()
        };
        assert_eq!(
            format_event(&e, &KernelNames::default()),
            "1.500000 drop spoofed_source tc-ingress tunnel 192.168.100.2 -> 192.168.100.1 udp 10.244.3.7:40000 -> 10.244.1.5:9000 len 92"
        );
        let g = PacketEvent {
            outcome: Counter::ForeignTunnel as u32,
            hook: Hook::SocketGuard as u8,
            proto: 17,
            outer_src: [10, 244, 1, 5],
            outer_dst: [192, 168, 100, 1],
            sport: 5555,
            dport: 8472,
            ..Default::default()
        };
        assert_eq!(format_event(&g, &KernelNames::default()), "0.000000 drop foreign_tunnel socket-guard tunnel 10.244.1.5 -> 192.168.100.1 ports 5555 -> 8472 len 0");
        let ok = PacketEvent { outcome: Counter::Encapsulated as u32, hook: Hook::TcEgress as u8, proto: 1, inner_src: [10, 244, 1, 5], inner_dst: [10, 244, 2, 7], ..Default::default() };
        assert_eq!(format_event(&ok, &KernelNames::default()), "0.000000 ok encapsulated tc-egress icmp 10.244.1.5 -> 10.244.2.7 len 0");
        // The kernel's drops: its reason by its own name, the device, the packet's header.
        let names = KernelNames { reasons: [(3, "NETFILTER_DROP".to_string())].into_iter().collect(), devices: vec!["eth0".into(), "flannel.1".into()] };
        let k = PacketEvent { ts_ns: 2_000_000_000, outcome: 3, hook: Hook::Kernel as u8, device: 2, proto: 17, inner_src: [10, 244, 2, 7], inner_dst: [10, 244, 1, 5], sport: 4000, dport: 9999, len: 92, ..Default::default() };
        assert_eq!(format_event(&k, &names), "2.000000 drop NETFILTER_DROP kernel dev flannel.1 udp 10.244.2.7:4000 -> 10.244.1.5:9999 len 92");
        assert_eq!(format_event(&PacketEvent { outcome: 77, ..k }, &names), "2.000000 drop reason-77 kernel dev flannel.1 udp 10.244.2.7:4000 -> 10.244.1.5:9999 len 92");
    }
}
