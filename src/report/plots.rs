//! SVG plots with plotters' SVG backend. Text is written as SVG `<text>` for the viewer to render,
//! so no font file is needed (plotters only estimates label sizes for the layout).

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{anyhow, Result};
use plotters::prelude::{
    ChartBuilder, ChartContext, Circle, Color, CoordTranslate, DrawingBackend, IntoDrawingArea,
    LineSeries, Palette, Palette99, PathElement, RGBAColor, Rectangle, SVGBackend,
    SeriesLabelPosition, BLACK, TRANSPARENT, WHITE,
};

use super::search::{rung_bests, ParamPoint, TrajectoryPoint};

pub(super) const SIZE: (u32, u32) = (760, 420);
/// 95% normal interval.
const Z: f64 = 1.96;
/// The trajectory's y axis spans at least this many of the best's stderrs, so a step smaller
/// than the noise is drawn as a small step, not a cliff.
const MIN_SPAN_STDERRS: f64 = 8.0;

/// Value range with a margin; a single value gets a unit-wide range around it.
fn span(values: impl IntoIterator<Item = f64>) -> Range<f64> {
    span_with_headroom(values, 0)
}

/// Like `span`, with room above the data for a legend of `legend_rows` entries (top right), so
/// the legend covers no point.
pub(super) fn span_with_headroom(
    values: impl IntoIterator<Item = f64>,
    legend_rows: usize,
) -> Range<f64> {
    span_at_least(values, legend_rows, 0.0)
}

/// Like `span_with_headroom`, the data's range widened (about its middle) to `min_width`.
fn span_at_least(
    values: impl IntoIterator<Item = f64>,
    legend_rows: usize,
    min_width: f64,
) -> Range<f64> {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return 0.0..1.0;
    }
    let (lo, hi) = if hi - lo >= min_width && hi > lo {
        (lo, hi)
    } else if min_width > 0.0 {
        let mid = (lo + hi) / 2.0;
        (mid - min_width / 2.0, mid + min_width / 2.0)
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
pub(super) fn draw_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("cannot draw the plot: {e}")
}

/// The series legend, the same on every plot.
pub(super) fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
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

/// A rung's best ± 1.96·stderr, over the evaluations of that rung.
struct Band {
    rung: usize,
    x: Range<f64>,
    y: Range<f64>,
}

fn bands(points: &[TrajectoryPoint]) -> Vec<Band> {
    rung_bests(points)
        .into_iter()
        .filter_map(|(rung, best)| {
            let se = best.stderr?;
            let xs = points
                .iter()
                .filter(|p| p.rung == rung)
                .map(|p| p.index as f64);
            let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(x), b.max(x))
            });
            Some(Band {
                rung,
                x: (x0 - 0.3)..(x1 + 0.3),
                y: (best.objective - Z * se)..(best.objective + Z * se),
            })
        })
        .collect()
}

/// Objective per evaluation (dots) and each rung's best-so-far (a staircase), one colour per
/// rung. Where the journal has `objective_stderr`: each rung's best ± 1.96·stderr as a shaded
/// band, candidates not distinguishable from that best as hollow circles, and a y axis at least
/// `MIN_SPAN_STDERRS` of the best's stderrs tall.
pub fn trajectory_svg(points: &[TrajectoryPoint]) -> Result<String> {
    let mut rungs: BTreeMap<usize, Vec<&TrajectoryPoint>> = BTreeMap::new();
    for p in points {
        rungs.entry(p.rung).or_default().push(p);
    }
    let bands = bands(points);
    let noise_known = points.iter().any(|p| p.near_best.is_some());
    let legend_rows = rungs.len() + usize::from(!bands.is_empty()) + 2 * usize::from(noise_known);
    let max_se = rung_bests(points)
        .values()
        .filter_map(|b| b.stderr)
        .fold(0.0, f64::max);
    let x = span(points.iter().map(|p| p.index as f64));
    let y = span_at_least(
        points
            .iter()
            .flat_map(|p| [p.objective, p.best_so_far])
            .chain(bands.iter().flat_map(|b| [b.y.start, b.y.end])),
        legend_rows,
        MIN_SPAN_STDERRS * max_se,
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
        if !bands.is_empty() {
            chart
                .draw_series(bands.iter().map(|b| {
                    Rectangle::new(
                        [(b.x.start, b.y.start), (b.x.end, b.y.end)],
                        rung_color(b.rung).mix(0.15).filled(),
                    )
                }))
                .map_err(draw_err)?
                .label("rung best ± 1.96·stderr")
                .legend(|(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 18, y + 5)], BLACK.mix(0.15).filled())
                });
        }
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
                        .filter(|p| p.near_best != Some(true))
                        .map(|p| Circle::new((p.index as f64, p.objective), 3, color.filled())),
                )
                .map_err(draw_err)?;
            chart
                .draw_series(
                    pts.iter().filter(|p| p.near_best == Some(true)).map(|p| {
                        Circle::new((p.index as f64, p.objective), 5, color.stroke_width(2))
                    }),
                )
                .map_err(draw_err)?;
        }
        if noise_known {
            // Marker legends in black: they apply to every rung's colour.
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(draw_err)?
                .label("not distinguishable from the best")
                .legend(|(x, y)| Circle::new((x + 9, y), 5, BLACK.stroke_width(2)));
            chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(draw_err)?
                .label("below the best beyond noise")
                .legend(|(x, y)| Circle::new((x + 9, y), 3, BLACK.filled()));
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
                objective_stderr: None,
                near_best: None,
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
        assert!(!svg.contains("not distinguishable"));
    }

    #[test]
    fn noise_is_drawn_as_a_band_and_hollow_markers_not_a_cliff() {
        // Two candidates 0.2 apart, each ± 1: the axis must not stretch 0.2 over the plot.
        let points: Vec<TrajectoryPoint> = [(0, 50.0), (1, 50.2), (2, 40.0)]
            .iter()
            .map(|&(i, objective)| TrajectoryPoint {
                index: i,
                rung: 0,
                docs_per_task: Some(20),
                objective,
                best_so_far: objective.max(50.0),
                objective_stderr: Some(1.0),
                near_best: Some(objective > 45.0),
            })
            .collect();
        let svg = trajectory_svg(&points).unwrap();
        assert!(svg.contains("rung best ± 1.96·stderr"), "{svg}");
        assert!(svg.contains("not distinguishable from the best"));
        // Two hollow markers and one filled one, plus one of each in the legend.
        let circles: Vec<&str> = svg
            .split("<circle")
            .skip(1)
            .map(|t| t.split('>').next().unwrap_or(""))
            .collect();
        let hollow = circles
            .iter()
            .filter(|c| c.contains("fill=\"none\""))
            .count();
        assert_eq!((hollow, circles.len() - hollow), (3, 2), "{svg}");
        let r = span_at_least([50.0, 50.2], 0, 8.0);
        assert!(r.end - r.start >= 8.0, "{r:?}");
        let r = span_at_least([40.0, 60.0], 0, 8.0);
        assert!(
            (r.start - 39.0).abs() < 1e-9 && (r.end - 61.0).abs() < 1e-9,
            "{r:?}"
        );
    }
}
