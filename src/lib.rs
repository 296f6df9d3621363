//! infer-batch: offline LLM batch inference in-process on a GGUF model.
//!
//! A request travels one path, one folder a stage:
//! `JSONL line` ([`input`]) → prompt split into shared prefix and own suffix ([`prompt`]) →
//! a scheduler slot ([`schedule`], with prefixes held by [`cache`]) → llama.cpp decode
//! ([`engine`], the only module that knows llama.cpp) → result line ([`formats`]) written
//! durably ([`durability`]). [`plan`] sizes the context to the memory before anything runs,
//! [`report`] measures, and [`commands`] are the entry points that tie the stages together. [`serve`] puts
//! OpenAI's Batch API in front of them, at the edge.

pub mod cache;
pub mod commands;
pub mod digest;
pub mod durability;
pub mod engine;
pub mod error;
pub mod formats;
pub mod identity;
pub mod input;
pub mod plan;
pub mod prompt;
pub mod report;
pub mod schedule;
pub mod serve;
