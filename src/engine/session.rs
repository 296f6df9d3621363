//! A context over a model: its KV cache of sequences and one reusable batch, behind the
//! [`Engine`] seam the scheduler drives.

use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use super::device::backend;
use super::logprobs::{log_softmax_top, TokenLogprobs};
use super::sampler::{Constraint, Sampler, SamplerSpec};
use super::state::{MemoryKind, SeqState};
use super::{Engine, EngineError, KvTypes, Model, SeqId, Token};

impl Model {
    /// Creates a context (with its KV cache) and a reusable batch.
    ///
    /// # Errors
    /// [`EngineError::Context`] when llama.cpp cannot allocate it.
    pub fn new_session(&self, settings: &SessionSettings) -> Result<Session<'_>, EngineError> {
        let backend = backend(false)?;
        let threads = i32::try_from(settings.threads).unwrap_or(i32::MAX);
        // llama.cpp reserves an output row per sequence within its batch, and aborts where
        // the sequences outnumber it (`--batch-size 4` beside 5 streams). Our calls hold at
        // most `n_batch` tokens whatever it reserves, so a larger reservation changes no
        // call's shape.
        let reserved = settings.n_batch.max(settings.n_seq_max);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(settings.n_ctx))
            .with_n_batch(reserved)
            .with_n_ubatch(reserved)
            .with_n_seq_max(settings.n_seq_max)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_flash_attention_policy(settings.flash_attn.policy())
            .with_kv_unified(settings.kv_unified)
            // Named, not left to the default: the computation identity records them.
            .with_type_k(settings.kv_types.k.llama())
            .with_type_v(settings.kv_types.v.llama());
        let ctx = self
            .model
            .new_context(backend, params)
            .map_err(|e| EngineError::Context {
                n_ctx: settings.n_ctx,
                reason: e.to_string(),
            })?;
        let batch = LlamaBatch::new(settings.n_batch as usize, 1);
        Ok(Session {
            ctx,
            batch,
            streams: if settings.kv_unified {
                1
            } else {
                settings.n_seq_max
            },
            capacity: settings.n_batch as usize,
            kv_types: settings.kv_types,
            memory: self.memory_kind(),
            model: self,
        })
    }
}

/// Context settings chosen by the planner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSettings {
    /// KV cache cells shared by all sequences.
    pub n_ctx: u32,
    /// Most tokens in one decode call; also the prefill chunk size.
    pub n_batch: u32,
    /// Distinct sequences (slots plus resident prefixes).
    pub n_seq_max: u32,
    /// Threads for decode and prefill.
    pub threads: u32,
    /// Attention kernel choice.
    pub flash_attn: FlashAttn,
    /// The KV cache's key and value types.
    pub kv_types: KvTypes,
    /// One KV cache for all sequences, so a prefix copied to a slot is shared, not duplicated.
    /// Otherwise each sequence has a stream of `n_ctx / n_seq_max` cells of its own, and a
    /// sequence's cells sit at places that do not depend on the others.
    pub kv_unified: bool,
}

/// Whether llama.cpp uses its flash-attention kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FlashAttn {
    /// llama.cpp decides per device.
    #[default]
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

impl FlashAttn {
    fn policy(self) -> llama_cpp_sys_2::llama_flash_attn_type {
        match self {
            Self::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
            Self::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            Self::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }
    }
}

/// A context with its KV cache and one reusable batch.
pub struct Session<'m> {
    pub(super) ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// KV streams: 1 for a unified cache, else one per sequence.
    streams: u32,
    /// How states of this model are laid out.
    memory: MemoryKind,
    /// The types its states hold.
    kv_types: KvTypes,
    capacity: usize,
    pub(super) model: &'m Model,
}

impl<'m> Session<'m> {
    /// Drops the cells of `seq` from position `from` (all of them for `None`).
    fn remove_cells(&mut self, seq: SeqId, from: Option<u32>) -> Result<(), EngineError> {
        let seq_id = u32::try_from(seq).map_err(|e| EngineError::Cache(e.to_string()))?;
        match self.ctx.clear_kv_cache_seq(Some(seq_id), from, None) {
            Ok(true) => Ok(()),
            Ok(false) => Err(EngineError::Cache(format!(
                "sequence {seq}'s cells could not be removed"
            ))),
            Err(e) => Err(EngineError::Cache(e.to_string())),
        }
    }

    /// The model behind this session.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// KV sections in this model's states; an error for layouts no test has covered.
    fn state_sections(&self) -> Result<usize, String> {
        self.memory.sections().ok_or_else(|| {
            format!(
                "states of this model's memory layout ({}) are not saved",
                self.memory
            )
        })
    }
}

impl<'m> Engine for Session<'m> {
    type Sampler = Sampler;
    type Vocab = Model;

    fn vocab(&self) -> &Model {
        self.model
    }

    /// Tokens the batch holds at most.
    fn batch_capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens queued in the batch so far.
    fn batch_len(&self) -> usize {
        usize::try_from(self.batch.n_tokens()).unwrap_or(0)
    }

    /// Queues one token of sequence `seq` at position `pos`; `logits` asks for its output row.
    /// Returns the row index that [`Session::sample`] needs when `logits` is set.
    ///
    /// # Errors
    /// [`EngineError::Batch`] when the batch is full.
    fn push(
        &mut self,
        token: Token,
        pos: u32,
        seq: SeqId,
        logits: bool,
    ) -> Result<i32, EngineError> {
        let index = self.batch.n_tokens();
        let pos = i32::try_from(pos).map_err(|e| EngineError::Batch(e.to_string()))?;
        self.batch
            .add(LlamaToken(token.0), pos, &[seq], logits)
            .map_err(|e| EngineError::Batch(e.to_string()))?;
        Ok(index)
    }

