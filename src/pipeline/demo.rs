//! `paft demo`: the embedded default experiment (`configs/demo.toml` with
//! `search-spaces/demo-ties.toml`) on the shared SmolLM2-135M, or the Hub's when absent.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use super::experiment::Experiment;
use crate::io::write_file_atomic;

const EXPERIMENT: &str = include_str!("../../configs/demo.toml");
const SPACE: &str = include_str!("../../search-spaces/demo-ties.toml");
const HUB_BASE: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

/// The demo experiment, writing under `root` (`runs/demo`, `reports/demo`).
pub fn demo_experiment(root: &Path) -> Result<Experiment> {
    let shared = crate::paths::shared_dir();
    let train_data = shared.join("data").join("train");
    if !train_data.is_dir() {
        bail!(
            "the demo trains on {} (the shared SFT and preference sets); set PAFT_SHARED to the \
             shared assets directory",
            train_data.display()
        );
    }
    let space_path = root.join("runs").join("demo-space.toml");
    std::fs::create_dir_all(space_path.parent().unwrap())?;
    write_file_atomic(&space_path, SPACE.as_bytes())?;
    let mut text =
        crate::paths::expand_shared(EXPERIMENT).replace("{space}", &toml_path(&space_path));
    if !crate::paths::shared_smollm_gguf().exists() {
        tracing::warn!(
            "{} not found: the demo fetches {HUB_BASE} from the Hub",
            crate::paths::shared_smollm_gguf().display()
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("base = "))
            .unwrap_or_default()
            .to_string();
        text = text.replace(&line, &format!("base = \"{HUB_BASE}\""));
    }
    let mut exp = Experiment::from_toml(&text)?;
    exp.out = Some(root.join("runs").join("demo"));
    exp.report = Some(root.join("reports").join("demo"));
    Ok(exp)
}

fn toml_path(p: &Path) -> String {
    p.display().to_string().replace('\\', "/")
}

pub fn default_root() -> PathBuf {
    PathBuf::from(".")
}
