//! `overlay-agent mk-docker-opts`: flannel's `mk-docker-opts.sh` (same flags, same output),
//! turning the subnet file into docker daemon options for the docker unit's EnvironmentFile.
//!
//! Same as the script: the individual `DOCKER_OPT_*` lines come first, sorted by name (bash's
//! `compgen -v` order, environment variables of that name included), then the combined line,
//! whose value is the current value of the combined key's variable and a space (if it has
//! one), then a space before each option (` --bip=... --ip-masq=false --mtu=1450`). Neither -i nor -c means both.
//! `--ip-masq` is the opposite of FLANNEL_IPMASQ, as in flannel's script from v0.11 on:
//! FLANNEL_IPMASQ=true gives `--ip-masq=false` (flannel masquerades instead of docker),
//! FLANNEL_IPMASQ=false gives `--ip-masq=true` (docker masquerades), another value is an
//! error ("Invalid value of FLANNEL_IPMASQ"), none or `-m` writes none.
//!
//! Differences, on purpose: a missing subnet file or one without FLANNEL_SUBNET is an error
//! (the script silently writes options without --bip, and docker then picks a conflicting
//! bridge subnet); the output file is replaced atomically.

use std::{collections::BTreeMap, fmt::Write as _, fs, io::Write as _, path::{Path, PathBuf}};

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct DockerOptsArgs {
    /// Path to flannel env file.
    #[arg(short = 'f', default_value = "/run/flannel/subnet.env")]
    pub flannel_env: PathBuf,
    /// Path to Docker env file to write to.
    #[arg(short = 'd', default_value = "/run/docker_opts.env")]
    pub docker_env: PathBuf,
    /// Output each Docker option as individual var, e.g. DOCKER_OPT_MTU=1500.
    #[arg(short = 'i')]
    pub individual: bool,
    /// Output combined Docker options into the DOCKER_OPTS var (or -k's).
    #[arg(short = 'c')]
    pub combined: bool,
    /// Set the combined options key to this value.
    #[arg(short = 'k', default_value = "DOCKER_OPTS")]
    pub key: String,
    /// Do not output --ip-masq (for old Docker versions).
    #[arg(short = 'm')]
    pub no_ip_masq: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DockerOptsError {
    #[error("cannot read the subnet file {path}: {cause} (is the agent running and --subnet-file the same path?)")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} has no FLANNEL_SUBNET; refusing to write docker options without --bip")]
    NoSubnet { path: PathBuf },
    /// An IPv6-only network's file (flannel's script has no IPv6 options either).
    #[error(
        "{path} is an IPv6-only network's (FLANNEL_IPV6_SUBNET={subnet6}, no FLANNEL_SUBNET): mk-docker-opts writes IPv4 \
         options (--bip) only, as flannel's script; give dockerd --ipv6 --fixed-cidr-v6={subnet6} --mtu=<FLANNEL_MTU> yourself"
    )]
    Ipv6Only { path: PathBuf, subnet6: String },
    #[error("{0:?} is not a valid shell variable name for -k")]
    BadKey(String),
    /// flannel's script exits 1 with these words.
    #[error("Invalid value of FLANNEL_IPMASQ: {0} (true or false)")]
    BadIpMasq(String),
    #[error("writing {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// `KEY=VALUE` lines of a subnet file as `source` would read them (quotes removed).
