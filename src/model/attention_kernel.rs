//! Inference attention as one CPU kernel: for each (row, KV head, block of query times) the
//! scores `Q·Kᵀ`, mask, softmax and `P·V` of all the KV head's query heads at those times are
//! computed in a cache-sized scratch buffer, and keys that every query of the block is masked
//! from (the causal upper triangle) are skipped.
//!
//! The composed version materialises scores, masked scores and probabilities at
//! `b × heads × t × T` in f32 (38 MB each per layer at batch 4 × 512 tokens), which makes
//! prefill memory-bound and computes the masked half of the scores for nothing.

use anyhow::Result;
use candle_core::{Device, Storage, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

use super::small_matmul::{per_cpu_features, OutPtr};

/// Query rows per task (at most, unless one time step's heads are more): every query head of a
/// KV head at a block of times, so that they share one packing of the block's keys and values by
/// gemm (a block used to be 64 rows of one head, and each of a KV head's query heads repacked
/// them). With SmolLM2's 3 heads per KV head that is 64 times, whose scores at 1k keys are
/// 0.8 MB, within L2. A 1,042-token prefill's attention, 2 cores: 0.23 → 0.21 s.
const BLOCK_ROWS: usize = 192;

/// A key whose mask is at or below this is invisible (the masks use -1e30, or -65504 in f16).
const MASKED: f32 = -6e4;

/// `softmax(q·kᵀ + mask)·v` for `q (b, g, r, d)` (already scaled; the `r` rows of a KV head are
/// its `r / t` query heads stacked along time, so row `i` is query head `i / t` at time
/// `i % t`), `k, v (b, g, T, d)` and an additive `mask (b|1, 1, 1, t, T)`, as `(b, t, g·(r/t)·d)`:
/// each time step's heads side by side, the layout the output projection reads (written so by
/// the kernel, which saves the transposing copy). `None` when the inputs are not f32 on the CPU;
/// the caller then uses the composed ops.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    t: usize,
) -> Result<Option<Tensor>> {
    let (b, g, r, d) = q.dims4()?;
    let Some(parts) = attention_parts(q, k, v, mask, Some(t), Layout::TimeMajor)? else {
        return Ok(None);
    };
    Ok(Some(Tensor::from_vec(
        parts.out,
        (b, t, g * (r / t) * d),
        &Device::Cpu,
    )?))
}

/// Softmax-normalised outputs and each query row's log-sum-exp of its (masked) scores `(b, g,
/// r)`, which is what combining two attentions over disjoint keys needs.
pub(super) struct Parts {
    pub(super) out: Vec<f32>,
    pub(super) lse: Vec<f32>,
}

/// How [`Parts::out`] is laid out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    /// `(b, g, r, d)`, as the queries.
    HeadMajor,
    /// `(b, t, g, r / t, d)`.
    TimeMajor,
}

/// [`attention`]'s work, keeping the log-sum-exps; `None` as there. `t` is the query time steps
/// (default: the mask's, else `r`: one query head).
pub(super) fn attention_parts(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    t: Option<usize>,
    layout: Layout,
) -> Result<Option<Parts>> {
    let all_f32_cpu = [Some(q), Some(k), Some(v), mask]
        .into_iter()
        .flatten()
        .all(|x| x.dtype() == candle_core::DType::F32 && x.device().is_cpu());
    if !all_f32_cpu {
        return Ok(None);
    }
    let (b, g, r, d) = q.dims4()?;
    let total = k.dim(2)?;
    let t = match (t, mask) {
        (Some(t), _) => t,
        (None, Some(m)) => m.dim(3)?,
        (None, None) => r,
    };
    if t == 0
        || r % t != 0
        || mask.is_some_and(|m| m.dim(3).ok() != Some(t))
        || k.dims4()? != (b, g, total, d)
        || v.dims4()? != (b, g, total, d)
    {
        anyhow::bail!(
            "attention kernel: q {:?}, k {:?}, v {:?}, mask {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.map(|m| m.dims().to_vec())
        );
    }
    // K and V are usually a KV cache's filled part: a narrow of a buffer with spare time steps,
    // read in place (copying them would cost a whole cache per layer and decode step).
    let (k, v) = (time_strided(k)?, time_strided(v)?);
    let (k_stride, v_stride) = (kv_time_stride(&k)?, kv_time_stride(&v)?);
    if k_stride != v_stride {
        // Dense copies have the same stride (T), so this recurses once.
        let (k, v) = (k.force_contiguous()?, v.force_contiguous()?);
        return attention_parts(q, &k, &v, mask, Some(t), layout);
    }
    let q = q.contiguous()?;
    let mask = mask.map(|m| m.contiguous()).transpose()?;
    let mask_rows = mask.as_ref().map_or(Ok(0), |m| m.dim(0))?;
    with_f32(&q, |qs| {
        with_f32_from_start(&k, |ks| {
            with_f32_from_start(&v, |vs| {
                let shape = Shape {
                    b,
                    g,
                    r,
                    t,
                    total,
                    d,
                    kv_stride: k_stride,
                    layout,
                };
                let parts = match &mask {
                    Some(m) => with_f32(m, |ms| {
                        let visible = visible_runs_of(m, ms, mask_rows * t, total);
                        let mask = MaskRows {
                            values: ms,
                            rows: mask_rows,
                            visible: &visible,
                        };
                        Ok(run(&shape, qs, ks, vs, Some(mask)))
                    })?,
                    None => run(&shape, qs, ks, vs, None),
                };
                Ok(Some(parts))
            })
        })
    })
}

