//! Input: the OpenAI Batch request lines and the fields they may carry.

pub mod completions;
pub mod embeddings;
pub mod fields;
pub mod reasoning;
pub mod request;
pub mod responses;
pub mod sampling;
