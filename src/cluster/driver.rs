//! The Slurm driver: turns units of work into jobs, waits for them and collects their results.
//!
//! A unit is a JSON payload that `paft job UNIT_FILE` knows how to run; the job writes its
//! result (or its error) atomically next to the unit, so the files in `RUN/slurm/` are the
//! truth and Slurm is only asked whether a job that has not written yet is still alive. Every
//! submission is appended to `RUN/slurm/jobs.jsonl` (unit, job id, attempt, log), so a driver
//! that was killed re-attaches to the jobs still queued or running instead of submitting them
//! again, collects the ones that finished while it was away, and re-submits the failed ones.
//!
//! The driver sleeps `poll_seconds` (at least 1 s) between looks; while it waits it uses no CPU
//! beyond one `squeue` call per look.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::config::{JobKind, SlurmConfig};
use super::slurm::{log_path, JobId, JobRequest, JobState, Slurm};
use crate::io::write_file_atomic;

/// One unit of work: `id` names its files (letters, digits, `-`, `_`, `.`); `payload` is what
/// the job reads; `after` is a unit that must succeed first (`--dependency=afterok`).
#[derive(Debug, Clone)]
pub struct Unit {
    pub id: String,
    pub payload: serde_json::Value,
    pub after: Option<String>,
}

/// A unit that did not succeed within its attempts.
#[derive(Debug, Clone)]
pub struct Failure {
    pub unit: String,
    pub job: JobId,
    pub log: PathBuf,
    /// Slurm's end state (`FAILED`, `TIMEOUT`, `CANCELLED`, …) or what went wrong otherwise.
    pub state: String,
    /// The job's own error message, when it got far enough to write one.
    pub error: Option<String>,
    pub attempts: u32,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed after {} attempt(s): Slurm job {} ended {} (log: {})",
            self.unit,
            self.attempts,
            self.job,
            self.state,
            self.log.display()
        )?;
        if let Some(e) = &self.error {
            write!(f, ": {e}")?;
        }
        Ok(())
    }
}

/// How a unit ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Done(serde_json::Value),
    Failed(Failure),
}

/// One line of `jobs.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Submission {
    unit: String,
    job: JobId,
    attempt: u32,
    log: PathBuf,
}

/// A unit with a job in Slurm.
#[derive(Debug, Clone)]
struct Running {
    unit: Unit,
    job: JobId,
    log: PathBuf,
    attempt: u32,
    /// Looks at which Slurm said COMPLETED but no result was there yet (a shared filesystem
    /// may show the file late).
    completed_without_result: u32,
}

/// Runs units as Slurm jobs from one run directory.
pub struct SlurmDriver {
    dir: PathBuf,
    cfg: SlurmConfig,
    slurm: Slurm,
    exe: PathBuf,
    /// The jobs' working directory: the driver's, so relative paths mean the same in both.
    workdir: PathBuf,
    ledger: BTreeMap<String, Submission>,
    scripts: usize,
}

/// Seconds of CPU this process has used (all threads).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given and reads nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

