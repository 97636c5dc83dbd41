//! Builds the eBPF programs (overlay-ebpf) for bpfel-unknown-none with the nightly toolchain,
//! as aya-template does; the agent embeds the object. `AYA_BUILD_SKIP=1` skips it (for
//! tooling that only needs the host code to type-check).
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .join("overlay-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {root:?}"))?;
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed={root}/../overlay-common/src");
    // AYA_BUILD_SKIP=1 (fuzzing, docs, linting without the eBPF toolchain): an empty object
    // keeps the crate compiling; loading it fails with a clear message.
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("overlay-ebpf");
        if !out.exists() {
            std::fs::write(&out, b"")?;
        }
    }
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_UPGRADE_VARIANT");
    let variant = std::env::var_os("CARGO_FEATURE_UPGRADE_VARIANT").is_some();
    let pkg = aya_build::Package {
        name: "overlay-ebpf",
        root_dir: root,
        features: if variant { &["upgrade-variant"] } else { &[] },
        ..Default::default()
    };
    aya_build::build_ebpf([pkg], aya_build::Toolchain::default())
        .context("building the eBPF programs failed; run `cargo xtask setup` (nightly rust-src and bpf-linker are needed)")
}
