//! etcd access for the driver: connecting, the network config, and retrying what etcd
//! cannot answer now with a jittered exponential backoff (the data plane keeps forwarding
//! with the last known routes meanwhile).

use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::{
    config::{self, NetworkConfig},
    lease::registry::{EtcdOptions, Registry, RegistryError},
};

/// Exponential backoff between etcd retries (100 ms doubling to 5 s), with jitter: each
/// wait is drawn from the upper half of its step, so that nodes which lost etcd together do
/// not all come back in the same instant.
pub(super) struct Backoff(Duration);
impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);
    pub(super) fn new() -> Self {
        Self(Self::MIN)
    }
    /// The next wait (and the step grows).
    pub(super) fn next(&mut self) -> Duration {
        let step = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
    pub(super) fn reset(&mut self) {
        self.0 = Self::MIN;
    }
}

/// A watch that lasted this long was healthy: the next failure starts the backoff afresh.
pub(super) const WATCH_STABLE: Duration = Duration::from_secs(30);

/// Run `op` until it succeeds or fails with an error retrying cannot fix.
pub(super) async fn retry<T, F>(what: &str, reg: &mut Registry, mut op: F) -> Result<T>
where
    F: for<'a> FnMut(&'a mut Registry) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, RegistryError>> + 'a>>,
{
    let mut backoff = Backoff::new();
    loop {
        match op(reg).await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                let wait = backoff.next();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{what} failed; etcd unavailable, retrying (the data plane keeps forwarding)");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e).context(what.to_string()),
        }
    }
}

pub(super) async fn connect(opts: &EtcdOptions) -> Result<Registry> {
    let mut backoff = Backoff::new();
    loop {
        match Registry::connect(opts).await {
            Ok(r) => return Ok(r),
            Err(e) if e.is_retryable() => {
                let wait = backoff.next();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot reach etcd; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e).context("connecting to etcd"),
        }
    }
}

/// Wait for a network config at `<prefix>/config` (logged retries, as flanneld does);
/// refuse an invalid one.
pub(super) async fn network_config(reg: &mut Registry) -> Result<NetworkConfig> {
    let mut logged = false;
    loop {
        let raw = retry("reading the network config", reg, |r| Box::pin(r.get_config())).await?;
        match raw {
            Some(json) => {
                let cfg = config::parse(&json).with_context(|| format!("invalid network config at {}", reg.config_key()))?;
                for w in &cfg.warnings {
                    tracing::warn!("network config: {w}");
                }
                return Ok(cfg);
            }
            None => {
                if !logged {
                    tracing::warn!(key = %reg.config_key(), "no network config yet; waiting for one (etcdctl put {} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}')", reg.config_key());
                    logged = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new();
        let mut step = Backoff::MIN;
        for _ in 0..12 {
            let w = b.next();
            assert!(w >= step / 2 && w <= step, "{w:?} outside [{:?}, {step:?}]", step / 2);
            step = (step * 2).min(Backoff::MAX);
        }
        assert_eq!(b.0, Backoff::MAX);
        // Jitter: many draws at the cap are not all the same.
        let draws: std::collections::BTreeSet<u128> = (0..50).map(|_| b.next().as_millis()).collect();
        assert!(draws.len() > 10, "{draws:?}");
        b.reset();
        assert!(b.next() <= Backoff::MIN);
    }
}
