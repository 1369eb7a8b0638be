//! RMS normalisation with candle's arithmetic, several rows at a time.
//!
//! candle sums each row's squares in order, one dependent add after another, so a row of 576
//! costs 576 add latencies whatever the vector width (0.032 s of a 1,042-token prefill of
//! SmolLM2-135M on 2 cores, 60 norms; 0.008–0.009 s here). The order is what fixes the bits, so it is kept: each row
//! still adds its squares first to last, but [`GROUP`] rows are summed side by side, which gives
//! the CPU independent adds to overlap. Everything else is candle's: `x / √(Σx²/n + ε) · w`.

use std::mem::MaybeUninit;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::attention_kernel::with_f32;
use super::small_matmul::per_cpu_features;

/// Rows whose sums run side by side. 60 norms of 1,042 × 576 on 2 cores: candle 0.021–0.028 s,
/// 0.008–0.009 s at 4 rows, 0.011 at 8, 0.013 at 6, 0.021 at 16 (measured).
const GROUP: usize = 4;

/// Rows per parallel task: a decode step's few rows stay on the calling thread.
const ROWS_PER_TASK: usize = 64;

/// candle's `rms_norm(x, w, eps)` for f32 `x (.., n)` and `w (n)` on the CPU; `None` otherwise
/// (the caller uses candle's).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Option<Tensor>> {
    let n = x.dim(candle_core::D::Minus1)?;
    let eligible = x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.device().is_cpu()
        && w.device().is_cpu()
        && w.dims() == [n]
        && n > 0;
    if !eligible {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let out = with_f32(&x, |xs| {
        with_f32(w, |ws| {
            let mut out: Vec<f32> = Vec::with_capacity(xs.len());
            out.spare_capacity_mut()
                .par_chunks_mut(ROWS_PER_TASK * n)
                .zip(xs.par_chunks(ROWS_PER_TASK * n))
                .for_each(|(dst, src)| {
                    for (dst, src) in dst.chunks_mut(GROUP * n).zip(src.chunks(GROUP * n)) {
                        norm_rows(dst, src, ws, eps);
                    }
                });
            // SAFETY: the chunks cover the whole capacity (xs.len() elements), and `norm_rows`
            // writes every element of its rows.
            unsafe { out.set_len(xs.len()) };
            Ok(out)
        })
    })?;
    Ok(Some(Tensor::from_vec(out, x.dims(), &Device::Cpu)?))
}

per_cpu_features! {
    /// Up to [`GROUP`] rows of `src` normalised into `dst`.
    fn norm_rows(dst: &mut [MaybeUninit<f32>], src: &[f32], w: &[f32], eps: f32) -> () =>
        norm_rows_body
}

#[inline(always)]
fn norm_rows_body(dst: &mut [MaybeUninit<f32>], src: &[f32], w: &[f32], eps: f32) {
    let n = w.len();
    let rows = src.len() / n;
    if rows == GROUP {
        let mut sums = [0f32; GROUP];
        for i in 0..n {
            for (r, s) in sums.iter_mut().enumerate() {
                let v = src[r * n + i];
                *s += v * v;
            }
        }
        for (r, s) in sums.into_iter().enumerate() {
            scale_row(
                &mut dst[r * n..(r + 1) * n],
                &src[r * n..(r + 1) * n],
                w,
                s,
                eps,
            );
        }
    } else {
        for (d, x) in dst.chunks_mut(n).zip(src.chunks(n)) {
            let s = x.iter().fold(0f32, |s, &v| s + v * v);
            scale_row(d, x, w, s, eps);
        }
    }
}

/// `x / √(sum/n + ε) · w`, as candle divides and multiplies.
#[inline(always)]
fn scale_row(dst: &mut [MaybeUninit<f32>], x: &[f32], w: &[f32], sum: f32, eps: f32) {
    let m = (sum / x.len() as f32 + eps).sqrt();
    for ((d, &v), &a) in dst.iter_mut().zip(x).zip(w) {
        d.write(v / m * a);
    }
}

#[cfg(test)]
mod tests {
    use crate::model::tiny::f32_bits;
    use candle_core::{Device, Tensor};

    #[test]
    fn gives_candles_bits() {
        let dev = Device::Cpu;
        // Row counts around a group and a task, candle's serial path (≤ 32 rows) and its
        // parallel one; an odd width.
        for (rows, n) in [(1, 9), (7, 64), (8, 64), (33, 77), (200, 576), (1042, 96)] {
            let x = Tensor::randn(0f32, 3.0, (1, rows, n), &dev).unwrap();
            let w = Tensor::randn(1f32, 0.2, n, &dev).unwrap();
            let got = super::rms_norm(&x, &w, 1e-5)
                .unwrap()
                .expect("f32 on the CPU");
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(f32_bits(&got), f32_bits(&want), "{rows} rows of {n}");
        }
    }

    #[test]
    fn leaves_other_dtypes_and_shapes_to_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
        let w = Tensor::ones(8, candle_core::DType::F32, &dev).unwrap();
        let x16 = x.to_dtype(candle_core::DType::F16).unwrap();
        assert!(super::rms_norm(&x16, &w, 1e-5).unwrap().is_none());
        let w7 = Tensor::ones(7, candle_core::DType::F32, &dev).unwrap();
        assert!(super::rms_norm(&x, &w7, 1e-5).unwrap().is_none());
    }
}
