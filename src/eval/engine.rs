//! The scoring engine. lm-eval runs every (context, continuation) pair as its own sequence; here
//! each piece of shared text is run once: a prefix shared by all documents of a task (MMLU's
//! description and shots, TruthfulQA's primer) is prefilled once, each document's context once
//! on top of it, and the choices' continuations as one batch from a fork of that cache. The
//! vocabulary projection runs only at the positions whose log-probabilities are needed.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

use super::tokenize::{TokenizedChoices, TokenizedGeneration};
use crate::model::{KvCache, LlamaModel, ModelTokenizer, TokenBatch};

/// Tokens per forward when prefilling: long prefixes go through in chunks so the attention
/// matrices stay cache-sized (measured 30% faster at 1.2k tokens than one pass); the result is the
/// same, as each query attends to the same keys.
const PREFILL_CHUNK: usize = 128;

/// Runs `batch` through the model in chunks of at most `PREFILL_CHUNK` time steps, appending to
/// `cache`; returns the hidden state of each row's last column `(b, hidden)`.
fn forward_in_chunks(
    model: &LlamaModel,
    batch: &TokenBatch,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let t = batch.seq_len();
    let mut last = None;
    let mut start = 0;
    while start < t {
        let end = (start + PREFILL_CHUNK).min(t);
        let cols = |rows: &[Vec<u32>]| rows.iter().map(|r| r[start..end].to_vec()).collect();
        let chunk = TokenBatch {
            ids: cols(&batch.ids),
            positions: cols(&batch.positions),
            valid: batch.valid.iter().map(|r| r[start..end].to_vec()).collect(),
        };
        let hidden = model.forward(&chunk, Some(cache))?;
        last = Some(hidden.narrow(1, end - start - 1, 1)?.squeeze(1)?);
        start = end;
    }
    last.ok_or_else(|| anyhow::anyhow!("empty batch"))
}

/// A prefilled token prefix: its KV cache and the hidden state of its last token.
#[derive(Clone)]
pub struct Prefilled {
    cache: KvCache,
    last_hidden: Option<Tensor>,
    len: usize,
}

