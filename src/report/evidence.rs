//! What a full-evaluation row offers beyond its headline numbers: per-document records grouped
//! by benchmark (checked against its results.json, so a ± is never attached to a number it does
//! not belong to) and its alignment-tax file. Where a benchmark has no usable records, the reason
//! is kept for the page.

use std::collections::BTreeMap;

use anyhow::Result;

use super::rows::EvaluatedRow;
use super::samples::{self, TaskFile};
use super::stats::{self, Estimate};
use crate::eval::alignment_tax::{AlignmentTax, TaxEstimates};
use crate::eval::task::Benchmark;

/// A benchmark's records as the leaderboard aggregates them: one stratum per task (MMLU: one per
/// subject), each `(doc_id, value in percent)` sorted by id.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BenchmarkRecords {
    pub strata: BTreeMap<String, Vec<(u64, f64)>>,
}

impl BenchmarkRecords {
    /// Mean and stderr (percent): one task's mean, or MMLU's unweighted mean over subjects.
    pub(crate) fn estimate(&self) -> Option<Estimate> {
        let parts: Vec<Estimate> = self
            .strata
            .values()
            .filter_map(|docs| stats::mean_stderr(&docs.iter().map(|d| d.1).collect::<Vec<_>>()))
            .collect();
        stats::macro_mean(&parts)
    }
}

/// One evaluated row's evidence.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowEvidence {
    pub benchmarks: BTreeMap<Benchmark, BenchmarkRecords>,
    /// Why a benchmark the row scored has no records.
    pub missing: BTreeMap<Benchmark, String>,
    pub tax: Option<AlignmentTax>,
}

/// How far (percent) the records' mean may sit from results.json's number: rounding only.
const AGREEMENT: f64 = 1e-6;

impl RowEvidence {
    pub(crate) fn read(row: &EvaluatedRow) -> Result<Self> {
        let dir = row.dir();
        let files = samples::read_dir(dir)?;
        let mut benchmarks = BTreeMap::new();
        let mut missing = BTreeMap::new();
        for (&b, &score) in &row.file.scores {
            match records_of(b, score, &files, &row.file.effective) {
                Ok(r) => {
                    benchmarks.insert(b, r);
                }
                Err(why) => {
                    missing.insert(b, why);
                }
            }
        }
        Ok(Self {
            benchmarks,
            missing,
            tax: AlignmentTax::read_dir(dir)?,
        })
    }

    /// Stderr (percent) per benchmark with records.
    pub(crate) fn stderrs(&self) -> BTreeMap<Benchmark, f64> {
        self.benchmarks
            .iter()
            .filter_map(|(b, r)| Some((*b, r.estimate()?.stderr)))
            .filter(|(_, se)| se.is_finite())
            .collect()
    }

    pub(crate) fn tax_estimates(&self) -> TaxEstimates {
        self.tax
            .as_ref()
            .map(AlignmentTax::estimates)
            .unwrap_or_default()
    }

    /// One line per benchmark without records, or one for the whole row when it has no
    /// samples file at all.
    pub(crate) fn notes(&self) -> Vec<String> {
        if self.benchmarks.is_empty()
            && !self.missing.is_empty()
            && self.missing.values().all(|w| w.starts_with(NO_FILE))
        {
            return vec![
                "no samples_<task>.jsonl beside its results.json (`paft eval \
                         --log-samples --output DIR` writes them)"
                    .to_string(),
            ];
        }
        self.missing
            .iter()
            .map(|(b, why)| format!("{}: {why}", b.column()))
            .collect()
    }
}

const NO_FILE: &str = "no samples_";

