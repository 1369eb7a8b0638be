//! mergekit YAML as mergekit users write it: `merge_method`, `base_model`, `models` with per-model
//! `parameters`, global `parameters`, `dtype`, `out_dtype`, `tokenizer_source`. Parameter values
//! may be scalars, layer gradients (lists interpolated over the layer stack) or filtered lists
//! (`[{filter: self_attn, value: …}, {value: …}]`, first substring match wins; when none
//! matches, the next level's value applies: model, module, global, the method's default).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::chat_template::ChatTemplate;
use super::methods::{GlobalParams, ModelParams, Setting};
use super::spec::{BaseRole, Domain, MergeMethod, ParamDefault};
use super::tokenizer_source::TokenizerSource;

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

    pub(crate) fn from_yaml(v: &Value) -> Result<Self> {
        match v {
            Value::String(s) => Ok(Self::parse(s)),
            // mergekit's ModelReference: `model` and `lora` are each a path (`path@revision`)
            // or a `{path, revision}` mapping.
            Value::Object(o) => {
                if let Some(k) = o.keys().find(|k| !["model", "lora"].contains(&k.as_str())) {
                    bail!(
                        "model reference: `{k}` is not supported (paft reads `model` and `lora`)"
                    );
                }
                let (model, revision) =
                    model_path(o.get("model").context("model reference needs `model`")?)?;
                let lora = match o.get("lora").filter(|l| !l.is_null()) {
                    None => None,
                    Some(l) => match model_path(l)? {
                        (path, None) => Some(path),
                        (_, Some(_)) => bail!("a LoRA adapter at a Hub revision is not supported"),
                    },
                };
                let mut r = Self::parse(&model);
                if revision.is_some() {
                    r.revision = revision;
                }
                r.lora = lora.or(r.lora);
                Ok(r)
            }
            other => bail!("bad model reference {other}"),
        }
    }
}

