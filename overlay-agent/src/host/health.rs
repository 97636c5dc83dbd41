//! `--healthz-ip/--healthz-port`: `/healthz` (the process serves), `/readyz` (lease held,
//! maps filled, subnet file written) and `/metrics` (Prometheus/OpenMetrics text).
//!
//! The agent's own figures live in `AgentState` (atomics, shared with the daemon); the data
//! plane's counters are read from the pinned maps at each scrape by a prometheus-client
//! `Collector`, so a scrape always shows what the kernel counted, even across agent restarts.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{body::Bytes, Request, Response, StatusCode};
use overlay_common::Counter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::maps::Maps;

/// What the daemon tells the health endpoints and metrics.
#[derive(Debug)]
pub struct AgentState {
    pub ready: AtomicBool,
    /// Our subnet (the IPv6 one in an IPv6-only network) and when its etcd lease expires
    /// unless renewed (`None`: a reservation).
    pub lease: Mutex<Option<(ipnet::IpNet, Option<Instant>)>>,
    pub etcd_reconnects: AtomicU64,
    pub malformed_leases: AtomicU64,
    pub lease_renewals: AtomicU64,
    pub iptables_restores: AtomicU64,
    /// Times the overlay device, its address or its route were found missing and restored.
    pub device_repairs: AtomicU64,
    /// Times the node's public address changed and the data plane and lease followed.
    pub public_ip_changes: AtomicU64,
    /// Routes that could not be written (a full map).
    pub route_errors: AtomicU64,
    /// The `--ip-blackhole-route` routes the node should have (its subnets, both families),
    /// re-added every `--iptables-resync` seconds when someone removed them, as flanneld does.
    pub blackholes: Mutex<Vec<ipnet::IpNet>>,
    pub bpffs_dir: PathBuf,
    /// Set when the TUN data plane forwards (its counters replace the maps').
    pub tun_stats: std::sync::OnceLock<Arc<crate::tun::TunStats>>,
    /// Why the node runs degraded (on the kernel device alone), when it does.
    pub degraded: std::sync::OnceLock<String>,
    /// The kernel's per-program run statistics, on while this descriptor is held
    /// (BPF_ENABLE_STATS: the count and time cost a little on every run of every program, so
    /// they run only while someone scrapes /metrics: taken at a scrape, given back once no
    /// scrape came for `PROGRAM_STATS_HOLD`; the global sysctl is never touched). With the
    /// last scrape's time.
    program_stats: Mutex<Option<(std::os::fd::OwnedFd, Instant)>>,
}

/// How long the program statistics stay on after the last scrape that showed them.
pub const PROGRAM_STATS_HOLD: std::time::Duration = std::time::Duration::from_secs(300);

impl AgentState {
    pub fn new(bpffs_dir: PathBuf) -> Self {
        Self {
            ready: AtomicBool::new(false),
            lease: Mutex::new(None),
            etcd_reconnects: AtomicU64::new(0),
            malformed_leases: AtomicU64::new(0),
            lease_renewals: AtomicU64::new(0),
            iptables_restores: AtomicU64::new(0),
            device_repairs: AtomicU64::new(0),
            public_ip_changes: AtomicU64::new(0),
            route_errors: AtomicU64::new(0),
            blackholes: Mutex::new(Vec::new()),
            bpffs_dir,
            tun_stats: std::sync::OnceLock::new(),
            degraded: std::sync::OnceLock::new(),
            program_stats: Mutex::new(None),
        }
    }

    /// Keep the kernel's program statistics on for another `PROGRAM_STATS_HOLD` (taking the
    /// descriptor if not held); whether they are on. A kernel without BPF_ENABLE_STATS (5.8)
    /// has none to show.
    fn hold_program_stats(&self) -> bool {
        let mut held = self.program_stats.lock().expect("stats lock");
        match held.as_mut() {
            Some((_, at)) => *at = Instant::now(),
            None => match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => {
                    tracing::info!("program run statistics on while /metrics is scraped (BPF_ENABLE_STATS)");
                    *held = Some((fd, Instant::now()))
                }
                Err(e) => tracing::debug!(error = %e, "no program run statistics (BPF_ENABLE_STATS, Linux 5.8)"),
            },
        }
        held.is_some()
    }

    /// Give the statistics back once no scrape asked for them for `PROGRAM_STATS_HOLD`.
    fn release_idle_program_stats(&self) {
        let mut held = self.program_stats.lock().expect("stats lock");
        if held.as_ref().is_some_and(|(_, at)| at.elapsed() >= PROGRAM_STATS_HOLD) {
            *held = None;
            tracing::info!("program run statistics off: no /metrics scrape for {} s", PROGRAM_STATS_HOLD.as_secs());
        }
    }

    pub fn set_lease(&self, subnet: ipnet::IpNet, expires: Option<Instant>) {
        *self.lease.lock().expect("lease lock") = Some((subnet, expires));
    }
}

