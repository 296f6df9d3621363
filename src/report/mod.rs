//! Measured figures: the run's counters, the progress line and the summary file.

pub mod metrics;
pub mod progress;
pub mod summary;
