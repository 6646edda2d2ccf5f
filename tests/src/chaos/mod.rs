//! The chaos suite: random faults under concurrent clients, in the style of Jepsen.
//!
//! [`run`] builds the testbed (two hosts running ftd with the VMM, a 3-member etcd as
//! the arbiter), starts the clients ([`history`]) and lets the nemesis ([`nemesis`])
//! play a fault schedule drawn from the seed: each step applies one or two faults,
//! holds them, heals, and waits until the VM is protected again (a dead or halted ftd
//! is restarted as a backup and joins by state transfer). The VM's frames on the
//! client network are captured during every step. At the end it checks the history
//! ([`check`]) and the replicas, and reports.
pub mod check;
pub mod history;
pub mod nemesis;

use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use crate::{
    Appliance, ApplianceOptions, Emissions, Testbed, TestbedOptions, VmEmitters, VmOptions,
    etcd_fence, start_etcd,
};
use history::{Clients, Clock, Outcome};
use nemesis::{FaultKind, Nemesis, Step};

/// What to run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// Steps of the schedule (each one or two faults).
    pub faults: usize,
    pub seed: u64,
    pub clients: usize,
    /// Guest RAM (MiB): what every re-protection transfers.
    pub ram_mib: u64,
    /// Where the history (JSON lines) and the report go.
    pub out_dir: PathBuf,
    /// Length of each throughput sample (fault-free, FT on; and FT off at the end).
    pub sample: Duration,
    /// Calls per second over all clients outside the throughput samples (which run
    /// unpaced); 0 = unpaced throughout.
    pub rate: u64,
    /// The kinds of fault the schedule draws from.
    pub kinds: Vec<FaultKind>,
    /// The output rule (`hold_output`). Off only to explore what the suite sees
    /// without it: replies released before the backup has what they depend on.
    pub output_rule: bool,
    /// More clients beside `clients`, unpaced, on keys of their own (checked too): load
    /// that keeps the backup busy while the faults come.
    pub extra_clients: usize,
}

impl ChaosOptions {
    pub fn new(faults: usize, seed: u64, out_dir: PathBuf) -> Self {
        ChaosOptions {
            faults,
            seed,
            clients: 8,
            ram_mib: 256,
            out_dir,
            sample: Duration::from_secs(3),
            rate: 2000,
            kinds: nemesis::ALL_KINDS.to_vec(),
            output_rule: true,
            extra_clients: 0,
        }
    }
}

/// The arbiter's lease in the chaos runs (etcd), and its renewal interval.
const LEASE_MS: u64 = 2000;
const RENEW_MS: u64 = 400;

/// One step as it went.
#[derive(Clone, Debug)]
pub struct StepRecord {
    pub step: Step,
    pub primary_before: char,
    pub live_after: char,
    /// ftd processes restarted as backups (re-protections by state transfer).
    pub rejoined: usize,
    /// From the faults' start until the VM was protected again.
    pub to_protected: Duration,
    /// Longest stretch without an answered call, from the fault to the protection.
    pub gap: Duration,
    /// The hosts whose ports carried the VM's frames, in order.
    pub emitters: Vec<char>,
}

