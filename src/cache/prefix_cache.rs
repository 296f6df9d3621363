//! Which shared prefixes sit in the KV cache, in which sequence, and who uses them.
//!
//! A prefix is prefilled once into a sequence of its own. Each slot that serves a request with
//! that prefix gets the prefix's cells by sequence copy: in the unified KV cache that only tags
//! the cells, so the prefix sits in memory once however many slots use it. When more distinct
//! prefixes come than fit, the least recently used one that no slot holds makes room.
//!
//! [`materialize`] fills a prefix's sequence: restored from the on-disk store when it holds a
//! valid state, otherwise prefilled once and saved for the next run.

use std::time::Instant;

use crate::cache::prefix_store::{Lookup, PrefixStore};
use crate::engine::{Engine, EngineError, SeqId, Token};
use crate::prompt::PrefixKey;
use crate::report::metrics::{Metrics, PrefixEvent, PrefixSource};

/// Puts the prefix `tokens` into the empty sequence `seq`: restored from `store` when it holds
/// a valid state, otherwise prefilled chunk by chunk from position 0 and saved to `store`.
/// A file that fails validation is reported in one line and replaced.
///
/// # Errors
/// When prefilling fails; the sequence is then cleared.
pub fn materialize(
    session: &mut impl Engine,
    seq: SeqId,
    tokens: &[Token],
    store: Option<&PrefixStore>,
    metrics: &mut Metrics,
) -> Result<PrefixEvent, EngineError> {
    let key = PrefixKey::of(tokens);
    if let Some(store) = store {
        let started = Instant::now();
        match store.load(tokens) {
            Lookup::Hit {
                payload,
                file_bytes,
            } => match session.restore_seq_state(seq, &payload) {
                Ok(()) => {
                    let event = PrefixEvent {
                        key,
                        tokens: tokens.len(),
                        source: PrefixSource::Restored,
                        file_bytes: Some(file_bytes),
                        time: started.elapsed(),
                    };
                    metrics.record_prefix(&event);
                    return Ok(event);
                }
                Err(e) => tracing::warn!(
                    "prefix state {}: {e}; prefilling again",
                    store.path_of(tokens).display()
                ),
            },
            Lookup::Invalid { path, reason } => tracing::warn!(
                "prefix state {} is invalid ({reason}); prefilling again and replacing it",
                path.display()
            ),
            Lookup::Miss => {}
        }
    }
    let started = Instant::now();
    if let Err(e) = prefill(session, seq, tokens, metrics) {
        // The prefill's failure is the one to report; the caller forgets the sequence.
        session.clear_seq(seq).ok();
        return Err(e);
    }
    let time = started.elapsed();
    let file_bytes = store.and_then(|store| {
        let saved = match session.seq_state(seq) {
            Ok(state) => store.save(tokens, &state).map_err(|e| error_chain(&e)),
            Err(e) => Err(e.to_string()),
        };
        match saved {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                tracing::warn!("{e}; this prefix will be prefilled again next run");
                None
            }
        }
    });
    let event = PrefixEvent {
        key,
        tokens: tokens.len(),
        source: PrefixSource::Prefilled,
        file_bytes,
        time,
    };
    metrics.record_prefix(&event);
    Ok(event)
}

/// An error and its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// Decodes `tokens` into `seq`, cut every batch-size tokens from position 0: the same cuts a
/// request's own prompt gets, so the state is bit-identical to computing it in the request.
fn prefill(
    session: &mut impl Engine,
    seq: SeqId,
    tokens: &[Token],
    metrics: &mut Metrics,
) -> Result<(), EngineError> {
    let n_batch = session.batch_capacity();
    for (c, chunk) in tokens.chunks(n_batch).enumerate() {
        for (i, &t) in chunk.iter().enumerate() {
            let pos = u32::try_from(c * n_batch + i).unwrap_or(u32::MAX);
            session.push(t, pos, seq, false)?;
        }
        let t0 = Instant::now();
        session.decode()?;
        metrics.prefill_time += t0.elapsed();
        metrics.prompt_tokens_computed += chunk.len() as u64;
    }
    Ok(())
}

/// What a slot must do to get its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// The prefix is already in sequence `seq`: copy it.
    Resident(SeqId),
    /// Sequence `seq` was assigned to the prefix but holds nothing yet: clear it, prefill the
    /// prefix into it, then copy it. `evicted` is the prefix it held before, if any.
    Prefill {
        /// Sequence to prefill into.
        seq: SeqId,
        /// The prefix that sequence held before.
        evicted: Option<PrefixKey>,
    },
}

