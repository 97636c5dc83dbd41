//! Rules keeping: which of flannel's masquerade and forward rules (iptables chains or
//! nftables tables), our guard's and the notrack ones this node should have, decided from
//! its config and lease alone (`wanted`); what a previous run left that this one does not
//! keep (`Firewall::leftovers`); installing them, and restoring them every
//! `--iptables-resync` in a task of its own, with the `--ip-blackhole-route` routes.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context as _, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{lease::Held, Daemon};
use crate::{
    config::NetworkConfig,
    health::AgentState,
    iptables::{self, ChainRules, GuardedTunnel, MasqRandom},
    netdev,
    nftables::{NftGuard, NftNotrack, NftRules},
};

/// What a node's rules depend on, read off its config, lease and flags.
#[derive(Clone, Debug)]
pub(super) struct RuleInputs {
    /// The IPv4 network and our subnet in it (none on an IPv6-only node).
    pub ipv4: Option<(Ipv4Net, Ipv4Net)>,
    /// A dual-stack or IPv6-only node's IPv6 network and subnet.
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
    pub ip_masq: bool,
    pub masq_random: MasqRandom,
    pub forward_rules: bool,
    pub notrack_tunnel: bool,
    /// The network config's `EnableNFTables`.
    pub nftables: bool,
    /// The underlay, the tunnel address and port (notrack's match), and what the guard keeps
    /// off the tunnel device.
    pub iface: String,
    pub underlay_ip: Ipv4Addr,
    pub port: u16,
    pub tunnel: GuardedTunnel,
    /// The addresses whose tunnel port the guard's rule protects: where its program cannot
    /// run, the IPv4 tunnel address and a dual-stack node's IPv6 one (empty otherwise).
    pub guard_addrs: Vec<IpAddr>,
}

/// What the host has of the two firewall tools.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tools {
    pub iptables: bool,
    pub nft: bool,
}

impl Tools {
    pub(super) fn probe() -> Self {
        Tools { iptables: crate::nftables::has_iptables(), nft: crate::nftables::has_nft() }
    }
}

/// The rules a node should have: flannel's iptables chains, or its nftables tables when the
/// config says `EnableNFTables` or the host has no iptables (as flannel does). A dual-stack
/// node's IPv6 network and subnet get the same rules (flannel's masqIP6Rules, its ip6tables
/// FLANNEL-FWD, its flannel-ipv6 table).
pub(super) fn wanted(i: &RuleInputs, tools: Tools) -> Firewall {
    let nft_mode = i.nftables || !tools.iptables;
    // The guard's nftables form runs before defragmentation: it is used wherever nft is,
    // whichever form flannel's rules take.
    let nft_guard = nft_mode || tools.nft;
    let guards: Vec<NftGuard> = i
        .guard_addrs
        .iter()
        .filter(|_| nft_guard)
        .map(|a| NftGuard { iface: i.iface.clone(), addr: *a, tunnel: i.tunnel })
        .collect();
    if nft_mode {
        let mut tables = Vec::new();
        if let Some((n, s)) = i.ipv4 {
            tables.push(NftRules {
                ipv6: false,
                masq: i.ip_masq.then_some((n.into(), s.into(), i.masq_random)),
                forward: i.forward_rules.then_some(n.into()),
            });
        }
        if let Some((n6, s6)) = i.ipv6 {
            tables.push(NftRules {
                ipv6: true,
                masq: i.ip_masq.then_some((n6.into(), s6.into(), i.masq_random)),
                forward: i.forward_rules.then_some(n6.into()),
            });
        }
        let notrack = (i.notrack_tunnel && i.ipv4.is_some()).then_some(NftNotrack { addr: i.underlay_ip, port: i.port });
        return Firewall::Nft(tables, guards, notrack);
    }
    let mut r: Vec<ChainRules> = i
        .guard_addrs
        .iter()
        .filter(|_| !nft_guard)
        .map(|a| iptables::guard(if a.is_ipv4() { "iptables" } else { "ip6tables" }, &i.iface, *a, i.tunnel))
        .collect();
    if i.ip_masq {
        if let Some((n, s)) = i.ipv4 {
            r.push(iptables::masquerade(n, s, i.masq_random));
        }
        if let Some((n6, s6)) = i.ipv6 {
            r.push(iptables::masquerade6(n6, s6, i.masq_random));
        }
    }
    if i.forward_rules {
        if let Some((n, _)) = i.ipv4 {
            r.push(iptables::forward(n));
        }
        if let Some((n6, _)) = i.ipv6 {
            r.push(iptables::forward6(n6));
        }
    }
    if i.notrack_tunnel && i.ipv4.is_some() {
        r.extend(iptables::notrack(i.underlay_ip, i.port));
    }
    Firewall::Iptables(r, guards)
}

