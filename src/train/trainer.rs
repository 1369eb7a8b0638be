//! The training loop: batches → objective → backward → clip → AdamW → (proximal L1), with
//! atomic checkpoints (weights, optimizer state, data position) that `--resume` continues from
//! exactly, metrics as JSONL and a progress bar.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde_json::json;

use super::config::{L1Mode, Objective, TrainConfig};
use super::objective::{dpo_loss, orpo_loss, pair_logps, sft_loss, DpoParams};
use super::optimizer::{clip_grads, collect_grads, grad_norm, learning_rate, AdamW, AdamWParams};
use super::params::Trainable;
use super::precision::{LossScaler, ScaledStep};
use crate::data::examples::{parse_preference, parse_sft, resolve_dataset};
use crate::data::{
    length_grouped_batches, training_rows, PreferencePair, Tokenization, TokenizedSequence,
};
use crate::io::write_file_atomic;
use crate::model::weights::{write_safetensors, write_weights, AtomicDir, DEFAULT_SHARD_BYTES};
use crate::model::{
    self, pretrained::copy_tokenizer_files, LoraAdapter, LoraConfig, Mode, Pretrained, TargetModule,
};

/// Tokenized training data of one objective.
pub enum Dataset {
    Sft(Vec<TokenizedSequence>),
    Preference(Vec<PreferencePair>),
}

