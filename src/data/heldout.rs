//! The fixed held-out split: one row in ten of every dataset file is reserved for measuring the
//! alignment tax (`crate::eval::alignment_tax`) and is never trained on.
//!
//! A row is held out when the 64-bit FNV-1a hash of its text is divisible by 10. Its text is the
//! raw JSONL line with trailing whitespace trimmed; for parquet, the row's canonical JSON
//! (compact, object keys sorted). The rule looks at nothing but the row: not the seed, the
//! config, the row's position or the Rust version (FNV-1a is written here because std's
//! `DefaultHasher` may change between releases). So a row stays on its side when the file is
//! reordered, cut or concatenated with others, and duplicated rows land on the same side.
//!
//! [`training_rows`] is the only reader training has; it drops the held-out rows always (no
//! setting turns this off), before `limit` is applied.

use std::path::Path;

use anyhow::{bail, Result};
use serde_json::Value;

use super::examples::read_rows;

/// A row is held out when `hash % HELD_OUT_EVERY == 0`.
const HELD_OUT_EVERY: u64 = 10;

/// 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether a row with this text (a JSONL line, trailing whitespace trimmed; a parquet row's
/// canonical JSON) is held out.
pub fn is_held_out(row_text: &str) -> bool {
    fnv1a64(row_text.as_bytes()).is_multiple_of(HELD_OUT_EVERY)
}

/// The rows training may use, with their 1-based line numbers: every row that is not held out.
pub fn training_rows(path: &Path) -> Result<Vec<(usize, Value)>> {
    let rows = read_rows(path)?;
    let total = rows.len();
    let kept: Vec<(usize, Value)> = rows
        .into_iter()
        .filter(|r| !is_held_out(&r.split_key))
        .map(|r| (r.line, r.value))
        .collect();
    let dropped = total - kept.len();
    tracing::info!(
        "{}: {dropped} of {total} rows held out for evaluation, never trained on",
        path.display()
    );
    if kept.is_empty() {
        bail!(
            "{}: all {total} rows are held out (a row is held out when the FNV-1a hash of its line \
             is divisible by {HELD_OUT_EVERY}); training needs rows that are not",
            path.display()
        );
    }
    Ok(kept)
}

/// A held-out row and its stable id, `"<file name>:<line number>"`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOutRow {
    pub id: String,
    pub line: usize,
    pub value: Value,
}

/// Every held-out row of `path` in file order, and the number of rows in the file.
fn all_held_out_rows(path: &Path) -> Result<(Vec<HeldOutRow>, usize)> {
    let rows = read_rows(path)?;
    let total = rows.len();
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let held = rows
        .into_iter()
        .filter(|r| is_held_out(&r.split_key))
        .map(|r| HeldOutRow {
            id: format!("{name}:{}", r.line),
            line: r.line,
            value: r.value,
        })
        .collect();
    Ok((held, total))
}

/// The first `n` held-out rows of `path` that `keep` selects and `usable` accepts, in file
/// order, with their ids. `keep` picks a share of the held-out rows (e.g. a search or report
/// pool; `|_| true` for all). `usable` returns `Ok(None)` for a row it cannot use (after saying
/// why), and the next held-out row takes its place, so the set keeps `n` rows; an error from it
/// stops.
pub fn first_usable_held_out_rows<T>(
    path: &Path,
    n: usize,
    keep: impl Fn(&HeldOutRow) -> bool,
    mut usable: impl FnMut(&HeldOutRow) -> Result<Option<T>>,
) -> Result<Vec<(String, T)>> {
    let (all_held, total) = all_held_out_rows(path)?;
    let held_total = all_held.len();
    let held: Vec<HeldOutRow> = all_held.into_iter().filter(|r| keep(r)).collect();
    let mut out = Vec::with_capacity(n);
    let mut unusable = 0;
    for row in &held {
        if out.len() == n {
            break;
        }
        match usable(row)? {
            Some(t) => out.push((row.id.clone(), t)),
            None => unusable += 1,
        }
    }
    if out.len() < n {
        let why = if unusable > 0 {
            format!(", and {unusable} of them cannot be used (see the warnings)")
        } else {
            String::new()
        };
        let share = if held.len() < held_total {
            format!(", {} of them in this pool", held.len())
        } else {
            String::new()
        };
        bail!(
            "{}: {n} held-out rows requested, but only {} can be used: the file has {held_total} \
             held-out rows of {total}{share} (a row is held out when the FNV-1a hash of its line \
             is divisible by {HELD_OUT_EVERY}){why}",
            path.display(),
            out.len()
        );
    }
    Ok(out)
}

