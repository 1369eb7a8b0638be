//! The differentiable forward pass: every weight (and LoRA A/B) gets a gradient that matches a
//! central finite difference in f64.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use paft::model::tiny::TinySpec;
use paft::model::{
    LlamaModel, LoraAdapter, LoraConfig, LoraPair, Mode, TargetModule, TokenBatch, WeightMap,
};
use rand::{Rng, SeedableRng};

use crate::common;

const VOCAB: usize = 97;

fn batch() -> TokenBatch {
    TokenBatch::right_padded(
        &[vec![3, 17, 42, 8, 96, 1, 5], vec![11, 2, 64, 30]],
        &[0, 0],
        0,
    )
}

/// Mean next-token NLL over the real tokens of the batch.
fn loss(model: &LlamaModel) -> Tensor {
    let b = batch();
    let hidden = model.forward(&b, None).unwrap();
    let logp = candle_nn::ops::log_softmax(
        &model.logits(&hidden).unwrap().to_dtype(DType::F64).unwrap(),
        D::Minus1,
    )
    .unwrap();
    let mut terms = vec![];
    for (r, ids) in b.ids.iter().enumerate() {
        for i in 0..ids.len() - 1 {
            if b.valid[r][i + 1] {
                terms.push(
                    logp.get(r)
                        .unwrap()
                        .get(i)
                        .unwrap()
                        .get(ids[i + 1] as usize)
                        .unwrap(),
                );
            }
        }
    }
    let n = terms.len() as f64;
    (Tensor::stack(&terms, 0).unwrap().sum_all().unwrap() * (-1.0 / n)).unwrap()
}

fn lora_adapter(vars: &mut BTreeMap<String, Var>, cfg: &paft::model::ModelConfig) -> LoraAdapter {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let r = 2;
    let mut layers = BTreeMap::new();
    let q = cfg.num_attention_heads * cfg.head_dim;
    for l in 0..cfg.num_hidden_layers {
        for m in TargetModule::ALL {
            let (out, inp) = match m {
                TargetModule::QProj => (q, cfg.hidden_size),
                TargetModule::KProj | TargetModule::VProj => (cfg.kv_dim(), cfg.hidden_size),
                TargetModule::OProj => (cfg.hidden_size, q),
                TargetModule::GateProj | TargetModule::UpProj => {
                    (cfg.intermediate_size, cfg.hidden_size)
                }
                TargetModule::DownProj => (cfg.hidden_size, cfg.intermediate_size),
            };
            let mut rand_var = |shape: (usize, usize)| {
                let data: Vec<f64> = (0..shape.0 * shape.1)
                    .map(|_| rng.random_range(-0.2..0.2))
                    .collect();
                Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
            };
            let (a, b) = (rand_var((r, inp)), rand_var((out, r)));
            let path = m.module_path(l);
            layers.insert(
                path.clone(),
                LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                },
            );
            vars.insert(format!("{path}.lora_A"), a);
            vars.insert(format!("{path}.lora_B"), b);
        }
    }
    LoraAdapter {
        config: LoraConfig {
            r,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: TargetModule::ALL.to_vec(),
            use_rslora: false,
        },
        layers,
    }
}

/// Rebuilds the model with one entry of one variable shifted by `delta`.
fn loss_with(
    vars: &BTreeMap<String, Var>,
    cfg: &paft::model::ModelConfig,
    name: &str,
    entry: usize,
    delta: f64,
) -> f64 {
    let shifted = |n: &str, v: &Var| -> Tensor {
        let t = v.as_tensor().detach();
        if n != name {
            return t;
        }
        let mut data = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        data[entry] += delta;
        Tensor::from_vec(data, t.shape(), &Device::Cpu).unwrap()
    };
    let mut weights = WeightMap::new();
    let mut lora_layers = BTreeMap::new();
    for (n, v) in vars {
        if let Some(path) = n.strip_suffix(".lora_A") {
            let b = &vars[&format!("{path}.lora_B")];
            lora_layers.insert(
                path.to_string(),
                LoraPair {
                    a: shifted(n, v),
                    b: shifted(&format!("{path}.lora_B"), b),
                },
            );
        } else if !n.ends_with(".lora_B") {
            weights.insert(n.clone(), shifted(n, v));
        }
    }
    let lora = LoraAdapter {
        config: LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: TargetModule::ALL.to_vec(),
            use_rslora: false,
        },
        layers: lora_layers,
    };
    let model = LlamaModel::from_weights(cfg, &weights, Some(&lora), Mode::Differentiable).unwrap();
    loss(&model).to_scalar::<f64>().unwrap()
}

