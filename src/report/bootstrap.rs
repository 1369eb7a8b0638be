//! Paired bootstrap over documents: how much could the difference between two rows scored on the
//! same documents move if another sample of documents had been drawn?
//!
//! Each resample draws, within every stratum (a task; for MMLU a subject, so the macro mean keeps
//! its structure), as many documents as the stratum has, with replacement, and recomputes both
//! rows' statistic on the same drawn documents. The statistic of a metric is the unweighted mean
//! over its strata of Σ numerator / Σ denominator: a plain mean when every denominator is 1, a
//! per-token loss when they are token counts. The 95% interval is the 2.5th and 97.5th
//! percentile of the resampled differences (linear interpolation, as numpy's default).
//!
//! Draws are seeded: metric `m` uses ChaCha8 seeded with `seed` on stream `m`, so a metric's
//! interval does not change when another metric is added or missing, and the same seed gives the
//! same report. Resample `r` of the leaderboard average is the mean of resample `r` of its
//! benchmarks (independent documents, so this is one joint draw).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::stats::percentile_interval_95;

pub const DEFAULT_SEED: u64 = 1234;
pub const DEFAULT_RESAMPLES: usize = 2000;
/// Fewer draws make the 2.5% tails rest on a couple dozen values.
pub const MIN_RESAMPLES: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootstrapSettings {
    pub seed: u64,
    pub resamples: usize,
}

impl Default for BootstrapSettings {
    fn default() -> Self {
        Self {
            seed: DEFAULT_SEED,
            resamples: DEFAULT_RESAMPLES,
        }
    }
}

/// One document (or held-out row, or preference pair) scored for both rows: each side's
/// `(numerator, denominator)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PairedItem {
    pub a: (f64, f64),
    pub b: (f64, f64),
}

impl PairedItem {
    /// A document with one value per row (denominator 1).
    pub(crate) fn values(a: f64, b: f64) -> Self {
        Self {
            a: (a, 1.0),
            b: (b, 1.0),
        }
    }
}

/// The difference a − b of one metric, over strata resampled independently.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PairedMetric {
    pub strata: Vec<Vec<PairedItem>>,
}

/// A difference and its percentile interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Interval {
    pub difference: f64,
    pub low: f64,
    pub high: f64,
}

impl Interval {
    pub(crate) fn excludes_zero(&self) -> bool {
        self.low > 0.0 || self.high < 0.0
    }
}

/// Σ num / Σ den of one side over the items `pick` yields.
fn ratio(sums: (f64, f64)) -> f64 {
    sums.0 / sums.1
}

impl PairedMetric {
    pub(crate) fn items(&self) -> usize {
        self.strata.iter().map(Vec::len).sum()
    }

    /// The observed difference (every item once).
    pub(crate) fn difference(&self) -> f64 {
        self.mean_over_strata(|stratum| stratum_difference(stratum.iter()))
    }

    fn mean_over_strata(&self, mut f: impl FnMut(&[PairedItem]) -> f64) -> f64 {
        let k = self.strata.len() as f64;
        self.strata.iter().map(|s| f(s)).sum::<f64>() / k
    }

    /// `settings.resamples` resampled differences, drawn from stream `stream` of the seed.
    pub(crate) fn resample(&self, stream: u64, settings: &BootstrapSettings) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        rng.set_stream(stream);
        (0..settings.resamples)
            .map(|_| {
                self.mean_over_strata(|stratum| {
                    let n = stratum.len();
                    stratum_difference((0..n).map(|_| &stratum[rng.random_range(0..n)]))
                })
            })
            .collect()
    }
}

fn stratum_difference<'a>(items: impl Iterator<Item = &'a PairedItem>) -> f64 {
    let mut a = (0.0, 0.0);
    let mut b = (0.0, 0.0);
    for it in items {
        a = (a.0 + it.a.0, a.1 + it.a.1);
        b = (b.0 + it.b.0, b.1 + it.b.1);
    }
    ratio(a) - ratio(b)
}

/// Resample-wise mean of several metrics' draws (the leaderboard average of their
/// differences). All slices have the same length.
pub(crate) fn mean_draws(draws: &[&[f64]]) -> Vec<f64> {
    let k = draws.len() as f64;
    let n = draws.first().map_or(0, |d| d.len());
    (0..n)
        .map(|r| draws.iter().map(|d| d[r]).sum::<f64>() / k)
        .collect()
}

