//! Streaming execution of a merge config: every input is validated from headers first, then
//! tensors are merged in parallel (rayon, a bounded window at a time) and streamed into shards of
//! a directory that appears only when complete.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;

use super::blocks::{merge_in_blocks, merges_in_blocks, BlockInputs, StoredValues};
use super::chat_template;
use super::config::{MergeConfig, ModelRef};
use super::methods::{merge_tensor_into, MergeScratch, TensorInputs};
use super::tokenizer_source;
use crate::model::pretrained::copy_tokenizer_files;
use crate::model::weights::{parse_size, AtomicDir, PlannedTensor, ShardedWriter};
use crate::model::{parse_dtype, source, LoraAdapter, ModelFiles};

/// One merge input: a full model, or a base with a LoRA adapter whose delta is formed per tensor.
pub enum MergeInput {
    Full(ModelFiles),
    Adapter {
        base: ModelFiles,
        adapter: LoraAdapter,
        name: String,
    },
}

impl MergeInput {
    pub fn open(r: &ModelRef) -> Result<Self> {
        let dir = source::resolve_model(&r.model, r.revision.as_deref())?;
        let files = ModelFiles::open(&dir).with_context(|| format!("model {r}"))?;
        match &r.lora {
            None => Ok(Self::Full(files)),
            Some(lora) => {
                let adapter = LoraAdapter::load(Path::new(lora), DType::F32, &Device::Cpu)
                    .with_context(|| format!("model {r}: unreadable LoRA adapter {lora}"))?;
                for (module, pair) in &adapter.layers {
                    let name = format!("{module}.weight");
                    if !files.checkpoint.contains(&name) {
                        bail!("model {r}: the adapter targets `{module}`, which the base has no weight for");
                    }
                    let shape = files.checkpoint.shape(&name)?;
                    if shape != [pair.b.dim(0)?, pair.a.dim(1)?] {
                        bail!("model {r}: adapter `{module}` (B·A {}×{}) does not fit weight {shape:?}", pair.b.dim(0)?, pair.a.dim(1)?);
                    }
                }
                Ok(Self::Adapter {
                    base: files,
                    adapter,
                    name: r.to_string(),
                })
            }
        }
    }

    pub fn files(&self) -> &ModelFiles {
        match self {
            Self::Full(f) | Self::Adapter { base: f, .. } => f,
        }
    }

    /// The tensor θ as f32 values (base + s·B·A for an adapter): read in place from the
    /// file when it stores f32, else converted. [`Self::release`] it once merged.
    pub fn tensor(&self, name: &str) -> Result<Cow<'_, [f32]>> {
        let load = |f: &ModelFiles| -> Result<Tensor> {
            f.checkpoint.load(name, Some(DType::F32), &Device::Cpu)
        };
        let t = match self {
            Self::Full(f) => match f.checkpoint.f32_slice(name)? {
                Some(values) => return Ok(Cow::Borrowed(values)),
                None => load(f)?,
            },
            Self::Adapter {
                base,
                adapter,
                name: label,
            } => {
                let w = load(base)?;
                match name
                    .strip_suffix(".weight")
                    .map(|m| adapter.delta(m))
                    .transpose()?
                    .flatten()
                {
                    Some(d) => {
                        (w + d).with_context(|| format!("model {label}: tensor `{name}`"))?
                    }
                    None => w,
                }
            }
        };
        Ok(Cow::Owned(t.flatten_all()?.to_vec1::<f32>()?))
    }

    /// Drops the pages of a tensor read in place from this process's resident set.
    pub fn release(&self, name: &str) -> Result<()> {
        self.files().checkpoint.release(name)
    }
}

/// Per-tensor random stream, derived from the seed, the tensor name and the model index, so the
/// output does not depend on thread count or scheduling.
pub fn tensor_rng(seed: u64, tensor: &str, model: usize) -> StdRng {
    // FNV-1a: a stable hash (std's hasher may change between Rust versions).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in tensor
        .as_bytes()
        .iter()
        .chain(&(model as u64).to_le_bytes())
    {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    StdRng::seed_from_u64(seed ^ h)
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The merge's output dtype: `out_dtype` (or `dtype`) as the YAML says, else the reference
/// model's, read from its first tensor.
pub(crate) fn output_dtype(
    config: &MergeConfig,
    ref_files: &ModelFiles,
    first_tensor: &str,
) -> Result<DType> {
    Ok(
        match config.out_dtype.as_deref().or(config.dtype.as_deref()) {
            Some(d) => parse_dtype(d.trim_start_matches("torch."))?,
            None => ref_files
                .checkpoint
                .load(first_tensor, None, &Device::Cpu)?
                .dtype(),
        },
    )
}

pub struct MergeOptions {
    pub seed: u64,
    pub max_shard_bytes: usize,
    /// Tensors of more entries than this merge a block of this many entries at a time, when
    /// their method can (the task-arithmetic family; see `blocks`).
    pub block_entries: usize,
}

/// 16M entries: 64 MB per f32 block.
pub const DEFAULT_BLOCK_ENTRIES: usize = 16 << 20;

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            max_shard_bytes: parse_size("5GB").expect("constant"),
            block_entries: DEFAULT_BLOCK_ENTRIES,
        }
    }
}

