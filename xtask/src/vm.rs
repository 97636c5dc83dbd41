//! The kernel matrix: Debian 12's own kernels (6.1, the stock one, without TCX; 6.12, with
//! it) booted in qemu under TCG with the host's root shared read-only over 9p and a tmpfs
//! overlay on top, so every host tool (etcd, iproute2, the built agent and tests) is there
//! without building an image (facts measured in ../shared/design/VM.md).
//!
//! `setup` fetches and unpacks the kernels (Debian's `linux-image-*` packages) into a cache;
//! `vm-test` builds an initramfs per kernel (busybox, the virtio and 9p modules), boots it,
//! and inside runs the programs' tests (`overlay-agent/tests/programs.rs`: every program
//! through that kernel's verifier, TC and XDP) and `tests/tests/kernel_matrix.rs` (the
//! cluster that proves a kernel, and the ipip backend's, which needs the ipip module this
//! machine's kernel lacks); then
//! two 6.12 VMs joined by a virtio-net link run an agent each, to check the decap hook's
//! choice on virtio_net and native XDP there. The console is the only channel back: the
//! guest prints `VM-RESULT:` lines, which are read here; everything else goes to
//! target/vm/*.log.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{setup, status_logged, with_progress};

/// What the VMs need on the host.
pub const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("cpio", "/usr/bin/cpio"),
    ("kmod", "/usr/sbin/depmod"),
    ("xz-utils", "/usr/bin/xz"),
    ("busybox-static", "/usr/bin/busybox"),
    // The stock flannel wireguard node in the matrix is set up with `wg`, as flannel would.
    ("wireguard-tools", "/usr/bin/wg"),
];

/// The kernels: Debian 12's meta package naming each (its dependency is the current build),
/// and what to call it.
const KERNELS: &[(&str, &str)] = &[("linux-image-amd64", "6.1"), ("linux-image-6.12-amd64", "6.12")];

/// Modules the initramfs loads before it can mount the host's root, in dependency order
/// (those built in on a kernel are simply absent from its modules).
const INITRD_MODULES: &[&str] =
    &["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay"];

/// How long one VM may take, boot to power-off: the programs' tests and six clusters (vxlan
/// with a stock node, ipip, wireguard, and wireguard's dual-stack, IPv6-only and one-device
/// clusters) take about 330-400 s under TCG here; CI's machines have run about a fifth
/// slower.
const VM_TIMEOUT: Duration = Duration::from_secs(900);

/// A kernel unpacked in the cache.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub label: &'static str,
    /// `uname -r`, e.g. 6.1.0-57-amd64.
    pub release: String,
    /// The unpacked package (boot/, lib/modules/<release>/).
    pub root: PathBuf,
}

impl Kernel {
    fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }
    fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

fn cache_dir() -> Result<PathBuf> {
    Ok(setup::home()?.join(".cache/overlay-ebpf/vm-kernels"))
}

/// The package a meta package depends on (`linux-image-6.1.0-57-amd64`), from apt's lists.
fn resolve(meta: &str) -> Result<String> {
    let ask = || -> Option<String> {
        let out = Command::new("apt-cache").args(["depends", meta]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")).map(str::to_string))
    };
    if let Some(p) = ask() {
        return Ok(p);
    }
    crate::status(Command::new("apt-get").args(["-o", "Dpkg::Use-Pty=0", "-qq", "update"]))?;
    ask().with_context(|| format!("apt knows no {meta}: is Debian 12's main archive in the apt sources?"))
}

/// The newest complete kernel of series `label` (e.g. 6.1) in the cache, by its release.
fn cached_release(cache: &Path, label: &str) -> Option<String> {
    let mut found: Vec<String> = fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|r| r.starts_with(&format!("{label}.")))
        .filter(|r| {
            let k = Kernel { label: "", release: r.clone(), root: cache.join(r) };
            k.vmlinuz().exists() && k.modules().join("modules.dep").exists()
        })
        .collect();
    found.sort();
    found.pop()
}

