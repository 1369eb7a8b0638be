//! Where shared assets live: `PAFT_SHARED` if set, else `../shared` beside the project root.

use std::path::PathBuf;

pub fn shared_dir() -> PathBuf {
    match std::env::var_os("PAFT_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("shared"),
    }
}

/// The SmolLM2-135M-Instruct GGUF shipped in shared/models.
pub fn shared_smollm_gguf() -> PathBuf {
    shared_dir()
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}
