//! Sparsifiers: which entries of a task vector survive, and how the survivors are rescaled.
//!
//! Deviations from mergekit, on purpose: top-k finds its threshold from magnitude histograms
//! (O(n), a block at a time if need be) instead of a full sort; TIES with `density·n < 1` keeps
//! one entry instead of crashing; breadcrumbs with `gamma·n < 1` drops no outliers instead of
//! silently zeroing the whole tensor.

use rand::Rng;

/// How a task vector is pruned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsifier {
    /// Keep everything.
    None,
    /// TIES: keep the `k = ⌊density·n⌋` largest |δ| (at least one when density > 0).
    Magnitude { density: f64 },
    /// DARE: keep each entry with probability `density`.
    Random { density: f64 },
    /// Model breadcrumbs: drop the largest `⌊gamma·n⌋` |δ| and the smallest, keeping `⌊density·n⌋`.
    Breadcrumbs { density: f64, gamma: f64 },
    /// DELLA: per row, keep probability rising linearly with magnitude rank from
    /// `density − epsilon` (smallest) to `density + epsilon` (largest).
    Della { density: f64, epsilon: f64 },
}

/// How kept entries are scaled back up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescale {
    None,
    /// mergekit's: match the L1 norm of the unpruned tensor.
    L1,
    /// The papers': divide each kept entry by its keep probability (1/density; 1/pᵢ for DELLA).
    Exact,
}

pub(crate) fn keep_count(density: f64, n: usize) -> usize {
    if density <= 0.0 {
        return 0;
    }
    ((density * n as f64) as usize).clamp(1, n)
}

/// Which entries TIES' top-k keeps: those whose |δ| is above the k-th largest magnitude, and
/// the first `ties` (in index order) equal to it. Magnitudes compare by the bits of |δ|, which
/// orders them as `f32::total_cmp` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopK {
    All,
    Nothing,
    Threshold { key: u32, ties: usize },
}

fn magnitude_key(x: f32) -> u32 {
    x.abs().to_bits()
}

impl TopK {
    /// The top-k of `n` values that `pass` feeds, a block at a time and twice, to a callback:
    /// a histogram of the high 16 bits of each |δ| finds the threshold's bin, a second pass
    /// over that bin's low bits the threshold itself. Two reads and 512 KB of counters, where a
    /// selection needs a copy of the whole tensor.
    pub(crate) fn find<E>(
        n: usize,
        k: usize,
        mut pass: impl FnMut(&mut dyn FnMut(&[f32])) -> Result<(), E>,
    ) -> Result<TopK, E> {
        if k >= n {
            return Ok(TopK::All);
        }
        if k == 0 {
            return Ok(TopK::Nothing);
        }
        // The threshold is the (n − k)-th smallest magnitude (0-based).
        let rank = (n - k) as u64;
        let mut high = vec![0u64; 1 << 16];
        pass(&mut |xs| {
            for &x in xs {
                high[(magnitude_key(x) >> 16) as usize] += 1;
            }
        })?;
        let (bin, below) = nth_bucket(&high, rank);
        let mut low = vec![0u64; 1 << 16];
        pass(&mut |xs| {
            for &x in xs {
                let key = magnitude_key(x);
                if (key >> 16) as usize == bin {
                    low[(key & 0xffff) as usize] += 1;
                }
            }
        })?;
        let (lo, below_lo) = nth_bucket(&low, rank - below);
        let key = ((bin as u32) << 16) | lo as u32;
        // Entries at or below the threshold: everything before its bin, its bin up to it.
        let at_or_below = below + below_lo + low[lo];
        let above = n - at_or_below as usize;
        Ok(TopK::Threshold {
            key,
            ties: k - above,
        })
    }

