//! flannel's iptables rules: masquerading (`--ip-masq`, nat table, chain FLANNEL-POSTRTG
//! jumped to from POSTROUTING) and forwarding (filter table, chain FLANNEL-FWD jumped to from
//! FORWARD, so that docker's `FORWARD DROP` policy does not drop overlay traffic).
//!
//! Design notes: iptables, not nftables directly, because that is what flannel and docker use
//! and what the seed's operators inspect (`iptables -t nat -S`); on current distributions the
//! `iptables` command is the nf_tables backend, so the rules are nftables rules too. Each
//! chain is replaced as a whole with `iptables-restore --noflush` (atomic: never half a rule
//! set), only when a check finds it differs, and the jump into it is added if missing. The
//! daemon re-checks periodically, so rules someone removed come back.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("could not run {cmd}: {cause} (is the iptables package installed?)")]
    Spawn {
        cmd: String,
        cause: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
}

type Result<T> = std::result::Result<T, IptablesError>;

/// One chain of ours: its rules, and the built-in chain that jumps to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainRules {
    /// `iptables`, or `ip6tables` for a dual-stack node's IPv6 rules.
    pub cmd: &'static str,
    pub table: &'static str,
    pub chain: &'static str,
    /// The built-in chain holding the jump (POSTROUTING, FORWARD).
    pub hook: &'static str,
    pub comment: &'static str,
    /// Each rule's arguments after `-A <chain>`.
    pub rules: Vec<Vec<String>>,
    /// The jump goes first in the built-in chain (a drop that an earlier accept must not
    /// get around), not last.
    pub first: bool,
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// Which port randomisation the MASQUERADE rules ask for, as flannel chooses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MasqRandom {
    /// `--random-fully` (where iptables supports it: 1.6.2 or later).
    Fully,
    /// No port randomisation option: flannel's --ip-masq-fully-random-disable writes plain
    /// `MASQUERADE` (nftables: `masquerade`).
    Disabled,
    /// Neither (an iptables too old for --random-fully; nftables masquerades fully-random
    /// all the same, as every kernel this agent runs on has it).
    None,
}

impl MasqRandom {
    fn suffix(self) -> &'static str {
        match self {
            MasqRandom::Fully => " --random-fully",
            MasqRandom::Disabled | MasqRandom::None => "",
        }
    }

    /// What to use: nothing if the operator disabled fully-random, else `--random-fully` if
    /// this iptables supports it (probed once from `iptables --version`, as go-iptables'
    /// HasRandomFully does), else nothing.
    pub fn choose(fully_random_disabled: bool) -> Self {
        if fully_random_disabled {
            return MasqRandom::Disabled;
        }
        let version = Command::new("iptables").arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        match version.as_deref().and_then(parse_version) {
            Some(v) if v >= (1, 6, 2) => MasqRandom::Fully,
            Some(v) => {
                tracing::warn!(version = %format!("{}.{}.{}", v.0, v.1, v.2), "this iptables has no --random-fully (1.6.2 or later): masquerading without it");
                MasqRandom::None
            }
            None => {
                tracing::warn!("cannot tell the iptables version: masquerading without --random-fully");
                MasqRandom::None
            }
        }
    }
}

/// The version in `iptables --version` output ("iptables v1.8.9 (nf_tables)").
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??, parts.next().flatten().unwrap_or(0)))
}

/// flannel's masquerade rules, in flannel's order.
pub fn masquerade(network: Ipv4Net, subnet: Ipv4Net, random: MasqRandom) -> ChainRules {
    masquerade_rules("iptables", &network.to_string(), &subnet.to_string(), "224.0.0.0/4", random)
}

/// flannel's IPv6 masquerade rules (masqIP6Rules): the same, with ip6tables and IPv6's
/// multicast range.
pub fn masquerade6(network: Ipv6Net, subnet: Ipv6Net, random: MasqRandom) -> ChainRules {
    masquerade_rules("ip6tables", &network.to_string(), &subnet.to_string(), "ff00::/8", random)
}

