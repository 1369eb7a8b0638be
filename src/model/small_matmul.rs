//! `x·Wᵀ` for a few rows of `x`: the shape of every decode step (one token per sequence) and of
//! the short continuation batches of log-likelihood scoring.
//!
//! A general GEMM repacks the weight into panels on every call; at a handful of rows that
//! repacking costs more than the products themselves (profiled: 44% of GSM8K generation in
//! gemm's packing, 15% in its microkernels). Here each weight row is read once, in place, and
//! dotted with every input row while it is in L1, so a decode step costs about one pass over the
//! weights. Each output element is one dot product whose summation order does not depend on the
//! other rows, so a row's result is the same whatever it is batched with.
//!
//! CPU, f32, contiguous and not part of a backward graph only, on x86-64 with AVX2 and FMA;
//! everything else returns `None` and the caller uses candle's matmul.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::attention_kernel::with_f32;
use rayon::prelude::*;

/// Up to this many rows of `x` take the row-dot path.
pub const MAX_ROWS: usize = 16;

/// Weight rows per parallel task: enough work per task to amortise scheduling.
const OUT_BLOCK: usize = 64;

/// `x (rows, in) · wᵀ` for `w (out, in)`, as `(rows, out)`, when the fast path applies.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (rows, inp) = x.dims2()?;
    let (out, w_in) = w.dims2()?;
    let eligible = rows <= MAX_ROWS
        && rows > 0
        && inp == w_in
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && x.device().is_cpu()
        && w.device().is_cpu()
        && w.is_contiguous()
        && !x.track_op()
        && !w.track_op()
        && avx2_fma();
    if !eligible {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let yt = with_f32(&x, |xs| {
        with_f32(w, |ws| {
            let mut yt = vec![0f32; out * rows];
            yt.par_chunks_mut(OUT_BLOCK * rows)
                .enumerate()
                .for_each(|(blk, chunk)| {
                    let o0 = blk * OUT_BLOCK;
                    for (j, col) in chunk.chunks_mut(rows).enumerate() {
                        let w_row = &ws[(o0 + j) * inp..(o0 + j + 1) * inp];
                        for (m, y) in col.iter_mut().enumerate() {
                            // SAFETY: avx2_fma() checked the CPU has the features.
                            *y = unsafe { dot_avx2(&xs[m * inp..(m + 1) * inp], w_row) };
                        }
                    }
                });
            Ok(yt)
        })
    })?;
    Ok(Some(
        Tensor::from_vec(yt, (out, rows), &Device::Cpu)?
            .t()?
            .contiguous()?,
    ))
}

fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Σ a[i]·b[i] in four 8-lane FMA accumulators (independent chains keep both FMA ports busy).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, s) in acc.iter_mut().enumerate() {
            let off = i + 8 * k;
            *s = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(off)),
                _mm256_loadu_ps(pb.add(off)),
                *s,
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let mut total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_avx2(_a: &[f32], _b: &[f32]) -> f32 {
    unreachable!("avx2_fma() is false off x86-64")
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b.abs().unwrap().max_all().unwrap();
        (d / s).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn matches_candle_matmul_at_every_small_row_count() {
        let dev = Device::Cpu;
        // 77 inputs: four-accumulator blocks, an 8-lane tail and a scalar tail.
        let w = Tensor::randn(0f32, 1.0, (300, 77), &dev).unwrap();
        for rows in 1..=super::MAX_ROWS {
            let x = Tensor::randn(0f32, 1.0, (rows, 77), &dev).unwrap();
            let Some(got) = super::matmul_t(&x, &w).unwrap() else {
                eprintln!("SKIPPED: no AVX2/FMA here, the fallback path is candle's");
                return;
            };
            let want = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_rel_diff(&got, &want) < 1e-5, "rows {rows}");
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_whatever_it_is_batched_with() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (130, 64), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (9, 64), &dev).unwrap();
        let Some(all) = super::matmul_t(&x, &w).unwrap() else {
            return;
        };
        let one = super::matmul_t(&x.narrow(0, 4, 1).unwrap(), &w)
            .unwrap()
            .unwrap();
        let row = all.narrow(0, 4, 1).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&one), bits(&row));
    }

    #[test]
    fn declines_what_it_cannot_do_so_the_caller_falls_back() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 8), &dev).unwrap();
        let many = Tensor::randn(0f32, 1.0, (super::MAX_ROWS + 1, 8), &dev).unwrap();
        assert!(super::matmul_t(&many, &w).unwrap().is_none());
        let f64x = Tensor::randn(0f64, 1.0, (2, 8), &dev).unwrap();
        let f64w = w.to_dtype(candle_core::DType::F64).unwrap();
        assert!(super::matmul_t(&f64x, &f64w).unwrap().is_none());
        // In a backward graph: candle's matmul, which has a gradient.
        let var = Var::from_tensor(&w).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
        assert!(super::matmul_t(&x, var.as_tensor()).unwrap().is_none());
        let bf16 = w.to_dtype(candle_core::DType::BF16).unwrap();
        let xb = x.to_dtype(candle_core::DType::BF16).unwrap();
        assert!(super::matmul_t(&xb, &bf16).unwrap().is_none());
    }
}
