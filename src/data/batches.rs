//! Length-grouped batches with a seeded shuffle: similar lengths share a batch (little padding),
//! the order is random but the same for the same seed and epoch, so a resumed run sees the same
//! batches.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Batches of example indices for one epoch.
pub type BatchPlan = Vec<Vec<usize>>;

/// Shuffles, groups into windows of 50 batches sorted by length, cuts batches, and shuffles
/// their order (the scheme of transformers' `group_by_length`).
pub fn length_grouped_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> BatchPlan {
    let batch_size = batch_size.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    let mut batches: BatchPlan = vec![];
    for window in order.chunks(batch_size * 50) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch_size).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_grouped_and_complete() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 37) % 300).collect();
        let a = length_grouped_batches(&lengths, 8, 1, 0);
        assert_eq!(a, length_grouped_batches(&lengths, 8, 1, 0));
        assert_ne!(a, length_grouped_batches(&lengths, 8, 1, 1));
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        // Within a batch lengths are close: far less spread than random batches would have.
        let spread: usize = a
            .iter()
            .map(|b| {
                let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
                l.iter().max().unwrap() - l.iter().min().unwrap()
            })
            .sum::<usize>()
            / a.len();
        assert!(spread < 30, "mean spread {spread}");
    }
}
