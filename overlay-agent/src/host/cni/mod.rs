//! The `flannel` CNI plugin, with flannel's contract (flannel-io/cni-plugin, flannel.go and
//! flannel_linux.go), so kube-flannel's `cni-conf.json` works unchanged: the agent run under
//! the name `flannel` (a link or copy in the CNI plugin directory; argv[0] decides, as for
//! busybox) reads the subnet file the agent writes and delegates to the standard `bridge` and
//! `host-local` plugins. ADD renders the delegate's configuration from the subnet file, saves
//! it under `dataDir` per container and runs the delegate; DEL runs the delegate with the
//! saved configuration (so it works after the subnet file is gone, and twice). Where ours
//! does more than flannel's: CHECK runs the delegate's CHECK (flannel's does nothing), STATUS
//! says whether the agent has written the subnet file, and `cni0` holding an address of an
//! earlier lease is said plainly (or fixed, when no container uses it).
//!
//! Errors are CNI error objects on stdout and a non-zero exit. Codes: the spec's where one
//! fits (1 incompatible version, 4 environment, 6 decoding, 7 invalid config, 11 try again
//! later, 50 plugin not available), and ours from 100: [`ERR_SUBNET_FILE`],
//! [`ERR_DELEGATE_MISSING`], [`ERR_BRIDGE_ADDRESS`]. A delegate's own error is passed on as it
//! gave it.

use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{json, Map, Value};

/// The CNI versions flannel's plugin accepts (containernetworking/cni's `version.All`).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version VERSION reports as its own (the library's `Current()`).
pub const CURRENT_VERSION: &str = "1.1.0";
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

pub const ERR_INCOMPATIBLE_VERSION: u32 = 1;
pub const ERR_UNKNOWN_CONTAINER: u32 = 3;
pub const ERR_ENV: u32 = 4;
pub const ERR_IO: u32 = 5;
pub const ERR_DECODING: u32 = 6;
pub const ERR_INVALID_CONFIG: u32 = 7;
pub const ERR_TRY_AGAIN_LATER: u32 = 11;
pub const ERR_PLUGIN_NOT_AVAILABLE: u32 = 50;
/// The subnet file exists but says something flannel's plugin would not take.
pub const ERR_SUBNET_FILE: u32 = 100;
/// The delegate plugin (`bridge`, ...) is in none of CNI_PATH's directories.
pub const ERR_DELEGATE_MISSING: u32 = 101;
/// The bridge holds an address of another subnet (the node's lease changed).
pub const ERR_BRIDGE_ADDRESS: u32 = 102;
pub const ERR_INTERNAL: u32 = 999;

/// A CNI error object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: String::new() }
    }
    fn details(mut self, d: impl Into<String>) -> Self {
        self.details = d.into();
        self
    }
    /// The object as the spec writes it (`details` only when there are some).
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, "; {}", self.details)?;
        }
        Ok(())
    }
}

/// What a runtime hands a plugin in its environment.
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
}

impl CniEnv {
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Self {
        let v = |k: &str| get(k).unwrap_or_default();
        Self {
            command: v("CNI_COMMAND"),
            container_id: v("CNI_CONTAINERID"),
            netns: v("CNI_NETNS"),
            ifname: v("CNI_IFNAME"),
            args: v("CNI_ARGS"),
            path: v("CNI_PATH"),
        }
    }

    /// The skel's checks: the variables each command needs, a container ID and an interface
    /// name the runtime may use.
    fn validate(&self) -> Result<(), CniError> {
        let needs = |var: &str| match (self.command.as_str(), var) {
            (_, "CNI_COMMAND") => true,
            ("ADD" | "CHECK", _) => true,
            ("DEL", v) => v != "CNI_NETNS",
            ("GC" | "STATUS", "CNI_PATH") => true,
            _ => false,
        };
        let vars = [
            ("CNI_COMMAND", &self.command),
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_PATH", &self.path),
        ];
        let missing: Vec<&str> = vars.iter().filter(|(k, v)| v.is_empty() && needs(k)).map(|(k, _)| *k).collect();
        if !missing.is_empty() {
            return Err(CniError::new(ERR_ENV, format!("required env variables [{}] missing", missing.join(","))));
        }
        if matches!(self.command.as_str(), "ADD" | "CHECK" | "DEL") {
            if !valid_name(&self.container_id) {
                return Err(CniError::new(ERR_ENV, "invalid characters in containerID").details(self.container_id.clone()));
            }
            let i = &self.ifname;
            if i.len() > 15 || i == "." || i == ".." || i.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
                return Err(CniError::new(ERR_ENV, "invalid interface name").details(i.clone()));
            }
        }
        Ok(())
    }
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (the library's container ID and network name rule).
fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphanumeric()) && c.all(|x| x.is_ascii_alphanumeric() || "_.-".contains(x))
}

