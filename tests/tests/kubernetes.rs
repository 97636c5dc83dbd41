//! dist/kubernetes/overlay-agent.yaml, checked offline (no API server can be had here): it
//! parses as YAML; the DaemonSet runs on the host's network, installs the CNI plugin in an init
//! container, gives the agent flags it accepts and the host paths it needs, and every volume
//! it mounts is declared. No root.

use std::{collections::BTreeSet, path::Path, process::Command};

use yaml_rust2::{Yaml, YamlLoader};

fn manifest() -> Vec<Yaml> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/kubernetes/overlay-agent.yaml");
    YamlLoader::load_from_str(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("not YAML: {e}"))
}

fn strs(y: &Yaml) -> Vec<String> {
    y.as_vec().map(|v| v.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[test]
fn the_daemonset_gives_the_agent_what_it_needs() {
    let docs = manifest();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["Namespace", "ConfigMap", "Secret", "DaemonSet"]);
    for d in &docs {
        assert!(d["apiVersion"].as_str().is_some() && d["metadata"]["name"].as_str().is_some(), "{d:?}");
    }
    let ds = docs.iter().find(|d| d["kind"].as_str() == Some("DaemonSet")).unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(ds["spec"]["selector"]["matchLabels"], ds["spec"]["template"]["metadata"]["labels"], "the selector matches the pods");

    // The init container is install-cni into the host's CNI directories.
    let init = &pod["initContainers"][0];
    let cmd = strs(&init["command"]);
    assert_eq!(&cmd[..2], ["/usr/bin/overlay-agent", "install-cni"], "the agent where the image has it");
    // The image `cargo xtask dist` makes (tests/tests/install.rs runs it), taken from the node.
    let image = format!("overlay-agent:{}", env!("CARGO_PKG_VERSION"));
    for c in [&pod["initContainers"][0], &pod["containers"][0]] {
        assert_eq!((c["image"].as_str(), c["imagePullPolicy"].as_str()), (Some(image.as_str()), Some("IfNotPresent")), "{c:?}");
    }
    let agent = overlay_tests::agent_bin();
    let help = Command::new(&agent).args(["install-cni", "--help"]).output().unwrap();
    for flag in cmd.iter().filter(|w| w.starts_with("--")) {
        assert!(String::from_utf8_lossy(&help.stdout).contains(flag.as_str()), "install-cni takes no {flag}");
    }

    // The agent's own flags parse (with the ConfigMap's values where the manifest refers to them).
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"].as_bool(), Some(true));
    let config = docs.iter().find(|d| d["kind"].as_str() == Some("ConfigMap")).unwrap();
    let args: Vec<String> = strs(&c["args"])
        .into_iter()
        .map(|a| {
            a.replace("$(ETCD_ENDPOINTS)", config["data"]["etcd-endpoints"].as_str().unwrap())
                .replace("$(ETCD_PREFIX)", config["data"]["etcd-prefix"].as_str().unwrap())
        })
        .collect();
    assert!(args.iter().all(|a| !a.contains("$(")), "an unresolved variable: {args:?}");
    let out = Command::new(&agent).args(&args).arg("--version").output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    // The probes ask the port the agent serves.
    let port = args.iter().find_map(|a| a.strip_prefix("--healthz-port=")).and_then(|p| p.parse::<i64>().ok()).expect("--healthz-port");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!((c[probe]["httpGet"]["path"].as_str(), c[probe]["httpGet"]["port"].as_i64()), (Some(path), Some(port)), "{probe}");
    }

    // Every mount has its volume; the host paths the agent and the plugin share are there.
    let volumes: BTreeSet<&str> = pod["volumes"].as_vec().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    let mut mounted = BTreeSet::new();
    for ctr in [init, c] {
        for m in ctr["volumeMounts"].as_vec().unwrap() {
            let name = m["name"].as_str().unwrap();
            assert!(volumes.contains(name), "{name} is mounted but not declared");
            mounted.insert(m["mountPath"].as_str().unwrap().to_string());
        }
    }
    for path in ["/run/flannel", "/sys/fs/bpf", "/host/opt/cni/bin", "/host/etc/cni/net.d"] {
        assert!(mounted.contains(path), "{path} is not mounted: {mounted:?}");
    }
    let host_paths: BTreeSet<&str> = pod["volumes"].as_vec().unwrap().iter().filter_map(|v| v["hostPath"]["path"].as_str()).collect();
    for path in ["/run/flannel", "/sys/fs/bpf", "/opt/cni/bin", "/etc/cni/net.d"] {
        assert!(host_paths.contains(path), "no hostPath {path}");
    }
}
