//! The batch queue: one thread that takes batches in creation order, validates them, runs each
//! through the engine command in its own supervised process, follows its output for live
//! counts, and splits the output into the output and error files at the end.
//!
//! Every step starts from what the database and the batch's folder say, so a server killed at
//! any moment picks up where it was: a running batch resumes from the engine's checkpoint, a
//! finalizing one is finalized again (its file ids are derived from the batch's, so twice
//! writes the same files).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::commands::outcome::RunOutcome;
use crate::commands::supervise::{ending, Ending};
use crate::durability::lock::lock_holder;
use crate::serve::batch::{BatchError, BatchRecord, BatchStatus, Counts};
use crate::serve::engine_command::EngineCommand;
use crate::serve::layout::DataDir;
use crate::serve::store::{FileRecord, Store};
use crate::serve::validate::{validate, Verdict};

/// How often the queue looks at a running batch: its end, a cancel, new lines.
const POLL: Duration = Duration::from_millis(50);
/// How often the engine time of a running batch is written when no line came.
const CLOCK_EVERY: Duration = Duration::from_secs(1);
/// How long a batch waits for an engine from before a restart to let go of its output.
const LOCK_WAIT: Duration = Duration::from_secs(60);
/// Lines of the engine's log quoted when a batch fails in the engine.
const LOG_LINES: usize = 5;

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the HTTP side shares with the queue: a bell to ring when there is new work, the
/// batch running now, and the stop flag.
#[derive(Default)]
pub struct QueueSignals {
    bell: (Mutex<bool>, Condvar),
    running: Mutex<Option<String>>,
    stop: AtomicBool,
}

impl QueueSignals {
    /// Wakes the queue (a batch was created or cancelled).
    pub fn ring(&self) {
        let (lock, cv) = &self.bell;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// The id of the batch the engine runs now.
    pub fn running(&self) -> Option<String> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Asks the queue to stop the engine cleanly and return.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.ring();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn wait(&self, timeout: Duration) {
        let (lock, cv) = &self.bell;
        let rung = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (mut rung, _) = cv
            .wait_timeout_while(rung, timeout, |r| !*r)
            .unwrap_or_else(|p| p.into_inner());
        *rung = false;
    }

    fn set_running(&self, id: Option<&str>) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = id.map(Into::into);
    }
}

/// The queue's worker.
pub struct Queue {
    store: Store,
    dir: DataDir,
    engine: EngineCommand,
    signals: Arc<QueueSignals>,
}

/// How one engine process on a batch ended.
enum RunEnd {
    /// Every request has a line.
    Done,
    /// It stopped early on a cancel.
    Cancelled,
    /// The server is stopping; the batch stays queued.
    Paused,
    /// The engine gave up; why.
    Failed(String),
}

impl Queue {
    /// A queue over `store` and `dir`, running batches with `engine`.
    pub fn new(
        store: Store,
        dir: DataDir,
        engine: EngineCommand,
        signals: Arc<QueueSignals>,
    ) -> Self {
        Self {
            store,
            dir,
            engine,
            signals,
        }
    }

    /// Runs until [`QueueSignals::stop`]. A step that fails is logged and tried again later.
    pub fn run(self) {
        while !self.signals.stopping() {
            match self.step() {
                Ok(true) => {}
                Ok(false) => self.signals.wait(Duration::from_secs(1)),
                Err(e) => {
                    tracing::error!("batch queue: {e:#}");
                    self.signals.wait(Duration::from_secs(5));
                }
            }
        }
    }