/// Elements from one (row, KV head) block of `x (b, g, T, d)` to the next, when each block is a
/// contiguous run of `T·d` values and the blocks sit at one fixed stride (a contiguous tensor,
/// or a narrow along time of a contiguous buffer). Strides of size-1 dimensions are arbitrary
/// in candle (a "contiguous" tensor may carry any), so only the dimensions that index more than
/// one block count.
fn block_stride(x: &Tensor) -> Result<Option<usize>> {
    let (b, g, t, d) = x.dims4()?;
    let st = x.stride();
    let dense_block = (d <= 1 || st[3] == 1) && (t <= 1 || st[2] == d);
    let stride = match (b > 1, g > 1) {
        (_, true) => st[1],
        (true, false) => st[0],
        (false, false) => t * d,
    };
    let fixed = !(b > 1 && g > 1) || st[0] == g * st[1];
    Ok(
        (dense_block && fixed && stride >= t * d && d > 0 && stride.is_multiple_of(d))
            .then_some(stride),
    )
}

/// `x` itself when its blocks are at a fixed stride ([`block_stride`]), else a dense copy.
fn time_strided(x: &Tensor) -> Result<Tensor> {
    Ok(match block_stride(x)? {
        Some(_) => x.clone(),
        None => x.force_contiguous()?,
    })
}

/// Time steps between consecutive (row, head) blocks of a [`time_strided`] tensor.
fn kv_time_stride(x: &Tensor) -> Result<usize> {
    let d = x.dim(3)?;
    let stride =
        block_stride(x)?.ok_or_else(|| anyhow::anyhow!("K/V blocks not at a fixed stride"))?;
    Ok(stride / d)
}

/// `f` on the elements of a [`time_strided`] tensor from its first block's start to its last
/// block's end.
fn with_f32_from_start<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (b, g, total, d) = x.dims4()?;
    let stride =
        block_stride(x)?.ok_or_else(|| anyhow::anyhow!("K/V blocks not at a fixed stride"))?;
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        anyhow::bail!("attention kernel: tensor not on the CPU");
    };
    let start = layout.start_offset();
    let end = start + (b * g).saturating_sub(1) * stride + total * d;
    f(&cpu.as_slice::<f32>()?[start..end])
}

#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    g: usize,
    r: usize,
    t: usize,
    total: usize,
    d: usize,
    /// Time steps from one (row, KV head) block of K/V to the next (`total` when contiguous).
    kv_stride: usize,
    layout: Layout,
}

/// `f` on the f32 elements of a contiguous CPU tensor, in place (the hand-written kernels
/// read candle's storage directly rather than copying it out).
pub(crate) fn with_f32<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        anyhow::bail!("hand-written kernel: tensor not on the CPU");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| anyhow::anyhow!("hand-written kernel: tensor not contiguous"))?;
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// Each mask row's visible keys as runs `[start, end)` in order: row `i`'s are
/// `runs[starts[i]..starts[i + 1]]`. A row that sees no key keeps all of them (its softmax is
/// uniform, as in the composed version).
struct VisibleRuns {
    runs: Vec<(usize, usize)>,
    starts: Vec<usize>,
}

