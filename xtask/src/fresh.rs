//! `cargo xtask fresh-check`: the README's promise, checked on a machine that has nothing yet.
//!
//! It builds a fresh Debian 12 root with debootstrap (minbase, from the machine's own apt
//! source, plus what any machine that builds Rust with rustup has), makes the host's rustup
//! toolchains visible inside through an overlay (the root cannot change them) under an empty
//! CARGO_HOME (so no bpf-linker or cargo-fuzz from the host), clones the workspace's HEAD into
//! it, and runs there, chrooted with a minimal environment: `cargo xtask setup`, setup once more
//! (it must find nothing to do), `cargo xtask build`, and the built agent's `--version`.
//!
//! All of it is mounted in a mount namespace private to fresh-check: the host never sees those
//! mounts, and they go away with the process however it ends. Within it, a guard stops what
//! still runs in the root, unmounts everything under the work directory (the last mount first,
//! lazily if busy) and removes the directory only when nothing is mounted there any more.
//!
//! The root reaches the network as the machine does: the same apt source file, apt's proxy
//! settings, resolv.conf and the machine's local CA certificates (a TLS-inspecting proxy's);
//! debootstrap itself fetches through `http_proxy` from the environment, if set.

use std::{
    ffi::{CString, OsString},
    fs, io,
    os::unix::{
        ffi::{OsStrExt as _, OsStringExt as _},
        fs::{symlink, PermissionsExt as _},
        io::AsRawFd as _,
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{check_logged, output, setup, spawn_logged, status, with_progress, workspace_root};

pub(crate) const SUITE: &str = "bookworm";
/// Beyond debootstrap's minbase, what a machine that builds Rust with rustup has: cargo fetches
/// from crates.io over TLS (ca-certificates) and rustc links through `cc` with libc's
/// development files (gcc, libc6-dev). xtask itself needs them before setup can run.
const RUSTUP_PREREQUISITES: &str = "ca-certificates,gcc,libc6-dev";
/// The clone, relative to the root (root's home, like a checkout on a fresh machine).
const CLONE: &str = "root/overlay";
/// PATH of the commands run in the root: rustup's proxies, then Debian's default for root.
const PATH_IN_ROOT: &str = "/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where Debian takes local CA certificates from (update-ca-certificates).
const LOCAL_CAS: &str = "/usr/local/share/ca-certificates";
/// Free space the check needs where target/ is (it uses 2.7 GiB).
const SPACE_NEEDED_GIB: u64 = 5;

/// The process group of the step running now (0: none), for the signal handler.
static STEP_GROUP: AtomicI32 = AtomicI32::new(0);
/// The first signal that asked fresh-check to stop (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

pub fn run(keep: bool, uncommitted: &[PathBuf]) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("fresh-check runs debootstrap, mounts and chroot: run it as root");
    }
    let started = Instant::now();
    let dir = crate::target_dir().join("fresh-check");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let _lock = lock(&dir)?;
    check_space(&dir)?;
    // This run's logs only: target/fresh-check/logs/<step>.log.
    let logs = dir.join("logs");
    if logs.exists() {
        fs::remove_dir_all(&logs).with_context(|| format!("removing {}", logs.display()))?;
    }
    fs::create_dir(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let source = apt_source()?;
    setup::apt_install(&[("debootstrap", "/usr/sbin/debootstrap")], &logs.join("apt.log"), "fresh-check")?;
    // Relative pathspecs name paths from where the command was started, as git's do.
    let cwd = std::env::current_dir()?;
    let uncommitted: Vec<PathBuf> = uncommitted.iter().map(|p| cwd.join(p)).collect();

    pass_signals_on();
    private_mount_namespace()?;
    let work = Work::create(dir.join("work"), keep)?;
    let mut times = Vec::new();
    let result = check(&work, &source, &logs, &uncommitted, &mut times);
    drop(work);

    let total = started.elapsed().as_secs();
    let times: Vec<String> = times.iter().map(|(phase, secs)| format!("{phase} {secs} s")).collect();
    match &result {
        Ok(commit) => println!(
            "fresh-check: PASS in {} min {} s: {commit} sets up and builds on a fresh Debian 12 ({})",
            total / 60,
            total % 60,
            times.join(", ")
        ),
        Err(_) => eprintln!("fresh-check: FAIL after {} min {} s ({})", total / 60, total % 60, times.join(", ")),
    }
    result.map(drop)
}

/// The check proper, in the work directory; returns what was checked (commit and files).
fn check(
    work: &Work,
    source: &AptSource,
    logs: &Path,
    uncommitted: &[PathBuf],
    times: &mut Vec<(&'static str, u64)>,
) -> Result<String> {
    let root = &work.root;
    let log = |name: &str| logs.join(format!("{name}.log"));
    let mut timed = |phase: &'static str, line: &str, cmd: &mut Command| -> Result<()> {
        let started = Instant::now();
        let result = run_step(line, cmd, &log(phase)).with_context(|| format!("fresh-check's {phase} step"));
        times.push((phase, started.elapsed().as_secs()));
        result
    };

    let debootstrapped = timed(
        "debootstrap",
        &format!("fresh-check: debootstrap {SUITE} (minbase and {RUSTUP_PREREQUISITES}) from {}", source.uri),
        Command::new("debootstrap")
            .args(["--variant=minbase", "--components=main", &format!("--include={RUSTUP_PREREQUISITES}"), SUITE])
            .arg(root)
            .arg(&source.uri),
    );
    if let Err(e) = debootstrapped {
        // debootstrap's own log is inside the root, which is about to go.
        let kept = log("debootstrap-root");
        let _ = fs::copy(root.join("debootstrap/debootstrap.log"), &kept);
        return Err(e.context(format!("debootstrap's own log: {}", kept.display())));
    }
    prepare(work, source)?;
    let checked = clone(root, uncommitted)?;
    eprintln!("fresh-check: checking {checked}");
    mount_host(work)?;
    stopped()?;

    timed("setup", "fresh-check: cargo xtask setup", &mut in_root(root, "cargo xtask setup"))?;
    timed("setup-again", "fresh-check: cargo xtask setup, again", &mut in_root(root, "cargo xtask setup"))?;
    let again = fs::read_to_string(log("setup-again"))?;
    if again.lines().any(|l| l.starts_with("setup: ")) {
        bail!("the second `cargo xtask setup` installed something again:\n{again}");
    }
    timed("build", "fresh-check: cargo xtask build", &mut in_root(root, "cargo xtask build"))?;
    let version = output(&mut in_root(root, "target/debug/overlay-agent --version"))
        .context("running the agent built in the fresh root")?;
    eprintln!("fresh-check: the agent built in the fresh root runs: {}", version.trim());
    Ok(checked)
}

/// Runs one step behind a progress line, its output in `log`, in a process group of its own
/// that the signals fresh-check gets are passed on to.
fn run_step(line: &str, cmd: &mut Command, log: &Path) -> Result<()> {
    stopped()?;
    with_progress(line, || {
        fs::write(log, "").with_context(|| format!("creating {}", log.display()))?;
        let mut child = spawn_logged(cmd.process_group(0), log)?;
        STEP_GROUP.store(child.id() as i32, Ordering::SeqCst);
        let st = child.wait();
        STEP_GROUP.store(0, Ordering::SeqCst);
        stopped()?;
        check_logged(cmd, st?, log)
    })
}

/// `script`, run by sh in the clone inside the root with the environment of a fresh login.
fn in_root(root: &Path, script: &str) -> Command {
    let mut c = Command::new("/usr/sbin/chroot");
    c.arg(root)
        .args(["/bin/sh", "-c", &format!("cd /{CLONE} && exec {script}")])
        .env_clear()
        .env("HOME", "/root")
        .env("PATH", PATH_IN_ROOT);
    if let Some(term) = std::env::var_os("TERM") {
        c.env("TERM", term);
    }
    c
}

extern "C" fn on_stop_signal(signal: libc::c_int) {
    let _ = STOP_SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    let group = STEP_GROUP.load(Ordering::SeqCst);
    if group > 0 {
        unsafe { libc::kill(-group, signal) };
    }
}

/// Ctrl-C, SIGTERM and SIGHUP stop the running step (passed on to its process group) and
/// then fresh-check, which cleans up on its way out.
fn pass_signals_on() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        unsafe { libc::signal(signal, on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
}

/// An error once a signal asked fresh-check to stop.
fn stopped() -> Result<()> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => Ok(()),
        signal => bail!("stopped by signal {signal}"),
    }
}

