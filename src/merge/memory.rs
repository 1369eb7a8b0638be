//! Merging into models held in memory, for the search: inputs are converted to f32 once, then
//! candidate after candidate is merged on all cores without touching disk.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::config::MergeConfig;
use super::engine::merge_one_into;
use super::methods::MergeScratch;
use crate::model::WeightMap;

pub struct InMemoryMerger {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    base: Vec<Vec<f32>>,
    /// `models[i][t]`: model i's tensor t.
    models: Vec<Vec<Vec<f32>>>,
    num_layers: usize,
    /// The output tensors [`Self::merge_reusing`] writes each candidate into (empty until then).
    outputs: Vec<Tensor>,
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl InMemoryMerger {
    /// `models` in the order of the configs that will be merged (`MergeConfig::models`).
    pub fn new(base: &WeightMap, models: &[&WeightMap], num_layers: usize) -> Result<Self> {
        let mut names: Vec<String> = base.keys().cloned().collect();
        names.sort();
        let mut shapes = vec![];
        let mut base_values = vec![];
        for n in &names {
            shapes.push(base[n].dims().to_vec());
            base_values.push(flat(&base[n])?);
        }
        let models = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                names
                    .iter()
                    .zip(&shapes)
                    .map(|(n, s)| {
                        let t = m
                            .get(n)
                            .with_context(|| format!("model {i}: missing tensor `{n}`"))?;
                        if t.dims() != s.as_slice() {
                            bail!(
                                "model {i}: tensor `{n}` has shape {:?}, base has {s:?}",
                                t.dims()
                            );
                        }
                        flat(t)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            names,
            shapes,
            base: base_values,
            models,
            num_layers,
            outputs: vec![],
        })
    }

    /// A merged model as named tensors of `dtype` on `device`, in new buffers of its own.
    pub fn merge(
        &self,
        config: &MergeConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<WeightMap> {
        self.check(config)?;
        self.names
            .par_iter()
            .enumerate()
            .map_init(MergeScratch::default, |scratch, (t, name)| {
                let mut out = vec![0f32; self.base[t].len()];
                self.merge_one(config, seed, t, &mut out, scratch)?;
                Ok((
                    name.clone(),
                    Tensor::from_vec(out, self.shapes[t].as_slice(), device)?.to_dtype(dtype)?,
                ))
            })
            .collect()
    }

    /// A merged model (f32, CPU) written into the buffers of the previous call's: merging
    /// candidate after candidate then allocates no model, and touches no fresh pages. The
    /// returned tensors share those buffers, so the next call overwrites them: drop the result,
    /// and every model built from it, before merging again (use [`Self::merge`] for weights
    /// that must outlive the next merge).
    pub fn merge_reusing(&mut self, config: &MergeConfig, seed: u64) -> Result<WeightMap> {
        self.check(config)?;
        if self.outputs.is_empty() {
            self.outputs = self
                .shapes
                .iter()
                .map(|s| Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
        }
        let this = &*self;
        this.names
            .par_iter()
            .zip(&this.outputs)
            .enumerate()
            .map_init(MergeScratch::default, |scratch, (t, (name, buffer))| {
                buffer.inplace_op1(&Overwrite(std::cell::RefCell::new(
                    &mut |out: &mut [f32]| this.merge_one(config, seed, t, out, scratch),
                )))?;
                Ok((name.clone(), buffer.clone()))
            })
            .collect()
    }

    fn check(&self, config: &MergeConfig) -> Result<()> {
        if config.models.len() != self.models.len() {
            bail!(
                "the config names {} models, the merger holds {}",
                config.models.len(),
                self.models.len()
            );
        }
        Ok(())
    }

    /// Merges tensor `t` into `out`.
    fn merge_one(
        &self,
        config: &MergeConfig,
        seed: u64,
        t: usize,
        out: &mut [f32],
        scratch: &mut MergeScratch,
    ) -> Result<()> {
        let inputs: Vec<&[f32]> = self.models.iter().map(|m| m[t].as_slice()).collect();
        // θ₀ only for methods that use the base apart from the models, and only when named.
        let needs_base = config.method.uses_base() && config.base_model.is_some();
        let base = needs_base.then(|| self.base[t].as_slice());
        merge_one_into(
            config,
            &self.names[t],
            base,
            inputs,
            &self.shapes[t],
            self.num_layers,
            seed,
            out,
            scratch,
        )
    }
}

/// Merges one tensor into the buffer it is given.
type MergeInto<'a> = dyn FnMut(&mut [f32]) -> Result<()> + 'a;

/// Runs a merge into a tensor's own (contiguous f32 CPU) storage.
struct Overwrite<'a>(std::cell::RefCell<&'a mut MergeInto<'a>>);

impl candle_core::InplaceOp1 for Overwrite<'_> {
    fn name(&self) -> &'static str {
        "merge-overwrite"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("merge buffers are f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("merge buffers are contiguous");
        };
        (self.0.borrow_mut())(&mut data[start..end])
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Named random tensors shaped like a 2-layer model's (with repeated values, so TIES'
    /// top-k meets ties).
    fn model(seed: u64) -> WeightMap {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut map = WeightMap::new();
        for (name, shape) in [
            ("model.embed_tokens.weight", vec![16, 8]),
            ("model.layers.0.mlp.up_proj.weight", vec![12, 8]),
            ("model.layers.1.mlp.up_proj.weight", vec![12, 8]),
            ("model.norm.weight", vec![8]),
        ] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| (rng.random_range(-8i32..8) as f32) * 0.125)
                .collect();
            map.insert(
                name.to_string(),
                Tensor::from_vec(data, shape, &Device::Cpu).unwrap(),
            );
        }
        map
    }

