//! Issue #15's benchmark: what a candidate costs in the two few-shot fidelities, and how well
//! each ranks candidates when both get the same compute.
//!
//! A fixed TIES grid over the two weights (SFT_GRID × PREF_GRID candidates). Each candidate is
//! merged once and scored in these phases:
//! - `faithful` — lm-eval's per-document shots on `--docs` search-pool documents per task;
//! - per screening fidelity S (`shared`: one shared shot set per task; `gold`: shared shots and
//!   GSM8K scored by the gold solution's likelihood instead of generation):
//!   - `S` — on the same documents (the speed ratio);
//!   - `S_equal` — on the documents it can score in the faithful time:
//!     `n = docs × median over the grid of faithful seconds / S seconds` (capped by the pool),
//!     the same for every candidate, fixed once every candidate has both timed phases (which
//!     therefore run first, for the whole grid);
//! - `report` — per-document shots on `--report` report-pool documents per task, the ranking a
//!   user would publish.
//!
//! The summary line gives, per screening fidelity present, seconds per candidate at `--docs`
//! documents against faithful's, their ratio, and the Spearman correlation of `faithful` and of
//! `S_equal` with `report`, each and their difference with a 95% bootstrap interval over the
//! candidates, beside the report accuracies' spread and their mean standard error (how much of
//! the report ranking is chance).
//!
//! cargo bench --profile dev --bench scoring_fidelity -- --base DIR --sft REF --pref REF \
//!     [--tasks LIST] [--docs 50] [--report 200] [--sft-grid 0,0.5,1,1.5,2] [--pref-grid 0,1] \
//!     [--phases faithful,shared,shared_equal,gold,gold_equal,report] --cache FILE
//!
//! `--phases` runs only some phases (the report pool, which takes longest and whose timing
//! does not matter, can run first at low priority; the timed phases on a quiet machine).
//!
//! Every (candidate, phase) persists in --cache as it finishes, with `n` on its first line, so
//! an interrupted run resumes where it stopped.
//!
//! `--timing-cache FILE` takes the speed ratios (the summary's seconds, and the equal-compute
//! document counts not yet fixed) from another cache instead: a re-timing of some of the grid's
//! candidates with every phase back to back in one session (this 2-vCPU host drifts by 20%
//! between sessions, so a grid whose phases were timed on different days has no ratio).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use paft::eval::fewshot::FewshotMode;
use paft::eval::{
    parse_task_list, Benchmark, DocSet, EvalConfig, Evaluator, Gsm8kScoring, Pool, SuiteResult,
    TaskStore,
};
use paft::search::{CandidateScorer, MergeInputs, Objective, ObjectiveMetric, SearchSpace};
// The Spearman intervals' bootstrap takes `paft report`'s default seed and draw count.
use paft::report::bootstrap::{
    DEFAULT_RESAMPLES as BOOTSTRAP_RESAMPLES, DEFAULT_SEED as BOOTSTRAP_SEED,
};
use paft::stats::{percentile_interval_95, spearman, spearman_draws};

const PHASES: [&str; 6] = [
    "faithful",
    "shared",
    "shared_equal",
    "gold",
    "gold_equal",
    "report",
];

/// The screening fidelities: phase name and how GSM8K is scored (both share the shots).
const SCREENINGS: [(&str, Gsm8kScoring); 2] = [
    ("shared", Gsm8kScoring::Generate),
    ("gold", Gsm8kScoring::GoldLikelihood),
];

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Row {
    key: String,
    phase: String,
    docs_per_task: usize,
    accuracy: f64,
    /// The accuracy's standard error over documents (rows cached before it was kept have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    accuracy_stderr: Option<f64>,
    seconds: f64,
    task_seconds: BTreeMap<String, f64>,
    tokens_prefilled: u64,
    /// Per benchmark: the headline number and its smooth counterpart, percent (rows cached
    /// before these were kept have none), so any objective can be recomputed from the cache.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    benchmarks: BTreeMap<String, BenchmarkScore>,
}

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct BenchmarkScore {
    metric: String,
    headline: f64,
    headline_stderr: f64,
    probability: Option<f64>,
}

