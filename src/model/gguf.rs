//! `paft import-gguf`: a llama.cpp GGUF file → a Hugging Face model directory (dequantised
//! weights, config.json, tokenizer.json, tokenizer_config.json).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::sequence::Sequence as PostSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::config::ModelConfig;
use super::rope::RopeConfig;
use super::weights::{write_weights, AtomicDir, WeightMap};

pub struct GgufImport {
    pub config: ModelConfig,
    pub tensors: usize,
}

struct Meta<'a> {
    md: &'a HashMap<String, GValue>,
    file: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&GValue> {
        self.md.get(key).with_context(|| {
            format!(
                "{}: GGUF metadata key `{key}` is missing",
                self.file.display()
            )
        })
    }
    fn u(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_u32().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|e| anyhow::anyhow!("{}: `{key}`: {e}", self.file.display()))
    }
    fn f(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f32()
            .map(|x| x as f64)
            .or_else(|_| v.to_f64())
            .map_err(|e| anyhow::anyhow!("{}: `{key}`: {e}", self.file.display()))
    }
    fn opt_u(&self, key: &str) -> Option<u32> {
        self.md.get(key).and_then(|v| {
            v.to_u32()
                .ok()
                .or_else(|| v.to_u64().ok().map(|x| x as u32))
        })
    }
    fn opt_bool(&self, key: &str) -> Option<bool> {
        self.md.get(key).and_then(|v| v.to_bool().ok())
    }
    /// llama.cpp token types (1 normal, 3 control, 4 user-defined); all normal when absent.
    fn token_types(&self, n: usize) -> Result<Vec<i32>> {
        match self.md.get("tokenizer.ggml.token_type") {
            Some(v) => Ok(v
                .to_vec()
                .map_err(anyhow::Error::msg)?
                .iter()
                .map(|x| x.to_i32().unwrap_or(1))
                .collect()),
            None => Ok(vec![1; n]),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{}: `{key}`: {e}", self.file.display()))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| anyhow::anyhow!("{}: `{key}`: {e}", self.file.display()))
            })
            .collect()
    }
}

