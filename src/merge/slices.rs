//! `slices:` merges (mergekit's frankenmerges): the output's decoder layers are taken slice
//! after slice, each output layer merged from the same relative layer of every source of its
//! slice; the tensors before the layers (embeddings) come from the first slice's sources, those
//! after (final norm, head) from the last slice's, as mergekit's planner does. The layer count
//! in config.json becomes the sum of the slices' lengths. A method with a base_model (TIES,
//! task arithmetic, …) takes each slice's θ₀ from the source that is the base (the slice's own
//! `base_model`, else the config's), as mergekit does.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::config::MergeConfig;
use super::engine::{
    distinct_inputs, merge_at_into, merge_in_windows, output_dtype, write_tokenizer, MergeInput,
    MergeOptions, Windows,
};
use crate::model::weights::{AtomicDir, PlannedTensor, ShardedWriter};

/// One output tensor: which slice's view merges it, the input name in each source, and its
/// position in the slice (layer index, slice length) for layer gradients.
struct Planned {
    out: String,
    view: usize,
    inputs: Vec<String>,
    position: Option<(usize, usize)>,
}

/// `model.layers.N.rest` → (N, rest).
fn split_layer(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (n, tail) = rest.split_once('.')?;
    Some((n.parse().ok()?, tail))
}

fn plan(config: &MergeConfig, names: &[String]) -> Vec<Planned> {
    let suffixes: Vec<&str> = names
        .iter()
        .filter_map(|n| split_layer(n).filter(|(l, _)| *l == 0).map(|(_, s)| s))
        .collect();
    let outside = |pre: bool| {
        names
            .iter()
            .filter(move |n| split_layer(n).is_none())
            .filter(move |n| n.starts_with("model.embed_tokens.") == pre)
    };
    let n_sources = |v: usize| config.slices[v].sources.len();
    let last = config.slices.len() - 1;
    let mut out: Vec<Planned> = outside(true)
        .map(|n| Planned {
            out: n.clone(),
            view: 0,
            inputs: vec![n.clone(); n_sources(0)],
            position: None,
        })
        .collect();
    let mut layer = 0;
    for (v, slice) in config.slices.iter().enumerate() {
        for idx in 0..slice.len() {
            for suffix in &suffixes {
                out.push(Planned {
                    out: format!("model.layers.{layer}.{suffix}"),
                    view: v,
                    inputs: slice
                        .sources
                        .iter()
                        .map(|s| format!("model.layers.{}.{suffix}", s.start + idx))
                        .collect(),
                    position: Some((idx, slice.len())),
                });
            }
            layer += 1;
        }
    }
    out.extend(outside(false).map(|n| Planned {
        out: n.clone(),
        view: last,
        inputs: vec![n.clone(); n_sources(last)],
        position: None,
    }));
    out
}

/// Every source has every input tensor, with one shape per output tensor; from headers only.
fn check_headers(
    config: &MergeConfig,
    inputs: &BTreeMap<String, MergeInput>,
    planned: &[Planned],
) -> Result<Vec<Vec<usize>>> {
    planned
        .iter()
        .map(|p| {
            let mut shape: Option<Vec<usize>> = None;
            for (src, name) in config.slices[p.view].sources.iter().zip(&p.inputs) {
                let files = inputs[&src.model.to_string()].files();
                if !files.checkpoint.contains(name) {
                    bail!("model {}: missing tensor `{name}` (for output `{}`)", src.model, p.out);
                }
                let s = files.checkpoint.shape(name)?;
                match &shape {
                    Some(first) if *first != s => bail!(
                        "model {}: tensor `{name}` has shape {s:?}, other sources of `{}` have {first:?}",
                        src.model,
                        p.out
                    ),
                    _ => shape = Some(s),
                }
            }
            shape.context("a slice without sources")
        })
        .collect()
}

