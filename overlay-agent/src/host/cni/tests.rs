use super::*;
use std::cell::RefCell;

const V4: &str = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";
const DUAL: &str = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n";

fn conf(json: &str) -> NetConf {
    NetConf::parse(json.as_bytes()).unwrap()
}

/// flannel's own test case (flannel_linux_test.go, "only ipv4 stack"), field for field.
#[test]
fn the_delegate_is_flannels_for_ipv4() {
    let c = conf(r#"{"name":"cni-flannel","type":"flannel","subnetFile":"/x","dataDir":"/y"}"#);
    let d = render_delegate(&c, &SubnetFile::parse(V4).unwrap()).unwrap();
    let want = json!({
        "ipMasq": false,
        "ipam": { "routes": [{ "dst": "10.1.0.0/16" }], "ranges": [[{ "subnet": "10.1.17.0/24" }]], "type": "host-local" },
        "isGateway": true, "mtu": 1472, "name": "cni-flannel", "type": "bridge"
    });
    assert_eq!(Value::Object(d), want);
}

#[test]
fn dual_stack_gives_a_range_and_a_route_per_family_after_the_given_ones() {
    let c = conf(
        r#"{"name":"cbr0","cniVersion":"0.3.1","ipam":{"type":"my-ipam","unknown-param":"x","routes":[{"dst":"10.96.0.0/12"}]},
            "delegate":{"hairpinMode":true,"isDefaultGateway":true},"runtimeConfig":{"portMappings":[]}}"#,
    );
    let mut env = SubnetFile::parse(DUAL).unwrap();
    env.ip_masq = Some(false);
    let d = render_delegate(&c, &env).unwrap();
    assert_eq!(d["ipam"]["type"], "my-ipam");
    assert_eq!(d["ipam"]["unknown-param"], "x");
    assert_eq!(d["ipam"]["ranges"], json!([[{ "subnet": "10.1.17.0/24" }], [{ "subnet": "fc00::/64" }]]));
    assert_eq!(d["ipam"]["routes"], json!([{ "dst": "10.96.0.0/12" }, { "dst": "10.1.0.0/16" }, { "dst": "fc00::/48" }]));
    assert_eq!((d["ipMasq"].clone(), d["cniVersion"].clone(), d["hairpinMode"].clone()), (json!(true), json!("0.3.1"), json!(true)));
    assert_eq!(d["runtimeConfig"], json!({ "portMappings": [] }));
    // Given values win over the subnet file's.
    let c = conf(r#"{"name":"n","delegate":{"type":"ipvlan","mtu":1400,"ipMasq":false}}"#);
    let d = render_delegate(&c, &SubnetFile::parse(V4).unwrap()).unwrap();
    assert_eq!((d["mtu"].clone(), d["ipMasq"].clone(), d.get("isGateway")), (json!(1400), json!(false), None));
}

#[test]
fn delegate_keys_flannel_refuses_are_refused() {
    let env = SubnetFile::parse(V4).unwrap();
    for (delegate, what) in [(r#"{"name":"x"}"#, "'name'"), (r#"{"ipam":{}}"#, "'ipam'"), (r#"{"type":7}"#, "(string) 'type'")] {
        let c = conf(&format!(r#"{{"name":"n","delegate":{delegate}}}"#));
        let e = render_delegate(&c, &env).unwrap_err();
        assert!(e.code == ERR_INVALID_CONFIG && e.msg.contains(what), "{e:?}");
    }
}

#[test]
fn subnet_files_are_read_as_flannel_reads_them() {
    let f = SubnetFile::parse("FLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16,10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n").unwrap();
    assert_eq!(f.networks, ["10.1.0.0/16".parse::<Ipv4Net>().unwrap(), "192.168.0.0/16".parse().unwrap()]);
    assert_eq!(f.ip_masq, Some(false));
    let six = SubnetFile::parse("FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n").unwrap();
    assert_eq!((six.subnet, six.subnet6.map(|s| s.to_string())), (None, Some("fc00::/64".into())));
    let e = SubnetFile::parse("FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_MTU=1472\n").unwrap_err();
    assert_eq!(e, "it is missing FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_IPMASQ");
    assert_eq!(SubnetFile::parse("FLANNEL_SUBNET=10.1.300.1/24\n").unwrap_err(), "FLANNEL_SUBNET=10.1.300.1/24 is not a CIDR");
    assert!(SubnetFile::parse("FLANNEL_MTU=big\n").unwrap_err().contains("FLANNEL_MTU=big is not a number"));
}

#[test]
fn configurations_and_environments_are_checked_as_the_skel_checks_them() {
    let env = |cmd: &str| CniEnv { command: cmd.into(), container_id: "abc".into(), netns: "/run/netns/x".into(), ifname: "eth0".into(), path: "/bin".into(), ..Default::default() };
    let none = NoBridges::default();
    let code = |e: &CniEnv, stdin: &str| run(e, stdin.as_bytes(), &none).unwrap_err().code;
    assert_eq!(code(&env("ADD"), "{"), ERR_DECODING);
    assert_eq!(code(&env("ADD"), r#"{"cniVersion":"0.3.1"}"#), ERR_INVALID_CONFIG);
    assert_eq!(code(&env("ADD"), r#"{"name":"n","cniVersion":"9.9.9"}"#), ERR_INCOMPATIBLE_VERSION);
    let e = run(&env("ADD"), br#"{"name":"n","cniVersion":"9.9.9"}"#, &none).unwrap_err();
    assert!(e.details.contains(r#"config is "9.9.9""#), "{e:?}");
    let mut e1 = env("ADD");
    e1.netns.clear();
    e1.path.clear();
    let e = run(&e1, br#"{"name":"n"}"#, &none).unwrap_err();
    assert_eq!((e.code, e.msg.as_str()), (ERR_ENV, "required env variables [CNI_NETNS,CNI_PATH] missing"));
    let mut e2 = env("DEL");
    e2.netns.clear();
    e2.container_id = "bad id".into();
    assert_eq!(code(&e2, r#"{"name":"n"}"#), ERR_ENV);
    assert_eq!(code(&env("FROB"), r#"{"name":"n"}"#), ERR_ENV);
    let v: Value = serde_json::from_slice(&run(&env("VERSION"), b"", &none).unwrap()).unwrap();
    assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
    // CHECK needs 0.4.0 or later.
    assert_eq!(code(&env("CHECK"), r#"{"name":"n","cniVersion":"0.3.1"}"#), ERR_INCOMPATIBLE_VERSION);
}

#[test]
fn a_missing_subnet_file_says_the_agent_has_not_written_it() {
    let e = SubnetFile::load(Path::new("/nonexistent/subnet.env")).unwrap_err();
    assert_eq!(e.code, ERR_TRY_AGAIN_LATER);
    assert!(e.msg.contains("/nonexistent/subnet.env does not exist") && e.msg.contains("has not written it yet"), "{e:?}");
    let env = CniEnv { command: "STATUS".into(), path: "/bin".into(), ..Default::default() };
    let e = run(&env, br#"{"name":"n","cniVersion":"1.1.0","subnetFile":"/nonexistent/s.env"}"#, &NoBridges::default()).unwrap_err();
    assert_eq!(e.code, ERR_PLUGIN_NOT_AVAILABLE);
}

#[test]
fn a_missing_delegate_names_the_directories_searched() {
    let e = find_plugin("bridge", "/nonexistent/a:/nonexistent/b").unwrap_err();
    assert_eq!(e.code, ERR_DELEGATE_MISSING);
    assert!(e.msg.contains("[/nonexistent/a /nonexistent/b]"), "{e:?}");
}

#[derive(Default)]
struct NoBridges {
    addrs: Option<Vec<Ipv4Net>>,
    ports: Vec<String>,
    deleted: RefCell<Vec<String>>,
}

impl BridgeHost for NoBridges {
    fn addresses(&self, _: &str) -> Option<Vec<Ipv4Net>> {
        self.addrs.clone()
    }
    fn ports(&self, _: &str) -> Vec<String> {
        self.ports.clone()
    }
    fn delete(&self, b: &str) -> Result<(), String> {
        self.deleted.borrow_mut().push(b.into());
        Ok(())
    }
}

#[test]
fn a_bridge_of_an_earlier_lease_is_removed_when_unused_and_explained_when_used() {
    let env = SubnetFile::parse(V4).unwrap();
    let d = render_delegate(&conf(r#"{"name":"n"}"#), &env).unwrap();
    let right = NoBridges { addrs: Some(vec!["10.1.17.1/24".parse().unwrap()]), ..Default::default() };
    assert_eq!(reconcile_bridge(&right, &d, &env).unwrap(), None);
    let unused = NoBridges { addrs: Some(vec!["10.1.5.1/24".parse().unwrap()]), ..Default::default() };
    assert!(reconcile_bridge(&unused, &d, &env).unwrap().unwrap().contains("removed"));
    assert_eq!(*unused.deleted.borrow(), ["cni0"]);
    let used = NoBridges { addrs: Some(vec!["10.1.5.1/24".parse().unwrap()]), ports: vec!["veth1".into()], ..Default::default() };
    let e = reconcile_bridge(&used, &d, &env).unwrap_err();
    assert_eq!(e.code, ERR_BRIDGE_ADDRESS);
    assert!(e.msg.contains("cni0 already has an IP address different from 10.1.17.1/24") && e.msg.contains("10.1.5.1/24") && e.details == "veth1", "{e:?}");
    assert!(used.deleted.borrow().is_empty());
}

#[test]
fn the_conflist_is_kube_flannels() {
    let c: Value = serde_json::from_str(&conflist(Path::new(DEFAULT_SUBNET_FILE), Path::new(DEFAULT_DATA_DIR))).unwrap();
    let kube_flannel = json!({"name":"cbr0","cniVersion":"0.3.1","plugins":[
        {"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},
        {"type":"portmap","capabilities":{"portMappings":true}}]});
    assert_eq!(c, kube_flannel);
    let c: Value = serde_json::from_str(&conflist(Path::new("/run/n1/subnet.env"), Path::new("/var/lib/n1"))).unwrap();
    assert_eq!((c["plugins"][0]["subnetFile"].clone(), c["plugins"][0]["dataDir"].clone()), (json!("/run/n1/subnet.env"), json!("/var/lib/n1")));
}

#[test]
fn install_leaves_a_conflist_it_did_not_write() {
    let dir = std::env::temp_dir().join(format!("overlay-install-cni-{}", std::process::id()));
    let (bin, conf_dir) = (dir.join("bin"), dir.join("net.d"));
    let exe = std::env::current_exe().unwrap();
    let content = conflist(Path::new(DEFAULT_SUBNET_FILE), Path::new(DEFAULT_DATA_DIR));
    let i = install(&exe, &bin, &conf_dir, "10-flannel.conflist", &content, false).unwrap();
    assert!(i.conflist_written && i.plugin.metadata().unwrap().permissions().mode() & 0o111 != 0);
    let again = install(&exe, &bin, &conf_dir, "10-flannel.conflist", &content, false).unwrap();
    assert!(!again.conflist_written, "unchanged");
    // Ours, older: replaced.
    assert!(install(&exe, &bin, &conf_dir, "10-flannel.conflist", "{}\n", false).unwrap().conflist_written);
    // Changed by someone: left alone, unless forced.
    std::fs::write(conf_dir.join("10-flannel.conflist"), "{\"mine\":1}").unwrap();
    let e = install(&exe, &bin, &conf_dir, "10-flannel.conflist", &content, false).unwrap_err().to_string();
    assert!(e.contains("was not written by overlay-agent install-cni"), "{e}");
    assert_eq!(std::fs::read_to_string(conf_dir.join("10-flannel.conflist")).unwrap(), "{\"mine\":1}");
    assert!(install(&exe, &bin, &conf_dir, "10-flannel.conflist", &content, true).unwrap().conflist_written);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_plugin_is_chosen_by_argv0() {
    assert!(invoked_as_plugin(std::ffi::OsStr::new("/opt/cni/bin/flannel")));
    assert!(invoked_as_plugin(std::ffi::OsStr::new("flannel")));
    assert!(!invoked_as_plugin(std::ffi::OsStr::new("/usr/bin/overlay-agent")));
}
