//! SVG plots with plotters' SVG backend. Text is written as SVG `<text>` for the viewer to render,
//! so no font file is needed (plotters only estimates label sizes for the layout).

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{anyhow, Result};
use plotters::prelude::{
    ChartBuilder, ChartContext, Circle, Color, CoordTranslate, DrawingBackend, IntoDrawingArea,
    LineSeries, Palette, Palette99, PathElement, RGBAColor, SVGBackend, SeriesLabelPosition, BLACK,
    TRANSPARENT, WHITE,
};

use super::search::{ParamPoint, TrajectoryPoint};

const SIZE: (u32, u32) = (760, 420);

/// Value range with a margin; a single value gets a unit-wide range around it.
fn span(values: impl IntoIterator<Item = f64>) -> Range<f64> {
    span_with_headroom(values, 0)
}

/// Like `span`, with room above the data for a legend of `legend_rows` entries (top right), so
/// the legend covers no point.
fn span_with_headroom(values: impl IntoIterator<Item = f64>, legend_rows: usize) -> Range<f64> {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    };
    let width = hi - lo;
    let top = if legend_rows == 0 {
        0.05 * width
    } else {
        (0.1 + 0.09 * legend_rows as f64) * width
    };
    (lo - 0.05 * width)..(hi + top)
}

/// Evaluation numbers on the x axis: integers only.
fn integer_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

fn rung_color(rung: usize) -> RGBAColor {
    Palette99::pick(rung).to_rgba()
}

/// plotters' errors borrow nothing but are generic over the backend; flatten them to text.
fn draw_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("cannot draw the plot: {e}")
}

/// The series legend, the same on every plot.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(draw_err)
}

/// Objective per evaluation (dots) and each rung's best-so-far (a staircase), one colour per
/// rung.
pub fn trajectory_svg(points: &[TrajectoryPoint]) -> Result<String> {
    let mut rungs: BTreeMap<usize, Vec<&TrajectoryPoint>> = BTreeMap::new();
    for p in points {
        rungs.entry(p.rung).or_default().push(p);
    }
    let x = span(points.iter().map(|p| p.index as f64));
    let y = span_with_headroom(
        points.iter().flat_map(|p| [p.objective, p.best_so_far]),
        rungs.len(),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Search trajectory (dots: evaluations, line: best so far)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x, y)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&integer_label)
            .x_desc("evaluation")
            .y_desc("objective")
            .draw()
            .map_err(draw_err)?;
        for (rung, pts) in &rungs {
            let color = rung_color(*rung);
            let mut stairs = vec![];
            for (i, p) in pts.iter().enumerate() {
                if i > 0 {
                    stairs.push((p.index as f64, pts[i - 1].best_so_far));
                }
                stairs.push((p.index as f64, p.best_so_far));
            }
            let docs = match pts[0].docs_per_task {
                Some(n) => format!("{n} docs/task"),
                None => "full tasks".into(),
            };
            chart
                .draw_series(LineSeries::new(stairs, color.stroke_width(2)))
                .map_err(draw_err)?
                .label(format!("rung {rung} ({docs})"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new((p.index as f64, p.objective), 3, color.filled())),
                )
                .map_err(draw_err)?;
        }
        draw_legend(&mut chart)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// Objective against one parameter's value, one colour per rung.
pub fn param_svg(param: &str, points: &[ParamPoint]) -> Result<String> {
    let mut rungs: BTreeMap<usize, Vec<&ParamPoint>> = BTreeMap::new();
    for p in points {
        rungs.entry(p.rung).or_default().push(p);
    }
    let x = span(points.iter().map(|p| p.value));
    let y = span_with_headroom(points.iter().map(|p| p.objective), rungs.len());
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("Objective vs {param}"), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x, y)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc(param)
            .y_desc("objective")
            .draw()
            .map_err(draw_err)?;
        for (rung, pts) in &rungs {
            let color = rung_color(*rung);
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new((p.value, p.objective), 4, color.filled())),
                )
                .map_err(draw_err)?
                .label(format!("rung {rung}"))
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, color.filled()));
        }
        draw_legend(&mut chart)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_text_labels() {
        let points: Vec<TrajectoryPoint> = (0..5)
            .map(|i| TrajectoryPoint {
                index: i,
                rung: i / 3,
                docs_per_task: (i < 3).then_some(20),
                objective: 40.0 + i as f64,
                best_so_far: 40.0 + i as f64,
            })
            .collect();
        let svg = trajectory_svg(&points).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        assert!(svg.contains("<text") && svg.contains("evaluation"));
        assert!(svg.contains("rung 0 (20 docs/task)") && svg.contains("rung 1 (full tasks)"));
        let one = [ParamPoint {
            value: 0.5,
            objective: 1.0,
            rung: 0,
        }];
        let svg = param_svg("sft.weight", &one).unwrap();
        assert!(svg.contains("Objective vs sft.weight"));
        // An empty trajectory still draws (axes only).
        assert!(trajectory_svg(&[]).unwrap().contains("</svg>"));
        let r = span([2.0]);
        assert!(
            (r.start - 1.45).abs() < 1e-12 && (r.end - 2.55).abs() < 1e-12,
            "{r:?}"
        );
    }
}