    /// Zeroes what the top-k drops, in a block of the tensor; blocks must come in index order,
    /// the same `ties_left` (start: [`Self::ties`]) carried from one to the next.
    pub(crate) fn apply(&self, block: &mut [f32], ties_left: &mut usize) {
        match *self {
            TopK::All => {}
            TopK::Nothing => block.fill(0.0),
            TopK::Threshold { key, .. } => {
                for x in block.iter_mut() {
                    let m = magnitude_key(*x);
                    if m > key {
                        continue;
                    }
                    if m == key && *ties_left > 0 {
                        *ties_left -= 1;
                        continue;
                    }
                    *x = 0.0;
                }
            }
        }
    }

    pub(crate) fn ties(&self) -> usize {
        match *self {
            TopK::Threshold { ties, .. } => ties,
            _ => 0,
        }
    }
}

/// The bucket holding the `rank`-th smallest entry (0-based) of a histogram, and how many
/// entries lie in the buckets before it.
fn nth_bucket(counts: &[u64], rank: u64) -> (usize, u64) {
    let mut below = 0;
    for (b, &c) in counts.iter().enumerate() {
        if below + c > rank {
            return (b, below);
        }
        below += c;
    }
    unreachable!("rank {rank} beyond the {below} counted entries")
}

/// Zeroes all but the `k` largest |δ| (ties broken by lower index), in place.
fn keep_top_k(delta: &mut [f32], k: usize) {
    let Ok(top) = TopK::find(delta.len(), k, |f| {
        f(delta);
        Ok::<(), std::convert::Infallible>(())
    });
    top.apply(delta, &mut top.ties());
}

/// Ascending-magnitude ranks (0-based), ties broken by index.
fn magnitude_order(delta: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..delta.len()).collect();
    idx.sort_by(|&a, &b| delta[a].abs().total_cmp(&delta[b].abs()).then(a.cmp(&b)));
    idx
}

fn l1(xs: &[f32]) -> f64 {
    xs.iter().map(|x| x.abs() as f64).sum()
}

/// Prunes `delta` in place (`row_len` is the last dimension, used by DELLA's per-row ranking).
pub fn sparsify(
    delta: &mut [f32],
    row_len: usize,
    sparsifier: Sparsifier,
    rescale: Rescale,
    rng: &mut impl Rng,
) {
    let n = delta.len();
    if n == 0 {
        return;
    }
    let before = if rescale == Rescale::L1 {
        l1(delta)
    } else {
        0.0
    };
    match sparsifier {
        Sparsifier::None => return,
        Sparsifier::Magnitude { density } => {
            keep_top_k(delta, keep_count(density, n));
            if rescale == Rescale::Exact && density > 0.0 {
                scale(delta, 1.0 / density);
            }
        }
        Sparsifier::Random { density } => {
            let p = density.clamp(0.0, 1.0);
            for x in delta.iter_mut() {
                if rng.random::<f64>() >= p {
                    *x = 0.0;
                }
            }
            if rescale == Rescale::Exact && p > 0.0 {
                scale(delta, 1.0 / p);
            }
        }
        Sparsifier::Breadcrumbs { density, gamma } => {
            let order = magnitude_order(delta);
            let keep = if density <= 0.0 {
                0
            } else {
                ((density * n as f64) as usize).min(n)
            };
            let mut n_top = ((gamma.max(0.0) * n as f64) as usize).min(n);
            let n_bot = n as i64 - keep as i64 - n_top as i64;
            let n_bot = if n_bot < 0 {
                n_top = (n_top as i64 + n_bot).max(0) as usize;
                0
            } else {
                n_bot as usize
            };
            let mut mask = vec![false; n];
            order[n_bot..n - n_top].iter().for_each(|&i| mask[i] = true);
            apply_mask(delta, &mask);
            if rescale == Rescale::Exact && density > 0.0 {
                scale(delta, 1.0 / density);
            }
        }
        Sparsifier::Della { density, epsilon } => {
            let row_len = row_len.max(1).min(n);
            for row in delta.chunks_mut(row_len) {
                let m = row.len();
                let order = magnitude_order(row);
                let mut probs = vec![0f64; m];
                for (rank, &i) in order.iter().enumerate() {
                    let frac = if m > 1 {
                        rank as f64 / (m - 1) as f64
                    } else {
                        0.5
                    };
                    probs[i] = (density - epsilon + 2.0 * epsilon * frac).clamp(0.0, 1.0);
                }
                for (x, &p) in row.iter_mut().zip(&probs) {
                    if rng.random::<f64>() >= p {
                        *x = 0.0;
                    } else if rescale == Rescale::Exact {
                        *x = (*x as f64 / p) as f32;
                    }
                }
            }
        }
    }
    if rescale == Rescale::L1 {
        let after = l1(delta);
        if after > 0.0 {
            scale(delta, before / after);
        }
    }
}

