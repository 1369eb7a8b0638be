//! Trainer parity with TRL 1.16 + PEFT 0.21 (fixtures from scripts/reference/make_train_fixtures.py):
//! step-0 SFT/DPO/ORPO losses and the parameters after one AdamW step, full and LoRA.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use paft::data::TokenizedSequence;
use paft::model::{LoraAdapter, Mode, ModelConfig, SafetensorsFiles};
use paft::train::objective::{dpo_loss, orpo_loss, pair_logps, sft_loss, DpoParams};
use paft::train::optimizer::{collect_grads, grad_norm, AdamW, AdamWParams};
use paft::train::params::Trainable;
use serde_json::Value;

use crate::common::fixture;

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("train/expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn seq(prompt: &Value, completion: &Value) -> TokenizedSequence {
    let (p, c) = (ids(prompt), ids(completion));
    TokenizedSequence {
        loss_mask: (0..p.len() + c.len()).map(|i| i >= p.len()).collect(),
        ids: [p, c].concat(),
    }
}

fn trainable(lora: bool) -> Trainable {
    let dir = fixture("train/tiny");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let w = SafetensorsFiles::open_dir(&dir)
        .unwrap()
        .load_all(None, &Device::Cpu)
        .unwrap();
    if lora {
        let adapter =
            LoraAdapter::load(&fixture("train/lora_init"), DType::F32, &Device::Cpu).unwrap();
        Trainable::lora(&cfg, &w, &adapter.config, Some(&adapter), 0, DType::F32).unwrap()
    } else {
        Trainable::full(&cfg, &w, DType::F32).unwrap()
    }
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-3),
        "{what}: paft {got} vs TRL {want}"
    );
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

