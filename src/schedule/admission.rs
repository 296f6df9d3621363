//! The admission loop: requests in, outcomes out, one scheduler step at a time.
//!
//! It fills free slots from the input, holds a request back while memory is short or while an
//! isolated request runs alone, sets quarantined requests aside with an error line, and stops
//! admitting when asked to stop. Work the feed does itself, outside the slots (embeddings),
//! goes one bounded piece at a time between steps, so it neither holds up generation nor hides
//! a stop request for longer than one piece. What reads the input, prepares jobs and writes
//! results is the caller's [`Feed`], so the loop is tested with a fake engine and an in-memory
//! feed.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use crate::engine::Engine;
use crate::formats::line_error::{ErrorCode, LineError};
use crate::input::request::Request;
use crate::report::metrics::Metrics;
use crate::schedule::job::Job;
use crate::schedule::scheduler::{Admission, Outcome, Scheduler};

/// What the loop needs from the run around it.
pub trait Feed {
    /// Why the run around the loop cannot go on (input unreadable, output unwritable).
    type Error;
    /// A request the feed computes itself, outside the scheduler's slots, a piece at a time.
    type Work;

    /// The next request not yet done (or a line that failed to parse); `None` at the end.
    ///
    /// # Errors
    /// When the input cannot be read: the run stops.
    fn next_request(&mut self) -> Result<Option<Result<Request, LineError>>, Self::Error>;
    /// Turns a request into a job, work of its own, its error line, or settles it without
    /// running (a copy of a result computed before, written with `metrics` counting it).
    ///
    /// # Errors
    /// When a copy cannot be written: the run stops.
    fn prepare(
        &mut self,
        request: Request,
        metrics: &mut Metrics,
    ) -> Result<Intake<Self::Work>, Self::Error>;
    /// Called when `job` is handed to the scheduler.
    fn admitted(&mut self, job: &Job);
    /// Does the next piece of `work`: a piece is bounded (one input, one decode call), so a
    /// stop request waits for one piece at most. The last piece writes the request's line.
    ///
    /// # Errors
    /// When the output cannot be written: the run stops.
    fn work(&mut self, work: &mut Self::Work, metrics: &mut Metrics) -> Result<Piece, Self::Error>;
    /// Writes a request's outcome durably, counting it in `metrics`. Returns a job to run in
    /// its place: an identical request that waited on this one, which must compute its own
    /// outcome after all.
    ///
    /// # Errors
    /// When the output cannot be written: the run stops.
    fn write(
        &mut self,
        metrics: &mut Metrics,
        outcome: Outcome,
    ) -> Result<Option<Job>, Self::Error>;
    /// Whether admission should pause because memory is short.
    fn memory_short(&mut self) -> bool;
    /// Whether the run was asked to stop.
    fn stop_requested(&self) -> bool;
    /// Called after each turn of the loop that stepped the scheduler or did a piece of work.
    fn stepped(&mut self, metrics: &Metrics);
}

/// What the feed made of a request.
#[derive(Debug)]
pub enum Intake<W> {
    /// A job for the scheduler.
    Run(Job),
    /// Work the feed does itself ([`Feed::work`]), one request at a time beside the slots.
    Work {
        /// The request's input line.
        line: u64,
        /// Its state.
        work: W,
    },
    /// The request's error line.
    Failed(LineError),
    /// Settled without running: its line is written, or it waits for an identical request in
    /// flight whose outcome it copies.
    Settled,
}

/// Where a piece of work left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// More pieces to do.
    More,
    /// Its line is written.
    Done,
}

/// Requests a supervisor set apart after worker crashes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Apart<'a> {
    /// In flight at one crash: each runs alone, nothing admitted beside it.
    pub isolate: Option<&'a BTreeSet<u64>>,
    /// In flight at two crashes: each gets an error line instead of running.
    pub quarantine: Option<&'a BTreeSet<u64>>,
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
    /// Every request of the input has its outcome written.
    Finished,
    /// Stopped on request; in-flight requests were dropped, a resumed run redoes them.
    Interrupted,
}

/// Where admission stands between two steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admitting {
    /// Free slots take the next requests.
    Open,
    /// An isolated request runs: nothing is admitted until the scheduler and the lane are
    /// idle.
    Alone,
    /// The input is exhausted; what waits is still admitted, and the loop ends when nothing
    /// is left.
    InputDone,
}

