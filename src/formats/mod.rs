//! The typed shapes the tool reads and writes: result lines, per-line errors, chat messages
//! and the names of the files beside an output. They depend on nothing else in the crate but
//! [`crate::digest`], so every stage may use them.

pub mod line_error;
pub mod manifest;
pub mod message;
pub mod paths;
pub mod result;
pub mod shard;
pub mod summary;