/// The 95% percentile interval of `draws` around the observed `difference`; None when a draw is
/// not a number (a resample whose denominators sum to zero).
pub(crate) fn percentile_interval(difference: f64, draws: Vec<f64>) -> Option<Interval> {
    if !difference.is_finite() {
        return None;
    }
    let [low, high] = percentile_interval_95(draws)?;
    Some(Interval {
        difference,
        low,
        high,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(seed: u64) -> BootstrapSettings {
        BootstrapSettings {
            seed,
            resamples: 2000,
        }
    }

    fn interval(m: &PairedMetric, seed: u64) -> Interval {
        percentile_interval(m.difference(), m.resample(0, &settings(seed))).unwrap()
    }

    /// `n` documents, both rows right on every other one, except `changed` documents that only A
    /// gets right.
    fn differing_on(n: usize, changed: &[usize]) -> PairedMetric {
        let items = (0..n)
            .map(|i| {
                let b = (i % 2) as f64;
                let a = if changed.contains(&i) { 1.0 } else { b };
                PairedItem::values(a, b)
            })
            .collect();
        PairedMetric {
            strata: vec![items],
        }
    }

    #[test]
    fn the_interval_holds_the_known_difference_and_is_degenerate_where_it_must_be() {
        // A beats B on exactly 10 of 200 documents (all on B's wrong ones): true difference 0.05.
        let changed: Vec<usize> = (0..20).step_by(2).collect();
        let m = differing_on(200, &changed);
        let iv = interval(&m, DEFAULT_SEED);
        assert!((iv.difference - 0.05).abs() < 1e-12, "{iv:?}");
        assert!(iv.low < 0.05 && 0.05 < iv.high, "{iv:?}");
        // A never does worse than B on a document, so no resample can favour B; and 10 changed
        // documents out of 200 are enough for the interval to leave 0.
        assert!(iv.low > 0.0 && iv.excludes_zero(), "{iv:?}");

        // Identical rows: every resampled difference is exactly 0.
        let same = differing_on(200, &[]);
        let iv = interval(&same, DEFAULT_SEED);
        assert_eq!((iv.difference, iv.low, iv.high), (0.0, 0.0, 0.0));
        assert!(!iv.excludes_zero());

        // A right everywhere, B wrong everywhere: exactly 1 in every resample.
        let items = (0..50).map(|_| PairedItem::values(1.0, 0.0)).collect();
        let all = PairedMetric {
            strata: vec![items],
        };
        let iv = interval(&all, DEFAULT_SEED);
        assert_eq!((iv.difference, iv.low, iv.high), (1.0, 1.0, 1.0));
        assert!(iv.excludes_zero());
    }

    #[test]
    fn the_same_seed_gives_the_same_interval_and_another_seed_another() {
        // Fractional per-document values (as TruthfulQA's mc2), so the resampled differences
        // are not confined to a few discrete values another seed could land on as well.
        let items = (0..300)
            .map(|i| {
                let x = i as f64;
                PairedItem::values((x * 0.618).fract(), (x * 0.377).fract())
            })
            .collect();
        let m = PairedMetric {
            strata: vec![items],
        };
        assert_eq!(interval(&m, 1234), interval(&m, 1234));
        assert_ne!(interval(&m, 1234), interval(&m, 99));
        // Streams are independent too: another metric's stream draws other documents.
        let s = settings(1234);
        assert_ne!(m.resample(0, &s), m.resample(1, &s));
    }

    #[test]
    fn intervals_shrink_as_documents_are_added() {
        // The same pattern (A right on 1 in 10 more documents) at 4 sizes.
        let widths: Vec<f64> = [100, 400, 1600, 6400]
            .iter()
            .map(|&n| {
                let changed: Vec<usize> = (0..n).step_by(10).filter(|i| i % 2 == 0).collect();
                let iv = interval(&differing_on(n, &changed), DEFAULT_SEED);
                iv.high - iv.low
            })
            .collect();
        for w in widths.windows(2) {
            // Quadrupling the documents roughly halves the width.
            assert!(w[1] < 0.7 * w[0], "{widths:?}");
        }
    }

    #[test]
    fn strata_are_resampled_separately_and_averaged_unweighted() {
        // Subject 1 (2 documents): A +1 on both. Subject 2 (100 documents): no difference. The
        // macro difference is (1 + 0) / 2 = 0.5 in every resample: each subject keeps its size
        // and weight. Pooling the documents would give 2/102 instead.
        let s1 = vec![PairedItem::values(1.0, 0.0); 2];
        let s2 = vec![PairedItem::values(0.5, 0.5); 100];
        let m = PairedMetric {
            strata: vec![s1, s2],
        };
        let iv = interval(&m, DEFAULT_SEED);
        assert_eq!((iv.difference, iv.low, iv.high), (0.5, 0.5, 0.5));
        assert_eq!(m.items(), 102);
    }

    #[test]
    fn ratios_of_sums_and_averages_of_draws() {
        // Per-token loss: A has 2 nats/token, B 1 nat/token, rows of different lengths.
        let items = (1..=10)
            .map(|t| PairedItem {
                a: (2.0 * t as f64, t as f64),
                b: (t as f64, t as f64),
            })
            .collect();
        let m = PairedMetric {
            strata: vec![items],
        };
        let iv = interval(&m, 7);
        assert_eq!((iv.difference, iv.low, iv.high), (1.0, 1.0, 1.0));
        assert_eq!(mean_draws(&[&[1.0, 2.0], &[3.0, 6.0]]), [2.0, 4.0]);
        assert!(percentile_interval(0.0, vec![f64::NAN]).is_none());
        assert!(percentile_interval(0.0, vec![]).is_none());
        let q = percentile_interval(0.0, (0..=100).map(f64::from).collect()).unwrap();
        assert_eq!((q.low, q.high), (2.5, 97.5));
    }
}