/// The masquerade and forward rules this node keeps, in one of flannel's two forms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Firewall {
    #[default]
    None,
    /// flannel's iptables chains (FLANNEL-POSTRTG, FLANNEL-FWD), and our guard's: its
    /// nftables tables where nft exists, else its chains among the others.
    Iptables(Vec<ChainRules>, Vec<NftGuard>),
    /// flannel's nftables tables (flannel-ipv4, and flannel-ipv6 for a dual-stack node:
    /// postrtg, forward), our guard's tables where its program cannot run, and the notrack
    /// table where asked for.
    Nft(Vec<NftRules>, Vec<NftGuard>, Option<NftNotrack>),
}

/// Rules a previous run (ours or flanneld's) left that this run does not keep.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// iptables/ip6tables chains to remove (by command and chain name).
    pub chains: Vec<(&'static str, &'static str)>,
    /// nftables tables to remove: flannel-ipv4, flannel-ipv6.
    pub nft_ipv4: bool,
    pub nft_ipv6: bool,
    /// Our guard's nftables tables (ip, ip6) to remove.
    pub nft_guard4: bool,
    pub nft_guard6: bool,
    /// The notrack table (nftables mode, --notrack-tunnel) to remove.
    pub nft_notrack: bool,
}

impl Leftovers {
    /// Remove them (blocking; what is not there is no error, what fails is logged).
    pub(super) fn clear(&self) {
        for t in iptables::all_chains() {
            if self.chains.contains(&(t.cmd, t.chain)) {
                match iptables::remove(&t) {
                    Ok(()) => tracing::debug!(cmd = t.cmd, chain = t.chain, "removed a chain this run does not keep"),
                    Err(e) => tracing::debug!(cmd = t.cmd, chain = t.chain, error = %e, "could not remove a chain this run does not keep"),
                }
            }
        }
        for (wanted_gone, ipv6) in [(self.nft_ipv4, false), (self.nft_ipv6, true)] {
            if wanted_gone {
                if let Err(e) = crate::nftables::remove_family(ipv6) {
                    tracing::debug!(ipv6, error = %e, "could not remove an nftables table this run does not keep");
                }
            }
        }
        if self.nft_notrack {
            if let Err(e) = crate::nftables::remove_notrack() {
                tracing::debug!(error = %e, "could not remove the notrack table");
            }
        }
        for (gone, ipv6) in [(self.nft_guard4, false), (self.nft_guard6, true)] {
            if gone {
                if let Err(e) = crate::nftables::remove_guard(ipv6) {
                    tracing::debug!(ipv6, error = %e, "could not remove the guard's nftables table");
                }
            }
        }
    }
}

