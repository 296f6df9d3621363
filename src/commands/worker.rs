//! A batch run as a supervised worker: what the supervisor passes down, and what the worker
//! reports back.
//!
//! The supervisor passes a [`WorkerEnv`] in the `INFER_BATCH_WORKER` environment variable: its
//! pid, the descriptor of the output lock the worker inherits, the requests to run alone
//! (suspects of an earlier crash) and the requests to fail without running (quarantined). The
//! worker reports on stdout which requests it admits and which it has written, one event per
//! line, so that after a crash the supervisor knows which requests were in flight.

use std::collections::BTreeSet;
use std::io::Write;

use serde::{Deserialize, Serialize};

/// The environment variable that carries a [`WorkerEnv`].
pub const WORKER_ENV: &str = "INFER_BATCH_WORKER";

/// Test hook: a worker (or a plain run) aborts the process when it admits the request with
/// this `custom_id`, as a crash inside llama.cpp would.
pub const ABORT_ON_ENV: &str = "INFER_BATCH_TEST_ABORT_ON";

/// Every event line starts with this, so other output on stdout is told apart.
const EVENT_TAG: &str = "\u{1e}infer-batch-worker ";

/// What a supervisor tells its worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerEnv {
    /// The supervisor's pid; the worker stops when it goes away.
    pub supervisor: u32,
    /// The inherited descriptor that holds the output lock.
    pub lock_fd: i32,
    /// Input lines of requests to run alone: each was in flight when a worker crashed.
    pub isolate: BTreeSet<u64>,
    /// Input lines of requests that were in flight at two crashes: they get an error line.
    pub quarantine: BTreeSet<u64>,
}

impl WorkerEnv {
    /// The worker's context, when this process was started by a supervisor.
    ///
    /// # Errors
    /// When the variable is set but does not parse.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        match std::env::var(WORKER_ENV) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("{WORKER_ENV} is not a worker context: {e}")),
            Err(_) => Ok(None),
        }
    }

    /// As the environment variable's value.
    pub fn to_env(&self) -> String {
        serde_json::to_string(self).expect("a worker context serialises")
    }
}

/// What a worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The request on this input line was handed to the engine.
    Admitted(u64),
    /// The request on this input line has its output line written.
    Written(u64),
}

impl Event {
    /// The event's line on the worker's stdout.
    pub fn to_line(self) -> String {
        match self {
            Self::Admitted(l) => format!("{EVENT_TAG}admitted {l}"),
            Self::Written(l) => format!("{EVENT_TAG}written {l}"),
        }
    }

    /// Reads an event line; `None` for any other line.
    pub fn parse(line: &str) -> Option<Self> {
        let (kind, n) = line.strip_prefix(EVENT_TAG)?.split_once(' ')?;
        let n = n.trim().parse().ok()?;
        match kind {
            "admitted" => Some(Self::Admitted(n)),
            "written" => Some(Self::Written(n)),
            _ => None,
        }
    }
}

/// Where a worker's events go: stdout under a supervisor, nowhere otherwise.
#[derive(Debug, Default)]
pub struct Reporter {
    enabled: bool,
}

impl Reporter {
    /// A reporter that writes events when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }

    /// Reports one event. It must reach the supervisor before the work it announces can crash,
    /// so it is flushed at once.
    pub fn report(&self, event: Event) {
        if self.enabled {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", event.to_line());
            let _ = out.flush();
        }
    }
}

/// The fault-injection hook: aborts the process when `custom_id` is the one named by
/// [`ABORT_ON_ENV`]. For tests of crash recovery only.
pub fn abort_if_poisoned(custom_id: &str) {
    if std::env::var(ABORT_ON_ENV).is_ok_and(|id| id == custom_id) {
        eprintln!("{ABORT_ON_ENV}: aborting on {custom_id:?}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_other_lines_are_ignored() {
        for e in [Event::Admitted(7), Event::Written(123_456)] {
            assert_eq!(Event::parse(&e.to_line()), Some(e));
        }
        assert_eq!(Event::parse("admitted 7"), None);
        assert_eq!(Event::parse(&format!("{EVENT_TAG}admitted x")), None);
        assert_eq!(Event::parse(&format!("{EVENT_TAG}exploded 1")), None);
    }

    #[test]
    fn worker_env_round_trips() {
        let env = WorkerEnv {
            supervisor: 42,
            lock_fd: 5,
            isolate: [3, 9].into(),
            quarantine: [9].into(),
        };
        let back: WorkerEnv = serde_json::from_str(&env.to_env()).unwrap();
        assert_eq!(back, env);
    }
}
