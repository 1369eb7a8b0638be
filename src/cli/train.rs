//! `paft train sft|dpo|orpo`: a TOML config whose every key is also a flag.

use std::path::PathBuf;

use anyhow::Result;

use crate::train::{Objective, TrainConfig, Trainer};

/// Overrides of the config file's keys (values parsed as TOML: numbers, booleans, arrays, strings).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct TrainFlags {
    /// Base model: HF directory, .gguf, or Hub id.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data: JSONL/parquet file, or hub:owner/name/path.jsonl.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Run directory (weights, checkpoints, metrics.jsonl).
    #[arg(long)]
    pub output: Option<String>,
    /// Use only the first N rows of the dataset.
    #[arg(long)]
    pub limit: Option<String>,
    /// Drop untrainable rows with a warning instead of stopping.
    #[arg(long)]
    pub skip_bad_rows: Option<String>,
    #[arg(long)]
    pub max_length: Option<String>,
    #[arg(long)]
    pub truncation: Option<String>,
    #[arg(long)]
    pub batch_size: Option<String>,
    #[arg(long)]
    pub grad_accum: Option<String>,
    #[arg(long)]
    pub max_steps: Option<String>,
    #[arg(long)]
    pub lr: Option<String>,
    #[arg(long)]
    pub schedule: Option<String>,
    #[arg(long)]
    pub warmup_steps: Option<String>,
    #[arg(long)]
    pub weight_decay: Option<String>,
    #[arg(long)]
    pub beta1: Option<String>,
    #[arg(long)]
    pub beta2: Option<String>,
    #[arg(long)]
    pub eps: Option<String>,
    /// 0 disables clipping.
    #[arg(long)]
    pub max_grad_norm: Option<String>,
    #[arg(long)]
    pub seed: Option<String>,
    /// Checkpoint every N optimizer steps (0: only at the end).
    #[arg(long)]
    pub save_every: Option<String>,
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long)]
    pub dtype: Option<String>,
    /// LoRA rank; 0 trains every weight.
    #[arg(long)]
    pub lora_r: Option<String>,
    #[arg(long)]
    pub lora_alpha: Option<String>,
    #[arg(long)]
    pub lora_dropout: Option<String>,
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// Start LoRA from this PEFT adapter instead of PEFT's initialisation.
    #[arg(long)]
    pub lora_init: Option<String>,
    /// SFT: L1 strength on the delta (0: off).
    #[arg(long)]
    pub l1_lambda: Option<String>,
    /// SFT: how L1 applies: penalty | proximal | proximal_adam.
    #[arg(long)]
    pub l1_mode: Option<String>,
    /// SFT: refit the non-zero weights without L1 in the last N steps (proximal modes).
    #[arg(long)]
    pub l1_refit_steps: Option<String>,
    /// SFT: constant learning rate of the refit steps (default: the schedule goes on).
    #[arg(long)]
    pub l1_refit_lr: Option<String>,
    /// DPO β / ORPO λ.
    #[arg(long)]
    pub beta: Option<String>,
    #[arg(long)]
    pub label_smoothing: Option<String>,
    /// DPO without a reference model.
    #[arg(long)]
    pub reference_free: Option<String>,
    /// DPO reference model (default: the base model).
    #[arg(long)]
    pub reference_model: Option<String>,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    #[arg(long)]
    pub gradient_checkpointing: Option<String>,
    /// no | bf16 | fp16: passes in that dtype, trained parameters and optimizer state in f32.
    #[arg(long)]
    pub mixed_precision: Option<String>,
}

impl TrainFlags {
    /// The given flags as a JSON object of config keys.
    pub fn overrides(&self) -> Result<serde_json::Value> {
        let mut out = serde_json::Map::new();
        let pairs: Vec<(&str, &Option<String>)> = vec![
            ("model", &self.model),
            ("dataset", &self.dataset),
            ("output", &self.output),
            ("limit", &self.limit),
            ("skip_bad_rows", &self.skip_bad_rows),
            ("max_length", &self.max_length),
            ("truncation", &self.truncation),
            ("batch_size", &self.batch_size),
            ("grad_accum", &self.grad_accum),
            ("max_steps", &self.max_steps),
            ("lr", &self.lr),
            ("schedule", &self.schedule),
            ("warmup_steps", &self.warmup_steps),
            ("weight_decay", &self.weight_decay),
            ("beta1", &self.beta1),
            ("beta2", &self.beta2),
            ("eps", &self.eps),
            ("max_grad_norm", &self.max_grad_norm),
            ("seed", &self.seed),
            ("save_every", &self.save_every),
            ("device", &self.device),
            ("dtype", &self.dtype),
            ("lora_r", &self.lora_r),
            ("lora_alpha", &self.lora_alpha),
            ("lora_dropout", &self.lora_dropout),
            ("lora_targets", &self.lora_targets),
            ("lora_init", &self.lora_init),
            ("l1_lambda", &self.l1_lambda),
            ("l1_mode", &self.l1_mode),
            ("l1_refit_steps", &self.l1_refit_steps),
            ("l1_refit_lr", &self.l1_refit_lr),
            ("beta", &self.beta),
            ("label_smoothing", &self.label_smoothing),
            ("reference_free", &self.reference_free),
            ("reference_model", &self.reference_model),
            ("gradient_checkpointing", &self.gradient_checkpointing),
            ("mixed_precision", &self.mixed_precision),
        ];
        for (key, value) in pairs {
            if let Some(v) = value {
                out.insert(key.to_string(), parse_flag_value(v));
            }
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// A flag value as TOML would read it (`1e-4`, `true`, `["q_proj"]`), else as a string.
fn parse_flag_value(v: &str) -> serde_json::Value {
    match toml::from_str::<toml::Table>(&format!("x = {v}")) {
        Ok(mut t) => {
            serde_json::to_value(t.remove("x")).unwrap_or(serde_json::Value::String(v.into()))
        }
        Err(_) => serde_json::Value::String(v.into()),
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[arg(value_enum)]
    pub objective: Objective,
    /// TOML file with the run's settings (see configs/train-sft.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue from the run's last checkpoint.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub flags: TrainFlags,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let cfg = TrainConfig::load(args.config.as_deref(), args.flags.overrides()?)?;
    let mut trainer = Trainer::new(cfg, args.objective)?;
    tracing::info!(
        "{:?} on {} examples, {} trainable parameters",
        args.objective,
        trainer.data.len(),
        trainer.params.num_parameters()
    );
    let out = trainer.train(args.resume)?;
    println!("{}", out.display());
    Ok(())
}
