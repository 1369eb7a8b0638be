//! The local task store: `<root>/<dataset>/<split>.jsonl` (or `.parquet`) in the Hugging Face
//! dataset schemas, as `paft fetch tasks` writes it and as `../shared/data/leaderboard` holds it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// One row of a split with where it came from, for error messages.
#[derive(Debug, Clone)]
pub struct Row {
    pub value: Value,
    /// 1-based line (JSONL) or row (parquet) number.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct TaskStore {
    root: PathBuf,
}

impl TaskStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `PAFT_TASKS_DIR`, else the shared assets' copy when present, else where `paft fetch
    /// tasks` writes (`<paft cache>/tasks`).
    pub fn default_root() -> PathBuf {
        if let Some(dir) = std::env::var_os("PAFT_TASKS_DIR") {
            return PathBuf::from(dir);
        }
        let shared = crate::paths::shared_dir().join("data").join("leaderboard");
        if shared.is_dir() {
            return shared;
        }
        Self::fetch_root()
    }

    /// Where `paft fetch tasks` puts the datasets by default.
    pub fn fetch_root() -> PathBuf {
        crate::model::source::cache_dir().join("tasks")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file holding `dataset/split`: JSONL preferred, parquet accepted.
    pub fn split_path(&self, dataset: &str, split: &str) -> Result<PathBuf> {
        let dir = self.root.join(dataset);
        for ext in ["jsonl", "parquet"] {
            let p = dir.join(format!("{split}.{ext}"));
            if p.is_file() {
                return Ok(p);
            }
        }
        bail!(
            "task data not found: expected {} (or .parquet); run `paft fetch tasks` to download \
             the leaderboard datasets, or pass --tasks-dir (PAFT_TASKS_DIR) pointing at a copy",
            dir.join(format!("{split}.jsonl")).display()
        )
    }

    pub fn rows(&self, dataset: &str, split: &str) -> Result<(PathBuf, Vec<Row>)> {
        let path = self.split_path(dataset, split)?;
        let rows = if path.extension().is_some_and(|e| e == "parquet") {
            read_parquet_rows(&path)?
        } else {
            read_jsonl_rows(&path)?
        };
        Ok((path, rows))
    }

    /// Rows parsed into `T`; an error names the file, the line and the problem.
    pub fn typed<T: DeserializeOwned>(&self, dataset: &str, split: &str) -> Result<Vec<Typed<T>>> {
        let (path, rows) = self.rows(dataset, split)?;
        rows.into_iter()
            .map(|r| {
                let doc = T::deserialize(&r.value).with_context(|| {
                    format!("{}:{}: unexpected document schema", path.display(), r.line)
                })?;
                Ok(Typed {
                    doc,
                    raw: r.value,
                    line: r.line,
                    path: path.clone(),
                })
            })
            .collect()
    }
}

/// A parsed document with its raw JSON (for lm-eval's dict-equality self-exclusion) and origin.
#[derive(Debug, Clone)]
pub struct Typed<T> {
    pub doc: T,
    pub raw: Value,
    pub line: usize,
    pub path: PathBuf,
}

impl<T> Typed<T> {
    /// Where this document came from, for error messages: `file:line`.
    pub fn origin(&self) -> String {
        format!("{}:{}", self.path.display(), self.line)
    }
}

fn read_jsonl_rows(path: &Path) -> Result<Vec<Row>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut rows = vec![];
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}:{}: cannot read line", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: malformed JSON line", path.display(), i + 1))?;
        rows.push(Row { value, line: i + 1 });
    }
    if rows.is_empty() {
        bail!("{} has no documents", path.display());
    }
    Ok(rows)
}

fn read_parquet_rows(path: &Path) -> Result<Vec<Row>> {
    let json = crate::data::parquet_to_jsonl(path)?;
    json.lines()
        .enumerate()
        .map(|(i, l)| {
            Ok(Row {
                value: serde_json::from_str(l).with_context(|| {
                    format!("{}: row {}: cannot convert to JSON", path.display(), i + 1)
                })?,
                line: i + 1,
            })
        })
        .collect()
}
