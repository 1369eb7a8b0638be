//! Merging into models held in memory, for the search: inputs are converted to f32 once, then
//! candidate after candidate is merged on all cores without touching disk.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::config::MergeConfig;
use super::engine::merge_one;
use crate::model::WeightMap;

pub struct InMemoryMerger {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    base: Vec<Vec<f32>>,
    /// `models[i][t]`: model i's tensor t.
    models: Vec<Vec<Vec<f32>>>,
    num_layers: usize,
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
        })
    }

    /// A merged model as named tensors of `dtype` on `device`.
    pub fn merge(
        &self,
        config: &MergeConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<WeightMap> {
        if config.models.len() != self.models.len() {
            bail!(
                "the config names {} models, the merger holds {}",
                config.models.len(),
                self.models.len()
            );
        }
        // θ₀ only for methods that use the base apart from the models, and only when named.
        let needs_base = config.method.uses_base() && config.base_model.is_some();
        self.names
            .par_iter()
            .enumerate()
            .map(|(t, name)| {
                let inputs: Vec<&[f32]> = self.models.iter().map(|m| m[t].as_slice()).collect();
                let base = needs_base.then(|| self.base[t].as_slice());
                let out = merge_one(
                    config,
                    name,
                    base,
                    inputs,
                    &self.shapes[t],
                    self.num_layers,
                    seed,
                )?;
                Ok((
                    name.clone(),
                    Tensor::from_vec(out, self.shapes[t].as_slice(), device)?.to_dtype(dtype)?,
                ))
            })
            .collect()
    }
}
