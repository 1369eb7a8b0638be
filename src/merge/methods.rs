//! The per-tensor merge each method performs, with its parameters resolved from the method's
//! record (`spec`): the task-arithmetic family, linear, slerp and model_stock here, the others in
//! `spherical` and `selective`.

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;

use super::consensus::{elect_sign, sign, SignRule};
use super::selective;
use super::sparsify::{sparsify, Rescale, Sparsifier};
pub use super::spec::MergeMethod;
use super::spec::{Algorithm, ParamDefault, Pruning};
use super::spherical;

/// Per-model parameters resolved for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelParams {
    pub weight: f64,
    pub density: f64,
    pub gamma: f64,
    pub epsilon: f64,
    /// passthrough's factor (none: the tensor as is).
    pub scale: Option<f64>,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self {
            weight: 1.0,
            density: 1.0,
            gamma: 0.01,
            epsilon: 0.15,
            scale: None,
        }
    }
}

impl ModelParams {
    /// The method's defaults (a required parameter keeps the neutral value; the config checks
    /// that it is given).
    pub fn defaults(method: MergeMethod) -> Self {
        let mut m = Self::default();
        for p in method.spec().per_model {
            if let ParamDefault::Number(x) = p.default {
                // Every per-model parameter of a record has a slot (a test checks it).
                let _ = m.set(p.name, x);
            }
        }
        m
    }

    /// Sets a per-model parameter by its mergekit name.
    pub fn set(&mut self, name: &str, x: f64) -> Result<()> {
        match name {
            "weight" => self.weight = x,
            "density" => self.density = x,
            "gamma" => self.gamma = x,
            "epsilon" => self.epsilon = x,
            "scale" => self.scale = Some(x),
            _ => bail!("no per-model parameter `{name}`"),
        }
        Ok(())
    }
}

/// A global parameter's value, as the YAML gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Setting<'a> {
    Number(f64),
    Flag(bool),
    Text(&'a str),
}

impl Setting<'_> {
    fn number(self, name: &str) -> Result<f64> {
        match self {
            Self::Number(x) => Ok(x),
            Self::Flag(b) => Ok(if b { 1.0 } else { 0.0 }),
            Self::Text(t) => bail!("`{name}` must be a number, got `{t}`"),
        }
    }

    /// mergekit reads flags with Python truthiness, so 0/1 work too.
    fn flag(self, name: &str) -> Result<bool> {
        match self {
            Self::Flag(b) => Ok(b),
            Self::Number(x) => Ok(x != 0.0),
            Self::Text(t) => bail!("`{name}` must be true or false, got `{t}`"),
        }
    }
}

/// Global parameters resolved for one tensor (the union over methods; each reads its own).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalParams {
    pub normalize: bool,
    pub rescale: Rescale,
    pub lambda: f64,
    pub sign_rule: SignRule,
    /// slerp's interpolation factor (0 = base model); nearswap's distance scale.
    pub t: f64,
    pub filter_wise: bool,
    /// sce: the fraction of highest-variance entries kept.
    pub select_topk: f64,
    /// nuslerp: interpolate columns (`true`) instead of rows; `flatten` takes the whole tensor.
    pub nuslerp_row_wise: bool,
    pub nuslerp_flatten: bool,
    /// multislerp: divide the weights by their sum; the guard added to norms.
    pub normalize_weights: bool,
    pub eps: f64,
    /// karcher: iterations and convergence tolerance.
    pub max_iter: usize,
    pub tol: f64,
    /// ram / ramplus_tl: |δ| above this counts as a contribution.
    pub epsilon: f64,
    /// ramplus_tl: boost `1 + r·min(ρ, alpha)` of a model's unique entries.
    pub r: f64,
    pub alpha: f64,
}

