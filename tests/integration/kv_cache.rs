//! The KV-cache path agrees with full forward passes: shared prefix prefilled once, then a batch of
//! continuations; batched (left-padded) generation equals one-at-a-time generation.

use candle_core::{DType, Device};
use paft::model::tiny::TinySpec;
use paft::model::{inference, Mode, Pretrained};

use crate::common;

fn check_prefix_continuations(pre: &Pretrained, prefix: &str, conts: &[&str]) -> f64 {
    let net = pre.model(Mode::Inference, None).unwrap();
    let prefix_ids = pre.tokenizer.encode(prefix, true).unwrap();
    let cont_ids: Vec<Vec<u32>> = conts
        .iter()
        .map(|c| pre.tokenizer.encode(c, false).unwrap())
        .collect();
    let cached =
        inference::continuation_logprobs(&net, &prefix_ids, &cont_ids, pre.pad_token_id()).unwrap();
    let mut worst = 0f64;
    for (c, got) in cont_ids.iter().zip(&cached) {
        let full: Vec<u32> = prefix_ids.iter().chain(c).copied().collect();
        let all = inference::sequence_logprobs(&net, &[full], pre.pad_token_id())
            .unwrap()
            .remove(0);
        let want = &all[prefix_ids.len() - 1..];
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(want) {
            worst = worst.max((a - b).abs() as f64);
        }
    }
    worst
}

const PREFIX: &str =
    "Question: Which gas do plants absorb from the air for photosynthesis?\nAnswer:";
const CONTINUATIONS: [&str; 4] = [
    " carbon dioxide",
    " oxygen",
    " nitrogen gas from the soil",
    " helium",
];

#[test]
fn shared_prefix_batch_equals_full_passes_on_smollm() {
    let Some(dir) = common::smollm_dir() else {
        return;
    };
    let pre = Pretrained::load(dir, Some(DType::F32), &Device::Cpu).unwrap();
    let worst = check_prefix_continuations(&pre, PREFIX, &CONTINUATIONS);
    eprintln!("SmolLM2: max |Δ| cached vs full = {worst:.2e}");
    assert!(worst <= 1e-4, "max abs diff {worst}");
}

#[test]
fn shared_prefix_batch_equals_full_passes_on_tiny_qwen2() {
    let Some(dir) = common::tiny_model(&TinySpec::qwen2(7)) else {
        return;
    };
    let pre = Pretrained::load(dir.path(), Some(DType::F32), &Device::Cpu).unwrap();
    assert!(check_prefix_continuations(&pre, PREFIX, &CONTINUATIONS) <= 1e-4);
}

#[test]
fn batched_generation_equals_single() {
    let Some(dir) = common::tiny_model(&TinySpec::llama(3)) else {
        return;
    };
    let pre = Pretrained::load(dir.path(), Some(DType::F32), &Device::Cpu).unwrap();
    let net = pre.model(Mode::Inference, None).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "Hello there",
        "A much longer prompt with many more tokens in it",
        "x",
    ]
    .iter()
    .map(|p| pre.tokenizer.encode(p, true).unwrap())
    .collect();
    let batched = inference::greedy_generate(&net, &prompts, 8, &[], pre.pad_token_id()).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let single =
            inference::greedy_generate(&net, std::slice::from_ref(p), 8, &[], pre.pad_token_id())
                .unwrap()
                .remove(0);
        assert_eq!(&single, b);
        assert_eq!(b.len(), 8);
    }
}

#[test]
fn forked_cache_is_independent() {
    let Some(dir) = common::tiny_model(&TinySpec::llama(5)) else {
        return;
    };
    let pre = Pretrained::load(dir.path(), Some(DType::F32), &Device::Cpu).unwrap();
    let net = pre.model(Mode::Inference, None).unwrap();
    let ids = pre.tokenizer.encode("one two three", true).unwrap();
    let mut cache = net.new_cache();
    net.forward(
        &paft::model::TokenBatch::right_padded(&[ids.clone()], &[0], 0),
        Some(&mut cache),
    )
    .unwrap();
    let fork = cache.fork(2).unwrap();
    let mut a = fork.clone();
    net.forward(
        &paft::model::TokenBatch::right_padded(&[vec![5], vec![6]], &[ids.len() as u32; 2], 0),
        Some(&mut a),
    )
    .unwrap();
    assert_eq!(fork.len(), ids.len());
    assert_eq!(a.len(), ids.len() + 1);
    assert_eq!(cache.batch_size(), 1);
}
