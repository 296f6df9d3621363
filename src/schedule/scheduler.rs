//! The continuous-batching loop: slots, their states, and one decode call per step.
//!
//! Each step queues the next token of every generating slot, fills the rest of the batch with
//! prompt chunks, decodes once, and samples for the slots whose last token asked for logits. A
//! finished slot drops its cells (the shared prefix stays, held by its own sequence) and admits
//! the next request. A slot only ever sees its own sequence's cells, so requests never see each
//! other.
//!
//! Prompt chunks start at fixed boundaries: a prompt is split into its prefix part and its own
//! part, and each part is cut every `n_batch` tokens from its start. The prefix alone is
//! prefilled with exactly the same cuts, so with `--no-prefix-cache` a request computes the same
//! chunks that the shared path computes once.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use crate::cache::prefix_cache::{materialize, Lease, PrefixPool};
use crate::cache::prefix_store::PrefixStore;
use crate::engine::{Engine, EngineError, RowDependence, SeqId, Token};
use crate::formats::line_error::{ErrorCode, LineError};
use crate::formats::result::Completion;
use crate::prompt::PrefixKey;
use crate::report::metrics::Metrics;
use crate::schedule::job::Job;
use crate::schedule::sequence::{Gather, Sequence};

/// What one request came to.
pub type Outcome = Result<Completion, LineError>;

/// A slot's state, as in llama.cpp's server.
enum SlotState<S> {
    Idle,
    /// Held for a later choice of the request on `line`, until its prompt is computed.
    Reserved {
        line: u64,
    },
    /// Computing the prompt; `Sequence::pos` tells how far. `forks` are the slots reserved for
    /// the request's other choices.
    Prompt {
        seq: Sequence<S>,
        forks: Vec<usize>,
    },
    /// Sampling; `last` is the token to feed next.
    Generating {
        seq: Sequence<S>,
        last: Token,
    },
}

struct Slot<S> {
    seq: SeqId,
    state: SlotState<S>,
}

/// Most generated tokens decoded together in exact mode: below llama.cpp's 64-row tile size
/// for attention, so every group takes the same attention kernel.
pub const EXACT_MAX_ROWS: usize = 32;

/// Exact-mode settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exact {
    /// The sequence right after the last slot, with a KV stream of its own: it completes a
    /// block when there is a single slot.
    pub pad_seq: SeqId,
    /// Decode generated tokens in fixed-shape calls: blocks of at most this many consecutive
    /// slots, each decoded in full with a dummy row for each slot that is not generating, a
    /// lone slot padded with a dummy row. Every call then holds 2 to this many rows, whatever
    /// `--parallel` and whichever slots generate. Needed where a row's logits depend on how many
    /// rows share its call; the start-up probe found every group of 2 to this many rows alike.
    /// `None`: any group, where the probe found rows independent of their batch-mates.
    pub fixed_block: Option<usize>,
}

impl Exact {
    /// Exact mode for `parallel` slots, with its decode groups as the engine's start-up probe
    /// finds its kernels: any shape where rows do not depend on their batch-mates, else
    /// fixed-shape blocks as wide as the probe found alike. `force_fixed` takes the
    /// fixed-shape path even where the probe finds it unneeded (a test hook).
    ///
    /// # Errors
    /// When the probe's decode fails.
    pub fn probe(
        engine: &mut impl Engine,
        parallel: usize,
        force_fixed: bool,
    ) -> Result<Self, EngineError> {
        // The pad stream follows the slots, so slots and pad are consecutive sequences.
        let pad_seq = SeqId::try_from(parallel).unwrap_or(SeqId::MAX);
        let probe: Vec<SeqId> = (0..=pad_seq).collect();
        let fixed_block = match engine.decode_group_probe(&probe)? {
            RowDependence::SameFrom2UpTo(rows) => Some(rows),
            RowDependence::None if force_fixed => Some(EXACT_MAX_ROWS),
            RowDependence::None => None,
        };
        Ok(Self {
            pad_seq,
            fixed_block,
        })
    }

    /// How exactness is kept, as the summary says it (`None`: not deterministic).
    pub fn describe(exact: Option<Self>) -> String {
        match exact.map(|e| e.fixed_block) {
            None => "mixed (not deterministic)".to_owned(),
            Some(None) => "any shape".to_owned(),
            Some(Some(rows)) => format!("fixed-shape, 2 to {rows} rows a call"),
        }
    }