impl SlurmDriver {
    /// The driver of the run directory `run` (its files go to `run/slurm/`).
    pub fn open(run: &Path, cfg: SlurmConfig) -> Result<Self> {
        let slurm = Slurm::default();
        slurm.check()?;
        let dir = std::path::absolute(run.join("slurm"))?;
        for sub in ["units", "results", "scripts", "logs"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let mut ledger = BTreeMap::new();
        let path = dir.join("jobs.jsonl");
        if path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                // A torn last line is a submission whose id was never recorded: its job, if
                // any, ran without a ledger entry and its result file still counts.
                if let Ok(s) = serde_json::from_str::<Submission>(line) {
                    ledger.insert(s.unit.clone(), s);
                }
            }
        }
        let scripts = std::fs::read_dir(dir.join("scripts"))?.count();
        let exe = match &cfg.paft_binary {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("cannot find the paft binary")?,
        };
        Ok(Self {
            dir,
            cfg,
            slurm,
            exe,
            workdir: std::env::current_dir()?,
            ledger,
            scripts,
        })
    }

    pub fn unit_file(&self, id: &str) -> PathBuf {
        self.dir.join("units").join(format!("{id}.json"))
    }

    fn result_file(&self, id: &str) -> PathBuf {
        self.dir.join("results").join(format!("{id}.json"))
    }

    fn error_file(&self, id: &str) -> PathBuf {
        self.dir.join("results").join(format!("{id}.error"))
    }

    fn read_result(&self, id: &str) -> Result<Option<serde_json::Value>> {
        let path = self.result_file(id);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v = serde_json::from_str(&text)
            .with_context(|| format!("{} is not the JSON a job writes", path.display()))?;
        Ok(Some(v))
    }

    fn record(&mut self, s: Submission) -> Result<()> {
        let path = self.dir.join("jobs.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string(&s)?)?;
        f.sync_data()?;
        self.ledger.insert(s.unit.clone(), s);
        Ok(())
    }

    /// Writes a job script that runs the `i`-th unit of `units` (`$SLURM_ARRAY_TASK_ID`).
    fn write_script(&mut self, name: &str, units: &[&Unit]) -> Result<PathBuf> {
        let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
        let list: Vec<String> = units
            .iter()
            .map(|u| quote(&self.unit_file(&u.id)))
            .collect();
        let script = format!(
            "#!/bin/bash\n\
             # Written by paft: runs one unit of work of {name}.\n\
             set -eu\n\
             units=({})\n\
             unit=\"${{units[${{SLURM_ARRAY_TASK_ID:-0}}]}}\"\n\
             # Use the CPUs Slurm gave the job, not every core of the node.\n\
             if [ -n \"${{SLURM_CPUS_PER_TASK:-}}\" ]; then export RAYON_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\"; fi\n\
             exec {} job \"$unit\"\n",
            list.join(" "),
            quote(&self.exe),
        );
        self.scripts += 1;
        let path = self
            .dir
            .join("scripts")
            .join(format!("{name}-{}.sh", self.scripts));
        write_file_atomic(&path, script.as_bytes())?;
        Ok(path)
    }

    /// Submits `units` as one job each (`array` false) or as one array job; `after` is the job
    /// they wait for.
    fn submit(
        &mut self,
        kind: JobKind,
        name: &str,
        units: &[&Unit],
        array: bool,
        after: Option<&JobId>,
        attempt: u32,
    ) -> Result<Vec<Running>> {
        let mut out = vec![];
        let groups: Vec<Vec<&Unit>> = if array {
            vec![units.to_vec()]
        } else {
            units.iter().map(|u| vec![*u]).collect()
        };
        for group in groups.into_iter().filter(|g| !g.is_empty()) {
            for u in &group {
                let _ = std::fs::remove_file(self.error_file(&u.id));
            }
            let job_name = if array {
                name.to_string()
            } else {
                format!("{name}-{}", group[0].id)
            };
            let script = self.write_script(&job_name, &group)?;
            let log = if array {
                self.dir.join("logs").join(format!("{job_name}-%A_%a.log"))
            } else {
                self.dir.join("logs").join(format!("{job_name}-%j.log"))
            };
            let request = JobRequest {
                name: format!("paft-{job_name}"),
                script,
                array: array.then_some(group.len()),
                max_running: if array { self.cfg.parallel } else { None },
                after_ok: after.map(|j| vec![j.0.clone()]).unwrap_or_default(),
                resources: self.cfg.resources(kind),
                log: log.clone(),
                workdir: self.workdir.clone(),
            };
            let id = self.slurm.submit(&request)?;
            for (i, u) in group.iter().enumerate() {
                let job = if array { id.task(i) } else { id.clone() };
                let log = log_path(&log, &job);
                tracing::info!("unit {} → Slurm job {job} (attempt {attempt})", u.id);
                self.record(Submission {
                    unit: u.id.clone(),
                    job: job.clone(),
                    attempt,
                    log: log.clone(),
                })?;
                out.push(Running {
                    unit: (*u).clone(),
                    job,
                    log,
                    attempt,
                    completed_without_result: 0,
                });
            }
        }
        Ok(out)
    }

    /// Runs every unit to an outcome: already-written results are collected, jobs recorded by
    /// an earlier driver are re-attached, the rest submitted (as one array when `array`).
    /// `on_outcome` sees each unit as it ends, in the order they end.
    pub fn run(
        &mut self,
        kind: JobKind,
        name: &str,
        units: &[Unit],
        array: bool,
        on_outcome: &mut dyn FnMut(&Unit, Outcome) -> Result<()>,
    ) -> Result<()> {
        let started = (Instant::now(), cpu_seconds());
        let mut done: BTreeMap<String, bool> = BTreeMap::new();
        let mut running: Vec<Running> = vec![];
        let mut fresh: Vec<&Unit> = vec![];
        for u in units {
            let bytes = serde_json::to_vec_pretty(&u.payload)?;
            let file = self.unit_file(&u.id);
            if std::fs::read(&file).ok().as_deref() != Some(bytes.as_slice()) {
                write_file_atomic(&file, &bytes)?;
            }
            if let Some(v) = self.read_result(&u.id)? {
                done.insert(u.id.clone(), true);
                on_outcome(u, Outcome::Done(v))?;
                continue;
            }
            match self.ledger.get(&u.id).cloned() {
                Some(s) => {
                    tracing::info!("unit {}: re-attaching to Slurm job {}", u.id, s.job);
                    running.push(Running {
                        unit: u.clone(),
                        job: s.job,
                        log: s.log,
                        attempt: 1,
                        completed_without_result: 0,
                    });
                }
                None => fresh.push(u),
            }
        }
        // Units whose parent is not running yet are submitted after it.
        let (now, later): (Vec<&Unit>, Vec<&Unit>) = fresh
            .into_iter()
            .partition(|u| u.after.as_ref().is_none_or(|a| done.contains_key(a)));
        running.extend(self.submit(kind, name, &now, array, None, 1)?);
        for u in later {
            let parent = u.after.as_deref().unwrap_or_default();
            let Some(p) = running.iter().find(|r| r.unit.id == parent) else {
                bail!(
                    "unit {} waits for {parent}, which is not part of this run",
                    u.id
                );
            };
            let job = p.job.clone();
            running.extend(self.submit(kind, name, &[u], false, Some(&job), 1)?);
        }
        self.wait(kind, name, array, running, &mut done, on_outcome)?;
        let (waited, cpu) = (started.0.elapsed().as_secs_f64(), cpu_seconds() - started.1);
        tracing::info!(
            "{name}: {} unit(s) in {waited:.0}s of waiting; the driver used {cpu:.2}s of CPU",
            units.len()
        );
        self.write_stats(name, waited, cpu)
    }

    /// Appends how long the driver waited and how much CPU it used meanwhile.
    fn write_stats(&self, name: &str, waited: f64, cpu: f64) -> Result<()> {
        let path = self.dir.join("driver.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let line = serde_json::json!({"stage": name, "wait_seconds": waited, "cpu_seconds": cpu,
                                      "poll_seconds": self.cfg.poll_seconds});
        writeln!(f, "{line}")?;
        Ok(())
    }

    fn wait(
        &mut self,
        kind: JobKind,
        name: &str,
        array: bool,
        mut running: Vec<Running>,
        done: &mut BTreeMap<String, bool>,
        on_outcome: &mut dyn FnMut(&Unit, Outcome) -> Result<()>,
    ) -> Result<()> {
        let poll = Duration::from_secs_f64(self.cfg.poll_seconds.max(1.0));
        let mut first = true;
        while !running.is_empty() {
            if !first {
                std::thread::sleep(poll);
            }
            first = false;
            // Results first: a job that wrote one is done whatever Slurm says next.
            let mut still = vec![];
            for r in running {
                match self.read_result(&r.unit.id)? {
                    Some(v) => {
                        done.insert(r.unit.id.clone(), true);
                        on_outcome(&r.unit, Outcome::Done(v))?;
                    }
                    None => still.push(r),
                }
            }
            running = still;
            if running.is_empty() {
                break;
            }
            let ids: Vec<JobId> = running.iter().map(|r| r.job.clone()).collect();
            let states = match self.slurm.states(&ids) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot read job states, will ask again: {e:#}");
                    continue;
                }
            };
            let mut failed: Vec<(Running, String)> = vec![];
            let mut keep = vec![];
            for mut r in running {
                match states.get(&r.job).cloned().unwrap_or(JobState::Unknown) {
                    JobState::Alive(_) => keep.push(r),
                    JobState::Completed => {
                        r.completed_without_result += 1;
                        if r.completed_without_result >= 3 {
                            failed.push((r, "COMPLETED without writing its result".into()));
                        } else {
                            keep.push(r);
                        }
                    }
                    JobState::Failed { state, reason } => {
                        let why = if reason.is_empty() || reason == "None" {
                            state
                        } else {
                            format!("{state} ({reason})")
                        };
                        failed.push((r, why));
                    }
                    JobState::Unknown => {
                        failed.push((r, "unknown to Slurm (purged without a result)".into()))
                    }
                }
            }
            running = keep;
            self.handle_failures(kind, name, array, failed, &mut running, done, on_outcome)?;
        }
        Ok(())
    }

    /// Re-submits failed units that have attempts left (and the units waiting on them, whose
    /// old jobs Slurm cancels); reports the others.
    #[allow(clippy::too_many_arguments)]
    fn handle_failures(
        &mut self,
        kind: JobKind,
        name: &str,
        array: bool,
        failed: Vec<(Running, String)>,
        running: &mut Vec<Running>,
        done: &mut BTreeMap<String, bool>,
        on_outcome: &mut dyn FnMut(&Unit, Outcome) -> Result<()>,
    ) -> Result<()> {
        let mut retry: Vec<Running> = vec![];
        let mut failed = failed;
        // Parents first, so a child knows whether its parent is being retried.
        failed.sort_by_key(|(r, _)| r.unit.after.is_some());
        for (r, state) in failed {
            // A child cancelled because its parent failed waits for the parent's retry.
            if let Some(parent) = &r.unit.after {
                if !done.contains_key(parent) {
                    let alive = |p: &Running| &p.unit.id == parent;
                    if running.iter().any(alive) || retry.iter().any(alive) {
                        running.push(r);
                    } else {
                        done.insert(r.unit.id.clone(), false);
                        let f = self.failure(&r, format!("not run: {parent} failed"));
                        on_outcome(&r.unit, Outcome::Failed(f))?;
                    }
                    continue;
                }
            }
            let error = std::fs::read_to_string(self.error_file(&r.unit.id)).ok();
            if r.attempt <= self.cfg.retries {
                tracing::warn!(
                    "unit {}: Slurm job {} ended {state}{}; retrying (log: {})",
                    r.unit.id,
                    r.job,
                    error
                        .as_deref()
                        .map(|e| format!(": {}", e.trim()))
                        .unwrap_or_default(),
                    r.log.display()
                );
                retry.push(r);
            } else {
                done.insert(r.unit.id.clone(), false);
                let mut f = self.failure(&r, state);
                f.error = error.map(|e| e.trim().to_string());
                tracing::error!("{f}");
                on_outcome(&r.unit, Outcome::Failed(f))?;
            }
        }
        if retry.is_empty() {
            return Ok(());
        }
        let attempt = retry.iter().map(|r| r.attempt).max().unwrap_or(1) + 1;
        let units: Vec<Unit> = retry.iter().map(|r| r.unit.clone()).collect();
        let refs: Vec<&Unit> = units.iter().collect();
        let resubmitted = self.submit(kind, name, &refs, array, None, attempt)?;
        // Children of a re-submitted unit follow its new job.
        for new in &resubmitted {
            let children: Vec<usize> = (0..running.len())
                .filter(|&i| running[i].unit.after.as_deref() == Some(new.unit.id.as_str()))
                .collect();
            for i in children.into_iter().rev() {
                let child = running.remove(i);
                self.slurm.cancel(std::slice::from_ref(&child.job));
                let again = self.submit(
                    kind,
                    name,
                    &[&child.unit],
                    false,
                    Some(&new.job),
                    child.attempt,
                )?;
                running.extend(again);
            }
        }
        running.extend(resubmitted);
        Ok(())
    }

    fn failure(&self, r: &Running, state: String) -> Failure {
        Failure {
            unit: r.unit.id.clone(),
            job: r.job.clone(),
            log: r.log.clone(),
            state,
            error: None,
            attempts: r.attempt,
        }
    }
}

