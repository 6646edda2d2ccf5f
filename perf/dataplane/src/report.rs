//! results.json (what a run measured, enough to re-plot it) and the text report.
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{latency::LatencyResults, stats::Summary, throughput::ThroughputResults};

/// Where and when a run happened.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    pub date_utc: String,
    pub command: String,
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub runtime_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub latency: Option<LatencyResults>,
    pub throughput: Option<ThroughputResults>,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn loadavg() -> String {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Meta {
    pub fn now() -> Meta {
        let date_utc = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':').map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "?".into());
        Meta {
            date_utc,
            command: std::env::args().collect::<Vec<_>>().join(" "),
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            cpu,
            loadavg_start: loadavg(),
            loadavg_end: String::new(),
            runtime_s: 0.0,
        }
    }

    pub fn finish(&mut self, runtime_s: f64) {
        self.loadavg_end = loadavg();
        self.runtime_s = runtime_s;
    }

    pub fn print(&self) {
        println!("== ft-perf-dataplane ==");
        println!("command: {}", self.command);
        println!(
            "machine: nproc={} kernel={} cpu=\"{}\" loadavg={} date={}",
            self.nproc, self.kernel, self.cpu, self.loadavg_start, self.date_utc
        );
    }
}

impl Results {
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("results.json");
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(dir: &Path) -> Result<Results> {
        let path = dir.join("results.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

fn row(s: &Summary) {
    println!(
        "  {:<56} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8}",
        s.name, s.n, s.mean_us, s.p50_us, s.p99_us, s.p999_us, s.max_us, s.timeouts
    );
}

/// The latency phase's summary: every series, then the added latency against the floor.
pub fn print_latency(l: &LatencyResults) {
    println!(
        "\n  {:<56} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "round trip (us)", "n", "mean", "p50", "p99", "p99.9", "max", "lost"
    );
    for s in [
        Some(&l.gate_on),
        Some(&l.gate_off),
        l.gate_on_daemon_acks.as_ref(),
        Some(&l.floor),
        Some(&l.floor_user),
        Some(&l.raw_user),
    ]
    .into_iter()
    .flatten()
    {
        row(s);
    }
    if let Some((p50, p99)) = l.added_daemon_acks_us {
        println!(
            "\n  with acks from the backup's daemon instead (kernel_acks = false): added p50 \
             {p50:.1} us ({:.2}x the floor), p99 {p99:.1} us ({:.2}x)",
            p50 / l.floor.p50_us,
            p99 / l.floor.p99_us
        );
    }
    let a = &l.added;
    println!("\n  output rule's added latency (gate on - gate off) vs the kernel-to-kernel floor");
    println!(
        "  {:<10} {:>12} {:>12} {:>10} {:>8} {:>6}",
        "", "added (us)", "floor (us)", "ratio", "goal", "met"
    );
    for (q, add, fl, ratio, goal, met, rounds) in [
        (
            "p50",
            a.p50_us,
            a.floor_p50_us,
            a.ratio_p50,
            a.goal_p50,
            a.meets_p50,
            &a.per_round_p50_us,
        ),
        (
            "p99",
            a.p99_us,
            a.floor_p99_us,
            a.ratio_p99,
            a.goal_p99,
            a.meets_p99,
            &a.per_round_p99_us,
        ),
    ] {
        let rounds: Vec<String> = rounds.iter().map(|v| format!("{v:.1}")).collect();
        println!(
            "  {q:<10} {add:>12.1} {fl:>12.1} {ratio:>10.2} {:>8} {:>6}   per round: {}",
            format!("<= {goal}"),
            match met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "noise",
            },
            rounds.join(", ")
        );
    }
    println!(
        "  kernel hold time (gate on, ft_output_hold_seconds): p50 in {} us, p99 in {} us",
        l.hold_on_p50_bucket_us.as_deref().unwrap_or("?"),
        l.hold_on_p99_bucket_us.as_deref().unwrap_or("?")
    );
    let fp = &l.floor_probes;
    println!(
        "  floor probes: sent {} measured {} lost {} (kernel: stamped {} reflected {} measured {})",
        fp.sent,
        fp.measured,
        fp.timeouts,
        fp.kernel.stamped,
        fp.kernel.reflected,
        fp.kernel.measured
    );
    println!("\n  primary hold-time histogram (ft_output_hold_seconds, summed over rounds):");
    print_hist("gate on", &l.hold_hist_on);
    print_hist("gate off", &l.hold_hist_off);
    println!(
        "  max held_frames seen at the end of a round: {}",
        l.held_max
    );
}

fn print_hist(title: &str, h: &[(String, u64)]) {
    let total: u64 = h.iter().map(|(_, n)| n).sum();
    println!("  {title} (n={total})");
    if total == 0 {
        return;
    }
    let max = h.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1);
    let mut lower = "0".to_string();
    for (le, n) in h {
        if *n > 0 {
            let bar = "#".repeat(((*n * 40).div_ceil(max)) as usize);
            println!(
                "    [{lower:>6}, {le:>6}) us {n:>8} {:>6.2}% {bar}",
                *n as f64 * 100.0 / total as f64
            );
        }
        lower = le.clone();
    }
}
