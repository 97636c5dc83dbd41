//! Debian's podman (4.3, CNI backend, runc) inside a node's network namespace, running
//! containers from a busybox directory rootfs (no registry is reachable) on a CNI network from
//! the node's own configuration directory and plugin directories
//! (../shared/design/CNI.md has the recipe and its traps).
//!
//! host-local keeps its store under /var/lib/cni, which every node on this machine would
//! share: each podman call runs in a mount namespace of its own where the node's directory is
//! bound over /var/lib/cni (the root mount made private first, so nothing reaches the
//! machine's), while /run/netns stays shared, so the container network namespaces podman
//! makes are seen by its next call. Entered with `nsenter --net` (cgroup mounts stay visible).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::{run, Cluster, Netns, Node};

/// Where Debian's standard CNI plugins are (containernetworking-plugins).
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

pub struct Podman {
    ns: String,
    dir: PathBuf,
    containers: Vec<String>,
}

/// A busybox rootfs under `dir` (busybox-static and the applets the tests use), for podman's
/// `--rootfs` and docker's imported image alike.
pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("bin"))?;
    fs::create_dir_all(root.join("etc"))?;
    fs::copy("/usr/bin/busybox", root.join("bin/busybox")).context("busybox-static is needed")?;
    for applet in ["sh", "ping", "ip", "sleep", "nc", "cat", "echo", "wget", "httpd"] {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    Ok(root)
}

impl Podman {
    /// podman for the node `ns`, its state under `dir`, CNI configurations read from
    /// `conf_dir` and plugins from `plugin_dirs`.
    pub fn new(ns: &Netns, dir: &Path, conf_dir: &Path, plugin_dirs: &[&Path]) -> Result<Self> {
        fs::create_dir_all(dir.join("cni"))?;
        // The mount point (the CNI plugins' own state directory, as their package would make).
        fs::create_dir_all("/var/lib/cni")?;
        let dirs: Vec<String> = plugin_dirs.iter().map(|d| format!("{:?}", d.display().to_string())).collect();
        fs::write(
            dir.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [{}]\nnetwork_config_dir = {:?}\n",
                dirs.join(", "),
                conf_dir.display().to_string()
            ),
        )?;
        Ok(Self { ns: ns.path(), dir: dir.to_path_buf(), containers: Vec::new() })
    }

    fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.display();
        let script = format!(
            "mount --make-private / && mount --bind {d}/cni /var/lib/cni && exec podman --root {d}/root --runroot {d}/runroot \
             --cgroup-manager cgroupfs --runtime runc \"$@\""
        );
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns))
            .args(["unshare", "-m", "--propagation", "unchanged", "sh", "-c", &script, "podman"])
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        c
    }

    pub fn podman(&self, args: &[&str]) -> Result<String> {
        run(&mut self.command(args))
    }

    /// Run a long-lived container `name` on `network` from `rootfs` (extra podman flags in
    /// `flags`, e.g. `-p 8080:9000`) running `cmd`.
    pub fn run_container(&mut self, name: &str, network: &str, rootfs: &Path, flags: &[&str], cmd: &[&str]) -> Result<()> {
        let rootfs = rootfs.display().to_string();
        let mut args = vec![
            "run", "-d", "--name", name, "--network", network, "--stop-signal", "SIGKILL",
            // runc's defaults exceed this machine's hard limits (CNI.md).
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
        ];
        args.extend_from_slice(flags);
        args.extend(["--rootfs", &rootfs]);
        args.extend_from_slice(cmd);
        self.containers.push(name.to_string());
        self.podman(&args).map(drop)
    }

    pub fn exec(&self, name: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.podman(&args)
    }

    /// The container's IPv4 address on eth0.
    pub fn ipv4(&self, name: &str) -> Result<std::net::Ipv4Addr> {
        let out = self.exec(name, &["/bin/busybox", "ip", "-4", "-o", "addr", "show", "eth0"])?;
        let cidr = out.split_whitespace().skip_while(|w| *w != "inet").nth(1).with_context(|| format!("no IPv4 address in {out:?}"))?;
        cidr.split('/').next().unwrap_or_default().parse().with_context(|| format!("{cidr:?}"))
    }

    /// The container's global IPv6 address on eth0, if it has one.
    pub fn ipv6(&self, name: &str) -> Result<Option<std::net::Ipv6Addr>> {
        let out = self.exec(name, &["/bin/busybox", "ip", "-6", "-o", "addr", "show", "eth0", "scope", "global"])?;
        Ok(out.split_whitespace().skip_while(|w| *w != "inet6").nth(1).and_then(|c| c.split('/').next()?.parse().ok()))
    }

    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.containers.retain(|c| c != name);
        self.podman(&["rm", "-f", name]).map(drop)
    }

    /// host-local's store for `network` (the node's own, bound over /var/lib/cni/networks).
    pub fn ipam_store(&self, network: &str) -> PathBuf {
        self.dir.join("cni/networks").join(network)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for c in std::mem::take(&mut self.containers) {
            let _ = self.podman(&["rm", "-f", &c]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A node set up as a CNI node: `overlay-agent install-cni` into a directory of its own (its
/// subnet file, a data directory of its own; kube-flannel's conflist otherwise), and podman
/// on that conflist with the plugin and Debian's standard plugins. The directory too.
pub fn cni_node(c: &Cluster, node: &Node) -> Result<(Podman, PathBuf)> {
    let dir = c.workdir.join(format!("cni-n{}", node.index));
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    run(Command::new(crate::agent_bin())
        .arg("install-cni")
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .arg("--subnet-file")
        .arg(&node.subnet_file)
        .arg("--data-dir")
        .arg(dir.join("data")))?;
    let podman = Podman::new(&node.ns, &dir.join("podman"), &conf, &[&bin, Path::new(DEBIAN_PLUGINS)])?;
    Ok((podman, dir))
}