    /// The decision as the computation identity names it: the kind of groups, not their
    /// largest size, which the probe caps at `--parallel` + 1 (a resume at another
    /// `--parallel` decodes in groups of the same class, so its bits agree).
    pub fn identity(exact: Option<Self>) -> String {
        match exact.map(|e| e.fixed_block) {
            None => "mixed (not deterministic)".to_owned(),
            Some(None) => "any shape".to_owned(),
            Some(Some(_)) => "fixed-shape, 2 rows or more a call".to_owned(),
        }
    }
}

/// What one decode call holds.
#[derive(Default)]
struct Batch {
    slots: Vec<usize>,
    prompt: usize,
    generated: usize,
    failure: Option<EngineError>,
}

/// Choices of a started request still to run, from `first` on, once slots free up.
struct Wave {
    job: Rc<Job>,
    first: u32,
}

/// Whether admission took the job.
pub enum Admission {
    /// A slot runs it.
    Started,
    /// No slot (or no prefix sequence) is free: offer it again after a step.
    Wait(Box<Job>),
}

/// Slots over one session.
pub struct Scheduler<'s, E: Engine> {
    session: &'s mut E,
    slots: Vec<Slot<E::Sampler>>,
    prefixes: PrefixPool,
    store: Option<&'s PrefixStore>,
    share: bool,
    exact: Option<Exact>,
    next_prompt_slot: usize,
    n_batch: usize,
    gather: Gather,
    waves: VecDeque<Wave>,
    /// Counters of the run.
    pub metrics: Metrics,
}

impl<'s, E: Engine> Scheduler<'s, E> {
    /// `parallel` slots use sequences `0..parallel`; resident prefixes the next
    /// `resident_prefixes`. With `share` false every request computes its whole prompt. With a
    /// `store`, prefixes are restored from disk when they can be and saved when computed. With
    /// `exact`, batches are shaped so a request's output never depends on its batch-mates (the
    /// session must then give each sequence its own KV stream).
    pub fn new(
        session: &'s mut E,
        parallel: usize,
        resident_prefixes: usize,
        share: bool,
        store: Option<&'s PrefixStore>,
        exact: Option<Exact>,
    ) -> Self {
        let n_batch = session.batch_capacity();
        let parallel_seq = SeqId::try_from(parallel).unwrap_or(SeqId::MAX);
        Self {
            session,
            slots: (0..parallel_seq)
                .map(|seq| Slot {
                    seq,
                    state: SlotState::Idle,
                })
                .collect(),
            // In exact mode the pad sequence follows the slots; the prefixes come after it.
            prefixes: PrefixPool::new(
                parallel_seq + SeqId::from(exact.is_some()),
                resident_prefixes,
            ),
            store,
            share,
            exact,
            next_prompt_slot: 0,
            n_batch,
            gather: Gather::default(),
            waves: VecDeque::new(),
            metrics: Metrics::default(),
        }
    }

    /// Whether a slot is free for [`Self::admit`] (and no request's later wave waits for it).
    pub fn has_idle_slot(&self) -> bool {
        self.waves.is_empty()
            && self
                .slots
                .iter()
                .any(|s| matches!(s.state, SlotState::Idle))
    }

    /// Whether no request is in flight.
    pub fn is_idle(&self) -> bool {
        self.waves.is_empty()
            && self
                .slots
                .iter()
                .all(|s| matches!(s.state, SlotState::Idle))
    }

    /// Puts a job into free slots (one per choice), prefilling its shared prefix first if it
    /// is not resident. A job with more choices than the run has slots runs them in waves of
    /// at most that many, each wave computing the prompt again: a choice's tokens depend only
    /// on its prompt and its own seed, so they are the same as at a wider `--parallel`.
    ///
    /// # Errors
    /// A [`LineError`] for this job alone when its prefix cannot be prefilled.
    pub fn admit(&mut self, job: Job) -> Result<Admission, LineError> {
        if !self.waves.is_empty() {
            // A started request's later waves go first.
            return Ok(Admission::Wait(Box::new(job)));
        }
        let job = Rc::new(job);
        match self.start_wave(&job, 0)? {
            true => Ok(Admission::Started),
            false => Ok(Admission::Wait(Box::new(
                Rc::try_unwrap(job).expect("a job that did not start is not shared"),
            ))),
        }
    }

