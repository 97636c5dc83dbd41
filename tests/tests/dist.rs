//! The files in dist/ and docs/ stay true to the agent: the unit's ExecStart (with the
//! options file expanded as systemd does) parses, and every flag is documented. No root.

use std::{path::Path, process::Command};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn unit_line(unit: &str, key: &str) -> String {
    let text = std::fs::read_to_string(root().join(unit)).unwrap();
    text.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {unit}")).to_string()
}

#[test]
fn the_units_exec_start_parses_with_the_seeds_options() {
    let exec = unit_line("dist/systemd/flanneld.service", "ExecStart=");
    let cfg = std::fs::read_to_string(root().join("dist/flannel.cfg")).unwrap();
    let opts = cfg.lines().find_map(|l| l.strip_prefix("FLANNEL_OPTIONS=")).unwrap().trim_matches('"');
    // systemd splits an unquoted $VAR on whitespace.
    let mut words: Vec<String> = exec.split_whitespace().skip(1).map(str::to_string).collect();
    let at = words.iter().position(|w| w == "$FLANNEL_OPTIONS").expect("ExecStart uses $FLANNEL_OPTIONS");
    words.splice(at..=at, opts.split_whitespace().map(str::to_string));
    assert!(words.iter().any(|w| w.starts_with("-etcd-cafile=")), "the seed's Go-style flag is kept: {words:?}");
    let out = Command::new(overlay_tests::agent_bin()).args(&words).arg("--version").output().unwrap();
    assert!(out.status.success(), "{words:?}: {}", String::from_utf8_lossy(&out.stderr));
    // ExecStartPost is the seed's docker-options step.
    let post = unit_line("dist/systemd/flanneld.service", "ExecStartPost=");
    assert!(post.ends_with("mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/subnet.env"), "{post}");
    assert!(unit_line("dist/systemd/flanneld.service", "Type=") == "notify");
    assert!(unit_line("dist/systemd/docker.service.d-flannel.conf", "EnvironmentFile=") == "-/run/flannel/subnet.env");
}

#[test]
fn every_flag_is_in_the_operators_reference() {
    let help = Command::new(overlay_tests::agent_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let reference = std::fs::read_to_string(root().join("docs/flags.md")).unwrap();
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-').split('=').next().unwrap())
        .collect();
    assert!(flags.len() > 20, "{flags:?}");
    for f in flags {
        assert!(reference.contains(&format!("`{f}")), "docs/flags.md does not document {f}");
    }
}
