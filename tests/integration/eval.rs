//! The leaderboard evaluator: the spec's prompt test vectors, parity with lm-evaluation-harness
//! 0.4.13 (fixtures made by scripts/reference/make_eval_fixtures.py), task fetching from a local
//! Hub server, and bad task data.

use std::collections::BTreeMap;
use std::path::Path;

use paft::eval::fewshot::{shot_plan, FewshotMode, DEFAULT_FEWSHOT_SEED};
use paft::eval::task::Requests;
use paft::eval::tasks::load_tasks;
use paft::eval::{
    parse_task_list, DocSet, EvalConfig, EvalModel, Pool, PreparedSuite, Selection, SuiteResult,
    TaskOptions, TaskStore,
};
use paft::model::{tiny::TinySpec, Mode, Pretrained};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::{self, expect_clean_failure};

fn shared_store() -> Option<TaskStore> {
    let shared = common::require_shared()?;
    Some(TaskStore::new(shared.join("data").join("leaderboard")))
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every request context of a document, in request order.
fn contexts(req: &Requests) -> Vec<String> {
    match req {
        Requests::Loglikelihood(r) => r.iter().map(|q| q.context.clone()).collect(),
        Requests::Generate(g) => vec![g.context.clone()],
    }
}

#[test]
fn prompts_match_the_spec_test_vectors() {
    let Some(store) = shared_store() else { return };
    // leaderboard-tasks.md §11: first 16 hex of sha256(context), docs 0 and 1 (Winogrande: one
    // context per option).
    let want: [(&str, [&[&str]; 2]); 6] = [
        (
            "arc_challenge",
            [&["5b8ffc5d2a429b43"], &["4cad27772555bab2"]],
        ),
        ("hellaswag", [&["4b81d6ac293923c8"], &["249e586c53a06f81"]]),
        (
            "mmlu_abstract_algebra",
            [&["ff9b00310e214bea"], &["2885f321f1938150"]],
        ),
        (
            "truthfulqa_mc2",
            [&["add27f6e382a585e"], &["9f41d64ce976a73f"]],
        ),
        (
            "winogrande",
            [
                &["a66667096ca1e2c2", "093f5b6ea2dd5861"],
                &["7bd83ac98e62e2fe", "9c3f275f29a28da9"],
            ],
        ),
        ("gsm8k", [&["32680f263ba83280"], &["e6b9a0195411932e"]]),
    ];
    let names: Vec<&str> = want.iter().map(|w| w.0).collect();
    let specs = parse_task_list(&names.join(",")).unwrap();
    let tasks = load_tasks(&store, &specs, &TaskOptions::default()).unwrap();
    assert_eq!(tasks.len(), 6);
    for task in &tasks {
        let (_, docs) = want.iter().find(|w| w.0 == task.name()).unwrap();
        let k = task.benchmark().default_num_fewshot();
        let plan = shot_plan(task.as_ref(), k, DEFAULT_FEWSHOT_SEED);
        for (doc, expected) in docs.iter().enumerate() {
            let inst = task.instance(doc, &plan[doc]);
            let mut got: Vec<String> = contexts(&inst.requests)
                .iter()
                .map(|c| sha256_hex(c)[..16].to_string())
                .collect();
            got.dedup();
            assert_eq!(got, *expected, "{} doc {doc}", task.name());
        }
    }
}

struct FixtureDoc {
    doc_id: usize,
    context_sha256: Vec<String>,
    continuations: Vec<String>,
    lls: Vec<f64>,
    is_greedy: Vec<bool>,
    metrics: BTreeMap<String, f64>,
    generation: Option<String>,
}

fn read_fixture(path: &Path) -> Vec<FixtureDoc> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let strings = |k: &str| -> Vec<String> {
                v[k].as_array()
                    .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                    .unwrap_or_default()
            };
            let metrics = [
                "acc",
                "acc_norm",
                "exact_match,strict-match",
                "exact_match,flexible-extract",
            ]
            .iter()
            .filter_map(|k| {
                // GSM8K's fixture nests its filters: {"exact_match": {"strict-match": 0.0, …}}.
                let x = match k.split_once(',') {
                    Some((m, f)) => v[m][f].as_f64().or(v[*k].as_f64()),
                    None => v[*k].as_f64(),
                };
                x.map(|x| (k.to_string(), x))
            })
            .collect();
            FixtureDoc {
                doc_id: v["doc_id"].as_u64().unwrap() as usize,
                context_sha256: strings("context_sha256"),
                continuations: strings("continuations"),
                lls: v["loglikelihoods"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_f64().unwrap()).collect())
                    .unwrap_or_default(),
                is_greedy: v["is_greedy"]
                    .as_array()
                    .map(|a| a.iter().map(|x| x.as_bool().unwrap()).collect())
                    .unwrap_or_default(),
                metrics,
                generation: v["generation"].as_str().map(String::from),
            }
        })
        .collect()
}

