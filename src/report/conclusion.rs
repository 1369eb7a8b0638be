//! The sentence at the top of the page: what this run can and cannot conclude about the question
//! it was run for (does PAFT beat sequential SFT→DPO/ORPO on the leaderboard average?), from the
//! verdict table and the document counts behind it. A run with several searches (one PAFT row
//! each) gets one sentence per PAFT row.

use super::rows::Pref;
use super::verdicts::{interval_text, signed, Metric, Verdict, VerdictRow, MIN_ITEMS_FOR_VERDICT};

/// `pafts`: the short names of the PAFT rows evaluated (`PAFT`, or `PAFT <search>` each);
/// `has_sequential`: whether the sequential row was evaluated at all.
pub(crate) fn conclusion(
    verdicts: &[VerdictRow],
    pafts: &[String],
    has_sequential: bool,
    pref: Pref,
) -> String {
    let baseline = format!("sequential SFT→{}", pref.label());
    let missing: Vec<&str> = [("paft", !pafts.is_empty()), ("sequential", has_sequential)]
        .iter()
        .filter(|(_, has)| !has)
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        let dirs: Vec<String> = missing.iter().map(|m| format!("evals/{m}")).collect();
        return format!(
            "This run has no {} evaluation ({}), so this run cannot say whether PAFT beats \
             {baseline}.",
            missing.join(" or "),
            dirs.join(", ")
        );
    }
    pafts
        .iter()
        .map(|paft| of_one(verdicts, paft, &baseline))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sentence for one PAFT row against the sequential baseline.
