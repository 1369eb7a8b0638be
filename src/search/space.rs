//! Search spaces: which merge hyperparameters a search varies, within what bounds, what it
//! optimises and on how many documents. Read from TOML (`search-spaces/*.toml`, documented in
//! `search-spaces/README.md`); every value is checked before anything is loaded.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::scorer::{Objective, ObjectiveMetric};
use super::solver::SolverKind;
use crate::eval::alignment_tax::{AlignmentTaxSpec, TaxMetric};
use crate::eval::fewshot::FewshotMode;
use crate::eval::Gsm8kScoring;
use crate::eval::{Benchmark, PoolSplit};
use crate::merge::config::{ModelEntry, Params};
use crate::merge::spec::{Domain, ParamDefault, ParamSpec};
use crate::merge::{MergeConfig, MergeMethod, ModelRef, ParamValue};

/// The two task vectors PAFT merges, as parameter prefixes (`sft.weight`, `pref.density`).
pub const MODELS: [&str; 2] = ["sft", "pref"];

/// Methods that merge the two task vectors onto the base (their records say `searchable`).
fn searchable() -> impl Iterator<Item = MergeMethod> {
    MergeMethod::all().filter(|m| m.searchable())
}

/// The record of a numeric parameter some searchable method reads: per model for `sft.X` /
/// `pref.X`, global otherwise.
fn numeric_param(name: &str) -> Option<&'static ParamSpec> {
    let found = match name.split_once('.') {
        Some((model, p)) if MODELS.contains(&model) => searchable().find_map(|m| m.model_param(p)),
        Some(_) => None,
        None => searchable().find_map(|m| m.global_param(name)),
    };
    found.filter(|p| p.domain.is_numeric())
}

