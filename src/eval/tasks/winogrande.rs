//! Winogrande (lm-eval `winogrande`): 5-shot partial evaluation — the two options make two
//! contexts and the rest of the sentence is the one continuation scored after each. acc.

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::eval::multiple_choice::loglikelihoods;
use crate::eval::store::TaskStore;
use crate::eval::task::{
    argmax, fewshot_context, py_strip, Benchmark, DocScore, FewshotSampler, Instance,
    LoglikelihoodRequest, MetricKey, Requests, Response, Task, TARGET_DELIMITER,
};

#[derive(Deserialize)]
struct WinograndeDoc {
    sentence: String,
    option1: String,
    option2: String,
    answer: String,
}

struct Doc {
    /// The sentence up to the blank (ends with a space).
    before: String,
    /// The sentence after the blank, stripped.
    after: String,
    options: [String; 2],
    gold: usize,
}

pub struct Winogrande {
    docs: Vec<Doc>,
    raw: Vec<Value>,
}

const ACC: MetricKey = MetricKey::plain("acc");

pub fn load(store: &TaskStore) -> Result<Winogrande> {
    let rows = store.typed::<WinograndeDoc>("winogrande", "validation")?;
    let mut docs = vec![];
    for r in &rows {
        let d = &r.doc;
        let Some(k) = d.sentence.find('_') else {
            bail!("{}: sentence has no blank '_'", r.origin());
        };
        let gold = match d.answer.as_str() {
            "1" => 0,
            "2" => 1,
            other => bail!(
                "{}: answer {other:?} is out of range (expected \"1\" or \"2\")",
                r.origin()
            ),
        };
        docs.push(Doc {
            before: d.sentence[..k].to_string(),
            after: py_strip(&d.sentence[k + 1..]).to_string(),
            options: [d.option1.clone(), d.option2.clone()],
            gold,
        });
    }
    Ok(Winogrande {
        docs,
        raw: rows.into_iter().map(|r| r.raw).collect(),
    })
}

impl Task for Winogrande {
    fn name(&self) -> &str {
        "winogrande"
    }

    fn benchmark(&self) -> Benchmark {
        Benchmark::Winogrande
    }

    fn num_docs(&self) -> usize {
        self.docs.len()
    }

    fn sampler(&self) -> FewshotSampler {
        FewshotSampler::RandomExcludingSelf
    }

    fn raw_doc(&self, doc: usize) -> Option<&Value> {
        Some(&self.raw[doc])
    }

    fn instance(&self, doc: usize, shots: &[usize]) -> Instance {
        let d = &self.docs[doc];
        let shot_text = |s: &Doc| {
            format!(
                "{}{}{}{}",
                s.before, s.options[s.gold], TARGET_DELIMITER, s.after
            )
        };
        let shots: Vec<String> = shots.iter().map(|&s| shot_text(&self.docs[s])).collect();
        let continuation = format!("{TARGET_DELIMITER}{}", d.after);
        let requests = d
            .options
            .iter()
            .map(|o| LoglikelihoodRequest {
                context: fewshot_context("", shots.iter().cloned(), &format!("{}{o}", d.before)),
                continuation: continuation.clone(),
            })
            .collect();
        Instance {
            doc_id: doc,
            requests: Requests::Loglikelihood(requests),
            target: Value::from(d.gold),
        }
    }

    fn metric_keys(&self) -> &'static [MetricKey] {
        &[ACC]
    }

    fn score(&self, doc: usize, response: &Response) -> Result<DocScore> {
        let lls = loglikelihoods(response, 2, self.name())?;
        let gold = self.docs[doc].gold;
        Ok(DocScore {
            probability: Some(crate::eval::multiple_choice::gold_probability(&lls, gold)),
            metrics: vec![(ACC, (argmax(lls) == gold) as u8 as f64)],
            filtered: vec![],
        })
    }
}