/// Merges one tensor as `config` says; shared by the streaming engine and in-memory merging.
pub fn merge_one(
    config: &MergeConfig,
    name: &str,
    base: Option<&[f32]>,
    models: Vec<&[f32]>,
    shape: &[usize],
    num_layers: usize,
    seed: u64,
) -> Result<Vec<f32>> {
    let layer = layer_of(name);
    merge_at(config, name, base, models, shape, layer, num_layers, seed)
}

/// [`merge_one`] into `out`, with reusable buffers.
#[allow(clippy::too_many_arguments)]
pub fn merge_one_into(
    config: &MergeConfig,
    name: &str,
    base: Option<&[f32]>,
    models: Vec<&[f32]>,
    shape: &[usize],
    num_layers: usize,
    seed: u64,
    out: &mut [f32],
    scratch: &mut MergeScratch,
) -> Result<()> {
    let layer = layer_of(name);
    merge_at_into(
        config, name, base, models, shape, layer, num_layers, seed, out, scratch,
    )
}

/// `merge_one` at an explicit position in the layer stack (a slice's own, for `slices:`).
#[allow(clippy::too_many_arguments)] // the tensor's data plus where it sits; a struct adds nothing
pub(crate) fn merge_at(
    config: &MergeConfig,
    name: &str,
    base: Option<&[f32]>,
    models: Vec<&[f32]>,
    shape: &[usize],
    layer: Option<usize>,
    num_layers: usize,
    seed: u64,
) -> Result<Vec<f32>> {
    let n = base.or(models.first().copied()).map_or(0, <[f32]>::len);
    let mut out = vec![0f32; n];
    merge_at_into(
        config,
        name,
        base,
        models,
        shape,
        layer,
        num_layers,
        seed,
        &mut out,
        &mut MergeScratch::default(),
    )?;
    Ok(out)
}

/// [`merge_at`] into `out`, with reusable buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_at_into(
    config: &MergeConfig,
    name: &str,
    base: Option<&[f32]>,
    models: Vec<&[f32]>,
    shape: &[usize],
    layer: Option<usize>,
    num_layers: usize,
    seed: u64,
    out: &mut [f32],
    scratch: &mut MergeScratch,
) -> Result<()> {
    let input = TensorInputs {
        name,
        base,
        models,
        params: config.model_params(name, layer, num_layers)?,
        row_len: *shape.last().unwrap_or(&1),
        ndim: shape.len(),
    };
    let global = config.global_params(name, layer, num_layers)?;
    merge_tensor_into(
        config.method,
        &global,
        &input,
        |i| tensor_rng(seed, name, i),
        out,
        scratch,
    )
    .with_context(|| format!("tensor `{name}`"))
}

/// Every input once, base first, in config order: mergekit's referenced models (a set), whose
/// tokenizers a tokenizer source checks and whose templates `chat_template: auto` counts. A
/// base that is also listed among the models counts once.
pub(super) fn distinct_inputs<'a>(
    named: impl IntoIterator<Item = (String, &'a ModelFiles)>,
) -> Vec<tokenizer_source::Input<'a>> {
    let mut inputs: Vec<tokenizer_source::Input> = vec![];
    for (label, files) in named {
        if !inputs.iter().any(|i| i.label == label) {
            inputs.push(tokenizer_source::Input { label, files });
        }
    }
    inputs
}

/// The output's tokenizer files: the donor's (the reference model's, at `reference`, unless a
/// tokenizer source names another), given the configured chat template.
pub(super) fn write_tokenizer(
    config: &MergeConfig,
    inputs: &[tokenizer_source::Input],
    reference: &Path,
    ref_label: &str,
    out: &Path,
) -> Result<()> {
    let donor = match &config.tokenizer_source {
        Some(source) => tokenizer_source::donor(source, config.pad_to_multiple_of, inputs)?,
        None => reference.to_path_buf(),
    };
    copy_tokenizer_files(&donor, out)?;
    if let Some(template) = &config.chat_template {
        let sources: Vec<&Path> = inputs.iter().map(|i| i.files.dir.as_path()).collect();
        chat_template::apply(template, &sources, out)
            .with_context(|| format!("chat_template (tokenizer files from {ref_label})"))?;
    }
    Ok(())
}

