//! Reading a model reference's weights as f32 tensors, with a PEFT LoRA adapter
//! (`BASE+ADAPTER_DIR`) merged on the fly: what the search, the evaluator and the pipeline load
//! fine-tunes with.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::engine::MergeInput;
use super::ModelRef;
use crate::model::{ModelConfig, WeightMap};

/// The tensors `config` expects, read from `r` as f32 on the CPU (a LoRA adapter reference is
/// merged on the fly).
pub fn load_f32(r: &ModelRef, config: &ModelConfig) -> Result<WeightMap> {
    let input = MergeInput::open(r)?;
    config
        .expected_tensors()
        .into_iter()
        .map(|(n, _)| {
            let shape = input.files().checkpoint.shape(&n)?;
            let values = input.tensor(&n).with_context(|| format!("model {r}"))?;
            let t = Tensor::from_slice(&values, shape, &Device::Cpu)?;
            drop(values);
            input.release(&n)?;
            Ok((n, t))
        })
        .collect()
}
