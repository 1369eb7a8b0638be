//! Rotary position embeddings as transformers configures them: the base θ and the frequency
//! scaling, read from either generation's `config.json` layout, and the inverse frequencies.
//!
//! transformers 4 writes a top-level `rope_theta` and `rope_scaling`; transformers 5 writes one
//! `rope_parameters` object holding `rope_theta`, `rope_type` and the scaling keys (and still reads
//! the old keys). Reading only one layout silently falls back to θ = 10 000 on the other, so both are
//! read here and a config where the two disagree is refused: the two generations would compute
//! different models from it.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

/// θ when no layout names one (transformers' `default_theta`, the same for llama, mistral, qwen2).
const DEFAULT_THETA: f64 = 10_000.0;

/// Llama 3 style frequency-dependent scaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// YaRN (`rope_type = "yarn"`), with transformers' defaults already applied.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnRopeScaling {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Multiplies cos and sin.
    pub attention_factor: f64,
    pub truncate: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    Llama3(Llama3RopeScaling),
    Yarn(YarnRopeScaling),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

/// The RoPE types transformers knows that paft does not compute, with the reason.
const REFUSED_TYPES: [(&str, &str); 3] = [
    (
        "dynamic",
        "dynamic NTK scaling changes the frequencies with the length of each batch",
    ),
    ("longrope", "LongRoPE is a Phi-3 scheme"),
    (
        "proportional",
        "proportional RoPE is not used by llama, mistral or qwen2",
    ),
];

fn num(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("`{key}` must be a number, got {v}")),
    }
}

fn required(obj: &Map<String, Value>, key: &str, rope_type: &str) -> Result<f64> {
    num(obj, key)?.with_context(|| format!("RoPE type `{rope_type}` needs `{key}`"))
}

impl RopeConfig {
    /// Reads θ and the scaling from `raw` (a whole config.json). `max_position_embeddings` is the
    /// config's own (resolved) value: transformers uses it where a scaling omits its
    /// `original_max_position_embeddings`.
    pub fn from_config(raw: &Value, max_position_embeddings: usize) -> Result<Self> {
        if let Some(f) = raw.get("partial_rotary_factor").and_then(Value::as_f64) {
            if f != 1.0 {
                bail!("`partial_rotary_factor` {f} is not supported (paft rotates the whole head)");
            }
        }
        let legacy_theta = match raw.get("rope_theta") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .with_context(|| format!("`rope_theta` must be a number, got {v}"))?,
            ),
        };
        let legacy_scaling = match raw.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(o.clone()),
            Some(v) => bail!("`rope_scaling` must be an object, got {v}"),
        };
        let params = match raw.get("rope_parameters") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(flat_rope_parameters(o, raw)?),
            Some(v) => bail!("`rope_parameters` must be an object, got {v}"),
        };
        let (theta, spec) = match params {
            // transformers 5: the object wins, the old top-level keys fill its gaps.
            Some(p) => {
                let own_theta = num(&p, "rope_theta").context("in `rope_parameters`")?;
                if let (Some(a), Some(b)) = (own_theta, legacy_theta) {
                    if a != b {
                        bail!(
                            "`rope_parameters.rope_theta` ({a}) and the top-level `rope_theta` ({b}) disagree: \
                             transformers 5 would use the first and transformers 4 the second"
                        );
                    }
                }
                if let Some(s) = &legacy_scaling {
                    if !same_scaling(s, &p) {
                        bail!(
                            "both `rope_scaling` and `rope_parameters` are set and they differ: \
                             transformers 4 reads the first, transformers 5 lets it override the second"
                        );
                    }
                }
                // transformers 5 always writes θ into the object; one without it was edited by
                // hand or another tool, and the 10 000 transformers would assume is the silent
                // misreading this module exists to prevent.
                let theta = own_theta.or(legacy_theta).context(
                    "`rope_parameters` has no `rope_theta` (and there is no top-level `rope_theta`); \
                     transformers would silently assume 10000: write the model's θ there",
                )?;
                (theta, Some(p))
            }
            None => (legacy_theta.unwrap_or(DEFAULT_THETA), legacy_scaling),
        };
        if !(theta.is_finite() && theta > 1.0) {
            bail!("RoPE θ must be a finite number above 1, got {theta}");
        }
        let scaling = match spec {
            Some(s) => parse_scaling(&s, raw, max_position_embeddings)?,
            None => None,
        };
        Ok(Self { theta, scaling })
    }

    /// transformers 4's layout (top-level `rope_theta` and `rope_scaling`), which transformers 4
    /// and 5 both read; for configs that paft writes from scratch.
    pub fn legacy_json(&self) -> (Value, Value) {
        let scaling = match &self.scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                serde_json::json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3(s)) => serde_json::json!({
                "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            }),
            Some(RopeScaling::Yarn(s)) => serde_json::json!({
                "rope_type": "yarn", "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
                "attention_factor": s.attention_factor, "truncate": s.truncate,
            }),
        };
        (serde_json::json!(self.theta), scaling)
    }

    /// The factor transformers multiplies cos and sin by (1 except for YaRN).
    pub fn attention_factor(&self) -> f64 {
        match &self.scaling {
            Some(RopeScaling::Yarn(y)) => y.attention_factor,
            _ => 1.0,
        }
    }

    /// The `head_dim / 2` inverse frequencies, in f32 as transformers computes them.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        let base = self.theta as f32;
        let d = head_dim;
        let pos_freqs: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| base.powf(i as f32 / d as f32))
            .collect();
        let plain = pos_freqs.iter().map(|p| 1.0 / p);
        match &self.scaling {
            None => plain.collect(),
            Some(RopeScaling::Linear { factor }) => plain.map(|f| f / *factor as f32).collect(),
            Some(RopeScaling::Llama3(s)) => plain.map(|f| llama3_frequency(f, s)).collect(),
            Some(RopeScaling::Yarn(y)) => yarn_frequencies(&pos_freqs, d, self.theta, y),
        }
    }
}

