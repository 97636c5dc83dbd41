//! What a fresh machine needs, installed by the project itself (CI runs on a clean clone):
//! a kernel with BTF, a nightly whose LLVM bpf-linker supports, Debian packages,
//! nightly's rust-src, bpf-linker built against nightly's own libLLVM, and a mounted bpffs.
//! The cheap checks come first, so a machine that cannot work is refused before minutes of
//! installing; each step checks before it acts, so a machine that has everything is done in
//! about a second. apt and `cargo install` write to logs under target/setup/ and the terminal
//! gets one line each (the log's tail on failure).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{output, status, status_logged, with_progress};

/// Debian packages and the file each one provides that the project uses (cheaper to check
/// than dpkg, and it is what matters). Not here: what cargo needs before it can build xtask
/// at all, on any machine with rustup (README, Requirements): ca-certificates (crates.io
/// over TLS) and a C toolchain to link with (gcc's `cc`, libc6-dev).
const APT_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "/usr/bin/ip"),
    ("iputils-ping", "/usr/bin/ping"),
    ("procps", "/usr/sbin/sysctl"),
    ("util-linux", "/usr/bin/nsenter"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("tcpdump", "/usr/bin/tcpdump"),
    ("iperf3", "/usr/bin/iperf3"),
    ("sockperf", "/usr/bin/sockperf"),
    ("ethtool", "/usr/sbin/ethtool"),
    // etcd-client's build script runs protoc on etcd's .proto files, which import
    // google/protobuf/descriptor.proto: that file comes from libprotobuf-dev, which
    // protobuf-compiler only recommends.
    ("protobuf-compiler", "/usr/bin/protoc"),
    ("libprotobuf-dev", "/usr/include/google/protobuf/descriptor.proto"),
    // libfuzzer-sys (cargo xtask fuzz, and the fuzz smoke run of cargo xtask test) compiles
    // libFuzzer with the C++ compiler `c++`.
    ("g++", "/usr/bin/c++"),
    // The tests and the demo run a real etcd (3.4, as in the seed) and etcdctl.
    ("etcd-server", "/usr/bin/etcd"),
    ("etcd-client", "/usr/bin/etcdctl"),
    // TLS material for the etcd TLS tests.
    ("openssl", "/usr/bin/openssl"),
    // --ip-masq and the forward rules (flannel's chains), as flannel and docker do.
    ("iptables", "/usr/sbin/iptables"),
    // EnableNFTables (and hosts without iptables): flannel's flannel-ipv4 table, through nft.
    ("nftables", "/usr/sbin/nft"),
    // The coherence tests read both nodes' connection tracking tables.
    ("conntrack", "/usr/sbin/conntrack"),
    // The seed's docker step, tested with a real dockerd (the tests start it themselves)
    // and a busybox image built locally.
    ("docker.io", "/usr/sbin/dockerd"),
    ("busybox-static", "/usr/bin/busybox"),
    // The CNI tests: the standard plugins the `flannel` plugin delegates to (bridge,
    // host-local, portmap) and a real runtime driving them (podman with its CNI backend, on
    // runc: Debian's crun fails here, ../shared/design/CNI.md).
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    ("podman", "/usr/bin/podman"),
    ("runc", "/usr/sbin/runc"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM majors bpf-linker 0.13.0 can be built for: its `llvm-21`, `llvm-22` and `llvm-23`
/// features (its Cargo.toml).
const BPF_LINKER_LLVM_MAJORS: &[u32] = &[21, 22, 23];
/// A nightly whose LLVM bpf-linker supports, tested here (LLVM 22).
const KNOWN_GOOD_NIGHTLY: &str = "nightly-2026-05-19";

/// The kernel's BTF, which the programs' CO-RE relocations and BTF maps need.
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

pub fn run() -> Result<()> {
    kernel().context("checking the kernel")?;
    let llvm = nightly_llvm_major().context("checking the nightly toolchain")?;
    apt_install(APT_PACKAGES, &log_dir()?.join("apt.log"), "setup").context("installing Debian packages")?;
    rust_src().context("adding rust-src to the nightly toolchain")?;
    bpf_linker(llvm).context("installing bpf-linker")?;
    bpffs().context("mounting bpffs at /sys/fs/bpf")?;
    // The kernel matrix's VMs: qemu and Debian 12's kernels, in a cache.
    apt_install(crate::vm::PACKAGES, &log_dir()?.join("apt-vm.log"), "setup").context("installing the VM tools")?;
    crate::vm::fetch().context("fetching Debian's kernels for the VM tests")?;
    Ok(())
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn kernel() -> Result<()> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").context("reading /proc/sys/kernel/osrelease")?;
    check_kernel(release.trim(), Path::new(KERNEL_BTF).exists())
}

/// Refuses a kernel without BTF. The kernel's version is not compared: the agent probes for
/// what it uses (TCX, else cls_bpf filters) when it starts.
fn check_kernel(release: &str, has_btf: bool) -> Result<()> {
    if !has_btf {
        bail!("the eBPF data plane needs BTF at {KERNEL_BTF} (a kernel built with CONFIG_DEBUG_INFO_BTF=y; this is {release})");
    }
    Ok(())
}

/// `rustc +nightly` with rustup told not to download a missing toolchain (it cannot here, and
/// a clear error beats a download attempt).
fn nightly_rustc() -> Command {
    let mut c = Command::new("rustc");
    c.arg("+nightly").env("RUSTUP_AUTO_INSTALL", "0");
    c
}

/// The LLVM major of the nightly toolchain, refused unless bpf-linker can be built for it.
fn nightly_llvm_major() -> Result<u32> {
    let vv = output(nightly_rustc().arg("-vV"))
        .context("the eBPF programs build with nightly: install it with `rustup toolchain install nightly`")?;
    let (version, major) = rustc_llvm_major(&vv)?;
    check_llvm_major(version, major)?;
    Ok(major)
}

/// The version line and the LLVM major of `rustc -vV` output:
/// ("rustc 1.97.0-nightly (e50aa6fba 2026-05-19)", 22).
fn rustc_llvm_major(vv: &str) -> Result<(&str, u32)> {
    let version = vv.lines().next().unwrap_or_default().trim();
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .with_context(|| format!("`{version} -vV` names no LLVM version"))?;
    let major =
        llvm.split('.').next().and_then(|m| m.parse().ok()).with_context(|| format!("LLVM version {llvm:?}"))?;
    Ok((version, major))
}

fn check_llvm_major(version: &str, major: u32) -> Result<()> {
    if BPF_LINKER_LLVM_MAJORS.contains(&major) {
        return Ok(());
    }
    let supported = BPF_LINKER_LLVM_MAJORS.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    bail!(
        "nightly {version} has LLVM {major}; bpf-linker {BPF_LINKER_VERSION} supports LLVM {supported}; install a \
         nightly whose LLVM is one of those as the `nightly` toolchain, e.g. {KNOWN_GOOD_NIGHTLY} (LLVM 22)"
    )
}

/// target/setup/, where the installers' logs go.
fn log_dir() -> Result<PathBuf> {
    let dir = crate::target_dir().join("setup");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Installs the packages whose file is missing, with apt's output in `log` (rewritten) and one
/// line on the terminal, prefixed `who:`. `apt-get update` runs only when something is missing.
pub fn apt_install(packages: &[(&str, &str)], log: &Path, who: &str) -> Result<()> {
    let missing: Vec<&str> =
        packages.iter().filter(|(_, file)| !Path::new(file).exists()).map(|(pkg, _)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing packages {missing:?}; run `cargo xtask {who}` as root (it uses apt-get)");
    }
    let noun = if missing.len() == 1 { "package" } else { "packages" };
    with_progress(&format!("{who}: installing {} {noun} ({})", missing.len(), missing.join(" ")), || {
        fs::write(log, "").with_context(|| format!("creating {}", log.display()))?;
        let apt = || {
            let mut c = Command::new("apt-get");
            c.env("DEBIAN_FRONTEND", "noninteractive").args(["-o", "Dpkg::Use-Pty=0"]);
            c
        };
        status_logged(apt().arg("update"), log)?;
        status_logged(apt().args(["install", "-y", "--no-install-recommends"]).args(&missing), log)?;
        for (pkg, file) in packages {
            if !Path::new(file).exists() {
                bail!("package {pkg} was installed but {file} is still missing (log: {})", log.display());
            }
        }
        Ok(())
    })
}

fn nightly_sysroot() -> Result<PathBuf> {
    let s = output(nightly_rustc().args(["--print", "sysroot"]))?;
    Ok(PathBuf::from(s.trim()))
}

fn rust_src() -> Result<()> {
    let src = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core");
    if src.exists() {
        return Ok(());
    }
    eprintln!("setup: rustup component add rust-src --toolchain nightly");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// nightly's own libLLVM shared library (bpf-linker links against it).
fn nightly_libllvm(major: u32) -> Result<PathBuf> {
    let lib = nightly_sysroot()?.join("lib");
    let prefix = format!("libLLVM.so.{major}");
    for e in fs::read_dir(&lib)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            return Ok(e.path());
        }
    }
    bail!("no {prefix}* in {}: this nightly ships no shared libLLVM", lib.display())
}

pub fn home() -> Result<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from).context("HOME is not set")
}

