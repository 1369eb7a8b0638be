//! Scores merge candidates: the base and the two fine-tunes are held in memory once, each
//! candidate is merged on all cores and evaluated on a frozen subset (the same documents and
//! shots for every candidate), with no disk round trip.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::space::{MergeCandidate, MODELS};
use crate::eval::{
    parse_task_list, Benchmark, EvalConfig, EvalModel, PreparedSuite, Selection, SuiteResult,
    TaskStore,
};
use crate::merge::engine::MergeInput;
use crate::merge::{InMemoryMerger, MergeConfig, ModelRef};
use crate::model::{LlamaModel, Mode, ModelConfig, Pretrained, WeightMap};

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

/// A candidate's scores on one subset.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Headline metric per benchmark, percent, keyed by task name.
    pub scores: BTreeMap<String, f64>,
    pub objective: f64,
    pub seconds: f64,
}

/// Evaluates models that share the base's architecture and tokenizer on frozen subsets of one
/// task list: the same documents and shots for every model, each subset prepared once.
pub struct SubsetEvaluator {
    base: Pretrained,
    tasks: String,
    store: TaskStore,
    subset_seed: u64,
    /// Prepared suites by documents per task (`None` = full task sets), built on first use.
    suites: BTreeMap<Option<usize>, PreparedSuite>,
}

impl SubsetEvaluator {
    /// Loads the base model (f32, CPU) from a directory, Hub id or GGUF file.
    pub fn new(base: &str, store: TaskStore, tasks: &str, subset_seed: u64) -> Result<Self> {
        parse_task_list(tasks)?;
        let base_dir = crate::model::source::resolve_model(base, None)?;
        let base = Pretrained::load(&base_dir, Some(DType::F32), &Device::Cpu)
            .with_context(|| format!("base model {base}"))?;
        Ok(Self {
            base,
            tasks: tasks.to_string(),
            store,
            subset_seed,
            suites: BTreeMap::new(),
        })
    }

    pub fn base(&self) -> &Pretrained {
        &self.base
    }

    fn suite(&mut self, docs: Option<usize>) -> Result<&PreparedSuite> {
        if !self.suites.contains_key(&docs) {
            let mut config = EvalConfig::new(parse_task_list(&self.tasks)?);
            config.selection = match docs {
                Some(n) => Selection::Sample {
                    n,
                    seed: self.subset_seed,
                },
                None => Selection::All,
            };
            let suite = PreparedSuite::prepare(
                &self.store,
                &self.base.tokenizer,
                self.base.config.max_position_embeddings,
                config,
            )
            .with_context(|| format!("preparing tasks from {}", self.store.root().display()))?;
            self.suites.insert(docs, suite);
        }
        Ok(&self.suites[&docs])
    }

    /// Evaluates any weights on a subset (`docs` per task; `None` = full sets).
    pub fn evaluate_weights(
        &mut self,
        weights: &WeightMap,
        docs: Option<usize>,
    ) -> Result<SuiteResult> {
        let net = LlamaModel::from_weights(&self.base.config, weights, None, Mode::Inference)?;
        self.suite(docs)?;
        let suite = &self.suites[&docs];
        let bar = crate::progress::bar(suite.num_docs() as u64, "documents");
        let target = EvalModel {
            model: &net,
            tokenizer: &self.base.tokenizer,
            stop_token_ids: self.base.stop_token_ids(),
            pad_id: self.base.pad_token_id(),
        };
        let result = suite.evaluate(&target, &|| bar.inc(1));
        bar.finish_and_clear();
        result
    }

    /// Evaluates a model given as a directory, Hub id or `BASE+ADAPTER_DIR`.
    pub fn evaluate_model(&mut self, r: &ModelRef, docs: Option<usize>) -> Result<SuiteResult> {
        let weights = load_f32(r, &self.base.config)?;
        self.evaluate_weights(&weights, docs)
            .with_context(|| format!("evaluating {r}"))
    }
}

/// Merges candidates in memory and scores them with a [`SubsetEvaluator`].
pub struct CandidateScorer {
    inputs: MergeInputs,
    evaluator: SubsetEvaluator,
    merger: InMemoryMerger,
    objective: BTreeMap<Benchmark, f64>,
    device: Device,
    seed: u64,
}

/// The tensors `config` expects, read from `r` as f32 on the CPU (a LoRA adapter reference is
/// merged on the fly).
pub fn load_f32(r: &ModelRef, config: &ModelConfig) -> Result<WeightMap> {
    let input = MergeInput::open(r)?;
    config
        .expected_tensors()
        .into_iter()
        .map(|(n, _)| {
            let shape = input.files().checkpoint.shape(&n)?;
            let values = input.tensor(&n).with_context(|| format!("model {r}"))?;
            Ok((n, Tensor::from_vec(values, shape, &Device::Cpu)?))
        })
        .collect()
}

impl CandidateScorer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inputs: MergeInputs,
        store: TaskStore,
        tasks: &str,
        subset_seed: u64,
        objective: BTreeMap<Benchmark, f64>,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        let evaluator = SubsetEvaluator::new(&inputs.base, store, tasks, subset_seed)?;
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
            device,
            seed,
        })
    }

    pub fn base(&self) -> &Pretrained {
        self.evaluator.base()
    }

    pub fn inputs(&self) -> &MergeInputs {
        &self.inputs
    }

    /// The candidate's merged weights (f32, on the scoring device).
    pub fn merge(&self, c: &MergeCandidate) -> Result<WeightMap> {
        let yaml = c.mergekit_yaml(&self.inputs.base, self.inputs.models());
        let config =
            MergeConfig::from_yaml(&yaml).with_context(|| format!("candidate {}", c.key()))?;
        self.merger
            .merge(&config, self.seed, DType::F32, &self.device)
    }

    /// Merges and scores one candidate.
    pub fn score(&mut self, c: &MergeCandidate, docs: Option<usize>) -> Result<Scored> {
        let start = Instant::now();
        let weights = self.merge(c)?;
        let result = self
            .evaluator
            .evaluate_weights(&weights, docs)
            .with_context(|| format!("evaluating candidate {}", c.key()))?;
        let scores: BTreeMap<String, f64> = result
            .scores()
            .into_iter()
            .map(|(b, v)| (b.task_name().to_string(), v))
            .collect();
        Ok(Scored {
            objective: objective(&self.objective, &result.scores()),
            scores,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Weighted mean of the headline scores present (percent).
pub fn objective(weights: &BTreeMap<Benchmark, f64>, scores: &BTreeMap<Benchmark, f64>) -> f64 {
    let (sum, w) = weights
        .iter()
        .filter_map(|(b, w)| scores.get(b).map(|s| (s * w, *w)))
        .fold((0.0, 0.0), |(a, b), (s, w)| (a + s, b + w));
    if w > 0.0 {
        sum / w
    } else {
        0.0
    }
}
