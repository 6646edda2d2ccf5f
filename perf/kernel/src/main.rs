//! `ft-perf-kernel`: what each data-plane program costs per frame, measured by the kernel
//! itself with `BPF_PROG_RUN` (`BPF_PROG_TEST_RUN`), and the duplication path's
//! throughput with live frames on one core (issue 12, "performance at the physical
//! floor").
//!
//! The programs are the eBPF object ftd embeds (`FT_TEST_EBPF_OBJECT` or `--object`
//! runs another build), loaded and configured by `ftd::dataplane::testrun` as a primary
//! or backup node would have them, attached to nothing except the live-frame receivers
//! and the release sink, all inside a private network namespace that dies with the
//! process. Every measurement runs on one pinned CPU.
//!
//! ```text
//! sudo ft-perf-kernel                         # table on stdout
//! sudo ft-perf-kernel --out perf/results/kernel   # + results.json and SVG charts
//! ft-perf-kernel --replot perf/results/kernel     # charts again from results.json
//! ```
mod env;
mod live;
mod measure;
mod plots;
mod report;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ft_common::{maps::ROLE_PRIMARY, wire};
use ftd::dataplane::testrun::{TestNode, TestPlane};

use crate::report::{Meta, Results};

#[derive(Parser, Debug)]
#[command(
    about = "Per-frame cost of the data-plane programs (BPF_PROG_RUN) and live-frame duplication throughput"
)]
struct Cli {
    /// Write results.json and the SVG charts into DIR.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Draw the charts again from DIR/results.json (no measuring, no root).
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    replot: Option<PathBuf>,
    /// Samples per cell (median and min–max are over these).
    #[arg(long, default_value_t = 7)]
    samples: usize,
    /// `repeat` per sample of the rows whose program can run many times on one frame.
    #[arg(long, default_value_t = 200_000)]
    repeat: u32,
    /// Test runs per sample of the per-call rows (programs that rewrite their frame or
    /// need a new sequence number every time).
    #[arg(long, default_value_t = 3_000)]
    calls: u32,
    /// Held frames one ack releases in the release row.
    #[arg(long, default_value_t = 1024)]
    release_n: u32,
    /// Frames per live-frame run.
    #[arg(long, default_value_t = 1_000_000)]
    live_repeat: u32,
    /// Live-frame batch size (BPF_PROG_RUN's `batch_size`, at most 256).
    #[arg(long, default_value_t = 64)]
    live_batch: u32,
    /// Live-frame runs per size.
    #[arg(long, default_value_t = 5)]
    live_samples: usize,
    /// Skip the live-frame throughput.
    #[arg(long)]
    no_live: bool,
    /// Client frame sizes (bytes, Ethernet header included).
    #[arg(long, value_delimiter = ',', default_values_t = vec![64u32, 512, 1500])]
    sizes: Vec<u32>,
    /// The CPU to pin to (default: the last one).
    #[arg(long)]
    cpu: Option<usize>,
    /// Another build of ebpf/programs (default: FT_TEST_EBPF_OBJECT, else ftd's own).
    #[arg(long, value_name = "FILE")]
    object: Option<PathBuf>,
}

