//! The held-out protocol: each task's documents are split once, deterministically, into a
//! *search pool* (everything a merge search scores) and a *report pool* (every row of the final
//! comparison), so the reported PAFT row is not the maximum over candidates measured on the
//! very documents it is reported on (the winner's curse).
//!
//! A document belongs to a pool by a hash of (split seed, task name, document index): the same
//! document always lands in the same pool, whatever subset or model is being evaluated, and
//! the pools of the default split (half and half) never overlap.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Which documents of each task may be scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// Every document (lm-eval's semantics; `paft eval`'s default).
    All,
    /// The documents a search screens, promotes and picks its best on.
    Search,
    /// The documents every row of the final comparison is scored on.
    Report,
}

impl Pool {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Self::All),
            "search" => Ok(Self::Search),
            "report" => Ok(Self::Report),
            other => bail!("unknown pool `{other}` (all, search, report)"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Search => "search",
            Self::Report => "report",
        }
    }
}

/// The split of every task into the two pools: fractions of each task's documents.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSplit {
    /// Fraction of each task's documents in the search pool.
    #[serde(default = "half")]
    pub search: f64,
    /// Fraction in the report pool (the two must not add up to more than 1).
    #[serde(default = "half")]
    pub report: f64,
    /// Seed of the split's hash.
    #[serde(default)]
    pub seed: u64,
}

fn half() -> f64 {
    0.5
}

impl Default for PoolSplit {
    fn default() -> Self {
        Self {
            search: 0.5,
            report: 0.5,
            seed: 0,
        }
    }
}

impl PoolSplit {
    pub fn validate(&self) -> Result<()> {
        for (name, f) in [("search", self.search), ("report", self.report)] {
            if !(f > 0.0 && f <= 1.0) {
                bail!("pools: `{name}` must be a fraction in (0, 1], got {f}");
            }
        }
        if self.search + self.report > 1.0 + 1e-12 {
            bail!(
                "pools overlap: search ({}) + report ({}) = {} > 1; the report pool must be held out from the search",
                self.search,
                self.report,
                self.search + self.report
            );
        }
        Ok(())
    }

    /// The pool document `doc` of `task` belongs to (`None`: in neither, when the fractions
    /// add up to less than 1).
    pub fn pool_of(&self, task: &str, doc: usize) -> Option<Pool> {
        let u = unit_hash(self.seed, task, doc);
        if u < self.search {
            Some(Pool::Search)
        } else if u >= 1.0 - self.report {
            Some(Pool::Report)
        } else {
            None
        }
    }

    /// The documents of `task` (of `num_docs`) that `pool` may score, ascending.
    pub fn documents(&self, task: &str, num_docs: usize, pool: Pool) -> Vec<usize> {
        match pool {
            Pool::All => (0..num_docs).collect(),
            p => (0..num_docs)
                .filter(|&d| self.pool_of(task, d) == Some(p))
                .collect(),
        }
    }
}

/// A uniform number in [0, 1) from (seed, task, document): FNV-1a over the task name, mixed
/// with the seed and index by SplitMix64 (stable across platforms and Rust versions).
fn unit_hash(seed: u64, task: &str, doc: usize) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut x = h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (doc as u64).rotate_left(32);
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_disjoint_deterministic_and_proportional() {
        let split = PoolSplit::default();
        let search = split.documents("arc_challenge", 1000, Pool::Search);
        let report = split.documents("arc_challenge", 1000, Pool::Report);
        assert!(search.iter().all(|d| !report.contains(d)));
        assert_eq!(search.len() + report.len(), 1000);
        assert!((450..=550).contains(&search.len()), "{}", search.len());
        assert_eq!(search, split.documents("arc_challenge", 1000, Pool::Search));
        // Another task or seed splits differently; a longer file keeps the first documents' pools.
        assert_ne!(search, split.documents("hellaswag", 1000, Pool::Search));
        let reseeded = PoolSplit { seed: 1, ..split };
        assert_ne!(
            search,
            reseeded.documents("arc_challenge", 1000, Pool::Search)
        );
        let longer = split.documents("arc_challenge", 2000, Pool::Search);
        assert_eq!(&longer[..search.len()], &search[..]);
    }

    #[test]
    fn overlapping_or_empty_pools_are_refused() {
        let overlap = PoolSplit {
            search: 0.7,
            report: 0.5,
            seed: 0,
        };
        assert!(format!("{:#}", overlap.validate().unwrap_err()).contains("overlap"));
        let empty = PoolSplit {
            search: 0.0,
            ..PoolSplit::default()
        };
        assert!(empty.validate().is_err());
        let partial = PoolSplit {
            search: 0.2,
            report: 0.3,
            seed: 0,
        };
        partial.validate().unwrap();
        let n = 2000;
        let s = partial.documents("t", n, Pool::Search).len() as f64 / n as f64;
        let r = partial.documents("t", n, Pool::Report).len() as f64 / n as f64;
        assert!((s - 0.2).abs() < 0.04 && (r - 0.3).abs() < 0.04, "{s} {r}");
    }
}
