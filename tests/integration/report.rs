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

/// Headline fractions per row, in `TASKS` order.
fn fractions(row: &str) -> [f64; 6] {
    match row {
        "base" => [0.4121, 0.5530, 0.3012, 0.3904, 0.5525, 0.0136],
        "sft" => [0.4402, 0.5611, 0.3125, 0.3880, 0.5604, 0.0551],
        "dpo" => [0.4531, 0.5702, 0.3098, 0.4312, 0.5588, 0.0402],
        "sequential" => [0.4488, 0.5690, 0.3071, 0.4209, 0.5570, 0.0467],
        "paft" => [0.4612, 0.5741, 0.3140, 0.4275, 0.5612, 0.0581],
        _ => unreachable!(),
    }
}

/// A results.json shaped as `SuiteResult::to_json` writes it: per-task entries (MMLU's
/// subjects, whose unweighted mean the `mmlu` group entry holds), groups, the leaderboard object.
fn results_json(f: [f64; 6]) -> Value {
    let (anatomy, astronomy) = (f[2] - 0.02, f[2] + 0.02);
    let mut board = serde_json::Map::new();
    for (col, v) in [
        "ARC",
        "HellaSwag",
        "MMLU",
        "TruthfulQA",
        "Winogrande",
        "GSM8K",
    ]
    .iter()
    .zip(f)
    {
        board.insert(col.to_string(), json!(100.0 * v));
    }
    let avg = f.iter().sum::<f64>() / 6.0;
    board.insert("Average".into(), json!(100.0 * avg));
    json!({
        "results": {
            "arc_challenge": {"alias": "arc_challenge", "acc,none": f[0] - 0.03, "acc_stderr,none": 0.014,
                              "acc_norm,none": f[0], "acc_norm_stderr,none": 0.014},
            "hellaswag": {"alias": "hellaswag", "acc,none": f[1] - 0.1, "acc_stderr,none": 0.005,
                          "acc_norm,none": f[1], "acc_norm_stderr,none": 0.005},
            "mmlu_anatomy": {"alias": "mmlu_anatomy", "acc,none": anatomy, "acc_stderr,none": 0.04},
            "mmlu_astronomy": {"alias": "mmlu_astronomy", "acc,none": astronomy, "acc_stderr,none": 0.04},
            "truthfulqa_mc2": {"alias": "truthfulqa_mc2", "acc,none": f[3], "acc_stderr,none": 0.015},
            "winogrande": {"alias": "winogrande", "acc,none": f[4], "acc_stderr,none": 0.014},
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": f[5], "exact_match_stderr,strict-match": 0.006,
                      "exact_match,flexible-extract": f[5] + 0.01, "exact_match_stderr,flexible-extract": 0.006},
            "mmlu": {"alias": "mmlu", "acc,none": f[2], "acc_stderr,none": 0.028, "acc_micro,none": f[2] + 0.001,
                     "aggregation": "unweighted mean over subjects (Open LLM Leaderboard)"},
        },
        "groups": {
            "mmlu": {"alias": "mmlu", "acc,none": f[2], "acc_stderr,none": 0.028, "acc_micro,none": f[2] + 0.001,
                     "aggregation": "unweighted mean over subjects (Open LLM Leaderboard)"},
            "leaderboard": {"alias": "leaderboard", "average,none": avg},
        },
        "leaderboard": board,
        "n-shot": {"arc_challenge": 25, "hellaswag": 10, "mmlu_anatomy": 5, "mmlu_astronomy": 5,
                   "truthfulqa_mc2": 0, "winogrande": 5, "gsm8k": 5},
        "n-samples": {
            "arc_challenge": {"original": 1172, "effective": 1172},
            "hellaswag": {"original": 10042, "effective": 10042},
            "mmlu_anatomy": {"original": 135, "effective": 135},
            "mmlu_astronomy": {"original": 152, "effective": 152},
            "truthfulqa_mc2": {"original": 817, "effective": 817},
            "winogrande": {"original": 1267, "effective": 1267},
            "gsm8k": {"original": 1319, "effective": 1319},
        },
        "config": {"model": "test"},
        "timing": {"total_seconds": 1.0, "tasks": {}},
        "paft_version": "0.1.0",
    })
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

/// A run directory with a journal, five evaluations and both deltas.
fn make_run(root: &Path) -> PathBuf {
    let run = root.join("run-smollm");
    std::fs::create_dir_all(&run).unwrap();
    let mut journal = Journal::open(&run.join("journal.jsonl")).unwrap();
    for e in journal_entries() {
        journal.append(e).unwrap();
    }
    for row in ["base", "sft", "dpo", "sequential", "paft"] {
        let dir = run.join("evals").join(row);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(&results_json(fractions(row))).unwrap(),
        )
        .unwrap();
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

/// Runs `paft report RUN --out OUT`; returns the index.html path it printed.
fn report(run: &Path, out: &Path) -> PathBuf {
    let res = run_paft(&[
        "--quiet",
        "report",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
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
    report(&run, &out);

    for f in [
        "leaderboard.md",
        "leaderboard.csv",
        "leaderboard.parquet",
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
        docs[..7],
        ["full", "full", "full", "full", "full", "80", "80"]
    );
    assert_eq!(docs[7], "20");
    let get = |col: &str, row: usize| lb.column(col).unwrap().f64().unwrap().get(row).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(get("ARC", 0), 100.0 * fractions("base")[0]));
    assert!(close(get("MMLU", 4), 100.0 * fractions("paft")[2]));
    assert!(close(get("GSM8K", 2), 100.0 * fractions("dpo")[5]));
    let paft_avg = 100.0 * fractions("paft").iter().sum::<f64>() / 6.0;
    assert!(close(get("Average", 4), paft_avg));
    // A candidate's scores are the journal's (already percent): rung-1 entry 7.
    assert!(close(get("ARC", 5), 46.8 - 2.5));
    assert!(close(get("Average", 5), 46.8));

    // Markdown and CSV show the leaderboard's two decimals.
    let md = std::fs::read_to_string(out.join("leaderboard.md")).unwrap();
    assert!(md.contains("| PAFT (best merge)"), "{md}");
    assert!(md.contains(&format!("{:.2}", paft_avg)), "{md}");
    let csv = std::fs::read_to_string(out.join("leaderboard.csv")).unwrap();
    assert_eq!(
        csv.lines().next().unwrap(),
        "Model,docs/task,ARC,HellaSwag,MMLU,TruthfulQA,Winogrande,GSM8K,Average"
    );
    assert!(
        csv.contains("Base,full,41.21,55.30,30.12,39.04,55.25,1.36,"),
        "{csv}"
    );

    let traj = read_parquet(&out.join("trajectory.parquet"));
    assert_eq!(traj.height(), 8);
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

#[test]
fn the_page_renders_in_headless_chromium() {
    let browser = chromium();
    let tmp = tempfile::tempdir().unwrap();
    let run = make_run(tmp.path());
    let out = tmp.path().join("report");
    let index = report(&run, &out);
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
        dom_text.matches("<svg").count() >= 2,
        "expected the trajectory and parameter plots inline"
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
