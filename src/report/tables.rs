//! DataFrames out: display cells (for Markdown and HTML), Markdown, CSV and Parquet bytes, and the
//! files, each written atomically.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use polars::prelude::{AnyValue, CsvWriter, DataFrame, ParquetWriter, SerWriter};

use crate::io::write_file_atomic;

/// How a float column is shown in Markdown and HTML (CSV and Parquet keep their own precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatFormat {
    /// `{:.N}`: percentages as the leaderboard shows them.
    Fixed(usize),
    /// `{:.Ne}`: norms, whose scale varies by orders of magnitude.
    Sci(usize),
}

impl FloatFormat {
    pub fn show(self, v: f64) -> String {
        match self {
            FloatFormat::Fixed(p) => format!("{v:.p$}"),
            FloatFormat::Sci(p) => format!("{v:.p$e}"),
        }
    }
}

/// A frame as display strings: header and rows. Missing values are empty cells.
#[derive(Debug, Clone, PartialEq)]
pub struct Cells {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Per column: numbers are right-aligned.
    pub numeric: Vec<bool>,
}

pub fn cells(df: &DataFrame, format: &dyn Fn(&str) -> FloatFormat) -> Result<Cells> {
    let header: Vec<String> = df.columns().iter().map(|c| c.name().to_string()).collect();
    let numeric = df
        .columns()
        .iter()
        .map(|c| c.dtype().is_primitive_numeric())
        .collect();
    let mut rows = vec![];
    for i in 0..df.height() {
        let mut row = vec![];
        for c in df.columns() {
            let fmt = format(c.name());
            row.push(match c.get(i)? {
                AnyValue::Null => String::new(),
                AnyValue::Float64(v) if v.is_finite() => fmt.show(v),
                AnyValue::Float32(v) if v.is_finite() => fmt.show(v as f64),
                AnyValue::Float64(_) | AnyValue::Float32(_) => String::new(),
                AnyValue::String(s) => s.to_string(),
                AnyValue::StringOwned(s) => s.to_string(),
                other => other.to_string(),
            });
        }
        rows.push(row);
    }
    Ok(Cells {
        header,
        rows,
        numeric,
    })
}

/// What a `value ± stderr` cell shows where the stderr is missing (the page says why).
pub const NO_STDERR: &str = "n/a";

/// Display cells where every column `X` that has an `X<suffix>` column shows `value ± stderr`
/// (`value ± n/a` when only the stderr is missing, empty when the value is), and the stderr
/// columns themselves are dropped.
pub fn with_stderr(c: &Cells, suffix: &str) -> Cells {
    let pos = |name: &str| c.header.iter().position(|h| h == name);
    let mut keep = vec![];
    for (j, h) in c.header.iter().enumerate() {
        let is_stderr = h
            .strip_suffix(suffix)
            .is_some_and(|base| pos(base).is_some());
        if !is_stderr {
            keep.push((j, pos(&format!("{h}{suffix}"))));
        }
    }
    Cells {
        header: keep.iter().map(|&(j, _)| c.header[j].clone()).collect(),
        rows: c
            .rows
            .iter()
            .map(|row| {
                keep.iter()
                    .map(|&(j, se)| match se {
                        Some(k) if !row[j].is_empty() => {
                            let se = if row[k].is_empty() {
                                NO_STDERR
                            } else {
                                &row[k]
                            };
                            format!("{} ± {se}", row[j])
                        }
                        _ => row[j].clone(),
                    })
                    .collect()
            })
            .collect(),
        numeric: keep.iter().map(|&(j, _)| c.numeric[j]).collect(),
    }
}

/// A GitHub-flavoured Markdown table (numbers right-aligned, columns padded for plain reading).
pub fn markdown(c: &Cells) -> String {
    let esc = |s: &str| s.replace('|', "\\|");
    let header: Vec<String> = c.header.iter().map(|h| esc(h)).collect();
    let rows: Vec<Vec<String>> = c
        .rows
        .iter()
        .map(|r| r.iter().map(|s| esc(s)).collect())
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|j| {
            rows.iter()
                .map(|r| r[j].chars().count())
                .chain([header[j].chars().count(), 3])
                .max()
                .unwrap_or(3)
        })
        .collect();
    let line = |cells: &[String]| {
        let inner: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(j, s)| {
                let pad = " ".repeat(widths[j] - s.chars().count());
                if c.numeric[j] {
                    format!(" {pad}{s} ")
                } else {
                    format!(" {s}{pad} ")
                }
            })
            .collect();
        format!("|{}|\n", inner.join("|"))
    };
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(j, w)| {
            if c.numeric[j] {
                format!(" {}: ", "-".repeat(w - 1))
            } else {
                format!(" {} ", "-".repeat(*w))
            }
        })
        .collect();
    let mut s = line(&header);
    s += &format!("|{}|\n", rule.join("|"));
    for r in &rows {
        s += &line(r);
    }
    s
}