/// The run's findings.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub planned: usize,
    pub steps: Vec<StepRecord>,
    /// Why the run stopped before the end of the schedule, if it did.
    pub aborted: Option<String>,
    pub faults_by_kind: BTreeMap<FaultKind, usize>,
    pub ops_ok: usize,
    pub ops_failed: usize,
    pub ops_unknown: usize,
    pub keys_checked: usize,
    pub linearizability: check::LinReport,
    pub counter: Result<usize, String>,
    /// Steps in which the VM's frames came from hosts in an order a failover cannot
    /// explain (two hosts emitting at once).
    pub emitter_violations: Vec<String>,
    pub divergence: Option<String>,
    /// The backup verified checkpoints (its state identical to the primary's) after
    /// the clients stopped.
    pub replicas_identical: Result<u64, String>,
    pub longest_gap: (Duration, Duration),
    /// Answered calls per second: fault-free samples with FT on, and FT off.
    pub throughput_ft_on: Vec<f64>,
    pub throughput_ft_off: Option<f64>,
    pub history: PathBuf,
    pub elapsed: Duration,
    /// Time the linearizability checker took.
    pub check_time: Duration,
    /// The clients' pace outside throughput samples (calls/s, 0 = unpaced).
    pub rate: u64,
    pub output_rule: bool,
    pub extra_clients: usize,
    /// Where the evidence of a failed run was kept (every daemon's and arbiter's log,
    /// the last status of both hosts, the captures of the last step).
    pub evidence: Option<PathBuf>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.aborted.is_none()
            && self.linearizability.ok()
            && self.counter.is_ok()
            && self.emitter_violations.is_empty()
            && self.divergence.is_none()
            && self.replicas_identical.is_ok()
    }

    pub fn failovers(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.live_after != s.primary_before)
            .count()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "chaos run, seed {}: {} of {} steps in {:.0} s",
            self.seed,
            self.steps.len(),
            self.planned,
            self.elapsed.as_secs_f64()
        )?;
        if !self.output_rule {
            writeln!(
                f,
                "  OUTPUT RULE OFF (hold_output = false): replies may leave before the backup has what they depend on"
            )?;
        }
        if let Some(a) = &self.aborted {
            writeln!(f, "  ABORTED: {a}")?;
        }
        let kinds: Vec<String> = self
            .faults_by_kind
            .iter()
            .map(|(k, n)| format!("{} {n}", k.name()))
            .collect();
        writeln!(f, "  faults injected: {}", kinds.join(", "))?;
        writeln!(
            f,
            "  failovers {}, re-protections by state transfer {}",
            self.failovers(),
            self.steps.iter().map(|s| s.rejoined).sum::<usize>()
        )?;
        writeln!(
            f,
            "  operations: {} ok, {} failed, {} unknown; {} keys; clients paced at {} calls/s between throughput samples{}",
            self.ops_ok,
            self.ops_failed,
            self.ops_unknown,
            self.keys_checked,
            self.rate,
            if self.extra_clients > 0 {
                format!(", {} more unpaced", self.extra_clients)
            } else {
                String::new()
            }
        )?;
        let lin = &self.linearizability;
        writeln!(
            f,
            "  linearizability (stateright, per key): {}",
            if lin.ok() {
                format!(
                    "linearizable ({} keys, checked in {:.1} s)",
                    lin.keys,
                    self.check_time.as_secs_f64()
                )
            } else {
                format!(
                    "NOT LINEARIZABLE: {:?}; errors: {:?}",
                    lin.violations, lin.errors
                )
            }
        )?;
        match &self.counter {
            Ok(n) => writeln!(f, "  counter: {n} INCR replies, unique and ordered")?,
            Err(e) => writeln!(f, "  counter: FAILED: {e}")?,
        }
        if self.emitter_violations.is_empty() {
            writeln!(f, "  one emitting host at a time: yes")?;
        } else {
            writeln!(f, "  TWO HOSTS EMITTING: {:?}", self.emitter_violations)?;
        }
        match &self.divergence {
            None => writeln!(f, "  divergence reported: none")?,
            Some(d) => writeln!(f, "  DIVERGENCE: {d}")?,
        }
        match &self.replicas_identical {
            Ok(n) => writeln!(
                f,
                "  replicas identical at the end: yes ({n} checkpoints verified after the clients stopped)"
            )?,
            Err(e) => writeln!(f, "  replicas identical at the end: NOT SHOWN: {e}")?,
        }
        writeln!(
            f,
            "  longest client-visible gap: {:.0} ms (at {:.1} s)",
            ms(self.longest_gap.0),
            self.longest_gap.1.as_secs_f64()
        )?;
        if let Some(h) = self.gap_histogram() {
            writeln!(
                f,
                "  gap per step (ms): p50 {} p90 {} p99 {} max {} over {} steps",
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99),
                h.max(),
                h.len()
            )?;
        }
        let on = &self.throughput_ft_on;
        if !on.is_empty() {
            let mean = on.iter().sum::<f64>() / on.len() as f64;
            let (lo, hi) = on
                .iter()
                .fold((f64::MAX, 0f64), |(l, h), &x| (l.min(x), h.max(x)));
            write!(
                f,
                "  throughput fault-free, FT on: {mean:.0} calls/s (samples {lo:.0}-{hi:.0}, n={})",
                on.len()
            )?;
            if let Some(off) = self.throughput_ft_off {
                write!(f, "; FT off: {off:.0} calls/s; ratio {:.2}", mean / off)?;
            }
            writeln!(f)?;
        }
        writeln!(f, "  history: {}", self.history.display())?;
        if let Some(e) = &self.evidence {
            writeln!(
                f,
                "  evidence kept in {} (daemon and arbiter logs, last status of both hosts, captures)",
                e.display()
            )?;
        }
        write!(
            f,
            "  verdict: {}",
            if self.passed() { "PASS" } else { "FAIL" }
        )
    }
}

