//! `spool perf --plot FILE.svg`: the picture people compare runs with. Two panels, one line
//! per core in each: the latency histogram (percent of the core's I/Os per bucket, log
//! latency axis) and IOPS over time (one point per progress period). Drawn with plotters'
//! SVG backend; every series is labelled `core N` in the legend.

use std::path::Path;

use plotters::prelude::*;
use spool_engine::perf::report::CoreSeries;
use spool_engine::perf::PerfReport;

use crate::error::ToolError;

/// Picture size in pixels.
const SIZE: (u32, u32) = (1200, 480);

/// Checks, before the run, that `path` can take the picture: not a directory, not a missing
/// name under /dev, in a directory that exists (an existing file must open for writing). Nothing is created or changed.
pub fn check_path(path: &Path) -> Result<(), ToolError> {
    let failed = |reason: String| ToolError::Failed(format!("{}: {reason}", path.display()));
    let ask = "give the path of an .svg file to write";
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => return Err(failed(format!("is a directory: {ask}"))),
        Ok(_) => {
            return std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map(drop)
                .map_err(|err| {
                    failed(format!(
                        "--plot cannot write it: {}: {ask}",
                        spool_engine::words::io_words(&err)
                    ))
                })
        }
        Err(_) => {}
    }
    spool_engine::guard::refuse_new_file_in_dev(path)
        .map_err(|err| ToolError::Failed(err.to_string()))?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(failed(format!(
                "{} is not a directory: {ask}",
                parent.display()
            )))
        }
        Err(err) => {
            return Err(failed(format!(
                "its directory {}: {}: {ask}",
                parent.display(),
                spool_engine::words::io_words(&err)
            )))
        }
    }
    Ok(())
}

/// Writes `report`'s series to `path` as an SVG.
pub fn write_svg(report: &PerfReport, path: &Path) -> Result<(), ToolError> {
    let failed = |err: &DrawingAreaErrorKind<std::io::Error>| {
        // plotters does not export its backend error type: its text is stripped of the
        // library's prefixes and of Rust's "(os error N)" tail.
        let text = err.to_string();
        let text = text.strip_prefix("backend error: ").unwrap_or(&text);
        let text = text.strip_prefix("Drawing backend error: ").unwrap_or(text);
        let reason = spool_engine::words::scrub(text);
        ToolError::Failed(format!("--plot {}: {reason}", path.display()))
    };
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|err| failed(&err))?;
    let (left, right) = root.split_horizontally(SIZE.0 / 2);
    let config = &report.config;
    let title = format!(
        "{} {} bs={} qd={} ({} layer)",
        config.target, config.rw, config.bs, config.qd, config.layer
    );
    latency_panel(&left, &report.series, &title).map_err(|err| failed(&err))?;
    iops_panel(&right, &report.series, &title).map_err(|err| failed(&err))?;
    root.present().map_err(|err| failed(&err))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn colour(index: usize) -> RGBColor {
    let (r, g, b) = Palette99::pick(index).to_rgba().rgb();
    RGBColor(r, g, b)
}

fn latency_panel(area: &Area<'_>, series: &[CoreSeries], title: &str) -> DrawResult {
    let points = series.iter().flat_map(|core| core.latency.iter());
    let x_min = points
        .clone()
        .map(|point| point.0)
        .fold(1.0, f64::min)
        .clamp(0.01, 1.0);
    let x_max = points.clone().map(|point| point.0).fold(1.0, f64::max) * 1.25;
    let y_max = points.map(|point| point.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("latency: {title}"), ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("latency, us (submission to completion reaching the job)")
        .y_desc("% of I/Os")
        .draw()?;
    draw_cores(&mut chart, series, |core| &core.latency)
}

fn iops_panel(area: &Area<'_>, series: &[CoreSeries], title: &str) -> DrawResult {
    let points = series.iter().flat_map(|core| core.iops.iter());
    let x_max = points.clone().map(|point| point.0).fold(0.1, f64::max);
    let y_max = points.map(|point| point.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(format!("IOPS over time: {title}"), ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("IOPS")
        .y_label_formatter(&|iops| format!("{:.2}M", iops / 1e6))
        .draw()?;
    draw_cores(&mut chart, series, |core| &core.iops)
}

/// One line per core (the points `points` picks from its series), labelled `core N`, and
/// the legend.
fn draw_cores<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    series: &[CoreSeries],
    points: impl Fn(&CoreSeries) -> &[(f64, f64)],
) -> DrawResult
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (index, core) in series.iter().enumerate() {
        let style = colour(index);
        chart
            .draw_series(LineSeries::new(points(core).iter().copied(), style))?
            .label(format!("core {}", core.core))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
}