/// The records of benchmark `b`, or why there are none: a task file missing, a document without
/// a value, counts that differ from results.json's `n-samples`, or a mean that differs from its
/// headline number.
fn records_of(
    b: Benchmark,
    score: f64,
    files: &BTreeMap<String, TaskFile>,
    effective: &BTreeMap<String, u64>,
) -> std::result::Result<BenchmarkRecords, String> {
    let of_b = |task: &String| samples::benchmark_of_task(task) == Some(b);
    let mut strata = BTreeMap::new();
    for (task, file) in files.iter().filter(|(t, _)| of_b(t)) {
        match file {
            TaskFile::Records(r) => {
                let docs: Vec<(u64, f64)> = r.docs.iter().map(|&(id, v)| (id, 100.0 * v)).collect();
                strata.insert(task.clone(), docs);
            }
            TaskFile::Unusable(why) => return Err(format!("samples_{task}.jsonl: {why}")),
        }
    }
    if strata.is_empty() {
        let pattern = if b == Benchmark::Mmlu {
            "mmlu_*".to_string()
        } else {
            b.task_name().to_string()
        };
        return Err(format!("{NO_FILE}{pattern}.jsonl"));
    }
    // Tasks that scored no document (an MMLU subject a small sample missed) have no file.
    let expected: BTreeMap<&String, u64> = effective
        .iter()
        .filter(|(t, n)| of_b(t) && **n > 0)
        .map(|(t, n)| (t, *n))
        .collect();
    if !expected.is_empty() {
        for (task, n) in &expected {
            match strata.get(*task) {
                None => return Err(format!("{NO_FILE}{task}.jsonl (results.json scored it)")),
                Some(docs) if docs.len() as u64 != *n => {
                    return Err(format!(
                        "samples_{task}.jsonl has {} documents, results.json scored {n}",
                        docs.len()
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = strata.keys().find(|t| !expected.contains_key(t)) {
            return Err(format!(
                "samples_{extra}.jsonl is not among the tasks results.json scored"
            ));
        }
    }
    let records = BenchmarkRecords { strata };
    let mean = records.estimate().map_or(f64::NAN, |e| e.value);
    let off = (mean - score).abs();
    if off.is_nan() || off > AGREEMENT {
        return Err(format!(
            "the samples give {mean:.4} but results.json says {score:.4} (files from different runs?)"
        ));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::rows::{Docs, ResultsFile, RowKind, RowSpec};

    fn write_samples(dir: &std::path::Path, task: &str, key: &str, values: &[f64]) {
        let text: String = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{{\"doc_id\": {i}, \"metrics\": {{\"{key}\": {v}}}}}\n"))
            .collect();
        std::fs::write(dir.join(format!("samples_{task}.jsonl")), text).unwrap();
    }

    fn row(
        dir: &std::path::Path,
        scores: &[(Benchmark, f64)],
        effective: &[(&str, u64)],
    ) -> EvaluatedRow {
        EvaluatedRow {
            kind: RowKind::Paft(None),
            spec: RowSpec {
                name: "paft".into(),
                results: dir.join("results.json"),
            },
            file: ResultsFile {
                scores: scores.iter().copied().collect(),
                docs: Docs::Full,
                effective: effective.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            },
        }
    }

    #[test]
    fn records_match_results_json_or_say_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_samples(d, "arc_challenge", "acc_norm,none", &[1.0, 0.0, 1.0, 1.0]);
        write_samples(d, "mmlu_anatomy", "acc,none", &[1.0, 0.0, 1.0, 1.0]);
        write_samples(d, "mmlu_astronomy", "acc,none", &[0.0, 0.0]);
        write_samples(d, "winogrande", "acc,none", &[1.0, 0.0]);
        let r = row(
            d,
            &[
                (Benchmark::Arc, 75.0),
                (Benchmark::Mmlu, 37.5),
                (Benchmark::Winogrande, 90.0),
                (Benchmark::Gsm8k, 5.0),
            ],
            &[
                ("arc_challenge", 4),
                ("mmlu_anatomy", 4),
                ("mmlu_astronomy", 2),
            ],
        );
        let ev = RowEvidence::read(&r).unwrap();
        assert_eq!(
            ev.benchmarks.keys().collect::<Vec<_>>(),
            [&Benchmark::Arc, &Benchmark::Mmlu]
        );
        let se = ev.stderrs();
        assert!((se[&Benchmark::Arc] - 25.0).abs() < 1e-9, "{se:?}");
        assert!((se[&Benchmark::Mmlu] - 12.5).abs() < 1e-9, "{se:?}");
        assert!(ev.missing[&Benchmark::Winogrande].contains("results.json says"));
        assert!(ev.missing[&Benchmark::Gsm8k].contains("no samples_gsm8k.jsonl"));
        let notes = ev.notes();
        assert!(notes.iter().any(|n| n.starts_with("GSM8K: ")), "{notes:?}");

        // results.json counted a subject the samples lack, or another document count.
        let r = row(
            d,
            &[(Benchmark::Mmlu, 37.5), (Benchmark::Arc, 75.0)],
            &[
                ("mmlu_anatomy", 4),
                ("mmlu_astronomy", 2),
                ("mmlu_virology", 3),
                ("arc_challenge", 5),
            ],
        );
        let ev = RowEvidence::read(&r).unwrap();
        assert!(
            ev.missing[&Benchmark::Mmlu].contains("mmlu_virology"),
            "{ev:?}"
        );
        assert!(
            ev.missing[&Benchmark::Arc].contains("has 4 documents"),
            "{ev:?}"
        );
    }

    #[test]
    fn a_row_without_samples_has_one_note() {
        let dir = tempfile::tempdir().unwrap();
        let r = row(
            dir.path(),
            &[(Benchmark::Arc, 75.0), (Benchmark::Gsm8k, 5.0)],
            &[],
        );
        let ev = RowEvidence::read(&r).unwrap();
        assert!(ev.benchmarks.is_empty() && ev.stderrs().is_empty());
        let notes = ev.notes();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("--log-samples"));
        assert_eq!(ev.tax, None);
    }
}
