//! The agent in flanneld's place: config -> lease -> data plane -> watch -> reconcile.
//!
//! Design notes:
//! - etcd trouble is never fatal once the data plane is up: the maps keep forwarding with the
//!   last known routes while the agent retries with backoff (100 ms doubling to 5 s).
//! - The watch starts at the listed revision + 1, so no change between list and watch is
//!   lost. When etcd has compacted that revision (or the stream breaks), the agent lists
//!   again and reconciles in full, which also removes routes that no lease backs any more
//!   (flannel #2554: routes of peers deleted while the daemon was down stayed forever).
//! - flannel exits when its own lease disappears; this agent re-claims it (the same subnet
//!   if still free) and says so loudly, because exiting would leave the node's containers
//!   unreachable until someone restarts it.

//!
//! The driver is `start` and `watch_loop`; each concern is a module of its own, its
//! decisions free of I/O and unit-tested: `etcd` (retries), `bringup` (the underlay and the
//! data plane), `lease` (the lease's lifecycle), `routes` (leases to routes), `heal`
//! (self-healing and address following), `rules` (the firewall rules and blackhole routes).

mod bringup;
mod etcd;
mod heal;
mod lease;
mod routes;
mod rules;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use overlay_common::EncapMode;
use tokio::sync::mpsc;

use self::{
    etcd::{retry, Backoff, WATCH_STABLE},
    lease::{keeper_report, Held},
    rules::{resync_rules, SharedRules},
};
use crate::{
    config::NetworkConfig,
    dataplane::{self, DecapHook, NodeSpec},
    health::AgentState,
    iptables,
    lease::{keeper::KeeperEvent, registry::{EtcdOptions, Registry}, LeaseAttrs},
    netdev, subnet_file,
};

#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub etcd: EtcdOptions,
    pub iface: netdev::IfaceChoice,
    pub public_ip: Option<Ipv4Addr>,
    /// flannel's --public-ipv6 (dual stack).
    pub public_ipv6: Option<Ipv6Addr>,
    pub subnet_file: PathBuf,
    pub lease_ttl: Duration,
    pub renew_margin: Duration,
    pub decap_hook: DecapHook,
    pub bpffs_dir: PathBuf,
    pub ip_masq: bool,
    /// Port randomisation of the masquerade rules.
    pub masq_random: iptables::MasqRandom,
    /// flannel's --ip-blackhole-route.
    pub blackhole_route: bool,
    /// Install flannel's FLANNEL-FWD accept rules (flannel's --iptables-forward-rules).
    pub forward_rules: bool,
    /// Take our tunnel datagrams out of connection tracking (--notrack-tunnel, opt-in).
    pub notrack_tunnel: bool,
    /// How often iptables rules are checked and restored.
    pub iptables_resync: Duration,
    /// Where to serve /healthz, /readyz and /metrics (None: off).
    pub healthz: Option<SocketAddr>,
    pub dataplane: DataplaneKind,
    pub delivery: dataplane::DecapDelivery,
    pub inner_source: dataplane::InnerSourceCheck,
    pub max_routes: u32,
    pub max_peers: u32,
    /// How TC programs are attached (hidden flag; TCX where the kernel has it).
    pub tc_attach: crate::datapath::attach::TcAttachChoice,
    /// How the socket guard runs (hidden flag; its program where the kernel can run it).
    pub guard: crate::datapath::attach::GuardChoice,
    /// Behave as if the eBPF data plane could not run (hidden flag, for tests).
    pub ebpf_unavailable: bool,
}

/// Which data plane forwards the node's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneKind {
    /// TC/XDP programs in the kernel.
    Ebpf,
    /// A TUN device and a userspace UDP forwarder (flannel's udp backend design).
    Tun,
}

struct Daemon {
    opts: DaemonOptions,
    reg: Registry,
    cfg: NetworkConfig,
    attrs: LeaseAttrs,
    spec: NodeSpec,
    held: Held,
    maps: Box<dyn crate::tun::RouteTable>,
    /// The eBPF data plane (kept for the lifetime of the agent: program logs).
    ebpf: Option<dataplane::Dataplane>,
    /// The TUN data plane (its threads run until the process exits).
    tun: Option<crate::tun::TunDataplane>,
    /// A dual-stack node's IPv6 device and its peer routes.
    v6: Option<crate::datapath::ipv6::Overlay6>,
    /// A dual-stack wireguard node's IPv6 side: flannel-wg-v6 and its peers.
    wg6: Option<crate::datapath::wireguard::WireguardPeers6>,
    state: Arc<AgentState>,
    /// The iptables chains this node should have (masquerade and/or forward), shared with the
    /// resync task.
    rules: SharedRules,
    /// The task renewing our etcd lease, and what it reports (none for a reservation).
    keeper: Option<(tokio::task::JoinHandle<()>, mpsc::UnboundedReceiver<KeeperEvent>)>,
    /// What else runs on the underlay's TC ingress hook, as last logged.
    decap_chain: crate::datapath::attach::Chain,
    /// The peers' routes must be worked out again from a fresh listing (wireguard Mode auto
    /// chooses each peer's address family by our own IPv6 address, which moved).
    relist: bool,
    /// When the routes were last reconciled again because they had drifted.
    drift_reconciled: Option<Instant>,
}

