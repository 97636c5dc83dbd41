//! What users install without Rust (`cargo xtask dist`), installed and run as users would:
//! the Debian package in a fresh Debian 12 root (debootstrapped by dist), its agent then
//! running a node of a cluster from inside that root; the container image loaded into a real
//! dockerd and run with the host's network (as the DaemonSet runs it) on a node; the static
//! tarball's agent on its own. `cargo xtask test` runs dist first and names the artifacts in
//! OVERLAY_DIST_* (root).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use overlay_tests::{docker::Dockerd, require_root, run, traffic::ping, Backend, Cluster, ClusterSpec, NodeKind};

fn ok<T>(what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// An artifact of `cargo xtask dist`, named by `var`.
fn artifact(var: &str) -> PathBuf {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run these tests through `cargo xtask test` (it runs `cargo xtask dist` and sets it)")
    });
    assert!(p.exists(), "{var}={} does not exist", p.display());
    p
}

/// A copy of dist's fresh Debian 12 root, removed when dropped (nothing is ever mounted on it
/// in this namespace: the agent's mounts live in a mount namespace of its own).
struct Root(PathBuf);

impl Root {
    fn copy_of(rootfs: &Path, to: PathBuf) -> Root {
        ok("copying the Debian root", run(Command::new("cp").args(["-a", "--reflink=auto"]).arg(rootfs).arg(&to)));
        Root(to)
    }

    /// `args` run in the root (chroot, no mounts) with an environment of its own.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("/usr/sbin/chroot");
        c.arg(&self.0).args(args).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    }

    /// `args` run in the root, its output; an error with its stderr.
    fn chroot(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&mut self.command(args))
    }

    fn path(&self, p: &str) -> PathBuf {
        self.0.join(p.trim_start_matches('/'))
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn write_script(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A systemd unit's `key=` line.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in the unit:\n{unit}")).to_string()
}

/// The package installs with dpkg into a fresh Debian 12 root (no network, no other package
/// needed), puts everything in flannel's places, and its agent, run from that root with the
/// host's /sys (bpffs) and /dev only, leases a subnet in etcd and carries containers' traffic
/// to a node running the agent we built; its mk-docker-opts.sh gives docker that subnet; the
/// CNI plugin answers as flannel's; removal keeps the options file, purge removes it.
#[test]
fn the_package_installs_into_a_fresh_debian_root_and_runs_a_node() {
    require_root();
    let (deb, rootfs) = (artifact("OVERLAY_DIST_DEB"), artifact("OVERLAY_DIST_ROOTFS"));
    let spec = ClusterSpec { full_mesh: false, ..ClusterSpec::etcd(Backend::Vxlan, "tc", 1) };
    let mut c = ok("building the cluster", Cluster::new("pk", &spec));
    let root = Root::copy_of(&rootfs, c.workdir.join("root"));
    fs::copy(&deb, root.path("/tmp/overlay-agent.deb")).unwrap();
    ok("dpkg -i", root.chroot(&["dpkg", "-i", "/tmp/overlay-agent.deb"]));

    // flannel's places.
    let agent = root.path("/usr/bin/overlay-agent");
    assert!(agent.metadata().unwrap().permissions().mode() & 0o111 != 0, "the agent is executable");
    assert_eq!(fs::read_link(root.path("/usr/lib/cni/flannel")).unwrap(), Path::new("../../bin/overlay-agent"));
    for f in ["/usr/libexec/flannel/mk-docker-opts.sh", "/lib/systemd/system/flanneld.service", "/etc/default/flanneld"] {
        assert!(root.path(f).exists(), "{f} installed");
    }
    let conffiles = ok("dpkg-query", root.chroot(&["dpkg-query", "-W", "-f=${Conffiles}", "overlay-agent"]));
    assert!(conffiles.contains("/etc/default/flanneld"), "the options file is a conffile: {conffiles}");

    // The unit's ExecStart, with the options file expanded as systemd does, is accepted.
    let unit = fs::read_to_string(root.path("/lib/systemd/system/flanneld.service")).unwrap();
    assert_eq!(unit_value(&unit, "ExecStart="), "/usr/bin/overlay-agent $FLANNEL_OPTIONS");
    assert_eq!(unit_value(&unit, "EnvironmentFile="), "-/etc/default/flanneld");
    let check = ok(
        "the unit's command line",
        root.chroot(&["sh", "-c", ". /etc/default/flanneld && exec /usr/bin/overlay-agent $FLANNEL_OPTIONS --version"]),
    );
    assert!(check.starts_with("overlay-agent "), "{check}");

    // The CNI plugin is flannel's.
    let version = ok(
        "CNI VERSION",
        run(root.command(&["/usr/lib/cni/flannel"]).env("CNI_COMMAND", "VERSION")),
    );
    let v: serde_json::Value = serde_json::from_str(&version).unwrap_or_else(|e| panic!("{e}: {version}"));
    assert!(v["supportedVersions"].as_array().is_some_and(|a| a.iter().any(|x| x == "0.3.1")), "{version}");

    // The installed agent runs node 2: its own root, the host's /sys (bpffs) and /dev, a /proc
    // of its own, the test's directory (subnet file, notify socket) at the same path.
    let wrapper = c.workdir.join("installed-agent.sh");
    write_script(
        &wrapper,
        &format!(
            "#!/bin/sh\nexec unshare -m sh -c 'mount --make-rprivate / && mount --rbind /sys \"$0/sys\" && \
             mount --rbind /dev \"$0/dev\" && mount -t proc proc \"$0/proc\" && mkdir -p \"$0$1\" && \
             mount --bind \"$1\" \"$0$1\" && shift && exec chroot \"$0\" /usr/bin/overlay-agent \"$@\"' {} {} \"$@\"\n",
            root.0.display(),
            c.workdir.display()
        ),
    );
    let n2 = ok("adding node 2", c.add_unstarted(NodeKind::Agent { decap_hook: "tc" }));
    ok("starting the installed agent", c.start_with_bin(n2, &wrapper));
    let pid = c.node(n2).agent_pid().unwrap();
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, root.path("/usr/bin/overlay-agent"), "node 2 runs the installed agent");
    let leases = ok("etcdctl", c.etcd().etcdctl(&["get", "--prefix", "--keys-only", "/coreos.com/network/subnets/"]));
    assert!(leases.contains(&format!("{}-24", c.node(n2).subnet.network())), "node 2's lease in etcd: {leases}");
    ok("routes", c.full_mesh());
    let (a, b) = (c.node(1), c.node(n2));
    ok("installed node to node 1", ping(&b.containers[0], a.container_ip(0), 3));
    ok("node 1 to the installed node", ping(&a.containers[0], b.container_ip(1), 3));

    // The unit's ExecStartPost step, by the installed wrapper: docker gets the leased subnet.
    let dest = c.workdir.join("docker.env");
    let step = "mount --make-rprivate / && mkdir -p \"$0$1\" && mount --bind \"$1\" \"$0$1\" && exec chroot \"$0\" \
                /usr/libexec/flannel/mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -f \"$2\" -d \"$3\"";
    ok(
        "mk-docker-opts.sh",
        run(Command::new("unshare").args(["-m", "sh", "-c", step]).arg(&root.0).arg(&c.workdir).arg(&b.subnet_file).arg(&dest)),
    );
    let opts = fs::read_to_string(&dest).unwrap();
    let (bip, _) = overlay_tests::parse_docker_network_options(&opts).unwrap_or_else(|| panic!("docker options: {opts}"));
    assert!(b.subnet.contains(&bip.addr()), "--bip {bip} in node 2's subnet {}: {opts}", b.subnet);

    // Removal keeps the edited options file; purge removes it.
    ok("stopping node 2", c.stop_agent(n2));
    ok("dpkg -r", root.chroot(&["dpkg", "-r", "overlay-agent"]));
    assert!(!root.path("/usr/bin/overlay-agent").exists() && !root.path("/usr/lib/cni/flannel").exists());
    assert!(root.path("/etc/default/flanneld").exists(), "remove keeps the conffile");
    ok("dpkg -P", root.chroot(&["dpkg", "-P", "overlay-agent"]));
    assert!(!root.path("/etc/default/flanneld").exists(), "purge removes the conffile");
}

