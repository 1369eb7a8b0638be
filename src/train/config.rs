//! `paft train` configuration: a flat TOML file (every key documented in
//! `configs/train-sft.toml`), each key also a command-line flag that overrides the file.
//! Unknown keys are errors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::optimizer::Schedule;
use super::precision::MixedPrecision;
use crate::data::Truncation;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    Sft,
    Dpo,
    Orpo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum L1Mode {
    /// λ‖δ‖₁ added to the loss: shrinks δ but leaves few exact zeros.
    #[default]
    Penalty,
    /// Soft-threshold δ by lr·λ after every optimizer step: exact zeros.
    Proximal,
    /// The proximal step in AdamW's own metric: soft-threshold each coordinate of δ by
    /// lr·λ / (√v̂ + ε) after every step. λ is then in gradient units: a coordinate keeps
    /// moving only while its gradient's running magnitude outweighs λ, so the zeros land on
    /// the coordinates the loss cares least about (plain `proximal` compares Adam's
    /// sign-like update, about lr for every coordinate, with lr·λ and zeroes almost
    /// everything or almost nothing).
    ProximalAdam,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Base model: HF directory, .gguf, or Hub id.
    pub model: String,
    /// Training data: JSONL/parquet file, or hub:owner/name/path.jsonl.
    pub dataset: String,
    /// Run directory (weights, checkpoints, metrics.jsonl).
    pub output: PathBuf,
    /// Use only the first N training rows of the dataset (after the held-out tenth is dropped).
    pub limit: Option<usize>,
    /// Drop rows that cannot be trained on (empty answer, nothing left after truncation) with a
    /// warning, instead of stopping the run.
    pub skip_bad_rows: bool,
    pub max_length: usize,
    pub truncation: Truncation,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_steps: u64,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Checkpoint every N optimizer steps (0: only at the end).
    pub save_every: u64,
    pub device: String,
    pub dtype: String,
    /// LoRA rank; 0 trains every weight.
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_targets: Vec<String>,
    /// Start LoRA from this PEFT adapter instead of PEFT's initialisation.
    pub lora_init: Option<PathBuf>,
    /// SFT: L1 strength on the delta (0: off).
    pub l1_lambda: f64,
    pub l1_mode: L1Mode,
    /// SFT with a proximal L1: the last N steps refit the weights the L1 left non-zero, without
    /// L1 (zeros stay exactly zero), which removes the shrinkage the L1 put on the survivors.
    pub l1_refit_steps: u64,
    /// Constant learning rate of the refit steps (default: the schedule goes on). Fewer weights
    /// move, so each has to move further than in a dense run.
    pub l1_refit_lr: Option<f64>,
    /// DPO β / ORPO λ.
    pub beta: f64,
    pub label_smoothing: f64,
    /// DPO without a reference model.
    pub reference_free: bool,
    /// DPO reference model (default: the base model).
    pub reference_model: Option<String>,
    /// Keep only each decoder layer's input during the forward pass and run the layer again
    /// in the backward pass: activation memory per sequence falls from every layer's
    /// intermediates to one layer's, for about one more forward per step.
    pub gradient_checkpointing: bool,
    /// `bf16` or `fp16`: forward and backward passes in that dtype, the trained parameters and
    /// the optimizer's state in `dtype` (which must then be f32); `fp16` adds dynamic loss
    /// scaling. `no`: everything in `dtype`.
    pub mixed_precision: MixedPrecision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            dataset: String::new(),
            output: PathBuf::new(),
            limit: None,
            skip_bad_rows: false,
            max_length: 1024,
            truncation: Truncation::Error,
            batch_size: 4,
            grad_accum: 1,
            max_steps: 100,
            lr: 2e-4,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 0,
            save_every: 0,
            device: "cpu".into(),
            dtype: "f32".into(),
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_targets: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
            lora_init: None,
            l1_lambda: 0.0,
            l1_mode: L1Mode::Penalty,
            l1_refit_steps: 0,
            l1_refit_lr: None,
            beta: 0.1,
            label_smoothing: 0.0,
            reference_free: false,
            reference_model: None,
            gradient_checkpointing: false,
            mixed_precision: MixedPrecision::No,
        }
    }
}

impl TrainConfig {
    /// The file's keys, then `overrides` (a JSON object of flag values) on top.
    pub fn load(file: Option<&Path>, overrides: serde_json::Value) -> Result<Self> {
        let mut value = match file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                let table: toml::Table = toml::from_str(&text)
                    .with_context(|| format!("{}: invalid TOML", f.display()))?;
                serde_json::to_value(table)?
            }
            None => serde_json::json!({}),
        };
        if let (Some(obj), Some(over)) = (value.as_object_mut(), overrides.as_object()) {
            for (k, v) in over {
                if !v.is_null() {
                    obj.insert(k.clone(), v.clone());
                }
            }
        }
        let origin = file.map_or("command line".to_string(), |f| f.display().to_string());
        let cfg: TrainConfig = serde_json::from_value(value)
            .with_context(|| format!("{origin}: invalid training config"))?;
        cfg.validate()
            .with_context(|| format!("{origin}: invalid training config"))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.model.is_empty() {
            bail!("`model` is required");
        }
        if self.dataset.is_empty() {
            bail!("`dataset` is required");
        }
        if self.output.as_os_str().is_empty() {
            bail!("`output` is required");
        }
        if self.batch_size == 0 || self.grad_accum == 0 || self.max_steps == 0 {
            bail!("batch_size, grad_accum and max_steps must be at least 1");
        }
        for (name, v) in [
            ("lr", self.lr),
            ("beta", self.beta),
            ("l1_lambda", self.l1_lambda),
            ("l1_refit_lr", self.l1_refit_lr.unwrap_or(0.0)),
        ] {
            if !v.is_finite() || v < 0.0 {
                bail!("`{name}` must be a finite non-negative number, got {v}");
            }
        }
        if self.l1_refit_lr.is_some() && self.l1_refit_steps == 0 {
            bail!("`l1_refit_lr` is set but `l1_refit_steps` is 0: there are no refit steps");
        }
        if self.l1_refit_steps > 0 {
            if self.l1_mode == L1Mode::Penalty || self.l1_lambda == 0.0 {
                bail!(
                    "`l1_refit_steps` needs a proximal L1 (`l1_mode` proximal or proximal_adam, \
                     `l1_lambda` > 0): the penalty leaves no exact zeros to keep"
                );
            }
            if self.l1_refit_steps >= self.max_steps {
                bail!(
                    "`l1_refit_steps` ({}) must be below `max_steps` ({}): the L1 steps come first",
                    self.l1_refit_steps,
                    self.max_steps
                );
            }
        }
        if self.mixed_precision != MixedPrecision::No
            && crate::model::parse_dtype(&self.dtype)? != candle_core::DType::F32
        {
            bail!(
                "`mixed_precision` keeps the trained parameters and optimizer state in `dtype`, \
                 which must then be f32 (got `{}`)",
                self.dtype
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("`lora_dropout` must be in [0, 1)");
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!("`label_smoothing` must be in [0, 0.5)");
        }
        Ok(())
    }
}
