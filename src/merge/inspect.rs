//! `paft inspect-delta`: how sparse a fine-tune's task vector is, per tensor and overall.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::config::ModelRef;
use super::engine::MergeInput;

/// Sparsity and size of one delta (or of a LoRA factor).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeltaStats {
    pub name: String,
    pub numel: usize,
    pub frac_zero: f64,
    pub frac_below_1e6: f64,
    pub frac_below_1e4: f64,
    /// Fraction below 1% of the tensor's max |δ|.
    pub frac_below_1pct_max: f64,
    pub l1: f64,
    pub l2: f64,
    pub max_abs: f64,
}

impl DeltaStats {
    pub fn of(name: &str, delta: &[f32]) -> Self {
        let n = delta.len().max(1) as f64;
        let max_abs = delta.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        let count = |pred: &dyn Fn(f64) -> bool| {
            delta.iter().filter(|x| pred(x.abs() as f64)).count() as f64 / n
        };
        Self {
            name: name.to_string(),
            numel: delta.len(),
            frac_zero: count(&|a| a == 0.0),
            frac_below_1e6: count(&|a| a < 1e-6),
            frac_below_1e4: count(&|a| a < 1e-4),
            frac_below_1pct_max: count(&|a| a < 0.01 * max_abs),
            l1: delta.iter().map(|x| x.abs() as f64).sum(),
            l2: delta
                .iter()
                .map(|x| (*x as f64).powi(2))
                .sum::<f64>()
                .sqrt(),
            max_abs,
        }
    }

    /// Entry-weighted combination of several tensors' stats.
    pub fn total(name: &str, parts: &[DeltaStats]) -> Self {
        let n: usize = parts.iter().map(|p| p.numel).sum();
        let w = |f: fn(&DeltaStats) -> f64| {
            parts.iter().map(|p| f(p) * p.numel as f64).sum::<f64>() / n.max(1) as f64
        };
        Self {
            name: name.to_string(),
            numel: n,
            frac_zero: w(|p| p.frac_zero),
            frac_below_1e6: w(|p| p.frac_below_1e6),
            frac_below_1e4: w(|p| p.frac_below_1e4),
            frac_below_1pct_max: w(|p| p.frac_below_1pct_max),
            l1: parts.iter().map(|p| p.l1).sum(),
            l2: parts.iter().map(|p| p.l2 * p.l2).sum::<f64>().sqrt(),
            max_abs: parts.iter().map(|p| p.max_abs).fold(0.0, f64::max),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeltaReport {
    pub base: String,
    pub model: String,
    pub tensors: Vec<DeltaStats>,
    pub overall: DeltaStats,
    /// For `base+adapter`: the A and B factors (the BA product is what `tensors` describes).
    pub lora_a: Option<DeltaStats>,
    pub lora_b: Option<DeltaStats>,
}

pub fn inspect_delta(base: &ModelRef, model: &ModelRef) -> Result<DeltaReport> {
    let b = MergeInput::open(base)?;
    let m = MergeInput::open(model)?;
    let names = b.files().checkpoint.names();
    for name in &names {
        let (x, y) = (
            b.files().checkpoint.shape(name)?,
            m.files().checkpoint.shape(name)?,
        );
        if x != y {
            anyhow::bail!("model {model}: tensor `{name}` has shape {y:?}, base {base} has {x:?}");
        }
    }
    let bar = crate::progress::bar(names.len() as u64, "deltas");
    let mut tensors = vec![];
    for name in &names {
        let (theta0, theta) = (b.tensor(name)?, m.tensor(name)?);
        let delta: Vec<f32> = theta
            .iter()
            .zip(theta0.iter())
            .map(|(a, b)| a - b)
            .collect();
        tensors.push(DeltaStats::of(name, &delta));
        b.release(name)?;
        m.release(name)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let overall = DeltaStats::total("(all)", &tensors);
    let (lora_a, lora_b) = match &m {
        MergeInput::Adapter { adapter, .. } => {
            let flat =
                |f: fn(&crate::model::LoraPair) -> &candle_core::Tensor| -> Result<DeltaStats> {
                    let parts = adapter
                        .layers
                        .iter()
                        .map(|(k, p)| Ok(DeltaStats::of(k, &f(p).flatten_all()?.to_vec1::<f32>()?)))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(DeltaStats::total("", &parts))
                };
            (
                Some(DeltaStats {
                    name: "lora_A".into(),
                    ..flat(|p| &p.a)?
                }),
                Some(DeltaStats {
                    name: "lora_B".into(),
                    ..flat(|p| &p.b)?
                }),
            )
        }
        MergeInput::Full(_) => (None, None),
    };
    Ok(DeltaReport {
        base: base.to_string(),
        model: model.to_string(),
        tensors,
        overall,
        lora_a,
        lora_b,
    })
}

impl DeltaReport {
    /// The table `paft inspect-delta` prints.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<52} {:>10} {:>7} {:>7} {:>7} {:>7} {:>12} {:>10}\n",
            "tensor", "numel", "=0", "<1e-6", "<1e-4", "<1%max", "L1", "L2"
        );
        let row = |d: &DeltaStats| {
            format!(
                "{:<52} {:>10} {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}% {:>12.4e} {:>10.4e}\n",
                d.name,
                d.numel,
                100.0 * d.frac_zero,
                100.0 * d.frac_below_1e6,
                100.0 * d.frac_below_1e4,
                100.0 * d.frac_below_1pct_max,
                d.l1,
                d.l2
            )
        };
        for t in &self.tensors {
            s += &row(t);
        }
        s += &row(&self.overall);
        for extra in [&self.lora_a, &self.lora_b].into_iter().flatten() {
            s += &row(extra);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_thresholds_and_norms() {
        let d = DeltaStats::of("t", &[0.0, 5e-7, 5e-5, 0.5, -1.0]);
        assert_eq!(d.frac_zero, 0.2);
        assert_eq!(d.frac_below_1e6, 0.4);
        assert_eq!(d.frac_below_1e4, 0.6);
        assert_eq!(d.frac_below_1pct_max, 0.6);
        assert!((d.l1 - 1.5000505).abs() < 1e-6 && (d.l2 - 1.25f64.sqrt()).abs() < 1e-6);
        let t = DeltaStats::total("all", &[d.clone(), DeltaStats::of("u", &[0.0; 5])]);
        assert_eq!(t.frac_zero, 0.6);
        assert_eq!(t.numel, 10);
    }
}
