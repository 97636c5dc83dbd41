//! Hostile input to every userspace parser: arbitrary bytes and structured-but-wrong values
//! give an error (or a value), never a panic; valid values round-trip.

use std::{collections::BTreeMap, ffi::OsString, net::Ipv4Addr};

use overlay_agent::{
    config,
    docker_opts::{parse_env_file, render, DockerOptsArgs},
    lease::{parse_subnet_key, subnet_key, LeaseAttrs},
};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[a-zA-Z0-9./:-]{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("Network".to_string()), Just("SubnetLen".to_string()), Just("SubnetMin".to_string()),
                    Just("SubnetMax".to_string()), Just("Backend".to_string()), Just("Type".to_string()),
                    Just("VNI".to_string()), Just("Port".to_string()), Just("PublicIP".to_string()),
                    Just("BackendData".to_string()), Just("VtepMAC".to_string()), "[a-z]{1,8}".prop_map(String::from),
                ],
                inner,
                0..5,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn network_config_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = config::parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn structured_network_configs_never_panic(v in json_value()) {
        if let Ok(c) = config::parse(&v.to_string()) {
            // Whatever is accepted is consistent.
            prop_assert!(c.subnet_min <= c.subnet_max);
            prop_assert!(c.network.contains(&c.subnet_min));
            prop_assert!(c.subnet_len > c.network.prefix_len() && c.subnet_len <= 30);
        }
    }

    #[test]
    fn configs_with_random_numbers_are_consistent_when_accepted(net in any::<u32>(), plen in 0u8..33, slen in 0u32..40, min in any::<u32>(), max in any::<u32>()) {
        let json = format!(r#"{{"Network":"{}/{plen}","SubnetLen":{slen},"SubnetMin":"{}","SubnetMax":"{}","Backend":{{"Type":"vxlan"}}}}"#,
            Ipv4Addr::from(net), Ipv4Addr::from(min), Ipv4Addr::from(max));
        if let Ok(c) = config::parse(&json) {
            prop_assert!(c.subnets().all(|s| c.fits(&s)));
        }
    }

    #[test]
    fn lease_values_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), v in json_value()) {
        let _ = LeaseAttrs::parse(&bytes).map(|a| a.vtep_mac());
        let _ = LeaseAttrs::parse(v.to_string().as_bytes()).map(|a| a.vtep_mac());
    }

    #[test]
    fn vxlan_leases_round_trip(ip in any::<u32>(), vni in 0u32..0x0100_0000, mac in any::<[u8; 6]>()) {
        let a = LeaseAttrs::vxlan(Ipv4Addr::from(ip), vni, mac);
        let back = LeaseAttrs::parse(a.to_json().as_bytes()).unwrap();
        prop_assert_eq!(back.vtep_mac().unwrap(), mac);
        prop_assert_eq!(back, a);
    }

    #[test]
    fn subnet_keys_never_panic_and_round_trip(s in "[0-9.\\-/a-z&:]{0,40}", ip in any::<u32>(), len in 1u8..33) {
        // A /0 "subnet" would route everything: refused, as an IPv6-only node's 0.0.0.0-0 is.
        let _ = parse_subnet_key(&s);
        let net = ipnet::Ipv4Net::new(Ipv4Addr::from(ip), len).unwrap().trunc();
        prop_assert_eq!(parse_subnet_key(&subnet_key(&net)).unwrap(), net);
    }

    #[test]
    fn subnet_files_and_docker_options_never_panic(text in "(([A-Z_]{1,16}=[^\\n]{0,30})?\\n){0,8}", key in "[A-Za-z_0-9]{0,10}") {
        let env = parse_env_file(&text);
        let args = DockerOptsArgs {
            flannel_env: "/x".into(), docker_env: "/y".into(), individual: false, combined: false,
            key: if key.is_empty() { "DOCKER_OPTS".into() } else { key }, no_ip_masq: false,
        };
        let _ = render(&args, &env, &BTreeMap::new());
    }

    #[test]
    fn command_lines_never_panic(words in prop::collection::vec("-{0,2}[a-z-]{0,16}(=[a-z0-9./]{0,8})?", 0..8)) {
        let argv: Vec<OsString> = std::iter::once("overlay-agent".to_string()).chain(words).map(OsString::from).collect();
        let _ = overlay_agent::cli::parse(argv);
    }
}
