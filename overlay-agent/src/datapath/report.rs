//! Tables for operators, read from the pinned maps.

use std::fmt::Write as _;

use overlay_common::Counter;

use crate::{
    maps::{PeerTotals, Route},
    netdev::format_mac,
};

/// The routes, and a dual-stack node's IPv6 routes (subnet, peer) after them.
pub fn routes_table(routes: &[Route], routes6: &[(ipnet::Ipv6Net, std::net::Ipv6Addr)]) -> String {
    let mut s = format!("{:<20} {:<16} {}\n", "SUBNET", "PUBLIC-IP", "VTEP-MAC");
    for r in routes {
        let mac = if r.vtep_mac == [0; 6] { "-".to_string() } else { format_mac(&r.vtep_mac) };
        let _ = writeln!(s, "{:<20} {:<16} {}", r.subnet.to_string(), r.public_ip.to_string(), mac);
    }
    if !routes6.is_empty() {
        let _ = write!(s, "\n{:<44} {}\n", "IPV6-SUBNET", "PUBLIC-IPV6");
        for (subnet, peer) in routes6 {
            let _ = writeln!(s, "{:<44} {}", subnet.to_string(), peer);
        }
    }
    s
}

pub fn stats_table(
    counters: &[u64; Counter::COUNT],
    peers: &std::collections::BTreeMap<std::net::Ipv4Addr, PeerTotals>,
    peers6: &std::collections::BTreeMap<std::net::Ipv6Addr, PeerTotals>,
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
    // A dual-stack node's IPv6 peers (what the decap programs accepted from each), under a
    // header of their own.
    if !peers6.is_empty() {
        let _ = writeln!(
            s,
            "\n{:<40} {:>12} {:>14} {:>12} {:>14}",
            "IPV6-PEER", "TX-PACKETS", "TX-BYTES", "RX-PACKETS", "RX-BYTES"
        );
    }
    for (ip, t) in peers6 {
        let _ = writeln!(s, "{:<40} {:>12} {:>14} {:>12} {:>14}", ip.to_string(), t.tx_packets, t.tx_bytes, t.rx_packets, t.rx_bytes);
    }
    s
}

/// `overlay-agent leases`: one row per lease, with the seconds left on its etcd lease.
pub fn leases_table(rows: &[(crate::lease::Lease, i64)]) -> String {
    let mut s = format!("{:<20} {:<16} {:<8} {:<18} {}\n", "SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC", "TIME-LEFT");
    // A dual-stack network's leases: two more columns, after a padded TIME-LEFT (which may
    // read "no TTL").
    let dual = rows.iter().any(|(l, _)| l.subnet6.is_some());
    // A wireguard network's leases: each node's public key and listen port, last.
    let wireguard = rows.iter().any(|(l, _)| l.attrs.backend_type == "wireguard");
    if wireguard && !dual {
        s = format!("{:<20} {:<16} {:<9} {:<18} {:<10} {}\n", "SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC", "TIME-LEFT", "WIREGUARD-KEY:PORT");
    }
    if dual {
        s = format!("{:<20} {:<16} {:<9} {:<18} {:<10} {:<44} {}\n", "SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC", "TIME-LEFT", "IPV6-SUBNET", "PUBLIC-IPV6");
        if wireguard {
            // And the node's key with both ports (IPv4/IPv6), last.
            s = format!(
                "{:<20} {:<16} {:<9} {:<18} {:<10} {:<44} {:<40} {}\n",
                "SUBNET", "PUBLIC-IP", "BACKEND", "VTEP-MAC", "TIME-LEFT", "IPV6-SUBNET", "PUBLIC-IPV6", "WIREGUARD-KEY:PORT/PORTV6"
            );
        }
    }
    for (l, left) in rows {
        // An IPv6-only node's lease has neither an IPv4 subnet nor a PublicIP (0.0.0.0/0 and
        // 0.0.0.0 in etcd): "-", and its IPv6 columns.
        let (subnet, public_ip) = match l.key().is_ipv6_only() {
            true => ("-".to_string(), "-".to_string()),
            false => (l.subnet.to_string(), l.attrs.public_ip.to_string()),
        };
        let backend = if l.attrs.backend_type.is_empty() { "udp" } else { l.attrs.backend_type.as_str() };
        let mac = l.attrs.vtep_mac().map(|m| format_mac(&m)).unwrap_or_else(|_| "-".into());
        let left = if *left < 0 { "no TTL".to_string() } else { format!("{}h{:02}m{:02}s", left / 3600, left / 60 % 60, left % 60) };
        if dual {
            let sub6 = l.subnet6.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
            let ip6 = l.attrs.public_ipv6.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
            let _ = write!(s, "{:<20} {:<16} {:<9} {:<18} {:<10} {:<44} {}", subnet, public_ip, backend, mac, left, sub6, ip6);
            if wireguard {
                let _ = write!(s, "{:<pad$}", "", pad = 40usize.saturating_sub(ip6.len()));
                let key = l.attrs.wireguard_peer().or_else(|_| l.attrs.wireguard_peer_v6()).map(|(k, _)| crate::wireguard::format_key(&k));
                let port = |p: Result<(crate::wireguard::Key, Option<u16>), _>| p.ok().and_then(|(_, p)| p).map_or("-".to_string(), |p| p.to_string());
                let _ = write!(s, " {}:{}/{}", key.unwrap_or_else(|_| "-".into()), port(l.attrs.wireguard_peer()), port(l.attrs.wireguard_peer_v6()));
            }
            let _ = writeln!(s);
        } else if wireguard {
            let peer = match l.attrs.wireguard_peer() {
                Ok((key, port)) => format!("{}:{}", crate::wireguard::format_key(&key), port.map_or("-".to_string(), |p| p.to_string())),
                Err(_) => "-".to_string(),
            };
            let _ = writeln!(s, "{:<20} {:<16} {:<9} {:<18} {:<10} {}", subnet, public_ip, backend, mac, left, peer);
        } else {
            let _ = writeln!(s, "{:<20} {:<16} {:<8} {:<18} {}", subnet, public_ip, backend, mac, left);
        }
    }
    s
}

