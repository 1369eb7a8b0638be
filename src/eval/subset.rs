//! Which documents of a task are evaluated: all, the first N (`--limit`), or a stratified
//! random subset (`--sample N --seed S`) that is the same for every model, so candidates in a
//! search are compared on identical documents and shots.

use std::collections::BTreeMap;

use super::pyrandom::PyRandom;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    All,
    /// The first `n` documents of each task (each MMLU subject), as lm-eval's `--limit`.
    Limit(usize),
    /// `n` documents per benchmark (MMLU: in total, spread over subjects, or `mmlu` when
    /// given: its 57 subjects want more than the other tasks, e.g. 285 = 5 per subject),
    /// stratified.
    Sample {
        n: usize,
        seed: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mmlu: Option<usize>,
    },
}

/// A stratified random sample of `n` items: each stratum gets its proportional share (largest
/// remainder, ties to the earlier stratum), drawn without replacement. Returns sorted indices.
pub fn stratified_sample(strata: &[&str], n: usize, seed: u64) -> Vec<usize> {
    let total = strata.len();
    if n >= total {
        return (0..total).collect();
    }
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in strata.iter().enumerate() {
        groups.entry(s).or_default().push(i);
    }
    let groups: Vec<(&str, Vec<usize>)> = groups.into_iter().collect();
    let exact: Vec<f64> = groups
        .iter()
        .map(|(_, g)| n as f64 * g.len() as f64 / total as f64)
        .collect();
    let mut take: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.partial_cmp(&ra).unwrap().then(a.cmp(&b))
    });
    let mut left = n - take.iter().sum::<usize>();
    for &g in order.iter().cycle() {
        if left == 0 {
            break;
        }
        if take[g] < groups[g].1.len() {
            take[g] += 1;
            left -= 1;
        }
    }
    let mut rng = PyRandom::new(seed);
    let mut out = vec![];
    for ((_, members), k) in groups.iter().zip(take) {
        out.extend(
            rng.sample_indices(members.len(), k)
                .into_iter()
                .map(|j| members[j]),
        );
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stratified_sample_is_proportional_and_seeded() {
        let strata: Vec<&str> = (0..100).map(|i| if i < 70 { "a" } else { "b" }).collect();
        let s = stratified_sample(&strata, 10, 3);
        assert_eq!(s.len(), 10);
        assert_eq!(s.iter().filter(|&&i| i < 70).count(), 7);
        assert_eq!(s, stratified_sample(&strata, 10, 3));
        assert_ne!(s, stratified_sample(&strata, 10, 4));
        assert_eq!(stratified_sample(&strata, 500, 3).len(), 100);
    }
}
