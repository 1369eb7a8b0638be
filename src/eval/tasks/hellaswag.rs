//! HellaSwag (lm-eval `hellaswag`): 10-shot, acc and acc_norm, with lm-eval's text cleaning.
//! Shots come from the validation split with the document excluded.

use anyhow::{Context, Result};
use regex::Regex;
use serde::Deserialize;
use std::sync::LazyLock;

use crate::eval::multiple_choice::{McDoc, McPool, MultipleChoiceTask};
use crate::eval::store::TaskStore;
use crate::eval::task::{py_strip, Benchmark};

#[derive(Deserialize)]
struct HellaSwagDoc {
    activity_label: String,
    ctx_a: String,
    ctx_b: String,
    endings: Vec<String>,
    label: String,
    #[serde(default)]
    source_id: String,
}

static BRACKETED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\[.*?\]").unwrap());

/// lm-eval's `preprocess`: strip, `" [title]"` → `". "`, drop `[...]`, then one pass of `"  "` → `" "`.
pub fn clean(text: &str) -> String {
    let t = py_strip(text).replace(" [title]", ". ");
    BRACKETED.replace_all(&t, "").replace("  ", " ")
}

/// Python's `str.capitalize`: first character upper-cased, the rest lower-cased.
fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

pub fn load(store: &TaskStore) -> Result<MultipleChoiceTask> {
    let rows = store.typed::<HellaSwagDoc>("hellaswag", "validation")?;
    let mut docs = vec![];
    let mut strata = vec![];
    for r in &rows {
        let d = &r.doc;
        let gold: usize = d
            .label
            .parse()
            .with_context(|| format!("{}: label {:?} is not an integer", r.origin(), d.label))?;
        let query = clean(&format!(
            "{}: {} {}",
            d.activity_label,
            d.ctx_a,
            capitalize(&d.ctx_b)
        ));
        let doc = McDoc {
            text: query,
            choices: d.endings.iter().map(|e| clean(e)).collect(),
            gold,
        };
        docs.push(doc.checked(&r.origin())?);
        // Stratify by source: "wikihow~…" / "activitynet~…".
        strata.push(d.source_id.split('~').next().unwrap_or("").to_string());
    }
    Ok(MultipleChoiceTask {
        name: "hellaswag".into(),
        benchmark: Benchmark::HellaSwag,
        description: String::new(),
        docs,
        pool: McPool::EvalSplit {
            raw: rows.into_iter().map(|r| r.raw).collect(),
        },
        strata: Some(strata),
        with_acc_norm: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_follows_python_semantics() {
        // python3: re.sub(r"\[.*?\]", "", "a [title]b [x]c".replace(" [title]", ". ")).replace("  ", " ")
        assert_eq!(clean("  a [title]b [x]c  "), "a. b c");
        // One left-to-right pass: three spaces become two.
        assert_eq!(clean("a   b"), "a  b");
        assert_eq!(capitalize("the LADY"), "The lady");
        assert_eq!(capitalize(""), "");
    }
}
