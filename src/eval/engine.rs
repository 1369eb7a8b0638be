//! The scoring engine. lm-eval runs every (context, continuation) pair as its own sequence; here
//! each piece of shared text is run once: a prefix shared by all documents of a task (MMLU's
//! description and shots, TruthfulQA's primer) is prefilled once, each document's context once
//! on top of it, and the choices' continuations as one batch from a fork of that cache. The
//! vocabulary projection runs only at the positions whose log-probabilities are needed.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, D};

use super::tokenize::{TokenizedChoices, TokenizedGeneration};
use crate::model::kv_cache::SharedPrefix;
use crate::model::target_scores::{target_scores, TargetScore};
use crate::model::{KvCache, LlamaModel, ModelTokenizer, PackSlot, TokenBatch};

/// Tokens per forward when prefilling, over all rows: long prefixes go through in chunks. gemm
/// repacks every weight matrix once per forward, so short chunks pay that packing often (128 →
/// 512 tokens ran lm-eval's ARC prompts in 20.9/20.3 s → 14.0/16.2 s), while attention's
/// scratch grows with a chunk's rows × keys. With the attention kernel's block-sized scratch,
/// 2048 ran ARC and HellaSwag (8 documents each, 2 cores, alternating) in 9.8/10.3 and 7.3/7.3 s
/// against 11.5/11.8 and 8.3/8.5 s at 512 per row, at the same peak memory; GSM8K's 8-row
/// admissions did not change. Each query attends to the same keys either way; log-likelihoods
/// move by gemm's blocking only (≤ 2.1e-5 on ARC and HellaSwag documents).
const PREFILL_TOKENS: usize = 2048;

/// Time steps per forward at least, whatever the number of rows.
const MIN_CHUNK: usize = 512;

/// Time steps per forward for `rows` rows of `t`: about [`PREFILL_TOKENS`] tokens in all but at
/// least [`MIN_CHUNK`] per row, in equal chunks (512 + 512 + 61 for a 1085-token prompt ran its
/// last forward at 61 rows, where the matrix products are thin and still repack every weight).
fn chunk_len(t: usize, rows: usize) -> usize {
    let per_row = (PREFILL_TOKENS / rows.max(1)).max(MIN_CHUNK);
    t.div_ceil(t.div_ceil(per_row).max(1)).max(1)
}

/// Runs `batch` through the model in equal chunks of at most [`chunk_len`] time steps, appending to
/// `cache`; returns the hidden state of each row's last column `(b, hidden)`, the only one
/// computed past the last layer's keys ([`LlamaModel::forward_columns`]).
fn forward_in_chunks(
    model: &LlamaModel,
    batch: &TokenBatch,
    cache: &mut KvCache,
) -> Result<Tensor> {
    let t = batch.seq_len();
    let len = chunk_len(t, batch.batch_size());
    let mut last = None;
    let mut start = 0;
    while start < t {
        let end = (start + len).min(t);
        let cols = |rows: &[Vec<u32>]| rows.iter().map(|r| r[start..end].to_vec()).collect();
        let chunk = TokenBatch {
            ids: cols(&batch.ids),
            positions: cols(&batch.positions),
            valid: batch.valid.iter().map(|r| r[start..end].to_vec()).collect(),
            packing: None,
        };
        let wanted: &[usize] = if end == t { &[end - start - 1] } else { &[] };
        let hidden = model.forward_columns(&chunk, Some(cache), wanted)?;
        if end == t {
            last = Some(hidden.squeeze(1)?);
        }
        start = end;
    }
    last.ok_or_else(|| anyhow::anyhow!("empty batch"))
}

/// A prefilled token prefix: its KV cache and the hidden state of its last token.
#[derive(Clone)]
pub struct Prefilled {
    cache: KvCache,
    last_hidden: Option<Tensor>,
    /// The prefix itself, so that extending it can check it really is a prefix.
    tokens: Vec<u32>,
}

