//! `paft search`: an evaluation-driven merge search over a space file.

use std::path::PathBuf;

use anyhow::Result;

use crate::cluster::{Executor, ExecutorKind, SlurmConfig};
use crate::eval::TaskStore;
use crate::model;
use crate::search::{run_search, MergeInputs, SearchOptions, SearchSpace, SolverKind};

#[derive(clap::Args, Debug)]
pub struct SearchArgs {
    /// Search space (TOML; see search-spaces/).
    #[arg(long)]
    pub space: PathBuf,
    /// The base model both fine-tunes started from.
    #[arg(long)]
    pub base: String,
    /// The SFT model (directory, Hub id, or BASE+ADAPTER_DIR).
    #[arg(long)]
    pub sft: String,
    /// The preference model (DPO/ORPO; directory, Hub id, or BASE+ADAPTER_DIR).
    #[arg(long)]
    pub pref: String,
    /// Run directory: journal, best model, summary.
    #[arg(long)]
    pub out: PathBuf,
    /// Overrides the space's solver.
    #[arg(long, value_enum)]
    pub solver: Option<SolverKind>,
    /// Continue a killed search; nothing already in the journal is evaluated again.
    #[arg(long)]
    pub resume: bool,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Directory with <task>/<split>.jsonl (default: PAFT_TASKS_DIR, ../shared/data/leaderboard, or
    /// where `paft fetch tasks` writes).
    #[arg(long, env = "PAFT_TASKS_DIR")]
    pub tasks_dir: Option<PathBuf>,
    /// Where candidates are scored: here, or as Slurm job arrays.
    #[arg(long, value_enum, default_value = "local")]
    pub executor: ExecutorKind,
    /// A TOML file with the `[slurm]` table (partition, time, cpus_per_task, gres, retries,
    /// parallel, …) for `--executor slurm`.
    #[arg(long)]
    pub slurm_config: Option<PathBuf>,
}

pub fn run(args: &SearchArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.space)
        .map_err(|e| anyhow::anyhow!("cannot read search space {}: {e}", args.space.display()))?;
    let space = SearchSpace::from_file(&args.space)?;
    let slurm = args
        .slurm_config
        .as_deref()
        .map(SlurmConfig::from_file)
        .transpose()?;
    let opts = SearchOptions {
        executor: Executor::new(args.executor, slurm)?,
        out: args.out.clone(),
        solver: args.solver,
        resume: args.resume,
        device: model::parse_device(&args.device)?,
        tasks_dir: args
            .tasks_dir
            .clone()
            .unwrap_or_else(TaskStore::default_root),
    };
    let inputs = MergeInputs {
        base: args.base.clone(),
        sft: args.sft.clone(),
        pref: args.pref.clone(),
    };
    let summary = run_search(&space, &text, inputs, &opts)?;
    print!("{}", crate::search::run::best_table(&summary));
    println!(
        "best model: {}",
        crate::search::run::RunFiles::best_model(&args.out).display()
    );
    Ok(())
}
