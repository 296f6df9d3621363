//! Integration tests: the real `infer-batch` binary and library on the real default model.
//!
//! Tests that run the model hold one lock, so they do not fight over the two cores (llama.cpp
//! slows down several times when oversubscribed) and stay quick.

mod batch;
mod chaos;
mod disk_cache;
mod endpoints;
mod harness;
mod kv_types;
mod memory;
mod prefix;
mod reasoning;
mod resume;
mod reuse;
mod serve;
mod shards;
mod structured;
mod templates;
#[cfg(feature = "vulkan")]
mod vulkan;