impl Report {
    fn gap_histogram(&self) -> Option<Histogram<u64>> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000, 3).ok()?;
        for s in &self.steps {
            h.record((ms(s.gap) as u64).max(1)).ok()?;
        }
        (!h.is_empty()).then_some(h)
    }
}

/// Answered calls per second over `d`, the clients unpaced.
fn throughput(clients: &Clients, d: Duration) -> f64 {
    clients.unpaced(|| {
        // After a fault, clients may still be reconnecting: wait until they all answer
        // again (each client's next call), then let them leave their paced rhythm.
        let n = clients.ok();
        Appliance::wait_until(Duration::from_secs(10), || clients.ok() > n + 200);
        std::thread::sleep(Duration::from_millis(200));
        let (n0, t0) = (clients.ok(), Instant::now());
        std::thread::sleep(d);
        (clients.ok() - n0) as f64 / t0.elapsed().as_secs_f64()
    })
}

const PROTECT_TIMEOUT: Duration = Duration::from_secs(90);
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs the suite; `say` gets one line per step.
pub fn run(o: &ChaosOptions, say: &mut dyn FnMut(&str)) -> Result<Report> {
    let began = Instant::now();
    let tb = Testbed::new(TestbedOptions {
        start_standins: false,
        ..Default::default()
    })?;
    let mut etcd = start_etcd(&tb, 3)?;
    let mut app = Appliance::start(
        &tb,
        &ApplianceOptions {
            vm: VmOptions::Vmm {
                ram_mib: o.ram_mib,
                extra: String::new(),
            },
            fence: etcd_fence(&etcd, LEASE_MS, RENEW_MS),
            join: true,
            auto: true,
            hold_output: o.output_rule,
            ..Default::default()
        },
    )?;
    anyhow::ensure!(
        app.wait_replicating(Duration::from_secs(60)),
        "the pair did not start replicating:\nA: {:#}\nB: {:#}",
        app.status('a').unwrap_or_default(),
        app.status('b').unwrap_or_default()
    );
    let clock = Clock(Instant::now());
    let clients = Clients::start(
        &tb.client_ns,
        0..o.clients,
        "r",
        o.seed,
        CALL_TIMEOUT,
        clock,
        o.rate,
    );
    let extra = (o.extra_clients > 0).then(|| {
        Clients::start(
            &tb.client_ns,
            o.clients..o.clients + o.extra_clients,
            "x",
            o.seed ^ 0x5eed,
            CALL_TIMEOUT,
            clock,
            0,
        )
    });
    anyhow::ensure!(
        Appliance::wait_until(Duration::from_secs(30), || clients.ok() > 200),
        "the clients made no progress before the first fault"
    );
    anyhow::ensure!(!o.kinds.is_empty(), "no kinds of fault to draw from");
    let schedule = nemesis::schedule(o.seed, o.faults, etcd.members.len(), &o.kinds);
    let mut report = Report {
        seed: o.seed,
        planned: schedule.len(),
        steps: Vec::new(),
        aborted: None,
        faults_by_kind: BTreeMap::new(),
        ops_ok: 0,
        ops_failed: 0,
        ops_unknown: 0,
        keys_checked: 0,
        linearizability: Default::default(),
        counter: Ok(0),
        emitter_violations: Vec::new(),
        divergence: None,
        replicas_identical: Err("not checked".into()),
        longest_gap: (Duration::ZERO, Duration::ZERO),
        throughput_ft_on: vec![throughput(&clients, o.sample)],
        throughput_ft_off: None,
        history: o.out_dir.join(format!("history-{}.jsonl", o.seed)),
        elapsed: Duration::ZERO,
        check_time: Duration::ZERO,
        rate: o.rate,
        output_rule: o.output_rule,
        extra_clients: o.extra_clients,
        evidence: None,
    };
    let mut captures: Vec<(usize, Emissions)> = Vec::new();
    let mut gaps_at: Vec<(u64, u64)> = Vec::new();
    {
        let mut nem = Nemesis::new(&tb, &mut app, &mut etcd, Duration::from_millis(LEASE_MS));
        for (i, step) in schedule.iter().enumerate() {
            let mut captured = None;
            let r = run_step(&mut nem, step, clock, &mut captured);
            // The captures of the last step and of every step with a violation.
            captures.retain(|(n, _)| {
                report
                    .emitter_violations
                    .iter()
                    .any(|v| v.starts_with(&format!("step {n}:")))
            });
            if let Some(c) = captured {
                captures.push((i + 1, c));
            }
            match r {
                Ok((rec, window, violation)) => {
                    for f in &step.faults {
                        *report.faults_by_kind.entry(f.kind).or_default() += 1;
                    }
                    say(&format!(
                        "[{}/{}] {step}: {} -> {}, {} rejoined, protected after {:.1} s, emitters {:?}",
                        i + 1,
                        schedule.len(),
                        rec.primary_before,
                        rec.live_after,
                        rec.rejoined,
                        rec.to_protected.as_secs_f64(),
                        rec.emitters
                    ));
                    if let Some(v) = violation {
                        report
                            .emitter_violations
                            .push(format!("step {}: {v}", i + 1));
                    }
                    gaps_at.push(window);
                    report.steps.push(rec);
                }
                Err(e) => {
                    report.aborted = Some(format!("step {} ({step}): {e:#}", i + 1));
                    say(&format!(
                        "[{}/{}] {step}: FAILED: {e:#}",
                        i + 1,
                        schedule.len()
                    ));
                    let _ = nem.heal();
                    break;
                }
            }
            if let Some(d) = nem.divergence() {
                report.divergence = Some(d);
                break;
            }
            // Every few steps, a fault-free stretch measured (unpaced).
            if i % 5 == 4 {
                report
                    .throughput_ft_on
                    .push(throughput(&clients, Duration::from_secs(1)));
            }
        }
    }
    if report.aborted.is_none() {
        report.throughput_ft_on.push(throughput(&clients, o.sample));
    }
    let mut calls = clients.finish();
    if let Some(x) = extra {
        calls.extend(x.finish());
        calls.sort_by_key(|c| c.invoked_ns);
    }
    let end_ns = clock.ns();
    if report.aborted.is_none() {
        match history::final_reads(&tb.client_ns, &calls, clock) {
            Ok(reads) => calls.extend(reads),
            Err(e) => report.aborted = Some(format!("final reads: {e:#}")),
        }
        report.replicas_identical = replicas_identical(&app, &tb);
        // FT off: the backup stops, the primary goes on alone.
        if let Some(p) = ['a', 'b']
            .into_iter()
            .find(|&h| app.status(h).is_ok_and(|s| s["role"] == "primary"))
        {
            app.guard(nemesis::other(p)).kill()?;
            if Appliance::wait_until(Duration::from_secs(20), || {
                app.status(p).is_ok_and(|s| s["role"] == "solo")
            }) {
                let off = Clients::start(
                    &tb.client_ns,
                    o.clients..2 * o.clients,
                    "off",
                    o.seed,
                    CALL_TIMEOUT,
                    clock,
                    0,
                );
                Appliance::wait_until(Duration::from_secs(10), || off.ok() > 100);
                report.throughput_ft_off = Some(throughput(&off, o.sample));
                calls.extend(off.finish());
            }
        }
    }
    for c in &calls {
        match c.outcome {
            Outcome::Ok(_) => report.ops_ok += 1,
            Outcome::Failed(_) => report.ops_failed += 1,
            Outcome::Unknown(_) => report.ops_unknown += 1,
        }
    }
    history::write_history(&report.history, &calls)?;
    let t_check = Instant::now();
    report.linearizability = check::check_keys(&calls);
    report.check_time = t_check.elapsed();
    report.keys_checked = report.linearizability.keys;
    report.counter = check::check_counter(&calls);
    let (g, at) = check::longest_gap(&calls, 0, end_ns);
    report.longest_gap = (Duration::from_nanos(g), Duration::from_nanos(at));
    for (rec, (from, to)) in report.steps.iter_mut().zip(gaps_at) {
        rec.gap = Duration::from_nanos(check::longest_gap(&calls, from, to).0);
    }
    report.elapsed = began.elapsed();
    if !report.passed() {
        let dir = o.out_dir.join(format!("evidence-{}", o.seed));
        match keep_evidence(&tb, &app, &dir, &captures) {
            Ok(()) => report.evidence = Some(dir),
            Err(e) => say(&format!(
                "could not keep the evidence in {}: {e:#}",
                dir.display()
            )),
        }
    }
    let text = report.to_string();
    std::fs::write(o.out_dir.join(format!("report-{}.txt", o.seed)), &text)
        .context("writing the report")?;
    Ok(report)
}