/// Index of the best score and its margin over the runner-up.
fn best_and_margin(scores: &[f64]) -> (usize, f64) {
    let best = paft::eval::task::argmax(scores.iter().copied());
    let runner_up = scores
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != best)
        .map(|(_, s)| *s)
        .fold(f64::NEG_INFINITY, f64::max);
    (best, scores[best] - runner_up)
}

#[test]
fn matches_lm_evaluation_harness() {
    let Some(store) = shared_store() else { return };
    let model_dir = common::smollm_dir().unwrap();
    let fixture_dir = common::fixture("eval");
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir.join("lm_eval_results.json")).unwrap(),
    )
    .unwrap();
    let mut fixtures = BTreeMap::new();
    for entry in std::fs::read_dir(&fixture_dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if let Some(task) = name
            .strip_prefix("samples_")
            .and_then(|n| n.strip_suffix(".jsonl"))
        {
            fixtures.insert(task.to_string(), read_fixture(&p));
        }
    }
    // Every task lm-eval was run on has its samples file.
    let ran: Vec<&String> = reference["results"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.is_object())
        .map(|(k, _)| k)
        .collect();
    for t in &ran {
        assert!(
            fixtures.contains_key(*t),
            "samples_{t}.jsonl missing from {}",
            fixture_dir.display()
        );
    }
    assert!(ran.len() >= 6, "lm-eval fixtures cover only {ran:?}");

    let pre = Pretrained::load(model_dir, None, &candle_core::Device::Cpu).unwrap();
    let net = pre.model(Mode::Inference, None).unwrap();
    let target = EvalModel {
        model: &net,
        tokenizer: &pre.tokenizer,
        stop_token_ids: pre.stop_token_ids(),
        pad_id: pre.pad_token_id(),
    };
    // PAFT_PARITY_ONLY=task,… narrows the run while debugging one task.
    if let Ok(only) = std::env::var("PAFT_PARITY_ONLY") {
        fixtures.retain(|t, _| only.split(',').any(|o| o == t));
    }
    let names: Vec<&str> = fixtures.keys().map(String::as_str).collect();
    let mut config = EvalConfig::new(parse_task_list(&names.join(",")).unwrap());
    // The acceptance check's workload: 40 documents per task (GSM8K: 20).
    let limit = |n| DocSet {
        pool: Pool::All,
        selection: Selection::Limit(n),
    };
    let mut gsm_config = config.clone();
    config
        .tasks
        .retain(|t| *t != parse_task_list("gsm8k").unwrap()[0]);
    gsm_config.tasks = parse_task_list("gsm8k").unwrap();

    let mut worst_ll = 0f64;
    let mut configs: Vec<(EvalConfig, DocSet)> = vec![(config, limit(40))];
    configs.retain(|c| !c.0.tasks.is_empty());
    if fixtures.contains_key("gsm8k") {
        configs.push((gsm_config, limit(20)));
    }
    for (config, docs) in configs {
        let suite = PreparedSuite::prepare(&store, &pre.tokenizer, 8192, config, docs).unwrap();
        let result = suite.evaluate(&target, &|| {}).unwrap();
        for (prepared, task_result) in suite.tasks.iter().zip(&result.tasks) {
            let name = task_result.name.as_str();
            let want = &fixtures[name];
            let n = task_result.records.len();
            token_work_adds_up(prepared, task_result);
            assert!(
                n > 0 && n <= want.len(),
                "{name}: {n} documents vs fixture {}",
                want.len()
            );
            let mut metric_sums: BTreeMap<String, f64> = BTreeMap::new();
            for (rec, w) in task_result.records.iter().zip(want) {
                assert_eq!(rec.doc_id, w.doc_id, "{name}");
                let inst = prepared.task.instance(rec.doc_id, &rec.shots);
                let ctx: Vec<String> = contexts(&inst.requests)
                    .iter()
                    .map(|c| sha256_hex(c))
                    .collect();
                match &inst.requests {
                    Requests::Loglikelihood(reqs) => {
                        assert_eq!(
                            ctx, w.context_sha256,
                            "{name} doc {}: contexts differ",
                            w.doc_id
                        );
                        let conts: Vec<&str> =
                            reqs.iter().map(|r| r.continuation.as_str()).collect();
                        assert_eq!(conts, w.continuations, "{name} doc {}", w.doc_id);
                        let paft::eval::task::Response::Loglikelihood(got) = &rec.response else {
                            panic!("{name}: expected log-likelihoods")
                        };
                        for (j, ((ll, greedy), (want_ll, want_greedy))) in
                            got.iter().zip(w.lls.iter().zip(&w.is_greedy)).enumerate()
                        {
                            let d = (ll - want_ll).abs();
                            worst_ll = worst_ll.max(d);
                            assert!(
                                d < 2e-3,
                                "{name} doc {} choice {j}: {ll} vs lm-eval {want_ll}",
                                w.doc_id
                            );
                            assert_eq!(
                                greedy, want_greedy,
                                "{name} doc {} choice {j}: is_greedy",
                                w.doc_id
                            );
                        }
                        // Same prediction wherever lm-eval's top two are more than 1e-3 apart.
                        let (want_best, margin) = best_and_margin(&w.lls);
                        let got_lls: Vec<f64> = got.iter().map(|g| g.0).collect();
                        if margin > 1e-3 {
                            assert_eq!(
                                best_and_margin(&got_lls).0,
                                want_best,
                                "{name} doc {}",
                                w.doc_id
                            );
                        }
                    }
                    Requests::Generate(_) => {
                        assert_eq!(ctx[0], w.context_sha256[0], "{name} doc {}", w.doc_id);
                        let paft::eval::task::Response::Generation(text) = &rec.response else {
                            panic!("{name}: expected a generation")
                        };
                        assert_eq!(
                            Some(text),
                            w.generation.as_ref(),
                            "{name} doc {}: generation",
                            w.doc_id
                        );
                    }
                }
                for (k, v) in &rec.score.metrics {
                    let key = if k.filter == "none" {
                        k.metric.to_string()
                    } else {
                        k.to_string()
                    };
                    let want_v = w
                        .metrics
                        .get(&key)
                        .unwrap_or_else(|| panic!("{name}: fixture lacks {key}"));
                    // TruthfulQA's mc2 is continuous; the rest are 0/1.
                    assert!(
                        (v - want_v).abs() < 1e-3,
                        "{name} doc {} {key}: {v} vs {want_v}",
                        w.doc_id
                    );
                    *metric_sums.entry(key).or_default() += v;
                }
            }
            // Task metrics: lm-eval's aggregate where the document counts agree, else the mean of
            // the fixture's first n per-document values.
            for (key, sum) in metric_sums {
                let got = sum / n as f64;
                let reference_value = if n == want.len() {
                    let k = if key.contains(',') {
                        key.clone()
                    } else {
                        format!("{key},none")
                    };
                    reference["results"][name][&k].as_f64().unwrap()
                } else {
                    want[..n].iter().map(|w| w.metrics[&key]).sum::<f64>() / n as f64
                };
                assert!(
                    (got - reference_value).abs() < 1e-3,
                    "{name} {key}: {got} vs lm-eval {reference_value}"
                );
                eprintln!("{name} {key}: paft {got:.4} lm-eval {reference_value:.4} (n={n})");
            }
        }
    }
    eprintln!("worst per-choice log-likelihood difference: {worst_ll:.2e}");
}

