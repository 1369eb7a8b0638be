//! Few-shot example selection exactly as lm-evaluation-harness 0.4.x draws it: one
//! `random.Random(seed)` per task, consumed in document order over the *whole* split, so a
//! subset (`--limit`, `--sample`) keeps the shots its documents get in a full run.

use serde::{Deserialize, Serialize};

use super::pyrandom::PyRandom;
use super::task::{FewshotSampler, Task};

/// lm-eval's default `fewshot_random_seed`.
pub const DEFAULT_FEWSHOT_SEED: u64 = 1234;

/// How documents get their few-shot examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FewshotMode {
    /// lm-eval's: every document its own shots, drawn in document order ([`shot_plan`]).
    #[default]
    PerDocument,
    /// One shot set per task for every document ([`shared_shots`]): the shots' prefix is
    /// prefilled once, and each document pays only for its own tokens. A screening fidelity:
    /// its scores are not lm-eval's.
    Shared,
}

impl FewshotMode {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "per_document" | "per-document" => Ok(Self::PerDocument),
            "shared" => Ok(Self::Shared),
            other => anyhow::bail!("unknown few-shot mode `{other}` (per_document, shared)"),
        }
    }
}

/// One shot set for every document of `task`, drawn once with `seed` from the pool lm-eval
/// draws from (the few-shot split, or the evaluation split for tasks without one), never
/// containing a document of `scored` (indices into the evaluation split).
pub fn shared_shots(
    task: &dyn Task,
    num_fewshot: usize,
    seed: u64,
    scored: &[usize],
) -> Vec<usize> {
    if num_fewshot == 0 {
        return vec![];
    }
    match task.sampler() {
        FewshotSampler::None => vec![],
        // A separate split (MMLU's dev): already one set for every document.
        FewshotSampler::FirstN => (0..num_fewshot).collect(),
        FewshotSampler::Random { pool_len } => {
            PyRandom::new(seed).sample_indices(pool_len, num_fewshot.min(pool_len))
        }
        FewshotSampler::RandomExcludingSelf => {
            // Not a scored document, nor a duplicate of one (as lm-eval compares documents).
            let candidates: Vec<usize> = (0..task.num_docs())
                .filter(|&d| !scored.iter().any(|&s| s == d || task.same_doc(s, d)))
                .collect();
            let k = num_fewshot.min(candidates.len());
            PyRandom::new(seed)
                .sample_indices(candidates.len(), k)
                .into_iter()
                .map(|i| candidates[i])
                .collect()
        }
    }
}

/// Shot indices (into the task's few-shot pool) for every document of `task`.
pub fn shot_plan(task: &dyn Task, num_fewshot: usize, seed: u64) -> Vec<Vec<usize>> {
    let n = task.num_docs();
    if num_fewshot == 0 {
        return vec![vec![]; n];
    }
    match task.sampler() {
        FewshotSampler::None => vec![vec![]; n],
        FewshotSampler::FirstN => vec![(0..num_fewshot).collect(); n],
        FewshotSampler::Random { pool_len } => {
            let mut rng = PyRandom::new(seed);
            let k = num_fewshot.min(pool_len);
            (0..n).map(|_| rng.sample_indices(pool_len, k)).collect()
        }
        FewshotSampler::RandomExcludingSelf => {
            let mut rng = PyRandom::new(seed);
            let k = (num_fewshot + 1).min(n);
            (0..n)
                .map(|doc| {
                    // Every drawn document equal to this one is dropped (so a duplicate row
                    // can leave n - 1 shots, as in lm-eval), then the first n are kept.
                    rng.sample_indices(n, k)
                        .into_iter()
                        .filter(|&s| s != doc && !task.same_doc(doc, s))
                        .take(num_fewshot)
                        .collect()
                })
                .collect()
        }
    }
}
