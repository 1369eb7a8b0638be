//! `paft report` on a run directory made here: the tables read back equal the inputs, every file
//! is written, the page renders in headless Chromium, and bad input is one clear error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use paft::merge::inspect::{DeltaReport, DeltaStats};
use paft::search::{Journal, JournalEntry};
use polars::prelude::{DataFrame, ParquetReader, SerReader};
use serde_json::{json, Value};

use crate::common::{expect_clean_failure, run_paft};

const TASKS: [&str; 6] = [
    "arc_challenge",
    "hellaswag",
    "mmlu",
    "truthfulqa_mc2",
    "winogrande",
    "gsm8k",
];

/// Per-row skill per benchmark, in `TASKS` order: the share of documents a row gets right.
fn skill(row: &str) -> [f64; 6] {
    match row {
        "base" => [0.4121, 0.5530, 0.3012, 0.3904, 0.5525, 0.0136],
        "sft" | "mine" => [0.4402, 0.5611, 0.3125, 0.3880, 0.5604, 0.0551],
        "dpo" => [0.4531, 0.5702, 0.3098, 0.4312, 0.5588, 0.0402],
        "sequential" => [0.4488, 0.5690, 0.3071, 0.4209, 0.5570, 0.0467],
        "paft" => [0.4612, 0.5741, 0.3140, 0.4275, 0.5612, 0.0581],
        _ => unreachable!(),
    }
}

/// The lm-eval tasks a row is scored on (MMLU as two subjects of different sizes): name,
/// documents, headline metric key.
const TASK_FILES: [(&str, usize, &str); 7] = [
    ("arc_challenge", 40, "acc_norm,none"),
    ("hellaswag", 40, "acc_norm,none"),
    ("mmlu_anatomy", 20, "acc,none"),
    ("mmlu_astronomy", 30, "acc,none"),
    ("truthfulqa_mc2", 40, "acc,none"),
    ("winogrande", 40, "acc,none"),
    ("gsm8k", 40, "exact_match,strict-match"),
];

/// Index into `TASKS` of an lm-eval task.
fn bench_of(task: &str) -> usize {
    TASKS
        .iter()
        .position(|t| *t == task || (*t == "mmlu" && task.starts_with("mmlu_")))
        .unwrap()
}

