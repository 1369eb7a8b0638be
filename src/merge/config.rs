//! mergekit YAML as mergekit users write it: `merge_method`, `base_model`, `models` with per-model
//! `parameters`, global `parameters`, `dtype`, `out_dtype`, `tokenizer_source`. Parameter values
//! may be scalars, layer gradients (lists interpolated over the layer stack) or filtered lists
//! (`[{filter: self_attn, value: …}, {value: …}]`, first substring match wins).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::methods::{GlobalParams, MergeMethod, ModelParams};
use super::sparsify::Rescale;
use super::SignRule;

/// `path_or_hub_id[@revision][+lora_path]`, or the `{model:, lora:}` mapping form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub model: String,
    pub revision: Option<String>,
    pub lora: Option<String>,
}

impl ModelRef {
    pub fn parse(spec: &str) -> Self {
        let (model, lora) = match spec.split_once('+') {
            Some((m, l)) => (m, Some(l.to_string())),
            None => (spec, None),
        };
        // `@rev` only for hub ids, not for local paths that may contain `@`.
        let (model, revision) = match model.rsplit_once('@') {
            Some((m, r)) if !Path::new(model).exists() && !r.contains('/') => {
                (m.to_string(), Some(r.to_string()))
            }
            _ => (model.to_string(), None),
        };
        Self {
            model,
            revision,
            lora,
        }
    }

    fn from_yaml(v: &Value) -> Result<Self> {
        match v {
            Value::String(s) => Ok(Self::parse(s)),
            Value::Object(o) => {
                let model = o
                    .get("model")
                    .and_then(Value::as_str)
                    .context("model reference needs `model`")?;
                let mut r = Self::parse(model);
                if let Some(l) = o.get("lora").and_then(Value::as_str) {
                    r.lora = Some(l.to_string());
                }
                Ok(r)
            }
            other => bail!("bad model reference {other}"),
        }
    }
}

impl std::fmt::Display for ModelRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.model)?;
        if let Some(r) = &self.revision {
            write!(f, "@{r}")?;
        }
        if let Some(l) = &self.lora {
            write!(f, "+{l}")?;
        }
        Ok(())
    }
}

/// A parameter's value before it is resolved for a tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Number(f64),
    Bool(bool),
    Text(String),
    /// Interpolated piecewise-linearly over the layers, t = layer/(L−1).
    Gradient(Vec<f64>),
    /// First entry whose filter is a substring of the tensor name (no filter, or `*`, matches all).
    Filtered(Vec<(Option<String>, ParamValue)>),
}

impl ParamValue {
    fn from_yaml(v: &Value) -> Result<Self> {
        Ok(match v {
            Value::Number(n) => Self::Number(n.as_f64().context("bad number")?),
            Value::Bool(b) => Self::Bool(*b),
            Value::String(s) => Self::Text(s.clone()),
            Value::Array(items) if items.iter().all(Value::is_number) => {
                if items.is_empty() {
                    bail!("empty gradient list");
                }
                Self::Gradient(
                    items
                        .iter()
                        .map(|x| x.as_f64().unwrap_or(f64::NAN))
                        .collect(),
                )
            }
            Value::Array(items) => Self::Filtered(
                items
                    .iter()
                    .map(|it| {
                        let o = it
                            .as_object()
                            .context("a filtered list holds {filter, value} entries")?;
                        let value = o.get("value").context("filtered entry without `value`")?;
                        let filter = o
                            .get("filter")
                            .and_then(Value::as_str)
                            .filter(|f| *f != "*")
                            .map(String::from);
                        Ok((filter, Self::from_yaml(value)?))
                    })
                    .collect::<Result<_>>()?,
            ),
            other => bail!("unsupported parameter value {other}"),
        })
    }

