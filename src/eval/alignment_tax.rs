//! The alignment tax, measured on held-out training-distribution rows (`crate::data::heldout`):
//! what a model lost of its SFT skill, and what it learned of the preferences.
//!
//! - **Held-out SFT loss**: token-mean cross-entropy over the completion tokens of N held-out
//!   SFT rows (Σ nll / Σ tokens over all rows, as TRL's SFT loss averages a batch).
//! - **Held-out preference accuracy and margin**: on N held-out pairs, DPO's implicit reward
//!   r = β·(log π(y|x) − log π_base(y|x)), the log-probs summed over the completion tokens as TRL's
//!   DPO sums them; accuracy = share of pairs with r_chosen > r_rejected (strictly, so the base
//!   model scores 0), margin = mean(r_chosen − r_rejected).
//!
//! [`AlignmentTaxSets::prepare`] tokenizes the rows once, as training does, and scores the pairs
//! with the base model once; [`AlignmentTaxSets::measure`] then scores any model of the
//! comparison (base, SFT, DPO/ORPO, sequential, PAFT, …) on exactly the same tokens.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::data::examples::{parse_preference, parse_sft, resolve_dataset};
use crate::data::heldout::{first_usable_held_out_rows, HeldOutRow};
use crate::data::{PreferencePair, Tokenization, TokenizedSequence, Truncation};
use crate::eval::pools::{Pool, PoolSplit};
use crate::io::write_file_atomic;
use crate::model::{LlamaModel, Mode, Pretrained};
use crate::stats::{mean_stderr, ratio_stderr, Estimate};
use crate::train::objective::target_logps;

/// The file [`AlignmentTax::write`] writes into a row's directory.
pub const FILE_NAME: &str = "alignment_tax.json";

/// What to measure on: the `[alignment_tax]` table of an experiment. Unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignmentTaxSpec {
    /// SFT dataset whose held-out rows give the SFT loss (a file or `hub:owner/name/path`; the
    /// training run's own dataset, so the rows come from the distribution it trained on).
    pub sft_dataset: String,
    /// Preference dataset whose held-out pairs give accuracy and margin.
    pub pref_dataset: String,
    /// N held-out SFT rows (the first N usable ones in file order).
    pub sft_rows: usize,
    /// N held-out pairs (the first N usable ones in file order).
    pub pref_rows: usize,
    /// Token limit per sequence; no default: use the training runs' value.
    pub max_length: usize,
    /// What happens to longer sequences, as in training; no default: use the training runs'
    /// value. With `error` a long row is unusable and the next held-out row replaces it.
    pub truncation: Truncation,
    /// β of the implicit reward. Default 0.1, TRL's `DPOConfig.beta`.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Sequences (SFT) or pairs (preference) per forward pass; changes memory and speed, not
    /// the numbers beyond float rounding. Default 4, as `paft train`'s `batch_size`.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_beta() -> f64 {
    0.1
}

fn default_batch_size() -> usize {
    4
}

impl AlignmentTaxSpec {
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("sft_rows", self.sft_rows),
            ("pref_rows", self.pref_rows),
            ("max_length", self.max_length),
            ("batch_size", self.batch_size),
        ] {
            ensure!(v > 0, "alignment_tax: `{key}` must be at least 1");
        }
        // β = 0 would make every reward 0 and the accuracy meaningless.
        ensure!(
            self.beta.is_finite() && self.beta > 0.0,
            "alignment_tax: `beta` must be a finite positive number, got {}",
            self.beta
        );
        Ok(())
    }
}

/// Per held-out row: the summed negative log-likelihood of its completion tokens and how many
/// there are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftRowScore {
    pub id: String,
    pub nll_sum: f64,
    pub tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftScores {
    pub rows: Vec<SftRowScore>,
}

/// Per held-out pair: the implicit rewards of its two completions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairScore {
    pub id: String,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

impl PairScore {
    /// 1 when the chosen answer's reward is strictly greater, else 0 (a tie is not a win, as
    /// TRL's reward accuracy).
    pub fn correct(&self) -> f64 {
        if self.chosen_reward > self.rejected_reward {
            1.0
        } else {
            0.0
        }
    }

