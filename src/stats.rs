//! Estimates with standard errors, shared by every stage that reports a noisy number: a mean
//! over documents or rows (lm-eval's `mean_stderr`) and a ratio of sums (a per-token loss); and
//! rank correlations with their bootstrap draws, for the benchmarks that compare rankings.

/// A number and its standard error, in the same unit. `stderr` is NaN where it is undefined
/// (fewer than two documents), never a stand-in 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub value: f64,
    pub stderr: f64,
}

impl Estimate {
    pub fn scaled(self, factor: f64) -> Self {
        Self {
            value: self.value * factor,
            stderr: self.stderr * factor,
        }
    }
}

/// Mean and sample standard deviation / sqrt(n) (n − 1 in the variance, as lm-eval). None for no
/// values; NaN stderr for one.
pub fn mean_stderr(values: &[f64]) -> Option<Estimate> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let stderr = if values.len() < 2 {
        f64::NAN
    } else {
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (var / n).sqrt()
    };
    Some(Estimate {
        value: mean,
        stderr,
    })
}

/// A ratio of sums R = Σx / Σw (e.g. summed NLL over summed tokens) with its delta-method
/// standard error: sqrt(Σ (x_i − R·w_i)² / (n (n − 1))) / w̄. None when there is nothing to divide
/// by.
pub fn ratio_stderr(items: &[(f64, f64)]) -> Option<Estimate> {
    let sum_x: f64 = items.iter().map(|(x, _)| x).sum();
    let sum_w: f64 = items.iter().map(|(_, w)| w).sum();
    if items.is_empty() || sum_w <= 0.0 {
        return None;
    }
    let r = sum_x / sum_w;
    let n = items.len() as f64;
    let stderr = if items.len() < 2 {
        f64::NAN
    } else {
        let ss: f64 = items.iter().map(|(x, w)| (x - r * w).powi(2)).sum();
        (ss / (n * (n - 1.0))).sqrt() / (sum_w / n)
    };
    Some(Estimate { value: r, stderr })
}

/// The unweighted mean of per-task (mean, stderr) pairs, with the standard error of that mean
/// sqrt(Σ se²)/k (the leaderboard's MMLU aggregation; a single task passes through). A part with
/// an undefined stderr (one document) adds nothing; if no part has one, the stderr is unknown,
/// not zero. The evaluator and `paft report` both aggregate with it.
pub fn macro_mean(parts: &[Estimate]) -> Option<Estimate> {
    if parts.is_empty() {
        return None;
    }
    let k = parts.len() as f64;
    let value = parts.iter().map(|p| p.value).sum::<f64>() / k;
    if parts.len() == 1 {
        return Some(Estimate {
            value,
            stderr: parts[0].stderr,
        });
    }
    let known: Vec<f64> = parts
        .iter()
        .map(|p| p.stderr.powi(2))
        .filter(|v| v.is_finite())
        .collect();
    let stderr = if known.is_empty() {
        f64::NAN
    } else {
        known.iter().sum::<f64>().sqrt() / k
    };
    Some(Estimate { value, stderr })
}

/// Spearman's rank correlation of `a` and `b` (ties get their average rank, as
/// `scipy.stats.spearmanr`); NaN when either is constant. The benchmarks that compare candidate
/// rankings use it.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    let (ra, rb) = (ranks(a), ranks(b));
    let n = ra.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Each of `rankings`' Spearman correlation with `reference` (all scores of the same items, e.g.
