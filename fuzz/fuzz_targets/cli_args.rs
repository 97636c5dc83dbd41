#![no_main]
//! Command lines (Go-style flags included) and FLANNELD_ values: never a panic.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let argv = std::iter::once("overlay-agent".to_string()).chain(text.split(|c| c == '\0' || c == ' ').map(str::to_string));
    let _ = overlay_agent::cli::parse(argv.map(std::ffi::OsString::from));
});
