//! The leaderboard's rows: which evaluation a row comes from and what it is called, the headline
//! numbers read back from results.json, the top journal candidates, and the table as a DataFrame.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use polars::prelude::{Column, DataFrame};
use serde_json::Value;

use super::stats::{self, Estimate};
use crate::eval::alignment_tax::TaxEstimates;
use crate::eval::task::Benchmark;
use crate::search::JournalEntry;

/// The preference objective a run trained with; names its row and the sequential baseline's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Pref {
    #[default]
    Dpo,
    Orpo,
}

impl Pref {
    pub fn label(self) -> &'static str {
        match self {
            Pref::Dpo => "DPO",
            Pref::Orpo => "ORPO",
        }
    }

    /// The name of its row directory (and of its delta file).
    pub fn dir_name(self) -> &'static str {
        match self {
            Pref::Dpo => "dpo",
            Pref::Orpo => "orpo",
        }
    }
}

/// What a full-evaluation row is, from its directory name (or `--add` name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowKind {
    Base,
    Sft,
    /// `sft-<variant>`: an SFT variant of the experiment (`[sft_variants.<variant>]`).
    SftVariant(String),
    Pref(Pref),
    Sequential,
    /// `paft`, or `paft-<search>` when an experiment runs several searches (one per SFT variant
    /// and search space).
    Paft(Option<String>),
    /// Any other name: a row labelled by that name, after the fixed ones.
    Added(String),
}

impl RowKind {
    pub fn from_name(name: &str) -> Self {
        match name {
            "base" => RowKind::Base,
            "sft" => RowKind::Sft,
            "dpo" => RowKind::Pref(Pref::Dpo),
            "orpo" => RowKind::Pref(Pref::Orpo),
            "sequential" => RowKind::Sequential,
            "paft" => RowKind::Paft(None),
            other => match (other.strip_prefix("sft-"), other.strip_prefix("paft-")) {
                (Some(v), _) if !v.is_empty() => RowKind::SftVariant(v.to_string()),
                (_, Some(s)) if !s.is_empty() => RowKind::Paft(Some(s.to_string())),
                _ => RowKind::Added(other.to_string()),
            },
        }
    }

    /// Position in the table; added rows keep the order they were found in.
    fn slot(&self) -> u8 {
        match self {
            RowKind::Base => 0,
            RowKind::Sft | RowKind::SftVariant(_) => 1,
            RowKind::Pref(Pref::Dpo) => 2,
            RowKind::Pref(Pref::Orpo) => 3,
            RowKind::Sequential => 4,
            RowKind::Paft(_) => 5,
            RowKind::Added(_) => 6,
        }
    }

    /// `pref` names the sequential baseline's second stage.
    pub fn label(&self, pref: Pref) -> String {
        match self {
            RowKind::Base => "Base".into(),
            RowKind::Sft => "SFT".into(),
            RowKind::SftVariant(v) => format!("SFT ({v})"),
            RowKind::Pref(p) => p.label().into(),
            RowKind::Sequential => format!("SFT→{} (sequential)", pref.label()),
            RowKind::Paft(None) => "PAFT (best merge)".into(),
            RowKind::Paft(Some(search)) => format!("PAFT {search} (best merge)"),
            RowKind::Added(name) => name.clone(),
        }
    }
}

/// A row to read: `NAME=PATH/results.json` on the command line, or `evals/<NAME>/results.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSpec {
    pub name: String,
    pub results: PathBuf,
}

impl FromStr for RowSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.split_once('=') {
            Some((name, path)) if !name.trim().is_empty() && !path.is_empty() => Ok(Self {
                name: name.trim().to_string(),
                results: PathBuf::from(path),
            }),
            _ => Err(format!("expected NAME=PATH/results.json, got `{s}`")),
        }
    }
}

/// How many documents per task a row was scored on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Docs {
    Full,
    PerTask(usize),
    /// A subset whose size differs between tasks (e.g. `--limit`, where MMLU counts per subject).
    Mixed,
}

impl Docs {
    pub fn of_journal(docs_per_task: Option<usize>) -> Self {
        docs_per_task.map_or(Docs::Full, Docs::PerTask)
    }
}

