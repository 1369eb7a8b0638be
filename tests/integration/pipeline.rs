//! `paft run` end to end on a tiny model with the shared data: parallel training, the
//! sequential baseline, a search, the five evaluations and the report; a rerun redoes nothing.

use std::path::Path;

use paft::model::tiny::TinySpec;

use crate::common::{self, expect_clean_failure, paft};

fn experiment(base: &Path, work: &Path) -> String {
    let shared = paft::paths::shared_dir();
    let train = shared.join("data").join("train");
    let space = work.join("space.toml");
    std::fs::write(
        &space,
        r#"
        [search]
        methods = ["ties"]
        evaluations = 3
        [params]
        "sft.weight" = { low = 0.0, high = 1.5 }
        "pref.weight" = { low = 0.0, high = 1.5 }
        "sft.density" = 0.5
        "pref.density" = 0.5
        [subset]
        tasks = "arc_challenge,winogrande"
        docs = 2
        finalists = 0
        "#,
    )
    .unwrap();
    let training = r#"
        limit = 8
        max_length = 256
        truncation = "keep_end"
        batch_size = 2
        max_steps = 2
        save_every = 1
        lora_r = 4
        lora_alpha = 8.0
    "#;
    format!(
        r#"
        name = "tiny"
        base = "{base}"
        out = "{work}/runs/tiny"
        report = "{work}/reports/tiny"
        [sft]
        dataset = "{train}/sft/mixed_qa.jsonl"
        {training}
        [pref]
        objective = "dpo"
        dataset = "{train}/preference/hh_harmless.jsonl"
        {training}
        [search]
        space = "{space}"
        [eval]
        docs = 2
        "#,
        base = base.display(),
        work = work.display(),
        train = train.display(),
        space = space.display(),
    )
}

#[test]
fn the_pipeline_runs_every_stage_once() {
    let Some(base) = common::tiny_model(&TinySpec::llama(5)) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("experiment.toml");
    std::fs::write(&file, experiment(base.path(), work.path())).unwrap();
    let run = || {
        let out = paft()
            .args(["--quiet", "run"])
            .arg(&file)
            .env("PAFT_TASKS_DIR", common::shared_tasks_dir())
            .output()
            .unwrap();
        crate::common::expect_success(&out);
        String::from_utf8(out.stdout).unwrap()
    };
    let stdout = run();
    let run_dir = work.path().join("runs").join("tiny");
    let index = work.path().join("reports").join("tiny").join("index.html");
    assert!(stdout.contains(&index.display().to_string()), "{stdout}");
    assert!(index.exists());
    for row in ["base", "sft", "dpo", "sequential", "paft"] {
        let results = run_dir.join("evals").join(row).join("results.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
        assert!(
            v["results"]["arc_challenge"]["acc_norm,none"].is_number(),
            "{row}: {v}"
        );
    }
    for dir in [
        "sft/adapter",
        "dpo/adapter",
        "sequential-dpo/adapter",
        "sft-merged",
    ] {
        assert!(run_dir.join("train").join(dir).exists(), "{dir}");
    }
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("train").join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["dpo"]["config"]["max_steps"], 2);
    let board = std::fs::read_to_string(index.with_file_name("leaderboard.md")).unwrap();
    for label in ["Base", "SFT", "DPO", "sequential", "PAFT"] {
        assert!(board.contains(label), "{label} missing from\n{board}");
    }

    // A second run finds every stage done: nothing is trained, searched or evaluated again.
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let journal = run_dir.join("journal.jsonl");
    let results = run_dir.join("evals").join("paft").join("results.json");
    let (j0, r0) = (stamp(&journal), stamp(&results));
    run();
    assert_eq!((stamp(&journal), stamp(&results)), (j0, r0));
}

#[test]
fn a_bad_experiment_names_its_section() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("experiment.toml");
    let text = experiment(Path::new("base"), work.path()).replace("max_steps = 2", "max_stepz = 2");
    std::fs::write(&file, text).unwrap();
    let err = expect_clean_failure(&common::run_paft(&["run", file.to_str().unwrap()]));
    assert!(err.contains("[sft]") && err.contains("max_stepz"), "{err}");
}
