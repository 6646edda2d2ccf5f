//! Project tasks. `cargo xtask demo` brings up the two-host testbed in network namespaces,
//! starts the arbiter and the appliance (ftd running the VMM) on both hosts, drives the
//! protected VM's service with stock redis tools and prints what the logging channel,
//! the output gate and the backup's replay did. `cargo xtask test` runs every
//! check and test (what CI runs). `cargo xtask chaos --faults N --seed S` runs the chaos
//! suite (`ft_testbed::chaos`) and prints its report. `cargo xtask plots` redraws the
//! benchmarks' committed plots from their results under perf/results.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ft_testbed::chaos::nemesis::FaultKind;

mod demo;
mod package;
mod plots;

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
    /// The Debian packages of ftd and ft-arbiter, in target/debian/.
    Package {
        /// Optimized and stripped (what an operator installs); the default is the debug
        /// build the tests install.
        #[arg(long)]
        release: bool,
    },
    /// Formatting and clippy only.
    Lint,
    /// Redraw every committed benchmark plot from perf/results/<name>/results.json.
    Plots,
    /// The chaos suite: random faults under concurrent clients, the history checked for
    /// linearizability (stateright). A failing seed replays the same fault schedule.
    Chaos {
        /// Steps of the fault schedule (each one or two faults).
        #[arg(long, default_value_t = 20)]
        faults: usize,
        /// Seed of the schedule and of the clients' operation mix.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Concurrent clients.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Calls per second over all clients between throughput samples (0: unpaced).
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Guest RAM in MiB (what every re-protection transfers).
        #[arg(long, default_value_t = 256)]
        ram_mib: u64,
        /// Where the history and the report are written.
        #[arg(long, default_value = "target/chaos")]
        out: PathBuf,
        /// Kinds of fault to draw from, comma-separated (default: all): kill-ftd,
        /// power-cut, pause, log-partition, client-partition, log-loss-reorder,
        /// etcd-member-kill, arbiter-unreachable, restart-ftd, throttle-backup,
        /// kill-joiner-after-cut, arbiter-outage-while-solo.
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
        /// Turn the output rule off (`hold_output = false`), to explore what the suite
        /// sees without it (see the README: its window is narrow with this workload).
        #[arg(long)]
        unsafe_no_output_rule: bool,
        /// Run release builds of the daemons (what the README's figures use); the
        /// default debug builds check the same properties, slower.
        #[arg(long)]
        release: bool,
        /// More clients, unpaced, on keys of their own (checked too), beside `--clients`.
        #[arg(long, default_value_t = 0)]
        extra_clients: usize,
    },
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
    // The packages the package test installs (after the build: same binaries).
    package::package(false)?;
    // Test binaries run one after another; tests that share the testbed serialize
    // themselves. Root, KVM, BPF and namespaces are used for real.
    run(cargo().args(["test", "--no-fail-fast"]))?;
    eprintln!("all checks and tests passed in {:?}", t0.elapsed());
    Ok(())
}

fn target_bin(name: &str, release: bool) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    dir.join(if release { "release" } else { "debug" })
        .join(name)
}

/// Builds the binaries the testbed fixtures run and tells the fixtures where they are.
fn build_fixture_bins(release: bool) -> Result<()> {
    run(cargo()
        .arg("build")
        .args(release.then_some("--release"))
        .args(["--bins", "-p", "ftd", "-p", "ft-fence", "-p", "ft-testbed"]))?;
    // SAFETY-free env setup: tell the fixtures where the freshly built binaries are.
    for (var, bin) in [
        ("FTD_BIN", "ftd"),
        ("FT_STANDIN_BIN", "ft-standin"),
        ("FT_ARBITER_BIN", "ft-arbiter"),
    ] {
        // Only this single-threaded process reads these variables.
        unsafe_env(var, target_bin(bin, release));
    }
    Ok(())
}

fn demo() -> Result<()> {
    build_fixture_bins(false)?;
    demo::run()
}

fn chaos(o: ft_testbed::chaos::ChaosOptions, release: bool) -> Result<()> {
    build_fixture_bins(release)?;
    eprintln!(
        "chaos: {} steps, seed {}, {} clients at {} calls/s, {} MiB guest; history in {}",
        o.faults,
        o.seed,
        o.clients,
        o.rate,
        o.ram_mib,
        o.out_dir.display()
    );
    let report = ft_testbed::chaos::run(&o, &mut |line| eprintln!("{line}"))?;
    println!("{report}");
    if !report.passed() {
        bail!(
            "the chaos run failed; `cargo xtask chaos --faults {} --seed {}` replays its schedule",
            o.faults,
            o.seed
        );
    }
    Ok(())
}

fn unsafe_env(var: &str, val: PathBuf) {
    // SAFETY: called before any other thread exists in this process (the demo starts
    // its helper threads afterwards), so no concurrent reader of the environment.
    unsafe { std::env::set_var(var, val) };
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Demo => demo(),
        Cmd::Test => test(),
        Cmd::Package { release } => package::package(release).map(|_| ()),
        Cmd::Lint => lint(),
        Cmd::Plots => plots::run(&root()),
        Cmd::Chaos {
            faults,
            seed,
            clients,
            rate,
            ram_mib,
            out,
            kinds,
            unsafe_no_output_rule,
            release,
            extra_clients,
        } => {
            let mut o = ft_testbed::chaos::ChaosOptions {
                clients,
                rate,
                ram_mib,
                extra_clients,
                output_rule: !unsafe_no_output_rule,
                ..ft_testbed::chaos::ChaosOptions::new(faults, seed, root().join(out))
            };
            if !kinds.is_empty() {
                o.kinds = kinds
                    .iter()
                    .map(|k| {
                        FaultKind::from_name(k).with_context(|| format!("no fault kind {k:?}"))
                    })
                    .collect::<Result<_>>()?;
            }
            chaos(o, release)
        }
    }
}
