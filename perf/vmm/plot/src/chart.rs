//! SVG charts (plotters, SVG backend): CDFs, grouped bars with ranges, timelines.
//! The same data always gives the same file, so committed plots only change with data.
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

const FONT: &str = "sans-serif";

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// The `i`th colour of the charts' palette.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn draw_error(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |what| Error::Draw {
        path: path.to_path_buf(),
        what,
    }
}

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Pixels a caption needs (20-pixel font, about 10 pixels a character, with margins).
fn title_width(title: &str) -> usize {
    title.chars().count() * 10 + 60
}

/// One line of a CDF chart: (value, fraction) points, ascending.
pub struct Line<'a> {
    pub label: &'a str,
    pub points: &'a [[f64; 2]],
}

/// A CDF per line; the x axis is logarithmic when the values span more than 30x.
pub fn cdf(path: &Path, title: &str, x_desc: &str, lines: &[Line]) -> Result<()> {
    let err = draw_error(path);
    let xs = || lines.iter().flat_map(|l| l.points.iter().map(|p| p[0]));
    let lo = xs().filter(|x| *x > 0.0).fold(f64::INFINITY, f64::min);
    let hi = xs().fold(0.0, f64::max);
    if !lo.is_finite() || !hi.is_finite() || hi <= 0.0 {
        return Err(err("no positive values to draw".into()));
    }
    let root = SVGBackend::new(path, (title_width(title).max(820) as u32, 500)).into_drawing_area();
    if hi / lo > 30.0 {
        draw_cdf(
            &root,
            title,
            x_desc,
            (lo * 0.9..hi * 1.1).log_scale(),
            lines,
            true,
        )
    } else {
        let x0 = (lo - (hi - lo) * 0.1).max(0.0);
        draw_cdf(
            &root,
            title,
            x_desc,
            x0..hi + (hi - x0) * 0.05,
            lines,
            false,
        )
    }
    .map_err(&err)?;
    root.present().map_err(|e| err(s(e)))
}

fn draw_cdf<X>(
    root: &Area,
    title: &str,
    x_desc: &str,
    x: X,
    lines: &[Line],
    log: bool,
) -> Result<(), String>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    root.fill(&WHITE).map_err(s)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 20))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(x, 0.0..1.0)
        .map_err(s)?;
    let desc = if log {
        format!("{x_desc} (log scale)")
    } else {
        x_desc.to_string()
    };
    chart
        .configure_mesh()
        .x_desc(desc)
        .y_desc("fraction of samples <= x")
        .y_labels(11)
        .draw()
        .map_err(s)?;
    for (i, l) in lines.iter().enumerate() {
        let c = color(i);
        // A step function: each value raises the fraction.
        let mut pts = Vec::with_capacity(2 * l.points.len());
        let mut prev = 0.0;
        for p in l.points.iter().filter(|p| !log || p[0] > 0.0) {
            pts.push((p[0], prev));
            pts.push((p[0], p[1]));
            prev = p[1];
        }
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(s)?
            .label(l.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(s)
}

/// One bar: its value and, optionally, the range it summarises (e.g. over rounds).
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub value: f64,
    pub range: Option<(f64, f64)>,
}

impl Bar {
    pub fn new(value: f64) -> Bar {
        Bar { value, range: None }
    }
    /// The median of values, with their range.
    pub fn spread(values: &[f64]) -> Option<Bar> {
        crate::stats::spread(values).map(|(m, lo, hi)| Bar {
            value: m,
            range: (values.len() > 1).then_some((lo, hi)),
        })
    }
}

/// A group of bars, one per series (`None`: that series has no value here). Its label
/// may have several lines (`\n`).
pub struct Group {
    pub label: String,
    pub bars: Vec<Option<Bar>>,
}

/// A grouped bar chart.
pub struct Bars<'a> {
    pub title: &'a str,
    pub y_desc: &'a str,
    pub series: &'a [&'a str],
    pub groups: Vec<Group>,
}

/// A compact label for a bar's value.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Draws a grouped bar chart (whiskers for ranges, values on the bars).
pub fn bars(path: &Path, b: &Bars) -> Result<()> {
    let err = draw_error(path);
    let n = b.groups.len();
    let k = b.series.len();
    if n == 0 || k == 0 {
        return Err(err("no bars to draw".into()));
    }
    let all = b.groups.iter().flat_map(|g| g.bars.iter().flatten());
    let ymax = all
        .map(|x| x.range.map_or(x.value, |r| r.1.max(x.value)))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    // Headroom above the bars for the values and the legend.
    let ymax = if ymax > 0.0 {
        ymax * (1.1 + 0.12 * k as f64)
    } else {
        1.0
    };
    let width = (200 + n * (30 + 34 * k))
        .max(title_width(b.title))
        .clamp(640, 2000) as u32;
    let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
    draw_bars(&root, b, ymax).map_err(&err)?;
    root.present().map_err(|e| err(s(e)))
}