#[cfg(test)]
mod wireguard_tests {
    use super::*;

    #[test]
    fn a_dual_stack_wireguard_networks_leases_show_each_nodes_key_and_both_ports() {
        let key = [3u8; 32];
        let attrs = crate::lease::LeaseAttrs::wireguard("192.168.1.2".parse().unwrap(), &key, 51820).with_wireguard_v6("fd00:64::2".parse().unwrap(), &key, 51821);
        let lease = crate::lease::Lease { subnet: "10.244.2.0/24".parse().unwrap(), subnet6: Some("fd00:10:244:2::/64".parse().unwrap()), attrs, etcd_lease: 1 };
        let v6_only = crate::lease::LeaseAttrs::wireguard_ipv6_only("fd00:64::3".parse().unwrap(), &key, 51821);
        let lease6 = crate::lease::Lease { subnet: "0.0.0.0/0".parse().unwrap(), subnet6: Some("fd00:10:244:3::/64".parse().unwrap()), attrs: v6_only, etcd_lease: 1 };
        let t = leases_table(&[(lease, 60), (lease6, 60)]);
        let lines: Vec<&str> = t.lines().collect();
        let col = lines[0].find("WIREGUARD-KEY").unwrap();
        let k = crate::wireguard::format_key(&key);
        assert_eq!(&lines[1][col..], format!("{k}:51820/51821"), "{t}");
        assert_eq!(&lines[2][col..], format!("{k}:-/51821"), "an IPv6-only lease has no IPv4 port:\n{t}");
    }

    #[test]
    fn a_wireguard_networks_leases_show_each_nodes_key_and_port() {
        let key = [7u8; 32];
        let l = crate::lease::Lease {
            subnet: "10.244.2.0/24".parse().unwrap(),
            subnet6: None,
            attrs: crate::lease::LeaseAttrs::wireguard("192.168.1.2".parse().unwrap(), &key, 51820),
            etcd_lease: 1,
        };
        let t = leases_table(&[(l, 3600)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("WIREGUARD-KEY:PORT"), "{t}");
        assert!(lines[1].contains("wireguard") && lines[1].ends_with(&format!("{}:51820", crate::wireguard::format_key(&key))), "{t}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_stack_nodes_show_their_ipv6_side() {
        let r = Route { subnet: "10.244.2.0/24".parse().unwrap(), public_ip: "192.168.1.2".parse().unwrap(), vtep_mac: [2; 6], wireguard: None };
        let t = routes_table(&[r], &[("fd00:0:0:2::/64".parse().unwrap(), "fd00::2".parse().unwrap())]);
        assert!(t.contains("10.244.2.0/24") && t.contains("IPV6-SUBNET") && t.contains("fd00:0:0:2::/64") && t.contains("fd00::2"), "{t}");
        assert!(!routes_table(&[r], &[]).contains("IPV6"), "an IPv4 node's table is as before");
        let attrs = crate::lease::LeaseAttrs::vxlan("192.168.1.2".parse().unwrap(), 1, [2; 6]).with_ipv6("fd00::2".parse().unwrap(), 1, [6; 6]);
        let l = crate::lease::Lease { subnet: r.subnet, subnet6: Some("fd00:0:0:2::/64".parse().unwrap()), attrs, etcd_lease: 1 };
        let reservation = crate::lease::Lease { etcd_lease: 0, ..l.clone() };
        let t = leases_table(&[(l, 60), (reservation, -1)]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("PUBLIC-IPV6") && lines[1].contains("fd00:0:0:2::/64") && lines[1].ends_with("fd00::2"), "{t}");
        // Columns line up, "no TTL" included: the IPv6 subnet starts where its header does.
        let col = lines[0].find("IPV6-SUBNET").unwrap();
        assert!(lines[1..].iter().all(|l| l[col..].starts_with("fd00:0:0:2::/64")), "{t}");
        // An IPv6-only node's lease: dashes for what it does not have.
        let k = crate::lease::LeaseKey::ipv6_only("fd00:0:0:3::/64".parse().unwrap());
        let attrs = crate::lease::LeaseAttrs::vxlan_ipv6_only("fd00::3".parse().unwrap(), 1, [6; 6]);
        let t = leases_table(&[(crate::lease::Lease { subnet: k.v4, subnet6: k.v6, attrs, etcd_lease: 1 }, 60)]);
        let row: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row, ["-", "-", "vxlan", "-", "0h01m00s", "fd00:0:0:3::/64", "fd00::3"], "{t}");
        let peers6 = [("fd00::2".parse().unwrap(), PeerTotals { rx_packets: 3, ..Default::default() })].into_iter().collect();
        let st = stats_table(&[0; Counter::COUNT], &Default::default(), &peers6);
        assert!(st.contains("IPV6-PEER") && st.contains("fd00::2"), "{st}");
    }
}