/// One AdamW step as the fixture's Trainer took it; compares gradients and updated parameters.
fn step_and_compare(p: &Trainable, loss: &Tensor, want: &Value, after: &str) {
    let store = loss.backward().unwrap();
    let grads = collect_grads(&p.vars, &store);
    close(
        grad_norm(&grads).unwrap(),
        want["step"]["grad_global_l2_norm"].as_f64().unwrap(),
        1e-4,
        "grad norm",
    );
    let mut opt = AdamW::new(
        &p.vars,
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
    )
    .unwrap();
    opt.step(&p.vars, &grads, &p.decay, 1e-3).unwrap();
    let reference: BTreeMap<String, Tensor> = candle_core::safetensors::load(
        fixture(&format!("train/after_step/{after}.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .collect();
    let mut worst = 0f32;
    for (name, t) in p.tensors() {
        // LoRA tensors are stored under PEFT's names.
        let key = if name.ends_with(".lora_A") || name.ends_with(".lora_B") {
            format!("base_model.model.{name}.weight")
        } else {
            name.clone()
        };
        let r = reference
            .get(&key)
            .unwrap_or_else(|| panic!("{after}: fixture lacks {key}"));
        let d = crate::common::max_abs_diff(&t, r);
        worst = worst.max(d);
        assert!(d < 1e-5, "{after}: {name} differs by {d}");
    }
    eprintln!("{after}: parameters after one AdamW step within {worst:.1e} of TRL");
}

#[test]
fn sft_dpo_orpo_match_trl() {
    let e = expected();
    for (lora, tag) in [(false, "full"), (true, "lora")] {
        // SFT
        let p = trainable(lora);
        let model = p.model(Mode::Differentiable).unwrap();
        let sft: Vec<TokenizedSequence> = e["batches"]["sft"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| seq(&b["prompt"], &b["completion"]))
            .collect();
        let (loss, _) = sft_loss(&model, &sft.iter().collect::<Vec<_>>(), 0).unwrap();
        let want = &e["sft"][tag];
        close(
            scalar(&loss),
            want["step0"]["loss"].as_f64().unwrap(),
            1e-4,
            &format!("sft {tag} loss"),
        );
        step_and_compare(&p, &loss, want, &format!("sft_{tag}"));

        let pref = e["batches"]["preference"].as_array().unwrap();
        let chosen: Vec<TokenizedSequence> = pref
            .iter()
            .map(|b| seq(&b["prompt"], &b["chosen"]))
            .collect();
        let rejected: Vec<TokenizedSequence> = pref
            .iter()
            .map(|b| seq(&b["prompt"], &b["rejected"]))
            .collect();
        let (c, r): (Vec<_>, Vec<_>) = (chosen.iter().collect(), rejected.iter().collect());

        // DPO: the reference is the initial model without the adapter.
        let p = trainable(lora);
        let model = p.model(Mode::Differentiable).unwrap();
        // Same code path as the policy, so an unchanged policy has exactly zero rewards (as in TRL).
        let base = trainable(false).model(Mode::Differentiable).unwrap();
        let (rc, rr) = pair_logps(&base, &c, &r, 0).unwrap();
        let (pc, pr) = pair_logps(&model, &c, &r, 0).unwrap();
        let want = &e["dpo"][tag];
        for (got, key) in [
            (&pc, "policy_chosen_logps"),
            (&pr, "policy_rejected_logps"),
            (&rc, "ref_chosen_logps"),
            (&rr, "ref_rejected_logps"),
        ] {
            for (g, w) in vec1(got).iter().zip(want["step0"][key].as_array().unwrap()) {
                close(*g, w.as_f64().unwrap(), 1e-4, &format!("dpo {tag} {key}"));
            }
        }
        let out = dpo_loss(
            (&pc, &pr),
            Some((&rc.detach(), &rr.detach())),
            DpoParams {
                beta: 0.1,
                label_smoothing: 0.0,
            },
        )
        .unwrap();
        close(
            scalar(&out.loss),
            want["step0"]["loss"].as_f64().unwrap(),
            1e-4,
            &format!("dpo {tag} loss"),
        );
        for (g, w) in out
            .chosen_rewards
            .iter()
            .zip(want["step0"]["chosen_rewards"].as_array().unwrap())
        {
            assert!(
                (g - w.as_f64().unwrap()).abs() < 1e-5,
                "dpo {tag} chosen reward {g} vs {w}"
            );
        }
        for (g, w) in out
            .rejected_rewards
            .iter()
            .zip(want["step0"]["rejected_rewards"].as_array().unwrap())
        {
            assert!(
                (g - w.as_f64().unwrap()).abs() < 1e-5,
                "dpo {tag} rejected reward {g} vs {w}"
            );
        }
        close(
            out.reward_accuracy(),
            want["step0"]["reward_accuracy"].as_f64().unwrap(),
            1e-9,
            "reward accuracy",
        );
        step_and_compare(&p, &out.loss, want, &format!("dpo_{tag}"));

        // ORPO
        let p = trainable(lora);
        let model = p.model(Mode::Differentiable).unwrap();
        let out = orpo_loss(&model, &c, &r, 0, 0.1).unwrap();
        let want = &e["orpo"][tag];
        close(
            scalar(&out.loss),
            want["step0"]["loss"].as_f64().unwrap(),
            1e-4,
            &format!("orpo {tag} loss"),
        );
        close(
            out.nll,
            want["step0"]["nll_loss"].as_f64().unwrap(),
            1e-4,
            &format!("orpo {tag} nll"),
        );
        for (g, w) in out.log_odds.iter().zip(
            want["step0"]["log_odds_ratio_per_example"]
                .as_array()
                .unwrap(),
        ) {
            close(
                *g,
                w.as_f64().unwrap(),
                1e-4,
                &format!("orpo {tag} log odds"),
            );
        }
        step_and_compare(&p, &out.loss, want, &format!("orpo_{tag}"));
    }
}

// ------------------------------------------------------------------ the command, resume, bad input

fn write_lines(dir: &std::path::Path, name: &str, lines: &[String]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn shared_rows(rel: &str, n: usize) -> Vec<String> {
    let shared = crate::common::require_shared().unwrap();
    std::fs::read_to_string(shared.join(rel))
        .unwrap()
        .lines()
        .take(n)
        .map(String::from)
        .collect()
}

/// The first `n` rows of the shared mixed_qa SFT set, as `dir/sft.jsonl`.
fn sft_rows_file(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    write_lines(
        dir,
        "sft.jsonl",
        &shared_rows("data/train/sft/mixed_qa.jsonl", n),
    )
}

/// A 6-step full fine-tune (SFT) of a tiny model into `out`, which must succeed.
fn full_ft_sft(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) {
    let mut args = vec![
        "--lora-r",
        "0",
        "--max-steps",
        "6",
        "--max-length",
        "256",
        "--truncation",
        "keep_start",
    ];
    args.extend_from_slice(extra);
    let res = train_cmd("sft", model, data, out, &args).output().unwrap();
    crate::common::expect_success(&res);
}

fn train_cmd(
    objective: &str,
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Command {
    let mut cmd = crate::common::paft();
    cmd.args([
        "--quiet",
        "train",
        objective,
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "3",
    ]);
    // LoRA r 4 unless the test picks its own rank (0: full fine-tuning).
    if !extra.contains(&"--lora-r") {
        cmd.args(["--lora-r", "4"]);
    }
    cmd.args(extra);
    cmd
}

#[test]
fn killed_run_resumes_to_the_same_weights() {
    let Some(model) = crate::common::tiny_model(&paft::model::tiny::TinySpec::llama(21)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_rows_file(tmp.path(), 24);
    let args = [
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--max-length",
        "256",
        "--truncation",
        "keep_start",
        // Dropout masks must replay exactly on resume too.
        "--lora-dropout",
        "0.1",
    ];

    // Plain, and with gradient checkpointing (which replays each layer's dropout masks when it
    // recomputes the layer): a killed run resumes bit-identically either way.
    let mut ends = vec![];
    for checkpointing in ["false", "true"] {
        let mut args = args.to_vec();
        args.extend(["--gradient-checkpointing", checkpointing]);
        let full = tmp.path().join(format!("full-{checkpointing}"));
        let part = tmp.path().join(format!("part-{checkpointing}"));
        ends.push(killed_and_resumed(model.path(), &data, &full, &part, &args));
    }
    // Recomputation changes float rounding only (the gradients agree within 1e-6 relative).
    let (a, b) = (&ends[0], &ends[1]);
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(
        diff <= 1e-4 * scale,
        "checkpointed run ended {diff} from the plain one (scale {scale})"
    );
    let full = tmp.path().join("full-false");
    let a = std::fs::read(full.join("adapter/adapter_model.safetensors")).unwrap();

    // Dropout is real: the same run without it ends elsewhere.
    let plain = tmp.path().join("plain");
    let mut plain_args = args.to_vec();
    *plain_args.last_mut().unwrap() = "0.0";
    let out = train_cmd("sft", model.path(), &data, &plain, &plain_args)
        .output()
        .unwrap();
    crate::common::expect_success(&out);
    let c = std::fs::read(plain.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a != c, "lora_dropout had no effect");
}

#[test]
fn bad_training_data_and_config_give_clear_errors() {
    let Some(model) = crate::common::tiny_model(&paft::model::tiny::TinySpec::llama(22)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let check = |objective: &str, data: &std::path::Path, extra: &[&str], needles: &[&str]| {
        let res = train_cmd(objective, model.path(), data, &out, extra)
            .args(["--max-steps", "1"])
            .output()
            .unwrap();
        let err = crate::common::expect_clean_failure(&res);
        for n in needles {
            assert!(err.contains(n), "expected {n:?} in: {err}");
        }
    };
    let mut pref = shared_rows("data/train/preference/hh_harmless.jsonl", 4);
    let mut row: Value = serde_json::from_str(&pref[2]).unwrap();
    row.as_object_mut().unwrap().remove("chosen");
    pref[2] = row.to_string();
    let p = write_lines(tmp.path(), "pref.jsonl", &pref);
    check("dpo", &p, &[], &["row 3", "`chosen`", "missing"]);

    let sft = vec![
        r#"{"prompt": "What is 2+2?", "completion": "4"}"#.to_string(),
        r#"{"prompt": "Say nothing.", "completion": ""}"#.to_string(),
    ];
    let p = write_lines(tmp.path(), "empty.jsonl", &sft);
    check("sft", &p, &[], &["row 2", "completion", "empty"]);

    let long = vec![format!(
        r#"{{"prompt": "{}", "completion": "yes"}}"#,
        "word ".repeat(400)
    )];
    let p = write_lines(tmp.path(), "long.jsonl", &long);
    check(
        "sft",
        &p,
        &["--max-length", "256"],
        &["row 1", "max_length 256"],
    );

    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "learning_rate = 1e-4\n").unwrap();
    let res = crate::common::paft()
        .args(["--quiet", "train", "sft", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = crate::common::expect_clean_failure(&res);
    assert!(
        err.contains("bad.toml") && err.contains("learning_rate"),
        "{err}"
    );
}

/// Exact-zero share of the full fine-tune's delta, from `paft inspect-delta --json`.
fn delta_zero_share(base: &std::path::Path, run: &std::path::Path) -> f64 {
    let out = crate::common::paft()
        .args(["--quiet", "inspect-delta", "--json", "--base"])
        .arg(base)
        .arg("--model")
        .arg(run.join("model"))
        .output()
        .unwrap();
    crate::common::expect_success(&out);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["overall"]["frac_zero"].as_f64().unwrap()
}

#[test]
fn proximal_l1_leaves_exact_zeros_in_the_delta() {
    let Some(model) = crate::common::tiny_model(&paft::model::tiny::TinySpec::llama(23)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_rows_file(tmp.path(), 16);
    let run = |name: &str, mode: &str, lambda: &str| {
        let out_dir = tmp.path().join(name);
        let args = [
            "--save-every",
            "0",
            "--l1-mode",
            mode,
            "--l1-lambda",
            lambda,
        ];
        full_ft_sft(model.path(), &data, &out_dir, &args);
        delta_zero_share(model.path(), &out_dir)
    };
    let plain = run("plain", "proximal", "0");
    let proximal = run("proximal", "proximal", "1.0");
    let adam_metric = run("adam", "proximal_adam", "1e-5");
    eprintln!("exact zeros: plain {plain}, proximal {proximal}, proximal_adam {adam_metric}");
    assert!(plain < 0.05, "no L1 yet {plain} of the delta is exactly 0");
    // lr·λ ≥ Adam's sign-like first step, so almost nothing survives.
    assert!(proximal > 0.9, "proximal λ=1: only {proximal} exact zeros");
    // In Adam's metric the threshold follows each weight's gradient: many zeros, not all.
    assert!(
        adam_metric > plain + 0.2 && adam_metric < 1.0,
        "proximal_adam λ=1e-5: {adam_metric} exact zeros (plain {plain})"
    );
}

/// Per tensor, the positions where `weights` equals `base` (δ exactly 0).
fn zero_delta_positions(
    base: &BTreeMap<String, Tensor>,
    weights: &BTreeMap<String, Tensor>,
) -> BTreeMap<String, Vec<u8>> {
    weights
        .iter()
        .map(|(name, w)| {
            let eq = w.eq(&base[name]).unwrap().flatten_all().unwrap();
            (name.clone(), eq.to_vec1::<u8>().unwrap())
        })
        .collect()
}

#[test]
fn l1_refit_moves_only_the_survivors() {
    let Some(model) = crate::common::tiny_model(&paft::model::tiny::TinySpec::llama(29)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_rows_file(tmp.path(), 16);
    let out_dir = tmp.path().join("refit");
    let args = [
        "--save-every",
        "4",
        "--l1-mode",
        "proximal_adam",
        "--l1-lambda",
        "1e-5",
        "--l1-refit-steps",
        "3",
    ];
    full_ft_sft(model.path(), &data, &out_dir, &args);
    let load = |path: std::path::PathBuf| -> BTreeMap<String, Tensor> {
        candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect()
    };
    let load_dir = |dir: &std::path::Path| -> BTreeMap<String, Tensor> {
        SafetensorsFiles::open_dir(dir)
            .unwrap()
            .load_all(None, &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect()
    };
    let base = load_dir(model.path());
    // Steps 1–3 are L1 steps, 4–6 refit; the checkpoint after step 4 is the last one kept.
    let mid_refit = load(out_dir.join("checkpoints/step-000004/params.safetensors"));
    let final_model = load_dir(&out_dir.join("model"));
    let final_trained: BTreeMap<String, Tensor> = mid_refit
        .keys()
        .map(|k| (k.clone(), final_model[k].clone()))
        .collect();
    let zeros_mid_refit = zero_delta_positions(&base, &mid_refit);
    let zeros_final = zero_delta_positions(&base, &final_trained);
    let zero_share = zeros_final
        .values()
        .flatten()
        .map(|&z| z as f64)
        .sum::<f64>()
        / zeros_final.values().map(Vec::len).sum::<usize>() as f64;
    assert!(
        zero_share > 0.2,
        "only {zero_share} of the delta is exactly 0"
    );
    assert!(
        zeros_mid_refit == zeros_final,
        "the refit changed which weights are exactly 0"
    );
    let moved: usize = mid_refit
        .iter()
        .map(|(k, w)| {
            let ne = w.ne(&final_trained[k]).unwrap().flatten_all().unwrap();
            ne.to_vec1::<u8>()
                .unwrap()
                .iter()
                .filter(|&&b| b == 1)
                .count()
        })
        .sum();
    assert!(
        moved > 0,
        "the refit steps left every survivor where it was"
    );
}

#[test]
fn l1_refit_settings_that_cannot_work_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_rows_file(tmp.path(), 2);
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--l1-mode",
                "penalty",
                "--l1-lambda",
                "0.1",
                "--l1-refit-steps",
                "2",
            ],
            "needs a proximal L1",
        ),
        (
            &[
                "--l1-mode",
                "proximal",
                "--l1-lambda",
                "0.1",
                "--l1-refit-steps",
                "8",
                "--max-steps",
                "8",
            ],
            "must be below `max_steps`",
        ),
        (&["--l1-refit-lr", "1e-4"], "no refit steps"),
    ];
    for (args, want) in cases {
        let out = train_cmd(
            "sft",
            std::path::Path::new("unused-model"),
            &data,
            &tmp.path().join("run"),
            args,
        )
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: unclear error: {err}");
    }
}

// ------------------------------------------------------------------ the held-out split

/// 30 prompt/completion rows; lines 1, 16, 25 and 27 are held out (FNV-1a of the line, mod 10,
/// computed outside paft).
fn split_sft_lines() -> (Vec<String>, [usize; 4]) {
    let lines = (0..30)
        .map(|i| {
            format!(
                r#"{{"prompt": "Question {i}: what comes after {i}?", "completion": " {}."}}"#,
                i + 1
            )
        })
        .collect();
    (lines, [1, 16, 25, 27])
}

/// 30 preference rows; lines 1, 5, 7, 18, 21 and 29 are held out.
fn split_pref_lines() -> (Vec<String>, [usize; 6]) {
    let lines = (0..30)
        .map(|i| {
            let (c, r) = if i % 2 == 0 { ("yes", "no") } else { ("no", "yes") };
            format!(
                r#"{{"prompt": "Is {i} even?", "chosen": " Answer {i}: {c}.", "rejected": " Answer {i}: {r}."}}"#
            )
        })
        .collect();
    (lines, [1, 5, 7, 18, 21, 29])
}

/// Lines as `(1-based line number, JSON)`, as the row parsers take them.
fn numbered_rows(lines: &[String]) -> Vec<(usize, Value)> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| (i + 1, serde_json::from_str(l).unwrap()))
        .collect()
}

/// A trainer for `data` (data loaded, nothing trained yet).
fn trainer_for(
    model: &std::path::Path,
    data: &std::path::Path,
    out: &std::path::Path,
    objective: paft::train::Objective,
    limit: Option<usize>,
) -> paft::train::Trainer {
    let cfg = paft::train::TrainConfig {
        model: model.display().to_string(),
        dataset: data.display().to_string(),
        output: out.to_path_buf(),
        limit,
        max_length: 256,
        batch_size: 2,
        max_steps: 1,
        ..Default::default()
    };
    paft::train::Trainer::new(cfg, objective).unwrap()
}

/// The batches of a trainer's first three epochs, drawn as its loop draws them.
fn batches_of(t: &paft::train::Trainer, lengths: &[usize]) -> Vec<Vec<usize>> {
    (0..3)
        .flat_map(|epoch| {
            paft::data::length_grouped_batches(lengths, t.cfg.batch_size, t.cfg.seed, epoch)
        })
        .collect()
}

#[test]
fn held_out_rows_never_reach_a_training_batch() {
    use paft::data::examples::{parse_preference, parse_sft};
    use paft::data::{first_held_out_rows, Tokenization, Truncation};
    use paft::train::trainer::Dataset;
    use paft::train::Objective;

    let Some(model) = crate::common::tiny_model(&paft::model::tiny::TinySpec::llama(31)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let pre = paft::model::Pretrained::load(model.path(), Some(DType::F32), &Device::Cpu).unwrap();
    let tok = Tokenization {
        tokenizer: &pre.tokenizer,
        max_length: 256,
        truncation: Truncation::Error,
    };

    // SFT: the trainer's examples are exactly the rows outside the split, in file order, with
    // `limit` counting training rows only (line 1 is held out: a limit applied before the split
    // would leave 4 of the first 5 lines).
    let (lines, held) = split_sft_lines();
    let path = write_lines(tmp.path(), "split_sft.jsonl", &lines);
    let found: Vec<usize> = first_held_out_rows(&path, held.len())
        .unwrap()
        .iter()
        .map(|r| r.line)
        .collect();
    assert_eq!(found, held, "the split is not FNV-1a of the line mod 10");
    let rows = numbered_rows(&lines);
    let seqs: Vec<TokenizedSequence> = parse_sft(&path, &rows)
        .unwrap()
        .iter()
        .map(|e| tok.sft(e, "row").unwrap())
        .collect();
    let held_ids: Vec<&Vec<u32>> = held.iter().map(|&l| &seqs[l - 1].ids).collect();
    for limit in [None, Some(5)] {
        let want: Vec<&TokenizedSequence> = (1..=lines.len())
            .filter(|l| !held.contains(l))
            .take(limit.unwrap_or(usize::MAX))
            .map(|l| &seqs[l - 1])
            .collect();
        let t = trainer_for(
            model.path(),
            &path,
            &tmp.path().join("sft"),
            Objective::Sft,
            limit,
        );
        let Dataset::Sft(got) = &t.data else {
            panic!("SFT data expected")
        };
        assert_eq!(got.len(), want.len(), "limit {limit:?}: examples loaded");
        assert_eq!(got.iter().collect::<Vec<_>>(), want, "limit {limit:?}");
        let lengths: Vec<usize> = got.iter().map(|s| s.len()).collect();
        for batch in batches_of(&t, &lengths) {
            for i in batch {
                assert!(
                    !held_ids.contains(&&got[i].ids),
                    "a held-out row reached a training batch"
                );
            }
        }
    }

    // Preference pairs (DPO, reference log-probs included) likewise.
    let (lines, held) = split_pref_lines();
    let path = write_lines(tmp.path(), "split_pref.jsonl", &lines);
    let found: Vec<usize> = first_held_out_rows(&path, held.len())
        .unwrap()
        .iter()
        .map(|r| r.line)
        .collect();
    assert_eq!(found, held, "the split is not FNV-1a of the line mod 10");
    let pairs: Vec<paft::data::PreferencePair> = parse_preference(&path, &numbered_rows(&lines))
        .unwrap()
        .iter()
        .map(|e| tok.preference(e, "row").unwrap())
        .collect();
    let held_ids: Vec<&Vec<u32>> = held
        .iter()
        .flat_map(|&l| [&pairs[l - 1].chosen.ids, &pairs[l - 1].rejected.ids])
        .collect();
    let t = trainer_for(
        model.path(),
        &path,
        &tmp.path().join("dpo"),
        Objective::Dpo,
        None,
    );
    let Dataset::Preference(got) = &t.data else {
        panic!("preference data expected")
    };
    let want: Vec<&paft::data::PreferencePair> = (1..=lines.len())
        .filter(|l| !held.contains(l))
        .map(|l| &pairs[l - 1])
        .collect();
    assert_eq!(got.len(), want.len(), "pairs loaded");
    assert_eq!(got.iter().collect::<Vec<_>>(), want);
    let lengths: Vec<usize> = got.iter().map(|p| p.chosen.len()).collect();
    for batch in batches_of(&t, &lengths) {
        for i in batch {
            for ids in [&got[i].chosen.ids, &got[i].rejected.ids] {
                assert!(
                    !held_ids.contains(&ids),
                    "a held-out pair reached a training batch"
                );
            }
        }
    }
}

/// Trains `full` uninterrupted, and `part` killed once a checkpoint exists then resumed; asserts
/// both end with the same bytes and one metrics line per step. Returns the final LoRA values.
fn killed_and_resumed(
    model: &std::path::Path,
    data: &std::path::Path,
    full: &std::path::Path,
    part: &std::path::Path,
    args: &[&str],
) -> Vec<f32> {
    let out = train_cmd("sft", model, data, full, args).output().unwrap();
    crate::common::expect_success(&out);

    // Kill with SIGKILL once a checkpoint exists, then resume.
    let mut child = train_cmd("sft", model, data, part, args).spawn().unwrap();
    let ckpt_root = part.join("checkpoints");
    let start = std::time::Instant::now();
    loop {
        let done = std::fs::read_dir(&ckpt_root)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
            })
            .unwrap_or(false);
        if done || start.elapsed().as_secs() > 120 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    if status.success() {
        eprintln!("run finished before the kill; resuming a finished run must still reproduce it");
    }
    assert!(!part.join("adapter").exists() || status.success());
    let out = train_cmd("sft", model, data, part, args)
        .arg("--resume")
        .output()
        .unwrap();
    crate::common::expect_success(&out);
    let a = std::fs::read(full.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(part.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed run ended with different weights");
    let steps: Vec<u64> = std::fs::read_to_string(part.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=8).collect::<Vec<_>>(),
        "one metrics line per step"
    );

    let tensors: std::collections::BTreeMap<_, _> =
        candle_core::safetensors::load_buffer(&a, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    tensors
        .values()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

// ------------------------------------------------------------------ mixed precision

fn metrics(run: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The saved tensors of a run's result (adapter or full model), by name.
fn result_tensors(run: &std::path::Path) -> BTreeMap<String, Tensor> {
    let file = [
        "adapter/adapter_model.safetensors",
        "model/model.safetensors",
    ]
    .iter()
    .map(|f| run.join(f))
    .find(|p| p.exists())
    .expect("a trained result");
    candle_core::safetensors::load(&file, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// ‖a − b‖ over ‖b − start‖ (the update's size), over all tensors: how far the mixed-precision
/// run's update is from the f32 one's, relative to the update.
fn update_error(
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    start: Option<&BTreeMap<String, Tensor>>,
) -> f64 {
    let (mut diff, mut moved) = (0f64, 0f64);
    for (name, tb) in b {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (va, vb) = (flat(&a[name]), flat(tb));
        let v0 = start.map_or(vec![0f32; vb.len()], |s| flat(&s[name]));
        for ((x, y), z) in va.iter().zip(&vb).zip(&v0) {
            diff += ((x - y) as f64).powi(2);
            moved += ((y - z) as f64).powi(2);
        }
    }
    assert!(moved > 0.0, "the f32 run did not move");
    (diff / moved).sqrt()
}

#[test]
fn mixed_precision_keeps_f32_parameters_and_follows_the_f32_run() {
    let Some(model) = crate::common::tiny_model(&paft::model::tiny::TinySpec::llama(23)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = sft_rows_file(tmp.path(), 16);
    let base = SafetensorsFiles::open_dir(model.path())
        .unwrap()
        .load_all(None, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect::<BTreeMap<_, _>>();
    for rank in ["4", "0"] {
        let mut ends = vec![];
        for mixed in ["no", "bf16", "fp16"] {
            let out = tmp.path().join(format!("r{rank}-{mixed}"));
            let args = [
                "--lora-r",
                rank,
                "--max-steps",
                "4",
                "--save-every",
                "4",
                "--max-length",
                "256",
                "--truncation",
                "keep_start",
                "--mixed-precision",
                mixed,
            ];
            let res = train_cmd("sft", model.path(), &data, &out, &args)
                .output()
                .unwrap();
            crate::common::expect_success(&res);
            let saved = result_tensors(&out);
            // The trained parameters and AdamW's moments stay f32 whatever the passes ran in.
            assert!(saved.values().all(|t| t.dtype() == DType::F32), "{mixed}");
            let ckpt = out.join("checkpoints/step-000004");
            for f in ["params.safetensors", "optimizer.safetensors"] {
                let t = candle_core::safetensors::load(ckpt.join(f), &Device::Cpu).unwrap();
                assert!(t.values().all(|t| t.dtype() == DType::F32), "{mixed} {f}");
            }
            let m = metrics(&out);
            assert_eq!(m.len(), 4);
            // Only fp16 scales the loss, from GradScaler's 2^16.
            assert_eq!(
                m[0].get("loss_scale").and_then(Value::as_f64),
                (mixed == "fp16").then_some(65536.0)
            );
            ends.push((m[0]["loss"].as_f64().unwrap(), saved));
        }
        let start = (rank == "0").then_some(&base);
        for (i, mixed) in [(1, "bf16"), (2, "fp16")] {
            // The same first loss to the passes' precision, and the same update to a few
            // percent; not the same bits (the passes really ran in 16 bits).
            let (l32, l16) = (ends[0].0, ends[i].0);
            assert!(
                (l16 - l32).abs() < 0.02 * l32,
                "r{rank} {mixed}: loss {l16} vs f32 {l32}"
            );
            let err = update_error(&ends[i].1, &ends[0].1, start);
            eprintln!("r{rank} {mixed}: loss {l16} vs {l32}, update error {err}");
            assert!(
                err < 0.1,
                "r{rank} {mixed}: update off by {err} of its size"
            );
            assert!(err > 0.0, "r{rank} {mixed}: identical to the f32 run");
        }
    }
}

#[test]
fn mixed_precision_dpo_starts_at_zero_rewards_and_resumes_exactly() {
    let Some(model) = crate::common::tiny_model(&paft::model::tiny::TinySpec::llama(24)) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // DPO under bf16: the reference runs in the policy's compute dtype, so the untrained policy
    // (LoRA B = 0, and full fine-tuning's cast master weights) has exactly zero rewards.
    let pref = write_lines(
        tmp.path(),
        "pref.jsonl",
        &shared_rows("data/train/preference/hh_harmless.jsonl", 8),
    );
    for rank in ["4", "0"] {
        let out = tmp.path().join(format!("dpo-r{rank}"));
        let args = [
            "--lora-r",
            rank,
            "--max-steps",
            "1",
            "--max-length",
            "256",
            "--truncation",
            "keep_start",
            "--mixed-precision",
            "bf16",
        ];
        let res = train_cmd("dpo", model.path(), &pref, &out, &args)
            .output()
            .unwrap();
        crate::common::expect_success(&res);
        let m = &metrics(&out)[0];
        assert_eq!(m["rewards/chosen"].as_f64(), Some(0.0), "r{rank}: {m}");
        assert_eq!(m["rewards/rejected"].as_f64(), Some(0.0), "r{rank}: {m}");
    }

    // A killed fp16 run resumes bit-identically: the loss scale is part of the checkpoint.
    let data = sft_rows_file(tmp.path(), 24);
    let args = [
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--max-length",
        "256",
        "--truncation",
        "keep_start",
        "--mixed-precision",
        "fp16",
    ];
    let (full, part) = (tmp.path().join("fp16-full"), tmp.path().join("fp16-part"));
    killed_and_resumed(model.path(), &data, &full, &part, &args);
    let state: Value = serde_json::from_slice(
        &std::fs::read(part.join("checkpoints/step-000008/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state["loss_scaler"]["scale"].as_f64(),
        Some(65536.0),
        "{state}"
    );
    assert_eq!(state["optimizer_step"].as_u64(), Some(8), "{state}");

    // Mixed precision with 16-bit trained parameters is refused before anything loads.
    let res = train_cmd(
        "sft",
        model.path(),
        &data,
        &tmp.path().join("bad"),
        &["--mixed-precision", "bf16", "--dtype", "bf16"],
    )
    .output()
    .unwrap();
    let err = crate::common::expect_clean_failure(&res);
    assert!(
        err.contains("mixed_precision") && err.contains("f32"),
        "{err}"
    );
}
