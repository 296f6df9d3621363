//! The entry points: arguments, the batch run, its supervisor and worker, and the `status`,
//! `merge`, `bench` and `cache warm` subcommands.

pub mod bench;
pub mod cli;
pub mod embeddings;
pub mod merge;
pub mod outcome;
pub mod preflight;
pub mod prepare;
pub mod run;
pub mod status;
pub mod supervise;
pub mod warm;
pub mod worker;