/// A `path` string or a `{path, revision}` mapping (mergekit's ModelPath).
fn model_path(v: &Value) -> Result<(String, Option<String>)> {
    match v {
        Value::String(s) => Ok((s.clone(), None)),
        Value::Object(o) => {
            if let Some(k) = o
                .keys()
                .find(|k| !["path", "revision"].contains(&k.as_str()))
            {
                bail!("model path: unknown key `{k}` (path, revision)");
            }
            let path = o
                .get("path")
                .and_then(Value::as_str)
                .context("model path needs `path`")?;
            let revision = o.get("revision").and_then(Value::as_str).map(String::from);
            Ok((path.to_string(), revision))
        }
        other => bail!("bad model path {other}"),
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
    /// A list with text in it: mergekit picks entry ⌊t·(n−1)⌋ instead of interpolating.
    Steps(Vec<ParamValue>),
    /// First entry whose filter is a substring of the tensor name (no filter, or `*`, matches
    /// all). When none matches, the value gives nothing for that tensor and the lookup goes on
    /// to the next level (model, module, global, the method's default), as in mergekit.
    Filtered(Vec<(Option<String>, ParamValue)>),
}

/// mergekit's position of a tensor in the layer stack (plan.py, plan_slice): t = l/(L−1) in
/// the layers, 1 for the only layer of a one-layer stack, 0 outside the layers (embeddings,
/// final norm, head).
fn layer_t(layer: Option<usize>, num_layers: usize) -> f64 {
    match layer {
        Some(l) if num_layers > 1 => l as f64 / (num_layers - 1) as f64,
        Some(_) => 1.0,
        None => 0.0,
    }
}

impl ParamValue {
    fn from_yaml(v: &Value) -> Result<Self> {
        let scalar = |x: &Value| matches!(x, Value::Number(_) | Value::Bool(_) | Value::String(_));
        Ok(match v {
            Value::Number(n) => Self::Number(n.as_f64().context("bad number")?),
            Value::Bool(b) => Self::Bool(*b),
            Value::String(s) => Self::Text(s.clone()),
            Value::Array(items) if items.is_empty() => bail!("empty parameter list"),
            // Python's bools are ints, so mergekit interpolates a list of numbers and bools.
            Value::Array(items) if items.iter().all(|x| x.is_number() || x.is_boolean()) => {
                Self::Gradient(
                    items
                        .iter()
                        .map(|x| match x {
                            Value::Bool(b) => Ok(f64::from(u8::from(*b))),
                            x => x.as_f64().context("bad number"),
                        })
                        .collect::<Result<_>>()?,
                )
            }
            Value::Array(items) if items.iter().all(scalar) => {
                Self::Steps(items.iter().map(Self::from_yaml).collect::<Result<_>>()?)
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

    /// This value where it gives one for a tensor, else `fallback` (a level's value over the
    /// one below it).
    fn or_else(self, fallback: ParamValue) -> ParamValue {
        match self {
            Self::Filtered(mut entries) => {
                entries.push((None, fallback));
                Self::Filtered(entries)
            }
            given => given,
        }
    }

    /// The value for `tensor` (in decoder layer `layer` of `num_layers`, if any) as a global
    /// parameter's setting; none when it is a filtered list none of whose filters matches.
    pub fn setting(
        &self,
        tensor: &str,
        layer: Option<usize>,
        num_layers: usize,
    ) -> Option<Setting<'_>> {
        match self {
            Self::Number(x) => Some(Setting::Number(*x)),
            Self::Bool(b) => Some(Setting::Flag(*b)),
            Self::Text(t) => Some(Setting::Text(t)),
            Self::Gradient(g) => {
                // mergekit's arithmetic, so that a weight rounds as there: at t = 1 exactly
                // the last value, in between (1 − f)·g₀ + f·g₁.
                let pos = layer_t(layer, num_layers) * (g.len() - 1) as f64;
                let i0 = pos as usize;
                let i1 = (i0 + 1).min(g.len() - 1);
                let frac = pos - i0 as f64;
                Some(Setting::Number((1.0 - frac) * g[i0] + frac * g[i1]))
            }
            Self::Steps(s) => {
                let i = (layer_t(layer, num_layers) * (s.len() - 1) as f64) as usize;
                s[i.min(s.len() - 1)].setting(tensor, layer, num_layers)
            }
            Self::Filtered(entries) => entries
                .iter()
                .find(|(filter, _)| filter.as_deref().is_none_or(|f| tensor.contains(f)))
                .and_then(|(_, value)| value.setting(tensor, layer, num_layers)),
        }
    }

    /// The number for `tensor` (see [`ParamValue::setting`]); flags count as 1 and 0.
    pub fn number(
        &self,
        tensor: &str,
        layer: Option<usize>,
        num_layers: usize,
    ) -> Result<Option<f64>> {
        match self.setting(tensor, layer, num_layers) {
            None => Ok(None),
            Some(Setting::Number(x)) => Ok(Some(x)),
            Some(Setting::Flag(b)) => Ok(Some(if b { 1.0 } else { 0.0 })),
            Some(Setting::Text(t)) => bail!("expected a number, got `{t}`"),
        }
    }

    fn values(&self) -> Vec<f64> {
        match self {
            Self::Number(x) => vec![*x],
            Self::Gradient(g) => g.clone(),
            Self::Steps(s) => s.iter().flat_map(Self::values).collect(),
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
    /// `tokenizer_source` or `tokenizer.source`, and `tokenizer.pad_to_multiple_of`.
    pub tokenizer_source: Option<TokenizerSource>,
    pub pad_to_multiple_of: Option<usize>,
    /// The merged model's chat template, if the config sets one.
    pub chat_template: Option<ChatTemplate>,
    /// The YAML as given, copied into the output as `mergekit_config.yml`.
    pub source: String,
    /// Parameters the method does not read (mergekit ignores them): `(where, name)`.
    pub ignored: Vec<(String, String)>,
    /// The `slices:` form (empty for `models:`): output layers taken slice after slice, each
    /// merged from its sources' layer ranges. `models` then holds the first slice's sources.
    pub slices: Vec<OutputSlice>,
}

/// One entry of `slices:`; every source spans the same number of layers.
#[derive(Debug, Clone)]
pub struct OutputSlice {
    pub sources: Vec<SliceSource>,
    /// The slice's own `base_model` (else the config's); for a method with a base it must be
    /// one of the sources, whose layers are then θ₀ of the slice.
    pub base_model: Option<ModelRef>,
    /// The slice's parameters: below its sources' own, above the module's and global ones.
    pub parameters: Params,
    /// Keys mergekit accepts on a slice but never reads (`residual_weight`): ignored, as there.
    pub unread: Vec<String>,
}

/// A source of a slice: `layer_range: [start, end)` of one model, with its parameters.
#[derive(Debug, Clone)]
pub struct SliceSource {
    pub model: ModelRef,
    pub start: usize,
    pub end: usize,
    pub parameters: Params,
}

impl OutputSlice {
    pub fn len(&self) -> usize {
        self.sources.first().map_or(0, |s| s.end - s.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn layer_range(v: Option<&Value>, what: &str) -> Result<(usize, usize)> {
    let r = v
        .and_then(Value::as_array)
        .with_context(|| format!("{what}: `layer_range: [start, end]` is required"))?;
    let n = |x: &Value| x.as_u64().map(|x| x as usize);
    match r.as_slice() {
        [a, b] => match (n(a), n(b)) {
            (Some(a), Some(b)) if a < b => Ok((a, b)),
            _ => bail!("{what}: `layer_range` must be two whole numbers, start < end"),
        },
        _ => bail!("{what}: `layer_range` must be [start, end]"),
    }
}

/// The `slices:` list: sources with their layer ranges and parameters.
fn output_slices(v: &Value) -> Result<Vec<OutputSlice>> {
    let items = v.as_array().context("`slices` must be a list")?;
    if items.is_empty() {
        bail!("`slices` is empty");
    }
    let mut out = vec![];
    for (i, item) in items.iter().enumerate() {
        let o = item
            .as_object()
            .with_context(|| format!("slices[{i}] must be a mapping with `sources`"))?;
        const UNREAD: [&str; 1] = ["residual_weight"];
        if let Some(k) = o.keys().find(|k| {
            !["sources", "base_model", "parameters"].contains(&k.as_str())
                && !UNREAD.contains(&k.as_str())
        }) {
            bail!(
                "slices[{i}]: unknown key `{k}` (known: sources, base_model, parameters, \
                 residual_weight)"
            );
        }
        let sources = o
            .get("sources")
            .and_then(Value::as_array)
            .filter(|s| !s.is_empty())
            .with_context(|| format!("slices[{i}] needs a non-empty `sources` list"))?;
        let mut slice = OutputSlice {
            sources: vec![],
            base_model: o.get("base_model").map(ModelRef::from_yaml).transpose()?,
            parameters: params(o.get("parameters"), &format!("slices[{i}]"))?,
            unread: UNREAD
                .iter()
                .filter(|k| o.contains_key(**k))
                .map(|k| k.to_string())
                .collect(),
        };
        for (j, src) in sources.iter().enumerate() {
            let what = format!("slices[{i}].sources[{j}]");
            let model = ModelRef::from_yaml(
                src.get("model")
                    .with_context(|| format!("{what}: `model` is required"))?,
            )?;
            let (start, end) = layer_range(src.get("layer_range"), &what)?;
            let parameters = params(src.get("parameters"), &what)?;
            slice.sources.push(SliceSource {
                model,
                start,
                end,
                parameters,
            });
        }
        if slice.sources.iter().any(|s| s.end - s.start != slice.len()) {
            bail!("slices[{i}]: every source must span the same number of layers");
        }
        out.push(slice);
    }
    Ok(out)
}

const TOP_LEVEL: [&str; 12] = [
    "merge_method",
    "modules",
    "slices",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
];

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
    /// Reads a config; parameters the method does not read are ignored with a warning each.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_file_with(path, false)
    }

    /// Reads a config; with `strict`, a parameter the method does not read is an error.
    pub fn from_file_with(path: &Path, strict: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read merge config {}", path.display()))?;
        let cfg = Self::from_yaml_quiet(&text)
            .with_context(|| format!("invalid merge config {}", path.display()))?;
        cfg.report_ignored(&path.display().to_string(), strict)?;
        Ok(cfg)
    }

    /// Reads a config from text, warning about parameters the method does not read.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let cfg = Self::from_yaml_quiet(text)?;
        cfg.report_ignored("merge config", false)?;
        Ok(cfg)
    }

    /// Warns once per ignored parameter, or (strict) fails naming all of them.
    pub(crate) fn report_ignored(&self, label: &str, strict: bool) -> Result<()> {
        if self.ignored.is_empty() {
            return Ok(());
        }
        let method = self.method.name();
        if strict {
            let list: Vec<String> = self
                .ignored
                .iter()
                .map(|(at, k)| format!("`{k}` ({at})"))
                .collect();
            bail!(
                "{label}: {method} does not read {} (mergekit ignores them; without --strict paft \
                 warns and ignores them too)",
                list.join(", ")
            );
        }
        for (at, k) in &self.ignored {
            tracing::warn!(
                "{label}: parameter `{k}` ({at}) is not read by {method}; ignored, as mergekit \
                 ignores it (--strict makes this an error)"
            );
        }
        Ok(())
    }

    /// Parses and validates without reporting ignored parameters (they are in `ignored`).
    pub(crate) fn from_yaml_quiet(text: &str) -> Result<Self> {
        let doc: Value =
            serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("not valid YAML: {e}"))?;
        let top = doc
            .as_object()
            .context("the config must be a YAML mapping")?;
        let given = ["models", "slices", "modules"].map(|k| top.contains_key(k));
        if given.iter().filter(|&&g| g).count() != 1 {
            bail!("give exactly one of `models:`, `slices:` and `modules:`");
        }
        let (single_module, module_params);
        let top = match top.get("modules") {
            Some(modules) => {
                (single_module, module_params) = default_module(top, modules)?;
                &single_module
            }
            None => {
                module_params = Params::new();
                top
            }
        };
        if let Some(k) = top.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
            bail!("unknown key `{k}` (known: {})", TOP_LEVEL.join(", "));
        }
        let method_name = top
            .get("merge_method")
            .and_then(Value::as_str)
            .context("missing `merge_method`")?;
        let method = MergeMethod::parse(method_name)?;
        let base_model = top.get("base_model").map(ModelRef::from_yaml).transpose()?;
        let slices = top
            .get("slices")
            .map(output_slices)
            .transpose()?
            .unwrap_or_default();
        if method.uses_base() {
            for (i, slice) in slices.iter().enumerate() {
                let Some(b) = slice.base_model.as_ref().or(base_model.as_ref()) else {
                    bail!("slices[{i}]: {} needs a base_model", method.name());
                };
                if !slice.sources.iter().any(|s| &s.model == b) {
                    bail!(
                        "slices[{i}]: the base_model {b} must be one of the slice's sources (its \
                         layer_range gives the slice's θ₀, as in mergekit)"
                    );
                }
            }
        }
        // With slices, the config as a whole stands for its first slice (its models, its base).
        let base_model = base_model.or_else(|| slices.first().and_then(|s| s.base_model.clone()));
        let (models, base_params) = match slices.first() {
            Some(first) => (
                slice_entries(first, method, base_model.as_ref()),
                Params::new(),
            ),
            None => model_entries(top.get("models"), method, base_model.as_ref())?,
        };
        let tokenizer = TokenizerSource::from_config(top)?;
        let mut cfg = Self {
            method,
            base_model,
            models,
            parameters: over(module_params, params(top.get("parameters"), "global")?),
            dtype: top.get("dtype").and_then(Value::as_str).map(String::from),
            out_dtype: top
                .get("out_dtype")
                .and_then(Value::as_str)
                .map(String::from),
            tokenizer_source: tokenizer.as_ref().map(|(s, _)| s.clone()),
            pad_to_multiple_of: tokenizer.and_then(|(_, pad)| pad),
            chat_template: top
                .get("chat_template")
                .filter(|v| !v.is_null())
                .map(ChatTemplate::from_yaml)
                .transpose()?,
            source: text.to_string(),
            ignored: vec![],
            slices,
        };
        cfg.ignored = cfg.unread_parameters(&base_params);
        for (i, slice) in cfg.slices.iter().enumerate() {
            let at = format!("slices[{i}] parameters");
            for (k, v) in &slice.parameters {
                match method.global_param(k).or_else(|| method.model_param(k)) {
                    Some(ps) => check_value(k, ps.domain, v, &at)?,
                    None => cfg.ignored.push((at.clone(), k.clone())),
                }
            }
            for k in &slice.unread {
                cfg.ignored.push((format!("slices[{i}]"), k.clone()));
            }
        }
        for view in cfg.slice_views() {
            // The views' global parameters are the top level's (reported above) and their
            // slice's (just above): only their sources' are new here.
            cfg.ignored.extend(
                view.unread_parameters(&Params::new())
                    .into_iter()
                    .filter(|(at, _)| at != "global parameters"),
            );
            view.validate()?;
        }
        cfg.ignored.dedup();
        cfg.validate()?;
        Ok(cfg)
    }

    /// One config per slice, its sources as the models (what a slice's tensors are merged by).
    pub(crate) fn slice_views(&self) -> Vec<MergeConfig> {
        self.slices
            .iter()
            .map(|s| {
                let base = s.base_model.clone().or(self.base_model.clone());
                MergeConfig {
                    models: slice_entries(s, self.method, base.as_ref()),
                    base_model: base,
                    parameters: over(s.parameters.clone(), self.parameters.clone()),
                    slices: vec![],
                    ..self.clone()
                }
            })
            .collect()
    }

    /// Parameters given in the config that the method does not read, with where they are.
    fn unread_parameters(&self, base_params: &Params) -> Vec<(String, String)> {
        let m = self.method;
        let mut out = vec![];
        for k in self.parameters.keys() {
            if m.global_param(k).is_none() && m.model_param(k).is_none() {
                out.push(("global parameters".to_string(), k.clone()));
            }
        }
        for e in &self.models {
            for k in e.parameters.keys() {
                if m.model_param(k).is_none() {
                    out.push((format!("model {}", e.model), k.clone()));
                }
            }
        }
        if let Some(b) = &self.base_model {
            // The base of a task-vector method is θ₀, not an input: none of its parameters
            // is read.
            for k in base_params.keys() {
                out.push((format!("base model {b}"), k.clone()));
            }
        }
        out
    }

    /// Everything that can be checked without opening a model.
    pub(crate) fn validate(&self) -> Result<()> {
        let m = self.method;
        let spec = m.spec();
        if spec.base == BaseRole::Required && self.base_model.is_none() {
            bail!("{} needs a `base_model`", m.name());
        }
        self.check_model_count()?;
        for d in [&self.dtype, &self.out_dtype].into_iter().flatten() {
            let d = d.trim_start_matches("torch.");
            if !["float32", "float16", "bfloat16"].contains(&d) {
                bail!("unsupported dtype `{d}` (float32, float16, bfloat16)");
            }
        }
        for ps in spec.global {
            match self.parameters.get(ps.name) {
                Some(v) => check_value(ps.name, ps.domain, v, "global parameters")?,
                None if ps.default == ParamDefault::Required => {
                    bail!("{} needs the global parameter `{}`", m.name(), ps.name)
                }
                None => {}
            }
        }
        for ps in spec.per_model {
            if let Some(v) = self.parameters.get(ps.name) {
                check_value(ps.name, ps.domain, v, "global parameters")?;
            }
            for e in &self.models {
                match e.parameters.get(ps.name) {
                    Some(v) => check_value(ps.name, ps.domain, v, &format!("model {}", e.model))?,
                    None if ps.default == ParamDefault::Required
                        && !self.parameters.contains_key(ps.name) =>
                    {
                        bail!("model {}: {} needs a `{}`", e.model, m.name(), ps.name)
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }

    fn check_model_count(&self) -> Result<()> {
        let m = self.method;
        let n = self.models.len();
        let (min, max) = m.spec().models;
        if n == 0 {
            bail!("no models to merge besides the base");
        }
        if !m.uses_base() && max == Some(1) && n > 1 {
            bail!(
                "{} takes exactly one model (a base_model counts as one), got {n}",
                m.name()
            );
        }
        match max {
            Some(1) if n != 1 => bail!(
                "{} merges the base_model with exactly one other model, got {n}",
                m.name()
            ),
            Some(k) if n != k && min == k => bail!(
                "{} merges exactly {k} models besides the base_model, got {n}",
                m.name()
            ),
            _ if n < min => bail!(
                "{} needs at least {min} models besides the base_model, got {n}",
                m.name()
            ),
            _ => Ok(()),
        }
    }

    /// Resolves per-model parameters for one tensor: the model's own value, else the global
    /// one, else the method's default (mergekit's order; a filtered list whose filters all miss
    /// the tensor gives nothing at its level). A required parameter given nowhere for the
    /// tensor is an error, as in mergekit.
    pub fn model_params(
        &self,
        tensor: &str,
        layer: Option<usize>,
        num_layers: usize,
    ) -> Result<Vec<ModelParams>> {
        self.models
            .iter()
            .map(|e| {
                let mut p = ModelParams::defaults(self.method);
                for ps in self.method.spec().per_model {
                    let key = ps.name;
                    let levels = [e.parameters.get(key), self.parameters.get(key)];
                    let mut found = None;
                    for v in levels.into_iter().flatten() {
                        found = v
                            .number(tensor, layer, num_layers)
                            .with_context(|| format!("model {}: `{key}`", e.model))?;
                        if found.is_some() {
                            break;
                        }
                    }
                    match found {
                        Some(x) => p.set(key, x)?,
                        None if ps.default == ParamDefault::Required => bail!(
                            "model {}: no `{key}` for tensor `{tensor}` (no filter of its \
                             filtered lists matches it and no other level gives one)",
                            e.model
                        ),
                        None => {}
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
        for ps in self.method.spec().global {
            let setting = self
                .parameters
                .get(ps.name)
                .and_then(|v| v.setting(tensor, layer, num_layers));
            match setting {
                Some(s) => g
                    .set(ps.name, s)
                    .with_context(|| format!("global parameter `{}`", ps.name))?,
                None if ps.default == ParamDefault::Required => bail!(
                    "no global parameter `{}` for tensor `{tensor}` (no filter matches it)",
                    ps.name
                ),
                None => {}
            }
        }
        Ok(g)
    }
}

/// The `models:` list as merge inputs, and the parameters given to the base when it is listed.
/// A base that is θ₀ of the method is dropped from the inputs; for a method that merges the base
/// like any other model it stays (and is added when missing, as mergekit adds it).
fn model_entries(
    list: Option<&Value>,
    method: MergeMethod,
    base: Option<&ModelRef>,
) -> Result<(Vec<ModelEntry>, Params)> {
    let mut models = vec![];
    let mut base_params = Params::new();
    let items = list
        .and_then(Value::as_array)
        .context("missing `models` list")?;
    for (i, entry) in items.iter().enumerate() {
        let model = match entry {
            Value::Object(o) if o.contains_key("model") => {
                ModelRef::from_yaml(o.get("model").unwrap_or(&Value::Null))?
            }
            other => ModelRef::from_yaml(other)?,
        };
        let parameters = params(entry.get("parameters"), &format!("models[{i}] ({model})"))?;
        if Some(&model) == base && method.uses_base() {
            base_params = parameters;
            continue;
        }
        models.push(ModelEntry { model, parameters });
    }
    if let Some(b) = base.filter(|_| !method.uses_base()) {
        if !models.iter().any(|e| &e.model == b) {
            // Appended last, where mergekit's planner adds it.
            models.push(ModelEntry {
                model: b.clone(),
                parameters: Params::new(),
            });
        }
    }
    Ok((models, base_params))
}

/// A slice's sources as merge inputs: for a method with a base, all but the base's source
/// (the slice's θ₀); otherwise all, with a base_model missing from them added last, as for
/// `models:`.
fn slice_entries(
    slice: &OutputSlice,
    method: MergeMethod,
    base: Option<&ModelRef>,
) -> Vec<ModelEntry> {
    let base = slice.base_model.as_ref().or(base);
    let is_base = |m: &ModelRef| method.uses_base() && Some(m) == base;
    let mut models: Vec<ModelEntry> = slice
        .sources
        .iter()
        .filter(|s| !is_base(&s.model))
        .map(|s| ModelEntry {
            model: s.model.clone(),
            parameters: s.parameters.clone(),
        })
        .collect();
    if let Some(b) = base.filter(|_| !method.uses_base()) {
        if !models.iter().any(|e| &e.model == b) {
            models.push(ModelEntry {
                model: b.clone(),
                parameters: Params::new(),
            });
        }
    }
    models
}

/// `modules:` as mergekit 0.1.5 reads it, for the one module paft's architectures have
/// (`default`, mergekit's name for a plain decoder): the config with that module's `models:`
/// or `slices:` at the top level, and the module's `parameters` (which [`over`] puts above the
/// top-level ones: mergekit's order is model or source, module, global).
fn default_module(
    top: &serde_json::Map<String, Value>,
    modules: &Value,
) -> Result<(serde_json::Map<String, Value>, Params)> {
    let modules = modules
        .as_object()
        .context("`modules` must be a mapping of module names")?;
    let module = match modules.iter().collect::<Vec<_>>().as_slice() {
        [(name, m)] if name.as_str() == "default" => *m,
        _ => bail!(
            "`modules`: paft's architectures have one module, `default` (got {}); merge \
             multi-module models with mergekit",
            modules
                .keys()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let module = module
        .as_object()
        .context("modules.default must be a mapping with `models` or `slices`")?;
    if let Some(k) = module
        .keys()
        .find(|k| !["models", "slices", "parameters"].contains(&k.as_str()))
    {
        bail!("modules.default: unknown key `{k}` (known: models, slices, parameters)");
    }
    if module.contains_key("models") == module.contains_key("slices") {
        bail!("modules.default: give exactly one of `models:` and `slices:`");
    }
    let mut out = top.clone();
    out.remove("modules");
    for k in ["models", "slices"] {
        if let Some(v) = module.get(k) {
            out.insert(k.to_string(), v.clone());
        }
    }
    Ok((out, params(module.get("parameters"), "modules.default")?))
}

/// The parameters of one level over those of the level below: each value of `upper` where it
/// gives one for a tensor, else the lower level's.
fn over(upper: Params, mut lower: Params) -> Params {
    for (k, v) in upper {
        let merged = match lower.remove(&k) {
            Some(below) => v.or_else(below),
            None => v,
        };
        lower.insert(k, merged);
    }
    lower
}

/// Finite, inside the parameter's domain (numbers), or one of its choices.
fn check_value(key: &str, domain: Domain, v: &ParamValue, what: &str) -> Result<()> {
    match (domain, v) {
        (Domain::Choice(ok), ParamValue::Text(t)) if !ok.contains(&t.as_str()) => {
            bail!("{what}: `{key}` = `{t}` is not one of {}", ok.join(", "))
        }
        (Domain::Choice(_) | Domain::Flag | Domain::NoEffect, _) => Ok(()),
        _ => check_range(key, domain, v, what),
    }
}

fn check_range(key: &str, domain: Domain, v: &ParamValue, what: &str) -> Result<()> {
    if let ParamValue::Text(t) = v {
        bail!("{what}: `{key}` must be a number, got `{t}`");
    }
    for x in v.values() {
        if !x.is_finite() {
            bail!("{what}: `{key}` is {x}");
        }
        if !domain.admits(x) {
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
        let e = err("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: .nan}");
        assert!(e.contains(".nan") && e.contains("line 5"), "{e}");
        assert!(err("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1, density: 1.5}").contains("out of range"));
        assert!(err("merge_method: ties\nslices: []").contains("empty"));
        // A method with a base takes each slice's θ₀ from the base's source: it must be there.
        let e = err("merge_method: ties\nbase_model: b\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]");
        assert!(
            e.contains("slices[0]") && e.contains("must be one of the slice's sources"),
            "{e}"
        );
        assert!(
            err("merge_method: ties\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]")
                .contains("needs a base_model")
        );
        assert!(err("merge_method: ties\nbase_model: b\nslices: [{residual: 0.5, sources: [{model: b, layer_range: [0, 1]}]}]").contains("unknown key `residual`"));
        // mergekit accepts `residual_weight` and never reads it; a slice's parameters are read.
        let c = MergeConfig::from_yaml_quiet("merge_method: ties\nbase_model: b\nslices: [{residual_weight: 0.5, parameters: {density: 0.5, gamma: 1}, sources: [{model: b, layer_range: [0, 1]}, {model: a, layer_range: [0, 1], parameters: {weight: 1}}]}]").unwrap();
        assert_eq!(
            c.ignored,
            [
                ("slices[0] parameters".to_string(), "gamma".to_string()),
                ("slices[0]".to_string(), "residual_weight".to_string())
            ]
        );
        assert_eq!(
            c.slice_views()[0]
                .model_params("model.layers.0.mlp.up_proj.weight", Some(0), 1)
                .unwrap()[0]
                .density,
            0.5
        );
        let e = err("merge_method: ties\nbase_model: b\nslices: [{parameters: {density: 2}, sources: [{model: b, layer_range: [0, 1]}, {model: a, layer_range: [0, 1], parameters: {weight: 1}}]}]");
        assert!(
            e.contains("slices[0] parameters") && e.contains("out of range"),
            "{e}"
        );
        // `modules:` has the one module of a plain decoder, with models or slices.
        let e = err("merge_method: linear\nmodules: {vision_tower: {models: [a]}}");
        assert!(
            e.contains("`default`") && e.contains("`vision_tower`"),
            "{e}"
        );
        assert!(
            err("merge_method: linear\nmodules: {default: {models: [a], slices: []}}")
                .contains("exactly one of")
        );
        assert!(
            err("merge_method: linear\nmodels: [a]\nmodules: {default: {models: [a]}}")
                .contains("exactly one of")
        );
        assert!(
            err("merge_method: linear\nmodules: {default: {models: [a], weights: 1}}")
                .contains("unknown key `weights`")
        );
        assert!(err(
            "merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [2, 1]}]}]"
        )
        .contains("start < end"));
        assert!(err("merge_method: passthrough\nmodels: [a]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]").contains("exactly one of"));
        assert!(
            err("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1}")
                .contains("base_model")
        );
        assert!(err("merge_method: slerp\nbase_model: b\nmodels: [a, c]").contains("exactly one"));
    }

    #[test]
    fn unread_parameters_are_ignored_with_their_place_or_refused_when_strict() {
        let yaml = "merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: b\n    \
                    parameters: {weight: 2}\n  - model: a\n    parameters: {weight: 1, density: 0.5}\n\
                    parameters: {lambda: 0.5, densty: 0.1, normalize: true}";
        let c = MergeConfig::from_yaml_quiet(yaml).unwrap();
        assert_eq!(
            c.ignored,
            vec![
                ("global parameters".to_string(), "densty".to_string()),
                ("model a".to_string(), "density".to_string()),
                ("base model b".to_string(), "weight".to_string()),
            ]
        );
        // Lenient: the merge reads only what the method reads.
        c.report_ignored("c.yaml", false).unwrap();
        let p = c.model_params("x", None, 1).unwrap();
        assert_eq!((p[0].weight, p[0].density), (1.0, 1.0));
        let e = format!("{:#}", c.report_ignored("c.yaml", true).unwrap_err());
        for part in [
            "c.yaml",
            "`densty` (global parameters)",
            "`density` (model a)",
            "`weight` (base model b)",
        ] {
            assert!(e.contains(part), "{e}");
        }
        // Read parameters are not reported: a per-model default at the top level is read.
        let ties =
            "merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\n\
                    parameters: {density: 0.5, int8_mask: true}";
        assert!(MergeConfig::from_yaml_quiet(ties)
            .unwrap()
            .ignored
            .is_empty());
        // Unknown methods and malformed YAML stay errors.
        assert!(MergeConfig::from_yaml_quiet("merge_method: tie\nmodels: [a]").is_err());
        assert!(MergeConfig::from_yaml_quiet("merge_method: ties\nmodels: [a").is_err());
    }

    #[test]
    fn a_slice_base_is_its_theta0_and_a_default_module_is_the_top_level() {
        let c = MergeConfig::from_yaml_quiet(
            "merge_method: ties\nparameters: {weight: 1}\nslices:\n  - base_model: b\n    sources: [{model: b, layer_range: [0, 2]}, \
             {model: a, layer_range: [0, 2]}]\n  - base_model: c\n    sources: [{model: a, layer_range: [1, 2]}, \
             {model: c, layer_range: [0, 1]}]",
        )
        .unwrap();
        let views = c.slice_views();
        let names = |v: &MergeConfig| {
            v.models
                .iter()
                .map(|e| e.model.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            (
                names(&views[0]),
                views[0].base_model.as_ref().map(|b| b.to_string())
            ),
            (vec!["a".to_string()], Some("b".to_string()))
        );
        assert_eq!(
            (
                names(&views[1]),
                views[1].base_model.as_ref().map(|b| b.to_string())
            ),
            (vec!["a".to_string()], Some("c".to_string()))
        );

        // The module's parameters override the top level's, the models' their own.
        let m = MergeConfig::from_yaml_quiet(
            "merge_method: task_arithmetic\nbase_model: b\nparameters: {lambda: 2.0, weight: 0.1}\n\
             modules:\n  default:\n    models: [{model: a, parameters: {weight: 0.7}}, c]\n    parameters: {lambda: 0.8}",
        )
        .unwrap();
        let g = m.global_params("model.norm.weight", None, 1).unwrap();
        assert_eq!(g.lambda, 0.8);
        let w: Vec<f64> = m
            .model_params("model.norm.weight", None, 1)
            .unwrap()
            .iter()
            .map(|p| p.weight)
            .collect();
        assert_eq!(w, [0.7, 0.1]);
    }

    #[test]
    fn a_method_that_merges_the_base_like_a_model_keeps_it() {
        let c =
            MergeConfig::from_yaml_quiet("merge_method: karcher\nbase_model: b\nmodels: [a, c]")
                .unwrap();
        let names: Vec<String> = c.models.iter().map(|e| e.model.to_string()).collect();
        assert_eq!(names, ["a", "c", "b"]);
        let e = format!(
            "{:#}",
            MergeConfig::from_yaml_quiet(
                "merge_method: linear\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]"
            )
            .unwrap_err()
        );
        assert!(e.contains("model b") && e.contains("weight"), "{e}");
        let e = format!(
            "{:#}",
            MergeConfig::from_yaml_quiet("merge_method: passthrough\nbase_model: b\nmodels: [a]")
                .unwrap_err()
        );
        assert!(e.contains("exactly one model"), "{e}");
    }

    #[test]
    fn a_gradient_in_a_one_layer_stack_takes_its_last_value() {
        let g = ParamValue::Gradient(vec![1.0, 0.25]);
        let at = |tensor: &str, layer, n| g.number(tensor, layer, n).unwrap().unwrap();
        assert_eq!(at("model.layers.0.mlp.up_proj.weight", Some(0), 1), 0.25);
        assert_eq!(at("model.embed_tokens.weight", None, 1), 1.0);
        assert_eq!(at("model.layers.1.mlp.up_proj.weight", Some(1), 3), 0.625);
    }

    /// mergekit's `evaluate_setting` and `ConfigReader.parameter`: a filtered list whose filters
    /// all miss a tensor gives nothing, and the lookup goes on to the module, the global
    /// parameters and the default; a required parameter found nowhere is an error.
    #[test]
    fn a_filtered_list_that_misses_a_tensor_falls_through_to_the_next_level() {
        let c = MergeConfig::from_yaml_quiet(
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      \
             weight: 0.7\n      density: [{filter: self_attn, value: 0.9}]\n  - model: c\n    \
             parameters:\n      weight: [{filter: mlp, value: 0.4}]\n      density: 0.5\n\
             parameters:\n  weight: 0.6\n  density: [{filter: mlp, value: 0.2}]",
        )
        .unwrap();
        let at = |tensor: &str| -> Vec<(f64, f64)> {
            c.model_params(tensor, Some(0), 2)
                .unwrap()
                .iter()
                .map(|p| (p.weight, p.density))
                .collect()
        };
        assert_eq!(
            at("model.layers.0.self_attn.q_proj.weight"),
            [(0.7, 0.9), (0.6, 0.5)]
        );
        assert_eq!(
            at("model.layers.0.mlp.up_proj.weight"),
            [(0.7, 0.2), (0.4, 0.5)]
        );
        // ties' density default is 1
        assert_eq!(
            at("model.layers.0.input_layernorm.weight"),
            [(0.7, 1.0), (0.6, 0.5)]
        );

        // The required weight given only for mlp tensors.
        let c = MergeConfig::from_yaml_quiet(
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      \
             weight: [{filter: mlp, value: 0.4}]",
        )
        .unwrap();
        assert_eq!(
            c.model_params("model.layers.0.mlp.up_proj.weight", Some(0), 2)
                .unwrap()[0]
                .weight,
            0.4
        );
        let e = format!(
            "{:#}",
            c.model_params("model.norm.weight", None, 2).unwrap_err()
        );
        assert!(
            e.contains("model a") && e.contains("`weight`") && e.contains("model.norm.weight"),
            "{e}"
        );

        // A module's filtered list falls through to the top level's value; slerp's required
        // `t` found nowhere for a tensor is an error.
        let m = MergeConfig::from_yaml_quiet(
            "merge_method: slerp\nbase_model: b\nparameters: {t: 0.2}\nmodules:\n  default:\n    \
             models: [a, b]\n    parameters: {t: [{filter: mlp, value: 0.9}]}",
        )
        .unwrap();
        let t = |c: &MergeConfig, tensor: &str| c.global_params(tensor, Some(0), 2).map(|g| g.t);
        assert_eq!(t(&m, "model.layers.0.mlp.up_proj.weight").unwrap(), 0.9);
        assert_eq!(
            t(&m, "model.layers.0.self_attn.q_proj.weight").unwrap(),
            0.2
        );
        let s = MergeConfig::from_yaml_quiet(
            "merge_method: slerp\nbase_model: b\nmodels: [a, b]\nparameters: {t: [{filter: mlp, value: 0.9}]}",
        )
        .unwrap();
        let e = format!("{:#}", t(&s, "model.norm.weight").unwrap_err());
        assert!(e.contains("`t`") && e.contains("model.norm.weight"), "{e}");
    }

    /// mergekit interpolates a list of numbers (Python's bools among them) and picks from a
    /// list with text in it: entry ⌊t·(n−1)⌋.
    #[test]
    fn lists_of_text_pick_an_entry_and_bools_interpolate_as_numbers() {
        let v = |yaml: &str| ParamValue::from_yaml(&serde_saphyr::from_str(yaml).unwrap()).unwrap();
        let steps = v("[sum, count, sum]");
        let pick = |layer| steps.setting("model.layers.x.mlp.up_proj.weight", layer, 5);
        assert_eq!(pick(Some(0)), Some(Setting::Text("sum")));
        // t = 0.5: index ⌊0.5·2⌋ = 1; t = 0.75: ⌊1.5⌋ = 1; t = 1: 2
        assert_eq!(pick(Some(2)), Some(Setting::Text("count")));
        assert_eq!(pick(Some(3)), Some(Setting::Text("count")));
        assert_eq!(pick(Some(4)), Some(Setting::Text("sum")));
        assert_eq!(pick(None), Some(Setting::Text("sum")));
        let flags = v("[true, false]");
        assert_eq!(flags, ParamValue::Gradient(vec![1.0, 0.0]));
        assert_eq!(flags.number("x", Some(1), 3).unwrap(), Some(0.5));
        assert!(ParamValue::from_yaml(&serde_saphyr::from_str("[]").unwrap()).is_err());
        let mixed = ParamValue::from_yaml(&serde_saphyr::from_str("[0.5, {value: 1}]").unwrap());
        assert!(mixed.is_err());
    }

    #[test]
    fn model_refs_in_mergekit_mapping_form() {
        let r = |yaml: &str| ModelRef::from_yaml(&serde_saphyr::from_str(yaml).unwrap());
        let m = r("{model: {path: org/m, revision: v2}, lora: {path: ./ad}}").unwrap();
        assert_eq!(
            (m.model.as_str(), m.revision.as_deref(), m.lora.as_deref()),
            ("org/m", Some("v2"), Some("./ad"))
        );
        let m = r("{model: ./m, lora: ./ad}").unwrap();
        assert_eq!((m.model.as_str(), m.lora.as_deref()), ("./m", Some("./ad")));
        let e = format!(
            "{:#}",
            r("{model: ./m, override_architecture: X}").unwrap_err()
        );
        assert!(e.contains("`override_architecture`"), "{e}");
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
