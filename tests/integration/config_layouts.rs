//! config.json as transformers 4.x and 5.x write it. Tiny llama, mistral and qwen2 models saved by
//! each generation (tests/fixtures/config_layouts/, made by
//! scripts/reference/make_config_fixtures.py): paft's log-probs against transformers', and proof
//! that the fixtures would catch a misread RoPE or window.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use paft::model::rope::RopeConfig;
use paft::model::{inference, LlamaModel, Mode, ModelConfig, ModelFiles};
use serde_json::Value;

use crate::common;

const GENERATIONS: [&str; 2] = ["tf4", "tf5"];
const CASES: [&str; 7] = [
    "llama_theta",
    "llama_llama3",
    "llama_linear",
    "mistral_window",
    "qwen2_theta",
    "qwen2_window_layers",
    "qwen2_yarn",
];

fn generation_dir(generation: &str) -> PathBuf {
    common::fixture("config_layouts").join(generation)
}

fn expected(generation: &str) -> Value {
    let path = generation_dir(generation).join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn sequences(expected: &Value) -> Vec<Vec<u32>> {
    expected["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// paft's log-probs for `dir`'s weights under `config` (possibly altered).
fn logprobs(dir: &Path, config: &ModelConfig, seqs: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let files = ModelFiles::open(dir).unwrap();
    let weights = files.load_weights(Some(DType::F32), &Device::Cpu).unwrap();
    let model = LlamaModel::from_weights(config, &weights, None, Mode::Inference).unwrap();
    seqs.iter()
        .map(|s| {
            inference::sequence_logprobs(&model, std::slice::from_ref(s), 0).unwrap()[0].clone()
        })
        .collect()
}

fn max_diff(got: &[Vec<f32>], want: &Value) -> f64 {
    got.iter()
        .zip(want.as_array().unwrap())
        .flat_map(|(g, w)| {
            let w = w.as_array().unwrap();
            assert_eq!(g.len(), w.len());
            g.iter()
                .zip(w)
                .map(|(a, b)| (*a as f64 - b.as_f64().unwrap()).abs())
        })
        .fold(0.0, f64::max)
}

#[test]
fn both_generations_match_transformers() {
    let mut report = vec![];
    for generation in GENERATIONS {
        let exp = expected(generation);
        let seqs = sequences(&exp);
        for case in CASES {
            let dir = generation_dir(generation).join(case);
            let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
            let d = max_diff(
                &logprobs(&dir, &config, &seqs),
                &exp["cases"][case]["logprobs"],
            );
            report.push(format!("{generation}/{case}: {d:.2e}"));
            assert!(
                d <= 1e-4,
                "{generation}/{case}: max |Δ log p| {d:.3e} > 1e-4"
            );
        }
    }
    eprintln!("log-prob parity: {}", report.join(", "));
}

#[test]
fn the_two_generations_write_different_layouts_of_one_model() {
    for case in CASES {
        let read = |g: &str| {
            let path = generation_dir(g).join(case).join("config.json");
            let raw: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            raw
        };
        let (v4, v5) = (read("tf4"), read("tf5"));
        // The layouts really differ (so both readers are exercised) ...
        assert!(
            v4.get("rope_theta").is_some() && v4.get("rope_parameters").is_none(),
            "{case}"
        );
        assert!(
            v5.get("rope_parameters").is_some() && v5.get("rope_theta").is_none(),
            "{case}"
        );
        // ... and mean the same model.
        let (a, b) = (
            ModelConfig::from_json(v4).unwrap(),
            ModelConfig::from_json(v5).unwrap(),
        );
        assert_eq!(a.rope, b.rope, "{case}");
        assert_eq!(
            (a.sliding_window, &a.sliding_layers),
            (b.sliding_window, &b.sliding_layers),
            "{case}"
        );
    }
}

/// The fixtures are sensitive to what they test: reading a 5.x config's RoPE as θ = 10 000 without
/// scaling (paft's old fallback), dropping only the scaling, or dropping a sliding window moves
/// the log-probs far beyond the 1e-4 tolerance.
#[test]
fn a_misread_rope_or_window_would_fail_the_parity_test() {
    let exp = expected("tf5");
    let seqs = sequences(&exp);
    let mut report = vec![];
    for case in CASES {
        let dir = generation_dir("tf5").join(case);
        let right = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let want = &exp["cases"][case]["logprobs"];
        let mut misread = right.clone();
        misread.rope = RopeConfig {
            theta: 10_000.0,
            scaling: None,
        };
        let d = max_diff(&logprobs(&dir, &misread, &seqs), want);
        report.push(format!("{case} θ=10000: {d:.3}"));
        assert!(
            d > 0.05,
            "{case}: θ = 10 000 moves log-probs by only {d:.3e}"
        );
        if right.rope.scaling.is_some() {
            let mut unscaled = right.clone();
            unscaled.rope.scaling = None;
            let d = max_diff(&logprobs(&dir, &unscaled, &seqs), want);
            report.push(format!("{case} scaling dropped: {d:.3}"));
            assert!(
                d > 0.05,
                "{case}: dropping the RoPE scaling moves log-probs by only {d:.3e}"
            );
        }
        if right.sliding_layers.contains(&true) {
            let mut no_window = right.clone();
            no_window.sliding_layers = vec![false; right.num_hidden_layers];
            let d = max_diff(&logprobs(&dir, &no_window, &seqs), want);
            report.push(format!("{case} no window: {d:.3}"));
            assert!(
                d > 0.05,
                "{case}: dropping the window moves log-probs by only {d:.3e}"
            );
        }
    }
    eprintln!(
        "sensitivity (max |Δ log p| when misread): {}",
        report.join(", ")
    );
}

/// A copy of a 5.x fixture whose `rope_parameters` is edited by `edit`.
fn edited_copy(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let src = generation_dir("tf5").join("llama_theta");
    let tmp = tempfile::tempdir().unwrap();
    let mut raw: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut raw["rope_parameters"]);
    std::fs::write(tmp.path().join("config.json"), raw.to_string()).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    tmp
}

#[test]
fn unsupported_or_incomplete_rope_parameters_are_clear_errors() {
    let dynamic = edited_copy(|p| {
        p["rope_type"] = "dynamic".into();
        p["factor"] = 2.0.into();
    });
    let no_theta = edited_copy(|p| {
        p.as_object_mut().unwrap().remove("rope_theta");
    });
    for (dir, needle) in [(&dynamic, "`dynamic`"), (&no_theta, "no `rope_theta`")] {
        let err = ModelFiles::open(dir.path()).err().expect("must be refused");
        let msg = format!("{err:#}");
        assert!(msg.contains(needle), "{msg}");
        assert!(
            msg.contains("config.json"),
            "the error names the file: {msg}"
        );
    }
    // The CLI says the same, without a panic.
    let out = common::run_paft(&[
        "score",
        "--model",
        dynamic.path().to_str().unwrap(),
        "--text",
        "a",
    ]);
    let msg = common::expect_clean_failure(&out);
    assert!(msg.contains("`dynamic`"), "{msg}");
}
