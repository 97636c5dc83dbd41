//! etcd I/O for the network config and subnet leases (v3 API, flannel's keys). No policy
//! here: what to claim and when to renew is `manager`'s and the daemon's business.

use std::{path::PathBuf, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use ipnet::Ipv4Net;

use super::{parse_subnet_key, subnet_key, Lease, LeaseAttrs, LeaseFormatError};

pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    /// Never logged or printed.
    pub password: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Retryable: etcd unreachable, timed out, or refused the request.
    #[error("etcd ({endpoints}): {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// Fatal: the TLS material cannot be read.
    #[error("reading {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--etcd-certfile and --etcd-keyfile go together")]
    HalfIdentity,
    #[error("{key}: {source}")]
    Format {
        key: String,
        #[source]
        source: LeaseFormatError,
    },
}

impl RegistryError {
    /// Whether waiting and trying again can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RegistryError::Etcd { .. })
    }
}

type Result<T> = std::result::Result<T, RegistryError>;

/// A listing of the subnet leases at one revision.
#[derive(Debug, Default)]
pub struct Listing {
    pub leases: Vec<Lease>,
    /// Keys under subnets/ whose key or value is not flannel's format (skipped).
    pub malformed: Vec<(String, LeaseFormatError)>,
    pub revision: i64,
}

/// A change under `<prefix>/subnets/`.
#[derive(Debug)]
pub enum LeaseEvent {
    Put(Lease),
    Delete(Ipv4Net),
    /// A key or value that is not flannel's format (skipped).
    Malformed(String, LeaseFormatError),
}

pub struct Registry {
    client: Client,
    prefix: String,
    endpoints: String,
}

