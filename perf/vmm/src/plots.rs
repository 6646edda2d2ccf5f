//! The SVG plots of `ft-perf-vmm`'s results: throughput bars (guest vs redis-server,
//! free vs record, FT off vs on), latency percentile bars, CDFs, re-protection pauses.
use crate::bench::Row;
use crate::results::{ApplianceResults, RecordResults, ServiceResults, VmmResults};
use anyhow::{Result, bail};
use ft_perf_plot::chart::{self, Bar, Bars, Group, Line};
use std::path::{Path, PathBuf};

const TESTS: [&str; 3] = ["SET", "GET", "INCR"];

/// Draws every section `all` has (an error if it has none and `need_one`).
pub fn draw(dir: &Path, all: &VmmResults, need_one: bool) -> Result<()> {
    let mut out = Vec::new();
    if let Some(s) = &all.service {
        out.extend(service(dir, s)?);
    }
    if let Some(r) = &all.record {
        out.extend(record(dir, r)?);
    }
    if let Some(a) = &all.appliance {
        out.extend(appliance(dir, a)?);
    }
    if let Some(r) = &all.reprotect {
        r.report.check(&ft_perf_plot::results::results_path(dir))?;
        out.extend(r.report.plot(dir, "vmm-reprotect")?);
    }
    if out.is_empty() && need_one {
        bail!(
            "{}: no results to draw",
            ft_perf_plot::results::results_path(dir).display()
        );
    }
    for p in out {
        println!("wrote {}", p.display());
    }
    Ok(())
}

/// How bars over `n` rounds are summarised, for a title.
fn rounds(n: usize) -> String {
    if n == 1 {
        "1 round".into()
    } else {
        format!("median, range of {n} rounds")
    }
}

/// Median and range of one field of test `t` over rounds.
fn over_rounds(rounds: &[Vec<Row>], t: usize, f: fn(&Row) -> f64) -> Option<Bar> {
    let v: Vec<f64> = rounds.iter().filter_map(|r| r.get(t)).map(f).collect();
    Bar::spread(&v)
}

fn check_rows(what: &str, rows: &[Vec<Row>]) -> Result<()> {
    for r in rows {
        if r.len() != 3
            || r.iter()
                .any(|x| !x.rps.is_finite() || !x.p99_ms.is_finite())
        {
            bail!("{what}: a round does not have the three tests' rows");
        }
    }
    Ok(())
}

fn service(dir: &Path, s: &ServiceResults) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut pipes: Vec<u32> = s.configs.iter().map(|c| c.pipeline).collect();
    pipes.dedup();
    for c in &s.configs {
        check_rows("service", &c.guest)?;
        check_rows("service", &c.redis)?;
    }
    for p in pipes {
        let cfgs: Vec<_> = s.configs.iter().filter(|c| c.pipeline == p).collect();
        let pipe = if p > 1 {
            format!(", -P {p}")
        } else {
            String::new()
        };
        let groups = |f: fn(&Row) -> f64, lat: bool| -> Vec<Group> {
            cfgs.iter()
                .flat_map(|c| {
                    TESTS.iter().enumerate().map(move |(t, name)| {
                        let (g, r) = (over_rounds(&c.guest, t, f), over_rounds(&c.redis, t, f));
                        let mut bars = vec![g, r];
                        if lat {
                            bars = vec![
                                over_rounds(&c.guest, t, |x| x.p50_ms),
                                over_rounds(&c.redis, t, |x| x.p50_ms),
                                over_rounds(&c.guest, t, |x| x.p99_ms),
                                over_rounds(&c.redis, t, |x| x.p99_ms),
                            ];
                        }
                        Group {
                            label: format!("{name}\n{} clients", c.clients),
                            bars,
                        }
                    })
                })
                .collect()
        };
        let tput = Bars {
            title: &format!(
                "Guest service vs redis-server 7.0: throughput{pipe} ({})",
                rounds(s.rounds as usize)
            ),
            y_desc: "requests/s",
            series: &["guest (ft-vmm)", "redis-server"],
            groups: groups(|x| x.rps, false),
        };
        out.push(chart::into(
            dir,
            &format!("service-throughput-p{p}.svg"),
            |f| chart::bars(f, &tput),
        )?);
        let lat = Bars {
            title: &format!("Guest service vs redis-server 7.0: client latency{pipe}"),
            y_desc: "ms (redis-benchmark)",
            series: &[
                "guest p50",
                "redis-server p50",
                "guest p99",
                "redis-server p99",
            ],
            groups: groups(|x| x.p50_ms, true),
        };
        out.push(chart::into(
            dir,
            &format!("service-latency-p{p}.svg"),
            |f| chart::bars(f, &lat),
        )?);
    }
    if s.tap.count > 0 {
        s.tap.check().map_err(anyhow::Error::msg)?;
        out.push(chart::into(dir, "service-tap-cdf.svg", |f| {
            chart::cdf(
                f,
                "Guest response time on its tap (request frame in -> reply out), 50 clients",
                "response time (ms)",
                &[Line {
                    label: "guest + VMM",
                    points: &s.tap.cdf,
                }],
            )
        })?);
    }
    Ok(out)
}