/// The equal-compute document count of one screening fidelity (lines cached before `gold`
/// existed name none: they are `shared`'s).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    #[serde(default = "shared_name")]
    screening: String,
    equal_compute_docs: usize,
}

fn shared_name() -> String {
    "shared".into()
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn floats(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .with_context(|| format!("`{x}` in {s}"))
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Where speed comes from: the grid's own cache (every candidate), or a re-timing cache (every
/// candidate it holds with both phases).
enum Timing<'a> {
    Grid(&'a Cache, &'a [String]),
    Retimed(&'a Cache),
}

impl<'a> Timing<'a> {
    /// The re-timing cache where there is one, else the grid's own rows.
    fn new(retimed: Option<&'a Cache>, cache: &'a Cache, keys: &'a [String]) -> Self {
        match retimed {
            Some(r) => Timing::Retimed(r),
            None => Timing::Grid(cache, keys),
        }
    }

    /// (faithful seconds, screening seconds) per timed candidate.
    fn seconds(&self, screening: &str) -> Result<Vec<(f64, f64)>> {
        let get = |c: &Cache, k: &String, phase: &str| {
            c.rows
                .get(&(k.clone(), phase.to_string()))
                .map(|r| r.seconds)
        };
        match self {
            Timing::Grid(cache, keys) => keys
                .iter()
                .map(|k| {
                    let need = |phase: &str| {
                        get(cache, k, phase).with_context(|| {
                            format!(
                                "{screening}_equal needs the faithful and {screening} phases \
                                 of every candidate first (run --phases faithful,{screening}): \
                                 {k} has no {phase}"
                            )
                        })
                    };
                    Ok((need("faithful")?, need(screening)?))
                })
                .collect(),
            Timing::Retimed(cache) => {
                let pairs: Vec<(f64, f64)> = cache
                    .rows
                    .keys()
                    .filter(|(_, phase)| phase == "faithful")
                    .filter_map(|(k, _)| {
                        Some((get(cache, k, "faithful")?, get(cache, k, screening)?))
                    })
                    .collect();
                if pairs.is_empty() {
                    bail!(
                        "{}: no candidate with both the faithful and the {screening} phase",
                        cache.path.display()
                    );
                }
                Ok(pairs)
            }
        }
    }

    fn source(&self) -> String {
        match self {
            Timing::Grid(..) => "the grid's own rows".into(),
            Timing::Retimed(c) => format!("re-timing {}", c.path.display()),
        }
    }
}

/// `docs × median(faithful seconds / screening seconds)` over the timed candidates.
fn plan(timing: &Timing, docs: usize, screening: &str) -> Result<Plan> {
    let ratios = timing
        .seconds(screening)?
        .iter()
        .map(|(f, s)| f / s)
        .collect();
    Ok(Plan {
        screening: screening.to_string(),
        equal_compute_docs: (docs as f64 * median(ratios)).floor() as usize,
    })
}

struct Cache {
    path: PathBuf,
    /// Equal-compute document counts by screening fidelity.
    plans: BTreeMap<String, usize>,
    rows: BTreeMap<(String, String), Row>,
}

impl Cache {
    fn open(path: PathBuf) -> Result<Self> {
        let mut cache = Cache {
            path,
            plans: BTreeMap::new(),
            rows: BTreeMap::new(),
        };
        if cache.path.exists() {
            let text = std::fs::read_to_string(&cache.path)?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                if let Ok(plan) = serde_json::from_str::<Plan>(line) {
                    cache.plans.insert(plan.screening, plan.equal_compute_docs);
                    continue;
                }
                let row: Row = serde_json::from_str(line)
                    .with_context(|| format!("{}: not a cached row", cache.path.display()))?;
                cache.rows.insert((row.key.clone(), row.phase.clone()), row);
            }
        }
        Ok(cache)
    }

    fn append(&self, line: &impl serde::Serialize) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("{}", self.path.display()))?;
        writeln!(f, "{}", serde_json::to_string(line)?)?;
        f.sync_all()?;
        Ok(())
    }
}