/// The plugin's configuration (flannel's NetConf): everything else in it is the runtime's.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub raw: Map<String, Value>,
    pub name: String,
    /// As given ("" when absent: the spec reads that as 0.1.0).
    pub cni_version: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub delegate: Option<Map<String, Value>>,
    pub ipam: Option<Map<String, Value>>,
    pub runtime_config: Option<Value>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let v: Value = serde_json::from_slice(stdin)
            .map_err(|e| CniError::new(ERR_DECODING, format!("error unmarshall network config: {e}")))?;
        let Value::Object(raw) = v else {
            return Err(CniError::new(ERR_DECODING, "error unmarshall network config: not a JSON object"));
        };
        let name = raw.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
        if name.is_empty() {
            return Err(CniError::new(ERR_INVALID_CONFIG, "missing network name"));
        }
        if !valid_name(&name) {
            return Err(CniError::new(ERR_INVALID_CONFIG, "invalid characters found in network name").details(name));
        }
        let string = |k: &str| -> Result<Option<String>, CniError> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(CniError::new(ERR_DECODING, format!("failed to load netconf: {k} must be a string, not {other}"))),
            }
        };
        let object = |k: &str| -> Result<Option<Map<String, Value>>, CniError> {
            match raw.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(m)) => Ok(Some(m.clone())),
                Some(other) => Err(CniError::new(ERR_DECODING, format!("failed to load netconf: {k} must be an object, not {other}"))),
            }
        };
        Ok(Self {
            cni_version: string("cniVersion")?.unwrap_or_default(),
            subnet_file: string("subnetFile")?.filter(|s| !s.is_empty()).unwrap_or_else(|| DEFAULT_SUBNET_FILE.into()).into(),
            data_dir: string("dataDir")?.filter(|s| !s.is_empty()).unwrap_or_else(|| DEFAULT_DATA_DIR.into()).into(),
            delegate: object("delegate")?,
            ipam: object("ipam")?,
            runtime_config: raw.get("runtimeConfig").filter(|v| !v.is_null()).cloned(),
            name,
            raw,
        })
    }

    /// The version the configuration asks for, as the spec reads it.
    pub fn version(&self) -> &str {
        if self.cni_version.is_empty() { "0.1.0" } else { &self.cni_version }
    }

    fn check_version(&self) -> Result<(), CniError> {
        if SUPPORTED_VERSIONS.contains(&self.version()) {
            return Ok(());
        }
        let list: Vec<String> = SUPPORTED_VERSIONS.iter().map(|v| format!("{v:?}")).collect();
        Err(CniError::new(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions")
            .details(format!("config is {:?}, plugin supports [{}]", self.version(), list.join(" "))))
    }
}

/// flannel's subnet file as its plugin reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubnetFile {
    pub networks: Vec<Ipv4Net>,
    pub subnet: Option<Ipv4Net>,
    pub networks6: Vec<Ipv6Net>,
    pub subnet6: Option<Ipv6Net>,
    pub mtu: Option<u32>,
    pub ip_masq: Option<bool>,
}