/// A document's difficulty in [0, 1), the same for every row (the rows are scored on the same
/// documents, as the pipeline scores them): an FNV-1a hash of task and document id.
fn difficulty(task: &str, doc: usize) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task.bytes().chain((doc as u64).to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// `row`'s per-document headline values on `task`: right on documents easier than its skill
/// (so a more skilled row is right on a superset of documents); TruthfulQA's mc2 is a
/// probability, fractional.
fn doc_values(row: &str, task: &str) -> Vec<f64> {
    let (_, n, _) = TASK_FILES.iter().find(|t| t.0 == task).unwrap();
    let p = skill(row)[bench_of(task)];
    (0..*n)
        .map(|i| {
            let d = difficulty(task, i);
            if task == "truthfulqa_mc2" {
                (0.5 + p - d).clamp(0.0, 1.0)
            } else if d < p {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Sample standard deviation / sqrt(n).
fn stderr(v: &[f64]) -> f64 {
    let m = mean(v);
    let n = v.len() as f64;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt()
}

/// Headline fractions and their stderrs per benchmark (`TASKS` order), computed here from the
/// documents: MMLU is the mean of its two subjects, stderr sqrt(se_a² + se_b²) / 2.
fn headline(row: &str) -> [(f64, f64); 6] {
    let mut out = [(0.0, 0.0); 6];
    for (b, t) in TASKS.iter().enumerate() {
        out[b] = if *t == "mmlu" {
            let a = doc_values(row, "mmlu_anatomy");
            let s = doc_values(row, "mmlu_astronomy");
            (
                (mean(&a) + mean(&s)) / 2.0,
                (stderr(&a).powi(2) + stderr(&s).powi(2)).sqrt() / 2.0,
            )
        } else {
            let v = doc_values(row, t);
            (mean(&v), stderr(&v))
        };
    }
    out
}

/// A results.json shaped as `SuiteResult::to_json` writes it, from the row's documents: per-task
/// entries (MMLU's subjects, whose unweighted mean the `mmlu` group entry holds), groups, the
/// leaderboard object, `n-samples`.
fn results_json(row: &str) -> Value {
    let h = headline(row);
    let mut results = serde_json::Map::new();
    let mut n_samples = serde_json::Map::new();
    for (task, n, key) in TASK_FILES {
        let v = doc_values(row, task);
        let (metric, filter) = key.split_once(',').unwrap();
        results.insert(
            task.into(),
            json!({"alias": task, key: mean(&v), format!("{metric}_stderr,{filter}"): stderr(&v)}),
        );
        n_samples.insert(task.into(), json!({"original": n, "effective": n}));
    }
    let mmlu = json!({"alias": "mmlu", "acc,none": h[2].0, "acc_stderr,none": h[2].1,
                      "aggregation": "unweighted mean over subjects (Open LLM Leaderboard)"});
    results.insert("mmlu".into(), mmlu.clone());
    let mut board = serde_json::Map::new();
    for (col, (v, _)) in [
        "ARC",
        "HellaSwag",
        "MMLU",
        "TruthfulQA",
        "Winogrande",
        "GSM8K",
    ]
    .iter()
    .zip(h)
    {
        board.insert(col.to_string(), json!(100.0 * v));
    }
    let avg = h.iter().map(|x| x.0).sum::<f64>() / 6.0;
    board.insert("Average".into(), json!(100.0 * avg));
    json!({
        "results": results,
        "groups": {"mmlu": mmlu, "leaderboard": {"alias": "leaderboard", "average,none": avg}},
        "leaderboard": board,
        "n-samples": n_samples,
        "config": {"model": "test"},
        "timing": {"total_seconds": 1.0, "tasks": {}},
        "paft_version": "0.1.0",
    })
}

/// `samples_<task>.jsonl` as `write_samples` writes them (the fields the report reads, and a
/// few it must ignore).
fn write_samples(dir: &Path, row: &str) {
    for (task, _, key) in TASK_FILES {
        let mut text = String::new();
        for (i, v) in doc_values(row, task).iter().enumerate() {
            let line = json!({"doc_id": i, "fewshot_ids": [], "arguments": [], "resps": [],
                              "target": 0, "metrics": {key: v, "other,none": 0.5}});
            text += &format!("{line}\n");
        }
        std::fs::write(dir.join(format!("samples_{task}.jsonl")), text).unwrap();
    }
}

/// Held-out SFT loss per token and mean reward margin of a row's alignment_tax.json.
fn tax_of(row: &str) -> (f64, f64) {
    match row {
        "sft" => (1.10, 0.05),
        "sequential" => (1.25, 0.60),
        "paft" => (1.18, 0.55),
        _ => unreachable!(),
    }
}

/// alignment_tax.json: 30 held-out rows and 30 preference pairs, the same ids in every row.
fn alignment_tax(row: &str) -> Value {
    let (loss, margin) = tax_of(row);
    let rows: Vec<Value> = (0..30)
        .map(|i| {
            let tokens = 20 + i % 7;
            // Per-row noise around a shared per-document difficulty, as real models differ.
            let noise = 0.3 * (difficulty("sft", i) - 0.5) + 0.1 * (difficulty(row, i) - 0.5);
            let nll = tokens as f64 * (loss + noise);
            json!({"id": format!("held-{i}"), "nll_sum": nll, "tokens": tokens})
        })
        .collect();
    let pairs: Vec<Value> = (0..30)
        .map(|i| {
            let m = margin + 2.0 * (difficulty("pref", i) - 0.5) + 0.5 * (difficulty(row, 100 + i) - 0.5);
            json!({"id": format!("pair-{i}"), "chosen_reward": m / 2.0, "rejected_reward": -m / 2.0})
        })
        .collect();
    json!({"sft": {"rows": rows}, "preference": {"beta": 0.1, "pairs": pairs}})
}

/// A full-evaluation row directory: results.json, and unless `records` is false its samples and
/// (for rows with an alignment tax) alignment_tax.json.
fn write_row(dir: &Path, row: &str, records: bool) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results_json(row)).unwrap(),
    )
    .unwrap();
    if records {
        write_samples(dir, row);
    }
    if matches!(row, "sft" | "sequential" | "paft") {
        std::fs::write(
            dir.join("alignment_tax.json"),
            alignment_tax(row).to_string(),
        )
        .unwrap();
    }
}

/// Search evaluations: 6 on the screening rung (20 docs/task), the best 2 again on rung 1.
fn journal_entries() -> Vec<JournalEntry> {
    let screen = [
        (0.62, 0.41, 0.5, 47.2),
        (0.30, 0.70, 0.5, 45.1),
        (0.90, 0.20, 0.7, 44.0),
        (0.50, 0.50, 0.3, 48.9),
        (0.75, 0.35, 0.6, 46.3),
        (0.20, 0.90, 0.4, 43.5),
    ];
    let entry = |index: usize, rung: usize, c: (f64, f64, f64, f64)| {
        let (ws, wp, d, objective) = c;
        JournalEntry {
            index,
            key: format!("ties|{ws}|{wp}|{d}"),
            method: "ties".into(),
            params: BTreeMap::from([
                ("sft.weight".to_string(), ws),
                ("pref.weight".to_string(), wp),
                ("sft.density".to_string(), d),
                ("pref.density".to_string(), 0.5),
            ]),
            choices: BTreeMap::new(),
            rung,
            docs_per_task: Some(if rung == 0 { 20 } else { 80 }),
            scores: TASKS
                .iter()
                .enumerate()
                .map(|(i, t)| (t.to_string(), objective + i as f64 - 2.5))
                .collect(),
            objective,
            objective_stderr: None,
            pool: None,
            tax: Default::default(),
            seconds: 12.5,
        }
    };
    let mut entries: Vec<JournalEntry> = screen
        .iter()
        .enumerate()
        .map(|(i, &c)| entry(i, 0, c))
        .collect();
    entries.push(entry(6, 1, (0.50, 0.50, 0.3, 46.0)));
    entries.push(entry(7, 1, (0.62, 0.41, 0.5, 46.8)));
    entries
}

fn delta_report(model: &str, zeros: usize) -> DeltaReport {
    let mut v: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 1e-3).collect();
    v[..zeros].iter_mut().for_each(|x| *x = 0.0);
    let t = DeltaStats::of("model.layers.0.mlp.up_proj.weight", &v);
    DeltaReport {
        base: "base".into(),
        model: model.into(),
        tensors: vec![t.clone()],
        overall: DeltaStats::total("(all)", &[t]),
        lora_a: None,
        lora_b: None,
    }
}

/// A run directory with a journal (every line but the second carries `objective_stderr`, as
/// a journal that spans the field's introduction), five evaluations (DPO's without samples) and both deltas.
fn make_run(root: &Path) -> PathBuf {
    let run = root.join("run-smollm");
    std::fs::create_dir_all(&run).unwrap();
    let mut journal = String::new();
    // One line without a standard error, as journals from before the field have.
    let entries: Vec<JournalEntry> = journal_entries()
        .into_iter()
        .map(|mut e| {
            e.objective_stderr = (e.index != 1).then_some(1.1);
            e
        })
        .collect();
    for e in &entries {
        journal += &format!("{}\n", serde_json::to_string(e).unwrap());
    }
    std::fs::write(run.join("journal.jsonl"), journal).unwrap();
    // The journal reads back as the search wrote it.
    assert_eq!(Journal::read(&run.join("journal.jsonl")).unwrap(), entries);
    for row in ["base", "sft", "dpo", "sequential", "paft"] {
        write_row(&run.join("evals").join(row), row, row != "dpo");
    }
    std::fs::create_dir_all(run.join("deltas")).unwrap();
    for (name, zeros) in [("sft", 10), ("dpo", 30)] {
        std::fs::write(
            run.join("deltas").join(format!("{name}.json")),
            serde_json::to_string(&delta_report(name, zeros)).unwrap(),
        )
        .unwrap();
    }
    run
}

/// Runs `paft report RUN --out OUT [extra…]`; returns the index.html path it printed.
fn report(run: &Path, out: &Path, extra: &[&str]) -> PathBuf {
    let mut args = vec![
        "--quiet",
        "report",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let res = run_paft(&args);
    assert!(
        res.status.success(),
        "paft report failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let stdout = String::from_utf8(res.stdout).unwrap();
    let index = PathBuf::from(stdout.trim_end().lines().last().expect("a printed path"));
    assert_eq!(index, out.join("index.html"));
    index
}

fn strings(df: &DataFrame, col: &str) -> Vec<String> {
    let ca = df.column(col).unwrap().str().unwrap();
    (0..ca.len())
        .map(|i| ca.get(i).unwrap().to_string())
        .collect()
}

fn read_parquet(path: &Path) -> DataFrame {
    ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap()
}

#[test]
fn tables_read_back_equal_the_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let run = make_run(tmp.path());
    let out = tmp.path().join("report");
    // An added row (as `paft eval --log-samples --output DIR` leaves it) gets its ± alike.
    let mine = tmp.path().join("mine");
    write_row(&mine, "mine", true);
    let add = format!("mine={}", mine.join("results.json").display());
    report(&run, &out, &["--add", &add]);

    for f in [
        "leaderboard.md",
        "leaderboard.csv",
        "leaderboard.parquet",
        "leaderboard.svg",
        "verdicts.md",
        "verdicts.csv",
        "verdicts.parquet",
        "trajectory.csv",
        "trajectory.parquet",
        "trajectory.svg",
        "params.csv",
        "params.parquet",
        "param_sft_weight.svg",
        "param_pref_weight.svg",
        "param_sft_density.svg",
        "sparsity.md",
        "sparsity.csv",
        "sparsity.parquet",
        "index.html",
    ] {
        let p = out.join(f);
        assert!(
            p.is_file() && p.metadata().unwrap().len() > 0,
            "{f} missing"
        );
    }
    // A parameter that never varied gets no plot.
    assert!(!out.join("param_pref_density.svg").exists());

    let lb = read_parquet(&out.join("leaderboard.parquet"));
    let labels = strings(&lb, "Model");
    assert_eq!(
        labels,
        [
            "Base",
            "SFT",
            "DPO",
            "SFT→DPO (sequential)",
            "PAFT (best merge)",
            "mine",
            // Rung 1 first, by objective; then rung 0, each candidate once.
            "ties w_sft=0.62 d_sft=0.5 w_dpo=0.41 d_dpo=0.5",
            "ties w_sft=0.5 d_sft=0.3 w_dpo=0.5 d_dpo=0.5",
            "ties w_sft=0.75 d_sft=0.6 w_dpo=0.35 d_dpo=0.5",
            "ties w_sft=0.3 d_sft=0.5 w_dpo=0.7 d_dpo=0.5",
            "ties w_sft=0.9 d_sft=0.7 w_dpo=0.2 d_dpo=0.5",
        ]
    );
    let docs = strings(&lb, "docs/task");
    assert_eq!(
        docs[..8],
        ["full", "full", "full", "full", "full", "full", "80", "80"]
    );
    assert_eq!(docs[8], "20");
    let opt = |col: &str, row: usize| lb.column(col).unwrap().f64().unwrap().get(row);
    let get = |col: &str, row: usize| opt(col, row).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(get("ARC", 0), 100.0 * headline("base")[0].0));
    assert!(close(get("MMLU", 4), 100.0 * headline("paft")[2].0));
    assert!(close(get("GSM8K", 2), 100.0 * headline("dpo")[5].0));
    let avg = |row: &str| 100.0 * headline(row).iter().map(|h| h.0).sum::<f64>() / 6.0;
    let paft_avg = avg("paft");
    assert!(close(get("Average", 4), paft_avg));
    // A candidate's scores are the journal's (already percent): rung-1 entry 7.
    assert!(close(get("ARC", 6), 46.8 - 2.5));
    assert!(close(get("Average", 6), 46.8));

    // Standard errors computed here from the documents: per task sample std / sqrt(n), MMLU
    // sqrt(Σ se²) / 2 over its two subjects, the average sqrt(Σ se²) / 6.
    let h = headline("paft");
    assert!(close(get("ARC_stderr", 4), 100.0 * h[0].1));
    assert!(close(get("MMLU_stderr", 4), 100.0 * h[2].1));
    let avg_se = 100.0 * h.iter().map(|x| x.1 * x.1).sum::<f64>().sqrt() / 6.0;
    assert!(close(get("Average_stderr", 4), avg_se));
    assert!(close(get("GSM8K_stderr", 5), 100.0 * headline("mine")[5].1));
    // DPO has no samples and the candidates no records: missing, not 0.
    assert_eq!(opt("ARC_stderr", 2), None);
    assert_eq!(opt("Average_stderr", 2), None);
    assert_eq!(opt("ARC_stderr", 6), None);
    // Alignment tax: Σ nll / Σ tokens, strict wins, mean margins; rows without a file empty.
    let loss = get("Held-out SFT loss ↓", 4);
    assert!((loss - tax_of("paft").0).abs() < 0.1, "{loss}");
    assert!(get("Held-out SFT loss ↓_stderr", 4) > 0.0);
    assert_eq!(opt("Held-out SFT loss ↓", 0), None);
    assert!((get("Reward margin ↑", 3) - tax_of("sequential").1).abs() < 0.2);
    let acc = get("Pref. accuracy ↑", 1);
    assert!((0.0..=100.0).contains(&acc), "{acc}");

    // Markdown shows `value ± stderr` with the leaderboard's two decimals; CSV the numbers.
    let md = std::fs::read_to_string(out.join("leaderboard.md")).unwrap();
    assert!(md.contains("| PAFT (best merge)"), "{md}");
    assert!(
        md.contains(&format!("{:.2} ± {:.2}", paft_avg, avg_se)),
        "{md}"
    );
    let dpo_line = md.lines().find(|l| l.starts_with("| DPO ")).unwrap();
    assert!(dpo_line.contains(" ± n/a"), "{dpo_line}");
    assert!(!md.contains("_stderr"), "{md}");
    let csv = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(
        header
            .starts_with("Model,docs/task,ARC,HellaSwag,MMLU,TruthfulQA,Winogrande,GSM8K,Average,"),
        "{header}"
    );
    assert!(
        header.contains(",ARC_stderr,") && header.contains("Average_stderr"),
        "{header}"
    );
    let base: Vec<String> = headline("base")
        .iter()
        .map(|x| format!("{:.4}", 100.0 * x.0))
        .collect();
    assert!(
        csv.contains(&format!("Base,full,{},", base.join(","))),
        "{csv}"
    );

    // The verdict table: the pairs whose rows exist, each benchmark, the average, the tax.
    let v = read_parquet(&out.join("verdicts.parquet"));
    let comparisons = strings(&v, "Comparison");
    let mut order = comparisons.clone();
    order.dedup();
    assert_eq!(
        order,
        [
            "PAFT − sequential",
            "PAFT − SFT",
            "PAFT − DPO",
            "sequential − base"
        ]
    );
    let metrics = strings(&v, "Metric");
    let vf = |col: &str, i: usize| v.column(col).unwrap().f64().unwrap().get(i);
    let at = |cmp: &str, metric: &str| {
        (0..v.height())
            .find(|&i| comparisons[i] == cmp && metrics[i] == metric)
            .unwrap_or_else(|| panic!("no {cmp} / {metric}"))
    };
    let i = at("PAFT − sequential", "Average");
    assert!(close(
        vf("Difference", i).unwrap(),
        paft_avg - avg("sequential")
    ));
    // PAFT is right on a superset of sequential's documents (its skill is higher on each task),
    // so no resample can favour sequential: every interval starts at 0 or above.
    for (j, c) in comparisons.iter().enumerate() {
        if c == "PAFT − sequential"
            && !metrics[j].contains("loss")
            && !metrics[j].contains("margin")
            && !metrics[j].contains("accuracy")
        {
            let (d, lo, hi) = (
                vf("Difference", j).unwrap(),
                vf("CI 2.5%", j).unwrap(),
                vf("CI 97.5%", j).unwrap(),
            );
            assert!(
                lo >= 0.0 && lo <= d && d <= hi,
                "{}: {lo} {d} {hi}",
                metrics[j]
            );
        }
    }
    let i = at("PAFT − sequential", "Held-out SFT loss ↓");
    let d = vf("Difference", i).unwrap();
    assert!(
        (d - (tax_of("paft").0 - tax_of("sequential").0)).abs() < 0.1,
        "{d}"
    );
    let notes = v.column("Note").unwrap().str().unwrap().clone();
    let i = at("PAFT − DPO", "ARC");
    assert_eq!(vf("Difference", i), None);
    let note = notes.get(i).unwrap();
    assert!(note.contains("DPO has no per-document records"), "{note}");
    assert_eq!(strings(&v, "Verdict")[i], "no interval");
    let vmd = std::fs::read_to_string(out.join("verdicts.md")).unwrap();
    assert!(
        vmd.contains("| PAFT − sequential") && vmd.contains("95% interval"),
        "{vmd}"
    );

    // The same seed gives the same table; another seed other intervals.
    let again = tmp.path().join("again");
    report(&run, &again, &["--add", &add]);
    assert!(read_parquet(&again.join("verdicts.parquet")).equals_missing(&v));
    let other = tmp.path().join("other-seed");
    report(&run, &other, &["--add", &add, "--seed", "7"]);
    assert!(!read_parquet(&other.join("verdicts.parquet")).equals_missing(&v));

    let traj = read_parquet(&out.join("trajectory.parquet"));
    assert_eq!(traj.height(), 8);
    // objective_stderr 1.1: within 1.96·√2·1.1 ≈ 3.05 of the rung's best (48.9 on rung 0, 46.8
    // on rung 1) is not distinguishable from it; the line without a stderr is unknown.
    let near_ca = traj.column("near_best").unwrap().bool().unwrap().clone();
    let near: Vec<Option<bool>> = (0..near_ca.len()).map(|i| near_ca.get(i)).collect();
    let (t, f) = (Some(true), Some(false));
    assert_eq!(near, [t, None, f, t, t, f, t, t]);
    let best: Vec<f64> = traj
        .column("best_so_far")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert_eq!(best, [47.2, 47.2, 47.2, 48.9, 48.9, 48.9, 46.0, 46.8]);

    let params = read_parquet(&out.join("params.parquet"));
    assert_eq!(params.height(), 3 * 8);

    let sp = read_parquet(&out.join("sparsity.parquet"));
    let zero: Vec<f64> = sp
        .column("=0 %")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    // 10 and 30 zeroed entries plus the one exact zero at i = 50, out of 100.
    assert_eq!(zero.len(), 2);
    assert!(close(zero[0], 11.0) && close(zero[1], 31.0), "{zero:?}");
}

/// A Chromium binary on PATH; CI installs Debian's `chromium`, so a missing one fails.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "no chromium, chromium-browser or google-chrome on PATH: install Debian's `chromium` \
         (apt-get install chromium; .ci/run does this in CI)"
    );
}

