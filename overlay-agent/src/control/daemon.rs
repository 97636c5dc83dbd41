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

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio::sync::mpsc;
use overlay_common::EncapMode;

use crate::{
    config::{self, NetworkConfig},
    dataplane::{self, DecapHook, NodeSpec},
    health::AgentState,
    iptables::{self, ChainRules},
    lease::{
        acquire::{Acquisition, Outcome, Step, MAX_ATTEMPTS},
        keeper::{self, KeeperEvent},
        registry::{EtcdOptions, LeaseEvent, Registry, RegistryError},
        LeaseAttrs, LeaseKey,
    },
    maps::{Maps, MapsError},
    netdev, reconcile,
    subnet_file::{self, SubnetEnv},
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

/// Exponential backoff between etcd retries (100 ms doubling to 5 s), with jitter: each
/// wait is drawn from the upper half of its step, so that nodes which lost etcd together do
/// not all come back in the same instant.
struct Backoff(Duration);
impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);
    fn new() -> Self {
        Self(Self::MIN)
    }
    /// The next wait (and the step grows).
    fn next(&mut self) -> Duration {
        let step = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
    fn reset(&mut self) {
        self.0 = Self::MIN;
    }
}

/// A watch that lasted this long was healthy: the next failure starts the backoff afresh.
const WATCH_STABLE: Duration = Duration::from_secs(30);

/// Run `op` until it succeeds or fails with an error retrying cannot fix.
async fn retry<T, F>(what: &str, reg: &mut Registry, mut op: F) -> Result<T>
where
    F: for<'a> FnMut(&'a mut Registry) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, RegistryError>> + 'a>>,
{
    let mut backoff = Backoff::new();
    loop {
        match op(reg).await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                let wait = backoff.next();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what} failed; etcd unavailable, retrying (the data plane keeps forwarding)");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e).context(what.to_string()),
        }
    }
}

async fn connect(opts: &EtcdOptions) -> Result<Registry> {
    let mut backoff = Backoff::new();
    loop {
        match Registry::connect(opts).await {
            Ok(r) => return Ok(r),
            Err(e) if e.is_retryable() => {
                let wait = backoff.next();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot reach etcd; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e).context("connecting to etcd"),
        }
    }
}

