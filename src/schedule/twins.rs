//! Requests in flight by computation key. With dedup on, the first request with a key runs and
//! later identical ones wait for its outcome and take a copy of it instead of running too. A
//! copy is only ever of what the request's content decides: when the one that ran failed for a
//! reason of the moment (an engine failure), its twins are computed after all.

use std::collections::HashMap;

use crate::formats::result::ComputationKey;
use crate::schedule::job::Job;
use crate::schedule::scheduler::Outcome;

/// A request waiting for an identical one to finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Twin {
    /// Its input line.
    pub line: u64,
    /// Its `custom_id`.
    pub custom_id: String,
}

/// The twins waiting on one key, and the job they would run: the first twin's. Twins differ
/// only in their line and `custom_id` (the key covers everything else, the seed included), so
/// that one job serves each of them.
#[derive(Debug)]
struct Waiting {
    job: Option<Box<Job>>,
    twins: Vec<Twin>,
}

/// What the outcome of a request in flight here means for the twins that waited on it.
#[derive(Debug)]
pub enum Release {
    /// The outcome is theirs too: each gets a copy under its own ids (none may wait).
    Copy(Vec<Twin>),
    /// It failed for a reason of the moment: the first twin runs this job in its place, and
    /// the others wait on that one now.
    Run(Box<Job>),
}

/// A request in flight here finished: its key, and what becomes of its twins.
#[derive(Debug)]
pub struct Finished {
    /// The key of its computation.
    pub key: ComputationKey,
    /// What becomes of the twins that waited on it.
    pub release: Release,
}

