//! Coverage-guided fuzzing of the agent's userspace parsers (fuzz/, cargo-fuzz + libFuzzer,
//! nightly with AddressSanitizer). The agent is built without its eBPF object for this
//! (AYA_BUILD_SKIP=1): the parsers do not need it.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{status, workspace_root};

pub const TARGETS: [&str; 5] = ["network_config", "lease_value", "subnet_key", "docker_opts", "cli_args"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn ensure_cargo_fuzz() -> Result<()> {
    let ok = Command::new("rustup")
        .args(["run", "nightly", "cargo", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    status(crate::cargo().args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked"]))
        .context("installing cargo-fuzz")
}

/// Run each target for `seconds`; a crash fails with the target named (its reproducer is
/// kept under fuzz/artifacts/).
pub fn run(seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    for t in TARGETS {
        eprintln!("fuzz: {t} for {seconds} s");
        let st = Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", t, "--", &format!("-max_total_time={seconds}"), "-print_final_stats=1"])
            .current_dir(workspace_root())
            .env("AYA_BUILD_SKIP", "1")
            .status()
            .with_context(|| format!("running fuzz target {t}"))?;
        if !st.success() {
            bail!("fuzz target {t} failed ({st}); the crashing input is under fuzz/artifacts/{t}/");
        }
    }
    eprintln!("fuzz: {} targets ran {seconds} s each without a crash", TARGETS.len());
    Ok(())
}