fn draw_bars(root: &Area, b: &Bars, ymax: f64) -> Result<(), String> {
    let (n, k) = (b.groups.len(), b.series.len());
    root.fill(&WHITE).map_err(s)?;
    let mut chart = ChartBuilder::on(root)
        .caption(b.title, (FONT, 20))
        .margin(14)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), 0.0..ymax)
        .map_err(s)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(b.y_desc)
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(s)?;
    let w = 0.8 / k as f64;
    let slot = |g: usize, i: usize| g as f64 - 0.4 + i as f64 * w;
    let value_style =
        TextStyle::from((FONT, 11).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, name) in b.series.iter().enumerate() {
        let c = color(i);
        let bars: Vec<(usize, Bar)> = b
            .groups
            .iter()
            .enumerate()
            .filter_map(|(g, grp)| grp.bars.get(i).copied().flatten().map(|x| (g, x)))
            .filter(|(_, x)| x.value.is_finite())
            .collect();
        chart
            .draw_series(bars.iter().map(|&(g, x)| {
                let x0 = slot(g, i);
                Rectangle::new([(x0 + 0.01, 0.0), (x0 + w - 0.01, x.value)], c.filled())
            }))
            .map_err(s)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        for &(g, x) in &bars {
            let xc = slot(g, i) + w / 2.0;
            let mut top = x.value;
            if let Some((lo, hi)) = x.range {
                top = top.max(hi);
                let cap = w * 0.2;
                for seg in [
                    vec![(xc, lo), (xc, hi)],
                    vec![(xc - cap, lo), (xc + cap, lo)],
                    vec![(xc - cap, hi), (xc + cap, hi)],
                ] {
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            seg,
                            BLACK.stroke_width(1),
                        )))
                        .map_err(s)?;
                }
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    short(x.value),
                    (xc, top + ymax * 0.005),
                    value_style.clone(),
                )))
                .map_err(s)?;
        }
    }
    let label_style =
        TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (g, grp) in b.groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(g as f64, 0.0));
        for (l, line) in grp.label.lines().enumerate() {
            root.draw(&Text::new(
                line.to_string(),
                (px, py + 6 + 15 * l as i32),
                label_style.clone(),
            ))
            .map_err(s)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()
        .map_err(s)
}

/// A span of a timeline row, of kind `kind` (its colour and legend entry), with an
/// optional text after it.
pub struct Segment {
    pub start: f64,
    pub end: f64,
    pub kind: usize,
    pub text: Option<String>,
}

pub struct Row {
    pub label: String,
    pub segments: Vec<Segment>,
}

/// A vertical line across the rows (e.g. the instant of a fault).
pub struct Marker {
    pub at: f64,
    pub label: String,
}

/// A timeline: one row per `rows` entry (top to bottom), spans coloured by kind.
pub fn timeline(
    path: &Path,
    title: &str,
    x_desc: &str,
    kinds: &[&str],
    rows: &[Row],
    markers: &[Marker],
) -> Result<()> {
    let err = draw_error(path);
    let xs = || {
        rows.iter()
            .flat_map(|r| r.segments.iter().flat_map(|s| [s.start, s.end]))
            .chain(markers.iter().map(|m| m.at))
            .filter(|x| x.is_finite())
    };
    let lo = xs().fold(f64::INFINITY, f64::min);
    let hi = xs().fold(f64::NEG_INFINITY, f64::max);
    if rows.is_empty() || !lo.is_finite() || !hi.is_finite() {
        return Err(err("nothing to draw".into()));
    }
    let pad = ((hi - lo) * 0.08).max(1.0);
    // Room below the rows for the legend.
    let spare = kinds.len() as f64 * 0.75 + 0.5;
    let height = (140 + 34 * rows.len() + (34.0 * spare) as usize).clamp(300, 1400) as u32;
    let root =
        SVGBackend::new(path, (title_width(title).max(900) as u32, height)).into_drawing_area();
    draw_timeline(
        &root,
        title,
        x_desc,
        kinds,
        rows,
        markers,
        (lo - pad, hi + 2.0 * pad, spare),
    )
    .map_err(&err)?;
    root.present().map_err(|e| err(s(e)))
}

fn draw_timeline(
    root: &Area,
    title: &str,
    x_desc: &str,
    kinds: &[&str],
    rows: &[Row],
    markers: &[Marker],
    // The x range, and the rows' worth of space below the rows (for the legend).
    (x0, x1, spare): (f64, f64, f64),
) -> Result<(), String> {
    let n = rows.len();
    root.fill(&WHITE).map_err(s)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 20))
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(120)
        .build_cartesian_2d(x0..x1, (-0.7 - spare)..(n as f64 - 0.3))
        .map_err(s)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc(x_desc)
        .draw()
        .map_err(s)?;
    let y_of = |r: usize| (n - 1 - r) as f64;
    for (k, name) in kinds.iter().enumerate() {
        let c = color(k);
        let spans: Vec<Rectangle<(f64, f64)>> = rows
            .iter()
            .enumerate()
            .flat_map(|(r, row)| {
                row.segments
                    .iter()
                    .filter(move |sg| sg.kind == k)
                    .map(move |sg| {
                        let y = y_of(r);
                        Rectangle::new([(sg.start, y - 0.3), (sg.end, y + 0.3)], c.filled())
                    })
            })
            .collect();
        chart
            .draw_series(spans)
            .map_err(s)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    let text_style =
        TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (r, row) in rows.iter().enumerate() {
        for sg in &row.segments {
            if let Some(t) = &sg.text {
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!(" {t}"),
                        (sg.end, y_of(r)),
                        text_style.clone(),
                    )))
                    .map_err(s)?;
            }
        }
    }
    let top = n as f64 - 0.35;
    let marker_style = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Left, VPos::Top));
    for m in markers {
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(m.at, -0.7 - spare), (m.at, top)],
                BLACK.stroke_width(2),
            )))
            .map_err(s)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!(" {}", m.label),
                (m.at, top),
                marker_style.clone(),
            )))
            .map_err(s)?;
    }
    let label_style =
        TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
    for (r, row) in rows.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(x0, y_of(r)));
        root.draw(&Text::new(
            row.label.clone(),
            (px - 8, py),
            label_style.clone(),
        ))
        .map_err(s)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(s)
}

/// Draws `f` into `dir/name` and returns that path (for a list of written files).
pub fn into(
    dir: &Path,
    name: &str,
    f: impl FnOnce(&Path) -> Result<()>,
) -> Result<std::path::PathBuf> {
    let p = dir.join(name);
    f(&p)?;
    Ok(p)
}
