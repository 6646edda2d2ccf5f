//! FT on against FT off, side by side in one run: the same guest in the same ftd, on the
//! same testbed path (client namespace -> host A's client NIC and XDP -> the VMM's TAP),
//!
//! * **FT off**: host A runs `role = "solo"`: no backup, nothing recorded, no output rule;
//! * **FT on**: host A primary (recording, output rule), host B backup (replaying live).
//!
//! Rounds alternate the order of the two modes. For FT on it also measures the logging
//! link: bytes host A sent on it (input frames, VMM entries, heartbeats) and host B sent
//! back (acks, nacks), per request and against the bytes host A received from clients.
//!
//! Needs ftd built with the same profile (`cargo build --release -p ftd -p ft-perf-vmm`):
//! ft-testbed takes `ftd` and `ft-arbiter` from next to this executable or `$FTD_BIN`.
use crate::bench::{Row, parse_csv, spread};
use crate::results::{ApplianceResults, Made};
use anyhow::{Context, Result, bail};
use ft_testbed::{
    Appliance, ApplianceOptions, Testbed, TestbedOptions, VmOptions, names::*, ns_exec,
};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

#[derive(clap::Args)]
pub struct ApplianceArgs {
    /// Rounds; each runs both modes (order alternating).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Requests per test without pipelining (pipelined tests send 10x as many).
    #[arg(long, default_value_t = 50_000)]
    requests: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 50)]
    clients: u32,
    /// Pipeline depths to run.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pipeline: Vec<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Off,
    On,
}

/// Logging-link traffic of one FT-on benchmark invocation.
#[derive(Default, Clone, Copy)]
struct LinkCost {
    requests: u64,
    client_rx: u64,
    log_ab: u64,
    log_ba: u64,
    vmlog: u64,
}

/// CPU use during one benchmark invocation.
#[derive(Default, Clone, Copy)]
struct CpuUse {
    requests: u64,
    /// CPU seconds of host A's and host B's ftd (all threads, the vCPU included).
    ftd_a: f64,
    ftd_b: f64,
    /// Fraction of the machine's CPU time that was busy (softirqs, the client included).
    machine_busy: f64,
}

struct Run {
    /// Per pipeline depth: rows (SET, GET, INCR).
    rows: Vec<(u32, Vec<Row>)>,
    cost: Vec<(u32, LinkCost)>,
    cpu: Vec<CpuUse>,
}

/// User + system CPU seconds of process `pid` (all its threads).
fn proc_cpu_s(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf reads a constant of the C library.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// (busy, total) jiffies of the whole machine, from /proc/stat.
fn machine_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    let total: u64 = v.iter().sum();
    Ok((total - v[3] - v[4], total))
}

fn pid_of(app: &Appliance, host: char) -> Option<i32> {
    let g = if host == 'a' { &app.a } else { &app.b };
    g.as_ref().map(|g| g.pid())
}

fn cpu_of(pid: Option<i32>) -> Result<f64> {
    pid.map_or(Ok(0.0), proc_cpu_s)
}

fn up(app: &Appliance, mode: Mode) -> bool {
    let t = Duration::from_secs(20);
    match mode {
        Mode::Off => Appliance::wait_until(t, || {
            app.vm_phase('a').as_deref() == Some("running unprotected")
        }),
        Mode::On => app.wait_replicating(t),
    }
}

fn benchmark(tb: &Testbed, clients: u32, n: u32, pipe: u32) -> Result<Vec<Row>> {
    let cmd = format!(
        "ulimit -n $(ulimit -Hn); exec timeout 300 redis-benchmark -h {VM_IP} -c {clients} -n {n} -P {pipe} -t set,get,incr --csv"
    );
    let out = ns_exec(&tb.client_ns, "bash", &["-c", &cmd])?;
    let rows = parse_csv(&out);
    if rows.len() != 3 {
        bail!("redis-benchmark: unexpected output {out}");
    }
    Ok(rows)
}

fn vm_u64(s: &Value, f: &str) -> Result<u64> {
    s["vm"][f]
        .as_u64()
        .with_context(|| format!("status has no vm.{f}: {s}"))
}