impl Prefilled {
    pub fn empty(model: &LlamaModel) -> Self {
        Self {
            cache: model.new_cache(),
            last_hidden: None,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Extends `base` (batch 1) by `tokens[base.len()..]`.
pub fn prefill(
    model: &LlamaModel,
    base: &Prefilled,
    tokens: &[u32],
    pad_id: u32,
) -> Result<Prefilled> {
    if tokens.len() < base.len {
        bail!(
            "prefix of {} tokens is shorter than its base of {}",
            tokens.len(),
            base.len
        );
    }
    if tokens.len() == base.len {
        return Ok(base.clone());
    }
    let mut cache = base.cache.clone();
    let batch =
        TokenBatch::right_padded(&[tokens[base.len..].to_vec()], &[base.len as u32], pad_id);
    let last_hidden = forward_in_chunks(model, &batch, &mut cache)?;
    Ok(Prefilled {
        cache,
        last_hidden: Some(last_hidden),
        len: tokens.len(),
    })
}

/// The longest prefix of a document's requests that can be prefilled once: shared by every
/// request and ending no later than the token before each request's first scored token.
pub fn document_prefix_len(doc: &TokenizedChoices) -> usize {
    (0..doc.len())
        .map(|i| doc.total_len(i) - doc.continuation_lens[i])
        .min()
        .unwrap_or(0)
        .min(doc.shared.len())
}

/// What the model was run on: tokens prefilled (every position a forward pass computed, padding
/// excluded) and tokens generated. Per task, [`TokenWork::saved`] is what prefix sharing spared
/// against running every request's input on its own, as lm-eval does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenWork {
    pub prefilled: u64,
    pub generated: u64,
    pub saved: u64,
}

impl std::ops::AddAssign for TokenWork {
    fn add_assign(&mut self, o: Self) {
        self.prefilled += o.prefilled;
        self.generated += o.generated;
        self.saved += o.saved;
    }
}

/// Summed log-likelihood and is-greedy of every request of a document, continuing from `base`
/// (a prefix of every request's tokens, or empty), and the tokens prefilled for it.
pub fn score_choices(
    model: &LlamaModel,
    base: &Prefilled,
    doc: &TokenizedChoices,
    pad_id: u32,
) -> Result<(Vec<(f64, bool)>, u64)> {
    for i in 0..doc.len() {
        if doc.total_len(i) <= doc.continuation_lens[i] {
            bail!("request {i} has no context tokens before its continuation");
        }
    }
    let p = document_prefix_len(doc);
    let prefix = prefill(model, base, &doc.shared[..p], pad_id)?;
    let mut prefilled = p.saturating_sub(base.len) as u64;

    // Each request's input is its tokens without the last; the remainder after the prefix runs
    // as one right-padded batch.
    let mut rows = vec![];
    let mut remainder_row = vec![None; doc.len()];
    for i in 0..doc.len() {
        let tokens = doc.tokens(i);
        let input_len = tokens.len() - 1;
        if input_len > p {
            remainder_row[i] = Some(rows.len());
            rows.push(tokens[p..input_len].to_vec());
            prefilled += (input_len - p) as u64;
        }
    }
    let (remainder, t) = if rows.is_empty() {
        (None, 0)
    } else {
        let mut cache = match prefix.len {
            0 => model.new_cache(),
            _ if rows.len() == 1 => prefix.cache.clone(),
            _ => prefix.cache.fork(rows.len())?,
        };
        let batch = TokenBatch::right_padded(&rows, &vec![p as u32; rows.len()], pad_id);
        let hidden = model.forward(&batch, Some(&mut cache))?;
        let (b, t, h) = hidden.dims3()?;
        (Some(hidden.reshape((b * t, h))?), t)
    };

    // Gather the hidden state before every scored token: row 0 is the prefix's last token,
    // row 1 + r*t + j is position p + j of remainder row r.
    let mut picks = vec![];
    let mut targets = vec![];
    for i in 0..doc.len() {
        let tokens = doc.tokens(i);
        let len = tokens.len();
        for q in len - doc.continuation_lens[i] - 1..len - 1 {
            let row = if q + 1 == p {
                0
            } else {
                let r = remainder_row[i].expect("positions past the prefix are in the remainder");
                1 + r * t + (q - p)
            };
            picks.push(row as u32);
            targets.push(tokens[q + 1]);
        }
    }
    let mut parts = vec![];
    let hidden_size = model.config().hidden_size;
    parts.push(match &prefix.last_hidden {
        Some(h) => h.clone(),
        None => Tensor::zeros((1, hidden_size), model.dtype(), model.device())?,
    });
    if let Some(r) = remainder {
        parts.push(r);
    }
    let all = Tensor::cat(&parts, 0)?;
    let dev = model.device();
    let selected = all.index_select(&Tensor::new(picks.as_slice(), dev)?, 0)?;
    let logp = candle_nn::ops::log_softmax(&model.logits(&selected)?, D::Minus1)?;
    let target_idx = Tensor::new(targets.as_slice(), dev)?.unsqueeze(1)?;
    let token_lp = logp
        .gather(&target_idx, 1)?
        .squeeze(1)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let greedy = logp.argmax(D::Minus1)?.to_vec1::<u32>()?;

    let mut out = vec![];
    let mut k = 0;
    for i in 0..doc.len() {
        let c = doc.continuation_lens[i];
        let ll: f64 = token_lp[k..k + c].iter().sum();
        let is_greedy = (k..k + c).all(|j| greedy[j] == targets[j]);
        if !ll.is_finite() {
            bail!("log-likelihood of request {i} is not finite ({ll})");
        }
        out.push((ll, is_greedy));
        k += c;
    }
    Ok((out, prefilled))
}

/// Greedy generation for a batch of contexts, each stopping at an end-of-sequence token, at
/// the first of its `until` strings (which is cut off with everything after it) or after
/// `max_gen_toks` tokens. Finished rows leave the batch. Also returns the work: the prompts'
/// tokens prefilled and the tokens generated.
pub fn generate_until(
    model: &LlamaModel,
    tokenizer: &ModelTokenizer,
    requests: &[&TokenizedGeneration],
    stop_token_ids: &[u32],
    pad_id: u32,
) -> Result<(Vec<String>, TokenWork)> {
    let n = requests.len();
    let mut generated: Vec<Vec<u32>> = vec![vec![]; n];
    let mut texts = vec![String::new(); n];
    if n == 0 {
        return Ok((texts, TokenWork::default()));
    }
    let mut work = TokenWork {
        prefilled: requests.iter().map(|r| r.context.len() as u64).sum(),
        ..TokenWork::default()
    };
    let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.context.clone()).collect();
    let mut cache = model.new_cache();
    let mut last = forward_in_chunks(
        model,
        &TokenBatch::left_padded(&prompts, &vec![0; n], pad_id),
        &mut cache,
    )?;
    // Rows still generating, as indices into `requests`.
    let mut active: Vec<usize> = (0..n).collect();
    loop {
        let next = model.logits(&last)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let mut keep = vec![];
        for (slot, (&row, &tok)) in active.iter().zip(&next).enumerate() {
            let req = requests[row];
            work.generated += 1;
            let finished = if stop_token_ids.contains(&tok) {
                true
            } else {
                generated[row].push(tok);
                texts[row] = tokenizer.decode(&generated[row], true)?;
                req.until.iter().any(|u| texts[row].contains(u.as_str()))
                    || generated[row].len() >= req.max_gen_toks
            };
            if !finished {
                keep.push(slot);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache = cache.select_rows(&keep)?;
        }
        let tokens: Vec<u32> = keep.iter().map(|&s| next[s]).collect();
        active = keep.iter().map(|&s| active[s]).collect();
        let positions = cache.next_positions();
        let step = TokenBatch {
            ids: tokens.iter().map(|&t| vec![t]).collect(),
            positions: positions.iter().map(|&p| vec![p]).collect(),
            valid: vec![vec![true]; tokens.len()],
        };
        last = model.forward(&step, Some(&mut cache))?.squeeze(1)?;
    }
    for (text, req) in texts.iter_mut().zip(requests) {
        for u in &req.until {
            if let Some(i) = text.find(u.as_str()) {
                text.truncate(i);
            }
        }
    }
    Ok((texts, work))
}
