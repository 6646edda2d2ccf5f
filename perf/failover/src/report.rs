//! What a failover run keeps (results.json), prints and draws.
use ft_perf_plot::chart::{self, Bar, Bars, Group, Line, Marker, Row, Segment};
use ft_perf_plot::{Distribution, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const BENCHMARK: &str = "failover";

/// The backup's phases of one take-over (its `role_history.last_failover`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phases {
    pub detect_ms: f64,
    pub test_and_set_ms: f64,
    pub drain_ms: f64,
    pub announce_ms: f64,
    pub total_ms: f64,
    /// When the backup was live and had announced, relative to the fault (ms; from its
    /// `at_unix_ms`, millisecond resolution).
    pub live_at_ms: f64,
}

/// One connection's gap: its last reply before and first reply after the longest time
/// without a reply around the fault, relative to the fault (ms).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ClientGap {
    pub before_ms: f64,
    pub after_ms: f64,
}

impl ClientGap {
    pub fn gap_ms(&self) -> f64 {
        self.after_ms - self.before_ms
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Run {
    pub run: u32,
    pub clients: Vec<ClientGap>,
    pub backup: Phases,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spurious {
    pub role_changes: usize,
    pub seconds: f64,
    pub benchmark_runs: u32,
    pub transitions: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub command: Vec<String>,
    pub unix_time: u64,
    pub runs_asked: u32,
    pub clients: usize,
    pub peer_timeout_ms: u64,
    pub runs: Vec<Run>,
    /// Runs that failed, with the reason.
    pub failed: Vec<String>,
    pub gaps: Distribution,
    pub spurious: Option<Spurious>,
}

const PHASES: [&str; 4] = ["detect", "test-and-set", "drain", "announce"];

impl Results {
    pub fn print(&self) {
        println!(
            "primary killed {} times, {} clients on persistent connections (INCR back to back), peer_timeout_ms {}",
            self.runs_asked, self.clients, self.peer_timeout_ms
        );
        let g = &self.gaps;
        println!(
            "client-visible gap (ms), {} samples: p50 {:.0}, p99 {:.0}, max {:.0}",
            g.count, g.p50_ms, g.p99_ms, g.max_ms
        );
        if !self.failed.is_empty() {
            println!("{} of {} runs FAILED:", self.failed.len(), self.runs_asked);
            for f in &self.failed {
                println!("  {f}");
            }
        }
        println!("the backup's phases (ms): p50 / max over the runs");
        for (name, v) in PHASES
            .iter()
            .chain(["total"].iter())
            .zip(self.phase_values())
        {
            if let Ok(d) = Distribution::from_ms(&v) {
                println!("  {name:<13} {:>8.1} / {:>8.1}", d.p50_ms, d.max_ms);
            }
        }
        if let Some(s) = &self.spurious {
            for t in &s.transitions {
                println!("  {t}");
            }
            println!(
                "spurious failovers: {} in {:.0} s of redis-benchmark load ({} runs of 200,000 requests x 3 tests, -c 50 -P 4) on this 2-core machine, both hosts on it",
                s.role_changes, s.seconds, s.benchmark_runs
            );
        }
    }

    /// Per phase (and the total): its value in every run.
    fn phase_values(&self) -> [Vec<f64>; 5] {
        let col = |f: fn(&Phases) -> f64| self.runs.iter().map(|r| f(&r.backup)).collect();
        [
            col(|p| p.detect_ms),
            col(|p| p.test_and_set_ms),
            col(|p| p.drain_ms),
            col(|p| p.announce_ms),
            col(|p| p.total_ms),
        ]
    }

    /// Whether the results can be drawn (a hand-edited or truncated file may not).
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Error::Invalid {
            path: path.to_path_buf(),
            what,
        };
        if self.runs.is_empty() {
            return Err(bad("no successful runs".into()));
        }
        self.gaps.check().map_err(|e| bad(format!("gaps: {e}")))?;
        for r in &self.runs {
            let b = &r.backup;
            let v = [
                b.detect_ms,
                b.test_and_set_ms,
                b.drain_ms,
                b.announce_ms,
                b.live_at_ms,
            ];
            if v.iter().any(|x| !x.is_finite())
                || r.clients
                    .iter()
                    .any(|c| !c.gap_ms().is_finite() || c.gap_ms() < 0.0)
            {
                return Err(bad(format!("run {}: a phase or gap is not a time", r.run)));
            }
        }
        Ok(())
    }

    /// `failover-run-NN.svg` (a timeline per run), `failover-gap-cdf.svg`,
    /// `failover-phases.svg`.
    pub fn plot(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for r in &self.runs {
            out.push(chart::into(
                dir,
                &format!("failover-run-{:02}.svg", r.run),
                |p| timeline(p, r),
            )?);
        }
        let title = format!(
            "Client-visible gap when the primary dies ({} runs x {} clients, peer_timeout_ms {})",
            self.runs.len(),
            self.clients,
            self.peer_timeout_ms
        );
        out.push(chart::into(dir, "failover-gap-cdf.svg", |p| {
            chart::cdf(
                p,
                &title,
                "longest time without a reply around the fault (ms)",
                &[Line {
                    label: "client-visible gap",
                    points: &self.gaps.cdf,
                }],
            )
        })?);
        let vals = self.phase_values();
        let bars = Bars {
            title: "The backup's take-over phases (median, range over the runs)",
            y_desc: "ms",
            series: &["backup's phase"],
            groups: PHASES
                .iter()
                .chain(["total"].iter())
                .zip(vals.iter())
                .map(|(name, v)| Group {
                    label: name.to_string(),
                    bars: vec![Bar::spread(v)],
                })
                .collect(),
        };
        out.push(chart::into(dir, "failover-phases.svg", |p| {
            chart::bars(p, &bars)
        })?);
        Ok(out)
    }
}

/// One run: the backup's phases laid back from the instant it was live, each client's
/// gap, the fault at 0.
fn timeline(path: &Path, r: &Run) -> Result<()> {
    let b = &r.backup;
    let mut end = b.live_at_ms;
    let mut segs = Vec::new();
    for (kind, d) in [b.announce_ms, b.drain_ms, b.test_and_set_ms, b.detect_ms]
        .into_iter()
        .enumerate()
    {
        segs.push(Segment {
            start: end - d,
            end,
            kind: 3 - kind,
            text: None,
        });
        end -= d;
    }
    segs.reverse();
    segs.last_mut().expect("four phases").text =
        Some(format!("live and announced at {:.0} ms", b.live_at_ms));
    let mut rows = vec![Row {
        label: "backup".into(),
        segments: segs,
    }];
    for (i, c) in r.clients.iter().enumerate() {
        rows.push(Row {
            label: format!("client {}", i + 1),
            segments: vec![Segment {
                start: c.before_ms,
                end: c.after_ms,
                kind: 4,
                text: Some(format!("{:.1} ms", c.gap_ms())),
            }],
        });
    }
    let kinds: Vec<&str> = PHASES
        .iter()
        .copied()
        .chain(["client: last reply before -> first after"])
        .collect();
    chart::timeline(
        path,
        &format!("Failover run {}: the primary's ftd SIGKILLed at 0", r.run),
        "ms from the fault",
        &kinds,
        &rows,
        &[Marker {
            at: 0.0,
            label: "SIGKILL".into(),
        }],
    )
}