/// One step: faults, hold, heal, re-protection, with the client network captured.
/// Returns the record, the step's window on the run clock, and an emitter violation.
fn run_step(
    nem: &mut Nemesis,
    step: &Step,
    clock: Clock,
    captured: &mut Option<Emissions>,
) -> Result<(StepRecord, (u64, u64), Option<String>)> {
    let primary = nem.live().context("no live host before the step")?;
    let emitters = VmEmitters::start(nem.tb)?;
    let t0 = Instant::now();
    let from = clock.ns();
    let outcome = (|| -> Result<(char, usize)> {
        let applied = nem.apply(step, primary);
        std::thread::sleep(nem.hold(step));
        nem.heal()?;
        applied?;
        nem.reprotect(PROTECT_TIMEOUT)
    })();
    let stopped = emitters.stop();
    let em = match stopped {
        Ok(em) => em,
        Err(e) => {
            outcome?;
            return Err(e);
        }
    };
    let runs = em.runs();
    *captured = Some(em);
    let (live, rejoined) = outcome?;
    let to_protected = t0.elapsed();
    let to = clock.ns();
    // One host emits; after a failover, the old primary's frames all come before the
    // new one's.
    let allowed: Vec<char> = if live == primary {
        vec![primary]
    } else {
        vec![primary, live]
    };
    let violation = (!(allowed.starts_with(&runs) || runs == [live]))
        .then(|| format!("emitters {runs:?}, primary {primary} -> {live}"));
    Ok((
        StepRecord {
            step: step.clone(),
            primary_before: primary,
            live_after: live,
            rejoined,
            to_protected,
            gap: Duration::ZERO,
            emitters: runs,
        },
        (from, to),
        violation,
    ))
}

