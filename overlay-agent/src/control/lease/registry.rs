//! etcd I/O for the network config and subnet leases (v3 API, flannel's keys). No policy
//! here: what to claim and when to renew is `manager`'s and the daemon's business.

use std::{path::PathBuf, time::Duration};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions, WatchStream,
};

use super::{parse_lease_key, Lease, LeaseAttrs, LeaseFormatError, LeaseKey};

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
    /// From etcd or the way to it. Retried unless `fatal_hint` names something to fix.
    #[error("etcd ({endpoints}): {}{}", crate::error_chain(cause), fatal_hint(cause).map(|h| format!(" ({h})")).unwrap_or_default())]
    Etcd { endpoints: String, cause: etcd_client::Error },
    /// Fatal: the TLS material cannot be read.
    #[error("reading {what} {path}: {cause}")]
    TlsFile { what: &'static str, path: PathBuf, cause: std::io::Error },
    #[error("--etcd-certfile and --etcd-keyfile go together")]
    HalfIdentity,
    /// Fatal: TLS flags with a plain-HTTP endpoint (the client would never use them).
    #[error("--etcd-cafile/--etcd-certfile are given, but {0} is plain HTTP: write it https://, as the seed's --etcd-endpoints do")]
    TlsWithHttp(String),
    #[error("{key}: {cause}")]
    Format { key: String, cause: LeaseFormatError },
}

impl RegistryError {
    /// Whether waiting and trying again can help: etcd unreachable, without a leader,
    /// timing out or overloaded; never a refused password, a missing permission or a
    /// malformed request, which stay so however long the agent waits.
    pub fn is_retryable(&self) -> bool {
        matches!(self, RegistryError::Etcd { cause, .. } if fatal_hint(cause).is_none()) && !self.is_lease_gone()
    }

    /// etcd says the lease (etcd's lease ID) no longer exists.
    pub fn is_lease_gone(&self) -> bool {
        matches!(self, RegistryError::Etcd { cause: etcd_client::Error::GRpcStatus(s), .. } if s.code() == tonic::Code::NotFound)
    }
}

