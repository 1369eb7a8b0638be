//! ARC-Challenge (lm-eval `arc_challenge`): 25-shot, acc and acc_norm. Shots come from the test
//! split with the document excluded (no local train split).

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::eval::multiple_choice::{McDoc, McPool, MultipleChoiceTask};
use crate::eval::store::TaskStore;
use crate::eval::task::Benchmark;

#[derive(Deserialize)]
struct ArcDoc {
    question: String,
    choices: ArcChoices,
    #[serde(rename = "answerKey")]
    answer_key: String,
}

#[derive(Deserialize)]
struct ArcChoices {
    text: Vec<String>,
    label: Vec<String>,
}

pub fn load(store: &TaskStore) -> Result<MultipleChoiceTask> {
    let rows = store.typed::<ArcDoc>("arc_challenge", "test")?;
    let mut docs = vec![];
    for r in &rows {
        // doc_to_target: choices.label.index(answerKey)
        let gold = r
            .doc
            .choices
            .label
            .iter()
            .position(|l| *l == r.doc.answer_key)
            .with_context(|| {
                format!(
                    "{}: answerKey {:?} is not one of the labels {:?}",
                    r.origin(),
                    r.doc.answer_key,
                    r.doc.choices.label
                )
            })?;
        let doc = McDoc {
            text: format!("Question: {}\nAnswer:", r.doc.question),
            choices: r.doc.choices.text.clone(),
            gold,
        };
        docs.push(doc.checked(&r.origin())?);
    }
    Ok(MultipleChoiceTask {
        name: "arc_challenge".into(),
        benchmark: Benchmark::Arc,
        description: String::new(),
        docs,
        pool: McPool::EvalSplit {
            raw: rows.into_iter().map(|r| r.raw).collect(),
        },
        strata: None,
        with_acc_norm: true,
    })
}
