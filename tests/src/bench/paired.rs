//! `cargo xtask bench paired` (also the second half of `cargo xtask bench`): the default data
//! plane against its two baselines, in paired runs that noise cannot hide behind.
//!
//! The throughput benchmark's figures move by 10-20% from run to run on these machines, so
//! a difference of a few percent is invisible in them. Here each round measures the eBPF
//! data plane and both baselines moments apart (their order rotates from round to round, so
//! that no path always runs first or after the same neighbour), each round gives one ratio
//! per baseline (a pair), and the figure is the median of at least 10 such ratios with a
//! bootstrap 90% interval. A target is met only when the whole interval clears it.
//!
//! Baselines: the kernel vxlan device as flannel sets it up, and the same with a raw-table
//! NOTRACK rule for the tunnel's datagrams (so that a win is not just the rule any flannel
//! node could add). Every node is set up as the seed's are: strict rp_filter (the cluster's
//! default), docker's FORWARD DROP with accepts for the overlay network, and kube-proxy's
//! conntrack INVALID drop (which also makes conntrack track every flow, as on a real node).
//!
//! Figures per run: 64-byte UDP packets/s (unlimited sender), TCP request/response
//! transactions/s (sockperf), TCP 1 stream Gbit/s, and CPU cost at a fixed offered load that
//! every path sustains: busy CPU seconds of the whole machine (/proc/stat) per GB at
//! `FIXED_TCP_MBPS` of TCP, and per million packets at `FIXED_UDP_PPS` 64-byte UDP packets/s.
//! A fixed-load run that a path did not sustain (under 95% delivered) is left out of the CPU
//! ratios and said.

use std::{collections::BTreeMap, fs, net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};
use overlay_tests::{wait_until, Backend, Cluster, ClusterSpec, Netns};
use serde::{Deserialize, Serialize};

use super::{iperf3, iperf3_server, machine, CpuMeter, request_response, sh, PathKind, Underlay};

/// The fixed TCP load for CPU per GB: well under what every path carries on both underlays
/// (the slowest, the kernel device on the wire underlay, carried 3-4.6 Gbit/s).
const FIXED_TCP_MBPS: u32 = 1500;
/// The fixed 64-byte UDP load for CPU per million packets (every path received 36k-80k/s).
const FIXED_UDP_PPS: u32 = 20_000;
/// A fixed-load run counts when at least this share of what was offered arrived.
const SUSTAINED: f64 = 0.95;
/// Bootstrap resamples of the pairs' ratios.
const RESAMPLES: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The agent's default data plane (TC checks, the kernel's vxlan device decapsulates).
    Ebpf,
    /// The kernel vxlan device as flannel sets it up.
    Kernel,
    /// The same with NOTRACK for the tunnel's datagrams in the raw table.
    KernelNotrack,
}

impl Side {
    const ALL: [Side; 3] = [Side::Ebpf, Side::Kernel, Side::KernelNotrack];
    fn label(self) -> &'static str {
        match self {
            Side::Ebpf => "eBPF vxlan (default)",
            Side::Kernel => "kernel vxlan (flannel)",
            Side::KernelNotrack => "kernel vxlan + NOTRACK",
        }
    }
    fn path(self) -> PathKind {
        match self {
            Side::Ebpf => PathKind::EbpfVxlanTc,
            Side::Kernel | Side::KernelNotrack => PathKind::KernelVxlan,
        }
    }
}

/// One run of one path.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Run {
    pub udp64_kpps: f64,
    pub rr_tps: f64,
    pub tcp1_gbps: f64,
    /// Busy CPU seconds per GB received at the fixed TCP load.
    pub cpu_s_per_gb: f64,
    /// Busy CPU seconds per million packets received at the fixed UDP load.
    pub cpu_s_per_mpkt: f64,
    /// Share of the fixed TCP load delivered.
    pub tcp_fixed_delivered: f64,
    /// Share of the fixed UDP load delivered.
    pub udp_fixed_delivered: f64,
}

/// (field, heading, higher is better, a fixed-load figure)
pub const METRICS: [(&str, &str, bool, bool); 5] = [
    ("udp64_kpps", "UDP64 packets/s", true, false),
    ("rr_tps", "request/response", true, false),
    ("tcp1_gbps", "TCP 1 stream", true, false),
    ("cpu_s_per_gb", "CPU per GB", false, true),
    ("cpu_s_per_mpkt", "CPU per M packets", false, true),
];

