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
use std::time::{Duration, Instant};

use crate::cache::prefix_cache::{materialize, Lease, PrefixPool};
use crate::cache::prefix_store::PrefixStore;
use crate::engine::probe::{self, Findings};
use crate::engine::{Engine, EngineError, Model, SeqId, SessionSettings, Token};
use crate::formats::line_error::{ErrorCode, LineError};
use crate::formats::result::Completion;
use crate::formats::summary::DecodeGroupsRecord;
use crate::prompt::PrefixKey;
use crate::report::metrics::Metrics;
use crate::schedule::groups::{calls, DecodeGroups};
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

/// Most generated tokens decoded together in exact mode on the CPU: below llama.cpp's 64-row
/// tile size for attention, so every group takes the same attention kernel.
pub const EXACT_MAX_ROWS: usize = 32;

/// The same with layers offloaded to a GPU, where a wider call costs little more than a
/// narrower one.
pub const EXACT_MAX_ROWS_GPU: usize = 64;

/// Exact-mode settings: how generated tokens are grouped into decode calls, as the start-up
/// probe found the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exact {
    /// Which group sizes calls take.
    pub groups: DecodeGroups,
    /// The largest group a call holds: the largest the probe tried.
    pub max_rows: usize,
    /// What the probe found; `None` for settings made by hand.
    pub findings: Option<Findings>,
    /// How long the probe took, its session included; `None` where it did not run here.
    pub probe_time: Option<Duration>,
}

impl Exact {
    /// The largest group a run makes, and so the largest the probe tries: the per-call cap
    /// ([`EXACT_MAX_ROWS`], or [`EXACT_MAX_ROWS_GPU`] with layers offloaded to a GPU) within a
    /// batch of `n_batch` tokens. Never `--parallel`, so runs at any `--parallel` decide alike.
    pub fn max_rows(gpu: bool, n_batch: u32) -> usize {
        let cap = if gpu {
            EXACT_MAX_ROWS_GPU
        } else {
            EXACT_MAX_ROWS
        };
        cap.min(usize::try_from(n_batch).unwrap_or(cap)).max(1)
    }

    /// KV cells of the probe's session: a stream of [`probe::STREAM_CELLS`] cells for each of
    /// its [`Self::max_rows`] + 1 sequences.
    pub fn probe_cells(gpu: bool, n_batch: u32) -> u32 {
        Self::probe_seqs(gpu, n_batch).saturating_mul(probe::STREAM_CELLS)
    }

    fn probe_seqs(gpu: bool, n_batch: u32) -> u32 {
        u32::try_from(Self::max_rows(gpu, n_batch) + 1).unwrap_or(u32::MAX)
    }

    /// The probe session's settings: the run's batch, threads, attention and KV types, with
    /// [`Self::probe_cells`] cells in one stream per sequence.
    pub fn probe_settings(run: &SessionSettings, gpu: bool) -> SessionSettings {
        let n_seq_max = Self::probe_seqs(gpu, run.n_batch);
        SessionSettings {
            n_ctx: Self::probe_cells(gpu, run.n_batch),
            n_seq_max,
            // llama.cpp reserves an output row per sequence within the batch, and aborts where
            // the sequences outnumber it. The probe's calls hold at most the run's batch, so a
            // larger reservation changes no call's shape.
            n_batch: run.n_batch.max(n_seq_max),
            kv_unified: false,
            ..run.clone()
        }
    }

    /// Exact mode for a run of `model` with `settings` (`gpu`: with layers offloaded): the
    /// probe runs in a session of its own ([`Self::probe_settings`]), dropped before the run
    /// makes its own, so memory peaks at the larger of the two. `force_fixed` takes the
    /// fixed-shape path even where the probe finds it unneeded (a test hook).
    ///
    /// # Errors
    /// When the probe's session cannot be made or a decode fails.
    pub fn probe_with(
        model: &Model,
        settings: &SessionSettings,
        gpu: bool,
        force_fixed: bool,
    ) -> Result<Self, EngineError> {
        let started = Instant::now();
        let mut session = model.new_session(&Self::probe_settings(settings, gpu))?;
        let max_rows = Self::max_rows(gpu, settings.n_batch);
        let exact = Self::probe(
            &mut session,
            max_rows,
            model.info().n_vocab,
            gpu,
            force_fixed,
        )?;
        drop(session);
        Ok(Self {
            probe_time: Some(started.elapsed()),
            ..exact
        })
    }

    /// Exact mode as the probe finds `engine`'s kernels, trying every group size from 1 to
    /// `max_rows` in its sequences `0..=max_rows` (left empty), with context tokens below
    /// `n_vocab`; see [`DecodeGroups::decide`] for the choice.
    ///
    /// # Errors
    /// When a decode fails.
    pub fn probe(
        engine: &mut impl Engine,
        max_rows: usize,
        n_vocab: u32,
        gpu: bool,
        force_fixed: bool,
    ) -> Result<Self, EngineError> {
        let findings = probe::probe(engine, max_rows, n_vocab)?;
        Ok(Self::from_findings(findings, gpu, force_fixed))
    }

    /// The decision for `findings`; `force_fixed` turns any shape into fixed-shape calls of 2
    /// rows or more.
    pub fn from_findings(findings: Findings, gpu: bool, force_fixed: bool) -> Self {
        let max_rows = findings.tried();
        let groups = match DecodeGroups::decide(&findings, gpu) {
            DecodeGroups::Any if force_fixed => DecodeGroups::Fixed {
                lo: 2,
                hi: max_rows.max(2),
            },
            groups => groups,
        };
        Self {
            groups,
            max_rows,
            findings: Some(findings),
            probe_time: None,
        }
    }