impl SubnetFile {
    /// Read `path`; a file that is missing says the agent has not written it yet.
    pub fn load(path: &Path) -> Result<Self, CniError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CniError::new(
                    ERR_TRY_AGAIN_LATER,
                    format!(
                        "failed to load flannel 'subnet.env' file: {} does not exist: the overlay agent has not written it yet \
                         (it does once it holds this node's lease: see `systemctl status flanneld` or the agent's log)",
                        path.display()
                    ),
                ))
            }
            Err(e) => return Err(CniError::new(ERR_IO, format!("failed to load flannel 'subnet.env' file: reading {}: {e}", path.display()))),
        };
        Self::parse(&text).map_err(|why| CniError::new(ERR_SUBNET_FILE, format!("failed to load flannel 'subnet.env' file: {}: {why}", path.display())))
    }

    /// flannel's reading: the last line of each key counts, a network list is comma-separated
    /// (duplicates dropped), an unparsable value is an error naming it, and a file without a
    /// network, a subnet, FLANNEL_MTU or FLANNEL_IPMASQ is refused naming what is missing.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut f = Self::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else { continue };
            let net = |v: &str| v.parse::<IpNet>().map(|n| n.trunc()).map_err(|_| format!("{key}={v} is not a CIDR"));
            match key {
                "FLANNEL_NETWORK" | "FLANNEL_IPV6_NETWORK" => {
                    let mut v4 = Vec::new();
                    let mut v6 = Vec::new();
                    for c in value.split(',') {
                        match net(c)? {
                            IpNet::V4(n) if !v4.contains(&n) => v4.push(n),
                            IpNet::V6(n) if !v6.contains(&n) => v6.push(n),
                            _ => {}
                        }
                    }
                    if key == "FLANNEL_NETWORK" {
                        if !v6.is_empty() {
                            return Err(format!("FLANNEL_NETWORK={value} is not IPv4"));
                        }
                        f.networks = v4;
                    } else {
                        if !v4.is_empty() {
                            return Err(format!("FLANNEL_IPV6_NETWORK={value} is not IPv6"));
                        }
                        f.networks6 = v6;
                    }
                }
                "FLANNEL_SUBNET" => match net(value)? {
                    IpNet::V4(n) => f.subnet = Some(n),
                    IpNet::V6(_) => return Err(format!("FLANNEL_SUBNET={value} is not IPv4")),
                },
                "FLANNEL_IPV6_SUBNET" => match net(value)? {
                    IpNet::V6(n) => f.subnet6 = Some(n),
                    IpNet::V4(_) => return Err(format!("FLANNEL_IPV6_SUBNET={value} is not IPv6")),
                },
                "FLANNEL_MTU" => f.mtu = Some(value.parse().map_err(|_| format!("FLANNEL_MTU={value} is not a number"))?),
                "FLANNEL_IPMASQ" => f.ip_masq = Some(value == "true"),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        if f.networks.is_empty() && f.networks6.is_empty() {
            missing.extend(["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]);
        }
        if f.subnet.is_none() && f.subnet6.is_none() {
            missing.extend(["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]);
        }
        if f.mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if f.ip_masq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        if !missing.is_empty() {
            return Err(format!("it is missing {}", missing.join(", ")));
        }
        Ok(f)
    }
}

/// The delegate's configuration for ADD, as flannel renders it: the given `delegate` (which
/// may not set `name` or `ipam`) with `name`, `type` (bridge), `ipMasq` (flannel masquerades
/// unless FLANNEL_IPMASQ says the agent does), `mtu`, `isGateway` (bridge), `cniVersion`,
/// `runtimeConfig`, and an `ipam` from the top-level one (host-local unless it names
/// another) with one range per family and routes to the networks after its own.
pub fn render_delegate(conf: &NetConf, env: &SubnetFile) -> Result<Map<String, Value>, CniError> {
    let mut d = conf.delegate.clone().unwrap_or_default();
    if d.get("type").is_some_and(|t| !t.is_string()) {
        return Err(CniError::new(ERR_INVALID_CONFIG, "'delegate' dictionary, if present, must have (string) 'type' field"));
    }
    if d.contains_key("name") {
        return Err(CniError::new(ERR_INVALID_CONFIG, "'delegate' dictionary must not have 'name' field, it'll be set by flannel"));
    }
    if d.contains_key("ipam") {
        return Err(CniError::new(ERR_INVALID_CONFIG, "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel"));
    }
    if let Some(rc) = &conf.runtime_config {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    d.insert("name".into(), json!(conf.name));
    d.entry("type").or_insert_with(|| json!("bridge"));
    d.entry("ipMasq").or_insert_with(|| json!(!env.ip_masq.unwrap_or(false)));
    d.entry("mtu").or_insert_with(|| json!(env.mtu));
    if d["type"] == "bridge" {
        d.entry("isGateway").or_insert(json!(true));
    }
    if !conf.cni_version.is_empty() {
        d.insert("cniVersion".into(), json!(conf.cni_version));
    }
    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type").or_insert_with(|| json!("host-local"));
    let mut ranges = Vec::new();
    if let Some(s) = env.subnet {
        ranges.push(json!([{ "subnet": s.to_string() }]));
    }
    if let Some(s) = env.subnet6 {
        ranges.push(json!([{ "subnet": s.to_string() }]));
    }
    ipam.insert("ranges".into(), Value::Array(ranges));
    let mut routes = match ipam.get("routes") {
        None => Vec::new(),
        Some(Value::Array(r)) if r.iter().all(|x| x.get("dst").is_some_and(Value::is_string)) => r.clone(),
        Some(other) => {
            return Err(CniError::new(ERR_INVALID_CONFIG, format!("failed to assemble Delegate IPAM: failed to read IPAM routes: not a list of routes: {other}")))
        }
    };
    routes.extend(env.networks.iter().map(|n| json!({ "dst": n.to_string() })));
    routes.extend(env.networks6.iter().map(|n| json!({ "dst": n.to_string() })));
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    Ok(d)
}

/// The delegate plugin's executable: the first of CNI_PATH's directories that has it.
pub fn find_plugin(name: &str, cni_path: &str) -> Result<PathBuf, CniError> {
    let dirs: Vec<&str> = cni_path.split(':').filter(|d| !d.is_empty()).collect();
    if name.is_empty() || name.contains('/') {
        return Err(CniError::new(ERR_INVALID_CONFIG, format!("the delegate plugin's type {name:?} is not a plugin name")));
    }
    for d in &dirs {
        let p = Path::new(d).join(name);
        if p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0) {
            return Ok(p);
        }
    }
    Err(CniError::new(
        ERR_DELEGATE_MISSING,
        format!("failed to find plugin {name:?} in path [{}] (CNI_PATH): install the standard CNI plugins there (Debian: containernetworking-plugins, in /usr/lib/cni)", dirs.join(" ")),
    ))
}

/// Run a delegate as the runtime runs plugins: our environment with CNI_COMMAND set to
/// `command`, its configuration on stdin. Its result (stdout) on success; its error object as
/// it gave it otherwise.
fn exec_delegate(plugin: &Path, command: &str, conf: &[u8]) -> Result<Vec<u8>, CniError> {
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CniError::new(ERR_INTERNAL, format!("running {}: {e}", plugin.display())))?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = {
        let conf = conf.to_vec();
        std::thread::spawn(move || stdin.write_all(&conf))
    };
    let out = child.wait_with_output().map_err(|e| CniError::new(ERR_INTERNAL, format!("running {}: {e}", plugin.display())))?;
    let _ = writer.join();
    // A delegate's log (stderr) goes where ours goes: the runtime's log.
    let _ = std::io::stderr().write_all(&out.stderr);
    if out.status.success() {
        return Ok(out.stdout);
    }
    let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    match parsed.as_ref().and_then(|v| Some((v.get("code")?.as_u64()?, v.get("msg")?.as_str()?))) {
        Some((code, msg)) => {
            let details = parsed.as_ref().and_then(|v| v.get("details")?.as_str()).unwrap_or_default();
            Err(CniError { code: code as u32, msg: msg.to_string(), details: details.to_string() })
        }
        None => Err(CniError::new(
            ERR_INTERNAL,
            format!(
                "{} {command} failed ({}): {}",
                plugin.display(),
                out.status,
                String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).trim()
            ),
        )),
    }
}

fn scratch_path(data_dir: &Path, container_id: &str) -> PathBuf {
    data_dir.join(container_id)
}

/// Save the rendered delegate configuration for DEL (0600 in a 0700 directory, synced).
fn save_scratch(data_dir: &Path, container_id: &str, conf: &[u8]) -> Result<(), CniError> {
    let io = |e: std::io::Error| CniError::new(ERR_IO, format!("saving the delegate's configuration under {}: {e}", data_dir.display()));
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let _ = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700));
    let path = scratch_path(data_dir, container_id);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path).map_err(io)?;
    f.write_all(conf).map_err(io)?;
    f.sync_all().map_err(io)
}