impl VisibleRuns {
    fn of(mask: &[f32], rows: usize, total: usize) -> Self {
        let mut runs = vec![];
        let mut starts = Vec::with_capacity(rows + 1);
        for row in mask.chunks(total.max(1)).take(rows) {
            starts.push(runs.len());
            let mut open = None;
            for (j, &m) in row.iter().enumerate() {
                match (m > MASKED, open) {
                    (true, None) => open = Some(j),
                    (false, Some(a)) => {
                        runs.push((a, j));
                        open = None;
                    }
                    _ => {}
                }
            }
            if let Some(a) = open {
                runs.push((a, total));
            }
            if runs.len() == starts[starts.len() - 1] {
                runs.push((0, total));
            }
        }
        starts.push(runs.len());
        Self { runs, starts }
    }

    fn row(&self, i: usize) -> &[(usize, usize)] {
        &self.runs[self.starts[i]..self.starts[i + 1]]
    }
}

/// [`VisibleRuns`] of `mask`, once per mask tensor: every layer of a forward gets the same
/// mask, and the scan reads all of it (half a millisecond per layer at 1k tokens, 7% of the
/// attention; eight times that for a batch of eight left-padded rows). A tensor's id is never
/// reused and a mask is not written after it is built, so the id identifies the values.
fn visible_runs_of(mask: &Tensor, values: &[f32], rows: usize, total: usize) -> Arc<VisibleRuns> {
    type Last = Option<(candle_core::TensorId, Arc<VisibleRuns>)>;
    static LAST: Mutex<Last> = Mutex::new(None);
    let lock = || LAST.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((id, visible)) = &*lock() {
        if *id == mask.id() && visible.starts.len() == rows + 1 {
            return visible.clone();
        }
    }
    let visible = Arc::new(VisibleRuns::of(values, rows, total));
    *lock() = Some((mask.id(), visible.clone()));
    visible
}

/// Masked keys between two visible runs of a block that are computed anyway rather than
/// splitting the block's products there (a split costs a gemm call and its packing).
const GAP: usize = 32;

/// The keys some query of a block sees, as sorted disjoint spans: the union of its rows' runs,
/// with gaps of up to [`GAP`] keys filled in.
fn block_spans<'a>(rows: impl Iterator<Item = &'a [(usize, usize)]>) -> Vec<(usize, usize)> {
    let mut all: Vec<(usize, usize)> = rows.flatten().copied().collect();
    all.sort_unstable();
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(all.len());
    for (a, b) in all {
        match spans.last_mut() {
            Some(last) if a <= last.1 + GAP => last.1 = last.1.max(b),
            _ => spans.push((a, b)),
        }
    }
    spans
}

/// An additive mask `(rows, 1, 1, t, T)` as the kernel reads it, with each row's
/// [`VisibleRuns`].
struct MaskRows<'a> {
    values: &'a [f32],
    rows: usize,
    visible: &'a VisibleRuns,
}