/// The token accounting of one task: what was prefilled plus what sharing saved is what running
/// every request's input alone would prefill (lm-eval's way), multiple-choice documents share
/// their context across choices, and generation shares nothing but generates.
fn token_work_adds_up(prepared: &paft::eval::suite::PreparedTask, result: &paft::eval::TaskResult) {
    use paft::eval::tokenize::TokenizedRequests;
    let name = &result.name;
    let mut unshared = 0u64;
    let (mut choices, mut generations) = (0usize, 0u64);
    for r in &prepared.requests {
        match r {
            TokenizedRequests::Loglikelihood(c) => {
                unshared += (0..c.len())
                    .map(|i| (c.total_len(i) - 1) as u64)
                    .sum::<u64>();
                choices = choices.max(c.len());
            }
            TokenizedRequests::Generate(g) => {
                unshared += g.context.len() as u64;
                generations += 1;
            }
        }
    }
    let t = result.tokens;
    assert!(t.prefilled > 0, "{name}: {t:?}");
    assert_eq!(t.prefilled + t.saved, unshared, "{name}: {t:?}");
    if choices > 1 {
        assert!(t.saved > 0 && t.generated == 0, "{name}: {t:?}");
    }
    if generations > 0 {
        assert_eq!(t.saved, 0, "{name}: {t:?}");
        assert!(t.generated >= generations, "{name}: {t:?}");
    }
}

