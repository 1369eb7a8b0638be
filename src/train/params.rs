//! What a run trains: every weight (full fine-tuning) or LoRA factors on a frozen base, held as
//! candle `Var`s that the model shares (updates are seen without rebuilding it).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::{LlamaModel, LoraAdapter, LoraConfig, LoraPair, Mode, ModelConfig, WeightMap};

pub struct Trainable {
    pub config: ModelConfig,
    /// Frozen weights (full fine-tuning: the initial values, for the L1 delta).
    pub base: WeightMap,
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    /// Whether AdamW's weight decay applies (transformers' rule: not to norms and biases).
    pub decay: Vec<bool>,
    pub lora: Option<LoraConfig>,
    /// The dtype the model computes in; the parameters are cast to it for each forward when
    /// it is not theirs (mixed precision), which keeps the gradients flowing to them in their
    /// own dtype.
    pub compute: DType,
}

fn decays(name: &str) -> bool {
    !(name.contains("norm") || name.ends_with(".bias"))
}

impl Trainable {
    /// Every weight trained, in the dtype of `weights` (the master weights), the model
    /// computing in `compute`.
    pub fn full(config: &ModelConfig, weights: &WeightMap, compute: DType) -> Result<Self> {
        let mut names: Vec<String> = weights.keys().cloned().collect();
        names.sort();
        let vars = names
            .iter()
            .map(|n| Ok(Var::from_tensor(&weights[n].copy()?)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            base: weights.clone(),
            decay: names.iter().map(|n| decays(n)).collect(),
            names,
            vars,
            lora: None,
            compute,
        })
    }

    /// LoRA factors in `dtype` on the frozen `weights` (whose dtype the model computes in):
    /// from `init` when given, else PEFT's initialisation (A kaiming-uniform with a = √5, B = 0)
    /// from a seeded generator.
    pub fn lora(
        config: &ModelConfig,
        weights: &WeightMap,
        lora: &LoraConfig,
        init: Option<&LoraAdapter>,
        seed: u64,
        dtype: DType,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let compute = weights["model.embed_tokens.weight"].dtype();
        let dev = weights["model.embed_tokens.weight"].device().clone();
        let mut names = vec![];
        let mut vars = vec![];
        for l in 0..config.num_hidden_layers {
            for m in &lora.target_modules {
                let path = m.module_path(l);
                let w = weights
                    .get(&format!("{path}.weight"))
                    .with_context(|| format!("LoRA target `{path}` is not in the model"))?;
                let (out, inp) = w.dims2()?;
                let (a, b) = match init.and_then(|a| a.layers.get(&path)) {
                    Some(p) => (p.a.to_dtype(dtype)?, p.b.to_dtype(dtype)?),
                    None => {
                        let bound = 1.0 / (inp as f64).sqrt();
                        let data: Vec<f32> = (0..lora.r * inp)
                            .map(|_| rng.random_range(-bound..bound) as f32)
                            .collect();
                        (
                            Tensor::from_vec(data, (lora.r, inp), &dev)?.to_dtype(dtype)?,
                            Tensor::zeros((out, lora.r), dtype, &dev)?,
                        )
                    }
                };
                names.push(format!("{path}.lora_A"));
                vars.push(Var::from_tensor(&a)?);
                names.push(format!("{path}.lora_B"));
                vars.push(Var::from_tensor(&b)?);
            }
        }
        Ok(Self {
            config: config.clone(),
            base: weights.clone(),
            decay: vec![true; names.len()],
            names,
            vars,
            lora: Some(lora.clone()),
            compute,
        })
    }

    pub fn adapter(&self) -> Option<LoraAdapter> {
        let cfg = self.lora.clone()?;
        let mut layers = BTreeMap::new();
        for (i, name) in self.names.iter().enumerate().step_by(2) {
            let path = name.trim_end_matches(".lora_A").to_string();
            layers.insert(
                path,
                LoraPair {
                    a: self.vars[i].as_tensor().clone(),
                    b: self.vars[i + 1].as_tensor().clone(),
                },
            );
        }
        Some(LoraAdapter {
            config: cfg,
            layers,
        })
    }

    /// The model with the current parameters, differentiable in them. In the parameters' own
    /// dtype it shares their storage and sees every update; cast to another (mixed precision)
    /// it holds the values of the moment: build it again after each optimizer step.
    pub fn model(&self, mode: Mode) -> Result<LlamaModel> {
        match self.adapter() {
            // from_weights casts the factors to the frozen weights' dtype.
            Some(adapter) => {
                LlamaModel::from_weights(&self.config, &self.base, Some(&adapter), mode)
            }
            None => {
                let weights: WeightMap = self
                    .names
                    .iter()
                    .zip(&self.vars)
                    .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(self.compute)?)))
                    .collect::<Result<_>>()?;
                LlamaModel::from_weights(&self.config, &weights, None, mode)
            }
        }
    }

    /// Whether [`Self::model`] holds copies that go stale at each update (mixed precision).
    pub fn model_is_a_snapshot(&self) -> bool {
        self.dtype() != self.compute
    }

    /// The frozen reference for parameter `i` in the L1 term: θ₀ (full) or 0 (LoRA factors).
    pub fn anchor(&self, i: usize) -> Result<Tensor> {
        match self.lora {
            Some(_) => Ok(self.vars[i].as_tensor().zeros_like()?),
            None => Ok(self.base[&self.names[i]].clone()),
        }
    }

    /// Current weights as a map (full fine-tuning) or the LoRA tensors under their names.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .zip(&self.vars)
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Overwrites the parameters with saved values (resume).
    pub fn load_tensors(&self, saved: &BTreeMap<String, Tensor>, origin: &Path) -> Result<()> {
        for (n, v) in self.names.iter().zip(&self.vars) {
            let t = saved
                .get(n)
                .with_context(|| format!("{}: checkpoint lacks `{n}`", origin.display()))?;
            v.set(&t.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }

    pub fn num_parameters(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    pub fn dtype(&self) -> DType {
        self.vars.first().map_or(DType::F32, |v| v.dtype())
    }
}
