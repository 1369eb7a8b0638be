//! Where the work runs: `executor = "local" | "slurm"` and the `[slurm]` table.
//!
//! ```toml
//! executor = "slurm"
//! [slurm]                 # every job
//! partition = "gpu"
//! time = "04:00:00"
//! cpus_per_task = 8
//! retries = 1             # re-submissions of a failed job before it is reported
//! parallel = 8            # candidate jobs running at once
//! poll_seconds = 5        # how often the driver asks squeue (at least 1)
//! paft_binary = "/shared/bin/paft"   # what the jobs run (default: the driver's own binary)
//! [slurm.train]           # overrides for the training jobs
//! gres = "gpu:1"
//! [slurm.eval]            # overrides for candidate and report-row evaluations
//! mem = "16G"
//! ```
//! Every key is optional; a key paft does not know is an error.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Which executor runs the stages and candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ExecutorKind {
    /// In this process (the default).
    #[default]
    Local,
    /// As Slurm jobs; this process submits, waits and collects.
    Slurm,
}

/// sbatch resources of one kind of job. Unset keys are left to the cluster's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobResources {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// `--time`, as sbatch takes it (`30`, `04:00:00`, `1-00:00:00`).
    pub time: Option<String>,
    pub cpus_per_task: Option<u32>,
    /// `--mem` (`16G`).
    pub mem: Option<String>,
    /// `--gres` (`gpu:1`).
    pub gres: Option<String>,
    /// More sbatch arguments, passed as they are (`["--constraint=a100"]`).
    #[serde(default)]
    pub extra_args: Vec<String>,
}

impl JobResources {
    /// `over`'s keys where set, else `self`'s; extra arguments add up.
    fn overlaid(&self, over: &JobResources) -> JobResources {
        let pick = |a: &Option<String>, b: &Option<String>| b.clone().or_else(|| a.clone());
        JobResources {
            partition: pick(&self.partition, &over.partition),
            account: pick(&self.account, &over.account),
            qos: pick(&self.qos, &over.qos),
            time: pick(&self.time, &over.time),
            cpus_per_task: over.cpus_per_task.or(self.cpus_per_task),
            mem: pick(&self.mem, &over.mem),
            gres: pick(&self.gres, &over.gres),
            extra_args: self
                .extra_args
                .iter()
                .chain(&over.extra_args)
                .cloned()
                .collect(),
        }
    }

    pub fn sbatch_args(&self) -> Vec<String> {
        let mut args = vec![];
        let mut push = |flag: &str, v: &Option<String>| {
            if let Some(v) = v {
                args.push(format!("--{flag}={v}"));
            }
        };
        push("partition", &self.partition);
        push("account", &self.account);
        push("qos", &self.qos);
        push("time", &self.time);
        push("cpus-per-task", &self.cpus_per_task.map(|c| c.to_string()));
        push("mem", &self.mem);
        push("gres", &self.gres);
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// The kinds of jobs, each with its own resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// An SFT or preference training run.
    Train,
    /// A merge candidate or a report row's evaluation.
    Eval,
}

/// The `[slurm]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlurmConfig {
    pub common: JobResources,
    pub train: JobResources,
    pub eval: JobResources,
    pub retries: u32,
    pub parallel: Option<usize>,
    pub poll_seconds: f64,
    /// The `paft` the jobs run (default: this one); it must be where the nodes can run it.
    pub paft_binary: Option<std::path::PathBuf>,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        Self {
            common: JobResources::default(),
            train: JobResources::default(),
            eval: JobResources::default(),
            retries: 1,
            parallel: None,
            poll_seconds: 5.0,
            paft_binary: None,
        }
    }
}

/// The table's own keys besides the resources, read with the resources' keys removed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DriverKeys {
    retries: Option<u32>,
    parallel: Option<usize>,
    poll_seconds: Option<f64>,
    paft_binary: Option<std::path::PathBuf>,
}

const DRIVER_KEYS: [&str; 4] = ["retries", "parallel", "poll_seconds", "paft_binary"];

