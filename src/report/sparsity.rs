//! The SFT and preference task vectors' sparsity, side by side, from the JSON that
//! `paft inspect-delta --json` writes (`deltas/sft.json`, `deltas/dpo.json` or
//! `deltas/orpo.json`, and `deltas/sft-<variant>.json` for an experiment's SFT variants).

use std::path::Path;

use anyhow::{Context, Result};
use polars::prelude::{Column, DataFrame};

use crate::merge::inspect::{DeltaReport, DeltaStats};

/// A delta report with the row label it gets.
#[derive(Debug, Clone)]
pub struct NamedDelta {
    pub label: String,
    pub report: DeltaReport,
}

/// A delta file's row label and its place in the table: SFT, its variants (`sft-<name>.json`,
/// from an experiment's `[sft_variants]`), the preference runs, then any other file by name.
fn label_of(stem: &str) -> (u8, String) {
    match stem {
        "sft" => (0, "SFT".into()),
        "dpo" => (2, "DPO".into()),
        "orpo" => (2, "ORPO".into()),
        other => match other.strip_prefix("sft-") {
            Some(variant) => (1, format!("SFT ({variant})")),
            None => (3, other.to_string()),
        },
    }
}

/// Every `*.json` delta report in `dir`, in table order (none when the directory is missing).
pub fn read_deltas(dir: &Path) -> Result<Vec<NamedDelta>> {
    let mut found = vec![];
    for (name, path) in super::entries(dir)? {
        if let Some(stem) = name.strip_suffix(".json").filter(|_| path.is_file()) {
            let (slot, label) = label_of(stem);
            found.push((slot, stem.to_string(), label, path));
        }
    }
    found.sort();
    let mut out = vec![];
    for (_, _, label, path) in found {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let report: DeltaReport = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a delta report (`paft inspect-delta --json`)",
                path.display()
            )
        })?;
        out.push(NamedDelta { label, report });
    }
    Ok(out)
}

/// Reads one statistic of a delta.
type Stat = fn(&DeltaStats) -> f64;

/// Percent columns, in order, with the fraction they show.
const PERCENT_COLUMNS: [(&str, Stat); 4] = [
    ("=0 %", |d| d.frac_zero),
    ("<1e-6 %", |d| d.frac_below_1e6),
    ("<1e-4 %", |d| d.frac_below_1e4),
    ("<1% max %", |d| d.frac_below_1pct_max),
];

/// Columns shown in scientific notation.
pub const NORM_COLUMNS: [&str; 3] = ["L1", "L2", "max |δ|"];

/// One row per delta (overall), followed by its LoRA A and B factors when it is an adapter:
/// `delta, part, numel, =0 %, <1e-6 %, <1e-4 %, <1% max %, L1, L2, max |δ|`.
pub fn sparsity_frame(deltas: &[NamedDelta]) -> Result<DataFrame> {
    let rows: Vec<(&str, &str, &DeltaStats)> = deltas
        .iter()
        .flat_map(|d| {
            let r = &d.report;
            std::iter::once((d.label.as_str(), "all", &r.overall))
                .chain(r.lora_a.iter().map(|s| (d.label.as_str(), "lora_A", s)))
                .chain(r.lora_b.iter().map(|s| (d.label.as_str(), "lora_B", s)))
        })
        .collect();
    let f = |name: &str, get: &dyn Fn(&DeltaStats) -> f64| {
        Column::new(
            name.into(),
            rows.iter().map(|(_, _, s)| get(s)).collect::<Vec<f64>>(),
        )
    };
    let mut columns = vec![
        Column::new("delta".into(), rows.iter().map(|r| r.0).collect::<Vec<_>>()),
        Column::new("part".into(), rows.iter().map(|r| r.1).collect::<Vec<_>>()),
        Column::new(
            "numel".into(),
            rows.iter().map(|r| r.2.numel as u64).collect::<Vec<_>>(),
        ),
    ];
    for (name, frac) in PERCENT_COLUMNS {
        columns.push(f(name, &|s| 100.0 * frac(s)));
    }
    columns.push(f(NORM_COLUMNS[0], &|s| s.l1));
    columns.push(f(NORM_COLUMNS[1], &|s| s.l2));
    columns.push(f(NORM_COLUMNS[2], &|s| s.max_abs));
    Ok(DataFrame::new(rows.len(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(lora: bool) -> DeltaReport {
        let t = DeltaStats::of("w", &[0.0, 0.5, -1.0, 1e-7]);
        DeltaReport {
            base: "b".into(),
            model: "m".into(),
            overall: DeltaStats::total("(all)", std::slice::from_ref(&t)),
            tensors: vec![t],
            lora_a: lora.then(|| DeltaStats::of("lora_A", &[1.0, 2.0])),
            lora_b: lora.then(|| DeltaStats::of("lora_B", &[0.0, 0.0])),
        }
    }

    #[test]
    fn reports_round_trip_and_line_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("sft.json"),
            serde_json::to_string(&report(false)).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("dpo.json"),
            serde_json::to_string(&report(true)).unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sft-sparse.json"),
            serde_json::to_string(&report(false)).unwrap(),
        )
        .unwrap();
        let deltas = read_deltas(dir.path()).unwrap();
        let labels: Vec<&str> = deltas.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels, ["SFT", "SFT (sparse)", "DPO"]);
        std::fs::remove_file(dir.path().join("sft-sparse.json")).unwrap();
        let deltas = read_deltas(dir.path()).unwrap();
        let df = sparsity_frame(&deltas).unwrap();
        assert_eq!(df.height(), 4);
        let part = df.column("part").unwrap().str().unwrap();
        assert_eq!(part.get(2), Some("lora_A"));
        let zero = df.column("=0 %").unwrap().f64().unwrap();
        assert_eq!(zero.get(0), Some(25.0));
        assert_eq!(zero.get(3), Some(100.0));

        std::fs::write(dir.path().join("orpo.json"), "{\"base\": 1}").unwrap();
        let err = format!("{:#}", read_deltas(dir.path()).unwrap_err());
        assert!(err.contains("orpo.json"), "{err}");
    }
}
