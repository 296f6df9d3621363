//! `--supervise`: run the batch in a worker process and restart it when it dies abnormally
//! (killed by the OOM killer, aborted inside llama.cpp). Each restart resumes from the
//! checkpoint, so no finished request is lost or repeated.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Most restarts before the supervisor gives up.
pub const MAX_RESTARTS: u32 = 5;
/// Wait before the first restart; doubled each time, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Exit codes a worker returns on purpose: ok, some failed, fatal, interrupted.
const DELIBERATE: [i32; 4] = [0, 1, 2, 75];

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

/// The worker's arguments: ours without `--supervise`, with `--parallel` set to `parallel`.
pub fn worker_args(args: &[OsString], parallel: u32) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--supervise" || s.starts_with("--parallel=") {
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

/// Runs workers until one ends deliberately; returns its exit code. A worker that looks
/// killed for memory is restarted with half the `--parallel`.
///
/// # Errors
/// When a worker cannot be started, or dies more than [`MAX_RESTARTS`] times.
pub fn supervise(args: &[OsString], mut parallel: u32, stop: &AtomicBool) -> Result<u8> {
    let exe = std::env::current_exe().context("cannot find our own executable")?;
    let mut backoff = FIRST_BACKOFF;
    for restart in 0..=MAX_RESTARTS {
        let mut child = Command::new(&exe)
            .args(worker_args(args, parallel))
            .spawn()
            .context("cannot start the worker")?;
        let pid = Pid::from_raw(i32::try_from(child.id()).context("worker pid")?);
        let mut forwarded = false;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if stop.load(Ordering::Relaxed) && !forwarded {
                // Let the worker stop cleanly and record its progress.
                let _ = kill(pid, Signal::SIGTERM);
                forwarded = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let reason = match ending(status) {
            Ending::Deliberate(code) => return Ok(code),
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
        if stop.load(Ordering::Relaxed) {
            bail!("{reason}, after an interrupt; run the same command again to resume");
        }
        if restart == MAX_RESTARTS {
            bail!("{reason}; gave up after {MAX_RESTARTS} restarts");
        }
        tracing::warn!(
            "{reason}; restart {} of {MAX_RESTARTS} in {}s, resuming from the checkpoint",
            restart + 1,
            backoff.as_secs()
        );
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    unreachable!("the loop returns or bails on its last pass")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn worker_args_drop_supervise_and_set_parallel() {
        let a = os(&[
            "--model",
            "m",
            "--supervise",
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
}
