//! `--supervise`: run the batch in a worker process and restart it when it dies abnormally
//! (killed by the OOM killer, aborted inside llama.cpp). Each restart resumes from the
//! checkpoint, so no finished request is lost or repeated.
//!
//! The supervisor holds the output lock for the whole run and passes it to each worker. It
//! applies `--restart` once, before the first worker. It follows which requests each worker has
//! in flight ([`crate::worker::Event`]), so that after a crash it can tell the next worker to run
//! those requests alone; a request in flight at two crashes is quarantined: it gets an error
//! line and the batch goes on without it.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::checkpoint::remove_output;
use crate::cli::RunConfig;
use crate::lock::OutputLock;
use crate::worker::{Event, WorkerEnv, WORKER_ENV};

/// Restarts in a row that brought no progress before the supervisor gives up.
pub const MAX_FRUITLESS_RESTARTS: u32 = 5;
/// Wait before the first restart; doubled after each fruitless one, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Exit codes a worker returns on purpose: ok, some failed, fatal, interrupted.
const DELIBERATE: [i32; 4] = [0, 1, 2, 75];
/// The exit code when signals stopped the run.
const INTERRUPTED: u8 = 75;

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It returned one of its own exit codes.
    Deliberate(u8),
    /// Killed with SIGKILL: most likely the kernel's OOM killer.
    Killed,
    /// Any other death (abort, segfault, panic).
    Crashed,
}

/// Classifies a worker's exit status.
pub fn ending(status: ExitStatus) -> Ending {
    match (status.code(), status.signal()) {
        (Some(c), _) if DELIBERATE.contains(&c) => Ending::Deliberate(c as u8),
        (_, Some(9)) => Ending::Killed,
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
pub fn supervise(cfg: &RunConfig, args: &[OsString], signals: &Signals) -> Result<u8> {
    let lock = OutputLock::acquire(&cfg.output)?;
    lock.share_with_children()?;
    if cfg.restart {
        remove_output(&cfg.output)?;
    }
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let mut parallel = cfg.parallel;
    let mut crashes = Crashes::default();
    let mut backoff = FIRST_BACKOFF;
    let mut fruitless = 0;
    loop {
        if signals.stops.load(Ordering::Relaxed) > 0 {
            // Stopped between two workers, during the back-off.
            return Ok(INTERRUPTED);
        }
        let env = WorkerEnv {
            supervisor: std::process::id(),
            lock_fd: lock.fd().context("the supervisor holds the lock")?,
            isolate: crashes.suspects.clone(),
            quarantine: crashes.quarantined.clone(),
        };
        let mut child = Command::new(&exe)
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
            // The first signal asks the worker to stop cleanly and record its progress (it may
            // have had the same signal from the terminal or the scheduler: a repeat changes
            // nothing). A second Ctrl-C stops it at once.
            if !asked && signals.stops.load(Ordering::Relaxed) > 0 {
                let _ = kill(pid, Signal::SIGTERM);
                asked = true;
            }
            if !killed && signals.interrupts.load(Ordering::Relaxed) >= 2 {
                let _ = kill(pid, Signal::SIGKILL);
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = reader.join();
        let log = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
        for line in &log.written {
            crashes.written(*line);
        }
        let progressed = !log.written.is_empty();
        let reason = match ending(status) {
            Ending::Deliberate(code) => return Ok(code),
            _ if signals.stops.load(Ordering::Relaxed) > 0 => {
                tracing::warn!(
                    "worker stopped at once ({status}); run the same command again to resume"
                );
                return Ok(INTERRUPTED);
            }
            Ending::Killed => {
                let lower = (parallel / 2).max(1);
                let why = format!(
                    "worker was killed (SIGKILL, likely out of memory); --parallel {parallel} -> {lower}"
                );
                parallel = lower;
                why
            }
            Ending::Crashed => format!("worker died abnormally ({status})"),
        };
        let quarantined = crashes.crashed(&log.in_flight);
        for line in &quarantined {
            tracing::warn!(
                "the request on input line {line} was in flight at two crashes: quarantined, it \
                 gets an error line and the batch goes on"
            );
        }
        if progressed || !quarantined.is_empty() {
            fruitless = 0;
            backoff = FIRST_BACKOFF;
        } else {
            fruitless += 1;
        }
        if fruitless > MAX_FRUITLESS_RESTARTS {
            bail!(
                "{reason}; gave up after {MAX_FRUITLESS_RESTARTS} restarts in a row without \
                 progress. Run the same command again to resume"
            );
        }
        let suspects = if crashes.suspects.is_empty() {
            String::new()
        } else {
            format!(
                "; {} request(s) in flight at the crash run alone next",
                crashes.suspects.len()
            )
        };
        tracing::warn!(
            "{reason}; restarting in {}s, resuming from the checkpoint{suspects}",
            backoff.as_secs()
        );
        std::thread::sleep(backoff);
        if fruitless > 0 {
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
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
        assert_eq!(ending(ExitStatus::from_raw(0)), Ending::Deliberate(0));
        assert_eq!(
            ending(ExitStatus::from_raw(75 << 8)),
            Ending::Deliberate(75)
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
