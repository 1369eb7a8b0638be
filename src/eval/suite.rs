//! A prepared evaluation: tasks loaded, documents selected, shots drawn and requests tokenized
//! once, then run against any number of models that share the tokenizer (the merge search
//! scores every candidate this way, with no disk round trip).

use std::time::Instant;

use anyhow::{Context, Result};
use rayon::prelude::*;

use super::engine::{self, GenerationSettings, Prefilled, TokenWork};
use super::fewshot::{shared_shots, shot_plan, FewshotMode, DEFAULT_FEWSHOT_SEED};
use super::pools::{Pool, PoolSplit};
use super::results::{DocRecord, SuiteResult, TaskResult};
use super::store::TaskStore;
use super::subset::{stratified_sample, Selection};
use super::task::{Benchmark, Response, Task};
use super::tasks::{load_tasks, TaskOptions, TaskSpec};
use super::tokenize::{common_prefix_len, RequestEncoder, TokenizedRequests};
use crate::model::{LlamaModel, ModelTokenizer};

/// What to evaluate and how (the documents are chosen per call, by a [`DocSet`]).
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub tasks: Vec<TaskSpec>,
    /// How each task splits into the search and report pools.
    pub split: PoolSplit,
    /// Overrides every task's shot count (TruthfulQA has no few-shot pool and stays 0-shot).
    pub num_fewshot: Option<usize>,
    pub fewshot_seed: u64,
    /// lm-eval's per-document shots (default) or one shared set per task (screening).
    pub fewshot_mode: FewshotMode,
    /// Generation batch size (GSM8K).
    pub batch_size: usize,
    pub task_options: TaskOptions,
}

impl EvalConfig {
    pub fn new(tasks: Vec<TaskSpec>) -> Self {
        Self {
            tasks,
            split: PoolSplit::default(),
            num_fewshot: None,
            fewshot_seed: DEFAULT_FEWSHOT_SEED,
            fewshot_mode: FewshotMode::PerDocument,
            batch_size: 8,
            task_options: TaskOptions::default(),
        }
    }
}

/// Which documents a prepared suite scores: a pool of each task, then a selection within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocSet {
    pub pool: Pool,
    pub selection: Selection,
}

impl DocSet {
    /// Every document (lm-eval's semantics).
    pub const ALL: DocSet = DocSet {
        pool: Pool::All,
        selection: Selection::All,
    };

    /// `docs` per task (`None`: the whole pool), stratified with `seed`, from `pool`.
    pub fn sampled(pool: Pool, docs: Option<usize>, seed: u64) -> Self {
        let selection = match docs {
            Some(n) => Selection::Sample { n, seed },
            None => Selection::All,
        };
        Self { pool, selection }
    }

    /// How results.json and the report describe it.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({"pool": self.pool.name(), "selection": self.selection})
    }
}

/// The model being evaluated, with what generation needs to know about its tokenizer.
pub struct EvalModel<'a> {
    pub model: &'a LlamaModel,
    pub tokenizer: &'a ModelTokenizer,
    pub stop_token_ids: Vec<u32>,
    pub pad_id: u32,
}

pub struct PreparedTask {
    pub task: Box<dyn Task>,
    pub num_fewshot: usize,
    /// Selected documents, ascending.
    pub doc_ids: Vec<usize>,
    /// Shot indices per selected document.
    pub shots: Vec<Vec<usize>>,
    pub requests: Vec<TokenizedRequests>,
    /// Tokens every selected document starts with (prefilled once per model).
    pub shared_prefix: Vec<u32>,
}

/// Below this many tokens a task-wide shared prefix is not worth a separate prefill.
const MIN_SHARED_PREFIX: usize = 16;

impl PreparedTask {
    pub fn num_requests(&self) -> usize {
        self.requests
            .iter()
            .map(|r| match r {
                TokenizedRequests::Loglikelihood(c) => c.len(),
                TokenizedRequests::Generate(_) => 1,
            })
            .sum()
    }
}

pub struct PreparedSuite {
    pub config: EvalConfig,
    pub docs: DocSet,
    pub tasks: Vec<PreparedTask>,
}

