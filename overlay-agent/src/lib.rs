//! The node agent: brings up the eBPF data plane of one node and keeps its maps.
//!
//! Grouped by concern: `control` (config, leases, routes from etcd, the daemon), `datapath`
//! (programs and maps), `host` (netlink, iptables, files, health). The modules are also
//! re-exported at the crate root under their own names.
pub mod cli;
pub mod control;
pub mod datapath;
pub mod host;

pub use control::{config, daemon, lease, reconcile};
pub use datapath::{dataplane, maps, monitor, report, tun};
pub use host::{docker_opts, health, iptables, netdev, subnet_file};

use anyhow::{Context as _, Result};

/// An error and its causes in one line ("a: b: c"), for messages whose error types keep
/// their causes as fields (so that `{:#}` does not print each cause twice).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s = format!("{s}: {t}");
        }
        next = c.source();
    }
    s
}

/// Forward the programs' aya-log records (failure paths only) to our log, for as long as the
/// returned future is polled.
pub fn program_logs(ebpf: &mut aya::Ebpf) -> impl std::future::Future<Output = Result<()>> + 'static {
    let logger = aya_log::EbpfLogger::init(ebpf);
    async move {
        let logger = match logger {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "program logs unavailable");
                return std::future::pending().await;
            }
        };
        // SAFETY: the logger owns its ring buffer's fd, which stays open and unchanged for
        // as long as the AsyncFd owns the logger.
        let mut fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("polling the program log ring buffer")?;
        loop {
            let mut guard = fd.readable_mut().await.context("program log ring buffer")?;
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }
}