/// Holds target/fresh-check/lock while it runs: a second fresh-check would remove this one's root.
fn lock(dir: &Path) -> Result<fs::File> {
    let path = dir.join("lock");
    let file = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another fresh-check is running ({} is locked)", path.display());
    }
    Ok(file)
}

fn check_space(dir: &Path) -> Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("statvfs {}", dir.display()));
    }
    let free_gib = st.f_bavail * st.f_frsize / (1 << 30);
    if free_gib < SPACE_NEEDED_GIB {
        bail!("{} has {free_gib} GiB free; the fresh root needs {SPACE_NEEDED_GIB} GiB", dir.display());
    }
    Ok(())
}

/// Where the machine's apt gets `bookworm main` from: the mirror, and the file that says so.
pub(crate) struct AptSource {
    pub(crate) uri: String,
    file: PathBuf,
}

pub(crate) fn apt_source() -> Result<AptSource> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else { continue };
        let uri = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => deb822_uri(&text, SUITE),
            Some("list") => one_line_uri(&text, SUITE),
            _ => None,
        };
        if let Some(uri) = uri {
            return Ok(AptSource { uri, file });
        }
    }
    bail!(
        "no apt source for `{SUITE} main` in /etc/apt/sources.list or /etc/apt/sources.list.d/: fresh-check builds \
         its Debian 12 root from the machine's own mirror"
    )
}

