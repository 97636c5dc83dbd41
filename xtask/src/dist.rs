//! `cargo xtask dist`: what a user installs without Rust.
//!
//! - a statically linked agent (glibc's static-pie: it runs on any x86_64 Linux of the kernels
//!   we support, whatever its libc), built for the host's target with `+crt-static` applied to
//!   that target only (build scripts, proc-macros and the nested eBPF build are untouched);
//! - a Debian package of it, made with dpkg-deb from a staged tree (cargo-deb would have to be
//!   built on every machine, for a control file and four maintainer scripts): the agent in
//!   /usr/bin, the CNI plugin as /usr/lib/cni/flannel (the agent run as `flannel`), flannel's
//!   mk-docker-opts.sh in /usr/libexec/flannel, flanneld.service reading /etc/default/flanneld;
//! - a tarball of the static agent with the seed's unit, options file and wrapper;
//! - a container image as a `docker load` archive (also `ctr images import`): a debootstrapped
//!   Debian 12 root (minbase, nftables, iptables: the agent's rules need one of them) with the
//!   package installed, written as a docker-archive directly, so no daemon and no registry
//!   are needed to build it.
//!
//! The Debian root is cached under target/dist-build/ (debootstrap from the machine's own apt
//! source, as fresh-check does); the tests install the package into a copy of it.

use std::{
    fs,
    io::Read as _,
    os::unix::fs::{symlink, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, fresh, output, setup, status, status_logged, target_dir, with_progress, workspace_root};

/// What the Debian root of the image (and of the package test) has beyond minbase.
const ROOT_PACKAGES: &str = "nftables,iptables";
const IMAGE_NAME: &str = "overlay-agent";

pub struct Artifacts {
    pub deb: PathBuf,
    pub tarball: PathBuf,
    pub image: Option<PathBuf>,
    /// The cached Debian 12 root (minbase + ROOT_PACKAGES) the image was made from.
    pub rootfs: Option<PathBuf>,
}

pub fn run(image: bool) -> Result<Artifacts> {
    let version = env!("CARGO_PKG_VERSION");
    let (triple, deb_arch) = host_target()?;
    let out = target_dir().join("dist");
    let build = target_dir().join("dist-build");
    fs::create_dir_all(&out)?;
    fs::create_dir_all(&build)?;
    let agent = build_static(&triple, &build)?;
    let tarball = tarball(&agent, &out, &build, version, &triple)?;
    let deb = deb(&agent, &out, &build, version, deb_arch)?;
    let (image, rootfs) = if image {
        let root = debian_root(&build)?;
        (Some(image_archive(&root, &deb, &out, &build, version, deb_arch)?), Some(root))
    } else {
        (None, None)
    };
    for p in [Some(&deb), Some(&tarball), image.as_ref()].into_iter().flatten() {
        println!("dist: {}", p.display());
    }
    Ok(Artifacts { deb, tarball, image, rootfs })
}

/// The host's target triple and its Debian architecture name.
fn host_target() -> Result<(String, &'static str)> {
    let vv = output(Command::new("rustc").arg("-vV"))?;
    let triple = vv.lines().find_map(|l| l.strip_prefix("host: ")).context("rustc -vV names no host")?.to_string();
    let arch = match triple.split('-').next() {
        Some("x86_64") => "amd64",
        Some("aarch64") => "arm64",
        _ => bail!("cargo xtask dist packages x86_64 and aarch64 hosts; this one is {triple}"),
    };
    Ok((triple, arch))
}

fn build_static(triple: &str, build: &Path) -> Result<PathBuf> {
    let var = format!("CARGO_TARGET_{}_RUSTFLAGS", triple.to_uppercase().replace('-', "_"));
    status(
        cargo()
            .args(["build", "--release", "--package", "overlay-agent", "--bin", "overlay-agent", "--target", triple])
            .arg("--target-dir")
            .arg(build)
            .env(&var, "-C target-feature=+crt-static")
            .env("CARGO_PROFILE_RELEASE_STRIP", "symbols"),
    )
    .context("building the static agent")?;
    let bin = build.join(triple).join("release/overlay-agent");
    if is_dynamic(&bin)? {
        bail!("{} is dynamically linked (it has a program interpreter): the static build did not take", bin.display());
    }
    Ok(bin)
}

/// Whether an ELF file asks for a program interpreter (a PT_INTERP header): a dynamic executable.
pub fn is_dynamic(path: &Path) -> Result<bool> {
    let mut data = Vec::new();
    fs::File::open(path)?.read_to_end(&mut data)?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(kind) = data.get(at..at + 4) else { bail!("{}: program headers past the end", path.display()) };
        if u32::from_le_bytes(kind.try_into()?) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The files a tarball user puts where the seed puts flannel's (/opt/kubernetes/{bin,cfg}).
fn tarball(agent: &Path, out: &Path, build: &Path, version: &str, triple: &str) -> Result<PathBuf> {
    let arch = triple.split('-').next().unwrap_or("unknown");
    let name = format!("overlay-agent-{version}-{arch}-linux-static");
    let stage = fresh_dir(&build.join("tar-stage"))?.join(&name);
    fs::create_dir_all(&stage)?;
    let root = workspace_root();
    install(agent, &stage.join("overlay-agent"), 0o755)?;
    install(&root.join("dist/mk-docker-opts.sh"), &stage.join("mk-docker-opts.sh"), 0o755)?;
    install(&root.join("dist/systemd/flanneld.service"), &stage.join("flanneld.service"), 0o644)?;
    install(&root.join("dist/systemd/docker.service.d-flannel.conf"), &stage.join("docker.service.d-flannel.conf"), 0o644)?;
    install(&root.join("dist/flannel.cfg"), &stage.join("flannel.cfg"), 0o644)?;
    install(&root.join("README.md"), &stage.join("README.md"), 0o644)?;
    let file = out.join(format!("{name}.tar.gz"));
    status(
        Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "-czf"])
            .arg(&file)
            .arg("-C")
            .arg(stage.parent().context("stage")?)
            .arg(&name),
    )?;
    Ok(file)
}

