//! How long each stage of a `paft run` took, from the marks it leaves (`stages/<stage>.done`,
//! `{"seconds": …}`): the wall time of the run that finished the stage, so a stage resumed
//! after an interruption counts only its last part.

use std::path::Path;

use anyhow::{Context, Result};
use polars::prelude::{Column, DataFrame};

/// A finished stage and its seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTime {
    pub stage: String,
    pub seconds: f64,
}

/// Pipeline order: training, deltas, searches, evaluations, then anything else; by name within.
fn rank(stage: &str) -> u8 {
    match stage {
        "train-parallel" => 0,
        "train-sequential" => 1,
        s if s.starts_with("train-") => 2,
        "deltas" => 3,
        s if s.starts_with("search") => 4,
        s if s.starts_with("eval-") => 5,
        _ => 6,
    }
}

/// The marks in `dir` (none when it is missing), in pipeline order.
pub fn read_stages(dir: &Path) -> Result<Vec<StageTime>> {
    let mut out = vec![];
    for (name, path) in super::entries(dir)? {
        let Some(stage) = name.strip_suffix(".done") else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let seconds = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["seconds"].as_f64())
            .with_context(|| format!("{}: expected {{\"seconds\": N}}", path.display()))?;
        out.push(StageTime {
            stage: stage.to_string(),
            seconds,
        });
    }
    out.sort_by(|a, b| (rank(&a.stage), &a.stage).cmp(&(rank(&b.stage), &b.stage)));
    Ok(out)
}

/// `stage, minutes`, one row per stage and a last row `total`.
pub fn stages_frame(stages: &[StageTime]) -> Result<DataFrame> {
    let total: f64 = stages.iter().map(|s| s.seconds).sum();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s.stage.as_str())
        .chain(["total"])
        .collect();
    let minutes: Vec<f64> = stages
        .iter()
        .map(|s| s.seconds)
        .chain([total])
        .map(|s| s / 60.0)
        .collect();
    Ok(DataFrame::new(
        names.len(),
        vec![
            Column::new("stage".into(), names),
            Column::new("minutes".into(), minutes),
        ],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_come_in_pipeline_order_with_a_total() {
        let dir = tempfile::tempdir().unwrap();
        for (stage, s) in [
            ("eval-base", 60.0),
            ("search-ties", 120.0),
            ("train-sft-sparse", 30.0),
            ("train-parallel", 90.0),
        ] {
            let text = serde_json::json!({ "seconds": s }).to_string();
            std::fs::write(dir.path().join(format!("{stage}.done")), text).unwrap();
        }
        let stages = read_stages(dir.path()).unwrap();
        let names: Vec<&str> = stages.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(
            names,
            [
                "train-parallel",
                "train-sft-sparse",
                "search-ties",
                "eval-base"
            ]
        );
        let df = stages_frame(&stages).unwrap();
        let minutes = df.column("minutes").unwrap().f64().unwrap();
        assert_eq!(minutes.get(4), Some(5.0));
        std::fs::write(dir.path().join("deltas.done"), "{}").unwrap();
        let err = format!("{:#}", read_stages(dir.path()).unwrap_err());
        assert!(err.contains("deltas.done"), "{err}");
    }
}
