//! Log-probabilities from a row of logits: the log of the softmax over the whole vocabulary,
//! for the chosen token and for the most likely ones (OpenAI's `logprobs`).

/// The log-probability of token `chosen` under the softmax of `logits`, and the `top` most
/// likely token ids with theirs, most likely first (equal logits: the lower id first, as a
/// greedy choice breaks ties).
///
/// One pass finds the largest logit, one sums `exp(logit - largest)` (each term in `f32`, the
/// sum in `f64`: 49,152 terms in `f32` would lose about four digits), one keeps the top ids.
pub fn logprobs(logits: &[f32], chosen: usize, top: usize) -> (f32, Vec<(usize, f32)>) {
    let largest = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !largest.is_finite() {
        return (f32::NEG_INFINITY, Vec::new());
    }
    let sum: f64 = logits
        .iter()
        .map(|&logit| f64::from((logit - largest).exp()))
        .sum();
    let log_normaliser = f64::from(largest) + sum.ln();
    let logprob = |logit: f32| (f64::from(logit) - log_normaliser) as f32;
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &logit) in logits.iter().enumerate() {
            if best.len() == top && best.last().is_some_and(|&(last, _)| logit <= last) {
                continue;
            }
            // After every equal logit: the lower id stays first.
            let at = best.partition_point(|&(kept, _)| kept >= logit);
            best.insert(at, (logit, id));
            best.truncate(top);
        }
    }
    let chosen_logprob = logits
        .get(chosen)
        .map_or(f32::NEG_INFINITY, |&logit| logprob(logit));
    (
        chosen_logprob,
        best.into_iter()
            .map(|(logit, id)| (id, logprob(logit)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::logprobs;
    use proptest::prelude::*;

    #[test]
    fn a_uniform_row_gives_equal_shares() {
        let (chosen, top) = logprobs(&[1.0; 4], 2, 3);
        assert!((chosen - 0.25f32.ln()).abs() < 1e-6);
        assert_eq!(top.iter().map(|&(id, _)| id).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(logprobs(&[f32::NEG_INFINITY; 3], 0, 2).1.is_empty());
        assert_eq!(logprobs(&[0.5, 2.0], 1, 0).1, []);
    }

    proptest! {
        #[test]
        fn matches_a_direct_computation(
            logits in proptest::collection::vec(-30.0f32..30.0, 1..300),
            chosen in 0usize..300,
            top in 0usize..=20,
        ) {
            let chosen = chosen % logits.len();
            let (logprob, best) = logprobs(&logits, chosen, top);
            let norm: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
            let direct = |id: usize| f64::from(logits[id]) - norm;
            prop_assert!((f64::from(logprob) - direct(chosen)).abs() < 1e-4);
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            order.truncate(top);
            prop_assert_eq!(best.iter().map(|&(id, _)| id).collect::<Vec<_>>(), order);
            for &(id, logprob) in &best {
                prop_assert!((f64::from(logprob) - direct(id)).abs() < 1e-4);
            }
            let total: f64 = (0..logits.len()).map(|id| direct(id).exp()).sum();
            prop_assert!((total - 1.0).abs() < 1e-9);
        }
    }
}
