//! The agent binary as an operator meets it, before it touches anything.

use std::process::Command;

/// A unit written for flanneld's Kubernetes mode stops at once with what to do instead
/// (before, clap's "unexpected argument"), and leaves nothing behind.
#[test]
fn a_kubernetes_mode_unit_is_refused_with_what_to_do() {
    let dir = std::env::temp_dir().join(format!("overlay-kube-refusal-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_overlay-agent"))
        .args(["--ip-masq", "--kube-subnet-mgr", "--iface=eth0", "--bpffs-dir"])
        .arg(&dir)
        .env_remove("FLANNELD_KUBE_SUBNET_MGR")
        .output()
        .expect("running the agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--kube-subnet-mgr: flanneld's Kubernetes subnet manager is not part of this build"), "{err}");
    assert!(err.contains("docs/kubernetes.md") && !err.contains("unexpected argument"), "{err}");
    assert!(!dir.exists(), "the refused agent created {}", dir.display());

    // flanneld's other flag of that mode that needs no API server is taken and ignored.
    let out = Command::new(env!("CARGO_BIN_EXE_overlay-agent"))
        .args(["--net-config-path", "/etc/kube-flannel/net-conf.json", "--help"])
        .output()
        .expect("running the agent");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