impl std::fmt::Display for Docs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Docs::Full => write!(f, "full"),
            Docs::PerTask(n) => write!(f, "{n}"),
            Docs::Mixed => write!(f, "mixed"),
        }
    }
}

/// One line of the leaderboard: headline numbers in percent.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderboardRow {
    pub label: String,
    pub docs: Docs,
    pub scores: BTreeMap<Benchmark, f64>,
    /// Standard errors (percent) of the benchmarks whose per-document records were read.
    pub stderrs: BTreeMap<Benchmark, f64>,
    /// Alignment-tax numbers, where the row has them.
    pub(crate) tax: TaxEstimates,
}

impl LeaderboardRow {
    /// A row with numbers only (no uncertainty, no alignment tax).
    pub fn plain(label: String, docs: Docs, scores: BTreeMap<Benchmark, f64>) -> Self {
        Self {
            label,
            docs,
            scores,
            stderrs: BTreeMap::new(),
            tax: TaxEstimates::default(),
        }
    }

    /// The leaderboard average: the plain mean of the six; None unless all six are present.
    pub fn average(&self) -> Option<f64> {
        (self.scores.len() == Benchmark::ALL.len())
            .then(|| self.scores.values().sum::<f64>() / self.scores.len() as f64)
    }

    /// The average's stderr, sqrt(Σ se_b²) / 6; None unless all six have one.
    pub fn average_stderr(&self) -> Option<f64> {
        let parts: Vec<Estimate> = Benchmark::ALL
            .iter()
            .map(|b| {
                Some(Estimate {
                    value: *self.scores.get(b)?,
                    stderr: *self.stderrs.get(b)?,
                })
            })
            .collect::<Option<_>>()?;
        stats::average(&parts)
            .map(|e| e.stderr)
            .filter(|se| se.is_finite())
    }
}

/// The settings in `settings` (a results.json's `config`, a search's search-documents.json)
/// that make its numbers a screening fidelity rather than lm-eval's: each `(key, value)` whose
/// value is not the faithful one. A key that is absent reads as faithful (files from before
/// the screening options, and lm-eval's own, name neither).
pub(crate) fn screening_settings(settings: &Value) -> Vec<(&'static str, String)> {
    [
        ("fewshot_mode", "per_document"),
        ("gsm8k_scoring", "generate"),
    ]
    .into_iter()
    .filter_map(|(key, faithful)| {
        let v = settings.get(key)?.as_str()?;
        (v != faithful).then(|| (key, v.to_string()))
    })
    .collect()
}

/// What the report needs from one results.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultsFile {
    pub scores: BTreeMap<Benchmark, f64>,
    pub docs: Docs,
    /// `n-samples.<task>.effective`: documents scored per task (leaderboard tasks only; empty
    /// when the file has no `n-samples`).
    pub effective: BTreeMap<String, u64>,
}

/// Headline numbers (percent) of the leaderboard tasks present in a results.json written by
/// `paft eval --output` (or lm-eval): `results.<task>."<metric>,<filter>"`, MMLU from its group
/// entry `results.mmlu."acc,none"`.
pub fn scores_from_results(path: &Path) -> Result<BTreeMap<Benchmark, f64>> {
    Ok(ResultsFile::read(path)?.scores)
}

