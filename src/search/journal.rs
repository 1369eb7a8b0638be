//! The search journal: one JSON line per evaluation, appended and synced after each one, so a
//! killed search loses at most the evaluation in flight and `--resume` re-scores nothing.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One scored candidate on one subset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Evaluation number, from 0, in the order they ran.
    pub index: usize,
    /// Canonical form of the candidate (method + rounded parameters): the cache key.
    pub key: String,
    /// Merge method (mergekit name).
    pub method: String,
    /// Every numeric merge parameter, searched or fixed: `sft.weight`, `sft.density`,
    /// `pref.weight`, `pref.density`, `lambda`, …
    pub params: BTreeMap<String, f64>,
    /// Categorical choices other than the method (e.g. `sign_rule`).
    #[serde(default)]
    pub choices: BTreeMap<String, String>,
    /// Successive-halving rung: 0 = screening subset, higher = larger subsets.
    pub rung: usize,
    /// Documents per task of the subset; `None` = the full task sets.
    pub docs_per_task: Option<usize>,
    /// Headline metric per benchmark, in percent, keyed by lm-eval task name
    /// (`arc_challenge`, `hellaswag`, `mmlu`, `truthfulqa_mc2`, `winogrande`, `gsm8k`).
    pub scores: BTreeMap<String, f64>,
    /// The space's weighted objective (higher is better).
    pub objective: f64,
    /// Its standard error over the documents (absent in journals from before paft 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective_stderr: Option<f64>,
    /// The pool the documents came from (`search`; absent in journals from before the held-out
    /// protocol, whose subsets were drawn from the whole task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Alignment-tax numbers on the search pool's held-out rows (`sft_loss`, `pref_accuracy`,
    /// `reward_margin`), when the objective has such terms.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tax: BTreeMap<String, f64>,
    /// Wall time of merge + evaluation.
    pub seconds: f64,
}

/// The journal file of a search run.
pub struct Journal {
    path: PathBuf,
    entries: Vec<JournalEntry>,
}

impl Journal {
    /// Opens (or starts) the journal at `path`. A torn last line — the process was killed while
    /// writing it — is dropped and cut from the file; a corrupt line elsewhere is an error.
    pub fn open(path: &Path) -> Result<Self> {
        let mut entries = vec![];
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read journal {}", path.display()))?;
            let mut good_len = 0usize;
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            for (i, line) in lines.iter().enumerate() {
                let last = i + 1 == lines.len();
                let complete = line.ends_with('\n');
                match serde_json::from_str::<JournalEntry>(line.trim_end()) {
                    Ok(e) if complete || last => {
                        entries.push(e);
                        good_len += line.len();
                    }
                    _ if line.trim().is_empty() => good_len += line.len(),
                    Err(_) if last => {
                        tracing::warn!(
                            "journal {}: dropping a torn last line (an evaluation was interrupted)",
                            path.display()
                        );
                    }
                    Err(e) => anyhow::bail!(
                        "journal {} line {}: corrupt entry: {e}",
                        path.display(),
                        i + 1
                    ),
                    Ok(_) => unreachable!("only the last line can lack its newline"),
                }
            }
            if good_len < text.len() {
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(good_len as u64)
                    .with_context(|| format!("cannot repair journal {}", path.display()))?;
            } else if !text.is_empty() && !text.ends_with('\n') {
                // A complete entry without its newline: add it so the next append starts a line.
                OpenOptions::new()
                    .append(true)
                    .open(path)?
                    .write_all(b"\n")?;
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            entries,
        })
    }

    pub fn entries(&self) -> &[JournalEntry] {
        &self.entries
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entry already journaled for this candidate on this rung, if any.
    pub fn find(&self, key: &str, rung: usize) -> Option<&JournalEntry> {
        self.entries.iter().find(|e| e.key == key && e.rung == rung)
    }

    /// Appends one entry as a single write of one line, then syncs.
    pub fn append(&mut self, entry: JournalEntry) -> Result<()> {
        let mut line = serde_json::to_vec(&entry)?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open journal {}", self.path.display()))?;
        f.write_all(&line)
            .and_then(|_| f.sync_data())
            .with_context(|| format!("cannot append to journal {}", self.path.display()))?;
        self.entries.push(entry);
        Ok(())
    }

    /// Reads a journal without repairing it (for reports).
    pub fn read(path: &Path) -> Result<Vec<JournalEntry>> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read journal {}", path.display()))?;
        let lines: Vec<&str> = text.lines().collect();
        let mut out = vec![];
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(line) {
                Ok(e) => out.push(e),
                Err(_) if i + 1 == lines.len() => {}
                Err(e) => anyhow::bail!("journal {} line {}: {e}", path.display(), i + 1),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: usize) -> JournalEntry {
        JournalEntry {
            index,
            key: format!("ties|w={index}"),
            method: "ties".into(),
            params: BTreeMap::from([("sft.weight".to_string(), index as f64 / 10.0)]),
            choices: BTreeMap::new(),
            rung: 0,
            docs_per_task: Some(10),
            scores: BTreeMap::from([("arc_challenge".to_string(), 30.0 + index as f64)]),
            objective: 30.0 + index as f64,
            objective_stderr: None,
            pool: None,
            tax: Default::default(),
            seconds: 1.5,
        }
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_appending_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let mut j = Journal::open(&path).unwrap();
        j.append(entry(0)).unwrap();
        j.append(entry(1)).unwrap();
        // Simulate a kill in the middle of writing the third line.
        let full = serde_json::to_string(&entry(2)).unwrap();
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&full.as_bytes()[..full.len() / 2])
            .unwrap();
        assert_eq!(Journal::read(&path).unwrap().len(), 2);
        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.entries(), &[entry(0), entry(1)]);
        j.append(entry(2)).unwrap();
        let again = Journal::open(&path).unwrap();
        assert_eq!(again.entries(), &[entry(0), entry(1), entry(2)]);
        assert!(again.find("ties|w=1", 0).is_some());
        assert!(again.find("ties|w=1", 1).is_none());
    }

    #[test]
    fn corruption_before_the_last_line_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let good = serde_json::to_string(&entry(0)).unwrap();
        std::fs::write(&path, format!("{good}\n{{not json\n{good}\n")).unwrap();
        let err = Journal::open(&path).err().unwrap().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
