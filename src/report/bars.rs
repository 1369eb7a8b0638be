//! The leaderboard as grouped bars (one group per benchmark and the average, one bar per
//! evaluated row) with ±1.96·stderr whiskers, so a gap between two bars can be read against the
//! noise of each.

use anyhow::Result;
use plotters::prelude::{
    ChartBuilder, Color, IntoDrawingArea, Palette, Palette99, PathElement, RGBColor, Rectangle,
    SVGBackend, TRANSPARENT, WHITE,
};

use super::plots::{draw_err, draw_legend, span_with_headroom, SIZE};
use super::rows::LeaderboardRow;
use crate::eval::task::Benchmark;

/// Whisker colour: one no other element uses, so the SVG's whiskers can be found by it
/// (`stroke="#111111"`).
pub const WHISKER: RGBColor = RGBColor(0x11, 0x11, 0x11);
/// 95% normal interval.
const Z: f64 = 1.96;

/// Group names on the x axis: the six benchmarks, then the average.
fn groups() -> Vec<&'static str> {
    Benchmark::ALL
        .iter()
        .map(|b| b.column())
        .chain(["Average"])
        .collect()
}

/// Per group: `(value, stderr)`, None where the row has no value.
type GroupValues = Vec<Option<(f64, Option<f64>)>>;

/// `(value, stderr)` of each group for one row; the stderr only where it is known.
fn values(r: &LeaderboardRow) -> GroupValues {
    Benchmark::ALL
        .iter()
        .map(|b| r.scores.get(b).map(|v| (*v, r.stderrs.get(b).copied())))
        .chain([r.average().map(|v| (v, r.average_stderr()))])
        .collect()
}

/// Number of whiskers `leaderboard_svg` draws for these rows (one per bar with a stderr).
pub fn whisker_count(rows: &[LeaderboardRow]) -> usize {
    rows.iter()
        .flat_map(values)
        .filter(|v| matches!(v, Some((_, Some(se))) if se.is_finite()))
        .count()
}

/// The ends of a bar's ±1.96·se whisker, clipped to the percent scale: on a few documents the
/// normal interval runs past 0 or 100, where no score can be, and would stretch the axis.
fn whisker(v: f64, se: Option<f64>) -> Option<(f64, f64)> {
    let h = Z * se.filter(|s| s.is_finite())?;
    Some(((v - h).max(0.0), (v + h).min(100.0)))
}

pub fn leaderboard_svg(rows: &[LeaderboardRow]) -> Result<String> {
    let names = groups();
    let m = rows.len().max(1) as f64;
    let all: Vec<GroupValues> = rows.iter().map(values).collect();
    let tops = all
        .iter()
        .flatten()
        .flatten()
        .map(|(v, se)| whisker(*v, *se).map_or(*v, |(_, hi)| hi));
    let y = span_with_headroom(tops.chain([0.0]), rows.len() + 1);
    let y = 0.0..y.end;
    let x = -0.5..(names.len() as f64 - 0.5);
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-9 && i >= 0.0 {
            names
                .get(i as usize)
                .map_or(String::new(), |s| s.to_string())
        } else {
            String::new()
        }
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let caption = if whisker_count(rows) > 0 {
            "Leaderboard (whiskers: ±1.96·stderr, 95%)"
        } else {
            "Leaderboard (no per-document records: no whiskers)"
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x, y)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .disable_x_mesh()
            .x_labels(names.len() + 1)
            .x_label_formatter(&label)
            .y_desc("percent")
            .draw()
            .map_err(draw_err)?;
        let width = 0.8 / m;
        for (i, (row, vals)) in rows.iter().zip(&all).enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let left = |g: usize| g as f64 - 0.4 + i as f64 * width;
            chart
                .draw_series(vals.iter().enumerate().filter_map(|(g, v)| {
                    let (v, _) = (*v)?;
                    Some(Rectangle::new(
                        [(left(g) + 0.05 * width, 0.0), (left(g) + 0.95 * width, v)],
                        color.filled(),
                    ))
                }))
                .map_err(draw_err)?
                .label(row.label.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
        }
        // Whiskers after every bar, so no bar covers one.
        let whiskers: Vec<PathElement<(f64, f64)>> = all
            .iter()
            .enumerate()
            .flat_map(|(i, vals)| {
                vals.iter().enumerate().filter_map(move |(g, v)| {
                    let (v, se) = (*v)?;
                    let (lo, hi) = whisker(v, se)?;
                    let c = g as f64 - 0.4 + (i as f64 + 0.5) * width;
                    let cap = 0.25 * width;
                    Some(PathElement::new(
                        vec![
                            (c - cap, lo),
                            (c + cap, lo),
                            (c, lo),
                            (c, hi),
                            (c - cap, hi),
                            (c + cap, hi),
                        ],
                        WHISKER.stroke_width(1),
                    ))
                })
            })
            .collect();
        if !whiskers.is_empty() {
            chart
                .draw_series(whiskers)
                .map_err(draw_err)?
                .label("±1.96·stderr (95%)")
                .legend(|(x, y)| {
                    PathElement::new(
                        vec![(x + 7, y - 6), (x + 7, y + 6)],
                        WHISKER.stroke_width(1),
                    )
                });
        }
        draw_legend(&mut chart)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::rows::Docs;
    use std::collections::BTreeMap;

    fn row(label: &str, se: Option<f64>) -> LeaderboardRow {
        let mut r = LeaderboardRow::plain(
            label.into(),
            Docs::Full,
            Benchmark::ALL.iter().map(|&b| (b, 40.0)).collect(),
        );
        if let Some(se) = se {
            r.stderrs = Benchmark::ALL
                .iter()
                .map(|&b| (b, se))
                .collect::<BTreeMap<_, _>>();
        }
        r
    }

    #[test]
    fn whiskers_stay_on_the_percent_scale() {
        assert_eq!(
            whisker(66.67, Some(33.33)),
            Some((66.67 - Z * 33.33, 100.0))
        );
        assert_eq!(whisker(10.0, Some(20.0)), Some((0.0, 10.0 + Z * 20.0)));
        assert_eq!(whisker(10.0, None), None);
        assert_eq!(whisker(10.0, Some(f64::NAN)), None);
    }

    #[test]
    fn bars_with_a_stderr_get_whiskers_and_others_none() {
        let rows = [row("PAFT", Some(1.5)), row("SFT", None)];
        // Six benchmarks and the average for PAFT; nothing for SFT.
        assert_eq!(whisker_count(&rows), 7);
        let svg = leaderboard_svg(&rows).unwrap();
        let whisker_lines = svg.matches("stroke=\"#111111\"").count();
        // Seven whiskers plus the legend's sample.
        assert_eq!(whisker_lines, 7 + 1, "{svg}");
        assert!(svg.contains("±1.96·stderr (95%)") && svg.contains("Winogrande"));
        assert!(svg.contains("\nPAFT\n</text>") && svg.contains("\nSFT\n</text>"));

        let none = leaderboard_svg(&[row("SFT", None)]).unwrap();
        assert_eq!(none.matches("stroke=\"#111111\"").count(), 0);
        assert!(!none.contains("±1.96·stderr (95%)"));
    }
}
