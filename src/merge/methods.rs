//! The registry of merge methods, with mergekit's names and defaults, and the per-tensor merge
//! each one performs.

use anyhow::{bail, Result};
use rand::rngs::StdRng;

use super::consensus::{elect_sign, sign, SignRule};
use super::sparsify::{sparsify_with, Rescale, Sparsifier};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MergeMethod {
    Linear,
    TaskArithmetic,
    Ties,
    DareTies,
    DareLinear,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    Slerp,
    ModelStock,
}

/// Sparsifier family of a task-arithmetic method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pruning {
    None,
    Magnitude,
    Random,
    Breadcrumbs,
    Della,
}

impl MergeMethod {
    pub const ALL: [MergeMethod; 11] = [
        Self::Linear,
        Self::TaskArithmetic,
        Self::Ties,
        Self::DareTies,
        Self::DareLinear,
        Self::Breadcrumbs,
        Self::BreadcrumbsTies,
        Self::Della,
        Self::DellaLinear,
        Self::Slerp,
        Self::ModelStock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::TaskArithmetic => "task_arithmetic",
            Self::Ties => "ties",
            Self::DareTies => "dare_ties",
            Self::DareLinear => "dare_linear",
            Self::Breadcrumbs => "breadcrumbs",
            Self::BreadcrumbsTies => "breadcrumbs_ties",
            Self::Della => "della",
            Self::DellaLinear => "della_linear",
            Self::Slerp => "slerp",
            Self::ModelStock => "model_stock",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match Self::ALL.into_iter().find(|m| m.name() == name) {
            Some(m) => Ok(m),
            None => bail!(
                "unknown merge_method `{name}` (known: {})",
                Self::ALL.map(|m| m.name()).join(", ")
            ),
        }
    }

    fn pruning(self) -> Pruning {
        match self {
            Self::Ties => Pruning::Magnitude,
            Self::DareTies | Self::DareLinear => Pruning::Random,
            Self::Breadcrumbs | Self::BreadcrumbsTies => Pruning::Breadcrumbs,
            Self::Della | Self::DellaLinear => Pruning::Della,
            _ => Pruning::None,
        }
    }

    /// Whether the method is one of the generalized task-arithmetic family (δ = θᵢ − θ₀).
    pub fn uses_task_vectors(self) -> bool {
        !matches!(self, Self::Linear | Self::Slerp | Self::ModelStock)
    }

    pub fn needs_base(self) -> bool {
        self != Self::Linear
    }

    pub fn sign_consensus(self) -> bool {
        matches!(
            self,
            Self::Ties | Self::DareTies | Self::BreadcrumbsTies | Self::Della
        )
    }

    /// mergekit's default for the global `normalize`.
    pub fn default_normalize(self) -> bool {
        matches!(self, Self::Linear | Self::Ties | Self::Della)
    }

    /// mergekit's default for the global `rescale` (L1 matching when on).
    pub fn default_rescale(self) -> Rescale {
        if matches!(
            self,
            Self::DareTies | Self::DareLinear | Self::Della | Self::DellaLinear
        ) {
            Rescale::L1
        } else {
            Rescale::None
        }
    }

    /// Global parameters the method reads.
    pub fn global_params(self) -> &'static [&'static str] {
        match self {
            Self::Linear => &["normalize"],
            Self::Slerp => &["t"],
            Self::ModelStock => &["filter_wise"],
            m if m.sign_consensus() => {
                &["normalize", "rescale", "lambda", "int8_mask", "sign_rule"]
            }
            _ => &["normalize", "rescale", "lambda", "int8_mask"],
        }
    }

    /// Per-model (tensor) parameters the method reads.
    pub fn tensor_params(self) -> &'static [&'static str] {
        match self.pruning() {
            _ if self == Self::Slerp || self == Self::ModelStock => &[],
            Pruning::None => &["weight"],
            Pruning::Magnitude | Pruning::Random => &["weight", "density"],
            Pruning::Breadcrumbs => &["weight", "density", "gamma"],
            Pruning::Della => &["weight", "density", "epsilon"],
        }
    }
}

