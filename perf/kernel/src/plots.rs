//! SVG bar charts drawn from the results alone (so `--replot DIR` needs only
//! DIR/results.json): ns per frame per program and size, and the live-frame throughput
//! against the goal and 10 GbE line rate.
use std::path::{Path, PathBuf};

use anyhow::Result;
use plotters::prelude::*;

use crate::report::{Results, Row, Stats};

const WIDTH: u32 = 1100;
const FONT: &str = "sans-serif";
/// Okabe-Ito, colour-blind safe: one colour per frame size.
const SIZE_COLOURS: [RGBColor; 4] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
];

pub fn render(r: &Results, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    if !r.rows.is_empty() {
        let p = dir.join("ns_per_frame.svg");
        ns_per_frame(r, &p)?;
        out.push(p);
    }
    if !r.live.is_empty() {
        let p = dir.join("live_throughput.svg");
        live(r, &p)?;
        out.push(p);
    }
    Ok(out)
}

fn label(row: &Row) -> String {
    let short = match row.id.as_str() {
        "duplication" => "duplication (primary)".to_string(),
        "ack_rx" => "ack (primary)".to_string(),
        "ack_carrier" => "ack as release carrier, nothing held".to_string(),
        "hold_enqueue" => "hold-ring enqueue (primary)".to_string(),
        "release" => "release, per released frame".to_string(),
        id => match id.strip_prefix("backup_").and_then(|r| r.split_once('_')) {
            Some((kind, us)) => format!("backup {}, ack interval {us} µs", kind.to_uppercase()),
            None => id.replace('_', " "),
        },
    };
    format!("{}: {short}", row.program)
}

fn sizes(r: &Results) -> Vec<u32> {
    let mut s: Vec<u32> = r
        .rows
        .iter()
        .flat_map(|row| row.cells.iter().map(|c| c.size))
        .filter(|s| *s != 0)
        .collect();
    s.sort_unstable();
    s.dedup();
    s
}

/// A bar from 0 to the median, a whisker from min to max, and the median's value.
fn bar<DB: DrawingBackend>(
    chart: &mut ChartContext<
        '_,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
    s: &Stats,
    (y0, y1): (f64, f64),
    colour: RGBColor,
    text: String,
    xmax: f64,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    chart.draw_series(std::iter::once(Rectangle::new(
        [(0.0, y0), (s.median, y1)],
        colour.mix(0.85).filled(),
    )))?;
    let ym = (y0 + y1) / 2.0;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(s.min, ym), (s.max, ym)],
        BLACK.stroke_width(2),
    )))?;
    for x in [s.min, s.max] {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, y0 + 0.1 * (y1 - y0)), (x, y1 - 0.1 * (y1 - y0))],
            BLACK.stroke_width(2),
        )))?;
    }
    chart.draw_series(std::iter::once(Text::new(
        text,
        (s.max + xmax * 0.01, y1 - 0.25 * (y1 - y0)),
        (FONT, 12),
    )))?;
    Ok(())
}

fn ns_per_frame(r: &Results, path: &Path) -> Result<()> {
    let sz = sizes(r);
    let n = r.rows.len();
    let xmax = r
        .rows
        .iter()
        .flat_map(|row| row.cells.iter().map(|c| c.stats.max))
        .fold(1.0, f64::max)
        * 1.2;
    let height = 150 + 30 * (n as u32) * (sz.len().max(1) as u32);
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<String> = r.rows.iter().map(label).collect();
    let legend = sz
        .iter()
        .map(|s| format!("{s} B"))
        .collect::<Vec<_>>()
        .join(" / ");
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "ns per frame, BPF_PROG_RUN (bars {legend}: median; whiskers: min–max of {} samples; {}, CPU {})",
                r.meta.samples, r.meta.date_utc, r.meta.pinned_cpu
            ),
            (FONT, 15).into_font(),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(360)
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
        .x_desc("ns per frame (kernel's duration)")
        .draw()?;
    for (i, row) in r.rows.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let k = row.cells.len().max(1) as f64;
        let h = 0.8 / k;
        for (j, c) in row.cells.iter().enumerate() {
            let y1 = y + 0.9 - h * j as f64;
            let colour = match sz.iter().position(|s| *s == c.size) {
                Some(p) => SIZE_COLOURS[p % SIZE_COLOURS.len()],
                None => RGBColor(120, 120, 120),
            };
            let text = if c.size == 0 {
                format!(
                    "{:.0} ns ({} B frame, any size)",
                    c.stats.median, c.frame_len
                )
            } else {
                format!("{:.0} ns ({} B)", c.stats.median, c.size)
            };
            bar(&mut chart, &c.stats, (y1 - h * 0.9, y1), colour, text, xmax)?;
        }
    }
    root.present()?;
    Ok(())
}

fn live(r: &Results, path: &Path) -> Result<()> {
    let n = r.live.len();
    let xmax = r
        .live
        .iter()
        .map(|c| c.mpps.max)
        .fold(r.goal_mpps, f64::max)
        * 1.25;
    let root = SVGBackend::new(path, (WIDTH, 180 + 80 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<String> = r
        .live
        .iter()
        .map(|c| format!("{} B client frames", c.size))
        .collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Duplication (ft_client_rx) with live frames on one core, Mpps ({} frames/run, {})",
                r.meta.live_repeat, r.meta.date_utc
            ),
            (FONT, 16).into_font(),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(160)
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
        .x_desc("million frames per second (bar: median; whisker: min–max)")
        .draw()?;
    for (i, c) in r.live.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let text = format!(
            "{:.2} Mpps ({:.0} ns/frame)",
            c.mpps.median, c.ns_per_frame.median
        );
        bar(
            &mut chart,
            &c.mpps,
            (y + 0.2, y + 0.8),
            SIZE_COLOURS[i % 4],
            text,
            xmax,
        )?;
    }
    for (x, colour, text) in [
        (
            r.goal_mpps,
            RGBColor(213, 94, 0),
            format!("goal {:.2} Mpps (1500 B, one core)", r.goal_mpps),
        ),
        (
            r.line_rate_10g_1500_mpps,
            RGBColor(0, 0, 0),
            format!(
                "10 GbE line rate at 1500 B: {:.2} Mpps",
                r.line_rate_10g_1500_mpps
            ),
        ),
    ] {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x, 0.0), (x, n as f64)],
            colour.stroke_width(2),
        )))?;
        // The goal's label above the top bar, the line rate's below the bottom one.
        let y = if x == r.goal_mpps {
            n as f64 - 0.03
        } else {
            0.17
        };
        chart.draw_series(std::iter::once(Text::new(
            text,
            (x + xmax * 0.005, y),
            (FONT, 12).into_font().color(&colour),
        )))?;
    }
    root.present()?;
    Ok(())
}
