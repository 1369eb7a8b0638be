//! Two rows' records matched item by item for the paired bootstrap. Rows are only compared on the
//! same documents (held-out rows, preference pairs): when the ids differ, the pair gets a message
//! naming where, never a silent comparison of different items.

use std::collections::{BTreeMap, BTreeSet};

use super::bootstrap::{PairedItem, PairedMetric};
use super::evidence::BenchmarkRecords;
use crate::eval::alignment_tax::{PreferenceScores, SftScores};

/// The names of the two rows, for messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Names<'a> {
    pub a: &'a str,
    pub b: &'a str,
}

/// One benchmark, task by task (MMLU subject by subject), document by document.
pub(crate) fn benchmark(
    a: &BenchmarkRecords,
    b: &BenchmarkRecords,
    names: Names,
) -> Result<PairedMetric, String> {
    let tasks_a: BTreeSet<&String> = a.strata.keys().collect();
    let tasks_b: BTreeSet<&String> = b.strata.keys().collect();
    if let Some(t) = tasks_a.difference(&tasks_b).next() {
        return Err(format!("task `{t}` is scored for {} only", names.a));
    }
    if let Some(t) = tasks_b.difference(&tasks_a).next() {
        return Err(format!("task `{t}` is scored for {} only", names.b));
    }
    let mut strata = vec![];
    for (task, docs_a) in &a.strata {
        let docs_b = &b.strata[task];
        let items = match_ids(
            docs_a.iter().map(|&(id, v)| (id, v)),
            docs_b.iter().map(|&(id, v)| (id, v)),
        )
        .map_err(|only| {
            format!(
                "document ids differ on task `{task}` ({}: {} documents, {}: {}; {only} ids in \
                 only one of them)",
                names.a,
                docs_a.len(),
                names.b,
                docs_b.len()
            )
        })?;
        strata.push(
            items
                .into_iter()
                .map(|(x, y)| PairedItem::values(x, y))
                .collect(),
        );
    }
    Ok(PairedMetric { strata })
}

/// Held-out SFT loss: per row `(nll_sum, tokens)`, the statistic Σ nll / Σ tokens.
pub(crate) fn sft_loss(a: &SftScores, b: &SftScores, names: Names) -> Result<PairedMetric, String> {
    let items = match_ids(
        a.rows
            .iter()
            .map(|r| (r.id.as_str(), (r.nll_sum, r.tokens as f64))),
        b.rows
            .iter()
            .map(|r| (r.id.as_str(), (r.nll_sum, r.tokens as f64))),
    )
    .map_err(|only| id_message("held-out SFT rows", a.rows.len(), b.rows.len(), only, names))?;
    Ok(PairedMetric {
        strata: vec![items
            .into_iter()
            .map(|(x, y)| PairedItem { a: x, b: y })
            .collect()],
    })
}

/// Preference accuracy (percent) and mean reward margin over the same pairs. The margin is only
/// compared at equal β: rewards are β-scaled log ratios, so different β means different units.
pub(crate) fn preference(
    a: &PreferenceScores,
    b: &PreferenceScores,
    names: Names,
) -> Result<(PairedMetric, Result<PairedMetric, String>), String> {
    fn pairs(p: &PreferenceScores) -> Vec<(&str, (f64, f64))> {
        p.pairs
            .iter()
            .map(|q| (q.id.as_str(), (q.correct(), q.margin())))
            .collect()
    }
    let items = match_ids(pairs(a), pairs(b)).map_err(|only| {
        id_message(
            "preference pairs",
            a.pairs.len(),
            b.pairs.len(),
            only,
            names,
        )
    })?;
    let metric = |f: fn((f64, f64)) -> f64| PairedMetric {
        strata: vec![items
            .iter()
            .map(|&(x, y)| PairedItem::values(f(x), f(y)))
            .collect()],
    };
    let accuracy = metric(|(c, _)| 100.0 * c);
    let margin = if a.beta == b.beta {
        Ok(metric(|(_, m)| m))
    } else {
        Err(format!(
            "β differs ({}: {}, {}: {}): rewards are on different scales",
            names.a, a.beta, names.b, b.beta
        ))
    };
    Ok((accuracy, margin))
}