/// Per-model parameters resolved for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelParams {
    pub weight: f64,
    pub density: f64,
    pub gamma: f64,
    pub epsilon: f64,
}

impl Default for ModelParams {
    fn default() -> Self {
        Self {
            weight: 1.0,
            density: 1.0,
            gamma: 0.01,
            epsilon: 0.15,
        }
    }
}

/// Global parameters resolved for one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GlobalParams {
    pub normalize: bool,
    pub rescale: Rescale,
    pub lambda: f64,
    pub sign_rule: SignRule,
    /// SLERP's interpolation factor (0 = base model).
    pub t: f64,
    pub filter_wise: bool,
}

impl GlobalParams {
    pub fn defaults(method: MergeMethod) -> Self {
        Self {
            normalize: method.default_normalize(),
            rescale: method.default_rescale(),
            lambda: 1.0,
            sign_rule: SignRule::Sum,
            t: 0.5,
            filter_wise: false,
        }
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
}

fn sparsifier(p: Pruning, m: &ModelParams) -> Sparsifier {
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

/// Buffers one merge worker reuses from tensor to tensor: the models' task vectors and the
/// magnitudes TIES selects its top-k from.
#[derive(Debug, Default)]
pub struct MergeScratch {
    deltas: Vec<Vec<f32>>,
    mags: Vec<f32>,
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
    if out.len() != n {
        bail!(
            "tensor `{}`: output buffer of {} entries for inputs of {n}",
            input.name,
            out.len()
        );
    }
    match method {
        MergeMethod::Linear => linear(input, global.normalize, out),
        MergeMethod::Slerp => {
            let base = input
                .base
                .ok_or_else(|| anyhow::anyhow!("slerp needs a base_model"))?;
            if input.models.len() != 1 {
                bail!(
                    "slerp merges exactly two models (base_model and one other), got {}",
                    input.models.len() + 1
                );
            }
            out.copy_from_slice(&slerp(global.t, base, input.models[0]));
        }
        MergeMethod::ModelStock => {
            let base = input
                .base
                .ok_or_else(|| anyhow::anyhow!("model_stock needs a base_model"))?;
            if input.models.len() < 2 {
                bail!("model_stock needs a base_model and at least two other models");
            }
            out.copy_from_slice(&model_stock(
                base,
                &input.models,
                if global.filter_wise { input.row_len } else { n },
            ));
        }
        _ => {
            let base = input
                .base
                .ok_or_else(|| anyhow::anyhow!("{} needs a base_model", method.name()))?;
            task_arithmetic(method, global, input, base, &mut rng, out, scratch);
        }
    }
    Ok(())
}

/// The task-vector family: each model's δ = θᵢ − θ₀ pruned and weighted, then combined (over
/// the agreeing signs, for the sign-consensus methods) onto θ₀.
fn task_arithmetic(
    method: MergeMethod,
    global: &GlobalParams,
    input: &TensorInputs,
    base: &[f32],
    rng: &mut impl FnMut(usize) -> StdRng,
    out: &mut [f32],
    scratch: &mut MergeScratch,
) {
    let pruning = method.pruning();
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
        sparsify_with(
            delta,
            input.row_len,
            sparsifier(pruning, p),
            global.rescale,
            &mut rng(i),
            &mut scratch.mags,
        );
        let w = p.weight as f32;
        delta.iter_mut().for_each(|x| *x *= w);
    }
    let weighted = &scratch.deltas;
    let weights: Vec<f32> = input.params.iter().map(|p| p.weight as f32).collect();
    let lambda = global.lambda as f32;
    out.copy_from_slice(base);
    if method.sign_consensus() {
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
    fn unknown_method_lists_known() {
        let e = MergeMethod::parse("dare-ties").unwrap_err().to_string();
        assert!(e.contains("dare_ties") && e.contains("model_stock"));
    }
}