impl GlobalParams {
    /// mergekit's defaults for `method`, from its record.
    pub fn defaults(method: MergeMethod) -> Self {
        let mut g = Self {
            normalize: false,
            rescale: Rescale::None,
            lambda: 1.0,
            sign_rule: SignRule::Sum,
            t: 0.5,
            filter_wise: false,
            select_topk: 1.0,
            nuslerp_row_wise: false,
            nuslerp_flatten: true,
            normalize_weights: true,
            eps: 1e-8,
            max_iter: 10,
            tol: 1e-5,
            epsilon: 1e-5,
            r: 0.1,
            alpha: 0.2,
        };
        for p in method.spec().global {
            let value = match p.default {
                ParamDefault::Number(x) => Setting::Number(x),
                ParamDefault::Bool(b) => Setting::Flag(b),
                ParamDefault::Text(t) => Setting::Text(t),
                ParamDefault::Required | ParamDefault::Unset => continue,
            };
            // Every default of a record fits its slot (a test checks it).
            let _ = g.set(p.name, value);
        }
        g
    }

    /// Sets a global parameter by its mergekit name.
    pub fn set(&mut self, name: &str, v: Setting) -> Result<()> {
        match name {
            "normalize" => self.normalize = v.flag(name)?,
            "rescale" => {
                self.rescale = match v {
                    Setting::Text("l1") => Rescale::L1,
                    Setting::Text("exact") => Rescale::Exact,
                    Setting::Text(t) => {
                        bail!("`rescale` must be true, false, `l1` or `exact`, got `{t}`")
                    }
                    _ if v.flag(name)? => Rescale::L1,
                    _ => Rescale::None,
                }
            }
            "sign_rule" => {
                self.sign_rule = match v {
                    Setting::Text("sum") => SignRule::Sum,
                    Setting::Text("count") => SignRule::Count,
                    other => bail!("`sign_rule` must be `sum` or `count`, got {other:?}"),
                }
            }
            "lambda" => self.lambda = v.number(name)?,
            "t" => self.t = v.number(name)?,
            "filter_wise" => self.filter_wise = v.flag(name)?,
            "select_topk" => self.select_topk = v.number(name)?,
            "nuslerp_row_wise" => self.nuslerp_row_wise = v.flag(name)?,
            "nuslerp_flatten" => self.nuslerp_flatten = v.flag(name)?,
            "normalize_weights" => self.normalize_weights = v.flag(name)?,
            "eps" => self.eps = v.number(name)?,
            "max_iter" => self.max_iter = v.number(name)? as usize,
            "tol" => self.tol = v.number(name)?,
            "epsilon" => self.epsilon = v.number(name)?,
            "r" => self.r = v.number(name)?,
            "alpha" => self.alpha = v.number(name)?,
            // Without numeric effect: a mask's dtype.
            "int8_mask" => {}
            _ => bail!("no global parameter `{name}`"),
        }
        Ok(())
    }
}

/// One output tensor's inputs, flattened: `base` is θ₀, `models` the other θᵢ (same length).
pub struct TensorInputs<'a> {
    pub name: &'a str,
    pub base: Option<&'a [f32]>,
    pub models: Vec<&'a [f32]>,
    pub params: Vec<ModelParams>,
    /// Length of the last dimension (per-row operations).
    pub row_len: usize,
    /// Number of dimensions of the tensor.
    pub ndim: usize,
}

impl TensorInputs<'_> {
    fn base(&self, method: MergeMethod) -> Result<&[f32]> {
        self.base
            .with_context(|| format!("{} needs a base_model", method.name()))
    }

    /// The only model of a method that merges the base with exactly one other.
    fn single(&self, method: MergeMethod) -> Result<&[f32]> {
        match self.models.as_slice() {
            [m] => Ok(m),
            ms => bail!(
                "{} merges the base_model with exactly one other model, got {}",
                method.name(),
                ms.len()
            ),
        }
    }
}

pub(crate) fn sparsifier(p: Pruning, m: &ModelParams) -> Sparsifier {
    if m.density >= 1.0 {
        return Sparsifier::None; // density 1 (the default) means no pruning
    }
    match p {
        Pruning::None => Sparsifier::None,
        Pruning::Magnitude => Sparsifier::Magnitude { density: m.density },
        Pruning::Random => Sparsifier::Random { density: m.density },
        Pruning::Breadcrumbs => Sparsifier::Breadcrumbs {
            density: m.density,
            gamma: m.gamma,
        },
        Pruning::Della => Sparsifier::Della {
            density: m.density,
            epsilon: m.epsilon,
        },
    }
}