impl Dataset {
    pub fn len(&self) -> usize {
        match self {
            Dataset::Sft(v) => v.len(),
            Dataset::Preference(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lengths(&self) -> Vec<usize> {
        match self {
            Dataset::Sft(v) => v.iter().map(|s| s.len()).collect(),
            Dataset::Preference(v) => v
                .iter()
                .map(|p| p.chosen.len().max(p.rejected.len()))
                .collect(),
        }
    }
}

pub fn load_dataset(cfg: &TrainConfig, objective: Objective, pre: &Pretrained) -> Result<Dataset> {
    let path = resolve_dataset(&cfg.dataset)?;
    // Held-out rows are gone before anything else looks at the data (`limit` included), so no
    // setting can put them into training.
    let mut rows = training_rows(&path)?;
    if let Some(n) = cfg.limit {
        rows.truncate(n);
    }
    let tok = Tokenization {
        tokenizer: &pre.tokenizer,
        max_length: cfg.max_length,
        truncation: cfg.truncation,
    };
    let what = |n: usize| format!("{}: row {n}", path.display());
    // A row that cannot be trained on stops the run, or is dropped with a warning when the
    // config says `skip_bad_rows` (real preference sets have a few empty answers).
    fn keep<T>(r: Result<T>, skip: bool, skipped: &mut usize) -> Result<Option<T>> {
        match r {
            Err(e) if skip => {
                tracing::warn!("skipped: {e:#}");
                *skipped += 1;
                Ok(None)
            }
            other => other.map(Some),
        }
    }
    let mut skipped = 0;
    let data = match objective {
        Objective::Sft => {
            let ex = parse_sft(&path, &rows)?;
            let mut out = vec![];
            for (e, (n, _)) in ex.iter().zip(&rows) {
                out.extend(keep(
                    tok.sft(e, &what(*n)),
                    cfg.skip_bad_rows,
                    &mut skipped,
                )?);
            }
            Dataset::Sft(out)
        }
        Objective::Dpo | Objective::Orpo => {
            let ex = parse_preference(&path, &rows)?;
            let mut out = vec![];
            for (e, (n, _)) in ex.iter().zip(&rows) {
                out.extend(keep(
                    tok.preference(e, &what(*n)),
                    cfg.skip_bad_rows,
                    &mut skipped,
                )?);
            }
            Dataset::Preference(out)
        }
    };
    if skipped > 0 {
        tracing::warn!(
            "{}: {skipped} row(s) skipped (skip_bad_rows)",
            path.display()
        );
    }
    if data.is_empty() {
        bail!("{}: no usable rows", path.display());
    }
    Ok(data)
}

/// Where a run stands; saved with every checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RunState {
    step: u64,
    objective: Objective,
    config: TrainConfig,
    /// AdamW steps taken: fewer than `step` when fp16 loss scaling skipped some (absent in
    /// checkpoints from before loss scaling: equal to `step`).
    #[serde(default)]
    optimizer_step: Option<u64>,
    #[serde(default)]
    loss_scaler: Option<LossScaler>,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    pub objective: Objective,
    pub pre: Pretrained,
    pub params: Trainable,
    pub data: Dataset,
    /// DPO: the reference model's summed log-probs per example (chosen, rejected).
    reference: Option<Vec<(f64, f64)>>,
    optimizer: AdamW,
    /// fp16 mixed precision's dynamic loss scale.
    scaler: Option<LossScaler>,
    pad_id: u32,
}

fn lora_config(cfg: &TrainConfig) -> Result<LoraConfig> {
    Ok(LoraConfig {
        r: cfg.lora_r,
        alpha: cfg.lora_alpha,
        dropout: cfg.lora_dropout,
        target_modules: cfg
            .lora_targets
            .iter()
            .map(|t| TargetModule::parse(t))
            .collect::<Result<_>>()?,
        use_rslora: false,
    })
}

impl Trainer {
    pub fn new(cfg: TrainConfig, objective: Objective) -> Result<Self> {
        let device = model::parse_device(&cfg.device)?;
        // The trained parameters and the optimizer's state are in `dtype`; the passes in the
        // mixed-precision dtype when there is one. LoRA's frozen base is only ever computed
        // with, so it is held in the compute dtype (half the memory under bf16).
        let dtype = model::parse_dtype(&cfg.dtype)?;
        let compute = cfg.mixed_precision.compute_dtype().unwrap_or(dtype);
        let frozen = if cfg.lora_r == 0 { dtype } else { compute };
        let dir = model::source::resolve_model(&cfg.model, None)?;
        let pre = Pretrained::load(&dir, Some(frozen), &device)?;
        let data = load_dataset(&cfg, objective, &pre)?;
        let params = if cfg.lora_r == 0 {
            Trainable::full(&pre.config, &pre.weights, compute)?
        } else {
            let init = cfg
                .lora_init
                .as_ref()
                .map(|p| LoraAdapter::load(p, dtype, &device))
                .transpose()?;
            Trainable::lora(
                &pre.config,
                &pre.weights,
                &lora_config(&cfg)?,
                init.as_ref(),
                cfg.seed,
                dtype,
            )?
        };
        let optimizer = AdamW::new(
            &params.vars,
            AdamWParams {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            },
        )?;
        let pad_id = pre.pad_token_id();
        let mut t = Self {
            cfg,
            objective,
            pre,
            params,
            data,
            reference: None,
            optimizer,
            scaler: None,
            pad_id,
        };
        if t.cfg.mixed_precision.scales_loss() {
            t.scaler = Some(LossScaler::default());
        }
        if objective == Objective::Dpo && !t.cfg.reference_free {
            t.reference = Some(t.reference_logps()?);
        }
        Ok(t)
    }

    /// Reference log-probs of every pair, computed once with the frozen reference model.
    fn reference_logps(&self) -> Result<Vec<(f64, f64)>> {
        let Dataset::Preference(pairs) = &self.data else {
            bail!("DPO needs preference data")
        };
        let owned;
        let reference = match &self.cfg.reference_model {
            Some(spec) => {
                let dir = model::source::resolve_model(spec, None)?;
                owned = Pretrained::load(
                    &dir,
                    Some(self.params.compute),
                    self.pre.weights.values().next().unwrap().device(),
                )?;
                &owned
            }
            None => &self.pre,
        };
        // The policy's code path and compute dtype, so an unchanged policy has exactly zero
        // rewards, as in TRL.
        let weights = reference
            .weights
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.to_dtype(self.params.compute)?)))
            .collect::<Result<model::WeightMap>>()?;
        let net = model::LlamaModel::from_weights(
            &reference.config,
            &weights,
            None,
            Mode::Differentiable,
        )
        .with_context(|| format!("reference model {}", reference.dir.display()))?;
        let bar = crate::progress::bar(pairs.len() as u64, "reference");
        let mut out = vec![];
        for chunk in pairs.chunks(self.cfg.batch_size) {
            let c: Vec<&TokenizedSequence> = chunk.iter().map(|p| &p.chosen).collect();
            let r: Vec<&TokenizedSequence> = chunk.iter().map(|p| &p.rejected).collect();
            let (lc, lr) = pair_logps(&net, &c, &r, self.pad_id)?;
            let lc: Vec<f64> = lc.to_dtype(DType::F64)?.to_vec1()?;
            let lr: Vec<f64> = lr.to_dtype(DType::F64)?.to_vec1()?;
            out.extend(lc.into_iter().zip(lr));
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(out)
    }