fn run(s: &Shape, q: &[f32], k: &[f32], v: &[f32], mask: Option<MaskRows>) -> Parts {
    let Shape {
        b,
        g,
        r,
        t,
        total,
        d,
        kv_stride,
        layout,
    } = *s;
    let mask_rows = mask.as_ref().map_or(0, |m| m.rows);
    let heads = r / t;
    // Time steps per task: all query heads of the KV head at those times go in one block, so
    // they share one packing of the block's keys and values.
    let span_t = (BLOCK_ROWS / heads).max(1).min(t);
    let blocks = t.div_ceil(span_t);
    let mut out = vec![0f32; b * g * r * d];
    let mut lse = vec![0f32; b * g * r];
    let (out_ptr, lse_ptr) = (OutPtr(out.as_mut_ptr()), OutPtr(lse.as_mut_ptr()));
    (0..b * g * blocks).into_par_iter().for_each(|task| {
        let (head, blk) = (task / blocks, task % blocks);
        let bi = head / g;
        let q_head = &q[head * r * d..(head + 1) * r * d];
        let kv = head * kv_stride * d..(head * kv_stride + total) * d;
        let (k_head, v_head) = (&k[kv.clone()], &v[kv]);
        let mask_base = if mask_rows == 1 { 0 } else { bi * t };
        let t0 = blk * span_t;
        let n_t = span_t.min(t - t0);
        let rows = heads * n_t;
        // Block row `i` is query head `i / n_t` at time `t0 + i % n_t`.
        let head_row = |i: usize| (i / n_t) * t + t0 + i % n_t;
        // Only the keys some query of the block sees: the causal upper triangle, and in a
        // packed forward the other sequences' keys, are left out (their probabilities would be
        // exactly 0). A block's spans are the prefix or context every sequence sees and its
        // own sequence's keys; without them a packed forward's late sequences computed the
        // scores of every earlier sequence's keys.
        let spans = match &mask {
            Some(m) => block_spans((t0..t0 + n_t).map(|time| m.visible.row(mask_base + time))),
            None => vec![(0, total)],
        };
        let cols: usize = spans.iter().map(|(a, b)| b - a).sum();
        let masks: Vec<&[f32]> = match &mask {
            Some(m) => (0..rows)
                .map(|i| &m.values[(mask_base + t0 + i % n_t) * total..][..total])
                .collect(),
            None => vec![],
        };
        with_scratch(rows * (2 * d + cols + 1), |scratch| {
            let (q_blk, rest) = scratch.split_at_mut(rows * d);
            let (scores, rest) = rest.split_at_mut(rows * cols);
            let (out_blk, lse_blk) = rest.split_at_mut(rows * d);
            for i in 0..rows {
                let src = head_row(i) * d;
                q_blk[i * d..(i + 1) * d].copy_from_slice(&q_head[src..src + d]);
            }
            // scores = Q_block · K[span]ᵀ for each span side by side: K's rows read as columns.
            let mut col = 0;
            for &(lo, hi) in &spans {
                let dst = Dst {
                    data: &mut scores[col..],
                    row_stride: cols,
                    accumulate: false,
                };
                matmul(dst, rows, hi - lo, d, (q_blk, d), (d, 1), &k_head[lo * d..]);
                col += hi - lo;
            }
            let norm = exp_rows(scores, cols, &masks, &spans, lse_blk);
            // out = Σ over spans of P[:, span's columns] · V[span].
            let mut col = 0;
            for (n, &(lo, hi)) in spans.iter().enumerate() {
                let dst = Dst {
                    data: &mut *out_blk,
                    row_stride: d,
                    accumulate: n > 0,
                };
                matmul(
                    dst,
                    rows,
                    d,
                    hi - lo,
                    (&scores[col..], cols),
                    (1, d),
                    &v_head[lo * d..],
                );
                col += hi - lo;
            }
            scale_rows(out_blk, d, &norm);
            for i in 0..rows {
                let row = head * r + head_row(i);
                let out_row = match layout {
                    Layout::HeadMajor => row,
                    Layout::TimeMajor => ((bi * t + t0 + i % n_t) * g + head % g) * heads + i / n_t,
                };
                // SAFETY: each (head, query row) belongs to exactly one task's block, so the
                // tasks write disjoint rows of `out` and `lse`, which outlive them.
                unsafe {
                    let dst = out_ptr.get().add(out_row * d);
                    std::ptr::copy_nonoverlapping(out_blk[i * d..].as_ptr(), dst, d);
                    *lse_ptr.get().add(row) = lse_blk[i];
                }
            }
        });
    });
    Parts { out, lse }
}

/// Where a product goes: row `i` of the `m × n` result at `data[i·row_stride..][..n]`, added to
/// what is there when `accumulate`.
struct Dst<'a> {
    data: &'a mut [f32],
    row_stride: usize,
    accumulate: bool,
}

/// `dst (m × n) (+)= lhs (m × k) · rhs`: row `i` of the left-hand side is
/// `lhs.0[i·lhs.1..][..k]`, and element (i, j) of the `k × n` right-hand side is
/// `rhs[i·rs + j·cs]` for `(cs, rs) = rhs_strides`; single-threaded (the caller parallelises
/// over blocks).
fn matmul(
    dst: Dst,
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], usize),
    rhs_strides: (usize, usize),
    rhs: &[f32],
) {
    let (cs, rs) = rhs_strides;
    let ((lhs, lhs_rs), dst_rs) = (lhs, dst.row_stride);
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.data.len() >= (m - 1) * dst_rs + n && n <= dst_rs);
    assert!(k == 0 || lhs.len() >= (m - 1) * lhs_rs + k);
    assert!(k == 0 || rhs.len() > (k - 1) * rs + (n - 1) * cs);
    // SAFETY: the asserts above keep every element gemm reads or writes inside its slice.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst_rs as isize,
            dst.accumulate,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            cs as isize,
            rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// Lanes of the reductions below: sixteen independent accumulators let the compiler vectorise
