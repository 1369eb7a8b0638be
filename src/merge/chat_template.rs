//! mergekit's `chat_template`: the chat template the merged model's tokenizer carries, given as
//! Jinja text or as `auto` (the template most input models declare). The output's tokenizer
//! files are the donor's (the base model's, else the first model's); the template replaces the
//! donor's in them, saved as transformers 5 saves one: in `chat_template.jinja`, with none left
//! in `tokenizer_config.json`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::model::tokenizer::{declared_chat_template, tokenizer_config};

/// The names of the templates mergekit 0.1.5 bundles (`mergekit/_data/chat_templates`).
const MERGEKIT_BUNDLED: [&str; 5] = ["alpaca", "chatml", "exaone", "llama3", "mistral"];

#[derive(Debug, Clone, PartialEq)]
pub enum ChatTemplate {
    /// The template most input models (the base among them) declare; when none declares one,
    /// the donor's stays.
    Auto,
    /// Jinja text, written as given.
    Text(String),
}

impl ChatTemplate {
    /// Reads the YAML value with mergekit's rules: `auto`; a short name without `{` or a line
    /// break is one of mergekit's bundled templates, which paft does not ship, so an error;
    /// anything else must look like Jinja (≥ 20 characters with a `{`).
    pub(crate) fn from_yaml(v: &Value) -> Result<Self> {
        let s = v
            .as_str()
            .with_context(|| format!("`chat_template` must be text, got {v}"))?;
        if s == "auto" {
            return Ok(Self::Auto);
        }
        let looks_like_a_name = s.len() < 256 && !s.contains('\n') && !s.contains('{');
        if looks_like_a_name && MERGEKIT_BUNDLED.contains(&s) {
            bail!(
                "`chat_template: {s}` names a template bundled with mergekit, which paft does not \
                 ship: give the template's Jinja text instead, or `auto`"
            );
        }
        if s.len() < 20 || !s.contains('{') {
            bail!(
                "invalid `chat_template` `{s}`: expected Jinja text, `auto`, or one of mergekit's \
                 bundled names ({})",
                MERGEKIT_BUNDLED.join(", ")
            );
        }
        Ok(Self::Text(s.to_string()))
    }
}

/// The template a model directory declares, as transformers reads it.
fn declared(dir: &Path) -> Result<Option<String>> {
    declared_chat_template(dir, &tokenizer_config(dir)?)
}

/// The template most of `templates` are (compared stripped, as mergekit does); a tie goes to
/// the one that comes first (mergekit's order there is a Python set's, so arbitrary).
fn plurality(templates: &[String]) -> Option<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in templates {
        *counts.entry(t.trim()).or_default() += 1;
    }
    let most = counts.values().copied().max()?;
    templates
        .iter()
        .map(|t| t.trim())
        .find(|t| counts[t] == most)
        .map(String::from)
}

