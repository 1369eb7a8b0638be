//! The six Open LLM Leaderboard tasks, one file each, and the names they are selected by.

pub mod arc;
pub mod gsm8k;
pub mod hellaswag;
pub mod mmlu;
pub mod truthfulqa;
pub mod winogrande;

use anyhow::{bail, Result};

use super::store::TaskStore;
use super::task::{Benchmark, Task};

/// Options that change how tasks are built.
#[derive(Debug, Clone, Default)]
pub struct TaskOptions {
    /// TruthfulQA mc2 with the leaderboard's true set (answers before the first false one).
    pub legacy_mc2_true_set: bool,
    /// MMLU's shots drawn from every subject's dev rows under one description (the shared-shot
    /// mode's, so that all of MMLU shares one prefix).
    pub mmlu_pooled_shots: bool,
    /// GSM8K by generation (lm-eval's) or by the gold solution's likelihood (screening).
    pub gsm8k_scoring: gsm8k::Gsm8kScoring,
}

/// A task name or group as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskSpec {
    Benchmark(Benchmark),
    MmluSubject(String),
}

/// Parses `leaderboard`, the six task names and `mmlu_<subject>`, comma separated.
pub fn parse_task_list(list: &str) -> Result<Vec<TaskSpec>> {
    let mut out: Vec<TaskSpec> = vec![];
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let specs = match name {
            "leaderboard" | "openllm" => Benchmark::ALL.map(TaskSpec::Benchmark).to_vec(),
            other => match Benchmark::ALL.iter().find(|b| b.task_name() == other) {
                Some(b) => vec![TaskSpec::Benchmark(*b)],
                None => match other.strip_prefix("mmlu_") {
                    Some(s) if !s.is_empty() => vec![TaskSpec::MmluSubject(s.to_string())],
                    _ => bail!(
                        "unknown task {other:?}; known tasks: leaderboard (all six), {}, and \
                         mmlu_<subject> for one MMLU subject",
                        Benchmark::ALL.map(|b| b.task_name()).join(", ")
                    ),
                },
            },
        };
        for s in specs {
            if !out.contains(&s) {
                out.push(s);
            }
        }
    }
    if out.is_empty() {
        bail!("no tasks given");
    }
    Ok(out)
}

/// Loads the selected tasks from the store (MMLU as one task per subject).
pub fn load_tasks(
    store: &TaskStore,
    specs: &[TaskSpec],
    opts: &TaskOptions,
) -> Result<Vec<Box<dyn Task>>> {
    let mut tasks: Vec<Box<dyn Task>> = vec![];
    let subjects: Vec<String> = specs
        .iter()
        .filter_map(|s| match s {
            TaskSpec::MmluSubject(x) => Some(x.clone()),
            _ => None,
        })
        .collect();
    let whole_mmlu = specs.contains(&TaskSpec::Benchmark(Benchmark::Mmlu));
    for b in Benchmark::ALL {
        match b {
            Benchmark::Mmlu if whole_mmlu || !subjects.is_empty() => {
                let only = (!whole_mmlu).then_some(subjects.as_slice());
                let loaded = mmlu::load(store, only, opts.mmlu_pooled_shots)?;
                if let Some(only) = only {
                    for s in only {
                        if !loaded.iter().any(|t| t.name == format!("mmlu_{s}")) {
                            bail!(
                                "unknown MMLU subject {s:?} (no test documents with that subject)"
                            );
                        }
                    }
                }
                tasks.extend(loaded.into_iter().map(|t| Box::new(t) as Box<dyn Task>));
            }
            _ if !specs.contains(&TaskSpec::Benchmark(b)) => {}
            Benchmark::Arc => tasks.push(Box::new(arc::load(store)?)),
            Benchmark::HellaSwag => tasks.push(Box::new(hellaswag::load(store)?)),
            Benchmark::TruthfulQa => {
                tasks.push(Box::new(truthfulqa::load(store, opts.legacy_mc2_true_set)?))
            }
            Benchmark::Winogrande => tasks.push(Box::new(winogrande::load(store)?)),
            Benchmark::Gsm8k => tasks.push(Box::new(gsm8k::load(store, opts.gsm8k_scoring)?)),
            Benchmark::Mmlu => {}
        }
    }
    Ok(tasks)
}