/// Fetch and unpack Debian's kernels into the cache (each once); for `setup`.
pub fn fetch() -> Result<Vec<Kernel>> {
    let cache = cache_dir()?;
    fs::create_dir_all(&cache)?;
    let mut out = Vec::new();
    for (meta, label) in KERNELS {
        // Offline (apt cannot say which package is current): a kernel of that series already
        // in the cache does.
        let pkg = match resolve(meta) {
            Ok(p) => p,
            Err(e) => match cached_release(&cache, label) {
                Some(release) => {
                    eprintln!("setup: apt cannot resolve {meta} ({e:#}); using the cached {release}");
                    format!("linux-image-{release}")
                }
                None => return Err(e),
            },
        };
        let release = pkg.strip_prefix("linux-image-").unwrap_or(&pkg).to_string();
        let root = cache.join(&release);
        let k = Kernel { label, release: release.clone(), root: root.clone() };
        if k.vmlinuz().exists() && k.modules().join("modules.dep").exists() {
            out.push(k);
            continue;
        }
        let log = crate::target_dir().join("setup");
        fs::create_dir_all(&log)?;
        let log = log.join(format!("kernel-{label}.log"));
        with_progress(&format!("setup: fetching Debian's kernel {release} (Linux {label}) for the VM tests"), || {
            fs::write(&log, "")?;
            let tmp = cache.join(format!(".download-{release}"));
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(&tmp)?;
            status_logged(Command::new("apt-get").current_dir(&tmp).args(["-o", "Dpkg::Use-Pty=0", "download", &pkg]), &log)?;
            let deb = fs::read_dir(&tmp)?.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "deb"));
            let deb = deb.context("apt-get download left no .deb")?;
            let _ = fs::remove_dir_all(&root);
            status_logged(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root), &log)?;
            status_logged(Command::new("depmod").arg("-b").arg(&root).arg(&release), &log)?;
            fs::remove_dir_all(&tmp)?;
            Ok(())
        })?;
        out.push(k);
    }
    Ok(out)
}

/// The initramfs for `k`: busybox, the modules for 9p and overlayfs (decompressed: busybox's
/// insmod takes plain modules), and an /init that mounts the host's root read-only with a
/// tmpfs over it, binds the kernel's modules in (the host has none of its own for this
/// kernel), and hands over to `script` there.
fn initramfs(k: &Kernel, script: &Path, out: &Path) -> Result<()> {
    let dir = out.with_extension("d");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("bin"))?;
    fs::create_dir_all(dir.join("mods"))?;
    fs::copy("/usr/bin/busybox", dir.join("bin/busybox")).context("copying busybox")?;
    let dep = fs::read_to_string(k.modules().join("modules.dep"))?;
    let mut order = Vec::new();
    for m in INITRD_MODULES {
        let Some(path) = dep.lines().filter_map(|l| l.split(':').next()).find(|p| {
            let f = p.rsplit('/').next().unwrap_or(p);
            f == format!("{m}.ko") || f == format!("{m}.ko.xz") || f == format!("{m}.ko.zst")
        }) else {
            continue; // built in
        };
        let src = k.modules().join(path);
        let dst = dir.join("mods").join(format!("{m}.ko"));
        if path.ends_with(".xz") {
            let data = Command::new("xz").arg("-dc").arg(&src).output().context("xz")?;
            if !data.status.success() {
                bail!("decompressing {}", src.display());
            }
            fs::write(&dst, data.stdout)?;
        } else {
            fs::copy(&src, &dst)?;
        }
        order.push(*m);
    }
    let modules = k.modules();
    let init = format!(
        r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev /hostroot /newroot /rw
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
for m in {order}; do $B insmod /mods/$m.ko || echo "VM-RESULT: failed insmod $m"; done
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /hostroot || echo "VM-RESULT: failed mounting the host's root"
$B mount -t tmpfs tmpfs /rw; $B mkdir -p /rw/upper /rw/work
$B mount -t overlay overlay -o lowerdir=/hostroot,upperdir=/rw/upper,workdir=/rw/work /newroot || echo "VM-RESULT: failed overlay"
$B mkdir -p /newroot/lib/modules/{release}
$B mount --bind /newroot{modules} /newroot/lib/modules/{release}
$B umount /proc /sys /dev
exec $B switch_root /newroot /bin/sh {script}
"#,
        order = order.join(" "),
        release = k.release,
        modules = modules.display(),
        script = script.display(),
    );
    fs::write(dir.join("init"), init)?;
    fs::set_permissions(dir.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let sh = format!("cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}", dir.display(), out.display());
    let st = Command::new("sh").arg("-c").arg(&sh).status()?;
    if !st.success() {
        bail!("packing the initramfs ({sh})");
    }
    Ok(())
}