/// What ADD finds on the bridge it is about to use: an IPv4 address of another subnet (the
/// node's lease changed since the bridge was made). The bridge plugin would refuse with
/// "already has an IP address different from"; with no container on the bridge, the bridge
/// goes (the delegate makes it again with the new address); with containers on it, the error
/// says what happened and what to do.
pub trait BridgeHost {
    /// The bridge's IPv4 addresses with their prefix length (None: no such bridge).
    fn addresses(&self, bridge: &str) -> Option<Vec<Ipv4Net>>;
    /// The interfaces enslaved to the bridge.
    fn ports(&self, bridge: &str) -> Vec<String>;
    fn delete(&self, bridge: &str) -> Result<(), String>;
}

pub fn reconcile_bridge(host: &dyn BridgeHost, delegate: &Map<String, Value>, env: &SubnetFile) -> Result<Option<String>, CniError> {
    let (Some(subnet), true) = (env.subnet, delegate.get("type").and_then(Value::as_str) == Some("bridge")) else { return Ok(None) };
    if delegate.get("isGateway") != Some(&json!(true)) {
        return Ok(None);
    }
    let bridge = delegate.get("bridge").and_then(Value::as_str).unwrap_or("cni0");
    let Some(addrs) = host.addresses(bridge) else { return Ok(None) };
    let gateway = Ipv4Net::new(std::net::Ipv4Addr::from(u32::from(subnet.network()) + 1), subnet.prefix_len()).expect("prefix");
    let stale: Vec<&Ipv4Net> = addrs.iter().filter(|a| **a != gateway).collect();
    if stale.is_empty() {
        return Ok(None);
    }
    let old = stale.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
    let ports = host.ports(bridge);
    if ports.is_empty() {
        host.delete(bridge).map_err(|e| CniError::new(ERR_BRIDGE_ADDRESS, format!("removing {bridge}, which holds {old} of an earlier lease: {e}")))?;
        return Ok(Some(format!("{bridge} held {old} from an earlier lease and no container used it: removed, to be made again with {gateway}")));
    }
    Err(CniError::new(
        ERR_BRIDGE_ADDRESS,
        format!(
            "{bridge} already has an IP address different from {gateway}: it holds {old}, from an earlier lease of this node; the node's subnet is now {subnet} \
             (the agent lost its lease and was given another). {} container interface(s) still use {bridge}: remove those containers (their addresses are of the old subnet), \
             then {bridge} is made again with the new address on the next ADD",
            ports.len()
        ),
    )
    .details(ports.join(" ")))
}