fn main() -> Result<()> {
    paft::process::setup();
    let args: Vec<String> = std::env::args().collect();
    let need = |n: &str| arg(&args, n).with_context(|| format!("missing {n}"));
    let tasks = arg(&args, "--tasks").unwrap_or("leaderboard".into());
    let docs: usize = arg(&args, "--docs").map_or(Ok(50), |s| s.parse())?;
    let report: usize = arg(&args, "--report").map_or(Ok(200), |s| s.parse())?;
    let sft_grid = floats(&arg(&args, "--sft-grid").unwrap_or("0,0.5,1,1.5,2".into()))?;
    let pref_grid = floats(&arg(&args, "--pref-grid").unwrap_or("0,1".into()))?;
    let phases: Vec<String> = arg(&args, "--phases")
        .unwrap_or(PHASES.join(","))
        .split(',')
        .map(str::to_string)
        .collect();
    if let Some(p) = phases.iter().find(|p| !PHASES.contains(&p.as_str())) {
        bail!("unknown phase `{p}` (known: {})", PHASES.join(", "));
    }
    let mut cache = Cache::open(PathBuf::from(need("--cache")?))?;
    let retimed = arg(&args, "--timing-cache")
        .map(|p| Cache::open(PathBuf::from(p)))
        .transpose()?;
    let space = SearchSpace::from_toml(
        &format!(
            r#"
            [search]
            methods = ["ties"]
            solver = "grid"
            evaluations = {n}
            [params]
            "sft.weight" = {{ low = 0.0, high = 4.0 }}
            "pref.weight" = {{ low = 0.0, high = 4.0 }}
            "sft.density" = 0.5
            "pref.density" = 0.5
            [choices]
            normalize = ["false"]
            [subset]
            tasks = "{tasks}"
            docs = {docs}
            finalists = 0
            "#,
            n = sft_grid.len() * pref_grid.len()
        ),
        "scoring-fidelity",
    )?;
    let inputs = MergeInputs {
        base: need("--base")?,
        sft: need("--sft")?,
        pref: need("--pref")?,
    };
    let mut config = EvalConfig::new(parse_task_list(&tasks)?);
    config.split = space.pools;
    let store = || TaskStore::new(TaskStore::default_root());
    // One evaluator per screening fidelity, by phase name.
    let mut screeners = BTreeMap::new();
    for (name, gsm8k) in SCREENINGS {
        let mut c = config.clone();
        c.fewshot_mode = FewshotMode::Shared;
        c.task_options.gsm8k_scoring = gsm8k;
        screeners.insert(name, Evaluator::open(&inputs.base, store(), c)?);
    }
    let mut scorer = CandidateScorer::new(
        inputs,
        store(),
        config,
        0,
        space.objective.clone(),
        None,
        candle_core::Device::Cpu,
        0,
    )?;
    let objective = Objective {
        weights: space.objective.weights.clone(),
        metric: ObjectiveMetric::Accuracy,
        tax: BTreeMap::new(),
    };

    let mut candidates = vec![];
    for &ws in &sft_grid {
        for &wp in &pref_grid {
            let params = BTreeMap::from([
                ("sft.weight".to_string(), ws),
                ("pref.weight".to_string(), wp),
                ("sft.density".to_string(), 0.5),
                ("pref.density".to_string(), 0.5),
            ]);
            candidates.push(paft::search::MergeCandidate::new(
                paft::merge::MergeMethod::Ties,
                params,
                BTreeMap::from([("normalize".to_string(), "false".to_string())]),
            ));
        }
    }
    let keys: Vec<String> = candidates.iter().map(|c| c.key()).collect();
    // The timed phases of every candidate first: the equal-compute document count is the
    // median speed ratio over the grid (candidates that generate long GSM8K answers pay the
    // same decoding in both modes, so one candidate's ratio is not the grid's).
    let groups = [
        vec!["faithful", "shared", "gold"],
        vec!["shared_equal", "gold_equal", "report"],
    ];
    for group in groups {
        for c in &candidates {
            let todo: Vec<&str> = group
                .iter()
                .copied()
                .filter(|p| phases.iter().any(|q| q == p))
                .filter(|p| !cache.rows.contains_key(&(c.key(), p.to_string())))
                .collect();
            if todo.is_empty() {
                continue;
            }
            for phase in &todo {
                let Some(screening) = phase.strip_suffix("_equal") else {
                    continue;
                };
                if !cache.plans.contains_key(screening) {
                    let timing = Timing::new(retimed.as_ref(), &cache, &keys);
                    let p = plan(&timing, docs, screening)?;
                    println!("{}", serde_json::to_string(&p)?);
                    cache.append(&p)?;
                    cache.plans.insert(p.screening, p.equal_compute_docs);
                }
            }
            let weights = scorer.merge(c)?;
            for phase in todo {
                let screening = phase.strip_suffix("_equal").unwrap_or(phase);
                let (n, pool) = match phase {
                    "faithful" | "shared" | "gold" => (docs, Pool::Search),
                    "report" => (report, Pool::Report),
                    _ => (cache.plans[screening], Pool::Search),
                };
                let set = DocSet::sampled(pool, Some(n), 0);
                let evaluator = match screeners.get_mut(screening) {
                    Some(e) => e,
                    None => scorer.evaluator_mut(),
                };
                let result: SuiteResult = evaluator.evaluate_weights(&weights, set)?;
                let (accuracy, stderr) = objective.value(&result, None);
                let row = Row {
                    key: c.key(),
                    phase: phase.to_string(),
                    docs_per_task: n,
                    accuracy,
                    accuracy_stderr: Some(stderr),
                    seconds: result.seconds,
                    task_seconds: result
                        .tasks
                        .iter()
                        .map(|t| (t.name.clone(), t.seconds))
                        .collect(),
                    tokens_prefilled: result.tasks.iter().map(|t| t.tokens.prefilled).sum(),
                    benchmarks: benchmark_scores(&result),
                };
                println!("{}", serde_json::to_string(&row)?);
                cache.append(&row)?;
                cache.rows.insert((row.key.clone(), row.phase.clone()), row);
            }
        }
    }
    if keys.len() < 3 {
        bail!("{} candidates cannot be ranked", keys.len());
    }
    let complete = |phase: &str| {
        keys.iter()
            .all(|k| cache.rows.contains_key(&(k.clone(), phase.to_string())))
    };
    if !complete("faithful") || !complete("report") {
        println!("{{\"incomplete\": \"run the faithful and report phases for the summary\"}}");
        return Ok(());
    }
    let summaries: Vec<serde_json::Value> = SCREENINGS
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| complete(name) && complete(&format!("{name}_equal")))
        .map(|name| {
            let timing = Timing::new(retimed.as_ref(), &cache, &keys);
            summary(&cache, &keys, name, &timing)
        })
        .collect::<Result<_>>()?;
    if summaries.is_empty() {
        println!("{{\"incomplete\": \"no screening fidelity has all its phases yet\"}}");
        return Ok(());
    }
    println!(
        "{}",
        serde_json::json!({
            "candidates": keys.len(),
            "tasks": tasks,
            "docs_per_task": docs,
            "report_docs_per_task": report,
            "screenings": summaries,
        })
    );
    Ok(())
}