    /// Does the next piece of work; whether there was any.
    fn step(&self) -> Result<bool> {
        use BatchStatus::*;
        if let Some(b) = self.store.oldest(Finalizing)? {
            self.finalize(&b, Completed, Vec::new())?;
        } else if let Some(b) = self.store.oldest(Cancelling)? {
            self.finalize(&b, Cancelled, Vec::new())?;
        } else if let Some(b) = self.store.oldest(Validating)? {
            self.validate(&b)?;
        } else if let Some(b) = self.store.oldest(InProgress)? {
            self.signals.set_running(Some(&b.id));
            let end = self.execute(&b);
            self.signals.set_running(None);
            match end? {
                RunEnd::Done => {
                    if self
                        .store
                        .transition(&b.id, &[InProgress, Cancelling], Finalizing, now())?
                    {
                        self.finalize(&b, Completed, Vec::new())?;
                    }
                }
                RunEnd::Cancelled => self.finalize(&b, Cancelled, Vec::new())?,
                RunEnd::Paused => {}
                RunEnd::Failed(why) => {
                    let error = BatchError {
                        code: "engine_error".into(),
                        message: why,
                        param: None,
                        line: None,
                    };
                    self.finalize(&b, Failed, vec![error])?;
                }
            }
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    fn validate(&self, b: &BatchRecord) -> Result<()> {
        let input = self.dir.batch(&b.id).join("input.jsonl");
        let verdict = match File::open(&input) {
            Ok(f) => validate(BufReader::new(f), &b.endpoint)?,
            Err(e) => Verdict::Invalid(vec![BatchError {
                code: "missing_input".into(),
                message: format!("the batch's input cannot be read: {e}"),
                param: Some("input_file_id".into()),
                line: None,
            }]),
        };
        match verdict {
            Verdict::Valid(total) => {
                let counts = Counts {
                    total,
                    ..Counts::default()
                };
                self.store.progress(&b.id, counts, 0, 0.0)?;
                self.store.transition(
                    &b.id,
                    &[BatchStatus::Validating],
                    BatchStatus::InProgress,
                    now(),
                )?;
            }
            Verdict::Invalid(errors) => self.store.fail(&b.id, &errors, now())?,
        }
        Ok(())
    }

    /// What need not wait for the running batch: validate the next new batch (a bad file
    /// fails at once) and end a queued batch that was cancelled.
    fn housekeeping(&self, running: &str) -> Result<()> {
        if let Some(b) = self.store.oldest(BatchStatus::Validating)? {
            self.validate(&b)?;
        }
        if let Some(b) = self.store.oldest_other(BatchStatus::Cancelling, running)? {
            self.finalize(&b, BatchStatus::Cancelled, Vec::new())?;
        }
        Ok(())
    }

    /// Runs the engine on `b` until it ends, is cancelled or the server stops.
    fn execute(&self, b: &BatchRecord) -> Result<RunEnd> {
        let folder = self.dir.batch(&b.id);
        let output = folder.join("output.jsonl");
        wait_for_lock(&output)?;
        let mut engine = self.spawn(&folder, &output)?;
        let started = Instant::now();
        let mut tail = OutputTail::default();
        let mut written = (Counts::default(), Instant::now());
        let status = loop {
            if let Some(status) = engine.child.try_wait()? {
                break status;
            }
            tail.read(&output)?;
            let counts = tail.counts(b.counts.total);
            // Only what changed, or the clock now and then: each write is a synced commit.
            if counts != written.0 || written.1.elapsed() >= CLOCK_EVERY {
                let seconds = b.run_seconds + started.elapsed().as_secs_f64();
                self.store.progress(&b.id, counts, tail.tokens, seconds)?;
                written = (counts, Instant::now());
            }
            // Another batch's trouble must not stop this one.
            if let Err(e) = self.housekeeping(&b.id) {
                tracing::error!("batch queue: {e:#}");
            }
            if self.is_cancelling(&b.id)? || self.signals.stopping() {
                engine.ask_to_stop();
            }
            self.signals.wait(POLL);
        };
        tail.read(&output)?;
        let seconds = b.run_seconds + started.elapsed().as_secs_f64();
        self.store
            .progress(&b.id, tail.counts(b.counts.total), tail.tokens, seconds)?;
        Ok(self.ending(b, status, &folder))
    }

    fn is_cancelling(&self, id: &str) -> Result<bool> {
        Ok(self
            .store
            .batch(id)?
            .is_some_and(|now| now.status == BatchStatus::Cancelling))
    }

    fn spawn(&self, folder: &Path, output: &Path) -> Result<Engine> {
        let log_path = folder.join("engine.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let mut cmd = self.engine.command(&folder.join("input.jsonl"), output);
        // Its own process group: a Ctrl-C meant for the server reaches the engine only
        // through the server, which stops it cleanly.
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let server = nix::unistd::getpid();
        // SAFETY: prctl(2) and getppid(2) are async-signal-safe and touch no memory of ours.
        // The engine stops cleanly (SIGTERM) when the server dies, even by SIGKILL, so that a
        // restarted server finds its output unlocked and resumes it; a server that died
        // before the signal was armed is caught by the parent check.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
                if nix::unistd::getppid() != server {
                    return Err(std::io::Error::other("the server is gone"));
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("cannot start the engine")?;
        Ok(Engine {
            child,
            stop_asked: None,
        })
    }

    fn ending(&self, b: &BatchRecord, status: ExitStatus, folder: &Path) -> RunEnd {
        // A cancel decides first: an engine stopped before it could take the signal cleanly
        // still ends a cancelled batch, not a failed one.
        let done = matches!(
            ending(status),
            Ending::Deliberate(RunOutcome::AllSucceeded | RunOutcome::SomeFailed)
        );
        if done {
            return RunEnd::Done;
        }
        if self.is_cancelling(&b.id).unwrap_or(false) {
            return RunEnd::Cancelled;
        }
        match ending(status) {
            _ if self.signals.stopping() => RunEnd::Paused,
            Ending::Deliberate(RunOutcome::Interrupted) => RunEnd::Paused,
            _ => RunEnd::Failed(format!(
                "the engine stopped ({status}); the end of {}: {}",
                folder.join("engine.log").display(),
                log_tail(&folder.join("engine.log"))
            )),
        }
    }

    /// Splits the engine's output into the output and error files, and ends `b` in `status`.
    fn finalize(
        &self,
        b: &BatchRecord,
        status: BatchStatus,
        errors: Vec<BatchError>,
    ) -> Result<()> {
        let output = self.dir.batch(&b.id).join("output.jsonl");
        // An engine from before a restart may still be writing its last lines.
        wait_for_lock(&output)?;
        let created = now();
        let mut ok = OutputFile::new(&self.dir, &b.id, "output")?;
        let mut failed = OutputFile::new(&self.dir, &b.id, "error")?;
        if let Ok(f) = File::open(&output) {
            for line in BufReader::new(f).split(b'\n') {
                let line = line?;
                match LineSummary::parse(&line) {
                    Some(s) if s.ok => ok.push(&line)?,
                    Some(_) => failed.push(&line)?,
                    None => {}
                }
            }
        }
        let counts = Counts {
            total: b.counts.total,
            completed: ok.lines,
            failed: failed.lines,
        };
        let kept: Vec<_> = [("output_file_id", ok), ("error_file_id", failed)]
            .into_iter()
            .filter(|(_, f)| f.lines > 0)
            .map(|(column, f)| f.persist(created).map(|rec| (column, rec)))
            .collect::<Result<_>>()?;
        let refs: Vec<_> = kept.iter().map(|(c, r)| (*c, r)).collect();
        self.store
            .finish(&b.id, status, &refs, &errors, counts, created)
    }
}

/// Waits while an engine from before a restart still holds `output`.
fn wait_for_lock(output: &Path) -> Result<()> {
    let start = Instant::now();
    while let Some(pid) = lock_holder(output) {
        anyhow::ensure!(
            start.elapsed() < LOCK_WAIT,
            "process {pid} still holds {} after {LOCK_WAIT:?}",
            output.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// How long an engine asked to stop gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A running engine process. Asked to stop, it gets SIGTERM and, if it is still there after
/// [`STOP_GRACE`], SIGKILL (its checkpoint still holds). Dropped while running (the queue
/// failed), it is stopped the same way: an engine never runs on unwatched.
struct Engine {
    child: Child,
    stop_asked: Option<Instant>,
}

impl Engine {
    fn signal(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // It may have exited already; then there is nothing to signal.
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    fn ask_to_stop(&mut self) {
        match self.stop_asked {
            None => {
                self.signal(Signal::SIGTERM);
                self.stop_asked = Some(Instant::now());
            }
            Some(at) if at.elapsed() > STOP_GRACE => self.signal(Signal::SIGKILL),
            Some(_) => {}
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                self.signal(Signal::SIGKILL);
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(POLL);
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(LOG_LINES)..].join(" | ")
}

/// One result file of a batch, written beside the stored files and renamed into place.
struct OutputFile {
    id: String,
    name: String,
    dest: std::path::PathBuf,
    tmp: BufWriter<tempfile::NamedTempFile>,
    lines: u64,
}

impl OutputFile {
    fn new(dir: &DataDir, batch_id: &str, kind: &str) -> Result<Self> {
        // Derived from the batch's own unguessable id, so a finalize that is repeated after a
        // crash writes the same file under the same id.
        let digest = crate::digest::sha256(format!("{batch_id}/{kind}"));
        let id = format!("file-{}", &hex::encode(digest)[..32]);
        Ok(Self {
            dest: dir.file(&id),
            name: format!("{batch_id}_{kind}.jsonl"),
            id,
            tmp: BufWriter::new(tempfile::NamedTempFile::new_in(dir.uploads())?),
            lines: 0,
        })
    }

    fn push(&mut self, line: &[u8]) -> Result<()> {
        self.tmp.write_all(line)?;
        self.tmp.write_all(b"\n")?;
        self.lines += 1;
        Ok(())
    }

    fn persist(self, created_at: u64) -> Result<FileRecord> {
        let tmp = self.tmp.into_inner().map_err(|e| e.into_error())?;
        tmp.as_file().sync_all()?;
        let bytes = tmp.as_file().metadata()?.len();
        tmp.persist(&self.dest)?;
        Ok(FileRecord {
            id: self.id,
            bytes,
            created_at,
            filename: self.name,
            purpose: "batch_output".into(),
        })
    }
}

/// What the queue reads of one result line: success or error, and completion tokens.
struct LineSummary {
    ok: bool,
    tokens: u64,
}

#[derive(Deserialize)]
struct LineHead {
    response: Option<ResponseHead>,
}

#[derive(Deserialize)]
struct ResponseHead {
    status_code: u16,
    body: BodyHead,
}

#[derive(Deserialize)]
struct BodyHead {
    usage: Option<UsageHead>,
}

/// Chat and completions count `completion_tokens`, Responses `output_tokens`.
#[derive(Deserialize)]
struct UsageHead {
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl LineSummary {
    /// `None` for a line that is not a whole result line (a torn tail).
    fn parse(line: &[u8]) -> Option<Self> {
        let head: LineHead = serde_json::from_slice(line).ok()?;
        let ok = head.response.as_ref().is_some_and(|r| r.status_code == 200);
        let tokens = head
            .response
            .and_then(|r| r.body.usage)
            .and_then(|u| u.completion_tokens.or(u.output_tokens))
            .unwrap_or(0);
        Some(Self { ok, tokens })
    }
}

/// The engine's output read as it grows: whole lines only, from where the last read stopped.
#[derive(Debug, Default)]
pub struct OutputTail {
    offset: u64,
    completed: u64,
    failed: u64,
    tokens: u64,
}

impl OutputTail {
    /// Reads the lines appended since the last call. A file shorter than before was rewound
    /// by a resume: it is read again from the start.
    ///
    /// # Errors
    /// When the file exists but cannot be read.
    pub fn read(&mut self, path: &Path) -> Result<()> {
        let Ok(mut f) = File::open(path) else {
            return Ok(());
        };
        if f.metadata()?.len() < self.offset {
            *self = Self::default();
        }
        f.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new(f);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf)?;
            if n == 0 || !buf.ends_with(b"\n") {
                return Ok(());
            }
            self.offset += n as u64;
            if let Some(s) = LineSummary::parse(&buf) {
                if s.ok {
                    self.completed += 1;
                } else {
                    self.failed += 1;
                }
                self.tokens += s.tokens;
            }
        }
    }

    /// `request_counts` so far.
    pub fn counts(&self, total: u64) -> Counts {
        Counts {
            total,
            completed: self.completed,
            failed: self.failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"id":"r","custom_id":"a","response":{"status_code":200,"request_id":"q","body":{"usage":{"prompt_tokens":3,"completion_tokens":7,"total_tokens":10}}},"error":null}"#;
    const ERR: &str =
        r#"{"id":"r","custom_id":"b","response":null,"error":{"code":"x","message":"m","line":2}}"#;

    #[test]
    fn the_tail_counts_whole_lines_and_starts_over_after_a_rewind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut tail = OutputTail::default();
        tail.read(&path).unwrap();
        assert_eq!(
            tail.counts(3),
            Counts {
                total: 3,
                completed: 0,
                failed: 0
            }
        );
        std::fs::write(&path, format!("{OK}\n{ERR}\n{{\"torn")).unwrap();
        tail.read(&path).unwrap();
        assert_eq!(
            tail.counts(3),
            Counts {
                total: 3,
                completed: 1,
                failed: 1
            }
        );
        assert_eq!(tail.tokens, 7);
        // The torn line completes.
        let mut f = File::options().append(true).open(&path).unwrap();
        f.write_all(b"\"}\n").unwrap();
        tail.read(&path).unwrap();
        assert_eq!((tail.completed, tail.failed), (1, 1), "not a result line");
        std::fs::write(&path, format!("{OK}\n")).unwrap();
        tail.read(&path).unwrap();
        assert_eq!(
            tail.counts(3),
            Counts {
                total: 3,
                completed: 1,
                failed: 0
            }
        );
    }
}