fn masquerade_rules(cmd: &'static str, n: &str, s: &str, multicast: &str, random: MasqRandom) -> ChainRules {
    let r = random.suffix();
    ChainRules {
        cmd,
        table: "nat",
        chain: "FLANNEL-POSTRTG",
        hook: "POSTROUTING",
        comment: "flanneld masq",
        first: false,
        rules: vec![
            // Marked by kube-proxy (or anyone) as already handled.
            words("-m mark --mark 0x4000/0x4000 -j RETURN"),
            // Between containers: keep container addresses.
            words(&format!("-s {s} -d {n} -j RETURN")),
            words(&format!("-s {n} -d {s} -j RETURN")),
            // From outside the overlay to our containers (e.g. NodePorts): untouched.
            words(&format!("! -s {n} -d {s} -j RETURN")),
            // Containers to the world: the node's address.
            words(&format!("-s {n} ! -d {multicast} -j MASQUERADE{r}")),
            // The host (or anything outside the overlay) to remote containers.
            words(&format!("! -s {n} -d {n} -j MASQUERADE{r}")),
        ],
    }
}

/// flannel's forward rules: accept overlay traffic whatever FORWARD's policy is.
pub fn forward(network: Ipv4Net) -> ChainRules {
    forward_rules("iptables", &network.to_string())
}

/// The same for a dual-stack node's IPv6 network.
pub fn forward6(network: Ipv6Net) -> ChainRules {
    forward_rules("ip6tables", &network.to_string())
}

fn forward_rules(cmd: &'static str, n: &str) -> ChainRules {
    ChainRules {
        cmd,
        table: "filter",
        chain: "FLANNEL-FWD",
        hook: "FORWARD",
        comment: "flanneld forward",
        first: false,
        rules: vec![words(&format!("-s {n} -j ACCEPT")), words(&format!("-d {n} -j ACCEPT"))],
    }
}

/// The socket guard as an iptables rule, where its program cannot run and the host has no
/// nft (the nftables form is used whenever it can be: see `nftables::GUARD_TABLE`): UDP to
/// the tunnel `port` is dropped unless it came in on the underlay `iface` to the node's
/// tunnel address `addr` (iptables, or ip6tables for a dual-stack node's IPv6 address), at
/// INPUT, before the datagram reaches the kernel's vxlan socket. Every iptables chain runs
/// after defragmentation, where `-i` is the interface of the fragment that completed the
/// datagram: a first fragment sent from a container and completed by one from the underlay
/// is not caught here (docs/kernels.md says so).
pub fn guard(cmd: &'static str, iface: &str, addr: std::net::IpAddr, tunnel: GuardedTunnel) -> ChainRules {
    let host = if addr.is_ipv4() { "/32" } else { "/128" };
    let rules = match tunnel {
        GuardedTunnel::Udp(port) => vec![
            words(&format!("! -i {iface} -p udp -m udp --dport {port} -j DROP")),
            words(&format!("! -d {addr}{host} -p udp -m udp --dport {port} -j DROP")),
        ],
        // flannel.ipip takes IP-in-IP to the tunnel address only: that alone is guarded
        // (IP-in-IP to the node's other addresses is the namespace's tunl0's, its users').
        // Written as `iptables -S` prints it.
        GuardedTunnel::Ipip => vec![words(&format!("-d {addr}{host} ! -i {iface} -p {} -j DROP", ipip_protocol_name()))],
    };
    ChainRules { cmd, table: "filter", chain: "OVERLAY-GUARD", hook: "INPUT", comment: "overlay tunnel guard", first: true, rules }
}

/// What iptables and nft call IP protocol 4 when they print a rule: its name in
/// /etc/protocols (`ipencap` on Debian; it differs between distributions), else the number.
pub fn ipip_protocol_name() -> String {
    // Read once: the rules are compared with the firewall's every --iptables-resync.
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| protocol_name_in(&std::fs::read_to_string("/etc/protocols").unwrap_or_default(), 4)).clone()
}

fn protocol_name_in(protocols: &str, number: u8) -> String {
    protocols
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            (f.next()? == number.to_string()).then(|| name.to_string())
        })
        .unwrap_or_else(|| number.to_string())
}

/// What the guard keeps from reaching the kernel's tunnel device except through the
/// underlay to the tunnel address: UDP to the tunnel port (vxlan, udp), or IP-in-IP (ipip:
/// the kernel's flannel.ipip takes protocol 4 from anywhere, and a packet that did not come
/// in on the underlay never met the checks there; no socket, so no sk_lookup program).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardedTunnel {
    Udp(u16),
    Ipip,
}