fn apply_mask(delta: &mut [f32], mask: &[bool]) {
    for (x, &keep) in delta.iter_mut().zip(mask) {
        if !keep {
            *x = 0.0;
        }
    }
}

pub(crate) fn scale(delta: &mut [f32], s: f64) {
    for x in delta.iter_mut() {
        *x = (*x as f64 * s) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(0)
    }

    #[test]
    fn magnitude_keeps_exactly_the_largest() {
        let mut d = vec![0.1, -0.5, 0.3, -0.05, 0.2, 0.0];
        sparsify(
            &mut d,
            6,
            Sparsifier::Magnitude { density: 0.5 },
            Rescale::None,
            &mut rng(),
        );
        assert_eq!(d, vec![0.0, -0.5, 0.3, 0.0, 0.2, 0.0]);
    }

    /// The k largest |δ| by a full sort (ties to the lower index): the reference for the
    /// selection-based pruning.
    fn top_k_by_sorting(delta: &[f32], k: usize) -> Vec<f32> {
        let mut idx: Vec<usize> = (0..delta.len()).collect();
        idx.sort_by(|&a, &b| delta[b].abs().total_cmp(&delta[a].abs()).then(a.cmp(&b)));
        let mut out = vec![0.0; delta.len()];
        for &i in &idx[..k.min(delta.len())] {
            out[i] = delta[i];
        }
        out
    }

    #[test]
    fn magnitude_pruning_equals_sorting_with_ties_whole_or_in_blocks() {
        let mut r = rng();
        let mut cases: Vec<Vec<f32>> = vec![];
        for (n, levels) in [(1, 3), (7, 2), (50, 5), (1000, 9), (1000, 1000)] {
            // Few distinct magnitudes of both signs, so many entries tie at the threshold.
            cases.push(
                (0..n)
                    .map(|_| r.random_range(-levels..=levels) as f32 / 4.0)
                    .collect(),
            );
        }
        // Magnitudes over many exponents (many histogram bins), and values that share their
        // high bits but not their low ones (one bin, resolved by the second pass).
        cases.push(
            (0..3000)
                .map(|_| r.random::<f32>().powi(9) * r.random_range(-1.0f32..1.0))
                .collect(),
        );
        cases.push(
            (0..3000)
                .map(|i| 1.0 + (i % 97) as f32 * f32::EPSILON)
                .collect(),
        );
        for orig in &cases {
            let n = orig.len();
            for density in [0.0, 0.1, 0.33, 0.5, 0.9, 1.0] {
                let want = top_k_by_sorting(orig, keep_count(density, n));
                let mut d = orig.clone();
                sparsify(
                    &mut d,
                    n,
                    Sparsifier::Magnitude { density },
                    Rescale::None,
                    &mut rng(),
                );
                assert_eq!(d, want, "n {n}, density {density}");
                // The same selection with the tensor fed a block at a time.
                for block in [1, 7, 256] {
                    let top = TopK::find(n, keep_count(density, n), |f| {
                        orig.chunks(block).for_each(|c| f(c));
                        Ok::<(), ()>(())
                    })
                    .unwrap();
                    let mut d = orig.clone();
                    let mut ties = top.ties();
                    d.chunks_mut(block).for_each(|c| top.apply(c, &mut ties));
                    assert_eq!(d, want, "n {n}, density {density}, blocks of {block}");
                }
            }
        }
    }

    #[test]
    fn magnitude_with_tiny_density_keeps_one_instead_of_crashing() {
        let mut d = vec![0.1, -0.5, 0.3];
        sparsify(
            &mut d,
            3,
            Sparsifier::Magnitude { density: 0.1 },
            Rescale::None,
            &mut rng(),
        );
        assert_eq!(d, vec![0.0, -0.5, 0.0]);
        let mut z = vec![0.1, -0.5];
        sparsify(
            &mut z,
            2,
            Sparsifier::Magnitude { density: 0.0 },
            Rescale::None,
            &mut rng(),
        );
        assert_eq!(z, vec![0.0, 0.0]);
    }

    #[test]
    fn breadcrumbs_drops_top_and_bottom() {
        // 10 entries, density 0.5 keeps 5, gamma 0.1 drops the largest one.
        let mut d: Vec<f32> = (1..=10).map(|x| x as f32).collect();
        sparsify(
            &mut d,
            10,
            Sparsifier::Breadcrumbs {
                density: 0.5,
                gamma: 0.1,
            },
            Rescale::None,
            &mut rng(),
        );
        assert_eq!(d, vec![0., 0., 0., 0., 5., 6., 7., 8., 9., 0.]);
        // gamma·n < 1: no outliers dropped (mergekit zeroes everything here).
        let mut d: Vec<f32> = (1..=10).map(|x| x as f32).collect();
        sparsify(
            &mut d,
            10,
            Sparsifier::Breadcrumbs {
                density: 0.3,
                gamma: 0.05,
            },
            Rescale::None,
            &mut rng(),
        );
        assert_eq!(d, vec![0., 0., 0., 0., 0., 0., 0., 8., 9., 10.]);
    }

    #[test]
    fn random_keeps_density_and_l1_rescale_preserves_norm() {
        let n = 1_000_000;
        let mut r = rng();
        let orig: Vec<f32> = (0..n).map(|_| r.random_range(-1.0..1.0)).collect();
        let mut d = orig.clone();
        sparsify(
            &mut d,
            n,
            Sparsifier::Random { density: 0.3 },
            Rescale::L1,
            &mut rng(),
        );
        let kept = d.iter().filter(|&&x| x != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.01 * 0.3 + 0.003, "kept {kept}");
        assert!((l1(&d) / l1(&orig) - 1.0).abs() < 1e-4);
    }

    #[test]
    fn della_keeps_density_on_average_and_l1_rescale_preserves_norm() {
        let (rows, cols) = (1000, 1000);
        let mut r = rng();
        let orig: Vec<f32> = (0..rows * cols)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        let mut d = orig.clone();
        sparsify(
            &mut d,
            cols,
            Sparsifier::Della {
                density: 0.4,
                epsilon: 0.15,
            },
            Rescale::L1,
            &mut rng(),
        );
        let kept = d.iter().filter(|&&x| x != 0.0).count() as f64 / d.len() as f64;
        assert!((kept - 0.4).abs() < 0.004, "kept {kept}");
        assert!((l1(&d) / l1(&orig) - 1.0).abs() < 1e-4);
    }

    #[test]
    fn della_keeps_large_entries_more_often() {
        let n = 100_000;
        let mut d: Vec<f32> = (0..n).map(|i| (i + 1) as f32).collect();
        sparsify(
            &mut d,
            n,
            Sparsifier::Della {
                density: 0.5,
                epsilon: 0.3,
            },
            Rescale::Exact,
            &mut rng(),
        );
        let low = d[..n / 10].iter().filter(|&&x| x != 0.0).count() as f64 / (n / 10) as f64;
        let high = d[n - n / 10..].iter().filter(|&&x| x != 0.0).count() as f64 / (n / 10) as f64;
        assert!(
            (low - 0.23).abs() < 0.02 && (high - 0.77).abs() < 0.02,
            "low {low} high {high}"
        );
        // Exact rescale: the largest kept entry was divided by its keep probability 0.8.
        assert!((d[n - 1] == 0.0) || ((d[n - 1] - n as f32 / 0.8).abs() < 1.0));
    }
}
