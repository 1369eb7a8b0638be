//! The Slurm commands paft uses, and nothing else: `sbatch --parsable` to submit, `squeue -t all`
//! to read states (with `sacct` as the fallback for jobs squeue has already forgotten) and
//! `scancel`. Every call is a real Slurm command; there is no scheduler of paft's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::config::JobResources;

/// One job, or one task of an array job: `123` or `123_4`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct JobId(pub String);

impl JobId {
    /// Task `index` of the array job `self`.
    pub fn task(&self, index: usize) -> JobId {
        JobId(format!("{}_{index}", self.0))
    }

    /// The job id without the task index (what `scancel` and `--dependency` take for a job).
    pub fn array(&self) -> &str {
        self.0.split('_').next().unwrap_or(&self.0)
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a job stands, as far as the driver cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Queued, running or finishing: wait.
    Alive(String),
    /// Ended normally (exit code 0).
    Completed,
    /// Ended otherwise: the Slurm state (`FAILED`, `TIMEOUT`, `CANCELLED`, `NODE_FAIL`, …) and
    /// squeue's reason.
    Failed { state: String, reason: String },
    /// Slurm no longer knows the job (purged after MinJobAge, and no accounting).
    Unknown,
}

impl JobState {
    fn from_slurm(state: &str, reason: &str) -> Self {
        // `CANCELLED by 0` in sacct; squeue prints the bare word.
        let state = state.split_whitespace().next().unwrap_or(state);
        match state {
            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED"
            | "REQUEUE_FED" | "REQUEUE_HOLD" | "RESIZING" | "SIGNALING" | "STAGE_OUT"
            | "STOPPED" | "RESV_DEL_HOLD" => JobState::Alive(state.to_string()),
            "COMPLETED" => JobState::Completed,
            _ => JobState::Failed {
                state: state.to_string(),
                reason: reason.to_string(),
            },
        }
    }
}

/// A job to submit: `argv` runs once per array task (`$SLURM_ARRAY_TASK_ID` picks the task's
/// unit), or once for a single job.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub name: String,
    pub script: PathBuf,
    /// Array tasks `0..n` (None: a single job).
    pub array: Option<usize>,
    /// Most array tasks running at once (`%N`).
    pub max_running: Option<usize>,
    /// Jobs that must end successfully first (`afterok`).
    pub after_ok: Vec<String>,
    pub resources: JobResources,
    /// `--output`; `%A_%a` / `%j` patterns as sbatch takes them.
    pub log: PathBuf,
    pub workdir: PathBuf,
}

/// The Slurm client: the commands, run with the configured binaries' directory.
#[derive(Debug, Clone, Default)]
pub struct Slurm {
    /// Where sbatch/squeue/sacct/scancel live (default: PATH).
    pub bin_dir: Option<PathBuf>,
}

impl Slurm {
    fn command(&self, name: &str) -> Command {
        match &self.bin_dir {
            Some(dir) => Command::new(dir.join(name)),
            None => Command::new(name),
        }
    }

    /// Whether `sbatch` can be run at all (for a clear error before anything is submitted).
    pub fn check(&self) -> Result<()> {
        let out = self.command("sbatch").arg("--version").output();
        match out {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => bail!(
                "`sbatch --version` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => bail!(
                "executor = \"slurm\" needs Slurm's `sbatch` on PATH ({e}); on a laptop, \
                 scripts/slurm-local.sh starts a one-node cluster"
            ),
        }
    }