fn bpf_linker_works(llvm_dir: &Path, libllvm: &Path) -> bool {
    let stamp = fs::read_to_string(llvm_dir.join("stamp")).unwrap_or_default();
    stamp.trim() == libllvm.display().to_string()
        && Command::new("bpf-linker")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

fn bpf_linker(major: u32) -> Result<()> {
    let libllvm = nightly_libllvm(major)?;
    // Outside /tmp: bpf-linker's rpath points here, and a dangling rpath breaks it.
    let prefix = home()?.join(".cache/overlay-ebpf/llvm");
    let lib = prefix.join("lib");
    if bpf_linker_works(&prefix, &libllvm) {
        return Ok(());
    }
    let feature = format!("llvm-{major}");
    let log = log_dir()?.join("bpf-linker.log");
    let line = format!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} ({feature}, against nightly's libLLVM; about a minute)"
    );
    with_progress(&line, || {
        fs::write(&log, "").with_context(|| format!("creating {}", log.display()))?;
        fs::create_dir_all(&lib)?;
        let file_name = libllvm.file_name().context("libLLVM file name")?;
        for link in [lib.join("libLLVM.so"), lib.join(file_name)] {
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
        }
        // --locked: the dependency versions bpf-linker was released with, not whatever is
        // newest on crates.io today.
        status_logged(
            crate::cargo()
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--force", "--locked"])
                .args(["--no-default-features", "--features", &feature])
                .env("LLVM_PREFIX", &prefix),
            &log,
        )?;
        fs::write(prefix.join("stamp"), libllvm.display().to_string())?;
        if !bpf_linker_works(&prefix, &libllvm) {
            bail!("bpf-linker was installed but `bpf-linker --version` fails; is ~/.cargo/bin on PATH?");
        }
        Ok(())
    })
}

