//! `paft search` end to end on tiny models and the shared task data: the journal, SIGKILL and
//! resume, the best model and its mergekit YAML, and bad input.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use paft::model::tiny::TinySpec;
use paft::search::{Journal, JournalEntry};

use crate::common::{self, expect_clean_failure, paft};

const SPACE: &str = r#"
[search]
methods = ["ties"]
solver = "nelder_mead"
evaluations = 7
seed = 0
[params]
"sft.weight" = { low = 0.0, high = 1.5 }
"pref.weight" = { low = 0.0, high = 1.5 }
"sft.density" = 0.5
"pref.density" = 0.5
[initial]
"sft.weight" = 1.0
"pref.weight" = 1.0
[subset]
tasks = "arc_challenge,winogrande,truthfulqa_mc2"
docs = 3
seed = 0
rungs = [5]
promote = 0.3
finalists = 0
"#;

pub(crate) struct Models {
    _dirs: Vec<tempfile::TempDir>,
    base: String,
    sft: String,
    pref: String,
}

pub(crate) fn tiny_models() -> Option<Models> {
    let dirs: Vec<_> = [1, 2, 3]
        .into_iter()
        .map(|seed| common::tiny_model(&TinySpec::llama(seed)))
        .collect::<Option<_>>()?;
    let p = |i: usize| dirs[i].path().display().to_string();
    Some(Models {
        base: p(0),
        sft: p(1),
        pref: p(2),
        _dirs: dirs,
    })
}

pub(crate) fn search_cmd(m: &Models, space: &Path, out: &Path) -> Command {
    let mut c = paft();
    c.args(["--quiet", "search", "--space"])
        .arg(space)
        .args([
            "--base", &m.base, "--sft", &m.sft, "--pref", &m.pref, "--out",
        ])
        .arg(out)
        .env("PAFT_TASKS_DIR", common::shared_tasks_dir());
    c
}

pub(crate) fn journal(out: &Path) -> Vec<JournalEntry> {
    Journal::read(&out.join("journal.jsonl")).unwrap()
}

#[test]
fn a_killed_search_resumes_without_reevaluating_and_ends_with_the_same_best() {
    let Some(m) = tiny_models() else { return };
    let work = tempfile::tempdir().unwrap();
    let space = work.path().join("space.toml");
    std::fs::write(&space, SPACE).unwrap();

    // Uninterrupted reference run.
    let full = work.path().join("full");
    let out = search_cmd(&m, &space, &full).output().unwrap();
    crate::common::expect_success(&out);
    let reference = journal(&full);
    let screened = reference.iter().filter(|e| e.rung == 0).count();
    assert!(
        (1..=7).contains(&screened),
        "{screened} screening evaluations"
    );
    assert!(reference.iter().any(|e| e.rung == 1), "no halving rung");
    // One row per candidate and rung: the cache never scores a candidate twice.
    let mut keys: Vec<(String, usize)> =
        reference.iter().map(|e| (e.key.clone(), e.rung)).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), reference.len());
    for e in &reference {
        assert_eq!(e.docs_per_task, Some(if e.rung == 0 { 3 } else { 5 }));
        assert_eq!(e.scores.len(), 3, "{:?}", e.scores);
    }

    // The same search, killed with SIGKILL after its second journal line, then resumed.
    let killed = work.path().join("killed");
    let mut child = search_cmd(&m, &space, &killed)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let lines = std::fs::read_to_string(killed.join("journal.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 2 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the search ended before it could be killed"
        );
        assert!(start.elapsed() < Duration::from_secs(600), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = journal(&killed);
    assert!(before.len() >= 2 && before.len() < reference.len());

    // Without --resume the run directory is refused.
    let refused = search_cmd(&m, &space, &killed).output().unwrap();
    assert!(expect_clean_failure(&refused).contains("--resume"));

    let out = search_cmd(&m, &space, &killed)
        .arg("--resume")
        .output()
        .unwrap();
    crate::common::expect_success(&out);
    let after = journal(&killed);
    // Nothing journaled was scored again, and the replay followed the same path.
    assert_eq!(&after[..before.len()], &before[..]);
    let strip = |j: &[JournalEntry]| {
        j.iter()
            .map(|e| (e.key.clone(), e.rung, e.objective, e.scores.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&after), strip(&reference));
    let summary = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("search-summary.json")).unwrap())
            .unwrap()
    };
    let (a, b) = (summary(&full), summary(&killed));
    assert_eq!(a["best"]["key"], b["best"]["key"]);
    assert_eq!(
        b["new_evaluations"].as_u64().unwrap() as usize,
        after.len() - before.len()
    );

    // The best model and its mergekit YAML: `paft merge` on the YAML gives the same weights.
    let best = killed.join("best");
    assert!(best.join("config.json").exists() && best.join("tokenizer.json").exists());
    let remerged = work.path().join("remerged");
    let out = common::run_paft(&[
        "--quiet",
        "merge",
        killed.join("best-merge.yaml").to_str().unwrap(),
        remerged.to_str().unwrap(),
    ]);
    crate::common::expect_success(&out);
    let load = |d: &Path| {
        paft::model::Pretrained::load(d, None, &candle_core::Device::Cpu)
            .unwrap()
            .weights
    };
    let (x, y) = (load(&best), load(&remerged));
    assert_eq!(x.len(), y.len());
    for (name, t) in &x {
        assert_eq!(common::max_abs_diff(t, &y[name]), 0.0, "{name}");
    }
}

