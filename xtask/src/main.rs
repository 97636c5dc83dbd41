//! Developer workflows: `cargo xtask setup | build | test | demo | bench | fuzz | fresh-check`.
//!
//! xtask depends on nothing that needs the eBPF toolchain, so `setup` can run on a fresh
//! machine before anything eBPF has been built.

mod dist;
mod fresh;
mod fuzz;
mod setup;
mod vm;

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, ExitStatus, Stdio},
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
    /// Set up, build (release) and benchmark the data plane against its baselines, the
    /// control plane (`bench control-plane`), each program's cost per packet (`bench
    /// programs`), or every backend in a qemu VM on Debian's 6.12 (`bench backends`, about 12
    /// minutes). Writes target/bench/ and BENCHMARKS.md (root).
    Bench {
        /// `control-plane` for the etcd/agent benchmark; `programs` for the programs' time per
        /// packet (BPF_PROG_TEST_RUN); `paired` for the default data plane against the kernel
        /// device (with and without NOTRACK) in paired rounds only; `backends` for every
        /// backend (ipip and wireguard too) in a VM on Debian's 6.12, figures for comparison
        /// between backends only (`render-backends` writes its section again from the last
        /// run's JSON); `render` to write
        /// BENCHMARKS.md again from the last data-plane run's JSON (no measuring); nothing for
        /// the data plane (every path, then the paired rounds).
        what: Option<String>,
        /// A short smoke run (does not update BENCHMARKS.md).
        #[arg(long)]
        quick: bool,
        /// Interleaved runs per figure (median, min, max); default 5.
        #[arg(long)]
        runs: Option<u32>,
        /// Rounds of the paired comparison (at least 10 for a full run; default 10).
        #[arg(long)]
        pairs: Option<u32>,
    },
    /// Boot Debian 12's own kernels (6.1 without TCX, 6.12 with it) in qemu and run the
    /// cluster that proves a kernel inside each, then two VMs over virtio-net for the decap
    /// hook on virtio_net (root; a few minutes). `cargo xtask test` runs it too.
    VmTest,
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
    /// Build what installs without Rust into target/dist/: a statically linked agent as a
    /// tarball, a Debian package (flannel's paths, flanneld.service, the CNI plugin), and a
    /// container image as a `docker load` archive (root: the image's Debian 12 root is
    /// debootstrapped once into target/dist-build/).
    Dist {
        /// Only the tarball and the package (no root needed).
        #[arg(long)]
        no_image: bool,
    },
    /// In a fresh Debian 12 root (debootstrap; the host's rustup toolchains seen through a
    /// copy-on-write overlay), run `cargo xtask setup` and `cargo xtask build` on a clean clone
    /// of HEAD, and run the built agent (root; about 6 minutes).
    FreshCheck {
        /// Keep the root under target/fresh-check/ instead of removing it.
        #[arg(long)]
        keep: bool,
        /// Also copy the uncommitted changes under PATH into the clone (repeatable), to
        /// check work before committing it.
        #[arg(long, value_name = "PATH")]
        uncommitted: Vec<PathBuf>,
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

/// The process a test or benchmark namespace or bpffs directory belongs to: clusters name
/// theirs `ov<pid><tag>-<n>` (tests/src/lib.rs `unique_prefix`).
fn owner_pid(name: &str) -> Option<u32> {
    let digits: String = name.strip_prefix("ov")?.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What a test or benchmark process killed outright left behind (SIGKILL, a machine
/// restarted under it: its own clean-up never ran): the network namespaces and bpffs pins
/// of processes that no longer exist. Those of a live process (a run going on beside this
/// one) are left alone.
fn sweep_dead_runs() {
    let dead = |name: &str| owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
    let names = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect()).unwrap_or_default()
    };
    for ns in names("/run/netns").into_iter().filter(|n| dead(n)) {
        eprintln!("xtask: removing network namespace {ns}, left by a run that no longer exists");
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    for pins in names("/sys/fs/bpf").into_iter().filter(|n| dead(n)) {
        eprintln!("xtask: removing /sys/fs/bpf/{pins}, left by a run that no longer exists");
        let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(&pins));
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn target_dir() -> PathBuf {
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

/// The standard output of a command that must succeed.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How many lines of its log a failed quiet command shows.
const LOG_TAIL_LINES: usize = 30;

/// Runs `cmd` quietly: no input, its output appended to `log`; a failure shows the log's tail.
pub fn status_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let st = spawn_logged(cmd, log)?.wait().with_context(|| format!("waiting for {cmd:?}"))?;
    check_logged(cmd, st, log)
}

/// Starts `cmd` with no input and its output appended to `log` (after the command line).
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(file, "$ {cmd:?}")?;
    cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file).spawn().with_context(|| format!("running {cmd:?}"))
}

/// An error with the last lines of `log` unless `st` is a success.
pub fn check_logged(cmd: &Command, st: ExitStatus, log: &Path) -> Result<()> {
    if st.success() {
        return Ok(());
    }
    let text = fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    bail!("{cmd:?} failed ({st}); the last lines of {}:\n{tail}", log.display())
}

/// Runs `step` behind a progress line: `{line}... ` and then `done in N s` or `failed`.
pub fn with_progress<T>(line: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
    eprint!("{line}... ");
    let started = std::time::Instant::now();
    let result = step();
    match &result {
        Ok(_) => eprintln!("done in {} s", started.elapsed().as_secs()),
        Err(_) => eprintln!("failed"),
    }
    result
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
            let num = |key: &str| rest.split(';').find_map(|p| p.trim().strip_suffix(key)).and_then(|n| n.split_whitespace().last()?.parse::<u64>().ok()).unwrap_or(0);
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
            sweep_dead_runs();
            // A second build whose programs differ, for the live-upgrade test; then the
            // default build (which stays target/debug/overlay-agent).
            status(cargo().args(["build", "--package", "overlay-agent", "--bins", "--features", "upgrade-variant"]))
                .context("building the upgrade-variant agent")?;
            let upgrade = target_dir().join("upgrade");
            std::fs::create_dir_all(&upgrade)?;
            std::fs::copy(target_dir().join("debug/overlay-agent"), upgrade.join("overlay-agent"))?;
            let agent = build_agent(false)?;
            // What users install (package, image, static tarball), for the tests that install it.
            let dist = dist::run(true).context("cargo xtask dist, for the installation tests")?;
            let mut c = cargo();
            c.args(["test", "--workspace", "--exclude", "overlay-ebpf", "--no-fail-fast"])
                .args(&args)
                .env("OVERLAY_DIST_DEB", &dist.deb)
                .env("OVERLAY_DIST_TARBALL", &dist.tarball)
                .env("OVERLAY_DIST_IMAGE", dist.image.as_ref().context("dist made no image")?)
                .env("OVERLAY_DIST_ROOTFS", dist.rootfs.as_ref().context("dist made no root")?)
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
            fuzzed?;
            // The kernel matrix: the same cluster on Debian 12's own kernels.
            vm::run(&agent)
        }
        Cmd::VmTest => {
            setup::run()?;
            require_root("cargo xtask vm-test")?;
            let agent = build_agent(false)?;
            vm::run(&agent)
        }
        Cmd::Fuzz { seconds } => {
            setup::run()?;
            fuzz::run(seconds)
        }
        Cmd::Bench { what, quick, runs, pairs } => {
            setup::run()?;
            require_root("cargo xtask bench")?;
            sweep_dead_runs();
            let agent = build_agent(true)?;
            status(cargo().args(["build", "--release", "--package", "overlay-tests", "--bin", "overlay-bench"]))?;
            let bench = target_dir().join("release").join("overlay-bench");
            let mut c = Command::new(&bench);
            c.current_dir(workspace_root()).env("OVERLAY_AGENT_BIN", &agent);
            match what.as_deref() {
                None => {}
                Some(sub @ ("control-plane" | "programs" | "paired" | "render" | "render-backends")) => {
                    c.arg(sub);
                }
                Some("backends") => {
                    // In a VM on Debian's kernel; its report is written here, then rendered
                    // into BENCHMARKS.md on this side (a full run only).
                    vm::bench_backends(&agent, &bench, quick, runs, &target_dir().join("bench"))?;
                    let mut r = Command::new(&bench);
                    r.current_dir(workspace_root()).arg("render-backends").arg("--out").arg(target_dir().join("bench"));
                    if quick {
                        eprintln!("bench backends: a --quick run leaves BENCHMARKS.md alone ({})", target_dir().join("bench/backends.json").display());
                        return Ok(());
                    }
                    r.arg("--markdown").arg(workspace_root().join("BENCHMARKS.md"));
                    return status(&mut r);
                }
                Some(other) => bail!(
                    "unknown benchmark {other:?}: use `cargo xtask bench`, `cargo xtask bench control-plane`, \
                     `cargo xtask bench programs`, `cargo xtask bench paired`, `cargo xtask bench backends` \
                     (in a VM), `cargo xtask bench render` or `render-backends` (BENCHMARKS.md again from the last run's JSON)"
                ),
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
            if let Some(p) = pairs {
                c.args(["--pairs", &p.to_string()]);
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
        Cmd::Dist { no_image } => {
            setup::run()?;
            dist::run(!no_image).map(|_| ())
        }
        Cmd::FreshCheck { keep, uncommitted } => fresh::run(keep, &uncommitted),
    }
}

#[cfg(test)]
mod tests {
    use super::owner_pid;

    #[test]
    fn a_clusters_names_tell_its_process() {
        assert_eq!(owner_pid("ov22463q00-14-n1"), Some(22463));
        assert_eq!(owner_pid("ov9kmw-3-ul"), Some(9));
        assert_eq!(owner_pid("kmwg612"), None, "a probe namespace of another scheme");
        assert_eq!(owner_pid("ovx-1"), None);
        assert_eq!(owner_pid("maps.debug"), None);
    }
}