/// Gives the tokenizer files in `out` (the donor's, copied there) the configured template.
/// `sources` are the input models' directories, base first, in config order.
pub(crate) fn apply(template: &ChatTemplate, sources: &[&Path], out: &Path) -> Result<()> {
    let text = match template {
        ChatTemplate::Text(t) => t.clone(),
        ChatTemplate::Auto => {
            let mut templates = vec![];
            for dir in sources {
                templates.extend(declared(dir)?);
            }
            match plurality(&templates) {
                Some(t) => t,
                None => return Ok(()),
            }
        }
    };
    let config_path = out.join("tokenizer_config.json");
    if !config_path.is_file() && !out.join("tokenizer.json").is_file() {
        bail!(
            "`chat_template` is set, but the model whose tokenizer the merge copies has no \
             tokenizer files to carry it"
        );
    }
    if config_path.is_file() {
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        let mut cfg: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        if let Some(map) = cfg.as_object_mut() {
            if map.remove("chat_template").is_some() {
                std::fs::write(&config_path, serde_json::to_string_pretty(&cfg)? + "\n")
                    .with_context(|| format!("cannot write {}", config_path.display()))?;
            }
        }
    }
    let jinja = out.join("chat_template.jinja");
    std::fs::write(&jinja, text).with_context(|| format!("cannot write {}", jinja.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ChatTemplate> {
        ChatTemplate::from_yaml(&Value::String(s.to_string()))
    }

    #[test]
    fn reads_the_forms_mergekit_reads() {
        assert_eq!(parse("auto").unwrap(), ChatTemplate::Auto);
        let jinja = "{% for m in messages %}{{ m.content }}{% endfor %}";
        assert_eq!(parse(jinja).unwrap(), ChatTemplate::Text(jinja.to_string()));
        let e = format!("{:#}", parse("chatml").unwrap_err());
        assert!(
            e.contains("bundled with mergekit") && e.contains("Jinja"),
            "{e}"
        );
        let e = format!("{:#}", parse("my_template").unwrap_err());
        assert!(e.contains("invalid `chat_template`"), "{e}");
        assert!(parse("{{ x }}").is_err(), "shorter than 20 characters");
        assert!(ChatTemplate::from_yaml(&serde_json::json!(3)).is_err());
    }

    #[test]
    fn auto_takes_the_plurality_and_a_tie_the_first() {
        let t = |s: &str| s.to_string();
        assert_eq!(
            plurality(&[t("{{a}}"), t("{{b}}\n"), t("{{b}}")]),
            Some(t("{{b}}"))
        );
        assert_eq!(plurality(&[t("{{a}}"), t("{{b}}")]), Some(t("{{a}}")));
        assert_eq!(plurality(&[]), None);
    }

    #[test]
    fn the_template_goes_to_chat_template_jinja_and_leaves_tokenizer_config() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, out) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("out"),
        );
        for d in [&a, &b, &out] {
            std::fs::create_dir(d).unwrap();
        }
        let cfg = |template: Value| {
            serde_json::json!({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template})
                .to_string()
        };
        std::fs::write(a.join("tokenizer_config.json"), cfg("{{ 'A' }}".into())).unwrap();
        // A list of named templates: the `default` one counts.
        let named = serde_json::json!([{"name": "tool_use", "template": "{{ 'T' }}"},
                                      {"name": "default", "template": "{{ 'B' }}"}]);
        std::fs::write(b.join("tokenizer_config.json"), cfg(named)).unwrap();
        std::fs::write(b.join("chat_template.jinja"), "{{ 'B' }}\n").unwrap();
        assert_eq!(declared(&b).unwrap().as_deref(), Some("{{ 'B' }}\n"));
        std::fs::remove_file(b.join("chat_template.jinja")).unwrap();
        assert_eq!(declared(&b).unwrap().as_deref(), Some("{{ 'B' }}"));

        std::fs::copy(
            a.join("tokenizer_config.json"),
            out.join("tokenizer_config.json"),
        )
        .unwrap();
        let c = tmp.path().join("c");
        std::fs::create_dir(&c).unwrap();
        std::fs::write(c.join("tokenizer_config.json"), cfg("{{ 'B' }}".into())).unwrap();
        apply(&ChatTemplate::Auto, &[&a, &b, &c], &out).unwrap();
        let written = std::fs::read_to_string(out.join("chat_template.jinja")).unwrap();
        assert_eq!(written, "{{ 'B' }}");
        let left: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert!(left.get("chat_template").is_none());
        assert_eq!(left["tokenizer_class"], "PreTrainedTokenizerFast");

        let text = "{% for m in messages %}{{ m.content }}{% endfor %}";
        apply(&ChatTemplate::Text(text.into()), &[&a], &out).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(),
            text
        );
        // Nothing to attach it to.
        let bare = tmp.path().join("bare");
        std::fs::create_dir(&bare).unwrap();
        let e = format!(
            "{:#}",
            apply(&ChatTemplate::Text(text.into()), &[&a], &bare).unwrap_err()
        );
        assert!(e.contains("no tokenizer files"), "{e}");
    }
}