/// After the clients stopped: the backup verifies at least two more checkpoints (the
/// replicas' memory hashed and compared at the same instruction), none diverging.
/// Checkpoints come every so many guest exits, which an idle guest makes slowly: PINGs
/// (they change no state) keep it busy meanwhile.
fn replicas_identical(app: &Appliance, tb: &Testbed) -> Result<u64, String> {
    let backup = ['a', 'b']
        .into_iter()
        .find(|&h| app.status(h).is_ok_and(|s| s["role"] == "backup"))
        .ok_or("no backup at the end")?;
    let verified =
        || -> Option<u64> { app.status(backup).ok()?["vm"]["checkpoints_verified"].as_u64() };
    let v0 = verified().ok_or("the backup reports no checkpoints")?;
    let mut c = crate::resp::connect(tb, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let ok = Appliance::wait_until(Duration::from_secs(30), || {
        for _ in 0..50 {
            if crate::resp::call(&mut c, &[b"PING"]).is_err() {
                break;
            }
        }
        verified().is_some_and(|v| v >= v0 + 2)
    });
    let s = app.status(backup).map_err(|e| e.to_string())?;
    if !s["vm"]["divergence"].is_null() {
        return Err(format!("divergence: {}", s["vm"]["divergence"]));
    }
    if !ok {
        return Err(format!("the backup verified no new checkpoint: {s:#}"));
    }
    Ok(verified().unwrap_or(v0) - v0)
}

/// A failed run's evidence in `dir`: every log and config of the testbed (the daemons',
/// the arbiter's, etcd's, and how each daemon run ended), the status of both hosts now,
/// and the client-network captures of the kept steps (`step-N-a.pcap`, `-b.pcap`: the
/// VM's frames as each host's bridge port received them).
fn keep_evidence(
    tb: &Testbed,
    app: &Appliance,
    dir: &std::path::Path,
    captures: &[(usize, Emissions)],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let keep = |p: &std::path::Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "log" | "toml" | "json"))
    };
    for sub in [tb.tmp_dir.clone(), tb.tmp_dir.join("etcd")] {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() && keep(&p) {
                let to = dir.join(p.file_name().unwrap_or_default());
                std::fs::copy(&p, &to).with_context(|| format!("copying {}", p.display()))?;
            }
        }
    }
    for h in ['a', 'b'] {
        let text = match app.status(h) {
            Ok(v) => serde_json::to_string_pretty(&v)?,
            Err(e) => format!("host {h}'s daemon does not answer: {e:#}"),
        };
        std::fs::write(dir.join(format!("status-{h}.json")), text)?;
    }
    for (n, em) in captures {
        for h in ['a', 'b'] {
            let path = dir.join(format!("step-{n}-{h}.pcap"));
            let file = std::fs::File::create(&path)?;
            let mut w = pcap_file::pcap::PcapWriter::new(file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            for e in em.frames.iter().filter(|e| e.host == h) {
                w.write_packet(&pcap_file::pcap::PcapPacket::new(
                    Duration::from_nanos(e.at_ns),
                    e.frame.len() as u32,
                    &e.frame,
                ))
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
        }
    }
    Ok(())
}
