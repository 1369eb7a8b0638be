//! `x·Wᵀ` for a few rows of `x`: the shape of every decode step (one token per sequence) and of
//! the short continuation batches of log-likelihood scoring.
//!
//! A general GEMM repacks the weight into panels on every call; at a handful of rows that
//! repacking costs more than the products themselves (profiled: 44% of GSM8K generation in
//! gemm's packing, 15% in its microkernels). Here a few weight rows at a time are read once, in
//! place, and dotted with up to four input rows while they are in L1, so a decode step costs
//! about one pass over the weights. Each output element is one dot product whose summation
//! order does not depend on the other rows, so a row's result is the same whatever it is batched
//! with. Measured on SmolLM2-135M's matrices (2 cores): one pass at 8 rows 41 ms (one dot at a
//! time: 183 ms; gemm: 94 ms); the row-dot path stays ahead of gemm up to about 24 rows with
//! AVX2's 16 registers and past 32 with AVX-512VL's 32 (see [`max_rows`]).
//!
//! CPU, f32, contiguous and not part of a backward graph only, on x86-64 with AVX2 and FMA;
//! everything else returns `None` and the caller uses candle's matmul.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::attention_kernel::with_f32;
use super::dispatch::{kernel_for, Kernel, Op};
use super::llama::Mode;
use rayon::prelude::*;

/// Up to this many rows of `x` take the row-dot path with AVX2's 16 registers (gemm is faster
/// beyond: measured).
const MAX_ROWS: usize = 24;

/// Up to this many with AVX-512VL's 32 (`fill_wide`): 32-row decode steps on the row-dot path
/// ran 50 GSM8K documents of 256 tokens in 94.6 s against 120.8 s at 16 rows, where gemm at 32
/// rows had only matched 16 on the row path.
const MAX_ROWS_WIDE: usize = 32;

/// How many rows of `x` [`matmul_t`] takes on this CPU (0: none). A batch of at most this many
/// rows gets each row's bits whatever it is batched with, which is what keeps a batched
/// generation identical to the unbatched one.
pub fn max_rows() -> usize {
    match (avx2_fma(), avx512vl()) {
        (false, _) => 0,
        (true, false) => MAX_ROWS,
        (true, true) => MAX_ROWS_WIDE,
    }
}

/// Weight rows per parallel task: enough work per task to amortise scheduling.
const OUT_BLOCK: usize = 64;

/// `x (rows, in) · wᵀ` for `w (out, in)`, as `(rows, out)`, when the fast path applies.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    row_dots(x, w, avx512vl())
}