    /// Loss of one micro-batch (example indices) and its metrics.
    pub fn loss(
        &self,
        model: &model::LlamaModel,
        idx: &[usize],
    ) -> Result<(Tensor, BTreeMap<&'static str, f64>, usize)> {
        let mut metrics = BTreeMap::new();
        match (&self.data, self.objective) {
            (Dataset::Sft(seqs), _) => {
                let batch: Vec<&TokenizedSequence> = idx.iter().map(|&i| &seqs[i]).collect();
                let (loss, n) = sft_loss(model, &batch, self.pad_id)?;
                Ok((loss, metrics, n))
            }
            (Dataset::Preference(pairs), Objective::Dpo) => {
                let c: Vec<&TokenizedSequence> = idx.iter().map(|&i| &pairs[i].chosen).collect();
                let r: Vec<&TokenizedSequence> = idx.iter().map(|&i| &pairs[i].rejected).collect();
                let (pc, pr) = pair_logps(model, &c, &r, self.pad_id)?;
                let refs = match &self.reference {
                    Some(all) => {
                        let dev = pc.device();
                        let rc: Vec<f64> = idx.iter().map(|&i| all[i].0).collect();
                        let rr: Vec<f64> = idx.iter().map(|&i| all[i].1).collect();
                        Some((
                            Tensor::new(rc, dev)?.to_dtype(pc.dtype())?,
                            Tensor::new(rr, dev)?.to_dtype(pc.dtype())?,
                        ))
                    }
                    None => None,
                };
                let out = dpo_loss(
                    (&pc, &pr),
                    refs.as_ref().map(|(a, b)| (a, b)),
                    DpoParams {
                        beta: self.cfg.beta,
                        label_smoothing: self.cfg.label_smoothing,
                    },
                )?;
                let n = out.chosen_rewards.len() as f64;
                metrics.insert("rewards/chosen", out.chosen_rewards.iter().sum::<f64>() / n);
                metrics.insert(
                    "rewards/rejected",
                    out.rejected_rewards.iter().sum::<f64>() / n,
                );
                metrics.insert("rewards/accuracy", out.reward_accuracy());
                metrics.insert("rewards/margin", out.reward_margin());
                Ok((
                    out.loss,
                    metrics,
                    c.iter().chain(&r).map(|s| s.num_targets()).sum(),
                ))
            }
            (Dataset::Preference(pairs), _) => {
                let c: Vec<&TokenizedSequence> = idx.iter().map(|&i| &pairs[i].chosen).collect();
                let r: Vec<&TokenizedSequence> = idx.iter().map(|&i| &pairs[i].rejected).collect();
                let out = orpo_loss(model, &c, &r, self.pad_id, self.cfg.beta)?;
                metrics.insert("nll", out.nll);
                metrics.insert(
                    "log_odds",
                    out.log_odds.iter().sum::<f64>() / out.log_odds.len() as f64,
                );
                Ok((
                    out.loss,
                    metrics,
                    c.iter().chain(&r).map(|s| s.num_targets()).sum(),
                ))
            }
        }
    }

