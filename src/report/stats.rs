//! Standard errors of one row's numbers, computed the way the numbers themselves are aggregated:
//! a task's mean over documents (lm-eval's `mean_stderr`), MMLU's unweighted mean over subjects,
//! the leaderboard average over six benchmarks, and a ratio of sums (a per-token loss).

pub(crate) use crate::stats::{macro_mean, mean_stderr, Estimate};

/// The leaderboard average of independent benchmarks: plain mean, stderr sqrt(Σ se_b²) / k.
/// Unlike MMLU's subjects, a benchmark without a stderr leaves the average's stderr undefined:
/// dropping it would understate the noise of a number the reader compares rows by.
pub(crate) fn average(parts: &[Estimate]) -> Option<Estimate> {
    if parts.is_empty() {
        return None;
    }
    let k = parts.len() as f64;
    Some(Estimate {
        value: parts.iter().map(|p| p.value).sum::<f64>() / k,
        stderr: parts.iter().map(|p| p.stderr.powi(2)).sum::<f64>().sqrt() / k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn the_average_combines_independent_stderrs() {
        let parts: Vec<Estimate> = [0.3, 0.4, 0.0, 0.0, 0.0, 0.0]
            .iter()
            .map(|&se| Estimate {
                value: 60.0,
                stderr: se,
            })
            .collect();
        let a = average(&parts).unwrap();
        assert!(close(a.value, 60.0) && close(a.stderr, 0.5 / 6.0), "{a:?}");
        let mut missing = parts.clone();
        missing[5].stderr = f64::NAN;
        assert!(average(&missing).unwrap().stderr.is_nan());
    }
}
