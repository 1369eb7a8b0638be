//! Log-likelihood scoring and greedy generation on a [`LlamaModel`].

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use super::llama::{LlamaModel, TokenBatch};

/// log p(token | previous tokens) for each selected hidden row, gathered without keeping the
/// full log-softmax around longer than needed.
fn gather_logprobs(model: &LlamaModel, hidden_rows: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    if targets.is_empty() {
        return Ok(vec![]);
    }
    let logits = model.logits(hidden_rows)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    Ok(logp.gather(&idx, 1)?.squeeze(1)?.to_vec1::<f32>()?)
}

/// Per-token log-probabilities of each sequence (entry `i` scores token `i + 1`), computed in
/// right-padded batches.
pub fn sequence_logprobs(
    model: &LlamaModel,
    seqs: &[Vec<u32>],
    pad_id: u32,
) -> Result<Vec<Vec<f32>>> {
    if seqs.iter().any(|s| s.is_empty()) {
        bail!("cannot score an empty sequence");
    }
    let batch = TokenBatch::right_padded(seqs, &vec![0; seqs.len()], pad_id);
    let hidden = model.forward(&batch, None)?;
    let (b, t, h) = hidden.dims3()?;
    let flat = hidden.reshape((b * t, h))?;
    let mut rows = vec![];
    let mut targets = vec![];
    for (r, s) in seqs.iter().enumerate() {
        for i in 0..s.len() - 1 {
            rows.push((r * t + i) as u32);
            targets.push(s[i + 1]);
        }
    }
    let sel = flat.index_select(&Tensor::new(rows.as_slice(), flat.device())?, 0)?;
    let lp = gather_logprobs(model, &sel, &targets)?;
    let mut out = vec![];
    let mut off = 0;
    for s in seqs {
        out.push(lp[off..off + s.len() - 1].to_vec());
        off += s.len() - 1;
    }
    Ok(out)
}

/// Log-probabilities of every continuation token after a shared `prefix`: the prefix is
/// prefilled once, its cache forked, and all continuations run as one batch.
pub fn continuation_logprobs(
    model: &LlamaModel,
    prefix: &[u32],
    continuations: &[Vec<u32>],
    pad_id: u32,
) -> Result<Vec<Vec<f32>>> {
    if prefix.is_empty() {
        bail!("continuation scoring needs a non-empty prefix");
    }
    if continuations.iter().any(|c| c.is_empty()) {
        bail!("cannot score an empty continuation");
    }
    let mut cache = model.new_cache();
    let hidden = model.forward(
        &TokenBatch::right_padded(&[prefix.to_vec()], &[0], pad_id),
        Some(&mut cache),
    )?;
    let last = hidden.narrow(1, prefix.len() - 1, 1)?.reshape((1, ()))?;
    let n = continuations.len();
    let mut cache = cache.fork(n)?;
    let start = vec![prefix.len() as u32; n];
    let batch = TokenBatch::right_padded(continuations, &start, pad_id);
    let hidden = model.forward(&batch, Some(&mut cache))?;
    let (_, t, h) = hidden.dims3()?;
    let flat = hidden.reshape((n * t, h))?;
    let mut rows = vec![];
    let mut targets = vec![];
    for (r, c) in continuations.iter().enumerate() {
        for i in 1..c.len() {
            rows.push((r * t + i - 1) as u32);
            targets.push(c[i]);
        }
    }
    let first_logp = candle_nn::ops::log_softmax(&model.logits(&last)?, D::Minus1)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let first: Vec<f32> = continuations
        .iter()
        .map(|c| first_logp[c[0] as usize])
        .collect();
    let rest = if rows.is_empty() {
        vec![]
    } else {
        let sel = flat.index_select(&Tensor::new(rows.as_slice(), flat.device())?, 0)?;
        gather_logprobs(model, &sel, &targets)?
    };
    let mut out = vec![];
    let mut off = 0;
    for (r, c) in continuations.iter().enumerate() {
        let mut v = vec![first[r]];
        v.extend_from_slice(&rest[off..off + c.len() - 1]);
        off += c.len() - 1;
        out.push(v);
    }
    Ok(out)
}

/// Greedy decoding of a batch of prompts with the KV cache; each row stops at a token of `stop`
/// (which is kept in its output) or after `max_new_tokens`.
pub fn greedy_generate(
    model: &LlamaModel,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    stop: &[u32],
    pad_id: u32,
) -> Result<Vec<Vec<u32>>> {
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("cannot generate from an empty prompt");
    }
    let n = prompts.len();
    let mut out: Vec<Vec<u32>> = vec![vec![]; n];
    let mut done = vec![false; n];
    if max_new_tokens == 0 {
        return Ok(out);
    }
    let mut cache = model.new_cache();
    let batch = TokenBatch::left_padded(prompts, &vec![0; n], pad_id);
    let mut hidden = model.forward(&batch, Some(&mut cache))?;
    loop {
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        let next = model.logits(&last)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (r, &tok) in next.iter().enumerate() {
            if !done[r] {
                out[r].push(tok);
                done[r] = stop.contains(&tok) || out[r].len() >= max_new_tokens;
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(out);
        }
        let positions = cache.next_positions();
        let step = TokenBatch {
            ids: next.iter().map(|&t| vec![t]).collect(),
            positions: positions.iter().map(|&p| vec![p]).collect(),
            valid: vec![vec![true]; n],
            packing: None,
        };
        hidden = model.forward(&step, Some(&mut cache))?;
    }
}
