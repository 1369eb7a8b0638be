//! What scoring a continuation needs from each row of logits: the target token's
//! log-probability and whether it is the greedy (arg-max) token, in one pass over the row.
//!
//! The composed version (`log_softmax`, `gather`, `argmax`) writes three vocabulary-sized
//! tensors per scored token and calls libm's `expf` per element: profiled on TruthfulQA, whose
//! prefilled tokens are nearly all scored, about an eighth of the evaluation went to it and to the
//! page faults of those buffers. Here each row is read in place: its maximum, then the sum of
//! `e^(x − max)` with the attention kernel's vectorised exponential, then one lookup.
//!
//! CPU, f32 and f64 (f64 with libm's exponential, for the reference-precision tests); other
//! devices and dtypes take the composed ops.

use anyhow::{bail, Result};
use candle_core::{Storage, Tensor, D};
use rayon::prelude::*;

use super::dispatch::{kernel_for, Kernel, Op};
use super::llama::Mode;
use super::small_matmul::per_cpu_features;

/// A scored token: `log p(target)` and whether the target is the row's arg-max (the first
/// maximal index, as `torch.argmax`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TargetScore {
    pub log_prob: f64,
    pub greedy: bool,
}

/// Per row of `logits (n, vocab)`: the score of `targets[i]`.
pub fn target_scores(logits: &Tensor, targets: &[u32]) -> Result<Vec<TargetScore>> {
    let (n, vocab) = logits.dims2()?;
    if targets.len() != n {
        bail!("{} targets for {n} rows of logits", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("target token {bad} is outside the vocabulary of {vocab}");
    }
    if kernel_for(Op::TargetLogProbs, logits, Mode::Inference) != Kernel::PaftCpu {
        return composed(logits, targets);
    }
    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("target scores: logits not on the CPU");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| anyhow::anyhow!("target scores: logits not contiguous"))?;
    match cpu {
        candle_core::CpuStorage::F32(x) => Ok(score_rows(&x[start..end], vocab, targets, lse_f32)),
        candle_core::CpuStorage::F64(x) => Ok(score_rows(&x[start..end], vocab, targets, lse_f64)),
        _ => bail!("target scores: no CPU kernel for {:?}", logits.dtype()),
    }
}

fn score_rows<T: Copy + PartialEq + Into<f64> + Sync>(
    x: &[T],
    vocab: usize,
    targets: &[u32],
    lse: fn(&[T]) -> (T, f64),
) -> Vec<TargetScore> {
    x.par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let (max, lse) = lse(row);
            let target = row[t as usize];
            TargetScore {
                log_prob: target.into() - lse,
                greedy: target == max && !row[..t as usize].contains(&max),
            }
        })
        .collect()
}

/// Elements per partial sum: f32 lanes over this many terms, the partial sums in f64, so the
/// sum over a 50k vocabulary keeps f32's precision per term rather than per 50k terms.
const CHUNK: usize = 1024;

per_cpu_features! {
    /// The row's maximum and `log Σ e^x`. A NaN makes the result NaN (the caller's check).
    fn lse_f32(row: &[f32]) -> (f32, f64) => lse_f32_body
}

#[inline(always)]
fn lse_f32_body(row: &[f32]) -> (f32, f64) {
    use super::attention_kernel::{exp, row_max, LANES};
    let max = row_max(row);
    let mut total = 0f64;
    // The vectorised exponential maps NaN to a finite value; the differences' own sum carries a
    // NaN through instead, in the same pass (a separate scan for NaN would read the row again).
    let mut diffs = [0f32; LANES];
    for part in row.chunks(CHUNK) {
        let mut sums = [0f32; LANES];
        let mut lanes = part.chunks_exact(LANES);
        for c in &mut lanes {
            for ((s, d), &x) in sums.iter_mut().zip(diffs.iter_mut()).zip(c) {
                *s += exp(x - max);
                *d += x - max;
            }
        }
        let rest = lanes.remainder();
        let tail: f32 = rest.iter().map(|&x| exp(x - max)).sum();
        total += sums.iter().map(|&s| s as f64).sum::<f64>() + tail as f64;
        diffs[0] += rest.iter().map(|&x| x - max).sum::<f32>();
    }
    if diffs.iter().any(|d| d.is_nan()) {
        return (max, f64::NAN);
    }
    (max, max as f64 + total.ln())
}