/// [`matmul_t`], on 32 vector registers when `wide` (the caller checked AVX-512VL).
fn row_dots(x: &Tensor, w: &Tensor, wide: bool) -> Result<Option<Tensor>> {
    let (rows, inp) = x.dims2()?;
    let (out, w_in) = w.dims2()?;
    let eligible = rows <= max_rows()
        && rows > 0
        && inp == w_in
        && x.dtype() == w.dtype()
        && x.device().same_device(w.device())
        && kernel_for(Op::SmallMatmul, x, Mode::Inference) == Kernel::PaftCpu
        && w.is_contiguous()
        && !x.track_op()
        && !w.track_op();
    if !eligible {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let y = with_f32(&x, |xs| {
        with_f32(w, |ws| {
            let mut y = vec![0f32; rows * out];
            let dst = OutPtr(y.as_mut_ptr());
            (0..out.div_ceil(OUT_BLOCK))
                .into_par_iter()
                .for_each(|blk| {
                    let o0 = blk * OUT_BLOCK;
                    let w_rows = &ws[o0 * inp..(o0 + OUT_BLOCK).min(out) * inp];
                    // SAFETY: max_rows() (and wide) checked the CPU has the features; this task
                    // writes columns o0.. of its block only, inside `y`'s rows × out.
                    unsafe { fill_rows(xs, rows, w_rows, inp, (dst.get().add(o0), out), wide) };
                });
            Ok(y)
        })
    })?;
    Ok(Some(Tensor::from_vec(y, (rows, out), &Device::Cpu)?))
}

/// `x (rows, in) · wᵀ` past the row-dot path: the same gemm call as candle's matmul (so the
/// same bits), into a destination that is not zeroed first. candle zeroes it on the calling
/// thread while the pool's workers wait, although gemm overwrites every element
/// (`read_dst` false): 2% of a prefill's CPU time, all of it serial (profiled on ARC).
pub fn gemm_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (rows, inp) = x.dims2()?;
    let (out, w_in) = w.dims2()?;
    let eligible = rows > 0
        && out > 0
        && inp > 0
        && inp == w_in
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.device().is_cpu()
        && w.device().is_cpu()
        && kernel_for(Op::SmallMatmul, x, Mode::Inference) == Kernel::PaftCpu
        && x.is_contiguous()
        && w.is_contiguous()
        && !x.track_op()
        && !w.track_op();
    if !eligible {
        return Ok(None);
    }
    let y = with_f32(x, |xs| {
        with_f32(w, |ws| {
            assert!(xs.len() == rows * inp && ws.len() == out * inp);
            let mut y: Vec<f32> = Vec::with_capacity(rows * out);
            let threads = gemm_threads();
            let parallelism = if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: the assert bounds every read of xs (rows × inp, row-major) and ws (out ×
            // inp, row-major, read as its transpose); y has room for rows × out, row-major.
            unsafe {
                gemm::gemm(
                    rows,
                    out,
                    inp,
                    y.as_mut_ptr(),
                    1,
                    out as isize,
                    false,
                    xs.as_ptr(),
                    1,
                    inp as isize,
                    ws.as_ptr(),
                    inp as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                )
            };
            // SAFETY: gemm wrote each of the rows × out elements (read_dst false reads none).
            unsafe { y.set_len(rows * out) };
            Ok(y)
        })
    })?;
    Ok(Some(Tensor::from_vec(y, (rows, out), &Device::Cpu)?))
}

/// The threads candle gives its matrix products (RAYON_NUM_THREADS, else the physical cores),
/// read once: candle reads them again on every product, which re-reads /proc/cpuinfo on the
/// calling thread while the pool waits.
fn gemm_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// An output buffer shared by parallel tasks that each write their own, disjoint elements, which
/// `par_chunks_mut` cannot hand out: [`row_dots`]'s columns (a strided part of every row), the
/// attention kernel's blocks (every query head of a block of times).
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);

