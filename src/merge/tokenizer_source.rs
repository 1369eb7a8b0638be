//! mergekit's `tokenizer_source` (or `tokenizer: {source: …}`): which tokenizer the merged
//! model gets. mergekit then rebuilds every input's embedding rows in that tokenizer's order,
//! and sizes the output's vocabulary to it. paft merges rows as stored, which is the same
//! merge exactly when every input has the output tokenizer's vocabulary, token for id, and that
//! vocabulary fills the embedding: that is checked here, and anything else is refused.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::config::ModelRef;
use crate::model::{source, ModelFiles, ModelTokenizer};

#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// The base model's tokenizer (the first model's without a base, as mergekit takes it).
    Base,
    /// The union of the inputs' vocabularies, built on the base's.
    Union,
    /// One model's tokenizer.
    Model(ModelRef),
}

impl TokenizerSource {
    fn parse(v: &Value, what: &str) -> Result<Self> {
        Ok(match v {
            Value::String(s) if s == "base" => Self::Base,
            Value::String(s) if s == "union" => Self::Union,
            other => Self::Model(
                ModelRef::from_yaml(other)
                    .with_context(|| format!("{what}: `base`, `union` or a model"))?,
            ),
        })
    }

    /// `tokenizer_source:` or the `tokenizer:` block (mergekit refuses both together). Of the
    /// block, `source` (default `union`, as mergekit's) is read; `tokens` (embeddings for added
    /// tokens) is refused; `pad_to_multiple_of` is returned to be checked with the models.
    pub(crate) fn from_config(
        top: &serde_json::Map<String, Value>,
    ) -> Result<Option<(Self, Option<usize>)>> {
        let plain = top.get("tokenizer_source").filter(|v| !v.is_null());
        let block = top.get("tokenizer").filter(|v| !v.is_null());
        match (plain, block) {
            (Some(_), Some(_)) => bail!("give `tokenizer_source` or `tokenizer`, not both"),
            (Some(v), None) => Ok(Some((Self::parse(v, "tokenizer_source")?, None))),
            (None, Some(b)) => {
                let b = b
                    .as_object()
                    .context("`tokenizer` must be a mapping (source, pad_to_multiple_of)")?;
                if let Some(k) = b
                    .keys()
                    .find(|k| !["source", "pad_to_multiple_of"].contains(&k.as_str()))
                {
                    bail!(
                        "tokenizer: `{k}` is not supported (paft reads `source` and \
                         `pad_to_multiple_of`; embeddings for added tokens need mergekit)"
                    );
                }
                let source = match b.get("source").filter(|v| !v.is_null()) {
                    Some(v) => Self::parse(v, "tokenizer.source")?,
                    None => Self::Union,
                };
                let pad = match b.get("pad_to_multiple_of").filter(|v| !v.is_null()) {
                    Some(v) => Some(
                        v.as_u64()
                            .filter(|&m| m > 0)
                            .context("tokenizer.pad_to_multiple_of must be a positive integer")?
                            as usize,
                    ),
                    None => None,
                };
                Ok(Some((source, pad)))
            }
            (None, None) => Ok(None),
        }
    }
}

/// One input as the check sees it: its name in the config and its files.
pub(crate) struct Input<'a> {
    pub label: String,
    pub files: &'a ModelFiles,
}

