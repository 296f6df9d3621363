//! A scripted engine for the scheduler's unit tests: no model, deterministic tokens, failures
//! on cue, and a record of every decode call.
//!
//! It keeps each sequence's tokens as its "KV cells" and checks that every queued token lands
//! at the next free position, as llama.cpp's per-sequence streams require: a dummy row left
//! behind, or a fork that lost its prompt, shows up as a failed decode or a different answer.
//! A sampled token is a function of the sequence's whole context and the sampler's seed, so
//! an answer changes exactly when what the request saw changes; a scripted [`Kernel`] adds what
//! a row's bits take from the shape of its call (its row count, the deepest stream beside it,
//! its place), as llama.cpp's kernels may.

use std::collections::HashMap;

use crate::engine::{
    Constraint, Engine, EngineError, SamplerSpec, SeqId, Token, TokenLogprobs, Vocab,
};

/// The end-of-generation token.
pub const EOS: Token = Token(0);

/// Token texts by id: 0 ends generation.
const PIECES: [&str; 14] = [
    "", "a", "b", "c", " ", "ST", "OP", "x", ".", "!", "<think>", "</think>", "</", "think>",
];
/// Tokens [`hash_pick`] draws from: the thinking markers (10 to 13) only come when a test's
/// own pick or the engine writes them.
const PICKED: u64 = 10;
/// The one token a constrained fake sampler draws, besides the end of generation.
pub const CONSTRAINED: Token = Token(7);

/// One queued token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// The token.
    pub token: Token,
    /// Its position in its sequence.
    pub pos: u32,
    /// Its sequence.
    pub seq: SeqId,
    /// Whether it asked for logits.
    pub logits: bool,
}

/// Chooses the token a row samples, from the row's context and a seed.
pub type Pick = Box<dyn Fn(&[Token], u32) -> Token>;

/// Decides, from a call's rows, whether that decode fails.
pub type FailWhen = Box<dyn FnMut(&[Row]) -> bool>;

/// What a row's kernel sees of its pass: llama.cpp decodes a call in passes of consecutive
/// sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Rows in the pass.
    pub rows: usize,
    /// Cells its attention covers: the deepest stream in it, in steps of 256 cells.
    pub span: usize,
    /// The row's place in the pass.
    pub place: usize,
    /// The cells of the row's own sequence, its token included.
    pub cells: usize,
}

/// A row's salt from its pass: rows with equal context and salt have equal bits.
pub type Kernel = Box<dyn Fn(Pass) -> u32>;

/// Kernels whose rows are the same in every pass.
pub fn uniform() -> Kernel {
    Box::new(|_| 0)
}

/// Kernels whose rows differ in passes of `rows` rows.
pub fn differs_at(rows: std::ops::RangeInclusive<usize>) -> Kernel {
    Box::new(move |p| u32::from(rows.contains(&p.rows)))
}

/// A GPU's kernels: a lone row, 2 to 8 rows and more rows each differ.
pub fn gpu_like() -> Kernel {
    Box::new(|p| match p.rows {
        1 => 1,
        2..=8 => 2,
        _ => 3,
    })
}

/// Kernels that take whole blocks of 4 rows another way than the tail, where only rows of a
/// stream deeper than 256 cells show it (as Gemma 3's matrix products on this project's CPU).
pub fn blocks_of_4() -> Kernel {
    Box::new(|p| u32::from(p.cells > 256 && p.place < p.rows / 4 * 4))
}

/// Kernels whose rows change with the deepest stream in the pass.
pub fn by_depth() -> Kernel {
    Box::new(|p| u32::try_from(p.span / 256).unwrap_or(u32::MAX))
}

/// The passes llama.cpp cuts a call into: runs of consecutive sequences (one sequence's
/// tokens stay together).
pub fn passes(rows: &[Row]) -> Vec<&[Row]> {
    let mut passes = Vec::new();
    let mut start = 0;
    for i in 1..=rows.len() {
        let next = rows.get(i).map(|r| r.seq);
        let prev = rows[i - 1].seq;
        if next.is_none_or(|s| s != prev && s != prev + 1) {
            passes.push(&rows[start..i]);
            start = i;
        }
    }
    passes
}