/// The host's bridges, over netlink and sysfs.
pub struct SystemBridges;

impl BridgeHost for SystemBridges {
    fn addresses(&self, bridge: &str) -> Option<Vec<Ipv4Net>> {
        crate::netdev::link(bridge).ok().flatten()?;
        crate::netdev::addresses4(bridge).ok()
    }
    fn ports(&self, bridge: &str) -> Vec<String> {
        // When the ports cannot be read, the bridge counts as in use: it is never removed
        // on a guess.
        crate::netdev::ports_of(bridge).unwrap_or_else(|e| vec![format!("(unknown: {e})")])
    }
    fn delete(&self, bridge: &str) -> Result<(), String> {
        crate::netdev::delete_link(bridge).map_err(|e| e.to_string())
    }
}

/// One plugin call: what goes to stdout on success.
pub fn run(env: &CniEnv, stdin: &[u8], bridges: &dyn BridgeHost) -> Result<Vec<u8>, CniError> {
    if env.command == "VERSION" {
        let v = json!({ "cniVersion": CURRENT_VERSION, "supportedVersions": SUPPORTED_VERSIONS });
        return Ok(serde_json::to_vec(&v).expect("json"));
    }
    env.validate()?;
    let conf = NetConf::parse(stdin)?;
    conf.check_version()?;
    match env.command.as_str() {
        "ADD" => add(env, &conf, bridges),
        "DEL" => del(env, &conf).map(|()| Vec::new()),
        "CHECK" => check(env, &conf).map(|()| Vec::new()),
        "STATUS" => SubnetFile::load(&conf.subnet_file)
            .map(drop)
            .map_err(|e| CniError::new(ERR_PLUGIN_NOT_AVAILABLE, e.msg))
            .map(|()| Vec::new()),
        // Nothing of ours outlives a container but its saved configuration, which DEL takes.
        "GC" => Ok(Vec::new()),
        other => Err(CniError::new(ERR_ENV, format!("unknown CNI_COMMAND: {other}"))),
    }
}