    /// Starts the choices of `job` from `first` on, as many as the slots allow at once, when
    /// that many slots (and its prefix's sequence) are free; false when they are not. Queues
    /// the choices after them as the next wave.
    fn start_wave(&mut self, job: &Rc<Job>, first: u32) -> Result<bool, LineError> {
        let size = (job.params.n - first).min(u32::try_from(self.slots.len()).unwrap_or(u32::MAX));
        let idle: Vec<usize> = (0..self.slots.len())
            .filter(|&i| matches!(self.slots[i].state, SlotState::Idle))
            .take(size as usize)
            .collect();
        if idle.len() < size as usize {
            return Ok(false);
        }
        let (index, forks) = (idle[0], idle[1..].to_vec());
        let sampler = self
            .session
            .sampler(
                &job.params.sampler.for_choice(first),
                job.params.constraint.as_ref(),
            )
            .map_err(|e| engine_failure(job, &e))?;
        let shared = self.share.then(|| job.prompt.prefix_key()).flatten();
        let pos = match shared {
            Some(key) => match self.lease_prefix(job, key, self.slots[index].seq)? {
                Some(pos) => pos,
                None => return Ok(false),
            },
            None => 0,
        };
        for &f in &forks {
            self.slots[f].state = SlotState::Reserved { line: job.line };
        }
        if first == 0 {
            self.gather.start(job, pos as u64);
        }
        if first + size < job.params.n {
            self.waves.push_back(Wave {
                job: Rc::clone(job),
                first: first + size,
            });
        }
        self.slots[index].state = SlotState::Prompt {
            seq: Sequence::new(Rc::clone(job), first, sampler, shared, pos),
            forks,
        };
        Ok(true)
    }

    /// Gives sequence `seq` the cells of `job`'s shared prefix `key`, prefilling it first when
    /// it is not resident. Returns the prefix's length, or `None` when every prefix sequence
    /// holds a prefix still in use.
    fn lease_prefix(
        &mut self,
        job: &Job,
        key: PrefixKey,
        seq: SeqId,
    ) -> Result<Option<usize>, LineError> {
        let len = job.prompt.shared_len;
        let prefix_seq = match self.prefixes.acquire(key, len) {
            None => return Ok(None),
            Some(Lease::Resident(prefix_seq)) => prefix_seq,
            Some(Lease::Prefill {
                seq: prefix_seq, ..
            }) => {
                let made = self.session.clear_seq(prefix_seq).and_then(|()| {
                    materialize(
                        self.session,
                        prefix_seq,
                        job.prompt.prefix(),
                        self.store,
                        &mut self.metrics,
                    )
                });
                if let Err(e) = made {
                    self.prefixes.forget(&key);
                    return Err(engine_failure(job, &e));
                }
                prefix_seq
            }
        };
        if let Err(e) = self.session.share_prefix(prefix_seq, seq) {
            self.prefixes.release(&key);
            self.session.clear_seq(seq).ok();
            return Err(engine_failure(job, &e));
        }
        Ok(Some(len))
    }

    /// Starts the queued waves that now find their slots, in order.
    fn start_waves(&mut self, done: &mut Vec<Outcome>) {
        while let Some(wave) = self.waves.front() {
            let (job, first) = (Rc::clone(&wave.job), wave.first);
            match self.start_wave(&job, first) {
                Ok(false) => break,
                Ok(true) => {
                    self.waves.pop_front();
                }
                Err(e) => {
                    self.waves.pop_front();
                    self.fail_line(job.line, e, done);
                }
            }
        }
    }

    /// Runs one step over all busy slots; finished requests are appended to `done`. A failed
    /// decode becomes an error outcome for the requests in that batch.
    pub fn step(&mut self, done: &mut Vec<Outcome>) {
        self.start_waves(done);
        if self.exact.is_some() {
            self.step_exact(done);
        } else {
            self.step_mixed(done);
        }
    }

    /// Throughput mode: one decode call holds every generating slot's next token and as many
    /// prompt tokens as fit, from any slots.
    fn step_mixed(&mut self, done: &mut Vec<Outcome>) {
        let mut batch = Batch::default();
        // Generating slots first, so their latency does not wait on long prompts.
        for i in 0..self.slots.len() {
            self.queue_generated(i, &mut batch);
        }
        for i in 0..self.slots.len() {
            let room = self.n_batch - self.session.batch_len();
            if room == 0 || batch.failure.is_some() {
                break;
            }
            self.queue_prompt_chunk(i, room, &mut batch);
        }
        self.run_batch(batch, done);
    }

