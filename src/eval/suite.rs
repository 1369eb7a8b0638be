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
use super::tokenize::{common_prefix_len, RequestEncoder, TokenizedGeneration, TokenizedRequests};
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
    /// Generation batch size (GSM8K); `None`: [`EvalConfig::generation_batch`]'s default.
    pub batch_size: Option<usize>,
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
            batch_size: None,
            task_options: TaskOptions::default(),
        }
    }

    /// Documents decoded together. The default follows the few-shot mode: a row's KV cache
    /// holds its whole prompt with per-document shots (measured on SmolLM2-135M, 50 GSM8K
    /// documents: 1.44 GB peak at 8 rows, 2.1 GB and no faster at 16: prefill-bound), but only
    /// its own question after a shared prefix (16 rows 16% faster than 8: fewer decode steps;
    /// 1.36 GB peak at 32). With shared shots it is as many rows as the row-dot matmul takes on
    /// this CPU, up to 32 (AVX-512VL: 50 documents of 256 tokens 22% faster than at 16), so a
    /// row's tokens never depend on the rows decoded with it; 16 where the matmul path stops at
    /// 24 rows.
    pub fn generation_batch(&self) -> usize {
        self.batch_size
            .unwrap_or(match self.fewshot_mode {
                FewshotMode::PerDocument => 8,
                FewshotMode::Shared if crate::model::small_matmul::max_rows() >= 32 => 32,
                FewshotMode::Shared => 16,
            })
            .max(1)
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
            Some(n) => Selection::Sample {
                n,
                seed,
                mmlu: None,
            },
            None => Selection::All,
        };
        Self { pool, selection }
    }

    /// MMLU's documents in total (over its subjects) when they differ from the other tasks'.
    pub fn with_mmlu(mut self, docs: Option<usize>) -> Self {
        if let Selection::Sample { mmlu, .. } = &mut self.selection {
            *mmlu = docs;
        }
        self
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
        let options = TaskOptions {
            mmlu_pooled_shots: config.fewshot_mode == FewshotMode::Shared,
            ..config.task_options.clone()
        };
        let tasks = load_tasks(store, &config.tasks, &options)?;
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
            let shared_prefix = task_shared_prefix(&requests, 2);
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
        extend_to_benchmark_prefix(&mut prepared);
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
        // The last task's prefilled prefix: the next task reuses it when it has the same one
        // (MMLU's subjects in the shared-shot mode), and pays for it again only otherwise.
        let mut last_base: Option<Prefilled> = None;
        let mut i = 0;
        while i < self.tasks.len() {
            let group = &self.tasks[i..i + self.group_len(i)];
            i += group.len();
            let group_start = Instant::now();
            let t = &group[0];
            // Prefilled unless the last task's prefix is the same (or the group has no selected
            // documents: an MMLU subject the sample missed runs nothing).
            let fresh = group.iter().any(|t| !t.requests.is_empty())
                && last_base
                    .as_ref()
                    .is_none_or(|b| b.tokens() != t.shared_prefix.as_slice());
            if fresh {
                let empty = Prefilled::empty(model.model);
                last_base = Some(engine::prefill(
                    model.model,
                    &empty,
                    &t.shared_prefix,
                    model.pad_id,
                )?);
            }
            let base = last_base.get_or_insert_with(|| Prefilled::empty(model.model));
            let mut outputs = run_tasks(group, model, base, self.config.generation_batch(), on_doc)
                .with_context(|| match group {
                    [one] => format!("evaluating {}", one.task.name()),
                    _ => format!(
                        "evaluating {} to {}",
                        t.task.name(),
                        group[group.len() - 1].task.name()
                    ),
                })?;
            if fresh {
                // The prefix's prefill is the first task with documents' work.
                if let Some((_, tokens)) = outputs.iter_mut().find(|(r, _)| !r.is_empty()) {
                    tokens.prefilled += t.shared_prefix.len() as u64;
                    tokens.saved = tokens.saved.saturating_sub(t.shared_prefix.len() as u64);
                }
            }
            let seconds = apportion(
                group_start.elapsed().as_secs_f64(),
                &outputs.iter().map(|(_, w)| *w).collect::<Vec<_>>(),
            );
            for ((t, (responses, tokens)), seconds) in group.iter().zip(outputs).zip(seconds) {
                results.push(task_result(t, responses, tokens, seconds)?);
            }
        }
        Ok(SuiteResult::new(results, start.elapsed().as_secs_f64()))
    }

    /// How many tasks from `i` on are run together: consecutive tasks with the same long shared
    /// prefix and only log-likelihood requests (MMLU's subjects in the shared-shot mode) have
    /// their documents packed into the same forwards, where one subject's single document
    /// would otherwise fill a forward alone.
    fn group_len(&self, i: usize) -> usize {
        let first = &self.tasks[i];
        let joins = |t: &PreparedTask| {
            t.requests
                .iter()
                .all(|r| matches!(r, TokenizedRequests::Loglikelihood(_)))
        };
        if first.shared_prefix.is_empty() || !joins(first) {
            return 1;
        }
        1 + self.tasks[i + 1..]
            .iter()
            .take_while(|t| t.shared_prefix == first.shared_prefix && joins(t))
            .count()
    }
}