fn add(env: &CniEnv, conf: &NetConf, bridges: &dyn BridgeHost) -> Result<Vec<u8>, CniError> {
    let subnet = SubnetFile::load(&conf.subnet_file)?;
    let delegate = render_delegate(conf, &subnet)?;
    let plugin = find_plugin(delegate["type"].as_str().unwrap_or_default(), &env.path)?;
    if let Some(note) = reconcile_bridge(bridges, &delegate, &subnet)? {
        eprintln!("flannel: {note}");
    }
    let bytes = serde_json::to_vec(&Value::Object(delegate)).expect("json");
    // Saved first: a failed ADD leaves what the runtime's DEL needs to undo any part of it.
    save_scratch(&conf.data_dir, &env.container_id, &bytes)?;
    exec_delegate(&plugin, "ADD", &bytes)
}

/// The saved configuration for DEL and CHECK, with this call's runtimeConfig (and for CHECK
/// its prevResult) in it; None when there is none (never added, or deleted already).
/// A container's saved delegate configuration and where it is.
type Saved = Option<(Map<String, Value>, PathBuf)>;

fn saved(env: &CniEnv, conf: &NetConf, extra: &[(&str, Option<&Value>)]) -> Result<Saved, CniError> {
    let path = scratch_path(&conf.data_dir, &env.container_id);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CniError::new(ERR_IO, format!("reading {}: {e}", path.display()))),
    };
    let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&bytes) else {
        // flannel: the interface stays on the bridge until the node reboots; the call succeeds.
        eprintln!("flannel: {} is not a delegate configuration; nothing to delete", path.display());
        return Ok(None);
    };
    for (k, v) in extra {
        if let Some(v) = v {
            m.insert((*k).to_string(), (*v).clone());
        }
    }
    Ok(Some((m, path)))
}

fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let Some((delegate, path)) = saved(env, conf, &[("runtimeConfig", conf.runtime_config.as_ref())])? else { return Ok(()) };
    let plugin = find_plugin(delegate.get("type").and_then(Value::as_str).unwrap_or_default(), &env.path)?;
    exec_delegate(&plugin, "DEL", &serde_json::to_vec(&Value::Object(delegate)).expect("json"))?;
    // Kept until the delegate has released everything: a failed DEL is tried again.
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let ok_version = SUPPORTED_VERSIONS.iter().position(|v| *v == conf.version()) >= SUPPORTED_VERSIONS.iter().position(|v| *v == "0.4.0");
    if !ok_version {
        return Err(CniError::new(ERR_INCOMPATIBLE_VERSION, "config version does not allow CHECK"));
    }
    let prev = conf.raw.get("prevResult");
    let Some((delegate, _)) = saved(env, conf, &[("runtimeConfig", conf.runtime_config.as_ref()), ("prevResult", prev)])? else {
        return Err(CniError::new(ERR_UNKNOWN_CONTAINER, format!("no configuration saved for container {} (under {})", env.container_id, conf.data_dir.display())));
    };
    let plugin = find_plugin(delegate.get("type").and_then(Value::as_str).unwrap_or_default(), &env.path)?;
    exec_delegate(&plugin, "CHECK", &serde_json::to_vec(&Value::Object(delegate)).expect("json")).map(drop)
}

