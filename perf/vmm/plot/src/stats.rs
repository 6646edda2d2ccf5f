//! Latency distributions kept in results.json: hdrhistogram percentiles and the CDF's
//! points, so a CDF can be drawn again without the samples.
use crate::{Error, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// A histogram of microseconds: 1 us to 1 hour, 3 significant digits.
pub fn histogram_us() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

/// Records `d` in `h` (microseconds, at least 1).
pub fn record(h: &mut Histogram<u64>, d: std::time::Duration) -> Result<()> {
    let us = (d.as_micros() as u64).max(1);
    h.record(us)
        .map_err(|e| Error::Histogram(format!("{us} us: {e}")))
}

/// A latency distribution (milliseconds).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Distribution {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The CDF: (value in ms, fraction of the samples at or below it), ascending.
    pub cdf: Vec<[f64; 2]>,
}

impl Distribution {
    /// From a histogram of microseconds; the CDF has a point per recorded value, thinned
    /// where values are close (under 0.5 % of the samples and 3 % of the value apart),
    /// except in the last 0.1 %.
    pub fn from_histogram_us(h: &Histogram<u64>) -> Distribution {
        if h.is_empty() {
            return Distribution::default();
        }
        let ms = |v: u64| v as f64 / 1e3;
        let mut cdf: Vec<[f64; 2]> = Vec::new();
        // The last point kept for good; points close to it only move a provisional
        // point after it, so the step before the next far point stays exact.
        let mut kept: Option<[f64; 2]> = None;
        for v in h.iter_recorded() {
            let p = [
                ms(h.highest_equivalent(v.value_iterated_to())),
                v.quantile_iterated_to(),
            ];
            let far =
                kept.is_none_or(|k| p[1] - k[1] >= 0.005 || p[0] >= k[0] * 1.03 || p[1] > 0.999);
            if far {
                cdf.push(p);
                kept = Some(p);
            } else if cdf.last().copied() == kept {
                cdf.push(p);
            } else if let Some(last) = cdf.last_mut() {
                *last = p;
            }
        }
        let q = |x: f64| ms(h.value_at_quantile(x));
        Distribution {
            count: h.len(),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: ms(h.max()),
            cdf,
        }
    }

    /// From a few values in ms: percentiles by hdrhistogram, the CDF exact (a point per
    /// value), the maximum exact.
    pub fn from_ms(values: &[f64]) -> Result<Distribution> {
        let mut h = histogram_us();
        for &v in values {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::Histogram(format!("{v} ms is not a duration")));
            }
            record(&mut h, std::time::Duration::from_secs_f64(v / 1e3))?;
        }
        let mut d = Distribution::from_histogram_us(&h);
        let mut s = values.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len() as f64;
        d.cdf = s
            .iter()
            .enumerate()
            .map(|(i, &v)| [v, (i + 1) as f64 / n])
            .collect();
        d.max_ms = s.last().copied().unwrap_or(0.0);
        // A bucket's highest equivalent value can pass the exact maximum.
        for p in [&mut d.p50_ms, &mut d.p90_ms, &mut d.p99_ms, &mut d.p999_ms] {
            *p = p.min(d.max_ms);
        }
        Ok(d)
    }

    /// Whether the distribution can be drawn: finite values, an ascending CDF.
    pub fn check(&self) -> Result<(), String> {
        let nums = [
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
        ];
        if nums.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err("a percentile is not a duration".into());
        }
        for w in self.cdf.windows(2) {
            if !(w[0][0] <= w[1][0] && w[0][1] <= w[1][1]) {
                return Err(format!("the CDF is not ascending at {:?}", w[1]));
            }
        }
        if self
            .cdf
            .iter()
            .any(|p| !p[0].is_finite() || !(0.0..=1.0).contains(&p[1]))
        {
            return Err("a CDF point is out of range".into());
        }
        Ok(())
    }
}

/// Median and range (min, max) of values; the median of an even count is the mean of
/// the middle two. `None` for no values.
pub fn spread(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return None;
    }
    let med = if n.is_multiple_of(2) {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    } else {
        s[n / 2]
    };
    Some((med, s[0], s[n - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_cdf() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let d = Distribution::from_ms(&v).unwrap();
        assert_eq!(d.count, 100);
        assert!((d.p50_ms - 50.0).abs() < 0.1, "{}", d.p50_ms);
        assert!((d.p99_ms - 99.0).abs() < 0.1, "{}", d.p99_ms);
        assert_eq!(d.max_ms, 100.0);
        assert_eq!(d.cdf.len(), 100);
        assert_eq!(d.cdf[99], [100.0, 1.0]);
        d.check().unwrap();
        let mut h = histogram_us();
        for us in 1..=100_000u64 {
            h.record(us).unwrap();
        }
        let d = Distribution::from_histogram_us(&h);
        d.check().unwrap();
        assert!(d.cdf.len() > 20 && d.cdf.len() < 1500, "{}", d.cdf.len());
        assert!((d.cdf.last().unwrap()[1] - 1.0).abs() < 1e-9);
    }

    #[test]
    fn spread_of_values() {
        assert_eq!(spread(&[3.0, 1.0, 2.0, 10.0]), Some((2.5, 1.0, 10.0)));
        assert_eq!(spread(&[]), None);
    }
}
