//! Model files round trips: a GGUF written from known weights (llama.cpp's Q/K permutation, mixed
//! F32/F16/Q8_0/Q4_0 tensors) imports back to those weights; a saved model reloads unchanged.

use std::fs::File;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use paft::model::tiny::TinySpec;
use paft::model::{gguf, Mode, Pretrained};

use crate::common;

/// llama.cpp's converter: `w.reshape(h, 2, d/2, in).swapaxes(1, 2)`.
fn permute_rows(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn gguf_name(hf: &str) -> (String, GgmlDType) {
    let map = [
        ("self_attn.q_proj", "attn_q", GgmlDType::F16),
        ("self_attn.k_proj", "attn_k", GgmlDType::Q4_0),
        ("self_attn.v_proj", "attn_v", GgmlDType::Q8_0),
        ("self_attn.o_proj", "attn_output", GgmlDType::F32),
        ("mlp.gate_proj", "ffn_gate", GgmlDType::Q4_1),
        ("mlp.up_proj", "ffn_up", GgmlDType::F16),
        ("mlp.down_proj", "ffn_down", GgmlDType::F32),
        ("input_layernorm", "attn_norm", GgmlDType::F32),
        ("post_attention_layernorm", "ffn_norm", GgmlDType::F32),
    ];
    match hf {
        "model.embed_tokens.weight" => ("token_embd.weight".into(), GgmlDType::Q8_0),
        "model.norm.weight" => ("output_norm.weight".into(), GgmlDType::F32),
        _ => {
            let rest = hf.strip_prefix("model.layers.").unwrap();
            let (layer, module) = rest.split_once('.').unwrap();
            let module = module.strip_suffix(".weight").unwrap();
            let (_, g, dt) = map.iter().find(|(h, _, _)| *h == module).unwrap();
            (format!("blk.{layer}.{g}.weight"), *dt)
        }
    }
}

#[test]
fn gguf_import_recovers_permuted_mixed_precision_weights() {
    if common::require_shared().is_none() {
        return;
    }
    // Tokenizer metadata from the shared model; weights from a tiny seeded Llama.
    let shared = paft::paths::shared_smollm_gguf();
    let mut reader = File::open(&shared).unwrap();
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let n_vocab = content.metadata["tokenizer.ggml.tokens"]
        .to_vec()
        .unwrap()
        .len();
    let spec = TinySpec::llama(21);
    let cfg = spec.config(n_vocab).unwrap();
    let weights = spec.weights(&cfg, DType::F32, &Device::Cpu).unwrap();

    let mut metadata: Vec<(String, Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let u = |x: usize| Value::U32(x as u32);
    metadata.extend([
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("llama.block_count".into(), u(cfg.num_hidden_layers)),
        ("llama.embedding_length".into(), u(cfg.hidden_size)),
        ("llama.feed_forward_length".into(), u(cfg.intermediate_size)),
        (
            "llama.attention.head_count".into(),
            u(cfg.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u(cfg.num_key_value_heads),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        ("llama.context_length".into(), u(2048)),
    ]);
    let mut tensors = vec![];
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    for hf in names {
        let (name, dt) = gguf_name(hf);
        let mut w = weights[hf].clone();
        if hf.ends_with("q_proj.weight") {
            w = permute_rows(&w, cfg.num_attention_heads);
        } else if hf.ends_with("k_proj.weight") {
            w = permute_rows(&w, cfg.num_key_value_heads);
        }
        tensors.push((name, QTensor::quantize(&w, dt).unwrap()));
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    let mut f = File::create(&path).unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md, &ts).unwrap();
    drop(f);

    let out = tmp.path().join("hf");
    gguf::import_gguf(&path, &out, DType::F32, usize::MAX).unwrap();
    let pre = Pretrained::load(&out, None, &Device::Cpu).unwrap();
    assert_eq!(pre.config.num_key_value_heads, 2);
    assert!(pre.config.tie_word_embeddings);
    for (name, want) in &weights {
        let got = &pre.weights[name];
        let err = common::max_abs_diff(&got, &want);
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Exact for F32, f16 rounding for F16; quantisation steps are max/127 (Q8_0) and ~max/8 (Q4).
        let tol = match gguf_name(name).1 {
            GgmlDType::F32 => 0.0,
            GgmlDType::F16 => scale * 1e-3,
            GgmlDType::Q8_0 => scale / 100.0,
            _ => scale / 7.0,
        };
        assert!(err <= tol, "{name}: max error {err} > {tol}");
    }
    // The tokenizer came along and the model runs.
    let ids = pre
        .tokenizer
        .encode("What is the capital of France?", true)
        .unwrap();
    assert_eq!(ids, vec![1780, 314, 260, 3575, 282, 4649, 47]);
    let net = pre.model(Mode::Inference, None).unwrap();
    assert!(
        paft::model::inference::sequence_logprobs(&net, &[ids], 0).unwrap()[0]
            .iter()
            .all(|x| x.is_finite())
    );
}

#[test]
fn saved_model_reloads_identically_sharded_and_in_bf16() {
    let Some(dir) = common::tiny_model(&TinySpec::qwen2(8)) else {
        return;
    };
    let pre = Pretrained::load(dir.path(), None, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("saved");
    pre.save(&out, None, 300_000).unwrap();
    assert!(out.join("model.safetensors.index.json").is_file());
    assert!(out.join("tokenizer.json").is_file() && out.join("tokenizer_config.json").is_file());
    let back = Pretrained::load(&out, None, &Device::Cpu).unwrap();
    assert_eq!(back.config, pre.config);
    for (name, t) in &pre.weights {
        let diff = common::max_abs_diff(&t, &back.weights[name]);
        assert_eq!(diff, 0.0, "{name}");
    }
    let bf = tmp.path().join("bf16");
    pre.save(&bf, Some(DType::BF16), usize::MAX).unwrap();
    let back = Pretrained::load(&bf, None, &Device::Cpu).unwrap();
    assert_eq!(back.weights["model.norm.weight"].dtype(), DType::BF16);
    assert_eq!(back.config.raw["torch_dtype"], "bfloat16");
    // Saving over an existing model is refused and leaves it intact.
    assert!(pre.save(&out, None, usize::MAX).is_err());
    assert!(Pretrained::load(&out, None, &Device::Cpu).is_ok());
}
