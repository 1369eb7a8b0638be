//! `paft score` and `paft generate`: look at what a model does with a text.

use anyhow::Result;
use serde_json::json;

use super::ModelArgs;
use crate::model::{self, inference, ChatMessage, Mode, Pretrained};

fn load(args: &ModelArgs) -> Result<Pretrained> {
    let device = model::parse_device(&args.device)?;
    let dtype = model::parse_dtype(&args.dtype)?;
    let dir = model::source::resolve_model(&args.model, args.revision.as_deref())?;
    Pretrained::load(&dir, Some(dtype), &device)
}

pub fn score(args: &ModelArgs, text: &str, as_json: bool) -> Result<()> {
    let pre = load(args)?;
    let net = pre.model(Mode::Inference, None)?;
    let ids = pre.tokenizer.encode(text, true)?;
    if ids.is_empty() {
        anyhow::bail!("the text tokenizes to no tokens");
    }
    let lps = if ids.len() > 1 {
        inference::sequence_logprobs(&net, &[ids.clone()], pre.pad_token_id())?.remove(0)
    } else {
        vec![]
    };
    let sum: f64 = lps.iter().map(|&x| x as f64).sum();
    let tokens: Vec<String> = ids
        .iter()
        .map(|&i| pre.tokenizer.decode(&[i], false))
        .collect::<Result<_>>()?;
    if as_json {
        let logprobs: Vec<Option<f32>> = std::iter::once(None)
            .chain(lps.iter().map(|&x| Some(x)))
            .collect();
        println!(
            "{}",
            json!({"ids": ids, "tokens": tokens, "logprobs": logprobs, "sum_logprob": sum, "num_tokens": ids.len()})
        );
    } else {
        println!("{:>6}  {:>8}  {:>10}  token", "pos", "id", "logprob");
        for (i, (&id, tok)) in ids.iter().zip(&tokens).enumerate() {
            let lp = if i == 0 {
                "-".to_string()
            } else {
                format!("{:.4}", lps[i - 1])
            };
            println!("{i:>6}  {id:>8}  {lp:>10}  {tok:?}");
        }
        println!("sum logprob {sum:.4} over {} scored tokens", lps.len());
    }
    Ok(())
}

pub fn generate(args: &ModelArgs, prompt: &str, chat: bool, max_new_tokens: usize) -> Result<()> {
    let pre = load(args)?;
    let net = pre.model(Mode::Inference, None)?;
    let text = if chat {
        pre.tokenizer
            .apply_chat_template(&[ChatMessage::new("user", prompt)], true)?
    } else {
        prompt.to_string()
    };
    let ids = pre.tokenizer.encode(&text, true)?;
    let stop = pre.stop_token_ids();
    let out = inference::greedy_generate(&net, &[ids], max_new_tokens, &stop, pre.pad_token_id())?
        .remove(0);
    let visible: Vec<u32> = out.iter().copied().filter(|t| !stop.contains(t)).collect();
    println!("{}", pre.tokenizer.decode(&visible, true)?);
    Ok(())
}