/// Categorical parameters (flags and choices with an effect) of the searchable methods, with
/// their values as `[choices]` spells them.
fn choice_params() -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut out = BTreeMap::new();
    for p in searchable().flat_map(|m| m.spec().global) {
        let values: Vec<&str> = match p.domain {
            Domain::Flag => vec!["true", "false"],
            // A choice whose default is a flag (`rescale`) takes flags too.
            Domain::Choice(c) if matches!(p.default, ParamDefault::Bool(_)) => {
                ["true", "false"].iter().chain(c).copied().collect()
            }
            Domain::Choice(c) => c.to_vec(),
            _ => continue,
        };
        out.entry(p.name).or_insert(values);
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
pub struct Range {
    pub low: f64,
    pub high: f64,
    pub log: bool,
}

impl Range {
    /// Unit-box coordinate → parameter value.
    pub fn value(&self, u: f64) -> f64 {
        let u = u.clamp(0.0, 1.0);
        if self.log {
            (self.low.ln() + u * (self.high.ln() - self.low.ln())).exp()
        } else {
            self.low + u * (self.high - self.low)
        }
    }

    /// Parameter value → unit-box coordinate.
    pub fn unit(&self, v: f64) -> f64 {
        let u = if self.log {
            (v.ln() - self.low.ln()) / (self.high.ln() - self.low.ln())
        } else {
            (v - self.low) / (self.high - self.low)
        };
        u.clamp(0.0, 1.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Fixed(f64),
    Searched(Range),
}

/// Documents and promotion rules of successive halving.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Solver evaluations on the screening subset.
    pub evaluations: usize,
    pub tasks: String,
    /// Documents per task of the screening subset.
    pub docs: usize,
    /// Larger subsets the best candidates are re-scored on, in order.
    pub rungs: Vec<usize>,
    /// Fraction of a rung's candidates promoted to the next (at least one).
    pub promote: f64,
    /// Candidates scored on the full task sets at the end.
    pub finalists: usize,
    /// Seed of the stratified subsets (the same documents for every candidate).
    pub subset_seed: u64,
    /// Few-shot mode of every evaluation the search makes.
    pub fewshot: FewshotMode,
    /// How GSM8K is scored in every evaluation the search makes.
    pub gsm8k: Gsm8kScoring,
    /// The dtype every candidate is evaluated in (merging itself accumulates in f32).
    pub dtype: candle_core::DType,
}

#[derive(Debug, Clone)]
pub struct SearchSpace {
    pub name: String,
    pub methods: Vec<MergeMethod>,
    /// Numeric parameters by name (`sft.weight`, `lambda`, …), fixed or searched.
    pub params: BTreeMap<String, Param>,
    /// Categorical parameters other than the method (`sign_rule`).
    pub choices: BTreeMap<String, Vec<String>>,
    pub initial: BTreeMap<String, f64>,
    /// What the search maximises (weights per benchmark, accuracy or probability).
    pub objective: Objective,
    /// The search / report split of every task: the search scores only its search pool.
    pub pools: PoolSplit,
    /// Held-out training rows for the objective's alignment-tax terms (`[alignment_tax]`; `paft
    /// run` uses the experiment's when the space has none).
    pub alignment_tax: Option<AlignmentTaxSpec>,
    pub solver: SolverKind,
    pub seed: u64,
    pub grid_points: usize,
    pub budget: Budget,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpace {
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    search: RawSearch,
    params: BTreeMap<String, RawParam>,
    #[serde(default)]
    choices: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    initial: BTreeMap<String, f64>,
    #[serde(default)]
    objective: BTreeMap<String, toml::Value>,
    subset: RawSubset,
    #[serde(default)]
    pools: PoolSplit,
    #[serde(default)]
    alignment_tax: Option<AlignmentTaxSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSearch {
    methods: Vec<String>,
    #[serde(default = "default_solver")]
    solver: String,
    evaluations: usize,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_grid_points")]
    grid_points: usize,
}

fn default_solver() -> String {
    "nelder_mead".into()
}
fn default_grid_points() -> usize {
    5
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawParam {
    Fixed(f64),
    Range {
        low: f64,
        high: f64,
        #[serde(default)]
        log: bool,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubset {
    #[serde(default = "default_tasks")]
    tasks: String,
    docs: usize,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    rungs: Vec<usize>,
    #[serde(default = "default_promote")]
    promote: f64,
    #[serde(default = "default_finalists")]
    finalists: usize,
    /// `per_document` (lm-eval's shots) or `shared` (one set per task: faster screening).
    #[serde(default)]
    fewshot: FewshotMode,
    /// `generate` (lm-eval's exact match) or `gold_likelihood` (the gold solution's
    /// probability per byte: no generation, a cheaper and smooth screening).
    #[serde(default)]
    gsm8k: Gsm8kScoring,
    /// `f32` (default), `bf16` or `f16`: the dtype candidates are evaluated in.
    #[serde(default = "default_dtype")]
    dtype: String,
}

fn default_dtype() -> String {
    "f32".into()
}

/// `[objective]`: `metric = "probability" | "accuracy"` (default probability: smooth in the
/// merge weights, so neighbouring candidates do not tie), a weight per benchmark (default: all
/// six equally) and optional alignment-tax terms (`sft_loss`, `pref_accuracy`, `reward_margin`,
/// measured on held-out training rows; see [`Objective`]).
fn parse_objective(raw: &BTreeMap<String, toml::Value>) -> Result<Objective> {
    let metric = match raw.get("metric") {
        None => ObjectiveMetric::Probability,
        Some(toml::Value::String(m)) if m == "probability" => ObjectiveMetric::Probability,
        Some(toml::Value::String(m)) if m == "accuracy" => ObjectiveMetric::Accuracy,
        Some(other) => {
            bail!("objective: `metric` must be \"probability\" or \"accuracy\", got {other}")
        }
    };
    let mut weights = BTreeMap::new();
    let mut tax = BTreeMap::new();
    for (k, v) in raw.iter().filter(|(k, _)| k.as_str() != "metric") {
        let w = match v {
            toml::Value::Float(f) => *f,
            toml::Value::Integer(i) => *i as f64,
            other => bail!("objective weight of `{k}` must be a number, got {other}"),
        };
        if !w.is_finite() || w < 0.0 {
            bail!("objective weight of `{k}` must be a finite number ≥ 0, got {w}");
        }
        if let Some(b) = Benchmark::ALL.into_iter().find(|b| b.task_name() == k) {
            weights.insert(b, w);
        } else if let Some(m) = TaxMetric::parse(k) {
            tax.insert(m, w);
        } else {
            bail!(
                "objective: unknown term `{k}` (known: metric, {}, {})",
                Benchmark::ALL.map(|b| b.task_name()).join(", "),
                TaxMetric::ALL.map(|m| m.name()).join(", ")
            );
        }
    }
    if weights.is_empty() {
        weights = Benchmark::ALL.iter().map(|&b| (b, 1.0)).collect();
    }
    if weights.values().sum::<f64>() <= 0.0 && tax.values().sum::<f64>() <= 0.0 {
        bail!("objective: the weights sum to zero");
    }
    Ok(Objective {
        weights,
        metric,
        tax,
    })
}

/// With `normalize` on (mergekit's default for linear, TIES and DELLA), the merge divides by the
/// sum of the weights, so scaling both weights together changes nothing: a space that searches
/// both weights explores their ratio only, and candidates along a ray tie exactly. Said once, at
/// load, so a flat trajectory is not mistaken for a flat objective.
fn warn_if_only_the_ratio_counts(
    methods: &[MergeMethod],
    params: &BTreeMap<String, Param>,
    choices: &BTreeMap<String, Vec<String>>,
) {
    let searched_weights = MODELS
        .iter()
        .filter(|m| matches!(params.get(&format!("{m}.weight")), Some(Param::Searched(_))))
        .count();
    let normalize_off = choices
        .get("normalize")
        .is_some_and(|v| v.iter().all(|x| x == "false"));
    let normalizing: Vec<&str> = methods
        .iter()
        .filter(|m| m.default_flag("normalize") == Some(true))
        .map(|m| m.name())
        .collect();
    if searched_weights == 2 && !normalize_off && !normalizing.is_empty() {
        tracing::warn!(
            "{} normalize the weights by their sum (mergekit's default): searching both weights \
             explores only their ratio; add `[choices] normalize = [\"false\"]` to search their \
             magnitude too, or search `lambda`",
            normalizing.join(", ")
        );
    }
}

fn default_tasks() -> String {
    "leaderboard".into()
}
fn default_promote() -> f64 {
    1.0 / 3.0
}
fn default_finalists() -> usize {
    1
}

fn check_param_name(name: &str) -> Result<()> {
    if numeric_param(name).is_none() {
        let mut per_model: Vec<&str> = vec![];
        let mut global: Vec<&str> = vec![];
        for m in searchable() {
            let numeric = |p: &&ParamSpec| p.domain.is_numeric();
            per_model.extend(m.spec().per_model.iter().filter(numeric).map(|p| p.name));
            global.extend(m.spec().global.iter().filter(numeric).map(|p| p.name));
        }
        for v in [&mut per_model, &mut global] {
            v.sort();
            v.dedup();
        }
        bail!(
            "unknown parameter `{name}` (known: {}.{{{}}}, {})",
            MODELS.join("|"),
            per_model.join(","),
            global.join(", ")
        );
    }
    Ok(())
}

/// The interval a parameter may take (what mergekit accepts).
fn allowed(name: &str) -> (f64, f64) {
    numeric_param(name).map_or((f64::NEG_INFINITY, f64::INFINITY), |p| p.domain.interval())
}

impl SearchSpace {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read search space {}", path.display()))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("search");
        Self::from_toml(&text, stem)
            .with_context(|| format!("invalid search space {}", path.display()))
    }

    pub fn from_toml(text: &str, default_name: &str) -> Result<Self> {
        let raw: RawSpace = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let _ = raw.description;
        if raw.search.methods.is_empty() {
            bail!("[search] methods is empty");
        }
        let methods = raw
            .search
            .methods
            .iter()
            .map(|m| {
                let method = MergeMethod::parse(m)?;
                if !method.searchable() {
                    bail!(
                        "method `{m}` cannot merge two task vectors (searchable: {})",
                        searchable()
                            .map(|m| m.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                Ok(method)
            })
            .collect::<Result<Vec<_>>>()?;
        let solver: SolverKind = raw.search.solver.parse()?;
        if raw.search.evaluations == 0 {
            bail!("[search] evaluations must be at least 1");
        }
        let mut params = BTreeMap::new();
        for (name, p) in raw.params {
            check_param_name(&name)?;
            let (lo, hi) = allowed(&name);
            let param = match p {
                RawParam::Fixed(v) => {
                    if !v.is_finite() || v < lo || v > hi {
                        bail!("parameter `{name}` = {v} is not a finite value in [{lo}, {hi}]");
                    }
                    Param::Fixed(v)
                }
                RawParam::Range { low, high, log } => {
                    if !low.is_finite() || !high.is_finite() {
                        bail!("parameter `{name}`: bounds must be finite, got [{low}, {high}]");
                    }
                    if low >= high {
                        bail!("parameter `{name}`: empty range [{low}, {high}] (low must be below high)");
                    }
                    if low < lo || high > hi {
                        bail!("parameter `{name}`: range [{low}, {high}] leaves [{lo}, {hi}]");
                    }
                    if log && low <= 0.0 {
                        bail!("parameter `{name}`: a log-scale range needs low > 0, got {low}");
                    }
                    Param::Searched(Range { low, high, log })
                }
            };
            params.insert(name, param);
        }
        if !params.values().any(|p| matches!(p, Param::Searched(_))) && methods.len() == 1 {
            tracing::warn!("the space searches nothing: every parameter is fixed");
        }
        let choices = choice_params();
        for (name, values) in &raw.choices {
            let Some(known) = choices.get(name.as_str()) else {
                bail!(
                    "unknown choice `{name}` (known: {})",
                    choices.keys().copied().collect::<Vec<_>>().join(", ")
                );
            };
            if values.is_empty() {
                bail!("choice `{name}` has no values");
            }
            if let Some(v) = values.iter().find(|v| !known.contains(&v.as_str())) {
                bail!(
                    "choice `{name}`: unknown value `{v}` (known: {})",
                    known.join(", ")
                );
            }
        }
        for (name, v) in &raw.initial {
            match params.get(name) {
                Some(Param::Searched(r)) if v.is_finite() && *v >= r.low && *v <= r.high => {}
                Some(Param::Searched(r)) => {
                    bail!("initial `{name}` = {v} is outside [{}, {}]", r.low, r.high)
                }
                _ => bail!("initial `{name}`: not a searched parameter"),
            }
        }
        warn_if_only_the_ratio_counts(&methods, &params, &raw.choices);
        let objective = parse_objective(&raw.objective)?;
        if let Some(spec) = &raw.alignment_tax {
            spec.validate().context("[alignment_tax]")?;
        }
        raw.pools.validate().context("[pools]")?;
        let s = raw.subset;
        crate::eval::parse_task_list(&s.tasks).context("[subset] tasks")?;
        if s.docs == 0 {
            bail!("[subset] docs must be at least 1");
        }
        if s.rungs.windows(2).any(|w| w[0] >= w[1]) || s.rungs.first().is_some_and(|&r| r <= s.docs)
        {
            bail!(
                "[subset] rungs must grow beyond docs = {}: got {:?}",
                s.docs,
                s.rungs
            );
        }
        if !(s.promote > 0.0 && s.promote <= 1.0) {
            bail!("[subset] promote must be in (0, 1], got {}", s.promote);
        }
        let dtype = crate::model::parse_dtype(&s.dtype).context("[subset] dtype")?;
        Ok(Self {
            name: raw.name.unwrap_or_else(|| default_name.to_string()),
            methods,
            params,
            choices: raw.choices,
            initial: raw.initial,
            objective,
            pools: raw.pools,
            alignment_tax: raw.alignment_tax,
            solver,
            seed: raw.search.seed,
            grid_points: raw.search.grid_points.max(1),
            budget: Budget {
                evaluations: raw.search.evaluations,
                tasks: s.tasks,
                docs: s.docs,
                rungs: s.rungs,
                promote: s.promote,
                finalists: s.finalists,
                subset_seed: s.seed,
                fewshot: s.fewshot,
                gsm8k: s.gsm8k,
                dtype,
            },
        })
    }

    /// Names of the searched parameters, in the order of the solver's coordinates.
    pub fn searched(&self) -> Vec<(&str, &Range)> {
        self.params
            .iter()
            .filter_map(|(n, p)| match p {
                Param::Searched(r) => Some((n.as_str(), r)),
                Param::Fixed(_) => None,
            })
            .collect()
    }

    /// Categorical dimensions in the solver's order: the method first (when more than one),
    /// then the other choices.
    pub fn categorical(&self) -> Vec<(String, Vec<String>)> {
        let mut dims = vec![];
        if self.methods.len() > 1 {
            dims.push((
                "method".to_string(),
                self.methods.iter().map(|m| m.name().to_string()).collect(),
            ));
        }
        for (n, v) in &self.choices {
            dims.push((n.clone(), v.clone()));
        }
        dims
    }

    /// The starting point in the unit box (centre where no initial value is given).
    pub fn initial_unit(&self) -> Vec<f64> {
        self.searched()
            .iter()
            .map(|(n, r)| self.initial.get(*n).map_or(0.5, |&v| r.unit(v)))
            .collect()
    }

    /// The concrete candidate at unit-box point `x` with categorical `picks`.
    pub fn candidate(&self, picks: &[usize], x: &[f64]) -> MergeCandidate {
        let cats = self.categorical();
        let mut choices = BTreeMap::new();
        let mut method = self.methods[0];
        for ((name, values), &i) in cats.iter().zip(picks) {
            if name == "method" {
                method = self.methods[i];
            } else {
                choices.insert(name.clone(), values[i].clone());
            }
        }
        let mut coords = x.iter();
        let mut params = BTreeMap::new();
        for (name, p) in &self.params {
            let v = match p {
                Param::Fixed(v) => *v,
                Param::Searched(r) => r.value(*coords.next().unwrap_or(&0.5)),
            };
            params.insert(name.clone(), v);
        }
        MergeCandidate::new(method, params, choices)
    }
}

/// One point of the space, with only the parameters its method reads, rounded so that equal
/// keys mean equal merges.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeCandidate {
    pub method: MergeMethod,
    pub params: BTreeMap<String, f64>,
    pub choices: BTreeMap<String, String>,
}

fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}

impl MergeCandidate {
    pub fn new(
        method: MergeMethod,
        params: BTreeMap<String, f64>,
        choices: BTreeMap<String, String>,
    ) -> Self {
        let reads = |name: &str| match name.split_once('.') {
            Some((_, p)) => method.tensor_params().contains(&p),
            None => method.global_params().contains(&name),
        };
        Self {
            method,
            params: params
                .into_iter()
                .filter(|(n, _)| reads(n))
                .map(|(n, v)| (n, round6(v)))
                .collect(),
            choices: choices
                .into_iter()
                .filter(|(n, _)| method.global_params().contains(&n.as_str()))
                .collect(),
        }
    }

    /// The cache key: method, parameters and choices in canonical order.
    pub fn key(&self) -> String {
        let mut parts = vec![self.method.name().to_string()];
        parts.extend(self.params.iter().map(|(n, v)| format!("{n}={v}")));
        parts.extend(self.choices.iter().map(|(n, v)| format!("{n}={v}")));
        parts.join("|")
    }

    /// The merge as a mergekit YAML over the given model references.
    /// The candidate as the merger's typed config (the mergekit YAML is only its record).
    pub fn merge_config(&self, base: &str, models: [&str; 2]) -> Result<MergeConfig> {
        let mut entries = vec![];
        for (prefix, model) in MODELS.iter().zip(models) {
            let parameters: Params = self
                .params
                .iter()
                .filter_map(|(n, v)| {
                    let p = n.strip_prefix(prefix)?.strip_prefix('.')?;
                    Some((p.to_string(), ParamValue::Number(*v)))
                })
                .collect();
            entries.push(ModelEntry {
                model: ModelRef::parse(model),
                parameters,
            });
        }
        let parameters: Params = self
            .params
            .iter()
            .filter(|(n, _)| !n.contains('.'))
            .map(|(n, v)| (n.clone(), ParamValue::Number(*v)))
            .chain(self.choices.iter().map(|(n, v)| {
                // Flags are YAML booleans (`normalize: false`), other choices strings.
                let value = match v.as_str() {
                    "true" | "false" => ParamValue::Bool(v == "true"),
                    _ => ParamValue::Text(v.clone()),
                };
                (n.clone(), value)
            }))
            .collect();
        let config = MergeConfig {
            method: self.method,
            base_model: self.method.uses_base().then(|| ModelRef::parse(base)),
            models: entries,
            parameters,
            dtype: Some("float32".into()),
            out_dtype: None,
            tokenizer_source: None,
            pad_to_multiple_of: None,
            chat_template: None,
            source: self.mergekit_yaml(base, models),
            ignored: vec![],
            slices: vec![],
        };
        config
            .validate()
            .with_context(|| format!("candidate {}", self.key()))?;
        Ok(config)
    }

    pub fn mergekit_yaml(&self, base: &str, models: [&str; 2]) -> String {
        let mut y = format!("merge_method: {}\n", self.method.name());
        if self.method.uses_base() {
            y += &format!("base_model: {}\n", yaml_str(base));
        }
        y += "models:\n";
        for (prefix, model) in MODELS.iter().zip(models) {
            y += &format!("  - model: {}\n", yaml_str(model));
            let ps: Vec<String> = self
                .params
                .iter()
                .filter_map(|(n, v)| {
                    n.strip_prefix(prefix)
                        .and_then(|p| p.strip_prefix('.'))
                        .map(|p| format!("{p}: {v}"))
                })
                .collect();
            if !ps.is_empty() {
                y += &format!("    parameters: {{{}}}\n", ps.join(", "));
            }
        }
        let globals: Vec<String> = self
            .params
            .iter()
            .filter(|(n, _)| !n.contains('.'))
            .map(|(n, v)| format!("{n}: {v}"))
            .chain(self.choices.iter().map(|(n, v)| format!("{n}: {v}")))
            .collect();
        if !globals.is_empty() {
            y += &format!("parameters: {{{}}}\n", globals.join(", "));
        }
        y += "dtype: float32\n";
        y
    }
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPACE: &str = r#"
        [search]
        methods = ["ties", "dare_ties"]
        evaluations = 12
        [params]
        "sft.weight" = { low = 0.0, high = 2.0 }
        "pref.weight" = { low = 0.0, high = 2.0 }
        "sft.density" = 0.5
        "pref.density" = 0.5
        lambda = { low = 0.5, high = 2.0, log = true }
        [initial]
        "sft.weight" = 1.0
        [subset]
        docs = 10
        rungs = [20, 40]
    "#;

    #[test]
    fn a_space_maps_unit_points_to_mergekit_configs() {
        let s = SearchSpace::from_toml(SPACE, "t").unwrap();
        assert_eq!(s.categorical()[0].1, vec!["ties", "dare_ties"]);
        assert_eq!(
            s.searched().iter().map(|p| p.0).collect::<Vec<_>>(),
            vec!["lambda", "pref.weight", "sft.weight"]
        );
        assert_eq!(s.initial_unit(), vec![0.5, 0.5, 0.5]);
        let c = s.candidate(&[1], &[0.0, 0.25, 1.0]);
        assert_eq!(c.method, MergeMethod::DareTies);
        assert_eq!(c.params["lambda"], 0.5);
        assert_eq!(c.params["pref.weight"], 0.5);
        assert_eq!(c.params["sft.weight"], 2.0);
        let mid = s.candidate(&[0], &[0.5, 0.5, 0.5]);
        assert!((mid.params["lambda"] - 1.0).abs() < 1e-6, "log scale");
        let yaml = c.mergekit_yaml("base", ["sft", "pref"]);
        let cfg = crate::merge::MergeConfig::from_yaml(&yaml).unwrap();
        assert_eq!(cfg.method, MergeMethod::DareTies);
        assert_eq!(cfg.models.len(), 2);
        // The typed config the merger gets is the one its YAML record parses to.
        let typed = c.merge_config("base", ["sft", "pref"]).unwrap();
        assert_eq!(format!("{typed:?}"), format!("{cfg:?}"));
        // Linear reads no densities or lambda: they leave the key.
        let lin = MergeCandidate::new(MergeMethod::Linear, c.params.clone(), BTreeMap::new());
        assert_eq!(lin.key(), "linear|pref.weight=0.5|sft.weight=2");
        crate::merge::MergeConfig::from_yaml(&lin.mergekit_yaml("b", ["s", "p"])).unwrap();
    }

    #[test]
    fn bad_spaces_give_clear_errors() {
        let bad = |from: &str, to: &str| {
            let text = SPACE.replace(from, to);
            assert_ne!(text, SPACE, "{from}");
            format!("{:#}", SearchSpace::from_toml(&text, "t").unwrap_err())
        };
        assert!(
            bad("\"dare_ties\"", "\"frobnicate\"").contains("unknown merge_method `frobnicate`")
        );
        assert!(bad("\"dare_ties\"", "\"slerp\"").contains("cannot merge two task vectors"));
        assert!(bad(
            "low = 0.0, high = 2.0 }\n        \"pref",
            "low = 1.0, high = 1.0 }\n        \"pref"
        )
        .contains("empty range"));
        assert!(bad("\"sft.density\" = 0.5", "\"sft.density\" = nan").contains("sft.density"));
        assert!(bad("\"sft.density\" = 0.5", "\"sft.density\" = 1.5").contains("sft.density"));
        assert!(bad("lambda =", "lamda =").contains("unknown parameter `lamda`"));
        assert!(
            bad("low = 0.5, high = 2.0, log", "low = 0.0, high = 2.0, log").contains("log-scale")
        );
        assert!(bad("rungs = [20, 40]", "rungs = [5]").contains("rungs"));
        assert!(bad("\"sft.weight\" = 1.0", "\"sft.weight\" = 9.0").contains("outside"));
        let with = |extra: &str| {
            format!(
                "{:#}",
                SearchSpace::from_toml(&format!("{SPACE}\n{extra}"), "t").unwrap_err()
            )
        };
        let m = with("[pools]\nsearch = 0.7\nreport = 0.5");
        assert!(m.contains("pools overlap"), "{m}");
        let m = with("[objective]\nheldout_loss = 1.0");
        assert!(m.contains("unknown term `heldout_loss`"), "{m}");
        let m = with("[objective]\nmetric = \"f1\"");
        assert!(m.contains("`metric`"), "{m}");
    }

    #[test]
    fn the_objective_defaults_to_the_smooth_metric_and_the_half_split() {
        let s = SearchSpace::from_toml(SPACE, "t").unwrap();
        assert_eq!(s.objective.metric, ObjectiveMetric::Probability);
        assert_eq!(s.pools, PoolSplit::default());
        assert_eq!(s.budget.fewshot, FewshotMode::PerDocument);
        let shared = SearchSpace::from_toml(
            &SPACE.replace("[subset]", "[subset]\nfewshot = \"shared\""),
            "t",
        )
        .unwrap();
        assert_eq!(shared.budget.fewshot, FewshotMode::Shared);
        assert_eq!(s.budget.gsm8k, Gsm8kScoring::Generate);
        let gold = SearchSpace::from_toml(
            &SPACE.replace("[subset]", "[subset]\ngsm8k = \"gold_likelihood\""),
            "t",
        )
        .unwrap();
        assert_eq!(gold.budget.gsm8k, Gsm8kScoring::GoldLikelihood);
        let bad = SearchSpace::from_toml(
            &SPACE.replace("[subset]", "[subset]\ngsm8k = \"sampled\""),
            "t",
        );
        assert!(format!("{:#}", bad.unwrap_err()).contains("sampled"));
        let bad = SearchSpace::from_toml(
            &SPACE.replace("[subset]", "[subset]\nfewshot = \"few\""),
            "t",
        );
        assert!(format!("{:#}", bad.unwrap_err()).contains("few"));
        let acc = SearchSpace::from_toml(
            &format!("{SPACE}\n[objective]\nmetric = \"accuracy\"\narc_challenge = 2"),
            "t",
        )
        .unwrap();
        assert_eq!(acc.objective.metric, ObjectiveMetric::Accuracy);
        assert_eq!(acc.objective.weights.len(), 1);
        assert!(acc.objective.tax.is_empty() && acc.alignment_tax.is_none());
    }

    #[test]
    fn normalize_is_a_choice_that_reaches_the_merge_as_a_bool() {
        let params = BTreeMap::from([
            ("sft.weight".to_string(), 2.0),
            ("pref.weight".to_string(), 2.0),
            ("sft.density".to_string(), 0.5),
            ("pref.density".to_string(), 0.5),
        ]);
        let off = MergeCandidate::new(
            MergeMethod::Ties,
            params.clone(),
            BTreeMap::from([("normalize".to_string(), "false".to_string())]),
        );
        let config = off.merge_config("b", ["s", "p"]).unwrap();
        assert!(!config.global_params("x", None, 1).unwrap().normalize);
        assert!(off
            .mergekit_yaml("b", ["s", "p"])
            .contains("normalize: false"));
        let default = MergeCandidate::new(MergeMethod::Ties, params, BTreeMap::new());
        let config = default.merge_config("b", ["s", "p"]).unwrap();
        assert!(config.global_params("x", None, 1).unwrap().normalize);
        assert_ne!(off.key(), default.key());
        let space = SearchSpace::from_toml(
            &format!("{SPACE}\n[choices]\nnormalize = [\"false\", \"true\"]\n"),
            "t",
        )
        .unwrap();
        assert_eq!(space.choices["normalize"], ["false", "true"]);
        let err =
            SearchSpace::from_toml(&format!("{SPACE}\n[choices]\nnormalize = [\"no\"]\n"), "t")
                .unwrap_err();
        assert!(format!("{err:#}").contains("unknown value `no`"), "{err:#}");
    }

    #[test]
    fn the_space_reads_the_method_records() {
        let text = SPACE
            .replace(
                "[\"ties\", \"dare_ties\"]",
                "[\"ties\", \"sce\", \"nuslerp\", \"ramplus_tl\"]",
            )
            .replace(
                "[initial]",
                "select_topk = { low = 0.1, high = 0.9 }\nr = 0.2\n[initial]",
            );
        let s = SearchSpace::from_toml(&text, "t").unwrap();
        assert_eq!(
            s.categorical()[0].1,
            ["ties", "sce", "nuslerp", "ramplus_tl"]
        );
        // Each candidate keeps only what its method reads, and its YAML parses back unchanged.
        for (pick, method, keys) in [
            (1, MergeMethod::Sce, vec!["select_topk"]),
            (2, MergeMethod::Nuslerp, vec!["pref.weight", "sft.weight"]),
            (3, MergeMethod::RamplusTl, vec!["r"]),
        ] {
            let c = s.candidate(&[pick], &[0.5, 0.5, 0.5, 0.5]);
            assert_eq!(c.method, method);
            assert_eq!(
                c.params.keys().map(String::as_str).collect::<Vec<_>>(),
                keys
            );
            let yaml = c.mergekit_yaml("base", ["sft", "pref"]);
            let parsed = MergeConfig::from_yaml_quiet(&yaml).unwrap();
            assert!(parsed.ignored.is_empty(), "{yaml}");
            let typed = c.merge_config("base", ["sft", "pref"]).unwrap();
            assert_eq!(format!("{typed:?}"), format!("{parsed:?}"));
        }
        // Ranges come from the records' domains.
        let e = SearchSpace::from_toml(&text.replace("high = 0.9", "high = 1.5"), "t").unwrap_err();
        assert!(format!("{e:#}").contains("select_topk"), "{e:#}");
        let e = SearchSpace::from_toml(&SPACE.replace("\"dare_ties\"", "\"karcher\""), "t")
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot merge two task vectors"),
            "{e:#}"
        );
    }

    #[test]
    fn alignment_tax_terms_and_their_rows_are_read() {
        let s = SearchSpace::from_toml(
            &format!(
                "{SPACE}\n[objective]\nsft_loss = 10\nreward_margin = 2.5\n\n[alignment_tax]\n\
                 sft_dataset = \"sft.jsonl\"\npref_dataset = \"pref.jsonl\"\nsft_rows = 50\n\
                 pref_rows = 40\nmax_length = 256\ntruncation = \"keep_end\"\n"
            ),
            "t",
        )
        .unwrap();
        assert_eq!(
            s.objective.tax,
            BTreeMap::from([(TaxMetric::SftLoss, 10.0), (TaxMetric::RewardMargin, 2.5)])
        );
        // Benchmarks keep their default weights beside the tax terms.
        assert_eq!(s.objective.weights.len(), 6);
        assert_eq!(s.alignment_tax.unwrap().pref_rows, 40);
        let err = |extra: &str| {
            format!(
                "{:#}",
                SearchSpace::from_toml(&format!("{SPACE}\n{extra}"), "t").unwrap_err()
            )
        };
        let m = err("[objective]\nsft_loss = -1");
        assert!(m.contains("sft_loss") && m.contains("≥ 0"), "{m}");
        let m = err(
            "[alignment_tax]\nsft_dataset = \"a\"\npref_dataset = \"b\"\nsft_rows = 0\n\
                     pref_rows = 1\nmax_length = 8\ntruncation = \"error\"",
        );
        assert!(m.contains("sft_rows"), "{m}");
    }
}