/// Wait for a network config at `<prefix>/config` (logged retries, as flanneld does);
/// refuse an invalid one.
async fn network_config(reg: &mut Registry) -> Result<NetworkConfig> {
    let mut logged = false;
    loop {
        let raw = retry("reading the network config", reg, |r| Box::pin(r.get_config())).await?;
        match raw {
            Some(json) => {
                let cfg = config::parse(&json).with_context(|| format!("invalid network config at {}", reg.config_key()))?;
                for w in &cfg.warnings {
                    tracing::warn!("network config: {w}");
                }
                return Ok(cfg);
            }
            None => {
                if !logged {
                    tracing::warn!(key = %reg.config_key(), "no network config yet; waiting for one (etcdctl put {} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}')", reg.config_key());
                    logged = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// This node's lease.
#[derive(Clone, Copy, Debug)]
struct Held {
    subnet: Ipv4Net,
    /// A dual-stack node's IPv6 subnet.
    subnet6: Option<Ipv6Net>,
    /// 0 for a reservation (a key without an etcd lease: never expires, never renewed).
    etcd_lease: i64,
    /// The TTL etcd granted (unused for a reservation).
    ttl: Duration,
    /// When it was granted or last renewed.
    since: Instant,
}

impl Held {
    fn reservation(key: LeaseKey) -> Self {
        Held { subnet: key.v4, subnet6: key.v6, etcd_lease: 0, ttl: Duration::ZERO, since: Instant::now() }
    }
    /// The key our lease has in etcd.
    fn key(&self) -> LeaseKey {
        LeaseKey { v4: self.subnet, v6: self.subnet6 }
    }
    fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }
    /// When it expires unless renewed (`None`: a reservation).
    fn expires(&self) -> Option<Instant> {
        (!self.is_reservation()).then(|| self.since + self.ttl)
    }
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
    state: Arc<AgentState>,
    /// The iptables chains this node should have (masquerade and/or forward), shared with the
    /// resync task.
    rules: SharedRules,
    /// The task renewing our etcd lease, and what it reports (none for a reservation).
    keeper: Option<(tokio::task::JoinHandle<()>, mpsc::UnboundedReceiver<KeeperEvent>)>,
    /// What else runs on the underlay's TC ingress hook, as last logged.
    decap_chain: crate::datapath::attach::Chain,
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

/// Whether `e` says etcd no longer knows the lease.
fn lease_gone(e: &anyhow::Error) -> bool {
    e.downcast_ref::<RegistryError>().is_some_and(RegistryError::is_lease_gone)
}

/// Claim a subnet for this node: `lease::acquire` decides each step (flannel's algorithm:
/// reuse our lease or reservation if it still fits the config, deleting ours that do not,
/// else claim a free subnet, the previous one first); this performs them against etcd.
async fn acquire(
    reg: &mut Registry,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<LeaseKey>,
    opts: &DaemonOptions,
) -> Result<Held> {
    let (mut acq, mut step) = Acquisition::start(cfg, attrs, previous);
    loop {
        let outcome = match step {
            Step::List => {
                let listing = retry("listing leases", reg, |r| Box::pin(r.list_leases())).await?;
                Outcome::Listed(listing.leases)
            }
            Step::Delete(stale) => {
                tracing::warn!(lease = %stale, network = %cfg.describe(), "this node's lease no longer fits the network config; deleting it, as flannel does");
                retry("deleting a lease that no longer fits", reg, move |r| Box::pin(async move { r.delete_lease(stale).await })).await?;
                Outcome::Done
            }
            // A reservation (flannel's Documentation/reservations.md): used as it is, with our
            // attributes written into it and no TTL, never renewed and never re-claimed.
            Step::TakeReservation(k) => {
                retry("updating our reservation", reg, |r| {
                    let a = attrs.clone();
                    Box::pin(async move { r.update(k, &a, 0).await })
                })
                .await?;
                tracing::info!(lease = %k, "using this node's reservation (no TTL: never expires, never renewed)");
                Outcome::Done
            }
            // A lease etcd no longer knows (expired meanwhile) answers as an expired renewal.
            Step::Renew { key: k, etcd_lease } => Outcome::Renewed(
                match retry("renewing our lease", reg, |r| {
                    let a = attrs.clone();
                    Box::pin(async move {
                        r.update(k, &a, etcd_lease).await?;
                        r.keep_alive(etcd_lease).await
                    })
                })
                .await
                {
                    Err(e) if lease_gone(&e) => 0,
                    r => r?,
                },
            ),
            Step::Claim(k) => {
                let ttl = opts.lease_ttl;
                let claimed = retry("claiming a subnet", reg, |r| {
                    let a = attrs.clone();
                    Box::pin(async move { r.claim(k, &a, ttl).await })
                })
                .await?;
                if claimed.is_none() {
                    tracing::info!(lease = %k, "subnet taken concurrently; choosing again");
                }
                Outcome::Claimed(claimed)
            }
            Step::Acquired { key, etcd_lease: 0, .. } => return Ok(Held::reservation(key)),
            Step::Acquired { key, etcd_lease, ttl_secs } => {
                match ttl_secs {
                    Some(_) => tracing::info!(lease = %key, "reusing this node's existing lease"),
                    None => tracing::info!(lease = %key, "leased a subnet"),
                }
                let ttl = ttl_secs.map_or(opts.lease_ttl, |t| Duration::from_secs(t as u64));
                return Ok(Held { subnet: key.v4, subnet6: key.v6, etcd_lease, ttl, since: Instant::now() });
            }
            Step::Exhausted => bail!(
                "no free subnet in {}: every subnet is leased; widen the network or remove stale leases (overlay-agent leases)",
                cfg.describe()
            ),
            Step::GaveUp => bail!(
                "could not claim a subnet after {MAX_ATTEMPTS} listings: other nodes kept taking the chosen ones"
            ),
        };
        step = acq.next(outcome, &mut rand::rng());
    }
}

pub fn default_device(mode: EncapMode, vni: u32) -> String {
    match mode {
        EncapMode::Vxlan => format!("flannel.{vni}"),
        EncapMode::Udp => "flannel0".to_string(),
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
async fn start(opts: DaemonOptions, state: Arc<AgentState>) -> Result<Daemon> {
    let mut reg = connect(&opts.etcd).await?;
    notify(&[sd_notify::NotifyState::Status("waiting for the network config")]);
    let cfg = network_config(&mut reg).await?;
    // An IPv6-only node has no IPv4 address to announce: its interface is chosen by its IPv6
    // address, and its lease says PublicIP 0.0.0.0, as flannel's.
    let (iface, public_ip, underlay_ip, public_ipv6) = if cfg.enable_ipv4 {
        let u = netdev::resolve_interface(&opts.iface, opts.public_ip)?;
        (u.iface, u.public_ip, u.tunnel_ip, opts.public_ipv6)
    } else {
        if opts.public_ip.is_some() {
            tracing::warn!("--public-ip is ignored: the network is IPv6-only (EnableIPv4 false); --public-ipv6 gives the address");
        }
        let (iface, ip6) = netdev::resolve_interface6(&opts.iface, opts.public_ipv6)?;
        (iface, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Some(ip6))
    };
    tracing::info!(%iface, %public_ip, tunnel_endpoint = %underlay_ip, public_ipv6 = ?public_ipv6.map(|a| a.to_string()), "underlay interface chosen");
    if let Some(w) = br_netfilter_warning(std::path::Path::new(BRIDGE_SYSCTLS), cfg.enable_ipv4, cfg.ipv6.is_some(), cfg.enable_nftables) {
        tracing::warn!("{w}");
    }
    let mode = cfg.backend.mode;
    let mut spec = NodeSpec {
        iface,
        public_ip,
        underlay_ip,
        network: cfg.network,
        subnet: cfg.network, // replaced by the leased subnet below
        mode,
        vni: cfg.backend.vni,
        port: cfg.backend.port,
        // An IPv6-only node's one overlay device is flannel-v6's.
        device: if cfg.enable_ipv4 { default_device(mode, cfg.backend.vni) } else { crate::datapath::ipv6::device_name(cfg.backend.vni) },
        decap_hook: opts.decap_hook,
        bpffs_dir: opts.bpffs_dir.clone(),
        mtu: cfg.backend.mtu.map(dataplane::MtuAsked::Underlay),
        delivery: opts.delivery,
        inner_source: opts.inner_source,
        flannel_peers: Vec::new(),
        max_routes: opts.max_routes,
        max_peers: opts.max_peers,
        tc_attach: opts.tc_attach,
        guard: opts.guard,
    };
    if opts.dataplane == DataplaneKind::Tun && !cfg.enable_ipv4 {
        bail!("--dataplane tun carries IPv4 only; an IPv6-only network (EnableIPv4 false) runs on the eBPF data plane (leave --dataplane at ebpf)");
    }
    if opts.dataplane == DataplaneKind::Tun && mode != EncapMode::Udp {
        bail!("--dataplane tun implements flannel's udp backend; the network config has Backend.Type {:?} (set \"udp\")", cfg.backend.type_name());
    }
    // Dual stack and IPv6-only: flannel-v6.<VNI> on the node's public IPv6 address.
    let mut v6 = match cfg.ipv6 {
        Some(_) => {
            let public_ipv6 = match public_ipv6 {
                Some(a) => a,
                None => netdev::first_ipv6(&spec.iface)?.with_context(|| {
                    format!("EnableIPv6 is set but {} has no global IPv6 address: give it one or pass --public-ipv6", spec.iface)
                })?,
            };
            let o6 = crate::datapath::ipv6::Overlay6::up(cfg.backend.vni, cfg.backend.port, public_ipv6, &spec.iface, cfg.backend.mtu)?;
            let stack = if cfg.enable_ipv4 { "dual stack" } else { "IPv6-only" };
            tracing::info!(device = %o6.device, %public_ipv6, vtep_mac = %netdev::format_mac(&o6.mac), mtu = o6.mtu, "IPv6 overlay device up ({stack})");
            Some(o6)
        }
        None => None,
    };
    // What the lease says: the IPv4 side's (its device's MAC made here), and flannel-v6's
    // address and MAC on a dual-stack node; an IPv6-only node's has only the latter.
    let attrs = match (&v6, mode) {
        (Some(o6), _) if !cfg.enable_ipv4 => LeaseAttrs::vxlan_ipv6_only(o6.public_ip, cfg.backend.vni, o6.mac),
        _ if cfg.backend.host_gw => LeaseAttrs::host_gw(public_ip),
        (_, EncapMode::Vxlan) => {
            let (_, device, _, flannel_peers) = dataplane::prepare_device(&spec)?;
            spec.flannel_peers = flannel_peers;
            LeaseAttrs::vxlan(public_ip, cfg.backend.vni, device.mac)
        }
        (_, EncapMode::Udp) => LeaseAttrs::udp(public_ip),
    };
    let attrs = match &v6 {
        Some(o6) if cfg.enable_ipv4 => attrs.with_ipv6(o6.public_ip, cfg.backend.vni, o6.mac),
        _ => attrs,
    };
    notify(&[sd_notify::NotifyState::Status("acquiring a subnet lease")]);
    let previous = match subnet_file::read_previous(&opts.subnet_file) {
        (v4, _) if cfg.enable_ipv4 => v4.map(|n| LeaseKey::from(&n)),
        (_, v6) => v6.map(LeaseKey::ipv6_only),
    };
    let held = acquire(&mut reg, &cfg, &attrs, previous, &opts).await?;
    state.set_lease(held.key().primary(), held.expires());
    spec.subnet = held.subnet;
    let (maps, ebpf, tun, mtu): (Box<dyn crate::tun::RouteTable>, _, _, u32) = match opts.dataplane {
        // IPv6-only: no IPv4 device (one a previous IPv4 run left goes), the decap programs
        // checking what arrives for flannel-v6.
        _ if !cfg.enable_ipv4 => {
            let dev4 = default_device(mode, cfg.backend.vni);
            if netdev::link(&dev4)?.is_some() {
                tracing::warn!(device = %dev4, "the network is IPv6-only; removing the IPv4 overlay device a previous run left");
                netdev::delete_link(&dev4)?;
            }
            let s = spec.clone();
            let up = match opts.ebpf_unavailable {
                true => Err(forced_degraded()),
                false => tokio::task::spawn_blocking(move || dataplane::up_ipv6_only(&s)).await.context("the data-plane task")?,
            };
            match up {
                Ok(dp) => {
                    tracing::info!(decap = %dp.decap_hook, attach = %dp.attach, guard = %dp.guard, kernel_drops = %dp.kernel_drops, "eBPF checks up for the IPv6-only overlay (the kernel's flannel-v6 encapsulates)");
                    crate::datapath::degraded::set_marker(&spec.bpffs_dir, None)?;
                    let mtu = dp.mtu;
                    (Box::new(Maps::open(&spec.bpffs_dir)?), Some(dp), None, mtu)
                }
                // flannel-v6 already carries the traffic with per-peer entries; only the checks go.
                Err(e) if opts.ebpf_unavailable || dataplane::is_unsupported(&e) => {
                    let dev6 = v6.as_ref().map(|o| o.device.clone()).unwrap_or_default();
                    enter_degraded(&spec, &state, &dev6, &e, "a stock flannel IPv6-only vxlan node (flannel-v6 with its per-peer entries)")?;
                    let mtu = v6.as_ref().map(|o| o.mtu).unwrap_or(1450);
                    (Box::new(crate::datapath::degraded::NoIpv4Routes), None, None, mtu)
                }
                Err(e) => return Err(e),
            }
        }
        // host-gw: no device, no programs; peers' subnets are kernel routes via their
        // addresses, and containers keep the underlay's whole MTU.
        _ if cfg.backend.host_gw => {
            let underlay = netdev::require_link(&spec.iface)?;
            spec.device = "none (host-gw)".into();
            tracing::info!(iface = %spec.iface, "host-gw: routing peers' subnets via their addresses, no encapsulation");
            (Box::new(crate::tun::HostGwRoutes { iface: spec.iface.clone() }), None, None, underlay.mtu)
        }
        DataplaneKind::Ebpf => {
            let up = match opts.ebpf_unavailable {
                true => Err(forced_degraded()),
                false => dataplane_up(&spec).await,
            };
            match up {
                Ok(dp) => {
                    tracing::info!(vtep_mac = %netdev::format_mac(&dp.device.mac), decap = %dp.decap_hook, attach = %dp.attach, guard = %dp.guard, kernel_drops = %dp.kernel_drops, "eBPF data plane up");
                    if crate::datapath::degraded::reason(&spec.bpffs_dir).is_some() {
                        // A degraded run's per-peer routes: the network route and the program
                        // carry the traffic now.
                        for (dst, gw) in netdev::peer_routes(&spec.device)? {
                            if gw == dst.network() {
                                netdev::del_peer_route(dst)?;
                            }
                        }
                        crate::datapath::degraded::set_marker(&spec.bpffs_dir, None)?;
                        tracing::info!("the eBPF data plane runs again; the kernel-device routes of the degraded run are gone");
                    }
                    let mtu = dp.mtu;
                    (Box::new(Maps::open(&spec.bpffs_dir)?), Some(dp), None, mtu)
                }
                // The vxlan backend's kernel device can carry the traffic alone, as a stock
                // flannel node's does; the udp backend has nothing to fall back to.
                Err(e) if mode == EncapMode::Vxlan && (opts.ebpf_unavailable || dataplane::is_unsupported(&e)) => {
                    enter_degraded(
                        &spec,
                        &state,
                        &spec.device,
                        &e,
                        "a stock flannel vxlan node (the kernel's vxlan device encapsulates and decapsulates, with flannel's \
                         per-peer route, neighbour and forwarding entries)",
                    )?;
                    let underlay = netdev::require_link(&spec.iface)?;
                    let mtu = dataplane::overlay_mtu(spec.mtu, mode, &underlay.name, underlay.mtu)?;
                    netdev::set_device_address(&spec.device, held.subnet.network())?;
                    netdev::set_arp(&spec.device, true)?;
                    let routes = crate::datapath::degraded::KernelVxlanRoutes::new(&spec.device, cfg.network)?;
                    (Box::new(routes), None, None, mtu)
                }
                Err(e) => return Err(e),
            }
        }
        DataplaneKind::Tun => {
            let underlay = netdev::require_link(&spec.iface)?;
            let mtu = dataplane::overlay_mtu(spec.mtu, mode, &underlay.name, underlay.mtu)?;
            if let Some(old) = netdev::link(&spec.device)? {
                tracing::warn!(device = %old.name, "replacing an existing device for the TUN data plane");
                netdev::delete_link(&spec.device)?;
            }
            let dev = crate::tun::create_device(&spec.device, mtu)?;
            netdev::configure_up(&spec.device, Some(mtu))?;
            netdev::set_device_address(&spec.device, held.subnet.network())?;
            netdev::route_network(cfg.network, &spec.device)?;
            // ICMP errors the proxy writes come from the device's own address; without
            // accept_local the kernel drops them as martians.
            let knob = format!("/proc/sys/net/ipv4/conf/{}/accept_local", spec.device);
            if let Err(e) = std::fs::write(&knob, "1") {
                tracing::warn!(error = %e, %knob, "ICMP net-unreachable replies may be dropped");
            }
            let tun = crate::tun::start(dev, spec.port, held.subnet, mtu)?;
            state.tun_stats.set(tun.stats.clone()).ok();
            tracing::info!(device = %spec.device, port = spec.port, "TUN data plane up (userspace forwarding)");
            (Box::new(tun.routes.clone()), None, Some(tun), mtu)
        }
    };
    if let (Some(o6), Some(s6)) = (v6.as_mut(), held.subnet6) {
        o6.configure(s6, ebpf.is_some().then_some(spec.bpffs_dir.as_path()))?;
    }
    if v6.is_none() && ebpf.is_some() {
        // IPv6 switched off since the last run: its device goes and the programs stop
        // checking IPv6 frames against a side that no longer exists.
        let dev6 = crate::datapath::ipv6::device_name(cfg.backend.vni);
        if netdev::link(&dev6)?.is_some() {
            tracing::warn!(device = %dev6, "IPv6 is off in the network config; removing the IPv6 overlay device");
            netdev::delete_link(&dev6)?;
        }
        let mut maps6 = Maps::open(&spec.bpffs_dir)?;
        maps6.set_config6(&overlay_common::Dataplane6Config {
            underlay_ip: [0; 16],
            local_subnet: [0; 16],
            local_prefix_len: 0,
            enabled: 0,
        })?;
        maps6.clear6()?;
    }
    let mut d = Daemon { opts, reg, cfg, attrs, spec, held, maps, ebpf, tun, v6, state, rules: SharedRules::default(), keeper: None, decap_chain: Default::default() };
    d.start_keeper();
    *d.rules.lock().await = d.wanted_rules();
    // What a previous run left that this one does not keep: the other form's rules (the
    // config switched between iptables and nftables, as flannel clears them), and ours that
    // are no longer wanted (--ip-masq or the forward rules switched off, a family gone). Rules
    // stay on exit, so this is where stale ones go: after ours are in, so that a rule moving
    // from one form to the other (the guard's, flannel's) is never missing between them.
    let leftovers = d.rules.lock().await.leftovers(crate::nftables::has_iptables());
    ensure_rules(&d.rules).await.context("installing the masquerade and forward rules")?;
    let _ = tokio::task::spawn_blocking(move || leftovers.clear()).await;
    if d.ebpf.as_ref().is_some_and(|dp| dp.guard == crate::datapath::attach::Guard::Firewall) {
        dataplane::retire_guard_program(&d.spec.bpffs_dir)?;
    }
    d.sync_blackhole()?;
    write_subnet_file(&d.opts, &d.cfg, &held, mtu)?;
    tracing::info!(
        lease = %held.key(), public_ip = %public_ip, device = %d.spec.device, mtu,
        "lease held, data plane up, subnet file written"
    );
    Ok(d)
}

    /// The rules this node should have: flannel's iptables chains, or its nftables table
    /// when the config says `EnableNFTables` or the host has no iptables (as flannel does).
    fn wanted_rules(&self) -> Firewall {
        // A dual-stack node's IPv6 network and subnet get the same rules (flannel's
        // masqIP6Rules, its ip6tables FLANNEL-FWD, its flannel-ipv6 table).
        let v6 = match (self.cfg.ipv6, self.held.subnet6) {
            (Some(c6), Some(s6)) => Some((c6.network, s6)),
            _ => None,
        };
        // Where the guard's program cannot run, its rule: for the IPv4 tunnel address and a
        // dual-stack node's IPv6 one, on the underlay.
        let guard_firewall = self.ebpf.as_ref().is_some_and(|dp| dp.guard == crate::datapath::attach::Guard::Firewall);
        let mut guard_addrs: Vec<std::net::IpAddr> = Vec::new();
        if guard_firewall {
            if self.cfg.enable_ipv4 {
                guard_addrs.push(self.spec.underlay_ip.into());
            }
            if let Some(o6) = &self.v6 {
                guard_addrs.push(o6.public_ip.into());
            }
        }
        // The guard's nftables form runs before defragmentation: it is used wherever nft is,
        // whichever form flannel's rules take.
        let nft_guard = self.cfg.enable_nftables || !crate::nftables::has_iptables() || crate::nftables::has_nft();
        let guards: Vec<crate::nftables::NftGuard> = guard_addrs
            .iter()
            .filter(|_| nft_guard)
            .map(|a| crate::nftables::NftGuard { iface: self.spec.iface.clone(), addr: *a, port: self.spec.port })
            .collect();
        if self.cfg.enable_nftables || !crate::nftables::has_iptables() {
            let mut tables = Vec::new();
            if self.cfg.enable_ipv4 {
                tables.push(crate::nftables::NftRules {
                    ipv6: false,
                    masq: self.opts.ip_masq.then_some((self.cfg.network.into(), self.held.subnet.into(), self.opts.masq_random)),
                    forward: self.opts.forward_rules.then_some(self.cfg.network.into()),
                });
            }
            if let Some((n6, s6)) = v6 {
                tables.push(crate::nftables::NftRules {
                    ipv6: true,
                    masq: self.opts.ip_masq.then_some((n6.into(), s6.into(), self.opts.masq_random)),
                    forward: self.opts.forward_rules.then_some(n6.into()),
                });
            }
            let notrack = (self.opts.notrack_tunnel && self.cfg.enable_ipv4)
                .then_some(crate::nftables::NftNotrack { addr: self.spec.underlay_ip, port: self.spec.port });
            return Firewall::Nft(tables, guards, notrack);
        }
        let mut r: Vec<ChainRules> = guard_addrs
            .iter()
            .filter(|_| !nft_guard)
            .map(|a| iptables::guard(if a.is_ipv4() { "iptables" } else { "ip6tables" }, &self.spec.iface, *a, self.spec.port))
            .collect();
        let v4 = self.cfg.enable_ipv4;
        if self.opts.ip_masq {
            if v4 {
                r.push(iptables::masquerade(self.cfg.network, self.held.subnet, self.opts.masq_random));
            }
            if let Some((n6, s6)) = v6 {
                r.push(iptables::masquerade6(n6, s6, self.opts.masq_random));
            }
        }
        if self.opts.forward_rules {
            if v4 {
                r.push(iptables::forward(self.cfg.network));
            }
            if let Some((n6, _)) = v6 {
                r.push(iptables::forward6(n6));
            }
        }
        if self.opts.notrack_tunnel && v4 {
            r.extend(iptables::notrack(self.spec.underlay_ip, self.spec.port));
        }
        Firewall::Iptables(r, guards)
    }
}

/// The masquerade and forward rules this node keeps, in one of flannel's two forms.
#[derive(Clone, Debug, Default)]
pub enum Firewall {
    #[default]
    None,
    /// flannel's iptables chains (FLANNEL-POSTRTG, FLANNEL-FWD), and our guard's: its
    /// nftables tables where nft exists, else its chains among the others.
    Iptables(Vec<ChainRules>, Vec<crate::nftables::NftGuard>),
    /// flannel's nftables tables (flannel-ipv4, and flannel-ipv6 for a dual-stack node:
    /// postrtg, forward), our guard's tables where its program cannot run, and the notrack
    /// table where asked for.
    Nft(Vec<crate::nftables::NftRules>, Vec<crate::nftables::NftGuard>, Option<crate::nftables::NftNotrack>),
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
    fn clear(&self) {
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
        let guards_v = |guards: &[crate::nftables::NftGuard], ipv6: bool| guards.iter().any(|g| g.addr.is_ipv6() == ipv6);
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
type SharedRules = Arc<tokio::sync::Mutex<Firewall>>;

/// Install or restore the iptables rules; true if something had to change. iptables waits for
/// the xtables lock (bounded, `iptables::LOCK_WAIT_SECS`), so the commands run on a blocking
/// thread: the lease keeper, the watch and /healthz go on meanwhile.
async fn ensure_rules(rules: &SharedRules) -> Result<bool> {
    // The guard goes with the blocking job: a shutdown that aborts the resync task still
    // waits for a check in flight before it removes the rules.
    let guard = rules.clone().lock_owned().await;
    tokio::task::spawn_blocking(move || guard.ensure()).await.context("the iptables task")?
}

/// Where br_netfilter's switches live (absent while the module is not loaded).
const BRIDGE_SYSCTLS: &str = "/proc/sys/net/bridge";

/// flanneld exits when br_netfilter is not loaded (outside nftables mode: its switch for each
/// family the network uses is missing), since Kubernetes 1.30's kubeadm stopped checking it
/// and kube-proxy's rules then miss bridged traffic. A docker node in etcd mode runs fine
/// without it (docker's own rules do not need it), so this agent says so and goes on.
fn br_netfilter_warning(dir: &std::path::Path, ipv4: bool, ipv6: bool, nftables: bool) -> Option<String> {
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
fn blackholes_wanted(asked: bool, cfg: &NetworkConfig, held: &Held) -> Vec<IpNet> {
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
async fn resync_rules(rules: SharedRules, every: Duration, state: Arc<AgentState>) {
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

/// Load and attach the programs (verifier, netlink, bpffs: a few hundred milliseconds) on a
/// blocking thread: /healthz and the lease keeper go on meanwhile.
/// The error `--ebpf-unavailable` stands in for.
fn forced_degraded() -> anyhow::Error {
    anyhow::anyhow!("forced with --ebpf-unavailable")
}

/// Degrade, don't refuse (the eBPF side could not come up: `e`): said once with what it costs,
/// nothing of ours left attached, and recorded for `status` (the marker, naming `device` for
/// teardown) and /metrics. The node then runs as `what`.
fn enter_degraded(spec: &NodeSpec, state: &AgentState, device: &str, e: &anyhow::Error, what: &str) -> Result<()> {
    let reason = crate::error_chain(e.as_ref());
    tracing::warn!(
        %reason,
        "the eBPF data plane cannot run on this node: running as {what}; what that costs: no checks of arriving tunnel \
         frames, no socket guard, no drop counters, no monitor"
    );
    dataplane::detach_programs(spec)?;
    let marker = format!("device={device} underlay={}\n{reason}", spec.iface);
    crate::datapath::degraded::set_marker(&spec.bpffs_dir, Some(&marker))
        .with_context(|| format!("writing {}", crate::datapath::degraded::marker(&spec.bpffs_dir).display()))?;
    let _ = state.degraded.set(reason);
    Ok(())
}

async fn dataplane_up(spec: &NodeSpec) -> Result<dataplane::Dataplane> {
    let spec = spec.clone();
    tokio::task::spawn_blocking(move || dataplane::up(&spec)).await.context("the data-plane task")?
}

fn write_subnet_file(opts: &DaemonOptions, cfg: &NetworkConfig, held: &Held, mtu: u32) -> Result<()> {
    let ipv6 = cfg.ipv6.zip(held.subnet6).map(|(c6, s6)| (c6.network, s6));
    let env = SubnetEnv { ipv4: cfg.enable_ipv4.then_some((cfg.network, held.subnet)), mtu, ip_masq: opts.ip_masq, ipv6 };
    subnet_file::write(&opts.subnet_file, &env)?;
    Ok(())
}

enum Wake {
    Watch(Result<Option<etcd_client::WatchResponse>, etcd_client::Error>),
    Keeper(Option<KeeperEvent>),
    Heal,
}

/// How often the overlay device, its address and its route are checked (netlink reads).
const HEAL_EVERY: Duration = Duration::from_secs(1);

/// The keeper's next report, or never if there is no keeper.
async fn keeper_report(keeper: &mut Option<(tokio::task::JoinHandle<()>, mpsc::UnboundedReceiver<KeeperEvent>)>) -> Option<KeeperEvent> {
    match keeper {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

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
                let routes6 = self.v6.as_ref().map_or(0, |o6| o6.route_count());
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
                        if self.follow_public_ip().await? {
                            // The watch's connection came from the old address: list and
                            // watch again on the new one.
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

    /// Make the maps hold exactly the routes the leases ask for.
    fn reconcile_all(&mut self, leases: &[crate::lease::Lease]) -> Result<()> {
        let (desired, skipped) = reconcile::desired_routes(leases, self.spec.mode, self.held.subnet, self.attrs.public_ip);
        for (subnet, e) in skipped {
            self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%subnet, error = %e, "lease skipped");
        }
        // Direct routes a previous run left for subnets no lease asks for any more (all of
        // them if DirectRouting is now off), then the ones the leases ask for.
        // (host-gw's routes are the route table itself: the diff below keeps them.)
        let ours = netdev::direct_routes().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "listing direct routes");
            Vec::new()
        });
        for (subnet, _) in ours.into_iter().filter(|_| !self.cfg.backend.host_gw) {
            if !self.cfg.backend.direct_routing || !desired.iter().any(|r| r.subnet == subnet) {
                if let Err(e) = netdev::del_direct_route(subnet) {
                    tracing::warn!(%subnet, error = %e, "removing a stale direct route");
                }
            }
        }
        let changes = reconcile::diff(&self.maps.routes()?, &desired);
        // Routes the diff changes get theirs through set_route below; the others here.
        for r in desired.iter().filter(|r| !changes.upsert.contains(r)) {
            self.set_direct_route(r.subnet, Some(r.public_ip))?;
        }
        for r in &changes.upsert {
            self.set_route(r.subnet, Some(r))?;
        }
        for s in &changes.remove {
            self.set_route(*s, None)?;
        }
        tracing::info!(routes = desired.len(), added_or_changed = changes.upsert.len(), removed = changes.remove.len(), "routes reconciled with etcd");
        if let Some(me6) = self.mine6() {
            let mut desired6: BTreeMap<LeaseKey, reconcile::Route6> = BTreeMap::new();
            for l in leases {
                match reconcile::route6_for(l, &me6) {
                    Ok(Some(r)) => {
                        desired6.insert(l.key(), r);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(lease = %l.key(), error = %e, "lease's IPv6 part skipped");
                    }
                }
            }
            self.sync_v6(&desired6);
        }
        Ok(())
    }

    /// This node's IPv6 side, on a dual-stack or IPv6-only node.
    fn mine6(&self) -> Option<reconcile::Mine6> {
        let o6 = self.v6.as_ref()?;
        Some(reconcile::Mine6 { config: self.cfg.ipv6?, key: self.held.key(), public_ip: self.attrs.public_ip, public_ipv6: Some(o6.public_ip) })
    }

    /// Whether leases of `key`'s kind are this network's (`NetworkConfig::takes`); the others
    /// are passed over (logged at debug level, not counted: they are not malformed).
    fn takes(&self, key: &LeaseKey) -> bool {
        let takes = self.cfg.takes(key);
        if !takes {
            tracing::debug!(lease = %key, ipv6_only_network = !self.cfg.enable_ipv4, "a lease of another kind of network (IPv6-only or not): no route");
        }
        takes
    }

    /// Whether `key` names the subnet we hold (the IPv4 one; in an IPv6-only network the IPv6
    /// one).
    fn holds(&self, key: &LeaseKey) -> bool {
        if self.cfg.enable_ipv4 {
            key.v4 == self.held.subnet
        } else {
            key.v6 == self.held.subnet6
        }
    }

    /// Make the IPv6 device's peer routes exactly `desired` (a failure is counted and logged:
    /// the IPv4 overlay goes on).
    fn sync_v6(&mut self, desired: &BTreeMap<LeaseKey, reconcile::Route6>) {
        let Some(o6) = self.v6.as_mut() else { return };
        if let Err(e) = o6.sync(desired) {
            self.state.route_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %crate::error_chain(e.as_ref()), "could not set the IPv6 routes");
        }
    }

    /// One lease's IPv6 route (`None`: none), as `reconcile::route6_for` decides it.
    fn set_route6(&mut self, key: LeaseKey, want: Option<reconcile::Route6>) {
        let Some(o6) = self.v6.as_mut() else { return };
        if let Err(e) = o6.set(key, want) {
            self.state.route_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(lease = %key, error = %crate::error_chain(e.as_ref()), "could not set the IPv6 route");
        }
    }

    async fn handle(&mut self, ev: LeaseEvent) -> Result<()> {
        let key = match &ev {
            LeaseEvent::Put(l) => Some(l.key()),
            LeaseEvent::Delete(k) => Some(*k),
            LeaseEvent::Malformed(..) => None,
        };
        if key.is_some_and(|k| !self.takes(&k)) {
            return Ok(());
        }
        // The IPv6 routes: none for a key of ours (a previous holder's entries go, should its
        // deletion arrive after we took the subnet), none left for a deleted key.
        if let Some(me6) = self.mine6() {
            match &ev {
                LeaseEvent::Put(l) => {
                    let r6 = if self.holds(&l.key()) {
                        None
                    } else {
                        reconcile::route6_for(l, &me6).unwrap_or_else(|e| {
                            self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(lease = %l.key(), error = %e, "lease's IPv6 part skipped");
                            None
                        })
                    };
                    self.set_route6(l.key(), r6);
                }
                LeaseEvent::Delete(k) => self.set_route6(*k, None),
                LeaseEvent::Malformed(..) => {}
            }
        }
        // An IPv6-only node has no IPv4 routes: only its own lease's fate is left to decide.
        if !self.cfg.enable_ipv4 {
            match ev {
                LeaseEvent::Put(l) if self.holds(&l.key()) && !self.attrs.same_node(&l.attrs) => {
                    tracing::error!(lease = %l.key(), other = ?l.attrs.public_ipv6.map(|a| a.to_string()), "our subnet's lease now names another node");
                }
                LeaseEvent::Delete(k) if self.holds(&k) => self.lost_lease("deleted from etcd").await?,
                LeaseEvent::Malformed(key, e) => self.skipped_lease(&key, &e),
                _ => {}
            }
            return Ok(());
        }
        let me = reconcile::Mine { subnet: self.held.subnet, public_ip: self.attrs.public_ip, mode: self.spec.mode };
        match reconcile::on_event(&ev, &me) {
            reconcile::EventAction::SetRoute { subnet, route, skipped } => {
                if let Some(e) = skipped {
                    self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%subnet, error = %e, "lease skipped");
                }
                self.set_route(subnet, route.as_ref())?;
            }
            reconcile::EventAction::LostOwn => self.lost_lease("deleted from etcd").await?,
            reconcile::EventAction::OwnNamesOther(other) => {
                tracing::error!(subnet = %self.held.subnet, %other, "our subnet's lease now names another node");
            }
            reconcile::EventAction::Skipped(key, e) => self.skipped_lease(&key, &e),
        }
        Ok(())
    }

    /// A key under subnets/ that gives no lease: counted and logged if malformed; an IPv6-only
    /// node's lease is not malformed, only of no use to a network with IPv4.
    fn skipped_lease(&self, key: &str, e: &crate::lease::LeaseFormatError) {
        if matches!(e, crate::lease::LeaseFormatError::Ipv6Only(_)) {
            tracing::debug!(%key, "an IPv6-only lease: no IPv4 route to add");
            return;
        }
        self.state.malformed_leases.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%key, error = %e, "skipping a lease that is not in flannel's format");
    }

    /// Make `subnet`'s route what its lease asks for (`want`; `None`: no route). The one way
    /// routes change, for watch events and listings alike.
    fn set_route(&mut self, subnet: Ipv4Net, want: Option<&crate::maps::Route>) -> Result<()> {
        match want {
            Some(r) => {
                if self.add_route(r) {
                    tracing::info!(subnet = %r.subnet, public_ip = %r.public_ip, "route added or updated");
                }
            }
            None => match self.maps.remove_route(subnet) {
                Ok(()) => tracing::info!(%subnet, "route removed: no lease asks for it (deleted, expired, or no longer usable)"),
                Err(MapsError::NoSuchRoute(_)) => {}
                Err(e) => return Err(e.into()),
            },
        }
        self.set_direct_route(subnet, want.map(|r| r.public_ip))?;
        Ok(())
    }

    /// vxlan's DirectRouting, as flannel decides it per peer: a peer on the underlay's own
    /// link (the route to it has no gateway) gets a kernel route for its subnet via its
    /// address, which takes the subnet's traffic past the overlay device unencapsulated; the
    /// others stay encapsulated. Without DirectRouting, or with no peer: no such route.
    fn set_direct_route(&mut self, subnet: Ipv4Net, peer: Option<Ipv4Addr>) -> Result<()> {
        if !self.cfg.backend.direct_routing {
            return Ok(());
        }
        let direct = match peer {
            Some(ip) => netdev::directly_reachable(ip, &self.spec.iface).unwrap_or(false).then_some(ip),
            None => None,
        };
        let done = match direct {
            Some(via) => netdev::set_direct_route(subnet, via, &self.spec.iface).map(|()| {
                tracing::info!(%subnet, %via, "peer on the same link: routed directly (DirectRouting)");
            }),
            None => netdev::del_direct_route(subnet),
        };
        // Like a full map: counted and logged, never the end of the agent (the subnet stays
        // reachable through the tunnel route).
        if let Err(e) = done {
            self.state.route_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%subnet, error = %e, "could not set the direct route");
        }
        Ok(())
    }

    /// Add or update a route; a failure (a full map) is logged and counted, never fatal and
    /// never silent: the rest of the routes keep working.
    fn add_route(&mut self, r: &crate::maps::Route) -> bool {
        match self.maps.upsert_route(r) {
            Ok(()) => true,
            Err(e) => {
                self.state.route_errors.fetch_add(1, Ordering::Relaxed);
                match e {
                    MapsError::NotOnLink { .. } | MapsError::Host(_) => {
                        tracing::error!(subnet = %r.subnet, public_ip = %r.public_ip, error = %e, "could not add the route")
                    }
                    _ => tracing::error!(
                        subnet = %r.subnet, public_ip = %r.public_ip, error = %e,
                        "could not add the route: the route or peer map is probably full (raise --max-routes / --max-peers)"
                    ),
                }
                false
            }
        }
    }

    /// The `--ip-blackhole-route` routes: for our subnets (IPv4 and IPv6, as flanneld) if
    /// asked for, and none left for a subnet we no longer hold (it would swallow traffic to
    /// whichever node holds it now). The resync task re-adds them (`keep_blackholes`).
    fn sync_blackhole(&self) -> Result<()> {
        let wanted = blackholes_wanted(self.opts.blackhole_route, &self.cfg, &self.held);
        for subnet in netdev::blackhole_routes()? {
            let in_network = match subnet {
                IpNet::V4(n) => self.cfg.enable_ipv4 && self.cfg.network.contains(&n),
                IpNet::V6(n) => self.cfg.ipv6.is_some_and(|c6| c6.network.contains(&n)),
            };
            if in_network && !wanted.contains(&subnet) {
                tracing::info!(%subnet, "removing a blackhole route for a subnet this node does not hold");
                netdev::del_blackhole_route(subnet)?;
            }
        }
        for subnet in &wanted {
            netdev::blackhole_route(*subnet)?;
        }
        *self.state.blackholes.lock().unwrap_or_else(|p| p.into_inner()) = wanted;
        Ok(())
    }

    /// Write `attrs` into our lease (same etcd lease): a new VtepMAC or PublicIP reaches the
    /// peers. A lease etcd no longer knows means claiming again.
    async fn announce(&mut self, attrs: LeaseAttrs) -> Result<()> {
        let (key, lease) = (self.held.key(), self.held.etcd_lease);
        let written = retry("rewriting our lease", &mut self.reg, |r| {
            let a = attrs.clone();
            Box::pin(async move { r.update(key, &a, lease).await })
        })
        .await;
        // What etcd holds changes only with a write that went through (or a lease claimed
        // again with these attributes).
        match written {
            Ok(()) => {
                self.attrs = attrs;
                Ok(())
            }
            Err(e) if lease_gone(&e) => {
                self.attrs = attrs;
                self.lost_lease("gone from etcd when rewritten").await
            }
            Err(e) => Err(e),
        }
    }

    /// What is missing of the overlay device, its address and its route (`None`: intact).
    /// An operator or another tool may delete any of them; flannel would need a restart.
    /// (An IPv6-only node has no IPv4 overlay device: `heal_v6` looks after flannel-v6.)
    fn overlay_damage(&self) -> Result<Option<&'static str>, netdev::NetdevError> {
        let Some(dp) = self.ebpf.as_ref().filter(|_| self.cfg.enable_ipv4) else { return Ok(None) };
        let Some(link) = netdev::link(&self.spec.device)? else { return Ok(Some("the device is gone")) };
        if link.ifindex != dp.device.ifindex {
            return Ok(Some("the device was recreated by someone else"));
        }
        if !link.up {
            return Ok(Some("the device is down"));
        }
        if !netdev::has_address(&self.spec.device, self.held.subnet.network())? {
            return Ok(Some("its address is gone or changed"));
        }
        if !netdev::network_route_via(self.spec.network, &self.spec.device)? {
            return Ok(Some("the network's route no longer goes through it"));
        }
        // cls_bpf filters go with their qdisc (`tc qdisc del ... clsact`) or alone; TCX
        // links are pinned and cannot be taken off without their pin.
        if dp.attach == crate::datapath::attach::TcAttach::Legacy {
            use crate::datapath::attach::legacy_attached;
            use aya::programs::TcAttachType::{Egress, Ingress};
            if !legacy_attached(dp.device.ifindex, Egress, overlay_common::prog_names::TC_EGRESS_ENCAP) {
                return Ok(Some("its encapsulation filter is gone"));
            }
            if dp.decap_hook == DecapHook::Tc && !legacy_attached(dp.underlay.ifindex, Ingress, overlay_common::prog_names::TC_INGRESS_DECAP) {
                return Ok(Some("the underlay's decapsulation filter is gone"));
            }
        }
        Ok(None)
    }

    /// Put the overlay device, its address, its route and the programs on it back, as at
    /// start, if any went missing: counted, logged, no restart.
    async fn heal(&mut self) {
        self.check_decap_chain();
        let damage = match self.overlay_damage() {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "checking the overlay device");
                return;
            }
        };
        tracing::error!(device = %self.spec.device, problem = damage, "the overlay device was damaged; restoring it");
        match dataplane_up(&self.spec).await {
            Ok(dp) => {
                self.state.device_repairs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %self.spec.device, ifindex = dp.device.ifindex, "overlay device restored: device, address, route and programs");
                let mac = dp.device.mac;
                self.ebpf = Some(dp);
                // A device made again has a new MAC: peers must address the frames they leave
                // to our kernel device to it, so the lease says it.
                if self.spec.mode == EncapMode::Vxlan && self.attrs.vtep_mac().ok() != Some(mac) {
                    let attrs = self.keep_v6(LeaseAttrs::vxlan(self.spec.public_ip, self.spec.vni, mac));
                    if let Err(e) = self.announce(attrs).await {
                        tracing::error!(error = %crate::error_chain(e.as_ref()), "announcing the restored device's VtepMAC failed");
                    }
                }
            }
            Err(e) => tracing::error!(error = %crate::error_chain(e.as_ref()), "restoring the overlay device failed; trying again"),
        }
    }

    /// Log what else runs on the underlay's TC ingress hook whenever that changes (the first
    /// time at start): our program goes first at attach time, but a program attached ahead
    /// of it later that returns "ok" would end the chain, and the kernel would decapsulate
    /// frames our checks never saw.
    fn check_decap_chain(&mut self) {
        let Some(dp) = self.ebpf.as_ref().filter(|dp| dp.decap_hook == DecapHook::Tc) else { return };
        let chain = crate::datapath::attach::chain(&dp.underlay, aya::programs::TcAttachType::Ingress, overlay_common::prog_names::TC_INGRESS_DECAP);
        if chain == self.decap_chain {
            return;
        }
        let names = |v: &[(u32, String)]| v.iter().map(|(id, n)| format!("{n} (id {id})")).collect::<Vec<_>>().join(", ");
        let filters = chain.filters.iter().map(|(p, k, n)| format!("{k} {n} (prio {p})")).collect::<Vec<_>>().join(", ");
        if !chain.tcx_ahead.is_empty() {
            tracing::warn!(
                iface = %dp.underlay.name,
                ahead = %names(&chain.tcx_ahead),
                "programs run before our checks on the underlay's TC ingress: one that returns TC_ACT_OK lets tunnel frames past them"
            );
        } else if !chain.is_empty() {
            tracing::info!(iface = %dp.underlay.name, after = %names(&chain.tcx_after), filters = %filters, "other programs on the underlay's TC ingress run after our checks");
        }
        self.decap_chain = chain;
    }

    /// The same for a dual-stack node's flannel-v6 device: made again with its address and
    /// every peer's route, neighbour and forwarding entry (`settle_v6` announces a new MAC).
    async fn heal_v6(&mut self) -> Result<()> {
        let (Some(o6), Some(s6)) = (self.v6.as_mut(), self.held.subnet6) else { return Ok(()) };
        let damage = match o6.damage(s6) {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(e.as_ref()), "checking the IPv6 overlay device");
                return Ok(());
            }
        };
        tracing::error!(device = %o6.device, problem = damage, "the IPv6 overlay device was damaged; restoring it");
        let (vni, port, mtu) = (self.cfg.backend.vni, self.cfg.backend.port, self.cfg.backend.mtu);
        let public_ipv6 = o6.public_ip;
        match o6.rebuild(public_ipv6, vni, port, &self.spec.iface, mtu, s6, &self.spec.bpffs_dir) {
            Ok(()) => {
                self.state.device_repairs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(device = %o6.device, "IPv6 overlay device restored: device, address and peers' entries");
            }
            Err(e) => tracing::error!(error = %crate::error_chain(e.as_ref()), "restoring the IPv6 overlay device failed; trying again"),
        }
        Ok(())
    }

    /// After any IPv6 change: peers whose entries failed are written again, and the lease is
    /// made to say the device's address and MAC if it does not (a rebuild, a move, or an
    /// earlier rewrite that failed). Errors no retry can fix end the agent, as for IPv4.
    async fn settle_v6(&mut self) -> Result<()> {
        let Some(o6) = self.v6.as_mut() else { return Ok(()) };
        if let Err(e) = o6.retry() {
            tracing::warn!(error = %crate::error_chain(e.as_ref()), "IPv6 peers' entries");
        }
        let (ip, mac) = (o6.public_ip, o6.mac);
        if self.attrs.public_ipv6 == Some(ip) && self.attrs.vtep_mac_v6().ok() == Some(mac) {
            return Ok(());
        }
        let attrs = self.attrs.clone().with_ipv6(ip, self.cfg.backend.vni, mac);
        self.announce(attrs).await?;
        tracing::warn!(public_ipv6 = %ip, vtep_mac = %netdev::format_mac(&mac), "the lease now names the IPv6 device's address and MAC");
        Ok(())
    }

    /// The node's public IPv6 address changed (SLAAC, DHCPv6, an operator) and was not fixed
    /// by --public-ipv6: flannel-v6 is made again on the new address (`settle_v6` then writes
    /// `PublicIPv6` and the new VtepMAC into the lease, same etcd lease; peers' forwarding
    /// entries follow). True if a move was tried (the heal waits for the next tick).
    async fn follow_public_ipv6(&mut self) -> Result<bool> {
        if self.opts.public_ipv6.is_some() {
            return Ok(false);
        }
        let (Some(o6), Some(s6)) = (self.v6.as_mut(), self.held.subnet6) else { return Ok(false) };
        // No usable global address for a moment: keep the old one.
        let Ok(Some(ip)) = netdev::first_ipv6(&self.spec.iface) else { return Ok(false) };
        if ip == o6.public_ip || netdev::has_ipv6(&self.spec.iface, o6.public_ip).unwrap_or(true) {
            return Ok(false);
        }
        tracing::warn!(old = %o6.public_ip, new = %ip, "this node's public IPv6 address changed; moving flannel-v6 and the lease to it");
        let (vni, port, mtu) = (self.cfg.backend.vni, self.cfg.backend.port, self.cfg.backend.mtu);
        match o6.rebuild(ip, vni, port, &self.spec.iface, mtu, s6, &self.spec.bpffs_dir) {
            Ok(()) => {
                self.state.public_ip_changes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(public_ipv6 = %ip, "flannel-v6 moved to the new public IPv6 address");
            }
            Err(e) => tracing::error!(error = %crate::error_chain(e.as_ref()), "moving flannel-v6 to the new address failed; trying again"),
        }
        Ok(true)
    }

    /// The node's public address changed (DHCP, an operator) and was not fixed by
    /// --public-ip: move the data plane to it (the vxlan device is bound to its address, so
    /// it is made again, with a new VtepMAC) and rewrite our lease with the new PublicIP and
    /// VtepMAC under the same etcd lease; peers' routes follow the lease. No restart.
    /// True if it moved (the etcd connections were made anew).
    async fn follow_public_ip(&mut self) -> Result<bool> {
        if self.opts.public_ip.is_some() || self.ebpf.is_none() || !self.cfg.enable_ipv4 {
            return Ok(false);
        }
        let Ok(netdev::Underlay { iface, public_ip: ip, .. }) = netdev::resolve_interface(&self.opts.iface, None) else {
            // No address at all for a moment (between a DHCP release and renewal): keep the
            // old one until there is a new one.
            return Ok(false);
        };
        if ip == self.spec.public_ip && iface == self.spec.iface {
            return Ok(false);
        }
        tracing::warn!(old = %self.spec.public_ip, new = %ip, %iface, "this node's public address changed; moving the data plane and the lease to it");
        let mut spec = self.spec.clone();
        spec.iface = iface;
        spec.public_ip = ip;
        spec.underlay_ip = ip;
        let dp = match dataplane_up(&spec).await {
            Ok(dp) => dp,
            Err(e) => {
                tracing::error!(error = %crate::error_chain(e.as_ref()), "moving the data plane to the new address failed; trying again");
                return Ok(false);
            }
        };
        let attrs = self.keep_v6(match spec.mode {
            EncapMode::Vxlan => LeaseAttrs::vxlan(ip, spec.vni, dp.device.mac),
            EncapMode::Udp => LeaseAttrs::udp(ip),
        });
        self.spec = spec;
        self.ebpf = Some(dp);
        // A firewall guard names the tunnel address: it follows, now.
        *self.rules.lock().await = self.wanted_rules();
        if let Err(e) = ensure_rules(&self.rules).await {
            tracing::error!(error = %crate::error_chain(e.as_ref()), "updating the rules for the new address failed; the periodic check tries again");
        }
        // The client's connections left from the old address, which is gone: waiting for
        // them to time out would leave the lease naming an address nobody answers on.
        self.reg = connect(&self.opts.etcd).await?;
        self.start_keeper();
        let subnet = self.held.subnet;
        self.announce(attrs).await?;
        self.state.public_ip_changes.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(public_ip = %ip, %subnet, "data plane and lease moved to the new public address");
        Ok(true)
    }

    /// `attrs` with the IPv6 half our lease has now (a dual-stack node's lease keeps it when
    /// its IPv4 device changes).
    fn keep_v6(&self, mut attrs: LeaseAttrs) -> LeaseAttrs {
        attrs.public_ipv6 = self.attrs.public_ipv6;
        attrs.backend_v6_data = self.attrs.backend_v6_data.clone();
        attrs
    }

    /// Start renewing the lease we hold (replacing a keeper for an earlier one).
    fn start_keeper(&mut self) {
        if let Some((task, _)) = self.keeper.take() {
            task.abort();
        }
        if self.held.is_reservation() {
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let first = self.held.since + keeper::renew_after(self.opts.renew_margin, self.held.ttl);
        let task = tokio::spawn(keeper::keep(self.reg.clone(), self.held.etcd_lease, self.held.ttl, self.opts.renew_margin, first.into(), tx));
        self.keeper = Some((task, rx));
    }

    async fn keeper_event(&mut self, ev: Option<KeeperEvent>) -> Result<()> {
        match ev {
            Some(KeeperEvent::Renewed { ttl_secs }) => {
                self.held.ttl = Duration::from_secs(ttl_secs as u64);
                self.held.since = Instant::now();
                self.state.lease_renewals.fetch_add(1, Ordering::Relaxed);
                self.state.set_lease(self.held.key().primary(), self.held.expires());
                tracing::info!(lease = %self.held.key(), ttl_secs, "lease renewed");
                Ok(())
            }
            Some(KeeperEvent::Gone) | None => self.lost_lease("expired before it could be renewed").await,
            Some(KeeperEvent::Fatal(m)) => bail!("{m}"),
        }
    }

    /// Our lease is gone: claim it again (the same subnet if still free).
    async fn lost_lease(&mut self, why: &str) -> Result<()> {
        let old = self.held.key();
        tracing::error!(lease = %old, "THIS NODE'S LEASE WAS {why}; re-acquiring (the same subnet if still free)", why = why.to_uppercase());
        let old_lease = self.held.etcd_lease;
        let held = acquire(&mut self.reg, &self.cfg, &self.attrs, Some(old), &self.opts).await?;
        // The etcd lease that held the lost key is of no use any more: revoked, not left to
        // expire (it would keep nothing, but count against etcd's leases until then).
        if old_lease != 0 && old_lease != held.etcd_lease {
            if let Err(e) = self.reg.revoke(old_lease).await {
                tracing::debug!(error = %e, "revoking the lost lease's etcd lease");
            }
        }
        self.held = held;
        self.start_keeper();
        self.state.set_lease(held.key().primary(), held.expires());
        if let (Some(o6), Some(s6)) = (self.v6.as_mut(), held.subnet6) {
            if Some(s6) != old.v6 {
                o6.configure(s6, self.ebpf.is_some().then_some(self.spec.bpffs_dir.as_path()))?;
                tracing::error!(old = ?old.v6.map(|s| s.to_string()), new = %s6, "re-acquired a different IPv6 subnet");
            }
        }
        if held.key() == old {
            tracing::warn!(lease = %old, "re-acquired the same subnet");
            return Ok(());
        }
        tracing::error!(old = %old, new = %held.key(), "re-acquired a DIFFERENT subnet: containers on this node must be restarted with the new subnet");
        if self.tun.is_some() {
            bail!("the TUN data plane cannot change subnets while running; exiting so that it restarts with {}", held.subnet);
        }
        self.spec.subnet = held.subnet;
        self.sync_blackhole()?;
        // host-gw has no device (containers keep the underlay's MTU); an IPv6-only node's one
        // device is flannel-v6, already readdressed above.
        let mtu = match &self.v6 {
            Some(o6) if !self.cfg.enable_ipv4 => o6.mtu,
            _ if self.cfg.backend.host_gw => netdev::require_link(&self.spec.iface)?.mtu,
            // Degraded: the kernel device alone, readdressed; the programs stay off.
            _ if self.state.degraded.get().is_some() => {
                netdev::set_device_address(&self.spec.device, held.subnet.network())?;
                netdev::require_link(&self.spec.device)?.mtu
            }
            _ => {
                let dp = dataplane_up(&self.spec).await?;
                let mtu = dp.mtu;
                self.ebpf = Some(dp);
                mtu
            }
        };
        write_subnet_file(&self.opts, &self.cfg, &held, mtu)?;
        *self.rules.lock().await = self.wanted_rules();
        ensure_rules(&self.rules).await?;
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
        let g = iptables::guard("iptables", "eth0", "192.168.100.1".parse().unwrap(), 8472);
        let l = Firewall::Iptables(vec![g, f.clone()], vec![]).leftovers(true);
        assert!(!l.chains.contains(&("iptables", "OVERLAY-GUARD")) && l.chains.contains(&("ip6tables", "OVERLAY-GUARD")), "{l:?}");
        assert!(l.nft_guard4 && l.nft_guard6, "{l:?}");
        let ng = crate::nftables::NftGuard { iface: "eth0".into(), addr: "192.168.100.1".parse().unwrap(), port: 8472 };
        // iptables for flannel's rules, nftables for the guard (where nft exists).
        let l = Firewall::Iptables(vec![f.clone()], vec![ng.clone()]).leftovers(true);
        assert!(l.chains.contains(&("iptables", "OVERLAY-GUARD")) && !l.nft_guard4 && l.nft_guard6 && l.nft_ipv4, "{l:?}");
        let l = Firewall::Nft(vec![v4], vec![ng], None).leftovers(true);
        assert!(!l.nft_guard4 && l.nft_guard6 && l.chains.contains(&("iptables", "OVERLAY-GUARD")), "{l:?}");
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new();
        let mut step = Backoff::MIN;
        for _ in 0..12 {
            let w = b.next();
            assert!(w >= step / 2 && w <= step, "{w:?} outside [{:?}, {step:?}]", step / 2);
            step = (step * 2).min(Backoff::MAX);
        }
        assert_eq!(b.0, Backoff::MAX);
        // Jitter: many draws at the cap are not all the same.
        let draws: std::collections::BTreeSet<u128> = (0..50).map(|_| b.next().as_millis()).collect();
        assert!(draws.len() > 10, "{draws:?}");
        b.reset();
        assert!(b.next() <= Backoff::MIN);
    }
}