/// A future that is `f` if given, else never ready.
fn futures_either(f: Option<impl std::future::Future<Output = Result<()>>>) -> impl std::future::Future<Output = Result<()>> {
    async move {
        match f {
            Some(f) => f.await,
            None => std::future::pending().await,
        }
    }
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

pub fn default_device(mode: EncapMode, vni: u32) -> String {
    match mode {
        EncapMode::Vxlan => format!("flannel.{vni}"),
        EncapMode::Udp => "flannel0".to_string(),
        EncapMode::Ipip => crate::dataplane::IPIP_DEVICE.to_string(),
    }
}

/// Run the agent until `shutdown` resolves. The data plane and the masquerade and forward
/// rules stay in place afterwards, so that forwarding, masqueraded egress and new connections
/// through docker's FORWARD DROP go on while the agent restarts (flannel since v0.27 keeps
/// its rules on exit too, and clears stale ones when it starts); `teardown` removes them.
pub async fn run(opts: DaemonOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    tokio::pin!(shutdown);
    let state = Arc::new(AgentState::new(opts.bpffs_dir.clone()));
    let health = {
        let st = state.clone();
        let addr = opts.healthz;
        async move {
            match addr {
                Some(a) => crate::health::serve(a, st).await,
                None => std::future::pending().await,
            }
        }
    };
    tokio::pin!(health);
    notify(&[sd_notify::NotifyState::Status("connecting to etcd")]);
    let mut d = tokio::select! {
        d = Daemon::start(opts, state) => d?,
        r = &mut health => return r,
        _ = &mut shutdown => return Ok(()),
    };
    // The log reader takes the ring buffer out of the loaded object and owns it, so the
    // daemon can then borrow itself mutably.
    let resync = tokio::spawn(resync_rules(d.rules.clone(), d.opts.iptables_resync, d.state.clone()));
    let logs = futures_either(d.ebpf.as_mut().map(|dp| crate::program_logs(&mut dp.ebpf)));
    let r = tokio::select! {
        r = d.watch_loop() => r,
        r = logs => r,
        r = &mut health => r,
        _ = &mut shutdown => Ok(()),
    };
    notify(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Status("stopping; the data plane keeps forwarding")]);
    resync.abort();
    // A check in flight finishes before the process exits (it holds the lock); the rules
    // themselves stay.
    drop(d.rules.lock().await);
    r
}

impl Daemon {
    /// config -> underlay -> lease -> data plane -> rules: the node as flanneld leaves it,
    /// with the subnet file written last.
    async fn start(opts: DaemonOptions, state: Arc<AgentState>) -> Result<Daemon> {
        let mut reg = etcd::connect(&opts.etcd).await?;
        notify(&[sd_notify::NotifyState::Status("waiting for the network config")]);
        let cfg = etcd::network_config(&mut reg).await?;
        let (mut spec, plan, public_ipv6) = bringup::underlay(&opts, &cfg)?;
        let mut v6 = bringup::ipv6_overlay(&cfg, &spec, public_ipv6)?;
        let wireguard_ipv6 = match cfg.backend.wireguard {
            Some(_) => bringup::public_ipv6(&cfg, &spec, public_ipv6)?,
            None => None,
        };
        let (attrs, wireguard) = bringup::lease_attrs(&cfg, &mut spec, v6.as_ref(), wireguard_ipv6)?;
        notify(&[sd_notify::NotifyState::Status("acquiring a subnet lease")]);
        let previous = lease::previous_key(subnet_file::read_previous(&opts.subnet_file), cfg.enable_ipv4);
        let held = lease::acquire(&mut reg, &cfg, &attrs, previous, &opts).await?;
        state.set_lease(held.key().primary(), held.expires());
        spec.subnet = held.subnet;
        let wg6 = bringup::wireguard_v6(&cfg, &spec, &held, wireguard.as_ref(), wireguard_ipv6)?;
        let up = bringup::dataplane(plan, &opts, &cfg, &mut spec, &held, &state, v6.as_ref(), wireguard).await?;
        bringup::ipv6_side(&cfg, &spec, &held, v6.as_mut(), up.ebpf.is_some())?;
        let mut d = Daemon {
            opts,
            reg,
            cfg,
            attrs,
            spec,
            held,
            maps: up.maps,
            ebpf: up.ebpf,
            tun: up.tun,
            v6,
            wg6,
            state,
            rules: SharedRules::default(),
            keeper: None,
            decap_chain: Default::default(),
            relist: false,
            drift_reconciled: None,
        };
        d.start_keeper();
        d.install_rules().await?;
        d.sync_blackhole()?;
        lease::write_subnet_file(&d.opts, &d.cfg, &held, up.mtu)?;
        tracing::info!(
            lease = %held.key(), public_ip = %d.spec.public_ip, device = %d.spec.device, mtu = up.mtu,
            "lease held, data plane up, subnet file written"
        );
        Ok(d)
    }
}

