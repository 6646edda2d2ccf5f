//! What the perf crates keep of a run and how they draw it: `results.json` (everything a
//! plot needs, so `--replot DIR` redraws without measuring), latency distributions
//! summarised with hdrhistogram, and SVG charts drawn with plotters (CDFs, grouped bars,
//! timelines). Shared by `ft-perf-failover`, `ft-perf-reprotect` and `ft-perf-vmm`.
pub mod chart;
pub mod joins;
pub mod results;
pub mod stats;

pub use results::{read_results, write_results};
pub use stats::Distribution;

use std::path::PathBuf;

/// Errors of reading, writing and drawing results.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a valid results file: {error}")]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("drawing {path}: {what}")]
    Draw { path: PathBuf, what: String },
    #[error("histogram: {0}")]
    Histogram(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use crate::chart::{self, Bar, Bars, Group, Line, Marker, Row, Segment};
    use crate::{Distribution, read_results, write_results};

    #[test]
    fn draws_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("ft-perf-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = Distribution::from_ms(&[1.0, 2.0, 5.0, 80.0, 90.0]).unwrap();
        chart::cdf(
            &dir.join("cdf.svg"),
            "t",
            "ms",
            &[Line {
                label: "a",
                points: &d.cdf,
            }],
        )
        .unwrap();
        let bars = Bars {
            title: "t",
            y_desc: "req/s",
            series: &["x", "y"],
            groups: vec![
                Group {
                    label: "SET\n50".into(),
                    bars: vec![Some(Bar::new(100_000.0)), Bar::spread(&[1.0, 2.0, 4.0])],
                },
                Group {
                    label: "GET".into(),
                    bars: vec![None, Some(Bar::new(5.0))],
                },
            ],
        };
        chart::bars(&dir.join("bars.svg"), &bars).unwrap();
        let rows = vec![Row {
            label: "backup".into(),
            segments: vec![Segment {
                start: 0.0,
                end: 50.0,
                kind: 0,
                text: Some("50 ms".into()),
            }],
        }];
        let m = [Marker {
            at: 0.0,
            label: "kill".into(),
        }];
        chart::timeline(&dir.join("tl.svg"), "t", "ms", &["detect", "x"], &rows, &m).unwrap();
        let svg = std::fs::read_to_string(dir.join("bars.svg")).unwrap();
        assert!(svg.contains("<svg") && svg.contains("SET") && svg.contains("100k"));
        write_results(&dir, "demo", &d).unwrap();
        assert_eq!(read_results::<Distribution>(&dir, "demo").unwrap(), d);
        let e = read_results::<Distribution>(&dir, "other").unwrap_err();
        assert!(e.to_string().contains("\"demo\""), "{e}");
        std::fs::write(dir.join("results.json"), "{\"benchmark\": \"demo\", \"form").unwrap();
        let e = read_results::<Distribution>(&dir, "demo").unwrap_err();
        assert!(e.to_string().contains("not a valid results file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