/// the candidates of a grid), recomputed on `resamples` bootstrap draws of the items: how much
/// the correlation owes to which items happened to be compared. Draw `r` uses the same items for
/// every ranking, so differences between rankings are paired. A draw in which some side is
/// constant (a correlation that is not a number; with ten items, about one draw in a billion) is
/// dropped for every ranking alike. Seeded (ChaCha8), so the same seed gives the same draws.
pub fn spearman_draws(
    rankings: &[&[f64]],
    reference: &[f64],
    seed: u64,
    resamples: usize,
) -> Vec<Vec<f64>> {
    use rand::{Rng, SeedableRng};
    let n = reference.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut draws = vec![Vec::with_capacity(resamples); rankings.len()];
    if n == 0 {
        return draws;
    }
    for _ in 0..resamples {
        let items: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
        let pick = |v: &[f64]| items.iter().map(|&i| v[i]).collect::<Vec<f64>>();
        let reference = pick(reference);
        let rhos: Vec<f64> = rankings
            .iter()
            .map(|r| spearman(&pick(r), &reference))
            .collect();
        if rhos.iter().all(|r| r.is_finite()) {
            for (d, r) in draws.iter_mut().zip(rhos) {
                d.push(r);
            }
        }
    }
    draws
}

/// The 2.5th and 97.5th percentiles of `draws` (a 95% percentile bootstrap interval); None when
/// there are none or one is not a number.
pub fn percentile_interval_95(mut draws: Vec<f64>) -> Option<[f64; 2]> {
    if draws.is_empty() || draws.iter().any(|d| !d.is_finite()) {
        return None;
    }
    draws.sort_by(f64::total_cmp);
    Some([quantile(&draws, 0.025), quantile(&draws, 0.975)])
}