/// Imports `gguf` into `out` (created atomically). `dtype` is the dtype of the written weights.
pub fn import_gguf(
    gguf: &Path,
    out: &Path,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<GgufImport> {
    let file = File::open(gguf).with_context(|| format!("cannot open {}", gguf.display()))?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a readable GGUF file (truncated or corrupt): {e}",
            gguf.display()
        )
    })?;
    // Check every tensor's extent up front so a truncated file fails before any work.
    for (name, info) in &content.tensor_infos {
        let bytes =
            info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > file_len {
            bail!(
                "{} is truncated: tensor `{name}` ends at byte {end} but the file has {file_len} bytes",
                gguf.display()
            );
        }
    }
    let meta = Meta {
        md: &content.metadata,
        file: gguf,
    };
    let arch = meta
        .get("general.architecture")?
        .to_string()
        .map_err(anyhow::Error::msg)?
        .clone();
    let (model_type, permute_qk) = match arch.as_str() {
        "llama" => ("llama", true),
        "mistral" => ("mistral", true),
        "qwen2" => ("qwen2", false),
        other => bail!(
            "{}: GGUF architecture `{other}` is not supported (llama, mistral, qwen2)",
            gguf.display()
        ),
    };
    let k = |s: &str| format!("{arch}.{s}");
    let n_head = meta.u(&k("attention.head_count"))?;
    let n_kv = meta.u(&k("attention.head_count_kv")).unwrap_or(n_head);
    let hidden = meta.u(&k("embedding_length"))?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let has_output = content.tensor_infos.contains_key("output.weight");
    let head_dim = meta
        .u(&k("attention.key_length"))
        .unwrap_or(hidden / n_head);

    let context_length = meta.u(&k("context_length"))?;
    let rope_freqs = match content.tensor_infos.contains_key("rope_freqs.weight") {
        false => None,
        true => Some(
            content
                .tensor(&mut reader, "rope_freqs.weight", &Device::Cpu)
                .and_then(|q| q.dequantize(&Device::Cpu))
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| {
                    anyhow::anyhow!("{}: cannot read `rope_freqs.weight`: {e}", gguf.display())
                })?,
        ),
    };
    let rope = gguf_rope(
        &meta,
        &arch,
        head_dim,
        context_length,
        rope_freqs.as_deref(),
    )
    .with_context(|| format!("{}: RoPE settings", gguf.display()))?;
    let (rope_theta, rope_scaling) = rope.legacy_json();
    // transformers 4's layout (top-level rope_theta / rope_scaling, torch_dtype): transformers 4
    // reads only this one, and transformers 5 still reads it.
    let mut cfg = json!({
        "architectures": [match model_type { "llama" => "LlamaForCausalLM", "mistral" => "MistralForCausalLM", _ => "Qwen2ForCausalLM" }],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": meta.u(&k("feed_forward_length"))?,
        "num_hidden_layers": meta.u(&k("block_count"))?,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": meta.f(&k("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": rope_theta,
        "max_position_embeddings": context_length,
        "vocab_size": meta.u(&k("vocab_size")).unwrap_or(tokens.len()),
        "tie_word_embeddings": !has_output,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "rope_scaling": rope_scaling,
        "initializer_range": 0.02,
        "torch_dtype": dtype_name(dtype),
        "use_cache": true,
    });
    if let Some(id) = meta.opt_u("tokenizer.ggml.bos_token_id") {
        cfg["bos_token_id"] = json!(id);
    }
    if let Some(id) = meta.opt_u("tokenizer.ggml.eos_token_id") {
        cfg["eos_token_id"] = json!(id);
    }
    if let Some(id) = meta.opt_u("tokenizer.ggml.padding_token_id") {
        cfg["pad_token_id"] = json!(id);
    }
    if model_type == "qwen2" {
        cfg["use_sliding_window"] = json!(false);
    }
    if model_type == "mistral" {
        // Explicit either way: MistralConfig would default an absent window to 4096.
        cfg["sliding_window"] = json!(meta.opt_u(&k("attention.sliding_window")));
    }
    let config = ModelConfig::from_json(cfg)
        .with_context(|| format!("{}: metadata gives an invalid config", gguf.display()))?;

    let dir = AtomicDir::new(out)?;
    write_tokenizer_files(&meta, dir.path())?;
    config.write(&dir.path().join("config.json"))?;
    let mut gen = json!({});
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.raw.get(key) {
            gen[key] = v.clone();
        }
    }
    std::fs::write(
        dir.path().join("generation_config.json"),
        serde_json::to_string_pretty(&gen)? + "\n",
    )?;

    let dev = Device::Cpu;
    let mut weights = WeightMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let Some(hf) = hf_tensor_name(name) else {
            if name == "rope_freqs.weight" {
                continue; // derived from metadata by the config
            }
            bail!(
                "{}: tensor `{name}` has no Hugging Face equivalent paft knows",
                gguf.display()
            );
        };
        let q = content
            .tensor(&mut reader, name, &dev)
            .map_err(|e| anyhow::anyhow!("{}: cannot read tensor `{name}`: {e}", gguf.display()))?;
        let mut t = q.dequantize(&dev)?;
        if permute_qk && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            let heads = if name.ends_with("attn_q.weight") {
                n_head
            } else {
                n_kv
            };
            t = unpermute_rows(&t, heads)?;
        }
        weights.insert(hf, t.to_dtype(dtype)?);
    }
    let emb = weights
        .get("model.embed_tokens.weight")
        .context("GGUF has no token_embd.weight")?;
    if emb.dim(0)? < config.vocab_size {
        bail!(
            "{}: token_embd has {} rows but vocab_size is {}",
            gguf.display(),
            emb.dim(0)?,
            config.vocab_size
        );
    }
    for (name, shape) in config.expected_tensors() {
        match weights.get(&name) {
            None => bail!("{}: no tensor maps to `{name}`", gguf.display()),
            Some(t) if t.dims() != shape.as_slice() => {
                bail!(
                    "{}: `{name}` has shape {:?}, config implies {:?}",
                    gguf.display(),
                    t.dims(),
                    shape
                )
            }
            _ => {}
        }
    }
    let n = weights.len();
    write_weights(dir.path(), &weights, None, max_shard_bytes)?;
    dir.commit()?;
    Ok(GgufImport { config, tensors: n })
}