/// For an error no retry can fix, what the operator should change (`None`: retry).
/// Codes and messages as etcd's v3 API returns them (api/v3rpc/rpctypes).
pub fn fatal_hint(e: &etcd_client::Error) -> Option<&'static str> {
    use etcd_client::Error as E;
    use tonic::Code;
    match e {
        E::GRpcStatus(s) => match s.code() {
            Code::InvalidArgument if s.message().contains("authentication failed") => {
                Some("etcd refused the user name or password: check --etcd-username and --etcd-password (or FLANNELD_ETCD_PASSWORD)")
            }
            Code::InvalidArgument if s.message().contains("user name is empty") => {
                Some("etcd has authentication on: give --etcd-username and --etcd-password")
            }
            Code::FailedPrecondition if s.message().contains("user name not found") => {
                Some("etcd does not know this user: check --etcd-username")
            }
            Code::FailedPrecondition if s.message().contains("authentication is not enabled") => {
                Some("etcd has authentication off: drop --etcd-username and --etcd-password")
            }
            Code::PermissionDenied => Some(
                "the etcd user may not read or write the network's keys: grant its role readwrite on the prefix \
                 (etcdctl role grant-permission --prefix=true ROLE readwrite /coreos.com/network/), or fix --etcd-prefix",
            ),
            Code::InvalidArgument => Some("etcd refused the request as malformed"),
            Code::Unimplemented => Some("the endpoint does not speak etcd's v3 API: check --etcd-endpoints"),
            _ => None,
        },
        E::InvalidArgs(_) | E::InvalidUri(_) | E::InvalidMetadataValue(_) => Some("check --etcd-endpoints and the TLS flags"),
        _ => None,
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
#[derive(Clone, Debug)]
pub enum LeaseEvent {
    Put(Lease),
    Delete(LeaseKey),
    /// A key or value that is not flannel's format (skipped).
    Malformed(String, LeaseFormatError),
}

#[derive(Clone)]
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
            std::fs::read(path).map_err(|cause| RegistryError::TlsFile { what, path: path.clone(), cause })
        };
        if o.ca_file.is_some() || o.cert_file.is_some() {
            if let Some(plain) = o.endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(RegistryError::TlsWithHttp(plain.clone()));
            }
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
            .map_err(|cause| RegistryError::Etcd { endpoints: endpoints.clone(), cause })?;
        Ok(Self { client, prefix: o.prefix.trim_end_matches('/').to_string(), endpoints })
    }

    fn err(&self) -> impl FnOnce(etcd_client::Error) -> RegistryError + '_ {
        move |cause| RegistryError::Etcd { endpoints: self.endpoints.clone(), cause }
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// The etcd key of a lease (`subnet`: its IPv4 subnet, or both of a dual-stack lease).
    pub fn lease_key(&self, subnet: impl Into<LeaseKey>) -> String {
        format!("{}{}", self.subnets_prefix(), subnet.into().name())
    }

    pub async fn get_config(&mut self) -> Result<Option<String>> {
        let key = self.config_key();
        let resp = self.client.get(key, None).await.map_err(|cause| RegistryError::Etcd { endpoints: self.endpoints.clone(), cause })?;
        Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    pub async fn put_config(&mut self, json: &str) -> Result<()> {
        let key = self.config_key();
        self.client.put(key, json, None).await.map_err(|cause| RegistryError::Etcd { endpoints: self.endpoints.clone(), cause })?;
        Ok(())
    }

    fn parse_kv(&self, key: &[u8], value: &[u8], etcd_lease: i64) -> std::result::Result<Lease, (String, LeaseFormatError)> {
        let key = String::from_utf8_lossy(key).into_owned();
        let last = key.strip_prefix(&self.subnets_prefix()).unwrap_or(&key);
        let k = parse_lease_key(last).map_err(|e| (key.clone(), e))?;
        let attrs = LeaseAttrs::parse(value).map_err(|e| (key.clone(), e))?;
        Ok(Lease { subnet: k.v4, subnet6: k.v6, attrs, etcd_lease })
    }

    pub async fn list_leases(&mut self) -> Result<Listing> {
        let prefix = self.subnets_prefix();
        let resp = self
            .client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|cause| RegistryError::Etcd { endpoints: self.endpoints.clone(), cause })?;
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
    /// new etcd lease of `ttl`. Returns the etcd lease (a lease this node already holds on it,
    /// if so), or None if another node holds the subnet.
    pub async fn claim(&mut self, subnet: impl Into<LeaseKey>, attrs: &LeaseAttrs, ttl: Duration) -> Result<Option<i64>> {
        let subnet: LeaseKey = subnet.into();
        let key = self.lease_key(subnet);
        let grant = self.client.lease_grant(ttl.as_secs().max(1) as i64, None).await.map_err(self.err())?;
        let id = grant.id();
        // Nobody holds its IPv4 subnet in either of flannel's key forms: the plain key, or a
        // dual-stack node's "<key>&<IPv6 subnet>" (every key in that range must be absent;
        // ours, if dual-stack, is one of them). An IPv6-only key (no IPv4 subnet): the key
        // itself; its IPv6 subnet is looked for below.
        let compare = if subnet.is_ipv6_only() {
            vec![Compare::version(key.clone(), CompareOp::Equal, 0)]
        } else {
            let (dual_start, dual_end) = super::dual_stack_range(&self.subnets_prefix(), &subnet.v4);
            vec![
                Compare::version(self.lease_key(&subnet.v4), CompareOp::Equal, 0),
                Compare::version(dual_start, CompareOp::Equal, 0).with_range(dual_end),
            ]
        };
        let txn = Txn::new()
            .when(compare)
            .and_then([TxnOp::put(key.clone(), attrs.to_json(), Some(PutOptions::new().with_lease(id)))])
            // Taken: by whom? (read in the same transaction)
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.client.txn(txn).await.map_err(self.err())?;
        if resp.succeeded() {
            // The IPv6 subnet is not part of what the transaction could compare (another
            // node's key names it after its own IPv4 subnet): looked for now. Two claims of
            // one IPv6 subnet: the earlier keeps it, the later gives its claim up and chooses
            // again (`None`: taken).
            let revision = resp.header().map(|h| h.revision()).unwrap_or(i64::MAX);
            if let Some(v6) = subnet.v6 {
                if self.ipv6_claimed_before(&key, v6, revision).await? {
                    let _ = self.client.lease_revoke(id).await;
                    return Ok(None);
                }
            }
            return Ok(Some(id));
        }
        // Don't leave an unused etcd lease behind.
        let _ = self.client.lease_revoke(id).await;
        // Held by this node already: an earlier claim whose answer was lost (its RPC timed out
        // after etcd committed it, and the daemon tried again). That lease is ours: taking it
        // "taken" would have this node move on and hold two.
        let ours = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| {
                LeaseAttrs::parse(kv.value()).ok().filter(|a| attrs.same_node(a)).map(|_| kv.lease())
            }),
            _ => None,
        });
        Ok(ours)
    }

    /// Whether a key other than `ours` names IPv6 subnet `v6` and was created before
    /// `revision`.
    async fn ipv6_claimed_before(&mut self, ours: &str, v6: ipnet::Ipv6Net, revision: i64) -> Result<bool> {
        let suffix = format!("&{}-{}", v6.network(), v6.prefix_len());
        let resp = self
            .client
            .get(self.subnets_prefix(), Some(GetOptions::new().with_prefix().with_keys_only()))
            .await
            .map_err(self.err())?;
        Ok(resp.kvs().iter().any(|kv| {
            let k = String::from_utf8_lossy(kv.key());
            k != ours && k.ends_with(&suffix) && kv.create_revision() < revision
        }))
    }

    /// Rewrite our lease's value (e.g. a new VtepMAC) under the same etcd lease.
    pub async fn update(&mut self, subnet: impl Into<LeaseKey>, attrs: &LeaseAttrs, etcd_lease: i64) -> Result<()> {
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

    /// End an etcd lease now (its keys go with it).
    pub async fn revoke(&mut self, etcd_lease: i64) -> Result<()> {
        self.client.lease_revoke(etcd_lease).await.map_err(self.err())?;
        Ok(())
    }

    pub async fn delete_lease(&mut self, subnet: impl Into<LeaseKey>) -> Result<bool> {
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

    pub async fn get_lease(&mut self, subnet: impl Into<LeaseKey>) -> Result<Option<Lease>> {
        let key = self.lease_key(subnet);
        let resp = self.client.get(key.clone(), None).await.map_err(self.err())?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => self
                .parse_kv(kv.key(), kv.value(), kv.lease())
                .map(Some)
                .map_err(|(key, cause)| RegistryError::Format { key, cause }),
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
                    match parse_lease_key(&last) {
                        Ok(s) => out.push(LeaseEvent::Delete(s)),
                        Err(e) => out.push(LeaseEvent::Malformed(key, e)),
                    }
                }
            }
        }
        out
    }
}