/// The fake's sampler: a seed, and whether a constraint holds it (then it draws only
/// [`CONSTRAINED`] or the end of generation).
pub struct FakeSampler {
    seed: u32,
    constrained: bool,
}

/// The fake's vocabulary.
pub struct FakeVocab;

impl Vocab for FakeVocab {
    fn is_end_of_generation(&self, token: Token) -> bool {
        token == EOS
    }

    fn token_bytes(&self, token: Token, out: &mut Vec<u8>) {
        out.extend_from_slice(piece(token).as_bytes());
    }

    fn token_piece(&self, token: Token) -> Vec<u8> {
        piece(token).as_bytes().to_vec()
    }
}

fn piece(token: Token) -> &'static str {
    usize::try_from(token.0)
        .ok()
        .and_then(|i| PIECES.get(i))
        .copied()
        .unwrap_or("?")
}

/// A row's logits, as the fake keeps them: the context through the row, and a salt that
/// stands for kernels that depend on the call's row count.
struct Logits {
    context: Vec<Token>,
    salt: u32,
}

/// The scripted engine.
pub struct FakeEngine {
    n_batch: usize,
    cells: HashMap<SeqId, Vec<Token>>,
    queued: Vec<Row>,
    rows: Vec<Option<Logits>>,
    /// Every decode call, failed ones included, in order.
    pub calls: Vec<Vec<Row>>,
    /// Every `share_prefix(src, dst)`.
    pub shares: Vec<(SeqId, SeqId)>,
    /// When set, a call these rows make fails.
    pub fail_when: Option<FailWhen>,
    /// What each row takes from the shape of its pass.
    pub kernel: Kernel,
    /// How tokens are chosen.
    pub pick: Pick,
}

impl FakeEngine {
    /// A fake whose batch holds `n_batch` tokens, picking tokens by [`hash_pick`].
    pub fn new(n_batch: usize) -> Self {
        Self {
            n_batch,
            cells: HashMap::new(),
            queued: Vec::new(),
            rows: Vec::new(),
            calls: Vec::new(),
            shares: Vec::new(),
            fail_when: None,
            kernel: uniform(),
            pick: Box::new(hash_pick),
        }
    }

    /// The tokens sequence `seq` holds.
    pub fn cells(&self, seq: SeqId) -> &[Token] {
        self.cells.get(&seq).map_or(&[], Vec::as_slice)
    }
}

/// A token from a hash of the context and the seed: an end of generation about one time in
/// ten, otherwise a letter or punctuation.
pub fn hash_pick(context: &[Token], seed: u32) -> Token {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(seed);
    for t in context {
        h = (h ^ u64::from(t.0.unsigned_abs())).wrapping_mul(0x0100_0000_01b3);
    }
    Token(i32::try_from(h % PICKED).unwrap_or(1))
}

impl Engine for FakeEngine {
    type Sampler = FakeSampler;
    type Vocab = FakeVocab;

    fn vocab(&self) -> &FakeVocab {
        &FakeVocab
    }

    fn batch_capacity(&self) -> usize {
        self.n_batch
    }

    fn batch_len(&self) -> usize {
        self.queued.len()
    }

    fn push(
        &mut self,
        token: Token,
        pos: u32,
        seq: SeqId,
        logits: bool,
    ) -> Result<i32, EngineError> {
        if self.queued.len() >= self.n_batch {
            return Err(EngineError::Batch("the fake's batch is full".into()));
        }
        self.queued.push(Row {
            token,
            pos,
            seq,
            logits,
        });
        Ok(i32::try_from(self.queued.len() - 1).unwrap_or(i32::MAX))
    }

