//! Developer workflows: `cargo xtask setup | build | test | demo`.
//!
//! xtask depends on nothing that needs the eBPF toolchain, so `setup` can run on a fresh
//! machine before anything eBPF has been built.

mod fuzz;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Set up, build, test and demo the overlay network")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the project needs (apt packages, nightly rust-src, bpf-linker) and
    /// mount bpffs. Idempotent; fast when everything is present.
    Setup,
    /// Set up, then build the agent (debug, or --release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run every test (unit and namespace integration tests; root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build (release) and benchmark the data plane against its baselines, or the
    /// control plane (`bench control-plane`). Writes target/bench/ and BENCHMARKS.md (root).
    Bench {
        /// `control-plane` for the etcd/agent benchmark; nothing for the data plane.
        what: Option<String>,
        /// A short smoke run (does not update BENCHMARKS.md).
        #[arg(long)]
        quick: bool,
        /// Interleaved runs per figure (median); default 3.
        #[arg(long)]
        runs: Option<u32>,
    },
    /// Run every fuzz target (cargo fuzz, nightly) for a while each.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Set up, build, and run a local 3-node demo cluster in network namespaces (root).
    Demo {
        /// Keep the cluster until Ctrl-C instead of cleaning up when the demo is done.
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

fn build_agent(release: bool) -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "--package", "overlay-agent", "--bins"]);
    if release {
        c.arg("--release");
    }
    status(&mut c).context("building the agent")?;
    Ok(target_dir().join(if release { "release" } else { "debug" }).join("overlay-agent"))
}

/// Run `cargo test`, echoing its output, and add up its `test result:` lines.
fn run_counting_tests(c: &mut Command) -> Result<(u64, u64, bool)> {
    use std::io::BufRead as _;
    let mut child = c.stdout(std::process::Stdio::piped()).spawn().context("running cargo test")?;
    let out = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |key: &str| rest.split(';').find_map(|p| p.trim().strip_suffix(key)).and_then(|n| n.trim().split_whitespace().last()?.parse::<u64>().ok()).unwrap_or(0);
            passed += num(" passed");
            failed += num(" failed");
        }
    }
    let st = child.wait()?;
    Ok((passed, failed, st.success()))
}

fn require_root(what: &str) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} creates network namespaces and loads eBPF programs: run it as root");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            let bin = build_agent(release)?;
            println!("built {}", bin.display());
            Ok(())
        }
        Cmd::Test { args } => {
            setup::run()?;
            require_root("cargo xtask test")?;
            // A second build whose programs differ, for the live-upgrade test; then the
            // default build (which stays target/debug/overlay-agent).
            status(cargo().args(["build", "--package", "overlay-agent", "--bins", "--features", "upgrade-variant"]))
                .context("building the upgrade-variant agent")?;
            let upgrade = target_dir().join("upgrade");
            std::fs::create_dir_all(&upgrade)?;
            std::fs::copy(target_dir().join("debug/overlay-agent"), upgrade.join("overlay-agent"))?;
            let agent = build_agent(false)?;
            let mut c = cargo();
            c.args(["test", "--workspace", "--exclude", "overlay-ebpf", "--no-fail-fast"])
                .args(&args)
                .env("OVERLAY_AGENT_BIN", &agent)
                .env("OVERLAY_AGENT_UPGRADE_BIN", upgrade.join("overlay-agent"))
                .env("RUST_BACKTRACE", "1");
            let (passed, failed, ok) = run_counting_tests(&mut c)?;
            if !ok {
                println!("tests: {passed} passed, {failed} failed");
                bail!("tests failed");
            }
            // The fuzzers, briefly: a smoke run that every target builds and survives.
            let fuzzed = fuzz::run(5);
            println!("tests: {passed} passed, {failed} failed");
            fuzzed
        }
        Cmd::Fuzz { seconds } => {
            setup::run()?;
            fuzz::run(seconds)
        }
        Cmd::Bench { what, quick, runs } => {
            setup::run()?;
            require_root("cargo xtask bench")?;
            let agent = build_agent(true)?;
            status(cargo().args(["build", "--release", "--package", "overlay-tests", "--bin", "overlay-bench"]))?;
            let mut c = Command::new(target_dir().join("release").join("overlay-bench"));
            c.current_dir(workspace_root()).env("OVERLAY_AGENT_BIN", &agent);
            match what.as_deref() {
                None => {}
                Some("control-plane") => {
                    c.arg("control-plane");
                }
                Some(other) => bail!("unknown benchmark {other:?}: use `cargo xtask bench` or `cargo xtask bench control-plane`"),
            }
            c.arg("--out").arg(target_dir().join("bench"));
            if quick {
                c.arg("--quick");
            } else {
                c.arg("--markdown").arg(workspace_root().join("BENCHMARKS.md"));
            }
            if let Some(r) = runs {
                c.args(["--runs", &r.to_string()]);
            }
            unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
            status(&mut c)
        }
        Cmd::Demo { keep } => {
            setup::run()?;
            require_root("cargo xtask demo")?;
            let agent = build_agent(false)?;
            status(cargo().args(["build", "--package", "overlay-tests", "--bin", "overlay-demo"]))?;
            let demo = target_dir().join("debug").join("overlay-demo");
            let mut c = Command::new(demo);
            c.env("OVERLAY_AGENT_BIN", &agent);
            if keep {
                c.arg("--keep");
            }
            // Ctrl-C reaches the demo too; it cleans up and exits. Wait for it.
            unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
            status(&mut c)
        }
    }
}
