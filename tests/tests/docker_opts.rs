//! `dist/mk-docker-opts.sh` (our wrapper around `overlay-agent mk-docker-opts`) produces what
//! flannel's script produced for every flag combination (fixtures recorded from the script).
//! No root needed.

use std::{path::Path, process::Command};

fn fixtures() -> Vec<(String, Vec<String>, String)> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mk-docker-opts.txt")).unwrap();
    let mut cases = Vec::new();
    for block in text.split("== ").skip(1) {
        let (head, body) = block.split_once('\n').unwrap();
        let mut words = head.split_whitespace();
        let file = words.next().unwrap().to_string();
        cases.push((file, words.map(str::to_string).collect(), body.to_string()));
    }
    cases
}

#[test]
fn wrapper_output_matches_flannels_script_for_every_flag_combination() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let wrapper = root.join("../dist/mk-docker-opts.sh");
    let dir = std::env::temp_dir().join(format!("mkdo-fixtures-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = fixtures();
    assert!(cases.len() >= 20, "fixtures missing");
    for (file, flags, want) in cases {
        let out = dir.join("docker_opts.env");
        let _ = std::fs::remove_file(&out);
        let env_file = root.join(format!("fixtures/subnet-{file}.env"));
        let st = Command::new("sh")
            .arg(&wrapper)
            .arg("-f")
            .arg(&env_file)
            .arg("-d")
            .arg(&out)
            .args(&flags)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("OVERLAY_AGENT", overlay_tests::agent_bin())
            .output()
            .unwrap();
        assert!(st.status.success(), "{file} {flags:?}: {}", String::from_utf8_lossy(&st.stderr));
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(got, want, "{file} {flags:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_subnet_file_fails_instead_of_writing_options_without_bip() {
    let dir = std::env::temp_dir().join(format!("mkdo-missing-{}", std::process::id()));
    let out = Command::new(overlay_tests::agent_bin())
        .args(["mk-docker-opts", "-f"])
        .arg(dir.join("nope.env"))
        .arg("-d")
        .arg(dir.join("out.env"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the subnet file"));
    assert!(!dir.join("out.env").exists(), "nothing may be written");
}

/// The seed installs the script and the agent side by side into /opt/kubernetes/bin, which is
/// not on systemd's PATH, and names the script by its full path in ExecStartPost. The script
/// finds the agent beside itself (whatever the working directory and however it is named),
/// else on PATH, else as $OVERLAY_AGENT, and says what to do when none holds.
#[test]
fn wrapper_finds_the_agent_beside_it_on_path_or_by_variable() {
    use std::os::unix::fs::{symlink, PermissionsExt as _};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = std::env::temp_dir().join(format!("mkdo-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (beside, alone, cwd, bindir) = (base.join("opt/kubernetes/bin"), base.join("alone"), base.join("cwd"), base.join("bin"));
    for d in [&beside, &alone, &cwd, &bindir] {
        std::fs::create_dir_all(d).unwrap();
    }
    for d in [&beside, &alone] {
        let script = d.join("mk-docker-opts.sh");
        std::fs::copy(root.join("../dist/mk-docker-opts.sh"), &script).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    symlink(overlay_tests::agent_bin(), beside.join("overlay-agent")).unwrap();
    symlink(overlay_tests::agent_bin(), bindir.join("overlay-agent")).unwrap();
    let subnet_env = root.join("fixtures/subnet-masq.env");
    let want = "DOCKER_NETWORK_OPTIONS=\" --bip=172.17.98.1/24 --ip-masq=false --mtu=1450\"";
    let run = |script: &Path, path: &str, agent: Option<&Path>| {
        let out = cwd.join("docker.env");
        let _ = std::fs::remove_file(&out);
        let mut cmd = Command::new(script);
        cmd.args(["-k", "DOCKER_NETWORK_OPTIONS", "-f"]).arg(&subnet_env).arg("-d").arg(&out).current_dir(&cwd).env_clear().env("PATH", path);
        if let Some(a) = agent {
            cmd.env("OVERLAY_AGENT", a);
        }
        let o = cmd.output().unwrap();
        (o.status, String::from_utf8_lossy(&o.stderr).into_owned(), std::fs::read_to_string(&out).ok())
    };
    // Beside it: by absolute path (systemd's ExecStartPost) and by a relative one.
    for script in [beside.join("mk-docker-opts.sh"), Path::new("../opt/kubernetes/bin/mk-docker-opts.sh").to_path_buf()] {
        let (st, err, got) = run(&script, "/usr/bin:/bin", None);
        assert!(st.success(), "{}: {err}", script.display());
        assert!(got.as_deref().is_some_and(|g| g.contains(want)), "{}: {got:?}", script.display());
    }
    let alone_script = alone.join("mk-docker-opts.sh");
    let on_path = format!("{}:/usr/bin:/bin", bindir.display());
    let (st, err, got) = run(&alone_script, &on_path, None);
    assert!(st.success() && got.is_some_and(|g| g.contains(want)), "on PATH: {err}");
    let (st, err, got) = run(&alone_script, "/usr/bin:/bin", Some(&overlay_tests::agent_bin()));
    assert!(st.success() && got.is_some_and(|g| g.contains(want)), "OVERLAY_AGENT: {err}");
    // Nowhere: a clear error, nothing written.
    let (st, err, got) = run(&alone_script, "/usr/bin:/bin", None);
    assert_eq!(st.code(), Some(127), "{err}");
    assert!(err.contains("OVERLAY_AGENT") && err.contains("beside"), "{err}");
    assert!(got.is_none(), "nothing may be written: {got:?}");
    std::fs::remove_dir_all(&base).unwrap();
}

/// flannel's script exits 1 on a FLANNEL_IPMASQ that is neither true nor false, and writes
/// nothing: so does the wrapper.
#[test]
fn an_ip_masq_other_than_true_or_false_fails_as_in_flannels_script() {
    let dir = std::env::temp_dir().join(format!("mkdo-badmasq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let env = dir.join("subnet.env");
    std::fs::write(&env, "FLANNEL_NETWORK=172.17.0.0/16\nFLANNEL_SUBNET=172.17.98.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes\n").unwrap();
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/mk-docker-opts.sh");
    let out = Command::new("sh")
        .arg(&wrapper)
        .arg("-f")
        .arg(&env)
        .arg("-d")
        .arg(dir.join("out.env"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("OVERLAY_AGENT", overlay_tests::agent_bin())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Invalid value of FLANNEL_IPMASQ: yes"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.join("out.env").exists(), "nothing may be written");
    std::fs::remove_dir_all(&dir).unwrap();
}
