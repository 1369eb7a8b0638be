//! What the journal says about the search: the trajectory (objective and best-so-far per rung,
//! in evaluation order, and which candidates are within noise of the rung's best) and the
//! objective against each parameter the search varied.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use polars::prelude::{Column, DataFrame};
use serde_json::Value;

use crate::search::JournalEntry;

/// One evaluation on the trajectory.
#[derive(Debug, Clone, PartialEq)]
pub struct TrajectoryPoint {
    pub index: usize,
    pub rung: usize,
    pub docs_per_task: Option<usize>,
    pub objective: f64,
    /// Best objective so far on the same rung: objectives on different subsets don't compare.
    pub best_so_far: f64,
    /// The journal's `objective_stderr`, when the search wrote one.
    pub objective_stderr: Option<f64>,
    /// Whether the objective is within 1.96·sqrt(se_best² + se²) of its rung's best (so the
    /// two are not distinguishable); None without both stderrs.
    pub near_best: Option<bool>,
}

/// A rung's best evaluation (highest objective; the earliest on ties).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RungBest {
    pub index: usize,
    pub objective: f64,
    pub stderr: Option<f64>,
}

/// `objective_stderr` by evaluation index. The field is optional (journals written before it
/// have none, and `JournalEntry` does not carry it), so the lines are read again as plain JSON;
/// a line `Journal::read` skipped, or a value that is not a non-negative number, is left out.
pub fn objective_stderrs(journal: &Path) -> Result<BTreeMap<usize, f64>> {
    let text = std::fs::read_to_string(journal)
        .with_context(|| format!("cannot read journal {}", journal.display()))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let Ok(json) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let (Some(index), Some(se)) = (
            json.get("index").and_then(Value::as_u64),
            json.get("objective_stderr"),
        ) else {
            continue;
        };
        match se.as_f64() {
            Some(v) if v.is_finite() && v >= 0.0 => {
                out.insert(index as usize, v);
            }
            _ if se.is_null() => {}
            _ => tracing::warn!(
                "journal {} line {}: objective_stderr {se} is not a non-negative number; ignored",
                journal.display(),
                i + 1
            ),
        }
    }
    Ok(out)
}

/// The journal in evaluation order, with each rung's running best and, where the journal has
/// stderrs, whether each candidate is distinguishable from the rung's final best.
pub fn trajectory(
    entries: &[JournalEntry],
    stderrs: &BTreeMap<usize, f64>,
) -> Vec<TrajectoryPoint> {
    let mut sorted: Vec<&JournalEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.index);
    let mut best: BTreeMap<usize, f64> = BTreeMap::new();
    let mut points: Vec<TrajectoryPoint> = sorted
        .into_iter()
        .map(|e| {
            let b = best.entry(e.rung).or_insert(f64::NEG_INFINITY);
            *b = b.max(e.objective);
            TrajectoryPoint {
                index: e.index,
                rung: e.rung,
                docs_per_task: e.docs_per_task,
                objective: e.objective,
                best_so_far: *b,
                objective_stderr: stderrs.get(&e.index).copied(),
                near_best: None,
            }
        })
        .collect();
    let bests = rung_bests(&points);
    for p in &mut points {
        let b = &bests[&p.rung];
        p.near_best = match (b.stderr, p.objective_stderr) {
            (Some(sb), Some(sc)) => {
                Some(b.objective - p.objective <= 1.96 * (sb * sb + sc * sc).sqrt())
            }
            _ => None,
        };
    }
    points
}

/// Each rung's best evaluation.
pub fn rung_bests(points: &[TrajectoryPoint]) -> BTreeMap<usize, RungBest> {
    let mut out: BTreeMap<usize, RungBest> = BTreeMap::new();
    for p in points {
        let better = out.get(&p.rung).is_none_or(|b| p.objective > b.objective);
        if better {
            out.insert(
                p.rung,
                RungBest {
                    index: p.index,
                    objective: p.objective,
                    stderr: p.objective_stderr,
                },
            );
        }
    }
    out
}

pub fn trajectory_frame(points: &[TrajectoryPoint]) -> Result<DataFrame> {
    let col = |name: &str, f: &dyn Fn(&TrajectoryPoint) -> f64| {
        Column::new(name.into(), points.iter().map(f).collect::<Vec<f64>>())
    };
    Ok(DataFrame::new(
        points.len(),
        vec![
            Column::new(
                "index".into(),
                points.iter().map(|p| p.index as u64).collect::<Vec<_>>(),
            ),
            Column::new(
                "rung".into(),
                points.iter().map(|p| p.rung as u64).collect::<Vec<_>>(),
            ),
            Column::new(
                "docs_per_task".into(),
                points
                    .iter()
                    .map(|p| p.docs_per_task.map(|n| n as u64))
                    .collect::<Vec<_>>(),
            ),
            col("objective", &|p| p.objective),
            col("best_so_far", &|p| p.best_so_far),
            Column::new(
                "objective_stderr".into(),
                points
                    .iter()
                    .map(|p| p.objective_stderr)
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "near_best".into(),
                points.iter().map(|p| p.near_best).collect::<Vec<_>>(),
            ),
        ],
    )?)
}

/// One evaluation seen from one parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamPoint {
    pub value: f64,
    pub objective: f64,
    pub rung: usize,
}

