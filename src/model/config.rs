//! `config.json` of a Hugging Face causal LM, reduced to what the Llama-family forward needs.
//!
//! Llama, Mistral and Qwen2 share one architecture; their differences are fields here
//! (q/k/v bias, sliding window, tied embeddings), not separate model files.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::rope::RopeConfig;

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
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always, Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama's `attention_bias` covers it too).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// The sliding-window span in tokens, for the layers that slide.
    pub sliding_window: Option<usize>,
    /// Per layer: does it attend within `sliding_window` only (Mistral: all layers when a window
    /// is set; Qwen2: `layer_types`, or the layers from `max_window_layers` on).
    pub sliding_layers: Vec<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The whole original JSON, so that saving a model keeps fields paft does not interpret.
    pub raw: Value,
}

/// What transformers assumes for a key absent from `config.json`, per architecture (the
/// defaults of `LlamaConfig`, `MistralConfig` and `Qwen2Config`, identical in 4.57 and 5.x).
struct ArchDefaults {
    max_position_embeddings: usize,
    /// `None`: as many KV heads as attention heads.
    num_key_value_heads: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
}

impl Architecture {
    fn defaults(self) -> ArchDefaults {
        match self {
            Self::Llama => ArchDefaults {
                max_position_embeddings: 2048,
                num_key_value_heads: None,
                bos_token_id: Some(1),
                eos_token_id: Some(2),
            },
            Self::Mistral => ArchDefaults {
                max_position_embeddings: 4096 * 32,
                num_key_value_heads: Some(8),
                bos_token_id: Some(1),
                eos_token_id: Some(2),
            },
            Self::Qwen2 => ArchDefaults {
                max_position_embeddings: 32768,
                num_key_value_heads: Some(32),
                bos_token_id: None,
                eos_token_id: None,
            },
        }
    }
}

/// Keys transformers reads for these architectures that change the computation in a way paft
/// does not implement: refused rather than ignored.
const UNSUPPORTED_KEYS: [(&str, &str); 4] = [
    (
        "quantization_config",
        "quantized checkpoints cannot be read; dequantize first",
    ),
    (
        "attn_logit_softcapping",
        "logit soft-capping is not part of llama, mistral or qwen2",
    ),
    (
        "final_logit_softcapping",
        "logit soft-capping is not part of llama, mistral or qwen2",
    ),
    (
        "dual_chunk_attention_config",
        "dual-chunk attention is not supported",
    ),
];

/// A JSON value read with transformers' meaning of `null` (= use the default).
struct Keys<'a>(&'a Value);

impl Keys<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .with_context(|| format!("`{key}` must be a non-negative integer, got {v}")),
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.usize(key)?.with_context(|| format!("missing `{key}`"))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .with_context(|| format!("`{key}` must be a number, got {v}")),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .with_context(|| format!("`{key}` must be true or false, got {v}")),
        }
    }

    fn token_ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let bad = || format!("`{key}` must be a token id or a list of them");
        match self.present(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(Some(vec![n.as_u64().with_context(bad)? as u32])),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|x| x as u32).with_context(bad))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => bail!(bad()),
        }
    }
}

/// The storage dtype a config names: `dtype` (transformers ≥ 4.56 and 5) or `torch_dtype`
/// (older); both must agree when both are present.
fn declared_dtype(keys: &Keys) -> Result<Option<String>> {
    let read = |key: &str| -> Result<Option<String>> {
        match keys.present(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim_start_matches("torch.").to_string())),
            Some(v) => bail!("`{key}` must be a string, got {v}"),
        }
    };
    let (new, old) = (read("dtype")?, read("torch_dtype")?);
    if let (Some(a), Some(b)) = (&new, &old) {
        if a != b {
            bail!("`dtype` ({a}) and `torch_dtype` ({b}) disagree");
        }
    }
    let dtype = new.or(old);
    if let Some(d) = &dtype {
        const KNOWN: [&str; 4] = ["float32", "float16", "bfloat16", "float64"];
        if !KNOWN.contains(&d.as_str()) && d != "auto" {
            bail!("unsupported dtype `{d}` (paft reads {})", KNOWN.join(", "));
        }
    }
    Ok(dtype)
}

