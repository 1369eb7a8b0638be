//! Aggregated results: per-task metric means with standard errors, the leaderboard's headline
//! numbers and their average, lm-eval-shaped `results.json`, per-document sample logs and the
//! summary table.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::task::{Benchmark, DocScore, MetricKey, Response, Task};

/// One evaluated document.
#[derive(Debug, Clone)]
pub struct DocRecord {
    pub doc_id: usize,
    pub shots: Vec<usize>,
    pub response: Response,
    pub score: DocScore,
}

#[derive(Debug, Clone, Copy)]
pub struct MetricSummary {
    pub key: MetricKey,
    pub mean: f64,
    /// Sample standard deviation / sqrt(n), as lm-eval's `mean_stderr`.
    pub stderr: f64,
}

#[derive(Debug, Clone)]
pub struct TaskResult {
    pub name: String,
    pub benchmark: Benchmark,
    pub num_fewshot: usize,
    /// Documents in the task's evaluation split.
    pub n_original: usize,
    pub num_requests: usize,
    pub records: Vec<DocRecord>,
    pub metrics: Vec<MetricSummary>,
    pub seconds: f64,
}

fn mean_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

impl TaskResult {
    pub fn new(
        task: &dyn Task,
        num_fewshot: usize,
        num_requests: usize,
        records: Vec<DocRecord>,
        seconds: f64,
    ) -> Self {
        let metrics = task
            .metric_keys()
            .iter()
            .map(|&key| {
                let values: Vec<f64> = records
                    .iter()
                    .filter_map(|r| {
                        r.score
                            .metrics
                            .iter()
                            .find(|(k, _)| *k == key)
                            .map(|(_, v)| *v)
                    })
                    .collect();
                let (mean, stderr) = mean_stderr(&values);
                MetricSummary { key, mean, stderr }
            })
            .collect();
        Self {
            name: task.name().to_string(),
            benchmark: task.benchmark(),
            num_fewshot,
            n_original: task.num_docs(),
            num_requests,
            records,
            metrics,
            seconds,
        }
    }

    pub fn metric(&self, key: MetricKey) -> Option<f64> {
        self.metrics.iter().find(|m| m.key == key).map(|m| m.mean)
    }

    /// Mean and standard error of the documents' smooth scores ([`DocScore::probability`]);
    /// `None` when the task has none.
    pub fn probability(&self) -> Option<(f64, f64)> {
        let values: Vec<f64> = self
            .records
            .iter()
            .map(|r| r.score.probability)
            .collect::<Option<Vec<f64>>>()?;
        (!values.is_empty()).then(|| mean_stderr(&values))
    }
}

#[derive(Debug, Clone)]
pub struct SuiteResult {
    pub tasks: Vec<TaskResult>,
    pub seconds: f64,
}

/// A benchmark's headline number (a fraction, 0–1) and its standard error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Headline {
    pub value: f64,
    pub stderr: f64,
}

impl SuiteResult {
    pub fn new(tasks: Vec<TaskResult>, seconds: f64) -> Self {
        Self { tasks, seconds }
    }

    fn of(&self, b: Benchmark) -> impl Iterator<Item = &TaskResult> {
        self.tasks
            .iter()
            .filter(move |t| t.benchmark == b && !t.records.is_empty())
    }

    /// The leaderboard's number for `b`: the task's headline metric, or for MMLU the unweighted
    /// mean over subjects (the leaderboard's macro average; standard error of that mean).
    pub fn headline(&self, b: Benchmark) -> Option<Headline> {
        let parts: Vec<(f64, f64)> = self
            .of(b)
            .filter_map(|t| t.metrics.iter().find(|m| m.key == b.headline()))
            .map(|m| (m.mean, m.stderr))
            .collect();
        macro_mean(&parts)
    }

    /// The smooth counterpart of [`Self::headline`] (mean gold-answer probability), aggregated
    /// the same way; for GSM8K, which has none, the headline itself.
    pub fn probability(&self, b: Benchmark) -> Option<Headline> {
        let parts: Vec<(f64, f64)> = self
            .of(b)
            .map(|t| t.probability())
            .collect::<Option<Vec<_>>>()?;
        if parts.is_empty() {
            return self.headline(b);
        }
        macro_mean(&parts)
    }

    /// MMLU's mean over questions (lm-eval's group number), logged next to the macro mean.
    pub fn mmlu_micro(&self) -> Option<f64> {
        let values: Vec<f64> = self
            .of(Benchmark::Mmlu)
            .flat_map(|t| t.records.iter())
            .filter_map(|r| r.score.metrics.first().map(|m| m.1))
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    }

    /// Headline numbers in percent, per benchmark present.
    pub fn scores(&self) -> BTreeMap<Benchmark, f64> {
        Benchmark::ALL
            .iter()
            .filter_map(|&b| self.headline(b).map(|h| (b, 100.0 * h.value)))
            .collect()
    }

