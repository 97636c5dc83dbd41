//! The lease's lifecycle: acquiring one (`lease::acquire` decides, this performs the steps
//! against etcd), keeping it (the keeper task's reports), rewriting it when the node's
//! attributes change, and re-acquiring it when it is lost, which may move the node to a
//! different subnet (`readdress` decides how the data plane follows).

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::mpsc;

use super::{etcd::retry, Daemon, DaemonOptions};
use crate::{
    config::NetworkConfig,
    lease::{
        acquire::{Acquisition, Outcome, Step, MAX_ATTEMPTS},
        keeper::{self, KeeperEvent},
        registry::{Registry, RegistryError},
        LeaseAttrs, LeaseKey,
    },
    netdev,
    subnet_file::{self, SubnetEnv},
};


/// This node's lease.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    pub subnet: Ipv4Net,
    /// A dual-stack node's IPv6 subnet.
    pub subnet6: Option<Ipv6Net>,
    /// 0 for a reservation (a key without an etcd lease: never expires, never renewed).
    pub etcd_lease: i64,
    /// The TTL etcd granted (unused for a reservation).
    pub ttl: Duration,
    /// When it was granted or last renewed.
    pub since: Instant,
}

impl Held {
    pub(super) fn reservation(key: LeaseKey) -> Self {
        Held { subnet: key.v4, subnet6: key.v6, etcd_lease: 0, ttl: Duration::ZERO, since: Instant::now() }
    }
    /// The key our lease has in etcd.
    pub(super) fn key(&self) -> LeaseKey {
        LeaseKey { v4: self.subnet, v6: self.subnet6 }
    }
    pub(super) fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }
    /// When it expires unless renewed (`None`: a reservation).
    pub(super) fn expires(&self) -> Option<Instant> {
        (!self.is_reservation()).then(|| self.since + self.ttl)
    }
}

/// Whether `e` says etcd no longer knows the lease.
pub(super) fn lease_gone(e: &anyhow::Error) -> bool {
    e.downcast_ref::<RegistryError>().is_some_and(RegistryError::is_lease_gone)
}