fn id_message(what: &str, na: usize, nb: usize, only: usize, names: Names) -> String {
    format!(
        "{what} differ ({}: {na}, {}: {nb}; {only} ids in only one of them)",
        names.a, names.b
    )
}

/// The values of both sides in the order of `a`'s ids, when both have exactly the same ids; else
/// how many ids only one side has.
fn match_ids<K: Ord + Copy, V: Copy>(
    a: impl IntoIterator<Item = (K, V)>,
    b: impl IntoIterator<Item = (K, V)>,
) -> Result<Vec<(V, V)>, usize> {
    let a: Vec<(K, V)> = a.into_iter().collect();
    let b: BTreeMap<K, V> = b.into_iter().collect();
    let ids_a: BTreeSet<K> = a.iter().map(|(k, _)| *k).collect();
    let only = ids_a.iter().filter(|k| !b.contains_key(k)).count()
        + b.keys().filter(|k| !ids_a.contains(k)).count();
    if only > 0 {
        return Err(only);
    }
    Ok(a.into_iter().map(|(k, v)| (v, b[&k])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::alignment_tax::{PairScore, SftRowScore};

    const NAMES: Names = Names {
        a: "PAFT",
        b: "sequential",
    };

    fn records(tasks: &[(&str, &[u64])]) -> BenchmarkRecords {
        BenchmarkRecords {
            strata: tasks
                .iter()
                .map(|(t, ids)| (t.to_string(), ids.iter().map(|&i| (i, i as f64)).collect()))
                .collect(),
        }
    }

    #[test]
    fn documents_are_matched_by_id_within_each_task() {
        let a = records(&[("mmlu_anatomy", &[0, 1, 2]), ("mmlu_virology", &[5])]);
        let mut b = a.clone();
        b.strata.get_mut("mmlu_anatomy").unwrap()[0].1 = 10.0;
        let m = benchmark(&a, &b, NAMES).unwrap();
        assert_eq!(m.strata.len(), 2);
        assert_eq!(m.strata[0][0], PairedItem::values(0.0, 10.0));
        assert_eq!(m.items(), 4);
    }

    #[test]
    fn different_documents_are_refused_naming_the_task() {
        let a = records(&[("arc_challenge", &[0, 1, 2])]);
        let b = records(&[("arc_challenge", &[0, 1, 3])]);
        let err = benchmark(&a, &b, NAMES).unwrap_err();
        assert!(
            err.contains("`arc_challenge`") && err.contains("2 ids"),
            "{err}"
        );
        let c = records(&[("arc_challenge", &[0, 1, 2]), ("mmlu_x", &[0])]);
        let err = benchmark(&a, &c, NAMES).unwrap_err();
        assert!(
            err.contains("`mmlu_x`") && err.contains("sequential only"),
            "{err}"
        );
    }

    #[test]
    fn alignment_tax_items_pair_by_id_in_any_order() {
        let sft = |rows: &[(&str, f64)]| SftScores {
            rows: rows
                .iter()
                .map(|(id, nll)| SftRowScore {
                    id: id.to_string(),
                    nll_sum: *nll,
                    tokens: 2,
                })
                .collect(),
        };
        let m = sft_loss(
            &sft(&[("x", 1.0), ("y", 3.0)]),
            &sft(&[("y", 4.0), ("x", 2.0)]),
            NAMES,
        )
        .unwrap();
        assert_eq!(m.difference(), (4.0 / 4.0) - (6.0 / 4.0));
        let err = sft_loss(&sft(&[("x", 1.0)]), &sft(&[("z", 1.0)]), NAMES).unwrap_err();
        assert!(err.contains("held-out SFT rows differ"), "{err}");

        let pref = |beta: f64| PreferenceScores {
            beta,
            pairs: vec![PairScore {
                id: "p".into(),
                chosen_reward: 1.0,
                rejected_reward: 0.5,
            }],
        };
        let (acc, margin) = preference(&pref(0.1), &pref(0.1), NAMES).unwrap();
        assert_eq!(acc.difference(), 0.0);
        assert_eq!(margin.unwrap().difference(), 0.0);
        let (_, margin) = preference(&pref(0.1), &pref(0.2), NAMES).unwrap();
        assert!(margin.unwrap_err().contains("β differs"));
    }
}
