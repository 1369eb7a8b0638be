//! Block-wise merging of large tensors: the task-arithmetic family (task arithmetic, TIES,
//! DARE, with or without sign consensus) reads each input a block of entries at a time straight
//! from the checkpoint's mapping and streams the merged block to the writer, so memory holds a
//! few blocks instead of (models + 2) copies of the largest tensor (a 4 GB embedding). TIES'
//! top-k comes from two histogram passes over the task vector ([`TopK::find`]); everything else
//! is entry by entry, in the same order and arithmetic as the whole-tensor path, so both give
//! the same bytes. Methods with whole-tensor statistics of another kind (norms, variances,
//! per-row ranks, the L1 rescale) merge whole tensors.

use std::ops::Range;

use anyhow::{bail, Result};
use candle_core::DType;
use rand::rngs::StdRng;
use rand::Rng;

use super::methods::{mix_into, sparsifier, GlobalParams, MergeMethod, ModelParams};
use super::sparsify::{keep_count, scale, Rescale, Sparsifier, TopK};
use super::spec::{Algorithm, Pruning};
use crate::model::SafetensorsFiles;

/// A tensor's values in a checkpoint's mapping, read a block at a time as f32.
pub(crate) struct StoredValues<'a> {
    files: &'a SafetensorsFiles,
    name: &'a str,
    data: Stored<'a>,
}

enum Stored<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
}

impl<'a> StoredValues<'a> {
    /// None when the tensor is stored in a dtype other than f32/bf16/f16 or unaligned.
    pub(crate) fn open(files: &'a SafetensorsFiles, name: &'a str) -> Result<Option<Self>> {
        if cfg!(target_endian = "big") {
            return Ok(None);
        }
        let (dtype, bytes) = files.raw(name)?;
        let data = match dtype {
            DType::F32 => bytemuck::try_cast_slice(bytes).ok().map(Stored::F32),
            DType::BF16 => bytemuck::try_cast_slice(bytes).ok().map(Stored::Bf16),
            DType::F16 => bytemuck::try_cast_slice(bytes).ok().map(Stored::F16),
            _ => None,
        };
        Ok(data.map(|data| Self { files, name, data }))
    }

    pub(crate) fn len(&self) -> usize {
        match self.data {
            Stored::F32(v) => v.len(),
            Stored::Bf16(v) | Stored::F16(v) => v.len(),
        }
    }

    /// Entries `range` as f32: in place for f32, converted into `buf` otherwise.
    fn block<'s>(&'s self, range: Range<usize>, buf: &'s mut Vec<f32>) -> &'s [f32] {
        buf.clear();
        match self.data {
            Stored::F32(v) => return &v[range],
            Stored::Bf16(v) => {
                buf.extend(v[range].iter().map(|&b| half::bf16::from_bits(b).to_f32()))
            }
            Stored::F16(v) => {
                buf.extend(v[range].iter().map(|&b| half::f16::from_bits(b).to_f32()))
            }
        }
        buf
    }

    /// Drops the pages of entries `range` from the resident set (read again if touched).
    fn release(&self, range: Range<usize>) -> Result<()> {
        let size = match self.data {
            Stored::F32(_) => 4,
            _ => 2,
        };
        self.files
            .release_part(self.name, range.start * size..range.end * size)
    }
}

/// One tensor to merge block-wise: the base's and each model's stored values and the models'
/// parameters for it.
pub(crate) struct BlockInputs<'a> {
    pub name: &'a str,
    pub base: StoredValues<'a>,
    pub models: Vec<StoredValues<'a>>,
    pub params: Vec<ModelParams>,
}

/// Whether `method` with these parameters merges entry by entry once its top-k thresholds are
/// known (the task-arithmetic family without DELLA, breadcrumbs or the L1 rescale).
pub(crate) fn merges_in_blocks(
    method: MergeMethod,
    global: &GlobalParams,
    params: &[ModelParams],
) -> bool {
    let Algorithm::TaskArithmetic { pruning, .. } = method.spec().algorithm else {
        return false;
    };
    let pruned = params
        .iter()
        .any(|p| sparsifier(pruning, p) != Sparsifier::None);
    matches!(
        pruning,
        Pruning::None | Pruning::Magnitude | Pruning::Random
    ) && !(pruned && global.rescale == Rescale::L1)
}

