//! One choice of one request as it is generated, and a request's choices gathered into its
//! completion.
//!
//! A [`Sequence`] holds a choice's sampler, the text so far, its log probabilities and why it
//! stopped. A request with `n` choices computes its prompt once in one sequence, which then
//! forks into `n`; [`Gather`] collects the finished choices and emits the request's completion
//! when the last one is done.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Instant;

use crate::engine::{Token, TokenLogprobs, Vocab};
use crate::formats::result::{Choice, Completion, StopReason, TokenLogprob, TopLogprob, Usage};
use crate::prompt::PrefixKey;
use crate::schedule::detok::TextBuilder;
use crate::schedule::job::Job;
use crate::schedule::reasoning::{Step, Thinking};

/// One choice of a request, from its prompt to its last token.
pub struct Sequence<S> {
    /// The request, shared by its choices.
    pub job: Rc<Job>,
    /// Which choice, from 0.
    pub choice: u32,
    /// Its own sampler (and random state).
    pub sampler: S,
    /// The prefix lease it holds: choice 0 only, when the request shares a prefix.
    pub prefix: Option<PrefixKey>,
    /// Tokens of this sequence already in the KV cache.
    pub pos: usize,
    /// The batch row whose logits the next sample reads.
    pub row: Option<i32>,
    text: TextBuilder,
    generated: u64,
    logprobs: Option<Vec<TokenLogprob>>,
    /// A reasoning request's thinking; `None` when it does not think.
    thinking: Option<Thinking>,
    /// Set by the token that closed the thinking, until [`Sequence::answer_started`] reads it.
    answer_started: bool,
}

impl<S> Sequence<S> {
    /// Choice `choice` of `job`, whose first `pos` tokens are already in its cells.
    pub fn new(
        job: Rc<Job>,
        choice: u32,
        sampler: S,
        prefix: Option<PrefixKey>,
        pos: usize,
    ) -> Self {
        let logprobs = job.params.logprobs.map(|_| Vec::new());
        let thinking = job.params.think.clone().map(Thinking::new);
        Self {
            job,
            choice,
            sampler,
            prefix,
            pos,
            row: None,
            text: TextBuilder::new(),
            generated: 0,
            logprobs,
            thinking,
            answer_started: false,
        }
    }

    /// The token the engine writes next instead of sampling (a thinking marker), if any.
    pub fn forced(&mut self) -> Option<Token> {
        self.thinking.as_mut().and_then(Thinking::forced)
    }

    /// The token to take in place of `sampled`: an end of generation while thinking becomes
    /// the close marker's first token (the rest follow as forced tokens), so that the answer,
    /// and its constraint, still come.
    pub fn substitute(&mut self, model: &impl Vocab, sampled: Token) -> Token {
        match self.thinking.as_mut() {
            Some(t) if !t.answering() && model.is_end_of_generation(sampled) => {
                t.force_close();
                t.forced().unwrap_or(sampled)
            }
            _ => sampled,
        }
    }

    /// Whether the last token closed the thinking: the answer's sampler (with its constraint)
    /// takes over from the next token. Reading it clears it.
    pub fn answer_started(&mut self) -> bool {
        std::mem::take(&mut self.answer_started)
    }

    /// Takes a sampled token; `lp` are its log probabilities when the request asked for them.
    /// Returns why the choice ends, if it does.
    pub fn take(
        &mut self,
        model: &impl Vocab,
        token: Token,
        lp: Option<TokenLogprobs>,
    ) -> Option<StopReason> {
        self.generated += 1;
        if model.is_end_of_generation(token) {
            return Some(StopReason::Stop);
        }
        let searched = self.text.text().len();
        let mut bytes = Vec::new();
        model.token_bytes(token, &mut bytes);
        if let (Some(list), Some(lp)) = (self.logprobs.as_mut(), lp) {
            list.push(TokenLogprob {
                sampled: top_logprob(lp.logprob, &bytes),
                top: lp
                    .top
                    .iter()
                    .map(|&(t, l)| top_logprob(l, &model.token_piece(t)))
                    .collect(),
            });
        }
        self.text.push(&bytes);
        // Stop strings apply to the answer only: while thinking, nothing is searched.
        let floor = match self.thinking.as_mut() {
            Some(t) => {
                if t.advance(self.text.text()) == Step::Closed {
                    self.answer_started = true;
                }
                t.answer_start(self.text.text())
            }
            None => 0,
        };
        if self
            .text
            .cut_at_stop_from(&self.job.params.stop, searched, floor)
        {
            Some(StopReason::Stop)
        } else if self.generated >= u64::from(self.job.params.max_tokens) {
            Some(StopReason::Length)
        } else {
            None
        }
    }

