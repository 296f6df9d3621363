//! Measured counters of a run: tokens and the time llama.cpp spent on them.
//!
//! Every figure comes from a count or a clock, never from an estimate. A decode call that holds
//! any prompt token counts as prefill time; a call of generated tokens alone counts as decode
//! time, so the two rates are each measured on their own calls.

use std::time::Duration;

use crate::prefix_cache::{PrefixEvent, PrefixSource};

/// Counters updated by the scheduler as it works.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Prompt tokens computed by llama.cpp (shared prefixes included, once each).
    pub prompt_tokens_computed: u64,
    /// Prompt tokens requests took from a shared prefix instead of computing them.
    pub prompt_tokens_reused: u64,
    /// Time in decode calls holding prompt tokens.
    pub prefill_time: Duration,
    /// Generated tokens fed back in decode calls of generated tokens only.
    pub decode_tokens: u64,
    /// Time in those calls.
    pub decode_time: Duration,
    /// Tokens sampled, over all requests.
    pub completion_tokens: u64,
    /// Each prefix made resident: prefilled or restored, with its size and time.
    pub prefix_events: Vec<PrefixEvent>,
    /// Requests that completed.
    pub requests_ok: u64,
    /// Requests that got an error line.
    pub requests_failed: u64,
    /// Error lines by their `error.code`.
    pub errors_by_code: std::collections::BTreeMap<String, u64>,
    /// Seconds from admission to first token, one per completed request.
    pub time_to_first_token: Vec<f64>,
}

impl Metrics {
    /// Records a prefix made resident.
    pub fn record_prefix(&mut self, event: &PrefixEvent) {
        self.prefix_events.push(event.clone());
    }

    /// Prefix tokens made resident by `source`.
    pub fn prefix_tokens(&self, source: PrefixSource) -> u64 {
        self.prefix_events
            .iter()
            .filter(|e| e.source == source)
            .map(|e| e.tokens as u64)
            .sum()
    }

    /// Prefill rate over the calls that held prompt tokens.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        rate(self.prompt_tokens_computed, self.prefill_time)
    }

    /// Decode rate over the calls of generated tokens only.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        rate(self.decode_tokens, self.decode_time)
    }

    /// A percentile (0–100) of time to first token, by nearest rank.
    pub fn ttft_percentile(&self, p: f64) -> Option<f64> {
        percentile(&self.time_to_first_token, p)
    }
}

fn rate(tokens: u64, time: Duration) -> f64 {
    let secs = time.as_secs_f64();
    if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    }
}

/// Nearest-rank percentile of unsorted samples; `None` when there are none.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_by_nearest_rank() {
        let s = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&s, 50.0), Some(3.0));
        assert_eq!(percentile(&s, 100.0), Some(5.0));
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn rates_are_zero_without_time() {
        let m = Metrics {
            prompt_tokens_computed: 100,
            prefill_time: Duration::from_millis(500),
            decode_tokens: 10,
            ..Metrics::default()
        };
        assert_eq!(m.prefill_tokens_per_sec(), 200.0);
        assert_eq!(m.decode_tokens_per_sec(), 0.0);
    }
}