impl Firewall {
    /// What to clear at start: every chain or table of flannel's this run does not keep.
    /// `has_iptables`: whether iptables chains can exist on this host at all.
    pub fn leftovers(&self, has_iptables: bool) -> Leftovers {
        let guards_v = |guards: &[NftGuard], ipv6: bool| guards.iter().any(|g| g.addr.is_ipv6() == ipv6);
        let all: Vec<(&'static str, &'static str)> = iptables::all_chains().iter().map(|c| (c.cmd, c.chain)).collect();
        match self {
            Firewall::Iptables(chains, guards) => Leftovers {
                chains: all.into_iter().filter(|k| !chains.iter().any(|c| (c.cmd, c.chain) == *k)).collect(),
                nft_ipv4: true,
                nft_ipv6: true,
                nft_guard4: !guards_v(guards, false),
                nft_guard6: !guards_v(guards, true),
                nft_notrack: true,
            },
            Firewall::Nft(tables, guards, notrack) => {
                let keeps = |ipv6: bool| tables.iter().any(|t| t.ipv6 == ipv6 && !t.is_empty());
                Leftovers {
                    chains: if has_iptables { all } else { Vec::new() },
                    nft_ipv4: !keeps(false),
                    nft_ipv6: !keeps(true),
                    nft_guard4: !guards_v(guards, false),
                    nft_guard6: !guards_v(guards, true),
                    nft_notrack: notrack.is_none(),
                }
            }
            Firewall::None => Leftovers::default(),
        }
    }

    /// Install or restore; true if something had to change. Blocking (runs iptables or nft).
    fn ensure(&self) -> Result<bool> {
        Ok(match self {
            Firewall::Iptables(chains, guards) => {
                let mut changed = false;
                for g in guards {
                    changed |= crate::nftables::ensure_guard(g)?;
                }
                for r in chains {
                    changed |= iptables::ensure(r)?;
                }
                changed
            }
            Firewall::Nft(tables, guards, notrack) => {
                let mut changed = false;
                if let Some(n) = notrack {
                    changed |= crate::nftables::ensure_notrack(n)?;
                }
                for t in tables.iter().filter(|t| !t.is_empty()) {
                    changed |= crate::nftables::ensure(t)?;
                }
                for g in guards {
                    changed |= crate::nftables::ensure_guard(g)?;
                }
                changed
            }
            Firewall::None => false,
        })
    }
}

/// The rules this node keeps. Locked for the whole of a check or restore, so that a
/// shutdown waits for one in flight.
pub(super) type SharedRules = Arc<tokio::sync::Mutex<Firewall>>;

/// Install or restore the iptables rules; true if something had to change. iptables waits for
/// the xtables lock (bounded, `iptables::LOCK_WAIT_SECS`), so the commands run on a blocking
/// thread: the lease keeper, the watch and /healthz go on meanwhile.
pub(super) async fn ensure_rules(rules: &SharedRules) -> Result<bool> {
    // The guard goes with the blocking job: a shutdown that aborts the resync task still
    // waits for a check in flight before it removes the rules.
    let guard = rules.clone().lock_owned().await;
    tokio::task::spawn_blocking(move || guard.ensure()).await.context("the iptables task")?
}

/// Where br_netfilter's switches live (absent while the module is not loaded).
pub(super) const BRIDGE_SYSCTLS: &str = "/proc/sys/net/bridge";

/// flanneld exits when br_netfilter is not loaded (outside nftables mode: its switch for each
/// family the network uses is missing), since Kubernetes 1.30's kubeadm stopped checking it
/// and kube-proxy's rules then miss bridged traffic. A docker node in etcd mode runs fine
/// without it (docker's own rules do not need it), so this agent says so and goes on.
pub(super) fn br_netfilter_warning(dir: &std::path::Path, ipv4: bool, ipv6: bool, nftables: bool) -> Option<String> {
    if nftables {
        return None;
    }
    let missing: Vec<&str> = [(ipv4, "bridge-nf-call-iptables"), (ipv6, "bridge-nf-call-ip6tables")]
        .into_iter()
        .filter(|(used, name)| *used && !dir.join(name).exists())
        .map(|(_, name)| name)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "br_netfilter is not loaded ({} missing under {}): flanneld exits here; this agent goes on, but traffic \
             between containers on the same bridge skips iptables (kube-proxy's Service rules need it: modprobe br_netfilter)",
            missing.join(", "),
            dir.display()
        )
    })
}

