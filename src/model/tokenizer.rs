//! A model's tokenizer: `tokenizer.json` (Hugging Face `tokenizers`) plus what
//! `tokenizer_config.json` adds — special tokens, `add_bos_token` and the chat template.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Clone)]
pub struct ModelTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub chat_template: Option<String>,
}

fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        // Older configs store AddedToken objects.
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl ModelTokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from a model directory.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            bail!(
                "{}: missing (paft needs a fast-tokenizer tokenizer.json)",
                path.display()
            );
        }
        let inner = Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = tokenizer_config(dir)?;
        let chat_template = declared_chat_template(dir, &cfg)?;
        let tokenizer = Self {
            inner,
            path,
            bos_token: special_token(&cfg, "bos_token"),
            eos_token: special_token(&cfg, "eos_token"),
            pad_token: special_token(&cfg, "pad_token"),
            chat_template,
        };
        tokenizer
            .check_special_token_flags(&cfg)
            .with_context(|| format!("{}", cfg_path.display()))?;
        if cfg.get("clean_up_tokenization_spaces") == Some(&Value::Bool(true)) {
            tracing::warn!(
                "{}: clean_up_tokenization_spaces is true; paft decodes without it, as transformers 5 \
                 does for BPE tokenizers (transformers 4 would strip spaces before punctuation)",
                cfg_path.display()
            );
        }
        Ok(tokenizer)
    }

    /// transformers 5 rebuilds the post-processor from an explicit `add_bos_token` /
    /// `add_eos_token` (transformers 4 does for Llama tokenizers only); paft encodes with
    /// tokenizer.json's post-processor. Where the two disagree the generations differ, so refuse.
    fn check_special_token_flags(&self, cfg: &Value) -> Result<()> {
        let probe = self.encode("a", true)?;
        let plain = self.encode("a", false)?;
        let checks = [
            (
                "add_bos_token",
                &self.bos_token,
                probe.first() != plain.first(),
            ),
            (
                "add_eos_token",
                &self.eos_token,
                probe.last() != plain.last(),
            ),
        ];
        for (key, token, post_processor_adds) in checks {
            let Some(flag) = cfg.get(key).and_then(Value::as_bool) else {
                continue;
            };
            if flag && token.is_none() {
                continue; // transformers turns the flag off when the token is undefined
            }
            if flag != post_processor_adds {
                bail!(
                    "`{key}` is {flag} but tokenizer.json's post-processor {} it; transformers 4 and 5 \
                     disagree on which wins, so fix one of the two files",
                    if post_processor_adds { "adds" } else { "does not add" }
                );
            }
        }
        Ok(())
    }

    pub fn from_tokenizer(inner: Tokenizer, path: PathBuf) -> Self {
        Self {
            inner,
            path,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            chat_template: None,
        }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids as transformers' `tokenizer(text)` gives them (`add_special_tokens` applies the
    /// tokenizer's post-processor, e.g. a BOS for Llama 2, nothing for SmolLM2).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", self.path.display()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", self.path.display()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// One past the largest id the tokenizer can produce (added tokens included).
    pub fn id_bound(&self) -> usize {
        let vocab = self.inner.get_vocab(true);
        vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Every token with its id, added tokens included.
    pub fn vocab(&self) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    /// Renders the chat template with minijinja (Python string methods enabled, as
    /// transformers' Jinja environment has them).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().with_context(|| {
            format!(
                "{}: the tokenizer has no chat_template",
                self.path.display()
            )
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
    }
}

/// `tokenizer_config.json` of a model directory (null when it has none).
pub(crate) fn tokenizer_config(dir: &Path) -> Result<Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(Value::Null);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The chat template a model directory declares, as transformers reads it: `chat_template.jinja`
/// when there is one (it takes priority over the config's), else `tokenizer_config.json`'s
/// `chat_template` (text, or the `default` entry of a list of named templates).
pub(crate) fn declared_chat_template(
    dir: &Path,
    tokenizer_config: &Value,
) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja)
            .with_context(|| format!("cannot read {}", jinja.display()))?;
        return Ok(Some(text));
    }
    Ok(match tokenizer_config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(a)) => a
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str).map(String::from)),
        _ => None,
    })
}

pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // transformers renders with trim_blocks and lstrip_blocks.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .context("chat template does not parse")?;
    let tmpl = env.get_template("chat")?;
    let out = tmpl
        .render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
        })
        .context("chat template failed to render")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// transformers: a `chat_template.jinja` file takes priority over the config's entry.
    #[test]
    fn chat_template_jinja_wins_over_the_config_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(
            declared_chat_template(tmp.path(), &cfg).unwrap().as_deref(),
            Some("D")
        );
        std::fs::write(tmp.path().join("chat_template.jinja"), "J").unwrap();
        assert_eq!(
            declared_chat_template(tmp.path(), &cfg).unwrap().as_deref(),
            Some("J")
        );
        assert_eq!(
            tokenizer_config(&tmp.path().join("none")).unwrap(),
            Value::Null
        );
    }

    #[test]
    fn chatml_with_default_system_prompt() {
        let out = render_chat_template(CHATML, &[ChatMessage::new("user", "Hi")], true, None, None)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise() {
        let t = "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}{{ messages[0]['content'].strip() }}";
        assert_eq!(
            render_chat_template(t, &[ChatMessage::new("user", "  x ")], false, None, None)
                .unwrap(),
            "x"
        );
        let err = render_chat_template(t, &[ChatMessage::new("bad", "x")], false, None, None)
            .unwrap_err();
        assert!(format!("{err:#}").contains("no bad roles"));
    }
}