    /// Runs the queued batch through the model and empties it.
    ///
    /// # Errors
    /// [`EngineError::Decode`] when llama.cpp fails (for example, no KV cell is free).
    fn decode(&mut self) -> Result<(), EngineError> {
        let result = self.ctx.decode(&mut self.batch);
        // A GPU backend queues the work and returns: wait for it here, so that the caller's
        // clock around this call measures the computation, not its submission.
        self.ctx.synchronize();
        self.batch.clear();
        result.map_err(|e| EngineError::Decode(e.to_string()))
    }

    /// Empties the batch without decoding it.
    fn discard_batch(&mut self) {
        self.batch.clear();
    }

    /// Gives `dst` every cell of `src`. In a unified cache the cells are only tagged, not
    /// copied; with a KV stream per sequence llama.cpp copies the whole stream, so `dst` gets
    /// the same cells at the same places.
    fn share_prefix(&mut self, src: SeqId, dst: SeqId) -> Result<(), EngineError> {
        // The whole range: llama.cpp only copies whole streams.
        self.ctx
            .copy_kv_cache_seq(src, dst, None, None)
            .map_err(|e| EngineError::Cache(e.to_string()))
    }

    /// Drops the cells of `seq` at positions `from` and after.
    fn truncate_seq(&mut self, seq: SeqId, from: u32) -> Result<(), EngineError> {
        self.remove_cells(seq, Some(from))
    }

    /// Drops every cell of `seq`; cells still shared with another sequence stay.
    fn clear_seq(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.remove_cells(seq, None)
    }

    /// The serialised KV state of sequence `seq`, in llama.cpp's per-sequence format as a
    /// unified (one-stream) cache writes it, whatever this session's layout.
    ///
    /// # Errors
    /// When this model's states are of an untested layout, or llama.cpp's bytes do not parse
    /// as the layout this build knows.
    fn seq_state(&self, seq: SeqId) -> Result<Vec<u8>, EngineError> {
        let sections = self.state_sections().map_err(EngineError::Save)?;
        let flags = LlamaStateSeqFlags::empty();
        let size = self.ctx.state_seq_get_size_ext(seq, flags);
        let mut bytes = vec![0u8; size];
        // SAFETY: the buffer holds the `size` bytes llama.cpp just said the state needs.
        let written = unsafe {
            self.ctx
                .state_seq_get_data_ext(bytes.as_mut_ptr(), seq, flags)
        };
        bytes.truncate(written);
        SeqState::parse(&bytes, sections, Some(self.kv_types))
            .and_then(|s| s.to_one_stream())
            .map_err(|e| EngineError::Save(e.to_string()))
    }

    /// Loads a state produced by [`Self::seq_state`] into sequence `seq`.
    ///
    /// The caller must only pass bytes that this build wrote for this model and layout:
    /// llama.cpp's loader trusts its input and may abort on malformed state.
    ///
    /// # Errors
    /// [`EngineError::Restore`] when the bytes do not parse as a one-stream state of this
    /// model's layout, or llama.cpp rejects them.
    fn restore_seq_state(&mut self, seq: SeqId, state: &[u8]) -> Result<(), EngineError> {
        let flags = LlamaStateSeqFlags::empty();
        let refused = |why: String| EngineError::Restore(state.len(), why);
        let sections = self.state_sections().map_err(refused)?;
        let parsed = SeqState::parse(state, sections, Some(self.kv_types))
            .map_err(|e| refused(e.to_string()))?;
        if parsed.streams() != 1 {
            return Err(refused("not in one-stream form".into()));
        }
        // A unified cache reads the one-stream form as it is; only streams need a new layout.
        let state: std::borrow::Cow<'_, [u8]> = if self.streams > 1 {
            let stream = u32::try_from(seq).map_err(|e| refused(e.to_string()))?;
            parsed
                .to_streams(self.streams, stream)
                .map_err(|e| refused(e.to_string()))?
                .into()
        } else {
            state.into()
        };
        // SAFETY: `state` passed the prefix store's checksum and identity checks and parses
        // whole as a state of this model's layout and KV types, so it is what `seq_state`
        // produced under this build, model and KV layout (with the stream count adapted).
        let ok = unsafe { self.ctx.state_seq_set_data_ext(&state, seq, flags) };
        if ok {
            Ok(())
        } else {
            // The refusal is the error to report; a failed clear would only repeat it.
            self.clear_seq(seq).ok();
            Err(EngineError::Restore(
                state.len(),
                "llama.cpp's loader refused it".into(),
            ))
        }
    }

    /// The raw logits of row `index` of the last decode.
    fn logits(&self, index: i32) -> Vec<f32> {
        self.ctx.get_logits_ith(index).to_vec()
    }

    /// A sampler for one choice of a request, constrained by `constraint` when it has one.
    ///
    /// # Errors
    /// [`EngineError::Sampler`] when llama.cpp refuses the grammar (it was checked before, so
    /// only a failure inside llama.cpp).
    fn sampler(
        &self,
        spec: &SamplerSpec,
        constraint: Option<&Constraint>,
    ) -> Result<Sampler, EngineError> {
        Sampler::new(spec, self.model, constraint)
    }

    /// The log probability of `token` at batch row `index` of the last decode under the
    /// model's own distribution (a log-softmax of the raw logits: before temperature,
    /// truncation or grammar masks), and the `top` most likely tokens with theirs.
    fn logprobs(&self, index: i32, token: Token, top: usize) -> TokenLogprobs {
        log_softmax_top(self.ctx.get_logits_ith(index), token, top)
    }

    /// Draws the next token for the row `index` of the last decode.
    fn sample(&self, sampler: &mut Sampler, index: i32) -> Token {
        Token(sampler.inner.sample(&self.ctx, index).0)
    }
}
