//! TIES sign election and the disjoint mean over agreeing task vectors.

/// How the elected sign of each entry is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignRule {
    /// Sign of the sum of weighted deltas (mergekit's only selectable rule).
    Sum,
    /// Majority of the signs.
    Count,
}

/// Per entry: +1 or −1 (ties go to +, as in mergekit).
pub fn elect_signs<D: AsRef<[f32]>>(weighted: &[D], rule: SignRule) -> Vec<f32> {
    let n = weighted.first().map_or(0, |d| d.as_ref().len());
    (0..n).map(|j| elect_sign(weighted, j, rule)).collect()
}

/// The elected sign of entry `j`: +1 or −1 (ties go to +, as in mergekit).
pub fn elect_sign<D: AsRef<[f32]>>(weighted: &[D], j: usize, rule: SignRule) -> f32 {
    let score: f32 = match rule {
        SignRule::Sum => weighted.iter().map(|d| d.as_ref()[j]).sum(),
        SignRule::Count => weighted.iter().map(|d| sign(d.as_ref()[j])).sum(),
    };
    if score >= 0.0 {
        1.0
    } else {
        -1.0
    }
}

pub fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}