/// Per benchmark present: the objective's headline number and its smooth counterpart.
fn benchmark_scores(result: &SuiteResult) -> BTreeMap<String, BenchmarkScore> {
    Benchmark::ALL
        .iter()
        .filter_map(|&b| {
            let h = result.headline(b)?;
            let metric = result.screening_metric(b).unwrap_or(b.headline());
            Some((
                b.task_name().to_string(),
                BenchmarkScore {
                    metric: metric.to_string(),
                    headline: 100.0 * h.value,
                    headline_stderr: 100.0 * h.stderr,
                    probability: result.probability(b).map(|p| 100.0 * p.value),
                },
            ))
        })
        .collect()
}

/// One screening fidelity against `faithful`: speed at the same documents, and each one's
/// Spearman with the report ranking at equal compute.
fn summary(
    cache: &Cache,
    keys: &[String],
    screening: &str,
    timing: &Timing,
) -> Result<serde_json::Value> {
    let row = |k: &String, phase: &str| &cache.rows[&(k.clone(), phase.to_string())];
    let column =
        |phase: &str| -> Vec<f64> { keys.iter().map(|k| row(k, phase).accuracy).collect() };
    let timed = timing.seconds(screening)?;
    let ratios: Vec<f64> = timed.iter().map(|(f, s)| f / s).collect();
    let equal = format!("{screening}_equal");
    let report_acc = column("report");
    // How much each Spearman owes to which candidates the grid holds: a bootstrap over the
    // candidates, paired (each draw ranks the same candidates in both modes).
    let (faithful_acc, equal_acc) = (column("faithful"), column(&equal));
    let draws = spearman_draws(
        &[&faithful_acc, &equal_acc],
        &report_acc,
        BOOTSTRAP_SEED,
        BOOTSTRAP_RESAMPLES,
    );
    let differences: Vec<f64> = draws[1].iter().zip(&draws[0]).map(|(s, f)| s - f).collect();
    // The report accuracies' own noise against their spread: a ranking of candidates whose
    // report accuracies differ by less than a few standard errors is partly chance.
    let report_stderrs: Vec<f64> = keys
        .iter()
        .filter_map(|k| row(k, "report").accuracy_stderr)
        .collect();
    let spearman_faithful = spearman(&faithful_acc, &report_acc);
    let spearman_equal = spearman(&equal_acc, &report_acc);
    Ok(serde_json::json!({
        "screening": screening,
        "equal_compute_docs_per_task": cache.plans.get(screening),
        "timing": timing.source(),
        "timed_candidates": timed.len(),
        "median_seconds_per_candidate_faithful": median(timed.iter().map(|t| t.0).collect()),
        "median_seconds_per_candidate_screening": median(timed.iter().map(|t| t.1).collect()),
        "median_speedup_vs_faithful": median(ratios.clone()),
        "min_speedup_vs_faithful": ratios.iter().cloned().fold(f64::INFINITY, f64::min),
        "spearman_faithful_vs_report": spearman_faithful,
        "spearman_faithful_vs_report_95": percentile_interval_95(draws[0].clone()),
        "spearman_screening_same_docs_vs_report": spearman(&column(screening), &report_acc),
        "spearman_screening_equal_compute_vs_report": spearman_equal,
        "spearman_screening_equal_compute_vs_report_95": percentile_interval_95(draws[1].clone()),
        "spearman_screening_equal_minus_faithful": spearman_equal - spearman_faithful,
        "spearman_screening_equal_minus_faithful_95": percentile_interval_95(differences),
        "spearman_interval": format!(
            "95% percentile bootstrap over the {} candidates, {} draws kept of {BOOTSTRAP_RESAMPLES}, seed {BOOTSTRAP_SEED}",
            keys.len(),
            draws[0].len()
        ),
        "report_accuracy_range": [
            report_acc.iter().cloned().fold(f64::INFINITY, f64::min),
            report_acc.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        ],
        "report_accuracy_stderr_mean": (!report_stderrs.is_empty())
            .then(|| report_stderrs.iter().sum::<f64>() / report_stderrs.len() as f64),
        "report_rows_with_stderr": report_stderrs.len(),
    }))
}