impl GuardedTunnel {
    pub fn of(mode: overlay_common::EncapMode, port: u16) -> Self {
        match mode {
            overlay_common::EncapMode::Ipip => GuardedTunnel::Ipip,
            _ => GuardedTunnel::Udp(port),
        }
    }
}

/// Opt-in (`--notrack-tunnel`): tunnel datagrams to (PREROUTING) and from (OUTPUT: what the
/// kernel device sends for us) this node's tunnel address and `port` skip connection tracking,
/// in the raw table. The inner flows keep theirs: the kernel resets an skb's conntrack state
/// on decapsulation. `[prerouting, output]`.
pub fn notrack(addr: std::net::Ipv4Addr, port: u16) -> [ChainRules; 2] {
    let chain = |chain, hook, rule: String| ChainRules {
        cmd: "iptables",
        table: "raw",
        chain,
        hook,
        comment: "overlay tunnel notrack",
        first: true,
        rules: vec![words(&rule)],
    };
    [
        chain("OVERLAY-NOTRACK", "PREROUTING", format!("-d {addr}/32 -p udp -m udp --dport {port} -j NOTRACK")),
        chain("OVERLAY-NOTRACK-OUT", "OUTPUT", format!("-s {addr}/32 -p udp -m udp --dport {port} -j NOTRACK")),
    ]
}

impl ChainRules {
    /// A rule's full argument list, with our comment before the target.
    fn rule_args(&self, rule: &[String]) -> Vec<String> {
        let j = rule.iter().position(|w| w == "-j").unwrap_or(rule.len());
        let mut v: Vec<String> = rule[..j].to_vec();
        v.extend(["-m".into(), "comment".into(), "--comment".into(), self.comment.into()]);
        v.extend(rule[j..].iter().cloned());
        v
    }

    fn jump_args(&self) -> Vec<String> {
        vec!["-m".into(), "comment".into(), "--comment".into(), self.comment.into(), "-j".into(), self.chain.into()]
    }

    /// The iptables-restore input that replaces our chain (and only it).
    pub fn restore_input(&self) -> String {
        let mut s = format!("*{}\n:{} - [0:0]\n", self.table, self.chain);
        for r in &self.rules {
            let args: Vec<String> = self
                .rule_args(r)
                .into_iter()
                .map(|a| if a.contains(' ') { format!("\"{a}\"") } else { a })
                .collect();
            s.push_str(&format!("-A {} {}\n", self.chain, args.join(" ")));
        }
        s.push_str("COMMIT\n");
        s
    }
}

/// Seconds to wait for the xtables lock (held by kube-proxy, docker, an operator): bounded,
/// so that a lock held for long fails this check, which the next resync repeats, instead of
/// hanging the agent.
pub const LOCK_WAIT_SECS: &str = "5";

fn iptables(bin: &str, args: &[String]) -> Result<std::process::Output> {
    let cmd = format!("{bin} {}", args.join(" "));
    Command::new(bin).args(["-w", LOCK_WAIT_SECS]).args(args).output().map_err(|cause| IptablesError::Spawn { cmd, cause })
}

fn iptables_ok(bin: &str, args: &[String]) -> Result<bool> {
    Ok(iptables(bin, args)?.status.success())
}

