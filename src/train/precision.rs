//! Mixed precision: the forward and backward passes in bf16 or f16 while the trained
//! parameters (LoRA factors or full master weights) and AdamW's moments stay in f32, as
//! Accelerate's `mixed_precision` and PEFT's f32 adapters give it. f16 also needs dynamic loss
//! scaling: its smallest normal gradient is 6e-5, so the loss is multiplied by a scale before
//! the backward pass and the gradients divided by it after; a step whose gradients overflow is
//! skipped and the scale halved (torch's `GradScaler`, with its defaults).

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    /// Everything in the run's `dtype`.
    #[default]
    No,
    Bf16,
    Fp16,
}

impl MixedPrecision {
    /// The dtype of the passes (weights the model computes with, activations, their gradients);
    /// None when the run computes in its own `dtype`.
    pub fn compute_dtype(self) -> Option<DType> {
        match self {
            MixedPrecision::No => None,
            MixedPrecision::Bf16 => Some(DType::BF16),
            MixedPrecision::Fp16 => Some(DType::F16),
        }
    }

    /// f16's range needs loss scaling; bf16 has f32's exponent range and does not.
    pub fn scales_loss(self) -> bool {
        self == MixedPrecision::Fp16
    }
}

/// torch.amp.GradScaler's state: the current scale and how many finite steps in a row it has
/// seen. Saved with each checkpoint so a resumed run scales exactly as an uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub growth_tracker: u64,
}

/// GradScaler's defaults.
const INIT_SCALE: f64 = 65536.0;
const GROWTH_FACTOR: f64 = 2.0;
const BACKOFF_FACTOR: f64 = 0.5;
const GROWTH_INTERVAL: u64 = 2000;

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(INIT_SCALE)
    }
}

/// What a scaler made of one step's gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScaledStep {
    /// Finite gradients, now unscaled; the norm is the unscaled global L2 norm.
    Apply { grad_norm: f64 },
    /// Some gradient overflowed at this scale: the optimizer step is skipped.
    Skip { scale: f64 },
}

impl LossScaler {
    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            growth_tracker: 0,
        }
    }

    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok((loss * self.scale)?)
    }

    /// Checks and unscales `grads` (gradients of the scaled loss, `scaled_norm` their global
    /// norm), then moves the scale as GradScaler.update does: halved after an overflow,
    /// doubled after `GROWTH_INTERVAL` finite steps in a row.
    pub fn unscale(
        &mut self,
        grads: &mut [Option<Tensor>],
        scaled_norm: f64,
    ) -> Result<ScaledStep> {
        if !scaled_norm.is_finite() {
            let scale = self.scale;
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            return Ok(ScaledStep::Skip { scale });
        }
        let inv = 1.0 / self.scale;
        for g in grads.iter_mut().flatten() {
            *g = (&*g * inv)?;
        }
        self.growth_tracker += 1;
        if self.growth_tracker == GROWTH_INTERVAL {
            self.scale *= GROWTH_FACTOR;
            self.growth_tracker = 0;
        }
        Ok(ScaledStep::Apply {
            grad_norm: scaled_norm * inv,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads(v: &[f32]) -> Vec<Option<Tensor>> {
        vec![Some(Tensor::new(v, &Device::Cpu).unwrap()), None]
    }

    #[test]
    fn overflow_skips_and_halves_finite_unscales_and_grows() {
        let mut s = LossScaler::new(1024.0);
        let mut g = grads(&[f32::INFINITY, 1.0]);
        assert_eq!(
            s.unscale(&mut g, f64::INFINITY).unwrap(),
            ScaledStep::Skip { scale: 1024.0 }
        );
        assert_eq!(s.scale, 512.0);

        let mut g = grads(&[512.0, -1024.0]);
        let norm = (512f64.powi(2) + 1024f64.powi(2)).sqrt();
        match s.unscale(&mut g, norm).unwrap() {
            ScaledStep::Apply { grad_norm } => assert!((grad_norm - norm / 512.0).abs() < 1e-12),
            other => panic!("finite gradients were skipped: {other:?}"),
        }
        assert_eq!(
            g[0].as_ref().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, -2.0]
        );
        assert!(g[1].is_none());
        assert_eq!(s.growth_tracker, 1);

        // The scale doubles after GROWTH_INTERVAL finite steps in a row, and only then.
        for _ in 1..GROWTH_INTERVAL - 1 {
            s.unscale(&mut grads(&[1.0]), 1.0).unwrap();
        }
        assert_eq!(s.scale, 512.0);
        s.unscale(&mut grads(&[1.0]), 1.0).unwrap();
        assert_eq!((s.scale, s.growth_tracker), (1024.0, 0));
        // NaN is an overflow too.
        assert!(matches!(
            s.unscale(&mut grads(&[f32::NAN]), f64::NAN).unwrap(),
            ScaledStep::Skip { .. }
        ));
    }

    #[test]
    fn only_f16_scales_and_no_keeps_the_run_dtype() {
        assert_eq!(MixedPrecision::No.compute_dtype(), None);
        assert_eq!(MixedPrecision::Bf16.compute_dtype(), Some(DType::BF16));
        assert_eq!(MixedPrecision::Fp16.compute_dtype(), Some(DType::F16));
        assert!(MixedPrecision::Fp16.scales_loss() && !MixedPrecision::Bf16.scales_loss());
    }
}