impl Run {
    fn get(&self, field: &str) -> f64 {
        match field {
            "udp64_kpps" => self.udp64_kpps,
            "rr_tps" => self.rr_tps,
            "tcp1_gbps" => self.tcp1_gbps,
            "cpu_s_per_gb" => self.cpu_s_per_gb,
            "cpu_s_per_mpkt" => self.cpu_s_per_mpkt,
            _ => unreachable!("unknown metric {field}"),
        }
    }
    /// Whether a fixed-load figure of this run counts.
    fn sustained(&self, field: &str) -> bool {
        match field {
            "cpu_s_per_gb" => self.tcp_fixed_delivered >= SUSTAINED,
            "cpu_s_per_mpkt" => self.udp_fixed_delivered >= SUSTAINED,
            _ => true,
        }
    }
}

/// The paired ratios of one figure against one baseline.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub metric: String,
    pub baseline: Side,
    /// One ratio per round (eBPF / baseline), rounds where both ran.
    pub ratios: Vec<f64>,
    pub median: f64,
    /// Bootstrap 90% interval of the median.
    pub lo: f64,
    pub hi: f64,
    /// Pairs left out because a fixed load was not sustained.
    pub left_out: usize,
}

/// One program's cost in the eBPF path's extra run (statistics on for that run only).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramCost {
    pub node: usize,
    pub program: String,
    pub ns_per_run: f64,
    /// Runs per 64-byte UDP packet received at the far end.
    pub runs_per_packet: f64,
    /// Its time as a share of the machine's busy time over that run.
    pub share: f64,
}

#[derive(Serialize, Deserialize)]
pub struct UnderlayResult {
    pub underlay: Underlay,
    pub runs: BTreeMap<Side, Vec<Run>>,
    pub comparisons: Vec<Comparison>,
    /// Where the eBPF path's time goes, from the kernel's program statistics.
    #[serde(default)]
    pub programs: Vec<ProgramCost>,
}

#[derive(Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub kernel: String,
    pub machine: String,
    pub quick: bool,
    pub pairs: usize,
    pub seconds: u32,
    pub underlays: Vec<UnderlayResult>,
}

/// splitmix64: a fixed seed, so that the same ratios always give the same interval.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median of `ratios` and a percentile-bootstrap 90% interval for it.
pub fn median_interval(ratios: &[f64]) -> (f64, f64, f64) {
    if ratios.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut rng = Rng(0x6f76_6572_6c61_7921);
    let mut medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let sample: Vec<f64> = (0..ratios.len()).map(|_| ratios[(rng.next() % ratios.len() as u64) as usize]).collect();
            median(&sample)
        })
        .collect();
    medians.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| medians[((q * (RESAMPLES - 1) as f64).round() as usize).min(RESAMPLES - 1)];
    (median(ratios), at(0.05), at(0.95))
}

/// Whether an interval clears a target: all of it at or above `want` (higher is better), or
/// at or below it.
pub fn clears(lo: f64, hi: f64, want: f64, higher: bool) -> bool {
    if higher { lo >= want } else { hi <= want }
}

fn compare(runs: &BTreeMap<Side, Vec<Run>>, baseline: Side) -> Vec<Comparison> {
    let (ours, base) = (&runs[&Side::Ebpf], &runs[&baseline]);
    METRICS
        .iter()
        .map(|&(f, _, _, _)| {
            let mut left_out = 0;
            let ratios: Vec<f64> = ours
                .iter()
                .zip(base)
                .filter_map(|(a, b)| {
                    if !(a.sustained(f) && b.sustained(f)) {
                        left_out += 1;
                        return None;
                    }
                    (b.get(f) > 0.0).then(|| a.get(f) / b.get(f))
                })
                .collect();
            let (median, lo, hi) = median_interval(&ratios);
            Comparison { metric: f.to_string(), baseline, ratios, median, lo, hi, left_out }
        })
        .collect()
}

fn ipt(ns: &Netns, args: &[&str]) -> Result<()> {
    let mut all = vec!["-w"];
    all.extend_from_slice(args);
    ns.run("iptables", &all).map(|_| ())
}