impl ResultsFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&json).with_context(|| format!("malformed results file {}", path.display()))
    }

    fn from_json(json: &Value) -> Result<Self> {
        let Some(results) = json.get("results").and_then(Value::as_object) else {
            bail!("no `results` object (expected the results.json of `paft eval --output`)");
        };
        // A screening fidelity's numbers are not lm-eval's: a leaderboard row must not show them
        // as if they were (lm-eval's own results.json names neither key).
        if let Some((key, v)) = json
            .get("config")
            .and_then(|c| screening_settings(c).into_iter().next())
        {
            bail!(
                "scored with {key} = {v:?}, a screening fidelity whose numbers are not \
                 lm-eval's; evaluate with `paft eval` without --{} for a leaderboard row",
                key.replace('_', "-")
            );
        }
        let mut scores = BTreeMap::new();
        for b in Benchmark::ALL {
            let Some(entry) = results.get(b.task_name()) else {
                continue;
            };
            let key = b.headline().to_string();
            let value = entry
                .as_object()
                .with_context(|| format!("results.{} is not an object", b.task_name()))?
                .get(&key)
                .with_context(|| format!("results.{} has no \"{key}\"", b.task_name()))?;
            let v = match value {
                // paft writes null for a metric that is not a number (nothing scored).
                Value::Null => {
                    tracing::warn!("results.{}.\"{key}\" is null; left empty", b.task_name());
                    continue;
                }
                v => v.as_f64().with_context(|| {
                    format!("results.{}.\"{key}\" is not a number: {v}", b.task_name())
                })?,
            };
            if !(0.0..=1.0).contains(&v) {
                bail!(
                    "results.{}.\"{key}\" = {v} is not a fraction in [0, 1]",
                    b.task_name()
                );
            }
            scores.insert(b, 100.0 * v);
        }
        if scores.is_empty() {
            bail!("none of the six leaderboard tasks is in `results`");
        }
        Ok(Self {
            scores,
            docs: docs_from_n_samples(json.get("n-samples")),
            effective: effective_counts(json.get("n-samples")),
        })
    }
}

/// `n-samples.<task>.effective` of the leaderboard tasks (MMLU by subject).
fn effective_counts(n_samples: Option<&Value>) -> BTreeMap<String, u64> {
    let Some(tasks) = n_samples.and_then(Value::as_object) else {
        return BTreeMap::new();
    };
    tasks
        .iter()
        .filter(|(task, _)| super::samples::benchmark_of_task(task).is_some())
        .filter_map(|(task, n)| Some((task.clone(), n.get("effective")?.as_u64()?)))
        .collect()
}

/// `n-samples.<task>.{original, effective}` summed per benchmark (MMLU over its subjects).
fn docs_from_n_samples(n_samples: Option<&Value>) -> Docs {
    let Some(tasks) = n_samples.and_then(Value::as_object) else {
        return Docs::Full;
    };
    let mut per: BTreeMap<Benchmark, (u64, u64)> = BTreeMap::new();
    for (task, n) in tasks {
        let b = Benchmark::ALL.into_iter().find(|b| {
            task == b.task_name() || (*b == Benchmark::Mmlu && task.starts_with("mmlu_"))
        });
        let (Some(b), Some(orig), Some(eff)) = (
            b,
            n.get("original").and_then(Value::as_u64),
            n.get("effective").and_then(Value::as_u64),
        ) else {
            continue;
        };
        let e = per.entry(b).or_default();
        e.0 += orig;
        e.1 += eff;
    }
    if per.values().all(|(o, e)| o == e) {
        return Docs::Full;
    }
    let mut sizes: Vec<u64> = per.values().map(|(_, e)| *e).collect();
    sizes.sort_unstable();
    sizes.dedup();
    match sizes[..] {
        [n] => Docs::PerTask(n as usize),
        _ => Docs::Mixed,
    }
}

/// A full evaluation: what it is, where it was read from and what its results.json holds.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluatedRow {
    pub kind: RowKind,
    pub spec: RowSpec,
    pub file: ResultsFile,
}

impl EvaluatedRow {
    /// The directory of its results.json, where its samples and alignment-tax files lie.
    pub fn dir(&self) -> &Path {
        match self.spec.results.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }
}

/// The full-evaluation rows in table order (see `evaluated_rows`) as plain leaderboard lines.
pub fn evaluation_rows(specs: &[RowSpec], pref: Pref) -> Result<Vec<LeaderboardRow>> {
    Ok(evaluated_rows(specs)?
        .into_iter()
        .map(|r| LeaderboardRow::plain(r.kind.label(pref), r.file.docs, r.file.scores))
        .collect())
}

