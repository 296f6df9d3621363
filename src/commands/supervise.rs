//! `--supervise`: run the batch in a worker process and restart it when it dies abnormally
//! (killed by the OOM killer, aborted inside llama.cpp). Each restart resumes from the
//! checkpoint, so no finished request is lost or repeated.
//!
//! The supervisor holds the output lock for the whole run and passes it to each worker. It
//! applies `--restart` once, before the first worker. It follows which requests each worker has
//! in flight ([`crate::commands::worker::Event`]), so that after a crash it can tell the next worker to run
//! those requests alone; a request in flight at two crashes is quarantined: it gets an error
//! line and the batch goes on without it.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::commands::cli::RunConfig;
use crate::commands::outcome::RunOutcome;
use crate::commands::worker::{Event, WorkerEnv, WORKER_ENV};
use crate::durability::checkpoint::remove_output;
use crate::durability::lock::OutputLock;

/// Restarts in a row that brought no progress before the supervisor gives up.
pub const MAX_FRUITLESS_RESTARTS: u32 = 5;
/// Wait before the first restart; doubled after each fruitless one, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It returned one of its own exit codes.
    Deliberate(RunOutcome),
    /// Killed with SIGKILL: most likely the kernel's OOM killer.
    Killed,
    /// Any other death (abort, segfault, panic).
    Crashed,
}

/// Classifies a worker's exit status.
pub fn ending(status: ExitStatus) -> Ending {
    match (status.code(), status.signal()) {
        (_, Some(9)) => Ending::Killed,
        (Some(c), _) => RunOutcome::from_exit_code(c).map_or(Ending::Crashed, Ending::Deliberate),
        _ => Ending::Crashed,
    }
}

/// The worker's arguments: ours without `--supervise` and `--restart` (the supervisor applies
/// it once), with `--parallel` set to `parallel`.
pub fn worker_args(args: &[OsString], parallel: u32) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--supervise" || s == "--restart" || s.starts_with("--parallel=") {
            continue;
        }
        if s == "--parallel" {
            skip_next = true;
            continue;
        }
        out.push(a.clone());
    }
    out.push("--parallel".into());
    out.push(parallel.to_string().into());
    out
}

/// What the supervisor knows of the requests across crashes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Crashes {
    /// Lines in flight at some crash and not written since: the next worker runs them alone.
    pub suspects: BTreeSet<u64>,
    /// Lines in flight at two crashes: they get an error line instead of running.
    pub quarantined: BTreeSet<u64>,
}

impl Crashes {
    /// Accounts a crash with `in_flight` requests; returns the lines quarantined by it.
    pub fn crashed(&mut self, in_flight: &BTreeSet<u64>) -> Vec<u64> {
        let again: Vec<u64> = in_flight.intersection(&self.suspects).copied().collect();
        for line in &again {
            self.suspects.remove(line);
            self.quarantined.insert(*line);
        }
        self.suspects
            .extend(in_flight.iter().filter(|l| !self.quarantined.contains(l)));
        again
    }

    /// Accounts a request whose line was written.
    pub fn written(&mut self, line: u64) {
        self.suspects.remove(&line);
    }
}

/// What one worker reported before it ended.
#[derive(Debug, Default)]
struct WorkerLog {
    in_flight: BTreeSet<u64>,
    written: Vec<u64>,
}

/// The signals a supervisor received.
#[derive(Debug, Default)]
pub struct Signals {
    /// SIGINT and SIGTERM: the first asks the worker to stop cleanly.
    pub stops: AtomicUsize,
    /// SIGINT alone: a second Ctrl-C stops the worker at once.
    pub interrupts: AtomicUsize,
}

