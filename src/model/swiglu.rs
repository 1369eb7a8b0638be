//! The MLP's gate `silu(gate)·up` as one CPU pass.
//!
//! candle computes it as two ops: `silu` with a libm `expf` call per element, then a multiply,
//! each writing a `tokens × intermediate` tensor. Profiled on a 1042-token prefill of
//! SmolLM2-135M (2 cores): 0.148 s of 1.45 s, more than the attention's output projection. Here
//! one pass reads both inputs once, on the vectorised exponential of the attention softmax, on
//! both cores.

use std::mem::MaybeUninit;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::attention_kernel::{exp, with_f32};
use super::llama::Linear;
use super::small_matmul::per_cpu_features;

/// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 16 * 1024;

/// `silu(gate)·up` for f32 tensors of one shape on the CPU; `None` otherwise (the caller uses
/// candle's ops).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let eligible = gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.device().is_cpu()
        && up.device().is_cpu()
        && gate.dims() == up.dims();
    if !eligible {
        return Ok(None);
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    let out = with_f32(&gate, |g| {
        with_f32(&up, |u| {
            let mut out: Vec<f32> = Vec::with_capacity(g.len());
            out.spare_capacity_mut()
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .for_each(|(o, (g, u))| swiglu_chunk(o, g, u));
            // SAFETY: the chunks cover the whole spare capacity (g.len() elements), and
            // `swiglu_chunk` writes every element of its chunk.
            unsafe { out.set_len(g.len()) };
            Ok(out)
        })
    })?;
    Ok(Some(Tensor::from_vec(out, gate.dims(), &Device::Cpu)?))
}

/// Rows of the MLP's input per product with the stacked gate and up weights in [`gated`]: the
/// `rows × 2·intermediate` product stays under glibc's 32 MiB mmap threshold (SmolLM2: 2,048 ×
/// 3,072 floats, 24 MiB), so its buffer is reused instead of page-faulted in afresh (an 8-row
/// GSM8K admission of 4,096 rows took 10% longer in one product).
const GATED_ROWS: usize = 2048;

/// `silu(h·W_gateᵀ)·(h·W_upᵀ)` for `h (.., in)` and the linear `gate_up` whose weight
/// `(2·i, in)` holds the gate's rows then the up's; `None` where [`swiglu`] would not apply (the
/// caller runs the two products).
pub(super) fn gated(h: &Tensor, gate_up: &Linear) -> Result<Option<Tensor>> {
    let (width, inp) = gate_up.weight.dims2()?;
    if h.dtype() != DType::F32 || !h.device().is_cpu() || width % 2 != 0 {
        return Ok(None);
    }
    let inter = width / 2;
    let rows = h.elem_count() / inp.max(1);
    let h2 = h.reshape((rows, inp))?.contiguous()?;
    let mut out: Vec<f32> = Vec::with_capacity(rows * inter);
    let mut r0 = 0;
    while r0 < rows {
        let n = GATED_ROWS.min(rows - r0);
        let gu = gate_up.forward(&h2.narrow(0, r0, n)?)?.contiguous()?;
        with_f32(&gu, |gu| {
            let dst = &mut out.spare_capacity_mut()[r0 * inter..(r0 + n) * inter];
            let rows_per_task = (CHUNK / inter.max(1)).max(1);
            dst.par_chunks_mut(rows_per_task * inter)
                .zip(gu.par_chunks(rows_per_task * width))
                .for_each(|(o, gu)| {
                    for (o, gu) in o.chunks_mut(inter).zip(gu.chunks(width)) {
                        swiglu_chunk(o, &gu[..inter], &gu[inter..]);
                    }
                });
            Ok(())
        })?;
        r0 += n;
    }
    // SAFETY: the blocks cover rows 0..rows, and `swiglu_chunk` wrote every element of each row.
    unsafe { out.set_len(rows * inter) };
    let mut dims = h.dims().to_vec();
    *dims.last_mut().expect("has a last dimension") = inter;
    Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
}

per_cpu_features! {
    /// One chunk on the widest vectors this CPU has.
    fn swiglu_chunk(out: &mut [MaybeUninit<f32>], gate: &[f32], up: &[f32]) -> () => swiglu_body
}

#[inline(always)]
fn swiglu_body(out: &mut [MaybeUninit<f32>], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        o.write(g * sigmoid(g) * u);
    }
}

/// `1 / (1 + e^-x)` from `e^-|x|` (at most 1, so it cannot overflow): `1 / (1 + s)` for
/// `x ≥ 0`, `s / (1 + s)` below. A NaN `x` gives a finite value here; the caller's product with
/// `x` keeps the NaN.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let s = exp(-x.abs());
    let num = if x >= 0.0 { 1.0 } else { s };
    num / (1.0 + s)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    fn candle_swiglu(g: &Tensor, u: &Tensor) -> Vec<f32> {
        (candle_nn::ops::silu(g).unwrap() * u)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn matches_candle_silu_times_up() {
        let dev = Device::Cpu;
        // More elements than one chunk, and not a multiple of it or of a vector.
        let n = 3 * super::CHUNK + 37;
        let g = (Tensor::randn(0f32, 1.0, n, &dev).unwrap() * 8.0).unwrap();
        let u = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        let got: Vec<f32> = super::swiglu(&g, &u).unwrap().unwrap().to_vec1().unwrap();
        let want = candle_swiglu(&g, &u);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "element {i}: {a} vs candle {b}"
            );
        }
    }

    #[test]
    fn extremes_and_nan_as_candle() {
        let dev = Device::Cpu;
        let gs = [
            0.0f32,
            -0.0,
            1e-30,
            88.0,
            100.0,
            -88.0,
            -100.0,
            f32::INFINITY,
            f32::NAN,
        ];
        let g = Tensor::new(&gs, &dev).unwrap();
        let u = Tensor::new(&[2.0f32; 9], &dev).unwrap();
        let got: Vec<f32> = super::swiglu(&g, &u).unwrap().unwrap().to_vec1().unwrap();
        let want = candle_swiglu(&g, &u);
        for ((a, b), x) in got.iter().zip(&want).zip(gs) {
            assert!(
                // Below e^-87 the exponential is 0 (candle's is subnormal): 1e-30 absolute.
                a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-6 * b.abs() + 1e-30,
                "silu({x})·2: {a} vs candle {b}"
            );
        }
        // A NaN in `up` propagates as well.
        let u = Tensor::new(&[f32::NAN; 9], &dev).unwrap();
        let got: Vec<f32> = super::swiglu(&g, &u).unwrap().unwrap().to_vec1().unwrap();
        assert!(got.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn leaves_other_dtypes_and_shapes_to_candle() {
        let dev = Device::Cpu;
        let f64s = Tensor::zeros(4, candle_core::DType::F64, &dev).unwrap();
        assert!(super::swiglu(&f64s, &f64s).unwrap().is_none());
        let a = Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(5, candle_core::DType::F32, &dev).unwrap();
        assert!(super::swiglu(&a, &b).unwrap().is_none());
    }
}
