//! Log probabilities of a decoded row: the model's own distribution, before any sampler.

use super::Token;

/// A token's log probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token's own.
    pub logprob: f32,
    /// The most likely tokens, most likely first.
    pub top: Vec<(Token, f32)>,
}

/// Log-softmax of `logits` at `token`, and its `top` largest entries (ties by lower id).
pub fn log_softmax_top(logits: &[f32], token: Token, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let logprob = |l: f32| (f64::from(l) - lse) as f32;
    let mut best: Vec<(Token, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &l) in logits.iter().enumerate() {
            if best.len() == top && l <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (Token(i32::try_from(id).unwrap_or(i32::MAX)), l));
            best.truncate(top);
        }
    }
    let own = usize::try_from(token.0)
        .ok()
        .and_then(|i| logits.get(i))
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    TokenLogprobs {
        logprob: logprob(own),
        top: best.into_iter().map(|(t, l)| (t, logprob(l))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises_and_ranks() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let lp = log_softmax_top(&logits, Token(2), 2);
        let total: f64 = (0..4)
            .map(|t| f64::from(log_softmax_top(&logits, Token(t), 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let z = 1f64.exp() + 2.0 * 3f64.exp() + 2f64.exp();
        assert!((f64::from(lp.logprob) - (2.0 - z.ln())).abs() < 1e-6);
        // Ties go to the lower id; most likely first.
        assert_eq!(
            lp.top.iter().map(|(t, _)| t.0).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert!(lp.top[0].1 > lp.logprob);
        assert_eq!(
            log_softmax_top(&logits, Token(9), 0).logprob,
            f32::NEG_INFINITY
        );
    }
}