/// Sizes of the maps set at load: ftd's default `retx_slots`, and a hold ring of 4096
/// (ftd's default is 2048; a power of two ≤ HOLD_RELEASE_MAX) so runs are longer.
const RETX_SLOTS: u32 = 16384;
const HOLD_SLOTS: u32 = 4096;

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(dir) = &cli.replot {
        let path = dir.join("results.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let r: Results =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for p in plots::render(&r, dir)? {
            eprintln!("wrote {}", p.display());
        }
        return Ok(());
    }
    for &s in &cli.sizes {
        if !(60..=wire::MAX_FRAME as u32).contains(&s) {
            bail!("frame size {s}: use 60..={} bytes", wire::MAX_FRAME);
        }
    }
    if cli.samples == 0 || cli.calls == 0 || cli.repeat == 0 {
        bail!("--samples, --calls and --repeat must be at least 1");
    }
    let object = match cli
        .object
        .clone()
        .or_else(|| std::env::var_os("FT_TEST_EBPF_OBJECT").map(PathBuf::from))
    {
        Some(p) => std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        None => ftd::dataplane::EBPF_OBJECT.to_vec(),
    };
    env::enter_private_netns()?;
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = cli.cpu.unwrap_or(nproc - 1);
    env::pin_to_cpu(cpu)?;

    let wires = live::wires().context("creating the namespace's interfaces")?;
    let mut plane = TestPlane::load(&object, RETX_SLOTS, HOLD_SLOTS)?;
    // The fence guard on the release sink's egress, as on a client NIC.
    {
        let p: &mut aya::programs::SchedClassifier = plane
            .ebpf_mut()
            .program_mut("ft_client_egress")
            .context("ft_client_egress")?
            .try_into()?;
        p.attach(live::SINK, aya::programs::TcAttachType::Egress)
            .context("attaching ft_client_egress to the release sink")?;
    }
    let mut primary = TestNode::new(ROLE_PRIMARY);
    primary.client_ifindex = wires.sink;
    primary.vm_ifindex = wires.vm;
    primary.log_ifindex = wires.log;
    plane.configure(&primary)?;
    plane.set_fanout(wires.vm, wires.log, true)?;

    let opts = measure::Opts {
        samples: cli.samples,
        repeat: cli.repeat,
        calls: cli.calls,
        release_n: cli.release_n,
        sizes: cli.sizes.clone(),
    };
    let t0 = std::time::Instant::now();
    let mut b = measure::Bench {
        plane: &mut plane,
        primary: primary.clone(),
        opts,
        overhead_ns: 0.0,
    };
    let overhead = b
        .calibrate()
        .context("calibrating the timer overhead with ft_pass")?;
    eprintln!("timer overhead of a repeat=1 run: {overhead:.0} ns");
    let kack = measure::default_kack_interval_ns();
    let mut rows = Vec::new();
    rows.push(b.duplication()?);
    for (kind, interval) in [
        (wire::KIND_LOG, kack),
        (wire::KIND_LOG, 0),
        (wire::KIND_VMLOG, kack),
        (wire::KIND_VMLOG, 0),
    ] {
        rows.push(b.backup_log_rx(kind, interval)?);
    }
    rows.push(b.ack_rx()?);
    rows.push(b.ack_carrier()?);
    rows.push(b.hold_enqueue()?);
    rows.push(b.release()?);
    eprintln!(
        "per-frame costs measured in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let mut live_cells = Vec::new();
    if !cli.no_live {
        let t = std::time::Instant::now();
        let recv = live::receivers(&object)?;
        let lo = live::LiveOpts {
            samples: cli.live_samples,
            repeat: cli.live_repeat,
            batch: cli.live_batch,
            sizes: cli.sizes.clone(),
        };
        live_cells = live::run(&mut plane, &recv, &primary, &wires, &lo, cpu)?;
        eprintln!("live frames measured in {:.1} s", t.elapsed().as_secs_f64());
    }

    let results = Results {
        meta: Meta {
            date_utc: env::date_utc(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            kernel: env::kernel(),
            cpu_model: env::cpu_model(),
            nproc,
            pinned_cpu: cpu,
            samples: cli.samples,
            repeat: cli.repeat,
            calls: cli.calls,
            live_repeat: cli.live_repeat,
            live_batch: cli.live_batch,
            live_samples: cli.live_samples,
            timer_overhead_ns: overhead,
        },
        rows,
        live: live_cells,
        goal_mpps: report::GOAL_MPPS,
        line_rate_10g_1500_mpps: report::LINE_RATE_10G_1500_MPPS,
    };
    println!("{}", report::markdown(&results));
    if let Some(dir) = &cli.out {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("results.json");
        std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        for p in plots::render(&results, dir)? {
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}
