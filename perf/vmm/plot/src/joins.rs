//! Re-protection runs (a series of joins by live state transfer): the report of both
//! re-protection benchmarks (`ft-perf-vmm reprotect`, `ft-perf-reprotect`), its plots.
use crate::chart::{self, Bar, Bars, Group, Line};
use crate::stats::{Distribution, histogram_us, record};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One join.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Join {
    /// The guest's pause (the stop phase).
    pub pause_ms: f64,
    /// The whole transfer.
    pub total_ms: f64,
    pub bytes: u64,
    pub rounds: Option<u64>,
    pub stop_pages: Option<u64>,
    /// The stop phase's parts, as the daemon reports them.
    #[serde(default)]
    pub pause_parts_ms: serde_json::Value,
}

/// A series of joins and the clients' latency during them and without them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JoinReport {
    pub title: String,
    /// What a transfer's client-latency window is (e.g. "to 1 s after the cut").
    pub window_note: String,
    pub joins: Vec<Join>,
    pub pause: Distribution,
    pub transfer: Distribution,
    /// Client request latency in the transfers' windows.
    pub during: Distribution,
    /// The same clients in windows without a transfer.
    pub without: Distribution,
}

impl JoinReport {
    /// `windows[i]` is join i's client-latency window; `quiet` windows had no
    /// transfer; `samples` are (start, latency) of every client request.
    pub fn new(
        title: &str,
        window_note: &str,
        joins: Vec<Join>,
        windows: &[(Instant, Instant)],
        quiet: &[(Instant, Instant)],
        samples: &[(Instant, Duration)],
    ) -> Result<JoinReport> {
        let (mut during, mut without) = (histogram_us(), histogram_us());
        let overlaps = |w: &[(Instant, Instant)], t: Instant, d: Duration| {
            w.iter().any(|&(s, e)| t < e && t + d > s)
        };
        for &(t, d) in samples {
            if overlaps(windows, t, d) {
                record(&mut during, d)?;
            } else if overlaps(quiet, t, d) {
                record(&mut without, d)?;
            }
        }
        let pause: Vec<f64> = joins.iter().map(|j| j.pause_ms).collect();
        let total: Vec<f64> = joins.iter().map(|j| j.total_ms).collect();
        Ok(JoinReport {
            title: title.to_string(),
            window_note: window_note.to_string(),
            pause: Distribution::from_ms(&pause)?,
            transfer: Distribution::from_ms(&total)?,
            during: Distribution::from_histogram_us(&during),
            without: Distribution::from_histogram_us(&without),
            joins,
        })
    }

    pub fn print(&self) {
        let mib: Vec<u64> = self.joins.iter().map(|j| j.bytes >> 20).collect();
        println!();
        println!("{}:", self.title);
        println!(
            "  pause (stop phase): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.pause.p50_ms, self.pause.p99_ms, self.pause.max_ms
        );
        println!(
            "  transfer: p50 {:.0} ms, max {:.0} ms; {}-{} MiB per join",
            self.transfer.p50_ms,
            self.transfer.max_ms,
            mib.iter().min().unwrap_or(&0),
            mib.iter().max().unwrap_or(&0)
        );
        for (what, d) in [
            (
                format!("during transfers ({})", self.window_note),
                &self.during,
            ),
            (
                "without a transfer (equal windows)".to_string(),
                &self.without,
            ),
        ] {
            println!(
                "  client SET latency {what}: p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms ({} requests)",
                d.p50_ms, d.p99_ms, d.max_ms, d.count
            );
        }
    }

    /// Whether the report can be drawn.
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Error::Invalid {
            path: path.to_path_buf(),
            what,
        };
        if self.joins.is_empty() {
            return Err(bad(format!("{}: no joins", self.title)));
        }
        for (name, d) in [
            ("pause", &self.pause),
            ("transfer", &self.transfer),
            ("during", &self.during),
            ("without", &self.without),
        ] {
            d.check()
                .map_err(|e| bad(format!("{}: {name}: {e}", self.title)))?;
        }
        Ok(())
    }

    /// `DIR/PREFIX-pause.svg` (pause per join), `PREFIX-latency-cdf.svg` and
    /// `PREFIX-latency.svg` (client latency during transfers vs without).
    pub fn plot(&self, dir: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let pause = Bars {
            title: &format!("{}: guest pause per join", self.title),
            y_desc: "pause (stop phase), ms",
            series: &["pause"],
            groups: self
                .joins
                .iter()
                .enumerate()
                .map(|(i, j)| Group {
                    label: format!("{}\n{} MiB", i + 1, j.bytes >> 20),
                    bars: vec![Some(Bar::new(j.pause_ms))],
                })
                .collect(),
        };
        out.push(chart::into(dir, &format!("{prefix}-pause.svg"), |p| {
            chart::bars(p, &pause)
        })?);
        let mut lines = Vec::new();
        let during = format!("during transfers ({})", self.window_note);
        if self.during.count > 0 {
            lines.push(Line {
                label: &during,
                points: &self.during.cdf,
            });
        }
        if self.without.count > 0 {
            lines.push(Line {
                label: "without a transfer",
                points: &self.without.cdf,
            });
        }
        if !lines.is_empty() {
            out.push(chart::into(
                dir,
                &format!("{prefix}-latency-cdf.svg"),
                |p| {
                    chart::cdf(
                        p,
                        &format!("{}: client SET latency", self.title),
                        "latency (ms)",
                        &lines,
                    )
                },
            )?);
        }
        let pct = |d: &Distribution| {
            [d.p50_ms, d.p90_ms, d.p99_ms, d.p999_ms, d.max_ms]
                .map(|v| (d.count > 0).then_some(Bar::new(v)))
        };
        let (a, b) = (pct(&self.during), pct(&self.without));
        let bars = Bars {
            title: &format!("{}: client SET latency percentiles", self.title),
            y_desc: "latency (ms)",
            series: &["during transfers", "without a transfer"],
            groups: ["p50", "p90", "p99", "p99.9", "max"]
                .iter()
                .enumerate()
                .map(|(i, l)| Group {
                    label: l.to_string(),
                    bars: vec![a[i], b[i]],
                })
                .collect(),
        };
        out.push(chart::into(dir, &format!("{prefix}-latency.svg"), |p| {
            chart::bars(p, &bars)
        })?);
        Ok(out)
    }
}