/// Generation as the evaluator ran it before continuous batching, kept here as the reference:
/// fixed batches of `batch` contexts (longest first), left-padded and prefilled together in
/// chunks of 128 tokens, finished rows leaving the batch.
fn reference_generations(
    pre: &Pretrained,
    net: &paft::model::LlamaModel,
    requests: &[&paft::eval::tokenize::TokenizedGeneration],
    batch: usize,
) -> Vec<String> {
    use candle_core::D;
    use paft::model::TokenBatch;
    let (stop, pad) = (pre.stop_token_ids(), pre.pad_token_id());
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(requests[i].context.len()), i));
    let mut texts = vec![String::new(); requests.len()];
    for chunk in order.chunks(batch) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| requests[i].context.clone()).collect();
        let full = TokenBatch::left_padded(&prompts, &vec![0; prompts.len()], pad);
        let mut cache = net.new_cache();
        let mut last = None;
        for start in (0..full.seq_len()).step_by(128) {
            let end = (start + 128).min(full.seq_len());
            let cols = |rows: &[Vec<u32>]| rows.iter().map(|r| r[start..end].to_vec()).collect();
            let part = TokenBatch {
                ids: cols(&full.ids),
                positions: cols(&full.positions),
                valid: full.valid.iter().map(|r| r[start..end].to_vec()).collect(),
                packing: None,
            };
            let hidden = net.forward(&part, Some(&mut cache)).unwrap();
            last = Some(
                hidden
                    .narrow(1, end - start - 1, 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap(),
            );
        }
        let mut last = last.unwrap();
        let mut generated: Vec<Vec<u32>> = vec![vec![]; chunk.len()];
        let mut active: Vec<usize> = (0..chunk.len()).collect();
        loop {
            let next = net
                .logits(&last)
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            let mut keep = vec![];
            for (slot, (&row, &tok)) in active.iter().zip(&next).enumerate() {
                let req = requests[chunk[row]];
                if stop.contains(&tok) {
                    continue;
                }
                generated[row].push(tok);
                let text = pre.tokenizer.decode(&generated[row], true).unwrap();
                let done = req.until.iter().any(|u| text.contains(u.as_str()))
                    || generated[row].len() >= req.max_gen_toks;
                texts[chunk[row]] = text;
                if !done {
                    keep.push(slot);
                }
            }
            if keep.is_empty() {
                break;
            }
            if keep.len() < active.len() {
                cache = cache.select_rows(&keep).unwrap();
            }
            let tokens: Vec<u32> = keep.iter().map(|&s| next[s]).collect();
            active = keep.iter().map(|&s| active[s]).collect();
            let step = TokenBatch {
                ids: tokens.iter().map(|&t| vec![t]).collect(),
                positions: cache.next_positions().iter().map(|&p| vec![p]).collect(),
                valid: vec![vec![true]; tokens.len()],
                packing: None,
            };
            last = net
                .forward(&step, Some(&mut cache))
                .unwrap()
                .squeeze(1)
                .unwrap();
        }
    }
    for (text, req) in texts.iter_mut().zip(requests) {
        for u in &req.until {
            if let Some(i) = text.find(u.as_str()) {
                text.truncate(i);
            }
        }
    }
    texts
}