/// A request read and prepared, not yet started.
enum Item<W> {
    Job(Box<Job>),
    Work { line: u64, work: W },
}

/// What is admitted or waiting besides the scheduler's slots.
struct Queue<W> {
    /// Jobs that found no free slot yet (or run in place of a failed twin), in order.
    jobs: VecDeque<Job>,
    /// Work read while the lane was busy, in order, with its line.
    parked: VecDeque<(u64, W)>,
    /// The feed's own work in progress: one request at a time.
    lane: Option<W>,
}

impl<W> Queue<W> {
    fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.parked.is_empty() && self.lane.is_none()
    }
}

/// Work requests read ahead while the lane is busy: reading goes on past them, so the jobs
/// behind keep the slots busy, until this many wait.
const PARKED_WORK: usize = 2;

/// How long admission waits for memory before looking again, when nothing runs.
const MEMORY_WAIT: Duration = Duration::from_millis(200);

/// Runs every request of `feed` through `scheduler`, and the feed's own work beside it.
///
/// # Errors
/// When the input cannot be read or an outcome cannot be written.
pub fn admit_all<E: Engine, F: Feed>(
    scheduler: &mut Scheduler<'_, E>,
    feed: &mut F,
    apart: Apart<'_>,
) -> Result<LoopEnd, F::Error> {
    let mut state = Admitting::Open;
    let mut queue = Queue {
        jobs: VecDeque::new(),
        parked: VecDeque::new(),
        lane: None,
    };
    let mut finished = Vec::new();
    loop {
        if feed.stop_requested() {
            return Ok(LoopEnd::Interrupted);
        }
        if state == Admitting::Alone && scheduler.is_idle() && queue.lane.is_none() {
            state = Admitting::Open;
        }
        if state != Admitting::Alone {
            state = fill(scheduler, feed, apart, &mut queue, state)?;
        }
        // One piece of the feed's own work per step: neither waits long for the other.
        let worked = match queue.lane.as_mut() {
            Some(work) => {
                if feed.work(work, &mut scheduler.metrics)? == Piece::Done {
                    queue.lane = None;
                }
                true
            }
            None => false,
        };
        if !scheduler.is_idle() {
            scheduler.step(&mut finished);
            for outcome in finished.drain(..) {
                if let Some(job) = feed.write(&mut scheduler.metrics, outcome)? {
                    queue.jobs.push_back(job);
                }
            }
        } else if !worked {
            if state == Admitting::InputDone && queue.is_empty() {
                return Ok(LoopEnd::Finished);
            }
            // Admission is paused for memory: wait for it to free up.
            std::thread::sleep(MEMORY_WAIT);
            continue;
        }
        feed.stepped(&scheduler.metrics);
    }
}

/// Admits what waits, then the next requests of the input, while there is room (a free slot
/// for a job, the free lane for work) and memory is not short; what finds no room waits for a
/// later turn. Jobs may overtake work that waits for the lane. Returns where admission stands.
fn fill<E: Engine, F: Feed>(
    scheduler: &mut Scheduler<'_, E>,
    feed: &mut F,
    apart: Apart<'_>,
    queue: &mut Queue<F::Work>,
    mut state: Admitting,
) -> Result<Admitting, F::Error> {
    while let Some(item) = take(scheduler, feed, apart, queue, &mut state)? {
        match place(scheduler, feed, apart, queue, item)? {
            Placed::Going => {}
            Placed::Alone => return Ok(Admitting::Alone),
            Placed::NoRoom => break,
        }
    }
    Ok(state)
}

/// The next request to admit, when there is room for one and memory is not short: work that
/// waits for the lane once it is free, else a job that waits, else the input's next (until
/// too much work waits); `None` when there is none. Lines settled on reading are written here.
fn take<E: Engine, F: Feed>(
    scheduler: &mut Scheduler<'_, E>,
    feed: &mut F,
    apart: Apart<'_>,
    queue: &mut Queue<F::Work>,
    state: &mut Admitting,
) -> Result<Option<Item<F::Work>>, F::Error> {
    loop {
        let lane_free = queue.lane.is_none() && !queue.parked.is_empty();
        if !(lane_free || scheduler.has_idle_slot()) || feed.memory_short() {
            return Ok(None);
        }
        if lane_free {
            let (line, work) = queue.parked.pop_front().expect("checked above");
            return Ok(Some(Item::Work { line, work }));
        }
        if let Some(job) = queue.jobs.pop_front() {
            return Ok(Some(Item::Job(Box::new(job))));
        }
        if *state == Admitting::InputDone || queue.parked.len() >= PARKED_WORK {
            return Ok(None);
        }
        match next_item(feed, &mut scheduler.metrics, apart.quarantine)? {
            Next::End => *state = Admitting::InputDone,
            Next::Item(item) => return Ok(Some(item)),
            Next::Failed(e) => write(scheduler, feed, queue, Err(e))?,
            Next::Settled => {}
        }
    }
}

