//! GSM8K (lm-eval `gsm8k`): 5-shot from the train split, greedy generation until "Question:",
//! then exact match of the extracted answer (strict-match and flexible-extract filters).

use std::sync::LazyLock;

use anyhow::{bail, Result};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

use crate::eval::store::TaskStore;
use crate::eval::task::{
    fewshot_context, py_strip, Benchmark, DocScore, FewshotSampler, GenerationRequest, Instance,
    MetricKey, Requests, Response, Task, TARGET_DELIMITER,
};

#[derive(Deserialize)]
struct Gsm8kDoc {
    question: String,
    answer: String,
}

pub struct Gsm8k {
    docs: Vec<Gsm8kDoc>,
    pool: Vec<Gsm8kDoc>,
}

pub const MAX_GEN_TOKS: usize = 256;
pub const UNTIL: [&str; 3] = ["Question:", "</s>", "<|im_end|>"];
pub const INVALID: &str = "[invalid]";

const STRICT: MetricKey = MetricKey::new("exact_match", "strict-match");
const FLEXIBLE: MetricKey = MetricKey::new("exact_match", "flexible-extract");

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

pub fn load(store: &TaskStore) -> Result<Gsm8k> {
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
        Instance {
            doc_id: doc,
            requests: Requests::Generate(GenerationRequest {
                context: fewshot_context("", shots, &text(d)),
                until: UNTIL.map(String::from).to_vec(),
                max_gen_toks: MAX_GEN_TOKS,
            }),
            target: Value::from(d.answer.clone()),
        }
    }

    fn metric_keys(&self) -> &'static [MetricKey] {
        &[STRICT, FLEXIBLE]
    }

    fn score(&self, doc: usize, response: &Response) -> Result<DocScore> {
        let Response::Generation(g) = response else {
            bail!("gsm8k: expected a generation, got {response:?}");
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

#[cfg(test)]
mod tests {
    use super::*;

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
