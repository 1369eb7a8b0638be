//! Few-shot example selection exactly as lm-evaluation-harness 0.4.x draws it: one
//! `random.Random(seed)` per task, consumed in document order over the *whole* split, so a
//! subset (`--limit`, `--sample`) keeps the shots its documents get in a full run.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
            let excluded = ScoredDocs::new(task, scored);
            let candidates: Vec<usize> = (0..task.num_docs())
                .filter(|&d| !excluded.contains(task, d))
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

/// Whether two eval documents are equal as lm-eval compares them (see [`Task::raw_doc`]).
fn same_doc(task: &dyn Task, a: usize, b: usize) -> bool {
    match (task.raw_doc(a), task.raw_doc(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// The scored documents, and their raw rows by hash: whether a document is one of them, or
/// equal to one, is a lookup (comparing every document with every scored one is quadratic:
/// minutes for a whole task scored in the shared mode).
struct ScoredDocs {
    ids: HashSet<usize>,
    by_hash: HashMap<u64, Vec<usize>>,
}

impl ScoredDocs {
    fn new(task: &dyn Task, scored: &[usize]) -> Self {
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        for &s in scored {
            if let Some(raw) = task.raw_doc(s) {
                by_hash.entry(json_hash(raw)).or_default().push(s);
            }
        }
        Self {
            ids: scored.iter().copied().collect(),
            by_hash,
        }
    }

    fn contains(&self, task: &dyn Task, doc: usize) -> bool {
        if self.ids.contains(&doc) {
            return true;
        }
        let Some(raw) = task.raw_doc(doc) else {
            return false;
        };
        self.by_hash
            .get(&json_hash(raw))
            .is_some_and(|same| same.iter().any(|&s| same_doc(task, s, doc)))
    }
}

/// A hash under which equal JSON values agree (object keys in sorted order, whatever order the
/// map keeps); equality itself is still decided by `==`.
fn json_hash(v: &Value) -> u64 {
    fn feed(v: &Value, h: &mut impl Hasher) {
        match v {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => (1u8, b).hash(h),
            Value::Number(n) => (2u8, n.to_string()).hash(h),
            Value::String(s) => (3u8, s).hash(h),
            Value::Array(a) => {
                (4u8, a.len()).hash(h);
                a.iter().for_each(|x| feed(x, h));
            }
            Value::Object(m) => {
                (5u8, m.len()).hash(h);
                let mut entries: Vec<(&String, &Value)> = m.iter().collect();
                entries.sort_by_key(|(k, _)| *k);
                for (k, x) in entries {
                    k.hash(h);
                    feed(x, h);
                }
            }
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    feed(v, &mut h);
    h.finish()
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
                        .filter(|&s| s != doc && !same_doc(task, doc, s))
                        .take(num_fewshot)
                        .collect()
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::task::{DocScore, Instance, MetricKey, Response};
    use crate::eval::Benchmark;
    use serde_json::json;

    /// Documents drawn from their own split whose raw rows repeat: row `i` is `{"q": i % 7}`,
    /// keys in either order.
    struct Repeating(Vec<Value>);

    impl Repeating {
        fn new(n: usize) -> Self {
            Self(
                (0..n)
                    .map(|i| {
                        let text = format!(r#"{{"q": {}, "a": "x"}}"#, i % 7);
                        let flipped = format!(r#"{{"a": "x", "q": {}}}"#, i % 7);
                        serde_json::from_str(if i % 2 == 0 { &text } else { &flipped }).unwrap()
                    })
                    .collect(),
            )
        }
    }

    impl Task for Repeating {
        fn name(&self) -> &str {
            "repeating"
        }
        fn benchmark(&self) -> Benchmark {
            Benchmark::Winogrande
        }
        fn num_docs(&self) -> usize {
            self.0.len()
        }
        fn sampler(&self) -> FewshotSampler {
            FewshotSampler::RandomExcludingSelf
        }
        fn raw_doc(&self, doc: usize) -> Option<&Value> {
            Some(&self.0[doc])
        }
        fn instance(&self, _doc: usize, _shots: &[usize]) -> Instance {
            unreachable!("not scored")
        }
        fn metric_keys(&self) -> &'static [MetricKey] {
            &[]
        }
        fn score(&self, _doc: usize, _response: &Response) -> anyhow::Result<DocScore> {
            unreachable!("not scored")
        }
    }

    #[test]
    fn shared_shots_exclude_scored_documents_and_their_duplicates() {
        let task = Repeating::new(70);
        // Documents 0 and 3 are the values 0 and 3: every 7th document repeats one of them.
        let shots = shared_shots(&task, 20, 1234, &[0, 3]);
        assert_eq!(shots.len(), 20);
        for s in &shots {
            assert!(
                s % 7 != 0 && s % 7 != 3,
                "shot {s} equals a scored document"
            );
        }
        assert_eq!(task.0[7], json!({"q": 0, "a": "x"}));
        // Everything else stays a candidate: 70 - 20 excluded = 50 for 60 shots.
        assert_eq!(shared_shots(&task, 60, 1234, &[0, 3]).len(), 50);
    }

    #[test]
    fn equal_json_hashes_equal_whatever_the_key_order() {
        let a: Value =
            serde_json::from_str(r#"{"x": [1, {"b": 2, "c": "s"}], "y": null}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"y": null, "x": [1, {"c": "s", "b": 2}]}"#).unwrap();
        let c: Value =
            serde_json::from_str(r#"{"y": null, "x": [1, {"c": "s", "b": 2.0}]}"#).unwrap();
        assert_eq!(a, b);
        assert_eq!(json_hash(&a), json_hash(&b));
        // lm-eval's dicts compare 2 == 2.0; serde_json's values do not, and neither do the hashes.
        assert_ne!(a, c);
        assert_ne!(json_hash(&a), json_hash(&c));
    }
}