impl Registry {
    pub async fn connect(o: &EtcdOptions) -> Result<Self> {
        let endpoints = o.endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            // As flannel's watch does (clientv3.WithRequireLeader): a member cut off from its
            // cluster answers "no leader" at once instead of serving a stale, silent stream.
            .with_require_leader(true);
        if let (Some(user), Some(pass)) = (&o.username, &o.password) {
            // etcd forgets a token after --auth-token-ttl (300 s by default) and all of them
            // when it restarts: log in again when a call is refused as "invalid auth token".
            opts = opts.with_user(user.clone(), pass.clone()).with_auto_token_refresh(true);
        }
        let read = |what: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|source| RegistryError::TlsFile { what, path: path.clone(), source })
        };
        if o.ca_file.is_some() || o.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &o.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read("CA file", ca)?));
            }
            match (&o.cert_file, &o.key_file) {
                (Some(c), Some(k)) => {
                    tls = tls.identity(Identity::from_pem(read("certificate", c)?, read("key", k)?));
                }
                (None, None) => {}
                _ => return Err(RegistryError::HalfIdentity),
            }
            opts = opts.with_tls(tls);
        }
        let client = Client::connect(&o.endpoints, Some(opts))
            .await
            .map_err(|source| RegistryError::Etcd { endpoints: endpoints.clone(), source })?;
        Ok(Self { client, prefix: o.prefix.trim_end_matches('/').to_string(), endpoints })
    }

    fn err(&self) -> impl FnOnce(etcd_client::Error) -> RegistryError + '_ {
        move |source| RegistryError::Etcd { endpoints: self.endpoints.clone(), source }
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    pub fn lease_key(&self, subnet: &Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key(subnet))
    }

    pub async fn get_config(&mut self) -> Result<Option<String>> {
        let key = self.config_key();
        let resp = self.client.get(key, None).await.map_err(|source| RegistryError::Etcd { endpoints: self.endpoints.clone(), source })?;
        Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    pub async fn put_config(&mut self, json: &str) -> Result<()> {
        let key = self.config_key();
        self.client.put(key, json, None).await.map_err(|source| RegistryError::Etcd { endpoints: self.endpoints.clone(), source })?;
        Ok(())
    }

    fn parse_kv(&self, key: &[u8], value: &[u8], etcd_lease: i64) -> std::result::Result<Lease, (String, LeaseFormatError)> {
        let key = String::from_utf8_lossy(key).into_owned();
        let last = key.strip_prefix(&self.subnets_prefix()).unwrap_or(&key);
        let subnet = parse_subnet_key(last).map_err(|e| (key.clone(), e))?;
        let attrs = LeaseAttrs::parse(value).map_err(|e| (key.clone(), e))?;
        Ok(Lease { subnet, attrs, etcd_lease })
    }

    pub async fn list_leases(&mut self) -> Result<Listing> {
        let prefix = self.subnets_prefix();
        let resp = self
            .client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|source| RegistryError::Etcd { endpoints: self.endpoints.clone(), source })?;
        let mut listing = Listing {
            revision: resp.header().map(|h| h.revision()).unwrap_or(0),
            ..Default::default()
        };
        for kv in resp.kvs() {
            match self.parse_kv(kv.key(), kv.value(), kv.lease()) {
                Ok(l) => listing.leases.push(l),
                Err(m) => listing.malformed.push(m),
            }
        }
        Ok(listing)
    }

    /// Claim `subnet` if nobody holds it: one transaction "version == 0 -> put" bound to a
    /// new etcd lease of `ttl`. Returns the etcd lease, or None if the subnet is taken.
    pub async fn claim(&mut self, subnet: &Ipv4Net, attrs: &LeaseAttrs, ttl: Duration) -> Result<Option<i64>> {
        let key = self.lease_key(subnet);
        let grant = self.client.lease_grant(ttl.as_secs().max(1) as i64, None).await.map_err(self.err())?;
        let id = grant.id();
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, attrs.to_json(), Some(PutOptions::new().with_lease(id)))]);
        let resp = self.client.txn(txn).await.map_err(self.err())?;
        if resp.succeeded() {
            Ok(Some(id))
        } else {
            // Don't leave an unused etcd lease behind.
            let _ = self.client.lease_revoke(id).await;
            Ok(None)
        }
    }

    /// Rewrite our lease's value (e.g. a new VtepMAC) under the same etcd lease.
    pub async fn update(&mut self, subnet: &Ipv4Net, attrs: &LeaseAttrs, etcd_lease: i64) -> Result<()> {
        let key = self.lease_key(subnet);
        let opts = (etcd_lease != 0).then(|| PutOptions::new().with_lease(etcd_lease));
        self.client.put(key, attrs.to_json(), opts).await.map_err(self.err())?;
        Ok(())
    }

    /// Refresh an etcd lease to its full TTL. Returns the new TTL in seconds; 0 or less
    /// means the lease no longer exists (its keys are gone).
    pub async fn keep_alive(&mut self, etcd_lease: i64) -> Result<i64> {
        let (mut keeper, mut stream) = self.client.lease_keep_alive(etcd_lease).await.map_err(self.err())?;
        keeper.keep_alive().await.map_err(self.err())?;
        let resp = stream.message().await.map_err(self.err())?;
        Ok(resp.map(|r| r.ttl()).unwrap_or(0))
    }

    pub async fn delete_lease(&mut self, subnet: &Ipv4Net) -> Result<bool> {
        let key = self.lease_key(subnet);
        let resp = self.client.delete(key, None).await.map_err(self.err())?;
        Ok(resp.deleted() > 0)
    }

    /// Seconds left on an etcd lease (-1: gone).
    pub async fn time_left(&mut self, etcd_lease: i64) -> Result<i64> {
        if etcd_lease == 0 {
            return Ok(-1);
        }
        let r = self.client.lease_time_to_live(etcd_lease, None).await.map_err(self.err())?;
        Ok(r.ttl())
    }

    pub async fn get_lease(&mut self, subnet: &Ipv4Net) -> Result<Option<Lease>> {
        let key = self.lease_key(subnet);
        let resp = self.client.get(key.clone(), None).await.map_err(self.err())?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => self
                .parse_kv(kv.key(), kv.value(), kv.lease())
                .map(Some)
                .map_err(|(key, source)| RegistryError::Format { key, source }),
        }
    }

    /// Watch the subnets from `revision` on.
    pub async fn watch(&mut self, revision: i64) -> Result<WatchStream> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(revision);
        self.client.watch(self.subnets_prefix(), Some(opts)).await.map_err(self.err())
    }

    /// Turn a watch response's events into lease events.
    pub fn events(&self, resp: &etcd_client::WatchResponse) -> Vec<LeaseEvent> {
        let mut out = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => match self.parse_kv(kv.key(), kv.value(), kv.lease()) {
                    Ok(l) => out.push(LeaseEvent::Put(l)),
                    Err((k, e)) => out.push(LeaseEvent::Malformed(k, e)),
                },
                EventType::Delete => {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let last = key.strip_prefix(&self.subnets_prefix()).unwrap_or(&key).to_string();
                    match parse_subnet_key(&last) {
                        Ok(s) => out.push(LeaseEvent::Delete(s)),
                        Err(e) => out.push(LeaseEvent::Malformed(key, e)),
                    }
                }
            }
        }
        out
    }
}
