//! infer-batch: offline LLM batch inference in-process on a GGUF model.
//!
//! A request travels one path, one module a stage:
//! `JSONL line` ([`request`]) → prompt split into shared prefix and own suffix ([`prompt`]) →
//! a scheduler slot ([`scheduler`], with prefixes held by [`prefix_cache`]) → llama.cpp decode
//! ([`engine`], the only module that knows llama.cpp) → result line ([`output`], [`sink`]).

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod detok;
pub mod digest;
pub mod durable;
pub mod engine;
pub mod fields;
pub mod grammar;
pub mod job;
pub mod lock;
pub mod manifest;
pub mod memory;
pub mod merge;
pub mod metrics;
pub mod output;
pub mod plan;
pub mod prefix_cache;
pub mod prefix_store;
pub mod preflight;
pub mod progress;
pub mod prompt;
pub mod request;
pub mod run;
pub mod scheduler;
pub mod sequence;
pub mod shard;
pub mod sink;
pub mod status;
pub mod summary;
pub mod supervise;
pub mod template;
pub mod warm;
pub mod worker;