impl Prefilled {
    pub fn empty(model: &LlamaModel) -> Self {
        Self {
            cache: model.new_cache(),
            last_hidden: None,
            tokens: vec![],
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

/// Extends `base` (batch 1) by `tokens[base.len()..]`.
pub fn prefill(
    model: &LlamaModel,
    base: &Prefilled,
    tokens: &[u32],
    pad_id: u32,
) -> Result<Prefilled> {
    if !tokens.starts_with(&base.tokens) {
        bail!(
            "{} tokens do not start with their base prefix of {}",
            tokens.len(),
            base.len()
        );
    }
    if tokens.len() == base.len() {
        return Ok(base.clone());
    }
    let mut cache = base.cache.clone();
    let batch = TokenBatch::right_padded(
        &[tokens[base.len()..].to_vec()],
        &[base.len() as u32],
        pad_id,
    );
    let last_hidden = forward_in_chunks(model, &batch, &mut cache)?;
    Ok(Prefilled {
        cache,
        last_hidden: Some(last_hidden),
        tokens: tokens.to_vec(),
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
/// against running every request's input on its own, as lm-eval does. Generation also drafts
/// tokens ([`super::draft`]): `drafted` were fed for verification, `accepted` of them were the
/// model's own greedy choices (each saved a decode step of its row).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenWork {
    pub prefilled: u64,
    pub generated: u64,
    pub saved: u64,
    pub drafted: u64,
    pub accepted: u64,
}

impl std::ops::AddAssign for TokenWork {
    fn add_assign(&mut self, o: Self) {
        self.prefilled += o.prefilled;
        self.generated += o.generated;
        self.saved += o.saved;
        self.drafted += o.drafted;
        self.accepted += o.accepted;
    }
}

/// Tokens one packed forward holds at most (a document whose trunk is over half this runs
/// alone): enough rows for the matrix products to run near peak, since gemm repacks every weight
/// once per forward, few enough that the packed mask stays small. 256 → 1024 ran 30 search-pool
/// documents of five tasks with shared shots in 34.2/34.5 → 27.0/26.2 s and lm-eval's
/// TruthfulQA, Winogrande and two MMLU subjects (30 each) in 22.3 → 15.3 s, with the same
/// scores, at +0.2 GB peak memory. 1024 → 2048 once the attention kernel stopped computing a
/// packed sequence's scores against the sequences before it (which made 2048 slower): six tasks
/// at 50 search-pool documents with shared shots and GSM8K by gold likelihood 47.5/46.2 →
/// 46.7/44.9 s (alternating; 4096 no better), lm-eval's shots on ARC and HellaSwag at 16
/// documents (two 25-shot prompts per forward) 24.6/24.8 → 24.0/23.8 s, at +90 MB peak memory.
const PACK_TOKENS: usize = 2048;

/// The scores of one document: per request, its summed log-likelihood and whether it is greedy.
pub type ChoiceScores = Vec<(f64, bool)>;

/// A document laid out for a packed forward: its trunk (the tokens of its prefillable prefix
/// past the base) and one branch per request (the rest of the request's input), and where each
/// starts in the packed row.
struct Laid<'a> {
    doc: &'a TokenizedChoices,
    /// The document's prefillable prefix length (trunk end).
    p: usize,
    trunk_at: usize,
    branch_at: Vec<usize>,
}

/// Scores the requests of every document in `docs` (`(id, document)`; the id names it in
/// errors), each continuing from `base` (a prefix of every document, or empty). Short documents
/// are packed into shared forwards ([`PackSlot`]): each document's trunk once, its requests'
/// remainders as branches that see the trunk and not each other, so many documents cost one
/// pass over the weights. A document whose trunk is long (a per-document few-shot prompt) runs
/// alone: its trunk and branches in one forward when they fit [`PREFILL_TOKENS`], else the
/// trunk prefilled in chunks first and the branches after it. `on_done(k, scores, prefilled)`
/// gets document `k`'s scores and the tokens prefilled for it, in order.
pub fn score_documents(
    model: &LlamaModel,
    base: &Prefilled,
    docs: &[(usize, &TokenizedChoices)],
    pad_id: u32,
    on_done: &mut dyn FnMut(usize, ChoiceScores, u64) -> Result<()>,
) -> Result<()> {
    for &(id, doc) in docs {
        check_document(doc, base).with_context(|| format!("document {id}"))?;
    }
    let mut k = 0;
    while k < docs.len() {
        let (id, doc) = docs[k];
        let p = document_prefix_len(doc);
        if p - base.len() > PACK_TOKENS / 2 {
            // One forward instead of two: gemm repacks every weight once per forward, and the
            // branches alone (4 HellaSwag endings, ~120 tokens) made a thin, slow one. ARC and
            // HellaSwag, 10 documents each, alternating: 12.2-12.7 / 9.6-9.8 s ->
            // 11.3-12.0 / 8.4-8.5 s.
            let own;
            let from = if input_tokens(doc, base.len()) <= PREFILL_TOKENS {
                base
            } else {
                own = prefill(model, base, &doc.shared[..p], pad_id)?;
                &own
            };
            let mut scores =
                score_pack(model, from, &[doc]).with_context(|| format!("document {id}"))?;
            let (s, n) = scores.pop().expect("one document");
            on_done(k, s, n + (from.len() - base.len()) as u64)?;
            k += 1;
            continue;
        }
        // The following documents whose trunks are short, up to PACK_TOKENS in all.
        let mut end = k;
        let mut tokens = 0;
        while end < docs.len() {
            let d = docs[end].1;
            let q = document_prefix_len(d);
            let n = input_tokens(d, base.len());
            if q - base.len() > PACK_TOKENS / 2 || (end > k && tokens + n > PACK_TOKENS) {
                break;
            }
            tokens += n;
            end += 1;
        }
        let pack: Vec<&TokenizedChoices> = docs[k..end].iter().map(|(_, d)| *d).collect();
        let ids: Vec<usize> = docs[k..end].iter().map(|(id, _)| *id).collect();
        let scores =
            score_pack(model, base, &pack).with_context(|| format!("documents {ids:?}"))?;
        for (j, (s, n)) in scores.into_iter().enumerate() {
            on_done(k + j, s, n)?;
        }
        k = end;
    }
    Ok(())
}

/// Every request has context before its continuation, and `base` is a prefix of the document's
/// prefillable prefix.
fn check_document(doc: &TokenizedChoices, base: &Prefilled) -> Result<()> {
    for i in 0..doc.len() {
        if doc.total_len(i) <= doc.continuation_lens[i] {
            bail!("request {i} has no context tokens before its continuation");
        }
    }
    let p = document_prefix_len(doc);
    if p < base.len() || !doc.shared[..p].starts_with(&base.tokens) {
        bail!(
            "its prefix of {p} tokens does not start with the shared prefix of {}",
            base.len()
        );
    }
    Ok(())
}

/// Tokens a document adds to a packed row continuing `base_len` tokens: its trunk and every
/// request's input (its tokens but the last) past the trunk.
fn input_tokens(doc: &TokenizedChoices, base_len: usize) -> usize {
    let p = document_prefix_len(doc);
    (p - base_len)
        + (0..doc.len())
            .map(|i| doc.total_len(i) - 1 - p)
            .sum::<usize>()
}

/// One packed forward after `base` for `docs`; per document its scores and tokens prefilled.
fn score_pack(
    model: &LlamaModel,
    base: &Prefilled,
    docs: &[&TokenizedChoices],
) -> Result<Vec<(ChoiceScores, u64)>> {
    let b = base.len();
    let mut ids = vec![];
    let mut positions = vec![];
    let mut slots = vec![];
    let mut laid = vec![];
    for (seq, doc) in docs.iter().enumerate() {
        let p = document_prefix_len(doc);
        let mut push = |tokens: &[u32], start: usize, branch: usize| {
            let at = ids.len();
            ids.extend_from_slice(tokens);
            positions.extend((0..tokens.len()).map(|j| (start + j) as u32));
            slots.extend(tokens.iter().map(|_| PackSlot {
                seq: seq as u32,
                branch: branch as u32,
            }));
            at
        };
        let trunk_at = push(&doc.shared[b..p], b, 0);
        let branch_at = (0..doc.len())
            .map(|i| {
                let tokens = doc.tokens(i);
                push(&tokens[p..tokens.len() - 1], p, i + 1)
            })
            .collect();
        laid.push(Laid {
            doc,
            p,
            trunk_at,
            branch_at,
        });
    }
    // The hidden state before every scored token: row 0 is the base's last token, row 1 + i is
    // packed token i.
    let mut picks = vec![];
    let mut targets = vec![];
    for l in &laid {
        for i in 0..l.doc.len() {
            let tokens = l.doc.tokens(i);
            let len = tokens.len();
            for q in len - l.doc.continuation_lens[i] - 1..len - 1 {
                let row = if q >= l.p {
                    1 + l.branch_at[i] + (q - l.p)
                } else if q >= b {
                    1 + l.trunk_at + (q - b)
                } else {
                    0
                };
                picks.push(row);
                targets.push(tokens[q + 1]);
            }
        }
    }
    // Only those packed tokens' states are computed past the last layer's keys.
    let mut wanted: Vec<usize> = picks.iter().filter(|&&r| r > 0).map(|r| r - 1).collect();
    wanted.sort_unstable();
    wanted.dedup();
    // (No forward at all when no packed token's state is wanted: its keys would go nowhere.)
    let packed = if wanted.is_empty() {
        None
    } else {
        let mut cache = base.cache.clone();
        let batch = TokenBatch {
            valid: vec![vec![true; ids.len()]],
            ids: vec![ids],
            positions: vec![positions],
            packing: Some(vec![slots]),
        };
        Some(
            model
                .forward_columns(&batch, Some(&mut cache), &wanted)?
                .squeeze(0)?,
        )
    };
    let picks: Vec<u32> = picks
        .iter()
        .map(|&r| match r {
            0 => 0,
            r => {
                1 + wanted
                    .binary_search(&(r - 1))
                    .expect("wanted holds every pick") as u32
            }
        })
        .collect();
    let dev = model.device();
    let last = match &base.last_hidden {
        Some(h) => h.clone(),
        None => Tensor::zeros((1, model.config().hidden_size), model.dtype(), dev)?,
    };
    let all = match packed {
        Some(h) => Tensor::cat(&[&last, &h], 0)?,
        None => last,
    };
    let selected = all.index_select(&Tensor::new(picks.as_slice(), dev)?, 0)?;
    let token = score_targets(model, &selected, &targets)?;

    let mut out = vec![];
    let mut k = 0;
    for (d, l) in laid.iter().enumerate() {
        let mut scores = vec![];
        for i in 0..l.doc.len() {
            let c = l.doc.continuation_lens[i];
            let ll: f64 = token[k..k + c].iter().map(|t| t.log_prob).sum();
            let is_greedy = token[k..k + c].iter().all(|t| t.greedy);
            if !ll.is_finite() {
                bail!("log-likelihood of request {i} of packed document {d} is not finite ({ll})");
            }
            scores.push((ll, is_greedy));
            k += c;
        }
        out.push((scores, input_tokens(l.doc, b) as u64));
    }
    Ok(out)
}

/// Bytes of logits materialised at once when scoring: under the 32 MiB above which glibc maps
/// (and the kernel zeroes) every buffer afresh (`src/process.rs`). A 2,048-token pack of
/// HellaSwag endings or GSM8K gold solutions scores ~1,000 tokens, whose logits over a 49k
/// vocabulary were one 200 MB buffer, zeroed serially by candle's matmul and page-faulted in.
const LOGIT_BYTES: usize = 24 << 20;

/// The score of `targets[i]` after hidden state `hidden[i]`, through the logits of a few rows at
/// a time. Every chunk has more rows than the row-dot path takes, so each row gets gemm's bits
/// as when all rows went at once (its summation order depends on the inner size only).
fn score_targets(model: &LlamaModel, hidden: &Tensor, targets: &[u32]) -> Result<Vec<TargetScore>> {
    score_targets_within(model, hidden, targets, LOGIT_BYTES)
}

/// [`score_targets`] with at most about `bytes` of logits at once.
fn score_targets_within(
    model: &LlamaModel,
    hidden: &Tensor,
    targets: &[u32],
    bytes: usize,
) -> Result<Vec<TargetScore>> {
    let n = targets.len();
    let per_chunk = (bytes / (4 * model.config().vocab_size.max(1)))
        .max(2 * crate::model::small_matmul::max_rows() + 2);
    // Sizes differ by one at most, so none is small when there is more than one.
    let chunks = n.div_ceil(per_chunk);
    let mut out = Vec::with_capacity(n);
    for c in 0..chunks {
        let (start, end) = (c * n / chunks, (c + 1) * n / chunks);
        let logits = model.logits(&hidden.narrow(0, start, end - start)?)?;
        out.extend(target_scores(&logits, &targets[start..end])?);
    }
    Ok(out)
}

/// How [`generate_until`] runs: the tokens that end a generation, the padding id and how many
/// documents are decoded together.
#[derive(Debug, Clone)]
pub struct GenerationSettings {
    pub stop_token_ids: Vec<u32>,
    pub pad_id: u32,
    pub batch_size: usize,
    /// Draft tokens per row and decode step at most ([`MAX_DRAFT`]; 0: one token per step).
    pub max_draft: usize,
}

/// A document being decoded: the request, what it generated so far, and the token to feed at
/// the next step (its context's last token, then each generated token).
struct Row {
    request: usize,
    generated: Vec<u32>,
    text: String,
    input: u32,
}

/// Greedy generation with continuous batching: up to `batch_size` documents are decoded
/// together, and a finished document's slot is refilled with the next pending one at once, so
/// every decode step runs a full batch. Each document stops at an end-of-sequence token, at the
/// first of its `until` strings (cut off with everything after it) or after `max_gen_toks`
/// tokens. `base` is a prefix of every context (the task's shared few-shot prefix, or empty):
/// it was prefilled once and each new document's cache is forked from it. A document's output
/// is what it would be alone: rows never attend to each other and padding gets exactly zero
/// attention weight, so only float rounding in the batched matmuls differs, which greedy
/// decoding does not see unless two logits tie within it. `on_done(i)` is called when request
/// `i` has finished. Also returns the work: the context tokens prefilled past `base` and the
/// tokens generated.
pub fn generate_until(
    model: &LlamaModel,
    tokenizer: &ModelTokenizer,
    base: &Prefilled,
    requests: &[&TokenizedGeneration],
    settings: &GenerationSettings,
    on_done: &mut dyn FnMut(usize),
) -> Result<(Vec<String>, TokenWork)> {
    for (i, r) in requests.iter().enumerate() {
        if r.context.len() <= base.len() || !r.context.starts_with(&base.tokens) {
            bail!(
                "generation request {i}: its context of {} tokens does not extend the shared \
                 prefix of {}",
                r.context.len(),
                base.len()
            );
        }
    }
    let mut texts = vec![String::new(); requests.len()];
    let mut work = TokenWork::default();
    // Longest contexts first, as lm-eval orders generation requests: documents admitted together
    // are then of similar length, so their left-padded prefill computes little padding.
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(requests[i].context.len()));
    let mut pending = order.into_iter();
    // Active rows; row `i` of `cache` holds the keys of `rows[i]`.
    let mut rows: Vec<Row> = vec![];
    let mut cache = model.new_cache();
    // The shared prefix is kept once for the whole batch where the model can read it so (rows
    // then hold only their own tokens: a 5-shot GSM8K prompt is ~34 MB of keys per row at
    // 135M), else copied into each row.
    let shared = if !base.is_empty() && model.can_share_prefix() {
        Some(base.cache.to_shared_prefix()?)
    } else {
        None
    };
    let start = Start {
        base,
        shared: shared.as_ref(),
    };
    // Room for a whole generation after each rebuild, so decode steps append in place.
    let spare = requests.iter().map(|r| r.max_gen_toks).max().unwrap_or(0) + 1;
    let (mut steps, mut admit_s, mut decode_s) = (0u64, 0f64, 0f64);
    loop {
        let t0 = std::time::Instant::now();
        let (admitted, fresh) = admit(model, &start, requests, &mut pending, settings, rows.len())?;
        if !admitted.is_empty() {
            // The running rows and the admitted ones in one copy, with room for the steps ahead.
            let mut sources: Vec<(usize, usize)> =
                (0..cache.batch_size()).map(|r| (0, r)).collect();
            sources.extend((0..admitted.len()).map(|r| (1, r)));
            let old = std::mem::replace(&mut cache, model.new_cache());
            cache = KvCache::stack(vec![old, fresh], &sources, spare)?;
        }
        for i in admitted {
            let context = &requests[i].context;
            work.prefilled += (context.len() - base.len()) as u64;
            rows.push(Row {
                request: i,
                generated: vec![],
                text: String::new(),
                input: *context.last().expect("checked longer than the base"),
            });
        }
        if rows.is_empty() {
            break;
        }
        let t1 = std::time::Instant::now();
        admit_s += (t1 - t0).as_secs_f64();
        let drafts = drafts_for(&rows, requests, settings.max_draft);
        let keys_before = cache.len();
        let next = decode_step(model, &rows, &drafts, &mut cache)?;
        decode_s += t1.elapsed().as_secs_f64();
        steps += 1;
        let mut finished = vec![];
        for (slot, ((row, tokens), draft)) in rows.iter_mut().zip(next).zip(&drafts).enumerate() {
            let req = requests[row.request];
            // The greedy token after the input is always right; each after a draft token is
            // right while the draft so far agreed with the model's choices.
            let agreed = draft
                .iter()
                .zip(&tokens)
                .take_while(|(d, t)| d == t)
                .count();
            work.drafted += draft.len() as u64;
            work.accepted += agreed as u64;
            // The keys of the draft tokens after the first disagreement are not this row's text.
            cache.discard_keys(slot, keys_before + 1 + agreed)?;
            for &tok in &tokens[..=agreed] {
                work.generated += 1;
                if advance(tokenizer, row, req, tok, &settings.stop_token_ids)? {
                    texts[row.request] = cut_at_stop(&row.text, &req.until);
                    on_done(row.request);
                    finished.push(slot);
                    break;
                }
            }
        }
        // Finished rows leave at once, the last row taking each one's place in the batch and the
        // cache (one row copied; re-stacking the batch at every finished document cost ~0.1 s
        // each, 3.5 s of 40 GSM8K documents).
        for slot in finished.into_iter().rev() {
            rows.swap_remove(slot);
            cache.swap_remove_row(slot)?;
        }
    }
    tracing::debug!(steps, admit_s, decode_s, "generation");
    Ok((texts, work))
}

/// What every generation starts from: the prefilled shared prefix, and the same keys as one
/// [`SharedPrefix`] for the whole batch where the model reads them so.
struct Start<'a> {
    base: &'a Prefilled,
    shared: Option<&'a Arc<SharedPrefix>>,
}

/// Documents prefilled in one left-padded batch at most: taken in order of length, a group's
/// rows are of similar length, so little of the batch is padding.
const ADMIT_GROUP: usize = 8;

/// Prefills pending documents into the free slots of a batch of `active` rows: each one's
/// context but its last token (which goes in with the next decode step, like every row's
/// input), after the shared prefix (or on a fork of it). Returns the documents and their cache,
/// one row each; documents admitted together are prefilled in left-padded groups of
/// [`ADMIT_GROUP`], whose padding [`KvCache::stack`] then drops.
fn admit(
    model: &LlamaModel,
    start: &Start,
    requests: &[&TokenizedGeneration],
    pending: &mut std::vec::IntoIter<usize>,
    settings: &GenerationSettings,
    active: usize,
) -> Result<(Vec<usize>, KvCache)> {
    let base = start.base;
    let slots = settings.batch_size.max(1);
    let free = slots.saturating_sub(active);
    // Without a shared prefix each document prefills its whole ~1k-token prompt: one row at a
    // time runs thin matrix products (measured slower than the old fixed batches at 16
    // documents), so refills wait until half the slots are free and go in together. After a
    // shared prefix a document is a few dozen tokens, and one alone is thinner still, so those
    // refills wait for a group too; a decode step's cost is nearly proportional to its rows,
    // so the slots left empty meanwhile cost little.
    let wait = if base.is_empty() {
        free * 2 < slots
    } else {
        free < ADMIT_GROUP.min(slots).min(pending.len())
    };
    if active > 0 && wait {
        return Ok((vec![], model.new_cache()));
    }
    let admitted: Vec<usize> = pending.by_ref().take(free).collect();
    if admitted.is_empty() {
        return Ok((admitted, model.new_cache()));
    }
    let groups = admitted
        .chunks(ADMIT_GROUP)
        .map(|group| prefill_group(model, start, requests, group, settings.pad_id))
        .collect::<Result<Vec<_>>>()?;
    let cache = match <[KvCache; 1]>::try_from(groups) {
        Ok([one]) => one,
        Err(groups) => {
            let rows: Vec<(usize, usize)> = groups
                .iter()
                .enumerate()
                .flat_map(|(g, c)| (0..c.batch_size()).map(move |r| (g, r)))
                .collect();
            KvCache::stack(groups, &rows, 0)?
        }
    };
    Ok((admitted, cache))
}

/// One left-padded batch of `group`'s contexts but their last tokens, after the shared prefix.
fn prefill_group(
    model: &LlamaModel,
    start: &Start,
    requests: &[&TokenizedGeneration],
    group: &[usize],
    pad_id: u32,
) -> Result<KvCache> {
    let base = start.base;
    let mut cache = match (group.len(), start.shared) {
        _ if base.is_empty() => model.new_cache(),
        (n, Some(shared)) => KvCache::after_prefix(shared, n),
        (1, None) => base.cache.clone(),
        (n, None) => base.cache.fork(n)?,
    };
    let rest: Vec<Vec<u32>> = group
        .iter()
        .map(|&i| {
            let c = &requests[i].context;
            c[base.len()..c.len() - 1].to_vec()
        })
        .collect();
    if rest.iter().any(|r| !r.is_empty()) {
        let at = vec![base.len() as u32; rest.len()];
        forward_in_chunks(
            model,
            &TokenBatch::left_padded(&rest, &at, pad_id),
            &mut cache,
        )?;
    }
    Ok(cache)
}

/// Draft tokens per row and decode step at most. Each draft token widens every row's step (the
/// batch is rectangular), and a step's cost grows with its tokens once the weights' one pass is
/// paid: 8 rows at 1k-token contexts took 87, 113 and 155 ms per step at 1, 2 and 4 tokens per
/// row. GSM8K, 40 benchmark documents, SmolLM2-135M, 2 cores: decoding took 35.8 s without
/// drafts (448 steps), 27.0 / 26.2 / 28.2 s with up to 1 / 2 / 4 (280 / 225 / 209 steps), every
/// generation the same.
pub const MAX_DRAFT: usize = 2;

/// Each row's draft: what [`prompt_lookup`](super::draft::prompt_lookup) finds in its context
/// and generation, as long as every token of the step stays on the row-dot products (whose
/// result for a row does not depend on the rows beside it; no drafts where there are none) and
/// within the row's `max_gen_toks`.
fn drafts_for(rows: &[Row], requests: &[&TokenizedGeneration], max_draft: usize) -> Vec<Vec<u32>> {
    let per_row = (crate::model::small_matmul::max_rows() / rows.len().max(1))
        .saturating_sub(1)
        .min(max_draft);
    rows.iter()
        .map(|row| {
            let req = requests[row.request];
            let room = req.max_gen_toks.saturating_sub(row.generated.len() + 1);
            let k = per_row.min(room);
            if k == 0 {
                return vec![];
            }
            let seq: Vec<u32> = req.context.iter().chain(&row.generated).copied().collect();
            super::draft::prompt_lookup(&seq, k).to_vec()
        })
        .collect()
}

/// Feeds every row's input token and then its draft at its next positions; returns each row's
/// greedy next token after each token fed (`1 + draft.len()` of them). Rows with shorter drafts
/// are padded with keys no query sees.
fn decode_step(
    model: &LlamaModel,
    rows: &[Row],
    drafts: &[Vec<u32>],
    cache: &mut KvCache,
) -> Result<Vec<Vec<u32>>> {
    let positions = cache.next_positions();
    let width = 1 + drafts.iter().map(Vec::len).max().unwrap_or(0);
    let mut step = TokenBatch {
        ids: vec![],
        positions: vec![],
        valid: vec![],
        packing: None,
    };
    for ((row, draft), &p) in rows.iter().zip(drafts).zip(&positions) {
        let mut ids = vec![row.input];
        ids.extend(draft);
        let fed = ids.len();
        ids.resize(width, row.input);
        step.ids.push(ids);
        step.positions.push((p..p + width as u32).collect());
        step.valid.push((0..width).map(|j| j < fed).collect());
    }
    let hidden = model.forward(&step, Some(cache))?;
    let next = model.logits(&hidden)?.argmax(D::Minus1)?.to_vec2::<u32>()?;
    Ok(next
        .into_iter()
        .zip(drafts)
        .map(|(mut row, draft)| {
            row.truncate(1 + draft.len());
            row
        })
        .collect())
}

/// Takes the row's next token; true when the row has finished (a stop token, an `until`
/// string in its text, or `max_gen_toks` tokens).
fn advance(
    tokenizer: &ModelTokenizer,
    row: &mut Row,
    req: &TokenizedGeneration,
    tok: u32,
    stop_token_ids: &[u32],
) -> Result<bool> {
    if stop_token_ids.contains(&tok) {
        return Ok(true);
    }
    row.generated.push(tok);
    row.text = tokenizer.decode(&row.generated, true)?;
    row.input = tok;
    Ok(req.until.iter().any(|u| row.text.contains(u.as_str()))
        || row.generated.len() >= req.max_gen_toks)
}

/// `text` cut at each `until` string in turn (lm-eval's order).
fn cut_at_stop(text: &str, until: &[String]) -> String {
    let mut text = text.to_string();
    for u in until {
        if let Some(i) = text.find(u.as_str()) {
            text.truncate(i);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use candle_core::{DType, Device};

    use super::*;
    use crate::model::tiny::TinySpec;
    use crate::model::Mode;

    const VOCAB: usize = 96;

    #[test]
    fn prefill_chunks_are_equal_and_within_the_budget() {
        // One row: a 1085-token ARC prompt in one forward, a longer one in equal halves.
        assert_eq!(chunk_len(1085, 1), 1085);
        assert_eq!(chunk_len(3000, 1), 1500);
        // Eight rows: at most MIN_CHUNK each, so 1040 goes in three equal chunks.
        assert_eq!(chunk_len(1040, 8), 347);
        assert_eq!(chunk_len(1, 8), 1);
        for (t, rows) in [(1, 1), (511, 3), (2049, 1), (5000, 2), (777, 64)] {
            let c = chunk_len(t, rows);
            let n = t.div_ceil(c);
            assert!(
                c * rows <= PREFILL_TOKENS.max(MIN_CHUNK * rows),
                "{t}×{rows}: {c}"
            );
            // No chunk is much shorter than the others.
            assert!(t - (n - 1) * c + n > c, "{t}×{rows}: {n} chunks of {c}");
        }
    }

    /// A word-level tokenizer over `w0 … w95`; decoding joins the words with spaces.
    fn tokenizer() -> ModelTokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB)
            .map(|i| (format!("w{i}"), serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
            "pre_tokenizer": {"type": "WhitespaceSplit"},
        });
        let inner = tokenizers::Tokenizer::from_str(&json.to_string()).expect("tokenizer");
        ModelTokenizer::from_tokenizer(inner, "words".into())
    }

    fn tiny_model(seed: u64) -> LlamaModel {
        let spec = TinySpec::llama(seed);
        let cfg = spec.config(VOCAB).unwrap();
        let weights = spec.weights(&cfg, DType::F32, &Device::Cpu).unwrap();
        LlamaModel::from_weights(&cfg, &weights, None, Mode::Inference).unwrap()
    }

    /// Deterministic token sequences of varied lengths from a small LCG.
    fn tokens(seed: u64, len: usize) -> Vec<u32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) % VOCAB as u64) as u32
            })
            .collect()
    }

    /// Documents with different context lengths and generation budgets (so rows finish at
    /// different steps and slots get refilled), all starting with `prefix`.
    fn documents(prefix: &[u32]) -> Vec<TokenizedGeneration> {
        documents_n(prefix, 7)
    }

    fn documents_n(prefix: &[u32], n: u64) -> Vec<TokenizedGeneration> {
        (0..n)
            .map(|d| {
                let mut context = prefix.to_vec();
                context.extend(tokens(d, 1 + (d as usize * 5) % 11));
                TokenizedGeneration {
                    context,
                    until: vec![],
                    max_gen_toks: 3 + (d as usize * 7) % 13,
                }
            })
            .collect()
    }

    /// Settings whose stop strings and stop token each cut some document short: taken from
    /// what the documents generate one at a time without them.
    fn with_stops(
        model: &LlamaModel,
        tok: &ModelTokenizer,
        base: &Prefilled,
        docs: &mut [TokenizedGeneration],
    ) -> GenerationSettings {
        // One token per step: the plain greedy loop every batched, drafted run must equal.
        let mut settings = GenerationSettings {
            stop_token_ids: vec![],
            pad_id: 0,
            batch_size: 1,
            max_draft: 0,
        };
        let mut outputs = vec![];
        for d in docs.iter() {
            let (texts, _) =
                generate_until(model, tok, base, &[d], &settings, &mut |_| {}).unwrap();
            outputs.push(texts[0].clone());
        }
        for d in [0, 3, 5] {
            if let Some(word) = outputs[d].split(' ').next_back().filter(|w| !w.is_empty()) {
                docs[d].until = vec![word.to_string()];
            }
        }
        if let Some(word) = outputs[4].split(' ').next() {
            settings.stop_token_ids = tok.encode(word, false).unwrap();
        }
        settings
    }

    fn run(
        model: &LlamaModel,
        tok: &ModelTokenizer,
        base: &Prefilled,
        docs: &[&TokenizedGeneration],
        settings: &GenerationSettings,
    ) -> (Vec<String>, TokenWork, Vec<usize>) {
        let mut done = vec![];
        let (texts, work) =
            generate_until(model, tok, base, docs, settings, &mut |i| done.push(i)).unwrap();
        (texts, work, done)
    }

    /// `settings` at `batch_size` rows, with drafts.
    fn batched(settings: &GenerationSettings, batch_size: usize) -> GenerationSettings {
        GenerationSettings {
            batch_size,
            max_draft: MAX_DRAFT,
            ..settings.clone()
        }
    }

    #[test]
    fn continuous_batching_equals_one_document_at_a_time() {
        let (model, tok) = (tiny_model(11), tokenizer());
        let empty = Prefilled::empty(&model);
        let mut docs = documents(&[]);
        let alone = with_stops(&model, &tok, &empty, &mut docs);
        let refs: Vec<&TokenizedGeneration> = docs.iter().collect();
        let (texts, work, done) = run(&model, &tok, &empty, &refs, &batched(&alone, 3));
        let mut generated = 0;
        let mut cut = 0;
        for (i, doc) in refs.iter().enumerate() {
            let (one, w, _) = run(&model, &tok, &empty, std::slice::from_ref(doc), &alone);
            assert_eq!(texts[i], one[0], "document {i}");
            generated += w.generated;
            cut += usize::from(w.generated < doc.max_gen_toks as u64);
        }
        // The stops did cut documents short, so rows finished at different steps.
        assert!(cut >= 2, "only {cut} documents stopped early");
        assert_eq!(work.generated, generated);
        // Drafts were fed, and some were the greedy tokens (so they stood for decode steps).
        assert!(
            work.accepted > 0 && work.drafted > work.accepted,
            "{work:?}"
        );
        let contexts: u64 = docs.iter().map(|d| d.context.len() as u64).sum();
        assert_eq!((work.prefilled, work.saved), (contexts, 0));
        let mut finished = done.clone();
        finished.sort_unstable();
        assert_eq!(finished, (0..docs.len()).collect::<Vec<_>>());
        // A later document finished before an earlier one: its slot was refilled mid-run.
        assert_ne!(done, finished);
    }

    #[test]
    fn shared_prefix_fork_equals_full_contexts() {
        let (model, tok) = (tiny_model(12), tokenizer());
        let prefix = tokens(99, 20);
        let empty = Prefilled::empty(&model);
        let mut docs = documents(&prefix);
        let alone = with_stops(&model, &tok, &empty, &mut docs);
        let refs: Vec<&TokenizedGeneration> = docs.iter().collect();
        let base = prefill(&model, &empty, &prefix, 0).unwrap();
        let (shared, work, _) = run(&model, &tok, &base, &refs, &batched(&alone, 4));
        let (unshared, _, _) = run(&model, &tok, &empty, &refs, &alone);
        assert_eq!(shared, unshared);
        let own: u64 = docs
            .iter()
            .map(|d| (d.context.len() - prefix.len()) as u64)
            .sum();
        assert_eq!(work.prefilled, own);
        // A base that is not a prefix of every context is refused, not silently used.
        let other = prefill(&model, &empty, &tokens(5, 20), 0).unwrap();
        let err = generate_until(&model, &tok, &other, &refs, &alone, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("shared prefix"), "{err}");
    }

    #[test]
    fn admission_in_groups_after_a_shared_prefix_equals_full_contexts() {
        // 19 documents in 12 slots: the first admission is prefilled as two groups (8 + 4)
        // stacked into one cache, and refills wait for several free slots.
        let (model, tok) = (tiny_model(13), tokenizer());
        let prefix = tokens(98, 20);
        let empty = Prefilled::empty(&model);
        let mut docs = documents_n(&prefix, 19);
        let alone = with_stops(&model, &tok, &empty, &mut docs);
        let refs: Vec<&TokenizedGeneration> = docs.iter().collect();
        let base = prefill(&model, &empty, &prefix, 0).unwrap();
        let (shared, work, done) = run(&model, &tok, &base, &refs, &batched(&alone, 12));
        for (i, doc) in refs.iter().enumerate() {
            let (one, _, _) = run(&model, &tok, &empty, std::slice::from_ref(doc), &alone);
            assert_eq!(shared[i], one[0], "document {i}");
        }
        let mut finished = done;
        finished.sort_unstable();
        assert_eq!(finished, (0..docs.len()).collect::<Vec<_>>());
        let own: u64 = docs.iter().map(|d| (d.context.len() - 20) as u64).sum();
        assert_eq!(work.prefilled, own);
    }

    /// Each request's log-likelihood and is-greedy with its whole input run alone, no cache.
    fn alone(model: &LlamaModel, doc: &TokenizedChoices) -> Vec<(f64, bool)> {
        (0..doc.len())
            .map(|i| {
                let tokens = doc.tokens(i);
                let input = &tokens[..tokens.len() - 1];
                let batch = TokenBatch::right_padded(&[input.to_vec()], &[0], 0);
                let hidden = model.forward(&batch, None).unwrap().squeeze(0).unwrap();
                let logp = candle_nn::ops::log_softmax(&model.logits(&hidden).unwrap(), D::Minus1)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let c = doc.continuation_lens[i];
                let mut ll = 0.0;
                let mut greedy = true;
                for q in tokens.len() - c - 1..tokens.len() - 1 {
                    let row = &logp[q];
                    let target = tokens[q + 1] as usize;
                    ll += row[target] as f64;
                    let best = (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b });
                    greedy &= best == target;
                }
                (ll, greedy)
            })
            .collect()
    }

    /// A document after `prefix`: its own context of `own` tokens, then `choices` requests whose
    /// tails have different lengths (one empty-branched: a one-token continuation right after
    /// the context).
    fn choices_doc(prefix: &[u32], seed: u64, own: usize, choices: usize) -> TokenizedChoices {
        let mut shared = prefix.to_vec();
        shared.extend(tokens(seed, own));
        let tails: Vec<Vec<u32>> = (0..choices)
            .map(|c| tokens(seed * 31 + c as u64, 1 + (c * 3 + seed as usize) % 5))
            .collect();
        // Requests must differ at their first tail token for `shared` to be their common prefix.
        let tails = tails
            .into_iter()
            .enumerate()
            .map(|(c, mut t)| {
                t[0] = c as u32;
                t
            })
            .collect::<Vec<_>>();
        let continuation_lens = tails
            .iter()
            .enumerate()
            .map(|(c, t)| if c == 0 { 1 } else { t.len().min(1 + c % 3) })
            .collect();
        TokenizedChoices {
            shared,
            tails,
            continuation_lens,
        }
    }

    /// Scoring through a few rows of logits at a time gives every row the bits of one pass over
    /// all of them, chunks of unequal size included.
    #[test]
    fn chunked_logits_score_as_one_pass() {
        let model = tiny_model(5);
        for n in [1, 40, 150, 301] {
            let hidden =
                Tensor::randn(0f32, 1.0, (n, model.config().hidden_size), &Device::Cpu).unwrap();
            let targets: Vec<u32> = tokens(n as u64, n);
            let whole = target_scores(&model.logits(&hidden).unwrap(), &targets).unwrap();
            // Room for 70 rows at once: 301 rows go in five chunks of 60 or 61.
            let bytes = 70 * 4 * model.config().vocab_size;
            let chunked = super::score_targets_within(&model, &hidden, &targets, bytes).unwrap();
            assert_eq!(chunked.len(), n);
            for (a, b) in whole.iter().zip(&chunked) {
                assert_eq!(a.log_prob.to_bits(), b.log_prob.to_bits(), "{n} rows");
                assert_eq!(a.greedy, b.greedy);
            }
        }
        let none =
            Tensor::zeros((0, model.config().hidden_size), DType::F32, &Device::Cpu).unwrap();
        assert!(super::score_targets(&model, &none, &[]).unwrap().is_empty());
    }

    #[test]
    fn packed_documents_score_as_each_request_alone() {
        let model = tiny_model(13);
        let empty = Prefilled::empty(&model);
        let prefix = tokens(7, 24);
        let base = prefill(&model, &empty, &prefix, 0).unwrap();
        // Short documents (several per pack, over more than one pack), one whose own context is
        // long (one forward of its own), one longer than a prefill chunk (its trunk prefilled in
        // chunks first), and one with no context past the shared prefix.
        let mut docs: Vec<TokenizedChoices> = (0..14u64)
            .map(|d| {
                choices_doc(
                    &prefix,
                    d + 1,
                    3 + (d as usize * 7) % 19,
                    2 + d as usize % 3,
                )
            })
            .collect();
        docs.insert(5, choices_doc(&prefix, 40, PACK_TOKENS / 2 + 100, 4));
        docs.insert(9, choices_doc(&prefix, 42, PREFILL_TOKENS + 100, 3));
        docs.push(choices_doc(&prefix, 41, 0, 3));
        for b in [&base, &empty] {
            let labelled: Vec<(usize, &TokenizedChoices)> = docs.iter().enumerate().collect();
            let mut got = vec![];
            let mut prefilled = 0;
            score_documents(&model, b, &labelled, 0, &mut |k, s, n| {
                got.push((k, s));
                prefilled += n;
                Ok(())
            })
            .unwrap();
            assert_eq!(
                got.iter().map(|g| g.0).collect::<Vec<_>>(),
                (0..docs.len()).collect::<Vec<_>>()
            );
            for (k, scores) in got {
                let want = alone(&model, &docs[k]);
                for (i, ((ll, greedy), (wll, wgreedy))) in scores.iter().zip(&want).enumerate() {
                    assert!(
                        (ll - wll).abs() < 1e-4,
                        "document {k} request {i}: {ll} vs {wll}"
                    );
                    assert_eq!(greedy, wgreedy, "document {k} request {i}");
                }
            }
            // Every input token past the base once: trunks once, each request's remainder once.
            let own: usize = docs.iter().map(|d| input_tokens(d, b.len())).sum();
            assert_eq!(prefilled, own as u64);
        }
        // A base that is not the documents' prefix is refused.
        let other = prefill(&model, &empty, &tokens(8, 24), 0).unwrap();
        let labelled = [(17usize, &docs[0])];
        let err = score_documents(&model, &other, &labelled, 0, &mut |_, _, _| Ok(())).unwrap_err();
        assert!(format!("{err:#}").contains("document 17"), "{err:#}");
    }
}