/// A node as the seed's: docker's FORWARD DROP with the overlay network let through, and
/// kube-proxy's INVALID drop first (conntrack then tracks every flow).
fn seed_rules(ns: &Netns, network: &str) -> Result<()> {
    ipt(ns, &["-P", "FORWARD", "DROP"])?;
    ipt(ns, &["-A", "FORWARD", "-s", network, "-j", "ACCEPT"])?;
    ipt(ns, &["-A", "FORWARD", "-d", network, "-j", "ACCEPT"])?;
    ipt(ns, &["-I", "FORWARD", "1", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])
}

/// What an operator adds to a stock flannel node to keep the tunnel out of conntrack.
fn notrack_rules(ns: &Netns) -> Result<()> {
    for chain in ["PREROUTING", "OUTPUT"] {
        ipt(ns, &["-t", "raw", "-A", chain, "-p", "udp", "--dport", "8472", "-j", "NOTRACK"])?;
    }
    Ok(())
}

/// Where the eBPF path's agents serve /metrics (inside each node's namespace).
const METRICS_PORT: u16 = 9102;

fn cluster(tag: &str, side: Side, underlay: Underlay) -> Result<Cluster> {
    let wire_underlay = underlay == Underlay::Wire;
    let spec = match side {
        // As an operator runs it: leases in etcd, /metrics served (for `program_costs`).
        Side::Ebpf => ClusterSpec {
            containers_per_node: 1,
            wire_underlay,
            agent_args: vec!["--healthz-ip=127.0.0.1".to_string(), format!("--healthz-port={METRICS_PORT}")],
            ..ClusterSpec::etcd(Backend::Vxlan, "tc", 2)
        },
        Side::Kernel | Side::KernelNotrack => ClusterSpec { wire_underlay, ..side.path().spec() },
    };
    let what = format!("{} on {}", side.label(), underlay.name());
    let c = Cluster::new(tag, &spec).with_context(|| format!("setting up {what}"))?;
    let ip = c.node(1).container_ip(0).octets();
    let network = format!("{}.{}.0.0/16", ip[0], ip[1]);
    for i in 1..=2 {
        seed_rules(&c.node(i).ns, &network).with_context(|| format!("{what}: node rules"))?;
        if side == Side::KernelNotrack {
            notrack_rules(&c.node(i).ns).with_context(|| format!("{what}: NOTRACK rules"))?;
        }
    }
    let carries = || overlay_tests::traffic::ping(&c.node(1).containers[0], c.node(2).container_ip(0), 1).is_ok();
    if !wait_until(Duration::from_secs(20), carries) {
        overlay_tests::traffic::ping(&c.node(1).containers[0], c.node(2).container_ip(0), 2).with_context(|| format!("{what} carries no traffic"))?;
    }
    Ok(c)
}

fn measure(c: &Cluster, secs: u32, pb: &ProgressBar, label: &str) -> Result<Run> {
    let (client, server) = (&c.node(1).containers[0], &c.node(2).containers[0]);
    let dst: Ipv4Addr = c.node(2).container_ip(0);
    let t = secs.to_string();
    let mut r = Run::default();
    let _srv = iperf3_server(server, 5201)?;

    pb.set_message(format!("{label}: UDP, 64-byte payloads"));
    let v = iperf3(client, dst, 5201, &["-u", "-l", "64", "-b", "0", "-t", &t])?;
    let sum = &v["end"]["sum"];
    let (packets, lost, s) = (sum["packets"].as_f64().unwrap_or(0.0), sum["lost_packets"].as_f64().unwrap_or(0.0), sum["seconds"].as_f64().unwrap_or(1.0));
    r.udp64_kpps = (packets - lost).max(0.0) / s / 1e3;

    pb.set_message(format!("{label}: TCP, 1 stream"));
    let v = iperf3(client, dst, 5201, &["-t", &t])?;
    r.tcp1_gbps = v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 tcp result")? / 1e9;

    pb.set_message(format!("{label}: TCP at {FIXED_TCP_MBPS} Mbit/s"));
    let meter = CpuMeter::start();
    let v = iperf3(client, dst, 5201, &["-t", &t, "-b", &format!("{FIXED_TCP_MBPS}M")])?;
    let cpu = meter.busy_seconds();
    let bytes = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let secs_rx = v["end"]["sum_received"]["seconds"].as_f64().unwrap_or(secs as f64);
    r.cpu_s_per_gb = if bytes > 0.0 { cpu / (bytes / 1e9) } else { 0.0 };
    r.tcp_fixed_delivered = bytes * 8.0 / (FIXED_TCP_MBPS as f64 * 1e6 * secs_rx.max(1e-3));

    pb.set_message(format!("{label}: UDP at {FIXED_UDP_PPS} packets/s"));
    let rate = format!("{}", FIXED_UDP_PPS as u64 * 64 * 8);
    let meter = CpuMeter::start();
    let v = iperf3(client, dst, 5201, &["-u", "-l", "64", "-b", &rate, "-t", &t])?;
    let cpu = meter.busy_seconds();
    let sum = &v["end"]["sum"];
    let (packets, lost, s) = (sum["packets"].as_f64().unwrap_or(0.0), sum["lost_packets"].as_f64().unwrap_or(0.0), sum["seconds"].as_f64().unwrap_or(1.0));
    let received = (packets - lost).max(0.0);
    r.cpu_s_per_mpkt = if received > 0.0 { cpu / (received / 1e6) } else { 0.0 };
    r.udp_fixed_delivered = received / (FIXED_UDP_PPS as f64 * s.max(1e-3));
    drop(_srv);

    pb.set_message(format!("{label}: TCP request/response"));
    r.rr_tps = request_response(client, server, dst, secs)?.tps;
    Ok(r)
}