/// The URI of the first deb822 stanza (`.sources` file) with binary packages of `suite`'s `main`.
fn deb822_uri(text: &str, suite: &str) -> Option<String> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.lines().chain([""]).filter(|l| !l.starts_with('#')) {
        if line.trim().is_empty() {
            if let Some(uri) = stanza_uri(&fields, suite) {
                return Some(uri);
            }
            fields.clear();
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((key, value)) = line.split_once(':') {
            fields.push((key.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    None
}

fn stanza_uri(fields: &[(String, String)], suite: &str) -> Option<String> {
    let field = |name: &str| fields.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    let lists = |name: &str, word: &str| field(name).is_some_and(|v| v.split_whitespace().any(|w| w == word));
    let enabled = !field("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no"));
    if enabled && lists("types", "deb") && lists("suites", suite) && lists("components", "main") {
        return field("uris")?.split_whitespace().next().map(String::from);
    }
    None
}

/// The URI of the first one-line entry (`deb [options] uri suite component...`) for `suite` main.
fn one_line_uri(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb")?;
        if !rest.starts_with([' ', '\t']) {
            return None; // deb-src
        }
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let (uri, entry_suite) = (words.next()?, words.next()?);
        (entry_suite == suite && words.any(|c| c == "main")).then(|| uri.to_string())
    })
}

/// apt.conf and apt.conf.d files that set a proxy: apt in the root must fetch as the host does.
fn apt_proxy_configs() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/etc/apt/apt.conf")];
    if let Ok(dir) = fs::read_dir("/etc/apt/apt.conf.d") {
        files.extend(dir.filter_map(|e| Some(e.ok()?.path())));
    }
    files.retain(|f| fs::read_to_string(f).is_ok_and(|text| text.to_ascii_lowercase().contains("proxy")));
    files
}

