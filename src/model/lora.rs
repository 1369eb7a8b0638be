//! LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` (r × in) and `.lora_B.weight` (out × r).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::weights::{write_safetensors, SafetensorsFiles};

/// Linear layers a LoRA adapter may target, named as PEFT names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl TargetModule {
    pub const ALL: [TargetModule; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    pub fn peft_name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.peft_name() == name)
            .with_context(|| {
                format!(
                    "unknown LoRA target module `{name}` (known: {})",
                    Self::ALL.map(|m| m.peft_name()).join(", ")
                )
            })
    }

    /// Path of this module inside decoder layer `layer`, as in HF checkpoints.
    pub fn module_path(self, layer: usize) -> String {
        let block = match self {
            Self::QProj | Self::KProj | Self::VProj | Self::OProj => "self_attn",
            _ => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.peft_name())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<TargetModule>,
    pub use_rslora: bool,
}

impl LoraConfig {
    /// PEFT's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// The A/B factors of one adapted linear layer.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    /// Keyed by module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub layers: BTreeMap<String, LoraPair>,
}

#[derive(Serialize, Deserialize)]
struct PeftConfigFile {
    #[serde(default)]
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    task_type: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
}

const PEFT_PREFIX: &str = "base_model.model.";

/// PEFT settings that change the adapted model and that paft does not implement: refused, since
/// ignoring them would give a different model than PEFT's without a word. Absent, `null`,
/// `false` and empty values are PEFT's defaults and pass.
fn unsupported_peft_settings(text: &str) -> Result<()> {
    let raw: serde_json::Value = serde_json::from_str(text)?;
    const KEYS: [(&str, &str); 13] = [
        ("use_dora", "DoRA's magnitude vectors"),
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("modules_to_save", "fully trained extra modules"),
        ("lora_bias", "a bias on lora_B"),
        ("target_parameters", "LoRA on raw parameters"),
        ("use_qalora", "QA-LoRA"),
        ("trainable_token_indices", "trained token embeddings"),
        (
            "alora_invocation_tokens",
            "activated LoRA, applied after its invocation tokens only",
        ),
        ("layer_replication", "replicated decoder layers"),
        ("arrow_config", "Arrow routing between adapters"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("kasa_config", "KaSA's SVD-truncated base"),
    ];
    // These initialisations change the base weights (W minus the initial B·A, or a quantised
    // W): PEFT recomputes that residual when it loads such an adapter, so applying the factors
    // to the original base gives another model. PEFT converts them to plain LoRA at save time
    // with `path_initial_model_for_weight_conversion` (and writes `init_lora_weights: true`).
    if let Some(init) = raw.get("init_lora_weights").and_then(|v| v.as_str()) {
        let lower = init.to_ascii_lowercase();
        let mutates_base = ["pissa", "corda", "olora", "loftq", "lora_ga"]
            .iter()
            .any(|m| lower.starts_with(m));
        if mutates_base {
            bail!(
                "`init_lora_weights` is `{init}`: its factors apply to a residual of the base \
                 that PEFT recomputes on load, not to the base; convert it to plain LoRA with \
                 PEFT's save_pretrained(path_initial_model_for_weight_conversion=…)"
            );
        }
    }
    for (key, what) in KEYS {
        let set = match raw.get(key) {
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => false,
            Some(serde_json::Value::Object(o)) => !o.is_empty(),
            Some(serde_json::Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            bail!("`{key}` is set ({what}); paft applies plain LoRA only");
        }
    }
    Ok(())
}

impl LoraAdapter {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("cannot read LoRA adapter config {}", cfg_path.display()))?;
        let file: PeftConfigFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a PEFT LoRA config", cfg_path.display()))?;
        if let Some(t) = &file.peft_type {
            if t != "LORA" {
                bail!("{}: peft_type `{t}` is not LORA", cfg_path.display());
            }
        }
        unsupported_peft_settings(&text)
            .with_context(|| format!("{}: unsupported adapter", cfg_path.display()))?;
        if file.fan_in_fan_out {
            bail!(
                "{}: fan_in_fan_out adapters (GPT-2 Conv1D) are not supported",
                cfg_path.display()
            );
        }
        if file.bias.as_deref().is_some_and(|b| b != "none") {
            bail!(
                "{}: LoRA bias `{}` is not supported (only `none`)",
                cfg_path.display(),
                file.bias.unwrap()
            );
        }
        // A list names the module kinds; a string is a regular expression PEFT matched
        // against full module paths when it built the adapter (`all-linear` is saved expanded
        // into a list), so the kinds are those of the saved factors, read below.
        let listed: Option<Vec<TargetModule>> = match &file.target_modules {
            serde_json::Value::String(_) => None,
            serde_json::Value::Array(a) => Some(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .context("`target_modules` must hold module names")
                            .and_then(TargetModule::parse)
                    })
                    .collect::<Result<Vec<_>>>()
                    .with_context(|| format!("in {}", cfg_path.display()))?,
            ),
            _ => bail!(
                "{}: `target_modules` must be a list of names or a regular expression",
                cfg_path.display()
            ),
        };
        let weights_path = dir.join("adapter_model.safetensors");
        let files = SafetensorsFiles::open_files(std::slice::from_ref(&weights_path))?;
        let mut layers = BTreeMap::new();
        for name in files.names() {
            let Some(rest) = name.strip_prefix(PEFT_PREFIX) else {
                bail!(
                    "{}: unexpected tensor `{name}` (PEFT keys start with `{PEFT_PREFIX}`)",
                    weights_path.display()
                );
            };
            let Some(module) = rest.strip_suffix(".lora_A.weight") else {
                if rest.ends_with(".lora_B.weight") {
                    continue; // read with its lora_A
                }
                bail!(
                    "{}: tensor `{name}` is not a LoRA factor paft applies (only lora_A/lora_B of linear layers)",
                    weights_path.display()
                );
            };
            let b_name = format!("{PEFT_PREFIX}{module}.lora_B.weight");
            if !files.contains(&b_name) {
                bail!(
                    "{}: `{name}` has no matching `{b_name}`",
                    weights_path.display()
                );
            }
            let a = files.load(&name, Some(dtype), device)?;
            let b = files.load(&b_name, Some(dtype), device)?;
            let (ra, _) = a.dims2()?;
            let (_, rb) = b.dims2()?;
            if ra != file.r || rb != file.r {
                bail!(
                    "{}: `{module}` has rank {ra}/{rb} but the config says r={}",
                    weights_path.display(),
                    file.r
                );
            }
            layers.insert(module.to_string(), LoraPair { a, b });
        }
        if layers.is_empty() {
            bail!("{}: no lora_A/lora_B tensors", weights_path.display());
        }
        // A regular expression: the kinds of the saved factors, in TargetModule::ALL's order
        // (factors of other modules, such as lm_head, still apply).
        let target_modules = listed.unwrap_or_else(|| {
            TargetModule::ALL
                .into_iter()
                .filter(|m| {
                    layers
                        .keys()
                        .any(|k| k.rsplit('.').next() == Some(m.peft_name()))
                })
                .collect()
        });
        let config = LoraConfig {
            r: file.r,
            alpha: file.lora_alpha,
            dropout: file.lora_dropout,
            target_modules,
            use_rslora: file.use_rslora,
        };
        Ok(Self { config, layers })
    }

    pub fn save(&self, dir: &Path, base_model: Option<&str>) -> Result<()> {
        let cfg = PeftConfigFile {
            peft_type: Some("LORA".into()),
            r: self.config.r,
            lora_alpha: self.config.alpha,
            lora_dropout: self.config.dropout,
            target_modules: serde_json::json!(self
                .config
                .target_modules
                .iter()
                .map(|m| m.peft_name())
                .collect::<Vec<_>>()),
            use_rslora: self.config.use_rslora,
            bias: Some("none".into()),
            base_model_name_or_path: base_model.map(String::from),
            task_type: Some("CAUSAL_LM".into()),
            fan_in_fan_out: false,
        };
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&cfg)? + "\n",
        )?;
        let mut tensors = vec![];
        for (module, pair) in &self.layers {
            tensors.push((
                format!("{PEFT_PREFIX}{module}.lora_A.weight"),
                pair.a.clone(),
            ));
            tensors.push((
                format!("{PEFT_PREFIX}{module}.lora_B.weight"),
                pair.b.clone(),
            ));
        }
        write_safetensors(&dir.join("adapter_model.safetensors"), tensors)?;
        Ok(())
    }

    /// The dense delta `scale · B·A` of one module, shaped like its weight (out × in).
    pub fn delta(&self, module: &str) -> Result<Option<Tensor>> {
        let Some(p) = self.layers.get(module) else {
            return Ok(None);
        };
        Ok(Some((p.b.matmul(&p.a)? * self.config.scale())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter() -> LoraAdapter {
        let dev = Device::Cpu;
        let pair = |seed: f32| LoraPair {
            a: Tensor::new(&[[seed, 0.5, -1.0], [0.25, seed, 2.0]], &dev).unwrap(),
            b: Tensor::new(&[[1.0f32, seed], [0.0, -1.0], [seed, 3.0]], &dev).unwrap(),
        };
        LoraAdapter {
            config: LoraConfig {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                target_modules: vec![TargetModule::QProj, TargetModule::DownProj],
                use_rslora: false,
            },
            layers: BTreeMap::from([
                ("model.layers.0.self_attn.q_proj".to_string(), pair(1.0)),
                ("model.layers.1.mlp.down_proj".to_string(), pair(-2.0)),
            ]),
        }
    }

    fn set_targets(dir: &Path, targets: serde_json::Value) {
        let path = dir.join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        cfg["target_modules"] = targets;
        std::fs::write(&path, cfg.to_string()).unwrap();
    }

    /// PEFT saves `target_modules` as a list of names or as the regular expression it was
    /// given; for the latter the saved factors say which modules are adapted.
    #[test]
    fn target_modules_as_a_regular_expression_come_from_the_factors_and_base_changing_settings_are_refused(
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let saved = adapter();
        saved.save(tmp.path(), None).unwrap();
        set_targets(
            tmp.path(),
            serde_json::json!(r".*\.(q_proj|v_proj|down_proj)$"),
        );
        let loaded = LoraAdapter::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            loaded.config.target_modules,
            [TargetModule::QProj, TargetModule::DownProj]
        );
        let module = "model.layers.1.mlp.down_proj";
        let delta = |a: &LoraAdapter| a.delta(module).unwrap().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(delta(&loaded), delta(&saved));

        for (key, value, refused) in [
            (
                "init_lora_weights",
                serde_json::json!("pissa_niter_4"),
                true,
            ),
            ("init_lora_weights", serde_json::json!("olora"), true),
            ("init_lora_weights", serde_json::json!("loftq"), true),
            ("alora_invocation_tokens", serde_json::json!([5, 6]), true),
            (
                "layer_replication",
                serde_json::json!([[0, 1], [0, 2]]),
                true,
            ),
            ("init_lora_weights", serde_json::json!("gaussian"), false),
            ("init_lora_weights", serde_json::json!("orthogonal"), false),
            ("init_lora_weights", serde_json::json!(true), false),
            ("alora_invocation_tokens", serde_json::Value::Null, false),
        ] {
            let path = tmp.path().join("adapter_config.json");
            let mut cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let kept = cfg.clone();
            cfg[key] = value.clone();
            std::fs::write(&path, cfg.to_string()).unwrap();
            let got = LoraAdapter::load(tmp.path(), DType::F32, &Device::Cpu);
            assert_eq!(got.is_err(), refused, "{key} = {value}");
            if let Err(e) = got {
                assert!(format!("{e:#}").contains(key), "{e:#}");
            }
            std::fs::write(&path, kept.to_string()).unwrap();
        }

        set_targets(tmp.path(), serde_json::json!(["q_proj", "lm_head"]));
        let e = format!(
            "{:#}",
            LoraAdapter::load(tmp.path(), DType::F32, &Device::Cpu).unwrap_err()
        );
        assert!(
            e.contains("adapter_config.json") && e.contains("`lm_head`"),
            "{e}"
        );
    }
}
