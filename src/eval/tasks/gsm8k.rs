//! GSM8K (lm-eval `gsm8k`): 5-shot from the train split, greedy generation until "Question:",
//! then exact match of the extracted answer (strict-match and flexible-extract filters). Or, as
//! a screening fidelity ([`Gsm8kScoring::GoldLikelihood`]), no generation at all: the gold
//! solution's log-likelihood after the same prompt.

use std::sync::LazyLock;

use anyhow::{bail, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::eval::store::TaskStore;
use crate::eval::task::{
    fewshot_context, py_strip, Benchmark, DocScore, FewshotSampler, GenerationRequest, Instance,
    LoglikelihoodRequest, MetricKey, Requests, Response, Task, TARGET_DELIMITER,
};

#[derive(Deserialize)]
struct Gsm8kDoc {
    question: String,
    answer: String,
}

pub struct Gsm8k {
    docs: Vec<Gsm8kDoc>,
    pool: Vec<Gsm8kDoc>,
    scoring: Gsm8kScoring,
}

/// How GSM8K documents are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gsm8kScoring {
    /// lm-eval's: greedy generation of up to [`MAX_GEN_TOKS`] tokens, exact match of the
    /// extracted answer.
    #[default]
    Generate,
    /// A screening fidelity that generates nothing: each document scores the gold solution
    /// (`" " + answer`, as the shots show it) after the same prompt, as its probability per
    /// byte, `exp(loglikelihood / bytes)` in (0, 1] (lm-eval's byte normalisation, so the
    /// number does not depend on the tokenizer). One prefill of the solution instead of up to
    /// 256 decode steps, and smooth in the merge weights, where exact match of a small model
    /// is a few lucky documents. Its metric is `gold_byte_probability`, never `exact_match`,
    /// so nobody mistakes it for lm-eval's score.
    GoldLikelihood,
}

impl Gsm8kScoring {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "generate" => Ok(Self::Generate),
            "gold_likelihood" | "gold-likelihood" => Ok(Self::GoldLikelihood),
            other => bail!("unknown GSM8K scoring `{other}` (generate, gold_likelihood)"),
        }
    }
}

pub const MAX_GEN_TOKS: usize = 256;
pub const UNTIL: [&str; 3] = ["Question:", "</s>", "<|im_end|>"];
pub const INVALID: &str = "[invalid]";

const STRICT: MetricKey = MetricKey::new("exact_match", "strict-match");
const FLEXIBLE: MetricKey = MetricKey::new("exact_match", "flexible-extract");
const GOLD: MetricKey = MetricKey::plain("gold_byte_probability");

static STRICT_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"#### (-?[0-9.,]+)").unwrap());
static FLEXIBLE_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)").unwrap());
/// exact_match's `regexes_to_ignore`, applied in order to prediction and reference.
static IGNORE: LazyLock<[(Regex, &'static str); 4]> = LazyLock::new(|| {
    [
        (Regex::new(",").unwrap(), ""),
        (Regex::new(r"\$").unwrap(), ""),
        (Regex::new(r"(?s).*#### ").unwrap(), ""),
        // Python's `\.$` also matches a dot just before a final newline (which it keeps).
        (Regex::new(r"\.(\n?)\z").unwrap(), "$1"),
    ]
});

pub fn load(store: &TaskStore, scoring: Gsm8kScoring) -> Result<Gsm8k> {
    let docs = store.typed::<Gsm8kDoc>("gsm8k", "test")?;
    let pool = store.typed::<Gsm8kDoc>("gsm8k", "train")?;
    for r in docs.iter().chain(&pool) {
        if r.doc.question.is_empty() {
            bail!("{}: empty question", r.origin());
        }
    }
    Ok(Gsm8k {
        docs: docs.into_iter().map(|r| r.doc).collect(),
        pool: pool.into_iter().map(|r| r.doc).collect(),
        scoring,
    })
}

fn text(d: &Gsm8kDoc) -> String {
    format!("Question: {}\nAnswer:", d.question)
}

