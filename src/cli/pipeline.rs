//! `paft run`, `paft demo`, `paft parallel`, `paft sequential`: the experiment-level commands.

use std::path::PathBuf;

use anyhow::Result;

use crate::eval::TaskStore;
use crate::pipeline::{self, demo, Experiment};

#[derive(clap::Args, Debug)]
pub struct TasksDirArg {
    /// Directory with <task>/<split>.jsonl (default: PAFT_TASKS_DIR, ../shared/data/leaderboard, or
    /// where `paft fetch tasks` writes).
    #[arg(long, env = "PAFT_TASKS_DIR")]
    pub tasks_dir: Option<PathBuf>,
}

impl TasksDirArg {
    fn dir(&self) -> PathBuf {
        self.tasks_dir
            .clone()
            .unwrap_or_else(TaskStore::default_root)
    }
}

fn finish(report: crate::report::ReportPaths) -> Result<()> {
    println!("{}", report.conclusion);
    println!("report: {}", report.index_html.display());
    Ok(())
}

pub fn run(experiment: &std::path::Path, tasks: &TasksDirArg) -> Result<()> {
    let exp = Experiment::from_file(experiment)?;
    finish(pipeline::run_experiment(&exp, &tasks.dir())?)
}

pub fn demo(tasks: &TasksDirArg) -> Result<()> {
    let exp = demo::demo_experiment(&demo::default_root())?;
    finish(pipeline::run_experiment(&exp, &tasks.dir())?)
}

pub fn parallel(config: &std::path::Path) -> Result<()> {
    let exp = Experiment::from_file(config)?;
    let (sft, pref) = pipeline::train_parallel(&exp)?;
    println!("sft: {sft}\n{}: {pref}", exp.pref_name());
    Ok(())
}

pub fn sequential(config: &std::path::Path) -> Result<()> {
    let exp = Experiment::from_file(config)?;
    let (sft, seq) = pipeline::train_sft_then_sequential(&exp)?;
    println!("sft: {sft}\nsequential: {seq}");
    Ok(())
}