fn bpffs() -> Result<()> {
    let mounted = fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if mounted {
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf; run `cargo xtask setup` as root");
    }
    eprintln!("setup: mount -t bpf bpf /sys/fs/bpf");
    status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_btf_is_refused_and_older_ones_are_not() {
        for release in ["6.18.44-fc-v657", "6.6.0", "6.1.0-18-amd64", "5.15.0", "5.10.0-30-amd64"] {
            assert!(check_kernel(release, true).is_ok(), "{release}: the agent attaches without TCX too");
        }
        let e = check_kernel("6.18.44", false).unwrap_err().to_string();
        assert!(e.contains(KERNEL_BTF) && e.contains("6.18.44"), "{e}");
    }

    const NIGHTLY_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
        commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a\ncommit-date: 2026-05-19\n\
        host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";

    #[test]
    fn llvm_major_comes_from_rustc_vv() {
        assert_eq!(rustc_llvm_major(NIGHTLY_VV).unwrap(), ("rustc 1.97.0-nightly (e50aa6fba 2026-05-19)", 22));
        assert!(rustc_llvm_major("rustc 1.97.0-nightly\nrelease: 1.97.0-nightly\n").is_err());
    }

    #[test]
    fn llvm_major_must_have_a_bpf_linker_feature() {
        for major in [21, 22, 23] {
            assert!(check_llvm_major("rustc x", major).is_ok());
        }
        let e = check_llvm_major("rustc 1.99.0-nightly (abc 2026-09-01)", 24).unwrap_err().to_string();
        assert!(
            e.contains("has LLVM 24") && e.contains("supports LLVM 21, 22, 23") && e.contains(KNOWN_GOOD_NIGHTLY),
            "{e}"
        );
        assert!(check_llvm_major("rustc x", 20).is_err());
    }
}