/// `overlay_program_runs_total` and `overlay_program_run_seconds_total` by program, from
/// the node's /metrics (which turns the kernel's statistics on while it is being asked).
fn program_stats(ns: &Netns) -> Result<BTreeMap<String, (f64, f64)>> {
    let at = std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, METRICS_PORT);
    let (code, body) = overlay_tests::traffic::http_get(ns, at, "/metrics")?;
    if code != 200 {
        bail!("/metrics answered {code}");
    }
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with("overlay_program_run")) {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let Some(program) = key.split("program=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let v: f64 = value.parse().with_context(|| format!("bad sample {line:?}"))?;
        let e = out.entry(program.to_string()).or_default();
        if key.starts_with("overlay_program_runs_total") {
            e.0 += v;
        } else if key.starts_with("overlay_program_run_seconds_total") {
            e.1 += v;
        }
    }
    Ok(out)
}

/// One more run of the eBPF path at the fixed UDP load, with the kernel's program statistics
/// on (they cost every run a little, so the paired runs go without): each program's time per
/// run, runs per packet, and share of the machine's busy time.
fn program_costs(c: &Cluster, secs: u32) -> Result<Vec<ProgramCost>> {
    let (client, server) = (&c.node(1).containers[0], &c.node(2).containers[0]);
    let dst: Ipv4Addr = c.node(2).container_ip(0);
    let _srv = iperf3_server(server, 5201)?;
    let before = [program_stats(&c.node(1).ns)?, program_stats(&c.node(2).ns)?];
    let meter = CpuMeter::start();
    let rate = format!("{}", FIXED_UDP_PPS as u64 * 64 * 8);
    let v = iperf3(client, dst, 5201, &["-u", "-l", "64", "-b", &rate, "-t", &secs.to_string()])?;
    let busy = meter.busy_seconds();
    let after = [program_stats(&c.node(1).ns)?, program_stats(&c.node(2).ns)?];
    let sum = &v["end"]["sum"];
    let received = (sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0)).max(1.0);
    let mut out = Vec::new();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        for (program, (runs1, secs1)) in a {
            let (runs0, secs0) = b.get(program).copied().unwrap_or_default();
            let (runs, spent) = (runs1 - runs0, secs1 - secs0);
            if runs <= 0.0 {
                continue;
            }
            out.push(ProgramCost {
                node: i + 1,
                program: program.clone(),
                ns_per_run: spent * 1e9 / runs,
                runs_per_packet: runs / received,
                share: if busy > 0.0 { spent / busy } else { 0.0 },
            });
        }
    }
    Ok(out)
}

/// Targets of the default data plane: (metric, baseline, wanted ratio).
pub fn targets() -> Vec<(&'static str, Side, f64)> {
    vec![
        ("udp64_kpps", Side::Kernel, 1.2),
        ("rr_tps", Side::Kernel, 1.1),
        ("cpu_s_per_gb", Side::Kernel, 0.9),
        ("tcp1_gbps", Side::Kernel, 1.0),
        ("udp64_kpps", Side::KernelNotrack, 1.0),
        ("rr_tps", Side::KernelNotrack, 1.0),
        ("cpu_s_per_gb", Side::KernelNotrack, 1.0),
        ("tcp1_gbps", Side::KernelNotrack, 1.0),
    ]
}