/// The job side: runs the unit in `file` with `work` and writes its result (or its error) where
/// the driver looks. Returns the work's error so the job exits non-zero.
pub fn run_unit(
    file: &Path,
    work: impl FnOnce(serde_json::Value) -> Result<serde_json::Value>,
) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read unit {}", file.display()))?;
    let payload: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("unit {} is not JSON", file.display()))?;
    let (Some(dir), Some(id)) = (
        file.parent().and_then(Path::parent),
        file.file_stem().and_then(|s| s.to_str()),
    ) else {
        bail!(
            "{} is not a unit file of a run's slurm directory",
            file.display()
        );
    };
    let results = dir.join("results");
    match work(payload) {
        Ok(v) => write_file_atomic(
            &results.join(format!("{id}.json")),
            &serde_json::to_vec_pretty(&v)?,
        ),
        Err(e) => {
            let _ = write_file_atomic(
                &results.join(format!("{id}.error")),
                format!("{e:#}\n").as_bytes(),
            );
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_writes_its_result_or_its_error_beside_the_units() {
        let dir = tempfile::tempdir().unwrap();
        let units = dir.path().join("units");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::create_dir_all(dir.path().join("results")).unwrap();
        let unit = units.join("u1.json");
        std::fs::write(&unit, r#"{"x": 2}"#).unwrap();
        run_unit(&unit, |v| {
            Ok(serde_json::json!({"twice": v["x"].as_i64().unwrap() * 2}))
        })
        .unwrap();
        let result = std::fs::read_to_string(dir.path().join("results/u1.json")).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&result).unwrap()["twice"],
            4
        );

        let err = run_unit(&unit, |_| Err(anyhow::anyhow!("delta unreadable"))).unwrap_err();
        assert!(format!("{err:#}").contains("delta unreadable"));
        let error = std::fs::read_to_string(dir.path().join("results/u1.error")).unwrap();
        assert!(error.contains("delta unreadable"));

        std::fs::write(&unit, "not json").unwrap();
        let err = run_unit(&unit, |_| unreachable!()).unwrap_err();
        assert!(format!("{err:#}").contains("is not JSON"), "{err:#}");
    }
}