/// Claim a subnet for this node: `lease::acquire` decides each step (flannel's algorithm:
/// reuse our lease or reservation if it still fits the config, deleting ours that do not,
/// else claim a free subnet, the previous one first); this performs them against etcd.
pub(super) async fn acquire(
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

pub(super) fn write_subnet_file(opts: &DaemonOptions, cfg: &NetworkConfig, held: &Held, mtu: u32) -> Result<()> {
    let ipv6 = cfg.ipv6.zip(held.subnet6).map(|(c6, s6)| (c6.network, s6));
    let env = SubnetEnv { ipv4: cfg.enable_ipv4.then_some((cfg.network, held.subnet)), mtu, ip_masq: opts.ip_masq, ipv6 };
    subnet_file::write(&opts.subnet_file, &env)?;
    Ok(())
}

/// The keeper's next report, or never if there is no keeper.
pub(super) async fn keeper_report(keeper: &mut Option<(tokio::task::JoinHandle<()>, mpsc::UnboundedReceiver<KeeperEvent>)>) -> Option<KeeperEvent> {
    match keeper {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Daemon {
    /// Write `attrs` into our lease (same etcd lease): a new VtepMAC or PublicIP reaches the
    /// peers. A lease etcd no longer knows means claiming again.
    pub(super) async fn announce(&mut self, attrs: LeaseAttrs) -> Result<()> {
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


    /// `attrs` with the IPv6 half our lease has now (a dual-stack node's lease keeps it when
    /// its IPv4 device changes).
    pub(super) fn keep_v6(&self, mut attrs: LeaseAttrs) -> LeaseAttrs {
        attrs.public_ipv6 = self.attrs.public_ipv6;
        attrs.backend_v6_data = self.attrs.backend_v6_data.clone();
        attrs
    }

    /// Start renewing the lease we hold (replacing a keeper for an earlier one).
    pub(super) fn start_keeper(&mut self) {
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

    pub(super) async fn keeper_event(&mut self, ev: Option<KeeperEvent>) -> Result<()> {
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
    pub(super) async fn lost_lease(&mut self, why: &str) -> Result<()> {
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
        let how = readdress(ReaddressInputs {
            // A wireguard node's device address is set with its peers at start: a restart
            // readdresses it (its key and peers stay).
            restarts: self.tun.is_some() || self.cfg.backend.wireguard.is_some(),
            ipv6_only: self.v6.is_some() && !self.cfg.enable_ipv4,
            host_gw: self.cfg.backend.host_gw,
            degraded: self.state.degraded.get().is_some(),
        });
        if how == Readdress::Restart {
            bail!("the {} data plane cannot change subnets while running; exiting so that it restarts with {}", if self.tun.is_some() { "TUN" } else { "wireguard" }, held.subnet);
        }
        self.spec.subnet = held.subnet;
        self.sync_blackhole()?;
        let mtu = match how {
            Readdress::Restart => unreachable!("refused above"),
            Readdress::Ipv6Device => self.v6.as_ref().map_or(0, |o6| o6.mtu),
            Readdress::Underlay => netdev::require_link(&self.spec.iface)?.mtu,
            Readdress::KernelDevice => {
                netdev::set_device_address(&self.spec.device, held.subnet.network())?;
                netdev::require_link(&self.spec.device)?.mtu
            }
            Readdress::Dataplane => {
                let dp = super::bringup::dataplane_up(&self.spec).await?;
                let mtu = dp.mtu;
                self.ebpf = Some(dp);
                mtu
            }
        };
        write_subnet_file(&self.opts, &self.cfg, &held, mtu)?;
        self.renew_rules().await?;
        Ok(())
    }
}

/// What a node is when its lease moves to a different subnet.
#[derive(Clone, Copy, Debug)]
pub(super) struct ReaddressInputs {
    /// Its data plane changes subnets only by restarting (TUN, wireguard).
    pub restarts: bool,
    /// Its one overlay device is flannel-v6 (already readdressed with the IPv6 subnet).
    pub ipv6_only: bool,
    pub host_gw: bool,
    /// The eBPF side could not run: the kernel's vxlan device carries the traffic alone.
    pub degraded: bool,
}

/// How a node follows its new subnet, and where its containers' MTU comes from then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Readdress {
    /// The data plane cannot change subnets while running: exit, to restart with it.
    Restart,
    /// flannel-v6's MTU.
    Ipv6Device,
    /// host-gw has no device: containers keep the underlay's MTU.
    Underlay,
    /// Degraded: the kernel device alone, readdressed; the programs stay off.
    KernelDevice,
    /// The data plane brought up again for the new subnet (device address, programs).
    Dataplane,
}

pub(super) fn readdress(n: ReaddressInputs) -> Readdress {
    if n.restarts {
        Readdress::Restart
    } else if n.ipv6_only {
        Readdress::Ipv6Device
    } else if n.host_gw {
        Readdress::Underlay
    } else if n.degraded {
        Readdress::KernelDevice
    } else {
        Readdress::Dataplane
    }
}

/// The subnet a previous run held, as its subnet file says (the key this node's lease had:
/// the IPv4 subnet's, or on an IPv6-only network the IPv6 one's).
pub(super) fn previous_key((v4, v6): (Option<Ipv4Net>, Option<Ipv6Net>), enable_ipv4: bool) -> Option<LeaseKey> {
    if enable_ipv4 {
        v4.map(|n| LeaseKey::from(&n))
    } else {
        v6.map(LeaseKey::ipv6_only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_follows_a_new_subnet_the_way_its_data_plane_can() {
        let base = ReaddressInputs { restarts: false, ipv6_only: false, host_gw: false, degraded: false };
        assert_eq!(readdress(base), Readdress::Dataplane);
        assert_eq!(readdress(ReaddressInputs { restarts: true, ..base }), Readdress::Restart);
        assert_eq!(readdress(ReaddressInputs { ipv6_only: true, ..base }), Readdress::Ipv6Device);
        assert_eq!(readdress(ReaddressInputs { host_gw: true, ..base }), Readdress::Underlay);
        assert_eq!(readdress(ReaddressInputs { degraded: true, ..base }), Readdress::KernelDevice);
        // TUN cannot readdress whatever else holds; an IPv6-only node's device is flannel-v6.
        assert_eq!(readdress(ReaddressInputs { restarts: true, host_gw: true, degraded: true, ipv6_only: false }), Readdress::Restart);
        assert_eq!(readdress(ReaddressInputs { ipv6_only: true, degraded: true, ..base }), Readdress::Ipv6Device);
    }

    #[test]
    fn the_previous_subnet_is_the_one_of_the_networks_family() {
        let v4: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let v6: Ipv6Net = "fd00:10:0:3::/64".parse().unwrap();
        assert_eq!(previous_key((Some(v4), Some(v6)), true), Some(LeaseKey::from(&v4)));
        assert_eq!(previous_key((None, Some(v6)), true), None);
        assert_eq!(previous_key((Some(v4), Some(v6)), false), Some(LeaseKey::ipv6_only(v6)));
        assert_eq!(previous_key((None, None), false), None);
    }

    #[test]
    fn a_reservation_never_expires_and_a_lease_expires_after_its_ttl() {
        let k = LeaseKey::from(&"10.244.3.0/24".parse::<Ipv4Net>().unwrap());
        let r = Held::reservation(k);
        assert!(r.is_reservation() && r.expires().is_none() && r.key() == k);
        let since = Instant::now();
        let l = Held { etcd_lease: 7, ttl: Duration::from_secs(60), since, ..r };
        assert_eq!(l.expires(), Some(since + Duration::from_secs(60)));
    }
}
