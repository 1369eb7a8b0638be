//! Merges that choose entries: sce (highest-variance entries, sign consensus, energy weights),
//! ram / ramplus_tl (contributions averaged where models overlap, kept — or boosted — where one
//! model alone changed the entry), nearswap (move toward the other model where the two are
//! close) and arcee_fusion (take the other model's entries whose importance is an outlier).
//! Each follows mergekit 0.1.5's formula; task vectors are formed in f32 as mergekit forms them,
//! so thresholds and masks see the same values.

use super::consensus::sign;

fn task_vectors(base: &[f32], models: &[&[f32]]) -> Vec<Vec<f32>> {
    models
        .iter()
        .map(|m| m.iter().zip(base).map(|(a, b)| a - b).collect())
        .collect()
}

/// Indices of the `k` largest values, ties broken by lower index.
fn top_k(values: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Keeps the entries where the task vectors vary most across models (`select_topk` of those
/// with nonzero variance); zero everywhere at `select_topk` ≤ 0, everything at ≥ 1.
fn sce_mask(tvs: &[Vec<f32>], select_topk: f64) -> Vec<bool> {
    let n = tvs[0].len();
    if select_topk >= 1.0 {
        return vec![true; n];
    }
    let mut mask = vec![false; n];
    if select_topk <= 0.0 {
        return mask;
    }
    let m = tvs.len() as f64;
    let var: Vec<f64> = (0..n)
        .map(|j| {
            let mean = tvs.iter().map(|t| t[j] as f64).sum::<f64>() / m;
            tvs.iter()
                .map(|t| (t[j] as f64 - mean).powi(2))
                .sum::<f64>()
                / m
        })
        .collect();
    let nonzero = var.iter().filter(|&&v| v != 0.0).count();
    // torch multiplies the count (an integer tensor) by the density in f32, then truncates.
    let k = (nonzero as f32 * select_topk as f32) as usize;
    top_k(&var, k).into_iter().for_each(|i| mask[i] = true);
    mask
}

/// SCE: select (by variance), calculate (weights ∝ mean squared task vector), erase (entries
/// against the elected sign), then the weighted mean of what is left.
pub(crate) fn sce(base: &[f32], models: &[&[f32]], select_topk: f64) -> Vec<f32> {
    let mut tvs = task_vectors(base, models);
    let mask = sce_mask(&tvs, select_topk);
    for tv in &mut tvs {
        tv.iter_mut()
            .zip(&mask)
            .filter(|(_, &keep)| !keep)
            .for_each(|(x, _)| *x = 0.0);
    }
    let energy: Vec<f64> = tvs
        .iter()
        .map(|tv| tv.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / tv.len().max(1) as f64)
        .collect();
    let total: f64 = energy.iter().sum();
    let weights: Vec<f64> = if total.abs() < 1e-6 {
        vec![1.0 / tvs.len() as f64; tvs.len()]
    } else {
        energy.iter().map(|e| e / total).collect()
    };
    (0..base.len())
        .map(|j| {
            let elected = if tvs.iter().map(|t| t[j]).sum::<f32>() >= 0.0 {
                1.0
            } else {
                -1.0
            };
            let (mut mix, mut div) = (0f64, 0f64);
            for (tv, w) in tvs.iter().zip(&weights) {
                if sign(tv[j]) == elected {
                    mix += tv[j] as f64 * w;
                    div += w;
                }
            }
            base[j] + (mix / div.max(1e-6)) as f32
        })
        .collect()
}

/// RAM: an entry changed (|δ| > epsilon) by one model keeps that model's δ; one changed by
/// several gets their mean. ramplus_tl (`boost = Some((r, alpha))`) multiplies a model's unique
/// entries by 1 + r·min(ρ, alpha), ρ = its shared / unique entry counts in this tensor.
pub(crate) fn ram(
    base: &[f32],
    models: &[&[f32]],
    epsilon: f64,
    boost: Option<(f64, f64)>,
) -> Vec<f32> {
    let tvs = task_vectors(base, models);
    // torch compares an f32 tensor with the scalar cast to f32.
    let eps = epsilon as f32;
    let active: Vec<Vec<bool>> = tvs
        .iter()
        .map(|tv| tv.iter().map(|x| x.abs() > eps).collect())
        .collect();
    let counts: Vec<usize> = (0..base.len())
        .map(|j| active.iter().filter(|a| a[j]).count())
        .collect();
    let lambdas: Vec<f64> = active
        .iter()
        .map(|a| match boost {
            None => 1.0,
            Some((r, alpha)) => {
                let shared = (0..a.len()).filter(|&j| a[j] && counts[j] > 1).count() as f64;
                let unique = (0..a.len()).filter(|&j| a[j] && counts[j] == 1).count() as f64;
                let rho = shared / unique.max(epsilon);
                1.0 + r * rho.clamp(0.0, alpha)
            }
        })
        .collect();
    (0..base.len())
        .map(|j| {
            let mut merged = 0f64;
            for ((tv, a), lambda) in tvs.iter().zip(&active).zip(&lambdas) {
                if !a[j] {
                    continue;
                }
                merged += match counts[j] {
                    1 => tv[j] as f64 * lambda,
                    c => tv[j] as f64 / c as f64,
                };
            }
            base[j] + merged as f32
        })
        .collect()
}

/// NearSwap: weight w = clamp(t / |a − b|, 0, 1) toward the other model b; entries closer than
/// t move all the way, distant ones barely.
pub(crate) fn nearswap(t: f64, a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = ((x - y).abs() as f64).max(1e-6);
            let w = (t / d).clamp(0.0, 1.0);
            (w * y as f64 + (1.0 - w) * x as f64) as f32
        })
        .collect()
}

