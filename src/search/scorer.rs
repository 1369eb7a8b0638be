//! Scores merge candidates: the base and the two fine-tunes are held in memory once, each
//! candidate is merged on all cores and evaluated on a frozen subset (the same documents and
//! shots for every candidate), with no disk round trip.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use super::space::{MergeCandidate, MODELS};
use crate::eval::pools::Pool;
use crate::eval::suite::DocSet;
use crate::eval::{Benchmark, EvalConfig, Evaluator, SuiteResult, TaskStore};
use crate::merge::{load_f32, InMemoryMerger, ModelRef};
use crate::model::{Pretrained, WeightMap};

/// What the search merges: the base θ₀ and the two fine-tunes whose deltas are combined
/// (directories, Hub ids, or `BASE+ADAPTER_DIR` for PEFT LoRA adapters).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MergeInputs {
    pub base: String,
    pub sft: String,
    pub pref: String,
}

impl MergeInputs {
    pub fn models(&self) -> [&str; 2] {
        [&self.sft, &self.pref]
    }
}

/// A candidate's scores on one subset of the search pool.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Headline metric per benchmark, percent, keyed by task name.
    pub scores: BTreeMap<String, f64>,
    pub objective: f64,
    /// Standard error of the objective (from the per-benchmark standard errors).
    pub objective_stderr: f64,
    pub seconds: f64,
}

/// Merges candidates in memory and scores them with an [`Evaluator`] on the search pool.
pub struct CandidateScorer {
    inputs: MergeInputs,
    evaluator: Evaluator,
    merger: InMemoryMerger,
    objective: Objective,
    subset_seed: u64,
    device: Device,
    seed: u64,
}

impl CandidateScorer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inputs: MergeInputs,
        store: TaskStore,
        eval: EvalConfig,
        subset_seed: u64,
        objective: Objective,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        let evaluator = Evaluator::open(&inputs.base, store, eval)?;
        let base = evaluator.base();
        let models = MODELS
            .iter()
            .zip(inputs.models())
            .map(|(role, m)| {
                load_f32(&ModelRef::parse(m), &base.config)
                    .with_context(|| format!("{role} model {m}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let merger = InMemoryMerger::new(
            &base.weights,
            &models.iter().collect::<Vec<_>>(),
            base.config.num_hidden_layers,
        )
        .context("the fine-tunes do not fit the base model")?;
        Ok(Self {
            inputs,
            evaluator,
            merger,
            objective,
            subset_seed,
            device,
            seed,
        })
    }

    pub fn base(&self) -> &Pretrained {
        self.evaluator.base()
    }

    pub fn evaluator_mut(&mut self) -> &mut Evaluator {
        &mut self.evaluator
    }

    pub fn inputs(&self) -> &MergeInputs {
        &self.inputs
    }

    /// The candidate's merged weights (f32, on the scoring device).
    pub fn merge(&self, c: &MergeCandidate) -> Result<WeightMap> {
        let config = c.merge_config(&self.inputs.base, self.inputs.models())?;
        self.merger
            .merge(&config, self.seed, DType::F32, &self.device)
    }

    /// The documents a rung scores: `docs` per task (`None`: the whole search pool).
    pub fn doc_set(&self, docs: Option<usize>) -> DocSet {
        DocSet::sampled(Pool::Search, docs, self.subset_seed)
    }

    /// Merges and scores one candidate on the search pool.
    pub fn score(&mut self, c: &MergeCandidate, docs: Option<usize>) -> Result<Scored> {
        let start = Instant::now();
        let weights = self.merge(c)?;
        let result = self
            .evaluator
            .evaluate_weights(&weights, self.doc_set(docs))
            .with_context(|| format!("evaluating candidate {}", c.key()))?;
        let scores: BTreeMap<String, f64> = result
            .scores()
            .into_iter()
            .map(|(b, v)| (b.task_name().to_string(), v))
            .collect();
        let (objective, objective_stderr) = self.objective.value(&result);
        Ok(Scored {
            objective,
            objective_stderr,
            scores,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// What a search maximises: a weighted mean over benchmarks of either the headline accuracy or
/// its smooth counterpart (the gold answer's probability; GSM8K keeps exact match), in percent.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub weights: BTreeMap<Benchmark, f64>,
    pub metric: ObjectiveMetric,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveMetric {
    /// The leaderboard's headline metric (a step function of the weights on few documents).
    Accuracy,
    /// The mean probability of the gold answer (smooth in the weights).
    Probability,
}

impl Objective {
    /// (value, standard error), percent: Σ wᵦ·sᵦ / Σ wᵦ over the benchmarks evaluated.
    pub fn value(&self, result: &SuiteResult) -> (f64, f64) {
        let (mut sum, mut var, mut total) = (0.0, 0.0, 0.0);
        for (&b, &w) in &self.weights {
            let h = match self.metric {
                ObjectiveMetric::Accuracy => result.headline(b),
                ObjectiveMetric::Probability => result.probability(b),
            };
            if let Some(h) = h {
                sum += w * 100.0 * h.value;
                if h.stderr.is_finite() {
                    var += (w * 100.0 * h.stderr).powi(2);
                }
                total += w;
            }
        }
        if total > 0.0 {
            (sum / total, var.sqrt() / total)
        } else {
            (0.0, f64::NAN)
        }
    }
}