pub fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("export ").unwrap_or(l).split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_') && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// The docker env file's contents, from the subnet file's variables and the process
/// environment (`environ`), as the script computes them.
pub fn render(
    args: &DockerOptsArgs,
    flannel: &BTreeMap<String, String>,
    environ: &BTreeMap<String, String>,
) -> Result<String, DockerOptsError> {
    if !valid_name(&args.key) {
        return Err(DockerOptsError::BadKey(args.key.clone()));
    }
    let (individual, combined) = match (args.individual, args.combined) {
        (false, false) => (true, true),
        other => other,
    };
    // Shell variables: the environment, then what sourcing the subnet file sets.
    let mut vars: BTreeMap<String, String> = environ.clone();
    vars.extend(flannel.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut opts: BTreeMap<String, String> =
        vars.iter().filter(|(k, _)| k.starts_with("DOCKER_OPT_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    if let Some(s) = vars.get("FLANNEL_SUBNET").filter(|s| !s.is_empty()) {
        opts.insert("DOCKER_OPT_BIP".into(), format!("--bip={s}"));
    }
    if let Some(m) = vars.get("FLANNEL_MTU").filter(|m| !m.is_empty()) {
        opts.insert("DOCKER_OPT_MTU".into(), format!("--mtu={m}"));
    }
    if !args.no_ip_masq {
        match vars.get("FLANNEL_IPMASQ").map(String::as_str) {
            None | Some("") => {}
            Some("true") => {
                opts.insert("DOCKER_OPT_IPMASQ".into(), "--ip-masq=false".into());
            }
            Some("false") => {
                opts.insert("DOCKER_OPT_IPMASQ".into(), "--ip-masq=true".into());
            }
            Some(other) => return Err(DockerOptsError::BadIpMasq(other.to_string())),
        }
    }
    let mut out = String::new();
    // The script: the key's current value and a space if it has one, then a space before
    // each option.
    let mut all = vars.get(&args.key).cloned().unwrap_or_default();
    if !all.is_empty() {
        all.push(' ');
    }
    for (name, val) in &opts {
        if individual {
            let _ = writeln!(out, "{name}=\"{val}\"");
        }
        all.push(' ');
        all.push_str(val);
    }
    if combined {
        let _ = writeln!(out, "{}=\"{all}\"", args.key);
    }
    Ok(out)
}

/// Read the subnet file, render, and replace the docker env file atomically.
pub fn run(args: &DockerOptsArgs) -> Result<String, DockerOptsError> {
    let text = fs::read_to_string(&args.flannel_env)
        .map_err(|cause| DockerOptsError::Read { path: args.flannel_env.clone(), cause })?;
    let flannel = parse_env_file(&text);
    if flannel.get("FLANNEL_SUBNET").is_none_or(|s| s.is_empty()) {
        let path = args.flannel_env.clone();
        return Err(match flannel.get("FLANNEL_IPV6_SUBNET").filter(|s| !s.is_empty()) {
            Some(s6) => DockerOptsError::Ipv6Only { path, subnet6: s6.clone() },
            None => DockerOptsError::NoSubnet { path },
        });
    }
    let environ: BTreeMap<String, String> = std::env::vars().collect();
    let out = render(args, &flannel, &environ)?;
    write_atomic(&args.docker_env, &out)?;
    Ok(out)
}

fn write_atomic(path: &Path, text: &str) -> Result<(), DockerOptsError> {
    let err = |cause| DockerOptsError::Write { path: path.to_path_buf(), cause };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let tmp = dir.join(format!(".docker-opts.{}.tmp", std::process::id()));
    let mut f = fs::File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: DockerOptsArgs,
    }

    fn args(flags: &[&str]) -> DockerOptsArgs {
        T::try_parse_from(std::iter::once("t").chain(flags.iter().copied())).unwrap().a
    }

    const MASQ: &str = "FLANNEL_NETWORK=172.17.0.0/16\nFLANNEL_SUBNET=172.17.98.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn the_seeds_invocation() {
        let out = render(&args(&["-k", "DOCKER_NETWORK_OPTIONS", "-d", "/run/flannel/docker"]), &parse_env_file(MASQ), &BTreeMap::new()).unwrap();
        assert_eq!(
            out,
            "DOCKER_OPT_BIP=\"--bip=172.17.98.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_NETWORK_OPTIONS=\" --bip=172.17.98.1/24 --ip-masq=false --mtu=1450\"\n"
        );
    }

    #[test]
    fn environment_variables_join_in_as_in_bash() {
        let env: BTreeMap<String, String> =
            [("DOCKER_OPTS".to_string(), "--debug".to_string()), ("DOCKER_OPT_AAA".to_string(), "--x".to_string())].into();
        let out = render(&args(&["-c"]), &parse_env_file(MASQ), &env).unwrap();
        assert_eq!(out, "DOCKER_OPTS=\"--debug  --x --bip=172.17.98.1/24 --ip-masq=false --mtu=1450\"\n");
    }

    #[test]
    fn m_leaves_out_ip_masq() {
        let out = render(&args(&["-m", "-c"]), &parse_env_file(MASQ), &BTreeMap::new()).unwrap();
        assert_eq!(out, "DOCKER_OPTS=\" --bip=172.17.98.1/24 --mtu=1450\"\n");
    }

    /// flannel's script (v0.11 to today): docker masquerades when flannel does not.
    #[test]
    fn ip_masq_is_the_opposite_of_flannels_both_ways() {
        let no_masq = MASQ.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false");
        let out = render(&args(&["-k", "DOCKER_NETWORK_OPTIONS"]), &parse_env_file(&no_masq), &BTreeMap::new()).unwrap();
        assert_eq!(
            out,
            "DOCKER_OPT_BIP=\"--bip=172.17.98.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=true\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\n\
             DOCKER_NETWORK_OPTIONS=\" --bip=172.17.98.1/24 --ip-masq=true --mtu=1450\"\n"
        );
        let out = render(&args(&["-m", "-c"]), &parse_env_file(&no_masq), &BTreeMap::new()).unwrap();
        assert_eq!(out, "DOCKER_OPTS=\" --bip=172.17.98.1/24 --mtu=1450\"\n", "-m: no --ip-masq either way");
        let unset = MASQ.replace("FLANNEL_IPMASQ=true\n", "");
        let out = render(&args(&["-c"]), &parse_env_file(&unset), &BTreeMap::new()).unwrap();
        assert_eq!(out, "DOCKER_OPTS=\" --bip=172.17.98.1/24 --mtu=1450\"\n", "no FLANNEL_IPMASQ: no --ip-masq");
        let odd = MASQ.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=yes");
        let e = render(&args(&["-c"]), &parse_env_file(&odd), &BTreeMap::new()).unwrap_err();
        assert_eq!(e.to_string(), "Invalid value of FLANNEL_IPMASQ: yes (true or false)");
        assert!(render(&args(&["-m", "-c"]), &parse_env_file(&odd), &BTreeMap::new()).is_ok(), "-m: not looked at, as in the script");
    }

    #[test]
    fn quoted_values_and_comments_are_read_like_source() {
        let env = parse_env_file("# written by hand\nexport FLANNEL_SUBNET=\"10.1.2.1/24\"\nFLANNEL_MTU='1400'\n\n");
        assert_eq!(env["FLANNEL_SUBNET"], "10.1.2.1/24");
        assert_eq!(env["FLANNEL_MTU"], "1400");
    }

    #[test]
    fn bad_key_and_missing_subnet_are_errors() {
        assert!(matches!(render(&args(&["-k", "1BAD"]), &BTreeMap::new(), &BTreeMap::new()), Err(DockerOptsError::BadKey(_))));
        let dir = std::env::temp_dir().join(format!("mkdo-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("subnet.env");
        fs::write(&f, "FLANNEL_MTU=1450\n").unwrap();
        let e = run(&args(&["-f", f.to_str().unwrap(), "-d", dir.join("out").to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("has no FLANNEL_SUBNET"), "{e}");
        fs::write(&f, "FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:7::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n").unwrap();
        let e = run(&args(&["-f", f.to_str().unwrap(), "-d", dir.join("out").to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("IPv6-only") && e.to_string().contains("--fixed-cidr-v6=fd00:0:0:7::1/64"), "{e}");
        assert!(!dir.join("out").exists(), "nothing written for an IPv6-only file");
        let e = run(&args(&["-f", dir.join("missing").to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("cannot read the subnet file"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