// SAFETY: the tasks write disjoint elements, and the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Every row of `xs` against every row of `w_rows`: the product of x row `i` and w row `j` goes
/// to `y[i·ld + j]`. Rows in blocks of 8 or 4, then 2, then 1, so no block repeats a row. The
/// caller checks the features (AVX2 and FMA; AVX-512VL when `wide`) and that `y` has room.
#[cfg(target_arch = "x86_64")]
unsafe fn fill_rows(
    xs: &[f32],
    rows: usize,
    w_rows: &[f32],
    inp: usize,
    (y, ld): (*mut f32, usize),
    wide: bool,
) {
    let mut m = 0;
    while m < rows {
        m += match (wide, rows - m) {
            (true, 8..) => fill_wide::<8, 3>(xs, m, w_rows, inp, y, ld),
            (true, 4..) => fill_wide::<4, 5>(xs, m, w_rows, inp, y, ld),
            (true, 2 | 3) => fill_wide::<2, 8>(xs, m, w_rows, inp, y, ld),
            (true, _) => fill_wide::<1, 12>(xs, m, w_rows, inp, y, ld),
            (false, 4..) => fill::<4, 2>(xs, m, w_rows, inp, y, ld),
            (false, 2 | 3) => fill::<2, 4>(xs, m, w_rows, inp, y, ld),
            (false, _) => fill::<1, 8>(xs, m, w_rows, inp, y, ld),
        };
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fill_rows(
    _xs: &[f32],
    _rows: usize,
    _w_rows: &[f32],
    _inp: usize,
    _y: (*mut f32, usize),
    _wide: bool,
) {
    unreachable!("avx2_fma() is false off x86-64")
}

/// `fn $name(args) -> ret` running `$body(args)` compiled for AVX-512VL, for AVX2 + FMA, or for
/// the baseline x86-64, whichever this CPU has. For loops the compiler vectorises itself: built
/// for the baseline they run on 4-lane SSE (profiled: 8% of a shared-shot evaluation in the
/// attention softmax). The body's operations and their order are the same on every path, so the
/// bits do not depend on the CPU.
macro_rules! per_cpu_features {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty => $body:path) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if $crate::model::small_matmul::avx512vl() {
                    // SAFETY: the CPU has the features `avx512` is compiled for (checked).
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::model::small_matmul::avx2_fma() {
                    // SAFETY: the CPU has the features `avx2` is compiled for (checked).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(super) use per_cpu_features;

pub(super) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512VL: 32 vector registers instead of 16, so a block can hold 24 accumulators, and
/// 16-lane products (`fill_wide`). One CPU always takes the same path, so a row's bits still do
/// not depend on the rows batched with it; they differ from an AVX2 CPU's in rounding.
pub(super) fn avx512vl() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Input rows `m..m + X` of `xs` against every weight row of `w_rows`, into `y` (row `i`'s
/// product with weight row `j` at `y[i·ld + j]`), `W` weight rows at a time: each weight
/// vector loaded serves `X` products and each input vector `W`, in `X·W = 8` independent
/// accumulators, so the loop is bound by the FMA units rather than by loads (one dot at a time
/// needs two loads per FMA) or by one accumulator's latency. Returns `X`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fill<const X: usize, const W: usize>(
    xs: &[f32],
    m: usize,
    w_rows: &[f32],
    inp: usize,
    y: *mut f32,
    ld: usize,
) -> usize {
    fill_body::<X, W, false>(xs, m, w_rows, inp, y, ld)
}

/// `fill` with 32 registers: blocks of up to 24 accumulators, so each weight vector loaded
/// serves up to 8 input rows and each input vector 3 weight rows. Measured: 24 GSM8K documents of
/// 256 generated tokens at 16 rows, alternating with `fill`, 63.2/56.4/55.9 s → 56.3/52.3/51.8 s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn fill_wide<const X: usize, const W: usize>(
    xs: &[f32],
    m: usize,
    w_rows: &[f32],
    inp: usize,
    y: *mut f32,
    ld: usize,
) -> usize {
    fill_body::<X, W, true>(xs, m, w_rows, inp, y, ld)
}

/// The loop of `fill` and `fill_wide` (`WIDE`: 16-lane products), inlined into each so the dot
/// products are compiled for the caller's registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fill_body<const X: usize, const W: usize, const WIDE: bool>(
    xs: &[f32],
    m: usize,
    w_rows: &[f32],
    inp: usize,
    y: *mut f32,
    ld: usize,
) -> usize {
    let xb: [&[f32]; X] = std::array::from_fn(|a| &xs[(m + a) * inp..(m + a + 1) * inp]);
    let n_out = w_rows.len() / inp;
    for j in (0..n_out).step_by(W) {
        let c = (n_out - j).min(W);
        // A partial block repeats its last weight row; those products are dropped.
        let wb = std::array::from_fn(|b| {
            let r = j + b.min(c - 1);
            &w_rows[r * inp..(r + 1) * inp]
        });
        let dots = if WIDE {
            dots_avx512::<X, W>(&xb, &wb)
        } else {
            dots_avx2::<X, W>(&xb, &wb)
        };
        for (a, row) in dots.iter().enumerate() {
            for (b, &d) in row.iter().enumerate().take(c) {
                *y.add((m + a) * ld + j + b) = d;
            }
        }
    }
    X
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fill_wide<const X: usize, const W: usize>(
    _xs: &[f32],
    _m: usize,
    _w_rows: &[f32],
    _inp: usize,
    _y: *mut f32,
    _ld: usize,
) -> usize {
    unreachable!("avx512vl() is false off x86-64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn fill<const X: usize, const W: usize>(
    _xs: &[f32],
    _m: usize,
    _w_rows: &[f32],
    _inp: usize,
    _y: *mut f32,
    _ld: usize,
) -> usize {
    unreachable!("avx2_fma() is false off x86-64")
}

/// `dots[a][b] = Σ x[a][i]·w[b][i]`. Each product has its own 8-lane FMA chain, reduced in a
/// fixed order, then a scalar tail: the same operations in whichever block it is computed, so a
/// row's result does not depend on the rows batched with it. Pointers advance by pointer
/// arithmetic: checked index arithmetic (the dev profile's overflow checks) kept the
/// accumulators on the stack.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dots_avx2<const X: usize, const W: usize>(
    x: &[&[f32]; X],
    w: &[&[f32]; W],
) -> [[f32; W]; X] {
    use std::arch::x86_64::*;
    let n = w[0].len();
    let mut acc = [[_mm256_setzero_ps(); W]; X];
    let mut px: [*const f32; X] = std::array::from_fn(|a| x[a].as_ptr());
    let mut pw: [*const f32; W] = std::array::from_fn(|b| w[b].as_ptr());
    for _ in 0..n / 8 {
        let mut wv = [_mm256_setzero_ps(); W];
        for b in 0..W {
            wv[b] = _mm256_loadu_ps(pw[b]);
        }
        for a in 0..X {
            let xv = _mm256_loadu_ps(px[a]);
            for b in 0..W {
                acc[a][b] = _mm256_fmadd_ps(xv, wv[b], acc[a][b]);
            }
            px[a] = px[a].add(8);
        }
        for p in pw.iter_mut() {
            *p = p.add(8);
        }
    }
    let done = n - n % 8;
    let mut dots = [[0f32; W]; X];
    for a in 0..X {
        for b in 0..W {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][b]);
            let mut total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            for k in done..n {
                total += x[a][k] * w[b][k];
            }
            dots[a][b] = total;
        }
    }
    dots
}

/// [`dots_avx2`] on 16-lane registers: twice the products per FMA, so a decode step's blocks
/// of up to 24 dot products are bound by reading the weights rather than by the FMA units.
/// Each product's 16 lanes are reduced in a fixed order, then a scalar tail: as in
/// `dots_avx2`, a row's result does not depend on the rows batched with it (it differs from
/// the 8-lane path's in rounding only).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
#[inline]
unsafe fn dots_avx512<const X: usize, const W: usize>(
    x: &[&[f32]; X],
    w: &[&[f32]; W],
) -> [[f32; W]; X] {
    use std::arch::x86_64::*;
    let n = w[0].len();
    let mut acc = [[_mm512_setzero_ps(); W]; X];
    let mut px: [*const f32; X] = std::array::from_fn(|a| x[a].as_ptr());
    let mut pw: [*const f32; W] = std::array::from_fn(|b| w[b].as_ptr());
    for _ in 0..n / 16 {
        let mut wv = [_mm512_setzero_ps(); W];
        for b in 0..W {
            wv[b] = _mm512_loadu_ps(pw[b]);
        }
        for a in 0..X {
            let xv = _mm512_loadu_ps(px[a]);
            for b in 0..W {
                acc[a][b] = _mm512_fmadd_ps(xv, wv[b], acc[a][b]);
            }
            px[a] = px[a].add(16);
        }
        for p in pw.iter_mut() {
            *p = p.add(16);
        }
    }
    let done = n - n % 16;
    let mut dots = [[0f32; W]; X];
    for a in 0..X {
        for b in 0..W {
            let mut total = _mm512_reduce_add_ps(acc[a][b]);
            for k in done..n {
                total += x[a][k] * w[b][k];
            }
            dots[a][b] = total;
        }
    }
    dots
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
        // 77 inputs: an 8-lane loop and a scalar tail.
        let w = Tensor::randn(0f32, 1.0, (300, 77), &dev).unwrap();
        for rows in 1..=super::max_rows() {
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
    fn the_gemm_path_gives_candles_matmul_bits() {
        let dev = Device::Cpu;
        // Row counts on both sides of gemm's serial left-operand prepacking (up to 1,024 rows),
        // an odd weight count and an odd inner size.
        let w = Tensor::randn(0f32, 1.0, (131, 77), &dev).unwrap();
        for rows in [1, 33, 64, 700, 1100] {
            // A freed buffer of garbage first, so an element gemm did not write shows.
            drop(Tensor::full(f32::NAN, (rows, 131), &dev).unwrap());
            let x = Tensor::randn(0f32, 1.0, (rows, 77), &dev).unwrap();
            let got = super::gemm_t(&x, &w).unwrap().expect("f32 on the CPU");
            let want = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|v| v.to_bits()).collect()
            };
            assert_eq!(bits(&got), bits(&want), "rows {rows}");
        }
        let x = Tensor::randn(0f32, 1.0, (4, 77), &dev).unwrap();
        let tracked = Var::from_tensor(&w).unwrap();
        assert!(
            super::gemm_t(&x, tracked.as_tensor()).unwrap().is_none(),
            "a graph needs candle's op"
        );
    }

    #[test]
    fn a_row_gets_the_same_bits_whatever_it_is_batched_with() {
        let dev = Device::Cpu;
        // Odd counts of weight rows and of inputs (partial blocks of 2, 4 and 8 weight rows),
        // input rows in blocks of 4, 2 and 1, an 8-lane loop and a scalar tail.
        let w = Tensor::randn(0f32, 1.0, (131, 67), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (11, 67), &dev).unwrap();
        let Some(all) = super::matmul_t(&x, &w).unwrap() else {
            return;
        };
        let bits = crate::model::tiny::f32_bits;
        for (m, len) in [
            (0, 1),
            (4, 1),
            (8, 1),
            (10, 1),
            (3, 2),
            (5, 3),
            (1, 8),
            (2, 9),
        ] {
            let part = super::matmul_t(&x.narrow(0, m, len).unwrap(), &w)
                .unwrap()
                .unwrap();
            let same = all.narrow(0, m, len).unwrap();
            assert_eq!(bits(&part), bits(&same), "rows {m}..{}", m + len);
        }
    }

    #[test]
    fn both_register_widths_are_batch_invariant_and_agree_within_rounding() {
        if !super::avx512vl() {
            eprintln!("SKIPPED: no AVX-512VL here, only the AVX2 blocks run");
            return;
        }
        let dev = Device::Cpu;
        // 131 weight rows: partial blocks of 3, 5, 8 and 12; 83 inputs: 16- and 8-lane loops
        // and a scalar tail on both paths.
        let w = Tensor::randn(0f32, 1.0, (131, 83), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (super::max_rows(), 83), &dev).unwrap();
        let bits = |x: &Tensor, wide: bool| -> Vec<u32> {
            let y = super::row_dots(x, &w, wide).unwrap().unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            y.iter().map(|v| v.to_bits()).collect()
        };
        for wide in [false, true] {
            let all = bits(&x, wide);
            for (m, len) in [(0, 1), (3, 2), (5, 3), (9, 4), (2, 8), (7, 9), (1, 31)] {
                let part = bits(&x.narrow(0, m, len).unwrap(), wide);
                assert_eq!(
                    part,
                    all[m * 131..(m + len) * 131],
                    "wide {wide}: rows {m}..+{len}"
                );
            }
        }
        let narrow = super::row_dots(&x, &w, false).unwrap().unwrap();
        let wide = super::row_dots(&x, &w, true).unwrap().unwrap();
        assert!(max_rel_diff(&wide, &narrow) < 1e-5);
        let want = x.matmul(&w.t().unwrap()).unwrap();
        assert!(max_rel_diff(&wide, &want) < 1e-5);
    }

    #[test]
    fn declines_what_it_cannot_do_so_the_caller_falls_back() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 8), &dev).unwrap();
        let many = Tensor::randn(0f32, 1.0, (super::max_rows() + 1, 8), &dev).unwrap();
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