/// Buffers one merge worker reuses from tensor to tensor: the models' task vectors.
#[derive(Debug, Default)]
pub struct MergeScratch {
    pub(crate) deltas: Vec<Vec<f32>>,
}

/// Merges one tensor. `rng(i)` is the random stream for model `i` of this tensor.
pub fn merge_tensor(
    method: MergeMethod,
    global: &GlobalParams,
    input: &TensorInputs,
    rng: impl FnMut(usize) -> StdRng,
) -> Result<Vec<f32>> {
    let mut out = vec![0f32; input_len(input)];
    merge_tensor_into(
        method,
        global,
        input,
        rng,
        &mut out,
        &mut MergeScratch::default(),
    )?;
    Ok(out)
}

/// Entries per input tensor: the base's, else the first model's.
fn input_len(input: &TensorInputs) -> usize {
    input
        .base
        .or(input.models.first().copied())
        .map_or(0, <[f32]>::len)
}

/// [`merge_tensor`] into `out` (as long as the inputs), with the task vectors in `scratch`: the
/// in-memory merger reuses both from candidate to candidate instead of allocating a model each.
pub fn merge_tensor_into(
    method: MergeMethod,
    global: &GlobalParams,
    input: &TensorInputs,
    mut rng: impl FnMut(usize) -> StdRng,
    out: &mut [f32],
    scratch: &mut MergeScratch,
) -> Result<()> {
    let n = input_len(input);
    if input.models.iter().any(|m| m.len() != n) {
        bail!("tensor `{}`: inputs differ in size", input.name);
    }
    if input.models.is_empty() {
        bail!("tensor `{}`: no models to merge", input.name);
    }
    if out.len() != n {
        bail!(
            "tensor `{}`: output buffer of {} entries for inputs of {n}",
            input.name,
            out.len()
        );
    }
    if let Algorithm::TaskArithmetic { pruning, consensus } = method.spec().algorithm {
        let base = input.base(method)?;
        task_arithmetic(
            pruning, consensus, global, input, base, &mut rng, out, scratch,
        );
        return Ok(());
    }
    match method {
        MergeMethod::Linear => linear(input, global.normalize, out),
        MergeMethod::Slerp => {
            out.copy_from_slice(&slerp(global.t, input.base(method)?, input.single(method)?))
        }
        MergeMethod::ModelStock => {
            let base = input.base(method)?;
            if input.models.len() < 2 {
                bail!("model_stock needs a base_model and at least two other models");
            }
            out.copy_from_slice(&model_stock(
                base,
                &input.models,
                if global.filter_wise { input.row_len } else { n },
            ));
        }
        MergeMethod::Sce => out.copy_from_slice(&selective::sce(
            input.base(method)?,
            &input.models,
            global.select_topk,
        )),
        MergeMethod::Ram => out.copy_from_slice(&selective::ram(
            input.base(method)?,
            &input.models,
            global.epsilon,
            None,
        )),
        MergeMethod::RamplusTl => out.copy_from_slice(&selective::ram(
            input.base(method)?,
            &input.models,
            global.epsilon,
            Some((global.r, global.alpha)),
        )),
        MergeMethod::Nearswap => out.copy_from_slice(&selective::nearswap(
            global.t,
            input.base(method)?,
            input.single(method)?,
        )),
        MergeMethod::ArceeFusion => out.copy_from_slice(&selective::arcee_fusion(
            input.base(method)?,
            input.single(method)?,
            input.row_len,
        )),
        MergeMethod::Passthrough => {
            let [m] = input.models.as_slice() else {
                bail!(
                    "passthrough takes exactly one model per tensor, got {}",
                    input.models.len()
                );
            };
            match input.params.first().and_then(|p| p.scale) {
                Some(s) => out
                    .iter_mut()
                    .zip(m.iter())
                    .for_each(|(o, &x)| *o = x * s as f32),
                None => out.copy_from_slice(m),
            }
        }
        MergeMethod::Nuslerp => {
            out.copy_from_slice(&spherical::nuslerp_models(global, input.base, input)?)
        }
        MergeMethod::Multislerp => {
            out.copy_from_slice(&spherical::multislerp(global, input.base, input)?)
        }
        MergeMethod::Karcher => out.copy_from_slice(&spherical::karcher(&input.models, global)),
        _ => bail!("{} has no per-tensor formula", method.name()),
    }
    Ok(())
}

