//! Held-out alignment-tax metrics on tiny models and the shared training sets: the numbers equal
//! a by-hand recomputation from the model's logits, the base model scores exactly 0, and bad
//! input is a clear error.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use paft::data::examples::{parse_preference, parse_sft};
use paft::data::{first_held_out_rows, HeldOutRow, Tokenization, TokenizedSequence, Truncation};
use paft::eval::alignment_tax::{AlignmentTax, AlignmentTaxSets, AlignmentTaxSpec};
use paft::eval::{Pool, PoolSplit};
use paft::model::tiny::TinySpec;
use paft::model::{LlamaModel, Mode, Pretrained, TokenBatch};

fn train_set(rel: &str) -> PathBuf {
    paft::paths::shared_dir()
        .join("data")
        .join("train")
        .join(rel)
}

fn spec(sft: &Path, pref: &Path, sft_rows: usize, pref_rows: usize) -> AlignmentTaxSpec {
    AlignmentTaxSpec {
        sft_dataset: sft.display().to_string(),
        pref_dataset: pref.display().to_string(),
        sft_rows,
        pref_rows,
        max_length: 256,
        truncation: Truncation::KeepEnd,
        beta: 0.1,
        // Uneven batches, so padding is exercised.
        batch_size: 3,
    }
}

/// Σ log p over the completion tokens of one sequence, by hand: the sequence alone (no
/// padding), every position's logits, log-softmax in f64.
fn completion_logp_by_hand(model: &LlamaModel, s: &TokenizedSequence) -> (f64, u64) {
    let batch = TokenBatch::right_padded(std::slice::from_ref(&s.ids), &[0], 0);
    let hidden = model.forward(&batch, None).unwrap();
    let logits: Vec<Vec<f64>> = model
        .logits(&hidden)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let (mut sum, mut n) = (0.0, 0);
    for pos in 1..s.ids.len() {
        if !s.loss_mask[pos] {
            continue;
        }
        let row = &logits[pos - 1];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        sum += row[s.ids[pos] as usize] - lse;
        n += 1;
    }
    (sum, n)
}

/// The held-out row with this id, among the first `n` of `path`.
fn row_by_id(path: &Path, n: usize, id: &str) -> HeldOutRow {
    first_held_out_rows(path, n)
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("{id} is not among the first {n} held-out rows"))
}

/// `got` within `tol` of `want`, relative to |want| when that is above 1 (the nll sums are in
/// the hundreds, and f32 carries about 7 significant digits).
fn close(got: f64, want: f64, tol: f64, what: &str) {
    let allowed = tol * want.abs().max(1.0);
    assert!(
        (got - want).abs() <= allowed,
        "{what}: {got} vs {want} by hand (tolerance {allowed:.1e})"
    );
}

/// Every number of `tax` against the recomputation by hand with `model` and `base`.
fn check_by_hand(
    tax: &AlignmentTax,
    model: &LlamaModel,
    base: &LlamaModel,
    tok: &Tokenization,
    tol: f64,
) {
    let (sft, pref) = (
        train_set("sft/mixed_qa.jsonl"),
        train_set("preference/hh_harmless.jsonl"),
    );
    let (mut nll, mut tokens) = (0.0, 0);
    for r in &tax.sft.as_ref().unwrap().rows {
        let row = row_by_id(&sft, 10, &r.id);
        let ex = parse_sft(&sft, &[(row.line, row.value)]).unwrap();
        let (lp, n) = completion_logp_by_hand(model, &tok.sft(&ex[0], &r.id).unwrap());
        assert_eq!(r.tokens, n, "{}: completion tokens", r.id);
        close(r.nll_sum, -lp, tol, &format!("{} nll_sum", r.id));
        nll -= lp;
        tokens += n;
    }
    let e = tax.estimates();
    close(
        e.sft_loss.unwrap().value,
        nll / tokens as f64,
        tol,
        "held-out SFT loss",
    );
    let (mut wins, mut margin) = (0, 0.0);
    for p in &tax.preference.as_ref().unwrap().pairs {
        let row = row_by_id(&pref, 10, &p.id);
        let ex = parse_preference(&pref, &[(row.line, row.value)]).unwrap();
        let pair = tok.preference(&ex[0], &p.id).unwrap();
        let reward = |s: &TokenizedSequence| {
            0.1 * (completion_logp_by_hand(model, s).0 - completion_logp_by_hand(base, s).0)
        };
        let (c, r) = (reward(&pair.chosen), reward(&pair.rejected));
        close(p.chosen_reward, c, tol, &format!("{} chosen reward", p.id));
        close(
            p.rejected_reward,
            r,
            tol,
            &format!("{} rejected reward", p.id),
        );
        wins += usize::from(c > r);
        margin += c - r;
    }
    let n = tax.preference.as_ref().unwrap().pairs.len() as f64;
    assert_eq!(e.pref_accuracy.unwrap().value, 100.0 * wins as f64 / n);
    close(e.reward_margin.unwrap().value, margin / n, tol, "margin");
}

