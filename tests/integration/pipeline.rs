//! `paft run` end to end on a tiny model with the shared data: parallel training, the
//! sequential baseline, a search, the five evaluations and the report; a rerun redoes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use paft::eval::{Pool, PoolSplit};
use paft::model::tiny::TinySpec;
use serde_json::Value;

use crate::common::{self, expect_clean_failure, paft};

pub(crate) fn experiment(base: &Path, work: &Path) -> String {
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
        docs = 3
        finalists = 0
        [objective]                # held-out rows from the experiment's [alignment_tax]
        sft_loss = 1.0
        reward_margin = 0.5
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
        docs = 4
        tasks = "arc_challenge,winogrande,mmlu"
        [alignment_tax]
        sft_dataset = "{train}/sft/mixed_qa.jsonl"
        pref_dataset = "{train}/preference/hh_harmless.jsonl"
        sft_rows = 4
        pref_rows = 4
        max_length = 256
        truncation = "keep_end"
        "#,
        base = base.display(),
        work = work.display(),
        train = train.display(),
        space = space.display(),
    )
}

/// `paft --quiet run FILE` on the shared tasks, which must succeed; returns its stdout.
fn paft_run(file: &Path) -> String {
    let out = paft()
        .args(["--quiet", "run"])
        .arg(file)
        .env("PAFT_TASKS_DIR", common::shared_tasks_dir())
        .output()
        .unwrap();
    crate::common::expect_success(&out);
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_pipeline_runs_every_stage_once() {
    let Some(base) = common::tiny_model(&TinySpec::llama(5)) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("experiment.toml");
    std::fs::write(&file, experiment(base.path(), work.path())).unwrap();
    let run = || paft_run(&file);
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
    held_out_protocol(&run_dir);
    let mut report_tax_ids: Vec<String> = vec![];
    for row in ["base", "sft", "dpo", "sequential", "paft"] {
        let tax =
            paft::eval::alignment_tax::AlignmentTax::read_dir(&run_dir.join("evals").join(row))
                .unwrap_or_else(|e| panic!("{row}: {e:#}"))
                .unwrap_or_else(|| panic!("{row}: no alignment_tax.json"));
        let e = tax.estimates();
        assert!(e.sft_loss.unwrap().value.is_finite(), "{row}");
        // The base is its own reference: every reward is exactly 0.
        if row == "base" {
            assert_eq!(e.reward_margin.unwrap().value, 0.0);
        }
        let ids: Vec<String> = (tax.sft.unwrap().rows.into_iter().map(|r| r.id))
            .chain(tax.preference.unwrap().pairs.into_iter().map(|p| p.id))
            .collect();
        if report_tax_ids.is_empty() {
            report_tax_ids = ids;
        } else {
            assert_eq!(
                ids, report_tax_ids,
                "{row}: the same held-out rows for every row"
            );
        }
    }
    // The search's objective had tax terms: measured on the search pool's held-out rows, none
    // of which a report row's tax uses, and recorded per candidate.
    let docs: Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("search-documents.json")).unwrap(),
    )
    .unwrap();
    let searched: Vec<&str> = ["sft", "preference"]
        .iter()
        .flat_map(|k| docs["alignment_tax"][k].as_array().unwrap())
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(searched.len(), 8, "{docs}");
    assert!(
        searched
            .iter()
            .all(|id| !report_tax_ids.iter().any(|r| r == id)),
        "{searched:?} vs {report_tax_ids:?}"
    );
    for line in std::fs::read_to_string(run_dir.join("journal.jsonl"))
        .unwrap()
        .lines()
    {
        let e: Value = serde_json::from_str(line).unwrap();
        assert!(e["tax"]["sft_loss"].is_number(), "{line}");
        assert!(e["tax"]["reward_margin"].is_number(), "{line}");
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

/// Document ids per task of a row's `samples_<task>.jsonl`.
fn sampled_ids(row: &Path) -> BTreeMap<String, BTreeSet<u64>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(row).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let Some(task) = name
            .strip_prefix("samples_")
            .and_then(|n| n.strip_suffix(".jsonl"))
        else {
            continue;
        };
        let ids = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["doc_id"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        out.insert(task.to_string(), ids);
    }
    out
}

