//! How well a screening objective ranks merge candidates: a GRID×GRID TIES grid over the two
//! weights, each candidate scored once on a small stratified subset of the search pool (which
//! gives both objectives, accuracy and probability, at equal compute) and once on a larger
//! subset of the report pool (accuracy, the number a user would publish). Prints one JSON line
//! per candidate and the Spearman correlation of each screening objective with the report
//! accuracy.
//!
//! cargo bench --profile dev --bench objective_ranking -- --base DIR --sft REF --pref REF \
//!     [--tasks LIST] [--screen 10] [--report 60] [--grid 4] [--high 2.0] [--cache FILE]
//!
//! Scores persist in --cache (one line per candidate), so an interrupted run resumes.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, Result};
use paft::eval::{parse_task_list, DocSet, EvalConfig, Pool, SuiteResult, TaskStore};
use paft::search::{CandidateScorer, MergeInputs, Objective, ObjectiveMetric, SearchSpace};
use paft::stats::spearman;

#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Row {
    key: String,
    screen_accuracy: f64,
    screen_probability: f64,
    report_accuracy: f64,
    seconds: f64,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> Result<()> {
    paft::process::setup();
    let args: Vec<String> = std::env::args().collect();
    let need = |n: &str| arg(&args, n).with_context(|| format!("missing {n}"));
    let tasks =
        arg(&args, "--tasks").unwrap_or("arc_challenge,hellaswag,truthfulqa_mc2,winogrande".into());
    let screen: usize = arg(&args, "--screen").map_or(Ok(10), |s| s.parse())?;
    let report: usize = arg(&args, "--report").map_or(Ok(60), |s| s.parse())?;
    let grid: usize = arg(&args, "--grid").map_or(Ok(4), |s| s.parse())?;
    let high: f64 = arg(&args, "--high").map_or(Ok(2.0), |s| s.parse())?;
    let cache = arg(&args, "--cache").map(std::path::PathBuf::from);
    let tasks_dir = paft::eval::TaskStore::default_root();
    let space = SearchSpace::from_toml(
        &format!(
            r#"
            [search]
            methods = ["ties"]
            solver = "grid"
            evaluations = {n}
            [params]
            "sft.weight" = {{ low = 0.0, high = {high} }}
            "pref.weight" = {{ low = 0.0, high = {high} }}
            "sft.density" = 0.5
            "pref.density" = 0.5
            [choices]
            normalize = ["false"]   # weights scale the deltas; with normalize only their ratio counts
            [subset]
            tasks = "{tasks}"
            docs = {screen}
            finalists = 0
            "#,
            n = grid * grid
        ),
        "objective-ranking",
    )?;
    let inputs = MergeInputs {
        base: need("--base")?,
        sft: need("--sft")?,
        pref: need("--pref")?,
    };
    let mut eval = EvalConfig::new(parse_task_list(&tasks)?);
    eval.split = space.pools;
    let mut scorer = CandidateScorer::new(
        inputs,
        TaskStore::new(tasks_dir),
        eval,
        0,
        space.objective.clone(),
        None,
        candle_core::Device::Cpu,
        0,
    )?;
    let mut done: BTreeMap<String, Row> = BTreeMap::new();
    if let Some(path) = cache.as_ref().filter(|p| p.exists()) {
        for line in std::fs::read_to_string(path)?.lines() {
            let row: Row = serde_json::from_str(line)
                .with_context(|| format!("{}: not a cached row", path.display()))?;
            done.insert(row.key.clone(), row);
        }
    }
    let objective = |metric| Objective {
        weights: space.objective.weights.clone(),
        metric,
        tax: BTreeMap::new(),
    };
    let value = |r: &SuiteResult, m| objective(m).value(r, None).0;
    let mut rows = vec![];
    for i in 0..grid {
        for j in 0..grid {
            let w = |k: usize| high * k as f64 / (grid - 1).max(1) as f64;
            let mut params = BTreeMap::new();
            params.insert("sft.weight".to_string(), w(i));
            params.insert("pref.weight".to_string(), w(j));
            params.insert("sft.density".to_string(), 0.5);
            params.insert("pref.density".to_string(), 0.5);
            let c = paft::search::MergeCandidate::new(
                paft::merge::MergeMethod::Ties,
                params,
                BTreeMap::from([("normalize".to_string(), "false".to_string())]),
            );
            if let Some(row) = done.get(&c.key()) {
                rows.push(row.clone());
                continue;
            }
            let start = std::time::Instant::now();
            let weights = scorer.merge(&c)?;
            let s = scorer
                .evaluator_mut()
                .evaluate_weights(&weights, DocSet::sampled(Pool::Search, Some(screen), 0))?;
            let r = scorer
                .evaluator_mut()
                .evaluate_weights(&weights, DocSet::sampled(Pool::Report, Some(report), 0))?;
            let row = Row {
                key: c.key(),
                screen_accuracy: value(&s, ObjectiveMetric::Accuracy),
                screen_probability: value(&s, ObjectiveMetric::Probability),
                report_accuracy: value(&r, ObjectiveMetric::Accuracy),
                seconds: start.elapsed().as_secs_f64(),
            };
            println!("{}", serde_json::to_string(&row)?);
            if let Some(path) = &cache {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                writeln!(f, "{}", serde_json::to_string(&row)?)?;
                f.sync_all()?;
            }
            rows.push(row);
        }
    }
    let report_acc: Vec<f64> = rows.iter().map(|r| r.report_accuracy).collect();
    let acc: Vec<f64> = rows.iter().map(|r| r.screen_accuracy).collect();
    let prob: Vec<f64> = rows.iter().map(|r| r.screen_probability).collect();
    let distinct = |v: &[f64]| {
        let mut s: Vec<u64> = v.iter().map(|x| x.to_bits()).collect();
        s.sort_unstable();
        s.dedup();
        s.len()
    };
    println!(
        "{}",
        serde_json::json!({
            "candidates": rows.len(), "tasks": tasks, "screen_docs_per_task": screen,
            "report_docs_per_task": report,
            "spearman_accuracy_vs_report": spearman(&acc, &report_acc),
            "spearman_probability_vs_report": spearman(&prob, &report_acc),
            "distinct_screen_accuracy_values": distinct(&acc),
            "distinct_screen_probability_values": distinct(&prob),
        })
    );
    Ok(())
}