/// The first `n` held-out rows of `path` in file order; an error if it has fewer.
pub fn first_held_out_rows(path: &Path, n: usize) -> Result<Vec<HeldOutRow>> {
    Ok(
        first_usable_held_out_rows(path, n, |_| true, |r| Ok(Some(r.clone())))?
            .into_iter()
            .map(|(_, r)| r)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// Lines `{"k": i}` for i in 0..n, and which of them (1-based) are held out, by the rule
    /// computed independently of `is_held_out` (so a broken rule cannot agree with itself).
    fn numbered_file(dir: &Path, n: usize) -> (PathBuf, Vec<usize>) {
        let lines: Vec<String> = (0..n).map(|i| format!("{{\"k\": {i}}}")).collect();
        let p = dir.join("rows.jsonl");
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        let held = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                let mut h = 0xcbf29ce484222325u64;
                for b in l.bytes() {
                    h = (h ^ b as u64).wrapping_mul(0x100000001b3);
                }
                h.is_multiple_of(10)
            })
            .map(|(i, _)| i + 1)
            .collect();
        (p, held)
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn training_and_held_out_rows_partition_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, held) = numbered_file(tmp.path(), 200);
        assert!(!held.is_empty() && held.len() < 40, "{held:?}");
        let train: Vec<usize> = training_rows(&p).unwrap().iter().map(|r| r.0).collect();
        let out = first_held_out_rows(&p, held.len()).unwrap();
        assert_eq!(out.iter().map(|r| r.line).collect::<Vec<_>>(), held);
        assert_eq!(out[0].id, format!("rows.jsonl:{}", held[0]));
        assert_eq!(out[0].value["k"], held[0] - 1);
        let mut all: Vec<usize> = train.iter().chain(&held).copied().collect();
        all.sort();
        assert_eq!(all, (1..=200).collect::<Vec<_>>());
    }

    #[test]
    fn trailing_whitespace_and_crlf_do_not_move_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, held) = numbered_file(tmp.path(), 100);
        let text = std::fs::read_to_string(&p).unwrap();
        let padded: String = text.lines().map(|l| format!("{l}  \r\n")).collect();
        let q = tmp.path().join("padded.jsonl");
        std::fs::write(&q, padded).unwrap();
        let lines = |p: &Path| -> Vec<usize> {
            first_held_out_rows(p, held.len())
                .unwrap()
                .iter()
                .map(|r| r.line)
                .collect()
        };
        assert_eq!(lines(&q), held);
    }

    #[test]
    fn too_few_held_out_rows_is_an_error_that_says_how_many() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, held) = numbered_file(tmp.path(), 50);
        let err = format!("{:#}", first_held_out_rows(&p, held.len() + 1).unwrap_err());
        assert!(
            err.contains("rows.jsonl")
                && err.contains(&format!("only {} can be used", held.len()))
                && err.contains(&format!("{} held-out rows of 50", held.len())),
            "{err}"
        );
    }

    #[test]
    fn unusable_rows_are_replaced_by_the_next_held_out_row() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, held) = numbered_file(tmp.path(), 300);
        assert!(held.len() >= 4);
        let got = first_usable_held_out_rows(
            &p,
            3,
            |_| true,
            |r| Ok((r.line != held[1]).then_some(r.line)),
        )
        .unwrap();
        assert_eq!(
            got.iter().map(|g| g.1).collect::<Vec<_>>(),
            vec![held[0], held[2], held[3]]
        );
        let n = held.len();
        let err =
            first_usable_held_out_rows(&p, n, |_| true, |r| Ok((r.line != held[1]).then_some(())))
                .unwrap_err();
        assert!(
            format!("{err:#}").contains("1 of them cannot be used"),
            "{err:#}"
        );
        // An error from the caller stops: it is not a skip.
        let err = first_usable_held_out_rows::<()>(&p, 1, |_| true, |_| bail!("schema error"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("schema error"));
    }

    #[test]
    fn a_file_of_held_out_rows_only_cannot_be_trained_on() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, held) = numbered_file(tmp.path(), 100);
        let text = std::fs::read_to_string(&p).unwrap();
        let only: Vec<&str> = held
            .iter()
            .map(|&l| text.lines().nth(l - 1).unwrap())
            .collect();
        let q = tmp.path().join("held.jsonl");
        std::fs::write(&q, only.join("\n")).unwrap();
        let err = format!("{:#}", training_rows(&q).unwrap_err());
        assert!(err.contains("held.jsonl") && err.contains("all"), "{err}");
        let err = format!(
            "{:#}",
            training_rows(&tmp.path().join("missing.jsonl")).unwrap_err()
        );
        assert!(err.contains("missing.jsonl"), "{err}");
    }

    #[test]
    fn parquet_rows_split_by_their_canonical_json() {
        let tmp = tempfile::tempdir().unwrap();
        let (p, _) = numbered_file(tmp.path(), 100);
        let keys: Vec<String> = (0..100)
            .map(|i| super::super::examples::canonical_json(&serde_json::json!({"k": i})))
            .collect();
        assert_eq!(keys[7], r#"{"k":7}"#);
        use polars::prelude::{JsonFormat, JsonReader, ParquetWriter, SerReader};
        let file = std::fs::File::open(&p).unwrap();
        let mut df = JsonReader::new(file)
            .with_json_format(JsonFormat::JsonLines)
            .finish()
            .unwrap();
        let q = tmp.path().join("rows.parquet");
        ParquetWriter::new(std::fs::File::create(&q).unwrap())
            .finish(&mut df)
            .unwrap();
        let want: Vec<usize> = (0..100)
            .filter(|&i| is_held_out(&keys[i]))
            .map(|i| i + 1)
            .collect();
        let got: Vec<usize> = first_held_out_rows(&q, want.len())
            .unwrap()
            .iter()
            .map(|r| r.line)
            .collect();
        assert!(!want.is_empty());
        assert_eq!(got, want);
    }

    /// The split on the shared training sets: stable (pinned counts and first rows, which would
    /// move if the hash or the row text changed) and about one row in ten.
    #[test]
    fn shared_sets_split_about_one_in_ten_and_stably() {
        let shared = crate::paths::shared_dir();
        let train = shared.join("data").join("train");
        assert!(
            train.is_dir(),
            "this test reads the shared training sets at {}: not found (set PAFT_SHARED to the \
             shared assets folder)",
            train.display()
        );
        for (rel, total, held, first) in [
            ("sft/mixed_qa.jsonl", 9543, 988, [2, 17, 22]),
            ("preference/hh_harmless.jsonl", 2307, 241, [4, 20, 42]),
        ] {
            let p = train.join(rel);
            let a = first_held_out_rows(&p, held).unwrap();
            assert_eq!(a, first_held_out_rows(&p, held).unwrap(), "{rel}");
            assert!(first_held_out_rows(&p, held + 1).is_err(), "{rel}");
            assert_eq!(
                a[..3].iter().map(|r| r.line).collect::<Vec<_>>(),
                first,
                "{rel}"
            );
            let train_rows = training_rows(&p).unwrap();
            assert_eq!(train_rows.len() + held, total, "{rel}");
            let share = held as f64 / total as f64;
            assert!((0.09..0.11).contains(&share), "{rel}: {share}");
        }
    }
}
