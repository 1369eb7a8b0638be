//! Merges on the hypersphere: nuslerp (slerp of two models or task vectors, per row, column or
//! whole tensor), multislerp (barycentric interpolation of many through the tangent space at
//! their mean) and karcher (the Riemannian mean of the directions, rescaled by the mean norm).
//! Each follows mergekit 0.1.5's formula, computed in f64 (mergekit computes in f32; the
//! difference is far below the 1e-6 the fixtures are checked to).

use anyhow::{bail, Result};

use super::methods::{GlobalParams, TensorInputs};

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// θᵢ − θ₀ in f32 (as mergekit subtracts), widened; θᵢ itself without a base.
fn offsets(base: Option<&[f32]>, m: &[f32]) -> Vec<f64> {
    match base {
        Some(b) => m.iter().zip(b).map(|(&x, &y)| (x - y) as f64).collect(),
        None => widen(m),
    }
}

/// `base + v` added in f32, as mergekit adds the f32 result back onto the base.
fn add_base(base: Option<&[f32]>, v: Vec<f64>) -> Vec<f32> {
    match base {
        Some(b) => b.iter().zip(v).map(|(&x, y)| x + y as f32).collect(),
        None => v.into_iter().map(|y| y as f32).collect(),
    }
}

/// nuslerp of the two models (or their task vectors when there is a base): t is the second
/// model's share of the weights, 0.5 when they sum to (almost) zero.
pub(crate) fn nuslerp_models(
    global: &GlobalParams,
    base: Option<&[f32]>,
    input: &TensorInputs,
) -> Result<Vec<f32>> {
    let ([m0, m1], [p0, p1]) = (input.models.as_slice(), input.params.as_slice()) else {
        bail!(
            "nuslerp merges exactly two models (plus an optional base_model), got {}",
            input.models.len()
        );
    };
    let sum = p0.weight + p1.weight;
    let t = if sum.abs() < 1e-6 {
        0.5
    } else {
        p1.weight / sum
    };
    let (v0, v1) = (offsets(base, m0), offsets(base, m1));
    let n = v0.len();
    let mut out = vec![0f64; n];
    let cols = input.row_len.max(1);
    if global.nuslerp_flatten || input.ndim <= 1 {
        let idx: Vec<usize> = (0..n).collect();
        slerp_group(t, &v0, &v1, &idx, &mut out);
    } else if input.ndim != 2 {
        bail!(
            "nuslerp with nuslerp_flatten: false works on 1-D and 2-D tensors, this one has {} dimensions",
            input.ndim
        );
    } else if global.nuslerp_row_wise {
        // mergekit transposes dim 0 to the end: each column is one vector.
        for c in 0..cols {
            let idx: Vec<usize> = (c..n).step_by(cols).collect();
            slerp_group(t, &v0, &v1, &idx, &mut out);
        }
    } else {
        for start in (0..n).step_by(cols) {
            let idx: Vec<usize> = (start..start + cols).collect();
            slerp_group(t, &v0, &v1, &idx, &mut out);
        }
    }
    Ok(add_base(base, out))
}

