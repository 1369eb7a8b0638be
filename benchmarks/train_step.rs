//! Seconds per optimizer step of paft's trainer, the workload of `benchmarks/trl_step.py`:
//! SmolLM2-135M f32, LoRA r 16 / alpha 32 on q/k/v/o/gate/up/down_proj, AdamW lr 1e-4, no
//! clipping; SFT: 4 × 512 random ids with the loss on the last 256; DPO: 4 pairs of 256 prompt and
//! 256 completion ids, reference log-probs precomputed once (paft's only mode; TRL's
//! `--dpo-ref precomputed`). A step is forward, backward and the AdamW update; the first step is
//! a warm-up. Prints one JSON line per objective, like trl_step.py, with memory: the resident set
//! before the first step (weights, trainable copies, optimizer state), its peak, and the peak's
//! excess over it per sequence in a forward (activations and gradients: what a 512-token sequence
//! costs). `--full` trains every weight instead of LoRA; `--gradient-checkpointing` recomputes
//! each layer in the backward pass; `--mixed-precision bf16|fp16` runs the passes in that dtype
//! with f32 trained parameters and optimizer state (the model is cast again after each update, as
//! the trainer does; fp16's loss scaling is not applied here). Run one objective per process for
//! its own peak.
//!
//! cargo bench --profile dev --bench train_step -- --model DIR [--steps 3] [--objectives sft,dpo]
//!     [--dpo-pairs-per-forward 1|2|4] [--sft-sequences-per-forward 1|2|4] [--full]
//!     [--gradient-checkpointing] [--mixed-precision bf16|fp16]

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use paft::data::TokenizedSequence;
use paft::model::{LoraConfig, Mode, Pretrained, TargetModule};
use paft::train::objective::{dpo_loss, pair_logps, sft_loss, DpoParams};
use paft::train::optimizer::{collect_grads, AdamW, AdamWParams};
use paft::train::params::Trainable;
use rand::{Rng, SeedableRng};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn random_seq(
    rng: &mut impl Rng,
    vocab: u32,
    prompt: usize,
    completion: usize,
) -> TokenizedSequence {
    TokenizedSequence {
        ids: (0..prompt + completion)
            .map(|_| rng.random_range(0..vocab))
            .collect(),
        loss_mask: (0..prompt + completion).map(|i| i >= prompt).collect(),
    }
}

fn refs(v: &[TokenizedSequence]) -> Vec<&TokenizedSequence> {
    v.iter().collect()
}

/// A `/proc/self/status` field in GB (`VmRSS`: now, `VmHWM`: the peak so far).
fn status_gb(field: &str) -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| format!("no {field} in /proc/self/status"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024.0 / 1e9)
}

