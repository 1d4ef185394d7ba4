//! SVG plots of latency results (plotters' SVG backend: no fonts or system libraries).

use std::path::Path;

use plotters::prelude::*;

use crate::BenchError;

const COLORS: [RGBColor; 4] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Config(format!("plot: {e}"))
}

/// Draws the series' legend box at `pos`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> Result<(), BenchError> {
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

/// Empirical CDF of each series of inter-token gaps (milliseconds, log x axis).
pub fn cdf(path: &Path, title: &str, series: &[(String, Vec<f64>)]) -> Result<(), BenchError> {
    cdf_of(
        path,
        title,
        "inter-token latency (ms, log scale)",
        "fraction of gaps ≤ x",
        series,
    )
}

/// Empirical CDF of each series (milliseconds, log x axis), with the axes named.
pub fn cdf_of(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<f64>)],
) -> Result<(), BenchError> {
    let all = series.iter().flat_map(|(_, v)| v.iter().copied());
    let (lo, hi) = all
        .filter(|x| x.is_finite() && *x > 0.0)
        .fold((f64::MAX, 0f64), |(a, b), x| (a.min(x), b.max(x)));
    if hi <= 0.0 {
        return Err(err("no data"));
    }
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0f64..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    for (i, (name, v)) in series.iter().enumerate() {
        let mut s: Vec<f64> = v.iter().copied().filter(|x| *x > 0.0).collect();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len().max(1) as f64;
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.iter().enumerate().map(|(k, x)| (*x, (k + 1) as f64 / n)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(err)
}

/// Each series' (time s, latency ms) points, with vertical marks at `marks` (seconds).
pub fn timeline(
    path: &Path,
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
    marks: &[f64],
) -> Result<(), BenchError> {
    let pts = series.iter().flat_map(|(_, v)| v.iter().copied());
    let (tmax, ymax) = pts.fold((0f64, 0f64), |(a, b), (t, y)| (a.max(t), b.max(y)));
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(
            0f64..tmax * 1.02 + 0.1,
            (0.5f64..ymax * 1.5 + 1.0).log_scale(),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time since the arm started (s)")
        .y_desc("inter-token latency (ms, log scale)")
        .draw()
        .map_err(err)?;
    for &m in marks {
        chart
            .draw_series(LineSeries::new(
                [(m, 0.5), (m, ymax * 1.5 + 1.0)],
                BLACK.mix(0.35).stroke_width(1),
            ))
            .map_err(err)?;
    }
    for (i, (name, v)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(v.iter().copied(), c.stroke_width(1)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(err)
}

/// Each series' (x, y) points joined by lines and marked, on linear axes from zero.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), BenchError> {
    let pts = series.iter().flat_map(|(_, v)| v.iter().copied());
    let (xmax, ymax) = pts.fold((0f64, 0f64), |(a, b), (x, y)| (a.max(x), b.max(y)));
    if xmax <= 0.0 {
        return Err(err("no data"));
    }
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..xmax * 1.1, 0f64..(ymax * 1.2).max(1e-3))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    for (i, (name, v)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(v.iter().copied(), c.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(v.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(err)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(err)
}