/// Runs headless Chromium with a fresh profile, killed after two minutes.
fn headless(browser: &Path, profile: &Path, args: &[String]) -> Output {
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let start = Instant::now();
    // Read stdout on a thread so a large DOM cannot block the browser on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = vec![];
        std::io::Read::read_to_end(&mut stdout, &mut s).ok();
        s
    });
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            child.kill().ok();
            child.wait().ok();
            panic!("chromium {args:?} did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = child.wait_with_output().unwrap();
    out.stdout = reader.join().unwrap();
    out
}

/// The text from `start` up to the next `end` after it.
fn section<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text
        .find(start)
        .unwrap_or_else(|| panic!("{start} not in the page"));
    let rest = &text[from + start.len()..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

#[test]
fn the_page_renders_in_headless_chromium() {
    let browser = chromium();
    let tmp = tempfile::tempdir().unwrap();
    let run = make_run(tmp.path());
    let out = tmp.path().join("report");
    let index = report(&run, &out, &[]);
    let html = std::fs::read_to_string(&index).unwrap();
    assert!(!html.contains("<script") && !html.contains("src=\"http"));

    let url = format!("file://{}", index.canonicalize().unwrap().display());
    let dom = headless(
        &browser,
        &tmp.path().join("profile-dom"),
        &["--dump-dom".to_string(), url.clone()],
    );
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success() && dom_text.contains("<table"),
        "chromium --dump-dom failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert!(dom_text.contains("PAFT (best merge)"), "{dom_text}");
    assert!(dom_text.contains("GSM8K") && dom_text.contains("SFT→DPO (sequential)"));
    assert!(
        dom_text.matches("<svg").count() >= 3,
        "expected the leaderboard, trajectory and parameter plots inline"
    );

    // The sentence at the top says what the run can conclude, from the verdicts, counting a
    // benchmark's documents (MMLU's two subjects together: 50), not a subject's.
    let conclusion = section(&dom_text, "id=\"conclusion\"", "</p>");
    assert!(
        conclusion.contains(
            "On 40 to 50 report documents per task, PAFT − sequential on the average is +"
        ),
        "{conclusion}"
    );
    assert!(
        [
            "not distinguishable; this run cannot say",
            "PAFT better; PAFT beats"
        ]
        .iter()
        .any(|v| conclusion.contains(v)),
        "{conclusion}"
    );
    // ± on the leaderboard, computed here from the documents; n/a (and why) for DPO.
    let board = section(&dom_text, "<h2>Leaderboard</h2>", "<h2");
    let h = headline("paft");
    let cell = format!("{:.2} ± {:.2}", 100.0 * h[0].0, 100.0 * h[0].1);
    assert!(board.contains(&cell), "{cell} not in {board}");
    assert!(
        board.contains("± n/a") && board.contains("DPO: no samples_"),
        "{board}"
    );
    // The leaderboard plot's whiskers: one per bar of the four rows with records (six
    // benchmarks and the average), plus the legend's sample.
    assert_eq!(
        board.matches("stroke=\"#111111\"").count(),
        4 * 7 + 1,
        "{board}"
    );
    // The verdict table.
    let verdicts = section(&dom_text, "id=\"verdicts\"", "<h2");
    for want in [
        "<table",
        "95% interval",
        "PAFT − sequential",
        "PAFT − SFT",
        "sequential − base",
        "Held-out SFT loss ↓",
        "DPO has no per-document records",
        "seed 1234",
    ] {
        assert!(verdicts.contains(want), "{want} not in {verdicts}");
    }
    // The trajectory marks candidates within noise of the best.
    let trajectory = section(&dom_text, "<h2>Search trajectory</h2>", "<h2");
    assert!(
        trajectory.contains("not distinguishable from the best")
            && trajectory.contains("rung best ± 1.96·stderr"),
        "{trajectory}"
    );

    let png = out.join("screenshot.png");
    let shot = headless(
        &browser,
        &tmp.path().join("profile-shot"),
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,2000".to_string(),
            "--hide-scrollbars".to_string(),
            url,
        ],
    );
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}); chromium said: {}",
            String::from_utf8_lossy(&shot.stderr)
        )
    });
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert!(
        bytes.len() > 20_000,
        "screenshot is only {} bytes",
        bytes.len()
    );
    // Keep a copy for a person to look at when PAFT_KEEP_REPORT names a directory.
    if let Some(dir) = std::env::var_os("PAFT_KEEP_REPORT") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["index.html", "screenshot.png"] {
            std::fs::copy(out.join(f), dir.join(f)).unwrap();
        }
    }
}

