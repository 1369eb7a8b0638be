//! The search loop: the solver screens candidates on the small subset, successive halving
//! re-scores the best on larger subsets and the finalists on the full task sets, and the winner
//! is written as a Hugging Face model plus the mergekit YAML that reproduces it.
//!
//! Every evaluation goes through the journal first: a candidate already journaled on a rung is
//! never scored again, so `--resume` replays a killed search (the solvers are deterministic)
//! without re-evaluating anything and ends with the same best.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;

use super::journal::{Journal, JournalEntry};
use super::scorer::{CandidateScorer, MergeInputs};
use super::solver::{minimize, Problem, SolverKind, SolverSettings};
use super::space::{MergeCandidate, SearchSpace};
use crate::eval::{parse_task_list, EvalConfig, TaskStore};
use crate::io::write_file_atomic;
use crate::merge::MergeMethod;
use crate::model::Pretrained;

pub struct SearchOptions {
    pub out: PathBuf,
    /// Overrides the space's solver.
    pub solver: Option<SolverKind>,
    pub resume: bool,
    pub device: Device,
    pub tasks_dir: PathBuf,
}

/// Where a search run keeps its files.
pub struct RunFiles;

impl RunFiles {
    pub fn journal(out: &Path) -> PathBuf {
        out.join("journal.jsonl")
    }
    pub fn best_model(out: &Path) -> PathBuf {
        out.join("best")
    }
    pub fn best_yaml(out: &Path) -> PathBuf {
        out.join("best-merge.yaml")
    }
    pub fn summary(out: &Path) -> PathBuf {
        out.join("search-summary.json")
    }
    pub fn search_documents(out: &Path) -> PathBuf {
        out.join("search-documents.json")
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SearchSummary {
    pub space: String,
    pub solver: SolverKind,
    pub inputs: MergeInputs,
    pub best: JournalEntry,
    pub evaluations: usize,
    /// Evaluations run by this invocation (the rest came from the journal).
    pub new_evaluations: usize,
}

struct Searcher<'a> {
    space: &'a SearchSpace,
    scorer: CandidateScorer,
    journal: Journal,
    new_evaluations: usize,
}

impl Searcher<'_> {
    /// The journaled objective of `c` on `rung`, scoring it first if it is not there yet.
    fn evaluate(&mut self, c: &MergeCandidate, rung: usize, docs: Option<usize>) -> Result<f64> {
        let key = c.key();
        if let Some(e) = self.journal.find(&key, rung) {
            tracing::debug!(key, rung, "from the journal");
            return Ok(e.objective);
        }
        let scored = self.scorer.score(c, docs)?;
        let entry = JournalEntry {
            index: self.journal.entries().len(),
            key: key.clone(),
            method: c.method.name().to_string(),
            params: c.params.clone(),
            choices: c.choices.clone(),
            rung,
            docs_per_task: docs,
            scores: scored.scores,
            objective: scored.objective,
            objective_stderr: Some(scored.objective_stderr).filter(|v| v.is_finite()),
            pool: Some(crate::eval::Pool::Search.name().to_string()),
            tax: scored.tax,
            seconds: scored.seconds,
        };
        tracing::info!(
            "#{} rung {rung} ({}): {key} → {:.2} ± {:.2} in {:.0}s",
            entry.index,
            docs.map_or("search pool".to_string(), |d| format!("{d} docs/task")),
            entry.objective,
            scored.objective_stderr,
            entry.seconds
        );
        self.journal.append(entry)?;
        self.new_evaluations += 1;
        Ok(scored.objective)
    }

    /// Entries of a rung, best first, one per candidate.
    fn ranked(&self, rung: usize) -> Vec<JournalEntry> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out: Vec<JournalEntry> = self
            .journal
            .entries()
            .iter()
            .filter(|e| e.rung == rung && seen.insert(e.key.clone()))
            .cloned()
            .collect();
        // Ties go to the earlier evaluation, so the ranking is stable across resumes.
        out.sort_by(|a, b| {
            b.objective
                .total_cmp(&a.objective)
                .then(a.index.cmp(&b.index))
        });
        out
    }
}