/// Runs `config` into the new directory `out`.
pub fn run_merge(config: &MergeConfig, out: &Path, opts: &MergeOptions) -> Result<PathBuf> {
    if !config.slices.is_empty() {
        return super::slices::run_slices(config, out, opts);
    }
    let base = config
        .base_model
        .as_ref()
        .map(MergeInput::open)
        .transpose()?;
    let models = config
        .models
        .iter()
        .map(|e| MergeInput::open(&e.model))
        .collect::<Result<Vec<_>>>()?;
    let reference = base.as_ref().unwrap_or(&models[0]);
    let ref_label = config
        .base_model
        .as_ref()
        .unwrap_or(&config.models[0].model)
        .to_string();
    let ref_files = reference.files();
    let names = ref_files.checkpoint.names();
    // Everything checkable from headers, before any weight is read.
    let ref_vocab = ref_files.config.vocab_size;
    for (input, entry) in models.iter().zip(&config.models) {
        let f = input.files();
        if f.config.architecture != ref_files.config.architecture {
            bail!(
                "model {}: architecture {} differs from {ref_label}'s {}",
                entry.model,
                f.config.architecture.as_str(),
                ref_files.config.architecture.as_str()
            );
        }
        if f.config.vocab_size != ref_vocab {
            bail!(
                "model {}: vocab_size {} differs from {ref_label}'s {ref_vocab}",
                entry.model,
                f.config.vocab_size
            );
        }
        for name in &names {
            if !f.checkpoint.contains(name) {
                bail!("model {}: missing tensor `{name}`", entry.model);
            }
            let (a, b) = (f.checkpoint.shape(name)?, ref_files.checkpoint.shape(name)?);
            if a != b {
                bail!(
                    "model {}: tensor `{name}` has shape {a:?}, {ref_label} has {b:?}",
                    entry.model
                );
            }
        }
    }
    let num_layers = ref_files.config.num_hidden_layers;
    for name in &names {
        config.model_params(name, layer_of(name), num_layers)?;
        config.global_params(name, layer_of(name), num_layers)?;
    }
    let out_dtype = output_dtype(config, ref_files, &names[0])?;

    let dir = AtomicDir::new(out)?;
    let mut cfg = ref_files.config.clone();
    cfg.set_dtype(crate::model::gguf::dtype_name(out_dtype));
    cfg.write(&dir.path().join("config.json"))?;
    let labels = config
        .base_model
        .iter()
        .chain(config.models.iter().map(|e| &e.model));
    let inputs = distinct_inputs(
        labels
            .zip(base.iter().chain(&models))
            .map(|(r, m)| (r.to_string(), m.files())),
    );
    write_tokenizer(config, &inputs, &ref_files.dir, &ref_label, dir.path())?;
    std::fs::write(dir.path().join("mergekit_config.yml"), &config.source)?;

    let plan = names
        .iter()
        .map(|name| {
            Ok(PlannedTensor {
                name: name.clone(),
                dtype: out_dtype,
                shape: ref_files.checkpoint.shape(name)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut writer = ShardedWriter::new(dir.path(), opts.max_shard_bytes, plan)?;
    let bar = crate::progress::bar(names.len() as u64, "merging");
    // Methods that merge the base like any other model have it among `models`.
    let base_input = base.as_ref().filter(|_| config.method.uses_base());
    let all_inputs: Vec<&MergeInput> = base_input.into_iter().chain(&models).collect();
    // A large tensor whose method merges entry by entry streams a block at a time straight
    // from the inputs' mappings to the writer.
    let large = |name: &str| {
        ref_files
            .checkpoint
            .shape(name)
            .is_ok_and(|s| s.iter().product::<usize>() > opts.block_entries)
    };
    let streams = |name: &String| {
        large(name)
            && block_inputs(config, name, num_layers, base_input, &models)
                .is_ok_and(|b| b.is_some())
    };
    let stream = |name: &String, writer: &mut ShardedWriter| -> Result<()> {
        let inputs = block_inputs(config, name, num_layers, base_input, &models)?
            .expect("checked by `streams`");
        let global = config.global_params(name, layer_of(name), num_layers)?;
        merge_in_blocks(
            config.method,
            &global,
            &inputs,
            |i| tensor_rng(opts.seed, name, i),
            opts.block_entries,
            |block| writer.write_f32(name, block),
        )
        .with_context(|| format!("tensor `{name}`"))
    };
    let windows = Windows {
        streams: &streams,
        stream,
    };
    merge_in_windows(
        &names,
        |n| n.as_str(),
        &mut writer,
        &bar,
        windows,
        |name, out, scratch| {
            let base_values = base_input.map(|b| b.tensor(name)).transpose()?;
            let model_values = models
                .iter()
                .map(|m| m.tensor(name))
                .collect::<Result<Vec<_>>>()?;
            let shape = ref_files.checkpoint.shape(name)?;
            out.resize(shape.iter().product(), 0.0);
            let inputs: Vec<&[f32]> = model_values.iter().map(|v| &**v).collect();
            merge_one_into(
                config,
                name,
                base_values.as_deref(),
                inputs,
                &shape,
                num_layers,
                opts.seed,
                out,
                scratch,
            )?;
            for input in &all_inputs {
                input.release(name)?;
            }
            Ok(())
        },
    )?;
    writer.finish()?;
    dir.commit()
}

/// The inputs of tensor `name` read block-wise from the checkpoints' mappings, when its method
/// merges entry by entry and every input is a full checkpoint stored as f32, bf16 or f16.
fn block_inputs<'a>(
    config: &MergeConfig,
    name: &'a str,
    num_layers: usize,
    base: Option<&'a MergeInput>,
    models: &'a [MergeInput],
) -> Result<Option<BlockInputs<'a>>> {
    let layer = layer_of(name);
    let params = config.model_params(name, layer, num_layers)?;
    let global = config.global_params(name, layer, num_layers)?;
    let Some(MergeInput::Full(b)) = base else {
        return Ok(None);
    };
    if !merges_in_blocks(config.method, &global, &params) {
        return Ok(None);
    }
    let Some(base_values) = StoredValues::open(&b.checkpoint, name)? else {
        return Ok(None);
    };
    let mut model_values = vec![];
    for m in models {
        let MergeInput::Full(f) = m else {
            return Ok(None);
        };
        match StoredValues::open(&f.checkpoint, name)? {
            Some(v) => model_values.push(v),
            None => return Ok(None),
        }
    }
    Ok(Some(BlockInputs {
        name,
        base: base_values,
        models: model_values,
        params,
    }))
}

/// Which jobs bypass the windows, and how: merged block by block straight into the writer.
pub(crate) struct Windows<'a, J, S> {
    pub streams: &'a (dyn Fn(&J) -> bool + Sync),
    pub stream: S,
}

/// Merges the tensors `jobs` names (in order) a window of threads at a time into the writer,
/// each slot reusing its output and scratch buffers from window to window: memory is bounded
/// by a window of tensors and no fresh pages are touched once the largest tensor has been seen.
/// Jobs that `windows.streams` picks are merged on their own by `windows.stream`.
pub(crate) fn merge_in_windows<J: Sync, S>(
    jobs: &[J],
    name_of: impl Fn(&J) -> &str,
    writer: &mut ShardedWriter,
    bar: &indicatif::ProgressBar,
    mut windows: Windows<'_, J, S>,
    merge: impl Fn(&J, &mut Vec<f32>, &mut MergeScratch) -> Result<()> + Sync,
) -> Result<()>
where
    S: FnMut(&J, &mut ShardedWriter) -> Result<()>,
{
    let window = rayon::current_num_threads().max(1);
    let mut slots: Vec<(Vec<f32>, MergeScratch)> =
        (0..window).map(|_| Default::default()).collect();
    let mut i = 0;
    while i < jobs.len() {
        if (windows.streams)(&jobs[i]) {
            (windows.stream)(&jobs[i], writer)?;
            bar.inc(1);
            i += 1;
            continue;
        }
        let end = (i..jobs.len())
            .take(window)
            .take_while(|&j| j == i || !(windows.streams)(&jobs[j]))
            .last()
            .map_or(i + 1, |j| j + 1);
        let chunk = &jobs[i..end];
        slots[..chunk.len()]
            .par_iter_mut()
            .zip(chunk)
            .map(|((out, scratch), job)| merge(job, out, scratch))
            .collect::<Result<()>>()?;
        for (job, (out, _)) in chunk.iter().zip(&slots) {
            writer.write_f32(name_of(job), out)?;
            bar.inc(1);
        }
        i = end;
    }
    bar.finish_and_clear();
    Ok(())
}
