//! `paft eval`: the leaderboard tasks on one model, lm-eval-style outputs.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;

use super::ModelArgs;
use crate::eval::fewshot::FewshotMode;
use crate::eval::{
    parse_task_list, DocSet, EvalConfig, Evaluator, Gsm8kScoring, Pool, PoolSplit, Selection,
    TaskOptions, TaskStore,
};
use crate::model::{self, Pretrained};

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `leaderboard` (all six) or a comma-separated list: arc_challenge, hellaswag, mmlu,
    /// mmlu_<subject>, truthfulqa_mc2, winogrande, gsm8k.
    #[arg(long, default_value = "leaderboard")]
    pub tasks: String,
    /// Only the first N documents of each task (each MMLU subject), as lm-eval's --limit.
    #[arg(long, conflicts_with = "sample")]
    pub limit: Option<usize>,
    /// A stratified random subset of N documents per task (MMLU: N in total over subjects).
    #[arg(long)]
    pub sample: Option<usize>,
    /// Seed of --sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shots for every task instead of the leaderboard's (TruthfulQA stays 0-shot).
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    /// `per_document` (lm-eval's shots, the default) or `shared`: one shot set per task for
    /// every document, prefilled once (a faster screening fidelity; its scores are not lm-eval's,
    /// and results.json says so in config.fewshot_mode).
    #[arg(long, default_value = "per_document", value_parser = FewshotMode::parse)]
    pub fewshot_mode: FewshotMode,
    /// `generate` (lm-eval's exact match of a greedy generation, the default) or
    /// `gold_likelihood`: no generation, each GSM8K document scores the gold solution's
    /// probability per byte (a screening fidelity about 4× cheaper; results.json names it in
    /// config.gsm8k_scoring and its metric is gold_byte_probability, not exact_match).
    #[arg(long, default_value = "generate", value_parser = Gsm8kScoring::parse)]
    pub gsm8k_scoring: Gsm8kScoring,
    /// Seed of the few-shot sampler (lm-eval's fewshot_random_seed).
    #[arg(long, default_value_t = crate::eval::fewshot::DEFAULT_FEWSHOT_SEED)]
    pub fewshot_seed: u64,
    /// Generation batch size (GSM8K) [default: 8 with per-document shots; with shared shots,
    /// whose rows hold only their own tokens, 32 on CPUs with AVX-512VL, else 16]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Directory with <task>/<split>.jsonl (default: PAFT_TASKS_DIR, ../shared/data/leaderboard, or
    /// where `paft fetch tasks` writes).
    #[arg(long, env = "PAFT_TASKS_DIR")]
    pub tasks_dir: Option<PathBuf>,
    /// Write results.json (and samples) here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also write samples_<task>.jsonl with every document's requests and answers.
    #[arg(long)]
    pub log_samples: bool,
    /// TruthfulQA mc2 true set as the leaderboard had it (answers before the first false one).
    #[arg(long)]
    pub legacy_mc2: bool,
    /// Which documents: `all` (lm-eval's semantics), or the held-out protocol's `search` or
    /// `report` pool (the same split as a search space's `[pools]`).
    #[arg(long, default_value = "all", value_parser = Pool::parse)]
    pub pool: Pool,
    /// Fraction of each task in the search pool (with --pool).
    #[arg(long, default_value_t = 0.5)]
    pub split_search: f64,
    /// Fraction of each task in the report pool (with --pool).
    #[arg(long, default_value_t = 0.5)]
    pub split_report: f64,
    /// Seed of the pool split (with --pool).
    #[arg(long, default_value_t = 0)]
    pub split_seed: u64,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    if args.log_samples && args.output.is_none() {
        bail!("--log-samples needs --output DIR");
    }
    if args.batch_size == Some(0) {
        bail!("--batch-size must be at least 1");
    }
    let store = TaskStore::new(
        args.tasks_dir
            .clone()
            .unwrap_or_else(TaskStore::default_root),
    );
    let mut config = EvalConfig::new(parse_task_list(&args.tasks)?);
    let selection = match (args.limit, args.sample) {
        (Some(n), _) => Selection::Limit(n),
        (None, Some(n)) => Selection::Sample {
            n,
            seed: args.seed,
            mmlu: None,
        },
        (None, None) => Selection::All,
    };
    let docs = DocSet {
        pool: args.pool,
        selection,
    };
    config.split = PoolSplit {
        search: args.split_search,
        report: args.split_report,
        seed: args.split_seed,
    };
    config.num_fewshot = args.num_fewshot;
    config.fewshot_seed = args.fewshot_seed;
    config.fewshot_mode = args.fewshot_mode;
    config.batch_size = args.batch_size;
    config.task_options = TaskOptions {
        legacy_mc2_true_set: args.legacy_mc2,
        gsm8k_scoring: args.gsm8k_scoring,
        ..TaskOptions::default()
    };

    let device = model::parse_device(&args.model.device)?;
    let dtype = model::parse_dtype(&args.model.dtype)?;
    let dir = model::source::resolve_model(&args.model.model, args.model.revision.as_deref())?;
    let mut pre = Pretrained::load(&dir, Some(dtype), &device)?;
    let net = pre.inference_model()?;
    let generation_batch = config.generation_batch();
    let mut evaluator = Evaluator::new(pre, store.clone(), config)?;
    let n_docs = evaluator.suite(docs)?.num_docs();
    tracing::info!(
        "{n_docs} documents ({} pool) from {}",
        args.pool.name(),
        store.root().display()
    );
    let result = evaluator.evaluate(&net, docs)?;

    if let Some(out) = &args.output {
        let config = json!({
            "model": args.model.model,
            "model_dir": dir,
            "device": args.model.device,
            "dtype": args.model.dtype,
            "tasks": args.tasks,
            "limit": args.limit,
            "sample": args.sample.map(|n| json!({"n": n, "seed": args.seed})),
            "num_fewshot": args.num_fewshot,
            "fewshot_seed": args.fewshot_seed,
            "batch_size": generation_batch,
            "tasks_dir": store.root(),
            "legacy_mc2": args.legacy_mc2,
        });
        evaluator.write(out, docs, &result, config, args.log_samples)?;
        tracing::info!("results written to {}", out.display());
    }
    if let Some(micro) = result.mmlu_micro() {
        tracing::info!(
            "MMLU micro mean (lm-eval's group number): {:.2}",
            100.0 * micro
        );
    }
    tracing::info!(
        "{} requests in {:.1}s",
        result.num_requests(),
        result.seconds
    );
    print!("{}", result.table(&args.model.model));
    Ok(())
}
