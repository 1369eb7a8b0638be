//! What `--model` may name: a Hugging Face model directory, a `.gguf` file (imported once into
//! paft's cache), or a Hub repo id `owner/name` (downloaded into the Hugging Face cache).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;

use super::weights::DEFAULT_SHARD_BYTES;
use super::{gguf, hub};

/// paft's own cache: `PAFT_CACHE`, else `$XDG_CACHE_HOME/paft`, else `~/.cache/paft`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("PAFT_CACHE") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("paft")
}

/// A local directory for the model `spec` names.
pub fn resolve_model(spec: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.is_file() {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return imported_gguf(path);
        }
        bail!("model `{spec}` is a file; pass a model directory, a .gguf file or a Hub repo id");
    }
    let looks_like_id = spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.starts_with('/')
        && !spec.contains('\\');
    if !looks_like_id {
        bail!("model `{spec}` is neither an existing directory or .gguf file nor a Hugging Face repo id (owner/name)");
    }
    hub::fetch_model(spec, revision)
}

/// The f32 import of a GGUF file, made on first use; keyed by file name, size and mtime so an
/// edited file is imported again.
fn imported_gguf(file: &Path) -> Result<PathBuf> {
    let meta =
        std::fs::metadata(file).with_context(|| format!("cannot stat {}", file.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let dir = cache_dir()
        .join("gguf")
        .join(format!("{stem}-{:x}-{mtime:x}", meta.len()));
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    tracing::info!("importing {} into {} (once)", file.display(), dir.display());
    match gguf::import_gguf(file, &dir, DType::F32, DEFAULT_SHARD_BYTES) {
        Ok(_) => Ok(dir),
        // Another process finished the same import first.
        Err(_) if dir.join("config.json").is_file() => Ok(dir),
        Err(e) => Err(e),
    }
}
