//! Latency samples (HdrHistogram) and their summaries as written to results.json.
use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest recordable round trip (ns): a minute, far above the request timeout.
const MAX_NS: u64 = 60_000_000_000;
/// Significant decimal digits kept by the histogram (0.1% value resolution).
const SIGFIG: u8 = 3;

/// Round trips of one kind (ns) and the requests that got no answer in time.
pub struct Series {
    hist: Histogram<u64>,
    pub timeouts: u64,
}

impl Default for Series {
    fn default() -> Self {
        Series {
            hist: Histogram::new_with_bounds(1, MAX_NS, SIGFIG)
                .expect("static histogram bounds are valid"),
            timeouts: 0,
        }
    }
}

impl Series {
    pub fn record_ns(&mut self, ns: u64) {
        // Saturating: a value beyond MAX_NS is recorded as MAX_NS, never lost.
        self.hist.saturating_record(ns.max(1));
    }

    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// Adds every sample and timeout of `other`.
    pub fn merge(&mut self, other: &Series) {
        self.hist
            .add(&other.hist)
            .expect("histograms with the same bounds always add");
        self.timeouts += other.timeouts;
    }

    /// Value at quantile `q` in µs; an error if there is no sample (never a 0 or NaN that
    /// could pass for a measurement).
    pub fn quantile_us(&self, q: f64) -> Result<f64> {
        if self.hist.is_empty() {
            bail!("no samples");
        }
        Ok(self.hist.value_at_quantile(q) as f64 / 1000.0)
    }

    /// The summary for the report; an error if the series is empty.
    pub fn summary(&self, name: &str) -> Result<Summary> {
        let q = |q: f64| {
            self.quantile_us(q)
                .with_context(|| format!("{name}: no samples"))
        };
        Ok(Summary {
            name: name.to_string(),
            n: self.hist.len(),
            timeouts: self.timeouts,
            mean_us: self.hist.mean() / 1000.0,
            p50_us: q(0.5)?,
            p90_us: q(0.9)?,
            p99_us: q(0.99)?,
            p999_us: q(0.999)?,
            max_us: self.hist.max() as f64 / 1000.0,
            min_us: self.hist.min() as f64 / 1000.0,
            cdf: self.cdf(),
        })
    }

    /// (latency µs, cumulative fraction) at 200 evenly spaced quantiles plus the tail.
    fn cdf(&self) -> Vec<(f64, f64)> {
        let mut qs: Vec<f64> = (0..=199).map(|i| i as f64 / 200.0).collect();
        qs.extend([0.995, 0.998, 0.999, 0.9995, 0.9999, 1.0]);
        qs.iter()
            .map(|&q| (self.hist.value_at_quantile(q) as f64 / 1000.0, q))
            .collect()
    }
}

/// Percentiles of one series (µs) and its CDF for the plots.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub n: u64,
    pub timeouts: u64,
    pub mean_us: f64,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// (latency µs, cumulative fraction), increasing.
    pub cdf: Vec<(f64, f64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_series_is_an_error() {
        let s = Series::default();
        assert!(s.quantile_us(0.5).is_err());
        assert!(s.summary("x").is_err());
    }

    #[test]
    fn percentiles_from_the_histogram() {
        let mut s = Series::default();
        for us in 1..=1000u64 {
            s.record_ns(us * 1000);
        }
        let m = s.summary("x").unwrap();
        assert_eq!(m.n, 1000);
        assert!((m.p50_us - 500.0).abs() < 1.0, "{}", m.p50_us);
        assert!((m.p99_us - 990.0).abs() < 1.5, "{}", m.p99_us);
        assert!((m.max_us - 1000.0).abs() < 1.5, "{}", m.max_us);
        assert!(
            m.cdf
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
    }
}