/// Slerp of the entries `idx` of v0 and v1 (unnormalized), linear when they are colinear.
fn slerp_group(t: f64, v0: &[f64], v1: &[f64], idx: &[usize], out: &mut [f64]) {
    let a: Vec<f64> = idx.iter().map(|&i| v0[i]).collect();
    let b: Vec<f64> = idx.iter().map(|&i| v1[i]).collect();
    // mergekit's `_normalize` clamps the norm at 1e-7.
    let (na, nb) = (norm(&a).max(1e-7), norm(&b).max(1e-7));
    let cos = (dot(&a, &b) / (na * nb)).clamp(-1.0, 1.0);
    let theta = cos.acos();
    let sin = theta.sin();
    // mergekit's colinearity test: 1 − cos² ≤ eps², eps = 1e-8.
    let (s0, s1) = if 1.0 - cos * cos <= 1e-16 {
        (1.0 - t, t)
    } else {
        (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
    };
    for (k, &i) in idx.iter().enumerate() {
        out[i] = s0 * a[k] + s1 * b[k];
    }
}

/// Barycentric interpolation on the sphere: project the unit vectors onto the tangent space at
/// their weighted mean, average there, map back, and scale by the weighted mean norm.
pub(crate) fn multislerp(
    global: &GlobalParams,
    base: Option<&[f32]>,
    input: &TensorInputs,
) -> Result<Vec<f32>> {
    if let [m] = input.models.as_slice() {
        return Ok(m.to_vec()); // mergekit returns the single model unchanged
    }
    let mut w: Vec<f64> = input.params.iter().map(|p| p.weight).collect();
    if global.normalize_weights {
        let sum: f64 = w.iter().sum();
        if sum == 0.0 {
            bail!("multislerp: the weights sum to 0, so they cannot be normalized");
        }
        w.iter_mut().for_each(|x| *x /= sum);
    }
    let eps = global.eps;
    let tvs: Vec<Vec<f64>> = input.models.iter().map(|m| offsets(base, m)).collect();
    let norms: Vec<f64> = tvs.iter().map(|v| norm(v)).collect();
    let units: Vec<Vec<f64>> = tvs
        .iter()
        .zip(&norms)
        .map(|(v, n)| v.iter().map(|x| x / (n + eps)).collect())
        .collect();
    let n = tvs[0].len();
    let mut mean = vec![0f64; n];
    for (u, wi) in units.iter().zip(&w) {
        mean.iter_mut().zip(u).for_each(|(m, x)| *m += wi * x);
    }
    let mean_norm = norm(&mean);
    if mean_norm < eps {
        if let ([t0, t1], [w0, w1]) = (tvs.as_slice(), w.as_slice()) {
            // mergekit falls back to the linear mix of two opposite vectors.
            let lin = t0.iter().zip(t1).map(|(a, b)| a * w0 + b * w1).collect();
            return Ok(add_base(base, lin));
        }
        bail!("multislerp: the weighted mean of the unit vectors is zero (antipodal inputs whose weights cancel); change the weights");
    }
    mean.iter_mut().for_each(|m| *m /= mean_norm);
    let mut tangent = vec![0f64; n];
    for (u, wi) in units.iter().zip(&w) {
        let d = dot(u, &mean);
        tangent
            .iter_mut()
            .zip(u.iter().zip(&mean))
            .for_each(|(t, (x, m))| *t += wi * (x - d * m));
    }
    let tn = norm(&tangent) + eps;
    let avg_norm: f64 = norms.iter().zip(&w).map(|(a, b)| a * b).sum();
    let (c, s) = (tn.cos(), tn.sin() / tn);
    let result = mean
        .iter()
        .zip(&tangent)
        .map(|(m, t)| (m * c + t * s) * avg_norm)
        .collect();
    Ok(add_base(base, result))
}

/// The Karcher mean of the models' directions (equal weights; mergekit ignores per-model
/// weights here), times the mean of their norms.
pub(crate) fn karcher(models: &[&[f32]], global: &GlobalParams) -> Vec<f32> {
    if let [m] = models {
        return m.to_vec();
    }
    let tol = global.tol;
    let alphas = vec![1.0 / models.len() as f64; models.len()];
    let vs: Vec<Vec<f64>> = models.iter().map(|m| widen(m)).collect();
    let norms: Vec<f64> = vs.iter().map(|v| norm(v)).collect();
    let valid: Vec<usize> = (0..vs.len()).filter(|&i| norms[i] > tol).collect();
    let n = vs[0].len();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let units: Vec<Vec<f64>> = valid
        .iter()
        .map(|&i| vs[i].iter().map(|x| x / norms[i]).collect())
        .collect();
    let alpha_sum: f64 = valid.iter().map(|&i| alphas[i]).sum();
    let a: Vec<f64> = valid.iter().map(|&i| alphas[i] / alpha_sum).collect();
    let mut u = vec![0f64; n];
    for (ui, ai) in units.iter().zip(&a) {
        u.iter_mut().zip(ui).for_each(|(x, y)| *x += ai * y);
    }
    let nu = norm(&u);
    if nu < tol {
        u = units[0].clone();
    } else {
        u.iter_mut().for_each(|x| *x /= nu);
    }
    for _ in 0..global.max_iter {
        if !karcher_step(&mut u, &units, &a, tol) {
            break;
        }
    }
    let s: f64 = alphas.iter().zip(&norms).map(|(a, n)| a * n).sum();
    u.into_iter().map(|x| (s * x) as f32).collect()
}

/// One step along the mean of the log maps; false once the step is below `tol` (converged).
fn karcher_step(u: &mut [f64], units: &[Vec<f64>], a: &[f64], tol: f64) -> bool {
    let mut t = vec![0f64; u.len()];
    for (ui, ai) in units.iter().zip(a) {
        let d = dot(u, ui).clamp(-1.0, 1.0);
        let theta = d.acos();
        if theta < tol {
            continue;
        }
        let k = ai * theta / theta.sin();
        t.iter_mut()
            .zip(ui.iter().zip(u.iter()))
            .for_each(|(x, (y, z))| *x += k * (y - d * z));
    }
    let nt = norm(&t);
    if nt < tol {
        return false;
    }
    let (c, s) = (nt.cos(), nt.sin() / nt);
    u.iter_mut().zip(&t).for_each(|(x, y)| *x = c * *x + s * y);
    let nu = norm(u);
    if nu > tol {
        u.iter_mut().for_each(|x| *x /= nu);
    }
    true
}