/// The work directory: the root, and the rustup overlay's upper and work directories.
/// Dropping it stops what still runs in the root, unmounts everything under it and removes it
/// (unless kept), never while anything is still mounted there.
struct Work {
    path: PathBuf,
    root: PathBuf,
    keep: bool,
}

impl Work {
    fn create(path: PathBuf, keep: bool) -> Result<Work> {
        if path.exists() {
            eprintln!("fresh-check: removing {} (left by an earlier run)", path.display());
            remove_unmounted(&path)?;
        }
        let root = path.join("root");
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Work { path, root, keep })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        stop_processes_in(&self.root);
        unmount_all_under(&self.path);
        if self.keep {
            eprintln!("fresh-check: kept {} (its mounts went with fresh-check's mount namespace)", self.root.display());
        } else if let Err(e) = remove_unmounted(&self.path) {
            eprintln!("fresh-check: {e:#}");
        }
    }
}

fn remove_unmounted(path: &Path) -> Result<()> {
    let mounted = mounts_under(path)?;
    if !mounted.is_empty() {
        bail!("not removing {}: still mounted there: {mounted:?}", path.display());
    }
    fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))
}

/// Kills what still runs inside `root` (by pid; only fresh-check starts processes there), such
/// as a daemon a package started or what a stopped step left behind, until nothing does.
fn stop_processes_in(root: &Path) {
    let running = || -> Vec<i32> {
        let Ok(procs) = fs::read_dir("/proc") else { return Vec::new() };
        procs
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid| fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|r| r.starts_with(root)))
            .collect()
    };
    for round in 0..50 {
        let pids = running();
        if pids.is_empty() {
            return;
        }
        if round == 0 {
            eprintln!("fresh-check: stopping {} processes left in the root: {pids:?}", pids.len());
        }
        for pid in pids {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("fresh-check: processes still run in {}: {:?}", root.display(), running());
}

/// Unmounts everything under `dir`, the last mounted first; a busy mount is detached lazily
/// (which takes what is mounted under it along).
fn unmount_all_under(dir: &Path) {
    let mounts = match mounts_under(dir) {
        Ok(m) => m,
        Err(e) => return eprintln!("fresh-check: {e:#}"),
    };
    for mount in mounts.iter().rev() {
        let Ok(path) = CString::new(mount.as_os_str().as_bytes()) else { continue };
        if unsafe { libc::umount2(path.as_ptr(), 0) } != 0 {
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The mount points at or under `dir`, in mount order.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(mount_points(&info).into_iter().filter(|m| m.starts_with(dir)).collect())
}

/// The mount points of a mountinfo text (its fifth field), in its order.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo.lines().filter_map(|line| line.split(' ').nth(4)).map(unescape_octal).collect()
}

/// Decodes mountinfo's `\ooo` escapes (of space, tab, newline and backslash).
fn unescape_octal(field: &str) -> PathBuf {
    let (raw, mut bytes) = (field.as_bytes(), Vec::with_capacity(field.len()));
    let mut i = 0;
    while i < raw.len() {
        let escaped = raw.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (raw[i], escaped) {
            (b'\\', Some(byte)) => {
                bytes.push(byte);
                i += 4;
            }
            (byte, _) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(bytes))
}

/// Moves fresh-check into a mount namespace of its own with nothing shared with the host's:
/// its mounts are invisible outside and vanish with it, however it ends.
fn private_mount_namespace() -> Result<()> {
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error()).context("unshare(CLONE_NEWNS)");
    }
    mount("none", Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)
}

fn mount(source: &str, target: &Path, fstype: Option<&str>, flags: libc::c_ulong, data: Option<&str>) -> Result<()> {
    let c = |s: &[u8]| CString::new(s).context("a mount argument holds a NUL byte");
    let (source_c, target_c) = (c(source.as_bytes())?, c(target.as_os_str().as_bytes())?);
    let fstype = fstype.map(|f| c(f.as_bytes())).transpose()?;
    let data = data.map(|d| c(d.as_bytes())).transpose()?;
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("mounting {source} at {}", target.display()));
    }
    Ok(())
}