#[test]
fn bad_search_spaces_are_clear_errors() {
    let Some(m) = tiny_models() else { return };
    let work = tempfile::tempdir().unwrap();
    for (from, to, expect) in [
        ("[\"ties\"]", "[\"tie\"]", "unknown merge_method `tie`"),
        (
            "{ low = 0.0, high = 1.5 }\n\"pref",
            "{ low = 1.5, high = 1.5 }\n\"pref",
            "empty range",
        ),
        (
            "\"sft.weight\" = { low = 0.0, high = 1.5 }",
            "\"sft.weight\" = nan",
            "`sft.weight` = NaN",
        ),
    ] {
        let text = SPACE.replace(from, to);
        assert_ne!(text, SPACE);
        let space = work.path().join("bad.toml");
        std::fs::write(&space, text).unwrap();
        let out = search_cmd(&m, &space, &work.path().join("out"))
            .output()
            .unwrap();
        let err = expect_clean_failure(&out);
        assert!(err.contains(expect), "{err}");
        assert!(err.contains("bad.toml"), "{err}");
    }
    // Objective terms: an unknown metric, and a tax term without held-out rows to measure it.
    for (objective, expect) in [
        ("heldout_acc = 1.0", "unknown term `heldout_acc`"),
        ("sft_loss = 1.0", "needs held-out training rows"),
    ] {
        let space = work.path().join("objective.toml");
        std::fs::write(&space, format!("{SPACE}\n[objective]\n{objective}\n")).unwrap();
        let out = search_cmd(&m, &space, &work.path().join("out-objective"))
            .output()
            .unwrap();
        let err = expect_clean_failure(&out);
        assert!(err.contains(expect), "{err}");
    }
}

#[test]
fn a_search_evaluates_its_candidates_in_the_spaces_dtype() {
    let Some(m) = tiny_models() else { return };
    let work = tempfile::tempdir().unwrap();
    let small = SPACE
        .replace("evaluations = 7", "evaluations = 2")
        .replace("rungs = [5]", "rungs = []");
    let mut first = vec![];
    for dtype in ["f32", "bf16"] {
        let space = work.path().join(format!("{dtype}.toml"));
        std::fs::write(
            &space,
            small.replace("[subset]", &format!("[subset]\ndtype = \"{dtype}\"")),
        )
        .unwrap();
        let out = work.path().join(dtype);
        crate::common::expect_success(&search_cmd(&m, &space, &out).output().unwrap());
        first.push(journal(&out).remove(0));
    }
    // The same first candidate, scored in bf16: close to f32 but not the same numbers.
    let (a, b) = (&first[0], &first[1]);
    assert_eq!(a.key, b.key);
    assert!(
        (a.objective - b.objective).abs() < 0.05,
        "{} vs {}",
        a.objective,
        b.objective
    );
    assert!(
        a.objective != b.objective,
        "bf16 scored exactly as f32: the dtype was not used"
    );

    let space = work.path().join("bad.toml");
    std::fs::write(
        &space,
        small.replace("[subset]", "[subset]\ndtype = \"int8\""),
    )
    .unwrap();
    let err = expect_clean_failure(
        &search_cmd(&m, &space, &work.path().join("bad"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("dtype") && err.contains("int8"), "{err}");
}