fn one(a: &ApplianceArgs, mode: Mode) -> Result<Run> {
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        quiet_standins: true,
        ..Default::default()
    })?;
    let app = Appliance::start(
        &tb,
        &ApplianceOptions {
            vm: VmOptions::vmm(),
            solo: mode == Mode::Off,
            ..Default::default()
        },
    )?;
    if !up(&app, mode) {
        bail!("{mode:?}: the VMM(s) did not come up: {}", app.status('a')?);
    }
    let mut run = Run {
        rows: Vec::new(),
        cost: Vec::new(),
        cpu: Vec::new(),
    };
    let (pa, pb) = (pid_of(&app, 'a'), pid_of(&app, 'b'));
    for &pipe in &a.pipeline {
        let n = if pipe > 1 {
            a.requests * 10
        } else {
            a.requests
        };
        let before = (
            tb.link_bytes(&tb.a.ns, CLI_IF)?.0,
            tb.link_bytes(&tb.a.ns, LOG_IF)?.1,
            tb.link_bytes(&tb.b.ns, LOG_IF)?.1,
            vm_u64(&app.status('a')?, "vmlog_bytes")?,
        );
        let cpu0 = (cpu_of(pa)?, cpu_of(pb)?, machine_jiffies()?);
        let rows = benchmark(&tb, a.clients, n, pipe)?;
        let cpu1 = (cpu_of(pa)?, cpu_of(pb)?, machine_jiffies()?);
        run.cpu.push(CpuUse {
            requests: 3 * n as u64,
            ftd_a: cpu1.0 - cpu0.0,
            ftd_b: cpu1.1 - cpu0.1,
            machine_busy: (cpu1.2.0 - cpu0.2.0) as f64 / (cpu1.2.1 - cpu0.2.1).max(1) as f64,
        });
        let after = (
            tb.link_bytes(&tb.a.ns, CLI_IF)?.0,
            tb.link_bytes(&tb.a.ns, LOG_IF)?.1,
            tb.link_bytes(&tb.b.ns, LOG_IF)?.1,
            vm_u64(&app.status('a')?, "vmlog_bytes")?,
        );
        if mode == Mode::On {
            run.cost.push((
                pipe,
                LinkCost {
                    requests: 3 * n as u64,
                    client_rx: after.0 - before.0,
                    log_ab: after.1 - before.1,
                    log_ba: after.2 - before.2,
                    vmlog: after.3 - before.3,
                },
            ));
        }
        run.rows.push((pipe, rows));
    }
    if mode == Mode::On {
        // The replica kept up and matched: a benchmark of a diverged pair means nothing.
        let b = app.status('b')?;
        if b["vm"]["divergence"] != Value::Null {
            bail!("the backup diverged: {b}");
        }
    }
    Ok(run)
}

