//! Numerical parity with Hugging Face transformers on SmolLM2-135M imported from the shared GGUF.
//! Reference numbers: tests/fixtures/model_parity/ (scripts/reference/make_model_fixtures.py).

use candle_core::{DType, Device};
use paft::model::{inference, ChatMessage, Mode, Pretrained};
use serde_json::Value;

use crate::common;

fn load_fixture(name: &str) -> Value {
    let path = common::fixture("model_parity").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_ids_match_transformers() {
    let Some(dir) = common::tokenizer_dir() else {
        return;
    };
    let tok = paft::model::ModelTokenizer::load_dir(dir).unwrap();
    let cases = load_fixture("tokenizer_ids.json");
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 300, "fixture has only {} lines", cases.len());
    let non_ascii = cases
        .iter()
        .filter(|c| !c["text"].as_str().unwrap().is_ascii())
        .count();
    assert!(non_ascii >= 20, "only {non_ascii} non-ASCII lines");
    let mut mismatches = vec![];
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let got = tok.encode(text, true).unwrap();
        if got != ids(&c["ids"]) {
            mismatches.push(c["source"].as_str().unwrap_or("?").to_string());
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} lines differ: {:?}",
        mismatches.len(),
        cases.len(),
        &mismatches[..mismatches.len().min(10)]
    );
}

fn smollm() -> Option<Pretrained> {
    let dir = common::smollm_dir()?;
    Some(Pretrained::load(dir, Some(DType::F32), &Device::Cpu).unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

fn reference_logprobs(v: &Value) -> Vec<f64> {
    // entry 0 is null: the first token has no prediction
    v.as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn logprobs_match_transformers() {
    let Some(pre) = smollm() else { return };
    let fx = load_fixture("logprobs.json");
    let text = fx["text"].as_str().unwrap();
    let want_ids = ids(&fx["ids"]);
    assert_eq!(pre.tokenizer.encode(text, true).unwrap(), want_ids);
    assert!(
        want_ids.len() >= 250,
        "reference text has {} tokens",
        want_ids.len()
    );
    let want = reference_logprobs(&fx["logprobs"]);
    for mode in [Mode::Inference, Mode::Differentiable] {
        let net = pre.model(mode, None).unwrap();
        let got = inference::sequence_logprobs(&net, &[want_ids.clone()], pre.pad_token_id())
            .unwrap()
            .remove(0);
        let diff = max_abs_diff(&got, &want);
        eprintln!(
            "{mode:?}: max |Δ logprob| over {} tokens = {diff:.2e}",
            got.len()
        );
        assert!(diff <= 1e-3, "{mode:?}: max abs diff {diff}");
    }
}

#[test]
fn padded_batch_logprobs_match_transformers() {
    let Some(pre) = smollm() else { return };
    let fx = load_fixture("logprobs_batch.json");
    let cases = fx["items"].as_array().unwrap();
    let seqs: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    assert!(
        seqs.iter().any(|s| s.len() != seqs[0].len()),
        "batch fixture needs different lengths"
    );
    let net = pre.model(Mode::Inference, None).unwrap();
    let got = inference::sequence_logprobs(&net, &seqs, pre.pad_token_id()).unwrap();
    for (g, c) in got.iter().zip(cases) {
        let diff = max_abs_diff(g, &reference_logprobs(&c["logprobs"]));
        assert!(
            diff <= 1e-3,
            "row of {} tokens: max abs diff {diff}",
            g.len()
        );
    }
}

#[test]
fn chat_generation_matches_transformers() {
    let Some(pre) = smollm() else { return };
    let fx = load_fixture("generate.json");
    let net = pre.model(Mode::Inference, None).unwrap();
    let prompt = pre
        .tokenizer
        .apply_chat_template(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let prompt_ids = pre.tokenizer.encode(&prompt, true).unwrap();
    assert_eq!(
        prompt_ids,
        ids(&fx["prompt_ids"]),
        "chat template renders differently from transformers"
    );
    let out = inference::greedy_generate(
        &net,
        &[prompt_ids],
        20,
        &pre.stop_token_ids(),
        pre.pad_token_id(),
    )
    .unwrap()
    .remove(0);
    let want = ids(&fx["ids"]);
    assert_eq!(&out[..], &want[..out.len().min(want.len())]);
    let text = pre.tokenizer.decode(&out, true).unwrap();
    assert!(text.contains("Paris"), "answer: {text}");
}

#[test]
fn cli_generate_answers_paris() {
    let Some(dir) = common::smollm_dir() else {
        return;
    };
    let out = common::run_paft(&[
        "--quiet",
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "20",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    crate::common::expect_success(&out);
    assert!(stdout.contains("Paris"), "answer: {stdout}");
}

#[test]
fn cli_score_json_sums_token_logprobs() {
    let Some(dir) = common::smollm_dir() else {
        return;
    };
    let out = common::run_paft(&[
        "--quiet",
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        "The capital of France is Paris.",
        "--json",
    ]);
    crate::common::expect_success(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lps: Vec<f64> = v["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(v["logprobs"][0].is_null());
    assert_eq!(lps.len() + 1, v["ids"].as_array().unwrap().len());
    assert!(lps.iter().all(|&x| x < 0.0));
    assert!((lps.iter().sum::<f64>() - v["sum_logprob"].as_f64().unwrap()).abs() < 1e-3);
}