/// mergekit's generalized task arithmetic: sparsify each δᵢ, weight it, elect signs when the
/// method uses consensus, mix (and normalize by the weights that took part), scale by λ, into
/// `out`, with the task vectors in `scratch` (reused from tensor to tensor).
#[allow(clippy::too_many_arguments)] // the method's facts, its inputs, and the buffers
fn task_arithmetic(
    pruning: Pruning,
    consensus: bool,
    global: &GlobalParams,
    input: &TensorInputs,
    base: &[f32],
    rng: &mut impl FnMut(usize) -> StdRng,
    out: &mut [f32],
    scratch: &mut MergeScratch,
) {
    let count = input.models.len().min(input.params.len());
    scratch.deltas.resize_with(count, Vec::new);
    scratch.deltas.truncate(count);
    for (i, ((m, p), delta)) in input
        .models
        .iter()
        .zip(&input.params)
        .zip(scratch.deltas.iter_mut())
        .enumerate()
    {
        delta.clear();
        delta.extend(m.iter().zip(base).map(|(a, b)| a - b));
        sparsify(
            delta,
            input.row_len,
            sparsifier(pruning, p),
            global.rescale,
            &mut rng(i),
        );
        let w = p.weight as f32;
        delta.iter_mut().for_each(|x| *x *= w);
    }
    let weighted: Vec<&[f32]> = scratch.deltas.iter().map(Vec::as_slice).collect();
    out.copy_from_slice(base);
    mix_into(&weighted, &input.params, global, consensus, out);
}

/// Adds the weighted (sparsified) task vectors to `out` (which holds the base): summed, or
/// only those agreeing with the elected sign under consensus; divided by the weights that took
/// part when `normalize`; scaled by λ. Entry by entry, so a block of the tensor merges alone.
pub(crate) fn mix_into(
    weighted: &[&[f32]],
    params: &[ModelParams],
    global: &GlobalParams,
    consensus: bool,
    out: &mut [f32],
) {
    let weights: Vec<f32> = params.iter().map(|p| p.weight as f32).collect();
    let lambda = global.lambda as f32;
    if let ([a, b], [wa, wb], true) = (weighted, weights.as_slice(), consensus) {
        mix_two_with_consensus([a, b], [*wa, *wb], global, lambda, out);
        return;
    }
    if consensus {
        for (j, o) in out.iter_mut().enumerate() {
            let elected = elect_sign(weighted, j, global.sign_rule);
            let (mut mix, mut div) = (0f32, 0f32);
            for (d, &w) in weighted.iter().zip(&weights) {
                if sign(d[j]) == elected {
                    mix += d[j];
                    div += w;
                }
            }
            if global.normalize {
                mix /= if div == 0.0 { 1.0 } else { div };
            }
            *o += mix * lambda;
        }
    } else {
        let total: f32 = weights.iter().sum();
        let div = if total.abs() < 1e-8 { 1.0 } else { total };
        for (j, o) in out.iter_mut().enumerate() {
            let mut mix: f32 = weighted.iter().map(|d| d[j]).sum();
            if global.normalize {
                mix /= div;
            }
            *o += mix * lambda;
        }
    }
}

/// [`mix_into`]'s consensus for two task vectors (PAFT's SFT and preference deltas), written
/// so that it vectorises: the same operations in the same order, so the same bits. Adding the
/// +0.0 of a dropped entry leaves the sum as it was (it never holds −0.0: a kept entry is
/// non-zero and the sum starts at +0.0).
fn mix_two_with_consensus(
    [a, b]: [&[f32]; 2],
    [wa, wb]: [f32; 2],
    global: &GlobalParams,
    lambda: f32,
    out: &mut [f32],
) {
    let count_rule = global.sign_rule == SignRule::Count;
    let normalize = global.normalize;
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        let (sx, sy) = (sign(x), sign(y));
        let score = if count_rule { sx + sy } else { x + y };
        let elected = if score >= 0.0 { 1.0 } else { -1.0 };
        let (kx, ky) = (sx == elected, sy == elected);
        let mut mix = 0f32 + if kx { x } else { 0.0 };
        mix += if ky { y } else { 0.0 };
        let mut div = 0f32 + if kx { wa } else { 0.0 };
        div += if ky { wb } else { 0.0 };
        if normalize {
            mix /= if div == 0.0 { 1.0 } else { div };
        }
        *o += mix * lambda;
    }
}

