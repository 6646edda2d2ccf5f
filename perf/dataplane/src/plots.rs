//! SVG plots of a run, drawn from its results (so `--replot DIR` needs only
//! DIR/results.json): latency CDFs, the added latency against the floor, throughput bars.
use std::path::{Path, PathBuf};

use anyhow::Result;
use plotters::prelude::*;

use crate::{latency::LatencyResults, report::Results, throughput::ThroughputResults};

const SIZE: (u32, u32) = (960, 600);
const FONT: &str = "sans-serif";
/// Colours per series, colour-blind safe (Okabe-Ito).
const PALETTE: [RGBColor; 6] = [
    RGBColor(213, 94, 0),
    RGBColor(0, 114, 178),
    RGBColor(0, 0, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
];

/// Renders every plot the results allow into `dir`; returns the files written.
pub fn render(r: &Results, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    if let Some(l) = &r.latency {
        let p = dir.join("latency_cdf.svg");
        latency_cdf(l, &r.meta.date_utc, &p)?;
        out.push(p);
        let p = dir.join("added_vs_floor.svg");
        added_vs_floor(l, &r.meta.date_utc, &p)?;
        out.push(p);
    }
    if let Some(t) = &r.throughput
        && !t.paths.is_empty()
    {
        let p = dir.join("throughput.svg");
        throughput(t, &r.meta.date_utc, &p)?;
        out.push(p);
    }
    Ok(out)
}

fn latency_cdf(l: &LatencyResults, date: &str, path: &Path) -> Result<()> {
    let mut series = vec![
        ("client UDP, gate on (output rule)", &l.gate_on),
        ("client UDP, gate off", &l.gate_off),
        ("log link floor: kernel to kernel", &l.floor),
        (
            "log link, XDP reflector, as the sender saw it",
            &l.floor_user,
        ),
        ("log link, AF_PACKET ping-pong (userspace)", &l.raw_user),
    ];
    if let Some(d) = &l.gate_on_daemon_acks {
        series.insert(1, ("client UDP, gate on, acks from the backup's daemon", d));
    }
    // The x axis ends a little past the largest p99.9: the last 0.1% is in the tables.
    let lo = series
        .iter()
        .map(|(_, s)| s.min_us)
        .fold(f64::INFINITY, f64::min)
        .max(0.1)
        * 0.8;
    let hi = series
        .iter()
        .map(|(_, s)| s.p999_us)
        .fold(0.0, f64::max)
        .max(lo * 10.0)
        * 1.3;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Round-trip latency CDF ({date})"),
            (FONT, 22).into_font(),
        )
        .margin(16)
        .x_label_area_size(46)
        .y_label_area_size(56)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("round trip (µs, log scale)")
        .y_desc("fraction of round trips ≤ x")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()?;
    for (i, (name, s)) in series.iter().enumerate() {
        let c = PALETTE[i];
        let pts: Vec<(f64, f64)> = s
            .cdf
            .iter()
            .copied()
            .filter(|&(x, _)| x >= lo && x <= hi)
            .collect();
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(format!(
                "{name}: p50 {:.0} µs, p99 {:.0} µs",
                s.p50_us, s.p99_us
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Grouped bars at p50 and p99: the output rule's added latency, the floor, and the
/// issue's limit (goal × floor).
fn added_vs_floor(l: &LatencyResults, date: &str, path: &Path) -> Result<()> {
    let a = &l.added;
    let groups = [
        ("p50", a.p50_us, a.floor_p50_us, a.goal_p50),
        ("p99", a.p99_us, a.floor_p99_us, a.goal_p99),
    ];
    let bars = [
        "added by the output rule (gate on − gate off)",
        "log link floor (kernel to kernel)",
        "limit (goal × floor)",
    ];
    let ymax = groups
        .iter()
        .flat_map(|g| [g.1, g.2, g.2 * g.3])
        .fold(1.0, f64::max)
        * 1.25;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Output rule's added latency vs the link floor ({date}): ratio p50 {:.2} (goal ≤ {}), p99 {:.2} (goal ≤ {})",
                a.ratio_p50, a.goal_p50, a.ratio_p99, a.goal_p99
            ),
            (FONT, 17).into_font(),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..2.0, 0.0..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("µs")
        .draw()?;
    let w = 0.22;
    for (b, name) in bars.iter().enumerate() {
        let c = PALETTE[b];
        chart
            .draw_series(groups.iter().enumerate().map(|(g, grp)| {
                let v = [grp.1, grp.2, grp.2 * grp.3][b];
                let x0 = g as f64 + 0.17 + b as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.9, v.max(0.0))], c.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
        chart.draw_series(groups.iter().enumerate().map(|(g, grp)| {
            let v = [grp.1, grp.2, grp.2 * grp.3][b];
            let x0 = g as f64 + 0.17 + b as f64 * w;
            Text::new(
                format!("{v:.1}"),
                (x0, v.max(0.0) + ymax * 0.015),
                (FONT, 13),
            )
        }))?;
    }
    chart.draw_series(groups.iter().enumerate().map(|(g, grp)| {
        Text::new(
            grp.0.to_string(),
            (g as f64 + 0.45, -ymax * 0.03),
            (FONT, 16),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Horizontal bars: mean log frames per second arriving at host B per path, a dot per
/// round.
fn throughput(t: &ThroughputResults, date: &str, path: &Path) -> Result<()> {
    let n = t.paths.len();
    let xmax = t
        .paths
        .iter()
        .flat_map(|p| p.runs.iter().map(|r| r.b_fps))
        .fold(1.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (SIZE.0, 140 + 70 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<String> = t.paths.iter().map(|p| p.name.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Log frames/s reaching the backup's NIC ({} x {}-byte burst, {date})",
                t.burst_frames, t.frame_size
            ),
            (FONT, 18).into_font(),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(300)
        .build_cartesian_2d(0.0..xmax, 0.0..n as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|v| {
            let i = v.floor() as usize;
            if (v - i as f64 - 0.5).abs() < 0.01 && i < names.len() {
                names[names.len() - 1 - i].clone()
            } else {
                String::new()
            }
        })
        .x_desc("frames per second at B's log0 (bar: mean, dots: rounds)")
        .x_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .draw()?;
    for (i, p) in t.paths.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        // Not black: the dots are.
        let c = PALETTE[[0, 1, 3, 4, 5][i % 5]];
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y + 0.2), (p.mean_b_fps, y + 0.8)],
            c.mix(0.8).filled(),
        )))?;
        chart.draw_series(
            p.runs
                .iter()
                .map(|r| Circle::new((r.b_fps, y + 0.5), 4, BLACK.filled())),
        )?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{:.0}", p.mean_b_fps),
            (p.mean_b_fps + xmax * 0.01, y + 0.62),
            (FONT, 14),
        )))?;
    }
    root.present()?;
    Ok(())
}