/// them (a single running max or sum is a serial chain of dependent float ops).
pub(super) const LANES: usize = 16;

/// `f` on a scratch buffer of `len` floats of this thread, reused from call to call (a fresh
/// block of scores per (row, head, block) was zeroed and often page-faulted in). Its contents
/// are whatever the last use left; `f` must write before it reads.
fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [f32]) -> T) -> T {
    use std::cell::RefCell;
    thread_local! {
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Re-entered on this thread (a nested parallel task ran here while the outer one waits):
        // a buffer of its own.
        Err(_) => f(&mut vec![0f32; len]),
    })
}

per_cpu_features! {
    /// The softmax of each `cols`-wide row of `scores` after adding its additive mask row
    /// (`masks` empty: no mask), left unnormalised: each row ← e^(row − max), its log-sum-exp
    /// written to `lse`; returns each row's 1/sum, which [`scale_rows`] applies to the row's
    /// `P·V` (d values instead of `cols`). A row's columns are the keys of `spans` side by side;
    /// its mask row covers all keys.
    pub(super) fn exp_rows(
        scores: &mut [f32],
        cols: usize,
        masks: &[&[f32]],
        spans: &[(usize, usize)],
        lse: &mut [f32],
    ) -> Vec<f32> => exp_rows_body
}

#[inline(always)]
fn exp_rows_body(
    scores: &mut [f32],
    cols: usize,
    masks: &[&[f32]],
    spans: &[(usize, usize)],
    lse: &mut [f32],
) -> Vec<f32> {
    // A plain loop: `map(..).collect()` would run the row loop in `Vec::from_iter`, compiled for
    // the baseline CPU rather than the caller's features.
    let mut norm = Vec::with_capacity(lse.len());
    for (i, (row, lse)) in scores.chunks_mut(cols).zip(lse.iter_mut()).enumerate() {
        if let Some(mask) = masks.get(i) {
            let mut col = 0;
            for &(lo, hi) in spans {
                for (x, &m) in row[col..col + hi - lo].iter_mut().zip(&mask[lo..hi]) {
                    *x += m;
                }
                col += hi - lo;
            }
        }
        let (max, sum) = exp_shifted_in_place(row);
        *lse = max + sum.ln();
        norm.push(1.0 / sum);
    }
    norm
}

/// Each `d`-wide row of `out` times its factor.
pub(super) fn scale_rows(out: &mut [f32], d: usize, factors: &[f32]) {
    for (row, &f) in out.chunks_mut(d).zip(factors) {
        row.iter_mut().for_each(|x| *x *= f);
    }
}

/// The maximum of `row`, NaNs skipped. Explicit vector instructions: written as independent
/// lanes, the compiler kept the comparisons scalar (profiled: about half of the attention
/// softmax's time). The maximum is exact, so every path gives the same value.
#[inline]
pub(super) fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        use super::small_matmul::{avx2_fma, avx512vl};
        if avx512vl() {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { row_max_avx512(row) };
        }
        if avx2_fma() {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { row_max_avx2(row) };
        }
    }
    max_skipping_nan(f32::NEG_INFINITY, row)
}