fn deb(agent: &Path, out: &Path, build: &Path, version: &str, arch: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let stage = fresh_dir(&build.join("deb-stage"))?;
    let src = |p: &str| root.join(p);
    install(agent, &stage.join("usr/bin/overlay-agent"), 0o755)?;
    // flannel's CNI plugin is the agent run as `flannel`; Debian's CNI plugins live in
    // /usr/lib/cni (podman and containerd look there); Kubernetes' /opt/cni/bin gets a copy
    // from `overlay-agent install-cni`.
    fs::create_dir_all(stage.join("usr/lib/cni"))?;
    symlink("../../bin/overlay-agent", stage.join("usr/lib/cni/flannel"))?;
    install(&src("dist/mk-docker-opts.sh"), &stage.join("usr/libexec/flannel/mk-docker-opts.sh"), 0o755)?;
    install(&src("dist/deb/flanneld.service"), &stage.join("lib/systemd/system/flanneld.service"), 0o644)?;
    install(&src("dist/deb/flanneld.default"), &stage.join("etc/default/flanneld"), 0o644)?;
    let doc = stage.join("usr/share/doc/overlay-agent");
    install(&src("README.md"), &doc.join("README.md"), 0o644)?;
    install(&src("dist/deb/docker.service.d-flannel.conf"), &doc.join("examples/docker.service.d-flannel.conf"), 0o644)?;
    fs::write(
        doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: overlay-agent\n\nFiles: *\nLicense: Apache-2.0\n On Debian systems the full text is in \
         /usr/share/common-licenses/Apache-2.0.\n",
    )?;
    let debian = stage.join("DEBIAN");
    for script in ["postinst", "prerm", "postrm"] {
        install(&src(&format!("dist/deb/{script}")), &debian.join(script), 0o755)?;
    }
    fs::write(debian.join("conffiles"), "/etc/default/flanneld\n")?;
    let size_kib = du_kib(&stage)?;
    fs::write(
        debian.join("control"),
        format!(
            "Package: overlay-agent\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: overlay-agent developers <overlay-agent@localhost>\n\
             Installed-Size: {size_kib}\n\
             Section: net\n\
             Priority: optional\n\
             Recommends: nftables | iptables\n\
             Suggests: containernetworking-plugins, docker.io\n\
             Conflicts: flannel\n\
             Description: flannel-compatible overlay network agent with an eBPF data plane\n \
             Takes flanneld's place: the same etcd keys, network config, flags, subnet file and\n \
             mk-docker-opts.sh, with VXLAN and flannel-UDP encapsulated in TC and every arriving\n \
             tunnel frame checked before the kernel decapsulates it. Also flannel's CNI plugin\n \
             (/usr/lib/cni/flannel). Statically linked: the eBPF programs are inside the binary.\n"
        ),
    )?;
    let file = out.join(format!("overlay-agent_{version}_{arch}.deb"));
    status(Command::new("dpkg-deb").args(["--root-owner-group", "-Zxz", "--build"]).arg(&stage).arg(&file))
        .context("dpkg-deb (package dpkg)")?;
    Ok(file)
}

/// A Debian 12 root (minbase and ROOT_PACKAGES), debootstrapped once into target/dist-build.
pub fn debian_root(build: &Path) -> Result<PathBuf> {
    let root = build.join("rootfs-bookworm");
    let stamp = build.join("rootfs-bookworm.done");
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == ROOT_PACKAGES) && root.join("usr/sbin/nft").exists() {
        return Ok(root);
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!("the image's Debian root is made with debootstrap: run `cargo xtask dist` as root (or with --no-image)");
    }
    let log = build.join("debootstrap.log");
    fs::write(&log, "")?;
    setup::apt_install(&[("debootstrap", "/usr/sbin/debootstrap")], &log, "dist")?;
    let _ = fs::remove_file(&stamp);
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    let source = fresh::apt_source()?;
    with_progress(&format!("dist: debootstrap {} (minbase, {ROOT_PACKAGES}) from {}", fresh::SUITE, source.uri), || {
        status_logged(
            Command::new("debootstrap")
                .args(["--variant=minbase", "--components=main", &format!("--include={ROOT_PACKAGES}"), fresh::SUITE])
                .arg(&root)
                .arg(&source.uri),
            &log,
        )
    })?;
    // What an image does not need: apt's downloaded packages and lists.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        clear_files(&root.join(dir))?;
    }
    fs::write(&stamp, ROOT_PACKAGES)?;
    Ok(root)
}

