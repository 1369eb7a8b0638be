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

/// `text` with every `{shared}` replaced by [`shared_dir`] (forward slashes, so it stays a valid
/// TOML string on Windows too): how experiment and search-space files name the shared assets.
pub fn expand_shared(text: &str) -> String {
    let dir = shared_dir().display().to_string().replace('\\', "/");
    text.replace("{shared}", &dir)
}

/// The SmolLM2-135M-Instruct GGUF shipped in shared/models.
pub fn shared_smollm_gguf() -> PathBuf {
    shared_dir()
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}