    /// The number for `tensor` (in decoder layer `layer` of `num_layers`, if any).
    pub fn number(&self, tensor: &str, layer: Option<usize>, num_layers: usize) -> Result<f64> {
        match self {
            Self::Number(x) => Ok(*x),
            Self::Bool(b) => Ok(if *b { 1.0 } else { 0.0 }),
            Self::Text(s) => bail!("expected a number, got `{s}`"),
            Self::Gradient(g) => {
                let t = match layer {
                    Some(l) if num_layers > 1 => l as f64 / (num_layers - 1) as f64,
                    _ => 0.0,
                };
                if g.len() == 1 {
                    return Ok(g[0]);
                }
                let pos = t * (g.len() - 1) as f64;
                let lo = (pos.floor() as usize).min(g.len() - 2);
                let frac = pos - lo as f64;
                Ok(g[lo] + (g[lo + 1] - g[lo]) * frac)
            }
            Self::Filtered(entries) => {
                for (filter, value) in entries {
                    if filter.as_deref().is_none_or(|f| tensor.contains(f)) {
                        return value.number(tensor, layer, num_layers);
                    }
                }
                bail!("no filter matches tensor `{tensor}`")
            }
        }
    }

    fn values(&self) -> Vec<f64> {
        match self {
            Self::Number(x) => vec![*x],
            Self::Gradient(g) => g.clone(),
            Self::Filtered(e) => e.iter().flat_map(|(_, v)| v.values()).collect(),
            _ => vec![],
        }
    }
}

pub type Params = BTreeMap<String, ParamValue>;

#[derive(Debug, Clone)]
pub struct ModelEntry {
    pub model: ModelRef,
    pub parameters: Params,
}

#[derive(Debug, Clone)]
pub struct MergeConfig {
    pub method: MergeMethod,
    pub base_model: Option<ModelRef>,
    /// Models other than the base, in YAML order.
    pub models: Vec<ModelEntry>,
    pub parameters: Params,
    pub dtype: Option<String>,
    pub out_dtype: Option<String>,
    pub tokenizer_source: Option<String>,
    /// The YAML as given, copied into the output as `mergekit_config.yml`.
    pub source: String,
}

const TOP_LEVEL: [&str; 9] = [
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "chat_template",
    "name",
];
const IGNORED_GLOBALS: [&str; 1] = ["int8_mask"];

fn params(v: Option<&Value>, what: &str) -> Result<Params> {
    match v {
        None | Some(Value::Null) => Ok(Params::new()),
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    ParamValue::from_yaml(v).with_context(|| format!("{what}: `{k}`"))?,
                ))
            })
            .collect(),
        Some(other) => bail!("{what}: `parameters` must be a mapping, got {other}"),
    }
}