/// The plugin's entry point (the agent run as `flannel`): the exit status.
pub fn main() -> std::process::ExitCode {
    let env = CniEnv::from_env(|k| std::env::var(k).ok());
    if env.command.is_empty() {
        eprintln!("CNI Plugin flannel (overlay-agent {})", env!("CARGO_PKG_VERSION"));
        eprintln!("CNI protocol versions supported: {}", SUPPORTED_VERSIONS.join(", "));
        return std::process::ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    if env.command != "VERSION" {
        if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut stdin) {
            return print_error(&CniError::new(ERR_IO, format!("error reading from stdin: {e}")), CURRENT_VERSION);
        }
    }
    match run(&env, &stdin, &SystemBridges) {
        Ok(out) => {
            let mut o = std::io::stdout();
            let _ = o.write_all(&out);
            let _ = o.flush();
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            // The error speaks the configuration's version where it parses.
            let version = NetConf::parse(&stdin).ok().map(|c| c.version().to_string()).unwrap_or_else(|| CURRENT_VERSION.into());
            print_error(&e, &version)
        }
    }
}

fn print_error(e: &CniError, version: &str) -> std::process::ExitCode {
    let mut o = std::io::stdout();
    let _ = serde_json::to_writer_pretty(&mut o, &e.to_json(version));
    let _ = o.flush();
    std::process::ExitCode::FAILURE
}

/// kube-flannel's `cni-conf.json` (its ConfigMap), with `subnetFile` and `dataDir` when they
/// are not flannel's defaults.
pub fn conflist(subnet_file: &Path, data_dir: &Path) -> String {
    let mut flannel = json!({ "type": "flannel", "delegate": { "hairpinMode": true, "isDefaultGateway": true } });
    if subnet_file != Path::new(DEFAULT_SUBNET_FILE) {
        flannel["subnetFile"] = json!(subnet_file);
    }
    if data_dir != Path::new(DEFAULT_DATA_DIR) {
        flannel["dataDir"] = json!(data_dir);
    }
    let v = json!({
        "name": "cbr0",
        "cniVersion": "0.3.1",
        "plugins": [flannel, { "type": "portmap", "capabilities": { "portMappings": true } }],
    });
    serde_json::to_string_pretty(&v).expect("json") + "\n"
}

/// What `install-cni` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Installed {
    pub plugin: PathBuf,
    pub conflist: PathBuf,
    /// False when the conflist was already what it writes.
    pub conflist_written: bool,
}

/// Put the plugin (this executable, as `flannel`) into `bin_dir` and kube-flannel's conflist
/// into `conf_dir` as `conf_name`, as kube-flannel's init containers do: each replaced
/// atomically. A conflist that is there and is neither ours as we wrote it (recorded beside it
/// in `.<name>.overlay-agent`, which runtimes do not read) nor what we would write is someone
/// else's: refused, naming it, unless `force`.
pub fn install(exe: &Path, bin_dir: &Path, conf_dir: &Path, conf_name: &str, content: &str, force: bool) -> anyhow::Result<Installed> {
    use anyhow::Context as _;
    std::fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    std::fs::create_dir_all(conf_dir).with_context(|| format!("creating {}", conf_dir.display()))?;
    let plugin = bin_dir.join("flannel");
    let tmp = bin_dir.join(format!(".flannel.{}.tmp", std::process::id()));
    std::fs::copy(exe, &tmp).with_context(|| format!("copying {} to {}", exe.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &plugin).with_context(|| format!("installing {}", plugin.display()))?;
    let conflist = conf_dir.join(conf_name);
    let record = conf_dir.join(format!(".{conf_name}.overlay-agent"));
    let current = std::fs::read_to_string(&conflist).ok();
    if current.as_deref() == Some(content) {
        std::fs::write(&record, content)?;
        return Ok(Installed { plugin, conflist, conflist_written: false });
    }
    if let Some(cur) = &current {
        let ours = std::fs::read_to_string(&record).is_ok_and(|r| r == *cur);
        if !ours && !force {
            anyhow::bail!(
                "{} exists and was not written by overlay-agent install-cni (or was changed since): left alone; \
                 remove it, or give --force to replace it",
                conflist.display()
            );
        }
    }
    let tmp = conf_dir.join(format!(".{conf_name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &conflist).with_context(|| format!("installing {}", conflist.display()))?;
    std::fs::write(&record, content)?;
    Ok(Installed { plugin, conflist, conflist_written: true })
}

/// Whether argv[0] names the CNI plugin (`flannel`, in a plugin directory).
pub fn invoked_as_plugin(argv0: &std::ffi::OsStr) -> bool {
    Path::new(argv0).file_name().is_some_and(|n| n == "flannel")
}


#[cfg(test)]
mod tests;
