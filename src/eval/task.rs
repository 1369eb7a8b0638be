//! The task abstraction: documents → requests → per-document metrics, as lm-evaluation-harness
//! defines a task. Every concrete task (one file each under `tasks/`) implements [`Task`].

use anyhow::Result;
use serde_json::Value;

/// One log-likelihood request: how likely is `continuation` after `context`?
#[derive(Debug, Clone, PartialEq)]
pub struct LoglikelihoodRequest {
    pub context: String,
    pub continuation: String,
}

/// Greedy generation from `context` until one of `until` appears or `max_gen_toks` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub context: String,
    pub until: Vec<String>,
    pub max_gen_toks: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Requests {
    /// One request per answer choice.
    Loglikelihood(Vec<LoglikelihoodRequest>),
    Generate(GenerationRequest),
}

/// The requests of one document, ready to run.
#[derive(Debug, Clone)]
pub struct Instance {
    pub doc_id: usize,
    pub requests: Requests,
    /// The target as lm-eval logs it (a gold index or an answer string).
    pub target: Value,
}

/// What the model returned for one document's requests.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// Per request: summed log-likelihood of the continuation and whether it is the greedy one.
    Loglikelihood(Vec<(f64, bool)>),
    Generation(String),
}

/// Per-document metric values, keyed like lm-eval's results: `(metric, filter)`.
#[derive(Debug, Clone, Default)]
pub struct DocScore {
    pub metrics: Vec<(MetricKey, f64)>,
    /// A smooth counterpart of the headline metric in [0, 1], for search objectives that must
    /// not be step functions: the probability of the gold answer after a softmax over the
    /// choices' log-likelihoods (length-normalised where the headline is `acc_norm`). `None`
    /// where the task has none (GSM8K's exact match).
    pub probability: Option<f64>,
    /// Filtered predictions (generation tasks), by filter name.
    pub filtered: Vec<(&'static str, String)>,
}

/// A metric under a filter, written `"metric,filter"` in results.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricKey {
    pub metric: &'static str,
    pub filter: &'static str,
}

impl MetricKey {
    pub const fn new(metric: &'static str, filter: &'static str) -> Self {
        Self { metric, filter }
    }

    pub const fn plain(metric: &'static str) -> Self {
        Self::new(metric, "none")
    }
}

impl std::fmt::Display for MetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.metric, self.filter)
    }
}

/// Where a task's few-shot examples come from and how they are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FewshotSampler {
    /// No few-shot pool (TruthfulQA's primer is part of the prompt).
    None,
    /// The first `n` pool rows (MMLU's dev split).
    FirstN,
    /// `random.sample` from a separate pool of `pool_len` documents.
    Random { pool_len: usize },
    /// `random.sample(pool, n + 1)` from the evaluation split itself, then every element equal
    /// to the document is dropped and the first `n` kept (lm-eval when fewshot split == test split).
    RandomExcludingSelf,
}

/// The leaderboard's six tasks, for grouping and the summary table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Benchmark {
    Arc,
    HellaSwag,
    Mmlu,
    TruthfulQa,
    Winogrande,
    Gsm8k,
}

impl Benchmark {
    pub const ALL: [Benchmark; 6] = [
        Benchmark::Arc,
        Benchmark::HellaSwag,
        Benchmark::Mmlu,
        Benchmark::TruthfulQa,
        Benchmark::Winogrande,
        Benchmark::Gsm8k,
    ];