/// The full evaluations in table order: base, SFT, DPO/ORPO, sequential, PAFT, then added rows in
/// the order given. Two specs of one kind are an error.
pub fn evaluated_rows(specs: &[RowSpec]) -> Result<Vec<EvaluatedRow>> {
    let mut kinds: Vec<(RowKind, &RowSpec)> = vec![];
    for spec in specs {
        let kind = RowKind::from_name(&spec.name);
        if let Some((_, first)) = kinds.iter().find(|(k, _)| *k == kind) {
            bail!(
                "row `{}` is given twice: {} and {}",
                spec.name,
                first.results.display(),
                spec.results.display()
            );
        }
        kinds.push((kind, spec));
    }
    kinds.sort_by_key(|(k, _)| k.slot());
    kinds
        .into_iter()
        .map(|(kind, spec)| {
            Ok(EvaluatedRow {
                file: ResultsFile::read(&spec.results)?,
                kind,
                spec: spec.clone(),
            })
        })
        .collect()
}

/// The run's preference objective from the names of its rows and delta files: ORPO when `orpo`
/// appears and `dpo` does not, else DPO.
pub fn run_pref<'a>(names: impl IntoIterator<Item = &'a str>) -> Pref {
    let names: Vec<&str> = names.into_iter().collect();
    if names.contains(&"orpo") && !names.contains(&"dpo") {
        Pref::Orpo
    } else {
        Pref::Dpo
    }
}

/// The `k` best distinct candidates of the journal: highest rung first, then objective; each
/// candidate once, with its highest-rung evaluation.
pub fn top_candidates(entries: &[JournalEntry], k: usize, pref: Pref) -> Vec<LeaderboardRow> {
    let mut sorted: Vec<&JournalEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| {
        b.rung
            .cmp(&a.rung)
            .then(b.objective.total_cmp(&a.objective))
            .then(a.index.cmp(&b.index))
    });
    let mut seen = std::collections::HashSet::new();
    sorted
        .into_iter()
        .filter(|e| seen.insert(e.key.as_str()))
        .take(k)
        .map(|e| {
            LeaderboardRow::plain(
                candidate_label(e, pref),
                Docs::of_journal(e.docs_per_task),
                Benchmark::ALL
                    .into_iter()
                    .filter_map(|b| e.scores.get(b.task_name()).map(|v| (b, *v)))
                    .collect(),
            )
        })
        .collect()
}

/// `ties w_sft=0.62 d_sft=0.5 w_dpo=0.41 …`: the method, then every parameter, SFT's first, then
/// the preference model's, then global ones (per-model names shortened: weight → w, density → d;
/// `pref` named after the run's objective), then choices.
pub fn candidate_label(e: &JournalEntry, pref: Pref) -> String {
    let group = |name: &str| match name.split_once('.') {
        Some(("sft", p)) => (0, param_rank(p)),
        Some(("pref", p)) => (1, param_rank(p)),
        _ => (2, 0),
    };
    let mut params: Vec<(&String, &f64)> = e.params.iter().collect();
    params.sort_by_key(|(name, _)| group(name));
    let mut parts = vec![e.method.clone()];
    for (name, v) in params {
        parts.push(format!("{}={}", short_param(name, pref), short_number(*v)));
    }
    for (name, v) in &e.choices {
        parts.push(format!("{name}={v}"));
    }
    parts.join(" ")
}

/// Weight before density before the rest.
fn param_rank(param: &str) -> u8 {
    match param {
        "weight" => 0,
        "density" => 1,
        _ => 2,
    }
}

fn short_param(name: &str, pref: Pref) -> String {
    let Some((model, param)) = name.split_once('.') else {
        return name.to_string();
    };
    let model = match model {
        "pref" => pref.dir_name(),
        m => m,
    };
    let param = match param {
        "weight" => "w",
        "density" => "d",
        p => p,
    };
    format!("{param}_{model}")
}