    pub fn margin(&self) -> f64 {
        self.chosen_reward - self.rejected_reward
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferenceScores {
    pub beta: f64,
    pub pairs: Vec<PairScore>,
}

impl SftScores {
    /// `(nll_sum, tokens)` per row, for the ratio estimator and the bootstrap.
    pub fn items(&self) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .map(|r| (r.nll_sum, r.tokens as f64))
            .collect()
    }
}

/// One model's numbers; serialized as `alignment_tax.json`:
/// `{"sft": {"rows": [{"id", "nll_sum", "tokens"}…]}, "preference": {"beta", "pairs": [{"id",
/// "chosen_reward", "rejected_reward"}…]}}`. paft writes both parts; a file made elsewhere may
/// have either alone, and its row then shows only that part's columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignmentTax {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sft: Option<SftScores>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceScores>,
}

/// The three alignment-tax numbers of a row, with standard errors; absent where its part is.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TaxEstimates {
    /// Held-out SFT loss, nats per completion token: Σ nll_sum / Σ tokens (delta-method stderr).
    pub sft_loss: Option<Estimate>,
    /// Held-out preference accuracy, percent (sample stderr).
    pub pref_accuracy: Option<Estimate>,
    /// Mean implicit-reward margin chosen − rejected (sample stderr).
    pub reward_margin: Option<Estimate>,
}

impl TaxEstimates {
    pub fn get(&self, metric: TaxMetric) -> Option<Estimate> {
        match metric {
            TaxMetric::SftLoss => self.sft_loss,
            TaxMetric::PrefAccuracy => self.pref_accuracy,
            TaxMetric::RewardMargin => self.reward_margin,
        }
    }
}

/// An alignment-tax number by name, as `[objective]` terms and the leaderboard's columns name
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaxMetric {
    SftLoss,
    PrefAccuracy,
    RewardMargin,
}

impl TaxMetric {
    pub const ALL: [TaxMetric; 3] = [Self::SftLoss, Self::PrefAccuracy, Self::RewardMargin];

    pub fn name(self) -> &'static str {
        match self {
            Self::SftLoss => "sft_loss",
            Self::PrefAccuracy => "pref_accuracy",
            Self::RewardMargin => "reward_margin",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether a larger value is better (a loss is not).
    pub fn higher_is_better(self) -> bool {
        !matches!(self, Self::SftLoss)
    }
}

impl AlignmentTax {
    pub fn estimates(&self) -> TaxEstimates {
        let pairs = self.preference.as_ref().map(|p| &p.pairs);
        let of = |f: fn(&PairScore) -> f64| {
            pairs.and_then(|p| mean_stderr(&p.iter().map(f).collect::<Vec<_>>()))
        };
        TaxEstimates {
            sft_loss: self.sft.as_ref().and_then(|s| ratio_stderr(&s.items())),
            pref_accuracy: of(PairScore::correct).map(|e| e.scaled(100.0)),
            reward_margin: of(PairScore::margin),
        }
    }

    /// One line for logs: the three numbers.
    pub fn summary(&self) -> String {
        let e = self.estimates();
        let show = |m: TaxMetric| {
            e.get(m).map_or("n/a".to_string(), |v| {
                format!("{:.4} ± {:.4}", v.value, v.stderr)
            })
        };
        format!(
            "held-out SFT loss {}, preference accuracy {} %, reward margin {}",
            show(TaxMetric::SftLoss),
            show(TaxMetric::PrefAccuracy),
            show(TaxMetric::RewardMargin)
        )
    }

    /// Writes `dir/alignment_tax.json` atomically (creating `dir`); returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        write_file_atomic(&path, &serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }

    /// `dir/alignment_tax.json`, or None when the row has none.
    pub fn read_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(FILE_NAME);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let tax = Self::parse(&text)
            .with_context(|| format!("malformed alignment-tax file {}", path.display()))?;
        Ok(Some(tax))
    }