/// `max(acc, row…)` one element at a time: a NaN never replaces the running maximum, as the
/// vector instructions' `max(x, acc)` (which returns `acc` when `x` is NaN).
#[inline(always)]
fn max_skipping_nan(acc: f32, row: &[f32]) -> f32 {
    row.iter().fold(acc, |m, &x| if x > m { x } else { m })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_max_avx512(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut chunks = row.chunks_exact(16);
    let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in &mut chunks {
        // SAFETY: `c` holds 16 floats; the load is unaligned.
        acc = _mm512_max_ps(unsafe { _mm512_loadu_ps(c.as_ptr()) }, acc);
    }
    max_skipping_nan(_mm512_reduce_max_ps(acc), chunks.remainder())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_max_avx2(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut chunks = row.chunks_exact(8);
    let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in &mut chunks {
        // SAFETY: `c` holds 8 floats; the load is unaligned.
        acc = _mm256_max_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, acc);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    max_skipping_nan(
        max_skipping_nan(f32::NEG_INFINITY, &lanes),
        chunks.remainder(),
    )
}

/// `row ← e^(row − max(row))`; returns the max and the new sum.
#[inline(always)]
fn exp_shifted_in_place(row: &mut [f32]) -> (f32, f32) {
    let max = row_max(row);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, x) in sums.iter_mut().zip(c) {
            *x = exp(*x - max);
            *s += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    (max, sum)
}

/// e^x for x ≤ 0 to within 3e-7 relative, branch-free so the softmax loop vectorises (libm's
/// `expf` is a call per element); e^x for x < -87 (masked keys) is 0.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    // Cephes' expf: e^x = 2^n · e^r with n = round(x / ln 2) and r = x − n·ln 2 in two parts
    // (so r keeps its precision), e^r by a degree-7 polynomial on [−ln 2 / 2, ln 2 / 2].
    // Adding and subtracting 1.5·2^23 rounds to nearest without a libm call.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.max(-87.0);
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // n as an integer, read from the mantissa of `shifted` (a saturating `as i32` and checked
    // integer adds would keep the loop scalar).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        er * scale
    }
}

#[cfg(test)]
pub(super) mod tests {
    use candle_core::{DType, Device, Tensor, D};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// `(b, g, r, d)` with `r / t` heads per KV head as the kernel writes it: `(b, t, g·(r/t)·d)`.
    pub(crate) fn by_time(x: &Tensor, t: usize) -> Tensor {
        let (b, g, r, d) = x.dims4().unwrap();
        x.reshape((b, g * (r / t), t, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, g * (r / t) * d))
            .unwrap()
    }