/// Σ wᵢθᵢ (over the base too, when it has a weight), divided by Σ wᵢ if `normalize`, into `out`.
fn linear(input: &TensorInputs, normalize: bool, out: &mut [f32]) {
    out.fill(0.0);
    let mut total = 0f32;
    for (m, p) in input.models.iter().zip(&input.params) {
        let w = p.weight as f32;
        total += w;
        out.iter_mut().zip(m.iter()).for_each(|(o, &x)| *o += w * x);
    }
    if normalize {
        out.iter_mut().for_each(|o| *o /= total);
    }
}

/// Spherical interpolation of the flattened tensors; linear when they are nearly parallel.
fn slerp(t: f64, v0: &[f32], v1: &[f32]) -> Vec<f32> {
    let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let (n0, n1) = (norm(v0), norm(v1));
    let eps = 1e-8;
    let (s0n, s1n) = (
        if n0 > eps { n0 } else { 1.0 },
        if n1 > eps { n1 } else { 1.0 },
    );
    let dot: f64 = v0
        .iter()
        .zip(v1)
        .map(|(&a, &b)| (a as f64 / s0n) * (b as f64 / s1n))
        .sum();
    if dot.abs() > 0.9995 {
        return v0
            .iter()
            .zip(v1)
            .map(|(&a, &b)| ((1.0 - t) * a as f64 + t * b as f64) as f32)
            .collect();
    }
    let theta0 = dot.acos();
    let sin0 = theta0.sin();
    let theta_t = theta0 * t;
    let s0 = (theta0 - theta_t).sin() / sin0;
    let s1 = theta_t.sin() / sin0;
    v0.iter()
        .zip(v1)
        .map(|(&a, &b)| (s0 * a as f64 + s1 * b as f64) as f32)
        .collect()
}

