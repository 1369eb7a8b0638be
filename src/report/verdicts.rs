//! The verdict table: PAFT against each baseline (and sequential against base), per benchmark,
//! for the leaderboard average and for the alignment tax: the difference first − second, its 95%
//! paired-bootstrap interval, and whether that interval excludes 0.

use std::collections::BTreeMap;

use anyhow::Result;
use polars::prelude::{Column, DataFrame};
use rayon::prelude::*;

use super::bootstrap::{self, BootstrapSettings, Interval, PairedMetric};
use super::evidence::{BenchmarkRecords, RowEvidence};
use super::pairing::{self, Names};
use super::rows::{
    EvaluatedRow, Pref, RowKind, PREF_ACCURACY_COLUMN, REWARD_MARGIN_COLUMN, SFT_LOSS_COLUMN,
};
use super::tables::Cells;
use crate::eval::task::Benchmark;

/// What a verdict row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Metric {
    Benchmark(Benchmark),
    Average,
    SftLoss,
    PrefAccuracy,
    RewardMargin,
}

impl Metric {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Metric::Benchmark(b) => b.column(),
            Metric::Average => "Average",
            Metric::SftLoss => SFT_LOSS_COLUMN,
            Metric::PrefAccuracy => PREF_ACCURACY_COLUMN,
            Metric::RewardMargin => REWARD_MARGIN_COLUMN,
        }
    }

    /// The bootstrap stream of this metric (fixed, so metrics draw independently of each other
    /// and of which others are present).
    fn stream(self) -> u64 {
        match self {
            Metric::Benchmark(b) => Benchmark::ALL.iter().position(|&x| x == b).unwrap_or(0) as u64,
            Metric::Average => u64::MAX,
            Metric::SftLoss => 6,
            Metric::PrefAccuracy => 7,
            Metric::RewardMargin => 8,
        }
    }

    fn lower_is_better(self) -> bool {
        self == Metric::SftLoss
    }

    /// Decimals shown: percent with two, nats and rewards with three.
    fn decimals(self) -> usize {
        match self {
            Metric::SftLoss | Metric::RewardMargin => 3,
            _ => 2,
        }
    }
}

/// A measured difference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Measured {
    pub interval: Interval,
    /// Items paired (documents over all tasks, held-out rows, preference pairs).
    pub items: usize,
    /// Fewest and most documents in one task: for a benchmark, in one of its strata (MMLU: one
    /// subject); for the average, in one benchmark (MMLU's subjects together), so that a
    /// sentence about the average does not quote a subject's few documents as a task's.
    pub per_task: (usize, usize),
    /// Items of the smallest benchmark (the metric's own items, except for the average, which
    /// is only as trustworthy as its thinnest part).
    pub min_items: usize,
}

/// Below this many items (documents of a benchmark, held-out rows, pairs) no "better" or
/// "worse" is drawn: the percentile bootstrap under-covers on small samples (with 4 documents
/// one discordant document gives an interval that stops just short of 0), so a verdict there
/// would be noise presented as a finding.
pub(crate) const MIN_ITEMS_FOR_VERDICT: usize = 30;

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VerdictRow {
    /// Name of the first row (`PAFT`), the one the verdict speaks of.
    pub a: String,
    pub b: String,
    pub metric: Metric,
    /// The measurement, or why there is none.
    pub outcome: std::result::Result<Measured, String>,
}

/// How an interval reads for `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Better,
    Worse,
    NotDistinguishable,
    /// An interval exists but rests on fewer than [`MIN_ITEMS_FOR_VERDICT`] items.
    TooFew,
    NoInterval,
}

impl VerdictRow {
    pub(crate) fn comparison(&self) -> String {
        format!("{} − {}", self.a, self.b)
    }

    pub(crate) fn verdict(&self) -> Verdict {
        match &self.outcome {
            Err(_) => Verdict::NoInterval,
            Ok(m) if !m.interval.excludes_zero() => Verdict::NotDistinguishable,
            Ok(m) if m.min_items < MIN_ITEMS_FOR_VERDICT => Verdict::TooFew,
            Ok(m) => {
                if (m.interval.low > 0.0) != self.metric.lower_is_better() {
                    Verdict::Better
                } else {
                    Verdict::Worse
                }
            }
        }
    }

    pub(crate) fn verdict_text(&self) -> String {
        match self.verdict() {
            Verdict::Better => format!("{} better", self.a),
            Verdict::Worse => format!("{} worse", self.a),
            Verdict::NotDistinguishable => "not distinguishable".into(),
            Verdict::TooFew => format!("too few documents (< {MIN_ITEMS_FOR_VERDICT})"),
            Verdict::NoInterval => "no interval".into(),
        }
    }
}

