//! Percentiles and small summaries.

use serde::{Deserialize, Serialize};

/// p50/p90/p99 and the mean of a sample (NaN-free input; empty → all `None`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Quantiles {
    /// Sample size.
    pub n: usize,
    /// Mean.
    pub mean: Option<f64>,
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
}

/// The `q`-quantile of sorted `v` by linear interpolation between closest ranks (numpy's
/// default, which `benchmark_serving` uses).
pub fn quantile_sorted(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    Some(v[lo] + (v[hi] - v[lo]) * frac)
}

impl Quantiles {
    /// Summarises `v` (consumed and sorted).
    pub fn of(mut v: Vec<f64>) -> Self {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Quantiles {
            n,
            mean: (n > 0).then(|| v.iter().sum::<f64>() / n as f64),
            p50: quantile_sorted(&v, 0.5),
            p90: quantile_sorted(&v, 0.9),
            p99: quantile_sorted(&v, 0.99),
            max: v.last().copied(),
        }
    }
}

/// Quantile `q` of a Prometheus histogram given as cumulative `(upper_bound, count)` buckets
/// (the last bound may be +Inf), interpolating linearly inside the bucket as Prometheus'
/// `histogram_quantile` does.
pub fn histogram_quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let width = c - prev.1;
            let frac = if width > 0.0 {
                (rank - prev.1) / width
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, c);
    }
    Some(prev.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let q = Quantiles::of((1..=101).map(f64::from).collect());
        assert_eq!(q.p50, Some(51.0));
        assert_eq!(q.p90, Some(91.0));
        assert_eq!(q.p99, Some(100.0));
        assert_eq!(q.mean, Some(51.0));
        assert_eq!(Quantiles::of(vec![]).p50, None);
        assert_eq!(quantile_sorted(&[1.0, 2.0], 0.5), Some(1.5));
    }

    #[test]
    fn histogram_quantile_interpolates_in_bucket() {
        let b = [(1.0, 0.0), (2.0, 10.0), (4.0, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(histogram_quantile(&b, 0.5), Some(2.0));
        assert_eq!(histogram_quantile(&b, 0.25), Some(1.5));
        assert_eq!(histogram_quantile(&b, 0.75), Some(3.0));
        assert_eq!(histogram_quantile(&[(1.0, 0.0)], 0.5), None);
    }
}
