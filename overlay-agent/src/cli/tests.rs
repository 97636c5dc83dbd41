use super::*;

fn spec(args: &[&str]) -> Result<NodeSpec> {
    let mut argv = vec!["overlay-agent", "--iface", "eth0", "--public-ip", "192.168.1.10"];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv)?;
    cli.run.node_spec(cli.bpffs_dir)
}

#[test]
fn defaults_follow_flannel() {
    let s = spec(&["--network", "10.244.0.0/16", "--subnet", "10.244.3.0/24"]).unwrap();
    assert_eq!((s.mode, s.vni, s.port, s.device.as_str()), (EncapMode::Vxlan, 1, 8472, "flannel.1"));
    assert_eq!(s.bpffs_dir, PathBuf::from("/sys/fs/bpf/overlay"));
    assert_eq!(s.decap_hook, DecapHook::Auto);
    let s = spec(&["--network", "10.244.0.0/16", "--subnet", "10.244.3.0/24", "--backend", "udp"]).unwrap();
    assert_eq!((s.mode, s.port, s.device.as_str()), (EncapMode::Udp, 8285, "flannel0"));
    let s = spec(&["--network", "10.244.0.0/16", "--subnet", "10.244.3.0/24", "--vni", "42"]).unwrap();
    assert_eq!(s.device, "flannel.42");
}

#[test]
fn inconsistent_networks_are_refused_with_the_flag_named() {
    let cases = [
        (vec!["--network", "10.244.0.0/16", "--subnet", "10.245.1.0/24"], "inside --network"),
        (vec!["--network", "10.244.0.0/16", "--subnet", "10.244.0.0/16"], "smaller subnet"),
        (vec!["--network", "10.244.0.1/16", "--subnet", "10.244.1.0/24"], "--network 10.244.0.1/16 has host bits"),
        (vec!["--network", "10.244.0.0/16", "--subnet", "10.244.1.7/24"], "--subnet 10.244.1.7/24 has host bits"),
        (vec!["--subnet", "10.244.1.0/24"], "--network"),
        (vec!["--network", "10.244.0.0/16"], "--subnet"),
        (vec!["--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--vni", "16777216"], "24 bits"),
    ];
    for (args, want) in cases {
        let err = format!("{:#}", spec(&args).expect_err(&format!("{args:?} must be refused")));
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
    }
}