    fn parse(text: &str) -> Result<Self> {
        let tax: Self = serde_json::from_str(text).context("not the expected JSON shape")?;
        ensure!(
            tax.sft.is_some() || tax.preference.is_some(),
            "neither `sft` nor `preference`"
        );
        if let Some(sft) = &tax.sft {
            unique_ids(sft.rows.iter().map(|r| r.id.as_str()), "sft.rows")?;
            if let Some(r) = sft.rows.iter().find(|r| !r.nll_sum.is_finite()) {
                bail!("sft.rows id `{}`: nll_sum is not finite", r.id);
            }
            if sft.rows.iter().map(|r| r.tokens).sum::<u64>() == 0 {
                bail!("sft.rows count no tokens: the loss per token is undefined");
            }
        }
        if let Some(p) = &tax.preference {
            unique_ids(p.pairs.iter().map(|r| r.id.as_str()), "preference.pairs")?;
            if !(p.beta.is_finite() && p.beta > 0.0) {
                bail!("preference.beta = {} is not a positive number", p.beta);
            }
            if let Some(r) = p
                .pairs
                .iter()
                .find(|r| !(r.chosen_reward.is_finite() && r.rejected_reward.is_finite()))
            {
                bail!("preference.pairs id `{}`: a reward is not finite", r.id);
            }
            if p.pairs.is_empty() {
                bail!("preference.pairs is empty");
            }
        }
        Ok(tax)
    }
}

fn unique_ids<'a>(ids: impl Iterator<Item = &'a str>, what: &str) -> Result<()> {
    let mut seen = BTreeSet::new();
    for id in ids {
        if !seen.insert(id) {
            bail!("{what}: id `{id}` appears twice");
        }
    }
    Ok(())
}

/// A held-out pair, tokenized, with the base model's summed completion log-probs.
struct BasePair {
    id: String,
    pair: PreferencePair,
    base: (f64, f64),
}

/// The held-out sets, tokenized once with the base model's tokenizer and scored once by it.
pub struct AlignmentTaxSets {
    sft: Vec<(String, TokenizedSequence)>,
    pairs: Vec<BasePair>,
    beta: f64,
    batch_size: usize,
    pad_id: u32,
    vocab_size: usize,
    dtype: DType,
}

/// Whether a held-out row of `path` belongs to `pool` (every row for [`Pool::All`]).
fn in_pool(path: &Path, pool: Pool, split: &PoolSplit) -> impl Fn(&HeldOutRow) -> bool {
    let key = format!(
        "held_out:{}",
        path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into()
        )
    );
    let split = *split;
    move |row| pool == Pool::All || split.pool_of(&key, row.line) == Some(pool)
}

/// `Ok(None)` (with a warning) for a row tokenization rejects, as training's `skip_bad_rows`
/// does: real preference sets have a few empty answers, and the next held-out row replaces it.
fn usable<T>(r: Result<T>) -> Option<T> {
    match r {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("held-out row skipped: {e:#}");
            None
        }
    }
}

impl AlignmentTaxSets {
    /// Tokenizes the first `sft_rows` / `pref_rows` usable held-out rows of `pool` as training
    /// does and scores the pairs with `base` (in inference mode; measure every model in the same
    /// dtype).
    ///
    /// The held-out rows are split into pools as the tasks' documents are (`split`, keyed by the
    /// file name and line number): a search that uses these numbers in its objective picks its
    /// best on the search pool's rows, and the comparison's rows report the report pool's.
    pub fn prepare(
        base: &Pretrained,
        spec: &AlignmentTaxSpec,
        pool: Pool,
        split: &PoolSplit,
    ) -> Result<Self> {
        spec.validate()?;
        let tok = Tokenization {
            tokenizer: &base.tokenizer,
            max_length: spec.max_length,
            truncation: spec.truncation,
        };
        let sft_path = resolve_dataset(&spec.sft_dataset).context("alignment_tax.sft_dataset")?;
        let sft = first_usable_held_out_rows(
            &sft_path,
            spec.sft_rows,
            in_pool(&sft_path, pool, split),
            |row| {
                let ex = parse_sft(&sft_path, &[(row.line, row.value.clone())])?;
                let what = format!("{}: row {}", sft_path.display(), row.line);
                Ok(usable(tok.sft(&ex[0], &what)))
            },
        )
        .context("alignment_tax: held-out SFT rows")?;
        let pref_path =
            resolve_dataset(&spec.pref_dataset).context("alignment_tax.pref_dataset")?;
        let pairs = first_usable_held_out_rows(
            &pref_path,
            spec.pref_rows,
            in_pool(&pref_path, pool, split),
            |row| {
                let ex = parse_preference(&pref_path, &[(row.line, row.value.clone())])?;
                let what = format!("{}: row {}", pref_path.display(), row.line);
                Ok(usable(tok.preference(&ex[0], &what)))
            },
        )
        .context("alignment_tax: held-out preference pairs")?;
        let net = base.model(Mode::Inference, None)?;
        let mut sets = Self {
            sft,
            pairs: pairs
                .into_iter()
                .map(|(id, pair)| BasePair {
                    id,
                    pair,
                    base: (0.0, 0.0),
                })
                .collect(),
            beta: spec.beta,
            batch_size: spec.batch_size,
            pad_id: base.pad_token_id(),
            vocab_size: base.config.vocab_size,
            dtype: net.dtype(),
        };
        let bar = crate::progress::bar(sets.pairs.len() as u64, "tax: base");
        let base_logps = sets.pair_logps(&net, &bar)?;
        bar.finish_and_clear();
        for (p, lp) in sets.pairs.iter_mut().zip(base_logps) {
            p.base = lp;
        }
        tracing::info!(
            "alignment tax: {} held-out SFT rows of {}, {} held-out pairs of {} ({} pool)",
            sets.sft.len(),
            sft_path.display(),
            sets.pairs.len(),
            pref_path.display(),
            pool.name()
        );
        Ok(sets)
    }

