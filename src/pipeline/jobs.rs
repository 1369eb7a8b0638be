//! The pipeline's stages as Slurm jobs: the SFT and preference runs as two jobs that run at
//! once, the sequential baseline as a job that waits for the SFT job (`afterok`), and the final
//! evaluation rows as one job array. Each job runs `paft job UNIT_FILE`, which lands in
//! [`run_unit`] and does exactly what the local executor does for that unit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::experiment::{Experiment, Stage};
use super::stages::{self, RowEvaluator};
use crate::cluster::{JobKind, Outcome, SlurmConfig, SlurmDriver, Unit};
use crate::eval::PoolSplit;

/// A training run as a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainJob {
    experiment: Experiment,
    stage: Stage,
}

/// A report row's evaluation as a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RowJob {
    experiment: Experiment,
    tasks_dir: PathBuf,
    pools: PoolSplit,
    row: String,
    model: String,
}

fn train_unit_id(exp: &Experiment, stage: Stage) -> String {
    format!("train-{}", stage.dir(exp.pref_name()))
}

/// Trains `wanted` stages as Slurm jobs (the sequential one after the SFT job when both are
/// wanted; the SFT result must exist otherwise); returns each stage's model reference. Stages
/// whose jobs already finished return at once.
pub(crate) fn train_on_slurm(
    exp: &Experiment,
    cfg: &SlurmConfig,
    wanted: &[Stage],
) -> Result<BTreeMap<Stage, String>> {
    let mut driver = SlurmDriver::open(&exp.out(), cfg.clone())?;
    let units: Vec<Unit> = wanted
        .iter()
        .map(|&stage| {
            let after = (stage == Stage::SequentialPref && wanted.contains(&Stage::Sft))
                .then(|| train_unit_id(exp, Stage::Sft));
            Ok(Unit {
                id: train_unit_id(exp, stage),
                payload: json!({"train": TrainJob { experiment: exp.clone(), stage }}),
                after,
            })
        })
        .collect::<Result<_>>()?;
    let mut refs = BTreeMap::new();
    let mut failures = vec![];
    driver.run(
        JobKind::Train,
        "train",
        &units,
        false,
        &mut |unit, outcome| {
            let at = units.iter().position(|u| u.id == unit.id);
            let stage =
                wanted[at.with_context(|| format!("unit {} is not a training unit", unit.id))?];
            match outcome {
                Outcome::Done(v) => {
                    let r = v["ref"].as_str().with_context(|| {
                        format!("unit {}: no model reference in its result", unit.id)
                    })?;
                    refs.insert(stage, r.to_string());
                }
                Outcome::Failed(f) => failures.push(f.to_string()),
            }
            Ok(())
        },
    )?;
    if !failures.is_empty() {
        bail!("training on Slurm failed:\n  {}", failures.join("\n  "));
    }
    if let Some(missing) = wanted.iter().find(|s| !refs.contains_key(s)) {
        bail!(
            "the {} training job ended without a result",
            missing.section()
        );
    }
    Ok(refs)
}

/// Evaluates report rows `(name, model reference)` as one Slurm job array; `done` is called for
/// each row as its job finishes.
pub(crate) fn evaluate_rows_on_slurm(
    exp: &Experiment,
    cfg: &SlurmConfig,
    tasks_dir: &Path,
    pools: PoolSplit,
    rows: &[(&str, String)],
    done: &mut dyn FnMut(&str, f64) -> Result<()>,
) -> Result<()> {
    let mut driver = SlurmDriver::open(&exp.out(), cfg.clone())?;
    let tasks_dir = std::path::absolute(tasks_dir)?;
    let units: Vec<Unit> = rows
        .iter()
        .map(|(name, model)| Unit {
            id: format!("eval-{name}"),
            payload: json!({"row": RowJob {
                experiment: exp.clone(),
                tasks_dir: tasks_dir.clone(),
                pools,
                row: name.to_string(),
                model: model.clone(),
            }}),
            after: None,
        })
        .collect();
    let mut failures = vec![];
    driver.run(JobKind::Eval, "rows", &units, true, &mut |_, outcome| {
        match outcome {
            Outcome::Done(v) => {
                let row = v["row"].as_str().unwrap_or_default().to_string();
                done(&row, v["seconds"].as_f64().unwrap_or(f64::NAN))?;
            }
            Outcome::Failed(f) => failures.push(f.to_string()),
        }
        Ok(())
    })?;
    if !failures.is_empty() {
        bail!(
            "evaluating report rows on Slurm failed:\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// Runs one unit inside a job (`paft job UNIT_FILE`); returns what the driver reads.
pub fn run_unit(payload: serde_json::Value) -> Result<serde_json::Value> {
    let obj = payload
        .as_object()
        .filter(|o| o.len() == 1)
        .context("a unit is an object with one key: train, row or candidate")?;
    let (kind, body) = obj.iter().next().expect("one key");
    match kind.as_str() {
        "train" => {
            let job: TrainJob = serde_json::from_value(body.clone()).context("train unit")?;
            let model = stages::train_stage(&job.experiment, job.stage)?;
            Ok(json!({ "ref": model }))
        }
        "row" => {
            let job: RowJob = serde_json::from_value(body.clone()).context("row unit")?;
            let t = std::time::Instant::now();
            let mut rows = RowEvaluator::open(&job.experiment, &job.tasks_dir, job.pools)?;
            rows.evaluate(&job.row, &job.model)?;
            Ok(json!({"row": job.row, "seconds": t.elapsed().as_secs_f64()}))
        }
        "candidate" => {
            let job: crate::search::run::CandidateJob =
                serde_json::from_value(body.clone()).context("candidate unit")?;
            Ok(serde_json::to_value(job.run()?)?)
        }
        other => bail!("unknown unit kind `{other}` (known: train, row, candidate)"),
    }
}
