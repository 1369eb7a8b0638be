//! A Hugging Face model directory: config, tokenizer and weights, validated against each other from
//! headers before any weight data is read, and written back in the same layout.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use super::config::ModelConfig;
use super::gguf::dtype_name;
use super::llama::{LlamaModel, Mode};
use super::lora::LoraAdapter;
use super::tokenizer::ModelTokenizer;
use super::weights::{write_weights, AtomicDir, SafetensorsFiles, WeightMap};

/// Files besides config and weights that travel with a model.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Copies whichever of [`TOKENIZER_FILES`] `from` has into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for file in TOKENIZER_FILES {
        let src = from.join(file);
        if src.is_file() {
            std::fs::copy(&src, to.join(file))
                .with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    Ok(())
}

/// A model directory's contents in memory.
pub struct Pretrained {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: ModelTokenizer,
    pub weights: WeightMap,
}

/// Config, tokenizer and checkpoint headers of a model directory, checked for consistency.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// Absent in weight-only directories (enough for merging, not for running).
    pub tokenizer: Option<ModelTokenizer>,
    pub checkpoint: SafetensorsFiles,
}

impl ModelFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(ModelTokenizer::load_dir(dir)?)
        } else {
            None
        };
        let checkpoint = SafetensorsFiles::open_dir(dir)?;
        for (name, shape) in config.expected_tensors() {
            if !checkpoint.contains(&name) {
                bail!("{}: the checkpoint has no tensor `{name}`", dir.display());
            }
            let got = checkpoint.shape(&name)?;
            if got != shape {
                bail!(
                    "{}: tensor `{name}` has shape {got:?} but config.json implies {shape:?}",
                    checkpoint.file_of(&name)?.display()
                );
            }
        }
        let rows = checkpoint.shape("model.embed_tokens.weight")?[0];
        if let Some(tokenizer) = tokenizer.as_ref().filter(|t| t.id_bound() > rows) {
            let bound = tokenizer.id_bound();
            bail!(
                "{}: the tokenizer has ids up to {} but the embedding model.embed_tokens.weight has only {rows} rows \
                 (tokenizer and weights belong to different models)",
                tokenizer.path().display(),
                bound - 1
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tokenizer,
            checkpoint,
        })
    }

    /// Every tensor the config expects, converted to `dtype` (default: as stored); enough to
    /// run the model without a tokenizer.
    pub fn load_weights(&self, dtype: Option<DType>, device: &Device) -> Result<WeightMap> {
        let mut weights = WeightMap::new();
        for (name, _) in self.config.expected_tensors() {
            let t = self.checkpoint.load(&name, dtype, device)?;
            weights.insert(name, t);
        }
        Ok(weights)
    }

    /// Reads every tensor the config expects, converted to `dtype` (default: as stored).
    pub fn load(self, dtype: Option<DType>, device: &Device) -> Result<Pretrained> {
        let weights = self.load_weights(dtype, device)?;
        let tokenizer = match self.tokenizer {
            Some(t) => t,
            None => ModelTokenizer::load_dir(&self.dir)?, // fails naming the missing file
        };
        Ok(Pretrained {
            dir: self.dir,
            config: self.config,
            tokenizer,
            weights,
        })
    }
}

impl Pretrained {
    pub fn load(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<Self> {
        ModelFiles::open(dir)?.load(dtype, device)
    }

    pub fn model(&self, mode: Mode, lora: Option<&LoraAdapter>) -> Result<LlamaModel> {
        LlamaModel::from_weights(&self.config, &self.weights, lora, mode)
            .with_context(|| format!("model {}", self.dir.display()))
    }

    /// The inference model with stacked projections ([`LlamaModel::from_weights_stacked`]);
    /// this checkpoint's weights then share the model's storage.
    pub fn inference_model(&mut self) -> Result<LlamaModel> {
        LlamaModel::from_weights_stacked(&self.config, &mut self.weights)
            .with_context(|| format!("model {}", self.dir.display()))
    }

    /// Writes config, tokenizer files and weights (converted to `dtype` when given, sharded at
    /// `max_shard_bytes`) as a new directory `out`, which appears only when complete.
    pub fn save(&self, out: &Path, dtype: Option<DType>, max_shard_bytes: usize) -> Result<()> {
        let dir = AtomicDir::new(out)?;
        let mut config = self.config.clone();
        if let Some(d) = dtype {
            config.set_dtype(dtype_name(d));
        }
        config.write(&dir.path().join("config.json"))?;
        copy_tokenizer_files(&self.dir, dir.path())?;
        write_weights(dir.path(), &self.weights, dtype, max_shard_bytes)?;
        dir.commit()?;
        Ok(())
    }

    /// Token ids that end generation: the tokenizer's EOS plus the config's `eos_token_id`s.
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut ids = self.config.eos_token_ids.clone();
        ids.extend(self.tokenizer.eos_token_id());
        ids.sort();
        ids.dedup();
        ids
    }

    pub fn pad_token_id(&self) -> u32 {
        self.tokenizer
            .pad_token_id()
            .or(self.config.pad_token_id)
            .or(self.tokenizer.eos_token_id())
            .unwrap_or(0)
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .with_context(|| format!("bad device `{s}` (expected cpu or cuda:N)"))?
                .unwrap_or(0);
            Device::new_cuda(ordinal).with_context(|| {
                format!("cannot open {s}; paft must be built with `--features cuda` and a CUDA GPU must be present")
            })
        }
        other => bail!("unknown device `{other}` (expected cpu or cuda:N)"),
    }
}

pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f64" | "float64" => Ok(DType::F64),
        other => bail!("unknown dtype `{other}` (expected f32, bf16, f16)"),
    }
}
