//! `config.json` of a Hugging Face causal LM, reduced to what the Llama-family forward needs.
//!
//! Llama, Mistral and Qwen2 share one architecture; their differences are fields here
//! (q/k/v bias, sliding window, tied embeddings), not separate model files.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `model_type` values paft can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const KNOWN: [&'static str; 3] = ["llama", "mistral", "qwen2"];

    pub fn parse(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    /// The HF class name written into `config.json["architectures"]`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// Llama 3 style frequency-dependent RoPE scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always, Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers it too).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Mistral's sliding-window attention span, in tokens.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The whole original JSON, so that saving a model keeps fields paft does not interpret.
    pub raw: Value,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json(raw: Value) -> Result<Self> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .context("missing `model_type`")?;
        let Some(architecture) = Architecture::parse(model_type) else {
            bail!(
                "unsupported model_type `{model_type}` (paft supports {})",
                Architecture::KNOWN.join(", ")
            );
        };
        let req = |key: &str| {
            get_usize(&raw, key).with_context(|| format!("missing or non-integer `{key}`"))
        };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let num_key_value_heads =
            get_usize(&raw, "num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim =
            get_usize(&raw, "head_dim").unwrap_or(hidden_size / num_attention_heads.max(1));
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            bail!("num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})");
        }
        if head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        let rope_scaling = match raw.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            s.get(k)
                                .and_then(Value::as_f64)
                                .with_context(|| format!("rope_scaling.{k} missing"))
                        };
                        Some(Llama3RopeScaling {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")?
                                as usize,
                        })
                    }
                    other => bail!("unsupported rope_scaling type `{other}` (supported: llama3)"),
                }
            }
        };
        let attention_bias = raw
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let qkv_bias = architecture == Architecture::Qwen2 || attention_bias;
        let sliding_window = match architecture {
            Architecture::Mistral => get_usize(&raw, "sliding_window"),
            // Qwen2 configs carry a window but only apply it with use_sliding_window=true.
            Architecture::Qwen2
                if raw.get("use_sliding_window").and_then(Value::as_bool) == Some(true) =>
            {
                get_usize(&raw, "sliding_window")
            }
            _ => None,
        };
        let cfg = Self {
            architecture,
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: raw
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: get_usize(&raw, "max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: raw
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            qkv_bias,
            o_bias: architecture == Architecture::Llama && attention_bias,
            mlp_bias: raw
                .get("mlp_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            sliding_window,
            bos_token_id: token_ids(raw.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(raw.get("eos_token_id")),
            pad_token_id: token_ids(raw.get("pad_token_id")).first().copied(),
            raw,
        };
        Ok(cfg)
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.raw)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Every tensor name and shape a complete checkpoint of this config must contain.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.kv_dim();
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, h]),
            ("model.norm.weight".into(), vec![h]),
        ];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, h]));
        }
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            if self.qkv_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            if self.o_bias {
                out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            }
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            if self.mlp_bias {
                out.push((format!("{p}.mlp.gate_proj.bias"), vec![i]));
                out.push((format!("{p}.mlp.up_proj.bias"), vec![i]));
                out.push((format!("{p}.mlp.down_proj.bias"), vec![h]));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qwen2_has_qkv_bias_and_gqa() {
        let cfg = ModelConfig::from_json(json!({
            "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": true, "rope_theta": 1000000.0, "sliding_window": 32, "use_sliding_window": false
        }))
        .unwrap();
        assert_eq!(cfg.architecture, Architecture::Qwen2);
        assert!(cfg.qkv_bias && !cfg.o_bias);
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.kv_dim(), 32);
        assert_eq!(cfg.sliding_window, None);
        assert!(cfg
            .expected_tensors()
            .iter()
            .any(|(n, s)| n.ends_with("k_proj.bias") && s == &vec![32]));
        assert!(!cfg
            .expected_tensors()
            .iter()
            .any(|(n, _)| n == "lm_head.weight"));
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let err = ModelConfig::from_json(json!({"model_type": "gpt2"})).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("gpt2") && msg.contains("llama, mistral, qwen2"),
            "{msg}"
        );
    }

    #[test]
    fn gqa_heads_must_divide() {
        let err = ModelConfig::from_json(json!({
            "model_type": "llama", "vocab_size": 10, "hidden_size": 12, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2
        }))
        .unwrap_err();
        assert!(format!("{err:#}").contains("multiple"));
    }
}