#[test]
fn every_weight_gradient_matches_finite_differences() {
    for spec in [
        TinySpec {
            hidden_size: 16,
            intermediate_size: 24,
            ..TinySpec::llama(1)
        },
        TinySpec {
            hidden_size: 16,
            intermediate_size: 24,
            ..TinySpec::qwen2(2)
        },
    ] {
        let cfg = spec.config(VOCAB).unwrap();
        let weights = spec.weights(&cfg, DType::F64, &Device::Cpu).unwrap();
        let mut vars: BTreeMap<String, Var> = weights
            .iter()
            .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
            .collect();
        let lora = lora_adapter(&mut vars, &cfg);
        let tracked: WeightMap = vars
            .iter()
            .filter(|(n, _)| !n.contains(".lora_"))
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let model =
            LlamaModel::from_weights(&cfg, &tracked, Some(&lora), Mode::Differentiable).unwrap();
        let grads = loss(&model).backward().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        let mut worst = 0f64;
        let used_tokens: Vec<usize> = batch().ids.iter().flatten().map(|&i| i as usize).collect();
        for (name, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{:?}: no gradient for `{name}`", spec.architecture));
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(
                g.iter().any(|&x| x != 0.0),
                "gradient of `{name}` is all zero"
            );
            let cols = *var.dims().last().unwrap();
            let entries: Vec<usize> = (0..4)
                .map(|_| {
                    if name == "model.embed_tokens.weight" {
                        // only rows of tokens in the batch get a gradient from the input side
                        used_tokens[rng.random_range(0..used_tokens.len())] * cols
                            + rng.random_range(0..cols)
                    } else {
                        rng.random_range(0..g.len())
                    }
                })
                .collect();
            let eps = 1e-5;
            let (mut num, mut den) = (0f64, 0f64);
            for &e in &entries {
                let fd = (loss_with(&vars, &cfg, name, e, eps)
                    - loss_with(&vars, &cfg, name, e, -eps))
                    / (2.0 * eps);
                num += (g[e] - fd).powi(2);
                den += fd.powi(2).max(g[e].powi(2));
            }
            let rel = if den == 0.0 { 0.0 } else { (num / den).sqrt() };
            assert!(
                rel <= 1e-4,
                "{:?} `{name}`: relative error {rel:.2e}",
                spec.architecture
            );
            worst = worst.max(rel);
        }
        eprintln!(
            "{:?}: {} variables, worst relative error {worst:.2e}",
            spec.architecture,
            vars.len()
        );
    }
}

#[test]
fn inference_and_differentiable_modes_agree() {
    let spec = TinySpec::llama(4);
    let cfg = spec.config(VOCAB).unwrap();
    let w = spec.weights(&cfg, DType::F32, &Device::Cpu).unwrap();
    let a = LlamaModel::from_weights(&cfg, &w, None, Mode::Inference).unwrap();
    let b = LlamaModel::from_weights(&cfg, &w, None, Mode::Differentiable).unwrap();
    let ha = a.forward(&batch(), None).unwrap();
    let hb = b.forward(&batch(), None).unwrap();
    let diff = common::max_abs_diff(&ha, &hb);
    assert!(diff < 1e-4, "modes differ by {diff}");
}

/// Gradient checkpointing recomputes each layer in the backward pass; the gradients of every
/// weight and LoRA factor equal the plain path's (f32, LoRA dropout on, two forwards in one loss
/// as DPO's chosen and rejected), and without the recomputation the layers would get none.
#[test]
fn checkpointed_gradients_equal_the_plain_ones() {
    let second = TokenBatch::right_padded(&[vec![9, 4, 77, 31, 2], vec![50, 6, 13]], &[0, 0], 0);
    let two_forwards = |model: &LlamaModel| -> Tensor {
        model.reseed_dropout(7);
        let h = model.forward(&second, None).unwrap();
        let extra = model.logits(&h).unwrap().sqr().unwrap().mean_all().unwrap();
        (loss(model).to_dtype(DType::F32).unwrap() + (extra * 1e-3).unwrap()).unwrap()
    };
    for spec in [TinySpec::llama(5), TinySpec::qwen2(6)] {
        let cfg = spec.config(VOCAB).unwrap();
        let weights = spec.weights(&cfg, DType::F32, &Device::Cpu).unwrap();
        let mut vars: BTreeMap<String, Var> = weights
            .iter()
            .map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap()))
            .collect();
        let mut lora = lora_adapter(&mut vars, &cfg);
        lora.config.dropout = 0.1;
        let tracked: WeightMap = vars
            .iter()
            .filter(|(n, _)| !n.contains(".lora_"))
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let build =
            || LlamaModel::from_weights(&cfg, &tracked, Some(&lora), Mode::Differentiable).unwrap();
        let plain = two_forwards(&build()).backward().unwrap();
        let model = build().with_gradient_checkpointing(true).unwrap();
        let mut grads = two_forwards(&model).backward().unwrap();
        let q = vars["model.layers.0.self_attn.q_proj.weight"].as_tensor();
        assert!(
            grads.get(q).is_none(),
            "layers must not be in the loss's own graph"
        );
        let params: Vec<&Tensor> = vars.values().map(|v| v.as_tensor()).collect();
        model.backward_checkpoints(&mut grads, &params).unwrap();
        let mut worst = 0f64;
        for (name, var) in &vars {
            let want = plain.get(var.as_tensor()).unwrap();
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{:?}: no gradient for `{name}`", spec.architecture));
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            let rel = (diff
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap())
                / scale.to_scalar::<f64>().unwrap().max(f64::MIN_POSITIVE);
            assert!(
                rel <= 1e-6,
                "{:?} `{name}`: relative difference {rel:.2e}",
                spec.architecture
            );
            worst = worst.max(rel);
        }
        eprintln!(
            "{:?}: {} gradients, worst relative difference {worst:.2e}",
            spec.architecture,
            vars.len()
        );
    }
}