    /// Sequences after the `parallel` slots that take only dummy rows: enough that a call can
    /// be padded to its fewest rows, and at least the plan's one.
    pub fn pad_streams(&self, parallel: usize) -> usize {
        let (lo, _) = self.groups.bounds(self.max_rows);
        lo.saturating_sub(parallel).max(1)
    }

    /// The run's session settings: the plan's, with the pad streams beyond the plan's one
    /// added at the plan's stream size (only where the slots are fewer than a call's fewest
    /// rows: a GPU class padded to its smallest size).
    pub fn session_settings(&self, planned: &SessionSettings, parallel: usize) -> SessionSettings {
        let extra = u32::try_from(self.pad_streams(parallel) - 1).unwrap_or(0);
        let stream = planned.n_ctx / planned.n_seq_max.max(1);
        if extra > 0 {
            tracing::info!(
                "{extra} more pad streams of {stream} cells than planned: calls hold at least \
                 {} rows and --parallel is {parallel}",
                self.groups.bounds(self.max_rows).0
            );
        }
        SessionSettings {
            n_ctx: planned.n_ctx + extra * stream,
            n_seq_max: planned.n_seq_max + extra,
            ..planned.clone()
        }
    }

    /// How exactness is kept, as the summary and the run's identity say it (`None`: not
    /// deterministic): complete and stable, the bounds of the calls included.
    pub fn describe(exact: Option<Self>) -> String {
        let Some(exact) = exact else {
            return "mixed (not deterministic)".to_owned();
        };
        match exact.groups {
            DecodeGroups::Any => format!("any shape, 1 to {} rows a call", exact.max_rows),
            DecodeGroups::Fixed { lo, hi } => format!("fixed-shape, {lo} to {hi} rows a call"),
            DecodeGroups::Alone => "one row a call".to_owned(),
        }
    }

    /// The summary's record: the decision, the sizes the probe tried and the classes it found.
    pub fn record(exact: Option<Self>) -> DecodeGroupsRecord {
        let findings = exact.and_then(|e| e.findings);
        DecodeGroupsRecord {
            decision: Self::describe(exact),
            sizes_tried: findings.map(|f| [1, f.tried()]),
            probe_seconds: exact.and_then(|e| e.probe_time).map(|t| t.as_secs_f64()),
            classes: findings
                .map(|f| f.classes().iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            remembered_from: None,
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
            // In exact mode the pad streams follow the slots; the prefixes come after them.
            prefixes: PrefixPool::new(
                parallel_seq
                    + exact.map_or(0, |e| {
                        SeqId::try_from(e.pad_streams(parallel)).unwrap_or(SeqId::MAX)
                    }),
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
                job.params.first_constraint(),
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
    /// decoded alone, so their shape is the request's own. Generated tokens are decoded in
    /// calls whose row counts the start-up probe found alike ([`calls`]), padded with dummy
    /// rows where the decision asks for more rows than generate.
    fn step_exact(&mut self, done: &mut Vec<Outcome>) {
        let Some(exact) = self.exact else { return };
        let (lo, hi) = exact.groups.bounds(exact.max_rows);
        let generating: Vec<bool> = self
            .slots
            .iter()
            .map(|s| matches!(s.state, SlotState::Generating { .. }))
            .collect();
        let n_seqs = self.slots.len() + exact.pad_streams(self.slots.len());
        for call in calls(lo, hi, &generating, n_seqs) {
            let mut batch = Batch::default();
            // Rows that only give the call its shape: (sequence, position), dropped after.
            // Each sits at its sequence's next position, so it leaves the sequence as it was.
            let mut dummies: Vec<(SeqId, u32)> = Vec::new();
            for row in call {
                if !row.dummy {
                    self.queue_generated(row.seq, &mut batch);
                    continue;
                }
                let pos = match self.slots.get(row.seq).map(|s| &s.state) {
                    Some(SlotState::Prompt { seq, .. } | SlotState::Generating { seq, .. }) => {
                        to_u32(seq.pos)
                    }
                    _ => 0,
                };
                let seq = SeqId::try_from(row.seq).unwrap_or(SeqId::MAX);
                if let Err(e) = self.session.push(Token(0), pos, seq, true) {
                    batch.failure = Some(e);
                }
                dummies.push((seq, pos));
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
                params.first_constraint(),
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
        // A thinking marker the engine writes itself is taken as if it were sampled.
        let token = match seq.forced() {
            Some(token) => token,
            None => {
                let sampled = self.session.sample(&mut seq.sampler, row);
                seq.substitute(model, sampled)
            }
        };
        self.metrics.completion_tokens += 1;
        self.gather.sampled(seq.job.line);
        let lp = seq
            .job
            .params
            .logprobs
            .map(|k| self.session.logprobs(row, token, usize::from(k)));
        let Some(reason) = seq.take(model, token, lp) else {
            if seq.answer_started() {
                // The answer starts: its sampler carries the request's constraint.
                let params = &seq.job.params;
                match self.session.sampler(
                    &params.sampler.for_choice(seq.choice),
                    params.constraint.as_ref(),
                ) {
                    Ok(sampler) => seq.sampler = sampler,
                    Err(e) => {
                        self.slots[i].state = SlotState::Generating { seq, last: token };
                        self.fail(i, &e, done);
                        return;
                    }
                }
            }
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