/// The directory whose tokenizer files the output gets, after checking that the merge is the
/// one mergekit computes: every input (base first) shares the output tokenizer's vocabulary,
/// which fills the embedding (`vocab_size`), padded or not as `pad_to_multiple_of` asks.
pub(crate) fn donor(
    source: &TokenizerSource,
    pad_to_multiple_of: Option<usize>,
    inputs: &[Input],
) -> Result<PathBuf> {
    let first = inputs.first().context("no models to merge")?;
    // Base and union are built on the base's (or the first model's) tokenizer, already
    // loaded with its files; with one shared vocabulary the union adds nothing.
    let (out_dir, loaded) = match source {
        TokenizerSource::Base | TokenizerSource::Union => (first.files.dir.clone(), None),
        TokenizerSource::Model(r) => {
            let dir = source::resolve_model(&r.model, r.revision.as_deref())
                .with_context(|| format!("tokenizer source {r}"))?;
            let tok = ModelTokenizer::load_dir(&dir)
                .with_context(|| format!("the output tokenizer ({})", dir.display()))?;
            (dir, Some(tok))
        }
    };
    let out_tok = loaded
        .as_ref()
        .or(first.files.tokenizer.as_ref())
        .with_context(|| {
            format!(
                "the output tokenizer: {} has no tokenizer.json",
                out_dir.display()
            )
        })?;
    let vocab = out_tok.vocab();
    let rows = first.files.config.vocab_size;
    if let Some(m) = pad_to_multiple_of.filter(|m| vocab.len() % m != 0) {
        bail!(
            "tokenizer: padding {} tokens to a multiple of {m} gives rows that mergekit fills \
             with the mean embedding; paft does not",
            vocab.len()
        );
    }
    if rows != vocab.len() {
        bail!(
            "with a tokenizer source the output's vocabulary is the tokenizer's {} tokens, but \
             the embeddings have {rows} rows: mergekit would resize them, paft does not (leave \
             `tokenizer_source` out to merge the rows as stored)",
            vocab.len()
        );
    }
    for input in inputs {
        let Some(tok) = &input.files.tokenizer else {
            // mergekit: "Unable to load tokenizer … Assuming same as base".
            tracing::warn!(
                "model {}: no tokenizer; taken to share the output tokenizer's vocabulary, as \
                 mergekit assumes",
                input.label
            );
            continue;
        };
        if let Some(difference) = first_difference(&vocab, &tok.vocab()) {
            bail!(
                "model {}: its vocabulary differs from the output tokenizer's ({difference}); \
                 mergekit would realign its embedding rows token by token, paft does not",
                input.label
            );
        }
    }
    Ok(out_dir)
}

/// A token whose id differs between the two vocabularies, or that only one has.
fn first_difference(want: &HashMap<String, u32>, have: &HashMap<String, u32>) -> Option<String> {
    let mut tokens: Vec<(&String, &u32)> = want.iter().collect();
    tokens.sort_by_key(|(_, id)| **id);
    for (token, id) in tokens {
        match have.get(token) {
            None => return Some(format!("it lacks `{token}` (id {id})")),
            Some(other) if other != id => {
                return Some(format!("`{token}` is id {other}, not {id}"));
            }
            Some(_) => {}
        }
    }
    (have.len() != want.len()).then(|| {
        format!(
            "it has {} tokens, the output tokenizer {}",
            have.len(),
            want.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[(&str, u32)]) -> HashMap<String, u32> {
        tokens.iter().map(|(t, i)| (t.to_string(), *i)).collect()
    }

    #[test]
    fn reads_both_forms_and_refuses_what_it_cannot_do() {
        let parse = |yaml: &str| {
            let v: Value = serde_saphyr::from_str(yaml).unwrap();
            TokenizerSource::from_config(v.as_object().unwrap())
        };
        assert_eq!(
            parse("tokenizer_source: base").unwrap(),
            Some((TokenizerSource::Base, None))
        );
        assert_eq!(
            parse("tokenizer: {}").unwrap(),
            Some((TokenizerSource::Union, None))
        );
        assert_eq!(
            parse("tokenizer: {source: m, pad_to_multiple_of: 64}").unwrap(),
            Some((TokenizerSource::Model(ModelRef::parse("m")), Some(64)))
        );
        assert_eq!(parse("x: 1").unwrap(), None);
        let err = |yaml: &str| format!("{:#}", parse(yaml).unwrap_err());
        assert!(err("tokenizer_source: base\ntokenizer: {source: base}").contains("not both"));
        assert!(err("tokenizer: {tokens: {a: {source: zero}}}").contains("`tokens`"));
        assert!(err("tokenizer: {pad_to_multiple_of: 0}").contains("positive"));
    }

    #[test]
    fn names_the_first_token_that_differs() {
        let want = vocab(&[("a", 0), ("b", 1), ("c", 2)]);
        assert_eq!(first_difference(&want, &want.clone()), None);
        let swapped = vocab(&[("a", 0), ("c", 1), ("b", 2)]);
        assert_eq!(
            first_difference(&want, &swapped).as_deref(),
            Some("`b` is id 2, not 1")
        );
        let short = vocab(&[("a", 0), ("b", 1)]);
        assert_eq!(
            first_difference(&want, &short).as_deref(),
            Some("it lacks `c` (id 2)")
        );
        let long = vocab(&[("a", 0), ("b", 1), ("c", 2), ("d", 3)]);
        assert_eq!(
            first_difference(&want, &long).as_deref(),
            Some("it has 4 tokens, the output tokenizer 3")
        );
    }
}