    fn config(method: &str, params: &str) -> MergeConfig {
        MergeConfig::from_yaml(&format!(
            "merge_method: {method}\nbase_model: m0\nmodels:\n  - model: m1\n    parameters: \
             {params}\n  - model: m2\n    parameters: {params}\ndtype: float32\n"
        ))
        .unwrap()
    }

    /// A config of `method`, with or without the base, and its global and per-model parameters.
    fn own(method: &str, base: bool, global: &str, params: &str) -> MergeConfig {
        let base = if base { "base_model: m0\n" } else { "" };
        MergeConfig::from_yaml(&format!(
            "merge_method: {method}\n{base}parameters: {global}\nmodels:\n  - model: m1\n    \
             parameters: {params}\n  - model: m2\n    parameters: {params}\ndtype: float32\n"
        ))
        .unwrap()
    }

    #[test]
    fn reusing_buffers_equals_fresh_merges_candidate_after_candidate() {
        let (base, a, b) = (model(1), model(2), model(3));
        let mut merger = InMemoryMerger::new(&base, &[&a, &b], 2).unwrap();
        let candidates = [
            config("ties", "{weight: 0.7, density: 0.5}"),
            config("ties", "{weight: 1.3, density: 0.2}"),
            config("dare_ties", "{weight: 1.0, density: 0.6}"),
            config("task_arithmetic", "{weight: 0.5}"),
            config(
                "breadcrumbs_ties",
                "{weight: 1.0, density: 0.4, gamma: 0.05}",
            ),
            own("linear", false, "{}", "{weight: 0.5}"),
            config("ties", "{weight: 0.7, density: 0.5}"),
            // The methods that allocate their result and copy it into the buffer.
            own("sce", true, "{select_topk: 0.5}", "{}"),
            own("nuslerp", true, "{}", "{weight: 0.6}"),
            own(
                "nuslerp",
                false,
                "{nuslerp_flatten: false}",
                "{weight: 0.3}",
            ),
            own("multislerp", true, "{}", "{weight: 0.5}"),
            own("multislerp", false, "{}", "{weight: 0.7}"),
            own("ram", true, "{epsilon: 0.01}", "{}"),
            own("ramplus_tl", true, "{r: 0.2, alpha: 0.3}", "{}"),
            config("dare_ties", "{weight: 1.0, density: 0.6}"),
        ];
        for (i, cfg) in candidates.iter().enumerate() {
            let fresh = merger.merge(cfg, 9, DType::F32, &Device::Cpu).unwrap();
            let reused = merger.merge_reusing(cfg, 9).unwrap();
            assert_eq!(fresh.len(), reused.len());
            for (name, t) in &fresh {
                let want = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = reused[name]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "candidate {i} `{name}`");
            }
        }
        // A config for another number of models is refused.
        let p = "{weight: 1.0, density: 0.5}";
        let three = MergeConfig::from_yaml(&format!(
            "merge_method: ties\nbase_model: m0\nmodels:\n  - model: m1\n    parameters: {p}\n  \
             - model: m2\n    parameters: {p}\n  - model: m3\n    parameters: {p}\n"
        ))
        .unwrap();
        assert!(merger.merge_reusing(&three, 0).is_err());
    }
}
