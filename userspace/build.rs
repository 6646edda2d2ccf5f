//! Builds the eBPF object that the daemon embeds: the `ft` binary of `ft-ebpf`, compiled by
//! the nightly toolchain for bpfel-unknown-none with `-Z build-std=core`, linked by
//! bpf-linker for BPF CPU v3 (atomic fetch-add / compare-and-swap are used by the data
//! plane). aya-build does the same but cannot pass a target CPU, hence this small copy.
use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let ebpf_dir = manifest.join("../ebpf/programs");
    let common_dir = manifest.join("../ebpf/common");
    for d in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", d.display());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("ebpf-target");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "ft-ebpf",
        "--bins",
        "--release",
    ])
    .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&ebpf_dir)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
        "RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run `rustup run nightly cargo` ({e}); run scripts/bootstrap.sh first")
    });
    if !out.status.success() {
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            println!("cargo:warning={line}");
        }
        panic!(
            "building the eBPF programs failed (see warnings above). Missing tools? run \
             scripts/bootstrap.sh (nightly rust-src, bpf-linker)"
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/ft");
    fs::copy(&obj, out_dir.join("ft")).unwrap_or_else(|e| panic!("copy {}: {e}", obj.display()));
}