impl PreparedSuite {
    pub fn prepare(
        store: &TaskStore,
        tokenizer: &ModelTokenizer,
        max_length: usize,
        config: EvalConfig,
        docs: DocSet,
    ) -> Result<Self> {
        config.split.validate()?;
        let tasks = load_tasks(store, &config.tasks, &config.task_options)?;
        let selected = select_documents(&tasks, docs, &config.split)?;
        let encoder = RequestEncoder {
            tokenizer,
            max_length,
        };
        let mut prepared = vec![];
        for (task, doc_ids) in tasks.into_iter().zip(selected) {
            let num_fewshot = match task.benchmark() {
                Benchmark::TruthfulQa => 0,
                b => config.num_fewshot.unwrap_or(b.default_num_fewshot()),
            };
            let shots: Vec<Vec<usize>> = match config.fewshot_mode {
                FewshotMode::PerDocument => {
                    let plan = shot_plan(task.as_ref(), num_fewshot, config.fewshot_seed);
                    doc_ids.iter().map(|&d| plan[d].clone()).collect()
                }
                FewshotMode::Shared => {
                    // Never a scored document: for a pool, none of the pool's documents (the
                    // same shots at every subset size of a search); else none of these.
                    let scored = match docs.pool {
                        Pool::All => doc_ids.clone(),
                        pool => config.split.documents(task.name(), task.num_docs(), pool),
                    };
                    let set =
                        shared_shots(task.as_ref(), num_fewshot, config.fewshot_seed, &scored);
                    vec![set; doc_ids.len()]
                }
            };
            let requests = doc_ids
                .par_iter()
                .zip(&shots)
                .map(|(&d, s)| {
                    encoder
                        .tokenize(&task.instance(d, s).requests)
                        .with_context(|| format!("task {}, document {d}", task.name()))
                })
                .collect::<Result<Vec<_>>>()?;
            let shared_prefix = task_shared_prefix(&requests);
            tracing::debug!(
                task = task.name(),
                docs = doc_ids.len(),
                shared_prefix = shared_prefix.len(),
                "prepared"
            );
            prepared.push(PreparedTask {
                task,
                num_fewshot,
                doc_ids,
                shots,
                requests,
                shared_prefix,
            });
        }
        Ok(Self {
            config,
            docs,
            tasks: prepared,
        })
    }

    pub fn num_docs(&self) -> usize {
        self.tasks.iter().map(|t| t.doc_ids.len()).sum()
    }

    /// Runs every task on `model`; `on_doc` is called after each document (for progress).
    pub fn evaluate(&self, model: &EvalModel, on_doc: &(dyn Fn() + Sync)) -> Result<SuiteResult> {
        let start = Instant::now();
        let mut results = vec![];
        for t in &self.tasks {
            let task_start = Instant::now();
            let (responses, tokens) = run_task(t, model, self.config.batch_size.max(1), on_doc)
                .with_context(|| format!("evaluating {}", t.task.name()))?;
            let mut records = vec![];
            for ((&doc, shots), response) in t.doc_ids.iter().zip(&t.shots).zip(responses) {
                let score = t.task.score(doc, &response)?;
                records.push(DocRecord {
                    doc_id: doc,
                    shots: shots.clone(),
                    response,
                    score,
                });
            }
            let mut result = TaskResult::new(
                t.task.as_ref(),
                t.num_fewshot,
                t.num_requests(),
                records,
                task_start.elapsed().as_secs_f64(),
            );
            result.tokens = tokens;
            if !t.doc_ids.is_empty() {
                tracing::debug!(
                    "{}: {} documents in {:.1}s; {} tokens prefilled ({} saved by prefix \
                     sharing), {} generated",
                    t.task.name(),
                    t.doc_ids.len(),
                    result.seconds,
                    tokens.prefilled,
                    tokens.saved,
                    tokens.generated
                );
            }
            results.push(result);
        }
        Ok(SuiteResult::new(results, start.elapsed().as_secs_f64()))
    }
}

/// Runs every request of `t`; returns the responses and the token work (with what prefix
/// sharing saved against each request's input run on its own).
fn run_task(
    t: &PreparedTask,
    m: &EvalModel,
    batch_size: usize,
    on_doc: &(dyn Fn() + Sync),
) -> Result<(Vec<Response>, TokenWork)> {
    let mut out: Vec<Option<Response>> = vec![None; t.requests.len()];
    let mut work = TokenWork {
        prefilled: t.shared_prefix.len() as u64,
        ..TokenWork::default()
    };
    // What running each request's input alone would prefill: its tokens but the last.
    let unshared: u64 = t
        .requests
        .iter()
        .map(|r| match r {
            TokenizedRequests::Loglikelihood(c) => {
                (0..c.len()).map(|i| (c.total_len(i) - 1) as u64).sum()
            }
            TokenizedRequests::Generate(g) => g.context.len() as u64,
        })
        .sum();
    let base = if t.shared_prefix.is_empty() {
        Prefilled::empty(m.model)
    } else {
        engine::prefill(
            m.model,
            &Prefilled::empty(m.model),
            &t.shared_prefix,
            m.pad_id,
        )?
    };
    let mut generations = vec![];
    for (i, r) in t.requests.iter().enumerate() {
        match r {
            TokenizedRequests::Loglikelihood(c) => {
                let (scores, prefilled) = engine::score_choices(m.model, &base, c, m.pad_id)
                    .with_context(|| format!("document {}", t.doc_ids[i]))?;
                work.prefilled += prefilled;
                out[i] = Some(Response::Loglikelihood(scores));
                on_doc();
            }
            TokenizedRequests::Generate(g) => generations.push((i, g)),
        }
    }
    // Longest contexts first, as lm-eval orders them, so a batch holds similar lengths.
    generations.sort_by_key(|(i, g)| (std::cmp::Reverse(g.context.len()), *i));
    let reqs: Vec<_> = generations.iter().map(|(_, g)| *g).collect();
    let settings = GenerationSettings {
        stop_token_ids: m.stop_token_ids.clone(),
        pad_id: m.pad_id,
        batch_size,
    };
    let (texts, generation) =
        engine::generate_until(m.model, m.tokenizer, &base, &reqs, &settings, &mut |_| {
            on_doc()
        })?;
    work += generation;
    for ((i, _), text) in generations.iter().zip(texts) {
        out[*i] = Some(Response::Generation(text));
    }
    work.saved = unshared.saturating_sub(work.prefilled);
    let responses = out
        .into_iter()
        .map(|r| r.expect("every request answered"))
        .collect();
    Ok((responses, work))
}

