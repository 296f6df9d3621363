//! The seam between scheduling and llama.cpp: what the scheduler and the prefix cache need
//! from a session, and nothing more. [`super::Session`] implements it over llama.cpp; the
//! scheduler's unit tests implement it with a scripted fake, so admission, forks, fixed-shape
//! groups, the decode-group probe and failures are tested without a model.

use super::{Constraint, EngineError, SamplerSpec, SeqId, Token, TokenLogprobs};

/// What a generated token means as text.
pub trait Vocab {
    /// Whether `token` ends generation (end of turn or of text).
    fn is_end_of_generation(&self, token: Token) -> bool;
    /// Appends the bytes `token` stands for to `out` (special tokens render as nothing).
    fn token_bytes(&self, token: Token, out: &mut Vec<u8>);
    /// The bytes `token` stands for, special tokens rendered as their text.
    fn token_piece(&self, token: Token) -> Vec<u8>;
}

/// A decoding session: one batch being filled, a KV cache of sequences, and samplers that read
/// the rows of the last decode.
pub trait Engine {
    /// One choice's sampling chain and random state.
    type Sampler;
    /// The vocabulary the sampled tokens come from.
    type Vocab: Vocab;

    /// The vocabulary.
    fn vocab(&self) -> &Self::Vocab;
    /// Tokens the batch holds at most.
    fn batch_capacity(&self) -> usize;
    /// Tokens queued in the batch so far.
    fn batch_len(&self) -> usize;
    /// Queues one token of sequence `seq` at position `pos`; `logits` asks for its output row.
    /// Returns the row index that [`Engine::sample`] needs when `logits` is set.
    ///
    /// # Errors
    /// When the batch is full.
    fn push(
        &mut self,
        token: Token,
        pos: u32,
        seq: SeqId,
        logits: bool,
    ) -> Result<i32, EngineError>;
    /// Runs the queued batch and empties it.
    ///
    /// # Errors
    /// When the decode fails; the batch is emptied all the same.
    fn decode(&mut self) -> Result<(), EngineError>;
    /// Empties the batch without decoding it.
    fn discard_batch(&mut self);
    /// Gives `dst` every cell of `src`.
    ///
    /// # Errors
    /// When the cache refuses the copy.
    fn share_prefix(&mut self, src: SeqId, dst: SeqId) -> Result<(), EngineError>;
    /// Drops the cells of `seq` at positions `from` and after.
    ///
    /// # Errors
    /// When the cache cannot drop them.
    fn truncate_seq(&mut self, seq: SeqId, from: u32) -> Result<(), EngineError>;
    /// Drops every cell of `seq`; cells still shared with another sequence stay.
    ///
    /// # Errors
    /// When the cache cannot drop them.
    fn clear_seq(&mut self, seq: SeqId) -> Result<(), EngineError>;
    /// The serialised state of sequence `seq`.
    ///
    /// # Errors
    /// When this session cannot serialise its states.
    fn seq_state(&self, seq: SeqId) -> Result<Vec<u8>, EngineError>;
    /// Loads a state from [`Engine::seq_state`] into sequence `seq`.
    ///
    /// # Errors
    /// When the state is refused; the sequence is then empty.
    fn restore_seq_state(&mut self, seq: SeqId, state: &[u8]) -> Result<(), EngineError>;
    /// The raw logits of row `row` of the last decode: what the decode-group probe compares,
    /// bit for bit.
    fn logits(&self, row: i32) -> Vec<f32>;
    /// A sampler for one choice, constrained by `constraint` when there is one.
    ///
    /// # Errors
    /// When the sampler cannot be built.
    fn sampler(
        &self,
        spec: &SamplerSpec,
        constraint: Option<&Constraint>,
    ) -> Result<Self::Sampler, EngineError>;
    /// Draws the next token from row `row` of the last decode.
    fn sample(&self, sampler: &mut Self::Sampler, row: i32) -> Token;
    /// The log probability of `token` at row `row` and the `top` most likely tokens.
    fn logprobs(&self, row: i32, token: Token, top: usize) -> TokenLogprobs;
}
