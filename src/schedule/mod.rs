//! Scheduling: a parsed request becomes a job, jobs take slots, and the continuous-batching
//! loop decodes them through the [`crate::engine::Engine`] seam.

pub mod admission;
pub mod detok;
pub mod groups;
pub mod job;
pub mod reasoning;
pub mod scheduler;
pub mod sequence;
pub mod twins;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
