//! Few-shot example selection exactly as lm-evaluation-harness 0.4.x draws it: one
//! `random.Random(seed)` per task, consumed in document order over the *whole* split, so a
//! subset (`--limit`, `--sample`) keeps the shots its documents get in a full run.

use super::pyrandom::PyRandom;
use super::task::{FewshotSampler, Task};

/// lm-eval's default `fewshot_random_seed`.
pub const DEFAULT_FEWSHOT_SEED: u64 = 1234;

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