/// Which layers use the sliding window, as transformers decides it for each architecture.
fn sliding_layout(
    architecture: Architecture,
    keys: &Keys,
    num_layers: usize,
) -> Result<(Option<usize>, Vec<bool>)> {
    match architecture {
        // LlamaConfig has no window.
        Architecture::Llama => Ok((None, vec![false; num_layers])),
        // MistralConfig: 4096 when absent, none when null, on every layer.
        Architecture::Mistral => {
            if keys.present("layer_types").is_some() {
                bail!("`layer_types` on a mistral config: transformers' MistralForCausalLM ignores it (use a model type that alternates layers)");
            }
            let window = match keys.0.get("sliding_window") {
                None => Some(4096),
                Some(_) => keys.usize("sliding_window")?,
            };
            Ok((window, vec![window.is_some(); num_layers]))
        }
        // Qwen2Config: a window only with `use_sliding_window`, on the layers `layer_types`
        // marks, else on the layers from `max_window_layers` on.
        Architecture::Qwen2 => {
            let use_window = keys.bool("use_sliding_window")?.unwrap_or(false);
            let window = if use_window {
                match keys.0.get("sliding_window") {
                    None => Some(4096),
                    Some(_) => keys.usize("sliding_window")?,
                }
            } else {
                None
            };
            let layers = match keys.present("layer_types") {
                Some(Value::Array(types)) => {
                    if types.len() != num_layers {
                        bail!(
                            "`layer_types` has {} entries for {num_layers} layers",
                            types.len()
                        );
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            Some("full_attention") => Ok(false),
                            Some("sliding_attention") => Ok(true),
                            _ => bail!("`layer_types` entry {t} is not supported (full_attention, sliding_attention)"),
                        })
                        .collect::<Result<Vec<_>>>()?
                }
                Some(v) => bail!("`layer_types` must be a list, got {v}"),
                None => {
                    let first = keys.usize("max_window_layers")?.unwrap_or(28);
                    (0..num_layers)
                        .map(|l| window.is_some() && l >= first)
                        .collect()
                }
            };
            if window.is_none() && layers.iter().any(|&s| s) {
                bail!("`layer_types` marks sliding layers but no window is active (`use_sliding_window` is false or `sliding_window` null)");
            }
            Ok((window, layers))
        }
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let mut cfg = Self::from_json(raw)
            .with_context(|| format!("invalid model config {}", path.display()))?;
        let generation = path.with_file_name("generation_config.json");
        if generation.is_file() {
            cfg.add_generation_stop_ids(&generation)?;
        }
        Ok(cfg)
    }

    /// transformers' `generate` stops at generation_config.json's `eos_token_id` (Llama 3
    /// Instruct lists three there and one in config.json): those ids stop generation too.
    fn add_generation_stop_ids(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let ids = Keys(&raw)
            .token_ids("eos_token_id")
            .with_context(|| format!("in {}", path.display()))?
            .unwrap_or_default();
        for id in ids {
            if !self.eos_token_ids.contains(&id) {
                self.eos_token_ids.push(id);
            }
        }
        Ok(())
    }

    /// Reads config.json as transformers 4.x or 5.x writes it. A key transformers would default
    /// gets transformers' default for that architecture; a key that transformers reads and paft
    /// cannot honour is an error.
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
        let keys = Keys(&raw);
        for (key, why) in UNSUPPORTED_KEYS {
            if keys.present(key).is_some() {
                bail!("`{key}` is set: {why}");
            }
        }
        if let Some(act) = keys.present("hidden_act") {
            if act.as_str() != Some("silu") {
                bail!("`hidden_act` {act} is not supported (paft's MLP is SiLU-gated)");
            }
        }
        declared_dtype(&keys)?;
        let defaults = architecture.defaults();
        let hidden_size = keys.required("hidden_size")?;
        let num_attention_heads = keys.required("num_attention_heads")?;
        let num_key_value_heads = match raw.get("num_key_value_heads") {
            // Explicit null means "as many as attention heads" in all three configs.
            Some(Value::Null) => num_attention_heads,
            Some(_) => keys.required("num_key_value_heads")?,
            None => defaults.num_key_value_heads.unwrap_or(num_attention_heads),
        };
        // head_dim: null or 0 means hidden / heads (as the attention modules compute it).
        let head_dim = match keys.usize("head_dim")? {
            Some(d) if d > 0 => d,
            _ => hidden_size / num_attention_heads.max(1),
        };
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            bail!("num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})");
        }
        if head_dim % 2 != 0 {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        let max_position_embeddings = keys
            .usize("max_position_embeddings")?
            .unwrap_or(defaults.max_position_embeddings);
        let rope = RopeConfig::from_config(&raw, max_position_embeddings)?;
        // attention_bias and mlp_bias exist only in LlamaConfig; Mistral and Qwen2 hard-code
        // their biases and ignore the keys, as paft does.
        let llama = architecture == Architecture::Llama;
        let attention_bias = llama && keys.bool("attention_bias")?.unwrap_or(false);
        let mlp_bias = llama && keys.bool("mlp_bias")?.unwrap_or(false);
        let num_hidden_layers = keys.required("num_hidden_layers")?;
        let (sliding_window, sliding_layers) =
            sliding_layout(architecture, &keys, num_hidden_layers)?;
        let first_id = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
            Ok(match raw.get(key) {
                None => default,
                Some(_) => keys.token_ids(key)?.and_then(|v| v.first().copied()),
            })
        };
        let eos_token_ids = match raw.get("eos_token_id") {
            None => defaults.eos_token_id.into_iter().collect(),
            Some(_) => keys.token_ids("eos_token_id")?.unwrap_or_default(),
        };
        let cfg = Self {
            architecture,
            vocab_size: keys.required("vocab_size")?,
            hidden_size,
            intermediate_size: keys.required("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: keys.f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope,
            max_position_embeddings,
            tie_word_embeddings: keys.bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: attention_bias,
            mlp_bias,
            sliding_window,
            sliding_layers,
            bos_token_id: first_id("bos_token_id", defaults.bos_token_id)?,
            eos_token_ids,
            pad_token_id: first_id("pad_token_id", None)?,
            raw,
        };
        Ok(cfg)
    }

    /// Records the weights' dtype in whichever key(s) the config already uses (`dtype` from
    /// transformers ≥ 4.56, `torch_dtype` before), or in `torch_dtype`, which every version reads.
    pub fn set_dtype(&mut self, dtype_name: &str) {
        let value = Value::String(dtype_name.to_string());
        let mut written = false;
        for key in ["dtype", "torch_dtype"] {
            if self.raw.get(key).is_some_and(|v| !v.is_null()) {
                self.raw[key] = value.clone();
                written = true;
            }
        }
        if !written {
            self.raw["torch_dtype"] = value;
        }
    }

    /// Does layer `l` attend within the sliding window only?
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        if self.sliding_layers.get(l).copied().unwrap_or(false) {
            self.sliding_window
        } else {
            None
        }
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
