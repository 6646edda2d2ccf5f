//! The `ft-vmm` binary: record with a tap in a netns, stop with SIGINT, replay the file,
//! dump it; a bad image gives a clear error and a failing exit status.
mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ft-vmm");

fn field(out: &str, name: &str) -> String {
    out.lines()
        .find(|l| l.trim_start().starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in output:\n{out}"))
        .trim()
        .to_string()
}

#[test]
fn cli_record_stop_replay_dump() {
    let ns = NetNs::new("cli");
    let log = format!("/tmp/ftvmm-cli-{}.log", std::process::id());
    let child = Command::new(BIN)
        .args([
            "run", "--mode", "record", "--log", &log, "--tap", TAP, "--netns", &ns.name, "--quiet",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    ns.wait_ready(Duration::from_secs(20));
    assert_eq!(ns.redis(&["SET", "x", "1"]), "OK");
    assert_eq!(ns.redis(&["INCR", "x"]), "2");
    // SAFETY: signals our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = with_timeout(Duration::from_secs(30), move || {
        child.wait_with_output().unwrap()
    });
    let rec = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "record failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rec.contains("Stopped"), "{rec}");

    let out = Command::new(BIN)
        .args(["run", "--mode", "replay", "--log", &log, "--quiet"])
        .output()
        .unwrap();
    let rep = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(rep.contains("ReplayComplete"), "{rep}");
    for f in ["exits:", "state_hash:", "tx_hash:", "tx_frames:"] {
        assert_eq!(field(&rec, f), field(&rep, f));
    }
    let out = Command::new(BIN).args(["log-dump", &log]).output().unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.lines().next().unwrap().contains("header"));
    assert!(
        dump.contains("rx-frame")
            && dump.contains("clock")
            && dump.lines().last().unwrap().contains("end")
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn cli_rejects_bad_image() {
    let out = Command::new(BIN)
        .args(["run", "--guest", "/dev/null", "--quiet"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid guest image"), "{err}");
}
