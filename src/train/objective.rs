//! TRL's training objectives on token sequences: SFT (token-mean cross-entropy over completion
//! tokens), DPO (sigmoid loss on summed completion log-probs) and ORPO (NLL plus the odds-ratio
//! term on length-averaged log-probs). Every function returns a differentiable scalar loss.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::data::TokenizedSequence;
use crate::model::{LlamaModel, TokenBatch};

/// Log-probabilities of selected target tokens of a right-padded batch, and which sequence each
/// belongs to. `select(seq, pos)` says whether token `pos` (≥ 1) of sequence `seq` is a target.
pub struct TargetLogps {
    /// `(n,)` log p(token | prefix) of every selected target, in f32 (f64 for f64 models).
    pub logps: Tensor,
    /// Per selected target: its sequence.
    pub seq: Vec<usize>,
    pub batch_size: usize,
}

pub fn target_logps(
    model: &LlamaModel,
    seqs: &[&TokenizedSequence],
    pad_id: u32,
    select: impl Fn(usize, usize) -> bool,
) -> Result<TargetLogps> {
    let ids: Vec<Vec<u32>> = seqs.iter().map(|s| s.ids.clone()).collect();
    let batch = TokenBatch::right_padded(&ids, &vec![0; ids.len()], pad_id);
    let hidden = model.forward(&batch, None)?;
    let (b, t, h) = hidden.dims3()?;
    let mut rows = vec![];
    let mut targets = vec![];
    let mut seq = vec![];
    for (r, s) in seqs.iter().enumerate() {
        for pos in 1..s.ids.len() {
            if select(r, pos) {
                rows.push((r * t + pos - 1) as u32);
                targets.push(s.ids[pos]);
                seq.push(r);
            }
        }
    }
    if rows.is_empty() {
        bail!("batch has no target tokens");
    }
    let dev = hidden.device().clone();
    let sel = hidden
        .reshape((b * t, h))?
        .index_select(&Tensor::new(rows.as_slice(), &dev)?, 0)?;
    let logits = model.logits(&sel)?;
    let logps =
        crate::model::ops::target_log_probs(&logits, &Tensor::new(targets.as_slice(), &dev)?)?;
    Ok(TargetLogps {
        logps,
        seq,
        batch_size: b,
    })
}

impl TargetLogps {
    /// Per-sequence sums `(b,)`, as a matmul with a 0/1 membership matrix (differentiable).
    pub fn sums(&self) -> Result<Tensor> {
        let n = self.seq.len();
        let mut m = vec![0f32; self.batch_size * n];
        for (j, &r) in self.seq.iter().enumerate() {
            m[r * n + j] = 1.0;
        }
        let m = Tensor::from_vec(m, (self.batch_size, n), self.logps.device())?
            .to_dtype(self.logps.dtype())?;
        Ok(m.matmul(&self.logps.unsqueeze(1)?)?.squeeze(1)?)
    }

    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.batch_size];
        for &r in &self.seq {
            c[r] += 1;
        }
        c
    }
}