/// The RoPE that llama.cpp would run for this file, as a transformers config expresses it.
/// llama.cpp stores Llama 3 frequency scaling only as the per-frequency divisors
/// `rope_freqs.weight`; those are matched against the published Llama 3.1 / 3.2 settings.
fn gguf_rope(
    meta: &Meta,
    arch: &str,
    head_dim: usize,
    context_length: usize,
    rope_freqs: Option<&[f32]>,
) -> Result<RopeConfig> {
    let key = |s: &str| format!("{arch}.{s}");
    if let Some(n) = meta.opt_u(&key("rope.dimension_count")) {
        if n as usize != head_dim {
            bail!("rope.dimension_count {n} differs from the head size {head_dim} (partial rotary embeddings are not supported)");
        }
    }
    // llama.cpp's own default when the key is absent.
    let theta = match meta.md.get(&key("rope.freq_base")) {
        Some(_) => meta.f(&key("rope.freq_base"))?,
        None => 10_000.0,
    };
    let kind = match meta.md.get(&key("rope.scaling.type")) {
        Some(v) => v.to_string().map_err(anyhow::Error::msg)?.clone(),
        None if meta.md.contains_key(&key("rope.scale_linear")) => "linear".into(),
        None => "none".into(),
    };
    let factor = || -> Result<f64> {
        meta.f(&key("rope.scaling.factor"))
            .or_else(|_| meta.f(&key("rope.scale_linear")))
    };
    let scaling = match kind.as_str() {
        "none" => None,
        "linear" => Some(json!({"rope_type": "linear", "factor": factor()?})),
        "yarn" => Some(json!({
            "rope_type": "yarn",
            "factor": factor()?,
            "original_max_position_embeddings": meta.u(&key("rope.scaling.original_context_length"))?,
        })),
        other => bail!("rope.scaling.type `{other}` is not supported (none, linear, yarn)"),
    };
    let plain = RopeConfig::from_config(&json!({"rope_theta": theta}), context_length)?;
    let Some(divisors) = rope_freqs else {
        return RopeConfig::from_config(
            &json!({"rope_theta": theta, "rope_scaling": scaling}),
            context_length,
        );
    };
    if scaling.is_some() {
        bail!("both rope.scaling.type `{kind}` and a rope_freqs tensor are present");
    }
    // (factor, low_freq_factor, high_freq_factor, original context): Llama 3.1, Llama 3.2.
    const LLAMA3: [(f64, f64, f64, usize); 2] = [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192)];
    let base = plain.inv_freq(head_dim);
    for (factor, low, high, original) in LLAMA3 {
        let candidate = RopeConfig::from_config(
            &json!({"rope_theta": theta, "rope_scaling": {"rope_type": "llama3", "factor": factor,
                "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": original}}),
            context_length,
        )?;
        let fits = candidate
            .inv_freq(head_dim)
            .iter()
            .zip(&base)
            .zip(divisors)
            .all(|((s, b), d)| ((b / s) - d).abs() <= 1e-3 * d.abs());
        if divisors.len() == base.len() && fits {
            return Ok(candidate);
        }
    }
    bail!("the rope_freqs tensor matches none of the Llama 3 frequency scalings paft knows (Llama 3.1, 3.2); import the Hugging Face checkpoint instead")
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

fn hf_tensor_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Writes only `tokenizer.json` and `tokenizer_config.json` of a GGUF file into `dir` (reads the
/// metadata, not the weights).
pub fn export_tokenizer(gguf: &Path, dir: &Path) -> Result<()> {
    let mut reader = BufReader::new(
        File::open(gguf).with_context(|| format!("cannot open {}", gguf.display()))?,
    );
    let content = Content::read(&mut reader).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a readable GGUF file (truncated or corrupt): {e}",
            gguf.display()
        )
    })?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_tokenizer_files(
        &Meta {
            md: &content.metadata,
            file: gguf,
        },
        dir,
    )
}

fn write_tokenizer_files(meta: &Meta, dir: &Path) -> Result<()> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    build_tokenizer(meta)?
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    write_tokenizer_config(meta, &tokens, &dir.join("tokenizer_config.json"))
}

