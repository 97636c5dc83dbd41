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
