//! What a fresh machine needs, installed by the project itself (CI runs on a clean clone):
//! Debian packages, nightly's rust-src, bpf-linker built against nightly's own libLLVM, and
//! a mounted bpffs. Each step checks first, so a machine that has everything is done in
//! about a second.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::status;

/// Debian packages and a file each one installs (cheaper to check than dpkg).
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
    // etcd-client needs protoc to build.
    ("protobuf-compiler", "/usr/bin/protoc"),
    // The tests and the demo run a real etcd (3.4, as in the seed) and etcdctl.
    ("etcd-server", "/usr/bin/etcd"),
    ("etcd-client", "/usr/bin/etcdctl"),
    // TLS material for the etcd TLS tests.
    ("openssl", "/usr/bin/openssl"),
    // --ip-masq and the forward rules (flannel's chains), as flannel and docker do.
    ("iptables", "/usr/sbin/iptables"),
    // The seed's docker step, tested with a real dockerd (no service is started on install)
    // and a busybox image built locally.
    ("docker.io", "/usr/sbin/dockerd"),
    ("busybox-static", "/usr/bin/busybox"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    apt_packages().context("installing Debian packages")?;
    rust_src().context("adding rust-src to the nightly toolchain")?;
    bpf_linker().context("installing bpf-linker")?;
    bpffs().context("mounting bpffs at /sys/fs/bpf")?;
    Ok(())
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing packages {missing:?}; run `cargo xtask setup` as root (it uses apt-get)");
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let apt = || {
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    status(apt().args(["update", "-qq"]))?;
    status(apt().args(["install", "-y", "-qq", "--no-install-recommends"]).args(&missing))
        .with_context(|| format!("apt-get install {}", missing.join(" ")))?;
    for (pkg, file) in APT_PACKAGES {
        if !Path::new(file).exists() {
            bail!("package {pkg} installed but {file} is still missing");
        }
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let s = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is needed to build eBPF (rustup toolchain install nightly)")?;
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

/// The LLVM major version of nightly's rustc, e.g. 22.
fn llvm_major() -> Result<u32> {
    let v = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let line = v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` names no LLVM version")?;
    line.split('.').next().and_then(|m| m.parse().ok()).with_context(|| format!("LLVM version {line:?}"))
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

fn home() -> Result<PathBuf> {
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

fn bpf_linker() -> Result<()> {
    let major = llvm_major()?;
    let libllvm = nightly_libllvm(major)?;
    // Outside /tmp: bpf-linker's rpath points here, and a dangling rpath breaks it.
    let prefix = home()?.join(".cache/overlay-ebpf/llvm");
    let lib = prefix.join("lib");
    if bpf_linker_works(&prefix, &libllvm) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)", libllvm.display());
    fs::create_dir_all(&lib)?;
    let file_name = libllvm.file_name().context("libLLVM file name")?;
    for link in [lib.join("libLLVM.so"), lib.join(file_name)] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    let feature = format!("llvm-{major}");
    let st = crate::cargo()
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--force"])
        .args(["--no-default-features", "--features", &feature])
        .env("LLVM_PREFIX", &prefix)
        .status()?;
    if !st.success() {
        bail!(
            "cargo install bpf-linker {BPF_LINKER_VERSION} --features {feature} failed; if the \
             feature does not exist, this bpf-linker has no support for nightly's LLVM {major}"
        );
    }
    fs::write(prefix.join("stamp"), libllvm.display().to_string())?;
    if !bpf_linker_works(&prefix, &libllvm) {
        bail!("bpf-linker was installed but `bpf-linker --version` fails; is ~/.cargo/bin on PATH?");
    }
    Ok(())
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
