//! Rebuild the programs when bpf-linker changes (a new LLVM changes the object code).
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
