//! Aggregated results: per-task metric means with standard errors, the leaderboard's headline
//! numbers and their average, lm-eval-shaped `results.json`, per-document sample logs and the
//! summary table.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::engine::TokenWork;
use super::task::{Benchmark, DocScore, MetricKey, Response, Task};
use crate::stats::{macro_mean, mean_stderr, Estimate};

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
    /// The metric that stands for the task ([`Task::headline`]).
    pub headline: MetricKey,
    pub seconds: f64,
    /// Tokens the model was run on (set by the suite after scoring).
    pub tokens: TokenWork,
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
                let e = mean_stderr(&values).unwrap_or(Estimate {
                    value: f64::NAN,
                    stderr: f64::NAN,
                });
                MetricSummary {
                    key,
                    mean: e.value,
                    stderr: e.stderr,
                }
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
            headline: task.headline(),
            seconds,
            tokens: TokenWork::default(),
        }
    }

    pub fn metric(&self, key: MetricKey) -> Option<f64> {
        self.metrics.iter().find(|m| m.key == key).map(|m| m.mean)
    }

    /// Mean and standard error of the documents' smooth scores ([`DocScore::probability`]);
    /// `None` when the task has none.
    pub fn probability(&self) -> Option<Estimate> {
        let values: Vec<f64> = self
            .records
            .iter()
            .map(|r| r.score.probability)
            .collect::<Option<Vec<f64>>>()?;
        mean_stderr(&values)
    }
}

#[derive(Debug, Clone)]
pub struct SuiteResult {
    pub tasks: Vec<TaskResult>,
    pub seconds: f64,
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
    pub fn headline(&self, b: Benchmark) -> Option<Estimate> {
        let parts: Vec<Estimate> = self
            .of(b)
            .filter_map(|t| t.metrics.iter().find(|m| m.key == t.headline))
            .map(|m| Estimate {
                value: m.mean,
                stderr: m.stderr,
            })
            .collect();
        macro_mean(&parts)
    }

    /// The smooth counterpart of [`Self::headline`] (mean gold-answer probability), aggregated
    /// the same way; for GSM8K's exact match, which has none, the headline itself.
    pub fn probability(&self, b: Benchmark) -> Option<Estimate> {
        let parts: Vec<Estimate> = self
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

    /// Headline numbers in percent, per benchmark present and scored with the leaderboard's
    /// metric (a screening metric such as GSM8K's gold likelihood is no leaderboard number).
    pub fn scores(&self) -> BTreeMap<Benchmark, f64> {
        Benchmark::ALL
            .iter()
            .filter(|&&b| self.screening_metric(b).is_none())
            .filter_map(|&b| self.headline(b).map(|h| (b, 100.0 * h.value)))
            .collect()
    }

    /// [`Self::scores`] by task name, plus each screening metric under `"<task> <metric>"`
    /// (never the task's own name, so nothing that reads leaderboard scores by task name takes
    /// it for one).
    pub fn named_scores(&self) -> BTreeMap<String, f64> {
        let mut named: BTreeMap<String, f64> = self
            .scores()
            .into_iter()
            .map(|(b, v)| (b.task_name().to_string(), v))
            .collect();
        for (b, key, v) in self.screening_scores() {
            named.insert(format!("{} {}", b.task_name(), key.metric), v);
        }
        named
    }

    /// Each benchmark scored with a screening metric: the metric and its value in percent.
    fn screening_scores(&self) -> Vec<(Benchmark, MetricKey, f64)> {
        Benchmark::ALL
            .into_iter()
            .filter_map(|b| {
                Some((
                    b,
                    self.screening_metric(b)?,
                    100.0 * self.headline(b)?.value,
                ))
            })
            .collect()
    }

    /// The metric `b` was scored with when it is not the leaderboard's (a screening fidelity).
    pub fn screening_metric(&self, b: Benchmark) -> Option<MetricKey> {
        self.of(b).map(|t| t.headline).find(|&k| k != b.headline())
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
                json!({"seconds": t.seconds, "requests": t.num_requests,
                       "tokens_prefilled": t.tokens.prefilled,
                       "tokens_generated": t.tokens.generated,
                       "tokens_saved": t.tokens.saved,
                       "tokens_drafted": t.tokens.drafted,
                       "drafts_accepted": t.tokens.accepted}),
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
        for (b, key, v) in self.screening_scores() {
            header.push(format!("{} {} (screening)", b.column(), key.metric));
            row.push(format!("{v:.2}"));
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

fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}
