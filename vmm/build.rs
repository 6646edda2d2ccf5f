//! Builds the guest (vmm/guest, its own Cargo project) for x86_64-unknown-none and puts
//! the ELF at $OUT_DIR/ft-guest.elf, where `ft_vmm::GUEST_ELF` embeds it.
use std::path::PathBuf;
use std::process::Command;

#[path = "src/scan.rs"]
mod scan;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest.join("guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out.join("guest-target");
    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "link.ld",
        "build.rs",
        ".cargo/config.toml",
        "../service/src",
        "../service/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    // Do not leak the host build's flags, wrappers (clippy) or target into the guest build.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_FEATURE_")
            || k.starts_with("CARGO_CFG_")
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("DEP_")
            || matches!(
                k.as_str(),
                "RUSTFLAGS"
                    | "CARGO_ENCODED_RUSTFLAGS"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "CARGO_BUILD_TARGET"
                    | "CARGO_TARGET_DIR"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "RUSTDOC"
                    | "CARGO_MAKEFLAGS"
                    | "CARGO_LLVM_COV"
            )
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the guest (vmm/guest)");
    if !status.success() {
        panic!(
            "building the guest failed (cd vmm/guest && cargo build --release shows the error; \
             needs `rustup target add x86_64-unknown-none`)"
        );
    }
    let elf = target_dir.join("x86_64-unknown-none/release/ft-guest");
    let image = std::fs::read(&elf).expect("guest ELF missing after build");
    // A replicated guest must not read time, randomness or host identity directly: the
    // backup would see other values than the primary. A new dependency could bring such
    // an instruction in, so the build checks the machine code.
    let bad = scan::forbidden_instructions(&image);
    if !bad.is_empty() {
        let list: Vec<String> = bad
            .iter()
            .map(|f| format!("{} at {:#x}", f.mnemonic, f.addr))
            .collect();
        panic!(
            "the guest image contains instructions that break record/replay: {}; take time and \
             entropy from the clock and entropy devices instead (objdump -d the guest to find the caller)",
            list.join(", ")
        );
    }
    std::fs::write(out.join("ft-guest.elf"), image).expect("writing the guest ELF");
}