fn completion_mask<'a>(seqs: &'a [&'a TokenizedSequence]) -> impl Fn(usize, usize) -> bool + 'a {
    move |r, pos| seqs[r].loss_mask[pos]
}

/// SFT: the sum of −log p over completion targets divided by their number in the batch
/// (TRL's token mean, not a mean of per-sequence means).
pub fn sft_loss(
    model: &LlamaModel,
    seqs: &[&TokenizedSequence],
    pad_id: u32,
) -> Result<(Tensor, usize)> {
    let t = target_logps(model, seqs, pad_id, completion_mask(seqs))?;
    let n = t.seq.len();
    Ok(((t.logps.sum_all()? * (-1.0 / n as f64))?, n))
}

/// Summed completion log-probs of chosen and rejected, from one forward over `[chosen…, rejected…]`.
pub fn pair_logps(
    model: &LlamaModel,
    chosen: &[&TokenizedSequence],
    rejected: &[&TokenizedSequence],
    pad_id: u32,
) -> Result<(Tensor, Tensor)> {
    let all: Vec<&TokenizedSequence> = chosen.iter().chain(rejected).copied().collect();
    let sums = target_logps(model, &all, pad_id, completion_mask(&all))?.sums()?;
    let n = chosen.len();
    Ok((sums.narrow(0, 0, n)?, sums.narrow(0, n, n)?))
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpoParams {
    pub beta: f64,
    /// Conservative DPO: (1−ε)·(−log σ(βh)) + ε·(−log σ(−βh)). TRL 1.x ignores label smoothing
    /// for its sigmoid loss; TRL 0.x applied this formula.
    pub label_smoothing: f64,
}

/// The DPO loss and its diagnostics.
pub struct DpoOutput {
    pub loss: Tensor,
    pub chosen_rewards: Vec<f64>,
    pub rejected_rewards: Vec<f64>,
}

impl DpoOutput {
    pub fn reward_accuracy(&self) -> f64 {
        let n = self.chosen_rewards.len() as f64;
        self.chosen_rewards
            .iter()
            .zip(&self.rejected_rewards)
            .filter(|(c, r)| c > r)
            .count() as f64
            / n
    }

    pub fn reward_margin(&self) -> f64 {
        let n = self.chosen_rewards.len() as f64;
        self.chosen_rewards
            .iter()
            .zip(&self.rejected_rewards)
            .map(|(c, r)| c - r)
            .sum::<f64>()
            / n
    }
}

/// −log σ(x), computed stably as softplus(−x).
fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    // softplus(y) = max(y, 0) + log(1 + exp(−|y|))
    let y = x.neg()?;
    Ok((y.relu()? + (y.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// DPO from policy and reference summed log-probs `(b,)`; `reference = None` is reference-free
/// DPO (the reference log-ratio is zero).
pub fn dpo_loss(
    policy: (&Tensor, &Tensor),
    reference: Option<(&Tensor, &Tensor)>,
    p: DpoParams,
) -> Result<DpoOutput> {
    let (pc, pr) = policy;
    let (dc, dr) = match reference {
        Some((rc, rr)) => ((pc - rc)?, (pr - rr)?),
        None => (pc.clone(), pr.clone()),
    };
    let h = ((&dc - &dr)? * p.beta)?;
    let mut loss = neg_log_sigmoid(&h)?;
    if p.label_smoothing > 0.0 {
        loss = ((loss * (1.0 - p.label_smoothing))?
            + (neg_log_sigmoid(&h.neg()?)? * p.label_smoothing)?)?;
    }
    let to_vec = |t: &Tensor| -> Result<Vec<f64>> {
        Ok((t.detach() * p.beta)?.to_dtype(DType::F64)?.to_vec1()?)
    };
    Ok(DpoOutput {
        loss: loss.mean_all()?,
        chosen_rewards: to_vec(&dc)?,
        rejected_rewards: to_vec(&dr)?,
    })
}

pub struct OrpoOutput {
    pub loss: Tensor,
    pub nll: f64,
    pub log_odds: Vec<f64>,
}

/// log(1 − exp(x)) for x < 0, switching formulas at −ln 2 for accuracy.
fn log1m_exp(x: &Tensor) -> Result<Tensor> {
    let a = (x.exp()?.neg()? + 1.0)?.log()?; // log1p(-exp(x)), fine for x < -ln 2
    let b = (x.exp()? - 1.0)?.neg()?.log()?; // log(-expm1(x)), fine near 0
    let use_a = x.lt(-std::f64::consts::LN_2)?;
    Ok(use_a.where_cond(&a, &b)?)
}

/// ORPO as TRL computes it: NLL = mean cross-entropy over the chosen sequences' tokens (prompt
/// included), odds from the mean completion log-prob per sequence, loss = NLL − β·mean log σ(log odds).
pub fn orpo_loss(
    model: &LlamaModel,
    chosen: &[&TokenizedSequence],
    rejected: &[&TokenizedSequence],
    pad_id: u32,
    beta: f64,
) -> Result<OrpoOutput> {
    let n = chosen.len();
    let all: Vec<&TokenizedSequence> = chosen.iter().chain(rejected).copied().collect();
    // Every real token of the batch is a target: completion tokens feed the odds, all of the
    // chosen rows' tokens feed the NLL.
    let t = target_logps(model, &all, pad_id, |_, _| true)?;
    let mut completion = vec![0f32; all.len() * t.seq.len()];
    let mut nll_w = vec![0f32; t.seq.len()];
    let mut counts = vec![0usize; all.len()];
    let mut positions = vec![0usize; all.len()];
    let mut nll_count = 0usize;
    for (j, &r) in t.seq.iter().enumerate() {
        positions[r] += 1;
        let pos = positions[r];
        if all[r].loss_mask[pos] {
            completion[r * t.seq.len() + j] = 1.0;
            counts[r] += 1;
        }
        if r < n {
            nll_w[j] = 1.0;
            nll_count += 1;
        }
    }
    let dev = t.logps.device();
    let dt = t.logps.dtype();
    let m = Tensor::from_vec(completion, (all.len(), t.seq.len()), dev)?.to_dtype(dt)?;
    let sums = m.matmul(&t.logps.unsqueeze(1)?)?.squeeze(1)?;
    let inv: Vec<f32> = counts.iter().map(|&c| 1.0 / c.max(1) as f32).collect();
    let avg = (sums * Tensor::from_vec(inv, all.len(), dev)?.to_dtype(dt)?)?;
    let (ac, ar) = (avg.narrow(0, 0, n)?, avg.narrow(0, n, n)?);
    let log_odds = ((&ac - &ar)? - (log1m_exp(&ac)? - log1m_exp(&ar)?)?)?;
    let nll = (t
        .logps
        .mul(&Tensor::from_vec(nll_w, t.seq.len(), dev)?.to_dtype(dt)?)?
        .sum_all()?
        * (-1.0 / nll_count as f64))?;
    let ratio = (neg_log_sigmoid(&log_odds)?.mean_all()? * beta)?;
    let loss = (&nll + ratio)?;
    Ok(OrpoOutput {
        loss,
        nll: nll.to_dtype(DType::F64)?.to_scalar()?,
        log_odds: log_odds.to_dtype(DType::F64)?.to_vec1()?,
    })
}