/// Requests in flight by key, and the twins waiting on each.
#[derive(Debug, Default)]
pub struct Twins {
    dedup: bool,
    running: HashMap<u64, ComputationKey>,
    waiting: HashMap<ComputationKey, Waiting>,
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
        if let Some(w) = self.waiting.get_mut(&job.key).filter(|_| self.dedup) {
            // The first twin's job is kept, in case its twins must run after all.
            w.job.get_or_insert_with(|| Box::new(job.clone()));
            w.twins.push(Twin {
                line: job.line,
                custom_id: job.custom_id.clone(),
            });
            return true;
        }
        self.running.insert(job.line, job.key);
        self.waiting.insert(
            job.key,
            Waiting {
                job: None,
                twins: Vec::new(),
            },
        );
        false
    }

    /// The request on `line` came to `outcome`: its key, and what becomes of the twins that
    /// waited for it (`None` when it was not in flight here). A success, or an error that
    /// follows from the request's content, is copied to every twin; after a transient error
    /// ([`crate::formats::line_error::ErrorCode::is_transient`]) the first twin runs instead,
    /// and the rest wait on it.
    pub fn finished(&mut self, line: u64, outcome: &Outcome) -> Option<Finished> {
        let key = self.running.remove(&line)?;
        let transient = outcome.as_ref().is_err_and(|e| e.code.is_transient());
        let waiting = self.waiting.remove(&key);
        let release = match waiting {
            Some(Waiting {
                job: Some(job),
                mut twins,
            }) if transient && !twins.is_empty() => {
                let first = twins.remove(0);
                let run = Box::new(Job {
                    line: first.line,
                    custom_id: first.custom_id,
                    ..(*job).clone()
                });
                self.running.insert(run.line, key);
                self.waiting.insert(
                    key,
                    Waiting {
                        job: (!twins.is_empty()).then_some(job),
                        twins,
                    },
                );
                Release::Run(run)
            }
            Some(w) => Release::Copy(w.twins),
            None => Release::Copy(Vec::new()),
        };
        Some(Finished { key, release })
    }

    /// Twins waiting, over all keys.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiting.values().map(|w| w.twins.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SamplerSpec;
    use crate::formats::line_error::{ErrorCode, LineError};
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
                think: None,
            },
            key: ComputationKey([key; 32]),
            endpoint: crate::formats::result::Endpoint::Chat,
        }
    }

    fn ok(line: u64) -> Outcome {
        Ok(crate::formats::result::Completion {
            line,
            custom_id: format!("c{line}"),
            choices: Vec::new(),
            usage: crate::formats::result::Usage::default(),
            time_to_first_token: 0.0,
            endpoint: crate::formats::result::Endpoint::Chat,
        })
    }

    fn failed(line: u64, code: ErrorCode) -> Outcome {
        Err(LineError::new(
            line,
            Some(&format!("c{line}")),
            code,
            "failed".into(),
        ))
    }

    /// The lines of the twins a release copies to.
    fn copies(f: Option<Finished>) -> Vec<u64> {
        match f.map(|f| f.release) {
            Some(Release::Copy(twins)) => twins.iter().map(|t| t.line).collect(),
            other => panic!("not a copy: {other:?}"),
        }
    }

    /// The job a release runs.
    fn reruns(f: Option<Finished>) -> Job {
        match f.map(|f| f.release) {
            Some(Release::Run(job)) => *job,
            other => panic!("not a rerun: {other:?}"),
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
        let f = t.finished(1, &ok(1)).unwrap();
        assert_eq!(f.key, ComputationKey([7; 32]));
        let Release::Copy(twins) = f.release else {
            panic!("a success is copied")
        };
        let lines: Vec<u64> = twins.iter().map(|t| t.line).collect();
        assert_eq!(lines, [3, 5]);
        assert_eq!(twins[0].custom_id, "c3");
        assert_eq!(copies(t.finished(2, &ok(2))), Vec::<u64>::new());
        // Lines not in flight here (a twin, or a run without dedup) have nothing to release.
        assert!(t.finished(3, &ok(3)).is_none());
        // Once the first finished, the next of that key runs again (the caller copies it from
        // the output instead, when it can).
        assert!(!t.hold(&job(9, 7)));
        assert_eq!(t.waiting(), 0);
    }

    #[test]
    fn after_a_transient_failure_the_twins_are_computed_one_after_another() {
        let mut t = Twins::new(true);
        assert!(!t.hold(&job(1, 7)));
        assert!(t.hold(&job(3, 7)));
        assert!(t.hold(&job(5, 7)));
        assert!(t.hold(&job(6, 7)));
        // The first failed with an engine error: the first twin runs in its place, as itself.
        let run = reruns(t.finished(1, &failed(1, ErrorCode::EngineError)));
        assert_eq!((run.line, run.custom_id.as_str()), (3, "c3"));
        assert_eq!(run.key, ComputationKey([7; 32]));
        assert_eq!(t.waiting(), 2, "5 and 6 wait on 3 now");
        // A new twin waits on the one now in flight.
        assert!(t.hold(&job(8, 7)));
        // It fails too: the next runs.
        let run = reruns(t.finished(3, &failed(3, ErrorCode::EngineError)));
        assert_eq!((run.line, run.custom_id.as_str()), (5, "c5"));
        // It succeeds: the rest copy it.
        assert_eq!(copies(t.finished(5, &ok(5))), [6, 8]);
        assert_eq!(t.waiting(), 0);
        // A transient failure with nobody waiting releases nothing.
        assert!(!t.hold(&job(10, 9)));
        assert_eq!(
            copies(t.finished(10, &failed(10, ErrorCode::EngineError))),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn an_error_of_the_content_is_shared() {
        let mut t = Twins::new(true);
        assert!(!t.hold(&job(1, 7)));
        assert!(t.hold(&job(2, 7)));
        let outcome = failed(1, ErrorCode::ContextLengthExceeded);
        assert_eq!(copies(t.finished(1, &outcome)), [2]);
    }

    #[test]
    fn without_dedup_every_request_runs_and_keeps_its_key() {
        let mut t = Twins::new(false);
        assert!(!t.hold(&job(1, 7)));
        assert!(!t.hold(&job(2, 7)));
        let transient = failed(2, ErrorCode::EngineError);
        let f = t.finished(2, &transient).unwrap();
        assert_eq!(f.key, ComputationKey([7; 32]));
        assert!(matches!(f.release, Release::Copy(t) if t.is_empty()));
        assert_eq!(
            t.finished(1, &ok(1)).map(|f| f.key),
            Some(ComputationKey([7; 32]))
        );
    }
}
