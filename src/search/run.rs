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
use super::scorer::{CandidateScorer, MergeInputs, Scored};
use super::solver::{minimize_batched, Candidate, Problem, SolverKind, SolverSettings};
use super::space::{MergeCandidate, SearchSpace};
use crate::cluster::{Executor, JobKind, Outcome, SlurmDriver, Unit};
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
    /// Local: candidates are scored in this process; Slurm: each batch is a job array.
    pub executor: Executor,
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
    /// Candidates whose evaluation failed (Slurm jobs out of retries), with job id and log.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedCandidate>,
}

/// A candidate the search could not score; the search went on without it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FailedCandidate {
    pub key: String,
    pub rung: usize,
    pub job: String,
    pub log: PathBuf,
    pub state: String,
    pub error: Option<String>,
}

/// One evaluation the search asks for.
struct Request {
    candidate: MergeCandidate,
    rung: usize,
    docs: Option<usize>,
}

/// What a Slurm candidate job needs to rebuild the scorer: the space (with the alignment-tax
/// rows it was given), the inputs, the task data and the device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct ScorerSpec {
    pub space_text: String,
    pub alignment_tax: Option<crate::eval::alignment_tax::AlignmentTaxSpec>,
    pub inputs: MergeInputs,
    pub tasks_dir: PathBuf,
    pub device: String,
}

/// The payload of a candidate job.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct CandidateJob {
    pub scorer: ScorerSpec,
    pub method: String,
    pub params: BTreeMap<String, f64>,
    pub choices: BTreeMap<String, String>,
    pub docs: Option<usize>,
}

impl CandidateJob {
    /// Runs in the job: rebuilds the scorer and scores the one candidate.
    pub(crate) fn run(&self) -> Result<Scored> {
        let mut space = SearchSpace::from_toml(&self.scorer.space_text, "search")?;
        space.alignment_tax = self.scorer.alignment_tax.clone();
        let device = crate::model::parse_device(&self.scorer.device)?;
        let mut scorer = open_scorer(
            &space,
            self.scorer.inputs.clone(),
            &self.scorer.tasks_dir,
            device,
        )?;
        let c = MergeCandidate::new(
            MergeMethod::parse(&self.method)?,
            self.params.clone(),
            self.choices.clone(),
        );
        scorer.score(&c, self.docs)
    }
}

/// Where candidates are scored.
enum Runner {
    Local,
    Slurm {
        driver: Box<SlurmDriver>,
        spec: Box<ScorerSpec>,
    },
}

struct Searcher<'a> {
    space: &'a SearchSpace,
    scorer: CandidateScorer,
    journal: Journal,
    runner: Runner,
    new_evaluations: usize,
    /// Evaluation numbers in the order the search first asks for each (candidate, rung): the
    /// same on a resumed or a distributed run as on one uninterrupted local run.
    indices: BTreeMap<(String, usize), usize>,
    failed: Vec<FailedCandidate>,
}

/// The file name of a candidate's unit: its rung and a digest of its key.
fn unit_id(key: &str, rung: usize) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("candidate-r{rung}-{hex}")
}

