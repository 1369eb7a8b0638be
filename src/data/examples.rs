//! Dataset rows parsed into typed examples; a bad row is an error naming the file, the row and
//! the field.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use polars::prelude::{JsonFormat, JsonWriter, ParquetReader, SerReader, SerWriter};
use serde_json::Value;

use crate::model::ChatMessage;

/// A prompt or completion: plain text, or messages to render with the chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum Text {
    Plain(String),
    Messages(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum SftExample {
    /// A conversation; the loss covers the assistant turns.
    Conversation(Vec<ChatMessage>),
    /// The loss covers the completion.
    PromptCompletion { prompt: Text, completion: Text },
}

#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceExample {
    pub prompt: Text,
    pub chosen: Text,
    pub rejected: Text,
}

/// One row of a dataset file, before the held-out split.
pub(super) struct RawRow {
    /// 1-based line number (in the JSON-lines form for parquet), which error messages name.
    pub line: usize,
    /// The text whose hash decides the split (see [`super::heldout`]).
    pub split_key: String,
    pub value: Value,
}

/// Every row of a JSONL or parquet file, held-out rows included: only [`super::heldout`] calls
/// this, so that nothing else can read a row without going through the split.
pub(super) fn read_rows(path: &Path) -> Result<Vec<RawRow>> {
    let parquet = path.extension().is_some_and(|e| e == "parquet");
    let text = if parquet {
        parquet_to_jsonl(path)?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    let mut rows = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{}: row {}: malformed JSON", path.display(), i + 1))?;
        // A JSONL row is identified by its bytes as the user wrote them; a parquet row has no
        // text of its own, and polars' JSON rendering may change between versions, so it is
        // identified by a canonical rendering of its values.
        let split_key = if parquet {
            canonical_json(&value)
        } else {
            line.trim_end().to_string()
        };
        rows.push(RawRow {
            line: i + 1,
            split_key,
            value,
        });
    }
    if rows.is_empty() {
        bail!("{} has no rows", path.display());
    }
    Ok(rows)
}

/// Compact JSON with object keys sorted by their bytes, whatever order the map keeps
/// (serde_json's `preserve_order` feature would otherwise leak into the split).
pub(super) fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

fn where_(path: &Path, row: usize, field: &str) -> String {
    format!("{}: row {row}, field `{field}`", path.display())
}

fn messages(v: &Value, at: &str) -> Result<Vec<ChatMessage>> {
    let arr = v
        .as_array()
        .with_context(|| format!("{at}: expected a list of messages"))?;
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m["role"]
                .as_str()
                .with_context(|| format!("{at}[{i}]: message without a string `role`"))?;
            let content = m["content"]
                .as_str()
                .with_context(|| format!("{at}[{i}]: message without a string `content`"))?;
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn text(row: &Value, field: &str, path: &Path, n: usize) -> Result<Text> {
    let at = where_(path, n, field);
    match row.get(field) {
        None | Some(Value::Null) => bail!("{at}: missing"),
        Some(Value::String(s)) => Ok(Text::Plain(s.clone())),
        Some(v @ Value::Array(_)) => Ok(Text::Messages(messages(v, &at)?)),
        Some(other) => bail!("{at}: expected a string or a list of messages, got {other}"),
    }
}

pub fn parse_sft(path: &Path, rows: &[(usize, Value)]) -> Result<Vec<SftExample>> {
    rows.iter()
        .map(|(n, row)| {
            if let Some(m) = row.get("messages") {
                let msgs = messages(m, &where_(path, *n, "messages"))?;
                if !msgs.iter().any(|m| m.role == "assistant") {
                    bail!(
                        "{}: no assistant message to train on",
                        where_(path, *n, "messages")
                    );
                }
                return Ok(SftExample::Conversation(msgs));
            }
            if row.get("prompt").is_none() && row.get("completion").is_none() {
                bail!(
                    "{}: row {n}: an SFT row needs `messages` or `prompt` + `completion`",
                    path.display()
                );
            }
            Ok(SftExample::PromptCompletion {
                prompt: text(row, "prompt", path, *n)?,
                completion: text(row, "completion", path, *n)?,
            })
        })
        .collect()
}

pub fn parse_preference(path: &Path, rows: &[(usize, Value)]) -> Result<Vec<PreferenceExample>> {
    rows.iter()
        .map(|(n, row)| {
            Ok(PreferenceExample {
                prompt: text(row, "prompt", path, *n)?,
                chosen: text(row, "chosen", path, *n)?,
                rejected: text(row, "rejected", path, *n)?,
            })
        })
        .collect()
}

/// A dataset given as a local file or `hub:owner/name/path/in/repo.jsonl` (downloaded with hf-hub).
pub fn resolve_dataset(spec: &str) -> Result<PathBuf> {
    match spec.strip_prefix("hub:") {
        Some(rest) => {
            let mut parts = rest.splitn(3, '/');
            let (Some(owner), Some(name), Some(file)) = (parts.next(), parts.next(), parts.next())
            else {
                bail!("`{spec}`: a Hub dataset is hub:owner/name/path/to/file.jsonl");
            };
            let client =
                hf_hub::HFClientSync::new().context("cannot set up the Hugging Face Hub client")?;
            client
                .dataset(owner, name)
                .download_file()
                .filename(file.to_string())
                .send()
                .map_err(|e| anyhow::anyhow!("cannot download `{file}` of dataset `{owner}/{name}`: {e}; pass a local file instead"))
        }
        None => {
            let p = PathBuf::from(spec);
            if !p.is_file() {
                bail!("dataset file {} not found", p.display());
            }
            Ok(p)
        }
    }
}

/// A parquet file as JSON lines (one object per row, nested columns as JSON objects/arrays).
pub fn parquet_to_jsonl(path: &Path) -> Result<String> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut df = ParquetReader::new(file)
        .finish()
        .with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let mut buf = vec![];
    JsonWriter::new(&mut buf)
        .with_json_format(JsonFormat::JsonLines)
        .finish(&mut df)
        .with_context(|| format!("{}: cannot convert to JSON lines", path.display()))?;
    Ok(String::from_utf8(buf)?)
}
