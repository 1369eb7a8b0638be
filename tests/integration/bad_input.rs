//! Corrupt or inconsistent model files give one clear error naming the file; no panic, and no
//! output directory left behind.

use std::path::Path;

use paft::model::tiny::TinySpec;
use paft::model::weights::{write_weights, WeightMap};
use paft::model::ModelConfig;

use crate::common::{self, expect_clean_failure, run_paft};

fn score(dir: &Path) -> std::process::Output {
    run_paft(&[
        "--quiet",
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        "hello world",
    ])
}

#[test]
fn truncated_gguf_is_rejected_without_output() {
    if common::require_shared().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(paft::paths::shared_smollm_gguf()).unwrap();
    std::fs::write(&gguf, &bytes[..bytes.len() / 2]).unwrap();
    let out_dir = tmp.path().join("out");
    let out = run_paft(&[
        "--quiet",
        "import-gguf",
        gguf.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let err = expect_clean_failure(&out);
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    assert!(!out_dir.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "left behind: {leftovers:?}");

    // A header cut short fails as well, at the header.
    std::fs::write(&gguf, &bytes[..100]).unwrap();
    let err = expect_clean_failure(&run_paft(&[
        "--quiet",
        "import-gguf",
        gguf.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]));
    assert!(err.contains("cut.gguf"), "{err}");
    assert!(!out_dir.exists());
}

#[test]
fn truncated_safetensors_is_rejected() {
    let Some(dir) = common::tiny_model(&TinySpec::llama(1)) else {
        return;
    };
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 1000]).unwrap();
    let err = expect_clean_failure(&score(dir.path()));
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn shard_missing_from_index_is_rejected() {
    let Some(dir) = common::tiny_model(&TinySpec::llama(1)) else {
        return;
    };
    // Re-write the weights as several shards, then delete one.
    let files = paft::model::SafetensorsFiles::open_dir(dir.path()).unwrap();
    let weights: WeightMap = files.load_all(None, &candle_core::Device::Cpu).unwrap();
    drop(files);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    write_weights(dir.path(), &weights, None, 100_000).unwrap();
    let shard = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("model-00002-of-")
        })
        .expect("several shards");
    let shard_name = shard.file_name().unwrap().to_str().unwrap().to_string();
    // Sharded model loads before the damage.
    let ok = score(dir.path());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::remove_file(&shard).unwrap();
    let err = expect_clean_failure(&score(dir.path()));
    assert!(
        err.contains("model.safetensors.index.json") && err.contains(&shard_name),
        "{err}"
    );
}

#[test]
fn unknown_model_type_is_rejected() {
    let Some(dir) = common::tiny_model(&TinySpec::llama(1)) else {
        return;
    };
    let cfg_path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"llama\"", "\"falcon\"");
    std::fs::write(&cfg_path, text).unwrap();
    let err = expect_clean_failure(&score(dir.path()));
    assert!(
        err.contains("config.json")
            && err.contains("falcon")
            && err.contains("llama, mistral, qwen2"),
        "{err}"
    );
}

#[test]
fn tokenizer_larger_than_embedding_is_rejected() {
    let Some(dir) = common::tiny_model(&TinySpec::llama(1)) else {
        return;
    };
    // Shrink the model's vocabulary below the tokenizer's.
    let spec = TinySpec::llama(1);
    let cfg: ModelConfig = spec.config(1000).unwrap();
    cfg.write(&dir.path().join("config.json")).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let w = spec
        .weights(&cfg, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    write_weights(dir.path(), &w, None, usize::MAX).unwrap();
    let err = expect_clean_failure(&score(dir.path()));
    assert!(
        err.contains("tokenizer.json") && err.contains("1000 rows"),
        "{err}"
    );
}

#[test]
fn existing_output_directory_is_not_overwritten() {
    if common::require_shared().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("keep.txt"), "mine").unwrap();
    let gguf = paft::paths::shared_smollm_gguf();
    let err = expect_clean_failure(&run_paft(&[
        "--quiet",
        "import-gguf",
        gguf.to_str().unwrap(),
        "--out",
        tmp.path().to_str().unwrap(),
    ]));
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("keep.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn a_sample_larger_than_its_pool_is_refused() {
    let Some(model) = common::tiny_model(&paft::model::tiny::TinySpec::llama(3)) else {
        return;
    };
    let out = common::paft()
        .args(["--quiet", "eval", "--model"])
        .arg(model.path())
        .args([
            "--tasks",
            "winogrande",
            "--pool",
            "report",
            "--sample",
            "1000",
        ])
        .env("PAFT_TASKS_DIR", common::shared_tasks_dir())
        .output()
        .unwrap();
    let msg = common::expect_clean_failure(&out);
    assert!(
        msg.contains("winogrande") && msg.contains("report pool has") && msg.contains("1000"),
        "{msg}"
    );
}