/// The `q` quantile of `sorted` (ascending, not empty), interpolating linearly between the order
/// statistics at q·(n − 1), as numpy's default.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Ranks with ties averaged (1-based).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        for &k in &idx[i..=j] {
            r[k] = (i + j) as f64 / 2.0 + 1.0;
        }
        i = j + 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn mean_stderr_is_sample_std_over_sqrt_n() {
        // 1,0,1,1: mean 0.75, sample variance 0.25, stderr sqrt(0.25/4) = 0.25.
        let e = mean_stderr(&[1.0, 0.0, 1.0, 1.0]).unwrap();
        assert!(close(e.value, 0.75) && close(e.stderr, 0.25), "{e:?}");
        assert!(mean_stderr(&[1.0]).unwrap().stderr.is_nan());
        assert!(mean_stderr(&[]).is_none());
        // All equal: a true zero, not a missing value.
        assert_eq!(mean_stderr(&[1.0, 1.0]).unwrap().stderr, 0.0);
    }

    #[test]
    fn a_ratio_of_sums_has_a_delta_method_stderr() {
        // Equal per-token loss on every row: R exact, no spread.
        let e = ratio_stderr(&[(2.0, 1.0), (4.0, 2.0), (6.0, 3.0)]).unwrap();
        assert!(close(e.value, 2.0) && close(e.stderr, 0.0), "{e:?}");
        // Equal weights reduce to the plain mean and its stderr.
        let items = [(1.0, 1.0), (0.0, 1.0), (1.0, 1.0), (1.0, 1.0)];
        let r = ratio_stderr(&items).unwrap();
        let m = mean_stderr(&[1.0, 0.0, 1.0, 1.0]).unwrap();
        assert!(
            close(r.value, m.value) && close(r.stderr, m.stderr),
            "{r:?}"
        );
        assert!(ratio_stderr(&[]).is_none());
        assert!(ratio_stderr(&[(1.0, 0.0)]).is_none());
    }

    #[test]
    fn mmlu_is_the_unweighted_mean_over_subjects() {
        // Subject sizes differ (4 and 2 documents): the macro mean weighs the subjects equally,
        // not the documents.
        let a = mean_stderr(&[1.0, 0.0, 1.0, 1.0]).unwrap(); // 0.75 ± 0.25
        let b = mean_stderr(&[0.0, 0.0]).unwrap(); // 0 ± 0
        let m = macro_mean(&[a, b]).unwrap();
        assert!(close(m.value, 0.375), "{m:?}");
        assert!(
            close(m.stderr, (0.25f64.powi(2) + 0.0).sqrt() / 2.0),
            "{m:?}"
        );
        // The micro mean would be 3/6 = 0.5: the test fails if documents are pooled.
        assert!(!close(m.value, 0.5));
        // A one-document subject adds no variance; a lone part keeps its own stderr.
        let one = mean_stderr(&[1.0]).unwrap();
        let m = macro_mean(&[a, one]).unwrap();
        assert!(close(m.value, 0.875) && close(m.stderr, 0.125), "{m:?}");
        // Only one-document subjects: the stderr is unknown, never a fake 0.
        let m = macro_mean(&[one, one]).unwrap();
        assert!(m.stderr.is_nan(), "{m:?}");
        assert!(macro_mean(&[one]).unwrap().stderr.is_nan());
        assert!(macro_mean(&[]).is_none());
    }

    #[test]
    fn spearman_averages_ties_and_reads_order_only() {
        assert!((super::spearman(&[1.0, 2.0, 3.0], &[10.0, 40.0, 90.0]) - 1.0).abs() < 1e-12);
        assert!((super::spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9486832980505138
        let r = super::spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
        assert!((r - 0.9486832980505138).abs() < 1e-12, "{r}");
        assert!(super::spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_nan());
    }

    #[test]
    fn spearman_draws_resample_items_paired_and_seeded() {
        let reference: Vec<f64> = (0..10).map(f64::from).collect();
        let same = reference.clone();
        let reversed: Vec<f64> = reference.iter().map(|x| -x).collect();
        // Swapping the two best: high correlation, but draws without both of them give 1.
        let mut swapped = reference.clone();
        swapped.swap(8, 9);
        let draws = spearman_draws(&[&same, &reversed, &swapped], &reference, 7, 500);
        // Every draw has repeated items but at least two distinct ones (else it is dropped).
        assert!(draws.iter().all(|d| d.len() == draws[0].len()));
        assert!(draws[0].len() > 490, "{}", draws[0].len());
        assert!(draws[0].iter().all(|&r| close(r, 1.0)));
        assert!(draws[1].iter().all(|&r| close(r, -1.0)));
        let swapped_draws = &draws[2];
        assert!(swapped_draws.iter().any(|&r| close(r, 1.0)));
        assert!(swapped_draws.iter().any(|&r| r < 0.99));
        assert!(swapped_draws.iter().all(|&r| r <= 1.0 + 1e-12));
        let high = swapped_draws.iter().filter(|&&r| r > 0.5).count();
        assert!(high * 100 > swapped_draws.len() * 95, "{high}");
        // Seeded: the same seed, the same draws; another seed, others.
        let again = spearman_draws(&[&same, &reversed, &swapped], &reference, 7, 500);
        assert_eq!(again, draws);
        let other = spearman_draws(&[&swapped], &reference, 8, 500);
        assert_ne!(other[0], draws[2]);
        // A constant side is a correlation of nothing: every draw is dropped.
        assert!(spearman_draws(&[&[1.0; 10]], &reference, 7, 50)[0].is_empty());
    }

    #[test]
    fn quantile_interpolates_between_order_statistics() {
        // numpy.quantile([1, 2, 3, 4], [0, 0.25, 0.5, 1]) = 1, 1.75, 2.5, 4
        let v = [1.0, 2.0, 3.0, 4.0];
        for (q, want) in [(0.0, 1.0), (0.25, 1.75), (0.5, 2.5), (1.0, 4.0)] {
            assert!(close(quantile(&v, q), want), "{q}");
        }
        assert!(close(quantile(&[5.0], 0.975), 5.0));
        // The interval sorts its draws and refuses what is not a number.
        let iv = percentile_interval_95((0..=40).rev().map(f64::from).collect()).unwrap();
        assert!(close(iv[0], 1.0) && close(iv[1], 39.0), "{iv:?}");
        assert!(percentile_interval_95(vec![]).is_none());
        assert!(percentile_interval_95(vec![1.0, f64::NAN]).is_none());
    }
}
