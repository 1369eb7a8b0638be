//! Per-layer key/value cache with the position and validity of every cached key, so that a
//! prefix can be prefilled once and then extended by a batch of continuations.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::prefix_attention::PrefixKv;

/// One layer's keys and values `(b, kv_heads, capacity, head_dim)`, of which the first `len`
/// time steps are filled. Appending writes in place while there is room, so a decode step does
/// not copy the whole cache; a clone shares the buffers and copies them on its first append (so
/// a prefix cache reused by many documents is never written through).
#[derive(Debug)]
pub(crate) struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
    owned: bool,
}

impl Clone for LayerKv {
    fn clone(&self) -> Self {
        Self {
            k: self.k.clone(),
            v: self.v.clone(),
            len: self.len,
            owned: false,
        }
    }
}

impl LayerKv {
    /// Appends `k`, `v` of shape `(b, kv_heads, t, head_dim)` and returns all keys and values so far.
    pub(crate) fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let t = k.dim(2)?;
        let len = slot.as_ref().map_or(0, |s| s.len);
        let fits = slot
            .as_ref()
            .is_some_and(|s| s.owned && len + t <= s.k.dim(2).unwrap_or(0));
        if !fits {
            // Room for a few more decode steps, growing by a quarter so appends stay amortised O(1).
            let capacity = len + t + (len + t).div_ceil(4).max(32);
            let (b, h, _, d) = k.dims4()?;
            let nk = Tensor::zeros((b, h, capacity, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, capacity, d), v.dtype(), v.device())?;
            if let Some(old) = slot.as_ref() {
                nk.slice_set(&old.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&old.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(LayerKv {
                k: nk,
                v: nv,
                len,
                owned: true,
            });
        }
        let s = slot.as_mut().expect("allocated above");
        s.k.slice_set(&k, 2, len)?;
        s.v.slice_set(&v, 2, len)?;
        s.len = len + t;
        Ok((s.k.narrow(2, 0, s.len)?, s.v.narrow(2, 0, s.len)?))
    }
}

/// Keys and values that every row of a cache sees before its own: a batch-1 prefix (a task's
/// few-shot prompt) kept once for the whole batch instead of copied into each row. Every key is
/// a real token, visible to every later query of every row.
#[derive(Debug)]
pub struct SharedPrefix {
    /// Per layer: keys and values, laid out for the decode kernel.
    pub(crate) layers: Vec<PrefixKv>,
    /// One past the last position in the prefix: where each row's own tokens start.
    next_position: u32,
}

#[derive(Clone, Debug)]
pub struct KvCache {
    /// Keys every row sees before its own (`None`: each row holds all of its keys).
    pub(crate) prefix: Option<Arc<SharedPrefix>>,
    /// Each row's own keys, after the shared prefix if there is one.
    pub(crate) layers: Vec<Option<LayerKv>>,
    /// Per row: the position of each cached key.
    pub(crate) key_positions: Vec<Vec<u32>>,
    /// Per row: whether each cached key is a real token (false for padding).
    pub(crate) key_valid: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            prefix: None,
            layers: vec![None; num_layers],
            key_positions: vec![],
            key_valid: vec![],
        }
    }

    /// This batch-1 cache as a prefix to share: each of its keys must be a real token.
    pub fn to_shared_prefix(&self) -> Result<Arc<SharedPrefix>> {
        if self.batch_size() != 1 || self.prefix.is_some() {
            bail!(
                "a shared prefix is made from a plain cache with one row, this one has {}",
                self.batch_size()
            );
        }
        if self.key_valid[0].iter().any(|&ok| !ok) {
            bail!("a shared prefix cannot hold padding");
        }
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some(l) => PrefixKv::new(&l.k.narrow(2, 0, l.len)?, &l.v.narrow(2, 0, l.len)?),
                None => bail!("a shared prefix needs every layer's keys"),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(SharedPrefix {
            layers,
            next_position: self.next_positions()[0],
        }))
    }

    /// `n` rows with no keys of their own yet, each seeing all of `prefix` first.
    pub fn after_prefix(prefix: &Arc<SharedPrefix>, n: usize) -> Self {
        Self {
            prefix: Some(prefix.clone()),
            layers: vec![None; prefix.layers.len()],
            key_positions: vec![vec![]; n],
            key_valid: vec![vec![]; n],
        }
    }

    /// True before the first forward: no keys at all, neither shared nor in any row.
    pub fn is_empty(&self) -> bool {
        self.prefix.is_none() && self.key_positions.first().is_none_or(|r| r.is_empty())
    }

    /// Number of key slots in each row (including padding), not counting a shared prefix.
    pub fn len(&self) -> usize {
        self.key_positions.first().map_or(0, |r| r.len())
    }

    /// Rows in the cache; 0 before the first forward.
    pub fn batch_size(&self) -> usize {
        self.key_positions.len()
    }

    /// Position the next real token of each row takes.
    pub fn next_positions(&self) -> Vec<u32> {
        let after_prefix = self.prefix.as_ref().map_or(0, |p| p.next_position);
        self.key_positions
            .iter()
            .zip(&self.key_valid)
            .map(|(p, v)| {
                p.iter()
                    .zip(v)
                    .filter(|(_, &ok)| ok)
                    .map(|(&p, _)| p + 1)
                    .max()
                    .unwrap_or(after_prefix)
            })
            .collect()
    }

    /// A cache whose rows are `rows` of this one (a row may repeat: forking a prefix
    /// for `n` continuations is `select_rows(&[0; n])`). Tensors are copied once.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let b = self.batch_size();
        if let Some(&bad) = rows.iter().find(|&&r| r >= b) {
            bail!("cache row {bad} out of range (batch {b})");
        }
        let idx = Tensor::new(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            &candle_core::Device::Cpu,
        )?;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|l| {
                        let idx = idx.to_device(l.k.device())?;
                        Ok::<_, anyhow::Error>(LayerKv {
                            // Whole buffers (spare capacity included) are contiguous.
                            k: l.k.index_select(&idx, 0)?,
                            v: l.v.index_select(&idx, 0)?,
                            len: l.len,
                            owned: true,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            prefix: self.prefix.clone(),
            layers,
            key_positions: rows
                .iter()
                .map(|&r| self.key_positions[r].clone())
                .collect(),
            key_valid: rows.iter().map(|&r| self.key_valid[r].clone()).collect(),
        })
    }

    /// A cache of the given rows (`(cache, row)`: row `row` of `caches[cache]`; a cache with no
    /// rows yet stands for empty rows), each right-aligned to a common length: a row keeps its
    /// keys from its first real one to its end, padding fills the columns before, and `spare`
    /// more columns are reserved so the next appends write in place. Continuous batching uses it
    /// to drop finished rows and add newly prefilled ones in one copy, without carrying padding
    /// forward. The sources are consumed a layer at a time, so old and new keys coexist for one
    /// layer only, not for the whole cache (at 8 rows of ~1.2k-token GSM8K prompts on
    /// SmolLM2-135M that is ~0.5 GB less at the peak).
    pub(crate) fn stack(
        mut caches: Vec<KvCache>,
        rows: &[(usize, usize)],
        spare: usize,
    ) -> Result<Self> {
        if let Some(&(bad, _)) = rows.iter().find(|&&(c, _)| c >= caches.len()) {
            bail!("cache {bad} out of range ({} caches)", caches.len());
        }
        let prefix = common_prefix(rows.iter().map(|&(c, _)| &caches[c]))?;
        let mut spans = vec![];
        for &(c, row) in rows {
            let cache = &caches[c];
            if cache.batch_size() == 0 {
                spans.push(0..0);
                continue;
            }
            let Some(valid) = cache.key_valid.get(row) else {
                bail!(
                    "cache row {row} out of range (batch {})",
                    cache.batch_size()
                );
            };
            let first = valid.iter().position(|&v| v).unwrap_or(valid.len());
            spans.push(first..valid.len());
        }
        let width = spans.iter().map(|s| s.len()).max().unwrap_or(0);
        let num_layers = rows.first().map_or(0, |&(c, _)| caches[c].layers.len());
        if rows
            .iter()
            .any(|&(c, _)| caches[c].layers.len() != num_layers)
        {
            bail!("caches of models with different layer counts cannot be stacked");
        }
        let rows_of: Vec<usize> = rows.iter().map(|&(_, r)| r).collect();
        let mut layers = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let parts: Vec<(Option<&LayerKv>, &std::ops::Range<usize>)> = rows
                .iter()
                .zip(&spans)
                .map(|(&(c, _), s)| (caches[c].layers[l].as_ref(), s))
                .collect();
            layers.push(stack_layer(&parts, &rows_of, width, spare)?);
            for cache in &mut caches {
                cache.layers[l] = None;
            }
        }
        let mut key_positions = vec![];
        let mut key_valid = vec![];
        for (&(c, row), span) in rows.iter().zip(&spans) {
            let pad = width - span.len();
            let (mut p, mut v) = (vec![0; pad], vec![false; pad]);
            if !span.is_empty() {
                p.extend_from_slice(&caches[c].key_positions[row][span.clone()]);
                v.extend_from_slice(&caches[c].key_valid[row][span.clone()]);
            }
            key_positions.push(p);
            key_valid.push(v);
        }
        Ok(Self {
            prefix,
            layers,
            key_positions,
            key_valid,
        })
    }

    /// Drops row `slot` as `Vec::swap_remove` does: the last row moves into its place (one row
    /// copied, not the whole cache) and the batch shrinks by one. A finished generation leaves
    /// its batch this way. Buffers shared with another cache are copied first, never written
    /// through.
    pub(crate) fn swap_remove_row(&mut self, slot: usize) -> Result<()> {
        let b = self.batch_size();
        if slot >= b {
            bail!("cache row {slot} out of range (batch {b})");
        }
        let last = b - 1;
        for layer in self.layers.iter_mut().flatten() {
            if !layer.owned {
                layer.k = layer.k.copy()?;
                layer.v = layer.v.copy()?;
                layer.owned = true;
            }
            if slot != last {
                for t in [&layer.k, &layer.v] {
                    let moved = t.narrow(0, last, 1)?.narrow(2, 0, layer.len)?;
                    t.narrow(0, slot, 1)?
                        .slice_set(&moved.contiguous()?, 2, 0)?;
                }
            }
            // A view of the first rows: the buffer's layout (and spare time steps) stay.
            layer.k = layer.k.narrow(0, 0, last)?;
            layer.v = layer.v.narrow(0, 0, last)?;
        }
        self.key_positions.swap_remove(slot);
        self.key_valid.swap_remove(slot);
        Ok(())
    }

    /// Marks row `row`'s keys from column `from` on as not real tokens, so no later query sees
    /// them (a rejected draft's keys). Their columns stay, as padding does.
    pub(crate) fn discard_keys(&mut self, row: usize, from: usize) -> Result<()> {
        let Some(valid) = self.key_valid.get_mut(row) else {
            bail!(
                "cache row {row} out of range (batch {})",
                self.key_positions.len()
            );
        };
        if let Some(tail) = valid.get_mut(from..) {
            tail.fill(false);
        }
        Ok(())
    }

    /// Copies a batch-1 cache into `n` rows.
    pub fn fork(&self, n: usize) -> Result<Self> {
        if self.batch_size() != 1 {
            bail!(
                "fork needs a cache with one row, this one has {}",
                self.batch_size()
            );
        }
        self.select_rows(&vec![0; n])
    }
}