/// The least time between two reconciles for drifted routes: a route that cannot be written
/// must not make the agent list etcd every second.
const DRIFT_RECONCILE_GAP: Duration = Duration::from_secs(10);

impl Daemon {
    /// Whether the route table drifted (checked every tick, acted on at most every
    /// `DRIFT_RECONCILE_GAP`).
    fn routes_drifted(&mut self) -> bool {
        if self.drift_reconciled.is_some_and(|t| t.elapsed() < DRIFT_RECONCILE_GAP) || !self.maps.drifted() {
            return false;
        }
        self.drift_reconciled = Some(Instant::now());
        true
    }
}

enum Wake {
    Watch(Result<Option<etcd_client::WatchResponse>, etcd_client::Error>),
    Keeper(Option<KeeperEvent>),
    Heal,
}

/// How often the overlay device, its address and its route are checked (netlink reads).
const HEAL_EVERY: Duration = Duration::from_secs(1);

impl Daemon {
    /// List, reconcile, watch; again after compaction or a broken stream. Never returns
    /// except on a fatal error.
    async fn watch_loop(&mut self) -> Result<()> {
        let mut backoff = Backoff::new();
        loop {
            let mut listing = retry("listing leases", &mut self.reg, |r| Box::pin(r.list_leases())).await?;
            for (key, e) in &listing.malformed {
                self.skipped_lease(key, e);
            }
            listing.leases.retain(|l| self.takes(&l.key()));
            if !listing.leases.iter().any(|l| l.key() == self.held.key() && self.attrs.same_node(&l.attrs)) {
                self.lost_lease("missing from etcd").await?;
                continue;
            }
            self.reconcile_all(&listing.leases)?;
            if !self.state.ready.swap(true, Ordering::SeqCst) {
                let routes6 = self.v6.as_ref().map_or(0, |o6| o6.route_count()) + self.wg6.as_ref().map_or(0, |w6| w6.route_count());
                let status = format!("lease {} held; {} routes, {routes6} IPv6 routes", self.held.key(), self.maps.routes()?.len());
                notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
                tracing::info!("ready: {status}");
            }
            let mut stream = match self.reg.watch(listing.revision + 1).await {
                Ok(s) => s,
                Err(e) if e.is_retryable() => {
                    let wait = backoff.next();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot watch leases; retrying");
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(e) => return Err(e).context("watching the leases"),
            };
            // The backoff starts afresh only after a watch that lasted: a stream that fails at
            // once must not relist at full speed.
            let watching_since = Instant::now();
            let mut heal = tokio::time::interval(HEAL_EVERY);
            heal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let wake = tokio::select! {
                    m = stream.message() => Wake::Watch(m),
                    ev = keeper_report(&mut self.keeper) => Wake::Keeper(ev),
                    _ = heal.tick() => Wake::Heal,
                };
                match wake {
                    Wake::Keeper(ev) => self.keeper_event(ev).await?,
                    Wake::Heal => {
                        self.heal().await;
                        // One IPv6 rebuild a tick at most: following a new address first (a
                        // heal would rebuild on the old one).
                        if !self.follow_public_ipv6().await? {
                            self.heal_v6().await?;
                        }
                        self.settle_v6().await?;
                        if std::mem::take(&mut self.relist) {
                            break;
                        }
                        if self.follow_public_ip().await? {
                            // The watch's connection came from the old address: list and
                            // watch again on the new one.
                            break;
                        }
                        if self.routes_drifted() {
                            // Routes kept in two places came apart (an ipip device made
                            // again took its routes): the listing writes them again.
                            tracing::warn!("the kernel's routes and the route map came apart; reconciling with etcd again");
                            break;
                        }
                    }
                    Wake::Watch(Ok(Some(resp))) => {
                        if resp.canceled() {
                            if resp.compact_revision() > 0 {
                                // Expected now and then: list at once.
                                tracing::warn!(compacted_to = resp.compact_revision(), "etcd compacted the watched revision; listing again");
                            } else {
                                if watching_since.elapsed() >= WATCH_STABLE {
                                    backoff.reset();
                                }
                                let wait = backoff.next();
                                tracing::warn!(reason = resp.cancel_reason(), retry_in_ms = wait.as_millis() as u64, "etcd cancelled the watch; listing again");
                                tokio::time::sleep(wait).await;
                            }
                            break;
                        }
                        let events = self.reg.events(&resp);
                        for ev in events {
                            self.handle(ev).await?;
                        }
                    }
                    Wake::Watch(end) => {
                        self.state.etcd_reconnects.fetch_add(1, Ordering::Relaxed);
                        notify(&[sd_notify::NotifyState::Status("etcd unreachable; retrying (the data plane keeps forwarding)")]);
                        if watching_since.elapsed() >= WATCH_STABLE {
                            backoff.reset();
                        }
                        let wait = backoff.next();
                        let error = match end {
                            Err(e) => crate::error_chain(&e),
                            Ok(_) => "the stream ended".to_string(),
                        };
                        tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "lost the etcd watch; reconnecting and listing again");
                        tokio::time::sleep(wait).await;
                        break;
                    }
                }
            }
        }
    }

}