pub fn run(a: &ApplianceArgs, out: Option<&Path>) -> Result<()> {
    ft_testbed::ftd_bin().context("ftd must be built next to ft-perf-vmm")?;
    let mut off: Vec<Run> = Vec::new();
    let mut on: Vec<Run> = Vec::new();
    for r in 0..a.rounds {
        let order = if r % 2 == 0 {
            [Mode::Off, Mode::On]
        } else {
            [Mode::On, Mode::Off]
        };
        for m in order {
            eprintln!("round {}: FT {m:?}", r + 1);
            let run = one(a, m)?;
            match m {
                Mode::Off => off.push(run),
                Mode::On => on.push(run),
            }
        }
    }
    println!(
        "FT on (primary + replaying backup, output rule) vs FT off (solo: same VMM and path, \
         nothing recorded), {} clients, {} rounds alternating",
        a.clients, a.rounds
    );
    println!(
        "{:<6} {:>3}  {:>10} {:>10} {:>16}  {:>13} {:>13}",
        "test", "-P", "off rps", "on rps", "on/off (range)", "off p50/p99", "on p50/p99"
    );
    for (pi, &pipe) in a.pipeline.iter().enumerate() {
        for t in 0..3 {
            let get = |runs: &[Run]| -> Vec<Row> {
                runs.iter().map(|r| r.rows[pi].1[t].clone()).collect()
            };
            let (ro, rn) = (get(&off), get(&on));
            let med = |rows: &[Row], f: fn(&Row) -> f64| {
                spread(&rows.iter().map(f).collect::<Vec<_>>()).0
            };
            let ratios: Vec<f64> = ro.iter().zip(&rn).map(|(o, n)| n.rps / o.rps).collect();
            let (rm, rlo, rhi) = spread(&ratios);
            println!(
                "{:<6} {:>3}  {:>10.0} {:>10.0} {:>5.3} ({:.3}-{:.3})  {:>5.2}/{:<6.2} {:>5.2}/{:<6.2}",
                ro[0].test,
                pipe,
                med(&ro, |r| r.rps),
                med(&rn, |r| r.rps),
                rm,
                rlo,
                rhi,
                med(&ro, |r| r.p50_ms),
                med(&ro, |r| r.p99_ms),
                med(&rn, |r| r.p50_ms),
                med(&rn, |r| r.p99_ms),
            );
        }
    }
    println!("(rps and latencies: median over rounds; latencies in ms, client-side)");
    println!();
    println!("logging link, FT on (SET+GET+INCR together):");
    println!(
        "{:>3}  {:>14} {:>14} {:>14} {:>16}",
        "-P", "A->B B/request", "  of it VMM", "B->A B/request", "A->B / client rx"
    );
    for (pi, &pipe) in a.pipeline.iter().enumerate() {
        let per =
            |f: fn(&LinkCost) -> f64| -> Vec<f64> { on.iter().map(|r| f(&r.cost[pi].1)).collect() };
        let ab = spread(&per(|c| c.log_ab as f64 / c.requests as f64));
        let vm = spread(&per(|c| c.vmlog as f64 / c.requests as f64));
        let ba = spread(&per(|c| c.log_ba as f64 / c.requests as f64));
        let ratio = spread(&per(|c| c.log_ab as f64 / c.client_rx as f64));
        println!(
            "{:>3}  {:>14} {:>14} {:>14} {:>16}",
            pipe,
            fmt_spread(ab, 0),
            fmt_spread(vm, 0),
            fmt_spread(ba, 0),
            fmt_spread(ratio, 2)
        );
    }
    println!("(median, range over rounds in brackets)");
    println!();
    println!("CPU (both hosts share this machine's cores):");
    println!(
        "{:<7} {:>3}  {:>22} {:>22} {:>14}",
        "mode", "-P", "ftd A ms/1k requests", "ftd B ms/1k requests", "machine busy"
    );
    for (label, runs) in [("FT off", &off), ("FT on", &on)] {
        for (pi, &pipe) in a.pipeline.iter().enumerate() {
            let per = |f: fn(&CpuUse) -> f64| -> Vec<f64> {
                runs.iter().map(|r| f(&r.cpu[pi])).collect()
            };
            println!(
                "{:<7} {:>3}  {:>22} {:>22} {:>14}",
                label,
                pipe,
                fmt_spread(spread(&per(|c| c.ftd_a * 1e6 / c.requests as f64)), 1),
                fmt_spread(spread(&per(|c| c.ftd_b * 1e6 / c.requests as f64)), 1),
                fmt_spread(spread(&per(|c| c.machine_busy * 100.0)), 0) + " %"
            );
        }
    }
    let rows = |runs: &[Run]| runs.iter().map(|r| r.rows.clone()).collect();
    crate::results::save(out, |all| {
        all.appliance = Some(ApplianceResults {
            made: Made::now(),
            clients: a.clients,
            requests: a.requests,
            pipeline: a.pipeline.clone(),
            off: rows(&off),
            on: rows(&on),
        })
    })
}

fn fmt_spread((m, lo, hi): (f64, f64, f64), prec: usize) -> String {
    if (hi - lo).abs() < 10f64.powi(-(prec as i32)) {
        format!("{m:.prec$}")
    } else {
        format!("{m:.prec$} ({lo:.prec$}-{hi:.prec$})")
    }
}