/// Undoes llama.cpp's Q/K row permutation (it stores `w.reshape(h, 2, d/2, in).swapaxes(1, 2)`
/// so that its interleaved RoPE matches HF's half-split one).
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// Byte-level BPE tokenizer from `tokenizer.ggml.*`. The pre-tokenizer follows the GGUF `pre`
/// name (candle's own GGUF builder mishandles SmolLM2's `smollm` and adds a prefix space).
fn build_tokenizer(meta: &Meta) -> Result<Tokenizer> {
    let model = meta
        .get("tokenizer.ggml.model")?
        .to_string()
        .map_err(anyhow::Error::msg)?
        .clone();
    if model != "gpt2" {
        bail!(
            "{}: tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)",
            meta.file.display()
        );
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let types = meta.token_types(tokens.len())?;
    let pre = meta
        .md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("bad merge `{m}`"))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("{}: cannot build BPE: {e}", meta.file.display()))?;
    let mut tk = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer = match pre.as_str() {
        "smollm" | "gpt-2" | "gpt2" | "default" | "" => {
            if pre == "smollm" {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()])
            } else {
                Sequence::new(vec![byte_level.into()])
            }
        }
        "qwen2" | "llama3" | "llama-bpe" => {
            let pattern = if pre == "qwen2" {
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            } else {
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            };
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow::anyhow!("bad pre-tokenizer regex: {e}"))?;
            Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
        }
        other => bail!(
            "{}: GGUF pre-tokenizer `{other}` is not supported",
            meta.file.display()
        ),
    };
    tk.with_pre_tokenizer(Some(pre_tokenizer));
    tk.with_decoder(Some(ByteLevel::default()));
    tk.with_post_processor(Some(post_processor(meta, &tokens)?));
    let specials: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, &t)| AddedToken::from(tokens[i].clone(), t == 3))
        .collect();
    tk.add_special_tokens(specials)
        .map_err(|e| anyhow::anyhow!("cannot add special tokens: {e}"))?;
    Ok(tk)
}

/// ByteLevel, plus BOS/EOS where the GGUF's `add_bos_token` / `add_eos_token` ask for them
/// (llama.cpp adds them at tokenization; tokenizer_config.json records the same flags, and
/// transformers 5 rebuilds the post-processor from them, so the two must agree).
fn post_processor(meta: &Meta, tokens: &[String]) -> Result<PostProcessorWrapper> {
    let byte_level = PostProcessorWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let special = |flag: &str, id_key: &str| -> Result<Option<(String, u32)>> {
        if !meta.opt_bool(flag).unwrap_or(false) {
            return Ok(None);
        }
        let id = meta.opt_u(id_key).with_context(|| {
            format!(
                "{}: `{flag}` is true but `{id_key}` is missing",
                meta.file.display()
            )
        })?;
        let token = tokens.get(id as usize).with_context(|| {
            format!(
                "{}: `{id_key}` {id} is outside the vocabulary",
                meta.file.display()
            )
        })?;
        Ok(Some((token.clone(), id)))
    };
    let bos = special(
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.bos_token_id",
    )?;
    let eos = special(
        "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.eos_token_id",
    )?;
    if bos.is_none() && eos.is_none() {
        return Ok(byte_level);
    }
    let wrap = |body: &str| {
        let pre = bos
            .as_ref()
            .map(|(t, _)| format!("{t} "))
            .unwrap_or_default();
        let post = eos
            .as_ref()
            .map(|(t, _)| format!(" {t}"))
            .unwrap_or_default();
        format!("{pre}{body}{post}")
    };
    let template = TemplateProcessing::builder()
        .try_single(wrap("$A"))
        .and_then(|b| b.try_pair(format!("{} {}", wrap("$A"), wrap("$B:1"))))
        .map_err(|e| anyhow::anyhow!("cannot build the BOS/EOS template: {e}"))?
        .special_tokens(bos.iter().chain(&eos).cloned().collect::<Vec<_>>())
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the BOS/EOS template: {e}"))?;
    Ok(PostProcessorWrapper::Sequence(PostSequence::new(vec![
        byte_level,
        PostProcessorWrapper::Template(template),
    ])))
}

fn write_tokenizer_config(meta: &Meta, tokens: &[String], path: &Path) -> Result<()> {
    let tok = |key: &str| {
        meta.opt_u(key)
            .and_then(|i| tokens.get(i as usize))
            .cloned()
    };
    let types = meta.token_types(tokens.len())?;
    let mut added = serde_json::Map::new();
    for (i, &t) in types.iter().enumerate() {
        if t == 3 || t == 4 {
            added.insert(
                i.to_string(),
                json!({"content": tokens[i], "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": t == 3}),
            );
        }
    }
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": meta.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        "add_eos_token": meta.opt_bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": added,
        "model_max_length": meta.opt_u(&format!("{}.context_length", meta.md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default())).unwrap_or(4096),
    });
    for (key, gkey) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ] {
        if let Some(t) = tok(gkey) {
            cfg[key] = json!(t);
        }
    }
    if let Some(t) = meta
        .md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    {
        cfg["chat_template"] = json!(t);
    }
    std::fs::write(path, serde_json::to_string_pretty(&cfg)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))
}
