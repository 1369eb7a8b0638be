//! Scores merge candidates: the base and the two fine-tunes are held in memory once, each
//! candidate is merged on all cores and evaluated on a frozen subset (the same documents and
//! shots for every candidate), with no disk round trip.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use super::space::{MergeCandidate, MODELS};
use crate::eval::alignment_tax::{AlignmentTaxSets, AlignmentTaxSpec, TaxEstimates, TaxMetric};
use crate::eval::pools::Pool;
use crate::eval::suite::DocSet;
use crate::eval::{Benchmark, EvalConfig, Evaluator, SuiteResult, TaskStore};
use crate::merge::{load_f32, InMemoryMerger, ModelRef};
use crate::model::{LlamaModel, Mode, Pretrained, WeightMap};

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

/// A candidate's scores on one subset of the search pool (also what a Slurm candidate job
/// writes).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Scored {
    /// Headline metric per benchmark, percent, keyed by task name.
    pub scores: BTreeMap<String, f64>,
    #[serde(with = "nan_as_null")]
    pub objective: f64,
    /// Standard error of the objective (from the per-benchmark standard errors).
    #[serde(with = "nan_as_null")]
    pub objective_stderr: f64,
    /// Alignment-tax numbers on the search pool's held-out rows, by name (`sft_loss`,
    /// `pref_accuracy`, `reward_margin`); empty when the objective has no tax term.
    pub tax: BTreeMap<String, f64>,
    pub seconds: f64,
}

