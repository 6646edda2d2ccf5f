//! `ft-perf-failover`: failover as clients see it (needs root and /dev/kvm; builds the
//! namespace testbed; `cargo build --release --bins` first, so ftd is found beside it).
//! the primary's ftd is killed (SIGKILL) while clients on
//! persistent connections run INCR one after another; the gap is the time from the last
//! reply a connection received before the fault to the first reply after it. Each run
//! builds the testbed afresh (embedded arbiter, default timings: heartbeat 5 ms,
//! peer_timeout 50 ms, lease 2 s) and reports the backup's own phase timings beside the
//! gaps. Then, optionally, the appliance runs under load with no fault and every role
//! change counts as a spurious failover.
//!
//! `--out DIR` writes DIR/results.json and SVG plots (a timeline per run, the gaps' CDF,
//! the backup's phases); `--replot DIR` draws them again from DIR/results.json without
//! measuring (no root needed).
mod report;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, VmOptions, embedded_fence, names::*,
    ns_exec, resp, start_arbiter,
};
use report::{ClientGap, Phases, Results, Run, Spurious};
use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
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
    /// Write results.json and SVG plots into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only draw the plots again from DIR/results.json (no measuring).
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    replot: Option<PathBuf>,
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

fn unix_ms_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// One failure: every client's gap and the backup's phase timings.
fn one(a: &FailoverArgs, run: u32) -> Result<Run> {
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
    let (fault, fault_unix_ms) = (Instant::now(), unix_ms_now());
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
    let rel = |t: Instant| {
        if t >= fault {
            (t - fault).as_secs_f64() * 1e3
        } else {
            -(fault - t).as_secs_f64() * 1e3
        }
    };
    let clients = logs
        .iter()
        .map(|l| {
            let l = l.lock().unwrap();
            let from = fault - Duration::from_millis(100);
            let w: Vec<Instant> = l.iter().copied().filter(|t| *t >= from).collect();
            if !l.iter().any(|t| *t < from) || w.len() < 2 {
                bail!("a client has no replies on one side of the fault");
            }
            let p = w
                .windows(2)
                .max_by_key(|p| p[1] - p[0])
                .expect("two replies at least");
            Ok(ClientGap {
                before_ms: rel(p[0]),
                after_ms: rel(p[1]),
            })
        })
        .collect::<Result<Vec<ClientGap>>>()?;
    let rep = &app.status('b')?["role_history"]["last_failover"];
    let ms = |k: &str| rep[k].as_f64().unwrap_or(f64::NAN);
    let backup = Phases {
        detect_ms: ms("detect_ms"),
        test_and_set_ms: ms("test_and_set_ms"),
        drain_ms: ms("drain_ms"),
        announce_ms: ms("announce_ms"),
        total_ms: ms("total_ms"),
        live_at_ms: ms("at_unix_ms") - fault_unix_ms,
    };
    Ok(Run {
        run,
        clients,
        backup,
    })
}

fn main() -> Result<()> {
    let a = &FailoverArgs::parse();
    if let Some(dir) = &a.replot {
        return replot(dir);
    }
    ft_testbed::ftd_bin().context("ftd must be built next to ft-perf-failover")?;
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for r in 1..=a.runs {
        match one(a, r) {
            Ok(run) => {
                let b = &run.backup;
                eprintln!(
                    "run {r}: client gaps {:?} ms; backup: detect {:.1}, test-and-set {:.1}, drain {:.1}, announce {:.1}, total {:.1}, live at {:.0} ms",
                    run.clients
                        .iter()
                        .map(|c| c.gap_ms().round())
                        .collect::<Vec<_>>(),
                    b.detect_ms,
                    b.test_and_set_ms,
                    b.drain_ms,
                    b.announce_ms,
                    b.total_ms,
                    b.live_at_ms
                );
                runs.push(run);
            }
            Err(e) => {
                eprintln!("run {r}: FAILED: {e:#}");
                failed.push(format!("run {r}: {e:#}"));
            }
        }
    }
    if runs.is_empty() {
        bail!("every run failed: {failed:?}");
    }
    let gaps: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.clients.iter().map(|c| c.gap_ms()))
        .collect();
    let mut res = Results {
        command: ft_perf_plot::results::command_line(),
        unix_time: ft_perf_plot::results::unix_time(),
        runs_asked: a.runs,
        clients: a.clients,
        peer_timeout_ms: a.peer_timeout_ms,
        gaps: ft_perf_plot::Distribution::from_ms(&gaps)?,
        runs,
        failed,
        spurious: None,
    };
    if a.spurious_s > 0 {
        res.spurious = Some(spurious(a)?);
    }
    res.print();
    if let Some(dir) = &a.out {
        let path = ft_perf_plot::write_results(dir, report::BENCHMARK, &res)?;
        println!("wrote {}", path.display());
        for p in res.plot(dir)? {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

fn replot(dir: &Path) -> Result<()> {
    let res: Results = ft_perf_plot::read_results(dir, report::BENCHMARK)?;
    res.check(&ft_perf_plot::results::results_path(dir))?;
    for p in res.plot(dir)? {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// Load with no fault: every role change is a spurious failover.
fn spurious(a: &FailoverArgs) -> Result<Spurious> {
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
    let mut transitions = Vec::new();
    for h in ['a', 'b'] {
        if let Some(t) = app.status(h)?["role_history"]["transitions"].as_array() {
            let n0 = if h == 'a' { a0 } else { b0 };
            for t in t.iter().skip(n0) {
                transitions.push(format!(
                    "host {h}: {} -> {}: {}",
                    t["from"], t["to"], t["reason"]
                ));
            }
        }
    }
    Ok(Spurious {
        role_changes: (a1 - a0) + (b1 - b0),
        seconds: t0.elapsed().as_secs_f64(),
        benchmark_runs: runs,
        transitions,
    })
}