/// The search scored only search-pool documents, every report row the same report-pool
/// documents, and the two never meet.
fn held_out_protocol(run_dir: &Path) {
    let docs: Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("search-documents.json")).unwrap(),
    )
    .unwrap();
    let split = PoolSplit::default();
    let mut searched: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for rung in docs["rungs"].as_object().unwrap().values() {
        for (task, ids) in rung.as_object().unwrap() {
            for id in ids.as_array().unwrap() {
                let id = id.as_u64().unwrap();
                assert_eq!(
                    split.pool_of(task, id as usize),
                    Some(Pool::Search),
                    "{task} {id}"
                );
                searched.entry(task.clone()).or_default().insert(id);
            }
        }
    }
    assert_eq!(searched.len(), 2, "{docs}");
    let journal = std::fs::read_to_string(run_dir.join("journal.jsonl")).unwrap();
    for line in journal.lines() {
        let e: Value = serde_json::from_str(line).unwrap();
        assert_eq!(e["pool"], "search", "{line}");
    }
    let rows: Vec<_> = ["base", "sft", "dpo", "sequential", "paft"]
        .iter()
        .map(|r| sampled_ids(&run_dir.join("evals").join(r)))
        .collect();
    for row in &rows {
        assert_eq!(row, &rows[0], "every report row has the same documents");
    }
    // MMLU's 4 documents are spread over its subjects; a subject without one has no file.
    let mmlu: usize = rows[0]
        .iter()
        .filter(|(t, _)| t.starts_with("mmlu_"))
        .map(|(_, ids)| ids.len())
        .sum();
    assert_eq!(mmlu, 4, "{:?}", rows[0]);
    for (task, ids) in &rows[0] {
        if !task.starts_with("mmlu_") {
            assert_eq!(ids.len(), 4, "{task}");
        }
        for &id in ids {
            assert_eq!(
                split.pool_of(task, id as usize),
                Some(Pool::Report),
                "{task} {id}"
            );
            let scored = searched.get(task).is_some_and(|s| s.contains(&id));
            assert!(!scored, "{task} {id} was scored by the search");
        }
    }
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

