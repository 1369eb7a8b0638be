//! What the journal says about the search: the trajectory (objective and best-so-far per rung,
//! in evaluation order) and the objective against each parameter the search varied.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use polars::prelude::{Column, DataFrame};

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
}

/// The journal in evaluation order, with each rung's running best.
pub fn trajectory(entries: &[JournalEntry]) -> Vec<TrajectoryPoint> {
    let mut sorted: Vec<&JournalEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| e.index);
    let mut best: BTreeMap<usize, f64> = BTreeMap::new();
    sorted
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
            }
        })
        .collect()
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
        let t = trajectory(&entries);
        let idx: Vec<usize> = t.iter().map(|p| p.index).collect();
        let best: Vec<f64> = t.iter().map(|p| p.best_so_far).collect();
        assert_eq!(idx, [0, 1, 2, 3, 4]);
        assert_eq!(best, [50.0, 50.0, 30.0, 55.0, 30.0]);
        let df = trajectory_frame(&t).unwrap();
        assert_eq!(df.height(), 5);
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