#[test]
fn alignment_tax_equals_a_recomputation_by_hand() {
    let Some(base_dir) = crate::common::tiny_model(&TinySpec::llama(41)) else {
        return;
    };
    let other_dir = crate::common::tiny_model(&TinySpec::llama(42)).unwrap();
    let (sft, pref) = (
        train_set("sft/mixed_qa.jsonl"),
        train_set("preference/hh_harmless.jsonl"),
    );
    // Held-out pairs of hh_harmless: lines 4, 20, 42, 79, 83, 87 (empty answer), 111, …
    let spec = spec(&sft, &pref, 5, 7);

    for dtype in [DType::F64, DType::F32] {
        let base = Pretrained::load(base_dir.path(), Some(dtype), &Device::Cpu).unwrap();
        let other = Pretrained::load(other_dir.path(), Some(dtype), &Device::Cpu).unwrap();
        let sets =
            AlignmentTaxSets::prepare(&base, &spec, Pool::All, &PoolSplit::default()).unwrap();
        let base_net = base.model(Mode::Inference, None).unwrap();
        let other_net = other.model(Mode::Inference, None).unwrap();

        // The base model against itself: every reward exactly 0, so no pair is won.
        let at_base = sets.measure(&base_net).unwrap();
        for p in &at_base.preference.as_ref().unwrap().pairs {
            assert_eq!((p.chosen_reward, p.rejected_reward), (0.0, 0.0), "{}", p.id);
        }
        let e = at_base.estimates();
        assert_eq!(e.pref_accuracy.unwrap().value, 0.0);
        assert_eq!(e.reward_margin.unwrap().value, 0.0);

        let tax = sets.measure(&other_net).unwrap();
        let ids: Vec<&str> = tax
            .sft
            .as_ref()
            .unwrap()
            .rows
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(
            ids,
            [
                "mixed_qa.jsonl:2",
                "mixed_qa.jsonl:17",
                "mixed_qa.jsonl:22",
                "mixed_qa.jsonl:36",
                "mixed_qa.jsonl:45"
            ]
        );
        let ids: Vec<&str> = tax
            .preference
            .as_ref()
            .unwrap()
            .pairs
            .iter()
            .map(|p| p.id.as_str())
            .collect();
        assert_eq!(
            ids,
            ["4", "20", "42", "79", "83", "111", "113"].map(|l| format!("hh_harmless.jsonl:{l}")),
            "the empty-answer row 87 is replaced by the next held-out row"
        );
        assert!(tax
            .preference
            .as_ref()
            .unwrap()
            .pairs
            .iter()
            .any(|p| p.chosen_reward != 0.0));

        let tok = Tokenization {
            tokenizer: &base.tokenizer,
            max_length: 256,
            truncation: Truncation::KeepEnd,
        };
        // f64 agrees to rounding. In f32 the log-probs are f32 (the by-hand path takes the
        // f64 model's logits), about 3e-7 apart per token: 2e-5 on a 70-token sum of 735.
        let tol = if dtype == DType::F64 { 1e-9 } else { 1e-5 };
        let (model64, base64) = if dtype == DType::F64 {
            (other_net, base_net)
        } else {
            let load = |d: &Path| {
                Pretrained::load(d, Some(DType::F64), &Device::Cpu)
                    .unwrap()
                    .model(Mode::Inference, None)
                    .unwrap()
            };
            (load(other_dir.path()), load(base_dir.path()))
        };
        eprintln!("{dtype:?}: {}", tax.summary());
        check_by_hand(&tax, &model64, &base64, &tok, tol);
    }
}

#[test]
fn measuring_a_model_unlike_the_base_is_an_error() {
    let Some(base_dir) = crate::common::tiny_model(&TinySpec::llama(43)) else {
        return;
    };
    let spec = spec(
        &train_set("sft/mixed_qa.jsonl"),
        &train_set("preference/hh_harmless.jsonl"),
        1,
        1,
    );
    let base = Pretrained::load(base_dir.path(), Some(DType::F32), &Device::Cpu).unwrap();
    let sets = AlignmentTaxSets::prepare(&base, &spec, Pool::All, &PoolSplit::default()).unwrap();
    let err = sets
        .measure(&base.model(Mode::Differentiable, None).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("inference mode"), "{err}");
    let f64_base = Pretrained::load(base_dir.path(), Some(DType::F64), &Device::Cpu).unwrap();
    let err = sets
        .measure(&f64_base.model(Mode::Inference, None).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("same dtype"), "{err}");
}

