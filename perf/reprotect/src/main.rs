//! `ft-perf-reprotect`: re-protection through ftd (needs root and /dev/kvm; builds the
//! namespace testbed; `cargo build --release --bins` first, so ftd is found beside it).
//!
//! A pair with a 1 GiB guest holding `--keys` keys of `--value-bytes` serves clients
//! that SET on persistent connections throughout. Per join: the backup's ftd is killed,
//! the primary goes solo, a window with no transfer passes, then the backup's ftd starts
//! again and joins by live state transfer over the logging link. Reported: the guest's
//! pause in the stop phase, the transfer's time and bytes (from the primary's status),
//! and the clients' latency during the transfers against the windows without one.
//!
//! `--out DIR` writes DIR/results.json and SVG plots (pause per join, client latency
//! during transfers vs without); `--replot DIR` draws them again from DIR/results.json
//! without measuring (no root needed).
use anyhow::{Context, Result, bail};
use clap::Parser;
use ft_perf_plot::joins::{Join, JoinReport};
use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, VmOptions, embedded_fence,
    load::{SetLoad, fill_keys},
    start_arbiter,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser)]
struct Args {
    /// Joins to measure.
    #[arg(long, default_value_t = 10)]
    joins: u32,
    #[arg(long, default_value_t = 1024)]
    ram_mib: u64,
    /// Keys loaded before the joins, of `value_bytes` each.
    #[arg(long, default_value_t = 100_000)]
    keys: u32,
    #[arg(long, default_value_t = 3000)]
    value_bytes: u32,
    /// Clients writing on persistent connections throughout.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Write results.json and SVG plots into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only draw the plots again from DIR/results.json (no measuring).
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    replot: Option<PathBuf>,
}

const BENCHMARK: &str = "reprotect";

/// What results.json keeps.
#[derive(Serialize, Deserialize)]
struct Results {
    command: Vec<String>,
    unix_time: u64,
    ram_mib: u64,
    keys: u64,
    used_memory_mib: u64,
    clients: usize,
    report: JoinReport,
}

fn replot(dir: &Path) -> Result<()> {
    let res: Results = ft_perf_plot::read_results(dir, BENCHMARK)?;
    res.report
        .check(&ft_perf_plot::results::results_path(dir))?;
    for p in res.report.plot(dir, "reprotect")? {
        println!("wrote {}", p.display());
    }
    Ok(())
}

const T: Duration = Duration::from_secs(60);

/// The `Instant` of a unix-time millisecond stamp (from a daemon's status).
fn instant_of(unix_ms: f64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let ago = Duration::from_secs_f64(((now_ms - unix_ms) / 1e3).max(0.0));
    Instant::now() - ago
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(dir) = &a.replot {
        return replot(dir);
    }
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })?;
    let _arb = start_arbiter(&tb)?;
    let mut app = Appliance::start(
        &tb,
        &ApplianceOptions {
            vm: VmOptions::Vmm {
                ram_mib: a.ram_mib,
                extra: String::new(),
            },
            fence: embedded_fence(2000, 400),
            peer_timeout_ms: 50,
            join: true,
            ..Default::default()
        },
    )?;
    if !app.wait_replicating(T) {
        bail!("the pair did not come up: {}", app.status('a')?);
    }
    // Load the data while A runs alone (faster), then the first join.
    app.guard('b').kill()?;
    if !Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["role"] == "solo")) {
        bail!("A did not go solo");
    }
    fill_keys(&tb, a.keys, a.value_bytes)?;
    let info = ft_testbed::resp::redis_cli(&tb, &["INFO", "memory"])?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .context("INFO memory has no used_memory")?;
    let keys = ft_testbed::resp::redis_cli(&tb, &["DBSIZE"])?;
    println!(
        "guest: {} MiB RAM, {keys} keys, used_memory {} MiB; {} clients SET 100-byte values on persistent connections throughout; embedded arbiter, peer_timeout_ms 50",
        a.ram_mib,
        used >> 20,
        a.clients
    );
    let rejoined = |app: &Appliance| {
        app.status('a').is_ok_and(|s| s["role"] == "primary")
            && app.status('b').is_ok_and(|s| {
                s["vm"]["phase"] == "replaying"
                    && s["vm"]["checkpoints_verified"].as_u64().unwrap_or(0) > 0
            })
    };
    app.restart_as_backup(&tb, 'b')?;
    if !Appliance::wait_until(T, || rejoined(&app)) {
        bail!(
            "the first join did not complete: {}",
            app.status('a')?["vm"]["join"]
        );
    }
    let mut conns = Vec::new();
    for _ in 0..a.clients {
        conns.push(ft_testbed::resp::connect(&tb, Duration::from_secs(30))?);
    }
    let load = SetLoad::start(conns);
    std::thread::sleep(Duration::from_millis(500));
    let (mut joins, mut windows, mut quiet) = (Vec::new(), Vec::new(), Vec::new());
    for j in 0..a.joins {
        app.guard('b').kill()?;
        if !Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["role"] == "solo")) {
            bail!("join {j}: A did not go solo");
        }
        let q0 = Instant::now();
        std::thread::sleep(Duration::from_millis(2500));
        quiet.push((q0, Instant::now()));
        app.restart_as_backup(&tb, 'b')?;
        if !Appliance::wait_until(T, || rejoined(&app)) {
            bail!(
                "join {j} did not complete: {}",
                app.status('a')?["vm"]["join"]
            );
        }
        let js = app.status('a')?["vm"]["join"].clone();
        if js["phase"] != "done" {
            bail!("join {j}: {js}");
        }
        let (start, end) = (
            js["started_unix_ms"].as_f64().unwrap_or(0.0),
            js["at_unix_ms"].as_f64().unwrap_or(0.0),
        );
        let join = Join {
            pause_ms: js["pause_ms"].as_f64().unwrap_or(f64::NAN),
            total_ms: js["total_ms"].as_f64().unwrap_or(f64::NAN),
            bytes: js["bytes"].as_u64().unwrap_or(0),
            rounds: js["rounds"].as_u64(),
            stop_pages: js["stop_pages"].as_u64(),
            pause_parts_ms: js["pause_parts_ms"].clone(),
        };
        // Until a second after the cut: the new backup restores the state, starts its
        // channel and acks; the primary's output waits for that first ack.
        windows.push((instant_of(start), instant_of(end + 1000.0)));
        println!(
            "join {j}: pause {:.2} ms ({} pages; {}), transfer {:.0} ms, {} MiB, {} pre-copy rounds",
            join.pause_ms,
            js["stop_pages"],
            js["pause_parts_ms"],
            join.total_ms,
            join.bytes >> 20,
            js["rounds"]
        );
        joins.push(join);
        std::thread::sleep(Duration::from_millis(500));
    }
    let samples = load.finish()?;
    let samples = samples.lock().unwrap();
    let report = JoinReport::new(
        &format!("{} joins of a {} MiB guest through ftd", a.joins, a.ram_mib),
        "to 1 s after the cut",
        joins,
        &windows,
        &quiet,
        &samples,
    )?;
    report.print();
    if let Some(dir) = &a.out {
        let res = Results {
            command: ft_perf_plot::results::command_line(),
            unix_time: ft_perf_plot::results::unix_time(),
            ram_mib: a.ram_mib,
            keys: keys.trim().parse().unwrap_or(0),
            used_memory_mib: used >> 20,
            clients: a.clients,
            report,
        };
        let path = ft_perf_plot::write_results(dir, BENCHMARK, &res)?;
        println!("wrote {}", path.display());
        for p in res.report.plot(dir, "reprotect")? {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}
