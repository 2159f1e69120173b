//! Distribution statistics on plain samples.

use serde::Serialize;

/// Moments and shape of a sample of weights.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    pub mean_abs: f64,
    /// Excess kurtosis (0 for a normal distribution), from population moments.
    pub kurtosis: f64,
    /// Share of values with `|w| < near_zero`.
    pub near_zero_share: f64,
    pub near_zero: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(xs: &[f64], near_zero: f64) -> Self {
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let m2 = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        let m4 = xs.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n;
        Self {
            count: xs.len(),
            mean,
            std: m2.sqrt(),
            mean_abs: xs.iter().map(|x| x.abs()).sum::<f64>() / n,
            kurtosis: if m2 > 0.0 { m4 / (m2 * m2) - 3.0 } else { f64::NAN },
            near_zero_share: xs.iter().filter(|x| x.abs() < near_zero).count() as f64 / n,
            near_zero,
            min: xs.iter().copied().fold(f64::INFINITY, f64::min),
            max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// Counts of a sample over bins `[edges[i], edges[i+1])`, the last bin closed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
    /// Values outside the edges (not counted in any bin).
    pub outside: u64,
}

impl Histogram {
    /// `bins` equal bins spanning every sample given (so several samples share them).
    pub fn shared_edges(samples: &[&[f64]], bins: usize) -> Vec<f64> {
        let bins = bins.max(1);
        let (lo, hi) = samples
            .iter()
            .flat_map(|s| s.iter().copied())
            .filter(|x| x.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        let (lo, hi) = if lo.is_finite() && hi > lo {
            (lo, hi)
        } else if lo.is_finite() {
            (lo - 0.5, lo + 0.5)
        } else {
            (0.0, 1.0)
        };
        (0..=bins).map(|i| lo + (hi - lo) * i as f64 / bins as f64).collect()
    }

    pub fn new(xs: &[f64], edges: Vec<f64>) -> Self {
        let bins = edges.len().saturating_sub(1);
        let mut counts = vec![0u64; bins];
        let mut outside = 0;
        let (lo, hi) = (edges[0], edges[bins]);
        let width = (hi - lo) / bins as f64;
        for &x in xs {
            if !(x >= lo && x <= hi) {
                outside += 1;
                continue;
            }
            let i = (((x - lo) / width) as usize).min(bins - 1);
            // Rounding can put a value one bin off; the edges decide.
            let i = if x < edges[i] {
                i - 1
            } else if i + 1 < bins && x >= edges[i + 1] {
                i + 1
            } else {
                i
            };
            counts[i] += 1;
        }
        Self { edges, counts, outside }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Counts divided by (total * bin width): integrates to 1 over the edges.
    pub fn density(&self) -> Vec<f64> {
        let total = self.total().max(1) as f64;
        self.counts
            .iter()
            .zip(self.edges.windows(2))
            .map(|(&c, e)| c as f64 / (total * (e[1] - e[0])))
            .collect()
    }
}

/// Wasserstein-1 (earth mover's) distance between two empirical distributions:
/// the integral of `|F_a(x) - F_b(x)|`. Exact; non-finite values are ignored.
pub fn wasserstein1(a: &[f64], b: &[f64]) -> f64 {
    let sorted = |s: &[f64]| {
        let mut v: Vec<f64> = s.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (a, b) = (sorted(a), sorted(b));
    if a.is_empty() || b.is_empty() {
        return f64::NAN;
    }
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j, mut dist) = (0usize, 0usize, 0.0);
    let mut x = a[0].min(b[0]);
    while i < a.len() || j < b.len() {
        let next = match (a.get(i), b.get(j)) {
            (Some(&p), Some(&q)) => p.min(q),
            (Some(&p), None) => p,
            (None, Some(&q)) => q,
            (None, None) => break,
        };
        dist += (i as f64 / na - j as f64 / nb).abs() * (next - x);
        x = next;
        while a.get(i) == Some(&next) {
            i += 1;
        }
        while b.get(j) == Some(&next) {
            j += 1;
        }
    }
    dist
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_by_hand() {
        // 1, 2, 3, 4: mean 2.5, variance 1.25, fourth moment (2*1.5^4 + 2*0.5^4)/4 = 2.5625.
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0], 1.5);
        assert_eq!(s.count, 4);
        assert!((s.mean - 2.5).abs() < 1e-12);
        assert!((s.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert!((s.kurtosis - (2.5625 / 1.5625 - 3.0)).abs() < 1e-12);
        assert!((s.near_zero_share - 0.25).abs() < 1e-12);
        assert!((s.mean_abs - 2.5).abs() < 1e-12);
    }

    #[test]
    fn kurtosis_of_known_distributions() {
        // A symmetric two-point distribution has excess kurtosis -2; a uniform grid tends to -1.2.
        let two: Vec<f64> = (0..1000).map(|i| if i % 2 == 0 { -1.0 } else { 1.0 }).collect();
        assert!((Summary::of(&two, 0.1).kurtosis + 2.0).abs() < 1e-12);
        let uniform: Vec<f64> = (0..100_000).map(|i| i as f64 / 100_000.0).collect();
        assert!((Summary::of(&uniform, 0.1).kurtosis + 1.2).abs() < 1e-3);
    }

    #[test]
    fn wasserstein_of_shifted_samples_is_the_shift() {
        let a: Vec<f64> = (0..100).map(|i| (i as f64).sin()).collect();
        let b: Vec<f64> = a.iter().map(|x| x + 0.3).collect();
        assert!((wasserstein1(&a, &b) - 0.3).abs() < 1e-12);
        assert!(wasserstein1(&a, &a).abs() < 1e-12);
        // Different sizes: {0} vs {0, 1} moves half the mass by 1.
        assert!((wasserstein1(&[0.0], &[0.0, 1.0]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn histogram_counts_add_up() {
        let xs: Vec<f64> = (0..1000).map(|i| ((i * 37) % 101) as f64 / 7.0 - 3.0).collect();
        let edges = Histogram::shared_edges(&[&xs], 17);
        let h = Histogram::new(&xs, edges);
        assert_eq!(h.total(), 1000);
        assert_eq!(h.outside, 0);
        let area: f64 = h
            .density()
            .iter()
            .zip(h.edges.windows(2))
            .map(|(d, e)| d * (e[1] - e[0]))
            .sum();
        assert!((area - 1.0).abs() < 1e-12);
        // Shared bins: values of another sample outside them are counted as outside.
        let h2 = Histogram::new(&[100.0, 0.0], h.edges.clone());
        assert_eq!((h2.total(), h2.outside), (1, 1));
    }
}