/// Where [`place`] put a request.
enum Placed {
    /// Started, or parked behind the lane's work: admission goes on.
    Going,
    /// Started, and it runs alone.
    Alone,
    /// No room: it waits at the front, and admission stops for this turn.
    NoRoom,
}

/// Starts `item`: a job in free slots, work in the free lane, or work behind the lane's. An
/// isolated request waits until nothing else runs, and then runs alone.
fn place<E: Engine, F: Feed>(
    scheduler: &mut Scheduler<'_, E>,
    feed: &mut F,
    apart: Apart<'_>,
    queue: &mut Queue<F::Work>,
    item: Item<F::Work>,
) -> Result<Placed, F::Error> {
    let line = match &item {
        Item::Job(job) => job.line,
        Item::Work { line, .. } => *line,
    };
    let solo = apart.isolate.is_some_and(|lines| lines.contains(&line));
    if solo && (!scheduler.is_idle() || queue.lane.is_some()) {
        match item {
            Item::Job(job) => queue.jobs.push_front(*job),
            Item::Work { line, work } => queue.parked.push_front((line, work)),
        }
        return Ok(Placed::NoRoom);
    }
    let started = match item {
        Item::Work { line, work } if queue.lane.is_some() => {
            queue.parked.push_back((line, work));
            return Ok(Placed::Going);
        }
        Item::Work { work, .. } => {
            queue.lane = Some(work);
            true
        }
        Item::Job(job) => {
            feed.admitted(&job);
            match scheduler.admit(*job) {
                Ok(Admission::Started) => true,
                Ok(Admission::Wait(job)) => {
                    queue.jobs.push_front(*job);
                    return Ok(Placed::NoRoom);
                }
                Err(e) => {
                    write(scheduler, feed, queue, Err(e))?;
                    false
                }
            }
        }
    };
    Ok(if started && solo {
        Placed::Alone
    } else {
        Placed::Going
    })
}

/// Writes an outcome the loop itself settled; a job to run in its place waits its turn.
fn write<E: Engine, F: Feed>(
    scheduler: &mut Scheduler<'_, E>,
    feed: &mut F,
    queue: &mut Queue<F::Work>,
    outcome: Outcome,
) -> Result<(), F::Error> {
    if let Some(job) = feed.write(&mut scheduler.metrics, outcome)? {
        queue.jobs.push_back(job);
    }
    Ok(())
}

/// The next thing the input offers.
enum Next<W> {
    Item(Item<W>),
    Failed(LineError),
    Settled,
    End,
}

fn next_item<F: Feed>(
    feed: &mut F,
    metrics: &mut Metrics,
    quarantine: Option<&BTreeSet<u64>>,
) -> Result<Next<F::Work>, F::Error> {
    Ok(match feed.next_request()? {
        None => Next::End,
        Some(Err(e)) => Next::Failed(e),
        Some(Ok(r)) if quarantine.is_some_and(|q| q.contains(&r.line)) => {
            Next::Failed(quarantined(r.line, &r.custom_id))
        }
        Some(Ok(r)) => match feed.prepare(r, metrics)? {
            Intake::Run(job) => Next::Item(Item::Job(Box::new(job))),
            Intake::Work { line, work } => Next::Item(Item::Work { line, work }),
            Intake::Failed(e) => Next::Failed(e),
            Intake::Settled => Next::Settled,
        },
    })
}

/// The error line of a request that was in flight at two worker crashes.
fn quarantined(line: u64, custom_id: &str) -> LineError {
    LineError::new(
        line,
        Some(custom_id),
        ErrorCode::EngineError,
        "quarantined: the worker process crashed twice while this request was in flight, so \
         --supervise set it aside and the batch went on; run again with --retry-failed to retry it"
            .into(),
    )
}