impl SlurmConfig {
    /// Reads the `[slurm]` table (`train` and `eval` sub-tables included).
    pub fn from_table(table: &toml::Table) -> Result<Self> {
        let mut rest = table.clone();
        let sub = |rest: &mut toml::Table, name: &str| -> Result<JobResources> {
            match rest.remove(name) {
                None => Ok(JobResources::default()),
                Some(toml::Value::Table(t)) => JobResources::deserialize(t)
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .with_context(|| format!("[slurm.{name}]")),
                Some(_) => bail!("[slurm] `{name}` must be a table"),
            }
        };
        let train = sub(&mut rest, "train")?;
        let eval = sub(&mut rest, "eval")?;
        let mut driver = toml::Table::new();
        for key in DRIVER_KEYS {
            if let Some(v) = rest.remove(key) {
                driver.insert(key.into(), v);
            }
        }
        let d = DriverKeys::deserialize(driver).map_err(|e| anyhow::anyhow!("[slurm] {e}"))?;
        let common = JobResources::deserialize(rest)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("[slurm]")?;
        let defaults = Self::default();
        let cfg = Self {
            common,
            train,
            eval,
            retries: d.retries.unwrap_or(defaults.retries),
            parallel: d.parallel,
            poll_seconds: d.poll_seconds.unwrap_or(defaults.poll_seconds),
            paft_binary: d.paft_binary,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if !(self.poll_seconds >= 1.0 && self.poll_seconds.is_finite()) {
            bail!(
                "[slurm] poll_seconds must be at least 1 (a faster loop only loads the controller), got {}",
                self.poll_seconds
            );
        }
        if self.parallel == Some(0) {
            bail!("[slurm] parallel must be at least 1");
        }
        Ok(())
    }

    /// The resources of a kind of job: the common keys, overlaid with the kind's table.
    pub fn resources(&self, kind: JobKind) -> JobResources {
        match kind {
            JobKind::Train => self.common.overlaid(&self.train),
            JobKind::Eval => self.common.overlaid(&self.eval),
        }
    }

    /// Reads `executor` and `[slurm]` from a TOML file holding just those (`paft search
    /// --cluster FILE`).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("invalid TOML in {}", path.display()))?;
        let slurm = match table.remove("slurm") {
            Some(toml::Value::Table(t)) => t,
            None => toml::Table::new(),
            Some(_) => bail!("{}: `slurm` must be a table", path.display()),
        };
        if let Some(k) = table.keys().next() {
            bail!(
                "{}: unknown key `{k}` (expected only a [slurm] table)",
                path.display()
            );
        }
        Self::from_table(&slurm).with_context(|| format!("in {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SlurmConfig> {
        SlurmConfig::from_table(&toml::from_str(text).unwrap())
    }

    #[test]
    fn kinds_overlay_the_common_keys() {
        let c = parse(
            r#"
            partition = "cpu"
            time = "01:00:00"
            extra_args = ["--exclusive"]
            retries = 2
            parallel = 4
            [train]
            partition = "gpu"
            gres = "gpu:1"
            [eval]
            mem = "8G"
            "#,
        )
        .unwrap();
        assert_eq!((c.retries, c.parallel, c.poll_seconds), (2, Some(4), 5.0));
        let train = c.resources(JobKind::Train).sbatch_args();
        assert_eq!(
            train,
            [
                "--partition=gpu",
                "--time=01:00:00",
                "--gres=gpu:1",
                "--exclusive"
            ]
        );
        let eval = c.resources(JobKind::Eval).sbatch_args();
        assert_eq!(
            eval,
            [
                "--partition=cpu",
                "--time=01:00:00",
                "--mem=8G",
                "--exclusive"
            ]
        );
    }

    #[test]
    fn unknown_keys_and_fast_polls_are_errors() {
        let err = |t: &str| format!("{:#}", parse(t).unwrap_err());
        assert!(err("partiton = \"x\"").contains("partiton"));
        assert!(err("[train]\ngpus = 1").contains("[slurm.train]"));
        assert!(err("poll_seconds = 0.1").contains("at least 1"));
        assert!(err("parallel = 0").contains("parallel"));
        assert_eq!(parse("").unwrap(), SlurmConfig::default());
    }
}
