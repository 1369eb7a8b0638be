//! What an evaluation leaves on disk: lm-eval-shaped `results.json` (with paft's description
//! of the documents: pool, split and selection) and `samples_<task>.jsonl` with every
//! document's requests, answers and metrics, which `paft report` resamples for its intervals.
//! The one writer of both, for `paft eval`, the pipeline's rows and anything else.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use super::results::SuiteResult;
use super::suite::PreparedSuite;
use super::task::{Requests, Response};
use crate::io::write_file_atomic;

/// Writes `results.json` into `dir` (created if needed); `config` describes the run (model,
/// tasks…) and gains the documents' description. With `samples`, also every task's
/// `samples_<task>.jsonl`.
pub fn write_results(
    dir: &Path,
    suite: &PreparedSuite,
    result: &SuiteResult,
    mut config: Value,
    samples: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if let Value::Object(m) = &mut config {
        m.insert("documents".into(), suite.docs.describe());
        m.insert("split".into(), json!(suite.config.split));
        // Shared shots are a screening fidelity; say so wherever the scores go.
        m.insert("fewshot_mode".into(), json!(suite.config.fewshot_mode));
        m.insert(
            "gsm8k_scoring".into(),
            json!(suite.config.task_options.gsm8k_scoring),
        );
    }
    let json = serde_json::to_vec_pretty(&result.to_json(config))?;
    write_file_atomic(&dir.join("results.json"), &json)?;
    if samples {
        write_samples(dir, suite, result)?;
    }
    Ok(())
}

/// `samples_<task>.jsonl`: per document the exact requests, the model's answers, the target,
/// filtered predictions and metrics. Each file is written atomically.
fn write_samples(dir: &Path, suite: &PreparedSuite, result: &SuiteResult) -> Result<()> {
    for (t, r) in suite.tasks.iter().zip(&result.tasks) {
        // A task the selection gave no document (an MMLU subject a small sample missed) gets
        // no file, as it gets no score.
        if r.records.is_empty() {
            continue;
        }
        let mut buf = vec![];
        for rec in &r.records {
            let inst = t.task.instance(rec.doc_id, &rec.shots);
            let (arguments, resps) = match (&inst.requests, &rec.response) {
                (Requests::Loglikelihood(reqs), Response::Loglikelihood(lls)) => (
                    reqs.iter()
                        .map(|q| json!({"context": q.context, "continuation": q.continuation}))
                        .collect::<Vec<_>>(),
                    lls.iter().map(|(ll, g)| json!([ll, g])).collect::<Vec<_>>(),
                ),
                (Requests::Generate(g), Response::Generation(text)) => (
                    vec![
                        json!({"context": g.context, "until": g.until, "max_gen_toks": g.max_gen_toks}),
                    ],
                    vec![json!(text)],
                ),
                _ => (vec![], vec![]),
            };
            let mut line = json!({
                "doc_id": rec.doc_id,
                "fewshot_ids": rec.shots,
                "arguments": arguments,
                "resps": resps,
                "target": inst.target,
            });
            if !rec.score.filtered.is_empty() {
                line["filtered_resps"] = json!(rec
                    .score
                    .filtered
                    .iter()
                    .map(|(f, v)| (f.to_string(), json!(v)))
                    .collect::<Map<_, _>>());
            }
            for (k, v) in &rec.score.metrics {
                line["metrics"][k.to_string()] = json!(v);
            }
            if let Some(p) = rec.score.probability {
                // paft's smooth score (not an lm-eval metric): the gold answer's probability.
                line["paft_probability"] = json!(p);
            }
            serde_json::to_writer(&mut buf, &line)?;
            buf.write_all(b"\n")?;
        }
        write_file_atomic(&dir.join(format!("samples_{}.jsonl", r.name)), &buf)?;
    }
    Ok(())
}
