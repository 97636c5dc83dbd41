//! `overlay-bench --quick` (what `cargo xtask bench --quick` runs) produces numbers for every
//! path and every figure, and the control-plane benchmark for its lease count. No
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
