//! ROC curve and its area for a detector score (higher means "positive").

/// ROC points `(false positive rate, true positive rate)` from `(0, 0)` to `(1, 1)`, one per
/// distinct threshold, and the area under the curve (ties count one half, as Mann-Whitney).
pub fn roc(negatives: &[f64], positives: &[f64]) -> (Vec<(f64, f64)>, f64) {
    let (n_neg, n_pos) = (negatives.len() as f64, positives.len() as f64);
    if negatives.is_empty() || positives.is_empty() {
        return (vec![(0.0, 0.0), (1.0, 1.0)], f64::NAN);
    }
    let mut scored: Vec<(f64, bool)> = negatives
        .iter()
        .map(|&s| (s, false))
        .chain(positives.iter().map(|&s| (s, true)))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut points = vec![(0.0, 0.0)];
    let (mut tp, mut fp, mut area) = (0.0, 0.0, 0.0);
    let mut i = 0;
    while i < scored.len() {
        let (prev_tp, prev_fp) = (tp, fp);
        let threshold = scored[i].0;
        while i < scored.len() && scored[i].0 == threshold {
            if scored[i].1 {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        // Trapezoid: a block of tied scores contributes half its rectangle.
        area += (fp - prev_fp) * (tp + prev_tp) / 2.0;
        points.push((fp / n_neg, tp / n_pos));
    }
    (points, area / (n_neg * n_pos))
}

#[cfg(test)]
mod tests {
    use super::roc;

    #[test]
    fn perfect_random_and_inverted_detectors() {
        let (pts, auc) = roc(&[0.1, 0.2, 0.3], &[0.7, 0.8]);
        assert_eq!(auc, 1.0);
        assert_eq!(pts.first(), Some(&(0.0, 0.0)));
        assert_eq!(pts.last(), Some(&(1.0, 1.0)));
        assert!(pts.contains(&(0.0, 1.0)));
        assert_eq!(roc(&[0.7, 0.8], &[0.1, 0.2, 0.3]).1, 0.0);
        // All scores tied: no information.
        assert_eq!(roc(&[0.5; 4], &[0.5; 6]).1, 0.5);
        // Interleaved: 0.1- 0.2+ 0.3- 0.4+ gives 3 of 4 ordered pairs.
        assert_eq!(roc(&[0.1, 0.3], &[0.2, 0.4]).1, 0.75);
        assert!(roc(&[], &[0.1]).1.is_nan());
    }
}