/// rustup's and cargo's homes on the host, as rustup and cargo find them.
fn host_home(var: &str, default: &str) -> Result<PathBuf> {
    match std::env::var_os(var) {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(setup::home()?.join(default)),
    }
}

/// Makes the debootstrapped root a machine with rustup: apt configured as the host's, name
/// resolution, no services started by packages, and an empty CARGO_HOME with rustup's proxies.
fn prepare(work: &Work, source: &AptSource) -> Result<()> {
    let root = &work.root;
    if source.file != Path::new("/etc/apt/sources.list") {
        fs::remove_file(root.join("etc/apt/sources.list")).context("removing debootstrap's sources.list")?;
    }
    for file in [source.file.clone()].into_iter().chain(apt_proxy_configs()) {
        fs::copy(&file, inside(root, &file)).with_context(|| format!("copying {} into the root", file.display()))?;
    }
    trust_local_cas(root)?;
    let resolv = root.join("etc/resolv.conf");
    let _ = fs::remove_file(&resolv);
    fs::write(&resolv, fs::read("/etc/resolv.conf").context("reading /etc/resolv.conf")?)?;
    // Package scripts ask policy-rc.d before they start a service; there is no init here.
    let policy = root.join("usr/sbin/policy-rc.d");
    fs::write(&policy, "#!/bin/sh\n# fresh-check: packages start no services in this root.\nexit 101\n")?;
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o755))?;

    let bin = root.join("root/.cargo/bin");
    fs::create_dir_all(&bin)?;
    let rustup = host_home("CARGO_HOME", ".cargo")?.join("bin/rustup");
    fs::copy(&rustup, bin.join("rustup")).with_context(|| format!("copying {}", rustup.display()))?;
    for proxy in ["cargo", "rustc"] {
        symlink("rustup", bin.join(proxy))?;
    }
    Ok(())
}

/// The CA certificates the machine trusts beyond Debian's bundle (such as a TLS-inspecting
/// proxy's, without which crates.io cannot be reached), trusted in the root the same way.
fn trust_local_cas(root: &Path) -> Result<()> {
    let local = Path::new(LOCAL_CAS);
    let names: Vec<String> = fs::read_dir(local)
        .map(|dir| dir.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect())
        .unwrap_or_default();
    if names.is_empty() {
        return Ok(());
    }
    eprintln!("fresh-check: trusting the machine's local CA certificates ({})", names.join(" "));
    status(Command::new("cp").arg("-a").arg(local.join(".")).arg(inside(root, local)))?;
    output(Command::new("/usr/sbin/chroot").arg(root).arg("update-ca-certificates")).map(drop)
}

/// Where a host path goes in the root.
fn inside(root: &Path, host_path: &Path) -> PathBuf {
    root.join(host_path.strip_prefix("/").unwrap_or(host_path))
}

/// The host's /proc, /sys (with bpffs and BTF) and /dev, and its rustup home under an overlay
/// whose upper layer takes whatever the root writes there.
fn mount_host(work: &Work) -> Result<()> {
    let root = &work.root;
    for dir in ["proc", "sys", "dev"] {
        mount(&format!("/{dir}"), &root.join(dir), None, libc::MS_BIND | libc::MS_REC, None)?;
    }
    let lower = host_home("RUSTUP_HOME", ".rustup")?.canonicalize().context("the host's rustup home")?;
    let (upper, scratch) = (work.path.join("rustup.upper"), work.path.join("rustup.work"));
    let target = root.join("root/.rustup");
    for dir in [&upper, &scratch, &target] {
        fs::create_dir_all(dir)?;
    }
    if let Some(p) = [&lower, &upper, &scratch].iter().find(|p| p.to_string_lossy().contains([',', ':'])) {
        bail!("{} holds ',' or ':', which overlayfs options cannot carry", p.display());
    }
    let options = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), scratch.display());
    mount("overlay", &target, Some("overlay"), 0, Some(&options))
}

