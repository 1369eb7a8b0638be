//! Past one machine: the executor setting and the Slurm driver. With `executor = "slurm"`, the
//! training runs, the merge candidates and the report rows become Slurm jobs that run the same
//! `paft` binary on `paft job UNIT_FILE`; the run directory (on a filesystem every node sees)
//! holds the units, their results and the ledger of submitted jobs.

pub mod config;
pub mod driver;
pub mod slurm;

pub use config::{ExecutorKind, JobKind, SlurmConfig};
pub use driver::{Outcome, SlurmDriver, Unit};

/// Where stages and candidates run.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Executor {
    #[default]
    Local,
    Slurm(Box<SlurmConfig>),
}

impl Executor {
    pub fn new(kind: ExecutorKind, slurm: Option<SlurmConfig>) -> anyhow::Result<Self> {
        match (kind, slurm) {
            (ExecutorKind::Local, None) => Ok(Executor::Local),
            (ExecutorKind::Local, Some(_)) => anyhow::bail!(
                "a [slurm] table is given but executor is \"local\"; set executor = \"slurm\" or remove the table"
            ),
            (ExecutorKind::Slurm, cfg) => Ok(Executor::Slurm(Box::new(cfg.unwrap_or_default()))),
        }
    }
}