/// The image loads into a real dockerd and, run with the node's network and bpffs as the
/// DaemonSet runs it, leases a subnet and carries containers' traffic to another node; the
/// DaemonSet's init container command installs the CNI plugin from it.
#[test]
fn the_image_runs_the_agent_on_a_node() {
    require_root();
    let image = artifact("OVERLAY_DIST_IMAGE");
    let spec = ClusterSpec { full_mesh: false, ..ClusterSpec::etcd(Backend::Vxlan, "tc", 1) };
    let mut c = ok("building the cluster", Cluster::new("im", &spec));
    let n2 = ok("adding node 2", c.add_unstarted(NodeKind::Agent { decap_hook: "tc" }));
    // The node's own docker: no bridge, no rules (the harness's docker0 is the node's bridge).
    let mut d = ok(
        "dockerd",
        Dockerd::start(&c.node(n2).ns, &c.workdir.join("docker"), "--bridge=none --iptables=false --ip-masq=false"),
    );
    let loaded = ok("docker load", d.docker(&["load", "-i", image.to_str().unwrap()]));
    let tag = loaded.lines().find_map(|l| l.strip_prefix("Loaded image: ")).unwrap_or_else(|| panic!("docker load: {loaded}")).trim().to_string();
    assert_eq!(tag, format!("overlay-agent:{}", env!("CARGO_PKG_VERSION")));

    // The DaemonSet's init container: install-cni into the host's CNI directories.
    let host_cni = c.workdir.join("host-cni");
    fs::create_dir_all(&host_cni).unwrap();
    let mount = format!("{}:/host", host_cni.display());
    ok(
        "install-cni from the image",
        d.docker(&["run", "--rm", "-v", &mount, &tag, "install-cni", "--bin-dir", "/host/opt/cni/bin", "--conf-dir", "/host/etc/cni/net.d"]),
    );
    assert!(host_cni.join("opt/cni/bin/flannel").exists() && host_cni.join("etc/cni/net.d/10-flannel.conflist").exists());

    // The agent container: host network (this node's), bpffs, the test's directory, privileged.
    let name = format!("agent-{}", std::process::id());
    d.remove_on_drop(&name);
    let sock = d.socket();
    let wrapper = c.workdir.join("image-agent.sh");
    write_script(
        &wrapper,
        &format!(
            "#!/bin/sh\nexec /usr/bin/docker -H {sock} run --rm --name {name} {privileged} --network host \
             -v /sys/fs/bpf:/sys/fs/bpf -v {w}:{w} -e NOTIFY_SOCKET -e RUST_LOG {tag} \"$@\"\n",
            w = c.workdir.display(),
            privileged = privileged()
        ),
    );
    ok("starting the agent's container", c.start_with_bin(n2, &wrapper));
    let running = ok("docker inspect", d.docker(&["inspect", "-f", "{{.State.Running}} {{.HostConfig.NetworkMode}}", &name]));
    assert_eq!(running.trim(), "true host", "the agent runs in its container");
    ok("routes", c.full_mesh());
    let (a, b) = (c.node(1), c.node(n2));
    ok("image node to node 1", ping(&b.containers[0], a.container_ip(0), 3));
    ok("node 1 to the image node", ping(&a.containers[0], b.container_ip(1), 3));
    let status = ok("status", b.agent_cli(&["status"]));
    assert!(status.contains("ready=true") || status.contains("ready: true"), "{status}");
}

