#![no_main]
//! Lease keys (`10.244.1.0-24`, dual stack `10.244.1.0-24&fd00::-64`, IPv6-only
//! `0.0.0.0-0&fd00::-64`): never a panic;
//! accepted keys round-trip.
use overlay_agent::lease::{parse_lease_key, parse_subnet_key, subnet_key};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(net) = parse_subnet_key(&s) {
        assert_eq!(parse_subnet_key(&subnet_key(&net)), Ok(net));
    }
    if let Ok(key) = parse_lease_key(&s) {
        assert_eq!(parse_lease_key(&key.name()), Ok(key));
    }
    let _ = overlay_agent::subnet_file::SubnetEnv {
        ipv4: Some(("10.0.0.0/8".parse().unwrap(), "10.1.0.0/24".parse().unwrap())),
        mtu: 1450,
        ip_masq: true,
        ipv6: None,
    }
    .render();
});