/// `regex` filter + `take_first`: the `select`-th match (negative counts from the end), the
/// first non-empty group of a multi-group pattern, stripped; `[invalid]` when nothing matches.
fn extract(re: &Regex, text: &str, last: bool) -> String {
    let mut matches = re.captures_iter(text);
    let m = if last { matches.last() } else { matches.next() };
    match m {
        Some(c) => {
            let g = c
                .iter()
                .skip(1)
                .flatten()
                .map(|g| g.as_str())
                .find(|s| !s.is_empty());
            py_strip(g.unwrap_or("")).to_string()
        }
        None => INVALID.to_string(),
    }
}

pub fn strict_match(generation: &str) -> String {
    extract(&STRICT_RE, generation, false)
}

pub fn flexible_extract(generation: &str) -> String {
    extract(&FLEXIBLE_RE, generation, true)
}

fn normalise(s: &str) -> String {
    let mut s = s.to_string();
    for (re, rep) in IGNORE.iter() {
        s = re.replace_all(&s, *rep).into_owned();
    }
    s.to_lowercase()
}

/// lm-eval's exact_match with the GSM8K options (ignore case, the four regexes).
pub fn exact_match(prediction: &str, reference: &str) -> bool {
    normalise(prediction) == normalise(reference)
}

impl Task for Gsm8k {
    fn name(&self) -> &str {
        "gsm8k"
    }

    fn benchmark(&self) -> Benchmark {
        Benchmark::Gsm8k
    }

    fn num_docs(&self) -> usize {
        self.docs.len()
    }

    fn sampler(&self) -> FewshotSampler {
        FewshotSampler::Random {
            pool_len: self.pool.len(),
        }
    }

    fn instance(&self, doc: usize, shots: &[usize]) -> Instance {
        let d = &self.docs[doc];
        let shots = shots.iter().map(|&s| {
            format!(
                "{}{TARGET_DELIMITER}{}",
                text(&self.pool[s]),
                self.pool[s].answer
            )
        });
        let context = fewshot_context("", shots, &text(d));
        let requests = match self.scoring {
            Gsm8kScoring::Generate => Requests::Generate(GenerationRequest {
                context,
                until: UNTIL.map(String::from).to_vec(),
                max_gen_toks: MAX_GEN_TOKS,
            }),
            Gsm8kScoring::GoldLikelihood => Requests::Loglikelihood(vec![LoglikelihoodRequest {
                context,
                continuation: gold_continuation(d),
            }]),
        };
        Instance {
            doc_id: doc,
            requests,
            target: Value::from(d.answer.clone()),
        }
    }

    fn metric_keys(&self) -> &'static [MetricKey] {
        match self.scoring {
            Gsm8kScoring::Generate => &[STRICT, FLEXIBLE],
            Gsm8kScoring::GoldLikelihood => &[GOLD],
        }
    }

    fn headline(&self) -> MetricKey {
        match self.scoring {
            // The leaderboard's metric, as every other task.
            Gsm8kScoring::Generate => self.benchmark().headline(),
            Gsm8kScoring::GoldLikelihood => GOLD,
        }
    }

    fn score(&self, doc: usize, response: &Response) -> Result<DocScore> {
        let g = match (self.scoring, response) {
            (Gsm8kScoring::Generate, Response::Generation(g)) => g,
            (Gsm8kScoring::GoldLikelihood, Response::Loglikelihood(lls)) if lls.len() == 1 => {
                let p = gold_byte_probability(lls[0].0, &gold_continuation(&self.docs[doc]));
                return Ok(DocScore {
                    probability: Some(p),
                    metrics: vec![(GOLD, p)],
                    filtered: vec![],
                });
            }
            (scoring, _) => bail!("gsm8k ({scoring:?}): unexpected response {response:?}"),
        };
        let gold = &self.docs[doc].answer;
        let strict = strict_match(g);
        let flexible = flexible_extract(g);
        Ok(DocScore {
            probability: None,
            metrics: vec![
                (STRICT, exact_match(&strict, gold) as u8 as f64),
                (FLEXIBLE, exact_match(&flexible, gold) as u8 as f64),
            ],
            filtered: vec![("strict-match", strict), ("flexible-extract", flexible)],
        })
    }
}

/// The gold solution as a continuation of the prompt, delimited as the shots are.
fn gold_continuation(d: &Gsm8kDoc) -> String {
    format!("{TARGET_DELIMITER}{}", d.answer)
}