/// Runs workers until one ends deliberately; returns its exit code. `args` are this
/// process's arguments; `signals` counts what it received. A worker that looks killed for
/// memory is restarted with half the `--parallel`.
///
/// # Errors
/// When the output is locked by another run, a worker cannot be started, or workers keep
/// dying without progress.
pub fn supervise(cfg: &RunConfig, args: &[OsString], signals: &Signals) -> Result<RunOutcome> {
    let lock = OutputLock::acquire(&cfg.output)?;
    lock.share_with_children()?;
    if cfg.restart {
        remove_output(&cfg.output)?;
    }
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let mut restarts = Restarts::new(cfg.parallel);
    loop {
        if signals.stops.load(Ordering::Relaxed) > 0 {
            // Stopped between two workers, during the back-off.
            return Ok(RunOutcome::Interrupted);
        }
        let env = WorkerEnv {
            supervisor: std::process::id(),
            lock_fd: lock.fd().context("the supervisor holds the lock")?,
            isolate: restarts.crashes.suspects.clone(),
            quarantine: restarts.crashes.quarantined.clone(),
        };
        let (status, log) = run_worker(&exe, args, restarts.parallel, &env, signals)?;
        for line in &log.written {
            restarts.crashes.written(*line);
        }
        let reason = match ending(status) {
            Ending::Deliberate(outcome) => return Ok(outcome),
            _ if signals.stops.load(Ordering::Relaxed) > 0 => {
                tracing::warn!(
                    "worker stopped at once ({status}); run the same command again to resume"
                );
                return Ok(RunOutcome::Interrupted);
            }
            Ending::Killed => {
                let (parallel, lower) = (restarts.parallel, (restarts.parallel / 2).max(1));
                restarts.parallel = lower;
                format!(
                    "worker was killed (SIGKILL, likely out of memory); --parallel {parallel} -> {lower}"
                )
            }
            Ending::Crashed => format!("worker died abnormally ({status})"),
        };
        restarts.after_death(&reason, &log)?;
    }
}

/// Starts one worker and follows it to its end: the first stop signal asks it to stop
/// cleanly and record its progress (it may have had the same signal from the terminal or the
/// scheduler: a repeat changes nothing); a second Ctrl-C stops it at once.
fn run_worker(
    exe: &Path,
    args: &[OsString],
    parallel: u32,
    env: &WorkerEnv,
    signals: &Signals,
) -> Result<(ExitStatus, WorkerLog)> {
    let mut child = Command::new(exe)
        .args(worker_args(args, parallel))
        .env(WORKER_ENV, env.to_env())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start the worker")?;
    let pid = Pid::from_raw(i32::try_from(child.id()).context("worker pid")?);
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let reader = {
        let stdout = child.stdout.take().context("the worker's stdout")?;
        let log = Arc::clone(&log);
        std::thread::spawn(move || follow(stdout, &log))
    };
    let (mut asked, mut killed) = (false, false);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        // Signals to a worker that is already gone fail harmlessly: it is reaped next turn.
        if !asked && signals.stops.load(Ordering::Relaxed) > 0 {
            kill(pid, Signal::SIGTERM).ok();
            asked = true;
        }
        if !killed && signals.interrupts.load(Ordering::Relaxed) >= 2 {
            kill(pid, Signal::SIGKILL).ok();
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if reader.join().is_err() {
        tracing::warn!("the worker's output reader failed; its last events may be missing");
    }
    let log = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
    Ok((status, log))
}

/// The supervisor's memory across worker deaths: what crashed, how fast to restart, and the
/// `--parallel` the next worker gets.
struct Restarts {
    parallel: u32,
    crashes: Crashes,
    backoff: Duration,
    fruitless: u32,
}

impl Restarts {
    fn new(parallel: u32) -> Self {
        Self {
            parallel,
            crashes: Crashes::default(),
            backoff: FIRST_BACKOFF,
            fruitless: 0,
        }
    }

    /// After a worker died for `reason`: quarantines what was in flight twice, gives up after
    /// too many restarts without progress, else waits out the back-off.
    fn after_death(&mut self, reason: &str, log: &WorkerLog) -> Result<()> {
        let quarantined = self.crashes.crashed(&log.in_flight);
        for line in &quarantined {
            tracing::warn!(
                "the request on input line {line} was in flight at two crashes: quarantined, it \
                 gets an error line and the batch goes on"
            );
        }
        if !log.written.is_empty() || !quarantined.is_empty() {
            self.fruitless = 0;
            self.backoff = FIRST_BACKOFF;
        } else {
            self.fruitless += 1;
        }
        if self.fruitless > MAX_FRUITLESS_RESTARTS {
            bail!(
                "{reason}; gave up after {MAX_FRUITLESS_RESTARTS} restarts in a row without \
                 progress. Run the same command again to resume"
            );
        }
        let suspects = if self.crashes.suspects.is_empty() {
            String::new()
        } else {
            format!(
                "; {} request(s) in flight at the crash run alone next",
                self.crashes.suspects.len()
            )
        };
        tracing::warn!(
            "{reason}; restarting in {}s, resuming from the checkpoint{suspects}",
            self.backoff.as_secs()
        );
        std::thread::sleep(self.backoff);
        if self.fruitless > 0 {
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
        Ok(())
    }
}

/// Reads a worker's stdout until it closes: events go into `log`, other lines are passed on.
fn follow(stdout: impl std::io::Read, log: &Mutex<WorkerLog>) {
    let mut out = std::io::stdout();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let Some(event) = Event::parse(&line) else {
            let _ = writeln!(out, "{line}");
            continue;
        };
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Event::Admitted(l) => {
                log.in_flight.insert(l);
            }
            Event::Written(l) => {
                log.in_flight.remove(&l);
                log.written.push(l);
            }
        }
    }
}

