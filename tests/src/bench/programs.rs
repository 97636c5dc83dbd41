//! `cargo xtask bench programs`: what each program costs per packet, measured by the kernel.
//!
//! The throughput benchmark cannot resolve a few tens of nanoseconds on these machines (its
//! figures move by 10-20% from run to run); this one can. Each program runs on a crafted frame
//! through `BPF_PROG_TEST_RUN`, one packet per call (encap and native decap rewrite the frame,
//! so the kernel's own repeat would measure a different path from the second run on), and the
//! kernel reports the time the program took, its timer's overhead included. The floor is the
//! decap program on a frame that is not ours (it looks at the EtherType and passes): what is
//! above it is the work of the path. Figures: median and 90th percentile over many calls,
//! interleaved by round so that a disturbance hits every path alike.
//!
//! Runs in a private network namespace of its own (a thread that unshared it), with a veth
//! underlay whose peers' link-layer addresses are known (as live peers' are) and a real
//! `flannel.1`, so that encap's route lookup does what it does on a node.

use std::{fmt::Write as _, fs, net::Ipv4Addr, path::Path, process::Command};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};
use etherparse::PacketBuilder;
use overlay_agent::{
    dataplane::ebpf_object,
    maps::{Maps, Route},
    netdev,
};
use overlay_common::{config_flags, prog_names, DataplaneConfig, EncapMode};
use serde::{Deserialize, Serialize};

const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const PEER_VTEP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