fn iptables_must(bin: &str, args: &[String]) -> Result<()> {
    let out = iptables(bin, args)?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            cmd: format!("{bin} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Whether our chain holds exactly our rules, in order. `iptables -S` prints rules in the
/// same canonical form as `restore_input` writes them, so the texts are compared.
fn chain_matches(r: &ChainRules) -> Result<bool> {
    let out = iptables(r.cmd, &s(&["-t", r.table, "-S", r.chain]))?;
    if !out.status.success() {
        return Ok(false);
    }
    let have = String::from_utf8_lossy(&out.stdout);
    let have: Vec<&str> = have.lines().filter(|l| l.starts_with("-A ")).collect();
    let want = r.restore_input();
    let want: Vec<&str> = want.lines().filter(|l| l.starts_with("-A ")).collect();
    Ok(have == want)
}

/// Make the chain and the jump to it what they should be. Returns whether anything changed.
pub fn ensure(r: &ChainRules) -> Result<bool> {
    let mut changed = false;
    if !chain_matches(r)? {
        let input = r.restore_input();
        let cmd = format!("{}-restore --noflush", r.cmd);
        let mut child = Command::new(format!("{}-restore", r.cmd))
            .args(["-w", LOCK_WAIT_SECS, "--noflush"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|cause| IptablesError::Spawn { cmd: cmd.clone(), cause })?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .map_err(|cause| IptablesError::Spawn { cmd: cmd.clone(), cause })?;
        let out = child.wait_with_output().map_err(|cause| IptablesError::Spawn { cmd: cmd.clone(), cause })?;
        if !out.status.success() {
            return Err(IptablesError::Failed { cmd, stderr: format!("{}\ninput:\n{input}", String::from_utf8_lossy(&out.stderr).trim()) });
        }
        changed = true;
    }
    let mut check = s(&["-t", r.table, "-C", r.hook]);
    check.extend(r.jump_args());
    // -C: 0 present, 1 absent; anything else (4: the xtables lock was not had in time) is
    // an error, never "absent" (appending then would duplicate the jump).
    let checked = iptables(r.cmd, &check)?;
    let present = match checked.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => {
            return Err(IptablesError::Failed {
                cmd: format!("{} {}", r.cmd, check.join(" ")),
                stderr: String::from_utf8_lossy(&checked.stderr).trim().to_string(),
            })
        }
    };
    if !present {
        let mut add = if r.first { s(&["-t", r.table, "-I", r.hook, "1"]) } else { s(&["-t", r.table, "-A", r.hook]) };
        add.extend(r.jump_args());
        iptables_must(r.cmd, &add)?;
        changed = true;
    }
    Ok(changed)
}

/// Remove the jump and the chain.
pub fn remove(r: &ChainRules) -> Result<()> {
    let mut del = s(&["-t", r.table, "-D", r.hook]);
    del.extend(r.jump_args());
    while iptables_ok(r.cmd, &del)? {}
    let _ = iptables(r.cmd, &s(&["-t", r.table, "-F", r.chain]))?;
    let _ = iptables(r.cmd, &s(&["-t", r.table, "-X", r.chain]))?;
    Ok(())
}

/// Each chain this agent (and flannel) may keep, for both families, with placeholder
/// networks: enough to find and remove one whatever it was made for.
pub fn all_chains() -> [ChainRules; 8] {
    let any: Ipv4Net = "10.0.0.0/8".parse().expect("literal");
    let any6: Ipv6Net = "fd00::/8".parse().expect("literal");
    let (a, a6) = (std::net::IpAddr::V4(any.addr()), std::net::IpAddr::V6(any6.addr()));
    let [notrack_in, notrack_out] = notrack(any.addr(), 8472);
    [
        masquerade(any, any, MasqRandom::None),
        forward(any),
        masquerade6(any6, any6, MasqRandom::None),
        forward6(any6),
        guard("iptables", "eth0", a, GuardedTunnel::Udp(8472)),
        guard("ip6tables", "eth0", a6, GuardedTunnel::Udp(8472)),
        notrack_in,
        notrack_out,
    ]
}

/// Whether the guard's chain is in place (iptables or ip6tables, for `status`).
pub fn guard_present() -> bool {
    ["iptables", "ip6tables"]
        .iter()
        .any(|cmd| iptables(cmd, &s(&["-t", "filter", "-S", "OVERLAY-GUARD"])).is_ok_and(|o| o.status.success()))
}

/// Remove flannel's chains and our guard's, whatever they were for (teardown).
pub fn remove_all() -> Result<()> {
    let [masq, fwd, masq6, fwd6, g, g6, nt, nt_out] = all_chains();
    remove(&masq)?;
    remove(&fwd)?;
    // ip6tables may be missing; the guard's chain exists only where its program cannot run,
    // the notrack chains only where asked for.
    for c in [masq6, fwd6, g, g6, nt, nt_out] {
        let _ = remove(&c);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_fully_follows_the_iptables_version_and_the_flag() {
        assert_eq!(parse_version("iptables v1.8.9 (nf_tables)\n"), Some((1, 8, 9)));
        assert_eq!(parse_version("iptables v1.6.1"), Some((1, 6, 1)));
        assert_eq!(parse_version("iptables v1.10"), Some((1, 10, 0)));
        assert_eq!(parse_version("garbage"), None);
        assert_eq!(MasqRandom::choose(true), MasqRandom::Disabled);
        let n: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        // flannel's masqRules: --random-fully, or (disabled, or an iptables without it) plain
        // MASQUERADE; never --random.
        for (random, tail) in [(MasqRandom::Fully, "-j MASQUERADE --random-fully"), (MasqRandom::Disabled, "-j MASQUERADE"), (MasqRandom::None, "-j MASQUERADE")] {
            let input = masquerade(n, n, random).restore_input();
            let masq: Vec<&str> = input.lines().filter(|l| l.contains("MASQUERADE")).collect();
            assert_eq!(masq.len(), 2);
            assert!(masq.iter().all(|l| l.ends_with(tail)), "{random:?}: {masq:?}");
        }
    }

    #[test]
    fn masquerade_rules_are_flannels_in_order() {
        let r = masquerade("10.244.0.0/16".parse().unwrap(), "10.244.7.0/24".parse().unwrap(), MasqRandom::Fully);
        let text = r.restore_input();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(lines[1], ":FLANNEL-POSTRTG - [0:0]");
        let c = "-m comment --comment \"flanneld masq\"";
        assert_eq!(lines[2], format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN"));
        assert_eq!(lines[3], format!("-A FLANNEL-POSTRTG -s 10.244.7.0/24 -d 10.244.0.0/16 {c} -j RETURN"));
        assert_eq!(lines[4], format!("-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.7.0/24 {c} -j RETURN"));
        assert_eq!(lines[5], format!("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.7.0/24 {c} -j RETURN"));
        assert_eq!(lines[6], format!("-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"));
        assert_eq!(lines[7], format!("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {c} -j MASQUERADE --random-fully"));
        assert_eq!(lines[8], "COMMIT");
    }

    #[test]
    fn ipv6_masquerade_rules_are_flannels() {
        let r = masquerade6("fd00:10:244::/56".parse().unwrap(), "fd00:10:244:7::/64".parse().unwrap(), MasqRandom::Fully);
        assert_eq!(r.cmd, "ip6tables");
        let text = r.restore_input();
        let c = "-m comment --comment \"flanneld masq\"";
        assert!(text.contains(&format!("-A FLANNEL-POSTRTG -s fd00:10:244:7::/64 -d fd00:10:244::/56 {c} -j RETURN")), "{text}");
        assert!(text.contains(&format!("-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 {c} -j MASQUERADE --random-fully")), "{text}");
        assert!(text.contains(&format!("-A FLANNEL-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244::/56 {c} -j MASQUERADE --random-fully")), "{text}");
        assert_eq!(forward6("fd00:10:244::/56".parse().unwrap()).cmd, "ip6tables");
    }

    #[test]
    fn notrack_rules_take_only_our_tunnel_datagrams_out_of_conntrack() {
        let [pre, out] = notrack("192.168.100.1".parse().unwrap(), 8472);
        assert_eq!((pre.table, pre.hook, out.hook), ("raw", "PREROUTING", "OUTPUT"));
        let c = "-m comment --comment \"overlay tunnel notrack\"";
        assert!(pre.restore_input().contains(&format!("-A OVERLAY-NOTRACK -d 192.168.100.1/32 -p udp -m udp --dport 8472 {c} -j NOTRACK")));
        assert!(out.restore_input().contains(&format!("-A OVERLAY-NOTRACK-OUT -s 192.168.100.1/32 -p udp -m udp --dport 8472 {c} -j NOTRACK")));
    }

    #[test]
    fn forward_rules_accept_the_network_both_ways() {
        let r = forward("10.244.0.0/16".parse().unwrap());
        assert_eq!((r.table, r.chain, r.hook), ("filter", "FLANNEL-FWD", "FORWARD"));
        assert!(r.restore_input().contains("-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"));
        assert!(r.restore_input().contains("-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT"));
    }

    #[test]
    fn protocol_4_is_named_as_the_host_names_it() {
        assert_eq!(protocol_name_in("ip\t0\tIP\n# c\nipencap\t4\tIP-ENCAP\t# IP in IP\n", 4), "ipencap");
        assert_eq!(protocol_name_in("ipv4 4 IPv4 # IPv4 encapsulation\n", 4), "ipv4");
        assert_eq!(protocol_name_in("# 4 is not here\nudp 17 UDP\n", 4), "4");
        assert_eq!(protocol_name_in("", 4), "4");
        let g = guard("iptables", "eth0", "192.168.100.1".parse().unwrap(), GuardedTunnel::Ipip);
        assert_eq!(g.rules, vec![words(&format!("-d 192.168.100.1/32 ! -i eth0 -p {} -j DROP", ipip_protocol_name()))]);
    }
}
