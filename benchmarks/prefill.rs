//! Prefill throughput: one forward pass over `seq` tokens with logits at every position (what
//! transformers' `model(input_ids)` computes), f32, batch 1 and 4. Prints one JSON line per batch.
//! Run through `benchmarks/run.sh prefill`, which also runs transformers and prints the ratio.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use paft::model::{Mode, Pretrained, TokenBatch};
use rand::{Rng, SeedableRng};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Result<()> {
    paft::process::setup();
    let model_dir = arg("--model", "target/bench-assets/smollm");
    let seq: usize = arg("--seq", "512").parse()?;
    let repeats: usize = arg("--repeats", "5").parse()?;
    let batches: Vec<usize> = arg("--batches", "1,4")
        .split(',')
        .map(|b| b.parse())
        .collect::<Result<_, _>>()?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let pre = Pretrained::load(model_dir.as_ref(), Some(DType::F32), &Device::Cpu)
        .with_context(|| format!("load {model_dir}"))?;
    let model = pre.model(Mode::Inference, None)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for &b in &batches {
        let seqs: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                (0..seq)
                    .map(|_| rng.random_range(0..pre.config.vocab_size as u32))
                    .collect()
            })
            .collect();
        let batch = TokenBatch::right_padded(&seqs, &vec![0; b], 0);
        let run = || -> Result<f64> {
            let t0 = Instant::now();
            let hidden = model.forward(&batch, None)?;
            let logits = model.logits(&hidden)?;
            // Touch the result so nothing is left lazy.
            let _ = logits.dims();
            Ok(t0.elapsed().as_secs_f64())
        };
        run()?; // warm-up
        let mut times: Vec<f64> = (0..repeats).map(|_| run()).collect::<Result<_>>()?;
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = times[times.len() / 2];
        println!(
            "{}",
            serde_json::json!({"impl": "paft", "batch": b, "seq": seq, "threads": threads, "median_s": median,
                "tokens_per_s": (b * seq) as f64 / median, "times_s": times})
        );
    }
    Ok(())
}
