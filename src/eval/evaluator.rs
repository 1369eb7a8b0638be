//! The one way paft evaluates a model: `paft eval`, the merge search's candidates and the
//! pipeline's comparison rows all go through [`Evaluator`], so every score is computed, aggregated
//! and written the same way.
//!
//! An evaluator holds a base model (its tokenizer and config define the requests) and prepares
//! each [`DocSet`] (pool + selection) once; any model with the same tokenizer and architecture is
//! then scored on identical documents and shots.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde_json::Value;

use super::output::write_results;
use super::suite::{DocSet, EvalConfig, EvalModel, PreparedSuite};
use super::{SuiteResult, TaskStore};
use crate::merge::{load_f32, ModelRef};
use crate::model::{LlamaModel, Mode, Pretrained, WeightMap};

pub struct Evaluator {
    base: Pretrained,
    store: TaskStore,
    config: EvalConfig,
    suites: BTreeMap<DocSet, PreparedSuite>,
}

impl Evaluator {
    /// An evaluator for models shaped like `base` (already loaded).
    pub fn new(base: Pretrained, store: TaskStore, config: EvalConfig) -> Result<Self> {
        config.split.validate()?;
        Ok(Self {
            base,
            store,
            config,
            suites: BTreeMap::new(),
        })
    }

    /// Loads the base (f32, CPU) from a directory, Hub id or GGUF file.
    pub fn open(base: &str, store: TaskStore, config: EvalConfig) -> Result<Self> {
        let base_dir = crate::model::source::resolve_model(base, None)?;
        let base = Pretrained::load(&base_dir, Some(DType::F32), &Device::Cpu)
            .with_context(|| format!("base model {base}"))?;
        Self::new(base, store, config)
    }

    pub fn base(&self) -> &Pretrained {
        &self.base
    }

    pub fn config(&self) -> &EvalConfig {
        &self.config
    }

    /// The prepared documents of `docs` (prepared on first use).
    pub fn suite(&mut self, docs: DocSet) -> Result<&PreparedSuite> {
        if !self.suites.contains_key(&docs) {
            let suite = PreparedSuite::prepare(
                &self.store,
                &self.base.tokenizer,
                self.base.config.max_position_embeddings,
                self.config.clone(),
                docs,
            )
            .with_context(|| format!("preparing tasks from {}", self.store.root().display()))?;
            tracing::debug!(docs = suite.num_docs(), "prepared {:?}", docs);
            self.suites.insert(docs, suite);
        }
        Ok(&self.suites[&docs])
    }

    /// Scores `model` on `docs`, with a progress bar.
    pub fn evaluate(&mut self, model: &LlamaModel, docs: DocSet) -> Result<SuiteResult> {
        let stop_token_ids = self.base.stop_token_ids();
        let pad_id = self.base.pad_token_id();
        self.suite(docs)?;
        let suite = &self.suites[&docs];
        let target = EvalModel {
            model,
            tokenizer: &self.base.tokenizer,
            stop_token_ids,
            pad_id,
        };
        let bar = crate::progress::bar(suite.num_docs() as u64, "documents");
        let result = suite.evaluate(&target, &|| bar.inc(1));
        bar.finish_and_clear();
        result
    }

    /// Scores weights shaped like the base's.
    pub fn evaluate_weights(&mut self, weights: &WeightMap, docs: DocSet) -> Result<SuiteResult> {
        let net = LlamaModel::from_weights(&self.base.config, weights, None, Mode::Inference)?;
        self.evaluate(&net, docs)
    }

    /// Scores a model given as a directory, Hub id or `BASE+ADAPTER_DIR`.
    pub fn evaluate_model(&mut self, r: &ModelRef, docs: DocSet) -> Result<SuiteResult> {
        let weights = load_f32(r, &self.base.config)?;
        self.evaluate_weights(&weights, docs)
            .with_context(|| format!("evaluating {r}"))
    }

    /// Writes `result` (scored on `docs`) as results.json, with every document's samples when
    /// `samples` is set.
    pub fn write(
        &mut self,
        dir: &Path,
        docs: DocSet,
        result: &SuiteResult,
        config: Value,
        samples: bool,
    ) -> Result<()> {
        let suite = self.suite(docs)?;
        write_results(dir, suite, result, config, samples)
    }
}