/// The `--ip-blackhole-route` routes a node holding `held` should have: one per subnet it
/// holds, both families (flanneld adds IPv4's where EnableIPv4, IPv6's where EnableIPv6).
pub(super) fn blackholes_wanted(asked: bool, cfg: &NetworkConfig, held: &Held) -> Vec<IpNet> {
    if !asked {
        return Vec::new();
    }
    let v4 = cfg.enable_ipv4.then_some(IpNet::V4(held.subnet));
    let v6 = cfg.ipv6.and(held.subnet6).map(IpNet::V6);
    v4.into_iter().chain(v6).collect()
}

/// Re-add the `--ip-blackhole-route` routes someone removed (flanneld re-adds them every
/// `--iptables-resync` seconds); true if one had to be.
fn keep_blackholes(state: &AgentState) -> Result<bool> {
    let wanted = state.blackholes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let present = netdev::blackhole_routes()?;
    let mut restored = false;
    for subnet in wanted.iter().filter(|s| !present.contains(s)) {
        netdev::blackhole_route(*subnet)?;
        tracing::warn!(%subnet, "the blackhole route was missing; restored");
        restored = true;
    }
    Ok(restored)
}

/// Check the rules every `every` and restore what someone removed or changed, in a task of
/// its own: neither an etcd outage nor a slow iptables holds up the other.
pub(super) async fn resync_rules(rules: SharedRules, every: Duration, state: Arc<AgentState>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        // Netlink on a blocking thread, and only where --ip-blackhole-route asked for routes.
        if !state.blackholes.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            let st = state.clone();
            match tokio::task::spawn_blocking(move || keep_blackholes(&st)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %crate::error_chain(e.as_ref()), "checking the blackhole routes"),
                Err(e) => tracing::error!(error = %e, "the blackhole route task"),
            }
        }
        match ensure_rules(&rules).await {
            Ok(true) => {
                state.iptables_restores.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("iptables rules were missing or changed; restored");
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %crate::error_chain(e.as_ref()), "checking iptables rules"),
        }
    }
}

/// Of the blackhole routes `present`, those to remove: in the network (either family) and
/// not `wanted` (a subnet we no longer hold; it would swallow traffic to whichever node
/// holds it now). Others' blackhole routes outside the network are left alone.
pub(super) fn stale_blackholes(present: &[IpNet], wanted: &[IpNet], v4: Option<Ipv4Net>, v6: Option<Ipv6Net>) -> Vec<IpNet> {
    present
        .iter()
        .filter(|subnet| match subnet {
            IpNet::V4(n) => v4.is_some_and(|net| net.contains(n)),
            IpNet::V6(n) => v6.is_some_and(|net| net.contains(n)),
        })
        .filter(|subnet| !wanted.contains(subnet))
        .copied()
        .collect()
}

impl Daemon {
    /// What this node's rules depend on now.
    fn rule_inputs(&self) -> RuleInputs {
        // Where the guard's program cannot run, its rule: for the IPv4 tunnel address and a
        // dual-stack node's IPv6 one, on the underlay.
        let guard_firewall = self.ebpf.as_ref().is_some_and(|dp| dp.guard == crate::datapath::attach::Guard::Firewall);
        let mut guard_addrs: Vec<IpAddr> = Vec::new();
        if guard_firewall {
            if self.cfg.enable_ipv4 {
                guard_addrs.push(self.spec.underlay_ip.into());
            }
            if let Some(o6) = &self.v6 {
                guard_addrs.push(o6.public_ip.into());
            }
        }
        RuleInputs {
            ipv4: self.cfg.enable_ipv4.then_some((self.cfg.network, self.held.subnet)),
            ipv6: self.cfg.ipv6.zip(self.held.subnet6).map(|(c6, s6)| (c6.network, s6)),
            ip_masq: self.opts.ip_masq,
            masq_random: self.opts.masq_random,
            forward_rules: self.opts.forward_rules,
            // IP-in-IP has no port to single out: --notrack-tunnel is for the UDP tunnels
            // (said at start).
            notrack_tunnel: self.opts.notrack_tunnel && self.spec.mode != overlay_common::EncapMode::Ipip,
            nftables: self.cfg.enable_nftables,
            iface: self.spec.iface.clone(),
            underlay_ip: self.spec.underlay_ip,
            port: self.spec.port,
            tunnel: GuardedTunnel::of(self.spec.mode, self.spec.port),
            guard_addrs,
        }
    }

