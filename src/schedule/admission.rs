//! The admission loop: requests in, outcomes out, one scheduler step at a time.
//!
//! It fills free slots from the input, holds a request back while memory is short or while an
//! isolated request runs alone, sets quarantined requests aside with an error line, and stops
//! admitting when asked to stop. What reads the input, prepares jobs and writes results is the
//! caller's [`Feed`], so the loop is tested with a fake engine and an in-memory feed.

use std::collections::BTreeSet;
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

    /// The next request not yet done (or a line that failed to parse); `None` at the end.
    ///
    /// # Errors
    /// When the input cannot be read: the run stops.
    fn next_request(&mut self) -> Result<Option<Result<Request, LineError>>, Self::Error>;
    /// Turns a request into a job, its error line, or settles it without running (a copy of a
    /// result computed before, written with `metrics` counting it).
    ///
    /// # Errors
    /// When a copy cannot be written: the run stops.
    fn prepare(&mut self, request: Request, metrics: &mut Metrics) -> Result<Intake, Self::Error>;
    /// Called when `job` is handed to the scheduler.
    fn admitted(&mut self, job: &Job);
    /// Writes a request's outcome durably, counting it in `metrics`.
    ///
    /// # Errors
    /// When the output cannot be written: the run stops.
    fn write(&mut self, metrics: &mut Metrics, outcome: Outcome) -> Result<(), Self::Error>;
    /// Whether admission should pause because memory is short.
    fn memory_short(&mut self) -> bool;
    /// Whether the run was asked to stop.
    fn stop_requested(&self) -> bool;
    /// Called after each scheduler step.
    fn stepped(&mut self, metrics: &Metrics);
}

/// What the feed made of a request.
#[derive(Debug)]
pub enum Intake {
    /// A job for the scheduler.
    Run(Job),
    /// The request's error line.
    Failed(LineError),
    /// Settled without running: its line is written, or it waits for an identical request in
    /// flight whose outcome it copies.
    Settled,
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
    /// An isolated request runs: nothing is admitted until the scheduler is idle.
    Alone,
    /// The input is exhausted; the loop ends when the scheduler is idle.
    InputDone,
}

/// How long admission waits for memory before looking again, when nothing runs.
const MEMORY_WAIT: Duration = Duration::from_millis(200);

/// Runs every request of `feed` through `scheduler`.
///
/// # Errors
/// When the input cannot be read or an outcome cannot be written.
pub fn admit_all<E: Engine, F: Feed>(
    scheduler: &mut Scheduler<'_, E>,
    feed: &mut F,
    apart: Apart<'_>,
) -> Result<LoopEnd, F::Error> {
    let mut state = Admitting::Open;
    let mut waiting: Option<Job> = None;
    let mut finished = Vec::new();
    loop {
        if feed.stop_requested() {
            return Ok(LoopEnd::Interrupted);
        }
        if state == Admitting::Alone && scheduler.is_idle() {
            state = Admitting::Open;
        }
        if state == Admitting::Open {
            state = fill(scheduler, feed, apart, &mut waiting)?;
        }
        if scheduler.is_idle() {
            if state == Admitting::InputDone && waiting.is_none() {
                return Ok(LoopEnd::Finished);
            }
            // Admission is paused for memory: wait for it to free up.
            std::thread::sleep(MEMORY_WAIT);
            continue;
        }
        scheduler.step(&mut finished);
        for outcome in finished.drain(..) {
            feed.write(&mut scheduler.metrics, outcome)?;
        }
        feed.stepped(&scheduler.metrics);
    }
}

/// Fills free slots, unless memory is short; a request that does not fit waits in `waiting`
/// for the next step. Returns where admission stands after.
fn fill<E: Engine, F: Feed>(
    scheduler: &mut Scheduler<'_, E>,
    feed: &mut F,
    apart: Apart<'_>,
    waiting: &mut Option<Job>,
) -> Result<Admitting, F::Error> {
    while scheduler.has_idle_slot() && !feed.memory_short() {
        let job = match waiting.take() {
            Some(job) => job,
            None => match next_job(feed, &mut scheduler.metrics, apart.quarantine)? {
                Next::End => return Ok(Admitting::InputDone),
                Next::Job(job) => job,
                Next::Failed(e) => {
                    feed.write(&mut scheduler.metrics, Err(e))?;
                    continue;
                }
                Next::Settled => continue,
            },
        };
        let solo = apart.isolate.is_some_and(|lines| lines.contains(&job.line));
        if solo && !scheduler.is_idle() {
            *waiting = Some(job);
            break;
        }
        feed.admitted(&job);
        match scheduler.admit(job) {
            Ok(Admission::Started) if solo => return Ok(Admitting::Alone),
            Ok(Admission::Started) => {}
            Ok(Admission::Wait(job)) => {
                *waiting = Some(*job);
                break;
            }
            Err(e) => feed.write(&mut scheduler.metrics, Err(e))?,
        }
    }
    Ok(Admitting::Open)
}

/// The next thing the input offers.
enum Next {
    Job(Job),
    Failed(LineError),
    Settled,
    End,
}

fn next_job<F: Feed>(
    feed: &mut F,
    metrics: &mut Metrics,
    quarantine: Option<&BTreeSet<u64>>,
) -> Result<Next, F::Error> {
    Ok(match feed.next_request()? {
        None => Next::End,
        Some(Err(e)) => Next::Failed(e),
        Some(Ok(r)) if quarantine.is_some_and(|q| q.contains(&r.line)) => {
            Next::Failed(quarantined(r.line, &r.custom_id))
        }
        Some(Ok(r)) => match feed.prepare(r, metrics)? {
            Intake::Run(job) => Next::Job(job),
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
