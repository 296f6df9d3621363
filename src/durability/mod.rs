//! What survives a kill: the output lock, durable result lines, the manifest and the resume
//! scan.

use std::path::PathBuf;

use crate::error::FileError;
use crate::formats::manifest::MANIFEST_VERSION;

pub mod checkpoint;
pub mod durable;
pub mod lock;
pub mod manifest;
pub mod sink;

/// Why an output, its lock or its manifest cannot be used; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// Another process holds the output's lock.
    #[error(
        "output {} is in use by {holder} (lock {}); wait for that run to end, or write \
         elsewhere with -o",
        output.display(),
        lock.display()
    )]
    InUse {
        /// The output.
        output: PathBuf,
        /// Its lock file.
        lock: PathBuf,
        /// `process PID`, or `another process`.
        holder: String,
    },
    /// A worker's inherited lock is not the one its supervisor holds.
    #[error("{0}")]
    NotInherited(String),
    /// A manifest of another layout version.
    #[error(
        "manifest {} has version {found}, this build reads {MANIFEST_VERSION}; pass --restart \
         to start over, or -o to write elsewhere",
        path.display()
    )]
    ManifestVersion {
        /// The manifest.
        path: PathBuf,
        /// Its version.
        found: u64,
    },
    /// A manifest that does not parse.
    #[error(
        "manifest {} is not a valid infer-batch manifest; pass --restart to start over, or -o \
         to write elsewhere",
        path.display()
    )]
    ManifestInvalid {
        /// The manifest.
        path: PathBuf,
        /// The parser's reason.
        #[source]
        source: serde_json::Error,
    },
    /// Results without a manifest: nothing proves what computed them.
    #[error(
        "output {} already holds results but has no manifest ({}), so it cannot be resumed \
         safely; pass --restart to replace it, or -o to write elsewhere",
        output.display(),
        manifest.display()
    )]
    NoManifest {
        /// The output.
        output: PathBuf,
        /// Where its manifest should be.
        manifest: PathBuf,
    },
    /// Results of another computation.
    #[error(
        "cannot resume into {}: {}. Pass --restart to start over, or -o to write elsewhere",
        output.display(),
        differences.join("; ")
    )]
    OtherComputation {
        /// The output.
        output: PathBuf,
        /// What changed, in words.
        differences: Vec<String>,
    },
    /// Results computed on another machine, which `--resume-anywhere` would accept.
    #[error(
        "cannot resume into {}: its lines were computed on another machine ({}), and this \
         machine's bits may differ. Pass --resume-anywhere to accept results from both (the \
         summary then says so), --restart to start over, or -o to write elsewhere",
        output.display(),
        differences.join("; ")
    )]
    OtherMachine {
        /// The output.
        output: PathBuf,
        /// What changed, in words.
        differences: Vec<String>,
    },
    /// A line before the last that is not a result line.
    #[error(
        "{} line {line} is not a result line; the file was edited or is not an infer-batch \
         output. Use --restart to start over, or -o to write elsewhere",
        path.display()
    )]
    NotAResultLine {
        /// The output.
        path: PathBuf,
        /// The 1-based line.
        line: u64,
    },
}
