//! redis-benchmark results (its `--csv` output).

#[derive(Default, Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub test: String,
    pub rps: f64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Rows of `redis-benchmark --csv`: test, rps, avg, min, p50, p95, p99, max.
pub fn parse_csv(out: &str) -> Vec<Row> {
    out.lines()
        .filter(|l| !l.starts_with("\"test\""))
        .filter_map(|l| {
            let f: Vec<String> = l
                .split(',')
                .map(|s| s.trim_matches('"').to_string())
                .collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse().ok());
            Some(Row {
                test: f.first()?.clone(),
                rps: num(1)?,
                avg_ms: num(2)?,
                p50_ms: num(4)?,
                p99_ms: num(6)?,
                max_ms: num(7)?,
            })
        })
        .collect()
}

/// Median (the mean of the middle two for an even count) and range of a set of values.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n.is_multiple_of(2) {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    } else {
        s[n / 2]
    };
    (med, s[0], s[n - 1])
}
