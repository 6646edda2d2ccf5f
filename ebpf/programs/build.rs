//! Rebuild the eBPF object when bpf-linker changes (as aya-template does).
fn main() {
    if let Ok(p) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
