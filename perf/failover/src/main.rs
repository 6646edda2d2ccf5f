//! `ft-perf-failover`: failover as clients see it (needs root and /dev/kvm; builds the
//! namespace testbed; `cargo build --release --bins` first, so ftd is found beside it).
//! the primary's ftd is killed (SIGKILL) while clients on
//! persistent connections run INCR one after another; the gap is the time from the last
//! reply a connection received before the fault to the first reply after it. Each run
//! builds the testbed afresh (embedded arbiter, default timings: heartbeat 5 ms,
//! peer_timeout 50 ms, lease 2 s) and reports the backup's own phase timings beside the
//! gaps. Then, optionally, the appliance runs under load with no fault and every role
//! change counts as a spurious failover.
use anyhow::{Context, Result, bail};
use clap::Parser;
use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, VmOptions, embedded_fence, names::*,
    ns_exec, resp, start_arbiter,
};
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// The primary killed N times under client load: client-visible gaps and the backup's
/// phases; then spurious failovers under load with no fault.
#[derive(Parser)]
struct FailoverArgs {
    /// Injected primary failures (one testbed each).
    #[arg(long, default_value_t = 20)]
    runs: u32,
    /// Clients on persistent connections.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seconds of redis-benchmark load with no fault, counting role changes (0: skip).
    #[arg(long, default_value_t = 60)]
    spurious_s: u64,
    /// channel.peer_timeout_ms (the shipped default is 50).
    #[arg(long, default_value_t = 50)]
    peer_timeout_ms: u64,
}

const T: Duration = Duration::from_secs(20);

/// Reply times of one client.
type Replies = Arc<Mutex<Vec<Instant>>>;

fn setup(tb: &Testbed, peer_timeout_ms: u64) -> Result<Appliance> {
    let app = Appliance::start(
        tb,
        &ApplianceOptions {
            vm: VmOptions::vmm(),
            fence: embedded_fence(2000, 400),
            peer_timeout_ms,
            ..Default::default()
        },
    )?;
    if !app.wait_replicating(T) {
        bail!("the pair did not come up: {}", app.status('a')?);
    }
    Ok(app)
}