pub fn markdown(report: &Report) -> String {
    let mut s = format!(
        "### Paired runs: the default data plane against both baselines\n\n\
         Measured by `cargo xtask bench` (or `cargo xtask bench paired`) on {date}: {pairs} rounds per underlay,\n\
         {secs} s per figure; each round measures the three paths moments apart, in an order that\n\
         rotates, and gives one ratio per baseline. Figures are the median of those ratios with a\n\
         bootstrap 90% interval (eBPF / baseline: above 1 is better for rates, below 1 for CPU). CPU\n\
         is the whole machine's busy time at a fixed offered load every path sustains: {tcp} Mbit/s\n\
         of TCP (per GB) and {udp} 64-byte UDP packets/s (per million packets). Nodes as the seed's:\n\
         rp_filter=1, FORWARD DROP with the network accepted, kube-proxy's INVALID drop (conntrack on).\n\n",
        date = report.date,
        pairs = report.pairs,
        secs = report.seconds,
        tcp = FIXED_TCP_MBPS,
        udp = FIXED_UDP_PPS,
    );
    for u in &report.underlays {
        s += &format!("#### Underlay: {}\n\n| figure | vs kernel vxlan | vs kernel vxlan + NOTRACK |\n|---|---|---|\n", u.underlay.name());
        for (f, heading, _, _) in METRICS {
            let cell = |b: Side| {
                u.comparisons.iter().find(|c| c.metric == f && c.baseline == b).map_or("-".to_string(), |c| {
                    let out = if c.left_out > 0 { format!(" ({} left out: load not sustained)", c.left_out) } else { String::new() };
                    format!("{:.3}x [{:.3}-{:.3}]{out}", c.median, c.lo, c.hi)
                })
            };
            s += &format!("| {heading} | {} | {} |\n", cell(Side::Kernel), cell(Side::KernelNotrack));
        }
        s += "\n| path | UDP64 kpps | RR trans/s | TCP 1 Gbit/s | CPU s/GB | CPU s/M packets |\n|---|---|---|---|---|---|\n";
        for (side, runs) in &u.runs {
            let m = |f: &str| median(&runs.iter().map(|r| r.get(f)).collect::<Vec<_>>());
            s += &format!(
                "| {} | {:.1} | {:.0} | {:.2} | {:.3} | {:.2} |\n",
                side.label(),
                m("udp64_kpps"),
                m("rr_tps"),
                m("tcp1_gbps"),
                m("cpu_s_per_gb"),
                m("cpu_s_per_mpkt")
            );
        }
        if !u.programs.is_empty() {
            s += &format!(
                "\nWhere the eBPF path's time goes: one more run at {FIXED_UDP_PPS} 64-byte packets/s with the kernel's\n\
                 program statistics on (node 1 sends, node 2 receives):\n\n| node | program | ns per run | runs per packet | share of busy CPU |\n|---|---|---|---|---|\n"
            );
            for p in &u.programs {
                s += &format!("| {} | {} | {:.0} | {:.2} | {:.2}% |\n", p.node, p.program, p.ns_per_run, p.runs_per_packet, p.share * 100.0);
            }
        }
        s += "\n";
    }
    s += "Targets (met only when the whole 90% interval clears the bar):\n\n| target | median [90% interval] | wanted | met |\n|---|---|---|---|\n";
    for u in &report.underlays {
        for (f, base, want) in targets() {
            let Some(c) = u.comparisons.iter().find(|c| c.metric == f && c.baseline == base) else { continue };
            let (_, heading, higher, _) = METRICS.iter().find(|m| m.0 == f).copied().expect("a metric");
            s += &format!(
                "| {}: {heading} vs {} | {:.3}x [{:.3}-{:.3}] | {} {want}x | {} |\n",
                u.underlay.name(),
                base.label(),
                c.median,
                c.lo,
                c.hi,
                if higher { ">=" } else { "<=" },
                if clears(c.lo, c.hi, want, higher) { "yes" } else { "no" }
            );
        }
    }
    s
}

