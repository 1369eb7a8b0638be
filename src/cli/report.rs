//! `paft report`: a run directory's tables, plots and HTML page.

use std::path::PathBuf;

use anyhow::Result;

use crate::report::bootstrap::{DEFAULT_RESAMPLES, DEFAULT_SEED};
use crate::report::{default_out_dir, write_report, BootstrapSettings, ReportOptions, RowSpec};

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Run directory: journal.jsonl, evals/<row>/results.json (rows base, sft, dpo|orpo,
    /// sequential, paft, any other name; samples_<task>.jsonl and alignment_tax.json beside it
    /// give the uncertainty), deltas/*.json, searches/<name>/journal.jsonl (rows paft-<name>),
    /// stages/*.done; each optional.
    pub run_dir: PathBuf,
    /// Output directory (default: reports/<RUN_DIR's name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Another leaderboard row, named like the evals/ rows (repeatable); its samples_*.jsonl
    /// (`paft eval --log-samples --output DIR`) and alignment_tax.json are read beside it.
    #[arg(long = "add", value_name = "NAME=PATH/results.json")]
    pub add: Vec<RowSpec>,
    /// Best search candidates listed in the leaderboard.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Seed of the paired bootstrap behind the verdict table.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// Bootstrap resamples (at least 1000).
    #[arg(long, default_value_t = DEFAULT_RESAMPLES)]
    pub resamples: usize,
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => default_out_dir(&args.run_dir)?,
    };
    let opts = ReportOptions {
        adds: args.add.clone(),
        top_k: args.top,
        bootstrap: BootstrapSettings {
            seed: args.seed,
            resamples: args.resamples,
        },
    };
    let paths = write_report(&args.run_dir, &out, &opts)?;
    tracing::info!(
        "wrote {} files into {}",
        paths.files.len(),
        paths.out_dir.display()
    );
    println!("{}", paths.index_html.display());
    Ok(())
}