    /// Exact mode: a request's numbers never depend on its batch-mates. Prompt chunks are
    /// decoded alone, so their shape is the request's own. Generated tokens are decoded
    /// together, at most [`EXACT_MAX_ROWS`] to a call: as they come where the probe found rows
    /// independent of their batch-mates, else in fixed-shape blocks.
    fn step_exact(&mut self, done: &mut Vec<Outcome>) {
        let Some(exact) = self.exact else { return };
        let generating = |s: &Slot<E::Sampler>| matches!(s.state, SlotState::Generating { .. });
        let groups: Vec<Vec<usize>> = if let Some(block) = exact.fixed_block {
            let all: Vec<usize> = (0..self.slots.len()).collect();
            all.chunks(block.clamp(1, EXACT_MAX_ROWS))
                .filter(|block| block.iter().any(|&i| generating(&self.slots[i])))
                .map(<[usize]>::to_vec)
                .collect()
        } else {
            let busy: Vec<usize> = (0..self.slots.len())
                .filter(|&i| generating(&self.slots[i]))
                .collect();
            busy.chunks(EXACT_MAX_ROWS).map(<[usize]>::to_vec).collect()
        };
        for group in groups {
            let mut batch = Batch::default();
            // Rows that only give the call its shape: (sequence, position), dropped after.
            // Rows go in sequence order: llama.cpp keeps consecutive sequences in one call
            // only when they come in that order. A dummy asks for logits like a real row: the
            // output layer multiplies only the rows that do, so its shape is part of the call's.
            let mut dummies: Vec<(SeqId, u32)> = Vec::new();
            let mut dummy = |session: &mut E, batch: &mut Batch, seq, pos| {
                if let Err(e) = session.push(Token(0), pos, seq, true) {
                    batch.failure = Some(e);
                }
                dummies.push((seq, pos));
            };
            for &i in &group {
                if generating(&self.slots[i]) {
                    self.queue_generated(i, &mut batch);
                } else {
                    let pos = match &self.slots[i].state {
                        SlotState::Prompt { seq, .. } => to_u32(seq.pos),
                        _ => 0,
                    };
                    dummy(self.session, &mut batch, self.slots[i].seq, pos);
                }
            }
            if exact.fixed_block.is_some() && group.len() == 1 {
                dummy(self.session, &mut batch, exact.pad_seq, 0);
            }
            self.run_batch(batch, done);
            for (seq, pos) in dummies {
                if let Err(e) = self.session.truncate_seq(seq, pos) {
                    // A dummy left in a slot's cells would change what it computes next.
                    self.fail_seq(seq, &e, done);
                }
            }
        }
        let n = self.slots.len();
        let start = self.next_prompt_slot;
        if let Some(i) = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| matches!(self.slots[i].state, SlotState::Prompt { .. }))
        {
            self.next_prompt_slot = (i + 1) % n;
            let mut batch = Batch::default();
            self.queue_prompt_chunk(i, self.n_batch, &mut batch);
            self.run_batch(batch, done);
        }
    }

    /// Queues slot `i`'s last sampled token, if it is generating.
    fn queue_generated(&mut self, i: usize, batch: &mut Batch) {
        let slot = &mut self.slots[i];
        let SlotState::Generating { seq: active, last } = &mut slot.state else {
            return;
        };
        match self.session.push(*last, to_u32(active.pos), slot.seq, true) {
            Ok(row) => {
                active.row = Some(row);
                active.pos += 1;
                batch.generated += 1;
                batch.slots.push(i);
            }
            Err(e) => batch.failure = Some(e),
        }
    }

    /// Queues up to `room` tokens of slot `i`'s prompt, up to its next chunk cut.
    fn queue_prompt_chunk(&mut self, i: usize, room: usize, batch: &mut Batch) {
        let n_batch = self.n_batch;
        let slot = &mut self.slots[i];
        let SlotState::Prompt { seq: active, .. } = &mut slot.state else {
            return;
        };
        let tokens = &active.job.prompt.tokens;
        let end = chunk_end(
            active.pos,
            active.job.prompt.shared_len,
            tokens.len(),
            n_batch,
        )
        .min(active.pos + room);
        for p in active.pos..end {
            let last = p + 1 == tokens.len();
            match self.session.push(tokens[p], to_u32(p), slot.seq, last) {
                Ok(row) if last => active.row = Some(row),
                Ok(_) => {}
                Err(e) => {
                    batch.failure = Some(e);
                    break;
                }
            }
        }
        batch.prompt += end - active.pos;
        active.pos = end;
        batch.slots.push(i);
    }

    /// Decodes the queued batch, accounts its time, and moves its slots on.
    fn run_batch(&mut self, batch: Batch, done: &mut Vec<Outcome>) {
        if batch.slots.is_empty() {
            self.session.discard_batch();
            return;
        }
        let t0 = Instant::now();
        let result = match batch.failure {
            Some(e) => {
                self.session.discard_batch();
                Err(e)
            }
            None => self.session.decode(),
        };
        let elapsed = t0.elapsed();
        if let Err(e) = result {
            for i in batch.slots {
                self.fail(i, &e, done);
            }
            return;
        }
        if batch.prompt > 0 {
            self.metrics.prefill_time += elapsed;
            self.metrics.prompt_tokens_computed += batch.prompt as u64;
        } else {
            self.metrics.decode_time += elapsed;
            self.metrics.decode_tokens += batch.generated as u64;
        }
        for i in batch.slots {
            self.after_decode(i, done);
        }
    }

    /// Samples for slot `i` if its last queued token asked for logits, and moves it on. When
    /// that token ends the prompt of a request with several choices, the prompt's cells are
    /// first copied to the slots reserved for the other choices, which sample from the same
    /// row.
    fn after_decode(&mut self, i: usize, done: &mut Vec<Outcome>) {
        let state = std::mem::replace(&mut self.slots[i].state, SlotState::Idle);
        let (mut seq, forks) = match state {
            SlotState::Prompt { seq, forks } => (seq, forks),
            SlotState::Generating { seq, .. } => (seq, Vec::new()),
            other => {
                self.slots[i].state = other;
                return;
            }
        };
        let Some(row) = seq.row.take() else {
            self.slots[i].state = SlotState::Prompt { seq, forks };
            return;
        };
        for (k, &f) in forks.iter().enumerate() {
            let choice = seq.choice + u32::try_from(k + 1).unwrap_or(u32::MAX);
            let params = &seq.job.params;
            match self.session.sampler(
                &params.sampler.for_choice(choice),
                params.constraint.as_ref(),
            ) {
                Ok(sampler) => {
                    let shared = self
                        .session
                        .share_prefix(self.slots[i].seq, self.slots[f].seq);
                    if let Err(e) = shared {
                        self.slots[i].state = SlotState::Prompt { seq, forks };
                        self.fail(i, &e, done);
                        return;
                    }
                    let mut fork =
                        Sequence::new(Rc::clone(&seq.job), choice, sampler, None, seq.pos);
                    fork.row = Some(row);
                    self.slots[f].state = SlotState::Prompt {
                        seq: fork,
                        forks: Vec::new(),
                    };
                }
                Err(e) => {
                    self.slots[i].state = SlotState::Prompt { seq, forks };
                    self.fail(i, &e, done);
                    return;
                }
            }
        }
        self.sample(i, seq, row, done);
        for f in forks {
            self.after_decode(f, done);
        }
    }

    /// Draws slot `i`'s next token from `row`, and ends its choice when it stops.
    fn sample(
        &mut self,
        i: usize,
        mut seq: Sequence<E::Sampler>,
        row: i32,
        done: &mut Vec<Outcome>,
    ) {
        let model = self.session.vocab();
        let token = self.session.sample(&mut seq.sampler, row);
        self.metrics.completion_tokens += 1;
        self.gather.sampled(seq.job.line);
        let lp = seq
            .job
            .params
            .logprobs
            .map(|k| self.session.logprobs(row, token, usize::from(k)));
        let Some(reason) = seq.take(model, token, lp) else {
            self.slots[i].state = SlotState::Generating { seq, last: token };
            return;
        };
        self.release(i, seq.prefix.as_ref());
        if let Some(c) = self.gather.finished(seq, reason) {
            self.metrics.prompt_tokens_reused += c.usage.cached_tokens;
            self.metrics
                .time_to_first_token
                .record(c.time_to_first_token);
            done.push(Ok(c));
        }
    }

    /// Ends slot `i`'s request with an engine error: every slot of the request goes idle, its
    /// later waves are dropped, and the error is reported once.
    fn fail(&mut self, i: usize, e: &EngineError, done: &mut Vec<Outcome>) {
        let line = match &self.slots[i].state {
            SlotState::Prompt { seq, .. } | SlotState::Generating { seq, .. } => seq.job.line,
            SlotState::Reserved { line } => *line,
            SlotState::Idle => return,
        };
        if let Some(job) = self.drop_line(line) {
            self.fail_line(line, engine_failure(&job, e), done);
        }
    }

    /// Ends the request on `line` with `error`, reported once.
    fn fail_line(&mut self, line: u64, error: LineError, done: &mut Vec<Outcome>) {
        self.drop_line(line);
        if self.gather.abandon(line) {
            done.push(Err(error));
        }
    }

    /// Frees every slot of the request on `line` and drops its waves; returns its job.
    fn drop_line(&mut self, line: u64) -> Option<Rc<Job>> {
        let mut job = None;
        for j in 0..self.slots.len() {
            let state = std::mem::replace(&mut self.slots[j].state, SlotState::Idle);
            match state {
                SlotState::Prompt { seq, .. } | SlotState::Generating { seq, .. }
                    if seq.job.line == line =>
                {
                    self.release(j, seq.prefix.as_ref());
                    job = Some(Rc::clone(&seq.job));
                }
                SlotState::Reserved { line: l } if l == line => self.release(j, None),
                other => self.slots[j].state = other,
            }
        }
        let waiting = self
            .waves
            .iter()
            .find(|w| w.job.line == line)
            .map(|w| Rc::clone(&w.job));
        self.waves.retain(|w| w.job.line != line);
        job.or(waiting)
    }

    /// Ends with an engine error the request whose slot uses sequence `seq`, if any.
    fn fail_seq(&mut self, seq: SeqId, e: &EngineError, done: &mut Vec<Outcome>) {
        if let Some(i) = self.slots.iter().position(|s| s.seq == seq) {
            self.fail(i, e, done);
        }
    }

    /// Frees slot `i`'s cells and its prefix lease.
    fn release(&mut self, i: usize, prefix: Option<&PrefixKey>) {
        if let Err(e) = self.session.clear_seq(self.slots[i].seq) {
            // The next request in this slot would see these cells: say so loudly.
            tracing::error!("slot {i}: {e}");
        }
        if let Some(key) = prefix {
            self.prefixes.release(key);
        }
    }
}

