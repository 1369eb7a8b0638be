//! Model references: a local directory or a Hugging Face Hub id (downloaded through hf-hub into
//! the standard cache, honouring HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hf_hub::HFClientSync;

use super::weights::{INDEX_FILE, SINGLE_FILE};

const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 3] = [
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

pub(crate) fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim(),
            "1" | "true" | "TRUE" | "True" | "yes" | "ON" | "on"
        )
    })
}

pub(crate) fn hint(spec: &str) -> String {
    format!(
        "to use a model on disk instead, pass its directory (config.json, tokenizer.json, *.safetensors) \
         in place of `{spec}`, e.g. one written by `paft import-gguf`"
    )
}

/// Downloads config, tokenizer and safetensors weights of `repo` into the Hugging Face cache and
/// returns the snapshot directory.
pub fn fetch_model(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let (owner, name) = repo
        .split_once('/')
        .with_context(|| format!("`{repo}` is not a repo id (owner/name)"))?;
    let client = HFClientSync::new().context("cannot set up the Hugging Face Hub client")?;
    let handle = client.model(owner, name);
    let local_only = offline();
    let get = |file: &str| -> Result<PathBuf, hf_hub::HFError> {
        handle
            .download_file()
            .filename(file.to_string())
            .local_files_only(local_only)
            .maybe_revision(revision.map(String::from))
            .send()
    };
    let where_ = if local_only {
        "the local Hugging Face cache (HF_HUB_OFFLINE is set)".to_string()
    } else {
        format!(
            "the Hugging Face Hub at {}",
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into())
        )
    };
    let fail = |file: &str, e: hf_hub::HFError| {
        anyhow::anyhow!(
            "cannot get `{file}` of `{repo}` from {where_}: {e}; {}",
            hint(repo)
        )
    };
    let mut snapshot = None;
    for file in REQUIRED {
        let p = get(file).map_err(|e| fail(file, e))?;
        snapshot.get_or_insert_with(|| p.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    for file in OPTIONAL {
        let _ = get(file);
    }
    match get(INDEX_FILE) {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: bad JSON", index.display()))?;
            let mut shards: Vec<String> = json["weight_map"]
                .as_object()
                .with_context(|| format!("{}: no weight_map", index.display()))?
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            for shard in shards {
                get(&shard).map_err(|e| fail(&shard, e))?;
            }
        }
        Err(_) => {
            get(SINGLE_FILE).map_err(|e| fail(SINGLE_FILE, e))?;
        }
    }
    snapshot.context("no file downloaded")
}
