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