/// The shared prefix of caches whose rows go into one batch: they must all have the same one, or
/// none (a cache with no rows yet stands for empty rows and has no say).
fn common_prefix<'a>(
    caches: impl IntoIterator<Item = &'a KvCache>,
) -> Result<Option<Arc<SharedPrefix>>> {
    let mut common: Option<&Option<Arc<SharedPrefix>>> = None;
    for c in caches.into_iter().filter(|c| c.batch_size() > 0) {
        match common {
            None => common = Some(&c.prefix),
            Some(p) => {
                let same = match (p, &c.prefix) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    bail!("rows of caches with different shared prefixes cannot share a batch");
                }
            }
        }
    }
    Ok(common.cloned().flatten())
}

/// One layer of [`KvCache::stack`]: row `i` is row `rows[i]` of `parts[i]`'s buffers, its
/// columns `span` placed at the end of `width`; `None` when no row has keys yet.
fn stack_layer(
    parts: &[(Option<&LayerKv>, &std::ops::Range<usize>)],
    rows: &[usize],
    width: usize,
    spare: usize,
) -> Result<Option<LayerKv>> {
    let Some(shape_of) = parts.iter().find_map(|(l, s)| l.filter(|_| !s.is_empty())) else {
        return Ok(None);
    };
    let (_, h, _, d) = shape_of.k.dims4()?;
    let (dtype, device) = (shape_of.k.dtype(), shape_of.k.device().clone());
    let capacity = width + spare;
    let k = Tensor::zeros((parts.len(), h, capacity, d), dtype, &device)?;
    let v = Tensor::zeros((parts.len(), h, capacity, d), dtype, &device)?;
    for (i, ((layer, span), &row)) in parts.iter().zip(rows).enumerate() {
        let Some(layer) = layer.filter(|_| !span.is_empty()) else {
            continue;
        };
        if span.end > layer.len {
            bail!("cache row {row} has keys past its layer's length");
        }
        let offset = width - span.len();
        for (dst, src) in [(&k, &layer.k), (&v, &layer.v)] {
            let src = src.narrow(0, row, 1)?.narrow(2, span.start, span.len())?;
            // A row of the destination is contiguous, so it can be written in place.
            dst.narrow(0, i, 1)?
                .slice_set(&src.contiguous()?, 2, offset)?;
        }
    }
    Ok(Some(LayerKv {
        k,
        v,
        len: width,
        owned: true,
    }))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::model::tiny::TinySpec;
    use crate::model::{LlamaModel, Mode, TokenBatch};

    fn model() -> LlamaModel {
        let spec = TinySpec::llama(3);
        let cfg = spec.config(64).unwrap();
        let weights = spec.weights(&cfg, DType::F32, &Device::Cpu).unwrap();
        LlamaModel::from_weights(&cfg, &weights, None, Mode::Inference).unwrap()
    }

    /// A cache of left-padded rows of the given token sequences.
    fn cache_of(model: &LlamaModel, seqs: &[Vec<u32>]) -> KvCache {
        let mut cache = model.new_cache();
        let batch = TokenBatch::left_padded(seqs, &vec![0; seqs.len()], 0);
        model.forward(&batch, Some(&mut cache)).unwrap();
        cache
    }

    /// A row's real keys and values of every layer, with their positions.
    fn contents(cache: &KvCache, row: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
        let one = KvCache::stack(vec![cache.clone()], &[(0, row)], 0).unwrap();
        let kv = one
            .layers
            .iter()
            .flatten()
            .flat_map(|l| [&l.k, &l.v])
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        (kv, one.key_positions[0].clone())
    }

    #[test]
    fn swap_remove_moves_the_last_row_into_the_slot_and_leaves_others_alone() {
        let model = model();
        let seqs = [
            vec![1, 2, 3, 4, 5, 6],
            vec![7, 8, 9],
            vec![10, 11, 12, 13],
            vec![14],
        ];
        let c = cache_of(&model, &seqs);
        let rows: Vec<_> = (0..4).map(|r| contents(&c, r)).collect();
        let mut cache = c.clone();
        cache.swap_remove_row(1).unwrap();
        assert_eq!(cache.batch_size(), 3);
        assert_eq!(contents(&cache, 0), rows[0]);
        assert_eq!(contents(&cache, 1), rows[3]);
        assert_eq!(contents(&cache, 2), rows[2]);
        // The clone's buffers were copied, not written through.
        for (r, row) in rows.iter().enumerate() {
            assert_eq!(&contents(&c, r), row);
        }
        // The last row leaves without a copy; then the rest, down to none.
        cache.swap_remove_row(2).unwrap();
        assert_eq!(contents(&cache, 1), rows[3]);
        assert!(cache.swap_remove_row(2).is_err());
        cache.swap_remove_row(0).unwrap();
        assert_eq!(contents(&cache, 0), rows[3]);
        cache.swap_remove_row(0).unwrap();
        assert_eq!(cache.batch_size(), 0);
        // Appending after a removal writes in place and sees the moved row's keys.
        let mut cache = c.clone();
        cache.swap_remove_row(0).unwrap();
        let step = TokenBatch {
            ids: vec![vec![3]; 3],
            positions: cache.next_positions().iter().map(|&p| vec![p]).collect(),
            valid: vec![vec![true]; 3],
            packing: None,
        };
        let got = model.forward(&step, Some(&mut cache)).unwrap();
        let mut want_cache = c.select_rows(&[3, 1, 2]).unwrap();
        let want = model.forward(&step, Some(&mut want_cache)).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn stacked_projections_give_every_output_the_same_bits() {
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|v| v.to_bits()).collect()
        };
        for spec in [TinySpec::llama(5), TinySpec::qwen2(5)] {
            let cfg = spec.config(64).unwrap();
            let weights = spec.weights(&cfg, DType::F32, &Device::Cpu).unwrap();
            let plain = LlamaModel::from_weights(&cfg, &weights, None, Mode::Inference).unwrap();
            let mut shared = weights.clone();
            let stacked = LlamaModel::from_weights_stacked(&cfg, &mut shared).unwrap();
            // The map keeps every tensor, at its values (views of the stacks where stacked).
            assert_eq!(shared.len(), weights.len());
            for (name, t) in &weights {
                assert_eq!(bits(&shared[name]), bits(t), "{name}");
            }
            // A prefill on gemm's path (2 × 40 rows), a decode step on the row-dot path, and a
            // forward that keeps some columns (whose last layer takes the separate products).
            let seqs: Vec<Vec<u32>> = vec![(1..41).collect(), (3..43).collect()];
            let batch = TokenBatch::left_padded(&seqs, &[0, 0], 0);
            let (mut a, mut b) = (plain.new_cache(), stacked.new_cache());
            let want = plain.forward(&batch, Some(&mut a)).unwrap();
            let got = stacked.forward(&batch, Some(&mut b)).unwrap();
            assert_eq!(bits(&got), bits(&want), "prefill {:?}", spec.architecture);
            let step = TokenBatch::right_padded(&[vec![5, 9], vec![6, 2]], &a.next_positions(), 0);
            let want = plain.forward(&step, Some(&mut a)).unwrap();
            let got = stacked.forward(&step, Some(&mut b)).unwrap();
            assert_eq!(bits(&got), bits(&want), "decode {:?}", spec.architecture);
            let want = plain.forward_columns(&batch, None, &[3, 39]).unwrap();
            let got = stacked.forward_columns(&batch, None, &[3, 39]).unwrap();
            assert_eq!(bits(&got), bits(&want), "columns {:?}", spec.architecture);
        }
    }

    #[test]
    fn forward_columns_gives_the_full_forwards_columns_and_the_same_keys() {
        let model = model();
        let seqs = vec![(1..12).collect::<Vec<u32>>(), (20..27).collect()];
        let batch = TokenBatch::left_padded(&seqs, &[0, 0], 0);
        let mut full_cache = model.new_cache();
        let full = model.forward(&batch, Some(&mut full_cache)).unwrap();
        for columns in [vec![10], vec![3, 7, 10], vec![]] {
            let mut cache = model.new_cache();
            let got = model
                .forward_columns(&batch, Some(&mut cache), &columns)
                .unwrap();
            assert_eq!(got.dims(), &[2, columns.len(), full.dim(2).unwrap()]);
            if !columns.is_empty() {
                let idx = Tensor::new(
                    columns.iter().map(|&c| c as u32).collect::<Vec<_>>(),
                    &Device::Cpu,
                )
                .unwrap();
                let want = full.index_select(&idx, 1).unwrap();
                // Equal up to the rounding of the matrix products at fewer rows.
                assert!(max_diff(&got, &want) < 1e-5, "columns {columns:?}");
            }
            // Every time step's keys are cached, whatever the columns: the next step agrees.
            for row in 0..2 {
                assert_eq!(contents(&cache, row), contents(&full_cache, row));
            }
            let step = TokenBatch::right_padded(&[vec![5], vec![6]], &cache.next_positions(), 0);
            let next = model.forward(&step, Some(&mut cache)).unwrap();
            let want = model.forward(&step, Some(&mut full_cache.clone())).unwrap();
            assert_eq!(max_diff(&next, &want), 0.0);
        }
        // Without a cache too.
        let got = model.forward_columns(&batch, None, &[4, 9]).unwrap();
        let want = model
            .forward(&batch, None)
            .unwrap()
            .narrow(1, 4, 6)
            .unwrap();
        let want = Tensor::cat(
            &[want.narrow(1, 0, 1).unwrap(), want.narrow(1, 5, 1).unwrap()],
            1,
        )
        .unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        let err = model.forward_columns(&batch, None, &[11]).unwrap_err();
        assert!(err.to_string().contains("column 11"), "{err}");
    }

    #[test]
    fn rows_after_a_shared_prefix_equal_forked_rows() {
        let model = model();
        assert!(model.can_share_prefix());
        let prefix = cache_of(&model, &[vec![1, 2, 3, 4, 5]]);
        let shared = prefix.to_shared_prefix().unwrap();
        let rest = [vec![6, 7, 8], vec![9]];
        let batch = TokenBatch::left_padded(&rest, &[5, 5], 0);
        let mut after = KvCache::after_prefix(&shared, 2);
        assert_eq!(after.next_positions(), vec![5, 5]);
        let mut forked = prefix.fork(2).unwrap();
        let hidden = |cache: &mut KvCache| {
            let h = model.forward(&batch, Some(cache)).unwrap();
            h.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, f) = (hidden(&mut after), hidden(&mut forked));
        let diff = a
            .iter()
            .zip(&f)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "max |Δ| {diff}");
        assert_eq!(after.next_positions(), forked.next_positions());
        assert_eq!(after.next_positions(), vec![8, 6]);
        // Rows hold only their own keys; stacking and selecting keep the prefix.
        assert_eq!(after.len(), 3);
        let stacked = KvCache::stack(vec![after.clone()], &[(0, 1), (0, 0)], 2).unwrap();
        assert!(Arc::ptr_eq(stacked.prefix.as_ref().unwrap(), &shared));
        assert_eq!(stacked.next_positions(), vec![6, 8]);
        assert!(after.select_rows(&[1]).unwrap().prefix.is_some());
        // Rows of different prefixes (or none) never share a batch.
        let other = KvCache::after_prefix(&prefix.to_shared_prefix().unwrap(), 1);
        for mixed in [&forked, &other] {
            let caches = vec![after.clone(), mixed.clone()];
            let err = KvCache::stack(caches, &[(0, 0), (1, 0)], 0).unwrap_err();
            assert!(err.to_string().contains("shared prefix"), "{err}");
        }
        // Only a one-row cache without padding can be shared.
        assert!(forked.to_shared_prefix().is_err());
        let padded = cache_of(&model, &[vec![1, 2], vec![3]])
            .select_rows(&[1])
            .unwrap();
        assert!(padded.to_shared_prefix().is_err());
    }
}
