//! MMLU (lm-eval `mmlu_<subject>`, 57 tasks): 5-shot from the dev split's first five rows of the
//! subject, acc. The leaderboard reports the unweighted mean over subjects.
//!
//! With pooled shots (the shared-shot screening mode) every subject draws from one pool, all
//! subjects' dev rows, under one description without the subject: a screening sample holds about
//! one document per subject, so per-subject shots would share no prefix at all (measured: MMLU
//! cost the same in both modes), while one description and shot set for all of MMLU is prefilled
//! once per candidate.

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

/// The description of every subject when shots are pooled across subjects.
const POOLED_DESCRIPTION: &str = "The following are multiple choice questions (with answers).\n\n";

/// One task per subject, in subject order; `only` restricts to the named subjects. `pooled`:
/// shots from every subject's dev rows under one subject-less description (see the module note).
pub fn load(
    store: &TaskStore,
    only: Option<&[String]>,
    pooled: bool,
) -> Result<Vec<MultipleChoiceTask>> {
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
    // Subject order, then row order: the pool is the same whichever subjects are selected.
    let all_dev: Vec<McDoc> = dev.values().flatten().cloned().collect();
    let mut tasks = vec![];
    for (subject, docs) in test {
        if only.is_some_and(|o| !o.contains(&subject)) {
            continue;
        }
        let Some(pool) = dev.remove(&subject) else {
            bail!("MMLU subject {subject} has test documents but no dev rows for its few-shot examples");
        };
        let (description, pool) = if pooled {
            (
                POOLED_DESCRIPTION.to_string(),
                McPool::Separate(all_dev.clone()),
            )
        } else {
            (
                format!(
                    "The following are multiple choice questions (with answers) about {}.\n\n",
                    subject.replace('_', " ")
                ),
                McPool::FirstN(pool),
            )
        };
        tasks.push(MultipleChoiceTask {
            name: format!("mmlu_{subject}"),
            benchmark: Benchmark::Mmlu,
            description,
            docs,
            pool,
            strata: None,
            with_acc_norm: false,
        });
    }
    Ok(tasks)
}