/// transformers 5 may nest `rope_parameters` by layer type; paft runs one RoPE for every layer.
fn flat_rope_parameters(o: &Map<String, Value>, raw: &Value) -> Result<Map<String, Value>> {
    let layer_types: Vec<&str> = raw
        .get("layer_types")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let nested: Vec<&Value> = o
        .iter()
        .filter(|(k, _)| layer_types.contains(&k.as_str()))
        .map(|(_, v)| v)
        .collect();
    if nested.is_empty() {
        return Ok(o.clone());
    }
    if nested.windows(2).any(|w| w[0] != w[1]) {
        bail!("`rope_parameters` differs between layer types; paft runs one RoPE for all layers");
    }
    nested[0]
        .as_object()
        .cloned()
        .context("`rope_parameters` per layer type must be objects")
}

fn rope_type(s: &Map<String, Value>) -> Result<String> {
    match s.get("rope_type").or_else(|| s.get("type")) {
        None | Some(Value::Null) => Ok("default".into()),
        Some(Value::String(t)) => Ok(t.clone()),
        Some(v) => bail!("`rope_type` must be a string, got {v}"),
    }
}

/// Equal as transformers would use them (`type` is the old name of `rope_type`; θ is compared
/// separately).
fn same_scaling(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    let strip = |m: &Map<String, Value>| {
        let mut m = m.clone();
        let t = rope_type(&m).unwrap_or_default();
        m.remove("type");
        m.remove("rope_theta");
        m.insert("rope_type".into(), Value::String(t));
        m
    };
    strip(a) == strip(b)
}

fn parse_scaling(
    s: &Map<String, Value>,
    raw: &Value,
    max_position_embeddings: usize,
) -> Result<Option<RopeScaling>> {
    let kind = rope_type(s)?;
    if let Some(f) = num(s, "partial_rotary_factor")? {
        if f != 1.0 {
            bail!("`partial_rotary_factor` {f} is not supported (paft rotates the whole head)");
        }
    }
    let common = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
    let own: &[&str] = match kind.as_str() {
        "default" => &[],
        "linear" => &["factor"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        "yarn" => &[
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ],
        other => {
            let why = REFUSED_TYPES.iter().find(|(t, _)| *t == other).map_or(
                "transformers does not define it for llama, mistral or qwen2",
                |(_, w)| w,
            );
            bail!(
                "RoPE type `{other}` is not supported ({why}); paft supports default, linear, llama3 and yarn"
            );
        }
    };
    if let Some(k) = s
        .keys()
        .find(|k| !common.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        bail!("RoPE type `{kind}` has a key paft does not know: `{k}`");
    }
    // transformers 5 lets a top-level `original_max_position_embeddings` override the scaling's
    // own (Phi-3's layout); transformers 4 ignores it. Refuse the case where that matters.
    let original = match num(s, "original_max_position_embeddings")? {
        Some(v) => v as usize,
        None => max_position_embeddings,
    };
    if matches!(kind.as_str(), "llama3" | "yarn") {
        if let Some(top) = raw
            .get("original_max_position_embeddings")
            .and_then(Value::as_u64)
        {
            if top as usize != original {
                bail!(
                    "top-level `original_max_position_embeddings` ({top}) differs from the RoPE scaling's ({original}): \
                     transformers 5 would use the first and transformers 4 the second"
                );
            }
        }
    }
    let positive = |name: &str, v: f64| -> Result<f64> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            bail!("RoPE `{name}` must be a positive number, got {v}")
        }
    };
    Ok(match kind.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: positive("factor", required(s, "factor", &kind)?)?,
        }),
        "llama3" => {
            let low = required(s, "low_freq_factor", &kind)?;
            let high = required(s, "high_freq_factor", &kind)?;
            if high <= low {
                bail!("llama3 RoPE needs high_freq_factor ({high}) above low_freq_factor ({low})");
            }
            Some(RopeScaling::Llama3(Llama3RopeScaling {
                factor: positive("factor", required(s, "factor", &kind)?)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            }))
        }
        _ => Some(RopeScaling::Yarn(yarn(
            s,
            original,
            max_position_embeddings,
        )?)),
    })
}