    /// L1 penalty λ·Σ|θ − anchor| over the trainable parameters (penalty mode).
    fn l1_penalty(&self) -> Result<Option<Tensor>> {
        if self.cfg.l1_lambda == 0.0
            || self.cfg.l1_mode != L1Mode::Penalty
            || self.objective != Objective::Sft
        {
            return Ok(None);
        }
        let mut total: Option<Tensor> = None;
        for (i, v) in self.params.vars.iter().enumerate() {
            let term = (v.as_tensor() - self.params.anchor(i)?)?.abs()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        Ok(total.map(|t| t * self.cfg.l1_lambda).transpose()?)
    }

    /// Proximal L1: δ ← sign(δ)·max(|δ| − τ, 0), which leaves exact zeros; τ = lr·λ
    /// (`proximal`) or lr·λ / (√v̂ + ε) per coordinate (`proximal_adam`).
    fn l1_proximal(&self, lr: f64) -> Result<()> {
        let adam_metric = match self.cfg.l1_mode {
            L1Mode::Proximal => false,
            L1Mode::ProximalAdam => true,
            L1Mode::Penalty => return Ok(()),
        };
        if self.cfg.l1_lambda == 0.0 || self.objective != Objective::Sft {
            return Ok(());
        }
        let thr = lr * self.cfg.l1_lambda;
        for (i, v) in self.params.vars.iter().enumerate() {
            let anchor = self.params.anchor(i)?;
            let d = (v.as_tensor() - &anchor)?;
            let excess = if adam_metric {
                d.abs()?
                    .sub(&(self.optimizer.denominator(i)?.recip()? * thr)?)?
            } else {
                (d.abs()? - thr)?
            };
            let shrunk = (d.sign()? * excess.relu()?)?;
            v.set(&(anchor + shrunk)?)?;
        }
        Ok(())
    }

    /// The last `l1_refit_steps` SFT steps: no L1, and only the non-zero delta coordinates move.
    fn is_refit_step(&self, step: u64) -> bool {
        self.objective == Objective::Sft
            && self.cfg.l1_refit_steps > 0
            && step > self.cfg.max_steps - self.cfg.l1_refit_steps
    }

    /// Per parameter, where δ = θ − anchor is exactly 0. Recomputed before every refit step
    /// rather than stored, so a resumed run needs no extra state: the refit never creates zeros.
    fn zero_delta_masks(&self) -> Result<Vec<Tensor>> {
        let mut masks = Vec::with_capacity(self.params.vars.len());
        for (i, v) in self.params.vars.iter().enumerate() {
            masks.push(v.as_tensor().eq(&self.params.anchor(i)?)?);
        }
        Ok(masks)
    }

    /// Puts the coordinates in `frozen` back on their anchor (AdamW moved them by its momentum
    /// and weight decay).
    fn keep_zeros(&self, frozen: &[Tensor]) -> Result<()> {
        for (i, (v, mask)) in self.params.vars.iter().zip(frozen).enumerate() {
            v.set(&mask.where_cond(&self.params.anchor(i)?, v.as_tensor())?)?;
        }
        Ok(())
    }

    fn checkpoint_root(&self) -> PathBuf {
        self.cfg.output.join("checkpoints")
    }

    fn save_checkpoint(&self, step: u64) -> Result<()> {
        let root = self.checkpoint_root();
        std::fs::create_dir_all(&root)?;
        let dir = AtomicDir::new(&root.join(format!("step-{step:06}")))?;
        write_safetensors(
            &dir.path().join("params.safetensors"),
            self.params.tensors(),
        )?;
        write_safetensors(
            &dir.path().join("optimizer.safetensors"),
            self.optimizer.state(&self.params.names),
        )?;
        let state = RunState {
            step,
            objective: self.objective,
            config: self.cfg.clone(),
            optimizer_step: Some(self.optimizer.step),
            loss_scaler: self.scaler,
        };
        std::fs::write(
            dir.path().join("state.json"),
            serde_json::to_vec_pretty(&state)?,
        )?;
        dir.commit()?;
        // Older checkpoints are superseded once the new one is complete.
        for e in std::fs::read_dir(&root)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("step-") && name != format!("step-{step:06}") {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
        Ok(())
    }

    /// Restores the latest complete checkpoint; returns its step (0 when there is none).
    fn restore(&mut self) -> Result<u64> {
        let root = self.checkpoint_root();
        let Ok(entries) = std::fs::read_dir(&root) else {
            return Ok(0);
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
            })
            .collect();
        dirs.sort();
        let Some(dir) = dirs.pop() else { return Ok(0) };
        let state: RunState = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)
            .with_context(|| format!("{}: bad state.json", dir.display()))?;
        if state.objective != self.objective {
            bail!(
                "{}: checkpoint is a {:?} run, not {:?}",
                dir.display(),
                state.objective,
                self.objective
            );
        }
        let dev = self.params.vars[0].device().clone();
        let load = |f: &str| -> Result<BTreeMap<String, Tensor>> {
            let p = dir.join(f);
            Ok(candle_core::safetensors::load(&p, &dev)
                .with_context(|| format!("cannot read {}", p.display()))?
                .into_iter()
                .collect())
        };
        self.params
            .load_tensors(&load("params.safetensors")?, &dir)?;
        self.optimizer.load_state(
            &self.params.names,
            &load("optimizer.safetensors")?,
            state.optimizer_step.unwrap_or(state.step),
        )?;
        if self.scaler.is_some() {
            self.scaler = Some(state.loss_scaler.with_context(|| {
                format!(
                    "{}: the checkpoint has no loss scale (not an fp16 run); resume it with the \
                     mixed_precision it was started with",
                    dir.display()
                )
            })?);
        }
        tracing::info!("resuming from {} (step {})", dir.display(), state.step);
        Ok(state.step)
    }