/// `total` seconds split over tasks run together in proportion to their token work (prefilled
/// and generated); a task run alone gets all of it.
fn apportion(total: f64, work: &[TokenWork]) -> Vec<f64> {
    let weight = |w: &TokenWork| (w.prefilled + w.generated) as f64;
    let sum: f64 = work.iter().map(weight).sum();
    match work.len() {
        1 => vec![total],
        _ if sum == 0.0 => vec![0.0; work.len()],
        _ => work.iter().map(|w| total * weight(w) / sum).collect(),
    }
}

/// A task's scored documents and its result row.
fn task_result(
    t: &PreparedTask,
    responses: Vec<Response>,
    tokens: TokenWork,
    seconds: f64,
) -> Result<TaskResult> {
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
        seconds,
    );
    result.tokens = tokens;
    if !t.doc_ids.is_empty() {
        tracing::debug!(
            "{}: {} documents in {:.1}s; {} tokens prefilled ({} saved by prefix sharing), {} \
             generated ({} of {} drafted tokens accepted)",
            t.task.name(),
            t.doc_ids.len(),
            result.seconds,
            tokens.prefilled,
            tokens.saved,
            tokens.generated,
            tokens.accepted,
            tokens.drafted
        );
    }
    Ok(result)
}

/// Runs every request of `tasks` (all continuing `base`); per task, its responses and token
/// work (with what prefix sharing saved against each request's input run on its own).
/// Log-likelihood documents of all the tasks are scored in one pass, so that they share packed
/// forwards; each task's generations run as their own batch.
/// `base` is the tasks' shared prefix, prefilled; its tokens are counted by the caller, which
/// prefills them once for every task that shares them.
fn run_tasks(
    tasks: &[PreparedTask],
    m: &EvalModel,
    base: &Prefilled,
    batch_size: usize,
    on_doc: &(dyn Fn() + Sync),
) -> Result<Vec<(Vec<Response>, TokenWork)>> {
    let mut out: Vec<Vec<Option<Response>>> =
        tasks.iter().map(|t| vec![None; t.requests.len()]).collect();
    let mut work = vec![TokenWork::default(); tasks.len()];
    // (task, request) of every log-likelihood document, in task order.
    let mut choices = vec![];
    for (ti, t) in tasks.iter().enumerate() {
        for (i, r) in t.requests.iter().enumerate() {
            if let TokenizedRequests::Loglikelihood(c) = r {
                choices.push((ti, i, c));
            }
        }
    }
    let labelled: Vec<(usize, &_)> = choices
        .iter()
        .map(|&(ti, i, c)| (tasks[ti].doc_ids[i], c))
        .collect();
    engine::score_documents(m.model, base, &labelled, m.pad_id, &mut |k, scores, n| {
        let (ti, i, _) = choices[k];
        work[ti].prefilled += n;
        out[ti][i] = Some(Response::Loglikelihood(scores));
        on_doc();
        Ok(())
    })?;
    for (ti, t) in tasks.iter().enumerate() {
        let mut generations: Vec<(usize, &TokenizedGeneration)> = t
            .requests
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                TokenizedRequests::Generate(g) => Some((i, g)),
                TokenizedRequests::Loglikelihood(_) => None,
            })
            .collect();
        if generations.is_empty() {
            continue;
        }
        // Longest contexts first, as lm-eval orders them, so a batch holds similar lengths.
        generations.sort_by_key(|(i, g)| (std::cmp::Reverse(g.context.len()), *i));
        let reqs: Vec<_> = generations.iter().map(|(_, g)| *g).collect();
        let settings = GenerationSettings {
            stop_token_ids: m.stop_token_ids.clone(),
            pad_id: m.pad_id,
            batch_size,
            max_draft: engine::MAX_DRAFT,
        };
        let (texts, generation) =
            engine::generate_until(m.model, m.tokenizer, base, &reqs, &settings, &mut |_| {
                on_doc()
            })?;
        work[ti] += generation;
        for ((i, _), text) in generations.iter().zip(texts) {
            out[ti][*i] = Some(Response::Generation(text));
        }
    }
    Ok(tasks
        .iter()
        .zip(out)
        .zip(work)
        .map(|((t, out), mut work)| {
            work.saved = unshared_input(t).saturating_sub(work.prefilled);
            let responses = out
                .into_iter()
                .map(|r| r.expect("every request answered"))
                .collect();
            (responses, work)
        })
        .collect())
}