    /// The rules this node should have now (`wanted`, on this host's tools).
    pub(super) fn wanted_rules(&self) -> Firewall {
        wanted(&self.rule_inputs(), Tools::probe())
    }

    /// At start: this run's rules in, then what a previous run left that this one does not
    /// keep out: the other form's rules (the config switched between iptables and nftables,
    /// as flannel clears them), and ours that are no longer wanted (--ip-masq or the forward
    /// rules switched off, a family gone). Rules stay on exit, so this is where stale ones
    /// go: after ours are in, so that a rule moving from one form to the other (the guard's,
    /// flannel's) is never missing between them.
    pub(super) async fn install_rules(&mut self) -> Result<()> {
        *self.rules.lock().await = self.wanted_rules();
        let leftovers = self.rules.lock().await.leftovers(crate::nftables::has_iptables());
        ensure_rules(&self.rules).await.context("installing the masquerade and forward rules")?;
        let _ = tokio::task::spawn_blocking(move || leftovers.clear()).await;
        if self.ebpf.as_ref().is_some_and(|dp| dp.guard == crate::datapath::attach::Guard::Firewall) {
            crate::dataplane::retire_guard_program(&self.spec.bpffs_dir)?;
        }
        Ok(())
    }

    /// After a new address or subnet: the rules that name them follow, now.
    pub(super) async fn renew_rules(&self) -> Result<bool> {
        *self.rules.lock().await = self.wanted_rules();
        ensure_rules(&self.rules).await
    }