/// Model Stock: interpolate between the base and the models' mean by a factor from the mean
/// pairwise cosine of their offsets, per `group` consecutive entries (whole tensor or per row).
fn model_stock(base: &[f32], models: &[&[f32]], group: usize) -> Vec<f32> {
    let n_models = models.len() as f64;
    let mut out = vec![0f32; base.len()];
    for (g, chunk) in out.chunks_mut(group.max(1)).enumerate() {
        let start = g * group.max(1);
        let range = start..start + chunk.len();
        let offsets: Vec<Vec<f64>> = models
            .iter()
            .map(|m| {
                m[range.clone()]
                    .iter()
                    .zip(&base[range.clone()])
                    .map(|(&a, &b)| a as f64 - b as f64)
                    .collect()
            })
            .collect();
        let mut cos_sum = 0.0;
        let mut pairs = 0.0;
        for i in 0..offsets.len() {
            for j in i + 1..offsets.len() {
                let dot: f64 = offsets[i].iter().zip(&offsets[j]).map(|(a, b)| a * b).sum();
                let ni = offsets[i].iter().map(|x| x * x).sum::<f64>().sqrt();
                let nj = offsets[j].iter().map(|x| x * x).sum::<f64>().sqrt();
                cos_sum += (dot / (ni * nj).max(1e-6)).clamp(-1.0, 1.0);
                pairs += 1.0;
            }
        }
        let cos = cos_sum / pairs;
        let denom = 1.0 + (n_models - 1.0) * cos;
        // Offsets pointing in opposite directions: stay at the base, as mergekit does.
        let t = if denom.abs() < 1e-6 {
            0.0
        } else {
            n_models * cos / denom
        };
        for (k, o) in chunk.iter_mut().enumerate() {
            let idx = start + k;
            let avg = models.iter().map(|m| m[idx] as f64).sum::<f64>() / n_models;
            *o = (t * avg + (1.0 - t) * base[idx] as f64) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn run(
        method: MergeMethod,
        global: GlobalParams,
        base: &[f32],
        models: &[&[f32]],
        params: Vec<ModelParams>,
    ) -> Vec<f32> {
        let input = TensorInputs {
            name: "t",
            base: Some(base),
            models: models.to_vec(),
            params,
            row_len: base.len(),
            ndim: 1,
        };
        merge_tensor(method, &global, &input, |i| StdRng::seed_from_u64(i as u64)).unwrap()
    }

    #[test]
    fn ties_takes_disjoint_mean_of_agreeing_signs() {
        let base = [0.0f32; 4];
        let a = [1.0f32, -2.0, 0.5, 0.0];
        let b = [3.0f32, 1.0, -0.1, 0.0];
        let p = ModelParams {
            weight: 1.0,
            ..Default::default()
        };
        let out = run(
            MergeMethod::Ties,
            GlobalParams::defaults(MergeMethod::Ties),
            &base,
            &[&a, &b],
            vec![p, p],
        );
        // entry 0: both +, mean 2; entry 1: sum −1 → −, only a: −2; entry 2: sum 0.4 → +, only a: 0.5; entry 3: 0
        assert_eq!(out, vec![2.0, -2.0, 0.5, 0.0]);
    }

    #[test]
    fn task_arithmetic_extrapolates_with_negative_weights_and_lambda() {
        let base = [1.0f32, 1.0];
        let a = [2.0f32, 0.0];
        let b = [3.0f32, 1.0];
        let mut g = GlobalParams::defaults(MergeMethod::TaskArithmetic);
        g.lambda = 2.0;
        let out = run(
            MergeMethod::TaskArithmetic,
            g,
            &base,
            &[&a, &b],
            vec![
                ModelParams {
                    weight: 1.5,
                    ..Default::default()
                },
                ModelParams {
                    weight: -0.5,
                    ..Default::default()
                },
            ],
        );
        // δa = (1, −1), δb = (2, 0): 1.5δa − 0.5δb = (0.5, −1.5), ×2 = (1, −3)
        assert_eq!(out, vec![2.0, -2.0]);
    }

    #[test]
    fn slerp_endpoints_and_model_stock_identity() {
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 1.0];
        let mut g = GlobalParams::defaults(MergeMethod::Slerp);
        g.t = 0.5;
        let mid = run(
            MergeMethod::Slerp,
            g,
            &a,
            &[&b],
            vec![ModelParams::default()],
        );
        assert!((mid[0] - 0.70710677).abs() < 1e-6 && (mid[1] - 0.70710677).abs() < 1e-6);
        // Identical fine-tunes: cos = 1, t = 1, output = their mean.
        let base = [0.0f32, 0.0];
        let m = [1.0f32, 2.0];
        let out = run(
            MergeMethod::ModelStock,
            GlobalParams::defaults(MergeMethod::ModelStock),
            &base,
            &[&m, &m],
            vec![ModelParams::default(); 2],
        );
        assert_eq!(out, vec![1.0, 2.0]);
    }

    #[test]
    fn every_parameter_of_every_record_has_a_slot() {
        use super::super::spec::Domain;
        for m in MergeMethod::all() {
            let mut g = GlobalParams::defaults(m);
            for p in m.spec().global {
                let value = match p.default {
                    ParamDefault::Number(x) => Setting::Number(x),
                    ParamDefault::Bool(b) => Setting::Flag(b),
                    ParamDefault::Text(t) => Setting::Text(t),
                    ParamDefault::Required | ParamDefault::Unset => match p.domain {
                        Domain::Choice(c) => Setting::Text(c[0]),
                        Domain::Flag | Domain::NoEffect => Setting::Flag(true),
                        _ => Setting::Number(0.5),
                    },
                };
                g.set(p.name, value)
                    .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
            }
            let mut mp = ModelParams::defaults(m);
            for p in m.spec().per_model {
                mp.set(p.name, 0.5)
                    .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
            }
        }
    }
}