    /// Tokens sampled so far.
    pub fn generated(&self) -> u64 {
        self.generated
    }

    /// Tokens of the thinking so far (0 for a request that does not think).
    pub fn reasoning_tokens(&self) -> u64 {
        self.thinking
            .as_ref()
            .map_or(0, |t| u64::from(t.reasoning_tokens()))
    }

    /// The finished choice. Of a thinking request, `content` is the answer alone and the
    /// log probabilities are the answer's tokens'.
    pub fn finish(self, reason: StopReason) -> Choice {
        let text = self.text.finish();
        let Some(thinking) = self.thinking else {
            return Choice {
                content: text,
                reason,
                logprobs: self.logprobs,
                reasoning: None,
            };
        };
        let (reasoning, content) = thinking.split(&text);
        let skip = thinking.tokens_before_answer() as usize;
        Choice {
            content,
            reason,
            logprobs: self.logprobs.map(|l| l.into_iter().skip(skip).collect()),
            reasoning: Some(reasoning),
        }
    }
}

fn top_logprob(logprob: f32, bytes: &[u8]) -> TopLogprob {
    TopLogprob {
        token: String::from_utf8_lossy(bytes).into_owned(),
        bytes: bytes.to_vec(),
        logprob,
    }
}

/// A request whose choices are still being generated.
struct Pending {
    job: Rc<Job>,
    choices: Vec<Option<Choice>>,
    completion_tokens: u64,
    reasoning_tokens: u64,
    cached_tokens: u64,
    started: Instant,
    first_token: Option<f64>,
}

/// Collects the choices of the requests in flight, by input line.
#[derive(Default)]
pub struct Gather {
    pending: HashMap<u64, Pending>,
}

impl Gather {
    /// Starts collecting `job`'s choices; `cached_tokens` of its prompt came from a prefix.
    pub fn start(&mut self, job: &Rc<Job>, cached_tokens: u64) {
        self.pending.insert(
            job.line,
            Pending {
                job: Rc::clone(job),
                choices: vec![None; job.params.n as usize],
                completion_tokens: 0,
                reasoning_tokens: 0,
                cached_tokens,
                started: Instant::now(),
                first_token: None,
            },
        );
    }

    /// Notes that a token was sampled for `line`; the first one sets the time to first token.
    pub fn sampled(&mut self, line: u64) {
        if let Some(p) = self.pending.get_mut(&line) {
            p.first_token
                .get_or_insert_with(|| p.started.elapsed().as_secs_f64());
        }
    }

    /// Files a finished choice; returns the request's completion when it was the last one.
    pub fn finished<S>(&mut self, seq: Sequence<S>, reason: StopReason) -> Option<Completion> {
        let line = seq.job.line;
        let choice = seq.choice as usize;
        let p = self.pending.get_mut(&line)?;
        p.completion_tokens += seq.generated();
        p.reasoning_tokens += seq.reasoning_tokens();
        if let Some(slot) = p.choices.get_mut(choice) {
            *slot = Some(seq.finish(reason));
        }
        if p.choices.iter().any(Option::is_none) {
            return None;
        }
        let p = self.pending.remove(&line)?;
        Some(Completion {
            line,
            custom_id: p.job.custom_id.clone(),
            choices: p.choices.into_iter().flatten().collect(),
            usage: Usage {
                prompt_tokens: p.job.prompt.tokens.len() as u64,
                completion_tokens: p.completion_tokens,
                reasoning_tokens: p.reasoning_tokens,
                cached_tokens: p.cached_tokens,
            },
            time_to_first_token: p.first_token.unwrap_or_default(),
            endpoint: p.job.endpoint.clone(),
        })
    }

    /// Forgets a request that failed; true when it was still being collected (so its error is
    /// reported once).
    pub fn abandon(&mut self, line: u64) -> bool {
        self.pending.remove(&line).is_some()
    }
}