/// What running each of `t`'s requests' input alone would prefill: its tokens but the last.
fn unshared_input(t: &PreparedTask) -> u64 {
    t.requests
        .iter()
        .map(|r| match r {
            TokenizedRequests::Loglikelihood(c) => {
                (0..c.len()).map(|i| (c.total_len(i) - 1) as u64).sum()
            }
            TokenizedRequests::Generate(g) => g.context.len() as u64,
        })
        .sum()
}

/// The prefillable prefix of a document's requests: a multiple-choice document's shared
/// context, a generation's context but its last token.
fn prefillable(r: &TokenizedRequests) -> &[u32] {
    match r {
        TokenizedRequests::Loglikelihood(c) => &c.shared[..engine::document_prefix_len(c)],
        TokenizedRequests::Generate(g) => &g.context[..g.context.len().saturating_sub(1)],
    }
}

/// The longest prefix shared by the prefillable prefixes of at least `min_docs` documents, if
/// long enough to matter (e.g. the shared-shot mode's few-shot prefix).
fn task_shared_prefix<'a>(
    requests: impl IntoIterator<Item = &'a TokenizedRequests>,
    min_docs: usize,
) -> Vec<u32> {
    let prefixes: Vec<&[u32]> = requests.into_iter().map(prefillable).collect();
    if prefixes.len() < min_docs.max(1) {
        return vec![];
    }
    let n = common_prefix_len(prefixes.iter().copied());
    if n < MIN_SHARED_PREFIX {
        return vec![];
    }
    prefixes[0][..n].to_vec()
}

/// Tasks of one benchmark (MMLU's subjects) whose documents all start with the same long prefix
/// get it as their shared prefix where theirs is shorter, so that it is prefilled once for all
/// of them; a subject with one selected document has no prefix of its own.
fn extend_to_benchmark_prefix(tasks: &mut [PreparedTask]) {
    for b in Benchmark::ALL {
        let group: Vec<usize> = (0..tasks.len())
            .filter(|&i| tasks[i].task.benchmark() == b)
            .collect();
        if group.len() < 2 {
            continue;
        }
        let prefix = task_shared_prefix(group.iter().flat_map(|&i| &tasks[i].requests), 2);
        for &i in &group {
            if tasks[i].shared_prefix.len() < prefix.len() {
                tasks[i].shared_prefix = prefix.clone();
            }
        }
    }
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
        Selection::Sample {
            n,
            seed,
            mmlu: n_mmlu,
        } => {
            let mut out = vec![vec![]; tasks.len()];
            let n_mmlu = n_mmlu.unwrap_or(n);
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
            if !mmlu.is_empty() && n_mmlu > population.len() {
                return Err(too_few("mmlu (all subjects)", population.len(), n_mmlu));
            }
            for j in stratified_sample(&strata, n_mmlu, seed) {
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