/// Every parameter that takes more than one value over the journal (fixed ones say nothing),
/// with the evaluations that set it, in evaluation order.
pub fn varying_params(entries: &[JournalEntry]) -> BTreeMap<String, Vec<ParamPoint>> {
    let mut sorted: Vec<&JournalEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.index);
    let mut out: BTreeMap<String, Vec<ParamPoint>> = BTreeMap::new();
    for e in sorted {
        for (name, &value) in &e.params {
            out.entry(name.clone()).or_default().push(ParamPoint {
                value,
                objective: e.objective,
                rung: e.rung,
            });
        }
    }
    out.retain(|_, points| {
        let distinct: BTreeSet<u64> = points.iter().map(|p| p.value.to_bits()).collect();
        distinct.len() > 1
    });
    out
}

/// Long format: `param, value, objective, rung`.
pub fn params_frame(params: &BTreeMap<String, Vec<ParamPoint>>) -> Result<DataFrame> {
    let rows: Vec<(&String, &ParamPoint)> = params
        .iter()
        .flat_map(|(name, points)| points.iter().map(move |p| (name, p)))
        .collect();
    Ok(DataFrame::new(
        rows.len(),
        vec![
            Column::new(
                "param".into(),
                rows.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "value".into(),
                rows.iter().map(|(_, p)| p.value).collect::<Vec<_>>(),
            ),
            Column::new(
                "objective".into(),
                rows.iter().map(|(_, p)| p.objective).collect::<Vec<_>>(),
            ),
            Column::new(
                "rung".into(),
                rows.iter().map(|(_, p)| p.rung as u64).collect::<Vec<_>>(),
            ),
        ],
    )?)
}

/// A parameter name as a file-name part: `sft.weight` → `sft_weight`.
pub fn file_stem(param: &str) -> String {
    let s: String = param
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: usize, rung: usize, objective: f64, w: f64) -> JournalEntry {
        JournalEntry {
            index,
            key: format!("k{index}"),
            method: "ties".into(),
            params: BTreeMap::from([("sft.weight".to_string(), w), ("lambda".to_string(), 1.0)]),
            choices: BTreeMap::new(),
            rung,
            docs_per_task: Some(10 * (rung + 1)),
            scores: BTreeMap::new(),
            objective,
            objective_stderr: None,
            pool: None,
            tax: Default::default(),
            seconds: 0.5,
        }
    }

    #[test]
    fn best_so_far_runs_per_rung_in_evaluation_order() {
        // Written out of order: the trajectory follows `index`.
        let entries = [
            entry(1, 0, 40.0, 0.2),
            entry(0, 0, 50.0, 0.1),
            entry(2, 1, 30.0, 0.1),
            entry(3, 0, 55.0, 0.3),
            entry(4, 1, 20.0, 0.3),
        ];
        let t = trajectory(&entries, &BTreeMap::new());
        let idx: Vec<usize> = t.iter().map(|p| p.index).collect();
        let best: Vec<f64> = t.iter().map(|p| p.best_so_far).collect();
        assert_eq!(idx, [0, 1, 2, 3, 4]);
        assert_eq!(best, [50.0, 50.0, 30.0, 55.0, 30.0]);
        assert!(t.iter().all(|p| p.near_best.is_none()));
        let df = trajectory_frame(&t).unwrap();
        assert_eq!(df.height(), 5);
    }

    #[test]
    fn candidates_within_noise_of_the_rung_best_are_marked() {
        let entries = [
            entry(0, 0, 50.0, 0.1),
            entry(1, 0, 55.0, 0.2),
            entry(2, 0, 53.0, 0.3),
            entry(3, 1, 30.0, 0.1),
            entry(4, 0, 40.0, 0.4),
        ];
        // Best of rung 0 is 55 ± 1; 53 ± 1 is 2 below, within 1.96·√2 ≈ 2.77; 50 ± 1 is not.
        // Entry 4 has no stderr (an older line): unknown.
        let se = BTreeMap::from([(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.5)]);
        let t = trajectory(&entries, &se);
        let near: Vec<Option<bool>> = t.iter().map(|p| p.near_best).collect();
        assert_eq!(
            near,
            [Some(false), Some(true), Some(true), Some(true), None]
        );
        let bests = rung_bests(&t);
        assert_eq!(bests[&0].index, 1);
        assert_eq!(bests[&0].stderr, Some(1.0));
        let df = trajectory_frame(&t).unwrap();
        assert_eq!(
            df.column("near_best").unwrap().bool().unwrap().get(0),
            Some(false)
        );
    }

    #[test]
    fn objective_stderrs_are_optional_in_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        std::fs::write(
            &path,
            "{\"index\": 0, \"objective\": 1.0}\n\
             {\"index\": 1, \"objective_stderr\": 0.7}\n\
             {\"index\": 2, \"objective_stderr\": null}\n\
             {\"index\": 3, \"objective_stderr\": \"big\"}\n\
             {\"index\": 4, \"objective_stderr\": 0.2",
        )
        .unwrap();
        assert_eq!(
            objective_stderrs(&path).unwrap(),
            BTreeMap::from([(1, 0.7)])
        );
    }

    #[test]
    fn only_varying_params_are_plotted() {
        let entries = [entry(0, 0, 50.0, 0.1), entry(1, 0, 40.0, 0.2)];
        let p = varying_params(&entries);
        assert_eq!(p.keys().collect::<Vec<_>>(), ["sft.weight"]);
        assert_eq!(p["sft.weight"][1].value, 0.2);
        assert_eq!(params_frame(&p).unwrap().height(), 2);
        assert_eq!(file_stem("sft.weight"), "sft_weight");
        assert_eq!(file_stem("../x y"), "___x_y");
    }
}
