//! Embeddings: a second context on the same model, with embeddings on and a pooling set, made
//! only when the input has embedding lines. Each input is decoded alone, as one sequence in one
//! call, so its vector never depends on what else the file holds.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use crate::engine::{backend, EngineError, Model, Token};

/// Longest embedding input: the embedding context holds one input at a time, and attention
/// over it costs memory quadratic in its length.
pub const MAX_TOKENS: u32 = 2048;

/// The embedding context's size for a model trained on `n_ctx_train` tokens: its trained
/// context, up to [`MAX_TOKENS`]. Both the run and its memory plan take it from here.
pub fn context_size(n_ctx_train: u32) -> u32 {
    n_ctx_train.min(MAX_TOKENS)
}

/// How a sequence's token vectors become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pooling {
    /// The mean of every token's vector.
    Mean,
    /// The first token's vector.
    Cls,
    /// The last token's vector.
    Last,
}

impl Pooling {
    /// The name the manifest and the docs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::Cls => "cls",
            Self::Last => "last",
        }
    }

    fn llama(self) -> LlamaPoolingType {
        match self {
            Self::Mean => LlamaPoolingType::Mean,
            Self::Cls => LlamaPoolingType::Cls,
            Self::Last => LlamaPoolingType::Last,
        }
    }

    /// The pooling a GGUF's `<arch>.pooling_type` names (llama.cpp's numbering), when it is
    /// one of these.
    fn from_gguf(value: &str) -> Option<Self> {
        match value.trim() {
            "1" => Some(Self::Mean),
            "2" => Some(Self::Cls),
            "3" => Some(Self::Last),
            _ => None,
        }
    }
}

impl Model {
    /// The pooling the GGUF's metadata names, if any.
    pub fn gguf_pooling(&self) -> Option<Pooling> {
        let arch = self.model.meta_val_str("general.architecture").ok()?;
        let value = self
            .model
            .meta_val_str(&format!("{arch}.pooling_type"))
            .ok()?;
        Pooling::from_gguf(&value)
    }

    /// A context for embeddings of inputs up to `n_ctx` tokens, pooled with `pooling`.
    ///
    /// # Errors
    /// [`EngineError::Context`] when llama.cpp cannot allocate it.
    pub fn new_embedder(
        &self,
        threads: u32,
        n_ctx: u32,
        pooling: Pooling,
    ) -> Result<Embedder<'_>, EngineError> {
        let threads = i32::try_from(threads).unwrap_or(i32::MAX);
        // One input is one call: pooling needs all of a sequence's tokens in one micro-batch.
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_n_seq_max(1)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED)
            .with_embeddings(true)
            .with_pooling_type(pooling.llama());
        let ctx = self
            .model
            .new_context(backend(false)?, params)
            .map_err(|e| EngineError::Context {
                n_ctx,
                reason: e.to_string(),
            })?;
        Ok(Embedder {
            ctx,
            batch: LlamaBatch::new(n_ctx as usize, 1),
            n_ctx: n_ctx as usize,
            pooling,
        })
    }
}

/// A context that turns token sequences into vectors.
pub struct Embedder<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    n_ctx: usize,
    /// The pooling it applies.
    pub pooling: Pooling,
}

impl Embedder<'_> {
    /// Most tokens one input may have.
    pub fn max_tokens(&self) -> usize {
        self.n_ctx
    }

    /// The pooled vector of `tokens`, as the model gives it (not normalized).
    ///
    /// # Errors
    /// When the input is empty or too long, or llama.cpp fails to decode it.
    pub fn embed(&mut self, tokens: &[Token]) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() || tokens.len() > self.n_ctx {
            return Err(EngineError::Batch(format!(
                "an input of {} tokens; 1 to {} fit",
                tokens.len(),
                self.n_ctx
            )));
        }
        self.ctx.clear_kv_cache();
        self.batch.clear();
        for (pos, t) in tokens.iter().enumerate() {
            self.batch
                .add(LlamaToken(t.0), pos as i32, &[0], true)
                .map_err(|e| EngineError::Batch(e.to_string()))?;
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Decode(e.to_string()))?;
        self.ctx
            .embeddings_seq_ith(0)
            .map(<[f32]>::to_vec)
            .map_err(|e| EngineError::Decode(e.to_string()))
    }
}

/// `v` scaled to unit length (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_gives_unit_length_and_keeps_zero() {
        let mut v = [3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut z = [0.0; 3];
        normalize(&mut z);
        assert_eq!(z, [0.0; 3]);
    }

    #[test]
    fn gguf_pooling_numbers_follow_llama_cpp() {
        assert_eq!(Pooling::from_gguf("1"), Some(Pooling::Mean));
        assert_eq!(Pooling::from_gguf("2"), Some(Pooling::Cls));
        assert_eq!(Pooling::from_gguf("3"), Some(Pooling::Last));
        assert_eq!(Pooling::from_gguf("0"), None, "none: no pooling");
        assert_eq!(
            Pooling::from_gguf("4"),
            None,
            "rank: a reranker's, not a vector"
        );
    }
}
