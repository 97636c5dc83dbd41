#![no_main]
//! The subnet file as mk-docker-opts reads it, and the options it renders: never a panic.
use std::collections::BTreeMap;

use overlay_agent::docker_opts::{parse_env_file, render, DockerOptsArgs};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let env = parse_env_file(&text);
    let key = text.lines().next().unwrap_or("DOCKER_OPTS").chars().take(12).collect::<String>();
    for (i, c) in [false, true].into_iter().enumerate() {
        let args = DockerOptsArgs {
            flannel_env: "/f".into(),
            docker_env: "/d".into(),
            individual: i == 0,
            combined: c,
            key: key.clone(),
            no_ip_masq: c,
        };
        let _ = render(&args, &env, &BTreeMap::new());
    }
});
