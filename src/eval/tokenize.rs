//! Requests turned into token ids exactly as lm-eval's Hugging Face backend does it, stored
//! compactly: the tokens a document's requests share, then each request's own tail.

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::task::{GenerationRequest, LoglikelihoodRequest, Requests};
use crate::model::ModelTokenizer;

/// The log-likelihood requests of one document.
#[derive(Debug, Clone)]
pub struct TokenizedChoices {
    /// Longest common prefix of the requests' token sequences.
    pub shared: Vec<u32>,
    /// Per request: its tokens after `shared`.
    pub tails: Vec<Vec<u32>>,
    /// Per request: how many of its last tokens are the continuation being scored.
    pub continuation_lens: Vec<usize>,
}

impl TokenizedChoices {
    pub fn len(&self) -> usize {
        self.tails.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tails.is_empty()
    }

    /// Full token sequence of request `i` (context window + continuation).
    pub fn tokens(&self, i: usize) -> Vec<u32> {
        [self.shared.as_slice(), &self.tails[i]].concat()
    }

    pub fn total_len(&self, i: usize) -> usize {
        self.shared.len() + self.tails[i].len()
    }
}

#[derive(Debug, Clone)]
pub struct TokenizedGeneration {
    pub context: Vec<u32>,
    pub until: Vec<String>,
    pub max_gen_toks: usize,
}

#[derive(Debug, Clone)]
pub enum TokenizedRequests {
    Loglikelihood(TokenizedChoices),
    Generate(TokenizedGeneration),
}

/// Tokenizes requests for a model with a context window of `max_length` tokens.
pub struct RequestEncoder<'a> {
    pub tokenizer: &'a ModelTokenizer,
    pub max_length: usize,
}

impl RequestEncoder<'_> {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // The tokenizer's own default for special tokens (BOS where the model adds one), as
        // lm-eval >= 0.4.9.2 does.
        self.tokenizer.encode(text, true)
    }

    /// `_encode_pair`: trailing context whitespace moves to the continuation; the continuation's
    /// tokens are `enc(context + continuation)` after `len(enc(context))` tokens. `contexts`
    /// caches context encodings (choices of a document share their context).
    pub fn encode_pair(
        &self,
        req: &LoglikelihoodRequest,
        contexts: &mut HashMap<String, Vec<u32>>,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let trimmed = req.context.trim_end_matches(char::is_whitespace);
        let moved = &req.context[trimmed.len()..];
        let continuation = format!("{moved}{}", req.continuation);
        let whole = self.encode(&format!("{trimmed}{continuation}"))?;
        let context_enc = match contexts.get(trimmed) {
            Some(c) => c.clone(),
            None => {
                let c = self.encode(trimmed)?;
                contexts.insert(trimmed.to_string(), c.clone());
                c
            }
        };
        if context_enc.is_empty() {
            bail!("empty context: these tasks always have one");
        }
        let continuation_enc = whole.get(context_enc.len()..).unwrap_or_default().to_vec();
        if continuation_enc.is_empty() {
            bail!(
                "continuation {:?} encodes to no tokens after its context",
                req.continuation
            );
        }
        Ok((context_enc, continuation_enc))
    }

    /// Joint sequence `(context + continuation)[-(max_length + 1):]` and the continuation length.
    fn window(
        &self,
        req: &LoglikelihoodRequest,
        contexts: &mut HashMap<String, Vec<u32>>,
    ) -> Result<(Vec<u32>, usize)> {
        let (ctx, cont) = self.encode_pair(req, contexts)?;
        if cont.len() > self.max_length {
            bail!(
                "continuation of {} tokens is longer than the model's context of {}",
                cont.len(),
                self.max_length
            );
        }
        let mut all = ctx;
        all.extend_from_slice(&cont);
        let start = all.len().saturating_sub(self.max_length + 1);
        Ok((all[start..].to_vec(), cont.len()))
    }

    pub fn tokenize(&self, requests: &Requests) -> Result<TokenizedRequests> {
        match requests {
            Requests::Loglikelihood(reqs) => {
                let mut contexts = HashMap::new();
                let mut seqs = vec![];
                let mut continuation_lens = vec![];
                for r in reqs {
                    let (seq, cl) = self.window(r, &mut contexts)?;
                    seqs.push(seq);
                    continuation_lens.push(cl);
                }
                if seqs.is_empty() {
                    bail!("a multiple-choice document without choices");
                }
                let shared_len = common_prefix_len(seqs.iter().map(Vec::as_slice));
                Ok(TokenizedRequests::Loglikelihood(TokenizedChoices {
                    shared: seqs[0][..shared_len].to_vec(),
                    tails: seqs.iter().map(|s| s[shared_len..].to_vec()).collect(),
                    continuation_lens,
                }))
            }
            Requests::Generate(g) => Ok(TokenizedRequests::Generate(self.generation(g)?)),
        }
    }

    fn generation(&self, g: &GenerationRequest) -> Result<TokenizedGeneration> {
        let mut context = self.encode(&g.context)?;
        // Left-truncated so the generated tokens still fit the context window.
        let keep = self.max_length.saturating_sub(g.max_gen_toks).max(1);
        if context.len() > keep {
            context.drain(..context.len() - keep);
        }
        if context.is_empty() {
            bail!("empty generation context");
        }
        Ok(TokenizedGeneration {
            context,
            until: g.until.clone(),
            max_gen_toks: g.max_gen_toks,
        })
    }
}

/// Length of the longest common prefix of all sequences (0 for none).
pub fn common_prefix_len<'a>(mut seqs: impl Iterator<Item = &'a [u32]>) -> usize {
    let Some(first) = seqs.next() else { return 0 };
    let mut n = first.len();
    for s in seqs {
        n = n.min(s.len());
        n = first[..n].iter().zip(s).take_while(|(a, b)| a == b).count();
    }
    n
}