/// A search scored in a screening fidelity (named in its search-documents.json) has its
/// candidates' leaderboard rows marked as such, with a note saying their numbers are not
/// lm-eval's; a faithful one's rows read as before.
#[test]
fn search_candidates_scored_in_a_screening_fidelity_are_marked() {
    let tmp = tempfile::tempdir().unwrap();
    let run = make_run(tmp.path());
    let candidate_labels = |out: &Path| -> Vec<String> {
        strings(&read_parquet(&out.join("leaderboard.parquet")), "Model")
            .into_iter()
            .filter(|l| l.starts_with("ties "))
            .collect()
    };
    let documents = |fewshot: &str, gsm8k: &str| {
        let doc = json!({"pool": "search", "fewshot_mode": fewshot, "gsm8k_scoring": gsm8k,
                         "rungs": {}});
        std::fs::write(run.join("search-documents.json"), doc.to_string()).unwrap();
    };

    documents("per_document", "generate");
    let faithful = tmp.path().join("faithful");
    report(&run, &faithful, &[]);
    let plain = candidate_labels(&faithful);
    assert_eq!(plain.len(), 5);
    assert!(plain.iter().all(|l| !l.contains("screening")), "{plain:?}");

    documents("shared", "gold_likelihood");
    let screened = tmp.path().join("screened");
    let index = report(&run, &screened, &[]);
    let marked = candidate_labels(&screened);
    let suffix = " [screening: fewshot_mode=shared, gsm8k_scoring=gold_likelihood]";
    assert_eq!(
        marked,
        plain
            .iter()
            .map(|l| format!("{l}{suffix}"))
            .collect::<Vec<_>>()
    );
    let html = std::fs::read_to_string(index).unwrap();
    assert!(
        html.contains("search candidates: scored in a screening fidelity"),
        "no screening note in index.html"
    );
    let md = std::fs::read_to_string(screened.join("leaderboard.md")).unwrap();
    assert!(md.contains(suffix.trim()), "{md}");
}