#[test]
fn gsm8k_continuous_batching_matches_the_fixed_batch_reference() {
    use paft::eval::tokenize::TokenizedRequests;
    let Some(store) = shared_store() else { return };
    let pre = Pretrained::load(
        common::smollm_dir().unwrap(),
        None,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let net = pre.model(Mode::Inference, None).unwrap();
    let target = EvalModel {
        model: &net,
        tokenizer: &pre.tokenizer,
        stop_token_ids: pre.stop_token_ids(),
        pad_id: pre.pad_token_id(),
    };
    // Four fixture documents in three slots: one slot is refilled while two rows still run.
    let docs = DocSet {
        pool: Pool::All,
        selection: Selection::Limit(4),
    };
    for mode in [FewshotMode::PerDocument, FewshotMode::Shared] {
        let mut config = EvalConfig::new(parse_task_list("gsm8k").unwrap());
        config.fewshot_mode = mode;
        config.batch_size = Some(3);
        let suite = PreparedSuite::prepare(&store, &pre.tokenizer, 8192, config, docs).unwrap();
        let result = suite.evaluate(&target, &|| {}).unwrap();
        let prepared = &suite.tasks[0];
        let requests: Vec<_> = prepared
            .requests
            .iter()
            .map(|r| match r {
                TokenizedRequests::Generate(g) => g,
                TokenizedRequests::Loglikelihood(_) => panic!("gsm8k generates"),
            })
            .collect();
        let want = reference_generations(&pre, &net, &requests, 3);
        for (rec, want) in result.tasks[0].records.iter().zip(&want) {
            let paft::eval::task::Response::Generation(got) = &rec.response else {
                panic!("expected a generation")
            };
            assert_eq!(got, want, "{mode:?} doc {}", rec.doc_id);
        }
        // Shared shots: the common few-shot prefix is prefilled once and counted as saved.
        let t = result.tasks[0].tokens;
        let contexts: u64 = requests.iter().map(|g| g.context.len() as u64).sum();
        assert_eq!(t.prefilled + t.saved, contexts, "{mode:?}: {t:?}");
        let shared = prepared.shared_prefix.len() as u64;
        assert_eq!(
            t.saved,
            shared * (requests.len() as u64 - 1),
            "{mode:?}: {t:?}"
        );
        assert_eq!(shared > 0, mode == FewshotMode::Shared, "{mode:?}: {t:?}");
        eprintln!("{mode:?}: {t:?}");
    }
}

// ---------------------------------------------------------------- bad input and task fetching

/// A task store with Winogrande's first rows from the shared copy, plus `edit` applied.
fn winogrande_store(edit: impl FnOnce(&mut Vec<String>)) -> Option<tempfile::TempDir> {
    let shared = common::require_shared()?;
    let src = std::fs::read_to_string(shared.join("data/leaderboard/winogrande/validation.jsonl"))
        .unwrap();
    let mut lines: Vec<String> = src.lines().take(8).map(String::from).collect();
    edit(&mut lines);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("winogrande")).unwrap();
    std::fs::write(
        dir.path().join("winogrande/validation.jsonl"),
        lines.join("\n") + "\n",
    )
    .unwrap();
    Some(dir)
}

fn eval_with_store(model: &Path, store: &Path, tasks: &str) -> std::process::Output {
    common::run_paft(&[
        "--quiet",
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--tasks",
        tasks,
        "--tasks-dir",
        store.to_str().unwrap(),
        "--limit",
        "2",
    ])
}

#[test]
fn bad_task_data_gives_clear_errors() {
    let Some(model) = common::tiny_model(&TinySpec::llama(5)) else {
        return;
    };

    let store = winogrande_store(|l| l[3] = "{\"sentence\": \"broken".into()).unwrap();
    let err = expect_clean_failure(&eval_with_store(model.path(), store.path(), "winogrande"));
    assert!(
        err.contains("validation.jsonl:4") && err.contains("malformed JSON"),
        "{err}"
    );

    let store = winogrande_store(|l| {
        l[2] = l[2]
            .replace("\"answer\": \"1\"", "\"answer\": \"3\"")
            .replace("\"answer\": \"2\"", "\"answer\": \"3\"")
    })
    .unwrap();
    let err = expect_clean_failure(&eval_with_store(model.path(), store.path(), "winogrande"));
    assert!(
        err.contains("validation.jsonl:3") && err.contains("out of range"),
        "{err}"
    );

    let store = winogrande_store(|_| {}).unwrap();
    let err = expect_clean_failure(&eval_with_store(model.path(), store.path(), "gsm8k"));
    assert!(
        err.contains(
            &store
                .path()
                .join("gsm8k")
                .join("test.jsonl")
                .display()
                .to_string()
        ) && err.contains("paft fetch tasks"),
        "{err}"
    );

    let err = expect_clean_failure(&eval_with_store(
        model.path(),
        store.path(),
        "winogrande,arc_easy",
    ));
    assert!(
        err.contains("arc_easy") && err.contains("arc_challenge") && err.contains("leaderboard"),
        "{err}"
    );

    // A gold index out of range in a multiple-choice task (ARC's answer key not among the labels).
    let shared = common::require_shared().unwrap();
    let arc =
        std::fs::read_to_string(shared.join("data/leaderboard/arc_challenge/test.jsonl")).unwrap();
    let mut rows: Vec<String> = arc.lines().take(5).map(String::from).collect();
    rows[1] = rows[1].replace("\"answerKey\": \"", "\"answerKey\": \"Z");
    std::fs::create_dir_all(store.path().join("arc_challenge")).unwrap();
    std::fs::write(
        store.path().join("arc_challenge/test.jsonl"),
        rows.join("\n"),
    )
    .unwrap();
    let err = expect_clean_failure(&eval_with_store(
        model.path(),
        store.path(),
        "arc_challenge",
    ));
    assert!(
        err.contains("test.jsonl:2") && err.contains("answerKey"),
        "{err}"
    );
}

