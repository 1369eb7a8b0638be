//! lm-eval's `output_type: multiple_choice`: one context, one continuation `" " + choice` per
//! answer, scored by `acc` and (optionally) `acc_norm`. ARC, HellaSwag and MMLU are this task
//! with their own document processing.

use anyhow::{bail, Result};
use serde_json::Value;

use super::task::{
    argmax, choice_requests, fewshot_context, Benchmark, DocScore, FewshotSampler, Instance,
    MetricKey, Response, Task, TARGET_DELIMITER,
};

/// A processed document: prompt text, answer choices, gold index.
#[derive(Debug, Clone, PartialEq)]
pub struct McDoc {
    pub text: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

impl McDoc {
    /// Checks the gold index, naming the document's origin on failure.
    pub fn checked(self, origin: &str) -> Result<Self> {
        if self.choices.is_empty() {
            bail!("{origin}: document has no answer choices");
        }
        if self.gold >= self.choices.len() {
            bail!(
                "{origin}: gold answer index {} is out of range for {} choices",
                self.gold,
                self.choices.len()
            );
        }
        Ok(self)
    }

    fn shot(&self) -> String {
        format!(
            "{}{}{}",
            self.text, TARGET_DELIMITER, self.choices[self.gold]
        )
    }
}

/// Few-shot pool of a multiple-choice task.
#[derive(Debug, Clone)]
pub enum McPool {
    /// The evaluation split itself; shots exclude the document (compared on raw JSON).
    EvalSplit { raw: Vec<Value> },
    /// A separate split sampled at random.
    Separate(Vec<McDoc>),
    /// A separate split whose first n rows are the shots.
    FirstN(Vec<McDoc>),
}

pub struct MultipleChoiceTask {
    pub name: String,
    pub benchmark: Benchmark,
    pub description: String,
    pub docs: Vec<McDoc>,
    pub pool: McPool,
    pub strata: Option<Vec<String>>,
    /// MMLU reports `acc` only.
    pub with_acc_norm: bool,
}

const ACC: MetricKey = MetricKey::plain("acc");
const ACC_NORM: MetricKey = MetricKey::plain("acc_norm");

impl Task for MultipleChoiceTask {
    fn name(&self) -> &str {
        &self.name
    }

    fn benchmark(&self) -> Benchmark {
        self.benchmark
    }

    fn num_docs(&self) -> usize {
        self.docs.len()
    }

    fn sampler(&self) -> FewshotSampler {
        match &self.pool {
            McPool::EvalSplit { .. } => FewshotSampler::RandomExcludingSelf,
            McPool::Separate(p) => FewshotSampler::Random { pool_len: p.len() },
            McPool::FirstN(_) => FewshotSampler::FirstN,
        }
    }

    fn raw_doc(&self, doc: usize) -> Option<&Value> {
        match &self.pool {
            McPool::EvalSplit { raw } => Some(&raw[doc]),
            _ => None,
        }
    }

    fn stratum(&self, doc: usize) -> &str {
        self.strata.as_ref().map_or("", |s| &s[doc])
    }

    fn instance(&self, doc: usize, shots: &[usize]) -> Instance {
        let pool: &[McDoc] = match &self.pool {
            McPool::EvalSplit { .. } => &self.docs,
            McPool::Separate(p) | McPool::FirstN(p) => p,
        };
        let d = &self.docs[doc];
        let context = fewshot_context(
            &self.description,
            shots.iter().map(|&s| pool[s].shot()),
            &d.text,
        );
        Instance {
            doc_id: doc,
            requests: choice_requests(&context, &d.choices),
            target: Value::from(d.gold),
        }
    }

    fn metric_keys(&self) -> &'static [MetricKey] {
        if self.with_acc_norm {
            &[ACC, ACC_NORM]
        } else {
            &[ACC]
        }
    }

    fn score(&self, doc: usize, response: &Response) -> Result<DocScore> {
        let d = &self.docs[doc];
        let lls = loglikelihoods(response, d.choices.len(), &self.name)?;
        let mut metrics = vec![(ACC, (argmax(lls.iter().copied()) == d.gold) as u8 as f64)];
        let mut probability = gold_probability(&lls, d.gold);
        if self.with_acc_norm {
            // Normalised by Unicode code points of the choice (not bytes, not tokens), as lm-eval.
            let norm: Vec<f64> = lls
                .iter()
                .zip(&d.choices)
                .map(|(ll, c)| ll / c.chars().count() as f64)
                .collect();
            metrics.push((
                ACC_NORM,
                (argmax(norm.iter().copied()) == d.gold) as u8 as f64,
            ));
            probability = gold_probability(&norm, d.gold);
        }
        Ok(DocScore {
            metrics,
            probability: Some(probability),
            filtered: vec![],
        })
    }
}

/// softmax(scores)[gold], via log-sum-exp: the smooth version of "the argmax is gold".
pub fn gold_probability(scores: &[f64], gold: usize) -> f64 {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
    (scores[gold] - max).exp() / total
}

/// The log-likelihoods of a response that must hold `expected` of them.
pub fn loglikelihoods(response: &Response, expected: usize, task: &str) -> Result<Vec<f64>> {
    match response {
        Response::Loglikelihood(v) if v.len() == expected => Ok(v.iter().map(|r| r.0).collect()),
        other => bail!("{task}: expected {expected} log-likelihoods, got {other:?}"),
    }
}
