//! AdamW as torch.optim.AdamW computes it, with per-parameter weight decay (transformers leaves
//! norms and biases undecayed) and state that can be saved and restored for exact resumes —
//! candle-nn's AdamW has neither parameter groups nor accessible state.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub params: AdamWParams,
    pub step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(vars: &[Var], params: AdamWParams) -> Result<Self> {
        Ok(Self {
            params,
            step: 0,
            m: vars
                .iter()
                .map(|v| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|v| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]` (None: no gradient).
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &[Option<Tensor>],
        decay: &[bool],
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let bc2 = 1.0 - p.beta2.powi(self.step as i32);
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let wd = if decay[i] { p.weight_decay } else { 0.0 };
            let theta = (var.as_tensor() * (1.0 - lr * wd))?;
            // torch: θ −= lr · (m / bc1) / (sqrt(v / bc2) + eps)
            let denom = ((v.sqrt()? / bc2.sqrt())? + p.eps)?;
            let update = ((&m / bc1)? / denom)?;
            var.set(&(theta - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// AdamW's preconditioner for parameter `i` after the last step: √(v / (1 − β₂ᵗ)) + ε.
    pub fn denominator(&self, i: usize) -> Result<Tensor> {
        let bc2 = 1.0 - self.params.beta2.powi(self.step as i32);
        Ok(((self.v[i].sqrt()? / bc2.sqrt())? + self.params.eps)?)
    }

    pub fn state(&self, names: &[String]) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for (i, n) in names.iter().enumerate() {
            out.push((format!("{n}.exp_avg"), self.m[i].clone()));
            out.push((format!("{n}.exp_avg_sq"), self.v[i].clone()));
        }
        out
    }

    pub fn load_state(
        &mut self,
        names: &[String],
        saved: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for (i, n) in names.iter().enumerate() {
            self.m[i] = saved
                .get(&format!("{n}.exp_avg"))
                .cloned()
                .with_context(|| format!("optimizer state lacks {n}"))?;
            self.v[i] = saved
                .get(&format!("{n}.exp_avg_sq"))
                .cloned()
                .with_context(|| format!("optimizer state lacks {n}"))?;
        }
        self.step = step;
        Ok(())
    }
}

/// Gradients of `vars` from a backward pass, in order.
pub fn collect_grads(vars: &[Var], store: &GradStore) -> Vec<Option<Tensor>> {
    vars.iter()
        .map(|v| store.get(v.as_tensor()).cloned())
        .collect()
}

/// Global L2 norm of the gradients.
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g
            .to_dtype(candle_core::DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// torch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
pub fn clip_grads(grads: &mut [Option<Tensor>], norm: f64, max_norm: f64) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// Learning rate at optimizer step `step` (1-based) of `total`, with linear warm-up, as
/// transformers' schedulers give it.
pub fn learning_rate(base: f64, schedule: Schedule, warmup: u64, step: u64, total: u64) -> f64 {
    let s = step.saturating_sub(1) as f64;
    if (s as u64) < warmup {
        return base * s / warmup.max(1) as f64;
    }
    let progress = (s - warmup as f64) / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}