/// What every guest script starts with: the mounts a system has, and bpffs.
const GUEST_PRELUDE: &str = "#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp; mount -t bpf bpf /sys/fs/bpf
ip link set lo up
echo \"VM-INFO: kernel $(uname -r)\"
";

/// And ends with: power off (the host's root goes with it, so nothing after this runs).
/// The console is drained first (stty's `drain`, on by default, waits until the UART has sent
/// everything): the kernel writes its power-off messages straight to the port and would
/// otherwise land inside the last `VM-RESULT:` line.
const GUEST_EPILOGUE: &str = "stty -F /dev/console drain -echo 2>/dev/null
echo o > /proc/sysrq-trigger
while :; do :; done
";

/// A running VM whose console lines reach `lines`.
struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

fn boot(k: &Kernel, name: &str, script_body: &str, nic: &[String]) -> Result<Vm> {
    let dir = crate::target_dir().join("vm");
    fs::create_dir_all(&dir)?;
    let script = dir.join(format!("{name}.sh"));
    fs::write(&script, format!("{GUEST_PRELUDE}{script_body}{GUEST_EPILOGUE}"))?;
    let initrd = dir.join(format!("{name}.cpio.gz"));
    initramfs(k, &script, &initrd)?;
    let log = dir.join(format!("{name}.log"));
    let mut file = fs::File::create(&log)?;
    let mut cmd = Command::new("qemu-system-x86_64");
    // KVM hangs here after "Booting from ROM" (VM.md): TCG. One host thread for both vCPUs:
    // with a thread each (MTTCG), a vCPU can run code another is patching (a static key
    // flipped by ping's SO_TIMESTAMP, a tracepoint, a program's statistics) after the patch
    // is done, and the guest dies of "Oops: int3" in the patched function (CI saw it once in
    // __netif_receive_skb_core on 6.12; the same TCG fault that MPTCP's CI lives with).
    cmd.args(["-accel", "tcg,thread=single", "-m", "3072", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(k.vmlinuz())
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args(["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"]);
    if nic.is_empty() {
        cmd.args(["-nic", "none"]);
    } else {
        cmd.args(nic);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // qemu goes with us, however we end (a test harness's timeout, ^C): no VM left spinning.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    writeln!(file, "$ {cmd:?}")?;
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    for stream in [child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>), child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>)].into_iter().flatten() {
        let tx = tx.clone();
        let mut file = file.try_clone()?;
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                let _ = writeln!(file, "{line}");
                let _ = tx.send(line);
            }
        });
    }
    Ok(Vm { child, lines: rx, log })
}