    /// The `--ip-blackhole-route` routes: for our subnets (IPv4 and IPv6, as flanneld) if
    /// asked for, and none left for a subnet we no longer hold. The resync task re-adds them
    /// (`keep_blackholes`).
    pub(super) fn sync_blackhole(&self) -> Result<()> {
        let wanted = blackholes_wanted(self.opts.blackhole_route, &self.cfg, &self.held);
        let v4 = self.cfg.enable_ipv4.then_some(self.cfg.network);
        let v6 = self.cfg.ipv6.map(|c6| c6.network);
        for subnet in stale_blackholes(&netdev::blackhole_routes()?, &wanted, v4, v6) {
            tracing::info!(%subnet, "removing a blackhole route for a subnet this node does not hold");
            netdev::del_blackhole_route(subnet)?;
        }
        for subnet in &wanted {
            netdev::blackhole_route(*subnet)?;
        }
        *self.state.blackholes.lock().unwrap_or_else(|p| p.into_inner()) = wanted;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// flanneld exits without br_netfilter (outside nftables mode); this agent warns, naming
    /// the missing switch of each family the network uses.
    #[test]
    fn a_missing_br_netfilter_is_a_warning_for_the_families_in_use() {
        let dir = std::env::temp_dir().join(format!("br-netfilter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = br_netfilter_warning(&dir, true, true, false).expect("both missing");
        assert!(w.contains("bridge-nf-call-iptables, bridge-nf-call-ip6tables missing") && w.contains("modprobe br_netfilter"), "{w}");
        assert_eq!(br_netfilter_warning(&dir, true, true, true), None, "nftables mode does not need it (flanneld neither)");
        std::fs::write(dir.join("bridge-nf-call-iptables"), "1").unwrap();
        assert_eq!(br_netfilter_warning(&dir, true, false, false), None);
        assert!(br_netfilter_warning(&dir, true, true, false).is_some_and(|w| w.contains("(bridge-nf-call-ip6tables missing")));
        std::fs::write(dir.join("bridge-nf-call-ip6tables"), "1").unwrap();
        assert_eq!(br_netfilter_warning(&dir, true, true, false), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Rules stay on exit, so the start clears what this run does not keep: the other form's,
    /// and ours that a changed flag or network config no longer asks for.
    #[test]
    fn the_start_clears_exactly_the_rules_this_run_does_not_keep() {
        let n: ipnet::Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let s: ipnet::Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let (m, f) = (iptables::masquerade(n, s, iptables::MasqRandom::Fully), iptables::forward(n));
        let all = [
            ("iptables", "FLANNEL-POSTRTG"),
            ("iptables", "FLANNEL-FWD"),
            ("ip6tables", "FLANNEL-POSTRTG"),
            ("ip6tables", "FLANNEL-FWD"),
            ("iptables", "OVERLAY-GUARD"),
            ("ip6tables", "OVERLAY-GUARD"),
            ("iptables", "OVERLAY-NOTRACK"),
            ("iptables", "OVERLAY-NOTRACK-OUT"),
        ];
        // Both IPv4 chains kept: the IPv6 ones and both nftables tables go.
        let l = Firewall::Iptables(vec![m.clone(), f.clone()], vec![]).leftovers(true);
        assert_eq!(l, Leftovers { chains: all[2..].to_vec(), nft_ipv4: true, nft_ipv6: true, nft_guard4: true, nft_guard6: true, nft_notrack: true });
        // --ip-masq switched off: its chain goes, the forward chain stays.
        let l = Firewall::Iptables(vec![f.clone()], vec![]).leftovers(true);
        assert_eq!(l.chains, vec![all[0], all[2], all[3], all[4], all[5], all[6], all[7]]);
        // Neither wanted: every chain goes.
        assert_eq!(Firewall::Iptables(vec![], vec![]).leftovers(true).chains, all.to_vec());
        // nftables mode: every iptables chain goes (where iptables exists), and a family's
        // table goes when this run keeps nothing in it.
        let v4 = crate::nftables::NftRules { ipv6: false, masq: None, forward: Some(n.into()) };
        let l = Firewall::Nft(vec![v4.clone()], vec![], None).leftovers(true);
        assert_eq!(l, Leftovers { chains: all.to_vec(), nft_ipv4: false, nft_ipv6: true, nft_guard4: true, nft_guard6: true, nft_notrack: true });
        assert_eq!(Firewall::Nft(vec![v4.clone()], vec![], None).leftovers(false).chains, vec![], "no iptables on the host: no chain to look for");
        let empty = crate::nftables::NftRules { ipv6: false, masq: None, forward: None };
        assert!(Firewall::Nft(vec![empty], vec![], None).leftovers(false).nft_ipv4, "an empty table is not kept");
        // The guard's rule where its program cannot run: kept in the form the node uses.
        let g = iptables::guard("iptables", "eth0", "192.168.100.1".parse().unwrap(), GuardedTunnel::Udp(8472));
        let l = Firewall::Iptables(vec![g, f.clone()], vec![]).leftovers(true);
        assert!(!l.chains.contains(&("iptables", "OVERLAY-GUARD")) && l.chains.contains(&("ip6tables", "OVERLAY-GUARD")), "{l:?}");
        assert!(l.nft_guard4 && l.nft_guard6, "{l:?}");
        let ng = crate::nftables::NftGuard { iface: "eth0".into(), addr: "192.168.100.1".parse().unwrap(), tunnel: GuardedTunnel::Udp(8472) };
        // iptables for flannel's rules, nftables for the guard (where nft exists).
        let l = Firewall::Iptables(vec![f.clone()], vec![ng.clone()]).leftovers(true);
        assert!(l.chains.contains(&("iptables", "OVERLAY-GUARD")) && !l.nft_guard4 && l.nft_guard6 && l.nft_ipv4, "{l:?}");
        let l = Firewall::Nft(vec![v4], vec![ng], None).leftovers(true);
        assert!(!l.nft_guard4 && l.nft_guard6 && l.chains.contains(&("iptables", "OVERLAY-GUARD")), "{l:?}");
    }


    fn inputs() -> RuleInputs {
        RuleInputs {
            ipv4: Some(("10.244.0.0/16".parse().unwrap(), "10.244.1.0/24".parse().unwrap())),
            ipv6: None,
            ip_masq: true,
            masq_random: MasqRandom::Fully,
            forward_rules: true,
            notrack_tunnel: false,
            nftables: false,
            iface: "eth0".into(),
            underlay_ip: "192.168.100.1".parse().unwrap(),
            port: 8472,
            tunnel: GuardedTunnel::Udp(8472),
            guard_addrs: vec![],
        }
    }
    const BOTH: Tools = Tools { iptables: true, nft: true };

    /// flannel's choice of form: iptables chains unless the config says EnableNFTables or
    /// the host has no iptables; each family the node has gets masquerade and forward rules.
    #[test]
    fn the_rules_take_flannels_form_for_each_family_the_node_has() {
        let i = inputs();
        let (n, s) = i.ipv4.unwrap();
        assert_eq!(wanted(&i, BOTH), Firewall::Iptables(vec![iptables::masquerade(n, s, MasqRandom::Fully), iptables::forward(n)], vec![]));
        let nft = NftRules { ipv6: false, masq: Some((n.into(), s.into(), MasqRandom::Fully)), forward: Some(n.into()) };
        assert_eq!(wanted(&RuleInputs { nftables: true, ..i.clone() }, BOTH), Firewall::Nft(vec![nft.clone()], vec![], None));
        assert_eq!(wanted(&i, Tools { iptables: false, nft: true }), Firewall::Nft(vec![nft], vec![], None), "no iptables: nftables, as flannel");
        // Dual stack: the IPv6 network's rules too; IPv6-only: only those.
        let (n6, s6): (Ipv6Net, Ipv6Net) = ("fd00:10::/56".parse().unwrap(), "fd00:10:0:1::/64".parse().unwrap());
        let dual = RuleInputs { ipv6: Some((n6, s6)), ..i.clone() };
        let Firewall::Iptables(chains, _) = wanted(&dual, BOTH) else { panic!("iptables form") };
        assert_eq!(chains, vec![
            iptables::masquerade(n, s, MasqRandom::Fully),
            iptables::masquerade6(n6, s6, MasqRandom::Fully),
            iptables::forward(n),
            iptables::forward6(n6),
        ]);
        let only6 = RuleInputs { ipv4: None, ..dual.clone() };
        assert_eq!(wanted(&only6, BOTH), Firewall::Iptables(vec![iptables::masquerade6(n6, s6, MasqRandom::Fully), iptables::forward6(n6)], vec![]));
        // Neither flag: nothing of flannel's.
        let none = RuleInputs { ip_masq: false, forward_rules: false, ..i.clone() };
        assert_eq!(wanted(&none, BOTH), Firewall::Iptables(vec![], vec![]));
        assert_eq!(wanted(&RuleInputs { nftables: true, ..none }, BOTH), Firewall::Nft(vec![NftRules { ipv6: false, masq: None, forward: None }], vec![], None));
    }

    /// The guard's rule (where its program cannot run) takes nftables wherever nft exists,
    /// whichever form flannel's take; notrack is for the IPv4 tunnel only.
    #[test]
    fn the_guard_prefers_nftables_and_notrack_needs_ipv4() {
        let a: IpAddr = "192.168.100.1".parse().unwrap();
        let i = RuleInputs { ip_masq: false, forward_rules: false, guard_addrs: vec![a], ..inputs() };
        let g = NftGuard { iface: "eth0".into(), addr: a, tunnel: GuardedTunnel::Udp(8472) };
        assert_eq!(wanted(&i, BOTH), Firewall::Iptables(vec![], vec![g.clone()]));
        assert_eq!(wanted(&i, Tools { iptables: true, nft: false }), Firewall::Iptables(vec![iptables::guard("iptables", "eth0", a, GuardedTunnel::Udp(8472))], vec![]));
        let n = RuleInputs { nftables: true, notrack_tunnel: true, ..i.clone() };
        let notrack = NftNotrack { addr: "192.168.100.1".parse().unwrap(), port: 8472 };
        assert_eq!(wanted(&n, BOTH), Firewall::Nft(vec![NftRules { ipv6: false, masq: None, forward: None }], vec![g], Some(notrack)));
        let t = RuleInputs { notrack_tunnel: true, ..i.clone() };
        let Firewall::Iptables(chains, _) = wanted(&t, BOTH) else { panic!("iptables form") };
        assert_eq!(chains, iptables::notrack("192.168.100.1".parse().unwrap(), 8472).to_vec());
        let only6 = RuleInputs { ipv4: None, ipv6: Some(("fd00:10::/56".parse().unwrap(), "fd00:10:0:1::/64".parse().unwrap())), notrack_tunnel: true, guard_addrs: vec![], ..i };
        assert_eq!(wanted(&only6, BOTH), Firewall::Iptables(vec![], vec![]), "no IPv4 tunnel: no notrack");
    }

    /// An ipip node's guard keeps IP-in-IP, not a UDP port, off its tunnel device.
    #[test]
    fn an_ipip_nodes_guard_is_for_protocol_4() {
        let a: IpAddr = "192.168.100.1".parse().unwrap();
        let i = RuleInputs { ip_masq: false, forward_rules: false, guard_addrs: vec![a], tunnel: GuardedTunnel::Ipip, ..inputs() };
        let Firewall::Iptables(_, guards) = wanted(&i, BOTH) else { panic!("iptables form") };
        let p = iptables::ipip_protocol_name();
        assert_eq!(guards[0].rules(), vec![format!("iifname != \"eth0\" ip daddr 192.168.100.1 ip protocol {p} counter drop")]);
        let Firewall::Iptables(chains, _) = wanted(&i, Tools { iptables: true, nft: false }) else { panic!("iptables form") };
        assert_eq!(chains[0].rules.iter().map(|r| r.join(" ")).collect::<Vec<_>>(), vec![format!("-d 192.168.100.1/32 ! -i eth0 -p {p} -j DROP")]);
    }

    /// A blackhole route goes when it is in the network and not wanted; others' outside the
    /// network stay.
    #[test]
    fn blackhole_routes_in_the_network_that_we_do_not_hold_go() {
        let net = |s: &str| -> IpNet { s.parse().unwrap() };
        let present = [net("10.244.1.0/24"), net("10.244.7.0/24"), net("192.168.5.0/24"), net("fd00:10:0:9::/64"), net("fd99::/64")];
        let wanted = [net("10.244.1.0/24")];
        let (v4, v6) = (Some("10.244.0.0/16".parse().unwrap()), Some("fd00:10::/56".parse().unwrap()));
        assert_eq!(stale_blackholes(&present, &wanted, v4, v6), vec![net("10.244.7.0/24"), net("fd00:10:0:9::/64")]);
        assert_eq!(stale_blackholes(&present, &wanted, v4, None), vec![net("10.244.7.0/24")], "no IPv6 network: IPv6 routes are not ours");
        assert_eq!(stale_blackholes(&present, &present, v4, v6), vec![]);
    }
}