    fn decode(&mut self) -> Result<(), EngineError> {
        let rows = std::mem::take(&mut self.queued);
        self.calls.push(rows.clone());
        self.rows.clear();
        if self.fail_when.as_mut().is_some_and(|f| f(&rows)) {
            return Err(EngineError::Decode("scripted failure".into()));
        }
        for pass in passes(&rows) {
            let mut span = 0;
            for row in pass {
                let cells = self.cells.entry(row.seq).or_default();
                if row.pos as usize != cells.len() {
                    return Err(EngineError::Decode(format!(
                        "sequence {} holds {} tokens, a token came at position {}",
                        row.seq,
                        cells.len(),
                        row.pos
                    )));
                }
                cells.push(row.token);
                span = span.max(cells.len().div_ceil(256) * 256);
            }
            for (place, row) in pass.iter().enumerate() {
                let context = &self.cells[&row.seq];
                // A token of a sequence that came earlier in this pass sees only its context.
                let seen = pass[place + 1..]
                    .iter()
                    .filter(|r| r.seq == row.seq)
                    .count();
                let salt = (self.kernel)(Pass {
                    rows: pass.len(),
                    span,
                    place,
                    cells: context.len() - seen,
                });
                self.rows.push(row.logits.then(|| Logits {
                    context: context[..context.len() - seen].to_vec(),
                    salt,
                }));
            }
        }
        Ok(())
    }

    fn discard_batch(&mut self) {
        self.queued.clear();
    }

    fn share_prefix(&mut self, src: SeqId, dst: SeqId) -> Result<(), EngineError> {
        self.shares.push((src, dst));
        let cells = self.cells(src).to_vec();
        self.cells.insert(dst, cells);
        Ok(())
    }

    fn truncate_seq(&mut self, seq: SeqId, from: u32) -> Result<(), EngineError> {
        if let Some(cells) = self.cells.get_mut(&seq) {
            cells.truncate(from as usize);
        }
        Ok(())
    }

    fn clear_seq(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.cells.remove(&seq);
        Ok(())
    }

    fn seq_state(&self, seq: SeqId) -> Result<Vec<u8>, EngineError> {
        Ok(self
            .cells(seq)
            .iter()
            .flat_map(|t| t.0.to_le_bytes())
            .collect())
    }

    fn restore_seq_state(&mut self, seq: SeqId, state: &[u8]) -> Result<(), EngineError> {
        if !state.len().is_multiple_of(4) {
            return Err(EngineError::Restore(state.len(), "not whole tokens".into()));
        }
        let tokens = state
            .chunks_exact(4)
            .map(|b| Token(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect();
        self.cells.insert(seq, tokens);
        Ok(())
    }

    fn logits(&self, row: i32) -> Vec<f32> {
        let logits = usize::try_from(row)
            .ok()
            .and_then(|r| self.rows.get(r))
            .and_then(Option::as_ref)
            .expect("the probe reads only rows that asked for logits");
        // Stands for the logits a context gives: equal bits exactly when context and salt are.
        let context = std::hash::BuildHasher::hash_one(
            &std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default(),
            &logits.context,
        );
        vec![
            f32::from_bits(u32::try_from(context >> 32).unwrap_or(0)),
            f32::from_bits(u32::try_from(context & 0xffff_ffff).unwrap_or(0)),
            f32::from_bits(logits.salt),
        ]
    }

    fn sampler(
        &self,
        spec: &SamplerSpec,
        constraint: Option<&Constraint>,
    ) -> Result<FakeSampler, EngineError> {
        Ok(FakeSampler {
            seed: spec.seed,
            constrained: constraint.is_some(),
        })
    }

    fn sample(&self, sampler: &mut FakeSampler, row: i32) -> Token {
        let logits = usize::try_from(row)
            .ok()
            .and_then(|r| self.rows.get(r))
            .and_then(Option::as_ref)
            .expect("the scheduler samples only rows that asked for logits");
        let token = (self.pick)(
            &logits.context,
            sampler.seed.wrapping_add(logits.salt * 7919),
        );
        if sampler.constrained && token != EOS {
            CONSTRAINED
        } else {
            token
        }
    }

    fn logprobs(&self, _row: i32, token: Token, top: usize) -> TokenLogprobs {
        TokenLogprobs {
            logprob: -f32::from(u8::try_from(token.0).unwrap_or(0)) / 10.0,
            top: vec![(token, -0.1); top.min(1)],
        }
    }
}
