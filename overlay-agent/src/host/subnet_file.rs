//! flannel's subnet file (`--subnet-file`, default /run/flannel/subnet.env), which docker's
//! unit reads: written atomically (temporary file in the same directory, fsync, rename).

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use ipnet::{Ipv4Net, Ipv6Net};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The IPv4 network and the node's subnet (FLANNEL_NETWORK/SUBNET; the subnet written as
    /// its first usable address, as flannel does); none in an IPv6-only network.
    pub ipv4: Option<(Ipv4Net, Ipv4Net)>,
    pub mtu: u32,
    pub ip_masq: bool,
    /// A dual-stack or IPv6-only node's IPv6 network and subnet (FLANNEL_IPV6_NETWORK/SUBNET).
    pub ipv6: Option<(Ipv6Net, Ipv6Net)>,
}

impl SubnetEnv {
    pub fn render(&self) -> String {
        // flannel's order: the IPv4 pair, the IPv6 pair, then MTU and masquerade.
        let v4 = match self.ipv4 {
            Some((network, subnet)) => {
                format!("FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={}/{}\n", Ipv4Addr::from(u32::from(subnet.network()) + 1), subnet.prefix_len())
            }
            None => String::new(),
        };
        let v6 = match self.ipv6 {
            Some((network, subnet)) => format!(
                "FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET={}/{}\n",
                std::net::Ipv6Addr::from(u128::from(subnet.network()) + 1),
                subnet.prefix_len()
            ),
            None => String::new(),
        };
        format!("{v4}{v6}FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n", self.mtu, self.ip_masq)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubnetFileError {
    #[error("writing {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// Replace `path` with `env` atomically (readers see the old or the new file, never half).
pub fn write(path: &Path, env: &SubnetEnv) -> Result<(), SubnetFileError> {
    let err = |cause| SubnetFileError::Write { path: path.to_path_buf(), cause };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("subnet.env"),
        std::process::id()
    ));
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp).map_err(err)?;
    f.write_all(env.render().as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

/// The subnets a previous run wrote (FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET), each if the file
/// has it and it parses.
pub fn read_previous(path: &Path) -> (Option<Ipv4Net>, Option<Ipv6Net>) {
    let text = fs::read_to_string(path).unwrap_or_default();
    (v4_line(&text), v6_line(&text))
}

/// A `KEY=address/length` line's network.
fn parse_line(text: &str, key: &str) -> Option<ipnet::IpNet> {
    let v = text.lines().find_map(|l| l.trim().strip_prefix(key))?;
    v.trim().trim_matches('"').parse::<ipnet::IpNet>().ok().map(|n| n.trunc())
}

fn v4_line(text: &str) -> Option<Ipv4Net> {
    match parse_line(text, "FLANNEL_SUBNET=")? {
        ipnet::IpNet::V4(n) => Some(n),
        ipnet::IpNet::V6(_) => None,
    }
}

fn v6_line(text: &str) -> Option<Ipv6Net> {
    match parse_line(text, "FLANNEL_IPV6_SUBNET=")? {
        ipnet::IpNet::V6(n) => Some(n),
        ipnet::IpNet::V4(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> SubnetEnv {
        SubnetEnv {
            ipv4: Some(("172.17.0.0/16".parse().unwrap(), "172.17.98.0/24".parse().unwrap())),
            mtu: 1450,
            ip_masq: true,
            ipv6: None,
        }
    }

    /// As flannel's WriteSubnetFile writes a dual-stack node's file.
    #[test]
    fn renders_flannels_dual_stack_format() {
        let e = SubnetEnv { ipv6: Some(("fd00:10:244::/56".parse().unwrap(), "fd00:10:244:62::/64".parse().unwrap())), ..env() };
        assert_eq!(
            e.render(),
            "FLANNEL_NETWORK=172.17.0.0/16\nFLANNEL_SUBNET=172.17.98.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\n\
             FLANNEL_IPV6_SUBNET=fd00:10:244:62::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    /// As flannel writes an IPv6-only node's file: no IPv4 pair at all.
    #[test]
    fn renders_flannels_ipv6_only_format() {
        let e = SubnetEnv { ipv4: None, ipv6: Some(("fd00:10:244::/56".parse().unwrap(), "fd00:10:244:62::/64".parse().unwrap())), ..env() };
        assert_eq!(e.render(), "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:62::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
        let text = e.render();
        assert_eq!(v6_line(&text), Some("fd00:10:244:62::/64".parse().unwrap()));
        assert_eq!(v4_line(&text), None);
    }

    #[test]
    fn renders_flannels_format() {
        assert_eq!(
            env().render(),
            "FLANNEL_NETWORK=172.17.0.0/16\nFLANNEL_SUBNET=172.17.98.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn write_replaces_atomically_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("subnet-env-test-{}", std::process::id()));
        let path = dir.join("run/flannel/subnet.env");
        write(&path, &env()).unwrap();
        let mut e2 = env();
        e2.ipv4 = Some(("172.17.0.0/16".parse().unwrap(), "172.17.99.0/24".parse().unwrap()));
        write(&path, &e2).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), e2.render());
        assert_eq!(read_previous(&path), (Some("172.17.99.0/24".parse().unwrap()), None));
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file may be left behind");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn previous_subnet_tolerates_garbage() {
        let v4 = v4_line;
        assert_eq!(v4("FLANNEL_SUBNET=10.1.2.1/24\n"), Some("10.1.2.0/24".parse().unwrap()));
        assert_eq!(v4("FLANNEL_SUBNET=garbage\n"), None);
        assert_eq!(v4("FLANNEL_SUBNET=fd00::1/64\n"), None);
        assert_eq!(v4(""), None);
    }
}