fn parse(args: &[&str]) -> Cli {
    let argv = normalize_args(args.iter().map(OsString::from));
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// `--iface-can-reach` and `--healthz-ip` take either family, as flanneld's.
#[test]
fn addresses_of_either_family_where_flanneld_takes_them() {
    let cli = parse(&["overlay-agent", "--iface-can-reach=fd00:64::1", "--healthz-ip=::1", "--healthz-port=8471"]);
    assert_eq!(cli.run.iface_can_reach, Some("fd00:64::1".parse().unwrap()));
    let opts = cli.run.daemon_options(&cli.etcd, PathBuf::from("/sys/fs/bpf/x"));
    assert_eq!(opts.healthz, Some("[::1]:8471".parse().unwrap()));
    assert_eq!(parse(&["overlay-agent", "--iface-can-reach=10.0.0.1"]).run.iface_can_reach, Some("10.0.0.1".parse().unwrap()));
}

/// flanneld's Kubernetes-mode flags: a clear refusal naming them, from the command line
/// or a FLANNELD_ variable; `--net-config-path` taken and ignored with a note.
#[test]
fn kubernetes_mode_flags_are_refused_with_what_to_do() {
    let with_env = |vars: &[(&str, &str)], args: &[&str]| {
        let vars: std::collections::BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let argv = std::iter::once("overlay-agent").chain(args.iter().copied()).map(OsString::from);
        super::parse_with_env(argv, |n| vars.get(n).map(OsString::from)).unwrap_or_else(|e| panic!("{args:?}: {e}")).0
    };
    let why = parse(&["overlay-agent", "--kube-subnet-mgr", "--ip-masq"]).kube.refusal().expect("refused");
    assert!(why.starts_with("--kube-subnet-mgr: ") && why.contains("etcd mode") && why.contains("docs/kubernetes.md"), "{why}");
    let why = parse(&["overlay-agent", "-kube-subnet-mgr=true", "-kubeconfig-file=/k", "--kube-api-url", "https://api:6443", "--kube-annotation-prefix=x", "--set-node-network-unavailable=false"])
        .kube
        .refusal()
        .expect("refused");
    assert!(why.starts_with("--kube-subnet-mgr, --kubeconfig-file, --kube-api-url, --kube-annotation-prefix, --set-node-network-unavailable: "), "{why}");
    assert!(with_env(&[("FLANNELD_KUBE_SUBNET_MGR", "true")], &[]).kube.refusal().is_some(), "from its variable too");
    // flanneld's default, said out loud, is etcd mode.
    assert_eq!(parse(&["overlay-agent", "--kube-subnet-mgr=false"]).kube.refusal(), None);
    let cli = parse(&["overlay-agent", "--net-config-path", "/etc/kube-flannel/net-conf.json"]);
    assert_eq!(cli.kube.refusal(), None);
    assert!(cli.kube.notes()[0].contains("ignored"), "{:?}", cli.kube.notes());
    assert!(parse(&["overlay-agent"]).kube.notes().is_empty());
}

#[test]
fn the_seeds_option_string_parses_go_style() {
    let cli = parse(&[
        "overlay-agent", "--ip-masq",
        "--etcd-endpoints=https://192.168.1.251:2379,https://192.168.1.252:2379,https://192.168.1.253:2379",
        "-etcd-cafile=/opt/kubernetes/ssl/ca.pem", "--etcd-certfile=/opt/kubernetes/ssl/server.pem",
        "--etcd-keyfile=/opt/kubernetes/ssl/server-key.pem",
    ]);
    assert!(cli.run.ip_masq);
    assert_eq!(cli.etcd.etcd_endpoints.len(), 3);
    assert_eq!(cli.etcd.etcd_endpoints[1], "https://192.168.1.252:2379");
    assert_eq!(cli.etcd.etcd_cafile, Some(PathBuf::from("/opt/kubernetes/ssl/ca.pem")));
    assert_eq!(cli.etcd.etcd_keyfile, Some(PathBuf::from("/opt/kubernetes/ssl/server-key.pem")));
    assert!(cli.command.is_none());
}

#[test]
fn go_style_and_gnu_style_flags_mean_the_same() {
    let a = parse(&["overlay-agent", "-etcd-prefix=/x", "-iface", "eth1", "-ip-masq=false", "-subnet-lease-renew-margin=5"]);
    let b = parse(&["overlay-agent", "--etcd-prefix", "/x", "--iface=eth1", "--subnet-lease-renew-margin", "5"]);
    assert_eq!(a.etcd.etcd_prefix, "/x");
    assert_eq!(a.etcd.etcd_prefix, b.etcd.etcd_prefix);
    assert_eq!(a.run.iface, b.run.iface);
    assert!(!a.run.ip_masq);
    assert_eq!(a.run.subnet_lease_renew_margin, 5);
    // A value that looks like a flag is not rewritten when it is not one of ours.
    let c = parse(&["overlay-agent", "route", "del", "10.1.0.0/24"]);
    assert!(matches!(c.command, Some(Command::Route(RouteCommand::Del { .. }))));
}

#[test]
fn defaults_are_flanneld_defaults() {
    let cli = parse(&["overlay-agent"]);
    assert_eq!(cli.etcd.etcd_endpoints, vec!["http://127.0.0.1:2379"]);
    assert_eq!(cli.etcd.etcd_prefix, "/coreos.com/network");
    assert_eq!(cli.run.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
    assert_eq!(cli.run.subnet_lease_renew_margin, 60);
    assert_eq!(cli.run.subnet_lease_ttl, Duration::from_secs(24 * 3600));
    assert!(!cli.run.ip_masq);
}

/// Run the calling test `name` again in a child process of this test binary, with `vars`
/// in the child's environment: no test changes the environment that tests running
/// beside it read. True in the child (which makes the assertions); in the parent, false
/// once the child has passed.
fn in_child_with_env(name: &str, vars: &[(&str, &str)]) -> bool {
    const CHILD: &str = "OVERLAY_AGENT_TEST_CHILD";
    let test = format!("{}::{name}", module_path!().split_once("::").map_or(module_path!(), |(_, m)| m));
    if std::env::var_os(CHILD).is_some_and(|v| v == test.as_str()) {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args([test.as_str(), "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, &test)
        .envs(vars.iter().copied())
        .output()
        .expect("running the test binary again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test} failed in its child process:\n{text}");
    assert!(text.contains("1 passed"), "{test} did not run in its child process:\n{text}");
    false
}

#[test]
fn every_flag_can_come_from_a_flanneld_variable() {
    let vars = [("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "17"), ("FLANNELD_IPTABLES_RESYNC", "9")];
    if !in_child_with_env("every_flag_can_come_from_a_flanneld_variable", &vars) {
        return;
    }
    let cli = parse(&["overlay-agent"]);
    assert_eq!(cli.run.subnet_lease_renew_margin, 17);
    assert_eq!(cli.run.iptables_resync, 9);
    // Every long flag of the agent declares its FLANNELD_ variable.
    for a in Cli::command().get_arguments() {
        let Some(long) = a.get_long() else { continue };
        let want = format!("FLANNELD_{}", long.to_uppercase().replace('-', "_"));
        assert_eq!(a.get_env().and_then(|e| e.to_str()), Some(want.as_str()), "--{long}");
    }
}

/// flanneld's environment, as Go's flagutil.SetFlagsFromEnv reads it into its flags.
#[test]
fn flanneld_variables_are_read_as_flanneld_reads_them() {
    let run = |vars: &[(&str, &str)], args: &[&str]| {
        let vars: std::collections::BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let argv = std::iter::once("overlay-agent").chain(args.iter().copied()).map(OsString::from);
        super::parse_with_env(argv, |n| vars.get(n).map(OsString::from))
    };
    let (cli, notes) = run(
        &[
            ("FLANNELD_IP_MASQ", "1"),
            ("FLANNELD_IPTABLES_FORWARD_RULES", "F"),
            ("FLANNELD_IFACE", ""),
            ("FLANNELD_PUBLIC_IP", ""),
            ("FLANNELD_HEALTHZ_PORT", "0x1f90"),
            ("FLANNELD_IPTABLES_RESYNC", "010"),
            ("FLANNELD_V", "3"),
            ("FLANNELD_ETCD_ENDPOINTS", "https://a:2379,https://b:2379"),
        ],
        &[],
    )
    .expect("parses");
    assert!(cli.run.ip_masq, "FLANNELD_IP_MASQ=1 is true");
    assert!(!cli.run.iptables_forward_rules, "FLANNELD_IPTABLES_FORWARD_RULES=F is false");
    assert!(cli.run.iface.is_empty() && cli.run.public_ip.is_none(), "empty variables are unset");
    assert_eq!((cli.run.healthz_port, cli.run.iptables_resync), (8080, 8), "Go's base-0 integers");
    assert_eq!(cli.log.v, Some(3));
    assert_eq!(cli.etcd.etcd_endpoints, vec!["https://a:2379", "https://b:2379"]);
    assert!(notes.is_empty(), "{notes:?}");

    // Go's flag package sets a boolean it cannot parse to false and an integer to 0, and
    // flanneld only logs it: so here, with a note.
    let (cli, notes) = run(&[("FLANNELD_IPTABLES_FORWARD_RULES", "yes"), ("FLANNELD_HEALTHZ_PORT", "eighty")], &[]).expect("parses");
    assert!(!cli.run.iptables_forward_rules, "a bad boolean reads as false, as in flanneld (the default is true)");
    assert_eq!(cli.run.healthz_port, 0);
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].starts_with("FLANNELD_HEALTHZ_PORT: \"eighty\" is not a number") && notes[0].contains("read as 0"), "{notes:?}");
    assert!(notes[1].starts_with("FLANNELD_IPTABLES_FORWARD_RULES: \"yes\" is not a boolean") && notes[1].contains("read as false"), "{notes:?}");
    // 0 is no renew margin: flanneld exits, and so does this.
    let e = run(&[("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "abc")], &[]).expect_err("refused").to_string();
    assert!(e.contains("FLANNELD_SUBNET_LEASE_RENEW_MARGIN: \"abc\" is not a number") && e.contains("reads it as 0"), "{e}");
    // Values flanneld keeps as strings and refuses when it uses them, and this agent's own
    // flags: an error naming the variable.
    for (var, val) in [("FLANNELD_PUBLIC_IP", "banana"), ("FLANNELD_BACKEND", "udpp"), ("FLANNELD_IFACE_CAN_REACH", "10.0.0.300")] {
        let e = run(&[(var, val)], &[]).expect_err(var).to_string();
        assert!(e.contains(&format!("{var}: \"{val}\" is not a value")), "{e}");
    }
    // The command line wins over the environment, a bad variable's too.
    let (cli, notes) = run(
        &[("FLANNELD_SUBNET_LEASE_RENEW_MARGIN", "7"), ("FLANNELD_HEALTHZ_PORT", "x"), ("FLANNELD_IP_MASQ", "true")],
        &["-subnet-lease-renew-margin=5", "--healthz-port=8", "-ip-masq=false"],
    )
    .expect("parses");
    assert_eq!((cli.run.subnet_lease_renew_margin, cli.run.healthz_port, cli.run.ip_masq), (5, 8, false));
    assert_eq!(notes.len(), 1, "the bad variable is still noted: {notes:?}");
    // A bad command line is an error; a subcommand goes with any agent variable.
    assert!(run(&[], &["--subnet-lease-renew-margin=abc"]).is_err());
    let (cli, _) = run(&[("FLANNELD_IP_MASQ", "1"), ("FLANNELD_ETCD_PREFIX", "/x")], &["leases"]).expect("parses");
    assert!(matches!(cli.command, Some(Command::Leases)));
    assert_eq!(cli.etcd.etcd_prefix, "/x");
}

#[test]
fn go_integers() {
    for (text, want) in [("0", 0), ("42", 42), ("-7", -7), ("+7", 7), ("0x1F90", 8080), ("010", 8), ("0o17", 15), ("0b101", 5), ("1_000", 1000)] {
        assert_eq!(parse_go_int(text), Ok(want), "{text}");
    }
    for bad in ["", "x", "0x", "1__0", "_1", "1_", "08", "1.5", " 1"] {
        assert!(parse_go_int(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn go_booleans_and_klog_flags_on_the_command_line() {
    let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
    for (word, want) in [("1", true), ("t", true), ("T", true), ("TRUE", true), ("true", true), ("True", true),
        ("0", false), ("f", false), ("F", false), ("FALSE", false), ("false", false), ("False", false)] {
        assert_eq!(parse_go_bool(word), Ok(want), "{word}");
        let cli = parse(&["overlay-agent", &format!("-ip-masq={word}"), &format!("--ip-blackhole-route={word}")]);
        assert_eq!((cli.run.ip_masq, cli.run.ip_blackhole_route), (want, want), "{word}");
    }
    for bad in ["yes", "", "2", "tRUE"] {
        assert!(parse_go_bool(bad).is_err(), "{bad:?}");
    }
    // klog's flags, as flanneld's unit files give them.
    for (args, v, filter) in [
        (vec!["overlay-agent", "-v=2"], Some(2), "info,overlay_agent=debug"),
        (vec!["overlay-agent", "-v", "0"], Some(0), "info"),
        (vec!["overlay-agent", "--v=5"], Some(5), "info,overlay_agent=trace"),
        (vec!["overlay-agent"], None, "info"),
        (vec!["overlay-agent", "leases", "-v=1"], Some(1), "info,overlay_agent=debug"),
        (vec!["overlay-agent", "-v=-1"], Some(-1), "info"),
    ] {
        let (cli, _) = super::parse(argv(&args)).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!((cli.log.v, cli.log.filter()), (v, filter), "{args:?}");
    }
    let (cli, _) = super::parse(argv(&["overlay-agent", "-v=2", "-vmodule=main=3,subnet=4", "-log_backtrace_at=main.go:100"])).expect("parses");
    let notes = cli.log.notes();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].contains("-vmodule=main=3,subnet=4") && notes[1].contains("-log_backtrace_at=main.go:100"), "{notes:?}");
    assert!(super::parse(argv(&["overlay-agent", "-v=high"])).is_err());
}

/// Cases from Go's time.ParseDuration tests (those a positive TTL can be), and its errors.
#[test]
fn lease_ttl_durations_in_gos_form() {
    let secs = |s: &str| parse_duration(s).map(|d| d.as_secs_f64());
    for (text, want) in [
        ("24h", 86400.0), ("90m", 5400.0), ("45", 45.0), ("1h30m", 5400.0), ("1.5h", 5400.0),
        ("2h45m", 9900.0), ("3m30s", 210.0), ("1m0.5s", 60.5), ("1.s", 1.0), ("5s", 5.0), ("1h1m1s", 3661.0),
        ("1500ms", 1.5), ("1000000us", 1.0), ("1000000µs", 1.0), ("1000000000ns", 1.0), (".5m", 30.0),
    ] {
        assert_eq!(secs(text), Ok(want), "{text:?}");
    }
    for bad in ["", "h", "10d", "-5s", "0s", "0", "300ms", ".", ".s", "1..5s", "3", "1hh", "5 s", "s5"] {
        if bad == "3" {
            continue; // a plain number is seconds
        }
        assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
    }
}

#[test]
fn renew_margin_has_flannels_range() {
    assert_eq!(parse_renew_margin("1"), Ok(1));
    assert_eq!(parse_renew_margin("1439"), Ok(1439));
    for bad in ["0", "1440", "-1", "x", ""] {
        assert!(parse_renew_margin(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn help_never_shows_the_password() {
    if !in_child_with_env("help_never_shows_the_password", &[("FLANNELD_ETCD_PASSWORD", "s3cret-in-env")]) {
        return;
    }
    assert_eq!(std::env::var("FLANNELD_ETCD_PASSWORD").as_deref(), Ok("s3cret-in-env"));
    let help = Cli::command().render_long_help().to_string();
    assert!(help.contains("--etcd-password"));
    assert!(!help.contains("s3cret-in-env"), "{help}");
}

#[test]
fn bad_cidrs_and_macs_are_parse_errors() {
    assert!(Cli::try_parse_from(["overlay-agent", "--network", "10.244.0.0/33"]).is_err());
    assert!(Cli::try_parse_from(["overlay-agent", "--network", "banana"]).is_err());
    let e = Cli::try_parse_from(["overlay-agent", "route", "add", "10.244.2.0/24", "--public-ip", "1.2.3.4", "--vtep-mac", "nope"])
        .expect_err("bad MAC");
    assert!(e.to_string().contains("is not a MAC address"), "{e}");
}
