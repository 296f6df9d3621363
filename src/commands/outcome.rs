//! How a run ends, and the exit code of each ending: the one home of both, for `main` and for
//! the supervisor that reads its workers' codes.

/// How a batch run (or a worker) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every request has a result line.
    AllSucceeded,
    /// The run finished, but some requests have error lines.
    SomeFailed,
    /// The run could not proceed (it said why on stderr).
    Fatal,
    /// Stopped by a signal before the end; running the same command again resumes.
    Interrupted,
}

impl RunOutcome {
    const CODES: [(Self, u8); 4] = [
        (Self::AllSucceeded, 0),
        (Self::SomeFailed, 1),
        (Self::Fatal, 2),
        // sysexits' TEMPFAIL: try again.
        (Self::Interrupted, 75),
    ];

    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        Self::CODES
            .iter()
            .find(|(o, _)| *o == self)
            .map_or(2, |&(_, code)| code)
    }

    /// The outcome a worker's exit code stands for; `None` for a code no run returns.
    pub fn from_exit_code(code: i32) -> Option<Self> {
        Self::CODES
            .iter()
            .find(|&&(_, c)| i32::from(c) == code)
            .map(|&(o, _)| o)
    }
}

#[cfg(test)]
mod tests {
    use super::RunOutcome;

    #[test]
    fn exit_codes_round_trip_and_stay_what_scripts_expect() {
        for (o, code) in [
            (RunOutcome::AllSucceeded, 0),
            (RunOutcome::SomeFailed, 1),
            (RunOutcome::Fatal, 2),
            (RunOutcome::Interrupted, 75),
        ] {
            assert_eq!(o.exit_code(), code);
            assert_eq!(RunOutcome::from_exit_code(i32::from(code)), Some(o));
        }
        assert_eq!(RunOutcome::from_exit_code(3), None);
        assert_eq!(RunOutcome::from_exit_code(-1), None);
    }
}