pub fn run(quick: bool, pairs: Option<usize>, only: Option<Underlay>, out: &Path) -> Result<Report> {
    let pairs = pairs.unwrap_or(if quick { 2 } else { 10 });
    let secs = if quick { 1 } else { 3 };
    if !quick && pairs < 10 {
        bail!("a full paired run needs at least 10 pairs (asked for {pairs})");
    }
    let underlays: Vec<Underlay> = [Underlay::Veth, Underlay::Wire].into_iter().filter(|u| only.is_none_or(|o| o == *u)).collect();
    let pb = ProgressBar::new((underlays.len() * pairs * Side::ALL.len()) as u64);
    pb.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}").unwrap());
    pb.enable_steady_tick(Duration::from_millis(200));
    let mut results = Vec::new();
    for (ui, &underlay) in underlays.iter().enumerate() {
        pb.set_message(format!("building three two-node clusters on {}", underlay.name()));
        let mut clusters = BTreeMap::new();
        for (si, side) in Side::ALL.into_iter().enumerate() {
            clusters.insert(side, cluster(&format!("q{ui}{si}"), side, underlay)?);
        }
        let mut runs: BTreeMap<Side, Vec<Run>> = Side::ALL.into_iter().map(|s| (s, Vec::new())).collect();
        for round in 0..pairs {
            let mut order = Side::ALL;
            order.rotate_left(round % Side::ALL.len());
            for side in order {
                let label = format!("{} · round {}/{pairs} · {}", underlay.name(), round + 1, side.label());
                let r = measure(&clusters[&side], secs, &pb, &label).with_context(|| format!("measuring {label}"))?;
                runs.get_mut(&side).expect("every side").push(r);
                pb.inc(1);
            }
        }
        pb.set_message(format!("{}: the eBPF path with program statistics on", underlay.name()));
        let programs = program_costs(&clusters[&Side::Ebpf], secs).context("measuring the programs' share")?;
        drop(clusters);
        let mut comparisons = compare(&runs, Side::Kernel);
        comparisons.extend(compare(&runs, Side::KernelNotrack));
        results.push(UnderlayResult { underlay, runs, comparisons, programs });
    }
    pb.finish_and_clear();
    let report = Report {
        date: sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        kernel: sh("uname -r"),
        machine: machine(),
        quick,
        pairs,
        seconds: secs,
        underlays: results,
    };
    fs::create_dir_all(out)?;
    fs::write(out.join("paired.json"), serde_json::to_string_pretty(&report)?)?;
    println!("{}", markdown(&report));
    println!("JSON: {}", out.join("paired.json").display());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_holds_the_median_and_narrows_with_agreeing_pairs() {
        let spread = [0.9, 1.3, 1.0, 1.25, 0.95, 1.2, 1.05, 1.15, 1.1, 1.0];
        let (m, lo, hi) = median_interval(&spread);
        assert!((m - 1.075).abs() < 1e-9, "{m}");
        assert!(lo <= m && m <= hi && lo < hi, "{lo} {m} {hi}");
        // A spread that crosses 1.1 cannot clear it, even with the median above.
        assert!(!clears(lo, hi, 1.0, true) || lo >= 1.0);
        let tight = [1.21, 1.22, 1.23, 1.22, 1.21, 1.24, 1.22, 1.23, 1.22, 1.21];
        let (_, tlo, thi) = median_interval(&tight);
        assert!(thi - tlo < hi - lo, "agreeing pairs give a narrower interval");
        assert!(clears(tlo, thi, 1.2, true));
        assert!(!clears(tlo, thi, 1.22, true), "an interval that straddles the bar does not clear it");
        assert!(clears(0.8, 0.88, 0.9, false) && !clears(0.8, 0.91, 0.9, false));
    }

    #[test]
    fn unsustained_fixed_loads_are_left_out_of_cpu_ratios_only() {
        let run = |udp, cpu, delivered| Run { udp64_kpps: udp, cpu_s_per_gb: cpu, tcp_fixed_delivered: delivered, udp_fixed_delivered: 1.0, rr_tps: 1.0, tcp1_gbps: 1.0, cpu_s_per_mpkt: 1.0 };
        let mut runs = BTreeMap::new();
        runs.insert(Side::Ebpf, vec![run(60.0, 1.0, 1.0), run(60.0, 9.0, 0.5)]);
        runs.insert(Side::Kernel, vec![run(50.0, 2.0, 1.0), run(50.0, 2.0, 1.0)]);
        let c = compare(&runs, Side::Kernel);
        let cpu = c.iter().find(|c| c.metric == "cpu_s_per_gb").unwrap();
        assert_eq!((cpu.ratios.clone(), cpu.left_out), (vec![0.5], 1));
        let udp = c.iter().find(|c| c.metric == "udp64_kpps").unwrap();
        assert_eq!(udp.ratios, vec![1.2, 1.2]);
    }
}