impl MergeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read merge config {}", path.display()))?;
        Self::from_yaml(&text).with_context(|| format!("invalid merge config {}", path.display()))
    }

    pub fn from_yaml(text: &str) -> Result<Self> {
        let doc: Value =
            serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("not valid YAML: {e}"))?;
        let top = doc
            .as_object()
            .context("the config must be a YAML mapping")?;
        if top.contains_key("slices") || top.contains_key("modules") {
            bail!("`slices`/`modules` (layer-range frankenmerges) are not supported yet; use `models:`");
        }
        if let Some(k) = top.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
            bail!("unknown key `{k}` (known: {})", TOP_LEVEL.join(", "));
        }
        let method_name = top
            .get("merge_method")
            .and_then(Value::as_str)
            .context("missing `merge_method`")?;
        let method = MergeMethod::parse(method_name)?;
        let base_model = top.get("base_model").map(ModelRef::from_yaml).transpose()?;
        let mut models = vec![];
        for (i, entry) in top
            .get("models")
            .and_then(Value::as_array)
            .context("missing `models` list")?
            .iter()
            .enumerate()
        {
            let model = match entry {
                Value::Object(o) if o.contains_key("model") => {
                    ModelRef::from_yaml(o.get("model").unwrap())?
                }
                other => ModelRef::from_yaml(other)?,
            };
            let parameters = params(entry.get("parameters"), &format!("models[{i}] ({model})"))?;
            // The base listed among the models (mergekit allows it) is the base, not a model.
            if Some(&model) == base_model.as_ref() {
                continue;
            }
            models.push(ModelEntry { model, parameters });
        }
        let cfg = Self {
            method,
            base_model,
            models,
            parameters: params(top.get("parameters"), "global")?,
            dtype: top.get("dtype").and_then(Value::as_str).map(String::from),
            out_dtype: top
                .get("out_dtype")
                .and_then(Value::as_str)
                .map(String::from),
            tokenizer_source: top
                .get("tokenizer_source")
                .and_then(Value::as_str)
                .map(String::from),
            source: text.to_string(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Everything that can be checked without opening a model.
    pub(crate) fn validate(&self) -> Result<()> {
        let m = self.method;
        if m.needs_base() && self.base_model.is_none() {
            bail!("{} needs a `base_model`", m.name());
        }
        if self.models.is_empty() {
            bail!("no models to merge besides the base");
        }
        match m {
            MergeMethod::Slerp if self.models.len() != 1 => {
                bail!(
                    "slerp merges the base_model with exactly one other model, got {}",
                    self.models.len()
                )
            }
            MergeMethod::ModelStock if self.models.len() < 2 => {
                bail!("model_stock needs at least two models besides the base")
            }
            _ => {}
        }
        for d in [&self.dtype, &self.out_dtype].into_iter().flatten() {
            let d = d.trim_start_matches("torch.");
            if !["float32", "float16", "bfloat16"].contains(&d) {
                bail!("unsupported dtype `{d}` (float32, float16, bfloat16)");
            }
        }
        if let Some(t) = &self.tokenizer_source {
            if t != "base" {
                bail!("tokenizer_source `{t}` is not supported yet (only `base`)");
            }
        }
        let tensor_params = m.tensor_params();
        let global_ok = |k: &str| m.global_params().contains(&k) || IGNORED_GLOBALS.contains(&k);
        for (k, v) in &self.parameters {
            if !global_ok(k) && !tensor_params.contains(&k.as_str()) {
                bail!(
                    "unknown parameter `{k}` for {} (it takes {})",
                    m.name(),
                    known(m)
                );
            }
            check_range(k, v, "global parameters")?;
        }
        for e in &self.models {
            for (k, v) in &e.parameters {
                if !tensor_params.contains(&k.as_str()) {
                    bail!(
                        "model {}: unknown parameter `{k}` for {} (per-model: {})",
                        e.model,
                        m.name(),
                        tensor_params.join(", ")
                    );
                }
                check_range(k, v, &format!("model {}", e.model))?;
            }
            if tensor_params.contains(&"weight")
                && !e.parameters.contains_key("weight")
                && !self.parameters.contains_key("weight")
            {
                bail!("model {}: {} needs a `weight`", e.model, m.name());
            }
        }
        Ok(())
    }

    /// Resolves per-model parameters for one tensor (model params override global ones).
    pub fn model_params(
        &self,
        tensor: &str,
        layer: Option<usize>,
        num_layers: usize,
    ) -> Result<Vec<ModelParams>> {
        self.models
            .iter()
            .map(|e| {
                let mut p = ModelParams::default();
                for (key, slot) in [
                    ("weight", &mut p.weight),
                    ("density", &mut p.density),
                    ("gamma", &mut p.gamma),
                    ("epsilon", &mut p.epsilon),
                ] {
                    if let Some(v) = e.parameters.get(key).or_else(|| self.parameters.get(key)) {
                        *slot = v
                            .number(tensor, layer, num_layers)
                            .with_context(|| format!("model {}: `{key}`", e.model))?;
                    }
                }
                Ok(p)
            })
            .collect()
    }

    pub fn global_params(
        &self,
        tensor: &str,
        layer: Option<usize>,
        num_layers: usize,
    ) -> Result<GlobalParams> {
        let mut g = GlobalParams::defaults(self.method);
        let num = |k: &str| {
            self.parameters
                .get(k)
                .map(|v| v.number(tensor, layer, num_layers))
                .transpose()
        };
        if let Some(x) = num("normalize")? {
            g.normalize = x != 0.0;
        }
        if let Some(x) = num("lambda")? {
            g.lambda = x;
        }
        if let Some(x) = num("t")? {
            g.t = x;
        }
        if let Some(x) = num("filter_wise")? {
            g.filter_wise = x != 0.0;
        }
        match self.parameters.get("rescale") {
            None => {}
            Some(ParamValue::Bool(true)) => g.rescale = Rescale::L1,
            Some(ParamValue::Bool(false)) => g.rescale = Rescale::None,
            Some(ParamValue::Text(s)) if s == "exact" => g.rescale = Rescale::Exact,
            Some(ParamValue::Text(s)) if s == "l1" => g.rescale = Rescale::L1,
            Some(other) => bail!("`rescale` must be true, false, `l1` or `exact`, got {other:?}"),
        }
        match self.parameters.get("sign_rule") {
            None => {}
            Some(ParamValue::Text(s)) if s == "sum" => g.sign_rule = SignRule::Sum,
            Some(ParamValue::Text(s)) if s == "count" => g.sign_rule = SignRule::Count,
            Some(other) => bail!("`sign_rule` must be `sum` or `count`, got {other:?}"),
        }
        if self.method == MergeMethod::Slerp && !self.parameters.contains_key("t") {
            bail!("slerp needs the global parameter `t`");
        }
        Ok(g)
    }
}

fn known(m: MergeMethod) -> String {
    m.global_params()
        .iter()
        .chain(m.tensor_params())
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_range(key: &str, v: &ParamValue, what: &str) -> Result<()> {
    for x in v.values() {
        if !x.is_finite() {
            bail!("{what}: `{key}` is {x}");
        }
        let bad = match key {
            "density" | "t" => !(0.0..=1.0).contains(&x),
            "gamma" | "epsilon" => !(0.0..1.0).contains(&x),
            _ => false,
        };
        if bad {
            bail!("{what}: `{key}` = {x} is out of range");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIES: &str = r#"
merge_method: ties
base_model: ./ckpt/base
models:
  - model: ./ckpt/base
  - model: ./ckpt/sft
    parameters: {weight: 0.5, density: 0.4}
  - model: ./ckpt/base+./ckpt/dpo_lora
    parameters:
      weight: [0.3, 0.5, 0.7]
      density:
        - {filter: self_attn, value: 0.6}
        - {value: 0.4}
parameters: {normalize: true, lambda: 1.0, int8_mask: true}
dtype: bfloat16
tokenizer_source: base
"#;

    #[test]
    fn parses_the_mergekit_example() {
        let c = MergeConfig::from_yaml(TIES).unwrap();
        assert_eq!(c.method, MergeMethod::Ties);
        assert_eq!(c.models.len(), 2, "base listed among models is the base");
        assert_eq!(c.models[1].model.lora.as_deref(), Some("./ckpt/dpo_lora"));
        let attn = "model.layers.0.self_attn.q_proj.weight";
        let mlp = "model.layers.2.mlp.up_proj.weight";
        let p0 = c.model_params(attn, Some(0), 5).unwrap();
        assert_eq!((p0[0].weight, p0[0].density), (0.5, 0.4));
        assert_eq!((p0[1].weight, p0[1].density), (0.3, 0.6));
        let p2 = c.model_params(mlp, Some(2), 5).unwrap();
        assert!((p2[1].weight - 0.5).abs() < 1e-12 && p2[1].density == 0.4);
        // outside the layer stack: the gradient's first value
        assert_eq!(
            c.model_params("model.embed_tokens.weight", None, 5)
                .unwrap()[1]
                .weight,
            0.3
        );
        let g = c.global_params(attn, Some(0), 5).unwrap();
        assert!(g.normalize && g.lambda == 1.0);
    }

    #[test]
    fn rejects_bad_configs_with_names() {
        let err = |y: &str| format!("{:#}", MergeConfig::from_yaml(y).unwrap_err());
        assert!(
            err("merge_method: dare-ties\nbase_model: b\nmodels: [a]").contains("known: linear")
        );
        let e = err("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, densty: 0.5}");
        assert!(e.contains("densty") && e.contains("model a"), "{e}");
        let e = err("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: .nan}");
        assert!(e.contains(".nan") && e.contains("line 5"), "{e}");
        assert!(err("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 1.5}").contains("out of range"));
        assert!(err("merge_method: ties\nslices: []").contains("not supported yet"));
        assert!(
            err("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1}")
                .contains("base_model")
        );
        assert!(err("merge_method: slerp\nbase_model: b\nmodels: [a, c]").contains("exactly one"));
    }

    #[test]
    fn model_refs() {
        assert_eq!(
            ModelRef::parse("org/model@v2+adapters/dpo"),
            ModelRef {
                model: "org/model".into(),
                revision: Some("v2".into()),
                lora: Some("adapters/dpo".into())
            }
        );
        assert_eq!(ModelRef::parse("org/model").to_string(), "org/model");
    }
}
