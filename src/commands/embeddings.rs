//! The run's embeddings: how vectors are pooled and scaled, the second context that computes
//! them (made at the first embeddings request), and one request's progress through them, a
//! bounded piece at a time, so the admission loop interleaves it with the scheduler's steps and
//! sees a stop request between two pieces.

use std::time::Instant;

use crate::commands::cli::RunConfig;
use crate::engine::embed::{context_size, normalize, Embedder, Pooling};
use crate::engine::{Model, Token};
use crate::formats::line_error::ErrorCode;
use crate::formats::result::ComputationKey;
use crate::input::embeddings::EmbedInput;
use crate::report::metrics::Metrics;
use crate::schedule::job::embedding_key;

/// Tokens one piece tokenizes, at least (one input is never split): a small fraction of the
/// time one embedding decode takes, and few pieces even for the largest request.
const TOKENIZE_PIECE: usize = 32 * 1024;

/// One embeddings request on its way: its inputs tokenized, then embedded, one piece at a
/// time. Dropped unfinished (a stop), it leaves nothing behind: a resumed run starts it again.
#[derive(Debug)]
pub struct EmbedWork {
    /// Its input line.
    pub line: u64,
    /// Its `custom_id`.
    pub custom_id: String,
    /// Whether it asked for base64 vectors.
    pub base64: bool,
    inputs: Vec<EmbedInput>,
    tokens: Vec<Vec<Token>>,
    key: Option<ComputationKey>,
    vectors: Vec<Vec<f32>>,
}

impl EmbedWork {
    /// The request on input line `line`, not started.
    pub fn new(line: u64, custom_id: String, inputs: Vec<EmbedInput>, base64: bool) -> Self {
        Self {
            line,
            custom_id,
            base64,
            inputs,
            tokens: Vec::new(),
            key: None,
            vectors: Vec::new(),
        }
    }

    /// Its inputs' tokens, all of them.
    pub fn n_tokens(&self) -> u64 {
        self.tokens.iter().map(|t| t.len() as u64).sum()
    }
}

/// What one piece of an [`EmbedWork`] came to.
#[derive(Debug)]
pub enum Step {
    /// Some inputs tokenized, or one embedded: more to do.
    More,
    /// Every input is tokenized and the request has its key: look for a copy before any is
    /// embedded. The next piece embeds the first.
    Keyed(ComputationKey),
    /// The request fails with this error line's code and message.
    Failed(ErrorCode, String),
    /// Every input is embedded: the request's key and its vectors, in input order.
    Done(ComputationKey, Vec<Vec<f32>>),
}

/// The run's embeddings settings and context.
pub struct Embeddings<'m> {
    model: &'m Model,
    pooling: Pooling,
    normalize: bool,
    embedder: Option<Embedder<'m>>,
}

impl<'m> Embeddings<'m> {
    /// The settings of `cfg`: its pooling, else the GGUF's, else the mean.
    pub fn new(model: &'m Model, cfg: &RunConfig) -> Self {
        Self {
            model,
            pooling: cfg
                .pooling
                .or_else(|| model.gguf_pooling())
                .unwrap_or(Pooling::Mean),
            normalize: cfg.normalize_embeddings,
            embedder: None,
        }
    }

    /// Most tokens an input may have: the embedding context's size.
    fn max_tokens(&self) -> usize {
        context_size(self.model.info().n_ctx_train) as usize
    }

    /// Does the next piece of `work`: tokenizes inputs (at least `TOKENIZE_PIECE` tokens'
    /// worth, or all that are left), or keys the request once all are, or embeds one input.
    /// Each embedded input counts in `metrics`.
    pub fn advance(&mut self, work: &mut EmbedWork, threads: u32, metrics: &mut Metrics) -> Step {
        if work.tokens.len() < work.inputs.len() {
            let mut piece = 0;
            while piece < TOKENIZE_PIECE && work.tokens.len() < work.inputs.len() {
                let i = work.tokens.len();
                match self.tokenize(i, &work.inputs[i]) {
                    Ok(tokens) => {
                        piece += tokens.len().max(1);
                        work.tokens.push(tokens);
                    }
                    Err((code, message)) => return Step::Failed(code, message),
                }
            }
            return Step::More;
        }
        let Some(key) = work.key else {
            let key = embedding_key(
                &work.tokens,
                self.pooling.name(),
                self.normalize,
                work.base64,
            );
            work.key = Some(key);
            return Step::Keyed(key);
        };
        if let Some(tokens) = work.tokens.get(work.vectors.len()) {
            let started = Instant::now();
            match self.embed(tokens, threads) {
                Ok(v) => work.vectors.push(v),
                Err(e) => return Step::Failed(ErrorCode::EngineError, e.to_string()),
            }
            metrics.embedded_tokens += tokens.len() as u64;
            metrics.embedding_time += started.elapsed();
        }
        if work.vectors.len() < work.tokens.len() {
            return Step::More;
        }
        Step::Done(key, std::mem::take(&mut work.vectors))
    }

    /// Input `i`'s tokens, checked against the vocabulary and the length limit.
    fn tokenize(&self, i: usize, input: &EmbedInput) -> Result<Vec<Token>, (ErrorCode, String)> {
        let n_vocab = self.model.info().n_vocab;
        let max = self.max_tokens();
        let tokens = match input {
            EmbedInput::Text(t) => self.model.tokenize(t),
            EmbedInput::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t as u64 >= u64::from(n_vocab)) {
                    return Err((
                        ErrorCode::InvalidMessages,
                        format!("`input[{i}]` holds token id {bad}; the vocabulary has {n_vocab}"),
                    ));
                }
                ids.iter().map(|&t| Token(t)).collect()
            }
        };
        if tokens.len() > max {
            return Err((
                ErrorCode::ContextLengthExceeded,
                format!(
                    "input {i} has {} tokens; at most {max} are embedded",
                    tokens.len()
                ),
            ));
        }
        Ok(tokens)
    }

    /// One input's vector, normalized unless asked not to; the context is made at the first.
    fn embed(&mut self, tokens: &[Token], threads: u32) -> anyhow::Result<Vec<f32>> {
        let embedder = match &mut self.embedder {
            Some(e) => e,
            slot @ None => {
                let n_ctx = context_size(self.model.info().n_ctx_train);
                tracing::info!(
                    pooling = self.pooling.name(),
                    "embedding context: {n_ctx} tokens"
                );
                slot.insert(self.model.new_embedder(threads, n_ctx, self.pooling)?)
            }
        };
        let mut v = embedder.embed(tokens)?;
        if self.normalize {
            normalize(&mut v);
        }
        Ok(v)
    }
}