impl Vm {
    /// Wait (bounded) for the guest to power off; its `VM-RESULT:` lines.
    fn finish(mut self, deadline: Instant) -> (Vec<String>, bool, PathBuf) {
        let mut results = Vec::new();
        let mut done = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.min(Duration::from_secs(1))) {
                Ok(l) => {
                    if let Some(r) = result_of(&l) {
                        results.push(r);
                    }
                    if l.contains("VM-INFO:") {
                        eprintln!("  {}", l.trim());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    done = true;
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if !done {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        (results, done, self.log.clone())
    }
}

/// The result a console line carries, without a kernel message the port wrote into it
/// (`VM-RESULT: ok[   49.59] sysrq: Power Off` is `ok`).
fn result_of(line: &str) -> Option<String> {
    let r = line.split("VM-RESULT: ").nth(1)?;
    // A kernel line starts `[ seconds.micros]`.
    let is_stamp = |after: &str| {
        let after = after.trim_start();
        let digits = after.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(after.len());
        after[..digits].contains('.') && after[digits..].starts_with(']')
    };
    let end = r.match_indices('[').map(|(i, _)| i).find(|&i| is_stamp(&r[i + 1..])).unwrap_or(r.len());
    Some(r[..end].trim().to_string())
}

/// A VM dropped on an early return (the other VM failed to boot, a panic) is ended and reaped.
impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last lines of a log, for a failure's message.
fn tail(log: &Path, n: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let last = lines[lines.len().saturating_sub(n)..].join("\n");
    match first_oops(&lines, n) {
        Some(oops) => format!("the guest kernel's first report:\n{oops}\n...\nthe console's end:\n{last}"),
        None => last,
    }
}

/// The guest kernel's first oops, BUG or warning (its opening `n` lines), when the console
/// has one that the tail would not show: a panic's last lines are its second report.
fn first_oops(lines: &[&str], n: usize) -> Option<String> {
    let marks = ["] Oops", "] BUG:", "] kernel BUG", "] WARNING:", "] general protection", "] int3:", "] ------------[ cut here"];
    let at = lines.iter().position(|l| marks.iter().any(|m| l.contains(m)))?;
    (at < lines.len().saturating_sub(n)).then(|| lines[at..(at + n).min(lines.len())].join("\n"))
}

/// Test binary `name` of package `pkg` (built by this call).
fn test_binary(pkg: &str, name: &str) -> Result<PathBuf> {
    let out = crate::cargo()
        .args(["test", "-p", pkg, "--test", name, "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("building the {name} test"))?;
    if !out.status.success() {
        bail!("building the {name} test failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["target"]["name"] == name {
            if let Some(exe) = v["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo named no {name} executable")
}

/// Boot each kernel and run the cluster in it, then the virtio pair. `agent`: the built agent.
pub fn run(agent: &Path) -> Result<()> {
    setup::apt_install(PACKAGES, &crate::target_dir().join("setup").join("apt-vm.log"), "vm-test")?;
    let kernels = fetch()?;
    let tests = test_binary("overlay-tests", "kernel_matrix")?;
    let programs = test_binary("overlay-agent", "programs")?;
    let started = Instant::now();
    let mut failures = Vec::new();
    for k in &kernels {
        let t = Instant::now();
        eprintln!("vm-test: Linux {} ({}): the programs through its verifier, then the cluster", k.label, k.release);
        let body = format!(
            "cd {ws} && RUST_BACKTRACE=1 {programs} --test-threads=1
rc=$?
if [ $rc != 0 ]; then echo \"VM-RESULT: failed (the programs' tests: exit status $rc)\"; fi
OVERLAY_EXPECT_KERNEL={label} OVERLAY_EXPECT_ATTACH={expect} OVERLAY_AGENT_BIN={agent} RUST_BACKTRACE=1 {tests} --exact a_cluster_with_a_stock_node_works_on_this_kernel --test-threads=1 --nocapture
rc=$?
if [ $rc = 0 ]; then echo \"VM-RESULT: ok\"; else echo \"VM-RESULT: failed (the cluster's exit status $rc)\"; fi
OVERLAY_EXPECT_KERNEL={label} OVERLAY_AGENT_BIN={agent} RUST_BACKTRACE=1 {tests} --exact ipip_nodes_interoperate_with_a_stock_ipip_node_or_are_refused_without_the_module --test-threads=1 --nocapture
rc=$?
if [ $rc != 0 ]; then echo \"VM-RESULT: failed (the ipip cluster's exit status $rc)\"; fi
OVERLAY_EXPECT_KERNEL={label} OVERLAY_AGENT_BIN={agent} RUST_BACKTRACE=1 {tests} --exact wireguard_nodes_interoperate_with_a_stock_wireguard_node_or_are_refused_without_the_module --test-threads=1 --nocapture
rc=$?
if [ $rc != 0 ]; then echo \"VM-RESULT: failed (the wireguard cluster's exit status $rc)\"; fi
OVERLAY_EXPECT_KERNEL={label} OVERLAY_AGENT_BIN={agent} RUST_BACKTRACE=1 {tests} --exact dual_stack_wireguard_nodes_interoperate_with_a_stock_node_over_ipv6 --test-threads=1 --nocapture
rc=$?
if [ $rc != 0 ]; then echo \"VM-RESULT: failed (the dual-stack wireguard cluster's exit status $rc)\"; fi
OVERLAY_EXPECT_KERNEL={label} OVERLAY_AGENT_BIN={agent} RUST_BACKTRACE=1 {tests} --exact ipv6_only_wireguard_nodes_interoperate_with_a_stock_node --test-threads=1 --nocapture
rc=$?
if [ $rc != 0 ]; then echo \"VM-RESULT: failed (the IPv6-only wireguard cluster's exit status $rc)\"; fi
OVERLAY_EXPECT_KERNEL={label} OVERLAY_AGENT_BIN={agent} RUST_BACKTRACE=1 {tests} --exact one_device_wireguard_nodes_carry_both_families_with_a_stock_node --test-threads=1 --nocapture
rc=$?
if [ $rc != 0 ]; then echo \"VM-RESULT: failed (the one-device wireguard cluster's exit status $rc)\"; fi
",
            programs = programs.display(),
            ws = crate::workspace_root().display(),
            agent = agent.display(),
            tests = tests.display(),
            label = k.label,
            // What the probe must find on each (Debian 12's 6.1 has no TCX; 6.12 has it),
            // told from outside so that a probe that is wrong on both cannot pass.
            expect = if k.label == "6.1" { "tc-legacy" } else { "tcx" },
        );
        let vm = boot(k, &format!("cluster-{}", k.label), &body, &[])?;
        let (results, powered_off, log) = vm.finish(Instant::now() + VM_TIMEOUT);
        let passed = powered_off && results.iter().any(|r| r == "ok") && !results.iter().any(|r| r.starts_with("failed"));
        eprintln!("vm-test: Linux {}: {} in {} s (console: {})", k.label, if passed { "passed" } else { "FAILED" }, t.elapsed().as_secs(), log.display());
        if !passed {
            failures.push(format!("Linux {} ({}): {results:?}{}\n{}", k.label, k.release, if powered_off { "" } else { " (timed out)" }, tail(&log, 40)));
        }
    }
    let k612 = kernels.iter().find(|k| k.label == "6.12").context("no 6.12 kernel")?;
    let t = Instant::now();
    eprintln!("vm-test: Linux 6.12, two VMs over virtio-net: the decap hook on virtio_net, native XDP there");
    match virtio_pair(k612, agent) {
        Ok(()) => eprintln!("vm-test: virtio pair: passed in {} s", t.elapsed().as_secs()),
        Err(e) => {
            eprintln!("vm-test: virtio pair: FAILED in {} s", t.elapsed().as_secs());
            failures.push(format!("virtio pair: {e:#}"));
        }
    }
    eprintln!("vm-test: the matrix took {} s", started.elapsed().as_secs());
    if !failures.is_empty() {
        bail!("the kernel matrix failed:\n{}", failures.join("\n\n"));
    }
    Ok(())
}

/// How long the backends' benchmark may take in its VM (about 12 minutes for a full run
/// under TCG here: seven clusters built, then five interleaved runs of each).
const BENCH_TIMEOUT: Duration = Duration::from_secs(2700);

/// `cargo xtask bench backends`: boot Debian's 6.12 (it has the ipip and wireguard modules)
/// and run `overlay-bench backends` inside; its report comes back on the console's
/// `VM-BENCH:` line and is written to `out/backends.json`.
pub fn bench_backends(agent: &Path, bench: &Path, quick: bool, runs: Option<u32>, out: &Path) -> Result<PathBuf> {
    setup::apt_install(PACKAGES, &crate::target_dir().join("setup").join("apt-vm.log"), "bench backends")?;
    let kernels = fetch()?;
    let k = kernels.iter().find(|k| k.label == "6.12").context("no 6.12 kernel")?;
    // The report is one long console line: no kernel message may land inside it (the console
    // takes emergencies only from here on).
    let body = format!(
        "echo 1 > /proc/sys/kernel/printk
cd {ws} && OVERLAY_AGENT_BIN={agent} {bench} backends --console --out /tmp/bench{quick}{runs}
rc=$?
if [ $rc = 0 ]; then echo \"VM-RESULT: ok\"; else echo \"VM-RESULT: failed (the benchmark's exit status $rc)\"; fi
",
        ws = crate::workspace_root().display(),
        agent = agent.display(),
        bench = bench.display(),
        quick = if quick { " --quick" } else { "" },
        runs = runs.map(|r| format!(" --runs {r}")).unwrap_or_default(),
    );
    let t = Instant::now();
    eprintln!(
        "bench backends: Linux {} ({}) under TCG: seven two-node clusters, then the runs ({})",
        k.label,
        k.release,
        if quick { "a quick run takes about 3 minutes" } else { "a full run of 5 takes about 12 minutes" }
    );
    let vm = boot(k, "bench-backends", &body, &[])?;
    let (results, powered_off, log) = vm.finish(Instant::now() + BENCH_TIMEOUT);
    if !powered_off || !results.iter().any(|r| r == "ok") || results.iter().any(|r| r.starts_with("failed")) {
        bail!(
            "the backends' benchmark failed in the VM after {} s: {results:?}{}\n{}",
            t.elapsed().as_secs(),
            if powered_off { "" } else { " (timed out)" },
            tail(&log, 40)
        );
    }
    let report = bench_report(&fs::read_to_string(&log)?).with_context(|| format!("no report on the console ({})", log.display()))?;
    fs::create_dir_all(out)?;
    let json = out.join("backends.json");
    fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    eprintln!("bench backends: done in {} s (console: {})", t.elapsed().as_secs(), log.display());
    Ok(json)
}

/// The report a guest printed on its console's `VM-BENCH:` line: the first JSON value after
/// the mark (a kernel message the port wrote after it is not part of it).
fn bench_report(console: &str) -> Result<serde_json::Value> {
    let line = console.lines().rev().find_map(|l| l.split_once("VM-BENCH: ").map(|(_, r)| r)).context("no VM-BENCH: line")?;
    let value = serde_json::Deserializer::from_str(line).into_iter::<serde_json::Value>().next().context("an empty VM-BENCH: line")?;
    let value = value.context("the VM-BENCH: line is not JSON")?;
    if !value["paths"].is_array() {
        bail!("the VM-BENCH: line holds no report");
    }
    Ok(value)
}

/// A free TCP port on loopback for qemu's socket link between the two VMs.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Two VMs joined by a virtio-net link (qemu's socket netdev on loopback), an agent each in
/// static mode on that link. Each checks that `--decap-hook auto` attaches TC (no XDP on the
/// NIC), then that `--decap-hook xdp` attaches native XDP to virtio_net, and that its
/// container reaches the other's, with the checks counting frames decapsulated.
fn virtio_pair(k: &Kernel, agent: &Path) -> Result<()> {
    let port = free_port()?;
    let script = |n: u8| virtio_script(n, agent);
    let mac = |n: u8| format!("52:54:00:00:c8:0{n}");
    let a = boot(k, "virtio-a", &script(1), &[
        "-netdev".into(), format!("socket,id=u,listen=127.0.0.1:{port}"),
        "-device".into(), format!("virtio-net-pci,netdev=u,mac={}", mac(1)),
    ])?;
    // B connects once A's qemu listens (seen in /proc/net/tcp: a probe connection would be
    // taken for the peer).
    let listening = || {
        let want = format!(":{port:04X} 00000000:0000 0A");
        fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.lines().any(|l| l.contains(&want)))
    };
    let t = Instant::now();
    while !listening() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("qemu of VM A does not listen on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let b = boot(k, "virtio-b", &script(2), &[
        "-netdev".into(), format!("socket,id=u,connect=127.0.0.1:{port}"),
        "-device".into(), format!("virtio-net-pci,netdev=u,mac={}", mac(2)),
    ])?;
    let deadline = Instant::now() + VM_TIMEOUT;
    let (ra, oa, la) = a.finish(deadline);
    let (rb, ob, lb) = b.finish(deadline);
    let mut errors = Vec::new();
    for (name, results, off, log) in [("A", ra, oa, la), ("B", rb, ob, lb)] {
        let failed: Vec<_> = results.iter().filter(|r| r.starts_with("failed")).collect();
        if !off || !failed.is_empty() || !results.iter().any(|r| r == "ok") {
            errors.push(format!("VM {name}: {results:?}{}\n{}", if off { "" } else { " (timed out)" }, tail(&log, 30)));
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(())
}

/// Node `n` (1 or 2) of the virtio pair.
fn virtio_script(n: u8, agent: &Path) -> String {
    let peer = 3 - n;
    format!(
        r#"A={agent}
D=/sys/fs/bpf/ov
fail() {{ echo "VM-RESULT: failed $*"; ip -d link show eth0; $A stats --bpffs-dir $D; {epilogue} }}
# No udev here: the NIC's driver is loaded by hand.
modprobe virtio_net
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
drv=$(basename "$(readlink /sys/class/net/eth0/device/driver)")
echo "VM-INFO: node {n}: eth0 is $drv"
[ "$drv" = virtio_net ] || fail "eth0 is $drv, not virtio_net"
sysctl -qw net.ipv4.ip_forward=1
ip link set eth0 up && ip addr add 192.168.200.{n}/24 dev eth0
ip link add flannel.1 address 02:00:00:00:0a:0{n} type vxlan id 1 local 192.168.200.{n} dev eth0 dstport 8472 nolearning
ip netns add c
ip link add veth0 type veth peer name eth0 netns c
ip addr add 10.244.{n}.1/24 dev veth0 && ip link set veth0 up
ip -n c link set lo up && ip -n c addr add 10.244.{n}.2/24 dev eth0 && ip -n c link set eth0 up && ip -n c route add default via 10.244.{n}.1
# Up, with the hook asked for (the first agent's pins say "up" too until the second attaches).
up() {{ i=0; while [ $i -lt 120 ]; do case "$($A status --bpffs-dir $D 2>/dev/null)" in *"decap=$1 "*"ready=true"*) return 0 ;; esac; sleep 1; i=$((i+1)); done; return 1; }}
$A --bpffs-dir $D --iface eth0 --network 10.244.0.0/16 --subnet 10.244.{n}.0/24 >/tmp/agent-auto.log 2>&1 &
pid=$!
up tc || fail "the agent (auto) did not come up with TC: $(tail -5 /tmp/agent-auto.log)"
st=$($A status --bpffs-dir $D)
echo "VM-INFO: node {n}: auto: $st"
case "$st" in *decap=tc*) ;; *) fail "auto chose $st on virtio_net" ;; esac
ip -d link show eth0 | grep -q 'prog/xdp' && fail "auto attached XDP to virtio_net"
kill $pid; wait $pid
$A --bpffs-dir $D --iface eth0 --network 10.244.0.0/16 --subnet 10.244.{n}.0/24 --decap-hook xdp >/tmp/agent-xdp.log 2>&1 &
pid=$!
up xdp || fail "the agent (xdp) did not come up with XDP: $(tail -5 /tmp/agent-xdp.log)"
st=$($A status --bpffs-dir $D)
echo "VM-INFO: node {n}: xdp: $st"
case "$st" in *decap=xdp*) ;; *) fail "--decap-hook xdp gave $st" ;; esac
ip -d link show eth0 | grep -q 'prog/xdp' || fail "no XDP program on eth0"
$A route add 10.244.{peer}.0/24 --public-ip 192.168.200.{peer} --vtep-mac 02:00:00:00:0a:0{peer} --bpffs-dir $D || fail "route add"
ok=0; i=0
while [ $i -lt 120 ]; do ip netns exec c ping -c 1 -W 1 10.244.{peer}.2 >/dev/null 2>&1 && {{ ok=1; break; }}; i=$((i+1)); done
[ $ok = 1 ] || fail "no ping from node {n}'s container to node {peer}'s"
echo "VM-INFO: node {n}: ping across virtio-net ok"
dec() {{ $A stats --bpffs-dir $D | awk '$1 == "decapsulated" {{ print $2 }}'; }}
i=0
while [ $i -lt 120 ]; do [ "$(dec)" -ge 1 ] 2>/dev/null && break; sleep 1; i=$((i+1)); done
[ "$(dec)" -ge 1 ] 2>/dev/null || fail "XDP counted nothing decapsulated"
echo "VM-INFO: node {n}: XDP checked $(dec) frames"
# Each node needs the other up until its own checks are done. Node 2 stays until node 1 has
# started its last phase (a second echo answered by node 2's container: node 1's first check
# stops at one); node 1 then pings until node 2 no longer answers (three misses in a row).
echos() {{ ip netns exec c awk '/^Icmp:/ {{ if (!h) {{ for (k = 1; k <= NF; k++) if ($k == "OutEchoReps") c = k; h = 1 }} else print $c }}' /proc/net/snmp; }}
if [ {n} = 2 ]; then
  i=0; while [ $i -lt 240 ] && ! [ "$(echos)" -ge 2 ] 2>/dev/null; do sleep 0.5; i=$((i+1)); done
  [ "$(echos)" -ge 2 ] 2>/dev/null || fail "node 1 never reached its last phase"
else
  miss=0; i=0
  while [ $miss -lt 3 ] && [ $i -lt 360 ]; do
    if ip netns exec c ping -c 1 -W 1 10.244.{peer}.2 >/dev/null 2>&1; then miss=0; sleep 0.5; else miss=$((miss+1)); fi
    i=$((i+1))
  done
  [ $miss -ge 3 ] || fail "node 2 did not finish"
fi
echo "VM-RESULT: ok"
"#,
        agent = agent.display(),
        epilogue = GUEST_EPILOGUE.replace('\n', "; "),
    )
}

#[cfg(test)]
mod tests {
    use super::{bench_report, first_oops, result_of};

    #[test]
    fn the_bench_report_is_the_json_on_the_console_line_without_what_follows() {
        let console = "boot\nVM-BENCH: {\"date\":\"d\",\"paths\":[{\"label\":\"ipip\"}]}[   61.2] sysrq: Power Off\nVM-RESULT: ok\n";
        let r = bench_report(console).unwrap();
        assert_eq!(r["paths"][0]["label"], "ipip");
        assert!(bench_report("VM-RESULT: ok\n").is_err());
        assert!(bench_report("VM-BENCH: {\"date\":\"d\",\"paths\":[{\"lab").is_err(), "a cut line is no report");
        assert!(bench_report("VM-BENCH: {\"date\":\"d\"}").is_err());
    }

    #[test]
    fn a_kernel_message_inside_the_result_line_is_not_part_of_the_result() {
        assert_eq!(result_of("VM-RESULT: ok[   49.592259] sysrq: Power Off").as_deref(), Some("ok"));
        assert_eq!(result_of("VM-RESULT: ok").as_deref(), Some("ok"));
        assert_eq!(result_of("VM-RESULT: failed (exit status 1) [ 3.1] x").as_deref(), Some("failed (exit status 1)"));
        assert_eq!(result_of("VM-RESULT: failed [brackets] kept").as_deref(), Some("failed [brackets] kept"));
        assert_eq!(result_of("VM-INFO: kernel 6.1"), None);
    }

    #[test]
    fn a_panic_report_leads_with_the_first_oops_not_the_second() {
        let mut lines = vec!["boot"; 5];
        lines.push("[   50.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI");
        lines.push("[   50.1] RIP: 0010:first_site+0x3f");
        lines.extend(vec!["[   50.7] trace"; 50]);
        lines.push("[   50.8] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI");
        lines.push("[   50.9] Kernel panic - not syncing");
        let first = first_oops(&lines, 40).expect("the first report");
        assert!(first.starts_with("[   50.1] Oops: int3: 0000 [#1]"), "{first}");
        assert!(first.contains("first_site"));
        assert_eq!(first.lines().count(), 40);
        // A report the tail shows anyway is not repeated; a clean console has none.
        assert_eq!(first_oops(&lines[50..], 40), None);
        assert_eq!(first_oops(&["boot"; 100], 40), None);
    }
}
