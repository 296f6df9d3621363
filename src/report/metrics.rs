//! Measured counters of a run: tokens and the time llama.cpp spent on them.
//!
//! Every figure comes from a count or a clock, never from an estimate. A decode call that holds
//! any prompt token counts as prefill time; a call of generated tokens alone counts as decode
//! time, so the two rates are each measured on their own calls.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::prompt::PrefixKey;

/// How a prefix got into the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PrefixSource {
    /// Computed by llama.cpp in this run.
    Prefilled,
    /// Loaded from a state file.
    Restored,
}

impl std::fmt::Display for PrefixSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Prefilled => "prefilled",
            Self::Restored => "restored",
        })
    }
}

/// One prefix made resident, as the run summary reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixEvent {
    /// Which prefix.
    pub key: PrefixKey,
    /// Its tokens.
    pub tokens: usize,
    /// Prefilled or restored.
    pub source: PrefixSource,
    /// Size of its state file, when one was read or written.
    pub file_bytes: Option<u64>,
    /// Time to prefill or restore it (saving excluded).
    pub time: Duration,
}

/// Totals of the prefixes made resident one way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixTotals {
    /// Prefixes made resident (a prefix evicted and brought back counts again).
    pub count: u64,
    /// Their tokens.
    pub tokens: u64,
    /// Time spent on them.
    pub time: Duration,
}

/// Prefix events kept one by one; past this, only the totals grow, so a run whose prefixes
/// keep being evicted and brought back holds bounded memory.
pub const MAX_PREFIX_EVENTS: usize = 64;

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
    /// Tokens of embedding inputs computed.
    pub embedded_tokens: u64,
    /// Time in the decode calls of embedding inputs.
    pub embedding_time: Duration,
    /// The first [`MAX_PREFIX_EVENTS`] prefixes made resident, with their size and time.
    pub prefix_events: Vec<PrefixEvent>,
    /// Every prefix made resident, by source.
    pub prefix_totals: BTreeMap<PrefixSource, PrefixTotals>,
    /// Requests that completed.
    pub requests_ok: u64,
    /// Requests that got an error line.
    pub requests_failed: u64,
    /// Of the completed, those copied from an earlier output (`--reuse`).
    pub requests_reused: u64,
    /// Of the completed, those copied from an identical request of the same input.
    pub requests_deduplicated: u64,
    /// Error lines by their `error.code`.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Seconds from admission to first token, over completed requests.
    pub time_to_first_token: Histogram,
}

impl Metrics {
    /// Records a prefix made resident.
    pub fn record_prefix(&mut self, event: &PrefixEvent) {
        let t = self.prefix_totals.entry(event.source).or_default();
        t.count += 1;
        t.tokens += event.tokens as u64;
        t.time += event.time;
        if self.prefix_events.len() < MAX_PREFIX_EVENTS {
            self.prefix_events.push(event.clone());
        }
    }

    /// Prefixes made resident, over all sources.
    pub fn prefix_count(&self) -> u64 {
        self.prefix_totals.values().map(|t| t.count).sum()
    }

    /// Prefix tokens made resident by `source`.
    pub fn prefix_tokens(&self, source: PrefixSource) -> u64 {
        self.prefix_totals.get(&source).map_or(0, |t| t.tokens)
    }

    /// Time spent making prefixes resident by `source`.
    pub fn prefix_time(&self, source: PrefixSource) -> Duration {
        self.prefix_totals
            .get(&source)
            .map_or(Duration::ZERO, |t| t.time)
    }

    /// Embedding rate: input tokens per second of embedding calls.
    pub fn embedding_tokens_per_sec(&self) -> f64 {
        rate(self.embedded_tokens, self.embedding_time)
    }

    /// Prefill rate over the calls that held prompt tokens.
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        rate(self.prompt_tokens_computed, self.prefill_time)
    }

    /// Decode rate over the calls of generated tokens only.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        rate(self.decode_tokens, self.decode_time)
    }

    /// A percentile (0–100) of time to first token, within the histogram's 2% resolution.
    pub fn ttft_percentile(&self, p: f64) -> Option<f64> {
        self.time_to_first_token.percentile(p)
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

/// Smallest value a [`Histogram`] tells apart, in seconds.
const HIST_MIN: f64 = 1e-4;
/// Each bucket is this much wider than the one before: 2% resolution.
const HIST_GROWTH: f64 = 1.02;
/// Buckets from 0.1 ms to beyond a day.
const HIST_BUCKETS: usize = 1100;

/// A log-bucketed histogram of durations: memory stays fixed however many requests run.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; HIST_BUCKETS],
            n: 0,
        }
    }
}

impl Histogram {
    /// Adds one sample, in seconds.
    pub fn record(&mut self, secs: f64) {
        let i = if secs <= HIST_MIN {
            0
        } else {
            ((secs / HIST_MIN).ln() / HIST_GROWTH.ln()).ceil() as usize
        };
        self.counts[i.min(HIST_BUCKETS - 1)] += 1;
        self.n += 1;
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether no sample was recorded.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The nearest-rank percentile (0–100), as its bucket's upper bound; `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((p / 100.0) * self.n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(HIST_MIN * HIST_GROWTH.powi(i as i32));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_within_two_percent() {
        let mut h = Histogram::default();
        assert_eq!(h.percentile(50.0), None);
        for s in [5.0, 1.0, 4.0, 2.0, 3.0] {
            h.record(s);
        }
        let near = |got: Option<f64>, want: f64| {
            let g = got.unwrap();
            assert!(g >= want && g <= want * 1.02, "{g} vs {want}");
        };
        near(h.percentile(50.0), 3.0);
        near(h.percentile(100.0), 5.0);
        near(h.percentile(0.0), 1.0);
        assert_eq!(h.len(), 5);
    }

    #[test]
    fn prefix_events_are_bounded_but_totals_count_all() {
        let mut m = Metrics::default();
        for i in 0..(MAX_PREFIX_EVENTS + 10) {
            m.record_prefix(&PrefixEvent {
                key: PrefixKey::of(&[crate::engine::Token(i as i32)]),
                tokens: 100,
                source: if i % 2 == 0 {
                    PrefixSource::Prefilled
                } else {
                    PrefixSource::Restored
                },
                file_bytes: None,
                time: Duration::from_millis(1),
            });
        }
        assert_eq!(m.prefix_events.len(), MAX_PREFIX_EVENTS);
        assert_eq!(m.prefix_count(), MAX_PREFIX_EVENTS as u64 + 10);
        assert_eq!(m.prefix_tokens(PrefixSource::Prefilled), 3700);
        assert_eq!(
            m.prefix_time(PrefixSource::Restored),
            Duration::from_millis(37)
        );
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
