//! Requests in flight by computation key. With dedup on, the first request with a key runs and
//! later identical ones wait for its outcome and take a copy of it instead of running too.

use std::collections::HashMap;

use crate::formats::result::ComputationKey;
use crate::schedule::job::Job;

/// A request waiting for an identical one to finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Twin {
    /// Its input line.
    pub line: u64,
    /// Its `custom_id`.
    pub custom_id: String,
}

/// Requests in flight by key, and the twins waiting on each.
#[derive(Debug, Default)]
pub struct Twins {
    dedup: bool,
    running: HashMap<u64, ComputationKey>,
    waiting: HashMap<ComputationKey, Vec<Twin>>,
}

impl Twins {
    /// An empty set; without `dedup` no request is held, only the keys in flight are kept.
    pub fn new(dedup: bool) -> Self {
        Self {
            dedup,
            ..Self::default()
        }
    }

    /// Holds `job` back when dedup is on and an identical request is in flight (returns true:
    /// it waits for that one's outcome); otherwise records it as in flight for its key.
    pub fn hold(&mut self, job: &Job) -> bool {
        if let Some(twins) = self.waiting.get_mut(&job.key).filter(|_| self.dedup) {
            twins.push(Twin {
                line: job.line,
                custom_id: job.custom_id.clone(),
            });
            return true;
        }
        self.running.insert(job.line, job.key);
        self.waiting.insert(job.key, Vec::new());
        false
    }

    /// The outcome of the request on `line` is in: its key, and the twins that waited for it
    /// (none when it was not in flight here).
    pub fn finished(&mut self, line: u64) -> Option<(ComputationKey, Vec<Twin>)> {
        let key = self.running.remove(&line)?;
        let twins = self.waiting.remove(&key).unwrap_or_default();
        Some((key, twins))
    }

    /// Twins waiting, over all keys.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SamplerSpec;
    use crate::prompt::SplitPrompt;
    use crate::schedule::job::GenParams;

    fn job(line: u64, key: u8) -> Job {
        Job {
            line,
            custom_id: format!("c{line}"),
            prompt: SplitPrompt {
                tokens: Vec::new(),
                shared_len: 0,
            },
            params: GenParams {
                sampler: SamplerSpec {
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: 0,
                    min_p: 0.0,
                    seed: 0,
                    frequency_penalty: 0.0,
                    presence_penalty: 0.0,
                    penalty_window: 1,
                },
                max_tokens: 1,
                stop: Vec::new(),
                n: 1,
                logprobs: None,
                constraint: None,
            },
            key: ComputationKey([key; 32]),
            endpoint: crate::formats::result::Endpoint::Chat,
        }
    }

    #[test]
    fn the_first_of_a_key_runs_and_the_rest_wait_for_its_outcome() {
        let mut t = Twins::new(true);
        assert!(!t.hold(&job(1, 7)));
        assert!(!t.hold(&job(2, 8)));
        assert!(t.hold(&job(3, 7)));
        assert!(t.hold(&job(5, 7)));
        assert_eq!(t.waiting(), 2);
        let (key, twins) = t.finished(1).unwrap();
        assert_eq!(key, ComputationKey([7; 32]));
        let lines: Vec<u64> = twins.iter().map(|t| t.line).collect();
        assert_eq!(lines, [3, 5]);
        assert_eq!(twins[0].custom_id, "c3");
        assert_eq!(t.finished(2).unwrap().1, Vec::new());
        // Lines not in flight here (a twin, or a run without dedup) have nothing to release.
        assert_eq!(t.finished(3), None);
        // Once the first finished, the next of that key runs again (the caller copies it from
        // the output instead, when it can).
        assert!(!t.hold(&job(9, 7)));
        assert_eq!(t.waiting(), 0);
    }

    #[test]
    fn without_dedup_every_request_runs_and_keeps_its_key() {
        let mut t = Twins::new(false);
        assert!(!t.hold(&job(1, 7)));
        assert!(!t.hold(&job(2, 7)));
        assert_eq!(t.finished(2).map(|f| f.0), Some(ComputationKey([7; 32])));
        assert_eq!(t.finished(1).map(|f| f.0), Some(ComputationKey([7; 32])));
    }
}
