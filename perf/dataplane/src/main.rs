//! `ft-perf-dataplane`: side-by-side benchmark of the appliance's kernel data plane on
//! the namespace testbed (run as root, after `cargo build --release --bins` into one
//! target dir so that `ftd` and `ft-standin` sit next to this binary).
//!
//! Phase 1 (`latency.rs`): client UDP PING/PONG round trips through the appliance with the
//! output gate on and off, and the logging link's kernel-to-kernel floor (`probe.rs`),
//! in rounds of rotating order on one testbed; the output rule's added latency is
//! reported as a multiple of the floor. A raw userspace AF_PACKET ping-pong over the
//! logging link runs in the gate rounds.
//!
//! Phase 2 (`throughput.rs`): logging-channel duplication throughput, XDP vs a userspace
//! forwarder.
//!
//! `--out DIR` writes DIR/results.json and SVG plots (`plots.rs`); `--replot DIR` redraws
//! the plots from DIR/results.json without measuring.
use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ft_testbed::{Testbed, TestbedOptions, fmt_mac, names::*};

mod latency;
mod plots;
mod probe;
mod report;
mod stats;
mod sys;
mod throughput;

use report::{Meta, Results};

#[derive(Parser, Debug)]
#[command(
    about = "FT data-plane benchmark: output-rule latency against the logging link's \
                   floor, and logging-channel throughput"
)]
pub struct Args {
    /// Round trips per kind (gate on, gate off, link floor) per round; also the raw
    /// userspace link pings per gate round.
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Latency rounds; each measures gate on, gate off and the floor (order rotates).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Frames in each throughput burst.
    #[arg(long, default_value_t = 300_000)]
    burst_frames: usize,
    /// Size of each burst frame in bytes (Ethernet header included, no FCS).
    #[arg(long, default_value_t = 128)]
    frame_size: usize,
    /// Throughput rounds (each measures every path once; order alternates).
    #[arg(long, default_value_t = 2)]
    tput_rounds: usize,
    /// Throughput paths to measure (comma-separated subset of
    /// xdp-backup,xdp-nobackup,userspace,userspace-vm).
    #[arg(long, default_value = "xdp-backup,xdp-nobackup,userspace,userspace-vm")]
    tput_paths: String,
    /// XDP attach mode of the daemons and the probes: driver (native) or skb (generic).
    #[arg(long, default_value = "driver", value_parser = ["driver", "skb"])]
    xdp_mode: String,
    /// Skip phase 1 (latency).
    #[arg(long)]
    skip_latency: bool,
    /// Skip phase 2 (throughput).
    #[arg(long)]
    skip_throughput: bool,
    /// Write results.json and the SVG plots into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Redraw the SVG plots from DIR/results.json (no measurement, no root needed).
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    replot: Option<PathBuf>,
    /// Self-check: leave host B's probe reflector detached; the run must fail with an
    /// error about the floor.
    #[arg(long, hide = true)]
    self_check_no_reflector: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.replot {
        let r = Results::read(dir)?;
        for p in plots::render(&r, dir)? {
            println!("wrote {}", p.display());
        }
        return Ok(());
    }
    if args.frame_size < 64 || args.frame_size > 1514 {
        bail!("--frame-size must be within 64..=1514");
    }
    if args.requests == 0 || args.rounds == 0 || args.burst_frames == 0 {
        bail!("--requests, --rounds and --burst-frames must be > 0");
    }
    // SAFETY: geteuid() has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("must run as root (creates network namespaces, loads XDP programs)");
    }
    let t_start = Instant::now();
    let mut meta = Meta::now();
    meta.print();
    println!(
        "ftd: {}",
        ft_testbed::ftd_bin()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("NOT FOUND ({e})"))
    );
    let tb = Testbed::new(TestbedOptions {
        quiet_standins: true,
        ..Default::default()
    })
    .context("building testbed")?;
    // Pin the VM's MAC to host A's bridge port so bursts are not flooded to B/arbiter
    // (the bridge would learn it from A's first released reply anyway).
    ft_testbed::netns::ns_exec(
        &tb.client_ns,
        "bridge",
        &[
            "fdb",
            "replace",
            &fmt_mac(&VM_MAC),
            "dev",
            BR_PORT_A,
            "master",
            "static",
        ],
    )
    .context("bridge fdb replace")?;
    println!("testbed: {} (logs in {})", tb.prefix, tb.tmp_dir.display());
    let latency = if args.skip_latency {
        None
    } else {
        let l = latency::latency_phase(&tb, &args)?;
        report::print_latency(&l);
        Some(l)
    };
    let throughput = if args.skip_throughput {
        None
    } else {
        Some(throughput::throughput_phase(&tb, &args)?)
    };
    meta.finish(t_start.elapsed().as_secs_f64());
    println!(
        "\ntotal runtime: {:.1} s (loadavg at the end: {})",
        meta.runtime_s, meta.loadavg_end
    );
    if let Some(dir) = &args.out {
        let r = Results {
            meta,
            latency,
            throughput,
        };
        r.write(dir)?;
        println!("wrote {}", dir.join("results.json").display());
        for p in plots::render(&r, dir)? {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}
