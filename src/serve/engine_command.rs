//! The command line each batch runs under: this binary, the run's own flags as `serve` was
//! given them, and `--supervise INPUT -o OUTPUT`. The engine stays a separate, supervised
//! process, so that nothing it does can take the API down, and it resumes a batch exactly as
//! the command line resumes a run.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags of `serve` itself, each with a value; the engine never sees them.
const SERVE_FLAGS: [&str; 6] = [
    "--host",
    "--port",
    "--data-dir",
    "--api-key-file",
    "--max-upload-bytes",
    "--request-timeout",
];

/// How to start the engine on one batch.
#[derive(Debug, Clone)]
pub struct EngineCommand {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl EngineCommand {
    /// From the arguments that followed `serve` on its command line.
    pub fn new(exe: PathBuf, serve_args: &[OsString]) -> Self {
        Self {
            exe,
            args: engine_args(serve_args),
        }
    }

    /// The command for a batch reading `input` and writing `output`.
    pub fn command(&self, input: &Path, output: &Path) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.env("NO_COLOR", "1")
            .args(&self.args)
            .arg("--supervise")
            .arg(input)
            .arg("-o")
            .arg(output);
        cmd
    }
}

/// `serve`'s arguments without its own flags (and their values) and without `--supervise`,
/// which the engine command adds.
pub fn engine_args(serve_args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in serve_args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let s = arg.to_string_lossy();
        let name = s.split_once('=').map_or(&*s, |(n, _)| n);
        if SERVE_FLAGS.contains(&name) {
            skip_value = !s.contains('=');
            continue;
        }
        if arg == OsStr::new("--supervise") {
            continue;
        }
        out.push(arg.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_flags_and_their_values_are_left_out() {
        let args: Vec<OsString> = [
            "--model",
            "m.gguf",
            "--port",
            "9000",
            "--host=0.0.0.0",
            "--parallel",
            "4",
            "--data-dir",
            "/d",
            "--supervise",
            "--api-key-file",
            "k",
            "--max-upload-bytes=10",
            "--request-timeout",
            "5",
            "--threads",
            "2",
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        let kept: Vec<_> = engine_args(&args)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            kept,
            ["--model", "m.gguf", "--parallel", "4", "--threads", "2"]
        );
    }
}