/// Up to three decimals without trailing zeros; tiny values in scientific notation.
fn short_number(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// Column of the row subset size.
pub const DOCS_COLUMN: &str = "docs/task";

/// Suffix of a column's standard-error column in CSV and Parquet (`ARC_stderr`).
pub const STDERR_SUFFIX: &str = "_stderr";
/// Alignment-tax columns; the arrow says which direction is better.
pub const SFT_LOSS_COLUMN: &str = "Held-out SFT loss ↓";
pub const PREF_ACCURACY_COLUMN: &str = "Pref. accuracy ↑";
pub const REWARD_MARGIN_COLUMN: &str = "Reward margin ↑";

/// `Model, docs/task, ARC, HellaSwag, MMLU, TruthfulQA, Winogrande, GSM8K, Average`, then the
/// alignment-tax columns when a row has them, then one `<column>_stderr` per number column (after
/// the numbers, so readers of the older layout find every number where it was). Percent at full
/// precision (the Markdown and HTML show two decimals, as the leaderboard does); a missing
/// stderr is null, never 0.
pub fn leaderboard_frame(rows: &[LeaderboardRow]) -> Result<DataFrame> {
    type Getter = Box<dyn Fn(&LeaderboardRow) -> Option<Estimate>>;
    let mut numbers: Vec<(String, Getter)> = vec![];
    for b in Benchmark::ALL {
        numbers.push((
            b.column().into(),
            Box::new(move |r: &LeaderboardRow| {
                Some(Estimate {
                    value: *r.scores.get(&b)?,
                    stderr: r.stderrs.get(&b).copied().unwrap_or(f64::NAN),
                })
            }),
        ));
    }
    numbers.push((
        "Average".into(),
        Box::new(|r: &LeaderboardRow| {
            Some(Estimate {
                value: r.average()?,
                stderr: r.average_stderr().unwrap_or(f64::NAN),
            })
        }),
    ));
    type TaxGetter = fn(&TaxEstimates) -> Option<Estimate>;
    let tax: [(&str, TaxGetter); 3] = [
        (SFT_LOSS_COLUMN, |t| t.sft_loss),
        (PREF_ACCURACY_COLUMN, |t| t.pref_accuracy),
        (REWARD_MARGIN_COLUMN, |t| t.reward_margin),
    ];
    for (name, get) in tax {
        if rows.iter().any(|r| get(&r.tax).is_some()) {
            numbers.push((name.into(), Box::new(move |r: &LeaderboardRow| get(&r.tax))));
        }
    }

    let mut columns = vec![
        Column::new(
            "Model".into(),
            rows.iter().map(|r| r.label.clone()).collect::<Vec<_>>(),
        ),
        Column::new(
            DOCS_COLUMN.into(),
            rows.iter().map(|r| r.docs.to_string()).collect::<Vec<_>>(),
        ),
    ];
    for (name, get) in &numbers {
        columns.push(Column::new(
            name.as_str().into(),
            rows.iter()
                .map(|r| get(r).map(|e| e.value))
                .collect::<Vec<_>>(),
        ));
    }
    for (name, get) in &numbers {
        columns.push(Column::new(
            format!("{name}{STDERR_SUFFIX}").into(),
            rows.iter()
                .map(|r| get(r).map(|e| e.stderr).filter(|se| se.is_finite()))
                .collect::<Vec<_>>(),
        ));
    }
    Ok(DataFrame::new(rows.len(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn results_json(frac: f64) -> Value {
        json!({
            "results": {
                "arc_challenge": {"alias": "arc_challenge", "acc,none": frac - 0.1, "acc_norm,none": frac},
                "hellaswag": {"acc_norm,none": frac},
                "mmlu_anatomy": {"acc,none": 0.9},
                "mmlu": {"alias": "mmlu", "acc,none": frac, "acc_micro,none": 0.2},
                "truthfulqa_mc2": {"acc,none": frac},
                "winogrande": {"acc,none": frac},
                "gsm8k": {"exact_match,strict-match": frac, "exact_match,flexible-extract": 0.99},
            },
            "n-samples": {
                "arc_challenge": {"original": 1172, "effective": 1172},
                "mmlu_anatomy": {"original": 135, "effective": 135},
            },
        })
    }

    #[test]
    fn results_json_gives_headline_numbers_in_percent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.json");
        std::fs::write(&path, results_json(0.5).to_string()).unwrap();
        let scores = scores_from_results(&path).unwrap();
        assert_eq!(scores.len(), 6);
        assert!(
            scores.values().all(|v| (v - 50.0).abs() < 1e-12),
            "{scores:?}"
        );
        assert_eq!(ResultsFile::read(&path).unwrap().docs, Docs::Full);
        // paft's faithful fidelity, named, reads the same.
        let mut named = results_json(0.5);
        named["config"] = json!({"fewshot_mode": "per_document", "gsm8k_scoring": "generate"});
        std::fs::write(&path, named.to_string()).unwrap();
        assert_eq!(scores_from_results(&path).unwrap(), scores);
    }

    #[test]
    fn malformed_results_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("truncated.json", "{\"results\": {".to_string()),
            ("no_results.json", json!({"config": {}}).to_string()),
            (
                "string.json",
                json!({"results": {"gsm8k": {"exact_match,strict-match": "high"}}}).to_string(),
            ),
            (
                "no_metric.json",
                json!({"results": {"arc_challenge": {"acc,none": 0.3}}}).to_string(),
            ),
            (
                "percent.json",
                json!({"results": {"winogrande": {"acc,none": 61.0}}}).to_string(),
            ),
            ("empty.json", json!({"results": {}}).to_string()),
            ("shared.json", {
                let mut j = results_json(0.5);
                j["config"] = json!({"fewshot_mode": "shared", "gsm8k_scoring": "generate"});
                j.to_string()
            }),
            ("gold.json", {
                let mut j = results_json(0.5);
                j["config"] =
                    json!({"fewshot_mode": "per_document", "gsm8k_scoring": "gold_likelihood"});
                j.to_string()
            }),
        ];
        for (name, text) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", scores_from_results(&path).unwrap_err());
            assert!(err.contains(name), "{name}: {err}");
        }
        let missing = dir.path().join("absent.json");
        let err = format!("{:#}", scores_from_results(&missing).unwrap_err());
        assert!(err.contains("absent.json"), "{err}");
    }

    #[test]
    fn subset_sizes_come_from_n_samples() {
        let n = |pairs: &[(&str, u64, u64)]| {
            let m: serde_json::Map<String, Value> = pairs
                .iter()
                .map(|(t, o, e)| (t.to_string(), json!({"original": o, "effective": e})))
                .collect();
            docs_from_n_samples(Some(&Value::Object(m)))
        };
        assert_eq!(n(&[("arc_challenge", 10, 10)]), Docs::Full);
        assert_eq!(
            n(&[
                ("arc_challenge", 100, 40),
                ("mmlu_a", 50, 20),
                ("mmlu_b", 50, 20)
            ]),
            Docs::PerTask(40)
        );
        assert_eq!(
            n(&[
                ("arc_challenge", 100, 40),
                ("mmlu_a", 50, 40),
                ("mmlu_b", 50, 40)
            ]),
            Docs::Mixed
        );
    }

    #[test]
    fn rows_come_in_leaderboard_order_with_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |name: &str| {
            let path = dir.path().join(format!("{name}.json"));
            std::fs::write(&path, results_json(0.4).to_string()).unwrap();
            RowSpec {
                name: name.into(),
                results: path,
            }
        };
        let specs = [
            spec("zeta"),
            spec("paft"),
            spec("orpo"),
            spec("alpha"),
            spec("sequential"),
            spec("sft"),
            spec("base"),
        ];
        let pref = run_pref(specs.iter().map(|s| s.name.as_str()));
        assert_eq!(pref, Pref::Orpo);
        let labels: Vec<String> = evaluation_rows(&specs, pref)
            .unwrap()
            .into_iter()
            .map(|r| r.label)
            .collect();
        assert_eq!(
            labels,
            [
                "Base",
                "SFT",
                "ORPO",
                "SFT→ORPO (sequential)",
                "PAFT (best merge)",
                "zeta",
                "alpha"
            ]
        );
        let err = evaluation_rows(&[spec("sft"), spec("sft")], Pref::Dpo).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn add_needs_name_equals_path() {
        let s: RowSpec = "mine=out/results.json".parse().unwrap();
        assert_eq!(s.name, "mine");
        assert_eq!(s.results, PathBuf::from("out/results.json"));
        assert!("out/results.json".parse::<RowSpec>().is_err());
        assert!("=x".parse::<RowSpec>().is_err());
    }

    fn entry(index: usize, rung: usize, w: f64, objective: f64) -> JournalEntry {
        JournalEntry {
            index,
            key: format!("ties|{w}"),
            method: "ties".into(),
            params: BTreeMap::from([
                ("pref.weight".to_string(), 0.41),
                ("sft.weight".to_string(), w),
            ]),
            choices: BTreeMap::new(),
            rung,
            docs_per_task: if rung == 0 { Some(20) } else { None },
            scores: BTreeMap::from([("gsm8k".to_string(), objective)]),
            objective,
            objective_stderr: None,
            pool: None,
            tax: Default::default(),
            seconds: 1.0,
        }
    }

    #[test]
    fn candidates_rank_by_rung_then_objective_once_each() {
        let entries = [
            entry(0, 0, 0.62, 50.0),
            entry(1, 0, 0.3, 60.0),
            entry(2, 0, 0.9, 40.0),
            entry(3, 1, 0.62, 45.0),
        ];
        let rows = top_candidates(&entries, 3, Pref::Dpo);
        let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "ties w_sft=0.62 w_dpo=0.41",
                "ties w_sft=0.3 w_dpo=0.41",
                "ties w_sft=0.9 w_dpo=0.41"
            ]
        );
        assert_eq!(rows[0].docs, Docs::Full);
        assert_eq!(rows[1].docs, Docs::PerTask(20));
        assert_eq!(rows[0].scores[&Benchmark::Gsm8k], 45.0);
        assert_eq!(rows[0].average(), None);
        assert_eq!(short_number(0.0005), "5.0e-4");
        assert_eq!(short_number(1.0), "1");
    }

    #[test]
    fn the_frame_has_the_leaderboard_columns() {
        let scores: BTreeMap<Benchmark, f64> =
            Benchmark::ALL.into_iter().map(|b| (b, 30.0)).collect();
        let plain = LeaderboardRow::plain("Base".into(), Docs::Full, scores.clone());
        let mut with_se = LeaderboardRow::plain("PAFT".into(), Docs::Full, scores);
        with_se.stderrs = Benchmark::ALL
            .into_iter()
            .map(|b| (b, if b == Benchmark::Arc { 0.3 } else { 0.4 }))
            .collect();
        with_se.tax.sft_loss = Some(Estimate {
            value: 1.25,
            stderr: 0.01,
        });
        let df = leaderboard_frame(&[plain, with_se]).unwrap();
        let names: Vec<String> = df.columns().iter().map(|c| c.name().to_string()).collect();
        let mut want = vec!["Model", "docs/task"];
        let numbers = [
            "ARC",
            "HellaSwag",
            "MMLU",
            "TruthfulQA",
            "Winogrande",
            "GSM8K",
            "Average",
            SFT_LOSS_COLUMN,
        ];
        want.extend(numbers);
        let stderr_names: Vec<String> = numbers.iter().map(|n| format!("{n}_stderr")).collect();
        want.extend(stderr_names.iter().map(String::as_str));
        assert_eq!(names, want);
        let f = |col: &str| df.column(col).unwrap().f64().unwrap().clone();
        assert_eq!(f("Average").get(0), Some(30.0));
        // No records: null, not 0.
        assert_eq!(f("ARC_stderr").get(0), None);
        assert_eq!(f("Average_stderr").get(0), None);
        assert_eq!(f(&format!("{SFT_LOSS_COLUMN}_stderr")).get(0), None);
        assert_eq!(f("ARC_stderr").get(1), Some(0.3));
        let avg_se = (0.09f64 + 5.0 * 0.16).sqrt() / 6.0;
        assert!((f("Average_stderr").get(1).unwrap() - avg_se).abs() < 1e-12);
        // Without any alignment-tax file the columns stay out.
        let df = leaderboard_frame(&[LeaderboardRow::plain(
            "x".into(),
            Docs::Full,
            BTreeMap::new(),
        )])
        .unwrap();
        assert_eq!(df.width(), 2 + 7 + 7);
    }
}