/// The kinds compared, first − second, in table order: each PAFT row (one per search) against
/// the sequential baseline, SFT and the preference model, then sequential against the base.
fn pairs(pafts: &[RowKind], pref: Pref) -> Vec<(RowKind, RowKind)> {
    let mut out = vec![];
    for paft in pafts {
        for other in [RowKind::Sequential, RowKind::Sft, RowKind::Pref(pref)] {
            out.push((paft.clone(), other));
        }
    }
    out.push((RowKind::Sequential, RowKind::Base));
    out
}

/// Short name of a row in the verdict table and the page's sentence.
pub(crate) fn short_name(kind: &RowKind) -> String {
    match kind {
        RowKind::Base => "base".into(),
        RowKind::Sft => "SFT".into(),
        RowKind::SftVariant(v) => format!("SFT {v}"),
        RowKind::Pref(p) => p.label().into(),
        RowKind::Sequential => "sequential".into(),
        RowKind::Paft(None) => "PAFT".into(),
        RowKind::Paft(Some(search)) => format!("PAFT {search}"),
        RowKind::Added(name) => name.clone(),
    }
}

/// Every pair whose two rows exist, each metric both rows scored.
pub(crate) fn verdicts(
    rows: &[(&EvaluatedRow, &RowEvidence)],
    pref: Pref,
    settings: &BootstrapSettings,
) -> Vec<VerdictRow> {
    let find = |kind: &RowKind| rows.iter().find(|(r, _)| r.kind == *kind).copied();
    let pafts: Vec<RowKind> = rows
        .iter()
        .filter(|(r, _)| matches!(r.kind, RowKind::Paft(_)))
        .map(|(r, _)| r.kind.clone())
        .collect();
    let mut out = vec![];
    for (ka, kb) in pairs(&pafts, pref) {
        let (Some(a), Some(b)) = (find(&ka), find(&kb)) else {
            continue;
        };
        out.extend(compare(a, b, &short_name(&ka), &short_name(&kb), settings));
    }
    out
}

type Side<'a> = (&'a EvaluatedRow, &'a RowEvidence);
/// A metric's measurement with its resampled differences (for the average), or why none.
type Outcome = std::result::Result<(Measured, Vec<f64>), String>;

/// The verdict rows of one pair.
fn compare<'a>(
    a: Side<'a>,
    b: Side<'a>,
    na: &str,
    nb: &str,
    settings: &BootstrapSettings,
) -> Vec<VerdictRow> {
    let names = Names { a: na, b: nb };
    let mut metrics: Vec<(Metric, std::result::Result<PairedMetric, String>)> = vec![];
    for bench in Benchmark::ALL {
        if !(a.0.file.scores.contains_key(&bench) && b.0.file.scores.contains_key(&bench)) {
            continue;
        }
        let side = |s: Side<'a>, name: &str| -> std::result::Result<&'a BenchmarkRecords, String> {
            s.1.benchmarks.get(&bench).ok_or_else(|| {
                let why = s.1.missing.get(&bench).map_or("", String::as_str);
                format!("{name} has no per-document records ({why})")
            })
        };
        let paired =
            side(a, na).and_then(|ra| side(b, nb).and_then(|rb| pairing::benchmark(ra, rb, names)));
        metrics.push((Metric::Benchmark(bench), paired));
    }
    let (tax_a, tax_b) = (a.1.tax.as_ref(), b.1.tax.as_ref());
    if let (Some(x), Some(y)) = (
        tax_a.and_then(|t| t.sft.as_ref()),
        tax_b.and_then(|t| t.sft.as_ref()),
    ) {
        metrics.push((Metric::SftLoss, pairing::sft_loss(x, y, names)));
    }
    if let (Some(x), Some(y)) = (
        tax_a.and_then(|t| t.preference.as_ref()),
        tax_b.and_then(|t| t.preference.as_ref()),
    ) {
        match pairing::preference(x, y, names) {
            Ok((acc, margin)) => {
                metrics.push((Metric::PrefAccuracy, Ok(acc)));
                metrics.push((Metric::RewardMargin, margin));
            }
            Err(e) => {
                metrics.push((Metric::PrefAccuracy, Err(e.clone())));
                metrics.push((Metric::RewardMargin, Err(e)));
            }
        }
    }

    // Metrics draw on their own streams, so they can run in parallel.
    let measured: Vec<(Metric, Outcome)> = metrics
        .into_par_iter()
        .map(|(metric, paired)| {
            let result = paired.and_then(|m| {
                let draws = m.resample(metric.stream(), settings);
                let interval = bootstrap::percentile_interval(m.difference(), draws.clone())
                    .ok_or("a resample had nothing to divide by (no tokens)")?;
                Ok((
                    Measured {
                        interval,
                        items: m.items(),
                        per_task: per_task(&m),
                        min_items: m.items(),
                    },
                    draws,
                ))
            });
            (metric, result)
        })
        .collect();

    let mut out: Vec<VerdictRow> = vec![];
    let row = |metric, outcome| VerdictRow {
        a: na.into(),
        b: nb.into(),
        metric,
        outcome,
    };
    let benches: BTreeMap<Benchmark, &Outcome> = measured
        .iter()
        .filter_map(|(m, r)| match m {
            Metric::Benchmark(b) => Some((*b, r)),
            _ => None,
        })
        .collect();
    let is_benchmark = |m: &Metric| matches!(m, Metric::Benchmark(_));
    for (metric, result) in measured.iter().filter(|(m, _)| is_benchmark(m)) {
        out.push(row(*metric, result.clone().map(|(m, _)| m)));
    }
    // The average exists where both rows scored all six (as on the leaderboard).
    if benches.len() == Benchmark::ALL.len() {
        out.push(row(Metric::Average, average(&benches)));
    }
    for (metric, result) in measured.iter().filter(|(m, _)| !is_benchmark(m)) {
        out.push(row(*metric, result.clone().map(|(m, _)| m)));
    }
    out
}

