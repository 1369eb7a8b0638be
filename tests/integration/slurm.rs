//! The Slurm executor on a real one-node Slurm (`scripts/slurm-local.sh`, which `.ci/run`
//! starts): `paft run` as jobs whose training runs overlap and whose sequential job waits for
//! the SFT job, with the local executor's results; a driver killed while candidate jobs run,
//! then resumed; failed and cancelled candidate jobs reported with their job id and log.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use paft::model::tiny::TinySpec;
use paft::search::JournalEntry;
use serde_json::Value;

use crate::common::{self, paft};
use crate::search::{journal, search_cmd, tiny_models};

/// The node's state and reason as `sinfo` prints them, or None when no controller answers.
fn node_state() -> Option<(String, String)> {
    let out = Command::new("sinfo")
        .args(["-h", "-o", "%T|%E"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || text.is_empty() {
        return None;
    }
    let (state, reason) = text.lines().next()?.split_once('|')?;
    Some((state.to_string(), reason.to_string()))
}

/// Whether a node in this state takes jobs. Other tests' jobs make it `allocated`, `mixed`,
/// `completing` or `planned` (backfill reserved it for a pending job): all of those are up. A
/// trailing `*` means slurmd stopped answering.
fn usable(state: &str) -> bool {
    if state.ends_with('*') {
        return false;
    }
    const UNUSABLE: [&str; 9] = [
        "down", "drain", "fail", "maint", "unk", "inval", "power", "future", "reboot",
    ];
    !UNUSABLE.iter().any(|s| state.contains(s))
}

/// The one-node cluster's CPUs are few, so the tests take turns: one test's jobs would
/// otherwise hold the CPUs another test's overlap check needs.
static NODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether no job is pending, running or completing (finished jobs stay listed by `-t all`).
fn queue_empty() -> bool {
    Command::new("squeue")
        .args(["-h", "-o", "%i"])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.iter().all(|b| b.is_ascii_whitespace()))
}

/// The node for this test alone, once it is up and the previous test's jobs have left it
/// (waiting a while for both). CI must have a node (`.ci/run` starts it); elsewhere the test is
/// skipped with a message.
fn require_slurm() -> Option<std::sync::MutexGuard<'static, ()>> {
    let guard = NODE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = node_state();
    while last.is_some()
        && !(last.as_ref().is_some_and(|(s, _)| usable(s)) && queue_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_secs(2));
        last = node_state();
    }
    match &last {
        Some((state, _)) if usable(state) => return Some(guard),
        _ => {}
    }
    let msg = match &last {
        None => "no Slurm controller answers (start one with scripts/slurm-local.sh)".to_string(),
        Some((state, reason)) => format!(
            "the Slurm node is '{state}' (reason: {reason}); scripts/slurm-local.sh start resumes it"
        ),
    };
    if std::env::var_os("CI").is_some() {
        panic!("{msg}: CI must have a usable Slurm node");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Start and end of a finished job, in seconds since the epoch, from Slurm's own records
/// (`sacct`, through the job completion log where there is no accounting database).
fn job_times(id: &str) -> (i64, i64) {
    let parse = |t: &str| {
        let out = Command::new("date")
            .args(["-d", t, "+%s"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    for args in [
        vec!["-n", "-P", "-X", "-o", "JobID,Start,End", "-j", id],
        vec!["-c", "-n", "-P", "-o", "JobID,Start,End", "-j", id],
    ] {
        let out = Command::new("sacct").args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if let Some(line) = text.lines().find(|l| l.starts_with(&format!("{id}|"))) {
            let f: Vec<&str> = line.split('|').collect();
            return (parse(f[1]), parse(f[2]));
        }
    }
    panic!("sacct does not know job {id}");
}

/// Every result a row's results.json reports, by task and metric.
fn row_metrics(run: &Path, row: &str) -> BTreeMap<String, Value> {
    let v = read_json(&run.join("evals").join(row).join("results.json"));
    v["results"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn stripped(j: &[JournalEntry]) -> BTreeSet<String> {
    j.iter()
        .map(|e| {
            format!(
                "{} {} {} {:?} {}",
                e.index, e.key, e.rung, e.scores, e.objective
            )
        })
        .collect()
}

#[test]
fn a_slurm_run_trains_in_parallel_and_matches_the_local_run() {
    let Some(_node) = require_slurm() else {
        return;
    };
    let Some(base) = common::tiny_model(&TinySpec::llama(5)) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let run = |dir: &Path, slurm: bool| {
        std::fs::create_dir_all(dir).unwrap();
        // Four steps, so each training job runs for seconds (Slurm's times have 1 s steps).
        let mut text =
            crate::pipeline::experiment(base.path(), dir).replace("max_steps = 2", "max_steps = 4");
        if slurm {
            text = text.replacen(
                "name = \"tiny\"",
                "name = \"tiny\"\n        executor = \"slurm\"",
                1,
            );
            text += "\n[slurm]\ncpus_per_task = 1\npoll_seconds = 1\nretries = 0\n";
        } else {
            text = text.replacen("name = \"tiny\"", "name = \"tiny\"\n        threads = 2", 1);
        }
        let file = dir.join("experiment.toml");
        std::fs::write(&file, text).unwrap();
        let out = paft()
            .args(["--quiet", "run"])
            .arg(&file)
            .env("PAFT_TASKS_DIR", common::shared_tasks_dir())
            .output()
            .unwrap();
        common::expect_success(&out);
        dir.join("runs").join("tiny")
    };
    let local = run(&work.path().join("local"), false);
    let slurm = run(&work.path().join("slurm"), true);

    // The training jobs: SFT and DPO ran at the same time, the sequential job after the SFT.
    let ledger = jsonl(&slurm.join("slurm").join("jobs.jsonl"));
    let job_of = |unit: &str| -> String {
        let e = ledger
            .iter()
            .find(|e| e["unit"] == unit)
            .unwrap_or_else(|| panic!("no job for {unit} in {ledger:?}"));
        e["job"].as_str().unwrap().to_string()
    };
    let (sft, dpo, seq) = (
        job_times(&job_of("train-sft")),
        job_times(&job_of("train-dpo")),
        job_times(&job_of("train-sequential-dpo")),
    );
    eprintln!("job times (start, end): sft {sft:?} dpo {dpo:?} sequential {seq:?}");
    assert!(
        sft.0 < dpo.1 && dpo.0 < sft.1,
        "SFT {sft:?} and DPO {dpo:?} did not overlap"
    );
    assert!(
        seq.0 >= sft.1,
        "sequential {seq:?} started before SFT ended {sft:?}"
    );
    // Candidates and report rows were jobs too.
    assert!(ledger
        .iter()
        .any(|e| e["unit"].as_str().unwrap().starts_with("candidate-r0-")));
    for row in ["base", "sft", "dpo", "sequential", "paft"] {
        job_of(&format!("eval-{row}"));
    }

    // The same journal, best candidate and report rows as the local executor.
    let (a, b) = (journal(&local), journal(&slurm));
    assert_eq!(stripped(&a), stripped(&b));
    let best = |run: &Path| read_json(&run.join("search-summary.json"))["best"]["key"].clone();
    assert_eq!(best(&local), best(&slurm));
    for row in ["base", "sft", "dpo", "sequential", "paft"] {
        assert_eq!(row_metrics(&local, row), row_metrics(&slurm, row), "{row}");
    }
    // The driver slept between looks: its CPU while waiting is a small share of the wait.
    for s in jsonl(&slurm.join("slurm").join("driver.jsonl")) {
        let (wait, cpu) = (
            s["wait_seconds"].as_f64().unwrap(),
            s["cpu_seconds"].as_f64().unwrap(),
        );
        eprintln!("driver: {s}");
        assert!(
            cpu <= 0.5 + 0.05 * wait,
            "driver CPU {cpu:.2}s over {wait:.1}s: {s}"
        );
    }
}

const GRID: &str = r#"
[search]
methods = ["ties"]
solver = "grid"
grid_points = 3
evaluations = 9
seed = 0
[params]
"sft.weight" = { low = 0.0, high = 1.5 }
"pref.weight" = { low = 0.0, high = 1.5 }
"sft.density" = 0.5
"pref.density" = 0.5
[subset]
tasks = "arc_challenge,winogrande"
docs = 3
seed = 0
rungs = [4]
promote = 0.34
finalists = 0
"#;

fn slurm_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("slurm.toml");
    std::fs::write(
        &path,
        format!("[slurm]\ncpus_per_task = 1\npoll_seconds = 1\n{extra}\n"),
    )
    .unwrap();
    path
}

#[test]
fn a_killed_driver_reattaches_to_its_jobs_and_loses_nothing() {
    let Some(_node) = require_slurm() else {
        return;
    };
    let Some(m) = tiny_models() else { return };
    let work = tempfile::tempdir().unwrap();
    let space = work.path().join("space.toml");
    std::fs::write(&space, GRID).unwrap();
    let reference = work.path().join("local");
    common::expect_success(&search_cmd(&m, &space, &reference).output().unwrap());

    let out = work.path().join("slurm");
    let cfg = slurm_config(work.path(), "parallel = 2\nretries = 1");
    let slurm_search = || {
        let mut c = search_cmd(&m, &space, &out);
        c.args(["--executor", "slurm", "--slurm-config"]).arg(&cfg);
        c
    };
    let mut driver = slurm_search()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some candidates are done and others are still queued or running.
    let results = out.join("slurm").join("results");
    let start = Instant::now();
    loop {
        let done = std::fs::read_dir(&results).map(|d| d.count()).unwrap_or(0);
        if done >= 2 {
            break;
        }
        assert!(
            driver.try_wait().unwrap().is_none(),
            "the search ended first"
        );
        assert!(start.elapsed() < Duration::from_secs(600), "no progress");
        std::thread::sleep(Duration::from_millis(100));
    }
    driver.kill().unwrap();
    driver.wait().unwrap();
    let submitted_before = jsonl(&out.join("slurm").join("jobs.jsonl")).len();
    assert!(submitted_before >= 3, "{submitted_before} jobs submitted");

    let resumed = slurm_search().arg("--resume").output().unwrap();
    common::expect_success(&resumed);
    let (a, b) = (journal(&reference), journal(&out));
    // Every candidate journaled exactly once, with the local run's numbers.
    let mut keys: Vec<(String, usize)> = b.iter().map(|e| (e.key.clone(), e.rung)).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), b.len(), "a candidate was journaled twice");
    assert_eq!(stripped(&a), stripped(&b));
    let best = |run: &Path| read_json(&run.join("search-summary.json"))["best"]["key"].clone();
    assert_eq!(best(&reference), best(&out));
    // The resumed driver re-attached instead of submitting the screening jobs again.
    let ledger = jsonl(&out.join("slurm").join("jobs.jsonl"));
    let mut per_unit: BTreeMap<String, usize> = BTreeMap::new();
    for e in &ledger {
        *per_unit
            .entry(e["unit"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(
        per_unit.values().all(|&n| n == 1),
        "re-submitted: {per_unit:?}"
    );
}

/// A job binary that fails for chosen candidates: always for (0, 0), on its first attempt for
/// (1.5, 1.5), and hangs for (0.75, 0.75) until it is cancelled; the rest run paft.
fn faulty_binary(dir: &Path) -> PathBuf {
    let path = dir.join("faulty-paft.sh");
    let script = format!(
        r#"#!/bin/bash
unit="$2"
# The params are pretty-printed in name order: pref.weight ends with a comma, sft.weight is last.
has() {{ grep -Eq "\"pref.weight\": $1,$" "$unit" && grep -Eq "\"sft.weight\": $1$" "$unit"; }}
if has 0.0; then echo "injected failure: cannot read the delta" >&2; exit 3; fi
if has 1.5 && [ ! -e "{mark}" ]; then touch "{mark}"; echo "first attempt fails" >&2; exit 4; fi
if has 0.75; then sleep 600; fi
exec "{paft}" "$@"
"#,
        mark = dir.join("first-attempt").display(),
        paft = env!("CARGO_BIN_EXE_paft"),
    );
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn failed_and_cancelled_candidate_jobs_are_reported_not_waited_for() {
    let Some(_node) = require_slurm() else {
        return;
    };
    let Some(m) = tiny_models() else { return };
    let work = tempfile::tempdir().unwrap();
    let space = work.path().join("space.toml");
    std::fs::write(&space, GRID.replace("rungs = [4]", "rungs = []")).unwrap();
    let binary = faulty_binary(work.path());
    let cfg = slurm_config(
        work.path(),
        &format!(
            "retries = 1\nparallel = 3\npaft_binary = \"{}\"",
            binary.display()
        ),
    );
    let out = work.path().join("run");
    let mut driver = search_cmd(&m, &space, &out)
        .args(["--executor", "slurm", "--slurm-config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Cancel the hanging candidate's job whenever it runs (each attempt), as a user would.
    let ledger_path = out.join("slurm").join("jobs.jsonl");
    let start = Instant::now();
    let mut cancelled = BTreeSet::new();
    while driver.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the driver hangs"
        );
        for e in jsonl(&ledger_path) {
            let unit = out
                .join("slurm")
                .join("units")
                .join(format!("{}.json", e["unit"].as_str().unwrap()));
            let text = std::fs::read_to_string(&unit).unwrap_or_default();
            let job = e["job"].as_str().unwrap().to_string();
            if text.contains("\"sft.weight\": 0.75\n")
                && text.contains("\"pref.weight\": 0.75,")
                && !cancelled.contains(&job)
            {
                let state = Command::new("squeue")
                    .args(["-h", "-t", "all", "-o", "%T", "-j", &job])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&state.stdout).trim() == "RUNNING" {
                    Command::new("scancel").arg(&job).status().unwrap();
                    cancelled.insert(job);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let output = driver.wait_with_output().unwrap();
    common::expect_success(&output);
    assert_eq!(cancelled.len(), 2, "the hanging job ran twice (one retry)");
    let summary = read_json(&out.join("search-summary.json"));
    let failed = summary["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 2, "{summary}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for f in failed {
        let job = f["job"].as_str().unwrap();
        let log = PathBuf::from(f["log"].as_str().unwrap());
        assert!(log.exists(), "{}", log.display());
        assert!(
            stderr.contains(job) && stderr.contains(&log.display().to_string()),
            "{stderr}"
        );
        if f["key"].as_str().unwrap().contains("pref.weight=0|") {
            assert!(f["state"].as_str().unwrap().starts_with("FAILED"), "{f}");
            assert!(f["error"].is_null(), "{f}");
            let log_text = std::fs::read_to_string(&log).unwrap();
            assert!(log_text.contains("injected failure"), "{log_text}");
        } else {
            assert!(f["state"].as_str().unwrap().starts_with("CANCELLED"), "{f}");
        }
    }
    // The candidate that failed once was retried and scored; the other six were scored once.
    let j = journal(&out);
    assert_eq!(j.len(), 7);
    assert!(j
        .iter()
        .any(|e| e.key.contains("pref.weight=1.5|") && e.key.ends_with("sft.weight=1.5")));
}

#[test]
fn the_sequential_job_follows_a_retried_sft_job() {
    let Some(_node) = require_slurm() else {
        return;
    };
    let Some(base) = common::tiny_model(&TinySpec::llama(5)) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    // The SFT job's first attempt fails; Slurm then cancels the sequential job that waited for
    // it, and the driver must submit it again behind the SFT job's second attempt.
    let binary = work.path().join("flaky-paft.sh");
    std::fs::write(
        &binary,
        format!(
            "#!/bin/bash\nif grep -q '\"stage\": \"sft\"' \"$2\" && [ ! -e '{mark}' ]; then touch '{mark}'; \
             echo 'first SFT attempt fails' >&2; exit 5; fi\nexec '{paft}' \"$@\"\n",
            mark = work.path().join("failed-once").display(),
            paft = env!("CARGO_BIN_EXE_paft"),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = crate::pipeline::experiment(base.path(), work.path()).replacen(
        "name = \"tiny\"",
        "name = \"tiny\"\n        executor = \"slurm\"",
        1,
    ) + &format!(
        "\n[slurm]\npoll_seconds = 1\nretries = 1\npaft_binary = \"{}\"\n",
        binary.display()
    );
    let file = work.path().join("experiment.toml");
    std::fs::write(&file, text).unwrap();
    let out = paft()
        .args(["--quiet", "sequential", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    common::expect_success(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("sequential: "), "{stdout}");
    let run = work.path().join("runs").join("tiny");
    assert!(run
        .join("train")
        .join("sequential-dpo")
        .join("adapter")
        .exists());
    let ledger = jsonl(&run.join("slurm").join("jobs.jsonl"));
    let jobs = |unit: &str| -> Vec<String> {
        ledger
            .iter()
            .filter(|e| e["unit"] == unit)
            .map(|e| e["job"].as_str().unwrap().to_string())
            .collect()
    };
    let (sft, seq) = (jobs("train-sft"), jobs("train-sequential-dpo"));
    assert_eq!(sft.len(), 2, "{ledger:?}");
    assert_eq!(seq.len(), 2, "{ledger:?}");
    let (sft2, seq2) = (job_times(&sft[1]), job_times(&seq[1]));
    assert!(
        seq2.0 >= sft2.1,
        "sequential {seq2:?} before the SFT retry ended {sft2:?}"
    );
}
