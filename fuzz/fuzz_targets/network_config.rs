#![no_main]
//! flannel's network config JSON: never a panic; what is accepted is consistent.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(c) = overlay_agent::config::parse(&String::from_utf8_lossy(data)) {
        assert!(c.subnet_min <= c.subnet_max);
        assert!(c.network.contains(&c.subnet_min) && c.network.contains(&c.subnet_max));
        assert!(c.subnet_len > c.network.prefix_len() && c.subnet_len <= 30);
    }
});