fn of_one(verdicts: &[VerdictRow], paft: &str, baseline: &str) -> String {
    let cannot = format!("this run cannot say whether {paft} beats {baseline}");
    let of_pair: Vec<&VerdictRow> = verdicts
        .iter()
        .filter(|v| v.a == paft && v.b == "sequential")
        .collect();
    let Some(avg) = of_pair.iter().find(|v| v.metric == Metric::Average) else {
        let count = |want: Verdict| {
            of_pair
                .iter()
                .filter(|v| matches!(v.metric, Metric::Benchmark(_)) && v.verdict() == want)
                .count()
        };
        return format!(
            "{paft} and sequential were not both scored on all six benchmarks ({paft} better on \
             {}, worse on {}, not distinguishable on {}, too few documents on {}, no interval on \
             {} of those they share), so {cannot} on the leaderboard average.",
            count(Verdict::Better),
            count(Verdict::Worse),
            count(Verdict::NotDistinguishable),
            count(Verdict::TooFew),
            count(Verdict::NoInterval)
        );
    };
    let m = match &avg.outcome {
        Ok(m) => m,
        Err(why) => {
            return format!(
                "{paft} − sequential has no interval on the average ({why}), so {cannot}."
            )
        }
    };
    let docs = match m.per_task {
        (lo, hi) if lo == hi => format!("{lo}"),
        (lo, hi) => format!("{lo} to {hi}"),
    };
    let too_small = format!(
        "the run's budget is too small to conclude: {cannot} (a verdict needs at least \
         {MIN_ITEMS_FOR_VERDICT} documents per benchmark; raise [eval] docs)"
    );
    let tail = match avg.verdict() {
        Verdict::Better => format!(
            "{paft} beats {baseline} on these documents (the interval covers the choice of \
             documents, not of training seeds)"
        ),
        Verdict::Worse => format!(
            "{baseline} beats {paft} on these documents (the interval covers the choice of \
             documents, not of training seeds)"
        ),
        Verdict::TooFew => too_small,
        // An interval that contains 0 on a handful of documents says nothing either way.
        Verdict::NotDistinguishable if m.min_items < MIN_ITEMS_FOR_VERDICT => too_small,
        Verdict::NotDistinguishable | Verdict::NoInterval => cannot,
    };
    format!(
        "On {docs} report documents per task, {paft} − sequential on the average is {} {} \
         points: {}; {tail}.",
        signed(m.interval.difference, 2),
        interval_text(&m.interval, 2),
        avg.verdict_text()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::bootstrap::Interval;
    use crate::report::verdicts::Measured;

    fn avg(low: f64, high: f64, per_task: (usize, usize)) -> VerdictRow {
        VerdictRow {
            a: "PAFT".into(),
            b: "sequential".into(),
            metric: Metric::Average,
            outcome: Ok(Measured {
                interval: Interval {
                    difference: (low + high) / 2.0,
                    low,
                    high,
                },
                items: 120,
                per_task,
                min_items: 40,
            }),
        }
    }

    fn paft() -> Vec<String> {
        vec!["PAFT".into()]
    }

    #[test]
    fn the_sentence_follows_the_average_verdict() {
        let s = conclusion(&[avg(-1.2, 2.0, (20, 20))], &paft(), true, Pref::Dpo);
        assert_eq!(
            s,
            "On 20 report documents per task, PAFT − sequential on the average is +0.40 \
             [−1.20, +2.00] points: not distinguishable; this run cannot say whether PAFT beats \
             sequential SFT→DPO."
        );
        let s = conclusion(&[avg(0.5, 2.5, (2, 135))], &paft(), true, Pref::Orpo);
        assert!(
            s.starts_with("On 2 to 135 report documents per task"),
            "{s}"
        );
        assert!(
            s.contains("PAFT better; PAFT beats sequential SFT→ORPO"),
            "{s}"
        );
        let s = conclusion(&[avg(-2.5, -0.5, (20, 20))], &paft(), true, Pref::Dpo);
        assert!(
            s.contains("PAFT worse; sequential SFT→DPO beats PAFT"),
            "{s}"
        );
    }

    #[test]
    fn too_few_documents_never_give_a_verdict() {
        // The demo's case: 4 documents per task, one discordant Winogrande document, an interval
        // that stops just short of 0.
        let mut v = avg(-12.53, -0.001, (1, 4));
        if let Ok(m) = &mut v.outcome {
            m.min_items = 4;
        }
        assert_eq!(v.verdict(), Verdict::TooFew);
        let s = conclusion(&[v], &paft(), true, Pref::Dpo);
        assert!(
            s.contains("too few documents") && s.contains("budget is too small to conclude"),
            "{s}"
        );
        assert!(!s.contains("beats PAFT"), "{s}");
        // Containing 0 on 3 documents is no finding either: the sentence says why.
        let mut v = avg(-0.02, 16.66, (1, 3));
        if let Ok(m) = &mut v.outcome {
            m.min_items = 3;
        }
        let s = conclusion(&[v], &paft(), true, Pref::Dpo);
        assert!(
            s.contains("not distinguishable") && s.contains("budget is too small to conclude"),
            "{s}"
        );
    }

    #[test]
    fn missing_rows_and_intervals_say_why_nothing_can_be_concluded() {
        let s = conclusion(&[], &[], true, Pref::Dpo);
        assert!(
            s.contains("no paft evaluation (evals/paft)") && s.contains("cannot say"),
            "{s}"
        );
        let mut v = avg(0.0, 1.0, (1, 1));
        v.outcome = Err("document ids differ on task `gsm8k`".into());
        let s = conclusion(&[v], &paft(), true, Pref::Dpo);
        assert!(s.contains("`gsm8k`") && s.contains("cannot say"), "{s}");
        let s = conclusion(&[], &paft(), true, Pref::Dpo);
        assert!(s.contains("not both scored on all six"), "{s}");
    }

    #[test]
    fn several_paft_rows_get_a_sentence_each() {
        let mut other = avg(0.5, 2.5, (100, 100));
        other.a = "PAFT sparse-ties".into();
        let names = vec!["PAFT".to_string(), "PAFT sparse-ties".to_string()];
        let s = conclusion(&[avg(-1.2, 2.0, (20, 20)), other], &names, true, Pref::Dpo);
        assert!(
            s.contains("PAFT − sequential on the average is +0.40"),
            "{s}"
        );
        assert!(
            s.contains("PAFT sparse-ties − sequential on the average is +1.50")
                && s.contains("PAFT sparse-ties beats sequential SFT→DPO"),
            "{s}"
        );
    }
}