/// JSON has no NaN: a value that is not finite is written as `null` and read back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Merges candidates in memory and scores them with an [`Evaluator`] on the search pool.
pub struct CandidateScorer {
    inputs: MergeInputs,
    evaluator: Evaluator,
    merger: InMemoryMerger,
    objective: Objective,
    /// The held-out rows of the search pool, when the objective has alignment-tax terms.
    tax_sets: Option<AlignmentTaxSets>,
    subset_seed: u64,
    device: Device,
    /// The dtype candidates are evaluated in.
    dtype: DType,
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
        tax_spec: Option<&AlignmentTaxSpec>,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        let split = eval.split;
        let evaluator = Evaluator::open(&inputs.base, store, eval)?;
        let base = evaluator.base();
        let tax_sets = match (objective.tax.keys().next(), tax_spec) {
            (None, _) => None,
            (Some(term), None) => bail!(
                "objective term `{}` needs held-out training rows: add an [alignment_tax] table \
                 (sft_dataset, pref_dataset, sft_rows, pref_rows, max_length, truncation) to the \
                 search space, or to the experiment for `paft run`",
                term.name()
            ),
            (Some(_), Some(spec)) => Some(
                AlignmentTaxSets::prepare(base, spec, Pool::Search, &split)
                    .context("[alignment_tax] of the search objective")?,
            ),
        };
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
            tax_sets,
            subset_seed,
            device,
            dtype: DType::F32,
            seed,
        })
    }

    /// Evaluates candidates in `dtype` (default f32): merged in f32, then cast.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn base(&self) -> &Pretrained {
        self.evaluator.base()
    }

    pub fn evaluator_mut(&mut self) -> &mut Evaluator {
        &mut self.evaluator
    }

    /// The held-out rows the objective's alignment-tax terms are measured on (SFT row ids, pair
    /// ids), when it has such terms.
    pub fn tax_row_ids(&self) -> Option<(Vec<&str>, Vec<&str>)> {
        self.tax_sets.as_ref().map(AlignmentTaxSets::row_ids)
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
        let config = c.merge_config(&self.inputs.base, self.inputs.models())?;
        // Into the previous candidate's buffers (its model is gone by now); `net` is dropped
        // before the next call.
        let weights = if self.device.is_cpu() && self.dtype == DType::F32 {
            self.merger.merge_reusing(&config, self.seed)?
        } else {
            self.merger
                .merge(&config, self.seed, self.dtype, &self.device)?
        };
        let net = LlamaModel::from_weights(&self.base().config, &weights, None, Mode::Inference)?;
        drop(weights);
        let docs = self.doc_set(docs);
        let result = self
            .evaluator
            .evaluate(&net, docs)
            .with_context(|| format!("evaluating candidate {}", c.key()))?;
        let scores = result.named_scores();
        let tax = match &self.tax_sets {
            Some(sets) => Some(
                sets.measure(&net)
                    .with_context(|| format!("alignment tax of candidate {}", c.key()))?
                    .estimates(),
            ),
            None => None,
        };
        let (objective, objective_stderr) = self.objective.value(&result, tax.as_ref());
        let tax = tax.map_or_else(BTreeMap::new, |t| {
            TaxMetric::ALL
                .into_iter()
                .filter_map(|m| Some((m.name().to_string(), t.get(m)?.value)))
                .collect()
        });
        Ok(Scored {
            objective,
            objective_stderr,
            scores,
            tax,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// What a search maximises, in percent: a weighted mean over benchmarks of either the headline
/// accuracy or its smooth counterpart (the gold answer's probability; GSM8K keeps exact match
/// unless it is scored by the gold solution's likelihood, which is smooth already),
/// plus weighted alignment-tax terms measured on the search pool's held-out training rows:
///
/// objective = Σ_b w_b·s_b / Σ_b w_b + Σ_t w_t·±v_t
///
/// where v_t is the term's value in its own unit (SFT loss in nats per token, entering with a
/// minus sign because lower is better; preference accuracy in percent; reward margin in reward
/// units), so a weight converts it into leaderboard points.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub weights: BTreeMap<Benchmark, f64>,
    pub metric: ObjectiveMetric,
    /// Weight per alignment-tax term (empty: the leaderboard alone).
    pub tax: BTreeMap<TaxMetric, f64>,
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
    /// (value, standard error): the benchmarks evaluated and, when measured, the tax terms. A
    /// tax term without its measurement is an error upstream ([`CandidateScorer::new`] refuses
    /// such an objective), so here it is simply absent.
    pub fn value(&self, result: &SuiteResult, tax: Option<&TaxEstimates>) -> (f64, f64) {
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
        let (mut value, mut var) = if total > 0.0 {
            (sum / total, var / (total * total))
        } else if self.tax.is_empty() {
            return (0.0, f64::NAN);
        } else {
            (0.0, 0.0)
        };
        for (&m, &w) in &self.tax {
            if let Some(e) = tax.and_then(|t| t.get(m)) {
                let sign = if m.higher_is_better() { 1.0 } else { -1.0 };
                value += sign * w * e.value;
                if e.stderr.is_finite() {
                    var += (w * e.stderr).powi(2);
                }
            }
        }
        (value, var.sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Estimate;

    fn objective(tax: &[(TaxMetric, f64)]) -> Objective {
        Objective {
            weights: BTreeMap::new(),
            metric: ObjectiveMetric::Accuracy,
            tax: tax.iter().copied().collect(),
        }
    }

    #[test]
    fn tax_terms_add_with_their_sign_and_stderr() {
        let t = TaxEstimates {
            sft_loss: Some(Estimate {
                value: 2.0,
                stderr: 0.1,
            }),
            pref_accuracy: Some(Estimate {
                value: 60.0,
                stderr: 5.0,
            }),
            reward_margin: None,
        };
        let empty = SuiteResult::new(vec![], 0.0);
        // Lower loss is better: it enters with a minus sign.
        let (v, se) = objective(&[(TaxMetric::SftLoss, 10.0)]).value(&empty, Some(&t));
        assert_eq!(v, -20.0);
        assert!((se - 1.0).abs() < 1e-12, "{se}");
        let (v, se) = objective(&[(TaxMetric::SftLoss, 10.0), (TaxMetric::PrefAccuracy, 0.5)])
            .value(&empty, Some(&t));
        assert_eq!(v, -20.0 + 30.0);
        assert!((se - (1.0f64 + 6.25).sqrt()).abs() < 1e-12, "{se}");
        // No benchmarks, no terms: nothing to rank by.
        let (v, se) = objective(&[]).value(&empty, None);
        assert_eq!(v, 0.0);
        assert!(se.is_nan());
    }
}