fn lse_f64(row: &[f64]) -> (f64, f64) {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f64 = row.iter().map(|&x| (x - max).exp()).sum();
    (max, max + sum.ln())
}

/// `log_softmax`, `gather` and `argmax` as candle ops, on any device and dtype.
fn composed(logits: &Tensor, targets: &[u32]) -> Result<Vec<TargetScore>> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let lp = logp
        .gather(&idx, 1)?
        .squeeze(1)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let best = logp.argmax(D::Minus1)?.to_vec1::<u32>()?;
    Ok(lp
        .into_iter()
        .zip(best.iter().zip(targets))
        .map(|(log_prob, (b, t))| TargetScore {
            log_prob,
            greedy: b == t,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Random logits with a spread like a language model's (a few large, most far below), a row
    /// with a tie at the maximum, and a row whose target is not the arg-max.
    fn logits(n: usize, vocab: usize, dtype: DType) -> Tensor {
        let x = (Tensor::randn(0f64, 4.0, (n, vocab), &Device::Cpu).unwrap() - 3.0).unwrap();
        x.to_dtype(dtype).unwrap()
    }

    #[test]
    fn matches_log_softmax_gather_and_argmax() {
        let (n, vocab) = (37, 49_152 + 7);
        for dtype in [DType::F32, DType::F64] {
            let x = logits(n, vocab, dtype);
            let best = x.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
            // Half the rows score their arg-max, half another token.
            let targets: Vec<u32> = (0..n)
                .map(|i| {
                    if i % 2 == 0 {
                        best[i]
                    } else {
                        (i * 977 % vocab) as u32
                    }
                })
                .collect();
            let fast = target_scores(&x, &targets).unwrap();
            let reference = composed(&x.to_dtype(DType::F64).unwrap(), &targets).unwrap();
            for (i, (f, r)) in fast.iter().zip(&reference).enumerate() {
                let tol = if dtype == DType::F32 { 2e-5 } else { 1e-10 };
                assert!(
                    (f.log_prob - r.log_prob).abs() < tol,
                    "{dtype:?} row {i}: {} vs {}",
                    f.log_prob,
                    r.log_prob
                );
                assert_eq!(f.greedy, r.greedy, "{dtype:?} row {i}");
                assert_eq!(f.greedy, i % 2 == 0 || targets[i] == best[i]);
            }
        }
    }

    #[test]
    fn a_tie_is_greedy_only_for_the_first_maximal_token() {
        let row = [0f32, 5.0, 1.0, 5.0, -2.0];
        let x = Tensor::from_vec(row.repeat(2), (2, 5), &Device::Cpu).unwrap();
        let s = target_scores(&x, &[1, 3]).unwrap();
        assert!(s[0].greedy && !s[1].greedy);
        // Both tied tokens have the same probability: e^5 / (2e^5 + e^0 + e^1 + e^-2).
        let z = 2.0 * 5f64.exp() + 1.0 + 1f64.exp() + (-2f64).exp();
        for t in &s {
            assert!((t.log_prob - (5.0 - z.ln())).abs() < 1e-6);
        }
    }

    #[test]
    fn a_nan_row_gives_a_nan_and_a_bad_target_an_error() {
        let x = Tensor::from_vec(vec![0f32, f32::NAN, 1.0, 2.0], (2, 2), &Device::Cpu).unwrap();
        let s = target_scores(&x, &[0, 1]).unwrap();
        assert!(s[0].log_prob.is_nan());
        assert!(s[1].log_prob.is_finite());
        let err = target_scores(&x, &[0, 2]).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary of 2"), "{err}");
        let err = target_scores(&x, &[0]).unwrap_err().to_string();
        assert!(err.contains("1 targets for 2 rows"), "{err}");
    }
}
