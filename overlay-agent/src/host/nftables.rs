//! flannel's nftables mode (`EnableNFTables: true`, and hosts without an iptables binary,
//! such as RHEL 10's family): the masquerade and forward rules in a table of flannel's own,
//! `ip flannel-ipv4`, with flannel's chain names (`postrtg`, `forward`) and comments, so
//! `nft list ruleset` shows what flannel's users expect. A dual-stack node also has flannel's
//! `ip6 flannel-ipv6` table for its IPv6 network.
//!
//! Design notes: driven through `nft -f -`, as flannel's knftables (and kube-proxy's) drive
//! nft: one script per change, which nft applies as one transaction, so the table is replaced
//! atomically (never a moment without rules). The Rust netlink nftables crates either need
//! libnftnl (nftnl) or cover too little of nft's expression set (rustables), and the `nft`
//! binary is what this mode's hosts have.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use ipnet::IpNet;

use super::iptables::MasqRandom;

pub const TABLE: &str = "flannel-ipv4";
pub const TABLE6: &str = "flannel-ipv6";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("could not run nft: {cause} (is the nftables package installed?)")]
    Spawn { cause: std::io::Error },
    #[error("nft failed: {stderr}\nscript:\n{script}")]
    Failed { stderr: String, script: String },
}

type Result<T> = std::result::Result<T, NftError>;

/// What one of the tables holds (`ipv6`: flannel-ipv6, else flannel-ipv4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftRules {
    pub ipv6: bool,
    /// --ip-masq: (network, subnet, randomisation).
    pub masq: Option<(IpNet, IpNet, MasqRandom)>,
    /// flannel's forward accept rules for the network.
    pub forward: Option<IpNet>,
}

/// nft's family and flannel's table name for one address family.
fn family(ipv6: bool) -> (&'static str, &'static str) {
    if ipv6 {
        ("ip6", TABLE6)
    } else {
        ("ip", TABLE)
    }
}

impl NftRules {
    pub fn is_empty(&self) -> bool {
        self.masq.is_none() && self.forward.is_none()
    }

    /// The rules of each chain, as `nft list table` prints them (one per line).
    pub fn chain_rules(&self) -> Vec<(&'static str, Vec<String>)> {
        let mut out = Vec::new();
        let (ip, _) = family(self.ipv6);
        let multicast = if self.ipv6 { "ff00::/8" } else { "224.0.0.0/4" };
        if let Some((n, s, random)) = self.masq {
            let r = match random {
                // flannel's addMasqRules: fully-random unless disabled (it probes the kernel,
                // which has it from 5.0 on; the iptables binary's version is not its concern).
                MasqRandom::Fully | MasqRandom::None => " fully-random",
                MasqRandom::Disabled => "",
            };
            out.push((
                "postrtg",
                vec![
                    "meta mark 0x00004000 return".to_string(),
                    format!("{ip} saddr {s} {ip} daddr {n} return"),
                    format!("{ip} saddr {n} {ip} daddr {s} return"),
                    format!("{ip} saddr != {s} {ip} daddr {n} return"),
                    format!("{ip} saddr {n} {ip} daddr != {multicast} masquerade{r}"),
                    format!("{ip} saddr != {n} {ip} daddr {n} masquerade{r}"),
                ],
            ));
        }
        if let Some(n) = self.forward {
            out.push(("forward", vec![format!("{ip} saddr {n} accept"), format!("{ip} daddr {n} accept")]));
        }
        out
    }

    /// The nft script that replaces the table with these rules, in one transaction.
    pub fn script(&self) -> String {
        // "add" first, so that "delete" never fails on a host without the table.
        let (ip, table) = family(self.ipv6);
        let mut s = drop_table(ip, table);
        s += &format!("table {ip} {table} {{\n\tcomment \"rules for {table}\"\n");
        for (chain, rules) in self.chain_rules() {
            let (comment, spec) = match chain {
                "postrtg" => ("chain to manage traffic masquerading by flannel", "type nat hook postrouting priority srcnat; policy accept;"),
                _ => ("chain to accept flannel traffic", "type filter hook forward priority filter; policy accept;"),
            };
            s += &format!("\tchain {chain} {{\n\t\tcomment \"{comment}\"\n\t\t{spec}\n");
            for r in rules {
                s += &format!("\t\t{r}\n");
            }
            s += "\t}\n";
        }
        s += "}\n";
        s
    }
}