#[test]
fn bad_input_is_one_clear_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out_s = out.to_str().unwrap();

    let missing = tmp.path().join("no-such-run");
    let res = run_paft(&["report", missing.to_str().unwrap(), "--out", out_s]);
    assert!(expect_clean_failure(&res).contains("no-such-run"));

    let run = make_run(tmp.path());
    let bad = run.join("evals").join("sft").join("results.json");
    std::fs::write(&bad, "{\"results\": {\"arc_challenge\": ").unwrap();
    let res = run_paft(&["report", run.to_str().unwrap(), "--out", out_s]);
    let err = expect_clean_failure(&res);
    assert!(err.contains(&bad.display().to_string()), "{err}");
    write_row(&run.join("evals").join("sft"), "sft", true);

    // A torn samples line and a malformed alignment-tax file name their file (and line).
    let samples = run
        .join("evals")
        .join("paft")
        .join("samples_winogrande.jsonl");
    let good = std::fs::read_to_string(&samples).unwrap();
    std::fs::write(&samples, format!("{good}{{\"doc_id\": 7, \"metr")).unwrap();
    let res = run_paft(&["report", run.to_str().unwrap(), "--out", out_s]);
    let err = expect_clean_failure(&res);
    assert!(
        err.contains(&samples.display().to_string()) && err.contains("line 41"),
        "{err}"
    );
    std::fs::write(&samples, good).unwrap();
    let tax = run
        .join("evals")
        .join("sequential")
        .join("alignment_tax.json");
    std::fs::write(&tax, "{\"sft\": {\"rows\": [{\"id\": \"a\"}]}}").unwrap();
    let res = run_paft(&["report", run.to_str().unwrap(), "--out", out_s]);
    let err = expect_clean_failure(&res);
    assert!(err.contains(&tax.display().to_string()), "{err}");
    std::fs::remove_file(&tax).unwrap();
    let res = run_paft(&[
        "report",
        run.to_str().unwrap(),
        "--out",
        out_s,
        "--resamples",
        "10",
    ]);
    assert!(expect_clean_failure(&res).contains("at least 1000"));

    let res = run_paft(&[
        "report",
        run.to_str().unwrap(),
        "--out",
        out_s,
        "--add",
        "mine.json",
    ]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && !stderr.contains("panicked"));
    assert!(
        stderr.contains("NAME=PATH") && stderr.contains("mine.json"),
        "{stderr}"
    );

    let empty = tmp.path().join("empty-run");
    std::fs::create_dir_all(&empty).unwrap();
    let res = run_paft(&["report", empty.to_str().unwrap(), "--out", out_s]);
    assert!(expect_clean_failure(&res).contains("nothing to report"));
}