#[test]
fn bad_alignment_tax_input_gives_clear_errors() {
    let Some(base_dir) = crate::common::tiny_model(&TinySpec::llama(44)) else {
        return;
    };
    let base = Pretrained::load(base_dir.path(), Some(DType::F32), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let head = |rel: &str, n: usize| -> PathBuf {
        let text = std::fs::read_to_string(train_set(rel)).unwrap();
        let lines: Vec<&str> = text.lines().take(n).collect();
        let p = tmp.path().join(Path::new(rel).file_name().unwrap());
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    };
    // The first 30 SFT lines hold 3 held-out rows (2, 17, 22); the first 90 preference lines
    // hold 6 (4, 20, 42, 79, 83, 87), one of them with an empty answer.
    let sft = head("sft/mixed_qa.jsonl", 30);
    let pref = head("preference/hh_harmless.jsonl", 90);
    let err_of = |s: &AlignmentTaxSpec| {
        let e = AlignmentTaxSets::prepare(&base, s, Pool::All, &PoolSplit::default())
            .err()
            .expect("an error");
        format!("{e:#}")
    };

    let err = err_of(&spec(&sft, &pref, 4, 1));
    assert!(
        err.contains("mixed_qa.jsonl")
            && err.contains("4 held-out rows requested")
            && err.contains("only 3 can be used")
            && err.contains("3 held-out rows of 30"),
        "{err}"
    );
    let err = err_of(&spec(&sft, &pref, 3, 6));
    assert!(
        err.contains("hh_harmless.jsonl")
            && err.contains("only 5 can be used")
            && err.contains("1 of them cannot be used"),
        "{err}"
    );
    assert!(AlignmentTaxSets::prepare(
        &base,
        &spec(&sft, &pref, 3, 5),
        Pool::All,
        &PoolSplit::default()
    )
    .is_ok());

    let err = err_of(&spec(&tmp.path().join("nope.jsonl"), &pref, 1, 1));
    assert!(
        err.contains("sft_dataset") && err.contains("nope.jsonl") && err.contains("not found"),
        "{err}"
    );
    let err = err_of(&spec(&sft, &tmp.path().join("nope.jsonl"), 1, 1));
    assert!(
        err.contains("pref_dataset") && err.contains("not found"),
        "{err}"
    );

    // A held-out row that does not parse stops, naming it (only unusable rows are skipped).
    let bad = (0..)
        .map(|k| format!(r#"{{"messages": "not a list", "k": {k}}}"#))
        .find(|l| paft::data::heldout::is_held_out(l))
        .unwrap();
    let broken = tmp.path().join("broken.jsonl");
    std::fs::write(
        &broken,
        format!("{bad}\n{}", std::fs::read_to_string(&sft).unwrap()),
    )
    .unwrap();
    let err = err_of(&spec(&broken, &pref, 1, 1));
    assert!(
        err.contains("broken.jsonl: row 1") && err.contains("messages"),
        "{err}"
    );

    // Unknown keys in the experiment's table are refused.
    let table: toml::Table = toml::from_str(
        r#"
        sft_dataset = "a.jsonl"
        pref_dataset = "b.jsonl"
        sft_rows = 1
        pref_rows = 1
        max_length = 8
        truncation = "error"
        rows = 5
        "#,
    )
    .unwrap();
    let err = table.try_into::<AlignmentTaxSpec>().unwrap_err();
    assert!(err.to_string().contains("unknown field `rows`"), "{err}");
}

#[test]
fn the_search_and_report_pools_hold_disjoint_held_out_rows() {
    let Some(base_dir) = crate::common::tiny_model(&TinySpec::llama(45)) else {
        return;
    };
    let base = Pretrained::load(base_dir.path(), Some(DType::F32), &Device::Cpu).unwrap();
    let spec = spec(
        &train_set("sft/mixed_qa.jsonl"),
        &train_set("preference/hh_harmless.jsonl"),
        8,
        8,
    );
    let split = PoolSplit::default();
    let ids = |pool| {
        let sets = AlignmentTaxSets::prepare(&base, &spec, pool, &split).unwrap();
        let tax = sets
            .measure(&base.model(Mode::Inference, None).unwrap())
            .unwrap();
        let mut ids: Vec<String> = tax.sft.unwrap().rows.into_iter().map(|r| r.id).collect();
        ids.extend(tax.preference.unwrap().pairs.into_iter().map(|p| p.id));
        ids
    };
    let (search, report, all) = (ids(Pool::Search), ids(Pool::Report), ids(Pool::All));
    assert_eq!((search.len(), report.len()), (16, 16));
    assert!(
        search.iter().all(|id| !report.contains(id)),
        "{search:?} vs {report:?}"
    );
    // Each pool is a share of the held-out rows: every id is a held-out row of its file.
    let held: Vec<String> = ["sft/mixed_qa.jsonl", "preference/hh_harmless.jsonl"]
        .iter()
        .flat_map(|rel| first_held_out_rows(&train_set(rel), 60).unwrap())
        .map(|r| r.id)
        .collect();
    assert!(search.iter().chain(&report).all(|id| held.contains(id)));
    assert_ne!(search, all);
}
