#![no_main]
//! flannel's lease JSON: never a panic; accepted values round-trip.
use overlay_agent::lease::LeaseAttrs;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(a) = LeaseAttrs::parse(data) {
        let _ = a.vtep_mac();
        let again = LeaseAttrs::parse(a.to_json().as_bytes()).expect("our own JSON parses");
        assert_eq!(again.public_ip, a.public_ip);
    }
});