    /// Column header as the Open LLM Leaderboard shows it.
    pub fn column(self) -> &'static str {
        match self {
            Benchmark::Arc => "ARC",
            Benchmark::HellaSwag => "HellaSwag",
            Benchmark::Mmlu => "MMLU",
            Benchmark::TruthfulQa => "TruthfulQA",
            Benchmark::Winogrande => "Winogrande",
            Benchmark::Gsm8k => "GSM8K",
        }
    }

    /// The task (or group) name in results.json.
    pub fn task_name(self) -> &'static str {
        match self {
            Benchmark::Arc => "arc_challenge",
            Benchmark::HellaSwag => "hellaswag",
            Benchmark::Mmlu => "mmlu",
            Benchmark::TruthfulQa => "truthfulqa_mc2",
            Benchmark::Winogrande => "winogrande",
            Benchmark::Gsm8k => "gsm8k",
        }
    }

    /// The metric the leaderboard reports for this benchmark.
    pub fn headline(self) -> MetricKey {
        match self {
            Benchmark::Arc | Benchmark::HellaSwag => MetricKey::plain("acc_norm"),
            Benchmark::Mmlu | Benchmark::TruthfulQa | Benchmark::Winogrande => {
                MetricKey::plain("acc")
            }
            Benchmark::Gsm8k => MetricKey::new("exact_match", "strict-match"),
        }
    }

    pub fn default_num_fewshot(self) -> usize {
        match self {
            Benchmark::Arc => 25,
            Benchmark::HellaSwag => 10,
            Benchmark::Mmlu | Benchmark::Winogrande | Benchmark::Gsm8k => 5,
            Benchmark::TruthfulQa => 0,
        }
    }
}

pub trait Task: Send + Sync {
    /// Name in results.json (`arc_challenge`, `mmlu_anatomy`, …).
    fn name(&self) -> &str;
    fn benchmark(&self) -> Benchmark;
    fn num_docs(&self) -> usize;
    fn sampler(&self) -> FewshotSampler;
    /// Eval document `doc` as lm-eval compares documents to exclude one from its own shots (the
    /// raw JSON row, compared as Python compares dicts), for tasks whose shots come from the
    /// evaluation split; `None` where a document is only ever itself.
    fn raw_doc(&self, _doc: usize) -> Option<&Value> {
        None
    }
    /// Stratum of a document for stratified subsets ("" when the task has none).
    fn stratum(&self, _doc: usize) -> &str {
        ""
    }
    /// The document's requests with the given few-shot examples (indices into the pool).
    fn instance(&self, doc: usize, shots: &[usize]) -> Instance;
    /// Metrics every document reports, in output order.
    fn metric_keys(&self) -> &'static [MetricKey];
    /// The metric that stands for the task in the leaderboard table and search objectives: the
    /// benchmark's, unless the task was built to score another way (a screening fidelity).
    fn headline(&self) -> MetricKey {
        self.benchmark().headline()
    }
    fn score(&self, doc: usize, response: &Response) -> Result<DocScore>;
}

/// Index of the first maximum (numpy's `argmax` on ties).
pub fn argmax(values: impl IntoIterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.into_iter().enumerate() {
        if v > best.1 || (i == 0 && best.1 == f64::NEG_INFINITY) {
            best = (i, v);
        }
    }
    best.0
}

/// Joins few-shot examples and the document text as lm-eval does: `description + Σ(shot + "\n\n") + text`.
pub fn fewshot_context(
    description: &str,
    shots: impl IntoIterator<Item = String>,
    text: &str,
) -> String {
    let mut ctx = description.to_string();
    for s in shots {
        ctx.push_str(&s);
        ctx.push_str(FEWSHOT_DELIMITER);
    }
    ctx.push_str(text);
    ctx
}

/// One request per answer choice, each scoring `" " + choice` after the same context.
pub fn choice_requests(context: &str, choices: &[String]) -> Requests {
    Requests::Loglikelihood(
        choices
            .iter()
            .map(|c| LoglikelihoodRequest {
                context: context.to_string(),
                continuation: format!("{TARGET_DELIMITER}{c}"),
            })
            .collect(),
    )
}

pub const TARGET_DELIMITER: &str = " ";
pub const FEWSHOT_DELIMITER: &str = "\n\n";

/// Python's `str.strip()`: its whitespace also includes the separators U+001C–U+001F.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}
