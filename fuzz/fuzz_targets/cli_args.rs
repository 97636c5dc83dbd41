#![no_main]
//! Command lines (Go-style flags included) and FLANNELD_ values: never a panic.
use clap::Parser as _;
use overlay_agent::cli::{normalize_args, Cli};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let argv = std::iter::once("overlay-agent".to_string()).chain(text.split(|c| c == '\0' || c == ' ').map(str::to_string));
    let _ = Cli::try_parse_from(normalize_args(argv.map(std::ffi::OsString::from)));
});