    /// Submits `job`; returns its id (the array's id for an array).
    pub fn submit(&self, job: &JobRequest) -> Result<JobId> {
        let mut cmd = self.command("sbatch");
        cmd.arg("--parsable")
            .arg(format!("--job-name={}", job.name))
            .arg(format!("--output={}", job.log.display()))
            .arg(format!("--chdir={}", job.workdir.display()))
            // A job waiting on a failed parent would otherwise stay pending forever.
            .arg("--kill-on-invalid-dep=yes");
        if let Some(n) = job.array {
            let throttle = job.max_running.map(|m| format!("%{m}")).unwrap_or_default();
            cmd.arg(format!("--array=0-{}{throttle}", n.saturating_sub(1)));
        }
        if !job.after_ok.is_empty() {
            cmd.arg(format!("--dependency=afterok:{}", job.after_ok.join(":")));
        }
        cmd.args(job.resources.sbatch_args());
        cmd.arg(&job.script);
        let out = cmd
            .output()
            .with_context(|| format!("cannot run sbatch for {}", job.name))?;
        if !out.status.success() {
            bail!(
                "sbatch refused job {}: {}",
                job.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // `--parsable` prints `id` or `id;cluster`.
        let id = text.trim().split(';').next().unwrap_or("").trim();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            bail!("sbatch printed no job id for {}: {text:?}", job.name);
        }
        Ok(JobId(id.to_string()))
    }

    /// States of the given jobs and array tasks. Ids squeue does not know (purged) are looked up
    /// with sacct; what neither knows is `Unknown`. A controller that cannot be reached is an
    /// error, so the caller retries rather than declaring jobs lost.
    pub fn states(&self, ids: &[JobId]) -> Result<BTreeMap<JobId, JobState>> {
        let mut out = BTreeMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let arrays: std::collections::BTreeSet<&str> = ids.iter().map(|i| i.array()).collect();
        let list = arrays.into_iter().collect::<Vec<_>>().join(",");
        let result = self
            .command("squeue")
            .args(["-h", "-t", "all", "-o", "%i|%T|%r", "-j", &list])
            .output()
            .context("cannot run squeue")?;
        let stderr = String::from_utf8_lossy(&result.stderr);
        if !result.status.success() && !stderr.contains("Invalid job id") {
            bail!("squeue failed: {}", stderr.trim());
        }
        let mut seen: BTreeMap<String, JobState> = BTreeMap::new();
        for line in String::from_utf8_lossy(&result.stdout).lines() {
            let f: Vec<&str> = line.split('|').collect();
            if let [id, state, reason] = f[..] {
                seen.insert(id.to_string(), JobState::from_slurm(state, reason));
            }
        }
        let mut missing = vec![];
        for id in ids {
            match lookup(&seen, id) {
                Some(s) => {
                    out.insert(id.clone(), s);
                }
                None => missing.push(id.clone()),
            }
        }
        for (id, state) in self.sacct_states(&missing) {
            out.insert(id, state);
        }
        Ok(out)
    }

    /// sacct's view of jobs squeue has forgotten; `Unknown` where accounting is off or silent.
    fn sacct_states(&self, ids: &[JobId]) -> Vec<(JobId, JobState)> {
        if ids.is_empty() {
            return vec![];
        }
        let list = ids
            .iter()
            .map(|i| i.0.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let out = self
            .command("sacct")
            .args(["-n", "-P", "-X", "-o", "JobID,State", "-j", &list])
            .output();
        let mut seen = BTreeMap::new();
        if let Some(o) = out.ok().filter(|o| o.status.success()) {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                if let Some((id, state)) = line.split_once('|') {
                    seen.insert(id.to_string(), JobState::from_slurm(state, ""));
                }
            }
        }
        ids.iter()
            .map(|id| (id.clone(), seen.remove(&id.0).unwrap_or(JobState::Unknown)))
            .collect()
    }

    /// Cancels jobs (best effort: an id that already ended is not an error).
    pub fn cancel(&self, ids: &[JobId]) {
        if ids.is_empty() {
            return;
        }
        let _ = self
            .command("scancel")
            .args(ids.iter().map(|i| i.0.clone()))
            .output();
    }
}

/// A task's state: its own line, or its array's still-pending line (`12_[0-3%2]`).
fn lookup(seen: &BTreeMap<String, JobState>, id: &JobId) -> Option<JobState> {
    if let Some(s) = seen.get(&id.0) {
        return Some(s.clone());
    }
    let (array, task) = id.0.split_once('_')?;
    let task: usize = task.parse().ok()?;
    seen.iter().find_map(|(k, s)| {
        let range = k
            .strip_prefix(array)?
            .strip_prefix("_[")?
            .strip_suffix(']')?;
        let range = range.split('%').next()?;
        range
            .split(',')
            .any(|part| match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (a.parse::<usize>(), b.parse::<usize>());
                    matches!((a, b), (Ok(a), Ok(b)) if (a..=b).contains(&task))
                }
                None => part.parse::<usize>() == Ok(task),
            })
            .then(|| s.clone())
    })
}

/// The log file of a job or array task, from the `--output` pattern it was submitted with.
pub fn log_path(pattern: &Path, id: &JobId) -> PathBuf {
    let (array, task) = match id.0.split_once('_') {
        Some((a, t)) => (a, t),
        None => (id.0.as_str(), ""),
    };
    let text = pattern
        .display()
        .to_string()
        .replace("%A", array)
        .replace("%a", task)
        .replace("%j", array);
    PathBuf::from(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_to_what_the_driver_does() {
        assert_eq!(
            JobState::from_slurm("PENDING", "Dependency"),
            JobState::Alive("PENDING".into())
        );
        assert_eq!(
            JobState::from_slurm("COMPLETED", "None"),
            JobState::Completed
        );
        assert!(matches!(
            JobState::from_slurm("CANCELLED by 0", ""),
            JobState::Failed { state, .. } if state == "CANCELLED"
        ));
        assert!(matches!(
            JobState::from_slurm("TIMEOUT", "TimeLimit"),
            JobState::Failed { .. }
        ));
    }

    #[test]
    fn pending_array_ranges_cover_their_tasks() {
        let mut seen = BTreeMap::new();
        seen.insert(
            "12_[0-3,7%2]".to_string(),
            JobState::Alive("PENDING".into()),
        );
        seen.insert("12_5".to_string(), JobState::Completed);
        let id = |s: &str| JobId(s.to_string());
        assert_eq!(
            lookup(&seen, &id("12_2")),
            Some(JobState::Alive("PENDING".into()))
        );
        assert_eq!(
            lookup(&seen, &id("12_7")),
            Some(JobState::Alive("PENDING".into()))
        );
        assert_eq!(lookup(&seen, &id("12_5")), Some(JobState::Completed));
        assert_eq!(lookup(&seen, &id("12_6")), None);
        assert_eq!(lookup(&seen, &id("13_0")), None);
    }

    #[test]
    fn log_paths_fill_the_patterns() {
        let p = Path::new("/r/logs/cand-%A_%a.log");
        assert_eq!(
            log_path(p, &JobId("7_3".into())),
            Path::new("/r/logs/cand-7_3.log")
        );
        let p = Path::new("/r/logs/train-%j.log");
        assert_eq!(
            log_path(p, &JobId("9".into())),
            Path::new("/r/logs/train-9.log")
        );
    }
}
