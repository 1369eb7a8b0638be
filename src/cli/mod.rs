//! Command-line interface: argument parsing and dispatch only; the work lives in the stages.

mod eval;
mod inspect;
mod pipeline;
mod report;
mod search;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::model::{self, gguf};

#[derive(Parser, Debug)]
#[command(
    name = "paft",
    version,
    about = "PArallel Fine-Tuning: SFT and preference training in parallel, fused by an evaluation-driven merge search"
)]
pub struct Cli {
    /// No progress bars and no log output.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// Debug-level logs.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (Hugging Face layout), .gguf file, or Hub repo id (owner/name).
    #[arg(long)]
    pub model: String,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long)]
    pub revision: Option<String>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Convert a llama.cpp GGUF file into a Hugging Face model directory.
    ImportGguf {
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// dtype of the written weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Largest safetensors shard, as transformers writes it (5GB, 500MB, …).
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
    },
    /// Download from the Hugging Face Hub into its standard cache.
    Fetch {
        #[command(subcommand)]
        what: FetchWhat,
    },
    /// Merge models as a mergekit YAML describes (mergekit's method names, parameters, defaults).
    Merge {
        config: PathBuf,
        out_dir: PathBuf,
        /// Seed of DARE/DELLA's random drops (per-tensor streams: same seed, same bytes).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest output shard (5GB, 500MB, …).
        #[arg(long, default_value = "5GB")]
        out_shard_size: String,
        /// Refuse parameters the method does not read (by default they are ignored with a
        /// warning each, as mergekit ignores them).
        #[arg(long)]
        strict: bool,
        /// Tensors larger than this (as f32) merge a block of this size at a time, read
        /// straight from the inputs, when their method allows (task arithmetic, TIES, DARE):
        /// memory stays bounded however large the largest tensor is.
        #[arg(long, default_value = "64MB")]
        block_size: String,
    },
    /// Sparsity of a fine-tune's task vector (δ = model − base), per tensor and overall.
    InspectDelta {
        #[arg(long)]
        base: String,
        /// A full fine-tune, or `BASE+ADAPTER_DIR` for a PEFT LoRA adapter.
        #[arg(long)]
        model: String,
        #[arg(long)]
        json: bool,
    },
    /// Per-token log-probabilities of a text.
    Score {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        text: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune: SFT, DPO or ORPO (TRL's losses), LoRA or full.
    Train(train::TrainArgs),
    /// The whole PAFT pipeline of an experiment file, resumable stage by stage.
    Run {
        experiment: PathBuf,
        #[command(flatten)]
        tasks: pipeline::TasksDirArg,
    },
    /// The default experiment on SmolLM2-135M (about 30 minutes on 2 CPU cores); prints the report.
    Demo {
        #[command(flatten)]
        tasks: pipeline::TasksDirArg,
    },
    /// Train an experiment's SFT and preference runs concurrently from the same base.
    Parallel {
        #[arg(long)]
        config: PathBuf,
    },
    /// The sequential baseline of an experiment: SFT, then DPO/ORPO from the SFT model.
    Sequential {
        #[arg(long)]
        config: PathBuf,
    },
    /// Search merge hyperparameters of the SFT and preference deltas, scored on the leaderboard tasks.
    Search(search::SearchArgs),
    /// Score a model on the Open LLM Leaderboard tasks (lm-eval's definitions, local data).
    Eval(eval::EvalArgs),
    /// Leaderboard, search trajectory, parameter and sparsity tables, plots and one HTML page
    /// from a run directory.
    Report(report::ReportArgs),
    /// One unit of work of a Slurm job (written by the driver; not for direct use).
    #[command(hide = true)]
    Job { unit: PathBuf },
    /// Greedy generation with the KV cache, stopping at EOS.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt in the model's chat template as a user message.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum FetchWhat {
    /// A model: config, tokenizer and safetensors weights.
    Model {
        repo_id: String,
        #[arg(long)]
        revision: Option<String>,
    },
    /// The six leaderboard datasets, converted to <task>/<split>.jsonl.
    Tasks {
        /// Where to write them (default: PAFT_TASKS_DIR, else ~/.cache/paft/tasks).
        #[arg(long, env = "PAFT_TASKS_DIR")]
        out: Option<PathBuf>,
    },
}

/// Runs a parsed command line; the error, if any, is for the caller to print.
pub fn run(cli: Cli) -> Result<()> {
    crate::progress::init(cli.quiet, cli.verbose);
    match cli.command {
        Command::ImportGguf {
            file,
            out,
            dtype,
            max_shard_size,
        } => {
            let dtype = model::parse_dtype(&dtype)?;
            let shard = model::weights::parse_size(&max_shard_size)?;
            let imported = gguf::import_gguf(&file, &out, dtype, shard)?;
            tracing::info!(
                "imported {} tensors ({} layers, hidden {}) into {}",
                imported.tensors,
                imported.config.num_hidden_layers,
                imported.config.hidden_size,
                out.display()
            );
            Ok(())
        }
        Command::Fetch {
            what: FetchWhat::Model { repo_id, revision },
        } => {
            let dir = model::hub::fetch_model(&repo_id, revision.as_deref())?;
            println!("{}", dir.display());
            Ok(())
        }
        Command::Fetch {
            what: FetchWhat::Tasks { out },
        } => {
            let out = out.unwrap_or_else(crate::eval::TaskStore::fetch_root);
            crate::eval::fetch::fetch_tasks(&out)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::Merge {
            config,
            out_dir,
            seed,
            out_shard_size,
            strict,
            block_size,
        } => {
            let cfg = crate::merge::MergeConfig::from_file_with(&config, strict)?;
            let opts = crate::merge::MergeOptions {
                seed,
                max_shard_bytes: model::weights::parse_size(&out_shard_size)?,
                block_entries: (model::weights::parse_size(&block_size)? / 4).max(1),
            };
            let out = crate::merge::run_merge(&cfg, &out_dir, &opts)?;
            tracing::info!(
                "merged {} model(s) with {} ({}, {}) into {}",
                cfg.models.len() + (cfg.base_model.is_some() && cfg.method.uses_base()) as usize,
                cfg.method.name(),
                cfg.method.pretty_name(),
                cfg.method.reference(),
                out.display()
            );
            Ok(())
        }
        Command::InspectDelta { base, model, json } => {
            use crate::merge::{inspect::inspect_delta, ModelRef};
            let report = inspect_delta(&ModelRef::parse(&base), &ModelRef::parse(&model))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Job { unit } => {
            crate::cluster::driver::run_unit(&unit, crate::pipeline::jobs::run_unit)
        }
        Command::Eval(args) => eval::run(&args),
        Command::Search(args) => search::run(&args),
        Command::Run { experiment, tasks } => pipeline::run(&experiment, &tasks),
        Command::Demo { tasks } => pipeline::demo(&tasks),
        Command::Parallel { config } => pipeline::parallel(&config),
        Command::Sequential { config } => pipeline::sequential(&config),
        Command::Train(args) => train::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Score { model, text, json } => inspect::score(&model, &text, json),
        Command::Generate {
            model,
            prompt,
            chat,
            max_new_tokens,
        } => inspect::generate(&model, &prompt, chat, max_new_tokens),
    }
}
