//! `overlay-bench --quick` (what `cargo xtask bench --quick` runs) produces numbers for every
//! path and every figure, then the paired rounds against both kernel baselines, and the
//! control-plane benchmark for its lease count. No
//! thresholds: speed is judged by `cargo xtask bench`, never by a test.

use std::process::Command;

fn run_bench(args: &[&str], out: &std::path::Path) {
    overlay_tests::require_root();
    let st = Command::new(env!("CARGO_BIN_EXE_overlay-bench"))
        .args(args)
        .arg("--out")
        .arg(out)
        .env("OVERLAY_AGENT_BIN", overlay_tests::agent_bin())
        .output()
        .unwrap();
    assert!(st.status.success(), "overlay-bench {args:?} failed:\n{}\n{}", String::from_utf8_lossy(&st.stdout), String::from_utf8_lossy(&st.stderr));
}

#[test]
fn quick_data_plane_bench_measures_every_path() {
    let out = std::env::temp_dir().join(format!("bench-quick-{}", std::process::id()));
    run_bench(&["--quick"], &out);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("dataplane.json")).unwrap()).unwrap();
    let paths = v["paths"].as_array().unwrap();
    let names: Vec<String> = paths.iter().map(|p| format!("{}/{}", p["underlay"].as_str().unwrap(), p["path"].as_str().unwrap())).collect();
    assert_eq!(
        names,
        [
            "veth/routing", "veth/kernel_vxlan", "veth/ebpf_vxlan_tc", "veth/ebpf_vxlan_xdp",
            "veth/ebpf_udp", "veth/tun_udp", "veth/host_gw", "veth/ebpf_vxlan_direct", "wire/routing", "wire/kernel_vxlan",
            "wire/ebpf_vxlan_tc", "wire/ebpf_vxlan_xdp", "wire/host_gw", "wire/ebpf_vxlan_direct",
        ]
    );
    for p in paths {
        for (metric, value) in p["median"].as_object().unwrap() {
            let x = value.as_f64().unwrap();
            assert!(x.is_finite() && x > 0.0, "{names:?} {}: {metric} = {x}", p["path"]);
            let s = &p["spread"][metric];
            let (lo, hi) = (s["min"].as_f64().unwrap(), s["max"].as_f64().unwrap());
            assert!(lo <= x && x <= hi, "{}: {metric}: median {x} outside {lo}-{hi}", p["path"]);
        }
        assert_eq!(p["median"].as_object().unwrap().len(), 7);
        // Every path has a kernel vxlan baseline on its own underlay.
        assert!(p["vs_kernel_vxlan"]["tcp1_gbps"]["median"].as_f64().unwrap() > 0.0, "{}", p["path"]);
    }
    paired_runs_compare_the_default_against_both_baselines(&out);
    let svg = std::fs::read_to_string(out.join("dataplane.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<rect"), "chart");

    // `render` writes the markdown again from the JSON; never from a --quick run.
    let md = out.join("BENCHMARKS.md");
    let render = || {
        Command::new(env!("CARGO_BIN_EXE_overlay-bench"))
            .args(["render", "--out"])
            .arg(&out)
            .arg("--markdown")
            .arg(&md)
            .output()
            .unwrap()
    };
    let refused = render();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--quick"), "{refused:?}");
    let mut v = v;
    v["quick"] = serde_json::Value::Bool(false);
    std::fs::write(out.join("dataplane.json"), serde_json::to_string(&v).unwrap()).unwrap();
    let done = render();
    assert!(done.status.success(), "{done:?}");
    let text = std::fs::read_to_string(&md).unwrap();
    for want in ["#### Underlay: veth", "#### Underlay: wire", "### Targets", "wire: eBPF vxlan (XDP) TCP 1 stream vs kernel vxlan"] {
        assert!(text.contains(want), "BENCHMARKS.md lacks {want:?}:\n{text}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// The second half of `overlay-bench --quick`: paired rounds of the default data plane and
/// both kernel baselines, and where the eBPF path's time goes.
fn paired_runs_compare_the_default_against_both_baselines(out: &std::path::Path) {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("paired.json")).unwrap()).unwrap();
    let underlays = v["underlays"].as_array().unwrap();
    assert_eq!(underlays.iter().map(|u| u["underlay"].as_str().unwrap()).collect::<Vec<_>>(), ["veth", "wire"]);
    for u in underlays {
        let at = u["underlay"].as_str().unwrap();
        for side in ["ebpf", "kernel", "kernel_notrack"] {
            let runs = u["runs"][side].as_array().unwrap_or_else(|| panic!("{at}: no runs of {side}"));
            assert_eq!(runs.len(), 2, "{at}/{side}: one run per round");
            for r in runs {
                for f in ["udp64_kpps", "rr_tps", "tcp1_gbps", "cpu_s_per_gb", "cpu_s_per_mpkt"] {
                    let x = r[f].as_f64().unwrap();
                    assert!(x.is_finite() && x > 0.0, "{at}/{side}: {f} = {x}");
                }
                // The fixed loads are far below what any path carries.
                assert!(r["udp_fixed_delivered"].as_f64().unwrap() > 0.5, "{at}/{side}: {r}");
            }
        }
        let comparisons = u["comparisons"].as_array().unwrap();
        assert_eq!(comparisons.len(), 10, "five figures against two baselines");
        for c in comparisons {
            let (m, lo, hi) = (c["median"].as_f64().unwrap(), c["lo"].as_f64().unwrap(), c["hi"].as_f64().unwrap());
            assert!(lo <= m && m <= hi && m > 0.0, "{at}: {c}");
        }
        // The kernel's own counts: encap runs once per packet sent (the rest of the flow's
        // packets are iperf3's control connection), decap once per packet received.
        let programs = u["programs"].as_array().unwrap();
        let per_packet = |node: u64, name: &str| {
            programs
                .iter()
                .find(|p| p["node"] == node && p["program"] == name)
                .unwrap_or_else(|| panic!("{at}: no {name} on node {node}: {programs:?}"))["runs_per_packet"]
                .as_f64()
                .unwrap()
        };
        for (node, name) in [(1, "tc_egress_encap"), (2, "tc_ingress_decap")] {
            let r = per_packet(node, name);
            assert!((0.9..1.5).contains(&r), "{at}: {name} on node {node} ran {r} times per packet");
        }
    }
}

#[test]
fn quick_control_plane_bench_measures_propagation_and_memory() {
    let out = std::env::temp_dir().join(format!("bench-cp-{}", std::process::id()));
    run_bench(&["control-plane", "--quick"], &out);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("control-plane.json")).unwrap()).unwrap();
    let r = &v[0];
    for k in ["start_to_maps_filled_ms", "change_to_map_p50_ms", "change_to_map_p99_ms", "agent_rss_mib"] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {}", r[k]);
    }
    assert_eq!(r["leases"], 200);
    std::fs::remove_dir_all(&out).unwrap();
}