/// The study's shape: an SFT variant besides `[sft]` and two search spaces give four searches
/// (each SFT × each space) and a PAFT row each, every row on the same report documents (MMLU
/// with its own count), and a report with a verdict, a trajectory and a sparsity line per
/// variant and search.
#[test]
fn an_ablation_searches_every_sft_variant_in_every_space() {
    let Some(base) = common::tiny_model(&TinySpec::llama(5)) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let linear = work.path().join("linear.toml");
    std::fs::write(
        &linear,
        r#"
        [search]
        methods = ["linear"]
        solver = "grid"
        grid_points = 2
        evaluations = 2
        [params]
        "sft.weight" = { low = 0.5, high = 2.0, log = true }
        "pref.weight" = 1.0
        [subset]
        tasks = "arc_challenge,winogrande"
        docs = 3
        finalists = 0
        "#,
    )
    .unwrap();
    let text = experiment(base.path(), work.path())
        .replace(
            "space = \"",
            &format!("spaces = [\"{}\", \"", linear.display()),
        )
        .replace("space.toml\"", "space.toml\"]")
        .replace("docs = 4\n", "docs = 4\n        mmlu_docs = 6\n")
        .replace(
            "[pref]",
            "[sft_variants.sparse]\n        seed = 1\n        l1_lambda = 1e-3\n        [pref]",
        );
    let file = work.path().join("experiment.toml");
    std::fs::write(&file, &text).unwrap();
    let run = || paft_run(&file);
    run();
    let run_dir = work.path().join("runs").join("tiny");
    let searches = ["linear", "space", "sparse-linear", "sparse-space"];
    for (search, n) in searches.iter().zip([2, 3, 2, 3]) {
        let journal = run_dir.join("searches").join(search).join("journal.jsonl");
        let lines = std::fs::read_to_string(&journal).unwrap().lines().count();
        assert_eq!(lines, n, "{search}");
    }
    // The sparse variant's searches merged its own SFT: their candidates differ from [sft]'s.
    let first = |s: &str| {
        let j = run_dir.join("searches").join(s).join("journal.jsonl");
        let line = std::fs::read_to_string(j).unwrap();
        let e: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
        e["objective"].as_f64().unwrap()
    };
    assert_ne!(first("space"), first("sparse-space"));
    assert!(run_dir.join("train/sft-sparse/adapter").exists());
    assert!(run_dir.join("deltas/sft-sparse.json").exists());
    let rows = [
        "base",
        "sft",
        "sft-sparse",
        "dpo",
        "sequential",
        "paft-linear",
        "paft-space",
        "paft-sparse-linear",
        "paft-sparse-space",
    ];
    let ids: Vec<_> = rows
        .iter()
        .map(|r| sampled_ids(&run_dir.join("evals").join(r)))
        .collect();
    for (row, got) in rows.iter().zip(&ids) {
        assert_eq!(
            got, &ids[0],
            "{row}: every report row has the same documents"
        );
    }
    let count = |mmlu: bool| -> usize {
        ids[0]
            .iter()
            .filter(|(t, _)| t.starts_with("mmlu_") == mmlu)
            .map(|(_, d)| d.len())
            .sum()
    };
    assert_eq!((count(true), count(false)), (6, 8), "{:?}", ids[0]);

    let report = work.path().join("reports").join("tiny");
    let read = |f: &str| std::fs::read_to_string(report.join(f)).unwrap();
    let board = read("leaderboard.md");
    for label in [
        "SFT (sparse)",
        "PAFT sparse-linear (best merge)",
        "sparse-space: ",
    ] {
        assert!(board.contains(label), "{label} missing from\n{board}");
    }
    let verdicts = read("verdicts.md");
    for pair in ["PAFT space − sequential", "PAFT sparse-linear − DPO"] {
        assert!(verdicts.contains(pair), "{pair} missing from\n{verdicts}");
    }
    assert!(read("sparsity.md").contains("SFT (sparse)"));
    let stages = read("stages.md");
    for stage in [
        "train-sft-sparse",
        "search-sparse-linear",
        "eval-paft-space",
        "total",
    ] {
        assert!(stages.contains(stage), "{stage} missing from\n{stages}");
    }
    for s in searches {
        assert!(report.join(format!("trajectory-{s}.svg")).exists(), "{s}");
    }
    let index = read("index.html");
    assert!(index.contains("<h3>Search sparse-linear</h3>"));
    // One sentence per PAFT row (three tasks here, so none reaches the average).
    for s in searches {
        let sentence = format!("cannot say whether PAFT {s} beats sequential SFT→DPO");
        assert!(index.contains(&sentence), "{sentence}");
    }

    // `paft report` on the run directory writes the same text files as the run did.
    let again = work.path().join("again");
    let out = common::run_paft(&[
        "--quiet",
        "report",
        run_dir.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    crate::common::expect_success(&out);
    let mut compared = 0;
    for entry in std::fs::read_dir(&report).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "parquet") {
            continue;
        }
        let name = path.file_name().unwrap();
        let (a, b) = (
            std::fs::read(&path).unwrap(),
            std::fs::read(again.join(name)).unwrap(),
        );
        assert!(a == b, "{} differs when regenerated", path.display());
        compared += 1;
    }
    assert!(compared > 20, "{compared} files compared");

    // A rerun finds every stage done.
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let results = run_dir.join("evals/paft-sparse-space/results.json");
    let r0 = stamp(&results);
    run();
    assert_eq!(stamp(&results), r0);
}