/// The average's difference and interval: resample r of the average is the mean of resample r
/// of the six benchmarks.
fn average(benches: &BTreeMap<Benchmark, &Outcome>) -> std::result::Result<Measured, String> {
    let mut parts = vec![];
    for (b, r) in benches {
        match r {
            Ok(p) => parts.push(p),
            Err(why) => return Err(format!("no interval for {}: {why}", b.column())),
        }
    }
    let draws: Vec<&[f64]> = parts.iter().map(|(_, d)| d.as_slice()).collect();
    let difference = parts
        .iter()
        .map(|(m, _)| m.interval.difference)
        .sum::<f64>()
        / parts.len() as f64;
    let interval = bootstrap::percentile_interval(difference, bootstrap::mean_draws(&draws))
        .ok_or("a resample was not a number")?;
    Ok(Measured {
        interval,
        items: parts.iter().map(|(m, _)| m.items).sum(),
        per_task: (
            parts.iter().map(|(m, _)| m.items).min().unwrap_or(0),
            parts.iter().map(|(m, _)| m.items).max().unwrap_or(0),
        ),
        min_items: parts.iter().map(|(m, _)| m.min_items).min().unwrap_or(0),
    })
}

fn per_task(m: &PairedMetric) -> (usize, usize) {
    let sizes = m.strata.iter().map(Vec::len);
    (sizes.clone().min().unwrap_or(0), sizes.max().unwrap_or(0))
}

/// `+1.23` / `−1.23` (a real minus sign, as in print).
pub(crate) fn signed(v: f64, decimals: usize) -> String {
    let s = format!("{:+.decimals$}", v);
    match s.strip_prefix('-') {
        Some(rest) => format!("−{rest}"),
        None => s,
    }
}

pub(crate) fn interval_text(iv: &Interval, decimals: usize) -> String {
    format!(
        "[{}, {}]",
        signed(iv.low, decimals),
        signed(iv.high, decimals)
    )
}

fn docs_text(per_task: (usize, usize)) -> String {
    match per_task {
        (lo, hi) if lo == hi => format!("{lo}"),
        (lo, hi) => format!("{lo}–{hi}"),
    }
}

/// For CSV and Parquet: numbers at full precision, missing ones null, the message as a column.
pub(crate) fn verdict_frame(rows: &[VerdictRow]) -> Result<DataFrame> {
    let ok = |f: fn(&Measured) -> f64| {
        rows.iter()
            .map(|r| r.outcome.as_ref().ok().map(f))
            .collect::<Vec<_>>()
    };
    Ok(DataFrame::new(
        rows.len(),
        vec![
            Column::new(
                "Comparison".into(),
                rows.iter().map(VerdictRow::comparison).collect::<Vec<_>>(),
            ),
            Column::new(
                "Metric".into(),
                rows.iter().map(|r| r.metric.name()).collect::<Vec<_>>(),
            ),
            Column::new("Difference".into(), ok(|m| m.interval.difference)),
            Column::new("CI 2.5%".into(), ok(|m| m.interval.low)),
            Column::new("CI 97.5%".into(), ok(|m| m.interval.high)),
            Column::new(
                "Excludes 0".into(),
                rows.iter()
                    .map(|r| r.outcome.as_ref().ok().map(|m| m.interval.excludes_zero()))
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "Verdict".into(),
                rows.iter()
                    .map(VerdictRow::verdict_text)
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "Paired items".into(),
                rows.iter()
                    .map(|r| r.outcome.as_ref().ok().map(|m| m.items as u64))
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "Docs/task".into(),
                rows.iter()
                    .map(|r| r.outcome.as_ref().ok().map(|m| docs_text(m.per_task)))
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "Note".into(),
                rows.iter()
                    .map(|r| r.outcome.as_ref().err().cloned())
                    .collect::<Vec<_>>(),
            ),
        ],
    )?)
}

