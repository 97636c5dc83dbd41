//! The lease keeper: renews this node's etcd lease on its own schedule, in a task of its own,
//! whatever the watch is doing (as flannel's lease monitor does). Before, renewals ran between
//! watch events only, so a watch that kept failing stopped them and the lease expired.
//!
//! It reports to the daemon by message: renewed (with the TTL etcd granted), gone (etcd no
//! longer knows the lease: choose again), or a fatal error. Time comes from tokio's clock, so
//! the schedule is tested on paused time without etcd.

use std::{future::Future, time::Duration};

use tokio::{sync::mpsc, time::Instant};

use super::registry::{Registry, RegistryError};

/// What the keeper tells the daemon.
#[derive(Debug, PartialEq, Eq)]
pub enum KeeperEvent {
    /// etcd refreshed the lease to `ttl_secs`.
    Renewed { ttl_secs: i64 },
    /// etcd no longer knows the lease (expired, revoked): its key is gone.
    Gone,
    /// An error retrying cannot fix (see `RegistryError::is_retryable`).
    Fatal(String),
}

/// One renewal: the TTL etcd granted (0 or less: the lease is gone).
pub trait Renew: Send + 'static {
    fn renew(&mut self, etcd_lease: i64) -> impl Future<Output = Result<i64, RegistryError>> + Send;
}

impl Renew for Registry {
    fn renew(&mut self, etcd_lease: i64) -> impl Future<Output = Result<i64, RegistryError>> + Send {
        self.keep_alive(etcd_lease)
    }
}

/// When to renew a lease of `ttl`: `margin` before it expires (flannel's
/// --subnet-lease-renew-margin), or halfway if the margin is not shorter than the TTL.
pub fn renew_after(margin: Duration, ttl: Duration) -> Duration {
    let ttl = ttl.max(Duration::from_secs(1));
    if margin < ttl {
        ttl - margin
    } else {
        ttl / 2
    }
}

/// How long to wait before trying a failed renewal again: often enough to renew well before
/// the lease runs out, at most a minute.
pub fn retry_after(ttl: Duration) -> Duration {
    (ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Keep `etcd_lease` alive until it is gone, an error is fatal, or the receiver is dropped.
/// The first renewal is due at `first`; `ttl` is the lease's granted TTL.
pub async fn keep<R: Renew>(mut renewer: R, etcd_lease: i64, ttl: Duration, margin: Duration, first: Instant, tx: mpsc::UnboundedSender<KeeperEvent>) {
    let mut due = first;
    let mut ttl = ttl;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = tx.closed() => return,
        }
        match renewer.renew(etcd_lease).await {
            Ok(granted) if granted > 0 => {
                ttl = Duration::from_secs(granted as u64);
                due = Instant::now() + renew_after(margin, ttl);
                if tx.send(KeeperEvent::Renewed { ttl_secs: granted }).is_err() {
                    return;
                }
            }
            Ok(_) => {
                let _ = tx.send(KeeperEvent::Gone);
                return;
            }
            Err(e) if e.is_lease_gone() => {
                let _ = tx.send(KeeperEvent::Gone);
                return;
            }
            Err(e) if e.is_retryable() => {
                let again = retry_after(ttl);
                tracing::warn!(error = %e, retry_in_ms = again.as_millis() as u64, "renewing the lease failed; retrying");
                due = Instant::now() + again;
            }
            Err(e) => {
                let _ = tx.send(KeeperEvent::Fatal(format!("renewing the lease: {e}")));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// Answers renewals from a script, recording when each was asked for.
    #[derive(Clone, Default)]
    struct Script {
        answers: Arc<Mutex<VecDeque<Result<i64, RegistryError>>>>,
        asked_at: Arc<Mutex<Vec<Instant>>>,
    }

    impl Renew for Script {
        fn renew(&mut self, _lease: i64) -> impl Future<Output = Result<i64, RegistryError>> + Send {
            self.asked_at.lock().unwrap().push(Instant::now());
            let answer = self.answers.lock().unwrap().pop_front().unwrap_or(Ok(10));
            async move { answer }
        }
    }

    fn unavailable() -> Result<i64, RegistryError> {
        Err(RegistryError::Etcd { endpoints: "e".into(), cause: etcd_client::Error::GRpcStatus(tonic::Status::unavailable("down")) })
    }

    #[test]
    fn renewal_is_due_a_margin_before_expiry_or_halfway() {
        assert_eq!(renew_after(Duration::from_secs(3600), Duration::from_secs(86400)), Duration::from_secs(82800));
        assert_eq!(renew_after(Duration::from_secs(60), Duration::from_secs(4)), Duration::from_secs(2));
        assert_eq!(retry_after(Duration::from_secs(86400)), Duration::from_secs(60));
        assert_eq!(retry_after(Duration::from_secs(4)), Duration::from_secs(1));
    }

    /// On paused time: renewals every TTL minus margin; a failure is retried within the TTL
    /// (so the lease survives an etcd hiccup); a lease etcd no longer knows ends the keeper.
    #[tokio::test(start_paused = true)]
    async fn renews_on_schedule_retries_failures_and_reports_a_lost_lease() {
        let script = Script::default();
        script.answers.lock().unwrap().extend([Ok(10), unavailable(), unavailable(), Ok(10), Ok(0)]);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let margin = Duration::from_secs(4);
        tokio::spawn(keep(script.clone(), 7, Duration::from_secs(10), margin, start + Duration::from_secs(6), tx));
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        assert_eq!(events, vec![KeeperEvent::Renewed { ttl_secs: 10 }, KeeperEvent::Renewed { ttl_secs: 10 }, KeeperEvent::Gone]);
        let at: Vec<u64> = script.asked_at.lock().unwrap().iter().map(|t| (*t - start).as_secs()).collect();
        // 6 (first), 12 (6 later), 13 and 14 (retries, 1 s apart), then 20 (6 after 14).
        assert_eq!(at, vec![6, 12, 13, 14, 20]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_error_is_reported_and_a_dropped_receiver_stops_the_keeper() {
        let script = Script::default();
        let denied = RegistryError::Etcd { endpoints: "e".into(), cause: etcd_client::Error::GRpcStatus(tonic::Status::permission_denied("etcdserver: permission denied")) };
        script.answers.lock().unwrap().push_back(Err(denied));
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(keep(script.clone(), 7, Duration::from_secs(10), Duration::from_secs(4), Instant::now(), tx));
        assert!(matches!(rx.recv().await, Some(KeeperEvent::Fatal(m)) if m.contains("permission")));
        assert_eq!(rx.recv().await, None);

        let quiet = Script::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(keep(quiet.clone(), 7, Duration::from_secs(10), Duration::from_secs(4), Instant::now() + Duration::from_secs(6), tx));
        drop(rx);
        task.await.unwrap();
        assert!(quiet.asked_at.lock().unwrap().is_empty(), "a keeper nobody listens to must not renew");
    }
}
