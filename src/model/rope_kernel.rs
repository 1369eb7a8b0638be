//! Rotary embedding of a projection's heads, moved to head-major order in the same pass.
//!
//! The projections write `(b, t, heads, d)` and the attention reads `(b, heads, t, d)`. Composed,
//! that is a transposing copy, candle's rope (a second copy) and, for the queries, the
//! `1/√d` scaling (a third): 0.050 s of a 1,042-token prefill of SmolLM2-135M on 2 cores (5%).
//! Here each element is read once and written once, with candle's rope arithmetic
//! (`x₁·cos − x₂·sin`, `x₁·sin + x₂·cos`) and the scaling as candle's `affine` (`y·s + 0`), so
//! the bits are the same.

use std::mem::MaybeUninit;

use anyhow::Result;
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::attention_kernel::with_f32;
use super::small_matmul::per_cpu_features;

/// Rows of `d` values per parallel task: a decode step's few rows stay on the calling thread.
const ROWS_PER_TASK: usize = 256;

/// `x (b, t, h, d)` rotated by `cos, sin` (`(t, d/2)`, or `(b, t, d/2)` when rows have their own
/// positions) and multiplied by `scale` if given, as a contiguous `(b, h, t, d)` tensor. `x` may
/// be any view whose last dimension is contiguous (the query or key part of the stacked
/// projection's output). `None` when the tensors are not f32 on the CPU in those shapes (the
/// caller then transposes and uses candle's rope).
pub fn rotate_heads(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    scale: Option<f64>,
) -> Result<Option<Tensor>> {
    let Ok((b, t, h, d)) = x.dims4() else {
        return Ok(None);
    };
    let half = d / 2;
    let tables_fit =
        |c: &Tensor| (c.dims() == [t, half] || c.dims() == [b, t, half]) && c.is_contiguous();
    let eligible = [x, cos, sin]
        .iter()
        .all(|x| x.dtype() == DType::F32 && x.device().is_cpu())
        && d % 2 == 0
        && x.stride()[3] == 1
        && tables_fit(cos)
        && tables_fit(sin);
    if !eligible || b * t * h == 0 {
        return Ok(None);
    }
    let per_row_tables = cos.rank() == 3;
    let [sb, st, sh, _] = <[usize; 4]>::try_from(x.stride()).expect("rank 4");
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..];
    let rows = b * h * t;
    let scale = scale.map(|s| s as f32);
    let out = with_f32(cos, |cos| {
        with_f32(sin, |sin| {
            let mut out: Vec<f32> = Vec::with_capacity(rows * d);
            out.spare_capacity_mut()
                .par_chunks_mut(d)
                .with_min_len(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(row, dst)| {
                    // Output row `row` is (batch row, head, time).
                    let (bi, hi, ti) = (row / (h * t), row / t % h, row % t);
                    let src = &xs[bi * sb + ti * st + hi * sh..][..d];
                    let at = if per_row_tables { bi * t + ti } else { ti } * half;
                    let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
                    rotate_row(dst, src, c, s, scale);
                });
            // SAFETY: the chunks cover all rows × d elements of the capacity, and `rotate_row`
            // writes every element of its chunk.
            unsafe { out.set_len(rows * d) };
            Ok(out)
        })
    })?;
    Ok(Some(Tensor::from_vec(out, (b, h, t, d), &Device::Cpu)?))
}

per_cpu_features! {
    /// One head's `d` values rotated (the first half paired with the second, as candle's and
    /// transformers' non-interleaved rope) and scaled into `dst`.
    fn rotate_row(
        dst: &mut [MaybeUninit<f32>],
        src: &[f32],
        cos: &[f32],
        sin: &[f32],
        scale: Option<f32>,
    ) -> () => rotate_row_body
}

#[inline(always)]
fn rotate_row_body(
    dst: &mut [MaybeUninit<f32>],
    src: &[f32],
    cos: &[f32],
    sin: &[f32],
    scale: Option<f32>,
) {
    let half = cos.len();
    let (x1, x2) = src.split_at(half);
    let (d1, d2) = dst.split_at_mut(half);
    let lanes = d1
        .iter_mut()
        .zip(d2)
        .zip(x1.iter().zip(x2))
        .zip(cos.iter().zip(sin));
    match scale {
        // candle's `affine(s, 0)`: `y·s + 0`, whose `+ 0` turns −0 into +0.
        Some(k) => {
            for (((y1, y2), (&a, &b)), (&c, &s)) in lanes {
                y1.write((a * c - b * s) * k + 0.0);
                y2.write((a * s + b * c) * k + 0.0);
            }
        }
        None => {
            for (((y1, y2), (&a, &b)), (&c, &s)) in lanes {
                y1.write(a * c - b * s);
                y2.write(a * s + b * c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::tiny::f32_bits;
    use candle_core::{Device, Tensor};

    /// The composed path this replaces: transpose, candle's rope, then `* scale`.
    fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor, scale: Option<f64>) -> Tensor {
        let x = x.transpose(1, 2).unwrap().contiguous().unwrap();
        let y = candle_nn::rotary_emb::rope(&x, cos, sin).unwrap();
        match scale {
            Some(s) => (y * s).unwrap(),
            None => y,
        }
    }

    #[test]
    fn gives_the_bits_of_transpose_rope_and_scale() {
        let dev = Device::Cpu;
        // (b, t, q heads + 2 kv heads, d) like the stacked projection; shared and per-row tables;
        // one time step (candle's rope has a separate loop for it) and many (several tasks).
        for (b, t) in [(1, 1), (3, 1), (2, 7), (1, 600), (2, 300)] {
            let (nh, nkv, d) = (6, 2, 16);
            let qkv = Tensor::randn(0f32, 1.0, (b, t, nh + 2 * nkv, d), &dev).unwrap();
            for tables in [vec![t, d / 2], vec![b, t, d / 2]] {
                let cos = Tensor::randn(0f32, 1.0, tables.clone(), &dev).unwrap();
                let sin = Tensor::randn(0f32, 1.0, tables, &dev).unwrap();
                for (x, scale) in [
                    (qkv.narrow(2, 0, nh).unwrap(), Some(0.125)),
                    (qkv.narrow(2, nh, nkv).unwrap(), None),
                ] {
                    let got = super::rotate_heads(&x, &cos, &sin, scale)
                        .unwrap()
                        .expect("f32 on the CPU");
                    let want = composed(&x, &cos, &sin, scale);
                    assert_eq!(got.dims(), want.dims());
                    assert_eq!(
                        f32_bits(&got),
                        f32_bits(&want),
                        "b {b} t {t} scale {scale:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn leaves_other_dtypes_and_shapes_to_the_caller() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 2, 8), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (4, 4), &dev).unwrap();
        let x16 = x.to_dtype(candle_core::DType::F16).unwrap();
        assert!(super::rotate_heads(&x16, &cos, &cos, None)
            .unwrap()
            .is_none());
        let short = cos.narrow(0, 0, 3).unwrap();
        assert!(super::rotate_heads(&x, &short, &short, None)
            .unwrap()
            .is_none());
    }
}