/// Row-wise softmax (a 1-D tensor is one row).
fn softmax_rows(v: &[f32], cols: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks(cols) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let exps: Vec<f64> = row.iter().map(|&x| (x as f64 - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        out.extend(exps.into_iter().map(|e| e / sum));
    }
    out
}

/// Arcee Fusion: importance = |b − a| × KL(softmax(b) ‖ softmax(a)) of its row; the entries
/// whose importance reaches median + 1.5·IQR take b's value, the rest keep a's.
///
/// mergekit estimates the quantiles from a random sample of 10⁶ entries when a tensor is larger
/// (unseeded, so not reproducible); paft takes the exact quantiles of every tensor.
pub(crate) fn arcee_fusion(a: &[f32], b: &[f32], cols: usize) -> Vec<f32> {
    let cols = cols.max(1);
    let (p, q) = (softmax_rows(b, cols), softmax_rows(a, cols));
    let kl: Vec<f64> = p
        .chunks(cols)
        .zip(q.chunks(cols))
        .map(|(pr, qr)| {
            pr.iter()
                .zip(qr)
                .map(|(&x, &y)| {
                    let (x, y) = (x + 1e-8, y + 1e-8);
                    x * (x / y).ln()
                })
                .sum()
        })
        .collect();
    let importance: Vec<f64> = a
        .iter()
        .zip(b)
        .enumerate()
        .map(|(i, (&x, &y))| (y - x).abs() as f64 * kl[i / cols])
        .collect();
    let mut sorted = importance.clone();
    sorted.sort_by(f64::total_cmp);
    // torch: (q · (n − 1)).long() with q an f32 tensor — truncation.
    let at = |q: f32| sorted[(q * (sorted.len() - 1) as f32) as usize];
    let threshold = at(0.5) + 1.5 * (at(0.75) - at(0.25));
    a.iter()
        .zip(b)
        .zip(&importance)
        .map(|((&x, &y), &imp)| if imp >= threshold { x + (y - x) } else { x })
        .collect()
}