    /// The ids of the held-out SFT rows and pairs, in order.
    pub fn row_ids(&self) -> (Vec<&str>, Vec<&str>) {
        (
            self.sft.iter().map(|(id, _)| id.as_str()).collect(),
            self.pairs.iter().map(|p| p.id.as_str()).collect(),
        )
    }

    /// The held-out numbers of `model` (inference mode, the dtype the sets were prepared in).
    pub fn measure(&self, model: &LlamaModel) -> Result<AlignmentTax> {
        ensure!(
            model.mode() == Mode::Inference,
            "alignment tax: measure a model built in inference mode (the base log-probs were)"
        );
        // Rewards subtract the base model's log-probs: another dtype would add its rounding
        // to every reward, and another vocabulary would make them meaningless.
        ensure!(
            model.dtype() == self.dtype,
            "alignment tax: the model is {:?} but the base log-probs were computed in {:?}; \
             load every model of the comparison in the same dtype",
            model.dtype(),
            self.dtype
        );
        ensure!(
            model.config().vocab_size == self.vocab_size,
            "alignment tax: the model's vocabulary has {} entries, the base model's {}",
            model.config().vocab_size,
            self.vocab_size
        );
        let bar = crate::progress::bar((self.sft.len() + self.pairs.len()) as u64, "alignment tax");
        let mut rows = Vec::with_capacity(self.sft.len());
        for chunk in self.sft.chunks(self.batch_size) {
            let seqs: Vec<&TokenizedSequence> = chunk.iter().map(|(_, s)| s).collect();
            for ((id, _), (sum, tokens)) in
                chunk
                    .iter()
                    .zip(completion_logps(model, &seqs, self.pad_id)?)
            {
                ensure!(
                    sum.is_finite(),
                    "alignment tax: {id}: log-likelihood is {sum}"
                );
                rows.push(SftRowScore {
                    id: id.clone(),
                    nll_sum: -sum,
                    tokens,
                });
            }
            bar.inc(chunk.len() as u64);
        }
        let logps = self.pair_logps(model, &bar)?;
        bar.finish_and_clear();
        let pairs: Vec<PairScore> = self
            .pairs
            .iter()
            .zip(logps)
            .map(|(p, (c, r))| PairScore {
                id: p.id.clone(),
                chosen_reward: self.beta * (c - p.base.0),
                rejected_reward: self.beta * (r - p.base.1),
            })
            .collect();
        let tax = AlignmentTax {
            sft: Some(SftScores { rows }),
            preference: Some(PreferenceScores {
                beta: self.beta,
                pairs,
            }),
        };
        tracing::debug!("alignment tax: {}", tax.summary());
        Ok(tax)
    }

    /// Summed completion log-probs (chosen, rejected) of every pair, in batches of
    /// `batch_size` pairs. The base model's scores and every measured model's come from this one
    /// function with the same batches, so the base model's rewards are exactly 0.
    fn pair_logps(
        &self,
        model: &LlamaModel,
        bar: &indicatif::ProgressBar,
    ) -> Result<Vec<(f64, f64)>> {
        let mut out = Vec::with_capacity(self.pairs.len());
        for chunk in self.pairs.chunks(self.batch_size) {
            // One forward over [chosen…, rejected…], as TRL's DPO concatenates them.
            let seqs: Vec<&TokenizedSequence> = chunk
                .iter()
                .map(|p| &p.pair.chosen)
                .chain(chunk.iter().map(|p| &p.pair.rejected))
                .collect();
            let sums = completion_logps(model, &seqs, self.pad_id)?;
            let (chosen, rejected) = sums.split_at(chunk.len());
            for ((p, c), r) in chunk.iter().zip(chosen).zip(rejected) {
                ensure!(
                    c.0.is_finite() && r.0.is_finite(),
                    "alignment tax: {}: log-probs {} (chosen), {} (rejected)",
                    p.id,
                    c.0,
                    r.0
                );
                out.push((c.0, r.0));
            }
            bar.inc(chunk.len() as u64);
        }
        Ok(out)
    }
}