fn candidate_of(e: &JournalEntry) -> Result<MergeCandidate> {
    Ok(MergeCandidate::new(
        MergeMethod::parse(&e.method)?,
        e.params.clone(),
        e.choices.clone(),
    ))
}

/// Runs (or resumes) a search; returns its summary. `space_text` is copied into the run.
pub fn run_search(
    space: &SearchSpace,
    space_text: &str,
    inputs: MergeInputs,
    opts: &SearchOptions,
) -> Result<SearchSummary> {
    let journal_path = RunFiles::journal(&opts.out);
    if journal_path.exists() && !opts.resume {
        bail!(
            "{} already holds a search (journal.jsonl); pass --resume to continue it or choose another --out",
            opts.out.display()
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let space_copy = opts.out.join("space.toml");
    if opts.resume && space_copy.exists() {
        let before = std::fs::read_to_string(&space_copy)?;
        if before != space_text {
            bail!(
                "{} was started with a different search space; resuming would mix results",
                opts.out.display()
            );
        }
    }
    write_file_atomic(&space_copy, space_text.as_bytes())?;
    let solver = opts.solver.unwrap_or(space.solver);
    let journal = Journal::open(&journal_path)?;
    if !journal.entries().is_empty() {
        tracing::info!(
            "resuming: {} evaluations in {}",
            journal.entries().len(),
            journal_path.display()
        );
    }
    let mut eval = EvalConfig::new(parse_task_list(&space.budget.tasks)?);
    eval.split = space.pools;
    eval.fewshot_mode = space.budget.fewshot;
    let mut scorer = CandidateScorer::new(
        inputs.clone(),
        TaskStore::new(opts.tasks_dir.clone()),
        eval,
        space.budget.subset_seed,
        space.objective.clone(),
        space.alignment_tax.as_ref(),
        opts.device.clone(),
        space.seed,
    )?;
    write_search_documents(&mut scorer, space, &opts.out)?;
    let mut s = Searcher {
        space,
        scorer,
        journal,
        new_evaluations: 0,
    };

    // Screening: the solver on the small subset.
    let cats = space.categorical();
    let problem = Problem {
        continuous: space.searched().len(),
        categorical: cats.iter().map(|c| c.1.len()).collect(),
        initial: Some(space.initial_unit()),
    };
    let settings = SolverSettings {
        budget: space.budget.evaluations,
        seed: space.seed,
        grid_points: space.grid_points,
        swarm_size: 6,
    };
    let docs = Some(space.budget.docs);
    let bar = crate::progress::bar(space.budget.evaluations as u64, "candidates");
    minimize(solver, &problem, &settings, &mut |c| {
        let candidate = s.space.candidate(&c.choices, &c.x);
        let value = s.evaluate(&candidate, 0, docs)?;
        bar.inc(1);
        Ok(-value)
    })?;
    bar.finish_and_clear();

    // Successive halving onto larger subsets, then the finalists on the full task sets.
    let mut rungs: Vec<(Option<usize>, usize)> =
        space.budget.rungs.iter().map(|&d| (Some(d), 0)).collect();
    if space.budget.finalists > 0 {
        rungs.push((None, space.budget.finalists));
    }
    let mut rung = 0;
    for (docs, finalists) in rungs {
        let pool = s.ranked(rung);
        let keep = if finalists > 0 {
            finalists
        } else {
            ((pool.len() as f64 * space.budget.promote).ceil() as usize).max(1)
        };
        rung += 1;
        for e in pool.iter().take(keep) {
            s.evaluate(&candidate_of(e)?, rung, docs)?;
        }
    }
    let best = s
        .ranked(rung)
        .into_iter()
        .next()
        .context("the search evaluated no candidate")?;
    write_best(&s.scorer, &best, &opts.out)?;
    let summary = SearchSummary {
        space: space.name.clone(),
        solver,
        inputs,
        evaluations: s.journal.entries().len(),
        new_evaluations: s.new_evaluations,
        best,
    };
    write_file_atomic(
        &RunFiles::summary(&opts.out),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// `search-documents.json`: the search pool's split and the documents of every rung, per task,
/// so anyone can check that no report row was scored on a document the search selected on.
fn write_search_documents(
    scorer: &mut CandidateScorer,
    space: &SearchSpace,
    out: &Path,
) -> Result<()> {
    let mut rungs = serde_json::Map::new();
    let sizes: Vec<Option<usize>> = std::iter::once(Some(space.budget.docs))
        .chain(space.budget.rungs.iter().map(|&d| Some(d)))
        .chain((space.budget.finalists > 0).then_some(None))
        .collect();
    for (rung, docs) in sizes.into_iter().enumerate() {
        let set = scorer.doc_set(docs);
        let suite = scorer.evaluator_mut().suite(set)?;
        let tasks: serde_json::Map<String, serde_json::Value> = suite
            .tasks
            .iter()
            .map(|t| (t.task.name().to_string(), serde_json::json!(t.doc_ids)))
            .collect();
        rungs.insert(rung.to_string(), serde_json::Value::Object(tasks));
    }
    let mut doc = serde_json::json!({"pool": "search", "split": space.pools,
                                     "fewshot_mode": space.budget.fewshot, "rungs": rungs});
    if let Some((sft, pairs)) = scorer.tax_row_ids() {
        doc["alignment_tax"] = serde_json::json!({"sft": sft, "preference": pairs});
    }
    write_file_atomic(
        &RunFiles::search_documents(out),
        &serde_json::to_vec_pretty(&doc)?,
    )
}

/// The best candidate as a Hugging Face directory (with its mergekit config inside) and as a
/// stand-alone mergekit YAML.
fn write_best(scorer: &CandidateScorer, best: &JournalEntry, out: &Path) -> Result<()> {
    let c = candidate_of(best)?;
    let yaml = c.mergekit_yaml(&scorer.inputs().base, scorer.inputs().models());
    let header = format!(
        "# paft search best: objective {:.4} on {}\n",
        best.objective,
        best.docs_per_task
            .map_or("the full task sets".to_string(), |d| format!(
                "{d} documents per task"
            ))
    );
    write_file_atomic(
        &RunFiles::best_yaml(out),
        (header.clone() + &yaml).as_bytes(),
    )?;
    let dir = RunFiles::best_model(out);
    if dir.join("mergekit_config.yml").exists()
        && std::fs::read_to_string(dir.join("mergekit_config.yml"))? == yaml
    {
        return Ok(()); // already written by the run that was resumed
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    let base = scorer.base();
    let merged = Pretrained {
        dir: base.dir.clone(),
        config: base.config.clone(),
        tokenizer: base.tokenizer.clone(),
        weights: scorer.merge(&c)?,
    };
    let staging = out.join(".best.partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    merged.save(&staging, None, crate::model::weights::DEFAULT_SHARD_BYTES)?;
    write_file_atomic(&staging.join("mergekit_config.yml"), yaml.as_bytes())?;
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("cannot move the best model into {}", dir.display()))?;
    tracing::info!("best merge written to {}", dir.display());
    Ok(())
}

/// Per-benchmark scores of the best, for printing.
pub fn best_table(summary: &SearchSummary) -> String {
    let mut s = format!(
        "best: {} (objective {:.2}, {})\n",
        summary.best.key,
        summary.best.objective,
        summary
            .best
            .docs_per_task
            .map_or("full task sets".to_string(), |d| format!("{d} docs/task"))
    );
    let scores: &BTreeMap<String, f64> = &summary.best.scores;
    for (t, v) in scores {
        s += &format!("  {t:<16} {v:6.2}\n");
    }
    s += &format!(
        "{} evaluations ({} new)\n",
        summary.evaluations, summary.new_evaluations
    );
    s
}
