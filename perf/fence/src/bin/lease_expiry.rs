//! Time from lease expiry to the first output frame the kernel refuses, on the real
//! testbed: the primary's daemon is frozen (SIGSTOP) so nobody renews; the client keeps
//! sending requests every `--interval-us`; the kernel deadline D is read from the daemon
//! just before freezing it. Reported per round: when (relative to D) the last request
//! that got a reply was sent, and when the first one without a reply was sent. The lease
//! check is per frame, so the gap between the two is the sampling interval plus one
//! round trip; a late check would show up as replies sent well after D.
//!
//! Run as root after `cargo build --release --bins`:
//! `target/release/ft-perf-lease-expiry --rounds 5`
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, embedded_fence, start_arbiter,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    #[arg(long, default_value_t = 1000)]
    lease_ms: u64,
    #[arg(long, default_value_t = 500)]
    interval_us: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    println!(
        "command: {}",
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    println!(
        "lease {} ms, request every {} us; times relative to the kernel deadline D",
        a.lease_ms, a.interval_us
    );
    println!(
        "{:>5} {:>22} {:>22} {:>10}",
        "round", "last answered (us)", "first refused (us)", "requests"
    );
    let mut firsts = vec![];
    for r in 0..a.rounds {
        let tb = Testbed::new(TestbedOptions {
            quiet_standins: true,
            ..Default::default()
        })?;
        let _arb = start_arbiter(&tb)?;
        let o = ApplianceOptions {
            fence: embedded_fence(a.lease_ms, a.lease_ms / 5),
            ..Default::default()
        };
        let app = Appliance::start(&tb, &o)?;
        let live = Appliance::wait_until(Duration::from_secs(10), || {
            app.status('a')
                .ok()
                .and_then(|s| s["role"].as_str().map(|r| r == "primary"))
                .unwrap_or(false)
        });
        anyhow::ensure!(live, "primary did not go live");
        let c = tb.vm_client()?;
        c.request("PING", Duration::from_secs(2))?
            .context("warm-up")?;
        // Deadline: read the remaining lease, then freeze the daemon right away.
        let s = app.status('a')?;
        let remaining = s["lease_remaining_s"]
            .as_f64()
            .context("lease_remaining_s")?;
        let d = Instant::now() + Duration::from_secs_f64(remaining);
        app.pause('a')?;
        let mut last_ok: Option<f64> = None;
        let mut first_refused: Option<f64> = None;
        let mut n = 0;
        let end = d + Duration::from_millis(300);
        let rel = |t: Instant| -> f64 {
            if t >= d {
                (t - d).as_secs_f64() * 1e6
            } else {
                -((d - t).as_secs_f64() * 1e6)
            }
        };
        while Instant::now() < end && n < 100_000 {
            let sent = Instant::now();
            n += 1;
            match c.request("PING", Duration::from_millis(20))? {
                Some(_) => last_ok = Some(rel(sent)),
                None => {
                    if first_refused.is_none() {
                        first_refused = Some(rel(sent));
                    }
                }
            }
            let next = sent + Duration::from_micros(a.interval_us);
            if let Some(w) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
        }
        println!(
            "{r:>5} {:>22} {:>22} {n:>10}",
            last_ok.map_or("-".into(), |v| format!("{v:.0}")),
            first_refused.map_or("-".into(), |v| format!("{v:.0}"))
        );
        if let Some(f) = first_refused {
            firsts.push(f);
        }
        app.resume('a')?;
    }
    firsts.sort_by(|x, y| x.total_cmp(y));
    if !firsts.is_empty() {
        println!(
            "first refused request, relative to D: min {:.0} us, median {:.0} us, max {:.0} us",
            firsts[0],
            firsts[firsts.len() / 2],
            firsts[firsts.len() - 1]
        );
    }
    Ok(())
}
