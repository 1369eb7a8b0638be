//! Per-document records of one row: the `samples_<task>.jsonl` files `paft eval --log-samples`
//! writes beside results.json (`src/eval/results.rs::write_samples`), reduced to each
//! document's headline metric. Only the leaderboard's tasks are read; other files are left alone.
//!
//! A line needs `doc_id` (a non-negative integer) and `metrics."<metric>,<filter>"` for the
//! benchmark's headline metric (e.g. `"acc_norm,none"` for ARC, `"exact_match,strict-match"` for
//! GSM8K), a number in [0, 1]; every other field is ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::eval::task::Benchmark;

/// One task's documents: `(doc_id, headline value as a fraction)`, sorted by id, ids unique.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TaskRecords {
    pub benchmark: Benchmark,
    pub docs: Vec<(u64, f64)>,
    pub file: PathBuf,
}

/// What one task's file yielded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TaskFile {
    Records(TaskRecords),
    /// Readable, but a document has no value (paft writes null for a metric that is not a
    /// number), so the task cannot carry an uncertainty.
    Unusable(String),
}

/// The benchmark a `samples_<task>.jsonl` belongs to: its task name, or for MMLU one subject
/// (`mmlu` itself is a group, scored only through its subjects).
pub(crate) fn benchmark_of_task(task: &str) -> Option<Benchmark> {
    Benchmark::ALL.into_iter().find(|&b| match b {
        Benchmark::Mmlu => task.starts_with("mmlu_"),
        _ => task == b.task_name(),
    })
}

/// Every leaderboard task's samples file in `dir`, by task name; empty when there is none.
pub(crate) fn read_dir(dir: &Path) -> Result<BTreeMap<String, TaskFile>> {
    let mut out = BTreeMap::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for item in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let item = item.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = item.file_name().to_string_lossy().into_owned();
        let Some(task) = name
            .strip_prefix("samples_")
            .and_then(|s| s.strip_suffix(".jsonl"))
        else {
            continue;
        };
        let Some(benchmark) = benchmark_of_task(task) else {
            continue;
        };
        let path = item.path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file = parse(&text, benchmark, &path)
            .with_context(|| format!("malformed samples file {}", path.display()))?;
        out.insert(task.to_string(), file);
    }
    Ok(out)
}

fn parse(text: &str, benchmark: Benchmark, path: &Path) -> Result<TaskFile> {
    let key = benchmark.headline().to_string();
    let mut docs = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let json: Value =
            serde_json::from_str(line).with_context(|| format!("line {n}: not valid JSON"))?;
        let id = json
            .get("doc_id")
            .and_then(Value::as_u64)
            .with_context(|| format!("line {n}: no integer `doc_id`"))?;
        // lm-eval's own files list metric names under `metrics` and put values at the top level
        // (one line per filter); they are not read, but they do not sink the report either.
        let Some(metrics) = json.get("metrics").and_then(Value::as_object) else {
            return Ok(TaskFile::Unusable(format!(
                "line {n} has no `metrics` object (only paft's samples format is read)"
            )));
        };
        let value = metrics
            .get(&key)
            .with_context(|| format!("line {n}: `metrics` has no \"{key}\""))?;
        let v = match value {
            Value::Null => {
                return Ok(TaskFile::Unusable(format!(
                    "document {id} has no \"{key}\" value (null)"
                )))
            }
            v => v
                .as_f64()
                .with_context(|| format!("line {n}: metrics.\"{key}\" is not a number"))?,
        };
        if !(0.0..=1.0).contains(&v) {
            bail!("line {n}: metrics.\"{key}\" = {v} is not a fraction in [0, 1]");
        }
        docs.push((id, v));
    }
    docs.sort_by_key(|d| d.0);
    if let Some(w) = docs.windows(2).find(|w| w[0].0 == w[1].0) {
        bail!("doc_id {} appears twice", w[0].0);
    }
    if docs.is_empty() {
        bail!("no documents");
    }
    Ok(TaskFile::Records(TaskRecords {
        benchmark,
        docs,
        file: path.to_path_buf(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headline_values_are_read_by_doc_id() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("samples_arc_challenge.jsonl"),
            "{\"doc_id\": 3, \"metrics\": {\"acc,none\": 0.0, \"acc_norm,none\": 1.0}}\n\
             {\"doc_id\": 1, \"resps\": [], \"metrics\": {\"acc,none\": 1.0, \"acc_norm,none\": 0.0}}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("samples_gsm8k.jsonl"),
            "{\"doc_id\": 0, \"metrics\": {\"exact_match,strict-match\": null}}\n",
        )
        .unwrap();
        // Not a leaderboard task, not a samples file: ignored.
        std::fs::write(dir.path().join("samples_lambada.jsonl"), "junk").unwrap();
        std::fs::write(dir.path().join("results.json"), "{}").unwrap();
        let files = read_dir(dir.path()).unwrap();
        assert_eq!(files.keys().collect::<Vec<_>>(), ["arc_challenge", "gsm8k"]);
        match &files["arc_challenge"] {
            TaskFile::Records(r) => assert_eq!(r.docs, [(1, 0.0), (3, 1.0)]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(files["gsm8k"], TaskFile::Unusable(_)));
        // lm-eval's layout: `metrics` lists names; values sit at the top level.
        std::fs::write(
            dir.path().join("samples_hellaswag.jsonl"),
            "{\"doc_id\": 0, \"filter\": \"none\", \"metrics\": [\"acc_norm\"], \"acc_norm\": 1.0}\n",
        )
        .unwrap();
        match &read_dir(dir.path()).unwrap()["hellaswag"] {
            TaskFile::Unusable(why) => assert!(why.contains("paft's samples format"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(benchmark_of_task("mmlu_anatomy"), Some(Benchmark::Mmlu));
        assert_eq!(benchmark_of_task("mmlu"), None);
        assert!(read_dir(&dir.path().join("absent")).unwrap().is_empty());
    }

    #[test]
    fn malformed_lines_are_errors_naming_file_and_line() {
        let cases = [
            ("{\"doc_id\": 0, \"metrics\": {\"acc,none\": 1.0}}\n{oops", "line 2"),
            ("{\"metrics\": {\"acc,none\": 1.0}}", "doc_id"),
            ("{\"doc_id\": 0, \"metrics\": {\"acc_norm,none\": 1.0}}", "acc,none"),
            ("{\"doc_id\": 0, \"metrics\": {\"acc,none\": 2.0}}", "[0, 1]"),
            (
                "{\"doc_id\": 0, \"metrics\": {\"acc,none\": 1.0}}\n{\"doc_id\": 0, \"metrics\": {\"acc,none\": 1.0}}",
                "twice",
            ),
            ("", "no documents"),
        ];
        for (text, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("samples_winogrande.jsonl"), text).unwrap();
            let err = format!("{:#}", read_dir(dir.path()).unwrap_err());
            assert!(
                err.contains(want) && err.contains("samples_winogrande.jsonl"),
                "{want}: {err}"
            );
        }
    }
}
