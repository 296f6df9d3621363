//! The only module that touches `llama_cpp_2`: model, context, batch, decode, sampling.
//!
//! Everything above this boundary sees our own types ([`Token`], [`SeqId`], [`SamplerSpec`]),
//! so the scheduler and the prompt logic can be read and tested without knowing llama.cpp.
//!
//! One file per llama.cpp object: the backends and their devices (`device`), the model
//! (`model`), the context with its KV cache and batch (`session`), a request's sampling chain
//! (`sampler`), log probabilities of a row (`logprobs`), the decode-group probe (`probe`) and the
//! KV cache's element types (`kv_type`).

use std::path::PathBuf;

mod backends;
pub use backends::not_loaded as gpu_modules_not_loaded;
mod device;
pub mod embed;
mod kv_type;
mod logprobs;
pub mod machine;
mod model;
pub mod probe;
mod sampler;
mod seam;
mod session;
pub mod state;

use device::{backend, c_text};
pub use device::{devices, gpu_available, gpu_devices, Device};
pub use kv_type::{KvType, KvTypes, QUANT_BLOCK};
pub use logprobs::{log_softmax_top, TokenLogprobs};
pub use model::{Model, ModelInfo, ModelSettings};
pub use sampler::{Constraint, Sampler, SamplerSpec};
pub use seam::{Engine, Vocab};
pub use session::{FlashAttn, Session, SessionSettings};

/// A token id of the loaded model's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub i32);

/// A llama.cpp sequence id: one slot or one resident prefix.
pub type SeqId = i32;

/// Failures of the engine, each with the context a person needs.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The llama.cpp backend could not start.
    #[error("could not initialise the llama.cpp backend: {0}")]
    Backend(String),
    /// The GGUF file is missing or unreadable.
    #[error("could not load model {path}: {reason}")]
    ModelLoad { path: PathBuf, reason: String },
    /// The model has no usable chat template.
    #[error("model has no chat template llama.cpp can apply: {0}")]
    Template(String),
    /// The context could not be allocated.
    #[error("could not create a context of {n_ctx} tokens: {reason}")]
    Context { n_ctx: u32, reason: String },
    /// `llama_decode` failed.
    #[error("llama_decode failed: {0}")]
    Decode(String),
    /// A saved sequence state was refused.
    #[error("a saved prefix state of {0} bytes was refused: {1}")]
    Restore(usize, String),
    /// More tokens were queued than the batch holds.
    #[error("batch overflow: {0}")]
    Batch(String),
    /// A sampler could not be built.
    #[error("could not build the sampler: {0}")]
    Sampler(String),
    /// A KV cache operation (copy or removal of a sequence's cells) failed.
    #[error("KV cache operation failed: {0}")]
    Cache(String),
    /// A sequence's state could not be serialised.
    #[error("cannot save the sequence state: {0}")]
    Save(String),
}
