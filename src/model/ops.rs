//! Fused training ops with a backward pass, for the two places where the composed versions hold
//! the most activations: the attention softmax (five score-sized tensors per layer when composed,
//! two here) and the log-probability of the target tokens (four vocab-sized tensors per token
//! when composed as `log_softmax` + `gather`, one here).
//!
//! CPU kernels for f32 and f64; other devices and dtypes fall back to the composed ops, which
//! compute the same values with more memory.

use anyhow::Result;
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType, D,
};
use num_traits::Float;

use super::dispatch::{kernel_for, Kernel, Op};
use super::llama::Mode;
use rayon::prelude::*;

/// `softmax(scores + mask)` over the last axis, differentiable in `scores`. `mask` is additive and
/// broadcasts to `scores` (e.g. `(b|1, 1, 1, t, T)` against `(b, h, r, t, T)`); it gets no gradient.
pub fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    if !fused(Op::MaskedSoftmax, scores) {
        let x = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores.clone(),
        };
        return Ok(candle_nn::ops::softmax(&x, D::Minus1)?);
    }
    let scores = scores.contiguous()?;
    let mask = match mask {
        Some(m) => m.to_dtype(scores.dtype())?.broadcast_as(scores.shape())?,
        None => Tensor::zeros((), scores.dtype(), scores.device())?.broadcast_as(scores.shape())?,
    };
    Ok(scores.apply_op2(&mask, MaskedSoftmax)?)
}

/// `log_softmax(logits)[i, targets[i]]` for `logits (n, V)` and u32 `targets (n,)`: the
/// `(n,)` log-probabilities of the target tokens, differentiable in `logits`.
pub fn target_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !fused(Op::TargetLogProbs, logits) {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        return Ok(logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?);
    }
    let (n, _) = logits.dims2()?;
    anyhow::ensure!(
        targets.dims1()? == n,
        "{} targets for {n} rows of logits",
        targets.dims1()?
    );
    let logits = logits.contiguous()?;
    let targets = targets.to_dtype(candle_core::DType::U32)?.contiguous()?;
    Ok(logits.apply_op2(&targets, TargetLogProbs)?)
}

/// Runs `$body` with `$x` the f32 or f64 slice of a CPU storage and `$t` its element type.
macro_rules! on_float {
    ($storage:expr, $what:literal, |$x:ident: $t:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32($x) => {
                #[allow(dead_code)]
                type $t = f32;
                $body
            }
            CpuStorage::F64($x) => {
                #[allow(dead_code)]
                type $t = f64;
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {:?}", $what, other.dtype()),
        }
    };
}

fn fused(op: Op, x: &Tensor) -> bool {
    kernel_for(op, x, Mode::Differentiable) == Kernel::PaftCpu
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op: input is not contiguous"),
    }
}

/// Where each row (all axes but the last) of a possibly broadcast, strided layout starts, and
/// the stride along the row.
fn row_offsets(layout: &Layout) -> (Vec<usize>, usize) {
    let dims = layout.dims();
    let stride = layout.stride();
    let last = dims.len() - 1;
    let n: usize = dims[..last].iter().product();
    let mut starts = Vec::with_capacity(n);
    let mut index = vec![0usize; last];
    for _ in 0..n {
        let at = index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        starts.push(layout.start_offset() + at);
        // Odometer over the row axes, last fastest.
        for k in (0..last).rev() {
            index[k] += 1;
            if index[k] < dims[k] {
                break;
            }
            index[k] = 0;
        }
    }
    (starts, stride[last])
}

struct MaskedSoftmax;

fn masked_softmax_rows<T: WithDType + Float + Send + Sync>(
    scores: &[T],
    sl: &Layout,
    mask: &[T],
    ml: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous(scores, sl)?;
    let cols = sl.dims()[sl.dims().len() - 1];
    let (mask_rows, mask_stride) = row_offsets(ml);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .zip(mask_rows.par_iter())
        .for_each(|((o, x), &m)| {
            let mut max = T::neg_infinity();
            for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                *o = x + mask[m + j * mask_stride];
                max = Float::max(max, *o);
            }
            let mut sum = T::zero();
            for o in o.iter_mut() {
                *o = (*o - max).exp();
                sum += *o;
            }
            for o in o.iter_mut() {
                *o /= sum;
            }
        });
    Ok((WithDType::to_cpu_storage_owned(out), sl.shape().clone()))
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "paft-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        on_float!(s1, "masked softmax", |x: T| {
            masked_softmax_rows(x, l1, T::cpu_storage_as_slice(s2)?, l2)
        })
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d scores = p ⊙ (g − Σ g⊙p)
        let dot = (grad * probs)?.sum_keepdim(D::Minus1)?;
        Ok((Some(probs.mul(&grad.broadcast_sub(&dot)?)?), None))
    }
}

struct TargetLogProbs;

/// Per row: `logsumexp(x)`, computed around the row's maximum.
fn logsumexp<T: Float>(x: &[T]) -> T {
    let max = x.iter().fold(T::neg_infinity(), |a, &b| Float::max(a, b));
    let sum = x.iter().fold(T::zero(), |a, &b| a + (b - max).exp());
    max + sum.ln()
}