#[derive(Debug, Serialize, Deserialize)]
pub struct ProgramFigure {
    pub path: String,
    /// What the program returned and did (checked on every call).
    pub outcome: String,
    pub median_ns: u64,
    pub p90_ns: u64,
    /// Median minus the floor's median.
    pub above_floor_ns: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProgramsReport {
    pub date: String,
    pub kernel: String,
    pub calls: usize,
    pub figures: Vec<ProgramFigure>,
}

fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    ensure!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// The node's links in the current (private) namespace.
fn links() -> Result<()> {
    sh("ip", &["link", "set", "lo", "up"])?;
    sh("ip", &["link", "add", "ul0", "type", "veth", "peer", "name", "ul0p"])?;
    sh("ip", &["link", "set", "ul0p", "up"])?;
    sh("ip", &["addr", "add", "192.168.50.1/24", "dev", "ul0"])?;
    sh("ip", &["link", "set", "ul0", "up"])?;
    sh("ip", &["neigh", "replace", &PEER.to_string(), "lladdr", "02:00:00:00:01:02", "dev", "ul0", "nud", "permanent"])?;
    sh("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    sh("ip", &["link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", "192.168.50.1", "dev", "ul0", "dstport", "8472", "nolearning"])?;
    sh("ip", &["link", "set", "flannel.1", "mtu", "1450", "up"])
}

/// A node's programs, configured with `flags` and one route (10.244.2.0/24 to `PEER`),
/// nothing attached.
fn node(flags: u16) -> Result<(Ebpf, Maps, DataplaneConfig)> {
    let underlay = netdev::require_link("ul0")?;
    let overlay = netdev::require_link("flannel.1")?;
    ensure!(!ebpf_object().is_empty(), "the agent was built without its eBPF programs");
    let mut ebpf = EbpfLoader::new().load(ebpf_object()).context("loading the programs")?;
    let mut maps = Maps::take(&mut ebpf)?;
    let cfg = DataplaneConfig {
        mode: EncapMode::Vxlan as u32,
        vni: 1,
        port: 8472,
        flags: config_flags::READY | flags,
        underlay_ifindex: underlay.ifindex,
        overlay_ifindex: overlay.ifindex,
        underlay_ip: ME.octets(),
        local_subnet: [10, 244, 1, 0],
        local_prefix_len: 24,
        vtep_mac: overlay.mac,
        _pad: [0; 2],
    };
    maps.set_config(&cfg)?;
    maps.upsert_route(&Route { subnet: "10.244.2.0/24".parse()?, public_ip: PEER, vtep_mac: PEER_VTEP_MAC, wireguard: None })?;
    Ok((ebpf, maps, cfg))
}

/// An inner TCP segment of `payload` bytes between containers, behind an Ethernet header.
fn inner_frame(src: [u8; 4], dst: [u8; 4], payload: usize, smac: [u8; 6], dmac: [u8; 6]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(smac, dmac).ipv4(src, dst, 64).tcp(40000, 5201, 1, 65535);
    let mut f = Vec::new();
    b.write(&mut f, &vec![0x5a; payload]).expect("frame");
    f
}

/// A VXLAN frame from `PEER` to us carrying `inner`.
fn vxlan_frame(inner: &[u8]) -> Vec<u8> {
    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vx.extend_from_slice(inner);
    let b = PacketBuilder::ethernet2([0x02, 0, 0, 0, 1, 2], [0x02, 0, 0, 0, 0, 1]).ipv4(PEER.octets(), ME.octets(), 64).udp(50000, 8472);
    let mut f = Vec::new();
    b.write(&mut f, &vx).expect("frame");
    f
}

struct Case {
    path: &'static str,
    program: &'static str,
    /// Which of the node's configurations (0: kernel delivery, 1: stack delivery, 2: kernel
    /// delivery with `BIG_TRIE` routes).
    node: usize,
    frame: Vec<u8>,
    expect_rc: u32,
    outcome: &'static str,
    samples: Vec<u64>,
}

fn run_once(ebpf: &mut Ebpf, program: &str, frame: &[u8], out: &mut [u8]) -> Result<(u32, u64)> {
    let p = ebpf.program_mut(program).with_context(|| format!("no program {program}"))?;
    let opts = TestRunOptions { data_in: Some(frame), data_out: Some(out), ..Default::default() };
    let r = if program == prog_names::XDP_DECAP {
        let x: &mut Xdp = p.try_into()?;
        if x.fd().is_err() {
            x.load()?;
        }
        x.test_run(opts)?
    } else {
        let c: &mut SchedClassifier = p.try_into()?;
        if c.fd().is_err() {
            c.load()?;
        }
        c.test_run(opts)?
    };
    Ok((r.return_value, r.duration.as_nanos() as u64))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure(calls: usize) -> Result<Vec<ProgramFigure>> {
    // Two nodes' worth of programs in one namespace: the maps are each loader's own.
    links()?;
    let (mut kernel_node, _kmaps, cfg) = node(config_flags::KERNEL_DECAP)?;
    let (mut stack_node, _smaps, _) = node(0)?;
    // The route lookup's share: the same programs with a trie of a large cluster's size
    // (flannel's default network holds 256 /24 leases; a /8 with /24s holds 65536).
    let (mut big_node, mut bmaps, _) = node(config_flags::KERNEL_DECAP)?;
    for x in 0..BIG_TRIE {
        let subnet = format!("10.{}.{}.0/24", x / 256, x % 256).parse()?;
        bmaps.upsert_route(&Route { subnet, public_ip: PEER, vtep_mac: PEER_VTEP_MAC, wireguard: None })?;
    }
    let mac = cfg.vtep_mac;
    let to_peer = inner_frame([10, 244, 1, 5], [10, 244, 2, 7], 1398 - 40, mac, mac);
    let from_peer = vxlan_frame(&inner_frame([10, 244, 2, 7], [10, 244, 1, 5], 1398 - 40, PEER_VTEP_MAC, mac));
    let from_peer_big = from_peer.clone();
    let mut arp = inner_frame([10, 244, 1, 5], [10, 244, 2, 7], 18, mac, mac);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    const TCX_NEXT: u32 = u32::MAX;
    const TC_ACT_REDIRECT: u32 = 7;
    const XDP_PASS: u32 = 2;
    let mut cases = vec![
        Case { path: "floor: TC decap, not a tunnel frame", program: prog_names::TC_INGRESS_DECAP, node: 0, frame: arp, expect_rc: TCX_NEXT, outcome: "passed on", samples: vec![] },
        Case { path: "TC decap, kernel delivery", program: prog_names::TC_INGRESS_DECAP, node: 0, frame: from_peer.clone(), expect_rc: TCX_NEXT, outcome: "checked, left to the vxlan device", samples: vec![] },
        Case { path: "XDP decap", program: prog_names::XDP_DECAP, node: 0, frame: from_peer.clone(), expect_rc: XDP_PASS, outcome: "checked, passed to the stack", samples: vec![] },
        Case { path: "TC decap, stack delivery", program: prog_names::TC_INGRESS_DECAP, node: 1, frame: from_peer, expect_rc: TC_ACT_REDIRECT, outcome: "decapsulated, redirected", samples: vec![] },
        Case { path: "TC encap (vxlan)", program: prog_names::TC_EGRESS_ENCAP, node: 0, frame: to_peer.clone(), expect_rc: TC_ACT_REDIRECT, outcome: "encapsulated, redirected", samples: vec![] },
        Case { path: "TC decap, kernel delivery, 10,000 routes", program: prog_names::TC_INGRESS_DECAP, node: 2, frame: from_peer_big, expect_rc: TCX_NEXT, outcome: "checked, left to the vxlan device", samples: vec![] },
        Case { path: "TC encap (vxlan), 10,000 routes", program: prog_names::TC_EGRESS_ENCAP, node: 2, frame: to_peer, expect_rc: TC_ACT_REDIRECT, outcome: "encapsulated, redirected", samples: vec![] },
    ];
    let mut out = vec![0u8; 4096];
    // Warm up (JIT, caches, the neighbour entry), then interleave rounds.
    for round in 0..calls + 1000 {
        for c in cases.iter_mut() {
            let ebpf = match c.node {
                0 => &mut kernel_node,
                1 => &mut stack_node,
                _ => &mut big_node,
            };
            let (rc, ns) = run_once(ebpf, c.program, &c.frame, &mut out)?;
            if rc != c.expect_rc {
                bail!("{}: the program returned {rc:#x}, expected {:#x}", c.path, c.expect_rc);
            }
            if round >= 1000 {
                c.samples.push(ns);
            }
        }
    }
    let floor = {
        let mut s = cases[0].samples.clone();
        s.sort_unstable();
        percentile(&s, 0.5)
    };
    Ok(cases
        .into_iter()
        .map(|mut c| {
            c.samples.sort_unstable();
            let median = percentile(&c.samples, 0.5);
            ProgramFigure {
                path: c.path.into(),
                outcome: c.outcome.into(),
                median_ns: median,
                p90_ns: percentile(&c.samples, 0.9),
                above_floor_ns: median as i64 - floor as i64,
            }
        })
        .collect())
}

fn table(r: &ProgramsReport) -> String {
    let mut t = String::from("| path | outcome | median ns | p90 ns | above the floor |\n|---|---|---:|---:|---:|\n");
    for f in &r.figures {
        let _ = writeln!(t, "| {} | {} | {} | {} | {} |", f.path, f.outcome, f.median_ns, f.p90_ns, f.above_floor_ns);
    }
    t
}

/// Measure, write `programs.json` to `out`, and the section of `md` after its
/// `<!-- programs -->` marker (appended if missing).
pub fn run(quick: bool, out: &Path, md: Option<&Path>, sh_out: impl Fn(&str) -> String) -> Result<()> {
    let calls = if quick { 10_000 } else { 50_000 };
    eprintln!("programs: {calls} calls per path...");
    let figures = std::thread::spawn(move || -> Result<Vec<ProgramFigure>> {
        // SAFETY: unshare affects this thread only (a fresh network namespace for it).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        measure(calls)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))??;
    let report = ProgramsReport { date: sh_out("date -u +%Y-%m-%dT%H:%M:%SZ"), kernel: sh_out("uname -r"), calls, figures };
    fs::create_dir_all(out)?;
    fs::write(out.join("programs.json"), serde_json::to_string_pretty(&report)?)?;
    let t = table(&report);
    println!("{t}");
    if let Some(md) = md {
        let old = fs::read_to_string(md).unwrap_or_default();
        let head = old.split_once(MARKER).map(|(h, _)| h.to_string()).unwrap_or(old);
        let head = format!("{}\n\n", head.trim_end());
        let text = format!(
            "{head}{MARKER}\n## Per packet, per program\n\nMeasured by `cargo xtask bench programs` on {} (kernel {}): each program run on a crafted\n\
             frame through `BPF_PROG_TEST_RUN`, one packet per call, {} calls per path interleaved by round;\n\
             the kernel's own timing of the run (its timer's overhead included). The floor is the decap\n\
             program on a frame that is not a tunnel frame; \"above the floor\" is the path's own work.\n\
             Frames: 1398-byte inner TCP segments (a full overlay MTU of 1450 with its Ethernet header).\n\
             Encap's figure includes its route lookup (`bpf_fib_lookup`), `bpf_skb_adjust_room` and the\n\
             header store; the redirect itself happens after the program and is not in it. A test run's\n\
             packet carries no flow hash, so encap's source-port hash (`bpf_get_hash_recalc`) runs the\n\
             flow dissector here; a packet from a local TCP socket carries its hash already, and the\n\
             kernel's vxlan device computes the same.\n\
             The `10,000 routes` rows run the same programs with that many /24 routes in the trie\n\
             (decap's inner-source check and encap's route lookup both use it): the difference to\n\
             the one-route rows is what the trie's size costs.\n\
             Compare figures of one run only: these machines' speed differs from one boot to the next\n\
             (encap measured 260-280 ns in one and 930-1380 ns in others).\n\n{t}",
            report.date, report.kernel, report.calls
        );
        fs::write(md, text)?;
    }
    Ok(())
}

/// Routes in the large trie (`TC * 10,000 routes`).
const BIG_TRIE: u32 = 10_000;

/// Where the section starts in BENCHMARKS.md; the other benchmarks keep what follows it.
pub const MARKER: &str = "<!-- programs -->";
