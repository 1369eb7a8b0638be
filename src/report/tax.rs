//! The alignment tax of one row: `alignment_tax.json` beside its results.json, written by the
//! pipeline (read here only). Shape, either key optional:
//!
//! ```json
//! {"sft": {"rows": [{"id": "…", "nll_sum": 12.5, "tokens": 40}, …]},
//!  "preference": {"beta": 0.1, "pairs": [{"id": "…", "chosen_reward": 0.3, "rejected_reward": -0.1}, …]}}
//! ```
//!
//! Metrics: held-out SFT loss Σ nll_sum / Σ tokens (nats per token; stderr by the delta method
//! for a ratio of sums, `stats::ratio_stderr`), preference accuracy = share of pairs with
//! chosen_reward strictly greater than rejected_reward (a tie counts as wrong, as TRL's reward
//! accuracy), mean margin = mean(chosen − rejected) (each with the sample stderr).

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::stats::{mean_stderr, ratio_stderr, Estimate};

pub(crate) const FILE_NAME: &str = "alignment_tax.json";

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct AlignmentTax {
    #[serde(default)]
    pub sft: Option<SftHeldOut>,
    #[serde(default)]
    pub preference: Option<Preference>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct SftHeldOut {
    pub rows: Vec<SftRow>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct SftRow {
    pub id: String,
    pub nll_sum: f64,
    pub tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct Preference {
    pub beta: f64,
    pub pairs: Vec<PrefPair>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct PrefPair {
    pub id: String,
    pub chosen_reward: f64,
    pub rejected_reward: f64,
}

/// The three alignment-tax numbers of a row; absent where its part is absent.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct TaxEstimates {
    pub sft_loss: Option<Estimate>,
    /// Percent.
    pub pref_accuracy: Option<Estimate>,
    pub reward_margin: Option<Estimate>,
}

impl SftHeldOut {
    /// `(nll_sum, tokens)` per row, for the ratio estimator and the bootstrap.
    pub(crate) fn items(&self) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .map(|r| (r.nll_sum, r.tokens as f64))
            .collect()
    }
}

impl PrefPair {
    /// 1 when the chosen answer's reward is strictly greater, else 0 (ties are not wins).
    pub(crate) fn correct(&self) -> f64 {
        if self.chosen_reward > self.rejected_reward {
            1.0
        } else {
            0.0
        }
    }

    pub(crate) fn margin(&self) -> f64 {
        self.chosen_reward - self.rejected_reward
    }
}

impl AlignmentTax {
    /// `dir/alignment_tax.json`, or None when the row has none.
    pub(crate) fn read_dir(dir: &Path) -> Result<Option<Self>> {
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

    pub(crate) fn estimates(&self) -> TaxEstimates {
        let pairs = self.preference.as_ref().map(|p| &p.pairs);
        let of = |f: fn(&PrefPair) -> f64| {
            pairs.and_then(|p| mean_stderr(&p.iter().map(f).collect::<Vec<_>>()))
        };
        TaxEstimates {
            sft_loss: self.sft.as_ref().and_then(|s| ratio_stderr(&s.items())),
            pref_accuracy: of(PrefPair::correct).map(|e| e.scaled(100.0)),
            reward_margin: of(PrefPair::margin),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