/// The image: a copy of the Debian root with the package installed, as a docker-archive.
fn image_archive(root: &Path, deb: &Path, out: &Path, build: &Path, version: &str, arch: &str) -> Result<PathBuf> {
    let work = fresh_dir(&build.join("image"))?;
    let rootfs = work.join("rootfs");
    status(Command::new("cp").args(["-a", "--reflink=auto"]).arg(root).arg(&rootfs))?;
    fs::copy(deb, rootfs.join("tmp/overlay-agent.deb"))?;
    let log = build.join("image.log");
    fs::write(&log, "")?;
    status_logged(
        Command::new("chroot").arg(&rootfs).args(["dpkg", "-i", "/tmp/overlay-agent.deb"]).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        &log,
    )
    .context("installing the package into the image's root")?;
    fs::remove_file(rootfs.join("tmp/overlay-agent.deb"))?;
    let layer_dir = work.join("archive");
    fs::create_dir_all(&layer_dir)?;
    let layer = layer_dir.join("layer.tar");
    status(
        Command::new("tar")
            .args(["--sort=name", "--numeric-owner", "--xattrs", "-cf"])
            .arg(&layer)
            .arg("-C")
            .arg(&rootfs)
            .args(["--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./run/*", "--exclude=./tmp/*", "."]),
    )?;
    let layer_sha = sha256(&layer)?;
    let created = output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))?.trim().to_string();
    let tag = format!("{IMAGE_NAME}:{version}");
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": created,
        "config": {
            "Entrypoint": ["/usr/bin/overlay-agent"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {
                "org.opencontainers.image.title": "overlay-agent",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.description": "flannel-compatible node agent with an eBPF data plane (Debian 12 base, nftables, iptables)",
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_sha}")] },
        "history": [{ "created": created, "created_by": "cargo xtask dist: debootstrap bookworm minbase, nftables, iptables, dpkg -i overlay-agent.deb" }],
    });
    let config_bytes = serde_json::to_vec(&config)?;
    let config_path = work.join("config.json");
    fs::write(&config_path, &config_bytes)?;
    let config_name = format!("{}.json", sha256(&config_path)?);
    fs::rename(&config_path, work.join(&config_name))?;
    let layer_name = format!("{layer_sha}/layer.tar");
    fs::rename(&layer_dir, work.join(&layer_sha))?;
    let manifest = serde_json::json!([{ "Config": config_name, "RepoTags": [tag], "Layers": [layer_name] }]);
    fs::write(work.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    let repositories = serde_json::json!({ IMAGE_NAME: { version: layer_sha } });
    fs::write(work.join("repositories"), serde_json::to_vec(&repositories)?)?;
    let file = out.join(format!("{IMAGE_NAME}-image-{version}-{arch}.tar"));
    status(
        Command::new("tar")
            .args(["--owner=0", "--group=0", "--numeric-owner", "-cf"])
            .arg(&file)
            .arg("-C")
            .arg(&work)
            .args(["manifest.json", "repositories", &config_name, &layer_name]),
    )?;
    fs::remove_dir_all(&work)?;
    Ok(file)
}

fn sha256(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    Ok(out.split_whitespace().next().context("sha256sum printed nothing")?.to_string())
}

fn du_kib(dir: &Path) -> Result<u64> {
    let out = output(Command::new("du").args(["-sk", "--apparent-size"]).arg(dir))?;
    out.split_whitespace().next().and_then(|n| n.parse().ok()).context("du")
}

/// `dir`, emptied (made if missing).
fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    Ok(dir.to_path_buf())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(to.parent().context("no parent")?)?;
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Remove the plain files directly in `dir` (apt's caches), keeping its subdirectories.
fn clear_files(dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    for e in entries {
        let e = e?;
        if e.file_type()?.is_file() && e.file_name() != "lock" {
            fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_dynamic;

    #[test]
    fn a_dynamic_executable_is_told_from_a_static_one() {
        // xtask itself is dynamically linked (the default for the gnu target).
        assert!(is_dynamic(&std::env::current_exe().unwrap()).unwrap());
        assert!(is_dynamic(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml").as_path()).is_err());
        // busybox-static (setup installs it for the container tests) has no interpreter.
        assert!(!is_dynamic(std::path::Path::new("/bin/busybox")).expect("busybox-static: run cargo xtask setup"));
    }
}