#[derive(Debug)]
struct AgentCollector(Arc<AgentState>);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for AgentCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        gauge(&mut e, "overlay_ready", "1 once the lease is held, the maps are filled and the subnet file is written", s.ready.load(Ordering::Relaxed) as i64)?;
        {
            let mut m = e.encode_descriptor(
                "overlay_degraded",
                "1 when the eBPF data plane cannot run and the node runs as a stock flannel node on its kernel device, vxlan or ipip (no checks, no guard, no counters), with why",
                None,
                MetricType::Gauge,
            )?;
            match s.degraded.get() {
                Some(reason) => ConstGauge::new(1i64).encode(m.encode_family(&[("reason", reason.as_str())])?)?,
                None => ConstGauge::new(0i64).encode(m.encode_family(&[("reason", "")])?)?,
            }
        }
        let lease = *s.lease.lock().expect("lease lock");
        {
            let mut m = e.encode_descriptor("overlay_lease_info", "This node's subnet lease (value 1)", None, MetricType::Gauge)?;
            if let Some((subnet, _)) = lease {
                let labels = [("subnet", subnet.to_string())];
                ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
            }
        }
        match lease {
            Some((_, None)) => gauge(&mut e, "overlay_lease_reserved", "1: the subnet is a reservation (no TTL, never renewed)", 1)?,
            _ => {
                let left = lease.and_then(|(_, exp)| exp).map(|exp| exp.saturating_duration_since(Instant::now()).as_secs() as i64).unwrap_or(0);
                gauge(&mut e, "overlay_lease_expiry_seconds", "Seconds until the lease expires unless renewed", left)?;
            }
        }
        counter(&mut e, "overlay_lease_renewals", "Lease renewals", s.lease_renewals.load(Ordering::Relaxed))?;
        counter(&mut e, "overlay_etcd_reconnects", "Times the agent lost etcd and listed again", s.etcd_reconnects.load(Ordering::Relaxed))?;
        counter(&mut e, "overlay_malformed_leases", "Lease keys or values skipped because they are not flannel's format", s.malformed_leases.load(Ordering::Relaxed))?;
        counter(&mut e, "overlay_device_repairs", "Times the overlay device, its address or its route were found missing and restored", s.device_repairs.load(Ordering::Relaxed))?;
        counter(&mut e, "overlay_public_ip_changes", "Times the node's public address changed and the data plane and lease followed", s.public_ip_changes.load(Ordering::Relaxed))?;
        counter(&mut e, "overlay_iptables_restores", "Times iptables rules were found missing or changed and restored", s.iptables_restores.load(Ordering::Relaxed))?;
        counter(&mut e, "overlay_route_errors", "Routes that could not be written to the maps (full route or peer map)", s.route_errors.load(Ordering::Relaxed))?;

        if let Some(t) = s.tun_stats.get() {
            let mut m = e.encode_descriptor("overlay_datapath_packets", "Packets by data-plane outcome (drops carry kind=drop)", None, MetricType::Counter)?;
            for (name, kind, v) in [
                ("encapsulated", "ok", &t.encapsulated),
                ("decapsulated", "ok", &t.decapsulated),
                ("no_route", "drop", &t.no_route),
                ("unknown_peer", "drop", &t.unknown_peer),
                ("truncated", "drop", &t.malformed),
                ("not_local_subnet", "drop", &t.not_local_subnet),
                ("ttl_expired", "drop", &t.ttl_expired),
            ] {
                let labels = [("outcome", name), ("kind", kind)];
                ConstCounter::new(v.load(Ordering::Relaxed)).encode(m.encode_family(&labels)?)?;
            }
            return Ok(());
        }
        // A wireguard node: its device's peers, as the kernel counts them (no maps).
        if let Some(r) = crate::datapath::wireguard::recorded(&s.bpffs_dir) {
            let devices: Vec<(&str, crate::wireguard::DeviceInfo)> = r.devices().filter_map(|d| crate::wireguard::device(d).ok().map(|i| (d, i))).collect();
            if !devices.is_empty() {
                wireguard_metrics(&mut e, &devices)?;
            }
        }
        let Ok(maps) = Maps::open(&s.bpffs_dir) else { return Ok(()) };
        if let Ok(config) = maps.config() {
            program_stats(&mut e, s, &config)?;
        }
        // Where encap's redirect hands packets on: its failures (no route, no neighbour entry
        // could be made) count as the underlay's tx errors, a dead link's losses as its tx
        // drops, in the kernel's stats of that device; the programs never see them.
        let underlay = maps.config().ok().filter(|c| c.is_ready()).and_then(|c| crate::netdev::name_of(c.underlay_ifindex));
        if let Some((dev, st)) = underlay.and_then(|d| underlay_tx_stats(&d).map(|st| (d, st))) {
            for (name, help, v) in [
                ("overlay_underlay_tx_errors", "Transmit errors of the underlay device (encap's failed redirects count here)", st.errors),
                ("overlay_underlay_tx_dropped", "Packets the underlay device dropped on transmit (a link without carrier, a full queue)", st.dropped),
            ] {
                let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
                ConstCounter::new(v).encode(m.encode_family(&[("device", dev.as_str())])?)?;
            }
        }
        if let Ok(routes) = maps.routes() {
            gauge(&mut e, "overlay_routes", "Entries in the route map (remote subnets)", routes.len() as i64)?;
        }
        if let Ok(counters) = maps.counters() {
            let mut m = e.encode_descriptor("overlay_datapath_packets", "Packets by data-plane outcome (drops carry kind=drop)", None, MetricType::Counter)?;
            for c in Counter::ALL {
                let labels = [("outcome", c.name()), ("kind", if c.is_drop() { "drop" } else { "ok" })];
                ConstCounter::new(counters[c as usize]).encode(m.encode_family(&labels)?)?;
            }
        }
        // The kernel's own drops on the underlay and the overlay device (kfree_skb), by the
        // running kernel's reason names.
        if let Ok(drops) = crate::datapath::kernel_drops::counts(&s.bpffs_dir) {
            let reasons = crate::datapath::kernel_drops::reasons();
            let mut m = e.encode_descriptor(
                "overlay_kernel_drops",
                "Packets the kernel dropped on the underlay or the overlay device past our programs, by the kernel's reason",
                None,
                MetricType::Counter,
            )?;
            for (k, v) in &drops {
                let dev = crate::netdev::name_of(k.ifindex).unwrap_or_else(|| format!("ifindex-{}", k.ifindex));
                let labels = [("reason", crate::datapath::kernel_drops::reason_name(reasons, k.reason)), ("device", dev)];
                ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
            }
        }
        if let Ok(peers) = maps.peer_totals() {
            gauge(&mut e, "overlay_peers", "Peers (nodes some route points at)", peers.len() as i64)?;
            {
                let mut m = e.encode_descriptor("overlay_peer_packets", "Packets to (tx) and from (rx) each peer", None, MetricType::Counter)?;
                for (ip, t) in &peers {
                    for (dir, v) in [("tx", t.tx_packets), ("rx", t.rx_packets)] {
                        let labels = [("peer", ip.to_string()), ("direction", dir.to_string())];
                        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            let mut m = e.encode_descriptor("overlay_peer_bytes", "Inner bytes to (tx) and from (rx) each peer", None, MetricType::Counter)?;
            for (ip, t) in &peers {
                for (dir, v) in [("tx", t.tx_bytes), ("rx", t.rx_bytes)] {
                    let labels = [("peer", ip.to_string()), ("direction", dir.to_string())];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// A wireguard node's peers: how many, each one's bytes and its last handshake (labelled by
/// endpoint, as the other peer metrics are by address, and by public key).
fn wireguard_metrics(e: &mut DescriptorEncoder, devices: &[(&str, crate::wireguard::DeviceInfo)]) -> Result<(), std::fmt::Error> {
    // A dual-stack node has each peer on both devices: nodes are counted once.
    let nodes: std::collections::BTreeSet<_> = devices.iter().flat_map(|(_, d)| d.peers.iter().map(|p| p.public_key)).collect();
    gauge(e, "overlay_peers", "Peers (nodes some route points at)", nodes.len() as i64)?;
    let peers = || devices.iter().flat_map(|(dev, d)| d.peers.iter().map(move |p| (*dev, p)));
    let labels = |dev: &str, p: &crate::wireguard::PeerInfo| {
        [
            ("device", dev.to_string()),
            ("peer", p.endpoint.map_or("-".to_string(), |a| a.ip().to_string())),
            ("public_key", crate::wireguard::format_key(&p.public_key)),
        ]
    };
    {
        let mut m = e.encode_descriptor("overlay_wireguard_peer_bytes", "Bytes wireguard sent to (tx) and received from (rx) each peer, encrypted", None, MetricType::Counter)?;
        for (dev, p) in peers() {
            for (dir, v) in [("tx", p.tx_bytes), ("rx", p.rx_bytes)] {
                let [a, b, c] = labels(dev, p);
                let l = [a, b, c, ("direction", dir.to_string())];
                ConstCounter::new(v).encode(m.encode_family(&l)?)?;
            }
        }
    }
    let mut m = e.encode_descriptor(
        "overlay_wireguard_peer_last_handshake_seconds",
        "Unix time of each peer's last completed handshake (0: none yet)",
        None,
        MetricType::Gauge,
    )?;
    for (dev, p) in peers() {
        ConstGauge::new(p.last_handshake_secs as i64).encode(m.encode_family(&labels(dev, p))?)?;
    }
    Ok(())
}

/// Each of the node's programs' runs and time in them, as the kernel counts them while the
/// statistics are on (since they were last turned on: counts restart from what the kernel kept).
fn program_stats(e: &mut DescriptorEncoder, s: &AgentState, config: &overlay_common::DataplaneConfig) -> Result<(), std::fmt::Error> {
    let on = s.hold_program_stats();
    gauge(e, "overlay_program_stats_enabled", "1 while the kernel counts the programs' runs and run time (on while /metrics is scraped)", on as i64)?;
    if !on {
        return Ok(());
    }
    let ours = crate::dataplane::running_programs(&s.bpffs_dir, config);
    // Each of ours with its labels, as the kernel describes it now.
    let infos: Vec<([(&str, String); 2], aya::programs::ProgramInfo)> = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter_map(|p| ours.iter().find(|(_, id)| *id == p.id()).map(|(name, id)| ([("program", name.to_string()), ("id", id.to_string())], p)))
        .collect();
    {
        let mut m = e.encode_descriptor("overlay_program_runs", "Runs of each of the node's programs while statistics are on", None, MetricType::Counter)?;
        for (labels, p) in &infos {
            ConstCounter::new(p.run_count()).encode(m.encode_family(labels)?)?;
        }
    }
    let mut m = e.encode_descriptor("overlay_program_run_seconds", "Time spent in each of the node's programs while statistics are on", None, MetricType::Counter)?;
    for (labels, p) in &infos {
        ConstCounter::new(p.run_time().as_secs_f64()).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// A device's transmit errors and drops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxStats {
    pub errors: u64,
    pub dropped: u64,
}

/// `dev`'s transmit errors and drops from `/proc/net/dev`, which shows the devices of the
/// reader's network namespace (sysfs would show the mount's).
fn underlay_tx_stats(dev: &str) -> Option<TxStats> {
    parse_proc_net_dev(&std::fs::read_to_string("/proc/net/dev").ok()?, dev)
}

/// `dev`'s line in `/proc/net/dev` text: eight receive columns, then transmit bytes,
/// packets, errs, drop, ...
pub fn parse_proc_net_dev(text: &str, dev: &str) -> Option<TxStats> {
    text.lines().skip(2).find_map(|line| {
        let (name, cols) = line.split_once(':')?;
        if name.trim() != dev {
            return None;
        }
        let v: Vec<u64> = cols.split_whitespace().map(|c| c.parse().ok()).collect::<Option<_>>()?;
        Some(TxStats { errors: *v.get(10)?, dropped: *v.get(11)? })
    })
}

/// The metrics text for `state` (what /metrics serves).
pub fn render_metrics(state: &Arc<AgentState>) -> Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentCollector(state.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).context("encoding metrics")?;
    Ok(out)
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn handle(state: &Arc<AgentState>, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if state.ready.load(Ordering::Relaxed) => respond(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready: no lease or data plane yet\n".into()),
        "/metrics" => match render_metrics(state) {
            Ok(text) => respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", text),
            Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e:#}\n")),
        },
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "try /healthz, /readyz or /metrics\n".into()),
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serve until the future is dropped.
pub async fn serve(addr: SocketAddr, state: Arc<AgentState>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} for /healthz"))?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let idle = state.clone();
    let _release = AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            idle.release_idle_program_stats();
        }
    }));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a health connection");
                continue;
            }
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = handle(&st, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                tracing::debug!(error = %e, "health connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_dev_lines_are_read_by_column() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n \
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n \
  eth0: 5000000    4000    1    2    0     0          0         0  6000000    5000    7   42    0     0       0          0\n";
        assert_eq!(parse_proc_net_dev(text, "eth0"), Some(TxStats { errors: 7, dropped: 42 }));
        assert_eq!(parse_proc_net_dev(text, "lo"), Some(TxStats { errors: 0, dropped: 0 }));
        assert_eq!(parse_proc_net_dev(text, "eth"), None);
        assert_eq!(parse_proc_net_dev("garbage\n\nx: 1 2\n", "x"), None);
    }

    /// A dual-stack wireguard node has each peer on flannel-wg and flannel-wg-v6: nodes are
    /// counted once, each device's traffic is its own series.
    #[test]
    fn wireguard_metrics_count_a_node_once_and_label_each_device() {
        #[derive(Debug)]
        struct Devices(Vec<(&'static str, crate::wireguard::DeviceInfo)>);
        impl Collector for Devices {
            fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                wireguard_metrics(&mut e, &self.0)
            }
        }
        let peer = |key: u8, endpoint: &str, tx: u64| crate::wireguard::PeerInfo {
            public_key: [key; 32],
            endpoint: Some(endpoint.parse().unwrap()),
            allowed_ips: Vec::new(),
            preshared_key: None,
            keepalive: 0,
            last_handshake_secs: 7,
            rx_bytes: 0,
            tx_bytes: tx,
        };
        let dev = |peers| crate::wireguard::DeviceInfo { public_key: Some([9; 32]), listen_port: 51820, peers };
        let devices = Devices(vec![
            ("flannel-wg", dev(vec![peer(1, "192.168.0.2:51820", 100), peer(2, "192.168.0.3:51820", 200)])),
            ("flannel-wg-v6", dev(vec![peer(1, "[fd00::2]:51821", 300), peer(2, "[fd00::3]:51821", 400)])),
        ]);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(devices));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("overlay_peers 2\n"), "{text}");
        let key1 = crate::wireguard::format_key(&[1; 32]);
        for (device, peer, tx) in [("flannel-wg", "192.168.0.2", 100), ("flannel-wg-v6", "fd00::2", 300)] {
            let series = format!("overlay_wireguard_peer_bytes_total{{device=\"{device}\",peer=\"{peer}\",public_key=\"{key1}\",direction=\"tx\"}} {tx}");
            assert!(text.contains(&series), "{series} not in:\n{text}");
        }
        assert_eq!(text.matches("# TYPE overlay_wireguard_peer_bytes").count(), 1, "one family for both devices:\n{text}");
    }

    #[test]
    fn metrics_render_without_maps() {
        let st = Arc::new(AgentState::new("/nonexistent".into()));
        st.etcd_reconnects.fetch_add(3, Ordering::Relaxed);
        st.set_lease("10.244.5.0/24".parse::<ipnet::Ipv4Net>().unwrap().into(), Some(Instant::now() + std::time::Duration::from_secs(100)));
        let text = render_metrics(&st).unwrap();
        assert!(text.contains("overlay_etcd_reconnects_total 3"), "{text}");
        assert!(text.contains("overlay_lease_info{subnet=\"10.244.5.0/24\"} 1"), "{text}");
        assert!(text.contains("# TYPE overlay_lease_expiry_seconds gauge"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