fn target_log_probs_rows<T: WithDType + Float + Send + Sync>(
    logits: &[T],
    ll: &Layout,
    targets: &[u32],
    tl: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous(logits, ll)?;
    let t = contiguous(targets, tl)?;
    let (n, v) = ll.shape().dims2()?;
    if let Some(bad) = t.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("target token {bad} is outside the vocabulary of {v}");
    }
    let out: Vec<T> = x
        .par_chunks(v)
        .zip(t.par_iter())
        .map(|(row, &t)| row[t as usize] - logsumexp(row))
        .collect();
    Ok((WithDType::to_cpu_storage_owned(out), Shape::from(n)))
}

impl CustomOp2 for TargetLogProbs {
    fn name(&self) -> &'static str {
        "paft-target-log-probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        on_float!(s1, "target log-probs", |x: T| {
            target_log_probs_rows(x, l1, u32::cpu_storage_as_slice(s2)?, l2)
        })
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d logits[i, j] = g[i] · (1[j = t_i] − softmax(logits[i])[j]), in one pass and one buffer.
        let g = grad.contiguous()?;
        let d = logits.apply_op3_no_bwd(targets, &g, &TargetLogProbsGrad)?;
        Ok((Some(d), None))
    }
}

struct TargetLogProbsGrad;

fn target_log_probs_grad_rows<T: WithDType + Float + Send + Sync>(
    logits: &[T],
    ll: &Layout,
    targets: &[u32],
    tl: &Layout,
    grad: &[T],
    gl: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous(logits, ll)?;
    let t = contiguous(targets, tl)?;
    let g = contiguous(grad, gl)?;
    let (_, v) = ll.shape().dims2()?;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(v)
        .zip(x.par_chunks(v))
        .zip(t.par_iter().zip(g.par_iter()))
        .for_each(|((o, x), (&t, &g))| {
            let lse = logsumexp(x);
            for (o, &x) in o.iter_mut().zip(x) {
                *o = -g * (x - lse).exp();
            }
            o[t as usize] += g;
        });
    Ok((WithDType::to_cpu_storage_owned(out), ll.shape().clone()))
}

impl CustomOp3 for TargetLogProbsGrad {
    fn name(&self) -> &'static str {
        "paft-target-log-probs-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        on_float!(s1, "target log-probs gradient", |x: T| {
            let (t, g) = (u32::cpu_storage_as_slice(s2)?, T::cpu_storage_as_slice(s3)?);
            target_log_probs_grad_rows(x, l1, t, l2, g, l3)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn grads_of(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        x: &Var,
        w: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        // A weighted sum makes every output element's gradient distinct.
        let y = f(x.as_tensor())?;
        let loss = (y.broadcast_mul(w)?).sum_all()?;
        let g = loss.backward()?;
        Ok((y, g.get(x.as_tensor()).unwrap().clone()))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok((a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }

    #[test]
    fn masked_softmax_matches_the_composed_ops_and_their_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let scores = Var::from_tensor(&Tensor::randn(0f64, 3.0, (2, 3, 2, 4, 5), &dev)?)?;
        // Causal-style mask for row 0 of the batch, none for row 1, broadcast over heads.
        let mut m = vec![0f64; 2 * 4 * 5];
        for q in 0..4 {
            for k in 0..5 {
                if k > q + 1 {
                    m[q * 5 + k] = -1e30;
                }
            }
        }
        let mask = Tensor::from_vec(m, (2, 1, 1, 4, 5), &dev)?;
        let w = Tensor::randn(0f64, 1.0, (2, 3, 2, 4, 5), &dev)?;
        let (y1, g1) = grads_of(|x| masked_softmax(x, Some(&mask)), &scores, &w)?;
        let composed = |x: &Tensor| -> Result<Tensor> {
            Ok(candle_nn::ops::softmax(
                &x.broadcast_add(&mask)?,
                D::Minus1,
            )?)
        };
        let (y2, g2) = grads_of(composed, &scores, &w)?;
        assert!(max_diff(&y1, &y2)? < 1e-12);
        assert!(max_diff(&g1, &g2)? < 1e-12);
        // No mask at all.
        let (y3, g3) = grads_of(|x| masked_softmax(x, None), &scores, &w)?;
        let (y4, g4) = grads_of(|x| Ok(candle_nn::ops::softmax(x, D::Minus1)?), &scores, &w)?;
        assert!(max_diff(&y3, &y4)? < 1e-12);
        assert!(max_diff(&g3, &g4)? < 1e-12);
        Ok(())
    }

    #[test]
    fn target_log_probs_match_log_softmax_gather_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let logits = Var::from_tensor(&Tensor::randn(0f64, 4.0, (6, 11), &dev)?)?;
        let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1], &dev)?;
        let w = Tensor::randn(0f64, 1.0, 6, &dev)?;
        let (y1, g1) = grads_of(|x| target_log_probs(x, &targets), &logits, &w)?;
        let composed = |x: &Tensor| -> Result<Tensor> {
            let logp = candle_nn::ops::log_softmax(x, D::Minus1)?;
            Ok(logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?)
        };
        let (y2, g2) = grads_of(composed, &logits, &w)?;
        assert!(max_diff(&y1, &y2)? < 1e-12);
        assert!(max_diff(&g1, &g2)? < 1e-12);
        Ok(())
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() -> Result<()> {
        let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu)?;
        let targets = Tensor::new(&[1u32, 4], &Device::Cpu)?;
        let err = target_log_probs(&logits, &targets).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        Ok(())
    }
}