/// `exp(loglikelihood / bytes)`: the continuation's geometric-mean probability per UTF-8 byte.
fn gold_byte_probability(loglikelihood: f64, continuation: &str) -> f64 {
    (loglikelihood / continuation.len().max(1) as f64).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scored by gold likelihood, GSM8K stands in the objective under its own metric and stays
    /// out of every leaderboard number.
    #[test]
    fn a_gold_likelihood_result_is_no_leaderboard_score() {
        use crate::eval::results::{DocRecord, SuiteResult, TaskResult};
        use crate::eval::task::Benchmark;
        let doc = |q: &str, a: &str| Gsm8kDoc {
            question: q.into(),
            answer: a.into(),
        };
        let task = Gsm8k {
            docs: vec![doc("1+1?", "2\n#### 2"), doc("2+2?", "4\n#### 4")],
            pool: vec![],
            scoring: Gsm8kScoring::GoldLikelihood,
        };
        let records: Vec<DocRecord> = [(0, -2.0), (1, -6.0)]
            .into_iter()
            .map(|(d, ll)| {
                let response = Response::Loglikelihood(vec![(ll, false)]);
                let score = task.score(d, &response).unwrap();
                DocRecord {
                    doc_id: d,
                    shots: vec![],
                    response,
                    score,
                }
            })
            .collect();
        // " 2\n#### 2" and " 4\n#### 4" are 9 bytes each.
        let want = ((-2.0f64 / 9.0).exp() + (-6.0f64 / 9.0).exp()) / 2.0;
        let result = SuiteResult::new(vec![TaskResult::new(&task, 5, 2, records, 1.0)], 1.0);
        assert_eq!(result.screening_metric(Benchmark::Gsm8k), Some(GOLD));
        let h = result.headline(Benchmark::Gsm8k).unwrap();
        assert!((h.value - want).abs() < 1e-12, "{} vs {want}", h.value);
        assert!((result.probability(Benchmark::Gsm8k).unwrap().value - want).abs() < 1e-12);
        assert!(result.scores().is_empty());
        assert_eq!(result.average(), None);
        let named = result.named_scores();
        assert_eq!(
            named.keys().collect::<Vec<_>>(),
            ["gsm8k gold_byte_probability"]
        );
        assert!((named["gsm8k gold_byte_probability"] - 100.0 * want).abs() < 1e-9);
        // A generation response is refused, not scored as something else.
        assert!(task
            .score(0, &Response::Generation("#### 2".into()))
            .is_err());
    }

    #[test]
    fn gold_likelihood_is_a_probability_per_byte() {
        // Two bytes of probability ½ each, whatever the tokens were.
        let p = gold_byte_probability(2.0 * 0.5f64.ln(), " 7");
        assert!((p - 0.5).abs() < 1e-15, "{p}");
        // Bytes, not characters: "€" is three.
        let p = gold_byte_probability(4.0 * 0.25f64.ln(), " €");
        assert!((p - 0.25).abs() < 1e-15, "{p}");
        assert_eq!(gold_byte_probability(0.0, " 7"), 1.0);
        assert_eq!(
            Gsm8kScoring::parse("gold-likelihood").unwrap(),
            Gsm8kScoring::GoldLikelihood
        );
        assert_eq!(
            Gsm8kScoring::parse("generate").unwrap(),
            Gsm8kScoring::Generate
        );
        assert!(Gsm8kScoring::parse("sample")
            .unwrap_err()
            .to_string()
            .contains("sample"));
    }

    #[test]
    fn filters_follow_lm_eval() {
        let g = " She has 3 + 4 = 7 apples.\n#### 1,234.\nThen 5";
        assert_eq!(strict_match(g), "1,234.");
        assert_eq!(flexible_extract(g), "5");
        assert_eq!(strict_match("no answer 12"), INVALID);
        assert_eq!(flexible_extract("costs $12.50 total"), "$12.50");
        assert_eq!(flexible_extract("nothing"), INVALID);
        assert!(exact_match("1,234.", "so 1000+234=1234\n#### 1234"));
        assert!(exact_match("$18", "#### 18"));
        assert!(!exact_match("[invalid]", "#### 18"));
        assert!(!exact_match("18.5", "#### 18"));
    }
}
