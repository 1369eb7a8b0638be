//! `paft fetch tasks`: the six leaderboard datasets from the Hugging Face Hub (through hf-hub,
//! into its cache), converted from parquet into the task store's `<task>/<split>.jsonl` layout.

use std::path::{Path, PathBuf};

use crate::io::write_file_atomic;
use anyhow::{Context, Result};

/// A split of a Hub dataset and where it goes in the task store.
pub struct DatasetFile {
    pub repo: &'static str,
    pub file: &'static str,
    pub task_dir: &'static str,
    pub split: &'static str,
}

/// The files the evaluator reads (the evaluation splits, MMLU's dev and GSM8K's train shots).
pub const LEADERBOARD_FILES: [DatasetFile; 8] = [
    DatasetFile {
        repo: "allenai/ai2_arc",
        file: "ARC-Challenge/test-00000-of-00001.parquet",
        task_dir: "arc_challenge",
        split: "test",
    },
    DatasetFile {
        repo: "Rowan/hellaswag",
        file: "data/validation-00000-of-00001.parquet",
        task_dir: "hellaswag",
        split: "validation",
    },
    DatasetFile {
        repo: "cais/mmlu",
        file: "all/test-00000-of-00001.parquet",
        task_dir: "mmlu",
        split: "test",
    },
    DatasetFile {
        repo: "cais/mmlu",
        file: "all/dev-00000-of-00001.parquet",
        task_dir: "mmlu",
        split: "dev",
    },
    DatasetFile {
        repo: "truthfulqa/truthful_qa",
        file: "multiple_choice/validation-00000-of-00001.parquet",
        task_dir: "truthfulqa_mc",
        split: "validation",
    },
    DatasetFile {
        repo: "allenai/winogrande",
        file: "winogrande_xl/validation-00000-of-00001.parquet",
        task_dir: "winogrande",
        split: "validation",
    },
    DatasetFile {
        repo: "openai/gsm8k",
        file: "main/test-00000-of-00001.parquet",
        task_dir: "gsm8k",
        split: "test",
    },
    DatasetFile {
        repo: "openai/gsm8k",
        file: "main/train-00000-of-00001.parquet",
        task_dir: "gsm8k",
        split: "train",
    },
];

/// Downloads every leaderboard file and writes `<out>/<task>/<split>.jsonl`; returns the paths.
pub fn fetch_tasks(out: &Path) -> Result<Vec<PathBuf>> {
    let client =
        hf_hub::HFClientSync::new().context("cannot set up the Hugging Face Hub client")?;
    let local_only = crate::model::hub::offline();
    let mut written = vec![];
    let bar = crate::progress::bar(LEADERBOARD_FILES.len() as u64, "fetch tasks");
    for f in &LEADERBOARD_FILES {
        let (owner, name) = f
            .repo
            .split_once('/')
            .expect("static repo ids have an owner");
        let parquet = client
            .dataset(owner, name)
            .download_file()
            .filename(f.file.to_string())
            .local_files_only(local_only)
            .send()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot get `{}` of dataset `{}` from the Hugging Face Hub: {e}; to use a local \
                     copy instead, pass --tasks-dir DIR holding <task>/<split>.jsonl (or set PAFT_TASKS_DIR)",
                    f.file,
                    f.repo
                )
            })?;
        let jsonl = crate::data::parquet_to_jsonl(&parquet)?;
        let dest = out.join(f.task_dir).join(format!("{}.jsonl", f.split));
        std::fs::create_dir_all(dest.parent().expect("has a parent"))?;
        write_file_atomic(&dest, jsonl.as_bytes())?;
        tracing::info!("{} {} -> {}", f.repo, f.file, dest.display());
        written.push(dest);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(written)
}
