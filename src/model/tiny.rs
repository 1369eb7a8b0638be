//! Tiny random Llama/Qwen2 checkpoints for fast tests: seeded weights, a real tokenizer copied
//! from another model directory.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::config::{Architecture, ModelConfig};
use super::tokenizer::ModelTokenizer;
use super::weights::{write_weights, WeightMap, DEFAULT_SHARD_BYTES};

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub tie_word_embeddings: bool,
    pub seed: u64,
}

impl TinySpec {
    pub fn llama(seed: u64) -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            tie_word_embeddings: true,
            seed,
        }
    }

    pub fn qwen2(seed: u64) -> Self {
        Self {
            architecture: Architecture::Qwen2,
            tie_word_embeddings: false,
            ..Self::llama(seed)
        }
    }

    pub fn config(&self, vocab_size: usize) -> Result<ModelConfig> {
        let mut raw = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.as_str(),
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        if self.architecture == Architecture::Qwen2 {
            raw["use_sliding_window"] = json!(false);
        }
        ModelConfig::from_json(raw)
    }

    /// Seeded weights: uniform in ±√3·0.05 (std 0.05) for matrices and biases, norms around 1.
    pub fn weights(&self, cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<WeightMap> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed);
        let mut map = WeightMap::new();
        for (name, shape) in cfg.expected_tensors() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                (0..n).map(|_| 1.0 + rng.random_range(-0.1..0.1)).collect()
            } else {
                let a = 0.05 * 3f32.sqrt();
                (0..n).map(|_| rng.random_range(-a..a)).collect()
            };
            map.insert(
                name,
                Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?,
            );
        }
        Ok(map)
    }

    /// Writes a complete model directory; the tokenizer files come from `tokenizer_dir`.
    pub fn write(&self, dir: &Path, tokenizer_dir: &Path) -> Result<ModelConfig> {
        let tok = ModelTokenizer::load_dir(tokenizer_dir)?;
        let cfg = self.config(tok.id_bound())?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            let src = tokenizer_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, dir.join(f))
                    .with_context(|| format!("cannot copy {}", src.display()))?;
            }
        }
        cfg.write(&dir.join("config.json"))?;
        let w = self.weights(&cfg, DType::F32, &Device::Cpu)?;
        write_weights(dir, &w, None, DEFAULT_SHARD_BYTES)?;
        Ok(cfg)
    }
}

/// A tensor's f32 values as bits, for tests that compare two computations exactly.
#[cfg(test)]
pub(crate) fn f32_bits(x: &Tensor) -> Vec<u32> {
    x.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}
