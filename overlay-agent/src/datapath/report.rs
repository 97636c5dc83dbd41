//! Tables for operators, read from the pinned maps.

use std::fmt::Write as _;

use overlay_common::Counter;

use crate::{
    maps::{PeerTotals, Route},
    netdev::format_mac,
};

pub fn routes_table(routes: &[Route]) -> String {
    let mut s = format!("{:<20} {:<16} {}\n", "SUBNET", "PUBLIC-IP", "VTEP-MAC");
    for r in routes {
        let mac = if r.vtep_mac == [0; 6] { "-".to_string() } else { format_mac(&r.vtep_mac) };
        let _ = writeln!(s, "{:<20} {:<16} {}", r.subnet.to_string(), r.public_ip.to_string(), mac);
    }
    s
}

pub fn stats_table(
    counters: &[u64; Counter::COUNT],
    peers: &std::collections::BTreeMap<std::net::Ipv4Addr, PeerTotals>,
) -> String {
    let mut s = format!("{:<20} {:>14} {}\n", "OUTCOME", "PACKETS", "");
    for c in Counter::ALL {
        let kind = if c.is_drop() { "drop" } else { "" };
        let _ = writeln!(s, "{:<20} {:>14} {}", c.name(), counters[c as usize], kind);
    }
    let _ = writeln!(
        s,
        "\n{:<16} {:>12} {:>14} {:>12} {:>14}",
        "PEER", "TX-PACKETS", "TX-BYTES", "RX-PACKETS", "RX-BYTES"
    );
    for (ip, t) in peers {
        let _ = writeln!(
            s,
            "{:<16} {:>12} {:>14} {:>12} {:>14}",
            ip.to_string(),
            t.tx_packets,
            t.tx_bytes,
            t.rx_packets,
            t.rx_bytes
        );
    }
    s
}

/// `overlay-agent leases`: one row per lease, with the seconds left on its etcd lease.
pub fn leases_table(rows: &[(crate::lease::Lease, i64)]) -> String {
    let mut s = format!("{:<20} {:<16} {:<8} {:<18} {}\n", "SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC", "TIME-LEFT");
    for (l, left) in rows {
        let backend = if l.attrs.backend_type.is_empty() { "udp" } else { l.attrs.backend_type.as_str() };
        let mac = l.attrs.vtep_mac().map(|m| format_mac(&m)).unwrap_or_else(|_| "-".into());
        let left = if *left < 0 { "no TTL".to_string() } else { format!("{}h{:02}m{:02}s", left / 3600, left / 60 % 60, left % 60) };
        let _ = writeln!(s, "{:<20} {:<16} {:<8} {:<18} {}", l.subnet.to_string(), l.attrs.public_ip.to_string(), backend, mac, left);
    }
    s
}