/// One failure: (gaps of every client in ms, the backup's phase timings).
fn one(a: &FailoverArgs) -> Result<(Vec<f64>, serde_json::Value)> {
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        quiet_standins: true,
        ..Default::default()
    })?;
    let _arb = start_arbiter(&tb)?;
    let app = setup(&tb, a.peer_timeout_ms)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let mut logs: Vec<Replies> = Vec::new();
    for _ in 0..a.clients {
        let mut c = resp::connect(&tb, T)?;
        let log: Replies = Arc::default();
        let (l, stop) = (log.clone(), stop.clone());
        handles.push(std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                resp::call(&mut c, &[b"INCR", b"ctr"])?;
                l.lock().unwrap().push(Instant::now());
            }
            Ok(())
        }));
        logs.push(log);
    }
    let count = |logs: &[Replies]| logs.iter().map(|l| l.lock().unwrap().len()).sum::<usize>();
    if !Appliance::wait_until(T, || count(&logs) >= 2000) {
        bail!("clients made no progress before the fault");
    }
    let fault = Instant::now();
    app.guard('a').kill()?;
    let after = count(&logs);
    let recovered = Appliance::wait_until(T, || {
        logs.iter().all(|l| {
            l.lock()
                .unwrap()
                .last()
                .is_some_and(|t| *t > fault + Duration::from_millis(1))
        }) && count(&logs) > after + 100
    });
    stop.store(true, Ordering::Relaxed);
    let history = |h: char| {
        app.status(h)
            .map(|s| s["role_history"]["transitions"].to_string())
            .unwrap_or_else(|e| format!("({e})"))
    };
    for h in handles {
        h.join().expect("client thread").with_context(|| {
            format!(
                "a connection did not survive; roles: A {} / B {}",
                history('a'),
                history('b')
            )
        })?;
    }
    if !recovered {
        bail!("no recovery: {}", app.status('b')?);
    }
    // Per connection: the longest time without a reply around the fault (a reply the
    // dying primary had released just before can arrive just after the kill).
    let gaps = logs
        .iter()
        .map(|l| {
            let l = l.lock().unwrap();
            let from = fault - Duration::from_millis(100);
            let w: Vec<Instant> = l.iter().copied().filter(|t| *t >= from).collect();
            if !l.iter().any(|t| *t < from) || w.len() < 2 {
                bail!("a client has no replies on one side of the fault");
            }
            Ok(w.windows(2)
                .map(|p| (p[1] - p[0]).as_secs_f64() * 1e3)
                .fold(0.0, f64::max))
        })
        .collect::<Result<Vec<f64>>>()?;
    let report = app.status('b')?["role_history"]["last_failover"].clone();
    Ok((gaps, report))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn main() -> Result<()> {
    let a = &FailoverArgs::parse();
    ft_testbed::ftd_bin().context("ftd must be built next to ft-perf-vmm")?;
    let mut gaps = Vec::new();
    let mut phases: Vec<[f64; 5]> = Vec::new();
    let mut failed = Vec::new();
    for r in 0..a.runs {
        let (g, rep) = match one(a) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("run {}: FAILED: {e:#}", r + 1);
                failed.push(format!("{e:#}"));
                continue;
            }
        };
        let ms = |k: &str| rep[k].as_f64().unwrap_or(f64::NAN);
        let ph = [
            ms("detect_ms"),
            ms("test_and_set_ms"),
            ms("drain_ms"),
            ms("announce_ms"),
            ms("total_ms"),
        ];
        eprintln!(
            "run {}: client gaps {:?} ms; backup: {:?}",
            r + 1,
            g.iter().map(|x| x.round()).collect::<Vec<_>>(),
            ph
        );
        gaps.extend(g);
        phases.push(ph);
    }
    if gaps.is_empty() {
        bail!("every run failed: {failed:?}");
    }
    gaps.sort_by(f64::total_cmp);
    println!(
        "primary killed {} times, {} clients on persistent connections (INCR back to back), peer_timeout_ms {}",
        a.runs, a.clients, a.peer_timeout_ms
    );
    println!(
        "client-visible gap (ms), {} samples: p50 {:.0}, p99 {:.0}, max {:.0}",
        gaps.len(),
        pct(&gaps, 0.5),
        pct(&gaps, 0.99),
        gaps[gaps.len() - 1]
    );
    if !failed.is_empty() {
        println!("{} of {} runs FAILED:", failed.len(), a.runs);
        for f in &failed {
            println!("  {f}");
        }
    }
    println!("the backup's phases (ms): p50 / max over the runs");
    for (i, name) in ["detect", "test-and-set", "drain", "announce", "total"]
        .iter()
        .enumerate()
    {
        let mut v: Vec<f64> = phases.iter().map(|p| p[i]).collect();
        v.sort_by(f64::total_cmp);
        println!(
            "  {name:<13} {:>8.1} / {:>8.1}",
            pct(&v, 0.5),
            v[v.len() - 1]
        );
    }
    if a.spurious_s > 0 {
        spurious(a)?;
    }
    Ok(())
}

/// Load with no fault: every role change is a spurious failover.
fn spurious(a: &FailoverArgs) -> Result<()> {
    let secs = a.spurious_s;
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        quiet_standins: true,
        ..Default::default()
    })?;
    let _arb = start_arbiter(&tb)?;
    let app = setup(&tb, a.peer_timeout_ms)?;
    let changes = |h: char| -> Result<usize> {
        Ok(app.status(h)?["role_history"]["transitions"]
            .as_array()
            .map_or(0, |t| t.len()))
    };
    // Both controllers have settled (A won, B follows) before counting.
    if !Appliance::wait_until(T, || {
        changes('a').is_ok_and(|n| n >= 1) && changes('b').is_ok_and(|n| n >= 1)
    }) {
        bail!("the pair did not settle");
    }
    let (a0, b0) = (changes('a')?, changes('b')?);
    let t0 = Instant::now();
    let mut runs = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        let cmd = format!(
            "timeout 120 redis-benchmark -h {VM_IP} -c 50 -n 200000 -P 4 -t set,get,incr -q"
        );
        ns_exec(&tb.client_ns, "bash", &["-c", &cmd])?;
        runs += 1;
    }
    let (a1, b1) = (changes('a')?, changes('b')?);
    for h in ['a', 'b'] {
        if let Some(t) = app.status(h)?["role_history"]["transitions"].as_array() {
            let n0 = if h == 'a' { a0 } else { b0 };
            for t in t.iter().skip(n0) {
                println!("  host {h}: {} -> {}: {}", t["from"], t["to"], t["reason"]);
            }
        }
    }
    println!(
        "spurious failovers: {} in {:.0} s of redis-benchmark load ({runs} runs of 200,000 requests x 3 tests, -c 50 -P 4) on this 2-core machine, both hosts on it",
        (a1 - a0) + (b1 - b0),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
