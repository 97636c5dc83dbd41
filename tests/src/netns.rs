//! Named network namespaces (`ip netns`), deleted when their owner drops them, and ways to
//! run code inside one: a child process through `nsenter --net` (which, unlike
//! `ip netns exec`, keeps /sys/fs/bpf and the cgroup mounts), or a thread that `setns`es.

use std::{fs::File, os::fd::AsRawFd as _, process::Command};

use anyhow::{bail, Context as _, Result};

pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    /// Create the namespace `name` (which must not exist yet).
    pub fn new(name: &str) -> Result<Self> {
        crate::ip(&["netns", "add", name]).with_context(|| format!("creating netns {name}"))?;
        Ok(Self { name: name.to_string(), owned: true })
    }

    /// A handle that does not delete the namespace when dropped.
    pub fn handle(&self) -> Self {
        Self { name: self.name.clone(), owned: false }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path())).arg(program);
        c
    }

    /// Run `program args...` inside; its stdout, or an error with its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        crate::run(self.command(program).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
    }

    /// Run `f` on a thread that has entered this namespace (sockets it opens live there).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns({path}): {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
    }

    /// Run `f` inside this namespace and wait for it.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        match self.spawn(f).join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = crate::ip(&["netns", "del", &self.name]) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}
