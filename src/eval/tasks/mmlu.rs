//! MMLU (lm-eval `mmlu_<subject>`, 57 tasks): 5-shot from the dev split's first five rows of the
//! subject, acc. The leaderboard reports the unweighted mean over subjects.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Deserialize;

use crate::eval::multiple_choice::{McDoc, McPool, MultipleChoiceTask};
use crate::eval::store::{TaskStore, Typed};
use crate::eval::task::{py_strip, Benchmark};

#[derive(Deserialize)]
struct MmluDoc {
    question: String,
    subject: String,
    choices: Vec<String>,
    answer: usize,
}

fn process(r: &Typed<MmluDoc>) -> Result<McDoc> {
    let c = &r.doc.choices;
    if c.len() != 4 {
        bail!(
            "{}: MMLU documents need 4 choices, this one has {}",
            r.origin(),
            c.len()
        );
    }
    let text = format!(
        "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
        py_strip(&r.doc.question),
        c[0],
        c[1],
        c[2],
        c[3]
    );
    McDoc {
        text,
        choices: ["A", "B", "C", "D"].map(String::from).to_vec(),
        gold: r.doc.answer,
    }
    .checked(&r.origin())
}

/// One task per subject, in subject order; `only` restricts to the named subjects.
pub fn load(store: &TaskStore, only: Option<&[String]>) -> Result<Vec<MultipleChoiceTask>> {
    let mut test: BTreeMap<String, Vec<McDoc>> = BTreeMap::new();
    for r in store.typed::<MmluDoc>("mmlu", "test")? {
        test.entry(r.doc.subject.clone())
            .or_default()
            .push(process(&r)?);
    }
    let mut dev: BTreeMap<String, Vec<McDoc>> = BTreeMap::new();
    for r in store.typed::<MmluDoc>("mmlu", "dev")? {
        dev.entry(r.doc.subject.clone())
            .or_default()
            .push(process(&r)?);
    }
    let mut tasks = vec![];
    for (subject, docs) in test {
        if only.is_some_and(|o| !o.contains(&subject)) {
            continue;
        }
        let Some(pool) = dev.remove(&subject) else {
            bail!("MMLU subject {subject} has test documents but no dev rows for its few-shot examples");
        };
        tasks.push(MultipleChoiceTask {
            name: format!("mmlu_{subject}"),
            benchmark: Benchmark::Mmlu,
            description: format!(
                "The following are multiple choice questions (with answers) about {}.\n\n",
                subject.replace('_', " ")
            ),
            docs,
            pool: McPool::FirstN(pool),
            strata: None,
            with_acc_norm: false,
        });
    }
    Ok(tasks)
}