/// Makes this process a well-behaved worker of `env`'s supervisor: it stops cleanly (SIGTERM)
/// when the supervisor dies, and not at all if the supervisor is already gone.
///
/// # Errors
/// When the supervisor is gone or the signal cannot be arranged.
pub fn attach_to_supervisor(env: &WorkerEnv) -> Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).context("cannot follow the supervisor")?;
    // A supervisor that died before the line above would never signal us.
    let parent = nix::unistd::getppid().as_raw();
    if u32::try_from(parent).ok() != Some(env.supervisor) {
        bail!("the supervisor (process {}) is gone", env.supervisor);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn worker_args_drop_supervise_and_restart_and_set_parallel() {
        let a = os(&[
            "--model",
            "m",
            "--supervise",
            "--restart",
            "--parallel",
            "8",
            "in.jsonl",
            "--parallel=3",
        ]);
        assert_eq!(
            worker_args(&a, 4),
            os(&["--model", "m", "in.jsonl", "--parallel", "4"])
        );
    }

    #[test]
    fn endings_are_classified() {
        assert_eq!(
            ending(ExitStatus::from_raw(0)),
            Ending::Deliberate(RunOutcome::AllSucceeded)
        );
        assert_eq!(
            ending(ExitStatus::from_raw(75 << 8)),
            Ending::Deliberate(RunOutcome::Interrupted)
        );
        assert_eq!(ending(ExitStatus::from_raw(9)), Ending::Killed);
        assert_eq!(ending(ExitStatus::from_raw(6)), Ending::Crashed); // SIGABRT
        assert_eq!(ending(ExitStatus::from_raw(101 << 8)), Ending::Crashed); // a panic
    }

    #[test]
    fn a_request_in_flight_at_two_crashes_is_quarantined_and_its_mates_are_not() {
        let mut c = Crashes::default();
        // Four in flight when a worker dies: all are suspects, none is guilty yet.
        assert!(c.crashed(&[3, 4, 5, 6].into()).is_empty());
        assert_eq!(c.suspects, [3, 4, 5, 6].into());
        // Run alone, 3 completes; 4 crashes the worker again.
        c.written(3);
        assert_eq!(c.crashed(&[4].into()), vec![4]);
        assert_eq!(c.quarantined, [4].into());
        assert_eq!(c.suspects, [5, 6].into());
        // 5 and 6 complete alone; a later, unrelated crash quarantines nothing.
        c.written(5);
        c.written(6);
        assert!(c.crashed(&[9, 10].into()).is_empty());
        assert_eq!(c.quarantined, [4].into());
        assert_eq!(c.suspects, [9, 10].into());
        // A crash with nothing in flight changes nothing.
        assert!(c.crashed(&BTreeSet::new()).is_empty());
    }
}