fn record(dir: &Path, r: &RecordResults) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let Some(first) = r.modes.first() else {
        bail!("record: no modes");
    };
    let names: Vec<&str> = r.modes.iter().map(|m| m.mode.as_str()).collect();
    for (file, pipelined) in [
        ("record-throughput.svg", false),
        ("record-throughput-pipelined.svg", true),
    ] {
        let idx: Vec<usize> = (0..first.rows.len())
            .filter(|&i| first.rows[i].test.contains("-P") == pipelined)
            .collect();
        if idx.is_empty() {
            continue;
        }
        let b = Bars {
            title: &format!(
                "Guest service: free vs record ({} clients, {} requests per test)",
                r.clients, r.requests
            ),
            y_desc: "requests/s",
            series: &names,
            groups: idx
                .iter()
                .map(|&i| Group {
                    label: first.rows[i].test.clone(),
                    bars: r
                        .modes
                        .iter()
                        .map(|m| m.rows.get(i).map(|x| Bar::new(x.rps)))
                        .collect(),
                })
                .collect(),
        };
        out.push(chart::into(dir, file, |f| chart::bars(f, &b))?);
    }
    let series: Vec<String> = ["p50", "p99"]
        .iter()
        .flat_map(|p| names.iter().map(move |n| format!("{n} {p}")))
        .collect();
    let series: Vec<&str> = series.iter().map(String::as_str).collect();
    let b = Bars {
        title: "Guest service: free vs record, client latency",
        y_desc: "ms (redis-benchmark)",
        series: &series,
        groups: first
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| Group {
                label: row.test.clone(),
                bars: [|x: &Row| x.p50_ms, |x: &Row| x.p99_ms]
                    .iter()
                    .flat_map(|f| {
                        r.modes
                            .iter()
                            .map(move |m| m.rows.get(i).map(|x| Bar::new(f(x))))
                    })
                    .collect(),
            })
            .collect(),
    };
    out.push(chart::into(dir, "record-latency.svg", |f| {
        chart::bars(f, &b)
    })?);
    Ok(out)
}

fn appliance(dir: &Path, a: &ApplianceResults) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (pi, &p) in a.pipeline.iter().enumerate() {
        // Per mode: per round, the rows of this pipeline depth.
        let rows = |runs: &[Vec<(u32, Vec<Row>)>]| -> Result<Vec<Vec<Row>>> {
            runs.iter()
                .map(|r| match r.get(pi) {
                    Some((q, rows)) if *q == p => Ok(rows.clone()),
                    _ => bail!("appliance: a round has no rows for -P {p}"),
                })
                .collect()
        };
        let (off, on) = (rows(&a.off)?, rows(&a.on)?);
        check_rows("appliance", &off)?;
        check_rows("appliance", &on)?;
        let pipe = if p > 1 {
            format!(", -P {p}")
        } else {
            String::new()
        };
        let tput = Bars {
            title: &format!(
                "FT on vs FT off through ftd: throughput ({} clients{pipe}; {})",
                a.clients,
                rounds(off.len())
            ),
            y_desc: "requests/s",
            series: &["FT off (solo)", "FT on (primary + backup)"],
            groups: TESTS
                .iter()
                .enumerate()
                .map(|(t, name)| Group {
                    label: name.to_string(),
                    bars: vec![
                        over_rounds(&off, t, |x| x.rps),
                        over_rounds(&on, t, |x| x.rps),
                    ],
                })
                .collect(),
        };
        out.push(chart::into(
            dir,
            &format!("appliance-throughput-p{p}.svg"),
            |f| chart::bars(f, &tput),
        )?);
        let lat = Bars {
            title: &format!(
                "FT on vs FT off through ftd: client latency ({} clients{pipe})",
                a.clients
            ),
            y_desc: "ms (redis-benchmark)",
            series: &["FT off p50", "FT on p50", "FT off p99", "FT on p99"],
            groups: TESTS
                .iter()
                .enumerate()
                .map(|(t, name)| Group {
                    label: name.to_string(),
                    bars: vec![
                        over_rounds(&off, t, |x| x.p50_ms),
                        over_rounds(&on, t, |x| x.p50_ms),
                        over_rounds(&off, t, |x| x.p99_ms),
                        over_rounds(&on, t, |x| x.p99_ms),
                    ],
                })
                .collect(),
        };
        out.push(chart::into(
            dir,
            &format!("appliance-latency-p{p}.svg"),
            |f| chart::bars(f, &lat),
        )?);
    }
    Ok(out)
}
