//! Two per-candidate costs of a merge search, measured apart from the rest of scoring:
//!
//! - `merge`: seconds per in-memory TIES merge of the base and two fine-tunes (f32), over a fixed
//!   grid of weights, each result dropped before the next merge as the scorer does;
//! - `gsm8k`: seconds to generate for the first DOCS GSM8K documents at the evaluator's batch
//!   size, per few-shot mode, with the token work; `--out FILE` writes every generation (one JSON
//!   line per mode and document) so two builds can be compared byte for byte.
//!
//! cargo bench --profile dev --bench candidate_parts -- --base DIR [--sft REF --pref REF]
//!     [--merges 6] [--fresh] [--docs 8] [--batch 8] [--modes per_document,shared]
//!     [--what merge,gsm8k] [--out FILE] [--tasks-dir DIR]
//!
//! `--fresh` merges into new buffers per candidate (the search's way before buffer reuse); the
//! merge line has each candidate's sha256, so the two ways (or two builds) compare bit for bit.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use paft::eval::fewshot::FewshotMode;
use paft::eval::task::Response;
use paft::eval::{parse_task_list, DocSet, EvalConfig, EvalModel, PreparedSuite, TaskStore};
use paft::merge::{load_f32, InMemoryMerger, MergeConfig, ModelRef};
use paft::model::{Mode, Pretrained};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A TIES config over the two fine-tunes with the given weights (densities 0.5).
fn ties(base: &str, sft: &str, pref: &str, w: (f64, f64)) -> Result<MergeConfig> {
    MergeConfig::from_yaml(&format!(
        "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {sft}\n    parameters: \
         {{weight: {}, density: 0.5}}\n  - model: {pref}\n    parameters: {{weight: {}, \
         density: 0.5}}\nparameters: {{normalize: true}}\ndtype: float32\n",
        w.0, w.1
    ))
}

/// sha256 of every tensor's name and f32 bytes, in name order (first 16 hex digits), so two
/// builds' merges can be compared bit for bit.
fn digest(weights: &paft::model::WeightMap) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut h = Sha256::new();
    for name in names {
        h.update(name.as_bytes());
        for x in weights[name].flatten_all()?.to_vec1::<f32>()? {
            h.update(x.to_le_bytes());
        }
    }
    Ok(h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn bench_merge(args: &[String], base_dir: &str, pre: &Pretrained) -> Result<()> {
    let sft = arg(args, "--sft").context("--sft is required for the merge benchmark")?;
    let pref = arg(args, "--pref").context("--pref is required for the merge benchmark")?;
    let n: usize = arg(args, "--merges").unwrap_or("6".into()).parse()?;
    let models = [&sft, &pref]
        .iter()
        .map(|m| load_f32(&ModelRef::parse(m), &pre.config).with_context(|| format!("model {m}")))
        .collect::<Result<Vec<_>>>()?;
    // --fresh: new buffers per candidate (`merge`), as the search did before `merge_reusing`.
    let fresh = args.iter().any(|a| a == "--fresh");
    let start = Instant::now();
    let mut merger = InMemoryMerger::new(
        &pre.weights,
        &models.iter().collect::<Vec<_>>(),
        pre.config.num_hidden_layers,
    )?;
    let setup = start.elapsed().as_secs_f64();
    let mut seconds = vec![];
    let mut digests = vec![];
    for i in 0..n {
        // A fixed grid: weights from 0.25 to 1.5 in both models.
        let w = (0.25 + 0.25 * (i % 6) as f64, 1.5 - 0.25 * (i % 6) as f64);
        let cfg = ties(base_dir, &sft, &pref, w)?;
        let t = Instant::now();
        let merged = if fresh {
            merger.merge(&cfg, 0, DType::F32, &Device::Cpu)?
        } else {
            merger.merge_reusing(&cfg, 0)?
        };
        seconds.push(t.elapsed().as_secs_f64());
        digests.push(digest(&merged)?);
        drop(merged);
    }
    let mean = seconds.iter().sum::<f64>() / n.max(1) as f64;
    // The first merge pays for first-touch allocations; the rest are the steady state.
    let steady = if n > 1 {
        seconds[1..].iter().sum::<f64>() / (n - 1) as f64
    } else {
        mean
    };
    println!(
        "{}",
        serde_json::json!({"bench": "merge", "fresh": fresh, "candidates": n, "setup_s": setup,
            "sha256": digests,
            "seconds": seconds, "mean_s": mean, "steady_mean_s": steady,
            "threads": rayon::current_num_threads()})
    );
    Ok(())
}

fn bench_gsm8k(args: &[String], pre: &Pretrained) -> Result<()> {
    let docs: usize = arg(args, "--docs").unwrap_or("8".into()).parse()?;
    let batch: usize = arg(args, "--batch").unwrap_or("8".into()).parse()?;
    let modes = arg(args, "--modes").unwrap_or("per_document,shared".into());
    let store = TaskStore::new(
        arg(args, "--tasks-dir")
            .map(Into::into)
            .unwrap_or_else(TaskStore::default_root),
    );
    let mut out = match arg(args, "--out") {
        Some(p) => Some(std::fs::File::create(&p).with_context(|| format!("creating {p}"))?),
        None => None,
    };
    let net = pre.model(Mode::Inference, None)?;
    let target = EvalModel {
        model: &net,
        tokenizer: &pre.tokenizer,
        stop_token_ids: pre.stop_token_ids(),
        pad_id: pre.pad_token_id(),
    };
    for mode in modes.split(',') {
        let mut config = EvalConfig::new(parse_task_list("gsm8k")?);
        config.fewshot_mode = FewshotMode::parse(mode)?;
        config.batch_size = Some(batch);
        let docset = DocSet {
            pool: paft::eval::Pool::All,
            selection: paft::eval::Selection::Limit(docs),
        };
        let suite = PreparedSuite::prepare(
            &store,
            &pre.tokenizer,
            pre.config.max_position_embeddings,
            config,
            docset,
        )?;
        let t = Instant::now();
        let result = suite.evaluate(&target, &|| {})?;
        let seconds = t.elapsed().as_secs_f64();
        let task = &result.tasks[0];
        println!(
            "{}",
            serde_json::json!({"bench": "gsm8k", "mode": mode, "docs": task.records.len(),
                "batch": batch, "seconds": seconds, "prefilled": task.tokens.prefilled,
                "generated": task.tokens.generated, "saved": task.tokens.saved,
                "threads": rayon::current_num_threads()})
        );
        if let Some(f) = out.as_mut() {
            for r in &task.records {
                if let Response::Generation(text) = &r.response {
                    writeln!(
                        f,
                        "{}",
                        serde_json::json!({"mode": mode, "doc_id": r.doc_id, "generation": text})
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    paft::process::setup();
    let args: Vec<String> = std::env::args().collect();
    let base = arg(&args, "--base").context("--base is required")?;
    let what = arg(&args, "--what").unwrap_or("merge,gsm8k".into());
    let pre = Pretrained::load(std::path::Path::new(&base), Some(DType::F32), &Device::Cpu)
        .with_context(|| format!("base model {base}"))?;
    for w in what.split(',') {
        match w {
            "merge" => bench_merge(&args, &base, &pre)?,
            "gsm8k" => bench_gsm8k(&args, &pre)?,
            other => anyhow::bail!("unknown --what `{other}` (merge, gsm8k)"),
        }
    }
    Ok(())
}
