//! Project tasks. `cargo xtask demo` brings up the two-host testbed in network namespaces,
//! starts the arbiter and the appliance on both hosts, pushes traffic through it and
//! prints what the logging channel and the output gate did. `cargo xtask test` runs every
//! check and test (what CI runs).
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, blast, embedded_fence, names::*,
    start_arbiter, udp_frame,
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build, then run the appliance on the namespace testbed and show what it did.
    Demo,
    /// Formatting, clippy, build and every test (CI).
    Test,
    /// Formatting and clippy only.
    Lint,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The guest kernel is its own workspace (target x86_64-unknown-none).
    let guest = ["--manifest-path", "vmm/guest/Cargo.toml"];
    run(cargo().arg("fmt").args(guest).arg("--check"))?;
    run(cargo().arg("clippy").args(guest).args([
        "--release",
        "--target",
        "x86_64-unknown-none",
        "--",
        "-D",
        "warnings",
    ]))
}

fn test() -> Result<()> {
    let t0 = Instant::now();
    lint()?;
    run(cargo().args(["build", "--bins"]))?;
    // Test binaries run one after another; tests that share the testbed serialize
    // themselves. Root, KVM, BPF and namespaces are used for real.
    run(cargo().args(["test", "--no-fail-fast"]))?;
    eprintln!("all checks and tests passed in {:?}", t0.elapsed());
    Ok(())
}

fn target_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    dir.join("debug").join(name)
}

fn demo() -> Result<()> {
    run(cargo().args([
        "build",
        "--bins",
        "-p",
        "ftd",
        "-p",
        "ft-fence",
        "-p",
        "ft-testbed",
    ]))?;
    // SAFETY-free env setup: tell the fixtures where the freshly built binaries are.
    for (var, bin) in [
        ("FTD_BIN", "ftd"),
        ("FT_STANDIN_BIN", "ft-standin"),
        ("FT_ARBITER_BIN", "ft-arbiter"),
    ] {
        // Only this single-threaded process reads these variables.
        unsafe_env(var, target_bin(bin));
    }
    println!("== testbed: two hosts (client NIC + logging NIC each), a client, an arbiter");
    let tb = Testbed::new(TestbedOptions {
        quiet_standins: true,
        ..Default::default()
    })?;
    print!("{}", tb.describe());
    let _arb = start_arbiter(&tb)?;
    println!(
        "== ft-arbiter up at {}; starting ftd on host A (primary) and host B (backup)",
        ft_testbed::appliance::ARBITER_ADDR
    );
    let app = Appliance::start(
        &tb,
        &ApplianceOptions {
            fence: embedded_fence(2000, 400),
            ..Default::default()
        },
    )?;
    let live = Appliance::wait_until(Duration::from_secs(10), || {
        app.status('a')
            .ok()
            .and_then(|s| s["role"].as_str().map(|r| r == "primary"))
            .unwrap_or(false)
    });
    if !live {
        bail!("host A did not go live:\n{}", app.guard('a').log_contents());
    }
    let st = app.status('a')?;
    println!(
        "host A won test-and-set: live as primary, epoch {}",
        st["epoch"]
    );

    let c = tb.vm_client()?;
    let t = Instant::now();
    let mut last = String::new();
    for _ in 0..500 {
        last = c
            .request("INCR demo", Duration::from_secs(2))?
            .context("request timed out")?;
    }
    println!(
        "== 500 client requests (INCR) through the appliance: last reply {last}, {:.0} us per round trip",
        t.elapsed().as_micros() as f64 / 500.0
    );

    println!("== output rule: backup paused (no acks) ...");
    app.pause('b')?;
    c.send("INCR demo")?;
    let during = c.recv(Duration::from_millis(500))?;
    println!(
        "   reply while the backup is paused: {:?}; frames held in the kernel: {}",
        during.map(|r| r.0),
        app.held('a')?
    );
    let t = Instant::now();
    app.resume('b')?;
    let after = c.recv(Duration::from_secs(2))?.map(|r| r.0);
    println!(
        "   backup resumed: reply {:?} released after {:?}",
        after,
        t.elapsed()
    );

    println!("== 50,000-frame burst with every 50th log frame lost on the logging link");
    tb.set_log_loss(Some(50))?;
    let frames: Vec<Vec<u8>> = (0u32..50_000)
        .map(|i| {
            udp_frame(
                [2, 0, 0, 0, 0, 1],
                VM_MAC,
                [10, 77, 0, 1].into(),
                VM_IP,
                40000,
                9,
                &i.to_be_bytes(),
            )
        })
        .collect();
    blast(&tb.client_ns, BRIDGE, &frames, Some(30_000))?;
    Appliance::wait_until(Duration::from_secs(20), || {
        let (a, b) = (app.status('a').ok(), app.status('b').ok());
        matches!((a, b), (Some(a), Some(b)) if a["log"]["acked"] == a["log"]["last_seq"] && b["log"]["delivered"] == a["log"]["last_seq"])
    });
    tb.set_log_loss(None)?;
    let r = c.request("GET demo", Duration::from_secs(2))?;
    println!("   after the burst the service still answers: GET demo -> {r:?}");

    for (host, name) in [('a', "host A (primary)"), ('b', "host B (backup)")] {
        let s = app.status(host)?;
        println!(
            "== {name}: role {} epoch {} lease {}",
            s["role"], s["epoch"], s["lease_remaining_s"]
        );
        println!("   log: {}", s["log"]);
        println!("   held output frames now: {}", s["held_frames"]);
        println!("   channel: {}", s["channel"]);
        let nonzero = |v: &serde_json::Value| -> String {
            v.as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(_, v)| v.as_u64() != Some(0))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        println!("   counters: {}", nonzero(&s["counters"]));
        println!("   drops: {}", nonzero(&s["drops"]));
    }
    println!("== hold-time histogram of the primary (Prometheus, GET /metrics in host A):");
    let metrics =
        ft_testbed::netns::try_run_in_ns(&tb.a.ns, || http_get("127.0.0.1:9477", "/metrics"))??;
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("ft_output_hold_seconds"))
    {
        println!("   {l}");
    }
    println!("== done; tearing the testbed down");
    Ok(())
}

fn unsafe_env(var: &str, val: PathBuf) {
    // SAFETY: called before any other thread exists in this process (the demo starts
    // its helper threads afterwards), so no concurrent reader of the environment.
    unsafe { std::env::set_var(var, val) };
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Demo => demo(),
        Cmd::Test => test(),
        Cmd::Lint => lint(),
    }
}