    /// Runs to `max_steps` (from the last checkpoint with `resume`) and writes the result.
    pub fn train(&mut self, resume: bool) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.cfg.output)
            .with_context(|| format!("cannot create {}", self.cfg.output.display()))?;
        let start = if resume { self.restore()? } else { 0 };
        let metrics_path = self.cfg.output.join("metrics.jsonl");
        keep_metrics_up_to(&metrics_path, start)?;
        let checkpointing = self.cfg.gradient_checkpointing;
        let build = |p: &Trainable| {
            p.model(Mode::Differentiable)?
                .with_gradient_checkpointing(checkpointing)
        };
        let mut model = build(&self.params)?;
        // Clones share the variables' ids (and storage), so gradients are found under them.
        let trainable: Vec<Tensor> = self
            .params
            .vars
            .iter()
            .map(|v| v.as_tensor().clone())
            .collect();
        let trainable: Vec<&Tensor> = trainable.iter().collect();
        let lengths = self.data.lengths();
        let mut plans: BTreeMap<u64, Vec<Vec<usize>>> = BTreeMap::new();
        let accum = self.cfg.grad_accum as u64;
        let bar = crate::progress::bar(
            self.cfg.max_steps,
            &format!("{:?}", self.objective).to_lowercase(),
        );
        bar.set_position(start);
        let mut metrics_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)?;
        for step in start + 1..=self.cfg.max_steps {
            let t0 = Instant::now();
            if step > start + 1 && self.params.model_is_a_snapshot() {
                // Mixed precision: the model holds the parameters cast before the last update.
                model = build(&self.params)?;
            }
            let mut grads: Vec<Option<Tensor>> = vec![None; self.params.vars.len()];
            let mut loss_sum = 0f64;
            let mut tokens = 0usize;
            let mut extra: BTreeMap<&'static str, f64> = BTreeMap::new();
            for micro in 0..accum {
                let k = (step - 1) * accum + micro;
                let per_epoch = lengths.len().div_ceil(self.cfg.batch_size) as u64;
                let (epoch, within) = (k / per_epoch, (k % per_epoch) as usize);
                let plan = plans.entry(epoch).or_insert_with(|| {
                    length_grouped_batches(&lengths, self.cfg.batch_size, self.cfg.seed, epoch)
                });
                let idx = plan[within].clone();
                // Dropout masks depend only on the seed and the micro-batch number (exact resume).
                model.reseed_dropout(self.cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k);
                let (mut loss, m, n) = self.loss(&model, &idx)?;
                if let Some(p) = self.l1_penalty()? {
                    loss = (loss + p)?;
                }
                let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !value.is_finite() {
                    bail!(
                        "loss is {value} at step {step}, batch {within} of epoch {epoch} (examples {idx:?}); \
                         the run stops here (last checkpoint in {})",
                        self.checkpoint_root().display()
                    );
                }
                loss_sum += value;
                tokens += n;
                for (k, v) in m {
                    *extra.entry(k).or_default() += v / accum as f64;
                }
                let mut loss = (loss / accum as f64)?;
                if let Some(scaler) = &self.scaler {
                    loss = scaler.scale_loss(&loss)?;
                }
                let mut store = loss.backward()?;
                model.backward_checkpoints(&mut store, &trainable)?;
                for (g, new) in grads
                    .iter_mut()
                    .zip(collect_grads(&self.params.vars, &store))
                {
                    *g = match (g.take(), new) {
                        (Some(a), Some(b)) => Some((a + b)?),
                        (a, b) => a.or(b),
                    };
                }
            }
            let mut norm = grad_norm(&grads)?;
            let mut skipped_at = None;
            // The scale this step's loss was multiplied by (the update may change it).
            let used_scale = self.scaler.map(|s| s.scale);
            if let Some(scaler) = &mut self.scaler {
                match scaler.unscale(&mut grads, norm)? {
                    ScaledStep::Apply { grad_norm } => norm = grad_norm,
                    ScaledStep::Skip { scale } => skipped_at = Some(scale),
                }
            }
            // The schedule follows the optimizer's steps, so a skipped fp16 step does not
            // advance it (as Accelerate's scheduler does).
            let lr = match self.cfg.l1_refit_lr {
                Some(lr) if self.is_refit_step(step) => lr,
                _ => learning_rate(
                    self.cfg.lr,
                    self.cfg.schedule,
                    self.cfg.warmup_steps,
                    self.optimizer.step + 1,
                    self.cfg.max_steps,
                ),
            };
            match skipped_at {
                None => self.update(step, &mut grads, norm, lr)?,
                Some(scale) => tracing::warn!(
                    "step {step}: gradients overflow fp16 at loss scale {scale}; step skipped, \
                     scale now {}",
                    scale / 2.0
                ),
            }
            let secs = t0.elapsed().as_secs_f64();
            let loss = loss_sum / accum as f64;
            let mut line = json!({"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                                  "tokens": tokens, "tokens_per_s": tokens as f64 / secs, "seconds": secs});
            if let Some(scale) = used_scale {
                line["loss_scale"] = json!(scale);
                line["skipped"] = json!(skipped_at.is_some());
            }
            for (k, v) in &extra {
                line[*k] = json!(v);
            }
            writeln!(metrics_file, "{line}")?;
            metrics_file.flush()?;
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.0} tok/s",
                tokens as f64 / secs
            ));
            bar.inc(1);
            tracing::debug!("{line}");
            if self.cfg.save_every > 0 && step % self.cfg.save_every == 0 {
                self.save_checkpoint(step)?;
            }
        }
        bar.finish_and_clear();
        self.save_result()
    }

    /// Clip, AdamW, then the L1 step (or, in the refit, the zeros put back).
    fn update(
        &mut self,
        step: u64,
        grads: &mut [Option<Tensor>],
        norm: f64,
        lr: f64,
    ) -> Result<()> {
        clip_grads(grads, norm, self.cfg.max_grad_norm)?;
        let frozen = self
            .is_refit_step(step)
            .then(|| self.zero_delta_masks())
            .transpose()?;
        self.optimizer
            .step(&self.params.vars, grads, &self.params.decay, lr)?;
        match frozen {
            Some(frozen) => self.keep_zeros(&frozen),
            None => self.l1_proximal(lr),
        }
    }

    /// The trained model: a PEFT adapter (`adapter/`) or a Hugging Face directory (`model/`).
    pub fn save_result(&self) -> Result<PathBuf> {
        match self.params.adapter() {
            Some(adapter) => {
                let out = self.cfg.output.join("adapter");
                let dir = AtomicDir::new(&out)?;
                adapter.save(dir.path(), Some(&self.cfg.model))?;
                dir.commit()?;
                Ok(out)
            }
            None => {
                let out = self.cfg.output.join("model");
                let dir = AtomicDir::new(&out)?;
                self.pre.config.write(&dir.path().join("config.json"))?;
                copy_tokenizer_files(&self.pre.dir, dir.path())?;
                let weights = self.params.tensors().into_iter().collect();
                write_weights(dir.path(), &weights, None, DEFAULT_SHARD_BYTES)?;
                dir.commit()?;
                Ok(out)
            }
        }
    }
}

/// Drops metric lines past `step` (from a run killed after its last checkpoint).
fn keep_metrics_up_to(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_file_atomic(path, kept.as_bytes())
}