#[derive(Debug)]
struct Resident {
    key: PrefixKey,
    seq: SeqId,
    len: usize,
    users: usize,
    last_used: u64,
}

/// The resident prefixes, at most one per reserved sequence.
#[derive(Debug)]
pub struct PrefixPool {
    free: Vec<SeqId>,
    resident: Vec<Resident>,
    clock: u64,
}

impl PrefixPool {
    /// A pool that may use the sequences `first .. first + capacity`.
    pub fn new(first: SeqId, capacity: usize) -> Self {
        let capacity = SeqId::try_from(capacity).unwrap_or(SeqId::MAX - first);
        Self {
            free: (first..first + capacity).rev().collect(),
            resident: Vec::new(),
            clock: 0,
        }
    }

    /// Takes a use of the prefix `key` of `len` tokens. `None` when every sequence holds a
    /// prefix still in use: the caller waits for a slot to finish.
    pub fn acquire(&mut self, key: PrefixKey, len: usize) -> Option<Lease> {
        self.clock += 1;
        if let Some(r) = self.resident.iter_mut().find(|r| r.key == key) {
            r.users += 1;
            r.last_used = self.clock;
            return Some(Lease::Resident(r.seq));
        }
        let (seq, evicted) = match self.free.pop() {
            Some(seq) => (seq, None),
            None => {
                let lru = self
                    .resident
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.users == 0)
                    .min_by_key(|(_, r)| r.last_used)
                    .map(|(i, _)| i)?;
                let old = self.resident.swap_remove(lru);
                (old.seq, Some(old.key))
            }
        };
        self.resident.push(Resident {
            key,
            seq,
            len,
            users: 1,
            last_used: self.clock,
        });
        Some(Lease::Prefill { seq, evicted })
    }

    /// Gives back a use taken by [`Self::acquire`].
    pub fn release(&mut self, key: &PrefixKey) {
        if let Some(r) = self.resident.iter_mut().find(|r| &r.key == key) {
            r.users = r.users.saturating_sub(1);
        }
    }

    /// Forgets a prefix whose prefill failed, so its sequence is free again.
    pub fn forget(&mut self, key: &PrefixKey) {
        if let Some(i) = self.resident.iter().position(|r| &r.key == key) {
            let r = self.resident.swap_remove(i);
            self.free.push(r.seq);
        }
    }

    /// KV cells the resident prefixes occupy.
    pub fn resident_tokens(&self) -> usize {
        self.resident.iter().map(|r| r.len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Token;

    fn key(n: i32) -> PrefixKey {
        PrefixKey::of(&[Token(n)])
    }

    #[test]
    fn first_use_prefills_then_shares() {
        let mut pool = PrefixPool::new(4, 2);
        assert_eq!(
            pool.acquire(key(1), 10),
            Some(Lease::Prefill {
                seq: 4,
                evicted: None
            })
        );
        assert_eq!(pool.acquire(key(1), 10), Some(Lease::Resident(4)));
        assert_eq!(pool.resident_tokens(), 10);
    }

    #[test]
    fn evicts_least_recently_used_idle_prefix() {
        let mut pool = PrefixPool::new(0, 2);
        pool.acquire(key(1), 5);
        pool.acquire(key(2), 5);
        pool.release(&key(1));
        pool.release(&key(2));
        pool.acquire(key(1), 5); // 1 is now the most recent
        pool.release(&key(1));
        assert_eq!(
            pool.acquire(key(3), 7),
            Some(Lease::Prefill {
                seq: 1,
                evicted: Some(key(2))
            })
        );
        assert_eq!(pool.resident_tokens(), 12);
    }

    #[test]
    fn never_evicts_a_prefix_in_use() {
        let mut pool = PrefixPool::new(0, 1);
        pool.acquire(key(1), 5);
        assert_eq!(pool.acquire(key(2), 5), None);
        pool.release(&key(1));
        assert!(matches!(
            pool.acquire(key(2), 5),
            Some(Lease::Prefill { seq: 0, .. })
        ));
    }

    #[test]
    fn forget_frees_the_sequence() {
        let mut pool = PrefixPool::new(0, 1);
        pool.acquire(key(1), 5);
        pool.forget(&key(1));
        assert_eq!(pool.resident_tokens(), 0);
        assert!(matches!(
            pool.acquire(key(2), 5),
            Some(Lease::Prefill {
                seq: 0,
                evicted: None
            })
        ));
    }
}