/// Per sequence: Σ log p over its completion tokens (summed in f64) and their number. The
/// tokens are the ones training's losses use (`target_logps` with the loss mask).
fn completion_logps(
    model: &LlamaModel,
    seqs: &[&TokenizedSequence],
    pad_id: u32,
) -> Result<Vec<(f64, u64)>> {
    let t = target_logps(model, seqs, pad_id, |r, pos| seqs[r].loss_mask[pos])?;
    let logps: Vec<f64> = t.logps.to_dtype(DType::F64)?.to_vec1()?;
    let mut out = vec![(0.0, 0u64); seqs.len()];
    for (lp, &r) in logps.iter().zip(&t.seq) {
        out[r].0 += lp;
        out[r].1 += 1;
    }
    if let Some(i) = out.iter().position(|o| o.1 == 0) {
        bail!("alignment tax: sequence {i} of a batch has no completion tokens");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
        sft_dataset = "sft.jsonl"
        pref_dataset = "pref.jsonl"
        sft_rows = 200
        pref_rows = 200
        max_length = 512
        truncation = "keep_end"
    "#;

    fn tax() -> AlignmentTax {
        AlignmentTax {
            sft: Some(SftScores {
                rows: vec![
                    SftRowScore {
                        id: "sft.jsonl:2".into(),
                        nll_sum: 3.0,
                        tokens: 2,
                    },
                    SftRowScore {
                        id: "sft.jsonl:17".into(),
                        nll_sum: 5.0,
                        tokens: 6,
                    },
                ],
            }),
            preference: Some(PreferenceScores {
                beta: 0.1,
                pairs: vec![
                    PairScore {
                        id: "pref.jsonl:4".into(),
                        chosen_reward: 0.5,
                        rejected_reward: -0.25,
                    },
                    PairScore {
                        id: "pref.jsonl:20".into(),
                        chosen_reward: 0.0,
                        rejected_reward: 0.0,
                    },
                    PairScore {
                        id: "pref.jsonl:42".into(),
                        chosen_reward: -1.0,
                        rejected_reward: 0.5,
                    },
                ],
            }),
        }
    }

    #[test]
    fn spec_reads_from_toml_with_documented_defaults_only() {
        let spec: AlignmentTaxSpec = toml::from_str(SPEC).unwrap();
        assert_eq!(spec.beta, 0.1);
        assert_eq!(spec.batch_size, 4);
        assert_eq!(spec.truncation, Truncation::KeepEnd);
        spec.validate().unwrap();
        for (text, needle) in [
            (format!("{SPEC}\nbeta_dpo = 0.2"), "beta_dpo"),
            (SPEC.replace("max_length = 512", ""), "max_length"),
            (SPEC.replace("truncation = \"keep_end\"", ""), "truncation"),
            (SPEC.replace("\"keep_end\"", "\"middle\""), "middle"),
        ] {
            let err = toml::from_str::<AlignmentTaxSpec>(&text).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        for (text, needle) in [
            (SPEC.replace("sft_rows = 200", "sft_rows = 0"), "sft_rows"),
            (format!("{SPEC}\nbeta = 0.0"), "beta"),
            (format!("{SPEC}\nbatch_size = 0"), "batch_size"),
        ] {
            let spec: AlignmentTaxSpec = toml::from_str(&text).unwrap();
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn summaries_follow_their_definitions() {
        let e = tax().estimates();
        assert_eq!(e.sft_loss.unwrap().value, 1.0); // (3 + 5) / (2 + 6)
        assert!((e.pref_accuracy.unwrap().value - 100.0 / 3.0).abs() < 1e-12); // a tie is not a win
        assert_eq!(e.reward_margin.unwrap().value, (0.75 + 0.0 - 1.5) / 3.0);
    }

    #[test]
    fn json_has_exactly_the_agreed_shape_and_reads_back() {
        let value = serde_json::to_value(tax()).unwrap();
        let want = serde_json::json!({
            "sft": {"rows": [
                {"id": "sft.jsonl:2", "nll_sum": 3.0, "tokens": 2},
                {"id": "sft.jsonl:17", "nll_sum": 5.0, "tokens": 6},
            ]},
            "preference": {"beta": 0.1, "pairs": [
                {"id": "pref.jsonl:4", "chosen_reward": 0.5, "rejected_reward": -0.25},
                {"id": "pref.jsonl:20", "chosen_reward": 0.0, "rejected_reward": 0.0},
                {"id": "pref.jsonl:42", "chosen_reward": -1.0, "rejected_reward": 0.5},
            ]},
        });
        assert_eq!(value, want);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("evals").join("paft");
        let path = tax().write(&dir).unwrap();
        assert_eq!(path, dir.join("alignment_tax.json"));
        assert_eq!(AlignmentTax::read_dir(&dir).unwrap(), Some(tax()));

        std::fs::write(&path, r#"{"sft": {"rows": []}}"#).unwrap();
        let err = format!("{:#}", AlignmentTax::read_dir(&dir).unwrap_err());
        assert!(err.contains("alignment_tax.json"), "{err}");
        assert_eq!(AlignmentTax::read_dir(tmp.path()).unwrap(), None);
    }

    #[test]
    fn the_metrics_follow_their_definitions() {
        let tax = AlignmentTax::parse(
            r#"{"sft": {"rows": [{"id": "a", "nll_sum": 10.0, "tokens": 4},
                                 {"id": "b", "nll_sum": 2.0, "tokens": 4}]},
                "preference": {"beta": 0.1, "pairs": [
                    {"id": "p", "chosen_reward": 0.5, "rejected_reward": 0.1},
                    {"id": "q", "chosen_reward": 0.2, "rejected_reward": 0.2},
                    {"id": "r", "chosen_reward": -0.1, "rejected_reward": 0.3},
                    {"id": "s", "chosen_reward": 1.0, "rejected_reward": 0.0}]}}"#,
        )
        .unwrap();
        let e = tax.estimates();
        // 12 nats over 8 tokens, not the mean of the per-row losses (2.5 and 0.5 → 1.5).
        assert_eq!(e.sft_loss.unwrap().value, 1.5);
        let loss = e.sft_loss.unwrap();
        // Delta method: residuals 10 − 6 = 4, 2 − 6 = −4; sqrt(32 / 2) / 4 = 1.
        assert!((loss.stderr - 1.0).abs() < 1e-12, "{loss:?}");
        // The tie (q) is not a win: 2 of 4.
        assert_eq!(e.pref_accuracy.unwrap().value, 50.0);
        assert!((e.reward_margin.unwrap().value - (0.4 + 0.0 - 0.4 + 1.0) / 4.0).abs() < 1e-12);
        let only_sft =
            AlignmentTax::parse(r#"{"sft": {"rows": [{"id": "a", "nll_sum": 1.0, "tokens": 2}]}}"#)
                .unwrap()
                .estimates();
        assert!(only_sft.pref_accuracy.is_none() && only_sft.reward_margin.is_none());
        assert!(only_sft.sft_loss.unwrap().stderr.is_nan());
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let cases = [
            (
                r#"{"sft": {"rows": [{"id": "a", "nll_sum": 1.0}]}}"#,
                "tokens",
            ),
            (
                r#"{"sft": {"rows": [{"id": "a", "nll_sum": 1.0, "tokens": 1}, {"id": "a", "nll_sum": 1.0, "tokens": 1}]}}"#,
                "twice",
            ),
            (
                r#"{"sft": {"rows": [{"id": "a", "nll_sum": 1.0, "tokens": 0}]}}"#,
                "no tokens",
            ),
            (r#"{"preference": {"beta": 0, "pairs": []}}"#, "beta"),
            (r#"{"preference": {"beta": 0.1, "pairs": []}}"#, "empty"),
            ("[1, 2]", "shape"),
        ];
        for (text, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(FILE_NAME), text).unwrap();
            let err = format!("{:#}", AlignmentTax::read_dir(dir.path()).unwrap_err());
            assert!(
                err.contains(want) && err.contains(FILE_NAME),
                "{want}: {err}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(AlignmentTax::read_dir(dir.path()).unwrap(), None);
    }
}
