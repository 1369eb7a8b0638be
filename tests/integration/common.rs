//! Shared test fixtures: the shared assets, the real model imported once per run, tiny models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use paft::model::{gguf, tiny::TinySpec};

/// The shared assets folder. Missing in CI (CI always has it) is a failure; elsewhere the
/// calling test is skipped with a message.
pub fn require_shared() -> Option<PathBuf> {
    let dir = paft::paths::shared_dir();
    if paft::paths::shared_smollm_gguf().is_file() {
        return Some(dir);
    }
    let msg = format!(
        "shared assets not found at {} (set PAFT_SHARED)",
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}: CI must have them");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

pub fn paft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_paft"))
}

pub fn run_paft(args: &[&str]) -> Output {
    paft().args(args).output().expect("run paft")
}

/// A run that must have succeeded; its stderr is the failure message otherwise.
pub fn expect_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// stderr of a failed run, checked to be one clear error and not a panic.
pub fn expect_clean_failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    assert!(stderr.contains("error:"), "no error message: {stderr}");
    stderr
}

fn fixtures_root() -> &'static Path {
    static ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();
    ROOT.get_or_init(|| tempfile::tempdir().expect("tempdir"))
        .path()
}

/// SmolLM2-135M-Instruct imported from the shared GGUF with `paft import-gguf` (f32), once per run.
pub fn smollm_dir() -> Option<&'static Path> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    require_shared()?;
    Some(DIR.get_or_init(|| {
        let out = fixtures_root().join("smollm");
        let gguf = paft::paths::shared_smollm_gguf();
        let res = run_paft(&[
            "--quiet",
            "import-gguf",
            gguf.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            res.status.success(),
            "import failed: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        out
    }))
}

/// tokenizer.json/tokenizer_config.json of the shared model (metadata only, fast).
pub fn tokenizer_dir() -> Option<&'static Path> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    require_shared()?;
    Some(DIR.get_or_init(|| {
        let out = fixtures_root().join("tokenizer");
        gguf::export_tokenizer(&paft::paths::shared_smollm_gguf(), &out).expect("export tokenizer");
        out
    }))
}

/// A fresh tiny random model directory with the shared model's tokenizer.
pub fn tiny_model(spec: &TinySpec) -> Option<tempfile::TempDir> {
    let tok = tokenizer_dir()?;
    let dir = tempfile::tempdir().unwrap();
    spec.write(dir.path(), tok).expect("write tiny model");
    Some(dir)
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// max |a − b| over all entries.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The shared copies of the leaderboard tasks (for `PAFT_TASKS_DIR`).
pub fn shared_tasks_dir() -> PathBuf {
    paft::paths::shared_dir().join("data").join("leaderboard")
}