/// CSV with a header; `float_precision` digits after the point, or full precision.
pub fn csv_bytes(df: &mut DataFrame, float_precision: Option<usize>) -> Result<Vec<u8>> {
    let mut buf = vec![];
    CsvWriter::new(&mut buf)
        .include_header(true)
        .with_float_precision(float_precision)
        .finish(df)
        .context("cannot encode CSV")?;
    Ok(buf)
}

pub fn parquet_bytes(df: &mut DataFrame) -> Result<Vec<u8>> {
    let mut buf = vec![];
    ParquetWriter::new(&mut buf)
        .finish(df)
        .context("cannot encode Parquet")?;
    Ok(buf)
}

/// Writes `<stem>.csv` and `<stem>.parquet` into `dir`; returns their paths.
pub fn write_data(
    dir: &Path,
    stem: &str,
    df: &mut DataFrame,
    csv_precision: Option<usize>,
) -> Result<Vec<PathBuf>> {
    let csv = dir.join(format!("{stem}.csv"));
    write_file_atomic(&csv, &csv_bytes(df, csv_precision)?)?;
    let parquet = dir.join(format!("{stem}.parquet"));
    write_file_atomic(&parquet, &parquet_bytes(df)?)?;
    Ok(vec![csv, parquet])
}

/// Writes `<stem>.md` (the Markdown of `cells`), `<stem>.csv` and `<stem>.parquet`.
pub fn write_table(
    dir: &Path,
    stem: &str,
    df: &mut DataFrame,
    cells: &Cells,
    csv_precision: Option<usize>,
) -> Result<Vec<PathBuf>> {
    let md = dir.join(format!("{stem}.md"));
    write_file_atomic(&md, markdown(cells).as_bytes())?;
    let mut paths = vec![md];
    paths.extend(write_data(dir, stem, df, csv_precision)?);
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use polars::prelude::{Column, ParquetReader, SerReader};

    fn frame() -> DataFrame {
        DataFrame::new(
            2,
            vec![
                Column::new("Model".into(), ["a|b", "c"]),
                Column::new("ARC".into(), [Some(12.3456), None]),
                Column::new("L1".into(), [1234.5, 0.001]),
            ],
        )
        .unwrap()
    }

    #[test]
    fn cells_format_by_column_and_leave_missing_empty() {
        let fmt = |name: &str| {
            if name == "L1" {
                FloatFormat::Sci(2)
            } else {
                FloatFormat::Fixed(2)
            }
        };
        let c = cells(&frame(), &fmt).unwrap();
        assert_eq!(c.rows[0], ["a|b", "12.35", "1.23e3"]);
        assert_eq!(c.rows[1], ["c", "", "1.00e-3"]);
        assert_eq!(c.numeric, [false, true, true]);
        let md = markdown(&c);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("| Model "), "{md}");
        assert!(lines[1].contains("---:"), "{md}");
        assert!(lines[2].contains("a\\|b"), "{md}");
    }

    #[test]
    fn stderr_columns_become_plus_minus_cells() {
        let c = Cells {
            header: vec![
                "Model".into(),
                "ARC".into(),
                "L1".into(),
                "ARC_stderr".into(),
            ],
            rows: vec![
                vec!["a".into(), "41.21".into(), "1".into(), "1.44".into()],
                vec!["b".into(), "40.00".into(), "2".into(), "".into()],
                vec!["c".into(), "".into(), "3".into(), "".into()],
            ],
            numeric: vec![false, true, true, true],
        };
        let m = with_stderr(&c, "_stderr");
        assert_eq!(m.header, ["Model", "ARC", "L1"]);
        assert_eq!(m.rows[0], ["a", "41.21 ± 1.44", "1"]);
        // Missing stderr is said, never shown as 0; a missing value stays empty.
        assert_eq!(m.rows[1], ["b", "40.00 ± n/a", "2"]);
        assert_eq!(m.rows[2], ["c", "", "3"]);
        assert_eq!(m.numeric, [false, true, true]);
    }

    #[test]
    fn csv_and_parquet_round_trip() {
        let mut df = frame();
        let csv = String::from_utf8(csv_bytes(&mut df, Some(2)).unwrap()).unwrap();
        assert_eq!(csv.lines().next(), Some("Model,ARC,L1"));
        assert!(csv.contains("12.35"), "{csv}");
        let pq = parquet_bytes(&mut df).unwrap();
        let back = ParquetReader::new(std::io::Cursor::new(pq))
            .finish()
            .unwrap();
        assert!(back.equals_missing(&df));
    }
}
