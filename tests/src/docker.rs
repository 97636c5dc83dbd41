//! A real docker daemon (Debian's docker.io) inside a node's network namespace, started with
//! the options the seed's docker unit passes ($DOCKER_NETWORK_OPTIONS), and containers from a
//! busybox image built locally (no registry is reachable). Entered with `nsenter --net` so
//! the cgroup mounts stay visible; stopped by its pid, containers first.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{run, wait_until, Netns};

pub struct Dockerd {
    child: Child,
    sock: String,
    dir: PathBuf,
    containers: Vec<String>,
}

const DOCKER: &str = "/usr/bin/docker";

impl Dockerd {
    /// Start dockerd in `ns` with `options` (e.g. " --bip=... --ip-masq=false --mtu=1450").
    pub fn start(ns: &Netns, dir: &Path, options: &str) -> Result<Self> {
        let data = dir.join("data");
        let exec = dir.join("exec");
        fs::create_dir_all(&data)?;
        fs::create_dir_all(&exec)?;
        let sock = format!("unix://{}", exec.join("docker.sock").display());
        let log = fs::File::create(dir.join("dockerd.log"))?;
        let child = ns
            .command("dockerd")
            .arg("--data-root")
            .arg(&data)
            .arg("--exec-root")
            .arg(&exec)
            .args(["-H", &sock])
            .arg("--pidfile")
            .arg(exec.join("docker.pid"))
            .args(options.split_whitespace())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd (apt packages docker.io and busybox-static)")?;
        let d = Self { child, sock, dir: dir.to_path_buf(), containers: Vec::new() };
        if !wait_until(Duration::from_secs(60), || d.docker(&["info"]).is_ok()) {
            bail!("dockerd did not come up:\n{}", fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default());
        }
        Ok(d)
    }

    /// The daemon's socket, as `docker -H` takes it.
    pub fn socket(&self) -> &str {
        &self.sock
    }

    pub fn docker(&self, args: &[&str]) -> Result<String> {
        run(Command::new(DOCKER).args(["-H", &self.sock]).args(args))
    }

    /// Import a busybox image as `bb:1` (busybox-static plus applet links).
    pub fn import_busybox(&self) -> Result<()> {
        let root = crate::podman::busybox_rootfs(&self.dir)?;
        let tar = Command::new("tar").arg("-C").arg(&root).args(["-c", "."]).stdout(Stdio::piped()).spawn()?;
        let out = Command::new(DOCKER)
            .args(["-H", &self.sock, "import", "-", "bb:1"])
            .stdin(tar.stdout.context("tar stdout")?)
            .output()?;
        if !out.status.success() {
            bail!("docker import: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Run a long-lived container; its IPv4 address.
    pub fn run_container(&mut self, name: &str) -> Result<std::net::Ipv4Addr> {
        self.docker(&["run", "-d", "--name", name, "bb:1", "sleep", "3600"])?;
        self.containers.push(name.to_string());
        let ip = self.docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name])?;
        ip.trim().parse().with_context(|| format!("container {name} address {ip:?}"))
    }

    /// Remove container `name` (started by the test itself) when this daemon goes.
    pub fn remove_on_drop(&mut self, name: &str) {
        self.containers.push(name.to_string());
    }

    pub fn exec(&self, name: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.docker(&args)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.docker(&["rm", "-f", c]);
        }
        // Our own child, by pid: SIGTERM, then wait (bounded), then SIGKILL.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let stopped = wait_until(Duration::from_secs(20), || self.child.try_wait().ok().flatten().is_some());
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // What dockerd left mounted under its directories (the host network's sandbox,
        // exec/netns/default, stays bound after a host-network container), deepest first.
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut left: Vec<&str> = mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|m| Path::new(m).starts_with(&self.dir)).collect();
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            if let Ok(c) = std::ffi::CString::new(m) {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