/// The start of a script that replaces `table`: "add" first, so that "delete" never fails on a
/// host without it.
fn drop_table(ip: &str, table: &str) -> String {
    format!("add table {ip} {table}\ndelete table {ip} {table}\n")
}

/// Remove `table`, if there is one.
fn remove_table(ip: &str, table: &str) -> Result<()> {
    nft(&["-f", "-"], Some(&drop_table(ip, table))).map(drop)
}

/// The script that replaces a table of ours with filter chains: (hook, which is also the
/// chain's name, priority, rules) each.
fn filter_table_script(ip: &str, table: &str, chains: &[(&str, &str, Vec<String>)]) -> String {
    let mut s = drop_table(ip, table);
    s += &format!("table {ip} {table} {{\n");
    for (hook, priority, rules) in chains {
        s += &format!("\tchain {hook} {{\n\t\ttype filter hook {hook} priority {priority}; policy accept;\n");
        for r in rules {
            s += &format!("\t\t{r}\n");
        }
        s += "\t}\n";
    }
    s += "}\n";
    s
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut cmd = Command::new("nft");
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().map_err(|cause| NftError::Spawn { cause })?;
    if let Some(input) = stdin {
        child.stdin.take().expect("piped").write_all(input.as_bytes()).map_err(|cause| NftError::Spawn { cause })?;
    }
    let out = child.wait_with_output().map_err(|cause| NftError::Spawn { cause })?;
    if !out.status.success() {
        return Err(NftError::Failed { stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(), script: stdin.unwrap_or_default().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The rules now in flannel's table's chains (`None`: no table).
fn current(ipv6: bool) -> Option<Vec<(String, Vec<String>)>> {
    let (ip, table) = family(ipv6);
    current_of(ip, table)
}

fn current_of(ip: &str, table: &str) -> Option<Vec<(String, Vec<String>)>> {
    // Stateless: a counter's values are not part of the rule.
    let text = nft(&["-s", "list", "table", ip, table], None).ok()?;
    let mut chains: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("chain ").and_then(|l| l.strip_suffix(" {")) {
            chains.push((name.to_string(), Vec::new()));
        } else if let Some((_, rules)) = chains.last_mut() {
            let header = line.starts_with("comment ") || line.starts_with("type ") || line == "}" || line.is_empty();
            if !header {
                rules.push(line.to_string());
            }
        }
    }
    Some(chains)
}

/// Make the table hold exactly `rules`; true if it had to change.
pub fn ensure(rules: &NftRules) -> Result<bool> {
    let want: Vec<(String, Vec<String>)> = rules.chain_rules().into_iter().map(|(c, r)| (c.to_string(), r)).collect();
    if current(rules.ipv6).as_ref() == Some(&want) {
        return Ok(false);
    }
    nft(&["-f", "-"], Some(&rules.script()))?;
    Ok(true)
}

/// Remove both tables (teardown, or the other form's leftovers).
pub fn remove() -> Result<()> {
    remove_family(false)?;
    remove_family(true)
}

/// Our socket guard's table (not flannel's, which holds exactly flannel's rules): where the
/// guard's program cannot run, UDP to the tunnel port for this host is dropped unless it came
/// in on the underlay to the node's tunnel address. Its base chain hooks prerouting at
/// priority -450, before conntrack's defragmentation (-400): it sees each fragment with the
/// interface it arrived on. After reassembly the datagram carries the interface of the
/// fragment that completed it, so a check at input could be passed by a first fragment sent
/// from a container (through cni0/docker0) whose datagram a fragment on the underlay
/// completes. A first fragment carries the UDP header and is matched here; later fragments
/// carry none and pass, but they cannot bring headers in: the first fragment that does
/// arrives on the underlay, where the decap program checks it whole and drops any later
/// fragment reaching into those bytes (and the kernel drops overlapping ones). A chain of
/// its own: an accept elsewhere does not get around a drop here.
pub const GUARD_TABLE: &str = "overlay-guard";

/// The guard's chain's priority: before defragmentation (NF_IP_PRI_CONNTRACK_DEFRAG, -400).
pub const GUARD_PRIORITY: i32 = -450;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftGuard {
    pub iface: String,
    pub addr: std::net::IpAddr,
    pub tunnel: crate::iptables::GuardedTunnel,
}

impl NftGuard {
    fn family(&self) -> &'static str {
        if self.addr.is_ipv4() { "ip" } else { "ip6" }
    }

    /// The prerouting chain's rules, as `nft list table` prints them. `fib daddr type local`:
    /// only datagrams for this host (tunnel traffic routed through it is not ours to judge).
    pub fn rules(&self) -> Vec<String> {
        let ip = self.family();
        match self.tunnel {
            crate::iptables::GuardedTunnel::Udp(port) => vec![
                format!("iifname != \"{}\" udp dport {port} fib daddr type local counter drop", self.iface),
                format!("udp dport {port} {ip} daddr != {} fib daddr type local counter drop", self.addr),
            ],
            // IP-in-IP to the tunnel address only (flannel.ipip's), as nft prints it.
            crate::iptables::GuardedTunnel::Ipip => vec![format!(
                "iifname != \"{}\" {ip} daddr {} ip protocol {} counter drop",
                self.iface,
                self.addr,
                crate::iptables::ipip_protocol_name()
            )],
        }
    }

    pub fn script(&self) -> String {
        filter_table_script(self.family(), GUARD_TABLE, &[("prerouting", &GUARD_PRIORITY.to_string(), self.rules())])
    }
}

/// The notrack table's name (`--notrack-tunnel`, nftables mode).
pub const NOTRACK_TABLE: &str = "overlay-notrack";

/// Opt-in: tunnel datagrams to and from this node's tunnel address and port skip connection
/// tracking (see `iptables::notrack`), in a table of ours at the raw priority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftNotrack {
    pub addr: std::net::Ipv4Addr,
    pub port: u16,
}

impl NftNotrack {
    /// Each chain's rules, as `nft list table` prints them.
    pub fn chains(&self) -> Vec<(&'static str, Vec<String>)> {
        vec![
            ("prerouting", vec![format!("ip daddr {} udp dport {} notrack", self.addr, self.port)]),
            ("output", vec![format!("ip saddr {} udp dport {} notrack", self.addr, self.port)]),
        ]
    }

    pub fn script(&self) -> String {
        let chains: Vec<(&str, &str, Vec<String>)> = self.chains().into_iter().map(|(hook, rules)| (hook, "raw", rules)).collect();
        filter_table_script("ip", NOTRACK_TABLE, &chains)
    }
}

/// Make the notrack table hold exactly `n`'s rules; true if it had to change.
pub fn ensure_notrack(n: &NftNotrack) -> Result<bool> {
    let want: Vec<(String, Vec<String>)> = n.chains().into_iter().map(|(c, r)| (c.to_string(), r)).collect();
    if current_of("ip", NOTRACK_TABLE).as_ref() == Some(&want) {
        return Ok(false);
    }
    nft(&["-f", "-"], Some(&n.script()))?;
    Ok(true)
}

/// Remove the notrack table, if there is one.
pub fn remove_notrack() -> Result<()> {
    remove_table("ip", NOTRACK_TABLE)
}

/// Make the guard's table hold exactly `g`'s rules; true if it had to change.
pub fn ensure_guard(g: &NftGuard) -> Result<bool> {
    let want = vec![("prerouting".to_string(), g.rules())];
    if current_of(g.family(), GUARD_TABLE).as_ref() == Some(&want) {
        return Ok(false);
    }
    nft(&["-f", "-"], Some(&g.script()))?;
    Ok(true)
}

/// Whether the guard's table is in place, for either family (for `status`).
pub fn guard_present() -> bool {
    ["ip", "ip6"].iter().any(|f| nft(&["list", "table", f, GUARD_TABLE], None).is_ok())
}

/// Remove the guard's table for one family, if there is one.
pub fn remove_guard(ipv6: bool) -> Result<()> {
    remove_table(if ipv6 { "ip6" } else { "ip" }, GUARD_TABLE)
}

/// Remove one family's table (`ipv6`: flannel-ipv6, else flannel-ipv4), if there is one.
pub fn remove_family(ipv6: bool) -> Result<()> {
    let (ip, table) = family(ipv6);
    remove_table(ip, table)
}

/// Whether this host has an nft binary: the socket guard's firewall form uses it whenever
/// it can (its chain runs before defragmentation; iptables' chains all run after).
/// (Looked up in PATH, where `nft` is run from.)
pub fn has_nft() -> bool {
    on_path("nft").unwrap_or_else(|| std::path::Path::new("/usr/sbin/nft").exists())
}

/// Whether `tool` is in one of PATH's directories (None: no PATH).
fn on_path(tool: &str) -> Option<bool> {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
}

/// The datagrams the guard's nftables rules dropped (both families), for `status`.
pub fn guard_drops() -> u64 {
    ["ip", "ip6"]
        .iter()
        .filter_map(|f| nft(&["list", "table", f, GUARD_TABLE], None).ok())
        .flat_map(|t| {
            t.split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .filter(|w| w[0] == "packets")
                .filter_map(|w| w[1].parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Whether this host has an iptables binary (flannel falls back to nftables without one).
pub fn has_iptables() -> bool {
    on_path("iptables").unwrap_or(false) || std::path::Path::new("/usr/sbin/iptables").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_flannels() {
        let n: IpNet = "10.244.0.0/16".parse().unwrap();
        let s: IpNet = "10.244.1.0/24".parse().unwrap();
        let rules = NftRules { ipv6: false, masq: Some((n, s, MasqRandom::Fully)), forward: Some(n) };
        let script = rules.script();
        assert!(script.starts_with("add table ip flannel-ipv4\ndelete table ip flannel-ipv4\ntable ip flannel-ipv4 {"), "{script}");
        assert!(script.contains("\tchain postrtg {\n\t\tcomment \"chain to manage traffic masquerading by flannel\"\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tmeta mark 0x00004000 return\n\t\tip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return\n"), "{script}");
        assert!(script.contains("\t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random\n"), "{script}");
        assert!(script.contains("\tchain forward {"), "{script}");
        // --ip-masq-fully-random-disable: plain masquerade, as flannel writes it.
        let disabled = NftRules { ipv6: false, masq: Some((n, s, MasqRandom::Disabled)), forward: None };
        let d = disabled.script();
        assert!(d.contains("ip daddr != 224.0.0.0/4 masquerade\n") && !d.contains("random") && !d.contains("chain forward"), "{d}");
        let old_iptables = NftRules { ipv6: false, masq: Some((n, s, MasqRandom::None)), forward: None };
        assert!(old_iptables.script().contains("masquerade fully-random\n"), "nftables does not depend on the iptables binary's version");
        let n6: IpNet = "fd00:10:244::/56".parse().unwrap();
        let v6 = NftRules { ipv6: true, masq: Some((n6, "fd00:10:244:1::/64".parse().unwrap(), MasqRandom::Fully)), forward: Some(n6) }.script();
        assert!(v6.starts_with("add table ip6 flannel-ipv6\ndelete table ip6 flannel-ipv6\ntable ip6 flannel-ipv6 {"), "{v6}");
        assert!(v6.contains("\t\tip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random\n"), "{v6}");
        assert!(v6.contains("\t\tip6 daddr fd00:10:244::/56 accept\n"), "{v6}");
    }
}