    /// The composed reference: softmax(q·kᵀ + mask)·v.
    pub(crate) fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let (b, g, r, _) = q.dims4().unwrap();
        let total = k.dim(2).unwrap();
        let t = mask.map_or(r, |m| m.dim(3).unwrap());
        let scores = q
            .matmul(&k.t().unwrap())
            .unwrap()
            .reshape((b, g, r / t, t, total))
            .unwrap();
        let scores = match mask {
            Some(m) => scores.broadcast_add(m).unwrap(),
            None => scores,
        };
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        probs.reshape((b, g, r, total)).unwrap().matmul(v).unwrap()
    }

    /// Mask rows `(b|1, 1, 1, t, T)`: query i (at absolute position prev + i) sees keys at
    /// positions ≤ its own that are not in `hidden` (left padding) for that batch row.
    pub(crate) fn mask(rows: &[Vec<usize>], t: usize, total: usize) -> Tensor {
        let mut data = vec![];
        for hidden in rows {
            for i in 0..t {
                let qp = total - t + i;
                for j in 0..total {
                    let visible = j <= qp && !hidden.contains(&j);
                    data.push(if visible { 0f32 } else { -1e30 });
                }
            }
        }
        Tensor::from_vec(data, (rows.len(), 1, 1, t, total), &Device::Cpu).unwrap()
    }

    fn check(b: usize, g: usize, n_rep: usize, t: usize, total: usize, m: Option<Tensor>) {
        let d = 16;
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (b, g, n_rep * t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, g, total, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, g, total, d), &dev).unwrap();
        let got = super::attention(&q, &k, &v, m.as_ref(), t)
            .unwrap()
            .unwrap();
        let want = by_time(&composed(&q, &k, &v, m.as_ref()), t);
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff < 1e-5,
            "b{b} g{g} rep{n_rep} t{t} T{total}: max |Δ| {diff}"
        );
    }

    #[test]
    fn matches_composed_attention() {
        // Causal prefill over more rows than one block, shared by every row.
        check(2, 3, 3, 150, 150, Some(mask(&[vec![]], 150, 150)));
        // Left padding per row (a query that sees no key gets the uniform row).
        check(
            2,
            1,
            2,
            70,
            70,
            Some(mask(&[vec![0, 1, 2], vec![]], 70, 70)),
        );
        // Continuations after a cached prefix of 40 keys.
        check(
            3,
            2,
            1,
            5,
            45,
            Some(mask(&[vec![], vec![7], vec![]], 5, 45)),
        );
        // Decoding with every key visible: no mask.
        check(2, 2, 4, 1, 33, None);
        // A sequence packed after another's 100 keys: its later blocks read only its own span.
        let packed: Vec<usize> = (0..100).collect();
        check(1, 2, 2, 150, 150, Some(mask(&[packed], 150, 150)));
    }

    /// Mask `(1, 1, 1, t, prefix + t)` of sequences packed after a prefix every one sees: the
    /// query at packed time `i` sees the prefix and its own sequence's keys up to its own.
    fn packed_after_prefix(prefix: usize, lens: &[usize]) -> Tensor {
        let t: usize = lens.iter().sum();
        let mut data = vec![];
        let mut start = 0;
        for &len in lens {
            for i in start..start + len {
                for j in 0..prefix + t {
                    let visible = j < prefix || (start..=i).contains(&(j - prefix));
                    data.push(if visible { 0f32 } else { -1e30 });
                }
            }
            start += len;
        }
        Tensor::from_vec(data, (1, 1, 1, t, prefix + t), &Device::Cpu).unwrap()
    }

    #[test]
    fn sequences_packed_after_a_prefix_see_the_prefix_and_their_own_keys() {
        // Blocks that straddle sequences, sequences shorter and longer than a block, gaps
        // shorter and longer than the one filled in.
        let lens = [90, 7, 20, 150, 64, 3];
        let t: usize = lens.iter().sum();
        for prefix in [0, 1, 40, 300] {
            check(
                1,
                2,
                3,
                t,
                prefix + t,
                Some(packed_after_prefix(prefix, &lens)),
            );
        }
    }

    #[test]
    fn a_block_reads_the_union_of_its_rows_visible_runs() {
        let m = packed_after_prefix(100, &[50, 80, 10]);
        let values = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let runs = super::VisibleRuns::of(&values, 140, 240);
        assert_eq!(runs.row(0), &[(0, 101)]);
        assert_eq!(runs.row(60), &[(0, 100), (150, 161)]);
        assert_eq!(runs.row(139), &[(0, 100), (230, 240)]);
        // Times 60..70 of the second sequence: the prefix and its own keys, not the first's 50.
        let rows = (60..70).map(|i| runs.row(i));
        assert_eq!(super::block_spans(rows), vec![(0, 100), (150, 170)]);
        // The last sequence's block skips both earlier ones.
        let rows = (130..140).map(|i| runs.row(i));
        assert_eq!(super::block_spans(rows), vec![(0, 100), (230, 240)]);
        // Runs of different rows (a trunk's two branches) merge across a gap of at most GAP
        // keys, not across a longer one.
        let branches: [&[(usize, usize)]; 3] = [
            &[(0, 100), (140, 150)],
            &[(0, 100), (160, 170)],
            &[(0, 100), (170 + super::GAP + 1, 300)],
        ];
        assert_eq!(
            super::block_spans(branches.into_iter()),
            vec![(0, 100), (140, 170), (170 + super::GAP + 1, 300)]
        );
        // A row that sees nothing keeps every key.
        let none = super::VisibleRuns::of(&[-1e30; 4], 1, 4);
        assert_eq!(none.row(0), &[(0, 4)]);
    }

    /// The visible prefixes are kept per mask tensor: masks of one shape in turn, and the first
    /// again, each give their own result.
    #[test]
    fn masks_of_one_shape_in_turn_each_give_their_own_result() {
        let (b, g, t, total, d) = (2, 1, 6, 10, 8);
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (b, g, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, g, total, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, g, total, d), &dev).unwrap();
        let masks = [
            mask(&[vec![], vec![]], t, total),
            // The last keys hidden for the first row (its visible prefix is shorter).
            mask(&[vec![9, 8, 7, 6], vec![0]], t, total),
        ];
        for m in [&masks[0], &masks[1], &masks[0], &masks[1]] {
            let got = super::attention(&q, &k, &v, Some(m), t).unwrap().unwrap();
            let want = by_time(&composed(&q, &k, &v, Some(m)), t);
            assert!(max_abs_diff(&got, &want) < 1e-5);
        }
    }

    #[test]
    fn reads_a_cache_with_spare_capacity_in_place_with_the_same_result() {
        // K/V as a KV cache holds them: 45 filled time steps of a 64-step buffer.
        let (b, g, t, total, cap, d) = (3, 2, 5, 45, 64, 16);
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (b, g, 2 * t, d), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (b, g, cap, d), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, g, cap, d), &dev).unwrap();
        let (k, v) = (
            kbuf.narrow(2, 0, total).unwrap(),
            vbuf.narrow(2, 0, total).unwrap(),
        );
        assert!(!k.is_contiguous());
        let m = mask(&[vec![], vec![3], vec![]], t, total);
        let strided = super::attention(&q, &k, &v, Some(&m), t).unwrap().unwrap();
        let (kc, vc) = (k.contiguous().unwrap(), v.contiguous().unwrap());
        let copied = super::attention(&q, &kc, &vc, Some(&m), t)
            .unwrap()
            .unwrap();
        let same = strided
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(copied.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "in-place and copied K/V must give identical bits");
        // K contiguous, V strided: still correct.
        let mixed = super::attention(&q, &kc, &v, Some(&m), t).unwrap().unwrap();
        assert_eq!(max_abs_diff(&mixed, &copied), 0.0);
    }

    /// Every vector path gives the scalar maximum, NaNs skipped, at lengths around the vector
    /// widths.
    #[test]
    fn row_max_skips_nans_and_agrees_on_every_path() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 33, 100, 1042] {
            let mut row: Vec<f32> = (0..len).map(|_| rng.random_range(-50.0..50.0)).collect();
            for i in (0..len).step_by(5) {
                row[i] = f32::NAN;
            }
            if len > 3 {
                row[3] = f32::NEG_INFINITY;
            }
            let want = super::max_skipping_nan(f32::NEG_INFINITY, &row);
            assert!(!want.is_nan());
            assert_eq!(super::row_max(&row).to_bits(), want.to_bits(), "len {len}");
            #[cfg(target_arch = "x86_64")]
            {
                use crate::model::small_matmul::{avx2_fma, avx512vl};
                if avx2_fma() {
                    // SAFETY: the CPU has AVX2 (checked).
                    let got = unsafe { super::row_max_avx2(&row) };
                    assert_eq!(got.to_bits(), want.to_bits(), "AVX2, len {len}");
                }
                if avx512vl() {
                    // SAFETY: the CPU has AVX-512F (checked).
                    let got = unsafe { super::row_max_avx512(&row) };
                    assert_eq!(got.to_bits(), want.to_bits(), "AVX-512, len {len}");
                }
            }
        }
        assert_eq!(super::row_max(&[f32::NAN; 20]), f32::NEG_INFINITY);
    }

    #[test]
    fn exp_is_accurate_where_softmax_uses_it() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((super::exp(x) as f64) - want).abs() / want);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(super::exp(-1e30), 0.0);
        assert_eq!(super::exp(0.0), 1.0);
    }

    /// One KV head: candle calls a transposed `(b, T, 1, d)` tensor contiguous whatever its
    /// size-1 dimension's stride, which the kernel must not read as the block stride (it once
    /// recursed forever on such a V).
    #[test]
    fn one_kv_head_with_any_size_one_stride() {
        let dev = Device::Cpu;
        for b in [1, 2] {
            let q = Tensor::randn(0f32, 1.0, (b, 1, 6, 8), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, 1, 6, 8), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, 6, 1, 8), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            assert!(v.is_contiguous(), "candle ignores the size-1 stride");
            let m = mask(&[vec![], vec![2]][..b], 6, 6);
            let got = super::attention(&q, &k, &v, Some(&m), 6).unwrap().unwrap();
            let want = by_time(
                &composed(&q, &k, &v.force_contiguous().unwrap(), Some(&m)),
                6,
            );
            assert!(max_abs_diff(&got, &want) < 1e-5, "batch {b}");
        }
    }

    #[test]
    fn leaves_other_dtypes_to_the_composed_ops() {
        let x = Tensor::zeros((1, 1, 4, 8), DType::F64, &Device::Cpu).unwrap();
        assert!(super::attention(&x, &x, &x, None, 4).unwrap().is_none());
    }
}