fn main() -> Result<()> {
    paft::process::setup();
    let args: Vec<String> = std::env::args().collect();
    let model_dir = arg(&args, "--model").context("--model DIR is required")?;
    let steps: usize = arg(&args, "--steps").unwrap_or("3".into()).parse()?;
    let objectives = arg(&args, "--objectives").unwrap_or("sft,dpo".into());
    // DPO pairs per forward pass; 4 runs the whole batch at once.
    let pairs_per_forward: usize = arg(&args, "--dpo-pairs-per-forward")
        .unwrap_or("1".into())
        .parse()?;
    let sequences_per_forward: usize = arg(&args, "--sft-sequences-per-forward")
        .unwrap_or("4".into())
        .parse()?;
    anyhow::ensure!(
        [1, 2, 4].contains(&pairs_per_forward) && [1, 2, 4].contains(&sequences_per_forward),
        "--dpo-pairs-per-forward and --sft-sequences-per-forward must be 1, 2 or 4"
    );
    let full = args.iter().any(|a| a == "--full");
    let checkpointing = args.iter().any(|a| a == "--gradient-checkpointing");
    let mixed = arg(&args, "--mixed-precision").unwrap_or("no".into());
    let compute = match mixed.as_str() {
        "no" => DType::F32,
        "bf16" => DType::BF16,
        "fp16" => DType::F16,
        other => anyhow::bail!("--mixed-precision {other}: expected no, bf16 or fp16"),
    };
    let threads = rayon::current_num_threads();
    // As the trainer: full fine-tuning keeps f32 master weights, LoRA's frozen base is held in
    // the compute dtype.
    let frozen = if full { DType::F32 } else { compute };
    let pre = Pretrained::load(model_dir.as_ref(), Some(frozen), &Device::Cpu)?;
    let vocab = pre.config.vocab_size as u32;
    let lora = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .iter()
        .map(|t| TargetModule::parse(t))
        .collect::<Result<_>>()?,
        use_rslora: false,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for objective in objectives.split(',') {
        let params = if full {
            Trainable::full(&pre.config, &pre.weights, compute)?
        } else {
            Trainable::lora(&pre.config, &pre.weights, &lora, None, 0, DType::F32)?
        };
        let mut opt = AdamW::new(
            &params.vars,
            AdamWParams {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )?;
        let build = || -> Result<_> {
            params
                .model(Mode::Differentiable)?
                .with_gradient_checkpointing(checkpointing)
        };
        let mut model = build()?;
        let (sft, chosen, rejected): (Vec<_>, Vec<_>, Vec<_>) = (
            (0..4)
                .map(|_| random_seq(&mut rng, vocab, 256, 256))
                .collect(),
            (0..4)
                .map(|_| random_seq(&mut rng, vocab, 256, 256))
                .collect(),
            (0..4)
                .map(|_| random_seq(&mut rng, vocab, 256, 256))
                .collect(),
        );
        let pad = pre.pad_token_id();
        let reference = if objective == "dpo" {
            let weights = pre
                .weights
                .iter()
                .map(|(n, t)| Ok((n.clone(), t.to_dtype(compute)?)))
                .collect::<Result<paft::model::WeightMap>>()?;
            let net = paft::model::LlamaModel::from_weights(
                &pre.config,
                &weights,
                None,
                Mode::Differentiable,
            )?;
            let (c, r) = pair_logps(&net, &refs(&chosen), &refs(&rejected), pad)?;
            Some((c.detach(), r.detach()))
        } else {
            None
        };
        let baseline = status_gb("VmRSS")?;
        let mut times = vec![];
        for step in 0..=steps {
            let t0 = Instant::now();
            if step > 0 && params.model_is_a_snapshot() {
                model = build()?;
            }
            // Either objective may split the batch into micro-batches and accumulate: the mean of their
            // losses, so the gradient equals the 4-pair batch's.
            let micro: Vec<(usize, usize)> = match objective {
                "sft" => (0..4)
                    .step_by(sequences_per_forward)
                    .map(|i| (i, i + sequences_per_forward))
                    .collect(),
                "dpo" => (0..4)
                    .step_by(pairs_per_forward)
                    .map(|i| (i, i + pairs_per_forward))
                    .collect(),
                other => anyhow::bail!("unknown objective {other}"),
            };
            let mut grads: Vec<Option<candle_core::Tensor>> = vec![None; params.vars.len()];
            for &(a, b) in &micro {
                let loss = match objective {
                    "sft" => sft_loss(&model, &refs(&sft[a..b]), pad)?.0,
                    _ => {
                        let (c, r) =
                            pair_logps(&model, &refs(&chosen[a..b]), &refs(&rejected[a..b]), pad)?;
                        let (rc, rr) = reference.as_ref().unwrap();
                        let (rc, rr) = (rc.narrow(0, a, b - a)?, rr.narrow(0, a, b - a)?);
                        dpo_loss(
                            (&c, &r),
                            Some((&rc, &rr)),
                            DpoParams {
                                beta: 0.1,
                                label_smoothing: 0.0,
                            },
                        )?
                        .loss
                    }
                };
                let loss = (loss / micro.len() as f64)?;
                let mut store = loss.backward()?;
                let trainable: Vec<&candle_core::Tensor> =
                    params.vars.iter().map(|v| v.as_tensor()).collect();
                model.backward_checkpoints(&mut store, &trainable)?;
                for (g, new) in grads.iter_mut().zip(collect_grads(&params.vars, &store)) {
                    *g = match (g.take(), new) {
                        (Some(x), Some(y)) => Some((x + y)?),
                        (x, y) => x.or(y),
                    };
                }
            }
            opt.step(&params.vars, &grads, &params.decay, 1e-4)?;
            if step > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let per_forward = if objective == "sft" {
            sequences_per_forward
        } else {
            2 * pairs_per_forward
        };
        let peak = status_gb("VmHWM")?;
        println!(
            "{}",
            serde_json::json!({
                "impl": "paft",
                "objective": objective,
                "threads": threads,
                "seconds_per_step": (mean * 1000.0).round() / 1000.0,
                "steps": times.len(),
                "sequences_per_forward": per_forward,
                "each": times,
                "trainable": if full { "full" } else { "lora" },
                "gradient_checkpointing": checkpointing,
                "mixed_precision": mixed,
                "rss_before_gb": (baseline * 1000.0).round() / 1000.0,
                "peak_rss_gb": (peak * 1000.0).round() / 1000.0,
                "peak_excess_gb_per_sequence": ((peak - baseline) / per_forward as f64 * 1000.0).round() / 1000.0,
            })
        );
    }
    Ok(())
}