/// Runs a `slices:` config into the new directory `out`.
pub(crate) fn run_slices(config: &MergeConfig, out: &Path, opts: &MergeOptions) -> Result<PathBuf> {
    let mut inputs = BTreeMap::new();
    for s in config.slices.iter().flat_map(|s| &s.sources) {
        if let Entry::Vacant(slot) = inputs.entry(s.model.to_string()) {
            slot.insert(MergeInput::open(&s.model)?); // each model opened once
        }
    }
    let first = config.slices[0].sources[0].model.to_string();
    let ref_files = inputs[&first].files();
    let names = ref_files.checkpoint.names();
    let planned = plan(config, &names);
    let shapes = check_headers(config, &inputs, &planned)?;
    let views = config.slice_views();
    // Every parameter resolves for every output tensor before any weight is read.
    for p in &planned {
        let (layer, n) = p.position.map_or((None, 1), |(i, n)| (Some(i), n));
        views[p.view].model_params(&p.out, layer, n)?;
        views[p.view].global_params(&p.out, layer, n)?;
    }
    let out_dtype = output_dtype(config, ref_files, &names[0])?;
    let total: usize = config.slices.iter().map(|s| s.len()).sum();
    let mut cfg = ref_files.config.clone();
    if cfg.raw.get("layer_types").is_some_and(|v| !v.is_null()) {
        bail!("model {first}: `slices:` on a config with per-layer `layer_types` is not supported yet");
    }
    cfg.raw["num_hidden_layers"] = serde_json::json!(total);
    cfg.set_dtype(crate::model::gguf::dtype_name(out_dtype));

    let dir = AtomicDir::new(out)?;
    cfg.write(&dir.path().join("config.json"))?;
    // A base that is no slice's source is not read (the slices' bases are sources).
    let labels = config.base_model.iter().map(ToString::to_string).chain(
        config
            .slices
            .iter()
            .flat_map(|s| &s.sources)
            .map(|s| s.model.to_string()),
    );
    let named = labels.filter_map(|name| inputs.get(&name).map(|i| (name, i.files())));
    write_tokenizer(
        config,
        &distinct_inputs(named),
        &ref_files.dir,
        &first,
        dir.path(),
    )?;
    std::fs::write(dir.path().join("mergekit_config.yml"), &config.source)?;
    let plan = planned
        .iter()
        .zip(&shapes)
        .map(|(p, shape)| PlannedTensor {
            name: p.out.clone(),
            dtype: out_dtype,
            shape: shape.clone(),
        })
        .collect();
    let mut writer = ShardedWriter::new(dir.path(), opts.max_shard_bytes, plan)?;
    let bar = crate::progress::bar(planned.len() as u64, "merging");
    let jobs: Vec<(&Planned, &Vec<usize>)> = planned.iter().zip(&shapes).collect();
    // Slices merge whole tensors (no block-wise path yet).
    let windows = Windows {
        streams: &|_: &(&Planned, &Vec<usize>)| false,
        stream: |_: &(&Planned, &Vec<usize>), _: &mut ShardedWriter| -> Result<()> {
            unreachable!("no slice tensor streams")
        },
    };
    merge_in_windows(
        &jobs,
        |(p, _)| p.out.as_str(),
        &mut writer,
        &bar,
        windows,
        |(p, shape), out, scratch| {
            let sources: Vec<(&MergeInput, &String)> = config.slices[p.view]
                .sources
                .iter()
                .zip(&p.inputs)
                .map(|(s, name)| (&inputs[&s.model.to_string()], name))
                .collect();
            let values = sources
                .iter()
                .map(|(input, name)| input.tensor(name))
                .collect::<Result<Vec<_>>>()?;
            // A method with a base takes the base's source as θ₀ and merges the others.
            let view = &views[p.view];
            let base_at = view
                .method
                .uses_base()
                .then(|| {
                    config.slices[p.view]
                        .sources
                        .iter()
                        .position(|s| Some(&s.model) == view.base_model.as_ref())
                })
                .flatten();
            let base = base_at.map(|i| &*values[i]);
            let models: Vec<&[f32]> = values
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != base_at)
                .map(|(_, v)| &**v)
                .collect();
            let (layer, n) = p.position.map_or((None, 1), |(i, n)| (Some(i), n));
            out.resize(shape.iter().product(), 0.0);
            merge_at_into(
                view, &p.out, base, models, shape, layer, n, opts.seed, out, scratch,
            )?;
            for (input, name) in &sources {
                input.release(name)?;
            }
            Ok(())
        },
    )?;
    writer.finish()?;
    bar.finish_and_clear();
    dir.commit()
}
