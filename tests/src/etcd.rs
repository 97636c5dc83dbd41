//! A real etcd (Debian's etcd-server 3.4) for a test cluster, inside the cluster's underlay
//! namespace so that agents in node namespaces reach it on a namespace-private address.
//! Optionally TLS with client certificates, from a CA the test makes with openssl.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use crate::{run, wait_until, Netns};

pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// A CA, a server certificate for `ip` and a client certificate, in `dir`.
    pub fn generate(dir: &Path, ip: IpAddr) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let p = |n: &str| dir.join(n);
        let ssl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir)).context("openssl (apt package openssl)");
        ssl(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=overlay-test-ca"])?;
        for (name, cn, ext) in [
            ("server", "etcd", format!("subjectAltName=IP:{ip},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")),
            ("client", "flanneld", "extendedKeyUsage=clientAuth\n".to_string()),
        ] {
            fs::write(p(&format!("{name}.ext")), ext)?;
            ssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &format!("{name}-key.pem"), "-out", &format!("{name}.csr"), "-subj", &format!("/CN={cn}")])?;
            ssl(&[
                "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                "-out", &format!("{name}.pem"), "-days", "2", "-extfile", &format!("{name}.ext"),
            ])?;
        }
        Ok(Self {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server-key.pem"),
            client_cert: p("client.pem"),
            client_key: p("client-key.pem"),
        })
    }
}

pub struct Etcd {
    child: Child,
    /// How it was started, to start it again (same data directory) after `stop`.
    args: Vec<std::ffi::OsString>,
    dir: PathBuf,
    ns: Netns,
    pub endpoint: String,
    pub tls: Option<TlsFiles>,
    pub log: PathBuf,
    /// `user:password` for etcdctl once authentication is on.
    pub user: Option<String>,
}

impl Etcd {
    /// Start etcd in `ns`, serving clients on `ip`:2379 (either family), with `extra` flags;
    /// wait until it is healthy.
    pub fn start(ns: &Netns, ip: IpAddr, dir: &Path, tls: bool, extra: &[String]) -> Result<Self> {
        let data = dir.join("etcd-data");
        fs::create_dir_all(&data)?;
        let tls = if tls { Some(TlsFiles::generate(&dir.join("tls"), ip)?) } else { None };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let host = match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        let endpoint = format!("{scheme}://{host}:2379");
        let log = dir.join("etcd.log");
        let mut args: Vec<std::ffi::OsString> = vec!["--name".into(), "default".into(), "--data-dir".into(), data.into()];
        for a in ["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint] {
            args.push(a.into());
        }
        for a in ["--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380"] {
            args.push(a.into());
        }
        args.extend(["--initial-cluster".into(), "default=http://127.0.0.1:2380".into()]);
        if let Some(t) = &tls {
            args.extend(["--cert-file".into(), t.server_cert.clone().into(), "--key-file".into(), t.server_key.clone().into()]);
            args.extend(["--trusted-ca-file".into(), t.ca.clone().into(), "--client-cert-auth".into()]);
        }
        args.extend(extra.iter().map(Into::into));
        let child = Self::spawn(ns, &args, dir)?;
        let etcd = Self { child, args, dir: dir.to_path_buf(), ns: ns.handle(), endpoint, tls, log, user: None };
        etcd.wait_healthy()?;
        Ok(etcd)
    }

    fn spawn(ns: &Netns, args: &[std::ffi::OsString], dir: &Path) -> Result<Child> {
        let out = fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.log"))?;
        let err = fs::OpenOptions::new().create(true).append(true).open(dir.join("etcd.stderr.log"))?;
        ns.command("etcd")
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting etcd (apt package etcd-server)")
    }

    fn wait_healthy(&self) -> Result<()> {
        if !wait_until(Duration::from_secs(30), || self.etcdctl(&["endpoint", "health"]).is_ok()) {
            let err = fs::read_to_string(self.dir.join("etcd.stderr.log")).unwrap_or_default();
            bail!("etcd did not become healthy within 30 s:\n{}", tail(&err, 40));
        }
        Ok(())
    }

    /// Stop etcd (SIGKILL, our child by pid): an outage.
    pub fn stop(&mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }

    /// Start it again on the same data directory and wait until it is healthy.
    pub fn restart(&mut self) -> Result<()> {
        self.child = Self::spawn(&self.ns, &self.args, &self.dir)?;
        self.wait_healthy()
    }

    /// Put many keys with a few etcdctl transactions (100 keys each). Values must not contain
    /// whitespace (etcdctl's txn syntax).
    pub fn put_many(&self, kvs: &[(String, String)]) -> Result<()> {
        use std::io::Write as _;
        for chunk in kvs.chunks(100) {
            // etcdctl txn reads: compares, blank line, success ops, blank line, failure ops,
            // blank line.
            let mut txn = String::from("\n");
            for (k, v) in chunk {
                txn += &format!("put {k} {v}\n");
            }
            txn += "\n\n";
            let mut child = self.etcdctl_command().arg("txn").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
            child.stdin.take().context("stdin")?.write_all(txn.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("etcdctl txn: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    }

    /// The store's current revision.
    pub fn revision(&self) -> Result<i64> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["Status"]["header"]["revision"].as_i64().context("no revision in endpoint status")
    }

    /// Run `etcdctl` (v3 API) against this etcd, from its namespace.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        run(self.etcdctl_command().args(args))
    }

    /// An `etcdctl` command (v3 API, endpoint and TLS flags set) to add arguments to.
    pub fn etcdctl_command(&self) -> Command {
        let mut cmd = self.ns.command("etcdctl");
        cmd.env("ETCDCTL_API", "3").arg(format!("--endpoints={}", self.endpoint)).arg("--command-timeout=10s");
        if let Some(u) = &self.user {
            cmd.arg(format!("--user={u}"));
        }
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()));
        }
        cmd
    }

    /// The agent flags that reach this etcd, spelled as the seed spells them (Go style).
    pub fn agent_flags(&self) -> Vec<String> {
        let mut f = vec![format!("--etcd-endpoints={}", self.endpoint)];
        if let Some(t) = &self.tls {
            f.push(format!("-etcd-cafile={}", t.ca.display()));
            f.push(format!("--etcd-certfile={}", t.client_cert.display()));
            f.push(format!("--etcd-keyfile={}", t.client_key.display()));
        }
        f
    }

    /// How many KV reads (Range RPCs) etcd has answered, from its /metrics: proof that a
    /// client keeps polling. Plain-HTTP etcd only.
    pub fn reads_served(&self) -> Result<u64> {
        let addr: std::net::SocketAddrV4 =
            self.endpoint.strip_prefix("http://").context("etcd's metrics are read over plain HTTP only")?.parse()?;
        let (status, body) = crate::traffic::http_get(&self.ns, addr, "/metrics")?;
        if status != 200 {
            bail!("etcd /metrics answered {status}");
        }
        body.lines()
            .find(|l| l.starts_with("grpc_server_handled_total{") && l.contains(r#"grpc_code="OK""#) && l.contains(r#"grpc_method="Range""#))
            .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .map(|v| v as u64)
            .context("no Range count in etcd's /metrics")
    }

    /// Mutable access (stop/restart) through the cluster.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Our own child, by pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