    /// The leaderboard average (plain mean of the six headline numbers, percent); None unless
    /// all six were evaluated.
    pub fn average(&self) -> Option<f64> {
        let s = self.scores();
        (s.len() == Benchmark::ALL.len()).then(|| s.values().sum::<f64>() / s.len() as f64)
    }

    pub fn num_requests(&self) -> usize {
        self.tasks.iter().map(|t| t.num_requests).sum()
    }

    /// results.json in lm-eval's shape (`results.<task>."<metric>,<filter>"`), plus the
    /// leaderboard summary.
    pub fn to_json(&self, config: Value) -> Value {
        let mut results = Map::new();
        let mut n_shot = Map::new();
        let mut n_samples = Map::new();
        let mut timing = Map::new();
        for t in &self.tasks {
            let mut m = Map::new();
            m.insert("alias".into(), json!(t.name));
            for s in &t.metrics {
                m.insert(s.key.to_string(), finite(s.mean));
                m.insert(
                    format!("{}_stderr,{}", s.key.metric, s.key.filter),
                    finite(s.stderr),
                );
            }
            results.insert(t.name.clone(), Value::Object(m));
            n_shot.insert(t.name.clone(), json!(t.num_fewshot));
            n_samples.insert(
                t.name.clone(),
                json!({"original": t.n_original, "effective": t.records.len()}),
            );
            timing.insert(
                t.name.clone(),
                json!({"seconds": t.seconds, "requests": t.num_requests}),
            );
        }
        let mut groups = Map::new();
        if let Some(h) = self.headline(Benchmark::Mmlu) {
            groups.insert(
                "mmlu".into(),
                json!({"alias": "mmlu", "acc,none": h.value, "acc_stderr,none": finite(h.stderr),
                       "acc_micro,none": self.mmlu_micro(),
                       "aggregation": "unweighted mean over subjects (Open LLM Leaderboard)"}),
            );
            results.insert("mmlu".into(), groups["mmlu"].clone());
        }
        let mut board = Map::new();
        for (b, v) in self.scores() {
            board.insert(b.column().into(), json!(v));
        }
        if let Some(avg) = self.average() {
            board.insert("Average".into(), json!(avg));
            groups.insert(
                "leaderboard".into(),
                json!({"alias": "leaderboard", "average,none": avg / 100.0}),
            );
        }
        json!({
            "results": results,
            "groups": groups,
            "leaderboard": board,
            "n-shot": n_shot,
            "n-samples": n_samples,
            "config": config,
            "timing": {"total_seconds": self.seconds, "tasks": timing},
            "paft_version": env!("CARGO_PKG_VERSION"),
        })
    }

    /// The leaderboard-style summary: one column per benchmark present, plus the average.
    pub fn table(&self, model_name: &str) -> String {
        let scores = self.scores();
        let mut header = vec!["Model".to_string()];
        let mut row = vec![model_name.to_string()];
        for (b, v) in &scores {
            header.push(b.column().to_string());
            row.push(format!("{v:.2}"));
        }
        if let Some(avg) = self.average() {
            header.push("Average".into());
            row.push(format!("{avg:.2}"));
        }
        let widths: Vec<usize> = header
            .iter()
            .zip(&row)
            .map(|(h, r)| h.len().max(r.len()))
            .collect();
        let fmt = |cells: &[String]| {
            let inner: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!(" {c:>w$} "))
                .collect();
            format!("|{}|", inner.join("|"))
        };
        let rule: Vec<String> = widths
            .iter()
            .map(|w| format!("-{}:", "-".repeat(*w)))
            .collect();
        format!("{}\n|{}|\n{}\n", fmt(&header), rule.join("|"), fmt(&row))
    }
}

/// The unweighted mean of per-task (mean, stderr) pairs, with the standard error of that mean
/// sqrt(Σ se²)/k (the leaderboard's MMLU aggregation; a single task passes through). A part with
/// an undefined stderr (one document) adds nothing; if no part has one, the stderr is unknown,
/// not zero. `paft report` aggregates with this same function.
pub(crate) fn macro_mean(parts: &[(f64, f64)]) -> Option<Headline> {
    if parts.is_empty() {
        return None;
    }
    let k = parts.len() as f64;
    let value = parts.iter().map(|p| p.0).sum::<f64>() / k;
    if parts.len() == 1 {
        return Some(Headline {
            value,
            stderr: parts[0].1,
        });
    }
    let known: Vec<f64> = parts
        .iter()
        .map(|p| p.1.powi(2))
        .filter(|v| v.is_finite())
        .collect();
    let stderr = if known.is_empty() {
        f64::NAN
    } else {
        known.iter().sum::<f64>().sqrt() / k
    };
    Some(Headline { value, stderr })
}

fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}
