//! Draft tokens for greedy generation by prompt lookup: the tokens that followed the latest
//! earlier occurrence of the sequence's last few tokens. The engine feeds a row's draft after its
//! input token in one forward and keeps the draft tokens the model's own greedy choices agree
//! with, so the output is the greedy output; only the number of decode steps changes.
//!
//! A decode step reads every weight once whatever its number of rows (a memory-bound pass at a
//! handful of rows), so verifying a few drafted tokens per row costs about as much as decoding
//! one. GSM8K's worked solutions repeat the question's numbers and their own phrases, and a small
//! model's generations repeat themselves: on paft's 40 benchmark documents with SmolLM2-135M, a
//! draft of up to 4 tokens from 3-, 2- or 1-grams would have produced 2.2 tokens per step.

/// n-gram lengths tried, longest first: a longer match predicts better, a shorter one more often.
const NGRAMS: [usize; 3] = [3, 2, 1];

/// Up to `k` tokens that followed the latest earlier occurrence of the last n tokens of `seq`
/// (n = 3, 2 or 1, the longest that occurs earlier); empty when none does.
pub(crate) fn prompt_lookup(seq: &[u32], k: usize) -> &[u32] {
    if k == 0 {
        return &[];
    }
    for n in NGRAMS {
        if seq.len() <= n {
            continue;
        }
        let tail = &seq[seq.len() - n..];
        // Occurrences that end before the last token, latest first.
        if let Some(start) = (0..seq.len() - n).rev().find(|&s| &seq[s..s + n] == tail) {
            let from = start + n;
            return &seq[from..(from + k).min(seq.len())];
        }
    }
    &[]
}

#[cfg(test)]
mod tests {
    use super::prompt_lookup;

    #[test]
    fn drafts_what_followed_the_latest_longest_match() {
        // "1 2 3" occurred at 0 and 5, followed by 4 5 and by 9 8; the latest wins.
        let seq = [1, 2, 3, 4, 5, 1, 2, 3, 9, 8, 7, 1, 2, 3];
        assert_eq!(prompt_lookup(&seq, 2), &[9, 8]);
        assert_eq!(prompt_lookup(&seq, 10), &[9, 8, 7, 1, 2, 3]);
        // No earlier "6 3", "7 6 3"; "3" occurred, followed by 9.
        let seq = [1, 3, 9, 7, 6, 3];
        assert_eq!(prompt_lookup(&seq, 3), &[9, 7, 6]);
        // A 3-gram beats a later 1-gram: "5 6 7" → 8, although "7" alone last preceded 0.
        let seq = [5, 6, 7, 8, 7, 0, 5, 6, 7];
        assert_eq!(prompt_lookup(&seq, 1), &[8]);
    }

    #[test]
    fn drafts_nothing_without_an_earlier_match_or_room() {
        assert!(prompt_lookup(&[1, 2, 3, 4], 4).is_empty());
        assert!(prompt_lookup(&[7], 4).is_empty());
        assert!(prompt_lookup(&[], 4).is_empty());
        assert!(prompt_lookup(&[7, 7, 7], 0).is_empty());
        // The match may run into the end: "7 7" at 0 is followed by the last 7 only.
        assert_eq!(prompt_lookup(&[7, 7, 7], 4), &[7]);
    }
}
