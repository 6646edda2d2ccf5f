//! `ft-perf-reprotect`: re-protection through ftd (needs root and /dev/kvm; builds the
//! namespace testbed; `cargo build --release --bins` first, so ftd is found beside it).
//!
//! A pair with a 1 GiB guest holding `--keys` keys of `--value-bytes` serves clients
//! that SET on persistent connections throughout. Per join: the backup's ftd is killed,
//! the primary goes solo, a window with no transfer passes, then the backup's ftd starts
//! again and joins by live state transfer over the logging link. Reported: the guest's
//! pause in the stop phase, the transfer's time and bytes (from the primary's status),
//! and the clients' latency during the transfers against the windows without one.
use anyhow::{Context, Result, bail};
use clap::Parser;
use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, VmOptions, embedded_fence, names::*,
    ns_exec, start_arbiter,
};

use hdrhistogram::Histogram;
use std::{
    io::{Read, Write},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

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
}

const T: Duration = Duration::from_secs(60);

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// (request start, unix ms; latency, µs)
type Samples = Arc<Mutex<Vec<(f64, u64)>>>;

fn client(
    mut c: std::net::TcpStream,
    id: usize,
    stop: Arc<AtomicBool>,
    samples: Samples,
) -> Result<()> {
    let mut buf = [0u8; 64];
    let mut local = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("c{id}:{}", i % 1000);
        let req = format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$100\r\n{:0>100}\r\n",
            key.len(),
            i
        );
        let t = now_ms();
        let t0 = std::time::Instant::now();
        c.write_all(req.as_bytes())?;
        let n = c.read(&mut buf)?;
        if &buf[..n] != b"+OK\r\n" {
            bail!(
                "client {id}: SET answered {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
        local.push((t, t0.elapsed().as_micros() as u64));
        i += 1;
    }
    samples.lock().unwrap().extend(local);
    Ok(())
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e3
}

fn main() -> Result<()> {
    let a = Args::parse();
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
    ns_exec(
        &tb.client_ns,
        "redis-benchmark",
        &[
            "-h",
            &VM_IP.to_string(),
            "-c",
            "8",
            "-P",
            "16",
            "-t",
            "set",
            "-q",
            "-n",
            &(a.keys * 2).to_string(),
            "-r",
            &a.keys.to_string(),
            "-d",
            &a.value_bytes.to_string(),
        ],
    )?;
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
    let stop = Arc::new(AtomicBool::new(false));
    let samples: Samples = Arc::default();
    let mut clients = Vec::new();
    for i in 0..a.clients {
        let c = ft_testbed::resp::connect(&tb, Duration::from_secs(30))?;
        let (stop, s) = (stop.clone(), samples.clone());
        clients.push(std::thread::spawn(move || client(c, i, stop, s)));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (mut transfer, mut quiet) = (Vec::new(), Vec::new());
    let mut rows = Vec::new();
    for j in 0..a.joins {
        app.guard('b').kill()?;
        if !Appliance::wait_until(T, || app.status('a').is_ok_and(|s| s["role"] == "solo")) {
            bail!("join {j}: A did not go solo");
        }
        let q0 = now_ms();
        std::thread::sleep(Duration::from_millis(2500));
        quiet.push((q0, now_ms()));
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
        // Until a second after the cut: the new backup restores the state, starts its
        // channel and acks; the primary's output waits for that first ack.
        transfer.push((start, end + 1000.0));
        let row = (
            js["pause_ms"].as_f64().unwrap_or(0.0),
            js["total_ms"].as_f64().unwrap_or(0.0),
            js["bytes"].as_u64().unwrap_or(0),
            js["rounds"].as_u64().unwrap_or(0),
        );
        println!(
            "join {j}: pause {:.2} ms ({} pages; {}), transfer {:.0} ms, {} MiB, {} pre-copy rounds",
            row.0,
            js["stop_pages"],
            js["pause_parts_ms"],
            row.1,
            row.2 >> 20,
            row.3
        );
        rows.push(row);
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    let mut pause = Histogram::<u64>::new(3)?;
    let mut total = Histogram::<u64>::new(3)?;
    for r in &rows {
        pause.record((r.0 * 1e3) as u64)?;
        total.record((r.1 * 1e3) as u64)?;
    }
    let (mut during, mut without) = (Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?);
    let overlaps = |w: &[(f64, f64)], t: f64, us: u64| {
        w.iter().any(|&(s, e)| t < e && t + us as f64 / 1e3 > s)
    };
    for &(t, us) in samples.lock().unwrap().iter() {
        if overlaps(&transfer, t, us) {
            during.record(us)?;
        } else if overlaps(&quiet, t, us) {
            without.record(us)?;
        }
    }
    let mib: Vec<u64> = rows.iter().map(|r| r.2 >> 20).collect();
    println!();
    println!(
        "{} joins of a {} MiB guest through ftd:",
        a.joins, a.ram_mib
    );
    println!(
        "  pause (stop phase): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(&pause, 0.5),
        pct(&pause, 0.99),
        pause.max() as f64 / 1e3
    );
    println!(
        "  transfer: p50 {:.0} ms, max {:.0} ms; {}-{} MiB per join",
        pct(&total, 0.5),
        total.max() as f64 / 1e3,
        mib.iter().min().unwrap_or(&0),
        mib.iter().max().unwrap_or(&0)
    );
    println!(
        "  client SET latency during transfers (to 1 s after the cut): p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms ({} requests)",
        pct(&during, 0.5),
        pct(&during, 0.99),
        during.max() as f64 / 1e3,
        during.len()
    );
    println!(
        "  client SET latency, primary alone, no transfer: p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms ({} requests)",
        pct(&without, 0.5),
        pct(&without, 0.99),
        without.max() as f64 / 1e3,
        without.len()
    );
    Ok(())
}