/// Journals one scored request.
fn append_entry(journal: &mut Journal, index: usize, r: &Request, scored: Scored) -> Result<()> {
    let (c, rung, docs) = (&r.candidate, r.rung, r.docs);
    let key = c.key();
    let entry = JournalEntry {
        index,
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
    journal.append(entry)
}

impl Searcher<'_> {
    fn index_of(&mut self, key: &str, rung: usize) -> usize {
        let next = self.indices.len();
        *self.indices.entry((key.to_string(), rung)).or_insert(next)
    }

    /// The journaled objective of each request (NaN for a failed one), scoring the ones not in
    /// the journal yet: here one after another, on Slurm as one job array.
    fn evaluate(&mut self, requests: &[Request]) -> Result<Vec<f64>> {
        let mut todo: Vec<(usize, &Request)> = vec![];
        for r in requests {
            let key = r.candidate.key();
            let index = self.index_of(&key, r.rung);
            let queued = todo.iter().any(|(i, _)| *i == index);
            let failed = self.failed.iter().any(|f| f.key == key && f.rung == r.rung);
            if self.journal.find(&key, r.rung).is_none() && !queued && !failed {
                todo.push((index, r));
            }
        }
        match &mut self.runner {
            Runner::Local => {
                for (index, r) in todo {
                    let scored = self.scorer.score(&r.candidate, r.docs)?;
                    self.journal_entry(index, r, scored)?;
                }
            }
            Runner::Slurm { .. } => self.evaluate_on_slurm(&todo)?,
        }
        Ok(requests
            .iter()
            .map(|r| {
                self.journal
                    .find(&r.candidate.key(), r.rung)
                    .map_or(f64::NAN, |e| e.objective)
            })
            .collect())
    }

    fn evaluate_on_slurm(&mut self, todo: &[(usize, &Request)]) -> Result<()> {
        let Searcher {
            runner,
            journal,
            new_evaluations,
            failed,
            ..
        } = self;
        let Runner::Slurm { driver, spec } = runner else {
            unreachable!("called for the Slurm runner only")
        };
        let ids: Vec<String> = todo
            .iter()
            .map(|(_, r)| unit_id(&r.candidate.key(), r.rung))
            .collect();
        let units: Vec<Unit> = todo
            .iter()
            .zip(&ids)
            .map(|((_, r), id)| {
                let job = CandidateJob {
                    scorer: (**spec).clone(),
                    method: r.candidate.method.name().to_string(),
                    params: r.candidate.params.clone(),
                    choices: r.candidate.choices.clone(),
                    docs: r.docs,
                };
                Unit {
                    id: id.clone(),
                    payload: serde_json::json!({ "candidate": job }),
                    after: None,
                }
            })
            .collect();
        let rung = todo.first().map_or(0, |(_, r)| r.rung);
        // Each result goes into the journal as it arrives.
        driver.run(
            JobKind::Eval,
            &format!("candidates-r{rung}"),
            &units,
            true,
            &mut |u, outcome| {
                let Some(&(index, r)) = ids.iter().position(|id| *id == u.id).map(|i| &todo[i])
                else {
                    return Ok(());
                };
                match outcome {
                    Outcome::Done(v) => {
                        let scored: Scored = serde_json::from_value(v)
                            .with_context(|| format!("the result of unit {}", u.id))?;
                        append_entry(journal, index, r, scored)?;
                        *new_evaluations += 1;
                    }
                    Outcome::Failed(f) => failed.push(FailedCandidate {
                        key: r.candidate.key(),
                        rung: r.rung,
                        job: f.job.to_string(),
                        log: f.log.clone(),
                        state: f.state.clone(),
                        error: f.error.clone(),
                    }),
                }
                Ok(())
            },
        )
    }

    fn journal_entry(&mut self, index: usize, r: &Request, scored: Scored) -> Result<()> {
        append_entry(&mut self.journal, index, r, scored)?;
        self.new_evaluations += 1;
        Ok(())
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
    let mut scorer = open_scorer(space, inputs.clone(), &opts.tasks_dir, opts.device.clone())?;
    write_search_documents(&mut scorer, space, &opts.out)?;
    let runner = match &opts.executor {
        Executor::Local => Runner::Local,
        Executor::Slurm(cfg) => Runner::Slurm {
            driver: Box::new(SlurmDriver::open(&opts.out, (**cfg).clone())?),
            spec: Box::new(ScorerSpec {
                space_text: space_text.to_string(),
                alignment_tax: space.alignment_tax.clone(),
                inputs: inputs.clone(),
                tasks_dir: std::path::absolute(&opts.tasks_dir)?,
                device: device_name(&opts.device),
            }),
        },
    };
    let mut s = Searcher {
        space,
        scorer,
        journal,
        runner,
        new_evaluations: 0,
        indices: BTreeMap::new(),
        failed: vec![],
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
    minimize_batched(solver, &problem, &settings, &mut |batch: &[Candidate]| {
        let requests: Vec<Request> = batch
            .iter()
            .map(|c| Request {
                candidate: s.space.candidate(&c.choices, &c.x),
                rung: 0,
                docs,
            })
            .collect();
        let values = s.evaluate(&requests)?;
        bar.inc(batch.len() as u64);
        Ok(values.into_iter().map(|v| -v).collect())
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
        let requests = pool
            .iter()
            .take(keep)
            .map(|e| {
                Ok(Request {
                    candidate: candidate_of(e)?,
                    rung,
                    docs,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        s.evaluate(&requests)?;
    }
    // A result, not a log line: printed even under --quiet.
    for f in &s.failed {
        eprintln!(
            "warning: candidate {} (rung {}) was not scored: Slurm job {} ended {} (log: {}){}",
            f.key,
            f.rung,
            f.job,
            f.state,
            f.log.display(),
            f.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    let best = s
        .ranked(rung)
        .into_iter()
        .next()
        .with_context(|| match s.failed.len() {
            0 => "the search evaluated no candidate".to_string(),
            n => format!("every candidate failed ({n}; see the errors above)"),
        })?;
    write_best(&s.scorer, &best, &opts.out)?;
    let summary = SearchSummary {
        space: space.name.clone(),
        solver,
        inputs,
        evaluations: s.journal.entries().len(),
        new_evaluations: s.new_evaluations,
        failed: s.failed.clone(),
        best,
    };
    write_file_atomic(
        &RunFiles::summary(&opts.out),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// The scorer of a space: the evaluator on the space's tasks, pools, few-shot mode and dtype.
pub(crate) fn open_scorer(
    space: &SearchSpace,
    inputs: MergeInputs,
    tasks_dir: &Path,
    device: Device,
) -> Result<CandidateScorer> {
    let mut eval = EvalConfig::new(parse_task_list(&space.budget.tasks)?);
    eval.split = space.pools;
    eval.fewshot_mode = space.budget.fewshot;
    eval.task_options.gsm8k_scoring = space.budget.gsm8k;
    Ok(CandidateScorer::new(
        inputs,
        TaskStore::new(tasks_dir.to_path_buf()),
        eval,
        space.budget.subset_seed,
        space.objective.clone(),
        space.alignment_tax.as_ref(),
        device,
        space.seed,
    )?
    .with_dtype(space.budget.dtype))
}

/// The device as `--device` spells it, for a job to open the same kind.
fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
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
                                     "fewshot_mode": space.budget.fewshot,
                                     "gsm8k_scoring": space.budget.gsm8k, "rungs": rungs});
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