/// transformers' `_compute_yarn_parameters` defaults: the factor from the context lengths when
/// absent, β 32 / 1, and the attention factor from `mscale` (0.1·ln(factor) + 1).
fn yarn(s: &Map<String, Value>, original: usize, max_pos: usize) -> Result<YarnRopeScaling> {
    let factor = match num(s, "factor")? {
        Some(f) => f,
        None => max_pos as f64 / original as f64,
    };
    if !(factor.is_finite() && factor > 0.0) {
        bail!("yarn RoPE `factor` must be positive, got {factor}");
    }
    let get_mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let truthy = |v: Option<f64>| v.filter(|x| *x != 0.0);
    let attention_factor = match num(s, "attention_factor")? {
        Some(a) => a,
        None => match (truthy(num(s, "mscale")?), truthy(num(s, "mscale_all_dim")?)) {
            (Some(m), Some(all)) => get_mscale(factor, m) / get_mscale(factor, all),
            _ => get_mscale(factor, 1.0),
        },
    };
    let truncate = match s.get("truncate") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => bail!("yarn RoPE `truncate` must be true or false, got {v}"),
    };
    Ok(YarnRopeScaling {
        factor,
        original_max_position_embeddings: original,
        beta_fast: truthy(num(s, "beta_fast")?).unwrap_or(32.0),
        beta_slow: truthy(num(s, "beta_slow")?).unwrap_or(1.0),
        attention_factor,
        truncate,
    })
}

fn llama3_frequency(f: f32, s: &Llama3RopeScaling) -> f32 {
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    let freq = f as f64;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    (if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }) as f32
}

/// Blends interpolated and extrapolated frequencies over YaRN's correction range of dimensions.
fn yarn_frequencies(pos_freqs: &[f32], dim: usize, base: f64, y: &YarnRopeScaling) -> Vec<f32> {
    let correction_dim = |rotations: f64| {
        (dim as f64
            * (y.original_max_position_embeddings as f64
                / (rotations * 2.0 * std::f64::consts::PI))
                .ln())
            / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min(dim as f64 - 1.0);
    if low == high {
        high += 0.001; // as transformers: avoid dividing by zero
    }
    let factor = y.factor as f32;
    pos_freqs
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            let interpolated = 1.0 / (factor * p);
            interpolated * (1.0 - extrapolation) + (1.0 / p) * extrapolation
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(raw: Value) -> Result<RopeConfig> {
        RopeConfig::from_config(&raw, 2048)
    }

    #[test]
    fn both_layouts_give_the_same_rope() {
        let v4 = read(
            json!({"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
        )
        .unwrap();
        let v5 = read(json!({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}))
            .unwrap();
        assert_eq!(v4, v5);
        assert_eq!(v4.theta, 500000.0);
        assert_eq!(read(json!({})).unwrap().theta, DEFAULT_THETA);
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        let msg = |raw| format!("{:#}", read(raw).unwrap_err());
        let m = msg(
            json!({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}),
        );
        assert!(m.contains("`dynamic`"), "{m}");
        let m = msg(json!({"rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}));
        assert!(m.contains("`su`"), "{m}");
        let m = msg(json!({"rope_parameters": {"rope_type": "default"}}));
        assert!(m.contains("no `rope_theta`"), "{m}");
        let m = msg(json!({"rope_parameters": {"rope_theta": 1e6}, "rope_theta": 1e4}));
        assert!(m.contains("disagree"), "{m}");
        let m = msg(json!({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "fudge": 1}}));
        assert!(m.contains("`fudge`"), "{m}");
        let m = msg(
            json!({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}),
        );
        assert!(m.contains("partial_rotary_factor"), "{m}");
    }

    #[test]
    fn yarn_defaults_follow_transformers() {
        let r = read(
            json!({"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 512, "rope_theta": 1e6}}),
        )
        .unwrap();
        let Some(RopeScaling::Yarn(y)) = &r.scaling else {
            panic!("{r:?}")
        };
        assert_eq!((y.beta_fast, y.beta_slow, y.truncate), (32.0, 1.0, true));
        assert!((y.attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-12);
        // The highest frequency is extrapolated (unchanged), the lowest interpolated (÷ factor).
        let plain = RopeConfig {
            theta: 1e6,
            scaling: None,
        }
        .inv_freq(64);
        let scaled = r.inv_freq(64);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[31] - plain[31] / 4.0).abs() <= plain[31] * 1e-6);
    }
}