/// How one model's task vector is pruned, block after block.
enum Pruner {
    Keep,
    TopK {
        top: TopK,
        ties_left: usize,
        density: f64,
    },
    Random {
        p: f64,
        rng: StdRng,
    },
}

impl Pruner {
    /// What `sparsify` does to the whole tensor, to one block (blocks in index order).
    fn apply(&mut self, block: &mut [f32], rescale: Rescale) {
        match self {
            Pruner::Keep => {}
            Pruner::TopK {
                top,
                ties_left,
                density,
            } => {
                top.apply(block, ties_left);
                if rescale == Rescale::Exact && *density > 0.0 {
                    scale(block, 1.0 / *density);
                }
            }
            Pruner::Random { p, rng } => {
                for x in block.iter_mut() {
                    if rng.random::<f64>() >= *p {
                        *x = 0.0;
                    }
                }
                if rescale == Rescale::Exact && *p > 0.0 {
                    scale(block, 1.0 / *p);
                }
            }
        }
    }
}

fn blocks(n: usize, block: usize) -> impl Iterator<Item = Range<usize>> {
    let block = block.max(1);
    (0..n.div_ceil(block)).map(move |b| b * block..((b + 1) * block).min(n))
}

/// Merges `t` block by block (`block` entries each), handing each merged block to `emit` in
/// order. `rng(i)` is model `i`'s random stream for this tensor.
pub(crate) fn merge_in_blocks(
    method: MergeMethod,
    global: &GlobalParams,
    t: &BlockInputs,
    mut rng: impl FnMut(usize) -> StdRng,
    block: usize,
    mut emit: impl FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let Algorithm::TaskArithmetic { pruning, consensus } = method.spec().algorithm else {
        bail!("{} does not merge in blocks", method.name());
    };
    let n = t.base.len();
    if t.models.iter().any(|m| m.len() != n) {
        bail!("tensor `{}`: inputs differ in size", t.name);
    }
    let count = t.models.len().min(t.params.len());
    let (mut base_buf, mut model_buf) = (vec![], vec![]);
    let mut pruners = Vec::with_capacity(count);
    for (i, p) in t.params[..count].iter().enumerate() {
        pruners.push(match sparsifier(pruning, p) {
            Sparsifier::None => Pruner::Keep,
            Sparsifier::Magnitude { density } => {
                let mut delta = vec![];
                let top = TopK::find(n, keep_count(density, n), |f| {
                    for r in blocks(n, block) {
                        let b = t.base.block(r.clone(), &mut base_buf);
                        let m = t.models[i].block(r.clone(), &mut model_buf);
                        delta.clear();
                        delta.extend(m.iter().zip(b).map(|(a, b)| a - b));
                        f(&delta);
                        t.base.release(r.clone())?;
                        t.models[i].release(r)?;
                    }
                    Ok::<(), anyhow::Error>(())
                })?;
                Pruner::TopK {
                    ties_left: top.ties(),
                    top,
                    density,
                }
            }
            Sparsifier::Random { density } => Pruner::Random {
                p: density.clamp(0.0, 1.0),
                rng: rng(i),
            },
            other => bail!("tensor `{}`: {other:?} does not prune in blocks", t.name),
        });
    }
    let mut deltas: Vec<Vec<f32>> = vec![vec![]; count];
    let mut out = vec![];
    for r in blocks(n, block) {
        let b = t.base.block(r.clone(), &mut base_buf);
        for (i, (delta, pruner)) in deltas.iter_mut().zip(&mut pruners).enumerate() {
            let m = t.models[i].block(r.clone(), &mut model_buf);
            delta.clear();
            delta.extend(m.iter().zip(b).map(|(a, b)| a - b));
            pruner.apply(delta, global.rescale);
            let w = t.params[i].weight as f32;
            delta.iter_mut().for_each(|x| *x *= w);
        }
        out.clear();
        out.extend_from_slice(b);
        let weighted: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
        mix_into(&weighted, &t.params[..count], global, consensus, &mut out);
        emit(&out)?;
        t.base.release(r.clone())?;
        for m in &t.models {
            m.release(r.clone())?;
        }
    }
    Ok(())
}