/// The longest prefix shared by every document's prefillable prefix, if long enough to matter:
/// a multiple-choice document's shared context, a generation's context but its last token (the
/// shared-shot mode's few-shot prefix).
fn task_shared_prefix(requests: &[TokenizedRequests]) -> Vec<u32> {
    let prefixes: Vec<&[u32]> = requests
        .iter()
        .map(|r| match r {
            TokenizedRequests::Loglikelihood(c) => &c.shared[..engine::document_prefix_len(c)],
            TokenizedRequests::Generate(g) => &g.context[..g.context.len().saturating_sub(1)],
        })
        .collect();
    if prefixes.len() < 2 {
        return vec![];
    }
    let n = common_prefix_len(prefixes.iter().copied());
    if n < MIN_SHARED_PREFIX {
        return vec![];
    }
    prefixes[0][..n].to_vec()
}

/// Selected document ids per task: the pool's documents, then the selection among them.
/// `Sample` draws per benchmark; MMLU's subjects are strata of one sample, so its size is the
/// total over subjects. A sample larger than its pool is an error, not a silent "all".
fn select_documents(
    tasks: &[Box<dyn Task>],
    docs: DocSet,
    split: &PoolSplit,
) -> Result<Vec<Vec<usize>>> {
    let pools: Vec<Vec<usize>> = tasks
        .iter()
        .map(|t| split.documents(t.name(), t.num_docs(), docs.pool))
        .collect();
    let too_few = |what: &str, have: usize, n: usize| {
        anyhow::anyhow!(
            "{what}: the {} pool has {have} documents but {n} were requested per task{}",
            docs.pool.name(),
            if docs.pool == Pool::All {
                String::new()
            } else {
                format!(
                    " (pools: search {:.0}%, report {:.0}% of each task)",
                    100.0 * split.search,
                    100.0 * split.report
                )
            }
        )
    };
    Ok(match docs.selection {
        Selection::All => pools,
        Selection::Limit(n) => pools
            .into_iter()
            .map(|p| p.into_iter().take(n).collect())
            .collect(),
        Selection::Sample { n, seed } => {
            let mut out = vec![vec![]; tasks.len()];
            let mmlu: Vec<usize> = (0..tasks.len())
                .filter(|&i| tasks[i].benchmark() == Benchmark::Mmlu)
                .collect();
            // Flatten MMLU (subject = stratum) into one population.
            let mut population: Vec<(usize, usize)> = vec![];
            let mut strata: Vec<&str> = vec![];
            for &i in &mmlu {
                for &d in &pools[i] {
                    population.push((i, d));
                    strata.push(tasks[i].name());
                }
            }
            if !mmlu.is_empty() && n > population.len() {
                return Err(too_few("mmlu (all subjects)", population.len(), n));
            }
            for j in stratified_sample(&strata, n, seed) {
                let (i, d) = population[j];
                out[i].push(d);
            }
            for (i, t) in tasks.iter().enumerate() {
                if t.benchmark() != Benchmark::Mmlu {
                    if n > pools[i].len() {
                        return Err(too_few(t.name(), pools[i].len(), n));
                    }
                    let strata: Vec<&str> = pools[i].iter().map(|&d| t.stratum(d)).collect();
                    out[i] = stratified_sample(&strata, n, seed)
                        .into_iter()
                        .map(|j| pools[i][j])
                        .collect();
                }
            }
            for o in &mut out {
                o.sort_unstable();
            }
            out
        }
    })
}