#[test]
fn fetch_tasks_from_a_local_hub_and_evaluate() {
    use polars::prelude::{JsonReader, ParquetWriter, SerReader};
    let Some(model) = common::tiny_model(&TinySpec::llama(6)) else {
        return;
    };
    let shared = common::require_shared().unwrap();
    // Serve the first rows of every shared file as the Hub's parquet files.
    let hub_root = tempfile::tempdir().unwrap();
    let mut routes = vec![];
    let mut expected = vec![];
    for f in &paft::eval::fetch::LEADERBOARD_FILES {
        let src = shared
            .join("data/leaderboard")
            .join(f.task_dir)
            .join(format!("{}.jsonl", f.split));
        let rows: Vec<String> = std::fs::read_to_string(&src)
            .unwrap()
            .lines()
            .take(12)
            .map(String::from)
            .collect();
        let mut df = JsonReader::new(std::io::Cursor::new(rows.join("\n")))
            .with_json_format(polars::prelude::JsonFormat::JsonLines)
            .finish()
            .unwrap();
        let dir = hub_root.path().join(f.repo.replace('/', "__"));
        let dest = dir.join(f.file);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        ParquetWriter::new(std::fs::File::create(&dest).unwrap())
            .finish(&mut df)
            .unwrap();
        routes.push((format!("/datasets/{}/resolve/", f.repo), dir));
        expected.push((f.task_dir, f.split, rows));
    }
    routes.dedup_by(|a, b| a.0 == b.0);
    let hub = crate::hub::serve_routes(routes);
    let hf_home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = crate::hub::paft_with_hub(&hub.url, hf_home.path())
        .env_remove("PAFT_TASKS_DIR")
        .args(["fetch", "tasks", "--out", out_dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    crate::common::expect_success(&out);
    for (task, split, rows) in expected {
        let got = std::fs::read_to_string(out_dir.path().join(task).join(format!("{split}.jsonl")))
            .unwrap();
        let got: Vec<Value> = got
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let want: Vec<Value> = rows
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got, want, "{task}/{split}");
    }
    // The fetched store evaluates.
    let res = eval_with_store(
        model.path(),
        out_dir.path(),
        "arc_challenge,truthfulqa_mc2,winogrande",
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let table = String::from_utf8_lossy(&res.stdout);
    assert!(
        table.contains("ARC") && table.contains("Winogrande"),
        "{table}"
    );
}

/// A prepared task as the few-shot tests look at it: name, shots per document, shared prefix.
type PreparedShots = (String, Vec<Vec<usize>>, Vec<u32>);

/// Evaluates the tiny model at `dir` on `tasks` in a few-shot `mode`; returns the result and the
/// prepared suite's tasks.
fn evaluate_in_mode(
    dir: &Path,
    tasks: &str,
    docs: DocSet,
    mode: FewshotMode,
) -> (SuiteResult, Vec<PreparedShots>) {
    let load = || Pretrained::load(dir, None, &candle_core::Device::Cpu).unwrap();
    let net = load().model(Mode::Inference, None).unwrap();
    let mut config = EvalConfig::new(parse_task_list(tasks).unwrap());
    config.fewshot_mode = mode;
    let store = TaskStore::new(common::shared_tasks_dir());
    let mut evaluator = paft::eval::Evaluator::new(load(), store, config).unwrap();
    let result = evaluator.evaluate(&net, docs).unwrap();
    let suite = evaluator.suite(docs).unwrap();
    let prepared = suite
        .tasks
        .iter()
        .map(|t| {
            let name = t.task.name().to_string();
            (name, t.shots.clone(), t.shared_prefix.clone())
        })
        .collect();
    (result, prepared)
}

/// Shared-shot screening: one shot set per task, never a scored document (Winogrande draws its
/// shots from the evaluation split itself), the shots' prefix prefilled once, so a document
/// costs a fraction of the tokens it costs with lm-eval's per-document shots.
#[test]
fn shared_shots_are_one_set_per_task_and_prefill_far_fewer_tokens() {
    let Some(dir) = common::tiny_model(&TinySpec::llama(7)) else {
        return;
    };
    let docs = DocSet::sampled(Pool::Search, Some(6), 0);
    let tasks = "arc_challenge,winogrande";
    let (faithful, faithful_shots) =
        evaluate_in_mode(dir.path(), tasks, docs, FewshotMode::PerDocument);
    let (shared, shared_shots) = evaluate_in_mode(dir.path(), tasks, docs, FewshotMode::Shared);
    let split = paft::eval::PoolSplit::default();
    for ((name, per_doc, _), (_, one, _)) in faithful_shots.iter().zip(&shared_shots) {
        assert!(
            one.iter().all(|s| s == &one[0] && !s.is_empty()),
            "{name}: {one:?}"
        );
        assert!(
            per_doc.iter().any(|s| s != &per_doc[0]),
            "{name}: lm-eval's shots differ per document"
        );
        if name == "winogrande" {
            // Shots come from the evaluation split: none may be a search-pool document.
            for &s in &one[0] {
                assert_ne!(
                    split.pool_of(name, s),
                    Some(Pool::Search),
                    "{name}: shot {s}"
                );
            }
        }
    }
    let (mut total_f, mut total_s) = (0, 0);
    for (f, s) in faithful.tasks.iter().zip(&shared.tasks) {
        let name = &f.name;
        let (f, s) = (f.tokens.prefilled, s.tokens.prefilled);
        eprintln!("{name}: {f} tokens prefilled with per-document shots, {s} with shared shots");
        // Measured: ARC (25 shots) 6215 vs 1439, Winogrande (5 short shots) 897 vs 311, on 6
        // documents; the gap grows with the documents, as the shots are paid once.
        assert!(
            s * 2 < f,
            "{name}: shared shots should prefill far fewer tokens: {s} vs {f}"
        );
        (total_f, total_s) = (total_f + f, total_s + s);
    }
    assert!(total_s * 3 < total_f, "{total_s} vs {total_f}");
}

/// MMLU in the shared-shot mode: a screening sample holds about one document per subject, so the
/// subjects share one description and one shot set drawn from every subject's dev rows, and
/// that prefix is prefilled once for all of them (with lm-eval's shots each subject pays for
/// its own description and shots on every document).
#[test]
fn mmlu_subjects_share_one_prefix_in_the_shared_shot_mode() {
    let Some(dir) = common::tiny_model(&TinySpec::llama(7)) else {
        return;
    };
    let docs = DocSet::sampled(Pool::Search, Some(3), 0);
    let tasks = "mmlu_anatomy,mmlu_astronomy,mmlu_virology";
    let (faithful, _) = evaluate_in_mode(dir.path(), tasks, docs, FewshotMode::PerDocument);
    let (shared, prepared) = evaluate_in_mode(dir.path(), tasks, docs, FewshotMode::Shared);
    let prefixes: Vec<&Vec<u32>> = prepared.iter().map(|t| &t.2).collect();
    let shots: Vec<&Vec<usize>> = prepared.iter().map(|t| &t.1[0]).collect();
    assert_eq!(shared.tasks.len(), 3);
    // One prefix and one shot set for every subject (5 of the pooled dev rows, not each
    // subject's first five).
    assert!(prefixes[0].len() > 100, "{} tokens", prefixes[0].len());
    assert!(prefixes.iter().all(|p| p == &prefixes[0]));
    assert!(
        shots.iter().all(|s| s == &shots[0] && s.len() == 5),
        "{shots:?}"
    );
    assert_ne!(shots[0], &vec![0, 1, 2, 3, 4]);
    // Paid once: the later subjects prefill less than the prefix itself.
    let prefilled: Vec<u64> = shared.tasks.iter().map(|t| t.tokens.prefilled).collect();
    assert!(prefilled[0] > prefixes[0].len() as u64, "{prefilled:?}");
    for p in &prefilled[1..] {
        assert!(*p < prefixes[0].len() as u64, "{prefilled:?}");
    }
    let f: u64 = faithful.tasks.iter().map(|t| t.tokens.prefilled).sum();
    let s: u64 = prefilled.iter().sum();
    assert!(s * 2 < f, "shared {s} vs per-document {f} tokens");
}

/// Subjects that share one prefix are scored together, their documents packed into the same
/// forwards (a screening sample holds about one document per subject, which would otherwise fill
/// a forward alone): each subject's scores are the ones it gets evaluated on its own, and the
/// time the group took is split over its subjects.
#[test]
fn subjects_scored_together_score_as_alone() {
    use paft::eval::task::Response;
    let Some(dir) = common::tiny_model(&TinySpec::llama(7)) else {
        return;
    };
    // The same two documents of each subject whether it runs alone or with the others.
    let docs = DocSet {
        pool: Pool::Search,
        selection: Selection::Limit(2),
    };
    let subjects = ["mmlu_anatomy", "mmlu_astronomy", "mmlu_virology"];
    let (together, prepared) =
        evaluate_in_mode(dir.path(), &subjects.join(","), docs, FewshotMode::Shared);
    assert!(prepared.iter().all(|t| t.2 == prepared[0].2));
    let log_likelihoods = |r: &paft::eval::TaskResult| -> Vec<f64> {
        r.records
            .iter()
            .flat_map(|d| match &d.response {
                Response::Loglikelihood(s) => s.iter().map(|c| c.0).collect::<Vec<_>>(),
                Response::Generation(g) => panic!("{}: generated {g:?}", r.name),
            })
            .collect()
    };
    for (subject, grouped) in subjects.iter().zip(&together.tasks) {
        assert_eq!(&grouped.name, subject);
        assert!(grouped.seconds > 0.0, "{subject}: {}", grouped.seconds);
        let (alone, _) = evaluate_in_mode(dir.path(), subject, docs, FewshotMode::Shared);
        let (a, g) = (log_likelihoods(&alone.tasks[0]), log_likelihoods(grouped));
        assert_eq!(a.len(), g.len(), "{subject}");
        assert!(a.len() >= 4, "{subject}: {} choices", a.len());
        for (x, y) in a.iter().zip(&g) {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                "{subject}: {x} alone, {y} together"
            );
        }
    }
    let split: f64 = together.tasks.iter().map(|t| t.seconds).sum();
    assert!(
        split <= together.seconds + 1e-9,
        "{split} s of {} s",
        together.seconds
    );
}

/// `paft eval --gsm8k-scoring gold_likelihood`: no generation; each GSM8K document scores the
/// gold solution after the prompt lm-eval's scoring would generate from, as its probability per
/// byte, under its own metric name (never exact_match), outside the leaderboard table.
#[test]
fn gsm8k_gold_likelihood_scores_the_gold_solution_after_the_same_prompt() {
    let Some(model) = common::tiny_model(&TinySpec::llama(7)) else {
        return;
    };
    let tasks_dir = common::shared_tasks_dir();
    let run = |scoring: &str, out: &Path| {
        let res = common::run_paft(&[
            "--quiet",
            "eval",
            "--model",
            model.path().to_str().unwrap(),
            "--tasks",
            "gsm8k,winogrande",
            "--tasks-dir",
            tasks_dir.to_str().unwrap(),
            "--limit",
            "3",
            "--gsm8k-scoring",
            scoring,
            "--output",
            out.to_str().unwrap(),
            "--log-samples",
        ]);
        common::expect_success(&res);
        let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
        let results: Value = serde_json::from_str(&read("results.json")).unwrap();
        let samples: Vec<Value> = read("samples_gsm8k.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (
            results,
            samples,
            String::from_utf8_lossy(&res.stdout).to_string(),
        )
    };
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (gold, gold_samples, table) = run("gold_likelihood", dirs.0.path());
    let (generated, generated_samples, _) = run("generate", dirs.1.path());
    assert_eq!(gold["config"]["gsm8k_scoring"], "gold_likelihood");
    assert_eq!(generated["config"]["gsm8k_scoring"], "generate");
    let g = &gold["results"]["gsm8k"];
    assert!(g.get("exact_match,strict-match").is_none(), "{g}");
    assert!(
        gold["leaderboard"].get("GSM8K").is_none(),
        "{}",
        gold["leaderboard"]
    );
    assert!(generated["leaderboard"].get("GSM8K").is_some());
    assert!(
        table.contains("GSM8K gold_byte_probability (screening)"),
        "{table}"
    );
    assert_eq!(gold["timing"]["tasks"]["gsm8k"]["tokens_generated"], 0);
    assert!(generated["timing"]["tasks"]["gsm8k"]["tokens_generated"].as_u64() > Some(0));
    // Winogrande is untouched by the GSM8K option.
    assert_eq!(
        gold["results"]["winogrande"]["acc,none"],
        generated["results"]["winogrande"]["acc,none"]
    );
    let mut values = vec![];
    for (s, t) in gold_samples.iter().zip(&generated_samples) {
        assert_eq!(s["doc_id"], t["doc_id"]);
        let args = s["arguments"].as_array().unwrap();
        assert_eq!(args.len(), 1, "{s}");
        // The prompt generation starts from, and the gold solution as the shots show theirs.
        assert_eq!(args[0]["context"], t["arguments"][0]["context"]);
        let continuation = args[0]["continuation"].as_str().unwrap();
        assert_eq!(continuation, format!(" {}", s["target"].as_str().unwrap()));
        let ll = s["resps"][0][0].as_f64().unwrap();
        assert!(ll < 0.0 && ll.is_finite(), "{ll}");
        let p = s["metrics"]["gold_byte_probability,none"].as_f64().unwrap();
        let want = (ll / continuation.len() as f64).exp();
        assert!((p - want).abs() < 1e-12, "{p} vs {want}");
        assert_eq!(s["paft_probability"].as_f64(), Some(p));
        values.push(p);
    }
    assert_eq!(values.len(), 3);
    let mean = values.iter().sum::<f64>() / 3.0;
    let got = g["gold_byte_probability,none"].as_f64().unwrap();
    assert!((got - mean).abs() < 1e-12, "{got} vs {mean}");
}