/// Where the prompt chunk that starts at `pos` ends: chunks are cut every `n_batch` tokens from
/// the start of the prefix part `[0, split)` and from the start of the own part `[split, len)`.
pub fn chunk_end(pos: usize, split: usize, len: usize, n_batch: usize) -> usize {
    let (start, end) = if pos < split {
        (0, split)
    } else {
        (split, len)
    };
    let next_cut = start + ((pos - start) / n_batch + 1) * n_batch;
    next_cut.min(end)
}

fn engine_failure(job: &Job, e: &EngineError) -> LineError {
    LineError::new(
        job.line,
        Some(&job.custom_id),
        ErrorCode::EngineError,
        format!("{e}; the request was not completed, run it again"),
    )
}

/// Positions and lengths stay below the context size, which llama.cpp holds in an i32.
fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::chunk_end;

    #[test]
    fn chunks_are_cut_from_each_part_start() {
        // Prefix [0, 10), own part [10, 25), batch 4.
        assert_eq!(chunk_end(0, 10, 25, 4), 4);
        assert_eq!(chunk_end(4, 10, 25, 4), 8);
        assert_eq!(chunk_end(8, 10, 25, 4), 10);
        assert_eq!(chunk_end(10, 10, 25, 4), 14);
        assert_eq!(chunk_end(22, 10, 25, 4), 25);
    }

    #[test]
    fn a_resumed_chunk_ends_at_the_same_cut() {
        // A chunk that began at 10 and was stopped short at 12 still ends at 14.
        assert_eq!(chunk_end(12, 10, 25, 4), 14);
    }

    #[test]
    fn without_a_prefix_the_prompt_is_one_part() {
        assert_eq!(chunk_end(0, 0, 3, 512), 3);
    }
}