/// A clean clone of the workspace's HEAD in the root, plus the uncommitted files under the
/// given paths; says what it holds.
fn clone(root: &Path, uncommitted: &[PathBuf]) -> Result<String> {
    let workspace = workspace_root();
    let clone = root.join(CLONE);
    status(Command::new("git").args(["clone", "--quiet", "--no-hardlinks"]).arg(&workspace).arg(&clone))
        .context("cloning the workspace into the root")?;
    let commit = output(Command::new("git").arg("-C").arg(&clone).args(["log", "-1", "--format=%h (%s)"]))?;
    let commit = format!("commit {}", commit.trim());
    if uncommitted.is_empty() {
        return Ok(commit);
    }
    let listed = output(
        Command::new("git")
            .arg("-C")
            .arg(&workspace)
            .args(["ls-files", "-z", "--modified", "--others", "--exclude-standard", "--"])
            .args(uncommitted),
    )?;
    let mut files: Vec<&str> = listed.split('\0').filter(|f| !f.is_empty()).collect();
    files.sort_unstable();
    files.dedup();
    for file in &files {
        let (from, to) = (workspace.join(file), clone.join(file));
        if from.exists() {
            fs::create_dir_all(to.parent().context("a file in the clone")?)?;
            fs::copy(&from, &to).with_context(|| format!("copying {file} into the clone"))?;
        } else if let Err(e) = fs::remove_file(&to) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(e).with_context(|| format!("removing {file} from the clone"));
            }
        }
    }
    Ok(format!("{commit} with {} uncommitted files ({})", files.len(), files.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm
Components: main

Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
";

    #[test]
    fn deb822_source_gives_the_main_suite_uri() {
        assert_eq!(deb822_uri(DEB822, "bookworm").as_deref(), Some("http://deb.debian.org/debian"));
        assert_eq!(deb822_uri(DEB822, "bookworm-security").as_deref(), Some("http://deb.debian.org/debian-security"));
        assert_eq!(deb822_uri(DEB822, "trixie"), None);
    }

    #[test]
    fn deb822_source_skips_disabled_and_non_main_stanzas() {
        let text = "Types: deb\nURIs: http://a.example\nSuites: bookworm\nComponents: main\nEnabled: no\n\n\
                    types: deb\nuris: http://b.example\nsuites: bookworm\ncomponents: contrib\n\n\
                    Types: deb deb-src\nURIs:\n http://c.example http://d.example\nSuites: bookworm\n\
                    Components: main contrib\n";
        assert_eq!(deb822_uri(text, "bookworm").as_deref(), Some("http://c.example"));
    }

    #[test]
    fn one_line_source_gives_the_main_suite_uri() {
        let text = "# deb http://old.example bookworm main\n\
                    deb-src http://src.example bookworm main\n\
                    deb http://deb.debian.org/debian bookworm-updates main\n\
                    deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                    http://mirror.example/debian bookworm contrib main # the mirror\n";
        assert_eq!(one_line_uri(text, "bookworm").as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(one_line_uri("deb http://x.example bookworm contrib\n", "bookworm"), None);
        assert_eq!(
            one_line_uri("deb http://deb.debian.org/debian bookworm main\n", "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
    }

    #[test]
    fn mount_points_are_decoded_from_mountinfo() {
        let info = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    90 27 0:40 / /work/a\\040b/root/sys rw - sysfs sysfs rw\n";
        assert_eq!(mount_points(info), [PathBuf::from("/proc"), PathBuf::from("/work/a b/root/sys")]);
    }
}
