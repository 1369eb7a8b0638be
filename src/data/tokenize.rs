//! Examples → token ids with a loss mask, as TRL builds them: prompt and prompt+completion are
//! encoded jointly (chat template for messages, EOS appended to plain-text completions), and
//! only completion (assistant) tokens are trained on.

use anyhow::{bail, Result};

use super::examples::{PreferenceExample, SftExample, Text};
use crate::model::{ChatMessage, ModelTokenizer};

#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedSequence {
    pub ids: Vec<u32>,
    /// Per position: whether the token is a training target.
    pub loss_mask: Vec<bool>,
}

impl TokenizedSequence {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub chosen: TokenizedSequence,
    pub rejected: TokenizedSequence,
}

/// What happens to a sequence longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Stop with an error naming the row (nothing is silently cut).
    #[default]
    Error,
    /// Keep the first `max_length` tokens (TRL's `truncation_mode="keep_start"`).
    KeepStart,
    /// Keep the last `max_length` tokens (TRL's `truncation_mode="keep_end"`): long prompts lose
    /// their beginning and the completion survives (multi-turn preference data).
    KeepEnd,
}

pub struct Tokenization<'a> {
    pub tokenizer: &'a ModelTokenizer,
    pub max_length: usize,
    pub truncation: Truncation,
}

impl Tokenization<'_> {
    fn render(&self, messages: &[ChatMessage], generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self
            .tokenizer
            .apply_chat_template(messages, generation_prompt)?;
        // The template already holds any special tokens.
        self.tokenizer.encode(&text, false)
    }

    /// `prompt` + `completion` with the mask on the completion.
    fn prompt_completion(&self, prompt: &Text, completion: &Text) -> Result<TokenizedSequence> {
        let (prompt_ids, full) = match (prompt, completion) {
            (Text::Plain(p), Text::Plain(c)) => {
                let prompt_ids = self.tokenizer.encode(p, true)?;
                let mut full = self.tokenizer.encode(&format!("{p}{c}"), true)?;
                if let Some(eos) = self.tokenizer.eos_token_id() {
                    if full.last() != Some(&eos) {
                        full.push(eos);
                    }
                }
                (prompt_ids, full)
            }
            (Text::Messages(p), Text::Messages(c)) => {
                let all: Vec<ChatMessage> = p.iter().chain(c).cloned().collect();
                (self.render(p, true)?, self.render(&all, false)?)
            }
            (Text::Messages(p), Text::Plain(c)) => {
                let all: Vec<ChatMessage> = p
                    .iter()
                    .cloned()
                    .chain([ChatMessage::new("assistant", c)])
                    .collect();
                (self.render(p, true)?, self.render(&all, false)?)
            }
            (Text::Plain(_), Text::Messages(_)) => {
                bail!("a plain-text prompt with a message-list completion: use the same format for both")
            }
        };
        let n = prompt_ids.len().min(full.len());
        let loss_mask = (0..full.len()).map(|i| i >= n).collect();
        Ok(TokenizedSequence {
            ids: full,
            loss_mask,
        })
    }

    /// A conversation with the mask on every assistant turn.
    fn conversation(&self, messages: &[ChatMessage]) -> Result<TokenizedSequence> {
        let ids = self.render(messages, false)?;
        let mut loss_mask = vec![false; ids.len()];
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let start = self.render(&messages[..i], true)?.len();
            let end = self.render(&messages[..=i], false)?.len().min(ids.len());
            for slot in loss_mask.iter_mut().take(end).skip(start) {
                *slot = true;
            }
        }
        Ok(TokenizedSequence { ids, loss_mask })
    }

    /// Applies the length limit; `what` names the row and field for errors.
    fn fit(&self, mut s: TokenizedSequence, what: &str) -> Result<TokenizedSequence> {
        if s.len() > self.max_length {
            match self.truncation {
                Truncation::Error => bail!(
                    "{what}: {} tokens, longer than max_length {} (raise max_length, or set \
                     truncation = \"keep_start\" or \"keep_end\" to cut as TRL does)",
                    s.len(),
                    self.max_length
                ),
                Truncation::KeepStart => {
                    s.ids.truncate(self.max_length);
                    s.loss_mask.truncate(self.max_length);
                }
                Truncation::KeepEnd => {
                    let cut = s.len() - self.max_length;
                    s.ids.drain(..cut);
                    s.loss_mask.drain(..cut);
                }
            }
        }
        if s.num_targets() == 0 {
            bail!(
                "{what}: no completion tokens to train on (empty completion, or cut by max_length)"
            );
        }
        Ok(s)
    }

    pub fn sft(&self, ex: &SftExample, what: &str) -> Result<TokenizedSequence> {
        let s = match ex {
            SftExample::Conversation(m) => self.conversation(m)?,
            SftExample::PromptCompletion { prompt, completion } => {
                if matches!(completion, Text::Plain(c) if c.is_empty()) {
                    bail!("{what}, field `completion`: empty completion");
                }
                self.prompt_completion(prompt, completion)?
            }
        };
        self.fit(s, what)
    }

    pub fn preference(&self, ex: &PreferenceExample, what: &str) -> Result<PreferencePair> {
        for (field, t) in [("chosen", &ex.chosen), ("rejected", &ex.rejected)] {
            let empty = match t {
                Text::Plain(s) => s.is_empty(),
                Text::Messages(m) => m.is_empty() || m.iter().all(|m| m.content.is_empty()),
            };
            if empty {
                bail!("{what}, field `{field}`: empty completion");
            }
        }
        Ok(PreferencePair {
            chosen: self.fit(
                self.prompt_completion(&ex.prompt, &ex.chosen)?,
                &format!("{what}, field `chosen`"),
            )?,
            rejected: self.fit(
                self.prompt_completion(&ex.prompt, &ex.rejected)?,
                &format!("{what}, field `rejected`"),
            )?,
        })
    }
}