/// For Markdown and HTML: signed differences, the interval in brackets.
pub(crate) fn verdict_cells(rows: &[VerdictRow]) -> Cells {
    let header = [
        "Comparison",
        "Metric",
        "Difference",
        "95% interval",
        "Verdict",
        "Paired items",
        "Note",
    ];
    Cells {
        header: header.iter().map(|h| h.to_string()).collect(),
        rows: rows
            .iter()
            .map(|r| {
                let d = r.metric.decimals();
                let (diff, iv, items) = match &r.outcome {
                    Ok(m) => (
                        signed(m.interval.difference, d),
                        interval_text(&m.interval, d),
                        format!("{} ({}/task)", m.items, docs_text(m.per_task)),
                    ),
                    Err(_) => (String::new(), String::new(), String::new()),
                };
                vec![
                    r.comparison(),
                    r.metric.name().to_string(),
                    diff,
                    iv,
                    r.verdict_text(),
                    items,
                    r.outcome.as_ref().err().cloned().unwrap_or_default(),
                ]
            })
            .collect(),
        numeric: vec![false, false, true, true, false, true, false],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::alignment_tax::{AlignmentTax, SftRowScore, SftScores};
    use crate::report::evidence::BenchmarkRecords;
    use crate::report::rows::{Docs, ResultsFile, RowSpec};

    /// A row scored 50% on every benchmark over `n` documents per task, plus `bonus` documents
    /// right out of the ones everyone misses.
    fn side(kind: RowKind, n: u64, bonus: u64) -> (EvaluatedRow, RowEvidence) {
        let docs: Vec<(u64, f64)> = (0..n)
            .map(|i| {
                (
                    i,
                    if i % 2 == 0 || (i % 2 == 1 && i < 2 * bonus) {
                        100.0
                    } else {
                        0.0
                    },
                )
            })
            .collect();
        let records = BenchmarkRecords {
            strata: [("t".to_string(), docs)].into_iter().collect(),
        };
        let mean = records.estimate().unwrap().value;
        let row = EvaluatedRow {
            kind,
            spec: RowSpec {
                name: "x".into(),
                results: "x/results.json".into(),
            },
            file: ResultsFile {
                scores: Benchmark::ALL.iter().map(|&b| (b, mean)).collect(),
                docs: Docs::Full,
                effective: BTreeMap::new(),
            },
        };
        let ev = RowEvidence {
            benchmarks: Benchmark::ALL
                .iter()
                .map(|&b| (b, records.clone()))
                .collect(),
            missing: BTreeMap::new(),
            tax: None,
        };
        (row, ev)
    }

    fn table(rows: &[(EvaluatedRow, RowEvidence)]) -> Vec<VerdictRow> {
        let sides: Vec<_> = rows.iter().map(|(r, e)| (r, e)).collect();
        verdicts(&sides, Pref::Dpo, &BootstrapSettings::default())
    }

    #[test]
    fn the_average_counts_documents_per_benchmark_not_per_subject() {
        // MMLU's 200 documents in subjects of 150 and 50.
        let split = |(row, mut ev): (EvaluatedRow, RowEvidence)| {
            let mmlu = ev.benchmarks.get_mut(&Benchmark::Mmlu).unwrap();
            let docs = mmlu.strata.remove("t").unwrap();
            mmlu.strata.insert("a".into(), docs[..150].to_vec());
            mmlu.strata.insert("b".into(), docs[150..].to_vec());
            (row, ev)
        };
        let rows = [
            split(side(RowKind::Paft(None), 200, 30)),
            split(side(RowKind::Sequential, 200, 0)),
        ];
        let v = table(&rows);
        let of = |m: Metric| {
            v.iter()
                .find(|r| r.metric == m)
                .unwrap()
                .outcome
                .clone()
                .unwrap()
        };
        assert_eq!(of(Metric::Benchmark(Benchmark::Mmlu)).per_task, (50, 150));
        assert_eq!(of(Metric::Benchmark(Benchmark::Arc)).per_task, (200, 200));
        assert_eq!(of(Metric::Average).per_task, (200, 200));
        assert_eq!(of(Metric::Average).items, 6 * 200);
    }

    #[test]
    fn pairs_that_exist_get_one_row_per_metric_and_the_average() {
        // PAFT right on 30 more of 200 documents per task than sequential; SFT identical to
        // sequential; no DPO or base row.
        let rows = [
            side(RowKind::Paft(None), 200, 30),
            side(RowKind::Sequential, 200, 0),
            side(RowKind::Sft, 200, 0),
        ];
        let v = table(&rows);
        let pairs: Vec<String> = v.iter().map(VerdictRow::comparison).collect();
        assert_eq!(pairs.len(), 2 * 7);
        assert!(pairs[..7].iter().all(|p| p == "PAFT − sequential"));
        assert!(pairs[7..].iter().all(|p| p == "PAFT − SFT"));
        assert_eq!(v[6].metric, Metric::Average);
        for row in &v {
            let m = row.outcome.as_ref().unwrap();
            assert!((m.interval.difference - 15.0).abs() < 1e-9, "{row:?}");
            assert_eq!(row.verdict(), Verdict::Better);
            assert_eq!(row.verdict_text(), "PAFT better");
        }
        // The average of six independent benchmarks is tighter than any one of them.
        let width = |r: &VerdictRow| {
            let iv = r.outcome.as_ref().unwrap().interval;
            iv.high - iv.low
        };
        assert!(width(&v[6]) < width(&v[0]), "{:?} {:?}", v[6], v[0]);
        assert_eq!(v[6].outcome.as_ref().unwrap().items, 6 * 200);
        assert_eq!(v[6].outcome.as_ref().unwrap().per_task, (200, 200));
        let df = verdict_frame(&v).unwrap();
        assert_eq!(df.height(), 14);
        let cells = verdict_cells(&v);
        assert_eq!(cells.rows[0][2], "+15.00");
        assert!(cells.rows[0][3].starts_with("[+"), "{:?}", cells.rows[0]);
    }

    #[test]
    fn different_documents_get_no_interval_and_a_message() {
        let mut paft = side(RowKind::Paft(None), 50, 0);
        let seq = side(RowKind::Sequential, 50, 0);
        let gsm = paft.1.benchmarks.get_mut(&Benchmark::Gsm8k).unwrap();
        gsm.strata = [("gsm8k".to_string(), (100..150).map(|i| (i, 0.0)).collect())]
            .into_iter()
            .collect();
        let v = table(&[paft, seq]);
        let gsm = v
            .iter()
            .find(|r| r.metric == Metric::Benchmark(Benchmark::Gsm8k))
            .unwrap();
        assert_eq!(gsm.verdict(), Verdict::NoInterval);
        let err = gsm.outcome.as_ref().unwrap_err();
        assert!(err.contains("`gsm8k`"), "{err}");
        let avg = v.iter().find(|r| r.metric == Metric::Average).unwrap();
        assert!(avg.outcome.as_ref().unwrap_err().contains("GSM8K"));
        // Identical rows elsewhere: exactly 0, not distinguishable.
        let arc = &v[0];
        let iv = arc.outcome.as_ref().unwrap().interval;
        assert_eq!((iv.low, iv.high), (0.0, 0.0));
        assert_eq!(arc.verdict_text(), "not distinguishable");
    }

    #[test]
    fn a_lower_loss_is_better() {
        let tax = |nll: f64| {
            Some(AlignmentTax {
                sft: Some(SftScores {
                    rows: (0..40)
                        .map(|i| SftRowScore {
                            id: format!("r{i}"),
                            nll_sum: nll + (i % 3) as f64,
                            tokens: 10,
                        })
                        .collect(),
                }),
                preference: None,
            })
        };
        let mut paft = side(RowKind::Paft(None), 20, 0);
        let mut seq = side(RowKind::Sequential, 20, 0);
        paft.1.tax = tax(10.0);
        seq.1.tax = tax(12.0);
        let v = table(&[paft, seq]);
        let loss = v.last().unwrap();
        assert_eq!(loss.metric, Metric::SftLoss);
        let m = loss.outcome.as_ref().unwrap();
        assert!((m.interval.difference + 0.2).abs() < 1e-12, "{loss:?}");
        assert_eq!(loss.verdict_text(), "PAFT better");
    }
}
