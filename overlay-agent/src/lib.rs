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
pub use host::{cni, docker_opts, health, iptables, netdev, nftables, subnet_file, tc, wireguard};

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

#[cfg(test)]
mod tests {
    use super::*;

    /// What an operator reads of an error names each cause once, with `{:#}` (main's "error:"
    /// line) as with `%e` (log fields).
    #[test]
    fn error_causes_are_printed_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied (os error 13)");
        let errors: Vec<anyhow::Error> = vec![
            host::subnet_file::SubnetFileError::Write { path: "/run/flannel/subnet.env".into(), cause: io() }.into(),
            host::iptables::IptablesError::Spawn { cmd: "iptables -S".into(), cause: io() }.into(),
            control::lease::registry::RegistryError::TlsFile { what: "CA file", path: "/etc/ca.pem".into(), cause: io() }.into(),
        ];
        for e in errors {
            let text = format!("{:#}", anyhow::Error::from(e).context("starting"));
            assert_eq!(text.matches("permission denied").count(), 1, "{text}");
        }
        let status = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied("etcdserver: permission denied"));
        let e = control::lease::registry::RegistryError::Etcd { endpoints: "http://e:2379".into(), cause: status };
        let text = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(text.matches("etcdserver: permission denied").count(), 1, "{text}");
        assert!(text.contains("grant-permission"), "the fix is named: {text}");
        assert_eq!(error_chain(&std::io::Error::other("a")), "a");
    }
}