/// The tarball holds a statically linked agent (no program interpreter: it runs whatever the
/// host's libc) with the seed's unit, options file and wrapper beside it.
#[test]
fn the_tarball_holds_a_static_agent_and_the_seeds_files() {
    let tarball = artifact("OVERLAY_DIST_TARBALL");
    let dir = tempdir();
    ok("tar", run(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&dir.0)));
    let top = fs::read_dir(&dir.0).unwrap().next().unwrap().unwrap().path();
    for f in ["overlay-agent", "mk-docker-opts.sh", "flanneld.service", "flannel.cfg", "docker.service.d-flannel.conf", "README.md"] {
        assert!(top.join(f).exists(), "{f} in the tarball");
    }
    let elf = fs::read(top.join("overlay-agent")).unwrap();
    assert!(!has_interpreter(&elf), "the tarball's agent is statically linked");
    let v = ok("--version", run(Command::new(top.join("overlay-agent")).arg("--version")));
    assert!(v.starts_with("overlay-agent "), "{v}");
    // The wrapper finds the agent beside it (as in /opt/kubernetes/bin, off PATH) and writes
    // docker's options from a subnet file.
    let (env, opts) = (dir.0.join("subnet.env"), dir.0.join("docker.env"));
    fs::write(&env, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n").unwrap();
    ok(
        "mk-docker-opts.sh",
        run(Command::new("sh")
            .arg(top.join("mk-docker-opts.sh"))
            .args(["-k", "DOCKER_NETWORK_OPTIONS", "-f"])
            .arg(&env)
            .arg("-d")
            .arg(&opts)
            .env_remove("OVERLAY_AGENT")
            .env("PATH", "/usr/bin:/bin")),
    );
    let written = fs::read_to_string(&opts).unwrap();
    assert!(written.contains("DOCKER_NETWORK_OPTIONS=") && written.contains("--bip=10.244.7.1/24") && written.contains("--mtu=1450"), "{written}");
}

/// The DaemonSet's `privileged: true`, as far as this machine allows: `--privileged` asks for
/// every capability, and runc refuses one missing from the caller's bounding set (some
/// sandboxes drop CAP_SYS_RESOURCE). Then: every capability there is, and the rest of what
/// `--privileged` lifts (seccomp, AppArmor, the read-only /proc and /sys paths).
fn privileged() -> String {
    const NAMES: [&str; 41] = [
        "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
        "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
        "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
        "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).map(|v| u64::from_str_radix(v.trim(), 16).unwrap()).unwrap();
    let missing: Vec<&str> = (0..NAMES.len()).filter(|&i| bounding & (1 << i) == 0).map(|i| NAMES[i]).collect();
    if missing.is_empty() {
        return "--privileged".into();
    }
    eprintln!("this machine's bounding set lacks {missing:?}: the container gets every other capability instead of --privileged");
    let mut flags = String::from("--cap-add ALL");
    for m in missing {
        flags += &format!(" --cap-drop {m}");
    }
    flags + " --security-opt seccomp=unconfined --security-opt apparmor=unconfined --security-opt systempaths=unconfined"
}

/// A directory of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let p = std::env::temp_dir().join(format!("overlay-dist-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
    fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

/// Whether a 64-bit ELF image has a PT_INTERP program header (a dynamic executable).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF");
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let (size, count) = (u16::from_le_bytes([elf[54], elf[55]]) as usize, u16::from_le_bytes([elf[56], elf[57]]) as usize);
    (0..count).any(|i| u32::from_le_bytes(elf[phoff + i * size..phoff + i * size + 4].try_into().unwrap()) == 3)
}
